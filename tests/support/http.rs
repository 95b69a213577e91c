//! A small HTTP/1.1 client and a bounded load generator for the tests.
//!
//! Deliberately strict: a request that fails on a reused keep-alive
//! connection is a failure, never retried, so a server that closes
//! connections under a client's feet cannot hide behind the client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The server asked to close the connection.
    pub close: bool,
}

impl Response {
    /// The PID in `OK. Handled by PID: <pid>`.
    pub fn pid(&self) -> Option<u32> {
        self.body
            .trim()
            .strip_prefix("OK. Handled by PID: ")
            .and_then(|p| p.parse().ok())
    }
}

/// A keep-alive connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    /// Requests answered on this connection so far.
    pub served: usize,
    pub closed: bool,
}

impl Conn {
    pub fn open(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s),
            served: 0,
            closed: false,
        })
    }

    /// The client side's address: the same while the connection lives.
    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().unwrap()
    }

    /// Sends one GET and reads the answer.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "closed by server",
            ));
        }
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
        )?;
        let r = read_response(&mut self.reader)?;
        self.served += 1;
        if r.close {
            self.closed = true;
        }
        Ok(r)
    }
}

fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut len = None;
    let mut close = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse::<usize>().ok();
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            } else if k == "transfer-encoding" {
                return Err(bad(format!("unexpected transfer-encoding {v}")));
            }
        }
    }
    let len = len.ok_or_else(|| bad("no content-length".into()))?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// One request on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    Conn::open(addr, Duration::from_secs(10))?.get(path)
}

/// Client behaviour under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reuse a connection until the server closes it (then open another).
    KeepAlive,
    /// A new connection for every request.
    NewConnection,
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    /// Failures by kind ("status 503", "refused", "reset on reused connection", ...).
    pub failures: BTreeMap<String, usize>,
    /// Requests answered, by PID.
    pub by_pid: BTreeMap<u32, usize>,
    /// PIDs in the order they first answered.
    pub pid_order: Vec<u32>,
    /// The first few failures in full.
    pub examples: Vec<String>,
    /// How long the load ran (set by `join`).
    pub elapsed: Duration,
}

impl Tally {
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    pub fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
        for e in o.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
        for (k, v) in o.by_pid {
            *self.by_pid.entry(k).or_default() += v;
        }
        for p in o.pid_order {
            if !self.pid_order.contains(&p) {
                self.pid_order.push(p);
            }
        }
        self.elapsed = self.elapsed.max(o.elapsed);
    }

    /// One line: sent, ok, failures, requests per PID.
    pub fn summary(&self) -> String {
        format!(
            "{} requests in {:.1} s: {} ok, {} failed {:?}; by PID {:?}",
            self.sent,
            self.elapsed.as_secs_f32(),
            self.ok,
            self.failed(),
            self.failures,
            self.by_pid
        )
    }

    /// `expect_pid`: a 200 must name the PID that answered (`GET /`).
    fn record(&mut self, r: io::Result<Response>, reused: bool, expect_pid: bool) {
        self.sent += 1;
        let failure = match r {
            Ok(resp) if resp.status == 200 => match resp.pid() {
                Some(pid) => {
                    self.ok += 1;
                    *self.by_pid.entry(pid).or_default() += 1;
                    if !self.pid_order.contains(&pid) {
                        self.pid_order.push(pid);
                    }
                    return;
                }
                None if !expect_pid => {
                    self.ok += 1;
                    return;
                }
                None => ("unexpected body".to_string(), format!("{resp:?}")),
            },
            Ok(resp) => (format!("status {}", resp.status), format!("{resp:?}")),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => "refused".to_string(),
                    io::ErrorKind::ConnectionReset => "reset".into(),
                    io::ErrorKind::UnexpectedEof => "closed".into(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
                    k => format!("{k:?}"),
                };
                let kind = if reused {
                    format!("{kind} on reused connection")
                } else {
                    kind
                };
                (kind, e.to_string())
            }
        };
        if self.examples.len() < 10 {
            self.examples.push(format!("{}: {}", failure.0, failure.1));
        }
        *self.failures.entry(failure.0).or_default() += 1;
    }
}

/// A load run in the background: `threads` clients in `mode`, until `stop`
/// is called, `max_requests` are sent in all, or `max_time` passes.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Tally>>,
}

impl Load {
    pub fn start(
        addr: SocketAddr,
        path: &'static str,
        threads: usize,
        mode: Mode,
        max_requests: usize,
        max_time: Duration,
    ) -> Load {
        Load::paced(
            addr,
            path,
            threads,
            mode,
            max_requests,
            max_time,
            Duration::ZERO,
        )
    }

    /// Like `start`, with `pace` between two requests of a client (a steady
    /// load rather than a flood, where containers share the two cores).
    pub fn paced(
        addr: SocketAddr,
        path: &'static str,
        threads: usize,
        mode: Mode,
        max_requests: usize,
        max_time: Duration,
        pace: Duration,
    ) -> Load {
        let expect_pid = path == "/";
        let stop = Arc::new(AtomicBool::new(false));
        let per_thread = max_requests.div_ceil(threads);
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let deadline = started + max_time;
                    let mut t = Tally::default();
                    let mut conn: Option<Conn> = None;
                    while t.sent < per_thread
                        && Instant::now() < deadline
                        && !stop.load(Ordering::Relaxed)
                    {
                        match mode {
                            Mode::NewConnection => {
                                let r = get(addr, path);
                                t.record(r, false, expect_pid);
                            }
                            Mode::KeepAlive => {
                                if conn.as_ref().is_none_or(|c| c.closed) {
                                    match Conn::open(addr, Duration::from_secs(10)) {
                                        Ok(c) => conn = Some(c),
                                        Err(e) => {
                                            t.record(Err(e), false, expect_pid);
                                            std::thread::sleep(pace);
                                            continue;
                                        }
                                    }
                                }
                                let c = conn.as_mut().unwrap();
                                let reused = c.served > 0;
                                let r = c.get(path);
                                if r.is_err() {
                                    conn = None;
                                }
                                t.record(r, reused, expect_pid);
                            }
                        }
                        std::thread::sleep(pace);
                    }
                    t.elapsed = started.elapsed();
                    t
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// Stops the clients and sums what they saw.
    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until the clients have sent their requests (or run out of
    /// time), and sums what they saw.
    pub fn join(mut self) -> Tally {
        let mut all = Tally::default();
        for h in std::mem::take(&mut self.handles) {
            all.merge(h.join().expect("load thread panicked"));
        }
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
