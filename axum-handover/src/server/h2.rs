//! An HTTP/2 connection (`h2c` with prior knowledge, or `h2` by ALPN over
//! TLS) and how it ends.
//!
//! It cannot move to the next generation: its state (streams, flow
//! control, the header compression tables) lives in this process. So as
//! soon as the generation leaves (a handover or a stop) it gets hyper's
//! graceful shutdown, which sends GOAWAY with the highest stream id (no
//! stream the client is opening right now is refused), then, after a PING
//! round trip, GOAWAY with the last stream it took; the PING's ack is held
//! back until the streams the client had queued behind it arrived (see
//! `ack`), so none of them is refused either. The client opens its
//! next connection to the new process; the streams it had open finish
//! here, within the drain timeout; none is refused or reset. Counted like
//! a drained connection.
//!
//! Once hyper has ended a connection gracefully (every stream answered,
//! the final GOAWAY and a FIN written), it has a *lingering close*, as an
//! HTTP/1.1 connection that hyper ends (see `conn`): the client keeps
//! sending WINDOW_UPDATEs and acks while it reads the last responses, and
//! closing a socket with unread input makes the kernel send a reset and
//! throw away what it had not yet sent of those responses. So the input
//! is read and discarded until the client closes, within the lingering
//! close's time and bytes.
//!
//! Responses that wait on a client that does not read are bounded and
//! timed out (see `stall`), while serving and while leaving alike: a
//! stalled connection is closed at its stall timeout, so it does not hold
//! a leaving process until the drain timeout.
//!
//! Every request carries what an HTTP/1.1 request does: its peer
//! (`ConnectInfo`) and its [`Closing`], at whose moment a streaming
//! response of unknown length (Server-Sent Events) ends cleanly, as on
//! HTTP/1.1 (see `closing`); the stream stays in flight until its body
//! ends.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tower::ServiceExt;

use super::ack::HoldShutdownAck;
use super::closing::{Closing, Left, Peer, Streaming};
use super::conn::{LINGER_TIME, Stream, linger, now_ms};
use super::detect::{Rewind, leaving};
use super::stall::{Responses, Sent, Tracked};
use super::{ConnCtx, Counters, MAX_HEADER_BYTES};
use crate::Config;

/// How long a peer has to answer a keep-alive PING.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub(crate) type Builder = hyper::server::conn::http2::Builder<StreamExec>;

pub(crate) fn builder(config: &Config) -> Builder {
    let mut b = hyper::server::conn::http2::Builder::new(StreamExec);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(config.http2_keep_alive)
        .keep_alive_timeout(PING_TIMEOUT);
    b
}

/// The I/O under an HTTP/2 connection, which knows the connection's other
/// end (a plain stream, or one under TLS).
pub(crate) trait PeerOf {
    fn peer(&self) -> Peer;
}

impl PeerOf for Stream {
    fn peer(&self) -> Peer {
        Peer::of(self)
    }
}

impl<I: PeerOf> PeerOf for Rewind<I> {
    fn peer(&self) -> Peer {
        self.get_ref().peer()
    }
}

impl<I: PeerOf> PeerOf for tokio_rustls::server::TlsStream<I> {
    fn peer(&self) -> Peer {
        self.get_ref().0.peer()
    }
}

/// Serves one HTTP/2 connection to its end.
pub(crate) async fn serve<I>(io: I, socket: &str, ctx: &ConnCtx)
where
    I: AsyncRead + AsyncWrite + PeerOf + Unpin + Send + 'static,
{
    let responses = Arc::new(Responses::new(ctx.counters.clone(), ctx.stall));
    let service = Streams {
        router: ctx.router(socket),
        counters: ctx.counters.clone(),
        responses: responses.clone(),
        peer: io.peer(),
        left: Arc::new(ctx.left.subscribe()),
        close_spread: ctx.close_spread,
        draws: super::closing::connection_draws(),
        streams: std::sync::atomic::AtomicU64::new(0),
    };
    let (back, mut given_back) = oneshot::channel();
    let io = GiveBack {
        io: Some(io),
        back: Some(back),
    };
    let io = HoldShutdownAck::new(Sent::new(io, responses.clone()));
    let mut mode = ctx.mode.clone();
    // `None`: stalled (dropping `conn` closes it).
    let r = {
        let conn = ctx.h2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            r = with_streams(conn.as_mut()) => Some(r),
            _ = responses.stalled() => None,
            _ = leaving(&mut mode) => {
                conn.as_mut().graceful_shutdown();
                tracing::debug!(event = "http2_goaway", "HTTP/2 connection: graceful GOAWAY sent");
                tokio::select! {
                    r = with_streams(conn.as_mut()) => Some(r),
                    _ = responses.stalled() => None,
                }
            }
        }
        // Dropped here: hyper's state goes, and hands the stream back.
    };
    if let (Some(Ok(())), Ok(io)) = (&r, given_back.try_recv()) {
        // hyper has shut the write side down for a graceful end; a second
        // time is harmless.
        Box::pin(linger(io, tokio::time::Instant::now() + LINGER_TIME)).await;
    }
    match r {
        Some(Ok(())) => {}
        Some(Err(e)) => log_error(&ctx.counters, &e),
        None => {
            ctx.counters.totals.http2_stalled();
            let timeout = ctx.stall.timeout.as_secs_f64();
            if let Some(suppressed) = ATTACK_LOG.allow() {
                tracing::info!(
                    event = "http2_stalled",
                    suppressed,
                    "HTTP/2 connection closed: its responses waited {timeout}s on a client \
                     that did not read them ({suppressed} more such lines suppressed)"
                );
            }
        }
    }
}

