//! SOCKS5 (RFC 1928) as the connector's unprivileged ingress speaks it: no
//! authentication on loopback, username/password (RFC 1929) required elsewhere,
//! CONNECT and UDP ASSOCIATE, IPv4 and IPv6 destinations (and domain names that
//! are address literals). Parsing only; the shell reads the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Refusal;

/// What a client's request asks for, or why it is refused (with the reply code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocksRequest {
    Connect(SocketAddr),
    /// UDP ASSOCIATE: the address the client says it will send from (often all zeros)
    UdpAssociate(SocketAddr),
    Refuse(u8),
}

/// Reply codes.
pub const SUCCEEDED: u8 = 0x00;
pub const GENERAL_FAILURE: u8 = 0x01;
pub const NOT_ALLOWED: u8 = 0x02;
pub const HOST_UNREACHABLE: u8 = 0x04;
pub const CONNECTION_REFUSED: u8 = 0x05;
pub const TTL_EXPIRED: u8 = 0x06;
pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// How many bytes the greeting `[5, n, methods…]` has, from its first two bytes;
/// `None` when it is not SOCKS5.
pub fn greeting_length(head: [u8; 2]) -> Option<usize> {
    (head[0] == 5 && head[1] > 0).then_some(2 + head[1] as usize)
}

/// The method "no authentication".
pub const METHOD_NONE: u8 = 0x00;
/// The method "username/password" (RFC 1929).
pub const METHOD_PASSWORD: u8 = 0x02;
/// No acceptable method.
pub const METHOD_REFUSED: u8 = 0xFF;

/// The method reply to a complete greeting: no authentication when offered and
/// none is required, username/password when required and offered, else "no acceptable method".
pub fn choose_method(greeting: &[u8], password_required: bool) -> [u8; 2] {
    let offered = greeting.get(2..).unwrap_or_default();
    let wanted = if password_required { METHOD_PASSWORD } else { METHOD_NONE };
    if offered.contains(&wanted) { [5, wanted] } else { [5, METHOD_REFUSED] }
}

/// Parses a complete RFC 1929 request `[1, ulen, user…, plen, pass…]` into
/// (username, password); `None` when malformed.
pub fn parse_password_request(request: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&version, rest) = request.split_first()?;
    if version != 1 {
        return None;
    }
    let (&user_length, rest) = rest.split_first()?;
    let user = rest.get(..user_length as usize)?;
    let rest = rest.get(user_length as usize..)?;
    let (&password_length, rest) = rest.split_first()?;
    let password = rest.get(..password_length as usize)?;
    (rest.len() == password_length as usize && !user.is_empty()).then_some((user, password))
}

/// The RFC 1929 status reply: success or failure (the client must then close).
pub fn password_reply(accepted: bool) -> [u8; 2] {
    [1, if accepted { 0 } else { 1 }]
}

/// How many bytes the request has, from its first five bytes
/// (`VER CMD RSV ATYP` and the first address byte); `None` when malformed.
pub fn request_length(head: [u8; 5]) -> Option<usize> {
    if head[0] != 5 || head[2] != 0 {
        return None;
    }
    match head[3] {
        1 => Some(4 + 4 + 2),
        4 => Some(4 + 16 + 2),
        3 if head[4] > 0 => Some(4 + 1 + head[4] as usize + 2),
        _ => None,
    }
}

/// Reads `ATYP ADDR PORT` at the start of `bytes`: the address (`None` when it
/// is a name that is no address literal, or an unknown type) and the bytes used;
/// `Err` with a reply code when the bytes are cut short or the type is unknown.
fn parse_address(bytes: &[u8]) -> Result<(Option<IpAddr>, usize), u8> {
    let (&kind, rest) = bytes.split_first().ok_or(GENERAL_FAILURE)?;
    let (address, length) = match kind {
        1 => (rest.get(..4).and_then(|bytes| <[u8; 4]>::try_from(bytes).ok()).map(|octets| IpAddr::V4(Ipv4Addr::from(octets))), 4),
        4 => (rest.get(..16).and_then(|bytes| <[u8; 16]>::try_from(bytes).ok()).map(|octets| IpAddr::V6(Ipv6Addr::from(octets))), 16),
        // a name is accepted when it is an address literal; client DNS names are not resolved here
        3 => {
            let length = *rest.first().ok_or(GENERAL_FAILURE)? as usize;
            (rest.get(1..1 + length).and_then(|name| std::str::from_utf8(name).ok()).and_then(|name| name.parse().ok()), 1 + length)
        }
        _ => return Err(ADDRESS_NOT_SUPPORTED),
    };
    if rest.len() < length + 2 {
        return Err(GENERAL_FAILURE);
    }
    Ok((address, 1 + length))
}

