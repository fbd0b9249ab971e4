//! The replica registry (issue 21): which server processes share the database,
//! their heartbeats, and the clean-up of those that stopped. Times here are the
//! database's clock (one clock for every replica, whatever theirs say).
//!
//! Also the change channel: on PostgreSQL, triggers (migration 14) announce the
//! changes other replicas must see on [`CHANGE_CHANNEL`]; [`Store::change_listener`]
//! opens a connection listening to it.

use std::str::FromStr;

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, Result, Store, StoreError};

/// The PostgreSQL channel the change triggers notify; the payload is a topic
/// (`ranges`, `settings`, `policy`, `sessions`, `connectors`).
pub const CHANGE_CHANNEL: &str = "reachback_changes";

/// A replica as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRow {
    pub node_name: String,
    pub tunnel_endpoint: String,
    pub started_at: i64,
    pub last_heartbeat: i64,
    /// alive: its heartbeat is recent and nobody declared it dead
    pub alive: bool,
    /// client session rows it holds
    pub client_sessions: i64,
    /// connectors holding a tunnel to it, as of its last heartbeat
    pub connectors: i64,
    /// flows open that entered at it (policy checked there), as of its last heartbeat
    pub flows: i64,
}

/// What a heartbeat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// the row is this process's and was alive
    Alive,
    /// another replica had declared this one dead (its heartbeats were late): alive again
    Revived,
    /// the row belongs to another process now (or is gone)
    Lost,
}

/// The database's clock in microseconds, as an SQL expression.
fn db_now(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
    }
}

/// A stable 64-bit key for a node name's advisory lock (FNV-1a over a prefixed name).
fn node_lock_key(node_name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"reachback-replica:".iter().chain(node_name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// PostgreSQL: a session-level advisory lock on a node name, held on a connection of
/// its own for the process's life. Two live processes cannot hold the same name; a
/// process that dies loses the lock with its connection, so a restart under the same
/// name is not kept waiting.
pub struct NodeLock {
    options: sqlx::postgres::PgConnectOptions,
    key: i64,
    connection: Option<sqlx::PgConnection>,
}

impl NodeLock {
    /// Checks that the lock is still held: pings its connection; when the connection
    /// was lost, connects again and takes the lock again. `Ok(false)`: another
    /// process holds the name now.
    pub async fn check(&mut self) -> Result<bool> {
        use sqlx::Connection;
        if let Some(connection) = self.connection.as_mut()
            && connection.ping().await.is_ok()
        {
            return Ok(true);
        }
        self.connection = None;
        let mut connection = sqlx::PgConnection::connect_with(&self.options).await?;
        let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1)").bind(self.key).fetch_one(&mut connection).await?.try_get(0)?;
        if locked {
            self.connection = Some(connection);
        }
        Ok(locked)
    }
}

impl NodeLock {
    /// Gives the name up now (the lock released, its connection closed).
    pub async fn release(mut self) {
        use sqlx::Connection;
        if let Some(mut connection) = self.connection.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key).execute(&mut connection).await;
            let _ = connection.close().await;
        }
    }
}

fn replica_from_row(row: &AnyRow) -> Result<ReplicaRow> {
    Ok(ReplicaRow {
        node_name: row.try_get("node_name")?,
        tunnel_endpoint: row.try_get("tunnel_endpoint")?,
        started_at: row.try_get("started_at")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        alive: crate::get_bool(row, "alive")?,
        client_sessions: row.try_get("client_sessions")?,
        connectors: row.try_get("connectors")?,
        flows: row.try_get("flows")?,
    })
}

impl Store {
    /// PostgreSQL: takes the node name's advisory lock; `None` when another live
    /// process holds it. SQLite (one process per database file): no lock, `Ok(None)`
    /// is never returned there — use [`Store::backend`] first.
    pub async fn lock_node_name(&self, node_name: &str) -> Result<Option<NodeLock>> {
        let Some(options) = self.pg_options.clone() else {
            return Err(StoreError::Unsupported("node-name locks are for PostgreSQL".into()));
        };
        let mut lock = NodeLock { options, key: node_lock_key(node_name), connection: None };
        Ok(if lock.check().await? { Some(lock) } else { None })
    }

    /// Registers this process under its node name (taking the row over from an
    /// earlier run of the name), alive, heartbeat now.
    pub async fn register_replica(&self, node_name: &str, instance_id: &str, tunnel_endpoint: &str) -> Result<()> {
        let now = db_now(self.backend);
        let sql = format!(
            "INSERT INTO replicas (node_name, instance_id, tunnel_endpoint, started_at, last_heartbeat, status, connectors) \
             VALUES ($1, $2, $3, {now}, {now}, 'alive', 0) ON CONFLICT (node_name) DO UPDATE SET instance_id = excluded.instance_id, \
             tunnel_endpoint = excluded.tunnel_endpoint, started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat, \
             status = 'alive', connectors = 0, flows = 0"
        );
        let mut tx = self.write().await?;
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(node_name).bind(instance_id).bind(tunnel_endpoint).execute(&mut *tx.transaction).await?;
        tx.commit().await
    }

