//! `/api/v1/devices`: enrolled agents; deleting one revokes it and releases its address.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_store::{DeviceQuery, DeviceRow, DeviceSort, ReleaseReason};
use serde_json::Value;

use crate::api::{list_json, no_content};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::request::QueryParams;
use crate::state::SharedState;

/// The orders the device listing offers.
pub const SORTS: &[&str] = &["hostname", "username", "last_seen"];

pub fn device_json(row: &DeviceRow) -> Value {
    crate::api::views::json_of(&crate::api::views::DeviceView::from(row))
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "sort", "hostname", "username", "platform"])?;
    let paging = query.paging()?;
    let (sort, descending) = query.sort(SORTS, "hostname")?;
    let device_query = DeviceQuery {
        hostname: query.text("hostname"),
        username: query.text("username"),
        platform: query.text("platform"),
        sort: match sort {
            "username" => DeviceSort::Username,
            "last_seen" => DeviceSort::LastSeen,
            _ => DeviceSort::Hostname,
        },
        descending,
        offset: paging.offset(),
        limit: paging.page_size,
    };
    let (rows, total) = state.store.list_devices(&device_query).await?;
    Ok(list_json(rows.iter().map(device_json).collect(), total, paging))
}

pub async fn get(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let row = state.store.get_device(&id).await.map_err(|error| ApiError::not_found_or(error, "device"))?;
    Ok(Json(device_json(&row)))
}

pub async fn delete(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    remove(&state, &id, ReleaseReason::DeviceDeleted, |row| caller.audit("delete", "device", &id, Some(device_json(row)), None)).await?;
    Ok(no_content())
}

/// Deletes a device (its binding released, its certificate revoked) with `audit`, and
/// ends its live tunnel: an admin's delete, or the device's own leave (`reason` says
/// which, in the binding's history).
pub async fn remove(
    state: &SharedState,
    id: &str,
    reason: ReleaseReason,
    audit: impl FnOnce(&reachback_store::DeviceRow) -> reachback_store::AuditEntry,
) -> ApiResult<()> {
    state.allocation.delete_device(id, reason, audit).await.map_err(|error| ApiError::not_found_or(error, "device"))?;
    // its certificate no longer opens a tunnel; the live one ends now
    state.broker.kick_device(id);
    Ok(())
}
