//! The connector's Prometheus metrics: what only the connector sees (UDP
//! datagrams it dropped, its flow table, its DNS answers). The broker counts the
//! flows it decides on; these count what happens before and after it. Served on
//! `--metrics-listen` (off unless given).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::dns::Names;

type Labels = Vec<(String, String)>;

/// Every metric of the connector, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// UDP flows opened at the broker, by result (`accepted`, `refused`, `failed`)
    pub udp_flows: Family<Labels, Counter>,
    /// UDP flows in the connector's table now
    pub udp_flows_active: Gauge,
    /// datagrams relayed, by direction (`to_client`, `to_server`)
    pub udp_datagrams: Family<Labels, Counter>,
    /// payload bytes relayed, by direction
    pub udp_bytes: Family<Labels, Counter>,
    /// datagrams dropped, by reason (`queue_full`, `no_credit`, `table_full`,
    /// `no_tunnel`, `refused`, `send_failed`)
    pub udp_dropped: Family<Labels, Counter>,
    /// DNS queries answered, by query type and answer code
    pub dns_queries: Family<Labels, Counter>,
    /// DNS queries dropped by the per-source rate limit
    pub dns_rate_limited: Counter,
    /// hostnames in the DNS table
    pub dns_names: Gauge,
    /// seconds from the broker sending a name change to the table holding it (last change)
    pub dns_sync_lag_seconds: Gauge<f64, AtomicU64>,
    /// TUN mode: TCP connects by outcome (`accepted`, `refused`)
    pub tun_flows: Family<Labels, Counter>,
    /// TUN mode: TCP flows held now (open, closing or waiting for the broker)
    pub tun_flows_active: Gauge,
    /// TUN mode: packets from the device dropped, by reason (`malformed`, `protocol`,
    /// `fragment`, `outside_ranges`, `syn_retransmit`, `over_cap`)
    pub tun_packets_dropped: Family<Labels, Counter>,
}

/// The mnemonic of a DNS answer code (RFC 1035, 2136, 6895).
fn rcode_name(code: u16) -> &'static str {
    match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        15 => "BADVERS",
        _ => "OTHER",
    }
}

pub fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("reachback_connector");
        let metrics = Metrics {
            udp_flows: Family::default(),
            udp_flows_active: Gauge::default(),
            udp_datagrams: Family::default(),
            udp_bytes: Family::default(),
            udp_dropped: Family::default(),
            dns_queries: Family::default(),
            dns_rate_limited: Counter::default(),
            dns_names: Gauge::default(),
            dns_sync_lag_seconds: Gauge::default(),
            tun_flows: Family::default(),
            tun_flows_active: Gauge::default(),
            tun_packets_dropped: Family::default(),
            registry: Registry::default(),
        };
        registry.register("udp_flows", "UDP flows requested at the broker, by result", metrics.udp_flows.clone());
        registry.register("udp_flows_active", "UDP flows held now", metrics.udp_flows_active.clone());
        registry.register("udp_datagrams", "UDP datagrams relayed, by direction", metrics.udp_datagrams.clone());
        registry.register("udp_bytes", "UDP payload bytes relayed, by direction", metrics.udp_bytes.clone());
        registry.register("udp_datagrams_dropped", "UDP datagrams dropped, by reason", metrics.udp_dropped.clone());
        registry.register("dns_queries", "DNS queries answered, by type and answer code", metrics.dns_queries.clone());
        registry.register("dns_rate_limited", "DNS queries dropped by the per-source rate limit", metrics.dns_rate_limited.clone());
        registry.register("dns_names", "Hostnames in the DNS table", metrics.dns_names.clone());
        registry.register("dns_sync_lag_seconds", "Delay of the last name change between the broker and the DNS table", metrics.dns_sync_lag_seconds.clone());
        registry.register("tun_flows", "TCP connects in TUN mode, by outcome", metrics.tun_flows.clone());
        registry.register("tun_flows_active", "TCP flows held by the TUN mode's stack now", metrics.tun_flows_active.clone());
        registry.register("tun_packets_dropped", "Packets from the TUN device dropped, by reason", metrics.tun_packets_dropped.clone());
        Metrics { registry, ..metrics }
    }
}

