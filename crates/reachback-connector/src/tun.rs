//! `--mode tun`: the connector as the next hop for the virtual ranges through a TUN
//! device of its own, with a userspace TCP/IP stack (`tun/stack.rs`, smoltcp)
//! terminating the servers' TCP. Needs CAP_NET_ADMIN only (no nftables).
//!
//! A server's SYN is not answered until the broker answered the flow: the stack
//! keeps it and reports it, a task opens the flow over the tunnel and waits for
//! the `FlowReply`; on `Ok` the flow's socket answers the SYN, on a refusal (or
//! no tunnel, or no answer) a RST+ACK does, so the server's connect fails with
//! "connection refused". Then one task per flow relays bytes between the stack's
//! socket and the tunnel stream under the flow state machine (half-close, resets,
//! idle timeout), as `reachback_tunnel::relay` does for kernel sockets.
//!
//! One task owns the device: it reads packets in batches, feeds them to the
//! stack, sends what the touched flows answer once per batch, and runs the
//! flows' timers. The stack sits behind a mutex that is only ever held for one
//! synchronous step (the connector's runtime has one thread, so it is never
//! contended); the flow tasks read and write through it and send the packets
//! their step produced at once.

mod packet;
mod routes;
mod stack;

use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use reachback_proto::{Flow, FlowAction, FlowEvent, FlowOpen, FlowReply, Side, Transport};
use reachback_tunnel::{Connection, End, RecvStream, SendStream, write_frame};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, watch};

pub use packet::{BuildError, FlowKey, udp_reply};
pub use routes::{RangeSet, cidr_cover};
use stack::{Event, FlowId, ReadOutcome, Stack, StackConfig};

/// The device's MTU unless `--tun-mtu` says otherwise (see docs/decisions.md).
pub const DEFAULT_MTU: u16 = 65_535;
/// The most reads from the device before the batch's answers are sent (each read
/// is one packet, or with offloads up to 64 KiB of one flow's segments).
const READ_BATCH: usize = 32;
/// The largest chunk read from a flow's socket for the tunnel at once.
const READ_CHUNK: usize = 64 * 1024;
/// Error code of a stream reset that mirrors a TCP reset (as `relay` uses).
const RESET_CODE: u32 = 1;
/// How long a flow may carry nothing before both ends are reset (as in TPROXY mode).
const IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
/// How long the server has to acknowledge the SYN-ACK once the flow was accepted
/// (a server that never does must not hold a flow, and the laptop's connection, for days).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// `--tun-name` and `--tun-mtu`.
#[derive(Clone, Debug)]
pub struct TunOptions {
    pub name: String,
    pub mtu: u16,
}

/// The device, the stack and the routes of TUN mode.
pub struct TunIngress {
    shared: Arc<Shared>,
    routes: Mutex<routes::Routes>,
    name: String,
}

struct Shared {
    state: Mutex<Locked>,
    device: AsyncFd<tun_rs::SyncDevice>,
    /// a flow task scheduled a timer earlier than the one the device task sleeps to
    timer_changed: Notify,
    /// packets the device refused to take (counted, not retried: TCP retransmits)
    send_failures: AtomicU64,
}

/// What the flow tasks and the device task share: the stack, and the table that
/// coalesces a flush's segments of one flow into one write (offloads).
struct Locked {
    stack: Stack,
    gro: tun_rs::GROTable,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// One step on the stack; the packets it produced go to the device before the lock is let go.
    fn with<R>(&self, step: impl FnOnce(&mut Stack, Instant) -> R) -> R {
        let mut locked = lock(&self.state);
        let before = locked.stack.next_timer();
        let result = step(&mut locked.stack, Instant::now());
        self.flush(&mut locked);
        let after = locked.stack.next_timer();
        if after.is_some() && (before.is_none() || after < before) {
            self.timer_changed.notify_one();
        }
        result
    }

