//! `examples/hello.rs` swaps itself on SIGHUP and on SIGUSR2 with zero
//! failed requests, given an address or a socket the systemd way
//! (`LISTEN_FDS=1`, `LISTEN_PID`, the socket at fd 3), under keep-alive,
//! one-shot and paused clients; kept connections move to each new process.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Proc, Reaper, WAIT};
use pid_server_test_support::{Load, http, report};

/// The PID answering `/` on a new connection.
fn answering(addr: SocketAddr) -> u32 {
    http::get(addr, "/")
        .unwrap()
        .pid()
        .expect("hello from PID <pid>")
}

/// Swaps the process at `addr` four times, alternating SIGHUP and SIGUSR2,
/// under load; returns the PIDs in order.
fn swaps_under_load(first: &Proc, addr: SocketAddr) {
    let reaper = Reaper::default();
    let max = Duration::from_secs(60);
    let ka = Load::to(addr)
        .keep_alive(2)
        .pace(Duration::from_millis(1))
        .max_time(max)
        .start();
    let nc = Load::to(addr)
        .one_shot(1)
        .pace(Duration::from_millis(1))
        .max_time(max)
        .start();
    let paused = Load::to(addr).paused(6).max_time(max).start();
    let mut pid = first.pid;
    paused.wait_answers_from(pid, 6, WAIT);
    for (i, sig) in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ]
    .into_iter()
    .enumerate()
    {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
        // The old process exits once its connections have moved.
        proc::wait_gone(pid, WAIT);
        let next = answering(addr);
        assert_ne!(next, pid, "swap {i} ({sig:?}): still PID {pid}");
        reaper.watch(next);
        pid = next;
        ka.wait_answers_from(pid, 10, WAIT);
        nc.wait_answers_from(pid, 10, WAIT);
    }
    // Every paused client comes back to the last process at least once.
    let before = paused.snapshot().by_pid.get(&pid).copied().unwrap_or(0);
    paused.wait_answers_from(pid, before + 6, WAIT);
    let (ka, nc, paused) = (ka.finish(), nc.finish(), paused.finish());
    for (name, t) in [("keep-alive", &ka), ("one-shot", &nc), ("paused", &paused)] {
        eprintln!("hello, {name}: {}", t.summary());
        assert_eq!(t.failed(), 0, "{name}: {}", t.summary());
    }
    // The closed-loop clients waited for answers from every generation; a
    // paused one may sleep through a swap.
    for (name, t) in [("keep-alive", &ka), ("one-shot", &nc)] {
        assert_eq!(
            t.by_pid.len(),
            5,
            "{name}: not every generation answered: {:?}",
            t.by_pid
        );
    }
    // The paused clients' connections moved: the same client socket was
    // answered by the first process and then by later ones.
    let kept = paused.conns.iter().filter(|c| c.pid_changes() > 0).count();
    assert!(
        kept > 0,
        "no paused connection moved: {:?}",
        paused.conn_report()
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
    proc::wait_gone(pid, WAIT);
}

#[test]
fn hello_swaps_itself_with_an_address() {
    // Bound by the example from its address: the point of this test.
    let addr = proc::free_addr();
    let mut cmd = Command::new(proc::example("hello"));
    cmd.arg(addr.to_string());
    let p = Proc::spawn(cmd);
    http::wait_ok(addr, "/", WAIT);
    swaps_under_load(&p, addr);
}

#[test]
fn hello_swaps_itself_with_a_socket_from_systemd() {
    // systemd-socket-activate passes the socket the way systemd does:
    // LISTEN_FDS=1, LISTEN_PID of the program, the socket at fd 3.
    let Some(activate) = report::find_in_path("systemd-socket-activate") else {
        report::cannot_run(
            "hello_swaps_itself_with_a_socket_from_systemd",
            "no systemd-socket-activate",
        );
        return;
    };
    // A port number for systemd-socket-activate, which binds it itself.
    let addr = proc::free_addr();
    let mut cmd = Command::new(activate);
    cmd.arg("-l")
        .arg(addr.to_string())
        .arg(proc::example("hello"))
        .arg("127.0.0.1:1");
    let p = Proc::spawn(cmd);
    http::wait_ok(addr, "/", WAIT);
    assert_eq!(
        answering(addr),
        p.pid,
        "the activated process serves the socket"
    );
    swaps_under_load(&p, addr);
}

/// hello under `#[tokio::main]`: the runtime's threads start before
/// `Generation::take` and keep the mask its parent gave it. The signals
/// must arrive all the same: SIGUSR2 swaps it, SIGTERM stops it.
#[test]
fn hello_takes_signals_its_parent_blocked() {
    use std::os::unix::process::CommandExt as _;
    let blocked = |socket: proc::Socket| {
        let addr = socket.addr();
        let mut cmd = Command::new(proc::example("hello"));
        // The address is ignored: the socket is passed the systemd way.
        socket.pass_to(&mut cmd);
        cmd.arg(addr.to_string());
        // SAFETY: sigprocmask in the child before exec is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let mut set = nix::sys::signal::SigSet::empty();
                for s in [Signal::SIGTERM, Signal::SIGUSR2, Signal::SIGHUP] {
                    set.add(s);
                }
                set.thread_block().map_err(std::io::Error::from)
            });
        }
        let p = Proc::spawn(cmd);
        http::wait_ok(addr, "/", WAIT);
        (p, addr)
    };
    let reaper = Reaper::default();
    let (p, addr) = blocked(proc::Socket::new());
    p.signal(Signal::SIGUSR2);
    proc::wait_gone(p.pid, WAIT);
    let next = answering(addr);
    reaper.watch(next);
    assert_ne!(next, p.pid);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(next as i32), Signal::SIGTERM);
    proc::wait_gone(next, WAIT);

    let (mut p, _) = blocked(proc::Socket::new());
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(WAIT).code(), Some(0), "{}", p.log());
}
