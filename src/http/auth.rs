//! HTTP basic auth against bcrypt hashes (`basic_auth_users`), with the slow bcrypt off
//! the async workers and successful verifications remembered.
//!
//! bcrypt costs 50-250 ms of CPU by design; Prometheus sends the same credentials every
//! scrape. A success is remembered as an HMAC of the password under a key made at start
//! (never the password itself, nor an unkeyed digest that could be brute-forced faster
//! than bcrypt), per user, and compared in constant time. Failures are not remembered and
//! at most `MAX_VERIFYING` bcrypt runs at a time, so wrong passwords cannot take every core.

use base64::Engine;
use http::HeaderValue;
use ring::hmac;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Concurrent bcrypt verifications; more wait their turn.
const MAX_VERIFYING: usize = 2;

pub struct BasicAuth {
    /// User name → bcrypt hash.
    users: Arc<BTreeMap<String, String>>,
    /// Keys the remembered successes; made at start, never leaves the process.
    cache_key: hmac::Key,
    /// User → HMAC of the password that last verified.
    verified: Mutex<HashMap<String, hmac::Tag>>,
    verifying: Arc<Semaphore>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl BasicAuth {
    /// `users` maps names to bcrypt hashes already checked by the web config parser.
    pub fn new(users: BTreeMap<String, String>) -> BasicAuth {
        let rng = ring::rand::SystemRandom::new();
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            // The OS random source failing is not something to serve through.
            .expect("the system random generator works");
        BasicAuth {
            users: Arc::new(users),
            cache_key,
            verified: Mutex::new(HashMap::new()),
            verifying: Arc::new(Semaphore::new(MAX_VERIFYING)),
        }
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Whether `authorization` (the request's header) names a user and that user's
    /// password.
    pub async fn check(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        if self.remembered(&user, &password) {
            return true;
        }
        // An unknown user is checked against some configured hash all the same, so the
        // answer takes as long as for a known user with a wrong password: timing does
        // not tell which user names exist.
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => match self.users.values().next() {
                Some(h) => (h.clone(), false),
                None => return false,
            },
        };
        let Ok(_permit) = self.verifying.clone().acquire_owned().await else {
            return false;
        };
        let pw = password.clone();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pw.as_bytes(), &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if ok && known {
            let tag = hmac::sign(&self.cache_key, password.as_bytes());
            self.lock().insert(user, tag);
        }
        ok && known
    }

    fn remembered(&self, user: &str, password: &str) -> bool {
        match self.lock().get(user) {
            // hmac::verify compares in constant time.
            Some(tag) => hmac::verify(&self.cache_key, password.as_bytes(), tag.as_ref()).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, hmac::Tag>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `Basic base64(user:password)` (RFC 7617); the scheme is case-insensitive. The password
/// is everything after the first colon; it must be UTF-8 like the user name.
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap hash for tests (cost 4); real configs use 10 or more.
    fn hash(password: &str) -> String {
        bcrypt::hash_with_salt(password, 4, [7u8; 16])
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY)
    }

    fn header(user: &str, password: &str) -> HeaderValue {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {b64}")).unwrap()
    }

    fn auth() -> BasicAuth {
        BasicAuth::new(BTreeMap::from([
            ("prometheus".to_string(), hash("s3cret:with colon")),
            ("alice".to_string(), hash("other")),
        ]))
    }

    #[tokio::test]
    async fn right_password_passes_and_is_remembered() {
        let a = auth();
        let h = header("prometheus", "s3cret:with colon");
        assert!(!a.remembered("prometheus", "s3cret:with colon"));
        assert!(a.check(Some(&h)).await);
        assert!(a.remembered("prometheus", "s3cret:with colon"));
        assert!(a.check(Some(&h)).await);
        // A remembered success is per user and per password.
        assert!(!a.remembered("prometheus", "s3cret"));
        assert!(!a.remembered("alice", "s3cret:with colon"));
    }

    #[tokio::test]
    async fn wrong_password_unknown_user_and_bad_headers_fail() {
        let a = auth();
        assert!(!a.check(Some(&header("prometheus", "s3cret"))).await);
        assert!(!a.check(Some(&header("prometheus", ""))).await);
        // Another user's password does not open this user.
        assert!(!a.check(Some(&header("alice", "s3cret:with colon"))).await);
        assert!(!a.check(Some(&header("mallory", "s3cret:with colon"))).await);
        assert!(!a.check(None).await);
        for bad in [
            "Bearer abc",
            "Basic",
            "Basic !!!",
            "Basic cHJvbWV0aGV1cw==", // "prometheus", no colon
        ] {
            assert!(
                !a.check(Some(&HeaderValue::from_static(bad))).await,
                "{bad}"
            );
        }
        assert!(a.lock().is_empty(), "failures are never remembered");
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("u:p");
        let v = HeaderValue::from_str(&format!("bAsIc {b64}")).unwrap();
        assert_eq!(parse_basic(&v), Some(("u".into(), "p".into())));
    }

    #[test]
    fn debug_shows_users_not_hashes() {
        let text = format!("{:?}", auth());
        assert!(text.contains("prometheus"), "{text}");
        assert!(!text.contains("$2y$"), "{text}");
    }
}
