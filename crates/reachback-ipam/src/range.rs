//! Address ranges: parsing (subnet or start-end), canonical form, counting and overlap.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address family of a range or address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// Why a range text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// the text is neither a subnet nor a start-end range
    #[error("'{0}' is not an address, a subnet (100.64.0.0/16) or a range (100.64.0.10-100.64.0.200)")]
    Syntax(String),
    /// a subnet written with host bits set
    #[error("'{given}' has host bits set; the subnet is written {corrected}")]
    HostBitsSet { given: String, corrected: String },
    /// prefix length beyond the family's width
    #[error("prefix length /{0} is too long for this address family")]
    PrefixTooLong(u8),
    /// IPv6 subnets must be /64 or longer
    #[error("an IPv6 subnet may not be shorter than /64 (got /{0})")]
    Ipv6PrefixTooShort(u8),
    /// start after end
    #[error("the range start {start} is after its end {end}")]
    StartAfterEnd { start: String, end: String },
    /// start and end of different families
    #[error("the range start and end are not of the same address family")]
    MixedFamilies,
    /// the range touches loopback, multicast, link-local, unspecified or broadcast space
    #[error("{range} lies in {what} space, which cannot be assigned")]
    Reserved { range: String, what: &'static str },
}

/// A validated block of addresses, IPv4 or IPv6, as a subnet or an inclusive span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressRange {
    family: Family,
    first: u128,
    last: u128,
    prefix: Option<u8>,
}

const V4_RESERVED: &[(u128, u128, &str)] = &[
    (0x0000_0000, 0x00ff_ffff, "unspecified"),
    (0x7f00_0000, 0x7fff_ffff, "loopback"),
    (0xa9fe_0000, 0xa9fe_ffff, "link-local"),
    (0xe000_0000, 0xefff_ffff, "multicast"),
    (0xffff_ffff, 0xffff_ffff, "broadcast"),
];

const V6_RESERVED: &[(u128, u128, &str)] = &[
    (0, 0, "unspecified"),
    (1, 1, "loopback"),
    (0x0000_0000_0000_0000_0000_ffff_0000_0000, 0x0000_0000_0000_0000_0000_ffff_ffff_ffff, "IPv4-mapped"),
    (0xfe80 << 112, (0xfec0 << 112) - 1, "link-local"),
    (0xff00 << 112, u128::MAX, "multicast"),
];

