//! The connector's TUN mode end to end in network namespaces (`scripts/netns-lab`):
//! the server host reaches the client host's services by virtual IP through the
//! connector's own TUN device and userspace TCP/IP stack, the broker and the agent,
//! with real curl, OpenSSH and iperf3; refusals fail the server's connect itself
//! (ECONNREFUSED); half-close travels both ways; UDP (dig, iperf3 -u); IPv6;
//! restarts; clean exit.
//!
//! Gated by `REACHBACK_TEST_NETNS=1` (CI sets it); with the gate set, missing
//! privileges or tools fail the test instead of skipping it.

use std::path::Path;
use std::time::{Duration, Instant};

use reachback_testkit::{Lab, iperf3_bits, wait_for};
use serde_json::json;

use crate::process::BIN;

fn gate() -> bool {
    match std::env::var("REACHBACK_TEST_NETNS") {
        Ok(value) if value == "1" => true,
        _ => {
            eprintln!("skipped: set REACHBACK_TEST_NETNS=1 (root, iproute2, curl, openssh, iperf3)");
            false
        }
    }
}

/// A plain TCP connect from the server host: "connected", "refused", or what else happened.
fn connect(lab: &Lab, address: &str, port: u16) -> (String, f64) {
    let family = if address.contains(':') { "AF_INET6" } else { "AF_INET" };
    let script = format!(
        "import socket\ns = socket.socket(socket.{family}, socket.SOCK_STREAM)\ns.settimeout(20)\ntry:\n    s.connect(('{address}', {port}))\n    print('connected')\nexcept ConnectionRefusedError:\n    print('refused')\nexcept Exception as error:\n    print(type(error).__name__)\n"
    );
    let started = Instant::now();
    let output = lab.run("srv", "python3", &["-c", &script]);
    (String::from_utf8_lossy(&output.stdout).trim().to_string(), started.elapsed().as_secs_f64())
}

/// The service on the client host for half-close: after the mode byte `A` it reads
/// to the client's FIN, then answers (500,000 bytes after a count line) and closes;
/// after `B` it sends `hello`, closes its sending half, reads to the client's FIN
/// and prints how many bytes came after its own FIN.
const HALF_CLOSE_SERVICE: &str = r#"
import socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(('127.0.0.1', 7000))
listener.listen(16)
def serve(connection):
    mode = connection.recv(1)
    received = 0
    if mode == b'A':
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += len(chunk)
        connection.sendall(b'got %d bytes\n' % received + b'z' * 500000)
    elif mode == b'B':
        connection.sendall(b'hello')
        connection.shutdown(socket.SHUT_WR)
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += len(chunk)
        print('after my FIN: %d bytes' % received, flush=True)
while True:
    connection, _ = listener.accept()
    try:
        serve(connection)
    except OSError as error:
        print('connection failed:', error, flush=True)
    connection.close()
"#;

/// The server host's side of both half-closes; prints what it saw.
const HALF_CLOSE_CLIENT: &str = r#"
import socket, sys
def read_all(connection):
    data = b''
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
first = socket.create_connection(('100.64.0.1', 7000), timeout=20)
first.sendall(b'A' + b'q' * 300000)
first.shutdown(socket.SHUT_WR)
answer = read_all(first)
line, _, rest = answer.partition(b'\n')
print(line.decode(), len(rest))
second = socket.create_connection(('100.64.0.1', 7000), timeout=20)
second.sendall(b'B')
print('greeting', read_all(second).decode())
second.sendall(b'w' * 200000)
second.shutdown(socket.SHUT_WR)
print('end', len(read_all(second)))
"#;

