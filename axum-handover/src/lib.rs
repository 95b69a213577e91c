//! Zero-downtime binary swaps for an axum service under systemd.
//!
//! `systemctl reload myapp` (or SIGHUP, SIGUSR2, or `myapp reload`) starts
//! the service's binary again on the very same listening sockets, waits
//! until the new process serves and owns the unit, then moves every idle
//! keep-alive connection to it, fd and unread bytes together, so clients
//! notice nothing but a new process answering. A new binary that cannot
//! start leaves the old one serving, and the reload fails with the reason.
//!
//! # Quick start
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use axum_handover::{Config, Generation};
//!
//! fn main() -> std::process::ExitCode {
//!     let config = Config::new("hello");
//!     // `hello reload` and `hello stop`, for ExecReload= and ExecStop=.
//!     if let Some(code) = axum_handover::helper::dispatch(&config, std::env::args()) {
//!         return code.into();
//!     }
//!     // Before the runtime starts threads: sockets from systemd
//!     // (LISTEN_FDS) or from the previous generation, else bound here.
//!     let generation = match Generation::take(&config, &["127.0.0.1:8080".parse().unwrap()]) {
//!         Ok(g) => g,
//!         Err(e) => {
//!             eprintln!("hello: error: {e}");
//!             return e.exit_code().into();
//!         }
//!     };
//!     let pid = std::process::id();
//!     let app = Router::new().route("/", get(move || async move { format!("hello from PID {pid}\n") }));
//!     let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
//!     runtime.block_on(generation.serve(app, ())).exit_code().into()
//! }
//! ```
//!
//! `examples/hello.rs` is this program. Under systemd, the unit needs
//! `Type=notify`, `NotifyAccess=all` (the new process is not systemd's
//! child) and `ExecReload=/path/to/hello reload`; pid-server's units in its
//! `systemd/` folder are a complete, hardened example.
//!
//! # The handover
//!
//! 1. A reload is asked for: SIGHUP (what `Type=notify-reload` sends; the
//!    generation answers `RELOADING=1`), SIGUSR2, or the reload helper on
//!    the control socket (`$RUNTIME_DIRECTORY/control.<pid>`, or the
//!    abstract `@<name>/<pid>/control`), which waits for the outcome.
//! 2. The old process starts its binary again (the path it was started
//!    from, so a freshly installed binary) with the same arguments, every
//!    listening socket at fds 3.. (`LISTEN_FDS`) and two socketpairs.
//! 3. The new process accepts on the very same sockets (one shared accept
//!    queue: nothing queued is lost), passes [`Hooks::check_ready`], and
//!    says `ready`.
//! 4. Probation ([`Config::probation`]): both serve; the new process must
//!    stay alive through it. Then the old one says `commit`; the new one
//!    tells systemd `MAINPID=<self>` and `READY=1`, waits until systemd has
//!    processed that (`BARRIER=1`), and says `owner`.
//! 5. The old process goes silent towards systemd, answers the helper,
//!    stops accepting, and sends each connection to the new process as
//!    soon as no request is in progress on it. It exits when none is left.
//!
//! If the new process exits, or is not ready within
//! [`Config::ready_timeout`], the old one stops it and keeps serving.
//! Either side may be an older release: the channel is versioned (see the
//! README's compatibility promise), and what a peer does not know is not
//! used (an older successor gets its connections drained instead of
//! moved).
//!
//! # Layout
//!
//! - [`Config`]: the service's name and timings, HTTP/2 limits, and
//!   [`Tls`] for TLS sockets ([`Config::tls`]): HTTP/2 by prior knowledge
//!   on plain sockets and by ALPN on TLS ones; such connections drain at a
//!   handover instead of moving, and TLS sessions resume with the next
//!   generation (its session-ticket keys are handed over).
//! - [`Generation`]: one process's life: take the sockets, serve, hand over
//!   or drain; [`Hooks`] for what the app adds; [`Info`] for its routes.
//! - [`helper`]: the reload and stop helpers for the app's command line.
//! - [`file`](mod@file): reading a file an operator names (what [`Tls`] reads, and
//!   the app's configuration) capped, and refusing FIFOs and devices, so a
//!   bad path fails a start or a reload instead of hanging it.
//! - Inside: `listeners` (inherited or bound sockets), `server` (accepting,
//!   connections, moving and draining), `handover` (`spawn`: the old side;
//!   `join`: the new side; `channel`: the messages), `tls` (certificates and
//!   the session-ticket keys), `control` (the helper's
//!   socket), `notify` (sd_notify, and who may speak for the unit),
//!   `signals`, `env` (the variables one generation sets for the next).
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod config;
mod control;
mod env;
pub mod file;
mod generation;
mod handover;
pub mod helper;
mod limits;
mod listeners;
mod metrics;
mod notify;
mod server;
mod signals;
mod tls;

pub use config::Config;
pub use control::Report;
pub use generation::{
    Ended, Generation, Hooks, Info, LastReload, StartError, Status, refuse_start,
};
pub use listeners::{ListenAddr, ListenError};
pub use metrics::{Histogram, Metrics};
pub use server::Closing;
pub use tls::{Tls, TlsError};

/// The parsers of outside input, for fuzzing; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::control::{
        Answer, MAX_ENVIRONMENT, MAX_REQUEST_LINE, MAX_VARIABLES, Refusal, Report,
        environment_block, parse_request,
    };
    pub use crate::handover::channel::fuzz_one as handover_message;
    pub use crate::listeners::{Inherited, MAX_INHERITED, inherited_from};
}
