//! The metrics hook: the token service reports every token endpoint request here.
//!
//! The lead's metrics module implements [`TokenObserver`]; [`RecordingObserver`] is the test
//! double that keeps what it was told.

use super::credential::GrantKind;
use super::error::TokenError;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// What a successful token request produced (no token in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub obtained_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    /// A new refresh token came back (and went to the store).
    pub refresh_token_rotated: bool,
    /// Set when the new refresh token could not be written to disk (kept in memory).
    pub save_error: Option<String>,
}

/// Told about each request made to a token endpoint. Requests that never reach the network
/// (no refresh token stored, unreadable secret file, cached token, backoff) are not reported.
pub trait TokenObserver: Send + Sync {
    fn request(
        &self,
        credential: &str,
        grant: GrantKind,
        duration: Duration,
        result: Result<&TokenInfo, &TokenError>,
    );

    /// A refresh token received from the endpoint could not be written under `state_dir`
    /// (it is kept in memory and used next; a restart would lose it). `error` names the
    /// file and the OS error, never the token.
    fn save_failed(&self, credential: &str, error: &str) {
        let _ = (credential, error);
    }
}

/// Does nothing: the default.
#[derive(Debug, Default)]
pub struct NoopObserver;

impl TokenObserver for NoopObserver {
    fn request(&self, _: &str, _: GrantKind, _: Duration, _: Result<&TokenInfo, &TokenError>) {}
}

/// One observed request.
#[derive(Debug, Clone)]
pub struct Observed {
    pub credential: String,
    pub grant: GrantKind,
    pub duration: Duration,
    /// `None` on success, else the failure as reported (unclassified: a test that wants
    /// the reason asks `crate::classify::token::reason`).
    pub error: Option<TokenError>,
    pub info: Option<TokenInfo>,
}

/// Keeps every report, for tests.
#[derive(Debug, Default)]
pub struct RecordingObserver {
    seen: Mutex<Vec<Observed>>,
}

impl RecordingObserver {
    pub fn seen(&self) -> Vec<Observed> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self, credential: &str, grant: GrantKind) -> usize {
        self.seen()
            .iter()
            .filter(|o| o.credential == credential && o.grant == grant)
            .count()
    }
}

impl TokenObserver for RecordingObserver {
    fn request(
        &self,
        credential: &str,
        grant: GrantKind,
        duration: Duration,
        result: Result<&TokenInfo, &TokenError>,
    ) {
        let observed = Observed {
            credential: credential.to_string(),
            grant,
            duration,
            error: result.err().cloned(),
            info: result.ok().cloned(),
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(observed);
    }
}
