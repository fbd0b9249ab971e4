//! The bindings listing's in-memory index (issue 23): every bound address with the
//! columns the listing filters and sorts on, answering any filter with any order and
//! any page in one pass over the rows — exact, with the same rows in the same order as
//! `SELECT … ORDER BY <column>, ip_key` over the whole table.
//!
//! Pure: no I/O. The store's feed (`listing::feed`) loads it and applies each change
//! the database records; the listing asks it which rows a page holds.
//!
//! Text columns (username, platform, client hostname) are interned in a
//! [`Dictionary`] per column: one entry per distinct value, with an **order code** —
//! a `u64` that sorts as the text sorts (bytewise, like SQLite's `BINARY` and
//! PostgreSQL's `"C"` collation, which migration 19 gives these columns). A new value
//! takes the midpoint between its neighbours' codes, and the whole dictionary is
//! relabelled, evenly spaced, on the rare insert that finds no gap. Sorting a million
//! rows then compares integers, never strings, and a substring filter tests each
//! distinct value once, not each row.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use search::{Searches, SlotSet};

mod search;

/// A binding's primary key: the address family byte and the 16-byte address value.
pub type Key = [u8; 17];

/// How text filters fold case: the database's `lower()` — ASCII letters only on SQLite,
/// every cased letter on PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    Ascii,
    Unicode,
}

impl Fold {
    pub fn apply(self, text: &str) -> String {
        match self {
            Fold::Ascii => text.to_ascii_lowercase(),
            Fold::Unicode => text.to_lowercase(),
        }
    }
}

/// The orders of the listing (API.md): address, or a column then the address — the
/// store's own enum, a plain value.
pub use crate::bindings::BindingSort as Order;

struct Entry {
    text: Arc<str>,
    code: u64,
    refs: u32,
    /// where its folded text is in the arena (an index into `spans`)
    span: u32,
}

/// The distinct values of one text column, each with its order code. The folded
/// texts also sit one after another in an arena (each ended by a NUL), so a
/// substring filter is one SIMD search over the arena, not a pointer chase per value.
pub struct Dictionary {
    by_text: BTreeMap<Arc<str>, u32>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    fold: Fold,
    relabels: u64,
    arena: Vec<u8>,
    /// per text in the arena, in arena order: where it starts and its slot (`DEAD` once removed)
    spans: Vec<(u32, u32)>,
    /// bytes of the arena that belong to removed values
    garbage: usize,
    /// substring answers kept for the next listings, updated as values come and go
    searches: Searches,
}

const DEAD: u32 = u32::MAX;

/// The step between codes at either end: appending values in order (hostnames that
/// count up) takes a fixed step instead of halving the last gap each time.
const END_STEP: u64 = 1 << 32;

impl Dictionary {
    fn new(fold: Fold) -> Dictionary {
        Dictionary {
            by_text: BTreeMap::new(),
            entries: Vec::new(),
            free: Vec::new(),
            fold,
            relabels: 0,
            arena: Vec::new(),
            spans: Vec::new(),
            garbage: 0,
            searches: Searches::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_text.is_empty()
    }

    fn append_to_arena(&mut self, slot: u32, folded: &str) -> u32 {
        self.spans.push((self.arena.len() as u32, slot));
        self.arena.extend_from_slice(folded.as_bytes());
        self.arena.push(0);
        (self.spans.len() - 1) as u32
    }

    /// The slot of `text`, one more reference to it; a new value gets a code between its
    /// neighbours' (`labelled` false: no code yet, the caller relabels once at the end).
    /// Whether the dictionary was relabelled (every code changed) comes second.
    fn intern(&mut self, text: &str, labelled: bool) -> (u32, bool) {
        if let Some(&slot) = self.by_text.get(text) {
            self.entries[slot as usize].refs += 1;
            return (slot, false);
        }
        if self.arena.len() + text.len() * 4 + 1 >= u32::MAX as usize {
            self.compact();
        }
        let shared: Arc<str> = Arc::from(text);
        let entry = Entry { text: shared.clone(), code: 0, refs: 1, span: 0 };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize] = entry;
                slot
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        let folded = self.fold.apply(text);
        self.entries[slot as usize].span = self.append_to_arena(slot, &folded);
        self.searches.update(slot, Some(&folded));
        let mut relabelled = false;
        if labelled {
            use std::ops::Bound::{Excluded, Unbounded};
            let before = self.by_text.range::<str, _>((Unbounded, Excluded(text))).next_back().map(|(_, &slot)| self.entries[slot as usize].code);
            let after = self.by_text.range::<str, _>((Excluded(text), Unbounded)).next().map(|(_, &slot)| self.entries[slot as usize].code);
            let code = match (before, after) {
                (None, None) => Some(u64::MAX / 2),
                (Some(low), None) => low.checked_add(END_STEP).or_else(|| (u64::MAX - low >= 2).then(|| low + (u64::MAX - low) / 2)),
                (None, Some(high)) => high.checked_sub(END_STEP).or_else(|| (high >= 2).then_some(high / 2)),
                (Some(low), Some(high)) => (high - low >= 2).then(|| low + (high - low) / 2),
            };
            self.by_text.insert(shared, slot);
            match code {
                Some(code) => self.entries[slot as usize].code = code,
                None => {
                    self.relabel();
                    relabelled = true;
                }
            }
        } else {
            self.by_text.insert(shared, slot);
        }
        (slot, relabelled)
    }

