//! UDP and IPv6 through the TPROXY connector, in network namespaces (needs root;
//! see `scripts/netns-lab`); every figure against a baseline measured in the same run.
//!
//!   cargo bench -p reachback --bench udp
//!
//! Measures:
//! - the highest `iperf3 -u` rate with less than 1 % loss (1,400-byte datagrams),
//!   both directions, through Reachback and over the direct path (server host →
//!   connector host over veth), and their ratio;
//! - 10,000 concurrent UDP flows (one datagram and its echo each, all held open):
//!   RSS growth per flow of connector, server and agent;
//! - IPv6 against IPv4: single-stream TCP throughput (iperf3) and the highest UDP
//!   rate with < 1 % loss to a laptop bound in an IPv6 range, as ratios to the same
//!   to a laptop bound in an IPv4 range.
//!
//! REACHBACK_BENCH_UDP_FLOWS (10,000) and REACHBACK_BENCH_SECONDS (3) change the
//! sizes; REACHBACK_BENCH_PHASES (`rate`, `flows`, `ipv6`) picks what runs;
//! REACHBACK_BENCH_BINARY runs another build of `reachback`.
//!
//! The same binary, re-run inside a namespace, plays the helpers: `udp-echo` and
//! `udp-hold` (many flows at once).

use std::path::Path;
use std::time::{Duration, Instant};

use reachback_testkit::{Lab, iperf3_bits, machine_line, wait_for};
use serde_json::{Value, json};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| arg != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("udp-echo") => udp_echo(&args[1]),
        Some("udp-hold") => udp_hold(&args[1], args[2].parse().expect("count")),
        _ => orchestrate(),
    }
}

/// Echoes every datagram to its sender.
fn udp_echo(address: &str) {
    let socket = std::net::UdpSocket::bind(address).expect("udp echo bind");
    let mut buffer = [0u8; 65_536];
    while let Ok((length, from)) = socket.recv_from(&mut buffer) {
        let _ = socket.send_to(&buffer[..length], from);
    }
}

/// Opens `count` UDP flows to `target` (one socket, so one source port, each),
/// sends one datagram on each and waits for its echo; prints a JSON line with how
/// many came back, then holds the sockets until stdin closes.
fn udp_hold(target: &str, count: usize) {
    let target: std::net::SocketAddr = target.parse().expect("target");
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.set_nonblocking(true).expect("non-blocking");
        sockets.push(socket);
    }
    let started = Instant::now();
    let mut echoed = 0;
    let mut buffer = [0u8; 64];
    // in waves of 500, so the kernel's queues never overflow; each wave waits at most 3 s for its echoes
    for wave in sockets.chunks(500) {
        for socket in wave {
            let _ = socket.send_to(b"hold", target);
        }
        let mut waiting: Vec<&std::net::UdpSocket> = wave.iter().collect();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !waiting.is_empty() && Instant::now() < deadline {
            waiting.retain(|socket| socket.recv(&mut buffer).is_err());
            std::thread::sleep(Duration::from_millis(2));
        }
        echoed += wave.len() - waiting.len();
    }
    println!("{}", json!({"flows": count, "echoed": echoed, "seconds": started.elapsed().as_secs_f64()}));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

fn pid_of(lab: &Lab, name: &str) -> u32 {
    lab.children.iter().find(|(child, _)| child == name).map(|(_, child)| child.id()).expect("process")
}

/// One `iperf3 -u` run: (received bit/s, loss in percent).
fn iperf3_udp(lab: &Lab, target: &str, port: &str, rate: f64, seconds: &str, reverse: bool) -> (f64, f64) {
    let rate = format!("{:.0}", rate);
    let mut args = vec!["-c", target, "-p", port, "-u", "-b", &rate, "-l", "1400", "-t", seconds, "-J"];
    if reverse {
        args.push("-R");
    }
    let output = lab.run("srv", "iperf3", &args);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let sum = &report["end"]["sum"];
    (sum["bits_per_second"].as_f64().unwrap_or(0.0), sum["lost_percent"].as_f64().unwrap_or(100.0))
}

