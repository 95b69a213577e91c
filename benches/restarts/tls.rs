//! TLS for the protocol rows: certificates made at run time (a CA of the
//! bench's own, the tests' `TestCa`, and a leaf for `localhost` signed by
//! it, renewed before every reload), the rustls client configuration, a
//! blocking `/healthz` probe over TLS, and the TLS connection the
//! HTTP/1.1 load client ([`crate::load::H1Plan`]) runs over.
//!
//! No private key is committed anywhere: every run makes its own, in a
//! temporary directory that goes with the run.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pid_server_test_support::http;
use pid_server_test_support::tls::{self, TestCa, TlsConn};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::procs::{TempDir, aborted};

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
    pub(crate) fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.ca.client_tls13(alpn)
    }
}

/// TCP, then a TLS handshake for `localhost` with the config's ALPN list.
pub(crate) async fn connect(
    port: u16,
    cfg: &Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    tls::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), cfg.clone()).await
}

/// The PID `/healthz` reports over a new TLS connection (HTTP/1.1), blocking.
fn healthz_pid(port: u16, cfg: &Arc<ClientConfig>) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conn = TlsConn::open_timeout(addr, cfg.clone(), Duration::from_secs(1)).ok()?;
    let r = conn.get("/healthz").ok()?;
    (r.status == 200).then(|| http::healthz_pid(&r.body))?
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
