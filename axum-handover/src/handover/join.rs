//! The new process's side of a handover: take what the parent passed
//! (before the runtime starts), say `ready`, wait for `commit`, say `owner`,
//! then take the connections the parent moves.

use std::ffi::OsString;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{self, SockType, sockopt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::channel::{Connections, Feature, Ready};
use crate::Config;
use crate::env::Var;

/// What a parent generation passed us, read from the environment before
/// the runtime starts.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// The handover channel (stream): `ready`, `commit`, `owner`.
    pub(crate) channel: OwnedFd,
    /// The protocol the parent speaks (`None`: protocol 1).
    pub(crate) parent_protocol: Option<u32>,
    /// The connection channel (seqpacket), from a protocol-2 parent.
    pub(crate) connections: Option<OwnedFd>,
    /// Variables in our environment that the parent did not set for us (see
    /// [`ParentFds`]), for a warning once logging is up.
    pub(crate) ignored: Option<String>,
}

/// Where the parent's channels are, validated but not yet owned.
///
/// Each release passes its whole environment on to its child, and a
/// release passes on variables it does not know as they are: upgrade to N,
/// roll back to N-1, upgrade to N again, and the last N finds the protocol
/// and connection-channel variables that the first N set for N-1, naming
/// fds that mean something else (or nothing) in this process. So a
/// variable is trusted only when its fd proves it: a Unix socket of the
/// channel's type whose peer is our parent (a socketpair's peer
/// credentials are its creator's, `SO_PEERCRED`). That holds whatever
/// release the parent is, including those that predate this check.
struct ParentFds {
    channel: RawFd,
    parent_protocol: Option<u32>,
    connections: Option<RawFd>,
    ignored: Option<String>,
}

impl ParentFds {
    /// `None` when no parent generation started us. An error for a handover
    /// fd that is not the parent's channel (or not a number): a start that
    /// cannot tell whether it is a successor must not guess.
    fn find(config: &Config) -> Result<Option<ParentFds>, String> {
        let handover_var = config.var(Var::HandoverFd);
        let Some(channel) = fd_var(&handover_var)? else {
            return Ok(None);
        };
        from_parent(channel, SockType::Stream).map_err(|why| {
            format!(
                "{handover_var}={channel} is not a handover channel from the parent process: {why}"
            )
        })?;
        let protocol_var = config.var(Var::Protocol);
        let parent_protocol = match std::env::var(&protocol_var) {
            Err(_) => None,
            Ok(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| format!("{protocol_var}={v:?} is not a number"))?,
            ),
        };
        if parent_protocol.unwrap_or(1) < 2 {
            return Ok(Some(ParentFds {
                channel,
                parent_protocol,
                connections: None,
                ignored: None,
            }));
        }
        // Only a parent that speaks protocol 2 passes (and will use) the
        // second channel, and it always does: without a valid one, both
        // variables were set for another process by a grandparent, and the
        // parent speaks protocol 1.
        let conns_var = config.var(Var::ConnectionsFd);
        let stale = |why: String| ParentFds {
            channel,
            parent_protocol: None,
            connections: None,
            ignored: Some(format!(
                "ignored {protocol_var} and {conns_var} ({why}): set by an earlier generation for \
                 another process; the parent speaks handover protocol 1"
            )),
        };
        Ok(Some(match fd_var(&conns_var)? {
            None => stale(format!("{conns_var} is not set")),
            Some(fd) => match from_parent(fd, SockType::SeqPacket) {
                Ok(()) => ParentFds {
                    channel,
                    parent_protocol,
                    connections: Some(fd),
                    ignored: None,
                },
                Err(why) => stale(format!("fd {fd}: {why}")),
            },
        }))
    }
}

/// Takes the parent's fds, if a parent started us. Call before anything
/// else opens files.
pub(crate) fn take(config: &Config) -> Result<Option<Inherited>, String> {
    let Some(found) = ParentFds::find(config)? else {
        return Ok(None);
    };
    Ok(Some(Inherited {
        channel: own(found.channel),
        parent_protocol: found.parent_protocol,
        connections: found.connections.map(own),
        ignored: found.ignored,
    }))
}

/// The fd a variable names; `None` when it is not set.
fn fd_var(var: &str) -> Result<Option<RawFd>, String> {
    let Ok(v) = std::env::var(var) else {
        return Ok(None);
    };
    v.parse()
        .ok()
        .filter(|fd| *fd > 2)
        .map(Some)
        .ok_or_else(|| format!("{var}={v:?} is not a file descriptor"))
}

/// Whether `fd` is our end of a Unix socketpair of type `ty` that our
/// parent made. Looks only; takes nothing.
fn from_parent(fd: RawFd, ty: SockType) -> Result<(), String> {
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err("not open".into());
    }
    // SAFETY: the fd is open (checked above); it is borrowed only for the
    // queries below and stays owned by whoever owns it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let unix = socket::getsockname::<socket::UnixAddr>(fd).is_ok();
    match socket::getsockopt(&borrowed, sockopt::SockType) {
        Ok(t) if unix && t == ty => {}
        Ok(_) | Err(_) => return Err(format!("not a Unix {ty:?} socket")),
    }
    let parent = nix::unistd::getppid().as_raw();
    match socket::getsockopt(&borrowed, sockopt::PeerCredentials) {
        Ok(c) if c.pid() == parent => Ok(()),
        Ok(c) => Err(format!(
            "its peer is PID {}, not the parent process (PID {parent})",
            c.pid()
        )),
        Err(e) => Err(format!("no peer credentials: {e}")),
    }
}

