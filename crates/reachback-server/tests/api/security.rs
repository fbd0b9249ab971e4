//! The protections a security review asked for, at the HTTP boundary: connector
//! provisioning keys that expire and serve once, audited enrollments, enrollment
//! keys limited to hostnames, limits on failed console sign-ins, the metrics token,
//! and the CA's private key encrypted in the database under the shared secret key.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use crate::harness::{Backend, Reply, TOKEN, TestServer};
use crate::on_both_backends;

on_both_backends!(
    provisioning_keys_expire_and_serve_once,
    enrollments_are_audited,
    enrollment_keys_limited_to_hostnames,
    failed_console_sign_ins_are_limited,
    metrics_need_the_token_when_one_is_set,
    ca_key_is_encrypted_under_the_secret_key,
);

fn public_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()
}

async fn audit(server: &TestServer, query: &str) -> Value {
    let reply = server.get(&format!("/api/v1/audit-logs?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

async fn enroll_connector(server: &TestServer, key: &str) -> Reply {
    server.call(Method::POST, "/api/v1/connectors/enroll", Some(json!({"provisioning_key": key, "public_key": public_key()})), None).await
}

fn seconds_from_now(text: &Value) -> i64 {
    let at = time::OffsetDateTime::parse(text.as_str().expect("timestamp"), &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    (at - time::OffsetDateTime::now_utc()).whole_seconds()
}

async fn provisioning_keys_expire_and_serve_once(server: TestServer) {
    let created = server.post("/api/v1/connectors", json!({"name": "dc1"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let connector = created.json();
    let (id, key) = (connector["id"].as_str().expect("id").to_string(), connector["provisioning_key"].as_str().expect("key").to_string());
    assert!((86_390..=86_400).contains(&seconds_from_now(&connector["provisioning_key_expires_at"])), "24 h by default: {connector}");
    assert_eq!((connector["provisioning_key_reusable"].clone(), connector["provisioning_key_used_at"].clone()), (json!(false), Value::Null));

    let enrolled = enroll_connector(&server, &key).await;
    assert_eq!(enrolled.status, StatusCode::OK, "{}", enrolled.text());
    let path = format!("/api/v1/connectors/{id}");
    let after_first = server.get(&path).await.json();
    assert!(after_first["provisioning_key_used_at"].is_string(), "{after_first}");
    // single use: the same key again is a 401 that changes nothing
    let again = enroll_connector(&server, &key).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED, "{}", again.text());
    assert!(again.json()["detail"].as_str().expect("detail").contains("has been used"), "{}", again.text());
    assert_eq!(server.get(&path).await.json(), after_first);
    let enrollments = audit(&server, "action=enroll&resource_type=connector").await;
    assert_eq!(enrollments["total"], 1, "{enrollments}");
    assert_eq!(enrollments["items"][0]["actor"], format!("provisioning_key:{}", connector["provisioning_key_id"].as_str().expect("key id")));
    assert_eq!(enrollments["items"][0]["resource_id"], id.as_str());

    // a new key for the same connector: the old one stops working, the new one serves once
    let issued = server.post(&format!("{path}/provisioning-key"), json!({"provisioning_key_ttl_seconds": 3600})).await;
    assert_eq!(issued.status, StatusCode::OK, "{}", issued.text());
    let issued = issued.json();
    assert_ne!(issued["provisioning_key_id"], connector["provisioning_key_id"]);
    assert!((3590..=3600).contains(&seconds_from_now(&issued["provisioning_key_expires_at"])), "{issued}");
    assert_eq!(issued["provisioning_key_used_at"], Value::Null);
    let new_key = issued["provisioning_key"].as_str().expect("new key").to_string();
    assert_eq!(server.call(Method::POST, &format!("{path}/provisioning-key"), Some(json!({})), Some("rbk_nobody")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.post("/api/v1/connectors/nope/provisioning-key", json!({})).await.status, StatusCode::NOT_FOUND);
    assert_eq!(audit(&server, "action=issue_provisioning_key").await["total"], 1);
    // two enrollments race with the single-use key: one wins
    let (first, second) = tokio::join!(enroll_connector(&server, &new_key), enroll_connector(&server, &new_key));
    let mut statuses = [first.status, second.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::UNAUTHORIZED], "{} / {}", first.text(), second.text());
    assert_eq!(enroll_connector(&server, &key).await.status, StatusCode::UNAUTHORIZED, "the replaced key");
    assert_eq!(audit(&server, "action=enroll&resource_type=connector").await["total"], 2);

    // an expired key is a 401 that changes nothing
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let soon = soon.format(&time::format_description::well_known::Rfc3339).expect("format");
    let short = server.post("/api/v1/connectors", json!({"name": "dc2", "provisioning_key_expires_at": soon})).await;
    assert_eq!(short.status, StatusCode::CREATED, "{}", short.text());
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let expired = enroll_connector(&server, short.json()["provisioning_key"].as_str().expect("key")).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(expired.json()["detail"].as_str().expect("detail").contains("expired"), "{}", expired.text());
    assert_eq!(audit(&server, "action=enroll&resource_type=connector").await["total"], 2);

    // reusable on request; the default lifetime is a setting
    let reusable = server.post("/api/v1/connectors", json!({"name": "dc3", "provisioning_key_reusable": true})).await.json();
    let reusable_key = reusable["provisioning_key"].as_str().expect("key").to_string();
    assert_eq!(enroll_connector(&server, &reusable_key).await.status, StatusCode::OK);
    assert_eq!(enroll_connector(&server, &reusable_key).await.status, StatusCode::OK);
    assert_eq!(server.patch("/api/v1/settings", json!({"provisioning_key_ttl_seconds": 7200})).await.status, StatusCode::OK);
    let defaulted = server.post("/api/v1/connectors", json!({"name": "dc4"})).await.json();
    assert!((7190..=7200).contains(&seconds_from_now(&defaulted["provisioning_key_expires_at"])), "{defaulted}");
    for bad in [
        json!({"name": "x1", "provisioning_key_ttl_seconds": 10}),
        json!({"name": "x2", "provisioning_key_ttl_seconds": 3600, "provisioning_key_expires_at": soon}),
        json!({"name": "x3", "provisioning_key_expires_at": "2001-01-01T00:00:00Z"}),
        json!({"name": "x4", "provisioning_key_reusable": "yes"}),
    ] {
        assert_eq!(server.post("/api/v1/connectors", bad.clone()).await.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    assert_eq!(server.patch("/api/v1/settings", json!({"provisioning_key_ttl_seconds": 59})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.get("/api/v1/connectors").await.json()["total"], 4);
}

async fn enroll_device(server: &TestServer, key: &str, hostname: &str, public_key: &str) -> Reply {
    server
        .call(Method::POST, "/api/v1/enroll", Some(json!({"enrollment_key": key, "hostname": hostname, "platform": "linux", "public_key": public_key})), None)
        .await
}

async fn new_key(server: &TestServer, body: Value) -> Value {
    let reply = server.post("/api/v1/enrollment-keys", body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn enrollments_are_audited(server: TestServer) {
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "Fleet", "range": "100.64.0.0/24"})).await.status, StatusCode::CREATED);
    let key = new_key(&server, json!({"username": "fleet@corp.example", "reusable": true})).await;
    let secret = key["key"].as_str().expect("key").to_string();
    // enrollments written in one batch each get their row, in the batch's transaction
    let keys: Vec<String> = (0..8).map(|_| public_key()).collect();
    let replies = futures_join_all(&server, &secret, &keys).await;
    assert!(replies.iter().all(|reply| reply.status == StatusCode::CREATED), "every enrollment succeeds");
    let rows = audit(&server, "action=enroll&resource_type=device&page_size=100").await;
    assert_eq!(rows["total"], 8, "{rows}");
    let actor = format!("enrollment_key:{}", key["id"].as_str().expect("id"));
    for reply in &replies {
        let device_id = reply.json()["device_id"].clone();
        let row = rows["items"].as_array().expect("items").iter().find(|row| row["resource_id"] == device_id).expect("a row per device");
        assert_eq!(row["actor"], actor.as_str());
        assert_eq!(row["after"]["username"], "fleet@corp.example");
        assert_eq!(row["after"]["virtual_ip"], reply.json()["virtual_ip"]);
        assert_eq!(row["after"]["new_device"], true);
    }
    // a re-enrollment with the same key pair is audited too; a refused one writes nothing
    assert_eq!(enroll_device(&server, &secret, "host0.corp.example", &keys[0]).await.status, StatusCode::OK);
    assert_eq!(enroll_device(&server, &secret, "host0.corp.example", &public_key()).await.status, StatusCode::CONFLICT);
    assert_eq!(enroll_device(&server, "rbe_wrong", "host9.corp.example", &public_key()).await.status, StatusCode::UNAUTHORIZED);
    let rows = audit(&server, "action=enroll&resource_type=device").await;
    assert_eq!(rows["total"], 9, "{rows}");
    assert_eq!(rows["items"][0]["after"]["new_device"], false);
}

/// Enrolls `host{i}.corp.example` with each key at once, so they share batches.
async fn futures_join_all(server: &TestServer, secret: &str, keys: &[String]) -> Vec<Reply> {
    let tasks: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            let (router, secret, key) = (server.router.clone(), secret.to_string(), key.clone());
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let body = json!({"enrollment_key": secret, "hostname": format!("host{index}.corp.example"), "platform": "linux", "public_key": key});
                let request = Request::builder()
                    .method(Method::POST)
                    .uri("/api/v1/enroll")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .expect("request");
                let response = router.oneshot(request).await.expect("answer");
                let (status, headers) = (response.status(), response.headers().clone());
                Reply { status, headers, body: response.into_body().collect().await.expect("body").to_bytes().to_vec() }
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("task"));
    }
    replies
}

async fn enrollment_keys_limited_to_hostnames(server: TestServer) {
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "Laptops", "range": "100.64.0.0/24"})).await.status, StatusCode::CREATED);
    let suffix = new_key(&server, json!({"username": "alice", "hostname_pattern": " *.Laptops.Corp.Example "})).await;
    assert_eq!(suffix["hostname_pattern"], "*.laptops.corp.example");
    let secret = suffix["key"].as_str().expect("key").to_string();
    let key_path = format!("/api/v1/enrollment-keys/{}", suffix["id"].as_str().expect("id"));
    assert_eq!(server.get(&key_path).await.json()["hostname_pattern"], "*.laptops.corp.example");
    // authentication first: a bad key is a 401 whatever the hostname
    assert_eq!(enroll_device(&server, "rbe_wrong", "x.other.example", &public_key()).await.status, StatusCode::UNAUTHORIZED);
    for outside in ["alice.other.example", "laptops.corp.example", "alice.laptops.corp.example.evil.example"] {
        let refused = enroll_device(&server, &secret, outside, &public_key()).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{outside}: {}", refused.text());
        assert_eq!(refused.json()["errors"][0]["field"], "hostname");
        assert!(refused.text().contains("*.laptops.corp.example"), "{}", refused.text());
    }
    // the refusals did not use the single-use key up
    assert_eq!(server.get(&key_path).await.json()["used_count"], 0);
    assert_eq!(server.get("/api/v1/devices").await.json()["total"], 0);
    assert_eq!(enroll_device(&server, &secret, "Alice-PC.Laptops.corp.example", &public_key()).await.status, StatusCode::CREATED);

    let exact = new_key(&server, json!({"username": "bob", "hostname_pattern": "bob.corp.example", "reusable": true})).await;
    let exact_secret = exact["key"].as_str().expect("key").to_string();
    assert_eq!(enroll_device(&server, &exact_secret, "bob2.corp.example", &public_key()).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(enroll_device(&server, &exact_secret, "x.bob.corp.example", &public_key()).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(enroll_device(&server, &exact_secret, "BOB.corp.example", &public_key()).await.status, StatusCode::CREATED);
    let unlimited = new_key(&server, json!({"username": "carol"})).await;
    assert_eq!(unlimited["hostname_pattern"], Value::Null);

    for bad in ["*.*.corp.example", "bob*.corp.example", "*.example", "*", "not a host", ""] {
        let reply = server.post("/api/v1/enrollment-keys", json!({"username": "x", "hostname_pattern": bad})).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {}", reply.text());
        assert_eq!(reply.json()["errors"][0]["field"], "hostname_pattern");
    }
    assert_eq!(server.get("/api/v1/enrollment-keys").await.json()["total"], 3);
}

async fn sign_in(server: &TestServer, username: &str, password: &str, from: &str) -> Reply {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"username": username, "password": password}).to_string()))
        .expect("request");
    let address: SocketAddr = format!("{from}:40000").parse().expect("address");
    request.extensions_mut().insert(ConnectInfo(address));
    server.send(request).await
}

