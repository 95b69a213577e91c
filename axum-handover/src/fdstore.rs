//! Idle connections kept across a restart, and optionally a crash, in
//! systemd's file descriptor store (systemd.io "The File Descriptor Store",
//! `sd_notify(3)`).
//!
//! A reload moves idle connections to the successor on the handover
//! channel. A restart (`systemctl restart`) has no successor to talk to:
//! systemd starts the next instance after this one exited. What it offers
//! instead is a store per service: fds sent with `FDSTORE=1` are kept by
//! systemd, and given to the next instance after the socket unit's, named
//! in `LISTEN_FDNAMES`.
//!
//! - A stop ([`Store`], with [`crate::Config::fd_store_connections`]):
//!   the stopping generation finishes the requests in progress, then puts
//!   every idle plain HTTP/1.1 connection into one seqpacket socketpair
//!   and stores its receiving end, one fd named [`BUNDLE`]; the next
//!   instance reads them out ([`unbundle`]) and serves them as moved
//!   connections. One fd, because systemd checks each stored fd against
//!   every one it holds (`same_fd`): one fd per connection cost PID 1 time
//!   in N² (7.5 s of its CPU for 4 000).
//! - The crash-safe mode ([`WhileIdle`], with
//!   [`crate::Config::fd_store_while_idle`]): a copy of each connection
//!   idle for [`STORE_AFTER`] waits in the store under a name of its own,
//!   and leaves it when its next request arrives.
//!
//! The store's rules, and how they are met here:
//! - systemd keeps a duplicate of each stored fd, so a connection the next
//!   instance closes would stay open in systemd: the next instance removes
//!   what it took (`FDSTOREREMOVE=1` by name) as soon as it owns it.
//! - One message carries at most [`FDS_PER_MESSAGE`] fds (the kernel's
//!   `SCM_MAX_FD`); the store holds at most `FileDescriptorStoreMax=`, and
//!   systemd closes what is over it, so the crash-safe mode never stores
//!   more than its room (and `$FDSTORE`, systemd ≥ 254, less one).
//! - systemd polls a stored fd and drops it on a hang-up; the bundle, whose
//!   sending end is closed, reports one at once: it is stored with
//!   `FDPOLL=0`.
//! - A plain `systemctl stop` discards the store, closing what it holds:
//!   the clients see their connections close then.
//! - Only what can be resumed from the socket alone is stored: a plain
//!   HTTP/1.1 connection between two requests with no bytes of the next
//!   request read yet. TLS (the session lives in this process) and HTTP/2
//!   (stream state) connections are drained as at any stop.
//!
//! A fd name is printable ASCII without ':', at most 255 bytes: the
//! crash-safe mode's names are [`PREFIX`], the listening socket's name (a
//! `LISTEN_FDNAMES` entry, already valid), `#` and a number; the bundle
//! carries its sockets' names inside.

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
        let held = &self.counters.gauges.fd_store_held;
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
        self.counters
            .gauges
            .fd_store_held
            .fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = remove_one(&name) {
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

/// What systemd says of the unit's store (`$FDSTORE`, its
/// `FileDescriptorStoreMax=`; systemd ≥ 254), if it says.
fn store_max(fdstore_env: Option<&str>) -> Option<usize> {
    fdstore_env.and_then(|v| v.trim().parse::<usize>().ok())
}

/// The room for a stop's connections: the setting, or none when systemd
/// says the unit has no store. They travel in one stored fd (see
/// [`Store`]), so the store's size does not bound them.
pub(crate) fn room(setting: usize, fdstore_env: Option<&str>) -> usize {
    match store_max(fdstore_env) {
        Some(0) => 0,
        _ => setting,
    }
}

/// The room for the crash-safe mode's connections, one stored fd each: the
/// setting, and at most what systemd says the store holds less one (for a
/// stop's bundle).
pub(crate) fn room_while_idle(setting: usize, fdstore_env: Option<&str>) -> usize {
    match store_max(fdstore_env) {
        Some(max) => setting.min(max.saturating_sub(1)),
        None => setting,
    }
}

/// The name of the one fd a stop stores: a seqpacket socket whose queue
/// holds the connections (see [`Store`]). Not under [`PREFIX`].
pub(crate) const BUNDLE: &str = "handover-conns";

/// How each of the bundle's datagrams starts; then the name of each fd's
/// listening socket, a line each, in the order of the fds attached.
const BUNDLE_HEADER: &str = "stored-conns v1\n";

/// Whether a `LISTEN_FDNAMES` entry is one of ours rather than a socket.
pub(crate) fn is_stored(name: &str) -> bool {
    name == BUNDLE || socket_of(name).is_some()
}

/// Why a connection was not put in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// Bytes of the next request were read already: they cannot travel
    /// with the fd.
    ReadAhead,
    /// The store has no room left.
    Full,
}

