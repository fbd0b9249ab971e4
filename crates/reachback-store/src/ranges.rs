//! IP ranges: create, edit, delete with overlap and in-use checks inside one transaction.

use reachback_ipam::{AddressRange, Family, Location, address_key};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::{Result, Store, StoreError, now_micros};

/// A stored range.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeRow {
    pub id: String,
    pub name: String,
    pub description: String,
    pub range: AddressRange,
    pub location: Option<Location>,
    pub enabled: bool,
    pub used_ips: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields an admin sets on a range.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeWrite {
    pub name: String,
    pub description: String,
    pub range: AddressRange,
    pub location: Option<Location>,
    pub enabled: bool,
}

const RANGE_COLUMNS: &str = "id, name, description, range_text, city, state, country, latitude, longitude, enabled, used_ips, created_at, updated_at";

pub(crate) fn family_number(family: Family) -> i64 {
    match family {
        Family::V4 => 4,
        Family::V6 => 6,
    }
}

pub(crate) fn location_from_row(row: &AnyRow, prefix: &str) -> Result<Option<Location>> {
    let column = |name: &str| format!("{prefix}{name}");
    let location = Location {
        city: row.try_get(column("city").as_str())?,
        state: row.try_get(column("state").as_str())?,
        country: row.try_get(column("country").as_str())?,
        latitude: row.try_get(column("latitude").as_str())?,
        longitude: row.try_get(column("longitude").as_str())?,
    };
    Ok((location != Location::default()).then_some(location))
}

fn range_from_row(row: &AnyRow) -> Result<RangeRow> {
    let text: String = row.try_get("range_text")?;
    let range = AddressRange::parse(&text).map_err(|error| StoreError::Corrupt(format!("range {text}: {error}")))?;
    Ok(RangeRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        range,
        location: location_from_row(row, "")?,
        enabled: crate::get_bool(row, "enabled")?,
        used_ips: row.try_get("used_ips")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// Every range, by name. Ranges number in the hundreds, so callers filter and page in memory.
    pub async fn list_ranges(&self) -> Result<Vec<RangeRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RANGE_COLUMNS} FROM ip_ranges ORDER BY name_key, id"))).fetch_all(&self.pool).await?;
        rows.iter().map(range_from_row).collect()
    }

    pub async fn get_range(&self, id: &str) -> Result<RangeRow> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RANGE_COLUMNS} FROM ip_ranges WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        range_from_row(&row)
    }

    /// Creates a range; refuses overlaps (naming the other range) and duplicate names.
    pub async fn create_range(&self, id: &str, write: &RangeWrite, audit: AuditEntry) -> Result<RangeRow> {
        let mut tx = self.write().await?;
        self.lock_ranges(&mut tx).await?;
        check_overlap(&mut tx.transaction, &write.range, None).await?;
        check_name(&mut tx.transaction, &write.name, None).await?;
        let now = now_micros();
        let query = sqlx::query(
            "INSERT INTO ip_ranges (id, name, name_key, description, range_text, family, first_key, last_key, city, state, country, latitude, longitude, enabled, used_ips, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, $15, $15)",
        )
        .bind(id);
        bind_write(query, write).bind(now).execute(&mut *tx.transaction).await.map_err(name_taken)?;
        crate::claim_skeleton(&mut tx.transaction, "ip_ranges", id, &write.name).await?;
        let created = RangeRow {
            id: id.to_string(),
            name: write.name.clone(),
            description: write.description.clone(),
            range: write.range,
            location: write.location.clone(),
            enabled: write.enabled,
            used_ips: 0,
            created_at: now,
            updated_at: now,
        };
        crate::audit::record(&mut tx.transaction, audit).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Opens a write transaction holding the range lock and reads the range to change.
    async fn range_for_change(&self, id: &str) -> Result<(crate::WriteTx<'_>, RangeRow)> {
        let mut tx = self.write().await?;
        self.lock_ranges(&mut tx).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RANGE_COLUMNS} FROM ip_ranges WHERE id = $1")))
            .bind(id)
            .fetch_optional(&mut *tx.transaction)
            .await?
            .ok_or(StoreError::NotFound)?;
        let range = range_from_row(&row)?;
        Ok((tx, range))
    }

    /// Replaces a range's fields. A new address block must hold every bound address
    /// and overlap no other range; quarantined addresses outside it are forgotten.
    pub async fn update_range(&self, id: &str, write: &RangeWrite, audit: impl FnOnce(&RangeRow) -> AuditEntry) -> Result<(RangeRow, RangeRow)> {
        let (mut tx, before) = self.range_for_change(id).await?;
        if write.range != before.range {
            check_overlap(&mut tx.transaction, &write.range, Some(id)).await?;
            let (first, last) = write.range.assignable();
            let family = write.range.family();
            // the range row still holds the old block here: its rows are read through it
            let sql = format!("SELECT COUNT(*) FROM bindings WHERE {} AND device_id IS NOT NULL AND (ip_key < $2 OR ip_key > $3)", crate::range_rows("", "$1"));
            let outside: i64 = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(address_key(family, first).to_vec())
                .bind(address_key(family, last).to_vec())
                .fetch_one(&mut *tx.transaction)
                .await?
                .try_get(0)?;
            if outside > 0 {
                return Err(StoreError::BindingsOutside(outside));
            }
            let sql = format!("DELETE FROM bindings WHERE {} AND device_id IS NULL AND (ip_key < $2 OR ip_key > $3)", crate::range_rows("", "$1"));
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(address_key(family, first).to_vec())
                .bind(address_key(family, last).to_vec())
                .execute(&mut *tx.transaction)
                .await?;
        }
        if write.name.to_lowercase() != before.name.to_lowercase() {
            check_name(&mut tx.transaction, &write.name, Some(id)).await?;
        }
        let now = now_micros().max(before.updated_at + 1);
        let query = sqlx::query(
            "UPDATE ip_ranges SET name = $2, name_key = $3, description = $4, range_text = $5, family = $6, first_key = $7, last_key = $8, \
             city = $9, state = $10, country = $11, latitude = $12, longitude = $13, enabled = $14, updated_at = $15 WHERE id = $1",
        )
        .bind(id);
        bind_write(query, write).bind(now).execute(&mut *tx.transaction).await.map_err(name_taken)?;
        if write.name != before.name {
            crate::claim_skeleton(&mut tx.transaction, "ip_ranges", id, &write.name).await?;
        }
        let after = RangeRow {
            name: write.name.clone(),
            description: write.description.clone(),
            range: write.range,
            location: write.location.clone(),
            enabled: write.enabled,
            updated_at: now,
            ..before.clone()
        };
        crate::audit::record(&mut tx.transaction, audit(&after)).await?;
        tx.commit().await?;
        Ok((before, after))
    }

    /// Deletes a range. With bindings it is refused unless `force`, which releases them.
    /// Returns the deleted range and how many bindings went with it.
    pub async fn delete_range(&self, id: &str, force: bool, audit: impl FnOnce(&RangeRow, i64) -> AuditEntry) -> Result<(RangeRow, i64)> {
        let (mut tx, before) = self.range_for_change(id).await?;
        let sql = format!("SELECT COUNT(*) FROM bindings WHERE {} AND device_id IS NOT NULL", crate::range_rows("", "$1"));
        let bound: i64 = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_one(&mut *tx.transaction).await?.try_get(0)?;
        if bound > 0 && !force {
            return Err(StoreError::RangeInUse(bound));
        }
        // the released devices' live sessions go too: their replicas disconnect them
        let sql = format!(
            "DELETE FROM client_sessions WHERE device_id IN (SELECT device_id FROM bindings WHERE {} AND device_id IS NOT NULL)",
            crate::range_rows("", "$1")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&mut *tx.transaction).await?;
        crate::history::close_range_in(&mut tx.transaction, id, crate::ReleaseReason::RangeDeleted, now_micros()).await?;
        let sql = format!("DELETE FROM bindings WHERE {}", crate::range_rows("", "$1"));
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&mut *tx.transaction).await?;
        sqlx::query("DELETE FROM ip_ranges WHERE id = $1").bind(id).execute(&mut *tx.transaction).await?;
        crate::audit::record(&mut tx.transaction, audit(&before, bound)).await?;
        tx.commit().await?;
        Ok((before, bound))
    }
}

