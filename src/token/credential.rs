//! What a credential is at run time: provider, grant, client authentication, scopes, endpoints;
//! and what it yields, the [`AccessToken`].
//!
//! The lead's config module builds these from the YAML `credentials` section; nothing here
//! reads YAML. Scopes are stored already resolved (see [`default_scopes`]).

use crate::protocol::Protocol;
use crate::secret::Secret;
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

/// An access token ready to put in a SASL string: what a [`Credential`] yields, from the
/// token service or a token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub value: Secret,
    /// `None` when the issuer did not say (an opaque token file).
    pub expires_at: Option<SystemTime>,
}

/// Microsoft's public cloud; national clouds override it with the config's `authority`.
pub const MICROSOFT_AUTHORITY: &str = "https://login.microsoftonline.com";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GOOGLE_DEVICE_URL: &str = "https://oauth2.googleapis.com/device/code";
/// The one scope Exchange Online accepts for the client credentials grant.
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";

/// Who issues the tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    Microsoft {
        tenant: String,
        authority: String,
    },
    Google,
    Generic {
        token_url: String,
        device_authorization_url: Option<String>,
    },
}

impl Provider {
    /// Microsoft's public cloud for `tenant`.
    pub fn microsoft(tenant: impl Into<String>) -> Provider {
        Provider::Microsoft {
            tenant: tenant.into(),
            authority: MICROSOFT_AUTHORITY.to_string(),
        }
    }

    pub fn token_url(&self) -> String {
        match self {
            Provider::Microsoft { tenant, authority } => {
                format!(
                    "{}/{tenant}/oauth2/v2.0/token",
                    authority.trim_end_matches('/')
                )
            }
            Provider::Google => GOOGLE_TOKEN_URL.to_string(),
            Provider::Generic { token_url, .. } => token_url.clone(),
        }
    }

    pub fn device_authorization_url(&self) -> Option<String> {
        match self {
            Provider::Microsoft { tenant, authority } => Some(format!(
                "{}/{tenant}/oauth2/v2.0/devicecode",
                authority.trim_end_matches('/')
            )),
            Provider::Google => Some(GOOGLE_DEVICE_URL.to_string()),
            Provider::Generic {
                device_authorization_url,
                ..
            } => device_authorization_url.clone(),
        }
    }
}

/// How access tokens are obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Delegated: a refresh token bootstrapped by `login`, rotated on every use.
    RefreshToken,
    /// An application token (Exchange service principal).
    ClientCredentials,
    /// Another tool keeps an access token fresh in this file.
    TokenFile { path: PathBuf },
    /// A Google Workspace service account with domain-wide delegation: per mailbox, a JWT
    /// signed with the key of `key_file` (the JSON key Google issues) names the mailbox as
    /// `sub` and is exchanged with the JWT bearer grant (RFC 7523 §2.1) at the key's
    /// `token_uri`. One access token per mailbox.
    ServiceAccount { key_file: PathBuf },
}

impl Grant {
    /// The metrics label of the token requests this grant makes (`None`: it makes none).
    pub fn kind(&self) -> Option<GrantKind> {
        match self {
            Grant::RefreshToken => Some(GrantKind::RefreshToken),
            Grant::ClientCredentials => Some(GrantKind::ClientCredentials),
            Grant::TokenFile { .. } => None,
            Grant::ServiceAccount { .. } => Some(GrantKind::JwtBearer),
        }
    }

    /// Whether each mailbox (the token's subject) gets its own access token.
    pub fn per_subject(&self) -> bool {
        matches!(self, Grant::ServiceAccount { .. })
    }
}

/// The contract's `grant` label of `mail_oauth_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    RefreshToken,
    ClientCredentials,
    DeviceCode,
    /// RFC 7523 §2.1 (`urn:ietf:params:oauth:grant-type:jwt-bearer`): service accounts.
    JwtBearer,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::DeviceCode => "device_code",
            GrantKind::JwtBearer => "jwt_bearer",
        }
    }
}