/// A stream's future, as hyper hands it to its executor: the app's
/// response, then its body sent.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

tokio::task_local! {
    /// The streams hyper started while [`with_streams`] polled its
    /// connection.
    static STARTED: std::cell::RefCell<Vec<StreamFuture>>;
}

/// hyper's executor for HTTP/2 streams: a stream's future is first run in
/// its connection's task ([`with_streams`]), and becomes a task of its own
/// only if it has to wait.
///
/// Spawned at once, each stream was a task that the runtime's other worker
/// could steal, and did: the connection's task and its streams' then took
/// turns across the cores on the lock h2 keeps the connection's state
/// under, and each spawn woke the other worker (a futex and a context
/// switch). Those wake-ups were about a fifth of the server's CPU under
/// `h2load -c 4 -m 8` over TLS (`perf`: `_raw_spin_unlock_irqrestore`,
/// `finish_task_switch`, and `OwnedTasks::bind_inner` for the spawns),
/// where nginx, one process, has none; see docs/src/benchmarks.md. A
/// response the app has at once (most) is now written without leaving the
/// connection's task; one that waits (a slow handler, a streamed body, a
/// client's flow-control window) waits in a task of its own, as before, so
/// a connection's slow streams still run beside each other and on every
/// core.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut fut = Some(Box::pin(fut) as StreamFuture);
        // hyper starts streams only while its connection is polled, which
        // is inside `with_streams`; a task of its own otherwise.
        let _ = STARTED.try_with(|s| s.borrow_mut().extend(fut.take()));
        if let Some(fut) = fut {
            tokio::spawn(fut);
        }
    }
}

/// Polls an HTTP/2 connection, and the streams it starts once each in the
/// same task; a stream that is not done then is spawned (see
/// [`StreamExec`]). Resolves when the connection does.
fn with_streams<C: Future>(mut conn: Pin<&mut C>) -> impl Future<Output = C::Output> + '_ {
    std::future::poll_fn(move |cx| {
        // A stream that is done has given its response to the connection,
        // which then has frames to write: once more round, rather than a
        // wake-up of this task by itself that goes through the runtime.
        for _ in 0..2 {
            let (r, started) = STARTED.sync_scope(Default::default(), || {
                let r = conn.as_mut().poll(cx);
                (r, STARTED.with(|s| std::mem::take(&mut *s.borrow_mut())))
            });
            if r.is_ready() || started.is_empty() {
                return r;
            }
            let mut done = false;
            for mut stream in started {
                // A handler that panics ends its stream (hyper resets it
                // when its future is dropped), not the connection with every
                // other stream on it: what the runtime does with a task that
                // panics. (The panic hook has reported it.)
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    stream.as_mut().poll(cx)
                }));
                match polled {
                    Ok(Poll::Ready(())) | Err(_) => done = true,
                    // A spawned task is polled again at once, which moves
                    // the wake-ups the stream asked for to it.
                    Ok(Poll::Pending) => drop(tokio::spawn(stream)),
                }
            }
            if !done {
                break;
            }
        }
        Poll::Pending
    })
}

/// The connection's stream, handed back to [`serve`] when hyper drops it,
/// for the lingering close.
struct GiveBack<I> {
    /// `None` only once dropped.
    io: Option<I>,
    back: Option<oneshot::Sender<I>>,
}

impl<I> GiveBack<I> {
    fn io(&mut self) -> Pin<&mut I>
    where
        I: Unpin,
    {
        Pin::new(self.io.as_mut().expect("the stream is taken only on drop"))
    }
}

impl<I> Drop for GiveBack<I> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            // (`serve` gone: the stream just closes.)
            let _ = back.send(io);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for GiveBack<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for GiveBack<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// One log line a second at most for connections closed for what their
