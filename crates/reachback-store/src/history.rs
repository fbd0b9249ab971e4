//! Binding history: which device held which address when. One row per interval,
//! opened in the transaction that binds an address and closed in the one that
//! releases it, so the history can never disagree with the bindings it records.
//!
//! The writes happen in three places only, each forced to say why: the enrollment
//! batch opens intervals (`EnrollWrites::insert_history`, for exactly the bindings
//! it wrote), [`crate::bindings::release_in`] closes one (it takes a
//! [`ReleaseReason`]), and [`close_range_in`] closes a force-deleted range's.
//! Everything that releases an address goes through one of the last two.

use futures_util::stream::BoxStream;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::{Backend, Filter, FilterValue, Result, Store, like_pattern};

/// Why an interval ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// an admin released the binding (`DELETE /ip-bindings/{ip}`)
    AdminRelease,
    /// an admin deleted the device
    DeviceDeleted,
    /// the device left (it enrolled anew elsewhere, signed by its key)
    DeviceLeft,
    /// the range was deleted with `force=true`
    RangeDeleted,
    /// the device was not seen for `binding_idle_ttl_seconds`
    IdleTtl,
}

impl ReleaseReason {
    /// Every reason, as stored and shown.
    pub const ALL: [ReleaseReason; 5] =
        [ReleaseReason::AdminRelease, ReleaseReason::DeviceDeleted, ReleaseReason::DeviceLeft, ReleaseReason::RangeDeleted, ReleaseReason::IdleTtl];

    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::AdminRelease => "admin_release",
            ReleaseReason::DeviceDeleted => "device_deleted",
            ReleaseReason::DeviceLeft => "device_left",
            ReleaseReason::RangeDeleted => "range_deleted",
            ReleaseReason::IdleTtl => "idle_ttl",
        }
    }
}

/// How an interval began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindReason {
    /// a new device's first address
    Enrolled,
    /// a known device that had lost its binding got an address again (it came back
    /// after a release, by re-enrolling or by connecting)
    Rebound,
    /// nothing fresh was left in the chosen range, so an address still in
    /// quarantine was handed out early (oldest release first)
    QuarantineReuse,
    /// the binding existed when history began (migration 11); `bound_at` is its
    /// last update
    Migrated,
}

impl BindReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BindReason::Enrolled => "enrolled",
            BindReason::Rebound => "rebound",
            BindReason::QuarantineReuse => "quarantine_reuse",
            BindReason::Migrated => "migrated",
        }
    }
}

/// One interval during which an address was bound to a device.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRow {
    pub id: i64,
    pub ip: String,
    pub device_id: String,
    pub username: String,
    pub client_hostname: String,
    pub platform: String,
    pub range_id: String,
    pub range_name: String,
    /// the first instant it held (inclusive)
    pub bound_at: i64,
    pub bound_reason: String,
    /// the first instant it no longer held (exclusive); `None` while held
    pub released_at: Option<i64>,
    /// why it ended (a [`ReleaseReason`]); `None` while held
    pub reason: Option<String>,
}

/// Whether an interval holds at instant `at`: from `bound_at` inclusive to
/// `released_at` exclusive. The SQL filters say the same; tests compare them.
pub fn holds_at(bound_at: i64, released_at: Option<i64>, at: i64) -> bool {
    bound_at <= at && released_at.is_none_or(|released_at| at < released_at)
}

/// Whether an interval holds at some instant of the window `[from, to]` (both
/// inclusive, either open): `from == to` is [`holds_at`].
pub fn overlaps_window(bound_at: i64, released_at: Option<i64>, from: Option<i64>, to: Option<i64>) -> bool {
    to.is_none_or(|to| bound_at <= to) && from.is_none_or(|from| released_at.is_none_or(|released_at| from < released_at))
}

/// Sort orders of the history listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HistorySort {
    /// by start; the default, newest first
    #[default]
    BoundAt,
    /// by end, intervals still held last (ascending)
    ReleasedAt,
    /// numeric address order
    Ip,
    Username,
    ClientHostname,
    Platform,
    RangeName,
    DeviceId,
}

