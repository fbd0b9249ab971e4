//! Data-plane benchmark in network namespaces (needs root; see `scripts/netns-lab`):
//! everything goes server host → TPROXY connector → broker → agent → service, and
//! each figure is set against a direct path over the same kind of link (veth),
//! measured in the same run.
//!
//!   cargo bench -p reachback --bench dataplane
//!
//! Measures: iperf3 bulk throughput (1 and 4 streams, both directions) and the CPU
//! each component spends per Gbit; 2,000 sequential connect + 1-byte echo + close
//! (latency percentiles, flows/s); 10,000 concurrent open flows on one client
//! (success count, RSS and memory per flow of server, connector and agent); 2,000
//! connected agents on one server (memory per session); the agent's idle RSS.
//! REACHBACK_BENCH_FLOWS, REACHBACK_BENCH_CONCURRENT, REACHBACK_BENCH_AGENTS and
//! REACHBACK_BENCH_SECONDS change the sizes; REACHBACK_BENCH_PHASES (a comma list of
//! `bulk`, `flows`, `concurrent`, `agents`, `flowlog`, `tun`; all by default) picks what
//! runs, and REACHBACK_BENCH_BINARY runs another build of `reachback` (A/B runs on one day).
//! The `flowlog` phase sets the sequential flow rate with the flow log on against off
//! in the same run: the `flow_log_enabled` setting is switched through the API between
//! runs of sequential connect + 1-byte echo + close, in REACHBACK_BENCH_ROUNDS rounds
//! (5 by default) of one run each way, the first way alternating (the server host
//! reuses TIME_WAIT ports for it: `net.ipv4.tcp_tw_reuse=1` in its namespace).
//! The `tun` phase (last, as it swaps the connector) sets TUN mode against TPROXY
//! mode in the same run: the connector is restarted in each mode in turn
//! (REACHBACK_BENCH_ROUNDS rounds, 2 by default), and each round measures
//! single-stream iperf3 both ways and sequential connect + 1-byte echo + close.
//!
//! The same binary, re-run inside a namespace, plays the helpers: `echo-server`,
//! `flows` (sequential), `hold` (concurrent) and `swarm` (many agents).

use std::path::Path;
use std::time::{Duration, Instant};

use reachback_testkit::{Lab, iperf3_bits, machine_line, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| arg != "--bench").collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match args.first().map(String::as_str) {
        Some("echo-server") => runtime.block_on(echo_server(&args[1])),
        Some("flows") => {
            runtime.block_on(sequential_flows(&args[1], args[2].parse().expect("count"), args.get(3).and_then(|workers| workers.parse().ok()).unwrap_or(1)))
        }
        Some("hold") => runtime.block_on(hold_flows(&args[1], args[2].parse().expect("count"))),
        Some("swarm") => runtime.block_on(swarm(&args[1], args[2].parse().expect("count"), &args[3], &args[4])),
        // single-threaded, as the connector and the agent are
        Some("forward") => tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(forward(&args[1], &args[2])),
        _ => orchestrate(),
    }
}

/// Echoes every byte back; one task per connection.
async fn echo_server(address: &str) {
    let listener = tokio::net::TcpListener::bind(address).await.expect("echo bind");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = stream.read(&mut buffer).await {
                if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// A plain TCP relay: every connection to `listen` is joined to a new connection to
/// `target` (no encryption, no multiplexing). Three of them in the lab's three
/// middle hosts are the least any three-process relay can cost there.
async fn forward(listen: &str, target: &str) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("forward bind");
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        let target = target.to_string();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, 64 * 1024, 64 * 1024).await;
        });
    }
}

/// `count` times: connect, send one byte, read it back, close — by `workers`
/// clients side by side, each one flow after the other. Prints the latencies (µs) as JSON.
async fn sequential_flows(target: &str, count: usize, workers: usize) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let target = target.to_string();
        tasks.push(tokio::spawn(async move { one_client(&target, count / workers).await }));
    }
    let (mut latencies, mut failures) = (Vec::with_capacity(count), 0);
    for task in tasks {
        let (mut some, failed) = task.await.expect("client");
        latencies.append(&mut some);
        failures += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", json!({"latencies_us": latencies, "failures": failures, "seconds": elapsed}));
}

