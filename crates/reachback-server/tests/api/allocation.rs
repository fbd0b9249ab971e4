//! Every change of addresses reaches the allocation engine at once, on both
//! backends: the next enrollment is planned from the engine, so a write the engine
//! missed shows up here as an address taken from a range that is gone or from a
//! range's old block, or as a released address never offered again (the range
//! looks full).

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;
use crate::on_both_backends;

on_both_backends!(every_address_change_reaches_the_engine);

async fn create_range(server: &TestServer, name: &str, range: &str) -> String {
    let reply = server.post("/api/v1/ip-ranges", json!({"name": name, "range": range})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["id"].as_str().expect("id").to_string()
}

/// Enrolls a new device; returns the status and the body.
async fn enroll(server: &TestServer, key: &str, hostname: &str) -> (StatusCode, Value) {
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let body = json!({"enrollment_key": key, "hostname": hostname, "platform": "linux", "public_key": public_key});
    let reply = server.call(Method::POST, "/api/v1/enroll", Some(body), None).await;
    (reply.status, if reply.status == StatusCode::CREATED { reply.json() } else { json!({"refused": reply.text()}) })
}

/// Enrolls a new device that must get `expected`; returns its id.
async fn enrolled_at(server: &TestServer, key: &str, hostname: &str, expected: &str) -> String {
    let (status, body) = enroll(server, key, hostname).await;
    assert_eq!((status, body["virtual_ip"].as_str()), (StatusCode::CREATED, Some(expected)), "{hostname}: {body}");
    body["device_id"].as_str().expect("device").to_string()
}

async fn full(server: &TestServer, key: &str, hostname: &str) {
    let (status, body) = enroll(server, key, hostname).await;
    assert_eq!(status, StatusCode::CONFLICT, "{hostname}: the range should be full: {body}");
}

async fn every_address_change_reaches_the_engine(server: TestServer) {
    let reply = server.post("/api/v1/enrollment-keys", json!({"username": "ops@corp.example", "reusable": true})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let key = reply.json()["key"].as_str().expect("key").to_string();

    // a range edited to a new block: the engine plans from the new block only
    let moving = create_range(&server, "Moving", "100.64.0.0/24").await;
    let reply = server.patch(&format!("/api/v1/ip-ranges/{moving}"), json!({"range": "100.65.0.0/24"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    enrolled_at(&server, &key, "moved.corp.example", "100.65.0.1").await;

    // deleted ranges (one by force, one empty) are no longer offered, though they
    // have the most free addresses
    let small = create_range(&server, "Small", "100.66.0.1-100.66.0.2").await;
    let spare = create_range(&server, "Spare", "100.67.0.0/24").await;
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{moving}?force=true")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{spare}")).await.status, StatusCode::NO_CONTENT);
    let first = enrolled_at(&server, &key, "first.corp.example", "100.66.0.1").await;
    let second = enrolled_at(&server, &key, "second.corp.example", "100.66.0.2").await;
    full(&server, &key, "third.corp.example").await;

    // released addresses come back (out of quarantine: nothing fresh is left), by an
    // admin's release and by a device's deletion
    assert_eq!(server.delete("/api/v1/ip-bindings/100.66.0.1").await.status, StatusCode::NO_CONTENT);
    enrolled_at(&server, &key, "third.corp.example", "100.66.0.1").await;
    full(&server, &key, "fourth.corp.example").await;
    assert_eq!(server.delete(&format!("/api/v1/devices/{second}")).await.status, StatusCode::NO_CONTENT);
    enrolled_at(&server, &key, "fourth.corp.example", "100.66.0.2").await;
    full(&server, &key, "fifth.corp.example").await;

    // the idle TTL releases both bindings; with quarantine off they are fresh again,
    // lowest first
    let reply = server.patch("/api/v1/settings", json!({"binding_idle_ttl_seconds": 60, "release_quarantine_seconds": 0})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let state = server.state.as_ref().expect("state");
    let later = reachback_store::now_micros() + 120_000_000;
    assert_eq!(reachback_server::release_idle_now(state, later).await.expect("idle release"), 2);
    enrolled_at(&server, &key, "fifth.corp.example", "100.66.0.1").await;
    enrolled_at(&server, &key, "sixth.corp.example", "100.66.0.2").await;
    full(&server, &key, "seventh.corp.example").await;

    // the store agrees: the first device lost its address to the admin's release
    let device = server.get(&format!("/api/v1/devices/{first}")).await.json();
    assert_eq!(device["virtual_ip"], Value::Null, "{device}");
    let range = server.get(&format!("/api/v1/ip-ranges/{small}")).await.json();
    assert_eq!(range["used_ips"], 2, "{range}");
    let store = &state.store;
    assert_eq!(store.verify_history().await.expect("history check"), Vec::<String>::new());
    assert_eq!(store.verify_counters().await.expect("counters"), Vec::<(String, i64, i64)>::new());
}
