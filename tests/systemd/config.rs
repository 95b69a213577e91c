//! The configuration file under a real systemd, with the repo's sandboxed
//! unit: the service reads `/etc/pid-server/pid-server.toml`, `systemctl
//! reload` applies a changed file and refuses a broken one with the old
//! process still serving, and a start with a broken file fails once (exit
//! 78), not in a restart loop.

use pid_server_test_support::{Release, each_release, wait};
use sha2::{Digest, Sha256};

use super::{SERVICE, WAIT, advertised_keep_alive, boot, can_run, healthz, timer};

const CONFIG: &str = "/etc/pid-server/pid-server.toml";

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

each_release!(the_sandboxed_service_reads_its_file_and_a_reload_applies_or_refuses_a_change);

fn the_sandboxed_service_reads_its_file_and_a_reload_applies_or_refuses_a_change(r: Release) {
    if !can_run(
        "the_sandboxed_service_reads_its_file_and_a_reload_applies_or_refuses_a_change",
        r,
    ) {
        return;
    }
    let _timer = timer(
        r,
        "C config file: read, applied by a reload, refused when broken",
    );
    let c = boot(r, &[]);

    // The packaged file, read through ProtectSystem=strict, DynamicUser=,
    // PrivateUsers= and the rest of the sandbox.
    let packaged = c.read_file(CONFIG);
    let h = healthz(&c);
    let first = h["pid"].as_u64().unwrap() as u32;
    assert_eq!(h["config"]["path"], CONFIG, "{h}");
    assert_eq!(h["config"]["sha256"], sha256(&packaged), "{h}");
    assert_eq!(advertised_keep_alive(&c), 5);

    // A changed file: `systemctl reload` applies it.
    let changed = b"keep_alive_timeout = 2\n";
    c.write_file(CONFIG, changed, 0o644);
    c.systemctl_ok(&["reload", SERVICE]);
    let second = c.main_pid(SERVICE);
    assert_ne!(second, first);
    let h = healthz(&c);
    assert_eq!(h["pid"], second, "{h}");
    assert_eq!(h["config"]["sha256"], sha256(changed), "{h}");
    assert_eq!(advertised_keep_alive(&c), 2);

    // A broken file: the reload fails, the old process keeps the unit.
    c.write_file(CONFIG, b"keep_alive_timeout = \"3\"\n", 0o644);
    let out = c.systemctl(&["reload", SERVICE]);
    assert!(!out.status.success(), "reload to a broken file succeeded");
    assert_eq!(c.main_pid(SERVICE), second);
    assert_eq!(healthz(&c)["config"]["sha256"], sha256(changed));
    let journal = wait::until("the new process's error in the journal", WAIT, || {
        let j = c.journal(&["-u", SERVICE, "-o", "cat"]);
        j.contains(&format!(
            "{CONFIG}:1: `keep_alive_timeout`: expected a whole number"
        ))
        .then_some(j)
    });
    // The reload failed with the new process's reason, not only its status.
    assert!(
        journal.contains(&format!(
            "could not start: {CONFIG}:1: `keep_alive_timeout`"
        )),
        "{journal}"
    );
    let check = c.exec(&["/usr/bin/pid-server", "check-config"]);
    assert_eq!(check.status.code(), Some(78));

    // A start with it fails with 78, once: no restart loop.
    let _ = c.systemctl(&["restart", SERVICE]);
    wait::until("the service to fail", WAIT, || {
        (c.unit_property(SERVICE, "ActiveState") == "failed").then_some(())
    });
    assert_eq!(c.unit_property(SERVICE, "ExecMainStatus"), "78");
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");
}