impl fmt::Display for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a client secret is read from (never inline in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// How the client proves who it is at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// A public client (device code / refresh token of a native app).
    None,
    Secret(SecretSource),
    /// A JWT client assertion signed with this certificate's private key (RS256).
    Certificate {
        certificate_file: PathBuf,
        private_key_file: PathBuf,
    },
    /// Workload identity federation: a JWT another issuer keeps fresh in this file (the
    /// Kubernetes service account token Azure Workload Identity projects,
    /// `AZURE_FEDERATED_TOKEN_FILE`), re-read for every request because it rotates, and
    /// sent as the client assertion (RFC 7523 §2.2). No secret at all.
    AssertionFile(PathBuf),
}

/// One configured OAuth client + grant; several mailboxes may share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The configured name: the `credential` metrics label and the state file's key.
    pub name: String,
    pub provider: Provider,
    pub client_id: String,
    pub grant: Grant,
    pub client_auth: ClientAuth,
    /// The expiry date the config declares for the client secret (`client_secret_expires`).
    pub client_secret_expires: Option<SystemTime>,
    /// Resolved scopes, in request order.
    pub scopes: Vec<String>,
    /// What to read from Microsoft Graph with this credential (`graph:`), if anything.
    pub graph: Option<crate::graph::GraphSettings>,
}

/// The scopes a credential requests when the config names none.
///
/// Microsoft delegated: one scope per configured protocol plus `offline_access` (without it
/// no refresh token comes back); Microsoft client credentials: Exchange's `.default`;
/// Google: full mail access (the only scope Gmail's IMAP/POP/SMTP accept); generic: none,
/// the config must name them.
pub fn default_scopes(provider: &Provider, grant: &Grant, protocols: &[Protocol]) -> Vec<String> {
    match (provider, grant) {
        (_, Grant::TokenFile { .. }) => Vec::new(),
        (Provider::Microsoft { .. }, Grant::ClientCredentials) => {
            vec![MICROSOFT_APP_SCOPE.to_string()]
        }
        (Provider::Microsoft { .. }, Grant::RefreshToken) => {
            let mut scopes: Vec<String> = Protocol::ALL
                .iter()
                .filter(|p| protocols.contains(p))
                .map(|p| {
                    match p {
                        Protocol::Imap => "https://outlook.office.com/IMAP.AccessAsUser.All",
                        Protocol::Pop3 => "https://outlook.office.com/POP.AccessAsUser.All",
                        Protocol::Smtp => "https://outlook.office.com/SMTP.Send",
                    }
                    .to_string()
                })
                .collect();
            scopes.push("offline_access".to_string());
            scopes
        }
        // Service accounts are Google's (the config refuses them elsewhere).
        (Provider::Google, _) | (_, Grant::ServiceAccount { .. }) => {
            vec![GOOGLE_MAIL_SCOPE.to_string()]
        }
        (Provider::Generic { .. }, _) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_endpoints_follow_authority_and_tenant() {
        let p = Provider::Microsoft {
            tenant: "contoso.onmicrosoft.com".into(),
            authority: "https://login.microsoftonline.us/".into(),
        };
        assert_eq!(
            p.token_url(),
            "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            p.device_authorization_url().unwrap(),
            "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
        );
        assert_eq!(
            Provider::microsoft("t").token_url(),
            "https://login.microsoftonline.com/t/oauth2/v2.0/token"
        );
        assert_eq!(Provider::Google.token_url(), GOOGLE_TOKEN_URL);
    }

    #[test]
    fn scopes_for_exactly_the_configured_protocols() {
        let ms = Provider::microsoft("t");
        assert_eq!(
            default_scopes(&ms, &Grant::RefreshToken, &[Protocol::Smtp, Protocol::Imap]),
            vec![
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "https://outlook.office.com/SMTP.Send",
                "offline_access"
            ]
        );
        assert_eq!(
            default_scopes(&ms, &Grant::RefreshToken, &[Protocol::Pop3]),
            vec![
                "https://outlook.office.com/POP.AccessAsUser.All",
                "offline_access"
            ]
        );
        assert_eq!(
            default_scopes(&ms, &Grant::ClientCredentials, &Protocol::ALL),
            vec![MICROSOFT_APP_SCOPE]
        );
        assert_eq!(
            default_scopes(&Provider::Google, &Grant::RefreshToken, &[Protocol::Imap]),
            vec![GOOGLE_MAIL_SCOPE]
        );
        let generic = Provider::Generic {
            token_url: "https://idp/token".into(),
            device_authorization_url: None,
        };
        assert!(default_scopes(&generic, &Grant::RefreshToken, &Protocol::ALL).is_empty());
    }
}
