//! IP bindings: listing with filters and numeric address order, release into
//! quarantine, streaming export, and the snapshot the allocation engine starts from.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reachback_ipam::{Location, address_from_key};
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::AuditEntry;
use crate::history::ReleaseReason;
use crate::ranges::{RangeRow, location_from_row};
use crate::{Filter, FilterValue, Result, Store, StoreError, like_pattern, now_micros};

/// A bound address with what the listing shows about it.
#[derive(Clone, Debug, PartialEq)]
pub struct BindingRow {
    pub ip: String,
    pub range_id: String,
    pub range_name: String,
    pub range_location: Option<Location>,
    pub device_id: String,
    pub username: String,
    pub platform: String,
    pub client_hostname: String,
    pub last_updated: i64,
}

/// Sort orders of the bindings listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BindingSort {
    #[default]
    Ip,
    Username,
    Platform,
    ClientHostname,
    RangeName,
    LastUpdated,
}

/// Filters, order and page of a bindings listing. `limit` 0 means no limit (export).
#[derive(Clone, Debug, Default)]
pub struct BindingQuery {
    /// inclusive key bounds of an address or CIDR
    pub ip_keys: Option<([u8; 17], [u8; 17])>,
    pub range_name: Option<String>,
    pub range_location: Option<String>,
    pub username: Option<String>,
    pub platform: Option<String>,
    /// The platforms a binding may have (the server validates every enrollment's
    /// against this list): when set, the `platform` substring filter becomes a test
    /// of the matching names, which the platform index answers and counts alone.
    pub known_platforms: Option<&'static [&'static str]>,
    pub client_hostname: Option<String>,
    pub updated_after: Option<i64>,
    pub updated_before: Option<i64>,
    pub sort: BindingSort,
    pub descending: bool,
    pub offset: i64,
    pub limit: i64,
}

impl BindingQuery {
    /// Whether the query filters on nothing but the range name and location.
    pub fn only_range_filters(&self) -> bool {
        self.ip_keys.is_none()
            && self.username.is_none()
            && self.platform.is_none()
            && self.client_hostname.is_none()
            && self.updated_after.is_none()
            && self.updated_before.is_none()
    }
}

/// What the allocation engine needs from the store at start-up.
#[derive(Debug, Default)]
pub struct EngineSnapshot {
    pub ranges: Vec<RangeRow>,
    /// per range id: bound address values
    pub bound: HashMap<String, Vec<u128>>,
    /// per range id: (value, released_at) of quarantined addresses
    pub quarantined: HashMap<String, Vec<(u128, i64)>>,
}

const BINDING_COLUMNS: &str = "b.ip, b.range_id, r.name AS range_name, r.city, r.state, r.country, r.latitude, r.longitude, b.device_id, b.username, b.platform, b.client_hostname, b.last_updated";

fn binding_from_row(row: &AnyRow) -> Result<BindingRow> {
    let mut range_location = location_from_row(row, "")?;
    if let Some(location) = range_location.as_mut() {
        location.latitude = None;
        location.longitude = None;
    }
    Ok(BindingRow {
        ip: row.try_get("ip")?,
        range_id: row.try_get("range_id")?,
        range_name: row.try_get("range_name")?,
        range_location,
        device_id: row.try_get::<Option<String>, _>("device_id")?.unwrap_or_default(),
        username: row.try_get::<Option<String>, _>("username")?.unwrap_or_default(),
        platform: row.try_get::<Option<String>, _>("platform")?.unwrap_or_default(),
        client_hostname: row.try_get::<Option<String>, _>("client_hostname")?.unwrap_or_default(),
        last_updated: row.try_get("last_updated")?,
    })
}

fn contains_folded(haystack: Option<&str>, needle: &str) -> bool {
    haystack.is_some_and(|value| value.to_lowercase().contains(needle))
}

/// Whether a range's name contains `name` and its city, state or country `place`
/// (both lowercased), case-insensitively.
fn range_matches(range: &RangeRow, name: Option<&str>, place: Option<&str>) -> bool {
    name.is_none_or(|name| range.name.to_lowercase().contains(name))
        && place.is_none_or(|place| {
            range.location.as_ref().is_some_and(|location| {
                contains_folded(location.city.as_deref(), place)
                    || contains_folded(location.state.as_deref(), place)
                    || contains_folded(location.country.as_deref(), place)
            })
        })
}

/// A row of the index as the listing shows it (`None` for a range gone since).
fn listed_row(ranges: &HashMap<String, RangeRow>, row: crate::listing::IndexedRow) -> Option<BindingRow> {
    let range = ranges.get(&row.range_id)?;
    let (family, value) = reachback_ipam::address_from_key(&row.key)?;
    let mut range_location = range.location.clone();
    if let Some(location) = range_location.as_mut() {
        location.latitude = None;
        location.longitude = None;
    }
    Some(BindingRow {
        ip: reachback_ipam::join_address(family, value).to_string(),
        range_id: row.range_id,
        range_name: range.name.clone(),
        range_location,
        device_id: row.device_id,
        username: row.username,
        platform: row.platform,
        client_hostname: row.client_hostname,
        last_updated: row.last_updated,
    })
}

impl Store {
    /// The ranges a bindings query may touch, or `None` when it does not filter on ranges.
    pub async fn matching_range_ids(&self, query: &BindingQuery) -> Result<Option<Vec<RangeRow>>> {
        Ok(self.ranges_in_play(query).await?.0)
    }

    /// The ranges a bindings query may touch (`None` when it does not filter on
    /// ranges), and how many addresses all ranges have bound.
    async fn ranges_in_play(&self, query: &BindingQuery) -> Result<(Option<Vec<RangeRow>>, i64)> {
        if query.range_name.is_none() && query.range_location.is_none() {
            return Ok((None, 0));
        }
        let name = query.range_name.as_deref().map(str::to_lowercase);
        let place = query.range_location.as_deref().map(str::to_lowercase);
        let ranges = self.list_ranges().await?;
        let all_bound = ranges.iter().map(|range| range.used_ips).sum();
        Ok((Some(ranges.into_iter().filter(|range| range_matches(range, name.as_deref(), place.as_deref())).collect()), all_bound))
    }

    /// A listing page from the in-memory index (`None` until it has loaded): caught up
    /// with the committed rows first, so the answer is the reference query's.
    pub async fn indexed_page(&self, query: &BindingQuery) -> Result<Option<(i64, Vec<BindingRow>)>> {
        let Some((selection, ranges)) = self.indexed_selection(query).await? else {
            return Ok(None);
        };
        let offset = usize::try_from(query.offset).unwrap_or(0);
        let limit = usize::try_from(query.limit).unwrap_or(0).max(1);
        let answer = self
            .with_listing_index(move |index| {
                let (total, keys) = index.select(&selection, offset, limit);
                (total, keys.iter().filter_map(|key| index.get(key)).collect::<Vec<_>>())
            })
            .await?;
        Ok(answer.map(|(total, rows)| (total as i64, rows.into_iter().filter_map(|row| listed_row(&ranges, row)).collect())))
    }

