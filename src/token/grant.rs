//! The grants on the wire, through the `oauth2` crate: refresh token, client credentials,
//! and the device authorization request, with client secret or JWT assertion.

use super::assertion::{ASSERTION_TYPE, ClientCertificate};
use super::credential::{ClientAuth, Credential, SecretSource};
use super::error::{OAuthErrorBody, TokenError};
use super::http::{
    HttpClient, ReplyMeta, TransportError, excerpt, from_oauth2, oauth_error_in, unusable,
};
use super::reply::DeviceAuthorization;
use crate::fsread::{self, FileKind};
use crate::secret::Secret;
use oauth2::basic::{BasicRevocationErrorResponse, BasicTokenIntrospectionResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, Scope, StandardRevocableToken,
    TokenResponse, TokenUrl,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The token reply, read leniently (`super::reply`): oauth2's `StandardTokenResponse` refuses
/// `expires_in` as a string (Entra ID's v1.0 endpoint) and `scope` as a list.
pub use super::reply::TokenReply;

/// oauth2's client with our error body, so `error_codes`, `trace_id` and
/// `correlation_id` survive.
pub type OAuthClient<HasDeviceAuthUrl = EndpointNotSet> = oauth2::Client<
    OAuthErrorBody,
    TokenReply,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    HasDeviceAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// oauth2's HTTP hook: our client, with the reply's status and `Retry-After` kept aside.
/// A named type with a boxed future, not a closure: closures returning borrowing futures
/// make the caller's future lose `Send` (a compiler limitation with higher-ranked lifetimes).
struct Sender<'a> {
    http: &'a HttpClient,
    meta: &'a Mutex<ReplyMeta>,
    /// Given a 2xx reply's `refresh_token` the moment the reply is in, before anything
    /// parses the rest: with single-use rotation it is the only valid one left, even when
    /// the rest of the reply turns out unusable.
    rotated: Option<OnRotated<'a>>,
}

type SendFuture<'c> =
    Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, TransportError>> + Send + 'c>>;

impl<'c> oauth2::AsyncHttpClient<'c> for Sender<'_> {
    type Error = TransportError;
    type Future = SendFuture<'c>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let mut reply = self.http.send(request, self.meta).await?;
            json_content_type(&mut reply);
            // The rotated refresh token is handed over before oauth2 parses the rest of
            // the reply, so it is durable even when the access token turns out unusable.
            if let Some(on_rotated) = self.rotated
                && reply.status().is_success()
                && let Some(rt) = rotated_refresh_token(reply.body())
            {
                on_rotated(rt);
            }
            Ok(reply)
        })
    }
}

