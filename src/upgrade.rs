//! The handover: start the next generation on the very same sockets, and
//! hand the unit to it only once it has proved it serves.
//!
//! The old process [`spawn`]s the new one with every listening socket at fds
//! 3.. in systemd's format (`LISTEN_FDS`, `LISTEN_FDNAMES`; no `LISTEN_PID`,
//! which cannot be known before exec and which listenfd and
//! `sd_listen_fds(3)` read as "for you"), its generation + 1, and one end of
//! a socketpair (`PID_SERVER_HANDOVER_FD`). Over that channel:
//!
//! ```text
//!   new: accepting on the sockets          ──"ready"──▶  old
//!   old: probation (both serve; the new one must stay alive)
//!   old                                    ◀─"commit"──
//!   new: MAINPID=<new>, READY=1, BARRIER=1 ──"owner"──▶  old: silent, drains
//! ```
//!
//! Until "commit" the old process is still systemd's main process, so a new
//! one that dies during its first moments (a crash on start-up, right after
//! it is ready, or a program that is not a pid-server) changes nothing for
//! systemd: the old one stops it and keeps serving. Nothing here polls the
//! public port, where either process may answer.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

/// The environment variable naming the handover channel's fd in the new
/// process.
pub const HANDOVER_FD_ENV: &str = "PID_SERVER_HANDOVER_FD";
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
    #[error("new process {pid} {status} right after it was ready")]
    DiedOnProbation { pid: u32, status: String },
    #[error("new process {pid} was not ready within {}s; stopped it", timeout.as_secs())]
    NotReady { pid: u32, timeout: Duration },
    #[error(
        "new process {pid} closed the handover channel without reporting ready (not a pid-server?)"
    )]
    ChannelClosed { pid: u32 },
    #[error("new process {pid} did not take over: {why}")]
    NoTakeover { pid: u32, why: String },
    #[error("the reload was cancelled: the old process is stopping")]
    Cancelled,
}

/// Timing of a handover.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the new process may take to be ready.
    pub ready_timeout: Duration,
    /// How long both serve before the new one takes over; it must stay alive
    /// through it.
    pub probation: Duration,
}

/// A new generation under way. Its outcome arrives on `outcome`; the
/// handshake runs in a task of its own, so waiting for it is cancel-safe.
pub struct Pending {
    pub pid: u32,
    pub generation: u32,
    pub started: Instant,
    outcome: tokio::sync::oneshot::Receiver<Result<(), Failure>>,
    cancel: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Pending {
    /// The handshake's result: `Ok` once the new process owns the unit. On
    /// failure the new process has been stopped and reaped.
    pub async fn outcome(&mut self) -> Result<(), Failure> {
        (&mut self.outcome).await.unwrap_or(Err(Failure::Cancelled))
    }

    /// Stops the new process and waits (bounded) until it is reaped.
    pub async fn cancel(mut self) {
        if let Some(c) = self.cancel.take() {
            let _ = c.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.outcome).await;
    }
}

/// Starts the next generation. Its stdout and stderr are ours (the same
/// journal stream under systemd).
pub fn spawn(plan: &Plan, timing: Timing) -> Result<Pending, Failure> {
    let spawn_err = |source| Failure::Spawn {
        exe: plan.exe.display().to_string(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    let n = plan.sockets.len();
    // The fds to place at 3, 4, ... in the child, in order: the sockets,
    // then its end of the handover channel.
    let sources: Vec<RawFd> = plan
        .sockets
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .chain([theirs.as_raw_fd()])
        .collect();
    let names: Vec<&str> = plan.sockets.iter().map(|(_, name)| name.as_str()).collect();

    let mut cmd = std::process::Command::new(&plan.exe);
    cmd.args(&plan.args)
        .env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env(crate::listeners::ORIGIN_ENV, plan.origin.to_string())
        .env(HANDOVER_FD_ENV, (3 + n).to_string())
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
    let placeholders = reserve_fds(3 + n as RawFd).map_err(spawn_err)?;
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(spawn_err)?;
    drop(placeholders);
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    ours.set_nonblocking(true).map_err(spawn_err)?;
    let channel = tokio::net::UnixStream::from_std(ours).map_err(spawn_err)?;
    let started = Instant::now();
    let (tx, outcome) = tokio::sync::oneshot::channel();
    let (cancel, cancelled) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = handshake(child, pid, channel, started, timing, cancelled).await;
        let _ = tx.send(r);
    });
    Ok(Pending {
        pid,
        generation: plan.generation,
        started,
        outcome,
        cancel: Some(cancel),
    })
}

/// The old process's side of the handshake. Stops the child on failure.
async fn handshake(
    mut child: tokio::process::Child,
    pid: u32,
    channel: tokio::net::UnixStream,
    started: Instant,
    timing: Timing,
    mut cancelled: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), Failure> {
    use tokio::io::AsyncWriteExt;
    let (read, mut write) = channel.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let deadline = tokio::time::Instant::from_std(started + timing.ready_timeout);

    // 1. "ready": the child accepts on the sockets. Biased: a child that
    // said "ready" and then died is one that died on probation.
    let r = tokio::select! {
        biased;
        l = lines.next_line() => match l {
            Ok(Some(l)) if l == "ready" => Ok(()),
            // EOF or junk: the child is gone or is not a pid-server.
            // Prefer its exit status as the reason when it comes quickly.
            _ => Err(match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(st)) => Failure::Exited { pid, status: describe_exit(st) },
                _ => Failure::ChannelClosed { pid },
            }),
        },
        st = child.wait() => Err(Failure::Exited { pid, status: exit_text(st) }),
        _ = tokio::time::sleep_until(deadline) => Err(Failure::NotReady { pid, timeout: timing.ready_timeout }),
        _ = &mut cancelled => Err(Failure::Cancelled),
    };
    // 2. Probation: both serve; the child must stay alive through it.
    let r = match r {
        Ok(()) => tokio::select! {
            st = child.wait() => Err(Failure::DiedOnProbation { pid, status: exit_text(st) }),
            _ = tokio::time::sleep(timing.probation) => Ok(()),
            _ = &mut cancelled => Err(Failure::Cancelled),
        },
        Err(e) => Err(e),
    };
    // 3. "commit", answered by "owner" once systemd knows the new MAINPID.
    let r = match r {
        Ok(()) => match write.write_all(b"commit\n").await {
            Err(e) => Err(Failure::NoTakeover {
                pid,
                why: e.to_string(),
            }),
            Ok(()) => tokio::select! {
                l = lines.next_line() => match l {
                    Ok(Some(l)) if l == "owner" => return Ok(()),
                    other => Err(Failure::NoTakeover { pid, why: format!("answered {other:?}") }),
                },
                st = child.wait() => Err(Failure::DiedOnProbation { pid, status: exit_text(st) }),
                // The take-over waits for systemd (BARRIER=1, 5 s at most).
                _ = tokio::time::sleep(Duration::from_secs(10)) => Err(Failure::NoTakeover { pid, why: "no answer to commit within 10s".into() }),
            },
        },
        Err(e) => Err(e),
    };
    stop(&mut child, pid).await;
    r
}

