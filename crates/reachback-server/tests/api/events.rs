//! Events out, at the API boundary and on the wire, on both backends: a webhook
//! receiver (a local HTTP server) gets every event as CloudEvents batches whose
//! Standard Webhooks signature checks out; events queued while it is down arrive
//! once it is back, also across a server restart; a syslog receiver gets RFC 5424
//! messages with octet counting; type filters, validation and auditing of sinks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::harness::TestServer;
use crate::on_both_backends;

on_both_backends!(
    a_webhook_gets_every_event_signed_and_nothing_is_lost_while_it_is_down,
    a_syslog_receiver_gets_rfc5424_messages,
    sinks_are_validated_filtered_and_audited,
    denied_flows_are_events,
);

/// One request a receiver got: its headers and body.
type Received = (HeaderMap, Vec<u8>);

/// What a receiver got: the requests and whether it answers 503.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Received>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let state = receiver.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    if state.down.load(std::sync::atomic::Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    state.requests.lock().expect("lock").push((headers, body.to_vec()));
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        (receiver, url)
    }

    /// Every event received so far, each request's signature checked with `secret`.
    fn events(&self, secret: &str) -> Vec<Value> {
        let requests = self.requests.lock().expect("lock").clone();
        let mut events = Vec::new();
        for (headers, body) in requests {
            let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("").to_string();
            assert_eq!(header("content-type"), "application/cloudevents-batch+json");
            let timestamp: i64 = header("webhook-timestamp").parse().expect("webhook-timestamp");
            let expected = reachback_server::events::signature(secret, &header("webhook-id"), timestamp, &body).expect("signature");
            assert_eq!(header("webhook-signature"), expected, "the body is signed with the sink's secret");
            let wrong = reachback_server::events::signature("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", &header("webhook-id"), timestamp, &body);
            assert_ne!(Some(header("webhook-signature")), wrong);
            let batch: Value = serde_json::from_slice(&body).expect("JSON");
            events.extend(batch.as_array().expect("a batch").iter().cloned());
        }
        events
    }
}

/// Waits (up to 15 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..150 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn public_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()
}

/// Makes a range, enrolls a device into it and releases its address: audit
/// entries and a binding opened and closed. Answers the address.
async fn some_changes(server: &TestServer, tag: &str, third_octet: u8) -> String {
    let reply = server.post("/api/v1/ip-ranges", json!({"name": format!("Range {tag}"), "range": format!("100.70.{third_octet}.0/28")})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let range_id = reply.json()["id"].as_str().expect("id").to_string();
    let key = server.post("/api/v1/enrollment-keys", json!({"username": format!("user-{tag}"), "reusable": true})).await.json()["key"]
        .as_str()
        .expect("key")
        .to_string();
    let enrolled = server
        .call(
            axum::http::Method::POST,
            "/api/v1/enroll",
            Some(json!({"enrollment_key": key, "hostname": format!("host-{tag}.corp.example"), "platform": "linux", "public_key": public_key()})),
            None,
        )
        .await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{}", enrolled.text());
    let ip = enrolled.json()["virtual_ip"].as_str().expect("ip").to_string();
    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{ip}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.post(&format!("/api/v1/ip-ranges/{range_id}/disable"), json!({})).await.status, StatusCode::OK);
    ip
}