/// The highest offered rate whose loss stays under 1 %: doubling from 50 Mbit/s,
/// then halving the gap five times. Returns (rate, loss at that rate).
fn highest_clean_rate(lab: &Lab, target: &str, port: &str, seconds: &str, reverse: bool) -> (f64, f64) {
    let mut good = (0.0, 100.0);
    let mut bad = f64::INFINITY;
    let mut rate = 50e6;
    while rate <= 20e9 {
        let (_, loss) = iperf3_udp(lab, target, port, rate, seconds, reverse);
        if loss < 1.0 {
            good = (rate, loss);
            rate *= 2.0;
        } else {
            bad = rate;
            break;
        }
    }
    if bad.is_finite() {
        let mut low = good.0;
        let mut high = bad;
        for _ in 0..5 {
            let middle = (low + high) / 2.0;
            let (_, loss) = iperf3_udp(lab, target, port, middle, seconds, reverse);
            if loss < 1.0 {
                good = (middle, loss);
                low = middle;
            } else {
                high = middle;
            }
        }
    }
    good
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn orchestrate() {
    let bin = std::env::var_os("REACHBACK_BENCH_BINARY").map_or_else(|| Path::new(env!("CARGO_BIN_EXE_reachback")).to_path_buf(), std::path::PathBuf::from);
    let phases = std::env::var("REACHBACK_BENCH_PHASES").unwrap_or_else(|_| "rate,flows,ipv6".into());
    let phase = |name: &str| phases.split(',').any(|listed| listed.trim() == name);
    let seconds = env_number("REACHBACK_BENCH_SECONDS", 3).to_string();
    let flows = env_number("REACHBACK_BENCH_UDP_FLOWS", 10_000);
    // the helpers hold thousands of sockets; children inherit the raised limit
    let _ = std::process::Command::new("prlimit").args(["--pid", &std::process::id().to_string(), "--nofile=20000:20000"]).status();
    let mut lab = Lab::full_args(&["--metrics-listen", "0.0.0.0:9100"])(&bin);
    let me = std::env::current_exe().expect("bench binary").to_string_lossy().into_owned();
    // UDP echo on the laptop's port 53 (the lab's agent allows UDP 53 and 5201), iperf3 on the connector host for the direct path
    lab.spawn("udp-echo", "cli", &me, &["udp-echo", "127.0.0.1:53"]);
    lab.spawn("iperf3-direct", "conn", "iperf3", &["-s", "-B", "10.77.1.2", "-p", "5202"]);
    lab.wait_listening("conn", "10.77.1.2", 5202);
    std::thread::sleep(Duration::from_secs(1));
    println!("{}", machine_line());

    if phase("rate") {
        println!("\n## UDP: highest iperf3 -u rate with < 1 % loss (1,400-byte datagrams, {seconds} s per step)");
        println!("| direction | direct Mbit/s | through Reachback Mbit/s | ratio (goal ≥ 0.25) |");
        println!("|---|---|---|---|");
        for reverse in [false, true] {
            let direct = highest_clean_rate(&lab, "10.77.1.2", "5202", &seconds, reverse);
            let tunnel = highest_clean_rate(&lab, "100.64.0.1", "5201", &seconds, reverse);
            let direction = if reverse { "laptop → server (-R)" } else { "server → laptop" };
            println!(
                "| {direction} | {:.0} ({:.2} % lost) | {:.0} ({:.2} % lost) | {:.2} |",
                direct.0 / 1e6,
                direct.1,
                tunnel.0 / 1e6,
                tunnel.1,
                tunnel.0 / direct.0.max(1.0)
            );
        }
    }

    if phase("flows") {
        let (server, connector, agent) = (pid_of(&lab, "server"), pid_of(&lab, "connector"), pid_of(&lab, "agent"));
        println!("\n## {flows} concurrent UDP flows (one datagram and its echo each, all held)");
        let before = [rss_kib(server), rss_kib(connector), rss_kib(agent)];
        let count = flows.to_string();
        let mut holder = lab.command("srv", &me, &["udp-hold", "100.64.0.1:53", &count]);
        holder.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = holder.spawn().expect("udp-hold");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line).expect("line");
        let report: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        std::thread::sleep(Duration::from_secs(1));
        let after = [rss_kib(server), rss_kib(connector), rss_kib(agent)];
        let held = lab.metric("reachback_udp_flows_active");
        println!("echoed {} of {} in {:.1} s; the broker holds {held} UDP flows", report["echoed"], report["flows"], report["seconds"].as_f64().unwrap_or(0.0));
        let metrics = lab.run("srv", "curl", &["-s", "http://10.77.1.2:9100/metrics"]);
        for line in String::from_utf8_lossy(&metrics.stdout).lines().filter(|line| line.starts_with("reachback_connector_udp")) {
            println!("    {line}");
        }
        println!("| process | RSS before MiB | RSS with the flows MiB | per flow (goal < 4 KiB at the connector) |");
        println!("|---|---|---|---|");
        for (index, name) in ["server (broker)", "connector", "agent"].iter().enumerate() {
            let growth = after[index].saturating_sub(before[index]) as f64 * 1024.0 / flows as f64;
            println!("| {name} | {:.1} | {:.1} | {:.0} B |", before[index] as f64 / 1024.0, after[index] as f64 / 1024.0, growth);
        }
        drop(child.stdin.take());
        let _ = child.wait();
    }

    if phase("ipv6") {
        // a second laptop, bound in an IPv6 range by its location, with the same services
        let (status, range) = lab.api("POST", "/ip-ranges", Some(json!({"name": "v6", "range": "fd7a:115c:a1e0::/64", "location": {"country": "DE"}})));
        assert_eq!(status, 201, "{range}");
        lab.add_laptop("agent6", "laptop6.corp.example", &["--country", "DE"], &["--allow-ports", "5201", "--allow-udp-ports", "53,5201"]);
        wait_for("the IPv6 laptop", Duration::from_secs(30), || lab.api("GET", "/client-sessions", None).1["total"] == 2);
        wait_for("the IPv6 interception rules", Duration::from_secs(30), || {
            String::from_utf8_lossy(&lab.run("conn", "nft", &["list", "table", "inet", "reachback"]).stdout).contains("fd7a:115c:a1e0::/64")
        });
        println!("\n## IPv6 against IPv4 through the connector (medians of 3 runs, alternating)");
        println!("| measure | IPv4 laptop | IPv6 laptop | ratio (goal ≥ 0.9) |");
        println!("|---|---|---|---|");
        for (name, reverse) in [("TCP 1 stream, server → laptop, Gbit/s", false), ("TCP 1 stream, laptop → server, Gbit/s", true)] {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                v4.push(iperf3_bits(&lab, "100.64.0.1", "5201", &seconds, "1", reverse) / 1e9);
                v6.push(iperf3_bits(&lab, "fd7a:115c:a1e0::1", "5201", &seconds, "1", reverse) / 1e9);
            }
            let (v4, v6) = (median(v4), median(v6));
            println!("| {name} | {v4:.2} | {v6:.2} | {:.2} |", v6 / v4.max(1e-9));
        }
        let v4 = highest_clean_rate(&lab, "100.64.0.1", "5201", &seconds, false).0;
        let v6 = highest_clean_rate(&lab, "fd7a:115c:a1e0::1", "5201", &seconds, false).0;
        println!("| UDP highest rate with < 1 % loss, Mbit/s | {:.0} | {:.0} | {:.2} |", v4 / 1e6, v6 / 1e6, v6 / v4.max(1.0));
    }
}
