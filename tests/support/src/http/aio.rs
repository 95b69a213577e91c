//! The async HTTP/1.1 connection of the benchmark's load clients (over TCP
//! or TLS: any tokio stream), with the blocking client's rules for a
//! response (status line, headers, one length: the same `Fields`):
//! a server the tests would fail cannot pass the bench. Built for many
//! connections on a few threads: one buffer per connection, reused, and
//! nothing allocated per response but on error.
//!
//! Its limit: a chunked body is refused (no server the bench measures
//! sends one for its routes).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Body, Fields, MAX_HEAD, bad, context, eof, parse_status_line, pid_in};

/// One response, as a load client counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The PID in the body ([`pid_in`]), if it has one.
    pub pid: Option<u32>,
    /// The server said `Connection: close`.
    pub close: bool,
}

/// One client connection.
pub struct Conn<S> {
    /// The stream, for what the client does beside requests (wait for the
    /// server's FIN, say).
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    /// Sends `request` (whole, flushed), then reads its response. An
    /// error keeps its kind and says in which step it came (`send: `,
    /// `receive: `).
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<Reply> {
        self.stream
            .write_all(request)
            .await
            .map_err(|e| context(e, "send"))?;
        self.stream.flush().await.map_err(|e| context(e, "send"))?;
        self.read_response()
            .await
            .map_err(|e| context(e, "receive"))
    }

    /// Reads what the stream has; `false` at its end.
    async fn read_more(&mut self) -> io::Result<bool> {
        self.buf.reserve(2048);
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Reads one response; bytes after it stay for the next.
    pub async fn read_response(&mut self) -> io::Result<Reply> {
        let mut searched = 0;
        let head_end = loop {
            // Resume the search where the last one stopped (less three
            // bytes: CRLFCRLF may straddle two reads).
            if let Some(p) = self.buf[searched..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break searched + p + 4;
            }
            searched = self.buf.len().saturating_sub(3);
            if self.buf.len() > MAX_HEAD {
                return Err(bad(format!("response head over {MAX_HEAD} bytes")));
            }
            if !self.read_more().await? {
                return Err(eof(if self.buf.is_empty() {
                    "connection closed before a response"
                } else {
                    "connection closed in the headers"
                }));
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end - 4])
            .map_err(|_| bad("a header line that is not UTF-8"))?;
        // Split at CRLF, so a bare LF is inside a line: refused there.
        let mut lines = head.split("\r\n").map(|line| {
            if line.contains('\n') {
                Err(bad(format!("a line ending in LF, not CRLF: {line:?}")))
            } else {
                Ok(line)
            }
        });
        let status = parse_status_line(lines.next().unwrap_or(Ok(""))?)?;
        let mut fields = Fields::default();
        for line in lines {
            fields.header(line?)?;
        }
        let n = match fields.body(status)? {
            Body::Length(n) => n,
            Body::Chunked => return Err(bad("a chunked body (the async client takes a length)")),
        };
        while self.buf.len() < head_end + n {
            if !self.read_more().await? {
                return Err(eof(&format!("body cut short (content-length {n})")));
            }
        }
        let body = std::str::from_utf8(&self.buf[head_end..head_end + n])
            .map_err(|_| bad("a body that is not UTF-8"))?;
        let reply = Reply {
            status,
            pid: pid_in(body),
            close: fields.close(),
        };
        self.buf.drain(..head_end + n);
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `chunks` (each one read of the stream) as responses.
    fn replies(chunks: &[&[u8]]) -> Vec<io::Result<Reply>> {
        let mut b = stream_of(chunks);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = Conn::new(&mut b);
            let mut out = Vec::new();
            loop {
                let r = c.read_response().await;
                let end = r.is_err();
                out.push(r);
                if end {
                    return out;
                }
            }
        })
    }

    /// A stream that yields `chunks`, one per read, then the end; writes
    /// go nowhere.
    fn stream_of(chunks: &[&[u8]]) -> Chunks {
        Chunks(chunks.iter().rev().map(|c| c.to_vec()).collect())
    }

    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some(c) = self.0.pop() {
                buf.put_slice(&c);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 23\r\n\r\nOK. Handled by PID: 42\n";

    #[test]
    fn responses_split_anywhere_and_back_to_back_read_the_same() {
        let two = [OK, OK].concat();
        for cut in 1..two.len() {
            let (a, b) = two.split_at(cut);
            let r = replies(&[a, b]);
            assert_eq!(r.len(), 3, "cut at {cut}: {r:?}");
            for reply in &r[..2] {
                let reply = reply.as_ref().unwrap();
                assert_eq!(
                    (reply.status, reply.pid, reply.close),
                    (200, Some(42), false)
                );
            }
            let end = r[2].as_ref().unwrap_err();
            assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof, "{end}");
        }
    }

    #[test]
    fn what_the_blocking_client_refuses_this_one_refuses() {
        for bad in [
            &b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            let r = replies(&[bad]);
            let e = r[0].as_ref().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}: {e}");
            // The blocking client refuses it too (it reads chunked).
            if !bad.windows(7).any(|w| w == b"chunked") {
                assert!(super::super::parse_response(bad).is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn close_and_a_body_without_a_pid() {
        let r =
            replies(&[b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbusy"]);
        let reply = r[0].as_ref().unwrap();
        assert_eq!((reply.status, reply.pid, reply.close), (503, None, true));
    }
}
