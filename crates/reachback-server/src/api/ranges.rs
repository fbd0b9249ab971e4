//! `/api/v1/ip-ranges`: create, list, get, edit, enable, disable, delete.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_ipam::AddressRange;
use reachback_store::{RangeRow, RangeWrite, new_id};
use serde_json::{Value, json};

use crate::api::{created, list_json, no_content, page_of};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject, QueryParams};
use crate::state::SharedState;
use crate::validate;

/// The orders the range listing offers.
pub const SORTS: &[&str] = &["name", "status", "range", "used_ips", "total_ips", "created_at"];

pub fn range_json(row: &RangeRow) -> Value {
    crate::api::views::json_of(&crate::api::views::RangeView::from(row))
}

/// Reads the writable fields over `base` (all required when there is no base).
fn read_write(mut fields: Fields, base: Option<&RangeRow>) -> ApiResult<RangeWrite> {
    let creating = base.is_none();
    let name = fields.string("name", creating).map(|name| match validate::name(&name, 128) {
        Ok(name) => name,
        Err(message) => {
            fields.error("name", message);
            name
        }
    });
    let description = fields.string("description", false);
    if let Some(description) = &description
        && description.chars().count() > 1024
    {
        fields.error("description", "must have at most 1024 characters");
    }
    let range_text = fields.string("range", creating);
    let range = match range_text.as_deref().map(AddressRange::parse) {
        Some(Ok(range)) => Some(range),
        Some(Err(error)) => {
            fields.error("range", error.to_string());
            None
        }
        None => None,
    };
    let location = fields.location("location");
    let enabled = fields.boolean("enabled");
    fields.finish()?;
    let write = match base {
        None => RangeWrite {
            name: name.unwrap_or_default(),
            description: description.unwrap_or_default(),
            range: range.ok_or_else(|| ApiError::invalid_field("range", "is required"))?,
            location: location.flatten(),
            enabled: enabled.unwrap_or(true),
        },
        Some(base) => RangeWrite {
            name: name.unwrap_or_else(|| base.name.clone()),
            description: description.unwrap_or_else(|| base.description.clone()),
            range: range.unwrap_or(base.range),
            location: location.unwrap_or_else(|| base.location.clone()),
            enabled: enabled.unwrap_or(base.enabled),
        },
    };
    Ok(write)
}

fn overlap_error(error: reachback_store::StoreError) -> ApiError {
    let mut api_error = ApiError::from(error);
    if api_error.status == axum::http::StatusCode::CONFLICT {
        let field = if api_error.detail.contains("overlaps") || api_error.detail.contains("outside") { "range" } else { "name" };
        api_error.errors = vec![crate::error::FieldError { field: field.into(), message: api_error.detail.clone() }];
    }
    api_error
}

