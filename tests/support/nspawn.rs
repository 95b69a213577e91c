//! Test harness: a real systemd (the host's, 252) booted as PID 1 in a
//! `systemd-nspawn` container, with pid-server's units installed.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "support/nspawn.rs"]
//! mod nspawn;
//! ```
//!
//! and start every test with `if !nspawn::require_or_skip("name") { return; }`.
//!
//! # How a container is made
//!
//! `systemd-nspawn -D / --volatile=yes --overlay=/usr::/usr --register=no --keep-unit -b`:
//! the root is a fresh tmpfs, `/usr` is the host's with a throw-away writable
//! layer (so `/usr/bin/pid-server` can be replaced while it runs), and the
//! network namespace is the host's. The socket is therefore moved to
//! `127.0.0.1:PORT` by a drop-in and the test process talks to it directly.
//! A preset file containing `disable *` keeps the empty `/etc` (a "first
//! boot") from enabling the host's services.
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

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

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
        if find_in_path(tool).is_none() {
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
            if is_ci() {
                panic!(
                    "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                     !!! {test}: CANNOT RUN UNDER CI: {reason}\n\
                     !!! (CI is set, so a missing container runtime is an error, not a skip)\n\
                     !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                );
            }
            skip(test, &reason);
            false
        }
    }
}

/// Prints a loud `SKIPPED <test>: <reason>` straight to fd 2 (`eprintln!`
/// would be captured by the test harness and shown only for failing tests),
/// in one write so it does not interleave with the harness's lines.
pub fn skip(test: &str, reason: &str) {
    let msg = format!(
        "\n****************************************************************\n\
         *** SKIPPED {test}: {reason}\n\
         ****************************************************************\n"
    );
    let _ = io::stderr().lock().write_all(msg.as_bytes());
}

fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

// ---------------------------------------------------------------------------
// Boot options
// ---------------------------------------------------------------------------

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
}

