//! Running the real `pid-server` binary in tests: spawn it, wait for its
//! `READY=1` on a mock `NOTIFY_SOCKET`, read its log, and always reap it
//! (and any generation it started) when the test ends, also on panic.
//!
//! Functions that start the binary take its path (`BIN` of the test file,
//! or a private copy the test may replace).

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::TestCommand;

/// A bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// A mock systemd notify socket: a thread receives every datagram, as
/// systemd does (a receiver that stops reading would block the sender). A
/// plain `recv` also closes fds passed with `BARRIER=1`, which is what
/// answers the barrier.
pub struct Notify {
    pub path: PathBuf,
    seen: Arc<(Mutex<Vec<String>>, Condvar)>,
    _dir: tempfile::TempDir,
}

impl Notify {
    pub fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let s2 = seen.clone();
        // Ends with the test binary; it only reads.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = sock.recv(&mut buf) {
                let (lock, cv) = &*s2;
                lock.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                cv.notify_all();
            }
        });
        Notify {
            path,
            seen,
            _dir: dir,
        }
    }

    /// Waits (bounded) for a message for which `pred` holds and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let (lock, cv) = &*self.seen;
        let mut seen = lock.lock().unwrap();
        loop {
            if let Some(m) = seen.iter().find(|m| pred(m)) {
                return m.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no notify message with {what}; saw {:?}",
                *seen
            );
            seen = cv.wait_timeout(seen, left).unwrap().0;
        }
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<String> {
        self.seen.0.lock().unwrap().clone()
    }
}

impl Default for Notify {
    fn default() -> Notify {
        Notify::new()
    }
}

/// A `pid-server` process started by a test.
pub struct Proc {
    pub child: Child,
    pub pid: u32,
    log: PathBuf,
    _logdir: tempfile::TempDir,
    /// The command it was started with, kept for what its `pre_exec`
    /// holds: a [`Socket`] passed to the process stays open (its port
    /// reserved) as long as the process is the test's.
    _cmd: Command,
}

impl Proc {
    /// Spawns `cmd` with stderr to a file.
    pub fn spawn(mut cmd: Command) -> Proc {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("stderr.log");
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
        // Plain logs, whatever the test runner's environment says.
        cmd.env_remove("JOURNAL_STREAM").env("NO_COLOR", "1");
        // A binary a test just copied can be briefly "busy": another test
        // thread's fork inherited the copy's write fd until its exec.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.expect("spawn pid-server"),
            }
        };
        let pid = child.id();
        Proc {
            child,
            pid,
            log,
            _logdir: logdir,
            _cmd: cmd,
        }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid as i32), sig).unwrap();
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        crate::wait::within(within, || child.try_wait().unwrap()).unwrap_or_else(|| {
            panic!(
                "pid-server {} still running after {within:?}; log:\n{}",
                self.pid,
                self.log()
            )
        })
    }
}

/// The PIDs of `pid`'s children, grandchildren, ...
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
        out.push(k);
        out.extend(descendants(k));
    }
    out
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A generation the process started (a handover under way when the
        // test failed) must not outlive the test either.
        for pid in descendants(self.pid) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pid-server {} log ---\n{}", self.pid, self.log());
        }
    }
}

/// Kills processes that are not our children (later generations) when the
/// test ends.
#[derive(Default)]
pub struct Reaper(pub Mutex<Vec<u32>>);

