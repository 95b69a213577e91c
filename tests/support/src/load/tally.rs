//! What a load saw: every request counted by outcome, answering PID and
//! client mode, and for each kept connection the PIDs that answered on it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::http::Response;

/// How a load client sends its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Reuses one connection, request after request with the load's pace,
    /// until the server closes it or a request fails; then opens another.
    KeepAlive,
    /// One request per new connection, which asks the server to close it.
    OneShot,
    /// Like [`Mode::KeepAlive`], idling a random pause (0.3–3 s unless the
    /// load says otherwise) between two requests on the same connection:
    /// the connections a reload finds idle.
    Paused,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::KeepAlive => "keep-alive",
            Mode::OneShot => "one-shot",
            Mode::Paused => "paused",
        })
    }
}

/// How a kept connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// Still open when the load stopped (or when the tally was taken).
    Open,
    /// The server said `Connection: close` (not a failure).
    Closed,
    /// A request on it failed (a failure, of this kind).
    Failed(String),
}

/// One connection a keep-alive or paused client kept: which client socket
/// it was and, in order, the PIDs that answered on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub mode: Mode,
    /// Which client of the load (0-based, in the order the load started them).
    pub client: usize,
    /// The client side's address: the same socket all along.
    pub local: SocketAddr,
    /// Answering PIDs in order, each with how many answers in a row.
    pub runs: Vec<(u32, u64)>,
    pub end: ConnEnd,
}

impl ConnRecord {
    /// The PIDs that answered on this socket, in order (a PID twice when
    /// another answered in between).
    pub fn pids(&self) -> Vec<u32> {
        self.runs.iter().map(|(pid, _)| *pid).collect()
    }

    /// Requests answered with a PID on this socket.
    pub fn answered(&self) -> u64 {
        self.runs.iter().map(|(_, n)| n).sum()
    }

    /// How often the answering PID changed on this socket.
    pub fn pid_changes(&self) -> usize {
        self.runs.len().saturating_sub(1)
    }

    /// Answered by `from`, and next, on this same socket, by `to`: the
    /// connection moved from `from` to its successor.
    pub fn moved(&self, from: u32, to: u32) -> bool {
        self.runs.windows(2).any(|w| w[0].0 == from && w[1].0 == to)
    }

    fn answer(&mut self, pid: u32) {
        match self.runs.last_mut() {
            Some((last, n)) if *last == pid => *n += 1,
            _ => self.runs.push((pid, 1)),
        }
    }
}

/// What the kept connections of a load did around PID changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnReport {
    /// Kept connections opened.
    pub connections: usize,
    /// Connections answered by one PID and later, on the same socket, by
    /// another.
    pub kept_across_pid_change: usize,
    /// Connections that saw a PID change or were closed (by the server or
    /// by a failure): the ones a reload could have moved.
    pub saw_change_or_closed: usize,
    /// Of those, closed by the server's `Connection: close`.
    pub closed: usize,
    /// Of those, ended by a failed request.
    pub failed: usize,
}

impl fmt::Display for ConnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kept across a PID change / {} saw a PID change or were closed \
             ({} closed by the server, {} by a failure; {} connections)",
            self.kept_across_pid_change,
            self.saw_change_or_closed,
            self.closed,
            self.failed,
            self.connections
        )
    }
}

/// How many failures are kept in full in [`Tally::examples`].
const EXAMPLES: usize = 20;

