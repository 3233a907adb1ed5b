//! The grants on the wire, through the `oauth2` crate: refresh token, client credentials,
//! and the device authorization request, with client secret or JWT assertion.

use super::assertion::{ASSERTION_TYPE, ClientCertificate};
use super::credential::{ClientAuth, Credential, SecretSource};
use super::error::{OAuthErrorBody, TokenError};
use super::http::{HttpClient, ReplyMeta, TransportError, from_oauth2};
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

/// The token reply: standard fields (Microsoft's `ext_expires_in` and others are ignored).
pub type TokenReply =
    oauth2::StandardTokenResponse<oauth2::EmptyExtraTokenFields, oauth2::basic::BasicTokenType>;

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
            let response = self.http.send(request, self.meta).await?;
            if let Some(on_rotated) = self.rotated
                && response.status().is_success()
                && let Some(rt) = rotated_refresh_token(response.body())
            {
                on_rotated(rt);
            }
            Ok(response)
        })
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
    let raw = match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("client secret file {}: {e}", path.display()))?,
        SecretSource::Env(var) => {
            std::env::var(var).map_err(|_| format!("client secret variable {var} is not set"))?
        }
    };
    let value = raw.trim();
    if value.is_empty() {
        return Err("client secret is empty".to_string());
    }
    Ok(Secret::new(value))
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
        lifetime: reply.expires_in(),
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
    let proof = client_proof(cred)?;
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
    let proof = client_proof(cred)?;
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

/// The device authorization request (RFC 8628 §3.1).
pub async fn device_authorization(
    http: &HttpClient,
    cred: &Credential,
) -> Result<oauth2::StandardDeviceAuthorizationResponse, TokenError> {
    let url = cred
        .provider
        .device_authorization_url()
        .ok_or_else(|| config_err(cred, "the provider has no device authorization URL"))?;
    let url = oauth2::DeviceAuthorizationUrl::new(url).map_err(|e| config_err(cred, e))?;
    let proof = client_proof(cred)?;
    let client = oauth_client(cred, &proof)?.set_device_authorization_url(url);
    let mut req = client.exchange_device_code().add_scopes(scopes(cred));
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
    result.map_err(|e| from_oauth2(e, meta))
}
