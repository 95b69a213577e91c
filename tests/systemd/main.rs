//! pid-server under a real systemd, booted in a `systemd-nspawn` container
//! by the support crate's `nspawn` harness: every case on Debian 12's
//! systemd 252 and on Debian 13's 257 (`case::debian12_systemd252`,
//! `case::debian13_systemd257`, made by `each_release!`), one module per
//! thing the operator does: socket activation, reloads under load, failed
//! reloads, the notify-reload variant, stops and their drains, restarts,
//! the journal, the watchdog, the sandbox, TLS; and `harness`, the container
//! harness itself.
//!
//! Every test boots a container of its own (about a second) from its
//! release's debootstrap tree (made on first use, cached), in a network
//! namespace of its own, so none depends on another's leftovers and they
//! may run side by side; the two versions of a case are next to each other
//! in the test order and so run at the same time. Waits poll a state with a
//! bound; load loops are bounded in requests and in time; all traffic goes
//! to the loopback of the container's namespace. Each case prints its wall
//! time (and the load tests their request counts), tagged with the systemd
//! version, straight to stderr, so it shows without `--nocapture` too.

mod activation;
mod config;
mod environment;
mod failed_reload;
mod faults;
mod fdstore;
mod harness;
mod journal;
mod notify_reload;
mod reload;
mod restart;
mod sandbox;
mod stop;
mod tls;
mod watchdog;

use std::io;
use std::path::PathBuf;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pid_server_test_support::cmd::text;
use pid_server_test_support::http::{self, Response};
use pid_server_test_support::load::LoadBuilder;
use pid_server_test_support::nspawn::{self, BootOptions, Container};
use pid_server_test_support::report::{self, CaseTimer};
use pid_server_test_support::{Load, Release, Tally, netns, wait};

const BIN: &str = env!("CARGO_BIN_EXE_pid-server");

const SERVICE: &str = "pid-server.service";
const SOCKET: &str = "pid-server.socket";
const SERVICE_DROPIN_DIR: &str = "/etc/systemd/system/pid-server.service.d";

/// Bound on waiting for a process to exit, a unit state, a journal entry.
const WAIT: Duration = Duration::from_secs(20);
/// Timeouts of one request of the load and of the probes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn binary() -> PathBuf {
    PathBuf::from(BIN)
}

/// The `[systemd 257]` that starts the lines a case prints.
fn tag(release: Release) -> &'static str {
    match release {
        Release::Bookworm => "[systemd 252]",
        Release::Trixie => "[systemd 257]",
    }
}

/// Writes to fd 2 in one go (`eprintln!` is captured by the test harness).
fn say(release: Release, msg: &str) {
    report::say(&format!("{} {msg}", tag(release)));
}

/// Prints the case's wall time when it ends, passed or not.
fn timer(release: Release, case: &'static str) -> CaseTimer {
    CaseTimer::start(tag(release), case)
}

/// Whether `test` can run on `release` here; if not, says SKIPPED (or
/// panics under CI).
fn can_run(test: &str, release: Release) -> bool {
    nspawn::require_or_skip_release(test, release)
}

// ---------------------------------------------------------------------------
// Container helpers
// ---------------------------------------------------------------------------

/// The socket's port: the harness moves it to `127.0.0.1:8080` in the
/// container's own network namespace.
const PORT: u16 = 8080;

/// Boots `release`'s tree with the repo's units (plus `dropins`: file name
/// in `pid-server.service.d/`, contents), checks that its systemd is the
/// release's, and starts pid-server.socket only.
fn boot(release: Release, dropins: &[(&str, &str)]) -> Container {
    let c = boot_stopped(release, dropins);
    c.systemctl_ok(&["start", SOCKET]);
    c
}

/// [`boot`] without starting the socket.
fn boot_stopped(release: Release, dropins: &[(&str, &str)]) -> Container {
    let mut opts = BootOptions::release(binary(), PORT, release);
    for (name, contents) in dropins {
        opts = opts.dropin(&format!("{SERVICE_DROPIN_DIR}/{name}"), contents);
    }
    let c = Container::boot(&opts);
    assert_eq!(
        c.systemd_version(),
        release.systemd(),
        "the {} tree's systemd",
        release.suite()
    );
    c
}

/// The notify-reload drop-in's file name in `pid-server.service.d/`.
const NOTIFY_RELOAD_DROPIN: &str = "notify-reload.conf";

/// `systemd/notify-reload/notify-reload.conf`, as shipped.
fn notify_reload_dropin() -> String {
    let p = pid_server_test_support::repo().join("systemd/notify-reload/notify-reload.conf");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `GET path` on a new connection, in the container's network namespace;
/// panics on a connection or protocol error.
fn get(c: &Container, path: &str) -> Response {
    try_get(c, path).unwrap_or_else(|e| panic!("GET http://{}{path}: {e}", c.addr()))
}

/// `GET path` on a new connection, in the container's network namespace.
fn try_get(c: &Container, path: &str) -> io::Result<Response> {
    let (addr, path) = (c.addr(), path.to_string());
    c.in_netns(move || http::get(addr, &path))
}

/// The `Keep-Alive: timeout=N` a response advertises.
fn advertised_keep_alive(c: &Container) -> u64 {
    let r = get(c, "/");
    r.keep_alive
        .unwrap_or_else(|| panic!("no Keep-Alive: timeout=N in {r:?}"))
}

/// Sends the first request, which starts the service; returns its MainPID
/// (checked against the PID that answered).
fn activate(c: &Container) -> u32 {
    let r = get(c, "/");
    assert_eq!(r.status, 200, "{}", r.body);
    let pid = r
        .pid()
        .unwrap_or_else(|| panic!("not a pid-server answer: {:?}", r.body));
    assert_eq!(
        c.main_pid(SERVICE),
        pid,
        "MainPID is not the PID that answered"
    );
    pid
}

/// `GET /healthz` on a fresh connection, parsed.
fn healthz(c: &Container) -> serde_json::Value {
    let r = get(c, "/healthz");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("/healthz {:?}: {e}", r.body))
}

