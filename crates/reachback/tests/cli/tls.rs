//! The API served as PRODUCT.md's "Security" says, tried on real sockets with curl
//! and the CLI: HTTPS by default off loopback with the internal CA and its pin, an
//! operator's certificate re-read on SIGHUP, `--insecure-http` said out loud, and
//! the HTTP server's own limits (header-read timeout, connection cap).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{BIN, TOKEN, TempDir, free_port};

/// A server process whose stdout is kept (the start-up lines name the URL and the pin).
struct Started {
    child: Child,
    stdout: std::path::PathBuf,
}

impl Started {
    fn spawn(dir: &Path, args: &[&str]) -> Started {
        let stdout = dir.join("stdout.log");
        let file = std::fs::File::create(&stdout).expect("log");
        let child = Command::new(BIN)
            .arg("server")
            .args(args)
            .args(["--data-dir", &dir.join("data").to_string_lossy(), "--bootstrap-token", TOKEN])
            .env("REACHBACK_TUNNEL_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("server starts");
        let started = Started { child, stdout };
        let began = Instant::now();
        while !started.output().contains("CA pin: ") {
            assert!(began.elapsed() < Duration::from_secs(30), "the server did not start: {}", started.output());
            std::thread::sleep(Duration::from_millis(50));
        }
        started
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn pin(&self) -> String {
        self.output().lines().find_map(|line| line.strip_prefix("CA pin: ")).expect("a CA pin line").trim().to_string()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's state code of our TCP socket on a local port (`01` established, `08` close-wait …).
fn tcp_state(local_port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let wanted = format!(":{local_port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1)?.ends_with(&wanted)).then(|| fields.get(3).map(|state| state.to_string()))?
    })
}

fn curl(args: &[&str]) -> (bool, String) {
    let output = Command::new("curl").args(["-sS", "-m", "5"]).args(args).output().expect("curl runs");
    (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

fn ctl(args: &[&str]) -> (bool, String) {
    let output = Command::new(BIN).arg("ctl").args(args).env("REACHBACK_TOKEN", TOKEN).env_remove("REACHBACK_CA_PIN").output().expect("ctl runs");
    (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

#[test]
fn a_wildcard_listener_serves_https_with_the_internal_ca_and_its_pin() {
    let temp = TempDir::new();
    let port = free_port();
    let server = Started::spawn(&temp.0, &["--listen", &format!("0.0.0.0:{port}")]);
    assert!(server.output().contains("Reachback API listening on https://"), "{}", server.output());
    let pin = server.pin();
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
    let ca = temp.0.join("data/ca.pem").to_string_lossy().into_owned();
    let (ok, body) = curl(&["--cacert", &ca, &format!("https://127.0.0.1:{port}/healthz")]);
    assert!(ok && body.contains("ok"), "HTTPS verified against the internal CA: {body}");
    let (ok, _) = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(!ok, "no plain HTTP beside it");
    let (ok, printed) = ctl(&["ca", "pin", "--data-dir", &temp.0.join("data").to_string_lossy()]);
    assert!(ok && printed.trim() == pin, "`ctl ca pin` prints the same pin: {printed}");

    let url = format!("https://127.0.0.1:{port}");
    let (ok, me) = ctl(&["--server", &url, "--ca-pin", &pin, "me"]);
    assert!(ok && me.contains("superadmin"), "{me}");
    let (ok, message) = ctl(&["--server", &url, "me"]);
    assert!(!ok && message.contains("--ca-pin"), "without a pin the internal CA is not trusted, and the message says what to do: {message}");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (ok, message) = ctl(&["--server", &url, "--ca-pin", &wrong, "me"]);
    assert!(!ok && message.contains(&wrong) && message.contains(&pin), "a wrong pin names the expected and the presented pin: {message}");
    // a console session opened over the server's own HTTPS gets a Secure cookie
    let mut set_password = Command::new(BIN)
        .args(["ctl", "--server", &url, "--ca-pin", &pin, "admins", "set-password", "admin"])
        .env("REACHBACK_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ctl runs");
    set_password.stdin.take().expect("stdin").write_all(b"a long passphrase for tests\n").expect("password");
    assert!(set_password.wait().expect("ctl").success());
    let (ok, headers) = curl(&[
        "-i",
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"username":"admin","password":"a long passphrase for tests"}"#,
        &format!("{url}/api/v1/auth/login"),
    ]);
    let cookie = headers.lines().find(|line| line.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or_default().to_string();
    assert!(ok && cookie.contains("HttpOnly") && cookie.contains("Secure"), "{headers}");
    // the ready-to-paste enrollment command names the server, the key and the pin
    let (ok, created) = ctl(&["--server", &url, "--ca-pin", &pin, "keys", "create", "--username", "alice@corp.example"]);
    assert!(ok && created.contains("reachback agent enroll --server https://") && created.contains(&format!("--ca-pin {pin}")), "{created}");
}

#[test]
fn insecure_http_off_loopback_is_said_out_loud() {
    let temp = TempDir::new();
    let port = free_port();
    let server = Started::spawn(&temp.0, &["--listen", &format!("0.0.0.0:{port}"), "--insecure-http"]);
    assert!(server.output().contains("Reachback API listening on http://"), "{}", server.output());
    assert!(server.output().contains("WARNING: plain HTTP"), "{}", server.output());
    let (ok, body) = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(ok && body.contains("ok"), "{body}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files.
fn operator_certificate(dir: &Path, name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
    let certificate = params.signed_by(&key, &issuer).expect("certificate");
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).expect("write");
        path.to_string_lossy().into_owned()
    };
    (
        write(&format!("{name}-ca.pem"), &ca.pem()),
        write(&format!("{name}-cert.pem"), &certificate.pem()),
        write(&format!("{name}-key.pem"), &key.serialize_pem()),
    )
}

#[test]
fn an_operator_certificate_is_served_and_read_again_on_sighup() {
    let temp = TempDir::new();
    let port = free_port();
    let (first_ca, first_cert, first_key) = operator_certificate(&temp.0, "first");
    let (second_ca, second_cert, second_key) = operator_certificate(&temp.0, "second");
    let cert = temp.0.join("api-cert.pem").to_string_lossy().into_owned();
    let key = temp.0.join("api-key.pem").to_string_lossy().into_owned();
    std::fs::copy(&first_cert, &cert).expect("copy");
    std::fs::copy(&first_key, &key).expect("copy");
    let server = Started::spawn(&temp.0, &["--listen", &format!("127.0.0.1:{port}"), "--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("https://127.0.0.1:{port}/healthz");
    assert!(curl(&["--cacert", &first_ca, &url]).0, "the operator's certificate is served, even on loopback");
    std::fs::copy(&second_cert, &cert).expect("copy");
    std::fs::copy(&second_key, &key).expect("copy");
    let _ = Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status();
    let began = Instant::now();
    while !curl(&["--cacert", &second_ca, &url]).0 {
        assert!(began.elapsed() < Duration::from_secs(10), "the new certificate was not picked up on SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!curl(&["--cacert", &first_ca, &url]).0, "the old certificate is gone");
    // a broken file on SIGHUP keeps the current certificate
    std::fs::write(&key, "not a key").expect("write");
    let _ = Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status();
    std::thread::sleep(Duration::from_millis(500));
    assert!(curl(&["--cacert", &second_ca, &url]).0, "a bad file changes nothing");
}

#[test]
fn slow_and_numerous_clients_are_bounded() {
    let temp = TempDir::new();
    let port = free_port();
    let _server = Started::spawn(&temp.0, &["--listen", &format!("127.0.0.1:{port}"), "--header-read-timeout", "1"]);
    let address = format!("127.0.0.1:{port}");
    // a client that never finishes its request head is dropped after the header-read timeout
    let mut slow = TcpStream::connect(&address).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").expect("write");
    slow.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let began = Instant::now();
    let mut buffer = [0u8; 256];
    let read = slow.read(&mut buffer);
    assert!(matches!(read, Ok(0)), "the slow client is closed, not answered or left waiting: {read:?}");
    assert!(began.elapsed() < Duration::from_secs(4), "closed after {:?}", began.elapsed());
    // a client that asks and never reads the answers is cut off once writes stop moving
    let mut greedy = TcpStream::connect(&address).expect("connect");
    let request = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    greedy.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = greedy.write_all(&request);
    std::thread::sleep(Duration::from_secs(3));
    greedy.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    // cut off, the server reset the connection: ours is gone or no longer ESTABLISHED (/proc/net/tcp)
    let local_port = greedy.local_addr().expect("address").port();
    let ended = tcp_state(local_port).is_none_or(|state| state != "01");
    assert!(ended, "a client that stopped reading still holds its connection");
    // at the connection cap, a further client waits until a slot frees
    let capped = TempDir::new();
    let port = free_port();
    let _capped = Started::spawn(&capped.0, &["--listen", &format!("127.0.0.1:{port}"), "--max-connections", "2"]);
    let address = format!("127.0.0.1:{port}");
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&address).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (ok, _) = curl(&["-m", "1.5", &format!("http://{address}/healthz")]);
    assert!(!ok, "a third connection is not served while two are held");
    drop(idle);
    let (ok, body) = curl(&[&format!("http://{address}/healthz")]);
    assert!(ok && body.contains("ok"), "served once the others left: {body}");
}

/// `agent enroll` into a state directory enrolled with another server: refused
/// without `--force`; with it, the new server enrolls the laptop, the old one is
/// told (its device goes, its address is released) and the old files are gone.
#[test]
fn an_agent_moving_to_another_server_says_so() {
    use crate::process::{Server, agent, request};
    let temp = TempDir::new();
    let old = Server::start(&temp.0.join("old"), None, &["--bootstrap-token", TOKEN]);
    let new = Server::start(&temp.0.join("new"), None, &["--bootstrap-token", TOKEN]);
    let http = agent();
    let mut keys = Vec::new();
    for server in [&old, &new] {
        let api = |path: &str, body: serde_json::Value| request(&http, "POST", &format!("{}/api/v1{path}", server.base), Some(TOKEN), Some(&body));
        assert_eq!(api("/ip-ranges", serde_json::json!({"name": "r", "range": "100.64.0.0/24"})).0, 201);
        keys.push(api("/enrollment-keys", serde_json::json!({"username": "alice@corp.example"})).1["key"].as_str().expect("key").to_string());
    }
    let state = temp.0.join("agent").to_string_lossy().into_owned();
    let enroll = |server: &str, key: &str, force: bool| {
        let mut args = vec!["agent", "enroll", "--server", server, "--key", key, "--hostname", "laptop.corp.example", "--state-dir", &state];
        if force {
            args.push("--force");
        }
        Command::new(BIN).args(&args).output().expect("enroll")
    };
    assert!(enroll(&old.base, &keys[0], false).status.success());
    let refused = enroll(&new.base, &keys[1], false);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && message.contains("--force"), "{message}");
    assert_eq!(request(&http, "GET", &format!("{}/api/v1/devices", new.base), Some(TOKEN), None).1["total"], 0, "nothing was enrolled");
    let moved = enroll(&new.base, &keys[1], true);
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    assert_eq!(request(&http, "GET", &format!("{}/api/v1/devices", new.base), Some(TOKEN), None).1["total"], 1);
    let (_, devices) = request(&http, "GET", &format!("{}/api/v1/devices", old.base), Some(TOKEN), None);
    assert_eq!(devices["total"], 0, "the old server was told the device left: {devices}");
    let (_, audit) = request(&http, "GET", &format!("{}/api/v1/audit-logs?action=leave", old.base), Some(TOKEN), None);
    assert_eq!(audit["total"], 1, "{audit}");
    let (_, ranges) = request(&http, "GET", &format!("{}/api/v1/ip-ranges", old.base), Some(TOKEN), None);
    assert_eq!(ranges["items"][0]["used_ips"], 0, "the old address was released");
}
