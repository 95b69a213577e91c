//! An HTTP/2 client for the tests (the `h2` crate, on a runtime of its
//! own, behind a blocking API like the rest of the support crate): with
//! prior knowledge over plain TCP (`h2c`), or by ALPN over TLS.
//!
//! Strict like [`crate::http`]: a stream that was sent and then reset or
//! refused is an error. A request the client never sent because the
//! server had already said GOAWAY is [`H2Error::GoingAway`]: the one case
//! where opening a new connection is what HTTP/2 asks of a client, not a
//! retry.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

use crate::http::TIMEOUT;

/// Why a request got no answer.
#[derive(Debug)]
pub enum H2Error {
    /// The server had sent GOAWAY; the request was not sent.
    GoingAway,
    /// Anything else: a failure.
    Failed(String),
}

impl std::fmt::Display for H2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H2Error::GoingAway => write!(f, "the connection is going away (GOAWAY)"),
            H2Error::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// One HTTP/2 connection.
pub struct H2Conn {
    rt: Runtime,
    send: SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    tls_resumed: Option<bool>,
    /// This end's address: what the server sees as the peer.
    local: SocketAddr,
}

/// A request under way on a connection.
pub struct Started {
    response: tokio::task::JoinHandle<Result<(u16, String), H2Error>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> H2Error {
    H2Error::Failed(format!("{what}: {e}"))
}

/// An HTTP/2 connection, opened: what sends streams on it, the task that
/// drives it (it ends with the connection), and what the handshake said.
pub struct Opened {
    pub send: SendRequest<Bytes>,
    pub driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    /// This end's address: what the server sees as the peer.
    pub local: SocketAddr,
    /// Over TLS, whether the session was resumed; `None` for h2c.
    pub resumed: Option<bool>,
}

/// Why a connection could not be opened, by step.
#[derive(Debug)]
pub enum OpenError {
    Connect(io::Error),
    Tls(io::Error),
    /// The server chose another protocol (or none) by ALPN.
    Alpn(Option<Vec<u8>>),
    Handshake(h2::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Connect(e) => write!(f, "connect: {e}"),
            OpenError::Tls(e) => write!(f, "TLS handshake: {e}"),
            OpenError::Alpn(p) => write!(
                f,
                "ALPN chose {:?}, not h2",
                p.as_deref().map(String::from_utf8_lossy)
            ),
            OpenError::Handshake(e) => write!(f, "h2 handshake: {e}"),
        }
    }
}

/// Opens an HTTP/2 connection to `addr` on the current tokio runtime: with
/// prior knowledge (h2c) without `tls`, otherwise over TLS with ALPN `h2`
/// ([`crate::tls::connect`]). The connection of the tests' [`H2Conn`] and
/// of the benchmark's HTTP/2 load client. Unbounded in time: the caller
/// puts its timeout around it.
pub async fn open(
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    builder: &h2::client::Builder,
) -> Result<Opened, OpenError> {
    assert!(addr.ip().is_loopback(), "loopback only, not {addr}");
    match tls {
        None => {
            let tcp = TcpStream::connect(addr).await.map_err(OpenError::Connect)?;
            tcp.set_nodelay(true).map_err(OpenError::Connect)?;
            let local = tcp.local_addr().map_err(OpenError::Connect)?;
            handshake(tcp, builder, local, None).await
        }
        Some(config) => {
            let tls = crate::tls::connect(addr, config)
                .await
                .map_err(OpenError::Tls)?;
            let (tcp, c) = tls.get_ref();
            let local = tcp.local_addr().map_err(OpenError::Connect)?;
            if c.alpn_protocol() != Some(b"h2") {
                return Err(OpenError::Alpn(c.alpn_protocol().map(<[u8]>::to_vec)));
            }
            let resumed = Some(c.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
            handshake(tls, builder, local, resumed).await
        }
    }
}

/// The HTTP/2 handshake over `io`, and the task that drives the connection.
async fn handshake<T>(
    io: T,
    builder: &h2::client::Builder,
    local: SocketAddr,
    resumed: Option<bool>,
) -> Result<Opened, OpenError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = builder.handshake(io).await.map_err(OpenError::Handshake)?;
    Ok(Opened {
        send,
        driver: tokio::spawn(conn),
        local,
        resumed,
    })
}

impl H2Conn {
    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// `h2c`: HTTP/2 with prior knowledge on a plain connection.
    pub fn connect(addr: SocketAddr) -> Result<H2Conn, H2Error> {
        Self::connect_with(addr, &h2::client::Builder::new())
    }

