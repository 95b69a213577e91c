//! Test harness: a real systemd booted as PID 1 in a `systemd-nspawn`
//! container, with pid-server's units installed: Debian 12's systemd 252 or
//! Debian 13's 257 from a debootstrap tree ([`crate::deploy::Release`]), or
//! the host's own.
//!
//! Start every test with `if !nspawn::require_or_skip("name") { return; }`
//! (or [`require_or_skip_release`] for a tree). `boot` (the boot recipes),
//! `cleanup` (teardown, cgroups, leftovers of dead test binaries) hold the
//! plumbing; this module the container's API.
//!
//! # How a container is made
//!
//! Two recipes ([`Recipe`]), the same otherwise:
//!
//! - **A Debian tree** (the systemd suite, per release):
//!   `systemd-nspawn -D TREE --volatile=overlay --register=no --keep-unit -b`.
//!   Every change goes to a tmpfs over the tree, which stays pristine.
//!   Measured here, a bookworm tree boots to `running` in 0.8–0.9 s and the
//!   host's `/usr` in 1.0–1.5 s (the same systemd 252.39, machine loaded);
//!   trixie's 257 in 1.1–1.4 s.
//! - **The host's `/usr`** (no tree needed: `systemd/try.sh`, the
//!   benchmark): `systemd-nspawn -D / --volatile=yes --overlay=/usr::/usr
//!   --register=no --keep-unit -b`: the root is a fresh tmpfs, `/usr` is
//!   the host's with a throw-away writable layer (so `/usr/bin/pid-server`
//!   can be replaced while it runs). A preset file containing `disable *`
//!   keeps the empty `/etc` (a "first boot") from enabling the host's
//!   services.
//!
//! The socket is moved to `127.0.0.1:PORT` by a drop-in. With
//! [`BootOptions::private_network`] the container gets a network namespace
//! of its own ([`crate::netns::Netns`], deleted with it) and the test's
//! clients enter it ([`Container::in_netns`], [`Container::netns_path`]
//! for the load); without, it shares the host's and the test talks to the
//! port directly. A container in its own namespace gets
//! `--capability=CAP_NET_ADMIN`: systemd 257 applies `PrivateNetwork=` only
//! with it ("…we lack privileges for network namespace, proceeding
//! without", and the service shares the container's namespace), 252 sets
//! up the service's loopback with it instead of warning. The capability
//! reaches no further than the namespace the test made.
//!
//! `--register=no --keep-unit` means nspawn neither talks to machined nor
//! creates a scope unit: it creates `payload/` and `supervisor/` cgroups right
//! below the cgroup it was started in. Two containers started from the same
//! cgroup would then share `payload/`, and each container's systemd would
//! manage (and kill) the other's units. So every nspawn is first moved into a
//! cgroup of its own, `pid-server-tests/<machine name>`, in each systemd
//! hierarchy (`name=systemd` and `unified` on a hybrid host; the v2 root on a
//! unified one). Where that fails, containers are run one at a time.
//!
//! # Nothing outlives the tests
//!
//! - `Drop` (which also runs when a test panics) sends SIGTERM to nspawn (a
//!   clean poweroff of the container), waits up to 5 s, then SIGKILLs the
//!   container's init (which kills its whole PID namespace) and nspawn, reaps
//!   nspawn, kills whatever is left in the container's cgroups, and removes
//!   the cgroups, `/var/tmp/nspawn-temp-*` of this container,
//!   `/run/systemd/nspawn/propagate/<name>` and the harness's state dir.
//! - nspawn is started with `PR_SET_PDEATHSIG(SIGTERM)` from a spawner thread
//!   that lives as long as the test binary, so if the test binary dies
//!   (SIGKILL, abort, Ctrl-C) nspawn gets SIGTERM and powers the container off.
//!   (A parent-death signal fires when the *thread* that forked exits; that is
//!   why nspawn is not forked from the test's own thread.)
//! - Leftovers of test binaries that died anyway (state dirs under
//!   `$TMPDIR/pid-server-nspawn/` whose owning pid is gone) are swept before
//!   the first boot of each test binary.
//!
//! nspawn is also put in its own process group, so a Ctrl-C in the terminal
//! reaches the test binary only (and nspawn then gets its parent-death signal).

mod boot;
mod cleanup;

pub use cleanup::{SERIAL_WAIT, private_cgroups_supported};

