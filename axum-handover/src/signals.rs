//! The signals a generation acts on, in one place.
//!
//! | signal          | meaning                                               |
//! |-----------------|-------------------------------------------------------|
//! | SIGTERM, SIGINT | drain and exit; a second one exits at once            |
//! | SIGUSR2         | hand over to a new process                            |
//! | SIGHUP          | the same, and tell systemd `RELOADING=1` first, as `Type=notify-reload` expects |

use std::fmt;
use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// SIGHUP: systemd's `Type=notify-reload` sends it and waits for
    /// `RELOADING=1`.
    Hangup,
    /// SIGUSR2.
    User2,
    /// A request on the control socket (the reload helper).
    Request,
}

impl Trigger {
    /// Whether systemd waits for `RELOADING=1` (`Type=notify-reload`).
    pub(crate) fn wants_reloading(self) -> bool {
        self == Trigger::Hangup
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Hangup => "SIGHUP",
            Trigger::User2 => "SIGUSR2",
            Trigger::Request => "reload request",
        })
    }
}

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Term,
    Int,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Term => "SIGTERM",
            Stop::Int => "SIGINT",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Stop(Stop),
    Reload(Trigger),
}

/// Unblocks the signals we handle in the calling thread. A parent may have
/// started us with them blocked (the mask is inherited; Python's subprocess
/// and Rust's Command pass it on). Call before the runtime starts: its
/// threads, and every later generation, inherit this thread's mask.
pub(crate) fn unblock() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal as S};
    let mut handled = SigSet::empty();
    for s in [S::SIGTERM, S::SIGINT, S::SIGUSR2, S::SIGHUP] {
        handled.add(s);
    }
    handled.thread_unblock()
}

pub(crate) struct Signals {
    term: Signal,
    int: Signal,
    usr2: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer kill us.
    pub(crate) fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop(Stop::Term),
            _ = self.int.recv() => Event::Stop(Stop::Int),
            _ = self.usr2.recv() => Event::Reload(Trigger::User2),
            _ = self.hup.recv() => Event::Reload(Trigger::Hangup),
        }
    }

    /// The next SIGTERM or SIGINT, ignoring the rest (used while draining).
    pub(crate) async fn next_stop(&mut self) -> Stop {
        loop {
            if let Event::Stop(s) = self.next().await {
                return s;
            }
        }
    }
}
