//! One generation's life: start, serve, maybe hand over, drain, exit.
//!
//! ```text
//!  old (generation g)                          new (generation g+1)
//!  SIGUSR2 / SIGHUP / `reload` request
//!  spawn(exe, sockets at fd 3.., socketpair) ─▶ takes the sockets, accepts
//!  ◀──────────────────────────────────────────── "ready"
//!  probation: both serve; the new one must live
//!  "commit" ──────────────────────────────────▶ MAINPID=<new>, READY=1, BARRIER=1
//!  ◀──────────────────────────────────────────── "owner"
//!  silent to systemd; answers the helper;
//!  stops accepting, drains, exits 0             serves, pings the watchdog
//! ```
//! If the new process exits before it owns the unit, or is not ready
//! within the upgrade timeout, the old one stops it, keeps serving, and shows why in `STATUS=`.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::app::Shared;
use crate::control::{self, Answer};
use crate::listeners::{self, Listener, Origin};
use crate::notify::{self, Notifier};
use crate::server::{self, Server};
use crate::signals::{Event, Signals};
use crate::upgrade::{self, Pending, Plan};
use crate::{ExitCode, StartError};

/// Everything taken from the process's environment before the runtime
/// starts threads.
pub struct Startup {
    pub listeners: Vec<Listener>,
    /// Something about the inherited sockets worth a warning once logging
    /// is up.
    pub warning: Option<String>,
    pub generation: u32,
    /// Set when a previous generation started us: the handover channel.
    pub handover_fd: Option<OwnedFd>,
    pub exe: std::path::PathBuf,
    pub args: Vec<OsString>,
}

