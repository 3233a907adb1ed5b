//! OAuth2 tokens: obtain, rotate, store and cache them for the probes.
//!
//! # Public API
//!
//! - [`Credential`] (with [`Provider`], [`Grant`], [`ClientAuth`], [`SecretSource`]) is what
//!   the config builds; [`default_scopes`] resolves scopes when the config names none;
//!   [`Provider::token_url`] / [`Provider::device_authorization_url`] derive endpoints.
//! - [`TokenService::new`]`(`[`TokenServiceOptions`]`)` and
//!   [`TokenService::access_token`]`(&cred) -> Result<`[`AccessToken`]`, `[`TokenError`]`>`:
//!   one cached access token per credential and scope set, renewed `renew_margin` (10 min)
//!   before expiry or at half-life for short-lived tokens; concurrent callers share one
//!   request; failed requests back off (exponential, jittered, at least `Retry-After`), and
//!   callers get the last error until the backoff ends (or the old token while it is valid).
//!   [`TokenService::access_token_within`] takes a [`TokenBudget`]: the probe's deadline
//!   bounds the wait and the request, and the backoff never exceeds half the mailbox's
//!   interval (a `Retry-After` still wins).
//!   [`TokenService::invalidate`] drops a token the mail server called expired.
//! - Metrics: [`TokenObserver`] is told about every token endpoint request (grant label
//!   [`GrantKind`]); [`TokenService::token_expiry`], [`TokenService::last_success`],
//!   [`TokenService::credential_expiries`] and [`TokenService::save_status`] feed the gauges
//!   and the status page. [`RecordingObserver`] is a test double.
//! - `login`: [`device_login`] (device authorization grant) and [`import_refresh_token`].
//! - Errors: [`TokenError`] keeps the HTTP status and Microsoft's `error`, `error_codes`,
//!   `error_description`, `trace_id`, `correlation_id`; `crate::classify::token` maps it to
//!   the contract's `token_*` reason and a detail string.
//!
//! # Invariants
//!
//! - **Only the token store sees refresh tokens.** They live in [`RefreshTokenStore`] (memory
//!   and `state_dir`); the refresh grant borrows the current one for a single request and
//!   hands the rotated one straight back to the store. No other module reads or holds them,
//!   and [`AccessToken`] never carries one.
//! - A rotated refresh token is written to a temp file the moment the reply is in, before
//!   the rest of the reply is parsed, then fsynced and renamed (mode 0600) before the access
//!   token that came with it is handed out; a crash leaves the old token whole and, from the
//!   write on, the new one in a temp file or in place, and the next start recovers it
//!   ([`RefreshTokenStore::candidates`]). If the save fails, the new token is used from
//!   memory and the failure is shown by [`SaveStatus`], [`TokenInfo::save_error`] and
//!   [`TokenObserver::save_failed`]. An older refresh token is sent only after the endpoint
//!   refused every newer one with `invalid_grant`; refreshes of one credential are serialised.
//! - Secrets (tokens, client secrets, assertions) are [`crate::Secret`]s: never in logs,
//!   `Debug` or error text.
//! - Time goes through `tokio::time` (renewal and backoff follow a paused test clock);
//!   expiry timestamps for metrics are wall-clock `SystemTime`.

pub mod assertion;
pub mod credential;
pub mod device;
pub mod error;
pub mod grant;
pub mod http;
pub mod observer;
pub mod reply;
pub mod service;
pub mod service_account;
pub mod store;
pub mod token_file;

pub use credential::{
    AccessToken, ClientAuth, Credential, Grant, GrantKind, Provider, SecretSource, default_scopes,
};
pub use device::{LoginError, device_login, import_refresh_token};
pub use error::{OAuthErrorBody, TokenError};
pub use observer::{NoopObserver, Observed, RecordingObserver, TokenInfo, TokenObserver};
pub use service::{
    CredentialExpiry, CredentialExpiryKind, TokenBudget, TokenService, TokenServiceOptions,
};
pub use store::{Candidate, Origin, RefreshTokenStore, SaveStatus, Staged, write_atomic};
