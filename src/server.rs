//! Accepting connections, serving HTTP/1.1 on them, and draining.
//!
//! A drain goes in this order, so that no client sees a failure it could not
//! have avoided:
//! 1. every response from now on carries `Connection: close`, and `/readyz`
//!    says 503;
//! 2. the accept loops stop and drop their sockets (a handover's successor
//!    holds the same sockets and keeps accepting);
//! 3. a connection is closed only once it has no request in progress and has
//!    been idle for the grace period: closing an idle keep-alive connection
//!    races with the client sending its next request on it, and the grace
//!    makes that race need a client that was silent for the whole grace and
//!    then spoke in the very same instant;
//! 4. past the drain timeout what is left is cut and counted.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use tower::ServiceExt;

use crate::app::{self, Shared};
use crate::listeners::{Listener, Socketish};

/// How a server serves and drains.
#[derive(Debug, Clone)]
pub struct Config {
    pub drain_timeout: Duration,
    pub idle_grace: Duration,
    pub max_connections: usize,
    /// A client has this long to send a request's headers.
    pub header_read_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            drain_timeout: Duration::from_secs(30),
            idle_grace: Duration::from_millis(500),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The largest request head we buffer (request line and headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    pub elapsed: Duration,
    /// Requests still running at the drain timeout, cut when we exit.
    pub cut_requests: usize,
    /// Connections still open at the drain timeout.
    pub cut_connections: usize,
}

impl DrainReport {
    pub fn timed_out(&self) -> bool {
        self.cut_connections > 0 || self.cut_requests > 0
    }
}

/// A running server: accept loops and connection tasks on the current
/// runtime.
pub struct Server {
    shared: Arc<Shared>,
    config: Config,
    stop_accepting: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    /// Every accept loop and connection task holds a clone; when the last one
    /// is dropped, `all_done` yields `None`.
    done: Option<mpsc::Sender<()>>,
    all_done: mpsc::Receiver<()>,
    drain_started: Option<Instant>,
}

/// Serves `listeners` until `shutdown` resolves, then drains. The in-process
/// entry point for tests; the daemon drives [`Server`] itself.
pub async fn run(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<DrainReport> {
    let server = Server::start(listeners, shared, config)?;
    shutdown.await;
    Ok(server.drain().await)
}

impl Server {
    /// Starts one accept loop per socket. When this returns, every socket is
    /// being accepted from: the moment to tell systemd `READY=1`.
    pub fn start(
        listeners: Vec<Listener>,
        shared: Arc<Shared>,
        config: Config,
    ) -> io::Result<Self> {
        let (stop_accepting, _) = watch::channel(false);
        let (draining, _) = watch::channel(false);
        let (done, all_done) = mpsc::channel(1);
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let ctx = Arc::new(ConnCtx {
            shared: shared.clone(),
            router: app::router(shared.clone()),
            draining: draining.subscribe(),
            idle_grace: config.idle_grace,
            http: {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(config.header_read_timeout)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .keep_alive(true);
                b
            },
        });
        for l in listeners {
            let stop = stop_accepting.subscribe();
            let (ctx, slots, done) = (ctx.clone(), slots.clone(), done.clone());
            match l.socket {
                Socketish::Tcp(s) => {
                    let l = TcpListener::from_std(s)?;
                    tokio::spawn(accept_loop(Tcp(l), stop, slots, ctx, done));
                }
                Socketish::Unix(s) => {
                    let l = UnixListener::from_std(s)?;
                    tokio::spawn(accept_loop(Unix(l), stop, slots, ctx, done));
                }
            }
        }
        Ok(Server {
            shared,
            config,
            stop_accepting,
            draining,
            done: Some(done),
            all_done,
            drain_started: None,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// timeout, closes idle connections after their grace, and reports.
    pub async fn drain(mut self) -> DrainReport {
        self.begin_drain();
        self.finish_drain().await
    }

    /// The first half of a drain: from here on responses say `Connection:
    /// close`, `/readyz` is 503, and no connection is accepted.
    pub fn begin_drain(&mut self) {
        if self.drain_started.is_some() {
            return;
        }
        self.drain_started = Some(Instant::now());
        // Order matters: responses say `Connection: close` before any
        // connection can notice the drain.
        self.shared.set_draining();
        let _ = self.draining.send(true);
        let _ = self.stop_accepting.send(true);
        drop(self.done.take());
    }

    /// Waits, within the drain timeout, until every connection has closed.
    pub async fn finish_drain(mut self) -> DrainReport {
        self.begin_drain();
        let started = self.drain_started.unwrap_or_else(Instant::now);
        let left = self.config.drain_timeout.saturating_sub(started.elapsed());
        let finished = tokio::time::timeout(left, self.all_done.recv())
            .await
            .is_ok();
        let (cut_requests, cut_connections) = if finished {
            (0, 0)
        } else {
            (self.shared.in_flight(), self.shared.connections())
        };
        DrainReport {
            elapsed: started.elapsed(),
            cut_requests,
            cut_connections,
        }
    }
}

struct ConnCtx {
    shared: Arc<Shared>,
    router: axum::Router,
    draining: watch::Receiver<bool>,
    idle_grace: Duration,
    http: hyper::server::conn::http1::Builder,
}

/// A listening socket of either kind, so one accept loop serves both.
enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}
use AnyListener::{Tcp, Unix};

async fn accept_loop(
    listener: AnyListener,
    mut stop: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    ctx: Arc<ConnCtx>,
    done: mpsc::Sender<()>,
) {
    loop {
        // Wait for a free slot before accepting: over the cap, connections
        // wait in the kernel's queue rather than being accepted and dropped.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                // Small responses; don't wait for Nagle.
                let _ = s.set_nodelay(true);
                spawn_conn(s, ctx.clone(), permit, done.clone());
            }
            Ok(Accepted::Unix(s)) => spawn_conn(s, ctx.clone(), permit, done.clone()),
            Err(e) => {
                // Out of fds or memory, or a connection reset before we took
                // it: keep serving the others, and don't spin.
                tracing::warn!(event = "accept_error", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Dropping `listener` here closes this process's descriptor; a successor
    // that shares the socket keeps it open and keeps accepting.
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &AnyListener) -> io::Result<Accepted> {
    match l {
        Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn spawn_conn<IO>(
    io: IO,
    ctx: Arc<ConnCtx>,
    permit: tokio::sync::OwnedSemaphorePermit,
    done: mpsc::Sender<()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let _done = done;
        let _counted = ctx.shared.connection_opened();
        serve_conn(io, &ctx).await;
    });
}

async fn serve_conn<IO>(io: IO, ctx: &ConnCtx)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let svc = {
        let (router, shared, activity) = (ctx.router.clone(), ctx.shared.clone(), activity.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (router, shared, activity) = (router.clone(), shared.clone(), activity.clone());
            async move {
                let _busy = activity.begin();
                let _counted = shared.request_started();
                let mut resp = match router.oneshot(req.map(Body::new)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if shared.is_draining() {
                    // The client opens its next connection elsewhere (to
                    // the successor, or waits in the socket's queue).
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let conn = ctx.http.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = ctx.draining.clone();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(event = "connection_error", error = %e);
            }
            return;
        }
        _ = idle_after_drain(&activity, &mut draining, ctx.idle_grace) => {}
    }
    // Idle past the grace while draining: close it. hyper closes an idle
    // connection at once and lets a request that just began finish.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Resolves once a drain has begun and the connection has had no request in
/// progress for `grace`.
async fn idle_after_drain(
    activity: &Activity,
    draining: &mut watch::Receiver<bool>,
    grace: Duration,
) {
    let _ = draining.wait_for(|d| *d).await;
    loop {
        let wait = match activity.idle_for() {
            Some(idle) if idle >= grace => return,
            Some(idle) => grace - idle,
            // A request is in progress; its response says `Connection:
            // close`, so the connection usually ends by itself.
            None => grace.min(Duration::from_millis(50)),
        };
        tokio::time::sleep(wait).await;
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
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
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
}

struct BusyGuard(Arc<Activity>);
impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection's stream, noting when bytes arrive: a request whose
/// first bytes are in flight is activity, even before hyper has parsed it.
struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
