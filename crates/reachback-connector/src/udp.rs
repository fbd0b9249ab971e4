//! UDP flows: the connector's side. Each (server address and port, virtual
//! address and port) pair is one flow: a tunnel stream opened with a
//! [`FlowOpen`] for UDP, then datagrams both ways ([`reachback_proto::datagram`]).
//!
//! [`UdpIngress`] owns the table of live flows ([`FlowTable`]: the cap on flows,
//! idle expiry). Ingress hands it each datagram with its source and original
//! destination ([`UdpIngress::datagram`]); a known flow takes it into its queue,
//! an unknown pair starts a flow. Every queue is bounded and every write to the
//! tunnel is all-or-nothing without waiting: a datagram that finds no room is
//! dropped and counted, never held.
//!
//! Replies go back from the virtual address and port to the server:
//! - `tproxy` mode ([`Reply::Transparent`]): the flow's own socket, bound
//!   (IP_TRANSPARENT) to the virtual address and port and connected to the
//!   server. TPROXY then hands the flow's later datagrams to that socket too (the
//!   kernel prefers a connected socket), so the listener sees only each flow's first.
//! - `tun` mode ([`Reply::Packet`]): a function that writes an IP packet to the device.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use reachback_proto::datagram::{DatagramDecoder, FlowTable, MAX_DATAGRAM, encode_datagram};
use reachback_proto::{FlowOpen, FlowReply, Transport};
use reachback_tunnel::{Connection, End, SendStream, write_frame};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::metrics::{Metrics, label};

/// What `--udp-*` set.
#[derive(Clone, Debug)]
pub struct UdpOptions {
    /// a flow with no datagram either way for this long ends
    pub idle_timeout: Duration,
    /// the most flows held at once; datagrams of further pairs are dropped
    pub max_flows: usize,
    /// datagrams queued per flow while its stream opens or is busy
    pub queue: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions { idle_timeout: Duration::from_secs(60), max_flows: 65_536, queue: 64 }
    }
}

/// How long a pair the broker refused stays refused at the connector: its
/// datagrams are dropped (and counted) without asking again, so a flood to a
/// denied port costs the broker one question per pair and period.
const REFUSAL_HOLD: Duration = Duration::from_secs(5);
/// How long the broker has to answer a UDP flow request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(8);

/// Writes a UDP packet (`from` the virtual address and port, `to` the server, payload).
pub type PacketWriter = Arc<dyn Fn(SocketAddr, SocketAddr, &[u8]) + Send + Sync>;

/// How replies reach the server.
#[derive(Clone)]
pub enum Reply {
    /// a transparent socket bound to the virtual address (tproxy mode)
    Transparent,
    /// write a UDP packet `from` the virtual address `to` the server (tun mode)
    Packet(PacketWriter),
}

/// (server, virtual destination)
type Pair = (SocketAddr, SocketAddr);

struct Handle {
    id: u64,
    queue: Arc<FlowQueue>,
}

/// The datagrams waiting for one flow's task: bounded, and holding no room while
/// empty (a channel would keep a block of 32 slots for every idle flow).
struct FlowQueue {
    /// the datagrams, and whether the flow ended (nothing more is queued then)
    items: Mutex<(std::collections::VecDeque<Bytes>, bool)>,
    ready: tokio::sync::Notify,
    capacity: usize,
}

impl FlowQueue {
    fn new(capacity: usize) -> Arc<FlowQueue> {
        Arc::new(FlowQueue { items: Mutex::new((std::collections::VecDeque::new(), false)), ready: tokio::sync::Notify::new(), capacity: capacity.max(1) })
    }

    /// Queues a datagram; `false` when the queue is full or closed (it is dropped).
    fn push(&self, framed: Bytes) -> bool {
        {
            let mut queue = lock(&self.items);
            if queue.1 || queue.0.len() >= self.capacity {
                return false;
            }
            queue.0.push_back(framed);
        }
        self.ready.notify_one();
        true
    }

