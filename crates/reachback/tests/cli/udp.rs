//! UDP flows and IPv6 virtual addresses end to end in network namespaces, through
//! the TPROXY connector: from the server host (no agent), `dig` to a DNS server on
//! the laptop's loopback, `iperf3 -u` both ways, refused UDP ports dropped and
//! counted at the broker and the connector; a second laptop bound in an IPv6
//! range reached by TCP (curl) and UDP (dig) while the IPv4 one still answers.
//!
//! Gated by `REACHBACK_TEST_NETNS=1` (CI sets it).

use std::path::Path;
use std::time::Duration;

use reachback_testkit::{Lab, wait_for};
use serde_json::{Value, json};

use crate::process::BIN;

fn gate() -> bool {
    if std::env::var("REACHBACK_TEST_NETNS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set REACHBACK_TEST_NETNS=1 (root, iproute2, nftables, curl, iperf3, dnsmasq, dig)");
    false
}

/// `dig +short` from the server host to a DNS server at `server` (a virtual IP).
fn dig(lab: &Lab, server: &str, name: &str) -> String {
    let at = format!("@{server}");
    let output = lab.run("srv", "dig", &[&at, name, "A", "+short", "+time=2", "+tries=3"]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Sends a datagram from the server host, from source port `source_port` (one pair per port).
fn send_datagram(lab: &Lab, address: &str, port: u16, source_port: u16) {
    let family = if address.contains(':') { "AF_INET6" } else { "AF_INET" };
    let script = format!(
        "import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', {source_port})); s.sendto(b'probe', ('{address}', {port}))"
    );
    let output = lab.run("srv", "python3", &["-c", &script]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// One metric of the connector (`--metrics-listen 0.0.0.0:9100`), summed over its label sets.
fn connector_metric(lab: &Lab, name: &str) -> f64 {
    let output = lab.run("srv", "curl", &["-s", "http://10.77.1.2:9100/metrics"]);
    String::from_utf8_lossy(&output.stdout).lines().filter(|line| line.starts_with(name)).filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Bits per second the receiving side of an `iperf3 -u` run saw, and its loss in percent.
fn iperf3_udp(lab: &Lab, target: &str, reverse: bool) -> (f64, f64) {
    let mut args = vec!["-c", target, "-p", "5201", "-u", "-b", "200M", "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let output = lab.run("srv", "iperf3", &args);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let sum = &report["end"]["sum"];
    (sum["bits_per_second"].as_f64().unwrap_or(0.0), sum["lost_percent"].as_f64().unwrap_or(100.0))
}

#[test]
fn udp_flows_and_ipv6_addresses_reach_laptops_through_tproxy() {
    if !gate() {
        return;
    }
    let mut lab = Lab::full_args(&["--metrics-listen", "0.0.0.0:9100"])(Path::new(BIN));
    // a DNS server on the laptop's loopback (the agent allows UDP 53)
    lab.start_laptop_dns();

    // dig from the server host to the laptop's virtual IP: a UDP exchange through connector, broker and agent
    assert_eq!(
        dig(&lab, "100.64.0.1", "service.laptop.test"),
        "192.0.2.7",
        "connector log:\n{}\nagent log:\n{}\nserver log:\n{}",
        lab.log("connector"),
        lab.log("agent"),
        lab.log("server")
    );
    assert_eq!(lab.metric("reachback_udp_flows_opened_total"), 1.0, "the broker counted one UDP flow");
    // a second query from another source port is a flow of its own
    assert_eq!(dig(&lab, "100.64.0.1", "service.laptop.test"), "192.0.2.7");
    assert!(lab.metric("reachback_udp_flows_opened_total") >= 2.0);
    assert!(connector_metric(&lab, "reachback_connector_udp_datagrams_total{direction=\"to_server\"}") >= 2.0, "the connector counts replies");

    // a burst of new flows to one address and port: each of 400 sockets gets its own answer (a
    // datagram that lands on another new flow's socket before that socket is connected is handed on)
    let output = lab.run("srv", "python3", &["-c", BURST_OF_FLOWS]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "400 of 400, 0 answers to another socket's query",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // iperf3 -u both ways (its control connection is TCP 5201, its data UDP 5201)
    let (upload, upload_loss) = iperf3_udp(&lab, "100.64.0.1", false);
    let (download, download_loss) = iperf3_udp(&lab, "100.64.0.1", true);
    assert!(upload > 1e6 && download > 1e6, "iperf3 -u moved data both ways: {upload} / {download} bit/s");
    eprintln!(
        "iperf3 -u at 200 Mbit/s offered: up {:.0} Mbit/s ({upload_loss:.1} % lost), down {:.0} Mbit/s ({download_loss:.1} % lost)",
        upload / 1e6,
        download / 1e6
    );

    // a UDP port outside every segment: denied at the broker, its datagrams dropped and counted at the connector
    let denied_before = lab.metric("reachback_udp_flows_denied_total");
    send_datagram(&lab, "100.64.0.1", 7010, 40_000);
    wait_for("the broker to deny the UDP flow", Duration::from_secs(10), || lab.metric("reachback_udp_flows_denied_total") == denied_before + 1.0);
    send_datagram(&lab, "100.64.0.1", 7010, 40_000);
    wait_for("the connector to drop the refused pair's datagram", Duration::from_secs(10), || {
        connector_metric(&lab, "reachback_connector_udp_datagrams_dropped_total{reason=\"refused\"}") >= 1.0
    });
    assert_eq!(lab.metric("reachback_udp_flows_denied_total"), denied_before + 1.0, "a refused pair is not asked about again at once");
    // a port in the segment that the agent's own allow-list lacks
    send_datagram(&lab, "100.64.0.1", 7009, 40_001);
    wait_for("the agent to refuse the port", Duration::from_secs(10), || lab.metric("reachback_udp_flows_failed_total{reason=\"port_not_allowed\"}") == 1.0);
    // the TCP path is untouched
    assert_eq!(lab.curl("http://100.64.0.1:8000/hello.txt").0, 0);

    // a second laptop in an IPv6 range (its location picks the range)
    let (status, range) = lab.api("POST", "/ip-ranges", Some(json!({"name": "Lab laptops v6", "range": "fd7a:115c:a1e0::/64", "location": {"country": "DE"}})));
    assert_eq!(status, 201, "{range}");
    wait_for("the connector to route the IPv6 range", Duration::from_secs(20), || {
        String::from_utf8_lossy(&lab.run("conn", "nft", &["list", "table", "inet", "reachback"]).stdout).contains("fd7a:115c:a1e0::/64")
    });
    let printed = lab.add_laptop("agent6", "laptop6.corp.example", &["--country", "DE"], &["--allow-ports", "8000", "--allow-udp-ports", "53"]);
    assert!(printed.contains("fd7a:115c:a1e0::1"), "bound in the IPv6 range: {printed}");
    let bin = lab.bin.to_string_lossy().into_owned();
    wait_for("the IPv6 laptop's session", Duration::from_secs(20), || lab.api("GET", "/client-sessions", None).1["total"] == 2);
    let (code, body, _) = lab.curl("http://[fd7a:115c:a1e0::1]:8000/hello.txt");
    assert_eq!((code, body.as_str()), (0, "hello from the client\n"), "curl over IPv6; connector log:\n{}", lab.log("connector"));
    assert_eq!(dig(&lab, "fd7a:115c:a1e0::1", "service.laptop.test"), "192.0.2.7", "a UDP exchange over IPv6");
    // both families at once
    assert_eq!(lab.curl("http://100.64.0.1:8000/hello.txt").0, 0);
    assert_eq!(dig(&lab, "100.64.0.1", "service.laptop.test"), "192.0.2.7");

    // the SOCKS5 mode too: a second connector on the connector host, TCP (CONNECT) and UDP (UDP ASSOCIATE) to the IPv6 laptop
    let (status, socks_connector) = lab.api("POST", "/connectors", Some(json!({"name": "socks connector"})));
    assert_eq!(status, 201, "{socks_connector}");
    let socks_key = socks_connector["provisioning_key"].as_str().expect("key").to_string();
    let socks_state = lab.dir.0.join("connector-socks").to_string_lossy().into_owned();
    let pin = lab.ca_pin.clone();
    lab.spawn(
        "connector-socks",
        "conn",
        &bin,
        &["connector", "run", "--server", "https://10.77.2.2:8080", "--key", &socks_key, "--ca-pin", &pin, "--mode", "socks5", "--state-dir", &socks_state],
    );
    lab.wait_listening("conn", "127.0.0.1", 1080);
    let over_socks = || {
        let output = lab.run("conn", "curl", &["-sS", "-m", "10", "--socks5", "127.0.0.1:1080", "http://[fd7a:115c:a1e0::1]:8000/hello.txt"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    wait_for("curl over SOCKS5 to the IPv6 laptop", Duration::from_secs(20), || over_socks() == "hello from the client\n");
    let output = lab.run("conn", "python3", &["-c", SOCKS_UDP_DNS]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "192.0.2.7",
        "UDP ASSOCIATE to the IPv6 laptop's DNS: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// 400 sockets each ask the laptop's DNS server (through its virtual IP) with
/// their own query id, all at once, asking again after a second without an answer
/// (the DNS server's own socket may overflow in such a burst); prints how many got
/// the answer to their own query and how many got another socket's answer.
const BURST_OF_FLOWS: &str = r#"
import select, socket, struct, time
name = b"".join(bytes([len(p)]) + p for p in [b"service", b"laptop", b"test"]) + b"\x00"
query = lambda i: struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
sockets = {}
for i in range(400):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    s.sendto(query(i), ("100.64.0.1", 53))
    sockets[s] = i
right, wrong = set(), 0
deadline, resend = time.time() + 15, time.time() + 1
while len(right) < 400 and time.time() < deadline:
    readable, _, _ = select.select(list(sockets), [], [], 0.2)
    for s in readable:
        answer = s.recv(2048)
        if struct.unpack(">H", answer[:2])[0] == sockets[s] and answer[-4:] == bytes([192, 0, 2, 7]):
            right.add(sockets[s])
        else:
            wrong += 1
    if time.time() > resend:
        for s, i in sockets.items():
            if i not in right:
                s.sendto(query(i), ("100.64.0.1", 53))
        resend = time.time() + 1
print(f"{len(right)} of 400, {wrong} answers to another socket's query")
"#;

/// A SOCKS5 UDP ASSOCIATE client asking the laptop's DNS server (on the IPv6
/// virtual address, port 53) for `service.laptop.test`; prints the A record.
const SOCKS_UDP_DNS: &str = r#"
import ipaddress, socket, struct
control = socket.create_connection(("127.0.0.1", 1080), timeout=5)
control.sendall(b"\x05\x01\x00"); assert control.recv(2) == b"\x05\x00"
control.sendall(b"\x05\x03\x00\x01" + bytes(6))
reply = control.recv(10); assert reply[:4] == b"\x05\x00\x00\x01", reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0])
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(p)]) + p for p in [b"service", b"laptop", b"test"]) + b"\x00" + struct.pack(">HH", 1, 1)
target = ipaddress.IPv6Address("fd7a:115c:a1e0::1").packed
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.settimeout(5)
udp.sendto(b"\x00\x00\x00\x04" + target + struct.pack(">H", 53) + query, relay)
answer = udp.recv(2048)
assert answer[:4] == b"\x00\x00\x00\x04" and answer[4:20] == target, answer[:22]
print(socket.inet_ntoa(answer[22:][-4:]))
"#;
