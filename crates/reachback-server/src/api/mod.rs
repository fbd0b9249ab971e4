//! The REST API under `/api/v1`: one module per resource, shared renderers here.

pub mod admin;
pub mod audit;
pub mod bindings;
pub mod bodies;
pub mod console;
pub mod dataplane;
pub mod devices;
pub mod enroll;
pub mod flows;
pub mod history;
pub mod keys;
pub mod ranges;
pub mod renew;
pub mod replicas;
pub mod sinks;
pub mod views;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use reachback_ipam::Location;
use serde_json::{Value, json};

use crate::request::Paging;

/// `City, State, Country`, absent parts left out.
pub fn location_text(location: &Option<Location>) -> String {
    match location {
        None => String::new(),
        Some(location) => [&location.city, &location.state, &location.country].iter().filter_map(|part| part.as_deref()).collect::<Vec<_>>().join(", "),
    }
}

/// The list envelope of API.md.
pub fn list_json(items: Vec<Value>, total: i64, paging: Paging) -> Json<Value> {
    Json(json!({"items": items, "total": total, "page": paging.page, "page_size": paging.page_size}))
}

/// Pages an in-memory list.
pub fn page_of<T>(items: Vec<T>, paging: Paging) -> Vec<T> {
    let offset = usize::try_from(paging.offset()).unwrap_or(usize::MAX);
    let size = usize::try_from(paging.page_size).unwrap_or(50);
    items.into_iter().skip(offset).take(size).collect()
}

pub fn created(value: Value) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// Neutralises a CSV cell a spreadsheet would evaluate as a formula.
pub fn csv_cell(value: &str) -> std::borrow::Cow<'_, str> {
    match value.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => std::borrow::Cow::Owned(format!("'{value}")),
        _ => std::borrow::Cow::Borrowed(value),
    }
}

/// Turns a stream of CSV records into a streamed `text/csv` response.
pub fn csv_response<S>(filename: &str, header: &[&str], records: S, filters: Option<String>) -> Response
where
    S: futures_util::Stream<Item = Result<Vec<String>, reachback_store::StoreError>> + Send + 'static,
{
    use futures_util::StreamExt;
    let header_line = {
        let mut writer = csv::Writer::from_writer(Vec::new());
        let _ = writer.write_record(header);
        writer.into_inner().unwrap_or_default()
    };
    let mut written = 0u64;
    let export = filename.to_string();
    // an error after the header was sent ends the body with an error: hyper then drops the
    // connection without the chunked terminator, so every HTTP client sees a failed
    // transfer, never a clean 200 end
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(header_line)) }).chain(records.ready_chunks(512).map(
        move |chunk| {
            let mut writer = csv::Writer::from_writer(Vec::with_capacity(chunk.len() * 128));
            for record in chunk {
                let record = record.map_err(|error| {
                    // the filters' names at ERROR; their values (usernames, hostnames) only at DEBUG
                    let names: Vec<&str> =
                        filters.as_deref().unwrap_or("").split('&').filter_map(|pair| pair.split('=').next()).filter(|name| !name.is_empty()).collect();
                    tracing::error!(%error, export = %export, filters = ?names, rows_sent = written, "export failed mid-stream; the response is aborted");
                    tracing::debug!(export = %export, query = filters.as_deref().unwrap_or(""), "the failed export's query");
                    std::io::Error::other("export failed")
                })?;
                written += 1;
                writer.write_record(record.iter().map(|cell| csv_cell(cell).into_owned())).map_err(std::io::Error::other)?;
            }
            writer.into_inner().map(bytes::Bytes::from).map_err(|error| std::io::Error::other(error.to_string()))
        },
    ));
    let mut response = axum::body::Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(value) = axum::http::HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(axum::http::header::CONTENT_DISPOSITION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_neutralised() {
        for (input, expected) in
            [("=1+1", "'=1+1"), ("+x", "'+x"), ("-2", "'-2"), ("@a", "'@a"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("alice", "alice"), ("", "")]
        {
            assert_eq!(csv_cell(input), expected);
        }
        let count = |n: u128| views::json_of(&views::Count::of(n));
        assert_eq!(count(254), json!(254));
        assert_eq!(count((1 << 53) - 1), json!(9007199254740991u64));
        assert_eq!(count(1 << 53), json!("9007199254740992"));
    }
}
