//! Memory per idle keep-alive connection: N connections to a fresh server,
//! each sends one request, reads the answer and stays open, idle; the
//! server's resident memory before and after, divided by N. pid-server and
//! nginx (one worker, whose memory is measured) in the same run, with the
//! same client.
//!
//! The connections idle for [`IDLE`] before the reading. Two ways to open them, because an allocator's behaviour depends on it:
//! "burst" opens up to [`BURST`] at a time (the server's threads all accept
//! and allocate at once), "gradual" opens one after the other.
//!
//! After the measurement, a sample of the connections sends a second
//! request (each must answer: the server kept them), then all close, and
//! the memory is read once more (does it go back?).
//!
//! Before all that, on the same server, N connections that send nothing
//! (a browser's preconnect, a load balancer's warm pool, a slow client):
//! opened the same way, left silent for [`IDLE`], the memory read, then
//! closed. Their "never used" figure is the memory over N, from the reading
//! just before they opened.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::cli::Args;
use crate::nspawn;
use crate::procs::{Procs, TempDir, aborted, sleep_until};
use crate::servers::{
    NginxSite, NginxWorkers, nginx_cmd, pid_server_cmd, wait_for_pid, wait_serving,
};
use crate::strategies::{Skips, log_path};

/// Connections being opened at once in a burst.
const BURST: usize = 500;
/// Every connection is open and answered within this, or the run fails.
const OPEN_BOUND: Duration = Duration::from_secs(120);
/// Before each reading of the memory: the server's last writes and frees.
const SETTLE: Duration = Duration::from_millis(500);
/// How long the connections idle before the measurement: what an idle
/// connection costs once the server has had time to notice it is idle
/// (pid-server parks a connection idle for 0.5 s).
const IDLE: Duration = Duration::from_secs(2);
/// Every this many connections, one sends a second request after the
/// measurement.
const SAMPLE_EVERY: usize = 50;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-capacity\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    Burst,
    Gradual,
}

impl Opening {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Opening::Burst => "burst",
            Opening::Gradual => "gradual",
        }
    }
}

/// One server's memory, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Mem {
    /// `VmRSS`, KiB.
    pub(crate) rss_kb: u64,
    /// `Pss` of `smaps_rollup`, KiB (0 if unreadable).
    pub(crate) pss_kb: u64,
}

fn mem_of(pid: u32) -> Result<Mem, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let rss_kb = field(&status, "VmRSS:").ok_or(format!("no VmRSS for {pid}"))?;
    let pss_kb = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| field(&t, "Pss:"))
        .unwrap_or(0);
    Ok(Mem { rss_kb, pss_kb })
}

/// One server, one count, one way of opening.
#[derive(Clone, Debug)]
pub(crate) struct CapacityResult {
    pub(crate) server: String,
    pub(crate) connections: usize,
    pub(crate) opening: Opening,
    /// Connections opened and answered (the rest failed).
    pub(crate) opened: usize,
    pub(crate) open_secs: f64,
    /// Before the never-used connections opened, and once they idled.
    pub(crate) silent_before: Mem,
    pub(crate) silent_idle: Mem,
    /// Never-used connections opened (connected).
    pub(crate) silent_opened: usize,
    pub(crate) before: Mem,
    pub(crate) idle: Mem,
    pub(crate) after_close: Mem,
    /// Sampled connections that answered a second request / were asked.
    pub(crate) second_ok: usize,
    pub(crate) second_asked: usize,
    /// The first failure, if any.
    pub(crate) error: Option<String>,
}

impl CapacityResult {
    /// KiB per open idle connection, from `VmRSS`.
    pub(crate) fn rss_per_conn(&self) -> f64 {
        per(self.idle.rss_kb, self.before.rss_kb, self.opened)
    }
    pub(crate) fn pss_per_conn(&self) -> f64 {
        per(self.idle.pss_kb, self.before.pss_kb, self.opened)
    }
    /// KiB per open never-used connection, from `VmRSS`.
    pub(crate) fn silent_rss_per_conn(&self) -> f64 {
        per(
            self.silent_idle.rss_kb,
            self.silent_before.rss_kb,
            self.silent_opened,
        )
    }
}

