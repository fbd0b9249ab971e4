//! `/api/v1/enrollment-keys`: create (secret shown once), list, get, revoke.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_store::{EnrollmentKeyRow, new_id, now_micros};
use serde_json::Value;

use crate::api::{created, list_json, no_content, page_of};
use crate::auth::{Caller, Role};
use crate::crypto::{hash_secret, new_secret};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject, QueryParams, parse_time};

use crate::state::SharedState;
use crate::validate;

/// The orders the enrollment-key listing offers.
pub const SORTS: &[&str] = &["created_at", "username"];

pub fn key_json(row: &EnrollmentKeyRow) -> Value {
    crate::api::views::json_of(&crate::api::views::KeyView::from(row))
}

/// A hostname pattern: an exact FQDN, or `*.suffix` for the names under a domain;
/// returned lowercase (hostnames compare case-insensitively).
pub fn hostname_pattern(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (wildcard, name) = match text.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, text),
    };
    if name.contains('*') {
        return Err("must be a hostname (host.corp.example) or *. followed by a domain (*.corp.example)".into());
    }
    let name = validate::fqdn(name)?;
    Ok(if wildcard { format!("*.{name}") } else { name })
}

pub async fn create(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let mut fields = Fields::of::<crate::api::bodies::KeyBody>(body)?;
    let username = fields.string("username", true).map(|name| name.trim().to_string());
    if let Some(username) = &username {
        if username.is_empty() {
            fields.error("username", "must not be empty");
        } else if let Err(message) = validate::plain_text(username, 256) {
            fields.error("username", message);
        }
    }
    let reusable = fields.boolean("reusable").unwrap_or(false);
    let description = fields.string("description", false).unwrap_or_default();
    if let Err(message) = validate::plain_text(&description, 1024) {
        fields.error("description", message);
    }
    let pattern = match fields.string("hostname_pattern", false) {
        None => None,
        Some(text) => match hostname_pattern(&text) {
            Ok(pattern) => Some(pattern),
            Err(message) => {
                fields.error("hostname_pattern", message);
                None
            }
        },
    };
    let now = now_micros();
    let expires_at = match fields.string("expires_at", false) {
        None => None,
        Some(text) => match parse_time(&text) {
            Some(at) if at > now => Some(at),
            Some(_) => {
                fields.error("expires_at", "must be in the future");
                None
            }
            None => {
                fields.error("expires_at", "must be an RFC 3339 timestamp");
                None
            }
        },
    };
    fields.finish()?;
    let secret = new_secret("rbe_");
    let row = EnrollmentKeyRow {
        id: new_id(),
        username: username.unwrap_or_default(),
        description,
        reusable,
        expires_at,
        used_count: 0,
        revoked: false,
        created_at: now,
        hostname_pattern: pattern,
    };
    let after = key_json(&row);
    state.store.create_enrollment_key(&row, &hash_secret(&secret), caller.audit("create", "enrollment_key", &row.id, None, Some(after.clone()))).await?;
    Ok(created(crate::api::views::json_of(&crate::api::views::NewEnrollmentKey { key_row: crate::api::views::KeyView::from(&row), key: secret })))
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "username", "sort"])?;
    let paging = query.paging()?;
    let (sort, descending) = query.sort(SORTS, "created_at")?;
    let username = query.text("username").map(|name| name.to_lowercase());
    let mut rows: Vec<EnrollmentKeyRow> = state
        .store
        .list_enrollment_keys()
        .await?
        .into_iter()
        .filter(|row| username.as_ref().is_none_or(|name| row.username.to_lowercase().contains(name)))
        .collect();
    // newest first by default, like other logs of events
    rows.sort_by(|a, b| {
        let order = match sort {
            "username" => a.username.to_lowercase().cmp(&b.username.to_lowercase()),
            _ => b.created_at.cmp(&a.created_at),
        };
        if descending { order.reverse() } else { order }
    });
    let total = rows.len() as i64;
    Ok(list_json(page_of(rows, paging).iter().map(key_json).collect(), total, paging))
}

pub async fn get(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let row = state.store.get_enrollment_key(&id).await.map_err(|error| ApiError::not_found_or(error, "enrollment key"))?;
    Ok(Json(key_json(&row)))
}

pub async fn revoke(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    state
        .store
        .revoke_enrollment_key(&id, |row| {
            caller.audit("revoke", "enrollment_key", &id, Some(key_json(&EnrollmentKeyRow { revoked: false, ..row.clone() })), Some(key_json(row)))
        })
        .await
        .map_err(|error| ApiError::not_found_or(error, "enrollment key"))?;
    Ok(no_content())
}
