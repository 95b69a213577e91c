//! The serve contract, with the real binary and real sockets: sockets from
//! systemd or bound with SO_REUSEPORT, notifications, drain, bad input.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Notify, Proc, WAIT};
use pid_server_test_support::{TestCommand, http, report, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

#[test]
fn two_processes_share_a_port_and_both_answer() {
    // Both bind `--listen` themselves: sharing a port with SO_REUSEPORT is
    // the point, which a passed socket (held without it) would refuse.
    let (a, _na, addr) = proc::start_bound(BIN);
    let nb = Notify::new();
    let b = Proc::spawn(proc::serve_cmd(BIN, addr, &nb));
    nb.wait_for("READY=1", |m| m.contains("READY=1"));
    let mut seen = std::collections::BTreeSet::new();
    // The kernel spreads new connections over both sockets; 200 tries make
    // missing one of two PIDs vanishingly unlikely.
    for _ in 0..200 {
        let r = http::get(addr, "/").unwrap();
        assert_eq!(r.status, 200);
        seen.insert(r.pid().unwrap());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, [a.pid, b.pid].into_iter().collect());
}

#[test]
fn answers_with_its_pid_and_reports_health() {
    // Bound from `--listen`, for the status line of a socket the process
    // bound itself (the passed one's is `takes_a_socket_passed_the_systemd_way`).
    let (p, notify, addr) = proc::start_bound(BIN);
    let r = http::get(addr, "/").unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, &*format!("OK. Handled by PID: {}\n", p.pid))
    );
    let h = http::get(addr, "/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v["pid"], p.pid);
    assert_eq!(v["generation"], 0);
    assert_eq!(v["state"], "serving");
    assert_eq!(http::get(addr, "/readyz").unwrap().status, 200);
    assert_eq!(http::get(addr, "/slow?ms=abc").unwrap().status, 400);
    assert_eq!(http::get(addr, "/nope").unwrap().status, 404);
    let ready = notify.wait_for("READY=1", |m| m.contains("READY=1"));
    assert!(
        ready.contains(&format!(
            "STATUS=serving 1 socket (bound: {addr}) · generation 0 · "
        )),
        "{ready}"
    );
}

#[test]
fn takes_a_socket_passed_the_systemd_way() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let notify = Notify::new();
    let mut cmd = Command::new(BIN);
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("NOTIFY_SOCKET", &notify.path)
        // Ignored when sockets are passed: this port is not free.
        .args(["--listen", "127.0.0.1:1"]);
    // SAFETY: dup2 is async-signal-safe; the fd is ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc_dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let p = Proc::spawn(cmd);
    let ready = notify.wait_for("READY=1", |m| m.contains("READY=1"));
    assert!(ready.contains("serving 1 socket (systemd: web)"), "{ready}");
    drop(listener);
    let r = http::get(addr, "/").unwrap();
    assert_eq!(r.pid(), Some(p.pid));
    assert!(p.log().contains("(systemd, web)"), "{}", p.log());
}

/// In a child before exec: put `from` at fd `to`, inheritable.
fn libc_dup2(from: i32, to: i32) -> i32 {
    // SAFETY: plain fd syscalls, async-signal-safe. dup2 onto the same
    // number would leave close-on-exec set, so clear it instead.
    unsafe {
        if from == to {
            libc::fcntl(from, libc::F_SETFD, 0)
        } else {
            libc::dup2(from, to)
        }
    }
}

#[test]
fn runs_under_systemd_socket_activate() {
    const TEST: &str = "runs_under_systemd_socket_activate";
    if !report::require_tools(
        TEST,
        &[("systemd-socket-activate", "apt-get install systemd")],
    ) {
        return;
    }
    let path = report::find_in_path("systemd-socket-activate").unwrap();
    // A port number for systemd-socket-activate, which binds it itself
    // (it takes no socket from us).
    let addr = proc::free_addr();
    let notify = Notify::new();
    let mut cmd = Command::new(path);
    cmd.args([
        "-l",
        &addr.to_string(),
        "--fdname=http",
        "-E",
        "NOTIFY_SOCKET",
        BIN,
    ])
    .env("NOTIFY_SOCKET", &notify.path);
    let _p = Proc::spawn(cmd);
    // systemd-socket-activate binds, then starts us on the first connection
    // (it sets LISTEN_PID right); wait for the port to accept, bounded.
    let r = wait::until_ok("an answer", WAIT, || http::get(addr, "/healthz"));
    assert_eq!(r.status, 200);
    let ready = notify.wait_for("READY=1", |m| m.contains("READY=1"));
    assert!(ready.contains("(systemd: http)"), "{ready}");
}

