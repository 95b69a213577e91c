//! A reload applies the unit's current environment: `systemctl edit` (a
//! new `Environment=`), `daemon-reload`, then `systemctl reload`, and the
//! new generation runs with it.

use pid_server_test_support::{Release, each_release};

use super::{
    SERVICE, SERVICE_DROPIN_DIR, activate, advertised_keep_alive, boot, can_run, healthz,
    reload_ok, timer, wait_journal,
};

each_release!(a_reload_applies_a_changed_environment);

fn a_reload_applies_a_changed_environment(r: Release) {
    if !can_run("a_reload_applies_a_changed_environment", r) {
        return;
    }
    let _timer = timer(
        r,
        "E environment: a changed Environment= applied by a reload",
    );
    let c = boot(r, &[]);
    let first = activate(&c);
    assert_eq!(advertised_keep_alive(&c), 5);
    // What `systemctl edit pid-server` writes.
    c.write_file(
        &format!("{SERVICE_DROPIN_DIR}/environment.conf"),
        b"[Service]\nEnvironment=PID_SERVER_KEEP_ALIVE_TIMEOUT=3\n",
        0o644,
    );
    c.systemctl_ok(&["daemon-reload"]);
    reload_ok(&c);
    let second = c.main_pid(SERVICE);
    assert_ne!(second, first);
    assert_eq!(healthz(&c)["pid"], second);
    assert_eq!(
        advertised_keep_alive(&c),
        3,
        "the new environment was not applied"
    );
    let journal = wait_journal(
        &c,
        &["-u", SERVICE, "-o", "cat"],
        "the changed variable",
        |j| {
            j.contains("the next generation gets the unit's current environment")
                && j.contains("PID_SERVER_KEEP_ALIVE_TIMEOUT")
        },
    );
    assert!(journal.contains("changed: "), "{journal}");
}
