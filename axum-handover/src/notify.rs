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
    pub(crate) fn take_over(&self, status: &str) {
        self.owner.store(true, Ordering::SeqCst);
        self.send(&[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ]);
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
        self.send(&[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ]);
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
