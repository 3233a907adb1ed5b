//! Token endpoint replies read leniently, as providers really send them (RFC 6749 §5.1,
//! RFC 8628 §3.2, and the dialects beside them).
//!
//! - Token replies: `access_token` is required; `token_type` is `Bearer` in any case (or
//!   missing); `expires_in` is a number or a numeric string (Entra ID's v1.0 endpoint), and
//!   when it is missing the access token's own `exp` (a JWT) or one hour is assumed; `scope`
//!   is a space-separated string, a list, or missing; unknown fields are ignored.
//! - Device authorization replies name the page `verification_uri` (RFC 8628),
//!   `verification_url` (Google), or both.
//!
//! A reply that still cannot be used becomes `token_error`, and the excerpt shown with it
//! never carries the value of a `*token*` field (`crate::redact`, through `token::http::excerpt`).

use crate::secret::Secret;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::Error as _;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Assumed lifetime of an access token whose reply and token say nothing (RFC 6749 §5.1
/// leaves it to the server's documentation; one hour is what the big providers issue).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// RFC 8628 §3.2: the default polling interval when `interval` is missing.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Assumed validity of a device code whose reply has no `expires_in` (Entra's is 15 minutes).
pub const DEFAULT_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(900);

/// A successful token reply. Implements [`oauth2::TokenResponse`], so the oauth2 crate's
/// grants hand it back; its `Deserialize` is the lenient reading described above.
#[derive(Debug, serde::Serialize)]
pub struct TokenReply {
    access_token: oauth2::AccessToken,
    token_type: oauth2::basic::BasicTokenType,
    /// Seconds: from `expires_in`, else the JWT's `exp`, else [`DEFAULT_LIFETIME`].
    expires_in: u64,
    refresh_token: Option<oauth2::RefreshToken>,
    scopes: Option<Vec<oauth2::Scope>>,
}

impl TokenReply {
    /// The access token's lifetime as the reply (or the token) states it.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.expires_in)
    }

    /// Reads a reply body; the error says what is wrong, never a field's value.
    pub fn from_slice(body: &[u8]) -> Result<TokenReply, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| "the reply is not JSON".to_string())?;
        TokenReply::from_value(&value, SystemTime::now())
    }

    /// Reads a parsed reply at wall-clock time `now` (for a JWT's `exp`).
    pub fn from_value(value: &Value, now: SystemTime) -> Result<TokenReply, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| "the reply is not a JSON object".to_string())?;
        let access = match obj.get("access_token") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(Value::String(_)) => return Err("access_token is empty".into()),
            Some(_) => return Err("access_token is not a string".into()),
            None => return Err("the reply has no access_token".into()),
        };
        match obj.get("token_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t.trim().eq_ignore_ascii_case("bearer") => {}
            Some(Value::String(t)) => {
                return Err(format!(
                    "token_type `{}` is not Bearer",
                    super::error::bounded(t, 32)
                ));
            }
            Some(_) => return Err("token_type is not a string".into()),
        }
        let expires_in = match obj.get("expires_in") {
            None | Some(Value::Null) => None,
            Some(v) => {
                Some(seconds(v).ok_or("expires_in is neither a number nor a numeric string")?)
            }
        };
        let expires_in = expires_in
            .or_else(|| jwt_exp(&access).map(|exp| exp.saturating_sub(unix(now))))
            .unwrap_or(DEFAULT_LIFETIME.as_secs());
        let refresh_token = match obj.get("refresh_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(oauth2::RefreshToken::new(s.trim().to_string())),
            Some(_) => return Err("refresh_token is not a string".into()),
        };
        let scopes = match obj.get("scope") {
            Some(Value::String(s)) => Some(
                s.split_whitespace()
                    .map(|s| oauth2::Scope::new(s.into()))
                    .collect(),
            ),
            Some(Value::Array(list)) => Some(
                list.iter()
                    .filter_map(Value::as_str)
                    .map(|s| oauth2::Scope::new(s.into()))
                    .collect(),
            ),
            // Missing, null or odd: the scope is informational only.
            _ => None,
        };
        Ok(TokenReply {
            access_token: oauth2::AccessToken::new(access),
            token_type: oauth2::basic::BasicTokenType::Bearer,
            expires_in,
            refresh_token,
            scopes,
        })
    }
}

impl<'de> serde::Deserialize<'de> for TokenReply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        TokenReply::from_value(&value, SystemTime::now()).map_err(D::Error::custom)
    }
}

