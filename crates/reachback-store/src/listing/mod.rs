//! The bindings listing served from memory (issue 23): the I/O shell around
//! [`index::ListingIndex`]. It loads every bound address once, then follows the
//! `binding_changes` feed (migration 19: triggers write one row per changed binding
//! in the transaction that changes it) so the index equals the committed rows before
//! any listing reads it:
//!
//! * SQLite (one writer at a time): changes after a cursor, in `seq` order.
//! * PostgreSQL (sequence values are taken before commit, so `seq` order is not
//!   commit order): every change of a transaction that was still running at the last
//!   read (`xid` at or above that read's snapshot xmin) is read again, and the ones
//!   applied already are skipped by `seq`.
//!
//! Applying a change reads the binding's current row by its key (present and bound:
//! upsert; otherwise: remove), so applying one twice, or late, is harmless. Each
//! listing catches up first (one indexed read when nothing changed), and a background
//! task catches up every second and prunes changes older than an hour (10,000 every
//! five seconds at most). An index that fell behind the pruning, or that finds too
//! many changes at once, reloads.
//!
//! Until the first load ends (seconds at a million bindings), listings take the SQL
//! path in `bindings.rs`, which gives the same answers more slowly.

pub mod index;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::Row;

use crate::{Backend, Result, Store, StoreError, now_micros};
pub use index::{Fold, IndexedRow, Key, ListingIndex, Order, Selection};

/// Changes read in one catch-up before a reload is cheaper than applying them.
const RELOAD_AFTER_CHANGES: usize = 200_000;
/// Changes deleted per pruning round (one every five seconds).
const PRUNE_BATCH: i64 = 10_000;
/// A scan slower than this is logged (at DEBUG) with where its time went.
const SLOW_SCAN: std::time::Duration = std::time::Duration::from_millis(30);
/// Changes kept in the feed (µs).
const CHANGES_KEPT: i64 = 3_600_000_000;

/// Where the feed stands.
#[derive(Default)]
struct Cursor {
    /// SQLite: the last `seq` applied
    seq: i64,
    /// PostgreSQL: the snapshot xmin of the last read
    horizon: i64,
    /// PostgreSQL: changes applied whose transaction may have been running (seq → xid)
    applied: HashMap<i64, i64>,
}

/// The index and its position in the feed. One per store (shared by its clones).
pub struct Feed {
    index: Arc<RwLock<Option<ListingIndex>>>,
    /// held while catching up: one reader of the feed at a time
    cursor: tokio::sync::Mutex<Option<Cursor>>,
    /// one scan per core at a time: a flood of listings queues here instead of
    /// starting a blocking thread each (the runtime would start hundreds)
    scans: Arc<tokio::sync::Semaphore>,
    /// off: listings take the SQL path (tests of that path)
    disabled: std::sync::atomic::AtomicBool,
    /// scans running now, and the most seen at once (what the semaphore bounds)
    running: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for Feed {
    fn default() -> Feed {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Feed {
            index: Arc::default(),
            cursor: tokio::sync::Mutex::new(None),
            scans: Arc::new(tokio::sync::Semaphore::new(cores)),
            disabled: std::sync::atomic::AtomicBool::new(false),
            running: Arc::default(),
            peak: Arc::default(),
        }
    }
}

/// What a catch-up did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    pub changes: usize,
    pub reloaded: bool,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Internal("the listing index lock is poisoned".into())
}

fn key_of(bytes: &[u8]) -> Option<Key> {
    bytes.try_into().ok()
}

impl Store {
    fn fold(&self) -> Fold {
        match self.backend {
            Backend::Sqlite => Fold::Ascii,
            Backend::Postgres => Fold::Unicode,
        }
    }

    /// Whether listings are served from the in-memory index (it has loaded).
    pub fn listing_index_ready(&self) -> bool {
        !self.listing.disabled.load(std::sync::atomic::Ordering::Relaxed) && self.listing.index.read().map(|index| index.is_some()).unwrap_or(false)
    }

