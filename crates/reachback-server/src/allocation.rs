//! The allocation service: the one owner of the allocation engine and of every
//! store call that changes addresses (enrollment batches, range writes, releases).
//!
//! The engine is this process's in-memory view of the ranges and bindings the
//! store holds; enrollment batches plan from it. Every change is therefore the
//! same three steps under one hold of the engine's lock: lock, write in the
//! store's transaction, patch the engine with what committed. Taking the lock
//! before the write keeps a batch from planning between the commit and the patch
//! (an address released but still counted bound, a range deleted but still
//! offered); patching only after a commit keeps a refused write out of the
//! engine. Written once here, no caller can forget a step or take them in
//! another order, and no other module can reach the engine.

use std::collections::HashMap;

use reachback_ipam::{Engine, RangeSpec, parse_address};
use reachback_store::{
    AuditEntry, BindingRow, DeviceRow, EnrollFailure, EnrollJob, EnrollOutcome, RangeRow, RangeWrite, ReleaseReason, Store, StoreError, now_micros,
};
use tokio::sync::Mutex;

/// The allocation engine and the store calls that change addresses.
pub struct AllocationService {
    store: Store,
    guarded: Mutex<Guarded>,
}

/// What the engine's lock guards.
struct Guarded {
    engine: Engine,
    /// ranges as the replica sync last loaded them (id → `updated_at`); only
    /// [`AllocationService::reload_ranges`] reads it
    synced: HashMap<String, i64>,
}

/// The engine's description of a stored range.
fn range_spec(row: &RangeRow) -> RangeSpec {
    RangeSpec { id: row.id.clone(), name: row.name.clone(), range: row.range, location: row.location.clone(), enabled: row.enabled }
}

impl AllocationService {
    /// Loads the engine from the store (at start): every range with its bound and
    /// quarantined addresses.
    pub async fn load(store: Store, quarantine_micros: i64) -> Result<AllocationService, StoreError> {
        let started = std::time::Instant::now();
        let snapshot = store.engine_snapshot().await?;
        let mut engine = Engine::new(quarantine_micros);
        let mut snapshot_bound = snapshot.bound;
        let mut snapshot_quarantined = snapshot.quarantined;
        for row in &snapshot.ranges {
            let bound = snapshot_bound.remove(&row.id).unwrap_or_default();
            let quarantined = snapshot_quarantined.remove(&row.id).unwrap_or_default();
            if let Err(error) = engine.load_range(range_spec(row), bound, quarantined) {
                tracing::error!(%error, range_id = %row.id, "stored range refused by the engine");
            }
        }
        tracing::info!(ranges = snapshot.ranges.len(), elapsed_ms = started.elapsed().as_millis() as u64, "allocation engine loaded");
        Ok(AllocationService { store, guarded: Mutex::new(Guarded { engine, synced: HashMap::new() }) })
    }