impl oauth2::TokenResponse for TokenReply {
    type TokenType = oauth2::basic::BasicTokenType;

    fn access_token(&self) -> &oauth2::AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &Self::TokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        Some(self.lifetime())
    }
    fn refresh_token(&self) -> Option<&oauth2::RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<oauth2::Scope>> {
        self.scopes.as_ref()
    }
}

/// A device authorization reply (RFC 8628 §3.2).
#[derive(Debug)]
pub struct DeviceAuthorization {
    pub device_code: Secret,
    /// Shown to the user: not a secret.
    pub user_code: String,
    /// `verification_uri`, else `verification_url`.
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    pub interval: Duration,
}

impl DeviceAuthorization {
    /// Reads a reply body; the error says what is wrong, never a field's value.
    pub fn from_slice(body: &[u8]) -> Result<DeviceAuthorization, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| "the reply is not JSON".to_string())?;
        let obj = value
            .as_object()
            .ok_or_else(|| "the reply is not a JSON object".to_string())?;
        let text = |key: &str| match obj.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => None,
        };
        let device_code = text("device_code").ok_or("the reply has no device_code")?;
        let user_code = text("user_code").ok_or("the reply has no user_code")?;
        let verification_uri = text("verification_uri")
            .or_else(|| text("verification_url"))
            .ok_or("the reply has neither verification_uri nor verification_url")?;
        let duration = |key: &str, default: Duration| -> Result<Duration, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => seconds(v)
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("{key} is neither a number nor a numeric string")),
            }
        };
        Ok(DeviceAuthorization {
            device_code: Secret::new(device_code),
            user_code,
            verification_uri,
            verification_uri_complete: text("verification_uri_complete")
                .or_else(|| text("verification_url_complete")),
            expires_in: duration("expires_in", DEFAULT_DEVICE_CODE_LIFETIME)?,
            interval: duration("interval", DEFAULT_INTERVAL)?.max(Duration::from_secs(1)),
        })
    }
}

