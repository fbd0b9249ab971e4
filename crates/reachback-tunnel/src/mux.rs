//! The stream multiplexer over one TLS connection (wire format and credit
//! arithmetic in `reachback_proto::mux`). One reader task and one writer task per
//! connection; streams are cheap (a small shared record and a queue), opening one
//! costs a single frame and no handshake.
//!
//! What a peer can make us hold is bounded, so one hostile peer cannot exhaust the
//! memory of a broker that serves thousands ([`MuxLimits`] has the bounds):
//! - data it sends: a credit window per stream and one per connection; bytes go
//!   back to the connection's window when the application reads them, and also
//!   when they are thrown away with their stream;
//! - streams it opens: a cap on the streams held at once, a smaller one on those
//!   nobody accepted yet, refusals past either; and a connection that accepts no
//!   streams ([`Connection::stop_accepting`]) takes an `Open` as a violation;
//! - frames we send: one ordered queue (a stream's `Fin` never overtakes its
//!   data) whose bytes and control frames are counted until written. Data frames
//!   wait for credit before they are queued; a peer that lets the queue grow past
//!   its bounds anyway (it grants credit, or makes us answer, and does not read)
//!   is dropped at once, without waiting to write what is queued.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use reachback_proto::mux::{
    ConnectionWindow, FrameKind, INITIAL_CONNECTION_WINDOW, INITIAL_WINDOW, MAX_CONNECTION_CREDIT, MAX_DATA, MUX_HEADER, MuxError, ReceiveWindow, add_credit,
    decode_header, decode_u32, encode_header, next_stream_id, peer_may_open,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

/// Why a stream operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the peer reset the stream (code {0})")]
    Reset(u32),
    #[error("the peer stopped reading the stream (code {0})")]
    Stopped(u32),
    #[error("the connection is closed: {0}")]
    ConnectionClosed(String),
    #[error("the stream is already finished")]
    Finished,
}

/// The reset code of a stream refused because the connection holds too many.
pub const STREAM_REFUSED: u32 = 2;
/// Default of [`MuxLimits::max_streams`].
pub const DEFAULT_MAX_STREAMS: usize = 65_536;
/// Default of [`MuxLimits::max_unaccepted_streams`]: over a second of a busy
/// connector's new flows (3,000 a second) while the accepting task is held up.
pub const DEFAULT_MAX_UNACCEPTED_STREAMS: usize = 4_096;
/// Default of [`MuxLimits::connection_window`]: sixteen streams' full windows.
pub const DEFAULT_CONNECTION_WINDOW: u64 = INITIAL_CONNECTION_WINDOW as u64;
/// Default of [`MuxLimits::max_queued_frames`]: room for a `Reset` and a `Stop`
/// for each of [`DEFAULT_MAX_STREAMS`] streams, twice over (a connection dropping
/// all its flows at once while the network stalls is not a peer that does not read).
pub const DEFAULT_MAX_QUEUED_FRAMES: usize = 4 * DEFAULT_MAX_STREAMS;
/// Default of [`MuxLimits::max_unread_data_frames`]: about 6 MiB of bookkeeping at most.
pub const DEFAULT_MAX_UNREAD_DATA_FRAMES: usize = 65_536;
/// Default of [`MuxLimits::max_queued_bytes`]: the most credit a peer may grant
/// ([`MAX_CONNECTION_CREDIT`], which bounds the data an honest peer lets us queue),
/// plus room for control frames.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = MAX_CONNECTION_CREDIT as usize + 16 * 1024 * 1024;

/// Per-connection limits, set when the connection starts;
/// [`MuxLimits::default`] is what [`Connection::start`] uses. Change fields with
/// struct update syntax: `MuxLimits { max_streams: 10_000, ..MuxLimits::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MuxLimits {
    /// Streams held at once, opened by either side, the peer's not yet accepted
    /// included (the broker's "max flows per tunnel"). A peer opening more has each
    /// refused with a `Reset` carrying [`STREAM_REFUSED`], and the connection goes
    /// on. Our own [`Connection::open_bi`] is not held to it: what we open is ours
    /// to bound. Default [`DEFAULT_MAX_STREAMS`].
    pub max_streams: usize,
    /// Streams the peer opened that wait for [`Connection::accept_bi`]; past it the
    /// peer's new streams are refused as above. Default [`DEFAULT_MAX_UNACCEPTED_STREAMS`].
    pub max_unaccepted_streams: usize,
    /// Whether the peer may open streams at all, from the start; see
    /// [`Connection::stop_accepting`]. A connector, towards which the broker never
    /// opens streams, sets it to `false`. Default `true`.
    pub accept_streams: bool,
    /// The connection's memory budget for received data: bytes the peer may have
    /// sent and the application not yet read, across all streams (each stream
    /// also has its own 1 MiB window). Held between
    /// [`INITIAL_CONNECTION_WINDOW`] (16 MiB) and [`MAX_CONNECTION_CREDIT`]
    /// (1 GiB). When it is used up, every stream of the connection waits, so it
    /// should be well above 1 MiB times the streams whose readers may stall at
    /// once (a relay writing to a slow socket). Default [`DEFAULT_CONNECTION_WINDOW`].
    pub connection_window: u64,
    /// Control frames (all but data) queued and not yet written; past it the
    /// connection is closed as "the peer does not read". Our data frames are not
    /// counted here: they wait for credit, and their count depends on the sizes
    /// the application writes, not on the peer. Default [`DEFAULT_MAX_QUEUED_FRAMES`].
    pub max_queued_frames: usize,
    /// Data frames received and not yet read, across all streams. Each costs
    /// about a hundred bytes of bookkeeping beyond its payload, so a peer sending
    /// one-byte frames nobody reads would hold a hundred times the connection's
    /// budget; past this count the connection is closed as a protocol violation.
    /// An honest peer's frames are read as they come (a relay) or are few.
    /// Default [`DEFAULT_MAX_UNREAD_DATA_FRAMES`].
    pub max_unread_data_frames: usize,
    /// Bytes of all frames queued and not yet written; past it the connection is
    /// closed as "the peer does not read". An honest peer's credit keeps our data
    /// below the budget it was configured with, so this must stay above the
    /// largest budget peers use (16 MiB unless configured). Default
    /// [`DEFAULT_MAX_QUEUED_BYTES`].
    pub max_queued_bytes: usize,
}

