//! JWT client assertions (RFC 7523, `private_key_jwt`) signed RS256 with a certificate's key,
//! as Microsoft's identity platform expects them (`x5t#S256` names the certificate).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid; it is used once, at once.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
    #[error("signing failed")]
    Sign,
}

/// A loaded certificate and its RSA key.
pub struct ClientCertificate {
    key: RsaKeyPair,
    /// base64url SHA-256 of the DER certificate.
    x5t_s256: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never prints.
        f.debug_struct("ClientCertificate")
            .field("x5t_s256", &self.x5t_s256)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AssertionError> {
    // Capped, never a FIFO or device: see `crate::fsread`.
    crate::fsread::read(path, crate::fsread::FileKind::Pem).map_err(|e| AssertionError::Read {
        path: path.display().to_string(),
        detail: e.reason(),
    })
}

fn invalid(path: &Path, detail: impl ToString) -> AssertionError {
    AssertionError::Invalid {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// The first PEM block of `path` whose label is one of `labels`.
fn pem_block(path: &Path, labels: &[&str]) -> Result<(String, Vec<u8>), AssertionError> {
    let data = read(path)?;
    for item in x509_parser::pem::Pem::iter_from_buffer(&data) {
        let item = item.map_err(|e| invalid(path, e))?;
        if labels.contains(&item.label.as_str()) {
            return Ok((item.label, item.contents));
        }
    }
    Err(invalid(
        path,
        format!("no {} PEM block", labels.join(" or ")),
    ))
}

/// The certificate's DER (the first `CERTIFICATE` block of the PEM file), for its
/// thumbprint.
pub fn certificate_der(certificate_file: &Path) -> Result<Vec<u8>, AssertionError> {
    pem_block(certificate_file, &["CERTIFICATE"]).map(|(_, der)| der)
}

/// The certificate's notAfter (for the credential expiry metric).
pub fn certificate_not_after(certificate_file: &Path) -> Result<SystemTime, AssertionError> {
    let (_, der) = pem_block(certificate_file, &["CERTIFICATE"])?;
    not_after_of(certificate_file, &der)
}

fn not_after_of(path: &Path, der: &[u8]) -> Result<SystemTime, AssertionError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| invalid(path, e))?;
    let ts = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}

impl ClientCertificate {
    /// Loads a PEM certificate and its PEM RSA key (PKCS#8 or PKCS#1).
    pub fn load(
        certificate_file: &Path,
        private_key_file: &Path,
    ) -> Result<ClientCertificate, AssertionError> {
        let (_, der) = pem_block(certificate_file, &["CERTIFICATE"])?;
        let not_after = not_after_of(certificate_file, &der)?;
        let (label, key_der) = pem_block(private_key_file, &["PRIVATE KEY", "RSA PRIVATE KEY"])?;
        let key = if label == "PRIVATE KEY" {
            RsaKeyPair::from_pkcs8(&key_der)
        } else {
            RsaKeyPair::from_der(&key_der)
        }
        // KeyRejected's text names the defect, never the key material.
        .map_err(|e| invalid(private_key_file, format!("not a usable RSA key: {e}")))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        Ok(ClientCertificate {
            key,
            x5t_s256: URL_SAFE_NO_PAD.encode(digest.as_ref()),
            not_after,
        })
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn thumbprint_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// A signed assertion for `client_id` at `token_url`, valid from `now` for 10 minutes.
    pub fn assertion(
        &self,
        client_id: &str,
        token_url: &str,
        now: SystemTime,
    ) -> Result<crate::secret::Secret, AssertionError> {
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": self.x5t_s256});
        let claims = serde_json::json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": jti()?,
            "nbf": iat,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        sign_rs256(&self.key, &header, &claims)
    }
}

/// A random JWT id (`jti`, RFC 7519 §4.1.7): 128 bits, base64url.
pub(crate) fn jti() -> Result<String, AssertionError> {
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| AssertionError::Sign)?;
    Ok(URL_SAFE_NO_PAD.encode(jti))
}

/// A compact JWS (RFC 7515 §7.1) of `claims` under `header`, signed RS256
/// (RSASSA-PKCS1-v1_5 with SHA-256) with `key`: client assertions and Google service
/// account grants alike.
pub(crate) fn sign_rs256(
    key: &RsaKeyPair,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<crate::secret::Secret, AssertionError> {
    let rng = ring::rand::SystemRandom::new();
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
        .map_err(|_| AssertionError::Sign)?;
    Ok(crate::secret::Secret::new(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(sig)
    )))
}

/// An RSA private key from PEM text: PKCS#8 (`PRIVATE KEY`, what Google's JSON keys hold)
/// or PKCS#1 (`RSA PRIVATE KEY`). The error names the defect, never the key material.
pub(crate) fn rsa_key_from_pem(pem: &[u8]) -> Result<RsaKeyPair, String> {
    for item in x509_parser::pem::Pem::iter_from_buffer(pem) {
        // The PEM parser's messages name the structure, not the content.
        let item = item.map_err(|e| format!("not PEM: {e}"))?;
        let key = match item.label.as_str() {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&item.contents),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&item.contents),
            _ => continue,
        };
        return key.map_err(|e| format!("not a usable RSA key: {e}"));
    }
    Err("no PRIVATE KEY or RSA PRIVATE KEY PEM block".into())
}

/// The claims of a JWT, read without verifying it (used for a token file's `exp`).
pub fn unverified_claims(jwt: &str) -> Option<serde_json::Value> {
    let mut parts = jwt.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn assertion_is_a_verifiable_rs256_jwt() {
        let cert = ClientCertificate::load(&fixture("client-cert.pem"), &fixture("client-key.pem"))
            .unwrap();
        let now = SystemTime::now();
        let jwt = cert.assertion("cid", "https://idp/token", now).unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], cert.thumbprint_s256());
        let claims = unverified_claims(jwt.expose()).unwrap();
        assert_eq!(claims["aud"], "https://idp/token");
        assert_eq!(claims["iss"], "cid");
        assert_eq!(claims["sub"], "cid");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            600
        );
        // Verify with the certificate's public key.
        let pem = std::fs::read(fixture("client-cert.pem")).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let c = p.parse_x509().unwrap();
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            c.public_key().subject_public_key.data.to_vec(),
        );
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        assert!(cert.not_after() > now + Duration::from_secs(86400 * 365 * 50));
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn key_mismatch_or_garbage_is_a_typed_error() {
        let e = ClientCertificate::load(&fixture("client-cert.pem"), &fixture("client-cert.pem"))
            .unwrap_err();
        assert!(matches!(e, AssertionError::Invalid { .. }), "{e}");
        assert!(matches!(
            ClientCertificate::load(Path::new("/nope"), Path::new("/nope")),
            Err(AssertionError::Read { .. })
        ));
    }
}