impl Startup {
    /// Takes the inherited fds and reads the environment. Call from `main`
    /// while the process still has one thread.
    pub fn take(listen: &[listeners::ListenAddr]) -> Result<Startup, StartError> {
        let generation = upgrade::generation_from_env().map_err(StartError::Usage)?;
        let (listeners, warning) = listeners::take_or_bind(listen)?;
        // After the sockets: the ready fd sits right above them.
        let handover_fd = upgrade::take_handover_fd().map_err(StartError::Usage)?;
        let exe = upgrade::resolve_exe()
            .map_err(|e| StartError::Other(format!("cannot tell which binary this is: {e}")))?;
        Ok(Startup {
            listeners,
            warning,
            generation,
            handover_fd,
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Options of a serving process.
#[derive(Debug, Clone)]
pub struct Options {
    pub server: server::Config,
    pub upgrade: upgrade::Timing,
}

/// How the serving phase ended.
enum End {
    Stop(&'static str),
    HandedOver {
        new_pid: u32,
        generation: u32,
        millis: u64,
        reply: Option<control::Request>,
    },
}

/// An upgrade under way, and who asked for it.
struct InProgress {
    pending: Pending,
    reply: Option<control::Request>,
}

/// Serves until stopped or handed over; returns the exit code.
pub async fn serve(startup: Startup, opts: Options) -> ExitCode {
    let pid = std::process::id();
    let generation = startup.generation;
    // A new generation speaks for the unit only once it has taken over.
    let notifier = Notifier::from_env(startup.handover_fd.is_none());
    let shared = Shared::new(pid, generation);
    if let Some(w) = &startup.warning {
        tracing::warn!(event = "listen_fds_ignored", "{w}");
    }

    let sockets = describe(&startup.listeners);
    for l in &startup.listeners {
        tracing::info!(event = "listening", socket = %l.name, address = %l.local_addr(),
            origin = %l.origin, "listening on {} ({}, {})", l.local_addr(), l.origin, l.name);
    }
    // Only the first generation binds; later ones share its very sockets
    // and need no migration.
    if generation == 0
        && startup
            .listeners
            .iter()
            .any(|l| l.origin == Origin::Bound && l.port().is_some())
        && listeners::tcp_migrate_req() == Some(false)
    {
        tracing::warn!(
            event = "tcp_migrate_req_off",
            "net.ipv4.tcp_migrate_req=0: if another process shares this port and this one stops, \
             connections still queued on its socket are reset; set it to 1 (Linux 5.14+), or \
             use `pid-server reload`, which hands over the very same socket"
        );
    }

    // Second descriptors of every socket, for the next generation.
    let handover: Vec<(OwnedFd, String)> = match startup
        .listeners
        .iter()
        .map(|l| l.try_clone_fd().map(|fd| (fd, l.name.clone())))
        .collect()
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "cannot duplicate a listening socket");
            return ExitCode::Failure;
        }
    };
    let origin = startup
        .listeners
        .first()
        .map(|l| l.origin)
        .unwrap_or(Origin::Bound);
    let plan = Some(Plan {
        origin,
        exe: startup.exe,
        args: startup.args,
        generation: generation + 1,
        sockets: handover,
    });

    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "cannot install signal handlers");
            return ExitCode::Failure;
        }
    };
    let (control_tx, mut control_rx) = mpsc::channel::<control::Request>(4);
    let control_path = control::runtime_path(std::env::var_os("RUNTIME_DIRECTORY").as_deref(), pid);
    let control_task = match control::listen(pid, control_path) {
        Ok(l) => Some(tokio::spawn(control::serve(l, control_tx))),
        Err(e) => {
            tracing::warn!(event = "control_unavailable", error = %e,
                "no control socket: `pid-server reload` cannot reach this process; SIGUSR2 still works");
            None
        }
    };

    let server = match Server::start(startup.listeners, shared.clone(), opts.server.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = "start_failed", error = %e, "cannot serve the sockets");
            return ExitCode::Failure;
        }
    };

    // Every socket is being accepted from: say so.
    let last_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let status = {
        let (shared, sockets, last_failure) =
            (shared.clone(), sockets.clone(), last_failure.clone());
        move || status_line(&shared, &sockets, last_failure.lock().unwrap().as_deref())
    };
    let mut aborted = None;
    match startup.handover_fd {
        Some(fd) => match upgrade::Successor::announce(fd).await {
            Ok(mut successor) => tokio::select! {
                r = successor.wait_commit() => match r {
                    Ok(()) => {
                        let (n, s) = (notifier.clone(), status());
                        // take_over blocks on the BARRIER=1 round trip.
                        let _ = tokio::task::spawn_blocking(move || n.take_over(&s)).await;
                        successor.confirm_owner().await;
                    }
                    Err(why) => aborted = Some(why),
                },
                sig = signals.next_terminate() => {
                    aborted = Some(format!("{sig} before the handover was committed"));
                }
            },
            Err(e) => aborted = Some(format!("cannot report ready: {e}")),
        },
        None => notifier.ready(&status()),
    }
    if let Some(why) = aborted {
        // The old process kept the unit (it is stopping us, or gone): drain
        // what we accepted, and tell systemd nothing.
        tracing::warn!(event = "handover_aborted", reason = %why, "handover aborted: {why}; draining");
        if let Some(t) = control_task {
            t.abort();
        }
        let report = server.drain().await;
        tracing::info!(
            event = "drained",
            drain_ms = report.elapsed.as_millis() as u64,
            "drained; exiting"
        );
        return ExitCode::Ok;
    }
    tracing::info!(event = "ready", sockets = %sockets, "serving {sockets} as generation {generation}");

    if let Some(interval) = notify::watchdog_interval() {
        tracing::info!(
            event = "watchdog",
            interval_ms = interval.as_millis() as u64,
            "pinging the systemd watchdog"
        );
        tokio::spawn(notify::watchdog_loop(notifier.clone(), interval));
    }
    let status_task = tokio::spawn({
        let (notifier, status) = (notifier.clone(), status.clone());
        async move {
            let mut last = String::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = status();
                if now != last {
                    notifier.status(&now);
                    last = now;
                }
            }
        }
    });

    // Serve until told to stop, or until a successor is ready.
    let mut upgrading: Option<InProgress> = None;
    let end = loop {
        enum Step {
            Signal(Event),
            Request(control::Request),
            Upgrade(Result<(), upgrade::Failure>),
        }
        let step = tokio::select! {
            ev = signals.next() => Step::Signal(ev),
            Some(req) = control_rx.recv() => Step::Request(req),
            r = async { upgrading.as_mut().unwrap().pending.outcome().await },
                if upgrading.is_some() => Step::Upgrade(r),
        };
        let (trigger, reply) = match step {
            Step::Signal(Event::Terminate(sig)) => {
                if let Some(up) = upgrading.take() {
                    up.pending.cancel().await;
                    reply_to(
                        up.reply,
                        Answer::Failed("the old process is stopping".into()),
                    )
                    .await;
                }
                break End::Stop(sig);
            }
            Step::Signal(Event::Upgrade(sig)) => (sig, None),
            Step::Request(req) => ("reload request", Some(req)),
            Step::Upgrade(Ok(())) => {
                let up = upgrading.take().unwrap();
                break End::HandedOver {
                    new_pid: up.pending.pid,
                    generation: up.pending.generation,
                    millis: up.pending.started.elapsed().as_millis() as u64,
                    reply: up.reply,
                };
            }
            Step::Upgrade(Err(failure)) => {
                let up = upgrading.take().unwrap();
                let why = failure.to_string();
                tracing::error!(event = "reload_failed", new_pid = up.pending.pid,
                    reason = %why, "reload failed, still serving: {why}");
                *last_failure.lock().unwrap() = Some(why.clone());
                notifier.reclaim(&status());
                reply_to(up.reply, Answer::Failed(why)).await;
                continue;
            }
        };
        // An upgrade was asked for.
        if upgrading.is_some() {
            tracing::warn!(
                event = "reload_refused",
                trigger,
                "a reload is already under way; ignoring {trigger}"
            );
            reply_to(
                reply,
                Answer::Refused("a reload is already under way".into()),
            )
            .await;
            continue;
        }
        let plan_ref = plan.as_ref().expect("plan is kept until the handover");
        if trigger == "SIGHUP" {
            // Type=notify-reload (systemd >= 253) waits for this, then for
            // READY=1 from the new main process.
            notifier.reloading(&format!(
                "reloading: starting generation {}",
                plan_ref.generation
            ));
        }
        match upgrade::spawn(plan_ref, opts.upgrade) {
            Ok(pending) => {
                tracing::info!(event = "reload_started", trigger, new_pid = pending.pid,
                    new_generation = pending.generation, exe = %plan_ref.exe.display(),
                    "reload ({trigger}): started {} as PID {}", plan_ref.exe.display(), pending.pid);
                upgrading = Some(InProgress { pending, reply });
            }
            Err(failure) => {
                let why = failure.to_string();
                tracing::error!(event = "reload_failed", reason = %why, "reload failed, still serving: {why}");
                *last_failure.lock().unwrap() = Some(why.clone());
                notifier.reclaim(&status());
                reply_to(reply, Answer::Failed(why)).await;
            }
        }
    };

    // Drain.
    if let Some(t) = control_task {
        t.abort();
    }
    status_task.abort();
    drop(plan); // closes our second descriptors of the sockets
    let mut server = server;
    match end {
        End::Stop(sig) => {
            tracing::info!(
                event = "drain",
                signal = sig,
                in_flight = shared.in_flight(),
                connections = shared.connections(),
                "{sig}: draining {} in-flight requests",
                shared.in_flight()
            );
            server.begin_drain();
            notifier.stopping(&drain_status(&shared));
        }
        End::HandedOver {
            new_pid,
            generation: new_gen,
            millis,
            reply,
        } => {
            // The successor owns the unit's notifications from here.
            notifier.silence();
            server.begin_drain();
            tracing::info!(
                event = "handover",
                old_pid = pid,
                new_pid,
                new_generation = new_gen,
                handover_ms = millis,
                in_flight = shared.in_flight(),
                "handed over to PID {new_pid} (generation {new_gen}) in {millis} ms; draining"
            );
            reply_to(
                reply,
                Answer::Ok {
                    old_pid: pid,
                    new_pid,
                    generation: new_gen,
                    millis,
                },
            )
            .await;
        }
    }

    let drain_timeout = opts.server.drain_timeout;
    let extender = tokio::spawn({
        let (notifier, shared) = (notifier.clone(), shared.clone());
        async move {
            // Keep systemd from killing a drain that runs long; a status line
            // that shows progress. Both no-ops once silenced.
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let left = drain_timeout.saturating_sub(started.elapsed());
                notifier.extend_timeout(left + Duration::from_secs(10));
                notifier.status(&drain_status(&shared));
            }
        }
    });
    let report = tokio::select! {
        r = server.finish_drain() => r,
        sig = signals.next_terminate() => {
            tracing::warn!(event = "forced_exit", signal = sig, in_flight = shared.in_flight(),
                "{sig} again: exiting now, cutting {} in-flight requests", shared.in_flight());
            return ExitCode::Forced;
        }
    };
    extender.abort();
    if report.timed_out() {
        tracing::warn!(
            event = "drain_timeout",
            cut_requests = report.cut_requests,
            cut_connections = report.cut_connections,
            drain_ms = report.elapsed.as_millis() as u64,
            "drain timeout ({}s): cut {} in-flight requests on {} connections",
            drain_timeout.as_secs(),
            report.cut_requests,
            report.cut_connections
        );
    } else {
        tracing::info!(
            event = "drained",
            drain_ms = report.elapsed.as_millis() as u64,
            "drained in {} ms; exiting",
            report.elapsed.as_millis()
        );
    }
    ExitCode::Ok
}

async fn reply_to(reply: Option<control::Request>, answer: Answer) {
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

fn status_line(shared: &Shared, sockets: &str, last_failure: Option<&str>) -> String {
    let mut s = format!(
        "serving {sockets} · generation {} · {} in flight",
        shared.generation,
        shared.in_flight()
    );
    if let Some(f) = last_failure {
        s.push_str(" · last reload failed: ");
        s.push_str(f);
    }
    s
}

fn drain_status(shared: &Shared) -> String {
    format!(
        "draining: {} in flight on {} connections · generation {}",
        shared.in_flight(),
        shared.connections(),
        shared.generation
    )
}
