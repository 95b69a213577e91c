//! The load generator: client threads sending `GET` to a server under test,
//! each bounded in requests and in time, counted in one shared [`Tally`]
//! that a test can watch while the load runs.
//!
//! ```ignore
//! let load = Load::to(addr)
//!     .keep_alive(3)
//!     .one_shot(2)
//!     .paused(8) // idle 0.3–3 s between two requests on a connection
//!     .pace(Duration::from_micros(500))
//!     .max_requests(100_000)
//!     .max_time(Duration::from_secs(60))
//!     .start();
//! load.wait_answers_from(pid, 200, WAIT);
//! // ... reload ...
//! let t = load.finish();
//! let moved = t.moved(old, new); // kept connections answered by old, then new
//! eprintln!("{}", t.summary());
//! ```
//!
//! Nothing is retried: a failed request is counted, and a keep-alive or
//! paused client then opens a new connection for its next request. A
//! `Connection: close` also makes it open a new one, and is not a failure.

mod tally;

pub use tally::{ConnEnd, ConnRecord, ConnReport, Mode, Tally};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{self, Client};

/// What a load is to do; made by [`Load::to`], started by [`LoadBuilder::start`].
#[derive(Debug, Clone)]
pub struct LoadBuilder {
    addr: SocketAddr,
    path: String,
    keep_alive: usize,
    one_shot: usize,
    paused: usize,
    pace: Duration,
    pause: (Duration, Duration),
    max_requests: u64,
    max_time: Duration,
    timeout: Duration,
    netns: Option<PathBuf>,
}

/// The pause of a paused client between two requests unless
/// [`LoadBuilder::pause`] says otherwise: long enough that a draining
/// server finds the connection idle, short enough to come back within a
/// reload.
pub const PAUSE: (Duration, Duration) = (Duration::from_millis(300), Duration::from_secs(3));

impl LoadBuilder {
    /// The path every client asks for (default `/`). For `/` and `/slow`,
    /// a 200 must name the PID that answered.
    pub fn path(&mut self, path: &str) -> &mut Self {
        self.path = path.to_string();
        self
    }

    /// `n` clients in [`Mode::KeepAlive`].
    pub fn keep_alive(&mut self, n: usize) -> &mut Self {
        self.keep_alive = n;
        self
    }

    /// `n` clients in [`Mode::OneShot`].
    pub fn one_shot(&mut self, n: usize) -> &mut Self {
        self.one_shot = n;
        self
    }

    /// `n` clients in [`Mode::Paused`]: `n` kept connections.
    pub fn paused(&mut self, n: usize) -> &mut Self {
        self.paused = n;
        self
    }

    /// Between two requests of a keep-alive or one-shot client (default
    /// none): a steady load rather than a flood, where the server, systemd
    /// and the test share two cores.
    pub fn pace(&mut self, pace: Duration) -> &mut Self {
        self.pace = pace;
        self
    }

    /// A paused client idles a random time in `min..=max` between two
    /// requests (default [`PAUSE`]).
    pub fn pause(&mut self, min: Duration, max: Duration) -> &mut Self {
        assert!(min <= max, "pause {min:?}..={max:?}");
        self.pause = (min, max);
        self
    }

    /// Requests in all, shared evenly by the clients (default 1 000 000).
    pub fn max_requests(&mut self, n: u64) -> &mut Self {
        self.max_requests = n;
        self
    }

    /// How long a client runs at most (default 60 s).
    pub fn max_time(&mut self, d: Duration) -> &mut Self {
        self.max_time = d;
        self
    }

    /// Connect, write and read timeout of each request (default
    /// [`http::TIMEOUT`]).
    pub fn timeout(&mut self, d: Duration) -> &mut Self {
        self.timeout = d;
        self
    }

    /// The clients run in the network namespace at `path` (one the test
    /// made; `addr` is then that namespace's loopback).
    pub fn netns(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.netns = Some(path.into());
        self
    }