#[test]
fn tun_mode_relays_curl_ssh_iperf3_and_refuses_at_connect() {
    if !gate() {
        return;
    }
    let mut lab = Lab::full_args(&["--mode", "tun", "--metrics-listen", "0.0.0.0:9100"])(Path::new(BIN));
    let (_, connectors) = lab.api("GET", "/connectors", None);
    assert_eq!(connectors["items"][0]["mode"], "tun", "{connectors}");
    let routes = String::from_utf8_lossy(&lab.run("conn", "ip", &["route", "show", "dev", "reachback0"]).stdout).into_owned();
    assert!(routes.contains("100.64.0.0/16"), "the range is routed into the device: {routes}");
    assert!(!lab.run("conn", "nft", &["list", "tables"]).stdout.windows(9).any(|window| window == b"reachback"), "no nftables in TUN mode");

    // curl, ssh and iperf3 (both ways) from the server host by virtual IP
    let (code, body, _) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_eq!((code, body.as_str()), (0, "hello from the client\n"), "curl through the TUN connector; connector log:\n{}", lab.log("connector"));
    let ssh = lab.ssh("100.64.0.1", "echo reached $(cat /proc/sys/kernel/hostname)");
    assert!(ssh.status.success(), "ssh: {}\nconnector: {}", String::from_utf8_lossy(&ssh.stderr), lab.log("connector"));
    assert!(String::from_utf8_lossy(&ssh.stdout).starts_with("reached"), "{}", String::from_utf8_lossy(&ssh.stdout));
    let upload = iperf3_bits(&lab, "100.64.0.1", "5201", "2", "1", false);
    let download = iperf3_bits(&lab, "100.64.0.1", "5201", "2", "1", true);
    assert!(upload > 1e7 && download > 1e7, "iperf3 moved data both ways: {upload} / {download} bit/s");

    // refusals fail the connect itself: curl's "could not connect" (7), ECONNREFUSED for a plain connect
    for (what, url) in [
        ("a port the agent does not allow", "http://100.64.0.1:9999/hello.txt"),
        ("a port the policy denies", "http://100.64.0.1:8001/hello.txt"),
        ("an address no agent holds", "http://100.64.0.2:8000/hello.txt"),
    ] {
        let (code, _, seconds) = lab.curl(url);
        assert_eq!(code, 7, "{what}: curl cannot connect");
        assert!(seconds < 10.0, "{what}: refused in {seconds:.1} s");
    }
    let (outcome, _) = connect(&lab, "100.64.0.1", 9999);
    assert_eq!(outcome, "refused", "ECONNREFUSED at connect for a port the agent does not allow");
    assert!(lab.log("server").contains("block 8001"), "the denial names the rule");
    assert_eq!(connect(&lab, "100.64.0.1", 8000).0, "connected", "an allowed port connects");

    // half-close both ways: the server's FIN travels while the answer still comes, and the client's FIN
    // travels while the server still sends
    lab.spawn("halfclose", "cli", "python3", &["-u", "-c", HALF_CLOSE_SERVICE]);
    lab.wait_listening("cli", "127.0.0.1", 7000);
    let half = lab.run("srv", "python3", &["-c", HALF_CLOSE_CLIENT]);
    let printed = String::from_utf8_lossy(&half.stdout).into_owned();
    assert!(half.status.success(), "half-close client: {printed}{}\nconnector: {}", String::from_utf8_lossy(&half.stderr), lab.log("connector"));
    assert_eq!(printed, "got 300000 bytes 500000\ngreeting hello\nend 0\n", "the answer after the server's FIN arrived whole");
    wait_for("the service to count what came after its FIN", Duration::from_secs(10), || lab.log("halfclose").contains("after my FIN: 200000 bytes"));

    // a packet of another protocol is dropped (and counted at exit), nothing breaks
    let icmp = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\ns.sendto(b'\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00', ('100.64.0.1', 0))\n";
    assert!(lab.run("srv", "python3", &["-c", icmp]).status.success());
    let connector_metric = |name: &str| {
        let output = lab.run("srv", "curl", &["-s", "http://10.77.1.2:9100/metrics"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    wait_for("the dropped packet in the connector's metrics", Duration::from_secs(10), || {
        connector_metric("reachback_connector_tun_packets_dropped_total{reason=\"protocol\"}") == 1.0
    });
    assert!(connector_metric("reachback_connector_tun_flows_total{result=\"refused\"}") >= 4.0, "the refusals are counted");
    assert!(connector_metric("reachback_connector_tun_flows_total{result=\"accepted\"}") >= 5.0, "the accepted flows are counted");

    // UDP: datagrams to the virtual address become UDP flows, the replies are packets built here
    lab.start_laptop_dns();
    let dig = |server: &str| {
        let at = format!("@{server}");
        let output = lab.run("srv", "dig", &[&at, "service.laptop.test", "A", "+short", "+time=2", "+tries=3"]);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    wait_for("a DNS answer from the laptop over UDP", Duration::from_secs(20), || dig("100.64.0.1") == "192.0.2.7");
    for reverse in [false, true] {
        let mut args = vec!["-c", "100.64.0.1", "-p", "5201", "-u", "-b", "100M", "-t", "2", "-J"];
        if reverse {
            args.push("-R");
        }
        let output = lab.run("srv", "iperf3", &args);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        let (bits, lost) = (report["end"]["sum"]["bits_per_second"].as_f64().unwrap_or(0.0), report["end"]["sum"]["lost_percent"].as_f64().unwrap_or(100.0));
        assert!(bits > 5e7 && lost < 5.0, "iperf3 -u (reverse: {reverse}): {bits} bit/s, {lost} % lost");
    }

    // IPv6: a second laptop with an address from an IPv6 range, reached over IPv6 from the server host
    // (the lab links the server host and the connector over IPv6 too; the connector forwards into its device)
    assert!(lab.run("conn", "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]).status.success());
    let (status, range) = lab.api("POST", "/ip-ranges", Some(json!({"name": "Lab laptops v6", "range": "fd7a:115c:a1e0::/64"})));
    assert_eq!(status, 201, "{range}");
    let said = lab.add_laptop("agent6", "laptop6.corp.example", &[], &["--allow-ports", "8000", "--allow-udp-ports", "53"]);
    assert!(said.contains("fd7a:115c:a1e0::1"), "{said}");
    wait_for("the IPv6 range routed into the device", Duration::from_secs(20), || {
        String::from_utf8_lossy(&lab.run("conn", "ip", &["-6", "route", "show", "dev", "reachback0"]).stdout).contains("fd7a:115c:a1e0::/64")
    });
    let url6 = "http://[fd7a:115c:a1e0::1]:8000/hello.txt";
    let curl6 = || {
        let output = lab.run("srv", "curl", &["-sS", "-g", "-m", "20", url6]);
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    wait_for("curl over IPv6", Duration::from_secs(30), || curl6().0 == 0);
    assert_eq!(curl6(), (0, "hello from the client\n".to_string()));
    assert_eq!(connect(&lab, "fd7a:115c:a1e0::1", 22).0, "refused", "over IPv6 too a port the agent does not allow is refused at connect");
    // and UDP over IPv6: the reply is an IPv6 packet built here
    let dig6 = lab.run("srv", "dig", &["@fd7a:115c:a1e0::1", "service.laptop.test", "A", "+short", "+time=2", "+tries=3"]);
    assert_eq!(String::from_utf8_lossy(&dig6.stdout).trim(), "192.0.2.7", "a UDP exchange with the IPv6 laptop in TUN mode");

    // the client goes offline: refused at connect within the bound; back with the same address
    lab.stop("agent", true);
    let (code, _, seconds) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_eq!(code, 7, "an offline client is refused at connect");
    assert!(seconds < 10.0, "refused within the bound, took {seconds:.1} s");
    lab.start_agent();
    wait_for("the agent to come back", Duration::from_secs(30), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);

    // the server restarts: agent and connector reconnect by themselves; with no tunnel a connect is refused
    assert!(lab.stop("server", false).is_some_and(|status| status.success()), "server exits cleanly on SIGTERM");
    wait_for("the connector to see the tunnel gone", Duration::from_secs(30), || connect(&lab, "100.64.0.1", 8000).0 == "refused");
    lab.start_server();
    wait_for("flows to work after a server restart", Duration::from_secs(60), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);

    // the connector removes its routes and its device on exit
    assert!(lab.run("conn", "ip", &["link", "show", "reachback0"]).status.success());
    assert!(lab.stop("connector", false).is_some_and(|status| status.success()), "connector exits cleanly:\n{}", lab.log("connector"));
    let log = lab.log("connector");
    assert!(log.contains("TUN routes removed"), "{log}");
    assert!(log.contains("dropped_protocol=1"), "the ICMP packet was counted: {log}");
    assert!(!log.contains("udp_out=0"), "UDP replies went out as packets: {log}");
    assert!(!lab.run("conn", "ip", &["link", "show", "reachback0"]).status.success(), "the TUN device is gone");
    let routes = String::from_utf8_lossy(&lab.run("conn", "ip", &["route", "show"]).stdout).into_owned()
        + &String::from_utf8_lossy(&lab.run("conn", "ip", &["-6", "route", "show"]).stdout);
    assert!(!routes.contains("100.64.0.0/16") && !routes.contains("fd7a:115c:a1e0::/64"), "the routes are gone: {routes}");
    let (code, _, _) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_ne!(code, 0);
}