impl NotStored {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            NotStored::ReadAhead => "the start of its next request was read already",
            NotStored::Full => "the file descriptor store is full",
        }
    }
}

/// The connections a stopping generation keeps for the next start.
///
/// They do not go to systemd one fd each: systemd compares each fd it is
/// given with every one it holds (`same_fd`), so N connections would cost
/// PID 1 time in N² (measured: 0.5 s of PID 1's CPU for 1 000, 7.5 s for
/// 4 000, PID 1 serving no other unit meanwhile). Instead the connections
/// go into a seqpacket socketpair, 253 fds a datagram with their sockets'
/// names (fds in flight in a socket stay open), and the socketpair's
/// receiving end is the one fd stored (`FDNAME=handover-conns`). The next
/// start reads them out of it ([`unbundle`]). PID 1's work: one fd.
#[derive(Debug)]
pub(crate) struct Store {
    room: usize,
    held: Mutex<Vec<(String, OwnedFd)>>,
    not_stored: AtomicUsize,
}

/// What [`Store::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Connections systemd took (as far as the messages went through).
    pub(crate) stored: usize,
    /// Connections that could not be sent: closed.
    pub(crate) lost: usize,
    /// Connections served here instead (no room, bytes read ahead).
    pub(crate) not_stored: usize,
    /// Messages sent to systemd, the barrier included.
    pub(crate) messages: usize,
}

impl Store {
    pub(crate) fn new(room: usize) -> Store {
        Store {
            room,
            held: Mutex::new(Vec::new()),
            not_stored: AtomicUsize::new(0),
        }
    }

    /// Takes the connection for the store, or gives it back.
    pub(crate) fn put(
        &self,
        socket: &str,
        fd: OwnedFd,
        read_ahead: &[u8],
    ) -> Result<(), (OwnedFd, NotStored)> {
        let keep_out = |fd, why| {
            self.not_stored.fetch_add(1, Ordering::Relaxed);
            Err((fd, why))
        };
        if !read_ahead.is_empty() {
            return keep_out(fd, NotStored::ReadAhead);
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= self.room {
            drop(held);
            return keep_out(fd, NotStored::Full);
        }
        held.push((socket.to_string(), fd));
        Ok(())
    }

    /// Bundles what it holds (see [`Store`]), gives the bundle to systemd,
    /// then waits (`BARRIER=1`, at most `barrier`) until systemd has read
    /// it: the process may exit then without a message left unread when
    /// systemd sees it gone. Closes our copies (the bundle holds them).
    pub(crate) fn send(&self, barrier: Duration) -> Sent {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sent = Sent {
            not_stored: self.not_stored.load(Ordering::Relaxed),
            ..Sent::default()
        };
        if held.is_empty() {
            return sent;
        }
        let total = held.len();
        let (bundle, bundled) = match bundle(held) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(event = "fd_store_failed", error = %e,
                    "cannot bundle {total} connections for systemd's file descriptor store: {e}; they close");
                sent.lost = total;
                return sent;
            }
        };
        sent.lost = total - bundled;
        sent.messages = 1;
        // FDPOLL=0: systemd drops a stored fd that reports a hang-up,
        // and the bundle's sending end (closed: only datagrams are left)
        // makes it report one at once. (systemd ≥ 246.)
        let states = [
            NotifyState::FdStore,
            NotifyState::FdName(BUNDLE),
            NotifyState::Custom("FDPOLL=0"),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[bundle.as_fd()]) {
            tracing::warn!(event = "fd_store_failed", error = %e,
                "cannot put {bundled} connections in systemd's file descriptor store: {e}; they close");
            sent.lost = total;
            return sent;
        }
        sent.stored = bundled;
        sent.messages += 1;
        if let Err(e) = crate::notify::barrier(barrier) {
            tracing::warn!(event = "notify_barrier_failed", error = %e,
                "systemd did not confirm the stored connections; exiting all the same");
        }
        sent
    }
}

