//! The connector's DNS, measured (release build), same run, same machine:
//!
//! 1. the table with 1,000,000 bound hostnames: memory it adds to the process, and
//!    the time to load it from the snapshot frames the broker sends (decode + apply);
//! 2. queries per second (dnsperf, 10 s, A queries for random bound names, 1 in 10
//!    for names nobody holds) and sequential latency p50/p99, answered by the
//!    connector's listener and — side by side — by NSD (Debian) serving the same
//!    names from a zone file (response-rate limiting off), both on one core (`server-count: 1`; the connector's
//!    single-threaded runtime);
//! 3. the lag from an enrollment's 201 to the name resolving at a connector
//!    (a real server and `connector run --mode socks5 --dns-listen` on loopback), p50/p99.
//!
//!   cargo bench -p reachback --bench dns        # needs dnsperf and nsd (apt-get install dnsperf nsd)
//!
//! REACHBACK_BENCH_NAMES (default 1,000,000), REACHBACK_BENCH_LAG_SAMPLES (default 200).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reachback_connector::dns::{DnsOptions, Names, serve};
use reachback_proto::{Control, NameUpdate};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

fn address(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x6440_0001u32 + index)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A DNS query for `name`, type A, with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0, 0, 1, 0, 1]);
    out
}

/// Sequential queries, one at a time: (p50, p99) in microseconds.
fn latencies(server: SocketAddr, names: &[String]) -> (f64, f64) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(server).expect("connect");
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut buffer = [0u8; 1500];
    let mut times = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let started = Instant::now();
        socket.send(&query(index as u16, name)).expect("send");
        if socket.recv(&mut buffer).is_ok() {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[(times.len() as f64 * 0.99) as usize])
}

