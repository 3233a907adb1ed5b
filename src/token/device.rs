//! `login`: bootstrap a delegated credential with the device authorization grant (RFC 8628),
//! or import a refresh token obtained elsewhere. Either way the refresh token goes to the store.
//!
//! The polling loop is ours, not oauth2's: oauth2's loop reports errors as its standard
//! body, losing `error_codes` and the HTTP status, and doubles the interval on HTTP errors.

use super::credential::{Credential, Grant, GrantKind};
use super::error::{OAuthErrorBody, TokenError};
use super::grant::{self, ClientProof};
use super::http::{ReplyMeta, excerpt, oauth_error_in, unusable};
use super::observer::TokenInfo;
use super::reply::TokenReply;
use super::service::TokenService;
use crate::secret::Secret;
use oauth2::TokenResponse;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 §3.5: each `slow_down` adds five seconds to the polling interval.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("credential `{0}` does not use the refresh_token grant: nothing to log in")]
    NotDelegated(String),
    #[error("the user declined the sign-in")]
    Declined,
    #[error("the device code expired before the sign-in was completed")]
    Expired,
    #[error("the token endpoint returned no refresh token (is `offline_access` among the scopes?)")]
    NoRefreshToken,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("refresh token file {path}: {detail}")]
    ImportFile { path: String, detail: String },
    #[error("cannot store the refresh token: {0}")]
    Save(std::io::Error),
    #[error("cannot write to the terminal: {0}")]
    Output(std::io::Error),
}

/// Runs the device flow for `cred`: prints the verification URL and user code to `out`,
/// polls until the user signs in, and stores the refresh token.
pub async fn device_login(
    service: &TokenService,
    cred: &Credential,
    out: &mut (dyn Write + Send),
) -> Result<(), LoginError> {
    if cred.grant != Grant::RefreshToken {
        return Err(LoginError::NotDelegated(cred.name.clone()));
    }
    let http = service.http();
    let started = Instant::now();
    let details = match grant::device_authorization(http, cred).await {
        Ok(d) => d,
        Err(e) => {
            service.observer().request(
                &cred.name,
                GrantKind::DeviceCode,
                started.elapsed(),
                Err(&e),
            );
            return Err(e.into());
        }
    };
    writeln!(
        out,
        "To sign in, open {} and enter the code {}",
        details.verification_uri, details.user_code
    )
    .map_err(LoginError::Output)?;
    if let Some(complete) = &details.verification_uri_complete {
        writeln!(out, "(or open {complete})").map_err(LoginError::Output)?;
    }
    out.flush().map_err(LoginError::Output)?;

    let deadline = Instant::now() + details.expires_in;
    let mut interval = details.interval;
    let token_url = cred.provider.token_url();
    let device_code = details.device_code;
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Err(LoginError::Expired);
        }
        let proof = grant::client_proof_async(cred).await?;
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", DEVICE_CODE_GRANT),
            ("client_id", &cred.client_id),
            ("device_code", device_code.expose()),
        ];
        match &proof {
            ClientProof::None => {}
            ClientProof::Secret(s) => form.push(("client_secret", s.expose())),
            ClientProof::Assertion(a) => {
                form.push(("client_assertion_type", super::assertion::ASSERTION_TYPE));
                form.push(("client_assertion", a.expose()));
            }
        }
        let meta = Mutex::new(ReplyMeta::default());
        let poll_started = Instant::now();
        let reply = http.post_form(&token_url, &form, &meta).await;
        let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                let e = TokenError::Network {
                    detail: e.to_string(),
                };
                service.observer().request(
                    &cred.name,
                    GrantKind::DeviceCode,
                    poll_started.elapsed(),
                    Err(&e),
                );
                return Err(e.into());
            }
        };
        let status = reply.status().as_u16();
        // An OAuth error sent with HTTP 200 (GitHub's device flow does) is handled below.
        if status == 200 && oauth_error_in(reply.body()).is_none() {
            let parsed = TokenReply::from_slice(reply.body()).map_err(|why| TokenError::Http {
                status,
                excerpt: unusable(&why, reply.body()),
                retry_after: None,
            })?;
            let Some(rt) = parsed.refresh_token() else {
                return Err(LoginError::NoRefreshToken);
            };
            service
                .store()
                .save(&cred.name, &Secret::new(rt.secret().as_str()))
                .await
                .map_err(LoginError::Save)?;
            let now = SystemTime::now();
            let info = TokenInfo {
                obtained_at: now,
                expires_at: Some(now + parsed.lifetime()),
                refresh_token_rotated: true,
                save_error: None,
            };
            service.observer().request(
                &cred.name,
                GrantKind::DeviceCode,
                poll_started.elapsed(),
                Ok(&info),
            );
            tracing::info!(credential = %cred.name, "device login completed; refresh token stored");
            return Ok(());
        }
        let body: Option<OAuthErrorBody> = serde_json::from_slice(reply.body()).ok();
        match body.as_ref().map(|b| b.error.as_str()) {
            Some("authorization_pending") => continue,
            Some("slow_down") => {
                interval += SLOW_DOWN_STEP;
                continue;
            }
            Some("expired_token") | Some("code_expired") => return Err(LoginError::Expired),
            Some("access_denied") | Some("authorization_declined") => {
                return Err(LoginError::Declined);
            }
            _ => {}
        }
        let e = match body {
            Some(body) => TokenError::Endpoint {
                status,
                body: Box::new(body),
                retry_after: meta.retry_after,
            },
            None => TokenError::Http {
                status,
                excerpt: excerpt(reply.body()),
                retry_after: meta.retry_after,
            },
        };
        service.observer().request(
            &cred.name,
            GrantKind::DeviceCode,
            poll_started.elapsed(),
            Err(&e),
        );
        return Err(e.into());
    }
}

