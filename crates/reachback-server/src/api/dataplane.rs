//! The data plane's API: application segments, access policies, connectors (and
//! their enrollment), live client sessions.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use reachback_policy::{parse_cidr, parse_destination, parse_port_range};
use reachback_store::{AuditEntry, ClientSessionRow, ConnectorRow, DocKind, DocRow, ProvisioningKey, new_id, now_micros};
use serde_json::{Value, json};

use crate::api::views::{ConnectorEnrollment, ConnectorStatus, ConnectorView, ConnectorWithKey, Timestamp, json_of};
use crate::api::{created, list_json, no_content, page_of};
use crate::auth::{Caller, ClientIp, Role};
use crate::crypto::{CertificateAuthority, hash_secret, new_secret};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject, QueryParams, parse_time};
use crate::state::SharedState;
use crate::validate;

/// Most entries a list field of a segment or policy may hold.
const MAX_LIST: usize = 256;

fn text_list(spec: &Value, key: &str) -> Vec<String> {
    spec[key].as_array().map(|items| items.iter().filter_map(|item| item.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn doc_kind_name(kind: DocKind) -> &'static str {
    match kind {
        DocKind::Segment => "app segment",
        DocKind::Policy => "access policy",
    }
}

/// The orders the segment and policy listings offer.
pub const DOC_SORTS: &[&str] = &["name", "order", "updated_at"];
/// The orders the client-session listing offers.
pub const SESSION_SORTS: &[&str] = &["connected_at", "client_hostname", "username", "virtual_ip"];

pub fn segment_json(doc: &DocRow) -> Value {
    crate::api::views::json_of(&crate::api::views::SegmentView::from(doc))
}

pub fn policy_json(doc: &DocRow) -> Value {
    crate::api::views::json_of(&crate::api::views::PolicyView::from(doc))
}

fn render(kind: DocKind, doc: &DocRow) -> Value {
    match kind {
        DocKind::Segment => segment_json(doc),
        DocKind::Policy => policy_json(doc),
    }
}

/// Reads a list field: from the body when present (each entry checked by `check`,
/// which returns the canonical text), else the stored value, else empty.
fn list_field(fields: &mut Fields, name: &str, base: &Value, check: impl Fn(&str) -> Result<String, String>) -> Vec<String> {
    if !fields.has(name) {
        return text_list(base, name);
    }
    // null empties the list; a wrong type was reported by `string_list`
    let Some(items) = fields.string_list(name) else { return Vec::new() };
    if items.len() > MAX_LIST {
        fields.error(name, format!("may hold at most {MAX_LIST} entries"));
        return Vec::new();
    }
    let mut canonical = Vec::with_capacity(items.len());
    for item in &items {
        match check(item) {
            Ok(text) if !canonical.contains(&text) => canonical.push(text),
            Ok(_) => {}
            Err(message) => fields.error(name, message),
        }
    }
    canonical
}

fn name_field(fields: &mut Fields, base: Option<&DocRow>) -> String {
    match fields.string("name", base.is_none()) {
        Some(name) => match validate::name(&name, 128) {
            Ok(name) => name,
            Err(message) => {
                fields.error("name", message);
                name
            }
        },
        None => base.map(|doc| doc.name.clone()).unwrap_or_default(),
    }
}

/// A segment from a create or patch body (`base`: the stored one when patching).
fn read_segment(fields: &mut Fields, base: Option<&DocRow>) -> (String, Value, bool) {
    let empty = json!({});
    let spec = base.map(|doc| &doc.spec).unwrap_or(&empty);
    let name = name_field(fields, base);
    let destinations = list_field(fields, "destinations", spec, |text| parse_destination(text).map(|d| d.to_string()).map_err(|error| error.to_string()));
    let tcp_ports = list_field(fields, "tcp_ports", spec, |text| parse_port_range(text).map(|p| p.to_string()).map_err(|error| error.to_string()));
    let udp_ports = list_field(fields, "udp_ports", spec, |text| parse_port_range(text).map(|p| p.to_string()).map_err(|error| error.to_string()));
    let enabled = fields.boolean("enabled").or(base.map(|doc| doc.enabled)).unwrap_or(true);
    if destinations.is_empty() && !fields.errors.iter().any(|error| error.field == "destinations") {
        fields.error("destinations", "must name at least one address, CIDR or hostname pattern");
    }
    if tcp_ports.is_empty() && udp_ports.is_empty() && !fields.errors.iter().any(|error| error.field.ends_with("_ports")) {
        fields.error("tcp_ports", "at least one TCP or UDP port range is needed");
    }
    (name, json!({"destinations": destinations, "tcp_ports": tcp_ports, "udp_ports": udp_ports}), enabled)
}

/// A policy from a create or patch body; references are checked against the store.
async fn read_policy(state: &SharedState, fields: &mut Fields, base: Option<&DocRow>) -> ApiResult<(String, Value, Option<i64>, bool)> {
    let empty = json!({});
    let spec = base.map(|doc| &doc.spec).unwrap_or(&empty);
    let name = name_field(fields, base);
    let order = fields.integer("order", 0, 1_000_000_000).or(base.map(|doc| doc.position));
    let action = match fields.string("action", base.is_none()) {
        Some(action) if action == "allow" || action == "deny" => action,
        Some(_) => {
            fields.error("action", "must be \"allow\" or \"deny\"");
            String::new()
        }
        None => spec["action"].as_str().unwrap_or_default().to_string(),
    };
    let segments: Vec<String> = state.store.list_docs(DocKind::Segment).await?.into_iter().map(|doc| doc.id).collect();
    let connectors: Vec<String> = state.store.list_connectors().await?.into_iter().map(|row| row.id).collect();
    let ranges: Vec<String> = state.store.list_ranges().await?.into_iter().map(|row| row.id).collect();
    let known = |ids: &[String], what: &'static str| {
        let ids = ids.to_vec();
        move |text: &str| if ids.iter().any(|id| id == text) { Ok(text.to_string()) } else { Err(format!("{text:?} is not the id of an existing {what}")) }
    };
    let segment_ids = list_field(fields, "segment_ids", spec, known(&segments, "app segment"));
    let connector_ids = list_field(fields, "connector_ids", spec, known(&connectors, "connector"));
    let range_ids = list_field(fields, "range_ids", spec, known(&ranges, "IP range"));
    let source_cidrs = list_field(fields, "source_cidrs", spec, |text| parse_cidr(text).map(|cidr| cidr.to_string()).map_err(|error| error.to_string()));
    let usernames = list_field(fields, "usernames", spec, |text| {
        let text = text.trim();
        if text.is_empty() { Err("usernames must not be empty".into()) } else { validate::plain_text(text, 256).map(|()| text.to_string()) }
    });
    let platforms = list_field(fields, "platforms", spec, |text| {
        let platform = text.trim().to_ascii_lowercase();
        if validate::PLATFORMS.contains(&platform.as_str()) {
            Ok(platform)
        } else {
            Err(format!("platforms must be among: {}", validate::PLATFORMS.join(", ")))
        }
    });
    let enabled = fields.boolean("enabled").or(base.map(|doc| doc.enabled)).unwrap_or(true);
    let spec = json!({
        "action": action, "segment_ids": segment_ids, "connector_ids": connector_ids, "source_cidrs": source_cidrs,
        "usernames": usernames, "platforms": platforms, "range_ids": range_ids,
    });
    Ok((name, spec, order, enabled))
}

/// The longest a provisioning key may stay valid (366 days).
pub const MAX_PROVISIONING_KEY_SECONDS: i64 = 366 * 86_400;

async fn create_doc(state: SharedState, caller: Caller, body: JsonObject, kind: DocKind) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let (name, spec, order, enabled) = match kind {
        DocKind::Segment => {
            let mut fields = Fields::of::<crate::api::bodies::SegmentBody>(body)?;
            let (name, spec, enabled) = read_segment(&mut fields, None);
            fields.finish()?;
            (name, spec, Some(0), enabled)
        }
        DocKind::Policy => {
            let mut fields = Fields::of::<crate::api::bodies::PolicyBody>(body)?;
            let read = read_policy(&state, &mut fields, None).await?;
            fields.finish()?;
            read
        }
    };
    let position = match order {
        Some(order) => order,
        // a policy without an order goes last
        None => state.store.list_docs(kind).await?.iter().map(|doc| doc.position).max().map_or(1, |max| max.saturating_add(1)),
    };
    let now = now_micros();
    let doc = DocRow { id: new_id(), name, spec, position, enabled, created_at: now, updated_at: now };
    let after = render(kind, &doc);
    let resource = resource_type(kind);
    state.store.create_doc(kind, &doc, caller.audit("create", resource, &doc.id, None, Some(after.clone()))).await?;
    state.broker.reload_policy(true).await.map_err(ApiError::internal)?;
    Ok(created(after))
}

