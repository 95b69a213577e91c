//! `--endurance`: what many reloads and many connections leave behind.
//! Not a timed test: it prints what it saw, and `--check` fails it on a
//! failed request.
//!
//! 1. Reloads: `--endurance-reloads` (1 000) `pid-server reload`s in a row
//!    under load (keep-alive, one-shot and paused clients), with a census
//!    every 100: the serving process's open descriptors (`/proc/PID/fd`)
//!    and RSS, the pid-server processes alive, and the zombies (state `Z`)
//!    that are children of the serving process or of the bench. A leak of
//!    a descriptor or of memory per reload, or an unreaped generation,
//!    shows as a column that grows.
//! 2. Held connections: `--endurance-connections` (10 000) connections
//!    opened to one server, a tenth busy (a request every 50–500 ms), the
//!    rest mostly idle (one every 2–10 s), held across 20 reloads; then one
//!    last request on every connection. Every request must be answered on
//!    the connection it was sent on: a failure, a close by the server, a
//!    reconnect all count. The bench raises its own `RLIMIT_NOFILE` to the
//!    hard limit (the server raises its own).
//!
//! Everything goes to 127.0.0.1 and is bounded in count and time.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cli::Args;
use crate::load::{self, Kind, Load, Mode, load_cfg};
use crate::nspawn;
use crate::procs::{Procs, aborted, run_cmd};
use crate::servers::{PID_SERVER, pid_server_cmd, wait_for_pid};
use crate::strategies::{log_path, parse_reloaded};

/// Census every this many reloads.
const CENSUS_EVERY: usize = 100;
/// Reloads with the connections held.
const HELD_RELOADS: usize = 20;
/// Bound on one `pid-server reload`.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs both parts; true when no request failed and every reload went
/// through.
pub(crate) fn run(args: &Args) -> bool {
    let a = reloads(args);
    if aborted() {
        return false;
    }
    let b = held_connections(args);
    println!();
    println!(
        "endurance: reloads under load {}, held connections {}",
        verdict(a),
        verdict(b)
    );
    a && b
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "clean (no failed request, every reload went through)"
    } else {
        "NOT clean"
    }
}

/// What `/proc` says about the serving process and its surroundings.
struct Census {
    fds: usize,
    rss_kb: u64,
    /// pid-server processes of this server's process group alive (not
    /// zombies), the serving one included.
    alive: usize,
    /// Zombies whose parent is the server or the bench.
    zombies: usize,
}

/// `group`: the process group of the server's first generation, which
/// every later one stays in (`Procs::spawn` makes it).
fn census(server: u32, group: u32) -> Census {
    let fds = fs::read_dir(format!("/proc/{server}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss_kb = fs::read_to_string(format!("/proc/{server}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let me = std::process::id();
    let (mut alive, mut zombies) = (0, 0);
    for (comm, state, ppid, pgrp) in processes() {
        if state == 'Z' && (ppid == me || ppid == server) {
            zombies += 1;
        } else if state != 'Z' && comm == "pid-server" && pgrp == group {
            alive += 1;
        }
    }
    Census {
        fds,
        rss_kb,
        alive,
        zombies,
    }
}

/// (comm, state, ppid, process group) of every process.
fn processes() -> Vec<(String, char, u32, u32)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces and parens.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let pgrp = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        v.push((comm, state, ppid, pgrp));
    }
    v
}

