//! Enrollment in batches: many enrollments share one transaction (group commit) and
//! a handful of statements — one read of the keys, one of the hostnames, one
//! multi-row insert of devices and one of bindings — whatever the batch size. Each
//! enrollment is decided on its own, so one refusal never affects the others. The
//! engine proposes addresses; the primary key of `bindings` decides.

use std::collections::{BTreeMap, HashMap, HashSet};

use reachback_ipam::{Allocation, Engine, Location, Place, address_key, join_address};
use sqlx::Row;

use crate::{Result, Store, now_micros};

/// One enrollment request, validated but not yet authenticated.
#[derive(Clone, Debug)]
pub struct EnrollJob {
    /// SHA-256 of the enrollment key the agent sent
    pub key_hash: Vec<u8>,
    /// the id the device gets if it is new
    pub new_device_id: String,
    /// lowercase FQDN
    pub hostname: String,
    pub platform: String,
    pub public_key_fingerprint: Vec<u8>,
    pub certificate_serial: String,
    pub location: Option<Location>,
}

/// A written (or recognised) enrollment.
#[derive(Clone, Debug, PartialEq)]
pub struct EnrollOutcome {
    /// false when a known device re-enrolled with the same key pair
    pub created: bool,
    pub device_id: String,
    pub username: String,
    pub virtual_ip: String,
    pub range_id: String,
    pub range_name: String,
}

/// Why one enrollment was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnrollFailure {
    /// unknown key
    #[error("the enrollment key is not valid")]
    UnknownKey,
    /// revoked or expired key
    #[error("the enrollment key is revoked or expired")]
    KeyRevokedOrExpired,
    /// a single-use key that was used already
    #[error("the enrollment key has been used")]
    KeySpent,
    /// another device holds the hostname
    #[error("the hostname is held by another device")]
    HostnameTaken,
    /// no range has a free address
    #[error("no free address is left in any enabled range")]
    Exhausted,
}

struct KeyInfo {
    id: String,
    username: String,
    reusable: bool,
    usable_now: bool,
    spent: bool,
}

struct KnownDevice {
    id: String,
    username: String,
    fingerprint: Vec<u8>,
    binding: Option<(String, String, String)>,
}

/// What a job turned into before addresses are handed out.
enum Plan {
    Done(Result<EnrollOutcome, EnrollFailure>),
    /// a new device (with its key) or a known device without a binding
    Bind {
        device_id: String,
        username: String,
        new_device: bool,
        key_id: String,
        reusable: bool,
    },
}

const MAX_ADDRESS_TRIES: usize = 64;
const INSERT_CHUNK: usize = 500;