fn per(after: u64, before: u64, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (after as f64 - before as f64) / n as f64
}

/// Raises the bench's own soft open-files limit to the hard one: it holds
/// every client connection.
pub(crate) fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Every count of `--capacity` against pid-server and (unless
/// `--no-compare`) nginx, each opening way, each on a fresh server.
pub(crate) fn run(args: &Args, skips: &mut Skips) -> Vec<CapacityResult> {
    let mut results = Vec::new();
    if args.capacity.is_empty() || aborted() {
        return results;
    }
    let limit = raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            skips.add("capacity", format!("client runtime: {e}"));
            return results;
        }
    };
    let mut servers = vec!["pid-server"];
    if args.compare && !args.quick {
        servers.push("nginx");
    }
    for &n in &args.capacity {
        // The client's descriptors, and the server's.
        if n as u64 + 64 > limit {
            skips.add(
                &format!("capacity {n}"),
                format!("the open-files limit is {limit}"),
            );
            continue;
        }
        // --quick: one smoke row, the burst.
        let openings: &[Opening] = if args.quick {
            &[Opening::Burst]
        } else {
            &[Opening::Burst, Opening::Gradual]
        };
        for &opening in openings {
            for &server in &servers {
                if aborted() {
                    return results;
                }
                eprintln!(
                    "bench: capacity, {server}: {n} idle connections, {}",
                    opening.name()
                );
                match one(args, &rt, server, n, opening) {
                    Ok(r) => results.push(r),
                    Err(e) => skips.add(&format!("capacity {server} {n} {}", opening.name()), e),
                }
            }
        }
    }
    results
}

fn one(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    server: &str,
    n: usize,
    opening: Opening,
) -> Result<CapacityResult, String> {
    let label = format!("capacity-{server}-{n}-{}", opening.name());
    let mut procs = Procs::new(&log_path(args, &label))?;
    let tmp = TempDir::new(&label)?;
    let port = nspawn::free_port();
    let pid = match server {
        "pid-server" => {
            let mut cmd = pid_server_cmd(port);
            // Room for every connection; idle ones stay for the whole run.
            cmd.args([
                "--max-connections",
                &(n + 64).to_string(),
                "--header-timeout",
                "600",
                "--keep-alive-timeout",
                "300",
            ]);
            let pid = procs.spawn(cmd, server)?;
            wait_for_pid(port, pid, Duration::from_secs(10))?;
            pid
        }
        _ => {
            let cmd = nginx_cmd(port, &tmp.0, NginxSite::Return200, NginxWorkers::One(n))?;
            let master = procs.spawn(cmd, server)?;
            wait_serving(port, Duration::from_secs(10))?;
            only_child(master)?
        }
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Warm the server up (first-request allocations, thread caches) so the
    // baseline is a serving process, not a fresh one.
    rt.block_on(async {
        let mut warm = Vec::new();
        for _ in 0..32 {
            warm.push(open(addr, Use::Once).await?);
        }
        drop(warm);
        Ok::<_, io::Error>(())
    })
    .map_err(|e| format!("warm-up: {e}"))?;
    sleep_until(Instant::now() + SETTLE);
    let silent_before = mem_of(pid)?;
    let (silent, silent_error) = rt.block_on(open_all(addr, n, opening, Use::Never));
    sleep_until(Instant::now() + IDLE);
    let silent_idle = mem_of(pid)?;
    let silent_opened = silent.len();
    drop(silent);
    sleep_until(Instant::now() + 2 * SETTLE);
    let before = mem_of(pid)?;
    let started = Instant::now();
    let (conns, error) = rt.block_on(open_all(addr, n, opening, Use::Once));
    let error = silent_error.map(|e| format!("never used: {e}")).or(error);
    let open_secs = started.elapsed().as_secs_f64();
    sleep_until(Instant::now() + IDLE);
    let idle = mem_of(pid)?;
    let opened = conns.len();
    let (conns, second_ok, second_asked, second_error) = rt.block_on(second_request(conns));
    let error = error.or(second_error);
    drop(conns);
    sleep_until(Instant::now() + 2 * SETTLE);
    let after_close = mem_of(pid)?;
    drop(procs);
    Ok(CapacityResult {
        server: server.to_string(),
        connections: n,
        opening,
        opened,
        open_secs,
        silent_before,
        silent_idle,
        silent_opened,
        before,
        idle,
        after_close,
        second_ok,
        second_asked,
        error,
    })
}

/// nginx's one worker: the master's only child.
fn only_child(master: u32) -> Result<u32, String> {
    let children = fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .map_err(|e| format!("children of nginx {master}: {e}"))?;
    let kids: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    match kids.as_slice() {
        [one] => Ok(*one),
        _ => Err(format!("nginx {master} has workers {kids:?}, not one")),
    }
}

/// Whether a connection sends its one request or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Use {
    Never,
    Once,
}

