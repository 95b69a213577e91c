//! Bounded waits for states no one signals (a unit's state, a process
//! gone from `/proc`, a journal line). Where a signal exists, wait on it
//! instead: `READY=1` ([`crate::proc::Notify`]), the load's tally
//! ([`crate::Load::wait_for`]), the readiness endpoint.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`; panics after `timeout`
/// with `what` in the message.
pub fn until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    within(timeout, f).unwrap_or_else(|| {
        panic!(
            "timed out after {} s waiting for {what}",
            timeout.as_secs_f32()
        )
    })
}

/// Polls `f` every 20 ms until it returns `Ok`; panics after `timeout`
/// with `what` and the last error in the message (why it never came: a
/// refused connection, a status that never changed).
pub fn until_ok<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let mut last = None;
    let got = within(timeout, || match f() {
        Ok(v) => Some(v),
        Err(e) => {
            last = Some(e.to_string());
            None
        }
    });
    got.unwrap_or_else(|| {
        panic!(
            "timed out after {} s waiting for {what}; last: {}",
            timeout.as_secs_f32(),
            last.as_deref().unwrap_or("-")
        )
    })
}

/// Polls `f` every 20 ms until it returns `Some`, or `None` once `timeout`
/// passed: for a wait whose end the caller checks itself (an assertion on
/// what it saw last, a message that reads state at that moment) or that
/// only lets something settle.
pub fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Joins `h` within `bound` (panics otherwise, and if the thread panicked).
pub fn join<T>(h: JoinHandle<T>, what: &str, bound: Duration) -> T {
    until(&format!("{what} to finish"), bound, || {
        h.is_finished().then_some(())
    });
    h.join()
        .unwrap_or_else(|_| panic!("{what}: thread panicked"))
}
