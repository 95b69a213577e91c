//! What the file descriptor store costs PID 1: N idle keep-alive
//! connections to pid-server in the systemd container, `systemctl restart`,
//! and the container's PID 1's CPU time (from the host's `/proc`) across
//! it; then a second request on every connection (kept: answered by the new
//! main process on the same socket). Once with the shipped unit (store on:
//! up to `PID_SERVER_FD_STORE_CONNECTIONS=10000` connections, in one stored
//! fd), once with the store off (the drop-in of `systemd-restart-no-store`):
//! the difference is the store's own cost.
//!
//! systemd compares every fd stored with every one it already holds
//! (`same_fd()`): one fd per connection cost PID 1 time in N² (7.5 s of
//! its CPU for 4 000, measured with this step), which is why a stop now
//! stores them in one fd (axum-handover's `fdstore::Store`).

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::capacity::{Opening, Use, open_all, raise_nofile};
use crate::cli::Args;
use crate::crashsafe::{self, CrashSafeCost};
use crate::nspawn;
use crate::procs::{aborted, sleep_until};
use crate::strategies::{
    SERVICE, SOCKET, Skips, boot_container, container_main_pid, container_ready,
    container_systemctl, set_fd_store,
};

/// The shipped unit's `PID_SERVER_FD_STORE_CONNECTIONS=`: the most
/// connections a stop keeps.
const ROOM: usize = 10_000;
/// Before the restart (the connections idle, the server parks them) and
/// after it (the new process has taken the stored connections and removed
/// them from the store): what PID 1 does then is counted in "to +1 s".
const SETTLE: Duration = Duration::from_secs(1);
/// Second requests in flight at once, and each one's bound.
const ASK_AT_ONCE: usize = 500;
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-fdstore\r\n\r\n";

/// PID 1's CPU time: `utime + stime` of `/proc/PID/stat` (clock ticks) and
/// the time on CPU of `/proc/PID/schedstat` (ns, the main thread).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cpu {
    ticks: u64,
    sched_ns: Option<u64>,
}

pub(crate) fn cpu_of(pid: u32) -> Result<Cpu, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // After "(comm)": state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: {stat:?}"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let (utime, stime) = (f.get(10).copied(), f.get(11).copied());
    let ticks = utime
        .zip(stime)
        .map(|(u, s)| u + s)
        .ok_or_else(|| format!("/proc/{pid}/stat: {stat:?}"))?;
    let sched_ns = fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    Ok(Cpu { ticks, sched_ns })
}

fn tick_ms() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1000.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// From `a` to `b`: ms from the ticks, and from schedstat if both have it.
pub(crate) fn spent(a: Cpu, b: Cpu) -> (f64, Option<f64>) {
    let ticks = b.ticks.saturating_sub(a.ticks) as f64 * tick_ms();
    let sched = a
        .sched_ns
        .zip(b.sched_ns)
        .map(|(x, y)| y.saturating_sub(x) as f64 / 1e6);
    (ticks, sched)
}

/// One count, store on or off.
#[derive(Clone, Debug, Default)]
pub(crate) struct FdStoreCost {
    pub(crate) connections: usize,
    pub(crate) store: bool,
    /// Connections opened and answered once.
    pub(crate) opened: usize,
    pub(crate) open_secs: f64,
    pub(crate) old_pid: u32,
    pub(crate) new_pid: u32,
    /// `systemctl restart`, as the bench waited for it (nsenter included).
    pub(crate) restart_ms: f64,
    /// PID 1's CPU during `systemctl restart`: from `/proc/PID/stat`, and
    /// from `/proc/PID/schedstat` (finer).
    pub(crate) pid1_ms: f64,
    pub(crate) pid1_sched_ms: Option<f64>,
    /// The same from before the restart to [`SETTLE`] after it (the new
    /// process's `FDSTOREREMOVE=1` included).
    pub(crate) pid1_settled_ms: f64,
    pub(crate) pid1_settled_sched_ms: Option<f64>,
    /// Second requests: answered by the new main process (kept), by another
    /// process, closed by the server (EOF, reset), failed otherwise.
    pub(crate) kept: usize,
    pub(crate) other_pid: usize,
    pub(crate) closed: usize,
    pub(crate) failed: usize,
    /// The old process's journal line about the store, if any.
    pub(crate) stop_line: Option<String>,
    pub(crate) start_line: Option<String>,
    pub(crate) error: Option<String>,
}

