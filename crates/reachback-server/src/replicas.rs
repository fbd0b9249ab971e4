//! Replicas sharing one database (issue 21): the registry (registration, heartbeat,
//! dead replicas declared and cleaned up) and how changes made elsewhere reach
//! this replica — pushed by PostgreSQL `LISTEN/NOTIFY`, coalesced, with a periodic
//! full check as the backstop.
//!
//! ```text
//!  other replica's write ──trigger──► NOTIFY reachback_changes 'policy'   (delivered on commit)
//!                                        │
//!  listen() ── PgListener ──► Changes (a set of topic bits + a wake-up) ◄── backstop(): every topic, every 30 s
//!                                        │                                    (and after the listener reconnects)
//!  apply() ── coalesces 20 ms, takes the bits ──► sync of ranges / settings / policy / sessions / connectors
//! ```

use std::sync::Weak;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::Context;
use reachback_store::{Backend, Heartbeat, NodeLock, Store};

use crate::state::{AppState, Settings};

/// How often a replica writes its heartbeat (and looks for dead replicas).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica whose last heartbeat is older than this is declared dead. With a
/// heartbeat and a sweep every second, a replica that stops is declared dead at
/// most about 4 s after its last heartbeat.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Dead replicas stay listed this long after their last heartbeat, then are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The periodic full check on PostgreSQL, a backstop for lost notifications.
pub const DEFAULT_BACKSTOP: Duration = Duration::from_secs(30);
/// Notifications arriving within this of the first are handled by one sync.
const COALESCE: Duration = Duration::from_millis(20);
/// How often connected devices are marked seen.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Topics of the change channel, as bits.
pub mod topic {
    pub const RANGES: u8 = 1;
    pub const SETTINGS: u8 = 2;
    pub const POLICY: u8 = 4;
    pub const SESSIONS: u8 = 8;
    pub const CONNECTORS: u8 = 16;
    pub const ALL: u8 = RANGES | SETTINGS | POLICY | SESSIONS | CONNECTORS;

    /// The bit of a notification's payload (`None`: not a topic we know).
    pub fn of(payload: &str) -> Option<u8> {
        match payload {
            "ranges" => Some(RANGES),
            "settings" => Some(SETTINGS),
            "policy" => Some(POLICY),
            "sessions" => Some(SESSIONS),
            "connectors" => Some(CONNECTORS),
            _ => None,
        }
    }
}

/// This process's entry in the registry.
pub struct Registration {
    /// new at every start: tells this run's row from another process's
    pub instance_id: String,
    /// PostgreSQL: the node name's advisory lock, held while the process lives
    lock: tokio::sync::Mutex<Option<NodeLock>>,
}

impl Registration {
    /// Gives the node name up (PostgreSQL: its lock), as the process's end would: for
    /// a test that builds another server under the same name in the same process.
    pub async fn release(&self) {
        if let Some(lock) = self.lock.lock().await.take() {
            lock.release().await;
        }
    }
}

/// Registers this process under its node name. On PostgreSQL the name's advisory
/// lock is taken first: a name another live process holds is refused, so two
/// processes never share a row (or clear each other's sessions at start).
pub async fn register(store: &Store, node_name: &str, tunnel_endpoint: &str) -> anyhow::Result<Registration> {
    let lock = match store.backend() {
        Backend::Sqlite => None,
        Backend::Postgres => match store.lock_node_name(node_name).await.context("taking the node name's lock")? {
            Some(lock) => Some(lock),
            None => anyhow::bail!(
                "another live server process uses the node name {node_name:?} on this database; give each replica its own --node-name (REACHBACK_NODE_NAME)"
            ),
        },
    };
    let instance_id = reachback_store::new_id();
    store.register_replica(node_name, &instance_id, tunnel_endpoint).await.context("registering this replica")?;
    tracing::info!(node = %node_name, %tunnel_endpoint, "replica registered");
    Ok(Registration { instance_id, lock: tokio::sync::Mutex::new(lock) })
}

/// The tunnel endpoint this replica hands out: `--broker-endpoints`, else the bound
/// tunnel address, else the one it will listen on.
pub fn tunnel_endpoint(state: &AppState) -> String {
    state.config.broker_endpoints_for(state.broker.tunnel_address().unwrap_or(state.config.tunnel_listen), None).join(",")
}