fn resource_type(kind: DocKind) -> &'static str {
    match kind {
        DocKind::Segment => "app_segment",
        DocKind::Policy => "access_policy",
    }
}

async fn patch_doc(state: SharedState, caller: Caller, id: String, body: JsonObject, kind: DocKind) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let base = state.store.get_doc(kind, &id).await.map_err(|error| ApiError::not_found_or(error, doc_kind_name(kind)))?;
    let (name, spec, order, enabled) = match kind {
        DocKind::Segment => {
            let mut fields = Fields::of::<crate::api::bodies::SegmentBody>(body)?;
            let (name, spec, enabled) = read_segment(&mut fields, Some(&base));
            fields.finish()?;
            (name, spec, base.position, enabled)
        }
        DocKind::Policy => {
            let mut fields = Fields::of::<crate::api::bodies::PolicyBody>(body)?;
            let (name, spec, order, enabled) = read_policy(&state, &mut fields, Some(&base)).await?;
            fields.finish()?;
            (name, spec, order.unwrap_or(base.position), enabled)
        }
    };
    let resource = resource_type(kind);
    let after = state
        .store
        .update_doc(
            kind,
            &id,
            |stored| DocRow { name, spec, position: order, enabled, ..stored.clone() },
            |before, after| caller.audit("update", resource, &id, Some(render(kind, before)), Some(render(kind, after))),
        )
        .await
        .map_err(|error| ApiError::not_found_or(error, doc_kind_name(kind)))?;
    state.broker.reload_policy(true).await.map_err(ApiError::internal)?;
    Ok(Json(render(kind, &after)))
}

