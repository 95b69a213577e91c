//! The Dockerfile, built and run with podman on each base (Debian 13, the
//! default, with systemd 257; Debian 12 with 252): systemd boots as the
//! container's PID 1, pid-server.socket answers from outside, five
//! `systemctl reload pid-server` under load lose no request and change the
//! PID each time, the journal shows the handovers, and `podman stop` ends it
//! within seconds.
//!
//! On Debian 13 the container runs with `--cap-add SYS_ADMIN --cap-add
//! SYS_PTRACE --cap-add NET_ADMIN`, what README tells operators: with
//! podman's default capabilities systemd 257 refuses to start the unit's
//! by), and without NET_ADMIN it skips `PrivateNetwork=`. Debian 12 runs
//! with podman's defaults, as before, where 252 cannot make the service's
//! network namespace and carries on without (asserted, so README's table
//! stays true; it needs `--cap-add SYS_ADMIN --cap-add SYS_PTRACE` for it).
//!
//! Nothing is pulled: the base image is imported from the release's cached
//! debootstrap tree (`tar -C ROOTFS -c . | podman import - ...`, see the
//! support crate's `deploy`), and the image is built with
//! `--target runtime-prebuilt`, which copies the pid-server binary cargo
//! built for this test run instead of compiling it in a Rust image. The
//! container joins a network namespace the test makes; the test's clients
//! enter it too, so nothing is published on the host.
//!
//! Environment:
//! - `PID_SERVER_TEST_BINARY`: the binary to put in the image (default: the
//!   one cargo built for the tests).
//! - `PID_SERVER_TEST_UNIT_DIR`: units to build the image with instead of
//!   the repo's `systemd/` (to try a unit change).
//! - `PID_SERVER_TEST_PODMAN_ARGS`: extra `podman run` arguments,
//!   whitespace-separated (e.g. `--cap-add SYS_ADMIN`).
//! - `PID_SERVER_TEST_ROOTFS_BOOKWORM`, `PID_SERVER_TEST_ROOTFS_TRIXIE`:
//!   debootstrap trees instead of the cached ones.
//! - `CI=true`: a missing tool fails the test instead of skipping it.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pid_server_test_support::cmd::text;
use pid_server_test_support::netns::Netns;
use pid_server_test_support::{
    Load, Release, TestCommand, deploy, each_release, http, nspawn, repo, report, wait,
};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

const PORT: u16 = 8080;
const RELOADS: usize = 5;
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// `podman stop` must be done within this (the image's STOPSIGNAL is
/// SIGRTMIN+3, systemd's clean poweroff).
const STOP_BOUND: Duration = Duration::from_secs(5);

/// The image's port on the loopback of the test's network namespace.
fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn podman(args: &[&str]) -> Result<std::process::Output, String> {
    TestCommand::new("podman")
        .args(args)
        .timeout(PODMAN_TIMEOUT)
        .try_output()
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "`podman {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A podman image, removed on drop.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        match podman(&["rmi", "-f", &self.0]) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("image test: podman rmi {}: {}", self.0, text(&o)),
            Err(e) => eprintln!("image test: {e}"),
        }
    }
}

/// A podman container, removed (killed if running) on drop. On a panic its
/// journal is printed first.
struct Ctr(String);

impl Ctr {
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["exec", self.0.as_str()];
        full.extend_from_slice(args);
        podman(&full).unwrap_or_else(|e| panic!("{e}"))
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "`podman exec {} {}` failed ({}):\n{}\n--- journal ---\n{}",
            self.0,
            args.join(" "),
            out.status,
            text(&out),
            self.journal(&["-n", "40"])
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self, args: &[&str]) -> String {
        let mut full = vec!["journalctl", "--no-pager"];
        full.extend_from_slice(args);
        text(&self.exec(&full))
    }

    fn main_pid(&self) -> u32 {
        let out = self.exec_ok(&[
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "pid-server.service",
        ]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("MainPID {out:?}: {e}"))
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        if thread::panicking()
            && let Ok(o) = podman(&["exec", &self.0, "journalctl", "--no-pager", "-n", "80"])
        {
            eprintln!(
                "--- journal of {} (test panicked) ---\n{}",
                self.0,
                text(&o)
            );
        }
        match podman(&["rm", "-f", "-t", "0", &self.0]) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("image test: podman rm {}: {}", self.0, text(&o)),
            Err(e) => eprintln!("image test: {e}"),
        }
    }
}

