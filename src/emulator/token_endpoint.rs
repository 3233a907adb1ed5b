//! An emulated Microsoft identity platform v2.0 token endpoint, for tests and `demo`.
//!
//! `POST /{tenant}/oauth2/v2.0/token` (grants `refresh_token`, `client_credentials` with
//! `client_secret` or a certificate-signed `client_assertion`, device code) and
//! `POST /{tenant}/oauth2/v2.0/devicecode`, on 127.0.0.1, plus an RFC 7662 introspection
//! endpoint (`POST /introspect`) so that a real mail server (Dovecot's `oauth2` passdb)
//! checks the very tokens this endpoint issued. Scriptable: clients, users,
//! lifetimes, forced errors exactly as docs/field-replies.md lists them, 429/5xx/HTML/hangs, device
//! flow states. It counts requests, and [`TokenEndpoint::validate`] tells the emulated mail
//! servers whether an access token is one it issued and still valid.
//!
//! It also plays Google's token endpoint for service accounts (`POST /token`, the JWT bearer
//! grant of RFC 7523 §2.1, see [`ServiceAccountSpec`]): the assertion's RS256 signature is
//! checked against the account's public key and its claims (`iss`, `aud`, `iat`/`exp` at
//! most one hour apart, `sub` a user of the domain, `scope` within the delegated scopes), and
//! the issued token is bound to `sub`: the mail servers accept it for that user only. And
//! Entra's workload identity federation: a client with [`FederatedCredential`]s accepts a
//! `client_assertion` whose `iss`, `sub` and `aud` match one (AADSTS70021 otherwise) and
//! whose `nbf`/`exp` hold now (AADSTS700024 otherwise). The emulator does not fetch the
//! issuer's signing keys (Entra does, by OIDC discovery): the pair is what it checks.
//!
//! Choices where Microsoft's behaviour is not pinned down:
//! - Refresh tokens rotate: each refresh returns a new one and invalidates the old. Reusing
//!   an old one, or using one of a user whose grant was revoked, gets `invalid_grant`
//!   AADSTS50173 ("the grant has expired due to it being revoked"), HTTP 400.
//! - AADSTS50196 answers HTTP 400 `invalid_request`, AADSTS90055 HTTP 429
//!   `temporarily_unavailable` (docs/field-replies.md allows both statuses).
//! - Device flow denial is `authorization_declined` (Microsoft's word; RFC 8628 says
//!   `access_denied`), expiry is `expired_token`.
//! - Microsoft has no introspection endpoint; ours follows RFC 7662: HTTP 200 with
//!   `{"active": false}` for any token that is unknown, expired or revoked (Dovecot treats
//!   any non-2xx answer as a *temporary* failure), and for a live token `active`, `scope`,
//!   `client_id`, `token_type`, `exp`, `sub` and, for delegated tokens only,
//!   `username` (an application token has no user: a server that needs one refuses it).
//!   It asks the caller for no credentials: it only ever listens on loopback.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One AADSTS error of docs/field-replies.md as Microsoft sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AadError {
    pub code: u64,
    pub error: &'static str,
    pub status: u16,
    pub text: &'static str,
}

/// Every AADSTS error of docs/field-replies.md's token endpoint table (plus 65004, 50158,
/// 500011, which docs/reasons.md names).
pub const AAD_ERRORS: &[AadError] = &[
    AadError {
        code: 70008,
        error: "invalid_grant",
        status: 400,
        text: "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.",
    },
    AadError {
        code: 700082,
        error: "invalid_grant",
        status: 400,
        text: "The refresh token has expired due to inactivity. The token was issued on 2024-01-01T00:00:00Z and was inactive for 90.00:00:00.",
    },
    AadError {
        code: 50173,
        error: "invalid_grant",
        status: 400,
        text: "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
    },
    AadError {
        code: 700084,
        error: "invalid_grant",
        status: 400,
        text: "The refresh token was issued to a single page app (SPA), and therefore has a fixed, limited lifetime of 1.00:00:00, which cannot be extended.",
    },
    AadError {
        code: 65001,
        error: "invalid_grant",
        status: 400,
        text: "The user or administrator has not consented to use the application with ID '11111111-2222-3333-4444-555555555555' named 'mail-monitor'.",
    },
    AadError {
        code: 65004,
        error: "invalid_grant",
        status: 400,
        text: "User declined to consent to access the app.",
    },
    AadError {
        code: 50076,
        error: "invalid_grant",
        status: 400,
        text: "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
    },
    AadError {
        code: 50079,
        error: "invalid_grant",
        status: 400,
        text: "Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
    },
    AadError {
        code: 50158,
        error: "invalid_grant",
        status: 400,
        text: "External security challenge was not satisfied.",
    },
    AadError {
        code: 53003,
        error: "invalid_grant",
        status: 400,
        text: "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.",
    },
    AadError {
        code: 70043,
        error: "invalid_grant",
        status: 400,
        text: "The refresh token has expired or is invalid due to sign-in frequency checks by conditional access. The token was issued on 2024-01-01T00:00:00Z and the maximum allowed lifetime for this request is 3600.",
    },
    AadError {
        code: 7000215,
        error: "invalid_client",
        status: 401,
        text: "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '11111111-2222-3333-4444-555555555555'.",
    },
    AadError {
        code: 7000222,
        error: "invalid_client",
        status: 401,
        text: "The provided client secret keys for app '11111111-2222-3333-4444-555555555555' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
    },
    AadError {
        code: 700027,
        error: "invalid_client",
        status: 401,
        text: "Client assertion failed signature validation.",
    },
    AadError {
        code: 70021,
        error: "invalid_request",
        status: 400,
        text: "No matching federated identity record found for presented assertion. Assertion Issuer: 'https://oidc.prod-aks.azure.com/00000000-0000-0000-0000-000000000000/'. Assertion Subject: 'system:serviceaccount:mail:mail-oauth-exporter'. Assertion Audience: 'api://AzureADTokenExchange'.",
    },
    AadError {
        code: 700024,
        error: "invalid_client",
        status: 400,
        text: "Client assertion is not within its valid time range. Current time: 2026-01-01T10:00:00.0000000Z, assertion valid from 2026-01-01T08:00:00.0000000Z, expiry time of assertion 2026-01-01T09:00:00.0000000Z.",
    },
    AadError {
        code: 700016,
        error: "unauthorized_client",
        status: 400,
        text: "Application with identifier '11111111-2222-3333-4444-555555555555' was not found in the directory 'contoso.onmicrosoft.com'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.",
    },
    AadError {
        code: 90002,
        error: "invalid_request",
        status: 400,
        text: "Tenant 'contoso.onmicrosoft.com' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
    },
    AadError {
        code: 70011,
        error: "invalid_scope",
        status: 400,
        text: "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid.",
    },
    AadError {
        code: 500011,
        error: "invalid_resource",
        status: 400,
        text: "The resource principal named https://outlook.office365.com was not found in the tenant named contoso.",
    },
    AadError {
        code: 50057,
        error: "invalid_grant",
        status: 400,
        text: "The user account is disabled.",
    },
    AadError {
        code: 50053,
        error: "invalid_grant",
        status: 400,
        text: "The account is locked, you've tried to sign in too many times with an incorrect user ID or password.",
    },
    AadError {
        code: 50055,
        error: "invalid_grant",
        status: 400,
        text: "The password is expired.",
    },
    AadError {
        code: 50196,
        error: "invalid_request",
        status: 400,
        text: "The server terminated an operation because it encountered a client request loop. Please contact your app vendor.",
    },
    AadError {
        code: 90055,
        error: "temporarily_unavailable",
        status: 429,
        text: "The request has been throttled. TenantThrottlingError.",
    },
];

