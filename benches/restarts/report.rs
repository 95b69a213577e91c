//! What the bench prints and writes: Markdown tables and a verdict on
//! stdout, `restarts.json`, `restarts.svg`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::capacity::CapacityResult;
use crate::cli::Args;
use crate::fdstore::FdStoreResults;
use crate::load::{KINDS, Kind, Mode};
use crate::procs::aborted;
use crate::results::{Bucket, Kept, RunResult};
use crate::servers::{PID_SERVER, go_version, nginx_version};
use crate::steady::SteadyResult;
use crate::strategies::Skips;

pub(crate) fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn hist_ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "–".into()
    } else if q >= 1.0 {
        ms(h.max())
    } else {
        ms(h.value_at_quantile(q))
    }
}

fn restart_table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| strategy | client | restarts ok | sent | failed | refused | reset | eof | timeout | non-200 | other \
         | p50 ms | p99 ms | max ms | p99 before | p50 ±1s | p99 ±1s | max ±1s \
         | restart → new PID, median ms | kept conns survived |\n",
    );
    s.push_str(
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in runs {
        let k = |kind: Kind| r.by_kind[kind.index()].to_string();
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.strategy,
            r.mode.name(),
            r.restarts_ok(),
            r.restarts.len(),
            r.sent,
            r.failed(),
            k(Kind::Refused),
            k(Kind::Reset),
            k(Kind::Eof),
            k(Kind::Timeout),
            k(Kind::Status),
            k(Kind::Other),
            hist_ms(&r.lat_all, 0.5),
            hist_ms(&r.lat_all, 0.99),
            hist_ms(&r.lat_all, 1.0),
            hist_ms(&r.lat_before, 0.99),
            hist_ms(&r.lat_win, 0.5),
            hist_ms(&r.lat_win, 0.99),
            hist_ms(&r.lat_win, 1.0),
            r.median_until_new()
                .map(|d| ms(d.as_micros() as u64))
                .unwrap_or_else(|| "–".into()),
            kept_cell(r.kept()),
        );
    }
    s
}

/// "37% (120/324)": survived / connections whose fate is known.
fn kept_cell(k: Option<Kept>) -> String {
    match k {
        None => "–".into(),
        Some(k) => match k.share() {
            Some(f) => format!("{:.0}% ({}/{})", f * 100.0, k.survived, k.determined()),
            None => "– (0/0)".into(),
        },
    }
}

fn steady_table(steady: &[SteadyResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| server | client | requests | req/s | vs pid-server | p50 ms | p99 ms | max ms | failed |\n",
    );
    s.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in steady {
        let base = steady
            .iter()
            .find(|b| b.mode == r.mode && b.server == "pid-server")
            .map(SteadyResult::rps)
            .unwrap_or(0.0);
        let ratio = if base > 0.0 {
            format!("{:.2}×", r.rps() / base)
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            r.server,
            r.mode.name(),
            r.requests,
            r.rps(),
            ratio,
            hist_ms(&r.lat, 0.5),
            hist_ms(&r.lat, 0.99),
            hist_ms(&r.lat, 1.0),
            r.failed
        );
    }
    s
}

