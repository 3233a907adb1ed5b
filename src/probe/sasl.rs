//! SASL client side of XOAUTH2 and OAUTHBEARER (RFC 7628): the initial response and the
//! answer to an error challenge, written once for all three protocols.

use crate::protocol::Mechanism;
use crate::secret::Secret;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The base64 initial client response for `mechanism`.
///
/// XOAUTH2 is `user=U ^A auth=Bearer T ^A ^A` (Google's and Microsoft's format);
/// OAUTHBEARER is the GS2 header `n,a=U,` then `^A`-separated key/value pairs (RFC 7628 §3.1).
/// `host` and `port` are sent with OAUTHBEARER, as the RFC recommends.
pub fn initial_response(
    mechanism: Mechanism,
    user: &str,
    token: &Secret,
    host: &str,
    port: u16,
) -> Secret {
    let raw = match mechanism {
        Mechanism::Xoauth2 => format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose()),
        Mechanism::Oauthbearer => format!(
            "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
            gs2_escape(user),
            token.expose()
        ),
    };
    Secret::new(STANDARD.encode(raw))
}

/// What the client answers to a server's error challenge before the server sends its final
/// failure: XOAUTH2 expects an empty response, OAUTHBEARER a single `%x01` (RFC 7628 §3.2.3),
/// which in base64 is `AQ==`.
pub fn error_challenge_answer(mechanism: Mechanism) -> &'static str {
    match mechanism {
        Mechanism::Xoauth2 => "",
        Mechanism::Oauthbearer => "AQ==",
    }
}

/// Decodes a server challenge (`+ <b64>` / `334 <b64>`): the JSON error detail when it is
/// one, else `None` (an empty `+` continuation is not an error challenge).
pub fn decode_challenge(b64: &str) -> Option<String> {
    let b64 = b64.trim();
    if b64.is_empty() {
        return None;
    }
    let bytes = STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    // Only JSON objects are error challenges; keep them compact and bounded as detail.
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    if !value.is_object() {
        return None;
    }
    let mut s = text.trim().to_string();
    if s.len() > 1024 {
        let mut cut = 1024;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    Some(s)
}

/// RFC 5801 saslname escaping: `,` and `=` cannot appear raw in the GS2 authzid.
fn gs2_escape(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_matches_microsofts_example_exactly() {
        // From Microsoft's article (seed): the line break there is only for readability.
        let expected = "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVy\
                        IEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==";
        let got = initial_response(
            Mechanism::Xoauth2,
            "test@contoso.onmicrosoft.com",
            &Secret::new("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"),
            "outlook.office365.com",
            993,
        );
        assert_eq!(got.expose(), expected);
    }

    #[test]
    fn xoauth2_matches_the_seed_transcripts() {
        let got = initial_response(
            Mechanism::Xoauth2,
            "someuser@example.com",
            &Secret::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
            "x",
            1,
        );
        assert_eq!(
            got.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_follows_rfc7628() {
        let got = initial_response(
            Mechanism::Oauthbearer,
            "a,b=c@example.com",
            &Secret::new("tok"),
            "imap.example.com",
            993,
        );
        let raw = String::from_utf8(STANDARD.decode(got.expose()).unwrap()).unwrap();
        assert_eq!(
            raw,
            "n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            STANDARD
                .decode(error_challenge_answer(Mechanism::Oauthbearer))
                .unwrap(),
            b"\x01"
        );
        assert_eq!(error_challenge_answer(Mechanism::Xoauth2), "");
    }

    #[test]
    fn challenge_decoding() {
        let gmail = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
        assert_eq!(
            decode_challenge(gmail).as_deref(),
            Some(r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#)
        );
        assert_eq!(decode_challenge(""), None);
        assert_eq!(decode_challenge("not base64!!"), None);
        assert_eq!(decode_challenge(&STANDARD.encode("[1,2]")), None);
    }
}
