//! The handover channel's messages, and how each side learns what the other
//! understands.
//!
//! Every upgrade is a handover between two releases, so both directions
//! must work with a peer that predates any extension:
//!
//! - Protocol 1 (the first release): lines on a stream socketpair. The new
//!   process says `ready`, the old one `commit`, the new one `owner`. A
//!   protocol-1 process matches these lines exactly and knows no variable
//!   besides the sockets', the generation and the channel's fd.
//! - Protocol 2 adds, without changing those lines for a protocol-1 peer:
//!   the parent sets `<PREFIX>_HANDOVER_PROTOCOL=2` and passes a second,
//!   seqpacket, socketpair (`<PREFIX>_HANDOVER_CONNECTIONS_FD`). A child
//!   that sees the variable answers `ready <version> <feature>...` (a
//!   protocol-1 parent never sees that form, because it never sets the
//!   variable); a child that does not (a protocol-1 child) says plain
//!   `ready` and ignores the second socket. Each side uses a feature only
//!   when both named it; unknown words are ignored, so a later protocol can
//!   add features the same way.
//!
//! The features today, both on the seqpacket channel:
//! - `move-connections`: once the new process owns the unit, the old one
//!   sends it each idle keep-alive connection, one datagram each: a header
//!   line `conn tcp <n> <socket>` or `conn unix <n> <socket>` (the name of
//!   the listening socket it came in on), then the `n` bytes it had read but
//!   not yet parsed, with the connection's fd attached (`SCM_RIGHTS`).
//! - `counters`: the old process sends its metrics' totals (a datagram
//!   `counters` and a line per value, no fd) when the new one is ready and
//!   again when it has let go of everything.
//! - `tls-tickets`: the old process sends its TLS session-ticket keys (a
//!   datagram `tls-tickets` and a line `key <id> <key>` each, hex, no fd)
//!   when the new one is ready, so clients resume their sessions with it.
//!   Secret: it only ever crosses this private socketpair.
//! - `app-state`: the old process sends the app's own state
//!   ([`crate::Hooks::save_state`]), once, right after the new process took
//!   over the unit: in chunks (`app-state <offset> <total>` and the bytes,
//!   no fd), or `app-state none`; see [`super::state`]. A successor that
//!   predates it gets none; one whose parent predates it hears "none" when
//!   the channel closes.
//!
//! A child that cannot start says `failed <reason>` instead of `ready`
//! (protocol 2 only), and the reload fails with that reason.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The newest protocol this build speaks.
pub(crate) const PROTOCOL: u32 = 2;

/// A feature a protocol-2 peer may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feature {
    /// Idle keep-alive connections move to the new process.
    MoveConnections,
    /// The old process's counters carry over to the new one.
    Counters,
    /// The old process's session-ticket keys go to the new one.
    TlsTickets,
    /// The app's own state goes to the new process.
    AppState,
}

impl Feature {
    const ALL: [Feature; 4] = [
        Feature::MoveConnections,
        Feature::Counters,
        Feature::TlsTickets,
        Feature::AppState,
    ];

    fn word(self) -> &'static str {
        match self {
            Feature::MoveConnections => "move-connections",
            Feature::Counters => "counters",
            Feature::TlsTickets => "tls-tickets",
            Feature::AppState => "app-state",
        }
    }
}

/// What the new process said it speaks, from its `ready` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) protocol: u32,
    pub(crate) features: Vec<Feature>,
}

impl Ready {
    /// Parses a `ready` line: `None` for anything else.
    pub(crate) fn parse(line: &str) -> Option<Ready> {
        let mut words = line.split(' ');
        if words.next()? != "ready" {
            return None;
        }
        let Some(v) = words.next() else {
            return Some(Ready {
                protocol: 1,
                features: Vec::new(),
            });
        };
        let protocol: u32 = v.parse().ok().filter(|v| *v >= 2)?;
        let features = words
            .filter_map(|w| Feature::ALL.into_iter().find(|f| f.word() == w))
            .collect();
        Some(Ready { protocol, features })
    }

