//! What the API answers, as types: every JSON body a handler returns is built
//! from one of these, and the OpenAPI document's response schemas are derived
//! from the same types (utoipa), so the two cannot drift apart.

use reachback_ipam::Location;
use reachback_store::{
    AdminRow, ApiKeyRow, AuditRow, BindingRow, ClientSessionRow, DeviceRow, DocRow, EnrollmentKeyRow, FlowRow, HistoryRow, RangeRow, SavedFilterRow,
    SessionRow, SinkRow,
};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::request::format_time;

/// A value as JSON (the view types serialise without fail: no maps with non-string keys).
pub fn json_of<T: Serialize>(view: &T) -> Value {
    serde_json::to_value(view).unwrap_or(Value::Null)
}

/// An RFC 3339 UTC timestamp.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(value_type = String, format = DateTime)]
pub struct Timestamp(String);

impl Timestamp {
    pub fn at(micros: i64) -> Self {
        Timestamp(format_time(micros))
    }

    pub fn maybe(micros: Option<i64>) -> Option<Self> {
        micros.map(Timestamp::at)
    }
}

/// A count of addresses: a number up to 2^53 − 1, a decimal string above (an IPv6 range).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Count {
    Number(u64),
    /// decimal digits
    Decimal(String),
}

impl Count {
    pub fn of(count: u128) -> Self {
        const MAX_SAFE: u128 = (1 << 53) - 1;
        if count <= MAX_SAFE { Count::Number(count as u64) } else { Count::Decimal(count.to_string()) }
    }
}

/// Where a range is (or a device said it is): city, state, ISO 3166-1 alpha-2
/// country, coordinates; every part may be missing.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Location)]
pub struct LocationView {
    pub city: Option<String>,
    pub state: Option<String>,
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: Option<String>,
    #[schema(minimum = -90, maximum = 90)]
    pub latitude: Option<f64>,
    #[schema(minimum = -180, maximum = 180)]
    pub longitude: Option<f64>,
}

impl LocationView {
    pub fn of(location: &Option<Location>) -> Option<Self> {
        location.as_ref().map(|location| LocationView {
            city: location.city.clone(),
            state: location.state.clone(),
            country: location.country.clone(),
            latitude: location.latitude,
            longitude: location.longitude,
        })
    }
}

/// A range's place in a binding: city, state and country, without coordinates.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Place {
    pub city: Option<String>,
    pub state: Option<String>,
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: Option<String>,
}

impl Place {
    pub fn of(location: &Option<Location>) -> Option<Self> {
        location.as_ref().map(|location| Place { city: location.city.clone(), state: location.state.clone(), country: location.country.clone() })
    }
}

/// The platforms a device may report.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Windows,
    Macos,
    Linux,
    Ios,
    Android,
}

/// An administrator's role.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    Viewer,
    Admin,
    Superadmin,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = IpRange)]
