//! Persistence for Reachback: one storage interface over SQLite (default) and
//! PostgreSQL, the migrations, and the one place SQL lives.
//!
//! Both backends go through sqlx's `Any` driver with SQL written once; the few
//! differences (column types, locking) are switched on [`Backend`]. Invariants the
//! database enforces by itself: no address bound twice (primary key of `bindings`),
//! one binding per device, unique range names, hostnames and usernames
//! (case-folded key columns), used counters that never go negative.

mod admin;
mod audit;
mod bindings;
mod console;
mod dataplane;
mod devices;
mod enroll;
mod enroll_sqlite;
mod events;
mod flows;
mod history;
mod keys;
pub mod listing;
mod names;
mod ranges;
mod replicas;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

pub use admin::new_id;
pub use admin::{AdminRow, ApiKeyRow, Principal, SessionRow};
pub use audit::{AuditEntry, AuditQuery, AuditRow};
pub use bindings::{BindingQuery, BindingRow, BindingSort, EngineSnapshot};
pub use console::SavedFilterRow;
pub use dataplane::{ClientSessionRow, ConnectorRow, DocKind, DocRow, ProvisioningKey};
pub use devices::{DeviceQuery, DeviceRow, DeviceSort};
pub use enroll::{EnrollFailure, EnrollJob, EnrollOutcome};
pub use events::{OutboxEvent, SinkRow, SinkWrite};
pub use flows::{FLOW_PRUNE_BATCH_ROWS, FlowProtocol, FlowQuery, FlowRecord, FlowRow, FlowSort, FlowVerdict, flow_overlaps};
pub use history::{BindReason, HistoryQuery, HistoryRow, HistorySort, PRUNE_BATCH_ROWS, ReleaseReason, Trace, holds_at, overlaps_window};
pub use keys::{EnrollmentKeyRow, hostname_allowed};
pub use names::NameChange;
pub use ranges::{RangeRow, RangeWrite};
pub use replicas::{CHANGE_CHANNEL, Heartbeat, NodeLock, ReplicaRow};

/// What went wrong in the store. Conflicts are typed so the API can map them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// a row with this id does not exist
    #[error("not found")]
    NotFound,
    /// the new range overlaps an existing one
    #[error("range overlaps {name} ({range})")]
    Overlap { id: String, name: String, range: String },
    /// a unique name or key is taken
    #[error("{0} is already taken")]
    Duplicate(&'static str),
    /// the name looks like an existing one (same confusable skeleton): that one's name
    #[error("the name looks like the existing {0:?}")]
    Confusable(String),
    /// the range still has bindings
    #[error("range has {0} bindings")]
    RangeInUse(i64),
    /// a range edit would leave bound addresses outside the range
    #[error("{0} bound addresses would fall outside the new range")]
    BindingsOutside(i64),
    /// something else still refers to the row
    #[error("in use: {0}")]
    InUse(String),
    /// the change would leave no superadmin with a password or an API key
    #[error("no superadmin could sign in after this change")]
    LastWayIn,
    /// the database refused or failed
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite refused or failed (the enrollment writer's own connection)
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// stored data could not be read back
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// the database URL cannot serve as a store
    #[error("{0}")]
    Unsupported(String),
    /// a task of the store's own failed (the listing index's thread)
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether trying again later may succeed (pool exhausted, connection lost).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(error) => matches!(error, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)),
            StoreError::Sqlite(error) => {
                matches!(error.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
            }
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The store: a pool and, for SQLite, a gate that serialises writers.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    writer: AnyPool,
    /// PostgreSQL only: typed connections for streamed exports (rows decoded straight
    /// from the wire format, without the `Any` driver's per-value conversions)
    export_pool: Option<sqlx::PgPool>,
    /// PostgreSQL only: the URL's options, for the connections held apart from the
    /// pools (the change listener, the node-name lock)
    pg_options: Option<sqlx::postgres::PgConnectOptions>,
    backend: Backend,
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// SQLite only (a database file): the enrollment writer's own connection
    enroll_connection: Option<Arc<std::sync::Mutex<rusqlite::Connection>>>,
    export_chunk: Arc<std::sync::atomic::AtomicUsize>,
    /// the bindings listing's in-memory index and its place in the change feed
    listing: Arc<listing::Feed>,
}

/// Schema versions: one script for both backends (with placeholders for the types
/// they spell differently), or one per backend (SQLite, PostgreSQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql"), ""),
    (2, include_str!("../migrations/0002_dataplane.sql"), ""),
    (3, include_str!("../migrations/0003_console.sql"), ""),
    (4, include_str!("../migrations/0004_search_sqlite.sql"), include_str!("../migrations/0004_search_postgres.sql")),
    (5, include_str!("../migrations/0005_range_rows_by_address.sql"), ""),
    (6, include_str!("../migrations/0006_updated_index_bound_rows.sql"), ""),
    (7, include_str!("../migrations/0007_key_limits.sql"), ""),
    (8, include_str!("../migrations/0008_connector_key.sql"), ""),
    (9, include_str!("../migrations/0009_connector_dns.sql"), ""),
    (10, include_str!("../migrations/0010_name_skeletons.sql"), ""),
    (11, include_str!("../migrations/0011_binding_history_sqlite.sql"), include_str!("../migrations/0011_binding_history_postgres.sql")),
    (12, include_str!("../migrations/0012_flow_log_sqlite.sql"), include_str!("../migrations/0012_flow_log_postgres.sql")),
    (13, include_str!("../migrations/0013_events_sqlite.sql"), include_str!("../migrations/0013_events_postgres.sql")),
    (14, include_str!("../migrations/0014_replicas_sqlite.sql"), include_str!("../migrations/0014_replicas_postgres.sql")),
    (16, include_str!("../migrations/0016_session_address.sql"), ""),
    (17, include_str!("../migrations/0017_history_names_sqlite.sql"), include_str!("../migrations/0017_history_names_postgres.sql")),
    (18, include_str!("../migrations/0018_replica_flows.sql"), ""),
    (19, include_str!("../migrations/0019_binding_changes_sqlite.sql"), include_str!("../migrations/0019_binding_changes_postgres.sql")),
];

