//! One generation's life, one method per phase: [`Generation::take`] (before
//! the runtime), then start, join (as a successor, or as the first
//! generation), serve until a stop or a handover, and let go (move or
//! drain).
//!
//! ```text
//!  old (generation g)                          new (generation g+1)
//!  SIGUSR2 / SIGHUP / reload request
//!  spawn(exe, sockets at fd 3.., socketpairs) ─▶ takes the sockets, accepts
//!  ◀──────────────────────────────────────────── "ready[ 2 move-connections]"
//!  probation: both serve; the new one must live
//!  "commit" ──────────────────────────────────▶ MAINPID=<new>, READY=1, BARRIER=1
//!  ◀──────────────────────────────────────────── "owner"
//!  silent to systemd; answers the helper;
//!  moves idle connections ═══ fd + bytes ═════▶ serves them as its own
//!  exits once none is left                      serves, pings the watchdog
//! ```
//! If the new process exits before it owns the unit, or is not ready
//! within the ready timeout, the old one stops it, keeps serving, and shows
//! why in `STATUS=`.

//!
//! The phases live in their own files: `running` (start and join),
//! `reload` (serving, and reloads under way), `leave` (moving or draining
//! the connections at the end).

mod leave;
mod reload;
mod running;

use std::fmt;
use std::sync::Arc;

use crate::handover::join::{self, Inherited};
use crate::limits::FdLimit;
use crate::listeners::{self, ListenAddr, ListenError, Listener};
use crate::server::Counters;
use crate::signals;
use crate::{Config, env::Var};
use running::Running;

/// Tells the previous generation, when one started this process, why this
/// one cannot start, so that the reload fails with that reason (the helper
/// prints it) rather than with an exit status. For an app that checks
/// something of its own before [`Generation::take`] (its configuration
/// file, say); `take` and [`Hooks::check_ready`] failures are reported by
/// the library. Then exit non-zero.
pub fn refuse_start(config: &Config, reason: &str) {
    join::refuse(config, reason);
}

/// Why a generation could not start, before it serves: one line to print.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A bad environment value (malformed `LISTEN_FDS`, a handover
    /// variable that is not a number): exit 64.
    #[error("{0}")]
    Usage(String),
    /// The sockets: a port in use, a bad inherited fd.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// 64 for bad input from the environment, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use ListenError as L;
        match self {
            StartError::Usage(_)
            | StartError::Listen(
                L::BadCount(_) | L::TooMany(_) | L::NoneInherited | L::NameCount { .. },
            ) => 64,
            StartError::Listen(_) | StartError::Other(_) => 1,
        }
    }
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Stopped by SIGTERM or SIGINT, and drained.
    Stopped,
    /// Handed over to a successor, which owns the unit now.
    HandedOver,
    /// Started as a successor, but the handover was called off before it
    /// took over: it drained what it had accepted and leaves the unit to
    /// the old process.
    Aborted,
    /// A second SIGTERM or SIGINT during the drain: exited at once.
    Forced,
    /// Could not serve: the reason was logged.
    Failed(String),
}

impl Ended {
    /// 0 for [`Ended::Stopped`], [`Ended::HandedOver`] and
    /// [`Ended::Aborted`]; 1 for [`Ended::Failed`]; 2 for [`Ended::Forced`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Ended::Stopped | Ended::HandedOver | Ended::Aborted => 0,
            Ended::Failed(_) => 1,
            Ended::Forced => 2,
        }
    }
}

/// The status line a serving generation reports to systemd (`STATUS=`),
/// refreshed each second when it changes. Its `Display` is the default
/// wording: `serving 1 socket (systemd: http) · generation 0 · 0 in flight`,
/// then ` · last reload ok at 12:03:04 UTC` in a generation a reload
/// started, or ` · last reload failed at 12:03:04 UTC: <why>` in one that
/// stayed after a failed reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The sockets, as in `1 socket (systemd: http)`.
    pub sockets: String,
    /// This generation's number.
    pub generation: u32,
    /// Requests in progress.
    pub in_flight: usize,
    /// The last reload this process knows of.
    pub last_reload: Option<LastReload>,
}