pub struct RangeView {
    pub id: String,
    pub name: String,
    pub description: String,
    /// a CIDR (`100.64.0.0/24`) or an inclusive span (`100.64.0.10-100.64.0.99`)
    pub range: String,
    pub location: Option<LocationView>,
    pub enabled: bool,
    pub total_ips: Count,
    pub used_ips: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl From<&RangeRow> for RangeView {
    fn from(row: &RangeRow) -> Self {
        RangeView {
            id: row.id.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            range: row.range.to_string(),
            location: LocationView::of(&row.location),
            enabled: row.enabled,
            total_ips: Count::of(row.range.total()),
            used_ips: row.used_ips,
            created_at: Timestamp::at(row.created_at),
            updated_at: Timestamp::at(row.updated_at),
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = IpBinding)]
pub struct BindingView {
    pub ip: String,
    pub range_id: String,
    pub range_name: String,
    pub range_location: Option<Place>,
    pub device_id: String,
    pub username: String,
    #[schema(value_type = Platform)]
    pub platform: String,
    pub client_hostname: String,
    pub last_updated: Timestamp,
}

impl From<&BindingRow> for BindingView {
    fn from(row: &BindingRow) -> Self {
        BindingView {
            ip: row.ip.clone(),
            range_id: row.range_id.clone(),
            range_name: row.range_name.clone(),
            range_location: Place::of(&row.range_location),
            device_id: row.device_id.clone(),
            username: row.username.clone(),
            platform: row.platform.clone(),
            client_hostname: row.client_hostname.clone(),
            last_updated: Timestamp::at(row.last_updated),
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = EnrollmentKey)]
pub struct KeyView {
    pub id: String,
    pub username: String,
    pub description: String,
    pub reusable: bool,
    pub expires_at: Option<Timestamp>,
    pub used_count: i64,
    pub revoked: bool,
    pub created_at: Timestamp,
    /// an exact FQDN or `*.suffix`; enrollments with this key must use a matching hostname
    pub hostname_pattern: Option<String>,
}

impl From<&EnrollmentKeyRow> for KeyView {
    fn from(row: &EnrollmentKeyRow) -> Self {
        KeyView {
            id: row.id.clone(),
            username: row.username.clone(),
            description: row.description.clone(),
            reusable: row.reusable,
            expires_at: Timestamp::maybe(row.expires_at),
            used_count: row.used_count,
            revoked: row.revoked,
            created_at: Timestamp::at(row.created_at),
            hostname_pattern: row.hostname_pattern.clone(),
        }
    }
}

/// A new enrollment key with its secret, shown this once.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NewEnrollmentKey {
    #[serde(flatten)]
    pub key_row: KeyView,
    /// the secret (`rbe_…`); only its hash is kept
    pub key: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Device)]
pub struct DeviceView {
    pub id: String,
    pub hostname: String,
    pub username: String,
    #[schema(value_type = Platform)]
    pub platform: String,
    pub virtual_ip: Option<String>,
    pub location: Option<LocationView>,
    pub created_at: Timestamp,
    pub last_seen: Timestamp,
}

impl From<&DeviceRow> for DeviceView {
    fn from(row: &DeviceRow) -> Self {
        DeviceView {
            id: row.id.clone(),
            hostname: row.hostname.clone(),
            username: row.username.clone(),
            platform: row.platform.clone(),
            virtual_ip: row.virtual_ip.clone(),
            location: LocationView::of(&row.location),
            created_at: Timestamp::at(row.created_at),
            last_seen: Timestamp::at(row.last_seen),
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Admin)]
pub struct AdminView {
    pub id: String,
    pub username: String,
    #[schema(value_type = RoleName)]
    pub role: String,
    pub created_at: Timestamp,
    /// whether the administrator can sign in to the console
    pub has_password: bool,
}

impl From<&AdminRow> for AdminView {
    fn from(row: &AdminRow) -> Self {
        AdminView {
            id: row.id.clone(),
            username: row.username.clone(),
            role: row.role.clone(),
            created_at: Timestamp::at(row.created_at),
            has_password: row.password_hash.is_some(),
        }
    }
}

/// A console session or an API key in use.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AdminSession {
    /// `session:…` or `key:…`
    pub id: String,
    pub admin_id: String,
    pub admin_username: String,
    pub api_key_name: Option<String>,
    pub client_ip: Option<String>,
    pub active_since: Timestamp,
    pub expires_at: Option<Timestamp>,
}

impl From<&SessionRow> for AdminSession {
    fn from(row: &SessionRow) -> Self {
        AdminSession {
            id: row.id.clone(),
            admin_id: row.admin_id.clone(),
            admin_username: row.admin_username.clone(),
            api_key_name: row.api_key_name.clone(),
            client_ip: row.client_ip.clone(),
            active_since: Timestamp::at(row.active_since),
            expires_at: Timestamp::maybe(row.expires_at),
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
    pub last_used_at: Option<Timestamp>,
    pub last_ip: Option<String>,
}

impl From<&ApiKeyRow> for ApiKey {
    fn from(row: &ApiKeyRow) -> Self {
        ApiKey {
            id: row.id.clone(),
            name: row.name.clone(),
            created_at: Timestamp::at(row.created_at),
            last_used_at: Timestamp::maybe(row.last_used_at),
            last_ip: row.last_ip.clone(),
        }
    }
}

/// A new API key with its secret, shown this once.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NewApiKey {
    #[serde(flatten)]
    pub api_key: ApiKey,
    /// the secret (`rbk_…`) to send as `Authorization: Bearer`
    pub key: String,
}

/// An administrator's list of API keys (all of them, on one page).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKey>,
    pub total: i64,
    pub page: i64,
    pub page_size: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    /// the resource before the change (absent for a creation)
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    /// the resource after the change (absent for a deletion)
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
    pub source_ip: Option<String>,
}

impl From<&AuditRow> for AuditEntry {
    fn from(row: &AuditRow) -> Self {
        AuditEntry {
            id: row.id.clone(),
            at: Timestamp::at(row.at),
            actor: row.actor.clone(),
            action: row.action.clone(),
            resource_type: row.resource_type.clone(),
            resource_id: row.resource_id.clone(),
            before: row.before.clone(),
            after: row.after.clone(),
            source_ip: row.source_ip.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SavedFilter {
    pub id: String,
    /// the console page the filter belongs to
    pub page: String,
    pub name: String,
    /// the page's query string
    pub query: String,
}

impl From<&SavedFilterRow> for SavedFilter {
    fn from(row: &SavedFilterRow) -> Self {
        SavedFilter { id: row.id.clone(), page: row.page.clone(), name: row.name.clone(), query: row.query.clone() }
    }
}

/// The caller's saved filters (all of them, on one page).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SavedFilterList {
    pub items: Vec<SavedFilter>,
    pub total: i64,
    pub page: i64,
    pub page_size: i64,
}

fn text_list(spec: &Value, key: &str) -> Vec<String> {
    spec.get(key).and_then(Value::as_array).map(|items| items.iter().filter_map(|item| item.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = AppSegment)]
pub struct SegmentView {
    pub id: String,
    pub name: String,
    /// addresses, CIDRs, ranges or names the segment covers
    pub destinations: Vec<String>,
    /// ports and port spans (`22`, `8000-8080`)
    pub tcp_ports: Vec<String>,
    pub udp_ports: Vec<String>,
    pub enabled: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl From<&DocRow> for SegmentView {
    fn from(doc: &DocRow) -> Self {
        SegmentView {
            id: doc.id.clone(),
            name: doc.name.clone(),
            destinations: text_list(&doc.spec, "destinations"),
            tcp_ports: text_list(&doc.spec, "tcp_ports"),
            udp_ports: text_list(&doc.spec, "udp_ports"),
            enabled: doc.enabled,
            created_at: Timestamp::at(doc.created_at),
            updated_at: Timestamp::at(doc.updated_at),
        }
    }
}

/// What a policy does with a matching flow.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = AccessPolicy)]
pub struct PolicyView {
    pub id: String,
    pub name: String,
    /// evaluation order: lower first
    pub order: i64,
    #[schema(value_type = PolicyAction)]
    pub action: String,
    pub segment_ids: Vec<String>,
    pub connector_ids: Vec<String>,
    pub source_cidrs: Vec<String>,
    pub usernames: Vec<String>,
    #[schema(value_type = Vec<Platform>)]
    pub platforms: Vec<String>,
    pub range_ids: Vec<String>,
    pub enabled: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl From<&DocRow> for PolicyView {
    fn from(doc: &DocRow) -> Self {
        PolicyView {
            id: doc.id.clone(),
            name: doc.name.clone(),
            order: doc.position,
            action: doc.spec.get("action").and_then(Value::as_str).unwrap_or_default().to_string(),
            segment_ids: text_list(&doc.spec, "segment_ids"),
            connector_ids: text_list(&doc.spec, "connector_ids"),
            source_cidrs: text_list(&doc.spec, "source_cidrs"),
            usernames: text_list(&doc.spec, "usernames"),
            platforms: text_list(&doc.spec, "platforms"),
            range_ids: text_list(&doc.spec, "range_ids"),
            enabled: doc.enabled,
            created_at: Timestamp::at(doc.created_at),
            updated_at: Timestamp::at(doc.updated_at),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorStatus {
    Online,
    Offline,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Connector)]
pub struct ConnectorView {
    pub id: String,
    pub name: String,
    pub status: ConnectorStatus,
    pub last_seen: Option<Timestamp>,
    pub version: Option<String>,
    /// `tproxy`, `socks5` or `tun`, as the connector last reported
    pub mode: Option<String>,
    /// the addresses its DNS server answers on
    pub dns_listeners: Vec<String>,
    pub created_at: Timestamp,
    pub provisioning_key_id: String,
    pub provisioning_key_expires_at: Timestamp,
    pub provisioning_key_used_at: Option<Timestamp>,
    pub provisioning_key_reusable: bool,
}

/// A connector with a provisioning key's secret, shown this once.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ConnectorWithKey {
    #[serde(flatten)]
    pub connector: ConnectorView,
    /// the secret (`rbc_…`) for `reachback connector enroll`
    pub provisioning_key: String,
}

/// What an enrolled connector receives.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ConnectorEnrollment {
    pub connector_id: String,
    pub name: String,
    /// PEM client certificate for the tunnel
    pub certificate: String,
    pub ca_certificate: String,
    /// `host:port` of every broker endpoint
    pub broker_endpoints: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaStatus {
    Alive,
    Dead,
}

/// A server replica sharing the database.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Replica)]
pub struct ReplicaView {
    /// its `--node-name`
    pub node_name: String,
    /// the tunnel endpoint it hands agents and connectors (comma-separated when several)
    pub tunnel_endpoint: String,
    pub started_at: Timestamp,
    pub last_heartbeat: Timestamp,
    /// `dead`: no heartbeat for 3 s (its client sessions are deleted); dead replicas are listed for a day
    pub status: ReplicaStatus,
    /// client sessions (agent tunnels) it holds
    pub client_sessions: i64,
    /// connectors holding a tunnel to it, as of its last heartbeat
    pub connectors: i64,
    /// flows open that entered at it (the policy was checked there; a flow relayed to
    /// another replica's agent counts here), as of its last heartbeat
    pub flows: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ClientSession {
    pub id: String,
    pub device_id: String,
    pub client_hostname: String,
    pub username: String,
    #[schema(value_type = Platform)]
    pub platform: String,
    pub virtual_ip: Option<String>,
    /// the replica holding the tunnel
    pub broker_node: String,
    pub remote_addr: String,
    pub connected_at: Timestamp,
}

impl From<&ClientSessionRow> for ClientSession {
    fn from(row: &ClientSessionRow) -> Self {
        ClientSession {
            id: row.id.clone(),
            device_id: row.device_id.clone(),
            client_hostname: row.client_hostname.clone(),
            username: row.username.clone(),
            platform: row.platform.clone(),
            virtual_ip: row.virtual_ip.clone(),
            broker_node: row.broker_node.clone(),
            remote_addr: row.remote_addr.clone(),
            connected_at: Timestamp::at(row.connected_at),
        }
    }
}

/// The caller as the server knows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Me {
    pub id: String,
    pub username: String,
    #[schema(value_type = RoleName)]
    pub role: String,
    /// `session:…` for a console session, `key:…` for an API key
    pub session_id: String,
    /// the console's CSRF token (cookie sessions only)
    pub csrf_token: Option<String>,
}

/// What an enrolled device receives.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Enrollment {
    pub device_id: String,
    pub virtual_ip: String,
    pub range_name: String,
    pub certificate: String,
    pub ca_certificate: String,
    pub broker_endpoints: Vec<String>,
}

/// A renewed device certificate.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeviceRenewal {
    pub certificate: String,
    pub ca_certificate: String,
    pub virtual_ip: Option<String>,
}

/// A renewed connector certificate.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ConnectorRenewal {
    pub certificate: String,
    pub ca_certificate: String,
}

/// A console sign-in.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SignIn {
    pub username: String,
    #[schema(value_type = RoleName)]
    pub role: String,
    /// send back as `X-CSRF-Token` on every change
    pub csrf_token: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EnrollmentDay {
    /// `YYYY-MM-DD`
    #[schema(format = Date)]
    pub date: String,
    pub enrollments: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EnrollmentStats {
    pub days: Vec<EnrollmentDay>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PlatformCount {
    #[schema(value_type = Platform)]
    pub platform: String,
    pub bindings: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BindingStats {
    pub by_platform: Vec<PlatformCount>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UserCount {
    pub username: String,
    pub bindings: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TopUsers {
    pub items: Vec<UserCount>,
}

/// The internal CA and where the API answers.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CaInfo {
    /// PEM
    pub certificate: String,
    /// `sha256:…` of the CA's public key, for `--ca-pin`
    pub pin: String,
    pub api_urls: Vec<String>,
}

/// One interval an address was bound to a device: `bound_at` inclusive,
/// `released_at` exclusive (null while held).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = BindingInterval)]
pub struct HistoryView {
    pub id: String,
    pub ip: String,
    pub device_id: String,
    pub username: String,
    pub client_hostname: String,
    #[schema(value_type = Platform)]
    pub platform: String,
    pub range_id: String,
    pub range_name: String,
    pub bound_at: Timestamp,
    /// how it began: `enrolled`, `rebound`, `quarantine_reuse`, `migrated`
    pub bound_reason: String,
    pub released_at: Option<Timestamp>,
    /// why it ended: `admin_release`, `device_deleted`, `device_left`, `range_deleted`, `idle_ttl`; null while held
    pub reason: Option<String>,
}

impl From<&HistoryRow> for HistoryView {
    fn from(row: &HistoryRow) -> Self {
        HistoryView {
            id: row.id.to_string(),
            ip: row.ip.clone(),
            device_id: row.device_id.clone(),
            username: row.username.clone(),
            client_hostname: row.client_hostname.clone(),
            platform: row.platform.clone(),
            range_id: row.range_id.clone(),
            range_name: row.range_name.clone(),
            bound_at: Timestamp::at(row.bound_at),
            bound_reason: row.bound_reason.clone(),
            released_at: Timestamp::maybe(row.released_at),
            reason: row.reason.clone(),
        }
    }
}

/// Who held an address at an instant, and the holders before and after.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Trace {
    pub ip: String,
    pub at: Timestamp,
    pub holder: Option<HistoryView>,
    pub previous: Option<HistoryView>,
    pub next: Option<HistoryView>,
}

/// What became of a flow.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    /// the policy allowed it and the agent took it
    Allowed,
    /// the access policy denied it (`policy_name`; null: no policy matched, the default deny)
    Denied,
    /// no agent held the virtual address
    Offline,
    /// the agent said no: its allow-list (`port_not_allowed`) or its local connect (`connect_failed`)
    RefusedByAgent,
    /// no answer came: the agent's tunnel failed (`agent_error`) or the agent did not answer in time (`timeout`)
    Failed,
}

/// A flow's transport.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowProtocol {
    Tcp,
    Udp,
}

/// One flow through a connector: from `started_at` (its request arrived) to
/// `ended_at` (both inclusive; a refusal ends when it is decided), who it reached,
/// the verdict, the bytes.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Flow)]
pub struct FlowView {
    pub id: String,
    pub started_at: Timestamp,
    pub ended_at: Timestamp,
    #[schema(value_type = FlowProtocol)]
    pub protocol: String,
    #[schema(value_type = FlowVerdict)]
    pub verdict: String,
    /// why the agent refused or the flow failed: `port_not_allowed`, `connect_failed`, `agent_error`, `timeout`
    pub reason: Option<String>,
    /// the policy that allowed or denied it; null for a default deny (or no decision: offline)
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    pub connector_id: String,
    /// the connector's name when the flow came through it
    pub connector_name: String,
    /// the server's source address and port
    pub server_ip: String,
    #[schema(minimum = 0, maximum = 65535)]
    pub server_port: i64,
    /// the virtual address and port the server asked for
    pub virtual_ip: String,
    #[schema(minimum = 0, maximum = 65535)]
    pub virtual_port: i64,
    /// the device that held the virtual address then (null: offline, no agent held it)
    pub device_id: Option<String>,
    pub username: Option<String>,
    pub client_hostname: Option<String>,
    #[schema(value_type = Option<Platform>)]
    pub platform: Option<String>,
    /// the SOCKS5 user the connector authenticated (flows that came in over SOCKS5)
    pub socks_user: Option<String>,
    /// bytes relayed towards the client device (for UDP, datagrams with their 2-byte length)
    #[schema(minimum = 0)]
    pub bytes_to_client: i64,
    /// bytes relayed from the client device towards the server
    #[schema(minimum = 0)]
    pub bytes_from_client: i64,
    /// the replica whose broker relayed it
    pub node_name: String,
}

impl From<&FlowRow> for FlowView {
    fn from(row: &FlowRow) -> Self {
        FlowView {
            id: row.id.to_string(),
            started_at: Timestamp::at(row.started_at),
            ended_at: Timestamp::at(row.ended_at),
            protocol: row.protocol.clone(),
            verdict: row.verdict.clone(),
            reason: row.reason.clone(),
            policy_id: row.policy_id.clone(),
            policy_name: row.policy_name.clone(),
            connector_id: row.connector_id.clone(),
            connector_name: row.connector_name.clone(),
            server_ip: row.server_ip.clone(),
            server_port: row.server_port,
            virtual_ip: row.virtual_ip.clone(),
            virtual_port: row.virtual_port,
            device_id: row.device_id.clone(),
            username: row.username.clone(),
            client_hostname: row.client_hostname.clone(),
            platform: row.platform.clone(),
            socks_user: row.socks_user.clone(),
            bytes_to_client: row.bytes_to_client,
            bytes_from_client: row.bytes_from_client,
            node_name: row.node_name.clone(),
        }
    }
}

/// Where a sink sends events.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// HTTPS POST of CloudEvents batches, signed per Standard Webhooks
    Webhook,
    /// RFC 5424 over TCP (`tcp://host:port`) or TLS (`tls://host:port`)
    Syslog,
}

/// An event sink and how its delivery stands.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = EventSink)]
pub struct EventSinkView {
    pub id: String,
    pub name: String,
    #[schema(value_type = SinkKind)]
    pub kind: String,
    pub target: String,
    /// CloudEvents type prefixes it receives (empty: every event)
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// PEM CA certificates its TLS certificate is checked against (null: the system's)
    pub ca_certificate: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub delivered_total: i64,
    /// events waiting for it
    pub pending: i64,
    /// when the oldest waiting event happened
    pub oldest_pending_at: Option<Timestamp>,
    /// failed attempts since the last delivery
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<Timestamp>,
    pub last_delivery_at: Option<Timestamp>,
    /// when the next attempt is due after failures (null: now)
    pub next_attempt_at: Option<Timestamp>,
}

impl From<&SinkRow> for EventSinkView {
    fn from(row: &SinkRow) -> Self {
        EventSinkView {
            id: row.id.clone(),
            name: row.name.clone(),
            kind: row.kind.clone(),
            target: row.target.clone(),
            event_types: row.event_types.clone(),
            enabled: row.enabled,
            ca_certificate: row.ca_certificate.clone(),
            created_at: Timestamp::at(row.created_at),
            updated_at: Timestamp::at(row.updated_at),
            delivered_total: row.delivered_total,
            pending: row.pending,
            oldest_pending_at: Timestamp::maybe(row.oldest_pending_at),
            failures: row.failures,
            last_error: row.last_error.clone(),
            last_attempt_at: Timestamp::maybe(row.last_attempt_at),
            last_delivery_at: Timestamp::maybe(row.last_delivery_at),
            next_attempt_at: (row.next_attempt_at > 0).then(|| Timestamp::at(row.next_attempt_at)),
        }
    }
}

/// A sink as created or changed, with a webhook's new signing secret (shown once).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NewEventSink {
    #[serde(flatten)]
    pub sink: EventSinkView,
    /// `whsec_…`: verify the `webhook-signature` header with it (Standard Webhooks);
    /// present only when the server made a new one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_enums_are_the_stored_names() {
        let verdicts: Vec<Value> =
            [FlowVerdict::Allowed, FlowVerdict::Denied, FlowVerdict::Offline, FlowVerdict::RefusedByAgent, FlowVerdict::Failed].iter().map(json_of).collect();
        let stored: Vec<Value> = reachback_store::FlowVerdict::ALL.iter().map(|verdict| Value::from(verdict.as_str())).collect();
        assert_eq!(verdicts, stored);
        let protocols: Vec<Value> = [FlowProtocol::Tcp, FlowProtocol::Udp].iter().map(json_of).collect();
        let stored: Vec<Value> = reachback_store::FlowProtocol::ALL.iter().map(|protocol| Value::from(protocol.as_str())).collect();
        assert_eq!(protocols, stored);
    }

    #[test]
    fn the_platform_enum_is_the_validated_list() {
        let names: Vec<Value> = [Platform::Windows, Platform::Macos, Platform::Linux, Platform::Ios, Platform::Android].iter().map(json_of).collect();
        let validated: Vec<Value> = crate::validate::PLATFORMS.iter().map(|name| Value::from(*name)).collect();
        assert_eq!(names, validated);
    }
}
