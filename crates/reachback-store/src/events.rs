//! Event sinks and their outboxes (issue 22). Triggers (migration 13) write an
//! outbox row per enabled sink in the transaction of every audit entry and every
//! binding interval opened or closed; a sink's deliverer reads its rows in order,
//! and a row goes only once the sink has it (at-least-once, across restarts and
//! outages). One replica at a time delivers a sink: it holds the sink's lease.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Result, Store, StoreError, get_bool};

/// A sink as stored, with how many events wait for it.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkRow {
    pub id: String,
    pub name: String,
    /// `webhook` or `syslog`
    pub kind: String,
    /// the webhook URL, or `tcp://host:port` / `tls://host:port` for syslog
    pub target: String,
    /// the webhook's signing secret, sealed under the server's secret key
    pub secret_sealed: Option<String>,
    /// PEM CA certificates the sink's TLS certificate is checked against (else the system's)
    pub ca_certificate: Option<String>,
    /// CloudEvents type prefixes delivered (empty: every event)
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_total: i64,
    /// failed attempts since the last success
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<i64>,
    pub last_delivery_at: Option<i64>,
    pub next_attempt_at: i64,
    /// outbox rows waiting
    pub pending: i64,
    /// when the oldest waiting event happened
    pub oldest_pending_at: Option<i64>,
}

/// The fields of a sink an administrator sets.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkWrite {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub secret_sealed: Option<String>,
    pub ca_certificate: Option<String>,
    pub event_types: Vec<String>,
    pub enabled: bool,
}

/// An event waiting in a sink's outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    pub id: i64,
    /// CloudEvents `type`, such as `com.reachback.binding.released`
    pub kind: String,
    pub subject: String,
    /// when it happened (µs)
    pub at: i64,
    /// the event's data, a JSON object
    pub data: String,
}

/// A sink's own columns.
const SINK_BASE: &str = "s.id, s.name, s.kind, s.target, s.secret_sealed, s.ca_certificate, s.event_types, s.enabled, s.created_at, s.updated_at, \
     s.delivered_total, s.failures, s.last_error, s.last_attempt_at, s.last_delivery_at, s.next_attempt_at";
/// How many events wait for a sink, and since when.
const SINK_OUTBOX: &str = "(SELECT COUNT(*) FROM event_outbox o WHERE o.sink_id = s.id) AS pending, \
     (SELECT MIN(o.at) FROM event_outbox o WHERE o.sink_id = s.id) AS oldest_pending_at";

fn sink_from_row(row: &AnyRow) -> Result<SinkRow> {
    let types: String = row.try_get("event_types")?;
    Ok(SinkRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        target: row.try_get("target")?,
        secret_sealed: row.try_get("secret_sealed")?,
        ca_certificate: row.try_get("ca_certificate")?,
        event_types: serde_json::from_str(&types).map_err(|error| StoreError::Corrupt(format!("event_types: {error}")))?,
        enabled: get_bool(row, "enabled")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        delivered_total: row.try_get("delivered_total")?,
        failures: row.try_get("failures")?,
        last_error: row.try_get("last_error")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        last_delivery_at: row.try_get("last_delivery_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        pending: row.try_get("pending")?,
        oldest_pending_at: row.try_get("oldest_pending_at")?,
    })
}

fn name_taken(error: sqlx::Error) -> StoreError {
    if crate::is_unique_violation(&error) { StoreError::Duplicate("name") } else { error.into() }
}

fn types_json(types: &[String]) -> String {
    serde_json::Value::from(types.to_vec()).to_string()
}

