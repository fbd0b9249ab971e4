//! The stream multiplexer's wire format and flow-control arithmetic, without I/O.
//!
//! A tunnel is one TLS 1.3 connection over TCP carrying many streams. Every frame
//! is a 9-byte header — kind (1 byte), stream id (4 bytes, big-endian), payload
//! length (4 bytes) — and the payload. The client opens odd stream ids, the broker
//! even ones. Each direction of each stream has a credit window: a sender may have
//! at most the receiver's window of unread bytes outstanding, and the receiver
//! grants more (`Window`) as its application consumes data. Memory per stream is
//! therefore bounded, and a slow reader slows its writer.
//!
//! On top of that, each direction of the whole connection has a credit window
//! (like HTTP/2's connection window): the bytes a sender has outstanding across
//! all its streams are bounded by the receiver's budget, granted with `Window`
//! frames on stream 0. Both sides start with [`INITIAL_CONNECTION_WINDOW`]; a
//! receiver with a larger budget grants the difference right at the start. Memory
//! per connection is therefore bounded too, however many streams it carries.

/// Size of a frame header.
pub const MUX_HEADER: usize = 9;
/// The largest payload a `Data` frame may carry.
pub const MAX_DATA: usize = 64 * 1024;
/// Credit each stream direction starts with.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;
/// Credit each connection direction starts with, shared by all its streams.
pub const INITIAL_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The most send credit one stream may hold. The receiver grants at most what its
/// application consumed, so an honest peer never gives more than its window
/// ([`INITIAL_WINDOW`]); the margin leaves room for larger windows later. More is
/// a peer inviting us to queue without bound.
pub const MAX_STREAM_CREDIT: u64 = 16 * 1024 * 1024;
/// The most connection send credit a peer may give: also the largest connection
/// budget a receiver may have (see [`ConnectionWindow::new`]).
pub const MAX_CONNECTION_CREDIT: u64 = 1024 * 1024 * 1024;
/// The largest payload of a non-data frame (close reasons, codes).
const MAX_CONTROL: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// a new stream (no payload)
    Open = 0,
    Data = 1,
    /// the sender finished its direction
    Fin = 2,
    /// the sender abandoned its direction (payload: u32 code)
    Reset = 3,
    /// the receiver wants no more data (payload: u32 code)
    Stop = 4,
    /// more credit for the sender (payload: u32 increment)
    Window = 5,
    /// the connection ends (stream 0; payload: u32 code, then a UTF-8 reason)
    GoAway = 6,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            0 => FrameKind::Open,
            1 => FrameKind::Data,
            2 => FrameKind::Fin,
            3 => FrameKind::Reset,
            4 => FrameKind::Stop,
            5 => FrameKind::Window,
            6 => FrameKind::GoAway,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub stream: u32,
    pub length: usize,
}

/// A protocol violation by the peer: the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {length} bytes is too large for a {kind:?} frame")]
    Oversized { kind: FrameKind, length: usize },
    #[error("a {0:?} frame has a malformed payload")]
    BadPayload(FrameKind),
    #[error("the peer sent {sent} bytes on stream {stream} beyond its credit")]
    CreditExceeded { stream: u32, sent: u64 },
    #[error("the peer sent {sent} bytes beyond the connection's credit")]
    ConnectionCreditExceeded { sent: u64 },
    #[error("stream id {0} is not the peer's to open")]
    WrongStreamId(u32),
    /// a stream opened while the receiver accepts none (an agent's tunnel after its control stream, a connector's)
    #[error("the peer opened stream {0}, which it was not asked for")]
    UnsolicitedStream(u32),
    /// an empty data frame takes no credit, so it would be the one frame a peer could queue without bound
    #[error("the peer sent an empty data frame on stream {0}")]
    EmptyData(u32),
    #[error("the peer sent a {kind:?} frame on stream {stream} after it ended the stream")]
    AfterEnd { kind: FrameKind, stream: u32 },
    #[error("the peer granted stream {stream} a credit of {credit} bytes, more than any receiver buffers")]
    CreditOverflow { stream: u32, credit: u64 },
    /// each queued frame costs memory beyond its bytes: tiny frames that nobody
    /// reads would hold many times the connection's budget
    #[error("the peer has {0} data frames waiting to be read, more than the connection holds")]
    TooManyFrames(usize),
}

