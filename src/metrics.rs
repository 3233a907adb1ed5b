//! The contract's metrics: the only module that touches the Prometheus registry.
//!
//! Everything else reports plain values (a probe's reason and phases, a token request's
//! outcome) and this module turns them into series, so label names and the "exactly one
//! `mail_oauth_probe_result` series" rule live in one place.

use crate::Protocol;
use crate::probe::{Phase, Phases};
use crate::reason::Reason;
use crate::token::{CredentialExpiryKind, GrantKind, TokenError, TokenInfo, TokenObserver};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Appended to every HELP text: a scrape only reads what the scheduler found.
const FROM_PROBES: &str = "Results come from scheduled probes, not from the scrape.";

const PROBE_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];
const TOKEN_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

const GRANTS: [GrantKind; 4] = [
    GrantKind::RefreshToken,
    GrantKind::ClientCredentials,
    GrantKind::DeviceCode,
    GrantKind::JwtBearer,
];
const EXPIRY_KINDS: [CredentialExpiryKind; 2] = [
    CredentialExpiryKind::ClientSecret,
    CredentialExpiryKind::Certificate,
];

/// What one finished probe reports to the metrics (no server text in it).
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub reason: Reason,
    pub finished_at: SystemTime,
    /// Connect start to the auth reply; `None` when the auth step was not reached.
    pub duration: Option<Duration>,
    pub phases: Phases,
    /// Earliest notAfter of the presented chain, unix seconds.
    pub tls_not_after: Option<i64>,
}