/// Whether `name` is a container, image or build context this test made
/// (`...<pid>-<millis>`) in a process that is gone.
fn dead_owner(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("pst-img-")
        .or_else(|| name.strip_prefix("pid-server-image-"))
        .or_else(|| name.strip_prefix("localhost/pid-server-test-base:"))
        .or_else(|| name.strip_prefix("localhost/pid-server-test:"))
    else {
        return false;
    };
    rest.split('-')
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes containers, images and build contexts of earlier runs whose test
/// process died before its guards ran (SIGKILL); those of live runs are left
/// alone.
fn sweep_stale() {
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead_owner(&name) {
            eprintln!("image test: removing stale build context {name}");
            let _ = fs::remove_dir_all(e.path());
        }
    }
    if let Ok(out) = podman(&["ps", "-a", "--format", "{{.Names}}"]) {
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            if dead_owner(name.trim()) {
                eprintln!("image test: removing stale container {name}");
                let _ = podman(&["rm", "-f", "-t", "0", name.trim()]);
            }
        }
    }
    if let Ok(out) = podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]) {
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            if dead_owner(name.trim()) {
                eprintln!("image test: removing stale image {name}");
                let _ = podman(&["rmi", "-f", name.trim()]);
            }
        }
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy(src: &Path, dst: &Path) {
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
}

