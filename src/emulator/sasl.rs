//! Server-side parsing of SASL XOAUTH2 and OAUTHBEARER (RFC 7628) client responses.

use base64::prelude::*;

/// The OAuth mechanisms the emulator understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mechanism {
    Xoauth2,
    OauthBearer,
}

impl Mechanism {
    /// Recognises a mechanism name as sent by a client (case-insensitive).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("XOAUTH2") {
            Some(Self::Xoauth2)
        } else if name.eq_ignore_ascii_case("OAUTHBEARER") {
            Some(Self::OauthBearer)
        } else {
            None
        }
    }

    /// The base64 error challenge a Gmail-like server sends after a refused token.
    pub(crate) fn error_challenge(self) -> &'static str {
        match self {
            // Gmail's literal challenge, from docs/field-replies.md.
            Self::Xoauth2 => {
                "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ=="
            }
            // {"status":"invalid_token","scope":"https://mail.google.com/"} (RFC 7628 section 3.2.2).
            Self::OauthBearer => {
                "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ=="
            }
        }
    }

    /// Whether `line` is the reply the mechanism prescribes after an error challenge:
    /// an empty response for XOAUTH2, a single %x01 (`AQ==`) for OAUTHBEARER.
    pub(crate) fn is_challenge_ack(self, line: &str) -> bool {
        match self {
            Self::Xoauth2 => line.is_empty(),
            Self::OauthBearer => line == "AQ==",
        }
    }
}

/// The user and bearer token carried by a client response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The SASL user; OAUTHBEARER may leave it out.
    pub(crate) user: Option<String>,
    pub(crate) token: String,
}

/// Why a client response could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SaslError {
    #[error("response is not valid base64")]
    Base64,
    #[error("response is not in the mechanism's format")]
    Format,
}

/// Decodes a base64 client response (one line, surrounding whitespace ignored) and
/// parses it for `mech`.
pub(crate) fn parse_response(mech: Mechanism, line: &str) -> Result<Credentials, SaslError> {
    let raw = BASE64_STANDARD
        .decode(line.trim())
        .map_err(|_| SaslError::Base64)?;
    match mech {
        Mechanism::Xoauth2 => parse_xoauth2(&raw),
        Mechanism::OauthBearer => parse_oauthbearer(&raw),
    }
}

/// `user=U ^A auth=Bearer T ^A ^A`.
fn parse_xoauth2(raw: &[u8]) -> Result<Credentials, SaslError> {
    let text = std::str::from_utf8(raw).map_err(|_| SaslError::Format)?;
    let body = text.strip_suffix("\x01\x01").ok_or(SaslError::Format)?;
    let mut user = None;
    let mut token = None;
    for field in body.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(a) = field.strip_prefix("auth=") {
            token = Some(bearer(a)?);
        } else {
            return Err(SaslError::Format);
        }
    }
    match (user, token) {
        (Some(u), Some(t)) if !u.is_empty() => Ok(Credentials {
            user: Some(u),
            token: t,
        }),
        _ => Err(SaslError::Format),
    }
}

/// `gs2-header ^A host=H ^A port=P ^A auth=Bearer T ^A ^A` with gs2-header `n,a=U,` or `n,,`.
fn parse_oauthbearer(raw: &[u8]) -> Result<Credentials, SaslError> {
    let text = std::str::from_utf8(raw).map_err(|_| SaslError::Format)?;
    let body = text.strip_suffix("\x01\x01").ok_or(SaslError::Format)?;
    let mut fields = body.split('\x01');
    let gs2 = fields.next().ok_or(SaslError::Format)?;
    // Channel binding ("p=" or "y") is not supported by OAUTHBEARER servers in practice.
    let rest = gs2.strip_prefix("n,").ok_or(SaslError::Format)?;
    let (authzid, tail) = rest.split_once(',').ok_or(SaslError::Format)?;
    if !tail.is_empty() {
        return Err(SaslError::Format);
    }
    let user = if authzid.is_empty() {
        None
    } else {
        let a = authzid.strip_prefix("a=").ok_or(SaslError::Format)?;
        Some(unescape_saslname(a)?)
    };
    let mut token = None;
    for field in fields {
        let (key, value) = field.split_once('=').ok_or(SaslError::Format)?;
        if key == "auth" {
            token = Some(bearer(value)?);
        } else if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(SaslError::Format);
        }
    }
    Ok(Credentials {
        user,
        token: token.ok_or(SaslError::Format)?,
    })
}

