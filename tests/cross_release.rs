//! Reloads across releases: from the previous release (`.ci/previous-release`
//! builds it from a pinned commit) to the binary under test, and back, under
//! keep-alive and new-connection load, zero failed requests. What each
//! direction falls back to is asserted too: the newer side never asks the
//! older one for what it does not know.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use pid_server_test_support::Load;
use pid_server_test_support::proc::{self, Reaper, WAIT};
use pid_server_test_support::{http, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The previous release's binary, built once (and cached) by
/// `.ci/previous-release`; `None` (printed, or a failure under CI) when it
/// cannot be built here.
fn previous() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/previous-release");
        let out = Command::new("bash").arg(&script).output();
        match out {
            Ok(o) if o.status.success() => {
                Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            }
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "cannot build the previous release under CI: {why}");
                eprintln!("SKIPPED cross-release tests: cannot build the previous release: {why}");
                None
            }
        }
    })
    .as_deref()
}

/// Copies `from` to `dir/pid-server` (atomically: a running process may
/// have it open), so a reload starts that binary.
fn install(from: &Path, dir: &Path) -> PathBuf {
    let dst = dir.join("pid-server");
    let tmp = dir.join("pid-server.new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, &dst).unwrap();
    dst
}

fn helper(bin: &Path, pid: u32) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(["reload", "--pid", &pid.to_string()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `from`, reloads it to `to` under load with `helper_bin`'s
/// helper, checks every request succeeded, and returns the helper's line
/// and the new process's log.
fn reload_across(
    from: &Path,
    to: &Path,
    helper_bin: &Path,
    extra: &[&str],
) -> (String, proc::Proc, Reaper) {
    let (lines, log, old, reaper) = reload_chain(&[from, to], helper_bin, extra);
    (lines[0].clone() + "\n" + &log, old, reaper)
}

/// Starts `chain[0]`, then reloads to each next binary in turn under one
/// load that spans them all (`helper_bin`'s helper each time), checks every
/// request succeeded and every kept connection reached each new process,
/// and returns the helper's lines, the processes' shared log, the first
/// process and the reaper of the later ones.
fn reload_chain(
    chain: &[&Path],
    helper_bin: &Path,
    extra: &[&str],
) -> (Vec<String>, String, proc::Proc, Reaper) {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(chain[0], dir.path());
    let notify = proc::Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(&bin, socket, &notify);
    cmd.args(extra);
    let first = proc::Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    let reloads = chain.len() as u64 - 1;
    // Closed-loop keep-alive and one-shot clients, paced, and paused
    // keep-alive clients (idle 0.3-3 s between requests, no retry), all
    // until the last reload is done.
    let pace = Duration::from_millis(2);
    let max = Duration::from_secs(30 * reloads);
    let ka = Load::to(addr)
        .keep_alive(2)
        .pace(pace)
        .max_requests(20_000 * reloads)
        .max_time(max)
        .start();
    let nc = Load::to(addr)
        .one_shot(1)
        .pace(pace)
        .max_requests(5_000 * reloads)
        .max_time(max)
        .start();
    let paused = Load::to(addr).paused(8).max_time(max).start();
    paused.wait_answers_from(first.pid, 8, WAIT);
    let mut idle: Vec<http::Conn> = (0..10)
        .map(|_| http::Conn::open(addr, WAIT).unwrap())
        .collect();
    // Let the load reach the old process first.
    wait::until_ok("an answer from the old process", WAIT, || {
        http::get(addr, "/healthz")
    });
    let mut lines = Vec::new();
    let mut old = first.pid;
    for (step, to) in chain[1..].iter().enumerate() {
        // Used just before the reload, as a busy client's would be: one idle
        // for longer than the drain's idle grace may be closed as the
        // request goes out, a race no server can win (the paused clients
        // cover pauses shorter than that grace).
        for c in &mut idle {
            assert_eq!(c.get("/").unwrap().pid(), Some(old));
        }
        install(to, dir.path());
        let (code, line, err) = helper(helper_bin, old);
        assert_eq!(code, 0, "reload {}: {err}\n{}", step + 1, first.log());
        let new = proc::reloaded_pid(&line, old);
        reaper.watch(new);
        // The kept connections: moved (same socket, new PID) or drained
        // (the old process answers with `Connection: close`, then a new
        // connection goes to the new process); never a failure. The
        // previous release answers the helper a moment before it starts its
        // drain, so a request in that moment gets a plain answer from the
        // old process.
        // One bound for them all; `done` counts those that reached `new`.
        let mut done = 0;
        wait::until("the old process to start its drain", WAIT, || {
            while let Some(c) = idle.get_mut(done) {
                let r = c
                    .get("/")
                    .unwrap_or_else(|e| panic!("reload {}: kept connection: {e}", step + 1));
                assert_eq!(r.status, 200);
                if r.pid() == Some(new) {
                    done += 1;
                    continue;
                }
                assert_eq!(r.pid(), Some(old));
                if r.close {
                    *c = http::Conn::open(addr, WAIT).unwrap();
                    assert_eq!(c.get("/").unwrap().pid(), Some(new));
                    done += 1;
                    continue;
                }
                return None;
            }
            Some(())
        });
        // Every paused client comes back at least once after the handover.
        let before = paused.snapshot().by_pid.get(&new).copied().unwrap_or(0);
        paused.wait_answers_from(new, before + 8, WAIT);
        proc::wait_gone(old, WAIT);
        lines.push(line);
        old = new;
    }
    // Stopped now rather than run to their count: the count bounds them,
    // and a load that ran out before the last reload would prove nothing.
    let (ka, nc, paused) = (ka.finish(), nc.finish(), paused.finish());
    for (name, t) in [
        ("keep-alive", &ka),
        ("new-connection", &nc),
        ("paused", &paused),
    ] {
        eprintln!("{name}: {}", t.summary());
        assert_eq!(t.failed(), 0, "{name}: {}\n{}", t.summary(), first.log());
        assert!(
            t.by_pid.contains_key(&old),
            "{name}: the last process answered none"
        );
    }
    let log = first.log();
    drop(dir);
    (lines, log, first, reaper)
}

#[test]
fn previous_release_to_this_one_drains_then_this_one_moves() {
    let Some(prev) = previous() else { return };
    let this = Path::new(BIN);
    // The previous release is the old process: it knows no protocol but 1,
    // so it drains; its idle grace must outlast a pause, as it always had
    // to for such clients.
    let (out, _old, _r) = reload_across(prev, this, this, &["--idle-grace-ms", "5000"]);
    let line = out.lines().next().unwrap();
    // A server of the first release sends no connection report.
    assert!(!line.contains("moved"), "{line}");
}

#[test]
fn this_release_to_the_previous_one_drains_instead_of_moving() {
    let Some(prev) = previous() else { return };
    let this = Path::new(BIN);
    let (out, _old, _r) = reload_across(this, prev, this, &[]);
    let line = out.lines().next().unwrap();
    assert!(
        line.contains("; 0 connections moved, 0 fell back"),
        "{line}"
    );
    assert!(
        out.contains("predates moving connections (handover protocol 1)"),
        "the journal says why it drained:\n{out}"
    );
}

#[test]
fn the_previous_release_s_helper_reloads_this_release() {
    // After a package upgrade the unit's ExecReload= helper is still the
    // copy of the release it started with.
    let Some(prev) = previous() else { return };
    let this = Path::new(BIN);
    let (out, _old, _r) = reload_across(this, this, prev, &[]);
    let line = out.lines().next().unwrap();
    assert!(line.starts_with("reloaded: "), "{line}");
    assert!(
        !line.contains("moved"),
        "the old helper prints its own line: {line}"
    );
}

/// Upgrade, roll back, upgrade again, roll back again: each release starts
/// the other with its whole environment, and the previous one passes on
/// the variables it does not know (this release's handover protocol and
/// connection channel) to its own child, naming fds that are not there.
/// This release trusts them only when their fds prove they come from its
/// parent, so the third reload works like the first.
#[test]
fn upgrade_roll_back_and_upgrade_again_under_load() {
    let Some(prev) = previous() else { return };
    let this = Path::new(BIN);
    let (lines, log, _first, _r) = reload_chain(
        &[prev, this, prev, this, prev],
        this,
        &["--idle-grace-ms", "5000"],
    );
    for line in &lines {
        eprintln!("{line}");
    }
    assert_eq!(lines.len(), 4);
    // This release, started by the previous one the second time, was
    // handed the first one's variables and said it ignored them.
    assert!(
        log.contains("ignored PID_SERVER_HANDOVER_PROTOCOL and PID_SERVER_HANDOVER_CONNECTIONS_FD"),
        "{log}"
    );
}

/// `/stats` once the previous generation's counts are settled (bounded).
fn settled_stats(addr: std::net::SocketAddr) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait::within(WAIT, || {
        last = serde_json::from_str(&http::get(addr, "/stats").unwrap().body).unwrap();
        (last["inherited"] != "pending").then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("/stats stayed pending: {last}"))
}

/// App state across releases: the previous release hands over none (it
/// predates it), so this one counts from 0 and says so; this release hands
/// none to the previous one (which did not name `app-state`), and that
/// reload works as before.
#[test]
fn request_counts_start_over_from_and_to_the_previous_release() {
    let Some(prev) = previous() else { return };
    let this = Path::new(BIN);
    let dir = tempfile::tempdir().unwrap();
    let bin = install(prev, dir.path());
    let notify = proc::Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let first = proc::Proc::spawn(proc::serve_socket_cmd(&bin, socket, &notify));
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    let reaper = Reaper::default();
    for _ in 0..2 {
        assert_eq!(http::get(addr, "/").unwrap().pid(), Some(first.pid));
    }
    install(this, dir.path());
    let (code, line, err) = helper(this, first.pid);
    assert_eq!(code, 0, "{err}");
    let new = proc::reloaded_pid(&line, first.pid);
    reaper.watch(new);
    proc::wait_gone(first.pid, WAIT);
    assert_eq!(http::get(addr, "/").unwrap().pid(), Some(new));
    let v = settled_stats(addr);
    eprintln!("after previous -> this: {v}");
    assert_eq!(v["pid"], new);
    assert_eq!(v["inherited"], "none", "{v}");
    assert_eq!(v["requests"]["/"], 1, "{v}");

    install(prev, dir.path());
    let (code, line, err) = helper(this, new);
    assert_eq!(code, 0, "{err}\n{}", first.log());
    let newer = proc::reloaded_pid(&line, new);
    reaper.watch(newer);
    proc::wait_gone(new, WAIT);
    assert_eq!(http::get(addr, "/").unwrap().pid(), Some(newer));
    assert!(
        !first.log().contains("app_state_sent"),
        "no state for a release that did not ask:\n{}",
        first.log()
    );
}