/// The rows of the range whose id is the parameter `$N` (`alias` is the bindings
/// table's alias, or empty): through the primary key, between the range's first
/// and last address keys (ranges do not overlap, and a range's rows lie inside
/// it), and of that range.
pub(crate) fn range_rows(alias: &str, parameter: &str) -> String {
    let column = |name: &str| if alias.is_empty() { name.to_string() } else { format!("{alias}.{name}") };
    format!(
        "{key} BETWEEN (SELECT first_key FROM ip_ranges WHERE id = {parameter}) AND (SELECT last_key FROM ip_ranges WHERE id = {parameter}) AND {range} = {parameter}",
        key = column("ip_key"),
        range = column("range_id")
    )
}

/// Each SQLite connection's page cache, the writer's included (8 MiB). A bigger
/// cache slows the writer down: SQLite scans all of it at every commit once a
/// B-tree page split has renumbered a page through the lock-byte page number
/// (`balance_nonroot` swaps page numbers through it, which raises the cache's
/// largest key past the end of the database, and `pager_end_transaction` then
/// truncates the cache by visiting every hash bucket). Enrollments split pages in
/// almost every batch: with 64 MiB that scan was ~9 % of the writer's SQLite time.
/// With 1,000,000 bindings, 8 MiB costs 71 µs of SQLite CPU per enrollment where
/// 64 MiB cost 80 (docs/benchmarks.md).
const CACHE_KIB: &str = "-8192";

/// WAL pages after which a committing SQLite connection checkpoints by itself: a
/// backstop for when the background checkpoint falls behind (256 MiB).
const WAL_BACKSTOP_PAGES: u32 = 65536;

/// Copies the SQLite write-ahead log into the database file every quarter second,
/// on a connection of the read pool: a passive checkpoint never waits for the
/// writer or readers, and the writer no longer stops in the middle of a commit to
/// copy pages and wait for `fsync`.
async fn checkpoint_in_background(pool: AnyPool) {
    repeat_until_closed(pool, Duration::from_millis(250), "background checkpoint", |pool| async move {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await?;
        Ok(())
    })
    .await
}

/// Runs `task` every `period` until the pool closes; a failure is logged and the
/// next round tried.
async fn repeat_until_closed<F, Fut>(pool: AnyPool, period: Duration, what: &'static str, task: F)
where
    F: Fn(AnyPool) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        interval.tick().await;
        if let Err(error) = task(pool.clone()).await
            && !pool.is_closed()
        {
            tracing::debug!(%error, task = what, "failed");
        }
    }
}

/// Connections PostgreSQL exports may hold at once (an export in address order
/// reads three ranges side by side).
const EXPORT_CONNECTIONS: u32 = 6;