/// When the last reload happened and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// When it ended.
    pub at: std::time::SystemTime,
    /// `Err` with the reason when the new process failed.
    pub outcome: Result<(), String>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serving {} · generation {} · {} in flight",
            self.sockets, self.generation, self.in_flight
        )?;
        if let Some(r) = &self.last_reload {
            let at = clock(r.at);
            match &r.outcome {
                Ok(()) => write!(f, " · last reload ok at {at} UTC")?,
                Err(why) => write!(f, " · last reload failed at {at} UTC: {why}")?,
            }
        }
        Ok(())
    }
}

/// `HH:MM:SS` of a time, in UTC.
fn clock(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// What an app may add to a generation's life. Every method has a default.
pub trait Hooks: Send + Sync + 'static {
    /// Asked once the sockets are taken, before the generation says it is
    /// ready. An `Err` (a configuration it cannot load, a dependency that is
    /// down) ends the generation with [`Ended::Failed`]: a successor that
    /// refuses is rolled back, and the old process keeps serving.
    fn check_ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// The status line for systemd (default: [`Status`]'s wording).
    fn status(&self, status: &Status) -> String {
        status.to_string()
    }
}

/// No hooks.
impl Hooks for () {}

/// What the app's routes may read about the generation serving them.
#[derive(Debug, Clone)]
pub struct Info {
    pid: u32,
    generation: u32,
    counters: Arc<Counters>,
}

impl Info {
    /// This process's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// 0 for a process started fresh, +1 for each handover.
    pub fn generation(&self) -> u32 {
        self.generation
    }
    /// Whether this generation is leaving (a drain, or a handover done):
    /// the moment to answer readiness probes 503.
    pub fn is_draining(&self) -> bool {
        self.counters.is_leaving()
    }
    /// Requests in progress.
    pub fn in_flight(&self) -> usize {
        self.counters.in_flight()
    }
    /// Open connections.
    pub fn connections(&self) -> usize {
        self.counters.connections()
    }
    /// Every metric, counters carried over from the previous generations.
    pub fn metrics(&self) -> crate::Metrics {
        self.counters.totals.snapshot(
            self.generation,
            self.in_flight(),
            self.connections(),
            self.counters.http2_held(),
        )
    }
}

/// A generation of the service, its sockets taken: made by
/// [`Generation::take`] before the async runtime starts, then run with
/// [`Generation::serve`] on it.
#[derive(Debug)]
pub struct Generation {
    config: Config,
    listeners: Vec<Listener>,
    /// Something about the inherited sockets worth a warning once logging
    /// is up.
    warning: Option<String>,
    number: u32,
    /// Set when a previous generation started us.
    inherited: Option<Inherited>,
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    info: Info,
    fd_limit: Option<FdLimit>,
    /// What the operator should hear about this start.
    notes: Vec<String>,
}

impl Generation {
    /// Takes the inherited sockets (`LISTEN_FDS`, from systemd or from the
    /// previous generation) or binds `listen`, takes the handover channel
    /// when a previous generation started us, and unblocks the signals a
    /// generation acts on. Call from `main` while the process still has one
    /// thread: it reads fds 3.. and the environment.
    pub fn take(config: &Config, listen: &[ListenAddr]) -> Result<Generation, StartError> {
        Self::take_inner(config, listen).inspect_err(|e| join::refuse(config, &e.to_string()))
    }

