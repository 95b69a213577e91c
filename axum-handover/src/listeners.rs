//! Listening sockets: inherited from systemd (or from the previous
//! generation, in systemd's format), or bound here with `SO_REUSEPORT`.
//!
//! Taking them reads `LISTEN_*` without changing the environment, so it is
//! safe from any thread, also once `#[tokio::main]` started the runtime:
//! fds 3.. are open since exec, so nothing else can have been given their
//! numbers.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, SockRef, Socket, Type};

/// Where a listening socket came from; logged and shown in the status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Passed in with `LISTEN_FDS` (systemd, `systemd-socket-activate`, or the
    /// previous pid-server generation).
    Systemd,
    /// Bound by this process from `--listen`.
    Bound,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Systemd => "systemd",
            Origin::Bound => "bound",
        })
    }
}

/// A `--listen` address: parsed from `HOST:PORT`, `[IPV6]:PORT` or
/// `unix:/path`, or converted from a [`SocketAddr`] or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddr {
    /// `HOST:PORT` or `[IPV6]:PORT`.
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/run/pid-server.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("`{s}` is not HOST:PORT, [IPV6]:PORT or unix:/path (hosts are IP addresses)")
        })
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(a: SocketAddr) -> ListenAddr {
        ListenAddr::Tcp(a)
    }
}

/// A Unix socket path.
impl From<PathBuf> for ListenAddr {
    fn from(p: PathBuf) -> ListenAddr {
        ListenAddr::Unix(p)
    }
}

/// A Unix socket path.
impl From<&Path> for ListenAddr {
    fn from(p: &Path) -> ListenAddr {
        ListenAddr::Unix(p.to_path_buf())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listening socket, still blocking-mode-agnostic std types so it can be
/// taken before the runtime exists.
#[derive(Debug)]
pub(crate) enum Socketish {
    Tcp(StdTcpListener),
    Unix(StdUnixListener),
}

/// One listening socket with its name and origin.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) socket: Socketish,
    /// The `LISTEN_FDNAMES` entry, or [`BOUND_NAME`] for bound sockets.
    pub(crate) name: String,
    pub(crate) origin: Origin,
}

impl Listener {
    /// How the status line names it: the fd name for systemd's sockets
    /// (what the socket unit calls it), the address for our own.
    pub(crate) fn label(&self) -> String {
        match self.origin {
            Origin::Systemd => self.name.clone(),
            Origin::Bound => self.local_addr(),
        }
    }

    /// The local address, for logs ("127.0.0.1:8080" or "unix:/path").
    pub(crate) fn local_addr(&self) -> String {
        match &self.socket {
            Socketish::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Socketish::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    /// The TCP port, if this is a TCP socket.
    pub(crate) fn port(&self) -> Option<u16> {
        match &self.socket {
            Socketish::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Socketish::Unix(_) => None,
        }
    }

    /// A second descriptor for the very same socket, kept for a handover so
    /// the next generation shares this accept queue.
    pub(crate) fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        match &self.socket {
            Socketish::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Socketish::Unix(l) => l.as_fd().try_clone_to_owned(),
        }
    }
}

/// Why the sockets could not be taken or bound: each names what is wrong.
#[allow(missing_docs)] // the messages say what each field is
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a process ID")]
    BadPid(String),
    #[error("LISTEN_FDS={0} is more than the {MAX_INHERITED} sockets accepted")]
    TooMany(u32),
    #[error("LISTEN_FDS=0: no sockets were passed")]
    NoneInherited,
    #[error("LISTEN_FDNAMES has {names} names for {fds} sockets")]
    NameCount { names: usize, fds: usize },
    #[error("inherited fd {fd}{name}: {reason}")]
    BadInherited {
        fd: RawFd,
        name: String,
        reason: String,
    },
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: ListenAddr,
        source: io::Error,
        hint: &'static str,
    },
}

impl ListenError {
    /// A stable label for logs, metrics and tests (see
    /// [`crate::StartError::reason`]).
    pub fn reason(&self) -> &'static str {
        match self {
            ListenError::BadCount(_) => "bad_listen_fds",
            ListenError::BadPid(_) => "bad_listen_pid",
            ListenError::TooMany(_) => "too_many_sockets",
            ListenError::NoneInherited => "no_sockets",
            ListenError::NameCount { .. } => "bad_listen_fdnames",
            ListenError::BadInherited { .. } => "bad_inherited_socket",
            ListenError::Bind { .. } => "bind_failed",
        }
    }
}