impl Reaper {
    pub fn watch(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`, ...). Panics when
/// the process or the field is gone: a figure a test asserts on must be
/// real.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The resident memory of `pid` (`VmRSS`), in kB.
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` is gone.
pub fn wait_gone(pid: u32, within: Duration) {
    crate::wait::until(&format!("PID {pid} to be gone"), within, || {
        (!alive(pid)).then_some(())
    });
}

/// A command for the binary at `bin` serving `--listen addr` (a socket it
/// binds itself, with `SO_REUSEPORT`), with the mock notify socket. For
/// tests whose point is that bound socket; others pass a [`Socket`] with
/// [`serve_socket_cmd`].
pub fn serve_cmd(bin: impl AsRef<Path>, addr: SocketAddr, notify: &Notify) -> Command {
    let mut cmd = Command::new(bin.as_ref());
    cmd.args(["serve", "--listen", &addr.to_string()])
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("WATCHDOG_USEC");
    cmd
}

/// An example of the calling test's package (`examples/NAME.rs`), which
/// `cargo test` builds beside the test binaries; panics if it is missing.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("examples").join(name);
    assert!(bin.exists(), "{} not built (run cargo test)", bin.display());
    bin
}

/// A loopback address whose port was free a moment ago, for a process that
/// must bind the address itself (`--listen`, a `listen` in a file, another
/// tool's socket); a test's server takes a [`Socket`] instead.
///
/// Nothing reserves the port between this check and the server's bind, so
/// it is picked where nothing else of the tests' would take it: below the
/// kernel's ephemeral range (`net.ipv4.ip_local_port_range`), from which
/// every `bind` to port 0 and every outgoing connection's local port come
/// (a port 0 bound and released was once taken in between by another
/// test's client connection, and the server failed with `EADDRINUSE`), and
/// never the same one twice in a test binary (pid-server sets
/// `SO_REUSEPORT`: two servers given one port would share it silently).
/// Test binaries run one after another.
pub fn free_addr() -> SocketAddr {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Above the well-known ports and what services commonly take.
    let low = 20_000;
    assert!(
        ephemeral > low + 1000,
        "the ephemeral port range starts at {ephemeral}: no room below it for test ports"
    );
    // A test that panicked holding it leaves the list as it was.
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = fastrand::Rng::new();
    for _ in 0..1000 {
        let port = rng.u16(low..ephemeral);
        if given.contains(&port) {
            continue;
        }
        // std's listener sets SO_REUSEADDR: a connection in TIME_WAIT on
        // the port does not count, a listener does.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
    panic!("no free port in {low}..{ephemeral} after 1000 tries");
}

/// A listening loopback socket the test binds and hands to pid-server the
/// way systemd does ([`serve_socket_cmd`]). The port is the test's from the
/// bind on: never released before the server has it, and without
/// `SO_REUSEPORT`, so no other server can bind it beside this one.
pub struct Socket {
    listener: std::net::TcpListener,
}

/// pid-server's own backlog for the sockets it binds, so a test sees the
/// same queue either way (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

impl Socket {
    /// Binds 127.0.0.1 on a port the kernel picks.
    pub fn new() -> Socket {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // std listens with a backlog of its own; listen(2) again sets ours.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(BACKLOG).unwrap())
            .unwrap();
        Socket { listener }
    }

    /// Its address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Hands the socket to the process `cmd` starts, as systemd passes
    /// one: at fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES=http` (the name the
    /// packaged socket unit gives it). No `LISTEN_PID`: its value (the
    /// child's PID) exists only after the fork, where setting a variable
    /// would allocate, and pid-server and the library accept sockets
    /// without it, as they do from a parent generation. `cmd` owns the
    /// socket from now on; a [`Proc`] spawned from it keeps it open as long
    /// as the process is the test's.
    pub fn pass_to(self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        cmd.env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .env_remove("LISTEN_PID");
        // SAFETY: after the fork only dup2 and fcntl run, both
        // async-signal-safe, and nothing allocates (reading the fd number
        // is a field read). The closure owns the socket, so the fd is open
        // whenever it runs.
        unsafe {
            cmd.pre_exec(move || {
                let fd = self.listener.as_raw_fd();
                // dup2 onto the same number would keep close-on-exec:
                // clear it instead.
                let r = if fd == 3 {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Default for Socket {
    fn default() -> Socket {
        Socket::new()
    }
}

/// A command for the binary at `bin` serving `socket` ([`Socket::pass_to`]),
/// with the mock notify socket.
pub fn serve_socket_cmd(bin: impl AsRef<Path>, socket: Socket, notify: &Notify) -> Command {
    let mut cmd = Command::new(bin.as_ref());
    cmd.arg("serve")
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("WATCHDOG_USEC");
    socket.pass_to(&mut cmd);
    cmd
}

/// Starts pid-server on a fresh loopback [`Socket`] and waits for
/// `READY=1`.
pub fn start(bin: impl AsRef<Path>) -> (Proc, Notify, SocketAddr) {
    start_with(bin, &[])
}

/// [`start`] with more arguments to `serve`.
pub fn start_with(bin: impl AsRef<Path>, args: &[&str]) -> (Proc, Notify, SocketAddr) {
    let notify = Notify::new();
    let socket = Socket::new();
    let addr = socket.addr();
    let mut cmd = serve_socket_cmd(bin, socket, &notify);
    cmd.args(args);
    let p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, notify, addr)
}

/// Starts pid-server on `--listen` a [`free_addr`], binding the socket
/// itself, and waits for `READY=1`: for tests of the bound socket (its
/// status line, `SO_REUSEPORT` sharing).
pub fn start_bound(bin: impl AsRef<Path>) -> (Proc, Notify, SocketAddr) {
    let notify = Notify::new();
    let addr = free_addr();
    let p = Proc::spawn(serve_cmd(bin, addr, &notify));
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, notify, addr)
}

/// Starts the binary at `bin` with the open-files limit set to
/// `soft`:`hard` and waits for `READY=1`.
pub fn start_with_nofile(bin: impl AsRef<Path>, soft: u64, hard: u64) -> (Proc, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let notify = Notify::new();
    let socket = Socket::new();
    let addr = socket.addr();
    let mut cmd = serve_socket_cmd(bin, socket, &notify);
    // SAFETY: setrlimit is async-signal-safe and touches only the child;
    // nothing here allocates.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, addr)
}

/// A private copy of the binary at `bin` in `dir`, so a test can replace
/// it like a package upgrade does.
pub fn private_binary(bin: impl AsRef<Path>, dir: &Path) -> PathBuf {
    let p = dir.join("pid-server");
    std::fs::copy(bin, &p).unwrap();
    p
}

/// Atomically replaces `path` with an executable shell script.
pub fn install_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Atomically puts the binary at `bin` back at `path`.
pub fn install_real(bin: impl AsRef<Path>, path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(bin, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs `BIN reload ARGS` (bounded: longer than the helper's own 60 s
/// default) and returns (exit code, stdout, stderr).
pub fn reload(bin: impl AsRef<Path>, args: &[&str]) -> (i32, String, String) {
    let out = TestCommand::new(bin.as_ref())
        .arg("reload")
        .args(args)
        .timeout(RELOAD_TIMEOUT)
        .output();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The new PID in the helper's line `reloaded: OLD -> NEW (generation G) …`
/// for a reload of `old`; panics on any other line.
pub fn reloaded_pid(line: &str, old: u32) -> u32 {
    line.trim()
        .strip_prefix(&format!("reloaded: {old} -> "))
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected helper line {line:?}"))
}

/// Reloads `pid` with `bin`'s helper, which must succeed; returns the new
/// PID and the helper's line.
pub fn reload_ok(bin: impl AsRef<Path>, pid: u32) -> (u32, String) {
    let (code, out, err) = reload(bin, &["--pid", &pid.to_string()]);
    assert_eq!(code, 0, "reload of {pid} failed: {out} {err}");
    let line = out.trim().to_string();
    let new = reloaded_pid(&line, pid);
    assert_ne!(new, pid, "{line}");
    (new, line)
}

/// The bound on a `pid-server reload` run by [`reload`].
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// The PID that answers `/healthz` on a new connection.
pub fn health_pid(addr: SocketAddr) -> u32 {
    let r = crate::http::get(addr, "/healthz").unwrap();
    crate::http::healthz_pid(&r.body).unwrap_or_else(|| panic!("no PID in /healthz: {r:?}"))
}
