//! Shared server state: store, allocation service, settings, CA, metrics, the enrollment writer.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use reachback_store::Store;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::broker::BrokerMetrics;
use crate::crypto::CertificateAuthority;
use crate::writer::EnrollRequest;

/// Runtime settings an admin changes through `/api/v1/settings`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Settings {
    /// DNS suffixes the connectors answer for (lowercase, no trailing dot)
    pub client_domains: Vec<String>,
    /// a binding unused this long is released (0: never)
    pub binding_idle_ttl_seconds: i64,
    /// how long a released address waits before another device may get it
    pub release_quarantine_seconds: i64,
    /// the most rows an export may have
    pub export_limit: i64,
    /// how long a connector's new provisioning key stays valid unless its creator says otherwise
    pub provisioning_key_ttl_seconds: i64,
    /// closed binding-history intervals older than this many days are deleted
    pub binding_history_retention_days: i64,
    /// whether the broker records every flow in the flow log
    pub flow_log_enabled: bool,
    /// flows that ended more than this many days ago are deleted from the flow log
    pub flow_log_retention_days: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            client_domains: Vec::new(),
            binding_idle_ttl_seconds: 30 * 86_400,
            release_quarantine_seconds: 3600,
            export_limit: 1_000_000,
            provisioning_key_ttl_seconds: 86_400,
            binding_history_retention_days: DEFAULT_HISTORY_RETENTION_DAYS,
            flow_log_enabled: true,
            flow_log_retention_days: DEFAULT_FLOW_LOG_RETENTION_DAYS,
        }
    }
}

impl Settings {
    /// Applies stored `(name, json)` pairs over the defaults; unknown or bad ones are ignored with a warning.
    pub fn from_stored(values: &[(String, String)]) -> Self {
        let mut settings = Settings::default();
        for (name, value) in values {
            let parsed: Option<serde_json::Value> = serde_json::from_str(value).ok();
            let applied = match (name.as_str(), parsed) {
                ("client_domains", Some(value)) => serde_json::from_value(value).map(|domains| settings.client_domains = domains).is_ok(),
                ("binding_idle_ttl_seconds", Some(value)) => value.as_i64().map(|number| settings.binding_idle_ttl_seconds = number).is_some(),
                ("release_quarantine_seconds", Some(value)) => value.as_i64().map(|number| settings.release_quarantine_seconds = number).is_some(),
                ("export_limit", Some(value)) => value.as_i64().map(|number| settings.export_limit = number).is_some(),
                ("provisioning_key_ttl_seconds", Some(value)) => value.as_i64().map(|number| settings.provisioning_key_ttl_seconds = number).is_some(),
                ("binding_history_retention_days", Some(value)) => {
                    value.as_i64().filter(|days| HISTORY_RETENTION_DAYS.contains(days)).map(|days| settings.binding_history_retention_days = days).is_some()
                }
                ("flow_log_enabled", Some(value)) => value.as_bool().map(|enabled| settings.flow_log_enabled = enabled).is_some(),
                ("flow_log_retention_days", Some(value)) => {
                    value.as_i64().filter(|days| FLOW_LOG_RETENTION_DAYS.contains(days)).map(|days| settings.flow_log_retention_days = days).is_some()
                }
                _ => false,
            };
            if !applied {
                tracing::warn!(setting = %name, "ignoring a stored setting that cannot be read");
            }
        }
        settings
    }

    pub fn quarantine_micros(&self) -> i64 {
        self.release_quarantine_seconds.saturating_mul(1_000_000)
    }

    /// The instant before which closed history intervals are deleted, seen from `now`.
    pub fn history_cutoff(&self, now: i64) -> i64 {
        now.saturating_sub(self.binding_history_retention_days.saturating_mul(86_400_000_000))
    }

    /// The instant before which ended flows are deleted from the flow log, seen from `now`.
    pub fn flow_log_cutoff(&self, now: i64) -> i64 {
        now.saturating_sub(self.flow_log_retention_days.saturating_mul(86_400_000_000))
    }
}

/// Binding history is kept 400 days by default: a year of incidents, and the
/// firewall logs of last year's audit, can still be traced.
pub const DEFAULT_HISTORY_RETENTION_DAYS: i64 = 400;
/// The retention an admin may set: a day to ten years.
pub const HISTORY_RETENTION_DAYS: std::ops::RangeInclusive<i64> = 1..=3650;
/// The flow log is kept 90 days by default: flows are many (one row per connection),
/// and 90 days covers the usual incident window (and PCI DSS's "three months at
/// hand"); who held an address for longer is the binding history's (400 days).
pub const DEFAULT_FLOW_LOG_RETENTION_DAYS: i64 = 90;
/// The flow-log retention an admin may set: a day to ten years.
pub const FLOW_LOG_RETENTION_DAYS: std::ops::RangeInclusive<i64> = 1..=3650;

