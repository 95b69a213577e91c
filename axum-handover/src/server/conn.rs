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
//!
//! The same machinery keeps idle connections cheap. hyper keeps an 8 KiB
//! read buffer (and a write buffer) per connection for its whole life; an
//! idle keep-alive connection needs none of it. So a connection that has
//! been idle for [`PARK_AFTER`] is taken back from hyper and *parked*: only
//! the socket and a small task remain, waiting until the socket is
//! readable, and then it gets a new hyper connection. A freshly accepted
//! connection starts parked too. The parked wait applies the same rules as
//! hyper's idle time: the keep-alive timeout, and a drain's idle rule or a
//! move to the successor.
//!
//! When hyper ends a connection itself (`Connection: close`, an error, a
//! request body it did not read), the client may still be sending. Closing
//! a socket with unread input makes the kernel send a reset, which throws
//! away the end of the response still on its way (and the client's stack
//! may drop what it received but has not read). So such a connection has a
//! *lingering close*, as nginx's `lingering_close`: the write side is shut
//! down (the response ends with a FIN), then input is read and discarded
//! until the client closes, for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`]. A connection closed idle has nothing on its way and
//! closes at once, so a drain is not held up by idle connections; so does
//! one whose client asked to close after a request without a body, when no
//! byte of it is left unread ([`quiet_close`]): a connection per request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

use super::closing::{Closing, Left, Peer, Streaming};
use super::detect::{self, Detected};
use super::{ConnCtx, Held, Mode, h2};
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
                // `TCP_NODELAY` as for an accepted one (see `Nagle`); the
                // socket keeps what the previous process set on it.
                Stream::Tcp(TcpStream::from_std(s)?)
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
    activity: IoOf,
    nagle: Nagle,
    /// Kept for the connection's next hyper connection (see `Parked`).
    addr: Option<SocketAddrV4>,
}

/// Whether a TCP connection has `TCP_NODELAY` yet, which it gets before its
/// second write, the way nginx sets it only on a connection that stays.
///
/// A connection's first write is never held back by Nagle's algorithm
/// (Linux holds a short segment only while an earlier short one is
/// unacknowledged), so a connection that writes once, a response and then
/// its close, spares the system call: one of the eight a connection per
/// request cost (nginx: six). Any later write, the next response on a
/// keep-alive connection, the rest of a streamed body or of a response
/// the socket could not take at once, a WebSocket's frames, goes out with
/// `TCP_NODELAY` set, as every write did when it was set at accept. A TLS
/// or HTTP/2 connection, which writes more than once from its start, gets
/// it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nagle {
    /// Nothing written yet in this process.
    Unwritten,
    /// One write: the next one sets `TCP_NODELAY` first.
    WroteOnce,
    /// Set (or not a TCP socket).
    Off,
}

impl Nagle {
    /// Where a connection starts.
    fn new(stream: &Stream) -> Nagle {
        match stream {
            Stream::Tcp(_) => Nagle::Unwritten,
            Stream::Unix(_) => Nagle::Off,
        }
    }
}

impl ConnIo {
    /// Before each write: `TCP_NODELAY` before the second (see [`Nagle`]).
    fn writing(&mut self) {
        match self.nagle {
            Nagle::Off => {}
            Nagle::Unwritten => self.nagle = Nagle::WroteOnce,
            Nagle::WroteOnce => {
                self.stream.no_delay();
                self.nagle = Nagle::Off;
            }
        }
    }
}

/// The connection's [`Activity`], as held by its stream: notes when the
/// stream is dropped, which is how an upgraded connection's end is seen
/// (hyper gives the stream to the app's handler and forgets it).
pub(crate) struct IoOf(pub(crate) Arc<Activity>);

impl std::ops::Deref for IoOf {
    type Target = Activity;
    fn deref(&self) -> &Activity {
        &self.0
    }
}

impl Drop for IoOf {
    fn drop(&mut self) {
        self.0.io_gone.store(true, Ordering::SeqCst);
        self.0.quiet.notify_waiters();
    }
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
            this.activity.read_some();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_some();
        }
        r
    }
}