/// Reads `ATYP ADDR PORT` at the start of `bytes` into an address and port and the bytes used.
fn parse_endpoint(bytes: &[u8]) -> Result<(Option<SocketAddr>, usize), u8> {
    let (address, used) = parse_address(bytes)?;
    let port = bytes.get(used..used + 2).and_then(|bytes| <[u8; 2]>::try_from(bytes).ok()).map(u16::from_be_bytes).ok_or(GENERAL_FAILURE)?;
    Ok((address.map(|address| SocketAddr::new(address, port)), used + 2))
}

/// Parses a complete request.
pub fn parse_request(request: &[u8]) -> SocksRequest {
    let (Some(&command), Some(rest)) = (request.get(1), request.get(3..)) else { return SocksRequest::Refuse(GENERAL_FAILURE) };
    let address = match parse_endpoint(rest) {
        Ok((_, used)) if used != rest.len() => return SocksRequest::Refuse(GENERAL_FAILURE),
        Ok((address, _)) => address,
        Err(code) => return SocksRequest::Refuse(code),
    };
    match (command, address) {
        (1, Some(address)) => SocksRequest::Connect(address),
        (3, Some(address)) => SocksRequest::UdpAssociate(address),
        (1 | 3, None) => SocksRequest::Refuse(ADDRESS_NOT_SUPPORTED),
        _ => SocksRequest::Refuse(COMMAND_NOT_SUPPORTED),
    }
}

/// The reply to a request (bound address left unspecified).
pub fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// The success reply to UDP ASSOCIATE: where the client sends its datagrams.
pub fn associate_reply(relay: SocketAddr) -> Vec<u8> {
    let mut reply = vec![5, SUCCEEDED, 0];
    push_endpoint(&mut reply, relay);
    reply
}

fn push_endpoint(bytes: &mut Vec<u8>, endpoint: SocketAddr) {
    match endpoint.ip() {
        IpAddr::V4(address) => {
            bytes.push(1);
            bytes.extend_from_slice(&address.octets());
        }
        IpAddr::V6(address) => {
            bytes.push(4);
            bytes.extend_from_slice(&address.octets());
        }
    }
    bytes.extend_from_slice(&endpoint.port().to_be_bytes());
}

/// A datagram from a UDP ASSOCIATE client, `RSV RSV FRAG ATYP ADDR PORT DATA`:
/// its destination and payload. `None` for what is dropped: malformed, a
/// fragment (FRAG ≠ 0; RFC 1928 lets a server drop them), or a destination that
/// is a name.
pub fn parse_udp_datagram(datagram: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if datagram.get(..3)? != [0, 0, 0] {
        return None;
    }
    let (destination, used) = parse_endpoint(datagram.get(3..)?).ok()?;
    Some((destination?, datagram.get(3 + used..)?))
}

/// A reply datagram to a UDP ASSOCIATE client: the header naming where it came from, then the payload.
pub fn udp_datagram(from: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(22 + payload.len());
    datagram.extend_from_slice(&[0, 0, 0]);
    push_endpoint(&mut datagram, from);
    datagram.extend_from_slice(payload);
    datagram
}

