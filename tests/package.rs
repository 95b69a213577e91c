//! The Debian package (`packaging/build-deb.sh`, cargo-deb), built once, in
//! a real Debian with systemd as PID 1, on each release (Debian 12 with
//! systemd 252, Debian 13 with 257): install, upgrade under load (a reload,
//! not a restart: every request answered 200, the PID changes, NRestarts=0)
//! across a conffile the operator changed (kept, and applied by the reload),
//! remove, purge.
//!
//! The container is the release's debootstrap tree (cached under
//! /var/cache/pid-server-tests, see the support crate's `deploy`) booted with
//! `systemd-nspawn --volatile=overlay`: dpkg works there, and the tree stays
//! pristine. It runs in a network namespace the test makes, so the package's
//! socket is tested exactly as shipped (`ListenStream=8080`, no drop-in)
//! without taking port 8080 on the host or colliding with anything else.
//! The test's clients enter that namespace.
//!
//! Environment:
//! - `PID_SERVER_TEST_DEB` and `PID_SERVER_TEST_DEB_UPGRADE`: two .debs to
//!   test (the second must have a higher version); without them the test
//!   builds both with `packaging/build-deb.sh` (a release build; needs
//!   cargo-deb).
//! - `PID_SERVER_TEST_ROOTFS_BOOKWORM`, `PID_SERVER_TEST_ROOTFS_TRIXIE`:
//!   debootstrap trees to boot instead of the cached ones.
//! - `CI=true`: a missing tool fails the test instead of skipping it.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pid_server_test_support::cmd::text;
use pid_server_test_support::netns::Netns;
use pid_server_test_support::nspawn::{self, Container, TreeOptions};
use pid_server_test_support::{
    Load, Release, TestCommand, deploy, each_release, http, report, wait,
};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The port the package's socket listens on.
const PORT: u16 = 8080;
const SERVICE: &str = "pid-server.service";
const SOCKET: &str = "pid-server.socket";
/// The configuration file the unit starts with, a conffile.
const CONFFILE: &str = "/etc/pid-server/pid-server.toml";

/// The package's port on the loopback of the test's network namespace.
fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

struct Debs {
    first: PathBuf,
    upgrade: PathBuf,
}

/// The two packages, built once per test binary. `None`: cannot build here
/// (the test skips, or fails under CI).
fn debs(test: &str) -> Option<&'static Debs> {
    static DEBS: OnceLock<Option<Debs>> = OnceLock::new();
    DEBS.get_or_init(|| {
        if let (Some(a), Some(b)) = (
            std::env::var_os("PID_SERVER_TEST_DEB"),
            std::env::var_os("PID_SERVER_TEST_DEB_UPGRADE"),
        ) {
            let (first, upgrade) = (PathBuf::from(a), PathBuf::from(b));
            assert!(first.is_file(), "PID_SERVER_TEST_DEB: {}", first.display());
            assert!(
                upgrade.is_file(),
                "PID_SERVER_TEST_DEB_UPGRADE: {}",
                upgrade.display()
            );
            return Some(Debs { first, upgrade });
        }
        if !report::require_tools(test, &[("cargo-deb", "cargo install cargo-deb --locked")]) {
            return None;
        }
        let base = env!("CARGO_PKG_VERSION");
        let first = deploy::build_deb(BIN, &format!("{base}-1~pst1"));
        let upgrade = deploy::build_deb(BIN, &format!("{base}-1~pst2"));
        Some(Debs { first, upgrade })
    })
    .as_ref()
}

/// Everything the tests need on `release`, or `false` (skipped, or a panic
/// under CI).
fn can_run(test: &str, release: Release) -> bool {
    nspawn::require_or_skip_release(test, release)
        && report::require_tools(test, &[("dpkg-deb", "dpkg")])
}

/// `env -i` with a plain PATH: dpkg and the maintainer scripts see what
/// they would see on a real machine, not the test's environment.
fn dpkg(c: &Container, args: &[&str]) -> (bool, String) {
    let mut full = vec![
        "env",
        "-i",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND=noninteractive",
        "LANG=C.UTF-8",
    ];
    full.extend_from_slice(args);
    let out = c.exec(&full);
    (out.status.success(), text(&out))
}

fn dpkg_ok(c: &Container, args: &[&str]) -> String {
    let (ok, text) = dpkg(c, args);
    assert!(
        ok,
        "`{}` failed in {}:\n{text}\n--- journal ---\n{}",
        args.join(" "),
        c.name(),
        c.journal(&["-n", "40"])
    );
    eprintln!("package test: `{}`:\n{text}", args.join(" "));
    text
}

