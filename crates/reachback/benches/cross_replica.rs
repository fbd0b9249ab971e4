//! Flows that cross replicas against flows that do not, in the same run (issue 21).
//! Two `reachback server` replicas on one PostgreSQL database, on loopback; one agent
//! attached to replica B; two SOCKS5 connectors, one attached to B (the flow stays on
//! B) and one to A (the flow enters at A and is relayed to B: one extra hop).
//!
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test cargo bench -p reachback --bench cross_replica
//!
//! Measures, alternating the two paths round by round (REACHBACK_BENCH_ROUNDS, 5 by
//! default): sequential flows (SOCKS5 connect + 1-byte echo + close,
//! REACHBACK_BENCH_FLOWS per round, 1,000 by default), their p50 and p99; and one
//! stream's download throughput (REACHBACK_BENCH_MIB per round, 256 by default).
//! Prints the medians of the rounds and the ratios crossing ÷ not crossing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reachback_testkit::bench::{Process, env_number, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

fn spawn(args: &[&str], log: &std::path::Path) -> Process {
    let file = std::fs::File::create(log).expect("log");
    Process(Command::new(BIN).args(args).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(file).spawn().expect("spawn"))
}

fn api(base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{base}/api/v1{path}");
    let request = agent.post(&url).header("Authorization", &format!("Bearer {TOKEN}"));
    let mut reply = match (method, body) {
        ("POST", Some(body)) => request.send_json(body).expect("request"),
        _ => agent.get(&url).header("Authorization", &format!("Bearer {TOKEN}")).call().expect("request"),
    };
    reply.body_mut().read_json().unwrap_or(Value::Null)
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SOCKS5 CONNECT to `target` through the proxy on `socks`.
async fn socks_connect(socks: u16, target: std::net::SocketAddrV4) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", socks)).await.expect("connect to the connector");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).await.expect("method");
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&target.ip().octets());
    request.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&request).await.expect("connect request");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.expect("connect reply");
    assert_eq!(reply[1], 0, "the connector granted the flow");
    stream
}

/// Whether one flow goes through yet (the connector up, its tunnel and the agent's in place).
async fn one_flow(socks: u16, target: std::net::SocketAddrV4) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", socks)).await.ok()?;
        stream.write_all(&[5, 1, 0]).await.ok()?;
        let mut method = [0u8; 2];
        stream.read_exact(&mut method).await.ok()?;
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&target.ip().octets());
        request.extend_from_slice(&target.port().to_be_bytes());
        stream.write_all(&request).await.ok()?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).await.ok()?;
        (reply[1] == 0).then_some(())?;
        stream.write_all(b"x").await.ok()?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().is_some()
}

/// Sequential flows: connect, one byte each way, close; the latency of each, in µs.
async fn sequential(socks: u16, target: std::net::SocketAddrV4, flows: usize) -> Vec<u64> {
    let mut latencies = Vec::with_capacity(flows);
    for _ in 0..flows {
        let started = Instant::now();
        let mut stream = socks_connect(socks, target).await;
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("echo");
        drop(stream);
        latencies.push(started.elapsed().as_micros() as u64);
    }
    latencies
}

/// One stream's download: `mib` MiB from the source service; Mbit/s.
async fn download(socks: u16, target: std::net::SocketAddrV4, mib: usize) -> f64 {
    let mut stream = socks_connect(socks, target).await;
    stream.write_all(&(mib as u64).to_be_bytes()).await.expect("ask");
    let started = Instant::now();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    while total < mib << 20 {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0, "the stream ended early at {total} bytes");
        total += read;
    }
    (total as f64 * 8.0) / started.elapsed().as_secs_f64() / 1e6
}

