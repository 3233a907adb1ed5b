//! Fuzz target: the classifier on arbitrary server replies at every phase. It must never
//! panic, and a refusal never classifies as `ok`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_oauth_exporter::Reason;
use mail_oauth_exporter::classify;
use mail_oauth_exporter::probe::{Phase, ProbeError};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let phase = Phase::ALL[usize::from(first) % Phase::ALL.len()];
    let reply = String::from_utf8_lossy(rest).into_owned();
    for e in [
        ProbeError::Refused {
            phase,
            reply: reply.clone(),
            challenge: None,
        },
        ProbeError::Unexpected { phase, reply },
    ] {
        assert_ne!(classify::probe::reason(&e), Reason::Ok);
    }
});