/// What `reachback server` is started with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: std::net::SocketAddr,
    pub tunnel_listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: SQLite inside the data directory
    pub database_url: Option<String>,
    pub bootstrap_token: Option<String>,
    /// tunnel endpoints handed to agents; defaults to the tunnel listen address
    pub broker_endpoints: Vec<String>,
    /// this replica's name (shown as a session's broker node)
    pub node_name: String,
    /// flows with no byte either way for this long are reset
    pub flow_idle_timeout: std::time::Duration,
    /// how long a stopping replica waits for its tunnels' open flows after telling
    /// agents and connectors to reconnect elsewhere
    pub drain_timeout: std::time::Duration,
    /// the keepalive interval of quiet tunnels, told to agents and connectors in the
    /// welcome: they declare a silent replica dead after 2.5 of them, this side after 3
    pub client_keepalive: std::time::Duration,
    /// TCP congestion control of the accepted tunnels
    pub tcp_congestion: reachback_tunnel::Congestion,
    /// the operator's certificate chain and key for the API (PEM files), re-read on SIGHUP
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// names (DNS names or addresses) the internal-CA certificate of the API is issued for;
    /// empty: the host name plus the listen address, or every local address for a wildcard
    pub api_names: Vec<String>,
    /// serve plain HTTP on a non-loopback address (a TLS-terminating proxy in front)
    pub insecure_http: bool,
    /// lifetime of the certificates the CA issues (devices, connectors, broker, API)
    pub certificate_lifetime: std::time::Duration,
    /// limits of the HTTP server
    pub http_limits: HttpLimits,
    /// flows (streams) one tunnel may hold at once; more are refused one by one
    pub tunnel_max_flows: usize,
    /// bytes a peer may have in flight towards this server across one tunnel's flows
    pub tunnel_memory: u64,
    /// the secret key and the metrics token
    pub security: SecurityConfig,
    /// PostgreSQL: the period of the full check for changes made by other replicas,
    /// a backstop for lost notifications (`replicas::DEFAULT_BACKSTOP`)
    pub sync_backstop: std::time::Duration,
}

/// Secrets the server is started with.
#[derive(Clone, Default)]
pub struct SecurityConfig {
    /// where the key that encrypts the CA's private key in the database comes from
    pub secret_key: SecretKeySource,
    /// the bearer token `GET /metrics` requires; `None` leaves it open
    pub metrics_token: Option<String>,
}

impl std::fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityConfig").field("secret_key", &self.secret_key).field("metrics_token", &self.metrics_token.as_ref().map(|_| "****")).finish()
    }
}

/// Where the secret key comes from.
#[derive(Clone, Debug, Default)]
pub enum SecretKeySource {
    /// `<data-dir>/secret.key`, generated on first start
    #[default]
    DataDir,
    /// a file holding the key (`--secret-key-file`)
    File(PathBuf),
    /// the key itself (`REACHBACK_SECRET_KEY`)
    Value(crate::crypto::SecretKey),
}

/// Flows one tunnel may hold at once by default.
pub const DEFAULT_TUNNEL_MAX_FLOWS: usize = 16_384;
/// Bytes in flight from one peer by default: a connector's bulk flows share it.
pub const DEFAULT_TUNNEL_MEMORY: u64 = 64 * 1024 * 1024;

/// Limits of the HTTP server against slow or numerous clients.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// connections served at once; more wait in the kernel's backlog
    pub max_connections: usize,
    /// a request's head must arrive within this (slow-loris defence; also ends idle keep-alive connections)
    pub header_read_timeout: std::time::Duration,
    /// a handler must produce its response head within this (a streamed body may take longer)
    pub request_timeout: std::time::Duration,
    /// a TLS handshake must complete within this
    pub tls_handshake_timeout: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 4096,
            header_read_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(60),
            tls_handshake_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// The default lifetime of issued certificates: 90 days.
pub const DEFAULT_CERTIFICATE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);