    /// Every matching row, in order, from the in-memory index (`None` until it has
    /// loaded): how many, and a stream of them read from the index a chunk at a time.
    pub async fn indexed_export(&self, query: &BindingQuery) -> Result<Option<(i64, BoxStream<'static, Result<BindingRow>>)>> {
        let Some((selection, ranges)) = self.indexed_selection(query).await? else {
            return Ok(None);
        };
        let Some(ordered) = self.with_listing_index(move |index| index.order_all(&selection)).await? else {
            return Ok(None);
        };
        let total = ordered.len() as i64;
        let store = self.clone();
        let ranges = Arc::new(ranges);
        // each chunk: its keys from the order (a selection for the first, one sort for the
        // rest), then its rows from the index; a row removed since is left out, one
        // changed shows as it is now
        let chunks = futures_util::stream::unfold(Some(ordered), move |ordered| {
            let store = store.clone();
            let ranges = ranges.clone();
            async move {
                let mut ordered = ordered?;
                let next = tokio::task::spawn_blocking(move || {
                    let keys = ordered.next_chunk(STREAMED_CHUNK_ROWS);
                    (ordered, keys)
                })
                .await;
                let (ordered, keys) = match next {
                    Ok(next) => next,
                    Err(error) => return Some((Err(StoreError::Internal(format!("listing export task: {error}"))), None)),
                };
                if keys.is_empty() {
                    return None;
                }
                let rows = match store.with_listing_index(move |index| keys.iter().filter_map(|key| index.get(key)).collect::<Vec<_>>()).await {
                    Ok(rows) => rows.unwrap_or_default(),
                    Err(error) => return Some((Err(error), None)),
                };
                Some((Ok(rows.into_iter().filter_map(|row| listed_row(&ranges, row)).collect::<Vec<_>>()), Some(ordered)))
            }
        });
        let stream = chunks.flat_map(|chunk: Result<Vec<BindingRow>>| match chunk {
            Ok(rows) => futures_util::stream::iter(rows.into_iter().map(Ok).collect::<Vec<_>>()),
            Err(error) => futures_util::stream::iter(vec![Err(error)]),
        });
        Ok(Some((total, stream.boxed())))
    }

    /// The index's selection for a query, and the ranges by id; `None` before the
    /// index has loaded.
    async fn indexed_selection(&self, query: &BindingQuery) -> Result<Option<(crate::listing::Selection, HashMap<String, RangeRow>)>> {
        if !self.listing_index_ready() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        self.catch_up_listing().await?;
        let caught_up = started.elapsed();
        // in name order, as the database collates names (`list_ranges` orders by name key)
        let ranges = self.list_ranges().await?;
        if started.elapsed() > std::time::Duration::from_millis(10) {
            tracing::debug!(catch_up_ms = caught_up.as_secs_f64() * 1e3, total_ms = started.elapsed().as_secs_f64() * 1e3, "slow listing preparation");
        }
        let name = query.range_name.as_deref().map(str::to_lowercase);
        let place = query.range_location.as_deref().map(str::to_lowercase);
        let filtered = (name.is_some() || place.is_some())
            .then(|| ranges.iter().filter(|range| range_matches(range, name.as_deref(), place.as_deref())).map(|range| range.id.clone()).collect());
        let selection = crate::listing::Selection {
            ranges: filtered,
            range_order: ranges.iter().map(|range| range.id.clone()).collect(),
            ip: query.ip_keys,
            username: query.username.clone(),
            platform: query.platform.clone(),
            client_hostname: query.client_hostname.clone(),
            updated_after: query.updated_after,
            updated_before: query.updated_before,
            order: Some(query.sort),
            descending: query.descending,
        };
        Ok(Some((selection, ranges.into_iter().map(|range| (range.id.clone(), range)).collect())))
    }

    /// The conditions of a bindings query, the ranges it is limited to (`None`: all),
    /// and how many addresses all ranges have bound (0 without a range filter).
    async fn binding_filter(&self, query: &BindingQuery) -> Result<Option<(Filter, Option<Vec<RangeRow>>, i64)>> {
        self.binding_filter_for(query, false).await
    }

