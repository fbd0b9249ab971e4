//! Moves one flow's bytes between two ends — a TCP socket or a tunnel stream pair —
//! in one task. Each direction reads a chunk and writes it before reading the next,
//! so a slow reader slows its writer (backpressure, no unbounded buffer). Stream
//! chunks are handed over without copying. The flow state machine decides what a
//! FIN, a reset or silence on one end does to the other.

use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reachback_proto::{Flow, FlowAction, FlowEvent, FlowReply, Refusal, Side, encode};
use tokio::net::TcpStream;

use crate::mux::{RecvStream, SendStream};
use crate::wire::read_frame;

/// Error code for a stream reset that mirrors a TCP reset.
const RESET_CODE: u32 = 1;
/// The largest chunk read from a TCP socket at once.
const TCP_CHUNK: usize = 64 * 1024;

/// One end of a relayed flow.
pub enum End {
    Tcp(TcpStream),
    Stream { send: SendStream, recv: RecvStream },
}

impl End {
    /// Resets the end: an RST on TCP, `Reset` and `Stop` on a stream.
    pub fn reset(self) {
        match self {
            End::Tcp(stream) => {
                // linger 0: close sends a reset instead of a FIN
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            }
            End::Stream { mut send, mut recv } => {
                send.reset(RESET_CODE);
                recv.stop(RESET_CODE);
            }
        }
    }
}

/// How a flow ended and how many bytes went each way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayTotals {
    pub server_to_client: u64,
    pub client_to_server: u64,
    /// false when a reset, a refusal or a timeout ended it
    pub clean: bool,
    /// the far end's refusal, when the relay waited for its answer and it said no
    pub refusal: Option<Refusal>,
}

/// Waiting for the far end's [`FlowReply`] while the server's bytes already flow
/// towards it (pipelining: the first bytes ride with the open).
#[derive(Clone, Copy, Debug)]
pub struct AwaitReply {
    /// how long the far end has to answer
    pub timeout: Duration,
    /// pass the reply on to the server side (the broker forwards the agent's answer to the connector)
    pub forward: bool,
}

/// What the relay needs besides its two ends.
pub struct RelayOptions<'a> {
    pub idle_timeout: Duration,
    /// `Some` when the client end must answer with a [`FlowReply`] first (it must be a stream)
    pub await_reply: Option<AwaitReply>,
    /// bytes read from a side
    pub on_bytes: &'a (dyn Fn(Side, u64) + Sync),
    /// the far end accepted the flow (called once, when it does)
    pub on_accepted: &'a (dyn Fn() + Sync),
}

enum Source<'a> {
    Tcp(&'a TcpStream),
    Stream(&'a mut RecvStream),
}

enum Sink<'a> {
    Tcp(&'a TcpStream),
    Stream(&'a mut SendStream),
}

/// How one direction ended.
enum PumpEnd {
    /// the reader sent FIN and it was passed on
    Eof,
    /// the reader reset (or broke)
    ReaderReset,
    /// the writer's side reset (or broke)
    WriterReset,
    /// the far end refused the flow
    Refused(Refusal),
}

async fn next_chunk(source: &mut Source<'_>) -> Result<Option<Bytes>, ()> {
    match source {
        Source::Stream(recv) => recv.read_chunk().await.map_err(|_| ()),
        Source::Tcp(stream) => loop {
            if stream.readable().await.is_err() {
                return Err(());
            }
            let mut buffer = BytesMut::with_capacity(TCP_CHUNK);
            match stream.try_read_buf(&mut buffer) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(buffer.freeze())),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(()),
            }
        },
    }
}