    /// Writes one batch of enrollments in one transaction (the enrollment writer's
    /// group commit). The store plans each address with the engine and gives every
    /// planned address back when the batch fails, so the lock is held throughout.
    pub async fn enroll_batch(&self, jobs: &[EnrollJob], quarantine_micros: i64) -> Result<Vec<Result<EnrollOutcome, EnrollFailure>>, StoreError> {
        let mut outcomes = {
            let mut guarded = self.guarded.lock().await;
            self.store.enroll_batch(jobs, &mut guarded.engine, quarantine_micros).await?
        };
        // with replicas, a range another replica just made reaches this engine by
        // notification some milliseconds later: before an enrollment is refused for
        // want of an address, the ranges are read again and it is tried once more
        // (a refused job wrote nothing; with one server the reload finds nothing new)
        let exhausted: Vec<usize> =
            outcomes.iter().enumerate().filter(|(_, outcome)| matches!(outcome, Err(EnrollFailure::Exhausted))).map(|(index, _)| index).collect();
        if exhausted.is_empty() {
            return Ok(outcomes);
        }
        self.reload_ranges().await;
        let retry: Vec<EnrollJob> = exhausted.iter().filter_map(|&index| jobs.get(index).cloned()).collect();
        let again = {
            let mut guarded = self.guarded.lock().await;
            self.store.enroll_batch(&retry, &mut guarded.engine, quarantine_micros).await
        };
        // the first batch is committed: a failing retry must not turn its enrollments
        // into errors (those devices exist and their keys are spent); the exhausted
        // ones keep their refusal
        let again = match again {
            Ok(again) => again,
            Err(error) => {
                tracing::warn!(%error, jobs = retry.len(), "retrying enrollments after reloading the ranges failed; they stay refused");
                return Ok(outcomes);
            }
        };
        for (index, outcome) in exhausted.into_iter().zip(again) {
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = outcome;
            }
        }
        Ok(outcomes)
    }

    /// Creates a range (overlap and name checks in the store's transaction, with
    /// `audit`); the engine offers it from then on.
    pub async fn create_range(&self, id: &str, write: &RangeWrite, audit: AuditEntry) -> Result<RangeRow, StoreError> {
        let mut guarded = self.guarded.lock().await;
        let row = self.store.create_range(id, write, audit).await?;
        if let Err(error) = guarded.engine.load_range(range_spec(&row), [], []) {
            tracing::error!(%error, range_id = %id, "engine refused a range the store accepted");
        }
        Ok(row)
    }

    /// Changes a range with `audit`; returns the row before and after. A new block
    /// reloads the range's addresses from the store (the edit forgot quarantined
    /// addresses outside it); otherwise only its name, location and status change.
    /// An error reading the addresses after the commit is returned as it is (the
    /// engine keeps the old block until the next edit or restart).
    pub async fn update_range(&self, id: &str, write: &RangeWrite, audit: impl FnOnce(&RangeRow) -> AuditEntry) -> Result<(RangeRow, RangeRow), StoreError> {
        let mut guarded = self.guarded.lock().await;
        let (before, after) = self.store.update_range(id, write, audit).await?;
        if before.range != after.range {
            let (bound, quarantined) = self.store.range_addresses(id).await?;
            if let Err(error) = guarded.engine.load_range(range_spec(&after), bound, quarantined) {
                tracing::error!(%error, range_id = %id, "engine refused an edited range the store accepted");
            }
        } else if let Err(error) = guarded.engine.update_range(id, &after.name, after.location.clone(), after.enabled) {
            tracing::error!(%error, range_id = %id, "engine does not know an edited range");
        }
        Ok((before, after))
    }

    /// Deletes a range with `audit` (given the row and the number of bindings
    /// released); with `force` its bindings are released, else a range in use is
    /// refused. Returns the deleted row and how many bindings were released.
    pub async fn delete_range(&self, id: &str, force: bool, audit: impl FnOnce(&RangeRow, i64) -> AuditEntry) -> Result<(RangeRow, i64), StoreError> {
        let mut guarded = self.guarded.lock().await;
        let deleted = self.store.delete_range(id, force, audit).await?;
        guarded.engine.remove_range(id);
        Ok(deleted)
    }

    /// Deletes a device with `audit`; its binding, if it has one, goes to quarantine
    /// (`reason` in the binding's history: an admin's delete or the device's leave).
    pub async fn delete_device(&self, id: &str, reason: ReleaseReason, audit: impl FnOnce(&DeviceRow) -> AuditEntry) -> Result<DeviceRow, StoreError> {
        let mut guarded = self.guarded.lock().await;
        let device = self.store.delete_device(id, reason, audit).await?;
        if let (Some(range_id), Some((_, value))) = (&device.range_id, device.virtual_ip.as_deref().and_then(parse_address)) {
            guarded.engine.release(range_id, value, now_micros());
        }
        Ok(device)
    }

    /// An admin releases the binding of an address (given by its key) with `audit`:
    /// the address goes to quarantine, its device keeps its enrollment.
    pub async fn release_binding(&self, ip_key: &[u8; 17], audit: impl FnOnce(&BindingRow) -> AuditEntry) -> Result<BindingRow, StoreError> {
        let mut guarded = self.guarded.lock().await;
        let row = self.store.release_binding(ip_key, audit).await?;
        if let Some((_, value)) = parse_address(&row.ip) {
            guarded.engine.release(&row.range_id, value, now_micros());
        }
        Ok(row)
    }

    /// Releases into quarantine the bindings of devices last seen before `cutoff`
    /// with no live session (one transaction, audited as `release_idle`); returns
    /// how many.
    pub async fn release_idle(&self, cutoff: i64) -> Result<usize, StoreError> {
        let mut guarded = self.guarded.lock().await;
        let released = self.store.release_idle(cutoff).await?;
        let released_at = now_micros();
        for (range_id, value) in &released {
            guarded.engine.release(range_id, *value, released_at);
        }
        Ok(released.len())
    }

    /// Picks up ranges other replicas created, changed or deleted (the replica sync).
    /// Addresses other replicas bound are found on insert (the primary key refuses
    /// them) and skipped, so only ranges are reloaded here. A range that cannot be
    /// read is tried again at the next round.
    pub async fn reload_ranges(&self) {
        // the list is read under the engine's lock: a range this replica creates or
        // deletes meanwhile (that write holds the lock too) cannot be taken for one
        // another replica removed or made
        let mut guarded = self.guarded.lock().await;
        let Guarded { engine, synced } = &mut *guarded;
        let Ok(ranges) = self.store.list_ranges().await else { return };
        for row in &ranges {
            if !synced.contains_key(&row.id) && engine.range(&row.id).is_some() {
                // loaded at start or made here: current
                synced.insert(row.id.clone(), row.updated_at);
                continue;
            }
            if (synced.get(&row.id) != Some(&row.updated_at) || engine.range(&row.id).is_none())
                && let Ok((bound, quarantined)) = self.store.range_addresses(&row.id).await
                && engine.load_range(range_spec(row), bound, quarantined).is_ok()
            {
                synced.insert(row.id.clone(), row.updated_at);
            }
        }
        let live: std::collections::HashSet<&str> = ranges.iter().map(|row| row.id.as_str()).collect();
        let gone: Vec<String> = engine.range_ids().filter(|id| !live.contains(id)).map(str::to_string).collect();
        for id in gone {
            engine.remove_range(&id);
            synced.remove(&id);
        }
    }

    /// How long a released address waits before the engine offers it while fresh
    /// ones are left (the setting changed here or on another replica).
    pub async fn set_quarantine_duration(&self, quarantine_micros: i64) {
        self.guarded.lock().await.engine.set_quarantine_duration(quarantine_micros);
    }

    /// Where the `offset`-th bound address (0-based) lies when the bound addresses
    /// of `range_ids` are taken range after range in that order, each from its top
    /// when `descending`: the index in `range_ids` and the address's value (`None`
    /// when the engine cannot name it), or `None` past the last one. One hold of the
    /// lock, so counts and address agree; exact where this process is the only
    /// writer (SQLite), as the engine then equals the committed rows.
    pub async fn nth_bound_across(&self, range_ids: &[&str], offset: u128, descending: bool) -> Option<(usize, Option<u128>)> {
        let guarded = self.guarded.lock().await;
        let (index, within) = position(range_ids.iter().map(|id| guarded.engine.used(id).unwrap_or(0)), offset)?;
        Some((index, guarded.engine.nth_bound(range_ids[index], within, descending)))
    }
}