#[test]
fn sigterm_finishes_in_flight_work_and_turns_unready() {
    let (mut p, notify, addr) = proc::start(BIN);
    // A keep-alive connection opened before the drain, to ask /readyz on it
    // afterwards (new connections are no longer accepted then).
    let mut probe = http::Conn::open(addr, WAIT).unwrap();
    assert_eq!(probe.get("/readyz").unwrap().status, 200);
    let slow = std::thread::spawn(move || http::get(addr, "/slow?ms=1500"));
    // The slow request is in flight once /healthz counts it.
    wait::until("the slow request to arrive", WAIT, || {
        (proc_in_flight(addr, &mut probe) >= 2).then_some(())
    });
    p.signal(Signal::SIGTERM);
    let stopping = notify.wait_for("STOPPING=1", |m| m.contains("STOPPING=1"));
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let r = probe.get("/readyz").unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.close,
        "a response during the drain must say Connection: close"
    );
    let slow = slow.join().unwrap().unwrap();
    assert_eq!((slow.status, slow.pid()), (200, Some(p.pid)));
    let st = p.wait_exit(WAIT);
    assert_eq!(st.code(), Some(0), "{}", p.log());
    assert!(p.log().contains("drained in"), "{}", p.log());
}

/// `in_flight` from /healthz on `conn` (which counts itself).
fn proc_in_flight(_addr: std::net::SocketAddr, conn: &mut http::Conn) -> u64 {
    let r = conn.get("/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["in_flight"].as_u64().unwrap()
}

#[test]
fn idle_keepalive_connections_are_closed_after_the_grace() {
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.args(["--idle-grace-ms", "200"]);
    let mut p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let mut idle = http::Conn::open(addr, WAIT).unwrap();
    assert_eq!(idle.get("/").unwrap().status, 200);
    let t = Instant::now();
    p.signal(Signal::SIGTERM);
    // The process exits once the idle connection is closed: well after the
    // grace, well before the drain timeout.
    assert_eq!(p.wait_exit(WAIT).code(), Some(0));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(150),
        "closed before the grace: {took:?}"
    );
    assert!(
        idle.get("/").is_err(),
        "the idle connection should be closed"
    );
}

#[test]
fn drain_timeout_cuts_and_counts() {
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.args(["--drain-timeout", "1"]);
    let mut p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let mut probe = http::Conn::open(addr, WAIT).unwrap();
    let slow = std::thread::spawn(move || http::get(addr, "/slow?ms=20000"));
    wait::until("the slow request to arrive", WAIT, || {
        (proc_in_flight(addr, &mut probe) >= 2).then_some(())
    });
    drop(probe);
    let t = Instant::now();
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(WAIT).code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        slow.join().unwrap().is_err(),
        "the cut request cannot have succeeded"
    );
    let log = p.log();
    assert!(log.contains("cut 1 in-flight requests"), "{log}");
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let (mut p, notify, addr) = proc::start(BIN);
    let mut probe = http::Conn::open(addr, WAIT).unwrap();
    let _slow = std::thread::spawn(move || http::get(addr, "/slow?ms=20000"));
    wait::until("the slow request to arrive", WAIT, || {
        (proc_in_flight(addr, &mut probe) >= 2).then_some(())
    });
    p.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", |m| m.contains("STOPPING=1"));
    p.signal(Signal::SIGINT);
    assert_eq!(p.wait_exit(WAIT).code(), Some(2));
}

