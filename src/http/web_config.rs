//! The web config file (`--web.config.file`): TLS and basic auth for the HTTP endpoints,
//! in the shape Prometheus exporters use (exporter-toolkit's `web-config.yml`).
//!
//! Keys are the toolkit's. What this server does not implement is refused with the file,
//! line and key rather than ignored: an operator who wrote `client_allowed_sans` must not
//! believe it is enforced.

use super::auth::BasicAuth;
use super::tls::{self, ClientAuth, TlsSettings, TlsVersion};
use crate::config::yaml;
use crate::config::{ConfigError, located};
use crate::fsread::FileKind;
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_rustls::TlsAcceptor;

/// The web config in force: how connections are accepted and who may look.
/// `WebConfig::default()` is plain HTTP, open to all (no file given).
#[derive(Default)]
pub struct WebConfig {
    pub(crate) tls: Option<TlsAcceptor>,
    /// Client certificates are verified (required or, if given, checked).
    pub(crate) client_certs: bool,
    pub(crate) auth: Option<BasicAuth>,
    /// `http_server_config.headers`, added to every response.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// `--web.telemetry-path`: where the metrics are served; `None` is `/metrics`.
    pub(crate) telemetry_path: Option<String>,
}

/// The paths the server answers besides the metrics: `--web.telemetry-path` may not take
/// one of them (the router in `http/mod.rs` serves these).
const OTHER_PATHS: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/api/v1/status",
    "/transcript",
    "/-/reload",
];

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("client_certs", &self.client_certs)
            .field("auth", &self.auth)
            .field("headers", &self.headers)
            .field("telemetry_path", &self.telemetry_path())
            .finish()
    }
}

impl WebConfig {
    /// Reads and validates `path`, loads the certificate, key and client CA it names
    /// (so a bad file stops the start, not the first scrape) and checks every bcrypt hash.
    pub fn load(path: &Path) -> Result<WebConfig, ConfigError> {
        // Capped at 1 MiB, never a FIFO or device: see `crate::fsread`.
        let text = yaml::read(path, FileKind::WebConfig)?;
        WebConfig::parse(path, &text)
    }

    /// Validates `text` as if read from `path`; relative file names in it are resolved
    /// against the file's directory, as the exporter-toolkit does.
    pub fn parse(path: &Path, text: &str) -> Result<WebConfig, ConfigError> {
        // An empty file is plain HTTP, open to all, as with no file.
        let raw: RawWebConfig = yaml::document(path, text)?.unwrap_or_default();
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => Some(tls_settings(path, text, base, t)?),
        };
        let client_certs = tls
            .as_ref()
            .is_some_and(|t| t.client_auth != ClientAuth::None);
        let acceptor = match &tls {
            None => None,
            Some(settings) => Some(
                tls::acceptor(settings)
                    .map_err(|e| located(path, text, &["tls_server_config", e.field], e.message))?,
            ),
        };
        // Basic auth splits user and password at the first colon (RFC 7617).
        if let Some(user) = raw.basic_auth_users.keys().find(|u| u.contains(':')) {
            return Err(located(
                path,
                text,
                &["basic_auth_users", user],
                "a user name cannot contain ':'",
            ));
        }
        let users: BTreeMap<String, String> = raw
            .basic_auth_users
            .into_iter()
            .map(|(user, hash)| (user, hash.0))
            .collect();
        let auth = (!users.is_empty()).then(|| BasicAuth::new(users));
        let headers = raw
            .http_server_config
            .map(|h| h.headers.0)
            .unwrap_or_default();
        Ok(WebConfig {
            tls: acceptor,
            client_certs,
            auth,
            headers,
            telemetry_path: None,
        })
    }

    /// Serves the metrics at `path` (`--web.telemetry-path`, as Prometheus exporters
    /// name it) instead of `/metrics`, which then answers 404. `path` is an absolute
    /// URL path without query or fragment, and not one of the other endpoints' paths.
    pub fn with_telemetry_path(mut self, path: &str) -> Result<WebConfig, String> {
        validate_telemetry_path(path)?;
        self.telemetry_path = Some(path.to_string());
        Ok(self)
    }

    /// Where the metrics are served: `/metrics` unless `--web.telemetry-path` says otherwise.
    pub fn telemetry_path(&self) -> &str {
        self.telemetry_path.as_deref().unwrap_or("/metrics")
    }

    /// Whether the listener speaks TLS only.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether every endpoint but the health checks needs a user and password.
    pub fn has_basic_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// One line for the start-up log: what protects the endpoints.
    pub fn describe(&self) -> String {
        let tls = match (self.tls.is_some(), self.client_certs) {
            (false, _) => "plain HTTP",
            (true, false) => "TLS",
            (true, true) => "TLS with client certificates",
        };
        match &self.auth {
            None => format!("{tls}, no basic auth"),
            Some(a) => {
                let n = a.user_count();
                format!(
                    "{tls}, basic auth for {n} user{}",
                    if n == 1 { "" } else { "s" }
                )
            }
        }
    }
}

