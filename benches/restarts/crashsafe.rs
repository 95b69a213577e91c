//! What the crash-safe mode costs PID 1 while pid-server serves: N paused
//! keep-alive connections (`GET /`, then 0.3–3 s idle, the load client's
//! paused mode) to pid-server in the container of [`crate::fdstore`], the
//! mode on (`PID_SERVER_FD_STORE_WHILE_IDLE`) and off, and the container's
//! PID 1's CPU time over a fixed window. Every idle spell over a second is
//! one `FDSTORE=1` (systemd compares the fd with every one it holds) and,
//! at the next request, one `FDSTOREREMOVE=1`: the mode's cost is PID 1's
//! CPU with it on minus the same with it off.

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::Args;
use crate::fdstore::{Cpu, cpu_of, spent};
use crate::load::{Kind, Load, Mode, load_cfg};
use crate::nspawn;
use crate::procs::{aborted, sleep_until};
use crate::strategies::{NO_STORE_DROPIN, SERVICE, Skips, container_ready, container_systemctl};

const DROPIN: &str = "/etc/systemd/system/pid-server.service.d/bench-crash-safe.conf";
/// The crash-safe mode's room in the shipped unit (`FileDescriptorStoreMax=257`,
/// one for a stop's bundle): a count above it gets a drop-in with more.
const SHIPPED_ROOM: usize = 256;
/// Load before the window: every connection has had its first request and
/// its first pause (at most `--pause-max-ms`, 3 s by default).
const WARMUP: Duration = Duration::from_secs(3);
/// A connection idle this long is stored (the server's threshold).
const IDLE_TO_STORE: Duration = Duration::from_secs(1);
/// `/metrics` samples of the gauge during the window.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const GAUGE: &str = "pid_server_connections_in_fd_store ";

/// One count, the mode on or off.
#[derive(Clone, Debug, Default)]
pub(crate) struct CrashSafeCost {
    pub(crate) connections: usize,
    /// `PID_SERVER_FD_STORE_WHILE_IDLE` (0: off).
    pub(crate) while_idle: usize,
    /// `FileDescriptorStoreMax=` (the shipped 257 unless raised).
    pub(crate) store_max: usize,
    pub(crate) window_secs: f64,
    /// Requests that started in the window, and those that failed.
    pub(crate) requests: usize,
    pub(crate) failed: usize,
    pub(crate) first_failure: Option<String>,
    /// Requests in the window after an idle spell over [`IDLE_TO_STORE`] on
    /// their connection: each one a store and a removal in the mode (the
    /// client's count: a spell just over a second may end before the server
    /// stores).
    pub(crate) long_idle: usize,
    /// PID 1's CPU over the window: stat's ticks (ms) and schedstat (ms).
    pub(crate) pid1_ms: f64,
    pub(crate) pid1_sched_ms: Option<f64>,
    /// The gauge `pid_server_connections_in_fd_store`: at the end of the
    /// window, and the mean of the samples during it.
    pub(crate) gauge_end: Option<u64>,
    pub(crate) gauge_mean: Option<f64>,
    /// systemd's own count (`NFileDescriptorStore`) after the window.
    pub(crate) n_fd_store: Option<u64>,
    pub(crate) error: Option<String>,
}

impl CrashSafeCost {
    fn on(&self) -> bool {
        self.while_idle > 0
    }
    /// PID 1's CPU ms per second of window, the finer figure when there is one.
    fn pid1_per_s(&self) -> f64 {
        self.pid1_sched_ms.unwrap_or(self.pid1_ms) / self.window_secs.max(1e-9)
    }
}

/// The drop-in of one row: the mode off (`=0`) or on with room for `n`
/// (at least the shipped 256; above it `FileDescriptorStoreMax=` n+1).
fn dropin(n: usize, on: bool) -> (String, usize, usize) {
    if !on {
        return (
            "# benches/restarts/crashsafe.rs: the crash-safe mode off\n\
             [Service]\nEnvironment=PID_SERVER_FD_STORE_WHILE_IDLE=0\n"
                .into(),
            0,
            SHIPPED_ROOM + 1,
        );
    }
    let room = n.max(SHIPPED_ROOM);
    let mut s = format!(
        "# benches/restarts/crashsafe.rs: the crash-safe mode on\n\
         [Service]\nEnvironment=PID_SERVER_FD_STORE_WHILE_IDLE={room}\n"
    );
    if room > SHIPPED_ROOM {
        s.push_str(&format!("FileDescriptorStoreMax={}\n", room + 1));
    }
    (s, room, room + 1)
}

