//! Replica benchmark (issue 21): the time from an access-policy change made through
//! one replica to its enforcement on every replica, three `reachback server`
//! replicas (release build) on one PostgreSQL. Prints figures.
//!
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench replicas
//!
//! Each replica holds an agent and a SOCKS5 connector of its own (a flow is relayed
//! by the replica both are attached to), and a prober per replica opens flows through
//! its connector to its agent's virtual address every 2 ms: the SOCKS5 reply says
//! whether the replica's broker allowed the flow (0) or its policy denied it (2). A
//! change enables or disables the one policy that allows the port, through the
//! replicas in turn; the figure of a change is the time from sending the PATCH to the
//! last replica's first flow decided the new way. The replicas run with their
//! defaults (the periodic full check every 30 s is the backstop; notifications do
//! the work).
//!
//! REACHBACK_BENCH_CHANGES (default 200) sets the number of changes;
//! REACHBACK_BENCH_BACKSTOP_SECONDS passes `--sync-backstop-seconds` to the replicas;
//! REACHBACK_BENCH_BINARY runs another `reachback` binary as the replicas (a build
//! from before the notifications, for the same measurement against polling).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reachback_testkit::bench::{Process, free_port};
use reachback_testkit::wait_for;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

fn http() -> ureq::Agent {
    reachback_testkit::bench::http(Duration::from_secs(30))
}

fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    reachback_testkit::bench::call(agent, TOKEN, method, url, body)
}
const REPLICAS: usize = 3;

/// One flow through a SOCKS5 connector: the reply code (0 allowed, 2 denied by policy, …).
fn probe(socks: u16, destination: SocketAddrV4) -> Option<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", socks)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.set_nodelay(true).ok()?;
    stream.write_all(&[5, 1, 0]).ok()?;
    let mut greeting = [0u8; 2];
    stream.read_exact(&mut greeting).ok()?;
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&destination.ip().octets());
    request.extend_from_slice(&destination.port().to_be_bytes());
    stream.write_all(&request).ok()?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply[..2]).ok()?;
    Some(reply[1])
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn summary(label: &str, mut values: Vec<f64>) {
    values.sort_by(f64::total_cmp);
    println!(
        "  {label}: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
        percentile(&values, 0.5),
        percentile(&values, 0.9),
        percentile(&values, 0.99),
        values.last().copied().unwrap_or(f64::NAN),
        values.len()
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let Ok(admin_url) = std::env::var("REACHBACK_BENCH_POSTGRES") else {
        println!("REACHBACK_BENCH_POSTGRES not set: nothing to measure (three replicas need PostgreSQL)");
        return;
    };
    let changes: usize = std::env::var("REACHBACK_BENCH_CHANGES").ok().and_then(|value| value.parse().ok()).unwrap_or(200);
    let backstop = std::env::var("REACHBACK_BENCH_BACKSTOP_SECONDS").ok();
    println!("{}", reachback_testkit::machine_line());
    let name = format!("reachback_bench_replicas_{}", std::process::id());
    let status = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("CREATE DATABASE {name}")]).status().expect("psql");
    assert!(status.success(), "cannot create the benchmark database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_string()).unwrap_or(admin_url.clone());
    let url = format!("{base}/{name}");
    let work = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&work).expect("work directory");
    run(&url, &work, changes, backstop.as_deref());
    let _ = std::fs::remove_dir_all(&work);
    let _ = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]).status();
}

