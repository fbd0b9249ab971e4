//! Administrators, their API keys, admin sessions, `/me` and settings.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_store::{AdminRow, ApiKeyRow, SessionRow, new_id, now_micros};
use serde_json::{Value, json};

use crate::api::{created, list_json, no_content, page_of};
use crate::auth::{Caller, Role};
use crate::crypto::{hash_password, hash_secret, new_secret};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject, QueryParams};

use crate::state::{Settings, SharedState};
use crate::validate;

fn admin_json(row: &AdminRow) -> Value {
    crate::api::views::json_of(&crate::api::views::AdminView::from(row))
}

fn session_json(row: &SessionRow) -> Value {
    crate::api::views::json_of(&crate::api::views::AdminSession::from(row))
}

fn check_password(fields: &mut Fields, password: &Option<String>) {
    if let Some(password) = password
        && (password.chars().count() < 10 || password.len() > 1024)
    {
        fields.error("password", "must have 10 to 1024 characters");
    }
}

pub async fn me(caller: Caller) -> Json<Value> {
    // the console reads its CSRF token here after a reload (cookie sessions only)
    let principal = caller.principal;
    Json(crate::api::views::json_of(&crate::api::views::Me {
        id: principal.admin_id,
        username: principal.username,
        role: principal.role,
        session_id: principal.session_id,
        csrf_token: principal.csrf_token,
    }))
}

pub async fn create_admin(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    let mut fields = Fields::of::<crate::api::bodies::AdminBody>(body)?;
    let username = fields.string("username", true).map(|name| match validate::name(&name, 128) {
        Ok(name) => name,
        Err(message) => {
            fields.error("username", message);
            name
        }
    });
    let role = fields.string("role", true);
    if role.as_deref().is_some_and(|role| Role::parse(role).is_none()) {
        fields.error("role", "must be superadmin, admin or viewer");
    }
    let password = fields.string("password", false);
    check_password(&mut fields, &password);
    fields.finish()?;
    let password_hash = password.as_deref().map(hash_password).transpose().map_err(ApiError::internal)?;
    let row = AdminRow { id: new_id(), username: username.unwrap_or_default(), role: role.unwrap_or_default(), password_hash, created_at: now_micros() };
    state.store.create_admin(&row, caller.audit("create", "admin", &row.id, None, Some(json!({"username": row.username, "role": row.role})))).await.map_err(
        |error| match error {
            reachback_store::StoreError::Duplicate(_) => ApiError::conflict(format!("an admin named {} exists already", row.username)),
            other => other.into(),
        },
    )?;
    Ok(created(admin_json(&row)))
}

pub async fn list_admins(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size"])?;
    let paging = query.paging()?;
    let rows = state.store.list_admins().await?;
    let total = rows.len() as i64;
    Ok(list_json(page_of(rows, paging).iter().map(admin_json).collect(), total, paging))
}

pub async fn get_admin(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let row = state.store.get_admin(&id).await.map_err(|error| ApiError::not_found_or(error, "admin"))?;
    Ok(Json(admin_json(&row)))
}

/// Changes an admin's password (superadmin; `null` clears it).
pub async fn patch_admin(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let mut fields = Fields::of::<crate::api::bodies::PasswordBody>(body)?;
    if !fields.has("password") {
        // a change that names no field changes nothing
        let row = state.store.get_admin(&id).await.map_err(|error| ApiError::not_found_or(error, "admin"))?;
        return Ok(Json(admin_json(&row)));
    }
    let clear = fields.raw("password").is_some_and(Value::is_null);
    let password = fields.string("password", !clear);
    check_password(&mut fields, &password);
    fields.finish()?;
    let hash = password.as_deref().map(hash_password).transpose().map_err(ApiError::internal)?;
    state
        .store
        .set_admin_password(
            &id,
            hash.as_deref(),
            caller.audit("set_password", "admin", &id, None, Some(json!({"password": if clear { "cleared" } else { "set" }}))),
        )
        .await
        .map_err(|error| ApiError::not_found_or(error, "admin"))?;
    let row = state.store.get_admin(&id).await?;
    Ok(Json(admin_json(&row)))
}

