//! The token service: one cached access token per credential and scope set, renewed ahead
//! of expiry, fetched once for all concurrent callers, backed off after failures.

use super::assertion::certificate_not_after;
use super::credential::{ClientAuth, Credential, Grant, GrantKind};
use super::error::TokenError;
use super::grant::{self, Granted};
use super::http::{HttpClient, HttpClientError};
use super::observer::{NoopObserver, TokenInfo, TokenObserver};
use super::store::{RefreshTokenStore, SaveStatus};
use super::token_file::read_token_file_async;
use crate::secret::Secret;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// An access token ready to put in a SASL string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub value: Secret,
    /// `None` when the issuer did not say (an opaque token file).
    pub expires_at: Option<SystemTime>,
}

/// How the token service is set up.
#[derive(Clone)]
pub struct TokenServiceOptions {
    /// Where rotated refresh tokens are kept (the config's `state_dir`).
    pub state_dir: PathBuf,
    /// Extra trust roots (the config's `tls.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// Renew this long before expiry; tokens living shorter are renewed at half-life.
    pub renew_margin: Duration,
    /// Per token request, connect to last byte.
    pub request_timeout: Duration,
    /// First backoff after a failed request; doubles per failure, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub observer: Arc<dyn TokenObserver>,
}

impl TokenServiceOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> TokenServiceOptions {
        TokenServiceOptions {
            state_dir: state_dir.into(),
            ca_file: None,
            renew_margin: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            observer: Arc::new(NoopObserver),
        }
    }
}

/// Tokens obtained with an unknown lifetime are renewed after this.
const UNKNOWN_LIFETIME_RENEW: Duration = Duration::from_secs(300);

/// Which declared expiry `mail_oauth_credential_expiry_timestamp_seconds` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialExpiryKind {
    ClientSecret,
    Certificate,
}

