//! What the API takes, as types: the request body of every operation that has
//! one. The OpenAPI document's request schemas are derived from these (utoipa),
//! and [`crate::request::Fields::of`] refuses, from the same schema, a field a
//! type does not have and a `null` where the type does not take one. The handler
//! then reads the values field by field, so each bad value is reported against
//! its field; the limits written here are the ones the handler enforces.
//!
//! Conventions: a field that is required when creating is not an `Option`; an
//! `Option` marked `nullable = false` may be left out (no change, or the
//! default) but not sent as `null`; a plain `Option` takes `null`, which clears
//! the value.

#![allow(dead_code)] // the fields are read from JSON by name; these types describe them

use utoipa::ToSchema;

use crate::api::views::{LocationView, Platform, PolicyAction, RoleName};

/// A name: 1 to 128 characters, no control, invisible or bidirectional-control
/// characters, stored trimmed and in Unicode NFC; names that look alike
/// (TR39 confusables, case) are one name.
const NAME_PATTERN: &str = r"^[^\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8](?:[^\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8]*[^\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8])?$";

/// An IPv4 or IPv6 CIDR, or an inclusive span `first-last` of one family.
const RANGE_PATTERN: &str =
    r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2}|-[0-9]{1,3}(?:\.[0-9]{1,3}){3})?|[0-9A-Fa-f:.]{2,45}(?:/[0-9]{1,3}|-[0-9A-Fa-f:.]{2,45})?)$";

/// A port or an inclusive port span.
const PORT_PATTERN: &str = r"^(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})(?:-(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$";

/// A fully qualified host name (at least two labels; the last not all digits).
const FQDN_PATTERN: &str = r"^(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$";

/// An IPv4 or IPv6 CIDR.
pub const CIDR_PATTERN: &str = r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}/(?:3[0-2]|[12]?[0-9])|(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:))/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))$";

/// An address, a CIDR or a hostname pattern (`host.domain`, `*.domain`).
const DESTINATION_PATTERN: &str = r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}(?:/(?:3[0-2]|[12]?[0-9]))?|(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:))(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?|(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$";

/// An exact FQDN or `*.suffix`.
const HOSTNAME_PATTERN: &str = r"^(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$";

/// Text without control characters.
const PLAIN_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";

/// A PEM public key.
const PEM_PATTERN: &str = r"^-----BEGIN PUBLIC KEY-----";

/// The fields of an IP range; `name` and `range` are required when creating.
#[derive(ToSchema)]
#[schema(as = IpRangeFields)]
pub struct RangeBody {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8](?:[^\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8])?$"
    )]
    name: String,
    #[schema(nullable = false, max_length = 1024, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    description: Option<String>,
    /// a CIDR (`100.64.0.0/24`, `fd7a:115c:a1e0::/64`) or an inclusive span (`100.64.0.10-100.64.0.99`);
    /// it must not overlap another range
    #[schema(
        pattern = "^(?:[0-9]{1,3}(?:\\.[0-9]{1,3}){3}(?:/[0-9]{1,2}|-[0-9]{1,3}(?:\\.[0-9]{1,3}){3})?|[0-9A-Fa-f:.]{2,45}(?:/[0-9]{1,3}|-[0-9A-Fa-f:.]{2,45})?)$"
    )]
    range: String,
    /// `null` clears the location
    location: Option<LocationView>,
    #[schema(nullable = false)]
    enabled: Option<bool>,
}

/// The fields of a new enrollment key.
#[derive(ToSchema)]
#[schema(as = EnrollmentKeyFields)]
pub struct KeyBody {
    /// the user the enrolled devices belong to
    #[schema(min_length = 1, max_length = 256, pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f](?:[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f])?$")]
    username: String,
    #[schema(nullable = false)]
    reusable: Option<bool>,
    /// `null` (or left out): the key does not expire
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[schema(nullable = false, max_length = 1024, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    description: Option<String>,
    /// an exact FQDN or `*.suffix`: the hostnames the key may enroll
    #[schema(
        nullable = false,
        max_length = 255,
        pattern = r"^(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
    )]
    hostname_pattern: Option<String>,
}

