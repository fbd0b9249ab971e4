//! Parsers for the values of segments and policies: destinations (address, CIDR,
//! hostname pattern), port ranges, source CIDRs. Host bits in a CIDR are refused,
//! as for IP ranges.

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is not an address, a CIDR or a hostname pattern")]
    Destination(String),
    #[error("{0:?} is not a CIDR (address/prefix)")]
    Cidr(String),
    #[error("{given:?} has host bits set; did you mean {corrected}?")]
    HostBits { given: String, corrected: String },
    #[error("{0:?} is not a port (1-65535) or a port range (low-high)")]
    Port(String),
}

/// An address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => masked(u32::from(address) as u128, self.prefix, 32) == u32::from(network) as u128,
            (IpAddr::V6(network), IpAddr::V6(address)) => masked(u128::from(address), self.prefix, 128) == u128::from(network),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.network, self.prefix)
    }
}

fn masked(value: u128, prefix: u8, bits: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let width_mask = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    // prefix > 0, so the shift is below 128
    value & width_mask & !((1u128 << (bits - prefix)) - 1)
}

/// Parses `a.b.c.d/n` or `x::/n`, or a bare address (a host block).
pub fn parse_cidr(text: &str) -> Result<Cidr, ParseError> {
    let text = text.trim();
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address.parse().map_err(|_| ParseError::Cidr(text.to_string()))?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => bits,
        Some(prefix) if prefix.bytes().all(|byte| byte.is_ascii_digit()) => match prefix.parse::<u8>() {
            Ok(prefix) if prefix <= bits => prefix,
            _ => return Err(ParseError::Cidr(text.to_string())),
        },
        Some(_) => return Err(ParseError::Cidr(text.to_string())),
    };
    let value = match address {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    };
    let network_value = masked(value, prefix, bits);
    let network = match address {
        IpAddr::V4(_) => IpAddr::V4((network_value as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(network_value.into()),
    };
    if network_value != value {
        return Err(ParseError::HostBits { given: text.to_string(), corrected: format!("{network}/{prefix}") });
    }
    Ok(Cidr { network, prefix })
}

/// Where a segment points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Block(Cidr),
    /// `*.laptops.corp.example`: any client hostname below the suffix (stored lowercase, with the leading dot)
    HostSuffix(String),
    /// one client hostname (lowercase)
    Host(String),
}

impl Destination {
    pub fn matches(&self, address: IpAddr, client_hostname: &str) -> bool {
        match self {
            Destination::Block(cidr) => cidr.contains(address),
            Destination::HostSuffix(suffix) => client_hostname.len() > suffix.len() && client_hostname.to_ascii_lowercase().ends_with(suffix.as_str()),
            Destination::Host(host) => client_hostname.eq_ignore_ascii_case(host),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Block(cidr) if cidr.prefix == if cidr.network.is_ipv4() { 32 } else { 128 } => write!(formatter, "{}", cidr.network),
            Destination::Block(cidr) => write!(formatter, "{cidr}"),
            Destination::HostSuffix(suffix) => write!(formatter, "*{suffix}"),
            Destination::Host(host) => write!(formatter, "{host}"),
        }
    }
}

fn is_hostname(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
}

/// Parses an address, a CIDR, `*.suffix` or a hostname.
pub fn parse_destination(text: &str) -> Result<Destination, ParseError> {
    let trimmed = text.trim();
    if let Some(suffix) = trimmed.strip_prefix("*.") {
        if is_hostname(suffix) && suffix.contains('.') {
            return Ok(Destination::HostSuffix(format!(".{}", suffix.to_ascii_lowercase())));
        }
        return Err(ParseError::Destination(text.to_string()));
    }
    if trimmed.parse::<IpAddr>().is_ok() || trimmed.contains('/') {
        return parse_cidr(trimmed).map(Destination::Block);
    }
    // a dotted name made of digits only would be a mistyped address
    if is_hostname(trimmed) && !trimmed.split('.').all(|label| label.bytes().all(|byte| byte.is_ascii_digit())) {
        return Ok(Destination::Host(trimmed.to_ascii_lowercase()));
    }
    Err(ParseError::Destination(text.to_string()))
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high { write!(formatter, "{}", self.low) } else { write!(formatter, "{}-{}", self.low, self.high) }
    }
}

/// Parses `445` or `5985-5986` (1–65535, low ≤ high).
pub fn parse_port_range(text: &str) -> Result<PortRange, ParseError> {
    let error = || ParseError::Port(text.to_string());
    let port = |part: &str| part.trim().parse::<u16>().ok().filter(|port| *port > 0);
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (port(low).ok_or_else(error)?, port(high).ok_or_else(error)?),
        None => {
            let single = port(text).ok_or_else(error)?;
            (single, single)
        }
    };
    if low > high {
        return Err(error());
    }
    Ok(PortRange { low, high })
}
