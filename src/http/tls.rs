//! TLS for the HTTP endpoints: a rustls server config (ring, TLS 1.2+) built from the web
//! config, with optional client certificate verification, and a certificate resolver that
//! picks up a renewed certificate and key (cert-manager, certbot) without a restart.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio_rustls::TlsAcceptor;

/// `client_auth_type`, limited to the modes that verify what the client presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `NoClientCert`: none asked for.
    #[default]
    None,
    /// `VerifyClientCertIfGiven`: optional, but verified against the CA when presented.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: the handshake fails without a valid one.
    Require,
}

/// `min_version` / `max_version`: nothing below TLS 1.2 is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `tls_server_config`, validated, with paths resolved.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_auth: ClientAuth,
    pub client_ca_file: Option<PathBuf>,
    pub min: TlsVersion,
    pub max: TlsVersion,
    pub prefer_server_order: bool,
}

/// A TLS setup problem, with the key of `tls_server_config` it concerns.
#[derive(Debug)]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the acceptor; the certificate, key and client CA are read now, so a bad file
/// is reported at start.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let resolver = CertFiles::load(
        settings.cert_file.clone(),
        settings.key_file.clone(),
        provider.clone(),
    )?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls13, &rustls::version::TLS13),
        (TlsVersion::Tls12, &rustls::version::TLS12),
    ]
    .into_iter()
    .filter(|(v, _)| (settings.min..=settings.max).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError {
            field: "min_version",
            message: e.to_string(),
        })?;
    let builder = match (&settings.client_auth, &settings.client_ca_file) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(ca)) => {
            let roots = client_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if *mode == ClientAuth::VerifyIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError {
                field: "client_ca_file",
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = settings.prefer_server_order;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn client_roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let err = |message: String| TlsError {
        field: "client_ca_file",
        message,
    };
    // Capped, never a FIFO or device: see `crate::fsread`.
    let pem =
        crate::fsread::read(ca, crate::fsread::FileKind::Pem).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(err(format!("{}: no certificate in it", ca.display())));
    }
    Ok(Arc::new(roots))
}

/// What identifies a version of a file without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Serves the certificate and key from their files and reloads them when either file
/// changes (modification time or size, checked with two `stat`s per handshake). A pair
/// that does not load, or whose key does not match the certificate (a renewal caught
/// half-written), keeps the previous pair in service and is logged once.
#[derive(Debug)]
struct CertFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    /// Stamps of the pair in service, or of the last pair that failed to load.
    seen: (Stamp, Stamp),
    key: Arc<CertifiedKey>,
}

impl CertFiles {
    fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<CertFiles, TlsError> {
        let seen = (stamp(&cert_file), stamp(&key_file));
        let key = load_pair(&cert_file, &key_file, &provider)?;
        Ok(CertFiles {
            cert_file,
            key_file,
            provider,
            state: Mutex::new(Current {
                seen,
                key: Arc::new(key),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let now = (stamp(&self.cert_file), stamp(&self.key_file));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now != state.seen {
            state.seen = now;
            match load_pair(&self.cert_file, &self.key_file, &self.provider) {
                Ok(key) => {
                    tracing::info!(
                        cert_file = %self.cert_file.display(),
                        "web TLS certificate reloaded"
                    );
                    state.key = Arc::new(key);
                }
                Err(e) => tracing::warn!(
                    error = %e.message,
                    "web TLS certificate changed but does not load; still serving the previous one"
                ),
            }
        }
        state.key.clone()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn load_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError {
        field: "cert_file",
        message,
    };
    let key_err = |message: String| TlsError {
        field: "key_file",
        message,
    };
    let pem = crate::fsread::read(cert_file, crate::fsread::FileKind::Pem)
        .map_err(|e| cert_err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("{}: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!(
            "{}: no PEM certificate in it",
            cert_file.display()
        )));
    }
    let pem = crate::fsread::read(key_file, crate::fsread::FileKind::Pem)
        .map_err(|e| key_err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        key_err(format!(
            "{}: no usable PEM private key in it ({e})",
            key_file.display()
        ))
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        key_err(format!(
            "{} does not go with {}: {e}",
            key_file.display(),
            cert_file.display()
        ))
    })
}
