//! Idle connections kept over `systemctl restart` in systemd's file
//! descriptor store (the unit's `FileDescriptorStoreMax=`), and let go of at
//! a plain `systemctl stop`.

use std::io;
use std::time::{Duration, Instant};

use pid_server_test_support::http::Conn;
use pid_server_test_support::nspawn::Container;
use pid_server_test_support::{Release, each_release, wait};

use super::{
    REQUEST_TIMEOUT, SERVICE, WAIT, activate, assert_no_failures, boot, can_run, get, say,
    start_load, start_paused, stop_load, timer,
};

each_release!(
    three_restarts_under_load_keep_every_idle_connection,
    a_connection_answers_across_a_restart_on_its_own_socket,
    a_stop_closes_the_stored_connections_at_once,
    connections_past_the_store_s_room_are_served_to_the_end,
    the_crash_safe_mode_keeps_idle_connections_across_a_sigkill,
);

/// Paused clients: idle 0.3–3 s between two requests, the connections a
/// restart finds idle.
const PAUSED_CLIENTS: usize = 8;

/// A keep-alive connection in the container's network namespace.
fn open(c: &Container) -> Conn {
    let addr = c.addr();
    c.in_netns(move || Conn::open(addr, REQUEST_TIMEOUT))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// One request on `conn`, answered 200: the PID that answered.
fn answer(conn: &mut Conn) -> u32 {
    let r = conn
        .get("/")
        .unwrap_or_else(|e| panic!("GET / on {}: {e}", conn.local_addr()));
    assert_eq!(r.status, 200, "{}", r.body);
    r.pid().expect("a pid-server answer")
}

fn restart(c: &Container, old: u32) -> (u32, Duration) {
    let t0 = Instant::now();
    c.systemctl_ok(&["restart", SERVICE]);
    let took = t0.elapsed();
    let new = c.main_pid(SERVICE);
    assert!(
        new != 0 && new != old,
        "MainPID {new} after the restart of {old}"
    );
    (new, took)
}

fn three_restarts_under_load_keep_every_idle_connection(r: Release) {
    if !can_run("three_restarts_under_load_keep_every_idle_connection", r) {
        return;
    }
    let _timer = timer(r, "R1 restarts keep idle connections");
    let c = boot(r, &[]);
    let mut old = activate(&c);
    let load = start_load(&c, 2, 2);
    let paused = start_paused(&c, PAUSED_CLIENTS);
    load.wait_answers_from(old, 200, WAIT);
    let mut pids = vec![old];
    for round in 1..=3 {
        let (new, took) = restart(&c, old);
        load.wait_answers_from(new, 200, WAIT);
        // Every paused client speaks after the restart before the next.
        let since = paused.snapshot();
        paused.wait_for("a request of every paused client", WAIT, |t| {
            t.sent >= since.sent + PAUSED_CLIENTS as u64
        });
        say(
            r,
            &format!(
                "R1 round {round}: restart {old} -> {new} took {} ms",
                took.as_millis()
            ),
        );
        pids.push(new);
        old = new;
    }
    let t = stop_load(load);
    let p = stop_load(paused);
    say(r, &format!("R1 load: {}", t.summary()));
    say(r, &format!("R1 paused clients: {}", p.summary()));
    assert_no_failures(&t, 600);
    assert_eq!(p.failed(), 0, "{}\n{:?}", p.summary(), p.examples);
    assert!(t.ok_reused > 0 && t.ok_one_shot > 0, "{t:?}");
    // Every paused connection that saw a restart kept its socket: none
    // closed by the server, none failed.
    let kept = p.conn_report();
    assert_eq!((kept.closed, kept.failed), (0, 0), "{kept}");
    assert_eq!(
        kept.kept_across_pid_change, kept.saw_change_or_closed,
        "{kept}"
    );
    assert!(kept.kept_across_pid_change > 0, "{kept}");
    for pid in p.by_pid.keys() {
        assert!(pids.contains(pid), "PID {pid} was never MainPID: {pids:?}");
    }
    // What the operator reads: each stop said how many it stored, each
    // start how many it took.
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    let stored = journal
        .lines()
        .filter(|l| l.contains("in systemd's file descriptor store for the next start"))
        .count();
    let restored = journal
        .lines()
        .filter(|l| l.contains("idle connections from systemd's file descriptor store"))
        .count();
    assert_eq!((stored, restored), (3, 3), "{journal}");
    assert_eq!(c.unit_property(SERVICE, "Result"), "success");
}

/// The plainest case, one connection: answered by the old PID, then, after
/// the restart, by the new one on the same client socket; `/metrics`
/// counts it.
fn a_connection_answers_across_a_restart_on_its_own_socket(r: Release) {
    if !can_run("a_connection_answers_across_a_restart_on_its_own_socket", r) {
        return;
    }
    let _timer = timer(r, "R2 one connection across a restart");
    let c = boot(r, &[]);
    let old = activate(&c);
    let mut conn = open(&c);
    assert_eq!(answer(&mut conn), old);
    let (new, _) = restart(&c, old);
    assert_eq!(answer(&mut conn), new, "the kept connection's next answer");
    assert_eq!(conn.served(), 2);
    let metrics = get(&c, "/metrics").body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pid_server_connections_restored_total 1"),
        "{metrics}"
    );
}

