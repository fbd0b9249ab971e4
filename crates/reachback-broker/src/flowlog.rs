//! The flow log's queue and writer, off the data path: the broker hands each
//! finished flow to [`FlowLog::record`], which never waits — a full queue drops
//! the record and counts it (`reachback_flow_log_dropped_total{reason="queue_full"}`,
//! a WARN at most once a minute) — and one writer task takes the queue in batches
//! (up to [`BATCH_ROWS`] flows, or what came within [`BATCH_WINDOW`] of the first)
//! and writes each batch in one transaction.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reachback_store::{FlowRecord, Store};
use tokio::sync::{mpsc, watch};

use crate::metrics::FlowLogMetrics;

/// Flows waiting for the writer at most (about 300 bytes each: 5 MiB at most).
pub const QUEUE_CAPACITY: usize = 16_384;
/// The most flows one transaction writes.
pub const BATCH_ROWS: usize = 1_000;
/// How long the writer gathers a batch after its first flow.
pub const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// At most one WARN per reason in this long.
const WARN_INTERVAL: Duration = Duration::from_secs(60);
/// A failed batch is tried once more after this pause, then dropped.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The broker's end of the flow log, kept in its context.
pub struct FlowLog {
    sender: mpsc::Sender<FlowRecord>,
    enabled: AtomicBool,
    metrics: FlowLogMetrics,
    full: RateLimitedWarning,
    shutdown: watch::Sender<bool>,
}

/// The writer's end: the queue's receiver, taken once at start.
pub struct FlowLogWriter {
    receiver: mpsc::Receiver<FlowRecord>,
    metrics: FlowLogMetrics,
    shutdown: watch::Receiver<bool>,
}

