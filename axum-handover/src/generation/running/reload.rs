//! Serving until a stop or a handover, and the reload under way.

use std::time::Duration;

use super::{Leave, Reload, Running};
use crate::Config;
use crate::control::{self, Answer};
use crate::handover::spawn::{self, Failure};
use crate::metrics::ReloadResult;
use crate::signals::{Event, Trigger};

impl Running {
    /// Serves until told to stop, or until a successor owns the unit. Two
    /// phases, one loop each: serving, and a reload under way (which owns
    /// its [`Reload`] until the outcome).
    pub(in crate::generation) async fn serve(&mut self) -> Leave {
        let mut status = Shown::default();
        loop {
            let reload = tokio::select! {
                ev = self.signals.next() => match ev {
                    Event::Stop(sig) => return Leave::Stop(sig),
                    Event::Reload(trigger) => self.begin_reload(trigger, None).await,
                },
                Some(req) = self.requests.recv() => {
                    self.begin_reload(Trigger::Request, Some(req)).await
                }
                _ = status.tick.tick() => {
                    status.show(self);
                    None
                }
            };
            if let Some(reload) = reload
                && let Some(leave) = self.reloading(reload, &mut status).await
            {
                return leave;
            }
        }
    }

    /// A reload under way, until its outcome: `Some` when this generation
    /// leaves (handed over, or stopped meanwhile), `None` when the reload
    /// failed and it serves on. Another reload is refused meanwhile.
    async fn reloading(&mut self, mut reload: Reload, status: &mut Shown) -> Option<Leave> {
        loop {
            tokio::select! {
                r = reload.pending.outcome() => {
                    return match r {
                        Ok(joined) => Some(Leave::HandedOver { reload, joined }),
                        Err(failure) => {
                            self.reload_failed(Some(reload.pending.pid), failure, reload.reply)
                                .await;
                            None
                        }
                    };
                }
                ev = self.signals.next() => match ev {
                    Event::Stop(sig) => {
                        reload.pending.cancel().await;
                        let why = Answer::Failed("the old process is stopping".into());
                        reply(reload.reply, why).await;
                        return Some(Leave::Stop(sig));
                    }
                    Event::Reload(trigger) => refuse(trigger, None).await,
                },
                Some(req) = self.requests.recv() => refuse(Trigger::Request, Some(req)).await,
                _ = status.tick.tick() => status.show(self),
            }
        }
    }

    /// Starts a reload: the reload now in progress, or `None` when the new
    /// process could not be started (answered and logged here).
    async fn begin_reload(
        &mut self,
        trigger: Trigger,
        reply_to: Option<control::Request>,
    ) -> Option<Reload> {
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
        self.last_reload = Some(super::super::LastReload {
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

/// The status line, sent to systemd when it changes (checked every second).
struct Shown {
    tick: tokio::time::Interval,
    last: String,
}

impl Default for Shown {
    fn default() -> Shown {
        Shown {
            tick: tokio::time::interval(Duration::from_secs(1)),
            last: String::new(),
        }
    }
}

impl Shown {
    fn show(&mut self, run: &Running) {
        let now = run.status();
        if now != self.last {
            run.notifier.status(&now);
            self.last = now;
        }
    }
}

/// A reload asked for while one is under way.
async fn refuse(trigger: Trigger, reply_to: Option<control::Request>) {
    tracing::warn!(event = "reload_refused", trigger = %trigger,
        "a reload is already under way; ignoring {trigger}");
    reply(
        reply_to,
        Answer::Refused("a reload is already under way".into()),
    )
    .await;
}

async fn reply(reply: Option<control::Request>, answer: Answer) {
    if let Some(r) = reply {
        r.answer(answer).await;
    }
}
