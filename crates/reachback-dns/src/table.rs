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

/// Bound hostnames and their addresses. A hostname has one address (a device has
/// one binding); an address one hostname.
#[derive(Clone, Debug, Default)]
pub struct Table {
    by_name: HashMap<Name, IpAddr>,
    by_address: HashMap<IpAddr, Name>,
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

    /// Replaces the client domains (longest first, so the most specific zone wins).
    pub fn set_zones(&mut self, zones: &[&str]) -> Result<(), TableError> {
        let mut parsed = zones.iter().map(|zone| Name::parse(zone)).collect::<Result<Vec<_>, _>>()?;
        parsed.sort_by_key(|zone| std::cmp::Reverse(zone.label_count()));
        parsed.dedup();
        let names: Vec<(Name, IpAddr)> = self.by_name.iter().map(|(name, address)| (name.clone(), *address)).collect();
        self.zones = parsed;
        self.between.clear();
        for (name, _) in &names {
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
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The zone a name lies in (the longest client domain that holds it).
    pub fn zone_of(&self, name: &Name) -> Option<&Name> {
        self.zones.iter().find(|zone| name.is_within(zone))
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
        if let Some(previous) = self.by_address.get(&address).cloned()
            && previous != name
        {
            self.remove_name(&previous);
        }
        if let Some(previous) = self.by_name.insert(name.clone(), address) {
            if previous != address {
                self.by_address.remove(&previous);
            }
        } else {
            self.count_between(&name, 1);
        }
        self.by_address.insert(address, name);
        self.version = self.version.wrapping_add(1);
        Ok(())
    }

    /// Forgets a hostname (released, deleted); false when it was not there.
    pub fn unbind(&mut self, hostname: &str) -> bool {
        match Name::parse(hostname) {
            Ok(name) => self.remove_name(&name),
            Err(_) => false,
        }
    }

    /// Forgets whatever name holds `address` (its binding was released); false when none did.
    pub fn unbind_address(&mut self, address: IpAddr) -> bool {
        match self.by_address.get(&address).cloned() {
            Some(name) => self.remove_name(&name),
            None => false,
        }
    }

    /// Forgets every name whose address lies in `range` (the range was deleted).
    pub fn unbind_range(&mut self, range: &Range) -> usize {
        let gone: Vec<Name> = self.by_address.iter().filter(|(address, _)| range.contains(**address)).map(|(_, name)| name.clone()).collect();
        for name in &gone {
            self.remove_name(name);
        }
        gone.len()
    }

    fn remove_name(&mut self, name: &Name) -> bool {
        let Some(address) = self.by_name.remove(name) else { return false };
        if self.by_address.get(&address) == Some(name) {
            self.by_address.remove(&address);
        }
        self.count_between(name, -1);
        self.version = self.version.wrapping_add(1);
        true
    }

    pub fn address_of(&self, name: &Name) -> Option<IpAddr> {
        self.by_name.get(name).copied()
    }

    pub fn name_of(&self, address: IpAddr) -> Option<&Name> {
        self.by_address.get(&address)
    }

    /// Whether a name exists without an address of its own (an empty non-terminal).
    pub fn is_between(&self, name: &Name) -> bool {
        self.between.contains_key(name)
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
        assert_eq!(table.address_of(&name("alice.laptops.CORP.example")), Some("100.64.0.1".parse().expect("ip")));
        assert!(table.is_between(&name("laptops.corp.example")));
        assert!(!table.is_between(&name("corp.example")), "the apex is not counted");
        // re-bound to a new address: the old one no longer names it
        table.bind("alice.laptops.corp.example", "100.64.0.9".parse().expect("ip")).expect("bind");
        assert_eq!(table.name_of("100.64.0.1".parse().expect("ip")), None);
        assert_eq!(table.name_of("100.64.0.9".parse().expect("ip")), Some(&name("alice.laptops.corp.example")));
        // the address goes to another device: the first name loses it
        table.bind("bob.laptops.corp.example", "100.64.0.9".parse().expect("ip")).expect("bind");
        assert_eq!(table.address_of(&name("alice.laptops.corp.example")), None);
        assert!(table.is_between(&name("laptops.corp.example")));
        assert!(table.unbind("BOB.laptops.corp.example"));
        assert!(!table.is_between(&name("laptops.corp.example")), "nothing below any more");
        assert!(table.is_empty());
        assert!(table.bind("not a name", "100.64.0.2".parse().expect("ip")).is_err());
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
