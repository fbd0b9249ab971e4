//! The flow log: one row per flow the broker decided on — which server reached
//! which virtual address and port through which connector, who held the address
//! then, the verdict, and the bytes each way.
//!
//! Rows arrive in batches from the server's flow-log writer (never from the data
//! path itself) and are never updated; the listing, its streamed export and
//! retention follow the binding history's shapes (`history.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::stream::BoxStream;
use reachback_ipam::{address_key, split_address};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::enroll::placeholders;
use crate::{Backend, Filter, FilterValue, Result, Store, like_pattern};

/// What became of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    /// the policy allowed it and the agent took it; the row has its bytes
    Allowed,
    /// the access policy denied it (the row names the policy; none: the default deny)
    Denied,
    /// no agent held the virtual address
    Offline,
    /// the policy allowed it, the agent said no (its allow-list, or its local connect failed)
    RefusedByAgent,
    /// the policy allowed it and no answer came (the agent's tunnel failed, or it timed out)
    Failed,
}

impl FlowVerdict {
    /// Every verdict, as stored and shown.
    pub const ALL: [FlowVerdict; 5] = [FlowVerdict::Allowed, FlowVerdict::Denied, FlowVerdict::Offline, FlowVerdict::RefusedByAgent, FlowVerdict::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Allowed => "allowed",
            FlowVerdict::Denied => "denied",
            FlowVerdict::Offline => "offline",
            FlowVerdict::RefusedByAgent => "refused_by_agent",
            FlowVerdict::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<FlowVerdict> {
        FlowVerdict::ALL.into_iter().find(|verdict| verdict.as_str() == text)
    }
}

/// A flow's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowProtocol {
    Tcp,
    Udp,
}

impl FlowProtocol {
    pub const ALL: [FlowProtocol; 2] = [FlowProtocol::Tcp, FlowProtocol::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowProtocol::Tcp => "tcp",
            FlowProtocol::Udp => "udp",
        }
    }

    pub fn parse(text: &str) -> Option<FlowProtocol> {
        FlowProtocol::ALL.into_iter().find(|protocol| protocol.as_str() == text)
    }
}

/// A flow to record, as the broker saw it (the writer adds the node's name).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRecord {
    pub started_at: i64,
    pub ended_at: i64,
    pub protocol: FlowProtocol,
    pub verdict: FlowVerdict,
    /// why an agent refused or a flow failed (`port_not_allowed`, `connect_failed`, `agent_error`, `timeout`)
    pub reason: Option<&'static str>,
    /// the policy that decided (allowed or denied); `None` is the default deny
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    pub connector_id: Arc<str>,
    pub connector_name: Arc<str>,
    /// the server's source address and port
    pub server: SocketAddr,
    /// the virtual address and port it asked for
    pub destination: SocketAddr,
    /// who held the virtual address then; `None` when no agent did
    pub device_id: Option<String>,
    pub username: Option<String>,
    pub client_hostname: Option<String>,
    pub platform: Option<String>,
    /// the SOCKS5 user the connector authenticated
    pub socks_user: Option<String>,
    pub bytes_to_client: u64,
    pub bytes_from_client: u64,
}

/// One stored flow.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRow {
    pub id: i64,
    pub started_at: i64,
    pub ended_at: i64,
    pub protocol: String,
    pub verdict: String,
    pub reason: Option<String>,
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    pub connector_id: String,
    pub connector_name: String,
    pub server_ip: String,
    pub server_port: i64,
    pub virtual_ip: String,
    pub virtual_port: i64,
    pub device_id: Option<String>,
    pub username: Option<String>,
    pub client_hostname: Option<String>,
    pub platform: Option<String>,
    pub socks_user: Option<String>,
    pub bytes_to_client: i64,
    pub bytes_from_client: i64,
    pub node_name: String,
}

