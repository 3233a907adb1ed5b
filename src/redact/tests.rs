//! The redactor's rules, one input each: forms, windows, field names, nesting, short and
//! overlapping secrets.

use super::*;

const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlLmNvbSJ9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";

fn one(secret: &str) -> Redactor {
    Redactor::new().with(&Secret::new(secret))
}

/// Every window of `WINDOW` characters of `secret`.
fn windows(secret: &str) -> Vec<&str> {
    (0..=secret.len().saturating_sub(WINDOW))
        .map(|i| &secret[i..(i + WINDOW).min(secret.len())])
        .collect()
}

fn assert_no_window(text: &str, secret: &str) {
    for w in windows(secret) {
        assert!(!text.contains(w), "window {w:?} of the secret in {text:?}");
    }
}

#[test]
fn raw_token_is_blanked_in_a_reply() {
    let r = one(TOKEN);
    let got = r.redact(&format!("A01 NO token {TOKEN} is not valid"));
    assert_eq!(got, "A01 NO token <redacted> is not valid");
}

#[test]
fn url_encoded_forms_are_blanked() {
    let secret = "s3cr3t+/value with space~and=more";
    let r = one(secret);
    let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let pct = form.replace('+', "%20");
    for enc in [&form, &pct] {
        let got = r.redact(&format!("x={enc}&y=1"));
        assert_eq!(got, "x=<redacted>&y=1", "{enc}");
    }
}

#[test]
fn base64_forms_at_every_alignment_are_blanked() {
    let r = one(TOKEN);
    for prefix in [
        "",
        "a",
        "ab",
        "abc",
        "{\"error\":\"bad ",
        "user=x@y\u{1}auth=Bearer ",
    ] {
        let plain = format!("{prefix}{TOKEN} trailing");
        for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
            let enc = engine.encode(&plain);
            let got = r.redact(&format!("* BYE {enc}"));
            assert_no_window(&got, &enc[prefix.len() * 4 / 3 + 4..enc.len() - 8]);
            // Whatever was kept of the encoded text no longer decodes to the token.
            for run in got.split(|c: char| !is_base64_char(c as u8)) {
                if let Ok(raw) = engine.decode(run) {
                    assert_no_window(&String::from_utf8_lossy(&raw), TOKEN);
                }
            }
        }
    }
}

#[test]
fn the_sasl_response_is_blanked_whole_and_decoded() {
    let ir = STANDARD.encode(format!("user=a@b.c\x01auth=Bearer {TOKEN}\x01\x01"));
    let mut r = Redactor::new();
    r.add(&Secret::new(TOKEN));
    r.add_sasl(&Secret::new(ir.clone()));
    let echo =
        format!("A01 NO [AUTHENTICATIONFAILED] Invalid credentials for: AUTHENTICATE XOAUTH2 {ir}");
    assert_eq!(
        r.redact(&echo),
        "A01 NO [AUTHENTICATIONFAILED] Invalid credentials for: AUTHENTICATE XOAUTH2 <redacted>"
    );
    // Cut short by the server: what is left is still blanked.
    let cut = &ir[..ir.len() / 2];
    assert_no_window(&r.redact(&format!("* BYE {cut}")), &ir);
    let decoded = format!("user=a@b.c\x01auth=Bearer {TOKEN}\x01\x01");
    assert_no_window(&r.redact(&decoded), TOKEN);
}

#[test]
fn the_user_host_and_port_of_a_sasl_response_are_not_secrets() {
    let token = "ya29.a0AfB_byC-very-long-access-token-value";
    let raw = format!(
        "n,a=helpdesk@contoso.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer {token}\x01\x01"
    );
    let mut r = Redactor::new().with(&Secret::new(token));
    r.add_sasl(&Secret::new(STANDARD.encode(&raw)));
    let greeting = "* OK imap.example.com ready for helpdesk@contoso.com";
    assert_eq!(r.redact(greeting), greeting);
    assert_eq!(r.redact(&format!("echo {raw}")), "echo <redacted>");
}

