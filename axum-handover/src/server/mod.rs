//! Accepting connections, serving the app's router on them, and how a
//! generation lets go of them: moved to its successor, or drained.
//!
//! After a handover to a successor that takes connections ("moving"):
//! 1. the accept loops stop (the successor accepts from the same sockets);
//! 2. each connection, as soon as no request is in progress on it, is taken
//!    back from hyper and sent to the successor with the bytes read ahead;
//!    responses carry no `Connection: close`, so clients keep their
//!    connections and notice nothing but the new process answering;
//! 3. what cannot move (the successor refuses or dies) is served here to
//!    the end as in a drain, and counted.
//!
//! A drain (a stop, or a successor that takes no connections) goes in this
//! order, so that no client sees a failure it could not have avoided:
//! 1. every response from now on carries `Connection: close`, and the
//!    generation reports itself draining;
//! 2. the accept loops stop and drop their sockets (a handover's successor
//!    holds the same sockets and keeps accepting);
//! 3. a connection is closed only once it has no request in progress and has
//!    been idle for the keep-alive timeout advertised to clients
//!    (`Keep-Alive: timeout=N`, plus a second): closing an idle keep-alive
//!    connection races with the client sending its next request on it;
//! 4. past the drain timeout what is left is cut and counted.
//!
//! HTTP/2 (`h2c` detected from a plain connection's first bytes, or `h2`
//! by ALPN) and TLS connections cannot move: their state lives in the
//! process. Whether the generation moves or drains, they drain here (see
//! `h2` and `tls`), within the same drain timeout.

/// `AsyncWrite` for a wrapper that changes only what is read: every write
/// goes to its field `$field` as it is.
macro_rules! write_through {
    ($ty:ty, $field:ident $(, $g:ident)?) => {
        impl$(<$g: tokio::io::AsyncWrite + Unpin>)? tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
        }
    };
}

mod ack;
mod closing;
mod conn;
mod detect;
mod h2;
mod stall;
mod timer;
mod tls;

use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};

pub use closing::Closing;
pub(crate) use conn::Stream;

use crate::Config;
use crate::handover::channel::{Connections, Message};
use crate::listeners::{Listener, Socketish};

/// What a long-lived exchange has, at least, between its [`Closing`] and
/// the drain bound: time for a WebSocket's close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The largest request head we buffer (request line and headers).
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What a generation's server shares with every connection task and with
/// the app ([`crate::Info`]), in parts that change for different reasons:
/// where the server is in its life, what it holds now, how its leaving
/// went, and what outlives it (the totals a successor carries on, the TLS
/// session-ticket keys).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Where the server is in its life, as the connections read it.
    pub(crate) phase: Phase,
    /// What this process holds now.
    pub(crate) gauges: Arc<Gauges>,
    /// How the connections a leaving process let go of went.
    pub(crate) moves: Moves,
    /// What survives a reload.
    pub(crate) totals: Arc<crate::metrics::Totals>,
    /// The session-ticket keys, which survive a reload too (feature
    /// `tls-tickets`).
    pub(crate) tickets: Arc<crate::tls::Ticketer>,
}

/// Where the server is in its life, as the connections read it.
#[derive(Debug, Default)]
pub(crate) struct Phase {
    /// Readiness is off: the generation is leaving (drain or move).
    leaving: AtomicBool,
    /// Responses say `Connection: close`: a drain without a successor.
    close_responses: AtomicBool,
}

impl Phase {
    pub(crate) fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// Whether a drain without a successor has begun: not the same as
    /// [`crate::Info::is_draining`], which a handover turns on too.
    fn closes_responses(&self) -> bool {
        self.close_responses.load(Ordering::SeqCst)
    }

    fn begin_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    fn begin_closing_responses(&self) {
        self.close_responses.store(true, Ordering::SeqCst);
    }
}

/// What this process holds now. The first three count themselves down
/// through a guard ([`Counted`]), also when a request is cut.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    in_flight: AtomicUsize,
    connections: AtomicUsize,
    /// Connections upgraded (WebSockets), open in this process.
    upgraded: AtomicUsize,
    /// HTTP/2 responses held by every connection (see `stall`).
    pub(crate) http2_held: AtomicUsize,
    /// Idle connections in systemd's file descriptor store (the crash-safe
    /// mode, `fdstore::WhileIdle`).
    pub(crate) fd_store_held: AtomicUsize,
}