/// The answers to "did the reload fail anything", "p99 around reloads vs
/// steady", "throughput vs Go". Returns the text and whether the reload
/// strategy failed no request in every checked client mode it ran (false if
/// it ran in none). The checked modes are keep-alive and one-shot; paused
/// clients are reported, not checked.
fn verdicts(args: &Args, runs: &[RunResult], steady: &[SteadyResult]) -> (String, bool) {
    let mut s = String::new();
    let reloads: Vec<&RunResult> = runs.iter().filter(|r| r.strategy == "reload").collect();
    let mut clean = reloads.iter().any(|r| r.mode != Mode::Paused);
    for r in &reloads {
        let ok = r.clean();
        let checked = r.mode != Mode::Paused;
        if checked {
            clean &= ok;
        }
        let _ = writeln!(
            s,
            "- `pid-server reload`, {}{}: {} of {} reloads done, {} requests, {} failed{} → {}",
            r.mode.name(),
            if checked {
                ""
            } else {
                " (not part of --check)"
            },
            r.restarts_ok(),
            r.restarts.len(),
            r.sent,
            r.failed(),
            if r.failed_on_reused > 0 {
                format!(" ({} on reused connections)", r.failed_on_reused)
            } else {
                String::new()
            },
            if ok { "zero failures" } else { "FAILURES" }
        );
        if r.mode == Mode::Paused {
            paused_verdict(&mut s, r, steady);
        }
        if r.lat_win.is_empty() {
            continue;
        }
        let win_p99 = r.lat_win.value_at_quantile(0.99);
        let mut against = Vec::new();
        if !r.lat_before.is_empty() {
            against.push((
                "the same run before its first reload",
                r.lat_before.value_at_quantile(0.99),
            ));
        }
        if let Some(b) = steady
            .iter()
            .find(|b| b.mode == r.mode && b.server == "pid-server")
            && !b.lat.is_empty()
        {
            against.push(("the steady-state run", b.lat.value_at_quantile(0.99)));
        }
        for (what, base) in against {
            let ratio = win_p99 as f64 / base.max(1) as f64;
            let _ = writeln!(
                s,
                "- p99 within ±{} ms of reloads, {}: {} ms vs {} ms in {what} → {:.2}× ({})",
                args.window.as_millis(),
                r.mode.name(),
                ms(win_p99),
                ms(base),
                ratio,
                if ratio <= 2.0 {
                    "within 2×"
                } else {
                    "NOT within 2×"
                }
            );
        }
    }
    if reloads.is_empty() {
        let _ = writeln!(s, "- `pid-server reload` did not run");
    } else if !reloads.iter().any(|r| r.mode != Mode::Paused) {
        let _ = writeln!(
            s,
            "- `pid-server reload` did not run with keep-alive or one-shot clients (what --check checks)"
        );
    }
    // Paused clients' throughput is set by their pauses: not compared.
    for &mode in args.modes.iter().filter(|m| **m != Mode::Paused) {
        let find = |name: &str| {
            steady
                .iter()
                .find(|r| r.mode == mode && r.server == name)
                .map(SteadyResult::rps)
        };
        if let (Some(p), Some(g)) = (find("pid-server"), find("go net/http"))
            && p > 0.0
        {
            let _ = writeln!(
                s,
                "- throughput, {}: pid-server {:.0} req/s, Go net/http {:.0} req/s: Go = {:.2}× pid-server, pid-server = {:.2}× Go",
                mode.name(),
                p,
                g,
                g / p,
                p / g.max(1e-9)
            );
        }
    }
    (s, clean)
}

/// Paused clients across reloads against the same clients without them,
/// and the kept connections' survival.
fn paused_verdict(s: &mut String, r: &RunResult, steady: &[SteadyResult]) {
    if let Some(b) = steady
        .iter()
        .find(|b| b.mode == Mode::Paused && b.server == "pid-server")
    {
        let _ = writeln!(
            s,
            "- paused clients without reloads (steady state, pid-server): {} failed of {}",
            b.failed,
            b.failed + b.requests
        );
    }
    if let Some(k) = r.kept() {
        let _ = writeln!(
            s,
            "- kept connections that survived a reload, paused: {} ({} open when a reload began, {} of them unseen afterwards)",
            kept_cell(Some(k)),
            k.open,
            k.undetermined
        );
    }
}

fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

fn kinds_json(k: &[u64; 7]) -> Value {
    let mut m = serde_json::Map::new();
    for kind in KINDS {
        m.insert(kind.name().into(), json!(k[kind.index()]));
    }
    Value::Object(m)
}

fn kept_json(k: Kept) -> Value {
    json!({
        "open_at_restart": k.open,
        "survived": k.survived,
        "undetermined": k.undetermined,
        "survived_share": k.share(),
    })
}

const MAX_FAILURES_IN_JSON: usize = 500;

