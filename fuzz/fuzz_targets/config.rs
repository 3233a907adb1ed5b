//! Fuzz target: the config loader on arbitrary text. It must never panic, and every error
//! must point inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_oauth_exporter::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(std::path::Path::new("fuzz.yaml"), text) {
        // YAML breaks lines at CR, LF, NEL, LS and PS: count them all, as an upper bound; an error
        // at the end of input is reported on the line after the last.
        let breaks = text
            .chars()
            .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
            .count();
        assert!(e.line <= breaks + 2, "{e}");
    }
});