pub fn aad_error(code: u64) -> Option<AadError> {
    AAD_ERRORS.iter().copied().find(|e| e.code == code)
}

/// A forced reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// A Microsoft error of [`AAD_ERRORS`] with its status, codes and ids.
    Aadsts(u64),
    /// An OAuth error without Microsoft's extras (Google's shape).
    OAuth {
        status: u16,
        error: String,
        description: String,
    },
    /// HTTP 429 with an optional `Retry-After` (seconds) and an empty body.
    Throttle { retry_after: Option<u64> },
    /// A bare 5xx (plain text, not OAuth JSON).
    ServerError(u16),
    /// An HTML error page with this status.
    Html(u16),
    /// A 200 with an empty body.
    Empty,
    /// A 200 whose JSON body is this many bytes (a hostile or broken endpoint).
    Huge(usize),
    /// Never answers.
    Hang,
    /// A proxy or endpoint that echoes the request: this status, with the form body as
    /// received (`client_id=...&client_secret=...&refresh_token=...`) as the OAuth
    /// `error_description`.
    EchoForm(u16),
    /// The recorded token body at this index of [`super::field::replies`], with its status.
    Field(usize),
    /// This status, `Content-Type` and body, as given (other providers' oddities: an OAuth
    /// error with HTTP 200, JSON labelled `text/plain`).
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
}

/// How a successful token reply is worded: Microsoft's v2.0 endpoint by default, or another
/// provider's dialect (all of them usable, except [`TokenDialect::NoAccessToken`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenDialect {
    /// `"expires_in": 3599` (a number), `"token_type": "Bearer"`, `scope` a string.
    #[default]
    Microsoft,
    /// Entra ID's v1.0 endpoint: every number as a string (`"expires_in": "3599"`),
    /// plus `expires_on`, `not_before` and `resource`.
    NumbersAsStrings,
    /// No `expires_in`; the access token is a JWT whose `exp` claim holds the expiry.
    JwtWithoutExpiresIn,
    /// No `expires_in` and an opaque access token (RFC 6749 §5.1 makes it optional).
    NoExpiresIn,
    /// `"token_type": "bearer"` (GitHub, Keycloak and others use lower case).
    LowercaseTokenType,
    /// `"scope": ["...", "..."]`, a list instead of a space-separated string.
    ScopeList,
    /// No `scope` at all (allowed when it equals the requested scope).
    NoScope,
    /// Fields this client does not know, nested objects included (`id_token`, `session_state`, ...).
    UnknownFields,
    /// Unusable: a 200 with a refresh token and an id token but no `access_token`.
    NoAccessToken,
}

/// How the device authorization reply names the verification page (RFC 8628 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceDialect {
    /// `verification_uri` (RFC 8628, Microsoft).
    #[default]
    VerificationUri,
    /// `verification_url` (Google's spelling).
    VerificationUrl,
    /// Both, with the same value (identity providers that serve both kinds of clients).
    Both,
}

/// Who a script applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Client(String),
    User(String),
    /// Requests to the introspection endpoint (a mail server checking a token).
    Introspection,
}

/// The grants a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmuGrant {
    RefreshToken,
    ClientCredentials,
    DeviceCode,
}

/// A registered application.
#[derive(Debug, Clone, Default)]
pub struct ClientSpec {
    pub id: String,
    /// Confidential client secret; `None` with no certificate: a public client.
    pub secret: Option<String>,
    pub secret_expired: bool,
    /// PEM certificate whose key signs client assertions.
    pub certificate_pem: Option<String>,
    pub grants: Vec<EmuGrant>,
    /// App roles/scopes granted; empty: any scope.
    pub scopes: Vec<String>,
    /// Mailboxes the app's Exchange service principal may open (`Add-MailboxPermission`):
    /// the emulated mail servers refuse this app's tokens for any other mailbox.
    pub mailboxes: Vec<String>,
    /// Federated identity credentials (workload identity federation): a `client_assertion`
    /// from one of these issuers and subjects authenticates the app, no secret needed.
    pub federated: Vec<FederatedCredential>,
}

/// An Entra federated identity credential: which external tokens the app trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    /// The external issuer (an AKS cluster's OIDC issuer URL).
    pub issuer: String,
    /// `system:serviceaccount:<namespace>:<name>` for Kubernetes.
    pub subject: String,
}

/// The audience Entra expects in a federated token.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A Google service account with domain-wide delegation, as the emulated Google token
/// endpoint knows it.
#[derive(Debug, Clone, Default)]
pub struct ServiceAccountSpec {
    pub client_email: String,
    /// The key's id (the JWT header's `kid`).
    pub private_key_id: String,
    /// The key's public half, PKCS#1 `RSAPublicKey` DER (Google keeps only this). A
    /// deleted key is an account registered without it.
    pub public_key: Vec<u8>,
    /// Scopes the Workspace admin delegated to the account's client id; a request for any
    /// other scope is `unauthorized_client`.
    pub scopes: Vec<String>,
    /// Users of the Workspace domain: `sub` must be one (`invalid_grant` "Invalid email or
    /// User ID" otherwise).
    pub users: Vec<String>,
}

