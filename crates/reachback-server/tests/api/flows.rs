//! The flow log at the API boundary, on both backends: flows through a real
//! broker (TLS on loopback, an in-process agent, a hand-driven connector) that are
//! allowed (TCP and UDP, a known number of bytes each way), denied by a policy and
//! by the default, refused by the agent and sent to an address nobody holds, each
//! listed with its verdict; the switch that turns the log off; filters, orders and
//! pages against a reference model, the export against the listing, the export's
//! limit and formula neutralisation, retention, and hostile query values.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use reachback_proto::{ClientRole, FlowOpen, FlowReply, Refusal, Transport};
use reachback_server::request::{format_time, parse_time};
use reachback_store::{FlowProtocol, FlowRecord, FlowVerdict};
use reachback_tunnel::{Connection, RecvStream, SendStream, TlsMaterial, TunnelConnector, read_frame, write_frame};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::TestServer;
use crate::on_both_backends;

on_both_backends!(
    flows_through_the_connector_are_logged_with_their_verdict_and_bytes,
    filters_sort_and_pages_agree_with_a_reference_and_the_export,
    flow_export_is_limited_and_neutralises_formulas,
    retention_deletes_only_flows_that_ended_before_the_cutoff,
    hostile_flow_queries_are_refused_by_name,
);

/// Bytes the server sends on an allowed TCP flow, and the service's answer.
const TO_CLIENT: usize = 3000;
const FROM_CLIENT: usize = 5000;

fn field(row: &Value, name: &str) -> String {
    row[name].as_str().unwrap_or_else(|| panic!("{name} in {row}")).to_string()
}

async fn flows(server: &TestServer, query: &str) -> Value {
    let reply = server.get(&format!("/api/v1/flows?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
    reply.json()
}

fn items(listing: &Value) -> Vec<Value> {
    listing["items"].as_array().expect("items").clone()
}

/// Waits until the flow log lists `count` flows (the writer batches every 200 ms).
async fn wait_for_flows(server: &TestServer, count: i64) -> Vec<Value> {
    let mut listing = Value::Null;
    for _ in 0..200 {
        listing = flows(server, "sort=started_at&page_size=1000").await;
        if listing["total"].as_i64() >= Some(count) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listing["total"], count, "{listing}");
    items(&listing)
}

/// A connector enrolled over HTTP: its TLS material and broker endpoints.
fn enroll_connector(base: &str, key: &str) -> (TlsMaterial, Vec<String>) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let api = reachback_tunnel::ApiClient::new(base, &reachback_tunnel::ApiTrust::default(), Duration::from_secs(30)).expect("client");
    let answer = api.post_json("/api/v1/connectors/enroll", &json!({"provisioning_key": key, "public_key": pair.public_key_pem()})).expect("enroll");
    let text = |key: &str| answer[key].as_str().expect("field").to_string();
    let brokers = answer["broker_endpoints"].as_array().expect("brokers").iter().map(|item| item.as_str().expect("text").to_string()).collect();
    (TlsMaterial { certificate_pem: text("certificate"), private_key_pem: pair.serialize_pem(), ca_pem: text("ca_certificate") }, brokers)
}

/// Opens a flow as a connector does, from `source`; returns the broker's answer and the stream.
async fn open(connection: &Connection, protocol: Transport, source: &str, destination: &str) -> (FlowReply, SendStream, RecvStream) {
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    let request = FlowOpen { destination: destination.parse().expect("address"), source: source.parse().expect("address"), user: None, protocol };
    write_frame(&mut send, &request).await.expect("write");
    let reply =
        tokio::time::timeout(Duration::from_secs(10), read_frame::<FlowReply>(&mut recv)).await.expect("reply in time").expect("frame").expect("a reply");
    (reply, send, recv)
}

/// An allowed TCP flow: `TO_CLIENT` bytes to the service, which answers with `FROM_CLIENT`.
async fn tcp_exchange(connection: &Connection, source: &str, destination: &str) {
    let (reply, mut send, mut recv) = open(connection, Transport::Tcp, source, destination).await;
    assert_eq!(reply, FlowReply::Ok);
    send.write_all(&vec![b'x'; TO_CLIENT]).await.expect("write");
    send.finish().expect("finish");
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await.expect("in time").expect("read");
    assert_eq!(answer.len(), FROM_CLIENT);
}

/// A local service for the agent: reads what the server sends until it finishes,
/// then answers with `FROM_CLIENT` bytes and closes.
async fn answering_service() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                if stream.read_to_end(&mut received).await.is_ok() {
                    let _ = stream.write_all(&vec![b'y'; FROM_CLIENT]).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    port
}

/// A local UDP echo for the agent.
async fn udp_echo() -> u16 {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let port = socket.local_addr().expect("address").port();
    tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while let Ok((length, from)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..length], from).await;
        }
    });
    port
}