pub fn encode_header(kind: FrameKind, stream: u32, length: usize) -> [u8; MUX_HEADER] {
    let mut header = [0u8; MUX_HEADER];
    header[0] = kind as u8;
    header[1..5].copy_from_slice(&stream.to_be_bytes());
    header[5..9].copy_from_slice(&(length as u32).to_be_bytes());
    header
}

/// Decodes and checks a header before its payload is read.
pub fn decode_header(bytes: [u8; MUX_HEADER]) -> Result<FrameHeader, MuxError> {
    let kind = FrameKind::from_byte(bytes[0]).ok_or(MuxError::UnknownKind(bytes[0]))?;
    let stream = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let length = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    let limit = match kind {
        FrameKind::Data => MAX_DATA,
        FrameKind::Open | FrameKind::Fin => 0,
        FrameKind::Reset | FrameKind::Stop | FrameKind::Window => 4,
        FrameKind::GoAway => MAX_CONTROL,
    };
    let exact = matches!(kind, FrameKind::Reset | FrameKind::Stop | FrameKind::Window);
    if length > limit || (exact && length != 4) {
        return Err(if length > limit { MuxError::Oversized { kind, length } } else { MuxError::BadPayload(kind) });
    }
    if kind == FrameKind::Data && length == 0 {
        return Err(MuxError::EmptyData(stream));
    }
    Ok(FrameHeader { kind, stream, length })
}

/// Reads the u32 of a `Reset`, `Stop` or `Window` payload.
pub fn decode_u32(kind: FrameKind, payload: &[u8]) -> Result<u32, MuxError> {
    payload.try_into().map(u32::from_be_bytes).map_err(|_| MuxError::BadPayload(kind))
}

/// Whether the peer may open `stream`: clients open odd ids, the broker even ones, never 0.
pub fn peer_may_open(stream: u32, we_are_client: bool) -> bool {
    stream != 0 && stream.is_multiple_of(2) == we_are_client
}

/// The id after `id` among those of its parity: the client's odd ids and the
/// broker's even ones each wrap around within their parity (never to 0), so a
/// long-lived connection never runs out. The caller skips ids still in use.
pub fn next_stream_id(id: u32) -> u32 {
    id.checked_add(2).unwrap_or(if id.is_multiple_of(2) { 2 } else { 1 })
}

/// The sender's credit after a `Window` grant of `increment` on `stream` (0: the
/// connection); refused when it goes past [`MAX_STREAM_CREDIT`] or
/// [`MAX_CONNECTION_CREDIT`].
pub fn add_credit(credit: u64, increment: u32, stream: u32) -> Result<u64, MuxError> {
    let maximum = if stream == 0 { MAX_CONNECTION_CREDIT } else { MAX_STREAM_CREDIT };
    let credit = credit.saturating_add(increment as u64);
    if credit > maximum {
        return Err(MuxError::CreditOverflow { stream, credit });
    }
    Ok(credit)
}

/// The receiving side's credit bookkeeping for one stream direction.
#[derive(Clone, Debug)]
pub struct ReceiveWindow {
    window: u32,
    /// bytes received and not yet covered by a grant
    outstanding: u64,
    /// bytes the application consumed since the last grant
    consumed: u32,
}

impl ReceiveWindow {
    pub fn new(window: u32) -> Self {
        ReceiveWindow { window, outstanding: 0, consumed: 0 }
    }

    /// Bytes arrived; refused when the sender went past its credit.
    pub fn on_data(&mut self, stream: u32, length: usize) -> Result<(), MuxError> {
        self.outstanding += length as u64;
        if self.outstanding > self.window as u64 {
            return Err(MuxError::CreditExceeded { stream, sent: self.outstanding });
        }
        Ok(())
    }

