//! A hostile local user (uid 65534) against the control socket of a
//! server run by root: its requests are refused before anything is read,
//! its connections cost the server no descriptors, an allowed user's
//! requests and connections are capped, and the reload helper talks only to
//! the PID it was given.
//!
//! These tests need root (to act as another user); without it they say
//! `SKIPPED` (an error under `CI=true`).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use pid_server_test_support::proc::{self, Proc, WAIT};
use pid_server_test_support::{TestCommand, http, report, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The user the attacker runs as ("nobody").
const NOBODY: u32 = 65534;

/// Whether the test can act as another user; says `SKIPPED` if not.
fn root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        report::cannot_run(test, "needs root to act as uid 65534");
    }
    root
}

/// Runs `f` on a thread whose credentials are uid and gid 65534. Linux
/// keeps credentials per thread, and the raw `setresuid`/`setresgid`
/// system calls change only the calling thread's (libc's wrappers change
/// every thread's), so what that thread binds or connects carries 65534 in
/// `SO_PEERCRED`, as a process of that user would, while the rest of the
/// test stays root. The thread ends with `f`.
fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let t = std::thread::spawn(move || {
        // SAFETY: plain system calls on this thread's credentials; no
        // memory is touched. The gid first, while still allowed to.
        let (g, u) = unsafe {
            (
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
            )
        };
        assert_eq!((g, u), (0, 0), "{}", std::io::Error::last_os_error());
        f()
    });
    wait::join(t, "the uid 65534 thread", Duration::from_secs(60))
}

/// The abstract control socket of the server `pid`.
fn control_address(pid: u32) -> SocketAddr {
    SocketAddr::from_abstract_name(format!("pid-server/{pid}/control").as_bytes()).unwrap()
}

/// Connects to `pid`'s control socket, sends `head`, then `size` bytes of
/// `x` and a newline (stopping when the server closes), and returns how
/// many bytes went out and the answer.
fn send_huge(pid: u32, head: &str, size: usize) -> (usize, String) {
    let mut s = UnixStream::connect_addr(&control_address(pid)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0;
    let chunk = vec![b'x'; 1 << 20];
    let mut write = |b: &[u8], sent: &mut usize| match s.write_all(b) {
        Ok(()) => {
            *sent += b.len();
            true
        }
        Err(_) => false,
    };
    if write(head.as_bytes(), &mut sent) {
        while sent < size && write(&chunk, &mut sent) {}
        write(b"\n", &mut sent);
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    (sent, answer)
}

#[test]
fn another_user_s_huge_request_is_refused_before_it_is_read() {
    if !root("another_user_s_huge_request_is_refused_before_it_is_read") {
        return;
    }
    let (server, _notify, _addr) = proc::start(BIN);
    let pid = server.pid;
    let before = proc::status_kb(pid, "VmHWM");
    // A 400 MB request line, and a 256 MB environment block.
    let (line_sent, line_answer) = as_nobody(move || send_huge(pid, "", 400 << 20));
    let (env_sent, env_answer) =
        as_nobody(move || send_huge(pid, "upgrade\nenvironment 1\nA=", 256 << 20));
    let after = proc::status_kb(pid, "VmHWM");
    eprintln!(
        "peak RSS {before} kB -> {after} kB; sent {line_sent} + {env_sent} bytes; \
         answers {line_answer:?}, {env_answer:?}"
    );
    for answer in [&line_answer, &env_answer] {
        assert!(
            answer.starts_with("refused permission denied"),
            "{answer:?}"
        );
    }
    assert!(after < before + 4 * 1024, "peak RSS {before} -> {after} kB");
    // The server's own user (root here) is capped too, and told the cap.
    let (_, answer) = send_huge(pid, "upgrade", 100);
    assert!(
        answer.starts_with("refused request too long: over 64 bytes"),
        "{answer:?}"
    );
    let (_, answer) = send_huge(pid, "upgrade\nenvironment 1\nA=", 2 << 20);
    assert!(
        answer.starts_with("refused request too long: environment over 1048576 bytes"),
        "{answer:?}"
    );
    let (_, answer) = send_huge(pid, "upgrade\nenvironment 4097\n", 0);
    assert!(
        answer.starts_with("refused request too long: environment over 4096 variables"),
        "{answer:?}"
    );
    // No reload started, and the server still serves.
    assert_eq!(proc::health_pid(_addr), pid);
}

#[test]
fn another_user_s_reload_exits_77() {
    if !root("another_user_s_reload_exits_77") {
        return;
    }
    let (server, _notify, addr) = proc::start(BIN);
    let out = TestCommand::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["reload", "--pid", &server.pid.to_string()])
        .timeout(proc::RELOAD_TIMEOUT)
        .output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(proc::health_pid(addr), server.pid);
}

/// Connects to `pid`'s control socket without waiting: `None` when its
/// queue is full.
fn connect_now(pid: u32) -> Option<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = UnixAddr::new_abstract(format!("pid-server/{pid}/control").as_bytes()).unwrap();
    use std::os::fd::AsRawFd;
    connect(fd.as_raw_fd(), &addr).ok()?;
    Some(fd)
}