/// More than this many inherited sockets is taken as garbage in LISTEN_FDS.
pub const MAX_INHERITED: u32 = 64;

/// What the environment says about inherited sockets, read without touching
/// any fd yet (so it can be tested).
#[derive(Debug, PartialEq, Eq)]
pub enum Inherited {
    /// `LISTEN_FDS` absent: bind `--listen` ourselves.
    None,
    /// `LISTEN_PID` names another process: these sockets are not ours (the
    /// systemd rule). Bind `--listen`, and say so.
    ForOtherPid(String),
    /// `count` sockets from fd 3, with their names.
    #[allow(missing_docs)]
    Sockets { count: u32, names: Vec<String> },
}

/// Reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` as given.
pub fn inherited_from(
    listen_fds: Option<&str>,
    listen_pid: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Inherited, ListenError> {
    let Some(raw) = listen_fds else {
        return Ok(Inherited::None);
    };
    // systemd's rule: sockets for another PID are not for us. A parent
    // pid-server passes no LISTEN_PID (it cannot know the child's PID before
    // exec), which listenfd and sd_listen_fds(3) both accept. One that is
    // not a PID at all is an error there (-EINVAL), and here: binding
    // `--listen` instead would hide a broken environment.
    if let Some(pid) = listen_pid.filter(|p| !p.is_empty()) {
        match pid.trim().parse::<u32>() {
            Ok(p) if p == my_pid => {}
            Ok(p) if p > 0 => return Ok(Inherited::ForOtherPid(pid.to_string())),
            _ => return Err(ListenError::BadPid(pid.to_string())),
        }
    }
    let count: u32 = raw
        .trim()
        .parse()
        .map_err(|_| ListenError::BadCount(raw.to_string()))?;
    if count == 0 {
        return Err(ListenError::NoneInherited);
    }
    // Connections systemd kept in its file descriptor store over a restart
    // come after the sockets, named (see `fdstore`): only those may go past
    // the sockets' bound.
    let stored_room = if listen_fdnames.is_some() {
        crate::fdstore::MAX_TAKEN as u32
    } else {
        0
    };
    if count > MAX_INHERITED + stored_room {
        return Err(ListenError::TooMany(count));
    }
    let names: Vec<String> = match listen_fdnames {
        Some(n) => n.split(':').map(str::to_string).collect(),
        None => (0..count).map(|_| "unknown".to_string()).collect(),
    };
    if names.len() != count as usize {
        return Err(ListenError::NameCount {
            names: names.len(),
            fds: count as usize,
        });
    }
    let sockets = names
        .iter()
        .filter(|n| !crate::fdstore::is_stored(n))
        .count();
    if sockets > MAX_INHERITED as usize {
        return Err(ListenError::TooMany(count));
    }
    Ok(Inherited::Sockets { count, names })
}

/// Takes the sockets passed in `LISTEN_FDS`, or binds `addrs` when there
/// are none. `origin_var` names the variable in which a previous generation
/// says it bound the sockets itself. Reads the environment, never changes
/// it.
pub(crate) fn take_or_bind(addrs: &[ListenAddr], origin_var: &str) -> Result<Taken, ListenError> {
    let env = |k: &str| std::env::var(k).ok();
    let inherited = inherited_from(
        env("LISTEN_FDS").as_deref(),
        env("LISTEN_PID").as_deref(),
        env("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    match inherited {
        Inherited::None => Ok(Taken::bound(bind_all(addrs)?, None)),
        Inherited::ForOtherPid(pid) => Ok(Taken::bound(
            bind_all(addrs)?,
            Some(format!(
                "LISTEN_PID={pid} is not this process: ignored the inherited sockets"
            )),
        )),
        Inherited::Sockets { count, names } => {
            // A previous pid-server generation says whether it bound these
            // itself; systemd never sets this.
            let origin = match env(origin_var).as_deref() {
                Some("bound") => Origin::Bound,
                _ => Origin::Systemd,
            };
            let mut taken = take_inherited(count, names, origin)?;
            // Only stored connections (a service that binds its own
            // sockets, with a file descriptor store): bind as usual.
            if taken.listeners.is_empty() {
                taken.listeners = bind_all(addrs)?;
            }
            Ok(taken)
        }
    }
}

/// What [`take_or_bind`] took.
pub(crate) struct Taken {
    pub(crate) listeners: Vec<Listener>,
    /// Connections from systemd's file descriptor store (a restart).
    pub(crate) stored: Vec<Stored>,
    /// The store's names for them, to remove them from it by.
    pub(crate) stored_names: Vec<String>,
    /// Something to warn about.
    pub(crate) warning: Option<String>,
}

impl Taken {
    fn bound(listeners: Vec<Listener>, warning: Option<String>) -> Taken {
        Taken {
            listeners,
            stored: Vec::new(),
            stored_names: Vec::new(),
            warning,
        }
    }
}

/// A client connection taken from systemd's file descriptor store.
#[derive(Debug)]
pub(crate) struct Stored {
    /// The listening socket it came from, by name.
    pub(crate) socket: String,
    pub(crate) kind: crate::handover::channel::Kind,
    pub(crate) fd: OwnedFd,
}

/// The name given to sockets bound from `--listen` (fd names may not contain
/// the ':' of an address; logs show the address beside it).
pub(crate) const BOUND_NAME: &str = "listen";

fn take_inherited(count: u32, names: Vec<String>, origin: Origin) -> Result<Taken, ListenError> {
    let mut out = Vec::with_capacity(count.min(MAX_INHERITED) as usize);
    let mut stored = Vec::new();
    let mut stored_names: Vec<String> = Vec::new();
    let mut bad_stored = 0usize;
    for (idx, name) in names.into_iter().enumerate() {
        let fd = 3 + idx as RawFd;
        if name == crate::fdstore::BUNDLE {
            // A stop's connections, in one socket (see `fdstore::Store`).
            if !stored_names.contains(&name) {
                stored_names.push(name.clone());
            }
            match take_bundle(fd) {
                Ok(conns) => {
                    for (socket, fd) in conns {
                        match connected(fd) {
                            Ok((kind, fd)) => stored.push(Stored { socket, kind, fd }),
                            Err(_) => bad_stored += 1,
                        }
                    }
                }
                Err(_) => bad_stored += 1,
            }
            continue;
        }
        if let Some(socket) = crate::fdstore::socket_of(&name) {
            if !stored_names.contains(&name) {
                stored_names.push(name.clone());
            }
            // One that is not a connection is left alone (and open: it is
            // systemd's to close when we remove the name), not a reason to
            // refuse the start.
            match take_connected(fd) {
                Ok((kind, fd)) => stored.push(Stored {
                    socket: socket.to_string(),
                    kind,
                    fd,
                }),
                Err(_) => bad_stored += 1,
            }
            continue;
        }
        let bad = |reason: String| ListenError::BadInherited {
            fd,
            name: if name == "unknown" {
                String::new()
            } else {
                format!(" ({name})")
            },
            reason,
        };
        let socket = take_listening(fd).map_err(bad)?;
        set_nonblocking(&socket).map_err(|e| bad(e.to_string()))?;
        out.push(Listener {
            socket,
            name,
            origin,
        });
    }
    let warning = (bad_stored > 0).then(|| {
        format!(
            "{bad_stored} fds from the file descriptor store are not client connections: left alone"
        )
    });
    Ok(Taken {
        listeners: out,
        stored,
        stored_names,
        warning,
    })
}

/// Owns inherited fd `fd`, a stop's bundle of connections (see
/// `fdstore::Store`), and reads them out of it.
fn take_bundle(fd: RawFd) -> Result<Vec<(String, OwnedFd)>, String> {
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err("missing".into());
    }
    // SAFETY: open (checked above), placed at this number by systemd for
    // us and claimed once; `unbundle` checks what it is.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    crate::fdstore::unbundle(owned)
}

/// Owns inherited fd `fd` once it proved to be a connected TCP or Unix
/// stream socket (a client connection from systemd's file descriptor
/// store), close-on-exec.
fn take_connected(fd: RawFd) -> Result<(crate::handover::channel::Kind, OwnedFd), String> {
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err("missing".into());
    }
    // SAFETY: open (checked above); borrowed for the queries only.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check_connected(&borrowed)?;
    // SAFETY: open, a connected stream socket (checked above), placed at
    // this number by systemd for us and claimed once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    connected(owned)
}

