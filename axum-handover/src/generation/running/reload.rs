//! Serving until a stop or a handover, and the reload under way.

use std::time::Duration;

use super::running::{Leave, Reload, Running};
use crate::Config;
use crate::control::{self, Answer};
use crate::handover::spawn::{self, Failure, Joined};
use crate::metrics::ReloadResult;
use crate::signals::{Event, Trigger};

impl Running {
    /// Serves until told to stop, or until a successor owns the unit.
    pub(super) async fn serve(&mut self) -> Leave {
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
        let tickets = self.info.counters.tickets.clone();
        match spawn::spawn(&self.plan, &self.config, environment, totals, tickets) {
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
        self.last_reload = Some(super::LastReload {
            at: std::time::SystemTime::now(),
            outcome: Err(why.clone()),
        });
        self.info.counters.totals.reload(ReloadResult::Failed);
        self.notifier.reclaim(&self.status());
        reply(reply_to, Answer::Failed(why)).await;
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
