//! Token errors: everything a token request can end in, with what the server said kept intact.
//!
//! Nothing here holds a secret: an endpoint's error body is redacted (`crate::redact`)
//! before it is parsed into a `TokenError` (`super::http::HttpClient::send`), an excerpt of
//! a success body is made only by `super::http::excerpt`, which blanks every `*token*`
//! field, and our own messages name files and variables, not their contents.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The longest excerpt of a non-OAuth reply that is kept (HTML error pages are big).
pub const EXCERPT_MAX: usize = 200;

/// An OAuth error reply, with Microsoft's extra fields (oauth2's `StandardErrorResponse`
/// drops `error_codes`, `trace_id` and `correlation_id`, which operators need).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OAuthErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_codes: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_uri: Option<String>,
    /// Google's refinement of `error` (`invalid_rapt`: re-authentication required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_subtype: Option<String>,
}

impl OAuthErrorBody {
    /// The AADSTS code: `error_codes[0]`, else the `AADSTSnnnn:` prefix of the description
    /// (only when `error_codes` is absent, as the contract says).
    pub fn aadsts_code(&self) -> Option<u64> {
        if let Some(code) = self.error_codes.first() {
            return Some(*code);
        }
        let rest = self
            .error_description
            .as_deref()?
            .trim_start()
            .strip_prefix("AADSTS")?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() || !rest[digits.len()..].starts_with(':') {
            return None;
        }
        digits.parse().ok()
    }

    /// The description's first line, bounded (Microsoft appends trace and timestamp lines).
    pub fn short_description(&self) -> Option<String> {
        let d = self.error_description.as_deref()?;
        let first = d.lines().next().unwrap_or("").trim();
        Some(bounded(first, EXCERPT_MAX))
    }
}

impl fmt::Display for OAuthErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        if let Some(code) = self.aadsts_code() {
            write!(f, " (AADSTS{code})")?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for OAuthErrorBody {}

/// Why a token could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// A delegated credential has no refresh token yet: `login` was never run.
    #[error("no refresh token stored for credential `{credential}`: run `login`")]
    Missing { credential: String },
    /// The endpoint answered with an OAuth error body.
    #[error("token endpoint answered HTTP {status}: {body}")]
    Endpoint {
        status: u16,
        // Boxed: the body is big and errors travel in every `Result`.
        body: Box<OAuthErrorBody>,
        retry_after: Option<Duration>,
    },
    /// The endpoint answered something that is not OAuth JSON (HTML, empty, garbage), or a
    /// 2xx reply that cannot be used (no access token, not JSON). `excerpt` never holds the
    /// value of a `*token*` field.
    #[error("{}", http_message(*status, excerpt))]
    Http {
        status: u16,
        excerpt: String,
        retry_after: Option<Duration>,
    },
    /// DNS, connect, TLS, timeout, reset: the endpoint was not reached or did not finish.
    #[error("token endpoint unreachable: {detail}")]
    Network { detail: String },
    /// The credential's own material is unusable (secret file, certificate, URL).
    #[error("credential `{credential}` is unusable: {detail}")]
    Config { credential: String, detail: String },
    /// A `token_file` could not be read or is empty.
    #[error("token file {path}: {detail}")]
    TokenFile { path: String, detail: String },
    /// The refresh token store could not be read.
    #[error("token store: {detail}")]
    Store { detail: String },
}

impl TokenError {
    /// The HTTP status of the reply, if there was one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            TokenError::Endpoint { status, .. } | TokenError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What the server asked us to wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Endpoint { retry_after, .. } | TokenError::Http { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The OAuth body, if the server sent one.
    pub fn oauth_body(&self) -> Option<&OAuthErrorBody> {
        match self {
            TokenError::Endpoint { body, .. } => Some(body),
            _ => None,
        }
    }

    /// What the status page and logs show beside the reason: HTTP status, AADSTS code,
    /// `error`, the description's first line (bounded), `trace_id`, `correlation_id`. No
    /// secrets: what the endpoint sent was redacted as it entered the `TokenError`
    /// (`crate::redact`), and our own errors name files, not contents. Not a
    /// classification: the reason is `crate::classify`'s, at the status/metrics boundary.
    pub fn detail(&self) -> String {
        match self {
            TokenError::Endpoint { status, body, .. } => {
                let mut parts = vec![format!("HTTP {status}")];
                if let Some(code) = body.aadsts_code() {
                    parts.push(format!("AADSTS{code}"));
                }
                parts.push(bounded(&body.error, 64));
                if let Some(d) = body.short_description() {
                    parts.push(d);
                }
                if let Some(t) = &body.trace_id {
                    parts.push(format!("trace_id={}", bounded(t, 64)));
                }
                if let Some(c) = &body.correlation_id {
                    parts.push(format!("correlation_id={}", bounded(c, 64)));
                }
                parts.join("; ")
            }
            other => bounded(&other.to_string(), 2 * EXCERPT_MAX),
        }
    }
}

fn http_message(status: u16, excerpt: &str) -> String {
    if (200..300).contains(&status) {
        // The excerpt is already bounded and free of control characters (`bounded`).
        format!("token endpoint answered HTTP {status} with an unusable token reply: {excerpt}")
    } else {
        format!("token endpoint answered HTTP {status} without an OAuth error: {excerpt:?}")
    }
}

/// Bytes of a failure's detail in a WARN log line: one short line per failure; the full
/// detail goes to DEBUG.
pub const LOG_DETAIL_MAX: usize = 120;

/// Cuts `s` to at most `max` bytes on a char boundary, control characters made visible.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_code_prefers_error_codes_then_prefix() {
        let mut b = OAuthErrorBody {
            error: "invalid_grant".into(),
            error_description: Some("AADSTS50173: The provided grant has expired".into()),
            error_codes: vec![70008],
            ..Default::default()
        };
        assert_eq!(b.aadsts_code(), Some(70008));
        b.error_codes.clear();
        assert_eq!(b.aadsts_code(), Some(50173));
        b.error_description = Some("Token has been expired or revoked.".into());
        assert_eq!(b.aadsts_code(), None);
        b.error_description = Some("AADSTS".into());
        assert_eq!(b.aadsts_code(), None);
    }

    #[test]
    fn bounded_cuts_and_cleans() {
        assert_eq!(bounded("a\nb", 10), "a b");
        assert_eq!(bounded("héllo world", 5), "héll…");
    }
}