/// `systemctl stop` discards the store, so a stored connection closes then
/// for its client (it does not hang with nobody reading), and the stop
/// does not wait out idle connections.
fn a_stop_closes_the_stored_connections_at_once(r: Release) {
    if !can_run("a_stop_closes_the_stored_connections_at_once", r) {
        return;
    }
    let _timer = timer(r, "R3 stop closes stored connections");
    let c = boot(r, &[]);
    let pid = activate(&c);
    let mut conn = open(&c);
    assert_eq!(answer(&mut conn), pid);
    let t0 = Instant::now();
    c.systemctl_ok(&["stop", SERVICE]);
    let took = t0.elapsed();
    let t1 = Instant::now();
    let e = conn
        .get("/")
        .expect_err("a request on a connection of a stopped service");
    let seen = t1.elapsed();
    say(
        r,
        &format!(
            "R3: stop took {} ms; the kept connection then: {e} after {} ms",
            took.as_millis(),
            seen.as_millis()
        ),
    );
    // Closed (EOF, a reset), not left open with nobody to answer: that
    // would be the read's timeout.
    assert!(
        !matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
        "the stored connection stayed open after the stop: {e}"
    );
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(
        journal.contains("left 1 idle connections in systemd's file descriptor store"),
        "{journal}"
    );
}

/// A store with room for one: of three idle connections, one is kept over
/// the restart; the other two are served by the old process to the end
/// (closed idle), counted in its line; nothing fails.
fn connections_past_the_store_s_room_are_served_to_the_end(r: Release) {
    if !can_run("connections_past_the_store_s_room_are_served_to_the_end", r) {
        return;
    }
    let _timer = timer(r, "R4 store too small");
    let c = boot(
        r,
        &[(
            "room.conf",
            "[Service]\nEnvironment=PID_SERVER_FD_STORE_CONNECTIONS=1\n",
        )],
    );
    let old = activate(&c);
    let mut conns: Vec<Conn> = (0..3).map(|_| open(&c)).collect();
    for conn in &mut conns {
        assert_eq!(answer(conn), old);
    }
    let (new, _) = restart(&c, old);
    let mut kept = 0;
    let mut closed = 0;
    for conn in &mut conns {
        match conn.get("/") {
            Ok(resp) => {
                assert_eq!(resp.pid(), Some(new), "{}", resp.body);
                kept += 1;
            }
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ),
                    "a connection past the room hung: {e}"
                );
                closed += 1;
            }
        }
    }
    assert_eq!((kept, closed), (1, 2));
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(
        journal.contains(
            "left 1 idle connections in systemd's file descriptor store for the next start \
             (2 messages); 2 served to the end here"
        ),
        "{journal}"
    );
    assert_eq!(c.unit_property(SERVICE, "Result"), "success");
}

/// The crash-safe mode (`PID_SERVER_FD_STORE_WHILE_IDLE=64`): the main
/// process SIGKILLed; systemd restarts it (`Restart=on-failure`) and the
/// connections that were idle then are answered by the new process on
/// their own sockets. Under paused load beside them, nothing is refused and
/// at most the requests in progress (one per client) fail.
fn the_crash_safe_mode_keeps_idle_connections_across_a_sigkill(r: Release) {
    if !can_run(
        "the_crash_safe_mode_keeps_idle_connections_across_a_sigkill",
        r,
    ) {
        return;
    }
    let _timer = timer(r, "R5 crash-safe mode, SIGKILL");
    let c = boot(
        r,
        &[(
            "crash-safe.conf",
            "[Service]\nEnvironment=PID_SERVER_FD_STORE_WHILE_IDLE=64\n",
        )],
    );
    let old = activate(&c);
    let mut conns: Vec<Conn> = (0..3).map(|_| open(&c)).collect();
    for conn in &mut conns {
        assert_eq!(answer(conn), old);
    }
    let paused = start_paused(&c, PAUSED_CLIENTS);
    paused.wait_answers_from(old, 2 * PAUSED_CLIENTS as u64, WAIT);
    // The three connections are in the store once idle for a second.
    wait::until("the idle connections in the store", WAIT, || {
        let m = get(&c, "/metrics").body;
        m.lines()
            .find_map(|l| l.strip_prefix("pid_server_connections_in_fd_store "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .filter(|n| *n >= 3)
    });
    c.exec(&["kill", "-KILL", &old.to_string()]);
    let new = wait::until("a restarted main process", WAIT, || {
        let p = c.main_pid(SERVICE);
        (p != 0 && p != old).then_some(p)
    });
    for conn in &mut conns {
        assert_eq!(answer(conn), new, "a connection idle at the crash");
        assert_eq!(conn.served(), 2);
    }
    let since = paused.snapshot();
    paused.wait_for("a request of every paused client", WAIT, |t| {
        t.sent >= since.sent + PAUSED_CLIENTS as u64
    });
    let p = stop_load(paused);
    say(r, &format!("R5 paused clients: {}", p.summary()));
    assert_eq!(p.refused(), 0, "{}\n{:?}", p.summary(), p.examples);
    assert!(
        p.failed() <= PAUSED_CLIENTS as u64,
        "{}\n{:?}",
        p.summary(),
        p.examples
    );
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "1");
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(
        journal.contains("idle connections from systemd's file descriptor store"),
        "{journal}"
    );
}
