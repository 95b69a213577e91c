//! Network namespaces made by the test (`ip netns add`, `lo` up), deleted
//! on drop; and threads that run inside one. Containers join such a
//! namespace (`--network-namespace-path=`, podman's `--network ns:`) and
//! the test's clients enter it, so nothing listens on the host's network
//! and two tests can each use port 8080.
//!
//! Namespaces of test binaries that died without running `Drop` are swept
//! when the next one is made.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::cmd::{TestCommand, text};

const PREFIX: &str = "pst";
const IP_TIMEOUT: Duration = Duration::from_secs(10);
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A network namespace `pst-<test pid>-<n>`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        Netns::try_new().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Netns::new`], or why not (not root, no `ip`).
    pub fn try_new() -> Result<Netns, String> {
        sweep_stale();
        let name = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Sets the sysctl `key` to `value` in this namespace only, and reads
    /// it back (a kernel without the key fails here, not in the measure).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        let set = format!("{key}={value}");
        ip(&["netns", "exec", &self.name, "sysctl", "-q", "-w", &set])?;
        let now = ip(&["netns", "exec", &self.name, "sysctl", "-n", key])?;
        if now.trim() != value {
            return Err(format!(
                "{key} is {} in {}, not {value}",
                now.trim(),
                self.name
            ));
        }
        Ok(())
    }

    /// Moves the calling thread into this namespace until the guard drops
    /// (then back, or the process aborts: carrying on in the wrong
    /// namespace would test or measure the wrong thing). Processes and
    /// threads it starts meanwhile are in the namespace too.
    pub fn enter_here(&self) -> Inside {
        let home = fs::File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("open /proc/thread-self/ns/net: {e}"));
        enter(&self.path());
        Inside { home }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        spawn_in(Some(self.path()), f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Default for Netns {
    fn default() -> Netns {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match TestCommand::new("ip")
            .args(["netns", "del", &self.name])
            .timeout(IP_TIMEOUT)
            .try_output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("netns: ip netns del {}: {}", self.name, text(&o)),
            Err(e) => eprintln!("netns: {e}"),
        }
    }
}

/// The calling thread's stay in a namespace: see [`Netns::enter_here`].
pub struct Inside {
    home: fs::File,
}

impl Drop for Inside {
    fn drop(&mut self) {
        if let Err(e) = setns_net(&self.home) {
            eprintln!("netns: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    TestCommand::new("ip")
        .args(args)
        .timeout(IP_TIMEOUT)
        .try_stdout()
}

/// Deletes `pst-<pid>-*` namespaces whose test process is gone.
fn sweep_stale() {
    for e in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(&format!("{PREFIX}-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("netns: deleting stale network namespace {name}");
            let _ = TestCommand::new("ip")
                .args(["netns", "del", &name])
                .timeout(IP_TIMEOUT)
                .try_output();
        }
    }
}

/// Moves the calling thread into the network namespace at `path`; panics
/// if it cannot. Threads it starts afterwards are in it too (a new thread
/// inherits its creator's namespaces); the test's other threads are not
/// affected.
pub fn enter(path: &Path) {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    if let Err(e) = setns_net(&file) {
        panic!("setns {}: {e}", path.display());
    }
}

/// Moves the calling thread into the network namespace `ns` refers to.
fn setns_net(ns: &fs::File) -> io::Result<()> {
    // SAFETY: setns on an fd we own; it changes only this thread's network
    // namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that first enters the network namespace at
/// `netns` (`None`: stays in the host's).
pub fn spawn_in<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        if let Some(ns) = netns {
            enter(&ns);
        }
        f()
    })
}
