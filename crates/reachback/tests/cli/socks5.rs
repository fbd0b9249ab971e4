//! The connector's SOCKS5 mode, unprivileged, on loopback: `curl --socks5` reaches
//! a web server behind the agent by its virtual IP; the CONNECT reply carries the
//! real outcome (refused port, no policy, offline address) as a SOCKS5 code.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::process::{BIN, Server, TOKEN, TempDir, agent, free_port, request};

struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Spawned {
    Spawned(Command::new(args[0]).args(&args[1..]).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn"))
}

fn curl(socks: u16, url: &str) -> (i32, String, String) {
    let output = Command::new("curl").args(["-sS", "-m", "10", "--socks5", &format!("127.0.0.1:{socks}"), url]).output().expect("curl runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// One UDP ASSOCIATE exchange as a SOCKS5 client makes it: the association over TCP,
/// then a datagram with its header to the relay; the reply's payload if one came
/// back within two seconds from `target` (the header must name it).
fn udp_associate(socks: u16, target: &std::net::SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut control = std::net::TcpStream::connect(("127.0.0.1", socks)).expect("connect");
    control.write_all(&[5, 1, 0]).expect("greeting");
    let mut method = [0u8; 2];
    control.read_exact(&mut method).expect("method");
    assert_eq!(method, [5, 0]);
    control.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).expect("associate");
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..4], &[5, 0, 0, 1], "the association is granted with an IPv4 relay address");
    let relay = std::net::SocketAddr::from(([reply[4], reply[5], reply[6], reply[7]], u16::from_be_bytes([reply[8], reply[9]])));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let std::net::SocketAddr::V4(target_v4) = target else { panic!("IPv4 target") };
    let mut datagram = vec![0, 0, 0, 1];
    datagram.extend_from_slice(&target_v4.ip().octets());
    datagram.extend_from_slice(&target.port().to_be_bytes());
    datagram.extend_from_slice(payload);
    socket.send_to(&datagram, relay).expect("send");
    let mut buffer = [0u8; 2048];
    let length = socket.recv(&mut buffer).ok()?;
    assert_eq!(&buffer[..10], &datagram[..10], "the reply's header names the virtual address and port");
    drop(control);
    Some(buffer[10..length].to_vec())
}