/// Every way a flow through the connector ends is one row with its verdict: two
/// allowed flows (TCP with 3,000 bytes in and 5,000 out, UDP with one datagram each
/// way), a policy's denial and the default one, the agent's refusal of a port, an
/// address no agent holds. Who held the address, which connector, which server
/// address and which policy are on each row; turning the log off records nothing.
async fn flows_through_the_connector_are_logged_with_their_verdict_and_bytes(mut server: TestServer) {
    let base = server.serve_with_broker().await;
    let (service_port, udp_port) = (answering_service().await, udp_echo().await);
    server.post("/api/v1/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).await;
    let reachable = server
        .post(
            "/api/v1/app-segments",
            json!({"name": "service", "destinations": ["100.64.0.0/24"], "tcp_ports": [service_port.to_string(), "2"], "udp_ports": [udp_port.to_string()]}),
        )
        .await
        .json();
    let blocked = server.post("/api/v1/app-segments", json!({"name": "rdp", "destinations": ["100.64.0.0/24"], "tcp_ports": ["3390"]})).await.json();
    let connector = server.post("/api/v1/connectors", json!({"name": "dc-east"})).await.json();
    let deny = server.post("/api/v1/access-policies", json!({"name": "block rdp", "action": "deny", "segment_ids": [blocked["id"]]})).await.json();
    let allow = server.post("/api/v1/access-policies", json!({"name": "allow service", "action": "allow", "segment_ids": [reachable["id"]]})).await.json();
    assert_eq!((deny["order"].clone(), allow["order"].clone()), (json!(1), json!(2)));
    let key = server.post("/api/v1/enrollment-keys", json!({"username": "alice@corp.example"})).await.json()["key"].as_str().expect("key").to_string();

    // the agent, in this process: the service port over TCP (not port 2), the echo over UDP
    let state_dir = server.data_dir.join("agent");
    let options = reachback_agent::EnrollOptions {
        server: base.clone(),
        key,
        hostname: "alice-laptop.corp.example".into(),
        platform: "linux".into(),
        location: None,
        state_dir: state_dir.clone(),
        trust: reachback_tunnel::ApiTrust::default(),
        force: false,
    };
    let enrolled = tokio::task::spawn_blocking(move || reachback_agent::enroll(&options)).await.expect("join").expect("agent enrolls");
    let run = reachback_agent::RunOptions {
        state_dir,
        allow_ports: reachback_agent::parse_allow_ports(&service_port.to_string()).expect("ports"),
        allow_udp_ports: reachback_agent::parse_allow_udp_ports(&udp_port.to_string()).expect("ports"),
        connect_host: "127.0.0.1".parse().expect("address"),
        version: "test".into(),
        tcp_congestion: reachback_tunnel::Congestion::resolve(None).expect("the default congestion control"),
    };
    let (_stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(reachback_agent::run(run, async move {
        let _ = agent_stopped.await;
    }));
    for _ in 0..200 {
        if server.get("/api/v1/client-sessions").await.json()["total"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let provisioning_key = connector["provisioning_key"].as_str().expect("key").to_string();
    let base_for_connector = base.clone();
    let (material, brokers) = tokio::task::spawn_blocking(move || enroll_connector(&base_for_connector, &provisioning_key)).await.expect("join");
    let endpoint = TunnelConnector::new(&material).expect("connector");
    let tunnel = reachback_tunnel::client::connect(&endpoint, &brokers, ClientRole::Connector, None, "test").await.expect("connector connects");
    let connection = tunnel.connection.clone();
    tokio::spawn(tunnel.run_control(None, |_| {}));

    // one flow of each kind, one after the other
    let before = reachback_store::now_micros();
    tcp_exchange(&connection, "10.1.2.3:40001", &format!("100.64.0.1:{service_port}")).await;
    let (reply, mut send, mut recv) = open(&connection, Transport::Udp, "10.1.2.3:40002", &format!("100.64.0.1:{udp_port}")).await;
    assert_eq!(reply, FlowReply::Ok);
    send.write_all(&reachback_proto::datagram::encode_datagram(&[7u8; 100]).expect("datagram")).await.expect("write");
    let mut echoed = vec![0u8; 102];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut echoed)).await.expect("in time").expect("echo");
    send.finish().expect("finish");
    tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024)).await.expect("the UDP flow ends").expect("read");
    let refusal = |source: &'static str, destination: &'static str| {
        let connection = connection.clone();
        async move { open(&connection, Transport::Tcp, source, destination).await.0 }
    };
    assert_eq!(refusal("10.1.2.3:40003", "100.64.0.1:3390").await, FlowReply::Refused(Refusal::Denied { rule: Some("block rdp".into()) }));
    assert_eq!(refusal("10.1.2.3:40004", "100.64.0.1:3389").await, FlowReply::Refused(Refusal::Denied { rule: None }), "no policy matches");
    assert_eq!(refusal("10.1.2.3:40005", "100.64.0.1:2").await, FlowReply::Refused(Refusal::PortNotAllowed));
    assert_eq!(refusal("10.1.2.4:40006", "100.64.0.2:22").await, FlowReply::Refused(Refusal::Offline));

    let rows = wait_for_flows(&server, 6).await;
    let after = reachback_store::now_micros();
    let connector_id = field(&connector, "id");
    for row in &rows {
        let (started, ended) = (parse_time(&field(row, "started_at")).expect("time"), parse_time(&field(row, "ended_at")).expect("time"));
        assert!(before <= started && started <= ended && ended <= after, "{row}");
        assert_eq!(
            (field(row, "connector_id"), field(row, "connector_name"), field(row, "node_name")),
            (connector_id.clone(), "dc-east".into(), "test".into())
        );
    }
    // verdict, protocol, server → virtual address, reason, policy, bytes to and from the client, user
    let summary: Vec<Value> = rows
        .iter()
        .map(|row| {
            let flow = format!("{}:{} -> {}:{}", field(row, "server_ip"), row["server_port"], field(row, "virtual_ip"), row["virtual_port"]);
            json!([row["verdict"], row["protocol"], flow, row["reason"], row["policy_name"], row["bytes_to_client"], row["bytes_from_client"], row["username"]])
        })
        .collect();
    let alice = "alice@corp.example";
    let expected = vec![
        json!(["allowed", "tcp", format!("10.1.2.3:40001 -> 100.64.0.1:{service_port}"), null, "allow service", TO_CLIENT, FROM_CLIENT, alice]),
        json!(["allowed", "udp", format!("10.1.2.3:40002 -> 100.64.0.1:{udp_port}"), null, "allow service", 102, 102, alice]),
        json!(["denied", "tcp", "10.1.2.3:40003 -> 100.64.0.1:3390", null, "block rdp", 0, 0, alice]),
        json!(["denied", "tcp", "10.1.2.3:40004 -> 100.64.0.1:3389", null, null, 0, 0, alice]),
        json!(["refused_by_agent", "tcp", "10.1.2.3:40005 -> 100.64.0.1:2", "port_not_allowed", "allow service", 0, 0, alice]),
        json!(["offline", "tcp", "10.1.2.4:40006 -> 100.64.0.2:22", null, null, 0, 0, null]),
    ];
    assert_eq!(summary, expected, "{rows:#?}");
    // who held the address, as it was: on every row but the offline one
    for row in &rows[..5] {
        assert_eq!(
            (field(row, "device_id"), field(row, "client_hostname"), field(row, "platform")),
            (enrolled.id.clone(), "alice-laptop.corp.example".into(), "linux".into())
        );
    }
    assert_eq!((rows[5]["device_id"].clone(), rows[5]["client_hostname"].clone()), (Value::Null, Value::Null));
    assert_eq!((field(&rows[2], "policy_id"), field(&rows[0], "policy_id")), (field(&deny, "id"), field(&allow, "id")));

    // the filters on live rows
    let count = |query: &'static str| {
        let server = &server;
        async move { flows(server, query).await["total"].as_i64().expect("total") }
    };
    assert_eq!(count("verdict=denied").await, 2);
    assert_eq!(count("protocol=udp").await, 1);
    assert_eq!(count("virtual_ip=100.64.0.2").await, 1);
    assert_eq!(count("server_ip=10.1.2.0/30").await, 5);
    assert_eq!(flows(&server, &format!("device_id={}", enrolled.id)).await["total"], 5, "a device's flows, as the console links them");
    assert_eq!(flows(&server, &format!("connector_id={connector_id}")).await["total"], 6);
    assert_eq!(count("username=ALICE&verdict=refused_by_agent").await, 1);
    let metrics = server.get("/metrics").await.text();
    assert!(metrics.contains("reachback_flow_log_written_total 6"), "{metrics}");
    assert!(!metrics.contains("reachback_flow_log_dropped_total{"), "nothing dropped: {metrics}");

    // the log can be turned off (audited, as every setting): flows go on, unrecorded
    let off = server.patch("/api/v1/settings", json!({"flow_log_enabled": false})).await;
    assert_eq!((off.status, off.json()["flow_log_enabled"].clone()), (StatusCode::OK, json!(false)));
    tcp_exchange(&connection, "10.1.2.3:40007", &format!("100.64.0.1:{service_port}")).await;
    assert_eq!(refusal("10.1.2.3:40008", "100.64.0.2:22").await, FlowReply::Refused(Refusal::Offline));
    tokio::time::sleep(reachback_server::flowlog::BATCH_WINDOW * 3).await;
    assert_eq!(flows(&server, "").await["total"], 6, "nothing recorded while off");
    assert_eq!(server.patch("/api/v1/settings", json!({"flow_log_enabled": true})).await.status, StatusCode::OK);
    tcp_exchange(&connection, "10.1.2.3:40009", &format!("100.64.0.1:{service_port}")).await;
    let rows = wait_for_flows(&server, 7).await;
    assert_eq!((field(&rows[6], "verdict"), rows[6]["server_port"].clone()), ("allowed".into(), json!(40009)));
    let audit = server.get("/api/v1/audit-logs?resource_type=settings&page_size=2").await.json();
    assert_eq!(audit["items"][1]["after"]["flow_log_enabled"], false, "{audit}");
}

