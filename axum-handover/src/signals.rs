//! The signals a generation acts on, in one place.
//!
//! | signal          | meaning                                               |
//! |-----------------|-------------------------------------------------------|
//! | SIGTERM, SIGINT | drain and exit; a second one exits at once            |
//! | SIGUSR2         | hand over to a new process                            |
//! | SIGHUP          | the same, and tell systemd `RELOADING=1` first, as `Type=notify-reload` expects |
//!
//! Which signals hand over is [`crate::Config::reload_signals`] (default
//! SIGHUP and SIGUSR2); one left out is not touched here (no handler, not
//! unblocked), so the app may take it for itself.

use std::fmt;
use std::io;
use std::task::Poll;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// One of [`crate::Config::reload_signals`].
    Signal(SignalKind),
    /// A request on the control socket (the reload helper).
    Request,
}

impl Trigger {
    /// Whether systemd waits for `RELOADING=1`: `Type=notify-reload` sends
    /// SIGHUP.
    pub(crate) fn wants_reloading(self) -> bool {
        self == Trigger::Signal(SignalKind::hangup())
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal(k) => f.write_str(&name(*k)),
            Trigger::Request => f.write_str("reload request"),
        }
    }
}

/// `SIGHUP`, or the number of a signal nix does not name.
fn name(k: SignalKind) -> String {
    nix::sys::signal::Signal::try_from(k.as_raw_value())
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {}", k.as_raw_value()))
}

/// The reload signals of `config`, without the stop signals (SIGTERM and
/// SIGINT always stop) and without repeats.
pub(crate) fn reload_kinds(asked: &[SignalKind]) -> Vec<SignalKind> {
    let stop = [SignalKind::terminate(), SignalKind::interrupt()];
    let mut out: Vec<SignalKind> = Vec::new();
    for k in asked {
        if !stop.contains(k) && !out.contains(k) {
            out.push(*k);
        }
    }
    out
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

/// Unblocks the stop signals and `reload` in the calling thread. A parent
/// may have started us with them blocked (the mask is inherited through
/// exec; Python's subprocess passes it on).
///
/// The mask is per thread, and a signal sent to the process goes to any
/// one thread that does not block it. Threads started before this call
/// (`#[tokio::main]`'s runtime) keep the parent's mask, so one thread with
/// the signals unblocked must outlive the generation. The main thread does
/// (the process ends with it); called from any other thread, which may
/// end (`spawn_blocking`), this starts a small thread of its own that
/// only keeps them unblocked. Threads started later inherit the unblocked
/// mask either way, and the next generation is started with an empty one
/// (std's `Command` clears the mask).
pub(crate) fn unblock(reload: &[SignalKind]) -> io::Result<()> {
    use nix::sys::signal::{SigSet, Signal as S};
    let mut handled = SigSet::empty();
    handled.add(S::SIGTERM);
    handled.add(S::SIGINT);
    for k in reload {
        if let Ok(s) = S::try_from(k.as_raw_value()) {
            handled.add(s);
        }
    }
    handled.thread_unblock()?;
    if nix::unistd::gettid() == nix::unistd::getpid() {
        return Ok(());
    }
    // Started from here, the thread inherits the unblocked mask.
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            loop {
                std::thread::park();
            }
        })?;
    Ok(())
}

pub(crate) struct Signals {
    term: Signal,
    int: Signal,
    reload: Vec<(SignalKind, Signal)>,
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer kill us.
    pub(crate) fn install(reload: &[SignalKind]) -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            reload: reload
                .iter()
                .map(|k| signal(*k).map(|s| (*k, s)))
                .collect::<io::Result<_>>()?,
        })
    }

    pub(crate) async fn next(&mut self) -> Event {
        let reload = std::future::poll_fn(|cx| {
            for (k, s) in &mut self.reload {
                if s.poll_recv(cx).is_ready() {
                    return Poll::Ready(*k);
                }
            }
            Poll::Pending
        });
        tokio::select! {
            _ = self.term.recv() => Event::Stop(Stop::Term),
            _ = self.int.recv() => Event::Stop(Stop::Int),
            k = reload => Event::Reload(Trigger::Signal(k)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_and_repeats_are_not_reload_signals() {
        let (hup, usr2) = (SignalKind::hangup(), SignalKind::user_defined2());
        assert_eq!(
            reload_kinds(&[
                hup,
                SignalKind::terminate(),
                usr2,
                hup,
                SignalKind::interrupt()
            ]),
            vec![hup, usr2]
        );
        assert_eq!(Trigger::Signal(hup).to_string(), "SIGHUP");
        assert!(Trigger::Signal(hup).wants_reloading());
        assert!(!Trigger::Signal(usr2).wants_reloading());
    }
}
