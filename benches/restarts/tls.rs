//! TLS for the protocol rows: certificates made at run time (a CA of the
//! bench's own and a leaf for `localhost` signed by it, renewed before every
//! reload), the rustls client configurations, a blocking `/healthz` probe
//! over TLS, and the TLS HTTP/1.1 load client.
//!
//! No private key is committed anywhere: every run makes its own, in a
//! temporary directory that goes with the run.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::load::{Conn, FailRec, Kind, Rec, Rng, classify, pause, record};
use crate::procs::{TempDir, aborted};

/// The name the leaf is for, and the client asks for.
const SERVER_NAME: &str = "localhost";

/// A CA and the current leaf, as PEM files that pid-server and nginx read.
pub(crate) struct Certs {
    /// Holds the files; removed with them when the run ends.
    _dir: TempDir,
    /// The leaf and the CA (a full chain), PEM.
    pub(crate) cert: PathBuf,
    /// The leaf's PKCS#8 key, PEM, mode 0600.
    pub(crate) key: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// Leaves issued so far (each renewal gets the next serial number).
    pub(crate) issued: u64,
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

impl Certs {
    /// A new CA and a first leaf, written to a temporary directory.
    pub(crate) fn new() -> Result<Certs, String> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e("CA"))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pid-server bench CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().map_err(e("CA key"))?;
        let ca = ca_params.self_signed(&ca_key).map_err(e("CA"))?;
        let dir = TempDir::new("tls")?;
        let mut certs = Certs {
            cert: dir.0.join("cert.pem"),
            key: dir.0.join("key.pem"),
            _dir: dir,
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            ca_params,
            ca_key,
            issued: 0,
        };
        certs.renew()?;
        Ok(certs)
    }

    /// A new key and leaf for `localhost` and 127.0.0.1, written over the
    /// files (each through a rename, so a reader sees the old file or the
    /// new one): what `certbot renew` does before `systemctl reload`.
    pub(crate) fn renew(&mut self) -> Result<(), String> {
        self.issued += 1;
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])
            .map_err(e("leaf"))?;
        p.distinguished_name.push(
            DnType::CommonName,
            format!("pid-server bench leaf {}", self.issued),
        );
        p.serial_number = Some(SerialNumber::from(self.issued));
        let key = KeyPair::generate().map_err(e("leaf key"))?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let leaf = p.signed_by(&key, &issuer).map_err(e("leaf"))?;
        write_atomic(&self.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(
            &self.cert,
            format!("{}{}", leaf.pem(), self.ca_pem).as_bytes(),
            0o644,
        )
    }

    /// A client that trusts only the bench's CA, TLS 1.3, offering `alpn`
    /// (rustls' ring provider, as pid-server uses; session resumption as
    /// rustls does by default, like a browser's).
    pub(crate) fn client(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(e("trust the bench CA"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(e("TLS client"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|err| format!("create {}: {err}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|err| format!("write {}: {err}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|err| format!("rename to {}: {err}", path.display()))
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
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    v.get("pid")?.as_u64().map(|p| p as u32)
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
        let mut rng = self
            .pause
            .map(|(_, _, seed)| Rng(seed ^ task.wrapping_mul(0xa076_1d64_78bd_642f)));
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
                pause(rng.between(lo, hi), &stop, self.deadline).await;
            }
        }
        (recs, fails)
    }
}