/// An hour ago, to the second: recent enough that the server's own retention round
/// (at start, 90 days) leaves the test's flows alone.
fn an_hour_ago() -> i64 {
    reachback_store::now_micros() / 1_000_000 * 1_000_000 - 3_600_000_000
}

/// Fifty flows from `t0` on with every field varied, written through the store as
/// the writer writes them; each starts at its own instant, so every order is total
/// without ids.
pub(crate) fn varied_flows(t0: i64) -> Vec<FlowRecord> {
    let users = [
        (Some("d1"), Some("alice@corp.example"), Some("alice-pc.corp.example"), Some("windows")),
        (Some("d2"), Some("bob@corp.example"), Some("bob-mac.lab.example"), Some("macos")),
        (Some("d3"), Some("Carol@Corp.Example"), Some("CAROL-PC.corp.example"), Some("linux")),
        (None, None, None, None),
    ];
    let verdicts = [FlowVerdict::Allowed, FlowVerdict::Allowed, FlowVerdict::Denied, FlowVerdict::RefusedByAgent, FlowVerdict::Failed, FlowVerdict::Allowed];
    (0..50u32)
        .map(|index| {
            let i = index as usize;
            let (device, username, hostname, platform) = users[i % 4];
            let verdict = if device.is_none() { FlowVerdict::Offline } else { verdicts[i % verdicts.len()] };
            let started_at = t0 + i64::from(index) * 1_000_000 + i64::from(index % 3) * 17;
            let connector = if i.is_multiple_of(5) { ("c2", "dc-west") } else { ("c1", "dc-east") };
            FlowRecord {
                started_at,
                ended_at: started_at + i64::from(index % 7) * 2_500_000,
                protocol: if i % 4 == 1 { FlowProtocol::Udp } else { FlowProtocol::Tcp },
                verdict,
                reason: match verdict {
                    FlowVerdict::RefusedByAgent => Some("port_not_allowed"),
                    FlowVerdict::Failed => Some("timeout"),
                    _ => None,
                },
                policy_id: (verdict != FlowVerdict::Offline).then(|| "p1".to_string()),
                policy_name: (verdict != FlowVerdict::Offline).then(|| "allow".to_string()),
                connector_id: Arc::from(connector.0),
                connector_name: Arc::from(connector.1),
                server: SocketAddr::from(([10, 0, (index % 4) as u8, (index % 5 + 1) as u8], 40_000 + (index % 9) as u16)),
                destination: SocketAddr::from(([100, 64, (index % 3) as u8, (index % 10 + 1) as u8], [22, 445, 3389][i % 3])),
                device_id: device.map(str::to_string),
                username: username.map(str::to_string),
                client_hostname: hostname.map(str::to_string),
                platform: platform.map(str::to_string),
                socks_user: None,
                bytes_to_client: u64::from(index * 7919 % 10_007),
                bytes_from_client: u64::from(index * 104_729 % 65_537),
            }
        })
        .collect()
}