/// `systemctl VERB UNIT`'s stdout, whatever its exit code
/// (`is-active`/`is-enabled` exit non-zero for the answers we expect too).
fn systemctl_word(c: &Container, verb: &str, unit: &str) -> String {
    String::from_utf8_lossy(&c.systemctl(&[verb, unit]).stdout)
        .trim()
        .to_string()
}

fn installed_version(c: &Container) -> Option<String> {
    let out = c.exec(&[
        "dpkg-query",
        "-W",
        "-f",
        "${Status} ${Version}",
        "pid-server",
    ]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

each_release!(
    package_installs_upgrades_by_reload_removes_and_purges,
    package_enables_units_without_a_running_systemd,
    package_upgrades_from_the_previous_release_and_back_by_reload,
);

fn package_installs_upgrades_by_reload_removes_and_purges(release: Release) {
    const TEST: &str = "package_installs_upgrades_by_reload_removes_and_purges";
    if !can_run(TEST, release) {
        return;
    }
    let Some(debs) = debs(TEST) else { return };
    let started = Instant::now();
    let (v1, v2) = (
        deploy::deb_version(&debs.first),
        deploy::deb_version(&debs.upgrade),
    );
    let newer = Command::new("dpkg")
        .args(["--compare-versions", &v2, "gt", &v1])
        .status()
        .expect("dpkg --compare-versions");
    assert!(newer.success(), "upgrade {v2} is not newer than {v1}");

    let tree = deploy::debian_tree(release);
    let ns = Netns::new();
    let nsp = ns.path();
    let c = Container::boot_tree(&TreeOptions {
        rootfs: tree,
        netns: Some(nsp.clone()),
        bind_ro: Vec::new(),
    });
    let systemd = c.systemd_version();
    assert_eq!(systemd, release.systemd(), "the {release} tree's systemd");

    // --- install ------------------------------------------------------------
    c.write_file(
        "/tmp/pid-server-1.deb",
        &fs::read(&debs.first).unwrap(),
        0o644,
    );
    c.write_file(
        "/tmp/pid-server-2.deb",
        &fs::read(&debs.upgrade).unwrap(),
        0o644,
    );
    let t = Instant::now();
    dpkg_ok(&c, &["dpkg", "-i", "/tmp/pid-server-1.deb"]);
    eprintln!(
        "package test on {release}: install took {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        installed_version(&c).as_deref(),
        Some(format!("install ok installed {v1}").as_str())
    );
    for unit in [SOCKET, SERVICE] {
        assert_eq!(systemctl_word(&c, "is-enabled", unit), "enabled", "{unit}");
        assert_eq!(systemctl_word(&c, "is-active", unit), "active", "{unit}");
    }
    let listen = c.unit_property(SOCKET, "Listen");
    assert!(
        listen.contains(":8080 (Stream)"),
        "socket listens on {listen}"
    );
    assert!(
        c.host_path("/usr/lib/systemd/system/pid-server.socket")
            .is_file(),
        "unit not in the system unit dir"
    );
    ns.run(|| http::wait_ok(local(PORT), "/readyz", Duration::from_secs(10)));
    let r = ns.run(|| http::get(local(PORT), "/")).expect("GET /");
    let pid1 = c.main_pid(SERVICE);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.pid(), Some(pid1), "{r:?} (MainPID {pid1})");
    assert_eq!(r.keep_alive, Some(5), "the packaged default: {r:?}");

    // --- the operator changes the conffile; a running process is unaffected --
    let shipped = String::from_utf8(c.read_file(CONFFILE)).expect("a UTF-8 conffile");
    let changed = format!("{shipped}\n# changed by the operator\nkeep_alive_timeout = 3\n");
    c.write_file(CONFFILE, changed.as_bytes(), 0o644);
    let r = ns.run(|| http::get(local(PORT), "/")).expect("GET /");
    assert_eq!(r.keep_alive, Some(5), "applied before any reload: {r:?}");

    // --- upgrade under load: a reload, not a restart --------------------------
    let active_since = c.unit_property(SERVICE, "ActiveEnterTimestampMonotonic");
    // Half one-shot, half keep-alive; the clients run in the namespace.
    let load = Load::to(local(PORT))
        .one_shot(2)
        .keep_alive(2)
        .pace(Duration::from_millis(1))
        .max_requests(40_000)
        .max_time(Duration::from_secs(60))
        .netns(&nsp)
        .start();
    // Traffic flows before the upgrade and goes on after it.
    load.wait_answers_from(pid1, 500, Duration::from_secs(10));
    let t = Instant::now();
    let (upgraded, upgrade_out) = dpkg(&c, &["dpkg", "-i", "/tmp/pid-server-2.deb"]);
    let upgrade_time = t.elapsed();
    let after = load.snapshot();
    load.wait_more(&after, 500, Duration::from_secs(10));
    let tally = load.finish();
    eprintln!(
        "package test on {release}: upgrade {v1} -> {v2} took {} ms:\n{upgrade_out}\nload: {}",
        upgrade_time.as_millis(),
        tally.summary()
    );
    // The old process logs its handover just after answering the helper.
    let handover = "handed over to PID ";
    // Past the bound, the assertions below show the journal.
    let mut journal = String::new();
    wait::within(Duration::from_secs(10), || {
        journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
        journal.contains(handover).then_some(())
    });
    assert!(
        upgraded,
        "dpkg -i of the upgrade failed:\n{upgrade_out}\n--- journal ---\n{journal}"
    );
    assert!(
        !upgrade_out.contains("reload after upgrade failed"),
        "the upgrade did not reload the service:\n{upgrade_out}\n--- journal ---\n{journal}"
    );
    assert_eq!(
        installed_version(&c).as_deref(),
        Some(format!("install ok installed {v2}").as_str())
    );
    let pid2 = c.main_pid(SERVICE);
    assert_ne!(pid2, pid1, "MainPID did not change:\n{journal}");
    assert_eq!(
        c.unit_property(SERVICE, "ActiveEnterTimestampMonotonic"),
        active_since,
        "the service was restarted, not reloaded:\n{journal}"
    );
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0");
    assert!(
        journal.contains(&format!("handed over to PID {pid2}")),
        "no handover to {pid2} in the journal:\n{journal}"
    );
    // dpkg kept the operator's conffile (the package's is unchanged, so
    // without a question) and the reload applied it.
    assert_eq!(
        String::from_utf8_lossy(&c.read_file(CONFFILE)),
        changed,
        "the operator's {CONFFILE} was not kept:\n{upgrade_out}"
    );
    for ext in [".dpkg-dist", ".dpkg-new", ".dpkg-old"] {
        let aside = format!("{CONFFILE}{ext}");
        assert!(!c.host_path(&aside).exists(), "{aside} after the upgrade");
    }
    let r = ns.run(|| http::get(local(PORT), "/")).expect("GET /");
    assert_eq!(
        (r.pid(), r.keep_alive),
        (Some(pid2), Some(3)),
        "the new process should run the operator's configuration: {r:?}"
    );
    // The new process runs the newly unpacked binary.
    let exe = c.exec(&["readlink", &format!("/proc/{pid2}/exe")]);
    let exe = String::from_utf8_lossy(&exe.stdout).trim().to_string();
    assert_eq!(exe, "/usr/bin/pid-server", "MainPID {pid2} runs {exe:?}");
    assert!(tally.ok > 0, "{}", tally.summary());
    assert_eq!(
        tally.failed(),
        0,
        "requests failed during the upgrade: {}\n{:#?}",
        tally.summary(),
        tally.examples
    );
    assert!(
        tally.by_pid.contains_key(&pid1) && tally.by_pid.contains_key(&pid2),
        "both generations should have answered ({pid1} then {pid2}): {}",
        tally.summary()
    );

    // --- remove: stopped, and (masked, the Debian way) disabled ----------------
    let t = Instant::now();
    dpkg_ok(&c, &["dpkg", "--remove", "pid-server"]);
    eprintln!(
        "package test on {release}: remove took {} ms",
        t.elapsed().as_millis()
    );
    for unit in [SOCKET, SERVICE] {
        assert_eq!(systemctl_word(&c, "is-active", unit), "inactive", "{unit}");
        let enabled = systemctl_word(&c, "is-enabled", unit);
        assert!(
            enabled == "masked" || enabled == "disabled" || enabled.is_empty(),
            "{unit} is {enabled:?} after remove"
        );
    }
    let gone = ns.run(|| http::get(local(PORT), "/"));
    assert!(
        gone.is_err(),
        "port 8080 still answers after remove: {gone:?}"
    );
    assert!(!c.host_path("/usr/bin/pid-server").exists());
    assert!(
        !c.host_path("/usr/lib/systemd/system/pid-server.service")
            .exists()
    );
    let procs = c.exec(&["pgrep", "-x", "pid-server"]);
    assert!(
        !procs.status.success(),
        "pid-server processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    assert_eq!(
        installed_version(&c).as_deref(),
        Some(format!("deinstall ok config-files {v2}").as_str())
    );

    // --- purge: nothing left ----------------------------------------------------
    dpkg_ok(&c, &["dpkg", "--purge", "pid-server"]);
    let _ = c.exec(&["rm", "-f", "/tmp/pid-server-1.deb", "/tmp/pid-server-2.deb"]);
    let left = c.exec(&["find", "/", "-xdev", "-name", "*pid-server*"]);
    let left = String::from_utf8_lossy(&left.stdout).trim().to_string();
    assert!(left.is_empty(), "left after purge:\n{left}");
    for unit in [SOCKET, SERVICE] {
        assert_eq!(c.unit_property(unit, "LoadState"), "not-found", "{unit}");
    }
    assert_eq!(installed_version(&c), None, "dpkg still knows pid-server");

    report::say(&format!(
        "[package] {TEST} on {release}: passed in {:.1} s (boot {} ms, upgrade by reload {} ms, \
         {} requests, {} failed)",
        started.elapsed().as_secs_f32(),
        c.boot_time().as_millis(),
        upgrade_time.as_millis(),
        tally.sent,
        tally.failed()
    ));
}

/// In a chroot-like container where systemd is not running (image builds,
/// debootstrap), the package installs, enables its units through
/// deb-systemd-helper, and starts nothing.
fn package_enables_units_without_a_running_systemd(release: Release) {
    const TEST: &str = "package_enables_units_without_a_running_systemd";
    if !can_run(TEST, release) {
        return;
    }
    let Some(debs) = debs(TEST) else { return };
    let tree = deploy::debian_tree(release);
    let ns = Netns::new();
    let name = format!("pst-{}-chroot-{}", std::process::id(), release.suite());
    let script = "set -e
        test ! -d /run/systemd/system
        dpkg -i /tmp/pid-server.deb
        echo \"socket link: $(readlink /etc/systemd/system/sockets.target.wants/pid-server.socket)\"
        echo \"service link: $(readlink /etc/systemd/system/multi-user.target.wants/pid-server.service)\"
        echo \"processes: $(pgrep -c -x pid-server || true)\"";
    let mut cmd = Command::new("systemd-nspawn");
    cmd.arg("-D")
        .arg(&tree)
        .args(["--volatile=overlay", "--register=no", "--keep-unit", "-q"])
        .arg(format!("--network-namespace-path={}", ns.path().display()))
        .arg(format!("-M{name}"))
        .arg(format!(
            "--bind-ro={}:/tmp/pid-server.deb",
            debs.first.display()
        ))
        .args([
            "--setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "sh",
            "-c",
            script,
        ])
        .env_remove("NOTIFY_SOCKET");
    let out = TestCommand::from(cmd)
        .timeout(Duration::from_secs(120))
        .output();
    let text = text(&out);
    eprintln!("package test on {release}: install without systemd:\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("socket link: /lib/systemd/system/pid-server.socket")
            || text.contains("socket link: /usr/lib/systemd/system/pid-server.socket"),
        "pid-server.socket not enabled:\n{text}"
    );
    assert!(
        text.contains("service link: /lib/systemd/system/pid-server.service")
            || text.contains("service link: /usr/lib/systemd/system/pid-server.service"),
        "pid-server.service not enabled:\n{text}"
    );
    assert!(text.contains("processes: 0"), "something started:\n{text}");
}

/// The previous release's package (`.ci/previous-release --deb`), built once.
fn previous_deb(test: &str) -> Option<PathBuf> {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let got = DEB.get_or_init(deploy::previous_deb);
    match got {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            report::cannot_run(
                test,
                &format!("cannot build the previous release's package: {e}"),
            );
            None
        }
    }
}

