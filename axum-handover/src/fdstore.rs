//! Idle connections kept across a restart in systemd's file descriptor
//! store (systemd.io "The File Descriptor Store", `sd_notify(3)`).
//!
//! A reload moves idle connections to the successor on the handover
//! channel. A restart (`systemctl restart`, `Restart=on-failure` after the
//! process died) has no successor to talk to: systemd starts the next
//! instance after this one exited. What it offers instead is a store per
//! service: fds sent with `FDSTORE=1` are kept by systemd, and given to the
//! next instance after the socket unit's, named in `LISTEN_FDNAMES`. So a
//! stopping generation (with [`crate::Config::fd_store_connections`] on)
//! finishes the requests in progress, puts every idle plain HTTP/1.1
//! connection in the store, and exits; the next instance takes them out and
//! serves them as moved connections. The clients notice nothing: a request
//! sent in the gap waits in the socket's kernel buffer.
//!
//! The rules the store sets, and how they are met here:
//! - systemd keeps a duplicate of each stored fd, so a connection the next
//!   instance closes would stay open in systemd: the next instance removes
//!   them (`FDSTOREREMOVE=1` by name) as soon as it owns them. All the
//!   connections of one socket share one name, so that is one message per
//!   socket, not one per connection: PID 1 serves every unit.
//! - One message carries at most [`FDS_PER_MESSAGE`] fds (the kernel's
//!   `SCM_MAX_FD`); the store holds at most `FileDescriptorStoreMax=`, and
//!   systemd closes what is over it. So this side never sends more than
//!   the room it was given (`$FDSTORE`, which systemd ≥ 254 sets to the
//!   unit's maximum, or the setting when lower; 252 does not set it): a
//!   connection beyond that is not sent, and is served here to the end
//!   instead (its next response says `Connection: close`), counted and
//!   logged, never lost unannounced.
//! - systemd checks each stored fd against every one it holds (`same_fd`),
//!   so storing n fds costs PID 1 time in n²: the room is a bound on PID
//!   1's work as much as on the fds (docs/src/operator/restart.md).
//! - A plain `systemctl stop` discards the store, closing systemd's
//!   copies: the clients see their connections close then.
//! - Only what can be resumed from the socket alone is stored: a plain
//!   HTTP/1.1 connection between two requests with no bytes of the next
//!   request read yet. TLS (the session lives in this process) and HTTP/2
//!   (stream state) connections are drained as at any stop.
//!
//! A fd name is printable ASCII without ':', at most 255 bytes: the store's
//! names are [`PREFIX`] followed by the listening socket's name (a
//! `LISTEN_FDNAMES` entry, already valid), which tells the next instance
//! which socket's routes serve it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// What the names of stored connections start with. A name without it (a
/// socket unit's socket, or an fd the app stores itself) is not ours.
pub(crate) const PREFIX: &str = "handover-conn.";

/// systemd's limit on a fd name.
const MAX_NAME: usize = 255;

/// The most fds one `sendmsg` passes (`SCM_MAX_FD`).
pub(crate) const FDS_PER_MESSAGE: usize = 253;

/// At most this many stored connections are taken at a start (more is
/// taken as garbage in `LISTEN_FDS`).
pub(crate) const MAX_TAKEN: usize = 1 << 20;

/// The store's name for connections of the socket `socket`, or `None` when
/// the name would be too long.
pub(crate) fn name_for(socket: &str) -> Option<String> {
    let name = format!("{PREFIX}{socket}");
    (name.len() <= MAX_NAME).then_some(name)
}

