//! `reachback ctl event-sinks` against a real server process: a syslog sink added
//! from the command line receives the binding events of a release as RFC 5424
//! messages on a real TCP receiver; listing shows its state; bad targets are
//! refused with the field named; the sink is removed.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request};

#[test]
fn event_sinks_from_the_cli_deliver_to_a_syslog_receiver() {
    let temp = TempDir::new();
    let server = Server::start(&temp.0.join("data"), None, &["--bootstrap-token", TOKEN]);
    let ctl = |args: &[&str]| server.ctl(TOKEN, args);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = format!("tcp://{}", listener.local_addr().expect("address"));
    let received = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            sink.lock().expect("lock").push_str(&text);
        }
    });

    let (ok, _, stderr) = ctl(&["event-sinks", "create", "--name", "logs", "--kind", "syslog", "--target", "udp://127.0.0.1:514"]);
    assert!(!ok && stderr.contains("target"), "a target syslog cannot use is refused, naming the field: {stderr}");
    let (ok, stdout, stderr) =
        ctl(&["event-sinks", "create", "--name", "logs", "--kind", "syslog", "--target", &target, "--event-type", "com.reachback.binding.", "-o", "json"]);
    assert!(ok, "{stderr}");
    let created: Value = serde_json::from_str(&stdout).expect("json");
    let id = created["id"].as_str().expect("id").to_string();

    let (ok, _, stderr) = ctl(&["ranges", "create", "--name", "One", "--range", "100.64.0.0/30"]);
    assert!(ok, "{stderr}");
    let http = agent();
    let (status, key) =
        request(&http, "POST", &format!("{}/api/v1/enrollment-keys", server.base), Some(TOKEN), Some(&json!({"username": "dana@corp.example"})));
    assert_eq!(status, 201, "{key}");
    let body = json!({"enrollment_key": key["key"], "hostname": "dana.corp.example", "platform": "linux", "public_key": public_key()});
    let (status, enrolled) = request(&http, "POST", &format!("{}/api/v1/enroll", server.base), None, Some(&body));
    assert_eq!(status, 201, "{enrolled}");
    let ip = enrolled["virtual_ip"].as_str().expect("ip").to_string();
    let (ok, _, stderr) = ctl(&["bindings", "release", &ip]);
    assert!(ok, "{stderr}");

    let deadline = Instant::now() + Duration::from_secs(15);
    while !received.lock().expect("lock").contains("binding.released") {
        assert!(Instant::now() < deadline, "no syslog message arrived: {:?}", received.lock().expect("lock"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = received.lock().expect("lock").clone();
    assert!(text.contains(" reachback - binding.bound [reachback@32473 ") && text.contains(&format!("subject=\"{ip}\"")), "{text}");
    assert!(!text.contains("ip_range.create"), "the sink's type filter holds: {text}");

    let (ok, stdout, stderr) = ctl(&["event-sinks", "list"]);
    assert!(ok, "{stderr}");
    assert!(stdout.lines().next().is_some_and(|header| header.contains("PENDING") && header.contains("FAILURES")), "{stdout}");
    assert!(stdout.contains("logs") && stdout.contains(&target), "{stdout}");
    let (ok, _, stderr) = ctl(&["event-sinks", "delete", &id]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = ctl(&["event-sinks", "list", "-o", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("json")["total"], 0);
}
