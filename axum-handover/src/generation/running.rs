//! A started generation: what the phases share, starting, and joining.
//! Its fields are private to this module and the two that serve and let
//! go (`reload`, `leave`): `generation` sees the phases' methods only.

mod leave;
mod reload;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Generation, Hooks, Info, ServeError, Status};
use crate::Config;
use crate::control;
use crate::handover::join::{self, Inherited, Successor};
use crate::handover::spawn::{Joined, Pending, Plan};
use crate::listeners::{self, Listener, Origin};
use crate::notify::{self, Notifier};
use crate::server::Server;
use crate::signals::{Signals, Stop, Trigger};

/// A reload under way: the new process, and who asked.
pub(super) struct Reload {
    pending: Pending,
    trigger: Trigger,
    reply: Option<control::Request>,
}

/// Why the serving phase ended.
pub(super) enum Leave {
    Stop(Stop),
    HandedOver { reload: Reload, joined: Joined },
}

/// A started generation: everything the phases share.
pub(super) struct Running {
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
    last_reload: Option<super::LastReload>,
    /// What the operator should hear about this start (sent to the old
    /// process when a reload started us).
    notes: Vec<String>,
}

impl Running {
    /// Starts serving the sockets: accept loops, signal handlers, control
    /// socket. Nothing is said to systemd yet.
    pub(super) fn start(
        mut g: Generation,
        routes: &dyn Fn(&str) -> axum::Router,
        hooks: Box<dyn Hooks>,
    ) -> Result<Running, ServeError> {
        // A successor that cannot start tells the old process why, over the
        // channel, before it is closed.
        let inherited = g.inherited.take();
        let config = g.config.clone();
        match Self::start_inner(g, inherited.as_ref(), routes, hooks) {
            Ok(mut r) => {
                r.inherited = inherited;
                Ok(r)
            }
            Err(why) => {
                if inherited.is_some() {
                    join::report_start_failure(&config, &why.to_string());
                }
                Err(why)
            }
        }
    }

    /// The steps of a start, each named: say what was inherited, fit the
    /// connection budget to the fd limit, keep second descriptors of the
    /// sockets for a next generation, open the control socket, serve, and
    /// take what systemd's file descriptor store kept.
    fn start_inner(
        g: Generation,
        inherited: Option<&Inherited>,
        routes: &dyn Fn(&str) -> axum::Router,
        hooks: Box<dyn Hooks>,
    ) -> Result<Running, ServeError> {
        let pid = g.info.pid;
        // A new generation speaks for the unit only once it has taken over
        // (`g.inherited` is already taken here: ask the one passed in).
        let notifier = Notifier::from_env(inherited.is_none());
        log_start(&g, inherited);
        let config = fit_budget(&g);
        let sockets = describe(&g.listeners);
        let plan = handover_plan(&g)?;
        let signals = Signals::install(&g.config.reload_signals)
            .map_err(|e| ServeError::Signals(e.to_string()))?;
        let (tx, requests) = mpsc::channel::<control::Request>(control::QUEUED);
        let path = control::runtime_path(std::env::var_os("RUNTIME_DIRECTORY").as_deref(), pid);
        let control = match control::listen(g.config.name(), pid, path) {
            Ok(l) => Some(tokio::spawn(control::serve(l, tx))),
            Err(e) => {
                tracing::warn!(event = "control_unavailable", error = %e,
                    "no control socket: the reload helper cannot reach this process; SIGUSR2 still works");
                None
            }
        };
        let server = Server::start(g.listeners, routes, g.info.counters.clone(), &config)
            .map_err(|e| ServeError::Sockets(e.to_string()))?;
        restore(&server, g.stored, &g.stored_names, &notifier, &g.info);
        if config.fd_store_while_idle > 0 {
            let room = crate::fdstore::room_while_idle(
                config.fd_store_while_idle,
                std::env::var("FDSTORE").ok().as_deref(),
            );
            server.keep_while_idle(crate::fdstore::WhileIdle::new(
                room,
                notifier.clone(),
                g.info.counters.clone(),
            ));
        }
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
            // A generation a reload started: that reload went well.
            notes: g.notes,
            last_reload: (g.number > 0).then(|| super::LastReload {
                at: std::time::SystemTime::now(),
                outcome: Ok(()),
            }),
        })
    }

    fn status(&self) -> String {
        self.hooks.status(&Status {
            sockets: self.sockets.clone(),
            generation: self.info.generation,
            in_flight: self.info.in_flight(),
            last_reload: self.last_reload.clone(),
        })
    }

    fn drain_status(&self) -> String {
        drain_status(&self.info)
    }

    /// Every socket is being accepted from: say so. A successor says it to
    /// the old process, takes the unit over on `commit`, then takes the
    /// connections the old process moves. `Err`: the handover was called
    /// off before we took over.
    pub(super) async fn join(&mut self) -> Result<(), String> {
        let Some(inherited) = self.inherited.take() else {
            // The first generation: nothing to inherit.
            self.info.state.deliver(None);
            self.notifier.ready(&self.status());
            return self.ready();
        };
        let mut successor =
            Successor::announce(inherited, self.config.move_connections, &self.notes)
                .await
                .map_err(|e| format!("cannot report ready: {e}"))?;
        // The old process's counters come now, its connections and the
        // app's state once we own the unit.
        match successor.connections() {
            Some(channel) => self
                .server
                .adopt(channel.receiving_state(self.info.state.clone())),
            // A protocol-1 parent: no state will come.
            None => self.info.state.deliver(None),
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
}

/// "2 sockets (systemd: http, admin)".
pub(super) fn describe(listeners: &[Listener]) -> String {
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
        "draining: {} in flight on {} connections ({} upgraded) · generation {}",
        info.in_flight(),
        info.connections(),
        info.upgraded(),
        info.generation
    )
}