/// Runs `$e` with `$s` bound to the stream inside, whichever kind it is.
macro_rules! either {
    ($stream:expr, $s:ident => $e:expr) => {
        match $stream {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        either!(self, s => s.is_write_vectored())
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writing();
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    /// Only an upgraded connection's handler shuts the stream down. hyper
    /// would at a connection's end (it runs with upgrades, so not "without
    /// shutdown"), which would end a connection we take back to park or
    /// move, and the lingering close shuts down itself.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.activity.is_upgraded() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writing();
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How long a connection idles in hyper before it is parked. Long enough
/// that a busy keep-alive connection (a client that sends its next request
/// within this) never pays for parking; short enough that idle ones give
/// their buffers back soon.
///
/// It was 500 ms: then a burst of new connections that each sent a request
/// and went quiet (a load balancer's pool, a page's preconnects) held
/// hyper's buffers (~20 KB each: two 8 KiB buffers, the connection's
/// state) all at once for half a second, and the heap that peak left
/// behind, part-used pages and the allocator's own bookkeeping, stayed:
/// 0.99–1.02 KB per used idle connection at 5 000 against 0.87–0.88 with
/// 50 ms (pid-server with short allocator caches, see
/// docs/src/operator/capacity.md). A client that pauses longer than this
/// between requests pays a park and a new hyper connection, a few
/// microseconds, beside the pause it made.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// How long a lingering close reads at most. A client that has its
/// response reads it and closes within a round trip or two; 2 s covers a
/// slow network's retransmits while a leaving generation is held briefly
/// (nginx waits 30 s, but it is not a process that wants to exit).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);

/// How many bytes a lingering close reads at most: the rest of a modest
/// request body or a few pipelined requests. A client that sends more is
/// uploading, not finishing, and gets its reset.
pub(crate) const LINGER_BYTES: usize = 64 * 1024;

/// The lingering close (see the module's doc): shuts down the write side,
/// then reads and discards until the client closes, `deadline` passes or
/// [`LINGER_BYTES`] are read; dropping the stream then closes it. Any
/// stream: a plain one here and under TLS, and HTTP/2's (over TLS too, where
/// the records are read, and dropped, through the session). Callers box it:
/// only a closing connection needs its buffer.
pub(crate) async fn linger<I: AsyncRead + AsyncWrite + Unpin>(
    mut io: I,
    deadline: tokio::time::Instant,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Bounded too: a TLS shutdown writes its close_notify to a client that
    // may read nothing.
    if !matches!(
        tokio::time::timeout_at(deadline, io.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    // Not zeroed: what is read is thrown away, and zeroing 4 KiB for every
    // closing connection was a tenth of the instructions a connection
    // with one request cost (callgrind, `ab` without keep-alive).
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut read = 0;
    while read < LINGER_BYTES {
        let mut window = &mut buf[..];
        match tokio::time::timeout_at(deadline, io.read_buf(&mut window)).await {
            Ok(Ok(n)) if n > 0 => read += n,
            // The client closed (or reset), or time is up.
            _ => return,
        }
    }
}

/// Milliseconds on the monotonic clock, as a cheap shared clock for
/// atomics: every read and every request notes the time, and what reads it
/// (idle rules of half a second and more) needs no better than the coarse
/// clock's tick (1–4 ms, the kernel's jiffy). The coarse clock is a read of
/// the vDSO's last tick, where `Instant::now` (the precise clock) also
/// reads and scales the CPU's counter: its calls were 1.2 % of a keep-alive
/// load's samples, 0.5 % for plain `axum::serve`.
pub(crate) fn now_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE exists on Linux 2.6.32 and later");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}

/// When a connection last did something, and whether a request is running.
/// Also a TLS connection's (`tls.rs`), which never parks or moves.
#[derive(Debug)]
pub(crate) struct Activity {
    busy: AtomicUsize,
    /// Requests begun on this connection, ever.
    requests: AtomicU64,
    last_ms: AtomicU64,
    /// hyper has read bytes while no request ran, and no request has
    /// begun since: it may hold the start of a request head in its buffer.
    head_coming: AtomicBool,
    /// Set once this connection is to close after its current response.
    closing: AtomicBool,
    /// A response switched protocols (101): hyper hands the stream to the
    /// app once the response is written.
    upgraded: AtomicBool,
    /// The stream has been dropped (see [`IoOf`]).
    io_gone: AtomicBool,
    /// A request came with a body, or a response said the connection
    /// closes: when hyper ends the connection, the client may still be
    /// sending (see [`quiet_close`]).
    more_may_come: AtomicBool,
    /// The server's counters, held here so that a request needs no clone
    /// of their (shared) `Arc`: see [`Service::call`].
    counters: Arc<super::Counters>,
    /// Woken when a request ends, and when the stream is dropped.
    quiet: Notify,
    /// The connection's wait on the server's mode was woken (see
    /// [`ModeWait`]); `task` is the task to wake for it.
    mode_woken: AtomicBool,
    task: atomic_waker::AtomicWaker,
}

/// The waker a connection's wait on the server's mode is polled with: it
/// notes that this wait was woken, then wakes the connection's task.
impl std::task::Wake for Activity {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.mode_woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

/// A connection loop's wait on the server's mode (`watch::Receiver::
/// changed()`), polled again only when it was woken, not on every wake of
/// the connection's task.
///
/// A `changed()` that waits takes the channel's lock on every poll (to
/// check for a notification and to keep the waker current), a lock every
/// connection of the server shares; in the loop's `select!` it was polled
/// each time the connection's task was, on every request, so the workers
/// passed that lock's cache line between them twice a request. Here the
/// wait runs with a waker of the connection's own ([`Activity`]'s) and is
/// polled on its first poll, when that waker fired, or when the task's
/// waker is another; otherwise a poll reads a flag.
pub(crate) struct ModeWait<'a, F> {
    wait: Pin<&'a mut F>,
    activity: &'a Arc<Activity>,
    /// The task's waker, once registered with `activity`.
    task: Option<std::task::Waker>,
}

impl<'a, F: Future> ModeWait<'a, F> {
    pub(crate) fn new(wait: Pin<&'a mut F>, activity: &'a Arc<Activity>) -> ModeWait<'a, F> {
        ModeWait {
            wait,
            activity,
            task: None,
        }
    }
}

impl<F: Future> Future for ModeWait<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let activity = this.activity;
        match &this.task {
            Some(task) if task.will_wake(cx.waker()) => {
                // Only a wake of its own can have changed the wait.
                if !activity.mode_woken.load(Ordering::SeqCst) {
                    return Poll::Pending;
                }
            }
            _ => {
                activity.task.register(cx.waker());
                this.task = Some(cx.waker().clone());
            }
        }
        // Cleared before the poll: a wake during it sets the flag again.
        activity.mode_woken.store(false, Ordering::SeqCst);
        let waker = std::task::Waker::from(activity.clone());
        this.wait.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

impl Activity {
    pub(crate) fn new(counters: &Arc<super::Counters>) -> Activity {
        Activity {
            counters: counters.clone(),
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_ms: AtomicU64::new(now_ms()),
            head_coming: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            io_gone: AtomicBool::new(false),
            more_may_come: AtomicBool::new(false),
            quiet: Notify::new(),
            mode_woken: AtomicBool::new(false),
            task: atomic_waker::AtomicWaker::new(),
        }
    }

    /// Requests begun on this connection, ever.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub(crate) fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::SeqCst)
    }

    /// Once the connection is upgraded: counted as such until the app's
    /// handler drops the stream. The connection's task waits here, holding
    /// its slot and its part in the drain, so a leaving generation waits
    /// for it (within the drain timeout: the handler's [`Closing`] comes
    /// first).
    ///
    /// [`Closing`]: crate::Closing
    pub(crate) async fn upgraded_until_dropped(&self, counters: &Arc<super::Counters>) {
        let _counted = counters.gauges.upgrade_started();
        tracing::debug!(event = "connection_upgraded", "connection upgraded");
        loop {
            let dropped = self.quiet.notified();
            if self.io_gone.load(Ordering::SeqCst) {
                return;
            }
            dropped.await;
        }
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn read_some(&self) {
        self.touch();
        // While a request runs, bytes read are its body (or the next
        // request behind it, which hyper parses before anything parks).
        if self.busy.load(Ordering::SeqCst) == 0 {
            self.head_coming.store(true, Ordering::Relaxed);
        }
    }

    /// Whether hyper can be stopped without cutting a request head short:
    /// it has read nothing since its last request began. A request head
    /// still coming in stays with hyper (its header timeout), a first one
    /// or a later one.
    ///
    /// A later one could be taken back (hyper, idle after a response,
    /// stops at once and gives back what it read), but only to come back
    /// to a new hyper connection at once, for which it is a first request:
    /// one hyper cannot give back when a reload moves the connection (it
    /// finishes the head, answers it and closes). With the park 50 ms
    /// after a response, a head that a client sent in two parts a moment
    /// apart was so answered by the old process and its connection closed
    /// (`moves::a_request_head_split_across_the_handover_is_answered`).
    fn parkable(&self) -> bool {
        !self.head_coming.load(Ordering::Relaxed)
    }

    /// A request begins. Its head was just read (which noted the time),
    /// and while it runs the connection is not idle; its end notes the
    /// time again ([`BusyGuard`]).
    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.head_coming.store(false, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.counters.gauges.request_begun();
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
    pub(crate) async fn idle_at_least(&self, limit: Duration) {
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

/// A request in flight: on its connection (busy) and in the server's
/// gauge, until dropped, also when the request is cut.
struct BusyGuard(Arc<Activity>);
impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.counters.gauges.request_ended();
        self.0.quiet.notify_waiters();
    }
}

/// Made once: inserting by `&str` parses and checks the name on every
/// response (~350 of the ~5 400 instructions a request costs over plain
/// `axum::serve`).
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

type Conn = hyper::server::conn::http1::UpgradeableConnection<TokioIo<ConnIo>, Service>;

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

/// Serves one plain connection to its end: parked while idle, with a hyper
/// connection while a request comes in; HTTP/2 instead when its first
/// bytes are the preface. Counts how it ended in `held`.
///
/// This future is the connection's task, allocated once for its whole life
/// and as large as its largest state, so every connection, a parked one
/// included, pays for that state: what only a connection with bytes coming
/// in needs (hyper's connection, the protocol detection, HTTP/2) is boxed
/// in the step that serves them, and the parked wait polls the socket's
/// readiness rather than holding a future for it. (Inline, the HTTP/2 path
/// made every connection's task ~7 KB; see docs/src/operator/capacity.md.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the task"
)]
pub(crate) fn serve(
    mut conn: Parked,
    socket: Arc<str>,
    ctx: Arc<ConnCtx>,
    held: Held,
) -> impl Future<Output = ()> + Send {
    // Not an `async fn`: its arguments would be stored twice in the task,
    // as the future's captures and again as the body's locals (136 bytes
    // of 632, the difference between jemalloc's 768- and 640-byte classes
    // for the whole task). The block below uses the captures themselves.
    async move {
        // Only the connection's first bytes can be the HTTP/2 preface.
        let mut first = true;
        // The last step ended in a move: move before anything else.
        let mut moving = false;
        // No await inside the loop holds a step's outcome: a local that
        // lives across two awaits keeps a slot of its own in every state
        // of the task (72 bytes for `Step`). A connection to close with a
        // linger leaves the loop and lingers after it.
        let (ended, lingering) = loop {
            // Bytes read ahead are a request coming in: no wait.
            if moving || conn.read_ahead.is_empty() {
                let wake = if moving {
                    Wake::Move
                } else {
                    conn.wait(&ctx).await
                };
                moving = false;
                match wake {
                    Wake::Readable => {}
                    Wake::Store => {
                        conn.store(&ctx, &socket);
                        continue;
                    }
                    Wake::Close => break (conn.ended(), None),
                    Wake::Move => match conn.move_out(&socket, &ctx).await {
                        Ok(ended) => break (ended, None),
                        Err(c) => {
                            conn = c;
                            continue;
                        }
                    },
                }
            }
            let fell_back = conn.fell_back;
            let step = Box::pin(active(conn, &socket, &ctx, first)).await;
            first = false;
            let ended = if fell_back {
                Ended::FellBack
            } else {
                Ended::Closed
            };
            match step {
                Step::Done => break (ended, None),
                Step::Close(stream) => break (ended, Some(stream)),
                Step::Park(parts) => conn = Parked::from_parts(parts, fell_back),
                Step::Move(parts) => {
                    conn = Parked::from_parts(parts, false);
                    moving = true;
                }
            }
        };
        if let Some(stream) = lingering {
            // Boxed: only a closing connection needs its buffer.
            let deadline = tokio::time::Instant::now() + LINGER_TIME;
            Box::pin(linger(stream, deadline)).await;
        }
        held.end(ended, &ctx.counters);
    }
}

/// A connection with bytes coming in: on its first bytes, which protocol;
/// then one hyper connection, until it ends or is taken back.
async fn active(conn: Parked, socket: &str, ctx: &ConnCtx, first: bool) -> Step {
    let Parked {
        mut stream,
        read_ahead,
        fell_back,
        addr,
        nagle,
        ..
    } = conn;
    let read_ahead = read_ahead.into_vec();
    let read_ahead = if first {
        match detect::detect(&mut stream, read_ahead, ctx).await {
            Detected::Http1(read) => read,
            Detected::Http2(read) => {
                stream.no_delay();
                // Boxed: hyper's HTTP/1.1 connection, which most steps
                // carry, need not make room for HTTP/2's.
                Box::pin(h2::serve(detect::Rewind::new(stream, read), socket, ctx)).await;
                return Step::Done;
            }
            Detected::Closed => return Step::Done,
        }
    } else {
        read_ahead
    };
    http(
        Parts {
            stream,
            read_ahead,
            idle_since_ms: 0,
            addr,
            nagle,
        },
        socket,
        ctx,
        fell_back,
    )
    .await
}

/// A connection without a hyper connection: the socket, what was read of
/// the next request, and since when it is idle.
pub(crate) struct Parked {
    stream: Stream,
    /// A boxed slice, not a `Vec`: 8 bytes fewer in every connection's
    /// task, room for `addr`. (What is read ahead is seldom more than one
    /// read, taken whole.)
    read_ahead: Box<[u8]>,
    idle_since_ms: u64,
    /// It was to move but could not: served here to the end, closing
    /// after its next response.
    fell_back: bool,
    /// Its number in systemd's file descriptor store while it is kept
    /// there idle (the crash-safe mode); 0: not there.
    stored: u32,
    nagle: Nagle,
    /// Its client's address, when `accept` gave an IPv4 one (see
    /// `NewConn::addr`).
    addr: Option<SocketAddrV4>,
}

/// Why a parked connection stopped waiting.
enum Wake {
    /// Bytes (or the client's FIN) to read.
    Readable,
    /// Idle for as long as the mode allows.
    Close,
    /// Moving: it goes to the successor.
    Move,
    /// Idle long enough to go in systemd's store (the crash-safe mode).
    Store,
}

impl Parked {
    /// A connection that has just arrived, with the bytes read of it.
    pub(crate) fn new(stream: Stream, read_ahead: Vec<u8>, addr: Option<SocketAddrV4>) -> Parked {
        Parked {
            nagle: Nagle::new(&stream),
            stream,
            read_ahead: read_ahead.into_boxed_slice(),
            idle_since_ms: now_ms(),
            fell_back: false,
            stored: 0,
            addr,
        }
    }

    fn from_parts(parts: Parts, fell_back: bool) -> Parked {
        Parked {
            stream: parts.stream,
            read_ahead: parts.read_ahead.into_boxed_slice(),
            idle_since_ms: parts.idle_since_ms,
            fell_back,
            stored: 0,
            nagle: parts.nagle,
            addr: parts.addr,
        }
    }

    fn ended(&self) -> Ended {
        if self.fell_back {
            Ended::FellBack
        } else {
            Ended::Closed
        }
    }

    /// Waits until the socket has bytes (taken into `read_ahead`), the
    /// client's FIN or an error to read, or until it has been idle for as
    /// long as the mode allows: the same limits as [`run`] applies in
    /// hyper.
    ///
    /// Readiness alone is not enough: a just-accepted socket is reported
    /// readable before its client has sent anything, and waking then
    /// boxed the active step (protocol detection and hyper's connection,
    /// ~2.4 KB) for the connection's whole silence, up to the header
    /// timeout: a never-used connection cost 3.4 KB against 1.4 KB for a
    /// used one. So the wait reads what there is, and waits on when it
    /// was nothing.
    ///
    /// In the crash-safe mode a connection idle for `fdstore::STORE_AFTER`
    /// is kept in systemd's store until the wait ends, and taken out
    /// before any byte of its next request is read: a request the process
    /// has begun reading must not be served again by the next one.
    ///
    /// (Every value held across the await below is in every connection's
    /// task: see `serve`. So storing is done there, not here.)
    // Not an `async fn`, which would hold its two references twice (see
    // `serve`).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice in the task"
    )]
    fn wait<'a>(&'a mut self, ctx: &'a ConnCtx) -> impl Future<Output = Wake> + 'a {
        async move {
            loop {
                // Listening before the mode is read: a change after the read
                // wakes us.
                let mut changed = std::pin::pin!(ctx.mode_changed.notified());
                changed.as_mut().enable();
                // In a block: a local still in scope at the await is kept in
                // the task (in debug builds at least).
                let sleep = {
                    let now = *ctx.mode.borrow();
                    let (limit, then) = match now {
                        Mode::Serving => (ctx.keep_alive + Duration::from_secs(1), Wake::Close),
                        Mode::Draining => (ctx.drain_idle, Wake::Close),
                        Mode::Moving if self.fell_back => (ctx.drain_idle, Wake::Close),
                        Mode::Moving => (Duration::ZERO, Wake::Move),
                    };
                    let idle = Duration::from_millis(now_ms().saturating_sub(self.idle_since_ms));
                    let Some(left) = limit.checked_sub(idle).filter(|d| !d.is_zero()) else {
                        self.unstore(ctx);
                        return then;
                    };
                    match self.store_when_idle(ctx, now, idle, left) {
                        Some(d) => tokio::time::sleep(d),
                        None => return Wake::Store,
                    }
                };
                // One poll function rather than `select!`, whose futures and
                // fairness state would be held beside these in every task.
                // The socket first: bytes that came win over a change of mode
                // or the idle rule, which the next round looks at anyway.
                let mut sleep = std::pin::pin!(sleep);
                let read = std::future::poll_fn(|cx| {
                    if self.stream.poll_read_ready(cx).is_ready() {
                        // Out of the store before reading: see above.
                        self.unstore(ctx);
                        // On the stack, not in the task: nothing holds it
                        // across an await. Read through `poll_read`, not
                        // `try_read`: a read shorter than the buffer tells
                        // the runtime the socket is drained, so hyper's
                        // first read waits for the next bytes instead of
                        // asking the kernel (a `recvfrom` that failed with
                        // EAGAIN on every new connection and every wake of
                        // a parked one).
                        let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
                        let mut buf = ReadBuf::uninit(&mut first);
                        match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                            // Bytes, or none: the client's FIN, for hyper
                            // (or the detection) to see and end on.
                            Poll::Ready(Ok(())) => {
                                self.read_ahead =
                                    [&self.read_ahead[..], buf.filled()].concat().into();
                                return Poll::Ready(true);
                            }
                            // An error (a reset): hyper's first read then
                            // finds the connection closed and ends it.
                            Poll::Ready(Err(_)) => return Poll::Ready(true),
                            // Nothing there after all: the runtime waits
                            // for the socket again.
                            Poll::Pending => {}
                        }
                    }
                    if changed.as_mut().poll(cx).is_ready() || sleep.as_mut().poll(cx).is_ready() {
                        // A change of mode, or idle long enough for the store
                        // or for the mode's rule (the next round returns `then`).
                        Poll::Ready(false)
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                if read {
                    return Wake::Readable;
                }
            }
        }
    }

    /// How long to sleep: until the mode's idle rule (`left`) or, in the
    /// crash-safe mode, until idle long enough for the store. `None`: the
    /// connection is to go in the store now.
    fn store_when_idle(
        &self,
        ctx: &ConnCtx,
        now: Mode,
        idle: Duration,
        left: Duration,
    ) -> Option<Duration> {
        if now != Mode::Serving || self.stored != 0 || ctx.while_idle.get().is_none() {
            return Some(left);
        }
        match crate::fdstore::STORE_AFTER.checked_sub(idle) {
            Some(d) if !d.is_zero() => Some(d.min(left)),
            _ => None,
        }
    }

    /// Puts a copy of the connection in systemd's store (the crash-safe
    /// mode). When the store does not take it (no room), it is not asked
    /// again until the connection's next idle spell.
    fn store(&mut self, ctx: &ConnCtx, socket: &str) {
        if let Some(w) = ctx.while_idle.get() {
            self.stored = match w.store(socket, self.stream.as_fd()) {
                0 => crate::fdstore::NOT_TAKEN,
                id => id,
            };
        }
    }

    /// Takes the connection out of systemd's store, if it is there.
    fn unstore(&mut self, ctx: &ConnCtx) {
        if self.stored != 0
            && self.stored != crate::fdstore::NOT_TAKEN
            && let Some(w) = ctx.while_idle.get()
        {
            w.remove(self.stored);
        }
        self.stored = 0;
    }

    /// Sends the connection to the next generation. When it cannot move,
    /// it comes back (`Err`) to be served here to the end; a stream that
    /// cannot be served any more ends as fallen back.
    async fn move_out(self, socket: &str, ctx: &ConnCtx) -> Result<Ended, Parked> {
        // Boxed like hyper's connection: the channel's send is only for the
        // moment of the move.
        let result = Box::pin(move_out(self.stream, socket, &self.read_ahead, ctx)).await;
        let (stream, e) = match result {
            Ok(()) => return Ok(Ended::Moved),
            Err(err) => err,
        };
        // The store's refusals are counted, and said in one line at the
        // end (`Store::send`): a full store may refuse thousands.
        if ctx.store.get().is_none() {
            tracing::warn!(event = "connection_move_failed", error = %e,
                "cannot move a connection to the new process; serving it here until it closes");
        }
        match stream {
            // Served here, with `Connection: close` on the next response,
            // and counted.
            Some(stream) => Err(Parked {
                stream,
                read_ahead: self.read_ahead,
                idle_since_ms: self.idle_since_ms,
                fell_back: true,
                stored: 0,
                nagle: self.nagle,
                addr: self.addr,
            }),
            None => Ok(Ended::FellBack),
        }
    }
}

impl Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        either!(self, s => s.as_fd())
    }

    /// Ready once there are bytes (or the client's FIN, or an error) to
    /// read. A poll function rather than `readable()`: the waker waits in
    /// the socket's registration, so a parked task carries no future for it.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_read_ready(cx))
    }

    /// Reads what the socket has without waiting (`WouldBlock` when it has
    /// nothing, which also clears the readiness seen).
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        either!(self, s => s.try_read(buf))
    }

    /// Sets `TCP_NODELAY` (see [`Nagle`]); a failure only leaves Nagle's
    /// algorithm on.
    pub(crate) fn no_delay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