    /// `h2c`, announcing `window` as every stream's initial flow-control
    /// window (`SETTINGS_INITIAL_WINDOW_SIZE`): with 0, the server can send
    /// no response body until the client opens the window, which this
    /// client does only as it reads ([`H2Conn::start_slowly`]).
    pub fn connect_window(addr: SocketAddr, window: u32) -> Result<H2Conn, H2Error> {
        Self::connect_with(addr, h2::client::Builder::new().initial_window_size(window))
    }

    fn connect_with(addr: SocketAddr, builder: &h2::client::Builder) -> Result<H2Conn, H2Error> {
        Self::open_with(addr, None, builder)
    }

    /// HTTP/2 over TLS; `config` must offer `h2` by ALPN.
    pub fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<H2Conn, H2Error> {
        Self::open_with(addr, Some(config), &h2::client::Builder::new())
    }

    fn open_with(
        addr: SocketAddr,
        tls: Option<Arc<ClientConfig>>,
        builder: &h2::client::Builder,
    ) -> Result<H2Conn, H2Error> {
        let rt = Self::runtime();
        let opened = rt.block_on(async {
            tokio::time::timeout(TIMEOUT, open(addr, tls, builder))
                .await
                .map_err(|e| failed("connect", e))?
                .map_err(|e| H2Error::Failed(e.to_string()))
        })?;
        Ok(H2Conn {
            rt,
            send: opened.send,
            driver: opened.driver,
            tls_resumed: opened.resumed,
            local: opened.local,
        })
    }

    /// This end's address, as the server sees it.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the TLS session was resumed (`None` for `h2c`).
    pub fn tls_resumed(&self) -> Option<bool> {
        self.tls_resumed
    }

    /// Opens a stream for GET `path` and returns at once.
    pub fn start(&mut self, path: &str) -> Result<Started, H2Error> {
        self.start_reading(path, Duration::ZERO, TIMEOUT)
    }

    /// [`H2Conn::start`] on a connection whose window is 0
    /// ([`H2Conn::connect_window`]): the client never reads the body, and
    /// waits up to `within` for the server to end the stream (an error).
    pub fn start_stalled(&mut self, path: &str, within: Duration) -> Result<Started, H2Error> {
        self.start_reading(path, Duration::ZERO, within)
    }

    /// [`H2Conn::start`] for a slow reader: it waits `pause` after each
    /// chunk of the body before it opens the window by that chunk's size.
    pub fn start_slowly(&mut self, path: &str, pause: Duration) -> Result<Started, H2Error> {
        self.start_reading(path, pause, TIMEOUT.max(pause * 64))
    }

    fn start_reading(
        &mut self,
        path: &str,
        pause: Duration,
        within: Duration,
    ) -> Result<Started, H2Error> {
        let req = http::Request::get(format!("http://localhost{path}"))
            .body(())
            .unwrap();
        let send = self.send.clone();
        let response = self.rt.block_on(async move {
            let mut send = tokio::time::timeout(TIMEOUT, send.ready())
                .await
                .map_err(|e| failed("ready", e))?
                .map_err(sent_error)?;
            let (resp, _) = send.send_request(req, true).map_err(sent_error)?;
            Ok::<_, H2Error>(tokio::spawn(async move {
                let read = async {
                    let resp = resp.await.map_err(|e| {
                        if e.is_go_away()
                            && e.is_remote()
                            && e.reason() == Some(h2::Reason::NO_ERROR)
                        {
                            H2Error::GoingAway
                        } else {
                            failed("response", e)
                        }
                    })?;
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    let mut text = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.map_err(|e| failed("body", e))?;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                        let _ = body.flow_control().release_capacity(chunk.len());
                        text.extend_from_slice(&chunk);
                    }
                    let text = String::from_utf8(text).map_err(|e| failed("body", e))?;
                    Ok((status, text))
                };
                tokio::time::timeout(within, read)
                    .await
                    .map_err(|e| failed("response", e))?
            }))
        })?;
        Ok(Started { response })
    }

    /// Waits for a started request's answer: (status, body).
    pub fn finish(&self, s: Started) -> Result<(u16, String), H2Error> {
        self.rt
            .block_on(s.response)
            .map_err(|e| failed("task", e))?
    }

    /// Opens `n` streams and resets each at once (`RST_STREAM` CANCEL),
    /// before the server can answer: a rapid-reset attack. `Ok` if the
    /// connection was still open when they were sent.
    pub fn reset_streams(&mut self, n: usize) -> Result<(), H2Error> {
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut send = send;
            for _ in 0..n {
                send = tokio::time::timeout(TIMEOUT, send.ready())
                    .await
                    .map_err(|e| failed("ready", e))?
                    .map_err(sent_error)?;
                let req = http::Request::get("http://localhost/").body(()).unwrap();
                let (_, mut stream) = send.send_request(req, false).map_err(sent_error)?;
                stream.send_reset(h2::Reason::CANCEL);
            }
            Ok(())
        })
    }

    /// GET `path`: (status, body).
    pub fn get(&mut self, path: &str) -> Result<(u16, String), H2Error> {
        let s = self.start(path)?;
        self.finish(s)
    }

    /// Waits until the server has closed the connection (after GOAWAY and
    /// its last stream), within `within`; `Ok` with how the connection
    /// ended.
    pub fn wait_closed(self, within: Duration) -> Result<Result<(), String>, String> {
        let H2Conn {
            rt, driver, send, ..
        } = self;
        drop(send);
        rt.block_on(async {
            match tokio::time::timeout(within, driver).await {
                Err(_) => Err("still open".to_string()),
                Ok(Err(e)) => Err(format!("driver task: {e}")),
                Ok(Ok(r)) => Ok(r.map_err(|e| e.to_string())),
            }
        })
    }
}