/// Whole seconds from a JSON number or numeric string (`3599`, `"3599"`, `3599.0`).
fn seconds(v: &Value) -> Option<u64> {
    let f = match v {
        Value::Number(n) => n.as_u64().map(|u| u as f64).or_else(|| n.as_f64())?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (0.0..1e12).contains(&f).then_some(f.round() as u64)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The `exp` claim of a JWT (unverified: it only tells us when to renew).
fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_, claims, _) = (parts.next()?, parts.next()?, parts.next()?);
    let claims = URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&claims).ok()?;
    seconds(claims.get("exp")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oauth2::TokenResponse;

    fn parse(json: &str) -> Result<TokenReply, String> {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        TokenReply::from_value(&serde_json::from_str(json).unwrap(), now)
    }

    fn jwt(exp: u64) -> String {
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"aud":"x","exp":{exp}}}"#));
        format!("eyJ0eXAiOiJKV1QifQ.{claims}.c2ln")
    }

    #[test]
    fn expires_in_number_string_jwt_or_one_hour() {
        let base = r#""token_type":"Bearer","access_token":"at""#;
        assert_eq!(
            parse(&format!("{{{base},\"expires_in\":3599}}"))
                .unwrap()
                .lifetime()
                .as_secs(),
            3599
        );
        assert_eq!(
            parse(&format!("{{{base},\"expires_in\":\"3599\"}}"))
                .unwrap()
                .lifetime()
                .as_secs(),
            3599
        );
        assert_eq!(
            parse(&format!("{{{base},\"expires_in\":3599.0}}"))
                .unwrap()
                .lifetime()
                .as_secs(),
            3599
        );
        assert_eq!(
            parse(&format!("{{{base},\"expires_in\":\" 60 \"}}"))
                .unwrap()
                .lifetime()
                .as_secs(),
            60
        );
        let with_jwt = format!(
            r#"{{"token_type":"Bearer","access_token":"{}"}}"#,
            jwt(1_700_000_000 + 1234)
        );
        assert_eq!(parse(&with_jwt).unwrap().lifetime().as_secs(), 1234);
        // An expired JWT: zero, so it is renewed at once.
        let old = format!(r#"{{"access_token":"{}"}}"#, jwt(1));
        assert_eq!(parse(&old).unwrap().lifetime(), Duration::ZERO);
        assert_eq!(
            parse(&format!("{{{base}}}")).unwrap().lifetime(),
            DEFAULT_LIFETIME
        );
        assert_eq!(
            parse(&format!("{{{base},\"expires_in\":null}}"))
                .unwrap()
                .lifetime(),
            DEFAULT_LIFETIME
        );
        for bad in [r#""soon""#, "-5", "true", "[1]", r#""3599s""#] {
            let e = parse(&format!("{{{base},\"expires_in\":{bad}}}")).unwrap_err();
            assert!(e.contains("expires_in"), "{bad}: {e}");
        }
    }

    #[test]
    fn token_type_in_any_case_or_missing() {
        for tt in [r#""Bearer""#, r#""bearer""#, r#""BEARER""#, "null"] {
            parse(&format!(r#"{{"access_token":"at","token_type":{tt}}}"#)).unwrap();
        }
        parse(r#"{"access_token":"at"}"#).unwrap();
        let e = parse(r#"{"access_token":"at","token_type":"pop"}"#).unwrap_err();
        assert_eq!(e, "token_type `pop` is not Bearer");
    }

    #[test]
    fn scope_string_list_or_missing_and_unknown_fields() {
        let r = parse(r#"{"access_token":"at","token_type":"Bearer","scope":"a b"}"#).unwrap();
        assert_eq!(r.scopes().unwrap().len(), 2);
        let r =
            parse(r#"{"access_token":"at","token_type":"Bearer","scope":["a","b","c"]}"#).unwrap();
        assert_eq!(r.scopes().unwrap().len(), 3);
        let r = parse(r#"{"access_token":"at","token_type":"Bearer"}"#).unwrap();
        assert!(r.scopes().is_none());
        let r = parse(
            r#"{"access_token":"at","token_type":"Bearer","id_token":"x","session_state":{"a":[1,{"b":null}]},"not-before-policy":0,"refresh_token":"rt"}"#,
        )
        .unwrap();
        assert_eq!(r.access_token().secret(), "at");
        assert_eq!(r.refresh_token().unwrap().secret(), "rt");
    }

    #[test]
    fn unusable_replies_say_why_without_values() {
        for (json, want) in [
            (
                r#"{"token_type":"Bearer","refresh_token":"rt-secret"}"#,
                "the reply has no access_token",
            ),
            (r#"{"access_token":""}"#, "access_token is empty"),
            (r#"{"access_token":42}"#, "access_token is not a string"),
            (
                r#"{"access_token":"at-secret","refresh_token":7}"#,
                "refresh_token is not a string",
            ),
            ("[1,2]", "the reply is not a JSON object"),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e, want);
            assert!(!e.contains("secret"));
        }
        assert_eq!(
            TokenReply::from_slice(b"<html>").unwrap_err(),
            "the reply is not JSON"
        );
    }

    #[test]
    fn oauth2_reads_it_through_serde() {
        let r: TokenReply = serde_json::from_str(
            r#"{"access_token":"at","expires_in":"3599","token_type":"bearer"}"#,
        )
        .unwrap();
        assert_eq!(r.expires_in(), Some(Duration::from_secs(3599)));
        let e = serde_json::from_str::<TokenReply>(r#"{"expires_in":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("no access_token"), "{e}");
    }

    #[test]
    fn device_replies_in_three_shapes() {
        let base = r#""device_code":"dc-secret","user_code":"ABCD","expires_in":900,"interval":5"#;
        for uri in [
            r#""verification_uri":"https://a/dev""#,
            r#""verification_url":"https://a/dev""#,
            r#""verification_uri":"https://a/dev","verification_url":"https://a/dev""#,
        ] {
            let d =
                DeviceAuthorization::from_slice(format!("{{{base},{uri}}}").as_bytes()).unwrap();
            assert_eq!(d.verification_uri, "https://a/dev");
            assert_eq!(d.user_code, "ABCD");
            assert_eq!(d.device_code.expose(), "dc-secret");
            assert_eq!(d.interval, Duration::from_secs(5));
        }
        // Numbers as strings, defaults when missing.
        let d = DeviceAuthorization::from_slice(
            br#"{"device_code":"d","user_code":"U","verification_url":"https://g/device","expires_in":"1800"}"#,
        )
        .unwrap();
        assert_eq!(d.expires_in, Duration::from_secs(1800));
        assert_eq!(d.interval, DEFAULT_INTERVAL);
        let e = DeviceAuthorization::from_slice(format!("{{{base}}}").as_bytes()).unwrap_err();
        assert_eq!(
            e,
            "the reply has neither verification_uri nor verification_url"
        );
    }
}
