//! `cargo bench --bench restarts`: failed requests and latency across
//! restarts, every strategy side by side (see `benches/README.md`).
//!
//! A load client of its own (tokio, fixed concurrency, real TCP on
//! loopback) drives a pid-server in two modes, keep-alive connections and
//! one request per new connection, and records every request's outcome,
//! latency and answering PID, while a strategy restarts the server N times:
//!
//! - `naive-kill`, `naive-term`: SIGKILL (or SIGTERM and wait for the exit),
//!   then start a new process;
//! - `reuseport-migrate0`, `reuseport-migrate1`: the seed's way (a second
//!   process beside the old one on its own `SO_REUSEPORT` socket, wait until
//!   the new PID answers `/healthz`, SIGTERM the old one), in a network
//!   namespace of the bench's own with `net.ipv4.tcp_migrate_req` 0 and 1;
//! - `reload`: `pid-server reload --pid <current>`;
//! - `systemd-restart`, `systemd-reload`: `systemctl restart` (the socket
//!   unit holds the queue) and `systemctl reload` in a container booted by
//!   the test support crate's `nspawn` (`tests/support/`).
//!
//! Then the steady state of `GET /`: pid-server against a minimal Go
//! net/http server (`benches/go/main.go`) and nginx `return 200`, with the
//! same client. Tables go to stdout (Markdown), progress to stderr, raw
//! results to `<target>/bench-results/restarts.json` and a picture to
//! `<target>/bench-results/restarts.svg`.
//!
//! Everything the bench starts (servers, network namespaces, the container)
//! is owned by a guard whose `Drop` stops and reaps it, also on a panic; a
//! SIGINT/SIGTERM makes the bench stop early and clean up.

use pid_server_test_support::nspawn;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pid-server under test: built by `cargo bench` itself with the
/// `bench` profile (release settings), i.e. `target/release/pid-server`.
const PID_SERVER: &str = env!("CARGO_BIN_EXE_pid-server");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const SERVICE: &str = "pid-server.service";
const SOCKET: &str = "pid-server.socket";
const NETNS_PREFIX: &str = "pidbench-";
/// The first requests of a run (connections opening, caches warming) are
/// not part of its "before restarts" baseline.
const BASELINE_SKIP: Duration = Duration::from_millis(250);
const STARTLIMIT_DROPIN: &str = "/etc/systemd/system/pid-server.service.d/bench-start-limit.conf";

const STRATEGIES: [&str; 7] = [
    "naive-kill",
    "naive-term",
    "reuseport-migrate0",
    "reuseport-migrate1",
    "reload",
    "systemd-restart",
    "systemd-reload",
];

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE: &str = "\
usage: cargo bench --bench restarts -- [OPTIONS]

  --restarts N          restarts per strategy and client mode (20; --quick: 3)
  --spacing-ms MS       time between the starts of two restarts (500; --quick: 400)
  --warmup-ms MS        load before the first restart (2500; --quick: 1500); what comes
                        before the first restart's window is the run's own baseline
  --settle-ms MS        load after the last restart (1000; --quick: 500)
  --concurrency N       concurrent connections of the load client (32)
  --client-threads N    threads of the load client (2)
  --timeout-ms MS       a request (connect, send, whole response) fails after this (5000)
  --window-ms MS        \"around restarts\": requests started within this of a restart (1000)
  --steady-secs S       steady-state load per server and client mode (6; --quick: 1)
  --bucket-ms MS        time resolution of the JSON timeline and the picture (50)
  --strategies LIST     comma-separated subset of naive-kill,naive-term,reuseport-migrate0,
                        reuseport-migrate1,reload,systemd-restart,systemd-reload (all)
  --modes LIST          keep-alive,one-shot (both)
  --no-compare          skip the steady-state comparison with Go and nginx
  --quick               a short smoke run: 3 restarts each, 1 s steady state
  --check               exit 1 if `pid-server reload` failed a request (or could not run)
  --out DIR             where restarts.json, restarts.svg and logs/ go
                        (<target dir>/bench-results)
";

#[derive(Debug, Clone)]
struct Args {
    restarts: usize,
    spacing: Duration,
    warmup: Duration,
    settle: Duration,
    concurrency: usize,
    client_threads: usize,
    timeout: Duration,
    window: Duration,
    steady: Duration,
    bucket: Duration,
    strategies: Vec<String>,
    modes: Vec<Mode>,
    compare: bool,
    quick: bool,
    check: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut quick = false;
    let mut check = false;
    let mut compare = true;
    let mut nums: HashMap<&'static str, u64> = HashMap::new();
    let mut strategies: Option<Vec<String>> = None;
    let mut modes: Option<Vec<Mode>> = None;
    let mut out: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    const NUMERIC: [&str; 11] = [
        "--restarts",
        "--spacing-ms",
        "--warmup-ms",
        "--settle-ms",
        "--concurrency",
        "--client-threads",
        "--timeout-ms",
        "--window-ms",
        "--steady-secs",
        "--bucket-ms",
        "--steady-ms",
    ];
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            // `cargo bench` passes this to every harness = false target.
            "--bench" => {}
            "--quick" => quick = true,
            "--check" => check = true,
            "--no-compare" => compare = false,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--strategies" => {
                let v = value("--strategies")?;
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for s in &list {
                    if !STRATEGIES.contains(&s.as_str()) {
                        return Err(format!("unknown strategy {s:?}"));
                    }
                }
                strategies = Some(list);
            }
            "--modes" => {
                let v = value("--modes")?;
                let mut list = Vec::new();
                for m in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    list.push(match m {
                        "keep-alive" | "keepalive" => Mode::KeepAlive,
                        "one-shot" | "oneshot" => Mode::OneShot,
                        _ => return Err(format!("unknown client mode {m:?}")),
                    });
                }
                modes = Some(list);
            }
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            f if NUMERIC.contains(&f) => {
                let key = NUMERIC.iter().find(|k| **k == f).unwrap();
                let v = value(f)?;
                let n: u64 = v.parse().map_err(|_| format!("{f}: not a number: {v:?}"))?;
                nums.insert(key, n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let num = |k: &str, normal: u64, quick_v: u64| -> u64 {
        nums.get(k)
            .copied()
            .unwrap_or(if quick { quick_v } else { normal })
    };
    let ms = |k: &str, normal: u64, quick_v: u64| Duration::from_millis(num(k, normal, quick_v));
    let args = Args {
        restarts: num("--restarts", 20, 3) as usize,
        spacing: ms("--spacing-ms", 500, 400),
        warmup: ms("--warmup-ms", 2500, 1500),
        settle: ms("--settle-ms", 1000, 500),
        concurrency: num("--concurrency", 32, 32) as usize,
        client_threads: num("--client-threads", 2, 2) as usize,
        timeout: ms("--timeout-ms", 5000, 5000),
        window: ms("--window-ms", 1000, 1000),
        steady: match nums.get("--steady-ms") {
            Some(&v) => Duration::from_millis(v),
            None => Duration::from_secs(num("--steady-secs", 6, 1)),
        },
        bucket: ms("--bucket-ms", 50, 50),
        strategies: strategies.unwrap_or_else(|| STRATEGIES.map(String::from).to_vec()),
        modes: modes.unwrap_or_else(|| vec![Mode::KeepAlive, Mode::OneShot]),
        compare,
        quick,
        check,
        out: out.unwrap_or_else(|| target_dir().join("bench-results")),
    };
    if args.concurrency == 0 || args.client_threads == 0 {
        return Err("--concurrency and --client-threads must be at least 1".into());
    }
    if args.bucket.is_zero() || args.timeout.is_zero() {
        return Err("--bucket-ms and --timeout-ms must be at least 1".into());
    }
    if args.modes.is_empty() {
        return Err("--modes: no client mode".into());
    }
    Ok(args)
}

/// The target dir this bench was built in (`target/` by default): the
/// pid-server binary is `<target>/release/pid-server`.
fn target_dir() -> PathBuf {
    Path::new(PID_SERVER)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(MANIFEST_DIR).join("target"))
}