impl Gauges {
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn upgraded(&self) -> usize {
        self.upgraded.load(Ordering::SeqCst)
    }

    pub(crate) fn http2_held(&self) -> usize {
        self.http2_held.load(Ordering::SeqCst)
    }

    fn upgrade_started(self: &Arc<Self>) -> Counted {
        self.upgraded.fetch_add(1, Ordering::SeqCst);
        Counted(self.clone(), Which::Upgraded)
    }

    fn request_started(self: &Arc<Self>) -> Counted {
        self.request_begun();
        Counted(self.clone(), Which::Request)
    }

    /// A request begins, counted down by [`Gauges::request_ended`]: for a
    /// guard that holds the gauges already (a plain connection's, which
    /// then needs no `Counted` and no clone of this shared `Arc`).
    fn request_begun(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn connection_opened(self: &Arc<Self>) -> Counted {
        self.connections.fetch_add(1, Ordering::SeqCst);
        Counted(self.clone(), Which::Connection)
    }
}

/// How the connections a leaving process let go of went: moved to the
/// successor, or served to the end here when they could not move.
#[derive(Debug, Default)]
pub(crate) struct Moves {
    moved: AtomicUsize,
    fell_back: AtomicUsize,
}

enum Which {
    Request,
    Connection,
    Upgraded,
}

/// Decrements its gauge on drop, also when a request is cut.
struct Counted(Arc<Gauges>, Which);

impl Drop for Counted {
    fn drop(&mut self) {
        let c = match self.1 {
            Which::Request => &self.0.in_flight,
            Which::Connection => &self.0.connections,
            Which::Upgraded => &self.0.upgraded,
        };
        c.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the server is doing with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serving,
    /// Idle connections close after the drain's idle wait.
    Draining,
    /// Idle connections go to the successor.
    Moving,
}

/// What every connection task shares.
struct ConnCtx {
    /// Each listening socket's routes, by name (the first serves a moved
    /// connection whose socket this generation does not have).
    routers: Vec<(Arc<str>, axum::Router)>,
    counters: Arc<Counters>,
    http: hyper::server::conn::http1::Builder,
    mode: watch::Receiver<Mode>,
    /// Woken when `mode` changes: what a parked connection waits on, as
    /// its future is smaller than a `watch::Receiver::changed()`'s.
    mode_changed: tokio::sync::Notify,
    /// Advertised to clients; an idle connection closes a second later.
    keep_alive: Duration,
    /// `Keep-Alive: timeout=N`, made once.
    keep_alive_header: axum::http::HeaderValue,
    /// How long a drain lets a connection sit idle.
    drain_idle: Duration,
    /// When the generation left (see [`Closing`]).
    left: watch::Sender<Option<tokio::time::Instant>>,
    /// The window over which long-lived exchanges are told to end.
    close_spread: Duration,
    /// Where connections go once moving.
    successor: OnceLock<Connections>,
    /// Or, at a stop, where they wait for the next start: systemd's file
    /// descriptor store.
    store: OnceLock<Arc<crate::fdstore::Store>>,
    /// The crash-safe mode: idle connections kept in the store while idle.
    while_idle: OnceLock<crate::fdstore::WhileIdle>,
    /// HTTP/2 is served (prior knowledge on plain sockets, ALPN on TLS).
    http2: bool,
    h2: h2::Builder,
    /// What HTTP/2 responses may hold, and the stall timeout.
    stall: stall::Limits,
    /// How long a plain connection may take to decide its protocol.
    header_read_timeout: Duration,
    tls_handshake_timeout: Duration,
}

/// Connection slots: the clients' (`max_connections`), and those of the
/// sockets with a budget of their own.
#[derive(Clone)]
struct Slots {
    clients: Arc<Semaphore>,
    own: Vec<(Arc<str>, Arc<Semaphore>)>,
}

impl Slots {
    /// The slots a connection on the socket `name` takes.
    fn of(&self, name: &str) -> Arc<Semaphore> {
        self.own
            .iter()
            .find(|(n, _)| &**n == name)
            .map_or(&self.clients, |(_, s)| s)
            .clone()
    }
}

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DrainReport {
    pub(crate) elapsed: Duration,
    /// Requests still running at the drain timeout, cut when we exit.
    pub(crate) cut_requests: usize,
    /// Connections still open at the drain timeout.
    pub(crate) cut_connections: usize,
    /// Connections moved to the successor.
    pub(crate) moved: usize,
    /// Connections that were to move but were served here to the end.
    pub(crate) fell_back: usize,
}

impl DrainReport {
    pub(crate) fn timed_out(&self) -> bool {
        self.cut_connections > 0 || self.cut_requests > 0
    }
}

/// A running server: accept loops and connection tasks on the current
/// runtime.
pub(crate) struct Server {
    counters: Arc<Counters>,
    ctx: Arc<ConnCtx>,
    slots: Slots,
    drain_timeout: Duration,
    stop_accepting: watch::Sender<bool>,
    mode: watch::Sender<Mode>,
    /// Every accept loop and connection task holds a clone; when the last one
    /// is dropped, `all_done` yields `None`.
    done: Option<mpsc::Sender<()>>,
    all_done: mpsc::Receiver<()>,
    drain_started: Option<Instant>,
}

impl Server {
    /// Starts one accept loop per socket. When this returns, every socket is
    /// being accepted from: the moment to tell systemd `READY=1`.
    pub(crate) fn start(
        listeners: Vec<Listener>,
        routes: &dyn Fn(&str) -> axum::Router,
        counters: Arc<Counters>,
        config: &Config,
    ) -> io::Result<Self> {
        let (stop_accepting, _) = watch::channel(false);
        let (mode, mode_rx) = watch::channel(Mode::Serving);
        let (done, all_done) = mpsc::channel(1);
        let slots = Slots::new(config);
        let routers = listeners
            .iter()
            .map(|l| (Arc::from(l.name.as_str()), routes(&l.name)))
            .collect();
        let ctx = Arc::new(ConnCtx::new(config, routers, counters.clone(), mode_rx));
        for l in listeners {
            let tls = tls_acceptor(config, &l.name, &counters);
            let stop = stop_accepting.subscribe();
            let (ctx, done) = (ctx.clone(), done.clone());
            let slots = slots.of(&l.name);
            let name: Arc<str> = Arc::from(l.name.as_str());
            let l = match l.socket {
                Socketish::Tcp(s) => AnyListener::Tcp(TcpListener::from_std(s)?),
                Socketish::Unix(s) => AnyListener::Unix(UnixListener::from_std(s)?),
            };
            tokio::spawn(accept_loop(l, name, tls, stop, slots, ctx, done));
        }
        Ok(Server {
            counters,
            ctx,
            slots,
            drain_timeout: config.drain_timeout,
            stop_accepting,
            mode,
            done: Some(done),
            all_done,
            drain_started: None,
        })
    }