impl Store {
    /// Adds a sink (with its audit row): it receives the events from now on.
    pub async fn create_sink(&self, id: &str, write: &SinkWrite, now: i64, audit: AuditEntry) -> Result<SinkRow> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO event_sinks (id, name, kind, target, secret_sealed, ca_certificate, event_types, enabled, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
        )
        .bind(id)
        .bind(write.name.as_str())
        .bind(write.kind.as_str())
        .bind(write.target.as_str())
        .bind(write.secret_sealed.as_deref())
        .bind(write.ca_certificate.as_deref())
        .bind(types_json(&write.event_types))
        .bind(write.enabled)
        .bind(now)
        .execute(&mut *tx.transaction)
        .await
        .map_err(name_taken)?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await?;
        self.get_sink(id).await
    }

    pub async fn list_sinks(&self) -> Result<Vec<SinkRow>> {
        let sql = format!("SELECT {SINK_BASE}, {SINK_OUTBOX} FROM event_sinks s ORDER BY lower(s.name)");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(sink_from_row).collect()
    }

    /// The enabled sinks, for the deliverer (without the outbox counts).
    pub async fn list_sinks_to_deliver(&self) -> Result<Vec<SinkRow>> {
        let sql = format!(
            "SELECT {SINK_BASE}, CAST(0 AS BIGINT) AS pending, CAST(NULL AS BIGINT) AS oldest_pending_at FROM event_sinks s WHERE s.enabled = TRUE ORDER BY s.id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(sink_from_row).collect()
    }

    pub async fn get_sink(&self, id: &str) -> Result<SinkRow> {
        let sql = format!("SELECT {SINK_BASE}, {SINK_OUTBOX} FROM event_sinks s WHERE s.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        sink_from_row(&row)
    }

    /// Changes a sink (with its audit row, which sees it before and after). A
    /// sink disabled drops what waited for it: it receives nothing while off.
    pub async fn update_sink(&self, id: &str, write: &SinkWrite, now: i64, audit: AuditEntry) -> Result<SinkRow> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE event_sinks SET name = $2, kind = $3, target = $4, secret_sealed = $5, ca_certificate = $6, event_types = $7, enabled = $8, \
             updated_at = $9, failures = 0, next_attempt_at = 0 WHERE id = $1",
        )
        .bind(id)
        .bind(write.name.as_str())
        .bind(write.kind.as_str())
        .bind(write.target.as_str())
        .bind(write.secret_sealed.as_deref())
        .bind(write.ca_certificate.as_deref())
        .bind(types_json(&write.event_types))
        .bind(write.enabled)
        .bind(now)
        .execute(&mut *tx.transaction)
        .await
        .map_err(name_taken)?;
        if changed.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        if !write.enabled {
            sqlx::query("DELETE FROM event_outbox WHERE sink_id = $1").bind(id).execute(&mut *tx.transaction).await?;
        }
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await?;
        self.get_sink(id).await
    }

    /// Removes a sink and what waited for it (with its audit row).
    pub async fn delete_sink(&self, id: &str, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM event_sinks WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query("DELETE FROM event_outbox WHERE sink_id = $1").bind(id).execute(&mut *tx.transaction).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Takes (or renews) the right to deliver a sink until `until`: granted when
    /// nobody holds it, `owner` holds it, or the holder's lease ran out.
    pub async fn lease_sink(&self, id: &str, owner: &str, now: i64, until: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let taken = sqlx::query(
            "UPDATE event_sinks SET lease_owner = $2, lease_until = $4 WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3)",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&mut *tx.transaction)
        .await?;
        tx.commit().await?;
        Ok(taken.rows_affected() > 0)
    }

    /// Lets a sink's lease go (a replica stopping), so another takes it at once.
    pub async fn release_sink_lease(&self, id: &str, owner: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE event_sinks SET lease_owner = NULL, lease_until = 0 WHERE id = $1 AND lease_owner = $2")
            .bind(id)
            .bind(owner)
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await
    }

    /// The oldest `limit` events waiting for a sink, in order.
    pub async fn outbox_batch(&self, sink_id: &str, limit: i64) -> Result<Vec<OutboxEvent>> {
        let rows = sqlx::query("SELECT id, type, subject, at, data FROM event_outbox WHERE sink_id = $1 ORDER BY id LIMIT $2")
            .bind(sink_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEvent {
                    id: row.try_get("id")?,
                    kind: row.try_get("type")?,
                    subject: row.try_get("subject")?,
                    at: row.try_get("at")?,
                    data: row.try_get("data")?,
                })
            })
            .collect()
    }

    /// A sink has the events up to `up_to` (`delivered` of them sent, the rest
    /// outside its types): they leave its outbox and its failures are cleared.
    pub async fn outbox_delivered(&self, sink_id: &str, up_to: i64, delivered: i64, now: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM event_outbox WHERE sink_id = $1 AND id <= $2").bind(sink_id).bind(up_to).execute(&mut *tx.transaction).await?;
        sqlx::query(
            "UPDATE event_sinks SET delivered_total = delivered_total + $2, failures = 0, last_error = NULL, last_attempt_at = $3, \
             last_delivery_at = CASE WHEN $2 > 0 THEN $3 ELSE last_delivery_at END, next_attempt_at = 0 WHERE id = $1",
        )
        .bind(sink_id)
        .bind(delivered)
        .bind(now)
        .execute(&mut *tx.transaction)
        .await?;
        tx.commit().await
    }

    /// A delivery failed: the events stay, the next attempt waits until `next_at`.
    pub async fn sink_failed(&self, sink_id: &str, error: &str, now: i64, next_at: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE event_sinks SET failures = failures + 1, last_error = $2, last_attempt_at = $3, next_attempt_at = $4 WHERE id = $1")
            .bind(sink_id)
            .bind(error)
            .bind(now)
            .bind(next_at)
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await
    }

    /// Drops, in batches, events that waited longer than `before` (a sink down for
    /// longer than the outbox keeps events); answers how many went.
    pub async fn prune_outbox(&self, before: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut tx = self.write().await?;
            let deleted = sqlx::query("DELETE FROM event_outbox WHERE id IN (SELECT id FROM event_outbox WHERE at < $1 ORDER BY id LIMIT 5000)")
                .bind(before)
                .execute(&mut *tx.transaction)
                .await?
                .rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < 5000 {
                return Ok(total);
            }
        }
    }
}