    /// Starts the clients.
    pub fn start(&self) -> Load {
        let modes: Vec<Mode> = [
            (Mode::KeepAlive, self.keep_alive),
            (Mode::OneShot, self.one_shot),
            (Mode::Paused, self.paused),
        ]
        .into_iter()
        .flat_map(|(mode, n)| std::iter::repeat_n(mode, n))
        .collect();
        assert!(!modes.is_empty(), "a load without clients");
        let quota = self.max_requests.div_ceil(modes.len() as u64);
        let started = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tally: Tally::default(),
                running: modes.len(),
            }),
            changed: Condvar::new(),
            stop: Mutex::new(false),
            stopping: Condvar::new(),
            started,
        });
        let spec = Arc::new(self.clone());
        let handles = modes
            .into_iter()
            .enumerate()
            .map(|(index, mode)| {
                let (shared, spec) = (shared.clone(), spec.clone());
                thread::Builder::new()
                    .name(format!("load-{mode}-{index}"))
                    .spawn(move || {
                        run_client(&shared, &spec, mode, index, quota, started + spec.max_time)
                    })
                    .expect("start a load thread")
            })
            .collect();
        Load {
            shared,
            handles,
            bound: self.max_time + self.timeout * 3 + Duration::from_secs(5),
            stop_bound: self.timeout * 3 + Duration::from_secs(5),
        }
    }
}

struct State {
    tally: Tally,
    /// Clients that have not ended yet.
    running: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled after every request counted and when a client ends (for
    /// the test's waits; clients never wait on it).
    changed: Condvar,
    stop: Mutex<bool>,
    /// Signalled once when the load is told to stop: wakes pausing clients.
    stopping: Condvar,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update<T>(&self, f: impl FnOnce(&mut Tally) -> T) -> T {
        let v = f(&mut self.lock().tally);
        self.changed.notify_all();
        v
    }

    fn stopped(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_stop(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stopping.notify_all();
    }

    /// Waits `d` unless the load is stopped first; true if it was.
    fn pause(&self, d: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        let (stop, _) = self
            .stopping
            .wait_timeout_while(stop, d, |stopped| !*stopped)
            .unwrap_or_else(|p| p.into_inner());
        *stop
    }
}

/// Marks a client ended when it returns or panics.
struct Ended<'a> {
    shared: &'a Shared,
    exhausted: bool,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.running -= 1;
        s.tally.exhausted += self.exhausted as u64;
        s.tally.elapsed = s.tally.elapsed.max(self.shared.started.elapsed());
        drop(s);
        self.shared.changed.notify_all();
    }
}

fn run_client(
    shared: &Shared,
    spec: &LoadBuilder,
    mode: Mode,
    index: usize,
    quota: u64,
    deadline: Instant,
) {
    let mut ended = Ended {
        shared,
        exhausted: false,
    };
    if let Some(ns) = &spec.netns {
        crate::netns::enter(ns);
    }
    let expect_pid = spec.path == "/" || spec.path.starts_with("/slow?");
    let mut client = Client::with_timeout(spec.addr, spec.timeout);
    let mut rng = fastrand::Rng::new();
    // The kept connection's record in the tally.
    let mut record: Option<usize> = None;
    let mut sent = 0u64;
    loop {
        if shared.stopped() {
            break;
        }
        if sent >= quota || Instant::now() >= deadline {
            ended.exhausted = true;
            break;
        }
        sent += 1;
        if mode == Mode::OneShot {
            let r = http::get_timeout(spec.addr, &spec.path, spec.timeout);
            let _ = shared.update(|t| t.count(mode, &r, false, expect_pid));
        } else {
            let reused = client.is_connected();
            let opened_before = client.connections();
            let r = client.get(&spec.path);
            let opened = client.connections() > opened_before;
            let outcome = shared.update(|t| {
                if opened {
                    let local = client.local_addr().expect("a connection was opened");
                    record = Some(t.open_conn(mode, index, local));
                }
                let outcome = t.count(mode, &r, reused, expect_pid);
                if let Some(i) = record {
                    t.on_conn(i, &outcome, !client.is_connected());
                }
                outcome
            });
            // After a failure, the next request goes out on a new
            // connection (never a retry of this one).
            if outcome.is_err() {
                client.disconnect();
            }
            if !client.is_connected() {
                record = None;
            }
        }
        let wait = match mode {
            Mode::Paused => {
                let (min, max) = spec.pause;
                pause_in(&mut rng, min, max)
            }
            _ => spec.pace,
        };
        let wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        if !wait.is_zero() && shared.pause(wait) {
            break;
        }
    }
}

