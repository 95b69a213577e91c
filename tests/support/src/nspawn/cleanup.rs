//! Teardown and clean-up: a container powered off (or killed after
//! [`SHUTDOWN_TIMEOUT`]), its cgroups emptied and removed, nspawn's temp
//! dir and the harness's state gone; and the leftovers of test binaries
//! that died before their `Drop` ran.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::boot::status_field;
use super::{CGROUP_GROUP, Container, NAME_PREFIX, SHUTDOWN_TIMEOUT, STATE_DIR_NAME};

impl Container {
    /// Powers the container off and removes everything it left on the host.
    /// Idempotent; `Drop` calls it. Returns how long it took.
    pub fn teardown(&mut self) -> Duration {
        if self.torn_down {
            return Duration::ZERO;
        }
        self.torn_down = true;
        let started = Instant::now();
        let mut how = "clean poweroff";

        if let Some(mut child) = self.nspawn.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // nspawn turns SIGTERM into SIGRTMIN+3 for the container's
                // systemd: an orderly poweroff.
                let _ = kill(Pid::from_raw(self.nspawn_pid as i32), Signal::SIGTERM);
                let deadline = started + SHUTDOWN_TIMEOUT;
                let mut delay = Duration::from_millis(2);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(25));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    how = "killed after the shutdown timeout";
                    // Killing a PID namespace's init kills the whole namespace.
                    // Kill it first and let nspawn reap it and clean up after
                    // itself; killing only nspawn would orphan the container.
                    if self.init != 0 {
                        let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
                    }
                    // Past the bound, nspawn is killed below.
                    crate::wait::within(Duration::from_secs(2), || {
                        (!matches!(child.try_wait(), Ok(None))).then_some(())
                    });
                    if matches!(child.try_wait(), Ok(None)) {
                        how = "killed (nspawn too) after the shutdown timeout";
                        let _ = child.kill();
                    }
                }
            } else {
                how = "nspawn had already exited";
                if self.init != 0 && init_alive(self.init) {
                    let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
                }
            }
            let _ = child.wait();
        }

        kill_cgroups(&self.cgroups);
        remove_cgroups(&self.cgroups);
        if let Some(t) = &self.temp_dir {
            let _ = fs::remove_dir_all(t);
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
        let _ = fs::remove_dir_all(&self.state_dir);
        if let Some(parent) = self.state_dir.parent() {
            let _ = fs::remove_dir(parent); // only when empty
        }
        self._serial = None;
        let took = started.elapsed();
        eprintln!(
            "nspawn harness: {} torn down in {} ms ({how})",
            self.name,
            took.as_millis()
        );
        took
    }
}

// ---------------------------------------------------------------------------
// cgroups and leftovers
// ---------------------------------------------------------------------------

/// The roots of the hierarchies systemd uses: the v2 root on a unified host;
/// `name=systemd` (and `unified` if mounted) on a hybrid or legacy one.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v = Vec::new();
    for h in ["systemd", "unified"] {
        if base.join(h).join("cgroup.procs").exists() {
            v.push(base.join(h));
        }
    }
    v
}

pub(super) fn make_cgroups(name: &str) -> Result<Vec<PathBuf>, String> {
    let roots = cgroup_roots();
    if roots.is_empty() {
        return Err("no systemd cgroup hierarchy under /sys/fs/cgroup".into());
    }
    let mut made = Vec::new();
    for root in roots {
        let dir = root.join(CGROUP_GROUP).join(name);
        if let Err(e) = fs::create_dir_all(&dir) {
            remove_cgroups(&made);
            return Err(format!("mkdir {}: {e}", dir.display()));
        }
        made.push(dir);
    }
    Ok(made)
}

/// Whether containers get cgroups of their own (and so may run side by side).
/// Without, `boot` runs them one at a time: a test that holds two containers
/// at once would wait for itself, and fails after [`SERIAL_WAIT`].
pub fn private_cgroups_supported() -> bool {
    let probe = format!("{NAME_PREFIX}-{}-probe", std::process::id());
    match make_cgroups(&probe) {
        Ok(dirs) => {
            remove_cgroups(&dirs);
            true
        }
        Err(_) => false,
    }
}

