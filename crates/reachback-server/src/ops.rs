//! Operations endpoints: health, readiness, Prometheus metrics, the OpenAPI document,
//! and the HTTP metrics middleware.

use std::time::Instant;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::request::{BodyField, Kind};
use crate::state::SharedState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<SharedState>) -> Response {
    if state.store.ping().await {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "database unreachable"}))).into_response()
    }
}

/// A handler that has not produced its response head within the request timeout is
/// answered 503 (a streamed body, such as an export, may take longer once started).
pub async fn request_timeout(State(state): State<SharedState>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let limit = state.config.http_limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout_s = limit.as_secs(), "a request took too long and was cut off");
            crate::error::ApiError::unavailable(format!("the request took longer than {} s", limit.as_secs())).into_response()
        }
    }
}

/// The internal CA's certificate and pin, and the API's addresses: public facts, so
/// no authentication (a client that fetched them over an unverified channel learns
/// nothing it could trust; `ctl` reads them over a verified one to print enrollment commands).
pub async fn ca(State(state): State<SharedState>, headers: axum::http::HeaderMap) -> Response {
    let pin = match state.ca.pin() {
        Ok(pin) => pin,
        Err(error) => return crate::error::ApiError::internal(error).into_response(),
    };
    let scheme = if crate::serve::api_certificate(&state.config).is_some() { "https" } else { "http" };
    let port = state.config.listen.port();
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).and_then(crate::state::host_of);
    let mut names: Vec<String> = Vec::new();
    if let Some(host) = host {
        names.push(host);
    }
    if !state.config.api_names.is_empty() {
        names.extend(state.config.api_names.iter().cloned());
    } else if state.config.listen.ip().is_unspecified() {
        names.push(crate::state::local_host_name());
    } else {
        names.push(state.config.listen.ip().to_string());
    }
    let mut urls: Vec<String> = Vec::new();
    for name in names {
        let host = if name.contains(':') { format!("[{name}]") } else { name };
        let url = format!("{scheme}://{host}:{port}");
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Json(json!({"certificate": state.ca.certificate_pem, "pin": pin, "api_urls": urls})).into_response()
}

/// `GET /metrics`: open, unless the server was given a metrics token, which the
/// scraper must then send as `Authorization: Bearer <token>` (compared in constant time).
pub async fn metrics(State(state): State<SharedState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(expected) = &state.config.security.metrics_token {
        let sent = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(|value| value.strip_prefix("Bearer ")).map(str::trim);
        if !sent.is_some_and(|sent| crate::crypto::secrets_equal(sent, expected)) {
            let mut response = crate::error::ApiError::unauthorized("this server's metrics need 'Authorization: Bearer <metrics token>'").into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    if let Ok(ranges) = state.store.list_ranges().await {
        state.metrics.range_used.clear();
        state.metrics.range_total.clear();
        let mut bound = 0i64;
        for range in &ranges {
            let labels = vec![("range_id".to_string(), range.id.clone()), ("range".to_string(), range.name.clone())];
            state.metrics.range_used.get_or_create(&labels).set(range.used_ips);
            state.metrics.range_total.get_or_create(&labels).set(range.range.total() as f64);
            bound += range.used_ips;
        }
        state.metrics.bindings.set(bound);
    }
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry) {
        return crate::error::ApiError::internal(error).into_response();
    }
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    response
}

/// Counts requests and their latency by method, route template and status.
pub async fn track(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    state.metrics.http_requests.get_or_create(&vec![("method".into(), method.clone()), ("route".into(), route.clone()), ("status".into(), status)]).inc();
    state.metrics.http_duration.get_or_create(&vec![("method".into(), method), ("route".into(), route)]).observe(started.elapsed().as_secs_f64());
    response
}

/// The route table: the router is built from it and the OpenAPI document generated from it.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub role: &'static str,
    pub query: &'static [&'static str],
    pub success: u16,
    /// the fields the request body may carry (the handler refuses others)
    pub body: Option<&'static [BodyField]>,
}

/// The JSON schema of one request-body field.
fn field_schema(field: &BodyField) -> Value {
    let schema = match field.kind {
        Kind::Text => json!({"type": "string"}),
        Kind::Time => json!({"type": "string", "format": "date-time"}),
        Kind::Pem => json!({"type": "string", "description": "PEM public key (P-256 or Ed25519)"}),
        Kind::Flag => json!({"type": "boolean"}),
        Kind::Integer => json!({"type": "integer"}),
        Kind::TextList => json!({"type": "array", "items": {"type": "string"}}),
        Kind::Location => json!({"$ref": "#/components/schemas/Location"}),
    };
    if field.nullable { json!({"oneOf": [schema, {"type": "null"}]}) } else { schema }
}

/// The JSON schema of a request body: its fields, no others; PATCH requires none.
fn body_schema(method: &str, fields: &[BodyField]) -> Value {
    let properties: serde_json::Map<String, Value> = fields.iter().map(|field| (field.name.to_string(), field_schema(field))).collect();
    let required: Vec<&str> = if method == "patch" { Vec::new() } else { fields.iter().filter(|field| field.required).map(|field| field.name).collect() };
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

pub fn openapi(routes: &[RouteDoc]) -> Value {
    let mut paths = serde_json::Map::new();
    for route in routes {
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{').and_then(|name| name.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(route.query.iter().map(|name| json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}})));
        let mut responses = serde_json::Map::new();
        responses.insert(route.success.to_string(), json!({"description": "success"}));
        for (code, text) in [
            ("400", "malformed request"),
            ("401", "not authenticated"),
            ("403", "role too low"),
            ("404", "unknown id"),
            ("409", "conflict"),
            ("422", "invalid values"),
        ] {
            responses.insert(
                code.into(),
                json!({"description": text, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
            );
        }
        let mut operation = json!({
            "summary": route.summary,
            "parameters": parameters,
            "responses": responses,
            "x-required-role": route.role,
        });
        if route.role == "none" {
            operation["security"] = json!([]);
        }
        if let Some(fields) = route.body {
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": body_schema(route.method, fields)}}});
        }
        entry[route.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Reachback API", "version": env!("CARGO_PKG_VERSION")},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
            "Location": {"type": "object", "additionalProperties": false, "properties": {
                "city": {"type": "string"}, "state": {"type": "string"}, "country": {"type": "string", "description": "ISO 3166-1 alpha-2"},
                "latitude": {"type": "number", "minimum": -90, "maximum": 90}, "longitude": {"type": "number", "minimum": -180, "maximum": 180}
            }},
            "Problem": {"type": "object", "required": ["title", "status", "detail"], "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}
            }}}
        }
    })
}