    /// Writes the outbox to the device; with offloads, consecutive segments of one
    /// flow go as one write (the kernel segments them again where it must).
    fn flush(&self, locked: &mut Locked) {
        let Locked { stack, gro } = locked;
        if stack.outbox.is_empty() {
            return;
        }
        let headroom = stack.outbox.headroom();
        let packets = stack.outbox.buffers_mut().len() as u64;
        if let Err(error) = self.device.get_ref().send_multiple(gro, stack.outbox.buffers_mut(), headroom) {
            self.send_failures.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%error, "the TUN device refused a packet");
        }
        stack.counters.packets_out += packets;
        stack.outbox.clear();
    }
}

impl TunIngress {
    /// Creates the device (named `options.name`, up, no address: routes point at it).
    pub fn create(options: &TunOptions) -> anyhow::Result<TunIngress> {
        anyhow::ensure!(options.mtu >= 1280, "--tun-mtu {} is below 1280, the least IPv6 allows", options.mtu);
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&options.name)
                .mtu(options.mtu)
                .enable(true)
                .with(|builder| {
                    builder.offload(offload);
                })
                .build_sync()
        };
        // offloads: the kernel hands over up to 64 KiB of one flow's segments per read and takes as much per write
        let device = match build(true) {
            Ok(device) => device,
            Err(error) => {
                tracing::info!(%error, "no offloads on the TUN device; one packet per read and write");
                build(false).with_context(|| format!("creating the TUN device {} (needs CAP_NET_ADMIN and /dev/net/tun)", options.name))?
            }
        };
        device.set_nonblocking(true).context("making the TUN device non-blocking")?;
        let name = device.name().unwrap_or_else(|_| options.name.clone());
        // `register` (its replacement) is `unsafe`, which this workspace forbids; its condition
        // holds here: the device owns its descriptor, and the `AsyncFd` owns the device until both go
        #[allow(deprecated)]
        let device = AsyncFd::with_interest(device, tokio::io::Interest::READABLE).context("registering the TUN device with the runtime")?;
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let config = StackConfig { mtu: usize::from(options.mtu), ..StackConfig::default() };
        let stack = Stack::new(config, u64::from_le_bytes(seed), Instant::now(), tun_rs::VIRTIO_NET_HDR_LEN);
        for (path, what, fix) in [
            ("/proc/sys/net/ipv4/ip_forward", "IPv4", "sysctl -w net.ipv4.ip_forward=1"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6", "sysctl -w net.ipv6.conf.all.forwarding=1"),
        ] {
            // the host's forwarding is the operator's to set (it changes more than this connector:
            // IPv6 forwarding, for one, stops router advertisements being accepted)
            if std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "0") {
                tracing::warn!(%path, "{what} forwarding is off on this host: servers' packets for {what} virtual ranges will not reach the TUN device; run `{fix}` (and persist it in /etc/sysctl.d)");
            }
        }
        tracing::info!(device = %name, mtu = options.mtu, "TUN device up");
        Ok(TunIngress {
            shared: Arc::new(Shared {
                state: Mutex::new(Locked { stack, gro: tun_rs::GROTable::default() }),
                device,
                timer_changed: Notify::new(),
                send_failures: AtomicU64::new(0),
            }),
            routes: Mutex::new(routes::Routes::new(&name)),
            name,
        })
    }

    /// The ranges the broker announced: the stack takes flows for them, the routes through the device cover them
    /// (a route the host refuses is logged, the others stay).
    pub fn set_ranges(&self, ranges: &[String]) -> anyhow::Result<()> {
        let (set, skipped) = RangeSet::parse(ranges);
        for range in skipped {
            tracing::warn!(%range, "a virtual range the broker announced does not parse; not routed");
        }
        let wanted = set.routes();
        self.shared.with(|stack, _| stack.set_ranges(set));
        // a route the host refuses (an IPv6 range on a host without IPv6) does not stop the others
        if let Err(error) = lock(&self.routes).apply(&wanted) {
            tracing::warn!(device = %self.name, error = format!("{error:#}"), "some virtual ranges could not be routed into the TUN device");
        }
        tracing::debug!(routes = ?wanted, device = %self.name, "routes through the TUN device");
        Ok(())
    }

    /// Removes the routes; the device itself goes when the process lets go of it.
    pub fn close(&self) {
        let counters = lock(&self.shared.state).stack.counters;
        tracing::info!(
            packets_in = counters.packets_in,
            packets_out = counters.packets_out,
            flows_opened = counters.opened,
            flows_refused = counters.refused,
            udp_in = counters.udp_in,
            udp_out = counters.udp_out,
            dropped = counters.dropped(),
            dropped_malformed = counters.dropped_malformed,
            dropped_protocol = counters.dropped_protocol,
            dropped_outside_ranges = counters.dropped_outside_ranges,
            dropped_spoofed_source = counters.dropped_spoofed_source,
            dropped_over_cap = counters.dropped_over_cap,
            send_failures = self.shared.send_failures.load(Ordering::Relaxed),
            "TUN mode totals"
        );
        match lock(&self.routes).remove_all() {
            Ok(()) => tracing::info!(device = %self.name, "TUN routes removed"),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "could not remove the TUN routes"),
        }
    }

    /// Reads the device until the task is aborted; each connection attempt is
    /// asked of the tunnel of the moment, UDP datagrams go to the UDP flows, whose
    /// replies come back here as packets.
    pub async fn drive(
        self: Arc<Self>,
        connection: watch::Receiver<Option<Connection>>,
        udp: Arc<crate::udp::UdpIngress>,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let shared = self.shared.clone();
        let writer = Arc::downgrade(&shared);
        let reply = crate::udp::Reply::Packet(Arc::new(move |from, to, payload: &[u8]| {
            let Some(shared) = writer.upgrade() else { return };
            if let Err(error) = shared.with(|stack, _| stack.push_udp(from, to, payload)) {
                tracing::trace!(%from, %to, ?error, "UDP reply not sent");
            }
        }));
        let mtu = lock(&shared.state).stack.mtu();
        // one read: the offload header and up to 64 KiB, split into segments of at most the MTU each
        // (zeroed allocations: pages are touched only as packets fill them)
        let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
        let mut segments: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE).map(|_| vec![0u8; mtu]).collect();
        let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        let mut last_report = (Instant::now(), stack::Counters::default());
        let mut last_metrics = Instant::now();
        loop {
            // at least once a second: the metrics follow the counters
            let deadline =
                lock(&shared.state).stack.next_timer().map_or(Instant::now() + Duration::from_secs(1), |at| at.min(Instant::now() + Duration::from_secs(1)));
            let mut failed = false;
            tokio::select! {
                ready = shared.device.readable() => {
                    let Ok(mut guard) = ready else {
                        tracing::warn!("the TUN device failed; its task stops");
                        return;
                    };
                    let now = Instant::now();
                    let mut locked = lock(&shared.state);
                    for _ in 0..READ_BATCH {
                        let read = guard.try_io(|device| device.get_ref().recv_multiple(&mut original, &mut segments, &mut sizes, 0));
                        match read {
                            Ok(Ok(count)) => {
                                for (segment, &size) in segments.iter().zip(&sizes).take(count) {
                                    let packet = segment.get(..size).unwrap_or_default();
                                    tracing::trace!(length = size, "packet from the TUN device");
                                    match locked.stack.ingress(packet, now) {
                                        None => {}
                                        // the task runs once this step lets go of the stack
                                        Some(Event::Open(key)) => {
                                            tokio::spawn(open_flow(shared.clone(), key, connection.borrow().clone()));
                                        }
                                        // the UDP flows take the datagram or drop it (counted there), never waiting
                                        Some(Event::Udp { source, destination, payload }) => udp.datagram(source, destination, payload, &reply),
                                    }
                                }
                            }
                            Ok(Err(error)) => {
                                // a read the offload code could not split: that read is lost, the device goes on
                                locked.stack.counters.dropped_malformed += 1;
                                tracing::debug!(%error, "reading the TUN device");
                                failed = true;
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                    locked.stack.egress_dirty(now);
                    shared.flush(&mut locked);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    shared.with(|stack, now| stack.poll_timers(now));
                }
                _ = shared.timer_changed.notified() => {}
            }
            if failed {
                // a device that keeps failing (removed under us) must not spin the runtime
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if last_metrics.elapsed() >= Duration::from_secs(1) {
                let locked = lock(&shared.state);
                let counters = locked.stack.counters;
                let (flows, pending) = locked.stack.load();
                drop(locked);
                metrics.observe_tun(&[("accepted", counters.opened), ("refused", counters.refused)], &counters.dropped_by_reason(), flows + pending);
                last_metrics = Instant::now();
            }
            if last_report.0.elapsed() >= Duration::from_secs(60) {
                let counters = lock(&shared.state).stack.counters;
                if counters != last_report.1 {
                    let (flows, pending) = lock(&shared.state).stack.load();
                    tracing::debug!(
                        flows,
                        pending,
                        opened = counters.opened,
                        refused = counters.refused,
                        dropped = counters.dropped(),
                        reset_unknown = counters.reset_unknown,
                        "TUN mode counters"
                    );
                }
                last_report = (Instant::now(), counters);
            }
        }
    }
}

/// One connection attempt: ask the broker, then let the socket answer the SYN and
/// relay, or refuse with a reset.
async fn open_flow(shared: Arc<Shared>, key: FlowKey, tunnel: Option<Connection>) {
    let (destination, source) = (key.destination, key.source);
    match ask_broker(key, tunnel).await {
        Ok((send, recv)) => {
            let Some(id) = shared.with(|stack, now| stack.accept(key, now)) else {
                tracing::debug!(%destination, %source, "the server gave up before the flow opened");
                End::Stream { send, recv }.reset();
                return;
            };
            tracing::trace!(%destination, %source, "flow open");
            let clean = relay_flow(&shared, id, send, recv).await;
            if clean {
                tracing::trace!(%destination, %source, "flow closed");
            } else {
                tracing::debug!(%destination, %source, "flow reset");
            }
        }
        Err(reason) => {
            shared.with(|stack, _| stack.refuse(key));
            tracing::info!(%destination, %source, refusal = %reason, "flow refused");
        }
    }
}

/// Opens the flow's stream and waits for the broker's (and so the agent's) answer.
async fn ask_broker(key: FlowKey, tunnel: Option<Connection>) -> Result<(SendStream, RecvStream), String> {
    let Some(tunnel) = tunnel else { return Err("no tunnel to the broker".into()) };
    let (mut send, mut recv) = tunnel.open_bi().await.map_err(|error| format!("no stream to the broker: {error}"))?;
    if let Err(error) = write_frame(&mut send, &FlowOpen { destination: key.destination, source: key.source, user: None, protocol: Transport::Tcp }).await {
        End::Stream { send, recv }.reset();
        return Err(format!("the flow request was not sent: {error}"));
    }
    match tokio::time::timeout(super::FLOW_REPLY_TIMEOUT, reachback_tunnel::read_frame::<FlowReply>(&mut recv)).await {
        Ok(Ok(Some(FlowReply::Ok))) => Ok((send, recv)),
        Ok(Ok(Some(FlowReply::Refused(refusal)))) => Err(refusal.to_string()),
        Ok(_) => {
            End::Stream { send, recv }.reset();
            Err("the broker ended the flow without an answer".into())
        }
        Err(_) => {
            End::Stream { send, recv }.reset();
            Err(format!("no answer within {} s", super::FLOW_REPLY_TIMEOUT.as_secs()))
        }
    }
}

/// How one direction of a flow ended (as in `reachback_tunnel::relay`).
enum PumpEnd {
    Eof,
    ReaderReset,
    WriterReset,
}

fn event(end: PumpEnd, side: Side) -> FlowEvent {
    match end {
        PumpEnd::Eof => FlowEvent::Eof(side),
        PumpEnd::ReaderReset => FlowEvent::Reset(side),
        PumpEnd::WriterReset => FlowEvent::Reset(side.other()),
    }
}

/// Relays flow `id` between its socket in the stack (the server's side) and the
/// tunnel stream (the client's side) until both directions finished, either end
/// reset, or the flow sat idle; returns whether it ended cleanly. Each direction
/// moves one chunk at a time: the socket's buffers and the stream's credit are
/// the only queues.
async fn relay_flow(shared: &Shared, id: FlowId, mut send: SendStream, mut recv: RecvStream) -> bool {
    let established = tokio::time::timeout(HANDSHAKE_TIMEOUT, poll_fn(|context| shared.with(|stack, _| stack.poll_established(id, context)))).await;
    if !matches!(established, Ok(true)) {
        shared.with(|stack, now| {
            stack.abort(id, now);
            stack.detach(id, now);
        });
        End::Stream { send, recv }.reset();
        return false;
    }
    let epoch = Instant::now();
    let mut flow = Flow::new(epoch, Duration::ZERO, IDLE_TIMEOUT);
    flow.handle(FlowEvent::Accepted, epoch);
    let activity = AtomicU64::new(0);
    let touch = || activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let mut reset = (false, false);
    {
        let mut upstream = pin!(async {
            loop {
                match poll_fn(|context| shared.with(|stack, now| stack.poll_read(id, READ_CHUNK, now, context))).await {
                    ReadOutcome::Data(chunk) => {
                        if send.write_chunk(chunk).await.is_err() {
                            return PumpEnd::WriterReset;
                        }
                        touch();
                    }
                    ReadOutcome::Eof => return if send.finish().is_ok() { PumpEnd::Eof } else { PumpEnd::WriterReset },
                    ReadOutcome::Reset => return PumpEnd::ReaderReset,
                }
            }
        });
        let mut downstream = pin!(async {
            loop {
                match recv.read_chunk().await {
                    Ok(Some(chunk)) => {
                        if write_all(shared, id, chunk).await.is_err() {
                            return PumpEnd::WriterReset;
                        }
                        touch();
                    }
                    Ok(None) => {
                        shared.with(|stack, now| stack.close(id, now));
                        return PumpEnd::Eof;
                    }
                    Err(_) => return PumpEnd::ReaderReset,
                }
            }
        });
        let (mut upstream_done, mut downstream_done) = (false, false);
        while let Some(deadline) = flow.poll_timeout() {
            let actions = tokio::select! {
                end = &mut upstream, if !upstream_done => {
                    upstream_done = true;
                    flow.handle(event(end, Side::Server), Instant::now())
                }
                end = &mut downstream, if !downstream_done => {
                    downstream_done = true;
                    flow.handle(event(end, Side::Client), Instant::now())
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let last = epoch + Duration::from_millis(activity.load(Ordering::Relaxed));
                    flow.handle(FlowEvent::Data(Side::Server), last);
                    flow.handle_timeout(Instant::now())
                }
            };
            for action in actions {
                match action {
                    // the pumps pass FINs on when they see them
                    FlowAction::Finish(_) | FlowAction::Done => {}
                    FlowAction::Reset(Side::Server) => reset.0 = true,
                    FlowAction::Reset(Side::Client) => reset.1 = true,
                }
            }
        }
    }
    if reset.0 {
        shared.with(|stack, now| stack.abort(id, now));
    }
    if reset.1 {
        send.reset(RESET_CODE);
        recv.stop(RESET_CODE);
    }
    shared.with(|stack, now| stack.detach(id, now));
    !reset.0 && !reset.1
}

/// Queues a chunk from the tunnel on the flow's socket, waiting for room in its send buffer.
async fn write_all(shared: &Shared, id: FlowId, mut chunk: Bytes) -> Result<(), ()> {
    poll_fn(|context| shared.with(|stack, now| stack.poll_write(id, &mut chunk, now, context))).await
}
