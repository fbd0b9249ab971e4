//! The virtual ranges in TUN mode: which addresses belong to them (a sorted set
//! of intervals), the fewest CIDR routes that cover them exactly (an `a-b` range
//! becomes several prefixes), and the routes through the device, applied with
//! iproute2's `ip` as `nft.rs` applies its rules (replaced by difference when the
//! ranges change, removed on exit).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::Context;
use reachback_ipam::{AddressRange, Family, join_address, split_address};

/// The virtual ranges as intervals per family, for membership tests on every new flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl RangeSet {
    /// The ranges the broker announced; texts that do not parse are skipped (and returned).
    pub fn parse(ranges: &[String]) -> (RangeSet, Vec<String>) {
        let mut set = RangeSet::default();
        let mut skipped = Vec::new();
        for text in ranges {
            match AddressRange::parse(text) {
                Ok(range) => match range.family() {
                    Family::V4 => set.v4.push((range.first(), range.last())),
                    Family::V6 => set.v6.push((range.first(), range.last())),
                },
                Err(_) => skipped.push(text.clone()),
            }
        }
        set.v4.sort_unstable();
        set.v6.sort_unstable();
        (set, skipped)
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let (family, value) = split_address(address);
        let intervals = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        // the last interval starting at or before the address
        let index = intervals.partition_point(|&(first, _)| first <= value);
        index > 0 && intervals[index - 1].1 >= value
    }

    /// The routes that cover the set exactly, in CIDR text (`100.64.0.0/16`, `fd7a::/64`).
    pub fn routes(&self) -> Vec<String> {
        let mut routes = Vec::new();
        for (family, intervals) in [(Family::V4, &self.v4), (Family::V6, &self.v6)] {
            for &(first, last) in intervals {
                for (network, prefix) in cidr_cover(first, last, family.width()) {
                    routes.push(format!("{}/{prefix}", join_address(family, network)));
                }
            }
        }
        routes
    }
}

/// The fewest prefixes whose union is exactly `first..=last` in a `width`-bit
/// address space, in address order: at each step the largest aligned block that
/// starts at the next address and does not pass `last`.
pub fn cidr_cover(first: u128, last: u128, width: u8) -> Vec<(u128, u8)> {
    let mut cover = Vec::new();
    if first > last || width == 0 || width > 128 {
        return cover;
    }
    let mut next = first;
    loop {
        // the block size is 2^bits: limited by next's alignment and by what is left
        let alignment = if next == 0 { u32::from(width) } else { next.trailing_zeros().min(u32::from(width)) };
        let remaining = last - next; // count - 1, which does not overflow at the full space
        let fits = if remaining == u128::MAX { 128 } else { 127 - (remaining + 1).leading_zeros() };
        let bits = alignment.min(fits);
        cover.push((next, width - bits as u8));
        let size_minus_one = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
        match next.checked_add(size_minus_one) {
            Some(end) if end < last => next = end + 1,
            _ => break,
        }
    }
    cover
}

/// The routes this connector installed through its device.
#[derive(Debug)]
pub struct Routes {
    device: String,
    installed: Vec<String>,
}

impl Routes {
    pub fn new(device: &str) -> Routes {
        Routes { device: device.to_string(), installed: Vec::new() }
    }

    /// Makes the routes through the device exactly `wanted`: new ones are added
    /// (`replace`, so a stale route of a crashed run is taken over), gone ones deleted.
    /// A line that fails does not stop the others; the error names what `ip` said.
    /// Every wanted route counts as installed afterwards (deleting one that never
    /// made it is harmless), so none is left behind on exit.
    pub fn apply(&mut self, wanted: &[String]) -> anyhow::Result<()> {
        let mut script = String::new();
        for route in &self.installed {
            if !wanted.contains(route) {
                script.push_str(&format!("route del {route} dev {}\n", self.device));
            }
        }
        for route in wanted {
            if !self.installed.contains(route) {
                script.push_str(&format!("route replace {route} dev {}\n", self.device));
            }
        }
        self.installed = wanted.to_vec();
        if script.is_empty() {
            return Ok(());
        }
        run_batch(&script)
    }

    /// Deletes every route installed (the kernel drops them with the device anyway).
    pub fn remove_all(&mut self) -> anyhow::Result<()> {
        self.apply(&[])
    }
}