/// `fd`, once it proved to be a connected TCP or Unix stream socket, made
/// close-on-exec.
fn connected(fd: OwnedFd) -> Result<(crate::handover::channel::Kind, OwnedFd), String> {
    let kind = check_connected(&fd.as_fd())?;
    // SAFETY: F_SETFD on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    Ok((kind, fd))
}

/// Which kind of connection `fd` is, if it is a connected TCP or Unix
/// stream socket.
fn check_connected(fd: &BorrowedFd<'_>) -> Result<crate::handover::channel::Kind, String> {
    use crate::handover::channel::Kind;
    let sock = SockRef::from(fd);
    let kind = match sock.domain() {
        Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 => Kind::Tcp,
        Ok(d) if d == Domain::UNIX => Kind::Unix,
        _ => return Err("not a TCP or Unix socket".into()),
    };
    if sock.r#type().ok() != Some(Type::STREAM) || sock.is_listener().unwrap_or(true) {
        return Err("not a connected stream socket".into());
    }
    Ok(kind)
}

/// Owns inherited fd `fd` once it proved to be a listening TCP or Unix
/// stream socket, and keeps it from the processes we start (close-on-exec:
/// the next generation gets second descriptors placed on purpose).
///
/// This is what `listenfd::ListenFd::from_env` and its `take_*` do, minus
/// clearing `LISTEN_FDS` and `LISTEN_PID`: changing the environment races
/// with every other thread that reads it (`getenv` in libc, DNS, time
/// zones), so with `#[tokio::main]` it is undefined behaviour. The
/// variables stay as systemd set them; `LISTEN_PID` tells any other
/// program they are not for it, and the fds are closed on exec.
/// `tests/inherit.rs` cross-checks this against listenfd. An fd that fails
/// a check is left open and not owned: the caller exits anyway, and closing
/// what we cannot use would only hide it from a post-mortem.
fn take_listening(fd: RawFd) -> Result<Socketish, String> {
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err("missing (not an open file descriptor)".into());
    }
    // SAFETY: the fd is open (checked above); borrowed only for the
    // queries below, it stays unowned until every check passed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let sock = SockRef::from(&borrowed);
    let need = "need a listening TCP or Unix stream socket";
    let domain = sock
        .domain()
        .map_err(|_| format!("is not a socket; {need}"))?;
    let tcp = domain == Domain::IPV4 || domain == Domain::IPV6;
    if !(tcp || domain == Domain::UNIX) || sock.r#type().ok() != Some(Type::STREAM) {
        return Err(format!("is not a TCP or Unix stream socket; {need}"));
    }
    // An accept() on a connected or unbound socket would fail at run time.
    match sock.is_listener() {
        Ok(true) => {}
        Ok(false) => return Err("is a stream socket but not listening".into()),
        Err(e) => return Err(e.to_string()),
    }
    // SAFETY: the fd is open, a listening stream socket (checked above),
    // and nothing else in this process owns it: systemd or the previous
    // generation placed it at this number for us, and `take` claims each
    // inherited fd once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on the fd we now own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    Ok(if tcp {
        Socketish::Tcp(owned.into())
    } else {
        Socketish::Unix(owned.into())
    })
}