/// What one device poll answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePoll {
    Pending,
    /// `authorization_pending` sent with HTTP 200 (GitHub's device flow does so).
    PendingWith200,
    SlowDown,
    /// The user signed in: tokens are issued to this user.
    Approve(String),
    Deny,
    Expire,
}

/// A token this endpoint issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub client_id: String,
    /// `None` for application (client credentials) tokens.
    pub user: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: SystemTime,
}

/// One request as the endpoint saw it (tests assert on these; it holds test tokens).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub path: String,
    pub client_id: Option<String>,
    /// `grant_type`, or `devicecode` for the device authorization request.
    pub grant: String,
    pub refresh_token: Option<String>,
    pub client_assertion: Option<String>,
    pub client_secret: Option<String>,
    pub status: u16,
    pub at: tokio::time::Instant,
}

#[derive(Debug, Clone)]
struct RtRecord {
    user: String,
    client_id: String,
    scopes: Vec<String>,
    valid: bool,
    /// When the reply carrying it was handed to the connection (`None`: [`TokenEndpoint::add_user`]).
    sent_at: Option<std::time::Instant>,
}

#[derive(Debug)]
struct Device {
    client_id: String,
    scopes: Vec<String>,
    polls: VecDeque<DevicePoll>,
    done: bool,
}

#[derive(Debug)]
struct State {
    base_url: String,
    clients: HashMap<String, ClientSpec>,
    revoked_users: Vec<String>,
    /// Used refresh tokens stay valid (Entra ID's behaviour) instead of single use.
    refresh_token_reuse: bool,
    refresh_tokens: HashMap<String, RtRecord>,
    access_tokens: HashMap<String, IssuedToken>,
    /// Access tokens revoked before their expiry (refused by the mail servers and by
    /// introspection, like a token whose session an admin revoked).
    revoked_access: Vec<String>,
    lifetime: Duration,
    /// Length of issued access tokens; real Entra tokens are JWTs of 1,500-2,500 chars.
    access_token_len: usize,
    scripts: HashMap<Target, VecDeque<Scripted>>,
    always: HashMap<Target, Scripted>,
    device_script: VecDeque<DevicePoll>,
    device_interval: u64,
    token_dialect: TokenDialect,
    device_dialect: DeviceDialect,
    devices: HashMap<String, Device>,
    requests: Vec<RequestRecord>,
    /// Service accounts by `client_email`.
    service_accounts: HashMap<String, ServiceAccountSpec>,
    /// Tokens issued to a service account acting as a user: valid for that user only.
    subject_bound: std::collections::HashSet<String>,
    /// The emulated Microsoft Graph (`super::graph`).
    graph: super::graph::GraphState,
}

/// The running endpoint. Dropping it stops the server.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn guid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Where the RFC 7662 introspection endpoint listens.
const INTROSPECT_PATH: &str = "/introspect";

/// Where the emulated Google token endpoint listens (Google's is
/// `https://oauth2.googleapis.com/token`).
const GOOGLE_TOKEN_PATH: &str = "/token";

/// The JWT bearer grant type (RFC 7523 §2.1).
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

enum Reply {
    Now(Response<Full<Bytes>>),
    Hang,
}

impl TokenEndpoint {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> std::io::Result<TokenEndpoint> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            base_url: format!("http://{addr}"),
            clients: HashMap::new(),
            revoked_users: Vec::new(),
            refresh_token_reuse: false,
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            revoked_access: Vec::new(),
            lifetime: Duration::from_secs(3600),
            access_token_len: 0,
            scripts: HashMap::new(),
            always: HashMap::new(),
            device_script: VecDeque::new(),
            device_interval: 5,
            token_dialect: TokenDialect::default(),
            device_dialect: DeviceDialect::default(),
            devices: HashMap::new(),
            requests: Vec::new(),
            service_accounts: HashMap::new(),
            subject_bound: Default::default(),
            graph: Default::default(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so stopping the server stops them too.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(TokenEndpoint { addr, state, task })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`: the `authority` of a Microsoft credential pointed here.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority())
    }

    /// Microsoft Graph's base URL here (the `graph_url` of a credential pointed here).
    pub fn graph_url(&self) -> String {
        self.authority()
    }

    /// Registers an app's client secrets and certificates with the emulated Graph.
    pub fn graph_set_application(
        &self,
        app_id: &str,
        passwords: Vec<super::graph::EmuPasswordCredential>,
        keys: Vec<super::graph::EmuKeyCredential>,
    ) {
        self.state()
            .graph
            .applications
            .insert(app_id.to_owned(), (passwords, keys));
    }

    /// Sets a service's status in the emulated Graph's health overview.
    pub fn graph_set_health(&self, service: &str, status: &str) {
        let mut st = self.state();
        st.graph.health.retain(|(s, _)| s != service);
        st.graph
            .health
            .push((service.to_owned(), status.to_owned()));
    }

    /// Adds a service issue to the emulated Graph.
    pub fn graph_add_issue(&self, issue: super::graph::EmuIssue) {
        self.state().graph.issues.push(issue);
    }

    /// Answers the next Graph request with `script`.
    pub fn graph_script(&self, script: super::graph::GraphScript) {
        self.state().graph.scripts.push_back(script);
    }

    /// The paths of the Graph requests served so far.
    pub fn graph_requests(&self) -> Vec<String> {
        self.state().graph.requests.clone()
    }

    pub fn add_client(&self, spec: ClientSpec) {
        self.state().clients.insert(spec.id.clone(), spec);
    }

    /// `http://127.0.0.1:port/token`: the emulated Google token endpoint, a service
    /// account key file's `token_uri`.
    pub fn google_token_url(&self) -> String {
        format!("{}{GOOGLE_TOKEN_PATH}", self.authority())
    }

    /// Registers (or replaces) a Google service account.
    pub fn add_service_account(&self, spec: ServiceAccountSpec) {
        self.state()
            .service_accounts
            .insert(spec.client_email.clone(), spec);
    }

    /// Gives `user` a refresh token for `client_id` (as if they had signed in) and returns it.
    pub fn add_user(&self, user: &str, client_id: &str, scopes: &[&str]) -> String {
        let rt = format!("emu-rt-{}", random_hex(24));
        let mut st = self.state();
        st.revoked_users.retain(|u| u != user);
        st.refresh_tokens.insert(
            rt.clone(),
            RtRecord {
                user: user.into(),
                client_id: client_id.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                valid: true,
                sent_at: None,
            },
        );
        rt
    }

    /// Access token lifetime for tokens issued from now on (whole seconds on the wire).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state().lifetime = lifetime;
    }