#[test]
fn a_json_challenge_echoing_the_token_still_decodes_redacted() {
    let json =
        format!(r#"{{"status":"401","schemes":"Bearer","error":"token {TOKEN} is not valid"}}"#);
    let challenge = STANDARD.encode(&json);
    let got = one(TOKEN).redact(&format!("+ {challenge}"));
    let b64 = got.strip_prefix("+ ").unwrap();
    let decoded = String::from_utf8(STANDARD.decode(b64).unwrap()).unwrap();
    assert_eq!(
        decoded,
        r#"{"status":"401","schemes":"Bearer","error":"token <redacted> is not valid"}"#
    );
}

#[test]
fn unknown_values_of_sensitive_json_fields_are_blanked_also_in_base64() {
    let json =
        r#"{"status":"401","access_token":"abc.def-ghi","scope":"https://mail.google.com/"}"#;
    let r = Redactor::new();
    assert_eq!(
        r.redact(json),
        r#"{"status":"401","access_token":"<redacted>","scope":"https://mail.google.com/"}"#
    );
    let got = r.redact(&format!("334 {}", STANDARD.encode(json)));
    let decoded = STANDARD.decode(got.strip_prefix("334 ").unwrap()).unwrap();
    assert!(
        String::from_utf8(decoded)
            .unwrap()
            .contains(r#""access_token":"<redacted>""#)
    );
}

#[test]
fn field_names_are_blanked_in_json_form_and_broken_bodies() {
    let r = Redactor::new();
    let cases = [
        (
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJhbGciOi"#,
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"<redacted>"#,
        ),
        (
            "client_id=app&client_secret=p%40ss&refresh_token=0.AAA&scope=x",
            "client_id=app&client_secret=<redacted>&refresh_token=<redacted>&scope=x",
        ),
        (
            r#"{"error":"invalid_request","error_description":"client_secret=abc&refresh_token=xyz"}"#,
            r#"{"error":"invalid_request","error_description":"client_secret=<redacted>&refresh_token=<redacted>"}"#,
        ),
        (
            r#"{"error_description":"{\"id_token\":\"a b\",\"x\":1}"}"#,
            r#"{"error_description":"{\"id_token\":\"<redacted>\",\"x\":1}"}"#,
        ),
        (
            r#"{"Password" : "with \"quotes\" inside", "ClientAssertion": 12}"#,
            r#"{"Password" : "<redacted>", "ClientAssertion": <redacted>}"#,
        ),
        (
            "password: hunter22 then more",
            "password: <redacted> then more",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(r.redact(input), want, "{input}");
    }
    // Words that only mention a token are left alone.
    let text = "AADSTS70008: The provided authorization code or refresh token has expired";
    assert_eq!(r.redact(text), text);
    assert_eq!(
        r.redact("* BYE Session invalidated - AccessTokenExpired"),
        "* BYE Session invalidated - AccessTokenExpired"
    );
}

#[test]
fn overlapping_and_adjacent_secrets_leave_nothing() {
    let a = "AAAAbbbbCCCCddddEEEEffff";
    let b = "ddddEEEEffffGGGGhhhhIIII"; // overlaps the end of `a`
    let c = "zzzzyyyyxxxxwwwwvvvv";
    let r = Redactor::new()
        .with(&Secret::new(a))
        .with(&Secret::new(b))
        .with(&Secret::new(c));
    let text = format!("[AAAAbbbbCCCCddddEEEEffffGGGGhhhhIIII{c}{a}]");
    let got = r.redact(&text);
    assert_eq!(got, "[<redacted>]");
    // A secret inside another (the token inside the decoded SASL string).
    let r = Redactor::new()
        .with(&Secret::new(TOKEN))
        .with(&Secret::new(format!("auth=Bearer {TOKEN}")));
    assert_eq!(
        r.redact(&format!("x auth=Bearer {TOKEN} y")),
        "x <redacted> y"
    );
}

#[test]
fn short_secrets_are_blanked_whole_only() {
    let r = one("pa55w0rd");
    assert_eq!(r.redact("got pa55w0rd and pa55"), "got <redacted> and pa55");
    let b64 = STANDARD.encode("pa55w0rd");
    assert_eq!(r.redact(&format!("b64 {b64}.")), "b64 <redacted>.");
    // Too short to be searched without blanking ordinary words.
    let r = one("abc");
    assert!(!r.has_secrets());
    assert_eq!(r.redact("abc abc"), "abc abc");
}

#[test]
fn any_window_of_a_long_secret_is_blanked_but_shorter_pieces_are_not() {
    let r = one(TOKEN);
    for start in [0, 1, 7, 40, TOKEN.len() - WINDOW] {
        let piece = &TOKEN[start..start + WINDOW];
        assert_eq!(r.redact(&format!("<{piece}>")), "<<redacted>>", "{start}");
    }
    let short = &TOKEN[3..3 + WINDOW - 1];
    assert_eq!(r.redact(short), short);
}

#[test]
fn form_secrets_of_a_token_request_are_learned() {
    let body = b"grant_type=refresh_token&client_id=app&client_secret=Zx8Q~verysecret.value&refresh_token=0.AAAA-refresh-token-value&device_code=GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhcHAifQ.c2lnbmF0dXJl";
    let mut r = Redactor::new();
    r.add_form_secrets(body);
    // `grant_type`'s value is no secret.
    let echo = "invalid: Zx8Q~verysecret.value / 0.AAAA-refresh-token-value / GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS / refresh_token / eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhcHAifQ.c2lnbmF0dXJl";
    assert_eq!(
        r.redact(echo),
        "invalid: <redacted> / <redacted> / <redacted> / refresh_token / <redacted>"
    );
    // The assertion type is a public URN, not a secret, though its name says assertion.
    let urn = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    assert_eq!(r.redact(urn), urn);
}

#[test]
fn multibyte_text_around_and_inside_secrets() {
    let secret = "clé-secrète-très-longue-éé";
    let r = one(secret);
    let got = r.redact(&format!("«{secret}» ok"));
    assert_eq!(got, "«<redacted>» ok");
    let got = r.redact(&format!("x{}y", &secret[1..]));
    assert!(!got.contains("secrète-très"), "{got}");
}

#[test]
fn debug_shows_no_secret() {
    let r = one(TOKEN);
    let d = format!("{r:?}");
    assert!(!d.contains("eyJ"), "{d}");
}

#[test]
fn a_new_encoding_that_spells_a_secret_is_blanked_too() {
    // A secret of base64 characters, and a server's base64 text whose redaction encodes
    // to it again: 12 zero bytes are `AAAAAAAAAAAAAAAA`.
    let secret = "AAAAAAAAAAAAAAAA";
    let r = one(secret);
    let blob = STANDARD.encode(b"\0\0\0\0\0\0\0\0\0\0\0\0{\"token\":\"x1\"}");
    let got = r.redact(&format!("+ {blob}"));
    assert!(!got.contains(secret), "{got}");
}
