//! `/metrics`: Prometheus' text format, and counters that a reload does not
//! reset (they carry over to the next generation), with the real binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use pid_server_test_support::proc::{self, Reaper, WAIT};
use pid_server_test_support::{http, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The samples of a scrape: `name{labels}` → value.
fn scrape(c: &mut http::Conn) -> BTreeMap<String, f64> {
    let r = c.get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {l:?}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("bad value {l:?}")),
            )
        })
        .collect()
}

fn reload(pid: u32) -> (i32, String, String) {
    proc::reload(BIN, &["--pid", &pid.to_string()])
}

#[test]
fn counters_survive_reloads_and_failed_reloads_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let (first, _notify, addr) = proc::start(&bin);
    let reaper = Reaper::default();
    let mut c = http::Conn::open(addr, WAIT).unwrap();
    for _ in 0..10 {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    assert_eq!(c.get("/nope").unwrap().status, 404);
    let before = scrape(&mut c);
    assert_eq!(before["pid_server_requests_total{status=\"200\"}"], 10.0);
    assert_eq!(before["pid_server_generation"], 0.0);
    // A failed reload: the old process stays, and counts it.
    proc::install_script(&bin, "#!/bin/sh\nexit 1\n");
    let (code, _, _) = reload(first.pid);
    assert_eq!(code, 1);
    proc::install_real(BIN, &bin);
    // Two good ones; the kept connection moves each time.
    let mut pid = first.pid;
    for _ in 0..2 {
        let old = pid;
        let (code, out, err) = reload(pid);
        assert_eq!(code, 0, "{err}");
        pid = out
            .split(" -> ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        reaper.watch(pid);
        // The old process sends its last counters when it is done.
        proc::wait_gone(old, WAIT);
    }
    // The old process's last totals reach the new one a moment after it
    // exits (a datagram the new one reads on its own time).
    let after = wait::until("the old generation's last totals", WAIT, || {
        let m = scrape(&mut c);
        (m["pid_server_reloads_total{result=\"ok\"}"] == 2.0).then_some(m)
    });
    assert_eq!(after["pid_server_generation"], 2.0);
    // Every request the first generations answered is still counted (and
    // the scrapes themselves).
    assert!(
        after["pid_server_requests_total{status=\"200\"}"] >= 11.0,
        "{after:?}"
    );
    assert_eq!(after["pid_server_requests_total{status=\"404\"}"], 1.0);
    assert_eq!(after["pid_server_reloads_total{result=\"ok\"}"], 2.0);
    assert_eq!(after["pid_server_reloads_total{result=\"failed\"}"], 1.0);
    assert_eq!(after["pid_server_handover_duration_seconds_count"], 2.0);
    assert!(
        after["pid_server_connections_moved_total"] >= 2.0,
        "{after:?}"
    );
    assert_eq!(after["pid_server_connections_fell_back_total"], 0.0);
    assert_eq!(http::get(addr, "/healthz").unwrap().status, 200);
}

/// A pid-server with two sockets the systemd way (`FileDescriptorName=http`,
/// `=metrics`), started with `args`; ready when this returns. Returns it,
/// the main socket's address and the metrics socket's.
fn two_sockets(args: &[&str]) -> (proc::Proc, SocketAddr, SocketAddr) {
    two_sockets_named("http:metrics", args)
}

/// Two sockets from "systemd" named by `names` (`LISTEN_FDNAMES`).
fn two_sockets_named(names: &str, args: &[&str]) -> (proc::Proc, SocketAddr, SocketAddr) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let http_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (web, scrape_at) = (
        http_l.local_addr().unwrap(),
        metrics_l.local_addr().unwrap(),
    );
    let fds = [http_l.as_raw_fd(), metrics_l.as_raw_fd()];
    let notify = proc::Notify::new();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:1"])
        .args(args)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", names)
        .env_remove("LISTEN_PID")
        .env("NOTIFY_SOCKET", &notify.path);
    // SAFETY: fcntl and dup2 are async-signal-safe; the fds are ours; and
    // nothing is allocated after the fork (an array, not a Vec: the
    // allocator's lock may be held by a thread that does not exist in the
    // child).
    unsafe {
        cmd.pre_exec(move || {
            // Above the targets first, so placing one cannot close another.
            let mut high = [-1; 2];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD, 10);
            }
            for (i, h) in high.iter().enumerate() {
                if *h < 0 || libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let p = proc::Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, web, scrape_at)
}

#[test]
fn a_socket_named_metrics_serves_metrics_alone_also_after_a_reload() {
    let (p, web, scrape_at) = two_sockets(&[]);
    let reaper = Reaper::default();
    let mut kept = http::Conn::open(scrape_at, WAIT).unwrap();
    let check = |kept: &mut http::Conn| {
        assert_eq!(kept.get("/metrics").unwrap().status, 200);
        assert_eq!(
            kept.get("/").unwrap().status,
            404,
            "the metrics socket serves /metrics alone"
        );
        assert_eq!(http::get(web, "/").unwrap().status, 200);
        assert_eq!(
            http::get(web, "/metrics").unwrap().status,
            404,
            "not on the main socket"
        );
    };
    check(&mut kept);
    let (code, out, err) = reload(p.pid);
    assert_eq!(code, 0, "{err}");
    let new: u32 = out
        .split(" -> ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    reaper.watch(new);
    proc::wait_gone(p.pid, WAIT);
    // The kept connection moved, and kept its socket's routes.
    check(&mut kept);
    assert_eq!(proc::health_pid(web), new);
}

/// Client sockets share `--max-connections`; a socket's accept loop that
/// waits for a client must not keep a slot from the others. With one slot,
/// the loop that took it first used to hold it, and the other socket's
/// clients waited for good.
#[test]
fn with_one_connection_slot_two_client_sockets_take_turns() {
    let (_p, a, b) = two_sockets_named("http:http", &["--max-connections", "1"]);
    // Twice on each: a loop that kept the slot would starve the other.
    for (i, addr) in [a, a, b, b].into_iter().enumerate() {
        let r = http::get_timeout(addr, "/", WAIT)
            .unwrap_or_else(|e| panic!("request {i} to {addr}: {e}"));
        assert_eq!(r.status, 200, "request {i} to {addr}");
    }
}

#[test]
fn health_and_metrics_answer_on_the_metrics_socket_when_every_client_slot_is_taken() {
    const CAP: usize = 4;
    let (_p, web, scrape_at) = two_sockets(&["--max-connections", &CAP.to_string()]);
    // Every client slot taken by an idle keep-alive connection (each
    // answered once, so the server holds it).
    let idle: Vec<http::Conn> = (0..CAP)
        .map(|_| {
            let mut c = http::Conn::open(web, WAIT).unwrap();
            assert_eq!(c.get("/").unwrap().status, 200);
            c
        })
        .collect();
    let mut kept_scraper = http::Conn::open(scrape_at, WAIT).unwrap();
    let samples = scrape(&mut kept_scraper);
    assert_eq!(
        samples["pid_server_open_connections"],
        (CAP + 1) as f64,
        "the clients' connections and the scraper's own"
    );
    // A client past the cap waits in the kernel's queue: no answer.
    let past_cap = http::get_timeout(web, "/", Duration::from_millis(300));
    assert!(
        past_cap.is_err(),
        "a client past the cap was served: {past_cap:?}"
    );
    // Probes on new connections, as a health checker makes them; the
    // bound is generous (they answer at once), what counts is the answer.
    let bound = Duration::from_secs(5);
    let h = http::get_timeout(scrape_at, "/healthz", bound).expect("/healthz at the cap");
    assert_eq!(h.status, 200);
    assert!(h.body.contains("\"state\":\"serving\""), "{}", h.body);
    let r = http::get_timeout(scrape_at, "/readyz", bound).expect("/readyz at the cap");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let m = http::get_timeout(scrape_at, "/metrics", bound).expect("/metrics at the cap");
    assert_eq!(m.status, 200);
    assert!(m.body.contains("pid_server_open_connections"), "{}", m.body);
    // Freeing a client slot lets the queued clients in again.
    drop(idle);
    assert_eq!(http::get_timeout(web, "/", bound).unwrap().status, 200);
}
