//! A WebSocket client for servers whose socket says `pid N` (every so
//! often) and echoes what it gets: pid-server's `/ws`, and the library's
//! `realistic` example. Over plain TCP ([`open`]) or any stream the test
//! made, such as TLS ([`open_over`]).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::proc::WAIT;

/// A WebSocket over plain TCP, as [`open`] makes it.
pub type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The PID of a `pid N` message.
pub fn pid_of(text: &str) -> u32 {
    text.strip_prefix("pid ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a PID message: {text:?}"))
}

/// Opens `ws://ADDR/PATH`, checks the echo, and returns the socket and the
/// PID it says.
pub async fn open(addr: SocketAddr, path: &str) -> (Ws, u32) {
    let (mut ws, resp) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("WebSocket handshake in time")
    .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    let pid = greet(&mut ws).await;
    (ws, pid)
}

/// The WebSocket handshake for `url` over `stream` (a TLS stream, say),
/// then the same check as [`open`].
pub async fn open_over<S>(stream: S, url: &str) -> (WebSocketStream<S>, u32)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("WebSocket handshake in time")
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    let pid = greet(&mut ws).await;
    (ws, pid)
}

/// Sends a text, and reads until it came back and the socket said its PID.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> u32 {
    ws.send(Message::text("echo me")).await.unwrap();
    let mut pid = None;
    let mut echoed = false;
    while pid.is_none() || !echoed {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket stays open")
            .unwrap();
        match m {
            Message::Text(t) if t.as_str() == "echo me" => echoed = true,
            Message::Text(t) => pid = Some(pid_of(t.as_str())),
            other => panic!("unexpected {other:?}"),
        }
    }
    pid.unwrap()
}

/// Reads until the server closes, within `bound`; returns the close code.
pub async fn close_code<S>(ws: &mut WebSocketStream<S>, bound: Duration) -> Option<CloseCode>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                // Polling on sends our close answer, and sees the end.
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
                return frame.map(|f| f.code);
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("the WebSocket failed instead of closing: {e}"),
            Ok(None) => panic!("the WebSocket ended without a close frame"),
            Err(_) => panic!("no close within {bound:?}"),
        }
    }
}
