//! Counters that survive a reload. Each generation counts what it does, on
//! top of what the generations before it counted: the old process sends its
//! totals to the new one over the connection channel (protocol 2, feature
//! `counters`), once when the new one is ready and once more when it has
//! let go of everything, so a scrape of the new process never goes below
//! one of the old. Gauges (in flight, connections) are each process's own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to count a reload as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadResult {
    Ok,
    Failed,
    Refused,
}

const HANDOVER_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const DRAIN_BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

/// A histogram's state. Non-exhaustive, as more may be kept of it: an
/// app's test builds one from `Histogram::default()` and sets the fields.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Histogram {
    /// Upper bounds (seconds) with the cumulative count at or below each.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            buckets: bounds.iter().map(|b| (*b, 0)).collect(),
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, secs: f64) {
        for (le, n) in &mut self.buckets {
            if secs <= *le {
                *n += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    fn add(&mut self, other: &Histogram) {
        for ((le, n), (ole, on)) in self.buckets.iter_mut().zip(&other.buckets) {
            if le == ole {
                *n += on;
            }
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// A snapshot of every metric, for an app to expose (pid-server renders it
/// in Prometheus' text format at `/metrics`).
///
/// Non-exhaustive: new metrics are added as fields. An app's test starts
/// from `Metrics::default()` (every count zero, empty histograms) and sets
/// what it checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// This process's generation.
    pub generation: u32,
    /// Requests answered, by HTTP status, since the first generation.
    pub requests: Vec<(u16, u64)>,
    /// Requests in progress in this process.
    pub in_flight: usize,
    /// Connections open in this process.
    pub connections: usize,
    /// Of those, connections upgraded to another protocol (WebSockets).
    /// A leaving process waits for them (see [`crate::Closing`]).
    pub upgraded: usize,
    /// Reloads that handed over, since the first generation.
    pub reloads_ok: u64,
    /// Reloads whose new process failed (the old one kept serving).
    pub reloads_failed: u64,
    /// Reloads refused because one was under way.
    pub reloads_refused: u64,
    /// From the reload request to the new process owning the unit.
    pub handover_seconds: Histogram,
    /// How long an old process took to let go of its connections after a
    /// handover (or of a stop's drain).
    pub drain_seconds: Histogram,
    /// Connections moved to a new process.
    pub connections_moved: u64,
    /// Connections that were to move but were served to the end instead.
    pub connections_fell_back: u64,
    /// TLS handshakes that failed (not TLS, a protocol error, no common
    /// version or cipher) or timed out.
    pub tls_handshake_failures: u64,
    /// TLS handshakes the client left before they were done: it closed or
    /// reset the connection (a scanner, a TCP health check). Not failures:
    /// nothing was wrong with what either side said.
    pub tls_handshakes_abandoned: u64,
    /// HTTP/2 connections closed for a protocol error of the peer (a
    /// malformed frame, a violated limit).
    pub protocol_errors: u64,
    /// HTTP/2 responses held in this process: made, or waiting on their
    /// client's flow-control window (see [`crate::Config::http2_max_held_responses`]).
    pub http2_held_responses: usize,
    /// HTTP/2 connections closed because their responses waited on a
    /// client that did not read them for the stall timeout
    /// ([`crate::Config::http2_stall_timeout`]).
    pub http2_stalled_connections: u64,
    /// HTTP/2 requests answered 503 (empty) because the responses held
    /// reached a bound.
    pub http2_refused_streams: u64,
    /// Connections taken from systemd's file descriptor store at a start:
    /// idle connections a restart (or a crash) kept
    /// ([`crate::Config::fd_store_connections`]).
    pub connections_restored: u64,
    /// Idle connections in systemd's file descriptor store now, kept for a
    /// crash ([`crate::Config::fd_store_while_idle`]).
    pub connections_in_fd_store: usize,
}

/// The counting side.
#[derive(Debug)]
pub(crate) struct Totals {
    /// By status, 100..=599.
    requests: Vec<AtomicU64>,
    reloads: [AtomicU64; 3],
    moved: AtomicU64,
    fell_back: AtomicU64,
    tls_failures: AtomicU64,
    tls_abandoned: AtomicU64,
    protocol_errors: AtomicU64,
    http2_stalled: AtomicU64,
    http2_refused: AtomicU64,
    restored: AtomicU64,
    histograms: Mutex<(Histogram, Histogram)>,
    /// What the previous generations counted, as last received.
    base: Mutex<Option<Carried>>,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            requests: (100..600).map(|_| AtomicU64::new(0)).collect(),
            reloads: Default::default(),
            moved: AtomicU64::new(0),
            fell_back: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            tls_abandoned: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            http2_stalled: AtomicU64::new(0),
            http2_refused: AtomicU64::new(0),
            restored: AtomicU64::new(0),
            histograms: Mutex::new((
                Histogram::new(&HANDOVER_BUCKETS),
                Histogram::new(&DRAIN_BUCKETS),
            )),
            base: Mutex::new(None),
        }
    }
}

/// The totals one generation passes to the next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Carried {
    requests: Vec<(u16, u64)>,
    reloads: [u64; 3],
    moved: u64,
    fell_back: u64,
    tls_failures: u64,
    tls_abandoned: u64,
    protocol_errors: u64,
    http2_stalled: u64,
    http2_refused: u64,
    restored: u64,
    handover: Histogram,
    drain: Histogram,
}

impl Totals {
    pub(crate) fn request(&self, status: u16) {
        if let Some(c) = status
            .checked_sub(100)
            .and_then(|i| self.requests.get(i as usize))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn tls_handshake_failed(&self) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake_abandoned(&self) {
        self.tls_abandoned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn http2_stalled(&self) {
        self.http2_stalled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn restored(&self, n: usize) {
        self.restored.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn http2_refused(&self) {
        self.http2_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reload(&self, r: ReloadResult) {
        self.reloads[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handover(&self, secs: f64) {
        self.histograms
            .lock()
            .expect("metrics lock")
            .0
            .observe(secs);
    }

    pub(crate) fn drained(&self, secs: f64, moved: usize, fell_back: usize) {
        self.histograms
            .lock()
            .expect("metrics lock")
            .1
            .observe(secs);
        self.moved.fetch_add(moved as u64, Ordering::Relaxed);
        self.fell_back
            .fetch_add(fell_back as u64, Ordering::Relaxed);
    }

    /// Takes the previous generation's totals (the latest replaces the
    /// earlier: each is absolute).
    pub(crate) fn carry_over(&self, c: Carried) {
        *self.base.lock().expect("metrics lock") = Some(c);
    }

    /// This generation's totals, the previous ones' included.
    pub(crate) fn carried(&self) -> Carried {
        let (h, d) = self.histograms.lock().expect("metrics lock").clone();
        let mut c = Carried {
            requests: (100u16..600)
                .zip(&self.requests)
                .map(|(s, n)| (s, n.load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            reloads: std::array::from_fn(|i| self.reloads[i].load(Ordering::Relaxed)),
            moved: self.moved.load(Ordering::Relaxed),
            fell_back: self.fell_back.load(Ordering::Relaxed),
            tls_failures: self.tls_failures.load(Ordering::Relaxed),
            tls_abandoned: self.tls_abandoned.load(Ordering::Relaxed),
            protocol_errors: self.protocol_errors.load(Ordering::Relaxed),
            http2_stalled: self.http2_stalled.load(Ordering::Relaxed),
            http2_refused: self.http2_refused.load(Ordering::Relaxed),
            restored: self.restored.load(Ordering::Relaxed),
            handover: h,
            drain: d,
        };
        if let Some(b) = self.base.lock().expect("metrics lock").as_ref() {
            for (s, n) in &b.requests {
                match c.requests.iter_mut().find(|(cs, _)| cs == s) {
                    Some((_, cn)) => *cn += n,
                    None => c.requests.push((*s, *n)),
                }
            }
            c.requests.sort_unstable();
            for i in 0..3 {
                c.reloads[i] += b.reloads[i];
            }
            c.moved += b.moved;
            c.fell_back += b.fell_back;
            c.tls_failures += b.tls_failures;
            c.tls_abandoned += b.tls_abandoned;
            c.protocol_errors += b.protocol_errors;
            c.http2_stalled += b.http2_stalled;
            c.http2_refused += b.http2_refused;
            c.restored += b.restored;
            c.handover.add(&b.handover);
            c.drain.add(&b.drain);
        }
        c
    }

    pub(crate) fn snapshot(
        &self,
        generation: u32,
        in_flight: usize,
        connections: usize,
        upgraded: usize,
        http2_held: usize,
        in_fd_store: usize,
    ) -> Metrics {
        let c = self.carried();
        Metrics {
            generation,
            requests: c.requests,
            in_flight,
            connections,
            upgraded,
            reloads_ok: c.reloads[ReloadResult::Ok as usize],
            reloads_failed: c.reloads[ReloadResult::Failed as usize],
            reloads_refused: c.reloads[ReloadResult::Refused as usize],
            handover_seconds: c.handover,
            drain_seconds: c.drain,
            connections_moved: c.moved,
            connections_fell_back: c.fell_back,
            tls_handshake_failures: c.tls_failures,
            tls_handshakes_abandoned: c.tls_abandoned,
            protocol_errors: c.protocol_errors,
            http2_held_responses: http2_held,
            http2_stalled_connections: c.http2_stalled,
            http2_refused_streams: c.http2_refused,
            connections_restored: c.restored,
            connections_in_fd_store: in_fd_store,
        }
    }
}

impl Carried {
    /// As sent: one datagram, `counters` then a line per value. Unknown
    /// lines are ignored by the reader, so a later release can add some.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut s = String::from("counters\n");
        for (st, n) in &self.requests {
            s.push_str(&format!("requests {st} {n}\n"));
        }
        for (i, name) in ["ok", "failed", "refused"].iter().enumerate() {
            s.push_str(&format!("reloads {name} {}\n", self.reloads[i]));
        }
        s.push_str(&format!(
            "moved {}\nfell_back {}\n",
            self.moved, self.fell_back
        ));
        // Lines an older reader ignores.
        s.push_str(&format!(
            "tls_handshake_failures {}\nprotocol_errors {}\n",
            self.tls_failures, self.protocol_errors
        ));
        s.push_str(&format!(
            "tls_handshakes_abandoned {}\nhttp2_stalled {}\nhttp2_refused {}\nrestored {}\n",
            self.tls_abandoned, self.http2_stalled, self.http2_refused, self.restored
        ));
        for (name, h) in [("handover", &self.handover), ("drain", &self.drain)] {
            for (le, n) in &h.buckets {
                s.push_str(&format!("{name}_bucket {le} {n}\n"));
            }
            s.push_str(&format!("{name}_sum {}\n{name}_count {}\n", h.sum, h.count));
        }
        s.into_bytes()
    }

    /// Parses a `counters` datagram; `None` if it is not one.
    pub(crate) fn decode(datagram: &[u8]) -> Option<Carried> {
        let text = std::str::from_utf8(datagram).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "counters" {
            return None;
        }
        let mut c = Carried {
            requests: Vec::new(),
            reloads: [0; 3],
            moved: 0,
            fell_back: 0,
            tls_failures: 0,
            tls_abandoned: 0,
            protocol_errors: 0,
            http2_stalled: 0,
            http2_refused: 0,
            restored: 0,
            handover: Histogram::new(&HANDOVER_BUCKETS),
            drain: Histogram::new(&DRAIN_BUCKETS),
        };
        for line in lines {
            let w: Vec<&str> = line.split(' ').collect();
            match w[..] {
                ["requests", st, n] => {
                    let st: u16 = st.parse().ok().filter(|s| (100..600).contains(s))?;
                    c.requests.push((st, n.parse().ok()?));
                }
                ["reloads", which, n] => {
                    let i = ["ok", "failed", "refused"]
                        .iter()
                        .position(|x| *x == which)?;
                    c.reloads[i] = n.parse().ok()?;
                }
                ["moved", n] => c.moved = n.parse().ok()?,
                ["fell_back", n] => c.fell_back = n.parse().ok()?,
                ["tls_handshake_failures", n] => c.tls_failures = n.parse().ok()?,
                ["tls_handshakes_abandoned", n] => c.tls_abandoned = n.parse().ok()?,
                ["protocol_errors", n] => c.protocol_errors = n.parse().ok()?,
                ["http2_stalled", n] => c.http2_stalled = n.parse().ok()?,
                ["http2_refused", n] => c.http2_refused = n.parse().ok()?,
                ["restored", n] => c.restored = n.parse().ok()?,
                [name, le, n] if name.ends_with("_bucket") => {
                    let h = histogram(&mut c, name.trim_end_matches("_bucket"))?;
                    let le: f64 = le.parse().ok()?;
                    if let Some(b) = h.buckets.iter_mut().find(|(b, _)| *b == le) {
                        b.1 = n.parse().ok()?;
                    }
                }
                [name, v] if name.ends_with("_sum") => {
                    histogram(&mut c, name.trim_end_matches("_sum"))?.sum = v.parse().ok()?;
                }
                [name, v] if name.ends_with("_count") => {
                    histogram(&mut c, name.trim_end_matches("_count"))?.count = v.parse().ok()?;
                }
                // A later release's value: not ours to know.
                _ => {}
            }
        }
        c.requests.sort_unstable();
        Some(c)
    }
}

fn histogram<'a>(c: &'a mut Carried, name: &str) -> Option<&'a mut Histogram> {
    match name {
        "handover" => Some(&mut c.handover),
        "drain" => Some(&mut c.drain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_carry_over_and_round_trip() {
        let old = Totals::default();
        old.request(200);
        old.request(200);
        old.request(404);
        old.reload(ReloadResult::Ok);
        old.handover(0.3);
        old.drained(0.002, 5, 1);
        old.tls_handshake_failed();
        old.tls_handshake_abandoned();
        old.tls_handshake_abandoned();
        old.http2_stalled();
        old.http2_refused();
        old.http2_refused();
        old.restored(7);
        let sent = old.carried();
        assert_eq!(Carried::decode(&sent.encode()), Some(sent.clone()));
        let new = Totals::default();
        new.request(200);
        new.carry_over(sent);
        let m = new.snapshot(1, 0, 0, 0, 3, 0);
        assert_eq!(m.requests, vec![(200, 3), (404, 1)]);
        assert_eq!(
            (m.reloads_ok, m.connections_moved, m.connections_fell_back),
            (1, 5, 1)
        );
        assert_eq!(m.connections_restored, 7);
        assert_eq!(
            (m.tls_handshake_failures, m.tls_handshakes_abandoned),
            (1, 2)
        );
        assert_eq!(
            (
                m.http2_stalled_connections,
                m.http2_refused_streams,
                m.http2_held_responses
            ),
            (1, 2, 3)
        );
        assert_eq!(m.handover_seconds.count, 1);
        assert_eq!(m.handover_seconds.buckets[2], (0.25, 0));
        assert_eq!(m.handover_seconds.buckets[3], (0.5, 1));
        // Unknown lines are a later release's, ignored; junk is refused.
        assert!(Carried::decode(b"counters\nsomething new 1 2\n").is_some());
        assert_eq!(Carried::decode(b"counters\nrequests 99 1\n"), None);
        assert_eq!(Carried::decode(b"conn tcp 0\n"), None);
    }
}