/// Opens `n` connections, each answered once (or silent); stops at the
/// first failure or at [`OPEN_BOUND`].
pub(crate) async fn open_all(
    addr: SocketAddr,
    n: usize,
    opening: Opening,
    used: Use,
) -> (Vec<TcpStream>, Option<String>) {
    let deadline = tokio::time::Instant::now() + OPEN_BOUND;
    let mut conns = Vec::with_capacity(n);
    match opening {
        Opening::Gradual => {
            for _ in 0..n {
                match tokio::time::timeout_at(deadline, open(addr, used)).await {
                    Ok(Ok(s)) => conns.push(s),
                    Ok(Err(e)) => return (conns, Some(e.to_string())),
                    Err(_) => return (conns, Some(format!("not open within {OPEN_BOUND:?}"))),
                }
            }
            (conns, None)
        }
        Opening::Burst => {
            let gate = Arc::new(Semaphore::new(BURST));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let gate = gate.clone();
                set.spawn(async move {
                    let _p = gate.acquire_owned().await;
                    tokio::time::timeout_at(deadline, open(addr, used)).await
                });
            }
            let mut error = None;
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(Ok(s))) => conns.push(s),
                    Ok(Ok(Err(e))) => error = error.or(Some(e.to_string())),
                    Ok(Err(_)) => error = error.or(Some(format!("not open within {OPEN_BOUND:?}"))),
                    Err(e) => error = error.or(Some(e.to_string())),
                }
            }
            (conns, error)
        }
    }
}

/// A connection that has sent one request and read its whole answer, or
/// (never used) has only connected.
async fn open(addr: SocketAddr, used: Use) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    if used == Use::Once {
        exchange(&mut s).await?;
    }
    Ok(s)
}

/// Sends [`REQUEST`] and reads a 200 with a `Content-Length` body.
async fn exchange(s: &mut TcpStream) -> io::Result<()> {
    s.write_all(REQUEST).await?;
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 512];
        let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 10 s"))??;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before an answer",
            ));
        }
        buf.extend_from_slice(&chunk[..got]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(io::Error::other(format!(
                    "answer {:?}",
                    head.lines().next().unwrap_or_default()
                )));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::other("no Content-Length"))?;
            if buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("huge answer"));
        }
    }
}

/// A second request on every [`SAMPLE_EVERY`]th connection, one after the
/// other: the server must still have them.
async fn second_request(
    mut conns: Vec<TcpStream>,
) -> (Vec<TcpStream>, usize, usize, Option<String>) {
    let (mut ok, mut asked, mut error) = (0, 0, None);
    for s in conns.iter_mut().step_by(SAMPLE_EVERY) {
        asked += 1;
        match exchange(s).await {
            Ok(()) => ok += 1,
            Err(e) => error = error.or(Some(format!("second request: {e}"))),
        }
    }
    (conns, ok, asked, error)
}