impl Default for MuxLimits {
    fn default() -> Self {
        MuxLimits {
            max_streams: DEFAULT_MAX_STREAMS,
            max_unaccepted_streams: DEFAULT_MAX_UNACCEPTED_STREAMS,
            accept_streams: true,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_queued_frames: DEFAULT_MAX_QUEUED_FRAMES,
            max_unread_data_frames: DEFAULT_MAX_UNREAD_DATA_FRAMES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

/// How long a closing connection may spend writing what is queued (its `GoAway`
/// among it): a peer that does not read must not hold the writer for ever.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

struct Frame {
    kind: FrameKind,
    stream: u32,
    payload: Bytes,
}

enum Inbound {
    Data(Bytes),
    Fin,
    Reset(u32),
}

/// The sending half's shared state.
struct SendSide {
    credit: u64,
    stopped: Option<u32>,
}

/// The receiving half's shared state. The reader queues data only under this lock
/// and only while `closed` is false, so when the half closes, what is queued is all
/// there will ever be: each byte goes back to the connection's window exactly once.
struct ReceiveSide {
    window: ReceiveWindow,
    /// the peer sent its `Fin` or `Reset`
    peer_ended: bool,
    /// the application is done with this half (read the end, stopped, dropped it)
    closed: bool,
}

/// What the reader hands a stream's receiving half, in order: one producer (the
/// connection's reader) and one consumer (the half). Nothing is allocated until
/// something is queued, and the queue's room goes when it drains (a channel would
/// hold a block of 32 slots, over a kilobyte, for every stream from its start,
/// thousands of idle UDP flows included). Its length is bounded by the credit
/// windows and the unread-frame cap, as the reader checks before it pushes.
struct InboundQueue {
    /// the items, and whether the half closed (nothing more is queued then)
    items: Mutex<(VecDeque<Inbound>, bool)>,
    ready: Notify,
}

impl InboundQueue {
    fn new() -> Self {
        InboundQueue { items: Mutex::new((VecDeque::new(), false)), ready: Notify::new() }
    }

    /// Queues an item; `false` (and nothing queued) once the half closed.
    fn push(&self, item: Inbound) -> bool {
        {
            let mut queue = lock(&self.items);
            if queue.1 {
                return false;
            }
            queue.0.push_back(item);
        }
        // one consumer: a permit stored while it is not waiting wakes its next wait
        self.ready.notify_one();
        true
    }

    /// The next item, waiting for one. Cancel-safe: an item is taken only when returned.
    async fn pop(&self) -> Inbound {
        loop {
            {
                let mut queue = lock(&self.items);
                if let Some(item) = queue.0.pop_front() {
                    if queue.0.is_empty() && queue.0.capacity() > 32 {
                        queue.0 = VecDeque::new();
                    }
                    return item;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Closes the queue and hands back what it held.
    fn close(&self) -> VecDeque<Inbound> {
        let mut queue = lock(&self.items);
        queue.1 = true;
        std::mem::take(&mut queue.0)
    }
}

struct StreamShared {
    id: u32,
    send: Mutex<SendSide>,
    credit_changed: Notify,
    inbound: InboundQueue,
    receive: Mutex<ReceiveSide>,
    /// both halves are done: the record can go
    send_done: AtomicBool,
    recv_done: AtomicBool,
}

/// A stream the peer opened that waits for [`Connection::accept_bi`]. It holds no
/// handle on the connection, so streams nobody accepts keep no connection alive.
struct Unaccepted {
    shared: Arc<StreamShared>,
}

/// The streams of a connection, under one lock so the caps, the accept queue and
/// id allocation agree.
struct StreamTable {
    /// every live stream, unaccepted ones included
    streams: HashMap<u32, Arc<StreamShared>>,
    unaccepted: VecDeque<Unaccepted>,
    next_local_id: u32,
    accepting: bool,
    /// the cap on `unaccepted` now ([`MuxLimits::max_unaccepted_streams`] at the start)
    max_unaccepted: usize,
}

impl StreamTable {
    /// The next id of our parity that no live stream holds (ids wrap around).
    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_local_id;
            self.next_local_id = next_stream_id(id);
            // after a wrap, a stream opened long ago (the control stream) may still hold its id
            if !self.streams.contains_key(&id) {
                return id;
            }
        }
    }

    fn register(&mut self, id: u32) -> Arc<StreamShared> {
        let shared = Arc::new(StreamShared {
            id,
            send: Mutex::new(SendSide { credit: INITIAL_WINDOW as u64, stopped: None }),
            credit_changed: Notify::new(),
            inbound: InboundQueue::new(),
            receive: Mutex::new(ReceiveSide { window: ReceiveWindow::new(INITIAL_WINDOW), peer_ended: false, closed: false }),
            send_done: AtomicBool::new(false),
            recv_done: AtomicBool::new(false),
        });
        self.streams.insert(id, shared.clone());
        shared
    }
}

/// What waits for the writer, counted from queueing until written.
#[derive(Default)]
struct QueueGauge {
    bytes: AtomicU64,
    control_frames: AtomicU64,
    /// the writer drops everything at once (the peer does not read, so flushing would wait for ever)
    abandon: Notify,
}

impl QueueGauge {
    fn written(&self, control_frames: u64, bytes: u64) {
        if control_frames > 0 {
            self.control_frames.fetch_sub(control_frames, Ordering::Relaxed);
        }
        if bytes > 0 {
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

struct Inner {
    is_client: bool,
    limits: MuxLimits,
    frames: mpsc::UnboundedSender<Frame>,
    queue: Arc<QueueGauge>,
    table: Mutex<StreamTable>,
    accept_ready: Notify,
    /// connection credit for what we send, shared by all streams
    send_credit: AtomicU64,
    send_credit_changed: Notify,
    /// the connection's budget for what we receive
    receive_window: Mutex<ConnectionWindow>,
    /// data frames delivered to streams and not yet read (see `MuxLimits::max_unread_data_frames`)
    unread_data_frames: std::sync::atomic::AtomicUsize,
    closed: watch::Sender<Option<String>>,
    remote: SocketAddr,
    stable_id: u64,
    /// the peer's certificate chain (DER), from the TLS handshake
    peer_certificates: Vec<Vec<u8>>,
}

/// One multiplexed tunnel connection. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn code_payload(code: u32) -> Bytes {
    Bytes::copy_from_slice(&code.to_be_bytes())
}

impl Inner {
    /// Queues a frame. Never called with a lock of ours held: going over a queue
    /// bound shuts the connection, which takes the table's lock.
    fn send_frame(&self, kind: FrameKind, stream: u32, payload: Bytes) {
        let bytes = (MUX_HEADER + payload.len()) as u64;
        let control = u64::from(kind != FrameKind::Data);
        // counted before it is queued, so the writer never takes off what was not added yet
        let queued_bytes = self.queue.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let queued_control = if control == 0 { 0 } else { self.queue.control_frames.fetch_add(1, Ordering::Relaxed) + 1 };
        if self.frames.send(Frame { kind, stream, payload }).is_err() {
            // the writer is gone: nothing more is written
            self.queue.written(control, bytes);
            return;
        }
        if queued_bytes > self.limits.max_queued_bytes as u64 || queued_control > self.limits.max_queued_frames as u64 {
            // flushing would wait for the peer for ever: the writer drops the queue at once
            self.queue.abandon.notify_one();
            let frames = self.queue.control_frames.load(Ordering::Relaxed);
            self.shut(format!("the peer does not read: {queued_bytes} bytes ({frames} control frames) wait to be sent"));
        }
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    fn wrap(self: &Arc<Self>, shared: Arc<StreamShared>) -> (SendStream, RecvStream) {
        let send = SendStream { connection: self.clone(), shared: shared.clone(), done: false };
        let recv = RecvStream { connection: self.clone(), shared, pending: Bytes::new(), done: false };
        (send, recv)
    }

    fn forget_if_done(&self, shared: &StreamShared) {
        if shared.send_done.load(Ordering::Acquire) && shared.recv_done.load(Ordering::Acquire) {
            let mut table = lock(&self.table);
            // only this very stream goes: once ids wrap, its id may belong to a newer one
            if table.streams.get(&shared.id).is_some_and(|current| std::ptr::eq(current.as_ref(), shared)) {
                table.streams.remove(&shared.id);
            }
        }
    }

    /// Received bytes were read or thrown away: the connection's window gets them back.
    fn release(&self, length: usize) {
        let grant = lock(&self.receive_window).on_consumed(length);
        if let Some(grant) = grant {
            self.send_frame(FrameKind::Window, 0, code_payload(grant));
        }
    }

    /// Closes a stream's receiving half: nothing more is queued for it, and what
    /// is queued is thrown away and given back to the connection's window.
    fn close_receiving(&self, shared: &StreamShared) {
        lock(&shared.receive).closed = true;
        let mut thrown_away = 0;
        for item in shared.inbound.close() {
            if let Inbound::Data(data) = item {
                thrown_away += data.len();
                self.unread_data_frames.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if thrown_away > 0 {
            self.release(thrown_away);
        }
    }

    /// Takes up to `wanted` bytes of connection credit; 0 when there is none.
    fn take_send_credit(&self, wanted: u64) -> u64 {
        match self.send_credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| (credit > 0).then(|| credit - credit.min(wanted))) {
            Ok(before) => before.min(wanted),
            Err(_) => 0,
        }
    }

    /// Takes exactly `wanted` bytes of connection credit, or none when there is less.
    fn take_exact_send_credit(&self, wanted: u64) -> bool {
        self.send_credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| (credit >= wanted).then(|| credit - wanted)).is_ok()
    }

    /// Refuses a stream the peer opened and nobody accepted.
    fn refuse(&self, stream: Unaccepted) {
        self.close_receiving(&stream.shared);
        self.send_frame(FrameKind::Reset, stream.shared.id, code_payload(STREAM_REFUSED));
    }

    /// Ends the connection: every stream fails, the writer sends `GoAway` and stops.
    fn shut(&self, reason: String) {
        let first = self.closed.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if !first {
            return;
        }
        let (streams, unaccepted) = {
            let mut table = lock(&self.table);
            let streams: Vec<Arc<StreamShared>> = table.streams.drain().map(|(_, stream)| stream).collect();
            (streams, std::mem::take(&mut table.unaccepted))
        };
        // nobody holds a handle on these: they just go
        drop(unaccepted);
        for stream in streams {
            let _ = stream.inbound.push(Inbound::Reset(u32::MAX));
            stream.credit_changed.notify_waiters();
        }
        self.send_credit_changed.notify_waiters();
        self.accept_ready.notify_waiters();
    }
}

impl Connection {
    /// Wraps an established TLS stream and starts its reader and writer tasks,
    /// with [`MuxLimits::default`].
    pub fn start<S>(io: S, is_client: bool, remote: SocketAddr, peer_certificates: Vec<Vec<u8>>) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start_with_limits(io, is_client, remote, peer_certificates, MuxLimits::default())
    }

    /// Wraps an established TLS stream and starts its reader and writer tasks,
    /// with the given limits. A `connection_window` above the initial one is
    /// granted to the peer with the first frame.
    pub fn start_with_limits<S>(io: S, is_client: bool, remote: SocketAddr, peer_certificates: Vec<Vec<u8>>, limits: MuxLimits) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let receive_window = ConnectionWindow::new(limits.connection_window);
        let initial_grant = receive_window.initial_grant();
        let queue = Arc::new(QueueGauge::default());
        let table = StreamTable {
            streams: HashMap::new(),
            unaccepted: VecDeque::new(),
            next_local_id: if is_client { 1 } else { 2 },
            accepting: limits.accept_streams,
            max_unaccepted: limits.max_unaccepted_streams,
        };
        let inner = Arc::new(Inner {
            is_client,
            limits,
            frames: frames_tx,
            queue: queue.clone(),
            table: Mutex::new(table),
            accept_ready: Notify::new(),
            send_credit: AtomicU64::new(INITIAL_CONNECTION_WINDOW as u64),
            send_credit_changed: Notify::new(),
            receive_window: Mutex::new(receive_window),
            unread_data_frames: std::sync::atomic::AtomicUsize::new(0),
            closed,
            remote,
            stable_id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            peer_certificates,
        });
        if let Some(grant) = initial_grant {
            inner.send_frame(FrameKind::Window, 0, code_payload(grant));
        }
        let (reader, writer) = tokio::io::split(io);
        let weak = Arc::downgrade(&inner);
        let mut closed_rx = inner.closed.subscribe();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = read_loop(reader, weak.clone()) => result,
                _ = async { let _ = closed_rx.wait_for(Option::is_some).await; } => Ok(()),
            };
            if let Some(inner) = weak.upgrade() {
                let reason = match result {
                    Ok(()) => "closed".to_string(),
                    Err(error) => error,
                };
                inner.shut(reason);
            }
        });
        tokio::spawn(write_loop(writer, frames_rx, queue, Arc::downgrade(&inner)));
        Connection { inner }
    }

    /// Opens a stream: one frame, no round trip.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let shared = {
            let mut table = lock(&self.inner.table);
            // checked under the table's lock: `shut` marks the connection closed
            // before it empties the table, so a new stream is either refused here
            // or failed with the others
            if let Some(reason) = self.inner.closed_reason() {
                return Err(StreamError::ConnectionClosed(reason));
            }
            let id = table.allocate_id();
            table.register(id)
        };
        self.inner.send_frame(FrameKind::Open, shared.id, Bytes::new());
        Ok(self.inner.wrap(shared))
    }

    /// The next stream the peer opened. After [`Connection::stop_accepting`] no
    /// stream comes any more, and this waits until the connection closes.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let mut closed = self.inner.closed.subscribe();
        loop {
            // registered before the queue is looked at, so no stream slips between
            let ready = self.inner.accept_ready.notified();
            if let Some(reason) = self.inner.closed_reason() {
                return Err(StreamError::ConnectionClosed(reason));
            }
            let next = lock(&self.inner.table).unaccepted.pop_front();
            if let Some(Unaccepted { shared }) = next {
                return Ok(self.inner.wrap(shared));
            }
            tokio::select! {
                () = ready => {}
                _ = closed.wait_for(Option::is_some) => {}
            }
        }
    }