/// Advisory lock key for range and migration changes on PostgreSQL.
const PG_LOCK_SCHEMA: i64 = 0x7265_6163_6862_0001;
const PG_LOCK_RANGES: i64 = 0x7265_6163_6862_0002;
/// Held by the replica that vacuums, so replicas take turns.
const PG_LOCK_VACUUM: i64 = 0x7265_6163_6862_0003;
/// Serialises changes that take a way of signing in away (API keys, passwords, admins).
const PG_LOCK_CREDENTIALS: i64 = 0x7265_6163_6862_0004;

/// The tables whose sort indexes serve listings, vacuumed by the server itself.
const VACUUMED_TABLES: [&str; 3] = ["bindings", "devices", "binding_history"];

/// Rows written since a table's last vacuum that make the server vacuum it.
const VACUUM_AFTER_ROWS: i64 = 10_000;

/// Keeps PostgreSQL's visibility map and planner statistics of the listed tables
/// fresh: every ten seconds, a table with `VACUUM_AFTER_ROWS` rows inserted,
/// updated or deleted since its last vacuum is vacuumed and analysed. Deep pages
/// of listings in a text order are found over a sort index alone (index-only
/// scans), and rows on pages not yet marked all-visible make PostgreSQL visit the
/// table for each of them: after a million enrollments, a page 10,000 deep took
/// 120–140 ms instead of 32 ms. Autovacuum would do the same, but it waits for a
/// fifth of a table to change (200,000 rows of a million) and may be off.
/// One replica at a time (advisory lock); ends when the pool closes.
async fn vacuum_in_background(pool: AnyPool) {
    repeat_until_closed(pool, Duration::from_secs(10), "background vacuum", |pool| async move {
        vacuum_if_due(&pool, VACUUM_AFTER_ROWS).await?;
        Ok(())
    })
    .await
}

/// Vacuums (and analyses) each listed table with at least `after_rows` rows changed
/// since its last vacuum; returns the tables vacuumed.
async fn vacuum_if_due(pool: &AnyPool, after_rows: i64) -> Result<Vec<String>> {
    let mut connection = pool.acquire().await?;
    let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1)").bind(PG_LOCK_VACUUM).fetch_one(&mut *connection).await?.try_get(0)?;
    if !locked {
        return Ok(Vec::new());
    }
    let result = async {
        let mut vacuumed = Vec::new();
        for table in VACUUMED_TABLES {
            let changed: Option<i64> = sqlx::query(
                "SELECT CAST(n_ins_since_vacuum + n_dead_tup AS BIGINT) FROM pg_stat_user_tables WHERE relname = $1 AND schemaname = current_schema()",
            )
            .bind(table)
            .fetch_optional(&mut *connection)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
            if changed.unwrap_or(0) >= after_rows {
                let started = std::time::Instant::now();
                connection.execute(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE, SKIP_LOCKED) {table}"))).await?;
                tracing::debug!(table, changed, seconds = started.elapsed().as_secs_f64(), "vacuumed");
                vacuumed.push(table.to_string());
            }
        }
        Ok(vacuumed)
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_LOCK_VACUUM).execute(&mut *connection).await?;
    result
}

/// The settings of every SQLite connection, sqlx's and the enrollment writer's.
pub(crate) fn sqlite_pragmas() -> String {
    format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; \
         PRAGMA cache_size = {CACHE_KIB}; PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}; PRAGMA temp_store = MEMORY;"
    )
}

/// The database file of an SQLite URL. The enrollment writer opens the file a
/// second time (`enroll_sqlite`), so a database that lives only in memory cannot
/// serve as a store.
fn options_file(url: &str) -> Result<std::path::PathBuf> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let file = options.get_filename();
    // sqlx names an in-memory database `file:sqlx-in-memory-N`: the URL tells
    if file.as_os_str().is_empty() || url.contains(":memory:") || url.contains("mode=memory") {
        return Err(StoreError::Unsupported("an SQLite store needs a database file, not an in-memory database".into()));
    }
    Ok(file.to_path_buf())
}

