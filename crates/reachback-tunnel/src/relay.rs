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
use reachback_proto::{Flow, FlowAction, FlowEvent, Side};
use tokio::net::TcpStream;

use crate::mux::{RecvStream, SendStream};

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayTotals {
    pub server_to_client: u64,
    pub client_to_server: u64,
    /// false when a reset or a timeout ended it
    pub clean: bool,
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

/// Relays an opened flow until both directions finished, either end reset, or the
/// flow sat idle for `idle_timeout`. `on_bytes(side, n)`: `n` bytes read from `side`.
pub async fn relay(mut server: End, mut client: End, idle_timeout: Duration, on_bytes: &(dyn Fn(Side, u64) + Sync)) -> RelayTotals {
    let epoch = Instant::now();
    let mut flow = Flow::new(epoch, Duration::ZERO, idle_timeout);
    flow.handle(FlowEvent::Accepted, epoch);
    let activity = AtomicU64::new(0);
    let (server_moved, client_moved) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut reset = (false, false);
    let from_server = |length| on_bytes(Side::Server, length);
    let from_client = |length| on_bytes(Side::Client, length);
    {
        let (server_source, server_sink) = split(&mut server);
        let (client_source, client_sink) = split(&mut client);
        let mut upstream = pin!(pump(server_source, client_sink, &server_moved, &activity, epoch, &from_server));
        let mut downstream = pin!(pump(client_source, server_sink, &client_moved, &activity, epoch, &from_client));
        let (mut upstream_done, mut downstream_done) = (false, false);
        loop {
            let Some(deadline) = flow.poll_timeout() else { break };
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
    RelayTotals { server_to_client: server_moved.into_inner(), client_to_server: client_moved.into_inner(), clean }
}

fn event(end: PumpEnd, side: Side) -> FlowEvent {
    match end {
        PumpEnd::Eof => FlowEvent::Eof(side),
        PumpEnd::ReaderReset => FlowEvent::Reset(side),
        PumpEnd::WriterReset => FlowEvent::Reset(side.other()),
    }
}