    /// `true`: a refresh token stays valid after use, as Entra ID's do (until they expire
    /// or are revoked). `false` (the default): single use, revoke-on-use rotation as Okta,
    /// Auth0 and Keycloak do it: the presented token is invalid the moment the reply with
    /// its successor is built, which proves the exporter never sends an old one and that a
    /// crash never loses a token that reached its disk.
    pub fn allow_refresh_token_reuse(&self, allow: bool) {
        self.state().refresh_token_reuse = allow;
    }

    /// Invalidates every refresh token of `user` (password change, admin revoke).
    pub fn revoke_user(&self, user: &str) {
        let mut st = self.state();
        st.revoked_users.push(user.into());
        for r in st.refresh_tokens.values_mut() {
            if r.user == user {
                r.valid = false;
            }
        }
    }

    /// `http://127.0.0.1:port/introspect`: the RFC 7662 endpoint a mail server posts
    /// `token=...` to (Dovecot's `introspection_mode = post`).
    pub fn introspection_url(&self) -> String {
        format!("{}{INTROSPECT_PATH}", self.authority())
    }

    /// Access tokens issued from now on are padded to `len` characters (at least the
    /// ~55 of a bare emulator token): long enough, like real ones, to pass SMTP's line
    /// limits. `0` turns padding off.
    pub fn set_access_token_length(&self, len: usize) {
        self.state().access_token_len = len;
    }

    /// Issues an access token directly, as if `client_id` had obtained it for `user`
    /// (`None`: an application token), valid for the current lifetime. For tests that
    /// hand a token to a `token_file` credential.
    pub fn issue_access_token(
        &self,
        client_id: &str,
        user: Option<&str>,
        scopes: &[&str],
    ) -> String {
        let mut st = self.state();
        let scopes = scopes.iter().map(|s| s.to_string()).collect();
        new_access_token(&mut st, client_id, user, scopes)
    }

    /// Revokes one access token before its expiry: the mail servers and introspection
    /// refuse it from now on.
    pub fn revoke_access_token(&self, token: &str) {
        self.state().revoked_access.push(token.into());
    }

    /// Makes one access token expire now.
    pub fn expire_access_token(&self, token: &str) {
        if let Some(t) = self.state().access_tokens.get_mut(token) {
            t.expires_at = SystemTime::now() - Duration::from_secs(1);
        }
    }

    /// How many introspection requests arrived (what proves a mail server asked).
    pub fn introspection_count(&self) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.grant == "introspect")
            .count()
    }

    /// The next request of `target` answers `reply` (queued: several calls, several replies).
    pub fn script_once(&self, target: Target, reply: Scripted) {
        self.state()
            .scripts
            .entry(target)
            .or_default()
            .push_back(reply);
    }

    /// Every request of `target` answers `reply` until [`TokenEndpoint::clear_scripts`].
    pub fn script_always(&self, target: Target, reply: Scripted) {
        self.state().always.insert(target, reply);
    }

    pub fn clear_scripts(&self) {
        let mut st = self.state();
        st.scripts.clear();
        st.always.clear();
    }

    /// The answers of the next device code's polls, in order; `Pending` once exhausted.
    pub fn script_device(&self, polls: Vec<DevicePoll>) {
        self.state().device_script = polls.into();
    }

    /// The `interval` the device authorization reply announces (seconds).
    /// Words later successful token replies in `dialect`.
    pub fn set_token_dialect(&self, dialect: TokenDialect) {
        self.state().token_dialect = dialect;
    }

    /// Words later device authorization replies in `dialect`.
    pub fn set_device_dialect(&self, dialect: DeviceDialect) {
        self.state().device_dialect = dialect;
    }

    pub fn set_device_interval(&self, seconds: u64) {
        self.state().device_interval = seconds;
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state().requests.clone()
    }

    /// Requests of `client_id` with `grant` (`refresh_token`, `client_credentials`,
    /// `urn:ietf:params:oauth:grant-type:device_code`, `devicecode`).
    pub fn request_count(&self, client_id: &str, grant: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.client_id.as_deref() == Some(client_id) && r.grant == grant)
            .count()
    }

    /// Every refresh token ever issued or registered (tests grep logs for them).
    pub fn all_refresh_tokens(&self) -> Vec<String> {
        self.state().refresh_tokens.keys().cloned().collect()
    }

    /// Every access token ever issued.
    pub fn all_access_tokens(&self) -> Vec<String> {
        self.state().access_tokens.keys().cloned().collect()
    }

    /// When the reply carrying the rotated refresh token `token` was handed to the
    /// connection (a wall-clock `std` instant, comparable across processes' events such as
    /// a kill); `None` for tokens never sent or given by [`TokenEndpoint::add_user`].
    pub fn refresh_token_sent_at(&self, token: &str) -> Option<std::time::Instant> {
        self.state().refresh_tokens.get(token)?.sent_at
    }

    /// The currently valid refresh tokens of `user`.
    pub fn valid_refresh_tokens(&self, user: &str) -> Vec<String> {
        self.state()
            .refresh_tokens
            .iter()
            .filter(|(_, r)| r.user == user && r.valid)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether `token` is an access token issued here and not yet expired.
    pub fn validate(&self, token: &str) -> Option<IssuedToken> {
        let st = self.state();
        if st.revoked_access.iter().any(|t| t == token) {
            return None;
        }
        st.access_tokens
            .get(token)
            .filter(|t| SystemTime::now() < t.expires_at)
            .cloned()
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path.starts_with("/v1.0/") {
        let query = req.uri().query().unwrap_or_default().to_string();
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        return Ok(super::graph::respond(
            &mut st.graph,
            &st.access_tokens,
            &st.base_url,
            &method,
            &path,
            &query,
            auth.as_deref(),
        ));
    }
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(plain(413, "request too large")),
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let reply = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let reply = respond(&mut st, &method, &path, &form);
        let status = match &reply {
            Reply::Now(r) => r.status().as_u16(),
            Reply::Hang => 0,
        };
        let grant = if path.ends_with("/devicecode") {
            "devicecode".to_string()
        } else if path == INTROSPECT_PATH {
            "introspect".to_string()
        } else {
            form.get("grant_type").cloned().unwrap_or_default()
        };
        st.requests.push(RequestRecord {
            path: path.clone(),
            // A JWT bearer grant names its client only as the assertion's issuer.
            client_id: form.get("client_id").cloned().or_else(|| {
                let claims = jwt_parts(form.get("assertion")?)?.1;
                claims["iss"].as_str().map(str::to_string)
            }),
            grant,
            refresh_token: form.get("refresh_token").cloned(),
            client_assertion: form
                .get("client_assertion")
                .or_else(|| form.get("assertion"))
                .cloned(),
            client_secret: form.get("client_secret").cloned(),
            status,
            at: tokio::time::Instant::now(),
        });
        reply
    };
    match reply {
        Reply::Now(r) => Ok(r),
        Reply::Hang => {
            std::future::pending::<()>().await;
            Ok(plain(500, "unreachable"))
        }
    }
}