// ---------------------------------------------------------------------------
// Stopping early (SIGINT, SIGTERM, SIGHUP)
// ---------------------------------------------------------------------------

static ABORT: AtomicBool = AtomicBool::new(false);

fn aborted() -> bool {
    ABORT.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    if ABORT.swap(true, Ordering::SeqCst) {
        // A second one: give up at once (async-signal-safe).
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(130) };
    }
}

/// SIGINT/SIGTERM/SIGHUP ask the bench to stop after the current step and
/// clean up (a second one exits at once, without cleaning up). A handler,
/// not a blocked mask: children inherit the signal mask (Rust's `Command`
/// does not reset it), and a server started with SIGTERM blocked would
/// never see one.
fn catch_signals() {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        if let Err(e) = unsafe { sigaction(s, &action) } {
            eprintln!("bench: cannot handle {s} ({e}); it will not clean up");
        }
    }
}

/// Sleeps until `until`, waking early when the bench is asked to stop.
fn sleep_until(until: Instant) {
    loop {
        let now = Instant::now();
        if now >= until || aborted() {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------
// Processes the bench starts
// ---------------------------------------------------------------------------

/// Servers started by the bench. Each direct child leads a process group of
/// its own (a pid-server's later generations, nginx's workers stay in it),
/// gets SIGKILL if the bench dies (`PR_SET_PDEATHSIG`; spawn only from the
/// main thread), and `Drop` SIGTERMs every group, then SIGKILLs what is
/// left, and reaps everything (the bench is a child subreaper, so orphaned
/// generations come back to it).
struct Procs {
    children: Vec<(Child, String)>,
    pgids: Vec<i32>,
    log: File,
}

impl Procs {
    fn new(log: &Path) -> Result<Procs, String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        Ok(Procs {
            children: Vec::new(),
            pgids: Vec::new(),
            log,
        })
    }

    fn spawn(&mut self, mut cmd: Command, what: &str) -> Result<u32, String> {
        let out = self.log.try_clone().map_err(|e| e.to_string())?;
        let err = self.log.try_clone().map_err(|e| e.to_string())?;
        let parent = std::process::id() as i32;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .process_group(0);
        // SAFETY: sigprocmask, prctl and getppid are async-signal-safe;
        // nothing is allocated between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A clean signal mask whatever the bench inherited: Rust's
                // spawn passes its own on, and a server with SIGTERM
                // blocked would never drain.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid().as_raw() != parent {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("start {what}: {e}"))?;
        let pid = child.id();
        self.pgids.push(pid as i32);
        self.children.push((child, what.to_string()));
        Ok(pid)
    }

    /// Waits until the direct child `pid` has exited (and reaps it).
    fn wait(&mut self, pid: u32, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        let Some(i) = self.children.iter().position(|(c, _)| c.id() == pid) else {
            return Err(format!("{pid} is not a child of the bench"));
        };
        loop {
            match self.children[i].0.try_wait() {
                Ok(Some(st)) => {
                    self.children.remove(i);
                    return Ok(st);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("wait for {pid}: {e}")),
            }
            if Instant::now() >= deadline {
                return Err(format!("{pid} did not exit within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reaps children and adopted orphans of our groups that have exited.
    fn reap(&mut self) {
        self.children
            .retain_mut(|(c, _)| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
        let ours: Vec<u32> = self.children.iter().map(|(c, _)| c.id()).collect();
        for (pid, pgid) in adopted_children() {
            if self.pgids.contains(&pgid) && !ours.contains(&pid) {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
    }

    fn groups_alive(&mut self) -> bool {
        self.reap();
        self.pgids
            .iter()
            .any(|&g| kill(Pid::from_raw(-g), None::<Signal>).is_ok())
    }

    /// SIGTERM every group, wait up to `grace`, SIGKILL what is left, reap.
    fn shutdown(&mut self, grace: Duration) {
        for &g in &self.pgids {
            let _ = kill(Pid::from_raw(-g), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while self.groups_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        for &g in &self.pgids {
            let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.groups_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if self.groups_alive() {
            eprintln!("bench: processes left in groups {:?}", self.pgids);
        }
        self.pgids.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(3));
    }
}

/// (pid, process group) of every process whose parent is this process.
fn adopted_children() -> Vec<(u32, i32)> {
    let me = std::process::id() as i64;
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(ppid), Some(pgrp)) = (
            f.get(1).and_then(|s| s.parse::<i64>().ok()),
            f.get(2).and_then(|s| s.parse::<i32>().ok()),
        ) && ppid == me
        {
            v.push((pid, pgrp));
        }
    }
    v
}

/// Runs a short command, bounded; Ok(stdout) if it exits 0.
fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let what = format!("`{program} {}`", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: timed out after {timeout:?}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn pid_server_cmd(port: u16) -> Command {
    let mut cmd = Command::new(PID_SERVER);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM");
    cmd
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// A network namespace made with `ip netns add`, with `lo` up; `Drop`
/// deletes it. Every process in it must be gone by then (declare it before
/// the servers that run in it).
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(tag: &str, migrate_req: u8) -> Result<NetNs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root (`ip netns add` needs CAP_SYS_ADMIN)".into());
        }
        let name = format!("{NETNS_PREFIX}{}-{tag}", std::process::id());
        let t = Duration::from_secs(10);
        run_cmd("ip", &["netns", "add", &name], t)?;
        let ns = NetNs { name };
        run_cmd("ip", &["-n", &ns.name, "link", "set", "lo", "up"], t)?;
        let setting = format!("net.ipv4.tcp_migrate_req={migrate_req}");
        run_cmd(
            "ip",
            &["netns", "exec", &ns.name, "sysctl", "-q", "-w", &setting],
            t,
        )
        .map_err(|e| format!("{e} (needs Linux 5.14+)"))?;
        let now = run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-n",
                "net.ipv4.tcp_migrate_req",
            ],
            t,
        )?;
        if now.trim() != migrate_req.to_string() {
            return Err(format!(
                "net.ipv4.tcp_migrate_req is {} in {}, not {migrate_req}",
                now.trim(),
                ns.name
            ));
        }
        Ok(ns)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// Processes and threads it starts meanwhile are in the namespace too.
    fn enter(&self) -> Result<InNetNs, String> {
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| format!("open /run/netns/{}: {e}", self.name))?;
        nix::sched::setns(&target, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", self.name))?;
        Ok(InNetNs { home })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name], Duration::from_secs(10)) {
            eprintln!("bench: {e}");
        }
    }
}

struct InNetNs {
    home: File,
}

impl Drop for InNetNs {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.home, CloneFlags::CLONE_NEWNET) {
            // Carrying on in the wrong namespace would measure the wrong thing.
            eprintln!("bench: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Deletes namespaces left by benches that died before their `Drop`.
fn sweep_stale_netns() {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("bench: deleting network namespace {name} (bench {owner} is gone)");
            let _ = run_cmd("ip", &["netns", "del", &name], Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------
// Blocking probes (controller side)
// ---------------------------------------------------------------------------

/// The PID `/healthz` reports, on a fresh connection.
fn healthz_pid(port: u16) -> Option<u32> {
    let (status, body) =
        nspawn::try_http_get_timeout(port, "/healthz", Duration::from_secs(1)).ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v.get("pid")?.as_u64().map(|p| p as u32)
}

/// Polls `/healthz` (new connection each time) until it reports `pid`.
fn wait_for_pid(port: u16, pid: u32, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if healthz_pid(port) == Some(pid) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "PID {pid} did not answer /healthz on port {port} within {timeout:?}"
            ));
        }
        if aborted() {
            return Err("interrupted".into());
        }
        thread::sleep(Duration::from_millis(3));
    }
}

/// Polls `GET /` until it answers 200.
fn wait_serving(port: u16, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let last = match nspawn::try_http_get_timeout(port, "/", Duration::from_secs(1)) {
            Ok((200, _)) => return Ok(()),
            Ok((s, b)) => format!("{s} {b}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= timeout || aborted() {
            return Err(format!(
                "port {port} not serving within {timeout:?}: {last}"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// The load client
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Connections are kept and reused until the server closes them (or a
    /// request on them fails); a failure on a reused connection counts.
    KeepAlive,
    /// `Connection: close`, one request per new connection.
    OneShot,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::OneShot => "one-shot",
        }
    }
}

/// A request's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
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

const KINDS: [Kind; 7] = [
    Kind::Ok,
    Kind::Status,
    Kind::Refused,
    Kind::Reset,
    Kind::Eof,
    Kind::Timeout,
    Kind::Other,
];

impl Kind {
    fn name(self) -> &'static str {
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
    fn index(self) -> usize {
        self as usize
    }
}

fn classify(e: &io::Error) -> Kind {
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
struct Rec {
    /// When it started, µs after the load's start.
    start_us: u64,
    /// Until the whole response (or the failure), µs.
    lat_us: u32,
    /// The PID in the body (0 if none).
    pid: u32,
    kind: Kind,
    /// Sent on a connection that had already carried a request.
    reused: bool,
}

impl Rec {
    fn end_us(&self) -> u64 {
        self.start_us + self.lat_us as u64
    }
}

#[derive(Clone, Debug)]
struct FailRec {
    start_us: u64,
    lat_us: u32,
    kind: Kind,
    reused: bool,
    error: String,
}

struct Response {
    status: u16,
    pid: u32,
    close: bool,
}

struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
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

    async fn read_response(&mut self) -> io::Result<Response> {
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
            .and_then(|b| b.trim().strip_prefix("OK. Handled by PID: "))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(Response { status, pid, close })
    }
}

async fn exchange(conn: &mut Option<Conn>, addr: SocketAddr, req: &[u8]) -> io::Result<Response> {
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
struct LoadCfg {
    port: u16,
    mode: Mode,
    concurrency: usize,
    threads: usize,
    timeout: Duration,
    /// Hard bounds, whatever the controller does.
    max_duration: Duration,
    max_requests: u64,
}

#[derive(Default)]
struct WorkerOut {
    recs: Vec<Rec>,
    fails: Vec<FailRec>,
}

async fn worker(cfg: Arc<LoadCfg>, t0: Instant, stop: Arc<AtomicBool>) -> WorkerOut {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.port));
    let req: &[u8] = match cfg.mode {
        Mode::KeepAlive => b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pid-server-bench\r\n\r\n",
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
    let mut conn: Option<Conn> = None;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < max {
        sent += 1;
        let start = Instant::now();
        let reused = conn.is_some();
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
        let start_us = start.duration_since(t0).as_micros() as u64;
        let lat_us = lat.as_micros().min(u32::MAX as u128) as u32;
        out.recs.push(Rec {
            start_us,
            lat_us,
            pid,
            kind,
            reused,
        });
        if let Some(error) = error {
            out.fails.push(FailRec {
                start_us,
                lat_us,
                kind,
                reused,
                error,
            });
        }
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
    }
    out
}

struct Load {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WorkerOut>>,
    t0: Instant,
}

struct LoadData {
    recs: Vec<Rec>,
    fails: Vec<FailRec>,
    duration: Duration,
}

impl Load {
    /// Starts the client's threads (in the calling thread's network
    /// namespace) and its connections.
    fn start(cfg: LoadCfg) -> Result<Load, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .thread_name("load")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("load client runtime: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let cfg = Arc::new(cfg);
        let tasks = (0..cfg.concurrency)
            .map(|_| rt.spawn(worker(cfg.clone(), t0, stop.clone())))
            .collect();
        Ok(Load {
            rt,
            stop,
            tasks,
            t0,
        })
    }

    fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    fn finish(self) -> LoadData {
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

fn load_cfg(args: &Args, port: u16, mode: Mode, planned: Duration) -> LoadCfg {
    LoadCfg {
        port,
        mode,
        concurrency: args.concurrency,
        threads: args.client_threads,
        timeout: args.timeout,
        max_duration: planned * 3 + Duration::from_secs(120),
        max_requests: 50_000_000,
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

#[derive(Clone, Debug)]
struct RestartEvent {
    /// When the restart began, after the load's start.
    at: Duration,
    /// How long the restart's command took (for `reuseport-*` this
    /// includes waiting for the new PID's `/healthz`).
    took: Duration,
    old_pid: u32,
    new_pid: u32,
    error: Option<String>,
    /// From `at` until the load got a 200 from `new_pid`.
    until_new: Option<Duration>,
    /// From `at` until the last 200 from `old_pid`.
    last_old: Option<Duration>,
    /// Failed requests started from `at` until the next restart (or the
    /// end of the load).
    failed_after: u64,
}

struct Bucket {
    start: Duration,
    answers: BTreeMap<u32, u64>,
    failed: [u64; 7],
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

struct RunResult {
    strategy: String,
    mode: Mode,
    duration: Duration,
    sent: u64,
    by_kind: [u64; 7],
    failed_on_reused: u64,
    lat_all: Histogram<u64>,
    lat_win: Histogram<u64>,
    /// 200s started before the first restart's window (after the first
    /// 250 ms): the same process and connections, not yet restarted.
    lat_before: Histogram<u64>,
    restarts: Vec<RestartEvent>,
    timeline: Vec<Bucket>,
    failures: Vec<FailRec>,
    /// (pid, 200s), in order of the first answer.
    pids: Vec<(u32, u64)>,
    note: Option<String>,
}

impl RunResult {
    fn failed(&self) -> u64 {
        self.sent - self.by_kind[Kind::Ok.index()]
    }
    fn restarts_with_failures(&self) -> usize {
        self.restarts.iter().filter(|r| r.failed_after > 0).count()
    }
    fn restarts_ok(&self) -> usize {
        self.restarts.iter().filter(|r| r.error.is_none()).count()
    }
    fn median_until_new(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.restarts.iter().filter_map(|r| r.until_new).collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }
}

fn analyze(
    strategy: &str,
    mode: Mode,
    data: LoadData,
    mut restarts: Vec<RestartEvent>,
    args: &Args,
    note: Option<String>,
) -> RunResult {
    let window_us = args.window.as_micros() as u64;
    let starts: Vec<u64> = restarts.iter().map(|r| r.at.as_micros() as u64).collect();
    let near_restart = |t: u64| -> bool {
        let i = starts.partition_point(|&s| s < t);
        (i < starts.len() && starts[i] - t <= window_us)
            || (i > 0 && t - starts[i - 1] <= window_us)
    };
    let mut by_kind = [0u64; 7];
    let mut failed_on_reused = 0;
    let mut lat_all = new_hist();
    let mut lat_win = new_hist();
    let mut lat_before = new_hist();
    let before = (
        BASELINE_SKIP.as_micros() as u64,
        starts
            .first()
            .map(|&f| f.saturating_sub(window_us))
            .unwrap_or(u64::MAX),
    );
    let mut ends: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut pids: Vec<(u32, u64)> = Vec::new();
    let bucket_us = args.bucket.as_micros().max(1) as u64;
    let nb = (data.duration.as_micros() as u64 / bucket_us + 1) as usize;
    let mut bl: Vec<Vec<u32>> = vec![Vec::new(); nb];
    let mut timeline: Vec<Bucket> = (0..nb)
        .map(|i| Bucket {
            start: Duration::from_micros(i as u64 * bucket_us),
            answers: BTreeMap::new(),
            failed: [0; 7],
            p50_us: 0,
            p99_us: 0,
            max_us: 0,
        })
        .collect();
    for r in &data.recs {
        by_kind[r.kind.index()] += 1;
        if r.kind != Kind::Ok {
            let i = starts.partition_point(|&s| s <= r.start_us);
            if i > 0 {
                restarts[i - 1].failed_after += 1;
            }
        }
        let b = ((r.start_us / bucket_us) as usize).min(nb - 1);
        if r.kind == Kind::Ok {
            lat_all.saturating_record(r.lat_us.max(1) as u64);
            if near_restart(r.start_us) {
                lat_win.saturating_record(r.lat_us.max(1) as u64);
            }
            if r.start_us >= before.0 && r.start_us < before.1 {
                lat_before.saturating_record(r.lat_us.max(1) as u64);
            }
            ends.entry(r.pid).or_default().push(r.end_us());
            match pids.iter_mut().find(|(p, _)| *p == r.pid) {
                Some((_, n)) => *n += 1,
                None => pids.push((r.pid, 1)),
            }
            *timeline[b].answers.entry(r.pid).or_default() += 1;
            bl[b].push(r.lat_us);
        } else {
            timeline[b].failed[r.kind.index()] += 1;
            if r.reused {
                failed_on_reused += 1;
            }
        }
    }
    for (b, lats) in timeline.iter_mut().zip(bl.iter_mut()) {
        if lats.is_empty() {
            continue;
        }
        lats.sort_unstable();
        let q = |f: f64| lats[((lats.len() - 1) as f64 * f).round() as usize] as u64;
        b.p50_us = q(0.5);
        b.p99_us = q(0.99);
        b.max_us = *lats.last().unwrap() as u64;
    }
    for v in ends.values_mut() {
        v.sort_unstable();
    }
    for r in &mut restarts {
        let at = r.at.as_micros() as u64;
        if r.new_pid != 0
            && let Some(v) = ends.get(&r.new_pid)
        {
            let i = v.partition_point(|&e| e < at);
            r.until_new = v.get(i).map(|&e| Duration::from_micros(e - at));
        }
        if let Some(v) = ends.get(&r.old_pid) {
            r.last_old = v
                .last()
                .map(|&e| Duration::from_micros(e.saturating_sub(at)));
        }
    }
    RunResult {
        strategy: strategy.to_string(),
        mode,
        duration: data.duration,
        sent: data.recs.len() as u64,
        by_kind,
        failed_on_reused,
        lat_all,
        lat_win,
        lat_before,
        restarts,
        timeline,
        failures: data.fails,
        pids,
        note,
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

trait Strategy {
    fn port(&self) -> u16;
    /// The PID that serves now.
    fn pid(&self) -> u32;
    /// One restart; returns the new PID.
    fn restart(&mut self) -> Result<u32, String>;
    /// Between restarts: reap what exited.
    fn tidy(&mut self) {}
}

/// pid-server processes started by the bench on 127.0.0.1:port.
struct Plain {
    port: u16,
    procs: Procs,
    pid: u32,
}

impl Plain {
    fn start(port: u16, log: &Path) -> Result<Plain, String> {
        let mut procs = Procs::new(log)?;
        let pid = procs.spawn(pid_server_cmd(port), "pid-server")?;
        wait_for_pid(port, pid, Duration::from_secs(10))?;
        Ok(Plain { port, procs, pid })
    }
}

/// SIGKILL (or SIGTERM and wait for the exit), then start a new process.
struct Naive {
    p: Plain,
    signal: Signal,
}

impl Strategy for Naive {
    fn port(&self) -> u16 {
        self.p.port
    }
    fn pid(&self) -> u32 {
        self.p.pid
    }
    fn restart(&mut self) -> Result<u32, String> {
        let old = self.p.pid;
        kill(Pid::from_raw(old as i32), self.signal).map_err(|e| format!("kill {old}: {e}"))?;
        let bound = if self.signal == Signal::SIGKILL {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(40) // above pid-server's 30 s drain
        };
        self.p.procs.wait(old, bound)?;
        let new = self
            .p
            .procs
            .spawn(pid_server_cmd(self.p.port), "pid-server")?;
        self.p.pid = new;
        Ok(new)
    }
}

/// The seed's way: a new process beside the old one (its own SO_REUSEPORT
/// socket), wait until the new PID answers /healthz, SIGTERM the old one.
struct ReusePort {
    p: Plain,
}

impl Strategy for ReusePort {
    fn port(&self) -> u16 {
        self.p.port
    }
    fn pid(&self) -> u32 {
        self.p.pid
    }
    fn restart(&mut self) -> Result<u32, String> {
        let old = self.p.pid;
        let new = self
            .p
            .procs
            .spawn(pid_server_cmd(self.p.port), "pid-server")?;
        wait_for_pid(self.p.port, new, Duration::from_secs(10))?;
        kill(Pid::from_raw(old as i32), Signal::SIGTERM).map_err(|e| format!("kill {old}: {e}"))?;
        self.p.pid = new;
        Ok(new)
    }
    fn tidy(&mut self) {
        self.p.procs.reap();
    }
}

/// `pid-server reload --pid <current>`.
struct Reload {
    p: Plain,
}

fn parse_reloaded(line: &str) -> Option<(u32, u32)> {
    // reloaded: OLD -> NEW (generation G) in MS ms
    let rest = line.trim().strip_prefix("reloaded: ")?;
    let (old, rest) = rest.split_once(" -> ")?;
    let new = rest.split_whitespace().next()?;
    Some((old.parse().ok()?, new.parse().ok()?))
}

impl Strategy for Reload {
    fn port(&self) -> u16 {
        self.p.port
    }
    fn pid(&self) -> u32 {
        self.p.pid
    }
    fn restart(&mut self) -> Result<u32, String> {
        let old = self.p.pid.to_string();
        let out = run_cmd(
            PID_SERVER,
            &["reload", "--pid", &old, "--timeout", "30"],
            Duration::from_secs(40),
        )?;
        let (o, new) = parse_reloaded(&out)
            .ok_or_else(|| format!("unexpected output of pid-server reload: {out:?}"))?;
        if o != self.p.pid {
            return Err(format!("reload answered for {o}, asked {old}"));
        }
        self.p.pid = new;
        Ok(new)
    }
    fn tidy(&mut self) {
        self.p.procs.reap();
    }
}

/// `systemctl restart pid-server.service` or `systemctl reload pid-server`
/// in the container.
struct Systemd<'a> {
    c: &'a nspawn::Container,
    port: u16,
    reload: bool,
    pid: u32,
}

fn container_main_pid(c: &nspawn::Container) -> Result<u32, String> {
    let out = c.exec_timeout(
        &[
            "systemctl",
            "--no-pager",
            "show",
            "-p",
            "MainPID",
            "--value",
            SERVICE,
        ],
        Duration::from_secs(30),
    )?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim().parse().map_err(|e| format!("MainPID {s:?}: {e}"))
}

fn container_systemctl(c: &nspawn::Container, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["systemctl", "--no-pager"];
    full.extend_from_slice(args);
    let out = c.exec_timeout(&full, Duration::from_secs(90))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`systemctl {}`: {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Strategy for Systemd<'_> {
    fn port(&self) -> u16 {
        self.port
    }
    fn pid(&self) -> u32 {
        self.pid
    }
    fn restart(&mut self) -> Result<u32, String> {
        if self.reload {
            container_systemctl(self.c, &["reload", "pid-server"])?;
        } else {
            container_systemctl(self.c, &["restart", SERVICE])?;
        }
        let new = container_main_pid(self.c)?;
        if new == 0 || new == self.pid {
            return Err(format!(
                "MainPID is {new} after the restart (was {})",
                self.pid
            ));
        }
        self.pid = new;
        Ok(new)
    }
}

/// Load on, N restarts spaced evenly, load off; then the numbers.
fn run_restarts(
    args: &Args,
    name: &str,
    mode: Mode,
    s: &mut dyn Strategy,
    note: Option<String>,
) -> Result<RunResult, String> {
    let planned = args.warmup + args.spacing * args.restarts as u32 + args.settle;
    eprintln!(
        "bench: {name} / {}: {} restarts, {} connections, about {:.1} s",
        mode.name(),
        args.restarts,
        args.concurrency,
        planned.as_secs_f64()
    );
    let load = Load::start(load_cfg(args, s.port(), mode, planned))?;
    let mut events = Vec::new();
    for i in 0..args.restarts {
        sleep_until(load.t0 + args.warmup + args.spacing * i as u32);
        if aborted() {
            break;
        }
        let old = s.pid();
        let at = load.elapsed();
        let started = Instant::now();
        let r = s.restart();
        let took = started.elapsed();
        let (new_pid, error) = match r {
            Ok(new) => {
                // Serving before the next restart, whatever the strategy
                // waited for (not part of `took`).
                match wait_for_pid(s.port(), new, Duration::from_secs(20)) {
                    Ok(_) => (new, None),
                    Err(e) => (new, Some(e)),
                }
            }
            Err(e) => (0, Some(e)),
        };
        if let Some(e) = &error {
            eprintln!("bench: {name} / {} restart {}: {e}", mode.name(), i + 1);
        }
        events.push(RestartEvent {
            at,
            took,
            old_pid: old,
            new_pid,
            error,
            until_new: None,
            last_old: None,
            failed_after: 0,
        });
        s.tidy();
    }
    sleep_until(Instant::now() + args.settle);
    let data = load.finish();
    s.tidy();
    let r = analyze(name, mode, data, events, args, note);
    eprintln!(
        "bench: {name} / {}: {} requests, {} failed",
        mode.name(),
        r.sent,
        r.failed()
    );
    Ok(r)
}

fn log_path(args: &Args, name: &str) -> PathBuf {
    args.out.join("logs").join(format!("{name}.log"))
}

/// What did not run, and why.
struct Skips(Vec<(String, String)>);

impl Skips {
    fn add(&mut self, what: &str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("bench: SKIPPED {what}: {why}");
        self.0.push((what.to_string(), why));
    }
}

fn run_plain_strategies(args: &Args, runs: &mut Vec<RunResult>, skips: &mut Skips) {
    for name in ["naive-kill", "naive-term", "reload"] {
        if !args.strategies.iter().any(|s| s == name) {
            continue;
        }
        for &mode in &args.modes {
            if aborted() {
                return;
            }
            let label = format!("{name}-{}", mode.name());
            let port = nspawn::free_port();
            let r = Plain::start(port, &log_path(args, &label)).and_then(|p| {
                let mut s: Box<dyn Strategy> = match name {
                    "naive-kill" => Box::new(Naive {
                        p,
                        signal: Signal::SIGKILL,
                    }),
                    "naive-term" => Box::new(Naive {
                        p,
                        signal: Signal::SIGTERM,
                    }),
                    _ => Box::new(Reload { p }),
                };
                run_restarts(args, name, mode, s.as_mut(), None)
            });
            match r {
                Ok(r) => runs.push(r),
                Err(e) => skips.add(&format!("{name} / {}", mode.name()), e),
            }
        }
    }
}

fn run_reuseport(args: &Args, runs: &mut Vec<RunResult>, skips: &mut Skips) {
    for (name, migrate) in [("reuseport-migrate0", 0u8), ("reuseport-migrate1", 1u8)] {
        if !args.strategies.iter().any(|s| s == name) {
            continue;
        }
        for &mode in &args.modes {
            if aborted() {
                return;
            }
            let label = format!("{name}-{}", mode.name());
            let tag = format!("m{migrate}-{}", mode.name());
            let r = (|| {
                // Declared in this order, dropped in reverse: servers, then
                // back to our namespace, then the namespace goes.
                let ns = NetNs::create(&tag, migrate)?;
                let _inside = ns.enter()?;
                let p = Plain::start(8080, &log_path(args, &label))?;
                let mut s = ReusePort { p };
                let note = format!(
                    "in network namespace {} with net.ipv4.tcp_migrate_req={migrate}",
                    ns.name
                );
                run_restarts(args, name, mode, &mut s, Some(note))
            })();
            match r {
                Ok(r) => runs.push(r),
                Err(e) => skips.add(&format!("{name} / {}", mode.name()), e),
            }
        }
    }
}

fn run_systemd(args: &Args, runs: &mut Vec<RunResult>, skips: &mut Skips) {
    let wanted: Vec<&str> = ["systemd-restart", "systemd-reload"]
        .into_iter()
        .filter(|n| args.strategies.iter().any(|s| s == n))
        .collect();
    if wanted.is_empty() || aborted() {
        return;
    }
    let all = || wanted.join(", ");
    if let Err(why) = nspawn::container_support() {
        skips.add(&all(), why);
        return;
    }
    let port = nspawn::free_port();
    eprintln!("bench: booting a systemd container for {}", all());
    // systemd's default start limit (5 starts in 10 s) would fail the unit,
    // and its socket with it, a few restarts into a run at the bench's pace.
    let opts = nspawn::BootOptions::new(PID_SERVER, port).dropin(
        STARTLIMIT_DROPIN,
        "# benches/restarts.rs: restarts every few hundred ms are the point here\n\
         [Unit]\nStartLimitIntervalSec=0\n",
    );
    let booted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nspawn::Container::boot(&opts)
    }));
    let c = match booted {
        Ok(c) => c,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            let first = msg.lines().next().unwrap_or_default().to_string();
            skips.add(&all(), format!("the container did not boot: {first}"));
            return;
        }
    };
    // Serving, socket-activated, before every run (also after a run that
    // left the unit failed).
    let ready = || {
        // (Fails for units not loaded yet: nothing to reset then.)
        let _ = container_systemctl(&c, &["reset-failed", SERVICE, SOCKET]);
        container_systemctl(&c, &["start", SOCKET])
            .and_then(|()| wait_serving(port, Duration::from_secs(20)))
            .and_then(|()| container_main_pid(&c))
            .and_then(|pid| wait_for_pid(port, pid, Duration::from_secs(10)).map(|_| pid))
    };
    let note = format!(
        "systemd {} in container {} (boot {} ms); drop-in StartLimitIntervalSec=0",
        systemd_version(),
        c.name(),
        c.boot_time().as_millis()
    );
    for name in wanted {
        for &mode in &args.modes {
            if aborted() {
                return;
            }
            let pid = match ready() {
                Ok(pid) => pid,
                Err(e) => {
                    skips.add(
                        &format!("{name} / {}", mode.name()),
                        format!("pid-server is not serving in the container: {e}"),
                    );
                    continue;
                }
            };
            let mut s = Systemd {
                c: &c,
                port,
                reload: name == "systemd-reload",
                pid,
            };
            match run_restarts(args, name, mode, &mut s, Some(note.clone())) {
                Ok(r) => runs.push(r),
                Err(e) => skips.add(&format!("{name} / {}", mode.name()), e),
            }
        }
    }
    let _ = c.exec_timeout(
        &["systemctl", "--no-pager", "stop", SERVICE, SOCKET],
        Duration::from_secs(60),
    );
}

fn systemd_version() -> String {
    run_cmd("systemctl", &["--version"], Duration::from_secs(5))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------
// Steady state: pid-server vs Go net/http vs nginx
// ---------------------------------------------------------------------------

struct SteadyResult {
    server: String,
    mode: Mode,
    requests: u64,
    seconds: f64,
    failed: u64,
    lat: Histogram<u64>,
}

impl SteadyResult {
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

struct Contender {
    name: &'static str,
    port: u16,
}

fn build_go(args: &Args) -> Result<PathBuf, String> {
    let go = find_program("go")
        .ok_or("`go` not found (apt-get install golang-go; see .ci/bench-deps)")?;
    let dir = Path::new(MANIFEST_DIR).join("benches/go");
    let bin_dir = args.out.join("bin");
    fs::create_dir_all(&bin_dir).map_err(|e| format!("mkdir {}: {e}", bin_dir.display()))?;
    let bin = bin_dir.join("go-pid-server");
    let cache = args.out.join("go").join("cache");
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&dir)
        .env("GOCACHE", &cache)
        .env("GOPATH", args.out.join("go").join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("go build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "go build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bin)
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/lib/go/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn go_version() -> String {
    find_program("go")
        .and_then(|g| Command::new(g).arg("version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn nginx_version() -> String {
    find_program("nginx")
        .and_then(|n| Command::new(n).arg("-v").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

/// nginx as its own master with a config, prefix and temp paths in `dir`.
fn nginx_cmd(port: u16, dir: &Path) -> Result<Command, String> {
    let nginx = find_program("nginx")
        .ok_or("`nginx` not found (apt-get install nginx; see .ci/bench-deps)")?;
    let d = dir.display();
    let conf = format!(
        "# Written by benches/restarts.rs\n\
         daemon off;\n\
         master_process on;\n\
         worker_processes auto;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   # like pid-server and Go: no cap on requests per connection\n\
         \x20   keepalive_requests 100000000;\n\
         \x20   keepalive_timeout 75s;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} reuseport;\n\
         \x20       location / {{\n\
         \x20           default_type text/plain;\n\
         \x20           return 200 \"OK. Handled by PID: $pid\\n\";\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    );
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {d}: {e}"))?;
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).map_err(|e| format!("write {}: {e}", conf_path.display()))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

/// Temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("pid-server-bench-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_steady(args: &Args, skips: &mut Skips) -> Vec<SteadyResult> {
    let mut results = Vec::new();
    if args.steady.is_zero() || aborted() {
        return results;
    }
    let tmp = match TempDir::new("nginx") {
        Ok(t) => t,
        Err(e) => {
            skips.add("steady state", e);
            return results;
        }
    };
    let mut procs = match Procs::new(&log_path(args, "steady")) {
        Ok(p) => p,
        Err(e) => {
            skips.add("steady state", e);
            return results;
        }
    };
    let mut contenders = Vec::new();
    let port = nspawn::free_port();
    match procs
        .spawn(pid_server_cmd(port), "pid-server")
        .and_then(|pid| wait_for_pid(port, pid, Duration::from_secs(10)))
    {
        Ok(_) => contenders.push(Contender {
            name: "pid-server",
            port,
        }),
        Err(e) => {
            skips.add("steady state", format!("pid-server did not start: {e}"));
            return results;
        }
    }
    if args.compare {
        eprintln!("bench: building benches/go with `go build`");
        let port = nspawn::free_port();
        match build_go(args).and_then(|bin| {
            let mut cmd = Command::new(bin);
            cmd.args(["-listen", &format!("127.0.0.1:{port}")]);
            procs.spawn(cmd, "go-pid-server")?;
            wait_serving(port, Duration::from_secs(10))
        }) {
            Ok(()) => contenders.push(Contender {
                name: "go net/http",
                port,
            }),
            Err(e) => skips.add("go net/http (steady state)", e),
        }
        let port = nspawn::free_port();
        match nginx_cmd(port, &tmp.0).and_then(|cmd| {
            procs.spawn(cmd, "nginx")?;
            wait_serving(port, Duration::from_secs(10))
        }) {
            Ok(()) => contenders.push(Contender {
                name: "nginx",
                port,
            }),
            Err(e) => skips.add("nginx (steady state)", e),
        }
    }
    // Each server twice, in the order A B C C B A, half the time each: a
    // drift in the machine's speed affects them alike.
    let half = args.steady / 2;
    let warm = Duration::from_millis(250).min(half / 2);
    let mut order: Vec<usize> = (0..contenders.len()).collect();
    order.extend((0..contenders.len()).rev());
    for &mode in &args.modes {
        let mut per: Vec<SteadyResult> = contenders
            .iter()
            .map(|c| SteadyResult {
                server: c.name.to_string(),
                mode,
                requests: 0,
                seconds: 0.0,
                failed: 0,
                lat: new_hist(),
            })
            .collect();
        for &i in &order {
            if aborted() {
                break;
            }
            let c = &contenders[i];
            eprintln!(
                "bench: steady state, {} / {}: {:.1} s",
                c.name,
                mode.name(),
                (half + warm).as_secs_f64()
            );
            let load = match Load::start(load_cfg(args, c.port, mode, half + warm)) {
                Ok(l) => l,
                Err(e) => {
                    skips.add("steady state", e);
                    return results;
                }
            };
            sleep_until(load.t0 + warm + half);
            let data = load.finish();
            let from = warm.as_micros() as u64;
            let to = (warm + half).as_micros() as u64;
            let r = &mut per[i];
            for rec in data
                .recs
                .iter()
                .filter(|r| r.start_us >= from && r.start_us < to)
            {
                if rec.kind == Kind::Ok {
                    r.requests += 1;
                    r.lat.saturating_record(rec.lat_us.max(1) as u64);
                } else {
                    r.failed += 1;
                }
            }
            r.seconds += (to - from) as f64 / 1e6;
        }
        results.extend(per);
    }
    drop(procs);
    results
}

// ---------------------------------------------------------------------------
// Output: Markdown, JSON, SVG
// ---------------------------------------------------------------------------

fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn hist_ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "–".into()
    } else if q >= 1.0 {
        ms(h.max())
    } else {
        ms(h.value_at_quantile(q))
    }
}

fn restart_table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| strategy | client | restarts ok | sent | failed | refused | reset | eof | timeout | non-200 | other \
         | p50 ms | p99 ms | max ms | p99 before | p50 ±1s | p99 ±1s | max ±1s \
         | restart → new PID, median ms |\n",
    );
    s.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in runs {
        let k = |kind: Kind| r.by_kind[kind.index()].to_string();
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.strategy,
            r.mode.name(),
            r.restarts_ok(),
            r.restarts.len(),
            r.sent,
            r.failed(),
            k(Kind::Refused),
            k(Kind::Reset),
            k(Kind::Eof),
            k(Kind::Timeout),
            k(Kind::Status),
            k(Kind::Other),
            hist_ms(&r.lat_all, 0.5),
            hist_ms(&r.lat_all, 0.99),
            hist_ms(&r.lat_all, 1.0),
            hist_ms(&r.lat_before, 0.99),
            hist_ms(&r.lat_win, 0.5),
            hist_ms(&r.lat_win, 0.99),
            hist_ms(&r.lat_win, 1.0),
            r.median_until_new()
                .map(|d| ms(d.as_micros() as u64))
                .unwrap_or_else(|| "–".into()),
        );
    }
    s
}

fn steady_table(steady: &[SteadyResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| server | client | requests | req/s | vs pid-server | p50 ms | p99 ms | max ms | failed |\n",
    );
    s.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in steady {
        let base = steady
            .iter()
            .find(|b| b.mode == r.mode && b.server == "pid-server")
            .map(SteadyResult::rps)
            .unwrap_or(0.0);
        let ratio = if base > 0.0 {
            format!("{:.2}×", r.rps() / base)
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            r.server,
            r.mode.name(),
            r.requests,
            r.rps(),
            ratio,
            hist_ms(&r.lat, 0.5),
            hist_ms(&r.lat, 0.99),
            hist_ms(&r.lat, 1.0),
            r.failed
        );
    }
    s
}

/// The answers to "did the reload fail anything", "p99 around reloads vs
/// steady", "throughput vs Go". Returns the text and whether the reload
/// strategy failed no request in every mode it ran (false if it did not run).
fn verdicts(args: &Args, runs: &[RunResult], steady: &[SteadyResult]) -> (String, bool) {
    let mut s = String::new();
    let reloads: Vec<&RunResult> = runs.iter().filter(|r| r.strategy == "reload").collect();
    let mut clean = !reloads.is_empty();
    for r in &reloads {
        let ok = r.failed() == 0 && r.restarts_ok() == r.restarts.len();
        clean &= ok;
        let _ = writeln!(
            s,
            "- `pid-server reload`, {}: {} of {} reloads done, {} requests, {} failed{} → {}",
            r.mode.name(),
            r.restarts_ok(),
            r.restarts.len(),
            r.sent,
            r.failed(),
            if r.failed_on_reused > 0 {
                format!(" ({} on reused connections)", r.failed_on_reused)
            } else {
                String::new()
            },
            if ok { "zero failures" } else { "FAILURES" }
        );
        if r.lat_win.is_empty() {
            continue;
        }
        let win_p99 = r.lat_win.value_at_quantile(0.99);
        let mut against = Vec::new();
        if !r.lat_before.is_empty() {
            against.push((
                "the same run before its first reload",
                r.lat_before.value_at_quantile(0.99),
            ));
        }
        if let Some(b) = steady
            .iter()
            .find(|b| b.mode == r.mode && b.server == "pid-server")
            && !b.lat.is_empty()
        {
            against.push(("the steady-state run", b.lat.value_at_quantile(0.99)));
        }
        for (what, base) in against {
            let ratio = win_p99 as f64 / base.max(1) as f64;
            let _ = writeln!(
                s,
                "- p99 within ±{} ms of reloads, {}: {} ms vs {} ms in {what} → {:.2}× ({})",
                args.window.as_millis(),
                r.mode.name(),
                ms(win_p99),
                ms(base),
                ratio,
                if ratio <= 2.0 {
                    "within 2×"
                } else {
                    "NOT within 2×"
                }
            );
        }
    }
    if reloads.is_empty() {
        let _ = writeln!(s, "- `pid-server reload` did not run");
    }
    for &mode in &args.modes {
        let find = |name: &str| {
            steady
                .iter()
                .find(|r| r.mode == mode && r.server == name)
                .map(SteadyResult::rps)
        };
        if let (Some(p), Some(g)) = (find("pid-server"), find("go net/http"))
            && p > 0.0
        {
            let _ = writeln!(
                s,
                "- throughput, {}: pid-server {:.0} req/s, Go net/http {:.0} req/s: Go = {:.2}× pid-server, pid-server = {:.2}× Go",
                mode.name(),
                p,
                g,
                g / p,
                p / g.max(1e-9)
            );
        }
    }
    (s, clean)
}

fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

fn kinds_json(k: &[u64; 7]) -> Value {
    let mut m = serde_json::Map::new();
    for kind in KINDS {
        m.insert(kind.name().into(), json!(k[kind.index()]));
    }
    Value::Object(m)
}

const MAX_FAILURES_IN_JSON: usize = 500;

fn run_json(r: &RunResult, args: &Args) -> Value {
    let ms_f = |d: Duration| d.as_secs_f64() * 1000.0;
    json!({
        "strategy": r.strategy,
        "client": r.mode.name(),
        "note": r.note,
        "concurrency": args.concurrency,
        "duration_s": r.duration.as_secs_f64(),
        "sent": r.sent,
        "ok": r.by_kind[Kind::Ok.index()],
        "failed": r.failed(),
        "failed_on_reused_connections": r.failed_on_reused,
        "restarts_with_failures": r.restarts_with_failures(),
        "by_kind": kinds_json(&r.by_kind),
        "latency_ok": {
            "overall": hist_json(&r.lat_all),
            "around_restarts": hist_json(&r.lat_win),
            "before_restarts": hist_json(&r.lat_before),
        },
        "median_restart_until_new_pid_ms": r.median_until_new().map(ms_f),
        "restarts": r.restarts.iter().map(|e| json!({
            "at_ms": ms_f(e.at),
            "command_ms": ms_f(e.took),
            "old_pid": e.old_pid,
            "new_pid": e.new_pid,
            "error": e.error,
            "until_new_pid_answered_ms": e.until_new.map(ms_f),
            "until_old_pid_last_answered_ms": e.last_old.map(ms_f),
            "failed_until_next_restart": e.failed_after,
        })).collect::<Vec<_>>(),
        "answers_by_pid": r.pids.iter().map(|(p, n)| json!({"pid": p, "ok": n})).collect::<Vec<_>>(),
        "failures_total": r.failures.len(),
        "failures": r.failures.iter().take(MAX_FAILURES_IN_JSON).map(|f| json!({
            "at_ms": f.start_us as f64 / 1000.0,
            "latency_ms": f.lat_us as f64 / 1000.0,
            "kind": f.kind.name(),
            "reused_connection": f.reused,
            "error": f.error,
        })).collect::<Vec<_>>(),
        "timeline": {
            "bucket_ms": args.bucket.as_secs_f64() * 1000.0,
            "buckets": r.timeline.iter().map(|b| json!({
                "t_ms": ms_f(b.start),
                "ok_by_pid": b.answers.iter().map(|(p, n)| (p.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "failed": kinds_json(&b.failed),
                "p50_us": b.p50_us,
                "p99_us": b.p99_us,
                "max_us": b.max_us,
            })).collect::<Vec<_>>(),
        },
    })
}

fn steady_json(s: &[SteadyResult]) -> Value {
    Value::Array(
        s.iter()
            .map(|r| {
                let base = s
                    .iter()
                    .find(|b| b.mode == r.mode && b.server == "pid-server")
                    .map(SteadyResult::rps)
                    .unwrap_or(0.0);
                json!({
                    "server": r.server,
                    "client": r.mode.name(),
                    "requests_ok": r.requests,
                    "failed": r.failed,
                    "seconds": r.seconds,
                    "rps": r.rps(),
                    "ratio_to_pid_server": if base > 0.0 { Some(r.rps() / base) } else { None },
                    "latency_ok": hist_json(&r.lat),
                })
            })
            .collect(),
    )
}

mod svg {
    use super::*;
    use plotters::coord::Shift;
    use plotters::prelude::*;

    type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

    fn e<E: std::fmt::Debug>(err: E) -> String {
        format!("{err:?}")
    }

    const GREY: RGBColor = RGBColor(150, 150, 150);
    const ORANGE: RGBColor = RGBColor(230, 140, 0);

    pub fn draw(
        path: &Path,
        runs: &[RunResult],
        modes: &[Mode],
        bucket: Duration,
    ) -> Result<(), String> {
        let mut strategies: Vec<&str> = Vec::new();
        for r in runs {
            if !strategies.contains(&r.strategy.as_str()) {
                strategies.push(&r.strategy);
            }
        }
        let (cw, ch) = (820u32, 430u32);
        let cols = modes.len().max(1) as u32;
        let rows = strategies.len().max(1) as u32;
        let root = SVGBackend::new(path, (cw * cols, 50 + ch * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let (title, body) = root.split_vertically(50u32);
        title
            .draw_text(
                "pid-server restarts: answers per bucket coloured by answering PID (red × = failed \
                 requests, dashed = restart begins); latency of 200s below (p50 blue, p99 orange, max red)",
                &("sans-serif", 15).into_text_style(&title),
                (10, 18),
            )
            .map_err(e)?;
        let cells = body.split_evenly((rows as usize, cols as usize));
        for r in runs {
            let row = strategies
                .iter()
                .position(|s| *s == r.strategy)
                .unwrap_or(0);
            let col = modes.iter().position(|m| *m == r.mode).unwrap_or(0);
            let cell = &cells[row * cols as usize + col];
            draw_run(cell, r, bucket)?;
        }
        root.present().map_err(e)
    }

    fn draw_run(area: &Area<'_>, r: &RunResult, bucket: Duration) -> Result<(), String> {
        let (_, h) = area.dim_in_pixel();
        let (upper, lower) = area.split_vertically(h * 58 / 100);
        let secs = r.duration.as_secs_f64().max(0.1);
        let bw = bucket.as_secs_f64();
        let total = |b: &Bucket| b.answers.values().sum::<u64>();
        let ymax = r.timeline.iter().map(total).max().unwrap_or(1).max(1) as f64 * 1.2;
        let color_of: HashMap<u32, usize> = r
            .pids
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (*p, i))
            .collect();
        let caption = format!(
            "{} / {}: {} sent, {} failed, {} PIDs",
            r.strategy,
            r.mode.name(),
            r.sent,
            r.failed(),
            r.pids.len()
        );
        let mut chart = ChartBuilder::on(&upper)
            .caption(caption, ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(18)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..secs, 0f64..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(format!("200s / {} ms", bucket.as_millis()))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for ev in &r.restarts {
            let t = ev.at.as_secs_f64();
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(t, 0.0), (t, ymax)],
                    4,
                    3,
                    GREY.stroke_width(1),
                ))
                .map_err(e)?;
        }
        let mut rects = Vec::new();
        for b in &r.timeline {
            let x0 = b.start.as_secs_f64();
            let mut y = 0.0;
            for (pid, n) in &b.answers {
                let c = Palette99::pick(color_of.get(pid).copied().unwrap_or(0));
                let y1 = y + *n as f64;
                rects.push(Rectangle::new([(x0, y), (x0 + bw, y1)], c.filled()));
                y = y1;
            }
        }
        chart.draw_series(rects).map_err(e)?;
        chart
            .draw_series(
                r.timeline
                    .iter()
                    .filter(|b| b.failed.iter().sum::<u64>() > 0)
                    .map(|b| {
                        Cross::new(
                            (b.start.as_secs_f64() + bw / 2.0, ymax * 0.93),
                            5,
                            RED.stroke_width(2),
                        )
                    }),
            )
            .map_err(e)?;

        let lat_max = r
            .timeline
            .iter()
            .map(|b| b.max_us)
            .max()
            .unwrap_or(1000)
            .max(1000) as f64
            / 1000.0
            * 2.0;
        let mut lc = ChartBuilder::on(&lower)
            .margin(6)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..secs, (0.01f64..lat_max).log_scale())
            .map_err(e)?;
        lc.configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|v| format!("{v}"))
            .x_desc("seconds")
            .y_desc("latency ms")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for ev in &r.restarts {
            let t = ev.at.as_secs_f64();
            lc.draw_series(DashedLineSeries::new(
                vec![(t, 0.01), (t, lat_max)],
                4,
                3,
                GREY.stroke_width(1),
            ))
            .map_err(e)?;
        }
        // One line per stretch of buckets with answers: no line across a gap.
        let lines = |f: fn(&Bucket) -> u64| {
            let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for b in &r.timeline {
                if b.max_us == 0 {
                    if !out.last().is_some_and(Vec::is_empty) {
                        out.push(Vec::new());
                    }
                    continue;
                }
                let y = (f(b) as f64 / 1000.0).max(0.01);
                out.last_mut()
                    .expect("never empty")
                    .push((b.start.as_secs_f64() + bw / 2.0, y));
            }
            out
        };
        type Field = fn(&Bucket) -> u64;
        let series: [(Field, ShapeStyle); 3] = [
            (|b| b.max_us, RED.mix(0.5).stroke_width(1)),
            (|b| b.p99_us, ORANGE.stroke_width(1)),
            (|b| b.p50_us, BLUE.stroke_width(1)),
        ];
        for (f, style) in series {
            for line in lines(f) {
                if line.len() == 1 {
                    lc.draw_series(std::iter::once(Circle::new(line[0], 1, style)))
                        .map_err(e)?;
                } else if !line.is_empty() {
                    lc.draw_series(LineSeries::new(line, style)).map_err(e)?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}\n\n{USAGE}");
            std::process::exit(64);
        }
    };
    catch_signals();
    // Orphaned pid-server generations (after a reload, or an old process
    // that outlived its parent) come back to us to be reaped.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    sweep_stale_netns();
    let started = Instant::now();
    if let Err(e) = fs::create_dir_all(args.out.join("logs")) {
        eprintln!("bench: mkdir {}: {e}", args.out.display());
        std::process::exit(1);
    }
    eprintln!(
        "bench: pid-server binary {PID_SERVER} (built by cargo bench, bench profile = release)"
    );
    let mut runs = Vec::new();
    let mut skips = Skips(Vec::new());

    run_plain_strategies(&args, &mut runs, &mut skips);
    run_reuseport(&args, &mut runs, &mut skips);
    run_systemd(&args, &mut runs, &mut skips);
    let steady = run_steady(&args, &mut skips);
    // Table order: the order the strategies are listed in.
    runs.sort_by_key(|r| {
        (
            STRATEGIES
                .iter()
                .position(|s| *s == r.strategy)
                .unwrap_or(99),
            args.modes.iter().position(|m| *m == r.mode).unwrap_or(9),
        )
    });
    let wall = started.elapsed();

    let (verdict, reload_clean) = verdicts(&args, &runs, &steady);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Restarts under load\n\n{} restarts per row, {} ms apart, after {} ms of load; \
         {} connections from {} client threads; latency of 200s; ±1s = requests started \
         within {} ms of a restart's start.\n",
        args.restarts,
        args.spacing.as_millis(),
        args.warmup.as_millis(),
        args.concurrency,
        args.client_threads,
        args.window.as_millis()
    );
    out.push_str(&restart_table(&runs));
    if !steady.is_empty() {
        let _ = writeln!(
            out,
            "\n## Steady state, GET /\n\n{:.1} s per server and client mode ({} connections, {} client threads), same client for all.\n",
            args.steady.as_secs_f64(),
            args.concurrency,
            args.client_threads
        );
        out.push_str(&steady_table(&steady));
    }
    if !skips.0.is_empty() {
        out.push_str("\n## Skipped\n\n");
        for (what, why) in &skips.0 {
            let _ = writeln!(out, "- SKIPPED {what}: {why}");
        }
    }
    out.push_str("\n## Verdict\n\n");
    out.push_str(&verdict);
    if aborted() {
        out.push_str("\n**Interrupted**: the results above are partial.\n");
    }
    let _ = writeln!(out, "\nWall time: {:.1} s", wall.as_secs_f64());

    let json_path = args.out.join("restarts.json");
    let svg_path = args.out.join("restarts.svg");
    let doc = json!({
        "bench": "restarts",
        "command": std::env::args().collect::<Vec<_>>(),
        "pid_server_binary": PID_SERVER,
        "machine": {
            "cores": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_at_end": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "host_tcp_migrate_req": fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default().trim(),
            "go": go_version(),
            "nginx": nginx_version(),
        },
        "settings": {
            "restarts": args.restarts,
            "spacing_ms": args.spacing.as_millis() as u64,
            "warmup_ms": args.warmup.as_millis() as u64,
            "settle_ms": args.settle.as_millis() as u64,
            "concurrency": args.concurrency,
            "client_threads": args.client_threads,
            "timeout_ms": args.timeout.as_millis() as u64,
            "window_ms": args.window.as_millis() as u64,
            "steady_ms": args.steady.as_millis() as u64,
            "quick": args.quick,
        },
        "wall_time_s": wall.as_secs_f64(),
        "runs": runs.iter().map(|r| run_json(r, &args)).collect::<Vec<_>>(),
        "steady_state": steady_json(&steady),
        "skipped": skips.0.iter().map(|(w, y)| json!({"what": w, "why": y})).collect::<Vec<_>>(),
        "reload_zero_failures": reload_clean,
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match fs::write(&json_path, text) {
            Ok(()) => {
                let _ = writeln!(out, "Raw results: {}", json_path.display());
            }
            Err(e) => eprintln!("bench: write {}: {e}", json_path.display()),
        },
        Err(e) => eprintln!("bench: JSON: {e}"),
    }
    if !runs.is_empty() {
        match svg::draw(&svg_path, &runs, &args.modes, args.bucket) {
            Ok(()) => {
                let _ = writeln!(out, "Picture: {}", svg_path.display());
            }
            Err(e) => eprintln!("bench: SVG: {e}"),
        }
    }
    let _ = writeln!(out, "Server logs: {}", args.out.join("logs").display());
    print!("{out}");
    if aborted() {
        std::process::exit(130);
    }
    if args.check && !reload_clean {
        eprintln!("bench: --check: `pid-server reload` failed requests or did not run");
        std::process::exit(1);
    }
}
