//! Substring search over a dictionary's arena, and the answers kept for the next
//! listing. Pure: no I/O.
//!
//! A needle that most values contain ("e", ".", the domain every hostname ends in)
//! used to cost one hit per occurrence, several per value: a million hostnames took
//! 25–40 ms. Now a one-byte needle skips to the next value after a hit (at most one
//! hit per value), the arena is searched in parts on every core, and the answer is kept: the listings that page
//! or re-sort a filter already typed reuse it, and each value interned or removed
//! later updates every kept answer (one `contains` per kept needle), so a kept answer
//! is never stale.

use std::sync::{Arc, Mutex, PoisonError};

use memchr::memmem::Finder;

use super::DEAD;

/// A set of dictionary slots, one bit each, with how many are in it.
#[derive(Clone, Debug, Default)]
pub(super) struct SlotSet {
    words: Vec<u64>,
    count: usize,
}

impl SlotSet {
    fn with_slots(slots: usize) -> SlotSet {
        SlotSet { words: vec![0; slots.div_ceil(64)], count: 0 }
    }

    #[inline(always)]
    pub(super) fn contains(&self, slot: u32) -> bool {
        let slot = slot as usize;
        self.words.get(slot / 64).is_some_and(|word| (word >> (slot % 64)) & 1 == 1)
    }

    fn set(&mut self, slot: u32, member: bool) {
        let slot = slot as usize;
        if slot / 64 >= self.words.len() {
            self.words.resize(slot / 64 + 1, 0);
        }
        let bit = 1u64 << (slot % 64);
        let word = &mut self.words[slot / 64];
        let was = *word & bit != 0;
        if member && !was {
            *word |= bit;
            self.count += 1;
        } else if !member && was {
            *word &= !bit;
            self.count -= 1;
        }
    }

    /// How many slots are in the set.
    pub(super) fn len(&self) -> usize {
        self.count
    }
}

/// Answers kept per dictionary: the most recently used needles, the costly ones first.
const SEARCHES_KEPT: usize = 64;

/// An answer holding at least one value in this many is costly to find again (a hit
/// per value): it is evicted only when no cheap answer is left to evict.
const DENSE_PART: usize = 10;

/// Arenas of at least this many values are searched in parts, one per core.
/// (Unit tests use a small value, so their few hundred values reach that path.)
const PARALLEL_FROM: usize = if cfg!(test) { 8 } else { 65_536 };

struct Kept {
    needle: Box<str>,
    matching: Arc<SlotSet>,
    used: u64,
}

/// The answers kept for one dictionary. Listings read them under the index's read
/// lock (hence the mutex); values change under its write lock (`&mut self`).
#[derive(Default)]
pub(super) struct Searches {
    kept: Mutex<(u64, Vec<Kept>)>,
}

impl Searches {
    /// The kept answer for `needle` (folded), if any.
    pub(super) fn get(&self, needle: &str) -> Option<Arc<SlotSet>> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let (tick, answers) = &mut *kept;
        *tick += 1;
        let answer = answers.iter_mut().find(|answer| &*answer.needle == needle)?;
        answer.used = *tick;
        Some(answer.matching.clone())
    }

    /// Keeps `matching` as the answer for `needle`, in place of the least recently used.
    /// `live`: how many values the dictionary holds.
    pub(super) fn keep(&self, needle: &str, matching: Arc<SlotSet>, live: usize) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let (tick, answers) = &mut *kept;
        *tick += 1;
        if answers.iter().any(|answer| &*answer.needle == needle) {
            return;
        }
        if answers.len() >= SEARCHES_KEPT {
            // the least recently used of the cheap answers (few values: a rare needle,
            // whose search skips through the arena), else of all: the costly answers —
            // the short needles most values hold — stay
            let dense = |answer: &Kept| answer.matching.len() * DENSE_PART >= live;
            let oldest = |pool: &mut dyn Iterator<Item = (usize, &Kept)>| pool.min_by_key(|(_, answer)| answer.used).map(|(at, _)| at);
            let victim = oldest(&mut answers.iter().enumerate().filter(|(_, answer)| !dense(answer))).or_else(|| oldest(&mut answers.iter().enumerate()));
            if let Some(victim) = victim {
                answers.swap_remove(victim);
            }
        }
        answers.push(Kept { needle: needle.into(), matching, used: *tick });
    }

    /// Value `slot` now holds `folded` (`None`: it was removed): every kept answer follows.
    pub(super) fn update(&mut self, slot: u32, folded: Option<&str>) {
        let (_, answers) = self.kept.get_mut().unwrap_or_else(PoisonError::into_inner);
        for answer in answers {
            let member = folded.is_some_and(|text| text.contains(&*answer.needle));
            // no listing holds an answer while values change (they hold the read lock),
            // so this does not copy
            Arc::make_mut(&mut answer.matching).set(slot, member);
        }
    }

    /// How many answers are kept (for tests).
    pub(super) fn len(&self) -> usize {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner).1.len()
    }
}

