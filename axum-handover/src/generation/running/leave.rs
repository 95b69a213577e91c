//! Letting go: connections moved to the successor or drained, the helper
//! told, the last counters sent.

use std::time::Duration;

use super::super::{Ended, Leaving};
use super::{Leave, Reload, Running, drain_status};
use crate::control::{self, Answer, Report};
use crate::fdstore;
use crate::handover::channel::{Feature, PROTOCOL};
use crate::handover::spawn::Joined;
use crate::handover::state::{MAX_STATE, describe};
use crate::metrics::ReloadResult;
use crate::server::DrainReport;
use crate::signals::Stop;

/// How long the old process waits for the successor to take its app state
/// (it reads the channel all along: 1 MiB takes milliseconds).
const STATE_SEND_TIMEOUT: Duration = Duration::from_secs(5);

impl Running {
    /// Lets go of the connections, and of the unit: moved to the successor
    /// or drained.
    pub(in crate::generation) async fn leave(mut self, leave: Leave) -> Ended {
        if let Some(t) = self.control.take() {
            t.abort();
        }
        let (handover, reporter, store) = match leave {
            Leave::Stop(sig) => (None, None, self.begin_stop(sig)),
            Leave::HandedOver { reload, joined } => {
                let (new_pid, reporter) = self.begin_handed_over(reload, joined).await;
                (Some(new_pid), reporter, None)
            }
        };
        let extender = self.extend_drain();
        let report = self.finish(reporter).await;
        extender.abort();
        if let Some(store) = store {
            self.send_to_store(&store);
        }
        let Some(report) = report else {
            return Ended::Forced;
        };
        let totals = &self.info.counters.totals;
        totals.drained(report.elapsed.as_secs_f64(), report.moved, report.fell_back);
        if let Some(channel) = self.server.successor() {
            // The final totals, this drain included.
            let _ = channel.send_datagram(&totals.carried().encode()).await;
        }
        self.log_drained(&report, handover);
        if handover.is_some() {
            Ended::HandedOver
        } else {
            Ended::Stopped
        }
    }

    /// The handover was called off before this successor took over (the
    /// old process kept the unit, and is stopping us or gone): drain what
    /// we accepted, and tell systemd nothing.
    pub(in crate::generation) async fn abandon(mut self, why: &str) -> Ended {
        tracing::warn!(event = "handover_aborted", reason = %why, "handover aborted: {why}; draining");
        self.info.set_leaving(Leaving::Stopping);
        if let Some(t) = self.control.take() {
            t.abort();
        }
        let report = self.server.finish_drain().await;
        tracing::info!(
            event = "drained",
            drain_ms = report.elapsed.as_millis() as u64,
            "drained; exiting"
        );
        Ended::Aborted
    }

    /// A stop: the drain begins, or, when the unit keeps connections over a
    /// restart, the store (returned, to send once the requests in progress
    /// are done).
    fn begin_stop(&mut self, sig: Stop) -> Option<std::sync::Arc<fdstore::Store>> {
        tracing::info!(
            event = "drain",
            signal = %sig,
            in_flight = self.info.in_flight(),
            connections = self.info.connections(),
            "{sig}: draining {} in-flight requests",
            self.info.in_flight()
        );
        let store = self.fd_store();
        // The copies of the sockets kept for a next generation, which a stop
        // will not start, close first, so that each accept loop holds the
        // last descriptor of its socket: it takes what is queued, then
        // closes it (see `accept_loop`). With none left open here, a new
        // client is refused at once (or, under socket activation, waits in
        // systemd's socket for the next start) rather than queued where
        // nobody accepts, then reset at our exit. Closed after the loops
        // stop instead, a copy reset what was queued in between.
        self.plan.sockets.clear();
        match &store {
            Some(s) => self.server.begin_store(s.clone()),
            None => self.server.begin_drain(),
        }
        self.info.set_leaving(Leaving::Stopping);
        self.notifier.stopping(&self.drain_status());
        store
    }

