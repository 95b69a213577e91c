//! The protocol rows (issue #15): HTTP/2 and TLS across reloads of
//! pid-server, and their steady state beside nginx (`h2load.rs`).
//!
//! Across reloads, per protocol asked for (`--protocols`):
//!
//! - `h2c`: HTTP/2 with prior knowledge on the plain socket,
//!   `--h2-connections` × `--h2-streams` concurrent streams;
//! - `tls-h1`: HTTP/1.1 over TLS (ALPN `http/1.1`), keep-alive and one-shot
//!   clients (those of `--modes`), `--concurrency` connections;
//! - `tls-h2`: HTTP/2 over TLS (ALPN `h2`), connections × streams as h2c;
//! - `h1`: plain HTTP/1.1 has its rows in the restart table (`reload`);
//!   here it is only a steady-state row, h2load's reference.
//!
//! Each row is one pid-server, `pid-server reload --pid <current>`
//! `--restarts` times, `--spacing-ms` apart, under load; with TLS the
//! certificate files are renewed (a new key and leaf, same CA) before every
//! reload, so each generation reads new ones, as after `certbot renew`.
//! Every stream and request is counted as the HTTP/1.1 clients count them
//! (`h2.rs` says what a failed stream is); nothing is retried.

use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde_json::{Value, json};

use crate::cli::Args;
use crate::h2::{GOAWAY_CUT, H2Slot};
use crate::h2load::{self, SteadyRow};
use crate::load::{self, FailRec, H1Plan, KINDS, Kind, LoadData, Mode, Rec};
use crate::nspawn;
use crate::procs::{Procs, aborted, run_cmd, sleep_until};
use crate::report::ms;
use crate::results::{RestartEvent, RunResult, analyze};
use crate::servers::{PID_SERVER, pid_server_cmd, wait_for_pid};
use crate::strategies::{Skips, log_path, parse_reloaded};
use crate::tls::{self, Certs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    H1,
    H2c,
    TlsH1,
    TlsH2,
}

pub(crate) const PROTOCOLS: [Proto; 4] = [Proto::H1, Proto::H2c, Proto::TlsH1, Proto::TlsH2];

impl Proto {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2c => "h2c",
            Proto::TlsH1 => "tls-h1",
            Proto::TlsH2 => "tls-h2",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<Proto> {
        PROTOCOLS.into_iter().find(|p| p.name() == s)
    }
    pub(crate) fn tls(self) -> bool {
        matches!(self, Proto::TlsH1 | Proto::TlsH2)
    }
    pub(crate) fn h2(self) -> bool {
        matches!(self, Proto::H2c | Proto::TlsH2)
    }
}

/// One row across reloads: a protocol and, for HTTP/1.1 over TLS, a client
/// mode.
#[derive(Clone, Copy)]
struct Row {
    proto: Proto,
    /// KeepAlive or OneShot for tls-h1; KeepAlive (kept connections) for
    /// the HTTP/2 rows.
    mode: Mode,
}

impl Row {
    fn client(&self, args: &Args) -> String {
        if self.proto.h2() {
            format!("{}×{} streams", args.h2_connections, args.h2_streams)
        } else {
            format!("{} {}", args.connections(self.mode), self.mode.name())
        }
    }
    fn label(&self) -> String {
        if self.proto.h2() {
            format!("reload-{}", self.proto.name())
        } else {
            format!("reload-{}-{}", self.proto.name(), self.mode.name())
        }
    }
}

/// A row across reloads, and what it was run with.
pub(crate) struct ProtoRun {
    proto: Proto,
    client: String,
    run: RunResult,
    /// Connections the client opened (replacements included).
    connections: usize,
    /// Certificates issued during the row (renewals before reloads).
    certs_issued: u64,
}

/// What the protocol part of the bench ran.
#[derive(Default)]
pub(crate) struct Results {
    runs: Vec<ProtoRun>,
    /// Rows asked for that could not run (they fail `--check`).
    not_run: Vec<String>,
    steady: Vec<SteadyRow>,
    steady_note: String,
}

/// Whether the pid-server under test has `--tls-cert` (issue #15's TLS).
fn pid_server_has_tls() -> bool {
    run_cmd(PID_SERVER, &["serve", "--help"], Duration::from_secs(10))
        .map(|h| h.contains("--tls-cert"))
        .unwrap_or(false)
}