    /// The conditions of a bindings query; for a count (`counting`), the "bound?" test
    /// goes to a column the filter's own access path reads anyway, not to the sort's
    /// index: a count has no order, and a test on the last-updated index (`released_at
    /// IS NULL`) drew SQLite's planner into scanning that whole index with a row read
    /// per entry (0.6–1.6 s for a count of two rows found by a username).
    async fn binding_filter_for(&self, query: &BindingQuery, counting: bool) -> Result<Option<(Filter, Option<Vec<RangeRow>>, i64)>> {
        let mut filter = Filter::new();
        // bound rows are exactly those with these columns set and `released_at` NULL (CHECKs
        // in the schema); testing a column of the sort index lets the index answer the
        // condition without reading rows
        let text_filters = query.username.is_some() || query.client_hostname.is_some() || query.platform.is_some();
        filter.push(
            match query.sort {
                // the platform index answers a platform filter alone; the other text filters
                // and address bounds read the rows, which hold the platform
                _ if counting && (text_filters || query.updated_after.is_none() && query.updated_before.is_none()) => "b.platform IS NOT NULL",
                _ if counting => "b.released_at IS NULL",
                BindingSort::Username => "b.username IS NOT NULL",
                BindingSort::Platform => "b.platform IS NOT NULL",
                BindingSort::ClientHostname => "b.client_hostname IS NOT NULL",
                BindingSort::LastUpdated => "b.released_at IS NULL",
                BindingSort::Ip | BindingSort::RangeName => "b.device_id IS NOT NULL",
            },
            [],
        );
        let (ranges, all_bound) = self.ranges_in_play(query).await?;
        if let Some(ranges) = &ranges {
            if ranges.is_empty() {
                return Ok(None);
            }
            if ranges.len() <= MAX_RANGE_BLOCKS {
                // a few ranges: their address blocks select exactly their rows (blocks do
                // not overlap, and every row lies inside its range's), so the primary key
                // narrows the rows, and a sort index, which holds the address key, answers
                // the test without reading them
                let blocks = vec!["b.ip_key BETWEEN ? AND ?"; ranges.len()].join(" OR ");
                filter.push(
                    &format!("({blocks})"),
                    ranges.iter().flat_map(|range| {
                        let (first, last) = range.range.key_bounds();
                        [FilterValue::Bytes(first.to_vec()), FilterValue::Bytes(last.to_vec())]
                    }),
                );
            } else {
                let placeholders = vec!["?"; ranges.len()].join(", ");
                filter.push(&format!("b.range_id IN ({placeholders})"), ranges.iter().map(|range| FilterValue::Text(range.id.clone())));
            }
        }
        if let Some((first, last)) = query.ip_keys {
            filter.push("b.ip_key >= ? AND b.ip_key <= ?", [FilterValue::Bytes(first.to_vec()), FilterValue::Bytes(last.to_vec())]);
        }
        if let (Some(needle), Some(known)) = (&query.platform, query.known_platforms) {
            // the names that contain the needle: an index range each, no string test per row
            let needle = needle.to_lowercase();
            let names: Vec<&str> = known.iter().copied().filter(|name| name.to_lowercase().contains(&needle)).collect();
            if names.is_empty() {
                return Ok(None);
            }
            filter.push(&format!("b.platform IN ({})", vec!["?"; names.len()].join(", ")), names.iter().map(|name| FilterValue::Text((*name).to_string())));
        }
        let platform_test = if query.known_platforms.is_some() { &None } else { &query.platform };
        for (column, value) in [("b.username", &query.username), ("b.platform", platform_test), ("b.client_hostname", &query.client_hostname)] {
            if let Some(value) = value {
                filter.push(&format!("lower({column}) LIKE ? ESCAPE '\\'"), [FilterValue::Text(like_pattern(value))]);
            }
        }
        // the trigram index names the candidate devices first, unless the needle is in
        // so many devices (`corp`, `example`) that reading them one by one through the
        // device index costs more than testing every row (8.9 s against a scan's
        // fraction of a second for a hostname in every device, 1,000,000 bindings):
        // the LIKE test above stays the exact test either way
        for (column, value) in [("username", &query.username), ("hostname", &query.client_hostname)] {
            if let Some((clause, value)) = value.as_deref().and_then(|needle| crate::device_search(self.backend, column, needle)) {
                let probe = format!("SELECT COUNT(*) FROM (SELECT 1 FROM devices WHERE {} LIMIT {SEARCH_CANDIDATES_MAX}) c", clause.replace('?', "$1"));
                let bind = match &value {
                    FilterValue::Text(text) => text.clone(),
                    _ => String::new(),
                };
                // SQLite only: PostgreSQL's planner weighs the trigram index by its statistics,
                // and there the probe (a GIN bitmap built in full) cost more than it saved
                // (a range name with a username substring: 9 -> 189 ms median)
                let candidates: i64 = match self.backend {
                    crate::Backend::Sqlite => sqlx::query(sqlx::AssertSqlSafe(probe)).bind(bind).fetch_one(&self.pool).await?.try_get(0)?,
                    crate::Backend::Postgres => 0,
                };
                if candidates < SEARCH_CANDIDATES_MAX {
                    filter.push(&format!("b.device_id IN (SELECT id FROM devices WHERE {clause})"), [value]);
                } else {
                    tracing::debug!(column, candidates, "substring search skipped: too many candidates");
                }
            }
        }
        if let Some(after) = query.updated_after {
            filter.push("b.last_updated > ?", [FilterValue::Int(after)]);
        }
        if let Some(before) = query.updated_before {
            filter.push("b.last_updated < ?", [FilterValue::Int(before)]);
        }
        Ok(Some((filter, ranges, all_bound)))
    }

    /// The page's statement. With `sort_rows` the rows that pass the filter are read
    /// (through the primary key, by range) and sorted: the order's leading term is an
    /// expression with the column's order and collation (`x || ''`, `x + 0`), which no
    /// index serves, so the planner cannot walk the sort index instead.
    fn binding_select(&self, filter: &Filter, query: &BindingQuery, plan: PagePlan) -> String {
        let sort_rows = plan == PagePlan::Sort;
        let direction = if query.descending { "DESC" } else { "ASC" };
        let column = match query.sort {
            BindingSort::Ip => None,
            BindingSort::Username => Some("b.username"),
            BindingSort::Platform => Some("b.platform"),
            BindingSort::ClientHostname => Some("b.client_hostname"),
            BindingSort::RangeName => Some("r.name_key"),
            BindingSort::LastUpdated => Some("b.last_updated"),
        };
        let leading = column.map(|column| match (sort_rows, query.sort) {
            (false, _) => column.to_string(),
            (true, BindingSort::LastUpdated) => format!("({column} + 0)"),
            (true, _) => format!("({column} || '')"),
        });
        let order = match leading {
            Some(leading) => format!("{leading} {direction}, b.ip_key {direction}"),
            // address order sorted: an expression of the key, in the key's order, that the
            // primary key does not serve
            None if sort_rows => match self.backend {
                crate::Backend::Sqlite => format!("+b.ip_key {direction}"),
                crate::Backend::Postgres => format!("(b.ip_key || '\\x'::bytea) {direction}, b.ip_key {direction}"),
            },
            None => format!("b.ip_key {direction}"),
        };
        // a walk on SQLite names the sort's index (the planner may otherwise read the rows
        // a filter's index finds and sort them all for the first page); PostgreSQL's
        // planner, which estimates from statistics, is left to choose the walk (a
        // session-wide `enable_sort = off` would also turn the outer sort of a deep
        // page's 50 rows into a walk of the whole index)
        let table = match (plan, self.backend, sort_index(query.sort)) {
            (PagePlan::Walk, crate::Backend::Sqlite, Some(index)) => format!("bindings b INDEXED BY {index}"),
            _ => "bindings b".to_string(),
        };
        if query.limit > 0 && query.offset >= DEFERRED_JOIN_OFFSET {
            // a deep page: the rows to skip are counted over the sort index alone (it
            // holds the address key, the bindings' primary key), and only the page's
            // rows are read whole and joined with their ranges
            let join = if query.sort == BindingSort::RangeName { " JOIN ip_ranges r ON r.id = b.range_id" } else { "" };
            return format!(
                "SELECT {BINDING_COLUMNS} FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE b.ip_key IN \
                 (SELECT b.ip_key FROM {table}{join}{} ORDER BY {order} LIMIT {} OFFSET {}) ORDER BY {order}",
                filter.sql(),
                query.limit,
                query.offset
            );
        }
        let mut sql = format!("SELECT {BINDING_COLUMNS} FROM {table} JOIN ip_ranges r ON r.id = b.range_id{} ORDER BY {order}", filter.sql());
        if query.limit > 0 {
            sql.push_str(&format!(" LIMIT {} OFFSET {}", query.limit, query.offset.max(0)));
        }
        sql
    }

