//! MQTT over WebSockets, as IoT Hub serves it: `GET /$iothub/websocket` on the HTTPS
//! listener, subprotocol `mqtt`, MQTT packets in binary frames. After the upgrade the
//! frames are unwrapped into a byte pipe whose other end is an ordinary device
//! connection ([`crate::device::serve`]), so both transports share every rule.
//!
//! The framing is RFC 6455's, the little of it MQTT needs: binary (and text and
//! continuation) frames carry bytes, ping is answered with pong, close with close.
//! Frames over [`MAX_FRAME`] end the connection.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tracing::debug;

use crate::device::{self, Devices};

/// The path IoT Hub serves MQTT over WebSockets on.
pub const PATH: &str = "/$iothub/websocket";

/// The largest frame taken: a device's largest MQTT packet fits with room.
pub const MAX_FRAME: u64 = 1024 * 1024;

/// The route that upgrades to MQTT over WebSockets.
pub fn router(devices: Arc<Devices>) -> axum::Router {
    axum::Router::new()
        .route(PATH, axum::routing::get(upgrade))
        .with_state(devices)
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455, 4.2.2).
pub fn accept_key(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{}{GUID}", key.trim()).as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn refuse(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, why.to_owned()).into_response()
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

async fn upgrade(State(devices): State<Arc<Devices>>, mut request: Request) -> Response {
    let headers = request.headers();
    if !header_has(headers, header::UPGRADE, "websocket")
        || !header_has(headers, header::CONNECTION, "upgrade")
    {
        return refuse("this path takes MQTT over WebSockets only");
    }
    if !header_has(headers, header::SEC_WEBSOCKET_PROTOCOL, "mqtt") {
        return refuse("the WebSocket subprotocol must be mqtt");
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok())
    else {
        return refuse("no Sec-WebSocket-Key");
    };
    let accept = accept_key(key);
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => bridge(hyper_util::rt::TokioIo::new(upgraded), devices).await,
            Err(e) => debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("mqtt"),
    );
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// What the writer sends to the client.
enum Out {
    /// MQTT bytes, in a binary frame.
    Data(Vec<u8>),
    /// An answer to a ping.
    Pong(Vec<u8>),
    /// A close frame; the writer ends after it.
    Close,
}

/// Runs a device connection over the WebSocket `ws` until either side ends.
async fn bridge<S>(ws: S, devices: Arc<Devices>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (pipe, device_end) = tokio::io::duplex(256 * 1024);
    let session = tokio::spawn(device::serve(
        device_end,
        devices,
        "websocket".to_owned(),
        Vec::new(),
    ));
    let (mut ws_read, mut ws_write) = tokio::io::split(ws);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(pipe);
    let (out, mut outgoing) = mpsc::channel::<Out>(64);

    let writer = async move {
        while let Some(message) = outgoing.recv().await {
            let (opcode, payload, last) = match message {
                Out::Data(bytes) => (0x2, bytes, false),
                Out::Pong(bytes) => (0xA, bytes, false),
                Out::Close => (0x8, Vec::new(), true),
            };
            if write_frame(&mut ws_write, opcode, &payload).await.is_err() || last {
                break;
            }
        }
        let _ = ws_write.shutdown().await;
    };
    let to_client = {
        let out = out.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(Out::Data(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = out.send(Out::Close).await;
        }
    };
    let from_client = async move {
        loop {
            match read_frame(&mut ws_read).await {
                Ok(Some((0x0..=0x2, payload))) => {
                    if pipe_write.write_all(&payload).await.is_err() {
                        break;
                    }
                }
                Ok(Some((0x9, payload))) => {
                    let _ = out.send(Out::Pong(payload)).await;
                }
                Ok(Some((0xA, _))) => {}
                Ok(Some((0x8, _))) | Ok(None) => break,
                Ok(Some((opcode, _))) => {
                    debug!(opcode, "unknown WebSocket opcode");
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "WebSocket read");
                    break;
                }
            }
        }
        // The device connection sees its stream end.
        let _ = pipe_write.shutdown().await;
        let _ = out.send(Out::Close).await;
    };
    // Whichever side ends first ends the bridge: a client that stops reading after the
    // close frame is not waited for.
    tokio::select! {
        () = from_client => {}
        _ = async { tokio::join!(writer, to_client) } => {}
    }
    let _ = session.await;
}

/// One frame: its opcode and (unmasked) payload; `None` at the end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 2];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a WebSocket frame of {len} bytes; the limit is {MAX_FRAME}"),
        ));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
    Ok(Some((opcode, payload)))
}

/// Writes one final, unmasked frame (a server never masks).
async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn frames_round_trip_masked_and_in_every_length_form() {
        for len in [0usize, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            write_frame(&mut wire, 0x2, &payload).await.expect("writes");
            let read = read_frame(&mut wire.as_slice()).await.expect("reads");
            assert_eq!(read, Some((0x2, payload.clone())));
            // The same frame as a client sends it, masked.
            let mask = [1u8, 2, 3, 4];
            let header_len = wire.len() - len;
            let mut masked = wire[..header_len].to_vec();
            masked[1] |= 0x80;
            masked.extend_from_slice(&mask);
            masked.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            let read = read_frame(&mut masked.as_slice()).await.expect("reads");
            assert_eq!(read, Some((0x2, payload)));
        }
        let huge = [0x82u8, 127, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert!(read_frame(&mut huge.as_slice()).await.is_err());
        assert_eq!(read_frame(&mut [].as_slice()).await.expect("eof"), None);
    }
}
