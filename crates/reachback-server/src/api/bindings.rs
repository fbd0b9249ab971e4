//! `/api/v1/ip-bindings`: list, get, release, and the streamed CSV export.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use reachback_ipam::{Family, address_key, parse_address, split_address};
use reachback_store::{BindingQuery, BindingRow, BindingSort};
use serde_json::{Value, json};

use crate::api::{csv_response, list_json, location_text, no_content};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::request::{Paging, QueryParams, format_time};
use crate::state::SharedState;

pub fn binding_json(row: &BindingRow) -> Value {
    crate::api::views::json_of(&crate::api::views::BindingView::from(row))
}

const FILTERS: &[&str] = &["ip", "range_name", "range_location", "username", "platform", "client_hostname", "updated_after", "updated_before", "sort"];
/// The orders the binding listing and export offer.
pub const SORTS: &[&str] = &["ip", "username", "platform", "client_hostname", "range_name", "last_updated"];

/// Key bounds of an address or CIDR (host bits are ignored).
pub fn ip_filter(text: &str) -> Option<([u8; 17], [u8; 17])> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
        None => (text, None),
    };
    let (family, value) = split_address(address.trim().parse().ok()?);
    let width = match family {
        Family::V4 => 32u32,
        Family::V6 => 128,
    };
    let prefix = u32::from(prefix.unwrap_or(width as u8));
    if prefix > width {
        return None;
    }
    let host_bits = width - prefix;
    let mask = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    Some((address_key(family, value & !mask), address_key(family, value | mask)))
}

fn binding_query(query: &QueryParams, paging: Option<Paging>) -> ApiResult<BindingQuery> {
    let (sort, descending) = query.sort(SORTS, "ip")?;
    let ip_keys = match query.value("ip")? {
        None => None,
        Some(text) => Some(ip_filter(&text).ok_or_else(|| ApiError::bad_request(format!("'ip' must be an address or a CIDR, got '{text}'")))?),
    };
    Ok(BindingQuery {
        ip_keys,
        range_name: query.text("range_name"),
        range_location: query.text("range_location"),
        username: query.text("username"),
        platform: query.text("platform"),
        // enrollment refuses any other platform, and it is the only writer of the column
        known_platforms: Some(crate::validate::PLATFORMS),
        client_hostname: query.text("client_hostname"),
        updated_after: query.timestamp("updated_after")?,
        updated_before: query.timestamp("updated_before")?,
        sort: match sort {
            "username" => BindingSort::Username,
            "platform" => BindingSort::Platform,
            "client_hostname" => BindingSort::ClientHostname,
            "range_name" => BindingSort::RangeName,
            "last_updated" => BindingSort::LastUpdated,
            _ => BindingSort::Ip,
        },
        descending,
        offset: paging.map_or(0, |paging| paging.offset()),
        limit: paging.map_or(0, |paging| paging.page_size),
    })
}

pub async fn list(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let allowed: Vec<&str> = FILTERS.iter().copied().chain(["page", "page_size"]).collect();
    let query = QueryParams::parse(raw.as_deref(), &allowed)?;
    let paging = query.paging()?;
    let binding_query = binding_query(&query, Some(paging))?;
    // the in-memory index once it has loaded (issue 23); the SQL paths below until then
    if let Some((total, rows)) = state.store.indexed_page(&binding_query).await? {
        return Ok(list_json(rows.iter().map(binding_json).collect(), total, paging));
    }
    let total = state.store.count_bindings(&binding_query).await?;
    let rows = match seek(&state, &binding_query).await? {
        Some(Seek::PastTheEnd) => Vec::new(),
        Some(Seek::From { ranges, key }) => {
            // the page, range by range from where it starts: each read is one index range
            let mut rows = Vec::new();
            let mut from = key;
            for range in ranges {
                let wanted = binding_query.limit - rows.len() as i64;
                rows.extend(state.store.range_page(&range.id, from, binding_query.descending, wanted).await?);
                if rows.len() as i64 >= binding_query.limit {
                    break;
                }
                from = if binding_query.descending { [0xff; 17] } else { [0; 17] };
            }
            rows
        }
        None => state.store.binding_page_within(&binding_query, total).await?,
    };
    Ok(list_json(rows.iter().map(binding_json).collect(), total, paging))
}

/// Where a page in address or range-name order starts.
enum Seek {
    /// at `key` in the first of `ranges` (the matching ranges from there on, in page order)
    From {
        ranges: Vec<reachback_store::RangeRow>,
        key: [u8; 17],
    },
    PastTheEnd,
}

