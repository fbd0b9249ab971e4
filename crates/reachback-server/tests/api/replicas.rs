//! The replica registry (issue 21) through the API and the store: on either backend
//! the server lists itself; a replica whose heartbeat stopped is declared dead and its
//! client sessions go; a replica declared dead by mistake comes back at its next
//! heartbeat; a row another process took is not written; dead replicas are forgotten
//! after a day.

use axum::http::{Method, StatusCode};
use reachback_store::{ClientSessionRow, Heartbeat};
use serde_json::json;

use crate::harness::TestServer;
use crate::on_both_backends;

on_both_backends!(the_registry_lists_this_replica, dead_replicas_are_declared_and_cleaned_up);

async fn the_registry_lists_this_replica(server: TestServer) {
    let reply = server.get("/api/v1/replicas").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let listing = reply.json();
    assert_eq!((listing["total"].clone(), listing["page"].clone(), listing["page_size"].clone()), (json!(1), json!(1), json!(50)));
    let item = &listing["items"][0];
    assert_eq!(item["node_name"], "test");
    assert_eq!(item["status"], "alive");
    assert_eq!(item["tunnel_endpoint"], format!("127.0.0.1:{}", server.tunnel_port));
    assert_eq!((item["client_sessions"].clone(), item["connectors"].clone()), (json!(0), json!(0)));
    assert!(item["started_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{item}");
    assert!(item["last_heartbeat"].as_str().is_some_and(|at| at.ends_with('Z')), "{item}");
    let mut fields: Vec<&String> = item.as_object().expect("object").keys().collect();
    fields.sort();
    assert_eq!(fields, ["client_sessions", "connectors", "flows", "last_heartbeat", "node_name", "started_at", "status", "tunnel_endpoint"]);
    // the heartbeat moves
    let first = item["last_heartbeat"].clone();
    let mut later = first.clone();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        later = server.get("/api/v1/replicas").await.json()["items"][0]["last_heartbeat"].clone();
        if later != first {
            break;
        }
    }
    assert_ne!(later, first, "the heartbeat is written every second");
    // the listing conventions
    assert_eq!(server.get("/api/v1/replicas?status=alive").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/replicas?page_size=1001").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/replicas?page=2").await.json()["items"], json!([]));
    assert_eq!(server.call(Method::GET, "/api/v1/replicas", None, None).await.status, StatusCode::UNAUTHORIZED);
    let metrics = server.call(Method::GET, "/metrics", None, None).await.text();
    assert!(metrics.lines().any(|line| line.starts_with("reachback_replicas_alive ")), "{metrics}");
}