fn plain(status: u16, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(text.to_string())))
        .unwrap_or_default()
}

fn json(status: u16, value: serde_json::Value) -> Reply {
    Reply::Now(
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json; charset=utf-8")
            .header("cache-control", "no-store, no-cache")
            .body(Full::new(Bytes::from(value.to_string())))
            .unwrap_or_default(),
    )
}

/// A Microsoft-shaped error body.
fn ms_error(status: u16, error: &str, code: Option<u64>, text: &str) -> Reply {
    let trace = guid();
    let corr = guid();
    let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let description = match code {
        Some(c) => {
            format!("AADSTS{c}: {text} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}")
        }
        None => text.to_string(),
    };
    json(
        status,
        serde_json::json!({
            "error": error,
            "error_description": description,
            "error_codes": code.map(|c| vec![c]).unwrap_or_default(),
            "timestamp": ts,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": code.map(|c| format!("https://login.microsoftonline.com/error?code={c}")),
        }),
    )
}

fn aad(code: u64) -> Reply {
    match aad_error(code) {
        Some(e) => ms_error(e.status, e.error, Some(e.code), e.text),
        None => ms_error(400, "invalid_request", Some(code), "Scripted error."),
    }
}

fn scripted(s: Scripted, form: &HashMap<String, String>) -> Reply {
    match s {
        Scripted::EchoForm(status) => {
            let mut pairs: Vec<(&String, &String)> = form.iter().collect();
            pairs.sort();
            let echoed = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish();
            json(
                status,
                serde_json::json!({
                    "error": "invalid_request",
                    "error_description": format!("Bad request: {echoed}"),
                }),
            )
        }
        Scripted::Aadsts(code) => aad(code),
        Scripted::OAuth {
            status,
            error,
            description,
        } => json(
            status,
            serde_json::json!({"error": error, "error_description": description}),
        ),
        Scripted::Throttle { retry_after } => {
            let mut b = Response::builder().status(429);
            if let Some(s) = retry_after {
                b = b.header("retry-after", s.to_string());
            }
            Reply::Now(b.body(Full::new(Bytes::new())).unwrap_or_default())
        }
        Scripted::ServerError(status) => Reply::Now(plain(status, "Service Unavailable")),
        Scripted::Html(status) => Reply::Now(
            Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY))
                .header("content-type", "text/html")
                .body(Full::new(Bytes::from_static(
                    b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Something went wrong</h1></body></html>",
                )))
                .unwrap_or_default(),
        ),
        Scripted::Empty => Reply::Now(
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::new()))
                .unwrap_or_default(),
        ),
        Scripted::Huge(size) => {
            // A valid JSON object, padded: only its size is wrong.
            let head = b"{\"token_type\":\"Bearer\",\"padding\":\"";
            let tail = b"\"}";
            let mut body = Vec::with_capacity(size.max(head.len() + tail.len()));
            body.extend_from_slice(head);
            body.resize(size.saturating_sub(tail.len()).max(head.len()), b'A');
            body.extend_from_slice(tail);
            Reply::Now(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default(),
            )
        }
        Scripted::Hang => Reply::Hang,
        Scripted::Field(i) => match super::field::get(i) {
            Some(super::field::FieldReply {
                kind: super::field::Kind::Token { status },
                reply,
                ..
            }) => Reply::Now(
                Response::builder()
                    .status(StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST))
                    .header("content-type", "application/json; charset=utf-8")
                    .body(Full::new(Bytes::from(reply.clone())))
                    .unwrap_or_default(),
            ),
            _ => Reply::Now(plain(500, "no such recorded token body")),
        },
        Scripted::Raw {
            status,
            content_type,
            body,
        } => Reply::Now(
            Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default(),
        ),
    }
}

fn take_script(st: &mut State, target: &Target) -> Option<Scripted> {
    if let Some(s) = st.scripts.get_mut(target).and_then(|q| q.pop_front()) {
        return Some(s);
    }
    st.always.get(target).cloned()
}

