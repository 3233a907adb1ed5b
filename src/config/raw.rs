//! The YAML file as written: serde structs in the contract's shape, nothing validated yet.

use crate::protocol::{Mechanism, Protocol, TlsMode};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub tls: Option<RawTls>,
    pub defaults: Option<RawDefaults>,
    pub scheduler: Option<RawScheduler>,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub mailboxes: BTreeMap<String, RawMailbox>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub mechanism: Option<Mechanism>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub max_concurrent_probes: Option<usize>,
    pub startup_spread: Option<String>,
    pub jitter: Option<String>,
    pub shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Microsoft,
    Google,
    Generic,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawGrant {
    ClientCredentials,
    RefreshToken,
    ServiceAccount,
    TokenFile,
}

impl RawGrant {
    pub fn as_str(self) -> &'static str {
        match self {
            RawGrant::ClientCredentials => "client_credentials",
            RawGrant::RefreshToken => "refresh_token",
            RawGrant::TokenFile => "token_file",
            RawGrant::ServiceAccount => "service_account",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub provider: Option<ProviderKind>,
    pub tenant: Option<String>,
    pub authority: Option<String>,
    pub client_id: Option<String>,
    pub grant: RawGrant,
    pub client_secret_file: Option<PathBuf>,
    pub client_secret_env: Option<String>,
    pub client_secret_expires: Option<String>,
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    pub token_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    /// Google's JSON key of a service account (grant `service_account`).
    pub service_account_key_file: Option<PathBuf>,
    /// A JWT another issuer keeps fresh (workload identity federation), sent as the
    /// client assertion of a `client_credentials` credential.
    pub client_assertion_file: Option<PathBuf>,
    /// What to read from Microsoft Graph with the credential's own app
    /// (`credential_expiry`, `service_health`); Microsoft client credentials only.
    pub graph: Option<Vec<crate::graph::GraphQuery>>,
    /// Microsoft Graph's base URL when it does not follow the authority (DoD, tests).
    pub graph_url: Option<String>,
    /// Accepted only to refuse it with a helpful message: secrets are never inline.
    pub client_secret: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMailbox {
    pub address: String,
    pub credential: String,
    pub protocols: Vec<Protocol>,
    pub mechanism: Option<Mechanism>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub imap: Option<RawEndpoint>,
    pub pop3: Option<RawEndpoint>,
    pub smtp: Option<RawEndpoint>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<TlsMode>,
    /// Local address to connect from.
    pub source_address: Option<std::net::IpAddr>,
}
