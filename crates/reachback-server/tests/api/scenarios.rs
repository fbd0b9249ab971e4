//! Scenarios at the API boundary; each runs on both backends.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TOKEN, TestServer};
use crate::on_both_backends;

on_both_backends!(
    ranges_create_validate_and_refuse_without_change,
    ranges_list_filter_sort_page,
    ranges_edit_enable_disable_delete,
    authentication_and_roles,
    enrollment_flow,
    enrollment_refusals,
    single_use_keys_raced_in_one_batch,
    allocation_by_location_quarantine_and_exhaustion,
    bindings_list_get_release,
    csv_export,
    admins_keys_and_sessions,
    audit_log,
    settings_and_client_domains,
    operations_endpoints,
    hostile_input,
    restart_keeps_bindings_sticky,
    deep_pages_match_row_by_row_order,
    export_order_across_chunks,
    an_export_whose_database_fails_mid_stream_ends_in_an_error,
    substring_filters_agree_with_a_plain_scan,
    listing_tables_vacuumed_when_due,
);

fn public_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem()
}

async fn create_range(server: &TestServer, body: Value) -> Value {
    let reply = server.post("/api/v1/ip-ranges", body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn create_key(server: &TestServer, username: &str, reusable: bool) -> String {
    let reply = server.post("/api/v1/enrollment-keys", json!({"username": username, "reusable": reusable})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["key"].as_str().expect("key").to_string()
}

async fn enroll(server: &TestServer, key: &str, hostname: &str, public_key: &str, location: Value) -> crate::harness::Reply {
    server
        .call(
            Method::POST,
            "/api/v1/enroll",
            Some(json!({"enrollment_key": key, "hostname": hostname, "platform": "windows", "public_key": public_key, "location": location})),
            None,
        )
        .await
}

async fn range_count(server: &TestServer) -> i64 {
    server.get("/api/v1/ip-ranges").await.json()["total"].as_i64().expect("total")
}

async fn ranges_create_validate_and_refuse_without_change(server: TestServer) {
    let paris = create_range(
        &server,
        json!({"name": "Paris laptops", "range": "100.64.0.0/16", "location": {"city": "Paris", "state": "Ile-de-France", "country": "fr", "latitude": 48.8566, "longitude": 2.3522}}),
    )
    .await;
    assert_eq!(paris["range"], "100.64.0.0/16");
    assert_eq!(paris["total_ips"], 65534);
    assert_eq!(paris["used_ips"], 0);
    assert_eq!(paris["enabled"], true);
    assert_eq!(paris["location"]["country"], "FR");
    assert!(paris["created_at"].as_str().expect("time").ends_with('Z'));
    let span = create_range(&server, json!({"name": "Span", "range": "100.65.0.10 - 100.65.0.200", "enabled": false})).await;
    assert_eq!(
        (span["range"].clone(), span["total_ips"].clone(), span["enabled"].clone(), span["location"].clone()),
        (json!("100.65.0.10-100.65.0.200"), json!(191), json!(false), Value::Null)
    );
    let v6 = create_range(&server, json!({"name": "v6", "range": "FD7A:115C:0::/64"})).await;
    assert_eq!((v6["range"].clone(), v6["total_ips"].clone()), (json!("fd7a:115c::/64"), json!("18446744073709551615")));
    let small = create_range(&server, json!({"name": "v6 small", "range": "fd7a:115d::/120"})).await;
    assert_eq!(small["total_ips"], 255);

    let before = range_count(&server).await;
    // overlap: 409 naming the other range
    let reply = server.post("/api/v1/ip-ranges", json!({"name": "Overlap", "range": "100.64.200.0/24"})).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    let problem = reply.json();
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert!(problem["detail"].as_str().expect("detail").contains("Paris laptops"), "{problem}");
    assert_eq!(problem["conflicts_with"]["name"], "Paris laptops");
    assert_eq!(problem["conflicts_with"]["id"], paris["id"]);
    assert_eq!(problem["conflicts_with"]["range"], "100.64.0.0/16");
    assert_eq!(problem["status"], 409);
    // a disabled range still blocks overlaps
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "o2", "range": "100.65.0.200/32"})).await.status, StatusCode::CONFLICT);
    // duplicate name, case-insensitively
    let reply = server.post("/api/v1/ip-ranges", json!({"name": "PARIS LAPTOPS", "range": "100.66.0.0/24"})).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    // host bits, with the corrected form
    let reply = server.post("/api/v1/ip-ranges", json!({"name": "h", "range": "100.66.0.5/24"})).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.json()["errors"][0]["field"], "range");
    assert!(reply.json()["errors"][0]["message"].as_str().expect("message").contains("100.66.0.0/24"));
    for (range, why) in [
        ("127.0.0.0/8", "loopback"),
        ("224.0.0.0/24", "multicast"),
        ("169.254.0.0/16", "link-local"),
        ("0.0.0.0/8", "unspecified"),
        ("255.255.255.255/32", "broadcast"),
        ("fe80::/64", "link-local"),
        ("fd00::/48", "shorter than /64"),
        ("100.66.0.9-100.66.0.1", "after its end"),
        ("banana", "not an address"),
    ] {
        let reply = server.post("/api/v1/ip-ranges", json!({"name": "bad", "range": range})).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{range}");
        assert!(reply.text().contains(why), "{range}: {}", reply.text());
    }
    for (location, field) in [
        (json!({"country": "XX"}), "location.country"),
        (json!({"country": "FRA"}), "location.country"),
        (json!({"city": "Paris"}), "location.country"),
        (json!({"country": "FR", "latitude": 91, "longitude": 0}), "location.latitude"),
        (json!({"country": "FR", "latitude": 10}), "location.latitude"),
        (json!({"country": "FR", "zip": "75001"}), "location.zip"),
        (json!("Paris"), "location"),
    ] {
        let reply = server.post("/api/v1/ip-ranges", json!({"name": "bad", "range": "100.67.0.0/24", "location": location})).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{location}");
        assert_eq!(reply.json()["errors"][0]["field"], field, "{location}");
    }
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "", "range": "100.67.0.0/24"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "x".repeat(129), "range": "100.67.0.0/24"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"range": "100.67.0.0/24"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "n", "range": 5})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "n", "range": "100.67.0.0/24", "colour": "red"})).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(range_count(&server).await, before, "refused requests changed nothing");
    assert_eq!(server.get("/api/v1/ip-ranges/nope").await.status, StatusCode::NOT_FOUND);
    let fetched = server.get(&format!("/api/v1/ip-ranges/{}", paris["id"].as_str().expect("id"))).await.json();
    assert_eq!(fetched, paris);
}

