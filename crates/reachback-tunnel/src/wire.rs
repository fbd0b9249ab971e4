//! Framed messages on a tunnel stream (see `reachback_proto::frame`).

use reachback_proto::{FRAME_HEADER, FrameError, decode_body, decode_length, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::mux::{RecvStream, SendStream};

/// Reads one frame; `Ok(None)` when the stream ended cleanly before a frame began.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> anyhow::Result<Option<T>> {
    let mut header = [0u8; FRAME_HEADER];
    if !recv.read_exact(&mut header).await? {
        return Ok(None);
    }
    let length = decode_length(header)?;
    let mut body = vec![0u8; length];
    if !recv.read_exact(&mut body).await? {
        anyhow::bail!(FrameError::Malformed("stream ended inside a frame".into()));
    }
    Ok(Some(decode_body(&body)?))
}

/// Reads control messages in a task of their own, so a loop can `select!` on them
/// next to timers; the channel ends after the first error or the end of the stream.
/// Abort the returned task when done.
pub fn spawn_reader<T: DeserializeOwned + Send + 'static>(
    mut recv: RecvStream,
) -> (tokio::sync::mpsc::Receiver<anyhow::Result<Option<T>>>, tokio::task::JoinHandle<()>) {
    let (frames_tx, frames) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            let frame = read_frame::<T>(&mut recv).await;
            let end = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || end {
                break;
            }
        }
    });
    (frames, task)
}

pub async fn write_frame<T: Serialize>(send: &mut SendStream, message: &T) -> anyhow::Result<()> {
    send.write_chunk(encode(message).into()).await?;
    Ok(())
}