/// The exporter's own registry and every contract metric.
pub struct Metrics {
    registry: Registry,
    probe_success: GaugeVec,
    probe_result: GaugeVec,
    probes_total: IntCounterVec,
    probe_failures_total: IntCounterVec,
    probe_duration: HistogramVec,
    probe_phase: GaugeVec,
    probe_last_run: GaugeVec,
    probe_last_success: GaugeVec,
    tls_expiry: GaugeVec,
    token_requests: IntCounterVec,
    token_failures: IntCounterVec,
    token_duration: HistogramVec,
    token_expiry: GaugeVec,
    token_last_success: GaugeVec,
    /// Beyond the contract: refresh tokens that could not be written under `state_dir`.
    token_save_failures: IntCounterVec,
    credential_expiry: GaugeVec,
    service_health: GaugeVec,
    service_issues: GaugeVec,
    graph_last_success: GaugeVec,
    reload_ok: Gauge,
    reload_ts: Gauge,
    /// The reason each mailbox+protocol's `probe_result` series carries now, so a change
    /// removes the old series instead of leaving it at 0.
    current_reason: Mutex<HashMap<(String, Protocol), Reason>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn help(text: &str) -> String {
    format!("{text} {FROM_PROBES}")
}

fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Registration only fails on duplicate or malformed names, which are constants
        // here: a failure is a bug caught by every test.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("contract metric names are valid and unique");
            c
        }
        let gauge = |name: &str, text: &str, labels: &[&str]| {
            reg(
                &registry,
                GaugeVec::new(Opts::new(name, help(text)), labels).expect("valid gauge"),
            )
        };
        let counter = |name: &str, text: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help(text)), labels).expect("valid counter"),
            )
        };
        let histogram = |name: &str, text: &str, labels: &[&str], buckets: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help(text)).buckets(buckets.to_vec()),
                    labels,
                )
                .expect("valid histogram"),
            )
        };
        let mp = &["mailbox", "protocol"];
        let m = Metrics {
            probe_success: gauge(
                "mail_oauth_probe_success",
                "1 if the most recent probe of this mailbox and protocol logged in, else 0.",
                mp,
            ),
            probe_result: gauge(
                "mail_oauth_probe_result",
                "Always 1, one series per mailbox and protocol: the reason of the most recent probe (ok on success).",
                &["mailbox", "protocol", "reason"],
            ),
            probes_total: counter("mail_oauth_probes_total", "Probes finished.", mp),
            probe_failures_total: counter(
                "mail_oauth_probe_failures_total",
                "Failed probes by reason.",
                &["mailbox", "protocol", "reason"],
            ),
            probe_duration: histogram(
                "mail_oauth_probe_duration_seconds",
                "Connect start to the server's reply to the auth step (token time excluded).",
                mp,
                PROBE_BUCKETS,
            ),
            probe_phase: gauge(
                "mail_oauth_probe_phase_seconds",
                "Time spent in each phase of the most recent probe; phases it did not reach are absent.",
                &["mailbox", "protocol", "phase"],
            ),
            probe_last_run: gauge(
                "mail_oauth_probe_last_run_timestamp_seconds",
                "When the most recent probe finished.",
                mp,
            ),
            probe_last_success: gauge(
                "mail_oauth_probe_last_success_timestamp_seconds",
                "When a probe last succeeded.",
                mp,
            ),
            tls_expiry: gauge(
                "mail_oauth_tls_certificate_expiry_timestamp_seconds",
                "Earliest notAfter in the certificate chain the mail server presented.",
                mp,
            ),
            token_requests: counter(
                "mail_oauth_token_requests_total",
                "Token endpoint requests.",
                &["credential", "grant"],
            ),
            token_failures: counter(
                "mail_oauth_token_failures_total",
                "Failed token endpoint requests by reason.",
                &["credential", "grant", "reason"],
            ),
            token_duration: histogram(
                "mail_oauth_token_request_duration_seconds",
                "Token endpoint latency.",
                &["credential"],
                TOKEN_BUCKETS,
            ),
            token_expiry: gauge(
                "mail_oauth_token_expiry_timestamp_seconds",
                "Expiry of the access token in hand.",
                &["credential"],
            ),
            token_last_success: gauge(
                "mail_oauth_token_last_success_timestamp_seconds",
                "When an access token was last obtained.",
                &["credential"],
            ),
            token_save_failures: counter(
                "mail_oauth_token_save_failures_total",
                "Refresh tokens received from the token endpoint that could not be written under state_dir (kept in memory only: a restart loses them).",
                &["credential"],
            ),
            credential_expiry: gauge(
                "mail_oauth_credential_expiry_timestamp_seconds",
                "client_secret: the expiry date the config declares for the client secret; certificate: notAfter of the client certificate.",
                &["credential", "kind"],
            ),
            service_health: gauge(
                "mail_oauth_service_health",
                "With graph: [service_health]: value 1, labelled with Microsoft's current status of the service (from Microsoft Graph every 5 minutes; unknown values are `other`).",
                &["credential", "service", "status"],
            ),
            service_issues: gauge(
                "mail_oauth_service_issues",
                "With graph: [service_health]: open service issues Microsoft Graph reports for the service, by classification (incident, advisory).",
                &["credential", "service", "classification"],
            ),
            graph_last_success: gauge(
                "mail_oauth_graph_last_success_timestamp_seconds",
                "With graph: when a Microsoft Graph query (credential_expiry, service_health) last succeeded.",
                &["credential", "query"],
            ),
            reload_ok: reg(
                &registry,
                Gauge::with_opts(Opts::new(
                    "mail_oauth_config_last_reload_successful",
                    help("1 if the last load or reload of the config succeeded."),
                ))
                .expect("valid gauge"),
            ),
            reload_ts: reg(
                &registry,
                Gauge::with_opts(Opts::new(
                    "mail_oauth_config_last_reload_success_timestamp_seconds",
                    help("When the config was last loaded successfully."),
                ))
                .expect("valid gauge"),
            ),
            current_reason: Mutex::new(HashMap::new()),
            registry,
        };
        let build = reg(
            &m.registry,
            GaugeVec::new(
                Opts::new(
                    "mail_oauth_build_info",
                    help("Always 1: the exporter's version and source revision."),
                ),
                &["version", "revision"],
            )
            .expect("valid gauge"),
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::REVISION])
            .set(1.0);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // process_* metrics are a nicety: a second registration cannot happen here.
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Creates the series a configured mailbox+protocol has before its first probe, so
    /// `rate()` and absence alerts see it from the start.
    pub fn add_probe(&self, mailbox: &str, protocol: Protocol) {
        self.probes_total
            .with_label_values(&[mailbox, protocol.as_str()])
            .inc_by(0);
    }

    /// One finished probe.
    pub fn record_probe(&self, mailbox: &str, protocol: Protocol, r: &ProbeRecord) {
        let p = protocol.as_str();
        let mp = [mailbox, p];
        self.probes_total.with_label_values(&mp).inc();
        if r.reason != Reason::Ok {
            self.probe_failures_total
                .with_label_values(&[mailbox, p, r.reason.as_str()])
                .inc();
        }
        self.probe_success
            .with_label_values(&mp)
            .set(if r.reason == Reason::Ok { 1.0 } else { 0.0 });
        {
            let mut current = lock(&self.current_reason);
            let old = current.insert((mailbox.to_string(), protocol), r.reason);
            if let Some(old) = old.filter(|o| *o != r.reason) {
                let _ = self
                    .probe_result
                    .remove_label_values(&[mailbox, p, old.as_str()]);
            }
            self.probe_result
                .with_label_values(&[mailbox, p, r.reason.as_str()])
                .set(1.0);
        }
        if let Some(d) = r.duration {
            self.probe_duration
                .with_label_values(&mp)
                .observe(d.as_secs_f64());
        }
        for (phase, d) in r.phases.iter() {
            let labels = [mailbox, p, phase.as_str()];
            match d {
                Some(d) => self
                    .probe_phase
                    .with_label_values(&labels)
                    .set(d.as_secs_f64()),
                None => {
                    let _ = self.probe_phase.remove_label_values(&labels);
                }
            }
        }
        let finished = unix(r.finished_at);
        self.probe_last_run.with_label_values(&mp).set(finished);
        if r.reason == Reason::Ok {
            self.probe_last_success.with_label_values(&mp).set(finished);
        }
        if let Some(t) = r.tls_not_after {
            self.tls_expiry.with_label_values(&mp).set(t as f64);
        }
    }

    /// Removes every series of a mailbox+protocol no longer in the config.
    pub fn remove_probe(&self, mailbox: &str, protocol: Protocol) {
        let p = protocol.as_str();
        let mp = [mailbox, p];
        let _ = self.probe_success.remove_label_values(&mp);
        let _ = self.probes_total.remove_label_values(&mp);
        let _ = self.probe_duration.remove_label_values(&mp);
        let _ = self.probe_last_run.remove_label_values(&mp);
        let _ = self.probe_last_success.remove_label_values(&mp);
        let _ = self.tls_expiry.remove_label_values(&mp);
        for reason in Reason::ALL {
            let _ = self
                .probe_failures_total
                .remove_label_values(&[mailbox, p, reason.as_str()]);
            let _ = self
                .probe_result
                .remove_label_values(&[mailbox, p, reason.as_str()]);
        }
        for phase in Phase::ALL {
            let _ = self
                .probe_phase
                .remove_label_values(&[mailbox, p, phase.as_str()]);
        }
        lock(&self.current_reason).remove(&(mailbox.to_string(), protocol));
    }

    /// The token state of a credential, as the token service knows it.
    pub fn set_token_state(
        &self,
        credential: &str,
        expiry: Option<SystemTime>,
        last_success: Option<SystemTime>,
    ) {
        match expiry {
            Some(t) => self
                .token_expiry
                .with_label_values(&[credential])
                .set(unix(t)),
            None => {
                let _ = self.token_expiry.remove_label_values(&[credential]);
            }
        }
        if let Some(t) = last_success {
            self.token_last_success
                .with_label_values(&[credential])
                .set(unix(t));
        }
    }

    /// The declared expiry of a credential's secret or certificate; `None` removes it.
    pub fn set_credential_expiry(
        &self,
        credential: &str,
        kind: CredentialExpiryKind,
        at: Option<SystemTime>,
    ) {
        let labels = [credential, kind.as_str()];
        match at {
            Some(t) => self
                .credential_expiry
                .with_label_values(&labels)
                .set(unix(t)),
            None => {
                let _ = self.credential_expiry.remove_label_values(&labels);
            }
        }
    }

    /// A Microsoft Graph query of `credential` succeeded at `at`.
    pub fn set_graph_success(&self, credential: &str, query: &str, at: SystemTime) {
        self.graph_last_success
            .with_label_values(&[credential, query])
            .set(unix(at));
    }

    /// The service's current status: exactly one series per credential and service.
    pub fn set_service_health(&self, credential: &str, service: &str, status: &'static str) {
        for s in crate::graph::HEALTH_STATUSES {
            if s != status {
                let _ = self
                    .service_health
                    .remove_label_values(&[credential, service, s]);
            }
        }
        self.service_health
            .with_label_values(&[credential, service, status])
            .set(1.0);
    }

    /// Open service issues of one classification.
    pub fn set_service_issues(
        &self,
        credential: &str,
        service: &str,
        classification: &str,
        open: usize,
    ) {
        self.service_issues
            .with_label_values(&[credential, service, classification])
            .set(open as f64);
    }

    /// Removes every Microsoft Graph series of `credential` (its `graph:` was removed).
    pub fn remove_graph(&self, credential: &str) {
        for q in ["credential_expiry", "service_health"] {
            let _ = self
                .graph_last_success
                .remove_label_values(&[credential, q]);
        }
        let service = crate::graph::EXCHANGE_ONLINE;
        for s in crate::graph::HEALTH_STATUSES {
            let _ = self
                .service_health
                .remove_label_values(&[credential, service, s]);
        }
        for c in crate::graph::CLASSIFICATIONS {
            let _ = self
                .service_issues
                .remove_label_values(&[credential, service, c]);
        }
    }

    /// Removes every series of a credential no longer in the config.
    pub fn remove_credential(&self, credential: &str) {
        self.remove_graph(credential);
        for g in GRANTS {
            let _ = self
                .token_requests
                .remove_label_values(&[credential, g.as_str()]);
            for reason in Reason::ALL {
                let _ = self.token_failures.remove_label_values(&[
                    credential,
                    g.as_str(),
                    reason.as_str(),
                ]);
            }
        }
        let _ = self.token_duration.remove_label_values(&[credential]);
        let _ = self.token_expiry.remove_label_values(&[credential]);
        let _ = self.token_last_success.remove_label_values(&[credential]);
        let _ = self.token_save_failures.remove_label_values(&[credential]);
        for k in EXPIRY_KINDS {
            let _ = self
                .credential_expiry
                .remove_label_values(&[credential, k.as_str()]);
        }
    }

    /// A load or reload of the config finished.
    pub fn config_loaded(&self, ok: bool, at: SystemTime) {
        self.reload_ok.set(if ok { 1.0 } else { 0.0 });
        if ok {
            self.reload_ts.set(unix(at));
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on malformed families, which we never build.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

impl TokenObserver for Metrics {
    fn request(
        &self,
        credential: &str,
        grant: GrantKind,
        duration: Duration,
        result: Result<&TokenInfo, &TokenError>,
    ) {
        self.token_requests
            .with_label_values(&[credential, grant.as_str()])
            .inc();
        self.token_duration
            .with_label_values(&[credential])
            .observe(duration.as_secs_f64());
        match result {
            Ok(info) => self.set_token_state(credential, info.expires_at, Some(info.obtained_at)),
            Err(e) => {
                let reason = crate::classify::token::reason(e);
                self.token_failures
                    .with_label_values(&[credential, grant.as_str(), reason.as_str()])
                    .inc();
            }
        }
    }

    fn save_failed(&self, credential: &str, _error: &str) {
        self.token_save_failures
            .with_label_values(&[credential])
            .inc();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain maps behind this lock: a panic cannot leave them half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    fn record(reason: Reason) -> ProbeRecord {
        ProbeRecord {
            reason,
            finished_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            duration: Some(Duration::from_millis(120)),
            phases: Phases::default(),
            tls_not_after: Some(1_900_000_000),
        }
    }

    #[test]
    fn probe_result_keeps_exactly_one_series_per_mailbox_and_protocol() {
        let m = Metrics::new();
        m.record_probe("a", Protocol::Smtp, &record(Reason::Ok));
        m.record_probe("a", Protocol::Smtp, &record(Reason::SmtpAuthDisabled));
        let t = text(&m);
        let results: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("mail_oauth_probe_result{"))
            .collect();
        assert_eq!(results.len(), 1, "{t}");
        assert!(results[0].contains("reason=\"smtp_auth_disabled\""), "{t}");
        assert!(t.contains(
            "mail_oauth_probe_failures_total{mailbox=\"a\",protocol=\"smtp\",reason=\"smtp_auth_disabled\"} 1"
        ));
        assert!(t.contains("mail_oauth_probe_success{mailbox=\"a\",protocol=\"smtp\"} 0"));
        assert!(t.contains(
            "mail_oauth_probe_last_success_timestamp_seconds{mailbox=\"a\",protocol=\"smtp\"} 1800000000"
        ));
    }

    #[test]
    fn removed_probe_leaves_no_series() {
        let m = Metrics::new();
        m.add_probe("gone", Protocol::Imap);
        m.record_probe("gone", Protocol::Imap, &record(Reason::Throttled));
        m.record_probe("kept", Protocol::Imap, &record(Reason::Ok));
        m.remove_probe("gone", Protocol::Imap);
        let t = text(&m);
        assert!(!t.contains("mailbox=\"gone\""), "{t}");
        assert!(t.contains("mailbox=\"kept\""), "{t}");
    }

    #[test]
    fn every_help_says_results_come_from_probes() {
        let m = Metrics::new();
        m.config_loaded(true, SystemTime::now());
        m.record_probe("a", Protocol::Imap, &record(Reason::Throttled));
        m.set_credential_expiry(
            "c",
            CredentialExpiryKind::ClientSecret,
            Some(SystemTime::now()),
        );
        m.set_token_state("c", Some(SystemTime::now()), Some(SystemTime::now()));
        let t = text(&m);
        let helps: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("# HELP mail_oauth_"))
            .collect();
        assert!(helps.len() >= 10, "{t}");
        for h in helps {
            assert!(h.ends_with(FROM_PROBES), "{h}");
        }
    }
}