    fn release(&mut self, slot: u32) {
        let entry = &mut self.entries[slot as usize];
        entry.refs -= 1;
        if entry.refs == 0 {
            let text = std::mem::replace(&mut entry.text, Arc::from(""));
            let span = entry.span as usize;
            self.spans[span].1 = DEAD;
            let end = self.spans.get(span + 1).map_or(self.arena.len(), |next| next.0 as usize);
            self.garbage += end - self.spans[span].0 as usize;
            self.by_text.remove(&*text);
            self.free.push(slot);
            self.searches.update(slot, None);
            if self.garbage > COMPACT_AFTER && self.garbage * 2 > self.arena.len() {
                self.compact();
            }
        }
    }

    /// Rewrites the arena with the live values only.
    fn compact(&mut self) {
        let old_arena = std::mem::take(&mut self.arena);
        let old_spans = std::mem::take(&mut self.spans);
        for (index, &(start, slot)) in old_spans.iter().enumerate() {
            if slot == DEAD {
                continue;
            }
            // the value's bytes and its NUL
            let end = old_spans.get(index + 1).map_or(old_arena.len(), |next| next.0 as usize);
            self.spans.push((self.arena.len() as u32, slot));
            self.arena.extend_from_slice(&old_arena[start as usize..end]);
            self.entries[slot as usize].span = (self.spans.len() - 1) as u32;
        }
        self.garbage = 0;
    }

    /// Codes evenly spaced over the whole `u64` range, in text order.
    fn relabel(&mut self) {
        let step = u64::MAX / (self.by_text.len() as u64 + 1);
        for (index, &slot) in self.by_text.values().enumerate() {
            self.entries[slot as usize].code = step * (index as u64 + 1);
        }
        self.relabels += 1;
    }

    pub fn text(&self, slot: u32) -> &str {
        &self.entries[slot as usize].text
    }

    fn code(&self, slot: u32) -> u64 {
        self.entries[slot as usize].code
    }

    /// The live values that contain `needle` (already folded): a kept answer, or one
    /// search of the arena, kept for the next listings.
    fn containing(&self, needle: &str) -> Arc<SlotSet> {
        if let Some(kept) = self.searches.get(needle) {
            return kept;
        }
        let matching = Arc::new(search::search(&self.arena, &self.spans, needle.as_bytes(), self.entries.len()));
        self.searches.keep(needle, matching.clone(), self.len());
        matching
    }

    /// How many substring answers are kept (for tests).
    pub fn searches_kept(&self) -> usize {
        self.searches.len()
    }

    /// How many times the dictionary was relabelled (for tests and the debug log).
    pub fn relabels(&self) -> u64 {
        self.relabels
    }
}

/// A bound address as the feed reads it from the database.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexedRow {
    pub key: Key,
    pub range_id: String,
    pub device_id: String,
    pub username: String,
    pub platform: String,
    pub client_hostname: String,
    pub last_updated: i64,
}

