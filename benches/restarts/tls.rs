//! TLS for the protocol rows: certificates made at run time (a CA of the
//! bench's own, the tests' `TestCa`, and a leaf for `localhost` signed by
//! it, renewed before every reload), the rustls client configuration, a
//! blocking `/healthz` probe over TLS, and the TLS HTTP/1.1 load client.
//!
//! No private key is committed anywhere: every run makes its own, in a
//! temporary directory that goes with the run.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use pid_server_test_support::tls::TestCa;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use pid_server_test_support::load::pause_in;

use crate::load::{Conn, FailRec, Kind, Rec, classify, pause, pause_rng, record};
use crate::procs::{TempDir, aborted};

/// The name the leaf is for, and the client asks for.
const SERVER_NAME: &str = "localhost";

/// A CA and the current leaf, as PEM files that pid-server and nginx read.
pub(crate) struct Certs {
    /// Holds the files; removed with them when the run ends.
    dir: TempDir,
    /// The leaf, PEM.
    pub(crate) cert: PathBuf,
    /// The leaf's PKCS#8 key, PEM, mode 0600.
    pub(crate) key: PathBuf,
    ca: TestCa,
    /// Leaves issued so far (each renewal is the next, by its name).
    pub(crate) issued: u64,
}

impl Certs {
    /// A new CA and a first leaf, written to a temporary directory.
    pub(crate) fn new() -> Result<Certs, String> {
        let dir = TempDir::new("tls")?;
        let ca = TestCa::new();
        let (cert, key) = ca.write_leaf(&dir.0, "leaf", "pid-server bench leaf 1");
        Ok(Certs {
            dir,
            cert,
            key,
            ca,
            issued: 1,
        })
    }

    /// A new key and leaf for `localhost` and 127.0.0.1, written over the
    /// files (each through a rename, so a reader sees the old file or the
    /// new one): what `certbot renew` does before `systemctl reload`.
    pub(crate) fn renew(&mut self) {
        self.issued += 1;
        let cn = format!("pid-server bench leaf {}", self.issued);
        self.ca.write_leaf(&self.dir.0, "leaf", &cn);
    }

    /// A client that trusts only the bench's CA, TLS 1.3, offering `alpn`
    /// (rustls' ring provider, as pid-server uses; session resumption as
    /// rustls does by default, like a browser's).
    pub(crate) fn client(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS client: {e}"))?
            .with_root_certificates(self.ca.roots())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// TCP, then a TLS handshake for `localhost` with the config's ALPN list.
pub(crate) async fn connect(
    port: u16,
    cfg: &Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    TlsConnector::from(cfg.clone()).connect(name, tcp).await
}

/// The PID `/healthz` reports over a new TLS connection (HTTP/1.1), blocking.
fn healthz_pid(port: u16, cfg: &Arc<ClientConfig>) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = StdTcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    let name = ServerName::try_from(SERVER_NAME).ok()?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    // A server that closes without close_notify ends this with an error;
    // what arrived before counts.
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    pid_server_test_support::http::healthz_pid(body)
}

/// Polls `/healthz` over TLS (a new connection each time) until it reports
/// `pid`.
pub(crate) fn wait_for_pid(
    port: u16,
    pid: u32,
    cfg: &Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if healthz_pid(port, cfg) == Some(pid) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "PID {pid} did not answer /healthz over TLS on port {port} within {timeout:?}"
            ));
        }
        if aborted() {
            return Err("interrupted".into());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// One TLS HTTP/1.1 client connection slot, a closed loop: keep-alive
/// (the connection is reused until the server says `Connection: close` or
/// a request on it fails; never retried), paused (the same, idle a random
/// time between requests, as the plain paused clients) or one-shot (a new
/// connection, and handshake, per request). The same response parser as
/// the plain client's ([`Conn`]).
pub(crate) struct H1Slot {
    pub(crate) port: u16,
    pub(crate) cfg: Arc<ClientConfig>,
    pub(crate) keep_alive: bool,
    /// Paused clients: the idle time after each answer is drawn uniformly
    /// from this range, seeded per slot.
    pub(crate) pause: Option<(Duration, Duration, u64)>,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
    pub(crate) max_requests: u64,
}

type Tls = Conn<TlsStream<TcpStream>>;

async fn exchange(conn: &mut Option<Tls>, s: &H1Slot, req: &[u8]) -> io::Result<(u16, u32, bool)> {
    let during =
        |step: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{step}: {e}"));
    if conn.is_none() {
        let stream = connect(s.port, &s.cfg).await.map_err(during("connect"))?;
        *conn = Some(Conn {
            stream,
            buf: Vec::with_capacity(1024),
        });
    }
    let c = conn.as_mut().expect("connected above");
    c.stream.write_all(req).await.map_err(during("send"))?;
    c.stream.flush().await.map_err(during("send"))?;
    let r = c.read_response().await.map_err(during("receive"))?;
    Ok((r.status, r.pid, r.close))
}

impl H1Slot {
    pub(crate) async fn run(
        self,
        task: u64,
        t0: Instant,
        stop: Arc<AtomicBool>,
    ) -> (Vec<Rec>, Vec<FailRec>) {
        let req: &[u8] = if self.keep_alive {
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: pid-server-bench\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: pid-server-bench\r\nConnection: close\r\n\r\n"
        };
        let (mut recs, mut fails) = (Vec::with_capacity(8 * 1024), Vec::new());
        let mut conn: Option<Tls> = None;
        let (mut conns, mut sent) = (0u64, 0u64);
        let mut rng = self.pause.map(|(_, _, seed)| pause_rng(seed, task));
        while !stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && sent < self.max_requests
        {
            sent += 1;
            let start = Instant::now();
            let reused = conn.is_some();
            if !reused {
                conns += 1;
            }
            let r = tokio::time::timeout(self.timeout, exchange(&mut conn, &self, req)).await;
            let lat = start.elapsed();
            let (kind, pid, close, error) = match r {
                Ok(Ok((200, pid, close))) => (Kind::Ok, pid, close, None),
                Ok(Ok((status, pid, close))) => {
                    (Kind::Status, pid, close, Some(format!("status {status}")))
                }
                Ok(Err(e)) => (classify(&e), 0, true, Some(e.to_string())),
                Err(_) => (
                    Kind::Timeout,
                    0,
                    true,
                    Some(format!("no response within {:?}", self.timeout)),
                ),
            };
            let (start_us, lat_us) = Rec::times(t0, start, lat);
            let rec = Rec {
                start_us,
                lat_us,
                pid,
                kind,
                reused,
                conn: task << 32 | conns,
                closed: close || !self.keep_alive,
            };
            record(&mut recs, &mut fails, rec, error);
            if !self.keep_alive {
                // Let the server close first (close_notify and FIN: its
                // TIME_WAIT), outside the measured latency.
                if let Some(mut c) = conn.take()
                    && kind == Kind::Ok
                {
                    let mut b = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_millis(200), c.stream.read(&mut b))
                        .await;
                }
            } else if close {
                conn = None;
            }
            if let (Some((lo, hi, _)), Some(rng)) = (self.pause, rng.as_mut()) {
                pause(pause_in(rng, lo, hi), &stop, self.deadline).await;
            }
        }
        (recs, fails)
    }
}
