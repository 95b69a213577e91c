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
//! A DATA frame written to the client is progress too ([`Sent`]): hyper
//! hands a chunk to the h2 crate as soon as the window has room for one
//! byte of it, and comes back for the next chunk only once the whole chunk
//! has gone out; a client that reads a large chunk slowly opens its window
//! many times in between.
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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Counters;

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
    /// A response made progress since the driver last looked. A flag, not
    /// a time: every response sets it, and a clock read each time cost
    /// more than the rest of the bookkeeping.
    progressed: AtomicBool,
    /// Where the process-wide count of held responses is.
    counters: Arc<Counters>,
    limits: Limits,
}

impl Responses {
    pub(crate) fn new(counters: Arc<Counters>, limits: Limits) -> Responses {
        Responses {
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            progressed: AtomicBool::new(false),
            counters,
            limits,
        }
    }

    /// A slot for a new request, or `None` past a bound. Taken before the
    /// request runs, so that a burst of streams cannot overshoot the bound
    /// while their responses are being made.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let total = &self.counters.gauges.http2_held;
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.limits.per_connection {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if total.fetch_add(1, Ordering::Relaxed) >= self.limits.total {
            total.fetch_sub(1, Ordering::Relaxed);
            self.held.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot {
            responses: self.clone(),
            held: true,
            waiting: false,
        })
    }

    /// Resolves once responses have waited on the client for the stall
    /// timeout without progress. Looks every quarter of the timeout, so it
    /// resolves within a timeout and a quarter of the last progress.
    pub(crate) async fn stalled(&self) {
        let limit = self.limits.timeout;
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(limit / 4).await;
            if self.progressed.swap(false, Ordering::Relaxed)
                || self.waiting.load(Ordering::Relaxed) == 0
            {
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= limit {
                return;
            }
        }
    }

    fn progress(&self) {
        // Read first: the line stays shared while the flag is set.
        if !self.progressed.load(Ordering::Relaxed) {
            self.progressed.store(true, Ordering::Relaxed);
        }
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
            r.held.fetch_add(1, Ordering::Relaxed);
            r.counters.gauges.http2_held.fetch_add(1, Ordering::Relaxed);
        } else {
            r.held.fetch_sub(1, Ordering::Relaxed);
            r.counters.gauges.http2_held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn wait(&mut self, on: bool) {
        if self.waiting == on {
            return;
        }
        self.waiting = on;
        if on {
            self.responses.waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            self.responses.waiting.fetch_sub(1, Ordering::Relaxed);
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

/// The connection's stream, noting each DATA frame written to the client
/// as progress. It reads the 9-byte header of every frame the server
/// writes (the server's side starts with a frame: it sends no preface) and
/// skips the payloads.
pub(crate) struct Sent<I> {
    io: I,
    responses: Arc<Responses>,
    header: [u8; 9],
    /// Bytes of `header` read so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload: usize,
}

/// DATA (RFC 9113, 6.1).
const TYPE_DATA: u8 = 0x0;

impl<I> Sent<I> {
    pub(crate) fn new(io: I, responses: Arc<Responses>) -> Sent<I> {
        Sent {
            io,
            responses,
            header: [0; 9],
            have: 0,
            payload: 0,
        }
    }

    /// Scans bytes written; whether a DATA frame with a payload began.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut data = false;
        while !bytes.is_empty() {
            if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                let h = self.header;
                self.payload = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.have = 0;
                data |= h[3] == TYPE_DATA && self.payload > 0;
            }
        }
        data
    }

    fn written(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let mut data = false;
        for b in bufs {
            if n == 0 {
                break;
            }
            let k = n.min(b.len());
            data |= self.scan(&b[..k]);
            n -= k;
        }
        if data {
            self.responses.progress();
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Sent<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sent<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written(&[io::IoSlice::new(buf)], n);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.written(bufs, n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
        assert_eq!(counters.gauges.http2_held(), 3);
        drop(a1);
        let b2 = b.admit();
        assert!(b2.is_some(), "a slot given back is free again");
        drop(b1);
        assert_eq!(counters.gauges.http2_held(), 2);
        assert_eq!(a.held.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_chunk_waiting_on_the_client_stalls_and_a_poll_is_progress() {
        use hyper::body::Body as _;
        let counters = Arc::new(Counters::default());
        let r = Arc::new(Responses::new(counters.clone(), limits(8, 8)));
        // Empty: never polled, so never held.
        let empty = Tracked::new(Body::empty(), r.admit());
        assert_eq!(counters.gauges.http2_held(), 0);
        drop(empty);
        let mut body = Tracked::new(Body::from("four"), r.admit());
        let waiting = || r.waiting.load(Ordering::Relaxed);
        let progressed = || r.progressed.swap(false, Ordering::Relaxed);
        assert_eq!(waiting(), 0);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let chunk = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(chunk, Poll::Ready(Some(Ok(_)))));
        assert_eq!(waiting(), 1, "its chunk waits on the client");
        assert!(progressed());
        assert_eq!(counters.gauges.http2_held(), 1);
        // hyper comes back: the chunk went; then the end.
        let end = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(end, Poll::Ready(None)));
        assert!(progressed(), "polled again: the chunk went");
        assert_eq!(waiting(), 0);
        assert_eq!(counters.gauges.http2_held(), 0);
        assert!(body.is_end_stream());
    }

    #[test]
    fn a_data_frame_written_is_progress_however_the_writes_split_it() {
        let counters = Arc::new(Counters::default());
        let r = Arc::new(Responses::new(counters, limits(8, 8)));
        let mut sent = Sent::new((), r.clone());
        let frame = |kind: u8, len: usize| {
            let mut f = vec![0, (len >> 8) as u8, len as u8, kind, 0, 0, 0, 0, 1];
            f.resize(9 + len, 0xaa);
            f
        };
        // SETTINGS, HEADERS, an empty DATA (END_STREAM only): no data.
        let mut out = frame(0x4, 6);
        out.extend(frame(0x1, 20));
        out.extend(frame(TYPE_DATA, 0));
        assert!(!sent.scan(&out));
        // A DATA frame whose header comes in two writes, after a payload
        // that looks like a DATA header.
        let mut out = frame(0x1, 9);
        out[9..].copy_from_slice(&frame(TYPE_DATA, 3)[..9]);
        out.extend(frame(TYPE_DATA, 300));
        let (a, b) = out.split_at(22);
        assert!(!sent.scan(a));
        assert!(sent.scan(b));
        assert_eq!((sent.have, sent.payload), (0, 0), "at a frame boundary");
        sent.written(&[io::IoSlice::new(&frame(TYPE_DATA, 1))], 10);
        assert!(r.progressed.load(Ordering::Relaxed));
    }
}