/// A device's enrollment.
#[derive(ToSchema)]
#[schema(as = EnrollmentFields)]
pub struct EnrollBody {
    /// the enrollment key's secret (`rbe_…`)
    #[schema(min_length = 1, max_length = 256)]
    enrollment_key: String,
    #[schema(
        max_length = 254,
        pattern = r"^(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
    )]
    hostname: String,
    platform: Platform,
    /// PEM public key (ECDSA P-256 or Ed25519) of the device's own key pair
    #[schema(pattern = "^-----BEGIN PUBLIC KEY-----")]
    public_key: String,
    /// where the device says it is (helps pick a range); `null` or left out: unknown
    location: Option<LocationView>,
}

/// A request signed by an enrolled key (renewal or leave).
#[derive(ToSchema)]
#[schema(as = SignedRequestFields)]
pub struct SignedBody {
    /// the enrolled PEM public key
    #[schema(pattern = "^-----BEGIN PUBLIC KEY-----")]
    public_key: String,
    /// seconds since the epoch when the request was signed (within the clock window)
    #[schema(minimum = 0)]
    signed_at: i64,
    /// base64 signature of the request message
    #[schema(min_length = 1)]
    signature: String,
}

/// The fields of a new administrator.
#[derive(ToSchema)]
#[schema(as = AdminFields)]
pub struct AdminBody {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8](?:[^\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8])?$"
    )]
    username: String,
    role: RoleName,
    /// a console password (10 to 1024 characters); without one the admin uses API keys only
    #[schema(nullable = false, min_length = 10, max_length = 1024)]
    password: Option<String>,
}

/// An administrator's console password.
#[derive(ToSchema)]
#[schema(as = PasswordFields)]
pub struct PasswordBody {
    /// 10 to 1024 characters; `null` clears it (API keys only from then on)
    #[schema(min_length = 10, max_length = 1024)]
    password: Option<String>,
}

/// The fields of a new API key.
#[derive(ToSchema)]
#[schema(as = ApiKeyFields)]
pub struct ApiKeyBody {
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f](?:[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f])?$")]
    name: String,
}

/// The settings an admin may change (each left out keeps its value).
#[derive(ToSchema)]
#[schema(as = SettingsFields)]
pub struct SettingsBody {
    /// DNS suffixes (at most 100)
    #[schema(nullable = false, max_items = 100, inline)]
    client_domains: Option<Vec<DomainName>>,
    /// 0 (never) to ten years
    #[schema(nullable = false, minimum = 0, maximum = 315_360_000)]
    binding_idle_ttl_seconds: Option<i64>,
    #[schema(nullable = false, minimum = 0, maximum = 31_536_000)]
    release_quarantine_seconds: Option<i64>,
    #[schema(nullable = false, minimum = 60, maximum = 31_622_400)]
    provisioning_key_ttl_seconds: Option<i64>,
    #[schema(nullable = false, minimum = 1, maximum = 100_000_000)]
    export_limit: Option<i64>,
    /// how long a closed binding interval is kept (1 to 3,650 days)
    #[schema(nullable = false, minimum = 1, maximum = 3650)]
    binding_history_retention_days: Option<i64>,
    /// whether the broker records every flow in the flow log
    #[schema(nullable = false)]
    flow_log_enabled: Option<bool>,
    /// how long an ended flow is kept in the flow log (1 to 3,650 days)
    #[schema(nullable = false, minimum = 1, maximum = 3650)]
    flow_log_retention_days: Option<i64>,
}

/// Console sign-in.
#[derive(ToSchema)]
#[schema(as = SignInFields)]
pub struct LoginBody {
    #[schema(min_length = 1, max_length = 128)]
    username: String,
    #[schema(min_length = 1, max_length = 1024)]
    password: String,
}

/// The console pages whose filters can be saved.
#[derive(ToSchema)]
#[schema(rename_all = "kebab-case")]
pub enum ConsolePage {
    IpRanges,
    IpBindings,
    Devices,
    ClientSessions,
    Flows,
    AuditLogs,
    EnrollmentKeys,
    AppSegments,
    AccessPolicies,
    Connectors,
    Admins,
    AdminSessions,
    EventSinks,
}

/// A saved filter: the console page, a name and the page's query string.
#[derive(ToSchema)]
#[schema(as = SavedFilterFields)]
pub struct FilterBody {
    page: ConsolePage,
    #[schema(min_length = 1, max_length = 64, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    name: String,
    #[schema(max_length = 2048, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    query: String,
}

