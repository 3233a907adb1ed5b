//! The token service: one cached access token per credential and scope set, renewed ahead
//! of expiry, fetched once for all concurrent callers, backed off after failures.

use super::assertion::certificate_not_after;
use super::credential::{AccessToken, ClientAuth, Credential, Grant, GrantKind};
use super::error::TokenError;
use super::grant::{self, Granted};
use super::http::{HttpClient, HttpClientError};
use super::observer::{NoopObserver, TokenInfo, TokenObserver};
use super::store::{RefreshTokenStore, SaveStatus};
use super::token_file::TokenFileCache;
use crate::secret::Secret;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How the token service is set up.
#[derive(Clone)]
pub struct TokenServiceOptions {
    /// Where rotated refresh tokens are kept (the config's `state_dir`).
    pub state_dir: PathBuf,
    /// Extra trust roots (the config's `tls.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// Renew this long before expiry; tokens living shorter are renewed at half-life.
    pub renew_margin: Duration,
    /// Per token request, connect to last byte, when the caller's [`TokenBudget`] allows
    /// longer (a probe's budget is its mailbox's `timeout`).
    pub request_timeout: Duration,
    /// First backoff after a failed request; doubles per failure, up to `backoff_max`, and
    /// never beyond half the asking mailbox's interval ([`TokenBudget::retry_within`]).
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

/// What one caller grants a token request: the probe's deadline and its mailbox's interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBudget {
    /// Waiting for the single flight and the token endpoint ends here: the probe's own
    /// deadline (its mailbox's `timeout` from the start of the run).
    pub deadline: Instant,
    /// The asking mailbox's interval. After a failure this caller waits at most half of it
    /// before the credential is tried again (a `Retry-After` from the server still wins), so
    /// that a recovered endpoint shows as `ok` within one interval whatever the backoff.
    pub retry_within: Duration,
}

impl TokenBudget {
    /// A budget of `timeout` from now, for a mailbox probed every `interval`.
    pub fn new(timeout: Duration, interval: Duration) -> TokenBudget {
        TokenBudget {
            deadline: Instant::now() + timeout,
            retry_within: interval,
        }
    }
}

/// The state of the last failed request, kept until one succeeds.
#[derive(Debug, Clone)]
struct Failed {
    /// When the failed request started.
    attempted_at: Instant,
    /// The exponential backoff for this number of failures (jittered).
    backoff: Duration,
    /// `Retry-After`: no request before this, whatever the interval.
    server_until: Option<Instant>,
}

impl Failed {
    /// When a caller with `budget` may try again.
    fn retry_at(&self, budget: &TokenBudget) -> Instant {
        let own = self.attempted_at + self.backoff.min(budget.retry_within / 2);
        self.server_until.map_or(own, |s| s.max(own))
    }
}

#[derive(Debug, Default)]
struct EntryState {
    token: Option<Cached>,
    last_error: Option<TokenError>,
    failed: Option<Failed>,
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
    /// The last failed token request (unclassified: the reason is decided at the
    /// status boundary) and when it failed.
    last_error: Option<(TokenError, SystemTime)>,
    /// What the last fetch that reached the endpoint exchanged with it, redacted, and when.
    exchange: Option<(SystemTime, Arc<str>)>,
}

/// Credential name, scope set, and the subject for grants that get one token per mailbox
/// (service accounts; `None` for every other grant).
type CacheKey = (String, Vec<String>, Option<String>);

struct Inner {
    http: HttpClient,
    store: RefreshTokenStore,
    opts: TokenServiceOptions,
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    /// One refresh at a time per credential, whatever the scope set: a refresh token must
    /// never be sent twice.
    refresh_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: Mutex<HashMap<String, Stats>>,
    /// `token_file` grants: each file's last value, re-read when the file changes.
    token_files: TokenFileCache,
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
                token_files: TokenFileCache::default(),
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

