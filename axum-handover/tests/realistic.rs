//! `examples/realistic.rs` as a plain process (no systemd) through three
//! reloads, with everything a realistic app has open: HTTP load
//! (keep-alive and one-shot clients), two WebSockets, an `EventSource`,
//! its background task, and its counter handed to each successor.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Proc, Reaper, WAIT};
use pid_server_test_support::ws::{self, CloseCode};
use pid_server_test_support::{Load, http, sse, wait};

/// The library's default close spread, which the example keeps.
const SPREAD: Duration = Duration::from_secs(5);

/// Reloads `pid` with the example's helper; returns the new PID.
fn reload(pid: u32) -> u32 {
    proc::reload_ok(proc::example("realistic"), pid).0
}

fn served(addr: SocketAddr) -> u64 {
    let r = http::get(addr, "/stats").unwrap();
    assert_eq!(r.status, 200);
    r.body.trim().parse().unwrap()
}

#[test]
fn three_reloads_with_load_websockets_events_and_a_background_task() {
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = Command::new(proc::example("realistic"));
    // The address is ignored: the socket is passed the systemd way.
    socket.pass_to(&mut cmd);
    cmd.arg(addr.to_string());
    let first = Proc::spawn(cmd);
    let reaper = Reaper::default();
    http::wait_ok(addr, "/", WAIT);
    let load = Load::to(addr)
        .keep_alive(2)
        .one_shot(1)
        .pace(Duration::from_millis(5))
        .max_requests(50_000)
        .max_time(Duration::from_secs(90))
        .start();
    // ConnectInfo: the client's own address.
    let mut c = http::Conn::open(addr, WAIT).unwrap();
    let me = c.local_addr().to_string();
    assert_eq!(c.get("/you").unwrap().body.trim(), me);

    // The EventSource, in its own thread: resumes with Last-Event-ID
    // until the last process stops.
    let (tx, rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut all: Vec<(u64, u32)> = Vec::new();
        for _ in 0..4 {
            let last = all.last().map(|e| e.0);
            let got = sse::once(addr, "/events", last, SPREAD + Duration::from_secs(20));
            let _ = tx.send((got.len(), got.last().map(|e| e.1)));
            all.extend(got);
        }
        all
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut pid = first.pid;
    let mut pids = vec![pid];
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let (s, said) = rt.block_on(ws::open(addr, "/ws"));
        assert_eq!(said, pid);
        sockets.push(s);
    }
    let mut count = served(addr);
    for round in 0..3 {
        load.wait_answers_from(pid, 20, WAIT);
        // From the reload's request: the helper answers only once the old
        // process is done (or at its bound).
        let t = Instant::now();
        let new = reload(pid);
        reaper.watch(new);
        let answered = t.elapsed();
        // Each WebSocket closes with 1012 within the spread (plus the
        // time its close takes) and reconnects to the new process.
        let codes = rt.block_on(async {
            let closes = sockets
                .iter_mut()
                .map(|s| ws::close_code(s, SPREAD + Duration::from_secs(3)));
            futures_util::future::join_all(closes).await
        });
        let closed = t.elapsed();
        assert_eq!(codes, vec![Some(CloseCode::Restart); 2], "round {round}");
        for s in &mut sockets {
            let (next, said) = rt.block_on(ws::open(addr, "/ws"));
            assert_eq!(said, new, "round {round}: reconnected to the new process");
            *s = next;
        }
        // The old process's stream ended (at its moment in the spread).
        let (n, on) = rx
            .recv_timeout(SPREAD + Duration::from_secs(5))
            .expect("the event stream ended");
        assert_eq!(
            on,
            Some(pid),
            "round {round}: the stream was the old process's"
        );
        // Its background task stopped at the handover.
        let line = format!("PID {pid} refresher stopped after");
        wait::until(&line, WAIT, || first.log().contains(&line).then_some(()));
        proc::wait_gone(pid, SPREAD + Duration::from_secs(5));
        let gone = t.elapsed();
        eprintln!(
            "round {round}: PID {pid} -> {new}: helper answered after {answered:?}, both \
             WebSockets closed with 1012 by {closed:?}, {n} events before the stream ended, \
             old process gone by {gone:?} (all from the reload's request)"
        );
        // Spawn, readiness and probation, the spread, the clients' close
        // answers: 5 s more than the spread is ample.
        assert!(
            gone < SPREAD + Duration::from_secs(5),
            "round {round}: the old process lived {gone:?} after the reload's request"
        );
        // The request counter went on from the old process's.
        let now = served(addr);
        assert!(now > count, "round {round}: /stats {now} after {count}");
        count = now;
        pid = new;
        pids.push(pid);
    }
    load.wait_answers_from(pid, 20, WAIT);
    let tally = load.finish();
    // The last stream ends at a stop.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let all = wait::join(client, "the EventSource", WAIT);
    proc::wait_gone(pid, SPREAD + Duration::from_secs(5));
    let ids: Vec<u64> = all.iter().map(|e| e.0).collect();
    let want: Vec<u64> = (0..ids.len() as u64).collect();
    assert_eq!(ids, want, "every event id once, in order");
    let mut seen: Vec<u32> = all.iter().map(|e| e.1).collect();
    seen.dedup();
    assert_eq!(seen, pids, "each process in turn");
    eprintln!(
        "{} HTTP requests ({} failed), {} events, /stats {count}",
        tally.ok,
        tally.failed(),
        all.len()
    );
    assert_eq!(tally.failed(), 0, "{tally:?}");
    assert!(
        first
            .log()
            .contains(&format!("PID {pid} refresher stopped after")),
        "the last task stopped at SIGTERM:\n{}",
        first.log()
    );
}