/// Checks a `--web.telemetry-path` value; the error says what is wrong with it.
pub fn validate_telemetry_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?}: must start with /"));
    }
    if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?}: a URL path only (no query, fragment, spaces or control characters)"
        ));
    }
    if OTHER_PATHS.contains(&path) {
        return Err(format!("{path:?}: already serves another endpoint"));
    }
    Ok(())
}

/// The file as written. Unknown keys are errors (`deny_unknown_fields`); the toolkit's
/// keys this server does not implement fail in their own deserializer, so serde_yaml
/// still knows the line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, BcryptHash>,
    #[serde(default, deserialize_with = "unsupported_rate_limit")]
    #[allow(dead_code)] // never set: its deserializer always fails
    rate_limit: Option<()>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: ClientAuth,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
    max_version: Option<TlsVersion>,
    /// rustls follows the server's order when set, the client's otherwise.
    #[serde(default)]
    prefer_server_cipher_suites: bool,
    #[serde(default, deserialize_with = "unsupported_inline")]
    #[allow(dead_code)]
    cert: Option<()>,
    #[serde(default, deserialize_with = "unsupported_inline")]
    #[allow(dead_code)]
    key: Option<()>,
    #[serde(default, deserialize_with = "unsupported_inline")]
    #[allow(dead_code)]
    client_ca: Option<()>,
    #[serde(default, deserialize_with = "unsupported_sans")]
    #[allow(dead_code)]
    client_allowed_sans: Option<()>,
    #[serde(default, deserialize_with = "unsupported_suites")]
    #[allow(dead_code)]
    cipher_suites: Option<()>,
    #[serde(default, deserialize_with = "unsupported_suites")]
    #[allow(dead_code)]
    curve_preferences: Option<()>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    headers: Headers,
    /// Only `false` is accepted: this server speaks HTTP/1.1.
    #[serde(default, deserialize_with = "http2_off")]
    #[allow(dead_code)]
    http2: bool,
}

/// Refuses any value with `why`. The error is raised while serde_yaml reads the value (a
/// visitor), so it carries the value's line, column and key path.
struct Refuse(&'static str);

macro_rules! refuse_all {
    ($($method:ident($ty:ty)),*) => {
        $(fn $method<E: de::Error>(self, _v: $ty) -> Result<Self::Value, E> {
            Err(E::custom(self.0))
        })*
    };
}

impl<'de> de::Visitor<'de> for Refuse {
    type Value = Option<()>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }

    refuse_all!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str)
    );

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.0))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.0))
    }
}

fn unsupported_rate_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    d.deserialize_any(Refuse(
        "not supported by mail-oauth-exporter (connections are capped instead)",
    ))
}

fn unsupported_inline<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    d.deserialize_any(Refuse(
        "inline PEM is not supported: put it in a file and use cert_file, key_file or client_ca_file",
    ))
}

fn unsupported_sans<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    d.deserialize_any(Refuse(
        "not supported: any client certificate the client_ca_file's CA issued is accepted",
    ))
}

fn unsupported_suites<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    d.deserialize_any(Refuse(
        "not supported: rustls offers only modern cipher suites and curves; remove the key",
    ))
}

/// `http2`: only `false` (this server speaks HTTP/1.1).
struct Http2Off;

impl<'de> de::Visitor<'de> for Http2Off {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("false")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        if v {
            return Err(E::custom(
                "HTTP/2 is not served (HTTP/1.1 only); remove the key or set it to false",
            ));
        }
        Ok(false)
    }
}