/// Runs the binary expecting a start-up failure: one line on stderr, the
/// given exit code.
fn expect_one_line_error(cmd: &mut TestCommand, code: i32, needle: &str) {
    let out = cmd.env_remove("JOURNAL_STREAM").output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("pid-server: error: "), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn bad_input_is_one_clear_line_and_a_nonzero_exit() {
    expect_one_line_error(TestCommand::new(BIN).arg("--bogus"), 64, "--bogus");
    expect_one_line_error(
        TestCommand::new(BIN).args(["--drain-timeout", "0"]),
        64,
        "drain-timeout",
    );
    expect_one_line_error(
        TestCommand::new(BIN).args(["--listen", "localhost"]),
        64,
        "localhost",
    );
    expect_one_line_error(
        TestCommand::new(BIN).env("LISTEN_FDS", "abc"),
        64,
        "LISTEN_FDS",
    );
    expect_one_line_error(
        TestCommand::new(BIN).env("LISTEN_FDS", "999999"),
        64,
        "LISTEN_FDS",
    );
    // fd 3 is a regular file, not a socket.
    let f = tempfile::tempfile().unwrap();
    let fd = f.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.env("LISTEN_FDS", "1");
    // SAFETY: dup2 is async-signal-safe; the fd is ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc_dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    expect_one_line_error(&mut TestCommand::from(cmd), 1, "inherited fd 3");
    // A closed fd 3.
    expect_one_line_error(
        TestCommand::new("/bin/sh")
            .args(["-c", &format!("exec 3>&-; exec {BIN}")])
            .env("LISTEN_FDS", "1"),
        1,
        "inherited fd 3",
    );
}

/// Variables one process set for another: each is one clear line, never a
/// silent start that cannot become ready.
#[test]
fn a_stale_listen_pid_or_handover_fd_is_one_clear_line() {
    // Only a valid `--listen` for processes that fail before they bind.
    let addr = proc::free_addr().to_string();
    // Not a PID at all: sd_listen_fds(3) fails with -EINVAL on it.
    expect_one_line_error(
        TestCommand::new(BIN)
            .args(["--listen", &addr])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "garbage")
            .timeout(Duration::from_secs(10)),
        64,
        "LISTEN_PID=\"garbage\"",
    );
    // Open, but not a channel from the parent: before, the process served,
    // never became ready and ignored SIGTERM (the bound fails it here).
    expect_one_line_error(
        TestCommand::new("/bin/sh")
            .args([
                "-c",
                &format!("exec 7</dev/null; exec {BIN} --listen {addr}"),
            ])
            .env("PID_SERVER_HANDOVER_FD", "7")
            .timeout(Duration::from_secs(10)),
        64,
        "PID_SERVER_HANDOVER_FD=7 is not a handover channel from the parent process",
    );
}

#[test]
fn a_port_taken_without_reuseport_fails_clearly_and_harms_nobody() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    expect_one_line_error(
        TestCommand::new(BIN).args(["--listen", &addr.to_string()]),
        1,
        &addr.to_string(),
    );
    // The holder still works.
    let _c = std::net::TcpStream::connect(addr).unwrap();
    assert!(held.accept().is_ok());
}

#[test]
fn help_and_version() {
    // stdout() asserts the exit status is 0.
    let version = TestCommand::new(BIN).arg("--version").stdout();
    assert!(version.starts_with("pid-server "));
    let help = TestCommand::new(BIN).arg("--help").stdout();
    assert!(
        help.contains("reload") && help.contains("--listen"),
        "{help}"
    );
}

/// jemalloc reads the options compiled into the binary (`src/main.rs`) at
/// its first allocation, and one it does not take (a misspelt name, a bad
/// range) only costs a line on stderr: the setting is silently not there.
#[test]
fn the_allocator_takes_its_options() {
    let out = TestCommand::new(BIN)
        .arg("--version")
        .env_remove("_RJEM_MALLOC_CONF")
        .output();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("<jemalloc>"), "{stderr}");
    // The check sees what jemalloc says of a setting it refuses.
    let bad = TestCommand::new(BIN)
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "slab_sizes:1-2")
        .output();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("<jemalloc>: Invalid"), "{stderr}");
}

/// A parent that blocks signals passes its mask on; SIGTERM must still
/// drain us.
#[test]
fn sigterm_works_even_when_the_parent_blocked_it() {
    let notify = Notify::new();
    let mut cmd = proc::serve_socket_cmd(BIN, proc::Socket::new(), &notify);
    // SAFETY: sigprocmask in the child before exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGUSR2);
            set.thread_block().map_err(std::io::Error::from)
        });
    }
    let mut p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(WAIT).code(), Some(0), "{}", p.log());
}