fn run_json(r: &RunResult, args: &Args) -> Value {
    let ms_f = |d: Duration| d.as_secs_f64() * 1000.0;
    json!({
        "strategy": r.strategy,
        "client": r.mode.name(),
        "note": r.note,
        "concurrency": args.connections(r.mode),
        "duration_s": r.duration.as_secs_f64(),
        "sent": r.sent,
        "ok": r.by_kind[Kind::Ok.index()],
        "failed": r.failed(),
        "failed_on_reused_connections": r.failed_on_reused,
        "restarts_with_failures": r.restarts_with_failures(),
        "by_kind": kinds_json(&r.by_kind),
        "latency_ok": {
            "overall": hist_json(&r.lat_all),
            "around_restarts": hist_json(&r.lat_win),
            "before_restarts": hist_json(&r.lat_before),
        },
        "median_restart_until_new_pid_ms": r.median_until_new().map(ms_f),
        "kept_connections": r.kept().map(kept_json),
        "restarts": r.restarts.iter().map(|e| json!({
            "at_ms": ms_f(e.at),
            "command_ms": ms_f(e.took),
            "old_pid": e.old_pid,
            "new_pid": e.new_pid,
            "error": e.error,
            "until_new_pid_answered_ms": e.until_new.map(ms_f),
            "until_old_pid_last_answered_ms": e.last_old.map(ms_f),
            "failed_until_next_restart": e.failed_after,
            "kept_connections": e.kept.map(kept_json),
        })).collect::<Vec<_>>(),
        "answers_by_pid": r.pids.iter().map(|(p, n)| json!({"pid": p, "ok": n})).collect::<Vec<_>>(),
        "failures_total": r.failures.len(),
        "failures": r.failures.iter().take(MAX_FAILURES_IN_JSON).map(|f| json!({
            "at_ms": f.start_us as f64 / 1000.0,
            "latency_ms": f.lat_us as f64 / 1000.0,
            "kind": f.kind.name(),
            "reused_connection": f.reused,
            "error": f.error,
        })).collect::<Vec<_>>(),
        "timeline": {
            "bucket_ms": args.bucket.as_secs_f64() * 1000.0,
            "buckets": r.timeline.iter().map(|b| json!({
                "t_ms": ms_f(b.start),
                "ok_by_pid": b.answers.iter().map(|(p, n)| (p.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "failed": kinds_json(&b.failed),
                "p50_us": b.p50_us,
                "p99_us": b.p99_us,
                "max_us": b.max_us,
            })).collect::<Vec<_>>(),
        },
    })
}

fn steady_json(s: &[SteadyResult]) -> Value {
    Value::Array(
        s.iter()
            .map(|r| {
                let base = s
                    .iter()
                    .find(|b| b.mode == r.mode && b.server == "pid-server")
                    .map(SteadyResult::rps)
                    .unwrap_or(0.0);
                json!({
                    "server": r.server,
                    "client": r.mode.name(),
                    "requests_ok": r.requests,
                    "failed": r.failed,
                    "seconds": r.seconds,
                    "rps": r.rps(),
                    "ratio_to_pid_server": if base > 0.0 { Some(r.rps() / base) } else { None },
                    "latency_ok": hist_json(&r.lat),
                })
            })
            .collect(),
    )
}

mod svg {
    use super::*;
    use plotters::coord::Shift;
    use plotters::prelude::*;

    type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

    fn e<E: std::fmt::Debug>(err: E) -> String {
        format!("{err:?}")
    }

    const GREY: RGBColor = RGBColor(150, 150, 150);
    const ORANGE: RGBColor = RGBColor(230, 140, 0);

    pub fn draw(
        path: &Path,
        runs: &[RunResult],
        modes: &[Mode],
        bucket: Duration,
    ) -> Result<(), String> {
        let mut strategies: Vec<&str> = Vec::new();
        for r in runs {
            if !strategies.contains(&r.strategy.as_str()) {
                strategies.push(&r.strategy);
            }
        }
        let (cw, ch) = (820u32, 430u32);
        let cols = modes.len().max(1) as u32;
        let rows = strategies.len().max(1) as u32;
        let root = SVGBackend::new(path, (cw * cols, 50 + ch * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let (title, body) = root.split_vertically(50u32);
        title
            .draw_text(
                "pid-server restarts: answers per bucket coloured by answering PID (red × = failed \
                 requests, dashed = restart begins); latency of 200s below (p50 blue, p99 orange, max red)",
                &("sans-serif", 15).into_text_style(&title),
                (10, 18),
            )
            .map_err(e)?;
        let cells = body.split_evenly((rows as usize, cols as usize));
        for r in runs {
            let row = strategies
                .iter()
                .position(|s| *s == r.strategy)
                .unwrap_or(0);
            let col = modes.iter().position(|m| *m == r.mode).unwrap_or(0);
            let cell = &cells[row * cols as usize + col];
            draw_run(cell, r, bucket)?;
        }
        root.present().map_err(e)
    }

    fn draw_run(area: &Area<'_>, r: &RunResult, bucket: Duration) -> Result<(), String> {
        let (_, h) = area.dim_in_pixel();
        let (upper, lower) = area.split_vertically(h * 58 / 100);
        let secs = r.duration.as_secs_f64().max(0.1);
        let bw = bucket.as_secs_f64();
        let total = |b: &Bucket| b.answers.values().sum::<u64>();
        let ymax = r.timeline.iter().map(total).max().unwrap_or(1).max(1) as f64 * 1.2;
        let color_of: HashMap<u32, usize> = r
            .pids
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (*p, i))
            .collect();
        let caption = format!(
            "{} / {}: {} sent, {} failed, {} PIDs",
            r.strategy,
            r.mode.name(),
            r.sent,
            r.failed(),
            r.pids.len()
        );
        let mut chart = ChartBuilder::on(&upper)
            .caption(caption, ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(18)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..secs, 0f64..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(format!("200s / {} ms", bucket.as_millis()))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for ev in &r.restarts {
            let t = ev.at.as_secs_f64();
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(t, 0.0), (t, ymax)],
                    4,
                    3,
                    GREY.stroke_width(1),
                ))
                .map_err(e)?;
        }
        let mut rects = Vec::new();
        for b in &r.timeline {
            let x0 = b.start.as_secs_f64();
            let mut y = 0.0;
            for (pid, n) in &b.answers {
                let c = Palette99::pick(color_of.get(pid).copied().unwrap_or(0));
                let y1 = y + *n as f64;
                rects.push(Rectangle::new([(x0, y), (x0 + bw, y1)], c.filled()));
                y = y1;
            }
        }
        chart.draw_series(rects).map_err(e)?;
        chart
            .draw_series(
                r.timeline
                    .iter()
                    .filter(|b| b.failed.iter().sum::<u64>() > 0)
                    .map(|b| {
                        Cross::new(
                            (b.start.as_secs_f64() + bw / 2.0, ymax * 0.93),
                            5,
                            RED.stroke_width(2),
                        )
                    }),
            )
            .map_err(e)?;

        let lat_max = r
            .timeline
            .iter()
            .map(|b| b.max_us)
            .max()
            .unwrap_or(1000)
            .max(1000) as f64
            / 1000.0
            * 2.0;
        let mut lc = ChartBuilder::on(&lower)
            .margin(6)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..secs, (0.01f64..lat_max).log_scale())
            .map_err(e)?;
        lc.configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|v| format!("{v}"))
            .x_desc("seconds")
            .y_desc("latency ms")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for ev in &r.restarts {
            let t = ev.at.as_secs_f64();
            lc.draw_series(DashedLineSeries::new(
                vec![(t, 0.01), (t, lat_max)],
                4,
                3,
                GREY.stroke_width(1),
            ))
            .map_err(e)?;
        }
        // One line per stretch of buckets with answers: no line across a gap.
        let lines = |f: fn(&Bucket) -> u64| {
            let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for b in &r.timeline {
                if b.max_us == 0 {
                    if !out.last().is_some_and(Vec::is_empty) {
                        out.push(Vec::new());
                    }
                    continue;
                }
                let y = (f(b) as f64 / 1000.0).max(0.01);
                out.last_mut()
                    .expect("never empty")
                    .push((b.start.as_secs_f64() + bw / 2.0, y));
            }
            out
        };
        type Field = fn(&Bucket) -> u64;
        let series: [(Field, ShapeStyle); 3] = [
            (|b| b.max_us, RED.mix(0.5).stroke_width(1)),
            (|b| b.p99_us, ORANGE.stroke_width(1)),
            (|b| b.p50_us, BLUE.stroke_width(1)),
        ];
        for (f, style) in series {
            for line in lines(f) {
                if line.len() == 1 {
                    lc.draw_series(std::iter::once(Circle::new(line[0], 1, style)))
                        .map_err(e)?;
                } else if !line.is_empty() {
                    lc.draw_series(LineSeries::new(line, style)).map_err(e)?;
                }
            }
        }
        Ok(())
    }
}