async fn one_client(target: &str, count: usize) -> (Vec<u64>, usize) {
    let mut latencies = Vec::with_capacity(count);
    let mut failures = 0;
    for _ in 0..count {
        let begin = Instant::now();
        let result = async {
            let mut stream = tokio::net::TcpStream::connect(target).await?;
            stream.set_nodelay(true)?;
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), result).await {
            Ok(Ok(())) => latencies.push(begin.elapsed().as_micros() as u64),
            _ => failures += 1,
        }
    }
    (latencies, failures)
}

/// Opens `count` connections at once (bounded concurrency while opening), each
/// proves itself with a 1-byte echo, then holds them all until stdin closes.
async fn hold_flows(target: &str, count: usize) {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let semaphore = semaphore.clone();
        let target = target.to_string();
        tasks.push(tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await.ok()?;
            let mut stream = tokio::time::timeout(Duration::from_secs(20), tokio::net::TcpStream::connect(&target)).await.ok()?.ok()?;
            stream.write_all(b"x").await.ok()?;
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut byte)).await.ok()?.ok()?;
            drop(permit);
            Some(stream)
        }));
    }
    let mut streams = Vec::with_capacity(count);
    for task in tasks {
        if let Ok(Some(stream)) = task.await {
            streams.push(stream);
        }
    }
    println!("{}", json!({"open": streams.len()}));
    wait_for_stdin_close().await;
    drop(streams);
}

/// Enrolls `count` devices and keeps one tunnel each until stdin closes.
async fn swarm(server: &str, count: usize, token: &str, ca_pin: &str) {
    let trust = reachback_tunnel::ApiTrust { ca_pin: Some(ca_pin.to_string()), insecure_http: false };
    let http = reachback_tunnel::ApiClient::new(server, &trust, Duration::from_secs(60)).expect("API client").agent;
    let post = |path: &str, body: Value, authorized: bool| {
        let mut request = http.post(format!("{server}{path}")).header("Content-Type", "application/json");
        if authorized {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.send(body.to_string()).expect("API");
        serde_json::from_str::<Value>(&response.body_mut().read_to_string().expect("body")).expect("JSON")
    };
    let key = post("/api/v1/enrollment-keys", json!({"username": "swarm@corp.example", "reusable": true}), true)["key"].as_str().expect("key").to_string();
    let mut materials = Vec::with_capacity(count);
    let mut brokers = Vec::new();
    for index in 0..count {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
        let answer = post(
            "/api/v1/enroll",
            json!({"enrollment_key": key, "hostname": format!("swarm-{index}.corp.example"), "platform": "linux", "public_key": pair.public_key_pem()}),
            false,
        );
        brokers = answer["broker_endpoints"].as_array().expect("brokers").iter().filter_map(|item| item.as_str().map(str::to_string)).collect();
        materials.push(reachback_tunnel::TlsMaterial {
            certificate_pem: answer["certificate"].as_str().expect("certificate").to_string(),
            private_key_pem: pair.serialize_pem(),
            ca_pem: answer["ca_certificate"].as_str().expect("CA").to_string(),
        });
    }
    let mut tunnels = Vec::with_capacity(count);
    for material in &materials {
        let Ok(connector) = reachback_tunnel::TunnelConnector::new(material) else { continue };
        if let Ok(tunnel) = reachback_tunnel::client::connect(&connector, &brokers, reachback_proto::ClientRole::Agent, None, "bench").await {
            let connection = tunnel.connection.clone();
            tunnels.push((connection, tokio::spawn(tunnel.run_control(None, |_| {}))));
        }
    }
    println!("{}", json!({"connected": tunnels.len()}));
    wait_for_stdin_close().await;
}

/// Returns when the orchestrator closes our stdin.
async fn wait_for_stdin_close() {
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|value| value.parse::<f64>().ok()).unwrap_or(0.0);
    // fields after the name start at field 3 (state); utime is field 14, stime 15
    (ticks(11) + ticks(12)) / 100.0
}