async fn insert(server: &TestServer, records: &[FlowRecord]) {
    server.state.as_ref().expect("state").store.insert_flows(records, "node-a").await.expect("insert");
}

/// The reference model's answer for a filter: the records it keeps, oldest first.
fn reference(records: &[FlowRecord], filter: &[(&str, String)]) -> Vec<i64> {
    let within = |address: std::net::IpAddr, text: &str| {
        let (first, last) = reachback_server::api::bindings::ip_filter(text).expect("a filter");
        let (family, value) = reachback_ipam::split_address(address);
        let key = reachback_ipam::address_key(family, value);
        first <= key && key <= last
    };
    let contains = |value: &Option<String>, needle: &str| value.as_ref().is_some_and(|value| value.to_lowercase().contains(&needle.to_lowercase()));
    let mut kept: Vec<&FlowRecord> = records
        .iter()
        .filter(|record| {
            filter.iter().all(|(name, value)| match *name {
                "device_id" => record.device_id.as_deref() == Some(value.as_str()),
                "connector_id" => &*record.connector_id == value.as_str(),
                "username" => contains(&record.username, value),
                "client_hostname" => contains(&record.client_hostname, value),
                "virtual_ip" => within(record.destination.ip(), value),
                "server_ip" => within(record.server.ip(), value),
                "verdict" => record.verdict.as_str() == value,
                "protocol" => record.protocol.as_str() == value,
                "from" | "to" => true,
                other => panic!("no reference for {other}"),
            })
        })
        .filter(|record| {
            let time = |name: &str| filter.iter().find(|(key, _)| *key == name).map(|(_, value)| parse_time(value).expect("time"));
            reachback_store::flow_overlaps(record.started_at, record.ended_at, time("from"), time("to"))
        })
        .collect();
    kept.sort_by_key(|record| record.started_at);
    kept.iter().map(|record| record.started_at).collect()
}

