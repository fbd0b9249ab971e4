//! The userspace TCP/IP stack of TUN mode, without I/O: packets from the device go
//! in, packets for the device come out of an outbox, and flows read and write bytes
//! through it. Built on smoltcp's TCP sockets with one `Interface` per flow, so a
//! segment reaches its socket through one hash look-up (smoltcp's own dispatch
//! walks every socket) and a listening socket only ever sees the SYN it was made for.
//!
//! A connection attempt is not answered here: [`Stack::ingress`] reports it as
//! [`Event::Open`] and keeps the SYN; the shell asks the broker, then calls
//! [`Stack::accept`] (a socket is made and answers the kept SYN at once) or
//! [`Stack::refuse`] (a reset answers it). Retransmitted SYNs meanwhile are dropped.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

use super::packet::{self, Dropped, FlowKey, Parsed, Segment};
use super::routes::RangeSet;

/// Sizes and caps of the stack.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// the device's MTU: the largest packet in either direction
    pub mtu: usize,
    /// each flow's receive buffer (server → client bytes not yet taken by the tunnel)
    pub rx_buffer: usize,
    /// each flow's send buffer (client → server bytes not yet acknowledged by the server)
    pub tx_buffer: usize,
    /// connection attempts waiting for the broker's answer; more SYNs are dropped
    pub max_pending: usize,
    /// flows (open or waiting) at once; more SYNs are dropped
    pub max_flows: usize,
    /// a flow whose server sends nothing for this long while data waits for its
    /// acknowledgment is reset (smoltcp's user timeout)
    pub unacknowledged_timeout: std::time::Duration,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            mtu: 9000,
            rx_buffer: 512 * 1024,
            tx_buffer: 512 * 1024,
            max_pending: 1024,
            max_flows: 16_384,
            unacknowledged_timeout: std::time::Duration::from_secs(120),
        }
    }
}

/// The most packets one flow sends in one step.
const MAX_PACKETS_PER_EGRESS: usize = 512;

/// Identifies one flow's socket for as long as the stack holds it.
pub type FlowId = u64;

/// What a packet asks of the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// a server connects to `key.destination`: ask the broker, then accept or refuse
    Open(FlowKey),
    /// a UDP datagram to a virtual address (its payload inside the packet)
    Udp { source: SocketAddr, destination: SocketAddr, payload: &'a [u8] },
}

/// What the stack counted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub dropped_malformed: u64,
    pub dropped_protocol: u64,
    pub dropped_fragment: u64,
    pub dropped_outside_ranges: u64,
    /// packets from a source inside the virtual ranges: no server has such an
    /// address, and a reply would be routed back into the device (a loop between
    /// two laptops, or a policy matched on a forged source)
    pub dropped_spoofed_source: u64,
    /// SYNs retransmitted while their open was pending
    pub dropped_syn_retransmit: u64,
    /// SYNs dropped because `max_pending` or `max_flows` was reached
    pub dropped_over_cap: u64,
    /// segments for no known connection, answered with a reset
    pub reset_unknown: u64,
    pub opened: u64,
    pub refused: u64,
    /// UDP datagrams from servers to virtual addresses, handed to the UDP flows
    pub udp_in: u64,
    /// UDP replies written to servers
    pub udp_out: u64,
    /// UDP replies that did not fit the device's MTU
    pub udp_too_large: u64,
}

impl Counters {
    pub fn dropped(&self) -> u64 {
        self.dropped_malformed
            + self.dropped_protocol
            + self.dropped_fragment
            + self.dropped_outside_ranges
            + self.dropped_spoofed_source
            + self.dropped_syn_retransmit
            + self.dropped_over_cap
    }

    /// The drop counters by reason, as the metrics name them.
    pub fn dropped_by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("malformed", self.dropped_malformed),
            ("protocol", self.dropped_protocol),
            ("fragment", self.dropped_fragment),
            ("outside_ranges", self.dropped_outside_ranges),
            ("spoofed_source", self.dropped_spoofed_source),
            ("syn_retransmit", self.dropped_syn_retransmit),
            ("over_cap", self.dropped_over_cap),
        ]
    }

    fn count(&mut self, dropped: Dropped) {
        match dropped {
            Dropped::Malformed => self.dropped_malformed += 1,
            Dropped::Protocol => self.dropped_protocol += 1,
            Dropped::Fragment => self.dropped_fragment += 1,
            Dropped::OutsideRanges => self.dropped_outside_ranges += 1,
        }
    }
}

/// Bytes a flow read from its socket, or how its receive half ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(Bytes),
    /// the server sent FIN (and everything before it was read)
    Eof,
    /// the server reset the connection, or it timed out or was aborted
    Reset,
}

