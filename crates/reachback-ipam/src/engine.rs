//! The allocation engine: picks a range by location fit, then the lowest free
//! address in it, with release quarantine. Works on an in-memory index of free
//! space; the store is the source of truth and its UNIQUE constraints the last word.

use std::collections::{BTreeSet, HashMap};

use crate::free_set::FreeSet;
use crate::location::{Location, LocationTier, great_circle_km};
use crate::range::{AddressRange, Family};

/// A range as the engine needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeSpec {
    pub id: String,
    pub name: String,
    pub range: AddressRange,
    pub location: Option<Location>,
    pub enabled: bool,
}

/// An address the engine picked; the caller commits it to the store or gives it back
/// with [`Engine::unreserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub range_id: String,
    pub family: Family,
    pub value: u128,
    /// When the address was released, if it came out of quarantine.
    pub quarantined_since: Option<i64>,
    pub tier: LocationTier,
}

/// Nothing could be allocated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// every enabled range is full
    #[error("no free address is left in any enabled range")]
    Exhausted,
}

/// A range definition the engine refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// the range overlaps one already known
    #[error("range overlaps range {0}")]
    Overlap(String),
    /// no range has this id
    #[error("unknown range {0}")]
    UnknownRange(String),
}

#[derive(Clone, Debug)]
struct RangeState {
    spec: RangeSpec,
    keys: (String, String, String),
    free: FreeSet,
    /// (released_at, value), oldest first
    quarantine: BTreeSet<(i64, u128)>,
    quarantined_at: HashMap<u128, i64>,
    quarantined_values: BTreeSet<u128>,
}

impl RangeState {
    fn quarantine_insert(&mut self, value: u128, released_at: i64) {
        self.quarantine.insert((released_at, value));
        self.quarantined_at.insert(value, released_at);
        self.quarantined_values.insert(value);
    }

    fn quarantine_remove(&mut self, value: u128) -> Option<i64> {
        let released_at = self.quarantined_at.remove(&value)?;
        self.quarantine.remove(&(released_at, value));
        self.quarantined_values.remove(&value);
        Some(released_at)
    }

    /// The `n`-th (0-based) bound address counted from the bottom, or from the top.
    fn nth_bound(&self, mut n: u128, from_top: bool) -> Option<u128> {
        let (first, last) = self.spec.range.assignable();
        // bound addresses are the gaps between free intervals, less quarantined ones
        let mut gaps = Vec::new();
        let mut cursor = first;
        for (start, end) in self.free.intervals() {
            if start > cursor {
                gaps.push((cursor, start - 1));
            }
            cursor = end.saturating_add(1);
            if end == u128::MAX {
                cursor = u128::MAX;
                break;
            }
        }
        if cursor <= last && self.free.intervals().next_back().is_none_or(|(_, end)| end < last) {
            gaps.push((cursor, last));
        }
        if from_top {
            gaps.reverse();
        }
        for (start, end) in gaps {
            let quarantined: Vec<u128> = self.quarantined_values.range(start..=end).copied().collect();
            let size = end - start + 1 - quarantined.len() as u128;
            if n >= size {
                n -= size;
                continue;
            }
            // walk to the n-th address of the gap that is not quarantined
            let mut skipped = quarantined.into_iter().peekable();
            if from_top {
                let mut candidate = end - n;
                let mut above: Vec<u128> = skipped.collect();
                above.reverse();
                for value in above {
                    if value >= candidate {
                        candidate -= 1;
                    }
                }
                return Some(candidate);
            }
            let mut candidate = start + n;
            while let Some(&value) = skipped.peek() {
                if value <= candidate {
                    candidate += 1;
                    skipped.next();
                } else {
                    break;
                }
            }
            return Some(candidate);
        }
        None
    }
    fn unbound(&self) -> u128 {
        self.free.len() + self.quarantine.len() as u128
    }

    fn used(&self) -> u128 {
        self.spec.range.total() - self.unbound()
    }

    fn is_candidate(&self) -> bool {
        self.spec.enabled && self.unbound() > 0
    }
}

/// A client location prepared for repeated lookups.
#[derive(Clone, Debug, Default)]
pub struct Place {
    location: Option<Location>,
    keys: (String, String, String),
}

impl Place {
    pub fn new(location: Option<&Location>) -> Self {
        let location = location.filter(|location| !location.is_empty()).cloned();
        let keys = location.as_ref().map(Location::keys).unwrap_or_default();
        Place { location, keys }
    }
}

/// The allocation engine's in-memory index.
#[derive(Debug, Default)]
pub struct Engine {
    ranges: Vec<RangeState>,
    by_id: HashMap<String, usize>,
    by_city: HashMap<(String, String, String), Vec<usize>>,
    by_state: HashMap<(String, String), Vec<usize>>,
    by_country: HashMap<String, Vec<usize>>,
    global: Vec<usize>,
    quarantine_duration: i64,
}