/// What a client pipelines behind a request the server answers and then
/// closes the connection on: more requests after one that asked to close,
/// and a request body the route does not read.
const CLOSING_THEN_MORE: [(&str, &str); 2] = [
    (
        "Connection: close, then more requests",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ),
    (
        "a body the route does not read",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n",
    ),
];

/// Sends `head` and 20 KB after it, then reads only after a pause: a slow
/// client whose window (the kernel's smallest) holds a part of the
/// response, so the rest waits in the server's send buffer. A server that
/// closes with the 20 KB unread resets the connection, and the reset
/// throws that rest away.
fn closing_then_more(send: &mut dyn FnMut(&[u8]) -> std::io::Result<()>, head: &str) {
    let mut bytes = head.as_bytes().to_vec();
    for _ in 0..400 {
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: 0123456789\r\n\r\n");
    }
    bytes.resize(head.len() + 20_000, b'x');
    send(&bytes).unwrap();
    // The slow reader. No signal tells the client that the server is done
    // without reading: 300 ms is ample for the server to answer and close
    // (it takes a millisecond), well inside the lingering close's 2 s.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_response_is_not_lost_when_the_client_sends_more_after_a_closing_request() {
    use std::io::{BufReader, Write};
    let (_p, _n, addr) = proc::start(BIN);
    for (what, head) in CLOSING_THEN_MORE {
        let s = http::connect_small_window(addr).unwrap();
        let mut w = s.try_clone().unwrap();
        closing_then_more(&mut |b| w.write_all(b), head);
        let r = http::read_response(&mut BufReader::new(s));
        let r = r.unwrap_or_else(|e| panic!("{what}: the response was lost: {e}"));
        assert_eq!(r.status, 200, "{what}");
        assert!(r.body.contains("pid_server_requests_total"), "{what}");
    }
}

#[test]
fn a_tls_response_is_not_lost_when_the_client_sends_more_after_a_closing_request() {
    use pid_server_test_support::tls::{TestCa, TlsConn};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.write_leaf(dir.path(), "server", "server");
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
    let _p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let config = ca.client(&[b"http/1.1"]);
    for (what, head) in CLOSING_THEN_MORE {
        let tcp = http::connect_small_window(addr).unwrap();
        let mut c = TlsConn::over(tcp, config.clone()).unwrap();
        closing_then_more(&mut |b| c.send(b), head);
        let r = c.read_response();
        let r = r.unwrap_or_else(|e| panic!("{what}: the response was lost: {e}"));
        assert_eq!(r.status, 200, "{what}");
        assert!(r.body.contains("pid_server_requests_total"), "{what}");
    }
}

/// A connection per request, as `ab`, a health checker or an HTTP/1.0
/// client opens them: once the client asked to close after a request
/// without a body and has its answer, the server closes its end at once. It
/// does not wait for the client's FIN, as the lingering close above does
/// (for up to 2 s, holding the connection's slot) when more may be coming.
#[test]
fn a_connection_that_asked_to_close_is_closed_at_once() {
    use std::io::{Read, Write};
    let (_p, _n, addr) = proc::start(BIN);
    let mut scraper = http::Conn::open(addr, WAIT).unwrap();
    let mut open = || {
        let body = scraper.get("/metrics").unwrap().body;
        http::metric_in(&body, "pid_server_open_connections")
            .unwrap_or_else(|| panic!("no open-connections gauge in {body}"))
    };
    for head in [
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        // To the server's FIN; the client keeps its own end open.
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer.split(' ').nth(1), Some("200"), "{head:?}: {answer}");
        // The scraper's own connection is the one left. Closing takes a
        // millisecond; 1 s is well inside the lingering close's 2 s.
        let left = wait::within(Duration::from_secs(1), || {
            let n = open();
            (n == 1).then_some(n)
        });
        assert_eq!(
            left,
            Some(1),
            "{head:?}: the server still holds the connection"
        );
        drop(s);
    }
}