/// The socket a stored connection's name names, or `None` when the name is
/// not one of ours. A connection kept while idle has a name of its own:
/// the socket's, then `#` and a number ([`WhileIdle`]).
pub(crate) fn socket_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    Some(match rest.rsplit_once('#') {
        Some((socket, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => socket,
        _ => rest,
    })
}

/// How long a connection is idle before the crash-safe mode puts it in
/// the store: a client that sends its next request sooner (a busy
/// keep-alive connection, a one-shot client) costs PID 1 nothing.
pub(crate) const STORE_AFTER: Duration = Duration::from_secs(1);

/// A connection's number when the store did not take it this idle spell
/// (never a stored connection's number).
pub(crate) const NOT_TAKEN: u32 = u32::MAX;

/// The crash-safe mode ([`crate::Config::fd_store_while_idle`]): each
/// connection idle for [`STORE_AFTER`] is put in the store under a name of
/// its own (a copy: the process keeps serving it), and taken out again
/// (`FDSTOREREMOVE=1`) when it wakes, before a byte of its next request is
/// read, or closes. When the process dies, the connections idle then are
/// in the store, and the next start serves them; what is lost is what was
/// in progress. Two messages to PID 1 per idle spell, each store costing
/// PID 1 a comparison with every fd it holds: see
/// docs/src/operator/restart.md for what that costs.
#[derive(Debug)]
pub(crate) struct WhileIdle {
    room: usize,
    next: AtomicU32,
    /// Its gauge, `Counters::fd_store_held`.
    counters: std::sync::Arc<crate::server::Counters>,
    /// The name of each connection in the store, by number: kept here
    /// rather than in every connection's task (see `conn::serve`).
    names: Mutex<std::collections::HashMap<u32, String>>,
    /// Gives up after the first failed message (a NOTIFY_SOCKET gone), said
    /// once.
    broken: AtomicBool,
    notifier: std::sync::Arc<crate::notify::Notifier>,
}

impl WhileIdle {
    pub(crate) fn new(
        room: usize,
        notifier: std::sync::Arc<crate::notify::Notifier>,
        counters: std::sync::Arc<crate::server::Counters>,
    ) -> WhileIdle {
        WhileIdle {
            room,
            next: AtomicU32::new(1),
            counters,
            names: Mutex::new(std::collections::HashMap::new()),
            broken: AtomicBool::new(false),
            notifier,
        }
    }

    /// Puts a copy of the connection in the store; its number, or 0 when it
    /// was not stored (no room, not the unit's main process, a failure).
    pub(crate) fn store(&self, socket: &str, fd: BorrowedFd<'_>) -> u32 {
        // Only the process that speaks for the unit: a new generation
        // before its commit, or an old one after, serves briefly.
        if !self.notifier.speaks() || self.broken.load(Ordering::Relaxed) {
            return 0;
        }
        let held = &self.counters.fd_store_held;
        if held.fetch_add(1, Ordering::Relaxed) >= self.room {
            held.fetch_sub(1, Ordering::Relaxed);
            return 0;
        }
        // 0 means "not stored"; a number comes round again after 4 billion
        // stores, long after its first holder left the store.
        let id = loop {
            match self.next.fetch_add(1, Ordering::Relaxed) {
                0 | NOT_TAKEN => continue,
                n => break n,
            }
        };
        let Some(name) = name_for(&format!("{socket}#{id}")) else {
            held.fetch_sub(1, Ordering::Relaxed);
            return 0;
        };
        let states = [NotifyState::FdStore, NotifyState::FdName(&name)];
        match sd_notify::notify_with_fds(&states, &[fd]) {
            Ok(()) => {
                self.names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, name);
                id
            }
            Err(e) => {
                held.fetch_sub(1, Ordering::Relaxed);
                self.fail(&e);
                0
            }
        }
    }

    /// Takes connection `id` (from [`WhileIdle::store`]) out of the store.
    pub(crate) fn remove(&self, id: u32) {
        let name = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let Some(name) = name else {
            return;
        };
        self.counters.fd_store_held.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)])
        {
            self.fail(&e);
        }
    }

    fn fail(&self, e: &io::Error) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!(event = "fd_store_failed", error = %e,
                "cannot use systemd's file descriptor store: {e}; idle connections are no longer kept for a crash");
        }
    }
}

/// The room for connections in the store: the setting, and at most what
/// systemd says the unit allows (`$FDSTORE`, systemd ≥ 254).
pub(crate) fn room(setting: usize, fdstore_env: Option<&str>) -> usize {
    match fdstore_env.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(max) => setting.min(max),
        None => setting,
    }
}

/// Why a connection was not put in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Bytes of the next request were read already: they cannot travel
    /// with the fd.
    ReadAhead,
    /// The store has no room left.
    Full,
    /// The socket's name is too long to name the connection by.
    Name,
}

impl Refused {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::ReadAhead => "the start of its next request was read already",
            Refused::Full => "the file descriptor store is full",
            Refused::Name => "its socket's name is too long for a fd name",
        }
    }
}

/// The connections a stopping generation puts in the store, sent when it
/// has finished with the rest.
#[derive(Debug)]
pub(crate) struct Store {
    room: usize,
    held: Mutex<Vec<(String, OwnedFd)>>,
    refused: AtomicUsize,
}

