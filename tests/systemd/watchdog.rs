//! The watchdog is fed across a reload.

use std::thread;
use std::time::{Duration, Instant};

use pid_server_test_support::nspawn::Container;
use pid_server_test_support::{Release, each_release};

use super::{SERVICE, activate, boot, can_run, healthz, reload_ok, timer, wait_gone};

each_release!(the_watchdog_is_fed_across_a_reload);

/// Watches the unit for `periods` watchdog periods: same MainPID, no
/// restart, active, and the watchdog timestamp keeps moving.
fn watch_watchdog(c: &Container, pid: u32, period: Duration, periods: u32) {
    let until = Instant::now() + period * periods;
    let mut pings = std::collections::BTreeSet::new();
    while Instant::now() < until {
        let show = c.systemctl_ok(&[
            "show",
            "-p",
            "MainPID",
            "-p",
            "NRestarts",
            "-p",
            "ActiveState",
            "-p",
            "SubState",
            "-p",
            "WatchdogTimestampMonotonic",
            SERVICE,
        ]);
        let get = |k: &str| {
            show.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(get("MainPID"), pid.to_string(), "{show}");
        assert_eq!(get("NRestarts"), "0", "{show}");
        assert_eq!(
            (get("ActiveState").as_str(), get("SubState").as_str()),
            ("active", "running"),
            "{show}"
        );
        pings.insert(get("WatchdogTimestampMonotonic"));
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        pings.len() as u32 >= periods,
        "the watchdog timestamp moved only {} times in {periods} periods",
        pings.len()
    );
}

fn the_watchdog_is_fed_across_a_reload(r: Release) {
    if !can_run("the_watchdog_is_fed_across_a_reload", r) {
        return;
    }
    let _timer = timer(r, "8 watchdog");
    let c = boot(r, &[("watchdog.conf", "[Service]\nWatchdogSec=2\n")]);
    let period = Duration::from_secs(2);
    let p0 = activate(&c);
    assert_eq!(c.unit_property(SERVICE, "WatchdogUSec"), "2s");
    watch_watchdog(&c, p0, period, 4);

    reload_ok(&c);
    let p1 = c.main_pid(SERVICE);
    assert_ne!(p1, p0);
    wait_gone(&c, p0, "the old generation");
    watch_watchdog(&c, p1, period, 4);
    assert_eq!(healthz(&c)["pid"], p1);
    let j = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(!j.to_lowercase().contains("watchdog timeout"), "{j}");
    assert!(j.contains("pinging the systemd watchdog"), "{j}");
}
