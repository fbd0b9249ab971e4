//! The console's endpoints at the HTTP boundary: password sign-in, the session
//! cookie's attributes, CSRF on every state change, sign-out, saved filters per
//! admin, and the static files with their security headers.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use crate::harness::{Reply, TestServer};
use crate::on_both_backends;

on_both_backends!(
    console_sign_in_csrf_and_sign_out,
    saved_filters_belong_to_their_admin,
    console_files_carry_security_headers,
    a_superadmin_can_always_sign_in
);

async fn with_cookie(server: &TestServer, method: Method, path: &str, cookie: &str, csrf: Option<&str>, body: Option<Value>) -> Reply {
    let mut request = Request::builder().method(method).uri(path).header(header::COOKIE, format!("reachback_session={cookie}"));
    if let Some(csrf) = csrf {
        request = request.header("x-csrf-token", csrf);
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    server.send(request.body(body).expect("request")).await
}

/// Signs in; returns the session token from the cookie and the CSRF token.
async fn sign_in(server: &TestServer, username: &str, password: &str) -> (String, String) {
    let reply = server.call(Method::POST, "/api/v1/auth/login", Some(json!({"username": username, "password": password})), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let cookie = reply.headers[header::SET_COOKIE].to_str().expect("cookie").to_string();
    let token = cookie.split(';').next().and_then(|pair| pair.strip_prefix("reachback_session=")).expect("session cookie").to_string();
    (token, reply.json()["csrf_token"].as_str().expect("csrf").to_string())
}

async fn admin_with_password(server: &TestServer, username: &str, role: &str, password: &str) -> String {
    let reply = server.post("/api/v1/admins", json!({"username": username, "role": role, "password": password})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["id"].as_str().expect("id").to_string()
}

async fn console_sign_in_csrf_and_sign_out(server: TestServer) {
    admin_with_password(&server, "olivia", "admin", "a long enough password").await;
    // wrong password, unknown user, an admin without a password: the same 401, no cookie
    for (username, password) in [("olivia", "wrong password!!"), ("nobody", "a long enough password"), ("admin", "anything at all")] {
        let reply = server.call(Method::POST, "/api/v1/auth/login", Some(json!({"username": username, "password": password})), None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{username}");
        assert!(reply.headers.get(header::SET_COOKIE).is_none());
        assert!(reply.text().contains("wrong username or password"));
    }
    assert_eq!(server.call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "olivia"})), None).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = server.call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "OLIVIA", "password": "a long enough password"})), None).await;
    assert_eq!(reply.status, StatusCode::OK, "usernames compare case-insensitively");
    let cookie = reply.headers[header::SET_COOKIE].to_str().expect("cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: no Secure attribute");
    let over_tls = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-forwarded-proto", "https")
        .body(Body::from(json!({"username": "olivia", "password": "a long enough password"}).to_string()))
        .expect("request");
    assert!(server.send(over_tls).await.headers[header::SET_COOKIE].to_str().expect("cookie").contains("Secure"), "behind TLS: Secure");

    let (token, csrf) = sign_in(&server, "olivia", "a long enough password").await;
    let me = with_cookie(&server, Method::GET, "/api/v1/me", &token, None, None).await.json();
    assert_eq!((me["username"].clone(), me["role"].clone(), me["csrf_token"].clone()), (json!("olivia"), json!("admin"), json!(csrf.clone())));
    // a state change without the CSRF token (or with another) is refused and changes nothing
    let body = json!({"name": "r", "range": "100.64.0.0/24"});
    assert_eq!(with_cookie(&server, Method::POST, "/api/v1/ip-ranges", &token, None, Some(body.clone())).await.status, StatusCode::FORBIDDEN);
    assert_eq!(with_cookie(&server, Method::POST, "/api/v1/ip-ranges", &token, Some("rbx_forged"), Some(body.clone())).await.status, StatusCode::FORBIDDEN);
    assert_eq!(server.get("/api/v1/ip-ranges").await.json()["total"], 0);
    assert_eq!(with_cookie(&server, Method::POST, "/api/v1/ip-ranges", &token, Some(&csrf), Some(body)).await.status, StatusCode::CREATED);
    let audit = server.get("/api/v1/audit-logs?action=login").await.json();
    assert!(audit["total"].as_i64().expect("total") >= 1 && audit["items"][0]["actor"] == "olivia");
    // the session is listed and signing out ends it
    let sessions = server.get("/api/v1/admin-sessions").await.json();
    assert!(sessions["items"].as_array().expect("items").iter().any(|item| item["admin_username"] == "olivia" && item["api_key_name"].is_null()));
    assert_eq!(
        with_cookie(&server, Method::POST, "/api/v1/auth/logout", &token, None, None).await.status,
        StatusCode::FORBIDDEN,
        "sign-out needs the CSRF token too"
    );
    let reply = with_cookie(&server, Method::POST, "/api/v1/auth/logout", &token, Some(&csrf), None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.headers[header::SET_COOKIE].to_str().expect("cookie").contains("Max-Age=0"));
    assert_eq!(with_cookie(&server, Method::GET, "/api/v1/me", &token, None, None).await.status, StatusCode::UNAUTHORIZED, "the session has ended");
    // a viewer's session cannot write, CSRF token or not
    admin_with_password(&server, "vera", "viewer", "viewer password!").await;
    let (token, csrf) = sign_in(&server, "vera", "viewer password!").await;
    let reply = with_cookie(&server, Method::POST, "/api/v1/ip-ranges", &token, Some(&csrf), Some(json!({"name": "v", "range": "100.65.0.0/24"}))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

async fn saved_filters_belong_to_their_admin(server: TestServer) {
    admin_with_password(&server, "olivia", "admin", "a long enough password").await;
    admin_with_password(&server, "vera", "viewer", "viewer password!").await;
    let (olivia, olivia_csrf) = sign_in(&server, "olivia", "a long enough password").await;
    let (vera, vera_csrf) = sign_in(&server, "vera", "viewer password!").await;
    let save = |token: &str, csrf: &str, body: Value| {
        let (token, csrf) = (token.to_string(), csrf.to_string());
        let server = &server;
        async move { with_cookie(server, Method::POST, "/api/v1/saved-filters", &token, Some(&csrf), Some(body)).await }
    };
    let saved = save(&olivia, &olivia_csrf, json!({"page": "ip-bindings", "name": "Paris", "query": "range_location=paris&sort=ip"})).await;
    assert_eq!(saved.status, StatusCode::CREATED, "{}", saved.text());
    assert_eq!(
        save(&vera, &vera_csrf, json!({"page": "ip-bindings", "name": "mine", "query": "username=v"})).await.status,
        StatusCode::CREATED,
        "viewers save filters too"
    );
    // the same name replaces; bad values are refused
    assert_eq!(
        save(&olivia, &olivia_csrf, json!({"page": "ip-bindings", "name": "Paris", "query": "range_location=paris&sort=-ip"})).await.status,
        StatusCode::CREATED
    );
    assert_eq!(save(&olivia, &olivia_csrf, json!({"page": "nowhere", "name": "x", "query": ""})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(save(&olivia, &olivia_csrf, json!({"page": "ip-bindings", "name": "", "query": ""})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        save(&olivia, &olivia_csrf, json!({"page": "ip-bindings", "name": "x", "query": "a".repeat(3000)})).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let mine = with_cookie(&server, Method::GET, "/api/v1/saved-filters?page=ip-bindings", &olivia, None, None).await.json();
    assert_eq!(mine["total"], 1);
    assert_eq!(mine["items"][0]["query"], "range_location=paris&sort=-ip");
    let theirs = with_cookie(&server, Method::GET, "/api/v1/saved-filters", &vera, None, None).await.json();
    assert_eq!(theirs["total"], 1, "each admin sees only their own");
    let id = mine["items"][0]["id"].as_str().expect("id");
    assert_eq!(
        with_cookie(&server, Method::DELETE, &format!("/api/v1/saved-filters/{id}"), &vera, Some(&vera_csrf), None).await.status,
        StatusCode::NOT_FOUND,
        "not theirs to delete"
    );
    assert_eq!(
        with_cookie(&server, Method::DELETE, &format!("/api/v1/saved-filters/{id}"), &olivia, Some(&olivia_csrf), None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(with_cookie(&server, Method::GET, "/api/v1/saved-filters", &olivia, None, None).await.json()["total"], 0);
}

async fn console_files_carry_security_headers(server: TestServer) {
    for (path, content_type) in [("/", "text/html"), ("/assets/app.js", "text/javascript"), ("/assets/app.css", "text/css")] {
        let reply = server.call(Method::GET, path, None, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert!(reply.headers[header::CONTENT_TYPE].to_str().expect("type").starts_with(content_type));
        let csp = reply.headers[header::CONTENT_SECURITY_POLICY].to_str().expect("csp");
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(reply.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
    let index = server.call(Method::GET, "/", None, None).await.text();
    assert!(index.contains("<script src=\"/assets/app.js\" defer></script>"));
    assert!(!index.contains("<script>") && !index.contains("onload=") && !index.contains("style="), "no inline script or style: {index}");
    assert_eq!(server.call(Method::GET, "/assets/other.js", None, None).await.status, StatusCode::NOT_FOUND);

    // the dashboard's enrollments per day
    assert_eq!(server.post("/api/v1/ip-ranges", json!({"name": "r", "range": "100.64.0.0/24"})).await.status, StatusCode::CREATED);
    let key = server.post("/api/v1/enrollment-keys", json!({"username": "alice"})).await.json()["key"].as_str().expect("key").to_string();
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let body = json!({"enrollment_key": key, "hostname": "a.corp.example", "platform": "linux", "public_key": public_key});
    assert_eq!(server.call(Method::POST, "/api/v1/enroll", Some(body), None).await.status, StatusCode::CREATED);
    let range_id = server.get("/api/v1/ip-ranges").await.json()["items"][0]["id"].as_str().expect("range").to_string();
    let top = server.get(&format!("/api/v1/stats/ranges/{range_id}/top-users")).await.json();
    assert_eq!(top["items"], json!([{"username": "alice", "bindings": 1}]));
    assert_eq!(server.get("/api/v1/stats/ranges/nope/top-users").await.status, StatusCode::NOT_FOUND);
    let platforms = server.get("/api/v1/stats/bindings").await.json();
    assert_eq!(platforms["by_platform"].as_array().expect("platforms").len(), 5);
    assert!(platforms["by_platform"].as_array().expect("platforms").iter().any(|item| item["platform"] == "linux" && item["bindings"] == 1), "{platforms}");
    let stats = server.get("/api/v1/stats/enrollments?days=7").await.json();
    let days = stats["days"].as_array().expect("days");
    assert_eq!(days.len(), 7, "every day is listed, with or without enrollments");
    assert_eq!(days[6]["enrollments"], 1, "{stats}");
    assert_eq!(days[0]["enrollments"], 0);
    assert_eq!(server.get("/api/v1/stats/enrollments").await.json()["days"].as_array().expect("days").len(), 30);
    for bad in ["0", "367", "x"] {
        assert_eq!(server.get(&format!("/api/v1/stats/enrollments?days={bad}")).await.status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(server.call(Method::GET, "/assets/..%2Fsrc%2Flib.rs", None, None).await.status, StatusCode::NOT_FOUND);
}

/// No change may leave every superadmin without a way to sign in (a console password
/// or an API key): nobody could manage admins again, since the bootstrap runs on an
/// empty database only. A refusal changes nothing and writes no audit row.
async fn a_superadmin_can_always_sign_in(server: TestServer) {
    let root = server.get("/api/v1/me").await.json()["id"].as_str().expect("id").to_string();
    let sessions = server.get("/api/v1/admin-sessions").await.json();
    let own = sessions["items"].as_array().expect("items").iter().find(|item| item["admin_id"] == root.as_str()).expect("listed")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let key_id = own.strip_prefix("key:").expect("an API key's session");
    let audited = server.get("/api/v1/audit-logs").await.json()["total"].clone();

    // the bootstrap key is the only way in: neither route revokes it
    for path in [format!("/api/v1/admin-sessions/{own}"), format!("/api/v1/admins/{root}/api-keys/{key_id}")] {
        let reply = server.delete(&path).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "{path}: {}", reply.text());
        // (the key in use is refused first: a key does not revoke itself)
        assert!(
            reply.text().contains("no superadmin could sign in after this change") || reply.text().contains("the API key the request is made with"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(server.get("/api/v1/me").await.status, StatusCode::OK, "the key still works");
    assert_eq!(server.get("/api/v1/audit-logs").await.json()["total"], audited, "a refusal writes no audit row");

    // with a second superadmin who has a password, the key may go
    let backup = admin_with_password(&server, "backup", "superadmin", "correct horse battery").await;
    // (with another credential: a key is never revoked with itself, so a script cannot lock itself out)
    let backup_key = server.post(&format!("/api/v1/admins/{backup}/api-keys"), json!({"name": "backup script"})).await.json()["key"]
        .as_str()
        .expect("backup key")
        .to_string();
    assert_eq!(server.delete(&format!("/api/v1/admin-sessions/{own}")).await.status, StatusCode::CONFLICT);
    let backup_key_id = server.call(Method::GET, "/api/v1/me", None, Some(&backup_key)).await.json()["session_id"].as_str().expect("session").to_string();
    assert_eq!(server.call(Method::DELETE, &format!("/api/v1/admin-sessions/{own}"), None, Some(&backup_key)).await.status, StatusCode::NO_CONTENT);
    assert_eq!(server.call(Method::DELETE, &format!("/api/v1/admin-sessions/{backup_key_id}"), None, Some(&backup_key)).await.status, StatusCode::CONFLICT);
    assert_eq!(
        server.call(Method::DELETE, &format!("/api/v1/admin-sessions/{backup_key_id}"), None, Some(crate::harness::TOKEN)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let own_route = format!("/api/v1/admins/{backup}/api-keys/{}", backup_key_id.trim_start_matches("key:"));
    assert_eq!(server.call(Method::DELETE, &own_route, None, Some(&backup_key)).await.status, StatusCode::CONFLICT);
    assert_eq!(server.get("/api/v1/me").await.status, StatusCode::UNAUTHORIZED);
    let (cookie, csrf) = sign_in(&server, "backup", "correct horse battery").await;
    let revoked = with_cookie(&server, Method::DELETE, &own_route, &cookie, Some(&csrf), None).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{}", revoked.text());

    // now that password is the only way in: it cannot be cleared
    let clear = json!({"password": null});
    let reply = with_cookie(&server, Method::PATCH, &format!("/api/v1/admins/{backup}"), &cookie, Some(&csrf), Some(clear.clone())).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let admins = with_cookie(&server, Method::GET, "/api/v1/admins", &cookie, None, None).await.json();
    let listed = admins["items"].as_array().expect("items").iter().find(|admin| admin["id"] == backup.as_str()).expect("listed").clone();
    assert_eq!(listed["has_password"], true, "the refused change changed nothing");

    // the bootstrap admin, without any way in, may be deleted
    let reply = with_cookie(&server, Method::DELETE, &format!("/api/v1/admins/{root}"), &cookie, Some(&csrf), None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    // with an API key of its own, the password may be cleared
    let key = with_cookie(&server, Method::POST, &format!("/api/v1/admins/{backup}/api-keys"), &cookie, Some(&csrf), Some(json!({"name": "ops"}))).await;
    assert_eq!(key.status, StatusCode::CREATED, "{}", key.text());
    let reply = with_cookie(&server, Method::PATCH, &format!("/api/v1/admins/{backup}"), &cookie, Some(&csrf), Some(clear)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let key = key.json()["key"].as_str().expect("key").to_string();
    assert_eq!(server.call(Method::GET, "/api/v1/me", None, Some(&key)).await.json()["username"], "backup");
}