/// Upgrades (or downgrades) to the package at `inside` under load; asserts
/// every request succeeded, the service was reloaded (not restarted) and
/// the new MainPID runs the unpacked binary. Returns the new MainPID.
fn switch_under_load(c: &Container, nsp: &Path, inside: &str, what: &str) -> u32 {
    let old = c.main_pid(SERVICE);
    let active_since = c.unit_property(SERVICE, "ActiveEnterTimestampMonotonic");
    let load = Load::to(local(PORT))
        .one_shot(2)
        .keep_alive(2)
        .pace(Duration::from_millis(1))
        .max_requests(40_000)
        .max_time(Duration::from_secs(60))
        .netns(nsp)
        .start();
    load.wait_answers_from(old, 300, Duration::from_secs(10));
    let (ok, out) = dpkg(c, &["dpkg", "-i", inside]);
    let new = c.main_pid(SERVICE);
    let after = load.snapshot();
    load.wait_more(&after, 300, Duration::from_secs(10));
    let tally = load.finish();
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    eprintln!("package test: {what}: {}", tally.summary());
    assert!(
        ok,
        "{what}: dpkg -i failed:\n{out}\n--- journal ---\n{journal}"
    );
    assert!(
        !out.contains("reload after upgrade failed"),
        "{what}:\n{out}\n{journal}"
    );
    assert_ne!(new, old, "{what}: MainPID did not change:\n{journal}");
    assert_eq!(
        c.unit_property(SERVICE, "ActiveEnterTimestampMonotonic"),
        active_since,
        "{what}: the service was restarted, not reloaded:\n{journal}"
    );
    assert_eq!(c.unit_property(SERVICE, "NRestarts"), "0", "{what}");
    assert_eq!(
        tally.failed(),
        0,
        "{what}: {}\n{:#?}",
        tally.summary(),
        tally.examples
    );
    assert!(
        tally.by_pid.contains_key(&new),
        "{what}: {}",
        tally.summary()
    );
    new
}