fn respond(
    st: &mut State,
    method: &http::Method,
    path: &str,
    form: &HashMap<String, String>,
) -> Reply {
    if path == INTROSPECT_PATH {
        return introspect(st, method, form);
    }
    if path == GOOGLE_TOKEN_PATH {
        return google_token(st, method, form);
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (tenant, endpoint) = match segments.as_slice() {
        [tenant, "oauth2", "v2.0", endpoint] => (*tenant, *endpoint),
        _ => return Reply::Now(plain(404, "not found")),
    };
    if method != http::Method::POST {
        return ms_error(
            405,
            "invalid_request",
            Some(900561),
            "The endpoint only accepts POST requests.",
        );
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    if let Some(s) = take_script(st, &Target::Client(client_id.clone())) {
        return scripted(s, form);
    }
    let Some(client) = st.clients.get(&client_id).cloned() else {
        return aad(700016);
    };
    match endpoint {
        "devicecode" => device_authorization(st, &client, form),
        "token" => token(st, tenant, &client, form),
        _ => Reply::Now(plain(404, "not found")),
    }
}

fn scopes_of(form: &HashMap<String, String>) -> Vec<String> {
    form.get("scope")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn device_authorization(
    st: &mut State,
    client: &ClientSpec,
    form: &HashMap<String, String>,
) -> Reply {
    if !client.grants.contains(&EmuGrant::DeviceCode) {
        return ms_error(
            400,
            "unauthorized_client",
            Some(70002),
            "The client does not allow the device code flow.",
        );
    }
    let scopes = scopes_of(form);
    if scopes.is_empty() {
        return aad(70011);
    }
    let device_code = format!("emu-dc-{}", random_hex(24));
    let user_code = random_hex(4).to_uppercase();
    let polls = std::mem::take(&mut st.device_script);
    st.devices.insert(
        device_code.clone(),
        Device {
            client_id: client.id.clone(),
            scopes,
            polls,
            done: false,
        },
    );
    let uri = format!("{}/devicelogin", st.base_url);
    let mut body = serde_json::json!({
        "user_code": user_code,
        "device_code": device_code,
        "expires_in": 900,
        "interval": st.device_interval,
        "message": format!("To sign in, use a web browser to open the page {uri} and enter the code {user_code} to authenticate."),
    });
    if st.device_dialect != DeviceDialect::VerificationUrl {
        body["verification_uri"] = serde_json::Value::String(uri.clone());
    }
    if st.device_dialect != DeviceDialect::VerificationUri {
        body["verification_url"] = serde_json::Value::String(uri);
    }
    json(200, body)
}

/// Checks client authentication; `Err` is the reply to send.
// The error is the response itself, built once and sent at once: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn authenticate(
    st: &State,
    tenant: &str,
    client: &ClientSpec,
    form: &HashMap<String, String>,
    confidential_required: bool,
) -> Result<(), Reply> {
    if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err(ms_error(
                400,
                "invalid_request",
                Some(50027),
                "Invalid client_assertion_type.",
            ));
        }
        if !client.federated.is_empty() {
            return federated(client, assertion);
        }
        let aud = format!("{}/{tenant}/oauth2/v2.0/token", st.base_url);
        return match &client.certificate_pem {
            Some(pem) if verify_assertion(pem, assertion, &client.id, &aud) => Ok(()),
            _ => Err(aad(700027)),
        };
    }
    if let Some(given) = form.get("client_secret") {
        return match &client.secret {
            Some(s) if s == given && client.secret_expired => Err(aad(7000222)),
            Some(s) if s == given => Ok(()),
            _ => Err(aad(7000215)),
        };
    }
    let confidential = client.secret.is_some() || client.certificate_pem.is_some();
    if confidential_required || confidential {
        return Err(ms_error(
            401,
            "invalid_client",
            Some(7000218),
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    }
    Ok(())
}

/// RS256 signature by the registered certificate, `x5t#S256`, audience, issuer, expiry.
fn verify_assertion(cert_pem: &str, jwt: &str, client_id: &str, aud: &str) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return false;
    };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).ok();
    let (Some(header), Some(claims), Some(sig)) = (decode(h), decode(c), decode(s)) else {
        return false;
    };
    let (Ok(header), Ok(claims)) = (
        serde_json::from_slice::<serde_json::Value>(&header),
        serde_json::from_slice::<serde_json::Value>(&claims),
    ) else {
        return false;
    };
    let thumb = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &pem.contents));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    header["alg"] == "RS256"
        && header["x5t#S256"] == thumb.as_str()
        && claims["aud"] == aud
        && claims["iss"] == client_id
        && claims["sub"] == client_id
        && claims["exp"].as_u64().is_some_and(|e| e > now)
        && claims["nbf"].as_u64().is_none_or(|n| n <= now + 60)
        && key.verify(format!("{h}.{c}").as_bytes(), &sig).is_ok()
}

fn issue(
    st: &mut State,
    client_id: &str,
    user: Option<&str>,
    scopes: Vec<String>,
    with_refresh: bool,
) -> Reply {
    let access = new_access_token(st, client_id, user, scopes.clone());
    let lifetime = st.lifetime;
    let mut body = serde_json::json!({
        "token_type": "Bearer",
        "scope": scopes.join(" "),
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": access,
    });
    if let (true, Some(user)) = (with_refresh, user) {
        let rt = format!("emu-rt-{}", random_hex(24));
        st.refresh_tokens.insert(
            rt.clone(),
            RtRecord {
                user: user.into(),
                client_id: client_id.into(),
                scopes,
                valid: true,
                sent_at: Some(std::time::Instant::now()),
            },
        );
        body["refresh_token"] = serde_json::Value::String(rt);
    }
    apply_dialect(st, &mut body);
    json(200, body)
}

/// Rewords a Microsoft-shaped success reply in the endpoint's [`TokenDialect`].
fn apply_dialect(st: &mut State, body: &mut serde_json::Value) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    match st.token_dialect {
        TokenDialect::Microsoft => {}
        TokenDialect::NumbersAsStrings => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let lifetime = st.lifetime.as_secs();
            for key in ["expires_in", "ext_expires_in"] {
                obj.insert(key.into(), lifetime.to_string().into());
            }
            obj.insert("expires_on".into(), (now + lifetime).to_string().into());
            obj.insert("not_before".into(), now.to_string().into());
            obj.insert("resource".into(), "https://outlook.office.com".into());
        }
        TokenDialect::JwtWithoutExpiresIn => {
            obj.remove("expires_in");
            obj.remove("ext_expires_in");
            let opaque = obj
                .get("access_token")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            if let Some(issued) = st.access_tokens.remove(&opaque) {
                let exp = issued
                    .expires_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256"}"#);
                let claims = URL_SAFE_NO_PAD.encode(
                    serde_json::json!({"aud": "https://outlook.office.com", "exp": exp, "oid": random_hex(8)})
                        .to_string(),
                );
                let jwt = format!("{header}.{claims}.{}", random_hex(32));
                st.access_tokens.insert(jwt.clone(), issued);
                obj.insert("access_token".into(), jwt.into());
            }
        }
        TokenDialect::NoExpiresIn => {
            obj.remove("expires_in");
            obj.remove("ext_expires_in");
        }
        TokenDialect::LowercaseTokenType => {
            obj.insert("token_type".into(), "bearer".into());
        }
        TokenDialect::ScopeList => {
            let list: Vec<serde_json::Value> = obj
                .get("scope")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .split_whitespace()
                .map(|s| s.into())
                .collect();
            obj.insert("scope".into(), list.into());
        }
        TokenDialect::NoScope => {
            obj.remove("scope");
        }
        TokenDialect::UnknownFields => {
            obj.insert(
                "id_token".into(),
                format!("emu-id-{}", random_hex(16)).into(),
            );
            obj.insert(
                "session_state".into(),
                serde_json::json!({"sid": random_hex(8), "nested": [1, 2, {"x": null}]}),
            );
            obj.insert("refresh_expires_in".into(), 1800.into());
            obj.insert("not-before-policy".into(), 0.into());
        }
        TokenDialect::NoAccessToken => {
            obj.remove("access_token");
            obj.insert(
                "id_token".into(),
                format!("emu-id-{}", random_hex(16)).into(),
            );
        }
    }
}

