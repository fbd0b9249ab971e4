//! Test fixtures shared by the end-to-end tests and the data-plane benchmark.
//!
//! [`Lab`] builds the network namespaces of `scripts/netns-lab` (server host,
//! connector host, broker host, client host), runs `reachback server`, the
//! connector, the agent and real services in them, and tears everything down
//! when dropped. Needs root, iproute2, nftables, curl, OpenSSH and iperf3.

#![allow(clippy::unwrap_used)]

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}_{}_{}", std::process::id(), nanos % 1_000_000_000));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns-lab")
}

/// The namespaces and every process started in them; all torn down on drop.
pub struct Lab {
    pub prefix: String,
    pub dir: TempDir,
    pub children: Vec<(String, Child)>,
    /// the `reachback` binary
    pub bin: PathBuf,
    /// the bootstrap API key the server generated (read from its data directory)
    pub token: String,
    /// the CA pin the server printed at start
    pub ca_pin: String,
}

impl Lab {
    pub fn up(bin: &Path) -> Lab {
        Lab::build(bin, "up")
    }

    /// The lab with three more server hosts and a database host (`scripts/netns-lab replicas`).
    pub fn up_replicas(bin: &Path) -> Lab {
        Lab::build(bin, "replicas")
    }

    fn build(bin: &Path, action: &str) -> Lab {
        for tool in ["ip", "nft", "curl", "ssh", "sshd", "ssh-keygen", "iperf3", "python3"] {
            let found =
                Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output().is_ok_and(|out| out.status.success());
            assert!(found, "{tool} is missing: install nftables iproute2 curl openssh-client openssh-server iperf3 python3");
        }
        let prefix = format!("rb{}", std::process::id() % 100_000);
        let status = Command::new(script()).args([action, &prefix]).status().expect("netns-lab runs");
        assert!(status.success(), "scripts/netns-lab {action} failed (root needed)");
        Lab { prefix, dir: TempDir::new("reachback_lab"), children: Vec::new(), bin: bin.to_path_buf(), token: String::new(), ca_pin: String::new() }
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn command(&self, host: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host), program]).args(args);
        command
    }

    pub fn run(&self, host: &str, program: &str, args: &[&str]) -> Output {
        self.command(host, program, args).output().expect("command runs")
    }

    /// Starts a long-running process in a namespace, its output in `<name>.log`.
    pub fn spawn(&mut self, name: &str, host: &str, program: &str, args: &[&str]) {
        self.spawn_in(name, host, program, args, &self.dir.0.clone());
    }

    /// Starts a long-running process in a namespace and a working directory.
    pub fn spawn_in(&mut self, name: &str, host: &str, program: &str, args: &[&str], cwd: &Path) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.0.join(format!("{name}.log"))).expect("log file");
        let child = self
            .command(host, program, args)
            .current_dir(cwd)
            .env("RUST_LOG", std::env::var("REACHBACK_LAB_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name}: {error}"));
        self.children.push((name.to_string(), child));
    }

    /// Stops a process: SIGTERM (clean exit expected) or SIGKILL.
    pub fn stop(&mut self, name: &str, kill: bool) -> Option<std::process::ExitStatus> {
        let index = self.children.iter().position(|(child_name, _)| child_name == name)?;
        let (_, mut child) = self.children.remove(index);
        let signal = if kill { "-KILL" } else { "-TERM" };
        let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
        child.wait().ok()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The server's data directory (`./reachback-data` where it was started).
    pub fn server_data(&self) -> PathBuf {
        self.dir.0.join("server/reachback-data")
    }

    /// The internal CA's certificate, for curl's `--cacert`.
    pub fn ca_file(&self) -> String {
        self.server_data().join("ca.pem").to_string_lossy().into_owned()
    }

    /// An API request from the broker host (HTTPS, verified against the internal CA).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_at("127.0.0.1", method, path, body)
    }

    /// An API request from the broker host (the lab's router) to the server at
    /// `address`, verified against the internal CA.
    pub fn api_at(&self, address: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("https://{address}:8080/api/v1{path}");
        let authorization = format!("Authorization: Bearer {}", self.token);
        let ca = self.ca_file();
        let mut args =
            vec!["-s", "-m", "10", "--cacert", &ca, "-w", "\n%{http_code}", "-X", method, "-H", &authorization, "-H", "Content-Type: application/json", &url];
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

    pub fn metric(&self, name: &str) -> f64 {
        let ca = self.ca_file();
        let output = self.run("brk", "curl", &["-s", "--cacert", &ca, "https://127.0.0.1:8080/metrics"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `reachback server` on the broker host exactly as PRODUCT.md shows it (data in
    /// `./reachback-data`, HTTPS with the internal CA, broker endpoints derived from
    /// the address clients use); the bootstrap key and the CA pin are read as an
    /// operator would: from the data directory and the start-up lines.
    pub fn start_server(&mut self) {
        let bin = self.bin.to_string_lossy().into_owned();
        let cwd = self.dir.0.join("server");
        std::fs::create_dir_all(&cwd).expect("server dir");
        self.spawn_in("server", "brk", &bin, &["server", "--listen", "0.0.0.0:8080", "--tunnel-listen", "0.0.0.0:8443"], &cwd);
        wait_for("the server to print its CA pin", Duration::from_secs(30), || self.log("server").contains("CA pin: "));
        let log = self.log("server");
        let pin = log.lines().rev().find_map(|line| line.strip_prefix("CA pin: ")).expect("pin line").trim().to_string();
        self.ca_pin = pin;
        self.token = std::fs::read_to_string(self.server_data().join("bootstrap-token")).expect("bootstrap-token").trim().to_string();
        wait_for("the server to answer", Duration::from_secs(30), || self.api("GET", "/me", None).0 == 200);
    }

    pub fn start_agent(&mut self) {
        let bin = self.bin.to_string_lossy().into_owned();
        let state = self.dir.0.join("agent").to_string_lossy().into_owned();
        self.spawn("agent", "cli", &bin, &["agent", "run", "--allow-ports", "22,7000,8000,8001,5201", "--allow-udp-ports", "53,5201", "--state-dir", &state]);
    }

    /// `curl` from the server host; returns (exit code, body, seconds taken).
    pub fn curl(&self, url: &str) -> (i32, String, f64) {
        let started = Instant::now();
        let output = self.run("srv", "curl", &["-sS", "-m", "20", url]);
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), started.elapsed().as_secs_f64())
    }

    /// Waits until something listens on `port` on a host's loopback.
    pub fn wait_listening(&self, host: &str, address: &str, port: u16) {
        let probe = format!("exec 3<>/dev/tcp/{address}/{port}");
        wait_for(&format!("{host} to listen on {address}:{port}"), Duration::from_secs(20), || self.run(host, "bash", &["-c", &probe]).status.success());
    }

    /// Real services on the client host's loopback: HTTP on 8000, 8001 and 9999
    /// (serving `hello.txt`), iperf3 on 5201, OpenSSH on 22 (key in `ssh/client_key`).
    pub fn start_services(&mut self) {
        let www = self.dir.0.join("www");
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("hello.txt"), "hello from the client\n").expect("file");
        let www_text = www.to_string_lossy().into_owned();
        for port in ["8000", "8001", "9999"] {
            self.spawn(&format!("http-{port}"), "cli", "python3", &["-m", "http.server", port, "--bind", "127.0.0.1", "--directory", &www_text]);
        }
        self.spawn("iperf3", "cli", "iperf3", &["-s", "-B", "127.0.0.1", "-p", "5201"]);
        let ssh_text = self.dir.0.join("ssh").to_string_lossy().into_owned();
        std::fs::create_dir_all(&ssh_text).expect("ssh dir");
        for file in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", &format!("{ssh_text}/{file}")]).status().expect("ssh-keygen");
            assert!(status.success());
        }
        std::fs::copy(format!("{ssh_text}/client_key.pub"), format!("{ssh_text}/authorized_keys")).expect("authorized_keys");
        std::fs::write(
            format!("{ssh_text}/sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:22\nHostKey {ssh_text}/host_key\nAuthorizedKeysFile {ssh_text}/authorized_keys\nPidFile {ssh_text}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
            ),
        )
        .expect("sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        self.spawn("sshd", "cli", "/usr/sbin/sshd", &["-D", "-e", "-f", &format!("{ssh_text}/sshd_config")]);
        for port in [8000, 8001, 9999, 5201, 22] {
            self.wait_listening("cli", "127.0.0.1", port);
        }
    }

    /// The control plane of the lab: a range, a single-use enrollment key, a
    /// connector, a segment for the lab's ports, and two policies (deny 8001
    /// anywhere under `corp.example`, then allow alice to the lab segment).
    /// Returns (enrollment key, connector's provisioning key).
    pub fn provision(&self) -> (String, String) {
        let (status, range) = self.api("POST", "/ip-ranges", Some(json!({"name": "Lab laptops", "range": "100.64.0.0/16"})));
        assert_eq!(status, 201, "{range}");
        let (_, key) = self.api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example", "reusable": false})));
        let (status, connector) = self.api("POST", "/connectors", Some(json!({"name": "lab connector"})));
        assert_eq!(status, 201, "{connector}");
        let (_, lab_segment) = self.api(
            "POST",
            "/app-segments",
            Some(json!({
                "name": "lab services",
                "destinations": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"],
                "tcp_ports": ["22", "7000", "8000", "5201", "9999"],
                "udp_ports": ["53", "5201", "7009"]
            })),
        );
        let (_, denied_segment) =
            self.api("POST", "/app-segments", Some(json!({"name": "blocked", "destinations": ["*.corp.example"], "tcp_ports": ["8001"]})));
        let (status, _) =
            self.api("POST", "/access-policies", Some(json!({"name": "block 8001", "order": 1, "action": "deny", "segment_ids": [denied_segment["id"]]})));
        assert_eq!(status, 201);
        let (status, _) = self.api(
            "POST",
            "/access-policies",
            Some(json!({"name": "lab", "order": 2, "action": "allow", "segment_ids": [lab_segment["id"]], "usernames": ["alice@corp.example"]})),
        );
        assert_eq!(status, 201);
        (key["key"].as_str().expect("key").to_string(), connector["provisioning_key"].as_str().expect("provisioning key").to_string())
    }

    /// `reachback agent enroll` on the client host; returns its output.
    pub fn enroll_agent(&self, key: &str) -> Output {
        let state = self.dir.0.join("agent").to_string_lossy().into_owned();
        let bin = self.bin.to_string_lossy().into_owned();
        self.run(
            "cli",
            &bin,
            &[
                "agent",
                "enroll",
                "--server",
                "https://10.77.2.2:8080",
                "--key",
                key,
                "--ca-pin",
                &self.ca_pin,
                "--hostname",
                "laptop1.corp.example",
                "--state-dir",
                &state,
            ],
        )
    }

    /// `ssh root@TARGET COMMAND` from the server host with the lab's client key (see [`Lab::start_services`]).
    pub fn ssh(&self, target: &str, command: &str) -> Output {
        let client_key = self.dir.0.join("ssh/client_key").to_string_lossy().into_owned();
        let destination = format!("root@{target}");
        let options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"];
        let mut args = vec!["-i", client_key.as_str()];
        for option in &options {
            args.extend(["-o", option]);
        }
        args.extend([destination.as_str(), command]);
        self.run("srv", "ssh", &args)
    }

    /// A DNS server (dnsmasq) on the laptop's loopback, port 53, answering
    /// `service.laptop.test` with 192.0.2.7 (the lab's agent allows UDP 53).
    pub fn start_laptop_dns(&mut self) {
        self.spawn(
            "laptop-dns",
            "cli",
            "dnsmasq",
            &[
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
                "--address=/service.laptop.test/192.0.2.7",
            ],
        );
        self.wait_listening("cli", "127.0.0.1", 53);
    }

    /// Another laptop on the client host: a fresh key for alice, `agent enroll` as
    /// `hostname` with `enroll_extra` (`--country DE` picks a range by location),
    /// then `agent run` with `run_args` as process `name` (state in a directory of
    /// that name). Returns what `agent enroll` printed; fails the test if it failed.
    pub fn add_laptop(&mut self, name: &str, hostname: &str, enroll_extra: &[&str], run_args: &[&str]) -> String {
        let (_, key) = self.api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example"})));
        let key = key["key"].as_str().expect("key").to_string();
        let bin = self.bin.to_string_lossy().into_owned();
        let state = self.dir.0.join(name).to_string_lossy().into_owned();
        let pin = self.ca_pin.clone();
        let mut args =
            vec!["agent", "enroll", "--server", "https://10.77.2.2:8080", "--key", &key, "--ca-pin", &pin, "--hostname", hostname, "--state-dir", &state];
        args.extend_from_slice(enroll_extra);
        let enrolled = self.run("cli", &bin, &args);
        let printed = String::from_utf8_lossy(&enrolled.stdout).into_owned();
        assert!(enrolled.status.success(), "agent enroll: {printed}{}", String::from_utf8_lossy(&enrolled.stderr));
        let mut run = vec!["agent", "run", "--state-dir", &state];
        run.extend_from_slice(run_args);
        self.spawn(name, "cli", &bin, &run);
        printed
    }

    pub fn start_connector(&mut self, provisioning_key: &str) {
        self.start_connector_with(provisioning_key, &[]);
    }

    /// The connector with more flags (`--dns-listen …`; a `--mode` among them replaces `--mode tproxy`).
    pub fn start_connector_with(&mut self, provisioning_key: &str, extra: &[&str]) {
        let state = self.dir.0.join("connector").to_string_lossy().into_owned();
        let bin = self.bin.to_string_lossy().into_owned();
        let pin = self.ca_pin.clone();
        let mut args = vec!["connector", "run", "--server", "https://10.77.2.2:8080", "--key", provisioning_key, "--ca-pin", &pin, "--state-dir", &state];
        if !extra.contains(&"--mode") {
            args.extend(["--mode", "tproxy"]);
        }
        args.extend_from_slice(extra);
        self.spawn("connector", "conn", &bin, &args);
    }

    /// Everything up as [`Lab::full`] does, the connector started with `connector_args`
    /// and the settings patched with `settings` first.
    pub fn full_with(connector_args: &'static [&'static str], settings: Value) -> impl FnOnce(&Path) -> Lab {
        move |bin| {
            let mut lab = Lab::up(bin);
            lab.start_server();
            let (status, body) = lab.api("PATCH", "/settings", Some(settings));
            assert_eq!(status, 200, "{body}");
            lab.finish_full(connector_args)
        }
    }

    fn finish_full(mut self, connector_args: &[&str]) -> Lab {
        let (key, provisioning_key) = self.provision();
        self.start_services();
        let enrolled = self.enroll_agent(&key);
        assert!(enrolled.status.success(), "agent enroll: {}", String::from_utf8_lossy(&enrolled.stderr));
        self.start_agent();
        self.start_connector_with(&provisioning_key, connector_args);
        wait_for("the agent's session", Duration::from_secs(20), || self.session_ip().as_deref() == Some("100.64.0.1"));
        wait_for("the connector to be online", Duration::from_secs(20), || self.api("GET", "/connectors", None).1["items"][0]["status"] == "online");
        wait_for("the connector's interception rules", Duration::from_secs(20), || {
            let log = self.log("connector");
            log.contains("interception rules installed") || log.contains("TUN routes installed")
        });
        self
    }

    /// Everything up as [`Lab::full`] does, the connector started with `connector_args`.
    pub fn full_args(connector_args: &'static [&'static str]) -> impl FnOnce(&Path) -> Lab {
        move |bin| {
            let mut lab = Lab::up(bin);
            lab.start_server();
            lab.finish_full(connector_args)
        }
    }

    /// Everything up: server, services, agent and connector, the agent's session live.
    pub fn full() -> impl FnOnce(&Path) -> Lab {
        |bin| {
            let mut lab = Lab::up(bin);
            lab.start_server();
            lab.finish_full(&[])
        }
    }

    pub fn session_ip(&self) -> Option<String> {
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

pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Runs iperf3 from the server host to `target` (address) and returns the received bits per second.
pub fn iperf3_bits(lab: &Lab, target: &str, port: &str, seconds: &str, streams: &str, reverse: bool) -> f64 {
    let mut args = vec!["-c", target, "-p", port, "-t", seconds, "-P", streams, "-J"];
    if reverse {
        args.push("-R");
    }
    let output = lab.run("srv", "iperf3", &args);
    assert!(output.status.success(), "iperf3 {args:?} failed: {}", String::from_utf8_lossy(&output.stdout));
    let report: Value = serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"].as_f64().expect("bits per second")
}

/// What of the machine moves the figures: CPUs, how idle CPUs wait (on a KVM guest
/// with halt polling off, waking a process on an idle CPU is an exit to the
/// hypervisor; see docs/benchmarks.md) and the system's congestion control.
pub fn machine_line() -> String {
    let read = |path: &str| std::fs::read_to_string(path).map_or_else(|_| "?".to_string(), |text| text.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let idle = read("/sys/devices/system/cpu/cpuidle/current_driver");
    let halt_poll = match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_str() {
        "?" => "n/a".to_string(),
        "0" => "off".to_string(),
        ns => format!("{ns} ns"),
    };
    let congestion = read("/proc/sys/net/ipv4/tcp_congestion_control");
    format!("machine: {cpus} CPUs usable, cpuidle {idle}, guest halt polling {halt_poll}, system congestion control {congestion}")
}

/// A `reachback server` a bench started on loopback (free ports for the API and the
/// tunnel), killed when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub port: u16,
}

impl ServerProcess {
    /// Starts `binary server` with `token` as the bootstrap API key, `data_dir`, and
    /// `database` (PostgreSQL) when given; returns once `/readyz` answers 200 (a
    /// store of a million rows takes a while to load).
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(binary: &str, token: &str, data_dir: &std::path::Path, database: Option<&str>) -> ServerProcess {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
        let (port, tunnel) = (free(), free());
        let mut command = std::process::Command::new(binary);
        command
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tunnel-listen",
                &format!("127.0.0.1:{tunnel}"),
                "--bootstrap-token",
                token,
                "--data-dir",
            ])
            .arg(data_dir)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null());
        if let Some(database) = database {
            command.args(["--database", database]);
        }
        let server = ServerProcess { child: command.spawn().expect("server"), base: format!("http://127.0.0.1:{port}"), port };
        wait_for("the server to be ready", Duration::from_secs(900), || {
            ureq::get(&format!("{}/readyz", server.base)).call().is_ok_and(|reply| reply.status() == 200)
        });
        server
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator (a linear congruential one): the same seed draws
/// the same values, so a bench's samples or a property test's cases can be replayed.
pub struct Draw(pub u64);

impl Draw {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 17
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of `items`, which must not be empty.
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }
}

/// What the benches that run `reachback server` processes share.
pub mod bench {
    use std::process::Child;
    use std::time::Duration;

    use serde_json::Value;

    /// A number from the environment, or `default`.
    pub fn env_number(name: &str, default: usize) -> usize {
        std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
    }

    /// A TCP port free on loopback now.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
    }

    /// A child process, killed when dropped.
    pub struct Process(pub Child);

    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// An HTTP client that hands back every status (no error for 4xx/5xx).
    pub fn http(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout)).build().into()
    }

    /// One API call with a bearer token: the status and the JSON body (`Null` when none).
    pub fn call(agent: &ureq::Agent, token: &str, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
        let builder = ureq::http::Request::builder().method(method).uri(url).header("Authorization", format!("Bearer {token}"));
        let result = match body {
            Some(body) => agent.run(builder.header("Content-Type", "application/json").body(body.to_string()).expect("request")),
            None => agent.run(builder.body(()).expect("request")),
        };
        let mut reply = result.expect("the API answers");
        let status = reply.status().as_u16();
        let text = reply.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}
