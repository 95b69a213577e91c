//! Holds back the client's answer to the graceful shutdown's PING, so that
//! the streams the client opened just before it saw the first GOAWAY are
//! taken, not refused.
//!
//! hyper's graceful shutdown (h2 0.4) sends GOAWAY with the highest stream
//! id and a PING; when the PING's ack arrives it sends a second GOAWAY with
//! the last stream it has read, and refuses any stream above it. A client
//! that queued HEADERS for new streams before it read the first GOAWAY
//! still sends them, but the h2 crate writes a PING ack ahead of queued
//! stream frames, so they arrive after the ack (in the same read, or just
//! after it): the server would fix the last stream id first and refuse
//! them, and the client would see a GOAWAY error on a stream it sent.
//!
//! So the bytes from the client pass through a small frame scanner on
//! their way to hyper. It passes every frame on unchanged and in order,
//! except the one PING ack that carries h2's shutdown payload: that one it
//! keeps until no new stream has been opened for [`SETTLE`] (at most
//! [`MAX_HOLD`] after the ack), then hands it on at the next frame
//! boundary. A PING ack is a connection-level frame that nothing else is
//! ordered against, so handing it on later only moves the second GOAWAY
//! later. A compliant client opens no stream after the first GOAWAY, so
//! the streams that can arrive late are the ones it had queued; they come
//! right behind the ack, well within [`SETTLE`] even on a loaded machine.
//! Everything stays bounded by the drain timeout.
//!
//! The scanner keeps at most one frame header and one PING in memory; it
//! never looks into any other frame's payload (a frame of any length,
//! legal or not, passes as it came, for hyper to judge), and bytes that do
//! not start with the HTTP/2 preface pass through unscanned.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::detect::PREFACE;

/// How long the ack is kept after it, or after the last new stream's
/// HEADERS that came behind it. Late HEADERS come in the same write as the
/// ack; this covers the client being descheduled between two writes.
pub(crate) const SETTLE: Duration = Duration::from_millis(100);

/// The longest the ack is kept: a client that keeps opening streams after
/// the GOAWAY (it must not) does not hold the final GOAWAY back longer.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(1);

/// The payload of the PING h2 (0.4) sends in its graceful shutdown
/// (`h2::frame::Ping::SHUTDOWN`, public in the crate's unstable API only).
const SHUTDOWN_PAYLOAD: [u8; 8] = [0x0b, 0x7b, 0xa2, 0xf0, 0x8b, 0x9b, 0xfe, 0x54];

const HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
/// A PING frame: a 9-byte header and an 8-byte payload (RFC 9113, 6.7).
const PING_LEN: usize = HEADER_LEN + 8;

/// Where the scanner is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// In the preface; this many bytes of it still to come.
    Preface(usize),
    /// At a frame boundary.
    Header,
    /// In a frame's payload; this many bytes of it still to come.
    Payload(usize),
    /// Not HTTP/2 (no preface): passed on as it comes.
    Opaque,
}

/// The client→server bytes between the socket and hyper, scanned frame by
/// frame. `buf[..ready]` may be handed to hyper; the rest waits for the
/// frame header (or PING) it begins to be complete.
#[derive(Debug)]
pub(crate) struct Frames {
    state: State,
    buf: Vec<u8>,
    ready: usize,
    /// The shutdown PING ack, kept back.
    held: Option<[u8; PING_LEN]>,
    /// Hand the ack on at the next frame boundary.
    release: bool,
    /// An ack has been kept once: later ones pass.
    kept: bool,
    /// The highest stream id a HEADERS frame opened.
    top_stream: u32,
    /// A new stream was opened since [`Frames::take_new_stream`].
    new_stream: bool,
}

impl Frames {
    pub(crate) fn new() -> Frames {
        Frames {
            state: State::Preface(PREFACE.len()),
            buf: Vec::new(),
            ready: 0,
            held: None,
            release: false,
            kept: false,
            top_stream: 0,
            new_stream: false,
        }
    }

