//! Administrators, their API keys and console sessions, settings and the internal CA.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::{Result, Store, StoreError, WriteTx, now_micros};

/// A new opaque id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminRow {
    pub id: String,
    pub username: String,
    pub role: String,
    pub password_hash: Option<String>,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyRow {
    pub id: String,
    pub admin_id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub last_ip: Option<String>,
}

/// An admin session as listed: a console login or an API key.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRow {
    pub id: String,
    pub admin_id: String,
    pub admin_username: String,
    pub api_key_name: Option<String>,
    pub client_ip: Option<String>,
    pub active_since: i64,
    pub expires_at: Option<i64>,
}

/// Who is calling, as resolved from a credential.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub admin_id: String,
    pub username: String,
    pub role: String,
    /// `key:<id>` or `session:<id>`
    pub session_id: String,
    pub csrf_token: Option<String>,
    pub last_used_at: Option<i64>,
}

fn principal_from_row(row: &AnyRow, session_id: String, csrf_token: Option<String>, last_used_at: Option<i64>) -> Result<Principal> {
    Ok(Principal { admin_id: row.try_get("id")?, username: row.try_get("username")?, role: row.try_get("role")?, session_id, csrf_token, last_used_at })
}

fn admin_from_row(row: &AnyRow) -> Result<AdminRow> {
    Ok(AdminRow {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        role: row.try_get("role")?,
        password_hash: row.try_get("password_hash")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    pub async fn count_admins(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM admins").fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// Creates the first superadmin and its API key, unless an admin exists already.
    /// Returns false when the database was not empty.
    pub async fn bootstrap(&self, username: &str, key_name: &str, key_hash: &[u8]) -> Result<bool> {
        let mut tx = self.write().await?;
        if self.backend == crate::Backend::Postgres {
            sqlx::query("LOCK TABLE admins IN EXCLUSIVE MODE").execute(&mut *tx.transaction).await?;
        }
        let existing: i64 = sqlx::query("SELECT COUNT(*) FROM admins").fetch_one(&mut *tx.transaction).await?.try_get(0)?;
        if existing > 0 {
            return Ok(false);
        }
        let admin_id = new_id();
        let now = now_micros();
        sqlx::query("INSERT INTO admins (id, username, username_key, role, password_hash, created_at) VALUES ($1, $2, $3, 'superadmin', NULL, $4)")
            .bind(admin_id.as_str())
            .bind(username)
            .bind(username.to_lowercase())
            .bind(now)
            .execute(&mut *tx.transaction)
            .await?;
        crate::claim_skeleton(&mut tx.transaction, "admins", &admin_id, username).await?;
        sqlx::query("INSERT INTO api_keys (id, admin_id, name, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(new_id())
            .bind(admin_id.as_str())
            .bind(key_name)
            .bind(key_hash)
            .bind(now)
            .execute(&mut *tx.transaction)
            .await?;
        crate::audit::record(
            &mut tx.transaction,
            AuditEntry {
                actor: "system".into(),
                action: "bootstrap".into(),
                resource_type: "admin".into(),
                resource_id: admin_id,
                after: Some(serde_json::json!({"username": username, "role": "superadmin"})),
                ..AuditEntry::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn create_admin(&self, row: &AdminRow, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO admins (id, username, username_key, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(row.id.as_str())
            .bind(row.username.as_str())
            .bind(row.username.to_lowercase())
            .bind(row.role.as_str())
            .bind(row.password_hash.as_deref())
            .bind(row.created_at)
            .execute(&mut *tx.transaction)
            .await
            .map_err(|error| if crate::is_unique_violation(&error) { StoreError::Duplicate("username") } else { error.into() })?;
        crate::claim_skeleton(&mut tx.transaction, "admins", row.id.as_str(), &row.username).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    pub async fn list_admins(&self) -> Result<Vec<AdminRow>> {
        let rows = sqlx::query("SELECT id, username, role, password_hash, created_at FROM admins ORDER BY username_key").fetch_all(&self.pool).await?;
        rows.iter().map(admin_from_row).collect()
    }

    pub async fn get_admin(&self, id: &str) -> Result<AdminRow> {
        let row = sqlx::query("SELECT id, username, role, password_hash, created_at FROM admins WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        admin_from_row(&row)
    }

    pub async fn find_admin_by_username(&self, username: &str) -> Result<Option<AdminRow>> {
        let row = sqlx::query("SELECT id, username, role, password_hash, created_at FROM admins WHERE username_key = $1")
            .bind(username.to_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(admin_from_row).transpose()
    }

    /// Sets or (`None`) clears an admin's console password hash. Clearing is refused
    /// when no superadmin could sign in afterwards.
    pub async fn set_admin_password(&self, id: &str, password_hash: Option<&str>, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        let clearing = password_hash.is_none();
        if clearing {
            self.lock_credentials(&mut tx).await?;
        }
        let changed =
            sqlx::query("UPDATE admins SET password_hash = $2 WHERE id = $1").bind(id).bind(password_hash).execute(&mut *tx.transaction).await?.rows_affected();
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        if clearing {
            keep_a_way_in(&mut tx).await?;
        }
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Deletes an admin with its API keys and sessions, unless no superadmin could
    /// sign in afterwards.
    pub async fn delete_admin(&self, id: &str, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        self.lock_credentials(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM admins WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?.rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        keep_a_way_in(&mut tx).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    pub async fn create_api_key(&self, row: &ApiKeyRow, key_hash: &[u8], audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO api_keys (id, admin_id, name, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(row.id.as_str())
            .bind(row.admin_id.as_str())
            .bind(row.name.as_str())
            .bind(key_hash)
            .bind(row.created_at)
            .execute(&mut *tx.transaction)
            .await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    pub async fn list_api_keys(&self, admin_id: &str) -> Result<Vec<ApiKeyRow>> {
        let rows = sqlx::query("SELECT id, admin_id, name, created_at, last_used_at, last_ip FROM api_keys WHERE admin_id = $1 ORDER BY created_at")
            .bind(admin_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ApiKeyRow {
                    id: row.try_get("id")?,
                    admin_id: row.try_get("admin_id")?,
                    name: row.try_get("name")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                    last_ip: row.try_get("last_ip")?,
                })
            })
            .collect()
    }

    /// Revokes an API key, unless no superadmin could sign in afterwards.
    pub async fn delete_api_key(&self, admin_id: &str, key_id: &str, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        self.lock_credentials(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND admin_id = $2")
            .bind(key_id)
            .bind(admin_id)
            .execute(&mut *tx.transaction)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        keep_a_way_in(&mut tx).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Resolves an API key hash to its admin.
    pub async fn principal_for_api_key(&self, key_hash: &[u8]) -> Result<Option<Principal>> {
        let row = sqlx::query(
            "SELECT a.id, a.username, a.role, k.id AS key_id, k.last_used_at FROM api_keys k JOIN admins a ON a.id = k.admin_id WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| principal_from_row(&row, format!("key:{}", row.try_get::<String, _>("key_id")?), None, row.try_get("last_used_at")?)).transpose()
    }

    /// Notes when and from where an API key was last used.
    pub async fn touch_api_key(&self, key_id: &str, client_ip: Option<&str>) -> Result<()> {
        let _gate = if self.backend == crate::Backend::Sqlite { Some(self.write_gate.lock().await) } else { None };
        sqlx::query("UPDATE api_keys SET last_used_at = $2, last_ip = $3 WHERE id = $1")
            .bind(key_id)
            .bind(now_micros())
            .bind(client_ip)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Resolves a console session token hash to its admin, if the session has not expired.
    pub async fn principal_for_session(&self, token_hash: &[u8]) -> Result<Option<Principal>> {
        let row = sqlx::query("SELECT a.id, a.username, a.role, s.id AS session_id, s.csrf_token FROM admin_sessions s JOIN admins a ON a.id = s.admin_id WHERE s.token_hash = $1 AND s.expires_at > $2")
            .bind(token_hash)
            .bind(now_micros())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| principal_from_row(&row, format!("session:{}", row.try_get::<String, _>("session_id")?), row.try_get("csrf_token")?, None)).transpose()
    }

    #[allow(clippy::too_many_arguments)] // the columns of one row, each a different kind of value
    pub async fn create_session(
        &self,
        id: &str,
        admin_id: &str,
        token_hash: &[u8],
        csrf_token: &str,
        client_ip: Option<&str>,
        expires_at: i64,
        audit: AuditEntry,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO admin_sessions (id, admin_id, token_hash, csrf_token, client_ip, active_since, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(admin_id)
        .bind(token_hash)
        .bind(csrf_token)
        .bind(client_ip)
        .bind(now_micros())
        .bind(expires_at)
        .execute(&mut *tx.transaction)
        .await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Console sessions (not expired) and API keys, newest first.
    pub async fn list_sessions(&self) -> Result<Vec<SessionRow>> {
        let mut sessions = Vec::new();
        let rows = sqlx::query("SELECT s.id, s.admin_id, a.username, s.client_ip, s.active_since, s.expires_at FROM admin_sessions s JOIN admins a ON a.id = s.admin_id WHERE s.expires_at > $1")
            .bind(now_micros())
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            sessions.push(SessionRow {
                id: format!("session:{}", row.try_get::<String, _>(0)?),
                admin_id: row.try_get(1)?,
                admin_username: row.try_get(2)?,
                api_key_name: None,
                client_ip: row.try_get(3)?,
                active_since: row.try_get(4)?,
                expires_at: Some(row.try_get(5)?),
            });
        }
        let rows = sqlx::query("SELECT k.id, k.admin_id, a.username, k.name, k.last_ip, k.created_at FROM api_keys k JOIN admins a ON a.id = k.admin_id")
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            sessions.push(SessionRow {
                id: format!("key:{}", row.try_get::<String, _>(0)?),
                admin_id: row.try_get(1)?,
                admin_username: row.try_get(2)?,
                api_key_name: Some(row.try_get(3)?),
                client_ip: row.try_get(4)?,
                active_since: row.try_get(5)?,
                expires_at: None,
            });
        }
        sessions.sort_by(|a, b| b.active_since.cmp(&a.active_since).then(a.id.cmp(&b.id)));
        Ok(sessions)
    }

    /// Ends a console session (the password still signs in) or revokes an API key
    /// (refused when no superadmin could sign in afterwards), by its listed id.
    pub async fn delete_session(&self, id: &str, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        let deleted = if let Some(session_id) = id.strip_prefix("session:") {
            sqlx::query("DELETE FROM admin_sessions WHERE id = $1").bind(session_id).execute(&mut *tx.transaction).await?.rows_affected()
        } else if let Some(key_id) = id.strip_prefix("key:") {
            self.lock_credentials(&mut tx).await?;
            let deleted = sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(key_id).execute(&mut *tx.transaction).await?.rows_affected();
            if deleted > 0 {
                keep_a_way_in(&mut tx).await?;
            }
            deleted
        } else {
            0
        };
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Every stored setting as (name, JSON text).
    pub async fn load_settings(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT name, value FROM settings").fetch_all(&self.pool).await?;
        rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
    }

    pub async fn save_settings(&self, values: &[(String, String)], audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        for (name, value) in values {
            sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(name.as_str())
                .bind(value.as_str())
                .execute(&mut *tx.transaction)
                .await?;
        }
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// The internal CA as (certificate PEM, stored private key), if one was created.
    /// The server stores the key encrypted; versions before it stored the PEM itself.
    pub async fn load_ca(&self) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT certificate_pem, private_key_pem FROM certificate_authority WHERE id = 1").fetch_optional(&self.pool).await?;
        row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
    }

    /// Replaces the stored CA private key `stored` by `replacement` (the same key,
    /// encrypted), with its audit row, in one transaction. Returns false, changing
    /// nothing, when the stored key is no longer `stored` (another replica replaced it).
    pub async fn replace_ca_key(&self, stored: &str, replacement: &str, audit: AuditEntry) -> Result<bool> {
        let mut tx = self.write().await?;
        let changed = sqlx::query("UPDATE certificate_authority SET private_key_pem = $2 WHERE id = 1 AND private_key_pem = $1")
            .bind(stored)
            .bind(replacement)
            .execute(&mut *tx.transaction)
            .await?
            .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Stores a new CA unless another replica stored one first; returns the one in force.
    pub async fn save_ca(&self, certificate_pem: &str, private_key_pem: &str) -> Result<(String, String)> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO certificate_authority (id, certificate_pem, private_key_pem, created_at) VALUES (1, $1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(certificate_pem)
            .bind(private_key_pem)
            .bind(now_micros())
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await?;
        self.load_ca().await?.ok_or(StoreError::NotFound)
    }
}

/// Refuses a change, inside its transaction, that leaves no superadmin with a way to
/// sign in: a console password or an API key. Without one, nobody could manage
/// admins again (the bootstrap runs on an empty database only).
async fn keep_a_way_in(tx: &mut WriteTx<'_>) -> Result<()> {
    let left: i64 = sqlx::query(
        "SELECT COUNT(*) FROM admins a WHERE a.role = 'superadmin' \
         AND (a.password_hash IS NOT NULL OR EXISTS (SELECT 1 FROM api_keys k WHERE k.admin_id = a.id))",
    )
    .fetch_one(&mut *tx.transaction)
    .await?
    .try_get(0)?;
    if left == 0 { Err(StoreError::LastWayIn) } else { Ok(()) }
}