/// Puts the connections in a new seqpacket socketpair, [`FDS_PER_MESSAGE`]
/// a datagram; returns its receiving end and how many went in (the rest,
/// past a full socket buffer, are closed).
fn bundle(held: Vec<(String, OwnedFd)>) -> io::Result<(OwnedFd, usize)> {
    use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let (send, recv) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // Nobody reads until the next start: the datagrams wait in the
    // sender's budget (a few KB each). As much as the system allows
    // (net.core.wmem_max); 10 000 connections take about 200 KB.
    let _ = socket::setsockopt(&send, socket::sockopt::SndBuf, &(16 << 20));
    let mut bundled = 0;
    for chunk in held.chunks(FDS_PER_MESSAGE) {
        let mut text = String::from(BUNDLE_HEADER);
        for (name, _) in chunk {
            text.push_str(name);
            text.push('\n');
        }
        let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let iov = [io::IoSlice::new(text.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        if let Err(e) = socket::sendmsg::<()>(send.as_raw_fd(), &iov, &cmsg, flags, None) {
            tracing::warn!(event = "fd_store_failed", error = %e,
                "cannot bundle more connections ({} of {} in): {e}; the rest close",
                bundled, held.len());
            break;
        }
        bundled += chunk.len();
    }
    Ok((recv, bundled))
}

/// Reads the connections out of a stored bundle: each with its listening
/// socket's name. A datagram that is not a bundle's, and fds that are not
/// connected stream sockets, are dropped (closed).
pub(crate) fn unbundle(bundle: OwnedFd) -> Result<Vec<(String, OwnedFd)>, String> {
    use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockType};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    match socket::getsockopt(&bundle, socket::sockopt::SockType) {
        Ok(SockType::SeqPacket) => {}
        _ => return Err("not a seqpacket socket".into()),
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; FDS_PER_MESSAGE * (MAX_NAME + 1) + BUNDLE_HEADER.len()];
    loop {
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = match socket::recvmsg::<()>(
            bundle.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => return Err(e.to_string()),
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: the kernel just installed these fds in this
                // process for us; nothing else owns them.
                fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let len = msg.bytes;
        if len == 0 && fds.is_empty() {
            // The sending end is closed: every datagram is read.
            break;
        }
        let Some(text) = std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(|t| t.strip_prefix(BUNDLE_HEADER))
        else {
            continue;
        };
        let names: Vec<&str> = text.lines().collect();
        if names.len() != fds.len() {
            continue;
        }
        for (name, fd) in names.into_iter().zip(fds) {
            out.push((name.to_string(), fd));
        }
    }
    Ok(out)
}

/// Tells systemd to let go of its copies of the stored connections now
/// owned by this process, one message per name (`FDSTOREREMOVE=1`): a
/// connection this process closes then closes for its client too.
pub(crate) fn remove(names: &[String]) -> io::Result<usize> {
    for name in names {
        remove_one(name)?;
    }
    Ok(names.len())
}

/// One `FDSTOREREMOVE=1` message: systemd closes its copy of the fd stored
/// under `name`.
fn remove_one(name: &str) -> io::Result<()> {
    sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
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
    fn rooms_follow_what_systemd_says_of_the_store() {
        // A stop's connections take one stored fd, whatever their number.
        assert_eq!(room(10_000, None), 10_000);
        assert_eq!(room(10_000, Some("1")), 10_000);
        assert_eq!(room(10_000, Some("0")), 0);
        // The crash-safe mode's take one each, and leave one for a stop.
        assert_eq!(room_while_idle(4096, Some("1024")), 1023);
        assert_eq!(room_while_idle(100, Some("1024")), 100);
        assert_eq!(room_while_idle(100, Some("0")), 0);
        assert_eq!(room_while_idle(100, None), 100);
        // A variable that is not a number says nothing.
        assert_eq!(room_while_idle(100, Some("lots")), 100);
    }

    #[test]
    fn a_bundle_carries_connections_and_their_sockets_names() {
        use std::os::unix::net::UnixStream;
        // 300 connections: two datagrams.
        let mut peers = Vec::new();
        let mut held = Vec::new();
        for i in 0..300 {
            let (a, b) = UnixStream::pair().unwrap();
            peers.push(b);
            let socket = if i % 2 == 0 { "http" } else { "admin" };
            held.push((socket.to_string(), OwnedFd::from(a)));
        }
        let (bundle_fd, bundled) = bundle(held).unwrap();
        assert_eq!(bundled, 300);
        let got = unbundle(bundle_fd).unwrap();
        assert_eq!(got.len(), 300);
        // In order, each the very connection: what is written to it
        // arrives at its peer.
        for (i, (socket, fd)) in got.into_iter().enumerate() {
            assert_eq!(socket, if i % 2 == 0 { "http" } else { "admin" });
            let mut s = UnixStream::from(fd);
            std::io::Write::write_all(&mut s, &[i as u8]).unwrap();
            let mut b = [0u8; 1];
            std::io::Read::read_exact(&mut peers[i], &mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        // Not a bundle: refused.
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(unbundle(OwnedFd::from(a)).is_err());
    }

    #[test]
    fn refuses_past_its_room_and_with_bytes_read_ahead() {
        assert!(is_stored(BUNDLE) && is_stored("handover-conn.http#3"));
        assert!(!is_stored("http") && !is_stored("handover-connsx"));
        let store = Store::new(1);
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(store.put("a", fd(), b"").is_ok());
        assert_eq!(store.put("a", fd(), b"").unwrap_err().1, NotStored::Full);
        assert_eq!(
            store.put("a", fd(), b"GET").unwrap_err().1,
            NotStored::ReadAhead
        );
    }
}