    /// Takes bytes read from the client.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.scan();
    }

    /// The bytes hyper may read now.
    pub(crate) fn ready(&self) -> &[u8] {
        &self.buf[..self.ready]
    }

    /// `n` bytes of [`Frames::ready`] were handed on.
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(n <= self.ready);
        self.buf.drain(..n);
        self.ready -= n;
    }

    /// Whether the shutdown ack is being kept back.
    pub(crate) fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Whether a new stream's HEADERS passed since the last call.
    pub(crate) fn take_new_stream(&mut self) -> bool {
        std::mem::take(&mut self.new_stream)
    }

    /// Hands the kept ack on, at the next frame boundary.
    pub(crate) fn release(&mut self) {
        self.release = true;
        self.scan();
    }

    /// The client sent its last byte: everything passes, the kept ack in
    /// its place if the stream ends at a frame boundary (else the
    /// connection ends with a cut frame anyway, and the ack is moot).
    pub(crate) fn end(&mut self) {
        self.release();
        self.held = None;
        self.ready = self.buf.len();
        self.state = State::Opaque;
    }

    fn scan(&mut self) {
        loop {
            let avail = self.buf.len() - self.ready;
            match self.state {
                State::Opaque => {
                    self.ready = self.buf.len();
                    return;
                }
                State::Preface(left) => {
                    let n = left.min(avail);
                    if n == 0 {
                        return;
                    }
                    let at = PREFACE.len() - left;
                    if self.buf[self.ready..self.ready + n] != PREFACE[at..at + n] {
                        self.state = State::Opaque;
                        continue;
                    }
                    self.ready += n;
                    self.state = match left - n {
                        0 => State::Header,
                        left => State::Preface(left),
                    };
                }
                State::Payload(left) => {
                    let n = left.min(avail);
                    self.ready += n;
                    if n < left {
                        self.state = State::Payload(left - n);
                        return;
                    }
                    self.state = State::Header;
                }
                State::Header => {
                    if self.release
                        && let Some(ack) = self.held.take()
                    {
                        self.buf.splice(self.ready..self.ready, ack);
                        self.ready += PING_LEN;
                        continue;
                    }
                    if avail < HEADER_LEN {
                        return;
                    }
                    let h = &self.buf[self.ready..self.ready + HEADER_LEN];
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind == TYPE_PING
                        && flags & FLAG_ACK != 0
                        && len == 8
                        && stream == 0
                        && !self.kept
                    {
                        if avail < PING_LEN {
                            return;
                        }
                        let frame = &self.buf[self.ready..self.ready + PING_LEN];
                        if frame[HEADER_LEN..] == SHUTDOWN_PAYLOAD {
                            let mut ack = [0; PING_LEN];
                            ack.copy_from_slice(frame);
                            self.buf.drain(self.ready..self.ready + PING_LEN);
                            self.held = Some(ack);
                            self.kept = true;
                            continue;
                        }
                    }
                    if kind == TYPE_HEADERS && stream > self.top_stream {
                        self.top_stream = stream;
                        self.new_stream = true;
                    }
                    self.ready += HEADER_LEN;
                    self.state = match len {
                        0 => State::Header,
                        len => State::Payload(len),
                    };
                }
            }
        }
    }
}

/// An HTTP/2 connection's I/O with the shutdown PING ack held back (see
/// the module's doc). Writes pass straight through.
pub(crate) struct HoldShutdownAck<I> {
    io: I,
    frames: Frames,
    /// While the ack is kept: when it goes on, and the latest it may.
    timer: Option<(Pin<Box<Sleep>>, Instant)>,
    eof: bool,
}

impl<I> HoldShutdownAck<I> {
    pub(crate) fn new(io: I) -> HoldShutdownAck<I> {
        HoldShutdownAck {
            io,
            frames: Frames::new(),
            timer: None,
            eof: false,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HoldShutdownAck<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let ready = this.frames.ready();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.frames.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.frames.holding() {
                let now = Instant::now();
                let new_stream = this.frames.take_new_stream();
                let (sleep, latest) = this
                    .timer
                    .get_or_insert_with(|| (Box::pin(tokio::time::sleep(SETTLE)), now + MAX_HOLD));
                if new_stream {
                    sleep.as_mut().reset((now + SETTLE).min(*latest));
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    this.timer = None;
                    this.frames.release();
                    continue;
                }
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let read = &buf.filled()[before..];
            if read.is_empty() {
                this.eof = true;
                this.timer = None;
                this.frames.end();
            } else {
                this.frames.push(read);
            }
            buf.set_filled(before);
        }
    }
}

write_through!(HoldShutdownAck<I>, io, I);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ping(flags: u8, payload: [u8; 8]) -> Vec<u8> {
        frame(TYPE_PING, flags, 0, &payload)
    }

    fn headers(stream: u32) -> Vec<u8> {
        frame(TYPE_HEADERS, 0x5, stream, &[0x82, 0x86, 0x84])
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
    }

    fn data(stream: u32, n: usize) -> Vec<u8> {
        frame(0x0, 0, stream, &vec![7; n])
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// Feeds `input` in pieces of `chunk` bytes, taking what is ready
    /// after each.
    fn feed(f: &mut Frames, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            f.push(piece);
            out.extend_from_slice(f.ready());
            let n = f.ready().len();
            f.advance(n);
        }
        out
    }

    fn take(f: &mut Frames) -> Vec<u8> {
        let out = f.ready().to_vec();
        f.advance(out.len());
        out
    }

