//! Three `reachback server` processes on one PostgreSQL database, 3,000 concurrent
//! enrollments spread over them: each succeeds or fails cleanly, no address twice.
//! Runs when `REACHBACK_TEST_POSTGRES` is set (and fails if PostgreSQL is then unreachable).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request, server_refuses, unique};

struct Database {
    admin_url: String,
    name: String,
}

impl Database {
    fn create(admin_url: &str) -> Database {
        let name = unique("reachback_replicas");
        let status = std::process::Command::new("psql").args([admin_url, "-qc", &format!("CREATE DATABASE {name}")]).status().expect("psql runs");
        assert!(status.success(), "REACHBACK_TEST_POSTGRES is set but PostgreSQL is unreachable");
        Database { admin_url: admin_url.to_string(), name }
    }

    fn url(&self) -> String {
        let base = self.admin_url.rsplit_once('/').map(|(base, _)| base).unwrap_or(&self.admin_url);
        format!("{base}/{}", self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql").args([&self.admin_url, "-qc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)]).status();
    }
}

/// What the replica tests share: a database of their own, data directories, and
/// the secret every replica needs (the CA key is sealed under it). `None`, said
/// aloud, when REACHBACK_TEST_POSTGRES is not set.
struct Shared {
    database: Database,
    url: String,
    dirs: Vec<TempDir>,
    secret: String,
}

impl Shared {
    fn new(replicas: usize) -> Option<Shared> {
        let Some(admin_url) = std::env::var("REACHBACK_TEST_POSTGRES").ok().filter(|url| !url.is_empty()) else {
            eprintln!("REACHBACK_TEST_POSTGRES not set: replica test off");
            return None;
        };
        let database = Database::create(&admin_url);
        let url = database.url();
        let dirs: Vec<TempDir> = (0..replicas).map(|_| TempDir::new()).collect();
        let secret = dirs[0].0.join("shared-secret.key");
        std::fs::write(&secret, format!("{}\n", "5e".repeat(32))).expect("secret key file");
        Some(Shared { database, url, dirs, secret: secret.to_string_lossy().into_owned() })
    }
}

