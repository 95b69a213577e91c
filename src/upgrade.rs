//! The handover: start the next generation on the very same sockets and wait
//! until it says it is ready.
//!
//! Both sides live here:
//! - the old process [`spawn`]s the new one with every listening socket at
//!   fds 3.. in systemd's format (`LISTEN_FDS`, `LISTEN_FDNAMES`; no
//!   `LISTEN_PID`, which cannot be known before exec and which listenfd and
//!   `sd_listen_fds(3)` treat as "for you"), plus the write end of a pipe
//!   (`PID_SERVER_READY_FD`) and its generation + 1;
//! - the new process, once it accepts and systemd knows it as `MAINPID`,
//!   writes `ready` to that pipe ([`report_ready`]).
//!
//! The old process waits for that line, the child's exit, or the timeout,
//! whichever comes first; it never guesses from timing or polls the public
//! port (either process may answer there).

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

/// The environment variable naming the ready pipe's fd in the new process.
pub const READY_FD_ENV: &str = "PID_SERVER_READY_FD";
/// The environment variable carrying the new process's generation.
pub const GENERATION_ENV: &str = "PID_SERVER_GENERATION";

/// How to start the next generation: fixed at start-up.
#[derive(Debug)]
pub struct Plan {
    /// The path this binary was started from, resolved at start-up: after a
    /// package upgrade it holds the new binary, while `/proc/self/exe`
    /// still points at the old, deleted one.
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// The next generation's number.
    pub generation: u32,
    /// Second descriptors of our listening sockets, with their names.
    pub sockets: Vec<(OwnedFd, String)>,
    /// Where those sockets came from originally.
    pub origin: crate::listeners::Origin,
}

/// Why a handover did not happen. The old process keeps serving in every
/// case.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot start {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("new process {pid} {status} before it was ready")]
    Exited { pid: u32, status: String },
    #[error("new process {pid} was not ready within {}s; killed it", timeout.as_secs())]
    NotReady { pid: u32, timeout: Duration },
    #[error("new process {pid} closed its ready channel without reporting ready")]
    ChannelClosed { pid: u32 },
}

/// A new generation that has been started and not yet reported ready.
pub struct Pending {
    pub pid: u32,
    pub generation: u32,
    pub started: Instant,
    timeout: Duration,
    child: tokio::process::Child,
    /// `true` once the child wrote `ready`; `false` on EOF or junk. Read by
    /// a task of its own so that waiting for it can be cancelled and resumed.
    ready: tokio::sync::oneshot::Receiver<bool>,
}

/// Starts the next generation. Its stdout and stderr are ours (the same
/// journal stream under systemd).
pub fn spawn(plan: &Plan, timeout: Duration) -> Result<Pending, Failure> {
    let spawn_err = |source| Failure::Spawn {
        exe: plan.exe.display().to_string(),
        source,
    };
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
    let n = plan.sockets.len();
    // The fds to place at 3, 4, ... in the child, in order: the sockets,
    // then the ready pipe.
    let sources: Vec<RawFd> = plan
        .sockets
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .chain([ready_write.as_raw_fd()])
        .collect();
    let names: Vec<&str> = plan.sockets.iter().map(|(_, name)| name.as_str()).collect();

    let mut cmd = std::process::Command::new(&plan.exe);
    cmd.args(&plan.args)
        .env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env(crate::listeners::ORIGIN_ENV, plan.origin.to_string())
        .env(READY_FD_ENV, (3 + n).to_string())
        .env(GENERATION_ENV, plan.generation.to_string())
        // Watchdog pings are accepted from any process of the unit; a stale
        // WATCHDOG_PID would make the child think they are not its job.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (fcntl, dup2, close) on memory prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || place_fds(&sources));
    }
    // std's spawn reports exec errors through a pipe it opens now, at the
    // lowest free fds; if one landed in 3..=3+n our dup2 in the child would
    // close it. Fill the free ones in that range until the spawn is done.
    let _placeholders = reserve_fds(3 + n as RawFd).map_err(spawn_err)?;
    let mut cmd = tokio::process::Command::from(cmd);
    let child = cmd.spawn().map_err(spawn_err)?;
    drop(_placeholders);
    drop(ready_write);
    let pid = child.id().unwrap_or(0);
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_read).map_err(spawn_err)?;
    let (tx, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut line = String::new();
        let ok = tokio::io::BufReader::new(pipe)
            .read_line(&mut line)
            .await
            .is_ok()
            && line.trim() == "ready";
        let _ = tx.send(ok);
    });
    Ok(Pending {
        pid,
        generation: plan.generation,
        started: Instant::now(),
        timeout,
        child,
        ready,
    })
}

