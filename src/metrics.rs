//! The contract's metrics. Two sources, one body:
//! - the per-row families (`mail_oauth_probe_*`, `mail_oauth_tls_*`), rendered at scrape
//!   time from the status board's rows ([`Metrics::render`]): the board is their only store,
//!   so a row has one `mail_oauth_probe_result` series because it holds one reason, and a
//!   removed row has no series because it is no longer on the board;
//! - everything else in the exporter's own `prometheus::Registry`: the fleet latency
//!   histogram, the per-credential token metrics (fed by [`TokenObserver`]), the reload
//!   status, build info and the `process_*` collector.
//!
//! Both are written by the `text` module in the format the scraper asks for,
//! gzip-compressed when it accepts that.

mod text;

pub use text::{Format, accepts_gzip, label_pairs};

use crate::Protocol;
use crate::reason::Reason;
use crate::status::Row;
use crate::token::{CredentialExpiryKind, GrantKind, TokenError, TokenInfo, TokenObserver};
use prometheus::proto::MetricType;
use prometheus::{Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use text::{Family, Kind, Out, Value};

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

/// The exporter's own registry: everything that is not per row.
pub struct Metrics {
    registry: Registry,
    fleet_duration: HistogramVec,
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

fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
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
        let m = Metrics {
            fleet_duration: histogram(
                "mail_oauth_fleet_probe_duration_seconds",
                "Connect start to the server's reply to the auth step (token time excluded), every probe that reached the auth step, all mailboxes together.",
                &["protocol"],
                PROBE_BUCKETS,
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

    /// A probe of `protocol` that reached the auth step took `d` (connect start to the
    /// auth reply): the fleet-wide latency distribution.
    pub fn observe_probe_duration(&self, protocol: Protocol, d: Duration) {
        self.fleet_duration
            .with_label_values(&[protocol.as_str()])
            .observe(d.as_secs_f64());
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

    /// A scrape's body, rendered as it is sent ([`Exposition`]): the registry's
    /// families, then the per-row families of `rows` (a board snapshot,
    /// [`crate::status::Board::rows`]), in `format`, gzip-compressed when `gzip`.
    pub fn exposition(&self, rows: Vec<Arc<Row>>, format: Format, gzip: bool) -> Exposition {
        let mut out = Out::new(format, gzip);
        write_registry(&mut out, &self.registry.gather());
        Exposition {
            out,
            rows,
            families: row_families(),
            family: 0,
            row: 0,
            done: false,
            started: std::time::Instant::now(),
        }
    }

    /// The whole body at once (tests, benchmarks).
    pub fn render(&self, rows: &[Arc<Row>], format: Format, gzip: bool) -> Vec<u8> {
        let mut e = self.exposition(rows.to_vec(), format, gzip);
        let mut body = Vec::new();
        while let Some(chunk) = e.next_chunk() {
            body.extend_from_slice(&chunk);
        }
        body
    }
}

/// A scrape's body, rendered a chunk (about 64 KiB) at a time as the connection takes
/// it, from a snapshot of the board's rows: however large the fleet, the body is never
/// whole in memory, and a slow scraper holds a list of pointers, not a lock. It is the
/// response body itself (`hyper::body::Body`).
pub struct Exposition {
    out: Out,
    rows: Vec<Arc<Row>>,
    families: [Family; ROW_FAMILIES],
    family: usize,
    row: usize,
    done: bool,
    started: std::time::Instant,
}

impl Exposition {
    /// The next piece of the body; `None` once it was all sent.
    pub fn next_chunk(&mut self) -> Option<bytes::Bytes> {
        if self.done {
            return None;
        }
        while self.family < ROW_FAMILIES {
            while self.row < self.rows.len() {
                render_row(
                    &mut self.out,
                    &mut self.families[self.family],
                    self.family,
                    &self.rows[self.row],
                );
                self.row += 1;
                if self.out.buffered() >= text::CHUNK {
                    let chunk = self.out.take_chunk();
                    // With gzip the encoder may not have produced anything yet.
                    if !chunk.is_empty() {
                        return Some(chunk.into());
                    }
                }
            }
            self.family += 1;
            self.row = 0;
        }
        self.done = true;
        let written = self.out.written();
        let last = self.out.finish_chunk();
        tracing::debug!(
            rows = self.rows.len(),
            bytes = written,
            elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "metrics rendered"
        );
        Some(last.into())
    }
}

impl hyper::body::Body for Exposition {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        // Rendering a chunk takes a fraction of a millisecond: done right here.
        std::task::Poll::Ready(
            self.get_mut()
                .next_chunk()
                .map(|c| Ok(hyper::body::Frame::data(c))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The registry's families (gathered, sorted by name) in `out`'s format.
fn write_registry(out: &mut Out, families: &[prometheus::proto::MetricFamily]) {
    let mut labels = String::new();
    for f in families {
        let kind = match f.type_() {
            MetricType::COUNTER => Kind::Counter,
            MetricType::GAUGE => Kind::Gauge,
            MetricType::HISTOGRAM => Kind::Histogram,
            _ => Kind::Unknown,
        };
        let name = f.name();
        if f.metric.is_empty() {
            continue;
        }
        out.header(name, f.help(), kind);
        for m in &f.metric {
            let pairs: Vec<(&str, &str)> = m.label.iter().map(|l| (l.name(), l.value())).collect();
            labels.clear();
            labels.push_str(&label_pairs(&pairs));
            match kind {
                Kind::Counter => out.line(name, &labels, None, Value::F64(m.counter.value())),
                Kind::Gauge => out.line(name, &labels, None, Value::F64(m.gauge.value())),
                Kind::Histogram => {
                    let h = &m.histogram;
                    let bucket = format!("{name}_bucket");
                    for b in &h.bucket {
                        out.line(
                            &bucket,
                            &labels,
                            Some(("le", &text::bound(b.upper_bound()))),
                            Value::U64(b.cumulative_count()),
                        );
                    }
                    out.line(
                        &bucket,
                        &labels,
                        Some(("le", "+Inf")),
                        Value::U64(h.sample_count()),
                    );
                    out.line(
                        &format!("{name}_sum"),
                        &labels,
                        None,
                        Value::F64(h.sample_sum()),
                    );
                    out.line(
                        &format!("{name}_count"),
                        &labels,
                        None,
                        Value::U64(h.sample_count()),
                    );
                }
                Kind::Unknown => out.line(name, &labels, None, Value::F64(m.untyped.value())),
            }
        }
    }
}

const SUCCESS_HELP: &str = "1 if the most recent probe of this mailbox and protocol logged in, else 0. Results come from scheduled probes, not from the scrape.";
const RESULT_HELP: &str = "Always 1, one series per mailbox and protocol: the reason of the most recent probe (ok on success). Results come from scheduled probes, not from the scrape.";
const PROBES_HELP: &str =
    "Probes finished. Results come from scheduled probes, not from the scrape.";
const FAILURES_HELP: &str = "Failed probes by reason (the most recently seen reasons of each mailbox and protocol, within 15 series a row). Results come from scheduled probes, not from the scrape.";
const DURATION_HELP: &str = "The most recent probe that reached the auth step: connect start to the server's reply to the auth step (token time excluded). Results come from scheduled probes, not from the scrape.";
const PHASE_HELP: &str = "Time spent in each phase of the most recent probe; phases it did not reach are absent. Results come from scheduled probes, not from the scrape.";
const LAST_RUN_HELP: &str =
    "When the most recent probe finished. Results come from scheduled probes, not from the scrape.";
const LAST_SUCCESS_HELP: &str =
    "When a probe last succeeded. Results come from scheduled probes, not from the scrape.";
const TLS_HELP: &str = "Earliest notAfter in the certificate chain the mail server presented. Results come from scheduled probes, not from the scrape.";

const ROW_FAMILIES: usize = 9;

/// The per-row families, in the contract's order.
fn row_families() -> [Family; ROW_FAMILIES] {
    [
        Family::new("mail_oauth_probe_success", SUCCESS_HELP, Kind::Gauge),
        Family::new("mail_oauth_probe_result", RESULT_HELP, Kind::Gauge),
        Family::new("mail_oauth_probes_total", PROBES_HELP, Kind::Counter),
        Family::new(
            "mail_oauth_probe_failures_total",
            FAILURES_HELP,
            Kind::Counter,
        ),
        Family::new(
            "mail_oauth_probe_duration_seconds",
            DURATION_HELP,
            Kind::Gauge,
        ),
        Family::new("mail_oauth_probe_phase_seconds", PHASE_HELP, Kind::Gauge),
        Family::new(
            "mail_oauth_probe_last_run_timestamp_seconds",
            LAST_RUN_HELP,
            Kind::Gauge,
        ),
        Family::new(
            "mail_oauth_probe_last_success_timestamp_seconds",
            LAST_SUCCESS_HELP,
            Kind::Gauge,
        ),
        Family::new(
            "mail_oauth_tls_certificate_expiry_timestamp_seconds",
            TLS_HELP,
            Kind::Gauge,
        ),
    ]
}

/// Row `r`'s samples of family number `family` (see [`row_families`]). A family's header
/// goes out with its first sample, so a family without samples is left out. Pending rows
/// have only `mail_oauth_probes_total` (0), so `rate()` and absence alerts see them.
fn render_row(out: &mut Out, f: &mut Family, family: usize, r: &Row) {
    let labels = &r.info.labels;
    match (family, r.last_reason()) {
        (0, Some(reason)) => {
            out.sample(f, labels, None, Value::U64(u64::from(reason == Reason::Ok)))
        }
        (1, Some(reason)) => {
            out.sample(f, labels, Some(("reason", reason.as_str())), Value::U64(1))
        }
        (2, _) => out.sample(f, labels, None, Value::U64(r.probes)),
        (3, _) => {
            for (reason, n) in r.failures_shown() {
                out.sample(f, labels, Some(("reason", reason.as_str())), Value::U64(*n));
            }
        }
        (4, _) => {
            if let Some(d) = r.auth_duration {
                out.sample(f, labels, None, Value::Micros(micros(d)));
            }
        }
        (5, _) => {
            for (phase, us) in r.phase_micros() {
                out.sample(
                    f,
                    labels,
                    Some(("phase", phase.as_str())),
                    Value::Micros(u64::from(us)),
                );
            }
        }
        (6, _) => {
            if let Some(t) = r.last_run() {
                out.sample(f, labels, None, Value::UnixMillis(unix_millis(t)));
            }
        }
        (7, _) => {
            if let Some(t) = r.last_success {
                out.sample(f, labels, None, Value::UnixMillis(unix_millis(t)));
            }
        }
        (8, _) => {
            if let Some(t) = r.tls_not_after {
                out.sample(f, labels, None, Value::UnixMillis(t.saturating_mul(1000)));
            }
        }
        _ => {}
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Phase, Phases};
    use crate::status::{Board, Key, MAX_SERIES_PER_ROW, ProbeResult, TargetInfo};
    use std::collections::{BTreeMap, BTreeSet};

    /// A strict reader of the text format: every line a comment or a sample, label values
    /// unescaped; panics on anything else.
    fn samples(body: &str) -> Vec<(String, BTreeMap<String, String>, String)> {
        let mut out = Vec::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (name, rest) = match line.find('{') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => {
                    let (n, v) = line.split_once(' ').expect("name value");
                    out.push((n.to_string(), BTreeMap::new(), v.to_string()));
                    continue;
                }
            };
            let mut labels = BTreeMap::new();
            let mut chars = rest.chars();
            loop {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("closing quote") {
                        '\\' => match chars.next() {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline in {line}"),
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("{other:?} after a label in {line}"),
                }
            }
            let value: String = chars.collect();
            let value = value.strip_prefix(' ').expect("space before value");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value in {line}"));
            out.push((name.to_string(), labels, value.to_string()));
        }
        out
    }

    fn target(mailbox: &str, protocol: Protocol) -> TargetInfo {
        TargetInfo {
            mailbox: mailbox.into(),
            protocol,
            credential: "c".into(),
            address: "a@example.com".into(),
            target: "imap://h:993".into(),
            interval: Duration::from_secs(60),
        }
    }

    fn result(reason: Reason, all_phases: bool) -> ProbeResult {
        let mut phases = Phases::default();
        for p in Phase::ALL {
            if all_phases || p == Phase::Resolve {
                phases.add(p, Duration::from_micros(1500));
            }
        }
        ProbeResult {
            reason,
            detail: String::new(),
            finished_at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_250),
            duration: all_phases.then(|| Duration::from_millis(120)),
            phases,
            tls_not_after: Some(1_900_000_000),
            tls_version: None,
            transcript: Some("S: * OK\n".into()),
        }
    }

    fn render(board: &Board, format: Format) -> String {
        let m = Metrics::new();
        String::from_utf8(m.render(&board.rows(), format, false)).unwrap()
    }

    const HOSTILE: &str = "we\"ird\\name\nsecond line} 1\n# HELP x";

    #[test]
    fn exposition_escapes_names_and_groups_each_family_once() {
        let board = Board::new();
        let names = [HOSTILE, "plain", "ünï €"];
        board.set_targets(
            names
                .iter()
                .flat_map(|n| Protocol::ALL.map(|p| target(n, p)))
                .collect(),
        );
        for n in names {
            let key = Key::new(n, Protocol::Imap);
            board.record(&key, result(Reason::Throttled, false));
            board.record(&key, result(Reason::Ok, true));
        }
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let body = render(&board, format);
            // HELP and TYPE once per family, and a family's samples in one group.
            let mut helps = BTreeSet::new();
            let mut types = BTreeSet::new();
            for l in body.lines() {
                if let Some(h) = l.strip_prefix("# HELP ") {
                    assert!(
                        helps.insert(h.split(' ').next().unwrap().to_string()),
                        "{l}"
                    );
                } else if let Some(t) = l.strip_prefix("# TYPE ") {
                    assert!(
                        types.insert(t.split(' ').next().unwrap().to_string()),
                        "{l}"
                    );
                }
            }
            assert_eq!(helps, types);
            let parsed = samples(&body);
            let mut seen_groups: Vec<String> = Vec::new();
            for (name, _, _) in &parsed {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| body.contains(&format!("# TYPE {f} histogram")))
                    .unwrap_or(name);
                if seen_groups.last().map(String::as_str) != Some(family) {
                    assert!(
                        !seen_groups.iter().any(|g| g == family),
                        "{family} split in two groups"
                    );
                    seen_groups.push(family.to_string());
                }
            }
            // Each mailbox name comes back exactly, on all three protocols.
            for n in names {
                let rows: BTreeSet<&str> = parsed
                    .iter()
                    .filter(|(name, l, _)| name == "mail_oauth_probes_total" && l["mailbox"] == n)
                    .map(|(_, l, _)| l["protocol"].as_str())
                    .collect();
                assert_eq!(rows.len(), 3, "{n:?} in {format:?}");
            }
            assert_eq!(body.ends_with("# EOF\n"), format == Format::OpenMetrics);
            if format == Format::OpenMetrics {
                assert!(body.contains("# TYPE mail_oauth_probes counter\n"));
                assert!(!body.contains("# TYPE mail_oauth_probes_total"));
            }
        }
    }

    #[test]
    fn one_result_series_per_row_through_reason_changes_and_removed_rows_vanish() {
        let board = Board::new();
        board.set_targets(vec![
            target("a", Protocol::Smtp),
            target("gone", Protocol::Imap),
        ]);
        let a = Key::new("a", Protocol::Smtp);
        let gone = Key::new("gone", Protocol::Imap);
        for reason in [
            Reason::Ok,
            Reason::SmtpAuthDisabled,
            Reason::Throttled,
            Reason::Ok,
        ] {
            board.record(&a, result(reason, reason == Reason::Ok));
            let body = render(&board, Format::Prometheus);
            let results: Vec<_> = samples(&body)
                .into_iter()
                .filter(|(n, l, _)| n == "mail_oauth_probe_result" && l["mailbox"] == "a")
                .collect();
            assert_eq!(results.len(), 1, "{body}");
            assert_eq!(results[0].1["reason"], reason.as_str());
            assert_eq!(results[0].2, "1");
        }
        board.record(&gone, result(Reason::AuthRejected, true));
        // A reload removes `gone` while its next probe runs; the late result is refused.
        board.set_targets(vec![target("a", Protocol::Smtp)]);
        assert!(!board.record(&gone, result(Reason::Ok, true)));
        let body = render(&board, Format::Prometheus);
        assert!(!body.contains("mailbox=\"gone\""), "{body}");
        assert!(board.snapshot().probes.iter().all(|p| p.mailbox != "gone"));
        let t = samples(&body);
        let get = |name: &str, extra: Option<(&str, &str)>| {
            t.iter()
                .filter(|(n, l, _)| n == name && extra.is_none_or(|(k, v)| l[k] == v))
                .map(|(_, _, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("mail_oauth_probes_total", None), ["4"]);
        assert_eq!(get("mail_oauth_probe_success", None), ["1"]);
        assert_eq!(
            get(
                "mail_oauth_probe_failures_total",
                Some(("reason", "throttled"))
            ),
            ["1"]
        );
        assert_eq!(get("mail_oauth_probe_duration_seconds", None), ["0.12"]);
        assert_eq!(
            get("mail_oauth_probe_phase_seconds", Some(("phase", "auth"))),
            ["0.0015"]
        );
        assert_eq!(
            get("mail_oauth_probe_last_success_timestamp_seconds", None),
            ["1800000000.25"]
        );
        assert_eq!(
            get("mail_oauth_tls_certificate_expiry_timestamp_seconds", None),
            ["1900000000"]
        );
    }

    #[test]
    fn a_row_never_has_more_than_15_series() {
        let board = Board::new();
        board.set_targets(vec![target("a", Protocol::Imap)]);
        let key = Key::new("a", Protocol::Imap);
        let count = |board: &Board| {
            let body = render(board, Format::Prometheus);
            samples(&body)
                .iter()
                .filter(|(_, l, _)| l.get("mailbox").is_some_and(|m| m == "a"))
                .count()
        };
        assert_eq!(count(&board), 1, "a pending row has its probe counter");
        // Every failure reason in turn, each probe reaching every phase, then success:
        // the worst case for a row's series.
        let mut max = 0;
        for reason in Reason::ALL
            .iter()
            .chain([Reason::Ok, Reason::Timeout].iter())
        {
            board.record(&key, result(*reason, true));
            let n = count(&board);
            max = max.max(n);
            assert!(n <= MAX_SERIES_PER_ROW, "{n} series after {reason}");
            let row = &board.rows()[0];
            assert_eq!(
                n,
                row.series_without_failures() + row.failures_shown().len()
            );
            if *reason != Reason::Ok {
                assert_eq!(
                    row.failures_shown()[0].0,
                    *reason,
                    "the current reason is shown"
                );
            }
        }
        assert_eq!(max, MAX_SERIES_PER_ROW);
        // A token failure reaches no phase: more of the row's failure counters fit, and
        // the ones shown again carry their totals.
        board.record(&key, result(Reason::TokenThrottled, false));
        board.record(&key, result(Reason::Timeout, false));
        let row = &board.rows()[0];
        assert!(row.failures_shown().len() > 1);
        assert_eq!(row.failures_shown()[0], (Reason::Timeout, 3));
        assert!(count(&board) <= MAX_SERIES_PER_ROW);
    }

    #[test]
    fn a_large_body_is_the_same_in_chunks_compressed_or_not() {
        use std::io::Read;
        let board = Board::new();
        let n = 3000;
        board.set_targets(
            (0..n)
                .map(|i| target(&format!("m{i}"), Protocol::Pop3))
                .collect(),
        );
        for i in 0..n {
            board.record(
                &Key::new(&format!("m{i}"), Protocol::Pop3),
                result(Reason::Ok, true),
            );
        }
        let m = Metrics::new();
        let mut e = m.exposition(board.rows(), Format::OpenMetrics, false);
        let mut chunks = 0;
        let mut plain = Vec::new();
        while let Some(c) = e.next_chunk() {
            assert!(c.len() < 2 * text::CHUNK, "{}", c.len());
            plain.extend_from_slice(&c);
            chunks += 1;
        }
        assert!(e.next_chunk().is_none());
        assert!(plain.len() > 20 * text::CHUNK && chunks > 20, "{chunks}");
        let gz = m.render(&board.rows(), Format::OpenMetrics, true);
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        // process_* values move between two renders; everything else is the same.
        let stable = |b: &[u8]| -> String {
            String::from_utf8_lossy(b)
                .lines()
                .filter(|l| !l.starts_with("process_"))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert!(stable(&unzipped) == stable(&plain), "the gzip body differs");
        let text = String::from_utf8(plain).unwrap();
        let per_row = samples(&text)
            .iter()
            .filter(|(_, l, _)| l.contains_key("mailbox"))
            .count();
        assert_eq!(per_row, 14 * n);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn every_help_says_results_come_from_probes() {
        let m = Metrics::new();
        m.config_loaded(true, SystemTime::now());
        m.observe_probe_duration(Protocol::Imap, Duration::from_millis(80));
        m.set_credential_expiry(
            "c",
            CredentialExpiryKind::ClientSecret,
            Some(SystemTime::now()),
        );
        m.set_token_state("c", Some(SystemTime::now()), Some(SystemTime::now()));
        let board = Board::new();
        board.set_targets(vec![target("a", Protocol::Imap)]);
        board.record(
            &Key::new("a", Protocol::Imap),
            result(Reason::Throttled, true),
        );
        let t = String::from_utf8(m.render(&board.rows(), Format::Prometheus, false)).unwrap();
        let helps: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("# HELP mail_oauth_"))
            .collect();
        assert!(helps.len() >= 15, "{t}");
        for h in helps {
            assert!(h.ends_with(FROM_PROBES), "{h}");
        }
        assert!(
            t.contains(
                "mail_oauth_fleet_probe_duration_seconds_bucket{protocol=\"imap\",le=\"0.1\"} 1\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("# TYPE mail_oauth_probe_duration_seconds gauge\n"),
            "{t}"
        );
    }
}
