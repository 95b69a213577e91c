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

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::control::{self, Answer, Report};
use crate::handover::channel::PROTOCOL;
use crate::handover::join::{self, Inherited, Successor};
use crate::handover::spawn::{self, Failure, Joined, Pending, Plan};
use crate::limits::FdLimit;
use crate::listeners::{self, ListenAddr, ListenError, Listener, Origin};
use crate::metrics::ReloadResult;
use crate::notify::{self, Notifier};
use crate::server::{Counters, DrainReport, Server};
use crate::signals::{self, Event, Signals, Stop, Trigger};
use crate::{Config, env::Var};

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
/// then ` · last reload failed: <why>` after a failed reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The sockets, as in `1 socket (systemd: http)`.
    pub sockets: String,
    /// This generation's number.
    pub generation: u32,
    /// Requests in progress.
    pub in_flight: usize,
    /// Why the last reload failed, if it did.
    pub last_reload_failure: Option<String>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serving {} · generation {} · {} in flight",
            self.sockets, self.generation, self.in_flight
        )?;
        if let Some(why) = &self.last_reload_failure {
            write!(f, " · last reload failed: {why}")?;
        }
        Ok(())
    }
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
        self.counters
            .totals
            .snapshot(self.generation, self.in_flight(), self.connections())
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

    /// Serves `router` until stopped or handed over, and lets go of the
    /// connections (moved or drained). Run on a tokio runtime with I/O and
    /// time enabled.
    pub async fn serve(self, router: axum::Router, hooks: impl Hooks) -> Ended {
        let mut run = match Running::start(self, router, Box::new(hooks)) {
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

/// A reload under way: the new process, and who asked.
struct Reload {
    pending: Pending,
    trigger: Trigger,
    reply: Option<control::Request>,
}

/// Why the serving phase ended.
enum Leave {
    Stop(Stop),
    HandedOver { reload: Reload, joined: Joined },
}

/// A started generation: everything the phases share.
struct Running {
    config: Config,
    info: Info,
    hooks: Box<dyn Hooks>,
    sockets: String,
    notifier: Arc<Notifier>,
    signals: Signals,
    server: Server,
    inherited: Option<Inherited>,
    /// The control socket's task and the requests it forwards.
    control: Option<tokio::task::JoinHandle<()>>,
    requests: mpsc::Receiver<control::Request>,
    /// How to start the next generation: fixed at start-up.
    plan: Plan,
    last_failure: Option<String>,
}

impl Running {
    /// Starts serving the sockets: accept loops, signal handlers, control
    /// socket. Nothing is said to systemd yet.
    fn start(
        mut g: Generation,
        router: axum::Router,
        hooks: Box<dyn Hooks>,
    ) -> Result<Running, String> {
        // A successor that cannot start tells the old process why, over the
        // channel, before it is closed.
        let inherited = g.inherited.take();
        let config = g.config.clone();
        match Self::start_inner(g, router, hooks) {
            Ok(mut r) => {
                r.inherited = inherited;
                Ok(r)
            }
            Err(why) => {
                if inherited.is_some() {
                    join::refuse(&config, &why);
                }
                Err(why)
            }
        }
    }

    fn start_inner(
        g: Generation,
        router: axum::Router,
        hooks: Box<dyn Hooks>,
    ) -> Result<Running, String> {
        let pid = g.info.pid;
        // A new generation speaks for the unit only once it has taken over.
        let notifier = Notifier::from_env(g.inherited.is_none());
        if let Some(w) = &g.warning {
            tracing::warn!(event = "listen_fds_ignored", "{w}");
        }
        for l in &g.listeners {
            tracing::info!(event = "listening", socket = %l.name, address = %l.local_addr(),
                origin = %l.origin, "listening on {} ({}, {})", l.local_addr(), l.origin, l.name);
        }
        // Only the first generation binds; later ones share its very
        // sockets and need no migration.
        if g.number == 0
            && g.listeners
                .iter()
                .any(|l| l.origin == Origin::Bound && l.port().is_some())
            && listeners::tcp_migrate_req() == Some(false)
        {
            tracing::warn!(
                event = "tcp_migrate_req_off",
                "net.ipv4.tcp_migrate_req=0: if another process shares this port and this one \
                 stops, connections still queued on its socket are reset; set it to 1 (Linux \
                 5.14+), or reload, which hands over the very same socket"
            );
        }
        hooks.check_ready()?;
        let mut config = g.config.clone();
        if let Some(limit) = g.fd_limit {
            let budget = limit.connection_budget(g.listeners.len());
            tracing::info!(
                event = "fd_limit",
                soft = limit.soft,
                hard = limit.hard,
                soft_before = limit.soft_before,
                connection_budget = budget,
                "{limit}"
            );
            if config.max_connections > budget {
                tracing::warn!(
                    event = "max_connections_clamped",
                    asked = config.max_connections,
                    budget,
                    "at most {budget} connections fit under the {limit}; serving at most {budget} (asked for {})",
                    config.max_connections
                );
                config.max_connections = budget;
            }
        }
        let sockets = describe(&g.listeners);
        // Second descriptors of every socket, for the next generation.
        let handover: Vec<(OwnedFd, String)> = g
            .listeners
            .iter()
            .map(|l| l.try_clone_fd().map(|fd| (fd, l.name.clone())))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot duplicate a listening socket: {e}"))?;
        let plan = Plan {
            origin: g
                .listeners
                .first()
                .map(|l| l.origin)
                .unwrap_or(Origin::Bound),
            exe: g.exe,
            args: g.args,
            generation: g.number + 1,
            sockets: handover,
        };
        let signals =
            Signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let (tx, requests) = mpsc::channel::<control::Request>(4);
        let path = control::runtime_path(std::env::var_os("RUNTIME_DIRECTORY").as_deref(), pid);
        let control = match control::listen(g.config.name(), pid, path) {
            Ok(l) => Some(tokio::spawn(control::serve(l, tx))),
            Err(e) => {
                tracing::warn!(event = "control_unavailable", error = %e,
                    "no control socket: the reload helper cannot reach this process; SIGUSR2 still works");
                None
            }
        };
        let server = Server::start(g.listeners, router, g.info.counters.clone(), &config)
            .map_err(|e| format!("cannot serve the sockets: {e}"))?;
        Ok(Running {
            config: g.config,
            info: g.info,
            hooks,
            sockets,
            notifier,
            signals,
            server,
            inherited: g.inherited,
            control,
            requests,
            plan,
            last_failure: None,
        })
    }

    fn status(&self) -> String {
        self.hooks.status(&Status {
            sockets: self.sockets.clone(),
            generation: self.info.generation,
            in_flight: self.info.in_flight(),
            last_reload_failure: self.last_failure.clone(),
        })
    }

    fn drain_status(&self) -> String {
        drain_status(&self.info)
    }

    /// Every socket is being accepted from: say so. A successor says it to
    /// the old process, takes the unit over on `commit`, then takes the
    /// connections the old process moves. `Err`: the handover was called
    /// off before we took over.
    async fn join(&mut self) -> Result<(), String> {
        let Some(inherited) = self.inherited.take() else {
            self.notifier.ready(&self.status());
            return self.ready();
        };
        let mut successor = Successor::announce(inherited, self.config.move_connections)
            .await
            .map_err(|e| format!("cannot report ready: {e}"))?;
        // The old process's counters come now, its connections once we own
        // the unit.
        if let Some(channel) = successor.connections() {
            self.server.adopt(channel);
        }
        tokio::select! {
            r = successor.wait_commit() => r?,
            sig = self.signals.next_stop() => {
                return Err(format!("{sig} before the handover was committed"));
            }
        }
        let (n, s) = (self.notifier.clone(), self.status());
        // take_over blocks on the BARRIER=1 round trip.
        let _ = tokio::task::spawn_blocking(move || n.take_over(&s)).await;
        successor.confirm_owner().await;
        self.ready()
    }

    fn ready(&self) -> Result<(), String> {
        let (sockets, generation) = (&self.sockets, self.info.generation);
        tracing::info!(event = "ready", sockets = %sockets, "serving {sockets} as generation {generation}");
        if let Some(interval) = notify::watchdog_interval() {
            tracing::info!(
                event = "watchdog",
                interval_ms = interval.as_millis() as u64,
                "pinging the systemd watchdog"
            );
            tokio::spawn(notify::watchdog_loop(self.notifier.clone(), interval));
        }
        Ok(())
    }

    /// Serves until told to stop, or until a successor owns the unit.
    async fn serve(&mut self) -> Leave {
        let mut reload: Option<Reload> = None;
        let mut status = String::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            enum Step {
                Signal(Event),
                Request(control::Request),
                Outcome(Result<Joined, Failure>),
                Tick,
            }
            let step = tokio::select! {
                ev = self.signals.next() => Step::Signal(ev),
                Some(req) = self.requests.recv() => Step::Request(req),
                r = outcome(&mut reload) => Step::Outcome(r),
                _ = tick.tick() => Step::Tick,
            };
            match step {
                Step::Tick => {
                    let now = self.status();
                    if now != status {
                        self.notifier.status(&now);
                        status = now;
                    }
                }
                Step::Signal(Event::Stop(sig)) => {
                    if let Some(r) = reload.take() {
                        r.pending.cancel().await;
                        reply(
                            r.reply,
                            Answer::Failed("the old process is stopping".into()),
                        )
                        .await;
                    }
                    return Leave::Stop(sig);
                }
                Step::Signal(Event::Reload(trigger)) => {
                    reload = self.begin_reload(reload, trigger, None).await;
                }
                Step::Request(req) => {
                    reload = self.begin_reload(reload, Trigger::Request, Some(req)).await;
                }
                Step::Outcome(Ok(joined)) => {
                    let reload = reload.take().expect("an outcome comes from a reload");
                    return Leave::HandedOver { reload, joined };
                }
                Step::Outcome(Err(failure)) => {
                    let r = reload.take().expect("an outcome comes from a reload");
                    self.reload_failed(Some(r.pending.pid), failure, r.reply)
                        .await;
                }
            }
        }
    }

    /// Starts a reload, unless one is under way. Returns the reload now in
    /// progress.
    async fn begin_reload(
        &mut self,
        current: Option<Reload>,
        trigger: Trigger,
        reply_to: Option<control::Request>,
    ) -> Option<Reload> {
        if current.is_some() {
            tracing::warn!(event = "reload_refused", trigger = %trigger,
                "a reload is already under way; ignoring {trigger}");
            reply(
                reply_to,
                Answer::Refused("a reload is already under way".into()),
            )
            .await;
            return current;
        }
        if trigger.wants_reloading() {
            // Type=notify-reload (systemd >= 253) waits for this, then for
            // READY=1 from the new main process.
            self.notifier.reloading(&format!(
                "reloading: starting generation {}",
                self.plan.generation
            ));
        }
        let environment = reply_to
            .as_ref()
            .and_then(|r| unit_environment(r, &self.config));
        let totals = self.info.counters.totals.clone();
        match spawn::spawn(&self.plan, &self.config, environment, totals) {
            Ok(pending) => {
                tracing::info!(event = "reload_started", trigger = %trigger, new_pid = pending.pid,
                    new_generation = pending.generation, exe = %self.plan.exe.display(),
                    "reload ({trigger}): started {} as PID {}", self.plan.exe.display(), pending.pid);
                Some(Reload {
                    pending,
                    trigger,
                    reply: reply_to,
                })
            }
            Err(failure) => {
                self.reload_failed(None, failure, reply_to).await;
                None
            }
        }
    }

    /// A failed reload, handled in one place: logged, shown in the status
    /// line, the unit reclaimed, the helper answered.
    async fn reload_failed(
        &mut self,
        new_pid: Option<u32>,
        failure: Failure,
        reply_to: Option<control::Request>,
    ) {
        let why = failure.to_string();
        tracing::error!(event = "reload_failed", new_pid, reason = %why,
            "reload failed, still serving: {why}");
        self.last_failure = Some(why.clone());
        self.info.counters.totals.reload(ReloadResult::Failed);
        self.notifier.reclaim(&self.status());
        reply(reply_to, Answer::Failed(why)).await;
    }

    /// Lets go of the connections, and of the unit: moved to the successor
    /// or drained.
    async fn leave(mut self, leave: Leave) -> Ended {
        if let Some(t) = self.control.take() {
            t.abort();
        }
        let pid = self.info.pid;
        let mut reporter = None;
        let handover = match leave {
            Leave::Stop(sig) => {
                tracing::info!(
                    event = "drain",
                    signal = %sig,
                    in_flight = self.info.in_flight(),
                    connections = self.info.connections(),
                    "{sig}: draining {} in-flight requests",
                    self.info.in_flight()
                );
                self.server.begin_drain();
                self.notifier.stopping(&self.drain_status());
                None
            }
            Leave::HandedOver { reload, joined } => {
                // The successor owns the unit's notifications from here.
                self.notifier.silence();
                let (new_pid, new_gen) = (reload.pending.pid, reload.pending.generation);
                let took = reload.pending.started.elapsed();
                let millis = took.as_millis() as u64;
                let totals = &self.info.counters.totals;
                totals.reload(ReloadResult::Ok);
                totals.handover(took.as_secs_f64());
                let moving = self.begin_letting_go(joined);
                tracing::info!(
                    event = "handover",
                    old_pid = pid,
                    new_pid,
                    new_generation = new_gen,
                    handover_ms = millis,
                    trigger = %reload.trigger,
                    in_flight = self.info.in_flight(),
                    connections = self.info.connections(),
                    "handed over to PID {new_pid} (generation {new_gen}) in {millis} ms; {}",
                    if moving { "moving connections" } else { "draining" }
                );
                if let Some(r) = reload.reply {
                    let answer = Answer::Ok {
                        old_pid: pid,
                        new_pid,
                        generation: new_gen,
                        millis,
                    };
                    reporter = Some(r.accept(answer).await);
                }
                Some(new_pid)
            }
        };
        let extender = self.extend_drain();
        let report = self.finish(reporter).await;
        extender.abort();
        let Some(report) = report else {
            return Ended::Forced;
        };
        let totals = &self.info.counters.totals;
        totals.drained(report.elapsed.as_secs_f64(), report.moved, report.fell_back);
        if let Some(channel) = self.server.successor() {
            // The final totals, this drain included.
            let _ = channel.send_counters(&totals.carried().encode()).await;
        }
        self.log_drained(&report, handover);
        if handover.is_some() {
            Ended::HandedOver
        } else {
            Ended::Stopped
        }
    }

    /// After a handover: move the connections when the successor takes
    /// them, else drain. Says which.
    fn begin_letting_go(&mut self, joined: Joined) -> bool {
        match joined.connections {
            Some(channel) if self.config.move_connections => {
                self.server.begin_move(channel);
                true
            }
            _ => {
                let why = if !self.config.move_connections {
                    "moving connections is off"
                } else if joined.ready.protocol < 2 {
                    "the new process predates moving connections (handover protocol 1)"
                } else {
                    "the new process takes no connections"
                };
                tracing::info!(
                    event = "connections_not_moved",
                    reason = why,
                    peer_protocol = joined.ready.protocol,
                    protocol = PROTOCOL,
                    "not moving connections: {why}; draining them instead"
                );
                self.server.begin_drain();
                false
            }
        }
    }

    /// Keeps systemd from killing a drain that runs long, and shows its
    /// progress; both no-ops once silenced.
    fn extend_drain(&self) -> tokio::task::JoinHandle<()> {
        let (notifier, info) = (self.notifier.clone(), self.info.clone());
        let drain_timeout = self.config.drain_timeout;
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let left = drain_timeout.saturating_sub(started.elapsed());
                notifier.extend_timeout(left + Duration::from_secs(10));
                notifier.status(&drain_status(&info));
            }
        })
    }

    /// Waits for the drain, answering the reload helper's second line when
    /// it ends or after two seconds, whichever is first. `None`: a second
    /// stop signal cut it short.
    async fn finish(&mut self, mut reporter: Option<control::Reporter>) -> Option<DrainReport> {
        let started = tokio::time::Instant::now();
        let bound = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(bound);
        let report = loop {
            tokio::select! {
                r = self.server.finish_drain() => break r,
                _ = &mut bound, if reporter.is_some() => {
                    let (moved, fell_back) = self.server.moves();
                    let busy = self.info.connections();
                    let millis = started.elapsed().as_millis() as u64;
                    if let Some(r) = reporter.take() {
                        r.report(Report { moved, fell_back, busy, millis }).await;
                    }
                }
                sig = self.signals.next_stop() => {
                    tracing::warn!(event = "forced_exit", signal = %sig, in_flight = self.info.in_flight(),
                        "{sig} again: exiting now, cutting {} in-flight requests", self.info.in_flight());
                    return None;
                }
            }
        };
        if let Some(r) = reporter {
            r.report(Report {
                moved: report.moved,
                fell_back: report.fell_back,
                busy: report.cut_connections,
                millis: report.elapsed.as_millis() as u64,
            })
            .await;
        }
        Some(report)
    }

    fn log_drained(&self, report: &DrainReport, handover: Option<u32>) {
        let drain_ms = report.elapsed.as_millis() as u64;
        if report.timed_out() {
            tracing::warn!(
                event = "drain_timeout",
                cut_requests = report.cut_requests,
                cut_connections = report.cut_connections,
                connections_moved = report.moved,
                connections_fell_back = report.fell_back,
                drain_ms,
                "drain timeout ({}s): cut {} in-flight requests on {} connections",
                self.config.drain_timeout.as_secs(),
                report.cut_requests,
                report.cut_connections
            );
        } else if let Some(new_pid) = handover {
            tracing::info!(
                event = "drained",
                connections_moved = report.moved,
                connections_fell_back = report.fell_back,
                new_pid,
                drain_ms,
                "drained in {drain_ms} ms after the handover: {} connections moved to PID {new_pid}, {} fell back; exiting",
                report.moved,
                report.fell_back
            );
        } else {
            tracing::info!(
                event = "drained",
                drain_ms,
                "drained in {drain_ms} ms; exiting"
            );
        }
    }
}

