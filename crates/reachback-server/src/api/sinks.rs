//! `/api/v1/event-sinks` (superadmin): where events go — webhooks and syslog
//! servers — and how their delivery stands. A webhook's signing secret is made
//! by the server and shown once; every change is audited.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_store::{SinkRow, SinkWrite, new_id, now_micros};
use serde_json::Value;

use crate::api::views::{EventSinkView, NewEventSink, json_of};
use crate::api::{created, list_json, no_content, page_of};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::events::{SECRET_CONTEXT, new_secret, syslog_target};
use crate::request::{Fields, JsonObject, QueryParams};
use crate::state::SharedState;
use crate::validate;

/// The longest target URL taken.
const MAX_TARGET: usize = 2048;
/// The most type prefixes a sink may name.
const MAX_TYPES: usize = 64;

fn view(row: &SinkRow) -> Value {
    json_of(&EventSinkView::from(row))
}

/// Where a webhook posts: an `http`/`https` URL with a host and without
/// credentials (they would show in listings; the signature authenticates).
fn webhook_target(target: &str) -> Result<(), String> {
    let uri: axum::http::Uri = target.parse().map_err(|_| "must be an http:// or https:// URL".to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must be an http:// or https:// URL".into()),
    }
    let authority = uri.authority().ok_or("must name a host")?;
    if authority.as_str().contains('@') {
        return Err("may not carry credentials (user:password@); the signature authenticates the server".into());
    }
    if authority.host().is_empty() {
        return Err("must name a host".into());
    }
    Ok(())
}

/// Reads a sink's fields over `base` (all required when there is none).
/// A sink's fields as read from a body: name, kind, target, event types, enabled, CA certificate.
type SinkFields = (String, String, String, Vec<String>, bool, Option<String>);

fn read(fields: &mut Fields, base: Option<&SinkRow>) -> Option<SinkFields> {
    let creating = base.is_none();
    let name = fields.string("name", creating).and_then(|name| match validate::name(&name, 128) {
        Ok(name) => Some(name),
        Err(message) => {
            fields.error("name", message);
            None
        }
    });
    let kind = fields.string("kind", creating);
    if let Some(kind) = &kind
        && kind != "webhook"
        && kind != "syslog"
    {
        fields.error("kind", "must be webhook or syslog");
    }
    let target = fields.string("target", creating);
    let types = fields.string_list("event_types");
    if let Some(types) = &types {
        if types.len() > MAX_TYPES {
            fields.error("event_types", format!("at most {MAX_TYPES} prefixes"));
        }
        if let Some(bad) =
            types.iter().find(|prefix| !prefix.starts_with("com.reachback.") || validate::plain_text(prefix, 128).is_err() || prefix.contains(' '))
        {
            fields.error("event_types", format!("{bad:?} is not a prefix of an event type (com.reachback.…)"));
        }
    }
    let enabled = fields.boolean("enabled");
    let ca_certificate = if fields.has("ca_certificate") {
        match fields.raw("ca_certificate") {
            Some(Value::Null) => Some(None),
            _ => fields.string("ca_certificate", false).map(Some),
        }
    } else {
        None
    };
    if let Some(Some(pem)) = &ca_certificate {
        use rustls::pki_types::pem::PemObject;
        let parsed: Result<Vec<_>, _> = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
        if pem.len() > 65_536 || !parsed.as_ref().is_ok_and(|certificates| !certificates.is_empty()) {
            fields.error("ca_certificate", "must be one or more PEM certificates");
        }
    }
    let kind = kind.or_else(|| base.map(|base| base.kind.clone())).unwrap_or_default();
    let target = target.or_else(|| base.map(|base| base.target.clone())).unwrap_or_default();
    if !target.is_empty() || creating {
        let checked = if target.len() > MAX_TARGET {
            Err(format!("must have at most {MAX_TARGET} characters"))
        } else {
            match kind.as_str() {
                "webhook" => webhook_target(&target),
                "syslog" => syslog_target(&target).map(|_| ()),
                _ => Ok(()),
            }
        };
        if let Err(message) = checked {
            fields.error("target", message);
        }
    }
    Some((
        name.or_else(|| base.map(|base| base.name.clone()))?,
        kind,
        target,
        types.or_else(|| base.map(|base| base.event_types.clone())).unwrap_or_default(),
        enabled.or(base.map(|base| base.enabled)).unwrap_or(true),
        match ca_certificate {
            Some(value) => value,
            None => base.and_then(|base| base.ca_certificate.clone()),
        },
    ))
}