/// Filters, order and page of a history listing. `limit` 0 means no limit (export).
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    /// inclusive key bounds of an address or CIDR
    pub ip_keys: Option<([u8; 17], [u8; 17])>,
    /// intervals holding at this instant
    pub at: Option<i64>,
    /// exact device id
    pub device_id: Option<String>,
    /// substrings, case-insensitively
    pub username: Option<String>,
    pub client_hostname: Option<String>,
    /// intervals holding at some instant of `[from, to]`
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub sort: HistorySort,
    pub descending: bool,
    pub offset: i64,
    pub limit: i64,
}

/// Who held an address at an instant, and who held it before and after.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// the interval holding at the instant (the latest bound, should clocks of
    /// replicas ever have made two overlap)
    pub holder: Option<HistoryRow>,
    /// the interval that began last before the holder (or, with none, before or at the instant)
    pub previous: Option<HistoryRow>,
    /// the first interval that began after the instant
    pub next: Option<HistoryRow>,
}

/// An interval to open, in the transaction that binds the address.
#[derive(Clone, Debug)]
pub(crate) struct HistoryOpen {
    pub ip_key: Vec<u8>,
    pub ip: String,
    pub device_id: String,
    pub username: String,
    pub client_hostname: String,
    pub platform: String,
    pub range_id: String,
    pub range_name: String,
    pub bound_at: i64,
    pub bound_reason: BindReason,
}

/// The multi-row insert that opens intervals ([`HISTORY_COLUMNS`] a row).
pub(crate) const HISTORY_INSERT: &str =
    "INSERT INTO binding_history (ip_key, ip, device_id, username, client_hostname, platform, range_id, range_name, bound_at, bound_reason) VALUES {rows}";
pub(crate) const HISTORY_COLUMNS: usize = 10;

/// Closes the open interval of an address (`$1`) at `$2` for reason `$3`. An end
/// before the start (a clock stepped back) is clamped to the start: the interval
/// is then empty, never negative.
const CLOSE_ONE: &str =
    "UPDATE binding_history SET released_at = CASE WHEN bound_at > $2 THEN bound_at ELSE $2 END, reason = $3 WHERE ip_key = $1 AND released_at IS NULL";

/// Closes, in the caller's transaction, the open interval of the address whose
/// binding is being released. Returns how many were closed (1 when the history
/// agrees with the bindings).
pub(crate) async fn close_in(connection: &mut sqlx::AnyConnection, ip_key: &[u8; 17], reason: ReleaseReason, now: i64) -> Result<u64> {
    let closed = sqlx::query(CLOSE_ONE).bind(ip_key.to_vec()).bind(now).bind(reason.as_str()).execute(&mut *connection).await?.rows_affected();
    if closed != 1 {
        let ip = reachback_ipam::address_from_key(ip_key).map(|(family, value)| reachback_ipam::join_address(family, value).to_string()).unwrap_or_default();
        tracing::warn!(%ip, closed, reason = reason.as_str(), "the binding history had not exactly one open interval for a released address");
    }
    Ok(closed)
}

/// Closes, in the caller's transaction, every open interval of a range that is
/// being deleted (its rows lie inside its address block, read through the index on
/// the address).
pub(crate) async fn close_range_in(connection: &mut sqlx::AnyConnection, range_id: &str, reason: ReleaseReason, now: i64) -> Result<u64> {
    let sql = format!(
        "UPDATE binding_history SET released_at = CASE WHEN bound_at > $2 THEN bound_at ELSE $2 END, reason = $3 WHERE {} AND released_at IS NULL",
        crate::range_rows("", "$1")
    );
    Ok(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(range_id).bind(now).bind(reason.as_str()).execute(&mut *connection).await?.rows_affected())
}

const HISTORY_SELECT: &str =
    "h.id, h.ip, h.device_id, h.username, h.client_hostname, h.platform, h.range_id, h.range_name, h.bound_at, h.bound_reason, h.released_at, h.reason";