/// Every second: this replica's heartbeat, the dead replicas declared and their
/// sessions deleted, the alive gauge; every minute the devices with a live session
/// here are marked seen (an idle-TTL release never takes a connected device's address).
pub async fn heartbeat(state: Weak<AppState>) {
    let mut interval = tokio::time::interval(HEARTBEAT);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_touch = std::time::Instant::now();
    let mut lost_logged = false;
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else { return };
        let node = state.config.node_name.as_str();
        let registration = &state.registration;
        if let Some(lock) = registration.lock.lock().await.as_mut() {
            match lock.check().await {
                Ok(true) => {}
                // the heartbeat below finds the row taken and says so, once
                Ok(false) => tracing::debug!(node = %node, "another server process holds this node name's lock"),
                Err(error) => tracing::warn!(%error, "could not check the node name's lock"),
            }
        }
        let connectors = state.metrics.broker.connectors_online.get();
        // the flows that entered here (a relayed flow is counted where it entered)
        let flows = state.metrics.broker.tcp.active.get() + state.metrics.broker.udp.active.get();
        match state.store.replica_heartbeat(node, &registration.instance_id, &tunnel_endpoint(&state), connectors, flows).await {
            Ok(Heartbeat::Alive) => lost_logged = false,
            Ok(Heartbeat::Revived) => {
                // its sessions were deleted by whoever declared it dead: the session sync disconnects them
                tracing::warn!(node = %node, "this replica had been declared dead (heartbeats late); its client sessions were cleared and reconnect");
                state.changes.mark(topic::SESSIONS);
            }
            Ok(Heartbeat::Lost) if !lost_logged => {
                lost_logged = true;
                tracing::error!(node = %node, "this replica's registry row belongs to another process now; give each replica its own --node-name");
            }
            Ok(Heartbeat::Lost) => {}
            Err(error) => tracing::warn!(%error, "could not write this replica's heartbeat"),
        }
        match state.store.sweep_dead_replicas(micros(DEAD_AFTER), micros(FORGET_AFTER)).await {
            Ok(dead) => {
                for (dead_node, sessions) in dead {
                    tracing::warn!(node = %dead_node, sessions, "replica declared dead (no heartbeat for {}s); its client sessions deleted", DEAD_AFTER.as_secs());
                }
            }
            Err(error) => tracing::warn!(%error, "could not look for dead replicas"),
        }
        if let Ok(replicas) = state.store.list_replicas(micros(DEAD_AFTER)).await {
            state.metrics.replicas_alive.set(replicas.iter().filter(|replica| replica.alive).count() as i64);
        }
        if last_touch.elapsed() >= TOUCH_EVERY && !state.broker.session_ids().is_empty() {
            last_touch = std::time::Instant::now();
            if let Err(error) = state.store.touch_sessions_on(node).await {
                tracing::warn!(%error, "could not mark the connected devices as seen");
            }
        }
    }
}

/// A clean stop: this replica's row is marked dead and its session rows go.
pub async fn stopped(state: &AppState) {
    if let Err(error) = state.store.replica_stopped(&state.config.node_name, &state.registration.instance_id).await {
        tracing::warn!(%error, "could not mark this replica stopped");
    }
}

pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// What changed and is not applied yet: a set of topics (bounded whatever the rate
/// of notifications) and a wake-up for the task that applies them.
#[derive(Default)]
pub struct Changes {
    pending: AtomicU8,
    wake: tokio::sync::Notify,
}

impl Changes {
    /// Records topics to sync; the applying task runs once for any number of marks.
    pub fn mark(&self, topics: u8) {
        self.pending.fetch_or(topics, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn take(&self) -> u8 {
        self.pending.swap(0, Ordering::AcqRel)
    }
}

/// Starts the tasks that keep this replica in step with changes made elsewhere.
/// PostgreSQL: the listener, and the backstop every `sync_backstop`. SQLite (this
/// process is the only writer): the broker's check every second as before (the
/// policy, sessions and connectors its own API changed are applied at once anyway).
pub fn spawn(state: &std::sync::Arc<AppState>) -> Vec<tokio::task::JoinHandle<()>> {
    let weak = std::sync::Arc::downgrade(state);
    let mut tasks = vec![tokio::spawn(apply(weak.clone()))];
    match state.store.backend() {
        Backend::Postgres => {
            tasks.push(tokio::spawn(listen(weak.clone())));
            tasks.push(tokio::spawn(backstop(weak, state.config.sync_backstop, topic::ALL)));
        }
        Backend::Sqlite => tasks.push(tokio::spawn(backstop(weak, Duration::from_secs(1), topic::POLICY | topic::SESSIONS | topic::CONNECTORS))),
    }
    tasks
}

/// Marks `topics` every `period` (the first time at once).
async fn backstop(state: Weak<AppState>, period: Duration, topics: u8) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else { return };
        state.changes.mark(topics);
    }
}

