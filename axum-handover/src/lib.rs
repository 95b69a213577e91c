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
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let config = Config::new("hello");
//!     // `hello reload` and `hello stop`, for ExecReload= and ExecStop=.
//!     if let Some(code) = axum_handover::helper::dispatch(&config, std::env::args()) {
//!         return code.into();
//!     }
//!     // Sockets from systemd (LISTEN_FDS) or from the previous
//!     // generation, else bound here.
//!     let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
//!     let generation = match Generation::take(&config, &[addr.into()]) {
//!         Ok(g) => g,
//!         Err(e) => {
//!             eprintln!("hello: error: {e}");
//!             return e.exit_code().into();
//!         }
//!     };
//!     let pid = std::process::id();
//!     let app = Router::new().route("/", get(move || async move { format!("hello from PID {pid}\n") }));
//!     generation.serve(app, ()).await.exit_code().into()
//! }
//! ```
//!
//! `examples/hello.rs` is this program; `examples/ported.rs` adds a
//! background task, a database readiness check and a SIGHUP of its own.
//! [`Generation::take`] may run on any thread (it reads the environment and
//! never changes it), so `#[tokio::main]` works as it is; pid-server takes
//! its sockets before it builds its runtime, which works too. Under
//! systemd, the unit needs `Type=notify`, `NotifyAccess=all` (the new
//! process is not systemd's child) and `ExecReload=/path/to/hello reload`;
//! pid-server's units in its `systemd/` folder are a complete, hardened
//! example.
//!
//! # Porting from `axum::serve`
//!
//! ```diff
//! +use axum_handover::{Config, Generation};
//!
//!  #[tokio::main]
//! -async fn main() {
//! +async fn main() -> std::process::ExitCode {
//! +    let config = Config::new("myapp");
//! +    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], 8080));
//! +    let generation = Generation::take(&config, &[addr.into()]).unwrap();
//!      let app = Router::new().route("/", get(handler));
//! -    tokio::spawn(refresh_cache(shutdown_signal()));
//! -    let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await.unwrap();
//! -    axum::serve(listener, app)
//! -        .with_graceful_shutdown(shutdown_signal())
//! -        .await
//! -        .unwrap();
//! +    tokio::spawn(refresh_cache(generation.info().leaving()));
//! +    generation.serve(app, ()).await.exit_code().into()
//!  }
//! ```
//!
//! Seven lines added, seven removed; `shutdown_signal()` (the usual
//! `ctrl_c` or SIGTERM) goes, since the library takes SIGTERM and SIGINT
//! (and SIGHUP and SIGUSR2 for reloads: [`Config::reload_signals`] leaves
//! one to the app). [`Info::leaving`] is the shutdown future for the app's
//! own tasks: it resolves when a successor takes over
//! ([`Leaving::HandedOver`]) or the generation stops
//! ([`Leaving::Stopping`]), to a [`Leaving`] rather than `()` (a task that
//! takes `impl Future<Output = ()>` gets `async move { leaving.await; }`).
//! For `systemctl reload`, add the four lines of [`helper::dispatch`] (see
//! the quick start) and `ExecReload=`. A check that must pass before the
//! new process takes traffic (a database ping) is
//! [`Hooks::check_ready_async`], given to `serve` in place of `()`.
//!
//! What a reload keeps and what it does not: the listening sockets (the
//! very same accept queues), idle HTTP/1.1 keep-alive connections (moved
//! with their unread bytes), the library's counters ([`Info::metrics`]:
//! requests, reloads, moves) and TLS session-ticket keys are handed to the
//! new process. The app's in-memory state is not: caches, in-memory
//! sessions, its own counters and rate limits start empty in the new
//! process (keep what must survive outside the process). HTTP/2 and TLS
//! connections stay with the old process until their requests finish,
//! within [`Config::drain_timeout`].
//!
//! # The handover
//!
//! 1. A reload is asked for: SIGHUP (what `Type=notify-reload` sends; the
//!    generation answers `RELOADING=1`), SIGUSR2 (both by default:
//!    [`Config::reload_signals`]), or the reload helper on
//!    the control socket (`$RUNTIME_DIRECTORY/control.<pid>`, or the
//!    abstract `@<name>/<pid>/control`), which waits for the outcome.
//! 2. The old process starts its binary again (the path it was started
//!    from, so a freshly installed binary) with the same arguments, every
//!    listening socket at fds 3.. (`LISTEN_FDS`) and two socketpairs.
//! 3. The new process accepts on the very same sockets (one shared accept
//!    queue: nothing queued is lost), passes [`Hooks::check_ready_async`]
//!    (by default [`Hooks::check_ready`]), and says `ready`.
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
//!   or drain; [`Hooks`] for what the app adds (readiness checks, the
//!   status line); [`Info`] for its routes and tasks ([`Info::leaving`],
//!   [`Info::for_tests`]); [`Ended`], [`StartError`] and [`ServeError`]
//!   say how it ended, with stable `reason()` labels.
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
    Ended, Generation, Hooks, Info, LastReload, Leaving, MAX_STATE_BYTES, ReadyCheck, ServeError,
    StartError, Status, refuse_start,
};
pub use listeners::{ListenAddr, ListenError};
pub use metrics::{Histogram, Metrics};
pub use tls::{Tls, TlsError};
/// The signals of [`Config::reload_signals`] (tokio's).
pub use tokio::signal::unix::SignalKind;

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