/// The live slots (of `slots`) whose folded text contains `needle` (folded). `arena`
/// holds the texts one after another, each ended by a NUL; `spans` says, in arena
/// order, where each starts and its slot (`DEAD` once removed).
pub(super) fn search(arena: &[u8], spans: &[(u32, u32)], needle: &[u8], slots: usize) -> SlotSet {
    let mut matching = SlotSet::with_slots(slots);
    let finder = Finder::new(needle);
    let parts = if spans.len() >= PARALLEL_FROM { std::thread::available_parallelism().map_or(1, |cores| cores.get()).clamp(1, 8) } else { 1 };
    let bounds: Vec<(usize, usize)> = (0..parts).map(|part| (spans.len() * part / parts, spans.len() * (part + 1) / parts)).collect();
    let found: Vec<Vec<u32>> = if parts == 1 {
        vec![search_part(arena, spans, bounds[0], &finder)]
    } else {
        std::thread::scope(|scope| {
            let finder = &finder;
            let running: Vec<_> = bounds.iter().map(|&part| scope.spawn(move || search_part(arena, spans, part, finder))).collect();
            running.into_iter().map(|part| part.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    };
    for slot in found.into_iter().flatten() {
        matching.set(slot, true);
    }
    matching
}

/// The live slots among spans `first..end` whose text contains the needle.
fn search_part(arena: &[u8], spans: &[(u32, u32)], (first, end): (usize, usize), finder: &Finder) -> Vec<u32> {
    let mut found = Vec::new();
    if first >= end {
        return found;
    }
    let start_of = |span: usize| spans.get(span).map_or(arena.len(), |&(start, _)| start as usize);
    let stop = start_of(end);
    let needle = finder.needle();
    if needle.is_empty() || needle.contains(&0) {
        // every value, or a needle with a NUL, which could match across two values:
        // test each value on its own
        for span in first..end {
            let text = &arena[start_of(span)..start_of(span + 1).saturating_sub(1).max(start_of(span))];
            if spans[span].1 != DEAD && finder.find(text).is_some() {
                found.push(spans[span].1);
            }
        }
        return found;
    }
    let mut span = first;
    if let [byte] = needle {
        // one byte: after a hit, the search goes on from the next value (one hit per value)
        let mut from = start_of(first);
        while let Some(hit) = memchr::memchr(*byte, &arena[from..stop]) {
            span = span_of(spans, span, end, from + hit);
            if spans[span].1 != DEAD {
                found.push(spans[span].1);
            }
            from = start_of(span + 1);
        }
        return found;
    }
    // longer needles: one search through the part (a fresh search per value cost more
    // than the rare second hit in a value, which is skipped)
    let base = start_of(first);
    let mut next_value = base;
    for hit in finder.find_iter(&arena[base..stop]) {
        let at = base + hit;
        if at < next_value {
            continue;
        }
        span = span_of(spans, span, end, at);
        if spans[span].1 != DEAD {
            found.push(spans[span].1);
        }
        next_value = start_of(span + 1);
    }
    found
}

/// The span holding arena offset `at`, at or after `span` and before `end`: a few steps
/// forward (dense hits), else a binary search (sparse ones).
#[inline]
fn span_of(spans: &[(u32, u32)], mut span: usize, end: usize, at: usize) -> usize {
    for _ in 0..4 {
        if span + 1 < end && spans[span + 1].0 as usize <= at {
            span += 1;
        } else {
            return span;
        }
    }
    span + spans[span + 1..end].partition_point(|&(start, _)| start as usize <= at)
}
