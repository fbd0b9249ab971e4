//! Datagram I/O shared by the agent and the connector: reading a UDP socket
//! straight into the form a datagram takes on a flow's stream
//! ([`reachback_proto::datagram`]), through one scratch buffer per thread, so a
//! UDP flow holds no receive buffer of its own while it waits (thousands of idle
//! flows cost no 64 KiB each).

use std::cell::RefCell;

use bytes::Bytes;
use reachback_proto::datagram::{DATAGRAM_HEADER, MAX_DATAGRAM};
use tokio::net::UdpSocket;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; DATAGRAM_HEADER + MAX_DATAGRAM]);
}

/// The next datagram from a connected socket, already framed (length prefix and
/// payload) and copied to its exact size.
pub async fn recv_framed(socket: &UdpSocket) -> std::io::Result<Bytes> {
    loop {
        socket.readable().await?;
        let received = SCRATCH.with_borrow_mut(|scratch| {
            let length = socket.try_recv(&mut scratch[DATAGRAM_HEADER..])?;
            // a datagram is never longer than the prefix counts: the buffer holds MAX_DATAGRAM at most
            scratch[..DATAGRAM_HEADER].copy_from_slice(&(length as u16).to_be_bytes());
            Ok::<_, std::io::Error>(Bytes::copy_from_slice(&scratch[..DATAGRAM_HEADER + length]))
        });
        match received {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// The next datagram on a socket with its source, framed like [`recv_framed`]'s.
pub async fn recv_framed_from(socket: &UdpSocket) -> std::io::Result<(std::net::SocketAddr, Bytes)> {
    loop {
        socket.readable().await?;
        let received = SCRATCH.with_borrow_mut(|scratch| {
            let (length, source) = socket.try_recv_from(&mut scratch[DATAGRAM_HEADER..])?;
            scratch[..DATAGRAM_HEADER].copy_from_slice(&(length as u16).to_be_bytes());
            Ok::<_, std::io::Error>((source, Bytes::copy_from_slice(&scratch[..DATAGRAM_HEADER + length])))
        });
        match received {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}