/// A pid-server on `port`, with the certificate files if `certs`.
pub(crate) fn server_cmd(port: u16, certs: Option<&Certs>) -> Command {
    let mut cmd = pid_server_cmd(port);
    if let Some(c) = certs {
        cmd.arg("--tls-cert")
            .arg(&c.cert)
            .arg("--tls-key")
            .arg(&c.key);
    }
    cmd
}

/// Polls `/healthz` (over TLS if `tls`) until it reports `pid`.
fn wait_pid(
    port: u16,
    pid: u32,
    tls: Option<&Arc<ClientConfig>>,
    t: Duration,
) -> Result<Duration, String> {
    match tls {
        Some(cfg) => tls::wait_for_pid(port, pid, cfg, t),
        None => wait_for_pid(port, pid, t),
    }
}

/// The client's tasks on a runtime of `--client-threads` threads; every
/// task returns its records.
struct ProtoLoad {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Rec>, Vec<FailRec>)>>,
    t0: Instant,
}

impl ProtoLoad {
    fn start<F, Fut>(threads: usize, n: usize, make: F) -> Result<ProtoLoad, String>
    where
        F: Fn(u64, Instant, Arc<AtomicBool>) -> Fut,
        Fut: Future<Output = (Vec<Rec>, Vec<FailRec>)> + Send + 'static,
    {
        let rt = crate::load::client_runtime(threads)?;
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let tasks = (0..n)
            .map(|i| rt.spawn(make(i as u64, t0, stop.clone())))
            .collect();
        Ok(ProtoLoad {
            rt,
            stop,
            tasks,
            t0,
        })
    }

    fn finish(self) -> LoadData {
        self.stop.store(true, Ordering::SeqCst);
        let duration = self.t0.elapsed();
        let tasks = self.tasks;
        let outs = self.rt.block_on(async move {
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await.unwrap_or_default());
            }
            v
        });
        self.rt.shutdown_timeout(Duration::from_secs(1));
        let (mut recs, mut fails) = (Vec::new(), Vec::new());
        for (r, f) in outs {
            recs.extend(r);
            fails.extend(f);
        }
        recs.sort_by_key(|r| r.start_us);
        fails.sort_by_key(|f| f.start_us);
        LoadData {
            recs,
            fails,
            duration,
        }
    }
}

/// The client of a row, on `port`.
fn start_load(
    args: &Args,
    row: Row,
    port: u16,
    certs: Option<&Certs>,
    planned: Duration,
) -> Result<ProtoLoad, String> {
    let deadline = Instant::now() + planned * 3 + Duration::from_secs(120);
    let max_requests = 50_000_000 / args.concurrency.max(1) as u64;
    let threads = args.client_threads;
    let timeout = args.timeout;
    match row.proto {
        Proto::H2c | Proto::TlsH2 => {
            let tls = certs.map(|c| c.client(&[b"h2"]));
            let streams = args.h2_streams;
            ProtoLoad::start(threads, args.h2_connections, move |i, t0, stop| {
                H2Slot {
                    port,
                    tls: tls.clone(),
                    streams,
                    timeout,
                    deadline,
                    max_requests,
                }
                .run(i, t0, stop)
            })
        }
        Proto::TlsH1 => {
            let cfg = certs
                .ok_or("tls-h1 without certificates")?
                .client(&[b"http/1.1"]);
            let one_shot = row.mode == Mode::OneShot;
            let pause =
                (row.mode == Mode::Paused).then_some((args.pause_min, args.pause_max, args.seed));
            ProtoLoad::start(threads, args.connections(row.mode), move |i, t0, stop| {
                let cfg = cfg.clone();
                let plan = H1Plan {
                    one_shot,
                    pause,
                    timeout,
                    deadline,
                    max_requests,
                };
                async move {
                    let req = load::request("localhost", one_shot);
                    plan.run(&req, || tls::connect(port, &cfg), i, t0, &stop)
                        .await
                }
            })
        }
        Proto::H1 => Err("plain HTTP/1.1 is the restart table's `reload` rows".into()),
    }
}

