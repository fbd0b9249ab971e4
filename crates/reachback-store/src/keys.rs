//! Enrollment keys: created bound to a username, single-use or reusable, revocable.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::{Result, Store, StoreError};

/// A stored enrollment key (its secret is kept only as a hash).
#[derive(Clone, Debug, PartialEq)]
pub struct EnrollmentKeyRow {
    pub id: String,
    pub username: String,
    pub description: String,
    pub reusable: bool,
    pub expires_at: Option<i64>,
    pub used_count: i64,
    pub revoked: bool,
    pub created_at: i64,
    /// the hostnames it may enroll: one (lowercase) FQDN, or `*.suffix` for those under a domain
    pub hostname_pattern: Option<String>,
}

impl EnrollmentKeyRow {
    /// Whether a new device may enroll with this key now.
    pub fn usable(&self, now: i64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|expires_at| expires_at > now) && (self.reusable || self.used_count == 0)
    }
}

/// Whether a key limited to `pattern` (if any) may enroll `hostname`; both lowercase.
/// `*.suffix` admits the names strictly below `suffix`, anything else only itself.
pub fn hostname_allowed(pattern: Option<&str>, hostname: &str) -> bool {
    match pattern {
        None => true,
        Some(pattern) => match pattern.strip_prefix("*.") {
            Some(suffix) => hostname.len() > suffix.len() + 1 && hostname.ends_with(suffix) && hostname.as_bytes()[hostname.len() - suffix.len() - 1] == b'.',
            None => hostname == pattern,
        },
    }
}

const KEY_COLUMNS: &str = "id, username, description, reusable, expires_at, used_count, revoked, created_at, hostname_pattern";

fn key_from_row(row: &AnyRow) -> Result<EnrollmentKeyRow> {
    Ok(EnrollmentKeyRow {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        description: row.try_get("description")?,
        reusable: crate::get_bool(row, "reusable")?,
        expires_at: row.try_get("expires_at")?,
        used_count: row.try_get("used_count")?,
        revoked: crate::get_bool(row, "revoked")?,
        created_at: row.try_get("created_at")?,
        hostname_pattern: row.try_get("hostname_pattern")?,
    })
}

impl Store {
    pub async fn create_enrollment_key(&self, row: &EnrollmentKeyRow, key_hash: &[u8], audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO enrollment_keys (id, key_hash, username, description, reusable, expires_at, used_count, revoked, created_at, hostname_pattern) VALUES ($1, $2, $3, $4, $5, $6, 0, FALSE, $7, $8)")
            .bind(row.id.as_str())
            .bind(key_hash)
            .bind(row.username.as_str())
            .bind(row.description.as_str())
            .bind(row.reusable)
            .bind(row.expires_at)
            .bind(row.created_at)
            .bind(row.hostname_pattern.as_deref())
            .execute(&mut *tx.transaction)
            .await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    pub async fn list_enrollment_keys(&self) -> Result<Vec<EnrollmentKeyRow>> {
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM enrollment_keys ORDER BY created_at DESC, id"))).fetch_all(&self.pool).await?;
        rows.iter().map(key_from_row).collect()
    }

    pub async fn get_enrollment_key(&self, id: &str) -> Result<EnrollmentKeyRow> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM enrollment_keys WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        key_from_row(&row)
    }

    /// The stored hash of a key's secret (the broker re-binds devices through the enrollment path).
    pub async fn enrollment_key_hash(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT key_hash FROM enrollment_keys WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(|row| row.try_get(0).map_err(StoreError::from)).transpose()
    }

    pub async fn find_enrollment_key(&self, key_hash: &[u8]) -> Result<Option<EnrollmentKeyRow>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM enrollment_keys WHERE key_hash = $1")))
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    pub async fn revoke_enrollment_key(&self, id: &str, audit: impl FnOnce(&EnrollmentKeyRow) -> AuditEntry) -> Result<EnrollmentKeyRow> {
        let mut tx = self.write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM enrollment_keys WHERE id = $1")))
            .bind(id)
            .fetch_optional(&mut *tx.transaction)
            .await?
            .ok_or(StoreError::NotFound)?;
        let mut key = key_from_row(&row)?;
        sqlx::query("UPDATE enrollment_keys SET revoked = TRUE WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        key.revoked = true;
        crate::audit::record(&mut tx.transaction, audit(&key)).await?;
        tx.commit().await?;
        Ok(key)
    }
}
