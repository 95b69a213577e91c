//! What outlives a request's head: upgraded connections (WebSockets) and
//! responses still streaming (Server-Sent Events, downloads). Neither can
//! move to the next generation, so when the generation leaves each is told
//! to end ([`Closing`]), at its own moment in the close spread, and what is
//! still open at the drain bound is cut. Also what a request learns of its
//! connection: its peer ([`axum::extract::ConnectInfo`]).

use std::collections::hash_map::RandomState;
use std::future::{Future, IntoFuture};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::Extensions;
use axum::http::request::Parts;
use hyper::body::{Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use super::conn::Stream;

/// When the generation left: `None` while it serves.
pub(crate) type Left = watch::Receiver<Option<Instant>>;

/// The server's wish that a long-lived exchange end: a request extension
/// (and extractor) on every request, HTTP/1.1 and HTTP/2, whose `.await`
/// resolves once the generation is leaving (a handover or a stop) and this
/// exchange's moment in the close spread ([`crate::Config::close_spread`])
/// has come.
///
/// A WebSocket handler selects on it and closes (with 1012, Service
/// Restart), so its client reconnects to the new process; a streaming
/// response of unknown length is ended cleanly at that moment by the
/// server itself (an `EventSource` then reconnects with `Last-Event-ID`).
/// What is still open at the drain timeout is cut. Without the server (a
/// router called directly, in a test) it never resolves.
#[derive(Debug, Clone)]
pub struct Closing {
    /// The connection's receiver, shared by its requests: a receiver of
    /// their own per request would be two atomic operations on the
    /// server's one channel, which every core writes.
    left: Option<Arc<Left>>,
    spread: Duration,
    /// This exchange's draw (its connection's, and its number there): its
    /// moment is computed from it only when asked, which few requests
    /// ever are.
    draw: (u64, u64),
}

/// Draws the moments in the spread: a counter (one step per connection)
/// and the request's number on its connection, through std's randomly
/// keyed hasher: uniform enough, and no random-number crate.
static DRAWS: AtomicU64 = AtomicU64::new(0);

/// A connection's first coordinate of its requests' draws.
pub(crate) fn connection_draws() -> u64 {
    DRAWS.fetch_add(1, Ordering::Relaxed)
}
static KEYS: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);

impl Closing {
    /// A signal with its own moment, uniform in `[0, spread)` after the
    /// leave.
    pub(crate) fn new(left: Arc<Left>, spread: Duration, draw: (u64, u64)) -> Closing {
        Closing {
            left: Some(left),
            spread,
            draw,
        }
    }

    /// This exchange's moment after the leave.
    fn delay(&self) -> Duration {
        if self.spread.is_zero() {
            return Duration::ZERO;
        }
        let fraction = (KEYS.hash_one(self.draw) >> 11) as f64 / (1u64 << 53) as f64;
        self.spread.mul_f64(fraction)
    }

    /// Whether the moment to end has come.
    pub fn is_closing(&self) -> bool {
        self.left
            .as_ref()
            .and_then(|l| *l.borrow())
            .is_some_and(|at| Instant::now() >= at + self.delay())
    }
}

impl IntoFuture for Closing {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let delay = self.delay();
        Box::pin(async move {
            // Its own receiver, to wait on (only a request that waits
            // makes one).
            let Some(mut left) = self.left.as_deref().cloned() else {
                return std::future::pending().await;
            };
            let at = left.wait_for(Option::is_some).await.ok().and_then(|at| *at);
            match at {
                Some(at) => tokio::time::sleep_until(at + delay).await,
                // The server is gone: so is the process, about now.
                None => std::future::pending().await,
            }
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Closing {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Closing>()
            .cloned()
            .unwrap_or(Closing {
                left: None,
                spread: Duration::ZERO,
                draw: (0, 0),
            }))
    }
}

/// The other end of a connection, as a request sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    /// `ConnectInfo<SocketAddr>`.
    Tcp(SocketAddr),
    /// `ConnectInfo<UCred>`: a Unix socket's peer has no useful address
    /// (it is unnamed), but the kernel vouches for its process and user.
    Unix(tokio::net::unix::UCred),
    Unknown,
}

impl Peer {
    /// Asks the kernel (`getpeername`, `SO_PEERCRED`): the same for an
    /// accepted connection and for one moved from the previous generation.
    pub(crate) fn of(stream: &Stream) -> Peer {
        match stream {
            Stream::Tcp(s) => s.peer_addr().map_or(Peer::Unknown, Peer::Tcp),
            Stream::Unix(s) => s.peer_cred().map_or(Peer::Unknown, Peer::Unix),
        }
    }

