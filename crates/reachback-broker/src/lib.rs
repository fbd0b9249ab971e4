//! The tunnel broker inside `reachback server`: the registry of live agent and
//! connector tunnels, each flow's policy check and relay, relays to the other
//! replicas, and the flow log's queue.
//!
//! The broker sees only its [`BrokerContext`]: the store, the configuration it
//! reads ([`BrokerConfig`]), its metrics, the flow log, the internal CA, a read
//! handle on the settings ([`SettingsView`]), the "ranges changed" signal and the
//! one way back into allocation ([`Allocator`]). It knows nothing of HTTP or of the
//! server's state; the server holds the [`Broker`] and calls its public methods.

mod broker;
pub mod flowlog;
pub mod metrics;
pub mod peers;
pub mod policy;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use broker::{AgentSession, Broker, DRAIN_REASON, FLOW_OPEN_TIMEOUT, Held, MAX_TUNNELS_PER_IDENTITY, feed_names, start};
pub use metrics::{BrokerMetrics, FlowLogMetrics, FlowMetrics};
pub use policy::compile_policy;

/// What the broker reads of the server's configuration.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// this replica's name (a session's broker node; its identity towards other replicas)
    pub node_name: String,
    /// where the tunnel endpoint listens
    pub tunnel_listen: SocketAddr,
    /// the keepalive interval of quiet tunnels, told to agents and connectors in the welcome
    pub client_keepalive: Duration,
    /// lifetime of the certificates issued over the tunnel (renewals, the endpoint's own)
    pub certificate_lifetime: Duration,
    /// flows with no byte either way for this long are reset
    pub flow_idle_timeout: Duration,
    /// bytes a peer may have in flight towards this server across one tunnel's flows
    pub tunnel_memory: u64,
    /// flows (streams) one tunnel may hold at once
    pub tunnel_max_flows: usize,
    /// TCP congestion control of the tunnels
    pub tcp_congestion: reachback_tunnel::Congestion,
}

/// The broker's read handle on the runtime settings (the server owns them).
pub trait SettingsView: Send + Sync {
    /// The DNS suffixes the connectors answer for.
    fn client_domains(&self) -> Vec<String>;
}

/// A future the [`Allocator`] returns.
pub type AllocatorFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<(String, String)>> + Send + 'a>>;

/// The broker's one call back into allocation, implemented by the server: a device
/// that connects without a binding (released by an admin, a forced range delete or
/// the idle TTL) is bound anew through the enrollment writer, with the same
/// allocation and transaction as a re-enrollment of the device.
pub trait Allocator: Send + Sync {
    /// Runs `job`; returns the device's new virtual address and its range's id.
    fn rebind(&self, job: reachback_store::EnrollJob) -> AllocatorFuture<'_>;
}

/// Everything the broker uses, and nothing else.
pub struct BrokerContext {
    pub store: reachback_store::Store,
    pub config: BrokerConfig,
    /// the broker's metric families (registered in the server's registry)
    pub metrics: BrokerMetrics,
    /// the flow log's queue: each flow the broker decided ends there
    pub flow_log: flowlog::FlowLog,
    /// the internal CA: the endpoint's certificate, renewals, the replica's client certificate
    pub ca: Arc<reachback_crypto::CertificateAuthority>,
    pub settings: Arc<dyn SettingsView>,
    /// bumped when the ranges were synced after a change: each connector tunnel
    /// compares its range list at once (else every 3 s)
    pub ranges_changed: tokio::sync::watch::Sender<()>,
    pub allocator: Arc<dyn Allocator>,
}