async fn delete_doc(state: SharedState, caller: Caller, id: String, kind: DocKind) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let resource = resource_type(kind);
    state
        .store
        .delete_doc(kind, &id, |doc| caller.audit("delete", resource, &id, Some(render(kind, doc)), None))
        .await
        .map_err(|error| ApiError::not_found_or(error, doc_kind_name(kind)))?;
    state.broker.reload_policy(true).await.map_err(ApiError::internal)?;
    Ok(no_content())
}

async fn list_docs(state: SharedState, caller: Caller, raw: Option<String>, kind: DocKind) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "sort", "name", "enabled"])?;
    let paging = query.paging()?;
    let default_sort = if kind == DocKind::Policy { "order" } else { "name" };
    let (sort, descending) = query.sort(DOC_SORTS, default_sort)?;
    let name = query.text("name").map(|name| name.to_lowercase());
    let enabled = match query.value("enabled")?.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::bad_request("enabled must be true or false")),
    };
    let mut docs: Vec<DocRow> = state
        .store
        .list_docs(kind)
        .await?
        .into_iter()
        .filter(|doc| name.as_ref().is_none_or(|name| doc.name.to_lowercase().contains(name)) && enabled.is_none_or(|enabled| doc.enabled == enabled))
        .collect();
    docs.sort_by(|a, b| {
        let order = match sort {
            "order" => a.position.cmp(&b.position),
            "updated_at" => a.updated_at.cmp(&b.updated_at),
            _ => a.name.to_lowercase().cmp(&b.name.to_lowercase()),
        }
        .then_with(|| a.id.cmp(&b.id));
        if descending { order.reverse() } else { order }
    });
    let total = docs.len() as i64;
    Ok(list_json(page_of(docs, paging).iter().map(|doc| render(kind, doc)).collect(), total, paging))
}

