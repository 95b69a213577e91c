//! What outlives a request's head across reloads: WebSockets (closed with
//! 1012 and reconnected to the new process), Server-Sent Events (ended and
//! resumed from `Last-Event-ID`), a kept connection's `ConnectInfo`, and a
//! stopping process's listening socket; WebSockets over TLS, and the
//! operator's close spread. With the real binary, no systemd.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pid_server_test_support::proc::{self, Notify, Proc, Reaper, WAIT};
use pid_server_test_support::tls::{ClientConfig, TestCa};
use pid_server_test_support::ws::{self, CloseCode};
use pid_server_test_support::{Load, http, sse, wait};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

/// The library's default close spread.
const SPREAD: Duration = Duration::from_secs(5);

/// Reloads `pid` with the helper; returns the new PID and the helper's line.
fn reload(pid: u32) -> (u32, String) {
    proc::reload_ok(BIN, pid)
}

/// Three reloads with a WebSocket open and HTTP load alongside: each time
/// the socket is closed with 1012 within the close spread, the client
/// reconnects to the new process, and the old process is gone soon after.
/// Before: the upgrade answered 101 and the connection closed with no
/// frame (hyper served HTTP/1.1 without upgrades).
#[test]
fn websockets_close_with_1012_at_a_reload_and_reconnect_to_the_new_process() {
    let (first, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let load = Load::to(addr)
        .keep_alive(2)
        .one_shot(1)
        .pace(Duration::from_millis(5))
        .max_requests(20_000)
        .max_time(Duration::from_secs(60))
        .start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut pid = first.pid;
    let (mut ws, said) = rt.block_on(ws::open(addr, "/ws"));
    assert_eq!(said, pid);
    for round in 0..3 {
        let (new, line) = reload(pid);
        reaper.watch(new);
        let t = Instant::now();
        let code = rt.block_on(ws::close_code(&mut ws, SPREAD + Duration::from_secs(3)));
        let closed = t.elapsed();
        assert_eq!(code, Some(CloseCode::Restart), "round {round}: 1012");
        proc::wait_gone(pid, SPREAD + Duration::from_secs(5));
        let gone = t.elapsed();
        eprintln!(
            "round {round}: closed with 1012 {closed:?} after the helper returned, \
             old PID {pid} gone after {gone:?}; helper: {line}"
        );
        let (next, said) = rt.block_on(ws::open(addr, "/ws"));
        assert_eq!(said, new, "round {round}: reconnected to the new process");
        ws = next;
        pid = new;
    }
    let t = load.finish();
    assert_eq!(t.failed(), 0, "{t:?}");
    assert!(t.ok > 0);
}

/// An `EventSource` across three reloads: each stream ends cleanly within
/// the close spread, the client resumes with `Last-Event-ID` from the new
/// process, and no event id is lost or repeated. Before: the stream held
/// the old process for the whole drain timeout (30 s).
#[test]
fn server_sent_events_resume_from_the_new_process_with_no_event_lost() {
    let (first, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let load = Load::to(addr)
        .keep_alive(2)
        .pace(Duration::from_millis(5))
        .max_requests(20_000)
        .max_time(Duration::from_secs(60))
        .start();
    let (tx, rx) = std::sync::mpsc::channel();
    // The client: resumes until told to stop, in its own thread while the
    // test reloads.
    let client = std::thread::spawn(move || {
        let mut all: Vec<(u64, u32)> = Vec::new();
        let mut ends = Vec::new();
        for _ in 0..4 {
            let last = all.last().map(|e| e.0);
            let got = sse::once(addr, "/events", last, SPREAD + Duration::from_secs(20));
            ends.push(Instant::now());
            let _ = tx.send(got.last().map(|e| e.1));
            all.extend(got);
        }
        (all, ends)
    });
    let mut pid = first.pid;
    let mut pids = vec![pid];
    for round in 0..3 {
        // Let the stream say a few events first.
        std::thread::sleep(Duration::from_secs(2));
        let (new, _) = reload(pid);
        reaper.watch(new);
        let t = Instant::now();
        let ended_on = rx
            .recv_timeout(SPREAD + Duration::from_secs(5))
            .expect("the stream ended");
        eprintln!(
            "round {round}: stream ended {:?} after the helper returned",
            t.elapsed()
        );
        assert_eq!(ended_on, Some(pid), "round {round}");
        proc::wait_gone(pid, SPREAD + Duration::from_secs(5));
        eprintln!(
            "round {round}: old PID {pid} gone {:?} after the helper returned",
            t.elapsed()
        );
        pid = new;
        pids.push(pid);
    }
    // The last stream ends at a stop.
    std::thread::sleep(Duration::from_secs(2));
    let t = load.finish();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let (all, _) = client.join().unwrap();
    let ids: Vec<u64> = all.iter().map(|e| e.0).collect();
    let want: Vec<u64> = (0..ids.len() as u64).collect();
    assert_eq!(ids, want, "every event id once, in order");
    let mut seen: Vec<u32> = all.iter().map(|e| e.1).collect();
    seen.dedup();
    assert_eq!(seen, pids, "each process in turn");
    assert_eq!(t.failed(), 0, "{t:?}");
}

/// `ConnectInfo<SocketAddr>` says the client's address, on an accepted
/// connection and on the same connection once moved to the new process
/// (read from the fd). Before: 500, "Missing request extension".
#[test]
fn connect_info_is_the_clients_address_before_and_after_a_reload() {
    let (old, _notify, addr) = proc::start(BIN);
    let reaper = Reaper::default();
    let mut c = http::Conn::open(addr, WAIT).unwrap();
    let me = c.local_addr().to_string();
    let r = c.get("/peer").unwrap();
    assert_eq!((r.status, r.body.trim()), (200, me.as_str()));
    let (new, _) = reload(old.pid);
    reaper.watch(new);
    let r = c.get("/peer").unwrap();
    assert_eq!((r.status, r.body.trim()), (200, me.as_str()));
    assert_eq!(c.get("/").unwrap().pid(), Some(new), "moved");
    assert_eq!(c.served(), 3, "one connection throughout");
}

/// Outside systemd, a stopping process that accepts nothing more closes
/// its listening socket: a new client is refused at once rather than left
/// in a queue nobody reads (reset at exit). Before: the connect succeeded
/// and the request hung until the process exited.
#[test]
fn a_stopping_process_refuses_new_connections_at_once() {
    // Bound from `--listen`: the process's own socket is the only one, so
    // closing it refuses. A passed socket stays open in the test (as in
    // systemd), and queues.
    let (mut p, _notify, addr) = proc::start_bound(BIN);
    let mut slow = TcpStream::connect(addr).unwrap();
    write!(slow, "GET /slow?ms=4000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The slow request is in flight once the server counts it.
    http::wait_ok(addr, "/healthz", WAIT);
    wait::until("the slow request to start", WAIT, || {
        http::get(addr, "/healthz")
            .unwrap()
            .body
            .contains("\"in_flight\":2")
            .then_some(())
    });
    p.signal(Signal::SIGTERM);
    // Readiness goes first; the socket closes as the accept loop stops.
    let t = wait::until("new connections to be refused", WAIT, || {
        let t = Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(t.elapsed()),
            Err(e) => panic!("connect: {e}"),
            Ok(s) => {
                // Answered (with `Connection: close`) or queued: which?
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut w = s.try_clone().unwrap();
                let _ = write!(w, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut line = String::new();
                let n = BufReader::new(s).read_line(&mut line);
                assert!(
                    matches!(n, Ok(n) if n > 0),
                    "a connection the stopping process neither answered nor refused"
                );
                None
            }
        }
    });
    eprintln!("refused after {t:?}");
    let mut r = BufReader::new(slow);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "the slow request finished: {line}"
    );
    p.wait_exit(WAIT);
}

/// Clients that keep connecting while a process outside systemd stops:
/// each connection is answered or refused, none is reset. A connection
/// that reached the kernel's queue just before the stop closed the socket
/// was reset with its request unanswered (the socket's last descriptor
/// closed with it queued): 34 runs of this test in 40 before, 0 after.
#[test]
fn connections_queued_at_a_stop_are_answered_not_reset() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CLIENTS: usize = 4;
    // Bounds each client's loop, beside `WAIT`.
    const MAX_CONNECTIONS: usize = 200_000;
    let (mut p, _notify, addr) = proc::start_bound(BIN);
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let answered = answered.clone();
            std::thread::spawn(move || -> Result<usize, String> {
                let start = Instant::now();
                for _ in 0..MAX_CONNECTIONS {
                    if start.elapsed() > WAIT {
                        return Err("the process did not stop refusing within WAIT".into());
                    }
                    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            return Ok(answered.load(Ordering::SeqCst));
                        }
                        Err(e) => return Err(format!("connect: {e}")),
                        Ok(s) => s,
                    };
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let sent = write!(w, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut line = String::new();
                    let read = BufReader::new(s).read_line(&mut line);
                    match (sent, read) {
                        (Ok(()), Ok(_)) if line.starts_with("HTTP/1.1 200") => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        (sent, read) => {
                            return Err(format!(
                                "a connection neither answered nor refused: write {sent:?}, read {read:?} {line:?}"
                            ));
                        }
                    }
                }
                Err(format!("still connecting after {MAX_CONNECTIONS} connections"))
            })
        })
        .collect();
    // Every client is connecting before the stop.
    wait::until("the clients to be answered", WAIT, || {
        (answered.load(Ordering::SeqCst) >= 4 * CLIENTS).then_some(())
    });
    p.signal(Signal::SIGTERM);
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    p.wait_exit(WAIT);
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    eprintln!(
        "answered {} connections, then refused",
        answered.load(Ordering::SeqCst)
    );
}

