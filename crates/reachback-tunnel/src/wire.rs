//! Framed messages on a QUIC stream (see `reachback_proto::frame`).

use reachback_proto::{FRAME_HEADER, FrameError, decode_body, decode_length, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Reads one frame; `Ok(None)` when the stream ended cleanly before a frame began.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> anyhow::Result<Option<T>> {
    let mut header = [0u8; FRAME_HEADER];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => anyhow::bail!(FrameError::Malformed("stream ended inside a frame header".into())),
        Err(quinn::ReadExactError::ReadError(error)) => return Err(error.into()),
    }
    let length = decode_length(header)?;
    let mut body = vec![0u8; length];
    recv.read_exact(&mut body).await.map_err(|error| match error {
        quinn::ReadExactError::FinishedEarly(_) => anyhow::anyhow!(FrameError::Malformed("stream ended inside a frame".into())),
        quinn::ReadExactError::ReadError(error) => error.into(),
    })?;
    Ok(Some(decode_body(&body)?))
}

pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, message: &T) -> anyhow::Result<()> {
    send.write_all(&encode(message)).await?;
    Ok(())
}