impl ServerConfig {
    /// The tunnel endpoints handed to agents and connectors. Configured ones win;
    /// otherwise the tunnel's own address, and for a wildcard listener the host the
    /// client used to reach the API (its `Host` header) with the tunnel port —
    /// never `0.0.0.0` or `::`, which a client cannot dial.
    pub fn broker_endpoints_for(&self, tunnel: std::net::SocketAddr, api_host: Option<&str>) -> Vec<String> {
        if !self.broker_endpoints.is_empty() {
            return self.broker_endpoints.clone();
        }
        if !tunnel.ip().is_unspecified() {
            return vec![tunnel.to_string()];
        }
        let host = api_host.and_then(host_of).unwrap_or_else(local_host_name);
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        vec![format!("{host}:{}", tunnel.port())]
    }
    /// The tunnel endpoint the replica registry shows before the broker is bound.
    pub fn tunnel_endpoint(&self) -> String {
        self.broker_endpoints_for(self.tunnel_listen, None).join(",")
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("reachback.db").display()),
        }
    }
}

/// Prometheus metrics of the control plane.
pub struct Metrics {
    pub registry: Registry,
    pub enrollments: Family<Vec<(String, String)>, Counter>,
    pub allocation_failures: Counter,
    pub http_requests: Family<Vec<(String, String)>, Counter>,
    pub http_duration: HistogramFamily,
    pub range_used: Family<Vec<(String, String)>, Gauge>,
    pub range_total: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    pub bindings: Gauge,
    /// rows in the bindings listing's in-memory index; -1 until it has loaded
    pub listing_index_rows: Gauge,
    pub enroll_batch_size: Histogram,
    pub enroll_batch_seconds: Histogram,
    /// replicas alive in the registry, as this replica saw at its last heartbeat
    pub replicas_alive: Gauge,
    pub events: EventMetrics,
    /// the broker's families: tunnels, flows, renewals, the flow log, relays (a
    /// clone of these handles is in the broker's context)
    pub broker: BrokerMetrics,
}

/// Event delivery to the sinks, by sink name.
#[derive(Clone, Default)]
pub struct EventMetrics {
    pub delivered: Family<Vec<(String, String)>, Counter>,
    pub failures: Family<Vec<(String, String)>, Counter>,
    pub pending: Family<Vec<(String, String)>, Gauge>,
    pub lag_seconds: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    pub dropped: Counter,
}

impl EventMetrics {
    fn register(registry: &mut Registry) -> EventMetrics {
        let metrics = EventMetrics::default();
        registry.register("events_delivered", "Events delivered to a sink", metrics.delivered.clone());
        registry.register("event_delivery_failures", "Failed deliveries to a sink (each retried with backoff)", metrics.failures.clone());
        registry.register("event_sink_pending", "Events waiting for a sink", metrics.pending.clone());
        registry.register("event_sink_lag_seconds", "Age of the oldest event waiting for a sink", metrics.lag_seconds.clone());
        registry.register("events_expired", "Events dropped after waiting longer than the outbox keeps them", metrics.dropped.clone());
        metrics
    }

    pub fn labels(sink: &str) -> Vec<(String, String)> {
        vec![("sink".to_string(), sink.to_string())]
    }
}

