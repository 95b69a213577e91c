//! Processes the bench starts (servers in process groups of their own,
//! reaped also on a panic), short commands with a bound, stopping early on
//! a signal, and temporary directories.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;
use pid_server_test_support::TestCommand;

// ---------------------------------------------------------------------------
// Stopping early (SIGINT, SIGTERM, SIGHUP)
// ---------------------------------------------------------------------------

static ABORT: AtomicBool = AtomicBool::new(false);

pub(crate) fn aborted() -> bool {
    ABORT.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    if ABORT.swap(true, Ordering::SeqCst) {
        // A second one: give up at once (async-signal-safe).
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(130) };
    }
}

/// SIGINT/SIGTERM/SIGHUP ask the bench to stop after the current step and
/// clean up (a second one exits at once, without cleaning up). A handler,
/// not a blocked mask: children inherit the signal mask (Rust's `Command`
/// does not reset it), and a server started with SIGTERM blocked would
/// never see one.
pub(crate) fn catch_signals() {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        if let Err(e) = unsafe { sigaction(s, &action) } {
            eprintln!("bench: cannot handle {s} ({e}); it will not clean up");
        }
    }
}

/// Sleeps until `until`, waking early when the bench is asked to stop.
pub(crate) fn sleep_until(until: Instant) {
    loop {
        let now = Instant::now();
        if now >= until || aborted() {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// Orphaned pid-server generations (after a reload, or an old process that
/// outlived its parent) come back to the bench to be reaped.
pub(crate) fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

// ---------------------------------------------------------------------------
// Processes the bench starts
// ---------------------------------------------------------------------------

/// Servers started by the bench. Each direct child leads a process group of
/// its own (a pid-server's later generations, nginx's workers stay in it),
/// gets SIGKILL if the bench dies (`PR_SET_PDEATHSIG`; spawn only from the
/// main thread), and `Drop` SIGTERMs every group, then SIGKILLs what is
/// left, and reaps everything (the bench is a child subreaper, so orphaned
/// generations come back to it).
pub(crate) struct Procs {
    children: Vec<(Child, String)>,
    pgids: Vec<i32>,
    pub(crate) log: File,
}

impl Procs {
    pub(crate) fn new(log: &Path) -> Result<Procs, String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        Ok(Procs {
            children: Vec::new(),
            pgids: Vec::new(),
            log,
        })
    }

    pub(crate) fn spawn(&mut self, mut cmd: Command, what: &str) -> Result<u32, String> {
        let out = self.log.try_clone().map_err(|e| e.to_string())?;
        let err = self.log.try_clone().map_err(|e| e.to_string())?;
        let parent = std::process::id() as i32;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .process_group(0);
        // SAFETY: sigprocmask, prctl and getppid are async-signal-safe;
        // nothing is allocated between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A clean signal mask whatever the bench inherited: Rust's
                // spawn passes its own on, and a server with SIGTERM
                // blocked would never drain.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid().as_raw() != parent {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("start {what}: {e}"))?;
        let pid = child.id();
        self.pgids.push(pid as i32);
        self.children.push((child, what.to_string()));
        Ok(pid)
    }

    /// Waits until the direct child `pid` has exited (and reaps it).
    pub(crate) fn wait(&mut self, pid: u32, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        let Some(i) = self.children.iter().position(|(c, _)| c.id() == pid) else {
            return Err(format!("{pid} is not a child of the bench"));
        };
        loop {
            match self.children[i].0.try_wait() {
                Ok(Some(st)) => {
                    self.children.remove(i);
                    return Ok(st);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("wait for {pid}: {e}")),
            }
            if Instant::now() >= deadline {
                return Err(format!("{pid} did not exit within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reaps children and adopted orphans of our groups that have exited.
    pub(crate) fn reap(&mut self) {
        self.children
            .retain_mut(|(c, _)| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
        let ours: Vec<u32> = self.children.iter().map(|(c, _)| c.id()).collect();
        for (pid, pgid) in adopted_children() {
            if self.pgids.contains(&pgid) && !ours.contains(&pid) {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
    }

    fn groups_alive(&mut self) -> bool {
        self.reap();
        self.pgids
            .iter()
            .any(|&g| kill(Pid::from_raw(-g), None::<Signal>).is_ok())
    }

    /// SIGTERM every group, wait up to `grace`, SIGKILL what is left, reap.
    fn shutdown(&mut self, grace: Duration) {
        for &g in &self.pgids {
            let _ = kill(Pid::from_raw(-g), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while self.groups_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        for &g in &self.pgids {
            let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.groups_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if self.groups_alive() {
            eprintln!("bench: processes left in groups {:?}", self.pgids);
        }
        self.pgids.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(3));
    }
}

/// (pid, process group) of every process whose parent is this process.
fn adopted_children() -> Vec<(u32, i32)> {
    let me = std::process::id() as i64;
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(ppid), Some(pgrp)) = (
            f.get(1).and_then(|s| s.parse::<i64>().ok()),
            f.get(2).and_then(|s| s.parse::<i32>().ok()),
        ) && ppid == me
        {
            v.push((pid, pgrp));
        }
    }
    v
}

/// Runs a short command, bounded (the test support's [`TestCommand`]: its
/// own process group, killed whole at the bound); Ok(stdout) if it exits
/// 0, otherwise one line for the report.
pub(crate) fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let what = format!("`{program} {}`", args.join(" "));
    let out = TestCommand::new(program)
        .args(args)
        .timeout(timeout)
        .try_output()
        .map_err(|e| {
            // Of its report (command, folder, status, output), the line
            // that says what went wrong.
            let why = e
                .lines()
                .find(|l| l.starts_with("status:") || l.starts_with("cannot start:"))
                .unwrap_or(&e);
            format!("{what}: {}", why.trim())
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Temporary directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("pid-server-bench-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