/// Packets for the device, each in a buffer of its own behind `headroom` bytes
/// (where the device's offload header goes). The buffers are kept and reused, so
/// a packet costs no allocation once the pool has grown to a burst's size.
#[derive(Default)]
pub struct Outbox {
    buffers: Vec<Vec<u8>>,
    count: usize,
    headroom: usize,
}

/// Buffers kept across flushes; a larger burst's extra buffers are let go.
const OUTBOX_KEPT: usize = 1024;

impl Outbox {
    pub fn new(headroom: usize) -> Outbox {
        Outbox { buffers: Vec::new(), count: 0, headroom }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn headroom(&self) -> usize {
        self.headroom
    }

    #[cfg(test)]
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.buffers[..self.count].iter().map(|buffer| buffer.get(self.headroom..).unwrap_or_default())
    }

    /// The buffers of the packets, headroom included, for the device to write (and coalesce) in one go.
    pub fn buffers_mut(&mut self) -> &mut [Vec<u8>] {
        &mut self.buffers[..self.count]
    }

    pub fn clear(&mut self) {
        self.count = 0;
        self.buffers.truncate(OUTBOX_KEPT);
    }

    /// Lets `build` append one packet to an empty buffer (headroom in front); nothing when it appends nothing.
    fn push_with<R>(&mut self, build: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        if self.count == self.buffers.len() {
            // room for a whole coalesced write: the device appends the flow's next segments to this one
            // (only the pages written are ever touched)
            self.buffers.push(Vec::with_capacity(2 * self.headroom + usize::from(u16::MAX)));
        }
        let buffer = &mut self.buffers[self.count];
        buffer.clear();
        buffer.resize(self.headroom, 0);
        let result = build(buffer);
        if buffer.len() > self.headroom {
            self.count += 1;
        }
        result
    }
}

/// smoltcp's view of the device for one step: at most one packet to receive, and the outbox.
struct Port<'a> {
    rx: Option<&'a [u8]>,
    outbox: &'a mut Outbox,
    mtu: usize,
}

struct RxFrame<'a>(&'a [u8]);
struct TxFrame<'a>(&'a mut Outbox);

impl smoltcp::phy::RxToken for RxFrame<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for TxFrame<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.push_with(|buffer| {
            let start = buffer.len();
            buffer.resize(start + len, 0);
            f(&mut buffer[start..])
        })
    }
}

impl Device for Port<'_> {
    type RxToken<'b>
        = RxFrame<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxFrame<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.take()?;
        Some((RxFrame(frame), TxFrame(&mut *self.outbox)))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<Self::TxToken<'_>> {
        Some(TxFrame(&mut *self.outbox))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ip;
        capabilities.max_transmission_unit = self.mtu;
        capabilities
    }
}

struct Pending {
    /// the SYN, fed to the flow's socket when the broker says yes
    syn: Vec<u8>,
}

struct TcpFlow {
    key: FlowKey,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// the deadline in `timers` that is current for this flow
    scheduled: Option<i64>,
    /// the shell let go of it: removed once its socket is closed
    detached: bool,
    /// in the batch's dirty list already
    dirty: bool,
}

impl TcpFlow {
    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }
}

/// The stack: pending opens, flows and their timers, the outbox, the counters.
pub struct Stack {
    config: StackConfig,
    epoch: Instant,
    ranges: RangeSet,
    pending: HashMap<FlowKey, Pending>,
    flows: HashMap<FlowId, TcpFlow>,
    by_key: HashMap<FlowKey, FlowId>,
    next_id: FlowId,
    /// (deadline in µs since `epoch`, flow) — stale entries are skipped when popped
    timers: BinaryHeap<std::cmp::Reverse<(i64, FlowId)>>,
    dirty: Vec<FlowId>,
    seed: u64,
    pub outbox: Outbox,
    pub counters: Counters,
}

impl Stack {
    /// `headroom`: bytes kept free in front of each outgoing packet (the device's offload header).
    pub fn new(config: StackConfig, seed: u64, epoch: Instant, headroom: usize) -> Stack {
        Stack {
            config,
            epoch,
            ranges: RangeSet::default(),
            pending: HashMap::new(),
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            seed,
            outbox: Outbox::new(headroom),
            counters: Counters::default(),
        }
    }

    pub fn set_ranges(&mut self, ranges: RangeSet) {
        self.ranges = ranges;
    }

    pub fn mtu(&self) -> usize {
        self.config.mtu
    }