    /// The line the new process sends. `parent`: the protocol the parent
    /// advertised (`None`: a protocol-1 parent, which wants `ready` alone).
    pub(crate) fn line(parent: Option<u32>, features: &[Feature]) -> String {
        match parent {
            None | Some(0..=1) => "ready\n".into(),
            Some(p) => {
                let mut s = format!("ready {}", p.min(PROTOCOL));
                for f in features {
                    s.push(' ');
                    s.push_str(f.word());
                }
                s.push('\n');
                s
            }
        }
    }

    pub(crate) fn has(&self, f: Feature) -> bool {
        self.features.contains(&f)
    }
}

/// The line a protocol-2 child sends instead of `ready` when it cannot
/// start (a configuration it cannot load, a socket it cannot use), before
/// it exits: `failed <reason>`.
pub(crate) fn failed_line(reason: &str) -> String {
    format!("failed {}\n", reason.replace('\n', " "))
}

/// The reason in a `failed` line.
pub(crate) fn failed_reason(line: &str) -> Option<&str> {
    line.strip_prefix("failed ").filter(|r| !r.is_empty())
}

/// A line a protocol-2 child may send before `ready`: something the
/// operator should hear about this reload (a setting it cannot apply), shown
/// by the reload helper. `note <text>`.
pub(crate) fn note_line(text: &str) -> String {
    format!("note {}\n", text.replace('\n', " "))
}

/// The text of a `note` line.
pub(crate) fn note_text(line: &str) -> Option<&str> {
    line.strip_prefix("note ").filter(|t| !t.is_empty())
}

/// The most notes a parent keeps from one child.
pub(crate) const MAX_NOTES: usize = 16;

/// The kind of a moved connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Unix,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Unix => "unix",
        }
    }
}

/// The largest datagram: a header and the bytes read ahead (hyper reads at
/// most its buffer limit ahead, well under this).
pub(crate) const MAX_DATAGRAM: usize = 256 * 1024;

/// A moved connection's datagram, without its fd: the header names the
/// listening socket it was accepted on, so the new process serves it with
/// that socket's routes.
pub(crate) fn encode(kind: Kind, socket: &str, read_ahead: &[u8]) -> Vec<u8> {
    let socket = socket.replace('\n', " ");
    let mut out = format!("conn {} {} {socket}\n", kind.word(), read_ahead.len()).into_bytes();
    out.extend_from_slice(read_ahead);
    out
}

/// Why a datagram was not a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadMessage {
    #[error("not a connection message")]
    Header,
    #[error("says {said} bytes follow, {got} did")]
    Length { said: usize, got: usize },
    #[error("arrived without its connection's fd")]
    NoFd,
    #[error("arrived with {0} fds")]
    Fds(usize),
    #[error("was cut short (datagram or fds truncated)")]
    Truncated,
}

/// Parses a datagram: the kind, the socket's name (the rest of the header
/// line; empty when none was given) and the bytes read ahead.
pub(crate) fn decode(datagram: &[u8]) -> Result<(Kind, &str, &[u8]), BadMessage> {
    let nl = datagram
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(BadMessage::Header)?;
    let header = std::str::from_utf8(&datagram[..nl]).map_err(|_| BadMessage::Header)?;
    let rest = &datagram[nl + 1..];
    let mut w = header.splitn(4, ' ');
    if w.next() != Some("conn") {
        return Err(BadMessage::Header);
    }
    let kind = match w.next() {
        Some("tcp") => Kind::Tcp,
        Some("unix") => Kind::Unix,
        _ => return Err(BadMessage::Header),
    };
    let said: usize = w
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(BadMessage::Header)?;
    let socket = w.next().unwrap_or("");
    if said != rest.len() {
        return Err(BadMessage::Length {
            said,
            got: rest.len(),
        });
    }
    Ok((kind, socket, rest))
}

/// A seqpacket socketpair for moving connections: (the parent's end, the
/// child's end), both close-on-exec.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    Ok((a, b))
}

