//! Three `reachback server` processes on one PostgreSQL database, 3,000 concurrent
//! enrollments spread over them: each succeeds or fails cleanly, no address twice.
//! Runs when `REACHBACK_TEST_POSTGRES` is set (and fails if PostgreSQL is then unreachable).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request, unique};

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

#[test]
fn three_replicas_never_bind_an_address_twice() {
    let Some(admin_url) = std::env::var("REACHBACK_TEST_POSTGRES").ok().filter(|url| !url.is_empty()) else {
        eprintln!("REACHBACK_TEST_POSTGRES not set: replica test off");
        return;
    };
    let database = Database::create(&admin_url);
    let url = database.url();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new()).collect();
    // every replica needs the secret key the CA's private key is encrypted under
    let secret = dirs[0].0.join("shared-secret.key");
    std::fs::write(&secret, format!("{}\n", "5e".repeat(32))).expect("secret key file");
    let secret = secret.to_str().expect("UTF-8 path").to_string();
    let replica_args = ["--bootstrap-token", TOKEN, "--secret-key-file", secret.as_str()];
    let first = Server::start(&dirs[0].0, Some(&url), &replica_args);
    let http = agent();
    // 2,046 addresses for 3,000 enrollments: some must be refused, cleanly
    let (status, _) =
        request(&http, "POST", &format!("{}/api/v1/ip-ranges", first.base), Some(TOKEN), Some(&json!({"name": "Shared", "range": "100.64.0.0/21"})));
    assert_eq!(status, 201);
    let (_, key) =
        request(&http, "POST", &format!("{}/api/v1/enrollment-keys", first.base), Some(TOKEN), Some(&json!({"username": "fleet", "reusable": true})));
    let key = key["key"].as_str().expect("key").to_string();
    let others: Vec<Server> = dirs[1..].iter().map(|dir| Server::start(&dir.0, Some(&url), &replica_args)).collect();
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

    // single-use keys raced on all three replicas at once: the database's
    // conditional update lets each key serve exactly one of them
    let (status, _) =
        request(&http, "POST", &format!("{}/api/v1/ip-ranges", first.base), Some(TOKEN), Some(&json!({"name": "Keys", "range": "100.65.0.0/24"})));
    assert_eq!(status, 201);
    // the other replicas pick up range changes every 2 s
    std::thread::sleep(std::time::Duration::from_secs(3));
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
    assert_eq!(bindings["total"], 20);
}