impl Engine {
    /// An empty engine; `quarantine_duration` in the same unit as every `now` given later.
    pub fn new(quarantine_duration: i64) -> Self {
        Engine { quarantine_duration: quarantine_duration.max(0), ..Engine::default() }
    }

    pub fn set_quarantine_duration(&mut self, duration: i64) {
        self.quarantine_duration = duration.max(0);
    }

    /// Adds or replaces a range, with the addresses bound in it and those in quarantine.
    /// Bound or quarantined addresses outside the assignable span are ignored.
    pub fn load_range(
        &mut self,
        spec: RangeSpec,
        bound: impl IntoIterator<Item = u128>,
        quarantined: impl IntoIterator<Item = (u128, i64)>,
    ) -> Result<(), EngineError> {
        if let Some(other) = self.ranges.iter().find(|state| state.spec.id != spec.id && state.spec.range.overlaps(&spec.range)) {
            return Err(EngineError::Overlap(other.spec.id.clone()));
        }
        let (first, last) = spec.range.assignable();
        let mut free = FreeSet::full(first, last);
        for value in bound {
            free.remove(value);
        }
        let mut state = RangeState {
            keys: spec.location.as_ref().map(Location::keys).unwrap_or_default(),
            spec,
            free,
            quarantine: BTreeSet::new(),
            quarantined_at: HashMap::new(),
            quarantined_values: BTreeSet::new(),
        };
        for (value, released_at) in quarantined {
            if state.free.remove(value) {
                state.quarantine_insert(value, released_at);
            }
        }
        match self.by_id.get(&state.spec.id) {
            Some(&index) => self.ranges[index] = state,
            None => {
                self.by_id.insert(state.spec.id.clone(), self.ranges.len());
                self.ranges.push(state);
            }
        }
        self.reindex();
        Ok(())
    }

    /// Changes name, location or status of a range without touching its addresses.
    pub fn update_range(&mut self, id: &str, name: &str, location: Option<Location>, enabled: bool) -> Result<(), EngineError> {
        let index = self.index_of(id)?;
        let state = &mut self.ranges[index];
        state.spec.name = name.to_string();
        state.keys = location.as_ref().map(Location::keys).unwrap_or_default();
        state.spec.location = location;
        state.spec.enabled = enabled;
        self.reindex();
        Ok(())
    }

    pub fn remove_range(&mut self, id: &str) {
        if let Some(index) = self.by_id.remove(id) {
            self.ranges.remove(index);
            self.by_id = self.ranges.iter().enumerate().map(|(index, state)| (state.spec.id.clone(), index)).collect();
            self.reindex();
        }
    }

    pub fn range(&self, id: &str) -> Option<&RangeSpec> {
        self.by_id.get(id).map(|&index| &self.ranges[index].spec)
    }

    pub fn range_ids(&self) -> impl Iterator<Item = &str> {
        self.ranges.iter().map(|state| state.spec.id.as_str())
    }

    /// Addresses bound in a range according to the engine.
    pub fn used(&self, id: &str) -> Option<u128> {
        self.by_id.get(id).map(|&index| self.ranges[index].used())
    }

    /// Addresses of a range in quarantine.
    pub fn quarantined(&self, id: &str) -> Option<u128> {
        self.by_id.get(id).map(|&index| self.ranges[index].quarantine.len() as u128)
    }

    /// Whether the engine counts this address as free (fresh, not in quarantine).
    pub fn is_free(&self, id: &str, value: u128) -> bool {
        self.by_id.get(id).is_some_and(|&index| self.ranges[index].free.contains(value))
    }

    /// The `n`-th bound address (0-based) of a range in address order, or from the top;
    /// lets a listing seek to a deep page instead of skipping rows.
    pub fn nth_bound(&self, id: &str, n: u128, from_top: bool) -> Option<u128> {
        self.by_id.get(id).and_then(|&index| self.ranges[index].nth_bound(n, from_top))
    }

    /// Records that an address is bound (found taken in the store, or loaded).
    pub fn mark_bound(&mut self, id: &str, value: u128) -> bool {
        let Some(&index) = self.by_id.get(id) else { return false };
        let state = &mut self.ranges[index];
        state.free.remove(value) || state.quarantine_remove(value).is_some()
    }

    /// Puts a released address into quarantine (or straight back to free space when
    /// quarantine is off).
    pub fn release(&mut self, id: &str, value: u128, now: i64) {
        let Some(&index) = self.by_id.get(id) else { return };
        let state = &mut self.ranges[index];
        if !state.spec.range.is_assignable(state.spec.range.family(), value) || state.free.contains(value) || state.quarantined_at.contains_key(&value) {
            return;
        }
        if self.quarantine_duration == 0 {
            state.free.insert(value);
        } else {
            state.quarantine_insert(value, now);
        }
    }