/// Load clients running in the background. Dropping it stops them without
/// waiting (a test that panics mid-load).
pub struct Load {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// How long [`Load::join`] may take: the clients' time bound, plus a
    /// request in flight.
    bound: Duration,
    /// How long [`Load::finish`] may take: a request in flight.
    stop_bound: Duration,
}

impl Load {
    /// A load on `addr` (loopback: the host's, or a test-made namespace's),
    /// to be configured and started.
    pub fn to(addr: SocketAddr) -> LoadBuilder {
        LoadBuilder {
            addr,
            path: "/".to_string(),
            keep_alive: 0,
            one_shot: 0,
            paused: 0,
            pace: Duration::ZERO,
            pause: PAUSE,
            max_requests: 1_000_000,
            max_time: Duration::from_secs(60),
            timeout: http::TIMEOUT,
            netns: None,
        }
    }

    /// What the load saw so far (kept connections still open show as
    /// [`ConnEnd::Open`]).
    pub fn snapshot(&self) -> Tally {
        let s = self.shared.lock();
        let mut t = s.tally.clone();
        if s.running > 0 {
            t.elapsed = self.shared.started.elapsed();
        }
        t
    }

    /// Waits until `pred` holds for the tally and returns it; panics after
    /// `bound`, or as soon as every client has ended without it holding.
    pub fn wait_for(&self, what: &str, bound: Duration, pred: impl Fn(&Tally) -> bool) -> Tally {
        let deadline = Instant::now() + bound;
        let mut s = self.shared.lock();
        loop {
            if pred(&s.tally) {
                return s.tally.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.running == 0 {
                let why = if s.running == 0 {
                    "every load client has ended".to_string()
                } else {
                    format!("waited {bound:?}")
                };
                panic!(
                    "{why} without {what}: {}\nfirst failures:\n  {}",
                    s.tally.summary(),
                    s.tally.examples.join("\n  ")
                );
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits (at most `bound`) until `pid` answered at least `n` requests.
    pub fn wait_answers_from(&self, pid: u32, n: u64, bound: Duration) -> Tally {
        self.wait_for(
            &format!("{n} answers from PID {pid} in the load"),
            bound,
            |t| t.by_pid.get(&pid).copied().unwrap_or(0) >= n,
        )
    }

    /// Waits (at most `bound`) until the load has had `n` more answers than
    /// `since`.
    pub fn wait_more(&self, since: &Tally, n: u64, bound: Duration) -> Tally {
        self.wait_for(&format!("{n} more answers"), bound, |t| {
            t.ok >= since.ok + n
        })
    }

    /// Stops the clients (a pausing client at once, one with a request in
    /// flight when it is answered) and returns what they saw.
    pub fn finish(self) -> Tally {
        self.shared.request_stop();
        let bound = self.stop_bound;
        self.end(bound)
    }

    /// Waits until the clients have sent their requests or run out of time,
    /// and returns what they saw.
    pub fn join(self) -> Tally {
        let bound = self.bound;
        self.end(bound)
    }

    fn end(mut self, bound: Duration) -> Tally {
        let deadline = Instant::now() + bound;
        let mut s = self.shared.lock();
        while s.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} load client(s) still running after {bound:?}: {}",
                s.running,
                s.tally.summary()
            );
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let tally = s.tally.clone();
        drop(s);
        for h in std::mem::take(&mut self.handles) {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
        tally
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.request_stop();
    }
}

/// A paused client's idle time: uniform in `min..=max`, at microsecond
/// resolution. The tests draw from an unseeded `rng`, the benchmark from
/// one seeded per connection (`--seed`), so a run's pauses repeat.
pub fn pause_in(rng: &mut fastrand::Rng, min: Duration, max: Duration) -> Duration {
    Duration::from_micros(rng.u64(min.as_micros() as u64..=max.as_micros() as u64))
}