fn capacity_table(c: &[CapacityResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| server | connections | opened | opening | open s | RSS before MB | RSS idle MB \
         | KB per idle conn (RSS) | KB per idle conn (PSS) | KB per never-used conn (RSS) \
         | RSS after close MB | second request ok |\n",
    );
    s.push_str("|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let mb = |kb: u64| format!("{:.1}", kb as f64 / 1024.0);
    for r in c {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {}/{} |",
            r.server,
            r.connections,
            r.opened,
            r.opening.name(),
            r.open_secs,
            mb(r.before.rss_kb),
            mb(r.idle.rss_kb),
            r.rss_per_conn(),
            r.pss_per_conn(),
            r.silent_rss_per_conn(),
            mb(r.after_close.rss_kb),
            r.second_ok,
            r.second_asked,
        );
    }
    for r in c.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(
            s,
            "\n- {} {} {}: {}",
            r.server,
            r.connections,
            r.opening.name(),
            r.error.as_deref().unwrap_or_default()
        );
    }
    s
}

fn capacity_json(c: &[CapacityResult]) -> Value {
    let mem = |m: crate::capacity::Mem| json!({"rss_kb": m.rss_kb, "pss_kb": m.pss_kb});
    c.iter()
        .map(|r| {
            json!({
                "server": r.server,
                "connections": r.connections,
                "opened": r.opened,
                "opening": r.opening.name(),
                "open_s": r.open_secs,
                "before": mem(r.before),
                "idle": mem(r.idle),
                "after_close": mem(r.after_close),
                "kb_per_idle_connection_rss": r.rss_per_conn(),
                "kb_per_idle_connection_pss": r.pss_per_conn(),
                "never_used": {
                    "opened": r.silent_opened,
                    "before": mem(r.silent_before),
                    "idle": mem(r.silent_idle),
                    "kb_per_connection_rss": r.silent_rss_per_conn(),
                },
                "second_request_ok": r.second_ok,
                "second_request_asked": r.second_asked,
                "error": r.error,
            })
        })
        .collect()
}

