//! Enrollment writes in batches: many enrollments share one transaction (group
//! commit), each one checked by conditional statements so one refusal never
//! aborts the others. The engine proposes addresses; the primary key decides.

use std::collections::BTreeMap;

use reachback_ipam::{Allocation, Engine, Location, Place, address_key, join_address};
use sqlx::Row;

use crate::{Result, Store, now_micros};

/// One enrollment to write.
#[derive(Clone, Debug)]
pub struct EnrollJob {
    pub device_id: String,
    pub hostname: String,
    pub username: String,
    pub platform: String,
    pub public_key_fingerprint: Vec<u8>,
    pub certificate_serial: String,
    pub enrollment_key_id: String,
    pub key_reusable: bool,
    pub location: Option<Location>,
    /// the device exists already and only needs an address
    pub rebind: bool,
}

/// An enrollment that was written.
#[derive(Clone, Debug, PartialEq)]
pub struct EnrollOutcome {
    pub device_id: String,
    pub virtual_ip: String,
    pub range_id: String,
    pub range_name: String,
}

/// Why one enrollment of a batch was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnrollFailure {
    /// the key was spent, revoked or expired meanwhile
    #[error("the enrollment key is no longer usable")]
    KeyUnusable,
    /// another device holds the hostname
    #[error("the hostname is held by another device")]
    HostnameTaken,
    /// no range has a free address
    #[error("no free address is left in any enabled range")]
    Exhausted,
    /// the device was deleted meanwhile
    #[error("the device no longer exists")]
    DeviceGone,
}

const MAX_ADDRESS_TRIES: usize = 64;

impl Store {
    /// Writes a batch of enrollments in one transaction. The engine must be the
    /// caller's exclusive copy for the duration; on failure every address it handed
    /// out for the batch is given back.
    pub async fn enroll_batch(
        &self,
        jobs: &[EnrollJob],
        engine: &mut Engine,
        quarantine_micros: i64,
    ) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>> {
        let mut planned: Vec<Allocation> = Vec::new();
        let result = self.enroll_batch_inner(jobs, engine, quarantine_micros, &mut planned).await;
        if result.is_err() {
            for allocation in &planned {
                engine.unreserve(allocation);
            }
        }
        result
    }

