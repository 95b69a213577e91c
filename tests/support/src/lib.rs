//! What pid-server's integration tests share. The tests run the real
//! binary and talk to it over real sockets; this crate does not link
//! pid-server, so it does not change when `src/` does.
//!
//! # Layout
//!
//! - [`http`]: the one HTTP/1.1 client, strict about what it reads: a
//!   single connection ([`http::Conn`]), a client that keeps one alive and
//!   opens another when the server closes it ([`http::Client`]), and one
//!   request on a new connection ([`http::get`]); and its async
//!   counterpart for the benchmark's load clients ([`http::aio::Conn`],
//!   the same rules for a response, over TCP or TLS).
//! - [`load`]: the load generator, bounded in requests and in time:
//!   keep-alive, one-shot and paused clients ([`Load`]), and what they saw
//!   ([`Tally`], per kept connection [`ConnRecord`]).
//! - [`proc`]: pid-server processes a test starts: the listening socket
//!   the test binds and passes the way systemd does ([`proc::Socket`]), a
//!   mock `NOTIFY_SOCKET`, reaping on drop, the `reload` helper.
//! - [`cmd`]: running a command with a bound ([`TestCommand`]); a failure
//!   prints the command, its folder, its status, stdout and stderr.
//! - [`netns`]: network namespaces the test makes, and threads inside them.
//! - [`nspawn`]: a real systemd booted as PID 1 in a `systemd-nspawn`
//!   container, with pid-server's units installed.
//! - [`deploy`]: the Debian trees (one per [`Release`]: Debian 12 with
//!   systemd 252, Debian 13 with 257) the containers boot; [`each_release!`]
//!   makes a test of a case per release.
//! - [`report`]: running or skipping (`SKIPPED …`, an error under
//!   `CI=true`), output that shows without `--nocapture`, checks reported
//!   together; [`wait`]: bounded waits (every poll-until-a-deadline in
//!   the tests is one of its helpers).
//! - [`ws`] and [`sse`]: a WebSocket and a Server-Sent Events client for
//!   streams that say `pid N` (pid-server's `/ws` and `/events`, the
//!   library's `realistic` example).
//! - [`h2`]: an HTTP/2 client (h2c, or TLS with ALPN `h2`) behind a
//!   blocking API ([`h2::H2Conn`]), and the connection it opens
//!   ([`h2::open`]), which the benchmark's HTTP/2 load client opens too.
//! - [`tls`]: a CA of the test's own ([`tls::TestCa`]: leaves, client
//!   configurations), a strict HTTP/1.1 client over TLS ([`tls::TlsConn`])
//!   and the async TLS connection ([`tls::connect`]) under the others.
//! - [`h2load`]: nghttp2's `h2load` as a second HTTP/2 client: its summary
//!   and, from its log, which streams were sent and not answered.
//!
//! # The binary under test
//!
//! `env!("CARGO_BIN_EXE_pid-server")` exists only in the test's own crate,
//! so each test file says once
//!
//! ```ignore
//! const BIN: &str = env!("CARGO_BIN_EXE_pid-server");
//! ```
//!
//! and hands `BIN` to what starts the binary ([`proc::start`],
//! [`nspawn::BootOptions::new`], …).
//!
//! # Rules the code keeps
//!
//! - Traffic goes to loopback only (the client refuses anything else): the
//!   host's, or that of a network namespace the test made.
//! - Every wait has a bound, and waits for a signal where there is one
//!   (`READY=1`, a condition variable, the readiness endpoint).
//! - A server's port is the test's from the start: bound here and passed
//!   in ([`proc::Socket`]), never a port number released for the server to
//!   bind, which another test's server could share (`SO_REUSEPORT`). Tests
//!   of the server's own binding say so where they use
//!   [`proc::free_addr`].
//! - Whatever a test starts (processes, containers, namespaces, load
//!   threads) is stopped and reaped on drop, also when the test panics.

pub mod cmd;
pub mod deploy;
pub mod h2;
pub mod h2load;
pub mod http;
pub mod load;
pub mod netns;
pub mod nspawn;
pub mod proc;
pub mod report;
pub mod sse;
pub mod tls;
pub mod wait;
pub mod ws;

pub use cmd::TestCommand;
pub use deploy::Release;
pub use load::{ConnEnd, ConnRecord, ConnReport, Load, Mode, Tally};

use std::path::{Path, PathBuf};

/// The repository's root (this crate lives in `tests/support/`).
pub fn repo() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .expect("tests/support has a grandparent")
        .to_path_buf()
}