#[test]
fn socks5_connector_reaches_a_client_and_reports_refusals() {
    let temp = TempDir::new();
    let tunnel = free_port();
    let tunnel_address = format!("127.0.0.1:{tunnel}");
    let server =
        Server::start(&temp.0.join("data"), None, &["--bootstrap-token", TOKEN, "--tunnel-listen", &tunnel_address, "--broker-endpoints", &tunnel_address]);
    let http = agent();
    let api = |method: &str, path: &str, body: serde_json::Value| request(&http, method, &format!("{}/api/v1{path}", server.base), Some(TOKEN), Some(&body));
    assert_eq!(api("POST", "/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).0, 201);
    let web_port = free_port();
    let other_port = free_port();
    // a UDP echo service on the client's loopback, for UDP ASSOCIATE
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp echo");
    let echo_port = echo.local_addr().expect("address").port();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while let Ok((length, from)) = echo.recv_from(&mut buffer) {
            let _ = echo.send_to(&buffer[..length], from);
        }
    });
    let segment = api(
        "POST",
        "/app-segments",
        json!({"name": "web", "destinations": ["100.64.0.0/24"], "tcp_ports": [web_port.to_string(), other_port.to_string()], "udp_ports": [echo_port.to_string()]}),
    )
    .1;
    assert_eq!(api("POST", "/access-policies", json!({"name": "web", "action": "allow", "segment_ids": [segment["id"]]})).0, 201);
    let key = api("POST", "/enrollment-keys", json!({"username": "alice"})).1["key"].as_str().expect("key").to_string();
    let provisioning = api("POST", "/connectors", json!({"name": "socks"})).1["provisioning_key"].as_str().expect("key").to_string();

    let www = temp.0.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello over socks\n").expect("file");
    let _web = spawn(&["python3", "-m", "http.server", &web_port.to_string(), "--bind", "127.0.0.1", "--directory", &www.to_string_lossy()]);
    let agent_state = temp.0.join("agent").to_string_lossy().into_owned();
    let enrolled = Command::new(BIN)
        .args(["agent", "enroll", "--server", &server.base, "--key", &key, "--hostname", "laptop.corp.example", "--state-dir", &agent_state])
        .output()
        .expect("enroll");
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let _agent =
        spawn(&[BIN, "agent", "run", "--allow-ports", &web_port.to_string(), "--allow-udp-ports", &echo_port.to_string(), "--state-dir", &agent_state]);
    let socks = free_port();
    let connector_state = temp.0.join("connector").to_string_lossy().into_owned();
    let socks_listen = format!("127.0.0.1:{socks}");
    let connector = spawn(&[
        BIN,
        "connector",
        "run",
        "--server",
        &server.base,
        "--key",
        &provisioning,
        "--mode",
        "socks5",
        "--socks5-listen",
        &socks_listen,
        "--state-dir",
        &connector_state,
    ]);

    let url = format!("http://100.64.0.1:{web_port}/hello.txt");
    let started = Instant::now();
    let mut outcome = curl(socks, &url);
    while outcome.0 != 0 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        outcome = curl(socks, &url);
    }
    assert_eq!((outcome.0, outcome.1.as_str()), (0, "hello over socks\n"), "{}", outcome.2);
    let (_, connectors) = request(&http, "GET", &format!("{}/api/v1/connectors", server.base), Some(TOKEN), None);
    assert_eq!((connectors["items"][0]["mode"].clone(), connectors["items"][0]["status"].clone()), (json!("socks5"), json!("online")));

    // refusals arrive as SOCKS5 reply codes, before any byte of the flow
    let (code, _, stderr) = curl(socks, &format!("http://100.64.0.1:{other_port}/"));
    assert_ne!(code, 0);
    assert!(stderr.contains("(5)") || stderr.to_lowercase().contains("refused"), "agent allow-list → connection refused: {stderr}");
    let (code, _, stderr) = curl(socks, "http://100.64.0.1:9/");
    assert_ne!(code, 0);
    assert!(stderr.contains("(2)") || stderr.to_lowercase().contains("not allowed"), "no policy → not allowed by ruleset: {stderr}");
    let (code, _, stderr) = curl(socks, &format!("http://100.64.0.2:{web_port}/"));
    assert_ne!(code, 0);
    assert!(stderr.contains("(4)") || stderr.to_lowercase().contains("unreachable"), "no agent → host unreachable: {stderr}");

    // UDP ASSOCIATE: datagrams with the SOCKS5 header reach the echo behind the agent and come back
    let echoed = udp_associate(socks, &format!("100.64.0.1:{echo_port}").parse().expect("address"), b"datagram through socks");
    assert_eq!(echoed.as_deref(), Some(&b"datagram through socks"[..]), "UDP over SOCKS5 came back, its header naming the virtual address");
    assert_eq!(udp_associate(socks, &"100.64.0.1:9".parse().expect("address"), b"denied"), None, "a UDP port outside every segment gets nothing back");

    drop(connector);
    // the flow log has each of them, as `ctl flows` shows it: a UDP flow ends when the
    // connector forgets it (idle) or goes, here when it goes; the writer batches every 200 ms
    let flows = |args: &[&str]| {
        let mut all = vec!["flows", "-o", "json", "--sort", "started_at", "--page-size", "1000"];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = server.ctl(TOKEN, &all);
        assert!(ok, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).expect("json")
    };
    let kinds = |listing: &serde_json::Value| -> Vec<(String, String, u64)> {
        let text = |value: &serde_json::Value| value.as_str().unwrap_or("").to_string();
        listing["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|row| (text(&row["verdict"]), text(&row["protocol"]), row["virtual_port"].as_u64().unwrap_or(0)))
            .collect()
    };
    let expected: Vec<(String, String, u64)> = [
        ("allowed", "tcp", web_port),
        ("refused_by_agent", "tcp", other_port),
        ("denied", "tcp", 9),
        ("offline", "tcp", web_port),
        ("allowed", "udp", echo_port),
        ("denied", "udp", 9),
    ]
    .iter()
    .map(|(verdict, protocol, port)| (verdict.to_string(), protocol.to_string(), u64::from(*port)))
    .collect();
    let started = Instant::now();
    let mut logged = flows(&[]);
    while !expected.iter().all(|kind| kinds(&logged).contains(kind)) && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
        logged = flows(&[]);
    }
    assert!(expected.iter().all(|kind| kinds(&logged).contains(kind)), "{logged}");
    let fetched =
        logged["items"].as_array().expect("items").iter().rev().find(|row| row["verdict"] == "allowed" && row["protocol"] == "tcp").expect("the curl");
    assert!(fetched["bytes_from_client"].as_u64() > Some(17), "the page and its headers came back: {fetched}");
    assert_eq!(
        (fetched["username"].clone(), fetched["connector_name"].clone(), fetched["server_ip"].clone()),
        (json!("alice"), json!("socks"), json!("127.0.0.1"))
    );
    assert_eq!(flows(&["--verdict", "denied", "--virtual-ip", "100.64.0.0/24"])["total"], 2);
    assert_eq!(flows(&["--protocol", "udp", "--username", "ALI"])["total"], 2);
    let (ok, stdout, stderr) = server.ctl(TOKEN, &["flows", "--verdict", "denied"]);
    assert!(ok && stdout.lines().next().is_some_and(|header| header.starts_with("STARTED_AT") && header.contains("BYTES_FROM_CLIENT")), "{stdout}{stderr}");
    let csv = temp.0.join("flows.csv");
    let (ok, _, stderr) = server.ctl(TOKEN, &["flows", "--export", &csv.to_string_lossy(), "--protocol", "udp"]);
    assert!(ok && stderr.contains("2 rows"), "{stderr}");
    assert!(std::fs::read_to_string(&csv).expect("csv").starts_with("started_at,ended_at,protocol,verdict,"));
    let (ok, _, stderr) = server.ctl(TOKEN, &["flows", "--verdict", "maybe"]);
    assert!(!ok && stderr.contains("400") && stderr.contains("'verdict'"), "{stderr}");

    // off loopback a SOCKS5 listener requires RFC 1929 username/password: refused to start without
    let open_socks = free_port();
    let open_listen = format!("0.0.0.0:{open_socks}");
    let refused = Command::new(BIN)
        .args(["connector", "run", "--server", &server.base, "--mode", "socks5", "--socks5-listen", &open_listen, "--state-dir", &connector_state])
        .output()
        .expect("connector runs");
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && message.contains("--socks5-credentials"), "{message}");
    let credentials = temp.0.join("socks-users");
    std::fs::write(&credentials, "# help desk\nhelpdesk:correct horse\n").expect("credentials");
    std::fs::set_permissions(&credentials, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let credentials_text = credentials.to_string_lossy().into_owned();
    // this time from a TOML file (`--config`), the server still a flag; a key the file does not know is refused
    let dns_port = free_port();
    let config = temp.0.join("connector.toml");
    let bad_config = temp.0.join("bad.toml");
    std::fs::write(&bad_config, "mode = \"socks5\"\ncolour = \"blue\"\n").expect("config");
    let refused = Command::new(BIN).args(["connector", "run", "--server", &server.base, "--config", &bad_config.to_string_lossy()]).output().expect("runs");
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && message.contains("colour"), "an unknown key in the file is refused: {message}");
    std::fs::write(
        &config,
        format!(
            "mode = \"tproxy\"\nsocks5_listen = \"{open_listen}\"\nsocks5_credentials = {credentials_text:?}\nstate_dir = {connector_state:?}\ndns_listen = [\"127.0.0.1:{dns_port}\"]\n"
        ),
    )
    .expect("config");
    // the flag wins over the file's mode
    let _open = spawn(&[BIN, "connector", "run", "--server", &server.base, "--mode", "socks5", "--config", &config.to_string_lossy()]);
    let with_user = |user: Option<&str>| {
        let proxy = format!("127.0.0.1:{open_socks}");
        let mut args = vec!["-sS", "-m", "10", "--socks5", &proxy];
        if let Some(user) = user {
            args.extend(["--proxy-user", user]);
        }
        args.push(&url);
        let output = Command::new("curl").args(&args).output().expect("curl runs");
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let started = Instant::now();
    let mut outcome = with_user(Some("helpdesk:correct horse"));
    while outcome.0 != 0 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        outcome = with_user(Some("helpdesk:correct horse"));
    }
    assert_eq!(outcome, (0, "hello over socks\n".to_string()), "the right password gets through");
    let (_, connectors) = request(&http, "GET", &format!("{}/api/v1/connectors", server.base), Some(TOKEN), None);
    assert_eq!(connectors["items"][0]["mode"], "socks5", "{connectors}");
    assert_eq!(connectors["items"][0]["dns_listeners"], json!([format!("127.0.0.1:{dns_port}")]), "the file's DNS listener is used and shown");
    assert_ne!(with_user(Some("helpdesk:wrong")).0, 0, "a wrong password is refused");
    assert_ne!(with_user(Some("nobody:correct horse")).0, 0, "an unknown user is refused");
    assert_ne!(with_user(None).0, 0, "no authentication is refused");
    // the flow log names the SOCKS5 user a flow came in as
    let started = Instant::now();
    let by_user = || {
        let (ok, stdout, stderr) = server.ctl(TOKEN, &["flows", "-o", "json", "--server-ip", "127.0.0.1", "--verdict", "allowed"]);
        assert!(ok, "{stderr}");
        let listing: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        listing["items"].as_array().expect("items").iter().filter(|row| row["socks_user"] == "helpdesk").count()
    };
    while by_user() == 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(by_user() >= 1, "a flow from the authenticated user is logged with its name");
}
