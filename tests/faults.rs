//! Bad days: hostile or broken clients, a broken environment, many reloads.
//! The process must stay responsive to others (a probe request answers
//! within PROBE_BOUND) and keep its memory and fds bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use pid_server_test_support::proc::{self, Notify, Proc, Reaper, WAIT};
use pid_server_test_support::{Load, http, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// How fast a probe must be answered while a bad client misbehaves.
const PROBE_BOUND: Duration = Duration::from_millis(500);

fn probe(addr: SocketAddr) {
    let t = Instant::now();
    let r = http::get(addr, "/").expect("probe failed");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < PROBE_BOUND, "probe took {:?}", t.elapsed());
}

fn start_with(args: &[&str]) -> (Proc, Notify, SocketAddr) {
    proc::start_with(BIN, args)
}

/// Reads until EOF or the timeout, returning what came.
fn read_all(s: &mut TcpStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slowloris_is_cut_at_the_header_timeout() {
    let (_p, _n, addr) = start_with(&["--header-timeout", "1"]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    // One header byte every 100 ms, never finishing.
    let mut cut = false;
    while t.elapsed() < Duration::from_secs(5) {
        probe(addr);
        if s.write_all(b"X").is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 256];
        s.set_nonblocking(true).unwrap();
        match s.read(&mut buf) {
            Ok(_) => {
                cut = true; // an error response or EOF: the server gave up on us
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
        s.set_nonblocking(false).unwrap();
    }
    assert!(cut, "a slow client was never disconnected");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        t.elapsed()
    );
}

#[test]
fn an_oversized_header_is_refused() {
    let (_p, _n, addr) = start_with(&[]);
    let mut s = TcpStream::connect(addr).unwrap();
    let big = "a".repeat(64 * 1024);
    // The server may close before reading it all; that is fine.
    let _ = write!(s, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let answer = read_all(&mut s, WAIT);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{:?}",
        &answer[..answer.len().min(100)]
    );
    probe(addr);
}

#[test]
fn a_malformed_request_line_gets_400() {
    let (_p, _n, addr) = start_with(&[]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").unwrap();
    let answer = read_all(&mut s, WAIT);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    probe(addr);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (p, _n, addr) = start_with(&[]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let answer = read_all(&mut s, WAIT);
    let statuses: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 404 Not Found"
        ]
    );
    assert!(answer.contains(&format!("OK. Handled by PID: {}", p.pid)));
}

#[test]
fn a_client_leaving_mid_request_costs_nothing() {
    let (p, _n, addr) = start_with(&[]);
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        drop(s);
    }
    probe(addr);
    // Every abandoned request finishes or is dropped; none stays counted.
    let mut in_flight = serde_json::Value::Null;
    wait::within(WAIT, || {
        let mut c = http::Conn::open(addr, WAIT).unwrap();
        let v: serde_json::Value = serde_json::from_str(&c.get("/healthz").unwrap().body).unwrap();
        in_flight = v["in_flight"].clone();
        (in_flight == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("in_flight stuck at {in_flight}"));
    assert!(proc::rss_kb(p.pid) < 64 * 1024);
}

#[test]
fn a_flood_of_idle_connections_does_not_starve_others() {
    let (p, _n, addr) = start_with(&[]);
    let before = proc::rss_kb(p.pid);
    // Well under the test process's fd limit and the server's cap.
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    for _ in 0..20 {
        probe(addr);
    }
    let after = proc::rss_kb(p.pid);
    eprintln!(
        "RSS {before} kB -> {after} kB with {} idle connections",
        idle.len()
    );
    // A few kB per idle connection at most.
    assert!(after < before + 500 * 16, "RSS {before} -> {after} kB");
}

#[test]
fn over_the_connection_cap_new_clients_wait_instead_of_failing() {
    let (_p, _n, addr) = start_with(&["--max-connections", "4", "--header-timeout", "1"]);
    // Four idle connections take every slot ...
    let _idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // ... so a fifth waits in the kernel's queue, and is answered once the
    // header timeout frees a slot: late, never refused.
    let t = Instant::now();
    let r = http::get(addr, "/").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn listen_pid_of_another_process_falls_back_to_binding() {
    let notify = Notify::new();
    // `--listen`, bound by the process itself: the fallback is the point.
    let addr = proc::free_addr();
    let mut cmd = proc::serve_cmd(BIN, addr, &notify);
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    assert_eq!(http::get(addr, "/").unwrap().pid(), Some(p.pid));
    assert!(
        p.log().contains("LISTEN_PID=1 is not this process"),
        "{}",
        p.log()
    );
}

#[test]
fn a_notify_socket_nobody_listens_on_is_a_warning_not_a_failure() {
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &Notify::new());
    cmd.env("NOTIFY_SOCKET", "/nonexistent/notify.sock");
    let p = Proc::spawn(cmd);
    wait::within(WAIT, || http::get(addr, "/").ok())
        .unwrap_or_else(|| panic!("never served: {}", p.log()));
    assert_eq!(http::get(addr, "/").unwrap().pid(), Some(p.pid));
    let log = p.log();
    assert_eq!(log.matches("cannot notify systemd").count(), 1, "{log}");
}

#[test]
fn one_hundred_reloads_under_light_load() {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(&bin, socket, &notify);
    cmd.args(["--upgrade-probation-ms", "0"]);
    let first = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    let load = Load::to(addr)
        .keep_alive(1)
        .max_requests(1_000_000)
        .max_time(Duration::from_secs(120))
        .start();
    let mut pid = first.pid;
    let (mut rss, mut fds) = (Vec::new(), Vec::new());
    for generation in 1..=100u32 {
        let (code, out, err) = proc::reload(BIN, &["--pid", &pid.to_string()]);
        assert_eq!(code, 0, "generation {generation}: {err}");
        let new: u32 = out.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!(out.contains(&format!("(generation {generation})")), "{out}");
        reaper.watch(new);
        proc::wait_gone(pid, WAIT);
        pid = new;
        if generation % 10 == 0 {
            rss.push(proc::rss_kb(pid));
            fds.push(
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .unwrap()
                    .count(),
            );
        }
    }
    let t = load.finish();
    eprintln!(
        "100 reloads: {} requests, {:?} failed; RSS kB {rss:?}; fds {fds:?}",
        t.sent, t.failures
    );
    assert_eq!(t.failed(), 0, "{:?}", t.failures);
    let h = http::get(addr, "/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v["generation"], 100);
    // Each generation is a fresh process: nothing accumulates.
    assert!(
        rss.iter().max().unwrap() - rss.iter().min().unwrap() < 4 * 1024,
        "RSS {rss:?}"
    );
    assert!(
        fds.iter().max().unwrap() - fds.iter().min().unwrap() <= 2,
        "fds {fds:?}"
    );
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert_eq!(children.trim(), "", "zombies or children left: {children}");
}

fn start_with_nofile(soft: u64, hard: u64) -> (Proc, SocketAddr) {
    proc::start_with_nofile(BIN, soft, hard)
}

#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let (p, addr) = start_with_nofile(256, 4096);
    probe(addr);
    let log = p.log();
    assert!(
        log.contains("open-files limit raised from 256 to 4096 (the hard limit)"),
        "{log}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.pid)).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files
            .split_whitespace()
            .filter(|w| *w == "4096")
            .count()
            == 2,
        "{open_files}"
    );
}

#[test]
fn a_low_hard_limit_clamps_the_connection_cap_with_one_warning() {
    let (p, addr) = start_with_nofile(100, 100);
    probe(addr);
    let log = p.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connections fit under"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("serving at most 34 (asked for 10000)"),
        "{log}"
    );
}