    /// This process's heartbeat: the row's time, endpoint, connector and flow counts. A row
    /// another replica declared dead is made alive again ([`Heartbeat::Revived`]); a
    /// row of another process is left alone ([`Heartbeat::Lost`]).
    pub async fn replica_heartbeat(&self, node_name: &str, instance_id: &str, tunnel_endpoint: &str, connectors: i64, flows: i64) -> Result<Heartbeat> {
        let now = db_now(self.backend);
        let mut tx = self.write().await?;
        let status: Option<String> = sqlx::query("SELECT status FROM replicas WHERE node_name = $1 AND instance_id = $2")
            .bind(node_name)
            .bind(instance_id)
            .fetch_optional(&mut *tx.transaction)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        let Some(status) = status else {
            return Ok(Heartbeat::Lost);
        };
        let sql = format!(
            "UPDATE replicas SET last_heartbeat = {now}, status = 'alive', tunnel_endpoint = $3, connectors = $4, flows = $5 \
             WHERE node_name = $1 AND instance_id = $2"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(node_name)
            .bind(instance_id)
            .bind(tunnel_endpoint)
            .bind(connectors)
            .bind(flows)
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await?;
        Ok(if status == "alive" { Heartbeat::Alive } else { Heartbeat::Revived })
    }

    /// Declares dead the alive replicas whose last heartbeat is older than
    /// `dead_after_micros` and deletes their client sessions, in one transaction (of
    /// two replicas doing it at once, one does); forgets dead replicas whose last
    /// heartbeat is older than `forget_after_micros`. Returns the replicas declared
    /// dead with the sessions deleted for each.
    pub async fn sweep_dead_replicas(&self, dead_after_micros: i64, forget_after_micros: i64) -> Result<Vec<(String, u64)>> {
        let now = db_now(self.backend);
        let mut tx = self.write().await?;
        let sql = format!(
            "UPDATE replicas SET status = 'dead', connectors = 0, flows = 0 WHERE status = 'alive' AND last_heartbeat < {now} - $1 RETURNING node_name"
        );
        let dead: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(dead_after_micros)
            .fetch_all(&mut *tx.transaction)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut swept = Vec::with_capacity(dead.len());
        for node_name in dead {
            let deleted = sqlx::query("DELETE FROM client_sessions WHERE broker_node = $1").bind(node_name.as_str()).execute(&mut *tx.transaction).await?;
            swept.push((node_name, deleted.rows_affected()));
        }
        let sql = format!("DELETE FROM replicas WHERE status = 'dead' AND last_heartbeat < {now} - $1");
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(forget_after_micros).execute(&mut *tx.transaction).await?;
        tx.commit().await?;
        Ok(swept)
    }

    /// A clean stop: the row is marked dead and this replica's session rows go (its
    /// tunnels are closed), if the row is still this process's.
    pub async fn replica_stopped(&self, node_name: &str, instance_id: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let mine = sqlx::query("UPDATE replicas SET status = 'dead', connectors = 0, flows = 0 WHERE node_name = $1 AND instance_id = $2")
            .bind(node_name)
            .bind(instance_id)
            .execute(&mut *tx.transaction)
            .await?
            .rows_affected();
        if mine > 0 {
            sqlx::query("DELETE FROM client_sessions WHERE broker_node = $1").bind(node_name).execute(&mut *tx.transaction).await?;
        }
        tx.commit().await
    }

    /// Every registered replica by node name, with its status as of now (alive: not
    /// declared dead and a heartbeat within `dead_after_micros`) and its session count.
    pub async fn list_replicas(&self, dead_after_micros: i64) -> Result<Vec<ReplicaRow>> {
        let now = db_now(self.backend);
        let sql = format!(
            "SELECT r.node_name, r.tunnel_endpoint, r.started_at, r.last_heartbeat, r.connectors, r.flows, \
             CAST(CASE WHEN r.status = 'alive' AND r.last_heartbeat >= {now} - $1 THEN 1 ELSE 0 END AS BIGINT) AS alive, \
             (SELECT COUNT(*) FROM client_sessions s WHERE s.broker_node = r.node_name) AS client_sessions \
             FROM replicas r ORDER BY r.node_name"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(dead_after_micros).fetch_all(&self.pool).await?;
        rows.iter().map(replica_from_row).collect()
    }

    /// PostgreSQL: a connection listening to [`CHANGE_CHANNEL`] (`None` on SQLite,
    /// where this process is the only writer).
    pub async fn change_listener(&self) -> Result<Option<sqlx::postgres::PgListener>> {
        let Some(options) = self.pg_options.clone() else { return Ok(None) };
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_lazy_with(options);
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        listener.listen(CHANGE_CHANNEL).await?;
        Ok(Some(listener))
    }
}

/// Parses a PostgreSQL URL's options (the store keeps them for its dedicated connections).
pub(crate) fn pg_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions> {
    Ok(sqlx::postgres::PgConnectOptions::from_str(url)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lock_keys_are_stable_and_differ() {
        assert_eq!(node_lock_key("replica-a"), node_lock_key("replica-a"));
        assert_ne!(node_lock_key("replica-a"), node_lock_key("replica-b"));
    }
}
