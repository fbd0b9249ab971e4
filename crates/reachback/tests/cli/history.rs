//! `reachback ctl bindings trace` and `ctl bindings history` against a real server
//! process: who held an address at an instant, with the holders before and after,
//! as a table and as JSON; the history listed and exported; refusals of bad values.

use serde_json::{Value, json};

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request};

#[test]
fn bindings_trace_and_history_in_the_cli() {
    let temp = TempDir::new();
    let server = Server::start(&temp.0.join("data"), None, &["--bootstrap-token", TOKEN]);
    let ctl = |args: &[&str]| server.ctl(TOKEN, args);
    let (ok, _, stderr) = ctl(&["ranges", "create", "--name", "One", "--range", "100.64.0.1-100.64.0.1"]);
    assert!(ok, "{stderr}");
    let http = agent();
    let enroll = |username: &str, hostname: &str| -> String {
        let (status, key) =
            request(&http, "POST", &format!("{}/api/v1/enrollment-keys", server.base), Some(TOKEN), Some(&json!({"username": username, "reusable": true})));
        assert_eq!(status, 201, "{key}");
        let body = json!({"enrollment_key": key["key"], "hostname": hostname, "platform": "windows", "public_key": public_key()});
        let (status, enrolled) = request(&http, "POST", &format!("{}/api/v1/enroll", server.base), None, Some(&body));
        assert_eq!((status, enrolled["virtual_ip"].clone()), (201, json!("100.64.0.1")), "{enrolled}");
        enrolled["device_id"].as_str().expect("device").to_string()
    };
    let alice = enroll("alice@corp.example", "alice-laptop.corp.example");
    std::thread::sleep(std::time::Duration::from_millis(10));
    let (ok, _, stderr) = ctl(&["bindings", "release", "100.64.0.1"]);
    assert!(ok, "{stderr}");
    std::thread::sleep(std::time::Duration::from_millis(10));
    // the only address, out of quarantine, to another device
    let bob = enroll("bob@corp.example", "bob-desktop.corp.example");

    let (ok, stdout, stderr) = ctl(&["bindings", "history", "--ip", "100.64.0.1", "--sort", "bound_at", "-o", "json"]);
    assert!(ok, "{stderr}");
    let history: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(history["total"], 2, "{history}");
    let (first, second) = (&history["items"][0], &history["items"][1]);
    assert_eq!((first["device_id"].as_str(), second["device_id"].as_str()), (Some(alice.as_str()), Some(bob.as_str())));
    let a_from = first["bound_at"].as_str().expect("from").to_string();
    let a_until = first["released_at"].as_str().expect("until").to_string();

    // at the start of alice's interval: alice, nobody before, bob after
    let (ok, stdout, stderr) = ctl(&["bindings", "trace", "100.64.0.1", "--at", &a_from]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("100.64.0.1 at {a_from}: held by alice@corp.example (alice-laptop.corp.example, windows, device {alice})"), "{stdout}");
    assert!(
        lines[1].starts_with("WHEN")
            && ["USERNAME", "CLIENT_HOSTNAME", "BOUND_AT", "RELEASED_AT", "REASON", "DEVICE_ID"].iter().all(|column| lines[1].contains(column)),
        "{stdout}"
    );
    let row = |when: &str| lines.iter().find(|line| line.starts_with(when)).unwrap_or_else(|| panic!("no {when} row: {stdout}")).to_string();
    assert!(row("before").contains("(none)"), "{stdout}");
    let then = row("then");
    assert!(then.contains("alice@corp.example") && then.contains(&a_from) && then.contains(&a_until) && then.contains("admin_release"), "{stdout}");
    assert!(row("after").contains("bob@corp.example") && row("after").contains(&bob), "{stdout}");

    // at alice's release (the end is exclusive) nobody held it: alice before, bob after
    let (ok, stdout, stderr) = ctl(&["bindings", "trace", "100.64.0.1", "--at", &a_until]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with(&format!("100.64.0.1 at {a_until}: held by nobody\n")), "{stdout}");
    let before = stdout.lines().find(|line| line.starts_with("before")).expect("before row");
    assert!(before.contains("alice@corp.example"), "{stdout}");
    assert!(stdout.lines().any(|line| line.starts_with("after") && line.contains("bob@corp.example")), "{stdout}");

    // now (the default, or said): bob, alice before; as JSON too
    let (ok, stdout, stderr) = ctl(&["bindings", "trace", "100.64.0.1"]);
    assert!(ok && stdout.contains(": held by bob@corp.example (bob-desktop.corp.example"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = ctl(&["bindings", "trace", "100.64.0.1", "--at", "now", "-o", "json"]);
    assert!(ok, "{stderr}");
    let trace: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!((trace["holder"]["device_id"].as_str(), trace["previous"]["device_id"].as_str()), (Some(bob.as_str()), Some(alice.as_str())));
    assert_eq!((trace["next"].clone(), trace["holder"]["bound_reason"].clone()), (Value::Null, json!("quarantine_reuse")));

    // bad values are refused by the server, naming them
    let (ok, _, stderr) = ctl(&["bindings", "trace", "100.64.0.1", "--at", "yesterday"]);
    assert!(!ok && stderr.contains("400") && stderr.contains("'at'"), "{stderr}");
    let (ok, _, stderr) = ctl(&["bindings", "trace", "100.64.0.0/24"]);
    assert!(!ok && stderr.contains("400") && stderr.contains("'ip'"), "{stderr}");

    // the history as a table and as CSV
    let (ok, stdout, stderr) = ctl(&["bindings", "history", "--username", "ALICE"]);
    assert!(ok, "{stderr}");
    assert!(stdout.lines().next().is_some_and(|header| header.starts_with("IP") && header.contains("RELEASED_AT")), "{stdout}");
    assert!(stdout.contains("admin_release") && stdout.trim_end().ends_with("1 of 1 (page 1)"), "{stdout}");
    let file = temp.0.join("history.csv");
    let (ok, _, stderr) = ctl(&["bindings", "history", "--export", file.to_str().expect("path"), "--ip", "100.64.0.0/24", "--sort", "bound_at"]);
    assert!(ok && stderr.contains("2 rows"), "{stderr}");
    let csv = std::fs::read_to_string(&file).expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "ip,device_id,username,client_hostname,platform,range_name,bound_at,released_at,reason,bound_reason");
    assert!(lines[1].starts_with(&format!("100.64.0.1,{alice},alice@corp.example,")) && lines[1].ends_with(",admin_release,enrolled"), "{csv}");
    assert!(lines[2].starts_with(&format!("100.64.0.1,{bob},bob@corp.example,")) && lines[2].ends_with(",,,quarantine_reuse"), "{csv}");
    let (ok, _, stderr) = ctl(&["bindings", "history", "--export", file.to_str().expect("path"), "--page", "2"]);
    assert!(!ok && stderr.contains("--export downloads every matching row"), "{stderr}");

    // retention is a setting like the others
    let (ok, stdout, stderr) = ctl(&["settings", "set", "--binding-history-retention-days", "30", "-o", "json"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("json")["binding_history_retention_days"], 30);
    let (ok, _, stderr) = ctl(&["settings", "set", "--binding-history-retention-days", "0"]);
    assert!(!ok && stderr.contains("binding_history_retention_days"), "{stderr}");
}