    /// The next datagram; `None` once the queue is closed and empty. Cancel-safe.
    async fn pop(&self) -> Option<Bytes> {
        loop {
            {
                let mut queue = lock(&self.items);
                if let Some(framed) = queue.0.pop_front() {
                    if queue.0.is_empty() {
                        queue.0 = std::collections::VecDeque::new();
                    }
                    return Some(framed);
                }
                if queue.1 {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Ends the flow: its task sees the end once it took what is queued.
    fn close(&self) {
        lock(&self.items).1 = true;
        self.ready.notify_one();
    }
}

/// The connector's UDP flows.
pub struct UdpIngress {
    table: Mutex<FlowTable<Pair, Handle>>,
    tunnel: watch::Receiver<Option<Connection>>,
    options: UdpOptions,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// the counters of each direction, looked up once (not per flow)
    to_client: Direction,
    to_server: Direction,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl UdpIngress {
    pub fn new(options: UdpOptions, tunnel: watch::Receiver<Option<Connection>>, metrics: Arc<Metrics>) -> Arc<UdpIngress> {
        let ingress = Arc::new(UdpIngress {
            table: Mutex::new(FlowTable::new(options.max_flows, options.idle_timeout)),
            tunnel,
            options,
            to_client: Direction::new(&metrics, "to_client"),
            to_server: Direction::new(&metrics, "to_server"),
            metrics,
            next_id: AtomicU64::new(1),
        });
        // expiry: one sweep a second ends the flows idle for the timeout (dropping a
        // handle closes its queue, and its task ends)
        let weak = Arc::downgrade(&ingress);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(ingress) = weak.upgrade() else { return };
                let expired = lock(&ingress.table).expire(Instant::now());
                for (_, handle) in &expired {
                    handle.queue.close();
                }
                if !expired.is_empty() {
                    tracing::trace!(flows = expired.len(), "idle UDP flows ended");
                }
                ingress.metrics.udp_flows_active.set(lock(&ingress.table).len() as i64);
            }
        });
        ingress
    }

    fn drop_datagram(&self, reason: &str) {
        self.metrics.udp_dropped.get_or_create(&label("reason", reason)).inc();
    }

    /// Flows held now.
    pub fn flows(&self) -> usize {
        lock(&self.table).len()
    }

    /// One datagram from `source` to the virtual `destination`.
    pub fn datagram(self: &Arc<Self>, source: SocketAddr, destination: SocketAddr, payload: &[u8], reply: &Reply) {
        let Some(framed) = encode_datagram(payload) else { return self.drop_datagram("too_large") };
        let framed = Bytes::from(framed);
        let now = Instant::now();
        let mut table = lock(&self.table);
        if let Some(handle) = table.touch(&(source, destination), now) {
            if !handle.queue.push(framed) {
                drop(table);
                self.drop_datagram("queue_full");
            }
            return;
        }
        let queue = FlowQueue::new(self.options.queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match table.insert((source, destination), Handle { id, queue: queue.clone() }, now) {
            Ok(replaced) => {
                if let Some(replaced) = replaced {
                    replaced.queue.close();
                }
            }
            Err(_) => {
                drop(table);
                return self.drop_datagram("table_full");
            }
        }
        drop(table);
        queue.push(framed);
        tokio::spawn(self.clone().run_flow(id, source, destination, queue, reply.clone()));
    }

    fn forget(&self, id: u64, pair: &Pair) {
        lock(&self.table).remove_if(pair, |handle| handle.id == id);
    }

    fn touch(&self, pair: &Pair) {
        lock(&self.table).touch(pair, Instant::now());
    }

    async fn run_flow(self: Arc<Self>, id: u64, source: SocketAddr, destination: SocketAddr, queued: Arc<FlowQueue>, reply: Reply) {
        let pair = (source, destination);
        let outcome = self.relay_flow(&pair, queued, reply).await;
        if let Err(error) = outcome {
            tracing::debug!(%source, %destination, error = format!("{error:#}"), "UDP flow ended");
        }
        self.forget(id, &pair);
    }

    async fn relay_flow(self: &Arc<Self>, pair: &Pair, queued: Arc<FlowQueue>, reply: Reply) -> anyhow::Result<()> {
        let (source, destination) = *pair;
        let tunnel = self.tunnel.borrow().clone();
        let Some(tunnel) = tunnel else {
            self.drop_datagram("no_tunnel");
            return self.hold_refused(pair, queued, &None).await;
        };
        let (mut send, mut recv) = tunnel.open_bi().await.context("opening a stream")?;
        // the request waits for the tunnel's credit; meanwhile the flow's datagrams are
        // dropped, not held (a queue per flow of 64 KiB datagrams, for every pair of a
        // flood, while the tunnel is full), and no credit for as long as an answer may
        // take ends the flow
        let requested = {
            let request = FlowOpen { destination, source, user: None, protocol: Transport::Udp };
            let write = tokio::time::timeout(REPLY_TIMEOUT, write_frame(&mut send, &request));
            let mut write = std::pin::pin!(write);
            loop {
                tokio::select! {
                    biased;
                    written = &mut write => break written,
                    framed = queued.pop() => match framed {
                        Some(_) => self.drop_datagram("no_credit"),
                        None => return Ok(()),
                    },
                }
            }
        };
        match requested {
            Ok(written) => written?,
            Err(_) => {
                self.metrics.udp_flows.get_or_create(&label("result", "failed")).inc();
                End::Stream { send, recv }.reset();
                anyhow::bail!("no credit on the tunnel for the flow request");
            }
        }
        // the flow's own socket (tproxy): replies leave from the virtual address, later datagrams arrive here
        let socket = match &reply {
            Reply::Transparent => Some(transparent_socket(destination, source)?),
            Reply::Packet(_) => None,
        };
        let send_to_server = |payload: &[u8]| -> bool {
            match (&socket, &reply) {
                // straight to the non-blocking socket (tokio's try_send waits for a readiness event first)
                (Some(socket), _) => socket2::SockRef::from(socket).send(payload).is_ok(),
                (None, Reply::Packet(write)) => {
                    write(destination, source, payload);
                    true
                }
                (None, Reply::Transparent) => false,
            }
        };
        let (to_client, to_server) = (&self.to_client, &self.to_server);
        // datagrams that come before the answer go at once (they wait at the broker for the verdict)
        let verdict = {
            let answer = tokio::time::timeout(REPLY_TIMEOUT, reachback_tunnel::read_frame::<FlowReply>(&mut recv));
            let mut answer = std::pin::pin!(answer);
            loop {
                tokio::select! {
                    verdict = &mut answer => break verdict,
                    framed = queued.pop() => match framed {
                        Some(framed) => self.forward(&mut send, framed, to_client)?,
                        None => return Ok(()),
                    },
                    received = recv_own(&socket) => {
                        if let Some(framed) = self.own_datagram(pair, received.context("the flow's socket failed")?) {
                            self.touch(pair);
                            self.forward(&mut send, framed, to_client)?;
                        }
                    }
                }
            }
        };
        match verdict {
            Ok(Ok(Some(FlowReply::Ok))) => {
                self.metrics.udp_flows.get_or_create(&label("result", "accepted")).inc();
                tracing::trace!(%source, %destination, "UDP flow open");
            }
            Ok(Ok(Some(FlowReply::Refused(refusal)))) => {
                self.metrics.udp_flows.get_or_create(&label("result", "refused")).inc();
                tracing::info!(%source, %destination, %refusal, "UDP flow refused");
                End::Stream { send, recv }.reset();
                return self.hold_refused(pair, queued, &socket).await;
            }
            _ => {
                self.metrics.udp_flows.get_or_create(&label("result", "failed")).inc();
                End::Stream { send, recv }.reset();
                anyhow::bail!("no answer from the broker");
            }
        }
        let mut decoder = DatagramDecoder::new();
        loop {
            tokio::select! {
                framed = queued.pop() => {
                    // `None`: the table let the flow go (idle)
                    let Some(framed) = framed else { break };
                    self.forward(&mut send, framed, to_client)?;
                }
                received = recv_own(&socket) => {
                    if let Some(framed) = self.own_datagram(pair, received.context("the flow's socket failed")?) {
                        self.touch(pair);
                        self.forward(&mut send, framed, to_client)?;
                    }
                }
                chunk = recv.read_chunk() => match chunk {
                    Ok(Some(chunk)) => {
                        self.touch(pair);
                        decoder.push(&chunk);
                        while let Some(datagram) = decoder.next_datagram() {
                            let sent = send_to_server(datagram);
                            tracing::trace!(%source, %destination, length = datagram.len(), sent, "datagram to the server");
                            if sent {
                                to_server.count(datagram.len());
                            } else {
                                self.drop_datagram("send_failed");
                            }
                        }
                        decoder.release();
                    }
                    // the agent ended the flow
                    Ok(None) => break,
                    Err(error) => anyhow::bail!("the stream failed: {error}"),
                },
            }
        }
        let _ = send.finish();
        Ok(())
    }

    /// A datagram that arrived on a flow's own socket: the flow's when it came from
    /// the flow's server. Another server's datagram can land there too: between
    /// the socket's bind to the virtual address and its connect, TPROXY's look-up
    /// matches it for any source. Such a datagram goes to its own flow.
    fn own_datagram(self: &Arc<Self>, pair: &Pair, (source, framed): (SocketAddr, Bytes)) -> Option<Bytes> {
        if source == pair.0 {
            return Some(framed);
        }
        tracing::trace!(%source, destination = %pair.1, "a datagram for another flow, handed on");
        self.datagram(source, pair.1, framed.get(2..).unwrap_or_default(), &Reply::Transparent);
        None
    }

    /// Sends one framed datagram towards the agent, or drops it when the stream has no room for it now.
    fn forward(&self, send: &mut SendStream, framed: Bytes, direction: &Direction) -> anyhow::Result<()> {
        let length = framed.len().saturating_sub(2);
        tracing::trace!(length, "datagram to the agent");
        match send.try_write_whole(framed) {
            Ok(true) => direction.count(length),
            Ok(false) => self.drop_datagram("no_credit"),
            Err(error) => anyhow::bail!("the stream failed: {error}"),
        }
        Ok(())
    }

    /// A refused flow stays in the table for [`REFUSAL_HOLD`], dropping its
    /// datagrams (those the listener hands over, and those the kernel delivers to
    /// the flow's own socket).
    async fn hold_refused(self: &Arc<Self>, pair: &Pair, queued: Arc<FlowQueue>, socket: &Option<UdpSocket>) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + REFUSAL_HOLD;
        loop {
            tokio::select! {
                framed = queued.pop() => match framed {
                    Some(_) => self.drop_datagram("refused"),
                    None => return Ok(()),
                },
                received = recv_own(socket) => match received {
                    Ok(received) => {
                        if self.own_datagram(pair, received).is_some() {
                            self.drop_datagram("refused");
                        }
                    }
                    Err(_) => return Ok(()),
                },
                () = tokio::time::sleep_until(until) => return Ok(()),
            }
        }
    }
}

/// The counters of one direction of relayed datagrams.
struct Direction {
    datagrams: prometheus_client::metrics::counter::Counter,
    bytes: prometheus_client::metrics::counter::Counter,
}

impl Direction {
    fn new(metrics: &Metrics, direction: &str) -> Direction {
        Direction {
            datagrams: metrics.udp_datagrams.get_or_create(&label("direction", direction)).clone(),
            bytes: metrics.udp_bytes.get_or_create(&label("direction", direction)).clone(),
        }
    }

    fn count(&self, payload: usize) {
        self.datagrams.inc();
        self.bytes.inc_by(payload as u64);
    }
}

/// The next datagram on the flow's own socket, with its source; never, without one.
async fn recv_own(socket: &Option<UdpSocket>) -> std::io::Result<(SocketAddr, Bytes)> {
    match socket {
        Some(socket) => reachback_tunnel::datagram::recv_framed_from(socket).await,
        None => std::future::pending().await,
    }
}

/// A UDP socket bound (IP_TRANSPARENT) to the virtual `local` address and connected to the server.
fn transparent_socket(local: SocketAddr, remote: SocketAddr) -> anyhow::Result<UdpSocket> {
    let domain = if local.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if local.is_ipv4() {
        socket.set_ip_transparent_v4(true).context("IP_TRANSPARENT needs CAP_NET_ADMIN")?;
    } else {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true).context("IPV6_TRANSPARENT needs CAP_NET_ADMIN")?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&local.into()).with_context(|| format!("binding {local}"))?;
    socket.connect(&remote.into()).with_context(|| format!("connecting to {remote}"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// A SOCKS5 UDP ASSOCIATE (RFC 1928, section 7): a UDP relay socket on the
/// address the client reached the listener by, told to the client; datagrams to
/// it from the client's address (from the port the request named, or else the
/// first one they come from) carry
/// their destination in a header and become UDP flows like intercepted ones;
/// replies go back with the header naming their source. The association ends
/// with the client's TCP connection; its flows then end at their idle timeout.
pub async fn serve_socks_association(
    mut control: tokio::net::TcpStream,
    client: SocketAddr,
    requested: SocketAddr,
    ingress: Arc<UdpIngress>,
) -> anyhow::Result<()> {
    use reachback_proto::socks5;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let local = control.local_addr()?;
    let relay = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(relay) => Arc::new(relay),
        Err(error) => {
            control.write_all(&socks5::reply(socks5::GENERAL_FAILURE)).await?;
            anyhow::bail!("binding the UDP relay: {error}");
        }
    };
    control.write_all(&socks5::associate_reply(relay.local_addr()?)).await?;
    tracing::debug!(%client, relay = %relay.local_addr()?, "SOCKS5 UDP association");
    // the port the client said it sends from (RFC 1928: the server may limit the association to it);
    // 0 when it did not say, and then the first datagram's port is the client's
    let client_port = Arc::new(std::sync::atomic::AtomicU16::new(requested.port()));
    let reply = {
        let (relay, client_port) = (relay.clone(), client_port.clone());
        Reply::Packet(Arc::new(move |from: SocketAddr, _to: SocketAddr, payload: &[u8]| {
            let to = SocketAddr::new(client.ip(), client_port.load(Ordering::Relaxed));
            let _ = socket2::SockRef::from(&*relay).send_to(&socks5::udp_datagram(from, payload), &to.into());
        }))
    };
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            // the association lives as long as its TCP connection (which carries nothing more)
            read = control.read(&mut ignored) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            received = relay.recv_from(&mut buffer) => {
                let Ok((length, source)) = received else { continue };
                // only the client that asked, from one port (the first it sends from)
                if source.ip() != client.ip() {
                    continue;
                }
                let port = client_port.load(Ordering::Relaxed);
                if port == 0 {
                    client_port.store(source.port(), Ordering::Relaxed);
                } else if port != source.port() {
                    continue;
                }
                match socks5::parse_udp_datagram(&buffer[..length]) {
                    Some((destination, payload)) => ingress.datagram(source, destination, payload, &reply),
                    None => ingress.drop_datagram("malformed"),
                }
            }
        }
    }
}

/// The TPROXY listener for UDP: a transparent socket on the interception port that
/// learns each datagram's original destination (IP_RECVORIGDSTADDR).
pub fn transparent_listener(address: SocketAddr) -> anyhow::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let domain = if address.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv4() {
        socket.set_ip_transparent_v4(true).context("IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)")?;
        setsockopt(&socket.as_fd(), sockopt::Ipv4OrigDstAddr, &true).context("IP_RECVORIGDSTADDR")?;
    } else {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true).context("IPV6_TRANSPARENT needs CAP_NET_ADMIN (run as root)")?;
        setsockopt(&socket.as_fd(), sockopt::Ipv6OrigDstAddr, &true).context("IPV6_RECVORIGDSTADDR")?;
    }
    // a burst of new flows waits here while the runtime catches up
    let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
    socket.set_nonblocking(true)?;
    socket.bind(&address.into()).with_context(|| format!("binding {address} (UDP)"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// Reads the TPROXY listener: every datagram with its source and original
/// destination goes to the ingress. Runs until the task is aborted.
pub async fn serve_transparent(socket: UdpSocket, ingress: Arc<UdpIngress>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        loop {
            match recv_with_destination(&socket, &mut buffer) {
                Ok(Some((length, source, destination))) => ingress.datagram(source, destination, &buffer[..length], &Reply::Transparent),
                Ok(None) => tracing::debug!("a UDP datagram without its original destination was dropped"),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::debug!(%error, "UDP interception read failed");
                    break;
                }
            }
        }
    }
}

