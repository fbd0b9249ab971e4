//! Flows that cross replicas. A connector's flow enters at the replica the connector
//! is attached to; when the agent that holds the address is attached to another
//! replica, the entry replica checks the policy (once, there) and relays the flow to
//! that replica over a tunnel of its own: mutual TLS 1.3 with a client certificate
//! the internal CA issues to the replica (OU `replica`), the same multiplexer as
//! agents and connectors, one tunnel per pair of replicas, opened on the first flow
//! and kept. The holding replica hands the stream to its agent and splices the
//! bytes; the agent's answer travels back unchanged. One extra hop, never more.
//!
//! Which replica holds an address is read from the client sessions in the database
//! and kept for a moment ([`LOCATION_TTL`]); a relay that finds the agent gone
//! forgets it at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use reachback_proto::ClientRole;
use reachback_tunnel::tls::TlsMaterial;
use reachback_tunnel::{Connection, RecvStream, SendStream, TunnelConnector};

use crate::BrokerContext;

/// How long where an address is held is trusted without asking the database again.
/// Sessions move rarely (a replica dies, an agent reconnects); a relay that finds
/// the agent gone forgets the entry at once.
pub const LOCATION_TTL: Duration = Duration::from_secs(2);
/// How long "no replica holds it" is trusted: an agent that is moving (its replica
/// stopped) has no session for a moment, and its next flow must find it once it
/// has one; a scan of unheld addresses still costs at most one read per address
/// in this time.
const ABSENCE_TTL: Duration = Duration::from_millis(250);
/// Addresses whose location is remembered at once (a scan of the virtual range must
/// not grow the cache without bound).
const LOCATION_CAPACITY: usize = 65_536;
/// How long flows to a replica that could not be reached are refused at once
/// before it is tried again.
const PEER_RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long connecting to a peer replica may take before the flow is refused.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Relay endpoints of one replica tried at most (its registry row is a peer's word).
const MAX_RELAY_ENDPOINTS: usize = 16;
/// How long the replica's own client certificate is valid; a new one is made when
/// half of it has passed.
const REPLICA_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where this replica's tunnel endpoint is reached by its peers: the address it is
/// bound to, or for a wildcard every address of the host's interfaces (loopback
/// last, for replicas on one host), with the bound port.
pub fn relay_endpoints(bound: std::net::SocketAddr) -> Vec<String> {
    if !bound.ip().is_unspecified() {
        return vec![bound.to_string()];
    }
    let mut addresses: Vec<IpAddr> =
        if_addrs::get_if_addrs().map(|interfaces| interfaces.into_iter().map(|interface| interface.ip()).collect()).unwrap_or_default();
    addresses.retain(|address| {
        let link_local_v6 = matches!(address, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        !address.is_unspecified() && !link_local_v6 && (bound.is_ipv6() || address.is_ipv4())
    });
    addresses.sort_by_key(IpAddr::is_loopback);
    addresses.dedup();
    addresses.into_iter().take(MAX_RELAY_ENDPOINTS).map(|address| std::net::SocketAddr::new(address, bound.port()).to_string()).collect()
}

/// An agent attached to another replica, as the entry replica sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAgent {
    /// the replica that holds the session
    pub node: String,
    pub device_id: String,
    pub hostname: String,
    pub username: String,
    pub platform: String,
    pub range_id: String,
}

/// Where addresses are held, as last read: bounded in age ([`LOCATION_TTL`]) and in
/// count ([`LOCATION_CAPACITY`]), so a scan of the virtual range through a connector
/// costs reads, not memory.
struct Locations {
    /// virtual address → (when read, holder)
    entries: HashMap<IpAddr, (Instant, Option<RemoteAgent>)>,
    ttl: Duration,
    absence_ttl: Duration,
    capacity: usize,
}

impl Default for Locations {
    fn default() -> Self {
        Locations { entries: HashMap::new(), ttl: LOCATION_TTL, absence_ttl: ABSENCE_TTL, capacity: LOCATION_CAPACITY }
    }
}

impl Locations {
    /// The remembered holder (`Some(None)`: known to be held by no other replica), if fresh.
    fn get(&self, address: IpAddr, now: Instant) -> Option<Option<RemoteAgent>> {
        let (at, holder) = self.entries.get(&address)?;
        let ttl = if holder.is_some() { self.ttl } else { self.absence_ttl };
        (now.saturating_duration_since(*at) < ttl).then(|| holder.clone())
    }

    fn insert(&mut self, address: IpAddr, now: Instant, holder: Option<RemoteAgent>) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&address) {
            let ttl = self.ttl;
            self.entries.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(address, (now, holder));
    }

    fn forget(&mut self, address: IpAddr) {
        self.entries.remove(&address);
    }
}