fn wait_gone(c: &Container, pid: u32, what: &str) -> Duration {
    c.wait_gone(pid, what, WAIT)
}

fn wait_state(c: &Container, unit: &str, active: &str, sub: &str) {
    c.wait_unit_state(unit, active, sub, WAIT);
}

/// `systemctl status -l pid-server` (it exits 0 only while active).
fn status(c: &Container) -> String {
    text(&c.systemctl(&["status", "-l", "--lines=0", SERVICE]))
}

/// The `Status: "..."` line of `systemctl status`, without the quotes.
fn status_line(status: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let v = l.trim_start().strip_prefix("Status:")?.trim();
        Some(v.trim_matches('"').to_string())
    })
}

/// Polls `systemctl status` until its `Status:` line satisfies `ok`.
fn wait_status_line(c: &Container, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    wait::within(WAIT, || {
        last = status(c);
        status_line(&last)
            .is_some_and(|l| ok(&l))
            .then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("waited {WAIT:?} for a Status: line {what}; last status:\n{last}"))
}

/// Bound on `systemctl reload`. With `Type=notify-reload`, systemd 257
/// waits for ever for a `READY=1` after a `RELOADING=1` (systemd#37515),
/// so a reload must never be waited on without one.
const RELOAD_BOUND: Duration = Duration::from_secs(40);

/// `systemctl reload pid-server` within [`RELOAD_BOUND`], timed.
fn reload(c: &Container) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = c
        .exec_timeout(
            &["systemctl", "--no-pager", "reload", "pid-server"],
            RELOAD_BOUND,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- journal ---\n{}",
                c.journal(&["-u", SERVICE, "-n", "40"])
            )
        });
    (out, t0.elapsed())
}

fn reload_ok(c: &Container) -> Duration {
    let (out, took) = reload(c);
    assert!(
        out.status.success(),
        "systemctl reload failed ({}):\n{}\n--- journal ---\n{}",
        out.status,
        text(&out),
        c.journal(&["-u", SERVICE, "-n", "40"])
    );
    took
}

fn wait_journal(c: &Container, args: &[&str], what: &str, ok: impl Fn(&str) -> bool) -> String {
    c.wait_journal(args, what, WAIT, ok)
}

/// A request started on a thread of its own: the response or the error,
/// and when it finished.
type Finished = (io::Result<Response>, Instant);

/// `GET path` on a thread of its own in the container's network namespace.
fn spawn_request(c: &Container, path: &'static str) -> JoinHandle<Finished> {
    let addr = c.addr();
    netns::spawn_in(c.netns_path(), move || {
        let r = http::get_timeout(addr, path, Duration::from_secs(30));
        (r, Instant::now())
    })
}

/// Waits until the server counts `n` requests in flight besides the
/// `/healthz` asking.
fn wait_in_flight(c: &Container, n: u64) {
    wait::until(
        &format!("{n} request(s) in flight"),
        Duration::from_secs(10),
        || (healthz(c)["in_flight"].as_u64().unwrap_or(0) > n).then_some(()),
    );
}

fn join_bounded<T>(h: JoinHandle<T>, what: &str, bound: Duration) -> T {
    wait::join(h, what, bound)
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// Per load thread.
const LOAD_MAX_REQUESTS: u64 = 200_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(150);
/// Between two requests of one thread: keeps two cores free enough for
/// systemd and the server under test while requests never stop flowing.
const LOAD_PACE: Duration = Duration::from_micros(500);

/// A load to the container's socket, its clients in its network namespace.
fn load_to(c: &Container) -> LoadBuilder {
    let mut b = Load::to(c.addr());
    if let Some(ns) = c.netns_path() {
        b.netns(ns);
    }
    b
}

/// Client threads sending `GET /` to the container's socket until stopped,
/// each bounded in requests and in time.
fn start_load(c: &Container, keep_alive: usize, one_shot: usize) -> Load {
    load_to(c)
        .keep_alive(keep_alive)
        .one_shot(one_shot)
        .pace(LOAD_PACE)
        .max_requests(LOAD_MAX_REQUESTS * (keep_alive + one_shot) as u64)
        .max_time(LOAD_MAX_TIME)
        .timeout(REQUEST_TIMEOUT)
        .start()
}

/// `n` paused clients to the container's socket (each idle 0.3-3 s
/// between requests, so idle when a restart, reload or fault comes),
/// bounded like [`start_load`].
fn start_paused(c: &Container, n: usize) -> Load {
    load_to(c)
        .paused(n)
        .max_requests(LOAD_MAX_REQUESTS * n as u64)
        .max_time(LOAD_MAX_TIME)
        .timeout(REQUEST_TIMEOUT)
        .start()
}

/// Stops the load; no thread may have hit its bound before.
fn stop_load(load: Load) -> Tally {
    let t = load.finish();
    assert_eq!(
        t.exhausted, 0,
        "a load thread hit its bound before the test was done: {t:?}"
    );
    t
}

/// Every request answered 200, and there were requests.
fn assert_no_failures(t: &Tally, min_ok: u64) {
    assert_eq!(
        t.failed(),
        0,
        "{} request(s) failed: {}\nfirst failures:\n  {}",
        t.failed(),
        t.summary(),
        t.examples.join("\n  ")
    );
    assert!(t.ok >= min_ok, "too little traffic: {}", t.summary());
}
