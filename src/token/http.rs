//! The HTTP client the grants use: rustls (ring) with system roots plus `tls.ca_file`, no
//! redirects (a token endpoint that redirects is misconfigured, and following it would send
//! credentials elsewhere), a per-request timeout, and a cap on the reply size.

use super::error::{EXCERPT_MAX, TokenError, bounded};
use crate::redact::Redactor;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Replies larger than this are cut off: a token reply is a few KiB.
pub const MAX_BODY: usize = 1024 * 1024;
/// The most bytes of the exchange one token fetch records (a refresh that falls back to
/// an older stored token makes two requests; each record is ~1 KiB).
pub const MAX_EXCHANGE_BYTES: usize = 8 << 10;

tokio::task_local! {
    /// Where [`HttpClient::send`] records the redacted exchange, while the token service
    /// runs one fetch inside [`recording`] (requests made elsewhere, `login`'s, record
    /// nothing).
    static EXCHANGE: Arc<Mutex<String>>;
}

/// Runs `f` and returns its output with what its token requests exchanged, redacted: per
/// request the method and URL, the form's keys (values of sensitive ones `<redacted>`),
/// the reply's status and a redacted excerpt of its body. Empty when no request was sent.
pub async fn recording<F: std::future::Future>(f: F) -> (F::Output, String) {
    let cell = Arc::new(Mutex::new(String::new()));
    let out = EXCHANGE.scope(cell.clone(), f).await;
    let text = std::mem::take(&mut *cell.lock().unwrap_or_else(|e| e.into_inner()));
    (out, text)
}

/// Adds `lines`, through `redactor`, to the exchange being recorded, within
/// [`MAX_EXCHANGE_BYTES`].
fn record(redactor: &Redactor, lines: &str) {
    let _ = EXCHANGE.try_with(|cell| {
        let mut t = cell.lock().unwrap_or_else(|e| e.into_inner());
        let text = redactor.redact(lines);
        let room = MAX_EXCHANGE_BYTES.saturating_sub(t.len());
        if text.len() <= room {
            t.push_str(&text);
        } else if room > 0 {
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            t.push_str(&text[..end]);
            t.push_str("\n# ... cut\n");
        }
    });
}

