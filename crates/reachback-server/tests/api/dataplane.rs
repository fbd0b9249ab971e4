//! The data plane's API (segments, policies, connectors, client sessions) and the
//! broker's tunnel endpoint over real TLS on loopback: an in-process agent, a
//! hand-driven connector that sends good and bad frames, and a client certificate
//! from a foreign CA. Network namespaces are not needed here (the end-to-end test
//! with TPROXY lives in the `reachback` crate).

use std::time::Duration;

use axum::http::{Method, StatusCode};
use reachback_proto::{ClientRole, FlowOpen, FlowReply, Refusal};
use reachback_tunnel::{Connection, RecvStream, SendStream, TlsMaterial, TunnelConnector, read_frame, write_frame};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{TOKEN, TestServer};
use crate::on_both_backends;

on_both_backends!(segments_and_policies, connectors_enroll_and_revoke, tunnel_flows_and_refusals);

async fn audit_count(server: &TestServer, resource_type: &str) -> i64 {
    server.get(&format!("/api/v1/audit-logs?resource_type={resource_type}")).await.json()["total"].as_i64().expect("total")
}

async fn segments_and_policies(server: TestServer) {
    let created = server
        .post(
            "/api/v1/app-segments",
            json!({"name": "SMB", "destinations": ["100.64.0.0/16", "*.Laptops.corp.example", "100.64.3.7"], "tcp_ports": ["445", "5985-5986"]}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let segment = created.json();
    assert_eq!(segment["destinations"], json!(["100.64.0.0/16", "*.laptops.corp.example", "100.64.3.7"]));
    assert_eq!((segment["tcp_ports"].clone(), segment["udp_ports"].clone(), segment["enabled"].clone()), (json!(["445", "5985-5986"]), json!([]), json!(true)));

    // bad values: 422 naming each field, nothing written
    let bad = server
        .post("/api/v1/app-segments", json!({"name": "bad", "destinations": ["100.64.0.5/16", "*.", "<script>"], "tcp_ports": ["0", "10-5", "70000"]}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<String> =
        bad.json()["errors"].as_array().expect("errors").iter().map(|error| error["field"].as_str().expect("field").to_string()).collect();
    assert_eq!(fields.iter().filter(|field| *field == "destinations").count(), 3, "{fields:?}");
    assert_eq!(fields.iter().filter(|field| *field == "tcp_ports").count(), 3, "{fields:?}");
    assert!(bad.text().contains("did you mean 100.64.0.0/16"), "{}", bad.text());
    assert_eq!(
        server.post("/api/v1/app-segments", json!({"name": "no ports", "destinations": ["100.64.0.0/16"]})).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        server.post("/api/v1/app-segments", json!({"name": "x", "destinations": "100.64.0.0/16", "tcp_ports": ["1"]})).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(server.post("/api/v1/app-segments", json!({"name": "x", "colour": "red"})).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        server.post("/api/v1/app-segments", json!({"name": "smb", "destinations": ["10.0.0.0/8"], "tcp_ports": ["1"]})).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(server.get("/api/v1/app-segments").await.json()["total"], 1, "refused requests wrote nothing");

    // policies: references must exist; order defaults to last; list in evaluation order
    let unknown = server.post("/api/v1/access-policies", json!({"name": "p", "action": "allow", "segment_ids": ["nope"]})).await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", unknown.text());
    assert_eq!(server.post("/api/v1/access-policies", json!({"name": "p", "action": "maybe"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/access-policies", json!({"name": "p"})).await.status, StatusCode::UNPROCESSABLE_ENTITY, "action is required");
    let bad_lists = server
        .post("/api/v1/access-policies", json!({"name": "p", "action": "deny", "platforms": ["beos"], "source_cidrs": ["10.0.0.1/8"], "usernames": [""]}))
        .await;
    assert_eq!(bad_lists.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad_lists.json()["errors"].as_array().expect("errors").len(), 3);
    let first =
        server.post("/api/v1/access-policies", json!({"name": "allow smb", "action": "allow", "segment_ids": [segment["id"]], "platforms": ["Windows"]})).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let first = first.json();
    assert_eq!((first["order"].clone(), first["platforms"].clone()), (json!(1), json!(["windows"])));
    let second = server.post("/api/v1/access-policies", json!({"name": "deny rest", "action": "deny", "source_cidrs": ["10.0.0.0/8"]})).await.json();
    assert_eq!(second["order"], 2);
    let moved = server.patch(&format!("/api/v1/access-policies/{}", second["id"].as_str().expect("id")), json!({"order": 0, "enabled": false})).await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.text());
    assert_eq!(moved.json()["name"], "deny rest", "a patch keeps the fields it does not name");
    let names: Vec<Value> =
        server.get("/api/v1/access-policies").await.json()["items"].as_array().expect("items").iter().map(|item| item["name"].clone()).collect();
    assert_eq!(names, vec![json!("deny rest"), json!("allow smb")]);
    assert_eq!(server.get("/api/v1/access-policies?sort=bogus").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/access-policies?colour=red").await.status, StatusCode::BAD_REQUEST);

    // a segment a policy names cannot go; the policy can, then the segment
    let segment_path = format!("/api/v1/app-segments/{}", segment["id"].as_str().expect("id"));
    let in_use = server.delete(&segment_path).await;
    assert_eq!(in_use.status, StatusCode::CONFLICT);
    assert!(in_use.text().contains("allow smb"), "{}", in_use.text());
    assert_eq!(server.patch(&segment_path, json!({"tcp_ports": ["22"]})).await.json()["tcp_ports"], json!(["22"]));
    assert_eq!(server.delete(&format!("/api/v1/access-policies/{}", first["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.delete(&segment_path).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&segment_path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.delete(&segment_path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(audit_count(&server, "app_segment").await, 3, "create, update, delete");
    assert_eq!(audit_count(&server, "access_policy").await, 4, "two creates, an update, a delete");
}

async fn connectors_enroll_and_revoke(server: TestServer) {
    let created = server.post("/api/v1/connectors", json!({"name": "dc1"})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let connector = created.json();
    let key = connector["provisioning_key"].as_str().expect("provisioning key shown once").to_string();
    assert_eq!(connector["status"], "offline");
    assert_eq!(server.post("/api/v1/connectors", json!({"name": "DC1"})).await.status, StatusCode::CONFLICT);
    let listed = server.get("/api/v1/connectors").await.json();
    assert_eq!(listed["total"], 1);
    assert!(listed["items"][0].get("provisioning_key").is_none(), "the key is never listed");
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key").public_key_pem();
    let enroll = |body: Value| server.call(Method::POST, "/api/v1/connectors/enroll", Some(body), None);
    assert_eq!(enroll(json!({"provisioning_key": "rbc_wrong", "public_key": "garbage"})).await.status, StatusCode::UNAUTHORIZED, "authentication comes first");
    assert_eq!(enroll(json!({"provisioning_key": key, "public_key": "garbage"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    let enrolled = enroll(json!({"provisioning_key": key, "public_key": public_key})).await;
    assert_eq!(enrolled.status, StatusCode::OK, "{}", enrolled.text());
    assert!(enrolled.json()["certificate"].as_str().expect("certificate").starts_with("-----BEGIN CERTIFICATE-----"));
    let path = format!("/api/v1/connectors/{}", connector["id"].as_str().expect("id"));
    assert_eq!(server.get(&path).await.json()["name"], "dc1");
    let viewer_forbidden = server.call(Method::POST, "/api/v1/connectors", Some(json!({"name": "x"})), Some("rbk_nobody")).await;
    assert_eq!(viewer_forbidden.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.delete(&path).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(enroll(json!({"provisioning_key": key, "public_key": public_key})).await.status, StatusCode::UNAUTHORIZED, "a revoked connector cannot enroll");
    assert_eq!(audit_count(&server, "connector").await, 3, "create, enroll, revoke");
    assert_eq!(server.get("/api/v1/client-sessions").await.json()["total"], 0);
}

/// A connector enrolled over HTTP: its TLS material and broker endpoints.
fn enroll_connector(base: &str, key: &str) -> (TlsMaterial, Vec<String>) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let api = reachback_tunnel::ApiClient::new(base, &reachback_tunnel::ApiTrust::default(), std::time::Duration::from_secs(30)).expect("client");
    let answer = api.post_json("/api/v1/connectors/enroll", &json!({"provisioning_key": key, "public_key": pair.public_key_pem()})).expect("enroll");
    let text = |key: &str| answer[key].as_str().expect("field").to_string();
    let brokers = answer["broker_endpoints"].as_array().expect("brokers").iter().map(|item| item.as_str().expect("text").to_string()).collect();
    (TlsMaterial { certificate_pem: text("certificate"), private_key_pem: pair.serialize_pem(), ca_pem: text("ca_certificate") }, brokers)
}

pub(crate) async fn open_flow(connection: &Connection, destination: &str) -> (FlowReply, SendStream, RecvStream) {
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    write_frame(
        &mut send,
        &FlowOpen {
            destination: destination.parse().expect("address"),
            source: "10.1.2.3:40000".parse().expect("address"),
            user: None,
            protocol: Default::default(),
        },
    )
    .await
    .expect("write");
    let reply =
        tokio::time::timeout(Duration::from_secs(10), read_frame::<FlowReply>(&mut recv)).await.expect("reply in time").expect("frame").expect("a reply");
    (reply, send, recv)
}

async fn tunnel_flows_and_refusals(mut server: TestServer) {
    let base = server.serve_with_broker().await;
    // a local echo service for the agent
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_port = echo.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    server.post("/api/v1/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).await;
    let segment = server
        .post("/api/v1/app-segments", json!({"name": "echo", "destinations": ["100.64.0.0/24"], "tcp_ports": [echo_port.to_string(), "1-2"]}))
        .await
        .json();
    let connector = server.post("/api/v1/connectors", json!({"name": "test"})).await.json();
    let policy = json!({"name": "allow echo", "action": "allow", "segment_ids": [segment["id"]], "connector_ids": [connector["id"]]});
    assert_eq!(server.post("/api/v1/access-policies", policy).await.status, StatusCode::CREATED);
    let enrollment_key =
        server.post("/api/v1/enrollment-keys", json!({"username": "alice@corp.example"})).await.json()["key"].as_str().expect("key").to_string();

    // the agent: enrolled over HTTP, running in this process, allowing the echo port and port 1
    let state_dir = server.data_dir.join("agent");
    let options = reachback_agent::EnrollOptions {
        server: base.clone(),
        key: enrollment_key,
        hostname: "laptop.corp.example".into(),
        platform: "linux".into(),
        location: None,
        state_dir: state_dir.clone(),
        trust: reachback_tunnel::ApiTrust::default(),
        force: false,
    };
    let enrolled = tokio::task::spawn_blocking(move || reachback_agent::enroll(&options)).await.expect("join").expect("agent enrolls");
    assert_eq!(enrolled.virtual_ip.as_deref(), Some("100.64.0.1"));
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let run = reachback_agent::RunOptions {
        state_dir,
        allow_ports: reachback_agent::parse_allow_ports(&format!("1,{echo_port}")).expect("ports"),
        allow_udp_ports: Vec::new(),
        connect_host: "127.0.0.1".parse().expect("address"),
        version: "test".into(),
        tcp_congestion: reachback_tunnel::Congestion::resolve(None).expect("the default congestion control"),
    };
    let agent = tokio::spawn(reachback_agent::run(run, async move {
        let _ = agent_stopped.await;
    }));
    let mut sessions = Value::Null;
    for _ in 0..100 {
        sessions = server.get("/api/v1/client-sessions").await.json();
        if sessions["total"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sessions["items"][0]["virtual_ip"], "100.64.0.1", "{sessions}");
    assert_eq!(sessions["items"][0]["broker_node"], "test");
    assert_eq!(server.get("/api/v1/client-sessions?username=ALICE").await.json()["total"], 1);
    assert_eq!(server.get("/api/v1/client-sessions?platform=windows").await.json()["total"], 0);

    // the connector, driven by hand
    let provisioning_key = connector["provisioning_key"].as_str().expect("key").to_string();
    let base_for_connector = base.clone();
    let (material, brokers) = tokio::task::spawn_blocking(move || enroll_connector(&base_for_connector, &provisioning_key)).await.expect("join");
    let endpoint = TunnelConnector::new(&material).expect("connector");
    let tunnel = reachback_tunnel::client::connect(&endpoint, &brokers, ClientRole::Connector, Some("test"), "test").await.expect("connector connects");
    assert_eq!(tunnel.welcome.ranges, vec!["100.64.0.0/24".to_string()]);
    let connection = tunnel.connection.clone();
    tokio::spawn(tunnel.run_control(None, |_| {}));
    assert_eq!(server.get("/api/v1/connectors").await.json()["items"][0]["status"], "online");

    // a good flow: bytes both ways, half-close travels to the far end and back
    let destination = format!("100.64.0.1:{echo_port}");
    let (reply, mut send, mut recv) = open_flow(&connection, &destination).await;
    assert_eq!(reply, FlowReply::Ok);
    send.write_all(b"ping through the tunnel").await.expect("write");
    send.finish().expect("finish");
    let echoed = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024)).await.expect("in time").expect("read");
    assert_eq!(connection.open_streams(), 1, "a finished flow leaves only the control stream behind");
    assert_eq!(echoed, b"ping through the tunnel", "the echo came back and then the FIN");

    // refusals, each with its reason; none affects the tunnel
    assert_eq!(open_flow(&connection, "100.64.0.2:22").await.0, FlowReply::Refused(Refusal::Offline));
    assert_eq!(open_flow(&connection, "100.64.0.1:3389").await.0, FlowReply::Refused(Refusal::Denied { rule: None }), "outside every segment");
    assert_eq!(open_flow(&connection, "100.64.0.1:2").await.0, FlowReply::Refused(Refusal::PortNotAllowed), "policy allows, the agent does not");
    assert!(matches!(open_flow(&connection, "100.64.0.1:1").await.0, FlowReply::Refused(Refusal::ConnectFailed { .. })), "nothing listens on port 1");

    // malformed and oversized frames: a clear refusal, the tunnel lives on
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    send.write_all(&[0, 0, 0, 5, b'{', b'o', b'o', b'p', b's']).await.expect("write");
    let reply = read_frame::<FlowReply>(&mut recv).await.expect("frame").expect("reply");
    assert!(matches!(reply, FlowReply::Refused(Refusal::BadRequest { .. })), "{reply:?}");
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    send.write_all(&(10_000_000u32).to_be_bytes()).await.expect("write");
    let reply = read_frame::<FlowReply>(&mut recv).await.expect("frame").expect("reply");
    assert!(matches!(&reply, FlowReply::Refused(Refusal::BadRequest { reason }) if reason.contains("exceeds")), "{reply:?}");
    let (reply, mut send, mut recv) = open_flow(&connection, &destination).await;
    assert_eq!(reply, FlowReply::Ok, "the tunnel still works after bad frames");
    send.write_all(b"again").await.expect("write");
    send.finish().expect("finish");
    assert_eq!(recv.read_to_end(1024).await.expect("read"), b"again");
    let metrics = server.get("/metrics").await.text();
    assert!(metrics.contains("reachback_flows_denied_total 1"), "{metrics}");
    assert!(metrics.contains("reachback_flows_failed_total{reason=\"offline\"} 1"), "{metrics}");
    assert!(metrics.contains("reachback_flows_failed_total{reason=\"bad_request\"} 2"), "{metrics}");

    // a certificate from another CA never gets a tunnel
    let (foreign_ca, foreign_key) = reachback_server::crypto::CertificateAuthority::generate().expect("CA");
    let foreign = reachback_server::crypto::CertificateAuthority::load(&foreign_ca, &foreign_key).expect("CA");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let spki = reachback_server::crypto::parse_public_key(&pair.public_key_pem()).expect("key");
    let forged = foreign
        .sign_connector(&spki, connector["id"].as_str().expect("id"), reachback_server::crypto::CertificateAuthority::new_serial(), Duration::from_secs(3600))
        .expect("sign");
    let forged = TlsMaterial { certificate_pem: forged, private_key_pem: pair.serialize_pem(), ca_pem: material.ca_pem.clone() };
    let forged_endpoint = TunnelConnector::new(&forged).expect("connector");
    let refused = reachback_tunnel::client::connect(&forged_endpoint, &brokers, ClientRole::Connector, None, "test").await;
    assert!(refused.is_err(), "a foreign client certificate is refused");
    // a connector (or device) certificate that says it is a replica never gets to relay
    // flows past the policy: only a certificate the CA issued to a replica may
    let hello = reachback_tunnel::client::Hello { role: ClientRole::Replica, mode: None, version: "test", names: false, dns_listen: &[] };
    let posing = reachback_tunnel::client::connect_with(&endpoint, &brokers, hello).await;
    assert!(posing.is_err(), "a connector posing as a replica is refused");
    let (replica_pem, replica_key) = server.state.as_ref().expect("state").ca.sign_replica("peer-replica", Duration::from_secs(3600)).expect("sign");
    let replica = TlsMaterial { certificate_pem: replica_pem, private_key_pem: replica_key, ca_pem: material.ca_pem.clone() };
    let peer = reachback_tunnel::client::connect_with(&TunnelConnector::new(&replica).expect("replica"), &brokers, hello).await.expect("a replica is taken");
    assert_eq!(peer.welcome.session_id, "test", "it is told which replica it reached");
    peer.connection.close(0, b"done");

    // deleting the session disconnects the agent, which comes back; deleting the device revokes it
    let session_id = sessions["items"][0]["id"].as_str().expect("id").to_string();
    assert_eq!(server.delete(&format!("/api/v1/client-sessions/{session_id}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.delete(&format!("/api/v1/client-sessions/{session_id}")).await.status, StatusCode::NOT_FOUND);
    let mut back = false;
    for _ in 0..200 {
        let current = server.get("/api/v1/client-sessions").await.json();
        if current["total"] == 1 && current["items"][0]["id"] != session_id.as_str() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the agent reconnected with a new session");
    // releasing the binding disconnects the agent; at its next connect it gets a new address
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.1").await.status, StatusCode::NO_CONTENT);
    let mut rebound = Value::Null;
    for _ in 0..200 {
        rebound = server.get("/api/v1/client-sessions").await.json();
        if rebound["items"][0]["virtual_ip"] == "100.64.0.2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rebound["items"][0]["virtual_ip"], "100.64.0.2", "the released address stays in quarantine; the device gets the next one: {rebound}");
    assert_eq!(server.get("/api/v1/ip-bindings/100.64.0.2").await.json()["client_hostname"], "laptop.corp.example");
    let (reply, mut send, mut recv) = open_flow(&connection, &format!("100.64.0.2:{echo_port}")).await;
    assert_eq!(reply, FlowReply::Ok, "flows reach the device at its new address");
    send.write_all(b"new address").await.expect("write");
    send.finish().expect("finish");
    assert_eq!(recv.read_to_end(1024).await.expect("read"), b"new address");
    assert_eq!(open_flow(&connection, &destination).await.0, FlowReply::Refused(Refusal::Offline), "the old address reaches nobody");

    let device_id = enrolled.id.clone();
    assert_eq!(server.delete(&format!("/api/v1/devices/{device_id}")).await.status, StatusCode::NO_CONTENT);
    let outcome = tokio::time::timeout(Duration::from_secs(30), agent).await.expect("the revoked agent stops").expect("join");
    assert!(outcome.as_ref().is_err_and(|error| format!("{error:#}").contains("revoked")), "{outcome:?}");
    drop(stop_agent);
    assert_eq!(server.get("/api/v1/client-sessions").await.json()["total"], 0);
    assert_eq!(audit_count(&server, "client_session").await, 1);
    let _ = TOKEN;
}