fn history_from_row(row: &AnyRow) -> Result<HistoryRow> {
    Ok(HistoryRow {
        id: row.try_get("id")?,
        ip: row.try_get("ip")?,
        device_id: row.try_get("device_id")?,
        username: row.try_get("username")?,
        client_hostname: row.try_get("client_hostname")?,
        platform: row.try_get("platform")?,
        range_id: row.try_get("range_id")?,
        range_name: row.try_get("range_name")?,
        bound_at: row.try_get("bound_at")?,
        bound_reason: row.try_get("bound_reason")?,
        released_at: row.try_get("released_at")?,
        reason: row.try_get("reason")?,
    })
}

/// From this many rows to skip on, a page's ids are found before its rows are read.
const DEFERRED_JOIN_OFFSET: i64 = 200;

/// The latest instant an open interval can be compared with: open intervals sort
/// after every closed one by end, on both backends (which order NULLs differently).
const OPEN_END: i64 = i64::MAX;

/// Closed intervals deleted per retention transaction.
pub const PRUNE_BATCH_ROWS: i64 = 5_000;

impl Store {
    fn history_filter(&self, query: &HistoryQuery) -> Filter {
        let mut filter = Filter::new();
        match query.ip_keys {
            // one address: an equality, so the index on (ip_key, bound_at) is also
            // bounded by `at`/`to` and gives the intervals in start order
            Some((first, last)) if first == last => filter.push("h.ip_key = ?", [FilterValue::Bytes(first.to_vec())]),
            Some((first, last)) => filter.push("h.ip_key >= ? AND h.ip_key <= ?", [FilterValue::Bytes(first.to_vec()), FilterValue::Bytes(last.to_vec())]),
            None => {}
        }
        if let Some(at) = query.at {
            filter.push("h.bound_at <= ? AND (h.released_at IS NULL OR h.released_at > ?)", [FilterValue::Int(at), FilterValue::Int(at)]);
        }
        if let Some(to) = query.to {
            filter.push("h.bound_at <= ?", [FilterValue::Int(to)]);
        }
        if let Some(from) = query.from {
            filter.push("(h.released_at IS NULL OR h.released_at > ?)", [FilterValue::Int(from)]);
        }
        if let Some(device_id) = &query.device_id {
            filter.push("h.device_id = ?", [FilterValue::Text(device_id.clone())]);
        }
        for (column, value) in [("username", &query.username), ("client_hostname", &query.client_hostname)] {
            let Some(needle) = value else { continue };
            filter.push(&format!("lower(h.{column}) LIKE ? ESCAPE '\\'"), [FilterValue::Text(like_pattern(needle))]);
            // SQLite: the devices whose current or former names match are the
            // candidates (migration 17: the devices' trigram index and the former
            // names'); PostgreSQL's GIN index serves the LIKE itself. It can only
            // narrow, the LIKE on the interval's own copy decides
            if self.backend == Backend::Sqlite && needle.chars().count() >= 3 {
                let quoted = format!("\"{}\"", needle.to_lowercase().replace('"', "\"\""));
                let device_column = if column == "username" { "username" } else { "hostname" };
                filter.push(
                    "h.device_id IN (SELECT d.id FROM devices d WHERE d.rowid IN (SELECT rowid FROM device_search WHERE device_search MATCH ?) \
                     UNION ALL SELECT n.device_id FROM history_names n WHERE n.id IN (SELECT rowid FROM history_names_search WHERE history_names_search MATCH ?))",
                    [FilterValue::Text(format!("{device_column} : {quoted}")), FilterValue::Text(format!("{column} : {quoted}"))],
                );
            }
        }
        filter
    }