async fn dead_replicas_are_declared_and_cleaned_up(server: TestServer) {
    let state = server.state.clone().expect("state");
    let store = &state.store;
    // another replica with a session of its own
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "Main", "range": "100.64.0.0/24"})).await.status, StatusCode::CREATED);
    let key = server.post("/api/v1/enrollment-keys", json!({"username": "alice", "reusable": true})).await.json()["key"].as_str().expect("key").to_string();
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let enrolled = server
        .call(
            Method::POST,
            "/api/v1/enroll",
            Some(json!({"enrollment_key": key, "hostname": "laptop.corp.example", "platform": "windows", "public_key": public_key})),
            None,
        )
        .await
        .json();
    store.register_replica("other", "run-1", "10.0.0.2:8443").await.expect("register");
    let session = ClientSessionRow {
        id: "session-of-other".into(),
        device_id: enrolled["device_id"].as_str().unwrap_or_else(|| panic!("enrolled: {enrolled}")).into(),
        client_hostname: String::new(),
        username: String::new(),
        platform: String::new(),
        virtual_ip: enrolled["virtual_ip"].as_str().map(str::to_string),
        broker_node: "other".into(),
        remote_addr: "10.0.0.9:5000".into(),
        connected_at: reachback_store::now_micros(),
    };
    store.insert_client_session(&session).await.expect("session");
    let listed = |name: &'static str| {
        let server = &server;
        async move {
            let listing = server.get("/api/v1/replicas").await.json();
            listing["items"].as_array().expect("items").iter().find(|item| item["node_name"] == name).cloned()
        }
    };
    let other = listed("other").await.expect("listed");
    assert_eq!((other["status"].clone(), other["client_sessions"].clone()), (json!("alive"), json!(1)));

    // its heartbeat stops: within the threshold nothing happens; past it, declared dead and
    // its sessions deleted (a 1 s threshold here, so this server's own sweep, at 3 s, is not first)
    assert_eq!(store.sweep_dead_replicas(1_000_000, 86_400_000_000).await.expect("sweep"), Vec::new());
    server.raw_sql("UPDATE replicas SET last_heartbeat = last_heartbeat - 2000000 WHERE node_name = 'other'").await;
    assert_eq!(store.sweep_dead_replicas(1_000_000, 86_400_000_000).await.expect("sweep"), vec![("other".to_string(), 1)]);
    assert_eq!(store.sweep_dead_replicas(1_000_000, 86_400_000_000).await.expect("sweep"), Vec::new(), "declared once");
    // a heartbeat older than 3 s is listed dead at once, whoever sweeps
    store.register_replica("third", "run-1", "10.0.0.4:8443").await.expect("register");
    assert_eq!(listed("third").await.expect("listed")["status"], "alive");
    server.raw_sql("UPDATE replicas SET last_heartbeat = last_heartbeat - 10000000 WHERE node_name = 'third'").await;
    assert_eq!(listed("third").await.expect("listed")["status"], "dead");
    server.raw_sql("DELETE FROM replicas WHERE node_name = 'third'").await;
    assert_eq!(server.get("/api/v1/client-sessions").await.json()["total"], 0);
    let other = listed("other").await.expect("still listed");
    assert_eq!(
        (other["status"].clone(), other["client_sessions"].clone(), other["connectors"].clone(), other["flows"].clone()),
        (json!("dead"), json!(0), json!(0), json!(0))
    );
    assert_eq!(listed("test").await.expect("this replica")["status"], "alive");

    // the process was alive after all (heartbeats late): its next heartbeat brings it back
    assert_eq!(store.replica_heartbeat("other", "run-1", "10.0.0.2:8443", 2, 7).await.expect("heartbeat"), Heartbeat::Revived);
    assert_eq!(store.replica_heartbeat("other", "run-1", "10.0.0.2:8443", 2, 7).await.expect("heartbeat"), Heartbeat::Alive);
    let other = listed("other").await.expect("listed");
    assert_eq!((other["status"].clone(), other["connectors"].clone(), other["flows"].clone()), (json!("alive"), json!(2), json!(7)));
    // a new run under the name takes the row over: the old run's heartbeat no longer writes it
    store.register_replica("other", "run-2", "10.0.0.3:8443").await.expect("register");
    assert_eq!(store.replica_heartbeat("other", "run-1", "10.0.0.2:8443", 5, 9).await.expect("heartbeat"), Heartbeat::Lost);
    let other = listed("other").await.expect("listed");
    assert_eq!((other["tunnel_endpoint"].clone(), other["connectors"].clone(), other["flows"].clone()), (json!("10.0.0.3:8443"), json!(0), json!(0)));

    // a clean stop marks it dead; a day later it is forgotten
    store.replica_stopped("other", "run-2").await.expect("stopped");
    assert_eq!(listed("other").await.expect("listed")["status"], "dead");
    server.raw_sql("UPDATE replicas SET last_heartbeat = last_heartbeat - 90000000000 WHERE node_name = 'other'").await;
    assert_eq!(store.sweep_dead_replicas(3_000_000, 86_400_000_000).await.expect("sweep"), Vec::new());
    assert!(listed("other").await.is_none(), "forgotten");
    assert_eq!(server.get("/api/v1/replicas").await.json()["total"], 1);
}