pub async fn delete_admin(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    if id == caller.principal.admin_id {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    let before = state.store.get_admin(&id).await.map_err(|error| ApiError::not_found_or(error, "admin"))?;
    state.store.delete_admin(&id, caller.audit("delete", "admin", &id, Some(admin_json(&before)), None)).await?;
    Ok(no_content())
}

pub async fn create_api_key(State(state): State<SharedState>, caller: Caller, Path(admin_id): Path<String>, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    let mut fields = Fields::of::<crate::api::bodies::ApiKeyBody>(body)?;
    let name = fields.string("name", true).map(|name| name.trim().to_string());
    if let Some(name) = &name {
        if name.is_empty() {
            fields.error("name", "must not be empty");
        } else if let Err(message) = validate::plain_text(name, 128) {
            fields.error("name", message);
        }
    }
    fields.finish()?;
    state.store.get_admin(&admin_id).await.map_err(|error| ApiError::not_found_or(error, "admin"))?;
    let secret = new_secret("rbk_");
    let row =
        ApiKeyRow { id: new_id(), admin_id: admin_id.clone(), name: name.unwrap_or_default(), created_at: now_micros(), last_used_at: None, last_ip: None };
    state
        .store
        .create_api_key(&row, &hash_secret(&secret), caller.audit("create", "api_key", &row.id, None, Some(json!({"admin_id": admin_id, "name": row.name}))))
        .await?;
    Ok(created(crate::api::views::json_of(&crate::api::views::NewApiKey { api_key: crate::api::views::ApiKey::from(&row), key: secret })))
}

pub async fn list_api_keys(State(state): State<SharedState>, caller: Caller, Path(admin_id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    state.store.get_admin(&admin_id).await.map_err(|error| ApiError::not_found_or(error, "admin"))?;
    let rows = state.store.list_api_keys(&admin_id).await?;
    let total = rows.len() as i64;
    let items = rows.iter().map(crate::api::views::ApiKey::from).collect();
    Ok(Json(crate::api::views::json_of(&crate::api::views::ApiKeyList { items, total, page: 1, page_size: total.max(1) })))
}

pub async fn delete_api_key(State(state): State<SharedState>, caller: Caller, Path((admin_id, key_id)): Path<(String, String)>) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    refuse_own_key(&caller, &format!("key:{key_id}"))?;
    state
        .store
        .delete_api_key(&admin_id, &key_id, caller.audit("delete", "api_key", &key_id, Some(json!({"admin_id": admin_id})), None))
        .await
        .map_err(|error| ApiError::not_found_or(error, "API key"))?;
    Ok(no_content())
}

pub async fn list_sessions(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "admin_username"])?;
    let paging = query.paging()?;
    let filter = query.text("admin_username").map(|name| name.to_lowercase());
    let rows: Vec<SessionRow> = state
        .store
        .list_sessions()
        .await?
        .into_iter()
        .filter(|row| filter.as_ref().is_none_or(|name| row.admin_username.to_lowercase().contains(name)))
        .collect();
    let total = rows.len() as i64;
    Ok(list_json(page_of(rows, paging).iter().map(session_json).collect(), total, paging))
}

/// An API key is not revoked with itself: a script holding one key would lock
/// itself out (rotate by creating the new key, then revoking the old one with it).
fn refuse_own_key(caller: &Caller, session_id: &str) -> ApiResult<()> {
    if session_id.starts_with("key:") && session_id == caller.principal.session_id {
        return Err(ApiError::conflict("this is the API key the request is made with; revoke it with another key or from the console"));
    }
    Ok(())
}

pub async fn delete_session(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    refuse_own_key(&caller, &id)?;
    state
        .store
        .delete_session(&id, caller.audit("delete", "admin_session", &id, None, None))
        .await
        .map_err(|error| ApiError::not_found_or(error, "admin session"))?;
    Ok(no_content())
}

pub async fn get_settings(State(state): State<SharedState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    Ok(Json(json!(state.settings())))
}

pub async fn patch_settings(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let mut fields = Fields::of::<crate::api::bodies::SettingsBody>(body)?;
    // one change at a time, and no background reload between reading and installing
    let _one_at_a_time = state.settings_sync.lock().await;
    let before = state.settings();
    let mut after = before.clone();
    if let Some(domains) = fields.string_list("client_domains") {
        if domains.len() > 100 {
            fields.error("client_domains", "at most 100 domains");
        }
        let mut cleaned = Vec::new();
        for domain in domains {
            match validate::fqdn(domain.trim()) {
                Ok(domain) if !cleaned.contains(&domain) => cleaned.push(domain),
                Ok(_) => {}
                Err(message) => fields.error("client_domains", format!("'{domain}' {message}")),
            }
        }
        if cleaned.len() > 100 {
            fields.error("client_domains", "at most 100 domains");
        }
        after.client_domains = cleaned;
    }
    if let Some(ttl) = fields.integer("binding_idle_ttl_seconds", 0, 10 * 365 * 86_400) {
        after.binding_idle_ttl_seconds = ttl;
    }
    if let Some(quarantine) = fields.integer("release_quarantine_seconds", 0, 365 * 86_400) {
        after.release_quarantine_seconds = quarantine;
    }
    if let Some(limit) = fields.integer("export_limit", 1, 100_000_000) {
        after.export_limit = limit;
    }
    if let Some(ttl) = fields.integer("provisioning_key_ttl_seconds", 60, crate::api::dataplane::MAX_PROVISIONING_KEY_SECONDS) {
        after.provisioning_key_ttl_seconds = ttl;
    }
    let retention = crate::state::HISTORY_RETENTION_DAYS;
    if let Some(days) = fields.integer("binding_history_retention_days", *retention.start(), *retention.end()) {
        after.binding_history_retention_days = days;
    }
    if let Some(enabled) = fields.boolean("flow_log_enabled") {
        after.flow_log_enabled = enabled;
    }
    let retention = crate::state::FLOW_LOG_RETENTION_DAYS;
    if let Some(days) = fields.integer("flow_log_retention_days", *retention.start(), *retention.end()) {
        after.flow_log_retention_days = days;
    }
    fields.finish()?;
    save_settings(&state, &caller, &before, &after).await?;
    Ok(Json(json!(after)))
}

/// Stores and installs the settings; the caller holds `settings_sync` from reading `before`.
async fn save_settings(state: &SharedState, caller: &Caller, before: &Settings, after: &Settings) -> ApiResult<()> {
    let values: Vec<(String, String)> = match json!(after) {
        Value::Object(map) => map.into_iter().map(|(key, value)| (key, value.to_string())).collect(),
        _ => Vec::new(),
    };
    state.store.save_settings(&values, caller.audit("update", "settings", "settings", Some(json!(before)), Some(json!(after)))).await?;
    state.allocation.set_quarantine_duration(after.quarantine_micros()).await;
    state.set_settings(after.clone());
    Ok(())
}
