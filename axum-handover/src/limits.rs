//! The open-files limit. systemd starts services with a soft limit of 1024
//! (and a hard one of 524288 by default); `systemd.exec(5)` asks a program
//! that needs many descriptors to raise its soft limit to the hard one
//! itself, as Go's runtime does. Each client connection is a descriptor,
//! so the connection cap must fit under what is left.

use std::fmt;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::control;

/// Descriptors kept for everything but client connections and the control
/// sockets: the two handover channels and the fds in flight on them, the
/// journal, the runtime's own (epoll, eventfd, signal pipe), files a
/// handler opens. (The listening sockets and their copies for the next
/// generation are counted per socket.)
const OWN: u64 = 48;

/// The control sockets' own slots: they hold at most
/// [`control::DESCRIPTORS`], so helpers (or anyone else) connecting to
/// them cannot take the HTTP connections' descriptors.
const CONTROL: u64 = 16;
const _: () = assert!(control::DESCRIPTORS as u64 <= CONTROL);

/// Descriptors kept for everything but client connections.
const RESERVED: u64 = OWN + CONTROL;

/// What the limit was, and what it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdLimit {
    pub(crate) soft_before: u64,
    pub(crate) soft: u64,
    pub(crate) hard: u64,
    /// Why it could not be raised (a sandbox that forbids setrlimit).
    pub(crate) error: Option<nix::errno::Errno>,
}

impl FdLimit {
    /// Raises the soft limit to the hard one. Call before the runtime
    /// starts threads.
    pub(crate) fn raise() -> Option<FdLimit> {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        if soft >= hard {
            return Some(FdLimit {
                soft_before: soft,
                soft,
                hard,
                error: None,
            });
        }
        let error = setrlimit(Resource::RLIMIT_NOFILE, hard, hard).err();
        let now = getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(s, _)| s)
            .unwrap_or(soft);
        Some(FdLimit {
            soft_before: soft,
            soft: now,
            hard,
            error,
        })
    }

    /// How many client connections fit.
    pub(crate) fn connection_budget(&self, listeners: usize) -> usize {
        let reserve = RESERVED + 2 * listeners as u64;
        self.soft.saturating_sub(reserve).max(1) as usize
    }
}

impl fmt::Display for FdLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.soft_before == self.soft, self.error) {
            (true, None) => write!(f, "open-files limit {} (hard {})", self.soft, self.hard),
            (false, _) => write!(
                f,
                "open-files limit raised from {} to {} (the hard limit)",
                self.soft_before, self.soft
            ),
            (true, Some(e)) => write!(
                f,
                "open-files limit {} (hard {}): cannot raise it: {e}; set LimitNOFILE= in the unit",
                self.soft, self.hard
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_room_for_the_process_itself() {
        let l = FdLimit {
            soft_before: 1024,
            soft: 1024,
            hard: 1024,
            error: None,
        };
        assert_eq!(l.connection_budget(1), 1024 - 66);
        let tiny = FdLimit { soft: 10, ..l };
        assert_eq!(tiny.connection_budget(1), 1);
    }
}
