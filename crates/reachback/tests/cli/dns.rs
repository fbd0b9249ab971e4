//! Names end to end in network namespaces: the connector answers DNS for client
//! hostnames (`--dns-listen`), a real resolver on the server host (Debian's
//! dnsmasq) forwards the client domain to it, and curl and ssh reach the laptop
//! by name; PTR for its address; a new enrollment resolves and a released binding
//! stops resolving within about a second; a segment written as `*.corp.example`
//! allows a flow and a deny rule for one name resets another.
//!
//! Gated by `REACHBACK_TEST_NETNS=1` like the data-plane test (root, dnsmasq, dig).

use std::path::Path;
use std::time::{Duration, Instant};

use reachback_testkit::{Lab, wait_for};
use serde_json::json;

use crate::process::BIN;

fn gate() -> bool {
    if std::env::var("REACHBACK_TEST_NETNS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set REACHBACK_TEST_NETNS=1 (root, iproute2, nftables, curl, dnsmasq, dig)");
    false
}

/// The server host's resolver file, bind-mounted by `ip netns exec`; removed on drop.
struct NetnsResolver(std::path::PathBuf);

impl Drop for NetnsResolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dig(lab: &Lab, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    let mut all = vec![at.as_str(), "+short", "+tries=1", "+time=2"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&lab.run("srv", "dig", &all).stdout).trim().to_string()
}

fn status(lab: &Lab, server: &str, name: &str) -> String {
    let at = format!("@{server}");
    let output = String::from_utf8_lossy(&lab.run("srv", "dig", &[at.as_str(), "+tries=1", "+time=2", name, "A"]).stdout).into_owned();
    output.lines().find_map(|line| line.split("status: ").nth(1)).map(|rest| rest.split(',').next().unwrap_or_default().to_string()).unwrap_or_default()
}

/// Polls `check` every 20 ms for up to 10 s; returns the time it took.
fn time_until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if check() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn servers_reach_laptops_by_name_through_a_conditional_forwarder() {
    if !gate() {
        return;
    }
    for tool in ["dnsmasq", "dig"] {
        let found = std::process::Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output();
        assert!(found.is_ok_and(|out| out.status.success()), "{tool} is missing: install dnsmasq-base and dnsutils");
    }
    let mut lab = Lab::full_with(&["--dns-listen", "10.77.1.2:53"], json!({"client_domains": ["corp.example"]}))(Path::new(BIN));
    let connector_dns = "10.77.1.2";
    wait_for("the connector's DNS table", Duration::from_secs(20), || lab.log("connector").contains("DNS table loaded"));
    let (_, connectors) = lab.api("GET", "/connectors", None);
    assert_eq!(connectors["items"][0]["dns_listeners"], json!(["10.77.1.2:53"]), "the connector list shows where it answers DNS: {connectors}");

    // the connector itself: A, NODATA for the other family, PTR, NXDOMAIN with the zone's SOA, REFUSED elsewhere
    assert_eq!(dig(&lab, connector_dns, &["laptop1.corp.example", "A"]), "100.64.0.1");
    assert_eq!(dig(&lab, connector_dns, &["LAPTOP1.Corp.Example", "A"]), "100.64.0.1", "case-insensitive");
    assert_eq!(status(&lab, connector_dns, "nobody.corp.example"), "NXDOMAIN");
    assert_eq!(dig(&lab, connector_dns, &["-x", "100.64.0.1"]), "laptop1.corp.example.");
    assert_eq!(status(&lab, connector_dns, "www.example.org"), "REFUSED");
    assert!(dig(&lab, connector_dns, &["corp.example", "SOA"]).starts_with("reachback-dns.corp.example. hostmaster.corp.example."));
    assert!(dig(&lab, connector_dns, &["+tcp", "laptop1.corp.example", "A"]) == "100.64.0.1", "over TCP too");

    // a real resolver on the server host forwards the client domain to the connector
    let netns_dir = Path::new("/etc/netns").join(lab.ns("srv"));
    std::fs::create_dir_all(&netns_dir).expect("/etc/netns");
    let _resolver_file = NetnsResolver(netns_dir.clone());
    std::fs::write(netns_dir.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    let forwarder = format!("--server=/corp.example/{connector_dns}");
    let reverse = format!("--server=/64.100.in-addr.arpa/{connector_dns}");
    lab.spawn(
        "dnsmasq",
        "srv",
        "dnsmasq",
        &["--keep-in-foreground", "--no-resolv", "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53", &forwarder, &reverse],
    );
    lab.wait_listening("srv", "127.0.0.1", 53);
    let (code, body, _) = lab.curl("http://laptop1.corp.example:8000/hello.txt");
    assert_eq!((code, body.as_str()), (0, "hello from the client\n"), "curl by name through dnsmasq and the connector");
    let ssh_key = lab.dir.0.join("ssh/client_key").to_string_lossy().into_owned();
    let ssh = lab.run(
        "srv",
        "ssh",
        &[
            "-i",
            &ssh_key,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "root@laptop1.corp.example",
            "echo reached",
        ],
    );
    assert!(String::from_utf8_lossy(&ssh.stdout).contains("reached"), "ssh by name: {}", String::from_utf8_lossy(&ssh.stderr));
    assert_eq!(dig(&lab, "127.0.0.1", &["-x", "100.64.0.1"]), "laptop1.corp.example.", "PTR through the resolver");

    // a second laptop enrolls: its name resolves at the connector within about a second
    let (_, key) = lab.api("POST", "/enrollment-keys", Some(json!({"username": "bob@corp.example"})));
    let public_key = String::from_utf8_lossy(
        &std::process::Command::new("sh")
            .args(["-c", "openssl genpkey -algorithm ed25519 2>/dev/null | openssl pkey -pubout"])
            .output()
            .expect("openssl")
            .stdout,
    )
    .into_owned();
    let (status_code, enrolled) = lab.api(
        "POST",
        "/enroll",
        Some(json!({"enrollment_key": key["key"], "hostname": "laptop2.corp.example", "platform": "linux", "public_key": public_key})),
    );
    assert_eq!(status_code, 201, "{enrolled}");
    let address = enrolled["virtual_ip"].as_str().expect("address").to_string();
    let took = time_until("laptop2 to resolve", || dig(&lab, connector_dns, &["laptop2.corp.example", "A"]) == address);
    eprintln!("enrollment's 201 → the name resolves at the connector: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // its binding released: NXDOMAIN within about a second
    assert_eq!(lab.api("DELETE", &format!("/ip-bindings/{address}"), None).0, 204);
    let took = time_until("laptop2 to stop resolving", || status(&lab, connector_dns, "laptop2.corp.example") == "NXDOMAIN");
    eprintln!("release → NXDOMAIN at the connector: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // names in policy: the lab segment rewritten as *.corp.example still allows port 8000;
    // the deny rule written for *.corp.example port 8001 resets that one
    let (_, segments) = lab.api("GET", "/app-segments?name=lab", None);
    let segment_id = segments["items"][0]["id"].as_str().expect("segment").to_string();
    let (status_code, patched) = lab.api("PATCH", &format!("/app-segments/{segment_id}"), Some(json!({"destinations": ["*.corp.example"]})));
    assert_eq!(status_code, 200, "{patched}");
    wait_for("the pattern to allow the flow", Duration::from_secs(10), || lab.curl("http://laptop1.corp.example:8000/hello.txt").0 == 0);
    let (code, _, _) = lab.curl("http://laptop1.corp.example:8001/hello.txt");
    assert_ne!(code, 0, "the deny rule for *.corp.example port 8001 resets the flow");
    lab.stop("dnsmasq", false);
}