/// What came on `fd` within `within`, up to its end.
fn answer_of(fd: OwnedFd, within: Duration) -> String {
    let mut s = UnixStream::from(fd);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn idle_control_connections_do_not_starve_http() {
    if !root("idle_control_connections_do_not_starve_http") {
        return;
    }
    // 256 descriptors, and no room to raise them.
    let (server, addr) = proc::start_with_nofile(BIN, 256, 256);
    let pid = server.pid;
    // More idle connections from uid 65534 than the server has descriptors.
    let idle: Vec<OwnedFd> = as_nobody(move || (0..300).map_while(|_| connect_now(pid)).collect());
    let mut failed = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        if let Err(e) = http::get_timeout(addr, "/healthz", Duration::from_secs(1)) {
            failed.push(format!("{e} after {:?}", t.elapsed()));
        }
    }
    eprintln!(
        "{} idle connections from uid 65534; {} of 20 probes failed: {failed:?}",
        idle.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(idle.len(), 300);
    // Each was refused and closed at once, not left open.
    for fd in idle {
        let answer = answer_of(fd, Duration::from_secs(2));
        assert!(
            answer.starts_with("refused permission denied"),
            "{answer:?}"
        );
    }
    // The server's own user: 8 idle connections are served (waiting for
    // their request); beyond those, each is refused and closed at once.
    let mine: Vec<OwnedFd> = (0..12).map_while(|_| connect_now(pid)).collect();
    assert_eq!(mine.len(), 12);
    let mut mine = mine.into_iter();
    let served: Vec<OwnedFd> = mine.by_ref().take(8).collect();
    for fd in mine {
        let answer = answer_of(fd, Duration::from_secs(2));
        assert!(
            answer.starts_with("refused busy: 8 control connections are open"),
            "{answer:?}"
        );
    }
    // The first is still open, waiting for its request.
    let first = UnixStream::from(served.into_iter().next().unwrap());
    let mut byte = [0u8; 1];
    let r = (&first).read(&mut byte);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "{r:?}"
    );
    assert!(http::get(addr, "/healthz").is_ok());
}

#[test]
fn the_helper_sends_nothing_to_a_process_squatting_the_name() {
    if !root("the_helper_sends_nothing_to_a_process_squatting_the_name") {
        return;
    }
    // A real process whose PID the squatter names.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("60");
    let target = Proc::spawn(sleeper);
    let pid = target.pid;
    // uid 65534 binds that PID's control socket name and answers as a
    // server would, once it has read what the helper sent.
    // (A client sees the credentials of whoever called listen().)
    let squatter = as_nobody(move || {
        let l = UnixListener::bind_addr(&control_address(pid)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let read = std::thread::spawn(move || {
        let (mut s, _) = wait::until("the helper to connect", WAIT, || squatter.accept().ok());
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; 1 << 16];
        let n = s.read(&mut got).unwrap_or(0);
        let _ = s.write_all(b"ok 1 1 7 0\n");
        got.truncate(n);
        got
    });
    let out = TestCommand::new(BIN)
        .args(["reload", "--pid", &pid.to_string()])
        .env("INVOCATION_ID", "x")
        .env("SECRET", "y")
        .env_remove("RUNTIME_DIRECTORY")
        .timeout(proc::RELOAD_TIMEOUT)
        .output();
    let got = wait::join(read, "the squatter", WAIT);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "exit {:?}, stdout {:?}, stderr {err:?}; the squatter read {} bytes",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        got.len()
    );
    assert_eq!(got.len(), 0, "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(out.status.code(), Some(76), "{err}");
    let me = std::process::id();
    assert!(
        err.contains(&format!(
            "@pid-server/{pid}/control is held by PID {me} (uid 65534), not by PID {pid}"
        )),
        "{err}"
    );
}

#[test]
fn root_s_helper_reloads_a_server_of_another_user() {
    if !root("root_s_helper_reloads_a_server_of_another_user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The server runs as 65534, and may write to the mock notify socket.
    let notify = proc::Notify::new();
    let open = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(notify.path.parent().unwrap(), 0o755);
    open(&notify.path, 0o777);
    // A copy uid 65534 can run: the checkout's `target/` may sit under a
    // directory only root can enter (a clone made in `mktemp -d`, `/root`).
    let bin_dir = tempfile::tempdir().unwrap();
    open(bin_dir.path(), 0o755);
    let bin = bin_dir.path().join("pid-server");
    std::fs::copy(BIN, &bin).unwrap();
    let bin = bin.to_str().unwrap();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(bin, socket, &notify);
    cmd.uid(NOBODY).gid(NOBODY).env_remove("RUNTIME_DIRECTORY");
    let server = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = proc::Reaper::default();
    // Root, by hand: the listener is that PID and runs as that PID's user.
    let (code, out, err) = proc::reload(BIN, &["--pid", &server.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let new = proc::health_pid(addr);
    reaper.watch(new);
    assert!(
        out.starts_with(&format!("reloaded: {} -> {new}", server.pid)),
        "{out}"
    );
}
