//! The HTTP/2 load client of the protocol rows (the `h2` crate): a few
//! connections, each carrying several concurrent streams, each stream a
//! closed loop (request, whole response, next request). Over plain TCP
//! with prior knowledge (h2c) or over TLS with ALPN `h2`.
//!
//! What counts as a failure, exactly:
//!
//! - a stream the client opened that did not end in a whole 200 response:
//!   reset by the server (`RST_STREAM`, `REFUSED_STREAM` included), cut by
//!   a GOAWAY whose last stream id is below it, by a GOAWAY with an error
//!   code or by the connection's end, or no answer within `--timeout-ms`.
//!   Never retried;
//! - a stream the client could not open because the connection broke
//!   without a GOAWAY (the HTTP/2 counterpart of a request that fails on a
//!   reused HTTP/1.1 connection);
//! - a connection that could not be made (connect, TLS, HTTP/2 handshake):
//!   one failure each, as the HTTP/1.1 clients count a refused connect.
//!
//! A graceful GOAWAY (`NO_ERROR`) is no failure: the `h2` crate then
//! refuses to open new streams on that connection before anything is sent,
//! the streams already open finish, and the client opens a new connection
//! for the next ones. That is what an HTTP/2 client is meant to do, and
//! what a server draining its connections asks for.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;
use h2::client::SendRequest;
use pid_server_test_support::h2::{OpenError, open};
use rustls::ClientConfig;
use tokio::task::JoinSet;

use crate::load::{FailRec, Kind, Rec, classify, record};

/// One HTTP/2 connection slot: it keeps one connection with `streams`
/// closed-loop streams on it, and replaces the connection when it goes
/// away.
pub(crate) struct H2Slot {
    pub(crate) port: u16,
    /// TLS with ALPN `h2`, or None for h2c (prior knowledge).
    pub(crate) tls: Option<Arc<ClientConfig>>,
    pub(crate) streams: usize,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
    /// Streams (and failed connections) per stream of the slot, at most:
    /// the slot stops after this × `streams`.
    pub(crate) max_requests: u64,
}

type Out = (Vec<Rec>, Vec<FailRec>);

/// Why a stream loop ended.
#[derive(PartialEq, Eq)]
enum End {
    /// Stop, deadline or request bound.
    Done,
    /// The connection cannot take new streams: a graceful GOAWAY, or it
    /// broke (counted then).
    Gone,
}

/// How the error of a stream cut by a graceful GOAWAY begins (the
/// protocol table counts them apart: unprocessed, so a client may retry).
pub(crate) const GOAWAY_CUT: &str = "cut by GOAWAY";

fn graceful_goaway(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
}

fn kind_of(e: &h2::Error) -> Kind {
    if let Some(io) = e.get_io() {
        classify(io)
    } else if e.is_reset() || e.is_go_away() {
        Kind::Reset
    } else {
        Kind::Other
    }
}

fn uri(port: u16, tls: bool) -> String {
    if tls {
        format!("https://localhost:{port}/")
    } else {
        format!("http://127.0.0.1:{port}/")
    }
}

/// A new connection and its HTTP/2 handshake (the test support's
/// [`open`], as the tests' client opens one); the error says which
/// step failed. The task driving the connection ends when the connection
/// does; nothing waits for its result (the streams see the same error).
async fn handshake(s: &H2Slot) -> Result<SendRequest<Bytes>, (Kind, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, s.port));
    match open(addr, s.tls.clone(), &h2::client::Builder::new()).await {
        Ok(opened) => Ok(opened.send),
        Err(e) => {
            let kind = match &e {
                OpenError::Connect(io) | OpenError::Tls(io) => classify(io),
                OpenError::Alpn(_) => Kind::Other,
                OpenError::Handshake(h) => kind_of(h),
            };
            Err((kind, e.to_string()))
        }
    }
}

struct StreamLoop {
    send: SendRequest<Bytes>,
    uri: String,
    conn: u64,
    /// A stream of this connection has had its whole answer: streams after
    /// that are on a reused connection.
    answered: Arc<AtomicBool>,
    timeout: Duration,
    deadline: Instant,
    max: u64,
}

