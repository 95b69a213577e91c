//! The new process's side of a handover: take what the parent passed
//! (before the runtime starts), say `ready`, wait for `commit`, say `owner`,
//! then take the connections the parent moves.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

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
}

/// Takes the parent's fds, if a parent started us. Call before anything
/// else opens files.
pub(crate) fn take(config: &Config) -> Result<Option<Inherited>, String> {
    let Some(channel) = take_fd(&config.var(Var::HandoverFd))? else {
        return Ok(None);
    };
    let protocol_var = config.var(Var::Protocol);
    let parent_protocol = match std::env::var(&protocol_var) {
        Err(_) => None,
        Ok(v) => Some(
            v.parse::<u32>()
                .map_err(|_| format!("{protocol_var}={v:?} is not a number"))?,
        ),
    };
    // Only a parent that speaks protocol 2 passes (and will use) the second
    // channel.
    let connections = match parent_protocol {
        Some(p) if p >= 2 => take_fd(&config.var(Var::ConnectionsFd))?,
        _ => None,
    };
    Ok(Some(Inherited {
        channel,
        parent_protocol,
        connections,
    }))
}

fn take_fd(var: &str) -> Result<Option<OwnedFd>, String> {
    let Ok(v) = std::env::var(var) else {
        return Ok(None);
    };
    let fd: RawFd = v
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{var}={v:?} is not a file descriptor"))?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{var}={fd} is not open"));
    }
    // SAFETY: the fd is open and nothing else in this process owns it: the
    // parent placed it here for us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not for our own children.
    // SAFETY: F_SETFD on the fd we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(owned))
}

/// Tells the parent generation, when one started this process and speaks
/// protocol 2, why this one cannot start; the parent then fails the reload
/// with that reason instead of an exit status. Best effort, never blocks.
pub(crate) fn refuse(config: &Config, reason: &str) {
    let protocol = std::env::var(config.var(Var::Protocol))
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    if protocol.unwrap_or(1) < 2 {
        // A protocol-1 parent reads `ready` or nothing.
        return;
    }
    let Some(fd) = std::env::var(config.var(Var::HandoverFd))
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
    else {
        return;
    };
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return;
    }
    // SAFETY: the fd is open (checked above) and is the handover channel
    // the parent placed for us; it is only borrowed for this one write and
    // stays owned by whoever owns it (or by no one, before it is taken).
    let channel = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
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
        // Ticket keys too: a generation without TLS ignores them.
        let features: &[Feature] = match (has_channel, take_connections) {
            (false, _) => &[],
            (true, false) => &[Feature::Counters, Feature::TlsTickets],
            (true, true) => &[
                Feature::MoveConnections,
                Feature::Counters,
                Feature::TlsTickets,
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
    /// connections once we own the unit.
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
