//! Spawning `reachback server` processes and talking HTTP to them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_reachback");
pub const TOKEN: &str = "rbk_cli_test_bootstrap_token_0123456789";

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{}", std::process::id(), nanos % 1_000_000_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("reachback_cli"));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    /// Starts a server and waits until it answers `/healthz`.
    pub fn start(data_dir: &Path, database: Option<&str>, extra: &[&str]) -> Server {
        Self::start_with(data_dir, database, extra, &[], None)
    }

    /// Starts a server with these environment variables; with `log`, its standard
    /// error (at INFO) goes to that file.
    pub fn start_with(data_dir: &Path, database: Option<&str>, extra: &[&str], envs: &[(&str, &str)], log: Option<&Path>) -> Server {
        let port = free_port();
        let mut command = server_command(data_dir, database, extra, envs, port);
        if let Some(log) = log {
            command.env("RUST_LOG", "info").stderr(std::fs::File::create(log).expect("log file"));
        }
        let child = command.spawn().expect("server starts");
        let server = Server { child, base: format!("http://127.0.0.1:{port}") };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if agent().get(&format!("{}/healthz", server.base)).call().is_ok_and(|reply| reply.status() == 200) {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server on port {port} did not come up");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("server exits")
    }

    pub fn ctl(&self, token: &str, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(BIN).arg("ctl").args(args).env("REACHBACK_SERVER", &self.base).env("REACHBACK_TOKEN", token).output().expect("ctl runs");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// `reachback server` on `port` with these arguments and environment variables.
fn server_command(data_dir: &Path, database: Option<&str>, extra: &[&str], envs: &[(&str, &str)], port: u16) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("REACHBACK_TUNNEL_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(database) = database {
        command.args(["--database", database]);
    }
    command
}

/// Runs `reachback server`, expecting it to refuse to start (within 60 s); returns its standard error.
pub fn server_refuses(data_dir: &Path, database: Option<&str>, extra: &[&str], envs: &[(&str, &str)]) -> String {
    refuses(server_command(data_dir, database, extra, envs, free_port()))
}

/// Runs a command that should fail (within 60 s; it is killed after that and the
/// test fails); returns its standard error.
pub fn refuses(mut command: Command) -> String {
    let log = std::env::temp_dir().join(unique("reachback_refusal"));
    command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = command.spawn().expect("server runs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after 60 s, but should have refused: {command:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success(), "should have failed: {stderr}");
    stderr
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// Sends a JSON request; returns status and parsed body (Null when empty).
pub fn request(agent: &ureq::Agent, method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        builder = builder.header("Authorization", format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => agent.run(builder.header("Content-Type", "application/json").body(body.to_string()).expect("request")),
        None => agent.run(builder.body(()).expect("request")),
    };
    match result {
        Ok(mut reply) => {
            let status = reply.status().as_u16();
            let text = reply.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

pub fn public_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()
}