fn pid_of(lab: &Lab, name: &str) -> u32 {
    lab.children.iter().find(|(child, _)| child == name).map(|(_, child)| child.id()).expect("process")
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn run_helper(lab: &Lab, host: &str, args: &[&str]) -> Value {
    let me = std::env::current_exe().expect("bench binary").to_string_lossy().into_owned();
    let output = lab.run(host, &me, args);
    assert!(output.status.success(), "helper {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("helper JSON")
}

/// Starts a helper that holds something open; returns it with its first JSON line.
fn start_holder(lab: &Lab, host: &str, args: &[&str]) -> (std::process::Child, Value) {
    use std::io::BufRead;
    let me = std::env::current_exe().expect("bench binary").to_string_lossy().into_owned();
    let mut child = lab.command(host, &me, args).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().expect("holder");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("holder output");
    (child, serde_json::from_str(&line).expect("holder JSON"))
}

fn orchestrate() {
    let bin = std::env::var_os("REACHBACK_BENCH_BINARY").map_or_else(|| Path::new(env!("CARGO_BIN_EXE_reachback")).to_path_buf(), std::path::PathBuf::from);
    let bin = bin.as_path();
    let phases = std::env::var("REACHBACK_BENCH_PHASES").unwrap_or_else(|_| "bulk,flows,concurrent,agents,flowlog,tun".into());
    let phase = |name: &str| phases.split(',').any(|listed| listed.trim() == name);
    let seconds = env_number("REACHBACK_BENCH_SECONDS", 5).to_string();
    let flows = env_number("REACHBACK_BENCH_FLOWS", 2000);
    let concurrent = env_number("REACHBACK_BENCH_CONCURRENT", 10_000);
    let agents = env_number("REACHBACK_BENCH_AGENTS", 2000);
    // children inherit the raised descriptor limit (10,000 flows need more than 1,024)
    let _ = std::process::Command::new("prlimit").args(["--pid", &std::process::id().to_string(), "--nofile=20000:20000"]).status();
    let mut lab = Lab::full()(bin);
    let me = std::env::current_exe().expect("bench binary").to_string_lossy().into_owned();
    lab.spawn("echo", "cli", &me, &["echo-server", "127.0.0.1:7000"]);
    lab.spawn("echo-direct", "conn", &me, &["echo-server", "10.77.1.2:7001"]);
    lab.spawn("iperf3-direct", "conn", "iperf3", &["-s", "-B", "10.77.1.2", "-p", "5202"]);
    // the baseline relay chain: connector host → broker host → client host → service
    for (host, listen, target) in [
        ("conn", "10.77.1.2:7101", "10.77.2.2:7102"),
        ("brk", "10.77.2.2:7102", "10.77.3.2:7103"),
        ("cli", "10.77.3.2:7103", "127.0.0.1:7000"),
        ("conn", "10.77.1.2:7111", "10.77.2.2:7112"),
        ("brk", "10.77.2.2:7112", "10.77.3.2:7113"),
        ("cli", "10.77.3.2:7113", "127.0.0.1:5201"),
    ] {
        lab.spawn(&format!("forward-{listen}"), host, &me, &["forward", listen, target]);
    }
    lab.wait_listening("cli", "127.0.0.1", 7000);
    lab.wait_listening("conn", "10.77.1.2", 7111);
    lab.wait_listening("conn", "10.77.1.2", 7001);
    lab.wait_listening("conn", "10.77.1.2", 5202);
    std::thread::sleep(Duration::from_secs(1));
    let (server, connector, agent) = (pid_of(&lab, "server"), pid_of(&lab, "connector"), pid_of(&lab, "agent"));
    println!("{}", machine_line());
    let agent_idle = rss_kib(agent);
    println!("agent idle RSS: {:.1} MiB (goal < 10 MiB)", agent_idle as f64 / 1024.0);

    if phase("bulk") {
        println!("\n## bulk throughput (iperf3, {seconds} s each; direct = server host → connector host over veth)");
        println!(
            "| case | direct Gbit/s | 3 plain TCP relays Gbit/s | through Reachback Gbit/s | ratio to direct | ratio to the plain relays | CPU s per Gbit: server / connector / agent |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (streams, reverse) in [("1", false), ("1", true), ("4", false), ("4", true)] {
            let direct = iperf3_bits(&lab, "10.77.1.2", "5202", &seconds, streams, reverse);
            let chain = iperf3_bits(&lab, "10.77.1.2", "7111", &seconds, streams, reverse);
            let cpu_before = [cpu_seconds(server), cpu_seconds(connector), cpu_seconds(agent)];
            let tunnel = iperf3_bits(&lab, "100.64.0.1", "5201", &seconds, streams, reverse);
            let cpu_after = [cpu_seconds(server), cpu_seconds(connector), cpu_seconds(agent)];
            let gbits = tunnel * seconds.parse::<f64>().unwrap_or(5.0) / 1e9;
            let per_gbit: Vec<String> = (0..3).map(|index| format!("{:.2}", (cpu_after[index] - cpu_before[index]) / gbits)).collect();
            let direction = if reverse { "client → server (-R)" } else { "server → client" };
            println!(
                "| {streams} stream(s), {direction} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                direct / 1e9,
                chain / 1e9,
                tunnel / 1e9,
                tunnel / direct,
                tunnel / chain,
                per_gbit.join(" / ")
            );
        }
    }
    if phase("flows") {
        println!("\n## new flows: {flows} sequential connect + 1-byte echo + close");
        let count = flows.to_string();
        let direct = run_helper(&lab, "srv", &["flows", "10.77.1.2:7001", &count]);
        let chain = run_helper(&lab, "srv", &["flows", "10.77.1.2:7101", &count]);
        let cpu_before = [cpu_seconds(server), cpu_seconds(connector), cpu_seconds(agent)];
        let tunnel = run_helper(&lab, "srv", &["flows", "100.64.0.1:7000", &count]);
        let cpu_after = [cpu_seconds(server), cpu_seconds(connector), cpu_seconds(agent)];
        let sorted = |value: &Value| {
            let mut list: Vec<u64> = value["latencies_us"].as_array().expect("latencies").iter().filter_map(Value::as_u64).collect();
            list.sort_unstable();
            list
        };
        let (direct_sorted, chain_sorted, tunnel_sorted) = (sorted(&direct), sorted(&chain), sorted(&tunnel));
        println!("| path | p50 µs | p90 µs | p99 µs | flows/s | failures |");
        println!("|---|---|---|---|---|---|");
        for (name, sorted, raw) in
            [("direct", &direct_sorted, &direct), ("3 plain TCP relays", &chain_sorted, &chain), ("through Reachback", &tunnel_sorted, &tunnel)]
        {
            let rate = sorted.len() as f64 / raw["seconds"].as_f64().unwrap_or(1.0);
            println!("| {name} | {} | {} | {} | {rate:.0} | {} |", percentile(sorted, 0.5), percentile(sorted, 0.9), percentile(sorted, 0.99), raw["failures"]);
        }
        println!(
            "added latency p50: {} µs (goal < 300 µs); the plain relays add {} µs; Reachback adds {} µs more than they do",
            percentile(&tunnel_sorted, 0.5).saturating_sub(percentile(&direct_sorted, 0.5)),
            percentile(&chain_sorted, 0.5).saturating_sub(percentile(&direct_sorted, 0.5)),
            percentile(&tunnel_sorted, 0.5).saturating_sub(percentile(&chain_sorted, 0.5))
        );
        let per_flow: Vec<String> = (0..3).map(|index| format!("{:.0}", (cpu_after[index] - cpu_before[index]) * 1e6 / flows as f64)).collect();
        println!("CPU µs per flow through Reachback, server / connector / agent: {}", per_flow.join(" / "));
        for workers in ["4", "16"] {
            let direct = run_helper(&lab, "srv", &["flows", "10.77.1.2:7001", &count, workers]);
            let tunnel = run_helper(&lab, "srv", &["flows", "100.64.0.1:7000", &count, workers]);
            let rate = |value: &Value| value["latencies_us"].as_array().map_or(0, Vec::len) as f64 / value["seconds"].as_f64().unwrap_or(1.0);
            println!(
                "{workers} clients side by side: {:.0} flows/s through Reachback ({} failures), {:.0} direct (goal ≥ 3,000)",
                rate(&tunnel),
                tunnel["failures"],
                rate(&direct)
            );
        }
    }
    if phase("concurrent") {
        println!("\n## {concurrent} concurrent open flows on one client");
        let before = [rss_kib(server), rss_kib(connector), rss_kib(agent)];
        let (mut holder, opened) = start_holder(&lab, "srv", &["hold", "100.64.0.1:7000", &concurrent.to_string()]);
        std::thread::sleep(Duration::from_secs(2));
        let during = [rss_kib(server), rss_kib(connector), rss_kib(agent)];
        let open = opened["open"].as_u64().unwrap_or(0);
        println!("opened and echoed: {open} of {concurrent}");
        println!("| component | RSS before MiB | RSS with the flows open MiB | KiB per flow |");
        println!("|---|---|---|---|");
        for (index, name) in ["server (broker)", "connector", "agent"].iter().enumerate() {
            let per_flow = (during[index].saturating_sub(before[index])) as f64 / open.max(1) as f64;
            println!("| {name} | {:.1} | {:.1} | {per_flow:.1} |", before[index] as f64 / 1024.0, during[index] as f64 / 1024.0);
        }
        drop(holder.stdin.take());
        let _ = holder.wait();
        wait_for("flows to close", Duration::from_secs(60), || lab.metric("reachback_flows_active") == 0.0);
    }
    if phase("agents") {
        println!("\n## {agents} connected agents on one server");
        let server_before = rss_kib(server);
        let (mut swarm_child, connected) =
            start_holder(&lab, "cli", &["swarm", "https://10.77.2.2:8080", &agents.to_string(), &lab.token.clone(), &lab.ca_pin.clone()]);
        std::thread::sleep(Duration::from_secs(2));
        let sessions = lab.metric("reachback_client_sessions");
        let server_during = rss_kib(server);
        println!(
            "connected: {} of {agents} (server counts {sessions} sessions); server RSS {:.1} → {:.1} MiB, {:.1} KiB per session",
            connected["connected"],
            server_before as f64 / 1024.0,
            server_during as f64 / 1024.0,
            server_during.saturating_sub(server_before) as f64 / agents.max(1) as f64
        );
        drop(swarm_child.stdin.take());
        let _ = swarm_child.wait();
    }
    if phase("flowlog") {
        flow_log_on_against_off(&lab, flows, env_number("REACHBACK_BENCH_ROUNDS", 5));
    }
    if phase("tun") {
        tun_against_tproxy(&mut lab, &seconds, flows, env_number("REACHBACK_BENCH_ROUNDS", 2));
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2.0,
    }
}

/// The sequential flow rate with the flow log on against off, in one run: the
/// setting is switched through the API before each run of `flows` sequential
/// connect + 1-byte echo + close, one run each way per round, the first way
/// alternating from round to round (so a drift of the machine falls on both).
fn flow_log_on_against_off(lab: &Lab, flows: usize, rounds: usize) {
    // tens of thousands of connects to one address and port within a minute: without
    // reuse, the server host's TIME_WAIT sockets use up its connect ports after some
    // 14,000 flows and every connect then searches (a sevenfold slowdown, whatever the
    // flow log); the server host is the lab's client tool, not a Reachback component
    let reuse = lab.run("srv", "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    assert!(reuse.status.success(), "sysctl tcp_tw_reuse on the server host");
    println!("\n## flow log on against off ({rounds} rounds of {flows} sequential connect + 1-byte echo + close each way, alternating)");
    println!("(the server host reuses TIME_WAIT ports: net.ipv4.tcp_tw_reuse=1)");
    println!("| round | flow log | flows/s | p50 µs | p90 µs | p99 µs | failures | rows written |");
    println!("|---|---|---|---|---|---|---|---|");
    let count = flows.to_string();
    let (mut on_rates, mut off_rates) = (Vec::new(), Vec::new());
    let dropped_before = lab.metric("reachback_flow_log_dropped_total");
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [true, false] } else { [false, true] };
        for on in order {
            let (status, settings) = lab.api("PATCH", "/settings", Some(json!({"flow_log_enabled": on})));
            assert_eq!((status, settings["flow_log_enabled"].as_bool()), (200, Some(on)), "{settings}");
            // what the writer still had from the last run is written before this one starts
            std::thread::sleep(Duration::from_millis(500));
            let written_before = lab.metric("reachback_flow_log_written_total");
            let run = run_helper(lab, "srv", &["flows", "100.64.0.1:7000", &count]);
            // the writer's last batch goes within 200 ms of the last flow
            std::thread::sleep(Duration::from_millis(500));
            let written = lab.metric("reachback_flow_log_written_total") - written_before;
            let mut latencies: Vec<u64> = run["latencies_us"].as_array().expect("latencies").iter().filter_map(Value::as_u64).collect();
            latencies.sort_unstable();
            let rate = latencies.len() as f64 / run["seconds"].as_f64().unwrap_or(1.0);
            println!(
                "| {round} | {} | {rate:.0} | {} | {} | {} | {} | {written:.0} |",
                if on { "on" } else { "off" },
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.9),
                percentile(&latencies, 0.99),
                run["failures"]
            );
            if on { on_rates.push(rate) } else { off_rates.push(rate) }
        }
    }
    let (on, off) = (median(&on_rates), median(&off_rates));
    println!(
        "median flows/s: flow log on {on:.0}, off {off:.0}; on ÷ off {:.3} (goal ≥ 0.95); flow records dropped: {:.0}",
        on / off.max(1.0),
        lab.metric("reachback_flow_log_dropped_total") - dropped_before
    );
    let (status, _) = lab.api("PATCH", "/settings", Some(json!({"flow_log_enabled": true})));
    assert_eq!(status, 200);
}