/// Says what this start inherited and listens on, and what the operator
/// should hear about it.
fn log_start(g: &Generation, inherited: Option<&Inherited>) {
    if let Some(w) = &g.warning {
        tracing::warn!(event = "listen_fds_ignored", "{w}");
    }
    if let Some(w) = inherited.and_then(|i| i.ignored.as_ref()) {
        tracing::warn!(event = "handover_variables_ignored", "{w}");
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
    for n in &g.notes {
        tracing::warn!(event = "not_applied", note = %n, "{n}");
    }
}

/// The settings to serve with: the connection budget fitted to the
/// open-files limit.
fn fit_budget(g: &Generation) -> Config {
    let mut config = g.config.clone();
    if let Some(limit) = g.fd_limit {
        // The sockets with a budget of their own take theirs first.
        let own = config.own_budget_total(g.listeners.iter().map(|l| l.name.as_str()));
        let budget = limit
            .connection_budget(g.listeners.len())
            .saturating_sub(own)
            .max(1);
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
    config
}

/// Second descriptors of every socket, and what a next generation is
/// started with.
fn handover_plan(g: &Generation) -> Result<Plan, ServeError> {
    // Second descriptors of every socket, for the next generation.
    let handover: Vec<(OwnedFd, String)> = g
        .listeners
        .iter()
        .map(|l| l.try_clone_fd().map(|fd| (fd, l.name.clone())))
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Sockets(format!("cannot duplicate one: {e}")))?;
    let plan = Plan {
        origin: g
            .listeners
            .first()
            .map(|l| l.origin)
            .unwrap_or(Origin::Bound),
        exe: g.exe.clone(),
        args: g.args.clone(),
        generation: g.number + 1,
        sockets: handover,
    };
    Ok(plan)
}

/// Serves the connections systemd kept over a restart, and has systemd let
/// go of its copies: from here on this process owns them (a connection it
/// closes must close for the client too).
fn restore(
    server: &Server,
    stored: Vec<crate::listeners::Stored>,
    names: &[String],
    notifier: &Notifier,
    info: &Info,
) {
    if names.is_empty() {
        return;
    }
    let n = server.adopt_stored(stored);
    info.counters.totals.restored(n);
    let messages = if notifier.speaks() {
        crate::fdstore::remove(names).unwrap_or_else(|e| {
            tracing::warn!(event = "fd_store_remove_failed", error = %e,
                "cannot remove the connections from systemd's file descriptor store: {e}; \
                 closing one will not close it for its client until the next stop");
            0
        })
    } else {
        0
    };
    tracing::info!(
        event = "connections_restored",
        connections = n,
        notify_messages = messages,
        "took {n} idle connections from systemd's file descriptor store (kept over a restart)"
    );
}