fn start_of(row: &Value) -> i64 {
    parse_time(&field(row, "started_at")).expect("time")
}

/// Every page of a listing, `page_size` at a time.
async fn every_page(server: &TestServer, query: &str, page_size: usize) -> (Vec<Value>, i64) {
    let mut rows = Vec::new();
    let mut total = -1;
    for page in 1.. {
        let listing = flows(server, &format!("{query}&page={page}&page_size={page_size}")).await;
        total = listing["total"].as_i64().expect("total");
        let page_rows = items(&listing);
        let last = page_rows.len() < page_size;
        rows.extend(page_rows);
        if last {
            break;
        }
    }
    (rows, total)
}

/// The export's rows for a query, as their start instants.
async fn exported(server: &TestServer, query: &str) -> Vec<i64> {
    let reply = server.get(&format!("/api/v1/flows/export.csv?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
    let text = reply.text();
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().expect("header").iter().map(str::to_string).collect();
    assert_eq!(header, reachback_server::api::flows::CSV_HEADER);
    reader.records().map(|record| parse_time(&record.expect("record")[0]).expect("time")).collect()
}

/// Each filter (and some together) keeps exactly the rows the reference model keeps;
/// every sort orders them, both ways, with pages that neither overlap nor skip; the
/// export holds the listing's rows in the listing's order.
async fn filters_sort_and_pages_agree_with_a_reference_and_the_export(server: TestServer) {
    let t0 = an_hour_ago();
    let records = varied_flows(t0);
    insert(&server, &records).await;
    let at = |index: usize| format_time(records[index].started_at);
    let end = |index: usize| format_time(records[index].ended_at);
    let filters: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("device_id", "d2".into())],
        vec![("connector_id", "c2".into())],
        vec![("username", "CORP".into())],
        vec![("username", "al".into())],
        vec![("username", "carol@corp".into())],
        vec![("client_hostname", "-pc.".into())],
        vec![("client_hostname", "lab".into())],
        vec![("virtual_ip", "100.64.1.0/24".into())],
        vec![("virtual_ip", "100.64.2.3".into())],
        vec![("virtual_ip", "100.64.0.0/16".into())],
        vec![("server_ip", "10.0.2.0/24".into())],
        vec![("server_ip", "10.0.3.4".into())],
        vec![("verdict", "denied".into())],
        vec![("verdict", "offline".into())],
        vec![("protocol", "udp".into())],
        vec![("from", at(20))],
        vec![("to", at(20))],
        vec![("from", end(13)), ("to", end(13))],
        vec![("from", at(10)), ("to", at(30)), ("verdict", "allowed".into())],
        vec![("device_id", "d1".into()), ("protocol", "tcp".into()), ("virtual_ip", "100.64.0.0/24".into())],
        vec![("username", "%".into())],
    ];
    for filter in &filters {
        let expected = reference(&records, filter);
        let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(filter.iter().map(|(name, value)| (*name, value.as_str()))).finish();
        let and = if query.is_empty() { String::new() } else { format!("{query}&") };
        let (listed, total) = every_page(&server, &format!("{and}sort=started_at"), 7).await;
        assert_eq!(total, expected.len() as i64, "{query}");
        assert_eq!(listed.iter().map(start_of).collect::<Vec<_>>(), expected, "{query}");
        // the default order is newest first
        let newest: Vec<i64> = items(&flows(&server, &format!("{and}page_size=1000")).await).iter().map(start_of).collect();
        assert_eq!(newest, expected.iter().rev().copied().collect::<Vec<_>>(), "{query}: default order");
        assert_eq!(exported(&server, &query).await, newest, "{query}: export");
        assert_eq!(exported(&server, &format!("{and}sort=started_at")).await, expected, "{query}: export oldest first");
    }
    assert!(reference(&records, &[("from", end(13)), ("to", end(13))]).len() >= 2, "a window of one instant finds the flows spanning it");
    // every order: by its key, pages of 6 partition the rows, descending is the exact reverse
    let number = |row: &Value, name: &str| row[name].as_i64().expect("number");
    for sort in reachback_server::api::flows::SORTS {
        let (ascending, total) = every_page(&server, &format!("sort={sort}"), 6).await;
        assert_eq!((total, ascending.len()), (50, 50), "{sort}");
        let (descending, _) = every_page(&server, &format!("sort=-{sort}"), 6).await;
        assert_eq!(descending.iter().rev().map(start_of).collect::<Vec<_>>(), ascending.iter().map(start_of).collect::<Vec<_>>(), "{sort}: reversed");
        let mut ids: Vec<String> = ascending.iter().map(|row| field(row, "id")).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50, "{sort}: no row twice");
        let address = |row: &Value, name: &str, port: &str| {
            let (family, value) = reachback_ipam::parse_address(&field(row, name)).expect("address");
            (reachback_ipam::address_key(family, value), number(row, port))
        };
        for pair in ascending.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let in_order = match *sort {
                "started_at" | "ended_at" => parse_time(&field(a, sort)) <= parse_time(&field(b, sort)),
                "virtual_ip" => address(a, "virtual_ip", "virtual_port") <= address(b, "virtual_ip", "virtual_port"),
                "server_ip" => address(a, "server_ip", "server_port") <= address(b, "server_ip", "server_port"),
                "bytes" => number(a, "bytes_to_client") + number(a, "bytes_from_client") <= number(b, "bytes_to_client") + number(b, "bytes_from_client"),
                "bytes_to_client" | "bytes_from_client" => number(a, sort) <= number(b, sort),
                // text orders follow the database's collation: equal keys stay together
                _ => true,
            };
            assert!(in_order, "{sort}: {a} before {b}");
        }
        if matches!(*sort, "username" | "client_hostname" | "verdict" | "protocol" | "connector_name") {
            let keys: Vec<String> = ascending.iter().map(|row| row[*sort].as_str().unwrap_or("").to_string()).collect();
            let mut grouped = keys.clone();
            grouped.dedup();
            let mut distinct = grouped.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(grouped.len(), distinct.len(), "{sort}: equal values together: {keys:?}");
        }
    }
    // a page past the end is empty and still counts
    let past = flows(&server, "page=11&page_size=5").await;
    assert_eq!((past["items"].clone(), past["total"].clone()), (json!([]), json!(50)));
    // a row as the API shows it
    let row = &items(&flows(&server, "sort=started_at&page_size=1").await)[0];
    assert_eq!(row["started_at"], json!(format_time(t0)));
    assert_eq!(
        (field(row, "server_ip"), row["server_port"].clone(), field(row, "virtual_ip"), row["virtual_port"].clone(), field(row, "connector_name")),
        ("10.0.0.1".into(), json!(40_000), "100.64.0.1".into(), json!(22), "dc-west".into())
    );
    assert_eq!((field(row, "node_name"), row["bytes_to_client"].clone(), row["socks_user"].clone()), ("node-a".into(), json!(0), Value::Null));
    // viewers read it; nobody else does
    let viewer = server.post("/api/v1/admins", json!({"username": "vic", "role": "viewer"})).await.json();
    let key = server.post(&format!("/api/v1/admins/{}/api-keys", field(&viewer, "id")), json!({"name": "ro"})).await.json();
    let reply = server.call(Method::GET, "/api/v1/flows?page_size=1", None, Some(&field(&key, "key"))).await;
    assert_eq!((reply.status, reply.json()["total"].clone()), (StatusCode::OK, json!(50)));
    assert_eq!(server.call(Method::GET, "/api/v1/flows", None, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.call(Method::GET, "/api/v1/flows/export.csv", None, None).await.status, StatusCode::UNAUTHORIZED);
}