fn http2_off<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    d.deserialize_bool(Http2Off)
}

/// A string checked by `F` while serde_yaml reads it, so a refusal names the value's
/// line, column and key path (an error after `String::deserialize` would carry only the
/// enclosing mapping's).
struct StrCheck<F>(F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'de> for StrCheck<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
}

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> de::DeserializeSeed<'de> for StrCheck<F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

/// A bcrypt hash, checked when the file is read: a typo must not lock everyone out at
/// the first request.
#[derive(Debug)]
struct BcryptHash(String);

impl<'de> Deserialize<'de> for BcryptHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::DeserializeSeed::deserialize(StrCheck(check_hash), d)
    }
}

fn check_hash(s: &str) -> Result<BcryptHash, String> {
    // The value is not echoed: a password pasted where the hash belongs stays out of logs.
    let parts: bcrypt::HashParts = s.parse().map_err(|e| {
        format!("not a bcrypt hash ({e}); `htpasswd -nbBC 10 USER PASSWORD` prints USER:HASH")
    })?;
    // The crate's own limits; outside them every verification would fail.
    if !(4..=31).contains(&parts.get_cost()) {
        return Err(format!(
            "bcrypt cost {} is outside 4..=31",
            parts.get_cost()
        ));
    }
    Ok(BcryptHash(s.to_string()))
}

/// Response headers an operator may set; the exporter-toolkit's list. Anything else could
/// break the protocol (Content-Length, Connection...), so it is refused.
const ALLOWED_HEADERS: &[&str] = &[
    "Content-Security-Policy",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
];

#[derive(Debug, Default)]
struct Headers(Vec<(HeaderName, HeaderValue)>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadersVisitor)
    }
}

struct HeadersVisitor;

impl<'de> de::Visitor<'de> for HeadersVisitor {
    type Value = Headers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a mapping of header names to values")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key_seed(StrCheck(check_header_name))? {
            let value = map.next_value_seed(StrCheck(|v: &str| check_header_value(&name, v)))?;
            out.push((name, value));
        }
        Ok(Headers(out))
    }
}

fn check_header_name(name: &str) -> Result<HeaderName, String> {
    if !ALLOWED_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(name)) {
        return Err(format!(
            "header {name} cannot be set; allowed: {}",
            ALLOWED_HEADERS.join(", ")
        ));
    }
    HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))
}

fn check_header_value(name: &HeaderName, value: &str) -> Result<HeaderValue, String> {
    let lower = value.to_ascii_lowercase();
    // The toolkit's rules: these two have fixed vocabularies.
    let valid = match name.as_str() {
        "x-content-type-options" => lower == "nosniff",
        "x-frame-options" => lower == "deny" || lower == "sameorigin",
        _ => true,
    };
    match HeaderValue::from_str(value) {
        Ok(v) if valid => Ok(v),
        _ => Err(format!("invalid value {value:?} for header {name}")),
    }
}

impl<'de> Deserialize<'de> for ClientAuth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::DeserializeSeed::deserialize(StrCheck(client_auth), d)
    }
}

fn client_auth(s: &str) -> Result<ClientAuth, String> {
    match s {
        "NoClientCert" => Ok(ClientAuth::None),
        "VerifyClientCertIfGiven" => Ok(ClientAuth::VerifyIfGiven),
        "RequireAndVerifyClientCert" => Ok(ClientAuth::Require),
        // Go's unverified modes accept any certificate: no protection at all.
        "RequestClientCert" | "RequireAnyClientCert" => Err(format!(
            "{s} does not verify the certificate and is not supported; use \
             RequireAndVerifyClientCert or VerifyClientCertIfGiven"
        )),
        _ => Err(format!(
            "unknown client_auth_type {s:?}; expected NoClientCert, VerifyClientCertIfGiven \
             or RequireAndVerifyClientCert"
        )),
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::DeserializeSeed::deserialize(StrCheck(tls_version), d)
    }
}

