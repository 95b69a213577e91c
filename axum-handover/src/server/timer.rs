//! hyper's timer for the HTTP/1.1 header timeout, without a trip through
//! tokio's timer wheel on every request.
//!
//! hyper arms its header timer each time it waits for a request head: on
//! a keep-alive connection, after every response. With tokio's timer
//! (`hyper_util`'s `TokioTimer`) that is a boxed sleep registered in the
//! wheel (a lock, a waker) and removed again when the head arrives a
//! moment later: a fifth of what the library cost a request beside plain
//! `axum::serve`, where no header timer runs at all.
//!
//! [`HeadTimer`]'s sleep registers nothing the first time hyper polls it.
//! It need not: the connection's own loop (`conn::run`, `tls::http1`)
//! wakes the task within the header timeout of the last byte in or the
//! last response, whatever else happens (its idle limit is capped at the
//! header timeout, see [`idle_limit`]), and every later poll of the sleep
//! registers it in tokio's wheel as before. So a head that arrives, the
//! common case, costs no registration; a head that trickles or stalls is
//! cut at the header timeout as hyper's own timer would cut it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// hyper's [`hyper::rt::Timer`] for the HTTP/1.1 connections' header
/// timeout (and nothing else: it is not for HTTP/2's keep-alive pings).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadTimer;

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline,
            polled: false,
            wheel: None,
        })
    }
}

struct HeadSleep {
    deadline: Instant,
    /// Polled once already: the next poll registers.
    polled: bool,
    /// Registered in tokio's wheel (from the second poll on).
    wheel: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(wheel) = &mut self.wheel {
            return wheel.as_mut().poll(cx);
        }
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if !self.polled {
            // No waker registered, on purpose: see the module's doc.
            self.polled = true;
            return Poll::Pending;
        }
        let mut wheel = Box::pin(tokio::time::sleep_until(self.deadline.into()));
        let r = wheel.as_mut().poll(cx);
        self.wheel = Some(wheel);
        r
    }
}

/// The idle limit a connection's loop waits for, capped at the header
/// timeout: the wake-up [`HeadTimer`]'s first poll relies on. No idle
/// connection lives longer for the cap's absence: hyper's header timer
/// closes one that sends no head within the header timeout, idle or not.
pub(crate) fn idle_limit(limit: Duration, header_read_timeout: Duration) -> Duration {
    limit.min(header_read_timeout)
}