    /// A handover: counted, the connections moving or draining, the app
    /// state sent, the helper answered. Returns the successor's PID and
    /// the helper's reporter (for the drain's figures).
    async fn begin_handed_over(
        &mut self,
        reload: Reload,
        joined: Joined,
    ) -> (u32, Option<control::Reporter>) {
        // The successor owns the unit's notifications from here.
        self.notifier.silence();
        let pid = self.info.pid;
        let (new_pid, new_gen) = (reload.pending.pid, reload.pending.generation);
        let took = reload.pending.started.elapsed();
        let millis = took.as_millis() as u64;
        let totals = &self.info.counters.totals;
        totals.reload(ReloadResult::Ok);
        totals.handover(took.as_secs_f64());
        let notes = joined.notes.clone();
        let takes_state = joined.ready.has(Feature::AppState);
        let moving = self.begin_letting_go(joined);
        // No longer accepting: the state is as late as it gets while this
        // process still decides anything.
        if takes_state {
            self.hand_over_state().await;
        }
        // The app's tasks first: the successor runs its own now.
        self.info.set_leaving(Leaving::HandedOver);
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
        let reporter = match reload.reply {
            Some(r) => {
                let answer = Answer::Ok {
                    old_pid: pid,
                    new_pid,
                    generation: new_gen,
                    millis,
                };
                Some(r.accept(answer).await.with_notes(notes))
            }
            None => None,
        };
        (new_pid, reporter)
    }

    /// After a handover: move the connections when the successor takes
    /// them, else drain. Says which.
    fn begin_letting_go(&mut self, joined: Joined) -> bool {
        let takes = joined.ready.has(Feature::MoveConnections);
        match joined.connections {
            Some(channel) if takes && self.config.move_connections => {
                self.server.begin_move(channel);
                return true;
            }
            // Still the way for the last counters, if it takes them.
            Some(channel) => self.server.keep_successor(channel),
            None => {}
        }
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

    /// Sends the app's state to the successor (see [`super::Hooks::save_state`]):
    /// one that is too large is not sent (the successor hears "none"), and a
    /// successor that does not read it within a bound is not waited for.
    async fn hand_over_state(&self) {
        let Some(channel) = self.server.successor() else {
            return;
        };
        let mut state = self.hooks.save_state();
        if let Some(s) = state.as_ref().filter(|s| s.len() > MAX_STATE) {
            tracing::error!(
                event = "app_state_too_large",
                bytes = s.len(),
                max = MAX_STATE,
                "the app state is {} bytes, more than the {MAX_STATE} handed over; the successor starts without it",
                s.len()
            );
            state = None;
        }
        let bytes = state.as_ref().map_or(0, Vec::len);
        match tokio::time::timeout(STATE_SEND_TIMEOUT, channel.send_state(state.as_deref())).await {
            Ok(Ok(())) => tracing::info!(
                event = "app_state_sent",
                bytes,
                "handed the app state to the successor ({})",
                describe(state.as_deref())
            ),
            Ok(Err(e)) => tracing::warn!(event = "app_state_not_sent", error = %e,
                "cannot hand the app state to the successor: {e}"),
            Err(_) => tracing::warn!(
                event = "app_state_not_sent",
                error = "timeout",
                "the successor did not take the app state within {}s",
                STATE_SEND_TIMEOUT.as_secs()
            ),
        }
    }

    /// The file descriptor store for a stop's idle connections, when the
    /// app asked for it and systemd can keep them.
    fn fd_store(&self) -> Option<std::sync::Arc<fdstore::Store>> {
        let want = self.config.fd_store_connections;
        if want == 0 || !self.notifier.speaks() {
            return None;
        }
        let room = fdstore::room(want, std::env::var("FDSTORE").ok().as_deref());
        (room > 0).then(|| std::sync::Arc::new(fdstore::Store::new(room)))
    }

    /// Hands the stored connections to systemd, says so, and counts them.
    fn send_to_store(&self, store: &fdstore::Store) {
        let sent = store.send(Duration::from_secs(5));
        if sent == fdstore::Sent::default() {
            // No idle connection: nothing to say.
            return;
        }
        tracing::info!(
            event = "connections_stored",
            connections_stored = sent.stored,
            connections_refused = sent.not_stored,
            connections_lost = sent.lost,
            notify_messages = sent.messages,
            "left {} idle connections in systemd's file descriptor store for the next start ({} messages); {} served to the end here{}",
            sent.stored,
            sent.messages,
            sent.not_stored,
            if sent.lost > 0 {
                format!(", {} closed (the store refused them)", sent.lost)
            } else {
                String::new()
            }
        );
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
    /// it ends or after two seconds, whichever is first (the helper, and
    /// `systemctl reload` behind it, should not wait for a long drain); a
    /// report at the bound says the old process is not done yet. `None`: a second
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
                        // Not done, whatever `busy` says: with no connection
                        // left, an older process still running holds this
                        // one (see `Server::adopt`).
                        let done = false;
                        r.report(Report { moved, fell_back, busy, millis, done }).await;
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
                done: true,
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