fn tls_version(s: &str) -> Result<TlsVersion, String> {
    match s {
        "TLS12" => Ok(TlsVersion::Tls12),
        "TLS13" => Ok(TlsVersion::Tls13),
        "TLS10" | "TLS11" => Err(format!(
            "{s} is not offered (obsolete); TLS12 is the lowest"
        )),
        _ => Err(format!(
            "unknown TLS version {s:?}; expected TLS12 or TLS13"
        )),
    }
}

fn tls_settings(
    path: &Path,
    text: &str,
    base: &Path,
    raw: RawTls,
) -> Result<TlsSettings, ConfigError> {
    let missing = |field: &str| {
        located(
            path,
            text,
            &["tls_server_config", field],
            "is required when tls_server_config is set",
        )
    };
    let cert_file = base.join(raw.cert_file.ok_or_else(|| missing("cert_file"))?);
    let key_file = base.join(raw.key_file.ok_or_else(|| missing("key_file"))?);
    let client_ca_file = raw.client_ca_file.map(|p| base.join(p));
    if raw.client_auth_type != ClientAuth::None && client_ca_file.is_none() {
        return Err(missing("client_ca_file"));
    }
    if raw.client_auth_type == ClientAuth::None && client_ca_file.is_some() {
        return Err(located(
            path,
            text,
            &["tls_server_config", "client_ca_file"],
            "is set but client_auth_type is NoClientCert: set client_auth_type to \
             RequireAndVerifyClientCert, or remove client_ca_file",
        ));
    }
    let min = raw.min_version.unwrap_or(TlsVersion::Tls12);
    let max = raw.max_version.unwrap_or(TlsVersion::Tls13);
    if min > max {
        return Err(located(
            path,
            text,
            &["tls_server_config", "min_version"],
            "is above max_version",
        ));
    }
    Ok(TlsSettings {
        cert_file,
        key_file,
        client_auth: raw.client_auth_type,
        client_ca_file,
        min,
        max,
        prefer_server_order: raw.prefer_server_cipher_suites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::TestCa;

    const HASH: &str = "$2b$10$WtAJ6v/mCwe1TjFxak1BsOKHLldXrZoCTalKXYxsysuUhQkJ1./CS";

    fn err(text: &str) -> String {
        WebConfig::parse(Path::new("/etc/web.yml"), text)
            .unwrap_err()
            .to_string()
    }

    /// A directory with a certificate and key from a fresh test CA.
    fn cert_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new().unwrap();
        let leaf = ca.issue_server(&[]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), leaf.chain_pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), leaf.key_pem()).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.ca_pem()).unwrap();
        dir
    }

    #[test]
    fn empty_file_is_plain_and_open() {
        let w = WebConfig::parse(Path::new("web.yml"), "# nothing\n").unwrap();
        assert!(!w.is_tls() && !w.has_basic_auth());
        assert_eq!(w.describe(), "plain HTTP, no basic auth");
    }

    #[test]
    fn users_and_headers_without_tls() {
        let text = format!(
            "basic_auth_users:\n  prometheus: {HASH}\n  'alice': '{HASH}'\n\
             http_server_config:\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000\n"
        );
        let w = WebConfig::parse(Path::new("web.yml"), &text).unwrap();
        assert!(w.has_basic_auth() && !w.is_tls());
        assert_eq!(w.headers.len(), 2);
        assert_eq!(w.describe(), "plain HTTP, basic auth for 2 users");
    }

    #[test]
    fn tls_with_relative_paths_and_client_certificates() {
        let dir = cert_dir();
        let path = dir.path().join("web.yml");
        let text = "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n  \
                    client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
                    min_version: TLS13\n  prefer_server_cipher_suites: true\n";
        let w = WebConfig::parse(&path, text).unwrap();
        assert!(w.is_tls() && w.client_certs);
        assert_eq!(w.describe(), "TLS with client certificates, no basic auth");
    }

    #[test]
    fn unknown_and_unsupported_keys_name_file_line_and_key() {
        let e = err(
            "basic_auth_users: {}\ntls_server_config:\n  cert_file: a\n  key_file: b\n  foo: 1\n",
        );
        assert!(e.starts_with("/etc/web.yml:5:"), "{e}");
        assert!(e.contains("tls_server_config: unknown field `foo`"), "{e}");
        let e =
            err("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n");
        assert!(e.starts_with("/etc/web.yml:4:"), "{e}");
        assert!(e.contains("client_allowed_sans"), "{e}");
        assert!(e.contains("not supported"), "{e}");
        let e = err("tls_server_config:\n  cert: |\n    ---BEGIN\n  key_file: b\n");
        assert!(e.starts_with("/etc/web.yml:2:"), "{e}");
        assert!(e.contains("inline PEM is not supported"), "{e}");
        let e = err("http_server_config:\n  http2: true\n");
        assert!(e.starts_with("/etc/web.yml:2:"), "{e}");
        assert!(e.contains("HTTP/1.1 only"), "{e}");
        let e = err("rate_limit:\n  interval: 1s\n");
        assert!(
            e.starts_with("/etc/web.yml:1:") || e.starts_with("/etc/web.yml:2:"),
            "{e}"
        );
        assert!(e.contains("rate_limit"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_where_they_are_written() {
        let e = err("basic_auth_users:\n  prometheus: secret\n");
        assert!(e.starts_with("/etc/web.yml:2:"), "{e}");
        assert!(e.contains("basic_auth_users.prometheus"), "{e}");
        assert!(e.contains("not a bcrypt hash"), "{e}");
        assert!(
            !e.contains("secret"),
            "the refused value is not echoed: {e}"
        );
        let e = err(
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
        );
        assert!(e.starts_with("/etc/web.yml:4:"), "{e}");
        assert!(e.contains("does not verify"), "{e}");
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS11\n");
        assert!(e.starts_with("/etc/web.yml:4:"), "{e}");
        let e = err("http_server_config:\n  headers:\n    Content-Length: '5'\n");
        assert!(e.starts_with("/etc/web.yml:3:"), "{e}");
        assert!(e.contains("cannot be set"), "{e}");
        let e = err(&format!(
            "basic_auth_users:\n  ok: {HASH}\n  'a:b': {HASH}\n"
        ));
        assert!(e.starts_with("/etc/web.yml:3:"), "{e}");
        assert!(e.contains("cannot contain ':'"), "{e}");
        let e = err("http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n");
        assert!(e.contains("invalid value"), "{e}");
    }

    #[test]
    fn inconsistent_tls_settings() {
        let e = err("tls_server_config:\n  key_file: b\n");
        assert!(
            e.contains("tls_server_config.cert_file: is required"),
            "{e}"
        );
        let e = err(
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
        );
        assert!(
            e.contains("tls_server_config.client_ca_file: is required"),
            "{e}"
        );
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n");
        assert!(e.contains("client_auth_type is NoClientCert"), "{e}");
        assert!(e.starts_with("/etc/web.yml:4:3:"), "{e}");
        let e = err(
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS13\n  max_version: TLS12\n",
        );
        assert!(e.contains("min_version: is above max_version"), "{e}");
    }

    #[test]
    fn unreadable_or_mismatched_files_name_the_key_and_file() {
        let dir = cert_dir();
        let path = dir.path().join("web.yml");
        let parse = |text: &str| WebConfig::parse(&path, text).unwrap_err().to_string();
        let e = parse("tls_server_config:\n  cert_file: missing.crt\n  key_file: tls.key\n");
        assert!(
            e.contains(":2:3: tls_server_config.cert_file: cannot read"),
            "{e}"
        );
        assert!(e.contains("missing.crt"), "{e}");
        // A certificate where the key should be: no private key in it.
        let e = parse("tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.crt\n");
        assert!(e.contains(":3:3: tls_server_config.key_file:"), "{e}");
        assert!(e.contains("no usable PEM private key"), "{e}");
        // Another certificate's key.
        let other = TestCa::new().unwrap().issue_server(&[]).unwrap();
        std::fs::write(dir.path().join("other.key"), other.key_pem()).unwrap();
        let e = parse("tls_server_config:\n  cert_file: tls.crt\n  key_file: other.key\n");
        assert!(e.contains("does not go with"), "{e}");
        let e = parse(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: tls.key\n",
        );
        assert!(e.contains("tls_server_config.client_ca_file:"), "{e}");
        assert!(e.contains("no certificate"), "{e}");
    }

    #[test]
    fn unreadable_file() {
        let e = WebConfig::load(Path::new("/nonexistent/web.yml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/web.yml: cannot read"), "{e}");
    }
}
