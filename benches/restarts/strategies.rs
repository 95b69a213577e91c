//! The restart strategies, and the run that restarts a server under load
//! with one of them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pid_server_test_support::deploy;
use pid_server_test_support::netns::Netns;

use crate::cli::Args;
use crate::load::{Load, Mode, load_cfg};
use crate::nspawn;
use crate::procs::{Procs, TempDir, aborted, run_cmd, sleep_until};
use crate::results::{RestartEvent, RunResult, analyze};
use crate::servers::{
    NginxSite, NginxWorkers, PID_SERVER, nginx_cmd, pid_server_cmd, wait_for_pid, wait_serving,
};

pub(crate) const STRATEGIES: [&str; 10] = [
    "naive-kill",
    "naive-term",
    "reuseport-migrate0",
    "reuseport-migrate1",
    "reload",
    "systemd-restart",
    "systemd-restart-no-store",
    "systemd-reload",
    "systemd-kill",
    "nginx-reload",
];
/// The strategies that run in the systemd container, in the order they run:
/// the one without the file descriptor store last, so that its drop-in is
/// written once (see [`run_systemd`]).
const SYSTEMD_STRATEGIES: [&str; 4] = [
    "systemd-restart",
    "systemd-reload",
    "systemd-kill",
    "systemd-restart-no-store",
];
pub(crate) const SERVICE: &str = "pid-server.service";
pub(crate) const SOCKET: &str = "pid-server.socket";
const STARTLIMIT_DROPIN: &str = "/etc/systemd/system/pid-server.service.d/bench-start-limit.conf";
/// `systemd-restart-no-store`: the unit's file descriptor store off (the
/// behaviour before it: idle connections closed at a stop).
pub(crate) const NO_STORE_DROPIN: &str =
    "/etc/systemd/system/pid-server.service.d/bench-no-fd-store.conf";
pub(crate) const NO_STORE_CONTENTS: &str = "# benches/restarts: restarts without the file descriptor store, for comparison\n\
     [Service]\nEnvironment=PID_SERVER_FD_STORE_CONNECTIONS=0\n";

trait Strategy {
    /// Where the load goes.
    fn port(&self) -> u16;
    /// Where the bench asks `/healthz` whether the new PID serves: the
    /// server itself, not a proxy in front of it.
    fn probe_port(&self) -> u16 {
        self.port()
    }
    /// The PID that serves now.
    fn pid(&self) -> u32;
    /// One restart; returns the new PID.
    fn restart(&mut self) -> Result<u32, String>;
    /// Between restarts: reap what exited.
    fn tidy(&mut self) {}
}

/// pid-server processes started by the bench on 127.0.0.1:port.
struct Plain {
    pub(crate) port: u16,
    procs: Procs,
    pub(crate) pid: u32,
}

