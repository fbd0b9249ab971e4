//! Certificates renew while flows run: a server issuing 6-second certificates, an
//! agent and a SOCKS5 connector renewing over their tunnels at least twice while one
//! long echo flow stays open, then an agent whose certificate expired while it was
//! stopped renews over the API and comes back with the same virtual IP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::process::{BIN, Server, TOKEN, TempDir, agent, free_port, request};

struct Logged {
    child: Child,
    log: std::path::PathBuf,
}

impl Logged {
    fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> Logged {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        Logged { child, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A SOCKS5 CONNECT by hand (no authentication on loopback).
fn socks_connect(proxy: &str, target: std::net::SocketAddrV4) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(proxy)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&[5, 1, 0])?;
    let mut method = [0u8; 2];
    stream.read_exact(&mut method)?;
    let mut connect = vec![5, 1, 0, 1];
    connect.extend_from_slice(&target.ip().octets());
    connect.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&connect)?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!("SOCKS5 reply {}", reply[1])));
    }
    Ok(stream)
}

#[test]
fn certificates_renew_under_a_long_flow_and_after_expiring_offline() {
    let temp = TempDir::new();
    let tunnel = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&temp.0.join("data"), None, &["--bootstrap-token", TOKEN, "--tunnel-listen", &tunnel, "--certificate-lifetime", "6"]);
    let http = agent();
    let api = |method: &str, path: &str, body: serde_json::Value| request(&http, method, &format!("{}/api/v1{path}", server.base), Some(TOKEN), Some(&body));
    assert_eq!(api("POST", "/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).0, 201);
    // a local echo service behind the agent
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_port = echo.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    let segment = api("POST", "/app-segments", json!({"name": "echo", "destinations": ["100.64.0.0/24"], "tcp_ports": [echo_port.to_string()]})).1;
    assert_eq!(api("POST", "/access-policies", json!({"name": "echo", "action": "allow", "segment_ids": [segment["id"]]})).0, 201);
    let key = api("POST", "/enrollment-keys", json!({"username": "alice@corp.example"})).1["key"].as_str().expect("key").to_string();
    let provisioning = api("POST", "/connectors", json!({"name": "dc1"})).1["provisioning_key"].as_str().expect("key").to_string();
    let agent_state = temp.0.join("agent").to_string_lossy().into_owned();
    let enrolled = Command::new(BIN)
        .args(["agent", "enroll", "--server", &server.base, "--key", &key, "--hostname", "laptop.corp.example", "--state-dir", &agent_state])
        .output()
        .expect("enroll");
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let ports = echo_port.to_string();
    let mut laptop = Logged::start(&temp.0, "agent", &["agent", "run", "--allow-ports", &ports, "--state-dir", &agent_state]);
    let socks = format!("127.0.0.1:{}", free_port());
    let connector_state = temp.0.join("connector").to_string_lossy().into_owned();
    let connector = Logged::start(
        &temp.0,
        "connector",
        &["connector", "run", "--server", &server.base, "--key", &provisioning, "--mode", "socks5", "--socks5-listen", &socks, "--state-dir", &connector_state],
    );
    let target = std::net::SocketAddrV4::new("100.64.0.1".parse().expect("address"), echo_port);
    let began = Instant::now();
    let mut flow = loop {
        match socks_connect(&socks, target) {
            Ok(stream) => break stream,
            Err(error) => {
                assert!(began.elapsed() < Duration::from_secs(20), "no flow: {error}\n{}\n{}", laptop.text(), connector.text());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    // one flow, a byte every 250 ms for 14 s: two lifetimes' worth of renewals under it
    let began = Instant::now();
    let mut round = 0u8;
    while began.elapsed() < Duration::from_secs(14) {
        flow.write_all(&[round]).expect("the long flow stays open");
        let mut back = [0u8; 1];
        flow.read_exact(&mut back).expect("the echo comes back");
        assert_eq!(back[0], round);
        round = round.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(250));
    }
    let renewed = |text: String| text.matches("certificate renewed over the tunnel").count();
    assert!(renewed(laptop.text()) >= 2, "the agent renewed at least twice:\n{}", laptop.text());
    assert!(renewed(connector.text()) >= 2, "the connector renewed at least twice:\n{}", connector.text());
    let (_, audit) = request(&http, "GET", &format!("{}/api/v1/audit-logs?action=renew_certificate", server.base), Some(TOKEN), None);
    assert!(audit["total"].as_i64().unwrap_or(0) >= 4, "renewals are audited: {audit}");

    // the agent stops; its certificate expires meanwhile; it renews over the API and keeps its address
    laptop.stop();
    drop(flow);
    std::thread::sleep(Duration::from_secs(7));
    let mut laptop = Logged::start(&temp.0, "agent-again", &["agent", "run", "--allow-ports", &ports, "--state-dir", &agent_state]);
    let began = Instant::now();
    let reached = loop {
        if let Ok(mut stream) = socks_connect(&socks, target) {
            let mut back = [0u8; 2];
            if stream.write_all(b"hi").is_ok() && stream.read_exact(&mut back).is_ok() {
                break back == *b"hi";
            }
        }
        assert!(began.elapsed() < Duration::from_secs(20), "the agent did not come back:\n{}", laptop.text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reached, "the same virtual IP reaches the laptop again");
    assert!(laptop.text().contains("certificate renewed over the API"), "{}", laptop.text());
    let (_, sessions) = request(&http, "GET", &format!("{}/api/v1/client-sessions", server.base), Some(TOKEN), None);
    assert_eq!(sessions["items"][0]["virtual_ip"], "100.64.0.1", "{sessions}");
    laptop.stop();
}
