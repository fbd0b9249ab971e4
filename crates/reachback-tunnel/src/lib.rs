//! The async shells around `reachback-proto`, shared by the broker, the agent and
//! the connector: mutual TLS 1.3 over TCP from the internal CA (`tls`), the stream
//! multiplexer (`mux`), the congestion control of the data plane's sockets
//! (`socket`), framed messages on streams (`wire`), and the relay that moves one
//! flow's bytes between two ends while the flow state machine decides half-close,
//! reset and idle timeout (`relay`), and UDP sockets read as framed datagrams
//! (`datagram`).

pub mod api_client;
pub mod client;
pub mod datagram;
pub mod mux;
pub mod relay;
pub mod socket;
pub mod tls;
pub mod wire;

pub use api_client::{ApiClient, ApiTrust};
pub use mux::{Connection, MuxLimits, RecvStream, SendStream, StreamError};
pub use relay::{AwaitReply, End, RelayOptions, RelayTotals, relay};
pub use socket::Congestion;
pub use tls::{PeerIdentity, TlsMaterial, TunnelConnector, TunnelListener, peer_identity};
pub use wire::{read_frame, spawn_reader, write_frame};
