//! The console's own endpoints: password sign-in and sign-out (a session cookie
//! plus a CSRF token for state changes), and filters saved per admin.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use reachback_store::{AdminRow, SavedFilterRow, new_id, now_micros};
use serde_json::{Value, json};

use crate::api::{created, no_content};
use crate::auth::{Caller, ClientIp, Role, SESSION_COOKIE};
use crate::crypto::{hash_secret, new_secret, verify_password};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject, QueryParams};

use crate::api::views;
use crate::state::SharedState;
use crate::validate;

/// How long a console session lasts.
const SESSION_SECONDS: i64 = 12 * 3600;
/// Pages whose filters can be saved.
const PAGES: &[&str] = &[
    "ip-ranges",
    "ip-bindings",
    "devices",
    "client-sessions",
    "flows",
    "audit-logs",
    "enrollment-keys",
    "app-segments",
    "access-policies",
    "connectors",
    "admins",
    "admin-sessions",
    "event-sinks",
];

/// A real hash to check unknown usernames against.
static DECOY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `Secure` when the console is reached over HTTPS through a TLS-terminating proxy
/// (the server's own TLS marks its requests with `ServedOverTls`).
fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|value| value.to_str().ok()).is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .unwrap_or(HeaderValue::from_static(""))
}

fn limiter(state: &SharedState) -> std::sync::MutexGuard<'_, crate::limit::LoginLimiter> {
    state.login_limiter.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks a username and password; the admin, or why the sign-in fails.
async fn check_password(state: &SharedState, username: &str, password: String) -> ApiResult<Result<AdminRow, (Option<AdminRow>, &'static str)>> {
    if username.len() > 128 || password.len() > 1024 {
        return Ok(Err((None, "too long")));
    }
    let Some(admin) = state.store.find_admin_by_username(username).await? else {
        // the same work as a real check, so timing does not tell which usernames exist
        let decoy = DECOY_HASH.get_or_init(|| crate::crypto::hash_password(&new_secret("decoy_")).unwrap_or_default()).clone();
        let _ = tokio::task::spawn_blocking(move || verify_password(&password, &decoy)).await;
        return Ok(Err((None, "unknown username")));
    };
    let Some(hash) = admin.password_hash.clone() else {
        // the same work here too: an account without a password must not answer faster
        let decoy = DECOY_HASH.get_or_init(|| crate::crypto::hash_password(&new_secret("decoy_")).unwrap_or_default()).clone();
        let _ = tokio::task::spawn_blocking(move || verify_password(&password, &decoy)).await;
        return Ok(Err((Some(admin), "no console password")));
    };
    let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash)).await.unwrap_or(false);
    Ok(if matches { Ok(admin) } else { Err((Some(admin), "wrong password")) })
}

/// `POST /api/v1/auth/login`. Failed sign-ins are limited per account and per
/// source address (`crate::limit`): over a limit the answer is a 429 with
/// `Retry-After`, before any password hash runs. Every failure is audited
/// (`login_failed`, the username tried as the actor); a success clears the account's count.
pub async fn login(
    State(state): State<SharedState>,
    connect: ClientIp,
    headers: HeaderMap,
    tls: Option<axum::Extension<crate::serve::ServedOverTls>>,
    body: JsonObject,
) -> ApiResult<Response> {
    let mut fields = Fields::of::<crate::api::bodies::LoginBody>(body)?;
    let username = fields.string("username", true).unwrap_or_default();
    let password = fields.string("password", true).unwrap_or_default();
    fields.finish()?;
    let username = username.trim();
    let address = connect.0.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    if let Err(limited) = limiter(&state).begin(username, address, std::time::Instant::now()) {
        tracing::info!(scope = limited.scope, client_ip = connect.0.as_deref().unwrap_or("unknown"), "console sign-in refused: too many failed sign-ins");
        let seconds = limited.retry_after.as_secs().max(1);
        return Err(ApiError::too_many_requests(format!("too many failed sign-ins for this {}; try again in {seconds} seconds", limited.scope), seconds));
    }
    let admin = match check_password(&state, username, password).await? {
        Ok(admin) => admin,
        Err((admin, reason)) => {
            tracing::info!(admin_id = admin.as_ref().map(|admin| admin.id.as_str()).unwrap_or(""), "console sign-in refused");
            tracing::debug!(username, reason, "console sign-in refused");
            let audit = reachback_store::AuditEntry {
                // what was typed, made printable and bounded
                actor: username.chars().filter(|c| !c.is_control()).take(128).collect(),
                action: "login_failed".into(),
                resource_type: "admin".into(),
                resource_id: admin.map(|admin| admin.id).unwrap_or_default(),
                before: None,
                after: Some(json!({"reason": reason})),
                source_ip: connect.0.clone(),
            };
            state.store.record_audit(audit).await?;
            return Err(ApiError::unauthorized("wrong username or password"));
        }
    };
    limiter(&state).succeeded(username, address);
    let token = new_secret("rbs_");
    let csrf = new_secret("rbx_");
    let session_id = new_id();
    let audit = reachback_store::AuditEntry {
        actor: admin.username.clone(),
        action: "login".into(),
        resource_type: "admin_session".into(),
        resource_id: format!("session:{session_id}"),
        before: None,
        after: None,
        source_ip: connect.0.clone(),
    };
    let expires_at = now_micros() + SESSION_SECONDS * 1_000_000;
    state.store.create_session(&session_id, &admin.id, &hash_secret(&token), &csrf, connect.0.as_deref(), expires_at, audit).await?;
    let mut response = Json(views::json_of(&views::SignIn { username: admin.username, role: admin.role, csrf_token: csrf })).into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(&token, SESSION_SECONDS, tls.is_some() || over_tls(&headers)));
    Ok(response)
}