fn exit_text(st: std::io::Result<ExitStatus>) -> String {
    st.map(describe_exit)
        .unwrap_or_else(|e| format!("failed ({e})"))
}

/// SIGTERM (a pid-server child drains what it accepted and, not owning the
/// unit, tells systemd nothing), then SIGKILL if it is still there after a
/// bound; always reaped.
async fn stop(child: &mut tokio::process::Child, pid: u32) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
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

/// In the new process: take the handover channel named by
/// `PID_SERVER_HANDOVER_FD`, if any. Call before anything else opens files.
pub fn take_handover_fd() -> Result<Option<OwnedFd>, String> {
    let Ok(v) = std::env::var(HANDOVER_FD_ENV) else {
        return Ok(None);
    };
    let fd: RawFd = v
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{HANDOVER_FD_ENV}={v:?} is not a file descriptor"))?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{HANDOVER_FD_ENV}={fd} is not open"));
    }
    // SAFETY: the fd is open and nothing else in this process owns it: the
    // parent placed it here for us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not for our own children.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(owned))
}

/// The new process's side of the handshake.
pub struct Successor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Successor {
    /// Says "ready" on the channel: call once every socket is accepted from.
    pub async fn announce(fd: OwnedFd) -> std::io::Result<Successor> {
        use tokio::io::AsyncWriteExt;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        let (read, mut write) = tokio::net::UnixStream::from_std(std)?.into_split();
        write.write_all(b"ready\n").await?;
        Ok(Successor {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        })
    }

    /// Waits for "commit": the old process has ended its probation and
    /// hands the unit over. Anything else means the handover is off.
    pub async fn wait_commit(&mut self) -> Result<(), String> {
        match self.lines.next_line().await {
            Ok(Some(l)) if l == "commit" => Ok(()),
            Ok(Some(l)) => Err(format!("unexpected {l:?} on the handover channel")),
            Ok(None) => Err("the old process closed the handover channel".into()),
            Err(e) => Err(format!("handover channel: {e}")),
        }
    }

    /// Says "owner", after telling systemd `MAINPID=` (and waiting until it
    /// processed that). If the old process is gone by now, we own the unit
    /// all the same.
    pub async fn confirm_owner(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.write.write_all(b"owner\n").await;
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

/// The path to start the next generation from: `argv[0]` when it is a path
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