async fn ranges_list_filter_sort_page(server: TestServer) {
    for (name, range, country, city) in [
        ("bravo", "100.64.1.0/24", "FR", "Paris"),
        ("Alpha", "100.64.0.0/24", "JP", "Tokyo"),
        ("charlie", "100.64.2.0/25", "FR", "Lyon"),
        ("delta", "fd00:1::/64", "US", "Austin"),
    ] {
        create_range(&server, json!({"name": name, "range": range, "location": {"country": country, "city": city, "state": "S"}})).await;
    }
    let names = |reply: crate::harness::Reply| -> Vec<String> {
        reply.json()["items"].as_array().expect("items").iter().map(|item| item["name"].as_str().expect("name").to_string()).collect()
    };
    assert_eq!(names(server.get("/api/v1/ip-ranges").await), ["Alpha", "bravo", "charlie", "delta"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?sort=-name").await), ["delta", "charlie", "bravo", "Alpha"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?sort=range").await), ["Alpha", "bravo", "charlie", "delta"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?sort=-total_ips").await), ["delta", "Alpha", "bravo", "charlie"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?country=fr").await), ["bravo", "charlie"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?city=TOK").await), ["Alpha"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?range=100.64.2.77").await), ["charlie"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?range=fd00").await), ["delta"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?name=ar").await), ["charlie"]);
    let page = server.get("/api/v1/ip-ranges?page=2&page_size=3").await.json();
    assert_eq!(
        (page["total"].clone(), page["page"].clone(), page["page_size"].clone(), page["items"].as_array().expect("items").len()),
        (json!(4), json!(2), json!(3), 1)
    );
    assert_eq!(page["items"][0]["name"], "delta");
    let id = page["items"][0]["id"].as_str().expect("id").to_string();
    server.call(Method::POST, &format!("/api/v1/ip-ranges/{id}/disable"), None, Some(TOKEN)).await;
    assert_eq!(names(server.get("/api/v1/ip-ranges?status=disabled").await), ["delta"]);
    assert_eq!(names(server.get("/api/v1/ip-ranges?sort=status").await), ["Alpha", "bravo", "charlie", "delta"]);
    for bad in ["page_size=1001", "page=0", "sort=colour", "status=maybe", "colour=red", "page=abc", "name=a&name=b"] {
        let reply = server.get(&format!("/api/v1/ip-ranges?{bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.headers["content-type"], "application/problem+json");
    }
    assert_eq!(server.get("/api/v1/ip-ranges?page=99").await.json()["items"], json!([]));
}

async fn ranges_edit_enable_disable_delete(server: TestServer) {
    let range = create_range(&server, json!({"name": "Edit me", "range": "100.64.0.0/28"})).await;
    let id = range["id"].as_str().expect("id");
    let path = format!("/api/v1/ip-ranges/{id}");
    let key = create_key(&server, "bob@corp.example", true).await;
    for index in 0..3 {
        assert_eq!(enroll(&server, &key, &format!("pc{index}.corp.example"), &public_key(), Value::Null).await.status, StatusCode::CREATED);
    }
    let neighbour = create_range(&server, json!({"name": "Neighbour", "range": "100.64.1.0/24"})).await;
    let reply = server.patch(&path, json!({"name": "Edited", "description": "lab", "location": {"country": "DE", "city": "Berlin", "state": "Berlin"}})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let edited = reply.json();
    assert_eq!(
        (edited["name"].clone(), edited["description"].clone(), edited["location"]["city"].clone(), edited["range"].clone()),
        (json!("Edited"), json!("lab"), json!("Berlin"), json!("100.64.0.0/28"))
    );
    assert_ne!(edited["updated_at"], range["updated_at"]);
    // growing the range is fine; shrinking below a bound address or into a neighbour is not
    assert_eq!(server.patch(&path, json!({"range": "100.64.0.0/24"})).await.json()["total_ips"], 254);
    let reply = server.patch(&path, json!({"range": "100.64.0.0/23"})).await;
    assert_eq!((reply.status, reply.json()["conflicts_with"]["name"].clone()), (StatusCode::CONFLICT, json!("Neighbour")));
    assert_eq!(server.delete(&format!("/api/v1/ip-ranges/{}", neighbour["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    let reply = server.patch(&path, json!({"range": "100.64.0.2-100.64.0.50"})).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert!(reply.text().contains("outside"));
    assert_eq!(server.patch(&path, json!({"range": "100.64.0.1-100.64.0.3"})).await.status, StatusCode::OK);
    assert_eq!(server.patch(&path, json!({"location": null})).await.json()["location"], Value::Null);
    assert_eq!(server.patch(&path, json!({"enabled": "yes"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.patch("/api/v1/ip-ranges/nope", json!({"name": "x"})).await.status, StatusCode::NOT_FOUND);
    // disable, enable
    let disabled = server.call(Method::POST, &format!("{path}/disable"), None, Some(TOKEN)).await;
    assert_eq!((disabled.status, disabled.json()["enabled"].clone()), (StatusCode::OK, json!(false)));
    let refused = enroll(&server, &key, "pc9.corp.example", &public_key(), Value::Null).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "a disabled range assigns nothing: {}", refused.text());
    let enabled = server.call(Method::POST, &format!("{path}/enable"), None, Some(TOKEN)).await;
    assert_eq!(enabled.json()["enabled"], true);
    assert_eq!(server.call(Method::POST, "/api/v1/ip-ranges/nope/enable", None, Some(TOKEN)).await.status, StatusCode::NOT_FOUND);
    // delete: refused with bindings, forced releases them
    let reply = server.delete(&path).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(reply.json()["bindings"], 3);
    assert_eq!(server.get(&path).await.status, StatusCode::OK);
    assert_eq!(server.call(Method::DELETE, &format!("{path}?force=maybe"), None, Some(TOKEN)).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.call(Method::DELETE, &format!("{path}?force=true"), None, Some(TOKEN)).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/api/v1/ip-bindings").await.json()["total"], 0);
    let devices = server.get("/api/v1/devices").await.json();
    assert_eq!(devices["total"], 3, "devices stay; they get new addresses when they come back");
    assert_eq!(devices["items"][0]["virtual_ip"], Value::Null);
    assert_eq!(server.delete(&path).await.status, StatusCode::NOT_FOUND);
}

async fn authentication_and_roles(server: TestServer) {
    let reply = server.call(Method::GET, "/api/v1/ip-ranges", None, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(server.call(Method::GET, "/api/v1/ip-ranges", None, Some("rbk_wrong")).await.status, StatusCode::UNAUTHORIZED);
    let request = Request::builder().uri("/api/v1/ip-ranges").header("authorization", "Basic abc").body(Body::empty()).expect("request");
    assert_eq!(server.send(request).await.status, StatusCode::UNAUTHORIZED);
    let me = server.get("/api/v1/me").await.json();
    assert_eq!((me["username"].clone(), me["role"].clone()), (json!("admin"), json!("superadmin")));
    let mut tokens = Vec::new();
    for role in ["viewer", "admin"] {
        let admin = server.post("/api/v1/admins", json!({"username": format!("{role}-user"), "role": role})).await.json();
        let key = server.post(&format!("/api/v1/admins/{}/api-keys", admin["id"].as_str().expect("id")), json!({"name": "ci"})).await;
        assert_eq!(key.status, StatusCode::CREATED);
        tokens.push(key.json()["key"].as_str().expect("key").to_string());
    }
    let (viewer, admin) = (&tokens[0], &tokens[1]);
    let body = json!({"name": "r", "range": "100.64.0.0/24"});
    assert_eq!(server.call(Method::POST, "/api/v1/ip-ranges", Some(body.clone()), Some(viewer)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(server.get("/api/v1/ip-ranges").await.json()["total"], 0, "a forbidden write changes nothing");
    assert_eq!(server.call(Method::GET, "/api/v1/ip-ranges", None, Some(viewer)).await.status, StatusCode::OK);
    assert_eq!(server.call(Method::GET, "/api/v1/ip-bindings", None, Some(viewer)).await.status, StatusCode::OK);
    assert_eq!(server.call(Method::PATCH, "/api/v1/settings", Some(json!({"export_limit": 5})), Some(viewer)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(server.call(Method::POST, "/api/v1/enrollment-keys", Some(json!({"username": "a"})), Some(viewer)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(server.call(Method::POST, "/api/v1/ip-ranges", Some(body), Some(admin)).await.status, StatusCode::CREATED);
    assert_eq!(server.call(Method::GET, "/api/v1/admins", None, Some(admin)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(server.call(Method::GET, "/api/v1/admin-sessions", None, Some(admin)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        server.call(Method::POST, "/api/v1/admins", Some(json!({"username": "x", "role": "superadmin"})), Some(admin)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(server.call(Method::GET, "/api/v1/me", None, Some(viewer)).await.json()["role"], "viewer");
}

async fn enrollment_flow(server: TestServer) {
    create_range(&server, json!({"name": "Global", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "alice@corp.example", false).await;
    let public_key = public_key();
    let reply = enroll(&server, &key, "Alice-Laptop.corp.example", &public_key, json!({"city": "Paris", "country": "FR"})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let enrolled = reply.json();
    assert_eq!((enrolled["virtual_ip"].clone(), enrolled["range_name"].clone()), (json!("100.64.0.1"), json!("Global")));
    assert!(enrolled["certificate"].as_str().expect("cert").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(enrolled["ca_certificate"].as_str().expect("ca").starts_with("-----BEGIN CERTIFICATE-----"));
    let brokers = enrolled["broker_endpoints"].as_array().expect("broker endpoints");
    assert!(brokers.len() == 1 && brokers[0].as_str().is_some_and(|endpoint| endpoint.starts_with("127.0.0.1:")), "{brokers:?}");
    // the key is spent for new devices, but the same device gets its binding back
    assert_eq!(enroll(&server, &key, "bob.corp.example", &self::public_key(), Value::Null).await.status, StatusCode::UNAUTHORIZED);
    let again = enroll(&server, &key, "alice-laptop.CORP.example", &public_key, Value::Null).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!((again.json()["virtual_ip"].clone(), again.json()["device_id"].clone()), (json!("100.64.0.1"), enrolled["device_id"].clone()));
    // another key pair cannot take the hostname
    let other = create_key(&server, "mallory@corp.example", true).await;
    let reply = enroll(&server, &other, "alice-laptop.corp.example", &self::public_key(), Value::Null).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let binding = server.get("/api/v1/ip-bindings/100.64.0.1").await.json();
    assert_eq!(
        (
            binding["username"].clone(),
            binding["platform"].clone(),
            binding["client_hostname"].clone(),
            binding["range_name"].clone(),
            binding["range_location"].clone()
        ),
        (json!("alice@corp.example"), json!("windows"), json!("alice-laptop.corp.example"), json!("Global"), Value::Null)
    );
    let device_id = enrolled["device_id"].as_str().expect("id");
    let device = server.get(&format!("/api/v1/devices/{device_id}")).await.json();
    assert_eq!(
        (device["hostname"].clone(), device["virtual_ip"].clone(), device["location"]["city"].clone()),
        (json!("alice-laptop.corp.example"), json!("100.64.0.1"), json!("Paris"))
    );
    let keys = server.get("/api/v1/enrollment-keys").await.json();
    let spent = keys["items"].as_array().expect("items").iter().find(|item| item["username"] == "alice@corp.example").expect("key listed").clone();
    assert_eq!(spent["used_count"], 1);
    assert!(spent.get("key").is_none(), "secrets are shown only once");
    // P-256 keys are accepted too
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key").public_key_pem();
    assert_eq!(enroll(&server, &other, "carol.corp.example", &p256, Value::Null).await.status, StatusCode::CREATED);
    // deleting the device releases its address and revokes it
    assert_eq!(server.delete(&format!("/api/v1/devices/{device_id}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&format!("/api/v1/devices/{device_id}")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/api/v1/ip-bindings/100.64.0.1").await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.delete(&format!("/api/v1/devices/{device_id}")).await.status, StatusCode::NOT_FOUND);
}

async fn enrollment_refusals(server: TestServer) {
    create_range(&server, json!({"name": "Global", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "dave@corp.example", false).await;
    let good = public_key();
    let call = |body: Value| server.call(Method::POST, "/api/v1/enroll", Some(body), None);
    // authentication first: a bad key is a 401 whatever else is wrong
    for bad_key in [json!("rbe_nope"), json!(""), json!(5)] {
        let reply = call(json!({"enrollment_key": bad_key, "hostname": "-bad-", "platform": "beos", "public_key": "x"})).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{bad_key}");
    }
    // a null where the document allows none is a malformed request, told before anything is looked up
    let reply = call(json!({"enrollment_key": null, "hostname": "-bad-", "platform": "beos", "public_key": "x"})).await;
    assert_eq!((reply.status, reply.json()["errors"][0]["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("enrollment_key")), "{}", reply.text());
    let cases = [
        (json!({"enrollment_key": key, "hostname": "laptop", "platform": "windows", "public_key": good}), "hostname"),
        (json!({"enrollment_key": key, "hostname": "bad_host.corp.example", "platform": "windows", "public_key": good}), "hostname"),
        (json!({"enrollment_key": key, "hostname": "ok.corp.example", "platform": "beos", "public_key": good}), "platform"),
        (
            json!({"enrollment_key": key, "hostname": "ok.corp.example", "platform": "linux", "public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}),
            "public_key",
        ),
        (
            json!({"enrollment_key": key, "hostname": "ok.corp.example", "platform": "linux", "public_key": rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key").public_key_pem()}),
            "public_key",
        ),
        (
            json!({"enrollment_key": key, "hostname": "ok.corp.example", "platform": "linux", "public_key": good, "location": {"country": "ZZ"}}),
            "location.country",
        ),
        (json!({"enrollment_key": key, "platform": "linux", "public_key": good}), "hostname"),
    ];
    for (body, field) in cases {
        let reply = call(body).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {}", reply.text());
        assert_eq!(reply.json()["errors"][0]["field"], field);
    }
    assert_eq!(
        call(json!({"enrollment_key": key, "hostname": "ok.corp.example", "platform": "linux", "public_key": good, "username": "root"})).await.status,
        StatusCode::BAD_REQUEST
    );
    // nothing above used the single-use key
    let reply = enroll(&server, &key, "ok.corp.example", &good, Value::Null).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    // revoked and expired keys
    let revoked = server.post("/api/v1/enrollment-keys", json!({"username": "eve", "reusable": true})).await.json();
    assert_eq!(server.delete(&format!("/api/v1/enrollment-keys/{}", revoked["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    assert_eq!(enroll(&server, revoked["key"].as_str().expect("key"), "eve.corp.example", &public_key(), Value::Null).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.get(&format!("/api/v1/enrollment-keys/{}", revoked["id"].as_str().expect("id"))).await.json()["revoked"], true);
    let reply = server.post("/api/v1/enrollment-keys", json!({"username": "eve", "expires_at": "2001-01-01T00:00:00Z"})).await;
    assert_eq!((reply.status, reply.json()["errors"][0]["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("expires_at")));
    assert_eq!(server.post("/api/v1/enrollment-keys", json!({"username": ""})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.delete("/api/v1/enrollment-keys/nope").await.status, StatusCode::NOT_FOUND);
}

/// Enrollments that arrive together are written in one batch, whose single-use
/// keys are taken in one statement: each key serves exactly one of the two
/// enrollments racing for it, and the other is refused without a trace.
async fn single_use_keys_raced_in_one_batch(server: TestServer) {
    create_range(&server, json!({"name": "Race", "range": "100.64.0.0/24"})).await;
    let mut keys = Vec::new();
    for index in 0..8 {
        let reply = server.post("/api/v1/enrollment-keys", json!({"username": format!("user{index}@corp.example"), "reusable": false})).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        let body = reply.json();
        keys.push((body["id"].as_str().expect("id").to_string(), body["key"].as_str().expect("key").to_string()));
    }
    let attempts: Vec<(usize, String)> = (0..16).map(|attempt| (attempt % 8, format!("race{attempt:02}.corp.example"))).collect();
    let public_keys: Vec<String> = attempts.iter().map(|_| public_key()).collect();
    let replies = futures_util::future::join_all(
        attempts.iter().zip(&public_keys).map(|((key, hostname), public)| enroll(&server, &keys[*key].1, hostname, public, Value::Null)),
    )
    .await;
    let mut served = [0; 8];
    for ((key, hostname), reply) in attempts.iter().zip(&replies) {
        match reply.status {
            StatusCode::CREATED => served[*key] += 1,
            StatusCode::UNAUTHORIZED => {
                assert!(reply.json()["detail"].as_str().expect("detail").contains("has been used"), "{hostname}: {}", reply.text());
                assert_eq!(server.get(&format!("/api/v1/devices?hostname={hostname}")).await.json()["total"], 0, "{hostname} left a device");
            }
            other => panic!("{hostname}: unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!(served, [1; 8], "each single-use key serves exactly one enrollment");
    assert_eq!(server.get("/api/v1/ip-bindings").await.json()["total"], 8);
    assert_eq!(server.get("/api/v1/ip-ranges").await.json()["items"][0]["used_ips"], json!(8));
    for (id, _) in &keys {
        assert_eq!(server.get(&format!("/api/v1/enrollment-keys/{id}")).await.json()["used_count"], 1);
    }
    // the batch opened one history interval per binding it wrote, and none for the refused
    let store = &server.state.as_ref().expect("state").store;
    assert_eq!(store.verify_history().await.expect("history"), Vec::<String>::new());
    assert_eq!(server.get("/api/v1/ip-bindings/history").await.json()["total"], 8);
}

async fn allocation_by_location_quarantine_and_exhaustion(server: TestServer) {
    create_range(&server, json!({"name": "Paris", "range": "100.64.0.0/30", "location": {"city": "Paris", "state": "IDF", "country": "FR"}})).await;
    create_range(&server, json!({"name": "Tokyo", "range": "100.64.1.0/30", "location": {"city": "Tokyo", "state": "Tokyo", "country": "JP"}})).await;
    let key = create_key(&server, "pool@corp.example", true).await;
    let ip = |reply: crate::harness::Reply| reply.json()["virtual_ip"].as_str().map(str::to_string).unwrap_or_else(|| reply.text());
    let paris = json!({"city": "paris", "state": "idf", "country": "FR"});
    assert_eq!(ip(enroll(&server, &key, "p1.corp.example", &public_key(), paris.clone()).await), "100.64.0.1");
    assert_eq!(ip(enroll(&server, &key, "o1.corp.example", &public_key(), json!({"city": "Osaka", "country": "JP"})).await), "100.64.1.1");
    assert_eq!(ip(enroll(&server, &key, "p2.corp.example", &public_key(), paris.clone()).await), "100.64.0.2");
    // Paris is full: the fallback is the other range
    assert_eq!(ip(enroll(&server, &key, "p3.corp.example", &public_key(), paris.clone()).await), "100.64.1.2");
    // everything is full: 409, counted in metrics
    let reply = enroll(&server, &key, "p4.corp.example", &public_key(), paris.clone()).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.json()["detail"].as_str().expect("detail").contains("no free address"));
    assert!(server.get("/metrics").await.text().contains("reachback_allocation_failures_total 1"));
    // a released address waits in quarantine, but is reused when nothing else is left
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.1").await.status, StatusCode::NO_CONTENT);
    assert_eq!(ip(enroll(&server, &key, "p5.corp.example", &public_key(), paris.clone()).await), "100.64.0.1");
    let ranges = server.get("/api/v1/ip-ranges").await.json();
    let used: Vec<i64> = ranges["items"].as_array().expect("items").iter().map(|item| item["used_ips"].as_i64().expect("used")).collect();
    assert_eq!(used, [2, 2]);
}

async fn bindings_list_get_release(server: TestServer) {
    create_range(&server, json!({"name": "Lab", "range": "100.64.0.0/24", "location": {"city": "Lyon", "country": "FR"}})).await;
    create_range(&server, json!({"name": "Six", "range": "fd00::/120"})).await;
    let key = create_key(&server, "ops@corp.example", true).await;
    for index in 0..12 {
        let reply = enroll(&server, &key, &format!("host{index:02}.corp.example"), &public_key(), json!({"city": "Lyon", "country": "FR"})).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let ips = |reply: crate::harness::Reply| -> Vec<String> {
        reply.json()["items"].as_array().expect("items").iter().map(|item| item["ip"].as_str().expect("ip").to_string()).collect()
    };
    let all = ips(server.get("/api/v1/ip-bindings?page_size=5").await);
    assert_eq!(all, ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4", "100.64.0.5"]);
    let descending = ips(server.get("/api/v1/ip-bindings?sort=-ip&page_size=4").await);
    assert_eq!(descending, ["100.64.0.12", "100.64.0.11", "100.64.0.10", "100.64.0.9"], "numeric, not text, order");
    let page = server.get("/api/v1/ip-bindings?page=3&page_size=5").await.json();
    assert_eq!((page["total"].clone(), page["items"].as_array().expect("items").len()), (json!(12), 2));
    assert_eq!(ips(server.get("/api/v1/ip-bindings?ip=100.64.0.8/29").await), ["100.64.0.8", "100.64.0.9", "100.64.0.10", "100.64.0.11", "100.64.0.12"]);
    assert_eq!(ips(server.get("/api/v1/ip-bindings?ip=100.64.0.3").await), ["100.64.0.3"]);
    assert_eq!(server.get("/api/v1/ip-bindings?client_hostname=HOST1").await.json()["total"], 2);
    assert_eq!(server.get("/api/v1/ip-bindings?range_name=lab&range_location=lyon&username=OPS&platform=win").await.json()["total"], 12);
    assert_eq!(server.get("/api/v1/ip-bindings?range_name=six").await.json()["total"], 0);
    assert_eq!(server.get("/api/v1/ip-bindings?updated_after=2001-01-01T00:00:00Z").await.json()["total"], 12);
    assert_eq!(server.get("/api/v1/ip-bindings?updated_before=2001-01-01T00:00:00Z").await.json()["total"], 0);
    let by_host = server.get("/api/v1/ip-bindings?sort=-client_hostname&page_size=1").await.json();
    assert_eq!(by_host["items"][0]["client_hostname"], "host11.corp.example");
    for sort in ["username", "platform", "range_name", "last_updated", "-last_updated"] {
        assert_eq!(server.get(&format!("/api/v1/ip-bindings?sort={sort}")).await.status, StatusCode::OK, "{sort}");
    }
    for bad in ["ip=banana", "ip=100.64.0.0/33", "sort=ram", "updated_after=yesterday", "page_size=5000", "device=1"] {
        assert_eq!(server.get(&format!("/api/v1/ip-bindings?{bad}")).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let one = server.get("/api/v1/ip-bindings/100.64.0.7").await.json();
    assert_eq!(
        (one["client_hostname"].clone(), one["range_location"].clone()),
        (json!("host06.corp.example"), json!({"city": "Lyon", "state": null, "country": "FR"}))
    );
    assert_eq!(server.get("/api/v1/ip-bindings/100.64.0.99").await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/api/v1/ip-bindings/not-an-ip").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.7").await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.7").await.status, StatusCode::NOT_FOUND);
    // the released address stays in quarantine while fresh ones exist
    let next = enroll(&server, &key, "host99.corp.example", &public_key(), json!({"city": "Lyon", "country": "FR"})).await;
    assert_eq!(next.json()["virtual_ip"], "100.64.0.13");
    // the device whose binding was released gets a new address when it comes back
    let device = server.get("/api/v1/devices?hostname=host06").await.json();
    assert_eq!(device["items"][0]["virtual_ip"], Value::Null);
    let ranges = server.get("/api/v1/ip-ranges?name=lab").await.json();
    assert_eq!(ranges["items"][0]["used_ips"], 12);
    let devices = server.get("/api/v1/devices?sort=-hostname&page_size=2&platform=windows").await.json();
    assert_eq!((devices["total"].clone(), devices["items"][0]["hostname"].clone()), (json!(13), json!("host99.corp.example")));
}

async fn csv_export(server: TestServer) {
    create_range(&server, json!({"name": "=Evil range", "range": "100.64.0.0/24", "location": {"city": "Paris", "state": "IDF", "country": "FR"}})).await;
    create_range(&server, json!({"name": "Plain", "range": "100.65.0.0/24"})).await;
    let evil = create_key(&server, "=HYPERLINK(\"http://x\")", true).await;
    let plain = create_key(&server, "@alice", true).await;
    assert_eq!(
        enroll(&server, &evil, "a.corp.example", &public_key(), json!({"city": "Paris", "state": "IDF", "country": "FR"})).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        enroll(&server, &plain, "b.corp.example", &public_key(), json!({"city": "Paris", "state": "IDF", "country": "FR"})).await.status,
        StatusCode::CREATED
    );
    server
        .call(
            Method::POST,
            &format!("/api/v1/ip-ranges/{}/disable", server.get("/api/v1/ip-ranges?name=evil").await.json()["items"][0]["id"].as_str().expect("id")),
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(enroll(&server, &plain, "c.corp.example", &public_key(), Value::Null).await.status, StatusCode::CREATED);
    let reply = server.get("/api/v1/ip-bindings/export.csv").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().expect("type").starts_with("text/csv"));
    assert!(reply.headers["content-disposition"].to_str().expect("disposition").contains("attachment"));
    assert!(!reply.body.starts_with(&[0xEF, 0xBB, 0xBF]), "no byte-order mark");
    let text = reply.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ip,range_name,range_location,username,platform,client_hostname,last_updated");
    assert_eq!(lines.len(), 4);
    assert!(lines[1].starts_with("100.64.0.1,'=Evil range,\"Paris, IDF, FR\",\"'=HYPERLINK(\"\"http://x\"\")\",windows,a.corp.example,"), "{}", lines[1]);
    assert!(lines[2].starts_with("100.64.0.2,'=Evil range,\"Paris, IDF, FR\",'@alice,windows,b.corp.example,"), "{}", lines[2]);
    assert!(lines[3].starts_with("100.65.0.1,Plain,,'@alice,windows,c.corp.example,"), "{}", lines[3]);
    let filtered = server.get("/api/v1/ip-bindings/export.csv?range_name=plain&sort=-ip").await.text();
    assert_eq!(filtered.lines().count(), 2);
    assert_eq!(server.get("/api/v1/ip-bindings/export.csv?page=2").await.status, StatusCode::BAD_REQUEST);
    // over the limit: 413 before any byte, telling the user to filter
    assert_eq!(server.patch("/api/v1/settings", json!({"export_limit": 2})).await.status, StatusCode::OK);
    let reply = server.get("/api/v1/ip-bindings/export.csv").await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert!(reply.json()["detail"].as_str().expect("detail").contains("filter"));
    assert_eq!(server.get("/api/v1/ip-bindings/export.csv?username=hyperlink").await.status, StatusCode::OK);
}

async fn admins_keys_and_sessions(server: TestServer) {
    let reply = server.post("/api/v1/admins", json!({"username": "olivia", "role": "admin", "password": "correct horse battery"})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let olivia = reply.json();
    assert_eq!((olivia["username"].clone(), olivia["role"].clone()), (json!("olivia"), json!("admin")));
    assert!(olivia.get("password").is_none() && olivia.get("password_hash").is_none());
    assert_eq!(server.post("/api/v1/admins", json!({"username": "OLIVIA", "role": "admin"})).await.status, StatusCode::CONFLICT);
    assert_eq!(server.post("/api/v1/admins", json!({"username": "p", "role": "root"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.post("/api/v1/admins", json!({"username": "p", "role": "admin", "password": "short"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    let id = olivia["id"].as_str().expect("id");
    let key = server.post(&format!("/api/v1/admins/{id}/api-keys"), json!({"name": "laptop"})).await.json();
    let secret = key["key"].as_str().expect("key").to_string();
    assert_eq!(server.call(Method::GET, "/api/v1/me", None, Some(&secret)).await.json()["username"], "olivia");
    let keys = server.get(&format!("/api/v1/admins/{id}/api-keys")).await.json();
    assert_eq!(keys["items"][0]["name"], "laptop");
    assert!(keys["items"][0].get("key").is_none());
    let sessions = server.get("/api/v1/admin-sessions").await.json();
    let session = sessions["items"].as_array().expect("items").iter().find(|item| item["api_key_name"] == "laptop").expect("listed").clone();
    assert_eq!(session["admin_username"], "olivia");
    assert_eq!(server.delete(&format!("/api/v1/admin-sessions/{}", session["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.call(Method::GET, "/api/v1/me", None, Some(&secret)).await.status, StatusCode::UNAUTHORIZED, "a deleted session stops at once");
    assert_eq!(server.delete("/api/v1/admin-sessions/key:nope").await.status, StatusCode::NOT_FOUND);
    let second = server.post(&format!("/api/v1/admins/{id}/api-keys"), json!({"name": "ci"})).await.json();
    assert_eq!(server.delete(&format!("/api/v1/admins/{id}/api-keys/{}", second["id"].as_str().expect("id"))).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.call(Method::GET, "/api/v1/me", None, second["key"].as_str()).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.patch(&format!("/api/v1/admins/{id}"), json!({"password": "another long password"})).await.json()["has_password"], true);
    let me = server.get("/api/v1/me").await.json();
    assert_eq!(server.delete(&format!("/api/v1/admins/{}", me["id"].as_str().expect("id"))).await.status, StatusCode::CONFLICT);
    assert_eq!(server.delete(&format!("/api/v1/admins/{id}")).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.get(&format!("/api/v1/admins/{id}")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/api/v1/admins").await.json()["total"], 1);
}

async fn audit_log(server: TestServer) {
    let range = create_range(&server, json!({"name": "Audited", "range": "100.64.0.0/24"})).await;
    let id = range["id"].as_str().expect("id");
    server.patch(&format!("/api/v1/ip-ranges/{id}"), json!({"name": "Audited 2"})).await;
    let failed = server.post("/api/v1/ip-ranges", json!({"name": "x", "range": "100.64.0.0/25"})).await;
    assert_eq!(failed.status, StatusCode::CONFLICT);
    let log = server.get("/api/v1/audit-logs?resource_type=ip_range").await.json();
    assert_eq!(log["total"], 2, "refused requests are not changes: {log}");
    let newest = &log["items"][0];
    assert_eq!((newest["action"].clone(), newest["actor"].clone(), newest["resource_id"].clone()), (json!("update"), json!("admin"), json!(id)));
    assert_eq!((newest["before"]["name"].clone(), newest["after"]["name"].clone()), (json!("Audited"), json!("Audited 2")));
    let oldest = server.get("/api/v1/audit-logs?sort=at&resource_type=ip_range").await.json();
    assert_eq!(oldest["items"][0]["action"], "create");
    assert_eq!(server.get("/api/v1/audit-logs?actor=nobody").await.json()["total"], 0);
    assert_eq!(server.get("/api/v1/audit-logs?after=2999-01-01T00:00:00Z").await.json()["total"], 0);
    assert_eq!(server.get("/api/v1/audit-logs?sort=actor").await.status, StatusCode::BAD_REQUEST);
    let csv = server.get("/api/v1/audit-logs/export.csv?resource_type=ip_range").await;
    assert_eq!(csv.status, StatusCode::OK);
    let text = csv.text();
    assert_eq!(text.lines().next(), Some("id,at,actor,action,resource_type,resource_id,source_ip,before,after"));
    assert!(text.contains("Audited 2"));
}

async fn settings_and_client_domains(server: TestServer) {
    let settings = server.get("/api/v1/settings").await.json();
    assert_eq!(
        settings,
        json!({"client_domains": [], "binding_idle_ttl_seconds": 2592000, "release_quarantine_seconds": 3600, "export_limit": 1000000, "provisioning_key_ttl_seconds": 86400, "binding_history_retention_days": 400, "flow_log_enabled": true, "flow_log_retention_days": 90})
    );
    let reply = server.patch("/api/v1/settings", json!({"client_domains": ["Corp.Example"], "release_quarantine_seconds": 0})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["client_domains"], json!(["corp.example"]));
    for bad in [
        json!({"client_domains": ["not a domain"]}),
        json!({"export_limit": 0}),
        json!({"release_quarantine_seconds": -1}),
        json!({"client_domains": "corp.example"}),
        json!({"provisioning_key_ttl_seconds": 59}),
    ] {
        assert_eq!(server.patch("/api/v1/settings", bad.clone()).await.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    assert_eq!(server.patch("/api/v1/settings", json!({"colour": 1})).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/settings").await.json()["client_domains"], json!(["corp.example"]));
    create_range(&server, json!({"name": "Tiny", "range": "100.64.0.1-100.64.0.2"})).await;
    let key = create_key(&server, "frank", true).await;
    let reply = enroll(&server, &key, "frank.other.example", &public_key(), Value::Null).await;
    assert_eq!((reply.status, reply.json()["errors"][0]["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("hostname")));
    assert_eq!(enroll(&server, &key, "frank.corp.example", &public_key(), Value::Null).await.status, StatusCode::CREATED);
    // with quarantine off a released address comes straight back
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.1").await.status, StatusCode::NO_CONTENT);
    assert_eq!(enroll(&server, &key, "gina.corp.example", &public_key(), Value::Null).await.json()["virtual_ip"], "100.64.0.1");
}

async fn operations_endpoints(server: TestServer) {
    assert_eq!(server.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);
    assert_eq!(server.call(Method::GET, "/readyz", None, None).await.json()["status"], "ready");
    create_range(&server, json!({"name": "Metered", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "m", true).await;
    enroll(&server, &key, "m.corp.example", &public_key(), Value::Null).await;
    let metrics = server.call(Method::GET, "/metrics", None, None).await.text();
    for expected in [
        "reachback_range_used_ips{",
        "range=\"Metered\"",
        "reachback_range_total_ips{",
        "reachback_enrollments_total{result=\"created\"} 1",
        "reachback_http_requests_total{",
        "reachback_http_request_duration_seconds_bucket{",
        "reachback_bindings 1",
    ] {
        assert!(metrics.contains(expected), "{expected} missing in\n{metrics}");
    }
    let openapi = server.call(Method::GET, "/api/v1/openapi.json", None, None).await.json();
    assert_eq!(openapi["openapi"], "3.1.0");
    for path in ["/api/v1/ip-ranges", "/api/v1/ip-bindings/export.csv", "/api/v1/enroll", "/api/v1/audit-logs"] {
        assert!(openapi["paths"].get(path).is_some(), "{path}");
    }
    // every documented route exists
    for route in reachback_server::ROUTES {
        let path = route.path.replace("{id}", "x").replace("{ip}", "100.64.0.200").replace("{key_id}", "x");
        let method = Method::from_bytes(route.method.to_uppercase().as_bytes()).expect("method");
        let reply = server.call(method, &path, Some(json!({})), Some(TOKEN)).await;
        assert_ne!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{} {}", route.method, route.path);
        assert!(reply.status != StatusCode::NOT_FOUND || reply.json()["detail"] != "path not found", "{} {}", route.method, route.path);
        assert!(!reply.status.is_server_error(), "{} {}: {}", route.method, route.path, reply.text());
    }
    assert_eq!(server.get("/api/v1/nothing-here").await.status, StatusCode::NOT_FOUND);
    // request bodies as documented: the schema's fields are exactly those the handler
    // takes (an unknown field is refused with the list of allowed ones)
    // a `$ref` into the components, followed
    let resolve = |schema: &Value| -> Value {
        match schema["$ref"].as_str().and_then(|reference| reference.strip_prefix("#/components/schemas/")) {
            Some(name) => openapi["components"]["schemas"][name].clone(),
            None => schema.clone(),
        }
    };
    let ranges = &openapi["paths"]["/api/v1/ip-ranges"];
    let create = resolve(&ranges["post"]["requestBody"]["content"]["application/json"]["schema"]);
    assert_eq!(create["required"], json!(["name", "range"]));
    assert_eq!(create["additionalProperties"], false);
    assert_eq!(create["properties"]["name"]["maxLength"], 128, "the limits the handler enforces");
    let patch = resolve(&openapi["paths"]["/api/v1/ip-ranges/{id}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]);
    assert_eq!(patch["required"], json!([]));
    assert_eq!(patch["additionalProperties"], false);
    let location = &patch["properties"]["location"]["oneOf"];
    assert!(location.as_array().is_some_and(|branches| branches.contains(&json!({"type": "null"}))), "null clears a location: {location}");
    assert_eq!(patch["properties"]["enabled"]["type"], "boolean", "enabled takes no null");
    // every operation's success answer has its schema, and every reference resolves
    for route in reachback_server::ROUTES {
        let operation = &openapi["paths"][route.path][route.method];
        assert_eq!(operation["operationId"], route.operation_id());
        let success = &operation["responses"][route.success.to_string()];
        assert!(success.is_object(), "{} {}: no {} response", route.method, route.path, route.success);
        if route.success != 204 {
            let content = success["content"].as_object().expect("content");
            let schema = content.values().next().expect("a media type")["schema"].clone();
            assert!(!resolve(&schema).is_null() && resolve(&schema) != json!({}), "{} {}: no schema", route.method, route.path);
        }
    }
    let text = openapi.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().expect("name");
        assert!(openapi["components"]["schemas"].get(name).is_some(), "dangling reference to {name}");
    }
    // links from a creation to the operations that use its id
    let links = &ranges["post"]["responses"]["201"]["links"];
    assert_eq!(links["ranges_get"]["parameters"]["id"], "$response.body#/id", "{links}");
    let mut checked = 0;
    for (path, operations) in openapi["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let Some(schema) = operation.pointer("/requestBody/content/application~1json/schema").map(resolve) else { continue };
            if path.contains('{') {
                continue;
            }
            let documented: Vec<&str> = schema["properties"].as_object().expect("properties").keys().map(String::as_str).collect();
            let reply =
                server.call(Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"), path, Some(json!({"not_a_field": 1})), Some(TOKEN)).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method} {path}: {}", reply.text());
            let detail = reply.json()["detail"].as_str().expect("detail").to_string();
            let allowed: Vec<&str> = detail.rsplit_once("allowed: ").expect("allowed list").1.split(", ").collect();
            let (mut allowed, mut documented) = (allowed, documented);
            allowed.sort();
            documented.sort();
            assert_eq!(allowed, documented, "{method} {path}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} request bodies checked");
}

async fn hostile_input(server: TestServer) {
    let raw = |body: &'static str, content_type: &'static str| {
        Request::builder()
            .method(Method::POST)
            .uri("/api/v1/ip-ranges")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", content_type)
            .body(Body::from(body))
            .expect("request")
    };
    for body in ["{", "[]", "null", "\"x\"", "{\"name\": \"a\", \"range\": \"100.64.0.0/24\",}"] {
        let reply = server.send(raw(body, "application/json")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.headers["content-type"], "application/problem+json");
    }
    assert_eq!(server.send(raw("name=a", "application/x-www-form-urlencoded")).await.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = format!("{{\"name\": \"{}\", \"range\": \"100.64.0.0/24\"}}", "a".repeat(200_000));
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/ip-ranges")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(huge))
        .expect("request");
    assert_eq!(server.send(request).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    let enroll_huge = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/enroll")
        .header("content-type", "application/json")
        .body(Body::from(vec![b' '; 100_000]))
        .expect("request");
    assert_eq!(server.send(enroll_huge).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    for name in ["bad\u{0}name", "tab\there"] {
        assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": name, "range": "100.64.0.0/24"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
    // names with markup are stored as text, unchanged
    let range =
        create_range(&server, json!({"name": "<script>alert(1)</script>", "range": "100.64.0.0/24", "description": "\"><img src=x onerror=alert(1)>"})).await;
    assert_eq!(range["description"], "\"><img src=x onerror=alert(1)>");
    assert_eq!(server.get("/api/v1/ip-ranges?page=999999999999").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/ip-ranges?page_size=-1").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.get("/api/v1/ip-ranges?name=%ZZ").await.status, StatusCode::OK);
    assert_eq!(server.get("/api/v1/ip-bindings?username=%25_%5C").await.json()["total"], 0, "LIKE wildcards are matched literally");
    assert_eq!(server.get("/api/v1/ip-ranges").await.json()["total"], 1);
}

async fn restart_keeps_bindings_sticky(mut server: TestServer) {
    create_range(&server, json!({"name": "Sticky", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "sam", true).await;
    let laptop = public_key();
    assert_eq!(enroll(&server, &key, "sam.corp.example", &laptop, Value::Null).await.json()["virtual_ip"], "100.64.0.1");
    assert_eq!(enroll(&server, &key, "tom.corp.example", &public_key(), Value::Null).await.json()["virtual_ip"], "100.64.0.2");
    assert_eq!(server.delete("/api/v1/ip-bindings/100.64.0.2").await.status, StatusCode::NO_CONTENT);
    server.restart().await;
    // the engine was rebuilt from the store: bound and quarantined addresses are skipped
    assert_eq!(enroll(&server, &key, "uma.corp.example", &public_key(), Value::Null).await.json()["virtual_ip"], "100.64.0.3");
    let again = enroll(&server, &key, "sam.corp.example", &laptop, Value::Null).await;
    assert_eq!((again.status, again.json()["virtual_ip"].clone()), (StatusCode::OK, json!("100.64.0.1")));
    assert_eq!(server.get("/api/v1/ip-ranges").await.json()["items"][0]["used_ips"], 2);
    let state = server.state.as_ref().expect("state");
    assert_eq!(state.store.verify_counters().await.expect("counters"), Vec::<(String, i64, i64)>::new());
    assert_eq!(state.store.verify_history().await.expect("history"), Vec::<String>::new());
}

async fn deep_pages_match_row_by_row_order(server: TestServer) {
    create_range(&server, json!({"name": "A", "range": "100.64.0.0/24"})).await;
    create_range(&server, json!({"name": "B", "range": "100.64.1.0/25"})).await;
    create_range(&server, json!({"name": "C", "range": "fd00::/120"})).await;
    let key = create_key(&server, "deep", true).await;
    let public_key = public_key();
    for index in 0..420 {
        let reply = enroll(&server, &key, &format!("n{index}.corp.example"), &public_key, Value::Null).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
    // holes and quarantine in the middle of the address space
    for ip in ["100.64.0.7", "100.64.0.99", "100.64.1.3", "fd00::20"] {
        assert_eq!(server.delete(&format!("/api/v1/ip-bindings/{ip}")).await.status, StatusCode::NO_CONTENT);
    }
    let ips =
        |value: Value| -> Vec<String> { value["items"].as_array().expect("items").iter().map(|item| item["ip"].as_str().expect("ip").to_string()).collect() };
    for sort in ["ip", "-ip"] {
        for page in [4, 5, 6, 7, 8, 9, 12] {
            // the filter on updated_after forces the row-skipping path: both must agree
            let seeking = server.get(&format!("/api/v1/ip-bindings?sort={sort}&page={page}&page_size=50")).await.json();
            let skipping = server.get(&format!("/api/v1/ip-bindings?sort={sort}&page={page}&page_size=50&updated_after=2000-01-01T00:00:00Z")).await.json();
            assert_eq!(ips(seeking.clone()), ips(skipping.clone()), "sort={sort} page={page}");
            assert_eq!(seeking["total"], 416);
        }
        let seeking = server.get(&format!("/api/v1/ip-bindings?sort={sort}&page=3&page_size=100&range_name=a")).await.json();
        let store = &server.state.as_ref().expect("state").store;
        store.set_export_chunk(1);
        for range in store.list_ranges().await.expect("ranges") {
            let (mut chunked, mut chunked_quarantine) = store.range_addresses(&range.id).await.expect("chunked");
            let (mut by_row, mut by_row_quarantine) = store.range_addresses_by_row(&range.id).await.expect("rows");
            chunked.sort();
            by_row.sort();
            chunked_quarantine.sort();
            by_row_quarantine.sort();
            assert_eq!((chunked.len() > 20, &chunked, &chunked_quarantine), (true, &by_row, &by_row_quarantine), "{}", range.name);
        }
        store.set_export_chunk(5000);
        let skipping =
            server.get(&format!("/api/v1/ip-bindings?sort={sort}&page=3&page_size=100&range_name=a&updated_after=2000-01-01T00:00:00Z")).await.json();
        assert_eq!(ips(seeking), ips(skipping));
    }
    // other orders: deep pages (found over the sort index first, then read; in the far
    // half from the other end; limited to ranges, by walking the index or sorting the
    // ranges' rows; in range-name order, by seeking range by range) agree with the same
    // rows cut out of one page of everything read by one statement (a filter that every
    // row passes keeps the page off the seeking path)
    // a name that sorts first on the range with the highest addresses: name order is
    // not address order
    let ranges = server.get("/api/v1/ip-ranges").await.json();
    let c = ranges["items"].as_array().expect("items").iter().find(|range| range["name"] == "C").expect("C")["id"].as_str().expect("id").to_string();
    assert_eq!(server.patch(&format!("/api/v1/ip-ranges/{c}"), json!({"name": "0 C"})).await.status, StatusCode::OK);
    for sort in ["client_hostname", "-client_hostname", "-username", "range_name", "-range_name", "-platform", "last_updated", "-last_updated"] {
        let everything = ips(server.get(&format!("/api/v1/ip-bindings?sort={sort}&page_size=1000&updated_after=2000-01-01T00:00:00Z")).await.json());
        assert_eq!(everything.len(), 416);
        let in_a = ips(server.get(&format!("/api/v1/ip-bindings?sort={sort}&page_size=1000&updated_after=2000-01-01T00:00:00Z&range_name=a")).await.json());
        let bound_in_a = in_a.len();
        assert!(bound_in_a > 100, "{bound_in_a}");
        for (page, page_size) in [(1, 20), (2, 50), (3, 50), (4, 40), (5, 50), (13, 20)] {
            let page_of_a = ips(server.get(&format!("/api/v1/ip-bindings?sort={sort}&page={page}&page_size={page_size}&range_name=a")).await.json());
            let start = ((page - 1) * page_size).min(bound_in_a);
            assert_eq!(page_of_a, in_a[start..(start + page_size).min(bound_in_a)], "sort={sort} page={page} page_size={page_size} range_name=a");
        }
        for filter in ["", "&updated_after=2000-01-01T00:00:00Z"] {
            for (page, page_size) in [(4, 50), (5, 50), (6, 50), (9, 50), (10, 50), (30, 7), (59, 7), (60, 7)] {
                let deep = ips(server.get(&format!("/api/v1/ip-bindings?sort={sort}&page={page}&page_size={page_size}{filter}")).await.json());
                let start = ((page - 1) * page_size).min(416);
                assert_eq!(deep, everything[start..(start + page_size).min(416)], "sort={sort} page={page} page_size={page_size}{filter}");
            }
        }
    }
}

/// The database failing in the middle of a real export, on each backend: the
/// bindings table is renamed away after the response's first bytes went out, so
/// the parts (ranges) read after that fail inside the database. The body ends in
/// an error, never as a complete file (the HTTP framing of that error, a missing
/// chunked terminator, is checked in `hostile.rs`).
async fn an_export_whose_database_fails_mid_stream_ends_in_an_error(server: TestServer) {
    use http_body_util::BodyExt;
    // eight small ranges filled one after the other: the export in address order reads them one by one
    for index in 0..8 {
        create_range(&server, json!({"name": format!("R{index}"), "range": format!("100.64.{index}.0/29")})).await;
    }
    let key = create_key(&server, "carol", true).await;
    let public_key = public_key();
    let mut enrolled = 0;
    for index in 0..48 {
        let reply = enroll(&server, &key, &format!("m{index:02}.corp.example"), &public_key, Value::Null).await;
        if reply.status == StatusCode::CREATED {
            enrolled += 1;
        }
    }
    assert!(enrolled >= 40, "{enrolled} enrolled");
    let state = server.state.as_ref().expect("state");
    state.store.set_export_chunk(1);
    // the SQL path (it serves while the in-memory index loads); an export from the
    // index reads no database once it has selected its rows
    state.store.use_listing_index(false);
    // the whole export, as a baseline
    let complete = server.get("/api/v1/ip-bindings/export.csv?sort=ip").await;
    assert_eq!(complete.status, StatusCode::OK);
    assert_eq!(complete.text().lines().count(), enrolled + 1);
    let request = Request::builder()
        .uri("/api/v1/ip-bindings/export.csv?sort=ip")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request");
    let response = tower::ServiceExt::oneshot(server.router.clone(), request).await.expect("router answers");
    assert_eq!(response.status(), StatusCode::OK, "the export starts");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first frame").expect("the header goes out").into_data().expect("data");
    assert!(String::from_utf8_lossy(&first).starts_with("ip,"), "{first:?}");
    // the database fails under the running export
    server.raw_sql("ALTER TABLE bindings RENAME TO bindings_gone").await;
    let mut received = first.len();
    let outcome = loop {
        match body.frame().await {
            None => break Ok(received),
            Some(Ok(frame)) => received += frame.into_data().map(|data| data.len()).unwrap_or(0),
            Some(Err(error)) => break Err(error.to_string()),
        }
    };
    assert!(outcome.is_err(), "the body ends in an error, not as a file of {} bytes (complete: {})", received, complete.body.len());
    assert!(received < complete.body.len(), "the cut-off export is shorter than the complete one");
}

async fn export_order_across_chunks(server: TestServer) {
    create_range(&server, json!({"name": "Zulu", "range": "100.64.0.0/28"})).await;
    create_range(&server, json!({"name": "alpha", "range": "100.65.0.0/28"})).await;
    create_range(&server, json!({"name": "Six", "range": "fd00::/124"})).await;
    let keys = [create_key(&server, "carol", true).await, create_key(&server, "=bob", true).await, create_key(&server, "alice", true).await];
    for index in 0..31 {
        let reply = enroll(&server, &keys[index % 3], &format!("h{:02}.corp.example", (index * 7) % 31), &public_key(), Value::Null).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
    server.state.as_ref().expect("state").store.set_export_chunk(4);
    let orders = ["ip", "-ip", "username", "-username", "client_hostname", "-last_updated", "range_name", "-range_name", "platform"];
    let filtered = ["sort=-range_name&username=alice", "sort=range_name&range_name=u", "sort=-ip&range_location=nowhere", "sort=range_name&ip=100.64.0.0/16"];
    for sort in orders.iter().map(|order| format!("sort={order}")).chain(filtered.iter().map(|query| query.to_string())) {
        let listed: Vec<String> = server.get(&format!("/api/v1/ip-bindings?{sort}&page_size=1000")).await.json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| item["ip"].as_str().expect("ip").to_string())
            .collect();
        let csv = server.get(&format!("/api/v1/ip-bindings/export.csv?{sort}")).await.text();
        let exported: Vec<String> = csv.lines().skip(1).map(|line| line.split(',').next().expect("ip").to_string()).collect();
        assert_eq!(exported, listed, "{sort}");
    }
    let filtered = server.get("/api/v1/ip-bindings/export.csv?username=alice&sort=-ip").await.text();
    assert_eq!(filtered.lines().count(), 1 + 10);
}

/// The hostname and username filters are answered through a trigram index: their
/// results must equal a plain case-insensitive substring test over every row, for
/// needles of every length, with characters that mean something to the index or
/// to LIKE, and after devices are deleted.
async fn substring_filters_agree_with_a_plain_scan(server: TestServer) {
    create_range(&server, json!({"name": "A", "range": "100.64.0.0/24"})).await;
    let hostnames = ["alpha.corp.example", "ALPHA2.corp.example", "beta.corp.example", "quote-x.corp.example", "a1.lab.example", "zz.corp.example"];
    let users = ["Ann.Lee", "bob", "ann_lee", "o'brien"];
    let public_key = public_key();
    for (index, hostname) in hostnames.iter().enumerate() {
        let key = create_key(&server, users[index % users.len()], true).await;
        assert_eq!(enroll(&server, &key, hostname, &public_key, Value::Null).await.status, StatusCode::CREATED);
    }
    let everything = server.get("/api/v1/ip-bindings?page_size=100").await.json();
    let rows: Vec<(String, String, String)> = everything["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            (
                item["client_hostname"].as_str().expect("hostname").into(),
                item["username"].as_str().expect("username").into(),
                item["device_id"].as_str().expect("id").into(),
            )
        })
        .collect();
    async fn check(server: &TestServer, rows: Vec<(String, String, String)>) {
        for needle in ["alpha", "ALP", "al", "a", "corp.example", "pha2.c", "ann", "n.l", "n_l", "o'b", "\"x", "%", "e", "nothing-like-this", "lee"] {
            let encoded: String = needle.bytes().map(|byte| format!("%{byte:02X}")).collect();
            for (parameter, column) in [("client_hostname", 0), ("username", 1)] {
                let expected: Vec<&str> = rows
                    .iter()
                    .filter(|row| if column == 0 { &row.0 } else { &row.1 }.to_lowercase().contains(&needle.to_lowercase()))
                    .map(|row| row.2.as_str())
                    .collect();
                let listed = server.get(&format!("/api/v1/ip-bindings?{parameter}={encoded}&page_size=100")).await.json();
                let mut got: Vec<&str> = listed["items"].as_array().expect("items").iter().map(|item| item["device_id"].as_str().expect("id")).collect();
                let mut want = expected.clone();
                got.sort();
                want.sort();
                assert_eq!((got, listed["total"].as_u64()), (want.clone(), Some(want.len() as u64)), "bindings {parameter}={needle}");
                let devices_parameter = if column == 0 { "hostname" } else { "username" };
                let listed = server.get(&format!("/api/v1/devices?{devices_parameter}={encoded}&page_size=100")).await.json();
                let mut got: Vec<&str> = listed["items"].as_array().expect("items").iter().map(|item| item["id"].as_str().expect("id")).collect();
                got.sort();
                assert_eq!((got, listed["total"].as_u64()), (want.clone(), Some(want.len() as u64)), "devices {devices_parameter}={needle}");
            }
        }
    }
    check(&server, rows.clone()).await;
    // deleted devices leave the index with their rows
    let gone: Vec<(String, String, String)> = rows.iter().filter(|row| row.0.starts_with("alpha")).cloned().collect();
    for row in &gone {
        assert_eq!(server.delete(&format!("/api/v1/devices/{}", row.2)).await.status, StatusCode::NO_CONTENT);
    }
    check(&server, rows.into_iter().filter(|row| !gone.contains(row)).collect()).await;
}

/// PostgreSQL: the server vacuums the tables whose sort indexes serve listings once
/// enough rows changed (the background task's threshold is 10,000; here 3), so
/// deep pages are found over the index alone. Statistics reach PostgreSQL's counters
/// up to ten seconds after a write, hence the wait. SQLite has nothing to vacuum.
async fn listing_tables_vacuumed_when_due(server: TestServer) {
    create_range(&server, json!({"name": "A", "range": "100.64.0.0/24"})).await;
    let key = create_key(&server, "carol", true).await;
    for index in 0..4 {
        assert_eq!(enroll(&server, &key, &format!("v{index}.corp.example"), &public_key(), Value::Null).await.status, StatusCode::CREATED);
    }
    let store = &server.state.as_ref().expect("state").store;
    if store.backend() == reachback_store::Backend::Sqlite {
        assert_eq!(store.vacuum_if_due(1).await.expect("no vacuum"), Vec::<String>::new());
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut vacuumed = Vec::new();
    while !(vacuumed.contains(&"bindings".to_string()) && vacuumed.contains(&"devices".to_string())) {
        assert!(std::time::Instant::now() < deadline, "bindings and devices not vacuumed, only {vacuumed:?}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        vacuumed.extend(store.vacuum_if_due(3).await.expect("vacuum"));
    }
    // just vacuumed: nothing is due any more, and a listing still answers
    assert_eq!(store.vacuum_if_due(3).await.expect("vacuum"), Vec::<String>::new());
    assert_eq!(server.get("/api/v1/ip-bindings?sort=client_hostname").await.json()["total"], 4);
}
