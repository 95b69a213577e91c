//! HTTP/2 with prior knowledge (`h2c`) beside HTTP/1.1 on the same socket,
//! through reloads of `examples/hello.rs`: zero failed streams and zero
//! failed HTTP/1.1 requests; HTTP/2 connections get a graceful GOAWAY and
//! their clients go on with the new process, HTTP/1.1 ones move.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use pid_server_test_support::h2::{H2Conn, H2Load};
use pid_server_test_support::proc::{self, Proc, Reaper, WAIT};
use pid_server_test_support::{Load, http};

#[test]
fn h2c_and_http1_share_a_socket_through_reloads() {
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = Command::new(proc::example("hello"));
    // The address is ignored: the socket is passed the systemd way.
    socket.pass_to(&mut cmd);
    cmd.arg(addr.to_string());
    let first = Proc::spawn(cmd);
    http::wait_ok(addr, "/", WAIT);
    let reaper = Reaper::default();

    // One h2c connection answers several streams at once.
    let mut c = H2Conn::connect(addr).unwrap();
    let started: Vec<_> = (0..8).map(|_| c.start("/").unwrap()).collect();
    for s in started {
        let (status, body) = c.finish(s).unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            pid_server_test_support::http::pid_in(&body),
            Some(first.pid)
        );
    }

    let max = Duration::from_secs(60);
    let h2 = H2Load::start(move || H2Conn::connect(addr), "/", 4, max);
    let h1 = Load::to(addr)
        .keep_alive(2)
        .pace(Duration::from_millis(1))
        .max_time(max)
        .start();
    let mut pid = first.pid;
    h2.wait_answers_from(pid, 20, WAIT);
    for i in 0..3 {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
        // The old process exits once its HTTP/2 streams are done and its
        // HTTP/1.1 connections moved.
        proc::wait_gone(pid, WAIT);
        let next = http::get(addr, "/").unwrap().pid().unwrap();
        assert_ne!(next, pid, "reload {i}: still PID {pid}");
        reaper.watch(next);
        pid = next;
        h2.wait_answers_from(pid, 20, WAIT);
        h1.wait_answers_from(pid, 10, WAIT);
    }
    // The connection opened before the reloads got its GOAWAY and was
    // closed without an error once its streams were done.
    assert_eq!(c.wait_closed(WAIT), Ok(Ok(())));
    let (h2, h1) = (h2.finish(), h1.finish());
    eprintln!("h2c: {h2:?}");
    eprintln!("http/1.1: {}", h1.summary());
    assert!(h2.failed.is_empty(), "failed streams: {:?}", h2.failed);
    // No stream was refused: the server holds the shutdown PING's ack back
    // until the streams the client queued behind it arrived, so the final
    // GOAWAY's last stream id covers every stream the client sent.
    assert_eq!(h2.unprocessed, 0, "streams refused by the GOAWAY: {h2:?}");
    assert_eq!(h1.failed(), 0, "{}", h1.summary());
    assert_eq!(h2.by_pid.len(), 4, "every generation answered h2c: {h2:?}");
    assert!(
        h2.goaways >= 3 && h2.connections >= 4,
        "each reload sent the h2c client to the new process: {h2:?}"
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
    proc::wait_gone(pid, WAIT);
}