/// What a listing asks.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// the ranges the rows may be in (ids), `None` for all
    pub ranges: Option<Vec<String>>,
    /// every range id in range-name order (for `Order::RangeName`)
    pub range_order: Vec<String>,
    /// inclusive key bounds
    pub ip: Option<(Key, Key)>,
    /// substrings, as typed (folded here)
    pub username: Option<String>,
    pub platform: Option<String>,
    pub client_hostname: Option<String>,
    /// exclusive bounds on the last update (µs)
    pub updated_after: Option<i64>,
    pub updated_before: Option<i64>,
    pub order: Option<Order>,
    pub descending: bool,
}

/// Rows in columns: a scan reads only the columns a query tests. Row `i` of every
/// column is the same binding; a removal moves the last row into the hole.
pub struct ListingIndex {
    keys: Vec<Key>,
    ranges: Vec<u32>,
    devices: Vec<Box<str>>,
    users: Vec<u32>,
    platforms: Vec<u32>,
    hosts: Vec<u32>,
    /// each row's order codes (its dictionary entries'), refreshed when one relabels:
    /// a sort reads them in row order instead of one dictionary entry per row
    user_codes: Vec<u64>,
    platform_codes: Vec<u64>,
    host_codes: Vec<u64>,
    updated: Vec<i64>,
    position: HashMap<Key, u32>,
    range_slots: HashMap<Box<str>, u32>,
    range_ids: Vec<Box<str>>,
    usernames: Dictionary,
    platform_names: Dictionary,
    hostnames: Dictionary,
    /// buffers of sort entries kept between listings: a million entries are 32 MB, and
    /// a fresh allocation each time cost more in page faults than the selection itself
    scratch: Scratch,
}

type Scratch = Arc<std::sync::Mutex<Vec<Vec<SortEntry>>>>;

fn take_scratch(scratch: &Scratch) -> Vec<SortEntry> {
    let mut entries = scratch.lock().ok().and_then(|mut pool| pool.pop()).unwrap_or_default();
    entries.clear();
    entries
}

fn give_back(scratch: &Scratch, entries: Vec<SortEntry>) {
    if let Ok(mut pool) = scratch.lock()
        && pool.len() < SCRATCH_BUFFERS
    {
        pool.push(entries);
    }
}

/// Pages within this many rows of either end are read by keeping the best candidates
/// while scanning, instead of collecting every match.
/// (Unit tests use a small value, so their few hundred rows reach every path.)
/// Scratch buffers kept (one per concurrent scan; the store allows one per core).
const SCRATCH_BUFFERS: usize = 4;

const NEAR_END: usize = if cfg!(test) { 20 } else { 10_000 };

/// Garbage in a dictionary's arena, past which (and past half the arena) it is rewritten.
const COMPACT_AFTER: usize = if cfg!(test) { 64 } else { 1 << 20 };

/// Which text column.
#[derive(Clone, Copy)]
enum Column {
    Username,
    Platform,
    Hostname,
}

/// A sort entry: the column's code, then the address (family, then value) — the
/// listing's order is the derived one, and the entry names its row's key itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SortEntry {
    code: u64,
    family: u8,
    value: u128,
}

impl SortEntry {
    fn key(&self) -> Key {
        let mut key = [0u8; 17];
        key[0] = self.family;
        key[1..].copy_from_slice(&self.value.to_be_bytes());
        key
    }
}

fn pack(key: &Key) -> u128 {
    let mut value = [0u8; 16];
    value.copy_from_slice(&key[1..]);
    u128::from_be_bytes(value)
}

impl ListingIndex {
    pub fn new(fold: Fold) -> ListingIndex {
        ListingIndex {
            keys: Vec::new(),
            ranges: Vec::new(),
            devices: Vec::new(),
            users: Vec::new(),
            platforms: Vec::new(),
            hosts: Vec::new(),
            user_codes: Vec::new(),
            platform_codes: Vec::new(),
            host_codes: Vec::new(),
            updated: Vec::new(),
            position: HashMap::new(),
            range_slots: HashMap::new(),
            range_ids: Vec::new(),
            usernames: Dictionary::new(fold),
            platform_names: Dictionary::new(fold),
            hostnames: Dictionary::new(fold),
            scratch: Scratch::default(),
        }
    }