/// Held by the container that runs when containers run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long `boot` waits for its turn when containers run one at a time.
pub const SERIAL_WAIT: Duration = Duration::from_secs(180);

pub(super) fn serial_lock(name: &str) -> MutexGuard<'static, ()> {
    crate::wait::within(SERIAL_WAIT, || match SERIAL.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    })
    .unwrap_or_else(|| {
        panic!(
            "{name}: waited {} s for another container to go (containers run one at a \
             time here because they cannot get cgroups of their own)",
            SERIAL_WAIT.as_secs()
        )
    })
}

/// Every cgroup at or below `dir`, deepest first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_tree(&e.path()));
            }
        }
    }
    if dir.exists() {
        out.push(dir.to_path_buf());
    }
    out
}

fn cgroup_pids(dirs: &[PathBuf]) -> Vec<i32> {
    dirs.iter()
        .flat_map(|d| cgroup_tree(d))
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SIGKILLs whatever still lives in the cgroups, until they are empty (bounded).
fn kill_cgroups(dirs: &[PathBuf]) {
    let emptied = crate::wait::within(Duration::from_secs(5), || {
        let pids = cgroup_pids(dirs);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        pids.is_empty().then_some(())
    });
    if emptied.is_none() {
        let pids = cgroup_pids(dirs);
        eprintln!("nspawn harness: processes left in the container's cgroups: {pids:?}");
    }
}

pub(super) fn remove_cgroups(dirs: &[PathBuf]) {
    for dir in dirs {
        // A cgroup can be removed only once its last process is reaped,
        // which may lag the kill a little.
        let deadline = Instant::now() + Duration::from_secs(2);
        for d in cgroup_tree(dir) {
            while let Err(e) = fs::remove_dir(&d) {
                if e.kind() == io::ErrorKind::NotFound || Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        // The shared parent goes once no other container uses it.
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Removes what containers of test binaries that no longer exist left behind
/// (they died before `Drop` ran). Containers of live test binaries are left
/// alone.
pub(super) fn sweep_stale() {
    let states = std::env::temp_dir().join(STATE_DIR_NAME);
    let mut names: Vec<String> = fs::read_dir(&states)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    for root in cgroup_roots() {
        names.extend(
            fs::read_dir(root.join(CGROUP_GROUP))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string)),
        );
    }
    names.sort();
    names.dedup();
    for name in names {
        let owner: Option<u32> = name
            .strip_prefix(&format!("{NAME_PREFIX}-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse().ok());
        let Some(owner) = owner else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        eprintln!(
            "nspawn harness: removing leftovers of container {name} (test process {owner} is gone)"
        );
        let cgroups: Vec<PathBuf> = cgroup_roots()
            .into_iter()
            .map(|r| r.join(CGROUP_GROUP).join(&name))
            .filter(|p| p.exists())
            .collect();
        kill_cgroups(&cgroups);
        remove_cgroups(&cgroups);
        let state = states.join(&name);
        if let Ok(t) = fs::read_to_string(state.join("temp-dir")) {
            let t = PathBuf::from(t.trim());
            if t.starts_with("/var/tmp")
                && t.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("nspawn-temp-"))
            {
                let _ = fs::remove_dir_all(t);
            }
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&name));
        let _ = fs::remove_dir_all(state);
    }
}

/// After nspawn is gone its init is re-parented: check the pid still is a
/// container's init and not a reused one.
fn init_alive(init: u32) -> bool {
    status_field(init, "NSpid:").is_some_and(|ns| ns.ends_with(" 1") || ns.ends_with("\t1"))
        && fs::read_to_string(format!("/proc/{init}/comm")).is_ok_and(|c| c.trim() == "systemd")
}
