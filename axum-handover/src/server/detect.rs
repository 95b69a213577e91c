//! Which protocol a connection speaks, from its first bytes: a plain
//! connection that starts with the HTTP/2 preface is HTTP/2 with prior
//! knowledge (`h2c`); anything else is HTTP/1.1. Bytes read ahead by a
//! previous generation count as the connection's first bytes.
//!
//! Also the one I/O type of the HTTP/2 and TLS paths: the stream with the
//! bytes read while detecting served first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::{ConnCtx, Mode, Stream};

/// What every HTTP/2 connection starts with (RFC 9113, 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
pub(crate) enum Detected {
    /// The preface: serve HTTP/2. The bytes read so far (the preface
    /// included) are to be served first.
    Http2(Vec<u8>),
    /// Anything else, or nothing yet when the generation starts leaving:
    /// the HTTP/1.1 path, with these bytes read ahead.
    Http1(Vec<u8>),
    /// The client closed before saying anything that decides it.
    Closed,
}

/// Reads until the bytes decide the protocol. An `h1` request is decided
/// by its first byte (no method starts with `PR`, so `POST` and `PUT` take
/// one more); only a client that sends a prefix of the preface and stops
/// is waited for, up to the header timeout. A connection that has sent
/// nothing yet goes to the HTTP/1.1 path as soon as the generation leaves,
/// which moves or closes it as an idle one.
pub(crate) async fn detect(stream: &mut Stream, mut read: Vec<u8>, ctx: &ConnCtx) -> Detected {
    if !ctx.http2 {
        return Detected::Http1(read);
    }
    let mut mode = ctx.mode.clone();
    let deadline = tokio::time::sleep(ctx.header_read_timeout);
    tokio::pin!(deadline);
    loop {
        if read.len() >= PREFACE.len() || !PREFACE.starts_with(&read) {
            return if read.starts_with(PREFACE) {
                Detected::Http2(read)
            } else {
                Detected::Http1(read)
            };
        }
        if read.is_empty() && *mode.borrow_and_update() != Mode::Serving {
            return Detected::Http1(read);
        }
        let mut buf = [0u8; 64];
        tokio::select! {
            // Cancel-safe: nothing is lost when another branch wins.
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Detected::Closed,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            },
            changed = mode.changed(), if read.is_empty() => {
                if changed.is_err() {
                    return Detected::Http1(read);
                }
            }
            // A prefix of the preface and then silence: hyper's HTTP/1.1
            // path times it out the same way.
            _ = &mut deadline => return Detected::Http1(read),
        }
    }
}

/// How long a connection that chose `h2` over TLS still has to send its
/// preface once the generation leaves. A client sends it as soon as its
/// side of the handshake is done, with its first requests right behind,
/// which can be before the server has read the end of the handshake: it
/// takes the connection as open. Closed at the leave, such a connection
/// lost the requests its client had sent (h2load counted 4, its `-m`, open
/// when the connection ended, in 3 of 8 runs of
/// `protocols::h2load_over_tls_gets_every_stream_it_sent_answered_through_reloads`),
/// where a preface that arrives is served, and its streams answered before
/// the graceful GOAWAY closes it. A client that stays silent (a
/// preconnect) holds a leaving process this long at most.
const PREFACE_ONCE_LEAVING: Duration = Duration::from_secs(1);

/// Resolves once the generation is no longer serving (also if the mode's
/// sender is gone: the server is ending).
pub(crate) async fn leaving(mode: &mut tokio::sync::watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m != Mode::Serving).await;
}

/// The wait before an idle connection is closed while the generation
/// serves: the keep-alive timeout advertised, plus a second.
pub(crate) fn serving_idle(ctx: &ConnCtx) -> Duration {
    ctx.keep_alive + Duration::from_secs(1)
}

/// Any stream with bytes already read from it served first.
pub(crate) struct Rewind<I> {
    io: I,
    ahead: Vec<u8>,
}

impl<I> Rewind<I> {
    pub(crate) fn new(io: I, ahead: Vec<u8>) -> Rewind<I> {
        Rewind { io, ahead }
    }

    /// The stream (what is left of the bytes ahead is dropped).
    pub(crate) fn into_inner(self) -> I {
        self.io
    }

    pub(crate) fn get_ref(&self) -> &I {
        &self.io
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = buf.remaining().min(self.ahead.len());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.drain(..n);
            if self.ahead.is_empty() {
                // Not kept for the connection's life.
                self.ahead = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

write_through!(Rewind<I>, io, I);

/// Reads the HTTP/2 preface from a connection that chose `h2` by ALPN,
/// within the header timeout, and gives up on a silent one
/// [`PREFACE_ONCE_LEAVING`] after the generation leaves (hyper would wait
/// for its preface to shut it down). `None`: close it.
pub(crate) async fn h2_preface<I>(mut io: I, ctx: &ConnCtx) -> Option<Rewind<I>>
where
    I: AsyncRead + Unpin,
{
    let mut mode = ctx.mode.clone();
    let mut read = Vec::new();
    let deadline = tokio::time::sleep(ctx.header_read_timeout);
    tokio::pin!(deadline);
    let mut left = false;
    while read.len() < PREFACE.len() {
        let mut buf = [0u8; 64];
        tokio::select! {
            // Bytes that came win over the leave.
            biased;
            r = io.read(&mut buf) => match r {
                Ok(0) | Err(_) => return None,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            },
            _ = &mut deadline => return None,
            _ = leaving(&mut mode), if !left => {
                left = true;
                let soon = tokio::time::Instant::now() + PREFACE_ONCE_LEAVING;
                if soon < deadline.deadline() {
                    deadline.as_mut().reset(soon);
                }
            }
        }
    }
    Some(Rewind { io, ahead: read })
}