    /// An index of `rows`, built at once (one relabel per dictionary at the end).
    pub fn build(fold: Fold, rows: impl IntoIterator<Item = IndexedRow>) -> ListingIndex {
        let mut index = ListingIndex::new(fold);
        for row in rows {
            index.put(row, false);
        }
        index.usernames.relabel();
        index.platform_names.relabel();
        index.hostnames.relabel();
        index.refresh_codes(Column::Username);
        index.refresh_codes(Column::Platform);
        index.refresh_codes(Column::Hostname);
        index
    }

    /// Prepares `buffers` scratch buffers for a sort of every row, touching their pages
    /// now rather than in the first listings' time.
    pub fn warm(&self, buffers: usize) {
        let filler = SortEntry { code: 0, family: 0, value: 0 };
        for _ in 0..buffers.min(SCRATCH_BUFFERS) {
            let mut entries = vec![filler; self.keys.len()];
            entries.iter_mut().for_each(|entry| entry.code = 1);
            give_back(&self.scratch, entries);
        }
    }

    /// Copies a dictionary's codes into its column after it relabelled.
    fn refresh_codes(&mut self, column: Column) {
        let (dictionary, slots, codes) = match column {
            Column::Username => (&self.usernames, &self.users, &mut self.user_codes),
            Column::Platform => (&self.platform_names, &self.platforms, &mut self.platform_codes),
            Column::Hostname => (&self.hostnames, &self.hosts, &mut self.host_codes),
        };
        for (code, &slot) in codes.iter_mut().zip(slots) {
            *code = dictionary.code(slot);
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn dictionaries(&self) -> [&Dictionary; 3] {
        [&self.usernames, &self.platform_names, &self.hostnames]
    }

    fn range_slot(&mut self, id: &str) -> u32 {
        if let Some(&slot) = self.range_slots.get(id) {
            return slot;
        }
        self.range_ids.push(id.into());
        let slot = (self.range_ids.len() - 1) as u32;
        self.range_slots.insert(id.into(), slot);
        slot
    }

    /// Inserts or replaces the row of `row.key`.
    pub fn upsert(&mut self, row: IndexedRow) {
        self.put(row, true);
    }

    fn put(&mut self, row: IndexedRow, labelled: bool) {
        self.remove(&row.key);
        let range = self.range_slot(&row.range_id);
        let (user, relabelled) = self.usernames.intern(&row.username, labelled);
        if relabelled {
            self.refresh_codes(Column::Username);
        }
        let (platform, relabelled) = self.platform_names.intern(&row.platform, labelled);
        if relabelled {
            self.refresh_codes(Column::Platform);
        }
        let (host, relabelled) = self.hostnames.intern(&row.client_hostname, labelled);
        if relabelled {
            self.refresh_codes(Column::Hostname);
        }
        self.position.insert(row.key, self.keys.len() as u32);
        self.keys.push(row.key);
        self.ranges.push(range);
        self.devices.push(row.device_id.into_boxed_str());
        self.users.push(user);
        self.platforms.push(platform);
        self.hosts.push(host);
        self.user_codes.push(self.usernames.code(user));
        self.platform_codes.push(self.platform_names.code(platform));
        self.host_codes.push(self.hostnames.code(host));
        self.updated.push(row.last_updated);
    }

    /// Removes the row of `key`, if it is there.
    pub fn remove(&mut self, key: &Key) {
        let Some(at) = self.position.remove(key) else {
            return;
        };
        let at = at as usize;
        self.usernames.release(self.users[at]);
        self.platform_names.release(self.platforms[at]);
        self.hostnames.release(self.hosts[at]);
        let last = self.keys.len() - 1;
        self.keys.swap_remove(at);
        self.ranges.swap_remove(at);
        self.devices.swap_remove(at);
        self.users.swap_remove(at);
        self.platforms.swap_remove(at);
        self.hosts.swap_remove(at);
        self.user_codes.swap_remove(at);
        self.platform_codes.swap_remove(at);
        self.host_codes.swap_remove(at);
        self.updated.swap_remove(at);
        if at != last {
            self.position.insert(self.keys[at], at as u32);
        }
    }

    /// The row of `key`.
    pub fn get(&self, key: &Key) -> Option<IndexedRow> {
        let at = *self.position.get(key)? as usize;
        Some(IndexedRow {
            key: self.keys[at],
            range_id: self.range_ids[self.ranges[at] as usize].to_string(),
            device_id: self.devices[at].to_string(),
            username: self.usernames.text(self.users[at]).to_string(),
            platform: self.platform_names.text(self.platforms[at]).to_string(),
            client_hostname: self.hostnames.text(self.hosts[at]).to_string(),
            last_updated: self.updated[at],
        })
    }

    /// The rows that match, how many, and the keys of rows `offset..offset + limit` in
    /// the selection's order (`limit` 0: all of them). A page near either end keeps
    /// only the best candidates while it scans; a page in the middle collects every
    /// match and selects its window (two linear-time selections, then a sort of the page).
    pub fn select(&self, selection: &Selection, offset: usize, limit: usize) -> (usize, Vec<Key>) {
        let Some(test) = self.test(selection) else {
            return (0, Vec::new());
        };
        let order = selection.order.unwrap_or(Order::Ip);
        let range_rank = self.range_ranks(selection);
        let descending = selection.descending;
        let to_key = |entries: &[SortEntry]| -> Vec<Key> { entries.iter().map(SortEntry::key).collect() };
        if limit > 0 && offset + limit <= NEAR_END {
            // one pass: the count and the first rows
            let (total, first) = self.first_rows(&test, order, &range_rank, descending, offset + limit);
            return (total, to_key(first.get(offset..).unwrap_or(&[])));
        }
        // every match collected (their count is the total), then the page's window selected
        let mut entries = take_scratch(&self.scratch);
        entries.reserve(self.keys.len());
        entries.extend((0..self.keys.len()).filter(|&at| test.passes(self, at)).map(|at| self.entry(order, &range_rank, at)));
        let answer = self.window(&mut entries, offset, limit, descending);
        give_back(&self.scratch, entries);
        answer
    }

    /// The total and the page's keys from every match's entry.
    fn window(&self, entries: &mut [SortEntry], offset: usize, limit: usize, descending: bool) -> (usize, Vec<Key>) {
        let to_key = |entries: &[SortEntry]| -> Vec<Key> { entries.iter().map(SortEntry::key).collect() };
        let total = entries.len();
        if offset >= total {
            return (total, Vec::new());
        }
        let end = if limit == 0 { total } else { (offset + limit).min(total) };
        let compare = |left: &SortEntry, right: &SortEntry| compare(descending, left, right);
        if limit == 0 {
            entries.sort_unstable_by(compare);
            return (total, to_key(&entries[offset..]));
        }
        if offset > 0 {
            entries.select_nth_unstable_by(offset, compare);
        }
        // the window's rows: the first `end - offset` of what follows the offset
        let mut best = Best::new(end - offset, descending);
        entries[offset..].iter().for_each(|entry| best.offer(*entry));
        (total, to_key(&best.sorted()))
    }

    /// Per range slot, its rank in range-name order.
    fn range_ranks(&self, selection: &Selection) -> Vec<u64> {
        let mut ranks = vec![u64::MAX; self.range_ids.len()];
        for (rank, id) in selection.range_order.iter().enumerate() {
            if let Some(&slot) = self.range_slots.get(id.as_str()) {
                ranks[slot as usize] = rank as u64;
            }
        }
        ranks
    }

    /// The sort entry of row `at`: equal entries are impossible (the address is unique).
    #[inline(always)]
    fn entry(&self, order: Order, range_rank: &[u64], at: usize) -> SortEntry {
        let key = &self.keys[at];
        let code = match order {
            Order::Ip => 0,
            Order::Username => self.user_codes[at],
            Order::Platform => self.platform_codes[at],
            Order::ClientHostname => self.host_codes[at],
            Order::RangeName => range_rank[self.ranges[at] as usize],
            // order-preserving: i64 to u64 with the sign bit flipped
            Order::LastUpdated => (self.updated[at] as u64) ^ (1 << 63),
        };
        SortEntry { code, family: key[0], value: pack(key) }
    }

    /// Every matching row, in an order read a chunk at a time (`Ordered::next_chunk`):
    /// the first chunk costs one selection over the matches, the rest batches of
    /// doubling size — an export's first byte does not wait for the whole sort.
    pub fn order_all(&self, selection: &Selection) -> Ordered {
        let mut ordered = Ordered { entries: Vec::new(), descending: selection.descending, next: 0, ordered: 0, scratch: self.scratch.clone(), pooled: false };
        let Some(test) = self.test(selection) else {
            return ordered;
        };
        let order = selection.order.unwrap_or(Order::Ip);
        let range_rank = self.range_ranks(selection);
        ordered.entries = take_scratch(&self.scratch);
        ordered.entries.reserve(self.keys.len());
        ordered.entries.extend((0..self.keys.len()).filter(|&at| test.passes(self, at)).map(|at| self.entry(order, &range_rank, at)));
        if ordered.entries.len() * 4 < ordered.entries.capacity() {
            // few matches: a copy of their own, and the scratch buffer goes back now rather
            // than when the export ends — an export held open (or whose client has gone
            // unnoticed) would otherwise keep a buffer the size of the index, and the next
            // listing would page-fault a fresh one in (tens of ms)
            let few = ordered.entries.to_vec();
            give_back(&self.scratch, std::mem::replace(&mut ordered.entries, few));
        } else {
            ordered.pooled = true;
        }
        ordered
    }

    /// How many rows match, and the first `count` of them in the order, sorted. A
    /// buffer keeps the best candidates: cut back to `count` each time it fills, after
    /// which only rows better than the cut enter.
    fn first_rows(&self, test: &Test, order: Order, range_rank: &[u64], descending: bool, count: usize) -> (usize, Vec<SortEntry>) {
        let mut best = Best::new(count, descending);
        let mut matched = 0;
        // rows sit roughly in the order they were loaded (address order): a descending
        // order scans from the end, so the best candidates come first and the cut
        // rejects the rest instead of every row entering the buffer
        let mut visit = |at: usize| {
            if test.passes(self, at) {
                matched += 1;
                best.offer(self.entry(order, range_rank, at));
            }
        };
        if descending {
            (0..self.keys.len()).rev().for_each(&mut visit);
        } else {
            (0..self.keys.len()).for_each(&mut visit);
        }
        (matched, best.sorted())
    }

    fn test(&self, selection: &Selection) -> Option<Test> {
        let ranges = match &selection.ranges {
            None => None,
            Some(ids) => {
                let mut allowed = vec![false; self.range_ids.len()];
                for id in ids {
                    if let Some(&slot) = self.range_slots.get(id.as_str()) {
                        allowed[slot as usize] = true;
                    }
                }
                if !allowed.contains(&true) {
                    return None;
                }
                Some(allowed)
            }
        };
        let text = |dictionary: &Dictionary, needle: &Option<String>| -> Option<Option<Arc<SlotSet>>> {
            match needle {
                None => Some(None),
                Some(needle) => {
                    let matching = dictionary.containing(&dictionary.fold.apply(needle));
                    match matching.len() {
                        0 => None,
                        // every value matches: the filter filters nothing
                        found if found == dictionary.len() => Some(None),
                        _ => Some(Some(matching)),
                    }
                }
            }
        };
        let users = text(&self.usernames, &selection.username)?;
        let platforms = text(&self.platform_names, &selection.platform)?;
        let hosts = text(&self.hostnames, &selection.client_hostname)?;
        let none = ranges.is_none()
            && selection.ip.is_none()
            && users.is_none()
            && platforms.is_none()
            && hosts.is_none()
            && selection.updated_after.is_none()
            && selection.updated_before.is_none();
        Some(Test { none, ranges, ip: selection.ip, users, platforms, hosts, after: selection.updated_after, before: selection.updated_before })
    }
}

/// The first `count` entries offered, in the listing's order: a buffer keeps the
/// best candidates, cut back to `count` each time it fills, after which only entries
/// better than the cut enter.
struct Best {
    count: usize,
    descending: bool,
    buffer: Vec<SortEntry>,
    cut: Option<SortEntry>,
}

impl Best {
    fn new(count: usize, descending: bool) -> Best {
        let count = count.max(1);
        Best { count, descending, buffer: Vec::with_capacity(count * 2), cut: None }
    }

    #[inline(always)]
    fn offer(&mut self, entry: SortEntry) {
        let descending = self.descending;
        if let Some(cut) = &self.cut
            && compare(descending, &entry, cut) != Ordering::Less
        {
            return;
        }
        self.buffer.push(entry);
        if self.buffer.len() == self.count * 2 {
            self.cut_back();
            self.cut = self.buffer.iter().max_by(|left, right| compare(descending, left, right)).copied();
        }
    }

    fn cut_back(&mut self) {
        let descending = self.descending;
        self.buffer.select_nth_unstable_by(self.count - 1, |left, right| compare(descending, left, right));
        self.buffer.truncate(self.count);
    }

    fn sorted(mut self) -> Vec<SortEntry> {
        if self.buffer.len() > self.count {
            self.cut_back();
        }
        let descending = self.descending;
        self.buffer.sort_unstable_by(|left, right| compare(descending, left, right));
        self.buffer
    }
}

/// Sort entries in the listing's order (the derived one, or its reverse).
#[inline(always)]
fn compare(descending: bool, left: &SortEntry, right: &SortEntry) -> Ordering {
    if descending { right.cmp(left) } else { left.cmp(right) }
}

/// Every row a selection matched, handed out in order a chunk at a time. It owns
/// its entries (which name their keys), so the index may change in between.
pub struct Ordered {
    entries: Vec<SortEntry>,
    descending: bool,
    next: usize,
    /// where the entries' buffer goes back when the export ends
    scratch: Scratch,
    /// entries `..ordered` are in their final order
    ordered: usize,
    /// whether `entries` is a scratch buffer, to go back to the pool when the export ends
    pooled: bool,
}

impl Drop for Ordered {
    fn drop(&mut self) {
        // only a scratch buffer goes back: a small or empty one in the pool would be
        // grown (page-faulted) by the next listing that takes it
        if self.pooled {
            give_back(&self.scratch, std::mem::take(&mut self.entries));
        }
    }
}

impl Ordered {
    /// How many rows matched.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The next `count` keys in order (empty at the end). The order is made a batch at
    /// a time: the first as big as the chunk, then each as big as all before it (at
    /// least `BATCH_CHUNKS` chunks) — a selection over the rest and a sort of the
    /// batch. The first byte waits for one selection, an export whose client has gone
    /// costs one more batch, never a sort of every row, and a whole export costs
    /// about one sort.
    pub fn next_chunk(&mut self, count: usize) -> Vec<Key> {
        let count = count.max(1);
        let descending = self.descending;
        let total = self.entries.len();
        let end = (self.next + count).min(total);
        while self.ordered < end {
            let batch = if self.ordered == 0 { count } else { self.ordered.max(BATCH_CHUNKS * count) };
            let rest = &mut self.entries[self.ordered..];
            if batch < rest.len() {
                rest.select_nth_unstable_by(batch - 1, |left, right| compare(descending, left, right));
                rest[..batch].sort_unstable_by(|left, right| compare(descending, left, right));
                self.ordered += batch;
            } else {
                rest.sort_unstable_by(|left, right| compare(descending, left, right));
                self.ordered = total;
            }
        }
        let chunk = self.entries[self.next..end].iter().map(SortEntry::key).collect();
        self.next = end;
        chunk
    }
}

/// The smallest batch an export orders after its first chunk, in chunks.
const BATCH_CHUNKS: usize = 16;

/// A selection's filters, resolved against the index: per-slot answers for ranges and
/// text values, bounds for the rest.
struct Test {
    /// no filter at all
    none: bool,
    ranges: Option<Vec<bool>>,
    ip: Option<(Key, Key)>,
    users: Option<Arc<SlotSet>>,
    platforms: Option<Arc<SlotSet>>,
    hosts: Option<Arc<SlotSet>>,
    after: Option<i64>,
    before: Option<i64>,
}

impl Test {
    #[inline(always)]
    fn passes(&self, index: &ListingIndex, at: usize) -> bool {
        if self.none {
            return true;
        }
        self.ranges.as_ref().is_none_or(|allowed| allowed[index.ranges[at] as usize])
            && self.ip.as_ref().is_none_or(|(first, last)| {
                let key = &index.keys[at];
                key >= first && key <= last
            })
            && self.after.is_none_or(|after| index.updated[at] > after)
            && self.before.is_none_or(|before| index.updated[at] < before)
            && self.platforms.as_ref().is_none_or(|matching| matching.contains(index.platforms[at]))
            && self.users.as_ref().is_none_or(|matching| matching.contains(index.users[at]))
            && self.hosts.as_ref().is_none_or(|matching| matching.contains(index.hosts[at]))
    }
}

#[cfg(test)]
mod tests;
