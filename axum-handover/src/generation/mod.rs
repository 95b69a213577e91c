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
//! The phases live in their own files: `running` (start and join), and
//! beneath it `running/reload` (serving, and a reload under way) and
//! `running/leave` (moving or draining the connections at the end).

mod running;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

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
    join::report_start_failure(config, reason);
}

/// Why a generation could not start, before it serves: one line to print.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A bad environment value (malformed `LISTEN_FDS`, a handover
    /// variable that is not a number): exit 64.
    #[error("{0}")]
    Usage(String),
    /// The sockets: a port in use, a bad inherited fd.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Which binary this is cannot be told, so no reload could start it
    /// (exit 1).
    #[error("cannot tell which binary this is: {0}")]
    Executable(String),
    /// The stop and reload signals cannot be unblocked (exit 1).
    #[error("cannot unblock signals: {0}")]
    Signals(String),
    /// [`Generation::take`] was called before in this process: what was
    /// passed in is taken once (exit 1).
    #[error("Generation::take was already called in this process")]
    TakenTwice,
}

impl StartError {
    /// 64 for bad input from the environment, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use ListenError as L;
        match self {
            StartError::Usage(_)
            | StartError::Listen(
                L::BadCount(_)
                | L::BadPid(_)
                | L::TooMany(_)
                | L::NoneInherited
                | L::NameCount { .. },
            ) => 64,
            StartError::Listen(_)
            | StartError::Executable(_)
            | StartError::Signals(_)
            | StartError::TakenTwice => 1,
        }
    }

    /// A stable label (snake_case) for logs, metrics and tests, where the
    /// message may change: `bad_environment`, `unknown_executable`,
    /// `signals`, `taken_twice`, or the socket's [`ListenError::reason`].
    pub fn reason(&self) -> &'static str {
        match self {
            StartError::Usage(_) => "bad_environment",
            StartError::Listen(e) => e.reason(),
            StartError::Executable(_) => "unknown_executable",
            StartError::Signals(_) => "signals",
            StartError::TakenTwice => "taken_twice",
        }
    }
}

/// Why a generation that took its sockets could not serve
/// ([`Ended::Failed`]); a successor tells the old process this line, and
/// the reload fails with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The app's readiness check ([`Hooks::check_ready`] or
    /// [`Hooks::check_ready_async`]) said no, with this reason.
    #[error("{0}")]
    NotReady(String),
    /// The app's readiness check did not finish within its bound (the
    /// ready timeout, less a margin so that the old process hears why).
    #[error("the readiness check did not finish within {} ms", .0.as_millis())]
    ReadyTimeout(std::time::Duration),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(String),
    /// The sockets could not be served (or duplicated for the next
    /// generation).
    #[error("cannot serve the sockets: {0}")]
    Sockets(String),
}

impl ServeError {
    /// A stable label (snake_case) for logs, metrics and tests:
    /// `not_ready`, `ready_timeout`, `signals`, `sockets`.
    pub fn reason(&self) -> &'static str {
        match self {
            ServeError::NotReady(_) => "not_ready",
            ServeError::ReadyTimeout(_) => "ready_timeout",
            ServeError::Signals(_) => "signals",
            ServeError::Sockets(_) => "sockets",
        }
    }
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Could not serve: the reason was logged (`EVENT=start_failed`, with
    /// its [`ServeError::reason`]).
    Failed(ServeError),
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

/// Why this generation leaves: what [`Info::leaving`] resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Leaving {
    /// A successor owns the unit: it serves from now on, and this process
    /// only finishes what it has (moves or drains its connections).
    /// Background work belongs to the successor now.
    HandedOver,
    /// This generation stops and none follows it: SIGTERM or SIGINT, a
    /// successor whose handover was called off, or a start that failed.
    /// Flush what must be flushed.
    Stopping,
}

/// The status line a serving generation reports to systemd (`STATUS=`),
/// refreshed each second when it changes. Its `Display` is the default
/// wording: `serving 1 socket (systemd: http) · generation 0 · 0 in flight`,
/// then ` · last reload ok at 12:03:04 UTC` in a generation a reload
/// started, or ` · last reload failed at 12:03:04 UTC: <why>` in one that
/// stayed after a failed reload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
pub struct LastReload {
    /// When it ended.
    pub at: std::time::SystemTime,
    /// `Err` with the reason when the new process failed.
    pub outcome: Result<(), String>,
}

