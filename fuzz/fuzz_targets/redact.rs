//! Fuzz target: the redactor (`mail_oauth_exporter::redact`), fed a secret and a text a
//! hostile server could send. It must never panic, keep its output bounded, and leave no
//! 16 consecutive characters of a token-like secret in what it returns.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_oauth_exporter::redact::{Redactor, WINDOW};
use mail_oauth_exporter::secret::Secret;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let secret = String::from_utf8_lossy(&rest[..n]).into_owned();
    let text = String::from_utf8_lossy(&rest[n..]).into_owned();
    let mut r = Redactor::new();
    r.add(&Secret::new(secret.clone()));
    r.add_sasl(&Secret::new(secret.clone()));
    let out = r.redact(&text);
    assert!(out.len() <= 4 * text.len() + 64);
    let token_like = secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._~+/=-".contains(&b));
    if token_like && secret.len() >= WINDOW {
        for w in secret.as_bytes().windows(WINDOW) {
            let w = std::str::from_utf8(w).expect("ASCII");
            assert!(!out.contains(w), "a window of the secret survived");
        }
    }
});