/// Prints the tables and the verdict (stdout), writes the JSON and the
/// picture; returns whether `pid-server reload` failed no request (false if
/// it did not run).
pub(crate) fn publish(
    args: &Args,
    runs: &[RunResult],
    steady: &[SteadyResult],
    capacity: &[CapacityResult],
    fd_cost: &FdStoreResults,
    skips: &Skips,
    wall: Duration,
) -> bool {
    let (verdict, reload_clean) = verdicts(args, runs, steady);
    let mut out = String::new();
    if !args.capacity_only && !args.fdstore_cost_only {
        let _ = writeln!(
            out,
            "\n## Restarts under load\n\n{} restarts per row, {} ms apart, after {} ms of load; \
             {} connections from {} client threads; latency of 200s; ±1s = requests started \
             within {} ms of a restart's start. Paused clients: {} connections, each idle {}–{} ms \
             after every answer. Kept conns survived: connections open when a restart began that \
             a process which came after it answered, of those whose fate was seen.\n",
            args.restarts,
            args.spacing.as_millis(),
            args.warmup.as_millis(),
            args.concurrency,
            args.client_threads,
            args.window.as_millis(),
            args.paused_clients,
            args.pause_min.as_millis(),
            args.pause_max.as_millis(),
        );
        out.push_str(&restart_table(runs));
    }
    if !steady.is_empty() {
        let _ = writeln!(
            out,
            "\n## Steady state, GET /\n\n{:.1} s per server and client mode ({} connections, {} client threads; \
             paused: {} connections, at least {:.1} s), same client for all.\n",
            args.steady.as_secs_f64(),
            args.concurrency,
            args.client_threads,
            args.paused_clients,
            2.0 * args.pause_max.as_secs_f64() + 1.0,
        );
        out.push_str(&steady_table(steady));
    }
    if !capacity.is_empty() {
        out.push_str(
            "\n## Memory per idle keep-alive connection\n\n\
             A fresh server each row; each connection sends one request, reads the answer and \
             stays open, idle. The server's memory (pid-server: the process; nginx: its one \
             worker) before and after, over the connections opened. Burst: 500 opening at once; \
             gradual: one after the other. Second request: every 50th connection asks again \
             after the measurement.\n\n",
        );
        out.push_str(&capacity_table(capacity));
    }
    if !fd_cost.restarts.is_empty() {
        out.push_str(&crate::fdstore::section(&fd_cost.restarts));
    }
    if !fd_cost.crash_safe.is_empty() {
        out.push_str(&crate::crashsafe::section(args, &fd_cost.crash_safe));
    }
    if !skips.0.is_empty() {
        out.push_str("\n## Skipped\n\n");
        for (what, why) in &skips.0 {
            let _ = writeln!(out, "- SKIPPED {what}: {why}");
        }
    }
    out.push_str("\n## Verdict\n\n");
    out.push_str(&verdict);
    if aborted() {
        out.push_str("\n**Interrupted**: the results above are partial.\n");
    }
    let _ = writeln!(out, "\nWall time: {:.1} s", wall.as_secs_f64());

    let json_path = args.out.join("restarts.json");
    let svg_path = args.out.join("restarts.svg");
    let doc = json!({
        "bench": "restarts",
        "command": std::env::args().collect::<Vec<_>>(),
        "pid_server_binary": PID_SERVER,
        "machine": {
            "cores": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_at_end": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "host_tcp_migrate_req": fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default().trim(),
            "go": go_version(),
            "nginx": nginx_version(),
        },
        "settings": {
            "restarts": args.restarts,
            "spacing_ms": args.spacing.as_millis() as u64,
            "warmup_ms": args.warmup.as_millis() as u64,
            "settle_ms": args.settle.as_millis() as u64,
            "concurrency": args.concurrency,
            "client_threads": args.client_threads,
            "timeout_ms": args.timeout.as_millis() as u64,
            "window_ms": args.window.as_millis() as u64,
            "steady_ms": args.steady.as_millis() as u64,
            "quick": args.quick,
            "paused_clients": args.paused_clients,
            "pause_min_ms": args.pause_min.as_millis() as u64,
            "pause_max_ms": args.pause_max.as_millis() as u64,
            "seed": args.seed,
            "modes": args.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "capacity": args.capacity,
            "fdstore_cost": args.fdstore_cost,
            "crash_safe_cost": args.crash_safe_cost,
            "crash_safe_window_ms": args.crash_safe_window.as_millis() as u64,
        },
        "wall_time_s": wall.as_secs_f64(),
        "runs": runs.iter().map(|r| run_json(r, args)).collect::<Vec<_>>(),
        "steady_state": steady_json(steady),
        "capacity": capacity_json(capacity),
        "fdstore_cost": crate::fdstore::json(&fd_cost.restarts),
        "crash_safe_cost": crate::crashsafe::json(&fd_cost.crash_safe),
        "skipped": skips.0.iter().map(|(w, y)| json!({"what": w, "why": y})).collect::<Vec<_>>(),
        "reload_zero_failures": reload_clean,
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match fs::write(&json_path, text) {
            Ok(()) => {
                let _ = writeln!(out, "Raw results: {}", json_path.display());
            }
            Err(e) => eprintln!("bench: write {}: {e}", json_path.display()),
        },
        Err(e) => eprintln!("bench: JSON: {e}"),
    }
    if !runs.is_empty() {
        match svg::draw(&svg_path, runs, &args.modes, args.bucket) {
            Ok(()) => {
                let _ = writeln!(out, "Picture: {}", svg_path.display());
            }
            Err(e) => eprintln!("bench: SVG: {e}"),
        }
    }
    let _ = writeln!(out, "Server logs: {}", args.out.join("logs").display());
    print!("{out}");
    reload_clean
}
