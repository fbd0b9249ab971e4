//! The async shells around `reachback-proto`, shared by the broker, the agent and
//! the connector: QUIC endpoints with mutual TLS from the internal CA (`tls`),
//! framed messages on QUIC streams (`wire`), and the relay that moves one flow's
//! bytes between two ends while the flow state machine decides half-close, reset
//! and idle timeout (`relay`).

pub mod client;
pub mod relay;
pub mod tls;
pub mod wire;

pub use relay::{End, RelayTotals, relay};
pub use tls::{PeerIdentity, TlsMaterial, client_endpoint, peer_identity, server_endpoint, transport_config};
pub use wire::{read_frame, write_frame};