/// One hyper connection on the stream (`conn`'s idle time unused), until
/// it ends or is taken back.
async fn http(conn: Parts, socket: &str, ctx: &ConnCtx, fell_back: bool) -> Step {
    let activity = Arc::new(Activity::new(&ctx.counters));
    if fell_back {
        activity.closing.store(true, Ordering::SeqCst);
    }
    let peer = Peer::accepted(conn.addr, &conn.stream);
    let io = ConnIo {
        stream: conn.stream,
        read_ahead: conn.read_ahead,
        served: 0,
        activity: IoOf(activity.clone()),
        nagle: conn.nagle,
        addr: conn.addr,
    };
    let conn = ctx
        .http
        .serve_connection(
            TokioIo::new(io),
            service(ctx, socket, &activity, Leaving::Moves, peer),
        )
        .with_upgrades();
    run(conn, &activity, ctx, fell_back).await
}

/// The app's router behind one HTTP/1.1 connection, counting its requests
/// and saying on each response whether the connection stays.
///
/// A request clones nothing that other connections share: each such
/// clone is an atomic increment (and a decrement at its end) on a cache
/// line the other cores write too, about a dozen per request before (a
/// small part of what the library cost beside plain `axum::serve`, about
/// 0.1 µs; hyper's header timer was the large one, see `timer`). So the
/// router is this connection's own copy, called in place (axum's router
/// is always ready); the counters are reached through the connection's
/// [`Activity`]; [`Closing`] shares the connection's receiver; the
/// `Keep-Alive` value is static.
pub(crate) struct Service {
    router: std::cell::RefCell<axum::Router>,
    activity: Arc<Activity>,
    keep_alive: HeaderValue,
    leaving: Leaving,
    peer: Peer,
    left: Arc<Left>,
    close_spread: Duration,
    /// This connection's draw of close moments (see [`Closing`]).
    draws: u64,
}

