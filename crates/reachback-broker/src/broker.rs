//! The broker: the tunnel endpoint inside `reachback server`. Agents and
//! connectors keep one TLS connection each (mutual TLS 1.3 over TCP, certificates
//! from the internal CA, many streams multiplexed on it). The broker registers live agents by virtual address, takes each
//! flow a connector opens, checks it against the access policy, opens a stream to
//! the agent that holds the address and relays the bytes both ways.
//!
//! One task per tunnel (its control stream and, for connectors, the flows it
//! opens), one task per flow.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use reachback_policy::{Action, FlowFacts, PolicySet, Protocol};
use reachback_proto::{ClientRole, Control, FlowOpen, FlowReply, Liveness, LivenessAction, NameUpdate, Refusal, Side, Transport, Welcome};
use reachback_store::{ClientSessionRow, new_id, now_micros};
use reachback_tunnel::tls::CertificateSlot;
use reachback_tunnel::{Connection, End, PeerIdentity, RecvStream, SendStream, TunnelListener, read_frame, write_frame};

use crate::metrics::FlowMetrics;
use crate::peers::Peers;
use crate::{BrokerContext, flowlog};

/// How long an agent has to answer a flow request (its local connect included).
pub const FLOW_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new tunnel has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes and hellos in progress at once (a flood of new tunnels waits in the backlog).
const MAX_GREETINGS: usize = 256;
/// Name updates a connector may fall behind by before its tunnel is restarted (and
/// it gets a fresh snapshot).
const NAME_FEED_CAPACITY: usize = 1024;
/// How often a replica looks for binding changes to push to its DNS connectors.
const NAME_FEED_INTERVAL: Duration = Duration::from_millis(250);
/// Bindings read per snapshot page.
const NAME_SNAPSHOT_PAGE: i64 = 20_000;

/// Tunnels one certificate key may hold at once (a reconnect overlapping its old tunnel needs two).
pub const MAX_TUNNELS_PER_IDENTITY: usize = 4;
/// A tunnel is dead from this side after this many keepalive intervals without a
/// frame (the client's own rule is 2.5: it is the one that must move in time).
const LIVENESS_INTERVALS: u32 = 3;
/// Close codes the peer sees.
const CLOSE_KICKED: u32 = 1;
const CLOSE_REFUSED: u32 = 2;
const CLOSE_SHUTDOWN: u32 = 3;

/// A live agent tunnel.
#[derive(Clone)]
pub struct AgentSession {
    pub session_id: String,
    pub device_id: String,
    pub hostname: String,
    pub username: String,
    pub platform: String,
    pub range_id: String,
    pub virtual_ip: IpAddr,
    connection: Connection,
}

/// A live connector tunnel.
#[derive(Clone)]
struct ConnectorSession {
    connection: Connection,
    /// the key its certificate carries (a re-enrollment elsewhere changes the stored one)
    key_fingerprint: Vec<u8>,
}

