//! `systemctl reload` under load, and a request in flight across a reload.

use std::time::{Duration, Instant};

use pid_server_test_support::nspawn::Container;
use pid_server_test_support::{Release, each_release};

use super::{
    SERVICE, WAIT, activate, assert_no_failures, boot, can_run, healthz, join_bounded, reload_ok,
    say, spawn_request, start_load, start_paused, stop_load, timer, wait_gone, wait_in_flight,
};

/// Paused clients beside the load of the reload case: kept connections
/// that idle 0.3–3 s between two requests, the ones a reload finds idle.
const PAUSED_CLIENTS: usize = 8;

each_release!(
    five_reloads_under_load_fail_no_request,
    a_slow_request_survives_a_reload_on_the_old_process,
);

fn five_reloads_under_load_fail_no_request(r: Release) {
    if !can_run("five_reloads_under_load_fail_no_request", r) {
        return;
    }
    let _timer = timer(r, "2 reload under load");
    let c = boot(r, &[]);
    five_reloads_under_load(r, "case 2", &c);
}

/// Five `systemctl reload`s under load (keep-alive, one-shot and paused
/// clients) of a started socket, whichever way the unit reloads: no request
/// fails, MainPID follows each new generation, the kept connections move.
/// Returns how long each reload took.
pub(super) fn five_reloads_under_load(r: Release, label: &str, c: &Container) -> Vec<Duration> {
    let first = activate(c);

    let load = start_load(c, 3, 2);
    let paused = start_paused(c, PAUSED_CLIENTS);
    load.wait_answers_from(first, 200, WAIT);
    // Every paused connection is open, and idle most of the time, when the
    // reloads begin.
    paused.wait_for("an answer to every paused client", WAIT, |t| {
        t.ok_paused >= PAUSED_CLIENTS as u64
    });
    let mut pids = vec![first];
    let mut times = Vec::new();
    for round in 1..=5u32 {
        let old = *pids.last().unwrap();
        let took = reload_ok(c);
        let new = c.main_pid(SERVICE);
        assert_ne!(new, 0, "round {round}: no MainPID after the reload");
        assert_ne!(new, old, "round {round}: MainPID did not change");
        assert!(!pids.contains(&new), "round {round}: PID {new} seen before");
        assert!(c.process_alive(new), "round {round}: PID {new} not seen");
        assert_eq!(c.unit_state(SERVICE), ("active".into(), "running".into()));
        // A new connection now reaches the new process only.
        let h = healthz(c);
        assert_eq!(h["pid"], new, "round {round}: {h}");
        assert_eq!(h["generation"], round, "round {round}: {h}");
        let gone_after = wait_gone(c, old, "the old generation");
        // Traffic flows through the new generation before the next round.
        load.wait_answers_from(new, 200, WAIT);
        say(
            r,
            &format!(
                "{label} round {round}: reload {old} -> {new} took {} ms; old exited {} ms after",
                took.as_millis(),
                gone_after.as_millis()
            ),
        );
        pids.push(new);
        times.push(took);
    }
    let before_stop = load.snapshot();
    load.wait_more(&before_stop, 200, WAIT);
    let t = stop_load(load);
    say(r, &format!("{label} load: {}", t.summary()));
    assert_no_failures(&t, 1200);
    assert!(
        t.ok_reused > 0,
        "no keep-alive connection was reused: {t:?}"
    );
    assert!(t.ok_one_shot > 0, "{t:?}");
    for pid in &pids {
        assert!(
            t.by_pid.contains_key(pid),
            "PID {pid} answered nothing: {t:?}"
        );
    }
    assert_eq!(
        t.by_pid.keys().copied().collect::<Vec<_>>().len(),
        pids.len(),
        "answers from a PID that was never MainPID: {t:?} vs {pids:?}"
    );
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");

    // The paused clients come back once more after the last reload.
    let since = paused.snapshot();
    paused.wait_for(
        "a request of every paused client after the last reload",
        WAIT,
        |t| t.sent >= since.sent + PAUSED_CLIENTS as u64,
    );
    let p = stop_load(paused);
    let conns: Vec<String> = p
        .conns
        .iter()
        .map(|c| format!("client {} {}: {:?} {:?}", c.client, c.local, c.runs, c.end))
        .collect();
    say(
        r,
        &format!(
            "{label} paused clients: {}\n  {}",
            p.summary(),
            conns.join("\n  ")
        ),
    );
    // What holds for paused clients today: answered by generations that
    // were MainPID, and never refused (the listening socket stays open).
    assert!(p.ok_paused > 0, "{}", p.summary());
    assert_eq!(p.refused(), 0, "{}\n{:?}", p.summary(), p.examples);
    for pid in p.by_pid.keys() {
        assert!(
            pids.contains(pid),
            "a paused client was answered by PID {pid}, never MainPID: {} vs {pids:?}",
            p.summary()
        );
    }
    // A reload moves kept connections to the new generation: none failed,
    // none was closed, and every one that saw a PID change kept its socket
    // (the last wait above made every client speak after the last reload).
    assert_eq!(p.failed(), 0, "{}\n{:?}", p.summary(), p.examples);
    let moves = p.conn_report();
    assert_eq!((moves.closed, moves.failed), (0, 0), "{moves}");
    assert_eq!(
        moves.kept_across_pid_change, moves.saw_change_or_closed,
        "{moves}"
    );
    assert!(
        moves.kept_across_pid_change > 0,
        "no connection crossed a reload: {moves}"
    );
    say(
        r,
        &format!(
            "{label}: reloads took {:?} ms",
            times.iter().map(Duration::as_millis).collect::<Vec<_>>()
        ),
    );
    times
}

fn a_slow_request_survives_a_reload_on_the_old_process(r: Release) {
    if !can_run("a_slow_request_survives_a_reload_on_the_old_process", r) {
        return;
    }
    let _timer = timer(r, "4 in-flight across a reload");
    let c = boot(r, &[]);
    let old = activate(&c);

    let started = Instant::now();
    let slow = spawn_request(&c, "/slow?ms=3000");
    wait_in_flight(&c, 1);
    reload_ok(&c);
    let reloaded = Instant::now();
    let new = c.main_pid(SERVICE);
    assert_ne!(new, old);
    // The handover did not wait for the slow request...
    assert!(
        !slow.is_finished(),
        "the slow request ended before the reload returned"
    );
    // ...which the old process is still working on, draining.
    assert!(c.process_alive(old), "the old process is gone already");
    assert_eq!(healthz(&c)["pid"], new);

    let (result, finished) = join_bounded(slow, "the slow request", Duration::from_secs(30));
    let resp = result.expect("the slow request failed");
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.pid(),
        Some(old),
        "the slow request was not answered by the old process: {:?}",
        resp.body
    );
    assert!(finished > reloaded);
    let took = finished - started;
    assert!(took >= Duration::from_millis(3000), "{took:?}");
    say(
        r,
        &format!(
            "case 4: reload {old} -> {new} returned after {} ms; the slow request finished on \
             {old} after {} ms",
            (reloaded - started).as_millis(),
            took.as_millis()
        ),
    );
    wait_gone(&c, old, "the old generation");
    assert_eq!(c.main_pid(SERVICE), new);
}