/// Parameters for a multi-row statement: `$N` on PostgreSQL, anonymous `?` on SQLite
/// (bound in order of appearance). SQLite keeps named and numbered parameters in a
/// list searched linearly, and sqlx asks for every parameter's name: quadratic in a
/// statement with thousands of them.
fn placeholders(mark: char, rows: usize, columns: usize, first: usize) -> String {
    (0..rows)
        .map(|row| {
            let cells: Vec<String> =
                (0..columns).map(|column| if mark == '?' { "?".to_string() } else { format!("${}", first + row * columns + column) }).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `count` parameters separated by commas, for an `IN (…)` list, numbered from `first`.
fn parameter_list(mark: char, count: usize, first: usize) -> String {
    (first..first + count).map(|index| if mark == '?' { "?".to_string() } else { format!("${index}") }).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// Authenticates and writes a batch of enrollments in one transaction. The engine
    /// must be the caller's exclusive copy for the duration; on failure every address
    /// it handed out for the batch is given back.
    pub async fn enroll_batch(&self, jobs: &[EnrollJob], engine: &mut Engine, quarantine_micros: i64) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>> {
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
        let mark = match self.backend {
            crate::Backend::Sqlite => '?',
            crate::Backend::Postgres => '$',
        };
        let list = |count: usize, first: usize| parameter_list(mark, count, first);
        let numbered = |index: usize| if mark == '?' { "?".to_string() } else { format!("${index}") };

        // 1. the keys of the batch
        let hashes: Vec<&Vec<u8>> = jobs.iter().map(|job| &job.key_hash).collect::<HashSet<_>>().into_iter().collect();
        let sql = format!(
            "SELECT id, key_hash, username, reusable, expires_at, used_count, revoked FROM enrollment_keys WHERE key_hash IN ({})",
            list(hashes.len(), 1)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for hash in &hashes {
            query = query.bind(hash.as_slice());
        }
        let mut keys: HashMap<Vec<u8>, KeyInfo> = HashMap::new();
        for row in query.fetch_all(&mut *tx.transaction).await? {
            let expires_at: Option<i64> = row.try_get("expires_at")?;
            let revoked = crate::get_bool(&row, "revoked")?;
            let used_count: i64 = row.try_get("used_count")?;
            keys.insert(
                row.try_get("key_hash")?,
                KeyInfo {
                    id: row.try_get("id")?,
                    username: row.try_get("username")?,
                    reusable: crate::get_bool(&row, "reusable")?,
                    usable_now: !revoked && expires_at.is_none_or(|at| at > now),
                    spent: used_count > 0,
                },
            );
        }

        // 2. the devices that hold these hostnames today
        let hostnames: Vec<&String> = jobs.iter().map(|job| &job.hostname).collect::<HashSet<_>>().into_iter().collect();
        let sql = format!(
            "SELECT d.id, d.hostname_key, d.username, d.public_key_fingerprint, b.ip, b.range_id, r.name AS range_name \
             FROM devices d LEFT JOIN bindings b ON b.device_id = d.id LEFT JOIN ip_ranges r ON r.id = b.range_id WHERE d.hostname_key IN ({})",
            list(hostnames.len(), 1)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for hostname in &hostnames {
            query = query.bind(hostname.as_str());
        }
        let mut devices: HashMap<String, KnownDevice> = HashMap::new();
        for row in query.fetch_all(&mut *tx.transaction).await? {
            let ip: Option<String> = row.try_get("ip")?;
            let binding = match ip {
                Some(ip) => Some((ip, row.try_get::<String, _>("range_id")?, row.try_get::<String, _>("range_name")?)),
                None => None,
            };
            devices.insert(
                row.try_get("hostname_key")?,
                KnownDevice { id: row.try_get("id")?, username: row.try_get("username")?, fingerprint: row.try_get("public_key_fingerprint")?, binding },
            );
        }

        // 3. decide each job
        let mut claimed_hostnames: HashSet<&str> = HashSet::new();
        let mut spent_in_batch: HashSet<String> = HashSet::new();
        let mut plans: Vec<Plan> = Vec::with_capacity(jobs.len());
        let mut seen_devices: Vec<String> = Vec::new();
        for job in jobs {
            let plan = match keys.get(&job.key_hash) {
                None => Plan::Done(Err(EnrollFailure::UnknownKey)),
                Some(key) if !key.usable_now => Plan::Done(Err(EnrollFailure::KeyRevokedOrExpired)),
                Some(key) => match devices.get(&job.hostname) {
                    Some(device) if device.fingerprint == job.public_key_fingerprint && device.username == key.username => match &device.binding {
                        Some((ip, range_id, range_name)) => {
                            seen_devices.push(device.id.clone());
                            Plan::Done(Ok(EnrollOutcome {
                                created: false,
                                device_id: device.id.clone(),
                                username: device.username.clone(),
                                virtual_ip: ip.clone(),
                                range_id: range_id.clone(),
                                range_name: range_name.clone(),
                            }))
                        }
                        None if claimed_hostnames.insert(&job.hostname) => Plan::Bind {
                            device_id: device.id.clone(),
                            username: device.username.clone(),
                            new_device: false,
                            key_id: key.id.clone(),
                            reusable: key.reusable,
                        },
                        None => Plan::Done(Err(EnrollFailure::HostnameTaken)),
                    },
                    Some(_) => Plan::Done(Err(EnrollFailure::HostnameTaken)),
                    None if !key.reusable && (key.spent || spent_in_batch.contains(&key.id)) => Plan::Done(Err(EnrollFailure::KeySpent)),
                    None if !claimed_hostnames.insert(&job.hostname) => Plan::Done(Err(EnrollFailure::HostnameTaken)),
                    None => {
                        if !key.reusable {
                            spent_in_batch.insert(key.id.clone());
                        }
                        Plan::Bind {
                            device_id: job.new_device_id.clone(),
                            username: key.username.clone(),
                            new_device: true,
                            key_id: key.id.clone(),
                            reusable: key.reusable,
                        }
                    }
                },
            };
            plans.push(plan);
        }

        // 4. single-use keys: the conditional update is the last word across replicas
        for plan in plans.iter_mut() {
            if let Plan::Bind { new_device: true, reusable: false, key_id, .. } = plan {
                let taken = sqlx::query("UPDATE enrollment_keys SET used_count = used_count + 1 WHERE id = $1 AND revoked = FALSE AND used_count = 0")
                    .bind(key_id.as_str())
                    .execute(&mut *tx.transaction)
                    .await?
                    .rows_affected();
                if taken == 0 {
                    *plan = Plan::Done(Err(EnrollFailure::KeySpent));
                }
            }
        }

        // 5. new devices, in multi-row inserts; a hostname another replica took meanwhile is refused
        let new_devices: Vec<usize> =
            plans.iter().enumerate().filter(|(_, plan)| matches!(plan, Plan::Bind { new_device: true, .. })).map(|(index, _)| index).collect();
        let mut inserted: HashSet<String> = HashSet::new();
        for chunk in new_devices.chunks(INSERT_CHUNK) {
            let sql = format!(
                "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, enrollment_key_id, city, state, country, latitude, longitude, created_at, last_seen) \
                 VALUES {} ON CONFLICT DO NOTHING RETURNING id",
                placeholders(mark, chunk.len(), 15, 1)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for &index in chunk {
                let (job, Plan::Bind { device_id, username, key_id, .. }) = (&jobs[index], &plans[index]) else { continue };
                let location = job.location.clone().unwrap_or_default();
                query = query
                    .bind(device_id.as_str())
                    .bind(job.hostname.as_str())
                    .bind(job.hostname.as_str())
                    .bind(username.as_str())
                    .bind(job.platform.as_str())
                    .bind(job.public_key_fingerprint.as_slice())
                    .bind(job.certificate_serial.as_str())
                    .bind(key_id.as_str())
                    .bind(location.city)
                    .bind(location.state)
                    .bind(location.country)
                    .bind(location.latitude)
                    .bind(location.longitude)
                    .bind(now)
                    .bind(now);
            }
            for row in query.fetch_all(&mut *tx.transaction).await? {
                inserted.insert(row.try_get(0)?);
            }
        }
        for &index in &new_devices {
            let Plan::Bind { device_id, key_id, reusable, .. } = &plans[index] else { continue };
            if !inserted.contains(device_id) {
                if !reusable {
                    sqlx::query("UPDATE enrollment_keys SET used_count = used_count - 1 WHERE id = $1 AND used_count > 0")
                        .bind(key_id.as_str())
                        .execute(&mut *tx.transaction)
                        .await?;
                }
                plans[index] = Plan::Done(Err(EnrollFailure::HostnameTaken));
            }
        }

        // 6. addresses: planned in memory, written in multi-row upserts; an address
        //    another replica bound meanwhile is not returned and is tried again alone
        let mut outcomes: Vec<Option<Result<EnrollOutcome, EnrollFailure>>> = plans
            .iter()
            .map(|plan| match plan {
                Plan::Done(result) => Some(result.clone()),
                Plan::Bind { .. } => None,
            })
            .collect();
        let mut proposals: Vec<(usize, Allocation)> = Vec::new();
        for (index, plan) in plans.iter().enumerate() {
            if let Plan::Bind { .. } = plan {
                match engine.plan(&Place::new(jobs[index].location.as_ref()), now) {
                    Ok(allocation) => {
                        planned.push(allocation.clone());
                        proposals.push((index, allocation));
                    }
                    Err(_) => outcomes[index] = Some(Err(EnrollFailure::Exhausted)),
                }
            }
        }
        let reuse_before = now.saturating_sub(quarantine_micros);
        let mut written: HashSet<Vec<u8>> = HashSet::new();
        // fresh addresses may take over a quarantine row only once its quarantine ran
        // out; addresses the engine took out of quarantine on purpose may take it at once
        let (fresh, from_quarantine): (Vec<&(usize, Allocation)>, Vec<&(usize, Allocation)>) =
            proposals.iter().partition(|(_, allocation)| allocation.quarantined_since.is_none());
        for (group, reuse) in [(fresh, reuse_before), (from_quarantine, i64::MAX)] {
            for chunk in group.chunks(INSERT_CHUNK) {
                let sql = format!(
                    "INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated) VALUES {} \
                     ON CONFLICT (ip_key) DO UPDATE SET ip = excluded.ip, range_id = excluded.range_id, device_id = excluded.device_id, \
                     username = excluded.username, platform = excluded.platform, client_hostname = excluded.client_hostname, \
                     last_updated = excluded.last_updated, released_at = NULL \
                     WHERE bindings.device_id IS NULL AND bindings.released_at <= {} RETURNING ip_key",
                    placeholders(mark, chunk.len(), 8, 2),
                    numbered(1)
                );
                // the quarantine limit is $1 on PostgreSQL, the last `?` on SQLite
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                if mark == '$' {
                    query = query.bind(reuse);
                }
                for (index, allocation) in chunk.iter().copied() {
                    let Plan::Bind { device_id, username, .. } = &plans[*index] else { continue };
                    query = query
                        .bind(address_key(allocation.family, allocation.value).to_vec())
                        .bind(join_address(allocation.family, allocation.value).to_string())
                        .bind(allocation.range_id.as_str())
                        .bind(device_id.as_str())
                        .bind(username.as_str())
                        .bind(jobs[*index].platform.as_str())
                        .bind(jobs[*index].hostname.as_str())
                        .bind(now);
                }
                if mark == '?' {
                    query = query.bind(reuse);
                }
                for row in query.fetch_all(&mut *tx.transaction).await? {
                    written.insert(row.try_get(0)?);
                }
            }
        }
        let mut range_deltas: BTreeMap<String, i64> = BTreeMap::new();
        for (index, allocation) in proposals {
            let mut bound = written.contains(address_key(allocation.family, allocation.value).as_slice()).then_some(allocation.clone());
            if bound.is_none() {
                tracing::debug!(address = %join_address(allocation.family, allocation.value), "address taken elsewhere, trying others");
                planned.retain(|planned| planned != &allocation);
                bound = self.bind_one(&mut tx, engine, &jobs[index], &plans[index], now, reuse_before, planned).await?;
            }
            outcomes[index] = Some(match bound {
                Some(allocation) => {
                    let Plan::Bind { device_id, username, new_device, .. } = &plans[index] else { continue };
                    *range_deltas.entry(allocation.range_id.clone()).or_default() += 1;
                    Ok(EnrollOutcome {
                        created: *new_device,
                        device_id: device_id.clone(),
                        username: username.clone(),
                        virtual_ip: join_address(allocation.family, allocation.value).to_string(),
                        range_name: engine.range(&allocation.range_id).map(|spec| spec.name.clone()).unwrap_or_default(),
                        range_id: allocation.range_id,
                    })
                }
                None => Err(EnrollFailure::Exhausted),
            });
        }

        // 7. undo what an exhausted enrollment wrote; counters, in a fixed order so
        //    concurrent batches on other replicas lock the same rows in the same order
        let mut reusable_uses: BTreeMap<String, i64> = BTreeMap::new();
        for (index, outcome) in outcomes.iter().enumerate() {
            let Plan::Bind { device_id, new_device, key_id, reusable, .. } = &plans[index] else { continue };
            match outcome {
                Some(Ok(_)) if *new_device && *reusable => *reusable_uses.entry(key_id.clone()).or_default() += 1,
                Some(Ok(_)) => seen_devices.push(device_id.clone()),
                Some(Err(_)) if *new_device => {
                    sqlx::query("DELETE FROM devices WHERE id = $1").bind(device_id.as_str()).execute(&mut *tx.transaction).await?;
                    if !reusable {
                        sqlx::query("UPDATE enrollment_keys SET used_count = used_count - 1 WHERE id = $1 AND used_count > 0")
                            .bind(key_id.as_str())
                            .execute(&mut *tx.transaction)
                            .await?;
                    }
                }
                _ => {}
            }
        }
        self.add_used_ips(&mut tx, &range_deltas).await?;
        for (key_id, uses) in &reusable_uses {
            sqlx::query("UPDATE enrollment_keys SET used_count = used_count + $2 WHERE id = $1")
                .bind(key_id.as_str())
                .bind(*uses)
                .execute(&mut *tx.transaction)
                .await?;
        }
        seen_devices.sort();
        seen_devices.dedup();
        for chunk in seen_devices.chunks(INSERT_CHUNK) {
            let sql = format!("UPDATE devices SET last_seen = {} WHERE id IN ({})", numbered(1), list(chunk.len(), 2));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            query.execute(&mut *tx.transaction).await?;
        }
        tx.commit().await?;
        Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or(Err(EnrollFailure::Exhausted))).collect())
    }

    /// Adds each range's delta to its `used_ips` in one statement (a batch touches up
    /// to one range per enrollment). PostgreSQL first locks the rows in id order, so
    /// concurrent batches on other replicas wait for each other instead of deadlocking.
    async fn add_used_ips(&self, tx: &mut crate::WriteTx<'_>, deltas: &BTreeMap<String, i64>) -> Result<()> {
        let ids: Vec<&String> = deltas.keys().collect();
        for chunk in ids.chunks(INSERT_CHUNK) {
            let mark = match self.backend {
                crate::Backend::Sqlite => '?',
                crate::Backend::Postgres => {
                    let sql = format!("SELECT id FROM ip_ranges WHERE id IN ({}) ORDER BY id FOR UPDATE", parameter_list('$', chunk.len(), 1));
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for id in chunk {
                        query = query.bind(id.as_str());
                    }
                    query.fetch_all(&mut *tx.transaction).await?;
                    '$'
                }
            };
            let sql = format!(
                "WITH delta (id, amount) AS (VALUES {}) UPDATE ip_ranges SET used_ips = used_ips + delta.amount FROM delta WHERE ip_ranges.id = delta.id",
                placeholders(mark, chunk.len(), 2, 1)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str()).bind(deltas[*id]);
            }
            query.execute(&mut *tx.transaction).await?;
        }
        Ok(())
    }

    /// Binds one job's device to the next address the database accepts.
    async fn bind_one(
        &self,
        tx: &mut crate::WriteTx<'_>,
        engine: &mut Engine,
        job: &EnrollJob,
        plan: &Plan,
        now: i64,
        reuse_before: i64,
        planned: &mut Vec<Allocation>,
    ) -> Result<Option<Allocation>> {
        let Plan::Bind { device_id, username, .. } = plan else { return Ok(None) };
        let place = Place::new(job.location.as_ref());
        for _ in 0..MAX_ADDRESS_TRIES {
            let Ok(allocation) = engine.plan(&place, now) else { return Ok(None) };
            let reuse = if allocation.quarantined_since.is_some() { i64::MAX } else { reuse_before };
            let written = sqlx::query(
                "INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated, released_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL) \
                 ON CONFLICT (ip_key) DO UPDATE SET ip = excluded.ip, range_id = excluded.range_id, device_id = excluded.device_id, \
                 username = excluded.username, platform = excluded.platform, client_hostname = excluded.client_hostname, \
                 last_updated = excluded.last_updated, released_at = NULL \
                 WHERE bindings.device_id IS NULL AND bindings.released_at <= $9",
            )
            .bind(address_key(allocation.family, allocation.value).to_vec())
            .bind(join_address(allocation.family, allocation.value).to_string())
            .bind(allocation.range_id.as_str())
            .bind(device_id.as_str())
            .bind(username.as_str())
            .bind(job.platform.as_str())
            .bind(job.hostname.as_str())
            .bind(now)
            .bind(reuse)
            .execute(&mut *tx.transaction)
            .await?
            .rows_affected();
            if written == 1 {
                planned.push(allocation.clone());
                return Ok(Some(allocation));
            }
        }
        Ok(None)
    }
}
