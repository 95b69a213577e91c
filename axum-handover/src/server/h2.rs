//! An HTTP/2 connection (`h2c` with prior knowledge, or `h2` by ALPN over
//! TLS) and how it ends.
//!
//! It cannot move to the next generation: its state (streams, flow
//! control, the header compression tables) lives in this process. So as
//! soon as the generation leaves (a handover or a stop) it gets hyper's
//! graceful shutdown, which sends GOAWAY with the highest stream id (no
//! stream the client is opening right now is refused), then, after a PING
//! round trip, GOAWAY with the last stream it took. The client opens its
//! next connection to the new process; the streams it had open finish
//! here, within the drain timeout; none is refused or reset. Counted like
//! a drained connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use super::detect::leaving;
use super::{ConnCtx, Counters, MAX_HEADER_BYTES};
use crate::Config;

/// How long a peer has to answer a keep-alive PING.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub(crate) type Builder = hyper::server::conn::http2::Builder<TokioExecutor>;

pub(crate) fn builder(config: &Config) -> Builder {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(config.http2_keep_alive)
        .keep_alive_timeout(PING_TIMEOUT);
    b
}

/// Serves one HTTP/2 connection to its end.
pub(crate) async fn serve<I>(io: I, socket: &str, ctx: &ConnCtx)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = Streams {
        router: ctx.router(socket),
        counters: ctx.counters.clone(),
    };
    let conn = ctx.h2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut mode = ctx.mode.clone();
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = leaving(&mut mode) => {
            conn.as_mut().graceful_shutdown();
            tracing::debug!(event = "http2_goaway", "HTTP/2 connection: graceful GOAWAY sent");
            conn.await
        }
    };
    if let Err(e) = r {
        log_error(&ctx.counters, &e);
    }
}

/// Counts and logs how an HTTP/2 connection failed. A malformed frame or a
/// protocol violation by the peer is a protocol error (counted); a reset or
/// closed socket is not.
fn log_error(counters: &Counters, e: &hyper::Error) {
    let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
    let protocol = match h2 {
        Some(h) => !h.is_io() && h.reason().is_some_and(|r| r != h2::Reason::NO_ERROR),
        None => e.is_parse(),
    };
    if protocol {
        counters.totals.protocol_error();
        tracing::info!(event = "http2_protocol_error", error = %e,
            "HTTP/2 connection closed: {e}");
    } else {
        tracing::debug!(event = "connection_error", error = %e);
    }
}

/// The app's router behind one HTTP/2 connection, counting its requests.
struct Streams {
    router: axum::Router,
    counters: Arc<Counters>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Streams {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        let (router, counters) = (self.router.clone(), self.counters.clone());
        Box::pin(async move {
            let _counted = counters.request_started();
            let resp = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            counters.totals.request(resp.status().as_u16());
            Ok(resp)
        })
    }
}