    /// Flows with a socket, and opens waiting for the broker.
    pub fn load(&self) -> (usize, usize) {
        (self.flows.len(), self.pending.len())
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// One packet from the device. What the shell must do comes back as an event;
    /// segments for open flows are processed, their answers wait for [`Stack::egress_dirty`].
    pub fn ingress<'a>(&mut self, packet: &'a [u8], now: Instant) -> Option<Event<'a>> {
        self.counters.packets_in += 1;
        let parsed = match packet::parse(packet) {
            Ok(parsed) => parsed,
            Err(dropped) => {
                self.counters.count(dropped);
                return None;
            }
        };
        let source = match &parsed {
            Parsed::Udp { source, .. } => source.ip(),
            Parsed::Tcp(segment) => segment.key.source.ip(),
        };
        if self.ranges.contains(source) {
            self.counters.dropped_spoofed_source += 1;
            return None;
        }
        match parsed {
            Parsed::Udp { source, destination, payload } => {
                if !self.ranges.contains(destination.ip()) {
                    self.counters.count(Dropped::OutsideRanges);
                    return None;
                }
                self.counters.udp_in += 1;
                Some(Event::Udp { source, destination, payload })
            }
            Parsed::Tcp(segment) => self.tcp_ingress(packet, segment, now),
        }
    }

    /// A UDP reply `from` a virtual address and port `to` a server, queued for the device.
    pub fn push_udp(&mut self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), packet::BuildError> {
        let mtu = self.config.mtu;
        let built = self.outbox.push_with(|out| packet::udp_reply(from, to, payload, mtu, out));
        match built {
            Ok(()) => self.counters.udp_out += 1,
            Err(_) => self.counters.udp_too_large += 1,
        }
        built
    }

    fn tcp_ingress<'a>(&mut self, packet: &[u8], segment: Segment, now: Instant) -> Option<Event<'a>> {
        let key = segment.key;
        let smol_now = self.smol_now(now);
        if let Some(&id) = self.by_key.get(&key) {
            let Some(flow) = self.flows.get_mut(&id) else {
                self.by_key.remove(&key);
                return self.tcp_ingress(packet, segment, now);
            };
            let state = flow.socket().state();
            // a new connect on the 4-tuple of a connection that is over (TIME-WAIT): the old one gives way
            if segment.is_connect() && matches!(state, tcp::State::TimeWait | tcp::State::Closed) {
                self.by_key.remove(&key);
                return self.tcp_ingress(packet, segment, now);
            }
            let mut port = Port { rx: Some(packet), outbox: &mut self.outbox, mtu: self.config.mtu };
            flow.iface.poll_ingress_single(smol_now, &mut port, &mut flow.sockets);
            if !flow.dirty {
                flow.dirty = true;
                self.dirty.push(id);
            }
            return None;
        }
        if self.pending.contains_key(&key) {
            if segment.rst {
                // the server gave up: the broker's answer, when it comes, finds nothing to accept
                self.pending.remove(&key);
            } else {
                self.counters.dropped_syn_retransmit += u64::from(segment.syn);
            }
            return None;
        }
        if !self.ranges.contains(key.destination.ip()) {
            self.counters.count(Dropped::OutsideRanges);
            return None;
        }
        if !segment.is_connect() {
            // what a host without the connection does (the connector restarted, the flow is long gone)
            if !segment.rst {
                self.counters.reset_unknown += 1;
                self.outbox.push_with(|out| packet::reset_reply(&segment, out));
            }
            return None;
        }
        if self.pending.len() >= self.config.max_pending || self.pending.len() + self.flows.len() >= self.config.max_flows {
            self.counters.dropped_over_cap += 1;
            return None;
        }
        self.pending.insert(key, Pending { syn: packet.to_vec() });
        Some(Event::Open(key))
    }

    /// The broker accepted the flow of `key`: its socket answers the kept SYN now.
    /// `None` when the open is gone (the server reset it meanwhile) or the SYN was
    /// not taken; the shell then resets the tunnel stream.
    pub fn accept(&mut self, key: FlowKey, now: Instant) -> Option<FlowId> {
        let pending = self.pending.remove(&key)?;
        let smol_now = self.smol_now(now);
        let id = self.next_id;
        self.next_id += 1;
        self.seed = splitmix(self.seed);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = self.seed;
        let mut port = Port { rx: None, outbox: &mut self.outbox, mtu: self.config.mtu };
        let mut iface = Interface::new(config, &mut port, smol_now);
        // every address is ours (AnyIP) and every peer is on link: one catch-all prefix of the flow's family
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addresses| {
            let _ = addresses.push(IpCidr::new(IpAddress::from(key.destination.ip()), 0));
        });
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0u8; self.config.rx_buffer]), tcp::SocketBuffer::new(vec![0u8; self.config.tx_buffer]));
        // the relay writes what it got at once, as the TPROXY path's sockets do (TCP_NODELAY)
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_timeout(Some(SmolDuration::from_micros(self.config.unacknowledged_timeout.as_micros() as u64)));
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::from(key.destination.ip())), port: key.destination.port() };
        if socket.listen(endpoint).is_err() {
            return None;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        // the listening socket and its SYN in one step: no other SYN can reach it
        port.rx = Some(&pending.syn);
        iface.poll_ingress_single(smol_now, &mut port, &mut sockets);
        if sockets.get_mut::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            return None;
        }
        self.counters.opened += 1;
        self.flows.insert(id, TcpFlow { key, iface, sockets, handle, scheduled: None, detached: false, dirty: false });
        self.by_key.insert(key, id);
        self.egress(id, now);
        Some(id)
    }

    /// The broker refused the flow of `key` (or could not be asked): the kept SYN
    /// is answered with RST+ACK, which the server's connect reports as refused.
    pub fn refuse(&mut self, key: FlowKey) {
        let Some(pending) = self.pending.remove(&key) else { return };
        self.counters.refused += 1;
        if let Ok(Parsed::Tcp(segment)) = packet::parse(&pending.syn) {
            self.outbox.push_with(|out| packet::reset_reply(&segment, out));
        }
    }

    /// Sends what the flows touched by the last packets have to send (ACKs, window
    /// updates, data), once per flow for a whole batch of packets.
    pub fn egress_dirty(&mut self, now: Instant) {
        let dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            if let Some(flow) = self.flows.get_mut(&id) {
                flow.dirty = false;
            }
            self.egress(id, now);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Lets one flow's socket send everything it may, schedules its next timer and
    /// removes it once it is closed and the shell let go of it.
    fn egress(&mut self, id: FlowId, now: Instant) {
        let smol_now = self.smol_now(now);
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let mut port = Port { rx: None, outbox: &mut self.outbox, mtu: self.config.mtu };
        // each pass sends at most one packet; a window of tiny segments (a server's MSS can be
        // anything) goes out a share at a time, the rest on the flow's next timer
        for _ in 0..MAX_PACKETS_PER_EGRESS {
            if flow.iface.poll_egress(smol_now, &mut port, &mut flow.sockets) != smoltcp::iface::PollResult::SocketStateChanged {
                break;
            }
        }
        if flow.detached && flow.socket().state() == tcp::State::Closed {
            let key = flow.key;
            self.flows.remove(&id);
            if self.by_key.get(&key) == Some(&id) {
                self.by_key.remove(&key);
            }
            return;
        }
        if let Some(at) = flow.iface.poll_at(smol_now, &flow.sockets) {
            // never in the past: a socket that still wants to send now is looked at again shortly
            let at = at.total_micros().max(smol_now.total_micros() + 1_000);
            if flow.scheduled.is_none_or(|scheduled| at < scheduled) {
                flow.scheduled = Some(at);
                self.timers.push(std::cmp::Reverse((at, id)));
            }
        }
    }

    /// When [`Stack::poll_timers`] must run next.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|std::cmp::Reverse((at, _))| self.epoch + std::time::Duration::from_micros((*at).max(0) as u64))
    }

    /// Runs the flows' timers that are due (retransmissions, delayed ACKs, TIME-WAIT, user timeouts).
    pub fn poll_timers(&mut self, now: Instant) {
        let smol_now = self.smol_now(now).total_micros();
        while let Some(&std::cmp::Reverse((at, id))) = self.timers.peek() {
            if at > smol_now {
                break;
            }
            self.timers.pop();
            let Some(flow) = self.flows.get_mut(&id) else { continue };
            if flow.scheduled != Some(at) {
                continue;
            }
            flow.scheduled = None;
            self.egress(id, now);
        }
    }

    /// Whether flow `id`'s handshake is over (`Ready(true)`), failed (`Ready(false)`:
    /// reset, timed out), or still waits for the server's ACK (the waker is registered).
    pub fn poll_established(&mut self, id: FlowId, context: &mut Context<'_>) -> Poll<bool> {
        let Some(flow) = self.flows.get_mut(&id) else { return Poll::Ready(false) };
        let socket = flow.socket();
        match socket.state() {
            tcp::State::Listen | tcp::State::SynReceived => {
                socket.register_recv_waker(context.waker());
                Poll::Pending
            }
            tcp::State::Closed | tcp::State::SynSent => Poll::Ready(false),
            _ => Poll::Ready(true),
        }
    }

    /// Reads what the server sent on flow `id`, at most `max` bytes; registers the
    /// caller's waker when there is nothing yet.
    pub fn poll_read(&mut self, id: FlowId, max: usize, now: Instant, context: &mut Context<'_>) -> Poll<ReadOutcome> {
        let Some(flow) = self.flows.get_mut(&id) else { return Poll::Ready(ReadOutcome::Reset) };
        let socket = flow.socket();
        let available = socket.recv_queue().min(max);
        if available > 0 {
            let mut chunk = BytesMut::with_capacity(available);
            // the ring buffer hands out at most two contiguous pieces
            while chunk.len() < available {
                let wanted = available - chunk.len();
                let taken = socket.recv(|data| {
                    let length = data.len().min(wanted);
                    chunk.extend_from_slice(&data[..length]);
                    (length, length)
                });
                if !matches!(taken, Ok(length) if length > 0) {
                    break;
                }
            }
            // the window opened: tell the server
            self.egress(id, now);
            return Poll::Ready(ReadOutcome::Data(chunk.freeze()));
        }
        match socket.state() {
            // the handshake is not over yet
            tcp::State::Listen | tcp::State::SynReceived => {}
            _ => match socket.recv(|_| (0, ())) {
                Ok(()) => {}
                Err(tcp::RecvError::Finished) => return Poll::Ready(ReadOutcome::Eof),
                Err(tcp::RecvError::InvalidState) => return Poll::Ready(ReadOutcome::Reset),
            },
        }
        socket.register_recv_waker(context.waker());
        Poll::Pending
    }

    /// Queues `data` on flow `id` towards the server, as much as its send buffer
    /// takes (what was taken is split off `data`); `Ready(Ok)` once all of it was
    /// taken, `Ready(Err)` when the connection cannot send any more (reset, closed).
    pub fn poll_write(&mut self, id: FlowId, data: &mut Bytes, now: Instant, context: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let Some(flow) = self.flows.get_mut(&id) else { return Poll::Ready(Err(())) };
        let socket = flow.socket();
        match socket.state() {
            tcp::State::Listen | tcp::State::SynReceived => {
                socket.register_send_waker(context.waker());
                return Poll::Pending;
            }
            _ if !socket.may_send() => return Poll::Ready(Err(())),
            _ => {}
        }
        let taken = socket.send_slice(data).unwrap_or(0);
        let _ = data.split_to(taken);
        if data.is_empty() {
            if taken > 0 {
                self.egress(id, now);
            }
            return Poll::Ready(Ok(()));
        }
        flow.socket().register_send_waker(context.waker());
        if taken > 0 {
            self.egress(id, now);
        }
        Poll::Pending
    }

    /// The client finished sending: FIN to the server after the queued bytes.
    pub fn close(&mut self, id: FlowId, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        flow.socket().close();
        self.egress(id, now);
    }

    /// Resets the server's connection.
    pub fn abort(&mut self, id: FlowId, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        flow.socket().abort();
        self.egress(id, now);
    }

    /// The shell is done with flow `id`: it goes once its socket is closed (at once
    /// after a reset, after TIME-WAIT or the last ACK otherwise).
    pub fn detach(&mut self, id: FlowId, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        flow.detached = true;
        self.egress(id, now);
    }

    /// The state of flow `id`'s socket.
    #[cfg(test)]
    pub fn state(&mut self, id: FlowId) -> Option<tcp::State> {
        self.flows.get_mut(&id).map(|flow| flow.socket().state())
    }
}

