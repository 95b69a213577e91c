//! Reloads to a broken binary fail, and the old process keeps serving.

use std::time::{Duration, Instant};

use pid_server_test_support::cmd::text;
use pid_server_test_support::report::Checks;
use pid_server_test_support::{Release, each_release, nspawn, wait};

use super::{
    NOTIFY_RELOAD_DROPIN, SERVICE, WAIT, activate, assert_no_failures, binary, boot, can_run,
    healthz, notify_reload_dropin, reload_ok, say, start_load, status, status_line, stop_load,
    timer, wait_gone, wait_state, wait_status_line,
};

/// What is wrong with the binary installed before the reload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Broken {
    /// Exits 1 at start-up.
    ExitsAtStart,
    /// Starts and never says ready (`exec sleep 1000`).
    NeverReady,
}

/// Whether `pid-server reload` (what `ExecReload=` runs, from the same path)
/// is broken too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Helper {
    /// The whole of /usr/bin/pid-server is the broken script, as an upgrade
    /// to a broken build installs it.
    AlsoBroken,
    /// The script hands `reload` to a good copy: only serving is broken.
    StillWorks,
}

/// Where the good binary goes for [`Helper::StillWorks`].
const GOOD_COPY: &str = "/usr/local/libexec/pid-server-good";

/// How the unit reloads, and so what `systemctl reload` says when the new
/// binary fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Unit {
    /// The shipped unit (`Type=notify`, `ExecReload=` runs the helper, whose
    /// exit status is the reload's): `systemctl reload` fails.
    Shipped,
    /// With the notify-reload drop-in (systemd >= 253): systemd sends
    /// SIGHUP, and the old process, taking the unit back, sends `READY=1`;
    /// systemd 257 fails such a reload only on a timeout, so `systemctl
    /// reload` succeeds and only the status line and the journal tell.
    NotifyReload,
}

