//! The data plane's tables: application segments and access policies (stored as
//! named documents with a JSON `spec`), connectors, and live client sessions.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::{Result, Store, StoreError, now_micros};

/// Which kind of named document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKind {
    Segment,
    Policy,
}

impl DocKind {
    fn table(self) -> &'static str {
        match self {
            DocKind::Segment => "app_segments",
            DocKind::Policy => "access_policies",
        }
    }
}

/// A segment or a policy: name, order, enabled flag, and the rest as JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct DocRow {
    pub id: String,
    pub name: String,
    pub spec: serde_json::Value,
    pub position: i64,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

const DOC_COLUMNS: &str = "id, name, spec, position, enabled, created_at, updated_at";

fn doc_from_row(row: &AnyRow) -> Result<DocRow> {
    let spec: String = row.try_get("spec")?;
    Ok(DocRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        spec: serde_json::from_str(&spec).map_err(|error| StoreError::Corrupt(error.to_string()))?,
        position: row.try_get("position")?,
        enabled: crate::get_bool(row, "enabled")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn name_taken(error: sqlx::Error) -> StoreError {
    if crate::is_unique_violation(&error) { StoreError::Duplicate("name") } else { error.into() }
}

/// A connector as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectorRow {
    pub id: String,
    pub name: String,
    pub certificate_serial: Option<String>,
    pub revoked: bool,
    pub version: Option<String>,
    pub mode: Option<String>,
    /// where it answers DNS, comma-separated (as it said in its last hello)
    pub dns_listeners: Option<String>,
    pub last_seen: Option<i64>,
    pub created_at: i64,
    /// the provisioning key in force (its secret is kept only as a hash)
    pub key: ProvisioningKey,
    /// SHA-256 of the SubjectPublicKeyInfo the connector enrolled with (None: enrolled before it was kept)
    pub key_fingerprint: Option<Vec<u8>>,
}

/// A connector's provisioning key, without its secret.
#[derive(Clone, Debug, PartialEq)]
pub struct ProvisioningKey {
    pub id: String,
    pub expires_at: i64,
    /// the last enrollment with it
    pub used_at: Option<i64>,
    /// whether it may enroll again after its first use
    pub reusable: bool,
}

impl ProvisioningKey {
    /// Why the key cannot enroll now, if it cannot.
    pub fn refusal(&self, now: i64) -> Option<&'static str> {
        if self.expires_at <= now {
            Some("the provisioning key has expired; issue a new one for the connector")
        } else if self.used_at.is_some() && !self.reusable {
            Some("the provisioning key has been used; issue a new one for the connector")
        } else {
            None
        }
    }
}

const CONNECTOR_COLUMNS: &str = "id, name, certificate_serial, revoked, version, mode, dns_listeners, last_seen, created_at, key_id, key_expires_at, key_used_at, key_reusable, key_fingerprint";

fn connector_from_row(row: &AnyRow) -> Result<ConnectorRow> {
    let id: String = row.try_get("id")?;
    let key = ProvisioningKey {
        // keys from before version 7 are named by their connector
        id: row.try_get::<Option<String>, _>("key_id")?.unwrap_or_else(|| id.clone()),
        expires_at: row.try_get::<Option<i64>, _>("key_expires_at")?.unwrap_or(0),
        used_at: row.try_get("key_used_at")?,
        reusable: crate::get_bool(row, "key_reusable")?,
    };
    Ok(ConnectorRow {
        id,
        name: row.try_get("name")?,
        certificate_serial: row.try_get("certificate_serial")?,
        revoked: crate::get_bool(row, "revoked")?,
        version: row.try_get("version")?,
        mode: row.try_get("mode")?,
        dns_listeners: row.try_get("dns_listeners")?,
        last_seen: row.try_get("last_seen")?,
        created_at: row.try_get("created_at")?,
        key,
        key_fingerprint: row.try_get("key_fingerprint")?,
    })
}

/// A live client session with its device's identity.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSessionRow {
    pub id: String,
    pub device_id: String,
    pub client_hostname: String,
    pub username: String,
    pub platform: String,
    pub virtual_ip: Option<String>,
    pub broker_node: String,
    pub remote_addr: String,
    pub connected_at: i64,
}

const SESSION_SELECT: &str = "SELECT s.id, s.device_id, d.hostname, d.username, d.platform, s.virtual_ip, s.broker_node, s.remote_addr, s.connected_at \
     FROM client_sessions s JOIN devices d ON d.id = s.device_id";

