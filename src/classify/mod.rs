//! Classification: the one place where a failure becomes a contract
//! [`Reason`](crate::reason::Reason).
//!
//! Matching is on reply codes and stable words, never on whole lines: real servers vary
//! the bracketed host names, case and line splitting (docs/field-replies.md). Where two reasons could apply, the
//! rules of docs/reasons.md decide (`probe.rs` and `token.rs` say which, in order); the replies
//! recorded from the field (`src/emulator/field_replies.txt`) are tested against them.
//!
//! A probe's outcome is classified once, where it becomes a `status::ProbeResult`
//! (`ProbeResult::from_report`, `ProbeResult::from_token_error`); the token metrics, a
//! credential's last failure on the board and Graph's token errors use [`token::reason`]
//! directly.

pub mod probe;
pub mod token;