/// The item of a sequence of counts in which the `offset`-th unit (0-based) falls,
/// and its offset within that item; `None` past the end.
pub fn position(counts: impl IntoIterator<Item = u128>, offset: u128) -> Option<(usize, u128)> {
    let mut remaining = offset;
    for (index, count) in counts.into_iter().enumerate() {
        if remaining < count {
            return Some((index, remaining));
        }
        remaining -= count;
    }
    None
}

#[cfg(test)]
mod tests {
    use reachback_ipam::AddressRange;

    use super::*;

    /// A store on a fresh SQLite file, removed when dropped.
    struct TempStore {
        store: Store,
        directory: std::path::PathBuf,
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.directory);
        }
    }

    async fn temp_store() -> TempStore {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let number = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let directory = std::env::temp_dir().join(format!("reachback_allocation_{}_{}_{number}", std::process::id(), now_micros()));
        std::fs::create_dir_all(&directory).expect("temporary directory");
        let url = format!("sqlite://{}?mode=rwc", directory.join("reachback.db").display());
        let store = Store::connect(&url).await.expect("store");
        TempStore { store, directory }
    }

    fn range_write(name: &str, range: &str) -> RangeWrite {
        RangeWrite { name: name.into(), description: String::new(), range: AddressRange::parse(range).expect("range"), location: None, enabled: true }
    }

    async fn engine_block(service: &AllocationService, id: &str) -> Option<String> {
        service.guarded.lock().await.engine.range(id).map(|spec| spec.range.to_string())
    }

    #[test]
    fn positions_count_across_items() {
        assert_eq!(position([2, 0, 3], 0), Some((0, 0)));
        assert_eq!(position([2, 0, 3], 1), Some((0, 1)));
        assert_eq!(position([2, 0, 3], 2), Some((2, 0)), "an empty item is passed over");
        assert_eq!(position([2, 0, 3], 4), Some((2, 2)));
        assert_eq!(position([2, 0, 3], 5), None);
        assert_eq!(position([], 0), None);
    }

    /// An enrollment at a replica that has not yet heard of the range another replica
    /// just made is not refused: the ranges are read again before "no free address".
    #[tokio::test]
    async fn an_enrollment_right_after_a_range_made_elsewhere_finds_it() {
        let temp = temp_store().await;
        let here = AllocationService::load(temp.store.clone(), 0).await.expect("load");
        let there = AllocationService::load(temp.store.clone(), 0).await.expect("load");
        let key = reachback_store::EnrollmentKeyRow {
            id: "k1".into(),
            username: "alice@corp.example".into(),
            description: String::new(),
            reusable: true,
            expires_at: None,
            used_count: 0,
            revoked: false,
            created_at: now_micros(),
            hostname_pattern: None,
        };
        temp.store.create_enrollment_key(&key, b"key-hash", AuditEntry::default()).await.expect("key");
        let job = |number: u8| EnrollJob {
            key_hash: b"key-hash".to_vec(),
            new_device_id: format!("device-{number}"),
            hostname: format!("laptop{number}.corp.example"),
            platform: "linux".into(),
            public_key_fingerprint: vec![number; 32],
            certificate_serial: format!("serial-{number}"),
            location: None,
            source_ip: None,
        };
        let outcomes = there.enroll_batch(&[job(1)], 0).await.expect("batch");
        assert!(matches!(outcomes[0], Err(EnrollFailure::Exhausted)), "no range anywhere yet: {outcomes:?}");
        here.create_range("r1", &range_write("Main", "100.64.0.0/24"), AuditEntry::default()).await.expect("create");
        let outcomes = there.enroll_batch(&[job(2)], 0).await.expect("batch");
        assert_eq!(outcomes[0].as_ref().map(|outcome| outcome.virtual_ip.as_str()), Ok("100.64.0.1"), "{outcomes:?}");
        assert_eq!(engine_block(&there, "r1").await.as_deref(), Some("100.64.0.0/24"), "and this engine has the range now");
    }

    /// Range writes patch the engine of the service that made them, and another
    /// service on the same database (another replica) picks each of them up at its
    /// next reload — a new range, a new block, a deletion.
    #[tokio::test]
    async fn range_writes_reach_this_engine_and_reloads_reach_the_others() {
        let temp = temp_store().await;
        let here = AllocationService::load(temp.store.clone(), 0).await.expect("load");
        let there = AllocationService::load(temp.store.clone(), 0).await.expect("load");

        here.create_range("r1", &range_write("Main", "100.64.0.0/24"), AuditEntry::default()).await.expect("create");
        assert_eq!(engine_block(&here, "r1").await.as_deref(), Some("100.64.0.0/24"));
        assert_eq!(engine_block(&there, "r1").await, None, "not reloaded yet");
        there.reload_ranges().await;
        assert_eq!(engine_block(&there, "r1").await.as_deref(), Some("100.64.0.0/24"));

        // `updated_at` is in microseconds: the edit must land on a later one
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        here.update_range("r1", &range_write("Main", "100.65.0.0/24"), |_| AuditEntry::default()).await.expect("update");
        assert_eq!(engine_block(&here, "r1").await.as_deref(), Some("100.65.0.0/24"));
        there.reload_ranges().await;
        assert_eq!(engine_block(&there, "r1").await.as_deref(), Some("100.65.0.0/24"));

        here.delete_range("r1", false, |_, _| AuditEntry::default()).await.expect("delete");
        assert_eq!(engine_block(&here, "r1").await, None);
        there.reload_ranges().await;
        assert_eq!(engine_block(&there, "r1").await, None);
    }

    /// A refused write leaves the engine as it was.
    #[tokio::test]
    async fn a_refused_range_write_changes_no_engine() {
        let temp = temp_store().await;
        let service = AllocationService::load(temp.store.clone(), 0).await.expect("load");
        service.create_range("r1", &range_write("Main", "100.64.0.0/24"), AuditEntry::default()).await.expect("create");
        let overlapping = service.create_range("r2", &range_write("Other", "100.64.0.128/25"), AuditEntry::default()).await;
        assert!(matches!(overlapping, Err(StoreError::Overlap { .. })), "{overlapping:?}");
        assert_eq!(engine_block(&service, "r2").await, None);
        let missing = service.delete_range("nope", true, |_, _| AuditEntry::default()).await;
        assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
        assert_eq!(engine_block(&service, "r1").await.as_deref(), Some("100.64.0.0/24"));
    }
}