impl Metrics {
    /// Reads the DNS table's counts into the metrics (counters only go up: each
    /// takes the difference since the last scrape).
    pub fn observe_dns(&self, names: &Names) {
        for (qtype, outcome, count) in names.counts.snapshot() {
            let rcode = match outcome {
                crate::dns::FORWARDED => "FORWARDED".to_string(),
                crate::dns::DROPPED => "DROPPED".to_string(),
                code => rcode_name(code as u16).to_string(),
            };
            let counter = self.dns_queries.get_or_create(&vec![("type".to_string(), qtype.to_string()), ("rcode".to_string(), rcode)]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        let limited = names.rate_limited.load(std::sync::atomic::Ordering::Relaxed);
        self.dns_rate_limited.inc_by(limited.saturating_sub(self.dns_rate_limited.get()));
        self.dns_names.set(names.len() as i64);
        self.dns_sync_lag_seconds.set(names.sync_lag_seconds());
    }

    /// Takes TUN mode's totals (each counter goes up by the difference since the last call).
    pub fn observe_tun(&self, flows: &[(&str, u64)], dropped: &[(&str, u64)], active: usize) {
        for &(result, total) in flows {
            let counter = self.tun_flows.get_or_create(&label("result", result));
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        for &(reason, total) in dropped {
            let counter = self.tun_packets_dropped.get_or_create(&label("reason", reason));
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.tun_flows_active.set(active as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // writing into a String cannot fail
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /metrics` on `listen` (hyper, HTTP/1.1).
/// How long the metrics listener waits after a failed accept.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>, names: Arc<Names>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding --metrics-listen {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "metrics listening");
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // out of descriptors or similar: the connection waits in the backlog and
                    // accept fails at once again, so back off instead of spinning the runtime
                    tracing::debug!(%error, "metrics accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let (metrics, names) = (metrics.clone(), names.clone());
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (metrics, names) = (metrics.clone(), names.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &metrics, &names)) }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
            });
        }
    }))
}

fn answer(request: &hyper::Request<hyper::body::Incoming>, metrics: &Metrics, names: &Names) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            metrics.observe_dns(names);
            (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        _ => (404, "text/plain; charset=utf-8", "only GET /metrics is served here\n".to_string()),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::NOT_FOUND);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};

    fn thread_cpu() -> std::time::Duration {
        let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
        let micros = |time: nix::sys::time::TimeVal| time.tv_sec() as u64 * 1_000_000 + time.tv_usec() as u64;
        std::time::Duration::from_micros(micros(usage.user_time()) + micros(usage.system_time()))
    }

    #[tokio::test]
    async fn a_failing_accept_does_not_spin_and_the_listener_recovers() {
        use std::io::{Read, Write};
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let task = serve(listen, Arc::new(Metrics::default()), Arc::new(Names::default())).await.expect("serve");
        // a scrape waits in the backlog while the process has no descriptor left for it
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let mut held = Vec::new();
        setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).expect("setrlimit");
        while let Ok(file) = std::fs::File::open("/dev/null") {
            held.push(file);
        }
        drop(held.pop());
        let mut client = std::net::TcpStream::connect(listen).expect("connect");
        while let Ok(file) = std::fs::File::open("/dev/null") {
            held.push(file);
        }
        let before = thread_cpu();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let spent = thread_cpu() - before;
        drop(held);
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
        assert!(spent < std::time::Duration::from_millis(100), "the accept loop spun: {spent:?} of CPU in 300 ms");
        // descriptors again: the waiting scrape is served
        client.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        client.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let mut answer = Vec::new();
        let reader = tokio::task::spawn_blocking(move || client.read_to_end(&mut answer).map(|_| answer));
        let answer = reader.await.expect("join").expect("read");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        task.abort();
    }
}
