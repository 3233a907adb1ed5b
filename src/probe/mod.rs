//! Probes: one real SASL login over IMAP, POP3 or SMTP, every phase timed, the dialogue
//! kept as a redacted transcript. One module per protocol, all of the same shape
//! (`dialogue(&mut Session)`); connection, TLS, SASL and line reading are shared.
//!
//! Probes never classify and never touch metrics: they return a [`ProbeReport`] whose
//! outcome is a typed [`ProbeError`]; `crate::classify` turns that into a reason.

mod error;
pub mod imap;
mod negotiate;
pub mod pop3;
pub mod sasl;
mod session;
pub mod smtp;
pub mod tls;
pub mod transcript;

pub use error::ProbeError;
pub use tls::TlsClient;
pub use transcript::Transcript;

use crate::protocol::{Mechanism, Protocol, TlsMode};
use crate::secret::Secret;
use serde::Serialize;
use session::Session;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// The timed steps of a probe, in the contract's `phase` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Resolve,
    Connect,
    Tls,
    Greeting,
    Capability,
    Auth,
    PostAuth,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Resolve,
        Phase::Connect,
        Phase::Tls,
        Phase::Greeting,
        Phase::Capability,
        Phase::Auth,
        Phase::PostAuth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Resolve => "resolve",
            Phase::Connect => "connect",
            Phase::Tls => "tls",
            Phase::Greeting => "greeting",
            Phase::Capability => "capability",
            Phase::Auth => "auth",
            Phase::PostAuth => "post_auth",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Time spent in each phase; `None` for a phase the probe never reached.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases([Option<Duration>; 7]);

impl Phases {
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.0[phase as usize]
    }

    /// Adds to a phase (capability is asked twice around STARTTLS: both count).
    pub(crate) fn add(&mut self, phase: Phase, d: Duration) {
        let slot = &mut self.0[phase as usize];
        *slot = Some(slot.unwrap_or_default() + d);
    }

    pub fn iter(&self) -> impl Iterator<Item = (Phase, Option<Duration>)> + '_ {
        Phase::ALL.iter().map(|p| (*p, self.get(*p)))
    }
}

impl Serialize for Phases {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (p, d) in self.iter() {
            if let Some(d) = d {
                m.serialize_entry(p.as_str(), &d.as_secs_f64())?;
            }
        }
        m.end()
    }
}

/// Where to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Connect from this local address (a monitor host with several, or tests that must
    /// not look local to the server).
    pub source_address: Option<IpAddr>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:{} ({} TLS)",
            self.protocol,
            self.host,
            self.port,
            self.tls.as_str()
        )
    }
}

/// Caps on what a server may send, so a hostile one cannot bloat the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_line: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Capability and EXAMINE lines are short; 64 KiB leaves room for odd servers.
        Limits {
            max_line: 64 * 1024,
            max_bytes: 1024 * 1024,
        }
    }
}

/// Everything one probe needs except the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub target: Target,
    /// The SASL user: the mailbox address.
    pub user: String,
    pub mechanism: Mechanism,
    /// One deadline for the whole probe, resolve to logout.
    pub timeout: Duration,
    pub limits: Limits,
}

/// What one probe found. The outcome is classified elsewhere.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub outcome: Result<(), ProbeError>,
    pub phases: Phases,
    /// From connect start to the server's reply to the auth step (the contract's
    /// `mail_oauth_probe_duration_seconds`); `None` when the auth step was not reached.
    pub duration: Option<Duration>,
    /// Wall time of the whole probe, logout included.
    pub total: Duration,
    pub transcript: Transcript,
    /// Earliest notAfter (unix seconds) of the chain the server presented.
    pub tls_not_after: Option<i64>,
    pub tls_version: Option<String>,
}

/// Runs one probe: connect, (STARTTLS,) authenticate with `token`, post-auth check, logout.
pub async fn run(spec: &ProbeSpec, tls: &TlsClient, token: &Secret) -> ProbeReport {
    let mut s = Session::new(spec, tls, token);
    let mut auth_done = None;
    let outcome = async {
        s.connect().await?;
        match spec.target.protocol {
            Protocol::Imap => imap::dialogue(&mut s, token, &mut auth_done).await,
            Protocol::Pop3 => pop3::dialogue(&mut s, token, &mut auth_done).await,
            Protocol::Smtp => smtp::dialogue(&mut s, token, &mut auth_done).await,
        }
    }
    .await;
    s.end_phase();
    if let Err(e) = &outcome {
        s.note(&format!("probe failed: {e}"));
    }
    s.close().await;
    let duration = match (s.connect_started, auth_done) {
        (Some(start), Some(end)) => Some(end - start),
        _ => None,
    };
    ProbeReport {
        outcome,
        phases: s.phases,
        duration,
        total: s.elapsed(),
        transcript: std::mem::take(&mut s.transcript),
        tls_not_after: s.tls_not_after,
        tls_version: s.tls_version.take(),
    }
}

/// Refuses to go on unless the connection is encrypted: a token never travels in clear,
/// whatever the server offers before STARTTLS.
pub(crate) fn require_tls(s: &Session<'_>) -> Result<(), ProbeError> {
    if s.is_tls() {
        Ok(())
    } else {
        Err(ProbeError::StarttlsUnavailable {
            detail: "refusing to send a token over an unencrypted connection".into(),
        })
    }
}