    const ACK: u8 = FLAG_ACK;
    const OTHER: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[test]
    fn frames_pass_unchanged_in_any_split() {
        let input = cat(&[
            PREFACE,
            &settings(),
            &headers(1),
            &data(1, 40),
            &ping(0, OTHER),
            &ping(ACK, OTHER),
            &headers(3),
        ]);
        for chunk in [1, 2, 5, 9, 17, 24, 1000] {
            let mut f = Frames::new();
            assert_eq!(feed(&mut f, &input, chunk), input, "chunks of {chunk}");
            assert!(!f.holding());
        }
    }

    #[test]
    fn other_pings_pass() {
        // A PING (not an ack) with the shutdown payload, an ack with
        // another payload, and a shutdown-payload ack on a stream (a
        // protocol error for hyper to see): none is kept.
        let on_stream = frame(TYPE_PING, ACK, 1, &SHUTDOWN_PAYLOAD);
        let input = cat(&[
            PREFACE,
            &ping(0, SHUTDOWN_PAYLOAD),
            &ping(ACK, OTHER),
            &on_stream,
        ]);
        let mut f = Frames::new();
        assert_eq!(feed(&mut f, &input, 3), input);
        assert!(!f.holding());
    }

    #[test]
    fn the_shutdown_ack_waits_and_late_headers_in_the_same_read_pass_first() {
        let mut f = Frames::new();
        f.push(&cat(&[PREFACE, &settings(), &headers(1)]));
        assert_eq!(take(&mut f), cat(&[PREFACE, &settings(), &headers(1)]));
        f.take_new_stream();
        // The ack, and behind it the HEADERS the client had queued, in one
        // read: the HEADERS go on, the ack waits.
        f.push(&cat(&[
            &ping(ACK, SHUTDOWN_PAYLOAD),
            &headers(3),
            &headers(5),
        ]));
        assert!(f.holding());
        assert_eq!(take(&mut f), cat(&[&headers(3), &headers(5)]));
        assert!(f.take_new_stream());
        assert!(!f.take_new_stream());
        f.release();
        assert!(!f.holding());
        assert_eq!(take(&mut f), ping(ACK, SHUTDOWN_PAYLOAD));
        // A second ack with that payload is not the shutdown's: it passes.
        f.push(&ping(ACK, SHUTDOWN_PAYLOAD));
        assert_eq!(take(&mut f), ping(ACK, SHUTDOWN_PAYLOAD));
    }

    #[test]
    fn a_shutdown_ack_split_across_reads_is_kept() {
        for chunk in 1..=PING_LEN {
            let mut f = Frames::new();
            let input = cat(&[PREFACE, &ping(ACK, SHUTDOWN_PAYLOAD), &headers(1)]);
            assert_eq!(
                feed(&mut f, &input, chunk),
                cat(&[PREFACE, &headers(1)]),
                "chunks of {chunk}"
            );
            assert!(f.holding());
            f.release();
            assert_eq!(take(&mut f), ping(ACK, SHUTDOWN_PAYLOAD));
        }
    }

    #[test]
    fn a_new_stream_is_a_higher_id_not_trailers() {
        let mut f = Frames::new();
        f.push(&cat(&[PREFACE, &headers(5)]));
        assert!(f.take_new_stream());
        f.push(&headers(5));
        f.push(&headers(3));
        assert!(!f.take_new_stream());
        f.push(&headers(7));
        assert!(f.take_new_stream());
    }

    #[test]
    fn the_ack_goes_on_at_a_frame_boundary() {
        let mut f = Frames::new();
        let d = data(1, 100);
        f.push(&cat(&[PREFACE, &ping(ACK, SHUTDOWN_PAYLOAD), &d[..50]]));
        assert_eq!(take(&mut f), cat(&[PREFACE, &d[..50]]));
        // Released in the middle of the DATA frame: it follows the frame.
        f.release();
        assert!(take(&mut f).is_empty());
        f.push(&cat(&[&d[50..], &headers(3)]));
        assert_eq!(
            take(&mut f),
            cat(&[&d[50..], &ping(ACK, SHUTDOWN_PAYLOAD), &headers(3)])
        );
        // A partial header waiting when it is released: the ack goes
        // before it.
        let mut f = Frames::new();
        let h = headers(1);
        f.push(&cat(&[PREFACE, &ping(ACK, SHUTDOWN_PAYLOAD), &h[..4]]));
        assert_eq!(take(&mut f), PREFACE);
        f.release();
        f.push(&h[4..]);
        assert_eq!(take(&mut f), cat(&[&ping(ACK, SHUTDOWN_PAYLOAD), &h]));
    }