    /// Changes the cap on streams the peer opened that wait for
    /// [`Connection::accept_bi`] (see [`MuxLimits::max_unaccepted_streams`]): the
    /// broker keeps it small while a peer has not said who it is, and raises it for
    /// a connector, which opens a stream per new flow, in bursts.
    pub fn set_max_unaccepted_streams(&self, maximum: usize) {
        lock(&self.inner.table).max_unaccepted = maximum;
    }

    /// From now on the peer may open no streams: an `Open` from it is a protocol
    /// violation that closes the connection ("the peer opened stream …, which it
    /// was not asked for"). Streams it opened that wait for [`Connection::accept_bi`]
    /// are refused (`Reset` with [`STREAM_REFUSED`]) and their buffered bytes
    /// released; accepted streams go on. The broker calls it on an agent's tunnel
    /// once it has accepted the control stream; a connector calls it (or starts
    /// with [`MuxLimits::accept_streams`] false), since the broker never opens
    /// streams towards it. There is no way back.
    pub fn stop_accepting(&self) {
        let refused: Vec<Unaccepted> = {
            let mut table = lock(&self.inner.table);
            table.accepting = false;
            let refused: Vec<Unaccepted> = table.unaccepted.drain(..).collect();
            for stream in &refused {
                table.streams.remove(&stream.shared.id);
            }
            refused
        };
        for stream in refused {
            self.inner.refuse(stream);
        }
    }

    /// Whether the peer may still open streams.
    pub fn accepts_streams(&self) -> bool {
        lock(&self.inner.table).accepting
    }

    /// Closes the connection with a code and a reason the peer sees.
    pub fn close(&self, code: u32, reason: &[u8]) {
        let mut payload = BytesMut::with_capacity(4 + reason.len().min(1000));
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason[..reason.len().min(1000)]);
        self.inner.send_frame(FrameKind::GoAway, 0, payload.freeze());
        self.inner.shut(format!("closed locally ({code}): {}", String::from_utf8_lossy(reason)));
    }

    /// Resolves when the connection ends, with the reason.
    pub async fn closed(&self) -> String {
        let mut closed = self.inner.closed.subscribe();
        let reason = closed.wait_for(Option::is_some).await.ok().and_then(|reason| reason.clone());
        reason.unwrap_or_default()
    }

    /// Why the connection ended, once it has: a protocol violation starts with
    /// "protocol violation: ", a peer that let the send queue overflow with "the
    /// peer does not read".
    pub fn close_reason(&self) -> Option<String> {
        self.inner.closed_reason()
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    pub fn stable_id(&self) -> u64 {
        self.inner.stable_id
    }

    pub fn peer_certificates(&self) -> &[Vec<u8>] {
        &self.inner.peer_certificates
    }

    /// The limits this connection started with.
    pub fn limits(&self) -> &MuxLimits {
        &self.inner.limits
    }

    /// Streams currently open, those the peer opened and nobody accepted yet
    /// included (for tests and metrics).
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.table).streams.len()
    }

    /// Bytes received and not yet read by the application, across all streams (a
    /// gauge for metrics; at most [`MuxLimits::connection_window`]).
    pub fn buffered_bytes(&self) -> u64 {
        lock(&self.inner.receive_window).buffered()
    }

    /// Bytes of frames queued for the peer and not yet written (a gauge for
    /// metrics; at most [`MuxLimits::max_queued_bytes`]; 0 once closed, when the
    /// queue is dropped).
    pub fn queued_bytes(&self) -> u64 {
        if self.inner.closed_reason().is_some() {
            return 0;
        }
        self.inner.queue.bytes.load(Ordering::Relaxed)
    }

    /// Control frames (all but data) queued for the peer and not yet written (a
    /// gauge for metrics; at most [`MuxLimits::max_queued_frames`]; 0 once closed).
    pub fn queued_frames(&self) -> u64 {
        if self.inner.closed_reason().is_some() {
            return 0;
        }
        self.inner.queue.control_frames.load(Ordering::Relaxed)
    }

    /// Lets a test start the id counter near the end of the id space.
    #[cfg(test)]
    fn set_next_stream_id(&self, id: u32) {
        lock(&self.inner.table).next_local_id = id;
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, inner: Weak<Inner>) -> Result<(), String> {
    // no buffer of our own: the TLS layer buffers already, and a payload is read
    // straight into the memory that carries it on (one copy out of TLS, no zeroing)
    loop {
        let mut header = [0u8; MUX_HEADER];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Err("the peer closed the connection".into()),
            Err(error) => return Err(error.to_string()),
        }
        let header = decode_header(header).map_err(|error| format!("protocol violation: {error}"))?;
        let mut payload = BytesMut::with_capacity(header.length);
        while payload.len() < header.length {
            let wanted = header.length - payload.len();
            let read = reader.read_buf(&mut (&mut payload).limit(wanted)).await.map_err(|error| error.to_string())?;
            if read == 0 {
                return Err("the peer closed the connection inside a frame".into());
            }
        }
        let payload = payload.freeze();
        let Some(inner) = inner.upgrade() else { return Ok(()) };
        dispatch(&inner, header.kind, header.stream, payload).map_err(|error| format!("protocol violation: {error}"))?;
    }
}

