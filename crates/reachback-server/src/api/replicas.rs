//! `/api/v1/replicas`: the server replicas sharing the database (issue 21).

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::Value;

use crate::api::views::{ReplicaStatus, ReplicaView, Timestamp, json_of};
use crate::api::{list_json, page_of};
use crate::auth::{Caller, Role};
use crate::error::ApiResult;
use crate::replicas::{DEAD_AFTER, micros};
use crate::request::QueryParams;
use crate::state::SharedState;

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size"])?;
    let paging = query.paging()?;
    let items: Vec<Value> = state
        .store
        .list_replicas(micros(DEAD_AFTER))
        .await?
        .into_iter()
        .map(|row| {
            json_of(&ReplicaView {
                node_name: row.node_name,
                tunnel_endpoint: row.tunnel_endpoint,
                started_at: Timestamp::at(row.started_at),
                last_heartbeat: Timestamp::at(row.last_heartbeat),
                status: if row.alive { ReplicaStatus::Alive } else { ReplicaStatus::Dead },
                client_sessions: row.client_sessions,
                connectors: row.connectors,
                flows: row.flows,
            })
        })
        .collect();
    let total = items.len() as i64;
    Ok(list_json(page_of(items, paging), total, paging))
}
