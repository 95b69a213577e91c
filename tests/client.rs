//! The test support's HTTP client and load generator against stand-in
//! servers on loopback (no pid-server, no container): what they count as a
//! failure, what they parse, and what the paused clients record per
//! connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pid_server_test_support::http::{self, Client};
use pid_server_test_support::{ConnEnd, ConnReport, Load};

const WAIT: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One connection of a stand-in server.
struct Peer(BufReader<TcpStream>);

impl Peer {
    /// Reads one request head; `false` when the client closed instead.
    fn request(&mut self) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match self.0.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line == "\r\n" => return true,
                Ok(_) => {}
            }
        }
    }

    /// Answers like pid-server's `GET /` from `pid`, with `extra` headers.
    fn answer(&mut self, pid: u32, extra: &str) {
        let body = format!("OK. Handled by PID: {pid}\n");
        let _ = write!(
            self.0.get_mut(),
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
    }
}

/// A stand-in server on a loopback port: connection `i` (0-based, in
/// accept order) is served on a thread of its own by `serve(i, peer)`.
/// Dropping it stops accepting.
struct StandIn {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl StandIn {
    fn start(serve: impl Fn(usize, Peer) + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let serve = Arc::new(serve);
        let accept = {
            let stop = stop.clone();
            thread::spawn(move || {
                let n = AtomicUsize::new(0);
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    let (i, serve) = (n.fetch_add(1, Ordering::SeqCst), serve.clone());
                    thread::spawn(move || serve(i, Peer(BufReader::new(s))));
                }
            })
        };
        StandIn {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// The client against a local stand-in server: a reused connection closed
/// under it is a failure, not retried; `Connection: close` is honoured; the
/// next request opens a new connection.
#[test]
fn keep_alive_client_counts_a_broken_reused_connection_as_a_failure() {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let answer = |s: &mut TcpStream, extra: &str| {
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].ends_with(b"\r\n\r\n"));
            let body = "OK. Handled by PID: 7\n";
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
            .unwrap();
        };
        // Connection 1: two answers, then closed while the client sends a
        // third request.
        let (mut s, _) = listener.accept().unwrap();
        answer(&mut s, "");
        answer(&mut s, "");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        drop(s);
        // Connection 2: one answer that closes.
        let (mut s, _) = listener.accept().unwrap();
        answer(&mut s, "connection: close\r\n");
        // Connection 3: one answer.
        let (mut s, _) = listener.accept().unwrap();
        answer(&mut s, "");
    });
    let mut c = Client::new(addr);
    let r = c.get("/").unwrap();
    assert_eq!((r.status, r.reused), (200, false));
    assert_eq!(r.pid(), Some(7));
    assert!(c.get("/").unwrap().reused);
    let e = c.get("/").unwrap_err().to_string();
    assert!(
        e.starts_with("on a reused connection (after 2 responses)"),
        "{e}"
    );
    assert!(!c.get("/").unwrap().reused);
    assert!(
        !c.get("/").unwrap().reused,
        "kept a connection that said close"
    );
    assert_eq!(c.connections(), 3);
    server.join().unwrap();
}

#[test]
fn http_response_parsing() {
    let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    let r = http::parse_response(plain).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    assert_eq!(r.keep_alive, None);
    let advertised =
        b"HTTP/1.1 200 OK\r\nKeep-Alive: max=9, timeout=3\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(
        http::parse_response(advertised).unwrap().keep_alive,
        Some(3)
    );
    let chunked =
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let r = http::parse_response(chunked).unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    assert!(http::parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
}