/// Every count of `--crash-safe-cost`, off then on, in the container `c`
/// (serving on `port`).
pub(crate) fn run(
    args: &Args,
    c: &nspawn::Container,
    port: u16,
    skips: &mut Skips,
) -> Vec<CrashSafeCost> {
    let mut results = Vec::new();
    // The shipped unit: no drop-in of the restart table's store-off rows.
    match fs::remove_file(c.host_path(NO_STORE_DROPIN)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            skips.add("crash-safe cost", format!("rm {NO_STORE_DROPIN}: {e}"));
            return results;
        }
    }
    let mut current: Option<String> = None;
    for &n in &args.crash_safe_cost {
        for on in [false, true] {
            if aborted() {
                return results;
            }
            let what = format!("crash-safe cost {n}, mode {}", on_off(on));
            let (text, while_idle, store_max) = dropin(n, on);
            if current.as_deref() != Some(text.as_str()) {
                c.write_file(DROPIN, text.as_bytes(), 0o644);
                let applied = container_systemctl(c, &["daemon-reload"])
                    .and_then(|()| container_systemctl(c, &["restart", SERVICE]));
                if let Err(e) = applied {
                    current = None;
                    skips.add(&what, format!("applying the drop-in: {e}"));
                    continue;
                }
                current = Some(text);
            }
            if let Err(e) = container_ready(c, port) {
                skips.add(&what, format!("pid-server is not serving: {e}"));
                continue;
            }
            eprintln!(
                "bench: crash-safe cost: {n} paused connections, mode {} \
                 (PID_SERVER_FD_STORE_WHILE_IDLE={while_idle})",
                on_off(on)
            );
            match one(args, c, port, n, while_idle, store_max) {
                Ok(r) => {
                    eprintln!(
                        "bench: crash-safe cost: {:.0} req/s, PID 1 {:.2} ms/s, \
                         in the store at the end {}",
                        r.requests as f64 / r.window_secs,
                        r.pid1_per_s(),
                        r.gauge_end.map_or("?".into(), |g| g.to_string())
                    );
                    results.push(r);
                }
                Err(e) => skips.add(&what, e),
            }
        }
    }
    let _ = fs::remove_file(c.host_path(DROPIN));
    results
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

fn gauge(port: u16) -> Option<u64> {
    let (status, body) =
        nspawn::try_http_get_timeout(port, "/metrics", Duration::from_secs(2)).ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(GAUGE))
        .and_then(|v| v.trim().parse().ok())
}

fn one(
    args: &Args,
    c: &nspawn::Container,
    port: u16,
    n: usize,
    while_idle: usize,
    store_max: usize,
) -> Result<CrashSafeCost, String> {
    let init = c.init_pid();
    let window = args.crash_safe_window;
    let mut cfg = load_cfg(args, port, Mode::Paused, WARMUP + window);
    cfg.concurrency = n;
    let load = Load::start(cfg)?;
    sleep_until(load.t0 + WARMUP);
    let w0 = load.elapsed();
    let cpu0: Cpu = cpu_of(init)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut next = t0 + SAMPLE_EVERY;
    while next < t0 + window && !aborted() {
        sleep_until(next);
        samples.extend(gauge(port));
        next += SAMPLE_EVERY;
    }
    sleep_until(t0 + window);
    let cpu1 = cpu_of(init)?;
    let w1 = load.elapsed();
    let gauge_end = gauge(port);
    // After the window (systemctl talks to PID 1), before the connections
    // close (the store then empties).
    let n_fd_store = c
        .exec_timeout(
            &[
                "systemctl",
                "show",
                "--value",
                "-p",
                "NFileDescriptorStore",
                SERVICE,
            ],
            Duration::from_secs(30),
        )
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
    let data = load.finish();
    let (pid1_ms, pid1_sched_ms) = spent(cpu0, cpu1);
    let (w0_us, w1_us) = (w0.as_micros() as u64, w1.as_micros() as u64);
    let mut r = CrashSafeCost {
        connections: n,
        while_idle,
        store_max,
        window_secs: (w1 - w0).as_secs_f64(),
        pid1_ms,
        pid1_sched_ms,
        gauge_end,
        gauge_mean: (!samples.is_empty())
            .then(|| samples.iter().sum::<u64>() as f64 / samples.len() as f64),
        n_fd_store,
        ..CrashSafeCost::default()
    };
    // The end of each connection's previous request: an idle spell is from
    // there to the next request's start.
    let mut last_end: HashMap<u64, u64> = HashMap::new();
    let idle_us = IDLE_TO_STORE.as_micros() as u64;
    for rec in &data.recs {
        let before = last_end.insert(rec.conn, rec.end_us());
        if rec.start_us < w0_us || rec.start_us >= w1_us {
            continue;
        }
        r.requests += 1;
        if rec.kind != Kind::Ok {
            r.failed += 1;
        }
        if before.is_some_and(|e| rec.start_us.saturating_sub(e) > idle_us) {
            r.long_idle += 1;
        }
    }
    r.first_failure = data
        .fails
        .iter()
        .find(|f| f.start_us >= w0_us && f.start_us < w1_us)
        .map(|f| format!("{}: {}", f.kind.name(), f.error));
    Ok(r)
}