impl Status {
    /// A status without a reload, as the first generation has: for an
    /// app's tests of its [`Hooks::status`].
    pub fn new(sockets: impl Into<String>, generation: u32, in_flight: usize) -> Status {
        Status {
            sockets: sockets.into(),
            generation,
            in_flight,
            last_reload: None,
        }
    }
}

impl LastReload {
    /// A reload that ended `at`, well (`Ok`) or with a reason.
    pub fn new(at: std::time::SystemTime, outcome: Result<(), String>) -> LastReload {
        LastReload { at, outcome }
    }
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

/// What [`Hooks::check_ready_async`] returns: a boxed future, so that
/// [`Hooks`] stays object-safe.
pub type ReadyCheck<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// What an app may add to a generation's life. Every method has a default.
pub trait Hooks: Send + Sync + 'static {
    /// Asked once the sockets are taken, before the generation says it is
    /// ready. An `Err` (a configuration it cannot load, a dependency that is
    /// down) ends the generation with [`Ended::Failed`]: a successor that
    /// refuses is rolled back, and the old process keeps serving. Only
    /// called by the default [`Hooks::check_ready_async`].
    fn check_ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// The same check, for one that awaits (a database ping): override this
    /// one instead of [`Hooks::check_ready`], which it calls by default.
    /// Bounded by [`crate::Config::reload_timeout`] less a margin (a tenth,
    /// at most a second) and the time the process took to start, so that
    /// a successor tells the old process why it is not ready before that
    /// one gives up on it: past it, [`ServeError::ReadyTimeout`].
    ///
    /// ```
    /// # use axum_handover::{Hooks, ReadyCheck};
    /// # async fn ping() -> Result<(), std::io::Error> { Ok(()) }
    /// struct App;
    /// impl Hooks for App {
    ///     fn check_ready_async(&self) -> ReadyCheck<'_> {
    ///         Box::pin(async { ping().await.map_err(|e| format!("database: {e}")) })
    ///     }
    /// }
    /// ```
    fn check_ready_async(&self) -> ReadyCheck<'_> {
        Box::pin(std::future::ready(self.check_ready()))
    }

    /// The status line for systemd (default: [`Status`]'s wording).
    fn status(&self, status: &Status) -> String {
        status.to_string()
    }

    /// The app's own state, for the successor's
    /// [`Info::state_from_predecessor`]: bytes the app encodes as it likes,
    /// at most [`MAX_STATE_BYTES`] (a larger one is not handed over, and
    /// the successor starts without it). Default: none.
    ///
    /// Asked once, in the old process, right after the successor took over
    /// the unit and this process stopped accepting, before
    /// [`Info::leaving`] resolves: the latest state this process has. It
    /// still finishes its requests in flight (and serves HTTP/2 and TLS
    /// connections until they close); what those write after this call
    /// does not reach the successor. Runs on the runtime: keep it quick
    /// (copy under a lock, encode).
    ///
    /// Not asked when the successor predates this (it would take the bytes
    /// for junk): it starts without the state.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
}

/// The largest app state handed to a successor ([`Hooks::save_state`]):
/// 1 MiB. A few counters or a summary, not a cache: it is copied whole in
/// both processes and crosses the channel while connections move.
pub const MAX_STATE_BYTES: usize = crate::handover::state::MAX_STATE;

/// No hooks.
impl Hooks for () {}

/// What the app's routes and tasks may read about the generation serving
/// them. [`Info::for_tests`] makes one for an app's own tests.
#[derive(Debug, Clone)]
pub struct Info {
    pid: u32,
    generation: u32,
    counters: Arc<Counters>,
    /// Set once, when the generation starts to leave; [`Info::leaving`]
    /// waits on it. Every clone shares the sender, so it lives as long as
    /// any `Info` and a waiter never sees it closed.
    leaving: Arc<watch::Sender<Option<Leaving>>>,
    /// The previous generation's app state, once it arrived or none will.
    pub(crate) state: Arc<crate::handover::state::Inbox>,
}

impl Info {
    fn new(pid: u32, generation: u32) -> Info {
        Info {
            pid,
            generation,
            counters: Arc::default(),
            leaving: Arc::new(watch::Sender::new(None)),
            state: Arc::default(),
        }
    }

    /// An `Info` for an app's tests: the given PID and generation, nothing
    /// in flight, counters at zero, not leaving until
    /// [`Info::leave_for_tests`], no state from a predecessor until
    /// [`Info::inherit_for_tests`].
    pub fn for_tests(pid: u32, generation: u32) -> Info {
        Info::new(pid, generation)
    }

