//! Fuzz target: the SASL error-challenge decoder (`+ <base64>` / `334 <base64>`), fed
//! whatever a hostile server could send. It must never panic and keep its output bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_oauth_exporter::probe::sasl::decode_challenge;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(json) = decode_challenge(&text) {
        assert!(json.len() <= 1028);
    }
});