/// The export follows the other exports' rules: the limit (413 before any byte,
/// telling the user to filter) and formulas neutralised in every column.
async fn flow_export_is_limited_and_neutralises_formulas(server: TestServer) {
    let mut records = varied_flows(an_hour_ago());
    records.truncate(2);
    records[0].username = Some("=HYPERLINK(\"http://x\")".into());
    records[0].connector_name = Arc::from("+dc");
    records[0].client_hostname = Some("@host".into());
    records[1].policy_name = Some("-deny".into());
    insert(&server, &records).await;
    let reply = server.get("/api/v1/flows/export.csv?sort=started_at").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().expect("type").starts_with("text/csv"));
    assert!(reply.headers["content-disposition"].to_str().expect("disposition").contains("flow-log.csv"));
    let text = reply.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "started_at,ended_at,protocol,verdict,reason,policy_name,connector_name,server_ip,server_port,virtual_ip,virtual_port,device_id,username,\
         client_hostname,platform,socks_user,bytes_to_client,bytes_from_client,node_name,policy_id,connector_id"
    );
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[1].contains(",'+dc,10.0.0.1,40000,100.64.0.1,22,d1,\"'=HYPERLINK(\"\"http://x\"\")\",'@host,windows,,0,0,node-a,p1,c2"), "{}", lines[1]);
    assert!(lines[2].contains(",udp,allowed,,'-deny,dc-east,"), "{}", lines[2]);
    assert_eq!(server.get("/api/v1/flows/export.csv?page=1").await.status, StatusCode::BAD_REQUEST, "no paging in an export");
    // over the limit: refused whole, before the first byte
    assert_eq!(server.patch("/api/v1/settings", json!({"export_limit": 1})).await.status, StatusCode::OK);
    let reply = server.get("/api/v1/flows/export.csv").await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert!(reply.json()["detail"].as_str().expect("detail").contains("filter"), "{}", reply.text());
    assert_eq!(reply.json()["export"], json!({"export_limit": 1, "matching": 2}));
    let filtered = server.get("/api/v1/flows/export.csv?protocol=udp").await;
    assert_eq!((filtered.status, filtered.text().lines().count()), (StatusCode::OK, 2));
}

