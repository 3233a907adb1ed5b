//! Classification: the one place where a failure becomes a contract [`Reason`].
//!
//! Matching is on reply codes and stable words, never on whole lines: real servers vary
//! the bracketed host names, case and line splitting (docs/field-replies.md). Where two reasons could apply, the
//! rules of docs/reasons.md decide (`probe.rs` and `token.rs` say which, in order); the replies
//! recorded from the field (`src/emulator/field_replies.txt`) are tested against them.

pub mod probe;
pub mod token;

use crate::reason::Reason;

/// A reason and the human detail behind it (server reply, challenge JSON, AADSTS code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub reason: Reason,
    pub detail: String,
}

impl Classified {
    pub fn ok() -> Self {
        Classified {
            reason: Reason::Ok,
            detail: String::new(),
        }
    }
}

/// Classifies a probe's outcome.
pub fn probe_outcome(outcome: &Result<(), crate::probe::ProbeError>) -> Classified {
    match outcome {
        Ok(()) => Classified::ok(),
        Err(e) => Classified {
            reason: probe::reason(e),
            detail: e.detail(),
        },
    }
}

/// Classifies a failed token request (the probe then reports it; no login is attempted).
pub fn token_failure(e: &crate::token::TokenError) -> Classified {
    Classified {
        reason: token::reason(e),
        detail: token::detail(e),
    }
}
