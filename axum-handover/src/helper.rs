//! The helpers an app runs from its own command line: `myapp reload` (what
//! `ExecReload=` runs) and `myapp stop` (what `ExecStop=` runs). Each
//! returns a value to print and an error with its exit code; [`dispatch`]
//! does both for an app that has no command-line parser of its own.
//!
//! Why a stop helper: after a handover the main process is not systemd's
//! child, and systemd 252 does not wait for such a process after SIGTERM;
//! it goes straight to SIGKILL, cutting in-flight requests. And
//! `KillMode=mixed` SIGKILLs whatever is left once the main process exits,
//! which would cut an older generation still draining. Waiting here, within
//! `TimeoutStopSec=`, lets every generation finish.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Config;
use crate::control::{self, Answer, AskError, Report};

/// Why a helper failed, with the exit code it documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelperError {
    /// The reload failed (the old process keeps serving), or the stop did
    /// not finish in time: exit 1.
    #[error("{0}")]
    Failed(String),
    /// The PID is not a running generation of this service: exit 3.
    #[error("{0}")]
    NoServer(String),
    /// The server refused the reload: another reload of that process is
    /// under way, it is busy with other helpers or shutting down, or the
    /// request was over a cap: exit 4.
    #[error("{0}")]
    Refused(String),
    /// Nothing to act on (no PID and no unit): exit 64.
    #[error("{0}")]
    Usage(String),
    /// Another process holds the control socket's name (not the PID asked
    /// about, or not its user); nothing was sent to it: exit 76
    /// (`EX_PROTOCOL`).
    #[error("{0}")]
    NotTheServer(String),
    /// The server refused this user (neither its own nor root): exit 77
    /// (`EX_NOPERM`).
    #[error("{0}")]
    PermissionDenied(String),
}

impl HelperError {
    /// The exit code: 1, 3, 4, 64, 76 or 77.
    pub fn exit_code(&self) -> u8 {
        match self {
            HelperError::Failed(_) => 1,
            HelperError::NoServer(_) => 3,
            HelperError::Refused(_) => 4,
            HelperError::Usage(_) => 64,
            HelperError::NotTheServer(_) => 76,
            HelperError::PermissionDenied(_) => 77,
        }
    }

    /// A stable label for the failure, for logs and scripts: `failed`,
    /// `no_server`, `refused`, `usage`, `not_the_server`,
    /// `permission_denied`.
    pub fn reason(&self) -> &'static str {
        match self {
            HelperError::Failed(_) => "failed",
            HelperError::NoServer(_) => "no_server",
            HelperError::Refused(_) => "refused",
            HelperError::Usage(_) => "usage",
            HelperError::NotTheServer(_) => "not_the_server",
            HelperError::PermissionDenied(_) => "permission_denied",
        }
    }
}

/// A reload that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The process that handed over.
    pub old_pid: u32,
    /// The process that took over.
    pub new_pid: u32,
    /// The new process's generation.
    pub generation: u32,
    /// From the request to the new process owning the unit.
    pub millis: u64,
    /// What became of the old process's connections (`None` from a server
    /// of the first release, which does not report it).
    pub report: Option<Report>,
    /// What the new process said the operator should hear (a setting it
    /// cannot apply).
    pub notes: Vec<String>,
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reloaded: {} -> {} (generation {}) in {} ms",
            self.old_pid, self.new_pid, self.generation, self.millis
        )?;
        if let Some(r) = self.report {
            write!(
                f,
                "; {} connections moved, {} fell back",
                r.moved, r.fell_back
            )?;
            if r.done {
                write!(f, "; old process done {} ms after the handover", r.millis)?;
            } else if r.busy > 0 {
                write!(
                    f,
                    "; {} still busy in PID {} after {} ms",
                    r.busy, self.old_pid, r.millis
                )?;
            } else {
                write!(
                    f,
                    "; PID {} still running after {} ms, waiting for an older process",
                    self.old_pid, r.millis
                )?;
            }
        }
        for n in &self.notes {
            write!(f, "; note: {n}")?;
        }
        Ok(())
    }
}