impl BootOptions {
    /// The repo's `systemd/` units, no extra drop-ins.
    pub fn new(binary: impl Into<PathBuf>, port: u16) -> Self {
        BootOptions {
            binary: binary.into(),
            unit_dir: repo_unit_dir(),
            port,
            extra_dropins: Vec::new(),
        }
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// A loopback port that was free a moment ago (bind to port 0, read it back,
/// close). The container shares the host's network, so each container in a
/// test run needs its own.
/// Never hands out the same port twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// What every boot needs before nspawn starts: a unique machine name, a
/// state folder with the console log, and a private cgroup (or, failing
/// that, the lock that makes containers run one at a time).
struct Slot {
    name: String,
    state_dir: PathBuf,
    log: fs::File,
    cgroups: Vec<PathBuf>,
    serial: Option<MutexGuard<'static, ()>>,
}

impl Slot {
    fn new() -> Slot {
        let name = format!(
            "{NAME_PREFIX}-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() % 100_000_000)
                .unwrap_or(0)
        );
        let state_dir = std::env::temp_dir().join(STATE_DIR_NAME).join(&name);
        fs::create_dir_all(&state_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", state_dir.display()));
        let log = fs::File::create(state_dir.join("console.log")).expect("create console log");
        let (cgroups, serial) = match make_cgroups(&name) {
            Ok(c) => (c, None),
            Err(e) => {
                eprintln!(
                    "nspawn harness: no private cgroup for {name} ({e}); \
                     running containers one at a time"
                );
                (Vec::new(), Some(serial_lock(&name)))
            }
        };
        Slot {
            name,
            state_dir,
            log,
            cgroups,
            serial,
        }
    }
}
static SERIAL: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();

impl Container {
    /// Boots a container and installs pid-server's units and binary (the
    /// socket is not started). Panics, with nspawn's output, if it does not
    /// come up within [`BOOT_TIMEOUT`].
    pub fn boot(opts: &BootOptions) -> Container {
        SWEEP.call_once(sweep_stale);
        let started = Instant::now();

        let Slot {
            name,
            state_dir,
            log,
            cgroups,
            serial,
        } = Slot::new();
        let preset = state_dir.join("00-test.preset");
        fs::write(&preset, "disable *\n").expect("write preset");

        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg("/")
            .arg("--volatile=yes")
            .arg("--overlay=/usr::/usr")
            .arg("--register=no")
            .arg("--keep-unit")
            .arg("-M")
            .arg(&name)
            .arg(format!(
                "--bind-ro={}:/etc/systemd/system-preset/00-test.preset",
                preset.display()
            ))
            .arg("-b")
            .arg("systemd.firstboot=off")
            .arg("systemd.log_color=0");
        let child = launch(cmd, log, &cgroups, &state_dir);

        // From here on a panic drops `c`, which tears the container down.
        let mut c = Container {
            name,
            nspawn_pid: child.id(),
            nspawn: Some(child),
            init: 0,
            port: opts.port,
            state_dir,
            cgroups,
            temp_dir: None,
            boot_time: Duration::ZERO,
            torn_down: false,
            _serial: serial,
        };
        c.find_init(started + BOOT_TIMEOUT);
        c.record_temp_dir();
        let init_found = started.elapsed();
        c.wait_running(started + BOOT_TIMEOUT);
        let running = started.elapsed();
        c.install(opts);
        c.boot_time = started.elapsed();
        eprintln!(
            "nspawn harness: {} booted: init {} after {} ms, system running after {} ms, \
             units installed after {} ms",
            c.name,
            c.init,
            init_found.as_millis(),
            running.as_millis(),
            c.boot_time.as_millis()
        );
        c
    }

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
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init.to_string())
            .arg("-a")
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_LESS", "");
        run_with_timeout(cmd, timeout).map_err(|e| format!("`{}`: {e}", args.join(" ")))
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
                output_text(&out),
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
            output_text(&out)
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

    fn nspawn_exited(&mut self) -> Option<ExitStatus> {
        self.nspawn
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn boot_failure(&mut self, what: &str) -> ! {
        let status = self
            .nspawn_exited()
            .map(|s| format!("systemd-nspawn exited: {s}"))
            .unwrap_or_else(|| "systemd-nspawn still running".into());
        panic!(
            "container {} did not boot: {what} ({status})\n--- nspawn output ---\n{}",
            self.name,
            tail(&self.console_log(), 80)
        );
    }

    /// The container's PID 1: a child of nspawn whose `NSpid:` ends in 1 and
    /// that has exec'd systemd.
    fn find_init(&mut self, deadline: Instant) {
        let mut delay = Duration::from_millis(2);
        loop {
            if let Some(pid) = find_init_of(self.nspawn_pid) {
                self.init = pid;
                return;
            }
            if self.nspawn_exited().is_some() {
                self.boot_failure("nspawn exited before the container's init started");
            }
            if Instant::now() >= deadline {
                self.boot_failure("no container init found");
            }
            thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    fn record_temp_dir(&mut self) {
        let mountinfo =
            fs::read_to_string(format!("/proc/{}/mountinfo", self.init)).unwrap_or_default();
        self.temp_dir = mountinfo
            .split([',', ' '])
            .filter_map(|opt| opt.strip_prefix("upperdir="))
            .filter_map(|upper| {
                let p = Path::new(upper);
                p.ancestors()
                    .find(|a| {
                        a.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("nspawn-temp-"))
                    })
                    .map(Path::to_path_buf)
            })
            .next();
        if let Some(t) = &self.temp_dir {
            let _ = fs::write(self.state_dir.join("temp-dir"), t.as_os_str().as_bytes());
        }
    }

    fn wait_running(&mut self, deadline: Instant) {
        let mut last = String::new();
        loop {
            if let Ok(out) =
                self.exec_timeout(&["systemctl", "is-system-running"], Duration::from_secs(5))
            {
                last = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match last.as_str() {
                    "running" => return,
                    "degraded" => {
                        let failed = self.systemctl(&["--failed"]);
                        eprintln!(
                            "nspawn harness: {} booted degraded:\n{}",
                            self.name,
                            output_text(&failed)
                        );
                        return;
                    }
                    _ => {}
                }
            }
            if self.nspawn_exited().is_some() {
                self.boot_failure(&format!("is-system-running said {last:?}"));
            }
            if Instant::now() >= deadline {
                let jobs = self
                    .exec_timeout(
                        &["systemctl", "list-jobs", "--no-pager"],
                        Duration::from_secs(5),
                    )
                    .map(|o| output_text(&o))
                    .unwrap_or_else(|e| e);
                self.boot_failure(&format!(
                    "is-system-running still {last:?} after {} s; jobs:\n{jobs}",
                    BOOT_TIMEOUT.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn install(&mut self, opts: &BootOptions) {
        let mut units: Vec<PathBuf> = fs::read_dir(&opts.unit_dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", opts.unit_dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("socket" | "service")
                    )
            })
            .collect();
        units.sort();
        assert!(
            !units.is_empty(),
            "no *.socket or *.service in {}",
            opts.unit_dir.display()
        );
        for unit in &units {
            let bytes = fs::read(unit).unwrap_or_else(|e| panic!("read {}: {e}", unit.display()));
            let name = unit.file_name().unwrap().to_string_lossy();
            self.write_file(&format!("{UNIT_DIR_INSIDE}/{name}"), &bytes, 0o644);
        }
        // The file the service's `serve --config` names, as the package
        // installs it.
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pid-server.toml");
        let bytes = fs::read(&conf).unwrap_or_else(|e| panic!("read {}: {e}", conf.display()));
        self.write_file("/etc/pid-server/pid-server.toml", &bytes, 0o644);
        self.write_file(
            PORT_DROPIN_INSIDE,
            format!(
                "[Socket]\nListenStream=\nListenStream=127.0.0.1:{}\n",
                opts.port
            )
            .as_bytes(),
            0o644,
        );
        for (path, contents) in &opts.extra_dropins {
            self.write_file(path, contents.as_bytes(), 0o644);
        }
        self.install_binary(&opts.binary);
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// Powers the container off and removes everything it left on the host.
    /// Idempotent; `Drop` calls it. Returns how long it took.
    pub fn teardown(&mut self) -> Duration {
        if self.torn_down {
            return Duration::ZERO;
        }
        self.torn_down = true;
        let started = Instant::now();
        let mut how = "clean poweroff";

        if let Some(mut child) = self.nspawn.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // nspawn turns SIGTERM into SIGRTMIN+3 for the container's
                // systemd: an orderly poweroff.
                let _ = kill(Pid::from_raw(self.nspawn_pid as i32), Signal::SIGTERM);
                let deadline = started + SHUTDOWN_TIMEOUT;
                let mut delay = Duration::from_millis(2);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(25));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    how = "killed after the shutdown timeout";
                    // Killing a PID namespace's init kills the whole namespace.
                    // Kill it first and let nspawn reap it and clean up after
                    // itself; killing only nspawn would orphan the container.
                    if self.init != 0 {
                        let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
                    }
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(10));
                    }
                    if matches!(child.try_wait(), Ok(None)) {
                        how = "killed (nspawn too) after the shutdown timeout";
                        let _ = child.kill();
                    }
                }
            } else {
                how = "nspawn had already exited";
                if self.init != 0 && init_alive(self.init) {
                    let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
                }
            }
            let _ = child.wait();
        }

        kill_cgroups(&self.cgroups);
        remove_cgroups(&self.cgroups);
        if let Some(t) = &self.temp_dir {
            let _ = fs::remove_dir_all(t);
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
        let _ = fs::remove_dir_all(&self.state_dir);
        if let Some(parent) = self.state_dir.parent() {
            let _ = fs::remove_dir(parent); // only when empty
        }
        self._serial = None;
        let took = started.elapsed();
        eprintln!(
            "nspawn harness: {} torn down in {} ms ({how})",
            self.name,
            took.as_millis()
        );
        took
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
                    output_text(&out)
                ),
                Err(e) => eprintln!("--- journal of {}: {e}", self.name),
            }
        }
        self.teardown();
    }
}