/// The fields of an application segment; `name` and `destinations` are required when creating.
#[derive(ToSchema)]
#[schema(as = AppSegmentFields)]
pub struct SegmentBody {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8](?:[^\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8])?$"
    )]
    name: String,
    /// addresses, CIDRs or ranges of the virtual address space (at most 256)
    #[schema(min_items = 1, max_items = 256, inline)]
    destinations: Vec<Destination>,
    /// ports or spans such as `22` or `8000-8080` (at most 256)
    #[schema(nullable = false, max_items = 256, inline)]
    tcp_ports: Option<Vec<PortSpan>>,
    #[schema(nullable = false, max_items = 256, inline)]
    udp_ports: Option<Vec<PortSpan>>,
    #[schema(nullable = false)]
    enabled: Option<bool>,
}

/// A port (1–65535) or an inclusive span `first-last`.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = "^(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})(?:-(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$")]
pub struct PortSpan(String);

/// A destination: an address, a CIDR, a span `first-last`, or a hostname pattern.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}(?:/(?:3[0-2]|[12]?[0-9]))?|(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:))(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?|(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$")]
pub struct Destination(String);

/// An IPv4 or IPv6 CIDR.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}/(?:3[0-2]|[12]?[0-9])|(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:))/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))$")]
pub struct Cidr(String);

/// A user name as enrollment keys carry it.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f](?:[^\\x00-\\x1f\\x7f-\\x9f]{0,254}[^\\s\\x00-\\x1f\\x7f-\\x9f])?$")]
pub struct UserName(String);

/// A DNS domain.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")]
pub struct DomainName(String);

/// The fields of an access policy; `name` and `action` are required when creating.
#[derive(ToSchema)]
#[schema(as = AccessPolicyFields)]
pub struct PolicyBody {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8](?:[^\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8])?$"
    )]
    name: String,
    /// evaluation order, lower first (0 to 1,000,000,000)
    #[schema(nullable = false, minimum = 0, maximum = 1_000_000_000)]
    order: Option<i64>,
    action: PolicyAction,
    /// ids of application segments (empty: every destination)
    #[schema(nullable = false, max_items = 256)]
    segment_ids: Option<Vec<String>>,
    #[schema(nullable = false, max_items = 256)]
    connector_ids: Option<Vec<String>>,
    /// server source CIDRs
    #[schema(nullable = false, max_items = 256, inline)]
    source_cidrs: Option<Vec<Cidr>>,
    #[schema(nullable = false, max_items = 256, inline)]
    usernames: Option<Vec<UserName>>,
    #[schema(nullable = false, max_items = 256)]
    platforms: Option<Vec<Platform>>,
    #[schema(nullable = false, max_items = 256)]
    range_ids: Option<Vec<String>>,
    #[schema(nullable = false)]
    enabled: Option<bool>,
}

/// The fields of a new connector and its first provisioning key.
#[derive(ToSchema)]
#[schema(as = ConnectorFields)]
pub struct ConnectorBody {
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8](?:[^\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u206f\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8])?$"
    )]
    name: String,
    /// how long the key stays valid (60 s to 366 days; default: the setting)
    #[schema(nullable = false, minimum = 60, maximum = 31_622_400)]
    provisioning_key_ttl_seconds: Option<i64>,
    /// or until when (in the future, at most 366 days ahead)
    #[schema(nullable = false, format = DateTime)]
    provisioning_key_expires_at: Option<String>,
    /// whether the key may enroll more than once
    #[schema(nullable = false)]
    provisioning_key_reusable: Option<bool>,
}

/// The fields of a connector's new provisioning key (all optional; `{}` takes the defaults).
#[derive(ToSchema)]
#[schema(as = ProvisioningKeyFields)]
pub struct ProvisioningKeyBody {
    #[schema(nullable = false, minimum = 60, maximum = 31_622_400)]
    provisioning_key_ttl_seconds: Option<i64>,
    #[schema(nullable = false, format = DateTime)]
    provisioning_key_expires_at: Option<String>,
    #[schema(nullable = false)]
    provisioning_key_reusable: Option<bool>,
}