use crate::deploy::{self, Release};
use crate::netns::Netns;

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::cmd::{TestCommand, text};
use crate::report;

/// How long `boot` waits for `systemctl is-system-running` to settle.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Drop` waits for a clean poweroff before it kills.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on any single command run inside the container by `exec` and friends.
/// Longer than the service's `TimeoutStopSec=45`, so a slow `systemctl stop`
/// still returns.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the container's units go.
pub const UNIT_DIR_INSIDE: &str = "/etc/systemd/system";
/// Where the binary goes (the units' `ExecStart=`).
pub const BINARY_INSIDE: &str = "/usr/bin/pid-server";
/// The port drop-in, relative to the container's root.
pub const PORT_DROPIN_INSIDE: &str = "/etc/systemd/system/pid-server.socket.d/test-port.conf";

const CGROUP_GROUP: &str = "pid-server-tests";
const STATE_DIR_NAME: &str = "pid-server-nspawn";
const NAME_PREFIX: &str = "pst";

// ---------------------------------------------------------------------------
// Support checks
// ---------------------------------------------------------------------------

/// Whether this machine can run the container tests: root, `systemd-nspawn`,
/// `nsenter`, and a systemd in the host's `/usr` (the container boots it).
pub fn container_support() -> Result<(), String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the tests boot containers; run them as root)".to_string());
    }
    for tool in ["systemd-nspawn", "nsenter"] {
        if report::find_in_path(tool).is_none() {
            missing.push(format!(
                "`{tool}` in PATH (apt-get install systemd-container util-linux)"
            ));
        }
    }
    if !Path::new("/usr/lib/systemd/systemd").exists()
        && !Path::new("/lib/systemd/systemd").exists()
    {
        missing.push("systemd in the host's /usr (/usr/lib/systemd/systemd)".to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing: {}", missing.join("; ")))
    }
}

/// `true` when the container tests can run. Otherwise: under CI (`CI=true`)
/// panics naming what is missing, elsewhere prints `SKIPPED <test>: <reason>`
/// to stderr and returns `false`.
pub fn require_or_skip(test: &str) -> bool {
    match container_support() {
        Ok(()) => true,
        Err(reason) => {
            report::cannot_run(test, &reason);
            false
        }
    }
}

/// Like [`require_or_skip`], for a container booted from `release`'s tree
/// in a network namespace of its own: also `ip`, and debootstrap when the
/// tree is neither cached nor named. The skip names the release.
pub fn require_or_skip_release(test: &str, release: Release) -> bool {
    let test = format!("{test} on {release}");
    if !require_or_skip(&test) {
        return false;
    }
    let mut tools = vec![("ip", "apt-get install iproute2")];
    tools.extend(deploy::tree_tools(release));
    report::require_tools(&test, &tools)
}

// ---------------------------------------------------------------------------
// Boot options
// ---------------------------------------------------------------------------

/// What the container's `/` is.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    /// A fresh tmpfs with the host's `/usr` over it: the host's systemd.
    HostUsr,
    /// A debootstrap tree (`-D TREE --volatile=overlay`): its own systemd.
    Tree(PathBuf),
}

#[derive(Clone, Debug)]
pub struct BootOptions {
    /// The pid-server binary; copied (not bound) to `/usr/bin/pid-server`, so
    /// tests can replace it.
    pub binary: PathBuf,
    /// A folder whose `*.socket` and `*.service` files are copied, unchanged,
    /// to `/etc/systemd/system/` (normally the repo's `systemd/`).
    pub unit_dir: PathBuf,
    /// Loopback port: `pid-server.socket` is moved to `127.0.0.1:PORT` by a
    /// drop-in (`/etc/systemd/system/pid-server.socket.d/test-port.conf`).
    pub port: u16,
    /// More files to write before `daemon-reload`: (absolute path inside the
    /// container, contents), mode 0644.
    pub extra_dropins: Vec<(String, String)>,
    /// The container's `/` (default: the host's `/usr`).
    pub recipe: Recipe,
    /// Boot in a network namespace of the container's own (see the module
    /// docs); default: the host's network.
    pub private_network: bool,
}