/// Owns an fd [`ParentFds::find`] validated, and keeps it from our own
/// children.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the fd is open and nothing else in this process owns it: the
    // parent placed it here for us alone (validated by `ParentFds::find`).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on the fd we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    owned
}

/// Tells the parent generation, when one started this process and speaks
/// protocol 2, why this one cannot start; the parent then fails the reload
/// with that reason instead of an exit status. Best effort, never blocks.
pub(crate) fn report_start_failure(config: &Config, reason: &str) {
    // Only on a channel proven to be the parent's, and only to a parent
    // that reads the line.
    let Ok(Some(found)) = ParentFds::find(config) else {
        return;
    };
    if found.parent_protocol.unwrap_or(1) < 2 {
        // A protocol-1 parent reads `ready` or nothing.
        return;
    }
    // SAFETY: the fd is open and is the parent's handover channel
    // (validated above); it is only borrowed for this one write and stays
    // owned by whoever owns it (or by no one, before it is taken).
    let channel = unsafe { BorrowedFd::borrow_raw(found.channel) };
    let line = super::channel::failed_line(reason);
    let _ = nix::unistd::write(channel, line.as_bytes());
}

/// The new process's side of the handshake.
pub(crate) struct Successor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    connections: Option<OwnedFd>,
}

impl Successor {
    /// Says `ready` on the channel (with our protocol and features when the
    /// parent speaks protocol 2): call once every socket is accepted from.
    pub(crate) async fn announce(
        inherited: Inherited,
        take_connections: bool,
        notes: &[String],
    ) -> std::io::Result<Successor> {
        let std = std::os::unix::net::UnixStream::from(inherited.channel);
        std.set_nonblocking(true)?;
        let (read, mut write) = tokio::net::UnixStream::from_std(std)?.into_split();
        // With a connection channel we always take the counters; the
        // connections only when the app lets them move.
        let has_channel = inherited.connections.is_some();
        // Ticket keys too: a generation without TLS ignores them. And the
        // app's state: an app that does not ask for it drops it.
        let features: &[Feature] = match (has_channel, take_connections) {
            (false, _) => &[],
            (true, false) => &[Feature::Counters, Feature::TlsTickets, Feature::AppState],
            (true, true) => &[
                Feature::MoveConnections,
                Feature::Counters,
                Feature::TlsTickets,
                Feature::AppState,
            ],
        };
        // Notes first: a protocol-2 parent collects them until `ready`; a
        // protocol-1 parent would take one for junk, so it gets none.
        if inherited.parent_protocol.unwrap_or(1) >= 2 {
            for n in notes {
                write
                    .write_all(super::channel::note_line(n).as_bytes())
                    .await?;
            }
        }
        let line = Ready::line(inherited.parent_protocol, features);
        write.write_all(line.as_bytes()).await?;
        Ok(Successor {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
            connections: inherited.connections,
        })
    }

    /// Waits for `commit`: the old process has ended its probation and
    /// hands the unit over. Anything else means the handover is off.
    pub(crate) async fn wait_commit(&mut self) -> Result<(), String> {
        match self.lines.next_line().await {
            Ok(Some(l)) if l == "commit" => Ok(()),
            Ok(Some(l)) => Err(format!("unexpected {l:?} on the handover channel")),
            Ok(None) => Err("the old process closed the handover channel".into()),
            Err(e) => Err(format!("handover channel: {e}")),
        }
    }

    /// The channel on which the old process sends its counters, and its
    /// connections and the app's state once we own the unit.
    pub(crate) fn connections(&mut self) -> Option<Connections> {
        self.connections
            .take()
            .and_then(|fd| Connections::new(fd).ok())
    }

    /// Says `owner`, after telling systemd `MAINPID=` (and waiting until it
    /// processed that). If the old process is gone by now, we own the unit
    /// all the same.
    pub(crate) async fn confirm_owner(mut self) {
        let _ = self.write.write_all(b"owner\n").await;
    }
}

/// The generation this process was started as (0 unless a handover started
/// it).
pub(crate) fn generation_from_env(config: &Config) -> Result<u32, String> {
    let var = config.var(Var::Generation);
    match std::env::var(&var) {
        Err(_) => Ok(0),
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{var}={v:?} is not a number")),
    }
}

/// The path to start the next generation from: `argv[0]` when it is a path
/// (made absolute now, since the working directory may change), else the
/// resolved executable. After a package upgrade that path holds the new
/// binary, while `/proc/self/exe` still points at the old, deleted one.
pub(crate) fn resolve_exe() -> std::io::Result<PathBuf> {
    if let Some(arg0) = std::env::args_os().next() {
        let p = PathBuf::from(&arg0);
        if p.components().count() > 1 {
            return Ok(if p.is_absolute() {
                p
            } else {
                std::env::current_dir()?.join(p)
            });
        }
    }
    std::env::current_exe()
}

/// This process's arguments, for the next generation.
pub(crate) fn args() -> Vec<OsString> {
    std::env::args_os().skip(1).collect()
}
