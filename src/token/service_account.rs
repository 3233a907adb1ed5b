//! Credentials without a human: Google Workspace service accounts (domain-wide delegation,
//! the JWT bearer grant of RFC 7523 §2.1) and client assertion files (workload identity
//! federation, RFC 7523 §2.2 client authentication with a token another issuer rotates).
//!
//! A service account's JSON key (`client_email`, `private_key_id`, `private_key`,
//! `token_uri`) is read for every token request, like every other secret file, so a
//! rotated key is used without a restart. Per mailbox, the exporter signs a JWT (RS256,
//! header `kid` = `private_key_id`; `iss` = `client_email`, `sub` = the mailbox,
//! `scope`, `aud` = `token_uri`, at most one hour) and posts it as `assertion=` with
//! `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` (Google's "Using OAuth 2.0
//! for Server to Server Applications"). Neither the key nor the assertion nor the token is
//! ever printed: they live in [`Secret`]s and [`ServiceAccountKey`]'s `Debug` omits the key.

use super::assertion::{ASSERTION_LIFETIME, AssertionError, jti, rsa_key_from_pem, sign_rs256};
use super::credential::Credential;
use super::error::{OAuthErrorBody, TokenError, bounded};
use super::grant::Granted;
use super::http::{HttpClient, MAX_BODY, ReplyMeta, TransportError, excerpt};
use crate::secret::Secret;
use ring::signature::RsaKeyPair;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The JWT bearer authorization grant (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Reads a client assertion file (workload identity federation): the bare JWT, surrounding
/// whitespace trimmed. Read for every token request: the issuer rotates it (Kubernetes
/// projected tokens live an hour and are rewritten well before).
pub fn read_assertion_file(path: &Path) -> Result<Secret, String> {
    let data = crate::fsread::read(path, crate::fsread::FileKind::ClientAssertion)
        .map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(&data)
        .map_err(|_| format!("client assertion file {}: not UTF-8", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("client assertion file {} is empty", path.display()));
    }
    if value.split('.').count() != 3 || value.chars().any(char::is_whitespace) {
        // Say what is wrong without echoing a byte of it.
        return Err(format!(
            "client assertion file {}: not a JWT (three base64url parts separated by dots)",
            path.display()
        ));
    }
    Ok(Secret::new(value))
}

/// A token endpoint URL the exporter may post credentials to: `https://`, or plain
/// `http://` to a loopback host (the emulator of tests and `demo`), never with userinfo.
pub fn allowed_endpoint(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("a token endpoint URL must not carry a user or password".into());
    }
    let host = parsed.host_str().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" if parsed.host().is_some() => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "`{url}` must be an https:// URL (plain http only to loopback)"
        )),
    }
}

