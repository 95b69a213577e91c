//! The load client: tokio, fixed concurrency, real TCP on loopback; every
//! request's outcome, latency and answering PID.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pid_server_test_support::load::pause_in;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) pid: u32,
    pub(crate) close: bool,
}

/// An HTTP/1.1 client connection: over TCP here, over TLS in `tls.rs`
/// (the same parser, so the rows compare).
pub(crate) struct Conn<S = tokio::net::TcpStream> {
    pub(crate) stream: S,
    pub(crate) buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn read_more(&mut self, what: &str) -> io::Result<()> {
        self.buf.reserve(2048);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                what.to_string(),
            ));
        }
        Ok(())
    }

    pub(crate) async fn read_response(&mut self) -> io::Result<Response> {
        self.buf.clear();
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "huge response head",
                ));
            }
            let what = if self.buf.is_empty() {
                "connection closed before a response"
            } else {
                "connection closed in the response head"
            };
            self.read_more(what).await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
        let mut len = None;
        let mut close = false;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunked responses are not supported",
                    ));
                }
            }
        }
        let body_end = match len {
            Some(n) => {
                while self.buf.len() < head_end + n {
                    self.read_more("connection closed in the response body")
                        .await?;
                }
                head_end + n
            }
            None if close => {
                loop {
                    self.buf.reserve(2048);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        break;
                    }
                }
                self.buf.len()
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response without Content-Length",
                ));
            }
        };
        let pid = std::str::from_utf8(&self.buf[head_end..body_end])
            .ok()
            .and_then(pid_server_test_support::http::pid_in)
            .unwrap_or(0);
        Ok(Response { status, pid, close })
    }
}

pub(crate) async fn exchange(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    req: &[u8],
) -> io::Result<Response> {
    // The error keeps its kind and says in which step it came.
    let during =
        |step: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{step}: {e}"));
    if conn.is_none() {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(during("connect"))?;
        stream.set_nodelay(true).map_err(during("connect"))?;
        *conn = Some(Conn {
            stream,
            buf: Vec::with_capacity(1024),
        });
    }
    let c = conn.as_mut().expect("connected above");
    c.stream.write_all(req).await.map_err(during("send"))?;
    c.read_response().await.map_err(during("receive"))
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
    let req: &[u8] = match cfg.mode {
        Mode::KeepAlive | Mode::Paused => {
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pid-server-bench\r\n\r\n"
        }
        Mode::OneShot => {
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pid-server-bench\r\nConnection: close\r\n\r\n"
        }
    };
    let deadline = t0 + cfg.max_duration;
    let max = (cfg.max_requests / cfg.concurrency as u64).max(1);
    let mut out = WorkerOut {
        recs: Vec::with_capacity(16 * 1024),
        fails: Vec::new(),
    };
    let mut rng = pause_rng(cfg.seed, task);
    let mut conn: Option<Conn> = None;
    let mut conns = 0u64;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < max {
        sent += 1;
        let start = Instant::now();
        let reused = conn.is_some();
        if !reused {
            conns += 1;
        }
        let r = tokio::time::timeout(cfg.timeout, exchange(&mut conn, addr, req)).await;
        let lat = start.elapsed();
        let (kind, pid, close, error) = match r {
            Ok(Ok(resp)) if resp.status == 200 => (Kind::Ok, resp.pid, resp.close, None),
            Ok(Ok(resp)) => (
                Kind::Status,
                resp.pid,
                resp.close,
                Some(format!("status {}", resp.status)),
            ),
            Ok(Err(e)) => (classify(&e), 0, true, Some(e.to_string())),
            Err(_) => (
                Kind::Timeout,
                0,
                true,
                Some(format!("no response within {:?}", cfg.timeout)),
            ),
        };
        let (start_us, lat_us) = Rec::times(t0, start, lat);
        let rec = Rec {
            start_us,
            lat_us,
            pid,
            kind,
            reused,
            conn: task << 32 | conns,
            closed: close || cfg.mode == Mode::OneShot,
        };
        record(&mut out.recs, &mut out.fails, rec, error);
        if cfg.mode == Mode::OneShot {
            // Let the server close first (its TIME_WAIT, not our ports'):
            // wait briefly for its FIN, outside the measured latency.
            if let Some(mut c) = conn.take()
                && kind == Kind::Ok
            {
                let mut b = [0u8; 64];
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), c.stream.read(&mut b)).await;
            }
        } else if close {
            conn = None;
        }
        if cfg.mode == Mode::Paused {
            pause(
                pause_in(&mut rng, cfg.pause.0, cfg.pause.1),
                &stop,
                deadline,
            )
            .await;
        }
    }
    out
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