fn set_nonblocking(s: &Socketish) -> io::Result<()> {
    // tokio requires non-blocking sockets; inherited ones may be blocking.
    match s {
        Socketish::Tcp(l) => l.set_nonblocking(true),
        Socketish::Unix(l) => l.set_nonblocking(true),
    }
}

/// Binds every address, all or nothing.
pub(crate) fn bind_all(addrs: &[ListenAddr]) -> Result<Vec<Listener>, ListenError> {
    addrs.iter().map(bind).collect()
}

/// The listen backlog for sockets we bind. The kernel caps it at
/// net.core.somaxconn; a deep queue absorbs bursts while a process swaps.
const BACKLOG: i32 = 4096;

fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
    let err = |source: io::Error| {
        let hint = if source.kind() == io::ErrorKind::AddrInUse {
            " (held by a process that did not set SO_REUSEPORT, or by another user)"
        } else {
            ""
        };
        ListenError::Bind {
            addr: addr.clone(),
            source,
            hint,
        }
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let socket = Socket::new(Domain::for_address(*sa), Type::STREAM, None).map_err(err)?;
            // SO_REUSEPORT lets a second pid-server bind the same port while
            // this one runs; the kernel then balances new connections.
            socket.set_reuse_address(true).map_err(err)?;
            socket.set_reuse_port(true).map_err(err)?;
            if sa.is_ipv6() {
                // [::]:8080 must not also claim 0.0.0.0:8080 behind the
                // user's back; ask for both explicitly.
                socket.set_only_v6(true).map_err(err)?;
            }
            socket.set_nonblocking(true).map_err(err)?;
            socket.bind(&(*sa).into()).map_err(err)?;
            socket.listen(BACKLOG).map_err(err)?;
            Ok(Listener {
                socket: Socketish::Tcp(socket.into()),
                name: BOUND_NAME.into(),
                origin: Origin::Bound,
            })
        }
        ListenAddr::Unix(path) => {
            // A Unix socket path cannot be shared: a stale file from a dead
            // process is removed, a live one is left alone (connect succeeds).
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = StdUnixListener::bind(path).map_err(err)?;
            l.set_nonblocking(true).map_err(err)?;
            Ok(Listener {
                socket: Socketish::Unix(l),
                name: BOUND_NAME.into(),
                origin: Origin::Bound,
            })
        }
    }
}

