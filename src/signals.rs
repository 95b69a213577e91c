//! The signals pid-server acts on, in one place.
//!
//! | signal          | meaning                                               |
//! |-----------------|-------------------------------------------------------|
//! | SIGTERM, SIGINT | drain and exit; a second one exits at once            |
//! | SIGUSR2         | hand the sockets to a new process (the seed's signal) |
//! | SIGHUP          | the same, and tell systemd `RELOADING=1` first, as `Type=notify-reload` expects |

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Terminate(&'static str),
    Upgrade(&'static str),
}

/// Unblocks the signals we handle in the calling thread.
pub fn unblock() -> nix::Result<()> {
    let mut handled = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGUSR2,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        handled.add(s);
    }
    handled.thread_unblock()
}

pub struct Signals {
    term: Signal,
    int: Signal,
    usr2: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer kill us.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Terminate("SIGTERM"),
            _ = self.int.recv() => Event::Terminate("SIGINT"),
            _ = self.usr2.recv() => Event::Upgrade("SIGUSR2"),
            _ = self.hup.recv() => Event::Upgrade("SIGHUP"),
        }
    }

    /// The next SIGTERM or SIGINT, ignoring the rest (used while draining).
    pub async fn next_terminate(&mut self) -> &'static str {
        loop {
            if let Event::Terminate(name) = self.next().await {
                return name;
            }
        }
    }
}