/// `pid-server reload --pid PID`: the new PID and the helper's line.
fn reload(pid: u32) -> Result<(u32, String), String> {
    let out = run_cmd(
        PID_SERVER,
        &[
            "reload",
            "--pid",
            &pid.to_string(),
            "--timeout",
            &RELOAD_TIMEOUT.as_secs().to_string(),
        ],
        RELOAD_TIMEOUT + Duration::from_secs(10),
    )?;
    let (old, new) = parse_reloaded(&out)
        .ok_or_else(|| format!("unexpected output of pid-server reload: {out:?}"))?;
    if old != pid {
        return Err(format!("reload answered for {old}, asked {pid}"));
    }
    Ok((new, out.trim().to_string()))
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

// ---------------------------------------------------------------------------
// 1. Reloads under load
// ---------------------------------------------------------------------------

fn reloads(args: &Args) -> bool {
    let n = args.endurance_reloads;
    eprintln!("bench: endurance: {n} reloads under load");
    let port = nspawn::free_port();
    let mut procs = match Procs::new(&log_path(args, "endurance-reloads")) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let mut pid = match procs.spawn(pid_server_cmd(port), "pid-server") {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if let Err(e) = wait_for_pid(port, pid, Duration::from_secs(10)) {
        return fail(&e);
    }
    let group = pid;
    // A few clients of each kind: the point is many reloads with traffic
    // on every kind of connection, not throughput (two cores serve the
    // load, the server and the reloads).
    let planned = Duration::from_millis(500) * n as u32;
    let mut modes = Vec::new();
    for (mode, clients) in [
        (Mode::KeepAlive, 8),
        (Mode::OneShot, 4),
        (Mode::Paused, args.paused_clients),
    ] {
        let mut a = args.clone();
        a.concurrency = clients;
        a.paused_clients = clients;
        match Load::start(load_cfg(&a, port, mode, planned)) {
            Ok(l) => modes.push((mode, l)),
            Err(e) => return fail(&e),
        }
    }
    std::thread::sleep(Duration::from_millis(500));

    println!();
    println!("### Endurance: {n} reloads under load");
    println!();
    println!("| reloads | time (s) | fds | RSS (MB) | pid-server processes | zombies |");
    println!("|--:|--:|--:|--:|--:|--:|");
    let row = |done: usize, t: Duration, c: &Census| {
        println!(
            "| {done} | {:.1} | {} | {} | {} | {} |",
            t.as_secs_f64(),
            c.fds,
            mb(c.rss_kb),
            c.alive,
            c.zombies
        );
    };
    let t0 = Instant::now();
    row(0, Duration::ZERO, &census(pid, group));
    let (mut ok, mut failed) = (0usize, Vec::new());
    let mut times = Vec::with_capacity(n);
    for i in 1..=n {
        if aborted() {
            break;
        }
        let r0 = Instant::now();
        match reload(pid) {
            Ok((new, _)) => {
                pid = new;
                ok += 1;
                times.push(r0.elapsed());
            }
            Err(e) => {
                eprintln!("bench: endurance: reload {i}: {e}");
                failed.push(e);
            }
        }
        procs.reap();
        if i % CENSUS_EVERY == 0 || i == n {
            // The old generation drains its last requests: let it go first,
            // so the census counts what stays, not what is on its way out.
            let gone = Instant::now() + Duration::from_secs(5);
            while census(pid, group).alive > 1 && Instant::now() < gone {
                procs.reap();
                std::thread::sleep(Duration::from_millis(20));
            }
            procs.reap();
            row(i, t0.elapsed(), &census(pid, group));
        }
    }
    let mut clean = failed.is_empty() && ok == n;
    println!();
    times.sort();
    if !times.is_empty() {
        println!(
            "{ok} of {n} reloads went through in {:.1} s; reload time median {} ms, p99 {} ms, \
             max {} ms",
            t0.elapsed().as_secs_f64(),
            times[times.len() / 2].as_millis(),
            times[times.len() * 99 / 100].as_millis(),
            times[times.len() - 1].as_millis()
        );
    }
    for e in failed.iter().take(5) {
        println!("- reload failed: {e}");
    }
    println!();
    println!("| clients | requests | failed | failures by kind |");
    println!("|---|--:|--:|---|");
    let mut total_failed = 0;
    for (mode, l) in modes {
        let d = l.finish();
        let fails = d.recs.iter().filter(|r| r.kind != Kind::Ok).count();
        total_failed += fails;
        let mut kinds: Vec<String> = load::KINDS
            .iter()
            .filter(|k| **k != Kind::Ok)
            .filter_map(|k| {
                let c = d.recs.iter().filter(|r| r.kind == *k).count();
                (c > 0).then(|| format!("{} {c}", k.name()))
            })
            .collect();
        if kinds.is_empty() {
            kinds.push("-".into());
        }
        println!(
            "| {} | {} | {fails} | {} |",
            mode.name(),
            d.recs.len(),
            kinds.join(", ")
        );
        for f in d.fails.iter().take(3) {
            eprintln!(
                "bench: endurance: {} failure at {} ms: {}",
                mode.name(),
                f.start_us / 1000,
                f.error
            );
        }
    }
    println!();
    println!("Total failed requests: {total_failed}");
    clean &= total_failed == 0;
    clean
}

fn fail(e: &str) -> bool {
    eprintln!("bench: endurance: {e}");
    false
}

// ---------------------------------------------------------------------------
// 2. Many connections held across reloads
// ---------------------------------------------------------------------------

/// Counters the connection tasks share.
#[derive(Default)]
struct Held {
    /// Connections that got their first answer.
    up: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Connections that were answered by more than one PID.
    moved: AtomicU64,
    /// Connections that ended with a last answer after the reloads.
    finished: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Held {
    fn failure(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit; returns it.
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

/// One held connection: a first request, then one after each pause until
/// told to stop, then a last one. Any failure ends it (no reconnect).
async fn hold(
    addr: SocketAddr,
    busy: bool,
    seed: u64,
    stop: Arc<AtomicBool>,
    held: Arc<Held>,
    deadline: Instant,
) {
    let req = load::request("127.0.0.1", false);
    let mut conn = None;
    let mut pids = Vec::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    let (lo, hi) = if busy { (50, 500) } else { (2_000, 10_000) };
    let mut first = true;
    loop {
        let last = stop.load(Ordering::Relaxed) || Instant::now() >= deadline;
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            load::exchange(&mut conn, load::connect_tcp(addr), &req),
        )
        .await;
        match r {
            Ok(Ok(resp)) if resp.status == 200 && !resp.close => {
                held.ok.fetch_add(1, Ordering::Relaxed);
                let pid = resp.pid.unwrap_or(0);
                if pids.last() != Some(&pid) {
                    pids.push(pid);
                }
            }
            Ok(Ok(resp)) => {
                return held.failure(format!(
                    "status {}{}",
                    resp.status,
                    if resp.close {
                        ", connection closed"
                    } else {
                        ""
                    }
                ));
            }
            Ok(Err(e)) => return held.failure(e.to_string()),
            Err(_) => return held.failure("no response within 30 s".into()),
        }
        if first {
            held.up.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        if last {
            if pids.len() > 1 {
                held.moved.fetch_add(1, Ordering::Relaxed);
            }
            held.finished.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Each connection its own stream of pauses.
        let until = Instant::now() + Duration::from_millis(rng.u64(lo..hi));
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn held_connections(args: &Args) -> bool {
    let n = args.endurance_connections;
    let limit = raise_nofile();
    eprintln!(
        "bench: endurance: {n} connections held across {HELD_RELOADS} reloads (open-files limit \
         {limit})"
    );
    if limit < n as u64 + 256 {
        return fail(&format!(
            "the open-files limit {limit} is too low for {n} connections; raise the hard limit"
        ));
    }
    let port = nspawn::free_port();
    let mut procs = match Procs::new(&log_path(args, "endurance-held")) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    // Room above the held connections, and idle connections kept well
    // past the longest pause.
    let mut cmd = pid_server_cmd(port);
    cmd.args([
        "--max-connections",
        &(2 * n).max(100).to_string(),
        "--header-timeout",
        "120",
        "--keep-alive-timeout",
        "60",
    ]);
    let mut pid = match procs.spawn(cmd, "pid-server") {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if let Err(e) = wait_for_pid(port, pid, Duration::from_secs(10)) {
        return fail(&e);
    }
    let group = pid;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("client runtime: {e}")),
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(Held::default());
    let deadline = Instant::now() + Duration::from_secs(600);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    // Open them in steps the listen backlog takes without dropping SYNs.
    for i in 0..n {
        let busy = i % 10 == 0;
        tasks.push(rt.spawn(hold(
            addr,
            busy,
            args.seed ^ i as u64,
            stop.clone(),
            held.clone(),
            deadline,
        )));
        if i % 500 == 499 {
            let want = i as u64 + 1;
            let until = Instant::now() + Duration::from_secs(30);
            while held.up.load(Ordering::Relaxed) + held.failed.load(Ordering::Relaxed) < want
                && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    while held.up.load(Ordering::Relaxed) + held.failed.load(Ordering::Relaxed) < n as u64
        && Instant::now() < until
        && !aborted()
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let opened = t0.elapsed();
    let c = census(pid, group);
    println!();
    println!(
        "### Endurance: {n} connections held across {HELD_RELOADS} reloads ({} busy, {} idle)",
        n.div_ceil(10),
        n - n.div_ceil(10)
    );
    println!();
    println!(
        "{} connections up in {:.1} s; the server holds {} fds, RSS {} MB",
        held.up.load(Ordering::Relaxed),
        opened.as_secs_f64(),
        c.fds,
        mb(c.rss_kb)
    );
    println!();
    println!("| reload | ms | helper says | fds | RSS (MB) | pid-server processes |");
    println!("|--:|--:|---|--:|--:|--:|");
    let mut reloads_ok = 0;
    for i in 1..=HELD_RELOADS {
        if aborted() {
            break;
        }
        let r0 = Instant::now();
        let said = match reload(pid) {
            Ok((new, line)) => {
                pid = new;
                reloads_ok += 1;
                line.split_once("; ")
                    .map(|(_, rest)| rest.to_string())
                    .unwrap_or_default()
            }
            Err(e) => format!("FAILED: {e}"),
        };
        let took = r0.elapsed();
        procs.reap();
        let c = census(pid, group);
        println!(
            "| {i} | {} | {said} | {} | {} | {} |",
            took.as_millis(),
            c.fds,
            mb(c.rss_kb),
            c.alive
        );
        // Let the busy connections talk to the new generation before the
        // next reload.
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let finished = rt.block_on(async {
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .is_ok()
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let failed = held.failed.load(Ordering::Relaxed);
    let done = held.finished.load(Ordering::Relaxed);
    println!();
    println!(
        "{done} of {n} connections answered after the last reload on the socket they opened with; \
         {} moved to a new generation at least once; {} requests answered, {failed} failed{}",
        held.moved.load(Ordering::Relaxed),
        held.ok.load(Ordering::Relaxed),
        held.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!("Total failed requests: {failed}");
    finished && failed == 0 && done == n as u64 && reloads_ok == HELD_RELOADS
}
