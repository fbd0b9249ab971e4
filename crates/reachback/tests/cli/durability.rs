//! kill -9 during a stream of enrollments loses no acknowledged binding (SQLite).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request};

#[test]
fn kill_during_enrollments_loses_no_acknowledged_binding() {
    let temp = TempDir::new();
    let mut server = Server::start(&temp.0, None, &["--bootstrap-token", TOKEN]);
    let http = agent();
    let (status, _) =
        request(&http, "POST", &format!("{}/api/v1/ip-ranges", server.base), Some(TOKEN), Some(&json!({"name": "Pool", "range": "100.64.0.0/16"})));
    assert_eq!(status, 201);
    let (_, key) =
        request(&http, "POST", &format!("{}/api/v1/enrollment-keys", server.base), Some(TOKEN), Some(&json!({"username": "fleet", "reusable": true})));
    let key = key["key"].as_str().expect("key").to_string();
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let base = server.base.clone();
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (acknowledged, base, key) = (acknowledged.clone(), base.clone(), key.clone());
            std::thread::spawn(move || {
                let http = agent();
                let public_key = public_key();
                for index in 0.. {
                    let hostname = format!("w{worker}-{index}.corp.example");
                    let (status, body) = request(
                        &http,
                        "POST",
                        &format!("{base}/api/v1/enroll"),
                        None,
                        Some(&json!({"enrollment_key": key, "hostname": hostname, "platform": "linux", "public_key": public_key})),
                    );
                    match status {
                        201 => acknowledged.lock().expect("lock").push((body["virtual_ip"].as_str().expect("ip").to_string(), hostname)),
                        0 => return,
                        other => panic!("unexpected status {other}: {body}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    for worker in workers {
        worker.join().expect("worker");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() > 50, "too few enrollments before the kill: {}", acknowledged.len());

    let server = Server::start(&temp.0, None, &[]);
    for (ip, hostname) in &acknowledged {
        let (status, binding) = request(&http, "GET", &format!("{}/api/v1/ip-bindings/{ip}", server.base), Some(TOKEN), None);
        assert_eq!(status, 200, "acknowledged binding {ip} lost");
        assert_eq!(binding["client_hostname"], json!(hostname));
    }
    // the store is consistent: the range counter equals the rows, no address twice
    let (_, ranges) = request(&http, "GET", &format!("{}/api/v1/ip-ranges", server.base), Some(TOKEN), None);
    let used = ranges["items"][0]["used_ips"].as_i64().expect("used");
    let mut seen = std::collections::HashSet::new();
    let mut page = 1;
    loop {
        let (_, list) = request(&http, "GET", &format!("{}/api/v1/ip-bindings?page_size=1000&page={page}", server.base), Some(TOKEN), None);
        let items = list["items"].as_array().expect("items").clone();
        for item in &items {
            assert!(seen.insert(item["ip"].as_str().map(str::to_string)), "address bound twice: {item}");
        }
        if items.len() < 1000 {
            assert_eq!(list["total"].as_i64(), Some(used));
            break;
        }
        page += 1;
    }
    assert_eq!(seen.len() as i64, used);
    assert!(used as usize >= acknowledged.len());
    // and it keeps allocating after the unclean stop
    let (status, body): (u16, Value) = request(
        &http,
        "POST",
        &format!("{}/api/v1/enroll", server.base),
        None,
        Some(&json!({"enrollment_key": key, "hostname": "after.corp.example", "platform": "linux", "public_key": public_key()})),
    );
    assert_eq!(status, 201, "{body}");
}