fn package_upgrades_from_the_previous_release_and_back_by_reload(release: Release) {
    // Every upgrade is a reload from the release that runs to the one just
    // unpacked; a rollback (installing the previous package again) is one
    // back. Both across the handover channel's versions, twice each, on
    // Debian 12 and 13 (the previous release's package, built here, is
    // the same for both).
    const TEST: &str = "package_upgrades_from_the_previous_release_and_back_by_reload";
    if !can_run(TEST, release) {
        return;
    }
    let Some(debs) = debs(TEST) else { return };
    let Some(previous) = previous_deb(TEST) else {
        return;
    };
    let ns = Netns::new();
    let nsp = ns.path();
    let c = Container::boot_tree(&TreeOptions {
        rootfs: deploy::debian_tree(release),
        netns: Some(nsp.clone()),
        bind_ro: Vec::new(),
    });
    c.write_file("/tmp/previous.deb", &fs::read(&previous).unwrap(), 0o644);
    c.write_file("/tmp/this.deb", &fs::read(&debs.upgrade).unwrap(), 0o644);
    dpkg_ok(&c, &["dpkg", "-i", "/tmp/previous.deb"]);
    ns.run(|| http::wait_ok(local(PORT), "/readyz", Duration::from_secs(10)));
    // The previous release has no /metrics; this one has.
    let metrics = || {
        ns.run(|| http::get(local(PORT), "/metrics"))
            .map(|r| r.status)
    };
    assert_eq!(metrics().unwrap(), 404);

    let new = switch_under_load(
        &c,
        &nsp,
        "/tmp/this.deb",
        "upgrade from the previous release",
    );
    assert_eq!(metrics().unwrap(), 200, "PID {new} is not this release");
    let back = switch_under_load(
        &c,
        &nsp,
        "/tmp/previous.deb",
        "rollback to the previous release",
    );
    assert_eq!(
        metrics().unwrap(),
        404,
        "PID {back} is not the previous release"
    );
    // Upgrade again, and roll back again: the previous release passed on
    // the variables this one set for it, and this one must not take them
    // for its parent's (#23: the third reload failed).
    let again = switch_under_load(&c, &nsp, "/tmp/this.deb", "upgrade after a rollback");
    assert_eq!(metrics().unwrap(), 200, "PID {again} is not this release");
    // A restart of this release between: it starts with systemd's own
    // variables (and the file descriptor store's, #22), which a reload
    // passes on to the previous release.
    c.systemctl_ok(&["restart", SERVICE]);
    let restarted = c.main_pid(SERVICE);
    assert!(
        restarted != 0 && restarted != again,
        "MainPID {restarted} after the restart of {again}"
    );
    ns.run(|| http::wait_ok(local(PORT), "/readyz", Duration::from_secs(10)));
    let back_again = switch_under_load(
        &c,
        &nsp,
        "/tmp/previous.deb",
        "second rollback to the previous release",
    );
    assert_eq!(
        metrics().unwrap(),
        404,
        "PID {back_again} is not the previous release"
    );
    let journal = c.journal(&["-u", SERVICE, "-o", "cat"]);
    assert!(
        journal.contains("predates moving connections (handover protocol 1)"),
        "this release should have said why it drained instead of moving:\n{journal}"
    );
}
