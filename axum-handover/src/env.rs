//! The environment variables one generation sets for the next, in one place.
//! Each is `<PREFIX>_<SUFFIX>`, the prefix from [`crate::Config`]
//! (`PID_SERVER_` for pid-server). The sockets themselves travel the systemd
//! way (`LISTEN_FDS`, `LISTEN_FDNAMES`), which any socket-activated program
//! reads.

/// One of the variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Var {
    /// The fd of the handover channel (a stream socketpair): the new
    /// process says `ready` on it. Set only by a parent generation.
    HandoverFd,
    /// The new process's generation number (0 when absent).
    Generation,
    /// `bound` when the sockets passed were bound by the service itself
    /// rather than by systemd.
    SocketOrigin,
    /// The handover protocol the parent speaks (absent: version 1, lines
    /// `ready`, `commit`, `owner` only).
    Protocol,
    /// The fd of the connection channel (a seqpacket socketpair) on which a
    /// parent of protocol 2 or later moves live connections.
    ConnectionsFd,
}

impl Var {
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Var::HandoverFd => "HANDOVER_FD",
            Var::Generation => "GENERATION",
            Var::SocketOrigin => "SOCKET_ORIGIN",
            Var::Protocol => "HANDOVER_PROTOCOL",
            Var::ConnectionsFd => "HANDOVER_CONNECTIONS_FD",
        }
    }
}