async fn failed_console_sign_ins_are_limited(server: TestServer) {
    for (name, password) in [("olivia", "olivia's long password"), ("pat", "pat's long password")] {
        let reply = server.post("/api/v1/admins", json!({"username": name, "role": "admin", "password": password})).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
    // five failures for one account, from different addresses
    for attempt in 0..5 {
        let reply = sign_in(&server, "Olivia", "wrong password", &format!("192.0.2.{attempt}")).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    let failures = audit(&server, "action=login_failed").await;
    assert_eq!(failures["total"], 5);
    assert_eq!(failures["items"][0]["actor"], "Olivia", "the username tried");
    assert_eq!(failures["items"][0]["source_ip"], "192.0.2.4");
    // the sixth attempt, even with the right password, waits: 429 with Retry-After, no audit row
    let limited = sign_in(&server, "olivia", "olivia's long password", "192.0.2.99").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text());
    let retry_after: u64 = limited.headers[header::RETRY_AFTER].to_str().expect("text").parse().expect("seconds");
    assert!((800..=900).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(limited.json()["status"], 429);
    assert!(limited.headers.get(header::SET_COOKIE).is_none());
    assert_eq!(audit(&server, "action=login_failed").await["total"], 5);
    assert_eq!(audit(&server, "action=login&resource_type=admin_session").await["total"], 0);
    // another account is not held back by it; a success clears that account's count
    for _ in 0..4 {
        assert_eq!(sign_in(&server, "pat", "wrong password", "198.51.100.1").await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(sign_in(&server, "pat", "pat's long password", "198.51.100.1").await.status, StatusCode::OK);
    for _ in 0..4 {
        assert_eq!(sign_in(&server, "pat", "wrong password", "198.51.100.1").await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(sign_in(&server, "pat", "pat's long password", "198.51.100.1").await.status, StatusCode::OK);
    // one address, twenty failures over many accounts: the twenty-first waits, whoever it names
    for index in 0..20 {
        assert_eq!(sign_in(&server, &format!("nobody{index}"), "guess", "203.0.113.7").await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(sign_in(&server, "pat", "pat's long password", "203.0.113.7").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(sign_in(&server, "pat", "pat's long password", "203.0.113.8").await.status, StatusCode::OK);
    assert_eq!(audit(&server, "action=login_failed").await["total"], 5 + 8 + 20);
}

async fn metrics_need_the_token_when_one_is_set(mut server: TestServer) {
    // open by default
    assert_eq!(server.call(Method::GET, "/metrics", None, None).await.status, StatusCode::OK);
    server.security.metrics_token = Some("metrics-token-0123456789".into());
    server.restart().await;
    for token in [None, Some("metrics-token-012345678"), Some(TOKEN)] {
        let reply = server.call(Method::GET, "/metrics", None, token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/problem+json");
        assert!(!reply.text().contains("reachback_"), "no metrics leak");
    }
    let reply = server.call(Method::GET, "/metrics", None, Some("metrics-token-0123456789")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().contains("reachback_allocation_failures_total"), "{}", reply.text());
}

async fn ca_key_is_encrypted_under_the_secret_key(server: TestServer) {
    let state = server.state.clone().expect("state");
    let (certificate, stored) = state.store.load_ca().await.expect("load").expect("a CA");
    assert!(stored.starts_with("rbenc1:") && !stored.contains("PRIVATE KEY"), "{stored}");
    assert!(!server.data_dir.join("ca-key.pem").exists(), "no private key file");
    assert!(server.data_dir.join("secret.key").exists());
    // another replica with another secret refuses to start, and says why
    let mut other = server.config();
    other.data_dir = server.data_dir.join("other-replica");
    // (a replica of its own: two live processes never share a node name)
    other.node_name = "other-replica".into();
    // the same database (on SQLite too: the first server's file)
    other.database_url = Some(server.config().database_url());
    other.security.secret_key = reachback_server::SecretKeySource::Value(reachback_server::crypto::SecretKey::generate().expect("key"));
    let error = format!("{:#}", reachback_server::build(other.clone()).await.err().expect("refused"));
    assert!(error.contains("encrypted under another secret key") && error.contains("--secret-key-file"), "{error}");
    // so does one with no secret at all (none given, none in its data directory): it generates none
    other.security.secret_key = reachback_server::SecretKeySource::DataDir;
    let error = format!("{:#}", reachback_server::build(other.clone()).await.err().expect("refused"));
    assert!(error.contains("every replica needs the same secret"), "{error}");
    assert!(!other.data_dir.join("secret.key").exists());
    // with the same secret, from a file, it starts and signs with the same CA
    let shared = server.data_dir.join("shared.key");
    std::fs::copy(server.data_dir.join("secret.key"), &shared).expect("copy");
    other.security.secret_key = reachback_server::SecretKeySource::File(shared);
    let replica = reachback_server::build(other).await.expect("a replica with the same secret starts");
    assert_eq!(replica.state.ca.certificate_pem, certificate);
}

/// A CA an older version stored in plaintext, with its `ca-key.pem`: encrypted at
/// start (audited), the file deleted, the same CA in force.
async fn legacy_plaintext_ca_key_is_encrypted(backend: Backend) {
    let Some(mut server) = TestServer::prepare(backend).await else { return };
    std::fs::create_dir_all(&server.data_dir).expect("data dir");
    let url = server.config().database_url();
    let store = reachback_store::Store::connect(&url).await.expect("store");
    let (certificate, private_key) = reachback_server::crypto::CertificateAuthority::generate().expect("CA");
    store.save_ca(&certificate, &private_key).await.expect("plaintext CA, as older versions stored it");
    store.close().await;
    std::fs::write(server.data_dir.join("ca-key.pem"), &private_key).expect("legacy key file");
    server.boot().await;
    let state = server.state.clone().expect("state");
    let (stored_certificate, stored) = state.store.load_ca().await.expect("load").expect("a CA");
    assert_eq!(stored_certificate, certificate);
    assert!(stored.starts_with("rbenc1:") && !stored.contains("PRIVATE KEY"), "{stored}");
    assert!(!server.data_dir.join("ca-key.pem").exists(), "the plaintext key file is deleted");
    assert_eq!(audit(&server, "action=encrypt_ca_key").await["total"], 1);
    assert_eq!(state.ca.certificate_pem, certificate);
    // a restart opens it again
    server.restart().await;
    assert_eq!(server.state.clone().expect("state").ca.certificate_pem, certificate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_plaintext_ca_key_is_encrypted_sqlite() {
    legacy_plaintext_ca_key_is_encrypted(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_plaintext_ca_key_is_encrypted_postgres() {
    legacy_plaintext_ca_key_is_encrypted(Backend::Postgres).await;
}