/// The environment the next generation gets: the reload helper's, when
/// systemd started it for this very unit invocation (it then has the unit's
/// current `Environment=` and `EnvironmentFile=`); otherwise `None`, and the
/// next generation inherits ours. Logs the names that change, not values.
fn unit_environment<'a>(
    req: &'a control::Request,
    config: &Config,
) -> Option<&'a [(Vec<u8>, Vec<u8>)]> {
    use std::os::unix::ffi::OsStrExt;
    let vars = req.environment.as_deref()?;
    let ours = std::env::var_os("INVOCATION_ID")?;
    let theirs = vars.iter().find(|(k, _)| k == b"INVOCATION_ID")?;
    if theirs.1 != ours.as_bytes() {
        return None;
    }
    let ignored = |k: &[u8]| spawn::PER_PROCESS.contains(&k) || spawn::is_handover_var(config, k);
    let mut changed: Vec<String> = vars
        .iter()
        .filter(|(k, _)| !ignored(k))
        .filter(|(k, v)| {
            std::env::var_os(std::ffi::OsStr::from_bytes(k)).is_none_or(|o| o.as_bytes() != v)
        })
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    for (k, _) in std::env::vars_os() {
        let k = k.as_bytes();
        if !ignored(k) && !vars.iter().any(|(v, _)| v == k) {
            changed.push(format!("-{}", String::from_utf8_lossy(k)));
        }
    }
    tracing::info!(event = "reload_environment", variables = vars.len(), changed = %changed.join(" "),
        "the next generation gets the unit's current environment ({} variables; changed: {})",
        vars.len(), if changed.is_empty() { "none".to_string() } else { changed.join(" ") });
    Some(vars)
}

/// The outcome of the reload under way; pending forever without one.
async fn outcome(reload: &mut Option<Reload>) -> Result<Joined, Failure> {
    match reload {
        Some(r) => r.pending.outcome().await,
        None => std::future::pending().await,
    }
}

async fn reply(reply: Option<control::Request>, answer: Answer) {
    if let Some(r) = reply {
        r.answer(answer).await;
    }
}

/// "2 sockets (systemd: http, admin)".
fn describe(listeners: &[Listener]) -> String {
    let n = listeners.len();
    let origin = listeners
        .first()
        .map(|l| l.origin.to_string())
        .unwrap_or_default();
    let names: Vec<String> = listeners.iter().map(Listener::label).collect();
    format!(
        "{n} socket{} ({origin}: {})",
        if n == 1 { "" } else { "s" },
        names.join(", ")
    )
}

fn drain_status(info: &Info) -> String {
    format!(
        "draining: {} in flight on {} connections · generation {}",
        info.in_flight(),
        info.connections(),
        info.generation
    )
}
