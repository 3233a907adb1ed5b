//! Property tests (proptest) of what parses hostile input: the reply classifier, the token
//! error classifier, the SASL error-challenge decoder and the config loader. None may
//! panic on any input, and each keeps its promises (a failure never classifies as `ok`,
//! HTTP 429 is always `token_throttled`, errors are located inside the file), and a config
//! the loader accepts never panics the service's start: every accepted config is
//! rehearsed (`service::rehearse`: engine and scheduler built, every job run on a paused
//! clock, shut down).

use base64::Engine as _;
use mail_oauth_exporter::classify;
use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::probe::sasl::decode_challenge;
use mail_oauth_exporter::probe::{Phase, ProbeError};
use mail_oauth_exporter::service::rehearse;
use mail_oauth_exporter::token::{OAuthErrorBody, TokenError};
use mail_oauth_exporter::{Reason, Stage};
use proptest::prelude::*;
use std::path::Path;
use std::time::Duration;

fn phase() -> impl Strategy<Value = Phase> {
    proptest::sample::select(Phase::ALL.to_vec())
}

/// Server replies: mostly reply-shaped (tags, codes, known words), sometimes anything.
fn reply() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        (
            proptest::sample::select(vec![
                "A01 NO", "A01 BAD", "* BYE", "-ERR", "+OK", "535", "454", "421", "432", "501",
                "334", "+", "* OK", "250",
            ]),
            proptest::sample::select(vec![
                " 5.7.139 SmtpClientAuthentication is disabled",
                " 4.3.2 Concurrent connections limit exceeded",
                " AUTHENTICATE failed.",
                " [UNAVAILABLE] Temporary authentication failure.",
                " AccessTokenExpired",
                " 5.5.127",
                " User is authenticated but not connected.",
                "",
            ]),
            "[ -~]{0,40}",
        )
            .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn a_refused_reply_never_classifies_as_ok(
        phase in phase(),
        reply in reply(),
        challenge in proptest::option::of(any::<String>()),
    ) {
        let e = ProbeError::Refused { phase, reply, challenge };
        let r = classify::probe::reason(&e);
        prop_assert_ne!(r, Reason::Ok);
        prop_assert!(r.stage() != Stage::Token, "{:?} -> {}", e, r);
    }

    #[test]
    fn any_probe_error_has_a_reason(
        phase in phase(),
        reply in reply(),
        kind in 0usize..6,
    ) {
        let e = match kind {
            0 => ProbeError::Unexpected { phase, reply },
            1 => ProbeError::Closed { phase },
            2 => ProbeError::Timeout { phase },
            3 => ProbeError::Io { phase, message: reply },
            4 => ProbeError::StarttlsUnavailable { detail: reply },
            _ => ProbeError::Tls { certificate: false, message: reply },
        };
        let r = classify::probe::reason(&e);
        prop_assert_ne!(r, Reason::Ok);
        prop_assert!(Reason::ALL.contains(&r));
    }

    #[test]
    fn token_errors_classify_as_token_reasons_and_429_is_throttled(
        status in 100u16..600,
        error in prop_oneof![
            any::<String>(),
            proptest::sample::select(vec![
                "invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                "temporarily_unavailable", "server_error", "interaction_required",
            ]).prop_map(String::from),
        ],
        codes in proptest::collection::vec(any::<u64>(), 0..3),
        description in proptest::option::of(any::<String>()),
    ) {
        let body: OAuthErrorBody = serde_json::from_value(serde_json::json!({
            "error": error,
            "error_codes": codes,
            "error_description": description,
        })).unwrap();
        let e = TokenError::Endpoint { status, body: Box::new(body), retry_after: None };
        let r = classify::token::reason(&e);
        prop_assert_eq!(r.stage(), Stage::Token);
        if status == 429 {
            prop_assert_eq!(r, Reason::TokenThrottled);
        }
        let http = TokenError::Http { status, excerpt: "x".into(), retry_after: None };
        prop_assert_eq!(classify::token::reason(&http).stage(), Stage::Token);
    }

    #[test]
    fn challenge_decoder_takes_any_input_and_roundtrips_json_objects(
        junk in any::<String>(),
        key in "[a-z]{1,10}",
        value in any::<String>(),
    ) {
        let _ = decode_challenge(&junk);
        let json = serde_json::json!({ key: value }).to_string();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&json);
        let decoded = decode_challenge(&b64);
        prop_assert!(decoded.is_some());
        let decoded = decoded.unwrap();
        prop_assert!(decoded.len() <= 1024 + 4, "unbounded detail");
        if json.len() <= 1024 {
            prop_assert_eq!(decoded, json);
        }
    }

    #[test]
    fn config_loader_never_panics_and_locates_errors_inside_the_file(text in any::<String>()) {
        check_config(&text)?;
    }

    /// Mutations of a real example: closer to what a person mistypes than random text.
    #[test]
    fn config_loader_handles_mutated_examples(
        cut in any::<proptest::sample::Index>(),
        len in 0usize..12,
        insert in "[ -~\n\t:{}\\[\\]-]{0,6}",
    ) {
        let example = include_str!("../../config/microsoft-client-credentials.yaml");
        let at = cut.index(example.len());
        let at = (0..=at).rev().find(|i| example.is_char_boundary(*i)).unwrap_or(0);
        let end = (at + len).min(example.len());
        let end = (end..=example.len()).find(|i| example.is_char_boundary(*i)).unwrap();
        let text = format!("{}{}{}", &example[..at], insert, &example[end..]);
        check_config(&text)?;
    }
}

