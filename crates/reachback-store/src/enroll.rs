//! Enrollment in batches: many enrollments share one transaction (group commit) and
//! a handful of statements — one read of the keys, one of the hostnames, one
//! multi-row insert of devices and one of bindings — whatever the batch size. Each
//! enrollment is decided on its own, so one refusal never affects the others. The
//! engine proposes addresses; the primary key of `bindings` decides.
//!
//! The decisions are written once, over [`EnrollWrites`]: the statements of the
//! transaction on one backend. PostgreSQL runs them through sqlx
//! ([`SqlxWrites`]); SQLite through a connection of its own on the writer's thread
//! (`enroll_sqlite`), called directly instead of through sqlx's worker thread (an
//! SQLite store is always a file: see `Store::connect`).

use std::collections::{BTreeMap, HashMap, HashSet};

use reachback_ipam::{Allocation, Engine, Location, Place, address_key, join_address};
use sqlx::Row;

use crate::history::{BindReason, HISTORY_COLUMNS, HISTORY_INSERT, HistoryOpen};
use crate::{Result, Store, WriteTx, now_micros};

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
    /// the caller's address, for the audit log
    pub source_ip: Option<String>,
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
    /// the key is limited to hostnames this one is not among
    #[error("the enrollment key does not allow this hostname (it allows {pattern})")]
    HostnameNotAllowed { pattern: String },
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
    hostname_pattern: Option<String>,
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

/// A key as the transaction reads it.
pub(crate) struct KeyRecord {
    pub id: String,
    pub key_hash: Vec<u8>,
    pub username: String,
    pub reusable: bool,
    pub expires_at: Option<i64>,
    pub used_count: i64,
    pub revoked: bool,
    pub hostname_pattern: Option<String>,
}

/// A device holding one of the batch's hostnames, with its binding if it has one.
pub(crate) struct DeviceRecord {
    pub id: String,
    pub hostname_key: String,
    pub username: String,
    pub fingerprint: Vec<u8>,
    /// address, range id, range name
    pub binding: Option<(String, String, String)>,
}

/// A device row to insert.
pub(crate) struct NewDevice<'a> {
    pub id: &'a str,
    pub hostname: &'a str,
    pub username: &'a str,
    pub platform: &'a str,
    pub fingerprint: &'a [u8],
    pub certificate_serial: &'a str,
    pub key_id: &'a str,
    pub location: Option<&'a Location>,
    pub now: i64,
}

/// A binding row to insert, or to write over a quarantined row of the same address.
pub(crate) struct NewBinding<'a> {
    pub ip_key: Vec<u8>,
    pub ip: String,
    pub range_id: &'a str,
    pub device_id: &'a str,
    pub username: &'a str,
    pub platform: &'a str,
    pub hostname: &'a str,
    pub now: i64,
}

/// The audit row of one enrollment.
pub(crate) struct EnrollAudit {
    pub id: String,
    /// `enrollment_key:<key id>`: the credential that enrolled the device
    pub actor: String,
    pub device_id: String,
    /// JSON: what the device got
    pub after: String,
    pub source_ip: Option<String>,
    pub now: i64,
}