    /// A TCP client's address as `accept` gave it; without one (an IPv6
    /// client, a moved connection), asked of the kernel as [`Peer::of`].
    pub(crate) fn accepted(addr: Option<std::net::SocketAddrV4>, stream: &Stream) -> Peer {
        match addr {
            Some(a) => Peer::Tcp(SocketAddr::V4(a)),
            None => Peer::of(stream),
        }
    }

    /// Gives a request its `ConnectInfo` and its [`Closing`], in a map of
    /// extensions with room for what axum adds (`UrlParams`,
    /// `MatchedPath`). A map grows past three entries, and these four were
    /// a rehash and one more allocation on every request (about a tenth of
    /// the instructions the library added to one); a clone of [`ROOM`]
    /// starts with room for seven (a hash table's clone keeps its size).
    pub(crate) fn add_to(self, ext: &mut Extensions, closing: Closing) {
        let mut roomy = ROOM.clone();
        // What hyper put there (an upgrade's handle), if anything.
        roomy.extend(std::mem::take(ext));
        match self {
            Peer::Tcp(a) => {
                roomy.insert(ConnectInfo(a));
            }
            Peer::Unix(c) => {
                roomy.insert(ConnectInfo(c));
            }
            Peer::Unknown => {}
        }
        roomy.insert(closing);
        *ext = roomy;
    }
}

/// An empty map of extensions with room for seven: four placeholders went
/// in, growing it, and out again (a map keeps its room when emptied).
static ROOM: LazyLock<Extensions> = LazyLock::new(|| {
    #[derive(Clone)]
    struct Placeholder<const N: u8>;
    let mut ext = Extensions::new();
    ext.insert(Placeholder::<0>);
    ext.insert(Placeholder::<1>);
    ext.insert(Placeholder::<2>);
    ext.insert(Placeholder::<3>);
    ext.clear();
    ext
});

/// A response body still to send: its request stays in flight (and its
/// connection busy) until the body ends, and a body of unknown length
/// ends cleanly at its [`Closing`] moment.
pub(crate) struct Streaming<G> {
    body: Body,
    closing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    _guards: G,
}

/// A body larger than this, or of unknown length, keeps its request in
/// flight until it is sent; a smaller one goes out with the head (not worth
/// a second allocation per response).
const SMALL_BODY: u64 = 64 * 1024;

impl<G: Send + Unpin + 'static> Streaming<G> {
    /// `body` as it is when it goes out at once; otherwise wrapped, holding
    /// `guards` until it ends.
    pub(crate) fn wrap(body: Body, closing: &Closing, guards: G) -> Body {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            return body;
        }
        let closing = match body.size_hint().exact() {
            Some(n) if n <= SMALL_BODY => return body,
            // A known length cut short would truncate the client's
            // download; it runs to the drain bound instead.
            Some(_) => None,
            None => Some(closing.clone().into_future()),
        };
        Body::new(Streaming {
            body,
            closing,
            _guards: guards,
        })
    }
}

impl<G: Unpin> hyper::body::Body for Streaming<G> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(c) = self.closing.as_mut()
            && c.as_mut().poll(cx).is_ready()
        {
            // The end of a chunked body: the client sees a complete
            // response, and reconnects.
            self.closing = None;
            self.body = Body::empty();
            return Poll::Ready(None);
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper put in a request's extensions stays, beside the peer and
    /// the `Closing`; the map shared as the starting point stays empty.
    #[test]
    fn a_request_keeps_hyper_s_extensions_and_gets_its_peer() {
        #[derive(Clone, Debug, PartialEq)]
        struct FromHyper(u8);
        let peer = SocketAddr::from(([127, 0, 0, 1], 4242));
        let closing = Closing {
            left: None,
            spread: Duration::ZERO,
            draw: (1, 2),
        };
        let mut ext = Extensions::new();
        ext.insert(FromHyper(7));
        Peer::Tcp(peer).add_to(&mut ext, closing);
        assert_eq!(ext.get::<FromHyper>(), Some(&FromHyper(7)));
        assert_eq!(
            ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
            Some(peer)
        );
        assert_eq!(ext.get::<Closing>().map(|c| c.draw), Some((1, 2)));
        assert_eq!(ext.len(), 3);
        assert!(ROOM.is_empty());
    }
}