/// Reads `net.ipv4.tcp_migrate_req`. When it is 0, connections still queued
/// on a SO_REUSEPORT socket that closes are reset instead of moving to
/// another socket of the group. `None` when unreadable (old kernel, sandbox).
pub(crate) fn tcp_migrate_req() -> Option<bool> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .ok()
        .map(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "127.0.0.1:80".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "[::1]:8080".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        for bad in [
            "",
            "8080",
            "localhost:80",
            "::1:80",
            "unix:",
            "1.2.3.4:99999",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn converts_from_socket_addresses_and_paths() {
        let sa: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(ListenAddr::from(sa), ListenAddr::Tcp(sa));
        let p = Path::new("/run/x.sock");
        assert_eq!(ListenAddr::from(p), ListenAddr::Unix(p.into()));
        assert_eq!(
            ListenAddr::from(p.to_path_buf()).to_string(),
            "unix:/run/x.sock"
        );
    }

    #[test]
    fn listen_fds_rules() {
        use Inherited::{ForOtherPid, Sockets};
        assert_eq!(
            inherited_from(None, None, None, 7).unwrap(),
            Inherited::None
        );
        assert_eq!(
            inherited_from(Some("2"), Some("7"), Some("http:admin"), 7).unwrap(),
            Sockets {
                count: 2,
                names: vec!["http".into(), "admin".into()]
            }
        );
        // No LISTEN_PID: accepted (how a parent pid-server passes sockets).
        assert_eq!(
            inherited_from(Some("1"), None, None, 7).unwrap(),
            Sockets {
                count: 1,
                names: vec!["unknown".into()]
            }
        );
        assert_eq!(
            inherited_from(Some("1"), Some("8"), None, 7).unwrap(),
            ForOtherPid("8".into())
        );
        assert!(matches!(
            inherited_from(Some("x"), None, None, 7),
            Err(ListenError::BadCount(_))
        ));
        // A LISTEN_PID that is no PID is an error, as in sd_listen_fds(3).
        for garbage in ["x", "-1", "0", "7x"] {
            assert!(
                matches!(
                    inherited_from(Some("1"), Some(garbage), None, 7),
                    Err(ListenError::BadPid(_))
                ),
                "{garbage}"
            );
        }
        assert!(matches!(
            inherited_from(Some("-1"), None, None, 7),
            Err(ListenError::BadCount(_))
        ));
        assert!(matches!(
            inherited_from(Some("0"), None, None, 7),
            Err(ListenError::NoneInherited)
        ));
        assert!(matches!(
            inherited_from(Some("100000"), None, None, 7),
            Err(ListenError::TooMany(_))
        ));
        assert!(matches!(
            inherited_from(Some("2"), None, Some("a"), 7),
            Err(ListenError::NameCount { .. })
        ));
        // Stored connections may go past the sockets' bound; sockets may
        // not.
        let names = std::iter::once("http".to_string())
            .chain((0..100).map(|_| "handover-conn.http".to_string()))
            .collect::<Vec<_>>()
            .join(":");
        assert!(matches!(
            inherited_from(Some("101"), None, Some(&names), 7),
            Ok(Sockets { count: 101, .. })
        ));
        let names = vec!["http"; 65].join(":");
        assert!(matches!(
            inherited_from(Some("65"), None, Some(&names), 7),
            Err(ListenError::TooMany(65))
        ));
    }

    #[test]
    fn two_binds_share_a_port() {
        let a = bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let port = a.port().unwrap();
        let b = bind(&format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
        assert_eq!(b.port(), Some(port));
        assert_eq!(b.origin, Origin::Bound);
    }

    #[test]
    fn a_port_held_without_reuseport_is_a_clear_error() {
        let held = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let e = bind(&format!("127.0.0.1:{port}").parse().unwrap()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("SO_REUSEPORT"), "{msg}");
    }
}