/// The section of the report.
pub(crate) fn section(args: &Args, rows: &[CrashSafeCost]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = write!(
        s,
        "\n## PID 1 while serving in the crash-safe mode\n\n\
         The step's container (as for the restarts above), the shipped unit (FileDescriptorStoreMax=257) with a \
         drop-in: PID_SERVER_FD_STORE_WHILE_IDLE=0 (off) or 256 (on; for N above 256, N and \
         FileDescriptorStoreMax=N+1). N keep-alive connections, each `GET /` then idle {}–{} ms \
         (seed {}), {} s of load before a {:.0} s window; PID 1's CPU over the window \
         (schedstat; stat's ticks in brackets) per second. Idle > 1 s: requests in the window \
         after an idle spell over a second on their connection (the client's count: in the mode \
         each is one FDSTORE=1 and one FDSTOREREMOVE=1). Mode's cost = PID 1 on minus off, same \
         N; µs per store = that over the idle spells per second. In the store: the gauge \
         pid_server_connections_in_fd_store at the end (mean of the samples every second); \
         systemd's NFileDescriptorStore after the window.\n\n",
        args.pause_min.as_millis(),
        args.pause_max.as_millis(),
        args.seed,
        WARMUP.as_secs(),
        args.crash_safe_window.as_secs_f64(),
    );
    s.push_str(
        "| N | mode | req/s | failed | idle > 1 s /s | PID 1 CPU ms/s | mode's cost ms/s \
         | µs per store | in the store, end (mean) | NFileDescriptorStore |\n",
    );
    s.push_str("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in rows {
        let w = r.window_secs.max(1e-9);
        let base = rows
            .iter()
            .find(|o| !o.on() && o.connections == r.connections);
        let (cost, per_store) = match base {
            Some(b) if r.on() => {
                let cost = r.pid1_per_s() - b.pid1_per_s();
                let spells = r.long_idle as f64 / w;
                (
                    format!("{cost:.2}"),
                    if spells > 0.0 {
                        format!("{:.0}", cost * 1000.0 / spells)
                    } else {
                        "–".into()
                    },
                )
            }
            _ => ("–".into(), "–".into()),
        };
        let mode = if r.on() {
            format!("on ({})", r.while_idle)
        } else {
            "off".into()
        };
        let cpu = match r.pid1_sched_ms {
            Some(p) => format!("{:.2} ({:.1})", p / w, r.pid1_ms / w),
            None => format!("({:.2})", r.pid1_ms / w),
        };
        let gauge = match (r.gauge_end, r.gauge_mean) {
            (Some(e), Some(m)) => format!("{e} ({m:.0})"),
            (Some(e), None) => e.to_string(),
            (None, Some(m)) => format!("? ({m:.0})"),
            (None, None) => "?".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {mode} | {:.0} | {} | {:.0} | {cpu} | {cost} | {per_store} | {gauge} | {} |",
            r.connections,
            r.requests as f64 / w,
            r.failed,
            r.long_idle as f64 / w,
            r.n_fd_store.map_or("?".into(), |v| v.to_string()),
        );
    }
    s.push('\n');
    for r in rows {
        if let Some(e) = r.first_failure.as_ref().or(r.error.as_ref()) {
            let _ = writeln!(s, "- {} mode {}: {e}", r.connections, on_off(r.on()));
        }
    }
    s
}

pub(crate) fn json(rows: &[CrashSafeCost]) -> Value {
    rows.iter()
        .map(|r| {
            json!({
                "connections": r.connections,
                "fd_store_while_idle": r.while_idle,
                "file_descriptor_store_max": r.store_max,
                "window_s": r.window_secs,
                "warmup_ms": WARMUP.as_millis() as u64,
                "requests": r.requests,
                "failed": r.failed,
                "first_failure": r.first_failure,
                "idle_over_1s": r.long_idle,
                "pid1_cpu_ms": r.pid1_ms,
                "pid1_schedstat_ms": r.pid1_sched_ms,
                "pid1_ms_per_s": r.pid1_per_s(),
                "gauge_in_fd_store_end": r.gauge_end,
                "gauge_in_fd_store_mean": r.gauge_mean,
                "systemd_n_fd_store": r.n_fd_store,
                "error": r.error,
            })
        })
        .collect()
}
