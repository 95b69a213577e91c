//! `pid-server stop`: what `ExecStop=` runs. Sends SIGTERM to the main
//! process and waits until every process of the unit has drained and
//! exited.
//!
//! Why not leave it to systemd: after a handover the main process is not
//! systemd's child, and systemd 252 does not wait for such a process after
//! SIGTERM; it goes straight to SIGKILL, cutting in-flight requests. And
//! `KillMode=mixed` SIGKILLs whatever is left once the main process exits,
//! which would cut an older generation still draining. Waiting here, within
//! `TimeoutStopSec=`, lets every generation finish.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::ExitCode;
use crate::cli::StopArgs;

pub fn main(args: &StopArgs) -> ExitCode {
    let started = Instant::now();
    if let Some(pid) = args.pid {
        match kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
            // Already gone: still wait for the rest of the unit.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                eprintln!("pid-server stop: error: cannot signal PID {pid}: {e}");
                return ExitCode::Failure;
            }
        }
    }
    let Some(procs) = own_cgroup_procs() else {
        // Not in a unit's cgroup: wait for the main process alone.
        let Some(pid) = args.pid else {
            eprintln!("pid-server stop: error: no --pid and not run by systemd: nothing to stop");
            return ExitCode::Usage;
        };
        return wait_until(args.timeout, started, || {
            kill(Pid::from_raw(pid as i32), None).is_err()
        });
    };
    let me = std::process::id();
    wait_until(args.timeout, started, || {
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

fn wait_until(timeout: Duration, started: Instant, mut done: impl FnMut() -> bool) -> ExitCode {
    while !done() {
        if started.elapsed() >= timeout {
            eprintln!(
                "pid-server stop: error: processes still running after {}s; leaving them to systemd",
                timeout.as_secs()
            );
            return ExitCode::Failure;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ExitCode::Ok
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