/// Whether a flow spanning `[started_at, ended_at]` (both inclusive) overlaps the
/// window `[from, to]` (both inclusive, either open). The SQL filter says the same;
/// tests compare them.
pub fn flow_overlaps(started_at: i64, ended_at: i64, from: Option<i64>, to: Option<i64>) -> bool {
    to.is_none_or(|to| started_at <= to) && from.is_none_or(|from| ended_at >= from)
}

/// Sort orders of the flow log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlowSort {
    /// by start; the default, newest first
    #[default]
    StartedAt,
    EndedAt,
    /// numeric address order, then port
    VirtualIp,
    ServerIp,
    Username,
    ClientHostname,
    Verdict,
    Protocol,
    ConnectorName,
    /// both directions together
    Bytes,
    BytesToClient,
    BytesFromClient,
}

/// Filters, order and page of a flow-log listing. `limit` 0 means no limit (export).
#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    /// inclusive key bounds of an address or CIDR
    pub virtual_keys: Option<([u8; 17], [u8; 17])>,
    pub server_keys: Option<([u8; 17], [u8; 17])>,
    /// exact ids
    pub device_id: Option<String>,
    pub connector_id: Option<String>,
    /// substrings, case-insensitively
    pub username: Option<String>,
    pub client_hostname: Option<String>,
    pub verdict: Option<FlowVerdict>,
    pub protocol: Option<FlowProtocol>,
    /// flows overlapping `[from, to]`
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub sort: FlowSort,
    pub descending: bool,
    pub offset: i64,
    pub limit: i64,
}

/// Columns a flow row writes (the id comes from the database).
const FLOW_COLUMNS: usize = 23;
const FLOW_INSERT: &str = "INSERT INTO flow_log (started_at, ended_at, protocol, verdict, reason, policy_id, policy_name, connector_id, connector_name, \
     server_key, server_ip, server_port, virtual_key, virtual_ip, virtual_port, device_id, username, client_hostname, platform, socks_user, \
     bytes_to_client, bytes_from_client, node_name) VALUES {rows}";
/// Keeps the distinct (device, username, hostname) triples the substring filters search.
const CLIENTS_INSERT: &str = "INSERT INTO flow_log_clients (device_id, username, client_hostname) VALUES {rows} ON CONFLICT DO NOTHING";
/// Rows per INSERT statement (23 parameters each: 11,500 a statement).
const FLOW_INSERT_CHUNK: usize = 500;

const FLOW_SELECT: &str = "f.id, f.started_at, f.ended_at, f.protocol, f.verdict, f.reason, f.policy_id, f.policy_name, f.connector_id, f.connector_name, \
     f.server_ip, f.server_port, f.virtual_ip, f.virtual_port, f.device_id, f.username, f.client_hostname, f.platform, f.socks_user, \
     f.bytes_to_client, f.bytes_from_client, f.node_name";

fn flow_from_row(row: &AnyRow) -> Result<FlowRow> {
    Ok(FlowRow {
        id: row.try_get("id")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        protocol: row.try_get("protocol")?,
        verdict: row.try_get("verdict")?,
        reason: row.try_get("reason")?,
        policy_id: row.try_get("policy_id")?,
        policy_name: row.try_get("policy_name")?,
        connector_id: row.try_get("connector_id")?,
        connector_name: row.try_get("connector_name")?,
        server_ip: row.try_get("server_ip")?,
        server_port: integer(row, "server_port")?,
        virtual_ip: row.try_get("virtual_ip")?,
        virtual_port: integer(row, "virtual_port")?,
        device_id: row.try_get("device_id")?,
        username: row.try_get("username")?,
        client_hostname: row.try_get("client_hostname")?,
        platform: row.try_get("platform")?,
        socks_user: row.try_get("socks_user")?,
        bytes_to_client: row.try_get("bytes_to_client")?,
        bytes_from_client: row.try_get("bytes_from_client")?,
        node_name: row.try_get("node_name")?,
    })
}