/// The endpoints to try of a peer's registry row (a peer's word: at most
/// [`MAX_RELAY_ENDPOINTS`], empty entries skipped).
fn relay_candidates(registered: &str) -> impl Iterator<Item = &str> {
    registered.split(',').map(str::trim).filter(|endpoint| !endpoint.is_empty()).take(MAX_RELAY_ENDPOINTS)
}

/// The tunnels to other replicas and where addresses are held.
#[derive(Default)]
pub struct Peers {
    /// one slot per peer node: its tunnel, when open (connecting holds the slot)
    links: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
    located: std::sync::Mutex<Locations>,
    /// peers a connection to failed, and when (flows to them are refused at once for a moment)
    unreachable: std::sync::Mutex<HashMap<String, Instant>>,
    /// this replica's client identity towards the others, and when it was made
    identity: std::sync::Mutex<Option<(TunnelConnector, SystemTime)>>,
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Peers {
    /// The replica that holds `address`, if another one does.
    pub async fn locate(&self, context: &BrokerContext, address: IpAddr) -> anyhow::Result<Option<RemoteAgent>> {
        if let Some(holder) = lock(&self.located).get(address, Instant::now()) {
            return Ok(holder);
        }
        let found = context.store.remote_session_for(&address.to_string(), &context.config.node_name).await?;
        let holder = found.map(|(session, range_id)| RemoteAgent {
            node: session.broker_node,
            device_id: session.device_id,
            hostname: session.client_hostname,
            username: session.username,
            platform: session.platform,
            range_id,
        });
        lock(&self.located).insert(address, Instant::now(), holder.clone());
        Ok(holder)
    }

    /// Forgets where `address` is held (the holder said it is not there).
    pub fn forget(&self, address: IpAddr) {
        lock(&self.located).forget(address);
    }

    /// Opens a stream to the replica `node`, over the tunnel to it (made when there is none).
    pub async fn open(&self, context: &BrokerContext, node: &str) -> anyhow::Result<(SendStream, RecvStream)> {
        // a replica that could not be reached a moment ago is not tried again by every
        // flow in turn (each would wait for the one before it to time out)
        if lock(&self.unreachable).get(node).is_some_and(|at| at.elapsed() < PEER_RETRY_AFTER) {
            anyhow::bail!("replica {node} could not be reached a moment ago");
        }
        let slot = lock(&self.links).entry(node.to_string()).or_default().clone();
        let mut link = tokio::time::timeout(PEER_CONNECT_TIMEOUT, slot.lock()).await.context("the tunnel to the replica is busy connecting")?;
        if let Some(connection) = link.as_ref()
            && let Ok(stream) = connection.open_bi().await
        {
            return Ok(stream);
        }
        *link = None;
        let connected = match tokio::time::timeout(PEER_CONNECT_TIMEOUT, self.connect(context, node, slot.clone())).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(anyhow::anyhow!("the replica did not answer in time")),
        };
        let connection = match connected {
            Ok(connection) => {
                lock(&self.unreachable).remove(node);
                connection
            }
            Err(error) => {
                let mut unreachable = lock(&self.unreachable);
                if unreachable.len() >= MAX_RELAY_ENDPOINTS * 64 {
                    unreachable.clear();
                }
                unreachable.insert(node.to_string(), Instant::now());
                return Err(error);
            }
        };
        let stream = connection.open_bi().await?;
        *link = Some(connection);
        Ok(stream)
    }

    /// Closes every tunnel to other replicas (shutdown).
    pub fn close_all(&self) {
        for slot in lock(&self.links).values() {
            if let Ok(link) = slot.try_lock()
                && let Some(connection) = link.as_ref()
            {
                connection.close(0, b"replica stopping");
            }
        }
    }

    /// The tunnels open to other replicas.
    pub fn open_links(&self) -> usize {
        lock(&self.links).values().filter(|slot| slot.try_lock().map(|link| link.as_ref().is_some_and(|c| c.close_reason().is_none())).unwrap_or(true)).count()
    }

