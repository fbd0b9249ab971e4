//! The stream multiplexer over one TLS connection (wire format and credit
//! arithmetic in `reachback_proto::mux`). One reader task and one writer task per
//! connection; streams are cheap (a small shared record and a queue), opening one
//! costs a single frame and no handshake.
//!
//! Frames to send go through one ordered queue, so a stream's `Fin` never overtakes
//! its data. The queue needs no bound of its own: data frames wait for credit
//! first, so what is queued never exceeds the peers' windows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use reachback_proto::mux::{FrameKind, INITIAL_WINDOW, MAX_DATA, MUX_HEADER, MuxError, ReceiveWindow, decode_header, decode_u32, encode_header, peer_may_open};
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

struct StreamShared {
    id: u32,
    send: Mutex<SendSide>,
    credit_changed: Notify,
    inbound: mpsc::UnboundedSender<Inbound>,
    window: Mutex<ReceiveWindow>,
    /// both halves are done: the record can go
    send_done: AtomicBool,
    recv_done: AtomicBool,
}

struct Inner {
    is_client: bool,
    frames: mpsc::UnboundedSender<Frame>,
    streams: Mutex<HashMap<u32, Arc<StreamShared>>>,
    accept: tokio::sync::Mutex<mpsc::UnboundedReceiver<(SendStream, RecvStream)>>,
    accept_tx: mpsc::UnboundedSender<(SendStream, RecvStream)>,
    next_id: AtomicU32,
    closed: watch::Sender<Option<String>>,
    remote: SocketAddr,
    stable_id: u64,
    /// the peer's certificate chain (DER), from the TLS handshake
    peer_certificates: Vec<Vec<u8>>,
    /// streams held at once before the peer's new ones are refused
    max_streams: usize,
}

/// One multiplexed tunnel connection. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// The most streams one connection holds at once (a peer opening more gets resets).
pub const MAX_STREAMS: usize = 65_536;
/// The reset code of a stream refused for that reason.
pub const STREAM_REFUSED: u32 = 2;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn send_frame(&self, kind: FrameKind, stream: u32, payload: Bytes) {
        let _ = self.frames.send(Frame { kind, stream, payload });
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    fn new_stream(self: &Arc<Self>, id: u32) -> (SendStream, RecvStream) {
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(StreamShared {
            id,
            send: Mutex::new(SendSide { credit: INITIAL_WINDOW as u64, stopped: None }),
            credit_changed: Notify::new(),
            inbound: inbound_tx,
            window: Mutex::new(ReceiveWindow::new(INITIAL_WINDOW)),
            send_done: AtomicBool::new(false),
            recv_done: AtomicBool::new(false),
        });
        lock(&self.streams).insert(id, shared.clone());
        let send = SendStream { connection: self.clone(), shared: shared.clone(), done: false };
        let recv = RecvStream { connection: self.clone(), shared, inbound: inbound_rx, pending: Bytes::new(), done: false };
        (send, recv)
    }

    fn forget_if_done(&self, shared: &StreamShared) {
        if shared.send_done.load(Ordering::Acquire) && shared.recv_done.load(Ordering::Acquire) {
            lock(&self.streams).remove(&shared.id);
        }
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
        let streams: Vec<Arc<StreamShared>> = lock(&self.streams).drain().map(|(_, stream)| stream).collect();
        for stream in streams {
            let _ = stream.inbound.send(Inbound::Reset(u32::MAX));
            stream.credit_changed.notify_waiters();
        }
    }
}