impl FlowLog {
    /// A flow log whose queue holds `capacity` flows, and its writer (not yet running).
    pub fn new(capacity: usize, metrics: FlowLogMetrics) -> (FlowLog, FlowLogWriter) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let writer = FlowLogWriter { receiver, metrics: metrics.clone(), shutdown: shutdown_receiver };
        (FlowLog { sender, enabled: AtomicBool::new(true), metrics, full: RateLimitedWarning::default(), shutdown }, writer)
    }

    /// Whether flows are recorded (the `flow_log_enabled` setting).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Queues a finished flow for the writer; never waits. Returns whether it was
    /// queued: a full queue (the database is slower than the flows) or a writer that
    /// has stopped drops it and counts it.
    pub fn record(&self, record: FlowRecord) -> bool {
        match self.sender.try_send(record) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.count_dropped("queue_full", 1);
                if let Some(dropped) = self.full.count(Instant::now()) {
                    tracing::warn!(dropped, capacity = self.sender.max_capacity(), "the flow log's queue is full: flow records were dropped");
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.count_dropped("shutdown", 1);
                false
            }
        }
    }

    /// Tells the writer to write what is queued and stop; flows recorded from now on
    /// are dropped (counted as `shutdown`).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl FlowLogWriter {
    /// Writes the queue's flows in batches until [`FlowLog::shutdown`] (or until the
    /// flow log is dropped), then what is left, and returns.
    pub async fn run(mut self, store: Store, node_name: String) {
        let mut batch: Vec<FlowRecord> = Vec::with_capacity(BATCH_ROWS);
        let failed = RateLimitedWarning::default();
        let mut closing = false;
        loop {
            let received = if closing {
                self.receiver.recv_many(&mut batch, BATCH_ROWS).await
            } else {
                tokio::select! {
                    received = self.receiver.recv_many(&mut batch, BATCH_ROWS) => received,
                    _ = self.shutdown.wait_for(|stop| *stop) => {
                        // no new flows; what is queued is still written
                        self.receiver.close();
                        closing = true;
                        continue;
                    }
                }
            };
            if received == 0 {
                break;
            }
            if !closing {
                let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
                while batch.len() < BATCH_ROWS {
                    let room = BATCH_ROWS - batch.len();
                    match tokio::time::timeout_at(deadline, self.receiver.recv_many(&mut batch, room)).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            self.write(&store, &node_name, &batch, &failed).await;
            batch.clear();
        }
        tracing::debug!("the flow log's writer stopped");
    }

    async fn write(&self, store: &Store, node_name: &str, batch: &[FlowRecord], failed: &RateLimitedWarning) {
        let started = Instant::now();
        let mut result = store.insert_flows(batch, node_name).await;
        if result.is_err() {
            // a database that restarts or fails over: once more before the batch is lost
            tokio::time::sleep(RETRY_PAUSE).await;
            result = store.insert_flows(batch, node_name).await;
        }
        match result {
            Ok(()) => {
                self.metrics.written.inc_by(batch.len() as u64);
                self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
                tracing::trace!(flows = batch.len(), "flow log batch written");
            }
            Err(error) => {
                self.metrics.count_dropped("write_failed", batch.len() as u64);
                if let Some(dropped) = failed.count_many(Instant::now(), batch.len() as u64) {
                    tracing::warn!(%error, dropped, "the flow log could not be written: flow records were dropped");
                }
            }
        }
    }
}

/// Counts events and says when to warn about them: the first, then at most one
/// warning per [`WARN_INTERVAL`], each with the count since the last one.
#[derive(Default)]
struct RateLimitedWarning {
    last: Mutex<Option<Instant>>,
    since_last: AtomicU64,
}

impl RateLimitedWarning {
    /// Counts one event at `now`; `Some(count)` when a warning is due.
    fn count(&self, now: Instant) -> Option<u64> {
        self.count_many(now, 1)
    }

    fn count_many(&self, now: Instant, events: u64) -> Option<u64> {
        self.since_last.fetch_add(events, Ordering::Relaxed);
        // another flow is deciding: this one is counted and goes on
        let mut last = self.last.try_lock().ok()?;
        if last.is_some_and(|last| now.saturating_duration_since(last) < WARN_INTERVAL) {
            return None;
        }
        *last = Some(now);
        Some(self.since_last.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use reachback_store::{FlowProtocol, FlowVerdict};

    use super::*;

    fn flow(port: u16) -> FlowRecord {
        FlowRecord {
            started_at: 1,
            ended_at: 2,
            protocol: FlowProtocol::Tcp,
            verdict: FlowVerdict::Offline,
            reason: None,
            policy_id: None,
            policy_name: None,
            connector_id: Arc::from("c"),
            connector_name: Arc::from("dc1"),
            server: SocketAddr::from(([10, 0, 0, 1], 40_000)),
            destination: SocketAddr::from(([100, 64, 0, 1], port)),
            device_id: None,
            username: None,
            client_hostname: None,
            platform: None,
            socks_user: None,
            bytes_to_client: 0,
            bytes_from_client: 0,
        }
    }

    fn dropped(metrics: &FlowLogMetrics, reason: &str) -> u64 {
        metrics.dropped.get_or_create(&vec![("reason".to_string(), reason.to_string())]).get()
    }

    fn metrics() -> FlowLogMetrics {
        FlowLogMetrics::default()
    }

    /// A full queue drops and counts instead of waiting: `record` is a plain
    /// function (it cannot wait), and with nobody reading, the records past the
    /// capacity come back refused at once, each counted.
    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = metrics();
        let (log, mut writer) = FlowLog::new(3, metrics.clone());
        let started = Instant::now();
        let queued: Vec<bool> = (0..10).map(|port| log.record(flow(port))).collect();
        assert!(started.elapsed() < Duration::from_secs(1), "recording never waits");
        assert_eq!(queued, [true, true, true, false, false, false, false, false, false, false]);
        assert_eq!(dropped(&metrics, "queue_full"), 7);
        // the queue kept the first three, in order, and takes more once they are read
        let ports: Vec<u16> = std::iter::from_fn(|| writer.receiver.try_recv().ok()).map(|record| record.destination.port()).collect();
        assert_eq!(ports, [0, 1, 2]);
        assert!(log.record(flow(99)));
        assert_eq!(dropped(&metrics, "queue_full"), 7);
    }

    #[test]
    fn a_stopped_writer_drops_and_counts_as_shutdown() {
        let metrics = metrics();
        let (log, writer) = FlowLog::new(3, metrics.clone());
        drop(writer);
        assert!(!log.record(flow(1)));
        assert_eq!((dropped(&metrics, "shutdown"), dropped(&metrics, "queue_full")), (1, 0));
    }

    /// The writer takes the queue in transactions of at most `BATCH_ROWS`, and a
    /// shutdown writes what is queued before the writer stops: nothing queued is lost.
    #[tokio::test]
    async fn the_writer_batches_and_writes_the_queue_before_it_stops() {
        let directory = std::env::temp_dir().join(format!("reachback_flowlog_{}_{}", std::process::id(), reachback_store::now_micros()));
        std::fs::create_dir_all(&directory).expect("directory");
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", directory.join("test.db").display())).await.expect("store");
        let mut registry = prometheus_client::registry::Registry::with_prefix("reachback");
        let server_metrics = crate::BrokerMetrics::default();
        server_metrics.register_flows(&mut registry);
        let (log, writer) = FlowLog::new(4096, server_metrics.flow_log.clone());
        // queued before the writer runs: it finds 2,500 waiting
        assert!((0..2500).all(|port| log.record(flow(port))));
        log.shutdown();
        let task = tokio::spawn(writer.run(store.clone(), "node-a".into()));
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("the writer stops once the queue is written").expect("join");
        assert_eq!(store.count_flows(&reachback_store::FlowQuery::default()).await.expect("count"), 2500, "every queued flow was written");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("metrics");
        assert!(text.contains("reachback_flow_log_written_total 2500"), "{text}");
        assert!(text.contains("reachback_flow_log_batch_duration_seconds_count 3"), "1,000 + 1,000 + 500: {text}");
        assert!(!log.record(flow(1)), "after the writer stopped, flows are dropped");
        assert_eq!(dropped(&server_metrics.flow_log, "shutdown"), 1);
        store.close().await;
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn warnings_about_drops_come_at_most_once_a_minute_with_the_count() {
        let warning = RateLimitedWarning::default();
        let start = Instant::now();
        assert_eq!(warning.count(start), Some(1), "the first drop warns");
        assert_eq!(warning.count(start + Duration::from_secs(1)), None);
        assert_eq!(warning.count_many(start + Duration::from_secs(59), 5), None);
        assert_eq!(warning.count(start + Duration::from_secs(60)), Some(7), "a minute later, with every drop since");
        assert_eq!(warning.count(start + Duration::from_secs(61)), None);
    }
}