    /// The ORDER BY of a history query: the sort column, then start and id, all in
    /// the same direction (a total order, so pages never overlap).
    fn history_order(query: &HistoryQuery) -> String {
        let direction = if query.descending { "DESC" } else { "ASC" };
        let leading = match query.sort {
            HistorySort::BoundAt => None,
            HistorySort::ReleasedAt => Some(format!("COALESCE(h.released_at, {OPEN_END})")),
            HistorySort::Ip => Some("h.ip_key".to_string()),
            HistorySort::Username => Some("h.username".to_string()),
            HistorySort::ClientHostname => Some("h.client_hostname".to_string()),
            HistorySort::Platform => Some("h.platform".to_string()),
            HistorySort::RangeName => Some("h.range_name".to_string()),
            HistorySort::DeviceId => Some("h.device_id".to_string()),
        };
        match leading {
            Some(leading) => format!("{leading} {direction}, h.bound_at {direction}, h.id {direction}"),
            None => format!("h.bound_at {direction}, h.id {direction}"),
        }
    }

    /// How many intervals match.
    pub async fn count_history(&self, query: &HistoryQuery) -> Result<i64> {
        let filter = self.history_filter(query);
        let sql = format!("SELECT COUNT(*) FROM binding_history h{}", filter.sql());
        Ok(filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// One page of intervals. A deep page finds its ids first (over an index that
    /// holds them: every SQLite index holds the rowid), then reads only its rows.
    pub async fn history_page(&self, query: &HistoryQuery) -> Result<Vec<HistoryRow>> {
        let filter = self.history_filter(query);
        let order = Self::history_order(query);
        let (limit, offset) = (query.limit.max(0), query.offset.max(0));
        let sql = if offset >= DEFERRED_JOIN_OFFSET {
            format!(
                "SELECT {HISTORY_SELECT} FROM binding_history h WHERE h.id IN (SELECT h.id FROM binding_history h{} ORDER BY {order} LIMIT {limit} OFFSET {offset}) ORDER BY {order}",
                filter.sql()
            )
        } else {
            format!("SELECT {HISTORY_SELECT} FROM binding_history h{} ORDER BY {order} LIMIT {limit} OFFSET {offset}", filter.sql())
        };
        let rows = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_all(&self.pool).await?;
        rows.iter().map(history_from_row).collect()
    }

    /// Every matching interval in the listing's order, streamed (CSV export).
    pub fn stream_history(&self, query: &HistoryQuery) -> BoxStream<'static, Result<HistoryRow>> {
        let filter = self.history_filter(query);
        let sql = format!("SELECT {HISTORY_SELECT} FROM binding_history h{} ORDER BY {}", filter.sql(), Self::history_order(query));
        crate::audit::async_stream(self.pool.clone(), sql, filter, history_from_row)
    }

    /// Who held the address at `at`, and the intervals just before and after: three
    /// seeks on the address's intervals by start.
    pub async fn trace_address(&self, ip_key: &[u8; 17], at: i64) -> Result<Trace> {
        let one = |condition: &str, order: &str| {
            format!("SELECT {HISTORY_SELECT} FROM binding_history h WHERE h.ip_key = $1 AND {condition} ORDER BY h.bound_at {order}, h.id {order} LIMIT 1")
        };
        let fetch = |sql: String, values: Vec<i64>| async move {
            let mut statement = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ip_key.to_vec());
            for value in values {
                statement = statement.bind(value);
            }
            let row = statement.fetch_optional(&self.pool).await?;
            row.as_ref().map(history_from_row).transpose()
        };
        let holder = fetch(one("h.bound_at <= $2 AND (h.released_at IS NULL OR h.released_at > $2)", "DESC"), vec![at]).await?;
        let previous = match &holder {
            Some(holder) => fetch(one("(h.bound_at < $2 OR (h.bound_at = $2 AND h.id < $3))", "DESC"), vec![holder.bound_at, holder.id]).await?,
            None => fetch(one("h.bound_at <= $2", "DESC"), vec![at]).await?,
        };
        let next = fetch(one("h.bound_at > $2", "ASC"), vec![at]).await?;
        Ok(Trace { holder, previous, next })
    }