    /// The application consumed `length` bytes: returns the credit to grant now, if any
    /// (grants are batched to half a window so small reads do not flood the peer).
    pub fn on_consumed(&mut self, length: usize) -> Option<u32> {
        self.consumed = self.consumed.saturating_add(length as u32);
        if self.consumed >= self.window / 2 {
            let grant = self.consumed;
            self.consumed = 0;
            self.outstanding = self.outstanding.saturating_sub(grant as u64);
            return Some(grant);
        }
        None
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> u64 {
        self.outstanding.saturating_sub(self.consumed as u64)
    }
}

/// The receiving side's credit bookkeeping for a whole connection: the memory
/// budget of what the peer may have sent and the application not yet consumed,
/// across all streams. Bytes count as consumed when the application reads them,
/// and also when they are thrown away (a stream reset, stopped or forgotten with
/// data still buffered, data for a stream that is gone): otherwise the peer's
/// credit would shrink for good and the connection slowly starve.
#[derive(Clone, Debug)]
pub struct ConnectionWindow {
    window: ReceiveWindow,
    budget: u32,
}

impl ConnectionWindow {
    /// A budget of `budget` bytes, held between [`INITIAL_CONNECTION_WINDOW`] (the
    /// peer may send that much before hearing from us) and [`MAX_CONNECTION_CREDIT`]
    /// (the most a peer accepts as credit).
    pub fn new(budget: u64) -> Self {
        let budget = budget.clamp(INITIAL_CONNECTION_WINDOW as u64, MAX_CONNECTION_CREDIT) as u32;
        ConnectionWindow { window: ReceiveWindow::new(budget), budget }
    }

    pub fn budget(&self) -> u32 {
        self.budget
    }

    /// The grant to send on stream 0 as the connection starts: what the budget
    /// holds beyond the initial window both sides assume.
    pub fn initial_grant(&self) -> Option<u32> {
        Some(self.budget - INITIAL_CONNECTION_WINDOW).filter(|grant| *grant > 0)
    }

    /// Data arrived on any stream; refused when the peer went past the connection's credit.
    pub fn on_data(&mut self, length: usize) -> Result<(), MuxError> {
        self.window.on_data(0, length).map_err(|_| MuxError::ConnectionCreditExceeded { sent: self.window.outstanding })
    }

    /// Bytes were consumed or thrown away: the credit to grant on stream 0 now, if
    /// any (batched to half the budget, as streams batch theirs).
    pub fn on_consumed(&mut self, length: usize) -> Option<u32> {
        self.window.on_consumed(length)
    }

    /// Bytes received and not yet consumed, across all streams.
    pub fn buffered(&self) -> u64 {
        self.window.buffered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let header = encode_header(FrameKind::Data, 7, 1000);
        assert_eq!(decode_header(header), Ok(FrameHeader { kind: FrameKind::Data, stream: 7, length: 1000 }));
        assert_eq!(decode_header(encode_header(FrameKind::Data, 7, MAX_DATA + 1)), Err(MuxError::Oversized { kind: FrameKind::Data, length: MAX_DATA + 1 }));
        assert_eq!(decode_header(encode_header(FrameKind::Fin, 7, 1)), Err(MuxError::Oversized { kind: FrameKind::Fin, length: 1 }));
        assert_eq!(decode_header(encode_header(FrameKind::Window, 7, 3)), Err(MuxError::BadPayload(FrameKind::Window)));
        let mut unknown = encode_header(FrameKind::Open, 1, 0);
        unknown[0] = 42;
        assert_eq!(decode_header(unknown), Err(MuxError::UnknownKind(42)));
        assert_eq!(decode_u32(FrameKind::Reset, &[0, 0, 1, 0]), Ok(256));
        assert!(peer_may_open(3, false) && !peer_may_open(4, false) && peer_may_open(4, true) && !peer_may_open(0, true));
    }

    #[test]
    fn credit_is_granted_in_batches_and_overruns_are_caught() {
        let mut window = ReceiveWindow::new(1000);
        assert!(window.on_data(1, 600).is_ok());
        assert_eq!(window.on_consumed(300), None);
        assert_eq!(window.on_consumed(300), Some(600));
        assert!(window.on_data(1, 1000).is_ok(), "the grant made room for a full window again");
        assert_eq!(window.on_data(1, 1), Err(MuxError::CreditExceeded { stream: 1, sent: 1001 }));
    }

    #[test]
    fn empty_data_frames_are_refused_and_other_empty_frames_are_not() {
        assert_eq!(decode_header(encode_header(FrameKind::Data, 5, 0)), Err(MuxError::EmptyData(5)));
        assert!(decode_header(encode_header(FrameKind::Open, 5, 0)).is_ok());
        assert!(decode_header(encode_header(FrameKind::Fin, 5, 0)).is_ok());
        assert!(decode_header(encode_header(FrameKind::GoAway, 0, 0)).is_ok());
    }

