//! Fuzz target: the config loader on arbitrary bytes. It must never panic, every error
//! must point inside the file, and a config it accepts must never panic the service's
//! start (`service::rehearse`: engine and scheduler built, every job run on a paused
//! clock, shut down).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_oauth_exporter::config::Config;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    // Bytes, not only text: invalid UTF-8 and byte order marks are inputs too.
    let dir = std::env::temp_dir().join(format!("config-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("fuzz.yaml");
    if std::fs::write(&file, data).is_ok() {
        let _ = Config::load(&file);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(std::path::Path::new("fuzz.yaml"), text) {
        Err(e) => {
            // YAML breaks lines at CR, LF, NEL, LS and PS: count them all, as an upper
            // bound; an error at the end of input is reported on the line after the last.
            let breaks = text
                .chars()
                .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
                .count();
            assert!(e.line <= breaks + 2, "{e}");
        }
        Ok(config) => {
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
            // Files the config names may be missing here: an error, never a panic.
            let _ = rt.block_on(mail_oauth_exporter::service::rehearse(
                &config,
                longest.saturating_mul(2).saturating_add(Duration::from_secs(1)),
            ));
        }
    }
});
