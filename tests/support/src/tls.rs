//! TLS for the tests: a test CA made at test time (no private key is ever
//! committed), certificates it signs written as PEM files, and a strict
//! HTTP/1.1 client over rustls that reports the ALPN protocol, whether the
//! session was resumed, and which certificate the server showed.

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, RootCertStore, StreamOwned};

/// The client configuration [`TestCa::client`] makes.
pub use rustls::ClientConfig;

use crate::http::{self, Response};

/// The name the test certificates are for, and the clients ask for.
pub const SERVER_NAME: &str = "localhost";

/// TCP to `addr` (without Nagle), then a TLS handshake for
/// [`SERVER_NAME`] with `config`'s ALPN list: the async connection under
/// the bench's HTTP/1.1 clients and both HTTP/2 clients.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pid-server test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `localhost` and 127.0.0.1 with `cn` as its common name:
    /// (certificate PEM, key PEM).
    pub fn leaf(&self, cn: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf as `DIR/NAME.crt` and `DIR/NAME.key` (replacing them
    /// atomically, as certbot does with its symlinks; the key mode 0600, as
    /// certbot writes it): (cert, key) paths.
    pub fn write_leaf(&self, dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(cn);
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        for (path, text, mode) in [(&c, cert, 0o644), (&k, key, 0o600)] {
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (c, k)
    }

    /// A root store that trusts this CA alone, for a client built by hand.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    /// A client configuration that trusts this CA and offers `alpn`. Keep
    /// it to resume sessions: its session cache lives in it.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.client_of(rustls::DEFAULT_VERSIONS, alpn)
    }

    /// [`TestCa::client`] offering TLS 1.3 alone (the benchmark's, so that
    /// pid-server and nginx negotiate the same).
    pub fn client_tls13(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.client_of(&[&rustls::version::TLS13], alpn)
    }

    fn client_of(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        // ring, as pid-server uses.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// The common name of a certificate (as [`TestCa::leaf`] set it).
pub fn common_name(der: &[u8]) -> Option<String> {
    // The CN's OID (2.5.4.3) then a UTF8String or PrintableString.
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(oid.len()).rposition(|w| w == oid)? + oid.len();
    let len = *der.get(at + 1)? as usize;
    String::from_utf8(der.get(at + 2..at + 2 + len)?.to_vec()).ok()
}

/// One HTTP/1.1 connection over TLS.
pub struct TlsConn {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
    served: u64,
    closed: bool,
}

impl TlsConn {
    /// Connects and completes the handshake ([`http::TIMEOUT`] for
    /// connect, each read and each write).
    pub fn open(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsConn> {
        Self::open_timeout(addr, config, http::TIMEOUT)
    }

    /// [`TlsConn::open`] with another timeout.
    pub fn open_timeout(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        timeout: Duration,
    ) -> io::Result<TlsConn> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        Self::over(tcp, config)
    }

    /// Completes the handshake over a connection the caller made (say,
    /// [`http::connect_small_window`]).
    pub fn over(tcp: TcpStream, config: Arc<ClientConfig>) -> io::Result<TlsConn> {
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(TlsConn {
            stream: BufReader::new(s),
            served: 0,
            closed: false,
        })
    }

    fn conn(&self) -> &ClientConnection {
        &self.stream.get_ref().conn
    }

    /// The protocol ALPN chose (`h2`, `http/1.1`), if any.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.conn().alpn_protocol().map(|p| p.to_vec())
    }

    /// Whether this session resumed an earlier one.
    pub fn is_resumed(&self) -> bool {
        self.conn().handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// The common name of the certificate the server showed.
    pub fn server_cn(&self) -> Option<String> {
        let certs = self.conn().peer_certificates()?;
        common_name(certs.first()?)
    }

    /// GET `path`; a failure on a reused connection says so.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        let reused = self.served;
        let r = self.get_inner(path);
        r.map_err(|e| {
            let on = if reused > 0 {
                format!("on a reused TLS connection (after {reused} responses)")
            } else {
                "on a new TLS connection".to_string()
            };
            io::Error::new(e.kind(), format!("{on}: {e}"))
        })
    }

    fn get_inner(&mut self, path: &str) -> io::Result<Response> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let s = self.stream.get_mut();
        s.write_all(req.as_bytes())?;
        s.flush()?;
        let mut r = http::read_response(&mut self.stream)?;
        r.reused = self.served > 0;
        self.served += 1;
        self.closed = r.close;
        Ok(r)
    }

    /// The server said `Connection: close` on the last response.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Responses read on this connection.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Sends `bytes` as they are (a request of the caller's making, and
    /// whatever follows it).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream.get_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    /// Reads one response (to a request made with [`TlsConn::send`]).
    pub fn read_response(&mut self) -> io::Result<Response> {
        let r = http::read_response(&mut self.stream)?;
        self.served += 1;
        self.closed = r.close;
        Ok(r)
    }

    /// Closes the connection with a reset (`SO_LINGER` 0) rather than a
    /// FIN, as load balancers' health checks and scanners do.
    pub fn reset(self) {
        let sock = &self.stream.get_ref().sock;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::Linger, &linger).unwrap();
    }

    /// Waits until the server closes the connection (EOF, a TLS
    /// close_notify, or a reset), within `within`; `true` if it did.
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        use std::io::Read;
        let s = self.stream.get_mut();
        let _ = s.sock.set_read_timeout(Some(within));
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}