/// What [`Store::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Connections systemd took (as far as the messages went through).
    pub(crate) stored: usize,
    /// Connections whose message failed: closed.
    pub(crate) lost: usize,
    /// Connections served here instead (no room, bytes read ahead).
    pub(crate) refused: usize,
    /// Messages sent to systemd, the barrier included.
    pub(crate) messages: usize,
}

impl Store {
    pub(crate) fn new(room: usize) -> Store {
        Store {
            room,
            held: Mutex::new(Vec::new()),
            refused: AtomicUsize::new(0),
        }
    }

    /// Takes the connection for the store, or gives it back.
    pub(crate) fn put(
        &self,
        socket: &str,
        fd: OwnedFd,
        read_ahead: &[u8],
    ) -> Result<(), (OwnedFd, Refused)> {
        let refuse = |fd, why| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err((fd, why))
        };
        if !read_ahead.is_empty() {
            return refuse(fd, Refused::ReadAhead);
        }
        let Some(name) = name_for(socket) else {
            return refuse(fd, Refused::Name);
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= self.room {
            drop(held);
            return refuse(fd, Refused::Full);
        }
        held.push((name, fd));
        Ok(())
    }

    /// Sends what it holds to systemd, a name at a time in messages of at
    /// most [`FDS_PER_MESSAGE`] fds, then waits (`BARRIER=1`, at most
    /// `barrier`) until systemd has read them all: the process may exit
    /// then without a message left unread when systemd sees it gone.
    /// Closes our copies (systemd holds its own).
    pub(crate) fn send(&self, barrier: Duration) -> Sent {
        let mut held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        held.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sent = Sent {
            refused: self.refused.load(Ordering::Relaxed),
            ..Sent::default()
        };
        for group in held.chunk_by(|a, b| a.0 == b.0) {
            let name = group[0].0.as_str();
            for chunk in group.chunks(FDS_PER_MESSAGE) {
                let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
                sent.messages += 1;
                let states = [NotifyState::FdStore, NotifyState::FdName(name)];
                match sd_notify::notify_with_fds(&states, &fds) {
                    Ok(()) => sent.stored += fds.len(),
                    Err(e) => {
                        sent.lost += fds.len();
                        tracing::warn!(event = "fd_store_failed", error = %e,
                            connections = fds.len(),
                            "cannot put {} connections in systemd's file descriptor store: {e}; they close",
                            fds.len());
                    }
                }
            }
        }
        if sent.stored > 0 {
            sent.messages += 1;
            if let Err(e) = crate::notify::barrier(barrier) {
                tracing::warn!(event = "notify_barrier_failed", error = %e,
                    "systemd did not confirm the stored connections; exiting all the same");
            }
        }
        sent
    }
}

/// Tells systemd to let go of its copies of the stored connections now
/// owned by this process, one message per name (`FDSTOREREMOVE=1`): a
/// connection this process closes then closes for its client too.
pub(crate) fn remove(names: &[String]) -> io::Result<usize> {
    let mut messages = 0;
    for name in names {
        sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])?;
        messages += 1;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_which_socket() {
        let name = name_for("pid-server.socket").unwrap();
        assert_eq!(name, "handover-conn.pid-server.socket");
        assert_eq!(socket_of(&name), Some("pid-server.socket"));
        assert_eq!(socket_of("pid-server.socket"), None);
        assert_eq!(socket_of("stored"), None);
        // A connection kept while idle has a number of its own.
        assert_eq!(
            socket_of("handover-conn.pid-server.socket#42"),
            Some("pid-server.socket")
        );
        assert_eq!(socket_of("handover-conn.a#b"), Some("a#b"));
        assert_eq!(socket_of("handover-conn.a#"), Some("a#"));
        assert!(name_for(&"x".repeat(MAX_NAME)).is_none());
    }

    #[test]
    fn room_is_the_lower_of_the_setting_and_systemds() {
        assert_eq!(room(4096, None), 4096);
        assert_eq!(room(4096, Some("1024")), 1024);
        assert_eq!(room(100, Some("1024")), 100);
        // A variable that is not a number says nothing.
        assert_eq!(room(100, Some("lots")), 100);
    }

    #[test]
    fn refuses_past_its_room_and_with_bytes_read_ahead() {
        let store = Store::new(1);
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(store.put("a", fd(), b"").is_ok());
        assert_eq!(store.put("a", fd(), b"").unwrap_err().1, Refused::Full);
        assert_eq!(
            store.put("a", fd(), b"GET").unwrap_err().1,
            Refused::ReadAhead
        );
    }
}
