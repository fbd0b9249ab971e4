//! The tunnel's TCP socket with a read-ahead buffer under TLS.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs
//! four or five `recv` calls when it reads the socket itself. Under bulk traffic
//! that is most of the relay's system calls. [`ReadAhead`] reads the socket in
//! pieces of up to [`READ_AHEAD`] bytes and hands rustls its small reads from
//! memory: one system call per 64 KiB instead of one per 4 KiB, for one memcpy of
//! each byte. Writes go straight to the socket.
//!
//! The buffer exists only while data flows: it is released once a read drained
//! the socket, so an idle tunnel (thousands of agents on one broker) holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest read from the socket at once.
pub const READ_AHEAD: usize = 64 * 1024;

/// A TCP stream whose reads are buffered (see the module's text).
#[derive(Debug)]
pub struct ReadAhead {
    stream: TcpStream,
    buffer: BytesMut,
    /// the last read from the socket filled the buffer: more is probably waiting
    busy: bool,
}

impl ReadAhead {
    pub fn new(stream: TcpStream) -> ReadAhead {
        ReadAhead { stream, buffer: BytesMut::new(), busy: false }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes read from the socket and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            self.buffer.reserve(READ_AHEAD);
            let room = READ_AHEAD.min(self.buffer.capacity() - self.buffer.len());
            let mut limited = (&mut self.buffer).limit(room);
            // `try_read_buf` clears the readiness on WouldBlock, so the next poll waits
            match self.stream.try_read_buf(&mut limited) {
                Ok(read) => {
                    self.busy = read == room;
                    return Poll::Ready(Ok(read));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffer.is_empty() {
            if out.remaining() >= READ_AHEAD {
                // a reader that asks for this much needs no buffer of ours
                return Pin::new(&mut this.stream).poll_read(cx, out);
            }
            if ready!(this.fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let taken = this.buffer.len().min(out.remaining());
        out.put_slice(&this.buffer[..taken]);
        this.buffer.advance(taken);
        if this.buffer.is_empty() && !this.busy {
            // the socket is drained: an idle tunnel keeps no buffer
            this.buffer = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The TCP congestion control of the data plane's connections: the tunnels, the
/// connector's intercepted connections and the agent's connections to local services.
///
/// BBR paces every connection with a timer per burst of packets; on a virtual
/// machine each timer is an exit to the hypervisor, and a relayed flow crosses
/// three of Reachback's sending sockets in each direction. CUBIC sends by the
/// window and sets no such timers: measured in the lab of `docs/benchmarks.md` on
/// a machine whose default is BBR, it cut the relay's CPU per byte by about a
/// quarter. So Reachback asks for CUBIC unless told otherwise (`--tcp-congestion`,
/// see `docs/decisions.md`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// whatever the machine's `net.ipv4.tcp_congestion_control` says
    #[default]
    System,
    /// a named algorithm (`cubic`, `bbr`, `reno`, …)
    Named(String),
}

/// What the tunnel asks for when nobody says otherwise.
pub const DEFAULT_CONGESTION: &str = "cubic";

impl Congestion {
    /// Reads `--tcp-congestion`: `system`, or the name of an algorithm this
    /// machine offers (checked on a throwaway socket). With no value, CUBIC where
    /// it can be had and the system's choice where it cannot.
    pub fn resolve(requested: Option<&str>) -> anyhow::Result<Congestion> {
        let Some(name) = requested else {
            let wanted = Congestion::Named(DEFAULT_CONGESTION.into());
            return Ok(match wanted.probe() {
                Ok(()) => wanted,
                Err(error) => {
                    tracing::info!(algorithm = DEFAULT_CONGESTION, %error, "the data plane keeps the system's TCP congestion control");
                    Congestion::System
                }
            });
        };
        if name == "system" {
            return Ok(Congestion::System);
        }
        anyhow::ensure!(
            !name.is_empty() && name.len() < 16 && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'),
            "--tcp-congestion must be `system` or an algorithm's name (lowercase letters, digits, `_`; at most 15), not {name:?}"
        );
        let congestion = Congestion::Named(name.into());
        congestion.probe().map_err(|error| {
            let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap_or_default();
            anyhow::anyhow!("TCP congestion control {name:?} cannot be used here ({error}); this machine offers: {}", available.trim())
        })?;
        Ok(congestion)
    }

    fn probe(&self) -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        self.apply(&socket)
    }

    /// Sets the algorithm on a TCP socket (nothing for [`Congestion::System`]).
    pub fn apply<S: std::os::fd::AsFd>(&self, socket: &S) -> std::io::Result<()> {
        match self {
            Congestion::System => Ok(()),
            Congestion::Named(name) => socket2::SockRef::from(socket).set_tcp_congestion(name.as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (ReadAhead::new(accepted.expect("accept").0), client.expect("connect"))
    }

    #[tokio::test]
    async fn small_reads_come_from_one_large_socket_read_in_order() {
        let (mut reader, mut writer) = pair().await;
        let sent: Vec<u8> = (0..200_000u32).map(|index| (index % 251) as u8).collect();
        let sending = sent.clone();
        let write = tokio::spawn(async move {
            writer.write_all(&sending).await.expect("write");
            writer.shutdown().await.expect("shutdown");
        });
        let mut received = Vec::new();
        let mut piece = [0u8; 4096];
        let mut saw_buffered = false;
        loop {
            let read = reader.read(&mut piece).await.expect("read");
            if read == 0 {
                break;
            }
            saw_buffered |= reader.buffered() > 0;
            received.extend_from_slice(&piece[..read]);
        }
        write.await.expect("writer");
        assert_eq!(received, sent, "every byte, in order, then the end");
        assert!(saw_buffered, "4 KiB reads were served from a larger socket read");
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn congestion_names_are_checked_before_use() {
        assert_eq!(Congestion::resolve(Some("system")).expect("system"), Congestion::System);
        let error = Congestion::resolve(Some("no-such thing")).expect_err("a bad name").to_string();
        assert!(error.contains("--tcp-congestion must be"), "{error}");
        let error = Congestion::resolve(Some("nosuchalgo")).expect_err("an unknown algorithm").to_string();
        assert!(error.contains("cannot be used here") && error.contains("this machine offers"), "{error}");
        // reno is built into every Linux kernel
        assert_eq!(Congestion::resolve(Some("reno")).expect("reno"), Congestion::Named("reno".into()));
        let default = Congestion::resolve(None).expect("the default");
        assert!(matches!(&default, Congestion::System) || default == Congestion::Named(DEFAULT_CONGESTION.into()), "{default:?}");
    }

    #[tokio::test]
    async fn the_algorithm_is_set_on_the_socket() {
        let (reader, _writer) = pair().await;
        Congestion::Named("reno".into()).apply(reader.get_ref()).expect("reno");
        let name = socket2::SockRef::from(reader.get_ref()).tcp_congestion().expect("read back");
        assert_eq!(String::from_utf8_lossy(&name).trim_end_matches('\0'), "reno");
    }

    #[tokio::test]
    async fn a_drained_socket_leaves_no_buffer_and_writes_pass_through() {
        let (mut reader, mut writer) = pair().await;
        writer.write_all(b"ping").await.expect("write");
        let mut piece = [0u8; 16];
        let read = reader.read(&mut piece).await.expect("read");
        assert_eq!(&piece[..read], b"ping");
        assert_eq!(reader.buffer.capacity(), 0, "an idle tunnel holds no read buffer");
        reader.write_all(b"pong").await.expect("write back");
        let read = writer.read(&mut piece).await.expect("read back");
        assert_eq!(&piece[..read], b"pong");
    }
}