/// Listens to the change channel and marks each notification's topic. Everything is
/// marked when listening starts and whenever the connection was lost (what was
/// notified meanwhile is lost with it).
async fn listen(state: Weak<AppState>) {
    loop {
        let Some(store) = state.upgrade().map(|state| state.store.clone()) else { return };
        match store.change_listener().await {
            Ok(Some(mut listener)) => {
                tracing::debug!("listening for changes made by other replicas");
                if let Some(state) = state.upgrade() {
                    state.changes.mark(topic::ALL);
                }
                loop {
                    let received = listener.try_recv().await;
                    let Some(state) = state.upgrade() else { return };
                    match received {
                        Ok(Some(notification)) => {
                            match topic::of(notification.payload()).inspect(|_| tracing::trace!(topic = notification.payload(), "notified")) {
                                Some(bits) => state.changes.mark(bits),
                                None => tracing::debug!(payload = notification.payload(), "ignoring an unknown change notification"),
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("the change listener's connection was lost; reconnected, checking everything");
                            state.changes.mark(topic::ALL);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "the change listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(error) => tracing::warn!(%error, "could not listen for changes; trying again"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Applies marked topics: waits for a mark, lets a burst gather for [`COALESCE`],
/// then runs the matching syncs once. Marks made meanwhile wait for the next round,
/// so a flood of notifications costs at most one round at a time.
async fn apply(state: Weak<AppState>) {
    loop {
        let Some(changes) = state.upgrade().map(|state| state.changes.clone()) else { return };
        changes.wake.notified().await;
        tokio::time::sleep(COALESCE).await;
        let topics = changes.take();
        drop(changes);
        let Some(state) = state.upgrade() else { return };
        tracing::trace!(topics, "applying changes made elsewhere");
        if state.store.backend() == Backend::Postgres {
            if topics & topic::RANGES != 0 {
                state.allocation.reload_ranges().await;
                // connectors' range lists (changes made here notify this replica too)
                state.ranges_changed.send_replace(());
            }
            if topics & topic::SETTINGS != 0 {
                sync_settings(&state).await;
            }
        }
        if topics & topic::POLICY != 0
            && let Err(error) = state.broker.reload_policy(false).await
        {
            tracing::warn!(error = format!("{error:#}"), "could not reload the access policy");
        }
        if topics & topic::CONNECTORS != 0 {
            sync_connectors(&state).await;
        }
        if topics & topic::SESSIONS != 0 {
            sync_sessions(&state).await;
        }
    }
}

/// Installs the stored settings (one install at a time: see `settings_sync`).
async fn sync_settings(state: &AppState) {
    let _one_at_a_time = state.settings_sync.lock().await;
    if let Ok(values) = state.store.load_settings().await {
        let settings = Settings::from_stored(&values);
        state.allocation.set_quarantine_duration(settings.quarantine_micros()).await;
        state.set_settings(settings);
    }
}

/// Disconnects live connectors revoked or enrolled anew elsewhere.
async fn sync_connectors(state: &AppState) {
    if state.broker.has_connectors()
        && let Ok(connectors) = state.store.list_connectors().await
    {
        let current = connectors.into_iter().map(|row| (row.id, row.key_fingerprint)).collect();
        let kicked = state.broker.kick_stale_connectors(&current);
        if kicked > 0 {
            tracing::info!(kicked, "connectors revoked or enrolled anew elsewhere; disconnected");
        }
    }
}

/// Disconnects sessions whose row is gone (deleted, or their device deleted or its
/// binding released, through any replica; or this replica was declared dead).
async fn sync_sessions(state: &AppState) {
    let live = state.broker.session_ids();
    if live.is_empty() {
        return;
    }
    let Ok(stored) = state.store.client_session_ids_on(&state.config.node_name).await else { return };
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    for session_id in live.iter().filter(|id| !stored.contains(*id)) {
        if state.broker.kick_session(session_id) {
            tracing::info!(session_id = %session_id, "session ended elsewhere (deleted, device deleted or address released); disconnected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_the_triggers_payloads() {
        for (payload, bit) in [
            ("ranges", topic::RANGES),
            ("settings", topic::SETTINGS),
            ("policy", topic::POLICY),
            ("sessions", topic::SESSIONS),
            ("connectors", topic::CONNECTORS),
        ] {
            assert_eq!(topic::of(payload), Some(bit));
            // the migration's triggers send exactly these payloads
            let migration = include_str!("../../reachback-store/migrations/0014_replicas_postgres.sql");
            assert!(migration.contains(&format!("reachback_notify('{payload}')")), "{payload}");
        }
        assert_eq!(topic::of("bindings"), None);
    }

    #[tokio::test]
    async fn a_burst_of_marks_is_one_round() {
        let changes = Changes::default();
        for _ in 0..10_000 {
            changes.mark(topic::POLICY);
        }
        changes.mark(topic::RANGES);
        changes.wake.notified().await;
        assert_eq!(changes.take(), topic::POLICY | topic::RANGES);
        assert_eq!(changes.take(), 0);
    }
}