impl BootOptions {
    /// The repo's `systemd/` units, no extra drop-ins, the host's `/usr`
    /// and network.
    pub fn new(binary: impl Into<PathBuf>, port: u16) -> Self {
        BootOptions {
            binary: binary.into(),
            unit_dir: repo_unit_dir(),
            port,
            extra_dropins: Vec::new(),
            recipe: Recipe::HostUsr,
            private_network: false,
        }
    }

    /// `release`'s debootstrap tree (made on first use), in a network
    /// namespace of its own: what the systemd suite boots.
    pub fn release(binary: impl Into<PathBuf>, port: u16, release: Release) -> Self {
        let mut o = BootOptions::new(binary, port);
        o.recipe = Recipe::Tree(deploy::debian_tree(release));
        o.private_network = true;
        o
    }

    /// Adds a file (usually a drop-in) written before `daemon-reload`.
    pub fn dropin(mut self, path_inside: &str, contents: &str) -> Self {
        self.extra_dropins
            .push((path_inside.to_string(), contents.to_string()));
        self
    }
}

/// The repo's `systemd/` folder.
pub fn repo_unit_dir() -> PathBuf {
    crate::repo().join("systemd")
}

/// A loopback port that was free a moment ago ([`crate::proc::free_addr`]:
/// below the ephemeral range, never the same twice in one process). The
/// container shares the host's network, so each container in a test run
/// needs its own.
pub fn free_port() -> u16 {
    crate::proc::free_addr().port()
}

// ---------------------------------------------------------------------------
// Container
// ---------------------------------------------------------------------------