/// What the connection does when the generation leaves, which decides when
/// its responses say `Connection: close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leaving {
    /// It moves to the successor (a plain connection): only a drain, or a
    /// connection that could not move, closes it.
    Moves,
    /// It cannot move (TLS): it closes whether the generation drains or
    /// hands over; the client opens its next one to the new process.
    Closes,
}

pub(crate) fn service(
    ctx: &ConnCtx,
    socket: &str,
    activity: &Arc<Activity>,
    leaving: Leaving,
    peer: Peer,
) -> Service {
    Service {
        router: std::cell::RefCell::new(ctx.router(socket)),
        activity: activity.clone(),
        keep_alive: ctx.keep_alive_header.clone(),
        leaving,
        peer,
        left: Arc::new(ctx.left.subscribe()),
        close_spread: ctx.close_spread,
        draws: super::closing::connection_draws(),
    }
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let busy = self.activity.begin();
        if !hyper::body::Body::is_end_stream(req.body()) {
            self.activity.more_may_come.store(true, Ordering::Relaxed);
        }
        let draw = (self.draws, busy.0.requests());
        let closing = Closing::new(self.left.clone(), self.close_spread, draw);
        self.peer.add_to(req.extensions_mut(), closing.clone());
        let after = After {
            busy,
            keep_alive: self.keep_alive.clone(),
            leaving: self.leaving,
            closing,
        };
        // Called without `poll_ready`: axum's router is always ready.
        let routed = tower::Service::call(&mut *self.router.borrow_mut(), req.map(Body::new));
        ResponseFuture {
            routed,
            after: Some(after),
        }
    }
}