/// `login --refresh-token-file F`: redeems a refresh token obtained elsewhere once (refresh
/// token grant) and stores the one that comes back (the imported one if the endpoint does
/// not rotate). A refused token fails at once with the endpoint's error, and nothing is
/// stored: a token that cannot be redeemed would only fail every probe later.
pub async fn import_refresh_token(
    service: &TokenService,
    cred: &Credential,
    file: &Path,
) -> Result<(), LoginError> {
    if cred.grant != Grant::RefreshToken {
        return Err(LoginError::NotDelegated(cred.name.clone()));
    }
    let err = |detail: String| LoginError::ImportFile {
        path: file.display().to_string(),
        detail,
    };
    // Capped, never a FIFO or device, off the runtime: see `crate::fsread`.
    let value = crate::fsread::read_trimmed_async(file, crate::fsread::FileKind::Secret)
        .await
        .map_err(|e| err(e.reason()))?;
    let imported = Secret::new(&value);
    let started = Instant::now();
    // As in the service: the rotated token is staged on disk the moment the reply is in,
    // before anything else is done with it (a crash then loses nothing).
    let staged = std::sync::Mutex::new(None);
    let stage = |rt: Secret| {
        let s = service.store().stage(&cred.name, &rt);
        *staged.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    };
    let result = grant::refresh(service.http(), cred, &imported, &stage).await;
    let staged = staged.lock().unwrap_or_else(|e| e.into_inner()).take();
    let granted = match result {
        Ok(g) => g,
        Err(e) => {
            service.observer().request(
                &cred.name,
                GrantKind::RefreshToken,
                started.elapsed(),
                Err(&e),
            );
            return Err(e.into());
        }
    };
    let rotated = granted.refresh_token.is_some();
    let store = service.store();
    let saved = match staged {
        Some(staged) => store.commit(&cred.name, staged).await,
        None => {
            let keep = granted.refresh_token.unwrap_or(imported);
            store.save(&cred.name, &keep).await
        }
    };
    saved.map_err(LoginError::Save)?;
    let now = SystemTime::now();
    let info = TokenInfo {
        obtained_at: now,
        expires_at: granted.lifetime.map(|l| now + l),
        refresh_token_rotated: rotated,
        save_error: None,
    };
    service.observer().request(
        &cred.name,
        GrantKind::RefreshToken,
        started.elapsed(),
        Ok(&info),
    );
    tracing::info!(credential = %cred.name, rotated, "imported refresh token redeemed and stored");
    Ok(())
}
