//! Telling systemd what the service is doing (`sd_notify(3)` protocol).
//!
//! Every call is a no-op without `NOTIFY_SOCKET`, and for a process that
//! does not own the unit: systemd reads `STOPPING=1`, `STATUS=` and watchdog
//! pings as statements about the whole unit, whichever process of the unit
//! sends them. A process started fresh owns it; a new generation owns it
//! from its `MAINPID=`; the old one gives it up then and says nothing more.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Speaks for the unit, when this process owns it.
#[derive(Debug)]
pub(crate) struct Notifier {
    enabled: bool,
    owner: AtomicBool,
    /// Warn about a broken NOTIFY_SOCKET once, not on every status update.
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` once. `owner`: whether this process speaks
    /// for the unit from the start (not so for a new generation, until it
    /// takes over).
    pub(crate) fn from_env(owner: bool) -> Arc<Notifier> {
        Arc::new(Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            owner: AtomicBool::new(owner),
            warned: AtomicBool::new(false),
        })
    }

    /// From now on this process says nothing to systemd.
    pub(crate) fn silence(&self) {
        self.owner.store(false, Ordering::SeqCst);
    }

    /// Whether what this process sends reaches systemd for the unit.
    pub(crate) fn speaks(&self) -> bool {
        self.enabled && !self.is_silenced()
    }

    pub(crate) fn is_silenced(&self) -> bool {
        !self.owner.load(Ordering::SeqCst)
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled || self.is_silenced() {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            // A NOTIFY_SOCKET nobody listens on is not a reason to stop
            // serving; say it once.
            if !self.warned.swap(true, Ordering::SeqCst) {
                tracing::warn!(event = "notify_failed", error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
            }
        }
    }

    /// `READY=1` with the status line: the first generation is up.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `MAINPID=<self>`, `READY=1`: a new generation takes the unit over.
    /// Returns once systemd has processed it (a `BARRIER=1` round trip), so
    /// the old process cannot exit before systemd knows its successor.
    ///
    /// With `MAINPIDFDID=` where the kernel gives pidfds an ID (pidfs,
    /// Linux 6.9): systemd 257 then checks that `MAINPID=` names this very
    /// process and tracks it by pidfd (so it sees it exit, though it is not
    /// systemd's child); 252 ignores the key it does not know.
    pub(crate) fn take_over(&self, status: &str) {
        self.owner.store(true, Ordering::SeqCst);
        self.main_pid_ready(status);
        if self.enabled
            && !self.is_silenced()
            && let Err(e) = barrier(Duration::from_secs(5))
        {
            tracing::warn!(event = "notify_barrier_failed", error = %e,
                "systemd did not confirm MAINPID; going on");
        }
    }

    pub(crate) fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with the monotonic time, as `Type=notify-reload` asks on
    /// SIGHUP; `READY=1` from the new main process ends it.
    pub(crate) fn reloading(&self, status: &str) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status(status)]),
        }
    }

    /// After a failed reload: this process is (still) the main one, and ready.
    pub(crate) fn reclaim(&self, status: &str) {
        self.main_pid_ready(status);
    }

    /// `MAINPID=<self>`, `READY=1`, the status line, and `MAINPIDFDID=`
    /// where pidfds have IDs (see [`Notifier::take_over`]).
    fn main_pid_ready(&self, status: &str) {
        let id = pidfd_id().map(|id| format!("MAINPIDFDID={id}"));
        let mut states = vec![
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ];
        if let Some(id) = &id {
            states.push(NotifyState::Custom(id));
        }
        self.send(&states);
    }

    pub(crate) fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Asks systemd for `by` more time than its stop timeout, while a long
    /// drain runs.
    pub(crate) fn extend_timeout(&self, by: Duration) {
        let usec = by.as_micros().min(u32::MAX as u128) as u32;
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    pub(crate) fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant
/// for this process (`WATCHDOG_PID` absent or ours).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half the interval until silenced or the task ends.
pub(crate) async fn watchdog_loop(notifier: Arc<Notifier>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        if notifier.is_silenced() {
            return;
        }
        notifier.watchdog();
    }
}

/// The `BARRIER=1` protocol (systemd ≥ 246): send a pipe's write end with the
/// message and wait until systemd closes it, which it does after processing
/// every message sent before.
pub(crate) fn barrier(timeout: Duration) -> io::Result<()> {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    sd_notify::notify_with_fds(&[NotifyState::Custom("BARRIER=1")], &[write.as_fd()])?;
    drop(write);
    let mut fds = [nix::poll::PollFd::new(
        read.as_fd(),
        nix::poll::PollFlags::POLLHUP,
    )];
    let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? {
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer to BARRIER=1",
        )),
        _ => Ok(()),
    }
}

/// This process's pidfd inode ID (what `sd_pidfd_get_inode_id(3)` gives),
/// or `None` where pidfds share one inode (before pidfs, Linux 6.9) or
/// `pidfd_open` is not allowed: then `MAINPID=` goes alone.
fn pidfd_id() -> Option<u64> {
    use std::os::fd::{AsRawFd, FromRawFd};
    /// `PID_FS_MAGIC`: the file system of a pidfd with an ID of its own.
    const PIDFS_MAGIC: i64 = 0x5049_4446;
    // SAFETY: pidfd_open(2) takes a PID and flags and returns a new fd or
    // -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id() as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: pidfd_open returned a new fd, ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) };
    // SAFETY: plain structs filled in by the kernel for an fd we own.
    let (mut fs, mut st): (libc::statfs, libc::stat) = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointers are to the structs just made.
    let ok = unsafe {
        libc::fstatfs(fd.as_raw_fd(), &mut fs) == 0 && libc::fstat(fd.as_raw_fd(), &mut st) == 0
    };
    // `f_type`'s type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let pidfs = fs.f_type as i64 == PIDFS_MAGIC;
    (ok && pidfs).then_some(st.st_ino)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pidfd_id_names_this_process_for_its_life() {
        // Where the kernel has pidfs (6.9+) the ID is this process's: the
        // same at every call, and another process's differs.
        let Some(id) = super::pidfd_id() else {
            eprintln!("no pidfs here: MAINPID= goes without MAINPIDFDID=");
            return;
        };
        assert_eq!(super::pidfd_id(), Some(id));
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // SAFETY: as in pidfd_id, for the child's PID.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        assert!(fd >= 0);
        // SAFETY: a plain struct the kernel fills for an fd we opened.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fstat(fd as i32, &mut st) }, 0);
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd as i32) };
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        assert_ne!(st.st_ino, id);
    }
}