    /// How many bindings match. Without filters other than on ranges this is read from
    /// the ranges' maintained counters instead of counting rows.
    pub async fn count_bindings(&self, query: &BindingQuery) -> Result<i64> {
        let Some((filter, ranges, _)) = self.binding_filter_for(query, true).await? else {
            return Ok(0);
        };
        if query.only_range_filters() {
            let ranges = match ranges {
                Some(ranges) => ranges,
                None => self.list_ranges().await?,
            };
            return Ok(ranges.iter().map(|range| range.used_ips).sum());
        }
        let sql = format!("SELECT COUNT(*) FROM bindings b{}", filter.sql());
        Ok(filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// One page of bindings, knowing that `total` rows match (`count_bindings`): a
    /// page past the end is empty without a query, and a deep page in the far half
    /// is read from the other end, in the opposite order, and turned round — the
    /// same rows, for a skip of at most half of them. The order is total (ties go
    /// to the address), so it reverses exactly.
    pub async fn binding_page_within(&self, query: &BindingQuery, total: i64) -> Result<Vec<BindingRow>> {
        if query.limit > 0 && query.offset >= total {
            return Ok(Vec::new());
        }
        match from_the_other_end(query.offset, query.limit, total) {
            Some((offset, limit)) => {
                let reversed = BindingQuery { descending: !query.descending, offset, limit, ..query.clone() };
                let mut rows = self.binding_page_of(&reversed, Some(total)).await?;
                rows.reverse();
                Ok(rows)
            }
            None => self.binding_page_of(query, Some(total)).await,
        }
    }

    /// One page of bindings.
    pub async fn binding_page(&self, query: &BindingQuery) -> Result<Vec<BindingRow>> {
        self.binding_page_of(query, None).await
    }

    /// One page of bindings, knowing (when `matched` is given) how many rows match:
    /// the page is read by walking the sort's index or by sorting the matching rows,
    /// whichever the estimate says passes less (`page_plan`).
    async fn binding_page_of(&self, query: &BindingQuery, matched: Option<i64>) -> Result<Vec<BindingRow>> {
        let Some((filter, ranges, all_bound)) = self.binding_filter(query).await? else {
            return Ok(Vec::new());
        };
        let few_ranges = ranges.as_ref().is_some_and(|ranges| ranges.len() <= MAX_RANGE_BLOCKS);
        let all_bound = if ranges.is_some() { all_bound } else { self.list_ranges().await?.iter().map(|range| range.used_ips).sum() };
        let matched = match (matched, &ranges) {
            (Some(matched), _) => Some(matched),
            (None, Some(ranges)) if query.only_range_filters() => Some(ranges.iter().map(|range| range.used_ips).sum()),
            _ => None,
        };
        let shape = FilterShape {
            // a few ranges' blocks and an address filter are tests of the address key,
            // which every sort index holds; a filter on the sort's own column is in its index
            row_tests: query.username.as_ref().is_some_and(|_| query.sort != BindingSort::Username)
                || query.platform.as_ref().is_some_and(|_| query.sort != BindingSort::Platform)
                || query.client_hostname.as_ref().is_some_and(|_| query.sort != BindingSort::ClientHostname)
                || ((query.updated_after.is_some() || query.updated_before.is_some()) && query.sort != BindingSort::LastUpdated)
                || (ranges.is_some() && !few_ranges),
            narrowed_by_key: query.ip_keys.is_some() || few_ranges,
            narrowed_by_index: query.updated_after.is_some()
                || query.updated_before.is_some()
                || [("username", &query.username), ("hostname", &query.client_hostname)]
                    .iter()
                    .any(|(column, value)| value.as_deref().is_some_and(|needle| crate::device_search(self.backend, column, needle).is_some())),
        };
        let plan = if query.sort == BindingSort::RangeName {
            // no index holds range-name order
            if few_ranges { PagePlan::Sort } else { PagePlan::Planner }
        } else {
            match matched {
                Some(matched) => page_plan(query.offset, query.limit, matched, all_bound, shape),
                None => PagePlan::Planner,
            }
        };
        tracing::debug!(?plan, ?matched, all_bound, sort = ?query.sort, offset = query.offset, "bindings page plan");
        let sql = self.binding_select(&filter, query, plan);
        let statement = filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql)));
        let rows = match self.backend {
            crate::Backend::Sqlite => statement.fetch_all(&self.pool).await?,
            crate::Backend::Postgres => {
                // in one process: a page that walks an index up to its LIMIT, split over
                // parallel workers, waits for all of them in their ordered merge (156 ms
                // against 13 ms for a page limited to 11 ranges in username order,
                // 1,000,000 bindings, two cores); counts keep their parallel scans
                let mut transaction = self.pool.begin().await?;
                sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0").execute(&mut *transaction).await?;
                let rows = statement.fetch_all(&mut *transaction).await?;
                transaction.commit().await?;
                rows
            }
        };
        rows.iter().map(binding_from_row).collect()
    }

    /// Every matching binding, streamed in constant memory. SQLite reads chunks of
    /// 5,000 rows that it packs into one JSON value each, continuing from the last
    /// row's sort key (keyset), so a million rows cost 200 round trips instead of a
    /// million row hand-overs; PostgreSQL streams each part as one query through the
    /// typed driver. Range name and location come from the (few) ranges, not from a
    /// join per row.
    ///
    /// In address order and in range-name order the ranges split the work: all of a
    /// range's rows follow each other, so each range is a part, and the next ranges
    /// are read while one is sent (two or three at a time, each at most one chunk
    /// ahead, so memory stays bounded). Range-name order needs no sort of all rows.
    pub async fn stream_bindings(&self, query: &BindingQuery) -> Result<BoxStream<'static, Result<BindingRow>>> {
        let Some((filter, matching, _)) = self.binding_filter(query).await? else {
            return Ok(futures_util::stream::empty().boxed());
        };
        // the rows come only from these ranges: the matching ones, or every range
        let ranges_in_play = match matching {
            Some(ranges) => ranges,
            None => self.list_ranges().await?,
        };
        // the parts read one after the other: in address order and in range-name order
        // each range is a part (ranges do not overlap, and in both orders all of a
        // range's rows follow each other, in address order), otherwise everything at once
        let mut query = query.clone();
        type Part = Option<(String, [u8; 17], [u8; 17])>;
        let (parts, parts_ahead): (Vec<Part>, usize) = if matches!(query.sort, BindingSort::Ip | BindingSort::RangeName) {
            // `list_ranges` gives the ranges in name order, as the database collates names
            let mut in_order: Vec<&RangeRow> = ranges_in_play.iter().collect();
            if query.sort == BindingSort::Ip {
                in_order.sort_by_key(|range| range.range.key_bounds().0);
            }
            if query.descending {
                in_order.reverse();
            }
            query.sort = BindingSort::Ip;
            let ahead = match self.backend {
                crate::Backend::Sqlite => EXPORT_RANGES_AHEAD_SQLITE,
                crate::Backend::Postgres => EXPORT_RANGES_AHEAD_POSTGRES,
            };
            let part = |range: &RangeRow| {
                let (first, last) = range.range.key_bounds();
                Some((range.id.clone(), first, last))
            };
            (in_order.into_iter().map(part).collect(), ahead)
        } else {
            (vec![None], 1)
        };
        let ranges: Arc<HashMap<String, (String, Option<Location>)>> = Arc::new(
            ranges_in_play
                .into_iter()
                .map(|range| {
                    let location = range.location.map(|location| Location { latitude: None, longitude: None, ..location });
                    (range.id, (range.name, location))
                })
                .collect(),
        );
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Vec<BindingRow>>>(4);
        let (pool, export_pool) = (self.pool.clone(), self.export_pool.clone());
        let chunk_rows = self.export_chunk.load(std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            let mut next = parts.into_iter();
            loop {
                while pending.len() < parts_ahead
                    && let Some(range_id) = next.next()
                {
                    // one reader per part, each at most one chunk ahead of the sender
                    let (part_sender, part_receiver) = tokio::sync::mpsc::channel::<Result<Vec<BindingRow>>>(1);
                    let mut part_filter = filter.clone();
                    if let Some((range_id, first, last)) = range_id {
                        part_filter.push(
                            "b.ip_key >= ? AND b.ip_key <= ? AND b.range_id = ?",
                            [FilterValue::Bytes(first.to_vec()), FilterValue::Bytes(last.to_vec()), FilterValue::Text(range_id)],
                        );
                    }
                    let (pool, export_pool, query, ranges) = (pool.clone(), export_pool.clone(), query.clone(), ranges.clone());
                    tokio::spawn(async move {
                        let part = ExportPart { filter: &part_filter, query: &query, ranges: &ranges, chunk_rows, sender: &part_sender };
                        let read = match &export_pool {
                            Some(export_pool) => export_rows_postgres(export_pool, &part).await,
                            None => export_chunks_sqlite(&pool, &part).await,
                        };
                        if let Err(error) = read {
                            let _ = part_sender.send(Err(error)).await;
                        }
                    });
                    pending.push_back(part_receiver);
                }
                let Some(mut current) = pending.pop_front() else { return };
                while let Some(chunk) = current.recv().await {
                    let failed = chunk.is_err();
                    if sender.send(chunk).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) });
        Ok(chunks
            .flat_map(|chunk| match chunk {
                Ok(rows) => futures_util::stream::iter(rows.into_iter().map(Ok).collect::<Vec<_>>()),
                Err(error) => futures_util::stream::iter(vec![Err(error)]),
            })
            .boxed())
    }

    /// The key of a range's `n`-th bound address (0-based) in address order, through
    /// the primary key between the range's first and last address keys.
    pub async fn nth_bound_key(&self, range_id: &str, n: i64, descending: bool) -> Result<Option<[u8; 17]>> {
        let direction = if descending { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT ip_key FROM bindings WHERE {} AND device_id IS NOT NULL ORDER BY ip_key {direction} LIMIT 1 OFFSET $2",
            crate::range_rows("", "$1")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(range_id).bind(n.max(0)).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let key: Vec<u8> = row.try_get(0)?;
        Ok(Some(key.try_into().map_err(|_| StoreError::Corrupt("address key".into()))?))
    }

    /// Up to `limit` bound addresses of one range in address order, from `from` on
    /// (inclusive; downwards when `descending`).
    pub async fn range_page(&self, range_id: &str, from: [u8; 17], descending: bool, limit: i64) -> Result<Vec<BindingRow>> {
        let (compare, direction) = if descending { ("<=", "DESC") } else { (">=", "ASC") };
        let sql = format!(
            "SELECT {BINDING_COLUMNS} FROM bindings b JOIN ip_ranges r ON r.id = b.range_id \
             WHERE {} AND b.ip_key {compare} $2 AND b.device_id IS NOT NULL ORDER BY b.ip_key {direction} LIMIT {}",
            crate::range_rows("b", "$1"),
            limit.max(0)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(range_id).bind(from.to_vec()).fetch_all(&self.pool).await?;
        rows.iter().map(binding_from_row).collect()
    }

    pub async fn get_binding(&self, ip_key: &[u8; 17]) -> Result<BindingRow> {
        let sql = format!("SELECT {BINDING_COLUMNS} FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE b.ip_key = $1 AND b.device_id IS NOT NULL");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ip_key.to_vec()).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        binding_from_row(&row)
    }

    /// The binding of a device, if it has one.
    pub async fn binding_of_device(&self, device_id: &str) -> Result<Option<BindingRow>> {
        let sql = format!("SELECT {BINDING_COLUMNS} FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE b.device_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(device_id).fetch_optional(&self.pool).await?;
        row.as_ref().map(binding_from_row).transpose()
    }

    /// Releases a bound address into quarantine. Returns the released binding.
    pub async fn release_binding(&self, ip_key: &[u8; 17], audit: impl FnOnce(&BindingRow) -> AuditEntry) -> Result<BindingRow> {
        let mut tx = self.write().await?;
        let sql = format!("SELECT {BINDING_COLUMNS} FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE b.ip_key = $1 AND b.device_id IS NOT NULL");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ip_key.to_vec()).fetch_optional(&mut *tx.transaction).await?.ok_or(StoreError::NotFound)?;
        let binding = binding_from_row(&row)?;
        release_in(&mut tx.transaction, ip_key, &binding.range_id, ReleaseReason::AdminRelease).await?;
        crate::audit::record(&mut tx.transaction, audit(&binding)).await?;
        tx.commit().await?;
        Ok(binding)
    }

    /// Everything the allocation engine needs, read in one pass over the bindings.
    pub async fn engine_snapshot(&self) -> Result<EngineSnapshot> {
        let ranges = self.list_ranges().await?;
        let mut snapshot = EngineSnapshot { ranges, ..EngineSnapshot::default() };
        // a few ranges at a time: the database reads one while the server decodes another
        let mut reads =
            futures_util::stream::iter(snapshot.ranges.iter().map(|range| async move { (range.id.clone(), self.range_addresses(&range.id).await) }))
                .buffer_unordered(4);
        while let Some((range_id, addresses)) = reads.next().await {
            let (bound, quarantined) = addresses?;
            snapshot.bound.insert(range_id.clone(), bound);
            snapshot.quarantined.insert(range_id, quarantined);
        }
        drop(reads);
        Ok(snapshot)
    }

    /// Bound and quarantined addresses of one range (start-up, and rebuilding the engine
    /// after an edit). Read in chunks of 100,000 that the database packs into one text
    /// value each (`hex key[:released_at]`, comma-separated), continuing after the
    /// highest key of the chunk: a million addresses cost ten round trips.
    pub async fn range_addresses(&self, range_id: &str) -> Result<(Vec<u128>, Vec<(u128, i64)>)> {
        let chunk = self.export_chunk.load(std::sync::atomic::Ordering::Relaxed).saturating_mul(20);
        let sql = match self.backend {
            crate::Backend::Sqlite => format!(
                "SELECT group_concat(item, ',') FROM (SELECT hex(ip_key) || COALESCE(':' || released_at, '') AS item FROM bindings WHERE {} AND ip_key > $2 ORDER BY ip_key LIMIT {chunk})",
                crate::range_rows("", "$1")
            ),
            crate::Backend::Postgres => format!(
                "SELECT string_agg(item, ',') FROM (SELECT encode(ip_key, 'hex') || COALESCE(':' || released_at::text, '') AS item FROM bindings WHERE {} AND ip_key > $2 ORDER BY ip_key LIMIT {chunk}) c",
                crate::range_rows("", "$1")
            ),
        };
        let mut bound = Vec::new();
        let mut quarantined = Vec::new();
        let mut after: Vec<u8> = Vec::new();
        loop {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(range_id).bind(after.as_slice()).fetch_one(&self.pool).await?;
            let Some(text) = row.try_get::<Option<String>, _>(0)? else { break };
            let mut count = 0usize;
            let mut highest: Option<Vec<u8>> = None;
            for item in text.split(',') {
                let (hex, released_at) = match item.split_once(':') {
                    Some((hex, released_at)) => (hex, Some(released_at.parse::<i64>().map_err(|_| StoreError::Corrupt("released_at".into()))?)),
                    None => (item, None),
                };
                let key = decode_hex(hex).ok_or_else(|| StoreError::Corrupt("address key".into()))?;
                let (_, value) = address_from_key(&key).ok_or_else(|| StoreError::Corrupt("address key".into()))?;
                match released_at {
                    Some(released_at) => quarantined.push((value, released_at)),
                    None => bound.push(value),
                }
                if highest.as_ref().is_none_or(|highest| key > *highest) {
                    highest = Some(key);
                }
                count += 1;
            }
            match highest {
                Some(highest) if count == chunk => after = highest,
                _ => break,
            }
        }
        Ok((bound, quarantined))
    }

    /// The old row-by-row reader, kept for its test: both must agree.
    #[doc(hidden)]
    pub async fn range_addresses_by_row(&self, range_id: &str) -> Result<(Vec<u128>, Vec<(u128, i64)>)> {
        let sql = format!("SELECT ip_key, released_at FROM bindings WHERE {}", crate::range_rows("", "$1"));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(range_id).fetch_all(&self.pool).await?;
        let mut bound = Vec::new();
        let mut quarantined = Vec::new();
        for row in rows {
            let key: Vec<u8> = row.try_get(0)?;
            let released_at: Option<i64> = row.try_get(1)?;
            let (_, value) = address_from_key(&key).ok_or_else(|| StoreError::Corrupt("address key".into()))?;
            match released_at {
                Some(released_at) => quarantined.push((value, released_at)),
                None => bound.push(value),
            }
        }
        Ok((bound, quarantined))
    }

    /// Checks the maintained counters against the rows (consistency checks and tests).
    pub async fn verify_counters(&self) -> Result<Vec<(String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT r.id, r.used_ips, (SELECT COUNT(*) FROM bindings b WHERE b.ip_key BETWEEN r.first_key AND r.last_key AND b.range_id = r.id AND b.device_id IS NOT NULL) AS counted FROM ip_ranges r",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut mismatches = Vec::new();
        for row in rows {
            let (id, used, counted): (String, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if used != counted {
                mismatches.push((id, used, counted));
            }
        }
        Ok(mismatches)
    }
}

/// Ranges read at once by an export in address order. SQLite reads in the server
/// process (each read connection fills a page cache of its own, up to 8 MiB), so
/// two; PostgreSQL does its part in its own processes, so three.
const EXPORT_RANGES_AHEAD_SQLITE: usize = 2;
const EXPORT_RANGES_AHEAD_POSTGRES: usize = 3;

/// Up to this many ranges in a filter also narrow the rows by their address blocks.
const MAX_RANGE_BLOCKS: usize = 32;

/// A substring needle found in this many devices or more is tested on the rows
/// instead of narrowed by the trigram index (each candidate costs a lookup in the
/// devices and one in the bindings, about 2 µs on SQLite).
const SEARCH_CANDIDATES_MAX: i64 = 20_000;

/// From this many rows to skip on, a page is found before its rows are read.
const DEFERRED_JOIN_OFFSET: i64 = 200;

/// How a page of a listing is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PagePlan {
    /// as the database's planner chooses (nothing known to estimate from)
    Planner,
    /// walk the sort's index from the page's near end, testing each entry
    Walk,
    /// read the matching rows through the filter's narrowest index and sort them
    Sort,
}

