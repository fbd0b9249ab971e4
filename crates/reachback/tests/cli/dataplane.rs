//! The data plane end to end in network namespaces (`scripts/netns-lab`, driven
//! by `reachback-testkit`): a server host with no agent reaches services on a
//! client host by its virtual IP through the TPROXY connector, the broker and the
//! agent, with real tools on both sides (curl, OpenSSH, iperf3, Python's HTTP server).
//!
//! Gated by `REACHBACK_TEST_NETNS=1` (CI sets it); with the gate set, missing
//! privileges or tools fail the test instead of skipping it.

use std::path::Path;
use std::time::Duration;

use reachback_testkit::{Lab, iperf3_bits, wait_for};

use crate::process::BIN;

fn gate() -> bool {
    match std::env::var("REACHBACK_TEST_NETNS") {
        Ok(value) if value == "1" => true,
        _ => {
            eprintln!("skipped: set REACHBACK_TEST_NETNS=1 (root, iproute2, nftables, curl, openssh, iperf3)");
            false
        }
    }
}

#[test]
fn servers_reach_clients_by_virtual_ip_through_connector_broker_and_agent() {
    if !gate() {
        return;
    }
    let mut lab = Lab::full()(Path::new(BIN));
    let agent_key = lab.dir.0.join("agent/key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&agent_key).expect("key file").permissions());
    assert_eq!(mode & 0o777, 0o600, "the agent's private key is readable by its owner only");
    let (_, connectors) = lab.api("GET", "/connectors", None);
    assert_eq!(connectors["items"][0]["mode"], "tproxy");
    // the server ran with only --listen 0.0.0.0:8080 --tunnel-listen 0.0.0.0:8443: clients were
    // told the tunnel endpoint under the name they reached the API by, never 0.0.0.0
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lab.dir.0.join("connector/state.json")).expect("state")).expect("JSON");
    assert_eq!(saved["broker_endpoints"], serde_json::json!(["10.77.2.2:8443"]), "{saved}");
    assert!(lab.log("server").contains("Reachback API listening on https://"), "HTTPS by default on a wildcard listener");

    // enrollment over a wrong pin or plain HTTP is refused before the key is sent: no device, the key unused
    let (_, key) = lab.api("POST", "/enrollment-keys", Some(serde_json::json!({"username": "bob@corp.example"})));
    let key = key["key"].as_str().expect("key").to_string();
    let bin = lab.bin.to_string_lossy().into_owned();
    let state = lab.dir.0.join("agent2").to_string_lossy().into_owned();
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let enroll = |server: &str, pin: &str| {
        let mut args = vec!["agent", "enroll", "--server", server, "--key", &key, "--hostname", "laptop2.corp.example", "--state-dir", &state];
        if !pin.is_empty() {
            args.extend(["--ca-pin", pin]);
        }
        lab.run("cli", &bin, &args)
    };
    let refused = enroll("https://10.77.2.2:8080", &wrong_pin);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && message.contains(&wrong_pin) && message.contains(&lab.ca_pin), "a wrong pin names both pins: {message}");
    let refused = enroll("http://10.77.2.2:8080", "");
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && message.contains("plain HTTP"), "plain HTTP to another host is refused: {message}");
    assert_eq!(lab.api("GET", "/devices", None).1["total"], 1, "no device was made by the refused attempts");
    assert_eq!(lab.api("GET", "/enrollment-keys", None).1["items"].as_array().expect("keys").iter().filter(|key| key["used_count"] == 1).count(), 1);

    // curl, ssh and iperf3 from the server host to the client by virtual IP
    let (code, body, _) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_eq!((code, body.as_str()), (0, "hello from the client\n"), "curl through the tunnel; connector log:\n{}", lab.log("connector"));
    let ssh = lab.ssh("100.64.0.1", "echo reached $(cat /proc/sys/kernel/hostname)");
    assert!(ssh.status.success(), "ssh: {}\nsshd: {}", String::from_utf8_lossy(&ssh.stderr), lab.log("sshd"));
    assert!(String::from_utf8_lossy(&ssh.stdout).starts_with("reached"), "{}", String::from_utf8_lossy(&ssh.stdout));
    let upload = iperf3_bits(&lab, "100.64.0.1", "5201", "2", "1", false);
    let download = iperf3_bits(&lab, "100.64.0.1", "5201", "2", "1", true);
    assert!(upload > 1e6 && download > 1e6, "iperf3 moved data both ways: {upload} / {download} bit/s");
    assert!(lab.metric("reachback_bytes_relayed_total") > 1e6, "bytes relayed are counted");
    // the kernel's own view: both tunnels (agent's and connector's) run CUBIC, whatever the machine's default
    let tunnels = lab.run("brk", "ss", &["-Htin", "state", "established", "( sport = :8443 )"]);
    let tunnels = String::from_utf8_lossy(&tunnels.stdout).into_owned();
    assert_eq!(tunnels.matches(" cubic ").count(), 2, "two tunnels, both CUBIC:\n{tunnels}");

    // a port the agent does not allow, a port the policy denies: refused (reset)
    let failed_before = lab.metric("reachback_flows_failed_total{reason=\"port_not_allowed\"}");
    let (code, _, _) = lab.curl("http://100.64.0.1:9999/hello.txt");
    assert_ne!(code, 0, "a port outside the agent's allow-list is refused");
    assert_eq!(lab.metric("reachback_flows_failed_total{reason=\"port_not_allowed\"}"), failed_before + 1.0);
    let (code, _, _) = lab.curl("http://100.64.0.1:8001/hello.txt");
    assert_ne!(code, 0, "a port the policy denies is refused");
    assert_eq!(lab.metric("reachback_flows_denied_total"), 1.0);
    assert!(lab.log("server").contains("block 8001"), "the denial names the rule");
    let (code, _, _) = lab.curl("http://100.64.0.2:8000/hello.txt");
    assert_ne!(code, 0, "an address no agent holds is refused");

    // the client goes offline: refused within the bound; back with the same address
    lab.stop("agent", true);
    let (code, _, seconds) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_ne!(code, 0, "an offline client is refused");
    assert!(seconds < 10.0, "refused within the bound, took {seconds:.1} s");
    lab.start_agent();
    wait_for("the agent to come back", Duration::from_secs(30), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);
    assert_eq!(lab.session_ip().as_deref(), Some("100.64.0.1"), "same virtual IP after a restart");

    // the server restarts: agent and connector reconnect by themselves
    assert!(lab.stop("server", false).is_some_and(|status| status.success()), "server exits cleanly on SIGTERM");
    lab.start_server();
    wait_for("flows to work after a server restart", Duration::from_secs(60), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);

    // a second connector: the connector process restarted with its key serves as the new one
    // (the saved identity of the first is not reused), and flows go on
    let (status, second) = lab.api("POST", "/connectors", Some(serde_json::json!({"name": "second connector"})));
    assert_eq!(status, 201, "{second}");
    assert!(lab.stop("connector", false).is_some_and(|status| status.success()));
    lab.start_connector(second["provisioning_key"].as_str().expect("key"));
    wait_for("the second connector to be online", Duration::from_secs(30), || {
        let (_, connector) = lab.api("GET", &format!("/connectors/{}", second["id"].as_str().unwrap_or_default()), None);
        connector["status"] == "online"
    });
    let (_, connectors) = lab.api("GET", "/connectors", None);
    let online: Vec<&str> =
        connectors["items"].as_array().expect("items").iter().filter(|item| item["status"] == "online").filter_map(|item| item["name"].as_str()).collect();
    assert_eq!(online, ["second connector"], "{connectors}");
    let (_, left) = lab.api("GET", "/audit-logs?action=leave&resource_type=connector", None);
    assert_eq!(left["total"], 1, "the server was told the first connector's identity was discarded: {left}");
    wait_for("flows through the new connector", Duration::from_secs(30), || lab.curl("http://100.64.0.1:8000/hello.txt").0 == 0);

    // deleting the session disconnects the agent (which reconnects); deleting the device revokes it
    let (_, sessions) = lab.api("GET", "/client-sessions", None);
    let session_id = sessions["items"][0]["id"].as_str().expect("session").to_string();
    assert_eq!(lab.api("DELETE", &format!("/client-sessions/{session_id}"), None).0, 204);
    wait_for("a new session", Duration::from_secs(30), || {
        let (_, sessions) = lab.api("GET", "/client-sessions", None);
        sessions["items"][0]["id"].as_str().is_some_and(|id| id != session_id)
    });
    let (_, devices) = lab.api("GET", "/devices", None);
    let device_id = devices["items"][0]["id"].as_str().expect("device").to_string();
    assert_eq!(lab.api("DELETE", &format!("/devices/{device_id}"), None).0, 204);
    wait_for("the revoked agent to stop", Duration::from_secs(30), || {
        lab.children.iter_mut().any(|(name, child)| name == "agent" && child.try_wait().is_ok_and(|status| status.is_some()))
    });
    assert!(lab.log("agent").contains("revoked"), "the agent says why it stopped:\n{}", lab.log("agent"));
    let (code, _, _) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_ne!(code, 0);

    // the connector removes its rules on exit
    assert!(lab.run("conn", "nft", &["list", "table", "inet", "reachback"]).status.success());
    assert!(lab.stop("connector", false).is_some_and(|status| status.success()), "connector exits cleanly:\n{}", lab.log("connector"));
    assert!(!lab.run("conn", "nft", &["list", "table", "inet", "reachback"]).status.success(), "the nftables table is gone");
    let rules = String::from_utf8_lossy(&lab.run("conn", "ip", &["rule", "show"]).stdout).into_owned();
    assert!(!rules.contains("lookup 100"), "the policy-routing rule is gone: {rules}");
}