impl CredentialExpiryKind {
    /// The contract's `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialExpiryKind::ClientSecret => "client_secret",
            CredentialExpiryKind::Certificate => "certificate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialExpiry {
    pub kind: CredentialExpiryKind,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
struct Cached {
    token: AccessToken,
    renew_at: Instant,
    expires: Option<Instant>,
}

impl Cached {
    fn usable(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

#[derive(Debug, Default)]
struct EntryState {
    token: Option<Cached>,
    last_error: Option<TokenError>,
    retry_at: Option<Instant>,
    failures: u32,
}

/// The async mutex is the single flight: whoever holds it fetches, the others queue behind
/// it and then find the fresh token (or the error and its backoff).
#[derive(Debug, Default)]
struct Entry {
    state: tokio::sync::Mutex<EntryState>,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    expires_at: Option<SystemTime>,
    last_success: Option<SystemTime>,
}

/// Credential name and scope set.
type CacheKey = (String, Vec<String>);

struct Inner {
    http: HttpClient,
    store: RefreshTokenStore,
    opts: TokenServiceOptions,
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    /// One refresh at a time per credential, whatever the scope set: a refresh token must
    /// never be sent twice.
    refresh_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: Mutex<HashMap<String, Stats>>,
}

/// Obtains, rotates and caches access tokens. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here is left half-updated by a panic, so a poisoned lock is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenService {
    pub fn new(opts: TokenServiceOptions) -> Result<TokenService, HttpClientError> {
        let http = HttpClient::new(opts.ca_file.as_deref(), opts.request_timeout)?;
        Ok(TokenService {
            inner: Arc::new(Inner {
                http,
                store: RefreshTokenStore::new(opts.state_dir.clone()),
                opts,
                entries: Mutex::new(HashMap::new()),
                refresh_locks: Mutex::new(HashMap::new()),
                stats: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The refresh token store (for `login`, and for status: [`SaveStatus`]).
    pub fn store(&self) -> &RefreshTokenStore {
        &self.inner.store
    }

    pub(crate) fn http(&self) -> &HttpClient {
        &self.inner.http
    }

    pub(crate) fn observer(&self) -> &dyn TokenObserver {
        self.inner.opts.observer.as_ref()
    }

    /// An access token for `cred`: the cached one while it is fresh, else a new one.
    pub async fn access_token(&self, cred: &Credential) -> Result<AccessToken, TokenError> {
        if let Grant::TokenFile { path } = &cred.grant {
            let token = read_token_file_async(path).await?;
            let mut stats = lock(&self.inner.stats);
            let s = stats.entry(cred.name.clone()).or_default();
            s.expires_at = token.expires_at;
            s.last_success = Some(SystemTime::now());
            return Ok(token);
        }
        let entry = self.entry(cred);
        let mut st = entry.state.lock().await;
        let now = Instant::now();
        if let Some(c) = &st.token
            && now < c.renew_at
        {
            return Ok(c.token.clone());
        }
        if let Some(retry_at) = st.retry_at
            && now < retry_at
        {
            // Backing off: a token that still works beats an error.
            if let Some(c) = st.token.as_ref().filter(|c| c.usable(now)) {
                return Ok(c.token.clone());
            }
            if let Some(e) = &st.last_error {
                return Err(e.clone());
            }
        }
        match self.fetch(cred).await {
            Ok((token, lifetime)) => {
                let now = Instant::now();
                let renew_in = match lifetime {
                    Some(l) if l > self.inner.opts.renew_margin => l - self.inner.opts.renew_margin,
                    Some(l) => l / 2,
                    None => UNKNOWN_LIFETIME_RENEW,
                };
                st.token = Some(Cached {
                    token: token.clone(),
                    renew_at: now + renew_in,
                    expires: lifetime.map(|l| now + l),
                });
                st.last_error = None;
                st.retry_at = None;
                st.failures = 0;
                Ok(token)
            }
            Err(e) => {
                if counts_for_backoff(&e) {
                    st.failures = st.failures.saturating_add(1);
                    let mut wait = backoff(
                        self.inner.opts.backoff_base,
                        self.inner.opts.backoff_max,
                        st.failures,
                    );
                    if let Some(ra) = e.retry_after() {
                        wait = wait.max(ra);
                    }
                    st.retry_at = Some(Instant::now() + wait);
                    tracing::warn!(
                        credential = %cred.name,
                        reason = %crate::classify::token::reason(&e),
                        detail = %crate::classify::token::detail(&e),
                        retry_in = ?wait,
                        "token request failed"
                    );
                } else {
                    tracing::warn!(
                        credential = %cred.name,
                        reason = %crate::classify::token::reason(&e),
                        detail = %crate::classify::token::detail(&e),
                        "no token"
                    );
                }
                st.last_error = Some(e.clone());
                match st.token.as_ref().filter(|c| c.usable(Instant::now())) {
                    Some(c) => Ok(c.token.clone()),
                    None => Err(e),
                }
            }
        }
    }

    /// Forgets the cached token of `cred` (the mail server said it expired): the next call
    /// fetches a new one unless a backoff is running.
    pub async fn invalidate(&self, cred: &Credential) {
        let entry = self.entry(cred);
        entry.state.lock().await.token = None;
    }

    /// Expiry of the access token in hand (`mail_oauth_token_expiry_timestamp_seconds`).
    pub fn token_expiry(&self, credential: &str) -> Option<SystemTime> {
        lock(&self.inner.stats)
            .get(credential)
            .and_then(|s| s.expires_at)
    }

    /// When a token was last obtained (`mail_oauth_token_last_success_timestamp_seconds`).
    pub fn last_success(&self, credential: &str) -> Option<SystemTime> {
        lock(&self.inner.stats)
            .get(credential)
            .and_then(|s| s.last_success)
    }

    /// Whether the newest refresh token of `credential` is safely on disk.
    pub fn save_status(&self, credential: &str) -> SaveStatus {
        self.inner.store.status(credential)
    }

    /// The declared expiries of `cred`'s client material
    /// (`mail_oauth_credential_expiry_timestamp_seconds`). An unreadable certificate is
    /// left out; the token request reports it.
    pub fn credential_expiries(&self, cred: &Credential) -> Vec<CredentialExpiry> {
        let mut out = Vec::new();
        if let Some(at) = cred.client_secret_expires {
            out.push(CredentialExpiry {
                kind: CredentialExpiryKind::ClientSecret,
                at,
            });
        }
        if let ClientAuth::Certificate {
            certificate_file, ..
        } = &cred.client_auth
            && let Ok(at) = certificate_not_after(certificate_file)
        {
            out.push(CredentialExpiry {
                kind: CredentialExpiryKind::Certificate,
                at,
            });
        }
        out
    }

    fn entry(&self, cred: &Credential) -> Arc<Entry> {
        lock(&self.inner.entries)
            .entry((cred.name.clone(), cred.scopes.clone()))
            .or_default()
            .clone()
    }

    fn refresh_lock(&self, credential: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.refresh_locks)
            .entry(credential.to_string())
            .or_default()
            .clone()
    }

    /// One token request, reported to the observer.
    async fn fetch(
        &self,
        cred: &Credential,
    ) -> Result<(AccessToken, Option<Duration>), TokenError> {
        let Some(kind) = cred.grant.kind() else {
            return Err(TokenError::Config {
                credential: cred.name.clone(),
                detail: "this grant makes no token requests".into(),
            });
        };
        let started = Instant::now();
        let result = match kind {
            GrantKind::RefreshToken => self.refresh(cred).await,
            _ => grant::client_credentials(&self.inner.http, cred)
                .await
                .map(|g| (g, false, None)),
        };
        let elapsed = started.elapsed();
        match result {
            Ok((granted, rotated, save_error)) => {
                let obtained_at = SystemTime::now();
                let expires_at = granted.lifetime.map(|l| obtained_at + l);
                let info = TokenInfo {
                    obtained_at,
                    expires_at,
                    refresh_token_rotated: rotated,
                    save_error,
                };
                {
                    let mut stats = lock(&self.inner.stats);
                    let s = stats.entry(cred.name.clone()).or_default();
                    s.expires_at = expires_at;
                    s.last_success = Some(obtained_at);
                }
                self.observer()
                    .request(&cred.name, kind, elapsed, Ok(&info));
                tracing::debug!(credential = %cred.name, grant = %kind, ?elapsed, "token obtained");
                Ok((
                    AccessToken {
                        value: granted.access_token,
                        expires_at,
                    },
                    granted.lifetime,
                ))
            }
            Err(e) => {
                if reaches_network(&e) {
                    self.observer().request(&cred.name, kind, elapsed, Err(&e));
                }
                Err(e)
            }
        }
    }

    /// The refresh token grant with rotation: the new refresh token is in the store (memory
    /// at least, disk if it can) before the access token is returned.
    async fn refresh(
        &self,
        cred: &Credential,
    ) -> Result<(Granted, bool, Option<String>), TokenError> {
        let guard = self.refresh_lock(&cred.name);
        let _held = guard.lock().await;
        let store = &self.inner.store;
        let current = store
            .current(&cred.name)
            .map_err(|e| TokenError::Store {
                detail: format!("{}: {e}", store.path_for(&cred.name).display()),
            })?
            .ok_or_else(|| TokenError::Missing {
                credential: cred.name.clone(),
            })?;
        let mut granted = grant::refresh(&self.inner.http, cred, &current).await?;
        drop(current);
        let mut save_error = None;
        let rotated = granted.refresh_token.is_some();
        if let Some(new_rt) = granted.refresh_token.take()
            && let Err(e) = store.save(&cred.name, &new_rt).await
        {
            tracing::error!(
                credential = %cred.name,
                file = %store.path_for(&cred.name).display(),
                error = %e,
                "cannot save the rotated refresh token; it is kept in memory and used next"
            );
            save_error = Some(e.to_string());
        }
        Ok((granted, rotated, save_error))
    }
}

/// Errors that came from the endpoint (or the way to it) wait out a backoff; local ones
/// (no refresh token, unreadable secret) are retried at once, so a fixed file or a fresh
/// `login` is picked up on the next probe.
fn counts_for_backoff(e: &TokenError) -> bool {
    reaches_network(e)
}

fn reaches_network(e: &TokenError) -> bool {
    matches!(
        e,
        TokenError::Endpoint { .. } | TokenError::Http { .. } | TokenError::Network { .. }
    )
}

/// Exponential backoff with jitter: `base * 2^(failures-1)`, capped, then a random point
/// in its upper half so that many exporters do not retry in step.
pub fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    full / 2 + full.mul_f64(0.5 * frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let d = backoff(base, max, 3);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 10, "no jitter");
        let d = backoff(base, max, 30);
        assert!(d >= Duration::from_secs(30) && d <= max);
        assert!(backoff(base, max, 1) <= base);
    }
}