impl StreamLoop {
    async fn run(
        self,
        t0: Instant,
        stop: Arc<AtomicBool>,
        sent: Arc<std::sync::atomic::AtomicU64>,
    ) -> (Out, End) {
        let (mut recs, mut fails) = (Vec::new(), Vec::new());
        let mut push =
            |start: Instant, kind: Kind, pid: u32, reused: bool, error: Option<String>| {
                let (start_us, lat_us) = Rec::times(t0, start, start.elapsed());
                let rec = Rec {
                    start_us,
                    lat_us,
                    pid,
                    kind,
                    reused,
                    conn: self.conn,
                    closed: false,
                };
                record(&mut recs, &mut fails, rec, error);
            };
        loop {
            if stop.load(Ordering::Relaxed)
                || Instant::now() >= self.deadline
                || sent.load(Ordering::Relaxed) >= self.max
            {
                return ((recs, fails), End::Done);
            }
            let start = Instant::now();
            let reused = self.answered.load(Ordering::Relaxed);
            // Room for one more stream (the server's max concurrent
            // streams), or the connection's end.
            let ready = tokio::time::timeout(self.timeout, self.send.clone().ready()).await;
            let mut ready = match ready {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if graceful_goaway(&e) => return ((recs, fails), End::Gone),
                Ok(Err(e)) => {
                    push(
                        start,
                        kind_of(&e),
                        0,
                        reused,
                        Some(format!("open a stream: {e}")),
                    );
                    return ((recs, fails), End::Gone);
                }
                Err(_) => {
                    push(
                        start,
                        Kind::Timeout,
                        0,
                        reused,
                        Some(format!("no room for a stream within {:?}", self.timeout)),
                    );
                    return ((recs, fails), End::Gone);
                }
            };
            let req = http::Request::get(self.uri.as_str())
                .header("user-agent", "pid-server-bench")
                .body(())
                .expect("a valid request");
            let resp = match ready.send_request(req, true) {
                Ok((resp, _)) => resp,
                Err(e) if graceful_goaway(&e) => return ((recs, fails), End::Gone),
                Err(e) => {
                    push(
                        start,
                        kind_of(&e),
                        0,
                        reused,
                        Some(format!("open a stream: {e}")),
                    );
                    return ((recs, fails), End::Gone);
                }
            };
            sent.fetch_add(1, Ordering::Relaxed);
            let answer = tokio::time::timeout(self.timeout, async {
                let resp = resp.await?;
                let status = resp.status().as_u16();
                let mut body = resp.into_body();
                let mut data = Vec::with_capacity(64);
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    data.extend_from_slice(&chunk);
                }
                Ok::<_, h2::Error>((status, data))
            })
            .await;
            match answer {
                Ok(Ok((status, data))) => {
                    let pid = std::str::from_utf8(&data)
                        .ok()
                        .and_then(pid_server_test_support::http::pid_in)
                        .unwrap_or(0);
                    if status == 200 {
                        self.answered.store(true, Ordering::Relaxed);
                        push(start, Kind::Ok, pid, reused, None);
                    } else {
                        push(
                            start,
                            Kind::Status,
                            pid,
                            reused,
                            Some(format!("status {status}")),
                        );
                    }
                }
                Ok(Err(e)) => {
                    let what = if graceful_goaway(&e) {
                        // Above the last stream id of a graceful GOAWAY: the
                        // server did not process it (RFC 9113 6.8 lets a
                        // client retry it; this one does not, it counts).
                        GOAWAY_CUT
                    } else {
                        "stream"
                    };
                    push(start, kind_of(&e), 0, reused, Some(format!("{what}: {e}")))
                }
                Err(_) => push(
                    start,
                    Kind::Timeout,
                    0,
                    reused,
                    Some(format!("no whole response within {:?}", self.timeout)),
                ),
            }
        }
    }
}

impl H2Slot {
    pub(crate) async fn run(self, slot: u64, t0: Instant, stop: Arc<AtomicBool>) -> Out {
        let (mut recs, mut fails) = (Vec::with_capacity(16 * 1024), Vec::new());
        let uri = uri(self.port, self.tls.is_some());
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let max = self.max_requests * self.streams as u64;
        let mut conns = 0u64;
        while !stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && sent.load(Ordering::Relaxed) < max
        {
            conns += 1;
            let conn = slot << 32 | conns;
            let start = Instant::now();
            let send = match tokio::time::timeout(self.timeout, handshake(&self)).await {
                Ok(Ok(s)) => s,
                // (A failed connection counts against the bound as a
                // stream would: a server that is down cannot make this
                // loop spin unbounded.)
                Ok(Err((kind, msg))) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    record_failed_connect(&mut recs, &mut fails, t0, start, conn, kind, msg);
                    continue;
                }
                Err(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("no HTTP/2 connection within {:?}", self.timeout);
                    record_failed_connect(
                        &mut recs,
                        &mut fails,
                        t0,
                        start,
                        conn,
                        Kind::Timeout,
                        msg,
                    );
                    continue;
                }
            };
            let answered = Arc::new(AtomicBool::new(false));
            let mut set = JoinSet::new();
            for _ in 0..self.streams {
                let l = StreamLoop {
                    send: send.clone(),
                    uri: uri.clone(),
                    conn,
                    answered: answered.clone(),
                    timeout: self.timeout,
                    deadline: self.deadline,
                    max,
                };
                set.spawn(l.run(t0, stop.clone(), sent.clone()));
            }
            drop(send);
            let first = recs.len();
            let mut gone = false;
            while let Some(r) = set.join_next().await {
                if let Ok(((r, f), end)) = r {
                    recs.extend(r);
                    fails.extend(f);
                    gone |= end == End::Gone;
                }
            }
            // The connection ended with its last answer (for the kept
            // connections' analysis), if it went away.
            if gone && let Some(last) = recs[first..].iter_mut().max_by_key(|r| r.end_us()) {
                last.closed = true;
            }
        }
        (recs, fails)
    }
}

fn record_failed_connect(
    recs: &mut Vec<Rec>,
    fails: &mut Vec<FailRec>,
    t0: Instant,
    start: Instant,
    conn: u64,
    kind: Kind,
    error: String,
) {
    let (start_us, lat_us) = Rec::times(t0, start, start.elapsed());
    let rec = Rec {
        start_us,
        lat_us,
        pid: 0,
        kind,
        reused: false,
        conn,
        closed: true,
    };
    record(recs, fails, rec, Some(error));
}