async fn a_webhook_gets_every_event_signed_and_nothing_is_lost_while_it_is_down(mut server: TestServer) {
    let (receiver, url) = Receiver::start().await;
    let created = server.post("/api/v1/event-sinks", json!({"name": "SIEM", "kind": "webhook", "target": url})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let sink = created.json();
    let secret = sink["secret"].as_str().expect("the secret, shown once").to_string();
    assert!(secret.starts_with("whsec_"));
    let id = sink["id"].as_str().expect("id").to_string();
    let sink_created = sink["created_at"].as_str().and_then(reachback_server::request::parse_time).expect("created_at");
    assert!(server.get(&format!("/api/v1/event-sinks/{id}")).await.json().get("secret").is_none(), "the secret is not shown again");

    let ip = some_changes(&server, "a", 1).await;
    let wanted = |events: &[Value], ip: &str| {
        let kinds: BTreeSet<String> =
            events.iter().filter(|event| event["subject"] == ip).map(|event| event["type"].as_str().unwrap_or("").to_string()).collect();
        kinds.contains("com.reachback.binding.bound") && kinds.contains("com.reachback.binding.released")
    };
    eventually("the first events", || wanted(&receiver.events(&secret), &ip)).await;
    let events = receiver.events(&secret);
    let bound = events.iter().find(|event| event["type"] == "com.reachback.binding.bound").expect("bound");
    assert_eq!(bound["specversion"], "1.0");
    assert_eq!(bound["source"], "urn:reachback");
    assert_eq!(bound["data"]["username"], "user-a");
    assert_eq!(bound["data"]["client_hostname"], "host-a.corp.example");
    assert!(bound["time"].as_str().is_some_and(|time| reachback_server::request::parse_time(time).is_some()), "{bound}");
    let released = events.iter().find(|event| event["type"] == "com.reachback.binding.released").expect("released");
    assert_eq!(released["data"]["reason"], "admin_release");
    // every audit entry written since the sink exists arrived as an event
    let audit = server.get("/api/v1/audit-logs?page_size=1000").await.json();
    let received: BTreeSet<String> = events.iter().filter_map(|event| event["id"].as_str().map(str::to_string)).collect();
    let mut audited = 0;
    for entry in audit["items"].as_array().expect("items") {
        if entry["resource_type"] == "event_sink" || entry["resource_id"] == id {
            continue;
        }
        let at = entry["at"].as_str().and_then(reachback_server::request::parse_time).expect("at");
        if at < sink_created {
            continue; // before the sink existed
        }
        assert!(received.contains(&format!("audit-{}", entry["id"].as_str().expect("id"))), "missing {entry}");
        audited += 1;
    }
    assert!(audited >= 4, "{audited} audit entries checked");

    // the receiver goes down: events wait, failures show, and nothing is lost
    receiver.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = receiver.requests.lock().expect("lock").len();
    let ip_b = some_changes(&server, "b", 2).await;
    let mut pending = 0;
    for _ in 0..100 {
        let state = server.get(&format!("/api/v1/event-sinks/{id}")).await.json();
        pending = state["pending"].as_i64().unwrap_or(0);
        if state["failures"].as_i64().unwrap_or(0) > 0 && pending > 0 {
            assert!(state["last_error"].as_str().is_some_and(|error| error.contains("503")), "{state}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pending > 0, "events wait while the receiver is down");
    assert_eq!(receiver.requests.lock().expect("lock").len(), before, "nothing was taken meanwhile");
    let metrics = server.get("/metrics").await.text();
    assert!(metrics.contains("reachback_event_delivery_failures_total{sink=\"SIEM\"}"), "{metrics}");
    assert!(metrics.contains("reachback_event_sink_lag_seconds{sink=\"SIEM\"}"), "{metrics}");
    // a restart while they wait: the outbox is in the database
    server.restart().await;
    let ip_c = some_changes(&server, "c", 3).await;
    receiver.down.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("the queued events after the receiver came back", || {
        let events = receiver.events(&secret);
        wanted(&events, &ip_b) && wanted(&events, &ip_c)
    })
    .await;
    let mut drained = false;
    for _ in 0..100 {
        let state = server.get(&format!("/api/v1/event-sinks/{id}")).await.json();
        if state["pending"] == 0 && state["failures"] == 0 {
            assert!(state["delivered_total"].as_i64().unwrap_or(0) >= 10, "{state}");
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(drained, "the outbox drains once the receiver is back");
    // in order: each address bound before it was released
    let events = receiver.events(&secret);
    for ip in [&ip, &ip_b, &ip_c] {
        let position = |kind: &str| events.iter().position(|event| event["subject"] == ip.as_str() && event["type"] == kind).expect("event");
        assert!(position("com.reachback.binding.bound") < position("com.reachback.binding.released"), "{ip}");
    }
    let metrics = server.get("/metrics").await.text();
    assert!(metrics.contains("reachback_events_delivered_total{sink=\"SIEM\"}"), "{metrics}");
    assert!(metrics.contains("reachback_event_sink_pending{sink=\"SIEM\"} 0"), "{metrics}");
}

async fn a_syslog_receiver_gets_rfc5424_messages(server: TestServer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = format!("tcp://{}", listener.local_addr().expect("address"));
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes).await;
                sink.lock().expect("lock").extend_from_slice(&bytes);
            });
        }
    });
    let created =
        server.post("/api/v1/event-sinks", json!({"name": "syslog", "kind": "syslog", "target": target, "event_types": ["com.reachback.binding."]})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert!(created.json().get("secret").is_none(), "syslog has no signing secret");
    let ip = some_changes(&server, "s", 4).await;
    // octet-counted frames: "LEN SP MSG"
    let messages = || {
        let bytes = received.lock().expect("lock").clone();
        let mut messages = Vec::new();
        let mut rest = &bytes[..];
        while let Some(space) = rest.iter().position(|byte| *byte == b' ') {
            let Some(length) = std::str::from_utf8(&rest[..space]).ok().and_then(|text| text.parse::<usize>().ok()) else { break };
            let Some(message) = rest.get(space + 1..space + 1 + length) else { break };
            messages.push(String::from_utf8_lossy(message).into_owned());
            rest = &rest[space + 1 + length..];
        }
        messages
    };
    eventually("two syslog messages", || messages().len() >= 2).await;
    let messages = messages();
    assert_eq!(messages.len(), 2, "only the binding events pass the sink's filter: {messages:?}");
    let bound = &messages[0];
    assert!(bound.starts_with("<110>1 "), "{bound}");
    let fields: Vec<&str> = bound.splitn(7, ' ').collect();
    assert!(reachback_server::request::parse_time(fields[1]).is_some(), "RFC 3339 timestamp: {bound}");
    assert_eq!((fields[3], fields[4], fields[5]), ("reachback", "-", "binding.bound"), "{bound}");
    assert!(fields[6].starts_with("[reachback@32473 id=\"binding-"), "{bound}");
    let json_start = bound.find("\u{feff}").expect("BOM before the message") + 3;
    let event: Value = serde_json::from_str(&bound[json_start..]).expect("the CloudEvent");
    assert_eq!((event["type"].as_str(), event["subject"].as_str()), (Some("com.reachback.binding.bound"), Some(ip.as_str())));
    assert!(messages[1].starts_with("<109>1 ") && messages[1].contains(" binding.released "), "{}", messages[1]);
}

async fn sinks_are_validated_filtered_and_audited(server: TestServer) {
    for (body, field) in [
        (json!({"name": "x", "kind": "webhook", "target": "ftp://siem.corp.example/"}), "target"),
        (json!({"name": "x", "kind": "webhook", "target": "https://user:pw@siem.corp.example/hook"}), "target"),
        (json!({"name": "x", "kind": "syslog", "target": "https://siem.corp.example/hook"}), "target"),
        (json!({"name": "x", "kind": "syslog", "target": "tcp://siem.corp.example"}), "target"),
        (json!({"name": "x", "kind": "carrier-pigeon", "target": "tcp://a:1"}), "kind"),
        (json!({"name": "x", "kind": "syslog", "target": "tcp://a:1", "event_types": ["binding"]}), "event_types"),
        (json!({"name": "x", "kind": "webhook", "target": "https://a/", "ca_certificate": "not a certificate"}), "ca_certificate"),
        (json!({"name": "x", "kind": "webhook", "target": "https://a/", "enabled": null}), "enabled"),
    ] {
        let reply = server.post("/api/v1/event-sinks", body.clone()).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", reply.text());
        assert_eq!(reply.json()["errors"][0]["field"], field, "{body}: {}", reply.text());
    }
    assert_eq!(server.get("/api/v1/event-sinks").await.json()["total"], 0, "a refusal creates nothing");
    let created = server.post("/api/v1/event-sinks", json!({"name": "SIEM", "kind": "webhook", "target": "https://siem.corp.example/hook"})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.json()["id"].as_str().expect("id").to_string();
    assert_eq!(server.post("/api/v1/event-sinks", json!({"name": "siem", "kind": "syslog", "target": "tcp://a:514"})).await.status, StatusCode::CONFLICT);
    // an admin (not superadmin) may not see or change sinks
    let admin_key = {
        let admin = server.post("/api/v1/admins", json!({"username": "ops", "role": "admin"})).await.json();
        let admin_id = admin["id"].as_str().expect("id").to_string();
        server.post(&format!("/api/v1/admins/{admin_id}/api-keys"), json!({"name": "ops"})).await.json()["key"].as_str().expect("key").to_string()
    };
    assert_eq!(server.call(axum::http::Method::GET, "/api/v1/event-sinks", None, Some(&admin_key)).await.status, StatusCode::FORBIDDEN);
    // a change: the secret stays (not shown), the target changes
    let changed = server
        .patch(&format!("/api/v1/event-sinks/{id}"), json!({"target": "https://siem2.corp.example/hook", "event_types": ["com.reachback.binding."]}))
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text());
    assert!(changed.json().get("secret").is_none(), "the secret is kept, not remade");
    assert_eq!(changed.json()["target"], "https://siem2.corp.example/hook");
    // disabled, nothing waits for it
    let disabled = server.patch(&format!("/api/v1/event-sinks/{id}"), json!({"enabled": false})).await.json();
    assert_eq!((disabled["enabled"].clone(), disabled["pending"].clone()), (json!(false), json!(0)));
    some_changes(&server, "d", 5).await;
    assert_eq!(server.get(&format!("/api/v1/event-sinks/{id}")).await.json()["pending"], 0, "a disabled sink gets no events");
    assert_eq!(server.delete(&format!("/api/v1/event-sinks/{id}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&format!("/api/v1/event-sinks/{id}")).await.status, StatusCode::NOT_FOUND);
    let audit = server.get("/api/v1/audit-logs?resource_type=event_sink&page_size=100").await.json();
    let actions: Vec<&str> = audit["items"].as_array().expect("items").iter().filter_map(|entry| entry["action"].as_str()).collect();
    assert_eq!(actions, ["delete", "update", "update", "create"], "every change is audited");
}

/// Flows the access policy denied are events (`com.reachback.flow.denied`), one per
/// denied flow with its sides and the deciding policy; other verdicts are not.
async fn denied_flows_are_events(server: TestServer) {
    let (receiver, url) = Receiver::start().await;
    let created =
        server.post("/api/v1/event-sinks", json!({"name": "denials", "kind": "webhook", "target": url, "event_types": ["com.reachback.flow."]})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let secret = created.json()["secret"].as_str().expect("secret").to_string();
    let records = crate::flows::varied_flows(reachback_store::now_micros() - 3_600_000_000);
    let denied: Vec<&reachback_store::FlowRecord> = records.iter().filter(|record| record.verdict == reachback_store::FlowVerdict::Denied).collect();
    assert!(denied.len() >= 3, "the sample has denials");
    server.state.as_ref().expect("state").store.insert_flows(&records, "node-a").await.expect("insert");
    eventually("the denied flows", || receiver.events(&secret).len() >= denied.len()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events = receiver.events(&secret);
    assert_eq!(events.len(), denied.len(), "one event per denied flow, none for the other verdicts");
    for (event, record) in events.iter().zip(&denied) {
        assert_eq!(event["type"], "com.reachback.flow.denied");
        assert_eq!(event["subject"], record.destination.ip().to_string());
        assert_eq!(event["data"]["server_ip"], record.server.ip().to_string());
        assert_eq!(event["data"]["virtual_port"], record.destination.port());
        assert_eq!(event["data"]["policy_name"].as_str(), record.policy_name.as_deref());
        assert_eq!(event["data"]["username"].as_str(), record.username.as_deref());
        assert!(event["id"].as_str().is_some_and(|id| id.starts_with("flow-")), "{event}");
    }
}
