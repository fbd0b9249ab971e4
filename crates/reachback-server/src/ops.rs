//! Operations endpoints: health, readiness, Prometheus metrics, the OpenAPI document,
//! and the HTTP metrics middleware.

use std::time::Instant;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::request::{MAX_PAGE, MAX_QUERY_VALUE};
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
    Json(crate::api::views::json_of(&crate::api::views::CaInfo { certificate: state.ca.certificate_pem.clone(), pin, api_urls: urls })).into_response()
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
    state.metrics.listing_index_rows.set(state.store.listing_index_rows().map_or(-1, |rows| rows as i64));
    if let Ok(sinks) = state.store.list_sinks().await {
        crate::events::observe(&state.metrics.events, &sinks, reachback_store::now_micros());
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

/// A component schema: registers a type's schema (and those it refers to) under
/// their names and answers a reference to it.
pub type SchemaFn = fn(&mut Map<String, Value>) -> Value;

/// Registers `T` (utoipa derives its schema from the type itself) and refers to it.
pub fn schema<T: utoipa::ToSchema>(components: &mut Map<String, Value>) -> Value {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    for (name, schema) in nested {
        components.entry(name).or_insert_with(|| serde_json::to_value(schema).unwrap_or(Value::Null));
    }
    let name = T::name().to_string();
    components.entry(name.clone()).or_insert_with(|| serde_json::to_value(T::schema()).unwrap_or(Value::Null));
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// What a route answers on success.
#[derive(Clone, Copy)]
pub enum Reply {
    /// no body (204)
    Nothing,
    /// one JSON object of a type
    One(SchemaFn),
    /// API.md's list envelope around items of a type
    List(SchemaFn),
    /// a streamed CSV file
    Csv,
}

/// The route table: the router is built from it and the OpenAPI document generated from it.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    /// the handler's path (`ranges::list`): the operation's id
    pub handler: &'static str,
    pub summary: &'static str,
    pub role: &'static str,
    pub query: &'static [&'static str],
    /// the orders `sort` takes (each also with a leading `-`)
    pub sorts: &'static [&'static str],
    pub success: u16,
    /// other success codes with the same body (an enrollment that finds its device: 200)
    pub also: &'static [u16],
    pub reply: Reply,
    /// the request body's type
    pub body: Option<SchemaFn>,
}

impl RouteDoc {
    /// `ranges_list`, `dataplane_create_segment`: unique, as handlers are.
    pub fn operation_id(&self) -> String {
        self.handler.split("::").map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join("_")
    }
}

/// Text without control characters (C0, DEL, C1): what the edge lets through.
const NO_CONTROLS: &str = "^[^\\x00-\\x1f\\x7f-\\x9f]*$";
/// A path id: 1 to 128 characters without control characters or `/`.
const ID_PATTERN: &str = "^[^\\x00-\\x1f\\x7f-\\x9f/]+$";
/// An IPv4 or IPv6 CIDR.
const CIDR: &str = crate::api::bodies::CIDR_PATTERN;