/// The statements of one enrollment transaction on one backend; dropping it
/// without [`EnrollWrites::commit`] rolls back.
pub(crate) trait EnrollWrites {
    /// The keys with these hashes.
    async fn keys(&mut self, hashes: &[&[u8]]) -> Result<Vec<KeyRecord>>;
    /// The devices holding these (lowercase) hostnames.
    async fn devices(&mut self, hostnames: &[&str]) -> Result<Vec<DeviceRecord>>;
    /// Marks unused single-use keys used (PostgreSQL: one statement for them all;
    /// SQLite: a prepared statement per key, in process); returns the ids taken (a
    /// key used or revoked meanwhile is not). The conditional update is the last
    /// word across replicas.
    async fn take_keys(&mut self, key_ids: &[&str]) -> Result<HashSet<String>>;
    /// Undoes [`EnrollWrites::take_keys`] for one key.
    async fn give_back_key(&mut self, key_id: &str) -> Result<()>;
    /// Counts uses of a reusable key.
    async fn add_key_uses(&mut self, key_id: &str, uses: i64) -> Result<()>;
    /// Inserts devices; returns the ids written (a hostname taken meanwhile is not).
    async fn insert_devices(&mut self, devices: &[NewDevice<'_>]) -> Result<HashSet<String>>;
    /// Inserts bindings, or writes over quarantine rows released at `reuse_before`
    /// or earlier; returns the address keys written.
    async fn upsert_bindings(&mut self, bindings: &[NewBinding<'_>], reuse_before: i64) -> Result<HashSet<Vec<u8>>>;
    async fn delete_device(&mut self, id: &str) -> Result<()>;
    /// Adds each range's delta to its `used_ips`.
    async fn add_used_ips(&mut self, deltas: &BTreeMap<String, i64>) -> Result<()>;
    /// Sets `last_seen` of these devices.
    async fn touch_devices(&mut self, ids: &[String], now: i64) -> Result<()>;
    /// Writes the audit rows of the batch's enrollments (multi-row inserts).
    async fn insert_audit(&mut self, rows: &[EnrollAudit]) -> Result<()>;
    /// Opens the history intervals of the bindings the batch wrote (multi-row inserts).
    async fn insert_history(&mut self, rows: &[HistoryOpen]) -> Result<()>;
    async fn commit(self) -> Result<()>;
}

/// The columns of a device insert, and its conflict clause.
pub(crate) const DEVICE_INSERT: &str = "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, \
     enrollment_key_id, city, state, country, latitude, longitude, created_at, last_seen) VALUES {rows} ON CONFLICT DO NOTHING RETURNING id";
/// The columns of a binding upsert; `{reuse}` is the parameter of the quarantine limit.
pub(crate) const BINDING_UPSERT: &str = "INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated) VALUES {rows} \
     ON CONFLICT (ip_key) DO UPDATE SET ip = excluded.ip, range_id = excluded.range_id, device_id = excluded.device_id, \
     username = excluded.username, platform = excluded.platform, client_hostname = excluded.client_hostname, \
     last_updated = excluded.last_updated, released_at = NULL \
     WHERE bindings.device_id IS NULL AND bindings.released_at <= {reuse} RETURNING ip_key";
pub(crate) const KEYS_SELECT: &str =
    "SELECT id, key_hash, username, reusable, expires_at, used_count, revoked, hostname_pattern FROM enrollment_keys WHERE key_hash IN ({list})";
pub(crate) const DEVICES_SELECT: &str = "SELECT d.id, d.hostname_key, d.username, d.public_key_fingerprint, b.ip, b.range_id, r.name AS range_name \
     FROM devices d LEFT JOIN bindings b ON b.device_id = d.id LEFT JOIN ip_ranges r ON r.id = b.range_id WHERE d.hostname_key IN ({list})";
/// One single-use key taken (SQLite: a statement in process costs no round trip,
/// and one prepared statement beats an IN-list whose shape changes with its length).
pub(crate) const KEY_TAKE: &str = "UPDATE enrollment_keys SET used_count = used_count + 1 WHERE id = $1 AND revoked = FALSE AND used_count = 0";
/// A batch's single-use keys taken in one statement (PostgreSQL: one round trip).
pub(crate) const KEYS_TAKE: &str =
    "UPDATE enrollment_keys SET used_count = used_count + 1 WHERE id IN ({list}) AND revoked = FALSE AND used_count = 0 RETURNING id";
pub(crate) const KEY_GIVE_BACK: &str = "UPDATE enrollment_keys SET used_count = used_count - 1 WHERE id = $1 AND used_count > 0";
pub(crate) const KEY_USES: &str = "UPDATE enrollment_keys SET used_count = used_count + $2 WHERE id = $1";
pub(crate) const DEVICE_DELETE: &str = "DELETE FROM devices WHERE id = $1";
pub(crate) const USED_IPS_UPDATE: &str =
    "WITH delta (id, amount) AS (VALUES {rows}) UPDATE ip_ranges SET used_ips = used_ips + delta.amount FROM delta WHERE ip_ranges.id = delta.id";
pub(crate) const DEVICES_TOUCH: &str = "UPDATE devices SET last_seen = {now} WHERE id IN ({list})";
/// The audit rows of enrollments (action `enroll` on a `device`).
pub(crate) const AUDIT_INSERT: &str = "INSERT INTO audit_log (id, at, actor, action, resource_type, resource_id, after_json, source_ip) VALUES {rows}";
/// The columns of [`AUDIT_INSERT`] that each row binds.
pub(crate) const AUDIT_COLUMNS: usize = 8;

/// Rows per multi-row statement.
pub(crate) const INSERT_CHUNK: usize = 500;

impl Store {
    /// Authenticates and writes a batch of enrollments in one transaction. The engine
    /// must be the caller's exclusive copy for the duration; on failure every address
    /// it handed out for the batch is given back.
    pub async fn enroll_batch(&self, jobs: &[EnrollJob], engine: &mut Engine, quarantine_micros: i64) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>> {
        let mut planned: Vec<Allocation> = Vec::new();
        let result = match &self.enroll_connection {
            Some(connection) => {
                let _gate = self.write_gate.lock().await;
                match crate::enroll_sqlite::SqliteWrites::begin(connection) {
                    Ok(writes) => enroll_in(writes, jobs, engine, quarantine_micros, &mut planned).await,
                    Err(error) => Err(error),
                }
            }
            None => match self.write().await {
                Ok(tx) => enroll_in(SqlxWrites { tx }, jobs, engine, quarantine_micros, &mut planned).await,
                Err(error) => Err(error),
            },
        };
        if result.is_err() {
            for allocation in &planned {
                engine.unreserve(allocation);
            }
        }
        result
    }
}

/// An address planned for the job at this index of the batch.
type Proposal = (usize, Allocation);

/// The batch in one transaction: authenticate, decide, write, count.
async fn enroll_in<W: EnrollWrites>(
    mut writes: W,
    jobs: &[EnrollJob],
    engine: &mut Engine,
    quarantine_micros: i64,
    planned: &mut Vec<Allocation>,
) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>> {
    let now = now_micros();

    // 1. the keys of the batch
    let hashes: Vec<&[u8]> = jobs.iter().map(|job| job.key_hash.as_slice()).collect::<HashSet<_>>().into_iter().collect();
    let mut keys: HashMap<Vec<u8>, KeyInfo> = HashMap::new();
    for key in writes.keys(&hashes).await? {
        keys.insert(
            key.key_hash,
            KeyInfo {
                id: key.id,
                username: key.username,
                reusable: key.reusable,
                usable_now: !key.revoked && key.expires_at.is_none_or(|at| at > now),
                spent: key.used_count > 0,
                hostname_pattern: key.hostname_pattern,
            },
        );
    }

    // 2. the devices that hold these hostnames today
    let hostnames: Vec<&str> = jobs.iter().map(|job| job.hostname.as_str()).collect::<HashSet<_>>().into_iter().collect();
    let mut devices: HashMap<String, KnownDevice> = HashMap::new();
    for device in writes.devices(&hostnames).await? {
        devices.insert(device.hostname_key, KnownDevice { id: device.id, username: device.username, fingerprint: device.fingerprint, binding: device.binding });
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
            // refused before the key is taken: a single-use key stays unused
            Some(KeyInfo { hostname_pattern: Some(pattern), .. }) if !crate::hostname_allowed(Some(pattern), &job.hostname) => {
                Plan::Done(Err(EnrollFailure::HostnameNotAllowed { pattern: pattern.clone() }))
            }
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

    // 4. single-use keys, all at once and in id order (a key appears once: a
    //    second job with the same single-use key was refused above)
    let single_use: Vec<(usize, &str)> = plans
        .iter()
        .enumerate()
        .filter_map(|(index, plan)| match plan {
            Plan::Bind { new_device: true, reusable: false, key_id, .. } => Some((index, key_id.as_str())),
            _ => None,
        })
        .collect();
    if !single_use.is_empty() {
        let mut ids: Vec<&str> = single_use.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable();
        let taken = writes.take_keys(&ids).await?;
        let spent: Vec<usize> = single_use.iter().filter(|(_, id)| !taken.contains(*id)).map(|(index, _)| *index).collect();
        for index in spent {
            plans[index] = Plan::Done(Err(EnrollFailure::KeySpent));
        }
    }

    // 5. new devices; a hostname another replica took meanwhile is refused
    let new_devices: Vec<usize> =
        plans.iter().enumerate().filter(|(_, plan)| matches!(plan, Plan::Bind { new_device: true, .. })).map(|(index, _)| index).collect();
    let rows: Vec<NewDevice<'_>> = new_devices
        .iter()
        .filter_map(|&index| match &plans[index] {
            Plan::Bind { device_id, username, key_id, .. } => Some(NewDevice {
                id: device_id,
                hostname: &jobs[index].hostname,
                username,
                platform: &jobs[index].platform,
                fingerprint: &jobs[index].public_key_fingerprint,
                certificate_serial: &jobs[index].certificate_serial,
                key_id,
                location: jobs[index].location.as_ref(),
                now,
            }),
            Plan::Done(_) => None,
        })
        .collect();
    let inserted = if rows.is_empty() { HashSet::new() } else { writes.insert_devices(&rows).await? };
    drop(rows);
    for &index in &new_devices {
        let Plan::Bind { device_id, key_id, reusable, .. } = &plans[index] else { continue };
        if !inserted.contains(device_id) {
            if !reusable {
                writes.give_back_key(key_id).await?;
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
    let mut proposals: Vec<Proposal> = Vec::new();
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
    let (fresh, from_quarantine): (Vec<&Proposal>, Vec<&Proposal>) = proposals.iter().partition(|(_, allocation)| allocation.quarantined_since.is_none());
    for (group, reuse) in [(fresh, reuse_before), (from_quarantine, i64::MAX)] {
        let rows: Vec<NewBinding<'_>> = group.iter().filter_map(|(index, allocation)| new_binding(jobs, &plans, *index, allocation, now)).collect();
        if !rows.is_empty() {
            written.extend(writes.upsert_bindings(&rows, reuse).await?);
        }
    }
    let mut range_deltas: BTreeMap<String, i64> = BTreeMap::new();
    // every binding written here, and only those, opens a history interval
    let mut opened: Vec<HistoryOpen> = Vec::new();
    for (index, allocation) in proposals {
        let mut bound = written.contains(address_key(allocation.family, allocation.value).as_slice()).then_some(allocation.clone());
        if bound.is_none() {
            tracing::debug!(address = %join_address(allocation.family, allocation.value), "address taken elsewhere, trying others");
            planned.retain(|planned| planned != &allocation);
            bound = bind_one(&mut writes, engine, jobs, &plans, index, now, reuse_before, planned).await?;
        }
        outcomes[index] = Some(match bound {
            Some(allocation) => {
                let Plan::Bind { device_id, username, new_device, .. } = &plans[index] else { continue };
                *range_deltas.entry(allocation.range_id.clone()).or_default() += 1;
                let outcome = EnrollOutcome {
                    created: *new_device,
                    device_id: device_id.clone(),
                    username: username.clone(),
                    virtual_ip: join_address(allocation.family, allocation.value).to_string(),
                    range_name: engine.range(&allocation.range_id).map(|spec| spec.name.clone()).unwrap_or_default(),
                    range_id: allocation.range_id.clone(),
                };
                opened.push(history_open(&jobs[index], &outcome, &allocation, now));
                Ok(outcome)
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
                writes.delete_device(device_id).await?;
                if !reusable {
                    writes.give_back_key(key_id).await?;
                }
            }
            _ => {}
        }
    }
    if !range_deltas.is_empty() {
        writes.add_used_ips(&range_deltas).await?;
    }
    for (key_id, uses) in &reusable_uses {
        writes.add_key_uses(key_id, *uses).await?;
    }
    seen_devices.sort();
    seen_devices.dedup();
    if !seen_devices.is_empty() {
        writes.touch_devices(&seen_devices, now).await?;
    }
    let audit = enrollment_audit(jobs, &keys, &outcomes, now);
    if !audit.is_empty() {
        writes.insert_audit(&audit).await?;
    }
    if !opened.is_empty() {
        // a build for the enrollment benchmark's baseline leaves the history out (never a product build)
        if !cfg!(feature = "bench-without-history") {
            writes.insert_history(&opened).await?;
        }
    }
    writes.commit().await?;
    Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or(Err(EnrollFailure::Exhausted))).collect())
}

/// An audit row for every enrollment the batch wrote or recognised, in the same
/// transaction (one multi-row insert): the key that enrolled the device is the actor.
fn enrollment_audit(
    jobs: &[EnrollJob],
    keys: &HashMap<Vec<u8>, KeyInfo>,
    outcomes: &[Option<Result<EnrollOutcome, EnrollFailure>>],
    now: i64,
) -> Vec<EnrollAudit> {
    jobs.iter()
        .zip(outcomes)
        .filter_map(|(job, outcome)| {
            let Some(Ok(outcome)) = outcome else { return None };
            let key = keys.get(&job.key_hash)?;
            let after = serde_json::json!({
                "hostname": job.hostname,
                "username": outcome.username,
                "platform": job.platform,
                "virtual_ip": outcome.virtual_ip,
                "range_name": outcome.range_name,
                "new_device": outcome.created,
            });
            Some(EnrollAudit {
                id: crate::new_id(),
                actor: format!("enrollment_key:{}", key.id),
                device_id: outcome.device_id.clone(),
                after: after.to_string(),
                source_ip: job.source_ip.clone(),
                now,
            })
        })
        .collect()
}

/// The history interval a written binding opens: why it began — a new device, a
/// known one bound again, or an address taken out of quarantine early.
fn history_open(job: &EnrollJob, outcome: &EnrollOutcome, allocation: &Allocation, now: i64) -> HistoryOpen {
    let bound_reason = match (allocation.quarantined_since.is_some(), outcome.created) {
        (true, _) => BindReason::QuarantineReuse,
        (false, true) => BindReason::Enrolled,
        (false, false) => BindReason::Rebound,
    };
    HistoryOpen {
        ip_key: address_key(allocation.family, allocation.value).to_vec(),
        ip: outcome.virtual_ip.clone(),
        device_id: outcome.device_id.clone(),
        username: outcome.username.clone(),
        client_hostname: job.hostname.clone(),
        platform: job.platform.clone(),
        range_id: outcome.range_id.clone(),
        range_name: outcome.range_name.clone(),
        bound_at: now,
        bound_reason,
    }
}

/// The binding row of a planned job.
fn new_binding<'a>(jobs: &'a [EnrollJob], plans: &'a [Plan], index: usize, allocation: &'a Allocation, now: i64) -> Option<NewBinding<'a>> {
    let Plan::Bind { device_id, username, .. } = &plans[index] else { return None };
    Some(NewBinding {
        ip_key: address_key(allocation.family, allocation.value).to_vec(),
        ip: join_address(allocation.family, allocation.value).to_string(),
        range_id: &allocation.range_id,
        device_id,
        username,
        platform: &jobs[index].platform,
        hostname: &jobs[index].hostname,
        now,
    })
}

/// Binds one job's device to the next address the database accepts.
#[allow(clippy::too_many_arguments)]
async fn bind_one<W: EnrollWrites>(
    writes: &mut W,
    engine: &mut Engine,
    jobs: &[EnrollJob],
    plans: &[Plan],
    index: usize,
    now: i64,
    reuse_before: i64,
    planned: &mut Vec<Allocation>,
) -> Result<Option<Allocation>> {
    let place = Place::new(jobs[index].location.as_ref());
    for _ in 0..MAX_ADDRESS_TRIES {
        let Ok(allocation) = engine.plan(&place, now) else { return Ok(None) };
        let reuse = if allocation.quarantined_since.is_some() { i64::MAX } else { reuse_before };
        let Some(row) = new_binding(jobs, plans, index, &allocation, now) else { return Ok(None) };
        let written = writes.upsert_bindings(std::slice::from_ref(&row), reuse).await?;
        if written.contains(&row.ip_key) {
            planned.push(allocation.clone());
            return Ok(Some(allocation));
        }
    }
    Ok(None)
}

/// Parameters for a multi-row statement: `$N` on PostgreSQL, anonymous `?` on SQLite
/// (bound in order of appearance). SQLite keeps named and numbered parameters in a
/// list searched linearly, and sqlx asks for every parameter's name: quadratic in a
/// statement with thousands of them.
pub(crate) fn placeholders(mark: char, rows: usize, columns: usize, first: usize) -> String {
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
pub(crate) fn parameter_list(mark: char, count: usize, first: usize) -> String {
    (first..first + count).map(|index| if mark == '?' { "?".to_string() } else { format!("${index}") }).collect::<Vec<_>>().join(", ")
}

/// The statements through sqlx, on PostgreSQL (`$N` parameters).
struct SqlxWrites<'a> {
    tx: WriteTx<'a>,
}

/// PostgreSQL's parameter mark (`$N`).
const PG_MARK: char = '$';

impl EnrollWrites for SqlxWrites<'_> {
    async fn keys(&mut self, hashes: &[&[u8]]) -> Result<Vec<KeyRecord>> {
        let sql = KEYS_SELECT.replace("{list}", &parameter_list(PG_MARK, hashes.len(), 1));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for hash in hashes {
            query = query.bind(*hash);
        }
        let mut keys = Vec::new();
        for row in query.fetch_all(&mut *self.tx.transaction).await? {
            keys.push(KeyRecord {
                id: row.try_get("id")?,
                key_hash: row.try_get("key_hash")?,
                username: row.try_get("username")?,
                reusable: crate::get_bool(&row, "reusable")?,
                expires_at: row.try_get("expires_at")?,
                used_count: row.try_get("used_count")?,
                revoked: crate::get_bool(&row, "revoked")?,
                hostname_pattern: row.try_get("hostname_pattern")?,
            });
        }
        Ok(keys)
    }

    async fn devices(&mut self, hostnames: &[&str]) -> Result<Vec<DeviceRecord>> {
        let sql = DEVICES_SELECT.replace("{list}", &parameter_list(PG_MARK, hostnames.len(), 1));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for hostname in hostnames {
            query = query.bind(*hostname);
        }
        let mut devices = Vec::new();
        for row in query.fetch_all(&mut *self.tx.transaction).await? {
            let ip: Option<String> = row.try_get("ip")?;
            let binding = match ip {
                Some(ip) => Some((ip, row.try_get::<String, _>("range_id")?, row.try_get::<String, _>("range_name")?)),
                None => None,
            };
            devices.push(DeviceRecord {
                id: row.try_get("id")?,
                hostname_key: row.try_get("hostname_key")?,
                username: row.try_get("username")?,
                fingerprint: row.try_get("public_key_fingerprint")?,
                binding,
            });
        }
        Ok(devices)
    }

    async fn take_keys(&mut self, key_ids: &[&str]) -> Result<HashSet<String>> {
        let mut taken = HashSet::new();
        for chunk in key_ids.chunks(INSERT_CHUNK) {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(KEYS_TAKE.replace("{list}", &parameter_list(PG_MARK, chunk.len(), 1))));
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&mut *self.tx.transaction).await? {
                taken.insert(row.try_get(0)?);
            }
        }
        Ok(taken)
    }

    async fn give_back_key(&mut self, key_id: &str) -> Result<()> {
        sqlx::query(KEY_GIVE_BACK).bind(key_id).execute(&mut *self.tx.transaction).await?;
        Ok(())
    }

    async fn add_key_uses(&mut self, key_id: &str, uses: i64) -> Result<()> {
        sqlx::query(KEY_USES).bind(key_id).bind(uses).execute(&mut *self.tx.transaction).await?;
        Ok(())
    }

    async fn insert_devices(&mut self, devices: &[NewDevice<'_>]) -> Result<HashSet<String>> {
        let mut inserted = HashSet::new();
        for chunk in devices.chunks(INSERT_CHUNK) {
            let sql = DEVICE_INSERT.replace("{rows}", &placeholders(PG_MARK, chunk.len(), 15, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for device in chunk {
                let location = device.location.cloned().unwrap_or_default();
                query = query
                    .bind(device.id)
                    .bind(device.hostname)
                    .bind(device.hostname)
                    .bind(device.username)
                    .bind(device.platform)
                    .bind(device.fingerprint)
                    .bind(device.certificate_serial)
                    .bind(device.key_id)
                    .bind(location.city)
                    .bind(location.state)
                    .bind(location.country)
                    .bind(location.latitude)
                    .bind(location.longitude)
                    .bind(device.now)
                    .bind(device.now);
            }
            for row in query.fetch_all(&mut *self.tx.transaction).await? {
                inserted.insert(row.try_get(0)?);
            }
        }
        Ok(inserted)
    }

    async fn upsert_bindings(&mut self, bindings: &[NewBinding<'_>], reuse_before: i64) -> Result<HashSet<Vec<u8>>> {
        let mut written = HashSet::new();
        for chunk in bindings.chunks(INSERT_CHUNK) {
            // the quarantine limit is $1
            let sql = BINDING_UPSERT.replace("{rows}", &placeholders(PG_MARK, chunk.len(), 8, 2)).replace("{reuse}", "$1");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(reuse_before);
            for binding in chunk {
                query = query
                    .bind(binding.ip_key.as_slice())
                    .bind(binding.ip.as_str())
                    .bind(binding.range_id)
                    .bind(binding.device_id)
                    .bind(binding.username)
                    .bind(binding.platform)
                    .bind(binding.hostname)
                    .bind(binding.now);
            }
            for row in query.fetch_all(&mut *self.tx.transaction).await? {
                written.insert(row.try_get(0)?);
            }
        }
        Ok(written)
    }

    async fn delete_device(&mut self, id: &str) -> Result<()> {
        sqlx::query(DEVICE_DELETE).bind(id).execute(&mut *self.tx.transaction).await?;
        Ok(())
    }

    /// First locks the rows in id order, so concurrent batches on other replicas
    /// wait for each other instead of deadlocking.
    async fn add_used_ips(&mut self, deltas: &BTreeMap<String, i64>) -> Result<()> {
        let ids: Vec<&String> = deltas.keys().collect();
        for chunk in ids.chunks(INSERT_CHUNK) {
            let sql = format!("SELECT id FROM ip_ranges WHERE id IN ({}) ORDER BY id FOR UPDATE", parameter_list(PG_MARK, chunk.len(), 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str());
            }
            query.fetch_all(&mut *self.tx.transaction).await?;
            let sql = USED_IPS_UPDATE.replace("{rows}", &placeholders(PG_MARK, chunk.len(), 2, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str()).bind(deltas[*id]);
            }
            query.execute(&mut *self.tx.transaction).await?;
        }
        Ok(())
    }

    async fn touch_devices(&mut self, ids: &[String], now: i64) -> Result<()> {
        for chunk in ids.chunks(INSERT_CHUNK) {
            let sql = DEVICES_TOUCH.replace("{now}", "$1").replace("{list}", &parameter_list(PG_MARK, chunk.len(), 2));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            query.execute(&mut *self.tx.transaction).await?;
        }
        Ok(())
    }

    async fn insert_audit(&mut self, rows: &[EnrollAudit]) -> Result<()> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            let sql = AUDIT_INSERT.replace("{rows}", &placeholders(PG_MARK, chunk.len(), AUDIT_COLUMNS, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in chunk {
                query = query
                    .bind(row.id.as_str())
                    .bind(row.now)
                    .bind(row.actor.as_str())
                    .bind("enroll")
                    .bind("device")
                    .bind(row.device_id.as_str())
                    .bind(row.after.as_str())
                    .bind(row.source_ip.as_deref());
            }
            query.execute(&mut *self.tx.transaction).await?;
        }
        Ok(())
    }

    async fn insert_history(&mut self, rows: &[HistoryOpen]) -> Result<()> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            let sql = HISTORY_INSERT.replace("{rows}", &placeholders(PG_MARK, chunk.len(), HISTORY_COLUMNS, 1));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in chunk {
                query = query
                    .bind(row.ip_key.as_slice())
                    .bind(row.ip.as_str())
                    .bind(row.device_id.as_str())
                    .bind(row.username.as_str())
                    .bind(row.client_hostname.as_str())
                    .bind(row.platform.as_str())
                    .bind(row.range_id.as_str())
                    .bind(row.range_name.as_str())
                    .bind(row.bound_at)
                    .bind(row.bound_reason.as_str());
            }
            query.execute(&mut *self.tx.transaction).await?;
        }
        Ok(())
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await
    }
}
