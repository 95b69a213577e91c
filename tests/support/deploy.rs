//! Support for the deployment tests (tests/package.rs, tests/image.rs): a
//! cached Debian tree, network namespaces made by the test, a bounded load
//! generator that runs inside such a namespace, and commands with a bound.
//!
//! Include it next to the nspawn harness:
//!
//! ```ignore
//! #[path = "support/nspawn.rs"]
//! mod nspawn;
//! #[path = "support/deploy.rs"]
//! mod deploy;
//! ```
//!
//! Everything that lives outside the test process (network namespaces, the
//! debootstrap run) is owned by a guard whose `Drop` removes it, also when
//! the test panics. Namespaces of test binaries that died without running
//! `Drop` are swept when the next one is made.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------
// Running or skipping
// ---------------------------------------------------------------------------

/// Whether `CI` is set (`true`, `1`, `yes`): then a test that cannot run
/// fails instead of skipping.
pub fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

/// `true` when every tool is in PATH. Otherwise panics under CI, or prints
/// `SKIPPED` and returns `false`. `tools` are (name, how to install it).
pub fn require_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(tool, install)| format!("`{tool}` ({install})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    cannot_run(test, &format!("missing {}", missing.join(", ")));
    false
}

/// Panics under CI with `reason`, else prints a loud `SKIPPED` line.
pub fn cannot_run(test: &str, reason: &str) {
    if is_ci() {
        panic!(
            "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! {test}: CANNOT RUN UNDER CI: {reason}\n\
             !!! (see packaging/ci-deps.sh; CI is set, so this is an error, not a skip)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
    }
    crate::nspawn::skip(test, reason);
}

pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The repo's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cargo target dir this test binary was built in (`.../target`).
pub fn target_dir() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_pid-server"));
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo().join("target"))
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin closed, output captured), SIGKILLing it after
/// `timeout`.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| format!("{what}: {e}")),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            Err(format!(
                "{what}: timed out after {} s",
                timeout.as_secs_f32()
            ))
        }
    }
}

/// Runs `program args` within `timeout`; panics with its output unless it
/// exits 0. Returns stdout.
pub fn run_ok(program: &str, args: &[&str], timeout: Duration) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            text(&out)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// stdout and stderr of a finished command, as text.
pub fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&err);
    }
    s
}

// ---------------------------------------------------------------------------
// The Debian tree
// ---------------------------------------------------------------------------

/// Set to a debootstrap tree to use it instead of the cache.
pub const ROOTFS_ENV: &str = "PID_SERVER_TEST_ROOTFS";
/// Set to a Debian mirror for debootstrap (default: Debian's).
pub const MIRROR_ENV: &str = "PID_SERVER_TEST_MIRROR";
/// Where the tree is cached between runs.
pub const CACHE_DIR: &str = "/var/cache/pid-server-tests";
const TREE_NAME: &str = "rootfs-bookworm-minbase";
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,curl,procps";
/// debootstrap takes ~45 s with a fast mirror; allow for a slow one.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(900);

fn tree_looks_complete(root: &Path) -> bool {
    ["usr/bin/dpkg", "usr/bin/curl", "usr/bin/systemctl"]
        .iter()
        .all(|p| root.join(p).is_file())
        && (root.join("lib/systemd/systemd").exists()
            || root.join("usr/lib/systemd/systemd").exists())
}

/// A Debian bookworm tree with systemd, made by
/// `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,procps bookworm`
/// and cached under [`CACHE_DIR`] (made once, ~45 s to a few minutes; later
/// runs take it as it is). [`ROOTFS_ENV`] names a tree to use instead.
/// Containers boot it with `--volatile=overlay`, so it stays pristine.
/// Panics if it cannot be made.
pub fn debian_tree() -> PathBuf {
    if let Some(t) = std::env::var_os(ROOTFS_ENV) {
        let t = PathBuf::from(t);
        assert!(
            tree_looks_complete(&t),
            "{ROOTFS_ENV}={} is not a Debian tree with systemd, dpkg and curl",
            t.display()
        );
        return t;
    }
    let mirror =
        std::env::var(MIRROR_ENV).unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let recipe = format!("debootstrap --variant=minbase --include={INCLUDE} {SUITE}\n");
    let cache = Path::new(CACHE_DIR);
    fs::create_dir_all(cache).unwrap_or_else(|e| panic!("mkdir {CACHE_DIR}: {e}"));
    let tree = cache.join(TREE_NAME);
    let marker = cache.join(format!("{TREE_NAME}.recipe"));

    // One builder at a time, across test binaries.
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("rootfs.lock"))
        .unwrap_or_else(|e| panic!("open {CACHE_DIR}/rootfs.lock: {e}"));
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {CACHE_DIR}/rootfs.lock: {e}"));

    if fs::read_to_string(&marker).ok().as_deref() == Some(recipe.as_str())
        && tree_looks_complete(&tree)
    {
        return tree;
    }
    assert!(
        find_in_path("debootstrap").is_some(),
        "no cached Debian tree in {CACHE_DIR} and no `debootstrap` to make one \
         (apt-get install debootstrap)"
    );
    let _ = fs::remove_file(&marker);
    // Partial trees of earlier runs that were killed.
    for e in fs::read_dir(cache).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{TREE_NAME}.partial"))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let partial = cache.join(format!("{TREE_NAME}.partial-{}", std::process::id()));
    let started = Instant::now();
    eprintln!(
        "deploy: making the Debian tree {} with debootstrap (once; cached for later runs)",
        tree.display()
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&partial)
        .arg(&mirror);
    let out = run_timeout(cmd, DEBOOTSTRAP_TIMEOUT);
    let ok = matches!(&out, Ok(o) if o.status.success());
    if !ok || !tree_looks_complete(&partial) {
        let _ = fs::remove_dir_all(&partial);
        let why = match out {
            Ok(o) => tail(&text(&o), 30),
            Err(e) => e,
        };
        panic!("debootstrap of {SUITE} from {mirror} failed:\n{why}");
    }
    let _ = fs::remove_dir_all(&tree);
    fs::rename(&partial, &tree).unwrap_or_else(|e| panic!("rename to {}: {e}", tree.display()));
    fs::write(&marker, &recipe).expect("write recipe marker");
    eprintln!(
        "deploy: Debian tree made in {:.1} s",
        started.elapsed().as_secs_f32()
    );
    tree
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

