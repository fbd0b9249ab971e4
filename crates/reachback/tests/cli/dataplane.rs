//! The data plane end to end in network namespaces (`scripts/netns-lab`): a
//! server host with no agent reaches services on a client host by its virtual IP
//! through the TPROXY connector, the broker and the agent, with real tools on
//! both sides (curl, OpenSSH, iperf3, Python's HTTP server).
//!
//! Gated by `REACHBACK_TEST_NETNS=1` (CI sets it); with the gate set, missing
//! privileges or tools fail the test instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{BIN, TOKEN, TempDir};

fn gate() -> bool {
    match std::env::var("REACHBACK_TEST_NETNS") {
        Ok(value) if value == "1" => true,
        _ => {
            eprintln!("skipped: set REACHBACK_TEST_NETNS=1 (root, iproute2, nftables, curl, openssh, iperf3)");
            false
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns-lab")
}

/// The namespaces and every process started in them; all torn down on drop.
struct Lab {
    prefix: String,
    dir: TempDir,
    children: Vec<(String, Child)>,
}

impl Lab {
    fn up() -> Lab {
        for tool in ["ip", "nft", "curl", "ssh", "sshd", "ssh-keygen", "iperf3", "python3"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output().is_ok_and(|out| out.status.success());
            assert!(found, "{tool} is missing: install nftables iproute2 curl openssh-client openssh-server iperf3 python3");
        }
        let prefix = format!("rb{}", std::process::id() % 100_000);
        let status = Command::new(script()).args(["up", &prefix]).status().expect("netns-lab runs");
        assert!(status.success(), "scripts/netns-lab up failed (root needed)");
        Lab { prefix, dir: TempDir::new(), children: Vec::new() }
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn command(&self, host: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host), program]).args(args);
        command
    }

    fn run(&self, host: &str, program: &str, args: &[&str]) -> Output {
        self.command(host, program, args).output().expect("command runs")
    }

    /// Starts a long-running process in a namespace, its output in `<name>.log`.
    fn spawn(&mut self, name: &str, host: &str, program: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.0.join(format!("{name}.log"))).expect("log file");
        let child = self
            .command(host, program, args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name}: {error}"));
        self.children.push((name.to_string(), child));
    }

    /// Stops a process: SIGTERM (clean exit expected) or SIGKILL.
    fn stop(&mut self, name: &str, kill: bool) -> Option<std::process::ExitStatus> {
        let index = self.children.iter().position(|(child_name, _)| child_name == name)?;
        let (_, mut child) = self.children.remove(index);
        let signal = if kill { "-KILL" } else { "-TERM" };
        let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
        child.wait().ok()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("http://127.0.0.1:8080/api/v1{path}");
        let authorization = format!("Authorization: Bearer {TOKEN}");
        let mut args = vec!["-s", "-m", "10", "-w", "\n%{http_code}", "-X", method, "-H", &authorization, "-H", "Content-Type: application/json", &url];
        let text;
        if let Some(body) = &body {
            text = body.to_string();
            args.extend(["-d", &text]);
        }
        let output = self.run("brk", "curl", &args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn metric(&self, name: &str) -> f64 {
        let output = self.run("brk", "curl", &["-s", "http://127.0.0.1:8080/metrics"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn start_server(&mut self) {
        let data = self.dir.0.join("server");
        let data = data.to_string_lossy().into_owned();
        self.spawn(
            "server",
            "brk",
            BIN,
            &["server", "--listen", "0.0.0.0:8080", "--tunnel-listen", "0.0.0.0:8443", "--broker-endpoints", "10.77.2.2:8443", "--data-dir", &data, "--bootstrap-token", TOKEN, "--node-name", "lab-broker", "--flow-idle-timeout", "30"],
        );
        wait_for("the server to answer", Duration::from_secs(30), || self.api("GET", "/me", None).0 == 200);
    }

    fn start_agent(&mut self) {
        let state = self.dir.0.join("agent").to_string_lossy().into_owned();
        self.spawn("agent", "cli", BIN, &["agent", "run", "--allow-ports", "22,8000,8001,5201", "--state-dir", &state]);
    }

    /// `curl` from the server host; returns (exit code, body, seconds taken).
    fn curl(&self, url: &str) -> (i32, String, f64) {
        let started = Instant::now();
        let output = self.run("srv", "curl", &["-sS", "-m", "20", url]);
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), started.elapsed().as_secs_f64())
    }

    fn session_ip(&self) -> Option<String> {
        let (_, sessions) = self.api("GET", "/client-sessions", None);
        sessions["items"][0]["virtual_ip"].as_str().map(str::to_string)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(script()).args(["down", &self.prefix]).status();
    }
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn iperf3_bits(lab: &Lab, reverse: bool) -> f64 {
    let mut args = vec!["-c", "100.64.0.1", "-p", "5201", "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let output = lab.run("srv", "iperf3", &args);
    assert!(output.status.success(), "iperf3 {args:?} failed: {}", String::from_utf8_lossy(&output.stdout));
    let report: Value = serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"].as_f64().expect("bits per second")
}

#[test]
fn servers_reach_clients_by_virtual_ip_through_connector_broker_and_agent() {
    if !gate() {
        return;
    }
    let mut lab = Lab::up();
    lab.start_server();

    // control plane: a range, an enrollment key, a connector, a segment and policies
    let (status, _) = lab.api("POST", "/ip-ranges", Some(json!({"name": "Lab laptops", "range": "100.64.0.0/16"})));
    assert_eq!(status, 201);
    let (_, key) = lab.api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example", "reusable": false})));
    let (status, connector) = lab.api("POST", "/connectors", Some(json!({"name": "lab connector"})));
    assert_eq!(status, 201, "{connector}");
    let (_, lab_segment) = lab.api("POST", "/app-segments", Some(json!({"name": "lab services", "destinations": ["100.64.0.0/10"], "tcp_ports": ["22", "8000", "5201", "9999"]})));
    let (_, denied_segment) = lab.api("POST", "/app-segments", Some(json!({"name": "blocked", "destinations": ["*.corp.example"], "tcp_ports": ["8001"]})));
    let (status, _) = lab.api("POST", "/access-policies", Some(json!({"name": "block 8001", "order": 1, "action": "deny", "segment_ids": [denied_segment["id"]]})));
    assert_eq!(status, 201);
    let (status, _) = lab.api("POST", "/access-policies", Some(json!({"name": "lab", "order": 2, "action": "allow", "segment_ids": [lab_segment["id"]], "usernames": ["alice@corp.example"]})));
    assert_eq!(status, 201);

    // services on the client host, on its loopback only
    let www = lab.dir.0.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello from the client\n").expect("file");
    let www_text = www.to_string_lossy().into_owned();
    lab.spawn("http", "cli", "python3", &["-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", &www_text]);
    lab.spawn("http-8001", "cli", "python3", &["-m", "http.server", "8001", "--bind", "127.0.0.1", "--directory", &www_text]);
    lab.spawn("http-9999", "cli", "python3", &["-m", "http.server", "9999", "--bind", "127.0.0.1", "--directory", &www_text]);
    lab.spawn("iperf3", "cli", "iperf3", &["-s", "-B", "127.0.0.1", "-p", "5201"]);
    let ssh_dir = lab.dir.0.join("ssh");
    std::fs::create_dir_all(&ssh_dir).expect("ssh dir");
    let ssh_text = ssh_dir.to_string_lossy().into_owned();
    for (file, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
        let status = Command::new("ssh-keygen").args(["-q", "-t", kind, "-N", "", "-f", &format!("{ssh_text}/{file}")]).status().expect("ssh-keygen");
        assert!(status.success());
    }
    std::fs::copy(ssh_dir.join("client_key.pub"), ssh_dir.join("authorized_keys")).expect("authorized_keys");
    std::fs::write(
        ssh_dir.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1:22\nHostKey {ssh_text}/host_key\nAuthorizedKeysFile {ssh_text}/authorized_keys\nPidFile {ssh_text}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        ),
    )
    .expect("sshd_config");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    lab.spawn("sshd", "cli", "/usr/sbin/sshd", &["-D", "-e", "-f", &format!("{ssh_text}/sshd_config")]);

    // the agent enrolls and runs on the client host, the connector on its host
    let agent_state = lab.dir.0.join("agent").to_string_lossy().into_owned();
    let key_text = key["key"].as_str().expect("key").to_string();
    let enrolled = lab.run("cli", BIN, &["agent", "enroll", "--server", "http://10.77.2.2:8080", "--key", &key_text, "--hostname", "laptop1.corp.example", "--state-dir", &agent_state]);
    assert!(enrolled.status.success(), "agent enroll: {}", String::from_utf8_lossy(&enrolled.stderr));
    assert!(String::from_utf8_lossy(&enrolled.stdout).contains("virtual IP 100.64.0.1"), "{}", String::from_utf8_lossy(&enrolled.stdout));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(Path::new(&agent_state).join("key.pem")).expect("key file").permissions());
    assert_eq!(mode & 0o777, 0o600, "the agent's private key is readable by its owner only");
    lab.start_agent();
    let connector_state = lab.dir.0.join("connector").to_string_lossy().into_owned();
    let provisioning_key = connector["provisioning_key"].as_str().expect("provisioning key").to_string();
    let connector_args = ["connector", "run", "--server", "http://10.77.2.2:8080", "--key", &provisioning_key, "--mode", "tproxy", "--state-dir", &connector_state];
    lab.spawn("connector", "conn", BIN, &connector_args);
    wait_for("the agent's session", Duration::from_secs(20), || lab.session_ip().as_deref() == Some("100.64.0.1"));
    wait_for("the connector to be online", Duration::from_secs(20), || lab.api("GET", "/connectors", None).1["items"][0]["status"] == "online");
    let (_, connectors) = lab.api("GET", "/connectors", None);
    assert_eq!(connectors["items"][0]["mode"], "tproxy");

    // curl, ssh and iperf3 from the server host to the client by virtual IP
    let (code, body, _) = lab.curl("http://100.64.0.1:8000/hello.txt");
    assert_eq!((code, body.as_str()), (0, "hello from the client\n"), "curl through the tunnel; connector log:\n{}", lab.log("connector"));
    let client_key = format!("{ssh_text}/client_key");
    let ssh = lab.run("srv", "ssh", &["-i", &client_key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@100.64.0.1", "echo reached $(cat /proc/sys/kernel/hostname)"]);
    assert!(ssh.status.success(), "ssh: {}\nsshd: {}", String::from_utf8_lossy(&ssh.stderr), lab.log("sshd"));
    assert!(String::from_utf8_lossy(&ssh.stdout).starts_with("reached"), "{}", String::from_utf8_lossy(&ssh.stdout));
    let upload = iperf3_bits(&lab, false);
    let download = iperf3_bits(&lab, true);
    assert!(upload > 1e6 && download > 1e6, "iperf3 moved data both ways: {upload} / {download} bit/s");
    assert!(lab.metric("reachback_bytes_relayed_total") > 1e6, "bytes relayed are counted");

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
    wait_for("the revoked agent to stop", Duration::from_secs(30), || lab.children.iter_mut().any(|(name, child)| name == "agent" && child.try_wait().is_ok_and(|status| status.is_some())));
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