/// oauth2 refuses a reply whose `Content-Type` is not JSON before reading it; endpoints that
/// send JSON as `text/plain` or `text/html` (some proxies and older servers do) would show
/// a working setup as broken. A body that is a JSON object is labelled JSON.
fn json_content_type(reply: &mut oauth2::HttpResponse) {
    let is_json = reply
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
    let object = reply
        .body()
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if !is_json && object {
        reply.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
}

/// What [`refresh`] calls with a rotated refresh token, synchronously, as soon as the
/// reply carrying it is in (the store writes it there).
pub type OnRotated<'a> = &'a (dyn Fn(Secret) + Send + Sync);

/// The `refresh_token` member of a token reply body, whatever else it holds.
fn rotated_refresh_token(body: &[u8]) -> Option<Secret> {
    #[derive(serde::Deserialize)]
    struct Rotated {
        refresh_token: Option<String>,
    }
    serde_json::from_slice::<Rotated>(body)
        .ok()?
        .refresh_token
        .filter(|t| !t.trim().is_empty())
        .map(Secret::new)
}

/// What a successful grant produced. The new refresh token (if any) goes straight to the
/// store; it is kept in a [`Secret`] until then.
#[derive(Debug)]
pub struct Granted {
    pub access_token: Secret,
    pub lifetime: Option<Duration>,
    pub refresh_token: Option<Secret>,
}

/// How the client authenticates on one request: body parameters, loaded fresh each time
/// so a rotated secret file or certificate is picked up without a restart.
pub enum ClientProof {
    None,
    Secret(Secret),
    Assertion(Secret),
}

fn config_err(cred: &Credential, detail: impl ToString) -> TokenError {
    TokenError::Config {
        credential: cred.name.clone(),
        detail: detail.to_string(),
    }
}

/// Reads a client secret: the bare value, surrounding whitespace trimmed.
pub fn read_secret(source: &SecretSource) -> Result<Secret, String> {
    let value = match source {
        // Capped and never a FIFO or device: see `crate::fsread`.
        SecretSource::File(path) => fsread::read_trimmed(path, FileKind::Secret)
            .map_err(|e| format!("client secret file {}: {}", path.display(), e.reason()))?,
        SecretSource::Env(var) => {
            let raw = std::env::var(var)
                .map_err(|_| format!("client secret variable {var} is not set"))?;
            let value = raw.trim();
            if value.is_empty() {
                return Err(format!("client secret variable {var} is empty"));
            }
            if value.len() as u64 > FileKind::Secret.cap() {
                return Err(format!(
                    "client secret variable {var} is longer than {} bytes",
                    FileKind::Secret.cap()
                ));
            }
            value.to_owned()
        }
    };
    Ok(Secret::new(value))
}

/// [`client_proof`] on the blocking pool: it reads the secret or certificate files.
pub async fn client_proof_async(cred: &Credential) -> Result<ClientProof, TokenError> {
    let owned = cred.clone();
    match tokio::task::spawn_blocking(move || client_proof(&owned)).await {
        Ok(r) => r,
        Err(e) => Err(config_err(
            cred,
            format!("reading client material failed: {e}"),
        )),
    }
}

pub fn client_proof(cred: &Credential) -> Result<ClientProof, TokenError> {
    match &cred.client_auth {
        ClientAuth::None => Ok(ClientProof::None),
        ClientAuth::Secret(source) => read_secret(source)
            .map(ClientProof::Secret)
            .map_err(|e| config_err(cred, e)),
        ClientAuth::Certificate {
            certificate_file,
            private_key_file,
        } => {
            let cert = ClientCertificate::load(certificate_file, private_key_file)
                .map_err(|e| config_err(cred, e))?;
            cert.assertion(
                &cred.client_id,
                &cred.provider.token_url(),
                SystemTime::now(),
            )
            .map(ClientProof::Assertion)
            .map_err(|e| config_err(cred, e))
        }
        // Re-read for every request: the issuer rotates the file.
        ClientAuth::AssertionFile(path) => super::service_account::read_assertion_file(path)
            .map(ClientProof::Assertion)
            .map_err(|e| config_err(cred, e)),
    }
}

/// The oauth2 client for `cred`. Credentials go in the request body (Microsoft's way;
/// Google accepts it too).
pub fn oauth_client(cred: &Credential, proof: &ClientProof) -> Result<OAuthClient, TokenError> {
    let token_url = TokenUrl::new(cred.provider.token_url()).map_err(|e| config_err(cred, e))?;
    let client = oauth2::Client::new(ClientId::new(cred.client_id.clone()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(token_url);
    Ok(match proof {
        ClientProof::Secret(s) => client.set_client_secret(ClientSecret::new(s.expose().into())),
        _ => client,
    })
}

fn scopes(cred: &Credential) -> impl Iterator<Item = Scope> + '_ {
    cred.scopes.iter().map(|s| Scope::new(s.clone()))
}

fn granted(reply: TokenReply) -> Granted {
    Granted {
        access_token: Secret::new(reply.access_token().secret().clone()),
        lifetime: Some(reply.lifetime()),
        refresh_token: reply
            .refresh_token()
            .map(|t| Secret::new(t.secret().clone())),
    }
}

/// The refresh token grant. `refresh_token` is borrowed from the store for this one request.
/// A refresh token in a 2xx reply is handed to `on_rotated` as soon as the reply is in,
/// before the rest is parsed, so it is stored even when this returns an error (or is
/// cancelled after it).
pub async fn refresh(
    http: &HttpClient,
    cred: &Credential,
    refresh_token: &Secret,
    on_rotated: OnRotated<'_>,
) -> Result<Granted, TokenError> {
    let proof = client_proof_async(cred).await?;
    let client = oauth_client(cred, &proof)?;
    let rt = oauth2::RefreshToken::new(refresh_token.expose().to_string());
    let mut req = client.exchange_refresh_token(&rt).add_scopes(scopes(cred));
    if let ClientProof::Assertion(a) = &proof {
        req = req
            .add_extra_param("client_assertion_type", ASSERTION_TYPE)
            .add_extra_param("client_assertion", a.expose().to_string());
    }
    let meta = Mutex::new(ReplyMeta::default());
    let result = req
        .request_async(&Sender {
            http,
            meta: &meta,
            rotated: Some(on_rotated),
        })
        .await;
    let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
    result.map(granted).map_err(|e| from_oauth2(e, meta))
}

/// The client credentials grant (an application token).
pub async fn client_credentials(
    http: &HttpClient,
    cred: &Credential,
) -> Result<Granted, TokenError> {
    let proof = client_proof_async(cred).await?;
    let client = oauth_client(cred, &proof)?;
    let mut req = client
        .exchange_client_credentials()
        .add_scopes(scopes(cred));
    if let ClientProof::Assertion(a) = &proof {
        req = req
            .add_extra_param("client_assertion_type", ASSERTION_TYPE)
            .add_extra_param("client_assertion", a.expose().to_string());
    }
    let meta = Mutex::new(ReplyMeta::default());
    let result = req
        .request_async(&Sender {
            http,
            meta: &meta,
            rotated: None,
        })
        .await;
    let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
    result.map(granted).map_err(|e| from_oauth2(e, meta))
}

/// The device authorization request (RFC 8628 §3.1). Sent by hand, not through oauth2: its
/// reply type reads `verification_url` as an alias, so a reply carrying both spellings is
/// refused as a duplicate field (see `super::reply::DeviceAuthorization`).
pub async fn device_authorization(
    http: &HttpClient,
    cred: &Credential,
) -> Result<DeviceAuthorization, TokenError> {
    let url = cred
        .provider
        .device_authorization_url()
        .ok_or_else(|| config_err(cred, "the provider has no device authorization URL"))?;
    oauth2::DeviceAuthorizationUrl::new(url.clone()).map_err(|e| config_err(cred, e))?;
    let proof = client_proof_async(cred).await?;
    let scope = cred.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = vec![("client_id", &cred.client_id)];
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    match &proof {
        ClientProof::None => {}
        ClientProof::Secret(s) => form.push(("client_secret", s.expose())),
        ClientProof::Assertion(a) => {
            form.push(("client_assertion_type", ASSERTION_TYPE));
            form.push(("client_assertion", a.expose()));
        }
    }
    let meta = Mutex::new(ReplyMeta::default());
    let reply = http.post_form(&url, &form, &meta).await;
    let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
    let reply = reply.map_err(|e| TokenError::Network {
        detail: e.to_string(),
    })?;
    let status = reply.status().as_u16();
    if status == 200 && oauth_error_in(reply.body()).is_none() {
        return DeviceAuthorization::from_slice(reply.body()).map_err(|why| TokenError::Http {
            status,
            excerpt: unusable(&why, reply.body()),
            retry_after: meta.retry_after,
        });
    }
    Err(error_reply(status, reply.body(), meta))
}

/// A non-200 reply: the OAuth error body if there is one, else classified by its status.
pub fn error_reply(status: u16, body: &[u8], meta: ReplyMeta) -> TokenError {
    match serde_json::from_slice::<OAuthErrorBody>(body) {
        Ok(body) => TokenError::Endpoint {
            status,
            body: Box::new(body),
            retry_after: meta.retry_after,
        },
        Err(_) => TokenError::Http {
            status,
            excerpt: excerpt(body),
            retry_after: meta.retry_after,
        },
    }
}