/// The schema of a query parameter: the formats, enums and limits its handler enforces.
fn query_schema(route: &RouteDoc, name: &str) -> (Value, &'static str) {
    let text = |description: &'static str| (json!({"type": "string", "maxLength": MAX_QUERY_VALUE, "pattern": NO_CONTROLS}), description);
    match name {
        "page" if route.path == "/api/v1/saved-filters" => (json!({"$ref": "#/components/schemas/ConsolePage"}), "only the filters of this console page"),
        "page" => (json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1}), "1-based page number"),
        "page_size" => (json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}), "items per page"),
        "sort" => {
            let values: Vec<String> = route.sorts.iter().flat_map(|sort| [sort.to_string(), format!("-{sort}")]).collect();
            (json!({"type": "string", "enum": values}), "the order; a leading `-` reverses it")
        }
        "updated_after" | "updated_before" | "after" | "before" | "at" | "from" | "to" => {
            (json!({"type": "string", "format": "date-time"}), "an RFC 3339 instant (inclusive)")
        }
        "force" => (json!({"type": "boolean", "default": false}), "also release the range's bindings"),
        "enabled" => (json!({"type": "boolean"}), "only enabled (true) or disabled (false) ones"),
        "status" if route.path == "/api/v1/connectors" => (json!({"type": "string", "enum": ["online", "offline"]}), "only connectors in this state"),
        "status" => (json!({"type": "string", "enum": ["enabled", "disabled"]}), "only ranges in this state"),
        "days" => (json!({"type": "integer", "minimum": 1, "maximum": 366, "default": 30}), "how many days back, today included"),
        "ip" if route.path.ends_with("/trace") => {
            (json!({"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}), "the address to trace (required)")
        }
        "ip" => (
            json!({"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}, {"type": "string", "pattern": CIDR}]}),
            "an address (exact) or a CIDR (every address inside; IPv6 CIDRs such as `fd7a:115c:a1e0::/64` too)",
        ),
        "virtual_ip" | "server_ip" if route.path.starts_with("/api/v1/flows") => (
            json!({"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}, {"type": "string", "pattern": CIDR}]}),
            "an address (exact) or a CIDR (every address inside)",
        ),
        "verdict" => (json!({"$ref": "#/components/schemas/FlowVerdict"}), "only flows with this verdict"),
        "protocol" => (json!({"$ref": "#/components/schemas/FlowProtocol"}), "only flows of this transport"),
        "device_id" | "connector_id" => (json!({"type": "string", "maxLength": MAX_QUERY_VALUE, "pattern": NO_CONTROLS}), "an id (exact)"),
        _ => text("case-insensitive substring (some filters also take exact forms; see API.md)"),
    }
}

/// Links from a creating operation to those that use the id it answered with, so
/// a client (or a stateful fuzzer) can follow them.
fn links(routes: &[RouteDoc], route: &RouteDoc) -> Map<String, Value> {
    let mut links = Map::new();
    let (source, target_param) = match (route.method, route.path) {
        ("post", "/api/v1/enroll") => ("/api/v1/devices", "/device_id"),
        ("post", path) if route.success == 201 => (path, "/id"),
        _ => return links,
    };
    for other in routes {
        let Some(rest) = other.path.strip_prefix(source).and_then(|rest| rest.strip_prefix('/')) else { continue };
        let Some(parameter) = rest.split('/').next().and_then(|segment| segment.strip_prefix('{')).and_then(|segment| segment.strip_suffix('}')) else {
            continue;
        };
        // every other parameter must come from the creating request's own path
        let known = |name: &str| name == parameter || route.path.contains(&format!("{{{name}}}"));
        if other.path.split('/').filter_map(|segment| segment.strip_prefix('{').and_then(|segment| segment.strip_suffix('}'))).any(|name| !known(name)) {
            continue;
        }
        let mut parameters = Map::new();
        for segment in other.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|segment| segment.strip_suffix('}')) {
                let value = if name == parameter { format!("$response.body#{target_param}") } else { format!("$request.path.{name}") };
                parameters.insert(name.to_string(), Value::String(value));
            }
        }
        links.insert(other.operation_id(), json!({"operationId": other.operation_id(), "parameters": parameters}));
    }
    if route.path == "/api/v1/enroll" {
        for other in routes.iter().filter(|other| other.path == "/api/v1/ip-bindings/{ip}") {
            links.insert(other.operation_id(), json!({"operationId": other.operation_id(), "parameters": {"ip": "$response.body#/virtual_ip"}}));
        }
    }
    links
}

/// The error statuses an operation can answer, each with the problem document.
fn problems(route: &RouteDoc) -> Vec<(&'static str, &'static str)> {
    let mut codes = vec![("400", "malformed request: bad JSON, an unknown field or query parameter, a control character")];
    codes.push(("401", "not authenticated (or, for `none` routes, the key or signature was refused)"));
    if route.role != "none" {
        codes.push(("403", "the caller's role is too low (or a console change without its CSRF token)"));
    }
    codes.push(("404", "no such resource"));
    if route.method != "get" {
        codes.push(("409", "a conflict with the current state (a name in use or one that looks alike, an overlap, a resource in use)"));
    }
    if route.body.is_some() {
        codes.extend([
            ("413", "the body is larger than 64 KiB"),
            ("415", "the body is not JSON"),
            ("422", "values that break the rules; `errors` names each field"),
        ]);
    } else if !route.query.is_empty() || route.method != "get" {
        codes.push(("422", "values that break the rules"));
    }
    if route.path == "/api/v1/auth/login" || route.path == "/api/v1/enroll" || route.path.ends_with("/renew") {
        codes.push(("429", "too many attempts; wait as `Retry-After` says"));
    }
    codes.push(("503", "the database is unreachable or the request took too long"));
    codes
}

fn list_envelope(items: Value) -> Value {
    json!({
        "type": "object",
        "required": ["items", "total", "page", "page_size"],
        "properties": {
            "items": {"type": "array", "items": items},
            "total": {"type": "integer", "minimum": 0, "description": "how many items match, over every page"},
            "page": {"type": "integer", "minimum": 1},
            "page_size": {"type": "integer", "minimum": 1}
        }
    })
}

/// The OpenAPI 3.1 document of a route table: paths, parameters with their
/// formats, request and response schemas derived from the types the handlers use,
/// error responses, links, and the role each operation needs (`x-required-role`).
pub fn openapi(routes: &[RouteDoc]) -> Value {
    let mut components = Map::new();
    // shared enums the parameters refer to
    schema::<crate::api::views::Platform>(&mut components);
    schema::<crate::api::bodies::ConsolePage>(&mut components);
    schema::<crate::api::views::FlowVerdict>(&mut components);
    schema::<crate::api::views::FlowProtocol>(&mut components);
    let mut paths = Map::new();
    for route in routes {
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{').and_then(|name| name.strip_suffix('}')))
            .map(|name| {
                let schema = if name == "ip" {
                    json!({"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}], "description": "an IPv4 or IPv6 address"})
                } else {
                    json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": ID_PATTERN})
                };
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        parameters.extend(route.query.iter().map(|name| {
            let (schema, description) = query_schema(route, name);
            let required = route.path.ends_with("/trace") && *name == "ip";
            json!({"name": name, "in": "query", "required": required, "schema": schema, "description": description})
        }));
        let mut responses = Map::new();
        let success = match route.reply {
            Reply::Nothing => json!({"description": "done"}),
            Reply::One(schema) => json!({"description": "success", "content": {"application/json": {"schema": schema(&mut components)}}}),
            Reply::List(schema) => {
                let items = schema(&mut components);
                let name = format!("{}Page", items["$ref"].as_str().and_then(|reference| reference.rsplit('/').next()).unwrap_or("Item"));
                components.entry(name.clone()).or_insert_with(|| list_envelope(items));
                json!({"description": "one page of the matching items", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}})
            }
            Reply::Csv => json!({
                "description": "the matching rows as CSV (RFC 4180, a header row first; cells a spreadsheet would evaluate are prefixed with `'`). \
                    A failure after the first byte aborts the transfer (no chunked terminator): a short file is never a complete one.",
                "content": {"text/csv": {"schema": {"type": "string"}}}
            }),
        };
        let mut success = success;
        let links = links(routes, route);
        if !links.is_empty() {
            success["links"] = Value::Object(links);
        }
        for code in std::iter::once(&route.success).chain(route.also) {
            responses.insert(code.to_string(), success.clone());
        }
        for (code, text) in problems(route) {
            responses.insert(
                code.into(),
                json!({"description": text, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
            );
        }
        let mut operation = json!({
            "operationId": route.operation_id(),
            "summary": route.summary,
            "parameters": parameters,
            "responses": responses,
            "x-required-role": route.role,
        });
        if route.role == "none" {
            operation["security"] = json!([]);
        }
        if let Some(body) = route.body {
            let mut schema = body(&mut components);
            if route.method == "patch" {
                // a change names only the fields it changes: the same fields, none required
                let name = schema["$ref"].as_str().and_then(|reference| reference.rsplit('/').next()).unwrap_or_default().to_string();
                let mut change = components.get(&name).cloned().unwrap_or(Value::Null);
                change["required"] = json!([]);
                change["description"] =
                    Value::String(format!("{} Only the fields sent change; a field left out keeps its value.", change["description"].as_str().unwrap_or("")));
                let change_name = format!("{name}Change");
                components.insert(change_name.clone(), change);
                schema = json!({"$ref": format!("#/components/schemas/{change_name}")});
            }
            // (a change is also taken as application/merge-patch+json, with the same meaning)
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        entry[route.method] = operation;
    }
    // request bodies take no other fields
    for (name, schema) in components.iter_mut() {
        if name.ends_with("Fields") || name.ends_with("FieldsChange") {
            schema["additionalProperties"] = Value::Bool(false);
        }
    }
    components.insert(
        "Problem".into(),
        json!({"type": "object", "required": ["title", "status", "detail"], "description": "RFC 9457 problem details",
            "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer", "minimum": 400, "maximum": 599}, "detail": {"type": "string"},
                "errors": {"type": "array", "description": "one entry per field that broke a rule", "items": {"type": "object", "required": ["field", "message"], "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
                "existing": {"type": "string", "description": "the existing name a new one collides with or looks like (409)"},
                "conflicts_with": {"type": "object", "description": "the range a new one overlaps (409)", "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "range": {"type": "string"}}},
                "bindings": {"type": "integer", "description": "how many bindings keep a range from being deleted (409)"},
                "export": {"type": "object", "description": "an export over the limit (422)", "properties": {"export_limit": {"type": "integer"}, "matching": {"type": "integer"}}}
            }}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Reachback API", "version": env!("CARGO_PKG_VERSION"), "description": "See API.md for the conventions: list envelopes, filters, problem documents, roles."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key (`rbk_…`)"}},
            "schemas": components,
        }
    })
}