/// The request as recorded: method, URL, one line per form field, sensitive values
/// `<redacted>` by name (and every value again through the request's redactor).
fn request_record(method: &http::Method, uri: &http::Uri, body: &[u8]) -> String {
    let mut out = format!("> {method} {uri}\n");
    for (k, v) in form_urlencoded::parse(body) {
        let v = if crate::redact::is_sensitive(&k) {
            crate::secret::REDACTED
        } else {
            &v
        };
        out.push_str(&format!("> {}={}\n", bounded(&k, 64), bounded(v, 256)));
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("cannot read CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("cannot build HTTP client: {0}")]
    Build(String),
}

/// A transport failure as oauth2 sees it; becomes [`TokenError::Network`].
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Request(String),
    #[error("reply larger than {MAX_BODY} bytes")]
    TooLarge,
}

/// Builds the rustls config: the system's roots plus the PEM certificates of `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, HttpClientError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: an extra CA file may be all that is needed.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let ca_err = |detail: String| HttpClientError::CaFile {
            path: path.display().to_string(),
            detail,
        };
        // Capped, never a FIFO or device: see `crate::fsread`.
        let pem = crate::fsread::read(path, crate::fsread::FileKind::Pem)
            .map_err(|e| ca_err(e.reason()))?;
        let mut added = 0;
        for item in x509_parser::pem::Pem::iter_from_buffer(&pem) {
            let item = item.map_err(|e| ca_err(e.to_string()))?;
            if item.label == "CERTIFICATE" {
                roots
                    .add(rustls_pki_types::CertificateDer::from(item.contents))
                    .map_err(|e| ca_err(e.to_string()))?;
                added += 1;
            }
        }
        if added == 0 {
            return Err(ca_err("no CERTIFICATE in file".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpClientError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The shared HTTP client of the token service.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
}

/// What oauth2 does not hand back from a reply: its status and `Retry-After`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplyMeta {
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
}

impl HttpClient {
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<HttpClient, HttpClientError> {
        let inner = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(ca_file)?)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| HttpClientError::Build(e.to_string()))?;
        Ok(HttpClient { inner })
    }

    /// One request, the reply read up to [`MAX_BODY`]; the status and `Retry-After` are also
    /// written to `meta`, because oauth2 keeps neither in its error.
    ///
    /// The reply body is where the endpoint's text enters, so an error reply (any status
    /// but 2xx) is redacted here, before oauth2 parses it into a `TokenError`: with the
    /// secrets of this request's form (client secret, refresh token, client assertion, device
    /// code, in every form) and the sensitive-field rules of [`Redactor`]. A success reply
    /// is left as sent (it carries the tokens we need, and a provider that does not rotate
    /// sends the refresh token back as is); one that cannot be used is shown only through
    /// [`excerpt`], which blanks every `*token*`, `*secret*` and `*assertion*` field.
    pub async fn send(
        &self,
        request: oauth2::HttpRequest,
        meta: &Mutex<ReplyMeta>,
    ) -> Result<oauth2::HttpResponse, TransportError> {
        let (parts, body) = request.into_parts();
        let mut redactor = Redactor::new();
        redactor.add_form_secrets(&body);
        let sent = request_record(&parts.method, &parts.uri, &body);
        let mut req = self
            .inner
            .request(parts.method, parts.uri.to_string())
            .body(body);
        for (name, value) in parts.headers.iter() {
            req = req.header(name, value);
        }
        let mut response = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let e = transport(e);
                record(&redactor, &format!("{sent}< no reply: {e}\n\n"));
                return Err(e);
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if let Ok(mut m) = meta.lock() {
            *m = ReplyMeta {
                status: Some(status.as_u16()),
                retry_after,
            };
        }
        let mut builder = http::Response::builder().status(status);
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let mut body = Vec::new();
        let read = async {
            while let Some(chunk) = response.chunk().await.map_err(transport)? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(TransportError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(())
        };
        if let Err(e) = read.await {
            record(
                &redactor,
                &format!("{sent}< HTTP {}, reply not read: {e}\n\n", status.as_u16()),
            );
            return Err(e);
        }
        let body = if status.is_success() || body.is_empty() {
            body
        } else {
            redactor.redact_bytes(&body).into_bytes()
        };
        // `excerpt` blanks every token, secret and assertion field of a success reply.
        record(
            &redactor,
            &format!("{sent}< HTTP {}\n< {}\n\n", status.as_u16(), excerpt(&body)),
        );
        builder
            .body(body)
            .map_err(|e| TransportError::Request(e.to_string()))
    }

    /// A form POST outside oauth2 (the device code poll, whose oauth2 loop loses the error body).
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        meta: &Mutex<ReplyMeta>,
    ) -> Result<oauth2::HttpResponse, TransportError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish()
            .into_bytes();
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(url)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .map_err(|e| TransportError::Request(e.to_string()))?;
        self.send(request, meta).await
    }
}

