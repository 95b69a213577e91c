//! The old process's side of a handover: start the next generation on the
//! very same sockets, and hand the unit to it only once it has proved it
//! serves.
//!
//! The old process spawns the new one with every listening socket at fds
//! 3.. in systemd's format (`LISTEN_FDS`, `LISTEN_FDNAMES`; no `LISTEN_PID`,
//! which cannot be known before exec and which listenfd and
//! `sd_listen_fds(3)` read as "for you"), its generation + 1, and one end of
//! a socketpair (`<PREFIX>_HANDOVER_FD`). Over that channel (see
//! [`super::channel`] for the versions):
//!
//! ```text
//!   new: accepting on the sockets          ──"ready[ 2 <features>]"──▶  old
//!   old: probation (both serve; the new one must stay alive)
//!   old                                    ◀─"commit"──
//!   new: MAINPID=<new>, READY=1, BARRIER=1 ──"owner"──▶  old: silent
//!   old: moves idle connections (protocol 2), drains the rest, exits
//! ```
//!
//! Until "commit" the old process is still systemd's main process, so a new
//! one that dies during its first moments (a crash on start-up, right after
//! it is ready, or a program that is not a pid-server) changes nothing for
//! systemd: the old one stops it and keeps serving. Nothing here polls the
//! public port, where either process may answer.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

use super::channel::{self, Connections, Ready};
use crate::Config;
use crate::env::Var;

/// How to start the next generation: fixed at start-up.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The path this binary was started from, resolved at start-up: after a
    /// package upgrade it holds the new binary, while `/proc/self/exe`
    /// still points at the old, deleted one.
    pub(crate) exe: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// The next generation's number.
    pub(crate) generation: u32,
    /// Second descriptors of our listening sockets, with their names.
    pub(crate) sockets: Vec<(OwnedFd, String)>,
    /// Where those sockets came from originally.
    pub(crate) origin: crate::listeners::Origin,
}

/// Why a handover did not happen. The old process keeps serving in every
/// case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("cannot start {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("new process {pid} {status} before it was ready")]
    Exited { pid: u32, status: String },
    #[error("new process {pid} {status} right after it was ready")]
    DiedOnProbation { pid: u32, status: String },
    #[error("new process {pid} was not ready within {}s; stopped it", timeout.as_secs())]
    NotReady { pid: u32, timeout: Duration },
    #[error(
        "new process {pid} closed the handover channel without reporting ready (not the same service?)"
    )]
    ChannelClosed { pid: u32 },
    #[error("new process {pid} did not take over: {why}")]
    NoTakeover { pid: u32, why: String },
    #[error("new process {pid} could not start: {reason}")]
    CouldNotStart { pid: u32, reason: String },
    #[error("the reload was cancelled: the old process is stopping")]
    Cancelled,
}

/// The new process owns the unit: what it speaks, and where to send it
/// connections if it takes them.
pub(crate) struct Joined {
    pub(crate) ready: Ready,
    /// The connection channel, when the new process takes connections.
    pub(crate) connections: Option<Connections>,
    /// What the new process said the operator should hear.
    pub(crate) notes: Vec<String>,
}