/// Restarts the connector in `mode` as a new connector (a provisioning key of its
/// own; the saved identity is replaced) and waits until a flow goes through.
fn switch_connector(lab: &mut Lab, mode: &'static str, round: usize) {
    assert!(lab.stop("connector", false).is_some_and(|status| status.success()), "the connector stops cleanly");
    let (status, connector) = lab.api("POST", "/connectors", Some(json!({"name": format!("bench {mode} {round}")})));
    assert_eq!(status, 201, "{connector}");
    let key = connector["provisioning_key"].as_str().expect("key").to_string();
    let mode_args: &'static [&'static str] = if mode == "tun" { &["--mode", "tun"] } else { &["--mode", "tproxy"] };
    lab.start_connector_with(&key, mode_args);
    wait_for("flows through the restarted connector", Duration::from_secs(60), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);
}

/// TUN mode against TPROXY mode in one run, the connector switched between them.
fn tun_against_tproxy(lab: &mut Lab, seconds: &str, flows: usize, rounds: usize) {
    println!("\n## TUN mode against TPROXY mode ({rounds} rounds, the connector restarted in each mode in turn)");
    println!(
        "| round | mode | 1 stream server → client Gbit/s | 1 stream client → server Gbit/s | connector CPU s per Gbit (→) | flows p50 µs | flows p90 µs | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let count = flows.to_string();
    let mut results: Vec<(&str, f64, f64, u64)> = Vec::new();
    for round in 1..=rounds {
        for mode in ["tproxy", "tun"] {
            switch_connector(lab, mode, round);
            let connector = pid_of(lab, "connector");
            let cpu_before = cpu_seconds(connector);
            let upload = iperf3_bits(lab, "100.64.0.1", "5201", seconds, "1", false);
            let cpu_per_gbit = (cpu_seconds(connector) - cpu_before) / (upload * seconds.parse::<f64>().unwrap_or(5.0) / 1e9);
            let download = iperf3_bits(lab, "100.64.0.1", "5201", seconds, "1", true);
            let run = run_helper(lab, "srv", &["flows", "100.64.0.1:7000", &count]);
            let mut latencies: Vec<u64> = run["latencies_us"].as_array().expect("latencies").iter().filter_map(Value::as_u64).collect();
            latencies.sort_unstable();
            let p50 = percentile(&latencies, 0.5);
            println!(
                "| {round} | {mode} | {:.2} | {:.2} | {cpu_per_gbit:.2} | {p50} | {} | {} |",
                upload / 1e9,
                download / 1e9,
                percentile(&latencies, 0.9),
                run["failures"]
            );
            results.push((mode, upload, download, p50));
        }
    }
    let mean = |mode: &str, pick: fn(&(&str, f64, f64, u64)) -> f64| {
        let values: Vec<f64> = results.iter().filter(|result| result.0 == mode).map(pick).collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let (tun_up, tproxy_up) = (mean("tun", |result| result.1), mean("tproxy", |result| result.1));
    let (tun_down, tproxy_down) = (mean("tun", |result| result.2), mean("tproxy", |result| result.2));
    let (tun_p50, tproxy_p50) = (mean("tun", |result| result.3 as f64), mean("tproxy", |result| result.3 as f64));
    println!(
        "means over the rounds: TUN ÷ TPROXY single-stream throughput {:.2} server → client, {:.2} client → server (goal ≥ 0.6); connect + echo + close p50 {:.0} µs in TUN mode, {:+.0} µs against TPROXY mode",
        tun_up / tproxy_up,
        tun_down / tproxy_down,
        tun_p50,
        tun_p50 - tproxy_p50
    );
}
