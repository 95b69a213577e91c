//! One run's records turned into counts by outcome, latency percentiles
//! (overall, around restarts, before them), per-restart facts and a
//! timeline.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::cli::Args;
use crate::load::{FailRec, Kind, LoadData, Mode};

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
