//! `h2load` (nghttp2's load generator, Debian's `nghttp2-client`) as a
//! second HTTP/2 client beside [`crate::h2`]: what it printed
//! ([`Summary`]), and per request what happened to it ([`Streams`], from
//! its `--log-file`). The bench (`benches/restarts/h2load.rs`) reads its
//! runs with the same [`Summary`].
//!
//! # What h2load's numbers mean (nghttp2 1.52)
//!
//! - *total*: `-n`. A request it never submitted, because the server's
//!   GOAWAY had come (h2load opens no new connection), is *failed* and
//!   *errored* but not *started*.
//! - *started*: submitted to its HTTP/2 session. That is not yet sent: the
//!   session writes HEADERS after the read it is in. When a GOAWAY comes
//!   in the same read as the response that made room for a request, the
//!   session refuses to open the stream (no new stream after a GOAWAY, RFC
//!   9113, 6.8), and h2load counts it *done* and *errored* though it never
//!   left the client.
//! - *done*: closed by the session, with a response or an error code.
//!   A stream still open when its connection ends is *errored*, not
//!   *done*.
//! - *succeeded*: done with a 2xx or 3xx status.
//!
//! So the summary cannot tell a request h2load never sent from a stream the
//! server took and never answered. Its log can: it has one line per
//! *done* request, `start µs, status, µs`, where the start is when the
//! HEADERS frame was written (0: never written) and the status -1 when no
//! response closed the stream.

use std::path::Path;

/// What h2load printed at the end of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// `requests: T total, S started, D done, OK succeeded, F failed, E
    /// errored, TO timeout`.
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// `status codes: N 2xx, …`.
    pub status_2xx: u64,
    /// `finished in 1.23s, …`.
    pub seconds: f64,
    /// `time for request:` max and mean, µs.
    pub request_max_us: f64,
    pub request_mean_us: f64,
    /// What it negotiated (TLS version, cipher, ALPN), as it says.
    pub negotiated: String,
}

/// "1.23ms", "456us", "1.5s" → µs.
fn duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// The number before `name` in a comma-separated list ("4 started").
fn field(list: &str, name: &str) -> Option<u64> {
    list.split(',')
        .map(str::trim)
        .find(|p| p.ends_with(name))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Summary {
    /// Reads h2load's output. An error (with its last lines) when the
    /// summary is not there: h2load could not connect or was cut short.
    pub fn parse(out: &str) -> Result<Summary, String> {
        let mut s = Summary::default();
        let (mut finished, mut requests, mut statuses) = (false, false, false);
        let mut negotiated = Vec::new();
        let cannot = |line: &str| format!("h2load: cannot read {line:?}");
        for line in out.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("finished in ") {
                s.seconds = rest
                    .split(',')
                    .next()
                    .and_then(duration_us)
                    .map(|us| us / 1e6)
                    .ok_or_else(|| cannot(line))?;
                finished = true;
            } else if let Some(rest) = line.strip_prefix("requests: ") {
                let get = |name| field(rest, name).ok_or_else(|| cannot(line));
                s.total = get("total")?;
                s.started = get("started")?;
                s.done = get("done")?;
                s.succeeded = get("succeeded")?;
                s.failed = get("failed")?;
                s.errored = get("errored")?;
                s.timeout = get("timeout")?;
                requests = true;
            } else if let Some(rest) = line.strip_prefix("status codes: ") {
                s.status_2xx = field(rest, "2xx").ok_or_else(|| cannot(line))?;
                statuses = true;
            } else if let Some(rest) = line.strip_prefix("time for request:") {
                let v: Vec<f64> = rest.split_whitespace().filter_map(duration_us).collect();
                if v.len() >= 3 {
                    s.request_max_us = v[1];
                    s.request_mean_us = v[2];
                }
            } else if let Some(p) = ["TLS Protocol: ", "Cipher: ", "Application protocol: "]
                .iter()
                .find_map(|p| line.strip_prefix(p))
            {
                negotiated.push(p.to_string());
            }
        }
        if !(finished && requests && statuses) {
            let tail: Vec<&str> = out
                .lines()
                .filter(|l| !l.trim().is_empty())
                .rev()
                .take(3)
                .collect();
            return Err(format!("h2load printed no summary: {tail:?}"));
        }
        s.negotiated = negotiated.join(" ");
        Ok(s)
    }

    /// Streams h2load started that were still open when their connection
    /// ended: no response, and no error code either (not *done*).
    pub fn abandoned(&self) -> u64 {
        self.started.saturating_sub(self.done)
    }
}