/// One end of the connection channel, registered with the runtime.
pub(crate) struct Connections {
    fd: AsyncFd<OwnedFd>,
    /// A successor's: where the app state that arrives goes (boxed: the
    /// old process's end, which has none, travels in `Joined`).
    state: Option<Box<super::state::Receiving>>,
}

impl Connections {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Connections> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: `OwnedFd` is a valid open fd that stays open, and is the
        // same fd, for as long as the `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Connections { fd, state: None })
    }

    /// A successor's end: app state that arrives goes to `inbox` (and
    /// "none", when this end is dropped before it came).
    pub(crate) fn receiving_state(
        mut self,
        inbox: std::sync::Arc<super::state::Inbox>,
    ) -> Connections {
        self.state = Some(Box::new(super::state::Receiving::new(inbox)));
        self
    }

    /// Sends one connection: its fd and the bytes read ahead. When this
    /// returns `Ok` the kernel holds the fd for the peer and the caller may
    /// close its own.
    pub(crate) async fn send(
        &self,
        kind: Kind,
        socket: &str,
        conn: BorrowedFd<'_>,
        read_ahead: &[u8],
    ) -> io::Result<()> {
        let msg = encode(kind, socket, read_ahead);
        let fds = [conn.as_raw_fd()];
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [io::IoSlice::new(&msg)];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }

    /// Sends a message without an fd: the counters, the session-ticket
    /// keys or a chunk of the app's state, each saying what it is in its
    /// first bytes (see [`message`]).
    pub(crate) async fn send_datagram(&self, datagram: &[u8]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                socket::send(fd.as_raw_fd(), datagram, MsgFlags::MSG_NOSIGNAL)
                    .map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }

    /// Sends the app's state (`None`: it has none), chunk by chunk (see
    /// [`super::state`]).
    pub(crate) async fn send_state(&self, state: Option<&[u8]>) -> io::Result<()> {
        for datagram in super::state::encode(state) {
            self.send_datagram(&datagram).await?;
        }
        Ok(())
    }

    /// Receives the next datagram: `None` once the peer closed its end.
    /// A datagram that is not a well-formed connection is an `Err` of its
    /// own (its fds, if any, are closed); the channel stays usable. App
    /// state is taken here, on a successor's end, and not returned.
    pub(crate) async fn recv(&self) -> io::Result<Option<Result<Message, BadMessage>>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let got = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    recv_one(fd.as_fd(), &mut buf, self.state.as_deref())
                })
                .await?;
            if let Some(got) = got {
                return Ok(got);
            }
        }
    }
}

/// A message on the connection channel.
#[derive(Debug)]
pub(crate) enum Message {
    Connection(Received),
    Counters(crate::metrics::Carried),
    TlsTickets(crate::tls::TicketKeys),
}

/// A connection as it arrived.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) kind: Kind,
    /// The listening socket's name, as the old process knew it.
    pub(crate) socket: String,
    pub(crate) fd: OwnedFd,
    pub(crate) read_ahead: Vec<u8>,
}

/// One datagram: `Ok(None)` when it was app state, taken by `state`.
#[allow(clippy::type_complexity)]
fn recv_one(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    state: Option<&super::state::Receiving>,
) -> io::Result<Option<Option<Result<Message, BadMessage>>>> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these fds in this process
            // for us; nothing else owns them.
            fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let len = msg.bytes;
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    if len == 0 && fds.is_empty() {
        return Ok(Some(None));
    }
    let datagram = &buf[..len];
    if let Some(state) = state
        && !truncated
        && fds.is_empty()
        && let Some(chunk) = super::state::decode(datagram)
    {
        state.take(chunk);
        return Ok(None);
    }
    Ok(Some(Some(message(datagram, fds, truncated))))
}