async fn get_doc(state: SharedState, caller: Caller, id: String, kind: DocKind) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let doc = state.store.get_doc(kind, &id).await.map_err(|error| ApiError::not_found_or(error, doc_kind_name(kind)))?;
    Ok(Json(render(kind, &doc)))
}

pub async fn list_segments(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    list_docs(state, caller, raw, DocKind::Segment).await
}
pub async fn create_segment(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    create_doc(state, caller, body, DocKind::Segment).await
}
pub async fn get_segment(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    get_doc(state, caller, id, DocKind::Segment).await
}
pub async fn patch_segment(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    patch_doc(state, caller, id, body, DocKind::Segment).await
}
pub async fn delete_segment(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    delete_doc(state, caller, id, DocKind::Segment).await
}
pub async fn list_policies(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    list_docs(state, caller, raw, DocKind::Policy).await
}
pub async fn create_policy(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    create_doc(state, caller, body, DocKind::Policy).await
}
pub async fn get_policy(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    get_doc(state, caller, id, DocKind::Policy).await
}
pub async fn patch_policy(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    patch_doc(state, caller, id, body, DocKind::Policy).await
}
pub async fn delete_policy(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    delete_doc(state, caller, id, DocKind::Policy).await
}

fn connector_view(state: &SharedState, row: &ConnectorRow) -> ConnectorView {
    ConnectorView {
        id: row.id.clone(),
        name: row.name.clone(),
        status: if state.broker.connector_online(&row.id) { ConnectorStatus::Online } else { ConnectorStatus::Offline },
        last_seen: Timestamp::maybe(row.last_seen),
        version: row.version.clone(),
        mode: row.mode.clone(),
        dns_listeners: row.dns_listeners.as_deref().map(|listeners| listeners.split(',').map(str::to_string).collect()).unwrap_or_default(),
        created_at: Timestamp::at(row.created_at),
        provisioning_key_id: row.key.id.clone(),
        provisioning_key_expires_at: Timestamp::at(row.key.expires_at),
        provisioning_key_used_at: Timestamp::maybe(row.key.used_at),
        provisioning_key_reusable: row.key.reusable,
    }
}

fn connector_json(state: &SharedState, row: &ConnectorRow) -> Value {
    json_of(&connector_view(state, row))
}

/// A new provisioning key as the body asks for it: valid for
/// `provisioning_key_ttl_seconds` or until `provisioning_key_expires_at` (by default
/// for the `provisioning_key_ttl_seconds` setting), single-use unless
/// `provisioning_key_reusable`.
fn read_provisioning_key(fields: &mut Fields, state: &SharedState, now: i64) -> ProvisioningKey {
    let ttl = fields.integer("provisioning_key_ttl_seconds", 60, MAX_PROVISIONING_KEY_SECONDS);
    let until = match fields.string("provisioning_key_expires_at", false) {
        None => None,
        Some(text) => match parse_time(&text) {
            Some(at) if at > now && at <= now + MAX_PROVISIONING_KEY_SECONDS * 1_000_000 => Some(at),
            Some(_) => {
                fields.error("provisioning_key_expires_at", "must be in the future, at most 366 days ahead");
                None
            }
            None => {
                fields.error("provisioning_key_expires_at", "must be an RFC 3339 timestamp");
                None
            }
        },
    };
    if fields.has("provisioning_key_ttl_seconds") && fields.has("provisioning_key_expires_at") {
        fields.error("provisioning_key_expires_at", "give provisioning_key_ttl_seconds or provisioning_key_expires_at, not both");
    }
    let expires_at = until.unwrap_or_else(|| now + ttl.unwrap_or(state.settings().provisioning_key_ttl_seconds).saturating_mul(1_000_000));
    ProvisioningKey { id: new_id(), expires_at, used_at: None, reusable: fields.boolean("provisioning_key_reusable").unwrap_or(false) }
}

