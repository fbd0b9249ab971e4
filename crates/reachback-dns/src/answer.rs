//! The answerer: one query's bytes in, the reply's bytes out (or "drop", or
//! "forward"), over a [`Table`]. No sockets, no clock: the shell reads a datagram
//! or a TCP message, calls [`Answerer::answer`] and writes what it returns.
//!
//! Authoritative for the client domains (A, AAAA, SOA, NS; NXDOMAIN and NODATA
//! with the zone's SOA in the authority section, so resolvers cache negatives)
//! and for the reverse names of the virtual ranges (PTR). Anything else is
//! REFUSED, or handed back to the shell to forward when an upstream is set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::name::{CANONICAL_MAX, MAX_LABEL, MAX_NAME, Name, canonical_into, canonical_str, is_within};
use crate::table::{Range, Table};

/// Record types and classes the answerer knows.
pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const MAILB: u16 = 253;
    pub const MAILA: u16 = 254;
    pub const ANY: u16 = 255;
    pub const CLASS_IN: u16 = 1;
    pub const CLASS_ANY: u16 = 255;
}

/// Response codes.
pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// extended (EDNS): 16, carried as 1 in the OPT record's upper bits
    pub const BADVERS: u16 = 16;
}

/// The largest UDP reply without EDNS.
pub const PLAIN_UDP_LIMIT: usize = 512;
/// The UDP payload size this answerer offers and honours at most (DNS flag day 2020).
pub const EDNS_UDP_LIMIT: u16 = 1232;

/// How the query came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// send these bytes back
    Reply { bytes: Vec<u8>, rcode: u16, qtype: u16 },
    /// not for us and an upstream is set: forward the query as it came
    Forward { qtype: u16 },
    /// not worth an answer (too short to carry an id, or a response, not a query)
    Drop,
}

/// The answerer's settings.
#[derive(Clone, Debug)]
pub struct Answerer {
    /// TTL of answers and of negative answers (the SOA minimum)
    pub ttl: u32,
    /// hand queries outside the zones to the shell instead of refusing them
    pub forward: bool,
    /// addresses of the name server itself (`reachback-dns.<zone>`), when known
    pub nameserver_addresses: Vec<IpAddr>,
}

impl Default for Answerer {
    fn default() -> Self {
        Answerer { ttl: 10, forward: false, nameserver_addresses: Vec::new() }
    }
}

/// The first label of the name server's own name in each zone.
pub const NAMESERVER_LABEL: &str = "reachback-dns";

struct Edns {
    udp_size: u16,
    version: u8,
}

/// Where each label of the question name starts (a name has at most 127 labels).
struct LabelOffsets {
    items: [u16; 128],
    count: usize,
}

impl LabelOffsets {
    fn push(&mut self, offset: usize) -> bool {
        let Some(slot) = self.items.get_mut(self.count) else { return false };
        *slot = offset as u16;
        self.count += 1;
        true
    }

    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Option<usize> {
        self.items[..self.count].get(index).map(|&offset| offset as usize)
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.items[..self.count].iter().map(|&offset| offset as usize)
    }
}

struct Query<'a> {
    id: u16,
    flags: u16,
    /// the question as it came (name in its own case, type, class)
    question: &'a [u8],
    /// the question name's canonical text (on the stack: no allocation per query)
    name: [u8; CANONICAL_MAX],
    name_length: usize,
    /// offset in the message of each label of the question name
    label_offsets: LabelOffsets,
    qtype: u16,
    qclass: u16,
    edns: Option<Edns>,
}

