//! What the web console keeps of its own: filters saved per admin and page.

use sqlx::Row;

use crate::{Result, Store, StoreError, now_micros};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedFilterRow {
    pub id: String,
    pub page: String,
    pub name: String,
    /// the query string the filter stands for
    pub query: String,
    pub created_at: i64,
}

impl Store {
    /// The users with the most bindings in a range, most first (ties by name).
    pub async fn top_users_of_range(&self, range_id: &str, limit: i64) -> Result<Vec<(String, i64)>> {
        let sql = format!(
            "SELECT username, COUNT(*) AS n FROM bindings WHERE {} AND device_id IS NOT NULL GROUP BY username ORDER BY n DESC, username LIMIT $2",
            crate::range_rows("", "$1")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(range_id).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(|row| Ok((row.try_get("username")?, row.try_get("n")?))).collect()
    }

    /// Bound addresses per platform (one pass over the platform index).
    pub async fn bindings_per_platform(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT platform, COUNT(*) AS n FROM bindings WHERE platform IS NOT NULL GROUP BY platform ORDER BY platform")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| Ok((row.try_get("platform")?, row.try_get("n")?))).collect()
    }

    /// Devices created per UTC day since `since` (microseconds): (day number since the epoch, count).
    pub async fn enrollments_per_day(&self, since: i64) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query(
            "SELECT created_at / 86400000000 AS day, COUNT(*) AS n FROM devices WHERE created_at >= $1 GROUP BY created_at / 86400000000 ORDER BY day",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((row.try_get("day")?, row.try_get("n")?))).collect()
    }

    pub async fn list_saved_filters(&self, admin_id: &str, page: Option<&str>) -> Result<Vec<SavedFilterRow>> {
        let rows = sqlx::query("SELECT id, page, name, query, created_at FROM saved_filters WHERE admin_id = $1 ORDER BY page, name")
            .bind(admin_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .filter(|row| page.is_none_or(|page| row.try_get::<String, _>("page").is_ok_and(|stored| stored == page)))
            .map(|row| {
                Ok(SavedFilterRow {
                    id: row.try_get("id")?,
                    page: row.try_get("page")?,
                    name: row.try_get("name")?,
                    query: row.try_get("query")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Saves a filter; the same name on the same page replaces the earlier one.
    pub async fn save_filter(&self, admin_id: &str, row: &SavedFilterRow) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM saved_filters WHERE admin_id = $1 AND page = $2 AND name = $3")
            .bind(admin_id)
            .bind(row.page.as_str())
            .bind(row.name.as_str())
            .execute(&mut *tx.transaction)
            .await?;
        sqlx::query("INSERT INTO saved_filters (id, admin_id, page, name, query, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(row.id.as_str())
            .bind(admin_id)
            .bind(row.page.as_str())
            .bind(row.name.as_str())
            .bind(row.query.as_str())
            .bind(now_micros())
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await
    }

    pub async fn delete_saved_filter(&self, admin_id: &str, id: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM saved_filters WHERE admin_id = $1 AND id = $2").bind(admin_id).bind(id).execute(&mut *tx.transaction).await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await
    }
}
