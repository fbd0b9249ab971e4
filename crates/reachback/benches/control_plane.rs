//! Control-plane benchmark against a running `reachback server` (release build):
//! enrollments per second over HTTP, bindings listing latency, CSV export time and
//! memory, and start-up time, all with 1,000,000 bindings. Prints figures.
//!
//!   cargo bench -p reachback --bench control_plane                      # SQLite
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench control_plane                    # and PostgreSQL
//!
//! REACHBACK_BENCH_BINDINGS (default 1000000) sets the number of bindings;
//! REACHBACK_BENCH_KEEP keeps the SQLite data directory in the temp folder (and the
//! PostgreSQL database);
//! REACHBACK_BENCH_CONNECTIONS (default 64) sets the concurrent enrollment connections;
//! REACHBACK_BENCH_ENROLL_ONLY stops after the enrollment figures (for quick comparisons);
//! REACHBACK_BENCH_BINARY runs another `reachback` binary (a build kept for an A/B run);
//! REACHBACK_BENCH_SETTLE_SECONDS waits that long between enrollments and listings;
//! REACHBACK_BENCH_SINGLE_USE_KEYS gives every enrollment a single-use key of its own.
//! REACHBACK_BENCH_NO_BASELINE skips the same-run baselines (HTTP alone, an enrollment
//! refused at the door, certificate signing in process) printed before the enrollments.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(data_dir: &std::path::Path, database: Option<&str>) -> (Server, f64) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut command = Command::new(std::env::var("REACHBACK_BENCH_BINARY").unwrap_or_else(|_| BIN.to_string()));
        command
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--bootstrap-token", TOKEN, "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(database) = database {
            command.args(["--database", database]);
        }
        let started = Instant::now();
        let child = command.spawn().expect("server");
        let server = Server { child, port };
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(120), "server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        (server, started.elapsed().as_secs_f64())
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status.lines().find(|line| line.starts_with(field)).and_then(|line| line.split_whitespace().nth(1)).and_then(|value| value.parse().ok()).unwrap_or(0)
    }

    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(method: &str, url: &str, body: Option<Value>) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(600))).build().into();
    let builder = ureq::http::Request::builder().method(method).uri(url).header("Authorization", format!("Bearer {TOKEN}"));
    let mut reply = match body {
        Some(body) => agent.run(builder.header("Content-Type", "application/json").body(body.to_string()).expect("request")),
        None => agent.run(builder.body(()).expect("request")),
    }
    .expect("request");
    let text = reply.body_mut().with_config().limit(u64::MAX).read_to_string().unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Sends `total` requests over `connections` keep-alive connections, request `n`
/// made by `request(n)`; returns (seconds, replies whose status line holds `expect`).
async fn http_load(port: u16, connections: usize, total: usize, expect: &'static str, request: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>) -> (f64, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let matched = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, matched, request) = (next.clone(), matched.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (reader, mut writer) = stream.into_split();
            let mut reader = BufReader::new(reader);
            let mut line = String::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total {
                    return;
                }
                writer.write_all(&request(index)).await.expect("write");
                line.clear();
                reader.read_line(&mut line).await.expect("status line");
                if line.contains(expect) {
                    matched.fetch_add(1, Ordering::Relaxed);
                }
                let mut length = 0usize;
                loop {
                    line.clear();
                    reader.read_line(&mut line).await.expect("header");
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).await.expect("body");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    (started.elapsed().as_secs_f64(), matched.load(Ordering::Relaxed))
}