#[test]
fn three_replicas_never_bind_an_address_twice() {
    let Some(Shared { database: _database, url, dirs, secret }) = Shared::new(3) else { return };
    let replica_args = |name: &'static str| ["--bootstrap-token", TOKEN, "--secret-key-file", secret.as_str(), "--node-name", name];
    let first = Server::start(&dirs[0].0, Some(&url), &replica_args("first"));
    let http = agent();
    // 2,046 addresses for 3,000 enrollments: some must be refused, cleanly
    let (status, _) =
        request(&http, "POST", &format!("{}/api/v1/ip-ranges", first.base), Some(TOKEN), Some(&json!({"name": "Shared", "range": "100.64.0.0/21"})));
    assert_eq!(status, 201);
    let (_, key) =
        request(&http, "POST", &format!("{}/api/v1/enrollment-keys", first.base), Some(TOKEN), Some(&json!({"username": "fleet", "reusable": true})));
    let key = key["key"].as_str().expect("key").to_string();
    let others: Vec<Server> = dirs[1..].iter().zip(["second", "third"]).map(|(dir, name)| Server::start(&dir.0, Some(&url), &replica_args(name))).collect();
    let bases: Vec<String> = std::iter::once(first.base.clone()).chain(others.iter().map(|server| server.base.clone())).collect();

    let next = Arc::new(AtomicUsize::new(0));
    // each enrollment's status and virtual IP
    type Results = Arc<Mutex<Vec<(u16, Option<String>)>>>;
    let results: Results = Arc::default();
    let workers: Vec<_> = (0..48)
        .map(|_| {
            let (next, results, bases, key) = (next.clone(), results.clone(), bases.clone(), key.clone());
            std::thread::spawn(move || {
                let http = agent();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= 3000 {
                        return;
                    }
                    let base = &bases[index % bases.len()];
                    let body = json!({"enrollment_key": key, "hostname": format!("c{index}.corp.example"), "platform": "windows", "public_key": public_key()});
                    let (status, reply) = request(&http, "POST", &format!("{base}/api/v1/enroll"), None, Some(&body));
                    results.lock().expect("lock").push((status, reply["virtual_ip"].as_str().map(str::to_string)));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let results = results.lock().expect("lock").clone();
    assert_eq!(results.len(), 3000);
    let created: Vec<&String> = results.iter().filter(|(status, _)| *status == 201).filter_map(|(_, ip)| ip.as_ref()).collect();
    let refused = results.iter().filter(|(status, _)| *status == 409).count();
    let other: Vec<u16> = results.iter().map(|(status, _)| *status).filter(|status| *status != 201 && *status != 409).collect();
    assert!(other.is_empty(), "every enrollment succeeds or is refused cleanly: {other:?}");
    let unique_ips: HashSet<&String> = created.iter().copied().collect();
    assert_eq!(unique_ips.len(), created.len(), "an address was handed out twice");
    assert_eq!(created.len(), 2046, "every address of the range is used once the pool runs dry ({refused} refused)");
    let (_, ranges) = request(&http, "GET", &format!("{}/api/v1/ip-ranges", bases[2]), Some(TOKEN), None);
    assert_eq!(ranges["items"][0]["used_ips"], 2046);
    let (_, bindings) = request(&http, "GET", &format!("{}/api/v1/ip-bindings?ip=100.64.0.0/21&page_size=1", bases[1]), Some(TOKEN), None);
    assert_eq!(bindings["total"], 2046);
    // the history has exactly the bindings written, each once, whichever replica won
    // the address: addresses another replica took first left no interval behind
    let (_, history) = request(&http, "GET", &format!("{}/api/v1/ip-bindings/history?ip=100.64.0.0/21&page_size=1", bases[2]), Some(TOKEN), None);
    assert_eq!(history["total"], 2046);
    let (_, open) = request(&http, "GET", &format!("{}/api/v1/ip-bindings/history?from=9999-01-01T00:00:00Z&page_size=1", bases[0]), Some(TOKEN), None);
    assert_eq!(open["total"], 2046, "every interval is still open");

    // single-use keys raced on all three replicas at once: the database's
    // conditional update lets each key serve exactly one of them
    let (status, _) =
        request(&http, "POST", &format!("{}/api/v1/ip-ranges", first.base), Some(TOKEN), Some(&json!({"name": "Keys", "range": "100.65.0.0/24"})));
    assert_eq!(status, 201);
    // the other replicas pick up the range when notified: wait until both can enroll into it
    let probe_key =
        request(&http, "POST", &format!("{}/api/v1/enrollment-keys", first.base), Some(TOKEN), Some(&json!({"username": "probe", "reusable": true}))).1;
    let probe_key = probe_key["key"].as_str().expect("key").to_string();
    for base in &bases[1..] {
        time_until("the new range at every replica", || {
            let body = json!({"enrollment_key": probe_key, "hostname": format!("{}.corp.example", unique("probe").replace('_', "-")), "platform": "linux", "public_key": public_key()});
            let (status, reply) = request(&http, "POST", &format!("{base}/api/v1/enroll"), None, Some(&body));
            status == 201 && reply["virtual_ip"].as_str().is_some_and(|ip| ip.starts_with("100.65.0."))
        });
    }
    let keys: Vec<(String, String)> = (0..20)
        .map(|index| {
            let (status, key) = request(
                &http,
                "POST",
                &format!("{}/api/v1/enrollment-keys", first.base),
                Some(TOKEN),
                Some(&json!({"username": format!("once{index}"), "reusable": false})),
            );
            assert_eq!(status, 201);
            (key["id"].as_str().expect("id").to_string(), key["key"].as_str().expect("key").to_string())
        })
        .collect();
    let racers: Vec<_> = bases
        .iter()
        .enumerate()
        .map(|(replica, base)| {
            let (base, keys) = (base.clone(), keys.clone());
            std::thread::spawn(move || {
                let http = agent();
                keys.iter()
                    .enumerate()
                    .map(|(index, (_, key))| {
                        let body = json!({"enrollment_key": key, "hostname": format!("once{index}-r{replica}.corp.example"), "platform": "linux", "public_key": public_key()});
                        request(&http, "POST", &format!("{base}/api/v1/enroll"), None, Some(&body)).0
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<Vec<u16>> = racers.into_iter().map(|racer| racer.join().expect("racer")).collect();
    for (index, (id, _)) in keys.iter().enumerate() {
        let per_replica: Vec<u16> = statuses.iter().map(|replica| replica[index]).collect();
        assert_eq!(per_replica.iter().filter(|status| **status == 201).count(), 1, "key {index}: {per_replica:?}");
        assert_eq!(per_replica.iter().filter(|status| **status == 401).count(), 2, "key {index}: {per_replica:?}");
        let (_, stored) = request(&http, "GET", &format!("{}/api/v1/enrollment-keys/{id}", bases[index % 3]), Some(TOKEN), None);
        assert_eq!(stored["used_count"], 1, "key {index}");
    }
    let (_, bindings) = request(&http, "GET", &format!("{}/api/v1/ip-bindings?ip=100.65.0.0/24&page_size=1", bases[0]), Some(TOKEN), None);
    assert_eq!(bindings["total"], 20 + 2, "the twenty keys and the two probes");
}

/// A long-running `reachback` process (agent or connector) and its log.
struct Peer {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Peer {
    fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> Peer {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = std::process::Command::new(crate::process::BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("peer starts");
        Peer { child, log }
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|status| status.is_some())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms for up to 10 s; returns the time it took.
fn time_until(what: &str, mut check: impl FnMut() -> bool) -> std::time::Duration {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(10) {
        if check() {
            return started.elapsed();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Revocations made through replica A reach tunnels held by replica B: deleting a
/// session, releasing a binding, deleting a range by force, deleting a device and
/// revoking a connector each disconnect the peer at B (the goal is 2 s; the
/// assertion leaves room for a slow CI machine and the figure is printed).
#[test]
fn revocations_through_one_replica_disconnect_at_the_other() {
    let Some(Shared { database: _database, url, dirs, secret }) = Shared::new(2) else { return };
    let replica_a = Server::start(&dirs[0].0, Some(&url), &["--bootstrap-token", TOKEN, "--node-name", "replica-a", "--secret-key-file", &secret]);
    let replica_b = Server::start(&dirs[1].0, Some(&url), &["--bootstrap-token", TOKEN, "--node-name", "replica-b", "--secret-key-file", &secret]);
    let http = agent();
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        request(&http, method, &format!("{}/api/v1{path}", replica_a.base), Some(TOKEN), body.as_ref())
    };
    assert_eq!(api("POST", "/ip-ranges", Some(json!({"name": "Main", "range": "100.64.0.0/24"}))).0, 201);
    assert_eq!(api("POST", "/ip-ranges", Some(json!({"name": "Doomed", "range": "100.66.0.0/24", "location": {"country": "JP"}}))).0, 201);
    std::thread::sleep(std::time::Duration::from_secs(1)); // replica B learns the ranges (notified)
    let (_, key) = api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example", "reusable": true})));
    let key = key["key"].as_str().expect("key").to_string();
    let work = TempDir::new();
    // an agent enrolled through and attached to replica B
    let enroll = |name: &str, country: &str| {
        let state = work.0.join(name).to_string_lossy().into_owned();
        let output = std::process::Command::new(crate::process::BIN)
            .args(["agent", "enroll", "--server", &replica_b.base, "--key", &key, "--hostname", &format!("{name}.corp.example"), "--country", country])
            .args(["--state-dir", &state])
            .output()
            .expect("enroll");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        Peer::start(&work.0, name, &["agent", "run", "--state-dir", &state])
    };
    let session_of = |hostname: &str| -> Option<String> {
        let (_, sessions) = api("GET", &format!("/client-sessions?client_hostname={hostname}"), None);
        sessions["items"]
            .as_array()
            .and_then(|items| items.iter().find(|item| item["broker_node"] == "replica-b"))
            .and_then(|item| item["id"].as_str().map(str::to_string))
    };
    let mut laptop = enroll("laptop", "FR");
    time_until("the agent's session at replica B", || session_of("laptop").is_some());

    // 1. a session deleted through A: B disconnects it (the agent comes back with a new session)
    let old = session_of("laptop").expect("session");
    assert_eq!(api("DELETE", &format!("/client-sessions/{old}"), None).0, 204);
    let took = time_until("a new session after the delete", || session_of("laptop").is_some_and(|id| id != old));
    eprintln!("session delete through A → the agent back on B in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // 2. its binding released through A: B disconnects it, it comes back with a new address
    let (_, binding) = api("GET", "/ip-bindings?client_hostname=laptop", None);
    let ip = binding["items"][0]["ip"].as_str().expect("ip").to_string();
    let old = session_of("laptop").expect("session");
    assert_eq!(api("DELETE", &format!("/ip-bindings/{ip}"), None).0, 204);
    let took = time_until("a new session after the release", || session_of("laptop").is_some_and(|id| id != old));
    eprintln!("binding release through A → the agent reconnected at B in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let (_, binding) = api("GET", "/ip-bindings?client_hostname=laptop", None);
    assert_ne!(binding["items"][0]["ip"], ip.as_str(), "a released address stays in quarantine; the device got another");

    // 3. a range deleted by force through A: its agent on B is disconnected
    let mut tokyo = enroll("tokyo", "JP");
    time_until("the Tokyo agent's session", || session_of("tokyo").is_some());
    let old = session_of("tokyo").expect("session");
    let (_, ranges) = api("GET", "/ip-ranges?name=Doomed", None);
    let doomed = ranges["items"][0]["id"].as_str().expect("id").to_string();
    assert_eq!(api("DELETE", &format!("/ip-ranges/{doomed}?force=true"), None).0, 204);
    let took = time_until("the Tokyo agent to reconnect", || session_of("tokyo").is_some_and(|id| id != old));
    eprintln!("forced range delete through A → the agent reconnected at B in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // 4. the device deleted through A: B disconnects it and it is refused for good
    let (_, devices) = api("GET", "/devices?hostname=tokyo", None);
    let device = devices["items"][0]["id"].as_str().expect("device").to_string();
    assert_eq!(api("DELETE", &format!("/devices/{device}"), None).0, 204);
    let took = time_until("the deleted device's agent to stop", || tokyo.exited());
    eprintln!("device delete through A → the agent at B stopped in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    assert!(tokyo.log().contains("revoked"), "{}", tokyo.log());

    // 5. a connector on B revoked through A: disconnected, and refused for good
    let (_, connector) = api("POST", "/connectors", Some(json!({"name": "dc1"})));
    let provisioning_key = connector["provisioning_key"].as_str().expect("key").to_string();
    let socks = format!("127.0.0.1:{}", crate::process::free_port());
    let connector_state = work.0.join("connector").to_string_lossy().into_owned();
    let mut dc1 = Peer::start(
        &work.0,
        "connector",
        &[
            "connector",
            "run",
            "--server",
            &replica_b.base,
            "--key",
            &provisioning_key,
            "--mode",
            "socks5",
            "--socks5-listen",
            &socks,
            "--state-dir",
            &connector_state,
        ],
    );
    let connector_id = connector["id"].as_str().expect("id").to_string();
    // (a connector's status is the holding replica's view: ask B)
    let at_b = |path: &str| request(&http, "GET", &format!("{}/api/v1{path}", replica_b.base), Some(TOKEN), None);
    time_until("the connector online", || at_b(&format!("/connectors/{connector_id}")).1["status"] == "online");
    assert_eq!(api("DELETE", &format!("/connectors/{connector_id}"), None).0, 204);
    let took = time_until("the revoked connector to stop", || dc1.exited());
    eprintln!("connector revoke through A → the connector at B stopped in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}\n{}", dc1.log());
    assert!(!laptop.exited(), "the other agent is unaffected");
}

/// The replica registry and changes pushed between replicas (issue 21): three
/// replicas on one PostgreSQL whose periodic full check is an hour away, so what
/// reaches B and C during the test came through the change notifications. (a) every
/// replica lists the three alive with their session counts; (b) a replica killed
/// with SIGKILL is listed dead by the others within 5 s and its sessions are
/// deleted; (c) a range and a setting changed through A are in force at B and C
/// (the figures are printed; the timing goal is measured by the `replicas` bench).
/// A node name a live process holds is refused.
#[test]
fn three_replicas_list_each_other_and_receive_changes_by_notification() {
    let Some(Shared { database: _database, url, dirs, secret }) = Shared::new(4) else { return };
    let args = |name: &'static str| ["--bootstrap-token", TOKEN, "--secret-key-file", secret.as_str(), "--node-name", name, "--sync-backstop-seconds", "3600"];
    let mut replicas: Vec<Server> =
        ["replica-a", "replica-b", "replica-c"].iter().zip(&dirs).map(|(name, dir)| Server::start(&dir.0, Some(&url), &args(name))).collect();
    let bases: Vec<String> = replicas.iter().map(|server| server.base.clone()).collect();
    let http = agent();
    let at = |index: usize, method: &str, path: &str, body: Option<serde_json::Value>| {
        request(&http, method, &format!("{}/api/v1{path}", bases[index]), Some(TOKEN), body.as_ref())
    };

    // two live processes never share a node name
    let stderr = server_refuses(&dirs[3].0, Some(&url), &args("replica-b"), &[]);
    assert!(stderr.contains("another live server process uses the node name \"replica-b\""), "{stderr}");

    // (c) a range created through A: B and C enroll into it
    assert_eq!(at(0, "POST", "/ip-ranges", Some(json!({"name": "Main", "range": "100.64.0.0/24"}))).0, 201);
    let (_, key) = at(0, "POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example", "reusable": true})));
    let key = key["key"].as_str().expect("key").to_string();
    for index in [1, 2] {
        let took = time_until("the range created through A to be used at B and C", || {
            let body = json!({"enrollment_key": key, "hostname": format!("{}.corp.example", unique("probe").replace('_', "-")), "platform": "linux", "public_key": public_key()});
            request(&http, "POST", &format!("{}/api/v1/enroll", bases[index]), None, Some(&body)).0 == 201
        });
        eprintln!("range created through A → an enrollment into it at replica {index} after {took:?}");
    }
    // (c) a setting changed through A: in force at B and C (GET /settings answers from memory)
    for index in [1, 2] {
        assert_eq!(at(index, "GET", "/settings", None).1["release_quarantine_seconds"], 3600);
    }
    assert_eq!(at(0, "PATCH", "/settings", Some(json!({"release_quarantine_seconds": 7200}))).0, 200);
    for index in [1, 2] {
        let took = time_until("the setting changed through A at B and C", || at(index, "GET", "/settings", None).1["release_quarantine_seconds"] == 7200);
        eprintln!("setting changed through A → in force at replica {index} after {took:?}");
    }

    // agents: two attached to B, one to C
    let work = TempDir::new();
    let enroll = |index: usize, name: &str| {
        let state = work.0.join(name).to_string_lossy().into_owned();
        let output = std::process::Command::new(crate::process::BIN)
            .args(["agent", "enroll", "--server", &bases[index], "--key", &key, "--hostname", &format!("{name}.corp.example"), "--state-dir", &state])
            .output()
            .expect("enroll");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        Peer::start(&work.0, name, &["agent", "run", "--state-dir", &state])
    };
    let _agents = [enroll(1, "laptop-b1"), enroll(1, "laptop-b2"), enroll(2, "laptop-c1")];
    let listing = |index: usize| -> Vec<(String, String, i64)> {
        let (status, replicas) = at(index, "GET", "/replicas", None);
        assert_eq!(status, 200, "{replicas}");
        replicas["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|item| {
                        (
                            item["node_name"].as_str().unwrap_or_default().to_string(),
                            item["status"].as_str().unwrap_or_default().to_string(),
                            item["client_sessions"].as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let row = |name: &str, status: &str, sessions: i64| (name.to_string(), status.to_string(), sessions);

    // (a) every replica lists the three alive, with their sessions
    let all_alive = vec![row("replica-a", "alive", 0), row("replica-b", "alive", 2), row("replica-c", "alive", 1)];
    for index in 0..3 {
        time_until("every replica alive with its sessions", || listing(index) == all_alive);
    }
    let (_, listed) = at(1, "GET", "/replicas", None);
    assert_eq!(listed["total"], 3);
    for item in listed["items"].as_array().expect("items") {
        assert!(item["tunnel_endpoint"].as_str().is_some_and(|endpoint| endpoint.starts_with("127.0.0.1:")), "{item}");
        assert!(item["started_at"].as_str().is_some_and(|at| at.ends_with('Z')) && item["last_heartbeat"].as_str().is_some(), "{item}");
        assert_eq!(item["connectors"], 0);
    }

    // (b) C killed: A and B list it dead within 5 s, and its sessions are gone
    replicas[2].kill();
    let killed = std::time::Instant::now();
    for index in [0, 1] {
        time_until("the killed replica listed dead", || {
            listing(index) == vec![row("replica-a", "alive", 0), row("replica-b", "alive", 2), row("replica-c", "dead", 0)]
        });
    }
    let took = killed.elapsed();
    eprintln!("replica C killed → listed dead with its sessions deleted at A and B after {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let (_, sessions) = at(0, "GET", "/client-sessions", None);
    assert_eq!(sessions["total"], 2, "{sessions}");
    assert!(sessions["items"].as_array().expect("items").iter().all(|item| item["broker_node"] == "replica-b"), "{sessions}");
    // `ctl replicas` lists the same
    let (ok, stdout, stderr) = replicas[0].ctl(TOKEN, &["replicas"]);
    assert!(ok, "{stderr}");
    let lines: Vec<Vec<&str>> = stdout.lines().map(|line| line.split_whitespace().collect()).collect();
    assert!(lines.first().is_some_and(|header| header.starts_with(&["NODE_NAME", "STATUS"])), "{stdout}");
    assert!(
        lines.iter().any(|line| line.starts_with(&["replica-c", "dead"])) && lines.iter().any(|line| line.starts_with(&["replica-b", "alive"])),
        "{stdout}"
    );
    time_until("the alive gauge", || {
        agent()
            .get(&format!("{}/metrics", bases[0]))
            .call()
            .ok()
            .and_then(|mut reply| reply.body_mut().read_to_string().ok())
            .is_some_and(|text| text.lines().any(|line| line == "reachback_replicas_alive 2"))
    });
}

fn curl_socks(socks: u16, url: &str) -> Result<String, String> {
    let output = std::process::Command::new("curl").args(["-sS", "-m", "5", "--socks5", &format!("127.0.0.1:{socks}"), url]).output().expect("curl runs");
    if output.status.success() { Ok(String::from_utf8_lossy(&output.stdout).into_owned()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
}

/// A TCP flow through the SOCKS5 connector to `ip:port`, connected and left open.
fn socks5_connect(socks: u16, ip: &str, port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", socks)).expect("SOCKS5 listener");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    stream.write_all(&[5, 1, 0]).expect("greeting");
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).expect("method");
    let address: std::net::Ipv4Addr = ip.parse().expect("IPv4 address");
    let mut request = vec![5, 1, 0, 1];
    request.extend(address.octets());
    request.extend(port.to_be_bytes());
    stream.write_all(&request).expect("connect request");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).expect("reply");
    assert_eq!(reply[1], 0, "the flow was accepted: {reply:?}");
    stream
}

/// Polls a curl through the connector every 100 ms for up to 15 s; returns the time to the first success.
fn time_until_reachable(socks: u16, url: &str, expected: &str) -> std::time::Duration {
    let started = std::time::Instant::now();
    let mut last = Err(String::new());
    while started.elapsed() < std::time::Duration::from_secs(15) {
        last = curl_socks(socks, url);
        if last.as_deref() == Ok(expected) {
            return started.elapsed();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{url} not reachable through the connector in 15 s: {last:?}");
}

/// A metric's value in a replica's /metrics (0 when absent).
fn metric(http: &ureq::Agent, base: &str, line_start: &str) -> f64 {
    let text = http.get(&format!("{base}/metrics")).call().ok().and_then(|mut reply| reply.body_mut().read_to_string().ok()).unwrap_or_default();
    text.lines().find(|line| line.starts_with(line_start)).and_then(|line| line.rsplit(' ').next()).and_then(|value| value.parse().ok()).unwrap_or(0.0)
}

/// Issue 21: a connector attached to replica A reaches an agent attached to another
/// replica (one relay hop; A checks the policy); the holding replica killed with
/// SIGKILL, the agent comes back through the third with the same virtual IP and the
/// flow works again; the holder stopped with SIGTERM tells the agent to move (a
/// `Bye` that is not final), the agent moves to the replica started again, and the
/// stopped replica exits cleanly; a holder whose process stops answering (SIGSTOP) is
/// left within 2.5 keepalives for a live one.
#[test]
fn flows_cross_replicas_and_follow_the_agent_when_its_replica_goes() {
    let Some(Shared { database: _database, url, dirs, secret }) = Shared::new(4) else { return };
    let tunnels: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", crate::process::free_port())).collect();
    // the connector knows only A; the agent knows B and C (each replica hands out its list)
    let b_and_c = format!("{},{}", tunnels[1], tunnels[2]);
    let start = |index: usize, name: &str, endpoints: &str| {
        Server::start(
            &dirs[index].0,
            Some(&url),
            &[
                "--bootstrap-token",
                TOKEN,
                "--node-name",
                name,
                "--secret-key-file",
                &secret,
                "--tunnel-listen",
                &tunnels[index.min(2)],
                "--broker-endpoints",
                endpoints,
                // a keepalive every second: step 4's stopped process is left after 2.5 s
                "--client-keepalive",
                "1",
            ],
        )
    };
    let replica_a = start(0, "replica-a", &tunnels[0]);
    let mut replica_b = start(1, "replica-b", &b_and_c);
    let mut replica_c = start(2, "replica-c", &b_and_c);
    let http = agent();
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        request(&http, method, &format!("{}/api/v1{path}", replica_a.base), Some(TOKEN), body.as_ref())
    };
    assert_eq!(api("POST", "/ip-ranges", Some(json!({"name": "Main", "range": "100.64.0.0/24"}))).0, 201);
    let web_port = crate::process::free_port();
    let segment = api("POST", "/app-segments", Some(json!({"name": "web", "destinations": ["100.64.0.0/24"], "tcp_ports": [web_port.to_string()]}))).1;
    assert_eq!(api("POST", "/access-policies", Some(json!({"name": "web", "action": "allow", "segment_ids": [segment["id"]]}))).0, 201);
    let (_, key) = api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example"})));
    let key = key["key"].as_str().expect("key").to_string();
    let (_, connector) = api("POST", "/connectors", Some(json!({"name": "dc1"})));
    let provisioning_key = connector["provisioning_key"].as_str().expect("key").to_string();

    let work = TempDir::new();
    let www = work.0.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello across replicas\n").expect("file");
    let mut web = std::process::Command::new("python3")
        .args(["-m", "http.server", &web_port.to_string(), "--bind", "127.0.0.1", "--directory", &www.to_string_lossy()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 web server");
    let agent_state = work.0.join("agent").to_string_lossy().into_owned();
    let output = std::process::Command::new(crate::process::BIN)
        .args(["agent", "enroll", "--server", &replica_b.base, "--key", &key, "--hostname", "laptop.corp.example", "--state-dir", &agent_state])
        .output()
        .expect("enroll");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let laptop = Peer::start(&work.0, "laptop", &["agent", "run", "--allow-ports", &web_port.to_string(), "--state-dir", &agent_state]);
    let socks = crate::process::free_port();
    let connector_state = work.0.join("connector").to_string_lossy().into_owned();
    let socks_listen = format!("127.0.0.1:{socks}");
    let dc1 = Peer::start(
        &work.0,
        "connector",
        &[
            "connector",
            "run",
            "--server",
            &replica_a.base,
            "--key",
            &provisioning_key,
            "--mode",
            "socks5",
            "--socks5-listen",
            &socks_listen,
            "--state-dir",
            &connector_state,
        ],
    );
    let holder = || -> Option<String> {
        let (_, sessions) = api("GET", "/client-sessions?client_hostname=laptop", None);
        let mut items: Vec<serde_json::Value> = sessions["items"].as_array().cloned().unwrap_or_default();
        items.sort_by_key(|item| item["connected_at"].as_str().unwrap_or_default().to_string());
        items.last().and_then(|item| item["broker_node"].as_str().map(str::to_string))
    };
    time_until("the agent's session", || holder().is_some_and(|node| node != "replica-a"));
    let (_, binding) = api("GET", "/ip-bindings?client_hostname=laptop", None);
    let ip = binding["items"][0]["ip"].as_str().expect("ip").to_string();
    let page = format!("http://{ip}:{web_port}/hello.txt");

    // 1. across replicas: the connector at A, the agent at B or C
    let first = holder().expect("holder");
    let took = time_until_reachable(socks, &page, "hello across replicas\n");
    eprintln!("first flow A → {first} after {took:?}");
    let relayed = |base: &str, direction: &str| metric(&http, base, &format!("reachback_replica_relayed_flows_total{{direction=\"{direction}\"}}"));
    assert!(relayed(&replica_a.base, "out") >= 1.0, "the flow entered at A and was relayed");
    let holder_base = if first == "replica-b" { replica_b.base.clone() } else { replica_c.base.clone() };
    assert!(relayed(&holder_base, "in") >= 1.0, "and reached the agent at {first}");
    // a flow held open is listed with the replica it entered at (within a heartbeat)
    let open_flow = socks5_connect(socks, &ip, web_port);
    let open_flows = |node: &str| -> i64 {
        let (_, replicas) = api("GET", "/replicas", None);
        replicas["items"].as_array().and_then(|items| items.iter().find(|item| item["node_name"] == node)).and_then(|item| item["flows"].as_i64()).unwrap_or(-1)
    };
    time_until("the open flow listed at replica A", || open_flows("replica-a") == 1);
    assert_eq!(open_flows(&first), 0, "a relayed flow counts where it entered");
    drop(open_flow);
    time_until("the closed flow gone from the listing", || open_flows("replica-a") == 0);

    // 2. the holder killed: the agent comes back through the other, same address
    if first == "replica-b" {
        replica_b.kill()
    } else {
        replica_c.kill()
    }
    let took = time_until_reachable(socks, &page, "hello across replicas\n");
    let second = holder().expect("holder");
    eprintln!("{first} killed → reachable again through {second} in {took:?}");
    assert_ne!(second, first);
    assert!(took < std::time::Duration::from_secs(5), "{took:?}\n{}", laptop.log());
    let (_, binding) = api("GET", "/ip-bindings?client_hostname=laptop", None);
    assert_eq!(binding["items"][0]["ip"], ip.as_str(), "the same virtual IP");

    // 3. the killed one back, then the holder stopped with SIGTERM: it tells the agent to
    // move, the agent moves to the one back, and the stopped one exits cleanly
    let restarted = if first == "replica-b" { start(1, "replica-b", &b_and_c) } else { start(2, "replica-c", &b_and_c) };
    let stopped = std::time::Instant::now();
    let status = if second == "replica-b" { replica_b.terminate() } else { replica_c.terminate() };
    eprintln!("{second} stopped (SIGTERM) in {:?}: {status}", stopped.elapsed());
    assert!(status.success(), "a drained replica exits cleanly: {status}");
    let took = time_until_reachable(socks, &page, "hello across replicas\n");
    eprintln!("{second} drained → reachable through {} in {took:?}", holder().unwrap_or_default());
    assert_eq!(holder().as_deref(), Some(first.as_str()), "the agent moved to the replica that came back");
    assert!(laptop.log().contains(reachback_server::broker::DRAIN_REASON), "the agent was told why: {}", laptop.log());

    // 4. the holder's process stops answering (SIGSTOP: its kernel still acknowledges, so
    // only the application's keepalive can tell): the agent gives it up after 2.5
    // keepalives (`--client-keepalive 1`) and moves. A host that vanishes is the netns test's.
    let mut restarted = restarted;
    let mut again = if second == "replica-b" { start(1, "replica-b", &b_and_c) } else { start(2, "replica-c", &b_and_c) };
    let _ = std::process::Command::new("kill").args(["-STOP", &restarted.child.id().to_string()]).status();
    let took = time_until("the agent to move off the silent replica", || holder().is_some_and(|node| node == second));
    eprintln!("{first} silent → the agent attached to {second} after {took:?}");
    // 2.5 s to give up, at most 0.5 s to reconnect; room for a slow machine
    assert!(took < std::time::Duration::from_secs(4), "{took:?}\n{}", laptop.log());
    assert!(laptop.log().contains("the broker stopped answering"), "{}", laptop.log());
    let took = time_until_reachable(socks, &page, "hello across replicas\n");
    eprintln!("{first} silent → reachable through {second} after a further {took:?}");
    restarted.kill();
    again.kill();
    drop(dc1);
    let _ = web.kill();
    let _ = web.wait();
}
