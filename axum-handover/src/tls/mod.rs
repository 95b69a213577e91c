//! TLS: a certificate and key read from PEM files, the rustls server
//! configuration every TLS socket of a generation uses, and the session
//! tickets that let a client resume its session with the next generation.
//!
//! The crypto provider is `ring`: it builds with a C compiler alone, where
//! `aws-lc-rs` (rustls' default) needs cmake and takes longer to build.
//!
//! A TLS connection cannot move to the next generation (its session state
//! lives in this process), so at a handover it drains here: HTTP/1.1 with
//! `Connection: close` on its next response and closed idle only after the
//! advertised keep-alive timeout, HTTP/2 with a graceful GOAWAY.

pub(crate) mod tickets;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub(crate) use tickets::{TicketKeys, Ticketer};

/// The ALPN protocols a TLS socket offers, preferred first.
pub(crate) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The largest certificate or key file read. A PEM certificate is 1–2 KB
/// (an RSA-4096 one ~2 KB, certbot's `fullchain.pem` with its intermediate
/// ~4 KB, a chain with a long intermediate list rarely over 10 KB), a key
/// under 4 KB: 1 MiB is far past any real one and still reads in a moment,
/// while `/dev/zero`-like input stops there.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A certificate chain and its private key, checked to belong together:
/// what a TLS socket serves. Cheap to clone.
///
/// Read the files anew at every start (as [`Tls::from_pem_files`] does when
/// called from `main`): a reload then serves a renewed certificate, and a
/// broken one fails the reload with the file's path while the old process
/// keeps serving.
#[derive(Clone)]
pub struct Tls {
    key: Arc<CertifiedKey>,
    /// Where it came from, for messages (never the key's content).
    source: Arc<str>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("source", &self.source)
            .field("certificates", &self.key.cert.len())
            .finish_non_exhaustive()
    }
}

/// Why a certificate or key cannot be used. Its `Display` is one line that
/// starts with the file's path. Non-exhaustive: a later release may tell
/// more cases apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file is missing or unreadable, not a regular file (a FIFO, a
    /// device), or larger than 1 MiB: see [`crate::file::read_regular`].
    #[error("{}: cannot read the {what}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// What the system said.
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{}: no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid PEM.
    #[error("{}: not a valid PEM {what} file: {why}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The key file holds no private key.
    #[error("{}: no private key in it (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is there but cannot sign (an unsupported algorithm, a
    /// corrupt key).
    #[error("{}: the private key cannot be used: {why}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        why: String,
    },
    /// The key is not the certificate's.
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

impl TlsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::BadPem { path, .. }
            | TlsError::NoKey { path }
            | TlsError::BadKey { path, .. } => path,
            TlsError::Mismatch { key, .. } => key,
        }
    }
}

fn pem_why(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section is not closed (missing `{}`)",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "a malformed section start `{}`",
            String::from_utf8_lossy(&line)
        ),
        pem::Error::Base64Decode(why) => format!("bad base64: {why}"),
        other => other.to_string(),
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads a PEM certificate chain (the server's certificate first, then
    /// intermediates: certbot's `fullchain.pem`) and a PEM private key
    /// (PKCS#8, PKCS#1 or SEC1: certbot's `privkey.pem`), and checks that
    /// the key is the certificate's. Each file must be a regular file of at
    /// most 1 MiB ([`crate::file::read_regular`]): a FIFO or a device fails
    /// at once rather than hanging the start (or the reload) or filling the
    /// memory.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Tls, TlsError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let read = |path: &Path, what| {
            crate::file::read_regular(path, MAX_PEM_BYTES).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                what,
                source,
            })
        };
        let cert_pem = read(cert, "certificate")?;
        let key_pem = read(key, "private key")?;
        Self::load(&cert_pem, &key_pem, cert, key)
    }

    /// The same from PEM text in memory, say for a test or a benchmark
    /// that makes its certificate; errors name `<certificate>` or `<key>`.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Tls, TlsError> {
        Self::load(
            cert_pem,
            key_pem,
            Path::new("<certificate>"),
            Path::new("<key>"),
        )
    }

    fn load(cert_pem: &[u8], key_pem: &[u8], cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadPem {
                path: cert.to_path_buf(),
                what: "certificate",
                why: pem_why(e),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert.to_path_buf(),
            });
        }
        let der = match PrivateKeyDer::from_pem_slice(key_pem) {
            Ok(k) => k,
            Err(pem::Error::NoItemsFound) => {
                return Err(TlsError::NoKey {
                    path: key.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(TlsError::BadPem {
                    path: key.to_path_buf(),
                    what: "private key",
                    why: pem_why(e),
                });
            }
        };
        let signing =
            provider()
                .key_provider
                .load_private_key(der)
                .map_err(|e| TlsError::BadKey {
                    path: key.to_path_buf(),
                    why: e.to_string(),
                })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            // `Unknown`: the provider cannot tell for this key type; the
            // handshake would fail visibly if it were wrong.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(TlsError::Mismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                });
            }
        }
        Ok(Tls {
            key: Arc::new(certified),
            source: Arc::from(cert.display().to_string()),
        })
    }

    /// The server configuration: this certificate, ALPN `h2` then
    /// `http/1.1`, session tickets from `ticketer`.
    pub(crate) fn server_config(&self, ticketer: Arc<Ticketer>) -> Arc<rustls::ServerConfig> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(One(self.key.clone())));
        c.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        c.ticketer = ticketer;
        Arc::new(c)
    }
}

/// Serves the one certificate whatever the client asks for.
#[derive(Debug)]
struct One(Arc<CertifiedKey>);

impl ResolvesServerCert for One {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
