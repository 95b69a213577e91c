//! The one HTTP/1.1 client of the tests (and, in [`aio`], of the bench).
//!
//! Deliberately strict, so that neither a server bug nor a client bug can
//! hide: a request that fails on a reused keep-alive connection is a
//! failure, never retried; a response must be exactly HTTP/1.1, with CRLF
//! line ends, well-formed headers, one length (`Content-Length` or chunked,
//! not both, no conflicting values), a UTF-8 body that is all there, and
//! after a request that asked to close, nothing but the end of the
//! connection.
//!
//! Every error keeps its [`io::ErrorKind`] (the load counts failures by it)
//! and says where it happened (`connect: `, `write: `, `read: `, and for a
//! [`Client`] `on a new connection: ` or `on a reused connection (after N
//! responses): `).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub mod aio;

/// The connect, read and write timeout unless a caller picks another.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A response's status line and headers (or a chunked body's size lines)
/// longer than this are refused.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// A body longer than this is refused (pid-server's are a few bytes).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The server said `Connection: close`.
    pub close: bool,
    /// Read on a connection that had carried an earlier response.
    pub reused: bool,
    /// The `N` of a `Keep-Alive: timeout=N` header: how long the server
    /// says it keeps the connection idle.
    pub keep_alive: Option<u64>,
}

impl Response {
    /// The PID in the body, see [`pid_in`].
    pub fn pid(&self) -> Option<u32> {
        pid_in(&self.body)
    }
}

/// The PID in a body that is exactly `OK. Handled by PID: <digits>\n`
/// (pid-server) or `hello from PID <digits>\n` (the library's example),
/// whatever protocol carried it.
pub fn pid_in(body: &str) -> Option<u32> {
    let digits = body
        .strip_prefix("OK. Handled by PID: ")
        .or_else(|| body.strip_prefix("hello from PID "))?
        .strip_suffix('\n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The PID in a `/healthz` body (JSON with a `pid` field).
pub fn healthz_pid(body: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    v.get("pid")?.as_u64()?.try_into().ok()
}

/// The value of the metric `name` (its full name, without labels) in a
/// `/metrics` body.
pub fn metric_in(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(crate) fn eof(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.to_string())
}

/// `e` with `what` in front of its message, same kind.
pub fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    assert!(
        addr.ip().is_loopback(),
        "the tests talk to loopback only (the host's or a test-made network namespace's), \
         not to {addr}"
    );
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| context(e, "connect"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A connection whose receive buffer is the kernel's smallest (about 2 KB):
/// a response larger than that stays partly in the server's send buffer
/// until the client reads, as with a slow client on a real network.
pub fn connect_small_window(addr: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};
    use std::os::fd::AsRawFd;
    assert!(addr.ip().is_loopback(), "loopback only, not {addr}");
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // Before connect: the window is offered in the handshake.
    socket::setsockopt(&fd, sockopt::RcvBuf, &1)?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| context(e.into(), "connect"))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn write_request(s: &mut TcpStream, addr: SocketAddr, path: &str, close: bool) -> io::Result<()> {
    let close = if close { "Connection: close\r\n" } else { "" };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: pid-server-tests\r\n{close}\r\n"
    );
    s.write_all(request.as_bytes())
        .map_err(|e| context(e, "write"))
}

/// One line ending in CRLF, without it; `None` at a clean end of input.
/// `budget` is what is left of [`MAX_HEAD`].
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(bad(format!("response head over {MAX_HEAD} bytes")));
    }
    *budget -= n;
    if !buf.ends_with(b"\n") {
        return Err(eof("connection closed in the middle of a line"));
    }
    if !buf.ends_with(b"\r\n") {
        return Err(bad(format!(
            "a line ending in LF, not CRLF: {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    buf.truncate(n - 2);
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| bad("a header line that is not UTF-8"))
}

/// `HTTP/1.1 NNN reason` → NNN (200–599; an interim 1xx is not expected).
pub(crate) fn parse_status_line(line: &str) -> io::Result<u16> {
    let wrong = || bad(format!("bad status line {line:?}"));
    let rest = line.strip_prefix("HTTP/1.1 ").ok_or_else(wrong)?;
    let (code, reason) = rest.split_at_checked(3).ok_or_else(wrong)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || !(reason.is_empty() || reason.starts_with(' '))
    {
        return Err(wrong());
    }
    let code: u16 = code.parse().map_err(|_| wrong())?;
    if !(200..600).contains(&code) {
        return Err(wrong());
    }
    Ok(code)
}

fn parse_length(v: &str) -> io::Result<usize> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("bad content-length {v:?}")));
    }
    match v.parse::<usize>() {
        Ok(n) if n <= MAX_BODY => Ok(n),
        _ => Err(bad(format!("content-length {v} over {MAX_BODY}"))),
    }
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut budget = MAX_HEAD;
    let mut body = Vec::new();
    loop {
        let line =
            read_line(r, &mut budget)?.ok_or_else(|| eof("connection closed in a chunked body"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("bad chunk size line {line:?}")));
        }
        let size = usize::from_str_radix(size, 16)
            .ok()
            .filter(|n| body.len() + n <= MAX_BODY)
            .ok_or_else(|| bad(format!("chunked body over {MAX_BODY} bytes")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(r, &mut budget)?
                .ok_or_else(|| eof("connection closed in the trailers"))?
                .is_empty()
            {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| context(e, "chunk cut short"))?;
        let mut end = [0u8; 2];
        r.read_exact(&mut end)
            .map_err(|e| context(e, "chunk cut short"))?;
        if end != *b"\r\n" {
            return Err(bad("a chunk not followed by CRLF"));
        }
    }
}