/// What a parse failure still lets us answer: the id and flags, when the header was there.
enum ParseError {
    Drop,
    FormErr { id: u16, flags: u16 },
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Skips a name at `at` in a record (compression allowed); returns the offset after it.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    let mut length = 0usize;
    loop {
        let byte = *message.get(at)?;
        match byte & 0xC0 {
            0x00 if byte == 0 => return Some(at + 1),
            0x00 => {
                length += byte as usize + 1;
                if byte as usize > MAX_LABEL || length > MAX_NAME {
                    return None;
                }
                at += 1 + byte as usize;
            }
            0xC0 => {
                message.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

fn parse(message: &[u8]) -> Result<Query<'_>, ParseError> {
    let (Some(id), Some(flags)) = (read_u16(message, 0), read_u16(message, 2)) else { return Err(ParseError::Drop) };
    if message.len() < 12 {
        return Err(ParseError::Drop);
    }
    if flags & 0x8000 != 0 {
        // a response: answering it could start a loop between two servers
        return Err(ParseError::Drop);
    }
    let formerr = ParseError::FormErr { id, flags };
    let count = |at: usize| read_u16(message, at).unwrap_or(0) as usize;
    let (questions, answers, authorities, additionals) = (count(4), count(6), count(8), count(10));
    if questions != 1 {
        return Err(formerr);
    }
    // the question name: plain labels (a query has nothing to compress against)
    let mut at = 12;
    let mut label_offsets = LabelOffsets { items: [0; 128], count: 0 };
    let mut wire_length = 0usize;
    loop {
        let Some(&length) = message.get(at) else { return Err(formerr) };
        if length == 0 {
            at += 1;
            break;
        }
        if length & 0xC0 != 0 || length as usize > MAX_LABEL {
            return Err(formerr);
        }
        wire_length += length as usize + 1;
        if wire_length + 1 > MAX_NAME {
            return Err(formerr);
        }
        if message.get(at + 1..at + 1 + length as usize).is_none() {
            return Err(formerr);
        }
        if !label_offsets.push(at) {
            return Err(formerr);
        }
        at += 1 + length as usize;
    }
    let (Some(qtype), Some(qclass)) = (read_u16(message, at), read_u16(message, at + 2)) else { return Err(formerr) };
    let question = &message[12..at + 4];
    at += 4;
    // the other sections: skipped, but they must be well formed; one OPT at most
    let mut edns = None;
    for index in 0..answers + authorities + additionals {
        let Some(after_name) = skip_name(message, at) else { return Err(formerr) };
        let (Some(kind), Some(class)) = (read_u16(message, after_name), read_u16(message, after_name + 2)) else { return Err(formerr) };
        let Some(rdlength) = read_u16(message, after_name + 8) else { return Err(formerr) };
        let end = after_name + 10 + rdlength as usize;
        if end > message.len() {
            return Err(formerr);
        }
        if kind == rtype::OPT {
            if index < answers + authorities || edns.is_some() || message[at] != 0 {
                return Err(formerr);
            }
            edns = Some(Edns { udp_size: class, version: message[after_name + 5] });
        }
        at = end;
    }
    if at != message.len() {
        return Err(formerr);
    }
    let mut name = [0u8; CANONICAL_MAX];
    let name_length = canonical_into(label_offsets.iter().map(|offset| &message[offset + 1..offset + 1 + message[offset] as usize]), &mut name);
    Ok(Query { id, flags, question, name, name_length, label_offsets, qtype, qclass, edns })
}

/// A record to write: owner, type, data.
enum Record<'a> {
    Address { owner: Owner, address: IpAddr },
    Ptr { owner: Owner, target: &'a Name },
    Soa { owner: Owner, zone: &'a Name, serial: u32 },
    Ns { owner: Owner, zone: &'a Name },
}

/// Where a record's owner name comes from: a pointer into the question (every
/// owner the answerer writes is the question name or one of its parents).
#[derive(Clone, Copy)]
enum Owner {
    Pointer(usize),
}

struct Writer<'q> {
    query: &'q Query<'q>,
    ttl: u32,
    out: Vec<u8>,
}

impl Writer<'_> {
    fn owner(&mut self, owner: Owner) {
        let Owner::Pointer(offset) = owner;
        self.out.extend_from_slice(&(0xC000u16 | offset as u16).to_be_bytes());
    }

    fn nameserver(&mut self, zone: &Name) {
        self.out.push(NAMESERVER_LABEL.len() as u8);
        self.out.extend_from_slice(NAMESERVER_LABEL.as_bytes());
        zone.write_wire(&mut self.out);
    }

    fn record(&mut self, record: &Record<'_>) {
        let (owner, kind) = match record {
            Record::Address { owner, address: IpAddr::V4(_) } => (*owner, rtype::A),
            Record::Address { owner, address: IpAddr::V6(_) } => (*owner, rtype::AAAA),
            Record::Ptr { owner, .. } => (*owner, rtype::PTR),
            Record::Soa { owner, .. } => (*owner, rtype::SOA),
            Record::Ns { owner, .. } => (*owner, rtype::NS),
        };
        self.owner(owner);
        self.out.extend_from_slice(&kind.to_be_bytes());
        self.out.extend_from_slice(&rtype::CLASS_IN.to_be_bytes());
        self.out.extend_from_slice(&self.ttl.to_be_bytes());
        let length_at = self.out.len();
        self.out.extend_from_slice(&[0, 0]);
        match record {
            Record::Address { address: IpAddr::V4(v4), .. } => self.out.extend_from_slice(&v4.octets()),
            Record::Address { address: IpAddr::V6(v6), .. } => self.out.extend_from_slice(&v6.octets()),
            Record::Ptr { target, .. } => target.write_wire(&mut self.out),
            Record::Soa { zone, serial, .. } => {
                self.nameserver(zone);
                self.out.extend_from_slice(b"\x0ahostmaster");
                zone.write_wire(&mut self.out);
                for value in [*serial, 3600, 600, 86_400, self.ttl] {
                    self.out.extend_from_slice(&value.to_be_bytes());
                }
            }
            Record::Ns { zone, .. } => self.nameserver(zone),
        }
        let length = (self.out.len() - length_at - 2) as u16;
        self.out[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
    }

    /// The whole reply: header, the question echoed, the records, our OPT when the query had one.
    fn finish(mut self, rcode: u16, authoritative: bool, answers: &[Record<'_>], authority: &[Record<'_>], truncated: bool) -> Vec<u8> {
        let query = self.query;
        let opcode_and_rd = query.flags & 0x7900;
        let flags = 0x8000 | opcode_and_rd | if authoritative { 0x0400 } else { 0 } | if truncated { 0x0200 } else { 0 } | (rcode & 0x0F);
        self.out.extend_from_slice(&query.id.to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        let (answers, authority) = if truncated { (&[][..], &[][..]) } else { (answers, authority) };
        for count in [1, answers.len(), authority.len(), usize::from(query.edns.is_some())] {
            self.out.extend_from_slice(&(count as u16).to_be_bytes());
        }
        self.out.extend_from_slice(query.question);
        for record in answers.iter().chain(authority) {
            self.record(record);
        }
        if query.edns.is_some() {
            // root name, OPT, our UDP size, extended rcode, version 0, no flags, no options
            self.out.push(0);
            self.out.extend_from_slice(&rtype::OPT.to_be_bytes());
            self.out.extend_from_slice(&EDNS_UDP_LIMIT.to_be_bytes());
            self.out.push((rcode >> 4) as u8);
            self.out.extend_from_slice(&[0, 0, 0, 0, 0]);
        }
        self.out
    }
}

/// A header-only error reply for a query we could not parse past its header.
fn bare_error(id: u16, flags: u16, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(0x8000 | (flags & 0x7900) | rcode as u16).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// The address a reverse name stands for, when it is a whole one.
pub fn reverse_address(name: &str) -> Option<IpAddr> {
    let labels: Vec<&str> = name.split('.').filter(|label| !label.is_empty()).collect();
    match labels.as_slice() {
        [d, c, b, a, "in-addr", "arpa"] => {
            let octet = |text: &str| if text.len() > 1 && text.starts_with('0') { None } else { text.parse::<u8>().ok() };
            Some(IpAddr::V4(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?)))
        }
        [nibbles @ .., "ip6", "arpa"] if nibbles.len() == 32 => {
            let mut value: u128 = 0;
            for nibble in nibbles.iter().rev() {
                let digit = match nibble.as_bytes() {
                    [byte] => (*byte as char).to_digit(16)?,
                    _ => return None,
                };
                value = (value << 4) | digit as u128;
            }
            Some(IpAddr::V6(Ipv6Addr::from(value)))
        }
        _ => None,
    }
}

/// The reverse zone apex that holds a range: whole octets (IPv4) or nibbles (IPv6) of its prefix.
pub fn reverse_zone(range: &Range) -> Name {
    let text = match range.network {
        IpAddr::V4(v4) => {
            let octets = v4.octets();
            let whole = (range.prefix / 8) as usize;
            let mut labels: Vec<String> = octets[..whole].iter().rev().map(u8::to_string).collect();
            labels.extend(["in-addr".to_string(), "arpa".to_string()]);
            labels.join(".")
        }
        IpAddr::V6(v6) => {
            let value = u128::from(v6);
            let whole = (range.prefix / 4) as usize;
            let mut labels: Vec<String> = (0..whole).map(|index| format!("{:x}", (value >> (124 - 4 * index)) & 0xF)).collect();
            labels.reverse();
            labels.extend(["ip6".to_string(), "arpa".to_string()]);
            labels.join(".")
        }
    };
    Name::parse(&text).unwrap_or_else(|_| Name::from_labels(std::iter::empty()))
}

impl Answerer {
    /// Answers one query (a UDP payload, or a TCP message without its length prefix).
    pub fn answer(&self, table: &Table, message: &[u8], transport: Transport) -> Outcome {
        let query = match parse(message) {
            Ok(query) => query,
            Err(ParseError::Drop) => return Outcome::Drop,
            Err(ParseError::FormErr { id, flags }) => {
                return Outcome::Reply { bytes: bare_error(id, flags, rcode::FORMERR), rcode: rcode::FORMERR as u16, qtype: 0 };
            }
        };
        let qtype = query.qtype;
        let limit = match (&query.edns, transport) {
            (_, Transport::Tcp) => u16::MAX as usize,
            (Some(edns), Transport::Udp) => (edns.udp_size.min(EDNS_UDP_LIMIT) as usize).max(PLAIN_UDP_LIMIT),
            (None, Transport::Udp) => PLAIN_UDP_LIMIT,
        };
        let reply = |rcode: u16, authoritative: bool, answers: &[Record<'_>], authority: &[Record<'_>]| {
            let bytes = Writer { query: &query, ttl: self.ttl, out: Vec::with_capacity(128) }.finish(rcode, authoritative, answers, authority, false);
            let bytes = if bytes.len() > limit {
                // too big for the datagram: the client asks again over TCP
                Writer { query: &query, ttl: self.ttl, out: Vec::with_capacity(64) }.finish(rcode, authoritative, &[], &[], true)
            } else {
                bytes
            };
            Outcome::Reply { bytes, rcode, qtype }
        };
        if let Some(edns) = &query.edns
            && edns.version > 0
        {
            return reply(rcode::BADVERS, false, &[], &[]);
        }
        if (query.flags >> 11) & 0xF != 0 {
            return reply(rcode::NOTIMP as u16, false, &[], &[]);
        }
        if query.qclass != rtype::CLASS_IN && query.qclass != rtype::CLASS_ANY {
            return reply(rcode::NOTIMP as u16, false, &[], &[]);
        }
        if matches!(qtype, rtype::AXFR | rtype::IXFR | rtype::MAILA | rtype::MAILB) {
            return reply(rcode::NOTIMP as u16, false, &[], &[]);
        }
        let name = canonical_str(&query.name[..query.name_length]);
        // the owner pointer of the question name, and of its suffix with `labels` labels
        let pointer_to = |labels: usize| -> Owner {
            let skip = query.label_offsets.len().saturating_sub(labels);
            match query.label_offsets.get(skip) {
                Some(offset) => Owner::Pointer(offset),
                None => Owner::Pointer(12),
            }
        };
        let here = pointer_to(query.label_offsets.len());
        let serial = table.version();

        if let Some(zone) = table.zone_of(name) {
            let apex = pointer_to(zone.label_count());
            let soa = [Record::Soa { owner: apex, zone, serial }];
            let wants = |kind: u16| qtype == kind || qtype == rtype::ANY;
            if name == zone.as_str() {
                let mut answers = Vec::new();
                if wants(rtype::SOA) {
                    answers.push(Record::Soa { owner: here, zone, serial });
                }
                if wants(rtype::NS) {
                    answers.push(Record::Ns { owner: here, zone });
                }
                return if answers.is_empty() { reply(0, true, &[], &soa) } else { reply(0, true, &answers, &[]) };
            }
            if let Some(address) = table.address_of(name) {
                let matches = match address {
                    IpAddr::V4(_) => wants(rtype::A),
                    IpAddr::V6(_) => wants(rtype::AAAA),
                };
                return if matches { reply(0, true, &[Record::Address { owner: here, address }], &[]) } else { reply(0, true, &[], &soa) };
            }
            if name.split_once('.').is_some_and(|(first, rest)| first == NAMESERVER_LABEL && rest == zone.as_str()) {
                let answers: Vec<Record<'_>> = self
                    .nameserver_addresses
                    .iter()
                    .filter(|address| if address.is_ipv4() { wants(rtype::A) } else { wants(rtype::AAAA) })
                    .map(|&address| Record::Address { owner: here, address })
                    .collect();
                return if answers.is_empty() { reply(0, true, &[], &soa) } else { reply(0, true, &answers, &[]) };
            }
            if table.is_between(name) {
                return reply(0, true, &[], &soa);
            }
            return reply(rcode::NXDOMAIN as u16, true, &[], &soa);
        }

        // reverse names of the virtual ranges
        let reverse_zones: Vec<(Name, &Range)> = table.ranges().iter().map(|range| (reverse_zone(range), range)).collect();
        if let Some((zone, _)) = reverse_zones.iter().filter(|(zone, _)| is_within(name, zone.as_str())).max_by_key(|(zone, _)| zone.label_count()) {
            let apex = pointer_to(zone.label_count());
            let soa = [Record::Soa { owner: apex, zone, serial }];
            match reverse_address(name) {
                Some(address) if reverse_zones.iter().any(|(_, range)| range.contains(address)) => {
                    return match table.name_of(address) {
                        Some(target) if qtype == rtype::PTR || qtype == rtype::ANY => reply(0, true, &[Record::Ptr { owner: here, target }], &[]),
                        Some(_) => reply(0, true, &[], &soa),
                        None => reply(rcode::NXDOMAIN as u16, true, &[], &soa),
                    };
                }
                Some(_) => {}
                None if name == zone.as_str() && (qtype == rtype::SOA || qtype == rtype::ANY) => {
                    return reply(0, true, &[Record::Soa { owner: here, zone, serial }], &[]);
                }
                None if name == zone.as_str() && qtype == rtype::NS => return reply(0, true, &[Record::Ns { owner: here, zone }], &[]),
                // a partial reverse name inside the zone: it exists (addresses lie below)
                None => return reply(0, true, &[], &soa),
            }
        }
        if self.forward {
            return Outcome::Forward { qtype };
        }
        reply(rcode::REFUSED as u16, false, &[], &[])
    }
}