    /// Serves the connections the previous generation moves to us, as if we
    /// had accepted them (each takes a connection slot), until it closes the
    /// channel (it does when it exits) or we drain.
    ///
    /// Also once we hand over ourselves (a reload that came before the
    /// previous generation was done): a connection that arrives then moves
    /// on to our successor. Closing the channel instead would close the
    /// connections queued in it and make the previous generation's next
    /// sends fail. A generation that hands over therefore exits only after
    /// the one before it (within its drain timeout), since this task holds a
    /// `done` sender. A drain (a stop) ends the adoption.
    pub(crate) fn adopt(&self, channel: Connections) {
        let Some(done) = self.done.clone() else {
            return;
        };
        let (ctx, slots) = (self.ctx.clone(), self.slots.clone());
        let mut mode = self.mode.subscribe();
        tokio::spawn(async move {
            let mut adopted = 0usize;
            loop {
                let got = tokio::select! {
                    r = channel.recv() => r,
                    // A drain (a stop) ends the adoption: the previous
                    // generation may be waiting for us to exit (a stop
                    // before it committed the handover), and it serves
                    // what it could not send. Moving does not end it.
                    _ = mode.wait_for(|m| *m == Mode::Draining) => break,
                };
                let received = match got {
                    Ok(Some(Ok(Message::Connection(r)))) => r,
                    Ok(Some(Ok(Message::Counters(c)))) => {
                        ctx.counters.totals.carry_over(c);
                        continue;
                    }
                    Ok(Some(Ok(Message::TlsTickets(keys)))) => {
                        // The keys themselves are never logged.
                        tracing::debug!(
                            event = "tls_tickets_taken",
                            keys = keys.len(),
                            "took the previous generation's session-ticket keys"
                        );
                        ctx.counters.tickets.import(keys);
                        continue;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(bad))) => {
                        tracing::warn!(event = "connection_refused", reason = %bad,
                            "a message on the connection channel {bad}; ignored");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(event = "connection_channel_failed", error = %e,
                            "the connection channel failed: {e}");
                        break;
                    }
                };
                let socket = ctx.socket(&received.socket);
                let Ok(permit) = slots.of(&socket).acquire_owned().await else {
                    break;
                };
                match Stream::from_fd(received.kind, received.fd) {
                    Ok(s) => {
                        adopted += 1;
                        let conn = NewConn {
                            stream: s,
                            read_ahead: received.read_ahead,
                            socket,
                            addr: None,
                        };
                        // Always plain: TLS connections never move.
                        spawn_conn(conn, None, ctx.clone(), Some(permit), done.clone());
                    }
                    Err(e) => {
                        tracing::warn!(event = "connection_refused", error = %e,
                            "cannot serve a moved connection: {e}");
                    }
                }
            }
            tracing::info!(
                event = "connections_adopted",
                connections = adopted,
                "took {adopted} connections from the previous generation"
            );
        });
    }