/// Retention deletes the flows that ended before the cutoff, in batches, and
/// nothing younger; the setting is validated and audited like the others, and the
/// server's round uses it.
async fn retention_deletes_only_flows_that_ended_before_the_cutoff(server: TestServer) {
    let records = varied_flows(an_hour_ago());
    insert(&server, &records).await;
    let state = server.state.as_ref().expect("state");
    let audit = |deleted: u64| reachback_store::AuditEntry {
        actor: "test".into(),
        action: "prune_flow_log".into(),
        resource_type: "flow_log".into(),
        resource_id: "*".into(),
        after: Some(json!({"deleted": deleted})),
        ..Default::default()
    };
    let mut ends: Vec<i64> = records.iter().map(|record| record.ended_at).collect();
    ends.sort_unstable();
    let cutoff = ends[20];
    let older = ends.iter().filter(|end| **end < cutoff).count() as u64;
    // the cutoff is exclusive: a flow that ended exactly then stays; batches of 3
    assert_eq!(state.store.prune_flows(cutoff, 3, audit).await.expect("prune"), older);
    let left: Vec<i64> = items(&flows(&server, "page_size=1000").await).iter().map(|row| parse_time(&field(row, "ended_at")).expect("time")).collect();
    assert_eq!(left.len() as u64, 50 - older);
    assert!(left.iter().all(|end| *end >= cutoff) && left.contains(&cutoff), "only the older ones went");
    assert_eq!(state.store.prune_flows(cutoff, 1000, audit).await.expect("prune"), 0, "a second round finds nothing");

    // the setting: validated, audited, and what the server's round uses
    assert_eq!(server.get("/api/v1/settings").await.json()["flow_log_retention_days"], 90, "the default");
    for bad in [
        json!({"flow_log_retention_days": 0}),
        json!({"flow_log_retention_days": 3651}),
        json!({"flow_log_retention_days": "90"}),
        json!({"flow_log_enabled": "no"}),
        json!({"flow_log_enabled": null}),
    ] {
        let reply = server.patch("/api/v1/settings", bad.clone()).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let named = bad.as_object().and_then(|object| object.keys().next().cloned()).expect("name");
        assert_eq!(reply.json()["errors"][0]["field"], json!(named));
    }
    let settings = server.get("/api/v1/settings").await.json();
    assert_eq!((settings["flow_log_retention_days"].clone(), settings["flow_log_enabled"].clone()), (json!(90), json!(true)), "refusals changed nothing");
    let reply = server.patch("/api/v1/settings", json!({"flow_log_retention_days": 1})).await;
    assert_eq!((reply.status, reply.json()["flow_log_retention_days"].clone()), (StatusCode::OK, json!(1)));
    let audit_log = server.get("/api/v1/audit-logs?resource_type=settings&page_size=1").await.json();
    assert_eq!(audit_log["items"][0]["after"]["flow_log_retention_days"], 1);
    // a day after the last end: all gone but the last; a day and a microsecond after: all
    let last = *ends.last().expect("ends");
    let kept_by_one = ends.iter().filter(|end| **end == last).count() as u64;
    assert_eq!(reachback_server::prune_flow_log_now(state, last + 86_400_000_000).await.expect("round"), 50 - older - kept_by_one);
    assert_eq!(reachback_server::prune_flow_log_now(state, last + 86_400_000_001).await.expect("round"), kept_by_one);
    assert_eq!(flows(&server, "").await["total"], 0);
    let audit_log = server.get("/api/v1/audit-logs?action=prune_flow_log&actor=system").await.json();
    assert_eq!(audit_log["total"], 2, "each round that deleted is audited once");
    assert_eq!(audit_log["items"][0]["after"]["deleted"], kept_by_one);
    assert_eq!(audit_log["items"][0]["after"]["retention_days"], 1);
}

