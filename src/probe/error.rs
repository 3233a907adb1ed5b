//! `ProbeError`: every way a login attempt can fail, typed, before any classification.
//!
//! Probes only describe what happened; `crate::classify` alone decides which contract
//! reason that is.
//!
//! Server text in here (`reply`, `challenge`, `detail`, `offered`) was redacted as it was
//! read (`crate::redact`), so an echoed token or SASL string is already `<redacted>`.

use super::Phase;
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },

    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },

    #[error("TCP connect to {addr} timed out")]
    ConnectTimeout { addr: String },

    /// `certificate` is true when the server's certificate was rejected (expired,
    /// untrusted, wrong name); false for any other handshake failure.
    #[error("TLS handshake failed: {message}")]
    Tls { certificate: bool, message: String },

    #[error("STARTTLS unavailable: {detail}")]
    StarttlsUnavailable { detail: String },

    #[error("the server does not offer {mechanism} (it offers: {offered})")]
    MechanismUnsupported {
        mechanism: &'static str,
        offered: String,
    },

    #[error("the server stopped answering during {phase}")]
    Timeout { phase: Phase },

    #[error("connection closed by the server during {phase}")]
    Closed { phase: Phase },

    #[error("connection error during {phase}: {message}")]
    Io { phase: Phase, message: String },

    #[error("a line longer than {limit} bytes during {phase}")]
    LineTooLong { phase: Phase, limit: usize },

    #[error("more than {limit} bytes received during {phase}")]
    TooMuchData { phase: Phase, limit: usize },

    /// A reply that does not belong to the protocol at this point.
    #[error("unexpected reply during {phase}: {reply}")]
    Unexpected { phase: Phase, reply: String },

    /// The server answered, and said no. `reply` is its full reply (multi-line replies
    /// joined by newlines); `challenge` the decoded JSON of a SASL error challenge.
    #[error("refused during {phase}: {reply}")]
    Refused {
        phase: Phase,
        reply: String,
        challenge: Option<String>,
    },
}

impl ProbeError {
    /// The text shown beside the reason: the server's own words where there are some.
    pub fn detail(&self) -> String {
        match self {
            ProbeError::Refused {
                reply,
                challenge: Some(c),
                ..
            } => format!("{reply} (challenge: {c})"),
            ProbeError::Refused { reply, .. } => reply.clone(),
            other => other.to_string(),
        }
    }

    /// The phase the error happened in.
    pub fn phase(&self) -> Phase {
        match self {
            ProbeError::Resolve { .. } => Phase::Resolve,
            ProbeError::Connect { .. } | ProbeError::ConnectTimeout { .. } => Phase::Connect,
            ProbeError::Tls { .. } | ProbeError::StarttlsUnavailable { .. } => Phase::Tls,
            ProbeError::MechanismUnsupported { .. } => Phase::Capability,
            ProbeError::Timeout { phase }
            | ProbeError::Closed { phase }
            | ProbeError::Io { phase, .. }
            | ProbeError::LineTooLong { phase, .. }
            | ProbeError::TooMuchData { phase, .. }
            | ProbeError::Unexpected { phase, .. }
            | ProbeError::Refused { phase, .. } => *phase,
        }
    }
}