fn session_from_row(row: &AnyRow) -> Result<ClientSessionRow> {
    Ok(ClientSessionRow {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        client_hostname: row.try_get("hostname")?,
        username: row.try_get("username")?,
        platform: row.try_get("platform")?,
        virtual_ip: row.try_get("virtual_ip")?,
        broker_node: row.try_get("broker_node")?,
        remote_addr: row.try_get("remote_addr")?,
        connected_at: row.try_get("connected_at")?,
    })
}

impl Store {
    pub async fn list_docs(&self, kind: DocKind) -> Result<Vec<DocRow>> {
        let sql = format!("SELECT {DOC_COLUMNS} FROM {} ORDER BY position, id", kind.table());
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(doc_from_row).collect()
    }

    pub async fn get_doc(&self, kind: DocKind, id: &str) -> Result<DocRow> {
        let sql = format!("SELECT {DOC_COLUMNS} FROM {} WHERE id = $1", kind.table());
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        doc_from_row(&row)
    }

    pub async fn create_doc(&self, kind: DocKind, doc: &DocRow, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        let sql = format!(
            "INSERT INTO {} (id, name, name_key, spec, position, enabled, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            kind.table()
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(doc.id.as_str())
            .bind(doc.name.as_str())
            .bind(doc.name.to_lowercase())
            .bind(doc.spec.to_string())
            .bind(doc.position)
            .bind(doc.enabled)
            .bind(doc.created_at)
            .bind(doc.updated_at)
            .execute(&mut *tx.transaction)
            .await
            .map_err(name_taken)?;
        crate::claim_skeleton(&mut tx.transaction, kind.table(), doc.id.as_str(), &doc.name).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Reads, changes (with `change`, which sees the stored row) and writes one document.
    pub async fn update_doc(
        &self,
        kind: DocKind,
        id: &str,
        change: impl FnOnce(&DocRow) -> DocRow,
        audit: impl FnOnce(&DocRow, &DocRow) -> AuditEntry,
    ) -> Result<DocRow> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {DOC_COLUMNS} FROM {} WHERE id = $1", kind.table());
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let before = doc_from_row(&row)?;
        let mut after = change(&before);
        after.updated_at = now_micros().max(before.updated_at + 1);
        let sql = format!("UPDATE {} SET name = $2, name_key = $3, spec = $4, position = $5, enabled = $6, updated_at = $7 WHERE id = $1", kind.table());
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(after.name.as_str())
            .bind(after.name.to_lowercase())
            .bind(after.spec.to_string())
            .bind(after.position)
            .bind(after.enabled)
            .bind(after.updated_at)
            .execute(&mut *tx.transaction)
            .await
            .map_err(name_taken)?;
        if after.name != before.name {
            crate::claim_skeleton(&mut tx.transaction, kind.table(), id, &after.name).await?;
        }
        crate::audit::record(&mut tx.transaction, audit(&before, &after)).await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Deletes a document. A segment that a policy names is refused (`InUse`).
    pub async fn delete_doc(&self, kind: DocKind, id: &str, audit: impl FnOnce(&DocRow) -> AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {DOC_COLUMNS} FROM {} WHERE id = $1", kind.table());
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let doc = doc_from_row(&row)?;
        if kind == DocKind::Segment {
            let sql = format!("SELECT {DOC_COLUMNS} FROM access_policies ORDER BY position, id");
            let policies = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx.transaction).await?;
            for policy in &policies {
                let policy = doc_from_row(policy)?;
                let names_it = policy.spec["segment_ids"].as_array().is_some_and(|ids| ids.iter().any(|segment| segment.as_str() == Some(id)));
                if names_it {
                    return Err(StoreError::InUse(format!("access policy {:?} uses the segment", policy.name)));
                }
            }
        }
        let sql = format!("DELETE FROM {} WHERE id = $1", kind.table());
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&mut *tx.transaction).await?;
        crate::audit::record(&mut tx.transaction, audit(&doc)).await?;
        tx.commit().await
    }