/// What a filter costs on each path.
#[derive(Clone, Copy, Debug, Default)]
struct FilterShape {
    /// some condition needs a column the sort's index does not hold (a row read per walked entry)
    row_tests: bool,
    /// the matching rows lie within key bounds (an address filter, a few ranges' blocks)
    narrowed_by_key: bool,
    /// another index names candidates (last-updated window, trigram search)
    narrowed_by_index: bool,
}

/// The sort's own index, which a walk names on SQLite (none for address order: the
/// primary key is the table).
fn sort_index(sort: BindingSort) -> Option<&'static str> {
    match sort {
        BindingSort::Username => Some("bindings_username"),
        BindingSort::Platform => Some("bindings_platform"),
        BindingSort::ClientHostname => Some("bindings_hostname"),
        BindingSort::LastUpdated => Some("bindings_updated"),
        BindingSort::Ip | BindingSort::RangeName => None,
    }
}

/// Costs in µs per entry or row (SQLite 3.51 with 1,000,000 bindings, docs/benchmarks.md,
/// issue 23): an index entry walked and tested on its own columns, one walked with a row
/// read to test it, a row read through key bounds and sorted, one read through another
/// index and sorted, one read by a full scan.
const WALK_ENTRY_US: f64 = 0.25;
const WALK_ROW_US: f64 = 2.0;
const SORT_KEYED_ROW_US: f64 = 0.6;
const SORT_INDEXED_ROW_US: f64 = 2.0;
const SCAN_ROW_US: f64 = 0.4;