/// peer did (a protocol error, a stall): an attack opens them by the
/// thousand. The lines held back are counted in the next one.
struct LogGate {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

static ATTACK_LOG: LogGate = LogGate {
    next_ms: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

impl LogGate {
    /// `Some(lines suppressed since the last one)` if a line may go out now.
    fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Counts and logs how an HTTP/2 connection failed. A malformed frame or a
/// protocol violation by the peer is a protocol error (counted); a reset or
/// closed socket is not.
fn log_error(counters: &Counters, e: &hyper::Error) {
    let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
    let protocol = match h2 {
        Some(h) => !h.is_io() && h.reason().is_some_and(|r| r != h2::Reason::NO_ERROR),
        None => e.is_parse(),
    };
    if protocol {
        counters.totals.protocol_error();
        if let Some(suppressed) = ATTACK_LOG.allow() {
            // hyper's own text is only "http2 error".
            let error = h2.map_or_else(|| e.to_string(), ToString::to_string);
            tracing::info!(event = "http2_protocol_error", %error, suppressed,
                "HTTP/2 connection closed: {error} ({suppressed} more such lines suppressed)");
        }
    } else {
        tracing::debug!(event = "connection_error", error = %e);
    }
}

/// The app's router behind one HTTP/2 connection, counting its requests
/// and the responses it holds.
struct Streams {
    router: axum::Router,
    counters: Arc<Counters>,
    responses: Arc<Responses>,
    /// What each request's `ConnectInfo` says.
    peer: Peer,
    /// When the generation left: each request's [`Closing`] waits on it.
    left: Arc<Left>,
    close_spread: std::time::Duration,
    /// This connection's draw of close moments, and its streams so far
    /// (see [`Closing`]).
    draws: u64,
    streams: std::sync::atomic::AtomicU64,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Streams {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let (router, counters) = (self.router.clone(), self.counters.clone());
        let slot = self.responses.admit();
        let stream = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let closing = Closing::new(self.left.clone(), self.close_spread, (self.draws, stream));
        self.peer.add_to(req.extensions_mut(), closing.clone());
        Box::pin(async move {
            let Some(slot) = slot else {
                // Past a bound on held responses: an empty answer, which
                // needs no window and holds nothing.
                counters.totals.http2_refused();
                counters.totals.request(503);
                let resp = Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Body::empty())
                    .expect("a status and an empty body make a response");
                return Ok(resp.map(|b| Tracked::new(b, None)));
            };
            let counted = counters.gauges.request_started();
            let resp = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            counters.totals.request(resp.status().as_u16());
            // In flight until the body is sent, not only its head; a body
            // of unknown length ends at the request's `Closing` moment.
            let body = |b| Tracked::new(Streaming::wrap(b, &closing, counted), Some(slot));
            Ok(resp.map(body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Which task finished each stream.
    type Finished = Arc<Mutex<Vec<(&'static str, Option<tokio::task::Id>)>>>;

    /// A connection as [`with_streams`] sees it: it starts `streams` on its
    /// first poll (as hyper does when their HEADERS arrive) and ends when
    /// polled again, whoever runs the streams.
    fn connection_starting(streams: Vec<StreamFuture>) -> impl Future<Output = ()> {
        let mut streams = Some(streams);
        std::future::poll_fn(move |cx| match streams.take() {
            None => Poll::Ready(()),
            Some(started) => {
                cx.waker().wake_by_ref();
                for stream in started {
                    StreamExec.execute(stream);
                }
                Poll::Pending
            }
        })
    }

    /// Serves a connection that starts `streams`, in a task of its own,
    /// within 10 s; that task's id.
    async fn serve_in_a_task(streams: Vec<StreamFuture>) -> Option<tokio::task::Id> {
        let conn = tokio::spawn(async move {
            with_streams(std::pin::pin!(connection_starting(streams))).await;
            tokio::task::try_id()
        });
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection ends")
            .expect("the connection's task did not panic")
    }

    #[tokio::test]
    async fn a_stream_runs_in_its_connections_task_until_it_has_to_wait() {
        let finished: Finished = Arc::default();
        let (go, wait) = oneshot::channel::<()>();
        let (both, mut both_done) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (f1, f2, b1, b2) = (finished.clone(), finished.clone(), both.clone(), both);
        let conn_id = serve_in_a_task(vec![
            Box::pin(async move {
                f1.lock().unwrap().push(("at once", tokio::task::try_id()));
                let _ = b1.send(());
            }),
            Box::pin(async move {
                let _ = wait.await;
                f2.lock().unwrap().push(("waited", tokio::task::try_id()));
                let _ = b2.send(());
            }),
        ])
        .await;
        // The connection ended; the stream that waits has a task of its own.
        go.send(()).unwrap();
        both_done.recv().await.unwrap();
        both_done.recv().await.unwrap();
        let finished = finished.lock().unwrap().clone();
        assert_eq!(finished[0], ("at once", conn_id), "{finished:?}");
        assert_eq!(finished[1].0, "waited");
        assert!(
            finished[1].1.is_some() && finished[1].1 != conn_id,
            "{finished:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let (tx, rx) = oneshot::channel();
        // The connection and the stream started after the panicking one
        // both go on.
        serve_in_a_task(vec![
            Box::pin(async { panic!("a handler's bug") }),
            Box::pin(async move {
                let _ = tx.send(());
            }),
        ])
        .await;
        rx.await.expect("the other stream ran");
    }

    #[tokio::test]
    async fn a_stream_started_outside_a_connection_gets_a_task() {
        let (tx, rx) = oneshot::channel();
        StreamExec.execute(async move {
            let _ = tx.send(tokio::task::try_id());
        });
        assert!(rx.await.unwrap().is_some());
    }
}