/// A request's response on its way: the app's router, then what the
/// connection adds to the response. Not boxed (a box per request, and the
/// copy into it, was a measurable part of what the library adds to one),
/// and `Unpin`, so the connection can be taken back from hyper.
pub(crate) struct ResponseFuture {
    routed: <axum::Router as tower::Service<Request<Body>>>::Future,
    /// Taken when the router answers.
    after: Option<After>,
}

/// What a response gets once the router has it, and what the request
/// holds until its body is sent.
struct After {
    busy: BusyGuard,
    keep_alive: HeaderValue,
    leaving: Leaving,
    closing: Closing,
}

impl Future for ResponseFuture {
    type Output = Result<axum::response::Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = match std::task::ready!(Pin::new(&mut self.routed).poll(cx)) {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let after = self
            .after
            .take()
            .expect("a response future is polled to its end once");
        Poll::Ready(Ok(after.respond(resp)))
    }
}

impl After {
    fn respond(self, resp: axum::response::Response) -> axum::response::Response {
        let After {
            busy,
            keep_alive,
            leaving,
            closing,
        } = self;
        let activity = &*busy.0;
        let counters = &activity.counters;
        counters.totals.request(resp.status().as_u16());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Before hyper writes the response and hands the stream
            // over: from then on a shutdown is the app's.
            activity.upgraded.store(true, Ordering::SeqCst);
        }
        let close = match leaving {
            Leaving::Moves => counters.phase.closes_responses(),
            Leaving::Closes => counters.phase.is_leaving(),
        } || activity.closing.load(Ordering::SeqCst);
        if close {
            activity.more_may_come.store(true, Ordering::Relaxed);
        }
        // In flight until the body is sent, not only its head.
        let mut resp = resp.map(|b| Streaming::wrap(b, &closing, busy));
        if close {
            // The client opens its next connection elsewhere (to the
            // successor, or waits in the socket's queue).
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else {
            resp.headers_mut().insert(KEEP_ALIVE.clone(), keep_alive);
        }
        resp
    }
}

