//! Devices: enrolled agents, listed, looked up and deleted (which revokes and releases).

use reachback_ipam::{Location, address_key, parse_address};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::history::ReleaseReason;
use crate::ranges::location_from_row;
use crate::{Filter, FilterValue, Result, Store, StoreError, like_pattern, now_micros};

/// An enrolled device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRow {
    pub id: String,
    pub hostname: String,
    pub username: String,
    pub platform: String,
    pub public_key_fingerprint: Vec<u8>,
    pub certificate_serial: String,
    pub enrollment_key_id: Option<String>,
    pub location: Option<Location>,
    pub created_at: i64,
    pub last_seen: i64,
    /// its bound address, if any
    pub virtual_ip: Option<String>,
    /// the range of that address
    pub range_id: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSort {
    #[default]
    Hostname,
    Username,
    LastSeen,
}

#[derive(Clone, Debug, Default)]
pub struct DeviceQuery {
    pub hostname: Option<String>,
    pub username: Option<String>,
    pub platform: Option<String>,
    pub sort: DeviceSort,
    pub descending: bool,
    pub offset: i64,
    pub limit: i64,
}

const DEVICE_COLUMNS: &str = "d.id, d.hostname, d.username, d.platform, d.public_key_fingerprint, d.certificate_serial, d.enrollment_key_id, d.city, d.state, d.country, d.latitude, d.longitude, d.created_at, d.last_seen, b.ip AS virtual_ip, b.range_id AS range_id";

fn device_from_row(row: &AnyRow) -> Result<DeviceRow> {
    Ok(DeviceRow {
        id: row.try_get("id")?,
        hostname: row.try_get("hostname")?,
        username: row.try_get("username")?,
        platform: row.try_get("platform")?,
        public_key_fingerprint: row.try_get("public_key_fingerprint")?,
        certificate_serial: row.try_get("certificate_serial")?,
        enrollment_key_id: row.try_get("enrollment_key_id")?,
        location: location_from_row(row, "")?,
        created_at: row.try_get("created_at")?,
        last_seen: row.try_get("last_seen")?,
        virtual_ip: row.try_get("virtual_ip")?,
        range_id: row.try_get("range_id")?,
    })
}

impl Store {
    pub async fn list_devices(&self, query: &DeviceQuery) -> Result<(Vec<DeviceRow>, i64)> {
        let mut filter = Filter::new();
        for (column, value) in [("d.hostname", &query.hostname), ("d.username", &query.username), ("d.platform", &query.platform)] {
            if let Some(value) = value {
                filter.push(&format!("lower({column}) LIKE ? ESCAPE '\\'"), [FilterValue::Text(like_pattern(value))]);
            }
        }
        // PostgreSQL's trigram indexes serve the LIKE above; SQLite's index is a table of its own
        if self.backend == crate::Backend::Sqlite {
            for (column, value) in [("hostname", &query.hostname), ("username", &query.username)] {
                if let Some((clause, value)) = value.as_deref().and_then(|needle| crate::device_search(self.backend, column, needle)) {
                    filter.push(&format!("d.{clause}"), [value]);
                }
            }
        }
        let direction = if query.descending { "DESC" } else { "ASC" };
        let order = match query.sort {
            DeviceSort::Hostname => format!("d.hostname_key {direction}, d.id"),
            DeviceSort::Username => format!("d.username {direction}, d.id"),
            DeviceSort::LastSeen => format!("d.last_seen {direction}, d.id"),
        };
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN bindings b ON b.device_id = d.id{} ORDER BY {order} LIMIT {} OFFSET {}",
            filter.sql(),
            query.limit,
            query.offset
        );
        let rows = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_all(&self.pool).await?;
        let total: i64 =
            filter.bind(sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM devices d{}", filter.sql())))).fetch_one(&self.pool).await?.try_get(0)?;
        Ok((rows.iter().map(device_from_row).collect::<Result<_>>()?, total))
    }

    pub async fn get_device(&self, id: &str) -> Result<DeviceRow> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN bindings b ON b.device_id = d.id WHERE d.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        device_from_row(&row)
    }

    pub async fn find_device_by_hostname(&self, hostname: &str) -> Result<Option<DeviceRow>> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN bindings b ON b.device_id = d.id WHERE d.hostname_key = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(hostname.to_lowercase()).fetch_optional(&self.pool).await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// Whether a device id has been revoked (deleted).
    pub async fn is_device_revoked(&self, device_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM revoked_certificates WHERE device_id = $1").bind(device_id).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }

    /// Deletes a device: releases its binding (closing its history interval for
    /// `reason`: an admin's delete or the device's own leave), revokes its certificate.
    pub async fn delete_device(&self, id: &str, reason: ReleaseReason, audit: impl FnOnce(&DeviceRow) -> AuditEntry) -> Result<DeviceRow> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN bindings b ON b.device_id = d.id WHERE d.id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let device = device_from_row(&row)?;
        if let (Some((family, value)), Some(range_id)) = (device.virtual_ip.as_deref().and_then(parse_address), &device.range_id) {
            crate::bindings::release_in(&mut tx.transaction, &address_key(family, value), range_id, reason).await?;
        }
        sqlx::query("DELETE FROM devices WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        sqlx::query("INSERT INTO revoked_certificates (serial, device_id, revoked_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(device.certificate_serial.as_str())
            .bind(id)
            .bind(now_micros())
            .execute(&mut *tx.transaction)
            .await?;
        crate::audit::record(&mut tx.transaction, audit(&device)).await?;
        tx.commit().await?;
        Ok(device)
    }
}