/// Mints and records an access token: `emu-at-<random>`, padded with more random
/// characters up to the configured length.
fn new_access_token(
    st: &mut State,
    client_id: &str,
    user: Option<&str>,
    scopes: Vec<String>,
) -> String {
    let mut access = format!("emu-at-{}", random_hex(24));
    while access.len() < st.access_token_len {
        access.push_str(&random_hex(32));
    }
    if st.access_token_len > 0 {
        access.truncate(st.access_token_len.max(55));
    }
    st.access_tokens.insert(
        access.clone(),
        IssuedToken {
            client_id: client_id.into(),
            user: user.map(str::to_string),
            scopes,
            expires_at: SystemTime::now() + st.lifetime,
        },
    );
    access
}

/// RFC 7662 token introspection (`POST /introspect`, form `token=...`).
fn introspect(st: &mut State, method: &http::Method, form: &HashMap<String, String>) -> Reply {
    if method != http::Method::POST {
        return Reply::Now(plain(405, "method not allowed"));
    }
    if let Some(s) = take_script(st, &Target::Introspection) {
        return scripted(s, form);
    }
    let Some(token) = form.get("token") else {
        // RFC 7662 §2.1: `token` is required; a malformed request is a 400.
        return json(400, serde_json::json!({"error": "invalid_request"}));
    };
    let live = st
        .access_tokens
        .get(token)
        .filter(|t| SystemTime::now() < t.expires_at)
        .filter(|_| !st.revoked_access.contains(token));
    let Some(t) = live else {
        // §2.2: an unknown, expired or revoked token is not an error, just inactive.
        return json(200, serde_json::json!({"active": false}));
    };
    let mut body = serde_json::json!({
        "active": true,
        "scope": t.scopes.join(" "),
        "client_id": t.client_id,
        "token_type": "Bearer",
        "exp": t.expires_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        "sub": t.user.as_deref().unwrap_or(&t.client_id),
    });
    if let Some(user) = &t.user {
        body["username"] = serde_json::Value::String(user.clone());
    }
    json(200, body)
}

fn allowed_scopes(client: &ClientSpec, scopes: &[String]) -> bool {
    client.scopes.is_empty()
        || scopes
            .iter()
            .all(|s| s == "offline_access" || client.scopes.contains(s))
}

fn token(
    st: &mut State,
    tenant: &str,
    client: &ClientSpec,
    form: &HashMap<String, String>,
) -> Reply {
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    let (emu_grant, confidential_required) = match grant {
        "refresh_token" => (EmuGrant::RefreshToken, false),
        "client_credentials" => (EmuGrant::ClientCredentials, true),
        "urn:ietf:params:oauth:grant-type:device_code" => (EmuGrant::DeviceCode, false),
        _ => {
            return ms_error(
                400,
                "unsupported_grant_type",
                Some(70003),
                "The app requested an unsupported grant type.",
            );
        }
    };
    if !client.grants.contains(&emu_grant) {
        return ms_error(
            400,
            "unauthorized_client",
            Some(70001),
            "The application is not allowed to use this grant.",
        );
    }
    if let Err(reply) = authenticate(st, tenant, client, form, confidential_required) {
        return reply;
    }
    let scopes = scopes_of(form);
    match emu_grant {
        EmuGrant::ClientCredentials => {
            if scopes.len() != 1 || !scopes[0].ends_with("/.default") {
                return aad(70011);
            }
            if !allowed_scopes(client, &scopes) {
                return aad(500011);
            }
            issue(st, &client.id, None, scopes, false)
        }
        EmuGrant::RefreshToken => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let Some(record) = st.refresh_tokens.get(&presented).cloned() else {
                return ms_error(
                    400,
                    "invalid_grant",
                    Some(9002313),
                    "Invalid request. Request is malformed or invalid.",
                );
            };
            if let Some(s) = take_script(st, &Target::User(record.user.clone())) {
                return scripted(s, form);
            }
            if record.client_id != client.id {
                return ms_error(
                    400,
                    "invalid_grant",
                    Some(70000),
                    "Provided grant is invalid or malformed.",
                );
            }
            if !record.valid || st.revoked_users.contains(&record.user) {
                return aad(50173);
            }
            let scopes = if scopes.is_empty() {
                record.scopes.clone()
            } else {
                scopes
            };
            if !allowed_scopes(client, &scopes) {
                return aad(70011);
            }
            if !st.refresh_token_reuse
                && let Some(r) = st.refresh_tokens.get_mut(&presented)
            {
                r.valid = false;
            }
            issue(st, &client.id, Some(&record.user), scopes, true)
        }
        EmuGrant::DeviceCode => {
            let code = form.get("device_code").cloned().unwrap_or_default();
            let Some(device) = st.devices.get_mut(&code) else {
                return ms_error(
                    400,
                    "invalid_grant",
                    Some(70000),
                    "Provided grant is invalid or malformed.",
                );
            };
            if device.done || device.client_id != client.id {
                return ms_error(
                    400,
                    "invalid_grant",
                    Some(70000),
                    "Provided grant is invalid or malformed.",
                );
            }
            match device.polls.pop_front().unwrap_or(DevicePoll::Pending) {
                DevicePoll::Pending => ms_error(
                    400,
                    "authorization_pending",
                    Some(70016),
                    "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                ),
                DevicePoll::SlowDown => {
                    ms_error(400, "slow_down", None, "Polling too fast: slow down.")
                }
                DevicePoll::PendingWith200 => json(
                    200,
                    serde_json::json!({
                        "error": "authorization_pending",
                        "error_description": "The authorization request is still pending.",
                    }),
                ),
                DevicePoll::Deny => {
                    device.done = true;
                    ms_error(
                        400,
                        "authorization_declined",
                        Some(70000),
                        "The user declined the sign-in.",
                    )
                }
                DevicePoll::Expire => {
                    device.done = true;
                    ms_error(
                        400,
                        "expired_token",
                        Some(70019),
                        "Verification code expired.",
                    )
                }
                DevicePoll::Approve(user) => {
                    device.done = true;
                    let scopes = device.scopes.clone();
                    let with_refresh = scopes.iter().any(|s| s == "offline_access");
                    if let Some(s) = take_script(st, &Target::User(user.clone())) {
                        return scripted(s, form);
                    }
                    issue(st, &client.id, Some(&user), scopes, with_refresh)
                }
            }
        }
    }
}

