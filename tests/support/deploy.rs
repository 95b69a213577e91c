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

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
// HTTP
// ---------------------------------------------------------------------------

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The server said `Connection: close`.
    pub close: bool,
}

impl Response {
    /// The PID in `OK. Handled by PID: <pid>`.
    pub fn pid(&self) -> Option<u32> {
        self.body
            .trim()
            .strip_prefix("OK. Handled by PID: ")
            .and_then(|p| p.parse().ok())
    }
}

/// A client connection to `127.0.0.1:port` (in the calling thread's network
/// namespace).
pub struct Conn {
    reader: BufReader<TcpStream>,
    pub served: usize,
    pub closed: bool,
}

impl Conn {
    pub fn open(port: u16, timeout: Duration) -> io::Result<Conn> {
        let s =
            TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s),
            served: 0,
            closed: false,
        })
    }

    /// One GET; `close` asks the server to close after answering.
    pub fn get(&mut self, path: &str, close: bool) -> io::Result<Response> {
        let conn = if close { "close" } else { "keep-alive" };
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pid-server-tests\r\n\
             Connection: {conn}\r\n\r\n"
        )?;
        let r = read_response(&mut self.reader)?;
        self.served += 1;
        if r.close || close {
            self.closed = true;
        }
        Ok(r)
    }
}

fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut len = None;
    let mut close = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse::<usize>().ok();
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            } else if k == "transfer-encoding" {
                return Err(bad(format!("unexpected transfer-encoding {v}")));
            }
        }
    }
    let len = len.ok_or_else(|| bad("no content-length".into()))?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// `GET path` on a new connection to `127.0.0.1:port` in `netns`.
pub fn get(netns: Option<&Path>, port: u16, path: &'static str) -> io::Result<Response> {
    spawn_in(netns.map(Path::to_path_buf), move || {
        Conn::open(port, Duration::from_secs(10))?.get(path, true)
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

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    /// Failures by kind.
    pub failures: BTreeMap<String, usize>,
    /// The first few failures in full.
    pub examples: Vec<String>,
    /// 200s by the PID that answered.
    pub by_pid: BTreeMap<u32, usize>,
    /// PIDs in the order they first answered.
    pub pid_order: Vec<u32>,
    pub elapsed: Duration,
}

impl Tally {
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    fn record(&mut self, r: io::Result<Response>, reused: bool) {
        self.sent += 1;
        let failure = match r {
            Ok(resp) if resp.status == 200 => match resp.pid() {
                Some(pid) => {
                    self.ok += 1;
                    *self.by_pid.entry(pid).or_default() += 1;
                    if !self.pid_order.contains(&pid) {
                        self.pid_order.push(pid);
                    }
                    return;
                }
                None => ("unexpected body".to_string(), format!("{resp:?}")),
            },
            Ok(resp) => (format!("status {}", resp.status), format!("{resp:?}")),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => "refused".to_string(),
                    io::ErrorKind::ConnectionReset => "reset".into(),
                    io::ErrorKind::UnexpectedEof => "closed".into(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
                    k => format!("{k:?}"),
                };
                let kind = if reused {
                    format!("{kind} on a reused connection")
                } else {
                    kind
                };
                (kind, e.to_string())
            }
        };
        if self.examples.len() < 10 {
            self.examples.push(format!("{}: {}", failure.0, failure.1));
        }
        *self.failures.entry(failure.0).or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
        for e in o.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
        for (k, v) in o.by_pid {
            *self.by_pid.entry(k).or_default() += v;
        }
        for p in o.pid_order {
            if !self.pid_order.contains(&p) {
                self.pid_order.push(p);
            }
        }
    }

    /// One line: sent, ok, failures, requests per PID.
    pub fn summary(&self) -> String {
        format!(
            "{} requests in {:.1} s: {} ok, {} failed {:?}; by PID {:?}",
            self.sent,
            self.elapsed.as_secs_f32(),
            self.ok,
            self.failed(),
            self.failures,
            self.by_pid
        )
    }
}

/// A bounded load: `workers` clients on `127.0.0.1:port` in `netns`, half of
/// them opening a new connection per request, half keeping a connection
/// alive until the server closes it (a failure on a reused connection
/// counts: nothing is retried). Each stops at `max_requests / workers`
/// requests, after `max_time`, or when the load is finished or dropped.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Tally>>,
}

impl Load {
    pub fn start(
        netns: Option<&Path>,
        port: u16,
        workers: usize,
        max_requests: usize,
        max_time: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let per_worker = max_requests.div_ceil(workers.max(1));
        let handle = spawn_in(netns.map(Path::to_path_buf), move || {
            let started = Instant::now();
            let deadline = started + max_time;
            let handles: Vec<_> = (0..workers)
                .map(|i| {
                    let stop = stop2.clone();
                    let keep_alive = i % 2 == 1;
                    thread::spawn(move || worker(port, keep_alive, per_worker, deadline, &stop))
                })
                .collect();
            let mut all = Tally::default();
            for h in handles {
                all.merge(h.join().expect("load worker panicked"));
            }
            all.elapsed = started.elapsed();
            all
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the clients and sums what they saw.
    pub fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("load already finished")
            .join()
            .expect("load thread panicked")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn worker(port: u16, keep_alive: bool, max: usize, deadline: Instant, stop: &AtomicBool) -> Tally {
    let timeout = Duration::from_secs(5);
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    while t.sent < max && Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if !keep_alive {
            let r = Conn::open(port, timeout).and_then(|mut c| c.get("/", true));
            t.record(r, false);
        } else {
            if conn.as_ref().is_none_or(|c| c.closed) {
                match Conn::open(port, timeout) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        t.record(Err(e), false);
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connection");
            let reused = c.served > 0;
            let r = c.get("/", false);
            if r.is_err() {
                conn = None;
            }
            t.record(r, reused);
        }
        // A steady load, not a flood: the machine has two cores.
        thread::sleep(Duration::from_millis(1));
    }
    t
}