/// Durations as people and attackers write them: small, huge (`18446744073709551615s`),
/// zero, every unit.
fn duration_text() -> impl Strategy<Value = String> {
    let unit = proptest::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "y"]);
    prop_oneof![
        (0u64..200, unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
        (any::<u64>(), unit).prop_map(|(n, u)| format!("{n}{u}")),
        Just("0".to_string()),
    ]
}

/// A well-formed config whose every number is drawn from the whole range its type holds.
fn numeric_config() -> impl Strategy<Value = String> {
    (
        proptest::option::of(prop_oneof![any::<u64>(), 0u64..100]),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        proptest::option::of(duration_text()),
        any::<u16>(),
    )
        .prop_map(|(max, spread, jitter, grace, d_int, d_to, m_int, m_to, port)| {
            let opt = |k: &str, v: &Option<String>| {
                v.as_ref().map_or(String::new(), |v| format!("  {k}: {v}\n"))
            };
            let mb = |k: &str, v: &Option<String>| {
                v.as_ref().map_or(String::new(), |v| format!("    {k}: {v}\n"))
            };
            format!(
                "scheduler:\n{}{}{}{}defaults:\n{}{}  mechanism: xoauth2\n\
                 credentials:\n  t:\n    grant: token_file\n    token_file: /nonexistent/t\n\
                 mailboxes:\n  a:\n    address: a@example.com\n    credential: t\n    protocols: [imap, smtp]\n{}{}\
                 \x20   imap: {{ host: 127.0.0.1, port: {port} }}\n\
                 \x20 b:\n    address: b@example.com\n    credential: t\n    protocols: [pop3]\n    pop3: {{ host: localhost }}\n",
                max.map_or(String::new(), |m| format!("  max_concurrent_probes: {m}\n")),
                opt("startup_spread", &spread),
                opt("jitter", &jitter),
                opt("shutdown_grace", &grace),
                opt("interval", &d_int),
                opt("timeout", &d_to),
                mb("interval", &m_int),
                mb("timeout", &m_to),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Issue 16: `max_concurrent_probes: 18446744073709551615` and durations like
    /// `18446744073709551615s` passed the loader and panicked the start. Whatever the
    /// numbers, the loader refuses them or the service starts, runs and stops.
    #[test]
    fn no_number_the_loader_accepts_panics_the_start(text in numeric_config()) {
        check_config(&text)?;
    }
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    let path = Path::new("fuzz.yaml");
    if let Ok(config) = Config::parse(path, text) {
        // Long enough on the paused clock for every job to run, reschedule and run again.
        let longest = config
            .mailboxes
            .values()
            .map(|m| m.interval)
            .max()
            .unwrap_or_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        // A CA file the example names but this machine lacks is an error, not a panic.
        let _ = rt.block_on(rehearse(
            &config,
            longest
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1)),
        ));
    }
    if let Err(e) = Config::parse(path, text) {
        // YAML breaks lines at CR, LF, NEL, LS and PS (found by cargo fuzz): count them all; an
        // error at the end of input is reported on the line after the last.
        let lines = text
            .chars()
            .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
            .count()
            + 2;
        prop_assert!(e.line <= lines, "line {} of {}: {}", e.line, lines, e);
        prop_assert!(e.to_string().starts_with("fuzz.yaml:"), "{}", e);
        prop_assert!(!e.message.is_empty());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The redactor: random secrets in random text, in any form, never survive.

use mail_oauth_exporter::redact::Redactor;
use mail_oauth_exporter::secret::Secret;

/// How a secret is embedded in a server's or endpoint's text.
#[derive(Debug, Clone, Copy)]
enum Embedding {
    Raw,
    UrlEncoded,
    PercentEncoded,
    /// Inside base64 text, after `pad` bytes of other text (any alignment).
    Base64,
    Base64Url,
    /// A prefix of the secret (a server that cuts what it echoes).
    Cut,
    /// Unknown to the redactor: the value of a JSON `*token*` field.
    JsonField,
    /// Unknown to the redactor: the value of a form `*secret*` field.
    SecretFormField,
    /// Unknown to the redactor: a JSON `*token*` field inside a base64 error challenge.
    Base64JsonField,
}

const WINDOW: usize = 16;

fn windows(s: &str) -> impl Iterator<Item = &str> {
    (0..=s.len().saturating_sub(WINDOW)).map(move |i| &s[i..i + WINDOW])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn redacted_text_holds_no_window_of_a_secret_in_any_form(
        secret in "[A-Za-z0-9._~+/=-]{16,120}",
        before in "\\PC{0,60}",
        after in "\\PC{0,60}",
        pad in "[ -~]{0,5}",
        tail in "[ -~]{0,5}",
        cut in 0usize..100,
        embedding in proptest::sample::select(vec![
            Embedding::Raw, Embedding::UrlEncoded, Embedding::PercentEncoded, Embedding::Base64,
            Embedding::Base64Url, Embedding::Cut, Embedding::JsonField, Embedding::SecretFormField,
            Embedding::Base64JsonField,
        ]),
    ) {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let url: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let known = !matches!(embedding, Embedding::JsonField | Embedding::SecretFormField | Embedding::Base64JsonField);
        // For base64: the encoded text, and its characters that depend on the secret alone.
        let encode = |engine: &base64::engine::GeneralPurpose| {
            let enc = engine.encode(format!("{pad}{secret}{tail}"));
            let start = (8 * pad.len()).div_ceil(6);
            let end = 8 * (pad.len() + secret.len()) / 6;
            let core = enc[start..end].to_string();
            (enc, core)
        };
        let (embedded, core) = match embedding {
            Embedding::Raw => (secret.clone(), None),
            Embedding::UrlEncoded => (url.clone(), None),
            Embedding::PercentEncoded => (url.replace('+', "%20"), None),
            Embedding::Base64 => { let (e, c) = encode(&STANDARD); (e, Some(c)) }
            Embedding::Base64Url => { let (e, c) = encode(&URL_SAFE_NO_PAD); (e, Some(c)) }
            Embedding::Cut => (secret[..(WINDOW + cut).min(secret.len())].to_string(), None),
            Embedding::JsonField => (format!(r#"{{"refresh_token":"{secret}"}}"#), None),
            Embedding::SecretFormField => (format!("client_secret={url}&scope=x"), None),
            Embedding::Base64JsonField => {
                let json = format!(r#"{{"status":"401","access_token":"{secret}"}}"#);
                (STANDARD.encode(json), None)
            }
        };
        let text = format!("{before} {embedded} {after}");
        let mut r = Redactor::new();
        if known {
            r.add(&Secret::new(secret.clone()));
        }
        let out = r.redact(&text);
        for w in windows(&secret).chain(windows(&url)) {
            prop_assert!(!out.contains(w), "{:?} kept {:?}: {}", embedding, w, out);
        }
        if let Some(core) = core {
            for w in windows(&core) {
                prop_assert!(!out.contains(w), "{:?} kept encoded {:?}: {}", embedding, w, out);
            }
        }
        if matches!(embedding, Embedding::Base64JsonField) {
            // Still an error challenge: it decodes, with the value blanked.
            let b64 = out.split(' ').find(|w| STANDARD.decode(w).is_ok() && w.len() > 20);
            let decoded = b64.map(|b| String::from_utf8(STANDARD.decode(b).unwrap()).unwrap());
            prop_assert!(
                decoded.as_deref().is_some_and(|d| d.contains(r#""access_token":"<redacted>""#)),
                "{}", out
            );
        }
    }

    #[test]
    fn the_redactor_takes_any_text_and_any_secrets(
        secrets in proptest::collection::vec(any::<String>(), 0..4),
        text in any::<String>(),
    ) {
        let mut r = Redactor::new();
        for s in &secrets {
            r.add(&Secret::new(s.clone()));
            r.add_sasl(&Secret::new(s.clone()));
        }
        let out = r.redact(&text);
        // Blanking can lengthen short values, never without bound.
        prop_assert!(out.len() <= 4 * text.len() + 64, "{} → {}", text.len(), out.len());
        for s in secrets.iter().filter(|s| s.len() >= WINDOW && !s.contains('<')) {
            prop_assert!(!out.contains(s.as_str()));
        }
    }
}
