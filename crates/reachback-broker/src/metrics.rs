//! The metric families the broker updates. The server's registry registers them
//! (`reachback_` prefix), in three steps so that they keep their place among the
//! server's own families in the exposition.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The broker's metrics (handles: a clone updates the same families).
#[derive(Clone, Debug, Default)]
pub struct BrokerMetrics {
    pub client_sessions: Gauge,
    pub connectors_online: Gauge,
    /// TCP flows (`reachback_flows_*`, `reachback_bytes_relayed_total`)
    pub tcp: FlowMetrics,
    /// UDP flows (the same under `reachback_udp_`)
    pub udp: FlowMetrics,
    /// over the tunnel here, over the API in the server
    pub certificates_renewed: Counter,
    /// the flow log's writer and its queue
    pub flow_log: FlowLogMetrics,
    /// flows relayed between replicas: `out` entered here, `in` reached an agent here
    pub relayed_flows: Family<Vec<(String, String)>, Counter>,
}

impl BrokerMetrics {
    /// Registers the live tunnels (`client_sessions`, `connectors_online`).
    pub fn register_tunnels(&self, registry: &mut Registry) {
        registry.register("client_sessions", "Live agent tunnels on this replica", self.client_sessions.clone());
        registry.register("connectors_online", "Live connector tunnels on this replica", self.connectors_online.clone());
    }

    /// Registers the flows of both protocols, certificate renewals and the flow log.
    pub fn register_flows(&self, registry: &mut Registry) {
        self.tcp.register(registry, "", "TCP flows");
        self.udp.register(registry, "udp_", "UDP flows");
        registry.register("certificates_renewed", "Device and connector certificates renewed (over the tunnel or the API)", self.certificates_renewed.clone());
        self.flow_log.register(registry);
    }

    /// Registers the flows relayed between replicas.
    pub fn register_relays(&self, registry: &mut Registry) {
        registry.register(
            "replica_relayed_flows",
            "Flows relayed between replicas: out = entered here for an agent on another replica, in = from another replica to an agent here",
            self.relayed_flows.clone(),
        );
    }
}

/// The broker's counters for the flows of one protocol.
#[derive(Clone, Debug)]
pub struct FlowMetrics {
    pub opened: Counter,
    pub active: Gauge,
    pub denied: Counter,
    pub failed: Family<Vec<(String, String)>, Counter>,
    pub bytes_relayed: Family<Vec<(String, String)>, Counter>,
    pub setup_seconds: Histogram,
}

impl Default for FlowMetrics {
    fn default() -> Self {
        FlowMetrics {
            opened: Counter::default(),
            active: Gauge::default(),
            denied: Counter::default(),
            failed: Family::default(),
            bytes_relayed: Family::default(),
            setup_seconds: Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
        }
    }
}

impl FlowMetrics {
    /// Registers the family under `prefix` (`""` for TCP, `"udp_"`), `what` naming the flows in the help texts.
    fn register(&self, registry: &mut Registry, prefix: &str, what: &str) {
        registry.register(format!("{prefix}flows_opened"), format!("{what} relayed to an agent"), self.opened.clone());
        registry.register(format!("{prefix}flows_active"), format!("{what} being relayed now"), self.active.clone());
        registry.register(format!("{prefix}flows_denied"), format!("{what} refused by the access policy"), self.denied.clone());
        registry.register(format!("{prefix}flows_failed"), format!("{what} that could not be opened, by reason"), self.failed.clone());
        registry.register(
            format!("{prefix}bytes_relayed"),
            format!("Bytes of {what} relayed, by direction (to_client, to_server)"),
            self.bytes_relayed.clone(),
        );
        registry.register(
            format!("{prefix}flow_setup_duration_seconds"),
            format!("Time from a connector's request for one of the {what} to the agent's answer"),
            self.setup_seconds.clone(),
        );
    }
}

/// The flow log's counters.
#[derive(Clone, Debug)]
pub struct FlowLogMetrics {
    /// flows written to the database
    pub written: Counter,
    /// flows not written, by reason (`queue_full`, `write_failed`, `shutdown`)
    pub dropped: Family<Vec<(String, String)>, Counter>,
    /// time to write one batch
    pub batch_seconds: Histogram,
}

impl Default for FlowLogMetrics {
    fn default() -> Self {
        // the buckets of the server's other latency histograms
        let batch_seconds = Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        FlowLogMetrics { written: Counter::default(), dropped: Family::default(), batch_seconds }
    }
}

impl FlowLogMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("flow_log_written", "Flows written to the flow log", self.written.clone());
        registry.register("flow_log_dropped", "Flows not written to the flow log, by reason (queue_full, write_failed, shutdown)", self.dropped.clone());
        registry.register("flow_log_batch_duration_seconds", "Time to write one batch of the flow log", self.batch_seconds.clone());
    }

    /// Counts `count` flows dropped for `reason`.
    pub fn count_dropped(&self, reason: &str, count: u64) {
        self.dropped.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc_by(count);
    }
}