async fn put(sink: &mut Sink<'_>, mut chunk: Bytes) -> Result<(), ()> {
    match sink {
        Sink::Stream(send) => send.write_chunk(chunk).await.map_err(|_| ()),
        Sink::Tcp(stream) => {
            while !chunk.is_empty() {
                if stream.writable().await.is_err() {
                    return Err(());
                }
                match stream.try_write(&chunk) {
                    Ok(written) => {
                        let _ = chunk.split_to(written);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Err(()),
                }
            }
            Ok(())
        }
    }
}

fn finish(sink: &mut Sink<'_>) -> Result<(), ()> {
    match sink {
        Sink::Stream(send) => send.finish().map_err(|_| ()),
        Sink::Tcp(stream) => socket2::SockRef::from(*stream).shutdown(Shutdown::Write).map_err(|_| ()),
    }
}

async fn pump(mut source: Source<'_>, mut sink: Sink<'_>, moved: &AtomicU64, activity: &AtomicU64, epoch: Instant, on_bytes: &(dyn Fn(u64) + Sync)) -> PumpEnd {
    loop {
        match next_chunk(&mut source).await {
            Ok(Some(chunk)) => {
                let length = chunk.len() as u64;
                if put(&mut sink, chunk).await.is_err() {
                    return PumpEnd::WriterReset;
                }
                moved.fetch_add(length, Ordering::Relaxed);
                activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                on_bytes(length);
            }
            Ok(None) => {
                return if finish(&mut sink).is_ok() { PumpEnd::Eof } else { PumpEnd::WriterReset };
            }
            Err(()) => return PumpEnd::ReaderReset,
        }
    }
}

fn split(end: &mut End) -> (Source<'_>, Sink<'_>) {
    match end {
        End::Tcp(stream) => (Source::Tcp(stream), Sink::Tcp(stream)),
        End::Stream { send, recv } => (Source::Stream(recv), Sink::Stream(send)),
    }
}

/// The client side's direction when it must answer first: read the reply, report
/// it, pass it on if asked, then pump as usual.
async fn answer_then_pump(
    mut source: Source<'_>,
    mut sink: Sink<'_>,
    await_reply: AwaitReply,
    accepted: tokio::sync::oneshot::Sender<()>,
    counters: (&AtomicU64, &AtomicU64, Instant),
    on_bytes: &(dyn Fn(u64) + Sync),
) -> PumpEnd {
    let Source::Stream(recv) = &mut source else { return PumpEnd::ReaderReset };
    let reply = match read_frame::<FlowReply>(recv).await {
        Ok(Some(reply)) => reply,
        Ok(None) => return PumpEnd::Eof,
        Err(_) => return PumpEnd::ReaderReset,
    };
    if await_reply.forward && put(&mut sink, Bytes::from(encode(&reply))).await.is_err() {
        return PumpEnd::WriterReset;
    }
    match reply {
        FlowReply::Ok => {
            let _ = accepted.send(());
            pump(source, sink, counters.0, counters.1, counters.2, on_bytes).await
        }
        FlowReply::Refused(refusal) => {
            if await_reply.forward {
                let _ = finish(&mut sink);
            }
            PumpEnd::Refused(refusal)
        }
    }
}

/// Relays a flow until both directions finished, either end reset, the far end
/// refused, or the flow sat idle for `idle_timeout`.
pub async fn relay(mut server: End, mut client: End, options: RelayOptions<'_>) -> RelayTotals {
    let epoch = Instant::now();
    let open_timeout = options.await_reply.map_or(Duration::ZERO, |wait| wait.timeout);
    let mut flow = Flow::new(epoch, open_timeout, options.idle_timeout);
    let (accepted_tx, mut accepted_rx) = tokio::sync::oneshot::channel();
    if options.await_reply.is_none() {
        flow.handle(FlowEvent::Accepted, epoch);
        (options.on_accepted)();
    }
    let activity = AtomicU64::new(0);
    let (server_moved, client_moved) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut reset = (false, false);
    let mut refusal = None;
    let from_server = |length| (options.on_bytes)(Side::Server, length);
    let from_client = |length| (options.on_bytes)(Side::Client, length);
    {
        let (server_source, server_sink) = split(&mut server);
        let (client_source, client_sink) = split(&mut client);
        let mut upstream = pin!(pump(server_source, client_sink, &server_moved, &activity, epoch, &from_server));
        let mut downstream = pin!(async {
            match options.await_reply {
                Some(await_reply) => {
                    answer_then_pump(client_source, server_sink, await_reply, accepted_tx, (&client_moved, &activity, epoch), &from_client).await
                }
                None => pump(client_source, server_sink, &client_moved, &activity, epoch, &from_client).await,
            }
        });
        let (mut upstream_done, mut downstream_done, mut answered) = (false, false, options.await_reply.is_none());
        while let Some(deadline) = flow.poll_timeout() {
            let actions = tokio::select! {
                end = &mut upstream, if !upstream_done => {
                    upstream_done = true;
                    flow.handle(event(end, Side::Server, &mut refusal), Instant::now())
                }
                end = &mut downstream, if !downstream_done => {
                    downstream_done = true;
                    flow.handle(event(end, Side::Client, &mut refusal), Instant::now())
                }
                result = &mut accepted_rx, if !answered => {
                    answered = true;
                    if result.is_ok() {
                        (options.on_accepted)();
                        flow.handle(FlowEvent::Accepted, Instant::now())
                    } else {
                        Vec::new()
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let last = epoch + Duration::from_millis(activity.load(Ordering::Relaxed));
                    flow.handle(FlowEvent::Data(Side::Server), last);
                    flow.handle_timeout(Instant::now())
                }
            };
            for action in actions {
                match action {
                    // the pump already passed the FIN on when it saw it
                    FlowAction::Finish(_) | FlowAction::Done => {}
                    FlowAction::Reset(Side::Server) => reset.0 = true,
                    FlowAction::Reset(Side::Client) => reset.1 = true,
                }
            }
        }
    }
    let clean = !reset.0 && !reset.1;
    if reset.0 {
        server.reset();
    }
    if reset.1 {
        client.reset();
    }
    RelayTotals { server_to_client: server_moved.into_inner(), client_to_server: client_moved.into_inner(), clean, refusal }
}

fn event(end: PumpEnd, side: Side, refusal: &mut Option<Refusal>) -> FlowEvent {
    match end {
        PumpEnd::Eof => FlowEvent::Eof(side),
        PumpEnd::ReaderReset => FlowEvent::Reset(side),
        PumpEnd::WriterReset => FlowEvent::Reset(side.other()),
        PumpEnd::Refused(reason) => {
            *refusal = Some(reason);
            FlowEvent::Refused
        }
    }
}