/// One datagram from the listener: its length, source and original destination
/// (`None` for the addresses when the kernel gave none).
fn recv_with_destination(socket: &UdpSocket, buffer: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr, SocketAddr)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    socket.try_io(tokio::io::Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(buffer)];
        let mut space = nix::cmsg_space!(nix::libc::sockaddr_in6);
        let message = recvmsg::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(socket), &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)
            .map_err(std::io::Error::from)?;
        let length = message.bytes;
        let source = message.address.as_ref().and_then(storage_address);
        let mut destination = None;
        for control in message.cmsgs().map_err(std::io::Error::from)? {
            match control {
                ControlMessageOwned::Ipv4OrigDstAddr(address) => {
                    destination = Some(SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)), u16::from_be(address.sin_port))));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(address) => {
                    destination = Some(SocketAddr::from((std::net::Ipv6Addr::from(address.sin6_addr.s6_addr), u16::from_be(address.sin6_port))));
                }
                _ => {}
            }
        }
        Ok(source.zip(destination).map(|(source, destination)| (length, source, destination)))
    })
}

fn storage_address(storage: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(address) = storage.as_sockaddr_in() {
        return Some(SocketAddr::from((address.ip(), address.port())));
    }
    storage.as_sockaddr_in6().map(|address| SocketAddr::from((address.ip(), address.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tunnel_without_credit_holds_no_datagrams_and_no_flow() {
        let (connector_io, broker_io) = tokio::io::duplex(64 * 1024);
        let address: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let connector = Connection::start(connector_io, true, address, Vec::new());
        let broker = Connection::start(broker_io, false, address, Vec::new());
        // streams nobody reads take all of the connection's credit
        let window = reachback_proto::mux::INITIAL_CONNECTION_WINDOW as u64;
        let mut writers = Vec::new();
        for _ in 0..(window / reachback_proto::mux::INITIAL_WINDOW as u64) + 1 {
            let (mut send, recv) = connector.open_bi().await.expect("open");
            writers.push(tokio::spawn(async move {
                let _ = send.write_chunk(Bytes::from(vec![0u8; reachback_proto::mux::INITIAL_WINDOW as usize])).await;
                (send, recv)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker.buffered_bytes() < window {
            assert!(Instant::now() < deadline, "the connection's window did not fill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_tunnel_tx, tunnel) = watch::channel(Some(connector.clone()));
        let metrics = Arc::new(Metrics::default());
        let ingress = UdpIngress::new(UdpOptions::default(), tunnel, metrics.clone());
        let reply = Reply::Packet(Arc::new(|_, _, _| {}));
        let (server, virtual_address): (SocketAddr, SocketAddr) = ("192.0.2.1:5000".parse().expect("server"), "100.64.0.1:53".parse().expect("virtual"));
        // a flood of large datagrams for one pair while the tunnel is full
        for _ in 0..200 {
            ingress.datagram(server, virtual_address, &[7u8; 60_000], &reply);
            tokio::task::yield_now().await;
        }
        let dropped = |reason: &str| metrics.udp_dropped.get_or_create(&label("reason", reason)).get();
        assert_eq!(dropped("queue_full"), 0, "datagrams were held for a flow whose request waits for credit");
        assert!(dropped("no_credit") >= 190, "{}", dropped("no_credit"));
        // no credit for as long as an answer may take: the flow ends
        let deadline = Instant::now() + REPLY_TIMEOUT + Duration::from_secs(3);
        while ingress.flows() > 0 {
            assert!(Instant::now() < deadline, "the flow waits for credit for ever");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.udp_flows.get_or_create(&label("result", "failed")).get(), 1);
        drop(writers);
    }

    #[tokio::test]
    async fn an_association_takes_datagrams_only_from_the_port_its_request_named() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut control = tokio::net::TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (accepted, client) = listener.accept().await.expect("accept");
        let (_tunnel_tx, tunnel) = watch::channel(None);
        let metrics = Arc::new(Metrics::default());
        let ingress = UdpIngress::new(UdpOptions::default(), tunnel, metrics.clone());
        let owner = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let other = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let requested = owner.local_addr().expect("address");
        let association = tokio::spawn(serve_socks_association(accepted, client, requested, ingress));
        let mut reply = [0u8; 10];
        control.read_exact(&mut reply).await.expect("the associate reply");
        let relay = SocketAddr::new([127, 0, 0, 1].into(), u16::from_be_bytes([reply[8], reply[9]]));
        let malformed = || metrics.udp_dropped.get_or_create(&label("reason", "malformed")).get();
        // another process on the client's host speaks first: it is not the client
        other.send_to(b"not socks", relay).await.expect("send");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(malformed(), 0, "a datagram from another port was taken");
        owner.send_to(b"not socks", relay).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(5);
        while malformed() == 0 {
            assert!(Instant::now() < deadline, "the client's own datagram was not taken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        association.abort();
    }
}
