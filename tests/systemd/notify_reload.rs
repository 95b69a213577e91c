//! `systemctl reload` with the notify-reload drop-in
//! (`systemd/notify-reload/notify-reload.conf`: `Type=notify-reload`, no
//! `ExecReload=`): systemd sends SIGHUP, pid-server answers `RELOADING=1`,
//! and the `READY=1` of whichever process is then the main one ends the
//! reload.
//!
//! What the operator sees differs by version, and these cases pin it:
//! - systemd 257: reloads under load lose no request, as with the shipped
//!   unit; a reload to a broken binary leaves the old process serving, but
//!   `systemctl reload` exits 0 and `ReloadResult=success`: only the status
//!   line and the journal say it failed (systemd 257 fails a notify-reload
//!   reload only on its timeout, or through an `ExecReload=` as well).
//! - systemd 252 has no `Type=notify-reload`: it ignores the line and keeps
//!   `Type=notify`, and with the drop-in's empty `ExecReload=` the unit cannot
//!   reload at all (`systemctl reload` exits 3, "not applicable").

use std::time::Duration;

use pid_server_test_support::cmd::text;
use pid_server_test_support::nspawn::{self, Container};
use pid_server_test_support::{Release, each_release};

use super::failed_reload::{Broken, Helper, Unit, failed_upgrade};
use super::reload::five_reloads_under_load;
use super::{
    NOTIFY_RELOAD_DROPIN, SERVICE, activate, assert_no_failures, boot, can_run, healthz,
    notify_reload_dropin, reload, say, start_load, stop_load, timer,
};

each_release!(
    five_notify_reloads_under_load_fail_no_request,
    a_notify_reload_to_a_broken_binary_reports_success_and_the_old_process_keeps_serving,
);

/// 257: the reload case of `reload::` with the drop-in. 252: the drop-in
/// leaves a unit that cannot reload.
fn five_notify_reloads_under_load_fail_no_request(r: Release) {
    if !can_run("five_notify_reloads_under_load_fail_no_request", r) {
        return;
    }
    let case = "N1 notify-reload under load";
    let _timer = timer(r, case);
    let dropin = notify_reload_dropin();
    let c = boot(r, &[(NOTIFY_RELOAD_DROPIN, &dropin)]);
    if !r.has_notify_reload() {
        rejected(r, case, &c, false);
        return;
    }
    assert_eq!(c.unit_property(SERVICE, "Type"), "notify-reload");
    assert_eq!(c.unit_property(SERVICE, "ReloadSignal"), "1", "SIGHUP");
    five_reloads_under_load(r, case, &c);
    let j = c.journal(&["-u", SERVICE, "-o", "cat"]);
    let by_sighup = j.matches("reload (SIGHUP): started").count();
    assert_eq!(by_sighup, 5, "{j}");
    // No helper ran: the outcome line is the helper's.
    assert!(!j.contains("reloaded: "), "{j}");
    assert_eq!(c.unit_property(SERVICE, "ReloadResult"), "success");
}

/// 257: the new binary exits 1; `systemctl reload` exits 0 all the same.
/// 252: the reload is refused before anything starts.
fn a_notify_reload_to_a_broken_binary_reports_success_and_the_old_process_keeps_serving(
    r: Release,
) {
    if !can_run(
        "a_notify_reload_to_a_broken_binary_reports_success_and_the_old_process_keeps_serving",
        r,
    ) {
        return;
    }
    let case = "N2 notify-reload to a binary that exits 1";
    if r.has_notify_reload() {
        failed_upgrade(
            r,
            case,
            Broken::ExitsAtStart,
            Helper::AlsoBroken,
            Unit::NotifyReload,
        );
        return;
    }
    let _timer = timer(r, case);
    let dropin = notify_reload_dropin();
    let c = boot(r, &[(NOTIFY_RELOAD_DROPIN, &dropin)]);
    rejected(r, case, &c, true);
}

/// systemd 252 with the drop-in: the unit file's `Type=notify-reload` is
/// ignored with a warning, the unit stays `Type=notify` with no
/// `ExecReload=`, and `systemctl reload` fails at once with "not
/// applicable": nothing is started (not even a `broken` binary), the
/// server serves on, the load sees no failure.
fn rejected(r: Release, case: &str, c: &Container, broken: bool) {
    assert!(!r.has_notify_reload());
    assert_eq!(c.unit_property(SERVICE, "Type"), "notify");
    assert_eq!(c.unit_property(SERVICE, "ExecReload"), "");
    let j = c.journal(&["-b", "-o", "cat"]);
    assert!(
        j.contains("Failed to parse service type, ignoring: notify-reload"),
        "systemd {} took the drop-in's Type=:\n{j}",
        r.systemd()
    );
    let pid = activate(c);
    let load = start_load(c, 2, 2);
    load.wait_answers_from(pid, 200, super::WAIT);
    if broken {
        c.write_file(
            nspawn::BINARY_INSIDE,
            b"#!/bin/sh\necho 'pid-server: broken build' >&2\nexit 1\n",
            0o755,
        );
    }
    let (out, took) = reload(c);
    let said = text(&out);
    say(
        r,
        &format!(
            "{case}: systemctl reload returned {} after {} ms: {:?}",
            out.status,
            took.as_millis(),
            said.trim()
        ),
    );
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("not applicable"), "{said}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(c.main_pid(SERVICE), pid);
    assert_eq!(healthz(c)["generation"], 0);
    let since = load.snapshot();
    load.wait_more(&since, 200, super::WAIT);
    let t = stop_load(load);
    assert_no_failures(&t, 200);
    assert!(t.by_pid.keys().eq([&pid]), "{}", t.summary());
    let j = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(!j.contains("started /usr/bin/pid-server as PID"), "{j}");
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");
}