/// A connection taken back from hyper.
struct Parts {
    stream: Stream,
    read_ahead: Vec<u8>,
    idle_since_ms: u64,
    addr: Option<SocketAddrV4>,
    nagle: Nagle,
}

enum Step {
    /// Closed (by the client, by the idle rules, or HTTP/2's end).
    Done,
    /// Ended by hyper with input possibly still coming: to close lingering.
    Close(Stream),
    /// Idle: to wait, parked, for its next request.
    Park(Parts),
    /// To go to the successor.
    Move(Parts),
}

/// Drives hyper until the connection ends, or until it is idle for as long
/// as the current mode allows; then shuts it down gracefully and takes it
/// back: to park it (serving), or to move it (moving). A drain closes it.
async fn run(mut conn: Conn, activity: &Arc<Activity>, ctx: &ConnCtx, fell_back: bool) -> Step {
    let mut mode = ctx.mode.clone();
    loop {
        let now = *mode.borrow_and_update();
        // Both capped at the header timeout (see `timer`), so that the
        // check below never finds a wait that is over but too short.
        let keep_alive = super::timer::idle_limit(
            ctx.keep_alive + Duration::from_secs(1),
            ctx.header_read_timeout,
        );
        let limit = match now {
            Mode::Serving if activity.parkable() => PARK_AFTER,
            // A first request head still coming in: hyper's header timeout
            // and, as before parking, the keep-alive timeout.
            Mode::Serving => keep_alive,
            Mode::Draining => ctx.drain_idle,
            Mode::Moving if fell_back => ctx.drain_idle,
            Mode::Moving => Duration::ZERO,
        };
        let limit = super::timer::idle_limit(limit, ctx.header_read_timeout);
        let changed = std::pin::pin!(mode.changed());
        tokio::select! {
            r = Pin::new(&mut conn) => {
                if let Err(e) = &r {
                    tracing::debug!(event = "connection_error", error = %e);
                }
                return match conn.into_parts() {
                    Some(parts) => {
                        let io = parts.io.into_inner();
                        let nothing_left = r.is_ok()
                            && parts.read_buf.is_empty()
                            && io.served == io.read_ahead.len()
                            && !activity.more_may_come.load(Ordering::Relaxed);
                        quiet_close(io.stream, nothing_left)
                    }
                    None => {
                        activity.upgraded_until_dropped(&ctx.counters).await;
                        Step::Done
                    }
                };
            }
            _ = ModeWait::new(changed, activity) => continue,
            _ = activity.idle_at_least(limit) => {}
        }
        let park = now == Mode::Serving;
        if park && !activity.parkable() && activity.idle_for() < Some(keep_alive) {
            // A request's head began in the meantime: look again.
            continue;
        }
        // Idle long enough. hyper stops a connection with no request in
        // progress at once; a request that began in the meantime finishes
        // (its response then says `Connection: close`).
        let begun = activity.requests.load(Ordering::SeqCst);
        Pin::new(&mut conn).graceful_shutdown();
        let r = (&mut conn).await;
        let answered = activity.requests.load(Ordering::SeqCst) != begun;
        let Some(parts) = conn.into_parts() else {
            // A request that began meanwhile upgraded the connection.
            activity.upgraded_until_dropped(&ctx.counters).await;
            return Step::Done;
        };
        let movable = (park || (now == Mode::Moving && !fell_back)) && r.is_ok() && !answered;
        if !movable {
            // Idle, nothing is on its way: closed at once. A request that
            // began meanwhile was answered with `Connection: close`, and
            // the client may have sent more behind it.
            return if answered || r.is_err() {
                Step::Close(parts.io.into_inner().stream)
            } else {
                Step::Done
            };
        }
        let io = parts.io.into_inner();
        // What hyper read and did not parse comes first, then what it had
        // not yet taken from the bytes handed to us. Copied out, so hyper's
        // read buffer (which `read_buf` would keep alive) is freed now.
        let mut read_ahead = parts.read_buf.to_vec();
        read_ahead.extend_from_slice(&io.read_ahead[io.served..]);
        let parts = Parts {
            stream: io.stream,
            read_ahead,
            idle_since_ms: activity.last_ms.load(Ordering::Relaxed),
            addr: io.addr,
            nagle: io.nagle,
        };
        return if park {
            Step::Park(parts)
        } else {
            Step::Move(parts)
        };
    }
}