/// The build context: the Dockerfile and .dockerignore, the units, the
/// configuration file, and the binary where `--target runtime-prebuilt`
/// expects it.
fn make_context(dir: &Path) {
    let repo = repo();
    copy(&repo.join("Dockerfile"), &dir.join("Dockerfile"));
    copy(&repo.join(".dockerignore"), &dir.join(".dockerignore"));
    let units = std::env::var_os("PID_SERVER_TEST_UNIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("systemd"));
    for unit in ["pid-server.service", "pid-server.socket"] {
        copy(&units.join(unit), &dir.join("systemd").join(unit));
    }
    // The configuration file the unit names (`PID_SERVER_CONFIG`).
    let conf = "packaging/pid-server.toml";
    copy(&repo.join(conf), &dir.join(conf));
    let binary = std::env::var_os("PID_SERVER_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN));
    copy(&binary, &dir.join("target/release/pid-server"));
}

/// What `podman run` needs besides the defaults for systemd in the image to
/// apply the unit's sandbox as shipped: nothing on Debian 12; on Debian 13,
/// systemd 257 makes the mount namespace before the user namespace for a
/// system service, which needs CAP_SYS_ADMIN, its user-namespace helper
/// reads `/proc/<pid>/uid_map` under `ProtectProc=invisible`, which needs
/// CAP_SYS_PTRACE (without either the service does not start), and it
/// makes the `PrivateNetwork=` namespace only with CAP_NET_ADMIN (without,
/// the service shares the container's, and the journal says so).
fn podman_caps(release: Release) -> &'static [&'static str] {
    match release {
        Release::Bookworm => &[],
        Release::Trixie => &[
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "SYS_PTRACE",
            "--cap-add",
            "NET_ADMIN",
        ],
    }
}

/// Whether the service gets its own network namespace with [`podman_caps`]:
/// on Debian 12 with podman's defaults, 252 logs `PrivateNetwork=yes is
/// configured, but network namespace setup failed, ignoring: Operation not
/// permitted` (it would need CAP_SYS_ADMIN, which in turn needs
/// CAP_SYS_PTRACE, as on 257); on Debian 13 NET_ADMIN gives it one.
fn private_network_applied(release: Release) -> bool {
    match release {
        Release::Bookworm => false,
        Release::Trixie => true,
    }
}

each_release!(image_boots_systemd_reloads_under_load_and_stops);

fn image_boots_systemd_reloads_under_load_and_stops(release: Release) {
    const TEST: &str = "image_boots_systemd_reloads_under_load_and_stops";
    if !nspawn::require_or_skip_release(TEST, release) {
        return;
    }
    let tools = [
        ("podman", "apt-get install podman"),
        ("runc", "apt-get install runc"),
        ("bash", "bash"),
        ("tar", "tar"),
    ];
    if !report::require_tools(TEST, &tools) {
        return;
    }
    sweep_stale();
    let started = Instant::now();
    // Both releases' tests run in one process, perhaps in the same ms.
    let id = format!(
        "{}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() % 100_000_000)
            .unwrap_or(0),
        release.suite()
    );

    // --- the base image, from the release's Debian tree -------------------------
    let tree = deploy::debian_tree(release);
    let t = Instant::now();
    let base = Image(format!("localhost/pid-server-test-base:{id}"));
    let mut import = Command::new("bash");
    import
        .args([
            "-c",
            "set -euo pipefail; tar -C \"$1\" -c . | podman import - \"$2\"",
            "import",
        ])
        .arg(&tree)
        .arg(&base.0);
    let out = TestCommand::from(import).timeout(PODMAN_TIMEOUT).output();
    assert!(out.status.success(), "import: {}", text(&out));
    let import_time = t.elapsed();

    // --- build: --target runtime-prebuilt --------------------------------------
    let ctx = TempDir(std::env::temp_dir().join(format!("pid-server-image-{id}")));
    make_context(&ctx.0);
    let t = Instant::now();
    let image = Image(format!("localhost/pid-server-test:{id}"));
    let base_arg = format!("BASE_IMAGE={}", base.0);
    // RUST_IMAGE too, so nothing is pulled even if a podman builds the
    // skipped build stage.
    let rust_arg = format!("RUST_IMAGE={}", base.0);
    let ctx_path = ctx.0.to_string_lossy().into_owned();
    let build_out = podman_ok(&[
        "build",
        "--runtime",
        "runc",
        "--network=none",
        "--layers=false",
        "--target",
        "runtime-prebuilt",
        "--build-arg",
        &base_arg,
        "--build-arg",
        &rust_arg,
        "-t",
        &image.0,
        &ctx_path,
    ]);
    let build_time = t.elapsed();
    eprintln!("image test: build:\n{build_out}");
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", &image.0])
        .trim()
        .parse()
        .expect("image size");
    let config = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.StopSignal}} {{.Config.Cmd}} {{.Config.ExposedPorts}}",
        &image.0,
    ]);
    assert!(
        config.contains("SIGRTMIN+3") && config.contains("8080"),
        "image config: {config}"
    );

    // --- run: systemd as PID 1 --------------------------------------------------
    let ns = Netns::new();
    let nsp = ns.path();
    let net = format!("ns:{}", nsp.display());
    let name = format!("pst-img-{id}");
    let extra = std::env::var("PID_SERVER_TEST_PODMAN_ARGS").unwrap_or_default();
    let mut run = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--runtime",
        "runc",
        "--systemd=always",
        "--network",
        &net,
        // podman's default open-file limit needs a capability this kind of
        // machine lacks.
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
    ];
    run.extend(podman_caps(release));
    run.extend(extra.split_whitespace());
    run.push(&image.0);
    let t = Instant::now();
    podman_ok(&run);
    let ctr = Ctr(name);
    let mut state = String::new();
    // Past the bound, the assertion below shows the state.
    wait::within(Duration::from_secs(30), || {
        state = String::from_utf8_lossy(&ctr.exec(&["systemctl", "is-system-running"]).stdout)
            .trim()
            .to_string();
        (state == "running" || state == "degraded").then_some(())
    });
    let boot_time = t.elapsed();
    assert_eq!(
        state,
        "running",
        "systemd in the container: {state}\n{}",
        text(&ctr.exec(&["systemctl", "--failed", "--no-pager"]))
    );
    assert_eq!(
        ctr.exec_ok(&["systemctl", "is-enabled", "pid-server.socket"])
            .trim(),
        "enabled"
    );
    let version = ctr.exec_ok(&["systemctl", "--version"]);
    assert!(
        version.starts_with(&format!("systemd {} ", release.systemd())),
        "not {release}'s systemd: {version}"
    );

    // --- GET / from outside the container ---------------------------------------
    ns.run(|| http::wait_ok(local(PORT), "/readyz", Duration::from_secs(10)));
    let r = ns.run(|| http::get(local(PORT), "/")).expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    let mut pids = vec![ctr.main_pid()];
    assert_eq!(r.pid(), Some(pids[0]), "{r:?}");
    // Whether PrivateNetwork= is applied: the service's namespace is not
    // PID 1's (with the capabilities above; extra ones may change it).
    let netns = |pid: u32| {
        ctr.exec_ok(&["readlink", &format!("/proc/{pid}/ns/net")])
            .trim()
            .to_string()
    };
    let own_netns = netns(pids[0]) != netns(1);
    let j = ctr.journal(&["-u", "pid-server", "-o", "cat"]);
    report::say(&format!(
        "[image] on {release}: PrivateNetwork= {}",
        if own_netns { "applied" } else { "not applied" }
    ));
    if extra.trim().is_empty() {
        assert_eq!(
            own_netns,
            private_network_applied(release),
            "PrivateNetwork= under podman on {release}:\n{j}"
        );
        assert_eq!(
            j.contains("PrivateNetwork=yes is configured, but"),
            !own_netns,
            "{j}"
        );
    }

    // --- five reloads under load ----------------------------------------------
    // Half one-shot, half keep-alive; the clients run in the namespace.
    let load = Load::to(local(PORT))
        .one_shot(2)
        .keep_alive(2)
        .pace(Duration::from_millis(1))
        .max_requests(60_000)
        .max_time(Duration::from_secs(90))
        .netns(&nsp)
        .start();
    // Traffic reaches each generation before the next reload.
    load.wait_answers_from(pids[0], 300, Duration::from_secs(10));
    let mut reload_times = Vec::new();
    for i in 1..=RELOADS {
        let t = Instant::now();
        let out = ctr.exec(&["systemctl", "reload", "pid-server"]);
        reload_times.push(t.elapsed().as_millis());
        assert!(
            out.status.success(),
            "reload {i} failed ({}):\n{}\n--- journal ---\n{}",
            out.status,
            text(&out),
            ctr.journal(&["-u", "pid-server", "-o", "cat", "-n", "30"])
        );
        let pid = ctr.main_pid();
        assert!(
            !pids.contains(&pid),
            "reload {i}: MainPID {pid} is not new (had {pids:?})"
        );
        pids.push(pid);
        load.wait_answers_from(pid, 300, Duration::from_secs(10));
    }
    let tally = load.finish();
    eprintln!(
        "image test on {release}: reloads took {reload_times:?} ms; PIDs {pids:?}\nload: {}",
        tally.summary()
    );
    assert!(tally.ok > 0, "{}", tally.summary());
    assert_eq!(
        tally.failed(),
        0,
        "requests failed during the reloads: {}\n{:#?}",
        tally.summary(),
        tally.examples
    );
    for pid in &pids {
        assert!(
            tally.by_pid.contains_key(pid),
            "generation {pid} answered nothing: {}",
            tally.summary()
        );
    }

    // --- the journal shows every handover --------------------------------------
    // Past the bound, the assertions below say which handover is missing.
    let mut journal = String::new();
    wait::within(Duration::from_secs(10), || {
        journal = ctr.journal(&["-u", "pid-server", "-o", "cat"]);
        pids[1..]
            .iter()
            .all(|p| journal.contains(&format!("handed over to PID {p}")))
            .then_some(())
    });
    for p in &pids[1..] {
        assert!(
            journal.contains(&format!("handed over to PID {p}")),
            "no \"handed over to PID {p}\" in journalctl -u pid-server:\n{journal}"
        );
    }

    // --- podman stop: a clean systemd shutdown within seconds --------------------
    let t = Instant::now();
    podman_ok(&["stop", "-t", "10", &ctr.0]);
    let stop_time = t.elapsed();
    let status = podman_ok(&["inspect", "--format", "{{.State.Status}}", &ctr.0]);
    assert_eq!(status.trim(), "exited");
    assert!(
        stop_time < STOP_BOUND,
        "podman stop took {:.1} s",
        stop_time.as_secs_f32()
    );
    drop(ctr);
    drop(image);
    drop(base);
    drop(ctx);
    drop(ns);

    report::say(&format!(
        "[image] {TEST} on {release}: passed in {:.1} s wall: import {:.1} s, build {:.1} s, \
         boot to running {} ms, reloads {reload_times:?} ms, {} requests, {} failed, stop {} ms; \
         image size {:.1} MB ({size} bytes)",
        started.elapsed().as_secs_f32(),
        import_time.as_secs_f32(),
        build_time.as_secs_f32(),
        boot_time.as_millis(),
        tally.sent,
        tally.failed(),
        stop_time.as_millis(),
        size as f64 / 1e6
    ));
}