/// One row: a pid-server, load on, N reloads (certificates renewed before
/// each with TLS), load off.
fn run_row(args: &Args, row: Row, certs: Option<&mut Certs>) -> Result<ProtoRun, String> {
    let label = row.label();
    let port = nspawn::free_port();
    let mut procs = Procs::new(&log_path(args, &label))?;
    let issued_before = certs.as_ref().map(|c| c.issued).unwrap_or(0);
    let probe = certs.as_ref().map(|c| c.client(&[b"http/1.1"]));
    let mut pid = procs.spawn(server_cmd(port, certs.as_deref()), "pid-server")?;
    wait_pid(port, pid, probe.as_ref(), Duration::from_secs(10))?;
    // Paused clients: after the last reload at least their longest pause,
    // so that every connection open then sends once more.
    let settle = match row.mode {
        Mode::Paused => args.settle.max(args.pause_max + Duration::from_millis(250)),
        _ => args.settle,
    };
    let planned = args.warmup + args.spacing * args.protocol_reloads as u32 + settle;
    eprintln!(
        "bench: protocols, {} / {}: {} reloads, about {:.1} s",
        row.proto.name(),
        row.client(args),
        args.protocol_reloads,
        planned.as_secs_f64()
    );
    let load = start_load(args, row, port, certs.as_deref(), planned)?;
    let mut certs = certs;
    let mut events = Vec::new();
    for i in 0..args.protocol_reloads {
        sleep_until(load.t0 + args.warmup + args.spacing * i as u32);
        if aborted() {
            break;
        }
        let old = pid;
        let at = load.t0.elapsed();
        let started = Instant::now();
        let r = (|| {
            if let Some(c) = certs.as_deref_mut() {
                c.renew();
            }
            let out = run_cmd(
                PID_SERVER,
                &["reload", "--pid", &old.to_string(), "--timeout", "30"],
                Duration::from_secs(40),
            )?;
            let (o, new) = parse_reloaded(&out)
                .ok_or_else(|| format!("unexpected output of pid-server reload: {out:?}"))?;
            if o != old {
                return Err(format!("reload answered for {o}, asked {old}"));
            }
            Ok(new)
        })();
        let took = started.elapsed();
        let (new_pid, error) = match r {
            Ok(new) => match wait_pid(port, new, probe.as_ref(), Duration::from_secs(20)) {
                Ok(_) => (new, None),
                Err(e) => (new, Some(e)),
            },
            Err(e) => (0, Some(e)),
        };
        if let Some(e) = &error {
            eprintln!(
                "bench: protocols, {} reload {}: {e}",
                row.proto.name(),
                i + 1
            );
        }
        if new_pid != 0 {
            pid = new_pid;
        }
        events.push(RestartEvent {
            at,
            took,
            old_pid: old,
            new_pid,
            error,
            until_new: None,
            last_old: None,
            failed_after: 0,
            kept: None,
        });
        procs.reap();
    }
    sleep_until(Instant::now() + settle);
    let data = load.finish();
    procs.reap();
    let connections = {
        let mut c: Vec<u64> = data.recs.iter().map(|r| r.conn).collect();
        c.sort_unstable();
        c.dedup();
        c.len()
    };
    let note = format!(
        "pid-server on 127.0.0.1:{port}{}",
        if row.proto.tls() {
            " with --tls-cert/--tls-key, renewed before every reload"
        } else {
            ""
        }
    );
    let run = analyze(
        &format!("reload {}", row.proto.name()),
        row.mode,
        data,
        events,
        args,
        Some(note),
    );
    eprintln!(
        "bench: protocols, {} / {}: {} requests, {} failed",
        row.proto.name(),
        row.client(args),
        run.sent,
        run.failed()
    );
    Ok(ProtoRun {
        proto: row.proto,
        client: row.client(args),
        run,
        connections,
        certs_issued: certs.map(|c| c.issued).unwrap_or(0) - issued_before,
    })
}

