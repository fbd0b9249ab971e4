//! Hostile peers at the broker, over real TLS on loopback: an agent that opens a
//! stream it was not asked for, a connector that sends an empty data frame, one
//! that floods streams and bytes past its credit, and one that never reads. Each
//! is cut off (the reason logged), the server's memory stays within the tunnel's
//! budget, and a well-behaved connector's flow to a well-behaved agent keeps
//! working throughout.

use std::sync::Arc;
use std::time::Duration;

use reachback_proto::mux::{FrameKind, encode_header};
use reachback_proto::{ClientRole, Control, FlowOpen, FlowReply};
use reachback_tunnel::{Connection, TlsMaterial, TunnelConnector, write_frame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Backend, TestServer};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// A device enrolled through the API with a key of the test's own: its TLS material.
async fn enroll_device(server: &TestServer, hostname: &str) -> TlsMaterial {
    let key =
        server.post("/api/v1/enrollment-keys", json!({"username": format!("{hostname}@corp.example")})).await.json()["key"].as_str().expect("key").to_string();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let answer = server
        .post("/api/v1/enroll", json!({"enrollment_key": key, "hostname": hostname, "platform": "linux", "public_key": pair.public_key_pem()}))
        .await
        .json();
    TlsMaterial {
        certificate_pem: answer["certificate"].as_str().expect("certificate").to_string(),
        private_key_pem: pair.serialize_pem(),
        ca_pem: answer["ca_certificate"].as_str().expect("CA").to_string(),
    }
}

/// A connector enrolled through the API: its TLS material.
async fn enroll_connector(server: &TestServer, name: &str) -> TlsMaterial {
    let created = server.post("/api/v1/connectors", json!({"name": name})).await.json();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let answer =
        server.post("/api/v1/connectors/enroll", json!({"provisioning_key": created["provisioning_key"], "public_key": pair.public_key_pem()})).await.json();
    TlsMaterial {
        certificate_pem: answer["certificate"].as_str().expect("certificate").to_string(),
        private_key_pem: pair.serialize_pem(),
        ca_pem: answer["ca_certificate"].as_str().expect("CA").to_string(),
    }
}