    #[test]
    fn an_oversized_frame_passes_without_being_buffered() {
        // Length 2^24-1, more than any max frame size: its bytes pass as
        // they come, and only its 9-byte header was ever looked at.
        let mut f = Frames::new();
        let mut big = vec![0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1];
        big.extend_from_slice(&[0; 1000]);
        f.push(&cat(&[PREFACE, &big]));
        assert_eq!(take(&mut f), cat(&[PREFACE, &big]));
        // What follows is still payload, even if it looks like the ack.
        f.push(&ping(ACK, SHUTDOWN_PAYLOAD));
        assert_eq!(take(&mut f), ping(ACK, SHUTDOWN_PAYLOAD));
        assert!(!f.holding());
    }

    #[test]
    fn bytes_without_the_preface_pass_unscanned() {
        let mut f = Frames::new();
        let input = cat(&[b"GET / HTTP/1.1\r\n", &ping(ACK, SHUTDOWN_PAYLOAD)]);
        assert_eq!(feed(&mut f, &input, 4), input);
        assert!(!f.holding());
    }

    #[test]
    fn the_end_passes_everything() {
        let mut f = Frames::new();
        let h = headers(1);
        f.push(&cat(&[PREFACE, &ping(ACK, SHUTDOWN_PAYLOAD), &h[..4]]));
        assert_eq!(take(&mut f), PREFACE);
        f.end();
        assert!(!f.holding());
        assert_eq!(take(&mut f), cat(&[&ping(ACK, SHUTDOWN_PAYLOAD), &h[..4]]));
    }

    /// Reads one frame: (type, flags, stream, payload).
    async fn read_frame(io: &mut tokio::io::DuplexStream) -> (u8, u8, u32, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut h = [0; HEADER_LEN];
        io.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        (h[3], h[4], stream, payload)
    }

    /// hyper's graceful shutdown, with a client that answers its PING and
    /// sends a stream it had queued in the same write: the stream is
    /// answered, and the final GOAWAY names it. (Without the hold, h2 reads
    /// the ack first and refuses the stream.) Also checks that h2 still
    /// uses the shutdown payload this module looks for.
    #[tokio::test]
    async fn a_stream_behind_the_shutdown_ack_is_taken() {
        use tokio::io::AsyncWriteExt;
        const TYPE_GOAWAY: u8 = 0x7;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (leave, left) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("hi")))
            });
            let builder =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            let io = hyper_util::rt::TokioIo::new(HoldShutdownAck::new(server));
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = left => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        });
        client
            .write_all(&cat(&[PREFACE, &frame(0x4, 0, 0, &[])]))
            .await
            .unwrap();
        leave.send(()).unwrap();
        let mut goaways = Vec::new();
        let mut answered = false;
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut client).await;
            match kind {
                0x4 if flags & FLAG_ACK == 0 => {
                    client
                        .write_all(&frame(0x4, FLAG_ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                TYPE_GOAWAY => {
                    let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    assert_eq!(code, 0, "NO_ERROR");
                    goaways.push(last);
                    if last != 0x7fff_ffff {
                        break;
                    }
                }
                TYPE_PING => {
                    assert_eq!(flags & FLAG_ACK, 0);
                    assert_eq!(payload, SHUTDOWN_PAYLOAD, "h2's shutdown PING payload");
                    assert_eq!(goaways, [0x7fff_ffff], "the first GOAWAY came before");
                    // The ack and, behind it, a stream queued before the
                    // GOAWAY was read: one write.
                    let mut ack = ping(FLAG_ACK, SHUTDOWN_PAYLOAD);
                    ack.extend_from_slice(&headers(1));
                    client.write_all(&ack).await.unwrap();
                }
                TYPE_HEADERS if stream == 1 => answered = true,
                _ => {}
            }
        }
        assert_eq!(goaways, [0x7fff_ffff, 1], "the final GOAWAY takes stream 1");
        // The response may come after the GOAWAY: read to the end.
        while !answered {
            let (kind, _, stream, _) = read_frame(&mut client).await;
            answered = kind == TYPE_HEADERS && stream == 1;
        }
        drop(client);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_io_hands_the_ack_on_after_the_settle_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let mut server = HoldShutdownAck::new(server);
        let mut buf = vec![0; 4096];
        client
            .write_all(&cat(&[PREFACE, &ping(ACK, SHUTDOWN_PAYLOAD), &headers(1)]))
            .await
            .unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(buf[..n], cat(&[PREFACE, &headers(1)]));
        let kept = Instant::now();
        client.write_all(&headers(3)).await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(buf[..n], headers(3));
        // A new stream came behind the ack: it waits SETTLE after that.
        let renewed = Instant::now();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(buf[..n], ping(ACK, SHUTDOWN_PAYLOAD));
        assert!(renewed.elapsed() >= SETTLE, "{:?}", renewed.elapsed());
        assert!(kept.elapsed() < MAX_HOLD, "{:?}", kept.elapsed());
        // Then the client's close is the end.
        drop(client);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }
}
