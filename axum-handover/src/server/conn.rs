//! One connection: HTTP/1.1 on it, when it counts as idle, and how it ends:
//! closed by the client, closed idle, or taken back from hyper between two
//! requests and moved to the next generation.
//!
//! Taking a connection back relies on hyper's `graceful_shutdown()` on a
//! connection with no request in progress: hyper then stops without writing
//! or closing anything, and `into_parts()` returns the socket and the bytes
//! it had read but not parsed (the start of the client's next request, or
//! pipelined requests). Those bytes travel with the fd; bytes still in the
//! kernel's buffer travel with the socket itself.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tower::ServiceExt;

use super::{ConnCtx, Mode};
use crate::handover::channel::Kind;

/// A client connection of either kind.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The socket as a plain fd (deregistered from the runtime), to send.
    fn into_fd(self) -> io::Result<(Kind, OwnedFd)> {
        Ok(match self {
            Stream::Tcp(s) => (Kind::Tcp, OwnedFd::from(s.into_std()?)),
            Stream::Unix(s) => (Kind::Unix, OwnedFd::from(s.into_std()?)),
        })
    }

    /// A connection that arrived from the previous generation.
    pub(crate) fn from_fd(kind: Kind, fd: OwnedFd) -> io::Result<Stream> {
        Ok(match kind {
            Kind::Tcp => {
                let s = std::net::TcpStream::from(fd);
                s.set_nonblocking(true)?;
                let s = TcpStream::from_std(s)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Kind::Unix => {
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(true)?;
                Stream::Unix(UnixStream::from_std(s)?)
            }
        })
    }
}

/// The connection's stream, with bytes read ahead by a previous generation
/// (served first), noting when bytes arrive: a request whose first bytes
/// are in flight is activity, even before hyper has parsed it.
struct ConnIo {
    stream: Stream,
    read_ahead: Vec<u8>,
    served: usize,
    activity: Arc<Activity>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.served < this.read_ahead.len() {
            let n = buf.remaining().min(this.read_ahead.len() - this.served);
            buf.put_slice(&this.read_ahead[this.served..this.served + n]);
            this.served += n;
            this.activity.touch();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = match &mut this.stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.stream {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// Milliseconds since the first use, as a cheap shared clock for atomics.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// When a connection last did something, and whether a request is running.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    /// Requests begun on this connection, ever.
    requests: AtomicU64,
    last_ms: AtomicU64,
    /// Set once this connection is to close after its current response.
    closing: AtomicBool,
    /// Woken when a request ends.
    quiet: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_ms: AtomicU64::new(now_ms()),
            closing: AtomicBool::new(false),
            quiet: Notify::new(),
        }
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.touch();
        BusyGuard(self.clone())
    }

    /// `None` while a request runs; otherwise how long since the last byte
    /// in or the last response.
    fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }

    /// Resolves once no request has run on the connection for `limit`
    /// (at once for zero, as soon as no request runs).
    async fn idle_at_least(&self, limit: Duration) {
        loop {
            let quiet = self.quiet.notified();
            match self.idle_for() {
                Some(idle) if idle >= limit => return,
                Some(idle) => tokio::time::sleep(limit - idle).await,
                None => quiet.await,
            }
        }
    }
}

struct BusyGuard(Arc<Activity>);
impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.quiet.notify_waiters();
    }
}

type Conn = hyper::server::conn::http1::Connection<TokioIo<ConnIo>, Service>;
type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

/// How a connection ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client closed it, or it was closed idle or after a response.
    Closed,
    /// It went to the next generation.
    Moved,
    /// It was to move but could not, and was served to the end here.
    FellBack,
}

/// Serves one connection to its end.
pub(crate) async fn serve(
    stream: Stream,
    read_ahead: Vec<u8>,
    socket: Arc<str>,
    ctx: &ConnCtx,
) -> Ended {
    let mut stream = stream;
    let mut read_ahead = read_ahead;
    let mut fell_back = false;
    loop {
        let activity = Arc::new(Activity::new());
        if fell_back {
            activity.closing.store(true, Ordering::SeqCst);
        }
        let io = ConnIo {
            stream,
            read_ahead,
            served: 0,
            activity: activity.clone(),
        };
        let conn = ctx
            .http
            .serve_connection(TokioIo::new(io), service(ctx, &socket, &activity));
        match run(conn, &activity, ctx, fell_back).await {
            Step::Done if fell_back => return Ended::FellBack,
            Step::Done => return Ended::Closed,
            Step::Move(parts) => {
                let ahead = parts.read_ahead;
                match move_out(parts.stream, &socket, &ahead, ctx).await {
                    Ok(()) => return Ended::Moved,
                    Err((s, e)) => {
                        tracing::warn!(event = "connection_move_failed", error = %e,
                            "cannot move a connection to the new process; serving it here until it closes");
                        // Serve it here, with `Connection: close` on the next
                        // response, and count it.
                        let Some(s) = s else { return Ended::FellBack };
                        stream = s;
                        read_ahead = ahead;
                        fell_back = true;
                    }
                }
            }
        }
    }
}