pub async fn create(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let write = read_write(Fields::of::<crate::api::bodies::RangeBody>(body)?, None)?;
    let id = new_id();
    let row = state
        .allocation
        .create_range(&id, &write, caller.audit("create", "ip_range", &id, None, Some(json!({"name": write.name, "range": write.range.to_string(), "enabled": write.enabled, "location": crate::api::views::json_of(&crate::api::views::LocationView::of(&write.location)), "description": write.description}))))
        .await
        .map_err(overlap_error)?;
    Ok(created(range_json(&row)))
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "sort", "name", "range", "city", "state", "country", "status"])?;
    let paging = query.paging()?;
    let (sort, descending) = query.sort(SORTS, "name")?;
    let status = match query.value("status")?.as_deref() {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => return Err(ApiError::bad_request(format!("'status' must be enabled or disabled, got '{other}'"))),
    };
    let contains = |value: Option<&str>, needle: &Option<String>| {
        needle.as_ref().is_none_or(|needle| value.is_some_and(|value| value.to_lowercase().contains(&needle.to_lowercase())))
    };
    let range_filter = query.text("range");
    let address = range_filter.as_deref().and_then(|text| text.parse::<std::net::IpAddr>().ok());
    let (city, region, country, name) = (query.text("city"), query.text("state"), query.text("country"), query.text("name"));
    let mut rows: Vec<RangeRow> = state
        .store
        .list_ranges()
        .await?
        .into_iter()
        .filter(|row| contains(Some(&row.name), &name))
        .filter(|row| match (address, &range_filter) {
            (Some(address), _) => row.range.contains(address),
            (None, filter) => contains(Some(&row.range.to_string()), filter),
        })
        .filter(|row| contains(row.location.as_ref().and_then(|l| l.city.as_deref()), &city))
        .filter(|row| contains(row.location.as_ref().and_then(|l| l.state.as_deref()), &region))
        .filter(|row| contains(row.location.as_ref().and_then(|l| l.country.as_deref()), &country))
        .filter(|row| status.is_none_or(|enabled| row.enabled == enabled))
        .collect();
    let by_name = |a: &RangeRow, b: &RangeRow| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.id.cmp(&b.id));
    rows.sort_by(|a, b| {
        let order = match sort {
            "status" => b.enabled.cmp(&a.enabled),
            "range" => (a.range.family(), a.range.first()).cmp(&(b.range.family(), b.range.first())),
            "used_ips" => a.used_ips.cmp(&b.used_ips),
            "total_ips" => a.range.total().cmp(&b.range.total()),
            "created_at" => a.created_at.cmp(&b.created_at),
            _ => std::cmp::Ordering::Equal,
        };
        let order = if descending { order.reverse() } else { order };
        let tie = by_name(a, b);
        if sort == "name" { if descending { tie.reverse() } else { tie } } else { order.then(tie) }
    });
    let total = rows.len() as i64;
    let items = page_of(rows, paging).iter().map(range_json).collect();
    Ok(list_json(items, total, paging))
}

pub async fn get(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let row = state.store.get_range(&id).await.map_err(|error| ApiError::not_found_or(error, "IP range"))?;
    Ok(Json(range_json(&row)))
}

async fn apply(state: &SharedState, caller: &Caller, id: &str, action: &str, build: impl FnOnce(&RangeRow) -> ApiResult<RangeWrite>) -> ApiResult<Json<Value>> {
    let current = state.store.get_range(id).await.map_err(|error| ApiError::not_found_or(error, "IP range"))?;
    let write = build(&current)?;
    let before_json = range_json(&current);
    let (_, after) = state
        .allocation
        .update_range(id, &write, |after| caller.audit(action, "ip_range", id, Some(before_json.clone()), Some(range_json(after))))
        .await
        .map_err(|error| match error {
            reachback_store::StoreError::NotFound => ApiError::not_found("IP range"),
            other => overlap_error(other),
        })?;
    Ok(Json(range_json(&after)))
}

pub async fn patch(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let fields = Fields::of::<crate::api::bodies::RangeBody>(body)?;
    apply(&state, &caller, &id, "update", move |current| read_write(fields, Some(current))).await
}

pub async fn enable(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_enabled(state, caller, id, true).await
}

pub async fn disable(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_enabled(state, caller, id, false).await
}

async fn set_enabled(state: SharedState, caller: Caller, id: String, enabled: bool) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let action = if enabled { "enable" } else { "disable" };
    apply(&state, &caller, &id, action, |current| {
        Ok(RangeWrite {
            name: current.name.clone(),
            description: current.description.clone(),
            range: current.range,
            location: current.location.clone(),
            enabled,
        })
    })
    .await
}

pub async fn delete(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let query = QueryParams::parse(raw.as_deref(), &["force"])?;
    let force = query.flag("force")?;
    let (_, released) = state
        .allocation
        .delete_range(&id, force, |row, released| {
            caller.audit(
                if released > 0 { "force_delete" } else { "delete" },
                "ip_range",
                &id,
                Some(range_json(row)),
                Some(json!({"released_bindings": released})),
            )
        })
        .await
        .map_err(|error| ApiError::not_found_or(error, "IP range"))?;
    if released > 0 {
        // agents that held addresses of the range reconnect and get new ones
        state.broker.kick_range(&id);
    }
    tracing::info!(range_id = %id, released, "range deleted");
    Ok(no_content())
}
