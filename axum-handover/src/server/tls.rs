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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use super::conn::{self, Activity, Leaving};
use super::detect::{Rewind, serving_idle};
use super::{ConnCtx, Mode, Stream};

/// Serves one TLS connection to its end.
pub(crate) async fn serve(stream: Stream, socket: &str, acceptor: TlsAcceptor, ctx: &ConnCtx) {
    let handshake = acceptor.accept(Rewind::new(stream, Vec::new()));
    let tls = match tokio::time::timeout(ctx.tls_handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
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
    let h2 = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    if h2 {
        // hyper's preface wait has no bound of its own, nor a shutdown.
        if let Some(io) = super::detect::h2_preface(tls, ctx).await {
            super::h2::serve(io, socket, ctx).await;
        }
    } else {
        http1(tls, socket, ctx).await;
    }
}

/// HTTP/1.1 over TLS until the client closes it, it is closed idle, or the
/// drain closes it. The same service and idle bookkeeping as a plain
/// connection (`conn.rs`), without the parking and the move.
async fn http1<I>(io: I, socket: &str, ctx: &ConnCtx)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Touching {
        io,
        activity: activity.clone(),
    };
    let service = conn::service(ctx, socket, &activity, Leaving::Closes);
    let conn = ctx.http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut mode = ctx.mode.clone();
    loop {
        let limit = match *mode.borrow_and_update() {
            Mode::Serving => serving_idle(ctx),
            Mode::Draining | Mode::Moving => ctx.drain_idle,
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(event = "connection_error", error = %e);
                }
                return;
            }
            changed = mode.changed() => {
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
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        return;
    }
}

/// Notes every byte that arrives: a request in flight is activity before
/// hyper has parsed it.
struct Touching<I> {
    io: I,
    activity: Arc<Activity>,
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

write_through!(Touching<I>, io, I);