/// Binds name, name key, description, range text, family, first and last key,
/// location and status, in that order ($2 … $14).
fn bind_write<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    write: &RangeWrite,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let location = write.location.clone().unwrap_or_default();
    query
        .bind(write.name.clone())
        .bind(write.name.to_lowercase())
        .bind(write.description.clone())
        .bind(write.range.to_string())
        .bind(family_number(write.range.family()))
        .bind(write.range.key_bounds().0.to_vec())
        .bind(write.range.key_bounds().1.to_vec())
        .bind(location.city)
        .bind(location.state)
        .bind(location.country)
        .bind(location.latitude)
        .bind(location.longitude)
        .bind(write.enabled)
}

/// A unique violation on a range write can only be the case-folded name.
fn name_taken(error: sqlx::Error) -> StoreError {
    if crate::is_unique_violation(&error) { StoreError::Duplicate("name") } else { error.into() }
}

async fn check_overlap(connection: &mut sqlx::AnyConnection, range: &AddressRange, except: Option<&str>) -> Result<()> {
    let family = range.family();
    let row = sqlx::query(
        "SELECT id, name, range_text FROM ip_ranges WHERE family = $1 AND first_key <= $2 AND last_key >= $3 AND id <> $4 ORDER BY first_key LIMIT 1",
    )
    .bind(family_number(family))
    .bind(address_key(family, range.last()).to_vec())
    .bind(address_key(family, range.first()).to_vec())
    .bind(except.unwrap_or(""))
    .fetch_optional(&mut *connection)
    .await?;
    match row {
        Some(row) => Err(StoreError::Overlap { id: row.try_get("id")?, name: row.try_get("name")?, range: row.try_get("range_text")? }),
        None => Ok(()),
    }
}

async fn check_name(connection: &mut sqlx::AnyConnection, name: &str, except: Option<&str>) -> Result<()> {
    let taken = sqlx::query("SELECT id FROM ip_ranges WHERE name_key = $1 AND id <> $2")
        .bind(name.to_lowercase())
        .bind(except.unwrap_or(""))
        .fetch_optional(&mut *connection)
        .await?;
    if taken.is_some() { Err(StoreError::Duplicate("name")) } else { Ok(()) }
}
