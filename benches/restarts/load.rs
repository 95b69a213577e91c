//! The load client: tokio, fixed concurrency, real TCP on loopback; every
//! request's outcome, latency and answering PID. One HTTP/1.1 client loop
//! ([`H1Plan`]) over any stream (TCP here, TLS for the protocol rows), on
//! the test support's connection (`http::aio`, the tests' rules for what
//! a response is).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pid_server_test_support::http::{self, aio, aio::Reply};
use pid_server_test_support::load::pause_in;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::cli::Args;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Connections are kept and reused until the server closes them (or a
    /// request on them fails); a failure on a reused connection counts.
    KeepAlive,
    /// `Connection: close`, one request per new connection.
    OneShot,
    /// Kept connections like `KeepAlive`, but each idles a random
    /// `--pause-min-ms`..`--pause-max-ms` after every answer before its
    /// next request on the same connection: no liveness check before
    /// reusing it and no retry, so a connection the server closed while it
    /// was idle shows up as a failure (then the client reconnects).
    Paused,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::OneShot => "one-shot",
            Mode::Paused => "paused",
        }
    }

    /// Connections kept across requests (the survival share means something).
    pub(crate) fn keeps_connections(self) -> bool {
        self != Mode::OneShot
    }
}

/// A request's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// 200.
    Ok,
    /// Any other status.
    Status,
    /// `ECONNREFUSED` on connect.
    Refused,
    /// `ECONNRESET`, `EPIPE`, `ECONNABORTED`.
    Reset,
    /// The server closed the connection before a whole response (FIN).
    Eof,
    /// No whole response within `--timeout-ms`.
    Timeout,
    /// Anything else (malformed response, ...).
    Other,
}

pub(crate) const KINDS: [Kind; 7] = [
    Kind::Ok,
    Kind::Status,
    Kind::Refused,
    Kind::Reset,
    Kind::Eof,
    Kind::Timeout,
    Kind::Other,
];

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Ok => "ok",
            Kind::Status => "status",
            Kind::Refused => "refused",
            Kind::Reset => "reset",
            Kind::Eof => "eof",
            Kind::Timeout => "timeout",
            Kind::Other => "other",
        }
    }
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

pub(crate) fn classify(e: &io::Error) -> Kind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Kind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Kind::Reset,
        io::ErrorKind::UnexpectedEof => Kind::Eof,
        io::ErrorKind::TimedOut => Kind::Timeout,
        _ => Kind::Other,
    }
}

/// One request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rec {
    /// When it started, µs after the load's start.
    pub(crate) start_us: u64,
    /// Until the whole response (or the failure), µs.
    pub(crate) lat_us: u32,
    /// The PID in the body (0 if none).
    pub(crate) pid: u32,
    pub(crate) kind: Kind,
    /// Sent on a connection that had already carried a request.
    pub(crate) reused: bool,
    /// The connection it was sent on: unique in the load (client task in
    /// the high 32 bits, the task's count of connections in the low ones).
    pub(crate) conn: u64,
    /// The connection ended with it: the response said `Connection:
    /// close`, or the request failed.
    pub(crate) closed: bool,
}

impl Rec {
    pub(crate) fn end_us(&self) -> u64 {
        self.start_us + self.lat_us as u64
    }

    /// A `Rec`'s times for a request that started at `start` and took
    /// `lat`, in a load that started at `t0`: `(start_us, lat_us)`.
    pub(crate) fn times(t0: Instant, start: Instant, lat: Duration) -> (u64, u32) {
        let start_us = start.duration_since(t0).as_micros() as u64;
        (start_us, lat.as_micros().min(u32::MAX as u128) as u32)
    }
}

/// Records one request: its `Rec`, and when it failed (`error`), a
/// `FailRec` with the same times.
pub(crate) fn record(
    recs: &mut Vec<Rec>,
    fails: &mut Vec<FailRec>,
    rec: Rec,
    error: Option<String>,
) {
    if let Some(error) = error {
        fails.push(FailRec {
            start_us: rec.start_us,
            lat_us: rec.lat_us,
            kind: rec.kind,
            reused: rec.reused,
            error,
        });
    }
    recs.push(rec);
}