/// pid-server with TLS (a leaf of `ca` in `dir`) on a fresh port.
fn start_tls(ca: &TestCa, dir: &std::path::Path) -> (Proc, std::net::SocketAddr) {
    let (cert, key) = ca.write_leaf(dir, "server", "ws");
    let notify = Notify::new();
    let socket = proc::Socket::new();
    let addr = socket.addr();
    let mut cmd = proc::serve_socket_cmd(BIN, socket, &notify);
    cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    let p = Proc::spawn(cmd);
    notify.wait_for("READY=1", |m| m.contains("READY=1"));
    (p, addr)
}

/// `wss://`: the TLS handshake (ALPN `http/1.1`, as a browser offers for a
/// WebSocket), then the WebSocket's over it.
async fn wss_open(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> (WebSocketStream<TlsStream<tokio::net::TcpStream>>, u32) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    ws::open_over(tls, "wss://localhost/ws").await
}

/// WebSockets over TLS: upgraded after the TLS handshake, then told to end
/// at each of two reloads like plain ones: closed with 1012 within the
/// close spread, reconnected (a new TLS session) to the new process, and
/// the old process gone after. Before: nothing tested a WebSocket on a TLS
/// socket (a TLS connection drains instead of moving).
#[test]
fn websockets_over_tls_close_with_1012_at_a_reload_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (first, addr) = start_tls(&ca, dir.path());
    let reaper = Reaper::default();
    let config = ca.client(&[b"http/1.1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut pid = first.pid;
    let (mut wss, said) = rt.block_on(wss_open(addr, config.clone()));
    assert_eq!(said, pid);
    for round in 0..2 {
        let (new, _) = reload(pid);
        reaper.watch(new);
        let t = Instant::now();
        let code = rt.block_on(ws::close_code(&mut wss, SPREAD + Duration::from_secs(3)));
        let closed = t.elapsed();
        assert_eq!(code, Some(CloseCode::Restart), "round {round}: 1012");
        proc::wait_gone(pid, SPREAD + Duration::from_secs(5));
        eprintln!(
            "round {round}: wss closed with 1012 {closed:?} after the helper returned, \
             old PID {pid} gone after {:?}",
            t.elapsed()
        );
        let (next, said) = rt.block_on(wss_open(addr, config.clone()));
        assert_eq!(said, new, "round {round}: reconnected to the new process");
        wss = next;
        pid = new;
    }
}

/// `--close-spread-ms 0` (the operator's `close_spread_ms`): every
/// WebSocket is told to end at once when the generation leaves, instead of
/// at a moment drawn over the default 5 s. Before: no such flag (the start
/// failed), and four sockets all closing within a second of the helper's
/// answer had a chance of (1/5)^4.
#[test]
fn close_spread_ms_zero_closes_every_websocket_at_once() {
    let (first, _notify, addr) = proc::start_with(BIN, &["--close-spread-ms", "0"]);
    let reaper = Reaper::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sockets: Vec<_> = (0..4)
        .map(|_| rt.block_on(ws::open(addr, "/ws")).0)
        .collect();
    let (new, _) = reload(first.pid);
    reaper.watch(new);
    let t = Instant::now();
    let codes = rt.block_on(async {
        let closes = sockets
            .iter_mut()
            .map(|s| ws::close_code(s, SPREAD + Duration::from_secs(3)));
        futures_util::future::join_all(closes).await
    });
    let closed = t.elapsed();
    eprintln!("4 WebSockets closed within {closed:?} of the helper's answer");
    assert_eq!(codes, vec![Some(CloseCode::Restart); 4]);
    assert!(closed < Duration::from_secs(1), "{closed:?}");
}