fn run(url: &str, work: &std::path::Path, changes: usize, backstop: Option<&str>) {
    let secret = work.join("secret.key");
    std::fs::write(&secret, format!("{}\n", "b4".repeat(32))).expect("secret");
    let mut processes = Vec::new();
    let mut bases = Vec::new();
    for index in 0..REPLICAS {
        let port = free_port();
        let data = work.join(format!("replica-{index}"));
        let mut command = Command::new(std::env::var("REACHBACK_BENCH_BINARY").unwrap_or_else(|_| BIN.to_string()));
        command
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--tunnel-listen", "127.0.0.1:0", "--bootstrap-token", TOKEN, "--database", url])
            .args(["--node-name", &format!("replica-{index}"), "--secret-key-file"])
            .arg(&secret)
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(seconds) = backstop {
            command.args(["--sync-backstop-seconds", seconds]);
        }
        processes.push(Process(command.spawn().expect("server")));
        let base = format!("http://127.0.0.1:{port}");
        wait_for("a replica to start", Duration::from_secs(120), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        bases.push(base);
    }
    let agent = http();
    let api = |index: usize, method: &str, path: &str, body: Option<Value>| call(&agent, method, &format!("{}/api/v1{path}", bases[index]), body);
    assert_eq!(api(0, "POST", "/ip-ranges", Some(json!({"name": "bench", "range": "100.64.0.0/24"}))).0, 201);
    // flows are what is measured here, not the flow log's writer
    assert_eq!(api(0, "PATCH", "/settings", Some(json!({"flow_log_enabled": false}))).0, 200);
    let service = TcpListener::bind("127.0.0.1:0").expect("service");
    let service_port = service.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in service.incoming() {
            drop(stream);
        }
    });
    let segment = api(0, "POST", "/app-segments", Some(json!({"name": "bench", "destinations": ["100.64.0.0/24"], "tcp_ports": [service_port.to_string()]}))).1;
    let policy = api(0, "POST", "/access-policies", Some(json!({"name": "bench", "action": "allow", "segment_ids": [segment["id"]], "enabled": false}))).1;
    let policy_id = policy["id"].as_str().expect("policy id").to_string();
    let key = api(0, "POST", "/enrollment-keys", Some(json!({"username": "bench", "reusable": true}))).1["key"].as_str().expect("key").to_string();

    // an agent and a SOCKS5 connector attached to each replica
    let mut pairs = Vec::new();
    for (index, base) in bases.iter().enumerate() {
        let agent_state = work.join(format!("agent-{index}"));
        let hostname = format!("bench-{index}.corp.example");
        wait_for("the range at every replica", Duration::from_secs(60), || {
            Command::new(BIN)
                .args(["agent", "enroll", "--server", base, "--key", &key, "--hostname", &hostname, "--state-dir"])
                .arg(&agent_state)
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        });
        processes.push(Process(
            Command::new(BIN)
                .args(["agent", "run", "--allow-ports", &service_port.to_string(), "--state-dir"])
                .arg(&agent_state)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("agent"),
        ));
        let (_, bindings) = api(0, "GET", &format!("/ip-bindings?client_hostname={hostname}"), None);
        let ip: Ipv4Addr = bindings["items"][0]["ip"].as_str().expect("the agent's address").parse().expect("IPv4");
        let provisioning = api(0, "POST", "/connectors", Some(json!({"name": format!("bench-{index}")}))).1["provisioning_key"]
            .as_str()
            .expect("provisioning key")
            .to_string();
        let socks = free_port();
        processes.push(Process(
            Command::new(BIN)
                .args(["connector", "run", "--server", base, "--key", &provisioning, "--mode", "socks5"])
                .args(["--socks5-listen", &format!("127.0.0.1:{socks}"), "--state-dir"])
                .arg(work.join(format!("connector-{index}")))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("connector"),
        ));
        pairs.push((socks, SocketAddrV4::new(ip, service_port)));
    }
    // every pair answers: denied while the policy is disabled
    for &(socks, destination) in &pairs {
        wait_for("each replica's connector and agent", Duration::from_secs(60), || probe(socks, destination) == Some(2));
    }
    println!("three replicas on PostgreSQL, an agent and a SOCKS5 connector on each; {changes} policy changes, through the replicas in turn");

    let mut all = Vec::new();
    let mut others = Vec::new();
    for change in 0..changes {
        let enable = change % 2 == 0;
        let want = if enable { 0 } else { 2 };
        let origin = change % REPLICAS;
        let url = format!("{}/api/v1/access-policies/{policy_id}", bases[origin]);
        let started = Instant::now();
        let (status, _) = call(&agent, "PATCH", &url, Some(json!({"enabled": enable})));
        assert_eq!(status, 200);
        let took: Vec<f64> = std::thread::scope(|scope| {
            let probers: Vec<_> = pairs
                .iter()
                .map(|&(socks, destination)| {
                    scope.spawn(move || {
                        loop {
                            if probe(socks, destination) == Some(want) {
                                return started.elapsed().as_secs_f64() * 1000.0;
                            }
                            assert!(started.elapsed() < Duration::from_secs(120), "a replica never enforced change {change}");
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    })
                })
                .collect();
            probers.into_iter().map(|prober| prober.join().expect("prober")).collect()
        });
        all.push(took.iter().copied().fold(0.0, f64::max));
        others.extend(took.iter().enumerate().filter(|(index, _)| *index != origin).map(|(_, ms)| *ms));
        // changes at irregular moments, so none lines up with a replica's timers
        std::thread::sleep(Duration::from_millis(50 + (change as u64 * 37) % 100));
    }
    summary("change → enforced on every replica", all);
    summary("change → enforced on another replica (each of the two)", others);
}