#[derive(Clone, Debug)]
pub(crate) struct FailRec {
    pub(crate) start_us: u64,
    pub(crate) lat_us: u32,
    pub(crate) kind: Kind,
    pub(crate) reused: bool,
    pub(crate) error: String,
}

/// An HTTP/1.1 client connection (the test support's async one: the
/// tests' rules for a response), over TCP here, over TLS in `tls.rs`.
pub(crate) type Conn<S = tokio::net::TcpStream> = aio::Conn<S>;

/// A `GET /` request as the bench's clients send it.
pub(crate) fn request(host: &str, close: bool) -> Vec<u8> {
    let close = if close { "Connection: close\r\n" } else { "" };
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pid-server-bench\r\n{close}\r\n")
        .into_bytes()
}

/// A TCP connection to `addr`, without Nagle.
pub(crate) async fn connect_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request on `conn`, connecting first (`connect`) when there is no
/// connection. The error keeps its kind and says in which step it came.
pub(crate) async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Option<Conn<S>>,
    connect: impl Future<Output = io::Result<S>>,
    req: &[u8],
) -> io::Result<Reply> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::new(
            connect.await.map_err(|e| http::context(e, "connect"))?,
        )),
    };
    c.exchange(req).await
}

/// What one HTTP/1.1 client does: a closed loop of requests on one
/// connection slot, over whatever `connect` opens (TCP, TLS). Keep-alive
/// (the connection is reused until the server says `Connection: close` or
/// a request on it fails; never retried), paused (the same, idle a random
/// time after each answer) or one-shot (a new connection per request).
pub(crate) struct H1Plan {
    pub(crate) one_shot: bool,
    /// Paused clients: the idle time after each answer is drawn uniformly
    /// from this range, seeded per client (`--seed`).
    pub(crate) pause: Option<(Duration, Duration, u64)>,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
    pub(crate) max_requests: u64,
}

impl H1Plan {
    /// Client number `task` of a load that started at `t0`, until `stop`,
    /// the deadline or its count of requests.
    pub(crate) async fn run<S, F>(
        &self,
        request: &[u8],
        connect: impl Fn() -> F,
        task: u64,
        t0: Instant,
        stop: &AtomicBool,
    ) -> (Vec<Rec>, Vec<FailRec>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: Future<Output = io::Result<S>>,
    {
        let (mut recs, mut fails) = (Vec::with_capacity(16 * 1024), Vec::new());
        let mut rng = self.pause.map(|(_, _, seed)| pause_rng(seed, task));
        let mut conn: Option<Conn<S>> = None;
        let (mut conns, mut sent) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && sent < self.max_requests
        {
            sent += 1;
            let start = Instant::now();
            let reused = conn.is_some();
            if !reused {
                conns += 1;
            }
            let r =
                tokio::time::timeout(self.timeout, exchange(&mut conn, connect(), request)).await;
            let lat = start.elapsed();
            let (kind, pid, close, error) = match r {
                Ok(Ok(r)) if r.status == 200 => (Kind::Ok, r.pid, r.close, None),
                Ok(Ok(r)) => (
                    Kind::Status,
                    r.pid,
                    r.close,
                    Some(format!("status {}", r.status)),
                ),
                Ok(Err(e)) => (classify(&e), None, true, Some(e.to_string())),
                Err(_) => (
                    Kind::Timeout,
                    None,
                    true,
                    Some(format!("no response within {:?}", self.timeout)),
                ),
            };
            let (start_us, lat_us) = Rec::times(t0, start, lat);
            let rec = Rec {
                start_us,
                lat_us,
                pid: pid.unwrap_or(0),
                kind,
                reused,
                conn: task << 32 | conns,
                closed: close || self.one_shot,
            };
            record(&mut recs, &mut fails, rec, error);
            if self.one_shot {
                // Let the server close first (its TIME_WAIT, not our
                // ports'; over TLS its close_notify too): wait briefly for
                // its FIN, outside the measured latency.
                if let Some(mut c) = conn.take()
                    && kind == Kind::Ok
                {
                    let mut b = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_millis(200), c.stream.read(&mut b))
                        .await;
                }
            } else if close {
                conn = None;
            }
            if let (Some((lo, hi, _)), Some(rng)) = (self.pause, rng.as_mut()) {
                pause(pause_in(rng, lo, hi), stop, self.deadline).await;
            }
        }
        (recs, fails)
    }
}

