//! A set of free addresses kept as disjoint inclusive intervals, so a fresh /10 or
//! /64 costs one entry and the lowest free address is found in O(log n).

use std::collections::BTreeMap;

/// Disjoint, non-adjacent inclusive intervals `start -> end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreeSet {
    intervals: BTreeMap<u128, u128>,
    count: u128,
}

impl FreeSet {
    /// A set holding every address from `first` to `last` inclusive.
    pub fn full(first: u128, last: u128) -> Self {
        let mut set = FreeSet::default();
        if first <= last {
            set.intervals.insert(first, last);
            set.count = last - first + 1;
        }
        set
    }

    /// How many addresses are free.
    pub fn len(&self) -> u128 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many intervals the set is made of (memory use).
    pub fn interval_count(&self) -> usize {
        self.intervals.len()
    }

    pub fn contains(&self, value: u128) -> bool {
        self.intervals.range(..=value).next_back().is_some_and(|(_, &end)| value <= end)
    }

    /// Removes and returns the lowest free address.
    pub fn take_lowest(&mut self) -> Option<u128> {
        let (&start, &end) = self.intervals.iter().next()?;
        self.intervals.remove(&start);
        if start < end {
            self.intervals.insert(start + 1, end);
        }
        self.count -= 1;
        Some(start)
    }

    /// Removes one address; returns whether it was free.
    pub fn remove(&mut self, value: u128) -> bool {
        let Some((&start, &end)) = self.intervals.range(..=value).next_back() else {
            return false;
        };
        if value > end {
            return false;
        }
        self.intervals.remove(&start);
        if start < value {
            self.intervals.insert(start, value - 1);
        }
        if value < end {
            self.intervals.insert(value + 1, end);
        }
        self.count -= 1;
        true
    }

    /// Adds one address, merging with its neighbours; returns whether it was new.
    pub fn insert(&mut self, value: u128) -> bool {
        if self.contains(value) {
            return false;
        }
        let mut start = value;
        let mut end = value;
        if value > 0
            && let Some((&left_start, &left_end)) = self.intervals.range(..value).next_back()
            && left_end == value - 1
        {
            self.intervals.remove(&left_start);
            start = left_start;
        }
        if value < u128::MAX
            && let Some(&right_end) = self.intervals.get(&(value + 1))
        {
            self.intervals.remove(&(value + 1));
            end = right_end;
        }
        self.intervals.insert(start, end);
        self.count += 1;
        true
    }

    /// The free intervals, ascending.
    pub fn intervals(&self) -> impl DoubleEndedIterator<Item = (u128, u128)> + '_ {
        self.intervals.iter().map(|(&start, &end)| (start, end))
    }

    /// Every free address in ascending order (tests and small ranges only).
    pub fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.intervals.iter().flat_map(|(&start, &end)| start..=end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_plain_set(ops in proptest::collection::vec((0u8..3, 0u128..64), 0..200)) {
            let mut set = FreeSet::full(10, 40);
            let mut model: BTreeSet<u128> = (10..=40).collect();
            for (op, value) in ops {
                match op {
                    0 => prop_assert_eq!(set.remove(value), model.remove(&value)),
                    1 => prop_assert_eq!(set.insert(value), model.insert(value)),
                    _ => {
                        let lowest = model.iter().next().copied();
                        if let Some(lowest) = lowest { model.remove(&lowest); }
                        prop_assert_eq!(set.take_lowest(), lowest);
                    }
                }
                prop_assert_eq!(set.len(), model.len() as u128);
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                // intervals stay disjoint and non-adjacent
                let mut previous_end: Option<u128> = None;
                for (&start, &end) in &set.intervals {
                    prop_assert!(start <= end);
                    if let Some(previous_end) = previous_end { prop_assert!(start > previous_end + 1); }
                    previous_end = Some(end);
                }
            }
        }
    }
}