pub async fn create_connector(State(state): State<SharedState>, caller: Caller, body: JsonObject) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let mut fields = Fields::of::<crate::api::bodies::ConnectorBody>(body)?;
    let name = name_field(&mut fields, None);
    let now = now_micros();
    let key = read_provisioning_key(&mut fields, &state, now);
    fields.finish()?;
    let secret = new_secret("rbc_");
    let row = ConnectorRow {
        id: new_id(),
        name,
        certificate_serial: None,
        revoked: false,
        version: None,
        mode: None,
        dns_listeners: None,
        last_seen: None,
        created_at: now,
        key,
        key_fingerprint: None,
    };
    let after = connector_json(&state, &row);
    state.store.create_connector(&row, &hash_secret(&secret), caller.audit("create", "connector", &row.id, None, Some(after.clone()))).await?;
    Ok(created(json_of(&ConnectorWithKey { connector: connector_view(&state, &row), provisioning_key: secret })))
}

/// `POST /api/v1/connectors/{id}/provisioning-key`: a fresh provisioning key (shown
/// once) for a connector to enroll again; the earlier key stops working.
pub async fn issue_provisioning_key(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let mut fields = Fields::of::<crate::api::bodies::ProvisioningKeyBody>(body)?;
    let key = read_provisioning_key(&mut fields, &state, now_micros());
    fields.finish()?;
    let secret = new_secret("rbc_");
    let row = state
        .store
        .issue_provisioning_key(&id, &key, &hash_secret(&secret), |before, after| {
            caller.audit("issue_provisioning_key", "connector", &id, Some(connector_json(&state, before)), Some(connector_json(&state, after)))
        })
        .await
        .map_err(|error| ApiError::not_found_or(error, "connector"))?;
    Ok(Json(json_of(&ConnectorWithKey { connector: connector_view(&state, &row), provisioning_key: secret })))
}

pub async fn list_connectors(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "name", "status"])?;
    let paging = query.paging()?;
    let name = query.text("name").map(|name| name.to_lowercase());
    let status = query.value("status")?;
    if status.as_deref().is_some_and(|status| status != "online" && status != "offline") {
        return Err(ApiError::bad_request("status must be online or offline"));
    }
    let items: Vec<Value> = state
        .store
        .list_connectors()
        .await?
        .iter()
        .filter(|row| name.as_ref().is_none_or(|name| row.name.to_lowercase().contains(name)))
        .map(|row| connector_json(&state, row))
        .filter(|item| status.as_ref().is_none_or(|status| item["status"] == status.as_str()))
        .collect();
    let total = items.len() as i64;
    Ok(list_json(page_of(items, paging), total, paging))
}

pub async fn get_connector(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    match state.store.get_connector(&id).await {
        Ok(row) if !row.revoked => Ok(Json(connector_json(&state, &row))),
        Ok(_) => Err(ApiError::not_found("connector")),
        Err(error) => Err(ApiError::not_found_or(error, "connector")),
    }
}

pub async fn delete_connector(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    state
        .store
        .revoke_connector(&id, |row| caller.audit("revoke", "connector", &id, Some(connector_json(&state, row)), None))
        .await
        .map_err(|error| ApiError::not_found_or(error, "connector"))?;
    state.broker.kick_connector(&id);
    Ok(no_content())
}