/// The broker's live state, shared with the API (kicks, status, policy reloads).
pub struct Broker {
    /// what the broker uses of the server: nothing else
    context: BrokerContext,
    /// tunnels to the other replicas (flows that cross them)
    peers: Peers,
    agents: RwLock<HashMap<IpAddr, AgentSession>>,
    connectors: RwLock<HashMap<String, ConnectorSession>>,
    policy: RwLock<Arc<PolicySet>>,
    policy_version: RwLock<Option<(i64, i64)>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// the address the tunnel endpoint is bound to, once it is
    tunnel_address: std::sync::OnceLock<SocketAddr>,
    /// tunnels open per certificate key (SHA-256 of its SubjectPublicKeyInfo)
    held: Arc<std::sync::Mutex<HashMap<Vec<u8>, usize>>>,
    /// changes of the bound hostnames, for the connectors that answer DNS
    names: tokio::sync::broadcast::Sender<Arc<NameUpdate>>,
    /// held while the access policy is reloaded
    policy_reload: tokio::sync::Mutex<()>,
    /// set when the replica stops: tunnels are told to move elsewhere, no new ones are taken
    draining: tokio::sync::watch::Sender<bool>,
    /// tunnels being served (any role), for the drain to wait on
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a tunnel while it is served.
struct Serving(Arc<std::sync::atomic::AtomicUsize>);

impl Serving {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Serving {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Serving(count.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a draining replica tells its tunnels (a `Bye` that is not final: reconnect elsewhere).
pub const DRAIN_REASON: &str = "this replica is shutting down; reconnect to another";

/// One tunnel of an identity, counted while it lives.
pub struct Held {
    held: Arc<std::sync::Mutex<HashMap<Vec<u8>, usize>>>,
    key: Vec<u8>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl Broker {
    /// A broker over `context`, with no tunnel yet ([`start`] binds the endpoint).
    pub fn new(context: BrokerContext) -> Broker {
        Broker {
            context,
            peers: Peers::default(),
            agents: RwLock::default(),
            connectors: RwLock::default(),
            policy: RwLock::default(),
            policy_version: RwLock::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            tunnel_address: std::sync::OnceLock::new(),
            held: Arc::default(),
            names: tokio::sync::broadcast::channel(NAME_FEED_CAPACITY).0,
            policy_reload: tokio::sync::Mutex::new(()),
            draining: tokio::sync::watch::channel(false).0,
            tunnels: Arc::default(),
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker {
    /// What the broker was given.
    pub fn context(&self) -> &BrokerContext {
        &self.context
    }

    /// The flow log's queue (the server turns it on and off and stops it).
    pub fn flow_log(&self) -> &flowlog::FlowLog {
        &self.context.flow_log
    }

    /// The tunnels to other replicas.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Counts a tunnel of the identity with this key; `None` when it holds the most it may.
    pub fn hold(&self, key: &[u8]) -> Option<Held> {
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = held.entry(key.to_vec()).or_insert(0);
        if *count >= MAX_TUNNELS_PER_IDENTITY {
            return None;
        }
        *count += 1;
        Some(Held { held: self.held.clone(), key: key.to_vec() })
    }

    /// The tunnel endpoint's address, once bound.
    pub fn tunnel_address(&self) -> Option<SocketAddr> {
        self.tunnel_address.get().copied()
    }

    /// Disconnects a client session now; returns whether this replica held it.
    pub fn kick_session(&self, session_id: &str) -> bool {
        let agents = read(&self.agents);
        let Some(session) = agents.values().find(|session| session.session_id == session_id) else { return false };
        session.connection.close(CLOSE_KICKED, b"session deleted");
        true
    }

    /// Disconnects every session of a device (deleted or revoked).
    pub fn kick_device(&self, device_id: &str) {
        for session in read(&self.agents).values().filter(|session| session.device_id == device_id) {
            session.connection.close(CLOSE_KICKED, b"device revoked");
        }
    }

    /// Disconnects every agent whose address lies in a range (released by a forced delete).
    pub fn kick_range(&self, range_id: &str) {
        for session in read(&self.agents).values().filter(|session| session.range_id == range_id) {
            session.connection.close(CLOSE_KICKED, b"address released");
        }
    }

    pub fn kick_connector(&self, connector_id: &str) {
        if let Some(session) = read(&self.connectors).get(connector_id) {
            session.connection.close(CLOSE_KICKED, b"connector revoked");
        }
    }

    pub fn connector_online(&self, connector_id: &str) -> bool {
        read(&self.connectors).contains_key(connector_id)
    }

    /// Disconnects live connectors that are revoked or enrolled anew (another key)
    /// according to `current` (id → enrolled key, for every connector not revoked).
    pub fn kick_stale_connectors(&self, current: &HashMap<String, Option<Vec<u8>>>) -> usize {
        let mut kicked = 0;
        for (id, session) in read(&self.connectors).iter() {
            let stale = match current.get(id) {
                None => true,
                Some(Some(fingerprint)) => *fingerprint != session.key_fingerprint,
                Some(None) => false,
            };
            if stale {
                session.connection.close(CLOSE_KICKED, b"connector revoked");
                kicked += 1;
            }
        }
        kicked
    }

    pub fn has_connectors(&self) -> bool {
        !read(&self.connectors).is_empty()
    }

    pub fn session_ids(&self) -> Vec<String> {
        read(&self.agents).values().map(|session| session.session_id.clone()).collect()
    }

    fn policy(&self) -> Arc<PolicySet> {
        read(&self.policy).clone()
    }

    /// Starts the drain of a stopping replica: no new tunnels are taken, and every
    /// tunnel is told (a `Bye` that is not final) to reconnect to another replica;
    /// its open flows go on until they end or [`Broker::close_all`].
    pub fn begin_drain(&self) {
        if !self.draining.send_replace(true) {
            tracing::info!(tunnels = self.tunnels.load(std::sync::atomic::Ordering::Relaxed), "draining: tunnels are told to move to another replica");
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Waits until every tunnel has ended or `deadline` passed; returns the tunnels left.
    pub async fn drained(&self, deadline: Duration) -> usize {
        let until = Instant::now() + deadline;
        loop {
            let left = self.tunnels.load(std::sync::atomic::Ordering::Relaxed);
            if left == 0 || Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes every tunnel (shutdown).
    pub fn close_all(&self) {
        let _ = self.shutdown.send(true);
        for session in read(&self.agents).values() {
            session.connection.close(CLOSE_SHUTDOWN, b"server shutting down");
        }
        for session in read(&self.connectors).values() {
            session.connection.close(CLOSE_SHUTDOWN, b"server shutting down");
        }
    }

    /// Reloads segments and policies from the store when they changed (or when `force`).
    pub async fn reload_policy(&self, force: bool) -> anyhow::Result<()> {
        // one reload at a time: a slower one that read the store before a change must
        // not install its older set after a newer one
        let _one_at_a_time = self.policy_reload.lock().await;
        let version = self.context.store.policy_version().await?;
        if !force && *read(&self.policy_version) == Some(version) {
            return Ok(());
        }
        let segments = self.context.store.list_docs(reachback_store::DocKind::Segment).await?;
        let policies = self.context.store.list_docs(reachback_store::DocKind::Policy).await?;
        let set = crate::policy::compile_policy(&segments, &policies);
        *write(&self.policy) = Arc::new(set);
        *write(&self.policy_version) = Some(version);
        tracing::debug!(segments = segments.len(), policies = policies.len(), "access policy loaded");
        Ok(())
    }
}

/// Binds the tunnel endpoint and accepts tunnels until the endpoint closes. `names`
/// are the names the endpoint is reached by (its certificate's, besides
/// [`reachback_proto::BROKER_SERVER_NAME`]).
pub async fn start(broker: Arc<Broker>, names: Vec<String>) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (certificate_pem, private_key_pem) = broker.context.ca.sign_broker(&names, broker.context.config.certificate_lifetime)?;
    let certificate = Arc::new(CertificateSlot::new(&certificate_pem, &private_key_pem).context("the broker certificate")?);
    let listener = Arc::new(
        TunnelListener::bind_with_certificate(broker.context.config.tunnel_listen, &broker.context.ca.certificate_pem, certificate.clone())
            .await?
            .with_congestion(broker.context.config.tcp_congestion.clone())
            .with_limits(reachback_tunnel::MuxLimits {
                max_streams: broker.context.config.tunnel_max_flows,
                // streams waiting for the broker to take them: it takes them at once, so
                // only a peer opening streams before its hello fills this
                max_unaccepted_streams: 64,
                connection_window: broker.context.config.tunnel_memory,
                ..reachback_tunnel::MuxLimits::default()
            }),
    );
    let local = listener.local_addr()?;
    let _ = broker.tunnel_address.set(local);
    // where the other replicas relay flows to this one (only replicas on PostgreSQL have peers)
    if broker.context.store.backend() == reachback_store::Backend::Postgres {
        broker.context.store.set_relay_endpoints(&broker.context.config.node_name, &crate::peers::relay_endpoints(local).join(",")).await?;
    }
    tokio::spawn(feed_names(Arc::downgrade(&broker)));
    tokio::spawn(renew_broker_certificate(Arc::downgrade(&broker), certificate, names));
    let mut shutdown = broker.shutdown.subscribe();
    let mut draining = broker.draining.subscribe();
    let cleared = broker.context.store.clear_client_sessions_on(&broker.context.config.node_name).await?;
    if cleared > 0 {
        tracing::info!(cleared, "cleared client sessions left by an earlier run of this node");
    }
    broker.reload_policy(true).await?;
    let weak = Arc::downgrade(&broker);
    let greetings = Arc::new(tokio::sync::Semaphore::new(MAX_GREETINGS));
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
                // a draining replica takes no new tunnels: the listener closes, clients go elsewhere
                _ = draining.wait_for(|draining| *draining) => break,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // out of descriptors or similar: back off instead of spinning
                    tracing::warn!(%error, "accepting a tunnel failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(broker) = weak.upgrade() else { break };
            let listener = listener.clone();
            // handshakes and hellos in progress are capped: a flood of them waits in the backlog
            let Ok(permit) = greetings.clone().acquire_owned().await else { break };
            let serving = Serving::new(&broker.tunnels);
            tokio::spawn(async move {
                let _serving = serving;
                let connection = match listener.handshake(stream, remote).await {
                    Ok(connection) => connection,
                    Err(error) => return tracing::info!(%remote, error = format!("{error:#}"), "tunnel handshake failed"),
                };
                // one identity holds a few tunnels at most: a stolen key cannot multiply its budget
                let Some(_held) = reachback_tunnel::peer_identity(&connection).ok().and_then(|identity| broker.hold(&identity.key_fingerprint)) else {
                    tracing::warn!(%remote, "tunnel refused: this identity holds {MAX_TUNNELS_PER_IDENTITY} tunnels already");
                    connection.close(CLOSE_REFUSED, b"too many tunnels for one identity");
                    return;
                };
                if let Err(error) = serve_tunnel(broker.clone(), connection.clone(), permit).await {
                    tracing::info!(%remote, error = format!("{error:#}"), "tunnel ended");
                }
                if broker.is_draining() {
                    // told to move: its open flows finish here first (the drain's deadline closes it otherwise)
                    while connection.open_streams() > 0 && connection.close_reason().is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                connection.close(CLOSE_SHUTDOWN, b"tunnel ended");
            });
        }
    });
    tracing::info!(%local, "tunnel endpoint listening (TLS over TCP)");
    Ok((local, task))
}

/// Issues the tunnel endpoint a fresh certificate once two thirds of the current one's
/// lifetime have passed; tunnels already up keep going, new ones get the new one.
async fn renew_broker_certificate(broker: std::sync::Weak<Broker>, certificate: Arc<CertificateSlot>, names: Vec<String>) {
    loop {
        let wait = certificate.until_renewal(std::time::SystemTime::now()).clamp(Duration::from_millis(200), Duration::from_secs(3600));
        tokio::time::sleep(wait).await;
        let Some(broker) = broker.upgrade() else { return };
        if !certificate.due_for_renewal(std::time::SystemTime::now()) {
            continue;
        }
        match broker.context.ca.sign_broker(&names, broker.context.config.certificate_lifetime).and_then(|(pem, key)| certificate.replace(&pem, &key)) {
            Ok(()) => tracing::info!("the tunnel endpoint's certificate was renewed"),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "could not renew the tunnel endpoint's certificate"),
        }
    }
}

/// The DNS listeners a connector says it has, as shown in the connector list:
/// socket addresses only, at most 16 (a connector's word, so bounded and checked).
fn dns_listeners(claimed: &[String]) -> Option<String> {
    let listeners: Vec<String> = claimed.iter().filter_map(|text| text.parse::<SocketAddr>().ok()).take(16).map(|address| address.to_string()).collect();
    (!listeners.is_empty()).then(|| listeners.join(","))
}

async fn serve_tunnel(broker: Arc<Broker>, connection: Connection, greeting: tokio::sync::OwnedSemaphorePermit) -> anyhow::Result<()> {
    let remote = connection.remote_address();
    let identity = reachback_tunnel::peer_identity(&connection)?;
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await.context("no control stream in time")??;
    let hello: Control = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv)).await.context("no hello in time")??.context("control stream closed")?;
    let Control::Hello { role, version, mode, names, dns_listen } = hello else { anyhow::bail!("the first control message was not a hello") };
    drop(greeting);
    if role == ClientRole::Agent {
        // the broker opens an agent's flows; a stream an agent opens is a violation that ends its tunnel
        connection.stop_accepting();
    }
    match (role, identity.kind.as_str()) {
        (ClientRole::Agent, "device") => serve_agent(broker, connection, identity, send, recv).await,
        (ClientRole::Replica, reachback_crypto::REPLICA_UNIT) => serve_replica(broker, connection, identity, send, recv).await,
        (ClientRole::Connector, "connector") => {
            let dns_listeners = dns_listeners(&dns_listen);
            serve_connector(broker, connection, identity, version, mode, names, dns_listeners, send, recv).await
        }
        _ => {
            let bye = Control::Bye { reason: "the certificate does not match the role".into(), r#final: true };
            let _ = write_frame(&mut send, &bye).await;
            connection.close(CLOSE_REFUSED, b"role mismatch");
            anyhow::bail!("{remote}: role {role:?} with a {} certificate", identity.kind)
        }
    }
}

async fn refuse(connection: &Connection, send: &mut SendStream, reason: &str) {
    let _ = write_frame(send, &Control::Bye { reason: reason.to_string(), r#final: true }).await;
    let _ = send.finish();
    // give the peer a moment to read the reason before the connection closes
    tokio::time::sleep(Duration::from_millis(50)).await;
    connection.close(CLOSE_REFUSED, reason.as_bytes());
}

async fn serve_agent(broker: Arc<Broker>, connection: Connection, identity: PeerIdentity, mut send: SendStream, recv: RecvStream) -> anyhow::Result<()> {
    let device = match broker.context.store.get_device(&identity.id).await {
        // the device row exists (deleting it revokes) and holds the key the certificate carries
        // (re-enrollment with the same key pair issues a new certificate for it)
        Ok(device) if device.public_key_fingerprint == identity.key_fingerprint => device,
        Ok(_) | Err(reachback_store::StoreError::NotFound) => {
            refuse(&connection, &mut send, "the device certificate is revoked").await;
            anyhow::bail!("device {} refused: revoked or replaced certificate", identity.id);
        }
        Err(error) => return Err(error.into()),
    };
    let mut device = device;
    if device.virtual_ip.is_none() {
        // the binding was released (admin, forced range delete, idle TTL): a new address now
        match rebind(&broker, &device).await {
            Ok((virtual_ip, range_id)) => {
                tracing::info!(device_id = %device.id, virtual_ip = %virtual_ip, "device bound to a new address at connect");
                device.virtual_ip = Some(virtual_ip);
                device.range_id = Some(range_id);
            }
            Err(error) => tracing::warn!(device_id = %device.id, error = format!("{error:#}"), "no new address for a device without a binding"),
        }
    }
    let virtual_ip = device.virtual_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
    let session_id = new_id();
    let row = ClientSessionRow {
        id: session_id.clone(),
        device_id: device.id.clone(),
        client_hostname: device.hostname.clone(),
        username: device.username.clone(),
        platform: device.platform.clone(),
        virtual_ip: virtual_ip.map(|ip| ip.to_string()),
        broker_node: broker.context.config.node_name.clone(),
        remote_addr: connection.remote_address().to_string(),
        connected_at: now_micros(),
    };
    broker.context.store.insert_client_session(&row).await?;
    let session = virtual_ip.map(|virtual_ip| AgentSession {
        session_id: session_id.clone(),
        device_id: device.id.clone(),
        hostname: device.hostname.clone(),
        username: device.username.clone(),
        platform: device.platform.clone(),
        range_id: device.range_id.clone().unwrap_or_default(),
        virtual_ip,
        connection: connection.clone(),
    });
    if let Some(session) = &session {
        // a newer tunnel of the same device replaces an older one
        if let Some(previous) = write(&broker.agents).insert(session.virtual_ip, session.clone()) {
            previous.connection.close(CLOSE_KICKED, b"replaced by a newer tunnel");
        }
    }
    broker.context.metrics.client_sessions.inc();
    tracing::info!(session_id = %session_id, device_id = %device.id, virtual_ip = ?virtual_ip, "agent connected");
    tracing::debug!(session_id = %session_id, hostname = %device.hostname, username = %device.username, "agent identity");
    let welcome = Welcome {
        session_id: session_id.clone(),
        virtual_ip: virtual_ip.map(|ip| ip.to_string()),
        ranges: Vec::new(),
        keepalive_seconds: broker.context.config.client_keepalive.as_secs(),
    };
    let result = async {
        write_frame(&mut send, &Control::Welcome(welcome)).await?;
        let renewer = Renewer::new(&broker, &connection, &identity, Some(device.hostname.clone()))?;
        control_loop(&connection, send, recv, None, Some(renewer), None, control_timing(&broker)).await
    }
    .await;
    {
        let mut agents = write(&broker.agents);
        if let Some(ip) = virtual_ip
            && agents.get(&ip).is_some_and(|current| current.session_id == session_id)
        {
            agents.remove(&ip);
        }
    }
    broker.context.metrics.client_sessions.dec();
    if let Err(error) = broker.context.store.end_client_session(&session_id).await {
        tracing::warn!(%error, session_id = %session_id, "could not remove the ended session");
    }
    tracing::info!(session_id = %session_id, "agent disconnected");
    result
}

/// Binds a device that has no address, through the server's enrollment writer
/// ([`crate::Allocator`]: the same allocation, the same transaction shape as a
/// re-enrollment of the device).
async fn rebind(broker: &Arc<Broker>, device: &reachback_store::DeviceRow) -> anyhow::Result<(String, String)> {
    let key_id = device.enrollment_key_id.as_deref().context("the device has no enrollment key on record")?;
    let key_hash = broker.context.store.enrollment_key_hash(key_id).await?.context("the device's enrollment key is gone")?;
    let job = reachback_store::EnrollJob {
        key_hash,
        new_device_id: new_id(),
        hostname: device.hostname.clone(),
        platform: device.platform.clone(),
        public_key_fingerprint: device.public_key_fingerprint.clone(),
        certificate_serial: device.certificate_serial.clone(),
        location: device.location.clone(),
        source_ip: None,
    };
    broker.context.allocator.rebind(job).await
}

/// Runs the control stream: answers pings, sends keepalives, detects a dead peer,
/// and (for connectors) pushes range changes. Ends when the tunnel does.
/// Issues a peer fresh certificates for the key it connected with (`Control::Renew`).
struct Renewer {
    broker: Arc<Broker>,
    identity: PeerIdentity,
    /// the device's hostname (its certificate's name); `None` for a connector
    hostname: Option<String>,
    public_key: reachback_crypto::DevicePublicKey,
    /// the last certificate issued on this tunnel: asked again too soon, it is sent again
    last: Option<(Instant, String)>,
}

impl Renewer {
    fn new(broker: &Arc<Broker>, connection: &Connection, identity: &PeerIdentity, hostname: Option<String>) -> anyhow::Result<Renewer> {
        let leaf = connection.peer_certificates().first().context("no peer certificate")?;
        let (_, certificate) = x509_parser::parse_x509_certificate(leaf).map_err(|error| anyhow::anyhow!("unreadable peer certificate: {error}"))?;
        let public_key = reachback_crypto::public_key_from_spki_der(certificate.public_key().raw).map_err(|error| anyhow::anyhow!("the peer's key {error}"))?;
        Ok(Renewer { broker: broker.clone(), identity: identity.clone(), hostname, public_key, last: None })
    }

    /// A fresh certificate (PEM), audited; at most one per third of the lifetime per tunnel.
    async fn renew(&mut self) -> anyhow::Result<String> {
        let lifetime = self.broker.context.config.certificate_lifetime;
        if let Some((at, certificate)) = &self.last
            && at.elapsed() < lifetime / 3
        {
            return Ok(certificate.clone());
        }
        let serial = reachback_crypto::CertificateAuthority::new_serial();
        let certificate = match &self.hostname {
            Some(hostname) => self.broker.context.ca.sign_device(&self.public_key, &self.identity.id, hostname, serial, lifetime)?,
            None => self.broker.context.ca.sign_connector(&self.public_key, &self.identity.id, serial, lifetime)?,
        };
        let kind = if self.hostname.is_some() { "device" } else { "connector" };
        self.broker
            .context
            .store
            .record_audit(reachback_store::AuditEntry {
                actor: format!("{kind}:{}", self.identity.id),
                action: "renew_certificate".into(),
                resource_type: kind.into(),
                resource_id: self.identity.id.clone(),
                after: Some(serde_json::json!({
                    "serial": serial.iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
                    "lifetime_seconds": lifetime.as_secs(),
                    "over": "tunnel",
                })),
                ..Default::default()
            })
            .await?;
        self.broker.context.metrics.certificates_renewed.inc();
        tracing::info!(kind, id = %self.identity.id, "certificate renewed over the tunnel");
        self.last = Some((Instant::now(), certificate.clone()));
        Ok(certificate)
    }
}

/// The keepalive interval of a tunnel's control loop, and the drain signal it obeys.
fn control_timing(broker: &Broker) -> (Duration, tokio::sync::watch::Receiver<bool>) {
    (broker.context.config.client_keepalive, broker.draining.subscribe())
}

async fn control_loop(
    connection: &Connection,
    mut send: SendStream,
    recv: RecvStream,
    mut ranges: Option<(Arc<Broker>, Vec<String>)>,
    mut renewer: Option<Renewer>,
    mut names: Option<tokio::sync::broadcast::Receiver<Arc<NameUpdate>>>,
    (keepalive, mut draining): (Duration, tokio::sync::watch::Receiver<bool>),
) -> anyhow::Result<()> {
    let (mut incoming, reader) = reachback_tunnel::spawn_reader::<Control>(recv);
    let mut told_to_move = false;
    let liveness_timeout = keepalive * LIVENESS_INTERVALS;
    let mut liveness = Liveness::new(Instant::now(), keepalive, liveness_timeout);
    let mut range_check = tokio::time::interval(Duration::from_secs(3));
    // ranges this replica just synced (changed here or, notified, elsewhere): checked at once
    let mut range_changes = ranges.as_ref().map(|(broker, _)| broker.context.ranges_changed.subscribe());
    let result = loop {
        tokio::select! {
            Some(()) = async { range_changes.as_mut()?.changed().await.ok() }, if range_changes.is_some() => range_check.reset_immediately(),
            frame = incoming.recv() => {
                liveness.heard(Instant::now());
                match frame {
                    Some(Ok(Some(Control::Ping { seq }))) => {
                        write_frame(&mut send, &Control::Pong { seq }).await?;
                        liveness.sent(Instant::now());
                    }
                    Some(Ok(Some(Control::Pong { .. }))) => {}
                    Some(Ok(Some(Control::Renew))) if renewer.is_some() => {
                        let Some(renewer) = renewer.as_mut() else { continue };
                        let certificate = renewer.renew().await?;
                        write_frame(&mut send, &Control::Certificate { certificate }).await?;
                    }
                    Some(Ok(Some(other))) => break Err(anyhow::anyhow!("unexpected control message {other:?}")),
                    Some(Ok(None)) | None => break Ok(()),
                    Some(Err(error)) => break Err(error),
                }
            }
            _ = tokio::time::sleep_until(liveness.poll_timeout().into()) => {
                match liveness.handle_timeout(Instant::now()) {
                    Some(LivenessAction::SendPing(seq)) => write_frame(&mut send, &Control::Ping { seq }).await?,
                    Some(LivenessAction::Dead) => break Err(anyhow::anyhow!("no keepalive for {liveness_timeout:?}")),
                    None => {}
                }
            }
            _ = range_check.tick(), if ranges.is_some() => {
                if let Some((broker, known)) = ranges.as_mut()
                    && let Ok(current) = virtual_ranges(broker).await
                    && current != *known
                {
                    write_frame(&mut send, &Control::Ranges { ranges: current.clone() }).await?;
                    *known = current;
                }
            }
            update = async { names.as_mut()?.recv().await.ok() }, if names.is_some() => {
                match update {
                    Some(update) => write_frame(&mut send, &Control::Names((*update).clone())).await?,
                    // fell behind the feed: a new tunnel brings a new snapshot
                    None => break Err(anyhow::anyhow!("the connector fell behind the name feed")),
                }
            }
            _ = async { draining.wait_for(|draining| *draining).await.is_ok() }, if !told_to_move => {
                // the peer reconnects elsewhere and ends this tunnel once its flows are done
                write_frame(&mut send, &Control::Bye { reason: DRAIN_REASON.into(), r#final: false }).await?;
                told_to_move = true;
            }
            reason = connection.closed() => break Err(anyhow::anyhow!("{reason}")),
        }
    };
    reader.abort();
    result
}

/// The zones the connector answers for: the client domains of the settings.
fn name_zones(broker: &Broker) -> Vec<String> {
    broker.context.settings.client_domains()
}

/// Sends the bound hostnames in chunks: the first resets the connector's table,
/// the last says it is complete.
async fn send_name_snapshot(broker: &Broker, send: &mut SendStream) -> anyhow::Result<()> {
    let started = Instant::now();
    write_frame(send, &Control::Names(NameUpdate { reset: true, zones: Some(name_zones(broker)), ..NameUpdate::default() })).await?;
    let mut after: Option<Vec<u8>> = None;
    let mut total = 0usize;
    loop {
        let (page, last) = broker.context.store.bound_names(after.as_deref(), NAME_SNAPSHOT_PAGE).await?;
        total += page.len();
        for update in NameUpdate::chunks(page, Vec::new()) {
            write_frame(send, &Control::Names(update)).await?;
        }
        match last {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    write_frame(send, &Control::Names(NameUpdate { done: true, ..NameUpdate::default() })).await?;
    tracing::info!(names = total, elapsed_ms = started.elapsed().as_millis() as u64, "DNS names sent to a connector");
    Ok(())
}

/// Pushes binding changes to this replica's DNS connectors: every quarter second,
/// the bindings updated since the last look (with two seconds of overlap, as other
/// replicas' clocks may lag ours; a change applied twice changes nothing), the
/// zones when they change, and the ranges that were deleted (their rows go without
/// an update). Reads nothing while no connector listens.
pub async fn feed_names(broker: std::sync::Weak<Broker>) {
    let mut since = reachback_store::now_micros();
    let mut zones: Option<Vec<String>> = None;
    let mut ranges: Option<HashMap<String, String>> = None;
    // changes pushed within the overlap window: not pushed again
    let mut pushed: std::collections::HashSet<(String, i64)> = std::collections::HashSet::new();
    let mut interval = tokio::time::interval(NAME_FEED_INTERVAL);
    loop {
        interval.tick().await;
        let Some(broker) = broker.upgrade() else { return };
        if broker.names.receiver_count() == 0 {
            since = reachback_store::now_micros();
            zones = None;
            ranges = None;
            pushed.clear();
            continue;
        }
        let mut update = NameUpdate::default();
        let current_zones = name_zones(&broker);
        if zones.as_ref().is_some_and(|zones| *zones != current_zones) {
            update.zones = Some(current_zones.clone());
        }
        zones = Some(current_zones);
        if let Ok(rows) = broker.context.store.list_ranges().await {
            let current: HashMap<String, String> = rows.iter().map(|row| (row.id.clone(), row.range.to_string())).collect();
            if let Some(known) = &ranges {
                update.unbind_ranges = known.iter().filter(|(id, _)| !current.contains_key(*id)).map(|(_, range)| range.clone()).collect();
            }
            ranges = Some(current);
        }
        let changes = match broker.context.store.name_changes_since(since - 2_000_000, 50_000).await {
            Ok(changes) => changes,
            Err(error) => {
                tracing::debug!(%error, "could not read binding changes for the DNS feed");
                continue;
            }
        };
        if let Some(last) = changes.last() {
            since = since.max(last.last_updated);
        }
        pushed.retain(|(_, at)| *at >= since - 2_000_000);
        let mut bind = Vec::new();
        let mut unbind = Vec::new();
        let mut newest = None;
        for change in changes {
            if !pushed.insert((change.ip.clone(), change.last_updated)) {
                continue;
            }
            newest = newest.max(Some(change.last_updated));
            match change.hostname {
                Some(hostname) => bind.push((hostname, change.ip)),
                None => unbind.push(change.ip),
            }
        }
        let mut updates = NameUpdate::chunks(bind, unbind);
        for chunk in &mut updates {
            chunk.changed_at_us = newest;
        }
        if update.zones.is_some() || !update.unbind_ranges.is_empty() {
            updates.insert(0, update);
        }
        for update in updates {
            let _ = broker.names.send(Arc::new(update));
        }
    }
}

async fn virtual_ranges(broker: &Broker) -> anyhow::Result<Vec<String>> {
    let mut ranges: Vec<String> = broker.context.store.list_ranges().await?.iter().map(|row| row.range.to_string()).collect();
    ranges.sort();
    Ok(ranges)
}

#[allow(clippy::too_many_arguments)]
async fn serve_connector(
    broker: Arc<Broker>,
    connection: Connection,
    identity: PeerIdentity,
    version: String,
    mode: Option<String>,
    names: bool,
    dns_listeners: Option<String>,
    mut send: SendStream,
    recv: RecvStream,
) -> anyhow::Result<()> {
    let connector = match broker.context.store.get_connector(&identity.id).await {
        // the key it enrolled with (a renewed certificate keeps it); before keys were kept, the last serial
        Ok(connector)
            if !connector.revoked
                && match &connector.key_fingerprint {
                    Some(fingerprint) => *fingerprint == identity.key_fingerprint,
                    None => connector.certificate_serial.as_deref() == Some(identity.serial.as_str()),
                } =>
        {
            connector
        }
        Ok(_) | Err(reachback_store::StoreError::NotFound) => {
            refuse(&connection, &mut send, "the connector is revoked").await;
            anyhow::bail!("connector {} refused: revoked or replaced certificate", identity.id);
        }
        Err(error) => return Err(error.into()),
    };
    let version: String = version.chars().take(64).collect();
    let mode: Option<String> = mode.map(|mode| mode.chars().take(16).collect());
    broker.context.store.connector_seen(&connector.id, &version, mode.as_deref(), dns_listeners.as_deref()).await?;
    if let Some(previous) = write(&broker.connectors)
        .insert(connector.id.clone(), ConnectorSession { connection: connection.clone(), key_fingerprint: identity.key_fingerprint.clone() })
    {
        previous.connection.close(CLOSE_KICKED, b"replaced by a newer tunnel");
    }
    broker.context.metrics.connectors_online.inc();
    tracing::info!(connector_id = %connector.id, %version, mode = ?mode, "connector connected");
    // a connector opens a stream per new flow, in bursts (a scan, a wave of UDP
    // queries): the small cap that held it before its hello no longer applies
    connection.set_max_unaccepted_streams(reachback_tunnel::mux::DEFAULT_MAX_UNACCEPTED_STREAMS);
    let ranges = virtual_ranges(&broker).await?;
    let welcome = Welcome {
        session_id: connector.id.clone(),
        virtual_ip: None,
        ranges: ranges.clone(),
        keepalive_seconds: broker.context.config.client_keepalive.as_secs(),
    };
    write_frame(&mut send, &Control::Welcome(welcome)).await?;
    let flows = {
        let broker = broker.clone();
        let connection = connection.clone();
        let flow_connector = FlowConnector { id: Arc::from(connector.id.as_str()), name: Arc::from(connector.name.as_str()) };
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_flow(broker.clone(), flow_connector.clone(), send, recv));
            }
        })
    };
    // a connector answering DNS: subscribe first, then the snapshot (changes made while it
    // is read arrive after it, and applying one twice changes nothing)
    let feed = if names {
        let feed = broker.names.subscribe();
        send_name_snapshot(&broker, &mut send).await?;
        Some(feed)
    } else {
        None
    };
    let result = match Renewer::new(&broker, &connection, &identity, None) {
        Ok(renewer) => control_loop(&connection, send, recv, Some((broker.clone(), ranges)), Some(renewer), feed, control_timing(&broker)).await,
        Err(error) => Err(error),
    };
    flows.abort();
    {
        let mut connectors = write(&broker.connectors);
        if connectors.get(&connector.id).is_some_and(|current| current.connection.stable_id() == connection.stable_id()) {
            connectors.remove(&connector.id);
        }
    }
    broker.context.metrics.connectors_online.dec();
    let _ = broker.context.store.connector_seen(&connector.id, &version, mode.as_deref(), dns_listeners.as_deref()).await;
    tracing::info!(connector_id = %connector.id, "connector disconnected");
    result
}

fn count_failure(metrics: &FlowMetrics, reason: &str) {
    metrics.failed.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc();
}

async fn reply(send: &mut SendStream, reply: &FlowReply) {
    let _ = write_frame(send, reply).await;
}

/// The connector a flow came through, as the flow log names it.
#[derive(Clone)]
struct FlowConnector {
    id: Arc<str>,
    name: Arc<str>,
}

/// What the flow log records of a flow, gathered as the flow is decided; each way a
/// flow ends hands it to the flow log once (`finish`), off the data path.
struct FlowLogEntry {
    record: Option<reachback_store::FlowRecord>,
}

impl FlowLogEntry {
    /// `None` inside when the flow log is off: nothing is gathered.
    fn new(broker: &Broker, started_at: i64, open: &FlowOpen, connector: &FlowConnector) -> FlowLogEntry {
        if !broker.context.flow_log.enabled() {
            return FlowLogEntry { record: None };
        }
        let protocol = match open.protocol {
            Transport::Tcp => reachback_store::FlowProtocol::Tcp,
            Transport::Udp => reachback_store::FlowProtocol::Udp,
        };
        FlowLogEntry {
            record: Some(reachback_store::FlowRecord {
                started_at,
                ended_at: started_at,
                protocol,
                verdict: reachback_store::FlowVerdict::Offline,
                reason: None,
                policy_id: None,
                policy_name: None,
                connector_id: connector.id.clone(),
                connector_name: connector.name.clone(),
                server: open.source,
                destination: open.destination,
                device_id: None,
                username: None,
                client_hostname: None,
                platform: None,
                socks_user: open.user.clone(),
                bytes_to_client: 0,
                bytes_from_client: 0,
            }),
        }
    }

    /// The agent that holds the virtual address (who the flow reached).
    fn agent(&mut self, agent: &AgentFacts<'_>) {
        if let Some(record) = &mut self.record {
            record.device_id = Some(agent.device_id.to_string());
            record.username = Some(agent.username.to_string());
            record.client_hostname = Some(agent.hostname.to_string());
            record.platform = Some(agent.platform.to_string());
        }
    }

    /// The policy that decided.
    fn policy(&mut self, id: Option<&String>, name: Option<&String>) {
        if let Some(record) = &mut self.record {
            record.policy_id = id.cloned();
            record.policy_name = name.cloned();
        }
    }

    /// Hands the flow to the flow log with its verdict (and the bytes each way).
    fn finish(self, broker: &Broker, verdict: reachback_store::FlowVerdict, reason: Option<&'static str>, totals: Option<&reachback_tunnel::RelayTotals>) {
        let Some(mut record) = self.record else { return };
        record.ended_at = now_micros().max(record.started_at);
        record.verdict = verdict;
        record.reason = reason;
        if let Some(totals) = totals {
            record.bytes_to_client = totals.server_to_client;
            record.bytes_from_client = totals.client_to_server;
        }
        broker.context.flow_log.record(record);
    }
}

/// Who holds a flow's address: an agent attached here, or one attached to another replica.
enum Holder {
    Here(AgentSession),
    Replica(crate::peers::RemoteAgent),
}

/// What the policy and the flow log know of the agent a flow reaches.
struct AgentFacts<'a> {
    device_id: &'a str,
    hostname: &'a str,
    username: &'a str,
    platform: &'a str,
    range_id: &'a str,
}

impl Holder {
    fn facts(&self) -> AgentFacts<'_> {
        match self {
            Holder::Here(agent) => AgentFacts {
                device_id: &agent.device_id,
                hostname: &agent.hostname,
                username: &agent.username,
                platform: &agent.platform,
                range_id: &agent.range_id,
            },
            Holder::Replica(remote) => AgentFacts {
                device_id: &remote.device_id,
                hostname: &remote.hostname,
                username: &remote.username,
                platform: &remote.platform,
                range_id: &remote.range_id,
            },
        }
    }
}

/// Another replica's tunnel: it relays flows that entered there (policy checked
/// there) to agents attached here. A replica's certificate comes only from the CA's
/// holders, which are the replicas.
async fn serve_replica(broker: Arc<Broker>, connection: Connection, identity: PeerIdentity, mut send: SendStream, recv: RecvStream) -> anyhow::Result<()> {
    let peer: Arc<str> = Arc::from(identity.id.as_str());
    connection.set_max_unaccepted_streams(reachback_tunnel::mux::DEFAULT_MAX_UNACCEPTED_STREAMS);
    let welcome = Welcome {
        session_id: broker.context.config.node_name.clone(),
        virtual_ip: None,
        ranges: Vec::new(),
        keepalive_seconds: broker.context.config.client_keepalive.as_secs(),
    };
    write_frame(&mut send, &Control::Welcome(welcome)).await?;
    tracing::info!(peer = %peer, remote = %connection.remote_address(), "peer replica connected");
    let flows = {
        let broker = broker.clone();
        let connection = connection.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_relayed_flow(broker.clone(), peer.clone(), send, recv));
            }
        })
    };
    let result = control_loop(&connection, send, recv, None, None, None, control_timing(&broker)).await;
    flows.abort();
    tracing::info!(peer = %peer, "peer replica disconnected");
    result
}

/// A flow another replica relays here: hand it to the agent that holds the address
/// and splice the bytes (the agent's answer goes back unread; the entry replica
/// checked the policy and keeps the flow log).
async fn serve_relayed_flow(broker: Arc<Broker>, peer: Arc<str>, mut send: SendStream, mut recv: RecvStream) {
    let open: FlowOpen = match tokio::time::timeout(FLOW_OPEN_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(open))) => open,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::warn!(peer = %peer, error = %error, "bad relayed flow request refused");
            reply(&mut send, &FlowReply::Refused(Refusal::BadRequest { reason: error.to_string() })).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            End::Stream { send, recv }.reset();
            return;
        }
    };
    broker.context.metrics.relayed_flows.get_or_create(&vec![("direction".to_string(), "in".to_string())]).inc();
    let destination = open.destination;
    let Some(agent) = read(&broker.agents).get(&destination.ip()).cloned() else {
        tracing::debug!(peer = %peer, %destination, "relayed flow to an address no agent here holds");
        reply(&mut send, &FlowReply::Refused(Refusal::Offline)).await;
        let _ = send.finish();
        return;
    };
    let (mut agent_send, agent_recv) = match agent.connection.open_bi().await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::info!(%destination, error = %error, "the agent's tunnel failed (relayed flow)");
            reply(&mut send, &FlowReply::Refused(Refusal::ConnectFailed { reason: "the agent's tunnel failed".into() })).await;
            let _ = send.finish();
            return;
        }
    };
    if write_frame(&mut agent_send, &open).await.is_err() {
        End::Stream { send, recv }.reset();
        return;
    }
    let options =
        reachback_tunnel::RelayOptions { idle_timeout: broker.context.config.flow_idle_timeout, await_reply: None, on_bytes: &|_, _| {}, on_accepted: &|| {} };
    let totals = reachback_tunnel::relay(End::Stream { send, recv }, End::Stream { send: agent_send, recv: agent_recv }, options).await;
    tracing::trace!(peer = %peer, %destination, up = totals.server_to_client, down = totals.client_to_server, clean = totals.clean, "relayed flow closed");
}