/// A TLS failure towards PostgreSQL, with what to check (`sslmode` and `sslrootcert`
/// in the URL decide how the server's certificate is verified).
fn tls_hint(error: StoreError) -> StoreError {
    let cause = match &error {
        StoreError::Database(sqlx::Error::Tls(cause)) => cause.to_string(),
        // rustls's refusals reach sqlx as I/O errors of this kind
        StoreError::Database(sqlx::Error::Io(cause)) if cause.kind() == std::io::ErrorKind::InvalidData => cause.to_string(),
        _ => return error,
    };
    StoreError::Unsupported(format!(
        "TLS to PostgreSQL failed: {cause}; with sslmode=verify-full (or verify-ca) the server's certificate must be signed by a CA in \
         the URL's sslrootcert file or the system's trust store (and, for verify-full, name the URL's host)"
    ))
}

/// The database file an SQLite URL names; `None` for PostgreSQL and for what cannot
/// serve as a store (which [`Store::connect`] refuses). The server keeps it private.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return None;
    }
    options_file(url).ok()
}

impl Store {
    /// Connects (creating an SQLite file if needed) and applies migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") { Backend::Postgres } else { Backend::Sqlite };
        let sqlite_file = if backend == Backend::Sqlite { Some(options_file(url)?) } else { None };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = Self::pool(&options, backend, if backend == Backend::Sqlite { 8 } else { 16 }).await.map_err(tls_hint)?;
        // SQLite: one long-lived writer connection whose page cache stays warm, which
        // leaves checkpoints to a background task; PostgreSQL: writes share the pool
        let writer = match backend {
            Backend::Sqlite => {
                let writer = Self::pool(&options, backend, 1).await?;
                tokio::spawn(checkpoint_in_background(pool.clone()));
                writer
            }
            Backend::Postgres => {
                tokio::spawn(vacuum_in_background(pool.clone()));
                pool.clone()
            }
        };
        let export_pool = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(EXPORT_CONNECTIONS)
                    .min_connections(0)
                    .acquire_timeout(Duration::from_secs(60))
                    .connect_lazy_with(sqlx::postgres::PgConnectOptions::from_str(url)?),
            ),
        };
        let pg_options = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(replicas::pg_options(url)?),
        };
        let mut store = Store {
            pool,
            writer,
            export_pool,
            pg_options,
            backend,
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
            enroll_connection: None,
            export_chunk: Arc::new(std::sync::atomic::AtomicUsize::new(5000)),
            listing: Arc::new(listing::Feed::default()),
        };
        store.migrate().await?;
        store.backfill_name_skeletons().await?;
        if let Some(file) = sqlite_file {
            store.enroll_connection = Some(Arc::new(enroll_sqlite::open(&file)?));
        }
        Ok(store)
    }

    /// Rows per round trip of a streamed export (5,000; tests lower it to cross chunk borders).
    pub fn set_export_chunk(&self, rows: usize) {
        self.export_chunk.store(rows.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    async fn pool(options: &AnyConnectOptions, backend: Backend, size: u32) -> Result<AnyPool> {
        Ok(AnyPoolOptions::new()
            .max_connections(size)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            // an SQLite connection cannot go stale: no ping before every use
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        connection.execute(sqlx::AssertSqlSafe(sqlite_pragmas())).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await?)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        if let Some(pool) = &self.export_pool {
            pool.close().await;
        }
        self.pool.close().await;
        self.writer.close().await;
    }

    /// PostgreSQL: vacuums now the tables with at least `after_rows` rows changed
    /// since their last vacuum (what the background task does every ten seconds);
    /// returns their names. SQLite needs no vacuum and returns none.
    pub async fn vacuum_if_due(&self, after_rows: i64) -> Result<Vec<String>> {
        match self.backend {
            Backend::Sqlite => Ok(Vec::new()),
            Backend::Postgres => vacuum_if_due(&self.pool, after_rows).await,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    async fn migrate(&self) -> Result<()> {
        let _gate = self.write_gate.lock().await;
        let mut connection = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)").bind(PG_LOCK_SCHEMA).execute(&mut *connection).await?;
        }
        let result = async {
            connection.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)").await?;
            let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
                .fetch_all(&mut *connection)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
            for &(version, sqlite_script, postgres_script) in MIGRATIONS {
                if applied.contains(&version) {
                    continue;
                }
                let script = match (self.backend, postgres_script) {
                    (Backend::Postgres, script) if !script.is_empty() => script,
                    _ => sqlite_script,
                };
                let script = match self.backend {
                    // sqlx's Any driver maps no SQLite BOOLEAN, so SQLite keeps flags as 0/1 integers
                    Backend::Sqlite => {
                        script.replace("{BLOB}", "BLOB").replace("{REAL}", "REAL").replace("{BOOL}", "INTEGER").replace("{CLUSTERED}", " WITHOUT ROWID")
                    }
                    Backend::Postgres => {
                        script.replace("{BLOB}", "BYTEA").replace("{REAL}", "DOUBLE PRECISION").replace("{BOOL}", "BOOLEAN").replace("{CLUSTERED}", "")
                    }
                };
                let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(script)).execute(&mut *transaction).await?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(version)
                    .bind(now_micros())
                    .execute(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                tracing::info!(version, "applied migration");
            }
            Ok::<_, StoreError>(())
        }
        .await;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_LOCK_SCHEMA).execute(&mut *connection).await?;
        }
        result
    }

    /// Starts a write transaction: on SQLite behind the process-wide writer gate
    /// (one writer at a time, so no lock upgrades fail), on PostgreSQL directly.
    async fn write(&self) -> Result<WriteTx<'_>> {
        let gate = match self.backend {
            Backend::Sqlite => Some(self.write_gate.lock().await),
            Backend::Postgres => None,
        };
        let transaction = self.writer.begin().await?;
        Ok(WriteTx { transaction, _gate: gate })
    }

    /// Serialises range changes across replicas (PostgreSQL advisory lock).
    async fn lock_ranges(&self, tx: &mut WriteTx<'_>) -> Result<()> {
        self.lock_for_transaction(tx, PG_LOCK_RANGES).await
    }

    /// Serialises changes that take a way of signing in away, so two replicas cannot
    /// each remove one of the last two (PostgreSQL advisory lock; SQLite has one
    /// writer at a time anyway).
    async fn lock_credentials(&self, tx: &mut WriteTx<'_>) -> Result<()> {
        self.lock_for_transaction(tx, PG_LOCK_CREDENTIALS).await
    }

    async fn lock_for_transaction(&self, tx: &mut WriteTx<'_>, key: i64) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(key).execute(&mut *tx.transaction).await?;
        }
        Ok(())
    }
}