/// A reload to a broken binary leaves the old process serving every
/// request throughout, the `Status:` line and the journal say why, and once
/// the good binary is back a reload works. With the shipped unit
/// `systemctl reload` fails (in bounded time); with the notify-reload
/// drop-in it reports success, and systemd's `ReloadResult` too.
pub(super) fn failed_upgrade(
    r: Release,
    case: &'static str,
    broken: Broken,
    helper: Helper,
    unit: Unit,
) {
    let _timer = timer(r, case);
    let mut dropins: Vec<(&str, &str)> = Vec::new();
    if broken == Broken::NeverReady {
        dropins.push((
            "upgrade-timeout.conf",
            "[Service]\nEnvironment=PID_SERVER_UPGRADE_TIMEOUT=2\n",
        ));
    }
    let notify_reload = notify_reload_dropin();
    if unit == Unit::NotifyReload {
        assert!(r.has_notify_reload(), "{r} has no Type=notify-reload");
        dropins.push((NOTIFY_RELOAD_DROPIN, &notify_reload));
    }
    let c = boot(r, &dropins);
    let old = activate(&c);
    let load = start_load(&c, 2, 2);
    load.wait_answers_from(old, 200, WAIT);

    let mut script = String::from("#!/bin/sh\n");
    if helper == Helper::StillWorks {
        c.copy_in(&binary(), GOOD_COPY, 0o755);
        script.push_str(&format!(
            "if [ \"$1\" = reload ]; then exec {GOOD_COPY} \"$@\"; fi\n"
        ));
    }
    let (reason, bound) = match broken {
        Broken::ExitsAtStart => {
            script.push_str("echo 'pid-server: broken build' >&2\nexit 1\n");
            ("exited with status 1", Duration::from_secs(15))
        }
        Broken::NeverReady => {
            script.push_str("exec sleep 1000\n");
            ("was not ready within 2s", Duration::from_secs(15))
        }
    };
    c.write_file(nspawn::BINARY_INSIDE, script.as_bytes(), 0o755);

    let mut checks = Checks::new(format!("{case} on {r}"));
    let t0 = Instant::now();
    let out = c.exec_timeout(&["systemctl", "--no-pager", "reload", "pid-server"], bound);
    let took = t0.elapsed();
    match &out {
        Ok(out) => {
            say(
                r,
                &format!(
                    "{case}: systemctl reload returned {} after {} ms: {:?}",
                    out.status,
                    took.as_millis(),
                    text(out).trim()
                ),
            );
            match unit {
                Unit::Shipped => checks.check(!out.status.success(), || {
                    format!("systemctl reload succeeded: {}", text(out))
                }),
                Unit::NotifyReload => checks.check(out.status.success(), || {
                    format!(
                        "systemctl reload under notify-reload did not report success \
                         (what README says an operator sees on {r}): {}",
                        text(out)
                    )
                }),
            }
        }
        Err(e) => {
            checks.check(false, || {
                format!("systemctl reload did not return within {bound:?}: {e}")
            });
            // Unblock the unit: kill the stuck ExecReload= process.
            if unit == Unit::Shipped {
                c.systemctl_ok(&["kill", "--kill-who=control", "-s", "SIGKILL", SERVICE]);
            }
        }
    }
    let reload_result = c.unit_property(SERVICE, "ReloadResult");
    let expected = match unit {
        Unit::Shipped => "exit-code",
        Unit::NotifyReload => "success",
    };
    checks.check(reload_result == expected, || {
        format!("ReloadResult={reload_result}, not {expected}")
    });
    if broken == Broken::NeverReady {
        checks.check(took >= Duration::from_secs(2), || {
            format!("the reload failed before the 2 s upgrade timeout: {took:?}")
        });
    }
    wait_state(&c, SERVICE, "active", "running");
    checks.check(c.main_pid(SERVICE) == old, || {
        "MainPID moved on a failed reload".into()
    });
    let h = healthz(&c);
    checks.check(h["pid"] == old && h["state"] == "serving", || {
        format!("the old process does not answer a new connection: {h}")
    });

    // The Status: line says the reload failed, and why.
    let st = status(&c);
    let line = status_line(&st).unwrap_or_default();
    checks.check(line.starts_with("serving 1 socket (systemd: http)"), || {
        format!("Status: line {line:?}")
    });
    checks.check(
        line.contains("last reload failed") && line.contains(reason),
        || format!("the Status: line does not say \"last reload failed: ... {reason}\": {line:?}"),
    );
    checks.check(
        st.lines()
            .any(|l| l.trim_start().starts_with("Active: active (running)")),
        || format!("not active (running):\n{st}"),
    );
    // What systemd made of it.
    let systemd_says = match unit {
        Unit::Shipped => "Reload failed for pid-server.service",
        Unit::NotifyReload => "Reloaded pid-server.service",
    };
    // Two writers: PID 1 logs its job's result as `systemctl reload`
    // returns, the helper logs the reason; either line can reach the
    // journal a moment later. Read once both are there, bounded.
    let j = c
        .journal_when(&["-u", SERVICE, "-o", "cat"], WAIT, |j| {
            let why = j
                .lines()
                .any(|l| l.contains("reload failed") && l.contains(reason));
            why && j.contains(systemd_says)
        })
        .unwrap_or_else(|last| last);
    // The journal has the reason.
    checks.check(
        j.lines()
            .any(|l| l.contains("reload failed") && l.contains(reason)),
        || format!("no \"reload failed ... {reason}\" in the journal:\n{j}"),
    );
    checks.check(j.contains(systemd_says), || {
        format!("no \"{systemd_says}\" in the journal:\n{j}")
    });
    // Whatever was started is gone again: only the server is left.
    let stuck: Option<u32> = j.lines().find_map(|l| {
        l.split("new process ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    if let Some(stuck) = stuck {
        wait_gone(&c, stuck, "the new process that failed");
    }
    wait::until("only the old process in the unit's cgroup", WAIT, || {
        (c.unit_pids(SERVICE) == vec![old]).then_some(())
    });
    // Requests keep flowing to the old process.
    let mid = load.snapshot();
    load.wait_more(&mid, 200, WAIT);
    let during = load.snapshot();
    checks.check(during.by_pid.keys().eq([&old]), || {
        format!(
            "answers from others than the old process: {:?}",
            during.by_pid
        )
    });

    // The good binary again: a reload works.
    c.install_binary(&binary());
    reload_ok(&c);
    let new = c.main_pid(SERVICE);
    assert_ne!(new, old);
    assert_eq!(healthz(&c)["pid"], new);
    wait_gone(&c, old, "the old generation");
    load.wait_answers_from(new, 200, WAIT);
    let st = wait_status_line(&c, "without the old failure", |l| {
        !l.contains("last reload failed")
    });
    assert!(
        status_line(&st)
            .unwrap()
            .starts_with("serving 1 socket (systemd: http)"),
        "{st}"
    );

    let t = stop_load(load);
    say(r, &format!("{case} load: {}", t.summary()));
    assert_no_failures(&t, 400);
    let mut expected = vec![old, new];
    expected.sort();
    assert_eq!(
        t.by_pid.keys().copied().collect::<Vec<_>>(),
        expected,
        "answered by others than the old and the new process"
    );
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");
    checks.finish();
}

each_release!(
    reload_to_a_binary_that_exits_fails_and_the_old_process_keeps_serving,
    reload_to_a_server_that_exits_at_start_fails_and_the_old_process_keeps_serving,
    reload_to_a_binary_that_never_gets_ready_times_out,
    reload_to_a_server_that_never_gets_ready_times_out,
);

/// The brief's case: /usr/bin/pid-server becomes a script that exits 1.
/// Note that `ExecReload=` runs that very script as the reload helper.
fn reload_to_a_binary_that_exits_fails_and_the_old_process_keeps_serving(r: Release) {
    if !can_run(
        "reload_to_a_binary_that_exits_fails_and_the_old_process_keeps_serving",
        r,
    ) {
        return;
    }
    failed_upgrade(
        r,
        "3a failed upgrade: binary exits 1",
        Broken::ExitsAtStart,
        Helper::AlsoBroken,
        Unit::Shipped,
    );
}

/// Only `serve` of the new binary exits 1; its `reload` works.
fn reload_to_a_server_that_exits_at_start_fails_and_the_old_process_keeps_serving(r: Release) {
    if !can_run(
        "reload_to_a_server_that_exits_at_start_fails_and_the_old_process_keeps_serving",
        r,
    ) {
        return;
    }
    failed_upgrade(
        r,
        "3b failed upgrade: serve exits 1, reload works",
        Broken::ExitsAtStart,
        Helper::StillWorks,
        Unit::Shipped,
    );
}

/// /usr/bin/pid-server becomes `exec sleep 1000`, upgrade timeout 2 s.
fn reload_to_a_binary_that_never_gets_ready_times_out(r: Release) {
    if !can_run("reload_to_a_binary_that_never_gets_ready_times_out", r) {
        return;
    }
    failed_upgrade(
        r,
        "3c failed upgrade: binary never ready",
        Broken::NeverReady,
        Helper::AlsoBroken,
        Unit::Shipped,
    );
}

/// Only `serve` of the new binary hangs; its `reload` works.
fn reload_to_a_server_that_never_gets_ready_times_out(r: Release) {
    if !can_run("reload_to_a_server_that_never_gets_ready_times_out", r) {
        return;
    }
    failed_upgrade(
        r,
        "3d failed upgrade: serve never ready, reload works",
        Broken::NeverReady,
        Helper::StillWorks,
        Unit::Shipped,
    );
}