impl FdStoreCost {
    /// PID 1's CPU during the restart, the finer figure when there is one.
    fn pid1(&self) -> f64 {
        self.pid1_sched_ms.unwrap_or(self.pid1_ms)
    }
}

/// Both tables of the step: the restarts (`--fdstore-cost`) and the
/// crash-safe mode while serving (`--crash-safe-cost`).
#[derive(Clone, Debug, Default)]
pub(crate) struct FdStoreResults {
    pub(crate) restarts: Vec<FdStoreCost>,
    pub(crate) crash_safe: Vec<CrashSafeCost>,
}

/// Every count of `--fdstore-cost`, store on then off, then every count of
/// `--crash-safe-cost`, mode off then on, in one container.
pub(crate) fn run(args: &Args, skips: &mut Skips) -> FdStoreResults {
    let mut results = FdStoreResults::default();
    if (args.fdstore_cost.is_empty() && args.crash_safe_cost.is_empty()) || aborted() {
        return results;
    }
    let steps = || {
        [
            (!args.fdstore_cost.is_empty()).then_some("fdstore cost"),
            (!args.crash_safe_cost.is_empty()).then_some("crash-safe cost"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    };
    if let Err(why) = nspawn::container_support() {
        skips.add(&steps(), why);
        return results;
    }
    let limit = raise_nofile();
    let fits = |what: &str, n: usize, skips: &mut Skips| {
        let fits = n as u64 + 64 <= limit;
        if !fits {
            skips.add(
                &format!("{what} {n}"),
                format!("the open-files limit is {limit}"),
            );
        }
        fits
    };
    let counts: Vec<usize> = args
        .fdstore_cost
        .iter()
        .copied()
        .filter(|&n| fits("fdstore cost", n, skips))
        .collect();
    let crash_counts: Vec<usize> = args
        .crash_safe_cost
        .iter()
        .copied()
        .filter(|&n| fits("crash-safe cost", n, skips))
        .collect();
    if counts.is_empty() && crash_counts.is_empty() {
        return results;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            skips.add("fdstore cost", format!("client runtime: {e}"));
            return results;
        }
    };
    let port = nspawn::free_port();
    eprintln!("bench: booting a systemd container for the file descriptor store's cost");
    // The unit's own timeouts (keep-alive 5 s): the connections are at most
    // a few seconds idle when the restart begins, and the new process that
    // takes them starts their idle time anew. Longer ones would also stretch
    // the store-off restart: a stop closes an idle connection once it has
    // been idle the keep-alive timeout plus a second.
    let c = match boot_container(args, port) {
        Ok(c) => c,
        Err(why) => {
            skips.add(&steps(), why);
            return results;
        }
    };
    eprintln!(
        "bench: fdstore cost: systemd {} in container {}, PID 1 is {} on the host",
        c.systemd_version(),
        c.name(),
        c.init_pid()
    );
    results.restarts = restarts(&c, &rt, port, &counts, skips);
    drop(rt);
    if !crash_counts.is_empty() && !aborted() {
        let args = Args {
            crash_safe_cost: crash_counts,
            ..args.clone()
        };
        results.crash_safe = crashsafe::run(&args, &c, port, skips);
    }
    let _ = c.exec_timeout(
        &["systemctl", "--no-pager", "stop", SERVICE, SOCKET],
        Duration::from_secs(60),
    );
    results
}

/// The restart table: every count, store on then off.
fn restarts(
    c: &nspawn::Container,
    rt: &tokio::runtime::Runtime,
    port: u16,
    counts: &[usize],
    skips: &mut Skips,
) -> Vec<FdStoreCost> {
    let mut results = Vec::new();
    if counts.is_empty() {
        return results;
    }
    for store in [true, false] {
        // Also a first restart with the setting, before any counted one.
        if let Err(e) = set_fd_store(c, store).and_then(|()| container_ready(c, port).map(drop)) {
            skips.add(
                &format!("fdstore cost, store {}", on_off(store)),
                format!("pid-server is not serving in the container: {e}"),
            );
            continue;
        }
        for &n in counts {
            if aborted() {
                break;
            }
            eprintln!(
                "bench: fdstore cost: {n} idle connections, store {}",
                on_off(store)
            );
            match one(c, rt, port, n, store) {
                Ok(r) => {
                    eprintln!(
                        "bench: fdstore cost: restart {:.0} ms, PID 1 {:.1} ms, kept {}/{}",
                        r.restart_ms,
                        r.pid1(),
                        r.kept,
                        r.connections
                    );
                    results.push(r);
                }
                Err(e) => skips.add(&format!("fdstore cost {n}, store {}", on_off(store)), e),
            }
            // The next count on a serving process.
            if let Err(e) = container_ready(c, port) {
                skips.add("fdstore cost", format!("pid-server does not serve: {e}"));
                return results;
            }
        }
    }
    results
}

fn on_off(store: bool) -> &'static str {
    if store { "on" } else { "off" }
}