struct WriteTx<'a> {
    transaction: sqlx::Transaction<'static, sqlx::Any>,
    _gate: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl WriteTx<'_> {
    async fn commit(self) -> Result<()> {
        self.transaction.commit().await?;
        Ok(())
    }
}

/// Microseconds since the Unix epoch: the store's only time unit.
pub fn now_micros() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// Reads a flag stored as BOOLEAN (PostgreSQL) or 0/1 INTEGER (SQLite).
pub(crate) fn get_bool(row: &sqlx::any::AnyRow, column: &str) -> Result<bool> {
    match row.try_get::<bool, _>(column) {
        Ok(value) => Ok(value),
        Err(_) => Ok(row.try_get::<i64, _>(column)? != 0),
    }
}

/// A condition on `devices` (unqualified columns) that keeps the devices whose
/// `column` (`hostname` or `username`) contains `needle`, answered by the trigram
/// index: SQLite's full-text table (a phrase of three characters at least),
/// PostgreSQL's GIN index on `lower(column)`. `None` when no index can help.
pub(crate) fn device_search(backend: Backend, column: &str, needle: &str) -> Option<(String, FilterValue)> {
    match backend {
        Backend::Sqlite if needle.chars().count() >= 3 => {
            let phrase = format!("{column} : \"{}\"", needle.to_lowercase().replace('"', "\"\""));
            Some(("rowid IN (SELECT rowid FROM device_search WHERE device_search MATCH ?)".to_string(), FilterValue::Text(phrase)))
        }
        Backend::Sqlite => None,
        Backend::Postgres => Some((format!("lower({column}) LIKE ? ESCAPE '\\'"), FilterValue::Text(like_pattern(needle)))),
    }
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` substring match, lowercased.
pub(crate) fn like_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for character in text.to_lowercase().chars() {
        if matches!(character, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(character);
    }
    pattern.push('%');
    pattern
}

/// Whether an error is a unique-constraint violation.
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            database.is_unique_violation() || database.code().is_some_and(|code| code == "23505" || code == "2067" || code == "1555")
        }
        _ => false,
    }
}

/// A small builder for dynamic WHERE clauses with numbered parameters.
#[derive(Clone)]
pub(crate) struct Filter {
    clauses: Vec<String>,
    values: Vec<FilterValue>,
}

#[derive(Clone, Debug)]
pub(crate) enum FilterValue {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl Filter {
    pub(crate) fn new() -> Self {
        Filter { clauses: Vec::new(), values: Vec::new() }
    }

    /// Adds a clause; `?` in it stands for the next parameter.
    pub(crate) fn push(&mut self, clause: &str, values: impl IntoIterator<Item = FilterValue>) {
        let mut text = String::new();
        let mut values = values.into_iter();
        for piece in clause.split_inclusive('?') {
            if let Some(stripped) = piece.strip_suffix('?') {
                text.push_str(stripped);
                if let Some(value) = values.next() {
                    self.values.push(value);
                    text.push_str(&format!("${}", self.values.len()));
                }
            } else {
                text.push_str(piece);
            }
        }
        self.clauses.push(text);
    }

    pub(crate) fn sql(&self) -> String {
        if self.clauses.is_empty() { String::new() } else { format!(" WHERE {}", self.clauses.join(" AND ")) }
    }

    /// Binds the values, in order, to a query of either driver (`Any`, or the typed
    /// PostgreSQL one that exports use).
    pub(crate) fn bind<'q, DB>(&self, mut query: sqlx::query::Query<'q, DB, DB::Arguments>) -> sqlx::query::Query<'q, DB, DB::Arguments>
    where
        DB: sqlx::Database,
        for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
        for<'t> &'t [u8]: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
        for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    {
        for value in &self.values {
            query = match value {
                FilterValue::Text(text) => query.bind(text.as_str()),
                FilterValue::Int(number) => query.bind(*number),
                FilterValue::Bytes(bytes) => query.bind(bytes.as_slice()),
            };
        }
        query
    }
}

/// The key under which names that look alike collide: the Unicode TR39
/// confusable skeleton of the NFC, lowercased name (`Pаris` with a Cyrillic `а`,
/// `PARIS` and `Paris` share one). Kept beside the name in `name_skeleton`
/// (`username_skeleton` for admins), unique, so an impostor of an existing name
/// is refused.
pub fn name_skeleton(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded: String = name.nfc().collect::<String>().to_lowercase();
    unicode_security::skeleton(&folded).collect()
}

/// The tables whose names must not look alike: (table, name column, skeleton column).
const SKELETON_TABLES: &[(&str, &str, &str)] = &[
    ("ip_ranges", "name", "name_skeleton"),
    ("app_segments", "name", "name_skeleton"),
    ("access_policies", "name", "name_skeleton"),
    ("connectors", "name", "name_skeleton"),
    ("admins", "username", "username_skeleton"),
];

/// Claims the skeleton of the row's new name, inside the write's transaction:
/// another row whose name looks alike is refused by name; a race the look-up
/// missed is refused by the unique index.
pub(crate) async fn claim_skeleton(connection: &mut sqlx::AnyConnection, table: &str, id: &str, name: &str) -> Result<()> {
    let Some((_, name_column, column)) = SKELETON_TABLES.iter().find(|(known, _, _)| *known == table) else {
        return Err(StoreError::Unsupported(format!("no skeleton for {table}")));
    };
    let skeleton = name_skeleton(name);
    let sql = format!("SELECT {name_column} FROM {table} WHERE {column} = $1 AND id <> $2");
    if let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(skeleton.as_str()).bind(id).fetch_optional(&mut *connection).await? {
        return Err(StoreError::Confusable(row.try_get(0)?));
    }
    let sql = format!("UPDATE {table} SET {column} = $1 WHERE id = $2");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(skeleton.as_str())
        .bind(id)
        .execute(&mut *connection)
        .await
        .map_err(|error| if is_unique_violation(&error) { StoreError::Duplicate("name") } else { error.into() })?;
    Ok(())
}

impl Store {
    /// Fills the skeletons of rows written before they were kept (once per row;
    /// a pair of old names that look alike keeps the second without one, and says so).
    pub async fn backfill_name_skeletons(&self) -> Result<()> {
        for (table, name_column, column) in SKELETON_TABLES {
            let sql = format!("SELECT id, {name_column} FROM {table} WHERE {column} IS NULL");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
            for row in rows {
                let (id, name): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                let sql = format!("UPDATE {table} SET {column} = $1 WHERE id = $2 AND {column} IS NULL");
                if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name_skeleton(&name)).bind(id.as_str()).execute(&self.pool).await {
                    if is_unique_violation(&error) {
                        tracing::warn!(table, id = %id, "a name written before look-alike names were refused looks like another; rename one of them");
                    } else {
                        return Err(error.into());
                    }
                }
            }
        }
        Ok(())
    }
}