#[derive(Clone)]
pub(crate) struct LoadCfg {
    pub(crate) port: u16,
    pub(crate) mode: Mode,
    pub(crate) concurrency: usize,
    threads: usize,
    pub(crate) timeout: Duration,
    /// Paused mode: the idle time after each answer, drawn uniformly
    /// between these.
    pause: (Duration, Duration),
    /// Seeds the pauses (each client task its own stream).
    seed: u64,
    /// Hard bounds, whatever the controller does.
    max_duration: Duration,
    max_requests: u64,
}

#[derive(Default)]
struct WorkerOut {
    pub(crate) recs: Vec<Rec>,
    pub(crate) fails: Vec<FailRec>,
}

/// The pauses of paused client number `task`: seeded from `--seed`, so a
/// run's pauses are the same for the same seed, each connection its own.
pub(crate) fn pause_rng(seed: u64, task: u64) -> fastrand::Rng {
    fastrand::Rng::with_seed(seed ^ task.wrapping_mul(0xa076_1d64_78bd_642f))
}

/// Sleeps `d`, cut short by the stop flag or the deadline (checked every
/// 50 ms: a paused client must not hold up the end of a load).
pub(crate) async fn pause(d: Duration, stop: &AtomicBool, deadline: Instant) {
    let until = (Instant::now() + d).min(deadline);
    loop {
        let now = Instant::now();
        if now >= until || stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

async fn worker(cfg: Arc<LoadCfg>, task: u64, t0: Instant, stop: Arc<AtomicBool>) -> WorkerOut {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.port));
    let one_shot = cfg.mode == Mode::OneShot;
    let plan = H1Plan {
        one_shot,
        pause: (cfg.mode == Mode::Paused).then_some((cfg.pause.0, cfg.pause.1, cfg.seed)),
        timeout: cfg.timeout,
        deadline: t0 + cfg.max_duration,
        max_requests: (cfg.max_requests / cfg.concurrency as u64).max(1),
    };
    let req = request("127.0.0.1", one_shot);
    let (recs, fails) = plan.run(&req, || connect_tcp(addr), task, t0, &stop).await;
    WorkerOut { recs, fails }
}

pub(crate) struct Load {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WorkerOut>>,
    pub(crate) t0: Instant,
}

pub(crate) struct LoadData {
    pub(crate) recs: Vec<Rec>,
    pub(crate) fails: Vec<FailRec>,
    pub(crate) duration: Duration,
}

/// The load clients' own runtime, `threads` worker threads.
pub(crate) fn client_runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("load")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("load client runtime: {e}"))
}

impl Load {
    /// Starts the client's threads (in the calling thread's network
    /// namespace) and its connections.
    pub(crate) fn start(cfg: LoadCfg) -> Result<Load, String> {
        let rt = client_runtime(cfg.threads)?;
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let cfg = Arc::new(cfg);
        let tasks = (0..cfg.concurrency)
            .map(|i| rt.spawn(worker(cfg.clone(), i as u64, t0, stop.clone())))
            .collect();
        Ok(Load {
            rt,
            stop,
            tasks,
            t0,
        })
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    pub(crate) fn finish(self) -> LoadData {
        self.stop.store(true, Ordering::SeqCst);
        let duration = self.t0.elapsed();
        let tasks = self.tasks;
        let outs: Vec<WorkerOut> = self.rt.block_on(async move {
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await.unwrap_or_default());
            }
            v
        });
        self.rt.shutdown_timeout(Duration::from_secs(1));
        let mut recs = Vec::new();
        let mut fails = Vec::new();
        for o in outs {
            recs.extend(o.recs);
            fails.extend(o.fails);
        }
        recs.sort_by_key(|r| r.start_us);
        fails.sort_by_key(|f| f.start_us);
        LoadData {
            recs,
            fails,
            duration,
        }
    }
}

pub(crate) fn load_cfg(args: &Args, port: u16, mode: Mode, planned: Duration) -> LoadCfg {
    LoadCfg {
        port,
        mode,
        concurrency: args.connections(mode),
        pause: (args.pause_min, args.pause_max),
        seed: args.seed,
        threads: args.client_threads,
        timeout: args.timeout,
        max_duration: planned * 3 + Duration::from_secs(120),
        max_requests: 50_000_000,
    }
}