    async fn connect(&self, context: &BrokerContext, node: &str, slot: Arc<tokio::sync::Mutex<Option<Connection>>>) -> anyhow::Result<Connection> {
        let endpoints = context.store.replica_relay_endpoints(node).await?.with_context(|| format!("replica {node} is not registered alive"))?;
        let connector = self.identity(context)?;
        let hello =
            reachback_tunnel::client::Hello { role: ClientRole::Replica, mode: None, version: env!("CARGO_PKG_VERSION"), names: false, dns_listen: &[] };
        // the replica's own addresses, in turn: the one that answers as that node wins
        let mut last_error = anyhow::anyhow!("replica {node} has no relay endpoint");
        let mut found = None;
        for endpoint in relay_candidates(&endpoints) {
            match reachback_tunnel::client::connect_with(&connector, &[endpoint.to_string()], hello).await {
                Ok(tunnel) if tunnel.welcome.session_id == node => {
                    found = Some((tunnel, endpoint.to_string()));
                    break;
                }
                Ok(tunnel) => {
                    last_error = anyhow::anyhow!("{endpoint} answers as replica {}, not {node}", tunnel.welcome.session_id);
                    tunnel.connection.close(0, b"not the replica asked for");
                }
                Err(error) => last_error = error.context(format!("relay endpoint {endpoint}")),
            }
        }
        let Some((tunnel, endpoint)) = found else { return Err(last_error) };
        tracing::info!(peer = %node, %endpoint, "tunnel to a peer replica up");
        let connection = tunnel.connection.clone();
        let peer = node.to_string();
        // the control stream: keepalives both ways until either side closes or the peer
        // drains; then no new flow takes this tunnel (those on it finish)
        let id = connection.stable_id();
        tokio::spawn(async move {
            let end = tunnel.run_control(None, |_| {}).await;
            tracing::info!(peer = %peer, end = ?end, "tunnel to a peer replica ended");
            let mut link = slot.lock().await;
            if link.as_ref().is_some_and(|current| current.stable_id() == id) {
                *link = None;
            }
        });
        Ok(connection)
    }

    /// The client certificate this replica shows other replicas (made again when half its life passed).
    fn identity(&self, context: &BrokerContext) -> anyhow::Result<TunnelConnector> {
        let mut identity = lock(&self.identity);
        if let Some((connector, made)) = identity.as_ref()
            && made.elapsed().unwrap_or_default() < REPLICA_CERTIFICATE_LIFETIME / 2
        {
            return Ok(connector.clone());
        }
        let (certificate_pem, private_key_pem) = context.ca.sign_replica(&context.config.node_name, REPLICA_CERTIFICATE_LIFETIME)?;
        let material = TlsMaterial { certificate_pem, private_key_pem, ca_pem: context.ca.certificate_pem.clone() };
        let connector = TunnelConnector::new(&material)?.with_congestion(context.config.tcp_congestion.clone()).with_limits(reachback_tunnel::MuxLimits {
            max_streams: context.config.tunnel_max_flows,
            connection_window: context.config.tunnel_memory,
            // the peer never opens streams towards the replica that dialled
            accept_streams: false,
            ..Default::default()
        });
        *identity = Some((connector.clone(), SystemTime::now()));
        Ok(connector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(node: &str) -> Option<RemoteAgent> {
        Some(RemoteAgent {
            node: node.into(),
            device_id: "d".into(),
            hostname: "h".into(),
            username: "u".into(),
            platform: "linux".into(),
            range_id: "r".into(),
        })
    }

    #[test]
    fn locations_expire_and_a_scan_cannot_grow_them_past_the_capacity() {
        let start = Instant::now();
        let mut locations = Locations { capacity: 100, ..Locations::default() };
        let address = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x6440_0000 + n));
        locations.insert(address(0), start, holder("replica-b"));
        assert_eq!(locations.get(address(0), start + Duration::from_secs(1)), Some(holder("replica-b")));
        assert_eq!(locations.get(address(0), start + LOCATION_TTL), None, "stale after the TTL");
        // an absence is trusted for less: a moving agent is found again soon
        locations.insert(address(5), start, None);
        assert_eq!(locations.get(address(5), start + ABSENCE_TTL / 2), Some(None));
        assert_eq!(locations.get(address(5), start + ABSENCE_TTL), None);
        // a scan of 10,000 addresses in one instant: never more than the capacity held
        for n in 1..10_000 {
            locations.insert(address(n), start, None);
            assert!(locations.entries.len() <= 100, "{} entries after {n}", locations.entries.len());
        }
        // fresh entries survive a sweep of stale ones
        let later = start + LOCATION_TTL;
        let mut locations = Locations { capacity: 3, ..Locations::default() };
        locations.insert(address(1), start, None);
        locations.insert(address(2), start, None);
        locations.insert(address(3), later, holder("replica-c"));
        locations.insert(address(4), later, None);
        assert_eq!(locations.entries.len(), 2);
        assert_eq!(locations.get(address(3), later), Some(holder("replica-c")));
        locations.forget(address(3));
        assert_eq!(locations.get(address(3), later), None);
    }

    #[test]
    fn a_peers_endpoint_list_is_capped_and_empty_entries_skipped() {
        let many: Vec<String> = (0..100).map(|n| format!("10.0.0.{n}:8443")).collect();
        let text = format!(",, {}", many.join(","));
        let candidates: Vec<&str> = relay_candidates(&text).collect();
        assert_eq!(candidates.len(), MAX_RELAY_ENDPOINTS);
        assert_eq!(candidates[0], "10.0.0.0:8443");
        assert_eq!(relay_candidates("").count(), 0);
    }
}
