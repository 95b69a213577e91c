//! Tests of the container harness itself (the support crate's `nspawn`),
//! on both Debian trees and, for the first, on the host's `/usr` (the
//! recipe `systemd/try.sh` and the benchmark boot); plus the first
//! end-to-end check: pid-server socket-activated by a real systemd.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use pid_server_test_support::nspawn::{self, BootOptions, Container, Recipe};
use pid_server_test_support::{Release, each_release, report, wait};

use super::{PORT, binary, boot_stopped, can_run, get};

each_release!(
    boots_installs_units_and_cleans_up,
    containers_run_side_by_side,
    serves_its_pid_through_socket_activation,
    teardown_kills_a_container_that_will_not_stop,
);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A pid is gone, a zombie (PID 1 of the machine may not reap orphans), or
/// was reused by something that is not `comm`.
fn process_gone(pid: u32, comm: &str) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    field("Name:") != comm || field("State:").starts_with('Z')
}

fn boots_installs_units_and_cleans_up(r: Release) {
    if !can_run("boots_installs_units_and_cleans_up", r) {
        return;
    }
    boots_installs_units_and_cleans_up_with(BootOptions::release(binary(), PORT, r));
}

/// The recipe with the host's `/usr` and network: no tree needed.
#[test]
fn boots_installs_units_and_cleans_up_on_the_hosts_usr() {
    if !nspawn::require_or_skip("boots_installs_units_and_cleans_up_on_the_hosts_usr") {
        return;
    }
    boots_installs_units_and_cleans_up_with(BootOptions::new(binary(), nspawn::free_port()));
}

fn boots_installs_units_and_cleans_up_with(opts: BootOptions) {
    let port = opts.port;
    let opts = opts.dropin(
        "/etc/systemd/system/pid-server.service.d/test-extra.conf",
        "[Service]\nEnvironment=PID_SERVER_HARNESS_TEST=1\n",
    );
    let t0 = Instant::now();
    let c = Container::boot(&opts);
    eprintln!("boot took {} ms", t0.elapsed().as_millis());

    let state = stdout(&c.systemctl(&["is-system-running"]));
    assert!(
        state == "running" || state == "degraded",
        "is-system-running: {state}"
    );

    // The repo's units, byte for byte, plus our port drop-in.
    for unit in ["pid-server.socket", "pid-server.service"] {
        let repo = fs::read(opts.unit_dir.join(unit)).unwrap();
        assert_eq!(
            c.read_file(&format!("/etc/systemd/system/{unit}")),
            repo,
            "{unit} differs from the repo's"
        );
    }
    let cat = c.systemctl_ok(&["cat", "pid-server.socket"]);
    assert!(
        cat.contains("# /etc/systemd/system/pid-server.socket.d/test-port.conf"),
        "{cat}"
    );
    assert!(
        cat.contains(&format!("ListenStream=127.0.0.1:{port}")),
        "{cat}"
    );
    assert_eq!(
        c.unit_property("pid-server.socket", "Listen"),
        format!("127.0.0.1:{port} (Stream)")
    );
    // The drop-in's variable beside the unit's own (the configuration
    // file, the file descriptor store's size).
    assert_eq!(
        c.unit_property("pid-server.service", "Environment"),
        "PID_SERVER_CONFIG=/etc/pid-server/pid-server.toml \
         PID_SERVER_FD_STORE_CONNECTIONS=10000 PID_SERVER_HARNESS_TEST=1"
    );

    // The binary is a writable copy, not a bind mount.
    let installed = c.host_path("/usr/bin/pid-server");
    let meta = fs::metadata(&installed).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(meta.len(), fs::metadata(binary()).unwrap().len());
    c.write_file("/usr/bin/pid-server", b"#!/bin/sh\nexit 0\n", 0o755);
    assert_eq!(c.read_file("/usr/bin/pid-server"), b"#!/bin/sh\nexit 0\n");
    assert!(
        !Path::new("/usr/bin/pid-server").exists()
            || fs::read("/usr/bin/pid-server").unwrap() != b"#!/bin/sh\nexit 0\n",
        "the write went through to the host's /usr"
    );
    c.install_binary(&binary());

    // Commands run inside, and as units of the container's systemd.
    assert_eq!(stdout(&c.exec(&["hostname"])), c.name());
    let unit_out = c.exec_as_unit(&["sh", "-c", "cat /proc/self/cgroup"]);
    assert!(
        stdout(&unit_out).contains("/system.slice/run-"),
        "{unit_out:?}"
    );
    assert!(c.journal(&["-b", "-o", "cat"]).contains("Startup finished"));

    // Its network: the host's, or a namespace of its own, with the port on
    // its loopback.
    match c.netns_path() {
        Some(ns) => {
            assert!(opts.private_network);
            assert!(ns.exists(), "{}", ns.display());
            let own = fs::read_link(format!("/proc/{}/ns/net", c.init_pid())).unwrap();
            assert_ne!(own, fs::read_link("/proc/self/ns/net").unwrap());
        }
        None => assert!(!opts.private_network),
    }

    // Drop powers it off and leaves nothing behind.
    let (nspawn_pid, init_pid) = (c.nspawn_pid(), c.init_pid());
    let paths = c.cleanup_paths();
    let temp_dir = paths
        .iter()
        .any(|p| p.to_string_lossy().starts_with("/var/tmp/nspawn-temp-"));
    // Only the host's /usr has an overlay whose upper layer is on the host;
    // a tree's `--volatile=overlay` keeps its changes in a tmpfs of nspawn's.
    match &opts.recipe {
        Recipe::HostUsr => assert!(temp_dir, "nspawn's temp dir not found: {paths:?}"),
        Recipe::Tree(_) => assert!(!temp_dir, "{paths:?}"),
    }
    for p in &paths {
        if p.starts_with("/var/tmp")
            || p.starts_with("/sys")
            || p.starts_with("/tmp")
            || p.starts_with("/run/netns")
        {
            assert!(
                p.exists(),
                "{} should exist while the container runs",
                p.display()
            );
        }
    }
    let t0 = Instant::now();
    drop(c);
    eprintln!("teardown took {} ms", t0.elapsed().as_millis());
    assert!(
        process_gone(nspawn_pid, "systemd-nspawn"),
        "nspawn {nspawn_pid} still there"
    );
    assert!(
        process_gone(init_pid, "systemd"),
        "init {init_pid} still there"
    );
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

/// Containers started side by side get their own cgroups: one's services and
/// shutdown leave the other's alone. (With `--keep-unit --register=no` alone,
/// both would use `payload/` below the test's cgroup, and stopping
/// pid-server.service in one logs "Failed to kill control group
/// /system.slice/pid-server.service ... Input/output error".)
/// Both on port 8080, each in its own network namespace.
fn containers_run_side_by_side(r: Release) {
    if !can_run("containers_run_side_by_side", r) {
        return;
    }
    if !nspawn::private_cgroups_supported() {
        report::skip(
            "containers_run_side_by_side",
            "containers cannot get cgroups of their own here",
        );
        return;
    }
    let a = boot_stopped(r, &[]);
    let b = boot_stopped(r, &[]);
    assert_eq!((a.port(), b.port()), (PORT, PORT));
    let cgroup =
        |c: &Container| fs::read_to_string(format!("/proc/{}/cgroup", c.init_pid())).unwrap();
    assert_ne!(cgroup(&a), cgroup(&b));

    for c in [&a, &b] {
        c.systemctl_ok(&["start", "pid-server.socket"]);
    }
    // Same unit running in both.
    assert_eq!(get(&a, "/").status, 200);
    assert_eq!(get(&b, "/").status, 200);
    let server_b = b.main_pid("pid-server.service");
    a.systemctl_ok(&["stop", "pid-server.service"]);
    let journal_a = a.journal(&["-u", "pid-server.service"]);
    assert!(
        !journal_a.contains("Failed to kill control group"),
        "{journal_a}"
    );
    assert_eq!(b.main_pid("pid-server.service"), server_b);

    let journald_b = b.main_pid("systemd-journald.service");
    assert_ne!(journald_b, 0);
    drop(a);
    assert_eq!(b.main_pid("systemd-journald.service"), journald_b);
    assert_eq!(b.main_pid("pid-server.service"), server_b);
    assert_eq!(get(&b, "/").status, 200);
    let state = stdout(&b.systemctl(&["is-system-running"]));
    assert!(state == "running" || state == "degraded", "{state}");
}

/// The end-to-end check: socket activation by systemd, one request.
fn serves_its_pid_through_socket_activation(r: Release) {
    if !can_run("serves_its_pid_through_socket_activation", r) {
        return;
    }
    let c = boot_stopped(r, &[]);
    c.systemctl_ok(&["start", "pid-server.socket"]);

    let resp = get(&c, "/");
    let pid = c.main_pid("pid-server.service");
    assert_ne!(pid, 0, "pid-server.service has no main pid");
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.body.trim_end(), format!("OK. Handled by PID: {pid}"));
    assert_eq!(
        c.unit_property("pid-server.service", "ActiveState"),
        "active"
    );
}

