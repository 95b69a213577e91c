//! Restarts with the socket held by systemd: `systemctl restart` under load, and a main process killed mid-drain.

use std::time::{Duration, Instant};

use pid_server_test_support::{Release, each_release, wait};

use super::{
    SERVICE, WAIT, activate, assert_no_failures, boot, can_run, healthz, join_bounded, say,
    spawn_request, start_load, stop_load, timer, wait_in_flight,
};

each_release!(
    restart_under_load_refuses_no_connection,
    a_main_process_killed_mid_drain_is_restarted_and_refuses_no_connection,
);

fn restart_under_load_refuses_no_connection(r: Release) {
    if !can_run("restart_under_load_refuses_no_connection", r) {
        return;
    }
    let _timer = timer(r, "6 restart under load");
    let c = boot(r, &[]);
    let mut old = activate(&c);
    let load = start_load(&c, 2, 3);
    load.wait_answers_from(old, 300, WAIT);

    for round in 1..=3 {
        let t0 = Instant::now();
        c.systemctl_ok(&["restart", SERVICE]);
        let took = t0.elapsed();
        let new = c.main_pid(SERVICE);
        assert_ne!(new, 0);
        assert_ne!(new, old);
        assert_eq!(c.unit_state(SERVICE), ("active".into(), "running".into()));
        assert!(
            !c.process_alive(old),
            "the old process outlived the restart"
        );
        assert_eq!(healthz(&c)["generation"], 0);
        load.wait_answers_from(new, 300, WAIT);
        say(
            r,
            &format!(
                "case 6 round {round}: restart {old} -> {new} took {} ms",
                took.as_millis()
            ),
        );
        old = new;
    }
    let t = stop_load(load);
    say(r, &format!("case 6 load: {}", t.summary()));
    assert_no_failures(&t, 1200);
    assert_eq!(t.by_pid.len(), 4, "{t:?}");
    assert!(t.ok_reused > 0 && t.ok_one_shot > 0, "{t:?}");
    assert_eq!(c.unit_property(SERVICE, "Result"), "success");
}

/// The main process SIGKILLed mid-drain, under load: systemd restarts the
/// service from the socket it holds, so no connection is refused; the only
/// failures are the requests the killed process held.
fn a_main_process_killed_mid_drain_is_restarted_and_refuses_no_connection(r: Release) {
    if !can_run(
        "a_main_process_killed_mid_drain_is_restarted_and_refuses_no_connection",
        r,
    ) {
        return;
    }
    let case = "F1 SIGKILL mid-drain";
    let _timer = timer(r, case);
    let c = boot(r, &[]);
    let old = activate(&c);
    let slow = spawn_request(&c, "/slow?ms=20000");
    wait_in_flight(&c, 1);
    let load = start_load(&c, 2, 2);
    load.wait_answers_from(old, 50, WAIT);
    // Start a stop's drain the way systemd would, then kill the process in
    // the middle of it.
    c.exec(&["kill", "-TERM", &old.to_string()]);
    c.exec(&["kill", "-KILL", &old.to_string()]);
    let new = wait::until("a restarted main process", WAIT, || {
        let p = c.main_pid(SERVICE);
        (p != 0 && p != old).then_some(p)
    });
    load.wait_answers_from(new, 50, WAIT);
    let t = stop_load(load);
    let (held, _) = join_bounded(slow, "the slow request", Duration::from_secs(30));
    say(
        r,
        &format!(
            "{case}: {} ok, {} failed; the killed process's own /slow request: {:?}",
            t.ok,
            t.failed(),
            held.as_ref().map(|resp| resp.status)
        ),
    );
    assert!(
        held.is_err(),
        "the killed process's request cannot have succeeded"
    );
    assert_eq!(t.refused(), 0, "connections were refused: {:?}", t.examples);
    // Requests in flight on the killed process (at most one per load
    // thread) are the only ones lost.
    assert!(t.failed() <= 4, "{} failures: {:?}", t.failed(), t.examples);
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "1");
}
