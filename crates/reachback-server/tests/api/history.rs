//! Binding history at the API boundary, on both backends: an address traced through
//! a release and its reuse by another device (each holder's interval, and its
//! boundaries: the start inclusive, the end exclusive), every kind of release
//! recorded with its reason, refusals that record nothing, filters and paging
//! against a reference model, the export against the listing, retention, and
//! hostile query values.

use axum::http::{Method, StatusCode};
use reachback_server::request::{format_time, parse_time};
use serde_json::{Value, json};

use crate::harness::{Reply, TOKEN, TestServer};
use crate::on_both_backends;

on_both_backends!(
    an_address_is_traced_through_release_and_reuse_by_another_device,
    every_release_is_recorded_with_its_reason,
    refusals_write_no_history,
    filters_sort_and_pages_agree_with_a_reference_and_the_export,
    history_export_is_limited_and_neutralises_formulas,
    retention_deletes_only_closed_intervals_older_than_the_cutoff,
    hostile_history_queries_are_refused_by_name,
    bindings_held_before_history_began_are_recorded_as_migrated,
);

fn public_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()
}

async fn create_range(server: &TestServer, body: Value) -> Value {
    let reply = server.post("/api/v1/ip-ranges", body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn create_key(server: &TestServer, username: &str) -> String {
    let reply = server.post("/api/v1/enrollment-keys", json!({"username": username, "reusable": true})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["key"].as_str().expect("key").to_string()
}

async fn enroll(server: &TestServer, key: &str, hostname: &str, public_key: &str) -> Reply {
    server
        .call(Method::POST, "/api/v1/enroll", Some(json!({"enrollment_key": key, "hostname": hostname, "platform": "windows", "public_key": public_key})), None)
        .await
}

/// Enrolls a new device; returns (device id, virtual IP).
async fn enrolled(server: &TestServer, key: &str, hostname: &str) -> (String, String) {
    let reply = enroll(server, key, hostname, &public_key()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{hostname}: {}", reply.text());
    let body = reply.json();
    (body["device_id"].as_str().expect("device").to_string(), body["virtual_ip"].as_str().expect("ip").to_string())
}

/// The history listing for a query string (200 expected).
async fn history(server: &TestServer, query: &str) -> Value {
    let reply = server.get(&format!("/api/v1/ip-bindings/history?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
    reply.json()
}

fn items(listing: &Value) -> Vec<Value> {
    listing["items"].as_array().expect("items").clone()
}

fn field(row: &Value, name: &str) -> String {
    row[name].as_str().unwrap_or_default().to_string()
}

/// Every interval, oldest first (one page of up to 1,000).
async fn all_history(server: &TestServer) -> Vec<Value> {
    items(&history(server, "sort=bound_at&page_size=1000").await)
}

fn time_of(row: &Value, name: &str) -> Option<i64> {
    row[name].as_str().map(|text| parse_time(text).unwrap_or_else(|| panic!("{name} is not RFC 3339: {text}")))
}

/// The devices holding `ip` at `at`, by the listing's `at` filter.
async fn holders(server: &TestServer, ip: &str, at: i64) -> Vec<String> {
    items(&history(server, &format!("ip={ip}&at={}", format_time(at))).await).iter().map(|row| field(row, "device_id")).collect()
}

/// The trace of `ip` at `at`: (holder, previous, next) device ids, "" for none.
async fn trace(server: &TestServer, ip: &str, at: Option<i64>) -> (String, String, String) {
    let path = match at {
        Some(at) => format!("/api/v1/ip-bindings/history/trace?ip={ip}&at={}", format_time(at)),
        None => format!("/api/v1/ip-bindings/history/trace?ip={ip}"),
    };
    let reply = server.get(&path).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    let body = reply.json();
    (field(&body["holder"], "device_id"), field(&body["previous"], "device_id"), field(&body["next"], "device_id"))
}

/// The history agrees with the bindings (one open interval per bound address, none
/// elsewhere) and the counters with the rows.
async fn consistent(server: &TestServer) {
    let store = &server.state.as_ref().expect("state").store;
    assert_eq!(store.verify_history().await.expect("history check"), Vec::<String>::new(), "history and bindings disagree");
    assert_eq!(store.verify_counters().await.expect("counters"), Vec::<(String, i64, i64)>::new());
}

fn now() -> i64 {
    reachback_store::now_micros()
}

/// Enough for two store timestamps taken on either side to differ.
async fn tick() {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
}

/// A firewall log line names 100.64.0.1 at some instant: the history says which
/// device held it then. A range of one address makes device B get A's address out
/// of quarantine after an admin released it; a second range with a one-second
/// quarantine gives an address back once its quarantine ran out.
async fn an_address_is_traced_through_release_and_reuse_by_another_device(server: TestServer) {
    create_range(&server, json!({"name": "One", "range": "100.64.0.1-100.64.0.1"})).await;
    let alice_key = create_key(&server, "alice@corp.example").await;
    let bob_key = create_key(&server, "bob@corp.example").await;
    let (alice, ip) = enrolled(&server, &alice_key, "alice-laptop.corp.example").await;
    assert_eq!(ip, "100.64.0.1");
    let rows = items(&history(&server, "ip=100.64.0.1").await);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let open = &rows[0];
    assert_eq!(
        (field(open, "device_id"), field(open, "username"), field(open, "client_hostname"), field(open, "platform"), field(open, "range_name")),
        (alice.clone(), "alice@corp.example".into(), "alice-laptop.corp.example".into(), "windows".into(), "One".into())
    );
    assert_eq!((open["released_at"].clone(), open["reason"].clone(), field(open, "bound_reason")), (Value::Null, Value::Null, "enrolled".into()));
    tick().await;
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.1").await.status, StatusCode::NO_CONTENT);
    tick().await;
    // nothing fresh is left: bob gets the quarantined address
    let (bob, bob_ip) = enrolled(&server, &bob_key, "bob-desktop.corp.example").await;
    assert_eq!(bob_ip, "100.64.0.1");
    consistent(&server).await;

    let rows = items(&history(&server, "ip=100.64.0.1&sort=bound_at").await);
    assert_eq!(rows.iter().map(|row| field(row, "device_id")).collect::<Vec<_>>(), [alice.clone(), bob.clone()]);
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!((field(a, "reason"), field(b, "bound_reason"), b["released_at"].clone()), ("admin_release".into(), "quarantine_reuse".into(), Value::Null));
    let (a_from, a_until, b_from) = (time_of(a, "bound_at").expect("from"), time_of(a, "released_at").expect("until"), time_of(b, "bound_at").expect("from"));
    assert!(a_from < a_until && a_until < b_from, "{a_from} {a_until} {b_from}");

    // each instant gives the device that held the address then, or nobody
    assert_eq!(holders(&server, &ip, a_from - 1).await, Vec::<String>::new(), "before A was bound: nobody");
    assert_eq!(holders(&server, &ip, a_from).await, [alice.as_str()], "the start is inclusive");
    assert_eq!(holders(&server, &ip, (a_from + a_until) / 2).await, [alice.as_str()]);
    assert_eq!(holders(&server, &ip, a_until - 1).await, [alice.as_str()], "A held until just before its release");
    assert_eq!(holders(&server, &ip, a_until).await, Vec::<String>::new(), "the end is exclusive: not A at its release, and B came later");
    assert_eq!(holders(&server, &ip, b_from - 1).await, Vec::<String>::new());
    assert_eq!(holders(&server, &ip, b_from).await, [bob.as_str()]);
    assert_eq!(holders(&server, &ip, now() + 86_400_000_000).await, [bob.as_str()], "B still holds it");
    // the `at` filter over the whole range agrees with the interval rule at every boundary
    for at in [a_from - 1, a_from, a_until - 1, a_until, a_until + 1, b_from - 1, b_from, b_from + 1] {
        let expected: Vec<String> = rows
            .iter()
            .filter(|row| reachback_store::holds_at(time_of(row, "bound_at").expect("from"), time_of(row, "released_at"), at))
            .map(|row| field(row, "device_id"))
            .collect();
        let listed: Vec<String> =
            items(&history(&server, &format!("ip=100.64.0.0/24&at={}", format_time(at))).await).iter().map(|row| field(row, "device_id")).collect();
        assert_eq!(listed, expected, "at {}", format_time(at));
    }

    // the trace: the holder then, with the ones before and after
    let none = String::new();
    assert_eq!(trace(&server, &ip, Some(a_from - 1)).await, (none.clone(), none.clone(), alice.clone()));
    assert_eq!(trace(&server, &ip, Some(a_from)).await, (alice.clone(), none.clone(), bob.clone()));
    assert_eq!(trace(&server, &ip, Some(a_until)).await, (none.clone(), alice.clone(), bob.clone()), "in the gap");
    assert_eq!(trace(&server, &ip, Some(b_from)).await, (bob.clone(), alice.clone(), none.clone()));
    assert_eq!(trace(&server, &ip, None).await, (bob.clone(), alice.clone(), none.clone()), "now");
    assert_eq!(trace(&server, "100.64.9.9", None).await, (none.clone(), none.clone(), none.clone()));

    // quarantine that ran out: the address comes back as fresh space
    assert_eq!(server.patch("/api/v1/settings", json!({"release_quarantine_seconds": 1})).await.status, StatusCode::OK);
    create_range(&server, json!({"name": "Pair", "range": "100.64.1.0/30"})).await;
    let (carol, carol_ip) = enrolled(&server, &alice_key, "carol.corp.example").await;
    assert_eq!(carol_ip, "100.64.1.1");
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.1.1").await.status, StatusCode::NO_CONTENT);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (dave, dave_ip) = enrolled(&server, &bob_key, "dave.corp.example").await;
    assert_eq!(dave_ip, "100.64.1.1", "the lowest address, its quarantine over");
    let rows = items(&history(&server, "ip=100.64.1.1&sort=bound_at").await);
    assert_eq!(
        rows.iter().map(|row| (field(row, "device_id"), field(row, "bound_reason"), field(row, "reason"))).collect::<Vec<_>>(),
        [(carol, "enrolled".to_string(), "admin_release".to_string()), (dave, "enrolled".to_string(), String::new())]
    );
    consistent(&server).await;
}

/// Signs a device's leave request with its enrolled key (ECDSA P-256).
fn leave_body(pair: &rcgen::KeyPair, device: &str) -> Value {
    use base64::Engine as _;
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pair.serialize_der(), &rng).expect("signer");
    let signed_at = now() / 1_000_000;
    let message = reachback_proto::renewal::leave_message("device", device, signed_at);
    let signature = signer.sign(&rng, message.as_bytes()).expect("sign");
    json!({"public_key": pair.public_key_pem(), "signed_at": signed_at, "signature": base64::engine::general_purpose::STANDARD.encode(signature.as_ref())})
}

/// Every way a binding ends closes its interval with why, in the same transaction:
/// an admin's release, a device deleted, a device that left, a forced range
/// delete, the idle TTL. A released device that comes back is bound again.
async fn every_release_is_recorded_with_its_reason(server: TestServer) {
    let main = create_range(&server, json!({"name": "Main", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "ops@corp.example").await;
    let laptop = public_key();
    let reply = enroll(&server, &key, "released.corp.example", &laptop).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let (released, released_ip) = (field(&reply.json(), "device_id"), field(&reply.json(), "virtual_ip"));
    let (deleted, _) = enrolled(&server, &key, "deleted.corp.example").await;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let reply = enroll(&server, &key, "leaving.corp.example", &pair.public_key_pem()).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let leaving = field(&reply.json(), "device_id");
    let (idle, _) = enrolled(&server, &key, "idle.corp.example").await;
    consistent(&server).await;

    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{released_ip}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.delete(&format!("/api/v1/devices/{deleted}")).await.status, StatusCode::NO_CONTENT);
    let reply = server.call(Method::POST, &format!("/api/v1/devices/{leaving}/leave"), Some(leave_body(&pair, &leaving)), None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    consistent(&server).await;
    // the idle TTL: one round as if two minutes from now, with a TTL of one minute
    let state = server.state.as_ref().expect("state");
    assert_eq!(server.patch("/api/v1/settings", json!({"binding_idle_ttl_seconds": 60})).await.status, StatusCode::OK);
    assert_eq!(reachback_server::release_idle_now(state, now() + 120_000_000).await.expect("idle release"), 1, "only idle's binding was left");
    consistent(&server).await;

    // the released device comes back (same key pair): bound again, as `rebound`, and
    // idle again at the next round
    let again = enroll(&server, &key, "released.corp.example", &laptop).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    consistent(&server).await;
    assert_eq!(reachback_server::release_idle_now(state, now() + 120_000_000).await.expect("idle release"), 1);
    // a forced range delete: the only range left holds one binding
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{}", main["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    let forced = create_range(&server, json!({"name": "Forced", "range": "100.65.0.0/24"})).await;
    let (in_forced, forced_ip) = enrolled(&server, &key, "forced.corp.example").await;
    assert!(forced_ip.starts_with("100.65.0."), "{forced_ip}");
    let forced_id = forced["id"].as_str().expect("id");
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{forced_id}")).await.status, StatusCode::CONFLICT, "in use without force");
    assert_eq!(field(&items(&history(&server, &format!("device_id={in_forced}")).await)[0], "reason"), "", "the refused delete closed nothing");
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{forced_id}?force=true")).await.status, StatusCode::NO_CONTENT);
    consistent(&server).await;

    let reasons: Vec<(String, String, String)> =
        all_history(&server).await.iter().map(|row| (field(row, "device_id"), field(row, "bound_reason"), field(row, "reason"))).collect();
    let expected = [
        (released.clone(), "enrolled", "admin_release"),
        (deleted, "enrolled", "device_deleted"),
        (leaving, "enrolled", "device_left"),
        (idle, "enrolled", "idle_ttl"),
        (released, "rebound", "idle_ttl"),
        (in_forced, "enrolled", "range_deleted"),
    ];
    let expected: Vec<(String, String, String)> = expected.into_iter().map(|(device, bound, reason)| (device, bound.to_string(), reason.to_string())).collect();
    assert_eq!(reasons, expected);
    // every interval is closed now, each ended no earlier than it began
    for row in all_history(&server).await {
        let (from, until) = (time_of(&row, "bound_at").expect("from"), time_of(&row, "released_at").expect("closed"));
        assert!(from <= until, "{row}");
    }
    // the device's own history lists both of its intervals, its addresses included
    let device = items(&history(&server, &format!("device_id={}&sort=bound_at", expected[0].0)).await);
    assert_eq!(device.len(), 2);
    assert_eq!(field(&device[0], "ip"), released_ip);
}

/// Refused requests change nothing, the history included: enrollments refused for a
/// bad key, a full pool, a taken hostname or bad values; a release of an unbound
/// address; a range delete refused while in use.
async fn refusals_write_no_history(server: TestServer) {
    let range = create_range(&server, json!({"name": "Tiny", "range": "100.64.0.1-100.64.0.1"})).await;
    let key = create_key(&server, "erin@corp.example").await;
    let (_, ip) = enrolled(&server, &key, "erin.corp.example").await;
    let before = all_history(&server).await;
    assert_eq!(before.len(), 1);
    let revoked = server.post("/api/v1/enrollment-keys", json!({"username": "mallory"})).await.json();
    assert_eq!(server.delete(&format!("/api/v1/enrollment-keys/{}", field(&revoked, "id"))).await.status, StatusCode::NO_CONTENT);
    let refusals = [
        (enroll(&server, "rbe_not_a_key", "nokey.corp.example", &public_key()).await, StatusCode::UNAUTHORIZED),
        (enroll(&server, &field(&revoked, "key"), "revoked.corp.example", &public_key()).await, StatusCode::UNAUTHORIZED),
        (enroll(&server, &key, "full.corp.example", &public_key()).await, StatusCode::CONFLICT),
        (enroll(&server, &key, "erin.corp.example", &public_key()).await, StatusCode::CONFLICT),
        (enroll(&server, &key, "bad_host", &public_key()).await, StatusCode::UNPROCESSABLE_ENTITY),
        (server.delete("/api/v1/ip-bindings/100.64.0.9").await, StatusCode::NOT_FOUND),
        (server.delete(&format!("/api/v1/ip-ranges/{}", field(&range, "id"))).await, StatusCode::CONFLICT),
        (server.delete("/api/v1/devices/nope").await, StatusCode::NOT_FOUND),
    ];
    for (index, (reply, status)) in refusals.iter().enumerate() {
        assert_eq!(reply.status, *status, "refusal {index}: {}", reply.text());
    }
    assert_eq!(all_history(&server).await, before, "no refusal wrote or closed an interval");
    assert_eq!(holders(&server, &ip, now()).await.len(), 1);
    consistent(&server).await;
}

/// Makes a history worth filtering: 12 intervals over two ranges, four users, open
/// and closed ones, released and bound again. Returns every row, oldest first.
async fn varied_history(server: &TestServer) -> Vec<Value> {
    create_range(server, json!({"name": "Lyon", "range": "100.64.0.0/24"})).await;
    create_range(server, json!({"name": "Six", "range": "fd00::/120"})).await;
    let mut keys = Vec::new();
    for user in ["ann@corp.example", "ben@corp.example", "cat@lab.example", "=SUM(1+1)"] {
        keys.push(create_key(server, user).await);
    }
    let mut devices = Vec::new();
    for index in 0..9 {
        let laptop = public_key();
        let hostname = format!("host{index:02}.{}.example", if index % 2 == 0 { "corp" } else { "lab" });
        let reply = enroll(server, &keys[index % keys.len()], &hostname, &laptop).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        devices.push((keys[index % keys.len()].clone(), hostname, laptop, field(&reply.json(), "virtual_ip")));
        tick().await;
    }
    for index in [1, 4, 6] {
        assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{}", devices[index].3)).await.status, StatusCode::NO_CONTENT);
        tick().await;
    }
    for index in [1, 6] {
        let (key, hostname, laptop, _) = &devices[index];
        assert_eq!(enroll(server, key, hostname, laptop).await.status, StatusCode::OK);
        tick().await;
    }
    // an IPv6 interval too: the only range with room when Lyon is disabled
    let lyon = server.get("/api/v1/ip-ranges?name=lyon").await.json()["items"][0]["id"].as_str().expect("id").to_string();
    server.call(Method::POST, &format!("/api/v1/ip-ranges/{lyon}/disable"), None, Some(TOKEN)).await;
    let (_, six) = enrolled(server, &keys[0], "six.corp.example").await;
    assert!(six.starts_with("fd00::"), "{six}");
    consistent(server).await;
    let rows = all_history(server).await;
    assert_eq!(rows.len(), 12);
    rows
}

/// The reference model of a query: the rows (oldest first) a filter keeps, by the
/// interval rules and case-insensitive substrings.
fn reference(rows: &[Value], filter: &[(&str, String)]) -> Vec<Value> {
    let ip_in = |row: &Value, cidr: &str| -> bool {
        let address: std::net::IpAddr = field(row, "ip").parse().expect("ip");
        match cidr.split_once('/') {
            None => cidr.parse::<std::net::IpAddr>().is_ok_and(|wanted| wanted == address),
            Some((base, prefix)) => {
                let prefix: u32 = prefix.parse().expect("prefix");
                match (base.parse::<std::net::IpAddr>().expect("base"), address) {
                    (std::net::IpAddr::V4(base), std::net::IpAddr::V4(address)) => {
                        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                        u32::from(base) & mask == u32::from(address) & mask
                    }
                    (std::net::IpAddr::V6(base), std::net::IpAddr::V6(address)) => {
                        let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                        u128::from(base) & mask == u128::from(address) & mask
                    }
                    _ => false,
                }
            }
        }
    };
    let instant = |text: &str| parse_time(text).expect("time");
    rows.iter()
        .filter(|row| {
            let (from, until) = (time_of(row, "bound_at").expect("from"), time_of(row, "released_at"));
            filter.iter().all(|(name, value)| match *name {
                "ip" => ip_in(row, value),
                "at" => reachback_store::holds_at(from, until, instant(value)),
                "from" => reachback_store::overlaps_window(from, until, Some(instant(value)), None),
                "to" => reachback_store::overlaps_window(from, until, None, Some(instant(value))),
                "device_id" => field(row, "device_id") == *value,
                "username" | "client_hostname" => field(row, name).to_lowercase().contains(&value.to_lowercase()),
                other => panic!("no reference for {other}"),
            })
        })
        .cloned()
        .collect()
}

/// Every page of a listing, `page_size` at a time.
async fn every_page(server: &TestServer, query: &str, page_size: usize) -> (Vec<Value>, i64) {
    let mut rows = Vec::new();
    let mut total = -1;
    for page in 1.. {
        let listing = history(server, &format!("{query}&page={page}&page_size={page_size}")).await;
        assert_eq!((listing["page"].clone(), listing["page_size"].clone()), (json!(page), json!(page_size)));
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

/// The export's rows for a query, as (ip, device id, bound_at) triples.
async fn exported(server: &TestServer, query: &str) -> Vec<(String, String, String)> {
    let reply = server.get(&format!("/api/v1/ip-bindings/history/export.csv?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
    let text = reply.text();
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().expect("header").iter().map(str::to_string).collect();
    assert_eq!(header, reachback_server::api::history::CSV_HEADER);
    reader.records().map(|record| record.expect("record")).map(|record| (record[0].to_string(), record[1].to_string(), record[6].to_string())).collect()
}

fn triple(row: &Value) -> (String, String, String) {
    (field(row, "ip"), field(row, "device_id"), field(row, "bound_at"))
}

/// Each filter (and some together) keeps exactly the rows the reference model keeps;
/// every sort orders them, both ways, with pages that neither overlap nor skip; the
/// export holds the listing's rows in the listing's order.
async fn filters_sort_and_pages_agree_with_a_reference_and_the_export(server: TestServer) {
    let rows = varied_history(&server).await;
    let (first, middle, last) = (&rows[0], &rows[5], &rows[11]);
    let boundary = field(middle, "bound_at");
    let released = rows.iter().find_map(|row| row["released_at"].as_str().map(str::to_string)).expect("a closed interval");
    let device = field(&rows[3], "device_id");
    let filters: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("ip", "100.64.0.0/29".into())],
        vec![("ip", field(&rows[1], "ip"))],
        vec![("ip", "fd00::/64".into())],
        vec![("at", boundary.clone())],
        vec![("at", released.clone())],
        vec![("at", field(first, "bound_at")), ("ip", "100.64.0.0/24".into())],
        vec![("from", boundary.clone())],
        vec![("to", boundary.clone())],
        vec![("from", field(first, "bound_at")), ("to", field(first, "bound_at"))],
        vec![("from", released.clone()), ("to", field(last, "bound_at"))],
        vec![("device_id", device.clone())],
        vec![("username", "CORP".into())],
        vec![("username", "ben@".into())],
        vec![("username", "=sum".into())],
        vec![("client_hostname", "lab.exa".into())],
        vec![("client_hostname", "ST0".into())],
        vec![("username", "ann"), ("client_hostname", "corp")].into_iter().map(|(name, value)| (name, value.to_string())).collect(),
        vec![("username", "%".into())],
    ];
    for filter in &filters {
        let expected = reference(&rows, filter);
        let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(filter.iter().map(|(name, value)| (*name, value.as_str()))).finish();
        let and = if query.is_empty() { String::new() } else { format!("{query}&") };
        // oldest first: the reference's order
        let (listed, total) = every_page(&server, &format!("{and}sort=bound_at"), 3).await;
        assert_eq!(total, expected.len() as i64, "{query}");
        assert_eq!(listed.iter().map(triple).collect::<Vec<_>>(), expected.iter().map(triple).collect::<Vec<_>>(), "{query}");
        // the default order is newest first
        let newest: Vec<_> = items(&history(&server, &format!("{and}page_size=1000")).await).iter().map(triple).collect();
        assert_eq!(newest, expected.iter().rev().map(triple).collect::<Vec<_>>(), "{query}: default order");
        // the export matches the listing, in the same order, for the same filters
        assert_eq!(exported(&server, &query).await, newest, "{query}: export");
        assert_eq!(exported(&server, &format!("{and}sort=bound_at")).await, listed.iter().map(triple).collect::<Vec<_>>(), "{query}: export oldest first");
    }
    // every sort: the order holds by its key, pages of 5 partition the rows, and
    // descending is the exact reverse
    let time_key = |row: &Value, name: &str| time_of(row, name).unwrap_or(i64::MAX);
    for sort in ["bound_at", "released_at", "ip", "username", "client_hostname", "platform", "range_name", "device_id"] {
        let (ascending, total) = every_page(&server, &format!("sort={sort}"), 5).await;
        assert_eq!((total, ascending.len()), (12, 12), "{sort}");
        let (descending, _) = every_page(&server, &format!("sort=-{sort}"), 5).await;
        assert_eq!(descending.iter().rev().map(triple).collect::<Vec<_>>(), ascending.iter().map(triple).collect::<Vec<_>>(), "{sort}: reversed");
        let mut ids: Vec<String> = ascending.iter().map(|row| field(row, "id")).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 12, "{sort}: no row twice");
        for pair in ascending.windows(2) {
            let in_order = match sort {
                "bound_at" | "released_at" => time_key(&pair[0], sort) <= time_key(&pair[1], sort),
                "ip" => {
                    let key = |row: &Value| reachback_ipam::parse_address(&field(row, "ip")).map(|(family, value)| reachback_ipam::address_key(family, value));
                    key(&pair[0]) <= key(&pair[1])
                }
                // text orders follow the database's collation: equal keys stay together
                _ => true,
            };
            assert!(in_order, "{sort}: {} before {}", pair[0], pair[1]);
        }
        if !matches!(sort, "bound_at" | "released_at" | "ip") {
            let keys: Vec<String> = ascending.iter().map(|row| field(row, sort)).collect();
            let mut grouped = keys.clone();
            grouped.dedup();
            let mut distinct = grouped.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(grouped.len(), distinct.len(), "{sort}: equal values together: {keys:?}");
        }
    }
    // open intervals sort after every closed one by end
    let by_end = items(&history(&server, "sort=released_at&page_size=1000").await);
    let first_open = by_end.iter().position(|row| row["released_at"].is_null()).expect("open rows");
    assert!(by_end[first_open..].iter().all(|row| row["released_at"].is_null()), "open intervals last");
    // a page past the end is empty and still counts
    let past = history(&server, "page=9&page_size=5").await;
    assert_eq!((past["items"].clone(), past["total"].clone()), (json!([]), json!(12)));
    // the listing is for viewers too
    let viewer = server.post("/api/v1/admins", json!({"username": "vic", "role": "viewer"})).await.json();
    let key = server.post(&format!("/api/v1/admins/{}/api-keys", field(&viewer, "id")), json!({"name": "ro"})).await.json();
    let reply = server.call(Method::GET, "/api/v1/ip-bindings/history?page_size=1", None, Some(&field(&key, "key"))).await;
    assert_eq!((reply.status, reply.json()["total"].clone()), (StatusCode::OK, json!(12)));
    assert_eq!(server.call(Method::GET, "/api/v1/ip-bindings/history", None, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.call(Method::GET, "/api/v1/ip-bindings/history/trace?ip=100.64.0.1", None, None).await.status, StatusCode::UNAUTHORIZED);
}

/// The export follows the bindings export's rules: the same limit (413 before any
/// byte, telling the user to filter) and formulas neutralised in every column.
async fn history_export_is_limited_and_neutralises_formulas(server: TestServer) {
    create_range(&server, json!({"name": "=Evil range", "range": "100.64.0.0/24"})).await;
    let evil = create_key(&server, "=HYPERLINK(\"http://x\")").await;
    let plus = create_key(&server, "+cmd").await;
    enrolled(&server, &evil, "a.corp.example").await;
    let (_, ip) = enrolled(&server, &plus, "b.corp.example").await;
    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{ip}")).await.status, StatusCode::NO_CONTENT);
    let reply = server.get("/api/v1/ip-bindings/history/export.csv?sort=bound_at").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().expect("type").starts_with("text/csv"));
    assert!(reply.headers["content-disposition"].to_str().expect("disposition").contains("ip-binding-history.csv"));
    let text = reply.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ip,device_id,username,client_hostname,platform,range_name,bound_at,released_at,reason,bound_reason");
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].starts_with("100.64.0.1,") && lines[1].contains(",\"'=HYPERLINK(\"\"http://x\"\")\",a.corp.example,windows,'=Evil range,"),
        "{}",
        lines[1]
    );
    assert!(lines[1].ends_with(",,,enrolled"), "an open interval has no end: {}", lines[1]);
    assert!(lines[2].contains(",'+cmd,b.corp.example,windows,'=Evil range,") && lines[2].ends_with(",admin_release,enrolled"), "{}", lines[2]);
    assert_eq!(server.get("/api/v1/ip-bindings/history/export.csv?page=1").await.status, StatusCode::BAD_REQUEST, "no paging in an export");
    // over the limit: refused whole, before the first byte
    assert_eq!(server.patch("/api/v1/settings", json!({"export_limit": 1})).await.status, StatusCode::OK);
    let reply = server.get("/api/v1/ip-bindings/history/export.csv").await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert!(reply.json()["detail"].as_str().expect("detail").contains("filter"), "{}", reply.text());
    assert_eq!(reply.json()["export"], json!({"export_limit": 1, "matching": 2}));
    let filtered = server.get("/api/v1/ip-bindings/history/export.csv?username=cmd").await;
    assert_eq!((filtered.status, filtered.text().lines().count()), (StatusCode::OK, 2));
}

/// Retention deletes closed intervals that ended before the cutoff, in batches, and
/// never an open one; the setting is validated and audited like the others.
async fn retention_deletes_only_closed_intervals_older_than_the_cutoff(server: TestServer) {
    create_range(&server, json!({"name": "Kept", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "kim@corp.example").await;
    let mut addresses = Vec::new();
    for index in 0..5 {
        addresses.push(enrolled(&server, &key, &format!("k{index}.corp.example")).await.1);
    }
    // four closed intervals, ending one after the other; the fifth stays open
    for ip in &addresses[..4] {
        tick().await;
        assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{ip}")).await.status, StatusCode::NO_CONTENT);
    }
    let rows = all_history(&server).await;
    let ends: Vec<i64> = rows.iter().filter_map(|row| time_of(row, "released_at")).collect();
    assert_eq!(ends.len(), 4);
    let state = server.state.as_ref().expect("state");
    let store = &state.store;
    let audit = |deleted: u64| reachback_store::AuditEntry {
        actor: "test".into(),
        action: "prune_history".into(),
        resource_type: "ip_binding_history".into(),
        resource_id: "*".into(),
        after: Some(json!({"deleted": deleted})),
        ..Default::default()
    };
    // the cutoff is exclusive: an interval that ended exactly then stays
    assert_eq!(store.prune_history(ends[1], 1, audit).await.expect("prune"), 1, "only the first ended before the second's end");
    let left: Vec<Option<i64>> = all_history(&server).await.iter().map(|row| time_of(row, "released_at")).collect();
    assert_eq!(left, [Some(ends[1]), Some(ends[2]), Some(ends[3]), None]);
    // batches of one: the loop goes on until fewer than a batch are left
    assert_eq!(store.prune_history(ends[3] + 1, 1, audit).await.expect("prune"), 3);
    let left = all_history(&server).await;
    assert_eq!(
        (left.len(), left[0]["released_at"].clone(), field(&left[0], "ip")),
        (1, Value::Null, addresses[4].clone()),
        "the open interval is never deleted"
    );
    assert_eq!(store.prune_history(i64::MAX, 1000, audit).await.expect("prune"), 0);
    consistent(&server).await;

    // the setting: validated, audited, and what the server's retention round uses
    for bad in [json!({"binding_history_retention_days": 0}), json!({"binding_history_retention_days": 3651}), json!({"binding_history_retention_days": "400"})]
    {
        let reply = server.patch("/api/v1/settings", bad.clone()).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(reply.json()["errors"][0]["field"], "binding_history_retention_days");
    }
    assert_eq!(server.get("/api/v1/settings").await.json()["binding_history_retention_days"], 400, "refusals changed nothing");
    let reply = server.patch("/api/v1/settings", json!({"binding_history_retention_days": 1})).await;
    assert_eq!((reply.status, reply.json()["binding_history_retention_days"].clone()), (StatusCode::OK, json!(1)));
    let audit_log = server.get("/api/v1/audit-logs?resource_type=settings&page_size=1").await.json();
    assert_eq!(audit_log["items"][0]["after"]["binding_history_retention_days"], 1);
    // a new closed interval: kept at its end plus half a day, gone a day and more after
    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{}", addresses[4])).await.status, StatusCode::NO_CONTENT);
    let ended = time_of(&all_history(&server).await[0], "released_at").expect("closed");
    let (_, open_ip) = enrolled(&server, &key, "k5.corp.example").await;
    assert_eq!(reachback_server::prune_history_now(state, ended + 43_200_000_000).await.expect("round"), 0);
    assert_eq!(reachback_server::prune_history_now(state, ended + 86_400_000_001).await.expect("round"), 1);
    let left = all_history(&server).await;
    assert_eq!((left.len(), field(&left[0], "ip"), left[0]["released_at"].clone()), (1, open_ip, Value::Null));
    let audit_log = server.get("/api/v1/audit-logs?action=prune_history&actor=system").await.json();
    assert_eq!(audit_log["total"], 1, "the server's round is audited once");
    assert_eq!(audit_log["items"][0]["after"]["deleted"], 1);
    consistent(&server).await;
}

/// Every bad query value is a 400 problem document naming the parameter, never a
/// 5xx, and changes nothing.
async fn hostile_history_queries_are_refused_by_name(server: TestServer) {
    create_range(&server, json!({"name": "H", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "hal@corp.example").await;
    enrolled(&server, &key, "hal.corp.example").await;
    let before = all_history(&server).await;
    let long = "x".repeat(10_000);
    let too_long = server.get(&format!("/api/v1/ip-bindings/history?username={long}")).await;
    assert_eq!((too_long.status, too_long.json()["errors"][0]["field"].clone()), (StatusCode::BAD_REQUEST, serde_json::json!("username")));
    let cases: Vec<(String, &str)> = vec![
        ("history?at=yesterday".into(), "at"),
        ("history?at=2026-13-01T00:00:00Z".into(), "at"),
        ("history?at=2026-01-01".into(), "at"),
        ("history?at=2026-01-01T00:00:00Z%00".into(), "at"),
        ("history?ip=banana".into(), "ip"),
        ("history?ip=100.64.0.0/33".into(), "ip"),
        ("history?ip=fd00::/129".into(), "ip"),
        ("history?ip=100.64.0.1%00".into(), "ip"),
        (format!("history?ip={long}"), "ip"),
        ("history?username=a%00b".into(), "username"),
        ("history?client_hostname=%FF".into(), "client_hostname"),
        ("history?device_id=%01".into(), "device_id"),
        ("history?from=later".into(), "from"),
        ("history?to=2026-02-30T00:00:00Z".into(), "to"),
        ("history?from=2026-02-02T00:00:00Z&to=2026-02-01T00:00:00Z".into(), "from"),
        ("history?sort=colour".into(), "sort"),
        ("history?sort=-".into(), "sort"),
        ("history?page=0".into(), "page"),
        ("history?page_size=5000".into(), "page_size"),
        ("history?page=abc".into(), "page"),
        ("history?reason=idle_ttl".into(), "reason"),
        ("history?at=2026-01-01T00:00:00Z&at=2026-01-02T00:00:00Z".into(), "at"),
        ("history/export.csv?at=nope".into(), "at"),
        ("history/export.csv?page_size=5".into(), "page_size"),
        ("history/export.csv?ip=1.2.3.4%00".into(), "ip"),
        ("history/trace".into(), "ip"),
        ("history/trace?ip=100.64.0.0/24".into(), "ip"),
        ("history/trace?ip=100.64.0.1&at=noon".into(), "at"),
        ("history/trace?ip=100.64.0.1%00".into(), "ip"),
        ("history/trace?ip=100.64.0.1&sort=ip".into(), "sort"),
    ];
    for (path, parameter) in &cases {
        let reply = server.get(&format!("/api/v1/ip-bindings/{path}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}: {}", &path[..path.len().min(80)], reply.text());
        assert_eq!(reply.headers["content-type"], "application/problem+json", "{path}");
        assert_eq!(reply.json()["errors"][0]["field"], *parameter, "{}: {}", &path[..path.len().min(80)], reply.text());
    }
    // odd but valid values answer, never with a 5xx (a text filter takes up to 1,024 characters)
    let longest = "x".repeat(1024);
    for path in [
        format!("history?username={longest}"),
        "history?username=%25_%5C".into(),
        "history?client_hostname=%22%27%3B--".into(),
        "history?device_id=%27%20OR%201%3D1".into(),
        "history?at=9999-12-31T23:59:59.999999Z".into(),
        "history?at=0001-01-01T00:00:00Z".into(),
        "history?at=2026-01-01T00:00:00%2B14:00".into(),
        "history?ip=0.0.0.0/0&from=1970-01-01T00:00:00Z".into(),
        "history?ip=::/0".into(),
        "history/trace?ip=::ffff:100.64.0.1".into(),
        "history/trace?ip=100.64.0.1&at=9999-12-31T23:59:59Z".into(),
    ] {
        let reply = server.get(&format!("/api/v1/ip-bindings/{path}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: {}", &path[..path.len().min(80)], reply.text());
    }
    assert_eq!(history(&server, "username=%25_%5C").await["total"], 0, "LIKE wildcards match literally");
    assert_eq!(history(&server, "device_id=%27%20OR%201%3D1").await["total"], 0);
    // the routes are not shadowed by /ip-bindings/{ip}, and other methods are not routes
    assert_eq!(server.delete("/api/v1/ip-bindings/history").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(all_history(&server).await, before, "nothing changed");
    consistent(&server).await;
}

/// A database with bindings from before the history (migration 11 undone by hand,
/// as an older version left it): the migration opens an interval for each binding
/// held then, from its last update, marked `migrated`; a release then closes it.
async fn bindings_held_before_history_began_are_recorded_as_migrated(mut server: TestServer) {
    create_range(&server, json!({"name": "Old", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "old@corp.example").await;
    let (kept, kept_ip) = enrolled(&server, &key, "kept.corp.example").await;
    let (_, released_ip) = enrolled(&server, &key, "gone.corp.example").await;
    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{released_ip}")).await.status, StatusCode::NO_CONTENT);
    let updated = server.get(&format!("/api/v1/ip-bindings/{kept_ip}")).await.json()["last_updated"].clone();
    let undo = match server.state.as_ref().expect("state").store.backend() {
        // (and migration 17, which builds on it)
        reachback_store::Backend::Sqlite => {
            "DROP TABLE history_names_search; DROP TABLE history_names; DROP TRIGGER devices_history_names_delete; \
             DROP TRIGGER devices_history_names_update; DROP TABLE binding_history; DELETE FROM schema_migrations WHERE version IN (11, 17);"
        }
        reachback_store::Backend::Postgres => "DROP TABLE binding_history; DELETE FROM schema_migrations WHERE version IN (11, 17);",
    };
    server.raw_sql(undo).await;
    server.restart().await;
    let rows = all_history(&server).await;
    assert_eq!(rows.len(), 1, "only the binding held: {rows:?}");
    assert_eq!(
        (field(&rows[0], "device_id"), field(&rows[0], "ip"), rows[0]["bound_at"].clone(), field(&rows[0], "bound_reason"), rows[0]["released_at"].clone()),
        (kept, kept_ip.clone(), updated, "migrated".into(), Value::Null)
    );
    assert_eq!(history(&server, "username=old@corp").await["total"], 1, "the migrated rows are searchable");
    consistent(&server).await;
    assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{kept_ip}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(field(&all_history(&server).await[0], "reason"), "admin_release");
    consistent(&server).await;
}
