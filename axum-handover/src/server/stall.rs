//! What HTTP/2 responses may hold while the client does not read them, and
//! when a connection whose responses wait on the client is cut.
//!
//! hyper sends a response's body only as the client's flow-control window
//! lets it: it polls the body for a chunk, then keeps that chunk until the
//! stream has send capacity. A client that announces a window of zero (or
//! lets it run out) and never opens it keeps every such response, its
//! stream and its task in memory, for as long as the connection lives; a
//! graceful shutdown waits for them too. So every response body on an
//! HTTP/2 connection goes through [`Tracked`], which:
//! - holds a *slot* from the request until the response's last chunk has
//!   been taken (the response is *held*): a connection may hold
//!   [`Limits::per_connection`] of them, the process [`Limits::total`];
//!   past either bound a new request is answered 503 with an empty body (a
//!   HEADERS frame, which needs no window), and counted;
//! - notes when a chunk it gave waits on the client (*waiting*), and when
//!   hyper comes back for more (*progress*, which takes send capacity: the
//!   client opened its window). A body that waits on the app (its own
//!   `Pending`) neither waits on the client nor holds its slot: a slow or
//!   long-lived response is the app's business, not a stall.
//!
//! The connection's driver (`h2::serve`) closes a connection that has had
//! responses waiting and no progress for [`Limits::timeout`]: a *stalled*
//! connection. It is closed, not sent RST_STREAM for its streams nor a
//! GOAWAY: hyper resets a stream only when its body fails, which it polls
//! only once the window is open; its only GOAWAY is the graceful one,
//! which waits for exactly these streams. Closing frees every stream's
//! state at once, and the client sees a connection error on the streams it
//! left unread. A slow reader that opens its window bit by bit makes
//! progress at every step and is not cut.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::Frame;

use super::Counters;
use super::conn::now_ms;

/// The bounds on held responses, and the stall timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A connection whose responses wait on its window this long without
    /// progress is closed.
    pub(crate) timeout: Duration,
    /// Responses one connection may hold.
    pub(crate) per_connection: usize,
    /// Responses every HTTP/2 connection of the process may hold together.
    pub(crate) total: usize,
}

/// One HTTP/2 connection's responses.
#[derive(Debug)]
pub(crate) struct Responses {
    /// Slots taken on this connection.
    held: AtomicUsize,
    /// Responses whose chunk waits on the client's window.
    waiting: AtomicUsize,
    /// When a response last made progress (or started waiting).
    last_ms: AtomicU64,
    /// Where the process-wide count of held responses is.
    counters: Arc<Counters>,
    limits: Limits,
}

impl Responses {
    pub(crate) fn new(counters: Arc<Counters>, limits: Limits) -> Responses {
        Responses {
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms()),
            counters,
            limits,
        }
    }

    /// A slot for a new request, or `None` past a bound. Taken before the
    /// request runs, so that a burst of streams cannot overshoot the bound
    /// while their responses are being made.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let total = &self.counters.http2_held;
        if self.held.fetch_add(1, Ordering::SeqCst) >= self.limits.per_connection {
            self.held.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        if total.fetch_add(1, Ordering::SeqCst) >= self.limits.total {
            total.fetch_sub(1, Ordering::SeqCst);
            self.held.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot {
            responses: self.clone(),
            held: true,
            waiting: false,
        })
    }

    /// How long the responses waiting on the client have made no progress;
    /// `None` while none waits.
    fn stalled_for(&self) -> Option<Duration> {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }

    /// Resolves once responses have waited on the client for the stall
    /// timeout without progress. Wakes once a timeout while none waits.
    pub(crate) async fn stalled(&self) {
        let limit = self.limits.timeout;
        loop {
            let left = match self.stalled_for() {
                Some(d) if d >= limit => return,
                Some(d) => limit - d,
                None => limit,
            };
            tokio::time::sleep(left).await;
        }
    }

    fn progress(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// One held response's place in the counts; given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    responses: Arc<Responses>,
    held: bool,
    waiting: bool,
}