impl Connection {
    /// Wraps an established TLS stream and starts its reader and writer tasks.
    pub fn start<S>(io: S, is_client: bool, remote: SocketAddr, peer_certificates: Vec<Vec<u8>>) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start_with_limit(io, is_client, remote, peer_certificates, MAX_STREAMS)
    }

    fn start_with_limit<S>(io: S, is_client: bool, remote: SocketAddr, peer_certificates: Vec<Vec<u8>>, max_streams: usize) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (accept_tx, accept_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            is_client,
            frames: frames_tx,
            streams: Mutex::new(HashMap::new()),
            accept: tokio::sync::Mutex::new(accept_rx),
            accept_tx,
            next_id: AtomicU32::new(if is_client { 1 } else { 2 }),
            closed,
            remote,
            stable_id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            peer_certificates,
            max_streams,
        });
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
        tokio::spawn(write_loop(writer, frames_rx, Arc::downgrade(&inner)));
        Connection { inner }
    }

    /// Opens a stream: one frame, no round trip.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        if let Some(reason) = self.inner.closed_reason() {
            return Err(StreamError::ConnectionClosed(reason));
        }
        let id = self.inner.next_id.fetch_add(2, Ordering::Relaxed);
        let pair = self.inner.new_stream(id);
        self.inner.send_frame(FrameKind::Open, id, Bytes::new());
        Ok(pair)
    }

    /// The next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let mut closed = self.inner.closed.subscribe();
        let mut accept = self.inner.accept.lock().await;
        tokio::select! {
            pair = accept.recv() => pair.ok_or_else(|| StreamError::ConnectionClosed("closed".into())),
            reason = closed.wait_for(Option::is_some) => Err(StreamError::ConnectionClosed(reason.ok().and_then(|reason| reason.clone()).unwrap_or_default())),
        }
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

    /// Streams currently open (for tests and metrics).
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.streams).len()
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, inner: std::sync::Weak<Inner>) -> Result<(), String> {
    // no buffer of our own: the TLS layer buffers already, and a payload is read
    // straight into the memory that carries it on (one copy out of TLS, no zeroing)
    loop {
        let mut header = [0u8; MUX_HEADER];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Err("the peer closed the connection".into()),
            Err(error) => return Err(error.to_string()),
        }
        let header = decode_header(header).map_err(|error| error.to_string())?;
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

fn dispatch(inner: &Arc<Inner>, kind: FrameKind, id: u32, payload: Bytes) -> Result<(), MuxError> {
    if kind == FrameKind::GoAway {
        let code = payload.get(..4).map(|bytes| decode_u32(kind, bytes)).transpose()?.unwrap_or(0);
        let reason = String::from_utf8_lossy(payload.get(4..).unwrap_or_default()).into_owned();
        inner.shut(format!("closed by peer ({code}): {reason}"));
        return Ok(());
    }
    if kind == FrameKind::Open {
        if !peer_may_open(id, inner.is_client) || lock(&inner.streams).contains_key(&id) {
            return Err(MuxError::WrongStreamId(id));
        }
        if lock(&inner.streams).len() >= inner.max_streams {
            // too many at once: this one is refused, the others go on
            inner.send_frame(FrameKind::Reset, id, Bytes::copy_from_slice(&STREAM_REFUSED.to_be_bytes()));
            return Ok(());
        }
        let pair = inner.new_stream(id);
        let _ = inner.accept_tx.send(pair);
        return Ok(());
    }
    // frames for a stream we already forgot (both halves done) are dropped
    let Some(stream) = lock(&inner.streams).get(&id).cloned() else { return Ok(()) };
    match kind {
        FrameKind::Data => {
            lock(&stream.window).on_data(id, payload.len())?;
            let _ = stream.inbound.send(Inbound::Data(payload));
        }
        FrameKind::Fin => {
            let _ = stream.inbound.send(Inbound::Fin);
        }
        FrameKind::Reset => {
            let _ = stream.inbound.send(Inbound::Reset(decode_u32(kind, &payload)?));
        }
        FrameKind::Stop => {
            lock(&stream.send).stopped = Some(decode_u32(kind, &payload)?);
            stream.credit_changed.notify_waiters();
        }
        FrameKind::Window => {
            let increment = decode_u32(kind, &payload)?;
            lock(&stream.send).credit += increment as u64;
            stream.credit_changed.notify_waiters();
        }
        FrameKind::Open | FrameKind::GoAway => {}
    }
    Ok(())
}

/// Data frames at least this large are written from their own memory (header and
/// payload as one vectored write) instead of being copied into the batch buffer.
const DIRECT_WRITE: usize = 8 * 1024;

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut frames: mpsc::UnboundedReceiver<Frame>, inner: std::sync::Weak<Inner>) {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let mut closed = match inner.upgrade() {
        Some(inner) => inner.closed.subscribe(),
        None => return,
    };
    'frames: loop {
        let frame = tokio::select! {
            biased;
            frame = frames.recv() => frame,
            _ = async { let _ = closed.wait_for(Option::is_some).await; } => {
                // closing: send what is queued (a GoAway among it), then stop
                while let Ok(frame) = frames.try_recv() {
                    encode(&mut buffer, &frame);
                }
                let _ = writer.write_all(&buffer).await;
                break;
            }
        };
        let Some(mut frame) = frame else { break };
        // small frames that are ready share one buffer (and one TLS record);
        // a large data frame is written on its own after them
        let mut last = false;
        loop {
            last |= frame.kind == FrameKind::GoAway;
            if frame.payload.len() >= DIRECT_WRITE {
                let mut header = &encode_header(frame.kind, frame.stream, frame.payload.len())[..];
                let wrote = async {
                    writer.write_all(&buffer).await?;
                    writer.write_all_buf(&mut Buf::chain(&mut header, &mut frame.payload)).await
                }
                .await;
                buffer.clear();
                if wrote.is_err() {
                    break 'frames;
                }
            } else {
                encode(&mut buffer, &frame);
            }
            if last || buffer.len() >= 256 * 1024 {
                break;
            }
            match frames.try_recv() {
                Ok(more) => frame = more,
                Err(_) => break,
            }
        }
        if writer.write_all(&buffer).await.is_err() || writer.flush().await.is_err() {
            break;
        }
        buffer.clear();
        if buffer.capacity() > 1024 * 1024 {
            buffer = BytesMut::with_capacity(64 * 1024);
        }
        if last {
            let _ = writer.shutdown().await;
            return;
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.shut("the connection broke while writing".into());
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
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
    /// Sends bytes, waiting for credit when the peer's window is full.
    pub async fn write_chunk(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        while !data.is_empty() {
            let granted = loop {
                let notified = self.shared.credit_changed.notified();
                {
                    let mut send = lock(&self.shared.send);
                    if let Some(code) = send.stopped {
                        return Err(StreamError::Stopped(code));
                    }
                    if let Some(reason) = self.connection.closed_reason() {
                        return Err(StreamError::ConnectionClosed(reason));
                    }
                    if send.credit > 0 {
                        let granted = (send.credit as usize).min(data.len()).min(MAX_DATA);
                        send.credit -= granted as u64;
                        break granted;
                    }
                }
                notified.await;
            };
            let piece = data.split_to(granted);
            self.connection.send_frame(FrameKind::Data, self.shared.id, piece);
        }
        Ok(())
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
        self.connection.send_frame(FrameKind::Reset, self.shared.id, Bytes::copy_from_slice(&code.to_be_bytes()));
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
    inbound: mpsc::UnboundedReceiver<Inbound>,
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
        match self.inbound.recv().await {
            Some(Inbound::Data(data)) => {
                let grant = lock(&self.shared.window).on_consumed(data.len());
                if let Some(grant) = grant {
                    self.connection.send_frame(FrameKind::Window, self.shared.id, Bytes::copy_from_slice(&grant.to_be_bytes()));
                }
                Ok(Some(data))
            }
            Some(Inbound::Fin) => {
                self.finish_receiving();
                Ok(None)
            }
            Some(Inbound::Reset(u32::MAX)) | None => {
                self.finish_receiving();
                Err(StreamError::ConnectionClosed(self.connection.closed_reason().unwrap_or_default()))
            }
            Some(Inbound::Reset(code)) => {
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
        self.connection.send_frame(FrameKind::Stop, self.shared.id, Bytes::copy_from_slice(&code.to_be_bytes()));
        self.finish_receiving();
    }

    fn finish_receiving(&mut self) {
        if !self.done {
            self.done = true;
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
        let server = Connection::start_with_limit(server_io, false, address, Vec::new(), 2);
        let (_first_send, _first_recv) = client.open_bi().await.expect("open");
        let (_second_send, _second_recv) = client.open_bi().await.expect("open");
        let (_third_send, mut third_recv) = client.open_bi().await.expect("open");
        let _first = server.accept_bi().await.expect("accept");
        let _second = server.accept_bi().await.expect("accept");
        assert_eq!(third_recv.read_chunk().await, Err(StreamError::Reset(STREAM_REFUSED)), "the third is refused");
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
}
