//! The enrollment transaction on SQLite, through a connection of its own that the
//! enrollment writer calls directly (rusqlite) on its thread.
//!
//! Through sqlx, every statement of a batch was a hand-off to sqlx's worker thread
//! for that connection and back: arguments converted twice (`Any`, then SQLite),
//! rows sent one by one over a channel, and two thread wake-ups per statement on a
//! machine whose two cores also serve HTTP. Here the statements run where the
//! batch is decided. The connection is one more writer of the same database file,
//! behind the store's writer gate like every other write, with the same settings
//! as the store's SQLite connections.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use reachback_ipam::Location;
use rusqlite::{Connection, OpenFlags, ToSql, params_from_iter};

use crate::enroll::{
    AUDIT_COLUMNS, AUDIT_INSERT, BINDING_UPSERT, DEVICE_DELETE, DEVICE_INSERT, DEVICES_SELECT, DEVICES_TOUCH, DeviceRecord, EnrollAudit, EnrollWrites,
    INSERT_CHUNK, KEY_GIVE_BACK, KEY_TAKE, KEY_USES, KEYS_SELECT, KeyRecord, NewBinding, NewDevice, USED_IPS_UPDATE, parameter_list, placeholders,
};
use crate::history::{HISTORY_COLUMNS, HISTORY_INSERT, HistoryOpen};
use crate::{Result, StoreError};

/// Statements kept prepared: a batch's multi-row statements differ by their row
/// count, so a few dozen shapes recur under load.
const PREPARED_STATEMENTS: usize = 128;

/// Opens the enrollment connection to an existing, migrated database file.
pub(crate) fn open(path: &Path) -> Result<Mutex<Connection>> {
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    connection.execute_batch(&crate::sqlite_pragmas())?;
    connection.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
    Ok(Mutex::new(connection))
}

/// One open transaction on the enrollment connection; rolled back when dropped
/// before [`EnrollWrites::commit`].
pub(crate) struct SqliteWrites<'a> {
    connection: MutexGuard<'a, Connection>,
    open: bool,
}

impl<'a> SqliteWrites<'a> {
    /// Begins a write transaction. The caller holds the store's writer gate.
    pub(crate) fn begin(connection: &'a Mutex<Connection>) -> Result<Self> {
        let connection = connection.lock().map_err(|_| StoreError::Corrupt("the enrollment connection was abandoned by a panic".into()))?;
        connection.execute_batch("BEGIN IMMEDIATE")?;
        Ok(SqliteWrites { connection, open: true })
    }

    fn execute(&self, sql: &str, parameters: &[&dyn ToSql]) -> Result<usize> {
        Ok(self.connection.prepare_cached(sql)?.execute(parameters)?)
    }
}

impl Drop for SqliteWrites<'_> {
    fn drop(&mut self) {
        if self.open
            && let Err(error) = self.connection.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "enrollment transaction could not be rolled back");
        }
    }
}