/// A raw TLS connection to the broker with a client certificate: frames are written by hand.
async fn raw_tunnel(broker: &str, material: &TlsMaterial) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(material.ca_pem.as_bytes()) {
        roots.add(certificate.expect("CA")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(material.certificate_pem.as_bytes()).map(|c| c.expect("cert")).collect();
    let key = PrivateKeyDer::from_pem_slice(material.private_key_pem.as_bytes()).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    config.alpn_protocols = vec![reachback_proto::ALPN.to_vec()];
    let stream = tokio::net::TcpStream::connect(broker).await.expect("connect");
    let name = ServerName::try_from(reachback_proto::BROKER_SERVER_NAME).expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.expect("TLS")
}

fn frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = encode_header(kind, stream, payload.len()).to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Opens the control stream and says hello as a connector.
fn hello(role: ClientRole) -> Vec<u8> {
    let mut bytes = frame(FrameKind::Open, 1, &[]);
    bytes.extend(frame(
        FrameKind::Data,
        1,
        &reachback_proto::encode(&Control::Hello { role, version: "hostile".into(), mode: None, names: false, dns_listen: Vec::new() }),
    ));
    bytes
}

/// Reads until the broker closes the connection; `true` when it did within the limit.
async fn cut_off<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let mut buffer = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The well-behaved flow: an echo through the good connector and the good agent.
async fn echo_works(connection: &Connection, destination: &str) {
    let (reply, mut send, mut recv) = crate::dataplane::open_flow(connection, destination).await;
    assert_eq!(reply, FlowReply::Ok);
    send.write_all(b"still here").await.expect("write");
    send.finish().expect("finish");
    let echoed = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024)).await.expect("echo in time").expect("read");
    assert_eq!(echoed, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_cut_off_and_others_go_on() {
    let mut server = TestServer::start(Backend::Sqlite).await.expect("server");
    let base = server.serve_with_broker().await;
    let broker = format!("127.0.0.1:{}", server.tunnel_port);
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_port = echo.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    server.post("/api/v1/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).await;
    let segment =
        server.post("/api/v1/app-segments", json!({"name": "echo", "destinations": ["100.64.0.0/24"], "tcp_ports": [echo_port.to_string()]})).await.json();
    server.post("/api/v1/access-policies", json!({"name": "echo", "action": "allow", "segment_ids": [segment["id"]]})).await;

    // the well-behaved agent (in process) and connector
    let key = server.post("/api/v1/enrollment-keys", json!({"username": "alice@corp.example"})).await.json()["key"].as_str().expect("key").to_string();
    let state_dir = server.data_dir.join("good-agent");
    let options = reachback_agent::EnrollOptions {
        server: base.clone(),
        key,
        hostname: "good.corp.example".into(),
        platform: "linux".into(),
        location: None,
        state_dir: state_dir.clone(),
        trust: reachback_tunnel::ApiTrust::default(),
        force: false,
    };
    let enrolled = tokio::task::spawn_blocking(move || reachback_agent::enroll(&options)).await.expect("join").expect("enroll");
    let destination = format!("{}:{echo_port}", enrolled.virtual_ip.expect("address"));
    let run = reachback_agent::RunOptions {
        state_dir,
        allow_ports: reachback_agent::parse_allow_ports(&echo_port.to_string()).expect("ports"),
        allow_udp_ports: Vec::new(),
        connect_host: "127.0.0.1".parse().expect("address"),
        version: "test".into(),
        tcp_congestion: reachback_tunnel::Congestion::System,
    };
    tokio::spawn(reachback_agent::run(run, std::future::pending()));
    let good = enroll_connector(&server, "good").await;
    let endpoint = TunnelConnector::new(&good).expect("connector");
    let mut tunnel = None;
    for _ in 0..100 {
        if server.get("/api/v1/client-sessions").await.json()["total"] == 1 {
            tunnel = reachback_tunnel::client::connect(&endpoint, std::slice::from_ref(&broker), ClientRole::Connector, None, "test").await.ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tunnel = tunnel.expect("the good connector connects once the agent is up");
    let good_connection = tunnel.connection.clone();
    tokio::spawn(tunnel.run_control(None, |_| {}));
    echo_works(&good_connection, &destination).await;
    let rss_before = rss_kib();

    // 1. an agent that opens a stream the broker did not ask for is cut off
    let hostile_agent = enroll_device(&server, "hostile.corp.example").await;
    let agent_endpoint = TunnelConnector::new(&hostile_agent).expect("agent");
    let agent_tunnel =
        reachback_tunnel::client::connect(&agent_endpoint, std::slice::from_ref(&broker), ClientRole::Agent, None, "hostile").await.expect("agent");
    let agent_connection = agent_tunnel.connection.clone();
    let (_send, _recv) = agent_connection.open_bi().await.expect("open");
    let reason = tokio::time::timeout(Duration::from_secs(5), agent_connection.closed()).await.expect("cut off in time");
    assert!(reason.contains("closed") || reason.contains("violation"), "{reason}");
    echo_works(&good_connection, &destination).await;

    // 1b. one identity holds four tunnels at most, even before their hellos
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw_tunnel(&broker, &hostile_agent).await);
    }
    let mut fifth = raw_tunnel(&broker, &hostile_agent).await;
    assert!(cut_off(&mut fifth, Duration::from_secs(3)).await, "a fifth tunnel of one identity is refused");
    let mut first = held.remove(0);
    assert!(!cut_off(&mut first, Duration::from_millis(500)).await, "the first four stand (until their hello times out)");
    drop(first);
    drop(held);
    echo_works(&good_connection, &destination).await;

    // 2. a connector that sends an empty data frame is cut off
    let hostile_connector = enroll_connector(&server, "hostile").await;
    let mut raw = raw_tunnel(&broker, &hostile_connector).await;
    raw.write_all(&hello(ClientRole::Connector)).await.expect("hello");
    raw.write_all(&frame(FrameKind::Open, 3, &[])).await.expect("open");
    raw.write_all(&frame(FrameKind::Data, 3, &[])).await.expect("empty data");
    raw.flush().await.expect("flush");
    assert!(cut_off(&mut raw, Duration::from_secs(5)).await, "an empty data frame ends the tunnel");
    echo_works(&good_connection, &destination).await;

    // 3. a connector that floods streams (20,000 of them, 128 KiB of junk each, never
    //    reading an answer): absorbed within the tunnel's budget — each junk request is
    //    refused and its bytes given back — then a grant of credit past the maximum
    //    ends the tunnel
    let mut raw = raw_tunnel(&broker, &hostile_connector).await;
    raw.write_all(&hello(ClientRole::Connector)).await.expect("hello");
    let chunk = vec![0x5au8; 16 * 1024];
    let mut sent_mib = 0.0;
    for stream in 0..20_000u32 {
        let id = 3 + stream * 2;
        let mut bytes = frame(FrameKind::Open, id, &[]);
        for _ in 0..8 {
            bytes.extend(frame(FrameKind::Data, id, &chunk));
        }
        match tokio::time::timeout(Duration::from_secs(5), raw.write_all(&bytes)).await {
            Ok(Ok(())) => sent_mib += bytes.len() as f64 / (1024.0 * 1024.0),
            _ => break,
        }
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "server RSS growth during a flood of {sent_mib:.0} MiB on 20,000 streams: {grown_mib:.1} MiB (budget {} MiB)",
        reachback_server::state::DEFAULT_TUNNEL_MEMORY >> 20
    );
    assert!(grown_mib < 2.0 * (reachback_server::state::DEFAULT_TUNNEL_MEMORY >> 20) as f64, "RSS grew {grown_mib:.1} MiB");
    echo_works(&good_connection, &destination).await;
    let _ = raw.write_all(&frame(FrameKind::Window, 1, &u32::MAX.to_be_bytes())).await;
    let _ = raw.write_all(&frame(FrameKind::Window, 1, &u32::MAX.to_be_bytes())).await;
    let _ = raw.flush().await;
    assert!(cut_off(&mut raw, Duration::from_secs(10)).await, "credit past the maximum ends the tunnel");
    echo_works(&good_connection, &destination).await;

    // 4. a connector that asks for a flow and never reads what comes back: its flow
    //    stalls at the credit, the server's memory stays bounded, others go on
    let reader = enroll_connector(&server, "never reads").await;
    let endpoint = TunnelConnector::new(&reader).expect("connector");
    let never = reachback_tunnel::client::connect(&endpoint, std::slice::from_ref(&broker), ClientRole::Connector, None, "test").await.expect("connects");
    let never_connection = never.connection.clone();
    tokio::spawn(never.run_control(None, |_| {}));
    let (mut send, _recv_never_read) = never_connection.open_bi().await.expect("stream");
    write_frame(
        &mut send,
        &FlowOpen {
            destination: destination.parse().expect("address"),
            source: "10.9.9.9:1".parse().expect("address"),
            user: None,
            protocol: Default::default(),
        },
    )
    .await
    .expect("open");
    let big = bytes::Bytes::from(vec![7u8; 1024 * 1024]);
    for _ in 0..32 {
        if tokio::time::timeout(Duration::from_millis(500), send.write_chunk(big.clone())).await.is_err() {
            break; // the echo's way back is full: the flow waits for credit, as it should
        }
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!("server RSS growth with a peer that never reads: {grown_mib:.1} MiB");
    assert!(grown_mib < 2.0 * (reachback_server::state::DEFAULT_TUNNEL_MEMORY >> 20) as f64, "RSS grew {grown_mib:.1} MiB");
    echo_works(&good_connection, &destination).await;
}

/// A signed renewal is taken once: the same body again (a replay inside the clock
/// window) is refused, and a fresh one right after is told to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_renewals_cannot_be_replayed() {
    use base64::Engine as _;
    let server = TestServer::start(Backend::Sqlite).await.expect("server");
    server.post("/api/v1/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).await;
    let key = server.post("/api/v1/enrollment-keys", json!({"username": "alice@corp.example"})).await.json()["key"].as_str().expect("key").to_string();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let device = server
        .post("/api/v1/enroll", json!({"enrollment_key": key, "hostname": "replay.corp.example", "platform": "linux", "public_key": pair.public_key_pem()}))
        .await
        .json()["device_id"]
        .as_str()
        .expect("device")
        .to_string();
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pair.serialize_der(), &rng).expect("signer");
    let signed = |signed_at: i64| {
        let message = reachback_proto::renewal::renewal_message("device", &device, signed_at);
        let signature = signer.sign(&rng, message.as_bytes()).expect("sign");
        json!({"public_key": pair.public_key_pem(), "signed_at": signed_at, "signature": base64::engine::general_purpose::STANDARD.encode(signature.as_ref())})
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let path = format!("/api/v1/devices/{device}/renew");
    let body = signed(now);
    assert_eq!(server.post(&path, body.clone()).await.status, axum::http::StatusCode::OK);
    assert_eq!(server.post(&path, body).await.status, axum::http::StatusCode::UNAUTHORIZED, "the same request again is a replay");
    let again = server.post(&path, signed(now + 1)).await;
    assert_eq!(again.status, axum::http::StatusCode::TOO_MANY_REQUESTS, "a fresh renewal right after waits: {}", again.text());
    assert_eq!(server.post(&path, signed(now - 400)).await.status, axum::http::StatusCode::UNAUTHORIZED, "outside the clock window");
    let audit = server.get("/api/v1/audit-logs?action=renew_certificate").await.json();
    assert_eq!(audit["total"], 1, "one renewal, one audit row");
}

/// Every route of the table, every path parameter and every query parameter it
/// reads, with a NUL, another control character, DEL and bytes that are not
/// UTF-8: each answer is a 400 problem document naming the parameter, on both
/// backends (before the edge check, a NUL in an id was a 500 on PostgreSQL).
async fn control_characters_are_refused_at_the_edge_on_every_route(server: TestServer) {
    use axum::http::Method;
    let bad = ["a%00b", "%01", "x%7F", "%FF", "%C0%80", "a%0Ab"];
    let mut checked = 0;
    for route in reachback_server::ROUTES {
        let method = Method::from_bytes(route.method.to_uppercase().as_bytes()).expect("method");
        let parameters: Vec<&str> = route.path.split('/').filter(|segment| segment.starts_with('{')).collect();
        let fill = |target: &str, value: &str| {
            route
                .path
                .split('/')
                .map(|segment| {
                    if segment == target {
                        value.to_string()
                    } else if segment.starts_with('{') {
                        "0123".into()
                    } else {
                        segment.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("/")
        };
        for parameter in &parameters {
            let name = parameter.trim_matches(|c| c == '{' || c == '}');
            for value in bad {
                let path = fill(parameter, value);
                let reply = server.call(method.clone(), &path, None, Some(crate::harness::TOKEN)).await;
                assert_eq!(reply.status, 400, "{} {path}: {}", route.method, reply.text());
                assert_eq!(reply.headers.get("content-type").and_then(|value| value.to_str().ok()), Some("application/problem+json"), "{path}");
                assert_eq!(reply.json()["errors"][0]["field"], name, "{} {path}: {}", route.method, reply.text());
                checked += 1;
            }
        }
        for query in route.query {
            for value in bad {
                let path = format!("{}?{query}={value}", fill("", ""));
                let reply = server.call(method.clone(), &path, None, Some(crate::harness::TOKEN)).await;
                assert_eq!(reply.status, 400, "{} {path}: {}", route.method, reply.text());
                assert_eq!(reply.json()["errors"][0]["field"], *query, "{} {path}: {}", route.method, reply.text());
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "the walk covered the table ({checked} requests)");
    // the same values as they would come from a well-behaved client still work
    assert_eq!(server.get("/api/v1/ip-ranges?name=Caf%C3%A9+laptops").await.status, 200);
    assert_eq!(server.get("/api/v1/ip-ranges/0123").await.status, 404);
}

crate::on_both_backends!(control_characters_are_refused_at_the_edge_on_every_route);

/// An export whose rows fail after the header went out (the database failing
/// mid-stream) ends the HTTP response without the chunked terminator: a client
/// reading it sees a failed transfer, never a clean 200 end with fewer rows.
#[tokio::test]
async fn an_export_that_fails_mid_stream_never_ends_cleanly() {
    // each request gets rows that fail after 1,200 (as a database connection lost mid-query would)
    let router = axum::Router::new().route(
        "/export.csv",
        axum::routing::get(|| async {
            let rows = (0..1500).map(|index| {
                if index < 1200 {
                    Ok(vec![format!("100.64.0.{index}"), "row".to_string()])
                } else {
                    Err(reachback_store::StoreError::Corrupt("the database went away".into()))
                }
            });
            // the failure comes a moment later, as a lost connection's would: what came before is on the wire
            let rows = futures_util::StreamExt::then(futures_util::stream::iter(rows), |row| async move {
                if row.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                row
            });
            reachback_server::api::csv_response("x.csv", &["ip", "note"], rows, Some("username=alice".into()))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream.write_all(b"GET /export.csv HTTP/1.1\r\nHost: test\r\n\r\n").await.expect("request");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.expect("the server ends the connection");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("transfer-encoding: chunked"), "{}", &text[..text.len().min(300)]);
    assert!(text.contains("100.64.0.1199"), "the rows before the failure were sent");
    assert!(!text.ends_with("0\r\n\r\n"), "no chunked terminator: the transfer is visibly incomplete");
    // and a real HTTP client says so
    let url = format!("http://{address}/export.csv");
    let outcome = tokio::task::spawn_blocking(move || {
        let response = ureq::get(&url).call()?;
        assert_eq!(response.status(), 200, "the failure comes after the status line");
        response.into_body().with_config().limit(64 * 1024 * 1024).read_to_string()
    })
    .await
    .expect("join");
    assert!(outcome.is_err(), "the client sees an error, not a short file: {:?}", outcome.map(|body| body.len()));
}

/// Names that only look alike are one name, for every named resource: an
/// impostor with a Cyrillic letter is refused with 409 naming the existing one,
/// the same name in NFD is the same name (stored in NFC), and invisible or
/// bidirectional-control characters are refused outright.
async fn look_alike_names_are_refused_for_every_named_resource(server: TestServer) {
    type Body = Box<dyn Fn(&str, usize) -> serde_json::Value>;
    let cases: [(&str, &str, Body); 5] = [
        ("/api/v1/ip-ranges", "name", Box::new(|name, index| json!({"name": name, "range": format!("100.{}.0.0/24", 64 + index)}))),
        ("/api/v1/app-segments", "name", Box::new(|name, _| json!({"name": name, "destinations": ["100.64.0.0/24"], "tcp_ports": ["22"]}))),
        ("/api/v1/access-policies", "name", Box::new(|name, _| json!({"name": name, "action": "allow"}))),
        ("/api/v1/connectors", "name", Box::new(|name, _| json!({"name": name}))),
        ("/api/v1/admins", "username", Box::new(|name, _| json!({"username": name, "role": "viewer"}))),
    ];
    for (path, field, body) in &cases {
        let created = server.post(path, body("Paris laptops", 0)).await;
        assert_eq!(created.status, 201, "{path}: {}", created.text());
        // a Cyrillic а (U+0430) for the Latin a
        let impostor = server.post(path, body("P\u{430}ris laptops", 1)).await;
        assert_eq!(impostor.status, 409, "{path}: {}", impostor.text());
        assert_eq!(impostor.json()["existing"], "Paris laptops", "{path}: the 409 names the existing one: {}", impostor.text());
        // a zero-width space and a right-to-left override are refused
        for hidden in ["Paris\u{200B} laptops", "Paris \u{202E}spotpal"] {
            let reply = server.post(path, body(hidden, 2)).await;
            assert_eq!(reply.status, 422, "{path} {hidden:?}: {}", reply.text());
            assert_eq!(reply.json()["errors"][0]["field"], *field, "{path}: {}", reply.text());
        }
        // NFC and NFD are one name; what is stored is NFC
        let nfc = server.post(path, body("Caf\u{e9} laptops", 3)).await;
        assert_eq!(nfc.status, 201, "{path}: {}", nfc.text());
        let nfd = server.post(path, body("Cafe\u{301} laptops", 4)).await;
        assert_eq!(nfd.status, 409, "{path}: {}", nfd.text());
        let decomposed = server.post(path, body("Tours Cafe\u{301}", 5)).await;
        assert_eq!(decomposed.status, 201, "{path}: {}", decomposed.text());
        assert_eq!(decomposed.json()[field], "Tours Caf\u{e9}", "{path}: stored in NFC");
    }
    // a rename into an impostor is refused as a create is
    let ranges = server.get("/api/v1/ip-ranges?name=Tours").await.json();
    let id = ranges["items"][0]["id"].as_str().expect("range").to_string();
    let renamed = server.patch(&format!("/api/v1/ip-ranges/{id}"), json!({"name": "P\u{430}ris laptops"})).await;
    assert_eq!(renamed.status, 409, "{}", renamed.text());
}

crate::on_both_backends!(look_alike_names_are_refused_for_every_named_resource);

/// Names written before look-alikes were refused get their skeletons at the next
/// start, so an impostor of an old name is refused too.
async fn names_from_before_get_their_skeletons_at_start(mut server: TestServer) {
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "Paris laptops", "range": "100.64.0.0/24"})).await.status, 201);
    assert_eq!(server.post("/api/v1/connectors", json!({"name": "dc1"})).await.status, 201);
    // as an older version left them
    server.raw_sql("UPDATE ip_ranges SET name_skeleton = NULL").await;
    server.raw_sql("UPDATE connectors SET name_skeleton = NULL").await;
    assert_eq!(
        server.post("/api/v1/ip-ranges", json!({"name": "P\u{430}ris laptops", "range": "100.65.0.0/24"})).await.status,
        201,
        "unseen before the backfill"
    );
    server.raw_sql("UPDATE ip_ranges SET name_skeleton = NULL").await;
    server.restart().await;
    // two old look-alikes: one keeps its skeleton, the other is left without (and logged); new impostors are refused
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "Pari\u{455} laptops", "range": "100.66.0.0/24"})).await.status, 409);
    let reply = server.post("/api/v1/connectors", json!({"name": "d\u{441}1"})).await;
    assert_eq!((reply.status.as_u16(), reply.json()["existing"].clone()), (409, json!("dc1")), "{}", reply.text());
}

crate::on_both_backends!(names_from_before_get_their_skeletons_at_start);