    fn take_inner(config: &Config, listen: &[ListenAddr]) -> Result<Generation, StartError> {
        let number = join::generation_from_env(config).map_err(StartError::Usage)?;
        let (listeners, warning) = listeners::take_or_bind(listen, &config.var(Var::SocketOrigin))?;
        // After the sockets: the channels sit right above them.
        let inherited = join::take(config).map_err(StartError::Usage)?;
        let exe = join::resolve_exe()
            .map_err(|e| StartError::Other(format!("cannot tell which binary this is: {e}")))?;
        signals::unblock()
            .map_err(|e| StartError::Other(format!("cannot unblock signals: {e}")))?;
        // Before the runtime's threads, like every process-wide setting.
        let fd_limit = FdLimit::raise();
        let info = Info {
            pid: std::process::id(),
            generation: number,
            counters: Arc::default(),
        };
        Ok(Generation {
            config: config.clone(),
            listeners,
            warning,
            number,
            inherited,
            exe,
            args: join::args(),
            info,
            fd_limit,
            notes: Vec::new(),
        })
    }

    /// This generation's number: 0 for a process started fresh, +1 for each
    /// handover.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// A handle for the app's routes (PID, generation, draining, counts).
    pub fn info(&self) -> Info {
        self.info.clone()
    }

    /// Whether the sockets were passed in (by systemd, or by the previous
    /// generation) rather than bound from the addresses given to
    /// [`Generation::take`], which are then not used.
    pub fn sockets_inherited(&self) -> bool {
        self.inherited.is_some()
            || self
                .listeners
                .iter()
                .any(|l| l.origin == listeners::Origin::Systemd)
    }

    /// The listening sockets' local addresses (`127.0.0.1:8080`,
    /// `unix:/path`), in order.
    pub fn local_addrs(&self) -> Vec<String> {
        self.listeners.iter().map(|l| l.local_addr()).collect()
    }

    /// Something the operator should hear about this start, say a setting
    /// it cannot apply: logged as a warning (`EVENT=not_applied`) when
    /// the generation starts, and, when a reload started it, printed by the
    /// reload helper after its `reloaded:` line.
    pub fn note(&mut self, text: impl Into<String>) {
        if self.notes.len() < crate::handover::channel::MAX_NOTES {
            self.notes.push(text.into());
        }
    }

    /// The names of the listening sockets (`LISTEN_FDNAMES`, systemd's
    /// `FileDescriptorName=`; `listen` for sockets bound here), in order:
    /// what [`Generation::serve_sockets`] is asked about.
    pub fn socket_names(&self) -> Vec<String> {
        self.listeners.iter().map(|l| l.name.clone()).collect()
    }

    /// Serves `router` on every socket until stopped or handed over, and
    /// lets go of the connections (moved or drained). Run on a tokio
    /// runtime with I/O and time enabled.
    pub async fn serve(self, router: axum::Router, hooks: impl Hooks) -> Ended {
        self.serve_sockets(move |_| router.clone(), hooks).await
    }

    /// Like [`Generation::serve`], with the routes each socket serves asked
    /// for by its name (say `/metrics` alone on a second socket systemd
    /// passes as `metrics`). A moved connection keeps its socket's routes.
    pub async fn serve_sockets(
        self,
        routes: impl Fn(&str) -> axum::Router + Send,
        hooks: impl Hooks,
    ) -> Ended {
        let mut run = match Running::start(self, &routes, Box::new(hooks)) {
            Ok(r) => r,
            Err(why) => {
                tracing::error!(event = "start_failed", reason = %why, "cannot start: {why}");
                return Ended::Failed(why);
            }
        };
        if let Err(why) = run.join().await {
            // The old process kept the unit (it is stopping us, or gone):
            // drain what we accepted, and tell systemd nothing.
            tracing::warn!(event = "handover_aborted", reason = %why, "handover aborted: {why}; draining");
            run.control.take();
            let report = run.server.finish_drain().await;
            tracing::info!(
                event = "drained",
                drain_ms = report.elapsed.as_millis() as u64,
                "drained; exiting"
            );
            return Ended::Aborted;
        }
        let leave = run.serve().await;
        run.leave(leave).await
    }
}