    async fn enroll_batch_inner(
        &self,
        jobs: &[EnrollJob],
        engine: &mut Engine,
        quarantine_micros: i64,
        planned: &mut Vec<Allocation>,
    ) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>> {
        let mut tx = self.write().await?;
        let now = now_micros();
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut range_deltas: BTreeMap<String, i64> = BTreeMap::new();
        let mut reusable_uses: BTreeMap<String, i64> = BTreeMap::new();
        for job in jobs {
            let connection = &mut *tx.transaction;
            if job.rebind {
                let touched = sqlx::query("UPDATE devices SET last_seen = $2 WHERE id = $1")
                    .bind(job.device_id.as_str())
                    .bind(now)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected();
                if touched == 0 {
                    outcomes.push(Err(EnrollFailure::DeviceGone));
                    continue;
                }
            } else {
                if !job.key_reusable {
                    let taken = sqlx::query(
                        "UPDATE enrollment_keys SET used_count = used_count + 1 WHERE id = $1 AND revoked = FALSE AND used_count = 0 AND (expires_at IS NULL OR expires_at > $2)",
                    )
                    .bind(job.enrollment_key_id.as_str())
                    .bind(now)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected();
                    if taken == 0 {
                        outcomes.push(Err(EnrollFailure::KeyUnusable));
                        continue;
                    }
                }
                let location = job.location.clone().unwrap_or_default();
                let inserted = sqlx::query(
                    "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, enrollment_key_id, city, state, country, latitude, longitude, created_at, last_seen) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14) ON CONFLICT DO NOTHING",
                )
                .bind(job.device_id.as_str())
                .bind(job.hostname.as_str())
                .bind(job.hostname.to_lowercase())
                .bind(job.username.as_str())
                .bind(job.platform.as_str())
                .bind(job.public_key_fingerprint.as_slice())
                .bind(job.certificate_serial.as_str())
                .bind(job.enrollment_key_id.as_str())
                .bind(location.city)
                .bind(location.state)
                .bind(location.country)
                .bind(location.latitude)
                .bind(location.longitude)
                .bind(now)
                .execute(&mut *connection)
                .await?
                .rows_affected();
                if inserted == 0 {
                    if !job.key_reusable {
                        give_back_key_use(connection, &job.enrollment_key_id).await?;
                    }
                    outcomes.push(Err(EnrollFailure::HostnameTaken));
                    continue;
                }
            }
            let place = Place::new(job.location.as_ref());
            let mut bound = None;
            for _ in 0..MAX_ADDRESS_TRIES {
                let Ok(allocation) = engine.plan(&place, now) else { break };
                let key = address_key(allocation.family, allocation.value);
                // a quarantined row is reused only when the engine chose quarantine reuse
                // or the row's quarantine has run out; a bound row never
                let reuse_before = match allocation.quarantined_since {
                    Some(_) => i64::MAX,
                    None => now.saturating_sub(quarantine_micros),
                };
                let written = sqlx::query(
                    "INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated, released_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL) \
                     ON CONFLICT (ip_key) DO UPDATE SET ip = excluded.ip, range_id = excluded.range_id, device_id = excluded.device_id, \
                     username = excluded.username, platform = excluded.platform, client_hostname = excluded.client_hostname, \
                     last_updated = excluded.last_updated, released_at = NULL \
                     WHERE bindings.device_id IS NULL AND bindings.released_at <= $9",
                )
                .bind(key.to_vec())
                .bind(join_address(allocation.family, allocation.value).to_string())
                .bind(allocation.range_id.as_str())
                .bind(job.device_id.as_str())
                .bind(job.username.as_str())
                .bind(job.platform.as_str())
                .bind(job.hostname.as_str())
                .bind(now)
                .bind(reuse_before)
                .execute(&mut *connection)
                .await?
                .rows_affected();
                if written == 1 {
                    bound = Some(allocation.clone());
                    planned.push(allocation);
                    break;
                }
                // taken by another replica: the engine already counts it as used
                tracing::debug!(address = %join_address(allocation.family, allocation.value), "address taken elsewhere, trying the next");
            }
            match bound {
                Some(allocation) => {
                    *range_deltas.entry(allocation.range_id.clone()).or_default() += 1;
                    if !job.rebind && job.key_reusable {
                        *reusable_uses.entry(job.enrollment_key_id.clone()).or_default() += 1;
                    }
                    outcomes.push(Ok(EnrollOutcome {
                        device_id: job.device_id.clone(),
                        virtual_ip: join_address(allocation.family, allocation.value).to_string(),
                        range_name: engine.range(&allocation.range_id).map(|spec| spec.name.clone()).unwrap_or_default(),
                        range_id: allocation.range_id,
                    }));
                }
                None => {
                    if !job.rebind {
                        sqlx::query("DELETE FROM devices WHERE id = $1").bind(job.device_id.as_str()).execute(&mut *connection).await?;
                        if !job.key_reusable {
                            give_back_key_use(connection, &job.enrollment_key_id).await?;
                        }
                    }
                    outcomes.push(Err(EnrollFailure::Exhausted));
                }
            }
        }
        // counters last and in a fixed order, so concurrent batches on other replicas
        // lock the same rows in the same order
        for (range_id, delta) in &range_deltas {
            sqlx::query("UPDATE ip_ranges SET used_ips = used_ips + $2 WHERE id = $1")
                .bind(range_id.as_str())
                .bind(*delta)
                .execute(&mut *tx.transaction)
                .await?;
        }
        for (key_id, uses) in &reusable_uses {
            sqlx::query("UPDATE enrollment_keys SET used_count = used_count + $2 WHERE id = $1")
                .bind(key_id.as_str())
                .bind(*uses)
                .execute(&mut *tx.transaction)
                .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Whether an address key is free to bind in the database right now (tests).
    pub async fn address_row_exists(&self, key: &[u8; 17]) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) FROM bindings WHERE ip_key = $1").bind(key.to_vec()).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }
}

async fn give_back_key_use(connection: &mut sqlx::AnyConnection, key_id: &str) -> Result<()> {
    sqlx::query("UPDATE enrollment_keys SET used_count = used_count - 1 WHERE id = $1 AND used_count > 0").bind(key_id).execute(&mut *connection).await?;
    Ok(())
}