/// The reply code for a refused flow.
pub fn refusal_code(refusal: &Refusal) -> u8 {
    match refusal {
        Refusal::Offline => HOST_UNREACHABLE,
        Refusal::Denied { .. } => NOT_ALLOWED,
        Refusal::PortNotAllowed | Refusal::ConnectFailed { .. } => CONNECTION_REFUSED,
        Refusal::Timeout => TTL_EXPIRED,
        Refusal::BadRequest { .. } => GENERAL_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_requests_and_replies() {
        assert_eq!(greeting_length([5, 2]), Some(4));
        assert_eq!(greeting_length([4, 1]), None, "SOCKS4 is not spoken");
        assert_eq!(greeting_length([5, 0]), None);
        assert_eq!(choose_method(&[5, 2, 0x02, 0x00], false), [5, 0]);
        assert_eq!(choose_method(&[5, 1, 0x02], false), [5, 0xFF], "only username/password offered");
        assert_eq!(choose_method(&[5, 2, 0x02, 0x00], true), [5, 0x02], "a password is required");
        assert_eq!(choose_method(&[5, 1, 0x00], true), [5, 0xFF], "no authentication is not acceptable then");
        let v4 = [5, 1, 0, 1, 100, 64, 0, 7, 0x01, 0xBD];
        assert_eq!(request_length([5, 1, 0, 1, 100]), Some(10));
        assert_eq!(parse_request(&v4), SocksRequest::Connect("100.64.0.7:445".parse().unwrap_or_else(|_| unreachable!())));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd7a::1".parse::<Ipv6Addr>().map(|address| address.octets()).unwrap_or_default());
        v6.extend_from_slice(&22u16.to_be_bytes());
        assert_eq!(request_length([5, 1, 0, 4, 0xfd]), Some(v6.len()));
        assert_eq!(parse_request(&v6), SocksRequest::Connect("[fd7a::1]:22".parse().unwrap_or_else(|_| unreachable!())));
        let mut literal = vec![5, 1, 0, 3, 10];
        literal.extend_from_slice(b"100.64.0.9");
        literal.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(request_length([5, 1, 0, 3, 10]), Some(literal.len()));
        assert_eq!(parse_request(&literal), SocksRequest::Connect("100.64.0.9:80".parse().unwrap_or_else(|_| unreachable!())));
        let mut name = vec![5, 1, 0, 3, 7];
        name.extend_from_slice(b"a.b.com");
        name.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(parse_request(&name), SocksRequest::Refuse(ADDRESS_NOT_SUPPORTED));
        let bind = [5, 2, 0, 1, 100, 64, 0, 7, 0, 80];
        assert_eq!(parse_request(&bind), SocksRequest::Refuse(COMMAND_NOT_SUPPORTED));
        let associate = [5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_request(&associate), SocksRequest::UdpAssociate("0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!())));
        assert_eq!(parse_request(&[5, 1, 0, 1, 100, 64, 0, 7, 0]), SocksRequest::Refuse(GENERAL_FAILURE), "cut short");
        assert_eq!(request_length([5, 1, 1, 1, 0]), None, "reserved byte must be 0");
        assert_eq!(request_length([5, 1, 0, 9, 0]), None);
        assert_eq!(reply(SUCCEEDED)[1], 0);
        assert_eq!(refusal_code(&Refusal::Denied { rule: None }), NOT_ALLOWED);
    }

    #[test]
    fn udp_associate_datagrams_both_ways() {
        let from: SocketAddr = "[fd7a:115c:a1e0::1]:53".parse().unwrap_or_else(|_| unreachable!());
        let reply = udp_datagram(from, b"answer");
        assert_eq!(reply.len(), 3 + 1 + 16 + 2 + 6);
        assert_eq!(parse_udp_datagram(&reply), Some((from, &b"answer"[..])), "what goes out parses back");
        let v4 = [0, 0, 0, 1, 100, 64, 0, 1, 0, 53, b'q'];
        assert_eq!(parse_udp_datagram(&v4), Some(("100.64.0.1:53".parse().unwrap_or_else(|_| unreachable!()), &b"q"[..])));
        assert_eq!(parse_udp_datagram(&[0, 0, 0, 1, 100, 64, 0, 1, 0, 53]).map(|(_, payload)| payload.len()), Some(0), "an empty payload");
        assert_eq!(parse_udp_datagram(&[0, 0, 1, 1, 100, 64, 0, 1, 0, 53, b'q']), None, "a fragment is dropped");
        assert_eq!(parse_udp_datagram(&[0, 0, 0, 1, 100, 64, 0]), None, "cut short");
        let mut name = vec![0, 0, 0, 3, 7];
        name.extend_from_slice(b"a.b.com");
        name.extend_from_slice(&[0, 53, b'q']);
        assert_eq!(parse_udp_datagram(&name), None, "names are not resolved");
        assert_eq!(associate_reply("10.0.0.1:4000".parse().unwrap_or_else(|_| unreachable!())), vec![5, 0, 0, 1, 10, 0, 0, 1, 0x0f, 0xa0]);
    }

    #[test]
    fn username_password_requests() {
        assert_eq!(parse_password_request(&[1, 3, b'b', b'o', b'b', 2, b'p', b'w']), Some((&b"bob"[..], &b"pw"[..])));
        assert_eq!(parse_password_request(&[1, 0, 0]), None, "an empty username");
        assert_eq!(parse_password_request(&[2, 1, b'a', 0]), None, "another version");
        assert_eq!(parse_password_request(&[1, 3, b'b', b'o']), None, "cut short");
        assert_eq!(parse_password_request(&[1, 1, b'a', 1, b'p', b'x']), None, "bytes past the password");
        assert_eq!(password_reply(true), [1, 0]);
        assert_eq!(password_reply(false), [1, 1]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for length in 0..24 {
            for fill in [0u8, 1, 3, 4, 5, 255] {
                let bytes = vec![fill; length];
                let _ = parse_request(&bytes);
                let _ = choose_method(&bytes, true);
                let _ = parse_password_request(&bytes);
                let _ = parse_udp_datagram(&bytes);
            }
        }
    }
}
