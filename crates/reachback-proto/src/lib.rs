//! The tunnel protocol of Reachback, without I/O: the messages agents, connectors
//! and the broker exchange, their framing, and the state machines that decide
//! keepalive, reconnect backoff and the life of a relayed flow. Time comes in as
//! an argument (`now`), randomness as a value, so everything here is tested in
//! memory with a fake clock.
//!
//! A tunnel is one TLS 1.3 connection over TCP (mutual TLS) carrying many
//! streams ([`mux`]). Its first stream, opened by the agent or connector, is the
//! *control stream* ([`Control`] messages). Every relayed TCP flow is a further bidirectional stream that starts
//! with one [`FlowOpen`] frame and one [`FlowReply`] frame the other way, then
//! carries the flow's bytes unframed; a UDP flow's stream carries its datagrams
//! ([`datagram`]).

mod backoff;
pub mod datagram;
mod flow;
mod frame;
mod liveness;
mod message;
pub mod mux;
pub mod renewal;
pub mod socks5;

pub use backoff::Backoff;
pub use flow::{Flow, FlowAction, FlowEvent, FlowPhase, Side};
pub use frame::{FRAME_HEADER, FrameDecoder, FrameError, MAX_FRAME, decode_body, decode_length, encode};
pub use liveness::{Liveness, LivenessAction};
pub use message::{ClientRole, Control, FlowOpen, FlowReply, NAME_UPDATE_BUDGET, NameUpdate, Refusal, Transport, Welcome};

/// The ALPN protocol id of the tunnel.
/// Version 2: the multiplexer has a connection-level window (peers of version 1 would stall).
pub const ALPN: &[u8] = b"reachback/2";
/// The name the broker's certificate carries and clients verify (the CA is private).
pub const BROKER_SERVER_NAME: &str = "broker.reachback.internal";
