//! `/api/v1/audit-logs`: every change, filterable, and its CSV export.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use futures_util::StreamExt;
use reachback_store::{AuditQuery, AuditRow};
use serde_json::Value;

use crate::api::{csv_response, list_json};
use crate::auth::{Caller, Role};
use crate::error::ApiResult;
use crate::request::{QueryParams, format_time};
use crate::state::SharedState;

fn audit_json(row: &AuditRow) -> Value {
    crate::api::views::json_of(&crate::api::views::AuditEntry::from(row))
}

const FILTERS: &[&str] = &["actor", "action", "resource_type", "after", "before", "sort"];

fn audit_query(query: &QueryParams) -> ApiResult<AuditQuery> {
    let (_, descending) = query.sort(SORTS, "at")?;
    let explicit = query.text("sort").is_some();
    Ok(AuditQuery {
        actor: query.text("actor"),
        action: query.text("action"),
        resource_type: query.text("resource_type"),
        after: query.timestamp("after")?,
        before: query.timestamp("before")?,
        // newest first unless `sort=at` asks for oldest first
        ascending: explicit && !descending,
        offset: 0,
        limit: 0,
    })
}

/// The orders the audit log offers.
pub const SORTS: &[&str] = &["at"];

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let allowed: Vec<&str> = FILTERS.iter().copied().chain(["page", "page_size"]).collect();
    let query = QueryParams::parse(raw.as_deref(), &allowed)?;
    let paging = query.paging()?;
    let audit_query = AuditQuery { offset: paging.offset(), limit: paging.page_size, ..audit_query(&query)? };
    let (rows, total) = state.store.list_audit(&audit_query).await?;
    Ok(list_json(rows.iter().map(audit_json).collect(), total, paging))
}

pub async fn export(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), FILTERS)?;
    let rows = state.store.stream_audit(&audit_query(&query)?);
    let records = rows.map(|row| {
        row.map(|row| {
            let json_text = |value: &Option<Value>| value.as_ref().map(Value::to_string).unwrap_or_default();
            vec![
                row.id.clone(),
                format_time(row.at),
                row.actor.clone(),
                row.action.clone(),
                row.resource_type.clone(),
                row.resource_id.clone(),
                row.source_ip.clone().unwrap_or_default(),
                json_text(&row.before),
                json_text(&row.after),
            ]
        })
    });
    Ok(csv_response("audit-log.csv", &["id", "at", "actor", "action", "resource_type", "resource_id", "source_ip", "before", "after"], records, raw))
}