/// The agent's local services: an echo on `echo`, and on `source` a server that
/// sends as many MiB as the 8-byte number it reads.
async fn services(echo: u16, source: u16) {
    let echo = tokio::net::TcpListener::bind(("127.0.0.1", echo)).await.expect("echo");
    let source = tokio::net::TcpListener::bind(("127.0.0.1", source)).await.expect("source");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut buffer = [0u8; 4096];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = source.accept().await {
            tokio::spawn(async move {
                let mut size = [0u8; 8];
                if stream.read_exact(&mut size).await.is_err() {
                    return;
                }
                let chunk = vec![7u8; 256 * 1024];
                for _ in 0..u64::from_be_bytes(size) * 4 {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let Ok(admin_url) = std::env::var("REACHBACK_BENCH_POSTGRES") else {
        println!("REACHBACK_BENCH_POSTGRES not set: replicas need PostgreSQL; nothing measured");
        return;
    };
    let rounds = env_number("REACHBACK_BENCH_ROUNDS", 5);
    let flows = env_number("REACHBACK_BENCH_FLOWS", 1000);
    let mib = env_number("REACHBACK_BENCH_MIB", 256);
    println!("{}", reachback_testkit::machine_line());
    let name = format!("reachback_bench_cross_{}", std::process::id());
    assert!(Command::new("psql").args([admin_url.as_str(), "-qc", &format!("CREATE DATABASE {name}")]).status().expect("psql").success());
    let base_url = admin_url.rsplit_once('/').map(|(base, _)| base.to_string()).unwrap_or(admin_url.clone());
    let database = format!("{base_url}/{name}");
    let work = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&work).expect("work dir");
    let secret = work.join("secret.key");
    std::fs::write(&secret, format!("{}\n", "4b".repeat(32))).expect("secret");
    let secret = secret.to_string_lossy().into_owned();

    let mut replicas = Vec::new();
    let mut bases = Vec::new();
    for node in ["replica-a", "replica-b"] {
        let (http, tunnel) = (free_port(), format!("127.0.0.1:{}", free_port()));
        let data = work.join(node).to_string_lossy().into_owned();
        replicas.push(spawn(
            &[
                "server",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--tunnel-listen",
                &tunnel,
                "--broker-endpoints",
                &tunnel,
                "--data-dir",
                &data,
                "--database",
                &database,
                "--bootstrap-token",
                TOKEN,
                "--node-name",
                node,
                "--secret-key-file",
                &secret,
            ],
            &work.join(format!("{node}.log")),
        ));
        let base = format!("http://127.0.0.1:{http}");
        wait_until("the replica", || ureq::get(&format!("{base}/healthz")).call().is_ok());
        bases.push(base);
    }
    let (a, b) = (&bases[0], &bases[1]);
    let (echo, source) = (free_port(), free_port());
    api(a, "POST", "/ip-ranges", Some(json!({"name": "bench", "range": "100.64.0.0/24"})));
    let segment =
        api(a, "POST", "/app-segments", Some(json!({"name": "bench", "destinations": ["100.64.0.0/24"], "tcp_ports": [echo.to_string(), source.to_string()]})));
    api(a, "POST", "/access-policies", Some(json!({"name": "bench", "action": "allow", "segment_ids": [segment["id"]]})));
    let key = api(a, "POST", "/enrollment-keys", Some(json!({"username": "bench@corp.example"})))["key"].as_str().expect("key").to_string();
    let agent_state = work.join("agent").to_string_lossy().into_owned();
    let enrolled = Command::new(BIN)
        .args(["agent", "enroll", "--server", b, "--key", &key, "--hostname", "laptop.corp.example", "--state-dir", &agent_state])
        .output()
        .expect("enroll");
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    runtime.block_on(services(echo, source));
    let ports = format!("{echo},{source}");
    let _agent = spawn(&["agent", "run", "--allow-ports", &ports, "--state-dir", &agent_state], &work.join("agent.log"));
    let mut connectors = Vec::new();
    let mut socks_ports = Vec::new();
    for (label, base) in [("same", b), ("cross", a)] {
        let provisioning = api(base, "POST", "/connectors", Some(json!({"name": label})))["provisioning_key"].as_str().expect("key").to_string();
        let socks = free_port();
        let state = work.join(format!("connector-{label}")).to_string_lossy().into_owned();
        connectors.push(spawn(
            &[
                "connector",
                "run",
                "--server",
                base,
                "--key",
                &provisioning,
                "--mode",
                "socks5",
                "--socks5-listen",
                &format!("127.0.0.1:{socks}"),
                "--state-dir",
                &state,
            ],
            &work.join(format!("connector-{label}.log")),
        ));
        socks_ports.push(socks);
    }
    wait_until("the agent's session at B", || api(a, "GET", "/client-sessions", None)["items"][0]["broker_node"] == "replica-b");
    let ip: std::net::Ipv4Addr = api(a, "GET", "/ip-bindings", None)["items"][0]["ip"].as_str().expect("ip").parse().expect("IPv4");
    let (echo_target, source_target) = (std::net::SocketAddrV4::new(ip, echo), std::net::SocketAddrV4::new(ip, source));
    // both connectors up and the path warm
    for &socks in &socks_ports {
        wait_until("a flow through the connector", || runtime.block_on(one_flow(socks, echo_target)));
        runtime.block_on(sequential(socks, echo_target, 50));
    }
    println!("two replicas on PostgreSQL, one agent on B; connector 'same' on B, 'cross' on A (relayed A → B); {rounds} rounds, alternating");
    let mut p50 = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    let mut throughput = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for offset in 0..2 {
            let path = (round + offset) % 2;
            let mut latencies = runtime.block_on(sequential(socks_ports[path], echo_target, flows));
            latencies.sort_unstable();
            p50[path].push(percentile(&latencies, 0.5) as f64);
            p99[path].push(percentile(&latencies, 0.99) as f64);
            throughput[path].push(runtime.block_on(download(socks_ports[path], source_target, mib)));
        }
        println!(
            "  round {}: same p50 {:.0} µs p99 {:.0} µs {:.0} Mbit/s | cross p50 {:.0} µs p99 {:.0} µs {:.0} Mbit/s",
            round + 1,
            p50[0][round],
            p99[0][round],
            throughput[0][round],
            p50[1][round],
            p99[1][round],
            throughput[1][round]
        );
    }
    let relayed = ureq::get(&format!("{a}/metrics"))
        .call()
        .ok()
        .and_then(|mut reply| reply.body_mut().read_to_string().ok())
        .and_then(|text| text.lines().find(|line| line.starts_with("reachback_replica_relayed_flows_total{direction=\"out\"}")).map(str::to_string))
        .unwrap_or_default();
    println!("  A's counter: {relayed}");
    let (same_p50, cross_p50) = (median(&mut p50[0]), median(&mut p50[1]));
    let (same_p99, cross_p99) = (median(&mut p99[0]), median(&mut p99[1]));
    let (same_bits, cross_bits) = (median(&mut throughput[0]), median(&mut throughput[1]));
    println!(
        "sequential flows ({flows} per round), medians of the rounds: same p50 {same_p50:.0} µs, p99 {same_p99:.0} µs; cross p50 {cross_p50:.0} µs, p99 {cross_p99:.0} µs"
    );
    println!("  p50 cross ÷ same = {:.2} (goal ≤ 1.3); p99 cross ÷ same = {:.2}", cross_p50 / same_p50, cross_p99 / same_p99);
    println!(
        "one stream, {mib} MiB per round, medians: same {same_bits:.0} Mbit/s, cross {cross_bits:.0} Mbit/s; cross ÷ same = {:.2} (goal ≥ 0.7)",
        cross_bits / same_bits
    );
    drop(connectors);
    drop(replicas);
    let _ = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]).status();
    let _ = std::fs::remove_dir_all(&work);
}