/// A container whose shutdown hangs is killed after the bound, and still
/// leaves nothing behind.
fn teardown_kills_a_container_that_will_not_stop(r: Release) {
    if !can_run("teardown_kills_a_container_that_will_not_stop", r) {
        return;
    }
    let c = boot_stopped(r, &[]);
    let out = c.exec(&[
        "systemd-run",
        "--unit=stubborn",
        "-p",
        "TimeoutStopSec=infinity",
        "sh",
        "-c",
        "trap '' TERM; touch /run/stubborn-ignores-sigterm; while :; do sleep 1; done",
    ]);
    assert!(out.status.success(), "{out:?}");
    wait::until(
        "stubborn.service active",
        std::time::Duration::from_secs(5),
        || (c.unit_property("stubborn.service", "ActiveState") == "active").then_some(()),
    );
    // Active is not enough: a SIGTERM before the shell has set its trap
    // ends it (seen on 257, which gets there sooner).
    wait::until(
        "stubborn.service to ignore SIGTERM",
        std::time::Duration::from_secs(5),
        || {
            c.host_path("/run/stubborn-ignores-sigterm")
                .exists()
                .then_some(())
        },
    );
    let (nspawn_pid, init_pid, paths) = (c.nspawn_pid(), c.init_pid(), c.cleanup_paths());
    let t0 = Instant::now();
    drop(c);
    let took = t0.elapsed();
    assert!(took >= nspawn::SHUTDOWN_TIMEOUT, "{took:?}: it did stop?");
    assert!(took < nspawn::SHUTDOWN_TIMEOUT * 2, "{took:?}");
    assert!(process_gone(nspawn_pid, "systemd-nspawn"));
    assert!(process_gone(init_pid, "systemd"));
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}