    /// An access token for `cred`: the cached one while it is fresh, else a new one, within
    /// the service's own `request_timeout` and backoff (for `probe` and tests).
    pub async fn access_token(&self, cred: &Credential) -> Result<AccessToken, TokenError> {
        let budget = TokenBudget::new(
            self.inner.opts.request_timeout,
            self.inner.opts.backoff_max.saturating_mul(2),
        );
        self.access_token_within(cred, budget).await
    }

    /// Like [`TokenService::access_token`], bounded by `budget`: waiting behind another
    /// caller's request and the request itself end at `budget.deadline` (a
    /// `token_network_error` then), and a backoff never keeps this caller from trying again
    /// after half its `retry_within`, unless the server sent a longer `Retry-After`.
    pub async fn access_token_within(
        &self,
        cred: &Credential,
        budget: TokenBudget,
    ) -> Result<AccessToken, TokenError> {
        self.access_token_as(cred, None, budget).await
    }

    /// Like [`TokenService::access_token_within`], for the mailbox `subject` (its address):
    /// a grant with one token per mailbox ([`Grant::per_subject`], service accounts) caches,
    /// renews and single-flights a token per credential *and* subject; other grants ignore
    /// the subject and share one token among the credential's mailboxes.
    pub async fn access_token_as(
        &self,
        cred: &Credential,
        subject: Option<&str>,
        budget: TokenBudget,
    ) -> Result<AccessToken, TokenError> {
        if let Grant::TokenFile { path } = &cred.grant {
            let token = self.inner.token_files.read_async(path).await?;
            let mut stats = lock(&self.inner.stats);
            let s = stats.entry(cred.name.clone()).or_default();
            s.expires_at = token.expires_at;
            s.last_success = Some(SystemTime::now());
            return Ok(token);
        }
        let subject = subject.filter(|_| cred.grant.per_subject());
        let entry = self.entry(cred, subject);
        let waiting_since = Instant::now();
        let Ok(mut st) = tokio::time::timeout_at(budget.deadline, entry.state.lock()).await else {
            return Err(no_reply_within(
                waiting_since,
                "another request for this token",
            ));
        };
        let now = Instant::now();
        if let Some(c) = &st.token
            && now < c.renew_at
        {
            return Ok(c.token.clone());
        }
        if let Some(f) = &st.failed
            && now < f.retry_at(&budget)
        {
            // Backing off: a token that still works beats an error.
            if let Some(c) = st.token.as_ref().filter(|c| c.usable(now)) {
                return Ok(c.token.clone());
            }
            if let Some(e) = &st.last_error {
                return Err(e.clone());
            }
        }
        let attempted_at = Instant::now();
        match self.fetch(cred, subject, budget.deadline).await {
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
                st.failed = None;
                st.failures = 0;
                Ok(token)
            }
            Err(e) => {
                let retry_in = counts_for_backoff(&e).then(|| {
                    st.failures = st.failures.saturating_add(1);
                    let failed = Failed {
                        attempted_at,
                        backoff: backoff(
                            self.inner.opts.backoff_base,
                            self.inner.opts.backoff_max,
                            st.failures,
                        ),
                        server_until: e.retry_after().map(|ra| Instant::now() + ra),
                    };
                    let retry_in = failed
                        .retry_at(&budget)
                        .saturating_duration_since(Instant::now());
                    st.failed = Some(failed);
                    retry_in
                });
                st.last_error = Some(e.clone());
                // The reason is not decided here: `classify` does that once, where the failure
                // is reported (the probe's result, the observer's metrics).
                let detail = e.detail();
                match st.token.as_ref().filter(|c| c.usable(Instant::now())) {
                    Some(c) => {
                        // No probe fails for it, so this is the failure's one WARN line.
                        tracing::warn!(
                            credential = %cred.name,
                            detail = %crate::token::error::bounded(&detail, crate::token::error::LOG_DETAIL_MAX),
                            ?retry_in,
                            "token renewal failed; the access token in hand is used meanwhile"
                        );
                        tracing::debug!(credential = %cred.name, %detail, "token renewal failed (full detail)");
                        Ok(c.token.clone())
                    }
                    None => {
                        // The caller reports it (the service's "probe failed" line, or
                        // `probe`'s result): one WARN line per failure, not two; and a
                        // backoff means nothing to a one-shot `probe`.
                        tracing::debug!(credential = %cred.name, %detail, ?retry_in, "token request failed");
                        Err(e)
                    }
                }
            }
        }
    }

    /// Forgets the cached token of `cred` (the mail server said it expired): the next call
    /// fetches a new one unless a backoff is running.
    pub async fn invalidate(&self, cred: &Credential) {
        self.invalidate_as(cred, None).await
    }

    /// Forgets the cached token `subject`'s probes use (see [`TokenService::access_token_as`]).
    pub async fn invalidate_as(&self, cred: &Credential, subject: Option<&str>) {
        let subject = subject.filter(|_| cred.grant.per_subject());
        let entry = self.entry(cred, subject);
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

    /// The last failed token request of `credential` (kept after later successes): the
    /// error, unclassified, and when it failed. Requests held back by the backoff are not
    /// counted.
    pub fn last_error(&self, credential: &str) -> Option<(TokenError, SystemTime)> {
        lock(&self.inner.stats)
            .get(credential)
            .and_then(|s| s.last_error.clone())
    }

    /// What `credential`'s last token fetch that sent a request exchanged with the token
    /// endpoint (redacted, see [`super::http::recording`]), and when it ended.
    pub fn last_exchange(&self, credential: &str) -> Option<(SystemTime, Arc<str>)> {
        lock(&self.inner.stats)
            .get(credential)
            .and_then(|s| s.exchange.clone())
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

    fn entry(&self, cred: &Credential, subject: Option<&str>) -> Arc<Entry> {
        let key = (
            cred.name.clone(),
            cred.scopes.clone(),
            subject.map(str::to_owned),
        );
        lock(&self.inner.entries).entry(key).or_default().clone()
    }

    fn refresh_lock(&self, credential: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.refresh_locks)
            .entry(credential.to_string())
            .or_default()
            .clone()
    }

    /// One token request (more for a refresh that falls back to an older stored token),
    /// reported to the observer, given up at `deadline`.
    async fn fetch(
        &self,
        cred: &Credential,
        subject: Option<&str>,
        deadline: Instant,
    ) -> Result<(AccessToken, Option<Duration>), TokenError> {
        let Some(kind) = cred.grant.kind() else {
            return Err(TokenError::Config {
                credential: cred.name.clone(),
                detail: "this grant makes no token requests".into(),
            });
        };
        let started = Instant::now();
        let (result, exchange) = super::http::recording(async { match kind {
            GrantKind::RefreshToken => self.refresh(cred, deadline).await,
            GrantKind::JwtBearer => {
                let (Grant::ServiceAccount { key_file }, Some(subject)) = (&cred.grant, subject)
                else {
                    return Err(TokenError::Config {
                        credential: cred.name.clone(),
                        detail: "a service account token is asked for a mailbox: no mailbox address given".into(),
                    });
                };
                let request =
                    super::service_account::jwt_bearer(&self.inner.http, cred, key_file, subject);
                match tokio::time::timeout_at(deadline, request).await {
                    Ok(r) => r.map(|g| (g, false, None)),
                    Err(_) => Err(no_reply_within(started, "the token endpoint")),
                }
            }
            _ => {
                let request = grant::client_credentials(&self.inner.http, cred);
                match tokio::time::timeout_at(deadline, request).await {
                    Ok(r) => r.map(|g| (g, false, None)),
                    Err(_) => Err(no_reply_within(started, "the token endpoint")),
                }
            }
        }})
        .await;
        let elapsed = started.elapsed();
        if !exchange.is_empty() {
            lock(&self.inner.stats)
                .entry(cred.name.clone())
                .or_default()
                .exchange = Some((SystemTime::now(), Arc::from(exchange)));
        }
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
                lock(&self.inner.stats)
                    .entry(cred.name.clone())
                    .or_default()
                    .last_error = Some((e.clone(), SystemTime::now()));
                Err(e)
            }
        }
    }

    /// The refresh token grant with rotation. A refresh token in the reply is saved (disk,
    /// or memory at least) before anything else is done with the reply, even one whose
    /// access token is unusable. At the first refresh after a start the store may hold
    /// several candidates (a crash between a temp file's write and its rename): the newest
    /// is sent first, an older one only after the endpoint refused the newer with
    /// `invalid_grant`; the store then keeps the winner and deletes the losers.
    async fn refresh(
        &self,
        cred: &Credential,
        deadline: Instant,
    ) -> Result<(Granted, bool, Option<String>), TokenError> {
        let started = Instant::now();
        let guard = self.refresh_lock(&cred.name);
        let Ok(_held) = tokio::time::timeout_at(deadline, guard.lock()).await else {
            return Err(no_reply_within(
                started,
                "another refresh of this credential",
            ));
        };
        let store = &self.inner.store;
        let candidates = store
            .candidates(&cred.name)
            .map_err(|e| TokenError::Store {
                detail: format!("{}: {e}", store.path_for(&cred.name).display()),
            })?;
        if candidates.is_empty() {
            return Err(TokenError::Missing {
                credential: cred.name.clone(),
            });
        }
        for (i, candidate) in candidates.iter().enumerate() {
            // Outside the request's future: it survives the deadline cutting the request.
            let staged = std::sync::Mutex::new(None);
            let stage = |rt: Secret| {
                let s = store.stage(&cred.name, &rt);
                *staged.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            };
            let request = grant::refresh(&self.inner.http, cred, &candidate.token, &stage);
            let result = match tokio::time::timeout_at(deadline, request).await {
                Ok(r) => r,
                Err(_) => Err(no_reply_within(started, "the token endpoint")),
            };
            let staged = staged.lock().unwrap_or_else(|e| e.into_inner()).take();
            let staged = staged.or_else(|| {
                // A reply the hook could not read but the grant could.
                let rt = result.as_ref().ok()?.refresh_token.as_ref()?;
                Some(store.stage(&cred.name, rt))
            });
            let rotated = staged.is_some();
            let mut save_error = None;
            if let Some(staged) = staged
                && let Err(e) = store.commit(&cred.name, staged).await
            {
                tracing::error!(
                    credential = %cred.name,
                    error = %e,
                    "cannot save the rotated refresh token; it is kept in memory and used next"
                );
                self.observer().save_failed(&cred.name, &e.to_string());
                save_error = Some(e.to_string());
            }
            let refused = matches!(&result, Err(e) if is_invalid_grant(e));
            if refused && !rotated && i + 1 < candidates.len() {
                tracing::warn!(
                    credential = %cred.name,
                    "the newest stored refresh token was refused (invalid_grant); trying the older one"
                );
                continue;
            }
            let accepted = result.is_ok() || rotated;
            if accepted && save_error.is_none() {
                let settled = store
                    .settle(&cred.name, candidate, &candidates, rotated)
                    .await;
                if let Err(e) = settled {
                    self.observer().save_failed(&cred.name, &e.to_string());
                    save_error = Some(e.to_string());
                }
            }
            return result.map(|mut granted| {
                // Already in the store (from `rotated`, the same value).
                granted.refresh_token = None;
                (granted, rotated, save_error)
            });
        }
        // Every candidate was refused; the last refusal was returned above.
        Err(TokenError::Missing {
            credential: cred.name.clone(),
        })
    }
}

/// What a caller gets when its deadline passed while waiting for `what`.
fn no_reply_within(since: Instant, what: &str) -> TokenError {
    TokenError::Network {
        detail: format!(
            "no answer from {what} within the probe's timeout ({:.1} s)",
            since.elapsed().as_secs_f64()
        ),
    }
}

/// The endpoint refused the refresh token itself (RFC 6749 §5.2 `invalid_grant`).
fn is_invalid_grant(e: &TokenError) -> bool {
    e.oauth_body().is_some_and(|b| b.error == "invalid_grant")
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