/// How a connection hyper has ended closes: at once when nothing more can
/// be coming (`nothing_left`: the client asked to close, or closed, after
/// a request without a body, and neither hyper nor the kernel holds a byte
/// of it unread); otherwise with a lingering close.
///
/// The test is nginx's (`lingering_close on`): linger when a body may be
/// on its way, when the server is the one closing (a drain: the client
/// may have sent its next request already), or when input is waiting. A
/// client that says `Connection: close` and sends more all the same is
/// broken; one whose extra bytes arrive after the check gets a reset. A
/// connection per request (`ab`, health checks, HTTP/1.0 clients) so
/// saves a wake-up of its task, a timer and two system calls (`shutdown`,
/// the read that saw the FIN): waiting for the client's FIN cost about a
/// tenth of what such a connection costs (see docs/src/benchmarks.md).
fn quiet_close(stream: Stream, nothing_left: bool) -> Step {
    if !nothing_left {
        return Step::Close(stream);
    }
    // hyper has written its response; dropping the stream closes. The read
    // is nginx's `rev->ready`: no system call unless the runtime saw input
    // arrive since hyper's last read came back empty.
    match stream.try_read(&mut [0u8; 64]) {
        // Bytes after all: discard them, and what follows, lingering.
        Ok(n) if n > 0 => Step::Close(stream),
        // Nothing there (`WouldBlock`), the client's FIN, or a reset.
        _ => Step::Done,
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
    if let Some(store) = ctx.store.get() {
        let (kind, fd) = stream.into_fd().map_err(|e| (None, e))?;
        return match store.put(socket, fd, read_ahead) {
            Ok(()) => Ok(()),
            Err((fd, why)) => Err((
                Stream::from_fd(kind, fd).ok(),
                io::Error::other(why.reason()),
            )),
        };
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn no_delay(io: &ConnIo) -> bool {
        match &io.stream {
            Stream::Tcp(s) => s.nodelay().unwrap(),
            Stream::Unix(_) => unreachable!("a TCP connection"),
        }
    }

    /// `TCP_NODELAY` comes before a connection's second write, whichever
    /// way hyper writes (vectored, or not), and a connection that parked
    /// after one write sets it before its next one; a connection that
    /// writes once never pays for it.
    #[tokio::test]
    async fn a_connection_gets_no_delay_before_its_second_write() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let counters = Arc::new(super::super::Counters::default());
        let conn_io = |stream, nagle| ConnIo {
            stream,
            read_ahead: Vec::new(),
            served: 0,
            activity: IoOf(Arc::new(Activity::new(&counters))),
            nagle,
            addr: None,
        };
        let stream = Stream::Tcp(s);
        let nagle = Nagle::new(&stream);
        let mut io = conn_io(stream, nagle);
        assert!(!no_delay(&io), "set at accept");
        let one = [io::IoSlice::new(b"o"), io::IoSlice::new(b"ne")];
        assert_eq!(io.write_vectored(&one).await.unwrap(), 3);
        assert!(!no_delay(&io), "set before the first write");
        io.write_all(b"two").await.unwrap();
        assert!(no_delay(&io), "not set before the second write");
        let mut got = [0; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");

        // Parked after one write (its state kept in `Parts`), then woken:
        // set before its next write.
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut io = conn_io(Stream::Tcp(s), Nagle::Unwritten);
        io.write_all(b"one").await.unwrap();
        let mut io = conn_io(io.stream, io.nagle);
        assert!(!no_delay(&io));
        let two = [io::IoSlice::new(b"two")];
        assert_eq!(io.write_vectored(&two).await.unwrap(), 3);
        assert!(no_delay(&io), "not set before the first write after a park");
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");
    }

    /// A pending future that counts its polls and keeps the last waker.
    struct Counting {
        polls: usize,
        waker: Option<std::task::Waker>,
        ready: bool,
    }

    impl Future for Counting {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            self.waker = Some(cx.waker().clone());
            if self.ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Counts the wakes of a task.
    #[derive(Default)]
    struct Task(AtomicUsize);
    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The wait on the server's mode is polled on its first poll, after a
    /// wake of its own (which wakes the task) and when the task's waker
    /// changes; the task's other wakes (every request) leave it alone.
    #[test]
    fn a_mode_wait_is_polled_only_when_it_was_woken() {
        let counters = Arc::new(super::super::Counters::default());
        let activity = Arc::new(Activity::new(&counters));
        let task = Arc::new(Task::default());
        let waker = std::task::Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut inner = std::pin::pin!(Counting {
            polls: 0,
            waker: None,
            ready: false
        });
        {
            let mut wait = ModeWait::new(inner.as_mut(), &activity);
            for _ in 0..5 {
                assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
            }
        }
        assert_eq!(inner.polls, 1, "polled on every poll of the task");
        let mut wait = ModeWait::new(inner.as_mut(), &activity);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        for _ in 0..3 {
            assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        }
        drop(wait);
        assert_eq!(
            inner.polls, 2,
            "a new wait polls at once, then waits for its wake"
        );
        // Its own wake: the task is woken, and the next poll polls it.
        let own = inner.waker.take().unwrap();
        let mut wait = ModeWait::new(inner.as_mut(), &activity);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        own.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was not woken");
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        // Another task's waker: polled again, with the wait's own waker.
        let other = std::task::Waker::from(Arc::new(Task::default()));
        assert!(
            Pin::new(&mut wait)
                .poll(&mut Context::from_waker(&other))
                .is_pending()
        );
        drop(wait);
        assert_eq!(inner.polls, 5);
        // Ready when the inner future is.
        own.wake_by_ref();
        inner.ready = true;
        let mut wait = ModeWait::new(inner.as_mut(), &activity);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
    }
}