/// The emulated mail servers accept only tokens this endpoint issued and that are still
/// valid: a revoked grant shows as a token failure, an app without a mailbox permission as
/// a refused login.
impl super::TokenCheck for TokenEndpoint {
    fn check(&self, user: &str, token: &str) -> super::TokenVerdict {
        use super::TokenVerdict;
        let state = self.state();
        let Some(issued) = state.access_tokens.get(token) else {
            return TokenVerdict::Invalid;
        };
        if state.revoked_access.iter().any(|t| t == token) {
            return TokenVerdict::Invalid;
        }
        if SystemTime::now() >= issued.expires_at {
            return TokenVerdict::Expired;
        }
        match &issued.user {
            // A service account's token acts as its `sub` only.
            Some(sub) if state.subject_bound.contains(token) => {
                if sub.eq_ignore_ascii_case(user) {
                    TokenVerdict::Valid
                } else {
                    TokenVerdict::Invalid
                }
            }
            // Delegated: `user=` may be a shared mailbox's address (Microsoft's article).
            Some(_) => TokenVerdict::Valid,
            None => {
                let granted = state
                    .clients
                    .get(&issued.client_id)
                    .is_some_and(|c| c.mailboxes.iter().any(|m| m.eq_ignore_ascii_case(user)));
                if granted {
                    TokenVerdict::Valid
                } else {
                    TokenVerdict::Invalid
                }
            }
        }
    }
}

/// A JWT's decoded header and claims and its signing input and signature, unverified.
fn jwt_parts(jwt: &str) -> Option<(serde_json::Value, serde_json::Value, String, Vec<u8>)> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return None;
    };
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
    Some((header, claims, format!("{h}.{c}"), sig))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Workload identity federation: the assertion's issuer, subject and audience must match a
/// federated credential of the app (AADSTS70021), and it must be valid now (AADSTS700024).
#[allow(clippy::result_large_err)]
fn federated(client: &ClientSpec, assertion: &str) -> Result<(), Reply> {
    let Some((_, claims, _, _)) = jwt_parts(assertion) else {
        return Err(aad(70021));
    };
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == FEDERATED_AUDIENCE,
        serde_json::Value::Array(a) => a.iter().any(|v| v == FEDERATED_AUDIENCE),
        _ => false,
    };
    let matches = client
        .federated
        .iter()
        .any(|f| claims["iss"] == f.issuer.as_str() && claims["sub"] == f.subject.as_str());
    if !(aud_ok && matches) {
        return Err(aad(70021));
    }
    let now = unix_now();
    let in_time = claims["exp"].as_u64().is_some_and(|e| e > now)
        && claims["nbf"].as_u64().is_none_or(|n| n <= now + 60);
    if !in_time {
        return Err(aad(700024));
    }
    Ok(())
}

/// A Google-shaped error body (`error`, `error_description`, nothing else).
fn google_error(status: u16, error: &str, description: &str) -> Reply {
    json(
        status,
        serde_json::json!({"error": error, "error_description": description}),
    )
}

/// Google's token endpoint for service accounts: the JWT bearer grant.
fn google_token(st: &mut State, method: &http::Method, form: &HashMap<String, String>) -> Reply {
    if method != http::Method::POST {
        return Reply::Now(plain(405, "method not allowed"));
    }
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER) {
        return google_error(400, "unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return google_error(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    let Some((header, claims, signed, sig)) = jwt_parts(assertion) else {
        return google_error(400, "invalid_grant", "Invalid JWT Signature.");
    };
    let iss = claims["iss"].as_str().unwrap_or_default().to_string();
    let sub = claims["sub"].as_str().unwrap_or_default().to_string();
    if let Some(s) = take_script(st, &Target::Client(iss.clone()))
        .or_else(|| take_script(st, &Target::User(sub.clone())))
    {
        return scripted(s, form);
    }
    let Some(account) = st.service_accounts.get(&iss).cloned() else {
        return google_error(400, "invalid_grant", "Invalid JWT Signature.");
    };
    // A deleted key: no public key under this id any more, so no signature verifies.
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &account.public_key,
    );
    if header["alg"] != "RS256"
        || header["kid"] != account.private_key_id.as_str()
        || key.verify(signed.as_bytes(), &sig).is_err()
    {
        return google_error(400, "invalid_grant", "Invalid JWT Signature.");
    }
    if claims["aud"] != format!("{}{GOOGLE_TOKEN_PATH}", st.base_url).as_str() {
        return google_error(400, "invalid_grant", "Invalid JWT: Failed audience check.");
    }
    let now = unix_now();
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    let timely = matches!((iat, exp), (Some(i), Some(e))
        if i <= now + 60 && e > now && e > i && e - i <= 3600);
    if !timely {
        return google_error(
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    if !account.users.iter().any(|u| u.eq_ignore_ascii_case(&sub)) {
        return google_error(400, "invalid_grant", "Invalid email or User ID");
    }
    let scopes: Vec<String> = claims["scope"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if scopes.is_empty() || !scopes.iter().all(|s| account.scopes.contains(s)) {
        return google_error(
            401,
            "unauthorized_client",
            "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
        );
    }
    let access = new_access_token(st, &iss, Some(&sub), scopes);
    st.subject_bound.insert(access.clone());
    json(
        200,
        serde_json::json!({
            "access_token": access,
            "expires_in": st.lifetime.as_secs(),
            "token_type": "Bearer",
        }),
    )
}