/// Asks the running generation `pid` (without one: the only process named
/// [`Config::process_name`] of this user that has a control socket) to hand
/// over to a new process, and waits up to `timeout` for the outcome.
pub fn reload(
    config: &Config,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<Reloaded, HelperError> {
    let pid = match pid {
        Some(pid) => pid,
        None => find_the_server(config).map_err(HelperError::NoServer)?,
    };
    let name = config.name();
    // Ask first, look in /proc only to word an error: under the unit's
    // ProtectProc=invisible and PrivateUsers=yes, ExecReload= cannot see
    // $MAINPID in /proc, but it shares the network namespace where the
    // control socket lives.
    let path = control::runtime_path(std::env::var_os("RUNTIME_DIRECTORY").as_deref(), pid);
    // Started by systemd (ExecReload=), this process has the unit's current
    // environment: the next generation should get it.
    let environment = std::env::var_os("INVOCATION_ID").map(|_| {
        use std::os::unix::ffi::OsStringExt;
        control::environment_block(std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec())))
    });
    match control::ask_upgrade(name, pid, path.as_deref(), timeout, environment) {
        Ok((
            Answer::Ok {
                old_pid,
                new_pid,
                generation,
                millis,
            },
            report,
            notes,
        )) => Ok(Reloaded {
            old_pid,
            new_pid,
            generation,
            millis,
            report,
            notes,
        }),
        Ok((Answer::Failed(why), ..)) => Err(HelperError::Failed(format!(
            "reload of PID {pid} failed: {why}; PID {pid} keeps serving"
        ))),
        // Every release words this refusal so.
        Ok((Answer::Refused(why), ..)) if why.starts_with("permission denied") => Err(
            HelperError::PermissionDenied(format!("PID {pid} refused the reload: {why}")),
        ),
        Ok((Answer::Refused(why), ..)) => Err(HelperError::Refused(format!(
            "PID {pid} refused the reload: {why}"
        ))),
        Err(e @ AskError::NotTheServer { .. }) => {
            Err(HelperError::NotTheServer(format!("PID {pid}: {e}")))
        }
        Err(AskError::NoServer { .. }) if !process_exists(pid) => {
            Err(HelperError::NoServer(format!("no process with PID {pid}")))
        }
        Err(e @ AskError::NoServer { .. }) => Err(HelperError::NoServer(format!(
            "PID {pid} ({}) is not a running {name}: {e}",
            comm(pid)
        ))),
        Err(e) => Err(HelperError::Failed(e.to_string())),
    }
}

fn process_exists(pid: u32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Without a PID: the one process of this service of this user that is
/// serving (has a control socket). Zero or several is an error naming them.
fn find_the_server(config: &Config) -> Result<u32, String> {
    let me = std::process::id();
    let name = config.name();
    // Abstract sockets are listed in /proc/net/unix with a leading '@'.
    let sockets = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))? {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        else {
            continue;
        };
        if pid != me
            && comm(pid) == config.process_name
            && sockets.contains(&format!("@{}", control::abstract_name(name, pid)))
        {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => Err(format!("no running {name} found; name one with --pid")),
        _ => Err(format!(
            "several {name} processes are running ({}); name one with --pid",
            found
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Sends SIGTERM to `pid` (the main process; none: it is already gone) and
/// waits up to `timeout` until every process of the unit's cgroup but this
/// one has exited (outside a unit: until `pid` has).
pub fn stop(pid: Option<u32>, timeout: Duration) -> Result<(), HelperError> {
    let started = Instant::now();
    if let Some(pid) = pid {
        match kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
            // Already gone: still wait for the rest of the unit.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(HelperError::Failed(format!("cannot signal PID {pid}: {e}")));
            }
        }
    }
    let Some(procs) = own_cgroup_procs() else {
        // Not in a unit's cgroup: wait for the main process alone.
        let Some(pid) = pid else {
            return Err(HelperError::Usage(
                "no --pid and not run by systemd: nothing to stop".into(),
            ));
        };
        return wait_until(timeout, started, || {
            kill(Pid::from_raw(pid as i32), None).is_err()
        });
    };
    let me = std::process::id();
    wait_until(timeout, started, || {
        std::fs::read_to_string(&procs)
            .map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .all(|p| p == me)
            })
            // Unreadable now: the cgroup is going away.
            .unwrap_or(true)
    })
}