pub async fn logout(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    tls: Option<axum::Extension<crate::serve::ServedOverTls>>,
) -> ApiResult<Response> {
    if caller.principal.session_id.starts_with("session:") {
        let audit = caller.audit("logout", "admin_session", &caller.principal.session_id, None, None);
        match state.store.delete_session(&caller.principal.session_id, audit).await {
            Ok(()) | Err(reachback_store::StoreError::NotFound) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0, tls.is_some() || over_tls(&headers)));
    Ok(response)
}

/// Enrollments (new devices) per UTC day for the last `days` days (default 30, at most 366), every day listed.
pub async fn enrollment_stats(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["days"])?;
    let days = match query.value("days")? {
        None => 30,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|days| (1..=366).contains(days))
            .ok_or_else(|| ApiError::bad_request("days must be a whole number from 1 to 366"))?,
    };
    const DAY: i64 = 86_400_000_000;
    let today = now_micros() / DAY;
    let first = today - days + 1;
    let counts: std::collections::HashMap<i64, i64> = state.store.enrollments_per_day(first * DAY).await?.into_iter().collect();
    let days = (first..=today)
        .map(|day| {
            let date = crate::request::format_time(day * DAY);
            views::EnrollmentDay { date: date.get(..10).unwrap_or(&date).to_string(), enrollments: counts.get(&day).copied().unwrap_or(0) }
        })
        .collect();
    Ok(Json(views::json_of(&views::EnrollmentStats { days })))
}

/// Bound addresses per platform, every platform listed (the dashboard).
pub async fn binding_stats(State(state): State<SharedState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let counts: std::collections::HashMap<String, i64> = state.store.bindings_per_platform().await?.into_iter().collect();
    let by_platform = validate::PLATFORMS
        .iter()
        .map(|platform| views::PlatformCount { platform: platform.to_string(), bindings: counts.get(*platform).copied().unwrap_or(0) })
        .collect();
    Ok(Json(views::json_of(&views::BindingStats { by_platform })))
}

/// The five users with the most bindings in a range (the console's range details).
pub async fn range_top_users(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    state.store.get_range(&id).await.map_err(|error| ApiError::not_found_or(error, "IP range"))?;
    let users = state.store.top_users_of_range(&id, 5).await?;
    let items = users.into_iter().map(|(username, bindings)| views::UserCount { username, bindings }).collect();
    Ok(Json(views::json_of(&views::TopUsers { items })))
}

fn filter_json(row: &SavedFilterRow) -> Value {
    crate::api::views::json_of(&crate::api::views::SavedFilter::from(row))
}

pub async fn list_filters(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page"])?;
    let page = query.value("page")?;
    if let Some(page) = &page
        && !PAGES.contains(&page.as_str())
    {
        return Err(ApiError::bad_request(format!("'page' must be one of: {}", PAGES.join(", "))));
    }
    let rows = state.store.list_saved_filters(&caller.principal.admin_id, page.as_deref()).await?;
    let total = rows.len();
    let items = rows.iter().map(crate::api::views::SavedFilter::from).collect();
    Ok(Json(crate::api::views::json_of(&crate::api::views::SavedFilterList {
        items,
        total: i64::try_from(total).unwrap_or(i64::MAX),
        page: 1,
        page_size: i64::try_from(total.max(1)).unwrap_or(i64::MAX),
    })))
}

pub async fn save_filter(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let mut fields = Fields::of::<crate::api::bodies::FilterBody>(body)?;
    let page = fields.string("page", true).unwrap_or_default();
    if fields.has("page") && !PAGES.contains(&page.as_str()) {
        fields.error("page", format!("must be one of: {}", PAGES.join(", ")));
    }
    let name = fields.string("name", true).map(|name| name.trim().to_string()).unwrap_or_default();
    if name.is_empty() || name.chars().count() > 64 {
        fields.error("name", "must have 1 to 64 characters");
    } else if let Err(message) = validate::plain_text(&name, 64) {
        fields.error("name", message);
    }
    let query = fields.string("query", true).unwrap_or_default();
    if query.len() > 2048 || query.chars().any(char::is_control) {
        fields.error("query", "must be a query string of at most 2048 characters");
    }
    fields.finish()?;
    let row = SavedFilterRow { id: new_id(), page, name, query, created_at: now_micros() };
    state.store.save_filter(&caller.principal.admin_id, &row).await?;
    Ok(created(filter_json(&row)))
}

pub async fn delete_filter(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    state.store.delete_saved_filter(&caller.principal.admin_id, &id).await.map_err(|error| ApiError::not_found_or(error, "saved filter"))?;
    Ok(no_content())
}