/// Histograms by label set, each made by one constructor (the buckets).
pub type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("reachback");
        let enrollments = Family::default();
        let allocation_failures = Counter::default();
        let http_requests = Family::default();
        let http_duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let range_used = Family::default();
        let range_total = Family::default();
        let bindings = Gauge::default();
        let listing_index_rows = Gauge::default();
        listing_index_rows.set(-1);
        let enroll_batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]);
        let enroll_batch_seconds = latency_histogram();
        registry.register("enrollments", "Enrollment requests by result", enrollments.clone());
        registry.register("allocation_failures", "Enrollments refused because no address was free", allocation_failures.clone());
        registry.register("http_requests", "HTTP requests by method, route and status", http_requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by method and route", http_duration.clone());
        registry.register("range_used_ips", "Bound addresses per range", range_used.clone());
        registry.register("range_total_ips", "Assignable addresses per range", range_total.clone());
        registry.register("bindings", "Bound addresses in all ranges", bindings.clone());
        registry.register("listing_index_rows", "Bindings in the listing's in-memory index (-1 while it loads)", listing_index_rows.clone());
        registry.register("enroll_batch_size", "Enrollments written per transaction", enroll_batch_size.clone());
        registry.register("enroll_batch_duration_seconds", "Time to write one enrollment transaction", enroll_batch_seconds.clone());
        // the broker's families keep their place among the server's
        let broker = BrokerMetrics::default();
        broker.register_tunnels(&mut registry);
        let replicas_alive = Gauge::default();
        registry.register("replicas_alive", "Server replicas alive on the shared database (with their heartbeat within 3 s)", replicas_alive.clone());
        broker.register_flows(&mut registry);
        let events = EventMetrics::register(&mut registry);
        broker.register_relays(&mut registry);
        Metrics {
            registry,
            enrollments,
            allocation_failures,
            http_requests,
            http_duration,
            range_used,
            range_total,
            bindings,
            listing_index_rows,
            enroll_batch_size,
            enroll_batch_seconds,
            replicas_alive,
            events,
            broker,
        }
    }

    pub fn count_enrollment(&self, result: &str) {
        self.enrollments.get_or_create(&vec![("result".to_string(), result.to_string())]).inc();
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct AppState {
    pub store: Store,
    /// the allocation engine and every store call that changes addresses: the only
    /// way to them
    pub allocation: crate::allocation::AllocationService,
    /// shared with the broker, which reads the client domains (`SettingsView`)
    pub settings: Arc<RwLock<Settings>>,
    /// held from reading (or writing) the stored settings to installing them, so a
    /// background reload that read the store before a change cannot install its
    /// older copy after the change (as policy reloads are serialised)
    pub settings_sync: tokio::sync::Mutex<()>,
    pub ca: Arc<CertificateAuthority>,
    /// the key that seals secrets in the database (the CA key, sinks' signing secrets)
    pub secret_key: crate::crypto::SecretKey,
    pub metrics: Metrics,
    pub enroll_tx: mpsc::Sender<EnrollRequest>,
    pub config: ServerConfig,
    /// the tunnel broker (its own crate; it sees only its context, never this state)
    pub broker: Arc<crate::broker::Broker>,
    /// failed console sign-ins, per account and per address
    pub login_limiter: std::sync::Mutex<crate::limit::LoginLimiter>,
    /// this process in the replica registry
    pub registration: crate::replicas::Registration,
    /// changes made elsewhere that this replica has yet to apply
    pub changes: Arc<crate::replicas::Changes>,
    /// bumped when the ranges were synced after a change notification: each connector's
    /// tunnel compares its range list at once (else every 3 s)
    pub ranges_changed: tokio::sync::watch::Sender<()>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The tunnel endpoints to hand a client that reached the API with this `Host` header.
    pub fn broker_endpoints(&self, headers: &axum::http::HeaderMap) -> Vec<String> {
        let host = headers.get(axum::http::header::HOST).and_then(|value| value.to_str().ok());
        let tunnel = self.broker.tunnel_address().unwrap_or(self.config.tunnel_listen);
        self.config.broker_endpoints_for(tunnel, host)
    }

    pub fn settings(&self) -> Settings {
        match self.settings.read() {
            Ok(settings) => settings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_settings(&self, settings: Settings) {
        self.broker.flow_log().set_enabled(settings.flow_log_enabled);
        match self.settings.write() {
            Ok(mut guard) => *guard = settings,
            Err(poisoned) => *poisoned.into_inner() = settings,
        }
    }
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]:port`), when it is
/// a plausible host name or address.
pub fn host_of(header: &str) -> Option<String> {
    let header = header.trim();
    let host = if let Some(rest) = header.strip_prefix('[') {
        rest.split(']').next()?.to_string()
    } else {
        header.rsplit_once(':').map_or(header, |(host, port)| if port.bytes().all(|byte| byte.is_ascii_digit()) { host } else { header }).to_string()
    };
    if let Ok(address) = host.parse::<std::net::IpAddr>() {
        return (!address.is_unspecified()).then_some(host);
    }
    let plausible = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| !label.is_empty() && label.len() <= 63 && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-'));
    plausible.then(|| host.to_ascii_lowercase())
}

/// This machine's host name.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_give_dialable_hosts() {
        assert_eq!(host_of("reachback.corp.example:8080").as_deref(), Some("reachback.corp.example"));
        assert_eq!(host_of("10.77.2.2:8080").as_deref(), Some("10.77.2.2"));
        assert_eq!(host_of("[fd00::2]:8080").as_deref(), Some("fd00::2"));
        assert_eq!(host_of("0.0.0.0:8080"), None);
        assert_eq!(host_of("[::]:8080"), None);
        assert_eq!(host_of("evil/../x"), None);
        assert_eq!(host_of("a b"), None);
    }
}