/// In the child between fork and exec: put `sources[i]` at fd `3 + i`
/// without close-on-exec. Sources may themselves sit in 3.. (systemd's own
/// fds), so they are first copied above the target range; `dup2` onto the
/// target then clears close-on-exec on exactly these fds.
fn place_fds(sources: &[RawFd]) -> std::io::Result<()> {
    const MAX: usize = crate::listeners::MAX_INHERITED as usize + 1;
    if sources.len() > MAX {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    let floor = 3 + sources.len() as RawFd;
    let mut high = [0 as RawFd; MAX];
    for (i, &fd) in sources.iter().enumerate() {
        // SAFETY: plain fcntl on an fd we own; async-signal-safe.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high[i] = h;
    }
    for (i, &h) in high[..sources.len()].iter().enumerate() {
        // SAFETY: as above.
        if unsafe { libc::dup2(h, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        unsafe { libc::close(h) };
    }
    Ok(())
}

/// Occupies every free fd up to `top` with a close-on-exec `/dev/null`.
/// `open` always takes the lowest free fd, so opening until one lands above
/// `top` fills the gaps without racing other threads.
fn reserve_fds(top: RawFd) -> std::io::Result<Vec<std::fs::File>> {
    let mut held = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null")?;
        if f.as_raw_fd() > top {
            return Ok(held);
        }
        held.push(f);
    }
}

impl Pending {
    /// Waits for the child to report ready, at most until the timeout
    /// counted from its start. Cancel-safe. On failure the child has been
    /// stopped and reaped.
    pub async fn wait_ready(&mut self) -> Result<(), Failure> {
        let pid = self.pid;
        let deadline = tokio::time::Instant::from_std(self.started + self.timeout);
        let outcome = tokio::select! {
            r = &mut self.ready => match r {
                Ok(true) => return Ok(()),
                // EOF or junk: the child is gone or is not a pid-server.
                // Prefer its exit status as the reason when it is quick.
                _ => match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
                    Ok(Ok(st)) => Failure::Exited { pid, status: describe_exit(st) },
                    _ => Failure::ChannelClosed { pid },
                },
            },
            st = self.child.wait() => Failure::Exited {
                pid,
                status: st.map(describe_exit).unwrap_or_else(|e| format!("failed ({e})")),
            },
            _ = tokio::time::sleep_until(deadline) => Failure::NotReady { pid, timeout: self.timeout },
        };
        self.stop().await;
        Err(outcome)
    }

    /// SIGTERM (a pid-server child drains what it accepted), then SIGKILL
    /// if it is still there after a bound; always reaped.
    pub async fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn describe_exit(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(s)) => format!(
            "was killed by {}",
            Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("a signal")
        ),
        _ => "ended".into(),
    }
}

/// In the new process: take the ready pipe named by `PID_SERVER_READY_FD`,
/// if any. Call before anything else opens files.
pub fn take_ready_fd() -> Result<Option<OwnedFd>, String> {
    let Ok(v) = std::env::var(READY_FD_ENV) else {
        return Ok(None);
    };
    let fd: RawFd = v
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{READY_FD_ENV}={v:?} is not a file descriptor"))?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{READY_FD_ENV}={fd} is not open"));
    }
    // SAFETY: the fd is open and nothing else in this process owns it: it
    // was placed here by the parent for us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not for our own children.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(owned))
}

/// In the new process: tell the old one we serve. A parent that has gone
/// away (EPIPE) is no reason to stop serving.
pub fn report_ready(fd: OwnedFd) {
    let mut f = std::fs::File::from(fd);
    if let Err(e) = f.write_all(b"ready\n") {
        tracing::warn!(event = "ready_report_failed", error = %e, "could not tell the old process we are ready");
    }
}

/// The generation this process was started as (0 unless a handover started
/// it).
pub fn generation_from_env() -> Result<u32, String> {
    match std::env::var(GENERATION_ENV) {
        Err(_) => Ok(0),
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{GENERATION_ENV}={v:?} is not a number")),
    }
}

/// The path to start the next generation from: argv[0] when it is a path
/// (made absolute now, since the working directory may change), else the
/// resolved executable.
pub fn resolve_exe() -> std::io::Result<PathBuf> {
    if let Some(arg0) = std::env::args_os().next() {
        let p = PathBuf::from(&arg0);
        if p.components().count() > 1 {
            return Ok(if p.is_absolute() {
                p
            } else {
                std::env::current_dir()?.join(p)
            });
        }
    }
    std::env::current_exe()
}