impl AddressRange {
    /// Parses and validates `100.64.0.0/16`, `fd7a:115c::/64`, `100.65.0.10-100.65.0.200`
    /// or a single address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Self, RangeError> {
        let text = text.trim();
        let syntax = || RangeError::Syntax(text.to_string());
        let range = if let Some((address, prefix)) = text.split_once('/') {
            let address: IpAddr = address.trim().parse().map_err(|_| syntax())?;
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
                return Err(syntax());
            }
            let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
            let (family, value) = split_address(address);
            let width = family.width();
            if prefix > width {
                return Err(RangeError::PrefixTooLong(prefix));
            }
            if family == Family::V6 && prefix < 64 {
                return Err(RangeError::Ipv6PrefixTooShort(prefix));
            }
            let host_mask = host_mask(width, prefix);
            let network = value & !host_mask;
            if network != value {
                return Err(RangeError::HostBitsSet { given: text.to_string(), corrected: format!("{}/{}", join_address(family, network), prefix) });
            }
            AddressRange { family, first: network, last: network | host_mask, prefix: Some(prefix) }
        } else if let Some((start, end)) = text.split_once('-') {
            let start: IpAddr = start.trim().parse().map_err(|_| syntax())?;
            let end: IpAddr = end.trim().parse().map_err(|_| syntax())?;
            let (family, first) = split_address(start);
            let (end_family, last) = split_address(end);
            if family != end_family {
                return Err(RangeError::MixedFamilies);
            }
            if first > last {
                return Err(RangeError::StartAfterEnd { start: start.to_string(), end: end.to_string() });
            }
            AddressRange { family, first, last, prefix: None }
        } else {
            let address: IpAddr = text.parse().map_err(|_| syntax())?;
            let (family, value) = split_address(address);
            AddressRange { family, first: value, last: value, prefix: Some(family.width()) }
        };
        range.check_reserved()?;
        Ok(range)
    }

    fn check_reserved(&self) -> Result<(), RangeError> {
        let table = match self.family {
            Family::V4 => V4_RESERVED,
            Family::V6 => V6_RESERVED,
        };
        for &(first, last, what) in table {
            if self.first <= last && first <= self.last {
                return Err(RangeError::Reserved { range: self.to_string(), what });
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The first address of the block (network address for a subnet).
    pub fn first(&self) -> u128 {
        self.first
    }

    /// The last address of the block (broadcast address for an IPv4 subnet).
    pub fn last(&self) -> u128 {
        self.last
    }

    /// The address keys of the block's first and last addresses (see [`address_key`]):
    /// every address of the block sorts between them, and no other range's address does.
    pub fn key_bounds(&self) -> ([u8; 17], [u8; 17]) {
        (address_key(self.family, self.first), address_key(self.family, self.last))
    }

    pub fn prefix(&self) -> Option<u8> {
        self.prefix
    }

    /// The inclusive span of assignable addresses: an IPv4 subnet of /30 or shorter
    /// loses its network and broadcast address, an IPv6 subnet its subnet-router anycast.
    pub fn assignable(&self) -> (u128, u128) {
        match (self.family, self.prefix) {
            (Family::V4, Some(prefix)) if prefix <= 30 => (self.first + 1, self.last - 1),
            (Family::V6, Some(prefix)) if prefix < 128 => (self.first + 1, self.last),
            _ => (self.first, self.last),
        }
    }

    /// How many addresses can be assigned from this range.
    pub fn total(&self) -> u128 {
        let (first, last) = self.assignable();
        // a /64 holds 2^64 - 1 assignable addresses: no overflow possible below /0
        last - first + 1
    }

    /// Whether the two blocks share an address (a network or broadcast address counts).
    pub fn overlaps(&self, other: &AddressRange) -> bool {
        self.family == other.family && self.first <= other.last && other.first <= self.last
    }

    /// Whether the whole of `other` lies inside this block.
    pub fn covers(&self, other: &AddressRange) -> bool {
        self.family == other.family && self.first <= other.first && other.last <= self.last
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let (family, value) = split_address(address);
        family == self.family && self.first <= value && value <= self.last
    }

    /// Whether the address is one this range hands out.
    pub fn is_assignable(&self, family: Family, value: u128) -> bool {
        let (first, last) = self.assignable();
        family == self.family && first <= value && value <= last
    }

    pub fn address(&self, value: u128) -> IpAddr {
        join_address(self.family, value)
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Some(prefix) => write!(f, "{}/{}", join_address(self.family, self.first), prefix),
            None => write!(f, "{}-{}", join_address(self.family, self.first), join_address(self.family, self.last)),
        }
    }
}

impl Family {
    pub fn width(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

fn host_mask(width: u8, prefix: u8) -> u128 {
    let host_bits = u32::from(width - prefix);
    if host_bits == 0 {
        0
    } else if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

/// Splits an address into its family and numeric value. IPv4-mapped IPv6 addresses stay IPv6.
pub fn split_address(address: IpAddr) -> (Family, u128) {
    match address {
        IpAddr::V4(v4) => (Family::V4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (Family::V6, u128::from(v6)),
    }
}

pub fn join_address(family: Family, value: u128) -> IpAddr {
    match family {
        // values of V4 ranges never exceed u32::MAX by construction
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// Parses an address text into family and value.
pub fn parse_address(text: &str) -> Option<(Family, u128)> {
    text.trim().parse::<IpAddr>().ok().map(split_address)
}

/// The 17-byte sort key the store keeps for an address: family byte, then the
/// 16-byte big-endian value, so byte order is numeric order with IPv4 first.
pub fn address_key(family: Family, value: u128) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = match family {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    key[1..].copy_from_slice(&value.to_be_bytes());
    key
}

/// Inverse of [`address_key`].
pub fn address_from_key(key: &[u8]) -> Option<(Family, u128)> {
    let (&tag, rest) = key.split_first()?;
    let family = match tag {
        4 => Family::V4,
        6 => Family::V6,
        _ => return None,
    };
    let bytes: [u8; 16] = rest.try_into().ok()?;
    Some((family, u128::from_be_bytes(bytes)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> String {
        match AddressRange::parse(text) {
            Ok(range) => format!("{range} total={}", range.total()),
            Err(error) => format!("error: {error}"),
        }
    }

    #[test]
    fn parses_and_counts() {
        let cases = [
            ("100.64.0.0/16", "100.64.0.0/16 total=65534"),
            ("100.64.0.0/24", "100.64.0.0/24 total=254"),
            ("100.64.0.0/30", "100.64.0.0/30 total=2"),
            ("100.64.0.0/31", "100.64.0.0/31 total=2"),
            ("100.64.0.7/32", "100.64.0.7/32 total=1"),
            ("100.64.0.7", "100.64.0.7/32 total=1"),
            ("100.65.0.10-100.65.0.200", "100.65.0.10-100.65.0.200 total=191"),
            (" 100.65.0.10 - 100.65.0.10 ", "100.65.0.10-100.65.0.10 total=1"),
            ("fd7a:115c::/64", "fd7a:115c::/64 total=18446744073709551615"),
            ("FD7A:115C:0:0::/120", "fd7a:115c::/120 total=255"),
            ("fd7a:115c::1/128", "fd7a:115c::1/128 total=1"),
            ("fd00::5-fd00::9", "fd00::5-fd00::9 total=5"),
            ("100.64.0.5/24", "error: '100.64.0.5/24' has host bits set; the subnet is written 100.64.0.0/24"),
            ("fd7a:115c::/48", "error: an IPv6 subnet may not be shorter than /64 (got /48)"),
            ("100.64.0.0/33", "error: prefix length /33 is too long for this address family"),
            ("100.65.0.200-100.65.0.10", "error: the range start 100.65.0.200 is after its end 100.65.0.10"),
            ("100.65.0.1-fd00::1", "error: the range start and end are not of the same address family"),
            ("127.0.0.0/8", "error: 127.0.0.0/8 lies in loopback space, which cannot be assigned"),
            ("224.0.0.0/24", "error: 224.0.0.0/24 lies in multicast space, which cannot be assigned"),
            ("169.254.1.0/24", "error: 169.254.1.0/24 lies in link-local space, which cannot be assigned"),
            ("0.0.0.0/0", "error: 0.0.0.0/0 lies in unspecified space, which cannot be assigned"),
            ("255.255.255.255", "error: 255.255.255.255/32 lies in broadcast space, which cannot be assigned"),
            ("fe80::/64", "error: fe80::/64 lies in link-local space, which cannot be assigned"),
            ("ff02::/64", "error: ff02::/64 lies in multicast space, which cannot be assigned"),
            ("::1", "error: ::1/128 lies in loopback space, which cannot be assigned"),
            ("hello", "error: 'hello' is not an address, a subnet (100.64.0.0/16) or a range (100.64.0.10-100.64.0.200)"),
            ("10.0.0.0/+8", "error: '10.0.0.0/+8' is not an address, a subnet (100.64.0.0/16) or a range (100.64.0.10-100.64.0.200)"),
            ("", "error: '' is not an address, a subnet (100.64.0.0/16) or a range (100.64.0.10-100.64.0.200)"),
        ];
        for (input, expected) in cases {
            assert_eq!(parsed(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn overlap_is_per_family_and_inclusive() {
        let a = AddressRange::parse("100.64.0.0/24").unwrap();
        let b = AddressRange::parse("100.64.0.255-100.64.1.10").unwrap();
        let c = AddressRange::parse("100.64.1.0/24").unwrap();
        let v6 = AddressRange::parse("::6440:0/120").unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(b.overlaps(&c));
        assert!(!a.overlaps(&v6));
    }

    #[test]
    fn keys_sort_numerically() {
        let mut values =
            [address_key(Family::V6, 1 << 100), address_key(Family::V4, 0x6440_0100), address_key(Family::V4, 0x6440_0002), address_key(Family::V6, 2)];
        values.sort();
        let decoded: Vec<_> = values.iter().map(|key| address_from_key(key).unwrap()).collect();
        assert_eq!(decoded, vec![(Family::V4, 0x6440_0002), (Family::V4, 0x6440_0100), (Family::V6, 2), (Family::V6, 1 << 100)]);
        assert_eq!(address_from_key(&[5; 17]), None);
        assert_eq!(address_from_key(&[4; 3]), None);
    }
}