impl EnrollWrites for SqliteWrites<'_> {
    async fn keys(&mut self, hashes: &[&[u8]]) -> Result<Vec<KeyRecord>> {
        let mut statement = self.connection.prepare_cached(&KEYS_SELECT.replace("{list}", &parameter_list('?', hashes.len(), 1)))?;
        let rows = statement.query_map(params_from_iter(hashes), |row| {
            Ok(KeyRecord {
                id: row.get("id")?,
                key_hash: row.get("key_hash")?,
                username: row.get("username")?,
                reusable: row.get("reusable")?,
                expires_at: row.get("expires_at")?,
                used_count: row.get("used_count")?,
                revoked: row.get("revoked")?,
                hostname_pattern: row.get("hostname_pattern")?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    async fn devices(&mut self, hostnames: &[&str]) -> Result<Vec<DeviceRecord>> {
        let mut statement = self.connection.prepare_cached(&DEVICES_SELECT.replace("{list}", &parameter_list('?', hostnames.len(), 1)))?;
        let rows = statement.query_map(params_from_iter(hostnames), |row| {
            let ip: Option<String> = row.get("ip")?;
            let binding = match ip {
                Some(ip) => Some((ip, row.get("range_id")?, row.get("range_name")?)),
                None => None,
            };
            Ok(DeviceRecord {
                id: row.get("id")?,
                hostname_key: row.get("hostname_key")?,
                username: row.get("username")?,
                fingerprint: row.get("public_key_fingerprint")?,
                binding,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    async fn take_keys(&mut self, key_ids: &[&str]) -> Result<HashSet<String>> {
        let mut taken = HashSet::new();
        for id in key_ids {
            if self.execute(KEY_TAKE, &[id])? == 1 {
                taken.insert(id.to_string());
            }
        }
        Ok(taken)
    }

    async fn give_back_key(&mut self, key_id: &str) -> Result<()> {
        self.execute(KEY_GIVE_BACK, &[&key_id])?;
        Ok(())
    }

    async fn add_key_uses(&mut self, key_id: &str, uses: i64) -> Result<()> {
        self.execute(KEY_USES, &[&key_id, &uses])?;
        Ok(())
    }

    async fn insert_devices(&mut self, devices: &[NewDevice<'_>]) -> Result<HashSet<String>> {
        let nowhere = Location::default();
        let mut inserted = HashSet::new();
        for chunk in devices.chunks(INSERT_CHUNK) {
            let mut parameters: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 15);
            for device in chunk {
                let location = device.location.unwrap_or(&nowhere);
                parameters.extend_from_slice(&[
                    &device.id,
                    &device.hostname,
                    &device.hostname,
                    &device.username,
                    &device.platform,
                    &device.fingerprint,
                    &device.certificate_serial,
                    &device.key_id,
                    &location.city,
                    &location.state,
                    &location.country,
                    &location.latitude,
                    &location.longitude,
                    &device.now,
                    &device.now,
                ]);
            }
            let mut statement = self.connection.prepare_cached(&DEVICE_INSERT.replace("{rows}", &placeholders('?', chunk.len(), 15, 1)))?;
            let mut rows = statement.query(parameters.as_slice())?;
            while let Some(row) = rows.next()? {
                inserted.insert(row.get(0)?);
            }
        }
        Ok(inserted)
    }

    async fn upsert_bindings(&mut self, bindings: &[NewBinding<'_>], reuse_before: i64) -> Result<HashSet<Vec<u8>>> {
        let mut written = HashSet::new();
        for chunk in bindings.chunks(INSERT_CHUNK) {
            let mut parameters: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 8 + 1);
            for binding in chunk {
                parameters.extend_from_slice(&[
                    &binding.ip_key,
                    &binding.ip,
                    &binding.range_id,
                    &binding.device_id,
                    &binding.username,
                    &binding.platform,
                    &binding.hostname,
                    &binding.now,
                ]);
            }
            // the quarantine limit is the last parameter
            parameters.push(&reuse_before);
            let sql = BINDING_UPSERT.replace("{rows}", &placeholders('?', chunk.len(), 8, 1)).replace("{reuse}", "?");
            let mut statement = self.connection.prepare_cached(&sql)?;
            let mut rows = statement.query(parameters.as_slice())?;
            while let Some(row) = rows.next()? {
                written.insert(row.get(0)?);
            }
        }
        Ok(written)
    }

    async fn delete_device(&mut self, id: &str) -> Result<()> {
        self.execute(DEVICE_DELETE, &[&id])?;
        Ok(())
    }

    async fn add_used_ips(&mut self, deltas: &BTreeMap<String, i64>) -> Result<()> {
        let entries: Vec<(&String, &i64)> = deltas.iter().collect();
        for chunk in entries.chunks(INSERT_CHUNK) {
            let parameters: Vec<&dyn ToSql> = chunk.iter().flat_map(|(id, amount)| [*id as &dyn ToSql, *amount as &dyn ToSql]).collect();
            self.execute(&USED_IPS_UPDATE.replace("{rows}", &placeholders('?', chunk.len(), 2, 1)), &parameters)?;
        }
        Ok(())
    }

    async fn touch_devices(&mut self, ids: &[String], now: i64) -> Result<()> {
        for chunk in ids.chunks(INSERT_CHUNK) {
            let mut parameters: Vec<&dyn ToSql> = vec![&now];
            parameters.extend(chunk.iter().map(|id| id as &dyn ToSql));
            self.execute(&DEVICES_TOUCH.replace("{now}", "?").replace("{list}", &parameter_list('?', chunk.len(), 2)), &parameters)?;
        }
        Ok(())
    }

    async fn insert_audit(&mut self, rows: &[EnrollAudit]) -> Result<()> {
        const ACTION: &str = "enroll";
        const RESOURCE: &str = "device";
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut parameters: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * AUDIT_COLUMNS);
            for row in chunk {
                parameters.extend_from_slice(&[&row.id, &row.now, &row.actor, &ACTION, &RESOURCE, &row.device_id, &row.after, &row.source_ip]);
            }
            self.execute(&AUDIT_INSERT.replace("{rows}", &placeholders('?', chunk.len(), AUDIT_COLUMNS, 1)), &parameters)?;
        }
        Ok(())
    }

    async fn insert_history(&mut self, rows: &[HistoryOpen]) -> Result<()> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            let reasons: Vec<&str> = chunk.iter().map(|row| row.bound_reason.as_str()).collect();
            let mut parameters: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * HISTORY_COLUMNS);
            for (row, reason) in chunk.iter().zip(&reasons) {
                parameters.extend_from_slice(&[
                    &row.ip_key,
                    &row.ip,
                    &row.device_id,
                    &row.username,
                    &row.client_hostname,
                    &row.platform,
                    &row.range_id,
                    &row.range_name,
                    &row.bound_at,
                    reason,
                ]);
            }
            self.execute(&HISTORY_INSERT.replace("{rows}", &placeholders('?', chunk.len(), HISTORY_COLUMNS, 1)), &parameters)?;
        }
        Ok(())
    }

    async fn commit(mut self) -> Result<()> {
        self.connection.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }
}