    /// The latest change to segments and policies: the broker reloads its policy when it moves.
    pub async fn policy_version(&self) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM app_segments) + (SELECT COUNT(*) FROM access_policies) AS n, \
             COALESCE((SELECT MAX(updated_at) FROM app_segments), 0) + COALESCE((SELECT MAX(updated_at) FROM access_policies), 0) AS t",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("t")?))
    }

    pub async fn create_connector(&self, row: &ConnectorRow, key_hash: &[u8], audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO connectors (id, name, name_key, key_hash, revoked, created_at, key_id, key_expires_at, key_reusable) \
             VALUES ($1, $2, $3, $4, FALSE, $5, $6, $7, $8)",
        )
        .bind(row.id.as_str())
        .bind(row.name.as_str())
        .bind(row.name.to_lowercase())
        .bind(key_hash)
        .bind(row.created_at)
        .bind(row.key.id.as_str())
        .bind(row.key.expires_at)
        .bind(row.key.reusable)
        .execute(&mut *tx.transaction)
        .await
        .map_err(name_taken)?;
        crate::claim_skeleton(&mut tx.transaction, "connectors", row.id.as_str(), &row.name).await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    /// Gives a connector a new provisioning key (the earlier one stops working), with
    /// its audit row (`audit` sees the connector before and after).
    pub async fn issue_provisioning_key(
        &self,
        id: &str,
        key: &ProvisioningKey,
        key_hash: &[u8],
        audit: impl FnOnce(&ConnectorRow, &ConnectorRow) -> AuditEntry,
    ) -> Result<ConnectorRow> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE id = $1 AND revoked = FALSE");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let before = connector_from_row(&row)?;
        sqlx::query("UPDATE connectors SET key_hash = $2, key_id = $3, key_expires_at = $4, key_used_at = NULL, key_reusable = $5 WHERE id = $1")
            .bind(id)
            .bind(key_hash)
            .bind(key.id.as_str())
            .bind(key.expires_at)
            .bind(key.reusable)
            .execute(&mut *tx.transaction)
            .await?;
        let after = ConnectorRow { key: key.clone(), ..before.clone() };
        crate::audit::record(&mut tx.transaction, audit(&before, &after)).await?;
        tx.commit().await?;
        Ok(after)
    }

    pub async fn list_connectors(&self) -> Result<Vec<ConnectorRow>> {
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE revoked = FALSE ORDER BY name_key, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(connector_from_row).collect()
    }

    /// A connector, revoked ones included (the tunnel checks `revoked` itself).
    pub async fn get_connector(&self, id: &str) -> Result<ConnectorRow> {
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        connector_from_row(&row)
    }

    /// The connector a provisioning key belongs to (not revoked).
    pub async fn find_connector_by_key(&self, key_hash: &[u8]) -> Result<Option<ConnectorRow>> {
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE key_hash = $1 AND revoked = FALSE");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(key_hash).fetch_optional(&self.pool).await?;
        row.as_ref().map(connector_from_row).transpose()
    }

    /// Records a connector's enrollment with its provisioning key: the certificate
    /// issued (earlier certificates stop working) and the key's use, with the audit
    /// row, in one transaction. The update is conditional — the key still the
    /// connector's, not revoked, not expired, unused or reusable — so of two
    /// enrollments racing with a single-use key, on any replicas, one wins. Returns
    /// false, changing nothing, for the other.
    pub async fn record_connector_enrollment(&self, id: &str, key_hash: &[u8], serial: &str, fingerprint: &[u8], now: i64, audit: AuditEntry) -> Result<bool> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE connectors SET certificate_serial = $3, key_used_at = $4, key_fingerprint = $5 WHERE id = $1 AND key_hash = $2 AND revoked = FALSE \
             AND key_expires_at > $4 AND (key_used_at IS NULL OR key_reusable = TRUE)",
        )
        .bind(id)
        .bind(key_hash)
        .bind(serial)
        .bind(now)
        .bind(fingerprint)
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

    /// A connector's host enrolled as another one and said so: the key it enrolled with
    /// no longer opens a tunnel (an empty fingerprint matches none) until the connector is
    /// enrolled again with a new provisioning key. Audited in the same transaction.
    pub async fn connector_left(&self, id: &str, audit: AuditEntry) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE connectors SET key_fingerprint = $2 WHERE id = $1 AND revoked = FALSE")
            .bind(id)
            .bind(Vec::<u8>::new())
            .execute(&mut *tx.transaction)
            .await?;
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await
    }

    pub async fn connector_seen(&self, id: &str, version: &str, mode: Option<&str>, dns_listeners: Option<&str>) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE connectors SET version = $2, mode = $3, last_seen = $4, dns_listeners = $5 WHERE id = $1")
            .bind(id)
            .bind(version)
            .bind(mode)
            .bind(now_micros())
            .bind(dns_listeners)
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await
    }

    pub async fn revoke_connector(&self, id: &str, audit: impl FnOnce(&ConnectorRow) -> AuditEntry) -> Result<ConnectorRow> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE id = $1 AND revoked = FALSE");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let mut connector = connector_from_row(&row)?;
        sqlx::query("UPDATE connectors SET revoked = TRUE WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        connector.revoked = true;
        crate::audit::record(&mut tx.transaction, audit(&connector)).await?;
        tx.commit().await?;
        Ok(connector)
    }

    pub async fn insert_client_session(&self, session: &ClientSessionRow) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO client_sessions (id, device_id, virtual_ip, broker_node, remote_addr, connected_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(session.id.as_str())
            .bind(session.device_id.as_str())
            .bind(session.virtual_ip.as_deref())
            .bind(session.broker_node.as_str())
            .bind(session.remote_addr.as_str())
            .bind(session.connected_at)
            .execute(&mut *tx.transaction)
            .await?;
        sqlx::query("UPDATE devices SET last_seen = $2 WHERE id = $1")
            .bind(session.device_id.as_str())
            .bind(session.connected_at)
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await
    }

    /// Removes a session row when its tunnel ends (no audit: nobody changed anything).
    pub async fn end_client_session(&self, id: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let device: Option<String> = sqlx::query("SELECT device_id FROM client_sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx.transaction)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        sqlx::query("DELETE FROM client_sessions WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        if let Some(device) = device {
            sqlx::query("UPDATE devices SET last_seen = $2 WHERE id = $1").bind(device).bind(now_micros()).execute(&mut *tx.transaction).await?;
        }
        tx.commit().await
    }

    /// An admin deletes a session: the row goes (with its audit entry); the broker holding it disconnects.
    pub async fn delete_client_session(&self, id: &str, audit: impl FnOnce(&ClientSessionRow) -> AuditEntry) -> Result<ClientSessionRow> {
        let mut tx = self.write().await?;
        let sql = format!("{SESSION_SELECT} WHERE s.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let session = session_from_row(&row)?;
        sqlx::query("DELETE FROM client_sessions WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        crate::audit::record(&mut tx.transaction, audit(&session)).await?;
        tx.commit().await?;
        Ok(session)
    }

    /// Sessions a replica recorded and that still stand; at start a replica clears its own.
    pub async fn client_session_ids_on(&self, node: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM client_sessions WHERE broker_node = $1").bind(node).fetch_all(&self.pool).await?;
        rows.iter().map(|row| row.try_get(0).map_err(StoreError::from)).collect()
    }

    /// Marks the devices with a live session on this replica as seen now (so an
    /// idle-TTL release never counts a connected device's time).
    pub async fn touch_sessions_on(&self, node: &str) -> Result<u64> {
        let mut tx = self.write().await?;
        let touched = sqlx::query("UPDATE devices SET last_seen = $2 WHERE id IN (SELECT device_id FROM client_sessions WHERE broker_node = $1)")
            .bind(node)
            .bind(now_micros())
            .execute(&mut *tx.transaction)
            .await?;
        tx.commit().await?;
        Ok(touched.rows_affected())
    }

    pub async fn clear_client_sessions_on(&self, node: &str) -> Result<u64> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM client_sessions WHERE broker_node = $1").bind(node).execute(&mut *tx.transaction).await?;
        tx.commit().await?;
        Ok(deleted.rows_affected())
    }

    /// Every live session, newest first (a few thousand at most per replica; the API pages in memory).
    /// The newest session another replica holds for a virtual address, with its device's
    /// range (a flow that entered here is relayed to that replica). `None` when no other
    /// replica holds one.
    pub async fn remote_session_for(&self, virtual_ip: &str, this_node: &str) -> Result<Option<(ClientSessionRow, String)>> {
        let row = sqlx::query(
            "SELECT s.id, s.device_id, d.hostname, d.username, d.platform, s.virtual_ip, s.broker_node, s.remote_addr, s.connected_at, \
             COALESCE(b.range_id, '') AS range_id FROM client_sessions s JOIN devices d ON d.id = s.device_id LEFT JOIN bindings b ON b.device_id = s.device_id \
             WHERE s.virtual_ip = $1 AND s.broker_node <> $2 ORDER BY s.connected_at DESC LIMIT 1",
        )
        .bind(virtual_ip)
        .bind(this_node)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((session_from_row(&row)?, row.try_get("range_id")?))).transpose()
    }

    /// The addresses another replica's tunnel endpoint is reached at by its peers
    /// (comma-separated), while it is registered alive.
    pub async fn replica_relay_endpoints(&self, node: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT relay_endpoints FROM replicas WHERE node_name = $1 AND status = 'alive' AND relay_endpoints <> ''")
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| row.try_get(0).map_err(StoreError::from)).transpose()
    }

    /// Records where this replica's tunnel endpoint is reached by its peers.
    pub async fn set_relay_endpoints(&self, node: &str, endpoints: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE replicas SET relay_endpoints = $2 WHERE node_name = $1").bind(node).bind(endpoints).execute(&mut *tx.transaction).await?;
        tx.commit().await
    }

    pub async fn list_client_sessions(&self) -> Result<Vec<ClientSessionRow>> {
        let sql = format!("{SESSION_SELECT} ORDER BY s.connected_at DESC, s.id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(session_from_row).collect()
    }
}
