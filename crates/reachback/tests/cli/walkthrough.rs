//! The README walkthrough, as a new user does it: start the server, use the CLI.

use std::os::unix::fs::PermissionsExt;

use serde_json::{Value, json};

use crate::process::{Server, TempDir, agent, public_key, request};

#[test]
fn first_start_cli_walkthrough_and_clean_shutdown() {
    let temp = TempDir::new();
    let data_dir = temp.0.join("nested/reachback-data");
    let mut server = Server::start(&data_dir, None, &[]);
    // the generated bootstrap key and secret key are readable by the owner only;
    // the CA key lives only in the database, encrypted
    let token_path = data_dir.join("bootstrap-token");
    for path in [&token_path, &data_dir.join("secret.key")] {
        let mode = std::fs::metadata(path).expect("file exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    assert!(!data_dir.join("ca-key.pem").exists());
    let token = std::fs::read_to_string(&token_path).expect("token").trim().to_string();

    let (ok, stdout, stderr) = server.ctl(
        &token,
        &["ranges", "create", "--name", "Paris laptops", "--range", "100.64.0.0/16", "--city", "Paris", "--state", "Ile-de-France", "--country", "FR"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("65534"), "{stdout}");
    let (ok, _, stderr) = server.ctl(&token, &["ranges", "create", "--name", "Overlap", "--range", "100.64.5.0/24"]);
    assert!(!ok);
    assert!(stderr.contains("409") && stderr.contains("Paris laptops"), "{stderr}");
    // a 422 names each bad field once, on a line of its own
    let (ok, _, stderr) = server.ctl(&token, &["ranges", "create", "--name", "Host bits", "--range", "100.65.0.5/24"]);
    assert!(!ok);
    assert!(stderr.contains("422 Invalid values:\n  range: ") && stderr.contains("100.65.0.0/24"), "{stderr}");
    assert_eq!(stderr.matches("has host bits set").count(), 1, "{stderr}");
    let (ok, stdout, _) = server.ctl(&token, &["ranges", "list"]);
    assert!(ok && stdout.lines().next().is_some_and(|header| header.contains("NAME") && header.contains("USED_IPS")), "{stdout}");

    let (ok, stdout, stderr) =
        server.ctl(&token, &["keys", "create", "--username", "alice@corp.example", "--hostname-pattern", "*.corp.example", "--output", "json"]);
    assert!(ok, "{stderr}");
    let key: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(key["hostname_pattern"], "*.corp.example");
    let http = agent();
    let (status, enrolled) = request(
        &http,
        "POST",
        &format!("{}/api/v1/enroll", server.base),
        None,
        Some(
            &json!({"enrollment_key": key["key"], "hostname": "alice-laptop.corp.example", "platform": "macos", "public_key": public_key(), "location": {"city": "Paris", "state": "Ile-de-France", "country": "FR"}}),
        ),
    );
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["virtual_ip"], "100.64.0.1");

    let (ok, stdout, _) = server.ctl(&token, &["bindings", "list", "--username", "alice", "-o", "json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(list["items"][0]["client_hostname"], "alice-laptop.corp.example");
    let csv_path = temp.0.join("bindings.csv");
    let (ok, _, stderr) = server.ctl(&token, &["bindings", "export", "--file", csv_path.to_str().expect("path")]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("1 row,"), "{stderr}");
    let csv = std::fs::read_to_string(&csv_path).expect("csv");
    assert!(csv.starts_with("ip,range_name,range_location,username,platform,client_hostname,last_updated\n100.64.0.1,Paris laptops,\"Paris, Ile-de-France, FR\",alice@corp.example,macos,alice-laptop.corp.example,"), "{csv}");

    // devices filter by platform; the audit log exports what its filters select
    let (ok, stdout, stderr) = server.ctl(&token, &["devices", "list", "--platform", "windows", "-o", "json"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("json")["total"], 0, "{stdout}");
    let (ok, stdout, stderr) = server.ctl(&token, &["devices", "list", "--platform", "macos", "-o", "json"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("json")["total"], 1, "{stdout}");
    let audit_path = temp.0.join("audit.csv");
    let (ok, _, stderr) = server
        .ctl(&token, &["audit", "export", "--file", audit_path.to_str().expect("path"), "--resource-type", "ip_range", "--after", "2000-01-01T00:00:00Z"]);
    assert!(ok, "{stderr}");
    let audit = std::fs::read_to_string(&audit_path).expect("csv");
    let rows: Vec<&str> = audit.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "only the range's creation: {audit}");
    assert!(rows[0].contains(",admin,create,ip_range,"), "{audit}");
    let (ok, _, stderr) = server.ctl(&token, &["audit", "export", "--file", audit_path.to_str().expect("path"), "--after", "yesterday"]);
    assert!(!ok && stderr.contains("400"), "{stderr}");

    // a connector's provisioning key serves once; a new one is issued to enroll it again
    let (ok, stdout, stderr) = server.ctl(&token, &["connectors", "create", "--name", "dc1", "--provisioning-key-ttl", "3600", "-o", "json"]);
    assert!(ok, "{stderr}");
    let connector: Value = serde_json::from_str(&stdout).expect("json");
    let provisioning_key = connector["provisioning_key"].as_str().expect("provisioning key").to_string();
    let enroll_connector = |key: &str| {
        request(&http, "POST", &format!("{}/api/v1/connectors/enroll", server.base), None, Some(&json!({"provisioning_key": key, "public_key": public_key()})))
            .0
    };
    assert_eq!(enroll_connector(&provisioning_key), 200);
    assert_eq!(enroll_connector(&provisioning_key), 401, "a used key");
    let id = connector["id"].as_str().expect("id");
    let (ok, stdout, stderr) = server.ctl(&token, &["connectors", "provisioning-key", id, "-o", "json"]);
    assert!(ok, "{stderr}");
    let reissued: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(enroll_connector(reissued["provisioning_key"].as_str().expect("new key")), 200);

    let (ok, _, stderr) = server.ctl("rbk_wrong", &["ranges", "list"]);
    assert!(!ok && stderr.contains("401"), "{stderr}");
    let status = server.terminate();
    assert!(status.success(), "SIGTERM shuts down cleanly: {status:?}");

    // a restart keeps everything
    let server = Server::start(&data_dir, None, &[]);
    let (ok, stdout, _) = server.ctl(&token, &["bindings", "get", "100.64.0.1", "-o", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("json")["username"], "alice@corp.example");
}

/// Runs `reachback` with these arguments, expects it to refuse to start, and
/// returns what it printed on stderr.
fn refused(args: &[&str]) -> String {
    let output = std::process::Command::new(crate::process::BIN).args(args).output().expect("runs");
    assert!(!output.status.success(), "{args:?} should be refused");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_configuration_is_refused_clearly() {
    let temp = TempDir::new();
    let config = temp.0.join("reachback.toml");
    let (config_path, dir) = (config.to_str().expect("UTF-8 path"), temp.0.to_str().expect("UTF-8 path"));
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ncolour = \"red\"\n").expect("write");
    let stderr = refused(&["server", "--config", config_path]);
    assert!(stderr.contains("unknown field"), "{stderr}");
    let stderr = refused(&["server", "--database", "mysql://x", "--data-dir", dir]);
    assert!(stderr.contains("postgres://"), "{stderr}");
    // the enrollment writer opens the SQLite file a second time: a memory database cannot be a store
    let stderr = refused(&["server", "--listen", "127.0.0.1:0", "--database", "sqlite::memory:", "--data-dir", dir]);
    assert!(stderr.contains("needs a database file"), "{stderr}");
    // a congestion control the machine lacks, or a name that cannot be one
    let stderr = refused(&["server", "--listen", "127.0.0.1:0", "--tcp-congestion", "nosuchalgo", "--data-dir", dir]);
    assert!(stderr.contains("\"nosuchalgo\" cannot be used here") && stderr.contains("this machine offers"), "{stderr}");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ntcp_congestion = \"nosuchalgo\"\n").expect("write");
    let stderr = refused(&["server", "--config", config_path, "--data-dir", dir]);
    assert!(stderr.contains("cannot be used here"), "the TOML key is read: {stderr}");
    let stderr = refused(&["agent", "run", "--tcp-congestion", "Cubic!", "--state-dir", dir]);
    assert!(stderr.contains("--tcp-congestion must be `system` or"), "{stderr}");
    let output = std::process::Command::new(crate::process::BIN).arg("--version").output().expect("runs");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("reachback "));
}

/// `ctl bindings export` against a server whose export fails mid-stream (a 200, the
/// header and some rows, then the connection closed without the chunked
/// terminator, as the server does when its database fails): the CLI reports the
/// cut and removes the partial file, so nobody mistakes it for the whole export.
#[test]
fn an_export_cut_off_mid_stream_fails_and_leaves_no_file() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let rows = "ip,range_name\r\n100.64.0.1,Paris\r\n100.64.0.2,Paris\r\n";
            let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{rows}\r\n", rows.len());
            // no "0\r\n\r\n": the connection just ends
        }
    });
    let temp = crate::process::TempDir::new();
    let file = temp.0.join("bindings.csv");
    let output = std::process::Command::new(crate::process::BIN)
        .args(["ctl", "bindings", "export", "--file"])
        .arg(&file)
        .env("REACHBACK_SERVER", format!("http://127.0.0.1:{port}"))
        .env("REACHBACK_TOKEN", "rbk_any")
        .output()
        .expect("ctl runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a cut-off export is a failure: {stderr}");
    assert!(stderr.contains("cut off") && stderr.contains("removed"), "{stderr}");
    assert!(!file.exists(), "no partial file is left behind");
}