/// What happened to the requests of one run, from its `--log-file`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    /// Streams sent and answered with a status.
    pub answered: u64,
    /// Of those, answered with anything but 200.
    pub not_ok: u64,
    /// Streams whose HEADERS went out and that were closed without a
    /// response (refused, reset): the server's doing.
    pub sent_unanswered: u64,
    /// Requests started but never sent: a GOAWAY came first (see the
    /// module's doc). h2load's limit: it does not reconnect.
    pub never_sent: u64,
}

impl Streams {
    /// Reads a `--log-file`: `start µs \t status \t µs` a line.
    pub fn parse(log: &str) -> Result<Streams, String> {
        let mut s = Streams::default();
        for line in log.lines().filter(|l| !l.is_empty()) {
            let mut cols = line.split('\t');
            let start: Option<u64> = cols.next().and_then(|c| c.parse().ok());
            let status: Option<i64> = cols.next().and_then(|c| c.parse().ok());
            match (start, status) {
                (Some(0), Some(-1)) => s.never_sent += 1,
                (Some(_), Some(-1)) => s.sent_unanswered += 1,
                (Some(_), Some(code)) => {
                    s.answered += 1;
                    if code != 200 {
                        s.not_ok += 1;
                    }
                }
                _ => return Err(format!("h2load log: cannot read {line:?}")),
            }
        }
        Ok(s)
    }

    pub fn read(path: &Path) -> Result<Streams, String> {
        let log = std::fs::read_to_string(path)
            .map_err(|e| format!("h2load log {}: {e}", path.display()))?;
        Streams::parse(&log)
    }

    pub fn add(&mut self, other: Streams) {
        self.answered += other.answered;
        self.not_ok += other.not_ok;
        self.sent_unanswered += other.sent_unanswered;
        self.never_sent += other.never_sent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "starting benchmark...
Application protocol: h2c
progress: 100% done

finished in 834us, 2398.08 req/s, 233.02KB/s
requests: 2000 total, 1990 started, 1989 done, 1985 succeeded, 15 failed, 15 errored, 0 timeout
status codes: 1985 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 199B (199) total, 58B (58) headers (space savings 69.79%), 50B (50) data
                     min         max         mean         sd        +/- sd
time for request:       64us       345us       204us       198us   100.00%
";

    #[test]
    fn the_summary_is_read() {
        let s = Summary::parse(OUT).unwrap();
        assert_eq!(
            (s.total, s.started, s.done, s.succeeded, s.failed, s.errored),
            (2000, 1990, 1989, 1985, 15, 15)
        );
        assert_eq!(s.status_2xx, 1985);
        assert_eq!(s.abandoned(), 1);
        assert!((s.seconds - 834e-6).abs() < 1e-9);
        assert_eq!((s.request_max_us, s.request_mean_us), (345.0, 204.0));
        assert_eq!(s.negotiated, "h2c");
        assert!(Summary::parse("connect: Connection refused\n").is_err());
    }

    #[test]
    fn the_log_tells_never_sent_from_unanswered() {
        let log = "1764871000000001\t200\t120\n\
                   0\t-1\t8223161544\n\
                   1764871000000002\t-1\t300\n\
                   1764871000000003\t503\t90\n";
        let s = Streams::parse(log).unwrap();
        assert_eq!(
            s,
            Streams {
                answered: 2,
                not_ok: 1,
                sent_unanswered: 1,
                never_sent: 1
            }
        );
        assert!(Streams::parse("garbage\n").is_err());
    }
}
