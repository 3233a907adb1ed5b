//! Configuration in two steps: the YAML file (`raw`, serde with `deny_unknown_fields`) and
//! the validated runtime [`Config`] every other module uses. Every error names the file,
//! line, column and field.

mod locate;
mod raw;

pub use raw::ProviderKind;

use crate::probe::{Limits, ProbeSpec, Target};
use crate::protocol::{Mechanism, Protocol, TlsMode};
use crate::token::{ClientAuth, Credential, Grant, Provider, SecretSource, default_scopes};
use raw::{RawConfig, RawCredential, RawEndpoint, RawGrant, RawMailbox, RawScheduler};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9925";
/// Where rotated refresh tokens are kept when the config names no `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mail-oauth-exporter";
const MICROSOFT_AUTHORITY: &str = "https://login.microsoftonline.com";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONCURRENT_PROBES: usize = 32;
const DEFAULT_JITTER: Duration = Duration::from_secs(1);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// A config error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the whole file or a file it names.
    pub line: usize,
    pub column: usize,
    /// The key path, `mailboxes.helpdesk.credential`; empty for file-level errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: a problem of the whole file (unreadable, a secret file it names).
        if self.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where one protocol of a mailbox is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub source_address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: String,
    /// Whose servers are the defaults (Exchange Online, Gmail).
    pub provider: ProviderKind,
    pub address: String,
    pub credential: String,
    pub mechanism: Mechanism,
    pub interval: Duration,
    pub timeout: Duration,
    /// One per configured protocol, in the order imap, pop3, smtp.
    pub endpoints: Vec<Endpoint>,
}

impl Mailbox {
    pub fn endpoint(&self, protocol: Protocol) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.protocol == protocol)
    }

    /// The probe of one protocol of this mailbox.
    pub fn probe_spec(&self, endpoint: &Endpoint) -> ProbeSpec {
        ProbeSpec {
            target: Target {
                protocol: endpoint.protocol,
                host: endpoint.host.clone(),
                port: endpoint.port,
                tls: endpoint.tls,
                source_address: endpoint.source_address,
            },
            user: self.address.clone(),
            mechanism: self.mechanism,
            timeout: self.timeout,
            limits: Limits::default(),
        }
    }
}

/// How probes are spread over time and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Probes running at once, over all mailboxes.
    pub max_concurrent_probes: usize,
    /// First runs are spread over this window (default: each probe's own interval), so a
    /// start or reload does not log in to every mailbox at the same second.
    pub startup_spread: Option<Duration>,
    /// Each run starts up to this much later than its slot; slots themselves never drift.
    pub jitter: Duration,
    /// On SIGTERM, in-flight probes get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            max_concurrent_probes: DEFAULT_MAX_CONCURRENT_PROBES,
            startup_spread: None,
            jitter: DEFAULT_JITTER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub file: PathBuf,
    pub listen: Option<SocketAddr>,
    pub schedule: Schedule,
    pub state_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub credentials: BTreeMap<String, Credential>,
    pub mailboxes: BTreeMap<String, Mailbox>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (the name is used in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?
        };
        Validator { path, text }.config(raw)
    }

    /// Checks what only exists outside the file: secret and token files readable,
    /// environment variables set. Returns every problem, not just the first.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let readable = |problems: &mut Vec<String>, what: &str, p: &Path| {
            if let Err(e) = std::fs::File::open(p) {
                problems.push(format!("{what} {}: {e}", p.display()));
            }
        };
        if let Some(ca) = &self.ca_file {
            readable(&mut problems, "tls.ca_file", ca);
        }
        for c in self.credentials.values() {
            let name = &c.name;
            match &c.client_auth {
                ClientAuth::Secret(SecretSource::File(p)) => readable(
                    &mut problems,
                    &format!("credential {name}: client_secret_file"),
                    p,
                ),
                ClientAuth::Secret(SecretSource::Env(v)) if std::env::var_os(v).is_none() => {
                    problems.push(format!(
                        "credential {name}: client_secret_env {v} is not set"
                    ))
                }
                ClientAuth::Certificate {
                    certificate_file,
                    private_key_file,
                } => {
                    for (what, p) in [
                        ("certificate_file", certificate_file),
                        ("private_key_file", private_key_file),
                    ] {
                        readable(&mut problems, &format!("credential {name}: {what}"), p);
                    }
                }
                _ => {}
            }
            // Read and parsed as a token request would: a key file that is not Google's JSON
            // key, or an assertion file that is not a JWT, fails here, not at 3 a.m.
            if let Grant::ServiceAccount { key_file } = &c.grant
                && let Err(e) = crate::token::service_account::ServiceAccountKey::load(key_file)
            {
                problems.push(format!("credential {name}: service_account_key_file {e}"));
            }
            if let ClientAuth::AssertionFile(p) = &c.client_auth
                && let Err(e) = crate::token::service_account::read_assertion_file(p)
            {
                problems.push(format!("credential {name}: client_assertion_file {e}"));
            }
            if let Grant::TokenFile { path } = &c.grant {
                readable(
                    &mut problems,
                    &format!("credential {name}: token_file"),
                    path,
                );
            }
        }
        problems
    }
}

