//! Configuration in two steps: the YAML file (`raw`, serde with `deny_unknown_fields`) and
//! the validated runtime [`Config`] every other module uses. Every error names the file,
//! line, column and field.

mod locate;
mod raw;
pub(crate) mod yaml;

pub use raw::ProviderKind;

use crate::fsread::{self, FileKind};
use crate::probe::{Limits, ProbeSpec, Target};
use crate::protocol::{Mechanism, Protocol, TlsMode};
use crate::token::{ClientAuth, Credential, Grant, Provider, SecretSource, default_scopes};
use raw::{RawConfig, RawCredential, RawEndpoint, RawGrant, RawMailbox, RawScheduler};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The shortest probe interval: one login per 5 s per mailbox and protocol. Faster is a
/// load on the provider (`interval: 1ms` was 830 logins a second), not monitoring.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The longest probe interval, and of `scheduler.startup_spread`: a day.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The longest `scheduler.shutdown_grace`: an hour.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
/// The most `scheduler.max_concurrent_probes`: each probe holds a socket, and more than
/// this would run out of file descriptors before it helped.
pub const MAX_CONCURRENT_PROBES: usize = 10_000;

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
    /// Shared (`Arc`) with the scheduler's jobs: 10,000 mailboxes on one credential hold
    /// one copy of it, not 10,000.
    pub credentials: BTreeMap<String, Arc<Credential>>,
    pub mailboxes: BTreeMap<String, Arc<Mailbox>>,
}

impl Config {
    /// Reads and validates `path`: a regular file of at most 16 MiB (never a FIFO or
    /// device: [`crate::fsread`]), UTF-8 with an optional byte order mark. Blocking: from
    /// async code, call it on the blocking pool.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = yaml::read(path, FileKind::Config)?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (the name is used in errors). An empty
    /// document (nothing but whitespace and comments) and a config without mailboxes are
    /// errors: either would silently switch monitoring off.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let Some(raw): Option<RawConfig> = yaml::document(path, text)? else {
            return Err(ConfigError {
                file: path.to_owned(),
                line: 1,
                column: 1,
                field: String::new(),
                message: "the config is empty (nothing but whitespace and comments); it must name at least one mailbox".into(),
            });
        };
        let text = yaml::without_bom(text);
        Validator { path, text }.config(raw)
    }

    /// Checks what only exists outside the file, by reading and parsing it as a probe
    /// will: client secrets (files or variables: not empty, within 64 KiB), certificates
    /// and keys (PEM that loads, a key that signs), token files, the CA file (PEM
    /// certificates), and `state_dir` (a writable directory, or one that can be created)
    /// when a credential keeps refresh tokens there. Returns every problem, not just the
    /// first; never blocks on a FIFO (see [`crate::fsread`]), but does read files, so
    /// async callers run it on the blocking pool.
    pub fn check_files(&self) -> Vec<String> {
        use crate::token::{assertion::ClientCertificate, grant, token_file};
        let mut problems = Vec::new();
        if let Some(ca) = &self.ca_file
            && let Err(e) = check_ca_file(ca)
        {
            problems.push(format!("tls.ca_file: {e}"));
        }
        for c in self.credentials.values() {
            let name = &c.name;
            match &c.client_auth {
                ClientAuth::Secret(source) => {
                    if let Err(e) = grant::read_secret(source) {
                        problems.push(format!("credential {name}: {e}"));
                    }
                }
                ClientAuth::Certificate {
                    certificate_file,
                    private_key_file,
                } => {
                    if let Err(e) = ClientCertificate::load(certificate_file, private_key_file) {
                        problems.push(format!(
                            "credential {name}: certificate_file/private_key_file: {e}"
                        ));
                    }
                }
                ClientAuth::None | ClientAuth::AssertionFile(_) => {}
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
            if let Grant::TokenFile { path } = &c.grant
                && let Err(e) = token_file::read_token_file(path)
            {
                problems.push(format!("credential {name}: token_file: {e}"));
            }
        }
        if self
            .credentials
            .values()
            .any(|c| c.grant == Grant::RefreshToken)
            && let Err(e) = check_state_dir(&self.state_dir)
        {
            problems.push(format!("state_dir {}: {e}", self.state_dir.display()));
        }
        problems
    }
}

