//! A reload applies the unit's current environment: `systemctl edit` (a
//! new `Environment=`), `daemon-reload`, then `systemctl reload`, and the
//! new generation runs with it.

use std::io::{Read, Write};
use std::net::TcpStream;

use pid_server_test_support::nspawn;

use super::{
    SERVICE, SERVICE_DROPIN_DIR, WAIT, activate, boot, healthz, local, reload_ok, timer,
    wait_journal,
};

/// The `Keep-Alive: timeout=N` a response advertises.
fn advertised_keep_alive(port: u16) -> u64 {
    let mut s = TcpStream::connect_timeout(&local(port), WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    raw.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("keep-alive")
                .then(|| v.trim().strip_prefix("timeout=")?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Keep-Alive: timeout=N in {raw:?}"))
}

#[test]
fn a_reload_applies_a_changed_environment() {
    if !nspawn::require_or_skip("a_reload_applies_a_changed_environment") {
        return;
    }
    let _timer = timer("E environment: a changed Environment= applied by a reload");
    let port = nspawn::free_port();
    let c = boot(port, &[]);
    let first = activate(&c, port);
    assert_eq!(advertised_keep_alive(port), 5);
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
    assert_eq!(healthz(port)["pid"], second);
    assert_eq!(
        advertised_keep_alive(port),
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