/// serde_yaml's error as file:line:column, key path and message (shared by every YAML
/// file the exporter reads: the config and the web config).
pub(crate) fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    // serde_yaml prefixes the key path ("mailboxes.helpdesk: unknown field ...") and
    // appends the position, which we print in front instead.
    let msg = e.to_string();
    let msg = msg
        .rsplit_once(" at line ")
        .map(|(m, _)| m.to_owned())
        .unwrap_or(msg);
    let (field, message) = match msg.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_owned(), m.to_owned()),
        _ => (String::new(), msg),
    };
    ConfigError {
        file: path.to_owned(),
        line,
        column,
        field,
        message,
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

/// An error found after parsing, at the key path `field` of `text` (read from `path`);
/// an absent key is reported where its nearest written ancestor is.
pub(crate) fn located(
    path: &Path,
    text: &str,
    field: &[&str],
    message: impl Into<String>,
) -> ConfigError {
    let (line, column) = locate::locate(text, field);
    ConfigError {
        file: path.to_owned(),
        line,
        column,
        field: field.join("."),
        message: message.into(),
    }
}

impl Validator<'_> {
    fn err(&self, field: &[&str], message: impl Into<String>) -> ConfigError {
        located(self.path, self.text, field, message)
    }

    fn duration(&self, field: &[&str], v: Option<&str>) -> Result<Option<Duration>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                field,
                format!("`{v}` is not a duration like 30s, 5m, 1h: {e}"),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(field, "must be more than zero"));
        }
        Ok(Some(d))
    }

    fn schedule(&self, raw: RawScheduler) -> Result<Schedule, ConfigError> {
        let d = Schedule::default();
        let at = |k| ["scheduler", k];
        let max_concurrent_probes = match raw.max_concurrent_probes {
            Some(0) => return Err(self.err(&at("max_concurrent_probes"), "must be at least 1")),
            Some(n) => n,
            None => d.max_concurrent_probes,
        };
        // A zero jitter is allowed (strictly periodic probes), unlike other durations.
        let jitter = match raw.jitter.as_deref() {
            Some("0") | Some("0s") => Duration::ZERO,
            j => self.duration(&at("jitter"), j)?.unwrap_or(d.jitter),
        };
        Ok(Schedule {
            max_concurrent_probes,
            startup_spread: self.duration(&at("startup_spread"), raw.startup_spread.as_deref())?,
            jitter,
            shutdown_grace: self
                .duration(&at("shutdown_grace"), raw.shutdown_grace.as_deref())?
                .unwrap_or(d.shutdown_grace),
        })
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = match &raw.listen {
            None => None,
            Some(l) => Some(l.parse().map_err(|_| {
                self.err(
                    &["listen"],
                    format!("`{l}` is not an address like 0.0.0.0:9925"),
                )
            })?),
        };
        let defaults = raw.defaults.unwrap_or_default();
        let interval = self
            .duration(&["defaults", "interval"], defaults.interval.as_deref())?
            .unwrap_or(DEFAULT_INTERVAL);
        let timeout = self
            .duration(&["defaults", "timeout"], defaults.timeout.as_deref())?
            .unwrap_or(DEFAULT_TIMEOUT);
        let mechanism = defaults.mechanism.unwrap_or_default();
        let schedule = self.schedule(raw.scheduler.unwrap_or_default())?;

        let mut credentials = BTreeMap::new();
        let mut kinds = BTreeMap::new();
        let mut explicit_scopes = BTreeMap::new();
        for (name, c) in raw.credentials {
            explicit_scopes.insert(name.clone(), c.scopes.clone());
            kinds.insert(name.clone(), c.provider.unwrap_or(ProviderKind::Microsoft));
            let cred = self.credential(&name, c)?;
            credentials.insert(name, cred);
        }
        let mut mailboxes = BTreeMap::new();
        for (name, m) in raw.mailboxes {
            let mb = self.mailbox(&name, m, &kinds, interval, timeout, mechanism)?;
            mailboxes.insert(name, mb);
        }
        // Scopes follow the protocols of the mailboxes that use a credential: Microsoft
        // delegated tokens carry exactly those permissions (plus offline_access).
        for (name, cred) in credentials.iter_mut() {
            cred.scopes = match explicit_scopes.remove(name).flatten() {
                Some(scopes) => scopes,
                None => {
                    let mut protocols: Vec<Protocol> = mailboxes
                        .values()
                        .filter(|m: &&Mailbox| &m.credential == name)
                        .flat_map(|m| m.endpoints.iter().map(|e| e.protocol))
                        .collect();
                    protocols.sort();
                    protocols.dedup();
                    default_scopes(&cred.provider, &cred.grant, &protocols)
                }
            };
        }
        Ok(Config {
            file: self.path.to_owned(),
            listen,
            schedule,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            ca_file: raw.tls.and_then(|t| t.ca_file),
            credentials,
            mailboxes,
        })
    }

    fn credential(&self, name: &str, c: RawCredential) -> Result<Credential, ConfigError> {
        let at = |k: &'static str| ["credentials", name, k];
        if c.client_secret.is_some() {
            return Err(self.err(
                &at("client_secret"),
                "secrets are never written in the config: use client_secret_file or client_secret_env",
            ));
        }
        let client_secret = match (c.client_secret_file.clone(), c.client_secret_env.clone()) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    &at("client_secret_env"),
                    "give client_secret_file or client_secret_env, not both",
                ));
            }
            (Some(f), None) => Some(SecretSource::File(f)),
            (None, Some(v)) => Some(SecretSource::Env(v)),
            (None, None) => None,
        };
        let client_secret_expires = match &c.client_secret_expires {
            None => None,
            Some(d) => Some(parse_date(d).ok_or_else(|| {
                self.err(
                    &at("client_secret_expires"),
                    format!("`{d}` is not a date like 2027-03-01"),
                )
            })?),
        };
        let provider = c.provider.unwrap_or(ProviderKind::Microsoft);
        let needs = |k: &'static str, v: &Option<String>| -> Result<(), ConfigError> {
            match v {
                Some(s) if !s.trim().is_empty() => Ok(()),
                _ => Err(self.err(
                    &at(k),
                    format!("`{k}` is required for grant {}", c.grant.as_str()),
                )),
            }
        };
        if c.grant != RawGrant::ServiceAccount && c.service_account_key_file.is_some() {
            return Err(self.err(
                &at("service_account_key_file"),
                "service_account_key_file is only for grant service_account",
            ));
        }
        if c.client_assertion_file.is_some() {
            if c.grant != RawGrant::ClientCredentials {
                return Err(self.err(
                    &at("client_assertion_file"),
                    "client_assertion_file is only for grant client_credentials",
                ));
            }
            if provider == ProviderKind::Google {
                return Err(self.err(
                    &at("client_assertion_file"),
                    "Google takes no client assertion: use grant service_account",
                ));
            }
            let other = [
                ("client_secret_file", c.client_secret_file.is_some()),
                ("client_secret_env", c.client_secret_env.is_some()),
                ("certificate_file", c.certificate_file.is_some()),
            ];
            if let Some((k, _)) = other.iter().find(|(_, given)| *given) {
                return Err(self.err(
                    &at("client_assertion_file"),
                    format!("give client_assertion_file or {k}, not both"),
                ));
            }
        }
        match c.grant {
            RawGrant::TokenFile => {
                if c.token_file.is_none() {
                    return Err(self.err(&at("grant"), "grant token_file needs `token_file`"));
                }
            }
            RawGrant::ServiceAccount => {
                if c.provider != Some(ProviderKind::Google) {
                    return Err(self.err(
                        &at("provider"),
                        "grant service_account is Google's: set `provider: google`",
                    ));
                }
                if c.service_account_key_file.is_none() {
                    return Err(self.err(
                        &at("grant"),
                        "grant service_account needs `service_account_key_file` (the JSON key Google issues)",
                    ));
                }
                // The key file names the client, its key and its token endpoint.
                for (k, given) in [
                    ("client_id", c.client_id.is_some()),
                    ("client_secret_file", c.client_secret_file.is_some()),
                    ("client_secret_env", c.client_secret_env.is_some()),
                    ("certificate_file", c.certificate_file.is_some()),
                    ("private_key_file", c.private_key_file.is_some()),
                    ("token_url", c.token_url.is_some()),
                    (
                        "device_authorization_url",
                        c.device_authorization_url.is_some(),
                    ),
                    ("token_file", c.token_file.is_some()),
                ] {
                    if given {
                        return Err(self.err(
                            &at(k),
                            format!("{k} does not apply to grant service_account: the key file names the client, its key and its token endpoint"),
                        ));
                    }
                }
            }
            RawGrant::ClientCredentials | RawGrant::RefreshToken => {
                if c.provider.is_none() {
                    return Err(self.err(
                        &at("grant"),
                        "`provider` is required (microsoft, google or generic)",
                    ));
                }
                needs("client_id", &c.client_id)?;
                match provider {
                    ProviderKind::Microsoft => needs("tenant", &c.tenant)?,
                    ProviderKind::Generic => needs("token_url", &c.token_url)?,
                    ProviderKind::Google => {}
                }
                if c.grant == RawGrant::ClientCredentials
                    && client_secret.is_none()
                    && c.certificate_file.is_none()
                    && c.client_assertion_file.is_none()
                {
                    return Err(self.err(
                        &at("grant"),
                        "client_credentials needs client_secret_file, client_secret_env, certificate_file + private_key_file, or client_assertion_file",
                    ));
                }
                if c.certificate_file.is_some() != c.private_key_file.is_some() {
                    return Err(self.err(
                        &at("certificate_file"),
                        "certificate_file and private_key_file go together",
                    ));
                }
                if c.token_file.is_some() {
                    return Err(
                        self.err(&at("token_file"), "token_file is only for grant token_file")
                    );
                }
            }
        }
        for (k, v) in [
            ("authority", &c.authority),
            ("token_url", &c.token_url),
            ("device_authorization_url", &c.device_authorization_url),
        ] {
            // Plain http only to loopback (the demo's and tests' emulated provider).
            if let Some(u) = v
                && !(u.starts_with("https://")
                    || u.starts_with("http://127.")
                    || u.starts_with("http://localhost"))
            {
                return Err(self.err(&at(k), format!("`{u}` must be an https:// URL")));
            }
        }
        let provider = match provider {
            ProviderKind::Microsoft => Provider::Microsoft {
                tenant: c.tenant.clone().unwrap_or_default(),
                authority: c
                    .authority
                    .clone()
                    .unwrap_or_else(|| MICROSOFT_AUTHORITY.to_owned()),
            },
            ProviderKind::Google => Provider::Google,
            ProviderKind::Generic => Provider::Generic {
                token_url: c.token_url.clone().unwrap_or_default(),
                device_authorization_url: c.device_authorization_url.clone(),
            },
        };
        let grant = match c.grant {
            RawGrant::RefreshToken => Grant::RefreshToken,
            RawGrant::ClientCredentials => Grant::ClientCredentials,
            RawGrant::TokenFile => Grant::TokenFile {
                path: c.token_file.clone().expect("checked above"),
            },
            RawGrant::ServiceAccount => Grant::ServiceAccount {
                key_file: c.service_account_key_file.clone().expect("checked above"),
            },
        };
        let client_auth = match (client_secret, c.certificate_file, c.private_key_file) {
            (Some(s), _, _) => ClientAuth::Secret(s),
            (None, Some(certificate_file), Some(private_key_file)) => ClientAuth::Certificate {
                certificate_file,
                private_key_file,
            },
            _ => match c.client_assertion_file {
                Some(file) => ClientAuth::AssertionFile(file),
                None => ClientAuth::None,
            },
        };
        Ok(Credential {
            name: name.to_owned(),
            provider,
            client_id: c.client_id.unwrap_or_default(),
            grant,
            client_auth,
            client_secret_expires,
            // Filled in once the mailboxes using this credential are known.
            scopes: Vec::new(),
        })
    }

    fn mailbox(
        &self,
        name: &str,
        m: RawMailbox,
        credentials: &BTreeMap<String, ProviderKind>,
        interval: Duration,
        timeout: Duration,
        mechanism: Mechanism,
    ) -> Result<Mailbox, ConfigError> {
        let at = |k: &'static str| ["mailboxes", name, k];
        let Some(provider) = credentials.get(&m.credential).copied() else {
            let known: Vec<&str> = credentials.keys().map(String::as_str).collect();
            return Err(self.err(
                &at("credential"),
                format!(
                    "no credential named `{}` (configured: {})",
                    m.credential,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        if !m.address.contains('@') {
            return Err(self.err(
                &at("address"),
                format!("`{}` is not a mail address", m.address),
            ));
        }
        if m.protocols.is_empty() {
            return Err(self.err(&at("protocols"), "list at least one of imap, pop3, smtp"));
        }
        for (i, p) in m.protocols.iter().enumerate() {
            if m.protocols[..i].contains(p) {
                return Err(self.err(&at("protocols"), format!("{p} is listed twice")));
            }
        }
        let interval = self
            .duration(&at("interval"), m.interval.as_deref())?
            .unwrap_or(interval);
        let timeout = self
            .duration(&at("timeout"), m.timeout.as_deref())?
            .unwrap_or(timeout);
        if timeout > interval {
            return Err(self.err(
                &at("timeout"),
                format!("timeout {timeout:?} is longer than the interval {interval:?}"),
            ));
        }
        let mut endpoints = Vec::new();
        for p in Protocol::ALL {
            let raw = match p {
                Protocol::Imap => &m.imap,
                Protocol::Pop3 => &m.pop3,
                Protocol::Smtp => &m.smtp,
            };
            if !m.protocols.contains(&p) {
                if raw.is_some() {
                    return Err(self.err(
                        &["mailboxes", name, p.as_str()],
                        format!("{p} is configured but not listed in `protocols`"),
                    ));
                }
                continue;
            }
            endpoints.push(self.endpoint(name, p, raw.clone().unwrap_or_default(), provider)?);
        }
        Ok(Mailbox {
            name: name.to_owned(),
            provider,
            address: m.address,
            credential: m.credential,
            mechanism: m.mechanism.unwrap_or(mechanism),
            interval,
            timeout,
            endpoints,
        })
    }

    fn endpoint(
        &self,
        mailbox: &str,
        p: Protocol,
        e: RawEndpoint,
        provider: ProviderKind,
    ) -> Result<Endpoint, ConfigError> {
        let (default_host, default_tls) = provider_server(provider, p);
        let tls = e.tls.unwrap_or(default_tls);
        let host = match (e.host, default_host) {
            (Some(h), _) if !h.trim().is_empty() => h,
            (_, Some(h)) => h.to_owned(),
            _ => {
                return Err(self.err(
                    &["mailboxes", mailbox, p.as_str(), "host"],
                    "`host` is required: the generic provider has no default servers",
                ));
            }
        };
        Ok(Endpoint {
            protocol: p,
            host,
            port: e.port.unwrap_or_else(|| default_port(p, tls)),
            tls,
            source_address: e.source_address,
        })
    }
}

/// The provider's own servers: Exchange Online, Gmail.
fn provider_server(provider: ProviderKind, p: Protocol) -> (Option<&'static str>, TlsMode) {
    let host = match (provider, p) {
        (ProviderKind::Microsoft, Protocol::Imap | Protocol::Pop3) => Some("outlook.office365.com"),
        (ProviderKind::Microsoft, Protocol::Smtp) => Some("smtp.office365.com"),
        (ProviderKind::Google, Protocol::Imap) => Some("imap.gmail.com"),
        (ProviderKind::Google, Protocol::Pop3) => Some("pop.gmail.com"),
        (ProviderKind::Google, Protocol::Smtp) => Some("smtp.gmail.com"),
        (ProviderKind::Generic, _) => None,
    };
    let tls = match p {
        Protocol::Smtp => TlsMode::Starttls,
        _ => TlsMode::Implicit,
    };
    (host, tls)
}

fn default_port(p: Protocol, tls: TlsMode) -> u16 {
    match (p, tls) {
        (Protocol::Imap, TlsMode::Implicit) => 993,
        (Protocol::Imap, TlsMode::Starttls) => 143,
        (Protocol::Pop3, TlsMode::Implicit) => 995,
        (Protocol::Pop3, TlsMode::Starttls) => 110,
        (Protocol::Smtp, TlsMode::Implicit) => 465,
        (Protocol::Smtp, TlsMode::Starttls) => 587,
    }
}

/// `2027-03-01` (midnight UTC) or a full RFC 3339 timestamp.
fn parse_date(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(&format!("{s} 00:00:00"))
        .or_else(|_| humantime::parse_rfc3339_weak(s))
        .ok()
}

#[cfg(test)]
mod tests;