/// How to read a page of `limit` rows at `offset` (counted from the end it is read
/// from) when `matched` of all `all` bound addresses pass the filter: walking the
/// sort's index passes about (offset + limit) × all ÷ matched entries; sorting reads
/// the matching rows through the narrowest index the filter has (or every row) and
/// sorts them. The cheaper estimate wins. Exports (no limit) stream in index order.
fn page_plan(offset: i64, limit: i64, matched: i64, all: i64, shape: FilterShape) -> PagePlan {
    if limit <= 0 {
        return PagePlan::Planner;
    }
    if matched <= 0 {
        return PagePlan::Sort;
    }
    let (offset, limit, matched, all) = (offset.max(0) as f64, limit as f64, matched as f64, all.max(matched) as f64);
    let walked = ((offset + limit) * all / matched).min(all);
    let walk = walked * if shape.row_tests { WALK_ROW_US } else { WALK_ENTRY_US };
    let sort = if shape.narrowed_by_key {
        matched * SORT_KEYED_ROW_US
    } else if shape.narrowed_by_index {
        matched * SORT_INDEXED_ROW_US
    } else {
        all * SCAN_ROW_US + matched * SORT_KEYED_ROW_US
    };
    if sort < walk { PagePlan::Sort } else { PagePlan::Walk }
}