/// What a response's headers say about its body and its connection: one
/// set of rules for the blocking client here and the async one
/// ([`aio`]), fed a header line at a time (without its CRLF).
#[derive(Debug, Default)]
pub(crate) struct Fields {
    length: Option<usize>,
    chunked: bool,
    close: bool,
    keep_alive: Option<u64>,
}

/// How a response's body is delimited.
pub(crate) enum Body {
    Length(usize),
    Chunked,
}

impl Fields {
    /// One header line: `name: value`, the name without white space.
    pub(crate) fn header(&mut self, line: &str) -> io::Result<()> {
        let (name, value) = line
            .split_once(':')
            .filter(|(name, _)| !name.is_empty() && !name.contains([' ', '\t']))
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value)?;
            if self.length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length headers"));
            }
            self.length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(bad(format!("unsupported transfer-encoding {value:?}")));
            }
            self.chunked = true;
        } else if name.eq_ignore_ascii_case("keep-alive") {
            self.keep_alive = value.split(',').find_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("timeout")
                    .then(|| v.trim().parse().ok())?
            });
        } else if name.eq_ignore_ascii_case("connection") {
            self.close |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
        Ok(())
    }

    /// The body's delimiting, once every header is in: one length, or
    /// chunked, or (204, 304) none.
    pub(crate) fn body(&self, status: u16) -> io::Result<Body> {
        match (self.chunked, self.length) {
            (true, Some(_)) => Err(bad("both transfer-encoding and content-length")),
            (true, None) => Ok(Body::Chunked),
            (false, Some(n)) => Ok(Body::Length(n)),
            (false, None) if status == 204 || status == 304 => Ok(Body::Length(0)),
            (false, None) => Err(bad("a response with neither content-length nor chunked")),
        }
    }

    /// The server said `Connection: close`.
    pub(crate) fn close(&self) -> bool {
        self.close
    }
}

/// Reads one response from `r`.
pub fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let mut budget = MAX_HEAD;
    let status_line =
        read_line(r, &mut budget)?.ok_or_else(|| eof("connection closed before a response"))?;
    let status = parse_status_line(&status_line)?;
    let mut fields = Fields::default();
    loop {
        let line =
            read_line(r, &mut budget)?.ok_or_else(|| eof("connection closed in the headers"))?;
        if line.is_empty() {
            break;
        }
        fields.header(&line)?;
    }
    let body = match fields.body(status)? {
        Body::Chunked => read_chunked(r)?,
        Body::Length(n) => {
            let mut body = vec![0; n];
            r.read_exact(&mut body)
                .map_err(|e| context(e, &format!("body cut short (content-length {n})")))?;
            body
        }
    };
    let body = String::from_utf8(body).map_err(|_| bad("a body that is not UTF-8"))?;
    Ok(Response {
        status,
        body,
        close: fields.close,
        reused: false,
        keep_alive: fields.keep_alive,
    })
}