/// An enrollment request for client `number`, with `key`.
fn enroll_request(key: &str, public_key: &str, number: usize) -> Vec<u8> {
    let location = json!({"country": "FR", "state": "IDF", "city": format!("city{}", number % 200)});
    let body =
        json!({"enrollment_key": key, "hostname": format!("d{number}.bench.example"), "platform": "linux", "public_key": public_key, "location": location})
            .to_string();
    format!("POST /api/v1/enroll HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// Sends `total` enrollments (clients `offset`…); returns (seconds, successes).
async fn enroll_load(port: u16, keys: Arc<Vec<String>>, public_key: &str, offset: usize, total: usize, connections: usize) -> (f64, usize) {
    let public_key = public_key.to_string();
    let request = move |index: usize| {
        let number = offset + index;
        enroll_request(&keys[number % keys.len()], &public_key, number)
    };
    http_load(port, connections, total, " 201 ", Arc::new(request)).await
}

/// Baselines measured in the same run, on the same machine, before the
/// enrollments: what the HTTP server and this client cost without a database
/// (`GET /healthz`, and an enrollment refused at the door for an over-long key:
/// the same body parsed, a problem document back, nothing written or signed), and
/// how many device certificates one core signs per second in process.
fn baselines(runtime: &tokio::runtime::Runtime, port: u16, public_key: &str, connections: usize) -> (f64, f64, f64) {
    const REQUESTS: usize = 100_000;
    let healthz: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync> = Arc::new(|_| b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n".to_vec());
    let refused_key = "x".repeat(300);
    let public_key = public_key.to_string();
    let refused: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync> = Arc::new(move |number| enroll_request(&refused_key, &public_key, number));
    let mut rates = Vec::new();
    for (request, expect) in [(healthz, " 200 "), (refused, " 401 ")] {
        let mut runs: Vec<f64> = (0..3)
            .map(|_| {
                let (seconds, matched) = runtime.block_on(http_load(port, connections, REQUESTS, expect, request.clone()));
                assert_eq!(matched, REQUESTS, "every baseline request answered {expect}");
                REQUESTS as f64 / seconds
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        rates.push(runs[1]);
    }
    (rates[0], rates[1], signatures_per_second())
}

/// Device certificates signed per second on one core by the server's own CA code
/// (ECDSA P-256 CA, an Ed25519 device key as in the enrollments); median of 5 rounds.
fn signatures_per_second() -> f64 {
    use reachback_server::crypto::{CertificateAuthority, parse_public_key};
    let (certificate, key) = CertificateAuthority::generate().expect("CA");
    let ca = CertificateAuthority::load(&certificate, &key).expect("CA");
    let device = parse_public_key(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()).expect("public key");
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for number in 0..2_000 {
                ca.sign_device(&device, &format!("device{number}"), "d1.bench.example", CertificateAuthority::new_serial(), Duration::from_secs(90 * 86_400))
                    .expect("sign");
            }
            2_000.0 / started.elapsed().as_secs_f64()
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn agent_text(url: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    agent.get(url).call().ok().and_then(|mut reply| reply.body_mut().read_to_string().ok()).unwrap_or_default()
}

/// Requests per listing query: a 99th percentile needs a hundred of them (with 30,
/// the "p99" was the slowest request, which is the first, cold one).
const LISTING_REQUESTS: usize = 100;

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

fn run(label: &str, database: Option<String>, bindings: usize, connections: usize) {
    let keep = std::env::var("REACHBACK_BENCH_KEEP").is_ok();
    let data_dir = std::env::temp_dir().join(if keep { format!("reachback_bench_{label}") } else { format!("reachback_bench_{}_{label}", std::process::id()) });
    let _ = std::fs::remove_dir_all(&data_dir);
    let (server, _) = Server::start(&data_dir, database.as_deref());
    // 200 ranges: 100.64.0.0/10 cut into /18s, one city each; clients are spread evenly
    for index in 0..200u32 {
        let base = std::net::Ipv4Addr::from(0x6440_0000u32 + (index << 14));
        let body = json!({"name": format!("range-{index:03}"), "range": format!("{base}/18"), "location": {"country": "FR", "state": "IDF", "city": format!("city{index}")}});
        api("POST", &server.url("/api/v1/ip-ranges"), Some(body));
    }
    // one reusable key for every enrollment, or (REACHBACK_BENCH_SINGLE_USE_KEYS) a
    // single-use key each, made before the timed rounds
    let single_use = std::env::var_os("REACHBACK_BENCH_SINGLE_USE_KEYS").is_some();
    let new_key = |reusable: bool| {
        api("POST", &server.url("/api/v1/enrollment-keys"), Some(json!({"username": "bench@corp.example", "reusable": reusable})))["key"]
            .as_str()
            .expect("key")
            .to_string()
    };
    let keys: Arc<Vec<String>> = Arc::new(if single_use { (0..bindings).map(|_| new_key(false)).collect() } else { vec![new_key(true)] });
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!("== {label} =={}", if single_use { " (a single-use key per enrollment)" } else { "" });
    let floors = (std::env::var_os("REACHBACK_BENCH_NO_BASELINE").is_none()).then(|| baselines(&runtime, server.port, &public_key, connections));
    if let Some((healthz, refused, signatures)) = floors {
        println!(
            "  baselines ({connections} connections, same client): GET /healthz {healthz:.0}/s; enrollment refused at the door (401, no database, no signature) {refused:.0}/s; device certificates signed in process {signatures:.0}/s on one core"
        );
    }

    // enrollment rate: several timed rounds on the growing store, median reported
    let mut rates = Vec::new();
    let mut enroll_seconds = 0.0;
    let mut done = 0usize;
    let round = 20_000.min(bindings);
    while done < bindings {
        let count = round.min(bindings - done);
        let (seconds, created) = runtime.block_on(enroll_load(server.port, keys.clone(), &public_key, done, count, connections));
        assert_eq!(created, count, "every enrollment succeeds");
        rates.push(count as f64 / seconds);
        enroll_seconds += seconds;
        done += count;
        if rates.len() <= 5 || done.is_multiple_of(200_000) {
            println!("  enrolled {done:>8}: {:.0} enrollments/s this round", count as f64 / seconds);
        }
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "  enrollments/s over HTTP ({connections} connections, {} rounds of {round}): median {:.0}, min {:.0}, max {:.0}",
        rates.len(),
        percentile(&sorted, 0.5),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    if let Some((healthz, refused, _)) = floors {
        let median = percentile(&sorted, 0.5);
        println!("  enrollments / refused-at-the-door = {:.2}; enrollments / healthz = {:.2}", median / refused, median / healthz);
    }

    let metrics = agent_text(&server.url("/metrics"));
    let sum: f64 = metrics
        .lines()
        .find(|line| line.starts_with("reachback_enroll_batch_size_sum"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let count: f64 = metrics
        .lines()
        .find(|line| line.starts_with("reachback_enroll_batch_size_count"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let seconds: f64 = metrics
        .lines()
        .find(|line| line.starts_with("reachback_enroll_batch_duration_seconds_sum"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!(
        "  mean enrollments per write transaction: {:.1}; mean transaction time {:.2} ms; writer busy {:.0}% of the enrollment time",
        sum / count.max(1.0),
        seconds / count.max(1.0) * 1000.0,
        seconds / enroll_seconds * 100.0
    );
    if std::env::var("REACHBACK_BENCH_ENROLL_ONLY").is_ok() {
        drop(server);
        if !keep {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        return;
    }

    if let Some(seconds) = std::env::var("REACHBACK_BENCH_SETTLE_SECONDS").ok().and_then(|value| value.parse().ok()) {
        std::thread::sleep(Duration::from_secs(seconds));
    }
    // bindings listing latency with 1M bindings: filtered, sorted, deep pages
    let queries = [
        "/api/v1/ip-bindings?page=1&page_size=50",
        "/api/v1/ip-bindings?sort=-ip&page=1000&page_size=50",
        "/api/v1/ip-bindings?page=19999&page_size=50",
        "/api/v1/ip-bindings?range_name=range-042&sort=ip&page=40&page_size=100",
        "/api/v1/ip-bindings?range_location=city7&sort=-ip&page=30&page_size=100",
        "/api/v1/ip-bindings?ip=100.64.128.0/17&sort=ip&page=300&page_size=50",
        "/api/v1/ip-bindings?client_hostname=d99999&page=1&page_size=50",
        "/api/v1/ip-bindings?sort=client_hostname&page=10000&page_size=50",
        "/api/v1/ip-bindings?sort=client_hostname&page=19999&page_size=50",
        "/api/v1/ip-bindings?range_location=city7&sort=-last_updated&page=90&page_size=50",
        "/api/v1/ip-bindings?range_location=city7&sort=username&page=90&page_size=50",
        "/api/v1/ip-bindings?sort=-last_updated&page=10000&page_size=50",
        "/api/v1/ip-bindings?sort=range_name&page=1&page_size=50",
        "/api/v1/ip-bindings?sort=-range_name&page=10000&page_size=50",
    ];
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    for query in queries {
        let mut latencies = Vec::new();
        let mut returned = 0;
        for _ in 0..LISTING_REQUESTS {
            let started = Instant::now();
            let mut reply = agent.get(&server.url(query)).header("Authorization", format!("Bearer {TOKEN}")).call().expect("list");
            let text = reply.body_mut().read_to_string().unwrap_or_default();
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            returned = serde_json::from_str::<Value>(&text).ok().and_then(|body| body["items"].as_array().map(Vec::len)).unwrap_or(0);
        }
        let slowest = latencies.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(index, _)| index + 1).unwrap_or(0);
        latencies.sort_by(f64::total_cmp);
        println!(
            "  GET {query}: {returned} rows, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (request {slowest} of {LISTING_REQUESTS})",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1]
        );
    }

    // CSV export of every binding: time and memory growth of the server
    server.reset_peak();
    let rss_before = server.rss_kib("VmRSS:");
    let started = Instant::now();
    let mut reply = agent.get(&server.url("/api/v1/ip-bindings/export.csv")).header("Authorization", format!("Bearer {TOKEN}")).call().expect("export");
    let mut reader = reply.body_mut().as_reader();
    let (mut bytes, mut lines) = (0usize, 0usize);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = std::io::Read::read(&mut reader, &mut buffer).expect("read");
        if read == 0 {
            break;
        }
        bytes += read;
        lines += buffer[..read].iter().filter(|&&b| b == b'\n').count();
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak = server.rss_kib("VmHWM:");
    println!(
        "  CSV export: {} rows, {:.1} MB in {seconds:.2} s; server RSS {:.1} MB before, peak {:.1} MB during (growth {:.1} MB)",
        lines - 1,
        bytes as f64 / 1e6,
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak.saturating_sub(rss_before)) as f64 / 1024.0
    );

    // start-up with the bindings in the store
    drop(server);
    let mut startups = Vec::new();
    for _ in 0..3 {
        let (server, seconds) = Server::start(&data_dir, database.as_deref());
        startups.push(seconds);
        println!("  start-up to listening: {seconds:.2} s (RSS {:.1} MB)", server.rss_kib("VmRSS:") as f64 / 1024.0);
    }
    startups.sort_by(f64::total_cmp);
    println!("  start-up median: {:.2} s", startups[1]);
    if !keep {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
}

fn main() {
    let bindings: usize = std::env::var("REACHBACK_BENCH_BINDINGS").ok().and_then(|value| value.parse().ok()).unwrap_or(1_000_000);
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let connections: usize = std::env::var("REACHBACK_BENCH_CONNECTIONS").ok().and_then(|value| value.parse().ok()).unwrap_or(64);
    println!("{}", reachback_testkit::machine_line());
    if std::env::var("REACHBACK_BENCH_SKIP_SQLITE").is_err() {
        run("sqlite", None, bindings, connections);
    }
    if let Ok(admin_url) = std::env::var("REACHBACK_BENCH_POSTGRES") {
        let name = format!("reachback_bench_{}", std::process::id());
        let status = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("CREATE DATABASE {name}")]).status().expect("psql");
        assert!(status.success(), "cannot create the benchmark database");
        let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_string()).unwrap_or(admin_url.clone());
        run("postgres", Some(format!("{base}/{name}")), bindings, connections);
        if std::env::var("REACHBACK_BENCH_KEEP").is_ok() {
            println!("  kept the database {name}");
        } else {
            let _ = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]).status();
        }
    }
}