/// Where a deep page of `limit` rows at `offset` in `total` rows starts when read
/// from the other end, and how many rows it has: `Some` only when that skips fewer
/// rows than reading it as asked (the page lies in the far half).
fn from_the_other_end(offset: i64, limit: i64, total: i64) -> Option<(i64, i64)> {
    if limit <= 0 || offset < DEFERRED_JOIN_OFFSET || offset >= total {
        return None;
    }
    let end = offset.saturating_add(limit).min(total);
    let (reversed_offset, rows) = (total - end, end - offset);
    (reversed_offset < offset).then_some((reversed_offset, rows))
}

/// One part of an export: which rows, in which order, and where they go.
#[derive(Clone, Copy)]
struct ExportPart<'a> {
    filter: &'a Filter,
    query: &'a BindingQuery,
    /// name and location of every range, by id
    ranges: &'a HashMap<String, (String, Option<Location>)>,
    chunk_rows: usize,
    sender: &'a tokio::sync::mpsc::Sender<Result<Vec<BindingRow>>>,
}

/// The column a part of an export is ordered by before the address key: none in
/// address order, and none in range-name order, where every part is one range.
fn export_sort_column(sort: BindingSort) -> Option<&'static str> {
    match sort {
        BindingSort::Ip | BindingSort::RangeName => None,
        BindingSort::Username => Some("b.username"),
        BindingSort::Platform => Some("b.platform"),
        BindingSort::ClientHostname => Some("b.client_hostname"),
        BindingSort::LastUpdated => Some("b.last_updated"),
    }
}

/// An SQLite export part in chunks of `chunk_rows` rows, each packed by the database
/// into one JSON value and continued from the last row's sort key (keyset).
async fn export_chunks_sqlite(pool: &sqlx::AnyPool, part: &ExportPart<'_>) -> Result<()> {
    let ExportPart { filter, query, ranges, chunk_rows, sender } = *part;
    let (direction, comparison) = if query.descending { ("DESC", "<") } else { ("ASC", ">") };
    let column = export_sort_column(query.sort);
    let order = match column {
        Some(column) => format!("{column} {direction}, b.ip_key {direction}"),
        None => format!("b.ip_key {direction}"),
    };
    let sort_value = column.unwrap_or("NULL");
    let mut cursor: Option<(Value, Vec<u8>)> = None;
    loop {
        let mut chunk_filter = filter.clone();
        if let Some((value, key)) = &cursor {
            let value = match value {
                Value::Number(number) => FilterValue::Int(number.as_i64().unwrap_or(0)),
                Value::String(text) => FilterValue::Text(text.clone()),
                _ => FilterValue::Text(String::new()),
            };
            match column {
                Some(column) => chunk_filter.push(&format!("({column}, b.ip_key) {comparison} (?, ?)"), [value, FilterValue::Bytes(key.clone())]),
                None => chunk_filter.push(&format!("b.ip_key {comparison} ?"), [FilterValue::Bytes(key.clone())]),
            }
        }
        // SQLite feeds the aggregate in the subquery's order (a co-routine over the
        // ordered, limited scan); the export test checks the order across chunks
        let sql = format!(
            "SELECT json_group_array(json_array(c.ip, c.range_id, c.device_id, c.username, c.platform, c.client_hostname, c.last_updated, hex(c.ip_key), c.sort_value)) \
             FROM (SELECT b.*, {sort_value} AS sort_value FROM bindings b{} ORDER BY {order} LIMIT {chunk_rows}) c",
            chunk_filter.sql()
        );
        let row = chunk_filter.bind(sqlx::query(sqlx::AssertSqlSafe(sql))).fetch_one(pool).await?;
        let Some(text) = row.try_get::<Option<String>, _>(0)? else { return Ok(()) };
        let chunk: Vec<ExportCells> = serde_json::from_str(&text).map_err(|error| StoreError::Corrupt(format!("export chunk: {error}")))?;
        let count = chunk.len();
        let Some(last) = chunk.last() else { return Ok(()) };
        let key = decode_hex(&last.7).ok_or_else(|| StoreError::Corrupt("export cursor".into()))?;
        cursor = Some((last.8.clone(), key));
        let rows = chunk
            .into_iter()
            .map(|(ip, range_id, device_id, username, platform, client_hostname, last_updated, _, _)| {
                export_row(ranges, (ip, range_id, device_id, username, platform, client_hostname, last_updated))
            })
            .collect();
        if sender.send(Ok(rows)).await.is_err() || count < chunk_rows {
            return Ok(());
        }
    }
}

/// A row of an export with its range's name and location.
fn export_row(ranges: &HashMap<String, (String, Option<Location>)>, cells: ExportRow) -> BindingRow {
    let (ip, range_id, device_id, username, platform, client_hostname, last_updated) = cells;
    let (range_name, range_location) = ranges.get(&range_id).cloned().unwrap_or_default();
    BindingRow {
        ip,
        range_id,
        range_name,
        range_location,
        device_id: device_id.unwrap_or_default(),
        username: username.unwrap_or_default(),
        platform: platform.unwrap_or_default(),
        client_hostname: client_hostname.unwrap_or_default(),
        last_updated,
    }
}

/// A PostgreSQL export part as one query whose rows stream as the CSV is sent: the
/// server sends rows as fast as the connection takes them (no keyset round trips,
/// no JSON packing), and the typed driver decodes them from the wire format. The
/// channel (one chunk of `chunk_rows` rows) and the socket bound what is ahead.
async fn export_rows_postgres(pool: &sqlx::PgPool, part: &ExportPart<'_>) -> Result<()> {
    let ExportPart { filter, query, ranges, chunk_rows, sender } = *part;
    let direction = if query.descending { "DESC" } else { "ASC" };
    let order = match export_sort_column(query.sort) {
        Some(column) => format!("{column} {direction}, b.ip_key {direction}"),
        None => format!("b.ip_key {direction}"),
    };
    let sql = format!(
        "SELECT b.ip, b.range_id, b.device_id, b.username, b.platform, b.client_hostname, b.last_updated FROM bindings b{} ORDER BY {order}",
        filter.sql()
    );
    let typed = filter.bind(sqlx::query::<sqlx::Postgres>(sqlx::AssertSqlSafe(sql)));
    let mut rows = typed.try_map(|row: sqlx::postgres::PgRow| <ExportRow as sqlx::FromRow<_>>::from_row(&row)).fetch(pool);
    let chunk_rows = chunk_rows.min(STREAMED_CHUNK_ROWS);
    let mut chunk = Vec::with_capacity(chunk_rows);
    while let Some(row) = rows.next().await {
        chunk.push(export_row(ranges, row?));
        if chunk.len() == chunk_rows && sender.send(Ok(std::mem::replace(&mut chunk, Vec::with_capacity(chunk_rows)))).await.is_err() {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        let _ = sender.send(Ok(chunk)).await;
    }
    Ok(())
}

/// Rows handed on at once from a streamed PostgreSQL export: no round trip per
/// chunk, so small chunks cost nothing and keep what waits in channels small.
const STREAMED_CHUNK_ROWS: usize = 1000;

/// One exported row from PostgreSQL: ip, range id, device id, username, platform,
/// client hostname, last update.
type ExportRow = (String, String, Option<String>, Option<String>, Option<String>, Option<String>, i64);

/// One exported row as the database packs it: ip, range id, device id, username,
/// platform, client hostname, last update, address key in hex, sort value.
type ExportCells = (String, String, Option<String>, Option<String>, Option<String>, Option<String>, i64, String, Value);

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok()).collect()
}