/// Parses `raw` as exactly one response (nothing may follow it).
pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let mut rest = raw;
    let r = read_response(&mut rest)?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the response", rest.len())));
    }
    Ok(r)
}

/// `GET path` on a new connection to `addr` that asks the server to close
/// it ([`TIMEOUT`] for connect, write and each read).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    get_timeout(addr, path, TIMEOUT)
}

/// Like [`get`], with another timeout. The server must close the connection
/// after the response, with nothing after it.
pub fn get_timeout(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    let mut s = connect(addr, timeout)?;
    write_request(&mut s, addr, path, true)?;
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r).map_err(|e| context(e, "read"))?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)
        .map_err(|e| context(e, "read after the response"))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes after the response on a connection asked to close",
            rest.len()
        )));
    }
    Ok(resp)
}

/// Polls `GET path` on new connections until it answers 200; panics with
/// the last answer after `timeout`. For the readiness endpoint, which is
/// the signal to wait for when a test cannot see `READY=1`.
pub fn wait_ok(addr: SocketAddr, path: &str, timeout: Duration) {
    let mut r = Err(io::Error::other("not asked yet"));
    crate::wait::within(timeout, || {
        r = get(addr, path);
        matches!(&r, Ok(resp) if resp.status == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("GET {path} on {addr} did not answer 200 within {timeout:?}: {r:?}"));
}

/// One keep-alive connection. After a `Connection: close` or an error it is
/// closed, and [`Conn::get`] fails with `NotConnected`.
pub struct Conn {
    addr: SocketAddr,
    local: SocketAddr,
    reader: BufReader<TcpStream>,
    served: u64,
    closed: bool,
}

impl Conn {
    pub fn open(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = connect(addr, timeout)?;
        Ok(Conn {
            addr,
            local: s.local_addr()?,
            reader: BufReader::new(s),
            served: 0,
            closed: false,
        })
    }

    /// Sends one GET and reads the answer.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is closed",
            ));
        }
        let r = self.exchange(path);
        if r.as_ref().map_or(true, |resp| resp.close) {
            self.closed = true;
        }
        r
    }

    fn exchange(&mut self, path: &str) -> io::Result<Response> {
        write_request(self.reader.get_mut(), self.addr, path, false)?;
        let mut resp = read_response(&mut self.reader).map_err(|e| context(e, "read"))?;
        resp.reused = self.served > 0;
        self.served += 1;
        Ok(resp)
    }

    /// Responses read on this connection.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// The server closed it, or a request on it failed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The client side's address: which socket this is.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// A client that keeps one connection alive, request after request, until
/// the server says `Connection: close` or a request fails; the next request
/// then opens a new connection. Nothing is retried.
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<Conn>,
    connections: u64,
    local: Option<SocketAddr>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client::with_timeout(addr, TIMEOUT)
    }

    pub fn with_timeout(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            addr,
            timeout,
            conn: None,
            connections: 0,
            local: None,
        }
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        let reused = self.conn.is_some();
        if !reused {
            let c = Conn::open(self.addr, self.timeout)
                .map_err(|e| context(e, "on a new connection"))?;
            self.connections += 1;
            self.local = Some(c.local_addr());
            self.conn = Some(c);
        }
        let conn = self.conn.as_mut().expect("connected");
        let served = conn.served();
        let r = conn.get(path);
        if conn.is_closed() {
            self.conn = None;
        }
        r.map_err(|e| {
            if reused {
                context(
                    e,
                    &format!("on a reused connection (after {served} responses)"),
                )
            } else {
                context(e, "on a new connection")
            }
        })
    }

    /// Drops the connection: the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Whether the next request goes out on a connection that is open now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Connections opened so far.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// The client-side address of the connection the last request used.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }
}
