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

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::detect::{Rewind, serving_idle};
use super::{ConnCtx, Counters, Mode, Stream};

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
/// drain closes it.
async fn http1<I>(io: I, socket: &str, ctx: &ConnCtx)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = Arc::new(Idle::new());
    let io = Touching {
        io,
        idle: idle.clone(),
    };
    let service = Requests {
        router: ctx.router(socket),
        counters: ctx.counters.clone(),
        idle: idle.clone(),
        keep_alive: HeaderValue::from_str(&format!("timeout={}", ctx.keep_alive.as_secs()))
            .expect("a number is a valid header value"),
    };
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
            _ = idle.at_least(limit) => {}
        }
        // Idle long enough: hyper closes it at once (a request that began
        // meanwhile finishes, and its response says `Connection: close`).
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        return;
    }
}

/// When the connection last did something, and whether a request runs.
struct Idle {
    busy: AtomicUsize,
    since: Instant,
    last_ms: AtomicU64,
    quiet: Notify,
}

impl Idle {
    fn new() -> Idle {
        Idle {
            busy: AtomicUsize::new(0),
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
            quiet: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once no request has run and no byte arrived for `limit`.
    async fn at_least(&self, limit: Duration) {
        loop {
            let quiet = self.quiet.notified();
            if self.busy.load(Ordering::SeqCst) > 0 {
                quiet.await;
                continue;
            }
            let idle = Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
            );
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

struct Busy(Arc<Idle>);
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.quiet.notify_waiters();
    }
}

/// Notes every byte that arrives: a request in flight is activity before
/// hyper has parsed it.
struct Touching<I> {
    io: I,
    idle: Arc<Idle>,
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
            self.idle.touch();
        }
        r
    }
}

write_through!(Touching<I>, io, I);

/// The app's router behind one TLS HTTP/1.1 connection: counts requests,
/// and says `Connection: close` once the generation leaves (the connection
/// cannot move; the client opens its next one to the new process).
struct Requests {
    router: axum::Router,
    counters: Arc<Counters>,
    idle: Arc<Idle>,
    keep_alive: HeaderValue,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Requests {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        let (router, counters, idle, keep_alive) = (
            self.router.clone(),
            self.counters.clone(),
            self.idle.clone(),
            self.keep_alive.clone(),
        );
        idle.busy.fetch_add(1, Ordering::SeqCst);
        idle.touch();
        let busy = Busy(idle);
        Box::pin(async move {
            let _busy = busy;
            let _counted = counters.request_started();
            let mut resp = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            counters.totals.request(resp.status().as_u16());
            if counters.is_leaving() {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            } else {
                resp.headers_mut().insert("keep-alive", keep_alive);
            }
            Ok(resp)
        })
    }
}