// ---------------------------------------------------------------------------
// Process plumbing
// ---------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Starts a prepared `systemd-nspawn` command: a clean environment (none of
/// the test runner's notify or socket-activation variables), the console to
/// `log`, its own process group, moved into `cgroups` and tied to this test
/// binary's life before exec. On failure, removes what the boot made so far.
fn launch(mut cmd: Command, log: fs::File, cgroups: &[PathBuf], state_dir: &Path) -> Child {
    cmd.env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env("SYSTEMD_COLORS", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup console log"))
        .stderr(log)
        .process_group(0);
    let procs: Vec<CString> = cgroups
        .iter()
        .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_bytes()).unwrap())
        .collect();
    let parent = std::process::id() as i32;
    // SAFETY: between fork and exec the closure only calls open, write,
    // close, prctl and getppid (async-signal-safe) on data prepared before
    // the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            for procs in &procs {
                let fd = nix::fcntl::open(
                    procs.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                nix::unistd::write(&fd, b"0")?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if nix::unistd::getppid().as_raw() != parent {
                // The test binary is already gone.
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
    match spawn_from_keeper(cmd) {
        Ok(c) => c,
        Err(e) => {
            remove_cgroups(cgroups);
            let _ = fs::remove_dir_all(state_dir);
            panic!("spawn systemd-nspawn: {e}");
        }
    }
}

/// Spawns `cmd` from a thread that lives as long as the test binary, so the
/// parent-death signal set in `pre_exec` fires when the binary exits, not
/// when the test's thread ends.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("nspawn-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start nspawn-keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("nspawn-keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("nspawn-keeper thread is gone"))?
}

