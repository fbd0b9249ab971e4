//! Length-prefixed frames: a 4-byte big-endian length, then a JSON document of at
//! most [`MAX_FRAME`] bytes. Control messages are rare and flow headers one per
//! flow, so a self-describing body costs nothing that matters and keeps every
//! decoding error explicit.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Size of the length prefix.
pub const FRAME_HEADER: usize = 4;
/// The largest frame body accepted.
pub const MAX_FRAME: usize = 16 * 1024;

/// Why bytes from the network were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// the length prefix announces more than [`MAX_FRAME`]
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    Oversized(usize),
    /// a zero-length frame
    #[error("empty frame")]
    Empty,
    /// the body is not the expected message
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // serialising our own plain structs into a Vec cannot fail
    let body = serde_json::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Reads a length prefix, refusing empty and oversized frames before any body is read.
pub fn decode_length(header: [u8; FRAME_HEADER]) -> Result<usize, FrameError> {
    let length = u32::from_be_bytes(header) as usize;
    match length {
        0 => Err(FrameError::Empty),
        length if length > MAX_FRAME => Err(FrameError::Oversized(length)),
        length => Ok(length),
    }
}

/// Decodes a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|error| FrameError::Malformed(error.to_string()))
}

/// Splits a byte stream into frames, for callers that receive bytes in pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. After an
    /// error the stream is unusable: the caller closes it.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<FRAME_HEADER>() else { return Ok(None) };
        let length = decode_length(*header)?;
        if self.buffer.len() < FRAME_HEADER + length {
            return Ok(None);
        }
        let message = decode_body(&self.buffer[FRAME_HEADER..FRAME_HEADER + length]);
        self.buffer.drain(..FRAME_HEADER + length);
        message.map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Control, FlowOpen};
    use proptest::prelude::*;

    #[test]
    fn round_trip_in_pieces() {
        let open =
            FlowOpen { destination: "100.64.0.7:22".parse().unwrap(), source: "10.0.0.5:40000".parse().unwrap(), user: None, protocol: Default::default() };
        let bytes = [encode(&open), encode(&open)].concat();
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for byte in bytes {
            decoder.push(&[byte]);
            while let Some(message) = decoder.next_message::<FlowOpen>().unwrap() {
                decoded.push(message);
            }
        }
        assert_eq!(decoded, vec![open.clone(), open]);
    }

    #[test]
    fn refuses_oversized_empty_and_garbage() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert_eq!(decoder.next_message::<Control>(), Err(FrameError::Oversized(MAX_FRAME + 1)));
        assert_eq!(decode_length([0; 4]), Err(FrameError::Empty));
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 3, b'{', b'x', b'}']);
        assert!(matches!(decoder.next_message::<Control>(), Err(FrameError::Malformed(_))));
        let unknown = br#"{"type":"launch_missiles"}"#;
        assert!(matches!(decode_body::<Control>(unknown), Err(FrameError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            for _ in 0..4 {
                if !matches!(decoder.next_message::<Control>(), Ok(Some(_))) { break; }
            }
            let _ = decode_body::<FlowOpen>(&bytes);
        }
    }
}
