//! One run's records turned into counts by outcome, latency percentiles
//! (overall, around restarts, before them), per-restart facts and a
//! timeline.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::cli::Args;
use crate::load::{FailRec, Kind, LoadData, Mode, Rec};

/// The first requests of a run (connections opening, caches warming) are
/// not part of its "before restarts" baseline.
const BASELINE_SKIP: Duration = Duration::from_millis(250);

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

#[derive(Clone, Debug)]
pub(crate) struct RestartEvent {
    /// When the restart began, after the load's start.
    pub(crate) at: Duration,
    /// How long the restart's command took (for `reuseport-*` this
    /// includes waiting for the new PID's `/healthz`).
    pub(crate) took: Duration,
    pub(crate) old_pid: u32,
    pub(crate) new_pid: u32,
    pub(crate) error: Option<String>,
    /// From `at` until the load got a 200 from `new_pid`.
    pub(crate) until_new: Option<Duration>,
    /// From `at` until the last 200 from `old_pid`.
    pub(crate) last_old: Option<Duration>,
    /// Failed requests started from `at` until the next restart (or the
    /// end of the load).
    pub(crate) failed_after: u64,
    /// The client's kept connections across this restart (client modes
    /// that keep connections only).
    pub(crate) kept: Option<Kept>,
}

/// What became of the client's kept connections across one restart.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Kept {
    /// Connections open when the restart began: answered (200) before it,
    /// and not closed (`Connection: close`, or a failed request) by then.
    pub(crate) open: u64,
    /// Of those, the ones answered on the same client socket by a server
    /// process that had not answered anything before the restart began:
    /// the connection lived on into the new generation (or, behind a proxy,
    /// the proxy kept it while the server behind it was replaced).
    pub(crate) survived: u64,
    /// Of those, the ones neither survived nor seen closed by the end of
    /// the load (no request after the restart, or only answers from
    /// processes that were there before it): not counted in the share.
    pub(crate) undetermined: u64,
}

impl Kept {
    fn add(&mut self, o: Kept) {
        self.open += o.open;
        self.survived += o.survived;
        self.undetermined += o.undetermined;
    }

    /// The connections whose fate is known.
    pub(crate) fn determined(&self) -> u64 {
        self.open - self.undetermined
    }

    /// survived / determined.
    pub(crate) fn share(&self) -> Option<f64> {
        let d = self.determined();
        (d > 0).then(|| self.survived as f64 / d as f64)
    }
}

/// One client connection, as far as the survival share needs it.
#[derive(Default)]
struct ConnLife {
    /// End of its first 200, µs.
    first_ok_end: Option<u64>,
    /// End of the request that closed it, µs.
    closed_at: Option<u64>,
    /// The PIDs that answered on it (200s), each once.
    pids: Vec<u32>,
}

/// Per restart, the fate of the connections open when it began (see
/// [`Kept`]). `first_answer` is each PID's first 200's end in the whole
/// load, µs: a PID whose first answer came after a restart began is a
/// process that was not serving before it.
fn kept_connections(recs: &[Rec], first_answer: &HashMap<u32, u64>, restarts: &mut [RestartEvent]) {
    let mut conns: HashMap<u64, ConnLife> = HashMap::new();
    for r in recs {
        let c = conns.entry(r.conn).or_default();
        if r.kind == Kind::Ok {
            if c.first_ok_end.is_none() {
                c.first_ok_end = Some(r.end_us());
            }
            if r.pid != 0 && !c.pids.contains(&r.pid) {
                c.pids.push(r.pid);
            }
        }
        if r.closed {
            c.closed_at = Some(r.end_us());
        }
    }
    for ev in restarts {
        let at = ev.at.as_micros() as u64;
        let mut k = Kept::default();
        for c in conns.values() {
            let open =
                c.first_ok_end.is_some_and(|e| e < at) && c.closed_at.is_none_or(|e| e >= at);
            if !open {
                continue;
            }
            k.open += 1;
            if c.pids
                .iter()
                .any(|p| first_answer.get(p).is_some_and(|&f| f >= at))
            {
                k.survived += 1;
            } else if c.closed_at.is_none() {
                k.undetermined += 1;
            }
        }
        ev.kept = Some(k);
    }
}