/// Runs a command with stdin closed, capturing its output, bounded by
/// `timeout` (after which it is SIGKILLed).
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            Err(format!("timed out after {} s", timeout.as_secs_f32()))
        }
    }
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&err);
    }
    s
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
}

fn find_init_of(nspawn_pid: u32) -> Option<u32> {
    let parent = nspawn_pid.to_string();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            status_field(pid, "PPid:").as_deref() == Some(parent.as_str())
                && status_field(pid, "NSpid:").is_some_and(|ns| {
                    let ids: Vec<&str> = ns.split_whitespace().collect();
                    ids.len() >= 2 && ids.last() == Some(&"1")
                })
                // Still nspawn's inner child until it execs systemd.
                && fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
        })
}

/// After nspawn is gone its init is re-parented: check the pid still is a
/// container's init and not a reused one.
fn init_alive(init: u32) -> bool {
    status_field(init, "NSpid:").is_some_and(|ns| ns.ends_with(" 1") || ns.ends_with("\t1"))
        && fs::read_to_string(format!("/proc/{init}/comm")).is_ok_and(|c| c.trim() == "systemd")
}

// ---------------------------------------------------------------------------
// cgroups and leftovers
// ---------------------------------------------------------------------------

/// The roots of the hierarchies systemd uses: the v2 root on a unified host;
/// `name=systemd` (and `unified` if mounted) on a hybrid or legacy one.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v = Vec::new();
    for h in ["systemd", "unified"] {
        if base.join(h).join("cgroup.procs").exists() {
            v.push(base.join(h));
        }
    }
    v
}

fn make_cgroups(name: &str) -> Result<Vec<PathBuf>, String> {
    let roots = cgroup_roots();
    if roots.is_empty() {
        return Err("no systemd cgroup hierarchy under /sys/fs/cgroup".into());
    }
    let mut made = Vec::new();
    for root in roots {
        let dir = root.join(CGROUP_GROUP).join(name);
        if let Err(e) = fs::create_dir_all(&dir) {
            remove_cgroups(&made);
            return Err(format!("mkdir {}: {e}", dir.display()));
        }
        made.push(dir);
    }
    Ok(made)
}

/// Whether containers get cgroups of their own (and so may run side by side).
/// Without, `boot` runs them one at a time: a test that holds two containers
/// at once would wait for itself, and fails after [`SERIAL_WAIT`].
pub fn private_cgroups_supported() -> bool {
    let probe = format!("{NAME_PREFIX}-{}-probe", std::process::id());
    match make_cgroups(&probe) {
        Ok(dirs) => {
            remove_cgroups(&dirs);
            true
        }
        Err(_) => false,
    }
}

/// How long `boot` waits for its turn when containers run one at a time.
pub const SERIAL_WAIT: Duration = Duration::from_secs(180);

fn serial_lock(name: &str) -> MutexGuard<'static, ()> {
    let deadline = Instant::now() + SERIAL_WAIT;
    loop {
        match SERIAL.try_lock() {
            Ok(g) => return g,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if Instant::now() >= deadline {
            panic!(
                "{name}: waited {} s for another container to go (containers run one at a \
                 time here because they cannot get cgroups of their own)",
                SERIAL_WAIT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every cgroup at or below `dir`, deepest first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_tree(&e.path()));
            }
        }
    }
    if dir.exists() {
        out.push(dir.to_path_buf());
    }
    out
}