/// One `ip -batch` run: one process for any number of routes; `-force` goes on past
/// a line that fails (a route already gone) and the exit status still reports it.
fn run_batch(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (is iproute2 installed?)")?;
    child.stdin.take().context("ip stdin")?.write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "ip refused the routes: {}", String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> u128 {
        split_address(text.parse().expect("address")).1
    }

    fn texts(cover: &[(u128, u8)], family: Family) -> Vec<String> {
        cover.iter().map(|&(network, prefix)| format!("{}/{prefix}", join_address(family, network))).collect()
    }

    #[test]
    fn a_range_is_covered_by_the_fewest_exact_prefixes() {
        assert_eq!(
            texts(&cidr_cover(v4("100.65.0.10"), v4("100.65.0.200"), 32), Family::V4),
            ["100.65.0.10/31", "100.65.0.12/30", "100.65.0.16/28", "100.65.0.32/27", "100.65.0.64/26", "100.65.0.128/26", "100.65.0.192/29", "100.65.0.200/32"]
        );
        assert_eq!(texts(&cidr_cover(v4("100.64.0.0"), v4("100.64.255.255"), 32), Family::V4), ["100.64.0.0/16"]);
        assert_eq!(texts(&cidr_cover(v4("100.64.0.7"), v4("100.64.0.7"), 32), Family::V4), ["100.64.0.7/32"]);
        assert_eq!(texts(&cidr_cover(v4("100.64.0.255"), v4("100.64.1.0"), 32), Family::V4), ["100.64.0.255/32", "100.64.1.0/32"]);
        assert_eq!(cidr_cover(0, u128::from(u32::MAX), 32), [(0, 0)], "the whole space is one prefix");
        assert_eq!(cidr_cover(0, u128::MAX, 128), [(0, 0)]);
        assert_eq!(cidr_cover(u128::MAX, u128::MAX, 128), [(u128::MAX, 128)], "the last address does not overflow");
        assert_eq!(cidr_cover(5, 4, 32), []);
    }

    #[test]
    fn covers_are_exact_and_minimal_against_a_reference() {
        // every range inside a small space: the blocks are aligned, in order, touch end to end,
        // cover exactly first..=last, and no two neighbours could merge into one prefix
        for first in 0u128..64 {
            for last in first..64 {
                let cover = cidr_cover(first, last, 32);
                let mut next = first;
                for &(network, prefix) in &cover {
                    let size = 1u128 << (32 - prefix);
                    assert_eq!(network, next, "{first}-{last}: {cover:?}");
                    assert_eq!(network % size, 0, "aligned: {cover:?}");
                    next = network + size;
                }
                assert_eq!(next, last + 1, "{first}-{last}: {cover:?}");
                // a greedy cover of maximal aligned blocks is minimal; the reference counts them one address at a time
                let mut expected = 0;
                let mut at = first;
                while at <= last {
                    let mut size = 1u128;
                    while at % (size * 2) == 0 && at + size * 2 - 1 <= last {
                        size *= 2;
                    }
                    expected += 1;
                    at += size;
                }
                assert_eq!(cover.len(), expected, "{first}-{last}: {cover:?}");
            }
        }
    }

    #[test]
    fn range_sets_answer_membership_and_routes_for_both_families() {
        let ranges: Vec<String> =
            ["100.64.0.0/16", "100.65.0.10-100.65.0.13", "fd7a:115c:a1e0::/64", "not a range"].iter().map(|text| text.to_string()).collect();
        let (set, skipped) = RangeSet::parse(&ranges);
        assert_eq!(skipped, ["not a range"]);
        for inside in ["100.64.0.1", "100.64.255.255", "100.65.0.10", "100.65.0.13", "fd7a:115c:a1e0::1"] {
            assert!(set.contains(inside.parse().expect("address")), "{inside}");
        }
        for outside in ["100.63.255.255", "100.65.0.9", "100.65.0.14", "10.77.1.1", "fd7a:115c:a1e1::1", "::ffff:100.64.0.1"] {
            assert!(!set.contains(outside.parse().expect("address")), "{outside}");
        }
        assert_eq!(set.routes(), ["100.64.0.0/16", "100.65.0.10/31", "100.65.0.12/31", "fd7a:115c:a1e0::/64"]);
        assert!(!RangeSet::default().contains("100.64.0.1".parse().expect("address")));
    }
}