/// The rows across reloads, then the steady state beside nginx.
pub(crate) fn run(args: &Args, skips: &mut Skips) -> Results {
    let mut res = Results::default();
    if args.protocols.is_empty() {
        return res;
    }
    let mut rows = Vec::new();
    for &p in &args.protocols {
        match p {
            Proto::H1 => {}
            Proto::H2c | Proto::TlsH2 => rows.push(Row {
                proto: p,
                mode: Mode::KeepAlive,
            }),
            Proto::TlsH1 => {
                for &mode in &args.protocol_modes {
                    rows.push(Row { proto: p, mode });
                }
            }
        }
    }
    let has_tls = pid_server_has_tls();
    let mut certs = match Certs::new() {
        Ok(c) => Some(c),
        Err(e) => {
            skips.add("protocols, TLS", format!("no certificates: {e}"));
            None
        }
    };
    for row in rows {
        if aborted() {
            break;
        }
        let what = format!("protocols, {} / {}", row.proto.name(), row.client(args));
        if row.proto.tls() && !has_tls {
            skips.add(
                &what,
                "the pid-server under test has no --tls-cert (built without #15's TLS support)",
            );
            res.not_run.push(what);
            continue;
        }
        let c = if row.proto.tls() {
            match certs.as_mut() {
                Some(c) => Some(c),
                None => {
                    res.not_run.push(what);
                    continue;
                }
            }
        } else {
            None
        };
        match run_row(args, row, c) {
            Ok(r) => res.runs.push(r),
            Err(e) => {
                skips.add(&what, e);
                res.not_run.push(what);
            }
        }
    }
    if args.compare && !aborted() {
        let (steady, note) = h2load::run(args, certs.as_ref(), has_tls, skips);
        res.steady = steady;
        res.steady_note = note;
    }
    res
}

/// Failed streams that a graceful GOAWAY cut (above its last stream id:
/// not processed by the server).
fn goaway_cut(r: &RunResult) -> u64 {
    r.failures
        .iter()
        .filter(|f| f.error.starts_with(GOAWAY_CUT))
        .count() as u64
}

fn pids_cell(r: &RunResult) -> String {
    let generations = r.restarts_ok() + 1;
    let answered: Vec<u32> = r.pids.iter().map(|(p, _)| *p).filter(|p| *p != 0).collect();
    match (answered.first(), answered.last()) {
        (Some(f), Some(l)) if answered.len() > 1 => {
            format!("{} of {generations} ({f} … {l})", answered.len())
        }
        (Some(f), _) => format!("1 of {generations} ({f})"),
        _ => format!("0 of {generations}"),
    }
}

fn hist(h: &hdrhistogram::Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "–".into()
    } else if q >= 1.0 {
        ms(h.max())
    } else {
        ms(h.value_at_quantile(q))
    }
}

/// The Markdown section, and whether every row asked for ran with zero
/// failures (what `--check` checks).
pub(crate) fn section(args: &Args, res: &Results) -> (String, bool) {
    let mut s = String::new();
    if args.protocols.is_empty() {
        return (s, true);
    }
    let _ = writeln!(
        s,
        "\n## Protocols across reloads (HTTP/2, TLS)\n\n\
         `pid-server reload` {} times, {} ms apart, after {} ms of load; with TLS the \
         certificate files are renewed before every reload. HTTP/2: {} connections × {} \
         concurrent streams (a GOAWAY'd connection is replaced for new streams; a stream \
         refused, reset or cut is a failure); TLS HTTP/1.1: {} connections (paused: {}, \
         each idle {}–{} ms after every answer). Nothing is \
         retried. \"Cut by GOAWAY\": failed streams above a graceful GOAWAY's last stream \
         id, which the server did not process (RFC 9113 6.8 lets a client retry those; \
         counted here, part of reset). PIDs answered: processes that answered a 200, of \
         the generations started.\n",
        args.protocol_reloads,
        args.spacing.as_millis(),
        args.warmup.as_millis(),
        args.h2_connections,
        args.h2_streams,
        args.concurrency,
        args.paused_clients,
        args.pause_min.as_millis(),
        args.pause_max.as_millis(),
    );
    s.push_str(
        "| protocol | client | reloads ok | sent | failed | refused | reset | eof | timeout | non-200 | other \
         | of them cut by GOAWAY | p50 ms | p99 ms | max ms | p99 ±1s | connections | PIDs answered |\n",
    );
    s.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    let mut clean = res.not_run.is_empty() && !res.runs.is_empty();
    for p in &res.runs {
        let r = &p.run;
        let k = |kind: Kind| r.by_kind[kind.index()].to_string();
        clean &= r.clean();
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.proto.name(),
            p.client,
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
            goaway_cut(r),
            hist(&r.lat_all, 0.5),
            hist(&r.lat_all, 0.99),
            hist(&r.lat_all, 1.0),
            hist(&r.lat_win, 0.99),
            p.connections,
            pids_cell(r),
        );
    }
    for what in &res.not_run {
        let _ = writeln!(s, "| SKIPPED: {what} | | | | | | | | | | | | | | | | | |");
    }
    if !res.steady.is_empty() {
        s.push_str(&h2load::table(args, &res.steady, &res.steady_note));
    }
    s.push_str("\n### Verdict, protocols\n\n");
    for p in &res.runs {
        let r = &p.run;
        let first_fail = r
            .failures
            .first()
            .map(|f| format!("; first: {}", f.error))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "- {} / {}: {} of {} reloads done, {} requests, {} failed{}{} → {}",
            p.proto.name(),
            p.client,
            r.restarts_ok(),
            r.restarts.len(),
            r.sent,
            r.failed(),
            if r.failed_on_reused > 0 {
                format!(" ({} on reused connections)", r.failed_on_reused)
            } else {
                String::new()
            },
            first_fail,
            if r.clean() {
                "zero failures"
            } else {
                "FAILURES"
            }
        );
    }
    for what in &res.not_run {
        let _ = writeln!(s, "- {what}: did not run → FAILS --check");
    }
    for line in h2load::ratios(&res.steady) {
        let _ = writeln!(s, "- {line}");
    }
    (s, clean)
}

