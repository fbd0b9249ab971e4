//! Event delivery benchmark: how fast a backlog drains to one webhook. A release
//! `reachback server` gets a webhook sink pointing at a local receiver; while the
//! receiver answers 503, enrollments queue events (an audit entry and a binding
//! each); then the receiver comes back and the time until it has every queued
//! event gives events per second. Rounds repeat; the median is printed.
//!
//!   cargo bench -p reachback --bench events                             # SQLite
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench events                           # and PostgreSQL
//!
//! REACHBACK_BENCH_ENROLLMENTS (default 10000) enrollments a round;
//! REACHBACK_BENCH_ROUNDS (default 5).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use reachback_testkit::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

fn start(data_dir: &std::path::Path, database: Option<&str>) -> ServerProcess {
    ServerProcess::start(BIN, TOKEN, data_dir, database)
}

fn api(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> Value {
    let request =
        ureq::http::Request::builder().method(method).uri(url).header("authorization", format!("Bearer {TOKEN}")).header("content-type", "application/json");
    let request = request.body(body.map(|body| body.to_string()).unwrap_or_default()).expect("request");
    let mut response = agent.run(request).expect("API answers");
    let text = response.body_mut().read_to_string().unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A webhook receiver: counts the CloudEvents of every batch it takes, answers
/// 503 while `down`.
async fn receiver(listener: tokio::net::TcpListener, received: Arc<AtomicUsize>, down: Arc<AtomicBool>) {
    while let Ok((stream, _)) = listener.accept().await {
        let (received, down) = (received.clone(), down.clone());
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            loop {
                let mut length = 0usize;
                let mut line = String::new();
                loop {
                    line.clear();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer: &[u8] = if down.load(Ordering::SeqCst) {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                } else {
                    let events = body.windows(13).filter(|window| window == b"\"specversion\"").count();
                    received.fetch_add(events, Ordering::SeqCst);
                    b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
                };
                if stream.get_mut().write_all(answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn run(label: &str, database: Option<&str>) {
    let enrollments: usize = std::env::var("REACHBACK_BENCH_ENROLLMENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(10_000);
    let rounds: usize = std::env::var("REACHBACK_BENCH_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("reachback-events-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = start(&dir, database);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (received, down) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(true)));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let target = format!("http://{}/hook", listener.local_addr().expect("address"));
    runtime.spawn(receiver(listener, received.clone(), down.clone()));

    api(&agent, "POST", &format!("{}/api/v1/ip-ranges", server.base), Some(json!({"name": "Bench", "range": "100.64.0.0/10"})));
    let key = api(&agent, "POST", &format!("{}/api/v1/enrollment-keys", server.base), Some(json!({"username": "bench", "reusable": true})))["key"]
        .as_str()
        .expect("key")
        .to_string();
    let sink = api(&agent, "POST", &format!("{}/api/v1/event-sinks", server.base), Some(json!({"name": "bench", "kind": "webhook", "target": target})));
    let sink_url = format!("{}/api/v1/event-sinks/{}", server.base, sink["id"].as_str().expect("sink id"));
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let mut rates = Vec::new();
    for round in 0..rounds {
        down.store(true, Ordering::SeqCst);
        // queue: enrollments over 8 connections, each an audit entry and a binding
        let next = Arc::new(AtomicUsize::new(round * enrollments));
        let end = (round + 1) * enrollments;
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let (next, key, public_key, base) = (next.clone(), key.clone(), public_key.clone(), server.base.clone());
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    loop {
                        let number = next.fetch_add(1, Ordering::SeqCst);
                        if number >= end {
                            return;
                        }
                        let body =
                            json!({"enrollment_key": key, "hostname": format!("d{number}.bench.example"), "platform": "linux", "public_key": public_key});
                        let _ = agent.post(&format!("{base}/api/v1/enroll")).header("content-type", "application/json").send(body.to_string());
                    }
                });
            }
        });
        let queued = loop {
            let state = api(&agent, "GET", &sink_url, None);
            let pending = state["pending"].as_u64().unwrap_or(0) as usize;
            if pending >= 2 * enrollments {
                break pending;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let before = received.load(Ordering::SeqCst);
        down.store(false, Ordering::SeqCst);
        // a change to the sink ends its backoff (as an administrator fixing its URL would)
        api(&agent, "PATCH", &sink_url, Some(json!({"target": target})));
        let waited = Instant::now();
        while received.load(Ordering::SeqCst) == before {
            assert!(waited.elapsed() < Duration::from_secs(60), "no delivery after the receiver came back");
            std::thread::sleep(Duration::from_millis(1));
        }
        // timed from the first batch taken to the last
        let started = Instant::now();
        let first = received.load(Ordering::SeqCst) - before;
        while received.load(Ordering::SeqCst) - before < queued {
            assert!(started.elapsed() < Duration::from_secs(600), "the backlog did not drain");
            std::thread::sleep(Duration::from_millis(2));
        }
        let seconds = started.elapsed().as_secs_f64();
        let rate = (queued - first) as f64 / seconds;
        println!("{label}: round {}: {queued} queued events delivered in {seconds:.2} s = {rate:.0} events/s", round + 1);
        rates.push(rate);
    }
    let state = api(&agent, "GET", &sink_url, None);
    println!(
        "{label}: median {:.0} events/s over {rounds} rounds (goal ≥ 5,000); sink after: pending {}, delivered {}",
        median(rates),
        state["pending"],
        state["delivered_total"]
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    run("sqlite", None);
    if let Ok(url) = std::env::var("REACHBACK_BENCH_POSTGRES") {
        let database = format!("events_bench_{}", std::process::id());
        let admin = url.clone();
        let status = Command::new("psql").args([admin.as_str(), "-qc", &format!("CREATE DATABASE {database}")]).status().expect("psql");
        assert!(status.success());
        let (base, _) = url.rsplit_once('/').expect("url");
        run("postgres", Some(&format!("{base}/{database}")));
        let _ = Command::new("psql").args([admin.as_str(), "-qc", &format!("DROP DATABASE {database} WITH (FORCE)")]).status();
    }
}