    /// Makes this `Info` (and its clones) leave, `why`: [`Info::leaving`]
    /// resolves and [`Info::is_draining`] turns true, as when a generation
    /// leaves. For an app's tests of its shutdown code.
    pub fn leave_for_tests(&self, why: Leaving) {
        self.set_leaving(why);
    }

    /// Makes [`Info::state_from_predecessor`] (of this `Info` and its
    /// clones) resolve to `state`, as when the previous generation's state
    /// arrives (the first call wins). For an app's tests of its restore.
    pub fn inherit_for_tests(&self, state: Option<Vec<u8>>) {
        self.state.deliver(state);
    }

    /// The previous generation's app state ([`Hooks::save_state`]): resolves
    /// once it arrived, to the bytes, or to `None` once none will come:
    /// at once in the first generation; when the previous generation had
    /// none, or too much; when it predates handing state over (once its
    /// channel closes: when it exited, after its drain); when this
    /// generation stops first.
    ///
    /// It arrives right after this generation took over the unit, not
    /// before it is ready: by then this process already serves (from its
    /// `ready` on, through the probation), so the app merges what it
    /// counted meanwhile with what it inherits, or has its routes wait
    /// here. Restoring is the app's: bytes it cannot read are best logged
    /// and dropped (the generation is serving already, and refusing now
    /// would not give the unit back to the old process, which is leaving).
    /// Owns what it needs (`'static`), for a spawned task:
    ///
    /// ```
    /// # async fn example(info: axum_handover::Info, hits: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    /// let inherited = info.state_from_predecessor();
    /// tokio::spawn(async move {
    ///     if let Some(bytes) = inherited.await {
    ///         match <[u8; 8]>::try_from(bytes.as_slice()) {
    ///             Ok(b) => { hits.fetch_add(u64::from_le_bytes(b), std::sync::atomic::Ordering::Relaxed); }
    ///             Err(_) => eprintln!("inherited state: {} bytes, not a count; ignored", bytes.len()),
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn state_from_predecessor(&self) -> impl Future<Output = Option<Vec<u8>>> + Send + 'static {
        self.state.wait()
    }

    /// Announces that the generation leaves; the first reason given wins.
    pub(crate) fn set_leaving(&self, why: Leaving) {
        self.leaving.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            *now = Some(why);
            true
        });
    }

    /// Resolves when this generation starts to leave, and says why: the
    /// shutdown future for the app's own tasks, in place of
    /// `with_graceful_shutdown`'s. A successor owns the unit
    /// ([`Leaving::HandedOver`], right after the handover, while this
    /// process still finishes its requests), or the generation stops
    /// ([`Leaving::Stopping`], at SIGTERM or SIGINT, when the drain
    /// begins). Already resolved once it left, and always by the time
    /// `serve` returns. Owns what it needs (`'static`), so it can move into
    /// a spawned task; keep the task's handle and await it after `serve`:
    /// when `main` returns, the runtime drops the tasks it has not run yet
    /// (a stop with nothing in flight returns within a millisecond).
    ///
    /// ```
    /// # async fn example(info: axum_handover::Info) {
    /// let leaving = info.leaving();
    /// let task = tokio::spawn(async move {
    ///     let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    ///     tokio::select! {
    ///         why = leaving => println!("background task: {why:?}"),
    ///         _ = async { loop { tick.tick().await; /* work */ } } => {}
    ///     }
    /// });
    /// // let ended = generation.serve(app, hooks).await;
    /// let _ = task.await;
    /// # }
    /// ```
    pub fn leaving(&self) -> impl Future<Output = Leaving> + Send + 'static {
        let sender = self.leaving.clone();
        async move {
            let mut rx = sender.subscribe();
            let why = match rx.wait_for(Option::is_some).await {
                Ok(why) => *why,
                // Cannot happen (`sender` lives as long as this future);
                // stopping is the safe reading.
                Err(_) => None,
            };
            why.unwrap_or(Leaving::Stopping)
        }
    }

    /// Why the generation leaves, once it does; `None` while it serves.
    pub fn left(&self) -> Option<Leaving> {
        *self.leaving.borrow()
    }

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
        self.counters.phase.is_leaving() || self.left().is_some()
    }
    /// Requests in progress.
    pub fn in_flight(&self) -> usize {
        self.counters.gauges.in_flight()
    }
    /// Open connections.
    pub fn connections(&self) -> usize {
        self.counters.gauges.connections()
    }
    /// Open connections upgraded to another protocol (WebSockets).
    pub fn upgraded(&self) -> usize {
        self.counters.gauges.upgraded()
    }
    /// Every metric, counters carried over from the previous generations.
    pub fn metrics(&self) -> crate::Metrics {
        self.counters.totals.snapshot(
            self.generation,
            self.in_flight(),
            self.connections(),
            self.upgraded(),
            self.counters.gauges.http2_held(),
            self.counters
                .gauges
                .fd_store_held
                .load(std::sync::atomic::Ordering::Relaxed),
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
    /// Connections systemd kept for us over a restart, and the names to
    /// remove them from its store by.
    stored: Vec<listeners::Stored>,
    stored_names: Vec<String>,
    number: u32,
    /// Set when a previous generation started us.
    inherited: Option<Inherited>,
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    info: Info,
    fd_limit: Option<FdLimit>,
    /// What the operator should hear about this start.
    notes: Vec<String>,
    /// When the sockets were taken: the readiness check's bound counts
    /// from here.
    taken: Instant,
}

impl Generation {
    /// Takes the inherited sockets (`LISTEN_FDS`, from systemd or from the
    /// previous generation) or binds `listen`, takes the handover channel
    /// when a previous generation started us, and unblocks the signals a
    /// generation acts on.
    ///
    /// Safe from any thread, in `#[tokio::main]` too: it reads the
    /// environment and never changes it, and the fds it takes have been
    /// open since exec. Call it first thing all the same, before the app
    /// starts other programs: until it has taken them, the inherited fds
    /// are not yet close-on-exec. `LISTEN_FDS` and the handover variables
    /// stay in the environment, so a program the app starts sees them
    /// without the fds (closed on exec): give it
    /// `Command::env_remove("LISTEN_FDS")` if it is socket-activated
    /// itself (systemd's `LISTEN_PID` already names this process, not it).
    ///
    /// Once per process: a second call is [`StartError::TakenTwice`].
    pub fn take(config: &Config, listen: &[ListenAddr]) -> Result<Generation, StartError> {
        Self::take_inner(config, listen)
            .inspect_err(|e| join::report_start_failure(config, &e.to_string()))
    }

    fn take_inner(config: &Config, listen: &[ListenAddr]) -> Result<Generation, StartError> {
        // The environment still names the inherited fds after they are
        // taken (it is never changed): a second take would own them twice.
        static TAKEN: AtomicBool = AtomicBool::new(false);
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(StartError::TakenTwice);
        }
        let number = join::generation_from_env(config).map_err(StartError::Usage)?;
        let taken = listeners::take_or_bind(listen, &config.var(Var::SocketOrigin))?;
        // After the sockets: the channels sit right above them.
        let inherited = join::take(config).map_err(StartError::Usage)?;
        let exe = join::resolve_exe().map_err(|e| StartError::Executable(e.to_string()))?;
        signals::unblock(&config.reload_signals).map_err(|e| StartError::Signals(e.to_string()))?;
        // setrlimit is process-wide: any thread may raise it, and threads
        // started later see it too.
        let fd_limit = FdLimit::raise();
        Ok(Generation {
            config: config.clone(),
            listeners: taken.listeners,
            warning: taken.warning,
            stored: taken.stored,
            stored_names: taken.stored_names,
            number,
            inherited,
            exe,
            args: join::args(),
            info: Info::new(std::process::id(), number),
            fd_limit,
            notes: Vec::new(),
            taken: Instant::now(),
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
        let info = self.info.clone();
        let ended = self.run(routes, Box::new(hooks)).await;
        // Whatever ended it, the app's tasks hear it (handed over or
        // stopping, they heard it already), and no state comes any more.
        info.set_leaving(Leaving::Stopping);
        info.state.deliver(None);
        ended
    }

    async fn run(
        self,
        routes: impl Fn(&str) -> axum::Router + Send,
        hooks: Box<dyn Hooks>,
    ) -> Ended {
        if let Err(e) = self.check_ready(&*hooks).await {
            return self.failed(e);
        }
        let mut run = match Running::start(self, &routes, hooks) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(
                    event = "start_failed",
                    reason = e.reason(),
                    "cannot start: {e}"
                );
                return Ended::Failed(e);
            }
        };
        if let Err(why) = run.join().await {
            return run.abandon(&why).await;
        }
        let leave = run.serve().await;
        run.leave(leave).await
    }

    /// The app's readiness check, bounded: by the ready timeout, less the
    /// time since the sockets were taken and a margin (a tenth, at most a
    /// second), so that a successor's refusal reaches the old process
    /// before the old process's own ready timeout (counted from the spawn)
    /// runs out.
    async fn check_ready(&self, hooks: &dyn Hooks) -> Result<(), ServeError> {
        let timeout = self.config.reload_timeout;
        let margin = (timeout / 10).min(Duration::from_secs(1));
        let bound = timeout
            .saturating_sub(margin)
            .saturating_sub(self.taken.elapsed());
        match tokio::time::timeout(bound, hooks.check_ready_async()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(ServeError::NotReady(why)),
            Err(_) => Err(ServeError::ReadyTimeout(bound)),
        }
    }

    /// Could not start serving: logged, and a successor tells the old
    /// process why.
    fn failed(self, e: ServeError) -> Ended {
        tracing::error!(
            event = "start_failed",
            reason = e.reason(),
            "cannot start: {e}"
        );
        if self.inherited.is_some() {
            join::report_start_failure(&self.config, &e.to_string());
        }
        Ended::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels are API: logs, metrics and apps' tests match on them.
    /// Changing one is a breaking change; adding one extends this list.
    #[test]
    fn failure_labels_are_stable() {
        let io = || std::io::Error::other("x");
        let start = [
            StartError::Usage("x".into()),
            StartError::Executable("x".into()),
            StartError::Signals("x".into()),
            StartError::TakenTwice,
            ListenError::BadCount("x".into()).into(),
            ListenError::BadPid("x".into()).into(),
            ListenError::TooMany(65).into(),
            ListenError::NoneInherited.into(),
            ListenError::NameCount { names: 1, fds: 2 }.into(),
            ListenError::BadInherited {
                fd: 3,
                name: String::new(),
                reason: "x".into(),
            }
            .into(),
            ListenError::Bind {
                addr: ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()),
                source: io(),
                hint: "",
            }
            .into(),
        ];
        let labels: Vec<&str> = start.iter().map(StartError::reason).collect();
        assert_eq!(
            labels,
            [
                "bad_environment",
                "unknown_executable",
                "signals",
                "taken_twice",
                "bad_listen_fds",
                "bad_listen_pid",
                "too_many_sockets",
                "no_sockets",
                "bad_listen_fdnames",
                "bad_inherited_socket",
                "bind_failed",
            ]
        );
        let serve = [
            ServeError::NotReady("x".into()),
            ServeError::ReadyTimeout(Duration::from_secs(1)),
            ServeError::Signals("x".into()),
            ServeError::Sockets("x".into()),
        ];
        let labels: Vec<&str> = serve.iter().map(ServeError::reason).collect();
        assert_eq!(labels, ["not_ready", "ready_timeout", "signals", "sockets"]);
        for l in ["bad_environment", "not_ready", "bad_inherited_socket"] {
            assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        // The app's own reason is the message, as the helper prints it.
        assert_eq!(
            ServeError::NotReady("db down".into()).to_string(),
            "db down"
        );
    }

    /// The environment keeps naming the inherited fds: a second take must
    /// not own them again. (The only test here that calls `take`: the
    /// guard is process-wide.)
    #[test]
    fn take_is_once_per_process() {
        let config = Config::new("axum-handover-unit-test");
        let addr = ListenAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let first = Generation::take(&config, std::slice::from_ref(&addr)).unwrap();
        assert_eq!(first.socket_names(), ["listen"]);
        let second = Generation::take(&config, &[addr]).unwrap_err();
        assert_eq!(second.reason(), "taken_twice");
    }

    #[tokio::test]
    async fn leaving_resolves_once_with_the_first_reason() {
        let info = Info::for_tests(42, 3);
        assert_eq!((info.pid(), info.generation()), (42, 3));
        assert!(!info.is_draining());
        assert_eq!(info.left(), None);
        let task = tokio::spawn(info.leaving());
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "resolved before the generation left");
        info.clone().leave_for_tests(Leaving::HandedOver);
        info.set_leaving(Leaving::Stopping);
        let why = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("leaving() resolves")
            .unwrap();
        assert_eq!(why, Leaving::HandedOver);
        assert!(info.is_draining());
        // A late waiter hears it at once.
        assert_eq!(info.leaving().await, Leaving::HandedOver);
    }
}