const NETNS_PREFIX: &str = "pst";
static NETNS_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A network namespace made by the test (`ip netns add`, `lo` up), deleted
/// on drop. Containers join it (`--network-namespace-path=`, podman's
/// `--network ns:`), and the test's clients run in it ([`spawn_in`]), so
/// nothing listens on the host's network and two tests can each use 8080.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        sweep_stale_netns();
        let name = format!(
            "{NETNS_PREFIX}-{}-{}",
            std::process::id(),
            NETNS_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok("ip", &["netns", "add", &name], Duration::from_secs(10));
        let ns = Netns { name };
        run_ok(
            "ip",
            &["-n", &ns.name, "link", "set", "lo", "up"],
            Duration::from_secs(10),
        );
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "del", &self.name]);
        match run_timeout(cmd, Duration::from_secs(10)) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("deploy: ip netns del {}: {}", self.name, text(&o)),
            Err(e) => eprintln!("deploy: {e}"),
        }
    }
}

/// Deletes `pst-<pid>-*` namespaces whose test process is gone.
fn sweep_stale_netns() {
    for e in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(&format!("{NETNS_PREFIX}-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("deploy: deleting stale network namespace {name}");
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a new thread that first enters the network namespace at
/// `netns` (`None`: the host's). Threads `f` starts are in it too (a new
/// thread inherits its creator's namespaces); the test's other threads are
/// not affected.
pub fn spawn_in<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        if let Some(ns) = netns {
            let file = fs::File::open(&ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
            // SAFETY: setns on an fd we own; it changes only this thread's
            // network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns {}: {}", ns.display(), io::Error::last_os_error());
            }
        }
        f()
    })
}

// ---------------------------------------------------------------------------
// HTTP: the client of tests/support/http.rs, run inside a namespace
// ---------------------------------------------------------------------------

pub use crate::http::{Response, Tally};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `GET path` on a new connection to `127.0.0.1:port` in `netns`.
pub fn get(netns: Option<&Path>, port: u16, path: &'static str) -> io::Result<Response> {
    spawn_in(netns.map(Path::to_path_buf), move || {
        crate::http::get(local(port), path)
    })
    .join()
    .expect("client thread panicked")
}

/// Polls `GET path` until it answers 200 (or `timeout`).
pub fn wait_http_ok(netns: Option<&Path>, port: u16, path: &'static str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let r = get(netns, port, path);
        match &r {
            Ok(resp) if resp.status == 200 => return,
            _ if Instant::now() >= deadline => {
                panic!("GET {path} on port {port} did not answer 200 within {timeout:?}: {r:?}")
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A bounded load: `workers` clients on `127.0.0.1:port` in `netns`, half of
/// them opening a new connection per request, half keeping a connection
/// alive until the server closes it (a failure on a reused connection
/// counts: nothing is retried), 1 ms between requests. Each stops at
/// `max_requests / workers` requests, after `max_time`, or when the load is
/// finished or dropped.
pub struct Load {
    loads: Vec<crate::http::Load>,
}

impl Load {
    pub fn start(
        netns: Option<&Path>,
        port: u16,
        workers: usize,
        max_requests: usize,
        max_time: Duration,
    ) -> Load {
        use crate::http::Mode;
        let per_worker = max_requests.div_ceil(workers.max(1));
        let (keep_alive, one_shot) = (workers / 2, workers - workers / 2);
        // The client threads are started inside the namespace and inherit it.
        let loads = spawn_in(netns.map(Path::to_path_buf), move || {
            [
                (Mode::NewConnection, one_shot),
                (Mode::KeepAlive, keep_alive),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(mode, n)| {
                crate::http::Load::paced(
                    local(port),
                    "/",
                    n,
                    mode,
                    per_worker * n,
                    max_time,
                    Duration::from_millis(1),
                )
            })
            .collect()
        })
        .join()
        .expect("load starter panicked");
        Load { loads }
    }

    /// Stops the clients and sums what they saw.
    pub fn finish(self) -> Tally {
        let mut all = Tally::default();
        for l in self.loads {
            all.merge(l.finish());
        }
        all
    }
}