/// The app's router behind one connection, counting its requests and
/// saying on each response whether the connection stays.
struct Service {
    router: axum::Router,
    counters: Arc<super::Counters>,
    activity: Arc<Activity>,
    keep_alive: HeaderValue,
}

fn service(ctx: &ConnCtx, socket: &str, activity: &Arc<Activity>) -> Service {
    Service {
        router: ctx.router(socket),
        counters: ctx.counters.clone(),
        activity: activity.clone(),
        keep_alive: HeaderValue::from_str(&format!("timeout={}", ctx.keep_alive.as_secs()))
            .expect("a number is a valid header value"),
    }
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = axum::response::Response;
    type Error = Infallible;
    // Boxed, so the connection is `Unpin` and can be taken back from hyper.
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        let (router, counters, activity, keep_alive) = (
            self.router.clone(),
            self.counters.clone(),
            self.activity.clone(),
            self.keep_alive.clone(),
        );
        Box::pin(async move {
            let _busy = activity.begin();
            let _counted = counters.request_started();
            let mut resp = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            counters.totals.request(resp.status().as_u16());
            if counters.is_draining() || activity.closing.load(Ordering::SeqCst) {
                // The client opens its next connection elsewhere (to the
                // successor, or waits in the socket's queue).
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            } else {
                resp.headers_mut().insert("keep-alive", keep_alive);
            }
            Ok(resp)
        })
    }
}

/// A connection taken back from hyper.
struct Parts {
    stream: Stream,
    read_ahead: Vec<u8>,
}

enum Step {
    Done,
    Move(Parts),
}

/// Drives hyper until the connection ends, or until it is idle for as long
/// as the current mode allows; then shuts it down gracefully and, when the
/// mode is "moving", takes it back.
async fn run(mut conn: Conn, activity: &Activity, ctx: &ConnCtx, fell_back: bool) -> Step {
    let mut mode = ctx.mode.clone();
    loop {
        let now = *mode.borrow_and_update();
        let limit = match now {
            Mode::Serving => ctx.keep_alive + Duration::from_secs(1),
            Mode::Draining => ctx.drain_idle,
            Mode::Moving if fell_back => ctx.drain_idle,
            Mode::Moving => Duration::ZERO,
        };
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = r {
                    tracing::debug!(event = "connection_error", error = %e);
                }
                return Step::Done;
            }
            _ = mode.changed() => continue,
            _ = activity.idle_at_least(limit) => {}
        }
        // Idle long enough. hyper closes a connection with no request in
        // progress at once; a request that began in the meantime finishes
        // (its response then says `Connection: close`).
        let begun = activity.requests.load(Ordering::SeqCst);
        Pin::new(&mut conn).graceful_shutdown();
        let r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
        let movable = matches!(now, Mode::Moving)
            && !fell_back
            && r.is_ok()
            && activity.requests.load(Ordering::SeqCst) == begun;
        if !movable {
            return Step::Done;
        }
        let parts = conn.into_parts();
        let io = parts.io.into_inner();
        // What hyper read and did not parse comes first, then what it had
        // not yet taken from the bytes handed to us.
        let mut read_ahead = parts.read_buf.to_vec();
        read_ahead.extend_from_slice(&io.read_ahead[io.served..]);
        return Step::Move(Parts {
            stream: io.stream,
            read_ahead,
        });
    }
}

/// Sends the connection to the next generation. On failure the stream is
/// given back, when it still can be served here.
async fn move_out(
    stream: Stream,
    socket: &str,
    read_ahead: &[u8],
    ctx: &ConnCtx,
) -> Result<(), (Option<Stream>, io::Error)> {
    let Some(channel) = ctx.successor.get() else {
        let e = io::Error::other("the new process takes no connections");
        return Err((Some(stream), e));
    };
    let (kind, fd) = stream.into_fd().map_err(|e| (None, e))?;
    match channel.send(kind, socket, fd.as_fd(), read_ahead).await {
        Ok(()) => Ok(()),
        Err(e) => Err((Stream::from_fd(kind, fd).ok(), e)),
    }
}
