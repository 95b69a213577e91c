//! TLS for the protocol rows: certificates made at run time (a CA of the
//! bench's own, the tests' `TestCa`, and a leaf for `localhost` signed by
//! it, renewed before every reload), the rustls client configuration, a
//! blocking `/healthz` probe over TLS, and the TLS connection the
//! HTTP/1.1 load client ([`crate::load::H1Plan`]) runs over.
//!
//! No private key is committed anywhere: every run makes its own, in a
//! temporary directory that goes with the run.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pid_server_test_support::tls::TestCa;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

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