    /// Gives back an address from [`Engine::plan`] that was not committed.
    pub fn unreserve(&mut self, allocation: &Allocation) {
        let Some(&index) = self.by_id.get(&allocation.range_id) else { return };
        let state = &mut self.ranges[index];
        match allocation.quarantined_since {
            Some(released_at) => state.quarantine_insert(allocation.value, released_at),
            None => {
                state.free.insert(allocation.value);
            }
        }
    }

    /// Picks the best range for a client and takes an address from it.
    pub fn plan(&mut self, place: &Place, now: i64) -> Result<Allocation, AllocationError> {
        let (index, tier) = self.choose_range(place).ok_or(AllocationError::Exhausted)?;
        let quarantine_duration = self.quarantine_duration;
        let state = &mut self.ranges[index];
        // quarantine that has run out becomes fresh space again
        while let Some(&(released_at, value)) = state.quarantine.first() {
            if released_at.saturating_add(quarantine_duration) > now {
                break;
            }
            state.quarantine_remove(value);
            state.free.insert(value);
        }
        let family = state.spec.range.family();
        let range_id = state.spec.id.clone();
        if let Some(value) = state.free.take_lowest() {
            return Ok(Allocation { range_id, family, value, quarantined_since: None, tier });
        }
        let &(released_at, value) = state.quarantine.first().ok_or(AllocationError::Exhausted)?;
        state.quarantine_remove(value);
        Ok(Allocation { range_id, family, value, quarantined_since: Some(released_at), tier })
    }

    fn choose_range(&self, place: &Place) -> Option<(usize, LocationTier)> {
        let (country, state, city) = &place.keys;
        if !country.is_empty() {
            if !state.is_empty() && !city.is_empty() {
                let key = (country.clone(), state.clone(), city.clone());
                if let Some(best) = self.best_of(self.by_city.get(&key).map(Vec::as_slice).unwrap_or(&[])) {
                    return Some((best, LocationTier::City));
                }
            }
            if !state.is_empty() {
                let key = (country.clone(), state.clone());
                if let Some(best) = self.best_of(self.by_state.get(&key).map(Vec::as_slice).unwrap_or(&[])) {
                    return Some((best, LocationTier::State));
                }
            }
            if let Some(best) = self.best_of(self.by_country.get(country).map(Vec::as_slice).unwrap_or(&[])) {
                return Some((best, LocationTier::Country));
            }
        }
        if let Some(best) = self.best_of(&self.global) {
            return Some((best, LocationTier::Global));
        }
        self.best_fallback(place).map(|best| (best, LocationTier::Fallback))
    }

    /// Most unbound addresses (fresh or in quarantine), then the name.
    fn best_of(&self, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().filter(|&index| self.ranges[index].is_candidate()).min_by(|&a, &b| {
            let (a, b) = (&self.ranges[a], &self.ranges[b]);
            b.unbound().cmp(&a.unbound()).then_with(|| a.spec.name.cmp(&b.spec.name))
        })
    }

    fn best_fallback(&self, place: &Place) -> Option<usize> {
        let client = place.location.as_ref().and_then(Location::coordinates);
        let distance = |state: &RangeState| -> f64 {
            match (client, state.spec.location.as_ref().and_then(Location::coordinates)) {
                (Some(client), Some(range)) => great_circle_km(client, range),
                _ => f64::INFINITY,
            }
        };
        (0..self.ranges.len()).filter(|&index| self.ranges[index].is_candidate()).min_by(|&a, &b| {
            let (a, b) = (&self.ranges[a], &self.ranges[b]);
            distance(a).total_cmp(&distance(b)).then(b.unbound().cmp(&a.unbound())).then_with(|| a.spec.name.cmp(&b.spec.name))
        })
    }

    fn index_of(&self, id: &str) -> Result<usize, EngineError> {
        self.by_id.get(id).copied().ok_or_else(|| EngineError::UnknownRange(id.to_string()))
    }

    fn reindex(&mut self) {
        self.by_city.clear();
        self.by_state.clear();
        self.by_country.clear();
        self.global.clear();
        for (index, state) in self.ranges.iter().enumerate() {
            let (country, region, city) = &state.keys;
            if country.is_empty() {
                if Location::tier_of(None, state.spec.location.as_ref()) == LocationTier::Global {
                    self.global.push(index);
                }
                continue;
            }
            self.by_country.entry(country.clone()).or_default().push(index);
            if !region.is_empty() {
                self.by_state.entry((country.clone(), region.clone())).or_default().push(index);
                if !city.is_empty() {
                    self.by_city.entry((country.clone(), region.clone(), city.clone())).or_default().push(index);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