/// One step of splitmix64: a new seed for each flow's interface (TCP initial sequence numbers).
fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket};

    use super::super::packet::tests::{laptop, server, tcp_packet};
    use super::*;

    /// A packet the stack sent, taken apart.
    #[derive(Debug)]
    struct Sent {
        from: SocketAddr,
        to: SocketAddr,
        syn: bool,
        ack: bool,
        rst: bool,
        fin: bool,
        seq: u32,
        ack_number: u32,
        payload: Vec<u8>,
    }

    fn sent(stack: &mut Stack) -> Vec<Sent> {
        let packets = stack
            .outbox
            .packets()
            .map(|bytes| {
                let ip = Ipv4Packet::new_checked(bytes).expect("IPv4");
                assert!(ip.verify_checksum());
                let tcp = TcpPacket::new_checked(ip.payload()).expect("TCP");
                assert!(tcp.verify_checksum(&IpAddress::Ipv4(ip.src_addr()), &IpAddress::Ipv4(ip.dst_addr())), "checksums are filled in");
                Sent {
                    from: SocketAddr::new(ip.src_addr().into(), tcp.src_port()),
                    to: SocketAddr::new(ip.dst_addr().into(), tcp.dst_port()),
                    syn: tcp.syn(),
                    ack: tcp.ack(),
                    rst: tcp.rst(),
                    fin: tcp.fin(),
                    seq: tcp.seq_number().0 as u32,
                    ack_number: tcp.ack_number().0 as u32,
                    payload: tcp.payload().to_vec(),
                }
            })
            .collect();
        stack.outbox.clear();
        packets
    }

    fn stack_with(config: StackConfig) -> (Stack, Instant) {
        let start = Instant::now();
        let mut stack = Stack::new(config, 7, start, 10);
        stack.set_ranges(RangeSet::parse(&["100.64.0.0/16".to_string()]).0);
        (stack, start)
    }

    fn stack() -> (Stack, Instant) {
        stack_with(StackConfig { rx_buffer: 64 * 1024, tx_buffer: 64 * 1024, mtu: 1500, ..StackConfig::default() })
    }

    fn syn(source: SocketAddr, seq: u32) -> Vec<u8> {
        tcp_packet(source, laptop(), TcpControl::Syn, seq, None, &[])
    }

    fn key(source: SocketAddr) -> FlowKey {
        FlowKey { source, destination: laptop() }
    }

    fn read(stack: &mut Stack, id: FlowId, now: Instant) -> Poll<ReadOutcome> {
        stack.poll_read(id, 1 << 20, now, &mut Context::from_waker(Waker::noop()))
    }

    /// An accepted flow with its handshake done: (stack, flow, start, our next seq, the stack's next seq).
    fn established() -> (Stack, FlowId, Instant, u32, u32) {
        let (mut stack, start) = stack();
        assert_eq!(stack.ingress(&syn(server(), 1000), start), Some(Event::Open(key(server()))));
        let id = stack.accept(key(server()), start).expect("accepted");
        let syn_ack = sent(&mut stack).pop().expect("SYN-ACK");
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::None, 1001, Some(syn_ack.seq + 1), &[]), start);
        stack.egress_dirty(start);
        assert_eq!(stack.state(id), Some(tcp::State::Established));
        assert_eq!(stack.poll_established(id, &mut Context::from_waker(Waker::noop())), Poll::Ready(true));
        (stack, id, start, 1001, syn_ack.seq + 1)
    }

    #[test]
    fn a_syn_is_answered_only_when_the_broker_accepts_and_retransmissions_wait() {
        let (mut stack, start) = stack();
        assert_eq!(stack.ingress(&syn(server(), 1000), start), Some(Event::Open(key(server()))));
        assert!(stack.outbox.is_empty(), "no SYN-ACK before the broker's answer");
        assert_eq!(stack.ingress(&syn(server(), 1000), start + std::time::Duration::from_secs(1)), None, "a retransmitted SYN is dropped");
        assert_eq!(stack.counters.dropped_syn_retransmit, 1);
        assert!(stack.outbox.is_empty());
        let id = stack.accept(key(server()), start + std::time::Duration::from_secs(2)).expect("accepted");
        assert!(stack.poll_established(id, &mut Context::from_waker(Waker::noop())).is_pending(), "the server's ACK is awaited");
        let answer = sent(&mut stack);
        assert_eq!(answer.len(), 1, "{answer:?}");
        let syn_ack = &answer[0];
        assert!(syn_ack.syn && syn_ack.ack && !syn_ack.rst);
        assert_eq!((syn_ack.from, syn_ack.to, syn_ack.ack_number), (laptop(), server(), 1001), "it answers the kept SYN");
        assert_eq!(stack.state(id), Some(tcp::State::SynReceived));
        assert_eq!(stack.accept(key(server()), start), None, "one answer per open");
    }

    #[test]
    fn a_refusal_answers_the_syn_with_rst_ack() {
        let (mut stack, start) = stack();
        assert_eq!(stack.ingress(&syn(server(), 5000), start), Some(Event::Open(key(server()))));
        stack.refuse(key(server()));
        let answer = sent(&mut stack);
        assert_eq!(answer.len(), 1);
        assert!(answer[0].rst && answer[0].ack && !answer[0].syn);
        assert_eq!((answer[0].from, answer[0].to, answer[0].ack_number), (laptop(), server(), 5001));
        assert_eq!(stack.load(), (0, 0), "nothing is left behind");
        // a server that gave up (RST) before the answer: the acceptance finds nothing
        assert!(stack.ingress(&syn(server(), 6000), start).is_some());
        assert_eq!(stack.ingress(&tcp_packet(server(), laptop(), TcpControl::Rst, 6001, None, &[]), start), None);
        assert_eq!(stack.accept(key(server()), start), None);
        assert!(stack.outbox.is_empty());
    }

    #[test]
    fn two_servers_connecting_to_one_address_each_get_their_own_answer() {
        let (mut stack, start) = stack();
        let other: SocketAddr = "10.77.1.9:50000".parse().expect("address");
        assert!(stack.ingress(&syn(server(), 100), start).is_some());
        assert!(stack.ingress(&syn(other, 900), start).is_some());
        // accepted in the other order: each socket takes only its own SYN
        stack.accept(key(other), start).expect("accepted");
        stack.accept(key(server()), start).expect("accepted");
        let answers = sent(&mut stack);
        assert_eq!(answers.iter().map(|packet| (packet.to, packet.ack_number)).collect::<Vec<_>>(), [(other, 901), (server(), 101)]);
    }

    #[test]
    fn packets_outside_the_ranges_and_over_the_caps_are_dropped_and_counted() {
        let (mut stack, start) =
            stack_with(StackConfig { max_pending: 2, max_flows: 3, mtu: 1500, rx_buffer: 4096, tx_buffer: 4096, ..StackConfig::default() });
        let outside = tcp_packet(server(), "100.65.0.1:80".parse().expect("address"), TcpControl::Syn, 1, None, &[]);
        assert_eq!(stack.ingress(&outside, start), None);
        assert_eq!(stack.counters.dropped_outside_ranges, 1);
        assert_eq!(stack.ingress(b"\x45 not a packet", start), None);
        assert_eq!(stack.counters.dropped_malformed, 1);
        // a source inside the virtual ranges is forged: no open, no answer
        let spoofed = tcp_packet("100.64.0.9:40000".parse().expect("address"), "100.64.0.1:80".parse().expect("address"), TcpControl::Syn, 1, None, &[]);
        assert_eq!(stack.ingress(&spoofed, start), None);
        assert_eq!(stack.counters.dropped_spoofed_source, 1);
        assert!(stack.outbox.is_empty());
        let sources: Vec<SocketAddr> = (0..4).map(|index| SocketAddr::new(server().ip(), 41000 + index)).collect();
        assert!(stack.ingress(&syn(sources[0], 1), start).is_some());
        assert!(stack.ingress(&syn(sources[1], 1), start).is_some());
        assert_eq!(stack.ingress(&syn(sources[2], 1), start), None, "no third pending open");
        assert_eq!(stack.counters.dropped_over_cap, 1);
        stack.accept(key(sources[0]), start).expect("accepted");
        stack.accept(key(sources[1]), start).expect("accepted");
        assert!(stack.ingress(&syn(sources[2], 1), start).is_some(), "room again");
        assert_eq!(stack.ingress(&syn(sources[3], 1), start), None, "no fourth flow");
        assert_eq!(stack.counters.dropped_over_cap, 2);
        assert_eq!(stack.counters.dropped(), 5, "outside, malformed, spoofed and two over the caps");
    }

    #[test]
    fn a_segment_for_no_connection_is_reset() {
        let (mut stack, start) = stack();
        assert_eq!(stack.ingress(&tcp_packet(server(), laptop(), TcpControl::Psh, 10, Some(20), b"late"), start), None);
        let answer = sent(&mut stack);
        assert_eq!(answer.len(), 1);
        assert!(answer[0].rst && !answer[0].ack);
        assert_eq!(answer[0].seq, 20);
        assert_eq!(stack.counters.reset_unknown, 1);
    }

    #[test]
    fn bytes_fins_and_resets_travel_both_ways() {
        let (mut stack, id, start, mut server_seq, stack_seq) = established();
        // the server's bytes are read; the stack acknowledges them
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::Psh, server_seq, Some(stack_seq), b"hello"), start);
        stack.egress_dirty(start);
        server_seq += 5;
        assert_eq!(read(&mut stack, id, start), Poll::Ready(ReadOutcome::Data(Bytes::from_static(b"hello"))));
        assert!(read(&mut stack, id, start).is_pending(), "nothing more yet");
        // the client's bytes go out as a segment
        let mut data = Bytes::from_static(b"world");
        assert_eq!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(())));
        let out = sent(&mut stack);
        let segment = out.iter().find(|packet| !packet.payload.is_empty()).expect("a data segment");
        assert_eq!((segment.payload.as_slice(), segment.seq, segment.ack_number), (&b"world"[..], stack_seq, server_seq));
        // the server half-closes: end of its bytes, and the client may still send
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::Fin, server_seq, Some(stack_seq + 5), &[]), start);
        stack.egress_dirty(start);
        assert_eq!(read(&mut stack, id, start), Poll::Ready(ReadOutcome::Eof));
        let mut more = Bytes::from_static(b"after your FIN");
        assert_eq!(stack.poll_write(id, &mut more, start, &mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(())));
        // the client finishes: FIN after its bytes
        stack.close(id, start);
        let out = sent(&mut stack);
        assert!(out.iter().any(|packet| packet.fin), "{out:?}");
        // a reset from the server ends the flow: reads say so, writes fail
        let (mut stack, id, start, server_seq, stack_seq) = established();
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::Rst, server_seq, Some(stack_seq), &[]), start);
        assert_eq!(read(&mut stack, id, start), Poll::Ready(ReadOutcome::Reset));
        let mut data = Bytes::from_static(b"x");
        assert_eq!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())), Poll::Ready(Err(())));
        stack.detach(id, start);
        assert_eq!(stack.load(), (0, 0), "a reset flow is gone once let go");
        // aborting sends a reset to the server
        let (mut stack, id, start, _, _) = established();
        stack.abort(id, start);
        assert!(sent(&mut stack).iter().any(|packet| packet.rst));
    }

    #[test]
    fn a_full_send_buffer_holds_the_writer_back_until_the_server_acknowledges() {
        let (mut stack, id, start, server_seq, stack_seq) = { established() };
        let capacity = 64 * 1024;
        let mut data = Bytes::from(vec![7u8; capacity + 1000]);
        assert!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())).is_pending(), "more than the buffer holds");
        assert_eq!(data.len(), 1000, "the rest waits");
        let out = sent(&mut stack);
        let in_flight: usize = out.iter().map(|packet| packet.payload.len()).sum();
        assert!(in_flight > 0 && in_flight <= capacity, "{in_flight}");
        // the server acknowledges everything: room again
        let acked = stack_seq.wrapping_add(in_flight as u32);
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::None, server_seq, Some(acked), &[]), start);
        stack.egress_dirty(start);
        assert_eq!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(())));
    }

    #[test]
    fn a_burst_of_one_flow_leaves_room_to_be_written_as_one_coalesced_packet() {
        let (mut stack, id, start, _, _) = established();
        let mut data = Bytes::from(vec![1u8; 20_000]);
        assert!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())).is_ready());
        let segments = stack.outbox.buffers_mut().len();
        assert!(segments > 10, "{segments} segments");
        // what the device does with offloads on: the segments are appended to the first buffer,
        // which only happens when it has the capacity (no allocation on that path)
        tun_rs::GROTable::default().apply_gro(stack.outbox.buffers_mut(), 10, false).expect("coalesced");
        let first = &stack.outbox.buffers_mut()[0];
        assert_eq!(first[1], tun_rs::VIRTIO_NET_HDR_GSO_TCPV4, "one TCP segmentation-offload packet");
        assert_eq!(first.len(), 10 + 40 + 20_000, "all the payload behind one header");
    }

    #[test]
    fn a_tiny_mss_does_not_flood_the_outbox() {
        let (mut stack, start) = stack();
        let mut tiny = tcp_packet(server(), laptop(), TcpControl::Syn, 1000, None, &[]);
        // the server announces an MSS of 1 byte
        let ip_header = 20;
        let mut tcp = TcpPacket::new_unchecked(&mut tiny[ip_header..]);
        tcp.options_mut()[2..4].copy_from_slice(&1u16.to_be_bytes());
        tcp.fill_checksum(&IpAddress::from(server().ip()), &IpAddress::from(laptop().ip()));
        assert!(stack.ingress(&tiny, start).is_some());
        let id = stack.accept(key(server()), start).expect("accepted");
        let syn_ack = sent(&mut stack).pop().expect("SYN-ACK");
        stack.ingress(&tcp_packet(server(), laptop(), TcpControl::None, 1001, Some(syn_ack.seq + 1), &[]), start);
        stack.egress_dirty(start);
        let mut data = Bytes::from(vec![1u8; 30_000]);
        let _ = stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop()));
        assert!(stack.outbox.buffers_mut().len() <= 512, "{}", stack.outbox.buffers_mut().len());
        assert!(stack.next_timer().is_some(), "the rest goes out on the next turn");
    }

    #[test]
    fn timers_retransmit_what_the_server_did_not_acknowledge() {
        let (mut stack, id, start, _, stack_seq) = established();
        let mut data = Bytes::from_static(b"lost once");
        assert!(stack.poll_write(id, &mut data, start, &mut Context::from_waker(Waker::noop())).is_ready());
        assert_eq!(sent(&mut stack).len(), 1);
        let deadline = stack.next_timer().expect("a retransmission timer");
        stack.poll_timers(deadline + std::time::Duration::from_millis(1));
        let again = sent(&mut stack);
        assert!(again.iter().any(|packet| packet.payload == b"lost once" && packet.seq == stack_seq), "{again:?}");
    }
}