/// dnsperf for 10 s against `server`: queries per second, and the summary lines.
fn dnsperf(server: SocketAddr, queries: &std::path::Path) -> (f64, String) {
    let output = Command::new("dnsperf")
        .args(["-s", &server.ip().to_string(), "-p", &server.port().to_string(), "-d", &queries.to_string_lossy(), "-l", "10", "-c", "4", "-q", "500"])
        .output()
        .expect("dnsperf runs (apt-get install dnsperf)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let qps = text.lines().find_map(|line| line.trim().strip_prefix("Queries per second:")).and_then(|value| value.trim().parse().ok()).unwrap_or(0.0);
    let summary = text
        .lines()
        .filter(|line| line.contains("Queries lost") || line.contains("Average Latency") || line.contains("Response codes"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    (qps, summary)
}

fn main() {
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let count: u32 = std::env::var("REACHBACK_BENCH_NAMES").ok().and_then(|value| value.parse().ok()).unwrap_or(1_000_000);
    let samples: usize = std::env::var("REACHBACK_BENCH_LAG_SAMPLES").ok().and_then(|value| value.parse().ok()).unwrap_or(200);
    println!("{}", reachback_testkit::machine_line());
    let dir = std::env::temp_dir().join(format!("reachback_bench_dns_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");

    // 1. the snapshot as the broker sends it, chunk by chunk (encoded, decoded, applied):
    //    made as it goes, so what the process grows by is the table, not the frames
    let rss_before = rss_kib();
    let names = Arc::new(Names::default());
    names.set_ranges(&["100.64.0.0/10".to_string()]);
    let started = Instant::now();
    let send = |update: NameUpdate| {
        let frame = reachback_proto::encode(&Control::Names(update));
        let Ok(Control::Names(update)) = reachback_proto::decode_body::<Control>(&frame[reachback_proto::FRAME_HEADER..]) else { panic!("frame") };
        names.apply(update);
    };
    send(NameUpdate { reset: true, zones: Some(vec!["corp.example".into()]), ..NameUpdate::default() });
    let mut next = 0u32;
    while next < count {
        let end = (next + 20_000).min(count);
        let page: Vec<(String, String)> = (next..end).map(|index| (format!("d{index}.corp.example"), address(index).to_string())).collect();
        for update in NameUpdate::chunks(page, Vec::new()) {
            send(update);
        }
        next = end;
    }
    send(NameUpdate { done: true, ..NameUpdate::default() });
    let load = started.elapsed();
    let grown_mib = rss_kib().saturating_sub(rss_before) as f64 / 1024.0;
    println!("## Table with {count} names");
    println!(
        "snapshot of {count} names in frames as the broker sends them: encoded, decoded and loaded in {:.2} s; process RSS +{grown_mib:.1} MiB (goal < 150 MB)",
        load.as_secs_f64()
    );

    // 2. the connector's listener against NSD, same names
    let connector_port = free_port();
    let connector_address: SocketAddr = ([127, 0, 0, 1], connector_port).into();
    let listening = names.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let options = DnsOptions { listen: vec![connector_address], upstream: None, ttl: 10, rate_limit: 0 };
            let _tasks = serve(options, listening).await.expect("listen");
            std::future::pending::<()>().await;
        });
    });
    let zone = dir.join("corp.example.zone");
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&zone).expect("zone"));
        writeln!(file, "$ORIGIN corp.example.\n$TTL 10\n@ IN SOA ns.corp.example. hostmaster.corp.example. 1 3600 600 86400 10\n@ IN NS ns\nns IN A 127.0.0.1")
            .expect("write");
        for index in 0..count {
            writeln!(file, "d{index} IN A {}", address(index)).expect("write");
        }
    }
    let nsd_port = free_port();
    let conf = dir.join("nsd.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: 127.0.0.1@{nsd_port}\n  server-count: 1\n  username: \"\"\n  database: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  logfile: \"{d}/nsd.log\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  verbosity: 1\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\nzone:\n  name: corp.example\n  zonefile: corp.example.zone\n",
            d = dir.display()
        ),
    )
    .expect("nsd.conf");
    let started = Instant::now();
    let mut nsd = Command::new("nsd")
        .args(["-d", "-c", &conf.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nsd runs (apt-get install nsd)");
    let nsd_address: SocketAddr = ([127, 0, 0, 1], nsd_port).into();
    let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
    probe.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut buffer = [0u8; 512];
    loop {
        assert!(started.elapsed() < Duration::from_secs(300), "nsd did not come up; see {}", dir.join("nsd.log").display());
        let _ = probe.send_to(&query(1, &format!("d{}.corp.example", count - 1)), nsd_address);
        if probe.recv(&mut buffer).is_ok_and(|length| length > 12 && buffer[7] == 1) {
            break;
        }
    }
    println!("NSD loaded the same {count} names from its zone file in {:.1} s", started.elapsed().as_secs_f64());
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let picks: Vec<String> =
        (0..100_000)
            .map(|index| {
                if index % 10 == 0 { format!("nobody{}.corp.example", random() % 1_000_000) } else { format!("d{}.corp.example", random() % u64::from(count)) }
            })
            .collect();
    let queries = dir.join("queries.txt");
    std::fs::write(&queries, picks.iter().map(|name| format!("{name} A\n")).collect::<String>()).expect("queries");
    println!("\n## Queries: dnsperf -c 4 -q 500 -l 10, A for random names (1 in 10 held by nobody); sequential p50/p99 over 20,000 queries");
    println!("| server | queries/s | sequential p50 µs | p99 µs | dnsperf |");
    println!("|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (label, server) in [("reachback connector", connector_address), ("NSD 4 (server-count 1)", nsd_address)] {
        let (p50, p99) = latencies(server, &picks[..20_000]);
        let (qps, summary) = dnsperf(server, &queries);
        rates.push(qps);
        println!("| {label} | {qps:.0} | {p50:.0} | {p99:.0} | {summary} |");
    }
    println!("connector ÷ NSD = {:.2} (goal ≥ 1.0)", rates[0] / rates[1].max(1.0));
    let _ = nsd.kill();
    let _ = nsd.wait();

    // 3. the lag from an enrollment's 201 to the name resolving at a connector
    println!("\n## Lag from an enrollment's 201 to its name resolving at a connector ({samples} enrollments, one at a time)");
    let data = dir.join("server");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let tunnel = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(BIN)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tunnel-listen",
            &tunnel,
            "--bootstrap-token",
            TOKEN,
            "--data-dir",
            &data.to_string_lossy(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("server");
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let call = |method: &str, path: &str, body: Value| -> (u16, Value) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{base}/api/v1{path}"))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .expect("request");
        match http.run(request) {
            Ok(mut reply) => (reply.status().as_u16(), serde_json::from_str(&reply.body_mut().read_to_string().unwrap_or_default()).unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    };
    while call("GET", "/me", Value::Null).0 != 200 {
        std::thread::sleep(Duration::from_millis(50));
    }
    call("PATCH", "/settings", json!({"client_domains": ["corp.example"]}));
    call("POST", "/ip-ranges", json!({"name": "r", "range": "100.64.0.0/16"}));
    let provisioning = call("POST", "/connectors", json!({"name": "dns"})).1["provisioning_key"].as_str().expect("key").to_string();
    let key = call("POST", "/enrollment-keys", json!({"username": "lag@corp.example", "reusable": true})).1["key"].as_str().expect("key").to_string();
    let dns_port = free_port();
    let dns_address: SocketAddr = ([127, 0, 0, 1], dns_port).into();
    let mut connector = Command::new(BIN)
        .args(["connector", "run", "--server", &base, "--key", &provisioning, "--mode", "socks5", "--socks5-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--dns-listen", &dns_address.to_string(), "--state-dir", &dir.join("connector").to_string_lossy()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("connector");
    let resolves = |name: &str, expected: &str| {
        let mut buffer = [0u8; 512];
        probe.send_to(&query(7, name), dns_address).is_ok()
            && probe.recv(&mut buffer).is_ok_and(|length| {
                length >= 16 && IpAddr::from([buffer[length - 4], buffer[length - 3], buffer[length - 2], buffer[length - 1]]).to_string() == expected
            })
    };
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    // wait for the connector's table (a first enrollment resolving)
    let (_, first) = call("POST", "/enroll", json!({"enrollment_key": key, "hostname": "first.corp.example", "platform": "linux", "public_key": public_key}));
    let first_address = first["virtual_ip"].as_str().expect("address").to_string();
    let began = Instant::now();
    while !resolves("first.corp.example", &first_address) {
        assert!(began.elapsed() < Duration::from_secs(30), "the connector never resolved");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lags = Vec::with_capacity(samples);
    for index in 0..samples {
        let name = format!("lag{index}.corp.example");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let (status, enrolled) =
            call("POST", "/enroll", json!({"enrollment_key": key, "hostname": name, "platform": "linux", "public_key": pair.public_key_pem()}));
        let acknowledged = Instant::now();
        assert_eq!(status, 201, "{enrolled}");
        let expected = enrolled["virtual_ip"].as_str().expect("address").to_string();
        while !resolves(&name, &expected) {
            assert!(acknowledged.elapsed() < Duration::from_secs(10), "{name} never resolved");
            std::thread::sleep(Duration::from_millis(2));
        }
        lags.push(acknowledged.elapsed().as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    println!(
        "lag p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (goal p99 < 1 s; the broker looks for changes every 250 ms)",
        lags[lags.len() / 2],
        lags[(lags.len() as f64 * 0.99) as usize],
        lags[lags.len() - 1]
    );
    let _ = connector.kill();
    let _ = connector.wait();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