/// A Google service account key, loaded from the JSON file Google issues.
pub struct ServiceAccountKey {
    client_email: String,
    private_key_id: String,
    token_uri: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key never prints.
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Reads and checks `path`: JSON with string fields `client_email`, `private_key_id`,
    /// `private_key` (PEM RSA key) and `token_uri` (an allowed endpoint). Errors name the
    /// file and the field, never a value.
    pub fn load(path: &Path) -> Result<ServiceAccountKey, String> {
        let data = crate::fsread::read(path, crate::fsread::FileKind::ServiceAccountKey)
            .map_err(|e| e.to_string())?;
        ServiceAccountKey::parse(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a key file's content (see [`ServiceAccountKey::load`]).
    pub fn parse(data: &[u8]) -> Result<ServiceAccountKey, String> {
        // serde_json's syntax errors say what was expected, not what was found; its type
        // errors would quote the value, so fields are read by hand below.
        let json: serde_json::Value = serde_json::from_slice(data).map_err(|e| {
            format!(
                "not a JSON service account key (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let field = |name: &str| -> Result<String, String> {
            match json.get(name).and_then(|v| v.as_str()) {
                Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(format!(
                    "`{name}` is missing or not a string: use the JSON key Google issues for the service account"
                )),
            }
        };
        if let Some(t) = json.get("type").and_then(|v| v.as_str())
            && t != "service_account"
        {
            return Err(format!(
                "`type` is `{}`, not `service_account`",
                bounded(t, 40)
            ));
        }
        let client_email = field("client_email")?;
        let private_key_id = field("private_key_id")?;
        let token_uri = field("token_uri")?;
        allowed_endpoint(&token_uri).map_err(|e| format!("`token_uri`: {e}"))?;
        let pem = Secret::new(field("private_key")?);
        let key =
            rsa_key_from_pem(pem.expose().as_bytes()).map_err(|e| format!("`private_key`: {e}"))?;
        Ok(ServiceAccountKey {
            client_email,
            private_key_id,
            token_uri,
            key,
        })
    }

    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    pub fn private_key_id(&self) -> &str {
        &self.private_key_id
    }

    /// The key's public half, PKCS#1 `RSAPublicKey` DER: what Google keeps of a key (the
    /// demo registers it with the emulated endpoint).
    pub fn public_key(&self) -> &[u8] {
        self.key.public().as_ref()
    }

    /// The token endpoint the grant goes to (and the assertion's audience).
    pub fn token_uri(&self) -> &str {
        &self.token_uri
    }

    /// The signed JWT that asks for a token acting as `subject` with `scopes`, valid from
    /// `now` for [`ASSERTION_LIFETIME`] (Google accepts at most one hour).
    pub fn assertion(
        &self,
        subject: &str,
        scopes: &[String],
        now: SystemTime,
    ) -> Result<Secret, AssertionError> {
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = serde_json::json!({
            "iss": self.client_email,
            "sub": subject,
            "scope": scopes.join(" "),
            "aud": self.token_uri,
            "jti": jti()?,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        sign_rs256(&self.key, &header, &claims)
    }
}

fn config_err(cred: &Credential, detail: impl ToString) -> TokenError {
    TokenError::Config {
        credential: cred.name.clone(),
        detail: detail.to_string(),
    }
}

/// The JWT bearer grant for `subject` (the mailbox address) with the key of `key_file`.
pub async fn jwt_bearer(
    http: &HttpClient,
    cred: &Credential,
    key_file: &Path,
    subject: &str,
) -> Result<Granted, TokenError> {
    let key = ServiceAccountKey::load(key_file)
        .map_err(|e| config_err(cred, format!("service_account_key_file {e}")))?;
    let assertion = key
        .assertion(subject, &cred.scopes, SystemTime::now())
        .map_err(|e| config_err(cred, e))?;
    let form = [
        ("grant_type", JWT_BEARER_GRANT),
        ("assertion", assertion.expose()),
    ];
    let meta = Mutex::new(ReplyMeta::default());
    let reply = http.post_form(key.token_uri(), &form, &meta).await;
    let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
    let reply = match reply {
        Ok(r) => r,
        Err(TransportError::TooLarge) => {
            return Err(TokenError::Http {
                status: meta.status.unwrap_or(0),
                excerpt: format!("reply larger than {MAX_BODY} bytes"),
                retry_after: meta.retry_after,
            });
        }
        Err(e) => {
            return Err(TokenError::Network {
                detail: e.to_string(),
            });
        }
    };
    token_reply(reply.status().as_u16(), reply.body(), meta.retry_after)
}

/// A token endpoint's reply to a grant posted by hand: an access token, an OAuth error
/// (whatever the status: some endpoints send errors with 200), or a reply classified by
/// its status. The detail of an unusable 2xx reply never quotes it: it may hold a token.
pub fn token_reply(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Granted, TokenError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(err) = json
        .as_ref()
        .filter(|j| j.get("error").is_some_and(|e| e.is_string()))
        .and_then(|j| serde_json::from_value::<OAuthErrorBody>(j.clone()).ok())
    {
        return Err(TokenError::Endpoint {
            status,
            body: Box::new(err),
            retry_after,
        });
    }
    if !(200..300).contains(&status) {
        return Err(TokenError::Http {
            status,
            excerpt: excerpt(body),
            retry_after,
        });
    }
    // The same lenient reading as every other grant (`expires_in` a number or a numeric
    // string, else the JWT's `exp`, else one hour); an unusable reply shows why, redacted.
    let reply = match json.as_ref() {
        Some(v) => crate::token::reply::TokenReply::from_value(v, std::time::SystemTime::now()),
        None => Err("the reply is not JSON".to_string()),
    }
    .map_err(|why| TokenError::Http {
        status,
        excerpt: crate::token::http::unusable(&why, body),
        retry_after,
    })?;
    use oauth2::TokenResponse;
    Ok(Granted {
        access_token: Secret::new(reply.access_token().secret().clone()),
        lifetime: Some(reply.lifetime()),
        refresh_token: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn key_json(token_uri: &str) -> String {
        let pem = std::fs::read_to_string(fixture("client-key.pem")).unwrap();
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid-1",
            "private_key": pem,
            "client_email": "monitor@p.iam.gserviceaccount.com",
            "client_id": "123",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[test]
    fn assertion_has_googles_claims_and_verifies() {
        let key =
            ServiceAccountKey::parse(key_json("https://oauth2.googleapis.com/token").as_bytes())
                .unwrap();
        let jwt = key
            .assertion(
                "user@example.com",
                &["https://mail.google.com/".to_string()],
                SystemTime::now(),
            )
            .unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "kid-1");
        let claims = super::super::assertion::unverified_claims(jwt.expose()).unwrap();
        assert_eq!(claims["iss"], "monitor@p.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], "user@example.com");
        assert_eq!(claims["scope"], "https://mail.google.com/");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        let life = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(life > 0 && life <= 3600, "{life}");
        // The fixture certificate carries the same key's public half.
        let pem = std::fs::read(fixture("client-cert.pem")).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let c = p.parse_x509().unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            c.public_key().subject_public_key.data.to_vec(),
        );
        public
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
        let shown = format!("{key:?}");
        assert!(
            !shown.contains("PRIVATE") && shown.contains("kid-1"),
            "{shown}"
        );
    }

    #[test]
    fn bad_key_files_name_the_field_never_the_value() {
        let good: serde_json::Value =
            serde_json::from_str(&key_json("https://oauth2.googleapis.com/token")).unwrap();
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                {
                    let mut j = good.clone();
                    j.as_object_mut().unwrap().remove("client_email");
                    j
                },
                "`client_email`",
            ),
            (
                {
                    let mut j = good.clone();
                    j["private_key"] = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWdhcmJhZ2U=\n-----END PRIVATE KEY-----\n".into();
                    j
                },
                "`private_key`",
            ),
            (
                {
                    let mut j = good.clone();
                    j["token_uri"] = "http://evil.example/token".into();
                    j
                },
                "`token_uri`",
            ),
            (
                {
                    let mut j = good.clone();
                    j["token_uri"] = "https://user:pw@oauth2.googleapis.com/token".into();
                    j
                },
                "`token_uri`",
            ),
            (
                {
                    let mut j = good.clone();
                    j["private_key_id"] = 42.into();
                    j
                },
                "`private_key_id`",
            ),
            (
                {
                    let mut j = good.clone();
                    j["type"] = "authorized_user".into();
                    j
                },
                "`type`",
            ),
        ];
        for (json, field) in cases {
            let e = ServiceAccountKey::parse(json.to_string().as_bytes()).unwrap_err();
            assert!(e.contains(field), "{e}");
            assert!(!e.contains("c2VjcmV0") && !e.contains("MII"), "{e}");
        }
        let e = ServiceAccountKey::parse(b"{\"private_key\": \"MIIsecret").unwrap_err();
        assert!(e.contains("line 1") && !e.contains("MII"), "{e}");
    }

    #[test]
    fn assertion_files_are_trimmed_jwts() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  aaa.bbb.ccc\n").unwrap();
        assert_eq!(read_assertion_file(&f).unwrap().expose(), "aaa.bbb.ccc");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_assertion_file(&f).unwrap_err().contains("empty"));
        std::fs::write(&f, "secret-not-a-jwt").unwrap();
        let e = read_assertion_file(&f).unwrap_err();
        assert!(e.contains("not a JWT") && !e.contains("secret-not"), "{e}");
    }

    #[test]
    fn token_replies_lenient_and_never_quoted() {
        let g = token_reply(
            200,
            br#"{"access_token":"ya29.x","expires_in":"3599"}"#,
            None,
        )
        .unwrap();
        assert_eq!(g.access_token.expose(), "ya29.x");
        assert_eq!(g.lifetime, Some(Duration::from_secs(3599)));
        let e = token_reply(200, br#"{"acces_token":"ya29.leak"}"#, None).unwrap_err();
        assert!(!e.to_string().contains("ya29"), "{e}");
        let e = token_reply(
            400,
            br#"{"error":"invalid_grant","error_description":"Invalid email or User ID"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(e.oauth_body().unwrap().error, "invalid_grant");
        let e = token_reply(502, b"<html>bad gateway</html>", None).unwrap_err();
        assert!(matches!(e, TokenError::Http { status: 502, .. }));
    }

    #[test]
    fn endpoints_https_or_loopback() {
        assert!(allowed_endpoint("https://oauth2.googleapis.com/token").is_ok());
        assert!(allowed_endpoint("http://127.0.0.1:8080/token").is_ok());
        assert!(allowed_endpoint("http://localhost/token").is_ok());
        assert!(allowed_endpoint("http://127.0.0.1.evil.example/token").is_err());
        assert!(allowed_endpoint("http://oauth2.googleapis.com/token").is_err());
        assert!(allowed_endpoint("ftp://x/").is_err());
    }
}