fn one(
    c: &nspawn::Container,
    rt: &tokio::runtime::Runtime,
    port: u16,
    n: usize,
    store: bool,
) -> Result<FdStoreCost, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let old_pid = container_main_pid(c)?;
    let started = Instant::now();
    let (conns, open_error) = rt.block_on(open_all(addr, n, Opening::Burst, Use::Once));
    let open_secs = started.elapsed().as_secs_f64();
    sleep_until(Instant::now() + SETTLE);
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let init = c.init_pid();
    let cpu0 = cpu_of(init)?;
    let t0 = Instant::now();
    container_systemctl(c, &["restart", SERVICE])?;
    let restart = t0.elapsed();
    let cpu1 = cpu_of(init)?;
    let new_pid = container_main_pid(c)?;
    sleep_until(t0 + restart + SETTLE);
    let cpu2 = cpu_of(init)?;
    let (pid1_ms, pid1_sched_ms) = spent(cpu0, cpu1);
    let (pid1_settled_ms, pid1_settled_sched_ms) = spent(cpu0, cpu2);
    let opened = conns.len();
    let answers = rt.block_on(ask_all(conns));
    let mut r = FdStoreCost {
        connections: n,
        store,
        opened,
        open_secs,
        old_pid,
        new_pid,
        restart_ms: restart.as_secs_f64() * 1000.0,
        pid1_ms,
        pid1_sched_ms,
        pid1_settled_ms,
        pid1_settled_sched_ms,
        error: open_error.map(|e| format!("opening: {e}")),
        ..FdStoreCost::default()
    };
    for a in answers {
        match a {
            Ok(pid) if pid == new_pid => r.kept += 1,
            Ok(_) => r.other_pid += 1,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                ) {
                    r.closed += 1;
                } else {
                    r.failed += 1;
                    if r.error.is_none() {
                        r.error = Some(format!("second request: {e}"));
                    }
                }
            }
        }
    }
    let journal = c
        .exec_timeout(
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "-u",
                SERVICE,
                "--since",
                &format!("@{}", since.saturating_sub(1)),
            ],
            Duration::from_secs(30),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let line = |what: &str| {
        journal
            .lines()
            .rfind(|l| l.contains(what))
            .map(|l| l.trim().to_string())
    };
    r.stop_line = line("idle connections in systemd's file descriptor store for the next start");
    r.start_line = line("idle connections from systemd's file descriptor store");
    Ok(r)
}

/// A second request on every connection, [`ASK_AT_ONCE`] at a time: the PID
/// that answered, or why none did.
async fn ask_all(conns: Vec<TcpStream>) -> Vec<io::Result<u32>> {
    let gate = Arc::new(Semaphore::new(ASK_AT_ONCE));
    let mut set = tokio::task::JoinSet::new();
    for mut s in conns {
        let gate = gate.clone();
        set.spawn(async move {
            let _p = gate.acquire_owned().await;
            match tokio::time::timeout(ASK_TIMEOUT, ask(&mut s)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {ASK_TIMEOUT:?}"),
                )),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or_else(|e| Err(io::Error::other(e.to_string()))));
    }
    out
}

