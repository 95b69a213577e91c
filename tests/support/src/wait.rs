//! Bounded waits for states no one signals (a unit's state, a process
//! gone from `/proc`, a journal line). Where a signal exists, wait on it
//! instead: `READY=1` ([`crate::proc::Notify`]), the load's tally
//! ([`crate::Load::wait_for`]), the readiness endpoint.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`; panics after `timeout`
/// with `what` in the message.
pub fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs_f32()
            );
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