pub struct Container {
    name: String,
    nspawn: Option<Child>,
    nspawn_pid: u32,
    /// The container's PID 1 (as seen from the host), 0 until found.
    init: u32,
    port: u16,
    /// Host-side: console log, preset file, record of the temp dir.
    state_dir: PathBuf,
    /// `.../pid-server-tests/<name>` in each hierarchy nspawn was moved into.
    cgroups: Vec<PathBuf>,
    /// nspawn's `/var/tmp/nspawn-temp-*` (holds the `/usr` overlay's upper layer).
    temp_dir: Option<PathBuf>,
    boot_time: Duration,
    torn_down: bool,
    /// Held when containers have to run one at a time (no private cgroup).
    _serial: Option<MutexGuard<'static, ()>>,
    /// The network namespace the container runs in, when it has its own;
    /// deleted after the teardown (fields drop after `Drop::drop`).
    netns: Option<Netns>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How to boot a Debian tree made by debootstrap with [`Container::boot_tree`].
#[derive(Clone, Debug)]
pub struct TreeOptions {
    /// The tree. It stays pristine: `--volatile=overlay` puts every change
    /// in a tmpfs that goes with the container.
    pub rootfs: PathBuf,
    /// `--network-namespace-path=`: a namespace the test made (`ip netns add`,
    /// with `lo` up) so the container's ports are its own. `None` shares the
    /// host's network. With a namespace the container also gets
    /// `--capability=CAP_NET_ADMIN` (see the module docs).
    pub netns: Option<PathBuf>,
    /// `--bind-ro=HOST:INSIDE` mounts.
    pub bind_ro: Vec<(PathBuf, String)>,
}

impl Container {
    /// The machine (and host) name of the container.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The systemd-nspawn process (host pid).
    pub fn nspawn_pid(&self) -> u32 {
        self.nspawn_pid
    }
    /// The container's PID 1 (host pid).
    pub fn init_pid(&self) -> u32 {
        self.init
    }
    /// The loopback port the socket was moved to.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `127.0.0.1:PORT`: the socket, on the loopback of the container's
    /// network namespace (the host's, or its own: see [`Container::in_netns`]).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
    /// `/run/netns/NAME` when the container has a network namespace of its
    /// own (for [`crate::Load`]'s `netns`), else `None`.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_ref().map(Netns::path)
    }
    /// Runs `f` where the container's port is reachable: on a thread in its
    /// network namespace when it has its own, else right here.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match &self.netns {
            Some(ns) => ns.run(f),
            None => f(),
        }
    }
    /// The major version of the container's systemd (`systemctl --version`'s
    /// first line, `systemd 257 (257.13-1~deb13u1)`).
    pub fn systemd_version(&self) -> u32 {
        let out = self.systemctl_ok(&["--version"]);
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("systemctl --version: {out:?}"))
    }
    /// From spawning nspawn to units installed and `daemon-reload` done.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }
    /// The container's `/` as a host path (`/proc/INIT/root`). Absolute
    /// symlinks inside resolve against the host's root when followed from here.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init))
    }
    /// A path inside the container as a host path.
    pub fn host_path(&self, path_inside: &str) -> PathBuf {
        self.root().join(path_inside.trim_start_matches('/'))
    }
    /// Host paths that exist while the container runs and must be gone once
    /// it is dropped (cgroups, nspawn's temp dir, the harness's state dir).
    pub fn cleanup_paths(&self) -> Vec<PathBuf> {
        let mut v = self.cgroups.clone();
        v.extend(self.temp_dir.clone());
        v.push(self.state_dir.clone());
        v.push(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
        v.extend(self.netns_path());
        v
    }
    /// What the container wrote to its console so far (nspawn's output too).
    pub fn console_log(&self) -> String {
        fs::read(self.state_dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs a command in all of the container's namespaces
    /// (`nsenter -t INIT -a ARGS`). It keeps the host's capabilities and is
    /// not in a unit's cgroup; see [`Container::exec_as_unit`]. Panics if it
    /// cannot be started or takes longer than [`EXEC_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, EXEC_TIMEOUT)
            .unwrap_or_else(|e| panic!("in {}: {e}", self.name))
    }

    /// Like [`Container::exec`], with a caller-chosen bound and no panic.
    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output, String> {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init.to_string())
            .arg("-a")
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_LESS", "");
        TestCommand::from(cmd).timeout(timeout).try_output()
    }

    /// Runs a command as a transient unit of the container's systemd
    /// (`systemd-run --wait --pipe -q --collect ARGS`): in its cgroups, with
    /// its view of the system.
    pub fn exec_as_unit(&self, args: &[&str]) -> Output {
        let mut full = vec!["systemd-run", "--wait", "--pipe", "-q", "--collect"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// `systemctl ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["systemctl", "--no-pager"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// `systemctl ARGS` inside; panics with its output unless it succeeds.
    /// Returns stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        if !out.status.success() {
            panic!(
                "`systemctl {}` in {} failed ({}):\n{}\n--- journal ---\n{}",
                args.join(" "),
                self.name,
                out.status,
                text(&out),
                self.journal(&["-n", "60"])
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `journalctl --no-pager ARGS` inside; stdout (plus stderr if it failed).
    pub fn journal(&self, args: &[&str]) -> String {
        let mut full = vec!["journalctl", "--no-pager"];
        full.extend_from_slice(args);
        let out = self.exec(&full);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            text(&out)
        }
    }

    /// Writes a file inside the container atomically (temp file in the same
    /// folder, then rename), creating parent folders. Replacing
    /// `/usr/bin/pid-server` while it runs works: the running process keeps
    /// the old inode.
    pub fn write_file(&self, path_inside: &str, contents: &[u8], mode: u32) {
        self.place_file(path_inside, mode, |tmp| fs::write(tmp, contents));
    }

    /// Reads a file inside the container.
    pub fn read_file(&self, path_inside: &str) -> Vec<u8> {
        let p = self.host_path(path_inside);
        fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    /// Copies a binary to `/usr/bin/pid-server` (atomically, mode 0755).
    pub fn install_binary(&self, src: &Path) {
        self.place_file(BINARY_INSIDE, 0o755, |tmp| fs::copy(src, tmp).map(drop));
    }

    /// Copies a host file to `path_inside` (atomically, with `mode`).
    pub fn copy_in(&self, src: &Path, path_inside: &str, mode: u32) {
        self.place_file(path_inside, mode, |tmp| fs::copy(src, tmp).map(drop));
    }

    /// `systemctl show -p MainPID --value UNIT` (0 when it has none), a pid
    /// in the container's PID namespace.
    pub fn main_pid(&self, unit: &str) -> u32 {
        let out = self.systemctl_ok(&["show", "-p", "MainPID", "--value", unit]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("MainPID of {unit}: {out:?}: {e}"))
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn unit_property(&self, unit: &str, prop: &str) -> String {
        self.systemctl_ok(&["show", "-p", prop, "--value", unit])
            .trim()
            .to_string()
    }

    /// `(ActiveState, SubState)` of `unit`.
    pub fn unit_state(&self, unit: &str) -> (String, String) {
        (
            self.unit_property(unit, "ActiveState"),
            self.unit_property(unit, "SubState"),
        )
    }

    /// Polls until `unit` is `active` (`sub`); panics after `bound`.
    pub fn wait_unit_state(&self, unit: &str, active: &str, sub: &str, bound: Duration) {
        let mut last = (String::new(), String::new());
        crate::wait::within(bound, || {
            last = self.unit_state(unit);
            (last.0 == active && last.1 == sub).then_some(())
        })
        .unwrap_or_else(|| panic!("{unit}: waited {bound:?} for {active} ({sub}); still {last:?}"));
    }

    /// The processes in `unit`'s cgroup (PIDs in the container), sorted.
    pub fn unit_pids(&self, unit: &str) -> Vec<u32> {
        let cg = self.unit_property(unit, "ControlGroup");
        assert!(cg.starts_with('/'), "ControlGroup={cg:?}");
        let out = self.exec(&[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/systemd\"$1\"/cgroup.procs 2>/dev/null \
             || cat /sys/fs/cgroup\"$1\"/cgroup.procs",
            "sh",
            &cg,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.sort();
        pids
    }

    /// Whether a process of the container (a PID in its namespace) has not
    /// exited: its `/proc` entry exists and it is not a zombie.
    pub fn process_alive(&self, pid: u32) -> bool {
        match fs::read_to_string(self.host_path(&format!("/proc/{pid}/status"))) {
            Ok(s) => !s
                .lines()
                .any(|l| l.starts_with("State:") && l.contains("Z (zombie)")),
            Err(_) => false,
        }
    }

    /// Waits until `pid` (in the container) has exited; panics after
    /// `bound`. Returns how long it took.
    pub fn wait_gone(&self, pid: u32, what: &str, bound: Duration) -> Duration {
        let t0 = Instant::now();
        crate::wait::until(&format!("{what} (PID {pid}) to exit"), bound, || {
            (!self.process_alive(pid)).then_some(())
        });
        t0.elapsed()
    }

    /// Polls `journalctl ARGS` until `ok` holds for its output; returns it.
    /// Panics, with the last output, after `bound`.
    pub fn wait_journal(
        &self,
        args: &[&str],
        what: &str,
        bound: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        self.journal_when(args, bound, ok).unwrap_or_else(|last| {
            panic!(
                "waited {bound:?} for {what} in `journalctl {}`:\n{last}",
                args.join(" ")
            )
        })
    }

    /// Polls `journalctl ARGS` until `ok` holds for its output: `Ok` with
    /// it, or `Err` with the last output after `bound`, for a caller that
    /// checks it itself. Lines written just before (by PID 1, by a unit's
    /// process) can reach the journal a moment after the command that
    /// caused them returns.
    pub fn journal_when(
        &self,
        args: &[&str],
        bound: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let mut last = String::new();
        crate::wait::within(bound, || {
            last = self.journal(args);
            ok(&last).then(|| last.clone())
        })
        .ok_or(last)
    }

    fn place_file(&self, path_inside: &str, mode: u32, fill: impl FnOnce(&Path) -> io::Result<()>) {
        assert!(
            path_inside.starts_with('/'),
            "path inside the container must be absolute: {path_inside}"
        );
        let dst = self.host_path(path_inside);
        let dir = dst.parent().expect("parent dir");
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            dst.file_name().unwrap().to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let result = fill(&tmp)
            .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
            .and_then(|()| fs::rename(&tmp, &dst));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            panic!("write {path_inside} in {}: {e}", self.name);
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if thread::panicking() && self.init != 0 {
            // Leave the evidence in the test's output.
            match self.exec_timeout(
                &["journalctl", "--no-pager", "-n", "150"],
                Duration::from_secs(10),
            ) {
                Ok(out) => eprintln!(
                    "--- journal of {} (test panicked) ---\n{}",
                    self.name,
                    text(&out)
                ),
                Err(e) => eprintln!("--- journal of {}: {e}", self.name),
            }
        }
        self.teardown();
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// `GET path` on a new connection to `127.0.0.1:port` (the containers of
/// [`Container::boot`] share the host's network) with [`crate::http`]'s
/// client, as `(status, body)`: for the benchmark (`benches/restarts.rs`);
/// the tests use [`crate::http::get`].
pub fn try_http_get_timeout(port: u16, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    crate::http::get_timeout(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path, timeout)
        .map(|r| (r.status, r.body))
}
