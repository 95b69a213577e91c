#![doc = include_str!("../README.md")]
//!
//! ## Layout
//!
//! - [`Config`]: the service's name and timings, HTTP/2 limits, and
//!   [`Tls`] for TLS sockets ([`Config::tls`]): HTTP/2 by prior knowledge
//!   on plain sockets and by ALPN on TLS ones; such connections drain at a
//!   handover instead of moving, and TLS sessions resume with the next
//!   generation (its session-ticket keys are handed over).
//! - [`Generation`]: one process's life: take the sockets, serve, hand over
//!   or drain; [`Hooks`] for what the app adds (readiness checks, the
//!   status line, [`Hooks::save_state`]); [`Info`] for its routes and
//!   tasks ([`Info::leaving`], [`Info::state_from_predecessor`],
//!   [`Info::for_tests`]); [`Ended`], [`StartError`] and [`ServeError`]
//!   say how it ended, with stable `reason()` labels.
//! - [`helper`]: the reload and stop helpers for the app's command line.
//! - [`file`](mod@file): reading a file an operator names (what [`Tls`] reads, and
//!   the app's configuration) capped, and refusing FIFOs and devices, so a
//!   bad path fails a start or a reload instead of hanging it.
//! - Inside: `listeners` (inherited or bound sockets), `server` (accepting,
//!   connections, moving and draining), `handover` (`spawn`: the old side;
//!   `join`: the new side; `channel`: the messages; `state`: the app's
//!   state in chunks), `tls` (certificates and
//!   the session-ticket keys), `control` (the helper's
//!   socket), `notify` (sd_notify, and who may speak for the unit),
//!   `signals`, `env` (the variables one generation sets for the next).
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod config;
mod control;
mod env;
mod fdstore;
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
pub use server::Closing;
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