    /// Serves the connections systemd kept in its file descriptor store
    /// over a restart, as if we had accepted them (each takes a connection
    /// slot). Returns how many.
    pub(crate) fn adopt_stored(&self, stored: Vec<crate::listeners::Stored>) -> usize {
        let Some(done) = self.done.clone() else {
            return 0;
        };
        let count = stored.len();
        if count == 0 {
            return 0;
        }
        let (ctx, slots) = (self.ctx.clone(), self.slots.clone());
        tokio::spawn(async move {
            for c in stored {
                let socket = ctx.socket(&c.socket);
                let Ok(permit) = slots.of(&socket).acquire_owned().await else {
                    break;
                };
                match Stream::from_fd(c.kind, c.fd) {
                    Ok(s) => {
                        // Always plain: only plain connections are stored.
                        let conn = NewConn::plain(s, socket, None);
                        spawn_conn(conn, None, ctx.clone(), Some(permit), done.clone());
                    }
                    Err(e) => {
                        tracing::warn!(event = "connection_refused", error = %e,
                            "cannot serve a connection from the file descriptor store: {e}");
                    }
                }
            }
        });
        count
    }

    /// Starts a drain: from here on responses say `Connection: close`, the
    /// generation reports itself leaving, and no connection is accepted.
    pub(crate) fn begin_drain(&mut self) {
        if self.drain_started.is_some() {
            return;
        }
        // Order matters: responses say `Connection: close` before any
        // connection can notice the drain.
        self.counters.phase.begin_closing_responses();
        self.leave(Mode::Draining);
    }

    /// Starts moving every connection to the successor on `channel`.
    pub(crate) fn begin_move(&mut self, channel: Connections) {
        if self.drain_started.is_some() {
            return;
        }
        let _ = self.ctx.successor.set(channel);
        self.leave(Mode::Moving);
    }

    /// From now on, connections idle for `fdstore::STORE_AFTER` are kept
    /// in systemd's file descriptor store until they wake (a crash then
    /// loses only what was in progress).
    pub(crate) fn keep_while_idle(&self, w: crate::fdstore::WhileIdle) {
        let _ = self.ctx.while_idle.set(w);
    }

    /// A stop that keeps the idle connections: each goes to `store` (or,
    /// when it has no room, is served here to the end) as it would move to
    /// a successor.
    pub(crate) fn begin_store(&mut self, store: Arc<crate::fdstore::Store>) {
        if self.drain_started.is_some() {
            return;
        }
        let _ = self.ctx.store.set(store);
        self.leave(Mode::Moving);
    }

    fn leave(&mut self, mode: Mode) {
        self.drain_started = Some(Instant::now());
        self.ctx
            .left
            .send_replace(Some(tokio::time::Instant::now()));
        self.counters.phase.begin_leaving();
        let _ = self.mode.send(mode);
        self.ctx.mode_changed.notify_waiters();
        let _ = self.stop_accepting.send(true);
        drop(self.done.take());
    }

    /// Keeps the successor's channel without moving connections on it
    /// (for the counters).
    pub(crate) fn keep_successor(&mut self, channel: Connections) {
        let _ = self.ctx.successor.set(channel);
    }

    /// The successor's channel, once moving.
    pub(crate) fn successor(&self) -> Option<&Connections> {
        self.ctx.successor.get()
    }

    /// How many connections moved and fell back so far.
    pub(crate) fn moves(&self) -> (usize, usize) {
        (
            self.counters.moves.moved.load(Ordering::SeqCst),
            self.counters.moves.fell_back.load(Ordering::SeqCst),
        )
    }