/// The token of an `auth=` value, whose scheme must be Bearer (case-insensitive).
fn bearer(value: &str) -> Result<String, SaslError> {
    let (scheme, token) = value.split_once(' ').ok_or(SaslError::Format)?;
    if !scheme.eq_ignore_ascii_case("Bearer") || token.trim().is_empty() {
        return Err(SaslError::Format);
    }
    Ok(token.trim().to_string())
}

/// RFC 5801 saslname: `=2C` is `,`, `=3D` is `=`, any other `=` is malformed.
fn unescape_saslname(s: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('=') {
        out.push_str(&rest[..pos]);
        let esc = rest.get(pos..pos + 3).ok_or(SaslError::Format)?;
        match esc {
            "=2C" | "=2c" => out.push(','),
            "=3D" | "=3d" => out.push('='),
            _ => return Err(SaslError::Format),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        BASE64_STANDARD.encode(s)
    }

    #[test]
    fn xoauth2_parses_microsoft_example() {
        let line = "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==";
        let c = parse_response(Mechanism::Xoauth2, line).unwrap();
        assert_eq!(c.user.as_deref(), Some("test@contoso.onmicrosoft.com"));
        assert_eq!(c.token, "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA");
    }

    #[test]
    fn xoauth2_rejects_malformed() {
        for bad in [
            "not base64!",
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=",
            &b64("user=a\x01auth=Bearer t"),
            &b64("user=a\x01auth=Basic t\x01\x01"),
            &b64("user=\x01auth=Bearer t\x01\x01"),
            &b64("auth=Bearer t\x01\x01"),
            &b64("user=a\x01auth=Bearer \x01\x01"),
            &b64("\x01\x01"),
            "",
        ] {
            assert!(parse_response(Mechanism::Xoauth2, bad).is_err(), "{bad:?}");
        }
        let bytes = BASE64_STANDARD.encode([0xff, 0xfe, 1, 1]);
        assert_eq!(
            parse_response(Mechanism::Xoauth2, &bytes),
            Err(SaslError::Format)
        );
    }

    #[test]
    fn oauthbearer_parses_rfc7628_example() {
        let line = b64(
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01",
        );
        let c = parse_response(Mechanism::OauthBearer, &line).unwrap();
        assert_eq!(c.user.as_deref(), Some("user@example.com"));
        assert_eq!(c.token, "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==");
    }

    #[test]
    fn oauthbearer_without_user_and_with_escapes() {
        let c = parse_response(
            Mechanism::OauthBearer,
            &b64("n,,\x01auth=Bearer tok\x01\x01"),
        )
        .unwrap();
        assert_eq!(c.user, None);
        let c = parse_response(
            Mechanism::OauthBearer,
            &b64("n,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01"),
        )
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("a,b=c"));
    }

    #[test]
    fn oauthbearer_rejects_malformed() {
        for bad in [
            b64("y,,\x01auth=Bearer t\x01\x01"),
            b64("n,a=u,\x01host=h\x01\x01"),
            b64("n,a=u=ZZ,\x01auth=Bearer t\x01\x01"),
            b64("n,a=u=2,\x01auth=Bearer t\x01\x01"),
            b64("n,a=u\x01auth=Bearer t\x01\x01"),
            b64("n,a=u,\x01auth=Bearer t\x01"),
            b64("n,a=u,\x01noequals\x01auth=Bearer t\x01\x01"),
            "AQ==".to_string(),
        ] {
            assert!(
                parse_response(Mechanism::OauthBearer, &bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn challenges_decode_to_json() {
        for mech in [Mechanism::Xoauth2, Mechanism::OauthBearer] {
            let raw = BASE64_STANDARD.decode(mech.error_challenge()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(v["scope"], "https://mail.google.com/");
        }
        assert!(Mechanism::Xoauth2.is_challenge_ack(""));
        assert!(!Mechanism::Xoauth2.is_challenge_ack("AQ=="));
        assert!(Mechanism::OauthBearer.is_challenge_ack("AQ=="));
        assert!(!Mechanism::OauthBearer.is_challenge_ack(""));
    }
}