/// The CA file holds PEM certificates, and only loadable ones.
fn check_ca_file(ca: &Path) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = fsread::read(ca, FileKind::Pem).map_err(|e| e.to_string())?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        x509_parser::parse_x509_certificate(&cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("{}: no PEM certificate in it", ca.display()));
    }
    Ok(())
}

/// `dir` is a directory we can write to, or does not exist yet and its nearest existing
/// ancestor is one (the token store creates it at its first save).
fn check_state_dir(dir: &Path) -> Result<(), String> {
    let mut d = dir;
    loop {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", d.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => d = p,
                _ => {
                    d = Path::new(".");
                    break;
                }
            },
            Err(e) => return Err(format!("{}: {e}", d.display())),
        }
    }
    // A real write: permissions, a read-only mount or a full disk all show here.
    tempfile::tempfile_in(d)
        .map(drop)
        .map_err(|e| format!("cannot write in {}: {e}", d.display()))
}

/// What a mailbox inherits: `defaults.*` and the scheduler's jitter.
#[derive(Clone, Copy)]
struct MailboxDefaults {
    interval: Duration,
    timeout: Duration,
    mechanism: Mechanism,
    jitter: Duration,
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

    /// A credential or mailbox name: a label value and a page heading, so not empty and
    /// without control characters.
    fn name(&self, parent: &[&str], what: &str, name: &str) -> Result<(), ConfigError> {
        if name.trim().is_empty() {
            return Err(self.err(parent, format!("a {what} name cannot be empty")));
        }
        if name.chars().any(char::is_control) {
            return Err(self.err(
                parent,
                format!(
                    "{what} name `{}` holds control characters",
                    name.escape_debug()
                ),
            ));
        }
        Ok(())
    }

