//! Booting: a unique machine name, state folder and cgroup per container
//! ([`Slot`]), nspawn started from a keeper thread with a parent-death
//! signal ([`launch`]), and the two recipes ([`Container::boot`],
//! [`Container::boot_tree`]) up to `systemctl is-system-running`.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, Once, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;

use super::cleanup::{make_cgroups, remove_cgroups, serial_lock, sweep_stale};
use super::{
    BOOT_TIMEOUT, BootOptions, COUNTER, Container, NAME_PREFIX, PORT_DROPIN_INSIDE, Recipe,
    STATE_DIR_NAME, TreeOptions, UNIT_DIR_INSIDE,
};
use crate::cmd::{tail, text};
use crate::netns::Netns;

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

/// Leftovers of dead test binaries are swept once per test binary.
static SWEEP: Once = Once::new();

impl Container {
    /// Boots a container and installs pid-server's units and binary (the
    /// socket is not started): the host's `/usr` or a Debian tree
    /// ([`BootOptions::recipe`]), in the host's network or a namespace of
    /// its own ([`BootOptions::private_network`]). Panics, with nspawn's
    /// output, if it does not come up within [`BOOT_TIMEOUT`].
    pub fn boot(opts: &BootOptions) -> Container {
        SWEEP.call_once(sweep_stale);
        let started = Instant::now();
        // Made before the slot, so that a failure here leaves nothing.
        let netns = opts.private_network.then(Netns::new);

        let Slot {
            name,
            state_dir,
            log,
            cgroups,
            serial,
        } = Slot::new();
        let mut cmd = Command::new("systemd-nspawn");
        match &opts.recipe {
            Recipe::HostUsr => {
                let preset = state_dir.join("00-test.preset");
                fs::write(&preset, "disable *\n").expect("write preset");
                cmd.args(["-D", "/", "--volatile=yes", "--overlay=/usr::/usr"])
                    .arg(format!(
                        "--bind-ro={}:/etc/systemd/system-preset/00-test.preset",
                        preset.display()
                    ));
            }
            Recipe::Tree(rootfs) => {
                // debootstrap copies the host's /etc/hostname, which the
                // container's systemd would set: name it after the machine,
                // as on the host's /usr, so that the journals of containers
                // side by side tell themselves apart.
                let hostname = state_dir.join("hostname");
                fs::write(&hostname, format!("{name}\n")).expect("write hostname");
                cmd.arg("-D")
                    .arg(rootfs)
                    .arg("--volatile=overlay")
                    .arg(format!("--bind-ro={}:/etc/hostname", hostname.display()));
            }
        }
        common_args(&mut cmd, &name, netns.as_ref().map(Netns::path).as_deref());
        cmd.arg("-b");
        if opts.recipe == Recipe::HostUsr {
            cmd.arg("systemd.firstboot=off");
        }
        cmd.arg("systemd.log_color=0");
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
            netns,
        };
        c.find_init(started + BOOT_TIMEOUT);
        c.record_temp_dir();
        let init_found = started.elapsed();
        c.wait_running(started + BOOT_TIMEOUT);
        let running = started.elapsed();
        c.install(opts);
        c.boot_time = started.elapsed();
        let from = match &opts.recipe {
            Recipe::HostUsr => "the host's /usr".to_string(),
            Recipe::Tree(t) => t.display().to_string(),
        };
        eprintln!(
            "nspawn harness: {} booted from {from}{}: init {} after {} ms, system running \
             after {} ms, units installed after {} ms",
            c.name,
            if c.netns.is_some() {
                " in its own netns"
            } else {
                ""
            },
            c.init,
            init_found.as_millis(),
            running.as_millis(),
            c.boot_time.as_millis()
        );
        c
    }

    /// Boots `systemd-nspawn -D ROOTFS --volatile=overlay --register=no
    /// --keep-unit -b`, with the same isolation and clean-up as
    /// [`Container::boot`] (own cgroup, parent-death signal, `Drop`), and
    /// waits for `systemctl is-system-running`. Nothing is installed: the
    /// tree's own dpkg can install packages (`exec(&["dpkg", "-i", ..])`).
    /// The network namespace, if any, is the caller's to make and delete.
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
        cmd.arg("-D").arg(&opts.rootfs).arg("--volatile=overlay");
        common_args(&mut cmd, &name, opts.netns.as_deref());
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
            netns: None,
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

/// What both recipes pass: no machined, no scope unit (the harness makes the
/// cgroups), the machine name; and a network namespace, with the capability
/// systemd 257 needs to give the service one of its own inside it.
fn common_args(cmd: &mut Command, name: &str, netns: Option<&Path>) {
    cmd.args(["--register=no", "--keep-unit", "-M", name]);
    if let Some(ns) = netns {
        cmd.arg(format!("--network-namespace-path={}", ns.display()))
            .arg("--capability=CAP_NET_ADMIN");
    }
}

impl Container {
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
                            text(&failed)
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
                    .map(|o| text(&o))
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
        // The file the service names (`PID_SERVER_CONFIG`), as the package
        // installs it.
        let conf = crate::repo().join("packaging/pid-server.toml");
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

pub(super) fn status_field(pid: u32, field: &str) -> Option<String> {
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
