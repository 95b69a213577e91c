//! `examples/ported.rs`, an ordinary `#[tokio::main]` axum service ported
//! from `axum::serve`: its background task ends when its generation leaves
//! (at the handover, not when the old process exits; and at SIGTERM), its
//! async readiness check rolls a reload back, and SIGHUP stays its own.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Proc, Reaper, WAIT};
use pid_server_test_support::{http, wait};

fn answering(addr: SocketAddr) -> u32 {
    http::get(addr, "/")
        .unwrap()
        .pid()
        .expect("hello from PID <pid>")
}

fn start(args: &[String]) -> (Proc, SocketAddr) {
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = Command::new(proc::example("ported"));
    // The address is ignored: the socket is passed the systemd way.
    socket.pass_to(&mut cmd);
    cmd.arg(addr.to_string()).args(args);
    let p = Proc::spawn(cmd);
    http::wait_ok(addr, "/", WAIT);
    (p, addr)
}

/// Waits (bounded) for `line` in the log; returns when it was seen.
fn wait_line(p: &Proc, line: &str) -> Instant {
    wait::until(line, WAIT, || p.log().contains(line).then(Instant::now))
}

#[test]
fn a_task_awaiting_leaving_ends_at_the_handover_and_at_sigterm() {
    let reaper = Reaper::default();
    let (p, addr) = start(&[]);
    let old = p.pid;
    // A request in progress keeps the old process alive after the handover.
    let slow = std::thread::spawn(move || http::get(addr, "/slow").map(|r| r.pid()));
    wait_line(&p, &format!("PID {old} slow request started"));
    let signalled = Instant::now();
    p.signal(Signal::SIGUSR2);
    let ended = wait_line(&p, &format!("PID {old} ticker ended: HandedOver"));
    assert!(
        proc::alive(old) && !slow.is_finished(),
        "the task ended only when the old process was done; log:\n{}",
        p.log()
    );
    let answer = wait::join(slow, "the slow request", WAIT).unwrap();
    assert_eq!(
        answer,
        Some(old),
        "the slow request finished where it began"
    );
    proc::wait_gone(old, WAIT);
    let gone = Instant::now();
    eprintln!(
        "old task ended {} ms after SIGUSR2 (spawn, ready, 250 ms probation), {} ms before its process exited",
        (ended - signalled).as_millis(),
        (gone - ended).as_millis()
    );
    let new = answering(addr);
    assert_ne!(new, old);
    reaper.watch(new);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    let stopped = Instant::now();
    let ended = wait_line(&p, &format!("PID {new} ticker ended: Stopping"));
    eprintln!(
        "new task ended {} ms after SIGTERM",
        (ended - stopped).as_millis()
    );
    proc::wait_gone(new, WAIT);
    assert!(
        p.log().contains(&format!("PID {new} ended: Stopped")),
        "{}",
        p.log()
    );
}

#[test]
fn sighup_is_the_apps_when_not_a_reload_signal() {
    let reaper = Reaper::default();
    let (p, addr) = start(&[]);
    p.signal(Signal::SIGHUP);
    wait_line(&p, &format!("PID {} SIGHUP: rereading my settings", p.pid));
    // No reload: no new process is started, the first one keeps serving.
    // There is no event for "nothing happened": watch for a second.
    for _ in 0..10 {
        let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.pid))
            .unwrap_or_default();
        assert_eq!(
            kids.trim(),
            "",
            "SIGHUP started a new process; log:\n{}",
            p.log()
        );
        assert_eq!(answering(addr), p.pid);
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGUSR2 still swaps.
    p.signal(Signal::SIGUSR2);
    proc::wait_gone(p.pid, WAIT);
    let new = answering(addr);
    reaper.watch(new);
    assert_ne!(new, p.pid);
}

/// A "database" on loopback: greets each connection with a byte, closes it
/// at once, or accepts and says nothing, as the test sets it.
struct Db {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
}

const GREET: u8 = 0;
const CLOSE: u8 = 1;
const SILENT: u8 = 2;

impl Db {
    fn start() -> Db {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(GREET));
        let m = mode.clone();
        // Ends with the test process; each connection is handled at once.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming().flatten() {
                match m.load(Ordering::SeqCst) {
                    GREET => drop((&c).write_all(b"+")),
                    SILENT => held.push(c),
                    _ => drop(c),
                }
            }
        });
        Db { addr, mode }
    }
}

#[test]
fn an_async_ready_check_that_fails_or_hangs_rolls_the_reload_back() {
    let reaper = Reaper::default();
    let db = Db::start();
    let (p, addr) = start(&[db.addr.to_string(), "3".into()]);
    let pid = p.pid.to_string();
    let bin = proc::example("ported");

    db.mode.store(CLOSE, Ordering::SeqCst);
    let (code, out, err) = proc::reload(&bin, &["--pid", &pid]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}\nlog:\n{}", p.log());
    assert!(
        err.contains("could not start") && err.contains(&format!("database {}", db.addr)),
        "{err}"
    );
    assert_eq!(answering(addr), p.pid, "the old process keeps serving");

    db.mode.store(SILENT, Ordering::SeqCst);
    let started = Instant::now();
    let (code, out, err) = proc::reload(&bin, &["--pid", &pid]);
    let took = started.elapsed();
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}\nlog:\n{}", p.log());
    assert!(
        err.contains("the readiness check did not finish within"),
        "{err}"
    );
    assert_eq!(answering(addr), p.pid, "the old process keeps serving");
    eprintln!(
        "a hanging check failed the reload in {} ms (ready timeout 3 s)",
        took.as_millis()
    );

    db.mode.store(GREET, Ordering::SeqCst);
    let (code, out, err) = proc::reload(&bin, &["--pid", &pid]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    proc::wait_gone(p.pid, WAIT);
    let new = answering(addr);
    reaper.watch(new);
    assert_ne!(new, p.pid);
}

/// Its hit counter survives two reloads: the old process hands it over
/// (`Hooks::save_state`) and the new one adds it to its own
/// (`Info::state_from_predecessor`). Before app state was handed over,
/// every reload started it at 0.
#[test]
fn the_hit_counter_survives_two_reloads() {
    let reaper = Reaper::default();
    let (p, addr) = start(&[]);
    let hits = || -> u64 {
        let r = http::get(addr, "/hits").unwrap();
        assert_eq!(r.status, 200);
        r.body.trim().parse().unwrap()
    };
    let mut old = p.pid;
    // `start` waited on `/`: its hit counts too.
    let mut sent = hits();
    assert!(sent >= 1);
    for (reload, n) in [(1, 3u64), (2, 2)] {
        for _ in 0..n {
            assert_eq!(answering(addr), old);
        }
        sent += n;
        assert_eq!(hits(), sent, "before reload {reload}");
        let (code, out, err) = proc::reload(proc::example("ported"), &["--pid", &old.to_string()]);
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        proc::wait_gone(old, WAIT);
        let new = answering(addr);
        sent += 1;
        reaper.watch(new);
        assert_ne!(new, old);
        let after = hits();
        eprintln!("reload {reload}: {sent} hits sent, /hits says {after} in PID {new}");
        assert_eq!(after, sent, "after reload {reload}; log:\n{}", p.log());
        old = new;
    }
}
