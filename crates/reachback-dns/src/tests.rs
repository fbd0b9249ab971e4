//! The answerer driven with hand-made queries: every record type and answer code
//! it promises, case, punycode names, the SOA in negative answers, truncation and
//! malformed input.

use std::net::IpAddr;

use crate::answer::{EDNS_UDP_LIMIT, reverse_address};
use crate::{Answerer, Name, Outcome, Range, Table, Transport, rcode, rtype};

fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.').filter(|label| !label.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&rtype::CLASS_IN.to_be_bytes());
    if let Some(size) = edns {
        out.push(0);
        out.extend_from_slice(&rtype::OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

/// What a reply says: rcode (with the extended bits), flags, section counts, and the answers' rdata.
#[derive(Debug)]
struct Reply {
    id: u16,
    flags: u16,
    rcode: u16,
    counts: [u16; 4],
    /// (type, ttl, rdata) of every record in the answer and authority sections
    records: Vec<(u16, u32, Vec<u8>)>,
    bytes: Vec<u8>,
}

fn skip_name(bytes: &[u8], mut at: usize) -> usize {
    loop {
        let length = bytes[at];
        if length == 0 {
            return at + 1;
        }
        if length & 0xC0 == 0xC0 {
            return at + 2;
        }
        at += 1 + length as usize;
    }
}

fn reply(outcome: Outcome) -> Reply {
    let Outcome::Reply { bytes, rcode, .. } = outcome else { panic!("no reply: {outcome:?}") };
    let word = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let counts = [word(4), word(6), word(8), word(10)];
    let mut at = 12;
    for _ in 0..counts[0] {
        at = skip_name(&bytes, at) + 4;
    }
    let mut records = Vec::new();
    for _ in 0..counts[1] + counts[2] {
        at = skip_name(&bytes, at);
        let kind = word(at);
        let ttl = u32::from_be_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let length = word(at + 8) as usize;
        records.push((kind, ttl, bytes[at + 10..at + 10 + length].to_vec()));
        at += 10 + length;
    }
    Reply { id: word(0), flags: word(2), rcode, counts, records, bytes }
}

fn table() -> Table {
    let ranges = [Range::parse("100.64.0.0/16").expect("range"), Range::parse("fd7a:115c:a1e0::/64").expect("range")];
    let mut table = Table::new(&["corp.example"], &ranges).expect("table");
    table.bind("alice-laptop.corp.example", "100.64.0.7".parse().expect("ip")).expect("bind");
    table.bind("bob.laptops.corp.example", "fd7a:115c:a1e0::5".parse().expect("ip")).expect("bind");
    table.bind("xn--caf-dma.corp.example", "100.64.0.8".parse().expect("ip")).expect("bind");
    table
}

fn ask(table: &Table, name: &str, qtype: u16) -> Reply {
    reply(Answerer::default().answer(table, &query(0x1234, name, qtype, None), Transport::Udp))
}

#[test]
fn a_and_aaaa_for_bound_hostnames_in_any_case() {
    let table = table();
    let answer = ask(&table, "Alice-LAPTOP.corp.EXAMPLE", rtype::A);
    assert_eq!((answer.id, answer.rcode, answer.counts), (0x1234, rcode::NOERROR as u16, [1, 1, 0, 0]));
    assert_eq!(answer.flags & 0x0400, 0x0400, "authoritative");
    assert_eq!(answer.flags & 0x0100, 0x0100, "RD echoed");
    assert_eq!(answer.records, vec![(rtype::A, 10, vec![100, 64, 0, 7])]);
    assert_eq!(&answer.bytes[12..12 + 14], b"\x0cAlice-LAPTOP\x04", "the question is echoed in its own case");
    let v6 = ask(&table, "bob.laptops.corp.example", rtype::AAAA);
    assert_eq!(v6.records[0].0, rtype::AAAA);
    assert_eq!(v6.records[0].2, "fd7a:115c:a1e0::5".parse::<std::net::Ipv6Addr>().expect("ip").octets().to_vec());
    let punycode = ask(&table, "XN--CAF-DMA.corp.example", rtype::A);
    assert_eq!(punycode.records, vec![(rtype::A, 10, vec![100, 64, 0, 8])], "IDNs answer by their ASCII form");
}

#[test]
fn the_other_family_is_nodata_and_unknown_names_nxdomain_both_with_the_soa() {
    let table = table();
    for (name, qtype, expected) in [
        ("alice-laptop.corp.example", rtype::AAAA, rcode::NOERROR),
        ("alice-laptop.corp.example", 16, rcode::NOERROR),  // TXT: the name exists
        ("laptops.corp.example", rtype::A, rcode::NOERROR), // an empty non-terminal exists
        ("nobody.corp.example", rtype::A, rcode::NXDOMAIN),
        ("deep.nobody.corp.example", rtype::AAAA, rcode::NXDOMAIN),
    ] {
        let answer = ask(&table, name, qtype);
        assert_eq!(answer.rcode, expected as u16, "{name} {qtype}");
        assert_eq!(answer.counts[1], 0, "{name}: no answer");
        assert_eq!(answer.counts[2], 1, "{name}: the SOA in the authority section");
        assert_eq!(answer.records[0].0, rtype::SOA);
        let soa = &answer.records[0].2;
        let minimum = u32::from_be_bytes(soa[soa.len() - 4..].try_into().expect("minimum"));
        assert_eq!(minimum, 10, "negative answers are cached for the short TTL");
    }
}

#[test]
fn soa_and_ns_at_each_apex_and_the_name_server_itself() {
    let mut table = table();
    table.set_zones(&["corp.example", "lab.example"]).expect("zones");
    let soa = ask(&table, "corp.example", rtype::SOA);
    assert_eq!((soa.rcode, soa.counts[1]), (0, 1));
    assert!(soa.records[0].2.starts_with(b"\x0dreachback-dns\x04corp\x07example\x00\x0ahostmaster\x04corp\x07example\x00"));
    let ns = ask(&table, "LAB.example", rtype::NS);
    assert_eq!(ns.records, vec![(rtype::NS, 10, b"\x0dreachback-dns\x03lab\x07example\x00".to_vec())]);
    let any = ask(&table, "corp.example", rtype::ANY);
    assert_eq!(any.counts[1], 2, "SOA and NS");
    let answerer = Answerer { nameserver_addresses: vec!["10.0.0.53".parse().expect("ip")], ..Answerer::default() };
    let glue = reply(answerer.answer(&table, &query(1, "reachback-dns.corp.example", rtype::A, None), Transport::Udp));
    assert_eq!(glue.records, vec![(rtype::A, 10, vec![10, 0, 0, 53])]);
    let serial_before = u32::from_be_bytes(soa.records[0].2[soa.records[0].2.len() - 20..][..4].try_into().expect("serial"));
    table.bind("carol.corp.example", "100.64.0.9".parse().expect("ip")).expect("bind");
    let after = ask(&table, "corp.example", rtype::SOA);
    let serial_after = u32::from_be_bytes(after.records[0].2[after.records[0].2.len() - 20..][..4].try_into().expect("serial"));
    assert!(serial_after > serial_before, "a change moves the serial");
}

#[test]
fn ptr_for_bound_addresses_in_both_families() {
    let table = table();
    let v4 = ask(&table, "7.0.64.100.in-addr.arpa", rtype::PTR);
    assert_eq!(v4.records, vec![(rtype::PTR, 10, b"\x0calice-laptop\x04corp\x07example\x00".to_vec())]);
    let nibbles: String = "fd7a115ca1e000000000000000000005".chars().rev().map(|nibble| format!("{nibble}.")).collect();
    let v6 = ask(&table, &format!("{nibbles}ip6.arpa"), rtype::PTR);
    assert_eq!(v6.records[0].2, b"\x03bob\x07laptops\x04corp\x07example\x00".to_vec());
    let free = ask(&table, "99.0.64.100.in-addr.arpa", rtype::PTR);
    assert_eq!((free.rcode, free.counts[2]), (rcode::NXDOMAIN as u16, 1), "an unbound address in a range: NXDOMAIN with the reverse zone's SOA");
    let outside = ask(&table, "1.1.168.192.in-addr.arpa", rtype::PTR);
    assert_eq!(outside.rcode, rcode::REFUSED as u16, "not ours");
    assert_eq!(reverse_address(Name::parse("7.0.64.100.in-addr.arpa").expect("name").as_str()), Some("100.64.0.7".parse::<IpAddr>().expect("ip")));
    assert_eq!(reverse_address(Name::parse("07.0.64.100.in-addr.arpa").expect("name").as_str()), None, "no leading zeros");
}

#[test]
fn other_names_are_refused_or_forwarded() {
    let table = table();
    let refused = ask(&table, "www.example.org", rtype::A);
    assert_eq!((refused.rcode, refused.flags & 0x0400, refused.counts), (rcode::REFUSED as u16, 0, [1, 0, 0, 0]));
    let answerer = Answerer { forward: true, ..Answerer::default() };
    assert_eq!(answerer.answer(&table, &query(1, "www.example.org", rtype::A, None), Transport::Udp), Outcome::Forward { qtype: rtype::A });
    let evil = ask(&table, "evilcorp.example", rtype::A);
    assert_eq!(evil.rcode, rcode::REFUSED as u16, "a suffix of the zone's text is not the zone");
}

#[test]
fn edns_is_echoed_and_large_answers_truncate_over_udp_only() {
    let mut table = table();
    let answer = reply(Answerer::default().answer(&table, &query(9, "alice-laptop.corp.example", rtype::A, Some(4096)), Transport::Udp));
    assert_eq!(answer.counts[3], 1, "our OPT record");
    let opt = &answer.bytes[answer.bytes.len() - 11..];
    assert_eq!(u16::from_be_bytes([opt[3], opt[4]]), EDNS_UDP_LIMIT);
    // a long zone name makes the negative answer's SOA big: past 512 bytes without EDNS
    let long_zone = format!("{}.example", ["a".repeat(63), "b".repeat(63), "c".repeat(60)].join("."));
    table.set_zones(&[&long_zone]).expect("zone");
    let name = format!("{}.{long_zone}", "d".repeat(50));
    let small = reply(Answerer::default().answer(&table, &query(2, &name, rtype::A, None), Transport::Udp));
    assert_eq!(small.flags & 0x0200, 0x0200, "TC set: {} bytes would not fit", small.bytes.len());
    assert_eq!(small.counts[2], 0);
    assert!(small.bytes.len() <= 512);
    let over_tcp = reply(Answerer::default().answer(&table, &query(2, &name, rtype::A, None), Transport::Tcp));
    assert_eq!((over_tcp.flags & 0x0200, over_tcp.counts[2]), (0, 1), "TCP carries it whole");
    let with_edns = reply(Answerer::default().answer(&table, &query(2, &name, rtype::A, Some(1232)), Transport::Udp));
    assert_eq!(with_edns.flags & 0x0200, 0, "EDNS makes room");
}

#[test]
fn malformed_and_unsupported_queries_get_proper_errors() {
    let table = table();
    let answerer = Answerer::default();
    let answer = |bytes: &[u8]| answerer.answer(&table, bytes, Transport::Udp);
    assert_eq!(answer(&[]), Outcome::Drop);
    assert_eq!(answer(&[1, 2, 3]), Outcome::Drop, "too short to carry a header");
    let mut response = query(5, "alice-laptop.corp.example", rtype::A, None);
    response[2] |= 0x80;
    assert_eq!(answer(&response), Outcome::Drop, "a response is never answered");
    // two questions, a cut name, a compression pointer in the question, trailing bytes
    let mut two = query(5, "a.corp.example", rtype::A, None);
    two[5] = 2;
    assert_eq!(reply(answer(&two)).rcode, rcode::FORMERR as u16);
    let whole = query(5, "alice-laptop.corp.example", rtype::A, None);
    for cut in 13..whole.len() {
        assert_eq!(reply(answer(&whole[..cut])).rcode, rcode::FORMERR as u16, "cut at {cut}");
    }
    let mut pointer = query(5, "x.corp.example", rtype::A, None);
    pointer[12] = 0xC0;
    assert_eq!(reply(answer(&pointer)).rcode, rcode::FORMERR as u16);
    let mut trailing = whole.clone();
    trailing.push(0);
    assert_eq!(reply(answer(&trailing)).rcode, rcode::FORMERR as u16);
    let mut long_label = query(5, "x.corp.example", rtype::A, None);
    long_label[12] = 64;
    assert_eq!(reply(answer(&long_label)).rcode, rcode::FORMERR as u16);
    // another opcode, another class, zone transfers, an EDNS version we do not speak
    let mut notify = whole.clone();
    notify[2] = 0x20;
    assert_eq!(reply(answer(&notify)).rcode, rcode::NOTIMP as u16);
    let mut chaos = whole.clone();
    let class_at = chaos.len() - 2;
    chaos[class_at..].copy_from_slice(&3u16.to_be_bytes());
    assert_eq!(reply(answer(&chaos)).rcode, rcode::NOTIMP as u16);
    assert_eq!(ask(&table, "corp.example", rtype::AXFR).rcode, rcode::NOTIMP as u16);
    let mut version = query(5, "alice-laptop.corp.example", rtype::A, Some(1232));
    let version_at = version.len() - 5;
    version[version_at] = 1;
    assert_eq!(reply(answer(&version)).rcode, rcode::BADVERS);
}

#[test]
fn arbitrary_bytes_never_panic() {
    let table = table();
    let answerer = Answerer::default();
    let seed = query(0x4242, "alice-laptop.corp.example", rtype::A, Some(1232));
    // every single-byte change of a valid query, and every prefix
    for at in 0..seed.len() {
        for value in [0u8, 1, 0x3F, 0x40, 0xC0, 0xFF] {
            let mut bytes = seed.clone();
            bytes[at] = value;
            let _ = answerer.answer(&table, &bytes, Transport::Udp);
            let _ = answerer.answer(&table, &bytes[..at], Transport::Tcp);
        }
    }
    // pseudo-random messages
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let length = (state % 80) as usize;
        let bytes: Vec<u8> = (0..length).map(|index| (state >> (index % 8 * 8)) as u8 ^ index as u8).collect();
        let _ = answerer.answer(&table, &bytes, Transport::Udp);
    }
}