/// A request the client could not send: GOAWAY from the server is the
/// one expected case.
fn sent_error(e: h2::Error) -> H2Error {
    if e.is_go_away() && e.is_remote() {
        H2Error::GoingAway
    } else {
        failed("send", e)
    }
}

/// What an [`H2Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct H2Tally {
    pub ok: u64,
    /// Every failure, with what it was.
    pub failed: Vec<String>,
    /// Answers by PID.
    pub by_pid: std::collections::BTreeMap<u32, u64>,
    /// Connections opened.
    pub connections: u64,
    /// Connections that ended with a GOAWAY seen by a request.
    pub goaways: u64,
    /// Streams that failed with the server's GOAWAY (NO_ERROR): sent while
    /// the GOAWAY was on its way, above its last stream id, so never
    /// processed (RFC 9113, 6.8: safe to retry). Not retried here.
    pub unprocessed: u64,
}

/// A client that keeps one HTTP/2 connection and sends `streams`
/// concurrent requests on it in rounds, opening a new connection only
/// after the server said GOAWAY (or the connection ended with every stream
/// answered). Bounded in time.
pub struct H2Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tally: Arc<std::sync::Mutex<H2Tally>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl H2Load {
    pub fn start(
        connect: impl Fn() -> Result<H2Conn, H2Error> + Send + 'static,
        path: &str,
        streams: usize,
        max_time: Duration,
    ) -> H2Load {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tally = Arc::new(std::sync::Mutex::new(H2Tally::default()));
        let (s, t, path) = (stop.clone(), tally.clone(), path.to_string());
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + max_time;
            let mut conn: Option<H2Conn> = None;
            while !s.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match connect() {
                        Ok(c) => {
                            t.lock().unwrap().connections += 1;
                            conn.insert(c)
                        }
                        Err(e) => {
                            t.lock().unwrap().failed.push(format!("connect: {e}"));
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    },
                };
                let mut started = Vec::new();
                let mut going_away = false;
                for _ in 0..streams {
                    match c.start(&path) {
                        Ok(st) => started.push(st),
                        Err(H2Error::GoingAway) => going_away = true,
                        Err(e) => t.lock().unwrap().failed.push(format!("start: {e}")),
                    }
                }
                for st in started {
                    let r = c.finish(st);
                    let mut t = t.lock().unwrap();
                    match r {
                        Ok((200, body)) => {
                            t.ok += 1;
                            if let Some(pid) = crate::http::pid_in(&body) {
                                *t.by_pid.entry(pid).or_default() += 1;
                            }
                        }
                        Ok((status, body)) => t.failed.push(format!("{status}: {body:?}")),
                        Err(H2Error::GoingAway) => t.unprocessed += 1,
                        Err(e) => t.failed.push(format!("stream: {e}")),
                    }
                }
                if going_away {
                    t.lock().unwrap().goaways += 1;
                    conn = None;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        H2Load {
            stop,
            tally,
            thread: Some(thread),
        }
    }

    pub fn snapshot(&self) -> H2Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Waits until `pid` has answered at least `n` requests.
    pub fn wait_answers_from(&self, pid: u32, n: u64, within: Duration) {
        let mut t = self.snapshot();
        crate::wait::within(within, || {
            t = self.snapshot();
            (t.by_pid.get(&pid).copied().unwrap_or(0) >= n).then_some(())
        })
        .unwrap_or_else(|| {
            panic!("PID {pid} did not answer {n} HTTP/2 requests within {within:?}: {t:?}")
        });
    }

    pub fn finish(mut self) -> H2Tally {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.snapshot()
    }
}

impl Drop for H2Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
