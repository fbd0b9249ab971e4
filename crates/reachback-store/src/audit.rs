//! The audit log: every change by an admin, written in the same transaction as the change.

use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Filter, FilterValue, Result, Store, like_pattern, now_micros};

/// What to record about a change.
#[derive(Clone, Debug, Default)]
pub struct AuditEntry {
    pub actor: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub source_ip: Option<String>,
}

/// A recorded change.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRow {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub source_ip: Option<String>,
}

/// Filters, order and page of an audit-log listing.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub ascending: bool,
    pub offset: i64,
    pub limit: i64,
}

pub(crate) async fn record(connection: &mut sqlx::AnyConnection, entry: AuditEntry) -> Result<()> {
    let id = crate::admin::new_id();
    sqlx::query(
        "INSERT INTO audit_log (id, at, actor, action, resource_type, resource_id, before_json, after_json, source_ip) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(now_micros())
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.resource_type)
    .bind(entry.resource_id)
    .bind(entry.before.map(|value| value.to_string()))
    .bind(entry.after.map(|value| value.to_string()))
    .bind(entry.source_ip)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

fn audit_from_row(row: &AnyRow) -> Result<AuditRow> {
    let json = |name: &str| -> Result<Option<serde_json::Value>> {
        let text: Option<String> = row.try_get(name)?;
        Ok(text.and_then(|text| serde_json::from_str(&text).ok()))
    };
    Ok(AuditRow {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        resource_type: row.try_get("resource_type")?,
        resource_id: row.try_get("resource_id")?,
        before: json("before_json")?,
        after: json("after_json")?,
        source_ip: row.try_get("source_ip")?,
    })
}

fn audit_filter(query: &AuditQuery) -> Filter {
    let mut filter = Filter::new();
    if let Some(actor) = &query.actor {
        filter.push("lower(actor) LIKE ? ESCAPE '\\'", [FilterValue::Text(like_pattern(actor))]);
    }
    if let Some(action) = &query.action {
        filter.push("lower(action) LIKE ? ESCAPE '\\'", [FilterValue::Text(like_pattern(action))]);
    }
    if let Some(resource_type) = &query.resource_type {
        filter.push("lower(resource_type) LIKE ? ESCAPE '\\'", [FilterValue::Text(like_pattern(resource_type))]);
    }
    if let Some(after) = query.after {
        filter.push("at > ?", [FilterValue::Int(after)]);
    }
    if let Some(before) = query.before {
        filter.push("at < ?", [FilterValue::Int(before)]);
    }
    filter
}

impl Store {
    /// Records an entry on its own (for events that change nothing else).
    pub async fn record_audit(&self, entry: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        record(&mut tx.transaction, entry).await?;
        tx.commit().await
    }

    pub async fn list_audit(&self, query: &AuditQuery) -> Result<(Vec<AuditRow>, i64)> {
        let filter = audit_filter(query);
        let order = if query.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT id, at, actor, action, resource_type, resource_id, before_json, after_json, source_ip FROM audit_log{} ORDER BY at {order}, id {order} LIMIT {} OFFSET {}",
            filter.sql(),
            query.limit,
            query.offset
        );
        let rows = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_all(&self.pool).await?;
        let total: i64 =
            filter.bind(sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM audit_log{}", filter.sql())))).fetch_one(&self.pool).await?.try_get(0)?;
        Ok((rows.iter().map(audit_from_row).collect::<Result<_>>()?, total))
    }

    /// Streams every matching entry (for CSV export).
    pub fn stream_audit(&self, query: &AuditQuery) -> BoxStream<'static, Result<AuditRow>> {
        let filter = audit_filter(query);
        let order = if query.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT id, at, actor, action, resource_type, resource_id, before_json, after_json, source_ip FROM audit_log{} ORDER BY at {order}, id {order}",
            filter.sql()
        );
        let pool = self.pool.clone();
        async_stream(pool, sql, filter, audit_from_row)
    }
}

/// Runs a query on its own pooled connection and yields mapped rows as they arrive.
pub(crate) fn async_stream<T: Send + 'static>(
    pool: sqlx::AnyPool,
    sql: String,
    filter: Filter,
    map: fn(&AnyRow) -> Result<T>,
) -> BoxStream<'static, Result<T>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<T>>(4096);
    tokio::spawn(async move {
        let mut connection = match pool.acquire().await {
            Ok(connection) => connection,
            Err(error) => {
                let _ = sender.send(Err(error.into())).await;
                return;
            }
        };
        let query = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql)));
        let mut rows = query.fetch(&mut *connection).map_err(crate::StoreError::from);
        while let Some(row) = rows.next().await {
            let item = row.and_then(|row| map(&row));
            if sender.send(item).await.is_err() {
                break;
            }
        }
    });
    futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) }).boxed()
}
