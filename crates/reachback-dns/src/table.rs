//! The names the connector answers for: each bound device's hostname and virtual
//! IP, the client domains (zones) they live in, and the virtual ranges whose
//! reverse names (`in-addr.arpa`, `ip6.arpa`) it answers PTR for. Kept in step
//! with the server by a snapshot and changes; read by the answerer.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::name::{Name, NameError};

/// A virtual range, as `(first address, prefix length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Range {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix.min(32)) };
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix.min(128)) };
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }

    /// Parses `100.64.0.0/16` or `fd7a:115c::/64`.
    pub fn parse(text: &str) -> Option<Range> {
        let (address, prefix) = text.split_once('/')?;
        let network: IpAddr = address.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let limit = if network.is_ipv4() { 32 } else { 128 };
        (prefix <= limit).then_some(Range { network, prefix })
    }
}

/// One bound hostname.
#[derive(Clone, Debug)]
struct Entry {
    name: Name,
    address: IpAddr,
}

/// Bound hostnames and their addresses. A hostname has one address (a device has
/// one binding); an address one hostname. Each entry is kept once (in `entries`),
/// and two hash tables of entry indexes find it by name and by address: at a
/// million names that is about half the memory of two maps holding both.
#[derive(Clone, Debug, Default)]
pub struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_name: hashbrown::HashTable<u32>,
    by_address: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
    count: usize,
    /// names between a zone's apex and a hostname that hold no address themselves
    /// (`laptops.corp.example` for `alice.laptops.corp.example`), with how many
    /// hostnames lie below: they exist (NODATA), they are not NXDOMAIN
    between: HashMap<Name, u32>,
    zones: Vec<Name>,
    ranges: Vec<Range>,
    /// changes since the table was made: the zones' SOA serial
    version: u32,
}

/// Why a table change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("invalid hostname: {0}")]
    Name(#[from] NameError),
}

impl Table {
    pub fn new(zones: &[&str], ranges: &[Range]) -> Result<Table, TableError> {
        let mut table = Table::default();
        table.set_zones(zones)?;
        table.ranges = ranges.to_vec();
        Ok(table)
    }