/// The fields of an event sink; `name`, `kind` and `target` are required when creating.
#[derive(ToSchema)]
#[schema(as = EventSinkFields)]
pub struct SinkBody {
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    kind: crate::api::views::SinkKind,
    /// a webhook's `https://` URL (no credentials in it), or `tcp://host:port` / `tls://host:port` for syslog
    #[schema(max_length = 2048, pattern = r"^(?:https?://[^\s@/?#]+(?:[/?#][^\s]*)?|(?:tcp|tls)://[^\s@/?#]+:[0-9]{1,5})$")]
    target: String,
    /// CloudEvents type prefixes to send (`com.reachback.binding.`, `com.reachback.ip_range.`); none: every event
    #[schema(nullable = false, max_items = 64, inline)]
    event_types: Option<Vec<EventTypePrefix>>,
    #[schema(nullable = false)]
    enabled: Option<bool>,
    /// PEM CA certificates for the sink's TLS (`null`: the system's roots)
    #[schema(max_length = 65536, pattern = "-----BEGIN CERTIFICATE-----")]
    ca_certificate: Option<String>,
}

/// A prefix of CloudEvents types.
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^com\.reachback\.[A-Za-z0-9_.]{0,100}$")]
pub struct EventTypePrefix(String);

/// A connector's enrollment.
#[derive(ToSchema)]
#[schema(as = ConnectorEnrollmentFields)]
pub struct ConnectorEnrollBody {
    /// the provisioning key's secret (`rbc_…`)
    #[schema(min_length = 1, max_length = 256)]
    provisioning_key: String,
    /// PEM public key (ECDSA P-256 or Ed25519) of the connector's own key pair
    #[schema(pattern = "^-----BEGIN PUBLIC KEY-----")]
    public_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_constants_are_the_ones_in_the_attributes() {
        // attributes need literals; the constants name them for readers and are checked here
        let schema = serde_json::to_value(<RangeBody as utoipa::PartialSchema>::schema()).unwrap_or_default();
        assert_eq!(schema["properties"]["name"]["pattern"], NAME_PATTERN);
        // the name rule is written out on each named resource (utoipa takes literals only): the copies agree
        for (body, field) in [
            (<AdminBody as utoipa::PartialSchema>::schema(), "username"),
            (<SegmentBody as utoipa::PartialSchema>::schema(), "name"),
            (<PolicyBody as utoipa::PartialSchema>::schema(), "name"),
            (<ConnectorBody as utoipa::PartialSchema>::schema(), "name"),
        ] {
            let body = serde_json::to_value(body).unwrap_or_default();
            assert_eq!(body["properties"][field]["pattern"], NAME_PATTERN, "{field}");
            assert_eq!((body["properties"][field]["minLength"].clone(), body["properties"][field]["maxLength"].clone()), (1.into(), 128.into()), "{field}");
        }
        assert_eq!(schema["properties"]["range"]["pattern"], RANGE_PATTERN);
        assert_eq!(schema["properties"]["description"]["pattern"], PLAIN_PATTERN);
        let enroll = serde_json::to_value(<EnrollBody as utoipa::PartialSchema>::schema()).unwrap_or_default();
        assert_eq!(enroll["properties"]["hostname"]["pattern"], FQDN_PATTERN);
        let key = serde_json::to_value(<KeyBody as utoipa::PartialSchema>::schema()).unwrap_or_default();
        assert_eq!(key["properties"]["hostname_pattern"]["pattern"], HOSTNAME_PATTERN);
        for (schema, pattern) in [
            (<Cidr as utoipa::PartialSchema>::schema(), CIDR_PATTERN),
            (<Destination as utoipa::PartialSchema>::schema(), DESTINATION_PATTERN),
            (<DomainName as utoipa::PartialSchema>::schema(), FQDN_PATTERN),
        ] {
            assert_eq!(serde_json::to_value(schema).unwrap_or_default()["pattern"], pattern);
        }
        assert_eq!(enroll["properties"]["public_key"]["pattern"], PEM_PATTERN);
        let port = serde_json::to_value(<PortSpan as utoipa::PartialSchema>::schema()).unwrap_or_default();
        assert_eq!(port["pattern"], PORT_PATTERN);
    }
}