    #[test]
    fn stream_ids_wrap_within_their_parity_and_never_reach_zero() {
        assert_eq!(next_stream_id(1), 3);
        assert_eq!(next_stream_id(2), 4);
        assert_eq!(next_stream_id(u32::MAX - 2), u32::MAX);
        assert_eq!(next_stream_id(u32::MAX), 1, "the client's odd ids start over");
        assert_eq!(next_stream_id(u32::MAX - 1), 2, "the broker's even ids start over");
        assert_eq!(next_stream_id(u32::MAX - 3), u32::MAX - 1);
    }

    #[test]
    fn credit_grants_past_the_maximum_are_refused() {
        assert_eq!(add_credit(0, INITIAL_WINDOW, 1), Ok(INITIAL_WINDOW as u64));
        assert_eq!(add_credit(MAX_STREAM_CREDIT - 1, 1, 1), Ok(MAX_STREAM_CREDIT));
        assert_eq!(add_credit(MAX_STREAM_CREDIT, 1, 1), Err(MuxError::CreditOverflow { stream: 1, credit: MAX_STREAM_CREDIT + 1 }));
        // stream 0 is the connection, with its own, larger, maximum
        assert_eq!(
            add_credit(INITIAL_CONNECTION_WINDOW as u64, u32::MAX, 0),
            Err(MuxError::CreditOverflow { stream: 0, credit: INITIAL_CONNECTION_WINDOW as u64 + u32::MAX as u64 })
        );
        assert_eq!(add_credit(MAX_CONNECTION_CREDIT - 10, 10, 0), Ok(MAX_CONNECTION_CREDIT));
        assert!(add_credit(MAX_CONNECTION_CREDIT, 1, 0).is_err());
        assert_eq!(add_credit(u64::MAX, u32::MAX, 0), Err(MuxError::CreditOverflow { stream: 0, credit: u64::MAX }), "no overflow");
    }

    #[test]
    fn the_connection_window_bounds_what_all_streams_hold_and_grants_it_back_in_batches() {
        let mut window = ConnectionWindow::new(0);
        assert_eq!(window.budget(), INITIAL_CONNECTION_WINDOW, "a budget below the initial window cannot be kept");
        assert_eq!(window.initial_grant(), None);
        let half = INITIAL_CONNECTION_WINDOW as usize / 2;
        assert!(window.on_data(half).is_ok() && window.on_data(half).is_ok());
        assert_eq!(window.buffered(), INITIAL_CONNECTION_WINDOW as u64);
        assert_eq!(window.on_data(1), Err(MuxError::ConnectionCreditExceeded { sent: INITIAL_CONNECTION_WINDOW as u64 + 1 }));

        let mut window = ConnectionWindow::new(0);
        assert!(window.on_data(INITIAL_CONNECTION_WINDOW as usize).is_ok());
        assert_eq!(window.on_consumed(half - 1), None, "small consumption is not granted at once");
        assert_eq!(window.buffered(), (half + 1) as u64);
        assert_eq!(window.on_consumed(1), Some(half as u32));
        assert!(window.on_data(half).is_ok(), "the grant made room again");
        assert_eq!(window.on_data(1), Err(MuxError::ConnectionCreditExceeded { sent: INITIAL_CONNECTION_WINDOW as u64 + 1 }));
    }

    #[test]
    fn a_larger_budget_is_granted_at_the_start_and_held_below_the_maximum() {
        let window = ConnectionWindow::new(64 * 1024 * 1024);
        assert_eq!(window.initial_grant(), Some(48 * 1024 * 1024));
        let mut window = ConnectionWindow::new(u64::MAX);
        assert_eq!(window.budget() as u64, MAX_CONNECTION_CREDIT);
        let grant = window.initial_grant().expect("a grant");
        // what the peer then holds is exactly the most it accepts
        assert_eq!(add_credit(INITIAL_CONNECTION_WINDOW as u64, grant, 0), Ok(MAX_CONNECTION_CREDIT));
        assert!(window.on_data(MAX_CONNECTION_CREDIT as usize).is_ok());
        assert!(window.on_data(1).is_err());
    }

    #[test]
    fn arbitrary_headers_never_panic() {
        for first in 0..=255u8 {
            for length in [0u32, 1, 3, 4, 5, 1024, 1025, 65536, 65537, u32::MAX] {
                let mut bytes = [0u8; MUX_HEADER];
                bytes[0] = first;
                bytes[5..9].copy_from_slice(&length.to_be_bytes());
                let _ = decode_header(bytes);
            }
        }
    }
}
