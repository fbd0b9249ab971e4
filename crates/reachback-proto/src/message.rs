//! The messages of the tunnel protocol.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What kind of peer opened a tunnel (its certificate says so too; the broker
/// trusts the certificate, this is a consistency check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientRole {
    Agent,
    Connector,
    /// another server replica, relaying flows that entered there to agents attached here
    Replica,
}

/// The broker's answer to [`Control::Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// the client session id (agents) or connector id (connectors)
    pub session_id: String,
    /// the agent's virtual address; `None` for connectors
    pub virtual_ip: Option<String>,
    /// the virtual ranges (connectors route them), canonical text
    pub ranges: Vec<String>,
    /// seconds between keepalives the broker expects
    pub keepalive_seconds: u64,
}

/// Messages on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// first message of a client: who it is and how it runs
    Hello {
        role: ClientRole,
        version: String,
        mode: Option<String>,
        /// a connector that answers DNS (`--dns-listen`) asks for the bound hostnames
        #[serde(default)]
        names: bool,
        /// the addresses a connector answers DNS on (shown in the connector list)
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dns_listen: Vec<String>,
    },
    /// the broker accepted the tunnel
    Welcome(Welcome),
    /// the virtual ranges changed (to connectors)
    Ranges {
        ranges: Vec<String>,
    },
    /// liveness probe; answered with `Pong` carrying the same sequence number
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// the broker ends the tunnel (session deleted, device revoked); no reconnect when `final`
    Bye {
        reason: String,
        r#final: bool,
    },
    /// bound hostnames for a connector's DNS: a snapshot in chunks, then changes
    Names(NameUpdate),
    /// a client asks for a fresh certificate for the key it connected with
    Renew,
    /// the broker's answer to `Renew`: the new certificate (PEM), same key, new validity
    Certificate {
        certificate: String,
    },
}

/// A piece of the connector's DNS table. A snapshot is a run of updates, the first
/// with `reset` (start a new table) and the last with `done` (answer from it now);
/// after it, updates carry changes and apply at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameUpdate {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// the client domains (zones), when they are set or changed
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<String>>,
    /// (hostname, virtual IP) now bound
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bind: Vec<(String, String)>,
    /// virtual IPs no longer bound
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbind: Vec<String>,
    /// virtual ranges deleted: every name whose address lies in one goes
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbind_ranges: Vec<String>,
    /// when the newest change carried here was made at the server (microseconds
    /// since the Unix epoch): the connector's sync lag is its clock minus this
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_at_us: Option<i64>,
}

/// How many bytes of entries a [`NameUpdate`] carries at most, so its frame stays
/// well under [`crate::MAX_FRAME`].
pub const NAME_UPDATE_BUDGET: usize = 12 * 1024;

impl NameUpdate {
    /// The JSON bytes an entry adds, roughly (quotes, commas, brackets).
    pub fn entry_cost(first: &str, second: &str) -> usize {
        first.len() + second.len() + 8
    }

    /// Splits bindings into updates that each fit a frame (none when there are none).
    pub fn chunks(bind: Vec<(String, String)>, unbind: Vec<String>) -> Vec<NameUpdate> {
        let mut updates = Vec::new();
        let mut current = NameUpdate::default();
        let mut cost = 0;
        for (hostname, address) in bind {
            let entry = Self::entry_cost(&hostname, &address);
            if cost + entry > NAME_UPDATE_BUDGET && cost > 0 {
                updates.push(std::mem::take(&mut current));
                cost = 0;
            }
            cost += entry;
            current.bind.push((hostname, address));
        }
        for address in unbind {
            let entry = Self::entry_cost(&address, "");
            if cost + entry > NAME_UPDATE_BUDGET && cost > 0 {
                updates.push(std::mem::take(&mut current));
                cost = 0;
            }
            cost += entry;
            current.unbind.push(address);
        }
        if cost > 0 {
            updates.push(current);
        }
        updates
    }
}

/// First frame of a flow stream: from the connector to the broker (destination is
/// the virtual address and port), and from the broker to the agent (same fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowOpen {
    pub destination: SocketAddr,
    /// the server that connects (as the connector saw it)
    pub source: SocketAddr,
    /// the name a SOCKS5 client authenticated with (RFC 1929), when it did
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// TCP (a byte stream follows) or UDP (datagrams follow, see [`crate::datagram`])
    #[serde(default, skip_serializing_if = "Transport::is_tcp")]
    pub protocol: Transport,
}

/// The transport protocol of a flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

impl Transport {
    pub fn is_tcp(&self) -> bool {
        *self == Transport::Tcp
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Why a flow was not opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Refusal {
    /// no live agent holds the address
    Offline,
    /// the access policy denied it; `rule` names the deciding policy, `None` is the default deny
    Denied { rule: Option<String> },
    /// the agent's local allow-list does not have the port
    PortNotAllowed,
    /// the agent's local connect was refused or failed
    ConnectFailed { reason: String },
    /// nothing answered in time
    Timeout,
    /// the request itself was bad
    BadRequest { reason: String },
}

/// The answer to a [`FlowOpen`]: after `Ok`, the stream carries the flow's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum FlowReply {
    Ok,
    Refused(Refusal),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Offline => write!(formatter, "no live agent holds the address"),
            Refusal::Denied { rule: Some(rule) } => write!(formatter, "denied by policy {rule}"),
            Refusal::Denied { rule: None } => write!(formatter, "denied: no policy allows it"),
            Refusal::PortNotAllowed => write!(formatter, "the agent does not allow the port"),
            Refusal::ConnectFailed { reason } => write!(formatter, "the agent's local connect failed: {reason}"),
            Refusal::Timeout => write!(formatter, "timed out"),
            Refusal::BadRequest { reason } => write!(formatter, "bad request: {reason}"),
        }
    }
}
