//! The stream multiplexer's wire format and flow-control arithmetic, without I/O.
//!
//! A tunnel is one TLS 1.3 connection over TCP carrying many streams. Every frame
//! is a 9-byte header — kind (1 byte), stream id (4 bytes, big-endian), payload
//! length (4 bytes) — and the payload. The client opens odd stream ids, the broker
//! even ones. Each direction of each stream has a credit window: a sender may have
//! at most the receiver's window of unread bytes outstanding, and the receiver
//! grants more (`Window`) as its application consumes data. Memory per stream is
//! therefore bounded, and a slow reader slows its writer.

/// Size of a frame header.
pub const MUX_HEADER: usize = 9;
/// The largest payload a `Data` frame may carry.
pub const MAX_DATA: usize = 64 * 1024;
/// Credit each stream direction starts with.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;
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
    #[error("stream id {0} is not the peer's to open")]
    WrongStreamId(u32),
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