/// `GET /` on a connection that already had one answer: the PID in the
/// body of a 200.
async fn ask(s: &mut TcpStream) -> io::Result<u32> {
    s.write_all(REQUEST).await?;
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 512];
        let got = s.read(&mut chunk).await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before an answer",
            ));
        }
        buf.extend_from_slice(&chunk[..got]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                return Err(io::Error::other("huge answer"));
            }
            continue;
        };
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
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]);
            return pid_server_test_support::http::pid_in(&body)
                .ok_or_else(|| io::Error::other(format!("body {body:?}")));
        }
    }
}

/// The section of the report: the table, the store's own cost, the journal
/// lines and errors.
pub(crate) fn section(rows: &[FdStoreCost]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = write!(
        s,
        "\n## PID 1's cost of the file descriptor store\n\n\
         systemd in the container, the shipped unit (a stop keeps up to {ROOM} connections, in \
         one stored fd); store off: \
         the drop-in PID_SERVER_FD_STORE_CONNECTIONS=0. N idle keep-alive connections (one \
         request each), then `systemctl restart`; PID 1's CPU time from the host's /proc \
         (schedstat, stat's utime+stime in brackets) during the restart and up to {} s after it; \
         then a second request on every connection: kept = answered by the new main process. \
         Store's cost = PID 1 during the restart, store on minus store off, same N.\n\n",
        SETTLE.as_secs()
    );
    s.push_str(
        "| N | store | opened | restart ms | PID 1 CPU ms, restart | PID 1 CPU ms, to +1 s \
         | store's cost ms | kept / N | closed | failed | other PID |\n",
    );
    s.push_str("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let cpu = |precise: Option<f64>, ticks: f64| match precise {
        Some(p) => format!("{p:.1} ({ticks:.0})"),
        None => format!("({ticks:.0})"),
    };
    for r in rows {
        let cost = if r.store {
            rows.iter()
                .find(|o| !o.store && o.connections == r.connections)
                .map(|o| format!("{:.1}", r.pid1() - o.pid1()))
                .unwrap_or_else(|| "–".into())
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {}/{} | {} | {} | {} |",
            r.connections,
            on_off(r.store),
            r.opened,
            r.restart_ms,
            cpu(r.pid1_sched_ms, r.pid1_ms),
            cpu(r.pid1_settled_sched_ms, r.pid1_settled_ms),
            cost,
            r.kept,
            r.connections,
            r.closed,
            r.failed,
            r.other_pid,
        );
    }
    s.push('\n');
    for r in rows {
        for (what, l) in [("stop", &r.stop_line), ("start", &r.start_line)] {
            if let Some(l) = l {
                let _ = writeln!(
                    s,
                    "- {} store {}, {what}: \"{l}\"",
                    r.connections,
                    on_off(r.store)
                );
            }
        }
        if let Some(e) = &r.error {
            let _ = writeln!(s, "- {} store {}: {e}", r.connections, on_off(r.store));
        }
    }
    s
}

pub(crate) fn json(rows: &[FdStoreCost]) -> Value {
    rows.iter()
        .map(|r| {
            json!({
                "connections": r.connections,
                "store": r.store,
                "store_room": if r.store { ROOM } else { 0 },
                "opened": r.opened,
                "open_s": r.open_secs,
                "old_pid": r.old_pid,
                "new_pid": r.new_pid,
                "restart_ms": r.restart_ms,
                "pid1_cpu_ms_restart": r.pid1_ms,
                "pid1_schedstat_ms_restart": r.pid1_sched_ms,
                "pid1_cpu_ms_settled": r.pid1_settled_ms,
                "pid1_schedstat_ms_settled": r.pid1_settled_sched_ms,
                "settle_ms": SETTLE.as_millis() as u64,
                "kept": r.kept,
                "closed": r.closed,
                "failed": r.failed,
                "other_pid": r.other_pid,
                "stop_journal": r.stop_line,
                "start_journal": r.start_line,
                "error": r.error,
            })
        })
        .collect()
}