fn dispatch(inner: &Inner, kind: FrameKind, id: u32, payload: Bytes) -> Result<(), MuxError> {
    match (kind, id) {
        (FrameKind::GoAway, _) => {
            let code = payload.get(..4).map(|bytes| decode_u32(kind, bytes)).transpose()?.unwrap_or(0);
            let reason = String::from_utf8_lossy(payload.get(4..).unwrap_or_default()).into_owned();
            inner.shut(format!("closed by peer ({code}): {reason}"));
            Ok(())
        }
        (FrameKind::Window, 0) => {
            let increment = decode_u32(kind, &payload)?;
            let mut refused = None;
            let _ = inner.send_credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| match add_credit(credit, increment, 0) {
                Ok(credit) => Some(credit),
                Err(error) => {
                    refused = Some(error);
                    None
                }
            });
            if let Some(error) = refused {
                return Err(error);
            }
            inner.send_credit_changed.notify_waiters();
            Ok(())
        }
        (FrameKind::Open, _) => on_open(inner, id),
        (FrameKind::Data, _) => on_data(inner, id, payload),
        _ => on_stream_frame(inner, kind, id, payload),
    }
}

fn on_open(inner: &Inner, id: u32) -> Result<(), MuxError> {
    if !peer_may_open(id, inner.is_client) {
        return Err(MuxError::WrongStreamId(id));
    }
    {
        let mut table = lock(&inner.table);
        if !table.accepting {
            return Err(MuxError::UnsolicitedStream(id));
        }
        if table.streams.contains_key(&id) {
            return Err(MuxError::WrongStreamId(id));
        }
        if table.streams.len() < inner.limits.max_streams && table.unaccepted.len() < table.max_unaccepted {
            let shared = table.register(id);
            table.unaccepted.push_back(Unaccepted { shared });
            drop(table);
            inner.accept_ready.notify_waiters();
            return Ok(());
        }
    }
    // too many at once: this one is refused, the others go on
    inner.send_frame(FrameKind::Reset, id, code_payload(STREAM_REFUSED));
    Ok(())
}

fn on_data(inner: &Inner, id: u32, payload: Bytes) -> Result<(), MuxError> {
    let length = payload.len();
    // every data frame counts against the connection's credit, whatever its stream
    lock(&inner.receive_window).on_data(length)?;
    let stream = lock(&inner.table).streams.get(&id).cloned();
    let delivered = match stream {
        // a stream already forgotten (both halves done) or refused: dropped below
        None => false,
        Some(stream) => {
            let mut receive = lock(&stream.receive);
            if receive.peer_ended {
                return Err(MuxError::AfterEnd { kind: FrameKind::Data, stream: id });
            }
            receive.window.on_data(id, length)?;
            if receive.closed {
                false
            } else {
                // counted before it is queued: the reader's decrement may come at once
                let unread = inner.unread_data_frames.fetch_add(1, Ordering::AcqRel) + 1;
                if unread > inner.limits.max_unread_data_frames {
                    inner.unread_data_frames.fetch_sub(1, Ordering::AcqRel);
                    return Err(MuxError::TooManyFrames(unread));
                }
                let delivered = stream.inbound.push(Inbound::Data(payload));
                if !delivered {
                    inner.unread_data_frames.fetch_sub(1, Ordering::AcqRel);
                }
                delivered
            }
        }
    };
    if !delivered {
        // nobody will read it: the peer gets the credit back
        inner.release(length);
    }
    Ok(())
}

fn on_stream_frame(inner: &Inner, kind: FrameKind, id: u32, payload: Bytes) -> Result<(), MuxError> {
    // frames for a stream we already forgot (both halves done) are dropped
    let Some(stream) = lock(&inner.table).streams.get(&id).cloned() else { return Ok(()) };
    match kind {
        FrameKind::Fin | FrameKind::Reset => {
            let end = if kind == FrameKind::Fin { Inbound::Fin } else { Inbound::Reset(decode_u32(kind, &payload)?) };
            let mut receive = lock(&stream.receive);
            // one end per stream: repeated ones would each take a queue entry, without bound
            if receive.peer_ended {
                return Err(MuxError::AfterEnd { kind, stream: id });
            }
            receive.peer_ended = true;
            if !receive.closed {
                let _ = stream.inbound.push(end);
            }
        }
        FrameKind::Stop => {
            lock(&stream.send).stopped = Some(decode_u32(kind, &payload)?);
            stream.credit_changed.notify_waiters();
        }
        FrameKind::Window => {
            let increment = decode_u32(kind, &payload)?;
            {
                let mut send = lock(&stream.send);
                send.credit = add_credit(send.credit, increment, id)?;
            }
            stream.credit_changed.notify_waiters();
        }
        FrameKind::Open | FrameKind::Data | FrameKind::GoAway => {}
    }
    Ok(())
}

/// Data frames at least this large are written from their own memory (header and
/// payload as one vectored write) instead of being copied into the batch buffer.
const DIRECT_WRITE: usize = 8 * 1024;

async fn write_loop<W: AsyncWrite + Unpin>(writer: W, frames: mpsc::UnboundedReceiver<Frame>, queue: Arc<QueueGauge>, inner: Weak<Inner>) {
    tokio::select! {
        () = write_frames(writer, frames, &queue, inner) => {}
        // the peer does not read: the writer and every queued frame go now, even in
        // the middle of a write (the connection is over, and the peer would never
        // let the write finish)
        () = queue.abandon.notified() => {}
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut writer: W, mut frames: mpsc::UnboundedReceiver<Frame>, queue: &QueueGauge, inner: Weak<Inner>) {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let mut closed = match inner.upgrade() {
        Some(inner) => inner.closed.subscribe(),
        None => return,
    };
    loop {
        let frame = tokio::select! {
            biased;
            frame = frames.recv() => frame,
            _ = async { let _ = closed.wait_for(Option::is_some).await; } => {
                // closing: send what is queued (a GoAway among it), then stop
                let flush = async {
                    while let Ok(frame) = frames.try_recv() {
                        if write_batch(&mut writer, &mut buffer, frame, &mut frames, queue).await.is_err() {
                            return;
                        }
                    }
                    let _ = writer.shutdown().await;
                };
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flush).await;
                return;
            }
        };
        let Some(frame) = frame else { break };
        match write_batch(&mut writer, &mut buffer, frame, &mut frames, queue).await {
            Ok(false) => {}
            Ok(true) => {
                // the GoAway is out: the connection ends here
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, writer.shutdown()).await;
                return;
            }
            Err(_) => {
                if let Some(inner) = inner.upgrade() {
                    inner.shut("the connection broke while writing".into());
                }
                return;
            }
        }
    }
    // every handle on the connection is gone
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Writes `first` and the frames ready behind it: small frames share one buffer
/// (and one TLS record); a large data frame is written on its own after them.
/// Returns whether a `GoAway` was among them.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buffer: &mut BytesMut,
    first: Frame,
    frames: &mut mpsc::UnboundedReceiver<Frame>,
    queue: &QueueGauge,
) -> std::io::Result<bool> {
    let mut frame = first;
    let mut last = false;
    // what sits in `buffer`, taken off the gauge once it is written
    let (mut buffered_control, mut buffered_bytes) = (0u64, 0u64);
    loop {
        last |= frame.kind == FrameKind::GoAway;
        let control = u64::from(frame.kind != FrameKind::Data);
        let bytes = (MUX_HEADER + frame.payload.len()) as u64;
        if frame.payload.len() >= DIRECT_WRITE {
            let mut header = &encode_header(frame.kind, frame.stream, frame.payload.len())[..];
            writer.write_all(buffer).await?;
            buffer.clear();
            writer.write_all_buf(&mut Buf::chain(&mut header, &mut frame.payload)).await?;
            // taken off as it goes: a batch of large frames can last as long as writers keep up
            queue.written(buffered_control + control, buffered_bytes + bytes);
            (buffered_control, buffered_bytes) = (0, 0);
        } else {
            encode(buffer, &frame);
            buffered_control += control;
            buffered_bytes += bytes;
        }
        if last || buffer.len() >= 256 * 1024 {
            break;
        }
        match frames.try_recv() {
            Ok(more) => frame = more,
            Err(_) => break,
        }
    }
    writer.write_all(buffer).await?;
    writer.flush().await?;
    buffer.clear();
    queue.written(buffered_control, buffered_bytes);
    if buffer.capacity() > 1024 * 1024 {
        *buffer = BytesMut::with_capacity(64 * 1024);
    }
    Ok(last)
}

fn encode(buffer: &mut BytesMut, frame: &Frame) {
    buffer.extend_from_slice(&encode_header(frame.kind, frame.stream, frame.payload.len()));
    buffer.extend_from_slice(&frame.payload);
}

/// The sending half of a stream.
pub struct SendStream {
    connection: Arc<Inner>,
    shared: Arc<StreamShared>,
    done: bool,
}

