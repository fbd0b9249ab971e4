//! `/api/v1/ip-bindings/history`: who held which address when. The listing (one
//! row per interval an address was bound to a device), its streamed CSV export,
//! and the trace of one address at one instant (the holder, with the intervals
//! just before and after) that the console's Trace box and `ctl bindings trace` show.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use reachback_ipam::{address_key, join_address, parse_address};
use reachback_store::{HistoryQuery, HistoryRow, HistorySort, now_micros};
use serde_json::{Value, json};

use crate::api::bindings::ip_filter;
use crate::api::{csv_response, list_json};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::request::{Paging, QueryParams, format_time};
use crate::state::SharedState;

/// One interval as the API shows it: `bound_at` inclusive, `released_at` exclusive
/// (null while held), `reason` why it ended, `bound_reason` how it began.
pub fn history_json(row: &HistoryRow) -> Value {
    crate::api::views::json_of(&crate::api::views::HistoryView::from(row))
}

/// The filters of the listing and the export (the export takes no paging).
pub const FILTERS: &[&str] = &["ip", "at", "device_id", "username", "client_hostname", "from", "to", "sort"];
/// The query parameters of the listing.
pub const LIST_QUERY: &[&str] = &["page", "page_size", "sort", "ip", "at", "device_id", "username", "client_hostname", "from", "to"];
/// The query parameters of a trace.
pub const TRACE_QUERY: &[&str] = &["ip", "at"];
/// The orders the history offers.
pub const SORTS: &[&str] = &["bound_at", "released_at", "ip", "username", "client_hostname", "platform", "range_name", "device_id"];

/// The CSV export's columns, in order.
pub const CSV_HEADER: &[&str] =
    &["ip", "device_id", "username", "client_hostname", "platform", "range_name", "bound_at", "released_at", "reason", "bound_reason"];

/// A history query from the request's parameters; every bad value is a 400 naming
/// its parameter. Without `sort` the newest intervals come first.
fn history_query(query: &QueryParams, paging: Option<Paging>) -> ApiResult<HistoryQuery> {
    let (sort, descending) = query.sort(SORTS, "bound_at")?;
    let descending = descending || query.text("sort").is_none();
    let ip_keys = match query.text("ip") {
        None => None,
        Some(text) => Some(ip_filter(&text).ok_or_else(|| ApiError::bad_parameter("ip", format!("'ip' must be an address or a CIDR, got '{text}'")))?),
    };
    let (from, to) = (query.timestamp("from")?, query.timestamp("to")?);
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::bad_parameter("from", "'from' must not be after 'to'"));
    }
    Ok(HistoryQuery {
        ip_keys,
        at: query.timestamp("at")?,
        device_id: query.text("device_id"),
        username: query.text("username"),
        client_hostname: query.text("client_hostname"),
        from,
        to,
        sort: match sort {
            "released_at" => HistorySort::ReleasedAt,
            "ip" => HistorySort::Ip,
            "username" => HistorySort::Username,
            "client_hostname" => HistorySort::ClientHostname,
            "platform" => HistorySort::Platform,
            "range_name" => HistorySort::RangeName,
            "device_id" => HistorySort::DeviceId,
            _ => HistorySort::BoundAt,
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
    let history_query = history_query(&query, Some(paging))?;
    let total = state.store.count_history(&history_query).await?;
    // a page past the end is empty without a query
    let rows = if history_query.offset >= total { Vec::new() } else { state.store.history_page(&history_query).await? };
    Ok(list_json(rows.iter().map(history_json).collect(), total, paging))
}

pub async fn export(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), FILTERS)?;
    let history_query = history_query(&query, None)?;
    let limit = state.settings().export_limit;
    // counted before the first byte: an export over the limit is refused whole
    let matching = state.store.count_history(&history_query).await?;
    if matching > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Export too large",
            format!("{matching} history rows match, more than the export limit of {limit}; narrow the export with filters (ip, at, from, to, username, …)"),
        )
        .with("export", json!({"export_limit": limit, "matching": matching})));
    }
    let records = state.store.stream_history(&history_query).map(|row| {
        row.map(|row| {
            vec![
                row.ip,
                row.device_id,
                row.username,
                row.client_hostname,
                row.platform,
                row.range_name,
                format_time(row.bound_at),
                row.released_at.map(format_time).unwrap_or_default(),
                row.reason.unwrap_or_default(),
                row.bound_reason,
            ]
        })
    });
    Ok(csv_response("ip-binding-history.csv", CSV_HEADER, records, raw))
}

/// `GET …/history/trace?ip=ADDRESS&at=TIME`: the interval holding the address at
/// that instant (`at` absent: now), or null, with the one before and the one after.
pub async fn trace(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), TRACE_QUERY)?;
    let Some(text) = query.text("ip") else {
        return Err(ApiError::bad_parameter("ip", "'ip' is required: the address to trace"));
    };
    let (family, value) = parse_address(&text).ok_or_else(|| ApiError::bad_parameter("ip", format!("'ip' must be one IP address (no CIDR), got '{text}'")))?;
    let at = query.timestamp("at")?.unwrap_or_else(now_micros);
    let trace = state.store.trace_address(&address_key(family, value), at).await?;
    let render = |row: &Option<HistoryRow>| row.as_ref().map(crate::api::views::HistoryView::from);
    Ok(Json(crate::api::views::json_of(&crate::api::views::Trace {
        ip: join_address(family, value).to_string(),
        at: crate::api::views::Timestamp::at(at),
        holder: render(&trace.holder),
        previous: render(&trace.previous),
        next: render(&trace.next),
    })))
}
