//! TLS for probes: trust roots (system + optional CA file), TLS 1.2 minimum, SNI, and the
//! earliest notAfter of the chain a server presented.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("CA file {path} holds no certificate")]
    CaFileEmpty { path: PathBuf },
    #[error("no trust roots: the system has none and no tls.ca_file is configured")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A shareable TLS client configuration; built once per config load, not per probe,
/// because reading the system's roots costs milliseconds.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    config: Arc<ClientConfig>,
    /// The last chains servers presented and their earliest notAfter: a fleet's servers
    /// present a handful of chains, and parsing one costs more than the rest of a probe's
    /// certificate handling.
    not_after: Arc<Mutex<Vec<KnownChain>>>,
}

/// A chain as presented (DER, in order) and its earliest notAfter.
type KnownChain = (Vec<CertificateDer<'static>>, Option<i64>);

/// Chains remembered by [`TlsClient::chain_not_after`]; the oldest is forgotten first.
const KNOWN_CHAINS: usize = 16;

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// System roots plus the certificates of `ca_file`, if given.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        // A system without a CA bundle (a scratch container) still works with a CA file,
        // so unreadable system roots are not an error by themselves.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            Self::add_ca_file(&mut roots, path)?;
        }
        if roots.is_empty() {
            return Err(TlsSetupError::NoRoots);
        }
        Self::from_roots(roots)
    }

    /// Only the given PEM certificates as roots (tests, the demo's emulated provider).
    pub fn with_ca_pem(pem: &[u8]) -> Result<Self, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TlsSetupError::CaFile {
                path: PathBuf::from("<memory>"),
                message: e.to_string(),
            })?;
            roots.add(cert)?;
        }
        Self::from_roots(roots)
    }

    fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsSetupError> {
        let err = |message: String| TlsSetupError::CaFile {
            path: path.to_owned(),
            message,
        };
        // Capped, never a FIFO or device: see `crate::fsread`.
        let pem =
            crate::fsread::read(path, crate::fsread::FileKind::Pem).map_err(|e| err(e.reason()))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.map_err(|e| err(e.to_string()))?)
                .map_err(|e| err(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(TlsSetupError::CaFileEmpty {
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    fn from_roots(roots: RootCertStore) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Exchange Online refuses TLS < 1.2 (421 4.7.66); rustls never offers less anyway,
        // and naming the versions keeps that a decision rather than a default.
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        Ok(TlsClient {
            connector: TlsConnector::from(config.clone()),
            config,
            not_after: Arc::default(),
        })
    }

    /// [`earliest_not_after`] of `chain`, parsed only the first time this exact chain
    /// (byte for byte) is seen among the last 16 distinct chains.
    pub fn chain_not_after(&self, chain: &[CertificateDer<'_>]) -> Option<i64> {
        let lock = || self.not_after.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, at)) = lock().iter().find(|(known, _)| known.as_slice() == chain) {
            return *at;
        }
        let at = earliest_not_after(chain);
        let mut known = lock();
        if known.len() >= KNOWN_CHAINS {
            known.remove(0);
        }
        known.push((chain.iter().map(|c| c.clone().into_owned()).collect(), at));
        at
    }

    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    pub(crate) async fn handshake(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, io::Error> {
        let name = server_name(host)?;
        self.connector.connect(name, tcp).await
    }
}

/// SNI name for `host`: DNS names are sent as SNI, IP addresses are checked against IP SANs.
fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad TLS name {host}: {e}"),
        )
    })
}

/// The earliest notAfter (unix seconds) among the certificates the server presented:
/// the first one to expire breaks the chain.
pub fn earliest_not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    chain
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .min()
}

/// Sorts a handshake error into "the certificate was refused" or "something else failed".
pub(crate) fn is_certificate_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::TestCa;

    #[test]
    fn remembered_chains_give_their_own_not_after_also_past_the_bound() {
        let ca = TestCa::new().unwrap();
        let good = ca.issue_server(&["good.example.test"]).unwrap();
        let expired = ca.issue_expired_server(&[]).unwrap();
        let tls = TlsClient::with_ca_pem(ca.ca_pem().as_bytes()).unwrap();
        for _ in 0..2 {
            assert_eq!(tls.chain_not_after(&good.chain), Some(good.not_after));
            assert_eq!(tls.chain_not_after(&expired.chain), Some(expired.not_after));
        }
        // The leaf alone is another chain, with the same answer; the CA alone another.
        assert_eq!(tls.chain_not_after(&good.chain[..1]), Some(good.not_after));
        let ca_only = earliest_not_after(&good.chain[1..]);
        assert!(ca_only > Some(good.not_after));
        assert_eq!(tls.chain_not_after(&good.chain[1..]), ca_only);
        // More chains than are remembered: the first ones are parsed again, still right.
        let others: Vec<_> = (0..KNOWN_CHAINS)
            .map(|i| ca.issue_server(&[&format!("m{i}.example.test")]).unwrap())
            .collect();
        for c in &others {
            assert_eq!(tls.chain_not_after(&c.chain), Some(c.not_after));
        }
        assert_eq!(tls.not_after.lock().unwrap().len(), KNOWN_CHAINS);
        assert_eq!(tls.chain_not_after(&expired.chain), Some(expired.not_after));
        assert_eq!(tls.chain_not_after(&[]), None);
    }
}