impl SendStream {
    /// Sends bytes, waiting for credit when the peer's window for this stream, or
    /// for the whole connection, is full.
    pub async fn write_chunk(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        while !data.is_empty() {
            let granted = match self.take_credit(data.len())? {
                Some(granted) => granted,
                None => loop {
                    // registered before the credit is looked at again, so no grant slips
                    // between; a stop or the connection's end wakes the stream's waiters too
                    let stream_credit = self.shared.credit_changed.notified();
                    let connection_credit = self.connection.send_credit_changed.notified();
                    if let Some(granted) = self.take_credit(data.len())? {
                        break granted;
                    }
                    tokio::select! {
                        () = stream_credit => {}
                        () = connection_credit => {}
                    }
                },
            };
            let piece = data.split_to(granted);
            self.connection.send_frame(FrameKind::Data, self.shared.id, piece);
        }
        Ok(())
    }

    /// Takes credit for up to `wanted` bytes (and one frame) from both the stream's
    /// window and the connection's; `None` when either is empty.
    fn take_credit(&self, wanted: usize) -> Result<Option<usize>, StreamError> {
        let mut send = lock(&self.shared.send);
        if let Some(code) = send.stopped {
            return Err(StreamError::Stopped(code));
        }
        if let Some(reason) = self.connection.closed_reason() {
            return Err(StreamError::ConnectionClosed(reason));
        }
        if send.credit == 0 {
            return Ok(None);
        }
        let wanted = send.credit.min(wanted as u64).min(MAX_DATA as u64);
        let granted = self.connection.take_send_credit(wanted);
        send.credit -= granted;
        Ok(Some(granted as usize).filter(|granted| *granted > 0))
    }

    /// Sends `data` whole at once if the stream's and the connection's credit
    /// hold it all, and otherwise sends nothing and answers `Ok(false)`: for
    /// datagrams, which are dropped rather than delayed when the way is full (a
    /// whole datagram or none, so the receiver never sees half of one).
    pub fn try_write_whole(&mut self, mut data: Bytes) -> Result<bool, StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        let wanted = data.len() as u64;
        {
            let mut send = lock(&self.shared.send);
            if let Some(code) = send.stopped {
                return Err(StreamError::Stopped(code));
            }
            if let Some(reason) = self.connection.closed_reason() {
                return Err(StreamError::ConnectionClosed(reason));
            }
            if send.credit < wanted || !self.connection.take_exact_send_credit(wanted) {
                return Ok(false);
            }
            send.credit -= wanted;
        }
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA));
            self.connection.send_frame(FrameKind::Data, self.shared.id, piece);
        }
        Ok(true)
    }

    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.write_chunk(Bytes::copy_from_slice(data)).await
    }

    /// Finishes this direction (the peer reads end of stream after the data).
    pub fn finish(&mut self) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        self.done = true;
        self.connection.send_frame(FrameKind::Fin, self.shared.id, Bytes::new());
        self.mark_done();
        Ok(())
    }

    /// Abandons this direction (the peer's reads fail).
    pub fn reset(&mut self, code: u32) {
        if self.done {
            return;
        }
        self.done = true;
        self.connection.send_frame(FrameKind::Reset, self.shared.id, code_payload(code));
        self.mark_done();
    }

    fn mark_done(&self) {
        self.shared.send_done.store(true, Ordering::Release);
        self.connection.forget_if_done(&self.shared);
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        // a half dropped without a finish is abandoned, as a crashed peer's would be
        self.reset(0);
    }
}

/// The receiving half of a stream.
pub struct RecvStream {
    connection: Arc<Inner>,
    shared: Arc<StreamShared>,
    /// bytes received but not yet handed out (what a framed read left over)
    pending: Bytes,
    done: bool,
}