/// An INTEGER column: 64-bit on SQLite, 32-bit on PostgreSQL.
fn integer(row: &AnyRow, column: &str) -> Result<i64> {
    match row.try_get::<i64, _>(column) {
        Ok(value) => Ok(value),
        Err(_) => Ok(i64::from(row.try_get::<i32, _>(column)?)),
    }
}

/// An address as the log keeps it: IPv4-mapped IPv6 as IPv4, so IPv4 filters find it.
fn canonical(address: IpAddr) -> IpAddr {
    address.to_canonical()
}

fn key_of(address: IpAddr) -> Vec<u8> {
    let (family, value) = split_address(canonical(address));
    address_key(family, value).to_vec()
}

/// Bytes counted as `u64`, kept as BIGINT.
fn stored_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Rows deleted per retention transaction.
pub const FLOW_PRUNE_BATCH_ROWS: i64 = 5_000;

/// From this many rows to skip on, a page's ids are found before its rows are read.
const DEFERRED_JOIN_OFFSET: i64 = 200;

impl Store {
    /// Writes a batch of flows in one transaction (the flow-log writer's batches),
    /// a multi-row INSERT per 500 flows.
    pub async fn insert_flows(&self, flows: &[FlowRecord], node_name: &str) -> Result<()> {
        if flows.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        let mark = match self.backend {
            Backend::Sqlite => '?',
            Backend::Postgres => '$',
        };
        for chunk in flows.chunks(FLOW_INSERT_CHUNK) {
            let sql = FLOW_INSERT.replace("{rows}", &placeholders(mark, chunk.len(), FLOW_COLUMNS, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for flow in chunk {
                let (server, destination) = (canonical(flow.server.ip()), canonical(flow.destination.ip()));
                query = query
                    .bind(flow.started_at)
                    .bind(flow.ended_at.max(flow.started_at))
                    .bind(flow.protocol.as_str())
                    .bind(flow.verdict.as_str())
                    .bind(flow.reason)
                    .bind(flow.policy_id.as_deref())
                    .bind(flow.policy_name.as_deref())
                    .bind(&*flow.connector_id)
                    .bind(&*flow.connector_name)
                    .bind(key_of(server))
                    .bind(server.to_string())
                    .bind(i32::from(flow.server.port()))
                    .bind(key_of(destination))
                    .bind(destination.to_string())
                    .bind(i32::from(flow.destination.port()))
                    .bind(flow.device_id.as_deref())
                    .bind(flow.username.as_deref())
                    .bind(flow.client_hostname.as_deref())
                    .bind(flow.platform.as_deref())
                    .bind(flow.socks_user.as_deref())
                    .bind(stored_bytes(flow.bytes_to_client))
                    .bind(stored_bytes(flow.bytes_from_client))
                    .bind(node_name);
            }
            query.execute(&mut *tx.transaction).await?;
        }
        // the batch's (device, username, hostname) triples the search does not know yet
        let mut clients: Vec<(&str, &str, &str)> =
            flows.iter().filter_map(|flow| Some((flow.device_id.as_deref()?, flow.username.as_deref()?, flow.client_hostname.as_deref()?))).collect();
        clients.sort_unstable();
        clients.dedup();
        for chunk in clients.chunks(FLOW_INSERT_CHUNK) {
            let sql = CLIENTS_INSERT.replace("{rows}", &placeholders(mark, chunk.len(), 3, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (device_id, username, client_hostname) in chunk {
                query = query.bind(*device_id).bind(*username).bind(*client_hostname);
            }
            query.execute(&mut *tx.transaction).await?;
        }
        tx.commit().await
    }

    fn flow_filter(&self, query: &FlowQuery) -> Filter {
        let mut filter = Filter::new();
        for (column, keys) in [("virtual_key", query.virtual_keys), ("server_key", query.server_keys)] {
            match keys {
                Some((first, last)) if first == last => filter.push(&format!("f.{column} = ?"), [FilterValue::Bytes(first.to_vec())]),
                Some((first, last)) => {
                    filter.push(&format!("f.{column} >= ? AND f.{column} <= ?"), [FilterValue::Bytes(first.to_vec()), FilterValue::Bytes(last.to_vec())])
                }
                None => {}
            }
        }
        if let Some(to) = query.to {
            filter.push("f.started_at <= ?", [FilterValue::Int(to)]);
        }
        if let Some(from) = query.from {
            filter.push("f.ended_at >= ?", [FilterValue::Int(from)]);
        }
        for (column, value) in [("device_id", &query.device_id), ("connector_id", &query.connector_id)] {
            if let Some(value) = value {
                filter.push(&format!("f.{column} = ?"), [FilterValue::Text(value.clone())]);
            }
        }
        if let Some(verdict) = query.verdict {
            filter.push("f.verdict = ?", [FilterValue::Text(verdict.as_str().to_string())]);
        }
        if let Some(protocol) = query.protocol {
            filter.push("f.protocol = ?", [FilterValue::Text(protocol.as_str().to_string())]);
        }
        for (column, value) in [("username", &query.username), ("client_hostname", &query.client_hostname)] {
            let Some(needle) = value else { continue };
            // the devices whose triples match, found over the few triples (by their trigram
            // index: SQLite's full-text table for three characters or more, PostgreSQL's
            // GIN index serving the LIKE), then their flows by the device index; the LIKE
            // on the flow's own copy decides
            let pattern = FilterValue::Text(like_pattern(needle));
            let mut candidates = format!("SELECT c.device_id FROM flow_log_clients c WHERE lower(c.{column}) LIKE ? ESCAPE '\\'");
            let mut values = vec![pattern.clone()];
            if self.backend == Backend::Sqlite && needle.chars().count() >= 3 {
                candidates.push_str(" AND c.id IN (SELECT rowid FROM flow_log_clients_search WHERE flow_log_clients_search MATCH ?)");
                values.push(FilterValue::Text(format!("{column} : \"{}\"", needle.to_lowercase().replace('"', "\"\""))));
            }
            filter.push(&format!("f.device_id IN ({candidates})"), values);
            filter.push(&format!("lower(f.{column}) LIKE ? ESCAPE '\\'"), [pattern]);
        }
        filter
    }

    /// The ORDER BY of a flow query: the sort column, then start and id, all in the
    /// same direction (a total order, so pages never overlap). Nullable columns sort
    /// as empty text, the same on both backends.
    fn flow_order(query: &FlowQuery) -> String {
        let direction = if query.descending { "DESC" } else { "ASC" };
        let leading: &[&str] = match query.sort {
            FlowSort::StartedAt => &[],
            FlowSort::EndedAt => &["f.ended_at"],
            FlowSort::VirtualIp => &["f.virtual_key", "f.virtual_port"],
            FlowSort::ServerIp => &["f.server_key", "f.server_port"],
            FlowSort::Username => &["COALESCE(f.username, '')"],
            FlowSort::ClientHostname => &["COALESCE(f.client_hostname, '')"],
            FlowSort::Verdict => &["f.verdict"],
            FlowSort::Protocol => &["f.protocol"],
            FlowSort::ConnectorName => &["f.connector_name"],
            FlowSort::Bytes => &["(f.bytes_to_client + f.bytes_from_client)"],
            FlowSort::BytesToClient => &["f.bytes_to_client"],
            FlowSort::BytesFromClient => &["f.bytes_from_client"],
        };
        leading.iter().chain(["f.started_at", "f.id"].iter()).map(|column| format!("{column} {direction}")).collect::<Vec<_>>().join(", ")
    }

    /// How many flows match.
    pub async fn count_flows(&self, query: &FlowQuery) -> Result<i64> {
        let filter = self.flow_filter(query);
        let sql = format!("SELECT COUNT(*) FROM flow_log f{}", filter.sql());
        Ok(filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// One page of flows. A deep page finds its ids first, then reads only its rows.
    pub async fn flow_page(&self, query: &FlowQuery) -> Result<Vec<FlowRow>> {
        let filter = self.flow_filter(query);
        let order = Self::flow_order(query);
        let (limit, offset) = (query.limit.max(0), query.offset.max(0));
        let sql = if offset >= DEFERRED_JOIN_OFFSET {
            format!(
                "SELECT {FLOW_SELECT} FROM flow_log f WHERE f.id IN (SELECT f.id FROM flow_log f{} ORDER BY {order} LIMIT {limit} OFFSET {offset}) ORDER BY {order}",
                filter.sql()
            )
        } else {
            format!("SELECT {FLOW_SELECT} FROM flow_log f{} ORDER BY {order} LIMIT {limit} OFFSET {offset}", filter.sql())
        };
        let rows = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_all(&self.pool).await?;
        rows.iter().map(flow_from_row).collect()
    }

    /// Every matching flow in the listing's order, streamed (CSV export).
    pub fn stream_flows(&self, query: &FlowQuery) -> BoxStream<'static, Result<FlowRow>> {
        let filter = self.flow_filter(query);
        let sql = format!("SELECT {FLOW_SELECT} FROM flow_log f{} ORDER BY {}", filter.sql(), Self::flow_order(query));
        crate::audit::async_stream(self.pool.clone(), sql, filter, flow_from_row)
    }

    /// Deletes flows that ended before `cutoff`, `batch_rows` per transaction (so
    /// the writer's batches pass in between). Returns how many went; the run is
    /// audited (`audit` with the count) when any did.
    pub async fn prune_flows(&self, cutoff: i64, batch_rows: i64, audit: impl FnOnce(u64) -> AuditEntry) -> Result<u64> {
        let batch_rows = batch_rows.max(1);
        let mut deleted = 0u64;
        loop {
            let mut tx = self.write().await?;
            let gone = sqlx::query("DELETE FROM flow_log WHERE id IN (SELECT id FROM flow_log WHERE ended_at < $1 ORDER BY ended_at LIMIT $2)")
                .bind(cutoff)
                .bind(batch_rows)
                .execute(&mut *tx.transaction)
                .await?
                .rows_affected();
            tx.commit().await?;
            deleted += gone;
            if gone < u64::try_from(batch_rows).unwrap_or(u64::MAX) {
                break;
            }
            tokio::task::yield_now().await;
        }
        if deleted > 0 {
            self.record_audit(audit(deleted)).await?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_overlaps_the_windows_that_share_an_instant_with_it() {
        // [100, 200] against windows
        assert!(flow_overlaps(100, 200, None, None));
        assert!(flow_overlaps(100, 200, Some(200), None), "the end is inclusive");
        assert!(!flow_overlaps(100, 200, Some(201), None));
        assert!(flow_overlaps(100, 200, None, Some(100)), "the start is inclusive");
        assert!(!flow_overlaps(100, 200, None, Some(99)));
        assert!(flow_overlaps(150, 150, Some(150), Some(150)), "a flow of one instant is found by a window of that instant");
    }

    #[test]
    fn verdicts_and_protocols_are_stored_as_snake_case_names() {
        let names: Vec<&str> = FlowVerdict::ALL.iter().map(|verdict| verdict.as_str()).collect();
        assert_eq!(names, ["allowed", "denied", "offline", "refused_by_agent", "failed"]);
        for verdict in FlowVerdict::ALL {
            assert_eq!(FlowVerdict::parse(verdict.as_str()), Some(verdict));
        }
        assert_eq!(FlowVerdict::parse("Allowed"), None);
        assert_eq!((FlowProtocol::parse("udp"), FlowProtocol::parse("icmp")), (Some(FlowProtocol::Udp), None));
    }

    #[test]
    fn ipv4_mapped_addresses_are_kept_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(canonical(mapped).to_string(), "10.1.2.3");
        assert_eq!(key_of(mapped)[0], 4);
    }
}