/// Every bad query value is a 400 problem document naming the parameter, never a 5xx.
async fn hostile_flow_queries_are_refused_by_name(server: TestServer) {
    insert(&server, &varied_flows(an_hour_ago())[..3]).await;
    let long = "x".repeat(10_000);
    let cases: Vec<(String, &str)> = vec![
        (format!("?username={long}"), "username"),
        ("?virtual_ip=banana".into(), "virtual_ip"),
        ("?virtual_ip=100.64.0.0/33".into(), "virtual_ip"),
        ("?virtual_ip=".into(), "virtual_ip"),
        ("?server_ip=fd00::/129".into(), "server_ip"),
        ("?server_ip=10.0.0.1%00".into(), "server_ip"),
        ("?verdict=maybe".into(), "verdict"),
        ("?verdict=".into(), "verdict"),
        ("?verdict=ALLOWED".into(), "verdict"),
        ("?protocol=icmp".into(), "protocol"),
        ("?from=later".into(), "from"),
        ("?to=2026-02-30T00:00:00Z".into(), "to"),
        ("?from=2026-02-02T00:00:00Z&to=2026-02-01T00:00:00Z".into(), "from"),
        ("?sort=colour".into(), "sort"),
        ("?sort=id".into(), "sort"),
        ("?page=0".into(), "page"),
        ("?page_size=5000".into(), "page_size"),
        ("?ip=100.64.0.1".into(), "ip"),
        ("?device_id=%01".into(), "device_id"),
        ("?client_hostname=%FF".into(), "client_hostname"),
        ("?verdict=denied&verdict=allowed".into(), "verdict"),
        ("/export.csv?page_size=5".into(), "page_size"),
        ("/export.csv?virtual_ip=1.2.3".into(), "virtual_ip"),
    ];
    for (path, parameter) in &cases {
        let reply = server.get(&format!("/api/v1/flows{path}")).await;
        let shown = &path[..path.len().min(80)];
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{shown}: {}", reply.text());
        assert_eq!(reply.headers["content-type"], "application/problem+json", "{shown}");
        assert_eq!(reply.json()["errors"][0]["field"], *parameter, "{shown}: {}", reply.text());
    }
    // odd but valid values answer, never with a 5xx
    for path in [
        format!("?username={}", "x".repeat(1024)),
        "?username=%25_%5C".into(),
        "?client_hostname=%22%27%3B--".into(),
        "?device_id=%27%20OR%201%3D1".into(),
        "?from=0001-01-01T00:00:00Z&to=9999-12-31T23:59:59.999999Z".into(),
        "?virtual_ip=::/0".into(),
        "?server_ip=0.0.0.0/0".into(),
        "?virtual_ip=::ffff:100.64.0.1".into(),
        "?sort=-bytes&page=1000000&page_size=1000".into(),
    ] {
        let reply = server.get(&format!("/api/v1/flows{path}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: {}", &path[..path.len().min(80)], reply.text());
    }
    assert_eq!(flows(&server, "username=%25_%5C").await["total"], 0, "LIKE wildcards match literally");
    assert_eq!(flows(&server, "device_id=%27%20OR%201%3D1").await["total"], 0);
    assert_eq!(server.delete("/api/v1/flows").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(flows(&server, "").await["total"], 3, "nothing changed");
}