    fn hash_name(&self, name: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, name)
    }

    fn hash_address(&self, address: IpAddr) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, address)
    }

    fn entry(&self, index: u32) -> Option<&Entry> {
        self.entries.get(index as usize).and_then(Option::as_ref)
    }

    fn find_name(&self, name: &str) -> Option<u32> {
        self.by_name.find(self.hash_name(name), |&index| self.entry(index).is_some_and(|entry| entry.name.as_str() == name)).copied()
    }

    fn find_address(&self, address: IpAddr) -> Option<u32> {
        self.by_address.find(self.hash_address(address), |&index| self.entry(index).is_some_and(|entry| entry.address == address)).copied()
    }

    /// Replaces the client domains (longest first, so the most specific zone wins).
    pub fn set_zones(&mut self, zones: &[&str]) -> Result<(), TableError> {
        let mut parsed = zones.iter().map(|zone| Name::parse(zone)).collect::<Result<Vec<_>, _>>()?;
        parsed.sort_by_key(|zone| std::cmp::Reverse(zone.label_count()));
        parsed.dedup();
        self.zones = parsed;
        self.between.clear();
        let names: Vec<Name> = self.entries.iter().flatten().map(|entry| entry.name.clone()).collect();
        for name in &names {
            self.count_between(name, 1);
        }
        self.version = self.version.wrapping_add(1);
        Ok(())
    }

    pub fn set_ranges(&mut self, ranges: &[Range]) {
        self.ranges = ranges.to_vec();
        self.version = self.version.wrapping_add(1);
    }

    pub fn zones(&self) -> &[Name] {
        &self.zones
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The zone a name lies in (the longest client domain that holds it).
    pub fn zone_of(&self, name: impl AsRef<str>) -> Option<&Name> {
        let name = name.as_ref();
        self.zones.iter().find(|zone| crate::name::is_within(name, zone.as_str()))
    }

    fn count_between(&mut self, name: &Name, delta: i32) {
        let Some(zone) = self.zone_of(name).cloned() else { return };
        let mut parent = name.parent();
        while let Some(current) = parent {
            if current.label_count() <= zone.label_count() {
                break;
            }
            let next = current.parent();
            let entry = self.between.entry(current.clone()).or_insert(0);
            *entry = entry.saturating_add_signed(delta);
            if *entry == 0 {
                self.between.remove(&current);
            }
            parent = next;
        }
    }

    /// Binds `hostname` to `address`, replacing whatever either held before.
    pub fn bind(&mut self, hostname: &str, address: IpAddr) -> Result<(), TableError> {
        let name = Name::parse(hostname)?;
        if let Some(index) = self.find_address(address)
            && self.entry(index).is_some_and(|entry| entry.name != name)
        {
            self.remove_index(index);
        }
        match self.find_name(name.as_str()) {
            Some(index) => {
                let previous = self.entry(index).map(|entry| entry.address);
                if previous != Some(address) {
                    if let Some(previous) = previous {
                        let hash = self.hash_address(previous);
                        if let Ok(found) = self.by_address.find_entry(hash, |&other| other == index) {
                            found.remove();
                        }
                    }
                    if let Some(Some(entry)) = self.entries.get_mut(index as usize) {
                        entry.address = address;
                    }
                    let hash = self.hash_address(address);
                    let (entries, hasher) = (&self.entries, &self.hasher);
                    self.by_address.insert_unique(hash, index, |&other| {
                        entries.get(other as usize).and_then(Option::as_ref).map_or(0, |entry| std::hash::BuildHasher::hash_one(hasher, entry.address))
                    });
                }
            }
            None => {
                let index = match self.free.pop() {
                    Some(index) => index,
                    None => {
                        self.entries.push(None);
                        (self.entries.len() - 1) as u32
                    }
                };
                self.entries[index as usize] = Some(Entry { name: name.clone(), address });
                let (name_hash, address_hash) = (self.hash_name(name.as_str()), self.hash_address(address));
                let (entries, hasher) = (&self.entries, &self.hasher);
                self.by_name.insert_unique(name_hash, index, |&other| {
                    entries.get(other as usize).and_then(Option::as_ref).map_or(0, |entry| std::hash::BuildHasher::hash_one(hasher, entry.name.as_str()))
                });
                self.by_address.insert_unique(address_hash, index, |&other| {
                    entries.get(other as usize).and_then(Option::as_ref).map_or(0, |entry| std::hash::BuildHasher::hash_one(hasher, entry.address))
                });
                self.count += 1;
                self.count_between(&name, 1);
            }
        }
        self.version = self.version.wrapping_add(1);
        Ok(())
    }

    /// Forgets a hostname (released, deleted); false when it was not there.
    pub fn unbind(&mut self, hostname: &str) -> bool {
        let Ok(name) = Name::parse(hostname) else { return false };
        match self.find_name(name.as_str()) {
            Some(index) => self.remove_index(index),
            None => false,
        }
    }

    /// Forgets whatever name holds `address` (its binding was released); false when none did.
    pub fn unbind_address(&mut self, address: IpAddr) -> bool {
        match self.find_address(address) {
            Some(index) => self.remove_index(index),
            None => false,
        }
    }

    /// Forgets every name whose address lies in `range` (the range was deleted).
    pub fn unbind_range(&mut self, range: &Range) -> usize {
        let gone: Vec<u32> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.as_ref().is_some_and(|entry| range.contains(entry.address)))
            .map(|(index, _)| index as u32)
            .collect();
        for index in &gone {
            self.remove_index(*index);
        }
        gone.len()
    }

    fn remove_index(&mut self, index: u32) -> bool {
        let Some(entry) = self.entries.get_mut(index as usize).and_then(Option::take) else { return false };
        let name_hash = self.hash_name(entry.name.as_str());
        if let Ok(found) = self.by_name.find_entry(name_hash, |&other| other == index) {
            found.remove();
        }
        let address_hash = self.hash_address(entry.address);
        if let Ok(found) = self.by_address.find_entry(address_hash, |&other| other == index) {
            found.remove();
        }
        self.free.push(index);
        self.count -= 1;
        self.count_between(&entry.name, -1);
        self.version = self.version.wrapping_add(1);
        true
    }

    pub fn address_of(&self, name: impl AsRef<str>) -> Option<IpAddr> {
        self.find_name(name.as_ref()).and_then(|index| self.entry(index)).map(|entry| entry.address)
    }

    pub fn name_of(&self, address: IpAddr) -> Option<&Name> {
        self.find_address(address).and_then(|index| self.entry(index)).map(|entry| &entry.name)
    }

    /// Whether a name exists without an address of its own (an empty non-terminal).
    pub fn is_between(&self, name: impl AsRef<str>) -> bool {
        self.between.contains_key(name.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    #[test]
    fn bindings_move_and_empty_non_terminals_follow() {
        let mut table = Table::new(&["corp.example"], &[]).expect("table");
        table.bind("Alice.Laptops.corp.example", "100.64.0.1".parse().expect("ip")).expect("bind");
        assert_eq!(table.address_of(name("alice.laptops.CORP.example")), Some("100.64.0.1".parse().expect("ip")));
        assert!(table.is_between(name("laptops.corp.example")));
        assert!(!table.is_between(name("corp.example")), "the apex is not counted");
        // re-bound to a new address: the old one no longer names it
        table.bind("alice.laptops.corp.example", "100.64.0.9".parse().expect("ip")).expect("bind");
        assert_eq!(table.name_of("100.64.0.1".parse().expect("ip")), None);
        assert_eq!(table.name_of("100.64.0.9".parse().expect("ip")), Some(&name("alice.laptops.corp.example")));
        // the address goes to another device: the first name loses it
        table.bind("bob.laptops.corp.example", "100.64.0.9".parse().expect("ip")).expect("bind");
        assert_eq!(table.address_of(name("alice.laptops.corp.example")), None);
        assert!(table.is_between(name("laptops.corp.example")));
        assert!(table.unbind("BOB.laptops.corp.example"));
        assert!(!table.is_between(name("laptops.corp.example")), "nothing below any more");
        assert!(table.is_empty());
        assert!(table.bind("not a name", "100.64.0.2".parse().expect("ip")).is_err());
    }

    #[test]
    fn the_table_agrees_with_a_reference_model_under_random_changes() {
        use std::collections::HashMap;
        let mut table = Table::new(&["corp.example"], &[]).expect("table");
        // the model: hostname -> address, kept one-to-one as the table must
        let mut model: HashMap<String, IpAddr> = HashMap::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let hostname = |n: u64| format!("h{}.g{}.corp.example", n % 40, n % 3);
        let address = |n: u64| IpAddr::from([100, 64, 0, (n % 30) as u8]);
        for _ in 0..20_000 {
            let (op, a, b) = (next() % 4, next(), next());
            match op {
                0 | 1 => {
                    let (host, ip) = (hostname(a), address(b));
                    table.bind(&host, ip).expect("bind");
                    model.retain(|other, other_ip| *other_ip != ip || *other == host);
                    model.insert(host, ip);
                }
                2 => {
                    let host = hostname(a);
                    assert_eq!(table.unbind(&host), model.remove(&host).is_some());
                }
                _ => {
                    let ip = address(b);
                    let held = model.iter().find(|(_, other)| **other == ip).map(|(host, _)| host.clone());
                    assert_eq!(table.unbind_address(ip), held.is_some());
                    if let Some(host) = held {
                        model.remove(&host);
                    }
                }
            }
            assert_eq!(table.len(), model.len());
        }
        for n in 0..40 {
            let host = hostname(n);
            assert_eq!(table.address_of(name(&host)), model.get(&host).copied(), "{host}");
        }
        for n in 0..30 {
            let ip = address(n);
            let expected = model.iter().find(|(_, other)| **other == ip).map(|(host, _)| name(host));
            assert_eq!(table.name_of(ip).cloned(), expected, "{ip}");
        }
        for group in 0..3 {
            let between = name(&format!("g{group}.corp.example"));
            assert_eq!(table.is_between(&between), model.keys().any(|host| host.ends_with(&format!(".g{group}.corp.example"))));
        }
    }

    #[test]
    fn ranges_contain_their_addresses() {
        let range = Range::parse("100.64.0.0/10").expect("range");
        assert!(range.contains("100.127.255.255".parse().expect("ip")));
        assert!(!range.contains("100.128.0.0".parse().expect("ip")));
        let v6 = Range::parse("fd7a:115c:a1e0::/64").expect("range");
        assert!(v6.contains("fd7a:115c:a1e0::5".parse().expect("ip")));
        assert!(!v6.contains("100.64.0.1".parse().expect("ip")));
        assert_eq!(Range::parse("1.2.3.4/33"), None);
        assert_eq!(Range::parse("nonsense"), None);
    }
}