pub(crate) struct Bucket {
    pub(crate) start: Duration,
    pub(crate) answers: BTreeMap<u32, u64>,
    pub(crate) failed: [u64; 7],
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

pub(crate) struct RunResult {
    pub(crate) strategy: String,
    pub(crate) mode: Mode,
    pub(crate) duration: Duration,
    pub(crate) sent: u64,
    pub(crate) by_kind: [u64; 7],
    pub(crate) failed_on_reused: u64,
    pub(crate) lat_all: Histogram<u64>,
    pub(crate) lat_win: Histogram<u64>,
    /// 200s started before the first restart's window (after the first
    /// 250 ms): the same process and connections, not yet restarted.
    pub(crate) lat_before: Histogram<u64>,
    pub(crate) restarts: Vec<RestartEvent>,
    pub(crate) timeline: Vec<Bucket>,
    pub(crate) failures: Vec<FailRec>,
    /// (pid, 200s), in order of the first answer.
    pub(crate) pids: Vec<(u32, u64)>,
    pub(crate) note: Option<String>,
}

impl RunResult {
    pub(crate) fn failed(&self) -> u64 {
        self.sent - self.by_kind[Kind::Ok.index()]
    }
    pub(crate) fn restarts_with_failures(&self) -> usize {
        self.restarts.iter().filter(|r| r.failed_after > 0).count()
    }
    pub(crate) fn restarts_ok(&self) -> usize {
        self.restarts.iter().filter(|r| r.error.is_none()).count()
    }
    /// No failed request, and every restart went through.
    pub(crate) fn clean(&self) -> bool {
        self.failed() == 0 && self.restarts_ok() == self.restarts.len()
    }
    /// The kept connections over every restart of the run.
    pub(crate) fn kept(&self) -> Option<Kept> {
        let mut total: Option<Kept> = None;
        for k in self.restarts.iter().filter_map(|r| r.kept) {
            total.get_or_insert_default().add(k);
        }
        total
    }
    pub(crate) fn median_until_new(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.restarts.iter().filter_map(|r| r.until_new).collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }
}

pub(crate) fn analyze(
    strategy: &str,
    mode: Mode,
    data: LoadData,
    mut restarts: Vec<RestartEvent>,
    args: &Args,
    note: Option<String>,
) -> RunResult {
    let window_us = args.window.as_micros() as u64;
    let starts: Vec<u64> = restarts.iter().map(|r| r.at.as_micros() as u64).collect();
    let near_restart = |t: u64| -> bool {
        let i = starts.partition_point(|&s| s < t);
        (i < starts.len() && starts[i] - t <= window_us)
            || (i > 0 && t - starts[i - 1] <= window_us)
    };
    let mut by_kind = [0u64; 7];
    let mut failed_on_reused = 0;
    let mut lat_all = new_hist();
    let mut lat_win = new_hist();
    let mut lat_before = new_hist();
    let before = (
        BASELINE_SKIP.as_micros() as u64,
        starts
            .first()
            .map(|&f| f.saturating_sub(window_us))
            .unwrap_or(u64::MAX),
    );
    let mut ends: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut pids: Vec<(u32, u64)> = Vec::new();
    let bucket_us = args.bucket.as_micros().max(1) as u64;
    let nb = (data.duration.as_micros() as u64 / bucket_us + 1) as usize;
    let mut bl: Vec<Vec<u32>> = vec![Vec::new(); nb];
    let mut timeline: Vec<Bucket> = (0..nb)
        .map(|i| Bucket {
            start: Duration::from_micros(i as u64 * bucket_us),
            answers: BTreeMap::new(),
            failed: [0; 7],
            p50_us: 0,
            p99_us: 0,
            max_us: 0,
        })
        .collect();
    for r in &data.recs {
        by_kind[r.kind.index()] += 1;
        if r.kind != Kind::Ok {
            let i = starts.partition_point(|&s| s <= r.start_us);
            if i > 0 {
                restarts[i - 1].failed_after += 1;
            }
        }
        let b = ((r.start_us / bucket_us) as usize).min(nb - 1);
        if r.kind == Kind::Ok {
            lat_all.saturating_record(r.lat_us.max(1) as u64);
            if near_restart(r.start_us) {
                lat_win.saturating_record(r.lat_us.max(1) as u64);
            }
            if r.start_us >= before.0 && r.start_us < before.1 {
                lat_before.saturating_record(r.lat_us.max(1) as u64);
            }
            ends.entry(r.pid).or_default().push(r.end_us());
            match pids.iter_mut().find(|(p, _)| *p == r.pid) {
                Some((_, n)) => *n += 1,
                None => pids.push((r.pid, 1)),
            }
            *timeline[b].answers.entry(r.pid).or_default() += 1;
            bl[b].push(r.lat_us);
        } else {
            timeline[b].failed[r.kind.index()] += 1;
            if r.reused {
                failed_on_reused += 1;
            }
        }
    }
    for (b, lats) in timeline.iter_mut().zip(bl.iter_mut()) {
        if lats.is_empty() {
            continue;
        }
        lats.sort_unstable();
        let q = |f: f64| lats[((lats.len() - 1) as f64 * f).round() as usize] as u64;
        b.p50_us = q(0.5);
        b.p99_us = q(0.99);
        b.max_us = *lats.last().unwrap() as u64;
    }
    for v in ends.values_mut() {
        v.sort_unstable();
    }
    for r in &mut restarts {
        let at = r.at.as_micros() as u64;
        if r.new_pid != 0
            && let Some(v) = ends.get(&r.new_pid)
        {
            let i = v.partition_point(|&e| e < at);
            r.until_new = v.get(i).map(|&e| Duration::from_micros(e - at));
        }
        if let Some(v) = ends.get(&r.old_pid) {
            r.last_old = v
                .last()
                .map(|&e| Duration::from_micros(e.saturating_sub(at)));
        }
    }
    if mode.keeps_connections() {
        let first_answer: HashMap<u32, u64> = ends.iter().map(|(p, v)| (*p, v[0])).collect();
        kept_connections(&data.recs, &first_answer, &mut restarts);
    }
    RunResult {
        strategy: strategy.to_string(),
        mode,
        duration: data.duration,
        sent: data.recs.len() as u64,
        by_kind,
        failed_on_reused,
        lat_all,
        lat_win,
        lat_before,
        restarts,
        timeline,
        failures: data.fails,
        pids,
        note,
    }
}
