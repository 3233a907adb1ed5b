//! A throw-away certificate authority, generated at run time, for the emulated servers' TLS.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::time::ASN1Time;

/// Validity of an ordinary leaf: long enough for any test, short enough that a client
/// reads a definite notAfter (like a real ACME certificate).
const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// An error while generating keys or certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("bad certificate time: {0}")]
    Time(String),
}

impl From<CaError> for std::io::Error {
    fn from(e: CaError) -> Self {
        std::io::Error::other(e)
    }
}

/// A CA certificate and its key, able to issue server certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A server certificate chain (leaf first, then the CA) with its private key.
pub struct ServerCert {
    /// Leaf, then the issuing CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// The leaf's notAfter, in unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// PEM armour around DER bytes (RFC 7468: base64 in lines of 64 characters).
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl ServerCert {
    /// The chain (leaf first) in PEM, for servers configured with files (Dovecot's
    /// `ssl_cert`).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }

    /// The leaf's PKCS#8 private key in PEM (Dovecot's `ssl_key`). It is a test key.
    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", self.key.secret_der())
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3) presenting this chain.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sets a certificate's validity from unix seconds (rcgen's date type is reached through
/// x509-parser, so the crate needs no direct `time` dependency).
fn set_validity(params: &mut CertificateParams, from: i64, until: i64) -> Result<(), CaError> {
    let at = |unix: i64| {
        ASN1Time::from_timestamp(unix)
            .map(|t| t.to_datetime())
            .map_err(|e| CaError::Time(e.to_string()))
    };
    params.not_before = at(from)?;
    params.not_after = at(until)?;
    Ok(())
}

impl TestCa {
    /// Generates a fresh CA (ECDSA P-256), valid from a day ago for ten years.
    pub fn new() -> Result<Self, CaError> {
        Self::named("mail-oauth-exporter emulator test CA")
    }

    /// Generates a fresh CA with the given common name.
    pub fn named(common_name: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = now_unix();
        set_validity(&mut params, now - 86_400, now + 10 * 365 * 86_400)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM, for clients' CA files.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER, for building a client root store.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a leaf valid for ~90 days from now for `localhost`, `127.0.0.1` and `names`.
    pub fn issue_server(&self, names: &[&str]) -> Result<ServerCert, CaError> {
        let now = now_unix();
        let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        all.extend(names.iter().map(|n| n.to_string()));
        self.issue(&all, now - 3_600, now + LEAF_VALIDITY.as_secs() as i64)
    }

    /// Issues a leaf for the same names whose validity ended a day ago.
    pub fn issue_expired_server(&self, names: &[&str]) -> Result<ServerCert, CaError> {
        let now = now_unix();
        let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        all.extend(names.iter().map(|n| n.to_string()));
        self.issue(&all, now - 91 * 86_400, now - 86_400)
    }

    /// Issues a leaf for exactly `names` (no loopback names), valid ~90 days: with only
    /// foreign names it makes a certificate "for another name".
    pub fn issue_for_names_only(&self, names: &[&str]) -> Result<ServerCert, CaError> {
        let now = now_unix();
        let all: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.issue(&all, now - 3_600, now + LEAF_VALIDITY.as_secs() as i64)
    }

    fn issue(&self, names: &[String], from: i64, until: i64) -> Result<ServerCert, CaError> {
        let key = KeyPair::generate()?;
        // CertificateParams::new turns IP literals into IP SANs, which clients need to
        // verify a connection to 127.0.0.1.
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        let cn = names
            .iter()
            .find(|n| n.parse::<std::net::IpAddr>().is_err())
            .cloned()
            .unwrap_or_else(|| "emulator".to_string());
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, from, until)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after: until,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_has_loopback_sans_and_definite_not_after() {
        let ca = TestCa::new().unwrap();
        let leaf = ca.issue_server(&["mail.example.test"]).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        assert_eq!(x509.validity().not_after.timestamp(), leaf.not_after);
        let days = (leaf.not_after - now_unix()) / 86_400;
        assert!((88..=90).contains(&days), "{days}");
        let san = x509.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", san.value.general_names);
        assert!(text.contains("localhost"), "{text}");
        assert!(text.contains("mail.example.test"), "{text}");
        assert!(text.contains("IPAddress"), "{text}");
        assert!(leaf.server_config().is_ok());
        let chain = leaf.chain_pem();
        assert_eq!(chain.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(chain.lines().all(|l| l.len() <= 64), "{chain}");
        assert!(leaf.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn expired_leaf_is_in_the_past() {
        let ca = TestCa::new().unwrap();
        let leaf = ca.issue_expired_server(&[]).unwrap();
        assert!(leaf.not_after < now_unix());
    }
}