    /// Waits, within the drain timeout, until every connection has closed or
    /// moved.
    pub(crate) async fn finish_drain(&mut self) -> DrainReport {
        self.begin_drain();
        let started = self.drain_started.unwrap_or_else(Instant::now);
        let left = self.drain_timeout.saturating_sub(started.elapsed());
        let finished = tokio::time::timeout(left, self.all_done.recv())
            .await
            .is_ok();
        let (cut_requests, cut_connections) = if finished {
            (0, 0)
        } else {
            (
                self.counters.gauges.in_flight(),
                self.counters.gauges.connections(),
            )
        };
        let (moved, fell_back) = self.moves();
        DrainReport {
            elapsed: started.elapsed(),
            cut_requests,
            cut_connections,
            moved,
            fell_back,
        }
    }
}

impl ConnCtx {
    /// The socket of ours with that name, or our first.
    fn socket(&self, name: &str) -> Arc<str> {
        self.routers
            .iter()
            .find(|(n, _)| &**n == name)
            .or(self.routers.first())
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| Arc::from(name))
    }

    /// The routes of the socket with that name, or of our first.
    fn router(&self, name: &str) -> axum::Router {
        self.routers
            .iter()
            .find(|(n, _)| &**n == name)
            .or(self.routers.first())
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }
}

/// A listening socket of either kind, so one accept loop serves both.
enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl AnyListener {
    /// A connection already in the kernel's queue, without waiting: one
    /// `accept4` on the (non-blocking) socket. Not through tokio's
    /// readiness, which may not have seen a connection that just arrived.
    fn accept_queued(&self) -> io::Result<Option<(Stream, Option<SocketAddrV4>)>> {
        let sock = match self {
            AnyListener::Tcp(l) => socket2::SockRef::from(l),
            AnyListener::Unix(l) => socket2::SockRef::from(l),
        };
        let (s, addr) = match sock.accept() {
            Ok((s, a)) => (s, a.as_socket_ipv4()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        s.set_nonblocking(true)?;
        Ok(Some(match self {
            AnyListener::Tcp(_) => (
                Stream::Tcp(tokio::net::TcpStream::from_std(s.into())?),
                addr,
            ),
            AnyListener::Unix(_) => (
                Stream::Unix(tokio::net::UnixStream::from_std(s.into())?),
                None,
            ),
        }))
    }

    /// The next connection, with its client's address when it is IPv4
    /// (see [`NewConn::addr`]). `TCP_NODELAY` is not set here but before a
    /// connection's second write (see `conn::Nagle`): a connection that
    /// writes once, a response and its close, spares the system call.
    async fn accept(&self) -> io::Result<(Stream, Option<SocketAddrV4>)> {
        match self {
            AnyListener::Tcp(l) => l.accept().await.map(|(s, a)| {
                let addr = match a {
                    std::net::SocketAddr::V4(a) => Some(a),
                    std::net::SocketAddr::V6(_) => None,
                };
                (Stream::Tcp(s), addr)
            }),
            AnyListener::Unix(l) => l.accept().await.map(|(s, _)| (Stream::Unix(s), None)),
        }
    }
}

async fn accept_loop(
    listener: AnyListener,
    socket: Arc<str>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    ctx: Arc<ConnCtx>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((s, addr)) => {
                // Take a slot after accepting, not before: a loop waiting
                // for a client must not sit on a slot that a moved
                // connection (`adopt`) or another socket's loop needs. With
                // one slot left, a loop holding it while idle starved the
                // moved connections whose clients were waiting for an
                // answer, and no new client came to free it. Over the cap,
                // this connection waits here, unserved, and further ones
                // wait in the kernel's queue, since this loop accepts no
                // more until a slot frees. A stop (a move or a drain)
                // serves it without a slot: it is moved or answered with
                // `Connection: close`, not left to be reset at exit.
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|s| *s) => None,
                };
                let conn = NewConn::plain(s, socket.clone(), addr);
                spawn_conn(conn, tls.clone(), ctx.clone(), permit, done.clone());
            }
            Err(e) => accept_failed(&socket, &e).await,
        }
    }
    // Closing the last descriptor of a listening socket resets the
    // connections queued on it: a client that connected a moment before a
    // stop would have its request reset rather than answered or refused.
    // So what is queued is taken first, and served like any connection
    // accepted during a stop (moved, or answered with `Connection: close`).
    // With a successor sharing the socket, it would have accepted them.
    for _ in 0..QUEUED_AT_STOP {
        match listener.accept_queued() {
            Ok(Some((s, addr))) => {
                let conn = NewConn::plain(s, socket.clone(), addr);
                spawn_conn(conn, tls.clone(), ctx.clone(), None, done.clone());
            }
            Ok(None) => break,
            // Reset by its client before we took it: the next one.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                log_accept_error(&socket, &e);
                break;
            }
        }
    }
    // Dropping `listener` here closes this process's descriptor; a successor
    // that shares the socket keeps it open and keeps accepting.
}

