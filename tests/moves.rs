//! A reload closes no connection: idle keep-alive connections move to the
//! new process, fd and unread bytes together, and the client notices
//! nothing but the new PID in the body. With the real binary, no systemd.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use pid_server_test_support::proc::{self, Reaper, WAIT};
use pid_server_test_support::{Load, http, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// Reloads `pid` with the helper; returns the new PID and the helper's line.
fn reload(pid: u32) -> (u32, String) {
    proc::reload_ok(BIN, pid)
}

fn health_generation(c: &mut http::Conn) -> u64 {
    let r = c.get("/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["generation"].as_u64().unwrap()
}

#[test]
fn idle_keepalive_connections_are_answered_by_the_new_process_on_the_same_socket() {
    let (old, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let mut conns: Vec<http::Conn> = (0..20)
        .map(|_| http::Conn::open(addr, WAIT).unwrap())
        .collect();
    let locals: Vec<SocketAddr> = conns.iter().map(|c| c.local_addr()).collect();
    for c in &mut conns {
        let r = c.get("/").unwrap();
        assert_eq!((r.status, r.pid()), (200, Some(old.pid)));
        assert!(!r.close);
    }
    let (new, line) = reload(old.pid);
    reaper.watch(new);
    assert!(
        line.contains("; 20 connections moved, 0 fell back; old process done"),
        "{line}"
    );
    for (c, local) in conns.iter_mut().zip(&locals) {
        let r = c.get("/").unwrap();
        assert_eq!((r.status, r.pid()), (200, Some(new)), "{local}");
        assert!(!r.close, "a moved connection stays open");
        assert_eq!(&c.local_addr(), local, "the same client socket");
        assert_eq!(c.served(), 2);
    }
}

/// One connection slot (what `LimitNOFILE=64` leaves): the new process's
/// idle accept loop must not sit on the slot the moved connection needs.
/// It did, and the moved client waited for an answer that never came, since
/// no new client arrived to free the slot (seen under systemd 252 in CI).
#[test]
fn with_one_connection_slot_a_moved_connection_is_answered_by_the_new_process() {
    let (old, _notify, addr) = proc::start_with(BIN, &["--max-connections", "1"]);
    let reaper = Reaper::default();
    let mut c = http::Conn::open(addr, WAIT).unwrap();
    assert_eq!(c.get("/").unwrap().pid(), Some(old.pid));
    let (new, line) = reload(old.pid);
    reaper.watch(new);
    assert!(
        line.contains("; 1 connections moved, 0 fell back"),
        "{line}"
    );
    let r = c.get("/").expect("the moved connection is answered");
    assert_eq!((r.status, r.pid()), (200, Some(new)));
    assert_eq!(c.served(), 2, "on the same connection");
    // Closing it frees the slot for the next client.
    drop(c);
    let r = http::get_timeout(addr, "/", WAIT).expect("the next client");
    assert_eq!(r.pid(), Some(new));
}

#[test]
fn with_only_idle_connections_the_old_process_is_gone_within_a_second() {
    let (old, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let mut conns: Vec<http::Conn> = (0..10)
        .map(|_| http::Conn::open(addr, WAIT).unwrap())
        .collect();
    for c in &mut conns {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    let (new, _) = reload(old.pid);
    reaper.watch(new);
    let t = Instant::now();
    proc::wait_gone(old.pid, Duration::from_secs(1));
    eprintln!(
        "old process gone {:?} after the helper returned",
        t.elapsed()
    );
}

/// Writes raw bytes on a connection and reads `n` responses in order.
fn read_responses(s: &mut BufReader<TcpStream>, n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|_| {
            let mut line = String::new();
            s.read_line(&mut line).unwrap();
            let status = line.split(' ').nth(1).unwrap().parse().unwrap();
            let mut len = 0;
            loop {
                line.clear();
                s.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            s.read_exact(&mut body).unwrap();
            (status, String::from_utf8(body).unwrap())
        })
        .collect()
}

fn raw(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    BufReader::new(s)
}

#[test]
fn a_request_head_split_across_the_handover_is_answered() {
    let (old, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    // One connection finishes its head after the handover, one while it
    // runs; each had a request answered first, so both are keep-alive
    // connections between requests when the old process lets go.
    let mut after = raw(addr);
    let mut during = raw(addr);
    for s in [&mut after, &mut during] {
        s.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_responses(s, 1)[0].0, 200);
        s.get_mut()
            .write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .unwrap();
    }
    let helper = std::thread::spawn(move || reload(old.pid));
    during.get_mut().write_all(b"st: t\r\n").unwrap();
    let (new, _) = helper.join().unwrap();
    reaper.watch(new);
    during.get_mut().write_all(b"\r\n").unwrap();
    after.get_mut().write_all(b"st: t\r\n\r\n").unwrap();
    for s in [&mut after, &mut during] {
        let (status, body) = read_responses(s, 1).remove(0);
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("\"generation\":1") || body.contains(&format!("\"pid\":{}", old.pid)),
            "{body}"
        );
    }
    // Both are the new process's now.
    for s in [&mut after, &mut during] {
        s.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let (_, body) = read_responses(s, 1).remove(0);
        assert_eq!(body.trim(), format!("OK. Handled by PID: {new}"));
    }
}

#[test]
fn pipelined_requests_across_the_handover_are_answered_in_order() {
    let (old, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let mut s = raw(addr);
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    read_responses(&mut s, 1);
    let helper = std::thread::spawn(move || reload(old.pid));
    // Bursts of pipelined requests, alternating two paths so the order of
    // the answers shows, written while the handover runs and after.
    let mut sent = Vec::new();
    let mut w = s.get_ref().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for burst in 0..20 {
            let mut bytes = Vec::new();
            for i in 0..5 {
                let path = if (burst + i) % 2 == 0 {
                    "/"
                } else {
                    "/healthz"
                };
                bytes.extend_from_slice(
                    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
                );
                sent.push(path);
            }
            w.write_all(&bytes).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        sent
    });
    let (new, _) = helper.join().unwrap();
    reaper.watch(new);
    let sent = writer.join().unwrap();
    let got = read_responses(&mut s, sent.len());
    let mut pids = std::collections::BTreeSet::new();
    for (i, (path, (status, body))) in sent.iter().zip(&got).enumerate() {
        assert_eq!(*status, 200, "request {i}");
        if *path == "/" {
            let pid = pid_server_test_support::http::pid_in(body);
            assert!(pid.is_some(), "request {i} to / answered {body:?}");
            pids.insert(pid.unwrap().to_string());
        } else {
            assert!(
                body.starts_with('{'),
                "request {i} to /healthz answered {body:?}"
            );
        }
    }
    assert!(
        pids.contains(&new.to_string()),
        "the new process answered some: {pids:?}"
    );
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn one_hundred_reloads_with_fifty_moving_connections_keep_fds_and_rss_flat() {
    let notify = proc::Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.args(["--upgrade-probation-ms", "0"]);
    let p = proc::Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    let mut conns: Vec<http::Conn> = (0..50)
        .map(|_| http::Conn::open(addr, WAIT).unwrap())
        .collect();
    let mut pid = p.pid;
    let (mut fd_seen, mut rss_seen) = (Vec::new(), Vec::new());
    for round in 0..100 {
        for c in &mut conns {
            let r = c.get("/").unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!((r.status, r.pid()), (200, Some(pid)), "round {round}");
        }
        fd_seen.push(fds(pid));
        rss_seen.push(proc::rss_kb(pid));
        let (new, line) = reload(pid);
        reaper.watch(new);
        assert!(
            line.contains("; 50 connections moved, 0 fell back"),
            "round {round}: {line}"
        );
        proc::wait_gone(pid, WAIT);
        pid = new;
    }
    assert_eq!(health_generation(&mut conns[0]), 100);
    let (fmin, fmax) = (fd_seen.iter().min().unwrap(), fd_seen.iter().max().unwrap());
    let (rmin, rmax) = (
        rss_seen.iter().min().unwrap(),
        rss_seen.iter().max().unwrap(),
    );
    eprintln!("100 reloads, 50 moving connections: fds {fmin}..{fmax}, RSS {rmin}..{rmax} kB");
    assert!(fmax - fmin <= 2, "fds grew: {fd_seen:?}");
    assert!(
        *rmax < rmin * 2 && *rmax < 64 * 1024,
        "RSS grew: {rss_seen:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    proc::wait_gone(pid, WAIT);
}

#[test]
fn a_successor_that_dies_right_after_taking_over_loses_only_what_it_held() {
    let (old, notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let mut idle: Vec<http::Conn> = (0..5)
        .map(|_| http::Conn::open(addr, WAIT).unwrap())
        .collect();
    for c in &mut idle {
        assert_eq!(c.get("/").unwrap().pid(), Some(old.pid));
    }
    // A long request in the old process: its connection can move only once
    // the response is written.
    let mut busy = http::Conn::open(addr, WAIT).unwrap();
    let slow = std::thread::spawn(move || {
        let r = busy.get("/slow?ms=1500");
        (busy, r)
    });
    wait::until("the slow request to arrive", WAIT, || {
        (proc_in_flight(addr) >= 2).then_some(())
    });
    old.signal(nix::sys::signal::Signal::SIGUSR2);
    let takeover = notify.wait_for("MAINPID= of the new process", |m| {
        m.contains("MAINPID=") && !m.contains(&format!("MAINPID={}", old.pid))
    });
    let new: u32 = takeover
        .split('\n')
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap();
    reaper.watch(new);
    // The idle connections move as soon as the new process says `owner`,
    // a moment after MAINPID=: then the new process answers them.
    wait::until("the connection to move", WAIT, || {
        (idle[0].get("/").unwrap().pid() == Some(new)).then_some(())
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    proc::wait_gone(new, WAIT);
    // What it held is lost ...
    assert!(
        idle[1].get("/").is_err(),
        "a connection the dead process held"
    );
    // ... and nothing else: the request in the old process is answered, and
    // its connection, which cannot move now, is served there to the end.
    let (mut busy, r) = slow.join().unwrap();
    let r = r.unwrap();
    assert_eq!((r.status, r.pid()), (200, Some(old.pid)));
    let next = busy.get("/").unwrap();
    assert_eq!((next.status, next.pid()), (200, Some(old.pid)));
    assert!(
        next.close,
        "a connection that fell back closes after its next response"
    );
    proc::wait_gone(old.pid, WAIT);
    let log = old.log();
    assert!(
        log.contains("cannot move a connection to the new process"),
        "{log}"
    );
    assert!(log.contains("fell back"), "{log}");
}

/// `in_flight` from /healthz on a new connection (which counts itself).
fn proc_in_flight(addr: SocketAddr) -> u64 {
    let r = http::get(addr, "/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["in_flight"].as_u64().unwrap()
}

#[test]
fn paused_clients_fail_nothing_across_twenty_reloads_as_in_steady_state() {
    // Clients that keep their connection and pause 0.3-3 s between
    // requests, with no liveness check and no retry: what a drain that
    // closes idle connections breaks, and a move does not.
    let (first, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let steady = Load::to(addr)
        .paused(20)
        .max_time(Duration::from_secs(60))
        .start();
    steady.wait_for("steady state: 60 answers", WAIT, |t| t.ok >= 60);
    let steady = steady.finish();
    let paused = Load::to(addr)
        .paused(20)
        .max_time(Duration::from_secs(120))
        .start();
    paused.wait_answers_from(first.pid, 20, WAIT);
    let mut pid = first.pid;
    for round in 1..=20 {
        let (new, line) = reload(pid);
        reaper.watch(new);
        assert!(line.contains(" 0 fell back"), "round {round}: {line}");
        let since = paused.snapshot();
        paused.wait_more(&since, 3, WAIT);
        pid = new;
    }
    let since = paused.snapshot().by_pid.get(&pid).copied().unwrap_or(0);
    paused.wait_answers_from(pid, since + 20, WAIT);
    let across = paused.finish();
    eprintln!("paused clients, steady state: {}", steady.summary());
    eprintln!("paused clients, 20 reloads:   {}", across.summary());
    eprintln!("paused clients' connections:  {}", across.conn_report());
    assert_eq!(steady.failed(), 0, "{}", steady.summary());
    assert_eq!(
        across.failed(),
        0,
        "{}\n{:?}",
        across.summary(),
        across.examples
    );
    let r = across.conn_report();
    assert_eq!((r.closed, r.failed), (0, 0), "{r}");
    assert_eq!(
        r.kept_across_pid_change, r.connections,
        "every connection kept: {r}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    proc::wait_gone(pid, WAIT);
}

#[test]
fn a_connection_busy_across_two_reloads_moves_on_to_the_newest_generation() {
    let (a, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    // A long request in the first generation: its connection can move only
    // once the response is written, by then two reloads later.
    let mut busy = http::Conn::open(addr, WAIT).unwrap();
    let local = busy.local_addr();
    let slow = std::thread::spawn(move || {
        let r = busy.get("/slow?ms=6000");
        (busy, r)
    });
    wait::until("the slow request to arrive", WAIT, || {
        (proc_in_flight(addr) >= 2).then_some(())
    });
    let (b, _) = reload(a.pid);
    reaper.watch(b);
    // The second generation hands over while it still adopts connections
    // from the first: it keeps taking them, and passes each one on.
    let (c, _) = reload(b);
    reaper.watch(c);
    let (mut busy, r) = slow.join().unwrap();
    let r = r.unwrap();
    assert_eq!((r.status, r.pid()), (200, Some(a.pid)));
    assert!(!r.close, "a connection that can move is not closed");
    let next = busy.get("/").unwrap();
    assert_eq!(
        (next.status, next.pid(), next.close),
        (200, Some(c), false),
        "the connection should have moved twice, to the newest generation"
    );
    assert_eq!(busy.local_addr(), local, "the same client socket");
    proc::wait_gone(a.pid, WAIT);
    proc::wait_gone(b, WAIT);
    let log = a.log();
    assert!(!log.contains("cannot move a connection"), "{log}");
}