impl Plain {
    pub(crate) fn start(port: u16, log: &Path) -> Result<Plain, String> {
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

pub(crate) fn parse_reloaded(line: &str) -> Option<(u32, u32)> {
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

/// nginx in front of a pid-server (kept upstream connections), and
/// `pid-server reload` behind it: what clients of a proxy see when the
/// server behind it is replaced.
struct NginxReload {
    /// nginx's master and workers; stopped before `dir` goes.
    _nginx: Procs,
    dir: TempDir,
    port: u16,
    backend: Reload,
}

impl NginxReload {
    fn start(args: &Args, label: &str) -> Result<NginxReload, String> {
        let backend_port = nspawn::free_port();
        let backend = Reload {
            p: Plain::start(backend_port, &log_path(args, label))?,
        };
        let dir = TempDir::new(&format!("nginx-front-{label}"))?;
        let port = nspawn::free_port();
        let mut nginx = Procs::new(&log_path(args, &format!("{label}-nginx")))?;
        nginx.spawn(
            nginx_cmd(
                port,
                &dir.0,
                NginxSite::ProxyTo(backend_port),
                NginxWorkers::Auto,
            )?,
            "nginx",
        )?;
        wait_for_pid(port, backend.p.pid, Duration::from_secs(10))?;
        Ok(NginxReload {
            _nginx: nginx,
            dir,
            port,
            backend,
        })
    }
}

impl NginxReload {
    /// The lines of nginx's error log about its upstream (a kept upstream
    /// connection closed or reset under a request, which nginx then tries
    /// again on a new one, or answers 502): what the proxy hid, or did not.
    fn upstream_errors(&self) -> usize {
        fs::read_to_string(self.dir.0.join("error.log"))
            .map(|log| log.lines().filter(|l| l.contains("upstream")).count())
            .unwrap_or(0)
    }
}

impl Strategy for NginxReload {
    fn port(&self) -> u16 {
        self.port
    }
    fn probe_port(&self) -> u16 {
        self.backend.p.port
    }
    fn pid(&self) -> u32 {
        self.backend.pid()
    }
    fn restart(&mut self) -> Result<u32, String> {
        self.backend.restart()
    }
    fn tidy(&mut self) {
        self.backend.tidy();
    }
}

/// How [`Systemd`] restarts the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SystemdWay {
    /// `systemctl restart pid-server.service`.
    Restart,
    /// `systemctl reload pid-server`.
    Reload,
    /// A crash: SIGKILL to the main process (`systemctl kill
    /// --kill-who=main -s KILL`); the unit's `Restart=on-failure` starts it
    /// again `RestartSec=1` later, from the socket unit's queue.
    Kill,
}

/// `systemctl restart pid-server.service`, `systemctl reload pid-server` or
/// SIGKILL of the main process, in the container.
struct Systemd<'a> {
    c: &'a nspawn::Container,
    pub(crate) port: u16,
    way: SystemdWay,
    pub(crate) pid: u32,
}

/// After a SIGKILL: the unit's automatic restart (`RestartSec=1`) must have
/// a new main process within this.
const KILL_RESTART_BOUND: Duration = Duration::from_secs(30);

pub(crate) fn container_main_pid(c: &nspawn::Container) -> Result<u32, String> {
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

pub(crate) fn container_systemctl(c: &nspawn::Container, args: &[&str]) -> Result<(), String> {
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
        match self.way {
            SystemdWay::Reload => container_systemctl(self.c, &["reload", "pid-server"])?,
            SystemdWay::Restart => container_systemctl(self.c, &["restart", SERVICE])?,
            SystemdWay::Kill => {
                container_systemctl(self.c, &["kill", "--kill-who=main", "-s", "KILL", SERVICE])?;
                // MainPID is the killed one until systemd reaps it, then 0
                // through RestartSec=, then the new one.
                let deadline = Instant::now() + KILL_RESTART_BOUND;
                loop {
                    let now = container_main_pid(self.c)?;
                    if now != 0 && now != self.pid {
                        break;
                    }
                    if Instant::now() > deadline || aborted() {
                        return Err(format!(
                            "no new MainPID within {KILL_RESTART_BOUND:?} of SIGKILL to {} (now {now})",
                            self.pid
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
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

/// The load after the last restart: for paused clients at least their
/// longest pause (and a little), so that every connection open at the last
/// restart sends once more and its fate is seen.
fn settle_for(args: &Args, mode: Mode) -> Duration {
    match mode {
        Mode::Paused => args.settle.max(args.pause_max + Duration::from_millis(250)),
        _ => args.settle,
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
    let settle = settle_for(args, mode);
    let planned = args.warmup + args.spacing * args.restarts as u32 + settle;
    let cfg = load_cfg(args, s.port(), mode, planned);
    eprintln!(
        "bench: {name} / {}: {} restarts, {} connections, about {:.1} s",
        mode.name(),
        args.restarts,
        cfg.concurrency,
        planned.as_secs_f64()
    );
    let load = Load::start(cfg)?;
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
                match wait_for_pid(s.probe_port(), new, Duration::from_secs(20)) {
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
            kept: None,
        });
        s.tidy();
    }
    sleep_until(Instant::now() + settle);
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

pub(crate) fn log_path(args: &Args, name: &str) -> PathBuf {
    args.out.join("logs").join(format!("{name}.log"))
}

/// What did not run, and why.
#[derive(Default)]
pub(crate) struct Skips(pub(crate) Vec<(String, String)>);

impl Skips {
    pub(crate) fn add(&mut self, what: &str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("bench: SKIPPED {what}: {why}");
        self.0.push((what.to_string(), why));
    }
}

/// Every strategy asked for, in turn, in every client mode; the runs in the
/// order of [`STRATEGIES`].
pub(crate) fn run_all(args: &Args, skips: &mut Skips) -> Vec<RunResult> {
    let mut runs = Vec::new();
    run_plain_strategies(args, &mut runs, skips);
    run_reuseport(args, &mut runs, skips);
    run_systemd(args, &mut runs, skips);
    run_nginx_reload(args, &mut runs, skips);
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
    runs
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

fn run_nginx_reload(args: &Args, runs: &mut Vec<RunResult>, skips: &mut Skips) {
    let name = "nginx-reload";
    if !args.strategies.iter().any(|s| s == name) {
        return;
    }
    for &mode in &args.modes {
        if aborted() {
            return;
        }
        let label = format!("{name}-{}", mode.name());
        let r = NginxReload::start(args, &label).and_then(|mut s| {
            let note = format!(
                "nginx on port {} in front of pid-server on port {} (upstream keepalive)",
                s.port, s.backend.p.port
            );
            let mut r = run_restarts(args, name, mode, &mut s, Some(note))?;
            let errors = s.upstream_errors();
            if let Some(n) = &mut r.note {
                n.push_str(&format!(
                    "; nginx's error log: {errors} lines about its upstream"
                ));
            }
            Ok(r)
        });
        match r {
            Ok(r) => runs.push(r),
            Err(e) => skips.add(&format!("{name} / {}", mode.name()), e),
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
            let r = (|| {
                // Declared in this order, dropped in reverse: servers, then
                // back to our namespace, then the namespace goes.
                let ns = Netns::try_new().map_err(|e| format!("network namespace: {e}"))?;
                ns.sysctl("net.ipv4.tcp_migrate_req", &migrate.to_string())
                    .map_err(|e| format!("{e} (needs Linux 5.14+)"))?;
                let _inside = ns.enter_here();
                let p = Plain::start(8080, &log_path(args, &label))?;
                let mut s = ReusePort { p };
                let note = format!(
                    "in network namespace {} with net.ipv4.tcp_migrate_req={migrate}",
                    ns.name()
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

/// Boots a container for the bench (the systemd tests' harness) with
/// pid-server's units on `port`, from the host's `/usr` or the tree
/// `--debian` names, or says why not: a boot, and a tree's first
/// debootstrap, panic on failure, with what went wrong.
pub(crate) fn boot_container(args: &Args, port: u16) -> Result<nspawn::Container, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut opts = start_limit_dropin(nspawn::BootOptions::new(PID_SERVER, port));
        if let Some(release) = args.debian {
            // The host's network (the bench's clients are there), unlike
            // the suite's containers.
            opts.recipe = nspawn::Recipe::Tree(deploy::debian_tree(release));
        }
        nspawn::Container::boot(&opts)
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        let first = msg.lines().next().unwrap_or_default().to_string();
        format!("the container did not boot: {first}")
    })
}

/// The drop-in that lifts systemd's start limit, for any container of the
/// bench: systemd's default (5 starts in 10 s) would fail the unit, and its
/// socket with it, a few restarts into a run at the bench's pace.
fn start_limit_dropin(opts: nspawn::BootOptions) -> nspawn::BootOptions {
    opts.dropin(
        STARTLIMIT_DROPIN,
        "# benches/restarts/strategies.rs: restarts every few hundred ms are the point here\n\
         [Unit]\nStartLimitIntervalSec=0\n",
    )
}

/// Serving, socket-activated (also after a run that left the unit failed):
/// the main PID, answering on `port`.
pub(crate) fn container_ready(c: &nspawn::Container, port: u16) -> Result<u32, String> {
    // (Fails for units not loaded yet: nothing to reset then.)
    let _ = container_systemctl(c, &["reset-failed", SERVICE, SOCKET]);
    container_systemctl(c, &["start", SOCKET])
        .and_then(|()| wait_serving(port, Duration::from_secs(20)))
        .and_then(|()| container_main_pid(c))
        .and_then(|pid| wait_for_pid(port, pid, Duration::from_secs(10)).map(|_| pid))
}

/// Turns the unit's file descriptor store off (`on` false: writes
/// [`NO_STORE_DROPIN`]) or back on (removes it), then `daemon-reload` and a
/// restart, so that the running process has the setting.
pub(crate) fn set_fd_store(c: &nspawn::Container, on: bool) -> Result<(), String> {
    let path = c.host_path(NO_STORE_DROPIN);
    if on {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("rm {}: {e}", path.display())),
        }
    } else {
        c.write_file(NO_STORE_DROPIN, NO_STORE_CONTENTS.as_bytes(), 0o644);
    }
    container_systemctl(c, &["daemon-reload"])?;
    container_systemctl(c, &["restart", SERVICE])
}

fn run_systemd(args: &Args, runs: &mut Vec<RunResult>, skips: &mut Skips) {
    let wanted: Vec<&str> = SYSTEMD_STRATEGIES
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
    let c = match boot_container(args, port) {
        Ok(c) => c,
        Err(why) => {
            skips.add(&all(), why);
            return;
        }
    };
    let note = format!(
        "systemd {} in container {} (boot {} ms); drop-in StartLimitIntervalSec=0",
        c.systemd_version(),
        c.name(),
        c.boot_time().as_millis()
    );
    for name in wanted {
        let (way, note) = match name {
            "systemd-reload" => (SystemdWay::Reload, note.clone()),
            "systemd-kill" => (
                SystemdWay::Kill,
                format!(
                    "{note}; a restart is SIGKILL to MainPID (systemctl kill --kill-who=main), \
                     the unit's Restart=on-failure starts it again after RestartSec=1"
                ),
            ),
            "systemd-restart-no-store" => {
                // The same container with one more drop-in, rather than a
                // second container: a boot costs seconds and a teardown, the
                // drop-in a daemon-reload and a restart, and these runs come
                // last, so the store is switched off once.
                if let Err(e) = set_fd_store(&c, false) {
                    for &mode in &args.modes {
                        skips.add(
                            &format!("{name} / {}", mode.name()),
                            format!("turning the store off: {e}"),
                        );
                    }
                    continue;
                }
                (
                    SystemdWay::Restart,
                    format!("{note}; drop-in PID_SERVER_FD_STORE_CONNECTIONS=0 (store off)"),
                )
            }
            _ => (SystemdWay::Restart, note.clone()),
        };
        for &mode in &args.modes {
            if aborted() {
                return;
            }
            let pid = match container_ready(&c, port) {
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
                way,
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
