//! The handover without systemd, with the real binary: upgrades under load,
//! in-flight work, the helper's outcomes and exit codes, rollback, and
//! leaks across many generations.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Notify, Proc, Reaper, WAIT};
use pid_server_test_support::{Load, http, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// Starts a private copy of the binary (so the test can replace it).
fn start_private() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Proc,
    Notify,
    std::net::SocketAddr,
) {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let (p, notify, addr) = proc::start(&bin);
    (dir, bin, p, notify, addr)
}

/// Parses `reloaded: OLD -> NEW (generation G) in MS ms`, and what
/// follows after `; ` (connections moved, the old process's exit).
fn parse_reloaded(line: &str) -> (u32, u32, u32, u64) {
    let head = line.split("; ").next().unwrap_or(line);
    let n: Vec<u64> = head
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(line.starts_with("reloaded: ") && n.len() == 4, "{line:?}");
    (n[0] as u32, n[1] as u32, n[2] as u32, n[3])
}

#[test]
fn upgrade_under_load_loses_nothing() {
    let (_dir, _bin, old, notify, addr) = start_private();
    let reaper = Reaper::default();
    // 2 ms between requests: 500 per client then take over a second, well
    // past the handover (250 ms of probation), so the new PID answers some.
    // (Unpaced, both loads were done in under 200 ms, before it.)
    let load = |keep_alive, one_shot| {
        Load::to(addr)
            .keep_alive(keep_alive)
            .one_shot(one_shot)
            .pace(Duration::from_millis(2))
            .max_requests(1000)
            .max_time(Duration::from_secs(20))
            .start()
    };
    let (ka, nc) = (load(2, 0), load(0, 2));
    // Let the load reach the old process first.
    wait::until_ok("an answer from the old process", WAIT, || {
        http::get(addr, "/healthz")
    });
    let (code, out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let (from, to, generation, _ms) = parse_reloaded(out.trim());
    reaper.watch(to);
    assert_eq!((from, generation), (old.pid, 1));
    let (ka, nc) = (ka.join(), nc.join());
    for (name, t) in [("keep-alive", &ka), ("new connection", &nc)] {
        eprintln!("{name}: {t:?}");
        assert_eq!(t.failed(), 0, "{name}: {:?}", t.failures);
        assert_eq!(t.sent, 1000, "{name}: ran out of time");
        // Both generations served some of it.
        assert!(
            t.by_pid.get(&to).is_some_and(|n| *n > 0),
            "{name}: new PID never answered"
        );
    }
    // PIDs go from old to new, never back.
    let mut order = ka.pid_order.clone();
    order.extend(nc.pid_order.iter().filter(|p| !ka.pid_order.contains(p)));
    assert!(order.iter().all(|p| *p == old.pid || *p == to), "{order:?}");
    assert_eq!(proc::health_pid(addr), to);
    proc::wait_gone(old.pid, WAIT);
    // systemd would have been told the new main PID, and nothing more from
    // the old one after the handover.
    let msgs = notify.messages();
    let takeover = msgs
        .iter()
        .position(|m| m.contains(&format!("MAINPID={to}")) && m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no MAINPID={to}: {msgs:?}"));
    assert!(
        !msgs.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 sent during a handover: {msgs:?}"
    );
    assert!(
        msgs[takeover..].iter().all(|m| !m.contains("generation 0")),
        "old process spoke after the handover: {msgs:?}"
    );
}

#[test]
fn sigusr2_and_sighup_upgrade_too() {
    let (_dir, _bin, old, notify, addr) = start_private();
    let reaper = Reaper::default();
    old.signal(Signal::SIGUSR2);
    let m = notify.wait_for("MAINPID", |m| {
        m.contains("MAINPID=") && !m.contains(&format!("MAINPID={}", old.pid))
    });
    let new: u32 = m
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap()
        .parse()
        .unwrap();
    reaper.watch(new);
    proc::wait_gone(old.pid, WAIT);
    assert_eq!(proc::health_pid(addr), new);
    // SIGHUP: RELOADING=1 first (Type=notify-reload), then the new MAINPID.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), Signal::SIGHUP).unwrap();
    notify.wait_for("RELOADING=1", |m| {
        m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")
    });
    let m = notify.wait_for("MAINPID", |m| {
        m.contains("MAINPID=")
            && !m.contains(&format!("MAINPID={new}"))
            && !m.contains(&format!("MAINPID={}", old.pid))
    });
    let newer: u32 = m
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap()
        .parse()
        .unwrap();
    reaper.watch(newer);
    proc::wait_gone(new, WAIT);
    let h = http::get(addr, "/healthz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(
        (v["pid"].as_u64(), v["generation"].as_u64()),
        (Some(newer as u64), Some(2))
    );
}

#[test]
fn in_flight_request_completes_on_the_old_process() {
    let (_dir, _bin, old, _notify, addr) = start_private();
    let reaper = Reaper::default();
    let slow = std::thread::spawn(move || http::get(addr, "/slow?ms=1500"));
    let mut probe = http::Conn::open(addr, WAIT).unwrap();
    wait::until("the slow request to arrive", WAIT, || {
        let r = probe.get("/healthz").unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        (v["in_flight"].as_u64() >= Some(2)).then_some(())
    });
    let (code, out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    reaper.watch(parse_reloaded(out.trim()).1);
    let r = slow.join().unwrap().unwrap();
    assert_eq!((r.status, r.pid()), (200, Some(old.pid)));
    proc::wait_gone(old.pid, WAIT);
}

#[test]
fn a_new_binary_that_exits_at_once_leaves_the_old_serving() {
    let (_dir, bin, old, _notify, addr) = start_private();
    proc::install_script(&bin, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n");
    let load = Load::to(addr)
        .keep_alive(2)
        .max_requests(400)
        .max_time(Duration::from_secs(10))
        .start();
    let (code, out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    let t = load.finish();
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("exited with status 1 before it was ready"),
        "{err}"
    );
    assert!(
        err.contains(&format!("PID {} keeps serving", old.pid)),
        "{err}"
    );
    assert_eq!(t.failed(), 0, "{:?}", t.failures);
    assert_eq!(t.pid_order, vec![old.pid]);
    assert_eq!(proc::health_pid(addr), old.pid);
    assert!(
        old.log().contains("reload failed, still serving"),
        "{}",
        old.log()
    );
    // The good binary back: the next reload works.
    proc::install_real(BIN, &bin);
    let (code, out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let reaper = Reaper::default();
    reaper.watch(parse_reloaded(out.trim()).1);
}

#[test]
fn a_new_binary_that_never_gets_ready_is_killed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(&bin, socket, &notify);
    cmd.args(["--upgrade-timeout", "1"]);
    let old = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    // Looks alive, never says ready.
    proc::install_script(&bin, "#!/bin/sh\nexec sleep 30\n");
    let t = Instant::now();
    let (code, _out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not ready within 1s; stopped it"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(proc::health_pid(addr), old.pid);
    // The failure shows in the status line systemd would display.
    let status = notify.wait_for("failed status", |m| m.contains("last reload failed"));
    assert!(status.contains(&format!("MAINPID={}", old.pid)), "{status}");
    // No sleeping child left behind.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", old.pid))
        .unwrap_or_default();
    assert_eq!(children.trim(), "", "children left: {children}");
}

#[test]
fn helper_errors_have_their_own_exit_codes() {
    // No such process.
    let (code, _, err) = proc::reload(BIN, &["--pid", "999999999"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no process with PID 999999999"), "{err}");
    // A process that is not a pid-server (this test).
    let me = std::process::id().to_string();
    let (code, _, err) = proc::reload(BIN, &["--pid", &me]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is not a running pid-server"), "{err}");
    let (code, _, err) = proc::reload(BIN, &["--pid", "abc"]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn two_reloads_at_once_one_runs_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let reaper = Reaper::default();
    let (old, _notify, addr) = proc::start(&bin);
    // A child that takes a while to be ready keeps the first reload open.
    proc::install_script(&bin, &format!("#!/bin/sh\nsleep 1\nexec {BIN} \"$@\"\n"));
    let pid = old.pid.to_string();
    let first = {
        let pid = pid.clone();
        std::thread::spawn(move || proc::reload(BIN, &["--pid", &pid]))
    };
    // The second asks while the first's child sleeps. Wait until the first
    // has started its child (the old process then has one), bounded.
    wait::until("the first reload to start a child", WAIT, || {
        let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", old.pid))
            .unwrap_or_default();
        (!kids.trim().is_empty()).then_some(())
    });
    let (code, _, err) = proc::reload(BIN, &["--pid", &pid]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already under way"), "{err}");
    let (code, out, err) = first.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let new = parse_reloaded(out.trim()).1;
    reaper.watch(new);
    proc::wait_gone(old.pid, WAIT);
    assert_eq!(proc::health_pid(addr), new);
}

#[test]
fn ten_upgrades_leak_no_fds_and_leave_no_zombies() {
    let (_dir, _bin, old, _notify, addr) = start_private();
    let reaper = Reaper::default();
    let mut pid = old.pid;
    let mut fds = Vec::new();
    let mut times = Vec::new();
    for generation in 1..=10 {
        let (code, out, err) = proc::reload(BIN, &["--pid", &pid.to_string()]);
        assert_eq!(code, 0, "generation {generation}: {err}");
        let (from, to, g, ms) = parse_reloaded(out.trim());
        assert_eq!((from, g), (pid, generation));
        reaper.watch(to);
        times.push(ms);
        proc::wait_gone(pid, WAIT);
        pid = to;
        // The new process has settled once it answers.
        assert_eq!(proc::health_pid(addr), pid);
        // Transient fds (a connection being closed) come and go: the least
        // seen over 200 ms is what the process holds at rest.
        let at_rest = (0..10)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .unwrap()
                    .count()
            })
            .min()
            .unwrap();
        fds.push(at_rest);
    }
    eprintln!("fds per generation: {fds:?}; handover ms: {times:?}");
    // A leak grows with every generation; the last must hold no more than
    // the first.
    assert!(fds[9] <= fds[0], "fd count grows: {fds:?}");
    // Old generations were reaped (by us for the first, by init for the
    // rest): none is left as a zombie child of the serving process.
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert_eq!(children.trim(), "", "children: {children}");
}

/// Starts pid-server from a private binary with a short upgrade timeout,
/// replaces the binary with `script` (or makes it non-executable), asks for
/// a reload under load, and checks that it fails with `reason` while the old
/// process keeps serving every request.
fn broken_release(script: Option<&str>, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(&bin, socket, &notify);
    cmd.args(["--upgrade-timeout", "2"]);
    let old = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    match script {
        Some(s) => proc::install_script(&bin, s),
        None => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let load = Load::to(addr)
        .keep_alive(2)
        .max_requests(100_000)
        .max_time(Duration::from_secs(20))
        .start();
    let nc = Load::to(addr)
        .one_shot(1)
        .max_requests(100_000)
        .max_time(Duration::from_secs(20))
        .start();
    let (code, _out, err) = proc::reload(BIN, &["--pid", &old.pid.to_string()]);
    let (t, n) = (load.finish(), nc.finish());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(reason), "{err:?} lacks {reason:?}");
    for t in [&t, &n] {
        assert_eq!(t.failed(), 0, "{:?}", t.failures);
        assert_eq!(t.pid_order, vec![old.pid], "someone else answered");
        assert!(t.sent > 0);
    }
    assert_eq!(proc::health_pid(addr), old.pid);
    // systemd would still see the old process as the main one, ready, with
    // the failure in its status line, and never a STOPPING=1.
    let status = notify.wait_for("failure status", |m| m.contains("last reload failed"));
    assert!(status.contains(&format!("MAINPID={}", old.pid)), "{status}");
    assert!(!notify.messages().iter().any(|m| m.contains("STOPPING=1")));
    let log = old.log();
    assert!(log.contains("reload failed, still serving"), "{log}");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", old.pid))
        .unwrap_or_default();
    assert_eq!(children.trim(), "", "children left: {children}");
}

#[test]
fn fault_new_binary_is_not_executable() {
    broken_release(None, "cannot start");
}

#[test]
fn fault_new_binary_is_a_different_program() {
    // Runs fine, never speaks the handover protocol.
    broken_release(
        Some("#!/bin/sh\nexec sleep 30\n"),
        "was not ready within 2s",
    );
}

#[test]
fn fault_new_binary_says_ready_then_crashes() {
    broken_release(
        Some("#!/bin/bash\necho ready >&\"$PID_SERVER_HANDOVER_FD\"\nexit 3\n"),
        "exited with status 3 right after it was ready",
    );
}

#[test]
fn fault_new_binary_closes_the_channel() {
    broken_release(
        Some("#!/bin/bash\neval \"exec $PID_SERVER_HANDOVER_FD>&-\"\nexec sleep 30\n"),
        "closed the handover channel",
    );
}

#[test]
fn stopping_the_old_process_mid_handover_stops_the_new_one_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let bin = proc::private_binary(BIN, dir.path());
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(&bin, socket, &notify);
    // A long probation holds the handover open.
    cmd.args(["--upgrade-probation-ms", "20000"]);
    let mut old = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let pid = old.pid.to_string();
    let helper = std::thread::spawn(move || proc::reload(BIN, &["--pid", &pid]));
    // The new process is up once a second PID answers on the shared port.
    let new = wait::until("the new process to answer", WAIT, || {
        let p = http::get(addr, "/").unwrap().pid().unwrap();
        (p != old.pid).then_some(p)
    });
    let t = Instant::now();
    old.signal(Signal::SIGTERM);
    assert_eq!(old.wait_exit(WAIT).code(), Some(0));
    proc::wait_gone(new, WAIT);
    // Stopped by its SIGTERM and drained, not killed after the 3 s bound.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (code, _, err) = helper.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("old process is stopping"), "{err}");
    let log = old.log();
    assert!(
        log.contains("handover aborted: SIGTERM before the handover was committed"),
        "{log}"
    );
    // The new process never claimed the unit.
    assert!(
        !notify
            .messages()
            .iter()
            .any(|m| m.contains(&format!("MAINPID={new}")))
    );
}

#[test]
fn fault_new_binary_cannot_start_and_says_why() {
    // A successor whose start-up fails tells the old process why over the
    // handover channel; the helper prints that, not only an exit status.
    let script = format!("#!/bin/sh\nLISTEN_FDNAMES=a:b exec {} \"$@\"\n", BIN);
    broken_release(
        Some(&script),
        "could not start: LISTEN_FDNAMES has 2 names for 1 sockets",
    );
}

/// One variable of a running process, from `/proc/PID/environ`.
fn environ_var(pid: u32, key: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{key}=")).map(str::to_string)
    })
}

#[test]
fn the_next_generation_gets_the_environment_of_a_helper_from_its_own_unit() {
    // What `systemctl edit` (a new Environment=) then `systemctl reload`
    // does: systemd starts the helper with the unit's current environment
    // and the same INVOCATION_ID as the main process.
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.env("INVOCATION_ID", "0123abcd")
        .env("DEMO_SETTING", "old");
    let old = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    let helper = |invocation: &str, value: &str| {
        let out = std::process::Command::new(BIN)
            .args(["reload", "--pid"])
            .arg(proc::health_pid(addr).to_string())
            .env("INVOCATION_ID", invocation)
            .env("DEMO_SETTING", value)
            .env("DEMO_ADDED", "yes")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_reloaded(String::from_utf8_lossy(&out.stdout).trim())
    };
    // A helper of this very invocation: its environment goes to the child.
    let (_, first, ..) = helper("0123abcd", "new");
    reaper.watch(first);
    assert_eq!(environ_var(first, "DEMO_SETTING").as_deref(), Some("new"));
    assert_eq!(environ_var(first, "DEMO_ADDED").as_deref(), Some("yes"));
    // The per-process ones stay the server's own.
    assert_eq!(
        environ_var(first, "NOTIFY_SOCKET").map(std::path::PathBuf::from),
        Some(notify.path.clone())
    );
    assert_eq!(environ_var(first, "MAINPID"), None);
    // A helper from elsewhere (a shell, another unit) changes nothing.
    let (_, second, ..) = helper("ffff", "elsewhere");
    reaper.watch(second);
    assert_eq!(environ_var(second, "DEMO_SETTING").as_deref(), Some("new"));
    assert!(
        old.log()
            .contains("the next generation gets the unit's current environment")
    );
}

/// `/stats`, fetched until the previous generation's counts are in
/// (bounded): (PID, requests per route, inherited).
fn stats_settled(addr: std::net::SocketAddr) -> (u32, serde_json::Value, String) {
    let mut last = serde_json::Value::Null;
    wait::within(WAIT, || {
        let r = http::get(addr, "/stats").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        last = serde_json::from_str(&r.body).unwrap();
        let inherited = last["inherited"].as_str().unwrap().to_string();
        (inherited != "pending").then(|| {
            (
                last["pid"].as_u64().unwrap() as u32,
                last["requests"].clone(),
                inherited,
            )
        })
    })
    .unwrap_or_else(|| panic!("/stats stayed pending: {last}"))
}

/// The app's own state survives reloads: pid-server's requests per route
/// (`/stats`) are handed to each next generation, which adds them to its
/// own. Before app state was handed over, each reload started them at 0.
#[test]
fn request_counts_per_route_survive_two_reloads() {
    let (_dir, _bin, p, _notify, addr) = start_private();
    let reaper = Reaper::default();
    let mut old = p.pid;
    let (mut root, mut health) = (0u64, 0u64);
    for reload in 1..=2 {
        for _ in 0..3 {
            assert_eq!(http::get(addr, "/").unwrap().pid(), Some(old));
        }
        http::get(addr, "/healthz").unwrap();
        (root, health) = (root + 3, health + 1);
        let (pid, before, inherited) = stats_settled(addr);
        assert_eq!(pid, old);
        assert_eq!(inherited, if reload == 1 { "none" } else { "taken" });
        assert_eq!(
            (before["/"].as_u64(), before["/healthz"].as_u64()),
            (Some(root), Some(health))
        );
        let (code, out, err) = proc::reload(BIN, &["--pid", &old.to_string()]);
        assert_eq!(code, 0, "{err}");
        let (_, new, _, _) = parse_reloaded(out.trim());
        reaper.watch(new);
        proc::wait_gone(old, WAIT);
        let (pid, after, inherited) = stats_settled(addr);
        eprintln!("reload {reload}: before {before} -> after {after} ({inherited}, PID {pid})");
        assert_eq!((pid, inherited.as_str()), (new, "taken"), "{}", p.log());
        assert_eq!(
            (after["/"].as_u64(), after["/healthz"].as_u64()),
            (Some(root), Some(health)),
            "{}",
            p.log()
        );
        assert!(after["/stats"].as_u64() > before["/stats"].as_u64());
        old = new;
    }
    assert!(
        p.log().contains("app_state_sent") || p.log().contains("handed the app state"),
        "{}",
        p.log()
    );
}