/// A new generation under way. Its outcome arrives on `outcome`; the
/// handshake runs in a task of its own, so waiting for it is cancel-safe.
pub(crate) struct Pending {
    pub(crate) pid: u32,
    pub(crate) generation: u32,
    pub(crate) started: Instant,
    outcome: tokio::sync::oneshot::Receiver<Result<Joined, Failure>>,
    cancel: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Pending {
    /// The handshake's result: `Ok` once the new process owns the unit. On
    /// failure the new process has been stopped and reaped.
    pub(crate) async fn outcome(&mut self) -> Result<Joined, Failure> {
        (&mut self.outcome).await.unwrap_or(Err(Failure::Cancelled))
    }

    /// Stops the new process and waits (bounded) until it is reaped.
    pub(crate) async fn cancel(mut self) {
        if let Some(c) = self.cancel.take() {
            let _ = c.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.outcome).await;
    }
}

/// Variables that belong to one process, not to the unit: from a reload
/// helper's environment they are dropped, and the next generation gets
/// ours (or the ones `spawn` sets).
pub(crate) const PER_PROCESS: &[&[u8]] = &[
    b"MAINPID",
    b"SYSTEMD_EXEC_PID",
    b"JOURNAL_STREAM",
    b"NOTIFY_SOCKET",
    b"WATCHDOG_USEC",
    b"WATCHDOG_PID",
    b"LISTEN_FDS",
    b"LISTEN_PID",
    b"LISTEN_FDNAMES",
];

/// Starts the next generation. Its stdout and stderr are ours (the same
/// journal stream under systemd). `environment`: the unit's current one,
/// from the reload helper; without it the child inherits ours.
pub(crate) fn spawn(
    plan: &Plan,
    config: &Config,
    environment: Option<&[(Vec<u8>, Vec<u8>)]>,
    totals: std::sync::Arc<crate::metrics::Totals>,
    tickets: std::sync::Arc<crate::tls::Ticketer>,
) -> Result<Pending, Failure> {
    let spawn_err = |source| Failure::Spawn {
        exe: plan.exe.display().to_string(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    let (conns_ours, conns_theirs) = channel::pair().map_err(spawn_err)?;
    let cmd = command(
        plan,
        config,
        environment,
        [theirs.as_raw_fd(), conns_theirs.as_raw_fd()],
    );
    let child = start(cmd, plan.sockets.len()).map_err(spawn_err)?;
    drop(theirs);
    drop(conns_theirs);
    let timing = (config.reload_timeout, config.probation);
    let pid = child.id().unwrap_or(0);
    ours.set_nonblocking(true).map_err(spawn_err)?;
    let channel = tokio::net::UnixStream::from_std(ours).map_err(spawn_err)?;
    let started = Instant::now();
    let (tx, outcome) = tokio::sync::oneshot::channel();
    let (cancel, cancelled) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let conns = Connections::new(conns_ours).ok();
        let r = handshake(child, pid, channel, started, timing, cancelled, |ready| {
            first_messages(ready, &conns, &totals, &tickets)
        })
        .await
        .map(|(ready, notes)| joined(ready, notes, conns));
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

/// The child's command: the plan's program and arguments, the unit's
/// environment when the reload helper brought it (else ours), the
/// handover's variables, and the fds to place at 3, 4, ... in the child,
/// in order: the sockets, then `channels` (its end of the handover
/// channel, its end of the connection channel).
fn command(
    plan: &Plan,
    config: &Config,
    environment: Option<&[(Vec<u8>, Vec<u8>)]>,
    channels: [RawFd; 2],
) -> std::process::Command {
    let n = plan.sockets.len();
    let sources: Vec<RawFd> = plan
        .sockets
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .chain(channels)
        .collect();
    let names: Vec<&str> = plan.sockets.iter().map(|(_, name)| name.as_str()).collect();
    let mut cmd = std::process::Command::new(&plan.exe);
    if let Some(vars) = environment {
        unit_environment(&mut cmd, config, vars);
    }
    cmd.args(&plan.args)
        .env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env(config.var(Var::SocketOrigin), plan.origin.to_string())
        .env(config.var(Var::HandoverFd), (3 + n).to_string())
        .env(config.var(Var::Generation), plan.generation.to_string())
        .env(config.var(Var::Protocol), channel::PROTOCOL.to_string())
        .env(config.var(Var::ConnectionsFd), (4 + n).to_string())
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
    cmd
}

/// Spawns the child of [`command`], whose fds go to 3..=3+`sockets`+1.
fn start(cmd: std::process::Command, sockets: usize) -> std::io::Result<tokio::process::Child> {
    // std's spawn reports exec errors through a pipe it opens now, at the
    // lowest free fds; if one landed in 3..=3+n our dup2 in the child would
    // close it. Fill the free ones in that range until the spawn is done.
    let placeholders = reserve_fds(4 + sockets as RawFd)?;
    let child = tokio::process::Command::from(cmd).spawn();
    drop(placeholders);
    child
}

/// What the child gets once it is ready, before the probation: the
/// counters first, so that a scrape that reaches the new process then
/// never sees less than the old one counted; the session-ticket keys only
/// to a child that asked for them (one that predates the feature would
/// take them for junk).
fn first_messages<'a>(
    ready: &Ready,
    conns: &'a Option<Connections>,
    totals: &crate::metrics::Totals,
    tickets: &crate::tls::Ticketer,
) -> impl std::future::Future<Output = ()> + use<'a> {
    let first = ready
        .has(channel::Feature::Counters)
        .then(|| totals.carried().encode());
    let keys = ready
        .has(channel::Feature::TlsTickets)
        .then(|| tickets.export().encode());
    async move {
        if let (Some(c), Some(first)) = (conns, first) {
            let _ = c.send_datagram(&first).await;
        }
        if let (Some(c), Some(keys)) = (conns, keys) {
            let _ = c.send_datagram(&keys).await;
        }
    }
}

/// The handshake's success: the connection channel is kept for a child
/// that takes something on it. One that takes nothing (protocol 1 ignores
/// the socket) gets nothing; it closes its end with itself.
fn joined(ready: Ready, notes: Vec<String>, conns: Option<Connections>) -> Joined {
    let wanted = ready.has(channel::Feature::MoveConnections)
        || ready.has(channel::Feature::Counters)
        || ready.has(channel::Feature::TlsTickets)
        || ready.has(channel::Feature::AppState);
    Joined {
        ready,
        connections: if wanted { conns } else { None },
        notes,
    }
}

/// The old process's side of the handshake. Stops the child on failure.
async fn handshake<F>(
    mut child: tokio::process::Child,
    pid: u32,
    channel: tokio::net::UnixStream,
    started: Instant,
    (ready_timeout, probation): (Duration, Duration),
    mut cancelled: tokio::sync::oneshot::Receiver<()>,
    on_ready: impl FnOnce(&Ready) -> F,
) -> Result<(Ready, Vec<String>), Failure>
where
    F: std::future::Future<Output = ()>,
{
    use tokio::io::AsyncWriteExt;
    let (read, mut write) = channel.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let deadline = tokio::time::Instant::from_std(started + ready_timeout);
    let mut notes = Vec::new();

    // 1. "ready": the child accepts on the sockets. Biased: a child that
    // said "ready" and then died is one that died on probation.
    let r = tokio::select! {
        biased;
        l = next_line(&mut lines, &mut notes) => match l {
            Ok(Some(l)) if Ready::parse(&l).is_some() => Ok(Ready::parse(&l).expect("parsed")),
            // A protocol-2 child that cannot start says why, then exits.
            Ok(Some(l)) if channel::failed_reason(&l).is_some() => {
                let reason = channel::failed_reason(&l).expect("parsed").to_string();
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                Err(Failure::CouldNotStart { pid, reason })
            }
            // EOF or junk: the child is gone or is not a pid-server.
            // Prefer its exit status as the reason when it comes quickly.
            _ => Err(match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(st)) => Failure::Exited { pid, status: describe_exit(st) },
                _ => Failure::ChannelClosed { pid },
            }),
        },
        // `biased` orders the polls, not the events: another worker's
        // reactor turn can mark both the channel and the exit ready after
        // the channel's branch found nothing and before this one is polled
        // (seen once in 40 runs under load: "ready" then exit 3 was
        // reported as an exit before ready). What the child wrote is in
        // the socket's buffer: read it before naming the reason (bounded:
        // a grandchild may hold the channel open).
        st = child.wait() => {
            let status = exit_text(st);
            let last = tokio::time::timeout(Duration::from_secs(1), next_line(&mut lines, &mut notes)).await;
            Err(match last {
                Ok(Ok(Some(l))) if Ready::parse(&l).is_some() => Failure::DiedOnProbation { pid, status },
                Ok(Ok(Some(l))) if channel::failed_reason(&l).is_some() => Failure::CouldNotStart {
                    pid,
                    reason: channel::failed_reason(&l).expect("parsed").to_string(),
                },
                _ => Failure::Exited { pid, status },
            })
        }
        _ = tokio::time::sleep_until(deadline) => Err(Failure::NotReady { pid, timeout: ready_timeout }),
        _ = &mut cancelled => Err(Failure::Cancelled),
    };
    // 2. Probation: both serve; the child must stay alive through it.
    if let Ok(ready) = &r {
        on_ready(ready).await;
    }
    let r = match r {
        Ok(ready) => tokio::select! {
            st = child.wait() => Err(Failure::DiedOnProbation { pid, status: exit_text(st) }),
            _ = tokio::time::sleep(probation) => Ok(ready),
            _ = &mut cancelled => Err(Failure::Cancelled),
        },
        Err(e) => Err(e),
    };
    // 3. "commit", answered by "owner" once systemd knows the new MAINPID.
    let r = match r {
        Ok(ready) => match write.write_all(b"commit\n").await {
            Err(e) => Err(Failure::NoTakeover {
                pid,
                why: e.to_string(),
            }),
            Ok(()) => tokio::select! {
                l = next_line(&mut lines, &mut notes) => match l {
                    Ok(Some(l)) if l == "owner" => return Ok((ready, notes)),
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

/// Gives the child the unit's current environment (from the reload
/// helper) instead of ours, but for the per-process variables, which stay
/// ours, and the handover's own, which `spawn` sets.
fn unit_environment(cmd: &mut std::process::Command, config: &Config, vars: &[(Vec<u8>, Vec<u8>)]) {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    cmd.env_clear();
    for (k, v) in vars {
        // Ours to set below; and a helper's own handover variables, if
        // any, are not the child's.
        if PER_PROCESS.contains(&k.as_slice()) || is_handover_var(config, k) {
            continue;
        }
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    for k in PER_PROCESS {
        if let Some(v) = std::env::var_os(OsStr::from_bytes(k)) {
            cmd.env(OsStr::from_bytes(k), v);
        }
    }
}

pub(crate) fn is_handover_var(config: &Config, k: &[u8]) -> bool {
    [
        Var::HandoverFd,
        Var::Generation,
        Var::SocketOrigin,
        Var::Protocol,
        Var::ConnectionsFd,
    ]
    .iter()
    .any(|v| config.var(*v).as_bytes() == k)
}

/// The child's next line that is not a note; notes are kept (a few).
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    notes: &mut Vec<String>,
) -> std::io::Result<Option<String>> {
    loop {
        let line = lines.next_line().await?;
        match line.as_deref().and_then(channel::note_text) {
            Some(n) => {
                if notes.len() < channel::MAX_NOTES {
                    notes.push(n.to_string());
                }
            }
            None => return Ok(line),
        }
    }
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
    const MAX: usize = crate::listeners::MAX_INHERITED as usize + 2;
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
        // SAFETY: closes the temporary copy made above, which nothing else
        // uses.
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