fn wait_until(
    timeout: Duration,
    started: Instant,
    mut done: impl FnMut() -> bool,
) -> Result<(), HelperError> {
    while !done() {
        if started.elapsed() >= timeout {
            return Err(HelperError::Failed(format!(
                "processes still running after {}s; leaving them to systemd",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The `cgroup.procs` file of this process's own cgroup (the unit's, when
/// systemd runs us as `ExecStop=`). Unified (v2) and hybrid/legacy (v1
/// `name=systemd`) layouts.
fn own_cgroup_procs() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if id == "0" && controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/cgroup.procs"));
            candidates.push(format!("/sys/fs/cgroup/unified{path}/cgroup.procs"));
        } else if controllers == "name=systemd" {
            candidates.push(format!("/sys/fs/cgroup/systemd{path}/cgroup.procs"));
        }
    }
    // Only a unit's own cgroup: waiting for everything in a login session's
    // or the root cgroup would never end.
    candidates.into_iter().map(PathBuf::from).find(|p| {
        p.exists()
            && p.parent()
                .is_some_and(|d| d.to_string_lossy().ends_with(".service"))
    })
}

/// Runs `reload` or `stop` when they are the first argument (after the
/// program name), for an app without a command-line parser of its own:
/// `myapp reload [--pid PID] [--timeout SECS]`, `myapp stop [--pid PID]
/// [--timeout SECS]`; `--pid` defaults to `$MAINPID`, which systemd sets for
/// `ExecReload=` and `ExecStop=`. Prints the outcome and returns the exit
/// code; `None` when the first argument is neither.
pub fn dispatch(config: &Config, mut args: impl Iterator<Item = String>) -> Option<u8> {
    let _program = args.next();
    let verb = args.next()?;
    if verb != "reload" && verb != "stop" {
        return None;
    }
    let prog = format!("{} {verb}", config.name());
    let mut pid = std::env::var("MAINPID").ok().and_then(|p| p.parse().ok());
    let mut timeout = Duration::from_secs(if verb == "reload" { 60 } else { 40 });
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--pid", Some(v)) => pid = Some(v as u32),
            ("--timeout", Some(v)) if v > 0 => timeout = Duration::from_secs(v),
            _ => {
                eprintln!("{prog}: error: expected --pid PID or --timeout SECS, got {flag:?}");
                return Some(64);
            }
        }
    }
    let outcome = if verb == "reload" {
        reload(config, pid, timeout).map(|r| println!("{r}"))
    } else {
        stop(pid, timeout)
    };
    Some(match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{prog}: error: {e}");
            e.exit_code()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_exit_code_and_label() {
        let all = [
            (HelperError::Failed(String::new()), 1, "failed"),
            (HelperError::NoServer(String::new()), 3, "no_server"),
            (HelperError::Refused(String::new()), 4, "refused"),
            (HelperError::Usage(String::new()), 64, "usage"),
            (
                HelperError::NotTheServer(String::new()),
                76,
                "not_the_server",
            ),
            (
                HelperError::PermissionDenied(String::new()),
                77,
                "permission_denied",
            ),
        ];
        for (e, code, label) in all {
            assert_eq!((e.exit_code(), e.reason()), (code, label), "{e:?}");
        }
    }
}
