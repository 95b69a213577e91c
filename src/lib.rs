//! pid-server: an HTTP service that answers with the PID that handled the
//! request, and swaps its own binary under systemd with zero failed
//! requests.
//!
//! # Layout
//!
//! One module per concern; follow a request, then a reload, by name:
//!
//! - [`cli`]: the command line (`serve`, `reload`) and its environment
//!   variables.
//! - [`listeners`]: sockets from systemd (`LISTEN_FDS`, via listenfd) or
//!   bound here with `SO_REUSEPORT`.
//! - [`app`]: the routes (`/`, `/healthz`, `/readyz`, `/slow`) and the state
//!   they report.
//! - [`server`]: accept loops, HTTP/1.1 connections, and the drain.
//! - [`notify`]: `sd_notify` (READY, STATUS, MAINPID, STOPPING, watchdog).
//! - [`logging`]: journald with structured fields, or stderr.
//! - [`signals`]: SIGTERM/SIGINT stop, SIGUSR2/SIGHUP upgrade.
//! - [`upgrade`]: spawning the next generation on the same sockets and
//!   waiting for its "ready".
//! - [`control`]: the socket through which `pid-server reload` asks for a
//!   handover and hears the outcome.
//! - [`reload`]: the `pid-server reload` helper (`ExecReload=`).
//! - [`stop`]: the `pid-server stop` helper (`ExecStop=`), which waits for
//!   every generation to drain.
//! - [`lifecycle`]: one generation's life, tying the above together.
//!
//! # The handover
//!
//! 1. `systemctl reload` runs `pid-server reload --pid $MAINPID`, which asks
//!    the old process over its control socket (SIGUSR2 or SIGHUP do the
//!    same without an answer).
//! 2. The old process starts its binary again (the path it was started
//!    from, so a freshly installed binary), passing every listening socket
//!    at fds 3.. (`LISTEN_FDS`) and one end of a socketpair.
//! 3. The new process accepts on the very same sockets (one shared accept
//!    queue: nothing queued is lost) and says `ready` on the socketpair.
//! 4. Probation: both serve for `--upgrade-probation-ms` (250); the new process
//!    must stay alive through it. Then the old one says `commit`; the new
//!    one tells systemd `MAINPID=<self>` and `READY=1`, waits until systemd
//!    has processed that (`BARRIER=1`), and says `owner`.
//! 5. The old process goes silent towards systemd, answers the helper, stops
//!    accepting, finishes in-flight requests (answering `Connection:
//!    close`), closes idle connections after a grace, and exits 0.
//!
//! If the new process exits or is not ready in time, the old one stops it,
//! keeps serving, and the helper exits non-zero with the reason.

pub mod app;
pub mod cli;
pub mod control;
pub mod lifecycle;
pub mod listeners;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod server;
pub mod signals;
pub mod stop;
pub mod upgrade;

/// The process's exit codes (documented in README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Served and drained, or handed over; a reload succeeded.
    Ok = 0,
    /// Could not start serving (port in use, bad inherited socket), or a
    /// reload failed (the new process died or was not ready in time; the old
    /// one keeps serving).
    Failure = 1,
    /// A second SIGTERM/SIGINT during a drain: exited at once.
    Forced = 2,
    /// reload: the PID is not a running pid-server.
    NoServer = 3,
    /// reload: another reload of that process is under way.
    Refused = 4,
    /// A bad flag or environment value (including malformed `LISTEN_FDS`).
    Usage = 64,
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// Why `serve` could not start, before logging exists: printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
    #[error("{0}")]
    Other(String),
}

impl StartError {
    pub fn exit_code(&self) -> ExitCode {
        use listeners::ListenError as L;
        match self {
            StartError::Usage(_)
            | StartError::Listen(
                L::BadCount(_) | L::TooMany(_) | L::NoneInherited | L::NameCount { .. },
            ) => ExitCode::Usage,
            StartError::Listen(_) | StartError::Other(_) => ExitCode::Failure,
        }
    }
}

/// `serve`: take the sockets while single-threaded, then run the runtime.
pub fn serve_main(args: &cli::ServeArgs) -> ExitCode {
    let startup = match lifecycle::Startup::take(&args.listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pid-server: error: {e}");
            return e.exit_code();
        }
    };
    logging::init(std::process::id(), startup.generation);
    // A parent may have started us with signals blocked (the mask is
    // inherited, and Python's subprocess or Rust's Command pass it on); the
    // ones we act on must get through. Before the runtime: its threads, and
    // every later generation, inherit this thread's mask.
    if let Err(e) = signals::unblock() {
        eprintln!("pid-server: error: cannot unblock signals: {e}");
        return ExitCode::Failure;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pid-server: error: cannot start the async runtime: {e}");
            return ExitCode::Failure;
        }
    };
    let opts = lifecycle::Options {
        server: server::Config {
            drain_timeout: args.drain_timeout,
            idle_grace: args.idle_grace,
            max_connections: args.max_connections as usize,
            header_read_timeout: args.header_timeout,
        },
        upgrade: upgrade::Timing {
            ready_timeout: args.upgrade_timeout,
            probation: args.upgrade_probation,
        },
    };
    let code = runtime.block_on(lifecycle::serve(startup, opts));
    // Do not wait for blocked tasks (a cut /slow request) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