fn cgroup_pids(dirs: &[PathBuf]) -> Vec<i32> {
    dirs.iter()
        .flat_map(|d| cgroup_tree(d))
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SIGKILLs whatever still lives in the cgroups, until they are empty (bounded).
fn kill_cgroups(dirs: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(dirs);
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("nspawn harness: processes left in the container's cgroups: {pids:?}");
            }
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn remove_cgroups(dirs: &[PathBuf]) {
    for dir in dirs {
        // A cgroup can be removed only once its last process is reaped,
        // which may lag the kill a little.
        let deadline = Instant::now() + Duration::from_secs(2);
        for d in cgroup_tree(dir) {
            while let Err(e) = fs::remove_dir(&d) {
                if e.kind() == io::ErrorKind::NotFound || Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        // The shared parent goes once no other container uses it.
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Removes what containers of test binaries that no longer exist left behind
/// (they died before `Drop` ran). Containers of live test binaries are left
/// alone.
fn sweep_stale() {
    let states = std::env::temp_dir().join(STATE_DIR_NAME);
    let mut names: Vec<String> = fs::read_dir(&states)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    for root in cgroup_roots() {
        names.extend(
            fs::read_dir(root.join(CGROUP_GROUP))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string)),
        );
    }
    names.sort();
    names.dedup();
    for name in names {
        let owner: Option<u32> = name
            .strip_prefix(&format!("{NAME_PREFIX}-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse().ok());
        let Some(owner) = owner else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        eprintln!(
            "nspawn harness: removing leftovers of container {name} (test process {owner} is gone)"
        );
        let cgroups: Vec<PathBuf> = cgroup_roots()
            .into_iter()
            .map(|r| r.join(CGROUP_GROUP).join(&name))
            .filter(|p| p.exists())
            .collect();
        kill_cgroups(&cgroups);
        remove_cgroups(&cgroups);
        let state = states.join(&name);
        if let Ok(t) = fs::read_to_string(state.join("temp-dir")) {
            let t = PathBuf::from(t.trim());
            if t.starts_with("/var/tmp")
                && t.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("nspawn-temp-"))
            {
                let _ = fs::remove_dir_all(t);
            }
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&name));
        let _ = fs::remove_dir_all(state);
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// `GET path` from `127.0.0.1:port` (HTTP/1.1, `Connection: close`, 10 s
/// timeouts). Panics on connection or protocol errors; see [`try_http_get`].
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET http://127.0.0.1:{port}{path}: {e}"))
}

/// Like [`http_get`], returning errors (for tests that count failures).
pub fn try_http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    try_http_get_timeout(port, path, Duration::from_secs(10))
}

pub fn try_http_get_timeout(port: u16, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: pid-server-tests\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )?;
    s.flush()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

pub fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            bad(&format!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(raw)
            ))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    } else if let Some(n) = length {
        if body.len() < n {
            return Err(bad(&format!("body cut short: {} of {n} bytes", body.len())));
        }
        body.truncate(n);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Polls `f` until it returns `Some` (every 20 ms), panicking after `timeout`
/// with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs_f32()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Booting a Debian tree (recipe 2: dpkg works there)
// ---------------------------------------------------------------------------

/// How to boot a Debian tree made by debootstrap with [`Container::boot_tree`].
#[derive(Clone, Debug)]
pub struct TreeOptions {
    /// The tree. It stays pristine: `--volatile=overlay` puts every change
    /// in a tmpfs that goes with the container.
    pub rootfs: PathBuf,
    /// `--network-namespace-path=`: a namespace the test made (`ip netns add`,
    /// with `lo` up) so the container's ports are its own. `None` shares the
    /// host's network.
    pub netns: Option<PathBuf>,
    /// `--bind-ro=HOST:INSIDE` mounts.
    pub bind_ro: Vec<(PathBuf, String)>,
}

impl Container {
    /// Boots `systemd-nspawn -D ROOTFS --volatile=overlay --register=no
    /// --keep-unit -b`, with the same isolation and clean-up as
    /// [`Container::boot`] (own cgroup, parent-death signal, `Drop`), and
    /// waits for `systemctl is-system-running`. Nothing is installed: the
    /// tree's own dpkg can install packages (`exec(&["dpkg", "-i", ..])`).
    pub fn boot_tree(opts: &TreeOptions) -> Container {
        SWEEP.call_once(sweep_stale);
        let started = Instant::now();
        let Slot {
            name,
            state_dir,
            log,
            cgroups,
            serial,
        } = Slot::new();

        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&opts.rootfs)
            .arg("--volatile=overlay")
            .arg("--register=no")
            .arg("--keep-unit")
            .arg("-M")
            .arg(&name);
        if let Some(ns) = &opts.netns {
            cmd.arg(format!("--network-namespace-path={}", ns.display()));
        }
        for (src, dst) in &opts.bind_ro {
            cmd.arg(format!("--bind-ro={}:{dst}", src.display()));
        }
        cmd.arg("-b").arg("systemd.log_color=0");
        let child = launch(cmd, log, &cgroups, &state_dir);
        let mut c = Container {
            name,
            nspawn_pid: child.id(),
            nspawn: Some(child),
            init: 0,
            port: 0,
            state_dir,
            cgroups,
            temp_dir: None,
            boot_time: Duration::ZERO,
            torn_down: false,
            _serial: serial,
        };
        c.find_init(started + BOOT_TIMEOUT);
        c.record_temp_dir();
        c.wait_running(started + BOOT_TIMEOUT);
        c.boot_time = started.elapsed();
        eprintln!(
            "nspawn harness: {} booted from {} in {} ms (init {})",
            c.name,
            opts.rootfs.display(),
            c.boot_time.as_millis(),
            c.init
        );
        c
    }
}