impl RecvStream {
    /// The next piece of data; `Ok(None)` at the end of the stream.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, StreamError> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        if self.done {
            return Ok(None);
        }
        match self.shared.inbound.pop().await {
            Inbound::Data(data) => {
                self.connection.unread_data_frames.fetch_sub(1, Ordering::AcqRel);
                let grant = lock(&self.shared.receive).window.on_consumed(data.len());
                if let Some(grant) = grant {
                    self.connection.send_frame(FrameKind::Window, self.shared.id, code_payload(grant));
                }
                self.connection.release(data.len());
                Ok(Some(data))
            }
            Inbound::Fin => {
                self.finish_receiving();
                Ok(None)
            }
            Inbound::Reset(u32::MAX) => {
                self.finish_receiving();
                Err(StreamError::ConnectionClosed(self.connection.closed_reason().unwrap_or_default()))
            }
            Inbound::Reset(code) => {
                self.finish_receiving();
                Err(StreamError::Reset(code))
            }
        }
    }

    /// Fills `buffer` completely; `Ok(false)` when the stream ended before any byte,
    /// an error when it ended part-way. Bytes beyond `buffer` stay for the next read.
    pub async fn read_exact(&mut self, buffer: &mut [u8]) -> Result<bool, StreamError> {
        let mut filled = 0;
        while filled < buffer.len() {
            let Some(mut data) = self.read_chunk().await? else {
                return if filled == 0 { Ok(false) } else { Err(StreamError::Finished) };
            };
            let take = data.len().min(buffer.len() - filled);
            buffer[filled..filled + take].copy_from_slice(&data.split_to(take));
            filled += take;
            if !data.is_empty() {
                self.pending = data;
            }
        }
        Ok(true)
    }

    /// Reads until the end of the stream, refusing more than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, StreamError> {
        let mut all = Vec::new();
        while let Some(data) = self.read_chunk().await? {
            if all.len() + data.len() > limit {
                self.stop(0);
                return Err(StreamError::Finished);
            }
            all.extend_from_slice(&data);
        }
        Ok(all)
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        if self.done {
            return;
        }
        self.connection.send_frame(FrameKind::Stop, self.shared.id, code_payload(code));
        self.finish_receiving();
    }

    fn finish_receiving(&mut self) {
        if !self.done {
            self.done = true;
            // what the peer sent and nobody will read goes back to the connection's window
            self.connection.close_receiving(&self.shared);
            self.shared.recv_done.store(true, Ordering::Release);
            self.connection.forget_if_done(&self.shared);
        }
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        self.stop(0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pair() -> (Connection, Connection) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let address: SocketAddr = "127.0.0.1:1".parse().expect("address");
        (Connection::start(client_io, true, address, Vec::new()), Connection::start(server_io, false, address, Vec::new()))
    }

    #[tokio::test]
    async fn streams_carry_data_both_ways_and_half_close_each_direction() {
        let (client, server) = pair();
        let (mut client_send, mut client_recv) = client.open_bi().await.expect("open");
        client_send.write_all(b"hello").await.expect("write");
        let (mut server_send, mut server_recv) = server.accept_bi().await.expect("accept");
        assert_eq!(server_recv.read_chunk().await.expect("read").as_deref(), Some(&b"hello"[..]));
        client_send.finish().expect("finish");
        assert_eq!(server_recv.read_chunk().await.expect("read"), None, "the FIN arrives after the data");
        // the other direction still flows after the first one finished
        server_send.write_all(b"still here").await.expect("write");
        server_send.finish().expect("finish");
        assert_eq!(client_recv.read_to_end(100).await.expect("read"), b"still here");
        assert_eq!(client.open_streams(), 0, "a stream finished both ways is forgotten");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(server.open_streams(), 0);
        // ids: the client opens odd ones, the server even ones
        let (_, _) = server.open_bi().await.expect("open");
        let (_, _) = client.accept_bi().await.expect("accept");
    }

    #[tokio::test]
    async fn reset_and_stop_reach_the_other_end() {
        let (client, server) = pair();
        let (mut send, _recv) = client.open_bi().await.expect("open");
        send.write_all(b"partial").await.expect("write");
        send.reset(7);
        let (_server_send, mut server_recv) = server.accept_bi().await.expect("accept");
        assert_eq!(server_recv.read_chunk().await.expect("data first").as_deref(), Some(&b"partial"[..]));
        assert_eq!(server_recv.read_chunk().await, Err(StreamError::Reset(7)));

        let (mut send, _recv) = client.open_bi().await.expect("open");
        send.write_all(b"x").await.expect("write");
        let (_server_send, mut server_recv) = server.accept_bi().await.expect("accept");
        server_recv.stop(9);
        let mut outcome = Ok(());
        for _ in 0..100 {
            outcome = send.write_all(b"more").await;
            if outcome.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(outcome, Err(StreamError::Stopped(9)));
    }

    #[tokio::test]
    async fn a_writer_waits_for_credit_while_the_reader_does_not_read() {
        let (client, server) = pair();
        let (mut send, _recv) = client.open_bi().await.expect("open");
        let (_server_send, mut server_recv) = server.accept_bi().await.expect("accept");
        let chunk = Bytes::from(vec![7u8; 256 * 1024]);
        let mut sent = 0usize;
        // nobody reads: the writer stalls at the window
        loop {
            match tokio::time::timeout(Duration::from_millis(200), send.write_chunk(chunk.clone())).await {
                Ok(result) => {
                    result.expect("write");
                    sent += chunk.len();
                }
                Err(_) => break,
            }
            assert!(sent <= INITIAL_WINDOW as usize, "the writer went past the window: {sent}");
        }
        assert_eq!(sent, INITIAL_WINDOW as usize);
        // reading grants credit and the writer moves on
        let writer = tokio::spawn(async move {
            send.write_chunk(Bytes::from(vec![1u8; 1024 * 1024])).await.expect("write after credit");
            send.finish().expect("finish");
        });
        let mut total = 0;
        while let Some(data) = server_recv.read_chunk().await.expect("read") {
            total += data.len();
        }
        writer.await.expect("writer");
        assert_eq!(total, INITIAL_WINDOW as usize + 1024 * 1024);
    }

    #[tokio::test]
    async fn a_whole_write_sends_all_or_nothing_and_never_waits() {
        let (client, server) = pair();
        let (mut send, _recv) = client.open_bi().await.expect("open");
        let (_server_send, mut server_recv) = server.accept_bi().await.expect("accept");
        // a datagram larger than one data frame goes whole, in two frames
        let big = Bytes::from(vec![3u8; MAX_DATA + 100]);
        assert_eq!(send.try_write_whole(big.clone()), Ok(true));
        let mut sent = big.len();
        // nobody reads: writes succeed until the window cannot hold a whole one, then fail at once
        while send.try_write_whole(big.clone()).expect("no error") {
            sent += big.len();
            assert!(sent <= INITIAL_WINDOW as usize, "went past the window: {sent}");
        }
        assert!(INITIAL_WINDOW as usize - sent < big.len(), "stopped only when a whole datagram no longer fits ({sent} sent)");
        // what was sent arrives whole
        let mut received = 0;
        while received < sent {
            received += server_recv.read_chunk().await.expect("read").expect("data").len();
        }
        assert_eq!(received, sent);
        // reading gave credit back: a whole write goes again
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(send.try_write_whole(Bytes::from_static(b"again")), Ok(true));
        send.finish().expect("finish");
        assert_eq!(send.try_write_whole(Bytes::from_static(b"late")), Err(StreamError::Finished));
    }

    #[tokio::test]
    async fn closing_fails_every_stream_and_the_peer_learns_why() {
        let (client, server) = pair();
        let (_send, mut recv) = client.open_bi().await.expect("open");
        let _accepted = server.accept_bi().await.expect("accept");
        server.close(1, b"session deleted");
        assert_eq!(client.closed().await, "closed by peer (1): session deleted");
        assert!(matches!(recv.read_chunk().await, Err(StreamError::ConnectionClosed(_))));
        assert!(matches!(client.open_bi().await, Err(StreamError::ConnectionClosed(_))));
        assert!(matches!(client.accept_bi().await, Err(StreamError::ConnectionClosed(_))));
    }

    #[tokio::test]
    async fn a_protocol_violation_closes_the_connection() {
        let (mut raw, server_io) = tokio::io::duplex(1024);
        let server = Connection::start(server_io, false, "127.0.0.1:1".parse().expect("address"), Vec::new());
        // an even stream id is the server's to open, not the client's
        raw.write_all(&encode_header(FrameKind::Open, 2, 0)).await.expect("write");
        assert!(server.closed().await.contains("protocol violation"));

        let (mut raw, server_io) = tokio::io::duplex(1024);
        let server = Connection::start(server_io, false, "127.0.0.1:1".parse().expect("address"), Vec::new());
        raw.write_all(&encode_header(FrameKind::Open, 1, 0)).await.expect("write");
        let _stream = server.accept_bi().await.expect("accept");
        // a data frame larger than the limit
        raw.write_all(&[1, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).await.expect("write");
        assert!(server.closed().await.contains("too large"));
    }

    #[tokio::test]
    async fn streams_past_the_limit_are_refused_one_by_one() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let address: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let client = Connection::start(client_io, true, address, Vec::new());
        let server = Connection::start_with_limits(server_io, false, address, Vec::new(), MuxLimits { max_streams: 2, ..MuxLimits::default() });
        let (_first_send, _first_recv) = client.open_bi().await.expect("open");
        let (_second_send, _second_recv) = client.open_bi().await.expect("open");
        let (_third_send, mut third_recv) = client.open_bi().await.expect("open");
        let _first = server.accept_bi().await.expect("accept");
        let _second = server.accept_bi().await.expect("accept");
        let refusal = tokio::time::timeout(Duration::from_secs(5), third_recv.read_chunk()).await.expect("the third is refused, not held");
        assert_eq!(refusal, Err(StreamError::Reset(STREAM_REFUSED)), "the third is refused");
        assert!(server.close_reason().is_none() && client.close_reason().is_none(), "the connection goes on");
        drop(_first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (mut fourth_send, _fourth_recv) = client.open_bi().await.expect("open");
        fourth_send.write_all(b"room again").await.expect("write");
        let (_, mut fourth) = server.accept_bi().await.expect("a stream fits once one is gone");
        assert_eq!(fourth.read_chunk().await.expect("read").as_deref(), Some(&b"room again"[..]));
    }

    #[tokio::test]
    async fn going_past_the_credit_window_is_a_violation() {
        let (mut raw, server_io) = tokio::io::duplex(4 * 1024 * 1024);
        let server = Connection::start(server_io, false, "127.0.0.1:1".parse().expect("address"), Vec::new());
        raw.write_all(&encode_header(FrameKind::Open, 1, 0)).await.expect("write");
        let _stream = server.accept_bi().await.expect("accept");
        let payload = vec![0u8; MAX_DATA];
        for _ in 0..=(INITIAL_WINDOW as usize / MAX_DATA) {
            raw.write_all(&encode_header(FrameKind::Data, 1, MAX_DATA)).await.expect("write");
            raw.write_all(&payload).await.expect("write");
        }
        assert!(server.closed().await.contains("beyond its credit"));
    }

    fn address() -> SocketAddr {
        "127.0.0.1:1".parse().expect("address")
    }

    /// Our side of a connection (the broker's: even ids) facing a raw client that writes frames by hand.
    fn facing_raw_client(limits: MuxLimits, buffer: usize) -> (tokio::io::DuplexStream, Connection) {
        let (raw, ours) = tokio::io::duplex(buffer);
        (raw, Connection::start_with_limits(ours, false, address(), Vec::new(), limits))
    }

    async fn send_raw(raw: &mut tokio::io::DuplexStream, kind: FrameKind, stream: u32, payload: &[u8]) {
        raw.write_all(&encode_header(kind, stream, payload.len())).await.expect("write");
        raw.write_all(payload).await.expect("write");
    }

    async fn read_raw(raw: &mut tokio::io::DuplexStream) -> (FrameKind, u32, Vec<u8>) {
        let read = async {
            let mut header = [0u8; MUX_HEADER];
            raw.read_exact(&mut header).await.expect("read");
            let header = decode_header(header).expect("a valid header");
            let mut payload = vec![0u8; header.length];
            raw.read_exact(&mut payload).await.expect("read");
            (header.kind, header.stream, payload)
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.expect("a frame should have come")
    }

    /// Why the connection closed; fails the test when it stays open.
    async fn closes(connection: &Connection) -> String {
        tokio::time::timeout(Duration::from_secs(10), connection.closed()).await.expect("the connection should have closed")
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never came true: {what}");
    }

    #[tokio::test]
    async fn a_peer_may_not_open_streams_once_the_connection_stops_accepting() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        let _control = server.accept_bi().await.expect("the control stream is accepted");
        server.stop_accepting();
        assert!(!server.accepts_streams());
        send_raw(&mut raw, FrameKind::Open, 3, &[]).await;
        let reason = closes(&server).await;
        assert!(reason.starts_with("protocol violation") && reason.contains("not asked for"), "{reason}");

        // a connector never accepts any, from the start
        let (mut raw, connector) = facing_raw_client(MuxLimits { accept_streams: false, ..MuxLimits::default() }, 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        assert!(closes(&connector).await.contains("not asked for"));
    }

    #[tokio::test]
    async fn streams_waiting_for_accept_are_refused_when_the_connection_stops_accepting() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        let (_control_send, mut control_recv) = server.accept_bi().await.expect("accept");
        send_raw(&mut raw, FrameKind::Open, 3, &[]).await;
        send_raw(&mut raw, FrameKind::Data, 3, &[7u8; 1000]).await;
        eventually("the unaccepted stream's bytes are buffered", || server.buffered_bytes() == 1000).await;
        server.stop_accepting();
        assert_eq!(read_raw(&mut raw).await, (FrameKind::Reset, 3, STREAM_REFUSED.to_be_bytes().to_vec()), "the waiting stream is refused");
        assert_eq!(server.buffered_bytes(), 0, "its bytes went back to the connection's window");
        assert_eq!(server.open_streams(), 1, "only the control stream is left");
        // the accepted stream goes on
        send_raw(&mut raw, FrameKind::Data, 1, b"ping").await;
        assert_eq!(control_recv.read_chunk().await.expect("read").as_deref(), Some(&b"ping"[..]));
        assert!(server.close_reason().is_none());
    }

    #[tokio::test]
    async fn streams_nobody_accepts_are_bounded_and_refused_past_the_bound() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client = Connection::start(client_io, true, address(), Vec::new());
        let server = Connection::start_with_limits(server_io, false, address(), Vec::new(), MuxLimits { max_unaccepted_streams: 2, ..MuxLimits::default() });
        let (mut first_send, _first_recv) = client.open_bi().await.expect("open");
        let (_second_send, _second_recv) = client.open_bi().await.expect("open");
        let (_third_send, mut third_recv) = client.open_bi().await.expect("open");
        first_send.write_all(b"first").await.expect("write");
        // nobody accepts: the third is refused rather than queued
        let refusal = tokio::time::timeout(Duration::from_secs(5), third_recv.read_chunk()).await.expect("the third is refused, not queued");
        assert_eq!(refusal, Err(StreamError::Reset(STREAM_REFUSED)));
        assert_eq!(server.open_streams(), 2, "streams waiting for accept count as open");
        assert!(server.close_reason().is_none() && client.close_reason().is_none(), "the connection goes on");
        // accepting one makes room for one more
        let (_, mut first) = server.accept_bi().await.expect("accept");
        assert_eq!(first.read_chunk().await.expect("read").as_deref(), Some(&b"first"[..]), "what it carried waited with it");
        let (mut fourth_send, _fourth_recv) = client.open_bi().await.expect("open");
        fourth_send.write_all(b"room again").await.expect("write");
        let _second = server.accept_bi().await.expect("accept");
        let (_, mut fourth) = server.accept_bi().await.expect("the fourth fits");
        assert_eq!(fourth.read_chunk().await.expect("read").as_deref(), Some(&b"room again"[..]));
    }

    #[tokio::test]
    async fn an_empty_data_frame_is_a_violation() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        send_raw(&mut raw, FrameKind::Data, 1, &[]).await;
        let reason = closes(&server).await;
        assert!(reason.starts_with("protocol violation") && reason.contains("empty data frame"), "{reason}");
    }

    #[tokio::test]
    async fn tiny_frames_nobody_reads_are_bounded_by_count() {
        // one-byte frames on streams nobody reads: within the byte budget, but each costs
        // bookkeeping; past the count the connection ends
        let limits = MuxLimits { max_unread_data_frames: 1000, ..MuxLimits::default() };
        let (mut raw, server) = facing_raw_client(limits, 4 * 1024 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        let mut frames = Vec::new();
        for _ in 0..1001 {
            frames.extend_from_slice(&encode_header(FrameKind::Data, 1, 1));
            frames.push(7);
        }
        raw.write_all(&frames).await.expect("write");
        let reason = closes(&server).await;
        assert!(reason.contains("data frames waiting to be read"), "{reason}");

        // frames that are read as they come never add up
        let limits = MuxLimits { max_unread_data_frames: 10, ..MuxLimits::default() };
        let (mut raw, server) = facing_raw_client(limits, 4 * 1024 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        let (_send, mut recv) = server.accept_bi().await.expect("accept");
        for round in 0..100u8 {
            send_raw(&mut raw, FrameKind::Data, 1, &[round]).await;
            assert_eq!(recv.read_chunk().await.expect("read").as_deref(), Some(&[round][..]));
        }
        assert!(server.close_reason().is_none(), "read frames are not counted");
        // and frames thrown away with a stopped stream leave the count
        for round in 0..9u8 {
            send_raw(&mut raw, FrameKind::Data, 1, &[round]).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(recv);
        send_raw(&mut raw, FrameKind::Open, 3, &[]).await;
        let (_send, mut recv) = server.accept_bi().await.expect("accept");
        for round in 0..9u8 {
            send_raw(&mut raw, FrameKind::Data, 3, &[round]).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(server.close_reason().is_none(), "{:?}", server.close_reason());
        assert_eq!(recv.read_chunk().await.expect("read").as_deref(), Some(&[0u8][..]));
    }

    #[tokio::test]
    async fn frames_after_the_end_of_a_stream_are_a_violation() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        send_raw(&mut raw, FrameKind::Fin, 1, &[]).await;
        send_raw(&mut raw, FrameKind::Fin, 1, &[]).await;
        assert!(closes(&server).await.contains("after it ended the stream"));

        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        send_raw(&mut raw, FrameKind::Open, 1, &[]).await;
        send_raw(&mut raw, FrameKind::Reset, 1, &5u32.to_be_bytes()).await;
        send_raw(&mut raw, FrameKind::Data, 1, b"late").await;
        assert!(closes(&server).await.contains("after it ended the stream"));
    }

    #[tokio::test]
    async fn going_past_the_connection_window_is_a_violation() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 4 * 1024 * 1024);
        let payload = vec![0u8; MAX_DATA];
        // every stream stays within its own credit; together they go past the connection's
        let streams = INITIAL_CONNECTION_WINDOW / INITIAL_WINDOW + 1;
        'streams: for index in 0..streams {
            let id = 2 * index + 1;
            send_raw(&mut raw, FrameKind::Open, id, &[]).await;
            for _ in 0..(INITIAL_WINDOW as usize / MAX_DATA) {
                // the connection may end (and the pipe break) at the last frame
                let header = encode_header(FrameKind::Data, id, MAX_DATA);
                if raw.write_all(&header).await.is_err() || raw.write_all(&payload).await.is_err() {
                    break 'streams;
                }
            }
        }
        let reason = closes(&server).await;
        assert!(reason.contains("beyond the connection's credit"), "{reason}");
    }

    #[tokio::test]
    async fn writers_wait_for_the_connections_credit_across_streams() {
        let (client, server) = pair();
        let streams = INITIAL_CONNECTION_WINDOW / INITIAL_WINDOW + 4;
        let mut writers = Vec::new();
        for _ in 0..streams {
            let (mut send, recv) = client.open_bi().await.expect("open");
            writers.push(tokio::spawn(async move {
                // each stream's own window would take all of it
                send.write_chunk(Bytes::from(vec![3u8; INITIAL_WINDOW as usize])).await.expect("write");
                send.finish().expect("finish");
                recv
            }));
        }
        // nobody reads: the writers together stop at the connection's window
        eventually("the connection's window is full", || server.buffered_bytes() == INITIAL_CONNECTION_WINDOW as u64).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.buffered_bytes(), INITIAL_CONNECTION_WINDOW as u64, "no writer went past the connection's window");
        assert!(server.close_reason().is_none(), "{:?}", server.close_reason());
        // reading gives the credit back and every writer gets through
        let mut total = 0;
        for _ in 0..streams {
            let (_send, mut recv) = server.accept_bi().await.expect("accept");
            while let Some(data) = recv.read_chunk().await.expect("read") {
                total += data.len();
            }
        }
        for writer in writers {
            writer.await.expect("writer");
        }
        assert_eq!(total, (streams * INITIAL_WINDOW) as usize);
        assert_eq!(server.buffered_bytes(), 0);
    }

    #[tokio::test]
    async fn a_larger_connection_budget_is_granted_at_the_start() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client = Connection::start(client_io, true, address(), Vec::new());
        let budget = 2 * INITIAL_CONNECTION_WINDOW as u64;
        let server = Connection::start_with_limits(server_io, false, address(), Vec::new(), MuxLimits { connection_window: budget, ..MuxLimits::default() });
        let mut held = Vec::new();
        for _ in 0..(budget / INITIAL_WINDOW as u64) {
            let (mut send, recv) = client.open_bi().await.expect("open");
            let written = tokio::time::timeout(Duration::from_secs(5), send.write_chunk(Bytes::from(vec![1u8; INITIAL_WINDOW as usize]))).await;
            written.expect("the budget has room").expect("write");
            held.push((send, recv));
        }
        eventually("the whole budget is buffered", || server.buffered_bytes() == budget).await;
        assert!(server.close_reason().is_none());
    }

    #[tokio::test]
    async fn bytes_thrown_away_with_their_stream_go_back_to_the_connection_window() {
        let (client, server) = pair();
        // far more than the connection's window goes through streams whose data nobody reads
        for round in 0..(3 * INITIAL_CONNECTION_WINDOW / INITIAL_WINDOW) {
            let (mut send, _recv) = client.open_bi().await.expect("open");
            let written = tokio::time::timeout(Duration::from_secs(5), send.write_chunk(Bytes::from(vec![9u8; INITIAL_WINDOW as usize]))).await;
            written.unwrap_or_else(|_| panic!("round {round}: the connection's window starved")).expect("write");
            let (mut server_send, mut server_recv) = server.accept_bi().await.expect("accept");
            match round % 4 {
                // dropped while its data is buffered
                0 => {
                    eventually("the data arrived", || server.buffered_bytes() >= INITIAL_WINDOW as u64).await;
                    drop(server_recv);
                }
                // stopped while its data is buffered
                1 => {
                    eventually("the data arrived", || server.buffered_bytes() >= INITIAL_WINDOW as u64).await;
                    server_recv.stop(1);
                }
                // read in part, then reset both ways (a relay's abort)
                2 => {
                    let _ = server_recv.read_chunk().await.expect("read");
                    server_send.reset(1);
                    server_recv.stop(1);
                }
                // stopped and forgotten at once: the data arrives for a stream that is gone
                _ => {
                    server_send.reset(1);
                    server_recv.stop(1);
                }
            }
        }
        eventually("every thrown-away byte went back", || server.buffered_bytes() == 0).await;
        assert!(server.close_reason().is_none() && client.close_reason().is_none());
    }

    #[tokio::test]
    async fn data_for_a_stream_that_is_gone_goes_back_to_the_connection_window() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        let payload = vec![4u8; MAX_DATA];
        let mut kept = Vec::new();
        // more than the connection's window, all of it sent after its stream was done with
        for index in 0..(INITIAL_CONNECTION_WINDOW / INITIAL_WINDOW + 4) {
            let id = 2 * index + 1;
            send_raw(&mut raw, FrameKind::Open, id, &[]).await;
            let (mut send, mut recv) = server.accept_bi().await.expect("accept");
            recv.stop(1);
            if index % 2 == 0 {
                // both halves done: the stream is forgotten
                send.reset(1);
            } else {
                // the receiving half is done, the record stays for the sending half
                kept.push(send);
            }
            for _ in 0..(INITIAL_WINDOW as usize / MAX_DATA) {
                send_raw(&mut raw, FrameKind::Data, id, &payload).await;
            }
        }
        // frames are handled in order: once this arrives, all of the above was
        let sync = 2 * (INITIAL_CONNECTION_WINDOW / INITIAL_WINDOW + 4) + 1;
        send_raw(&mut raw, FrameKind::Open, sync, &[]).await;
        send_raw(&mut raw, FrameKind::Data, sync, b"sync").await;
        let (_send, mut recv) = server.accept_bi().await.expect("the connection goes on");
        assert_eq!(recv.read_chunk().await.expect("read").as_deref(), Some(&b"sync"[..]));
        assert_eq!(server.buffered_bytes(), 0, "every byte went back");
        assert!(server.close_reason().is_none(), "{:?}", server.close_reason());
    }

    #[tokio::test]
    async fn credit_grants_past_the_maximum_are_a_violation() {
        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        let (_send, _recv) = server.open_bi().await.expect("open");
        // the stream starts with INITIAL_WINDOW; this takes it past MAX_STREAM_CREDIT
        send_raw(&mut raw, FrameKind::Window, 2, &(16 * 1024 * 1024u32).to_be_bytes()).await;
        let reason = closes(&server).await;
        assert!(reason.contains("stream 2") && reason.contains("more than any receiver buffers"), "{reason}");

        let (mut raw, server) = facing_raw_client(MuxLimits::default(), 64 * 1024);
        // the connection starts with INITIAL_CONNECTION_WINDOW; this takes it past MAX_CONNECTION_CREDIT
        send_raw(&mut raw, FrameKind::Window, 0, &u32::MAX.to_be_bytes()).await;
        let reason = closes(&server).await;
        assert!(reason.contains("stream 0") && reason.contains("more than any receiver buffers"), "{reason}");
    }

    #[tokio::test]
    async fn a_peer_that_grants_credit_and_never_reads_is_dropped() {
        let limits = MuxLimits { max_queued_bytes: 4 * 1024 * 1024, ..MuxLimits::default() };
        let (mut raw, server) = facing_raw_client(limits, 64 * 1024);
        let (mut send, _recv) = server.open_bi().await.expect("open");
        // within the maximum credit, but the raw peer never reads a byte
        send_raw(&mut raw, FrameKind::Window, 2, &(15 * 1024 * 1024u32).to_be_bytes()).await;
        let writer = tokio::spawn(async move {
            let mut outcome = Ok(());
            for _ in 0..16 {
                outcome = send.write_chunk(Bytes::from(vec![5u8; 1024 * 1024])).await;
                if outcome.is_err() {
                    break;
                }
            }
            outcome
        });
        let reason = closes(&server).await;
        assert!(reason.starts_with("the peer does not read"), "{reason}");
        assert!(matches!(writer.await.expect("writer"), Err(StreamError::ConnectionClosed(_))));
        assert_eq!(server.queued_bytes(), 0, "the queue went with the connection");
        // the writer gave up at once: reading now finds what the pipe held, then the end
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await.expect("the connection ends").expect("read");
        assert!(rest.len() <= 64 * 1024, "{} bytes were still written after the close", rest.len());
    }

    #[tokio::test]
    async fn a_peer_that_makes_us_answer_and_never_reads_is_dropped() {
        // every stream it opens is refused, and it reads none of the refusals
        let limits = MuxLimits { max_streams: 0, max_queued_frames: 100, ..MuxLimits::default() };
        let (mut raw, server) = facing_raw_client(limits, 1024);
        for index in 0..1000u32 {
            // the connection may end (and the pipe break) any time now
            if raw.write_all(&encode_header(FrameKind::Open, 2 * index + 1, 0)).await.is_err() {
                break;
            }
        }
        let reason = closes(&server).await;
        assert!(reason.starts_with("the peer does not read"), "{reason}");
    }

    #[tokio::test]
    async fn stream_ids_wrap_within_their_parity_and_skip_those_in_use() {
        let (client, server) = pair();
        let (mut client_control, mut client_control_recv) = client.open_bi().await.expect("open");
        client_control.write_all(b"hello").await.expect("write");
        let (mut server_control, mut server_control_recv) = server.accept_bi().await.expect("accept");
        assert_eq!(server_control_recv.read_chunk().await.expect("read").as_deref(), Some(&b"hello"[..]));
        let (mut server_first, _server_first_recv) = server.open_bi().await.expect("open");
        server_first.write_all(b"x").await.expect("write");
        let _client_first = client.accept_bi().await.expect("accept");
        assert_eq!((client_control.shared.id, server_first.shared.id), (1, 2));

        // the client's odd ids and the server's even ids both run out and start over
        client.set_next_stream_id(u32::MAX - 2);
        server.set_next_stream_id(u32::MAX - 3);
        let mut client_ids = Vec::new();
        let mut server_ids = Vec::new();
        for round in 0..4u8 {
            let (mut send, mut recv) = client.open_bi().await.expect("open");
            client_ids.push(send.shared.id);
            send.write_all(&[round]).await.expect("write");
            send.finish().expect("finish");
            let (mut peer_send, mut peer_recv) = server.accept_bi().await.expect("accept");
            assert_eq!(peer_recv.read_to_end(10).await.expect("read"), [round]);
            peer_send.write_all(&[round + 100]).await.expect("write");
            peer_send.finish().expect("finish");
            assert_eq!(recv.read_to_end(10).await.expect("read"), [round + 100]);

            let (mut send, mut recv) = server.open_bi().await.expect("open");
            server_ids.push(send.shared.id);
            send.write_all(&[round]).await.expect("write");
            send.finish().expect("finish");
            let (mut peer_send, mut peer_recv) = client.accept_bi().await.expect("accept");
            assert_eq!(peer_recv.read_to_end(10).await.expect("read"), [round]);
            peer_send.finish().expect("finish");
            assert_eq!(recv.read_to_end(10).await.expect("read"), b"");
        }
        assert_eq!(client_ids, [u32::MAX - 2, u32::MAX, 3, 5], "1 is the control stream's: skipped");
        assert_eq!(server_ids, [u32::MAX - 3, u32::MAX - 1, 4, 6], "2 is still open: skipped");
        // the long-lived streams still work both ways
        client_control.write_all(b"still").await.expect("write");
        assert_eq!(server_control_recv.read_chunk().await.expect("read").as_deref(), Some(&b"still"[..]));
        server_control.write_all(b"here").await.expect("write");
        assert_eq!(client_control_recv.read_chunk().await.expect("read").as_deref(), Some(&b"here"[..]));
        assert!(client.close_reason().is_none() && server.close_reason().is_none());
    }
}