/// What pid-server never sends is an error, not something to guess about.
#[test]
fn the_parser_refuses_malformed_responses() {
    let refused: &[&[u8]] = &[
        // Not HTTP/1.1, no status, an interim status.
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        // LF without CR; a header line without a colon.
        b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",
        b"HTTP/1.1 200 OK\r\ncontent-length 0\r\n\r\n",
        // No length, two lengths, both kinds of length.
        b"HTTP/1.1 200 OK\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        // A chunk without its CRLF; bytes after the response; not UTF-8.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokextra",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n\xff\xfe",
    ];
    for raw in refused {
        let r = http::parse_response(raw);
        assert!(
            r.is_err(),
            "accepted {:?}: {r:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let ok = |body: &str| http::Response {
        status: 200,
        body: body.to_string(),
        close: false,
        reused: false,
        keep_alive: None,
    };
    assert_eq!(ok("OK. Handled by PID: 42\n").pid(), Some(42));
    for body in [
        "OK. Handled by PID: 42",
        "OK. Handled by PID: +42\n",
        "OK. Handled by PID: \n",
        " OK. Handled by PID: 42\n",
    ] {
        assert_eq!(ok(body).pid(), None, "{body:?}");
    }
}

/// A paused client keeps its connection between requests and records, per
/// client socket, the PIDs that answered on it: here one connection moves
/// from PID 10 to PID 11 and then is closed by the server's `Connection:
/// close` (not a failure), the next one is closed under a request (a
/// failure, not retried), and the third is still open when the load ends.
#[test]
fn paused_clients_record_the_pids_that_answered_each_connection() {
    let server = StandIn::start(|i, mut peer| match i {
        0 => {
            for (pid, extra) in [(10, ""), (11, ""), (11, "connection: close\r\n")] {
                assert!(peer.request());
                peer.answer(pid, extra);
            }
        }
        1 => {
            assert!(peer.request());
            peer.answer(11, "");
            // Reads the next request and closes instead of answering.
            assert!(peer.request());
        }
        _ => {
            while peer.request() {
                peer.answer(12, "");
            }
        }
    });
    let load = Load::to(server.addr)
        .paused(1)
        .pause(ms(5), ms(20))
        .max_time(Duration::from_secs(30))
        .start();
    load.wait_for("an answer on the third connection", WAIT, |t| {
        t.conns.get(2).is_some_and(|c| c.answered() >= 1)
    });
    let t = load.finish();
    eprintln!("{}\n{:#?}", t.summary(), t.conns);

    assert_eq!((t.conns.len(), t.connections), (3, 3), "{t:#?}");
    let (a, b, c) = (&t.conns[0], &t.conns[1], &t.conns[2]);
    assert_eq!(a.runs, [(10, 1), (11, 2)]);
    assert_eq!(a.pids(), [10, 11]);
    assert!(a.moved(10, 11) && !a.moved(11, 10));
    assert_eq!(a.end, ConnEnd::Closed);
    assert_eq!(b.pids(), [11]);
    assert_eq!(
        b.end,
        ConnEnd::Failed("closed on reused connection".to_string())
    );
    assert_eq!(c.pids(), [12]);
    assert_eq!(c.end, ConnEnd::Open);
    assert!(a.local != b.local && b.local != c.local && a.local != c.local);
    assert!(t.conns.iter().all(|c| c.client == 0));

    assert_eq!(
        t.failures,
        BTreeMap::from([("closed on reused connection".to_string(), 1)])
    );
    assert_eq!((t.failed_on_reused(), t.refused(), t.resets()), (1, 0, 0));
    assert!(
        t.examples[0].starts_with(
            "paused: closed on reused connection: on a reused connection (after 1 responses): read: "
        ),
        "{:?}",
        t.examples
    );
    assert_eq!(t.sent, t.ok + 1);
    assert_eq!((t.ok_paused, t.ok_keep_alive, t.ok_one_shot), (t.ok, 0, 0));
    // Fresh: the first answer of each connection.
    assert_eq!(t.ok_reused, t.ok - 3);
    assert_eq!(t.moved(10, 11), 1);
    assert_eq!(
        t.conn_report(),
        ConnReport {
            connections: 3,
            kept_across_pid_change: 1,
            saw_change_or_closed: 2,
            closed: 1,
            failed: 1,
        }
    );
    assert!(
        t.summary()
            .contains("kept connections: 1 kept across a PID change / 2 saw a PID change"),
        "{}",
        t.summary()
    );
    assert_eq!(t.exhausted, 0);
}

/// Paused clients stop at their share of the requests, at the load's time
/// limit even in the middle of a pause, and at once when the load is
/// finished.
#[test]
fn a_paused_load_is_bounded_in_requests_and_time_and_stops_at_once() {
    let server = StandIn::start(|_, mut peer| {
        while peer.request() {
            peer.answer(7, "");
        }
    });
    // Requests: 6 in all, 3 per client.
    let t = Load::to(server.addr)
        .paused(2)
        .pause(ms(1), ms(5))
        .max_requests(6)
        .max_time(Duration::from_secs(30))
        .start()
        .join();
    assert_eq!((t.sent, t.ok, t.exhausted), (6, 6, 2), "{}", t.summary());
    assert_eq!(t.connections, 2, "{}", t.summary());
    assert!(t.conns.iter().all(|c| c.runs == [(7, 3)]), "{:?}", t.conns);

    // Time: a 5 s pause is cut short by a 300 ms limit.
    let t0 = Instant::now();
    let t = Load::to(server.addr)
        .paused(2)
        .pause(Duration::from_secs(5), Duration::from_secs(5))
        .max_time(ms(300))
        .start()
        .join();
    let took = t0.elapsed();
    assert_eq!((t.sent, t.ok, t.exhausted), (2, 2, 2), "{}", t.summary());
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Finish: clients in a 5 s pause end at once.
    let load = Load::to(server.addr)
        .paused(3)
        .pause(Duration::from_secs(5), Duration::from_secs(5))
        .max_time(Duration::from_secs(60))
        .start();
    load.wait_for("every paused client's first answer", WAIT, |t| t.ok == 3);
    let t0 = Instant::now();
    let t = load.finish();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "finish took {took:?}");
    assert_eq!(
        (t.sent, t.exhausted, t.failed()),
        (3, 0, 0),
        "{}",
        t.summary()
    );
    assert!(t.conns.iter().all(|c| c.end == ConnEnd::Open));
}