/// What a datagram and its fds are.
pub(crate) fn message(
    datagram: &[u8],
    fds: Vec<OwnedFd>,
    truncated: bool,
) -> Result<Message, BadMessage> {
    if !truncated
        && fds.is_empty()
        && let Some(c) = crate::metrics::Carried::decode(datagram)
    {
        return Ok(Message::Counters(c));
    }
    if !truncated
        && fds.is_empty()
        && let Some(k) = crate::tls::TicketKeys::decode(datagram)
    {
        return Ok(Message::TlsTickets(k));
    }
    check(datagram, fds, truncated).map(Message::Connection)
}

/// Pairs a datagram with the fds that came with it.
pub(crate) fn check(
    datagram: &[u8],
    mut fds: Vec<OwnedFd>,
    truncated: bool,
) -> Result<Received, BadMessage> {
    if truncated {
        return Err(BadMessage::Truncated);
    }
    let (kind, socket, read_ahead) = decode(datagram)?;
    match fds.len() {
        0 => Err(BadMessage::NoFd),
        1 => Ok(Received {
            kind,
            socket: socket.to_string(),
            fd: fds.pop().expect("one fd"),
            read_ahead: read_ahead.to_vec(),
        }),
        n => Err(BadMessage::Fds(n)),
    }
}

