//! The status board: the latest result of every configured mailbox and protocol, for the
//! status page, `/api/v1/status` and readiness. It also forwards each result to the
//! metrics, under the same lock, so a result that arrives after its mailbox was removed
//! by a reload is dropped everywhere at once.

use crate::Protocol;
use crate::metrics::{Metrics, ProbeRecord};
use crate::probe::Phases;
use crate::reason::Reason;
use crate::token::CredentialExpiryKind;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A mailbox and one of its protocols: the unit the scheduler probes.
pub type Key = (String, Protocol);

/// What the board knows about a probe before it has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub mailbox: String,
    pub protocol: Protocol,
    pub credential: String,
    pub address: String,
    /// `imap://host:993 (implicit TLS)`.
    pub target: String,
    pub interval: Duration,
}

/// One finished probe, as the status page shows it. The detail and transcript are
/// already redacted (the prober redacts as it records).
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub reason: Reason,
    pub detail: String,
    pub finished_at: SystemTime,
    pub duration: Option<Duration>,
    pub phases: Phases,
    pub tls_not_after: Option<i64>,
    pub tls_version: Option<String>,
    /// `None` when no connection was made (the token step failed).
    pub transcript: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    info: TargetInfo,
    last: Option<ProbeResult>,
    last_success: Option<SystemTime>,
    probes: u64,
}

/// Status of the config file as last loaded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    pub file: String,
    pub last_reload_successful: bool,
    #[serde(serialize_with = "ser_time")]
    pub last_reload_success: Option<SystemTime>,
    /// The rejected config's error (file:line:column: field: message).
    pub last_error: Option<String>,
}

/// Per credential, what the token side last reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CredentialStatus {
    pub name: String,
    pub grant: String,
    #[serde(serialize_with = "ser_time")]
    pub token_expiry: Option<SystemTime>,
    #[serde(serialize_with = "ser_time")]
    pub token_last_success: Option<SystemTime>,
    #[serde(serialize_with = "ser_time")]
    pub client_secret_expiry: Option<SystemTime>,
    #[serde(serialize_with = "ser_time")]
    pub certificate_expiry: Option<SystemTime>,
    /// Set while the newest refresh token could not be written to `state_dir`.
    pub save_error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<Key, Entry>,
    credentials: BTreeMap<String, CredentialStatus>,
    config: ConfigStatus,
    /// Once every configured probe has run, readiness stays (a reload adding mailboxes
    /// must not take a running exporter out of its Service).
    ready_latched: bool,
    stopping: bool,
    /// Per credential with `graph:`, what Microsoft Graph said last.
    graph: BTreeMap<String, crate::graph::GraphStatus>,
}