fn store_error(error: reachback_store::StoreError) -> ApiError {
    ApiError::not_found_or(error, "event sink")
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size"])?;
    let paging = query.paging()?;
    let rows = state.store.list_sinks().await?;
    let total = rows.len() as i64;
    Ok(list_json(page_of(rows, paging).iter().map(view).collect(), total, paging))
}

pub async fn get(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let row = state.store.get_sink(&id).await.map_err(store_error)?;
    Ok(Json(view(&row)))
}

/// The sealed signing secret a webhook keeps (a new one when it had none).
fn sealed_secret(state: &SharedState, kind: &str, kept: Option<&str>) -> ApiResult<(Option<String>, Option<String>)> {
    if kind != "webhook" {
        return Ok((None, None));
    }
    if let Some(kept) = kept {
        return Ok((Some(kept.to_string()), None));
    }
    let secret = new_secret().map_err(ApiError::internal)?;
    let sealed = state.secret_key.seal(secret.as_bytes(), SECRET_CONTEXT).map_err(ApiError::internal)?;
    Ok((Some(sealed), Some(secret)))
}

pub async fn create(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    let mut fields = Fields::of::<crate::api::bodies::SinkBody>(body)?;
    let read = read(&mut fields, None);
    fields.finish()?;
    let (name, kind, target, event_types, enabled, ca_certificate) = read.ok_or_else(|| ApiError::invalid_field("name", "is required"))?;
    let (secret_sealed, secret) = sealed_secret(&state, &kind, None)?;
    let write = SinkWrite { name, kind, target, secret_sealed, ca_certificate, event_types, enabled };
    let id = new_id();
    let after = serde_json::json!({"name": write.name, "kind": write.kind, "target": write.target, "event_types": write.event_types, "enabled": write.enabled});
    let row = state.store.create_sink(&id, &write, now_micros(), caller.audit("create", "event_sink", &id, None, Some(after))).await?;
    tracing::info!(sink_id = %row.id, kind = %row.kind, "event sink added");
    Ok(created(json_of(&NewEventSink { sink: EventSinkView::from(&row), secret })))
}

pub async fn patch(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    caller.require(Role::Superadmin)?;
    let mut fields = Fields::of::<crate::api::bodies::SinkBody>(body)?;
    let before = state.store.get_sink(&id).await.map_err(store_error)?;
    let read = read(&mut fields, Some(&before));
    fields.finish()?;
    let (name, kind, target, event_types, enabled, ca_certificate) = read.ok_or_else(|| ApiError::invalid_field("name", "is required"))?;
    let (secret_sealed, secret) = sealed_secret(&state, &kind, before.secret_sealed.as_deref())?;
    let write = SinkWrite { name, kind, target, secret_sealed, ca_certificate, event_types, enabled };
    let after = serde_json::json!({"name": write.name, "kind": write.kind, "target": write.target, "event_types": write.event_types, "enabled": write.enabled});
    let audit = caller.audit("update", "event_sink", &id, Some(view(&before)), Some(after));
    let row = state.store.update_sink(&id, &write, now_micros(), audit).await.map_err(store_error)?;
    Ok(Json(json_of(&NewEventSink { sink: EventSinkView::from(&row), secret })))
}

pub async fn delete(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Superadmin)?;
    let before = state.store.get_sink(&id).await.map_err(store_error)?;
    state.store.delete_sink(&id, caller.audit("delete", "event_sink", &id, Some(view(&before)), None)).await.map_err(store_error)?;
    Ok(no_content())
}