    /// Deletes closed intervals that ended before `cutoff`, `batch_rows` per
    /// transaction (so enrollments pass in between); open intervals are never
    /// deleted. Returns how many went; the run is audited (`audit` with the count)
    /// when any did.
    pub async fn prune_history(&self, cutoff: i64, batch_rows: i64, audit: impl FnOnce(u64) -> AuditEntry) -> Result<u64> {
        let batch_rows = batch_rows.max(1);
        let mut deleted = 0u64;
        loop {
            let mut tx = self.write().await?;
            let gone =
                sqlx::query("DELETE FROM binding_history WHERE id IN (SELECT id FROM binding_history WHERE released_at < $1 ORDER BY released_at LIMIT $2)")
                    .bind(cutoff)
                    .bind(batch_rows)
                    .execute(&mut *tx.transaction)
                    .await?
                    .rows_affected();
            tx.commit().await?;
            deleted += gone;
            if gone < u64::try_from(batch_rows).unwrap_or(u64::MAX) {
                break;
            }
            tokio::task::yield_now().await;
        }
        if deleted > 0 {
            self.record_audit(audit(deleted)).await?;
        }
        Ok(deleted)
    }

    /// Checks the history against the bindings (consistency checks and tests): every
    /// bound address has exactly one open interval, of its device, and every open
    /// interval is a bound address's. Returns the addresses that disagree.
    pub async fn verify_history(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT b.ip FROM bindings b WHERE b.device_id IS NOT NULL AND \
             (SELECT COUNT(*) FROM binding_history h WHERE h.ip_key = b.ip_key AND h.released_at IS NULL AND h.device_id = b.device_id) <> 1 \
             UNION ALL \
             SELECT h.ip FROM binding_history h WHERE h.released_at IS NULL AND \
             NOT EXISTS (SELECT 1 FROM bindings b WHERE b.ip_key = h.ip_key AND b.device_id = h.device_id)",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// SQLite (migration 17): a substring search of the history finds an interval by
    /// its device's current names (the devices' trigram index) and, once the device
    /// is deleted or renamed, by the names it had (`history_names`). Both halves are
    /// needed: without either, a case below is missed. Runs on a store of its own:
    /// no server, nothing else writes.
    #[tokio::test]
    async fn a_substring_search_finds_intervals_of_present_renamed_and_deleted_devices() {
        let dir = std::env::temp_dir().join(format!("reachback_history_names_{}_{}", std::process::id(), crate::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", dir.join("db").display())).await.unwrap();
        for (id, username, hostname) in [("d1", "ann@corp.example", "pc1.corp.example"), ("d2", "bob@corp.example", "pc2.corp.example")] {
            sqlx::query(
                "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, created_at, last_seen) \
                 VALUES ($1, $2, $3, $4, 'linux', $5, '01', 0, 0)",
            )
            .bind(id)
            .bind(hostname)
            .bind(hostname)
            .bind(username)
            .bind(id.as_bytes().to_vec())
            .execute(&store.pool)
            .await
            .unwrap();
        }
        let interval = |id: i64, device: &'static str, username: &'static str, hostname: &'static str| {
            sqlx::query(
                "INSERT INTO binding_history (id, ip_key, ip, device_id, username, client_hostname, platform, range_id, range_name, bound_at, bound_reason) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'linux', 'r', 'R', $7, 'enrolled')",
            )
            .bind(id)
            .bind(id.to_be_bytes().to_vec())
            .bind(format!("100.64.0.{id}"))
            .bind(device)
            .bind(username)
            .bind(hostname)
            .bind(id * 10)
            .execute(&store.pool)
        };
        let search = |column: &'static str, needle: &'static str| {
            let mut query = HistoryQuery { sort: HistorySort::BoundAt, limit: 100, ..Default::default() };
            match column {
                "username" => query.username = Some(needle.to_string()),
                _ => query.client_hostname = Some(needle.to_string()),
            }
            let store = &store;
            async move { store.history_page(&query).await.unwrap().iter().map(|row| row.id).collect::<Vec<i64>>() }
        };
        let sound = || async {
            for table in ["device_search", "history_names_search"] {
                sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} ({table}) VALUES ('integrity-check')"))).execute(&store.pool).await.unwrap();
            }
        };
        interval(1, "d1", "ann@corp.example", "pc1.corp.example").await.unwrap();
        interval(2, "d2", "bob@corp.example", "pc2.corp.example").await.unwrap();
        // present devices: by their current names, through the devices' index
        assert_eq!(search("username", "ann@").await, [1]);
        assert_eq!(search("client_hostname", "CORP.exa").await, [1, 2]);
        assert_eq!(
            sqlx::query("SELECT COUNT(*) FROM history_names").fetch_one(&store.pool).await.unwrap().try_get::<i64, _>(0).unwrap(),
            0,
            "nothing kept yet"
        );
        // d1 renamed (its user and host): its old interval by the old names, the new one by the new
        sqlx::query("UPDATE devices SET username = 'carol@corp.example', hostname = 'lab7.corp.example', hostname_key = 'lab7.corp.example' WHERE id = 'd1'")
            .execute(&store.pool)
            .await
            .unwrap();
        interval(3, "d1", "carol@corp.example", "lab7.corp.example").await.unwrap();
        assert_eq!(search("username", "ann@").await, [1], "a renamed device's former name");
        assert_eq!(search("client_hostname", "pc1.").await, [1]);
        assert_eq!(search("username", "carol").await, [3]);
        assert_eq!(search("client_hostname", "lab7").await, [3]);
        // d2 deleted: its interval stays findable by the names it had
        sqlx::query("DELETE FROM devices WHERE id = 'd2'").execute(&store.pool).await.unwrap();
        assert_eq!(search("username", "bob@").await, [2], "a deleted device's names");
        assert_eq!(search("client_hostname", "pc2").await, [2]);
        assert_eq!(search("client_hostname", "corp.example").await, [1, 2, 3]);
        assert_eq!(search("username", "nobody").await, Vec::<i64>::new());
        // a hostname that only changes case keeps matching (the index folds case)
        sqlx::query("UPDATE devices SET hostname = 'LAB7.corp.example' WHERE id = 'd1'").execute(&store.pool).await.unwrap();
        assert_eq!(search("client_hostname", "lab7.CORP").await, [3]);
        sound().await;
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interval_holds_from_its_start_until_just_before_its_end() {
        assert!(!holds_at(100, Some(200), 99), "before the start");
        assert!(holds_at(100, Some(200), 100), "the start is inclusive");
        assert!(holds_at(100, Some(200), 199));
        assert!(!holds_at(100, Some(200), 200), "the end is exclusive");
        assert!(holds_at(100, None, i64::MAX), "an open interval holds from its start on");
        assert!(!holds_at(100, Some(100), 100), "an empty interval holds nowhere");
    }

    #[test]
    fn a_window_overlaps_the_intervals_held_at_one_of_its_instants() {
        // [100, 200) against windows
        assert!(overlaps_window(100, Some(200), None, None));
        assert!(overlaps_window(100, Some(200), Some(199), None));
        assert!(!overlaps_window(100, Some(200), Some(200), None), "ended when the window began");
        assert!(overlaps_window(100, Some(200), None, Some(100)), "began on the window's last instant");
        assert!(!overlaps_window(100, Some(200), None, Some(99)));
        assert!(overlaps_window(100, None, Some(1_000_000), None), "still held");
        // a window of one instant is `holds_at`
        for at in [99, 100, 150, 199, 200, 201] {
            assert_eq!(overlaps_window(100, Some(200), Some(at), Some(at)), holds_at(100, Some(200), at), "{at}");
        }
    }

    #[test]
    fn reasons_are_stored_as_snake_case_names() {
        let names: Vec<&str> = ReleaseReason::ALL.iter().map(|reason| reason.as_str()).collect();
        assert_eq!(names, ["admin_release", "device_deleted", "device_left", "range_deleted", "idle_ttl"]);
        assert_eq!(BindReason::QuarantineReuse.as_str(), "quarantine_reuse");
    }
}
