//! A TLS connection: the handshake (bounded by the handshake timeout), then
//! HTTP/2 or HTTP/1.1 by ALPN, and how it ends.
//!
//! It cannot move to the next generation (its session state lives in this
//! process). When the generation leaves: HTTP/2 gets the graceful GOAWAY
//! (see `h2`); HTTP/1.1 answers its next request with `Connection: close`
//! and is closed idle only once it has been idle for the drain's idle wait
//! (the advertised `Keep-Alive: timeout=N` plus a second), the rule a drain
//! applies to plain connections, so a client that pauses less than that
//! gets its answer and one that honours the hint has closed it first.
//!
//! Counting: a handshake that fails (not TLS, a protocol error, a timeout)
//! is a failure; one the client leaves before it is done (closed or reset:
//! a scanner, a TCP check) is abandoned; one that completes is neither,
//! even when the client leaves at once (a TLS health check).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::closing::Peer;
use super::conn::{self, Activity, IoOf, Leaving, ModeWait};
use super::detect::{Rewind, serving_idle};
use super::{ConnCtx, Mode, Stream};

/// Serves one TLS connection to its end.
pub(crate) async fn serve(
    stream: Stream,
    addr: Option<std::net::SocketAddrV4>,
    socket: &str,
    acceptor: TlsAcceptor,
    ctx: &ConnCtx,
) {
    // The handshake alone is several writes: no waiting for Nagle.
    stream.no_delay();
    let peer = Peer::accepted(addr, &stream);
    let io = Handshaking::new(Rewind::new(stream, Vec::new()));
    let handshake = acceptor.accept(io).into_fallible();
    let mut tls = match tokio::time::timeout(ctx.tls_handshake_timeout, handshake).await {
        Ok(Ok(tls)) if tls.get_ref().0.gone => {
            // Complete, and the client has already gone (a TLS health
            // check): nothing to serve, nothing failed.
            tracing::debug!(
                event = "tls_client_gone",
                socket,
                "TLS handshake done; the client closed the connection at once"
            );
            return;
        }
        Ok(Ok(tls)) => tls,
        Ok(Err((e, io))) if io.gone || e.kind() == io::ErrorKind::UnexpectedEof => {
            ctx.counters.totals.tls_handshake_abandoned();
            tracing::debug!(event = "tls_handshake_abandoned", socket, error = %e,
                "the client closed the connection before the TLS handshake was done: {e}");
            return;
        }
        Ok(Err((e, _))) => {
            ctx.counters.totals.tls_handshake_failed();
            tracing::debug!(event = "tls_handshake_failed", socket, error = %e,
                "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            ctx.counters.totals.tls_handshake_failed();
            tracing::debug!(
                event = "tls_handshake_failed",
                socket,
                error = "timed out",
                "TLS handshake not done within {}s",
                ctx.tls_handshake_timeout.as_secs()
            );
            return;
        }
    };
    tls.get_mut().0.handshaking = false;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    if h2 {
        // hyper's preface wait has no bound of its own, nor a shutdown.
        if let Some(io) = super::detect::h2_preface(tls, ctx).await {
            super::h2::serve(io, socket, ctx).await;
        }
    } else {
        http1(tls, socket, ctx, peer).await;
    }
}

/// The TLS stream of a connection.
type Tls = TlsStream<Handshaking<Rewind<Stream>>>;

/// HTTP/1.1 over TLS until the client closes it, it is closed idle, or the
/// drain closes it. The same service and idle bookkeeping as a plain
/// connection (`conn.rs`), without the parking and the move; and the same
/// lingering close when hyper ends it with input possibly still coming.
async fn http1(io: Tls, socket: &str, ctx: &ConnCtx, peer: Peer) {
    let activity = Arc::new(Activity::new(&ctx.counters));
    let io = Touching {
        io,
        activity: IoOf(activity.clone()),
    };
    let service = conn::service(ctx, socket, &activity, Leaving::Closes, peer);
    let mut conn = ctx
        .http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut mode = ctx.mode.clone();
    loop {
        let limit = match *mode.borrow_and_update() {
            Mode::Serving => serving_idle(ctx),
            Mode::Draining | Mode::Moving => ctx.drain_idle,
        };
        let limit = super::timer::idle_limit(limit, ctx.header_read_timeout);
        let changed = std::pin::pin!(mode.changed());
        tokio::select! {
            r = Pin::new(&mut conn) => {
                if let Err(e) = r {
                    tracing::debug!(event = "connection_error", error = %e);
                }
                match conn.into_parts() {
                    Some(parts) => close(parts.io.into_inner().io, true).await,
                    None => activity.upgraded_until_dropped(&ctx.counters).await,
                }
                return;
            }
            changed = ModeWait::new(changed, &activity) => {
                if changed.is_ok() {
                    continue;
                }
                // The server is ending: nothing will change any more.
                std::future::pending::<()>().await;
            }
            _ = activity.idle_at_least(limit) => {}
        }
        // Idle long enough: hyper closes it at once (a request that began
        // meanwhile finishes, and its response says `Connection: close`).
        let begun = activity.requests();
        Pin::new(&mut conn).graceful_shutdown();
        let r = (&mut conn).await;
        let answered = activity.requests() != begun;
        match conn.into_parts() {
            Some(parts) => close(parts.io.into_inner().io, answered || r.is_err()).await,
            None => activity.upgraded_until_dropped(&ctx.counters).await,
        }
        return;
    }
}

/// Ends the TLS session (`close_notify`), then closes lingering, or at once
/// when nothing can be on its way (closed idle). Both within the lingering
/// close's time: a client that reads nothing cannot hold it longer.
async fn close(mut tls: Tls, lingering: bool) {
    use tokio::io::AsyncWriteExt;
    let deadline = tokio::time::Instant::now() + conn::LINGER_TIME;
    let _ = tokio::time::timeout_at(deadline, tls.shutdown()).await;
    if lingering {
        let stream = tls.into_inner().0.io.into_inner();
        conn::linger(stream, deadline).await;
    }
}

/// Notes every byte that arrives: a request in flight is activity before
/// hyper has parsed it.
struct Touching<I> {
    io: I,
    activity: IoOf,
}

impl<I: AsyncRead + Unpin> AsyncRead for Touching<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Touching<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    /// Only an upgraded connection's handler shuts the stream down; hyper's
    /// shutdown at a connection's end is left to [`close`], as for a plain
    /// connection (see `conn::ConnIo`).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.activity.is_upgraded() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The stream under the TLS handshake. In TLS 1.3 the server's last words
/// (its session tickets) follow the client's Finished, and tokio-rustls
/// reads on after that Finished: a client that completes the handshake and
/// leaves at once (a health check, often closing with a reset) would fail
/// the accept with a broken pipe or a reset although the handshake was
/// done. While `handshaking`, the peer's leaving is therefore not an error:
/// a write to it counts as written and a read sees the end of the stream.
/// rustls then decides: the handshake is done exactly when the client's
/// Finished came before it left (the accept succeeds, with `gone` set), and
/// fails with an unexpected end otherwise. Afterwards every call passes
/// through. The tickets stay on: resumption needs them.
struct Handshaking<I> {
    io: I,
    handshaking: bool,
    /// The peer reset the connection or closed it for writes.
    gone: bool,
}

impl<I: super::h2::PeerOf> super::h2::PeerOf for Handshaking<I> {
    fn peer(&self) -> Peer {
        self.io.peer()
    }
}

impl<I> Handshaking<I> {
    fn new(io: I) -> Handshaking<I> {
        Handshaking {
            io,
            handshaking: true,
            gone: false,
        }
    }

    /// Whether `e` says the peer has gone, which a handshake in progress
    /// notes rather than fails on.
    fn peer_gone(&mut self, e: &io::Error) -> bool {
        let gone = self.handshaking
            && matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            );
        self.gone |= gone;
        gone
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Handshaking<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if self.peer_gone(&e) => Poll::Ready(Ok(())),
            r => r,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Handshaking<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.gone {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if self.peer_gone(&e) => Poll::Ready(Ok(buf.len())),
            r => r,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(e)) if self.peer_gone(&e) => Poll::Ready(Ok(())),
            r => r,
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.gone {
            return Poll::Ready(Ok(len));
        }
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) if self.peer_gone(&e) => Poll::Ready(Ok(len)),
            r => r,
        }
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