/// `POST /api/v1/connectors/enroll`: a connector trades its provisioning key and a
/// public key for a certificate. Authenticated by the key, which must be unexpired
/// and unused (unless issued reusable); a new enrollment replaces the connector's
/// earlier certificate and is audited, with the key as the actor.
pub async fn enroll_connector(
    State(state): State<SharedState>,
    ClientIp(client_ip): ClientIp,
    headers: axum::http::HeaderMap,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    let mut fields = Fields::of::<crate::api::bodies::ConnectorEnrollBody>(body)?;
    let secret = fields.string("provisioning_key", false).unwrap_or_default();
    if secret.is_empty() || secret.len() > 256 {
        return Err(ApiError::unauthorized("the provisioning key is missing or not valid"));
    }
    let key_hash = hash_secret(&secret);
    let Some(connector) = state.store.find_connector_by_key(&key_hash).await? else {
        return Err(ApiError::unauthorized("the provisioning key is not valid"));
    };
    let now = now_micros();
    if let Some(refusal) = connector.key.refusal(now) {
        return Err(ApiError::unauthorized(refusal));
    }
    let public_key = fields.public_key("public_key");
    fields.finish()?;
    let Some(public_key) = public_key else { return Err(ApiError::invalid_field("public_key", "is required")) };
    let serial = CertificateAuthority::new_serial();
    let certificate = state.ca.sign_connector(&public_key, &connector.id, serial, state.config.certificate_lifetime).map_err(ApiError::internal)?;
    let serial: String = serial.iter().map(|byte| format!("{byte:02x}")).collect();
    let audit = AuditEntry {
        actor: format!("provisioning_key:{}", connector.key.id),
        action: "enroll".into(),
        resource_type: "connector".into(),
        resource_id: connector.id.clone(),
        before: None,
        after: Some(json!({"name": connector.name, "certificate_serial": serial})),
        source_ip: client_ip,
    };
    // the last word: a single-use key another enrollment took meanwhile is refused here
    if !state.store.record_connector_enrollment(&connector.id, &key_hash, &serial, &public_key.fingerprint, now, audit).await? {
        return Err(ApiError::unauthorized("the provisioning key has been used or has expired; issue a new one for the connector"));
    }
    tracing::info!(connector_id = %connector.id, "connector enrolled");
    Ok(Json(json_of(&ConnectorEnrollment {
        connector_id: connector.id,
        name: connector.name,
        certificate,
        ca_certificate: state.ca.certificate_pem.clone(),
        broker_endpoints: state.broker_endpoints(&headers),
    })))
}

fn session_json(row: &ClientSessionRow) -> Value {
    crate::api::views::json_of(&crate::api::views::ClientSession::from(row))
}

pub async fn list_sessions(State(state): State<SharedState>, caller: Caller, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let query = QueryParams::parse(raw.as_deref(), &["page", "page_size", "sort", "client_hostname", "username", "virtual_ip", "platform"])?;
    let paging = query.paging()?;
    let (sort, descending) = query.sort(SESSION_SORTS, "connected_at")?;
    let filters: Vec<(&str, String)> = ["client_hostname", "username", "virtual_ip", "platform"]
        .into_iter()
        .filter_map(|key| query.text(key).map(|value| (key, value.to_lowercase())))
        .collect();
    let mut rows: Vec<ClientSessionRow> = state
        .store
        .list_client_sessions()
        .await?
        .into_iter()
        .filter(|row| {
            filters.iter().all(|(key, value)| {
                let field = match *key {
                    "client_hostname" => row.client_hostname.as_str(),
                    "username" => row.username.as_str(),
                    "virtual_ip" => row.virtual_ip.as_deref().unwrap_or(""),
                    _ => row.platform.as_str(),
                };
                field.to_lowercase().contains(value.as_str())
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        let order = match sort {
            "client_hostname" => a.client_hostname.cmp(&b.client_hostname),
            "username" => a.username.to_lowercase().cmp(&b.username.to_lowercase()),
            "virtual_ip" => {
                a.virtual_ip.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()).cmp(&b.virtual_ip.as_deref().and_then(|ip| ip.parse().ok()))
            }
            // newest first
            _ => b.connected_at.cmp(&a.connected_at),
        };
        if descending { order.reverse() } else { order }
    });
    let total = rows.len() as i64;
    Ok(list_json(page_of(rows, paging).iter().map(session_json).collect(), total, paging))
}

pub async fn delete_session(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    state
        .store
        .delete_client_session(&id, |row| caller.audit("disconnect", "client_session", &id, Some(session_json(row)), None))
        .await
        .map_err(|error| ApiError::not_found_or(error, "client session"))?;
    // this replica disconnects at once; another replica finds the row gone on its next sync
    state.broker.kick_session(&id);
    Ok(no_content())
}