impl Slot {
    fn hold(&mut self, on: bool) {
        if self.held == on {
            return;
        }
        self.held = on;
        let r = &self.responses;
        if on {
            r.held.fetch_add(1, Ordering::SeqCst);
            r.counters.http2_held.fetch_add(1, Ordering::SeqCst);
        } else {
            r.held.fetch_sub(1, Ordering::SeqCst);
            r.counters.http2_held.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn wait(&mut self, on: bool) {
        if self.waiting == on {
            return;
        }
        self.waiting = on;
        if on {
            self.responses.waiting.fetch_add(1, Ordering::SeqCst);
        } else {
            self.responses.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.wait(false);
        self.hold(false);
    }
}

/// A response body on an HTTP/2 connection, counted (see the module's
/// doc). An empty body is never polled (hyper ends the stream with the
/// HEADERS frame), so it gives its slot back at once.
pub(crate) struct Tracked {
    inner: Body,
    slot: Option<Slot>,
}

impl Tracked {
    pub(crate) fn new(inner: Body, slot: Option<Slot>) -> Tracked {
        use hyper::body::Body as _;
        let slot = slot.filter(|_| !inner.is_end_stream());
        Tracked { inner, slot }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        // Polled: the chunk given before (if any) got its send capacity.
        if let Some(slot) = &mut this.slot
            && slot.waiting
        {
            slot.responses.progress();
            slot.wait(false);
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(slot) = &mut this.slot {
            match &r {
                Poll::Ready(Some(Ok(f))) if f.is_data() => {
                    // hyper keeps this chunk until the window lets it go,
                    // and comes back only then.
                    slot.responses.progress();
                    slot.hold(true);
                    slot.wait(true);
                }
                // Waiting on the app: not the client's doing.
                Poll::Pending => slot.hold(false),
                _ => {
                    this.slot = None;
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_connection: usize, total: usize) -> Limits {
        Limits {
            timeout: Duration::from_secs(1),
            per_connection,
            total,
        }
    }

    #[test]
    fn slots_are_bounded_per_connection_and_in_total() {
        let counters = Arc::new(Counters::default());
        let a = Arc::new(Responses::new(counters.clone(), limits(2, 3)));
        let b = Arc::new(Responses::new(counters.clone(), limits(2, 3)));
        let a1 = a.admit().unwrap();
        let _a2 = a.admit().unwrap();
        assert!(a.admit().is_none(), "past the connection's bound");
        let b1 = b.admit().unwrap();
        assert!(b.admit().is_none(), "past the process's bound");
        assert_eq!(counters.http2_held(), 3);
        drop(a1);
        let b2 = b.admit();
        assert!(b2.is_some(), "a slot given back is free again");
        drop(b1);
        assert_eq!(counters.http2_held(), 2);
        assert_eq!(a.held.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_chunk_waiting_on_the_client_stalls_and_a_poll_is_progress() {
        use hyper::body::Body as _;
        let counters = Arc::new(Counters::default());
        let r = Arc::new(Responses::new(counters.clone(), limits(8, 8)));
        // Empty: never polled, so never held.
        let empty = Tracked::new(Body::empty(), r.admit());
        assert_eq!(counters.http2_held(), 0);
        drop(empty);
        let mut body = Tracked::new(Body::from("four"), r.admit());
        assert_eq!(r.stalled_for(), None);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let chunk = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(chunk, Poll::Ready(Some(Ok(_)))));
        assert!(r.stalled_for().is_some(), "its chunk waits on the client");
        assert_eq!(counters.http2_held(), 1);
        // hyper comes back: the chunk went; then the end.
        let end = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(end, Poll::Ready(None)));
        assert_eq!(r.stalled_for(), None);
        assert_eq!(counters.http2_held(), 0);
        assert!(body.is_end_stream());
    }
}