/// What a load saw so far.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Requests sent (every one is either ok or a failure).
    pub sent: u64,
    /// Answered 200 (naming the PID that answered, for `/`).
    pub ok: u64,
    pub ok_keep_alive: u64,
    pub ok_one_shot: u64,
    pub ok_paused: u64,
    /// 200s on a connection that had answered before.
    pub ok_reused: u64,
    /// Connections the keep-alive and paused clients opened.
    pub connections: u64,
    /// Failures by kind: `refused`, `reset`, `closed` (the connection ended
    /// before a whole response), `timeout`, `bad response`, `status 503`,
    /// `unexpected body`, …, with ` on reused connection` when the
    /// connection had answered before.
    pub failures: BTreeMap<String, u64>,
    /// The first few failures in full: mode, kind, and the error.
    pub examples: Vec<String>,
    /// Requests answered, by PID.
    pub by_pid: BTreeMap<u32, u64>,
    /// PIDs in the order they first answered.
    pub pid_order: Vec<u32>,
    /// Every connection a keep-alive or paused client kept, in the order
    /// they were opened.
    pub conns: Vec<ConnRecord>,
    /// Clients that stopped on their own bound (requests or time) before
    /// the load was finished.
    pub exhausted: u64,
    /// From the start of the load until its last client ended (or until
    /// the tally was taken).
    pub elapsed: Duration,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn failed_where(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.failures
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, n)| n)
            .sum()
    }

    /// Connections refused.
    pub fn refused(&self) -> u64 {
        self.failed_where(|k| k.starts_with("refused"))
    }

    /// Connections reset.
    pub fn resets(&self) -> u64 {
        self.failed_where(|k| k.starts_with("reset"))
    }

    /// Failures on a connection that had answered before.
    pub fn failed_on_reused(&self) -> u64 {
        self.failed_where(|k| k.ends_with(" on reused connection"))
    }

    /// Kept connections answered by `from` and next, on the same socket, by
    /// `to`.
    pub fn moved(&self, from: u32, to: u32) -> usize {
        self.conns.iter().filter(|c| c.moved(from, to)).count()
    }

    /// The kept connections around PID changes.
    pub fn conn_report(&self) -> ConnReport {
        let mut r = ConnReport {
            connections: self.conns.len(),
            ..ConnReport::default()
        };
        for c in &self.conns {
            let changed = c.pid_changes() > 0;
            r.kept_across_pid_change += changed as usize;
            match c.end {
                ConnEnd::Open => r.saw_change_or_closed += changed as usize,
                ConnEnd::Closed => {
                    r.saw_change_or_closed += 1;
                    r.closed += 1;
                }
                ConnEnd::Failed(_) => {
                    r.saw_change_or_closed += 1;
                    r.failed += 1;
                }
            }
        }
        r
    }

    /// One line: requests by outcome and mode, failures by kind, answers
    /// by PID, and the kept connections around PID changes.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} requests in {:.1} s: {} ok ({} keep-alive and {} paused on {} connections, \
             {} of them on a reused connection; {} one-shot), {} failed {:?}; answered by {:?}",
            self.sent,
            self.elapsed.as_secs_f32(),
            self.ok,
            self.ok_keep_alive,
            self.ok_paused,
            self.connections,
            self.ok_reused,
            self.ok_one_shot,
            self.failed(),
            self.failures,
            self.by_pid
        );
        if !self.conns.is_empty() {
            s.push_str(&format!("; kept connections: {}", self.conn_report()));
        }
        s
    }

    /// Counts one request. `reused`: it went out on a connection that had
    /// answered before. `expect_pid`: a 200 must name the PID that
    /// answered. Returns the answering PID, or the failure's kind.
    pub(crate) fn count(
        &mut self,
        mode: Mode,
        r: &io::Result<Response>,
        reused: bool,
        expect_pid: bool,
    ) -> Result<Option<u32>, String> {
        self.sent += 1;
        let (kind, detail) = match r {
            Ok(resp) if resp.status == 200 && (resp.pid().is_some() || !expect_pid) => {
                self.ok += 1;
                self.ok_reused += resp.reused as u64;
                *match mode {
                    Mode::KeepAlive => &mut self.ok_keep_alive,
                    Mode::OneShot => &mut self.ok_one_shot,
                    Mode::Paused => &mut self.ok_paused,
                } += 1;
                let pid = resp.pid();
                if let Some(pid) = pid {
                    *self.by_pid.entry(pid).or_default() += 1;
                    if !self.pid_order.contains(&pid) {
                        self.pid_order.push(pid);
                    }
                }
                return Ok(pid);
            }
            Ok(resp) if resp.status == 200 => ("unexpected body".to_string(), format!("{resp:?}")),
            Ok(resp) => (format!("status {}", resp.status), format!("{resp:?}")),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => "refused".to_string(),
                    io::ErrorKind::ConnectionReset => "reset".into(),
                    io::ErrorKind::ConnectionAborted => "aborted".into(),
                    io::ErrorKind::BrokenPipe => "broken pipe".into(),
                    io::ErrorKind::UnexpectedEof => "closed".into(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
                    io::ErrorKind::InvalidData => "bad response".into(),
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
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!("{mode}: {kind}: {detail}"));
        }
        *self.failures.entry(kind.clone()).or_default() += 1;
        Err(kind)
    }

    /// A kept connection was opened; returns its index in `conns`.
    pub(crate) fn open_conn(&mut self, mode: Mode, client: usize, local: SocketAddr) -> usize {
        self.connections += 1;
        self.conns.push(ConnRecord {
            mode,
            client,
            local,
            runs: Vec::new(),
            end: ConnEnd::Open,
        });
        self.conns.len() - 1
    }

    /// What a request on kept connection `i` got.
    pub(crate) fn on_conn(
        &mut self,
        i: usize,
        outcome: &Result<Option<u32>, String>,
        closed: bool,
    ) {
        let c = &mut self.conns[i];
        match outcome {
            Ok(pid) => {
                if let Some(pid) = pid {
                    c.answer(*pid);
                }
                if closed {
                    c.end = ConnEnd::Closed;
                }
            }
            Err(kind) => c.end = ConnEnd::Failed(kind.clone()),
        }
    }
}