/// Fuzzing entry: every message either side may receive, in every
/// protocol version. The first byte picks the message and how many fds
/// "arrive" with a connection datagram; none may panic, and what parses
/// must print back to the same.
pub fn fuzz_one(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick & 1 == 0 {
        // The new process's `ready` or `failed` line, as the old one reads it.
        let Ok(line) = std::str::from_utf8(rest) else {
            return;
        };
        if let Some(r) = Ready::parse(line) {
            let printed = Ready::line(Some(r.protocol.max(2)), &r.features);
            let again = Ready::parse(printed.trim_end()).expect("a printed ready line parses");
            assert_eq!(again.features, r.features);
        }
        if let Some(reason) = failed_reason(line) {
            let printed = failed_line(reason);
            assert_eq!(
                failed_reason(printed.trim_end()),
                Some(reason.replace('\n', " ").as_str())
            );
        }
        return;
    }
    // A datagram on the connection channel, with 0..=3 fds.
    if let Some(chunk) = super::state::decode(rest) {
        // Any chunk, however wrong, is taken or refused without a panic.
        let _ = super::state::Assembly::default().push(chunk);
        if chunk == super::state::Chunk::None {
            assert_eq!(super::state::encode(None), [rest.to_vec()]);
        }
        return;
    }
    let fds: Vec<OwnedFd> = (0..(pick >> 1) % 4)
        .filter_map(|_| std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
        .collect();
    let n = fds.len();
    match message(rest, fds, pick & 0x80 != 0) {
        Ok(Message::Connection(r)) => {
            assert_eq!(n, 1);
            assert_eq!(
                decode(&encode(r.kind, &r.socket, &r.read_ahead)),
                decode(rest)
            );
        }
        Ok(Message::Counters(c)) => {
            assert_eq!(n, 0);
            assert_eq!(crate::metrics::Carried::decode(&c.encode()), Some(c));
        }
        Ok(Message::TlsTickets(k)) => {
            assert_eq!(n, 0);
            assert_eq!(crate::tls::TicketKeys::decode(&k.encode()), Some(k));
        }
        Err(BadMessage::NoFd) => assert_eq!(n, 0),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_for_each_parent() {
        let f = [Feature::MoveConnections];
        // A protocol-1 parent matches "ready" exactly.
        assert_eq!(Ready::line(None, &f), "ready\n");
        assert_eq!(Ready::line(Some(2), &f), "ready 2 move-connections\n");
        // A newer parent gets our version.
        assert_eq!(Ready::line(Some(9), &[]), "ready 2\n");
        assert_eq!(
            Ready::parse("ready"),
            Some(Ready {
                protocol: 1,
                features: vec![]
            })
        );
        // Unknown words are ignored (a later protocol's features).
        assert_eq!(
            Ready::parse("ready 3 session-cache move-connections tls-tickets"),
            Some(Ready {
                protocol: 3,
                features: vec![Feature::MoveConnections, Feature::TlsTickets]
            })
        );
        for bad in ["", "readyx", "ready x", "ready 1", "ready 0", "owner"] {
            assert_eq!(Ready::parse(bad), None, "{bad:?}");
        }
        let f = failed_line("/etc/x.toml:3: unknown key `y`\nmore");
        assert_eq!(f, "failed /etc/x.toml:3: unknown key `y` more\n");
        assert_eq!(
            failed_reason(f.trim_end()),
            Some("/etc/x.toml:3: unknown key `y` more")
        );
        assert_eq!(failed_reason("failed "), None);
    }

    #[test]
    fn connection_messages_round_trip_and_reject_junk() {
        let m = encode(Kind::Tcp, "http", b"GET / HT");
        assert_eq!(decode(&m), Ok((Kind::Tcp, "http", &b"GET / HT"[..])));
        assert_eq!(
            decode(&encode(Kind::Unix, "a b", b"")),
            Ok((Kind::Unix, "a b", &b""[..]))
        );
        assert_eq!(decode(b"conn tcp 0\n"), Ok((Kind::Tcp, "", &b""[..])));
        assert_eq!(
            decode(b"conn tcp 3\nab"),
            Err(BadMessage::Length { said: 3, got: 2 })
        );
        for bad in [
            &b""[..],
            b"conn",
            b"conn udp 0\n",
            b"conn tcp x\n",
            b"ready\n",
        ] {
            assert_eq!(decode(bad), Err(BadMessage::Header), "{bad:?}");
        }
        assert_eq!(check(&m, vec![], false).unwrap_err(), BadMessage::NoFd);
        assert_eq!(check(&m, vec![], true).unwrap_err(), BadMessage::Truncated);
    }

    /// The largest state crosses in chunks, a moved connection between
    /// two of them, and arrives whole; the connection still comes out of
    /// `recv`.
    #[tokio::test]
    async fn the_app_state_crosses_in_chunks_between_connections() {
        let (a, b) = pair().unwrap();
        let inbox = std::sync::Arc::new(crate::handover::state::Inbox::default());
        let (a, b) = (
            Connections::new(a).unwrap(),
            Connections::new(b).unwrap().receiving_state(inbox.clone()),
        );
        let state: Vec<u8> = (0..crate::handover::state::MAX_STATE)
            .map(|i| (i % 253) as u8)
            .collect();
        let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let datagrams = crate::handover::state::encode(Some(&state));
        assert_eq!(datagrams.len(), 16);
        let sender = async {
            for (i, d) in datagrams.iter().enumerate() {
                a.send_datagram(d).await.unwrap();
                if i == 3 {
                    a.send(Kind::Tcp, "http", mine.as_fd(), b"GET")
                        .await
                        .unwrap();
                }
            }
            drop(a);
        };
        let receiver = async {
            let mut got = Vec::new();
            while let Some(m) = b.recv().await.unwrap() {
                got.push(m.unwrap());
            }
            got
        };
        let ((), got) = tokio::join!(sender, receiver);
        assert!(
            matches!(&got[..], [Message::Connection(r)] if r.read_ahead == b"GET"),
            "{got:?}"
        );
        assert_eq!(inbox.wait().await, Some(state));
    }

    #[tokio::test]
    async fn an_fd_and_its_bytes_cross_the_channel() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Connections::new(a).unwrap(), Connections::new(b).unwrap());
        let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(Kind::Unix, "http", mine.as_fd(), b"GET /")
            .await
            .unwrap();
        let Message::Connection(got) = b.recv().await.unwrap().unwrap().unwrap() else {
            panic!("not a connection")
        };
        assert_eq!(
            (got.kind, got.socket.as_str(), &got.read_ahead[..]),
            (Kind::Unix, "http", &b"GET /"[..])
        );
        drop(a);
        assert!(
            b.recv().await.unwrap().is_none(),
            "EOF after the sender closed"
        );
    }
}