    /// The most index scans that ran at once since the store opened (at most one per core).
    pub fn listing_scan_peak(&self) -> usize {
        self.listing.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves listings from SQL (`false`) or from the index once loaded (`true`, the
    /// default): tests of the SQL path, which serves while the index loads.
    pub fn use_listing_index(&self, enabled: bool) {
        self.listing.disabled.store(!enabled, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many bindings the index holds (`None` until it has loaded).
    pub fn listing_index_rows(&self) -> Option<usize> {
        self.listing.index.read().ok().and_then(|index| index.as_ref().map(ListingIndex::len))
    }

    /// Loads the index, then keeps it current until the store's pool closes: a
    /// catch-up every second, the feed pruned every five seconds (in batches of 10,000).
    /// Errors are logged and retried.
    pub async fn keep_listing_index(&self) {
        // a knob for benchmarks (docs/benchmarks.md): the SQL paths only, no index in memory
        if std::env::var("REACHBACK_LISTING_INDEX").is_ok_and(|value| value == "off") {
            tracing::info!("listing index off (REACHBACK_LISTING_INDEX=off): listings take the SQL paths");
            return;
        }
        let mut round: u64 = 0;
        loop {
            if self.pool.is_closed() {
                return;
            }
            match self.catch_up_listing().await {
                Ok(done) if done.reloaded || done.changes > 0 => tracing::debug!(changes = done.changes, reloaded = done.reloaded, "listing index caught up"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "listing index: catching up failed; retrying"),
            }
            if round % 5 == 4
                && let Err(error) = self.prune_binding_changes(now_micros() - CHANGES_KEPT).await
            {
                tracing::warn!(%error, "listing index: pruning the change feed failed");
            }
            round += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Brings the index up to the committed rows (loading it the first time).
    pub async fn catch_up_listing(&self) -> Result<CatchUp> {
        let mut cursor = self.listing.cursor.lock().await;
        let Some(position) = cursor.as_mut() else {
            let (index, position) = self.load_listing().await?;
            self.replace_index(move |slot| *slot = Some(index)).await?;
            *cursor = Some(position);
            return Ok(CatchUp { changes: 0, reloaded: true });
        };
        let changes = match self.read_changes(position).await? {
            Some(changes) => changes,
            None => {
                tracing::info!("listing index: behind the change feed's pruning or too many changes; reloading");
                let (index, position) = self.load_listing().await?;
                self.replace_index(move |slot| *slot = Some(index)).await?;
                *cursor = Some(position);
                return Ok(CatchUp { changes: 0, reloaded: true });
            }
        };
        let count = changes.len();
        if count > 0 {
            // on a blocking thread: the write lock waits for the scans in progress
            self.replace_index(move |slot| {
                if let Some(index) = slot.as_mut() {
                    for (key, row) in changes {
                        match row {
                            Some(row) => index.upsert(row),
                            None => index.remove(&key),
                        }
                    }
                }
            })
            .await?;
        }
        Ok(CatchUp { changes: count, reloaded: false })
    }

    /// The keys changed since `position` (which advances), each with its current row
    /// when it is bound, in feed order (one query: the changes joined with their rows);
    /// `None` when the index must reload (the feed was pruned past it, or too many changed).
    async fn read_changes(&self, position: &mut Cursor) -> Result<Option<Vec<(Key, Option<IndexedRow>)>>> {
        const CURRENT: &str = "SELECT c.ip_key, b.range_id, b.device_id, b.username, b.platform, b.client_hostname, b.last_updated, c.seq, {xid} \
             FROM binding_changes c LEFT JOIN bindings b ON b.ip_key = c.ip_key AND b.device_id IS NOT NULL WHERE {condition} ORDER BY c.seq LIMIT $2";
        let pruned = sqlx::query("SELECT through_seq, through_xid FROM binding_changes_pruned WHERE id = 1").fetch_one(&self.pool).await?;
        let (through_seq, through_xid): (i64, i64) = (pruned.try_get(0)?, pruned.try_get(1)?);
        let (rows, horizon) = match self.backend {
            Backend::Sqlite => {
                if through_seq > position.seq {
                    return Ok(None);
                }
                let sql = CURRENT.replace("{xid}", "0").replace("{condition}", "c.seq > $1");
                (sqlx::query(sqlx::AssertSqlSafe(sql)).bind(position.seq).bind(RELOAD_AFTER_CHANGES as i64 + 1).fetch_all(&self.pool).await?, 0)
            }
            Backend::Postgres => {
                if through_xid >= position.horizon {
                    return Ok(None);
                }
                // the horizon first: a transaction below it had ended before the read below began
                let horizon: i64 = sqlx::query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(&self.pool).await?.try_get(0)?;
                let sql = CURRENT.replace("{xid}", "c.xid").replace("{condition}", "c.xid >= $1");
                (sqlx::query(sqlx::AssertSqlSafe(sql)).bind(position.horizon).bind(RELOAD_AFTER_CHANGES as i64 + 1).fetch_all(&self.pool).await?, horizon)
            }
        };
        if rows.len() > RELOAD_AFTER_CHANGES {
            return Ok(None);
        }
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get(7)?;
            if self.backend == Backend::Postgres && position.applied.insert(seq, row.try_get(8)?).is_some() {
                continue;
            }
            position.seq = position.seq.max(seq);
            let Some(key) = key_of(&row.try_get::<Vec<u8>, _>(0)?) else {
                continue;
            };
            let current = match row.try_get::<Option<String>, _>(1)? {
                Some(range_id) => Some(IndexedRow {
                    key,
                    range_id,
                    device_id: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                    username: row.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    platform: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
                    client_hostname: row.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
                    last_updated: row.try_get(6)?,
                }),
                None => None,
            };
            changes.push((key, current));
        }
        if self.backend == Backend::Postgres {
            position.applied.retain(|_, xid| *xid >= horizon);
            position.horizon = horizon;
        }
        Ok(Some(changes))
    }

    /// Every bound address, and the feed position the load stands at.
    async fn load_listing(&self) -> Result<(ListingIndex, Cursor)> {
        let started = std::time::Instant::now();
        let mut connection = self.pool.acquire().await?;
        let mut position = Cursor::default();
        // SQLite: the cursor and the rows from one snapshot (a read transaction); PostgreSQL:
        // the horizon before the rows, so a transaction still open is read again later
        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
        match self.backend {
            Backend::Sqlite => {
                position.seq = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM binding_changes").fetch_one(&mut *transaction).await?.try_get(0)?;
                let through: i64 = sqlx::query("SELECT through_seq FROM binding_changes_pruned WHERE id = 1").fetch_one(&mut *transaction).await?.try_get(0)?;
                position.seq = position.seq.max(through);
            }
            Backend::Postgres => {
                position.horizon =
                    sqlx::query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(&mut *transaction).await?.try_get(0)?;
                transaction.commit().await?;
                transaction = sqlx::Connection::begin(&mut *connection).await?;
            }
        }
        let mut rows = Vec::new();
        {
            let mut stream =
                sqlx::query("SELECT ip_key, range_id, device_id, username, platform, client_hostname, last_updated FROM bindings WHERE device_id IS NOT NULL")
                    .fetch(&mut *transaction);
            while let Some(row) = stream.try_next().await? {
                if let Some(row) = indexed_row(&row)? {
                    rows.push(row);
                }
            }
        }
        transaction.commit().await?;
        let fold = self.fold();
        let count = rows.len();
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let index = tokio::task::spawn_blocking(move || {
            let index = ListingIndex::build(fold, rows);
            index.warm(cores);
            index
        })
        .await
        .map_err(|error| StoreError::Internal(format!("building the listing index: {error}")))?;
        tracing::info!(bindings = count, seconds = started.elapsed().as_secs_f64(), "listing index loaded");
        Ok((index, position))
    }

    /// Deletes changes older than `cutoff` (µs) and records how far the feed was pruned.
    pub async fn prune_binding_changes(&self, cutoff: i64) -> Result<u64> {
        let _gate = self.write_gate.lock().await;
        let mut transaction = self.writer.begin().await?;
        // the oldest `PRUNE_BATCH` at most: a million changes deleted at once held a core for
        // seconds (listings' p99 showed it)
        let oldest = format!(
            "(SELECT seq, {xid} AS xid FROM binding_changes WHERE at < $1 AND seq < (SELECT MAX(seq) FROM binding_changes) ORDER BY seq LIMIT {PRUNE_BATCH}) oldest",
            xid = if self.backend == Backend::Sqlite { "seq" } else { "xid" }
        );
        let last = format!("SELECT MAX(seq), MAX(xid) FROM {oldest}");
        let last = sqlx::query(sqlx::AssertSqlSafe(last));
        let row = last.bind(cutoff).fetch_one(&mut *transaction).await?;
        let (Some(seq), Some(xid)) = (row.try_get::<Option<i64>, _>(0)?, row.try_get::<Option<i64>, _>(1)?) else {
            return Ok(0);
        };
        // the newest change stays: SQLite numbers rows after the highest one left, and an
        // empty table would start again from 1, behind every index's cursor
        let deleted = sqlx::query("DELETE FROM binding_changes WHERE seq <= $1 AND at < $2 AND seq < (SELECT MAX(seq) FROM binding_changes)")
            .bind(seq)
            .bind(cutoff)
            .execute(&mut *transaction)
            .await?;
        let xid = if self.backend == Backend::Sqlite { 0 } else { xid };
        sqlx::query(
            "UPDATE binding_changes_pruned SET through_seq = CASE WHEN through_seq > $1 THEN through_seq ELSE $1 END, \
             through_xid = CASE WHEN through_xid > $2 THEN through_xid ELSE $2 END WHERE id = 1",
        )
        .bind(seq)
        .bind(xid)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(deleted.rows_affected())
    }

    /// Changes the index under its write lock, on a blocking thread.
    async fn replace_index(&self, change: impl FnOnce(&mut Option<ListingIndex>) + Send + 'static) -> Result<()> {
        let index = self.listing.index.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = index.write().map_err(poisoned)?;
            change(&mut guard);
            Ok(())
        })
        .await
        .map_err(|error| StoreError::Internal(format!("listing index task: {error}")))?
    }

    /// Runs `work` on the index (loaded) on a blocking thread; `None` before the first load.
    pub(crate) async fn with_listing_index<T: Send + 'static>(&self, work: impl FnOnce(&ListingIndex) -> T + Send + 'static) -> Result<Option<T>> {
        let index = self.listing.index.clone();
        let asked = std::time::Instant::now();
        let permit = self.listing.scans.clone().acquire_owned().await.map_err(|error| StoreError::Internal(error.to_string()))?;
        let permitted = asked.elapsed();
        let (running, peak) = (self.listing.running.clone(), self.listing.peak.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            use std::sync::atomic::Ordering::SeqCst;
            let started = asked.elapsed();
            peak.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
            let guard = index.read().map_err(poisoned);
            let locked = asked.elapsed();
            let answer = guard.map(|guard| guard.as_ref().map(work));
            running.fetch_sub(1, SeqCst);
            let done = asked.elapsed();
            if done > SLOW_SCAN {
                // where a slow scan's time went: waiting for a permit, for a blocking
                // thread, for the read lock, or in the scan itself
                tracing::debug!(
                    permit_ms = permitted.as_secs_f64() * 1e3,
                    thread_ms = (started - permitted).as_secs_f64() * 1e3,
                    lock_ms = (locked - started).as_secs_f64() * 1e3,
                    scan_ms = (done - locked).as_secs_f64() * 1e3,
                    "slow listing index scan"
                );
            }
            answer
        })
        .await
        .map_err(|error| StoreError::Internal(format!("listing index task: {error}")))?
    }
}

fn indexed_row(row: &sqlx::any::AnyRow) -> Result<Option<IndexedRow>> {
    let Some(key) = key_of(&row.try_get::<Vec<u8>, _>(0)?) else {
        return Ok(None);
    };
    Ok(Some(IndexedRow {
        key,
        range_id: row.try_get(1)?,
        device_id: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
        username: row.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
        platform: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
        client_hostname: row.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
        last_updated: row.try_get(6)?,
    }))
}