/// reqwest's message plus its causes (`error sending request` alone says nothing). The URL
/// is the token endpoint's, which holds no secret.
fn transport(e: reqwest::Error) -> TransportError {
    let mut msg = if e.is_timeout() {
        format!("timeout: {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    TransportError::Request(bounded(&msg, 2 * EXCERPT_MAX))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = humantime::parse_rfc3339_weak(v)
        .ok()
        .or_else(|| httpdate_parse(v))?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send.
fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[2])? + 1;
    let s = format!("{}-{month:02}-{:0>2}T{}Z", parts[3], parts[1], parts[4]);
    humantime::parse_rfc3339(&s).ok()
}

/// Maps a finished oauth2 request error to ours, with the status oauth2 dropped.
pub fn from_oauth2<T: std::error::Error + 'static>(
    e: oauth2::RequestTokenError<T, super::error::OAuthErrorBody>,
    meta: ReplyMeta,
) -> TokenError {
    use oauth2::RequestTokenError as E;
    let status = meta.status.unwrap_or(0);
    match e {
        E::ServerResponse(body) => TokenError::Endpoint {
            status,
            body: Box::new(body),
            retry_after: meta.retry_after,
        },
        // An endpoint that answered, but far too much, is broken, not unreachable: it is
        // classified by its HTTP status like any other reply that is not OAuth JSON.
        E::Request(e)
            if (&e as &dyn std::error::Error)
                .downcast_ref::<TransportError>()
                .is_some_and(|t| matches!(t, TransportError::TooLarge)) =>
        {
            TokenError::Http {
                status,
                excerpt: format!("reply larger than {MAX_BODY} bytes"),
                retry_after: meta.retry_after,
            }
        }
        E::Request(e) => TokenError::Network {
            detail: e.to_string(),
        },
        // A 2xx body that cannot be used says why (the lenient reader's own words, which
        // never quote a value) beside its redacted excerpt.
        E::Parse(e, body) if (200..300).contains(&status) => match oauth_error_in(&body) {
            // Some endpoints (GitHub's among them) send their OAuth errors with HTTP 200.
            Some(b) => TokenError::Endpoint {
                status,
                body: Box::new(b),
                retry_after: meta.retry_after,
            },
            None => TokenError::Http {
                status,
                excerpt: unusable(&e.into_inner().to_string(), &body),
                retry_after: meta.retry_after,
            },
        },
        E::Parse(_, body) => TokenError::Http {
            status,
            excerpt: excerpt(&body),
            retry_after: meta.retry_after,
        },
        E::Other(msg) => TokenError::Http {
            status,
            excerpt: excerpt(msg.as_bytes()),
            retry_after: meta.retry_after,
        },
    }
}

/// A short printable excerpt of a reply body, with the value of every sensitive field
/// (`access_token`, `refresh_token`, `id_token`, `client_secret`...) `<redacted>` before
/// it is cut, even in JSON that is broken or cut short.
pub fn excerpt(body: &[u8]) -> String {
    let text = Redactor::new().redact_bytes(&body[..body.len().min(64 * EXCERPT_MAX)]);
    bounded(text.trim(), EXCERPT_MAX)
}

/// The OAuth error body in a reply, if it is one (a JSON object with a non-empty `error`).
pub fn oauth_error_in(body: &[u8]) -> Option<super::error::OAuthErrorBody> {
    serde_json::from_slice::<super::error::OAuthErrorBody>(body)
        .ok()
        .filter(|b| !b.error.trim().is_empty())
}

/// The excerpt of a 2xx reply that cannot be used: why (the reader's words, cut before
/// serde's position suffix), then the redacted body.
pub fn unusable(why: &str, body: &[u8]) -> String {
    let why = why.split(" at line ").next().unwrap_or(why);
    format!("{}; reply: {}", bounded(why, 96), excerpt(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_never_carry_token_values() {
        let body = br#"{"token_type":"Bearer","refresh_token":"rt-SECRET","id_token":"id-SECRET","expires_in":"x"}"#;
        let e = excerpt(body);
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("\"refresh_token\":\"<redacted>\""), "{e}");
        let u = unusable("the reply has no access_token at line 1 column 90", body);
        assert!(
            u.starts_with("the reply has no access_token; reply: {"),
            "{u}"
        );
        assert!(!u.contains("SECRET"), "{u}");
        // A long value cut by the excerpt's bound is still blanked.
        let long = format!(r#"{{"access_token":"{}"}}"#, "A".repeat(5000));
        assert_eq!(excerpt(long.as_bytes()), r#"{"access_token":"<redacted>"}"#);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn tls_config_rejects_missing_ca_file() {
        assert!(matches!(
            tls_config(Some(Path::new("/nonexistent/ca.pem"))),
            Err(HttpClientError::CaFile { .. })
        ));
        assert!(tls_config(None).is_ok());
    }
}