/// Shared by the scheduler (writes) and the HTTP server (reads).
#[derive(Debug)]
pub struct Board {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl Board {
    pub fn new(metrics: Arc<Metrics>) -> Board {
        Board {
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data behind this lock: a panic cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the board hold exactly `targets`: new ones start pending, removed ones and
    /// their series disappear, kept ones keep their history.
    pub fn set_targets(&self, targets: Vec<TargetInfo>) {
        let mut inner = self.lock();
        let wanted: BTreeMap<Key, TargetInfo> = targets
            .into_iter()
            .map(|t| ((t.mailbox.clone(), t.protocol), t))
            .collect();
        inner.entries.retain(|key, _| {
            let keep = wanted.contains_key(key);
            if !keep {
                self.metrics.remove_probe(&key.0, key.1);
            }
            keep
        });
        for (key, info) in wanted {
            match inner.entries.get_mut(&key) {
                Some(e) => e.info = info,
                None => {
                    self.metrics.add_probe(&key.0, key.1);
                    inner.entries.insert(
                        key,
                        Entry {
                            info,
                            last: None,
                            last_success: None,
                            probes: 0,
                        },
                    );
                }
            }
        }
    }

    /// Records a finished probe; dropped when its target is no longer configured.
    pub fn record(&self, key: &Key, result: ProbeResult) -> bool {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(key) else {
            return false;
        };
        self.metrics.record_probe(
            &key.0,
            key.1,
            &ProbeRecord {
                reason: result.reason,
                finished_at: result.finished_at,
                duration: result.duration,
                phases: result.phases,
                tls_not_after: result.tls_not_after,
            },
        );
        entry.probes += 1;
        if result.reason == Reason::Ok {
            entry.last_success = Some(result.finished_at);
        }
        entry.last = Some(result);
        true
    }

    pub fn set_credentials(&self, credentials: Vec<CredentialStatus>) {
        let mut inner = self.lock();
        let old = std::mem::take(&mut inner.credentials);
        for name in old.keys() {
            if !credentials.iter().any(|c| &c.name == name) {
                self.metrics.remove_credential(name);
            }
        }
        for c in &credentials {
            self.metrics.set_credential_expiry(
                &c.name,
                CredentialExpiryKind::ClientSecret,
                c.client_secret_expiry,
            );
            self.metrics.set_credential_expiry(
                &c.name,
                CredentialExpiryKind::Certificate,
                c.certificate_expiry,
            );
            self.metrics
                .set_token_state(&c.name, c.token_expiry, c.token_last_success);
        }
        inner.credentials = credentials
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
    }

    /// A credential's token state after a probe asked for its token.
    pub fn token_state(
        &self,
        name: &str,
        expiry: Option<SystemTime>,
        last_success: Option<SystemTime>,
        save_error: Option<String>,
    ) {
        let mut inner = self.lock();
        if let Some(c) = inner.credentials.get_mut(name) {
            c.token_expiry = expiry;
            c.token_last_success = last_success;
            c.save_error = save_error;
            self.metrics.set_token_state(name, expiry, last_success);
        }
    }

    pub fn set_config_status(&self, status: ConfigStatus) {
        self.lock().config = status;
    }

    pub fn config_status(&self) -> ConfigStatus {
        self.lock().config.clone()
    }

    /// Ready once every configured probe has a result (and from then on), until shutdown.
    pub fn ready(&self) -> bool {
        let mut inner = self.lock();
        if inner.stopping {
            return false;
        }
        // An empty shard has nothing to wait for: ready at once.
        if !inner.ready_latched && inner.entries.values().all(|e| e.last.is_some()) {
            inner.ready_latched = true;
        }
        inner.ready_latched
    }

    /// Shutdown began: readiness goes to 503 so traffic and scrapes move elsewhere.
    pub fn set_stopping(&self) {
        self.lock().stopping = true;
    }

    /// The redacted transcript of the most recent probe of `key`.
    pub fn transcript(&self, key: &Key) -> Option<(TargetInfo, Option<ProbeResult>)> {
        self.lock()
            .entries
            .get(key)
            .map(|e| (e.info.clone(), e.last.clone()))
    }

    /// What a credential's Microsoft Graph queries found last.
    pub fn set_graph(&self, status: crate::graph::GraphStatus) {
        self.lock().graph.insert(status.credential.clone(), status);
    }

    /// Forgets the Graph state of credentials not in `keep`.
    pub fn retain_graph(&self, keep: &[String]) {
        self.lock().graph.retain(|k, _| keep.contains(k));
    }

    /// The Graph state of `credential`, if it has `graph:`.
    pub fn graph(&self, credential: &str) -> Option<crate::graph::GraphStatus> {
        self.lock().graph.get(credential).cloned()
    }

    /// Everything the status page and `/api/v1/status` show.
    pub fn snapshot(&self) -> Snapshot {
        let ready = self.ready();
        let inner = self.lock();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            revision: crate::REVISION,
            ready,
            generated_at: Some(SystemTime::now()),
            config: inner.config.clone(),
            probes: inner.entries.values().map(ProbeStatus::new).collect(),
            credentials: inner.credentials.values().cloned().collect(),
            graph: inner.graph.values().cloned().collect(),
        }
    }
}

/// The JSON of `/api/v1/status`; the status page renders the same data.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    pub revision: &'static str,
    pub ready: bool,
    #[serde(serialize_with = "ser_time")]
    pub generated_at: Option<SystemTime>,
    pub config: ConfigStatus,
    pub probes: Vec<ProbeStatus>,
    pub credentials: Vec<CredentialStatus>,
    /// Microsoft Graph: per credential with `graph:`, service health, open incidents and
    /// secret end dates.
    pub graph: Vec<crate::graph::GraphStatus>,
}

/// One row: a mailbox and protocol.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub mailbox: String,
    pub protocol: Protocol,
    pub credential: String,
    pub address: String,
    pub target: String,
    pub interval_seconds: f64,
    /// `ok`, `failed`, or `pending` before the first probe.
    pub state: &'static str,
    /// The contract's reason; absent while pending.
    pub reason: Option<Reason>,
    pub stage: Option<&'static str>,
    pub transient: Option<bool>,
    pub hint: Option<&'static str>,
    pub detail: Option<String>,
    #[serde(serialize_with = "ser_time")]
    pub last_run: Option<SystemTime>,
    #[serde(serialize_with = "ser_time")]
    pub last_success: Option<SystemTime>,
    pub duration_seconds: Option<f64>,
    pub phases: Option<Phases>,
    #[serde(serialize_with = "ser_unix")]
    pub tls_not_after: Option<i64>,
    pub tls_version: Option<String>,
    pub probes: u64,
    /// Where the last redacted transcript is served; absent when none was recorded.
    pub transcript_url: Option<String>,
}