/// One flow from a connector: policy, open at the agent, relay. Every flow whose
/// request could be read ends in the flow log with its verdict.
async fn serve_flow(broker: Arc<Broker>, connector: FlowConnector, mut send: SendStream, mut recv: RecvStream) {
    use reachback_store::FlowVerdict;
    let started = Instant::now();
    let started_at = now_micros();
    let connector_id = &*connector.id;
    let open: FlowOpen = match tokio::time::timeout(FLOW_OPEN_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(open))) => open,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::info!(connector_id = %connector_id, error = %error, "bad flow request refused");
            count_failure(&broker.context.metrics.tcp, "bad_request");
            reply(&mut send, &FlowReply::Refused(Refusal::BadRequest { reason: error.to_string() })).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            count_failure(&broker.context.metrics.tcp, "timeout");
            End::Stream { send, recv }.reset();
            return;
        }
    };
    let mut entry = FlowLogEntry::new(&broker, started_at, &open, &connector);
    let destination = open.destination;
    let (metrics, protocol) = match open.protocol {
        Transport::Tcp => (&broker.context.metrics.tcp, Protocol::Tcp),
        Transport::Udp => (&broker.context.metrics.udp, Protocol::Udp),
    };
    let local = read(&broker.agents).get(&destination.ip()).cloned();
    let holder = match local {
        Some(agent) => Some(Holder::Here(agent)),
        // held by another replica: relayed there (policy is checked here, where the flow enters)
        None => match broker.peers.locate(&broker.context, destination.ip()).await {
            Ok(remote) => remote.map(Holder::Replica),
            Err(error) => {
                tracing::warn!(%destination, error = format!("{error:#}"), "could not look up which replica holds the address");
                None
            }
        },
    };
    let Some(holder) = holder else {
        tracing::debug!(%destination, source = %open.source, "flow to an address no live agent holds");
        count_failure(metrics, "offline");
        reply(&mut send, &FlowReply::Refused(Refusal::Offline)).await;
        let _ = send.finish();
        entry.finish(&broker, FlowVerdict::Offline, None, None);
        return;
    };
    let agent = holder.facts();
    entry.agent(&agent);
    let facts = FlowFacts {
        protocol,
        source: open.source.ip(),
        destination: destination.ip(),
        port: destination.port(),
        connector_id,
        client_hostname: agent.hostname,
        username: agent.username,
        platform: agent.platform,
        range_id: agent.range_id,
    };
    let decision = broker.policy().evaluate(&facts);
    entry.policy(decision.rule_id.as_ref(), decision.rule_name.as_ref());
    if let Some(user) = &open.user {
        tracing::debug!(%destination, source = %open.source, user = %user, "flow from an authenticated SOCKS5 user");
    }
    if decision.action == Action::Deny {
        metrics.denied.inc();
        tracing::info!(%destination, source = %open.source, connector_id = %connector_id, protocol = open.protocol.as_str(), rule = decision.rule_name.as_deref().unwrap_or("default deny"), "flow denied");
        reply(&mut send, &FlowReply::Refused(Refusal::Denied { rule: decision.rule_name })).await;
        let _ = send.finish();
        entry.finish(&broker, FlowVerdict::Denied, None, None);
        return;
    }
    let opened = match &holder {
        Holder::Here(agent) => agent.connection.open_bi().await.map_err(anyhow::Error::from),
        Holder::Replica(remote) => {
            broker.context.metrics.relayed_flows.get_or_create(&vec![("direction".to_string(), "out".to_string())]).inc();
            broker.peers.open(&broker.context, &remote.node).await
        }
    };
    let (mut agent_send, agent_recv) = match opened {
        Ok(stream) => stream,
        Err(error) => {
            tracing::info!(%destination, error = format!("{error:#}"), "the agent's tunnel failed");
            if let Holder::Replica(_) = &holder {
                broker.peers.forget(destination.ip());
            }
            count_failure(metrics, "agent_error");
            reply(&mut send, &FlowReply::Refused(Refusal::ConnectFailed { reason: "the agent's tunnel failed".into() })).await;
            let _ = send.finish();
            entry.finish(&broker, FlowVerdict::Failed, Some("agent_error"), None);
            return;
        }
    };
    if write_frame(&mut agent_send, &open).await.is_err() {
        count_failure(metrics, "agent_error");
        End::Stream { send, recv }.reset();
        entry.finish(&broker, FlowVerdict::Failed, Some("agent_error"), None);
        return;
    }
    tracing::trace!(%destination, source = %open.source, "flow requested at the agent");
    let to_client = metrics.bytes_relayed.get_or_create(&vec![("direction".to_string(), "to_client".to_string())]).clone();
    let to_server = metrics.bytes_relayed.get_or_create(&vec![("direction".to_string(), "to_server".to_string())]).clone();
    let on_bytes = move |side: Side, length: u64| {
        match side {
            Side::Server => to_client.inc_by(length),
            Side::Client => to_server.inc_by(length),
        };
    };
    let accepted = std::sync::atomic::AtomicBool::new(false);
    let on_accepted = || {
        accepted.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics.setup_seconds.observe(started.elapsed().as_secs_f64());
        metrics.opened.inc();
        metrics.active.inc();
    };
    // the connector's first bytes travel to the agent with the request; the agent's
    // answer comes back through the relay and is passed on to the connector
    let options = reachback_tunnel::RelayOptions {
        idle_timeout: broker.context.config.flow_idle_timeout,
        await_reply: Some(reachback_tunnel::AwaitReply { timeout: FLOW_OPEN_TIMEOUT, forward: true }),
        on_bytes: &on_bytes,
        on_accepted: &on_accepted,
    };
    let totals = reachback_tunnel::relay(End::Stream { send, recv }, End::Stream { send: agent_send, recv: agent_recv }, options).await;
    if accepted.load(std::sync::atomic::Ordering::Relaxed) {
        metrics.active.dec();
        entry.finish(&broker, FlowVerdict::Allowed, None, Some(&totals));
    } else {
        let (verdict, reason) = match &totals.refusal {
            // the replica it was relayed to no longer holds the agent
            Some(Refusal::Offline) => {
                broker.peers.forget(destination.ip());
                (FlowVerdict::Offline, "offline")
            }
            Some(Refusal::PortNotAllowed) => (FlowVerdict::RefusedByAgent, "port_not_allowed"),
            Some(_) => (FlowVerdict::RefusedByAgent, "connect_failed"),
            None => (FlowVerdict::Failed, "timeout"),
        };
        count_failure(metrics, reason);
        tracing::debug!(%destination, refusal = ?totals.refusal, "the agent did not take the flow");
        entry.finish(&broker, verdict, Some(reason), Some(&totals));
    }
    tracing::trace!(%destination, up = totals.server_to_client, down = totals.client_to_server, clean = totals.clean, "flow closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connectors_dns_listeners_are_addresses_and_few() {
        assert_eq!(dns_listeners(&["10.0.0.5:53".into(), "[fd00::5]:53".into()]).as_deref(), Some("10.0.0.5:53,[fd00::5]:53"));
        assert_eq!(dns_listeners(&[]), None);
        assert_eq!(dns_listeners(&["<script>".into(), "a,b".into(), "x".repeat(10_000)]), None, "what is no socket address is left out");
        let many: Vec<String> = (0..100).map(|port| format!("10.0.0.5:{}", port + 1)).collect();
        assert_eq!(dns_listeners(&many).map(|listeners| listeners.split(',').count()), Some(16));
    }
}
