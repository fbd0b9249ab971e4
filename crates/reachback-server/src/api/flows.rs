//! `/api/v1/flows`: the flow log — which server reached which virtual address and
//! port through which connector, who held the address then, the verdict and the
//! bytes each way. The listing (newest first) and its streamed CSV export, with
//! the binding history's shapes of filters, order, paging and export limit.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use reachback_store::{FlowProtocol, FlowQuery, FlowSort, FlowVerdict};
use serde_json::{Value, json};

use crate::api::bindings::ip_filter;
use crate::api::{csv_response, list_json};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::request::{Paging, QueryParams, format_time};
use crate::state::SharedState;

/// The filters of the listing and the export (the export takes no paging).
pub const FILTERS: &[&str] =
    &["sort", "device_id", "username", "client_hostname", "virtual_ip", "server_ip", "connector_id", "verdict", "protocol", "from", "to"];
/// The query parameters of the listing.
pub const LIST_QUERY: &[&str] =
    &["page", "page_size", "sort", "device_id", "username", "client_hostname", "virtual_ip", "server_ip", "connector_id", "verdict", "protocol", "from", "to"];
/// The orders the flow log offers.
pub const SORTS: &[&str] = &[
    "started_at",
    "ended_at",
    "virtual_ip",
    "server_ip",
    "username",
    "client_hostname",
    "verdict",
    "protocol",
    "connector_name",
    "bytes",
    "bytes_to_client",
    "bytes_from_client",
];

/// The CSV export's columns, in order.
pub const CSV_HEADER: &[&str] = &[
    "started_at",
    "ended_at",
    "protocol",
    "verdict",
    "reason",
    "policy_name",
    "connector_name",
    "server_ip",
    "server_port",
    "virtual_ip",
    "virtual_port",
    "device_id",
    "username",
    "client_hostname",
    "platform",
    "socks_user",
    "bytes_to_client",
    "bytes_from_client",
    "node_name",
    "policy_id",
    "connector_id",
];

/// An address or CIDR filter: its inclusive key bounds, or a 400 naming the parameter.
fn address_filter(query: &QueryParams, name: &str) -> ApiResult<Option<([u8; 17], [u8; 17])>> {
    match query.value(name)? {
        None => Ok(None),
        Some(text) => ip_filter(&text).map(Some).ok_or_else(|| ApiError::bad_parameter(name, format!("'{name}' must be an address or a CIDR, got '{text}'"))),
    }
}

/// A flow query from the request's parameters; every bad value is a 400 naming its
/// parameter. Without `sort` the newest flows come first.
fn flow_query(query: &QueryParams, paging: Option<Paging>) -> ApiResult<FlowQuery> {
    let (sort, descending) = query.sort(SORTS, "started_at")?;
    let descending = descending || query.text("sort").is_none();
    let (from, to) = (query.timestamp("from")?, query.timestamp("to")?);
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::bad_parameter("from", "'from' must not be after 'to'"));
    }
    let verdict = match query.value("verdict")? {
        None => None,
        Some(text) => Some(FlowVerdict::parse(&text).ok_or_else(|| {
            let names: Vec<&str> = FlowVerdict::ALL.iter().map(|verdict| verdict.as_str()).collect();
            ApiError::bad_parameter("verdict", format!("'verdict' must be one of: {}; got '{text}'", names.join(", ")))
        })?),
    };
    let protocol = match query.value("protocol")? {
        None => None,
        Some(text) => {
            Some(FlowProtocol::parse(&text).ok_or_else(|| ApiError::bad_parameter("protocol", format!("'protocol' must be tcp or udp, got '{text}'")))?)
        }
    };
    Ok(FlowQuery {
        virtual_keys: address_filter(query, "virtual_ip")?,
        server_keys: address_filter(query, "server_ip")?,
        device_id: query.text("device_id"),
        connector_id: query.text("connector_id"),
        username: query.text("username"),
        client_hostname: query.text("client_hostname"),
        verdict,
        protocol,
        from,
        to,
        sort: match sort {
            "ended_at" => FlowSort::EndedAt,
            "virtual_ip" => FlowSort::VirtualIp,
            "server_ip" => FlowSort::ServerIp,
            "username" => FlowSort::Username,
            "client_hostname" => FlowSort::ClientHostname,
            "verdict" => FlowSort::Verdict,
            "protocol" => FlowSort::Protocol,
            "connector_name" => FlowSort::ConnectorName,
            "bytes" => FlowSort::Bytes,
            "bytes_to_client" => FlowSort::BytesToClient,
            "bytes_from_client" => FlowSort::BytesFromClient,
            _ => FlowSort::StartedAt,
        },
        descending,
        offset: paging.map_or(0, |paging| paging.offset()),
        limit: paging.map_or(0, |paging| paging.page_size),
    })
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), LIST_QUERY)?;
    let paging = query.paging()?;
    let flow_query = flow_query(&query, Some(paging))?;
    let total = state.store.count_flows(&flow_query).await?;
    // a page past the end is empty without a query
    let rows = if flow_query.offset >= total { Vec::new() } else { state.store.flow_page(&flow_query).await? };
    Ok(list_json(rows.iter().map(|row| crate::api::views::json_of(&crate::api::views::FlowView::from(row))).collect(), total, paging))
}

pub async fn export(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), FILTERS)?;
    let flow_query = flow_query(&query, None)?;
    let limit = state.settings().export_limit;
    // counted before the first byte: an export over the limit is refused whole
    let matching = state.store.count_flows(&flow_query).await?;
    if matching > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Export too large",
            format!(
                "{matching} flows match, more than the export limit of {limit}; narrow the export with filters (from, to, virtual_ip, device_id, verdict, …)"
            ),
        )
        .with("export", json!({"export_limit": limit, "matching": matching})));
    }
    let records = state.store.stream_flows(&flow_query).map(|row| {
        row.map(|row| {
            vec![
                format_time(row.started_at),
                format_time(row.ended_at),
                row.protocol,
                row.verdict,
                row.reason.unwrap_or_default(),
                row.policy_name.unwrap_or_default(),
                row.connector_name,
                row.server_ip,
                row.server_port.to_string(),
                row.virtual_ip,
                row.virtual_port.to_string(),
                row.device_id.unwrap_or_default(),
                row.username.unwrap_or_default(),
                row.client_hostname.unwrap_or_default(),
                row.platform.unwrap_or_default(),
                row.socks_user.unwrap_or_default(),
                row.bytes_to_client.to_string(),
                row.bytes_from_client.to_string(),
                row.node_name,
                row.policy_id.unwrap_or_default(),
                row.connector_id,
            ]
        })
    });
    Ok(csv_response("flow-log.csv", CSV_HEADER, records, raw))
}