impl ProbeStatus {
    fn new(e: &Entry) -> ProbeStatus {
        let last = e.last.as_ref();
        let reason = last.map(|l| l.reason);
        ProbeStatus {
            mailbox: e.info.mailbox.clone(),
            protocol: e.info.protocol,
            credential: e.info.credential.clone(),
            address: e.info.address.clone(),
            target: e.info.target.clone(),
            interval_seconds: e.info.interval.as_secs_f64(),
            state: match reason {
                None => "pending",
                Some(Reason::Ok) => "ok",
                Some(_) => "failed",
            },
            reason,
            stage: reason
                .filter(|r| *r != Reason::Ok)
                .map(|r| r.stage().as_str()),
            transient: reason
                .filter(|r| *r != Reason::Ok)
                .map(|r| r.is_transient()),
            hint: reason.filter(|r| *r != Reason::Ok).map(|r| r.hint()),
            detail: last.map(|l| l.detail.clone()).filter(|d| !d.is_empty()),
            last_run: last.map(|l| l.finished_at),
            last_success: e.last_success,
            duration_seconds: last.and_then(|l| l.duration).map(|d| d.as_secs_f64()),
            phases: last.map(|l| l.phases),
            tls_not_after: last.and_then(|l| l.tls_not_after),
            tls_version: last.and_then(|l| l.tls_version.clone()),
            probes: e.probes,
            transcript_url: last
                .filter(|l| l.transcript.is_some())
                .map(|_| transcript_url(&e.info.mailbox, e.info.protocol)),
        }
    }
}

/// `/transcript?mailbox=..&protocol=..`, percent-encoded.
pub fn transcript_url(mailbox: &str, protocol: Protocol) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("mailbox", mailbox)
        .append_pair("protocol", protocol.as_str())
        .finish();
    format!("/transcript?{q}")
}

/// RFC 3339 UTC, seconds precision; what people and `jq` read.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) if *t >= UNIX_EPOCH => s.serialize_str(&rfc3339(*t)),
        _ => s.serialize_none(),
    }
}

fn ser_unix<S: serde::Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(secs) if *secs >= 0 => {
            s.serialize_str(&rfc3339(UNIX_EPOCH + Duration::from_secs(*secs as u64)))
        }
        _ => s.serialize_none(),
    }
}