/// `protocols.json` beside `restarts.json`.
pub(crate) fn write_json(
    args: &Args,
    res: &Results,
    clean: bool,
    out: &Path,
) -> Result<(), String> {
    let kinds = |k: &[u64; 7]| {
        let mut m = serde_json::Map::new();
        for kind in KINDS {
            m.insert(kind.name().into(), json!(k[kind.index()]));
        }
        Value::Object(m)
    };
    let doc = json!({
        "bench": "restarts, protocol rows",
        "settings": {
            "protocols": args.protocols.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "reloads": args.protocol_reloads,
            "spacing_ms": args.spacing.as_millis() as u64,
            "h2_connections": args.h2_connections,
            "h2_streams": args.h2_streams,
            "concurrency": args.concurrency,
        },
        "across_reloads": res.runs.iter().map(|p| {
            let r = &p.run;
            json!({
                "protocol": p.proto.name(),
                "client": p.client,
                "note": r.note,
                "reloads": r.restarts.len(),
                "reloads_ok": r.restarts_ok(),
                "certificates_issued": p.certs_issued,
                "sent": r.sent,
                "failed": r.failed(),
                "failed_on_reused_connections": r.failed_on_reused,
                "failed_cut_by_goaway": goaway_cut(r),
                "by_kind": kinds(&r.by_kind),
                "connections": p.connections,
                "answers_by_pid": r.pids.iter().map(|(pid, n)| json!({"pid": pid, "ok": n})).collect::<Vec<_>>(),
                "p50_us": (!r.lat_all.is_empty()).then(|| r.lat_all.value_at_quantile(0.5)),
                "p99_us": (!r.lat_all.is_empty()).then(|| r.lat_all.value_at_quantile(0.99)),
                "max_us": (!r.lat_all.is_empty()).then(|| r.lat_all.max()),
                "reloads_detail": r.restarts.iter().map(|e| json!({
                    "at_ms": e.at.as_secs_f64() * 1000.0,
                    "command_ms": e.took.as_secs_f64() * 1000.0,
                    "old_pid": e.old_pid,
                    "new_pid": e.new_pid,
                    "error": e.error,
                    "failed_until_next": e.failed_after,
                })).collect::<Vec<_>>(),
                "failures": r.failures.iter().take(200).map(|f| json!({
                    "at_ms": f.start_us as f64 / 1000.0,
                    "kind": f.kind.name(),
                    "reused_connection": f.reused,
                    "error": f.error,
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "not_run": res.not_run,
        "steady_state_h2load": h2load::json(&res.steady),
        "steady_state_note": res.steady_note,
        "zero_failures": clean,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    fs::write(out, text).map_err(|e| format!("write {}: {e}", out.display()))
}

/// Prints the section (after the rest of the tables) and writes
/// `protocols.json`; returns whether every protocol row ran with zero
/// failures.
pub(crate) fn publish(args: &Args, res: &Results) -> bool {
    if args.protocols.is_empty() {
        return true;
    }
    let (mut text, clean) = section(args, res);
    let path = args.out.join("protocols.json");
    match write_json(args, res, clean, &path) {
        Ok(()) => {
            let _ = writeln!(text, "\nRaw results (protocols): {}", path.display());
        }
        Err(e) => eprintln!("bench: {e}"),
    }
    print!("{text}");
    clean
}