/// Deep pages in address order without skipping every row before them: the ranges
/// do not overlap, so the page starts in the range where the running total of bound
/// addresses passes the offset, at the n-th bound address of that range, and the
/// query seeks to it. Range-name order is the same walk with the ranges taken by
/// name (within a range, rows follow in address order), from the first page on:
/// no index holds that order, so anything else sorts every row. On SQLite (one
/// server process, so the engine's view equals the committed rows once its lock is
/// held) the engine counts and names that
/// address in memory; on PostgreSQL (replicas' engines may lag one another) the
/// ranges' counters, kept in the same transactions as the rows, count, and the
/// primary key between the range's first and last keys names it (skipping at most
/// that range's rows).
async fn seek(state: &SharedState, query: &BindingQuery) -> ApiResult<Option<Seek>> {
    const SEEK_FROM: i64 = 200;
    let seeks = match query.sort {
        BindingSort::Ip => query.offset >= SEEK_FROM,
        BindingSort::RangeName => true,
        _ => false,
    };
    if !seeks || !query.only_range_filters() {
        return Ok(None);
    }
    // in name order, as the database collates names
    let mut ranges = match state.store.matching_range_ids(query).await? {
        Some(ranges) => ranges,
        None => state.store.list_ranges().await?,
    };
    if query.sort == BindingSort::Ip {
        ranges.sort_by_key(|range| (range.range.family(), range.range.first()));
    }
    if query.descending {
        ranges.reverse();
    }
    let offset = u128::try_from(query.offset).unwrap_or(0);
    let (first, key) = if state.store.backend() == reachback_store::Backend::Sqlite {
        // only SQLite counts with the engine: on PostgreSQL its lock (held by enrollment batches) is not needed
        let range_ids: Vec<&str> = ranges.iter().map(|range| range.id.as_str()).collect();
        let Some((first, value)) = state.allocation.nth_bound_across(&range_ids, offset, query.descending).await else {
            return Ok(Some(Seek::PastTheEnd));
        };
        (first, value.map(|value| address_key(ranges[first].range.family(), value)))
    } else {
        let used = ranges.iter().map(|range| u128::try_from(range.used_ips).unwrap_or(0));
        let Some((first, remaining)) = crate::allocation::position(used, offset) else {
            return Ok(Some(Seek::PastTheEnd));
        };
        // None: the counter ran ahead of the rows this statement saw (a write in between)
        let key = state.store.nth_bound_key(&ranges[first].id, i64::try_from(remaining).unwrap_or(i64::MAX), query.descending).await?;
        (first, key)
    };
    Ok(key.map(|key| Seek::From { ranges: ranges.split_off(first), key }))
}

fn address_param(ip: &str) -> ApiResult<[u8; 17]> {
    let (family, value) = parse_address(ip).ok_or_else(|| ApiError::bad_request(format!("'{ip}' is not an IP address")))?;
    Ok(address_key(family, value))
}

pub async fn get(State(state): State<SharedState>, caller: Caller, Path(ip): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let key = address_param(&ip)?;
    let row = state.store.get_binding(&key).await.map_err(|error| ApiError::not_found_or(error, "IP binding"))?;
    Ok(Json(binding_json(&row)))
}

pub async fn release(State(state): State<SharedState>, caller: Caller, Path(ip): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let key = address_param(&ip)?;
    let row = state
        .allocation
        .release_binding(&key, |row| caller.audit("release", "ip_binding", &row.ip, Some(binding_json(row)), None))
        .await
        .map_err(|error| ApiError::not_found_or(error, "IP binding"))?;
    // the device's tunnel ends; at its next connect it gets a new address
    state.broker.kick_device(&row.device_id);
    Ok(no_content())
}

pub async fn export(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), FILTERS)?;
    let binding_query = binding_query(&query, None)?;
    let limit = state.settings().export_limit;
    // address order over whole ranges (no filter, or range name and location only): the
    // database streams the primary key in that order (~500,000 rows/s against the
    // index's ~350,000, its first byte at once) and the ranges' counters count it
    let key_order = binding_query.sort == BindingSort::Ip && binding_query.only_range_filters();
    let indexed = if key_order { None } else { state.store.indexed_export(&binding_query).await? };
    let matching = match &indexed {
        Some((matching, _)) => *matching,
        None => state.store.count_bindings(&binding_query).await?,
    };
    if matching > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Export too large",
            format!("{matching} bindings match, more than the export limit of {limit}; narrow the export with filters (range_name, ip, username, …)"),
        )
        .with("export", json!({"export_limit": limit, "matching": matching})));
    }
    let rows = match indexed {
        Some((_, rows)) => rows,
        None => state.store.stream_bindings(&binding_query).await?,
    };
    let records = rows.map(|row| {
        row.map(|row| {
            vec![row.ip, row.range_name, location_text(&row.range_location), row.username, row.platform, row.client_hostname, format_time(row.last_updated)]
        })
    });
    Ok(csv_response("ip-bindings.csv", &["ip", "range_name", "range_location", "username", "platform", "client_hostname", "last_updated"], records, raw))
}