/// At most this many queued connections are taken when an accept loop
/// stops: Linux's default `net.core.somaxconn`, a full queue.
const QUEUED_AT_STOP: usize = 4096;

/// How long an accept loop pauses after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// After a failed accept on `socket` (out of fds or memory, or a connection
/// reset before we took it): says so and pauses, so the loop keeps serving
/// the others and does not spin while the condition lasts (a loop that
/// retried at once took a core and 7 600 `accept4` calls a second while
/// out of fds). The HTTP and the control sockets' loops both call it.
pub(crate) async fn accept_failed(socket: &str, e: &std::io::Error) {
    log_accept_error(socket, e);
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// The journal's line for a failed accept on `socket`.
fn log_accept_error(socket: &str, e: &std::io::Error) {
    tracing::warn!(event = "accept_error", socket, error = %e, "accept failed");
}

/// A connection to serve.
struct NewConn {
    stream: Stream,
    /// The bytes read ahead of it (by a previous generation).
    read_ahead: Vec<u8>,
    /// The name of the socket it came in on.
    socket: Arc<str>,
    /// Its client's address as `accept` gave it, so that its requests'
    /// `ConnectInfo` needs no `getpeername` (a system call on every
    /// connection, and again on every wake of a parked one). Only an IPv4
    /// address is kept: this rides in every connection's task for its
    /// whole life, 8 bytes where a `SocketAddr` would take 32 and push the
    /// task past its allocation class. An IPv6 client's, or a moved
    /// connection's, is asked of the kernel as before.
    addr: Option<SocketAddrV4>,
}

impl NewConn {
    /// A connection with nothing read ahead of it.
    fn plain(stream: Stream, socket: Arc<str>, addr: Option<SocketAddrV4>) -> NewConn {
        NewConn {
            stream,
            read_ahead: Vec::new(),
            socket,
            addr,
        }
    }
}

fn spawn_conn(
    NewConn {
        stream,
        read_ahead,
        socket,
        addr,
    }: NewConn,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<ConnCtx>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    done: mpsc::Sender<()>,
) {
    let held = Held {
        _permit: permit,
        _done: done,
        _counted: ctx.counters.gauges.connection_opened(),
    };
    // TLS: HTTP/2 or HTTP/1.1 by ALPN, to the end (it never moves).
    // Plain: `conn::serve` is the task itself, not wrapped in an `async`
    // block, which would hold a second copy of its arguments; see there.
    match tls {
        Some(acceptor) => {
            tokio::spawn(async move {
                tls::serve(stream, addr, &socket, acceptor, &ctx).await;
                held.end(conn::Ended::Closed, &ctx.counters);
            });
        }
        None => {
            let parked = conn::Parked::new(stream, read_ahead, addr);
            tokio::spawn(conn::serve(parked, socket, ctx, held));
        }
    }
}

impl ConnCtx {
    /// What every connection reads, from the configuration: hyper's
    /// settings, the idle rules, HTTP/2's limits; the successor and the
    /// store are set later, when a reload or a stop comes.
    fn new(
        config: &Config,
        routers: Vec<(Arc<str>, axum::Router)>,
        counters: Arc<Counters>,
        mode: watch::Receiver<Mode>,
    ) -> ConnCtx {
        ConnCtx {
            routers,
            counters,
            http: {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(timer::HeadTimer)
                    .header_read_timeout(config.header_read_timeout)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .keep_alive(true);
                b
            },
            mode,
            mode_changed: tokio::sync::Notify::new(),
            keep_alive: config.keep_alive(),
            // Static, so that a response's copy is not a count on a
            // shared buffer (an atomic operation every core writes). One
            // short string per server, leaked: a process makes one.
            keep_alive_header: axum::http::HeaderValue::from_static(Box::leak(
                format!("timeout={}", config.keep_alive().as_secs()).into_boxed_str(),
            )),
            drain_idle: config.drain_idle(),
            left: watch::channel(None).0,
            // Every exchange is asked to end before the drain bound cuts it.
            close_spread: config
                .close_spread
                .min(config.drain_timeout.saturating_sub(CLOSE_GRACE)),
            successor: OnceLock::new(),
            store: OnceLock::new(),
            while_idle: OnceLock::new(),
            http2: config.http2,
            h2: h2::builder(config),
            stall: stall::Limits {
                timeout: config.http2_stall_timeout,
                per_connection: config.http2_max_held_per_connection,
                total: config.http2_max_held,
            },
            header_read_timeout: config.header_read_timeout,
            tls_handshake_timeout: config.tls_handshake_timeout,
        }
    }
}

impl Slots {
    /// The clients' slots (`max_connections`) and each socket's own.
    fn new(config: &Config) -> Slots {
        Slots {
            clients: Arc::new(Semaphore::new(config.max_connections)),
            own: config
                .own_budgets
                .iter()
                .map(|(name, n)| (Arc::from(name.as_str()), Arc::new(Semaphore::new(*n))))
                .collect(),
        }
    }
}

/// The TLS acceptor of a socket configured for TLS: its certificate, the
/// shared session-ticket keys, and ALPN without h2 when HTTP/2 is off.
fn tls_acceptor(
    config: &Config,
    socket: &str,
    counters: &Counters,
) -> Option<tokio_rustls::TlsAcceptor> {
    config.tls_for(socket).map(|t| {
        let mut c = t.server_config(counters.tickets.clone());
        if !config.http2 {
            Arc::make_mut(&mut c)
                .alpn_protocols
                .retain(|p| p != crate::tls::ALPN_H2);
        }
        tokio_rustls::TlsAcceptor::from(c)
    })
}

/// What a connection's task holds until it ends: its slot, its part in
/// the server's `done`, its place in the open-connections gauge.
pub(crate) struct Held {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _done: mpsc::Sender<()>,
    _counted: Counted,
}

impl Held {
    /// Counts how the connection ended, and lets go of what it held.
    pub(crate) fn end(self, ended: conn::Ended, counters: &Counters) {
        let counter = match ended {
            conn::Ended::Closed => return,
            conn::Ended::Moved => &counters.moves.moved,
            conn::Ended::FellBack => &counters.moves.fell_back,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every plain connection's task, parked or not, is allocated at this
    /// size for its whole life (the HTTP/2 path inline once made it ~7 KB
    /// per idle connection). 400 bytes in a release build, 408 in a debug
    /// one: with tokio's 104 bytes of header, trailer, scheduler and stage,
    /// at most 512, one of jemalloc's size classes (it was 632, in the
    /// 768-byte class).
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let counters = Arc::new(Counters::default());
        let config = crate::Config::new("sizes");
        let no_routes = |_: &str| axum::Router::new();
        let server = Server::start(Vec::new(), &no_routes, counters.clone(), &config).unwrap();
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let held = Held {
            _permit: None,
            _done: server.done.clone().unwrap(),
            _counted: counters.gauges.connection_opened(),
        };
        let parked = conn::Parked::new(Stream::Unix(a), Vec::new(), None);
        let task = conn::serve(parked, Arc::from("http"), server.ctx.clone(), held);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 408,
            "a connection's task takes {size} bytes: with tokio's 104 bytes of header, \
             trailer, scheduler and stage, past jemalloc's 512-byte class (at 10 000 idle \
             connections, 1.25 MB or more)"
        );
    }

    /// Bytes this thread has allocated and not freed: what the tasks of a
    /// current-thread runtime hold, whatever other tests do meanwhile.
    mod live {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
        }

        pub(super) fn bytes() -> isize {
            LIVE.with(Cell::get)
        }

        fn add(n: isize) {
            // Not during a thread's teardown, when the slot is gone.
            let _ = LIVE.try_with(|c| c.set(c.get() + n));
        }

        struct Counting;

        // SAFETY: every call goes to `System` as it came; the count is a
        // side note that allocates nothing.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                add(layout.size() as isize);
                // SAFETY: the caller's layout, as `GlobalAlloc` requires.
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                add(-(layout.size() as isize));
                // SAFETY: `ptr` came from `alloc` with this layout.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;
    }

    /// A server on one socket bound to a free loopback port, and its address.
    fn on_loopback(
        routes: &dyn Fn(&str) -> axum::Router,
        counters: &Arc<Counters>,
        config: &crate::Config,
    ) -> (Server, std::net::SocketAddr) {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = Listener {
            socket: Socketish::Tcp(socket),
            name: "http".to_string(),
            origin: crate::listeners::Origin::Bound,
        };
        let server = Server::start(vec![listener], routes, counters.clone(), config).unwrap();
        (server, addr)
    }

    /// A connection whose client has sent nothing holds its task and its
    /// socket's registration, nothing more: a just-accepted socket is
    /// reported readable before any byte comes, and waking on that once
    /// held the protocol detection and hyper's connection (~2.4 KB) until
    /// the header timeout. In a debug build: 3 526 bytes per silent
    /// connection before the parked wait read what there was, 1 030 after,
    /// 770 with the task in the 512-byte class.
    #[tokio::test]
    async fn a_silent_connection_holds_only_its_task() {
        const N: usize = 40;
        let counters = Arc::new(Counters::default());
        let config = crate::Config::new("silent").header_read_timeout(Duration::from_secs(600));
        let routes = |_: &str| axum::Router::new();
        let (_server, addr) = on_loopback(&routes, &counters, &config);
        // Until `counters` shows `open` connections, and then until the
        // server's tasks have had their wake-ups (a bounded settle: nothing
        // signals that a task has nothing more to do).
        let settle = async |open: usize| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while counters.gauges.connections() < open {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{open} connections not accepted within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for _ in 0..25 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        // Blocking connects: a std socket allocates nothing on this thread.
        // The first absorbs what the accept loop allocates once.
        let mut clients = vec![std::net::TcpStream::connect(addr).unwrap()];
        settle(1).await;
        let before = live::bytes();
        for _ in 0..N {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
        }
        settle(N + 1).await;
        let per = (live::bytes() - before) / N as isize;
        assert!(
            per <= 800,
            "a connection that has sent nothing holds {per} bytes (its task and its \
             registration are 768)"
        );
        drop(clients);
    }

    /// A connection that was served and is idle holds what a silent one
    /// holds, once parked: hyper's buffers and state (21 KB a connection
    /// while it is hyper's, in a debug build) are freed, nothing of the
    /// request stays: 774 bytes each, like a silent one.
    #[tokio::test]
    async fn a_used_idle_connection_holds_only_its_task_once_parked() {
        const N: usize = 40;
        let counters = Arc::new(Counters::default());
        let config = crate::Config::new("used")
            .header_read_timeout(Duration::from_secs(600))
            .keep_alive_timeout(Duration::from_secs(600));
        let routes =
            |_: &str| axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let (_server, addr) = on_loopback(&routes, &counters, &config);
        // Clients on a thread of their own (this thread's allocations are
        // the server's): each sends one request, reads the answer and
        // stays open.
        let clients = async |n: usize| {
            let t = std::thread::spawn(move || {
                use std::io::{Read, Write};
                (0..n)
                    .map(|_| {
                        let mut c = std::net::TcpStream::connect(addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
                        let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
                        while !got.ends_with(b"hi") {
                            let k = c.read(&mut buf).unwrap();
                            assert!(k > 0, "closed before the answer");
                            got.extend_from_slice(&buf[..k]);
                        }
                        c
                    })
                    .collect::<Vec<_>>()
            });
            while !t.is_finished() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            t.join().unwrap()
        };
        // The first absorbs what the accept loop and hyper allocate once;
        // counted from when it is parked (hyper's state freed).
        let _first = clients(1).await;
        let served = live::bytes();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while live::bytes() > served - 4096 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first connection was not parked within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = live::bytes();
        let clients = clients(N).await;
        // Parked after `conn::PARK_AFTER` idle; nothing signals it but the
        // bytes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut per = (live::bytes() - before) / N as isize;
        while per > 800 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            per = (live::bytes() - before) / N as isize;
        }
        assert!(
            per <= 800,
            "a used idle connection holds {per} bytes after parking (its task and its \
             registration are 768)"
        );
        drop(clients);
    }

    #[test]
    fn guards_count_down_on_drop() {
        let c = Arc::new(Gauges::default());
        let a = c.request_started();
        let b = c.connection_opened();
        assert_eq!((c.in_flight(), c.connections()), (1, 1));
        drop(a);
        drop(b);
        assert_eq!((c.in_flight(), c.connections()), (0, 0));
    }
}