    fn path_field(&self, field: &[&str], p: &Path) -> Result<(), ConfigError> {
        if p.as_os_str().is_empty() {
            return Err(self.err(field, "a file name cannot be empty"));
        }
        Ok(())
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

    /// A duration within `[min, max]` (`min` > 0), so nothing computed from it later
    /// (deadlines, slots) can overflow.
    fn bounded(
        &self,
        field: &[&str],
        v: Option<&str>,
        min: Duration,
        max: Duration,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(d) = self.duration(field, v)? else {
            return Ok(None);
        };
        if d < min {
            return Err(self.err(
                field,
                format!(
                    "`{}` is shorter than the minimum, {}",
                    v.unwrap_or_default(),
                    fmt_duration(min)
                ),
            ));
        }
        if d > max {
            return Err(self.err(
                field,
                format!(
                    "`{}` is longer than the maximum, {}",
                    v.unwrap_or_default(),
                    fmt_duration(max)
                ),
            ));
        }
        Ok(Some(d))
    }

    fn schedule(&self, raw: RawScheduler) -> Result<Schedule, ConfigError> {
        let d = Schedule::default();
        let at = |k| ["scheduler", k];
        let max_concurrent_probes = match raw.max_concurrent_probes {
            Some(0) => return Err(self.err(&at("max_concurrent_probes"), "must be at least 1")),
            Some(n) if n > MAX_CONCURRENT_PROBES => {
                return Err(self.err(
                    &at("max_concurrent_probes"),
                    format!("{n} is more than the maximum, {MAX_CONCURRENT_PROBES}"),
                ));
            }
            Some(n) => n,
            None => d.max_concurrent_probes,
        };
        let ns = Duration::from_nanos(1);
        // A zero jitter is allowed (strictly periodic probes), unlike other durations.
        let jitter = match raw.jitter.as_deref().map(str::trim) {
            Some("0") | Some("0s") => Duration::ZERO,
            _ => self
                .bounded(&at("jitter"), raw.jitter.as_deref(), ns, MAX_INTERVAL)?
                .unwrap_or(d.jitter),
        };
        Ok(Schedule {
            max_concurrent_probes,
            startup_spread: self.bounded(
                &at("startup_spread"),
                raw.startup_spread.as_deref(),
                ns,
                MAX_INTERVAL,
            )?,
            jitter,
            shutdown_grace: self
                .bounded(
                    &at("shutdown_grace"),
                    raw.shutdown_grace.as_deref(),
                    ns,
                    MAX_SHUTDOWN_GRACE,
                )?
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
            .bounded(
                &["defaults", "interval"],
                defaults.interval.as_deref(),
                MIN_INTERVAL,
                MAX_INTERVAL,
            )?
            .unwrap_or(DEFAULT_INTERVAL);
        let timeout = self
            .bounded(
                &["defaults", "timeout"],
                defaults.timeout.as_deref(),
                Duration::from_nanos(1),
                MAX_INTERVAL,
            )?
            .unwrap_or(DEFAULT_TIMEOUT);
        let mechanism = defaults.mechanism.unwrap_or_default();
        let schedule = self.schedule(raw.scheduler.unwrap_or_default())?;
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        self.path_field(&["state_dir"], &state_dir)?;
        let ca_file = raw.tls.and_then(|t| t.ca_file);
        if let Some(f) = &ca_file {
            self.path_field(&["tls", "ca_file"], f)?;
        }

        let mut credentials = BTreeMap::new();
        let mut kinds = BTreeMap::new();
        let mut explicit_scopes = BTreeMap::new();
        for (name, c) in raw.credentials {
            self.name(&["credentials"], "credential", &name)?;
            explicit_scopes.insert(name.clone(), c.scopes.clone());
            kinds.insert(name.clone(), c.provider.unwrap_or(ProviderKind::Microsoft));
            let cred = self.credential(&name, c)?;
            credentials.insert(name, cred);
        }
        if raw.mailboxes.is_empty() {
            return Err(self.err(
                &["mailboxes"],
                "no mailbox is configured: a config that probes nothing would silently switch monitoring off",
            ));
        }
        let mut mailboxes = BTreeMap::new();
        for (name, m) in raw.mailboxes {
            self.name(&["mailboxes"], "mailbox", &name)?;
            let defaults = MailboxDefaults {
                interval,
                timeout,
                mechanism,
                jitter: schedule.jitter,
            };
            let mb = self.mailbox(&name, m, &kinds, &defaults)?;
            mailboxes.insert(name, Arc::new(mb));
        }
        // The first runs are spread over `startup_spread`: longer than an interval, and a
        // mailbox's first result could come later than its interval promises.
        if let Some(spread) = schedule.startup_spread
            && let Some(m) = mailboxes.values().find(|m| m.interval < spread)
        {
            return Err(self.err(
                &["scheduler", "startup_spread"],
                format!(
                    "{} is longer than the interval of mailbox `{}` ({}): its first probe could come later than one interval after a start",
                    fmt_duration(spread),
                    m.name.escape_debug(),
                    fmt_duration(m.interval)
                ),
            ));
        }
        // Scopes follow the protocols of the mailboxes that use a credential: Microsoft
        // delegated tokens carry exactly those permissions (plus offline_access).
        for (name, cred) in credentials.iter_mut() {
            cred.scopes = match explicit_scopes.remove(name).flatten() {
                Some(scopes) => scopes,
                None => {
                    let mut protocols: Vec<Protocol> = mailboxes
                        .values()
                        .filter(|m| &m.credential == name)
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
            state_dir,
            ca_file,
            credentials: credentials
                .into_iter()
                .map(|(name, c)| (name, Arc::new(c)))
                .collect(),
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
        for (k, v) in [
            ("client_secret_file", &c.client_secret_file),
            ("certificate_file", &c.certificate_file),
            ("private_key_file", &c.private_key_file),
            ("token_file", &c.token_file),
        ] {
            if let Some(p) = v {
                self.path_field(&at(k), p)?;
            }
        }
        if let Some(v) = &c.client_secret_env
            && (v.is_empty() || v.contains(['=', '\0']) || v.chars().any(char::is_whitespace))
        {
            return Err(self.err(
                &at("client_secret_env"),
                format!("`{}` is not an environment variable name", v.escape_debug()),
            ));
        }
        for (k, v) in [("client_id", &c.client_id), ("tenant", &c.tenant)] {
            if let Some(v) = v
                && v.chars().any(char::is_control)
            {
                return Err(self.err(
                    &at(k),
                    format!("`{}` holds control characters", v.escape_debug()),
                ));
            }
        }
        // The tenant goes into the token URL's path: a GUID, a domain, or `common`.
        if let Some(t) = &c.tenant
            && !t
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_'))
        {
            return Err(self.err(
                &at("tenant"),
                format!(
                    "`{}` is not a tenant ID or domain (letters, digits, `.`, `-`, `_`)",
                    t.escape_debug()
                ),
            ));
        }
        if let Some(scopes) = &c.scopes
            && let Some(bad) = scopes
                .iter()
                .find(|s| s.is_empty() || s.chars().any(|ch| ch.is_whitespace() || ch.is_control()))
        {
            return Err(self.err(
                &at("scopes"),
                format!(
                    "`{}` is not one scope: scopes are listed one per entry, without spaces",
                    bad.escape_debug()
                ),
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
            if let Some(u) = v {
                endpoint_url(u, k == "authority").map_err(|m| self.err(&at(k), m))?;
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
        let graph = self.graph(name, &c, &provider)?;
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
        // The URL actually requested (authority + tenant for Microsoft) obeys the same rule.
        if c.grant != RawGrant::TokenFile {
            endpoint_url(&provider.token_url(), false).map_err(|m| {
                self.err(
                    &at(if c.authority.is_some() {
                        "authority"
                    } else {
                        "token_url"
                    }),
                    m,
                )
            })?;
        }
        Ok(Credential {
            name: name.to_owned(),
            provider,
            client_id: c.client_id.unwrap_or_default(),
            grant,
            client_auth,
            client_secret_expires,
            // Filled in once the mailboxes using this credential are known.
            scopes: Vec::new(),
            graph,
        })
    }

    /// `graph:` and `graph_url:`: only on a Microsoft client-credentials credential (Graph's
    /// application permissions need an app token), each query at most once.
    fn graph(
        &self,
        name: &str,
        c: &RawCredential,
        provider: &Provider,
    ) -> Result<Option<crate::graph::GraphSettings>, ConfigError> {
        let at = |k: &'static str| ["credentials", name, k];
        let Some(queries) = &c.graph else {
            if c.graph_url.is_some() {
                return Err(self.err(
                    &at("graph_url"),
                    "graph_url needs `graph:` (the queries to run)",
                ));
            }
            return Ok(None);
        };
        let Provider::Microsoft { authority, .. } = provider else {
            return Err(self.err(
                &at("graph"),
                "graph: reads Microsoft Graph: only for `provider: microsoft`",
            ));
        };
        if c.grant != RawGrant::ClientCredentials {
            return Err(self.err(
                &at("graph"),
                "graph: needs grant client_credentials (Graph's application permissions Application.Read.All and ServiceHealth.Read.All)",
            ));
        }
        if queries.is_empty() {
            return Err(self.err(&at("graph"), "graph: lists no query: give credential_expiry, service_health or both, or leave it out"));
        }
        for (i, q) in queries.iter().enumerate() {
            if queries[..i].contains(q) {
                return Err(self.err(&at("graph"), format!("`{}` is listed twice", q.as_str())));
            }
        }
        let url = match &c.graph_url {
            Some(u) => endpoint_url(u, true)
                .map_err(|m| self.err(&at("graph_url"), m))?
                .as_str()
                .trim_end_matches('/')
                .to_owned(),
            None => crate::graph::graph_base_for_authority(authority).to_owned(),
        };
        Ok(Some(crate::graph::GraphSettings {
            queries: queries.clone(),
            scope: format!("{url}/.default"),
            url,
        }))
    }

    fn mailbox(
        &self,
        name: &str,
        m: RawMailbox,
        credentials: &BTreeMap<String, ProviderKind>,
        defaults: &MailboxDefaults,
    ) -> Result<Mailbox, ConfigError> {
        let MailboxDefaults {
            interval,
            timeout,
            mechanism,
            jitter,
        } = *defaults;
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
        if m.address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(self.err(
                &at("address"),
                format!(
                    "`{}` holds spaces or control characters",
                    m.address.escape_debug()
                ),
            ));
        }
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
            .bounded(
                &at("interval"),
                m.interval.as_deref(),
                MIN_INTERVAL,
                MAX_INTERVAL,
            )?
            .unwrap_or(interval);
        let timeout = self
            .bounded(
                &at("timeout"),
                m.timeout.as_deref(),
                Duration::from_nanos(1),
                MAX_INTERVAL,
            )?
            .unwrap_or(timeout);
        if timeout > interval {
            return Err(self.err(
                &at("timeout"),
                format!("timeout {timeout:?} is longer than the interval {interval:?}"),
            ));
        }
        // A run starts up to `jitter` after its slot and may last `timeout`: together they
        // must end before the next slot.
        if timeout + jitter > interval {
            return Err(self.err(
                &at("timeout"),
                format!(
                    "timeout {} plus scheduler.jitter {} is longer than the interval {}: a run could reach into its next slot",
                    fmt_duration(timeout),
                    fmt_duration(jitter),
                    fmt_duration(interval)
                ),
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
        let at = |k: &'static str| ["mailboxes", mailbox, p.as_str(), k];
        if let Some(h) = &e.host {
            check_host(h).map_err(|m| self.err(&at("host"), m))?;
        }
        if e.port == Some(0) {
            return Err(self.err(&at("port"), "port 0 is not a port a server listens on"));
        }
        let host = match (e.host, default_host) {
            (Some(h), _) => h,
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

/// `30s`, `5m`, `1day`: how errors print durations.
fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A token endpoint URL: `https`, or plain `http` only to this host (a loopback IP
/// literal or exactly `localhost`, as the demo's emulated provider is); never a user name
/// or password (`http://localhost@attacker.example` is a request to attacker.example).
/// An `authority` is a base: no query or fragment either.
pub fn endpoint_url(u: &str, base: bool) -> Result<url::Url, String> {
    let shown = u.escape_debug();
    let url = url::Url::parse(u).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => format!("`{shown}` must be an https:// URL"),
        e => format!("`{shown}` is not a URL: {e}"),
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{shown}` holds a user name or password (`user@`): credentials never go in a URL, and the part after `@` is the host"
        ));
    }
    if url.fragment().is_some() || (base && url.query().is_some()) {
        return Err(format!(
            "`{shown}` has a {}: give the URL without it",
            if url.fragment().is_some() {
                "fragment (`#`)"
            } else {
                "query (`?`)"
            }
        ));
    }
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" => {
            let local = match url.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if local {
                Ok(url)
            } else {
                Err(format!(
                    "`{shown}` must be an https:// URL (plain http only to a loopback address or `localhost`)"
                ))
            }
        }
        _ => Err(format!("`{shown}` must be an https:// URL")),
    }
}

/// A mail server's host: an IP address or a DNS name (letters, digits, `-`, `_`, dots
/// between labels; internationalized names in their `xn--` form).
fn check_host(h: &str) -> Result<(), String> {
    if h.trim().is_empty() {
        return Err("`host` cannot be empty".into());
    }
    if h.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    let valid = name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a host name or IP address",
            h.escape_debug()
        ))
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