/// Releases one bound address into quarantine, in the caller's transaction: the
/// binding becomes a quarantine row, its range's counter goes down, and its
/// history interval closes with `reason` — every release passes here, so none goes
/// unrecorded. The device's live sessions go with it: the replica holding one sees
/// its row gone and disconnects the agent, which comes back for a new address.
pub(crate) async fn release_in(connection: &mut sqlx::AnyConnection, ip_key: &[u8; 17], range_id: &str, reason: ReleaseReason) -> Result<()> {
    let now = now_micros();
    sqlx::query("DELETE FROM client_sessions WHERE device_id = (SELECT device_id FROM bindings WHERE ip_key = $1)")
        .bind(ip_key.to_vec())
        .execute(&mut *connection)
        .await?;
    let released = sqlx::query(
        "UPDATE bindings SET device_id = NULL, username = NULL, platform = NULL, client_hostname = NULL, released_at = $2, last_updated = $2 WHERE ip_key = $1 AND device_id IS NOT NULL",
    )
    .bind(ip_key.to_vec())
    .bind(now)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if released > 0 {
        sqlx::query("UPDATE ip_ranges SET used_ips = used_ips - 1 WHERE id = $1").bind(range_id).execute(&mut *connection).await?;
        crate::history::close_in(connection, ip_key, reason, now).await?;
    }
    Ok(())
}

impl Store {
    /// Releases the bindings of devices last seen before `cutoff` that have no live
    /// session (a connected device is never idle); returns (range id, address value) of each.
    pub async fn release_idle(&self, cutoff: i64) -> Result<Vec<(String, u128)>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "SELECT b.ip_key, b.range_id FROM bindings b JOIN devices d ON d.id = b.device_id \
             WHERE d.last_seen < $1 AND NOT EXISTS (SELECT 1 FROM client_sessions s WHERE s.device_id = d.id) LIMIT 10000",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx.transaction)
        .await?;
        let mut released = Vec::with_capacity(rows.len());
        for row in rows {
            let key: Vec<u8> = row.try_get(0)?;
            let range_id: String = row.try_get(1)?;
            let key: [u8; 17] = key.as_slice().try_into().map_err(|_| StoreError::Corrupt("address key".into()))?;
            let (_, value) = address_from_key(&key).ok_or_else(|| StoreError::Corrupt("address key".into()))?;
            release_in(&mut tx.transaction, &key, &range_id, ReleaseReason::IdleTtl).await?;
            released.push((range_id, value));
        }
        if !released.is_empty() {
            crate::audit::record(
                &mut tx.transaction,
                AuditEntry {
                    actor: "system".into(),
                    action: "release_idle".into(),
                    resource_type: "ip_binding".into(),
                    resource_id: "*".into(),
                    after: Some(serde_json::json!({"released": released.len()})),
                    ..AuditEntry::default()
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::from_the_other_end;

    #[test]
    fn a_page_walks_or_sorts_whichever_passes_less() {
        use super::{FilterShape, PagePlan, page_plan};
        let ranges = FilterShape { narrowed_by_key: true, ..FilterShape::default() };
        // 11 ranges of 5,000 among 1,000,000: the first pages walk the index, deep ones sort
        assert_eq!(page_plan(0, 50, 55_000, 1_000_000, ranges), PagePlan::Walk);
        assert_eq!(page_plan(4_450, 50, 55_000, 1_000_000, ranges), PagePlan::Walk, "about 82,000 entries walked against 55,000 rows sorted");
        assert_eq!(page_plan(10_000, 50, 55_000, 1_000_000, ranges), PagePlan::Sort);
        // one small range: sorting its rows beats walking past the others' from page 2 on
        assert_eq!(page_plan(0, 10, 5_000, 1_000_000, ranges), PagePlan::Walk);
        assert_eq!(page_plan(50, 50, 5_000, 1_000_000, ranges), PagePlan::Sort);
        // the ranges hold every row: the index order is the rows' order
        assert_eq!(page_plan(900_000, 50, 1_000_000, 1_000_000, ranges), PagePlan::Walk);
        // a trigram-narrowed username matching 225 rows, in last-update order: sorted at once
        let searched = FilterShape { row_tests: true, narrowed_by_index: true, ..FilterShape::default() };
        assert_eq!(page_plan(0, 50, 225, 1_000_000, searched), PagePlan::Sort);
        // a platform (no index narrows it) matching 40 %: walked, even deep (a scan reads everything)
        let scanned = FilterShape { row_tests: true, ..FilterShape::default() };
        assert_eq!(page_plan(0, 50, 400_000, 1_000_000, scanned), PagePlan::Walk);
        assert_eq!(page_plan(150_000, 50, 400_000, 1_000_000, scanned), PagePlan::Sort);
        // exports, empty matches and absurd values
        assert_eq!(page_plan(0, 0, 5_000, 1_000_000, ranges), PagePlan::Planner);
        assert_eq!(page_plan(100, 50, 0, 1_000_000, ranges), PagePlan::Sort);
        assert_eq!(page_plan(i64::MAX, i64::MAX, 1, i64::MAX, ranges), PagePlan::Sort);
    }

    #[test]
    fn far_pages_are_read_from_the_other_end() {
        // shallow pages, and pages in the near half, are read as asked
        assert_eq!(from_the_other_end(150, 50, 416), None);
        assert_eq!(from_the_other_end(499_950, 50, 1_000_000), None, "the middle page skips as much either way");
        // the far half: the same rows from the other end
        assert_eq!(from_the_other_end(200, 50, 416), Some((166, 50)));
        assert_eq!(from_the_other_end(500_000, 50, 1_000_000), Some((499_950, 50)));
        assert_eq!(from_the_other_end(999_950, 50, 1_000_000), Some((0, 50)));
        // a last, partial page holds only the rows that are left
        assert_eq!(from_the_other_end(400, 50, 416), Some((0, 16)));
        // past the end, exports (no limit) and absurd values: as asked
        assert_eq!(from_the_other_end(416, 50, 416), None);
        assert_eq!(from_the_other_end(300, 0, 416), None);
        assert_eq!(from_the_other_end(i64::MAX - 1, 1000, i64::MAX), Some((0, 1)));
        assert_eq!(from_the_other_end(i64::MAX - 10, 1000, i64::MAX), Some((0, 10)));
    }
}
