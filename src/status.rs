//! The status board: the one store of per-row state, a row being one configured mailbox
//! and protocol. The status page, `/api/v1/status`, readiness and the per-row metric
//! families (rendered from [`Board::rows`] at scrape time by `metrics`) all read it, so a
//! result that arrives after a reload removed its row is refused here and shows nowhere,
//! and a row's `mail_oauth_probe_result` is one series because the row holds one reason.
//!
//! Rows are immutable behind an `Arc`: a result replaces its row's pointer, and a scrape
//! copies the list of pointers under the lock and renders without it.
//!
//! A probe arrives as a [`ProbeResult`], classified; the row keeps a compact copy of its
//! last one (private, read through [`Row`]'s methods and [`Board::transcript`]), and
//! [`RowStatus`] is the view of a whole row that `/api/v1/status` and the page show.
//!
//! Memory per row is what the page and the metrics need: the target's names, the last
//! result (reason, detail, times, phases), a few failure counters, the last 48 probes
//! (a fixed 244-byte ring, see [`crate::history`]), and at most one
//! transcript, bounded board-wide (see [`SUCCESS_TRANSCRIPTS`] and
//! [`FAILURE_TRANSCRIPT_BYTES`]).

use crate::Protocol;
use crate::history::History;
use crate::probe::{Phase, Phases, ProbeReport};
use crate::reason::Reason;
use crate::token::TokenError;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::scheduler::Key;

/// The contract's cardinality bound: the most series one row has on `/metrics`.
pub const MAX_SERIES_PER_ROW: usize = 15;
/// Transcripts of successful probes kept, board-wide: the most recent ones. A login that
/// works says little a fresh `probe` run would not; 30,000 of them would be ~40 MiB.
pub const SUCCESS_TRANSCRIPTS: usize = 256;
/// Bytes of failed probes' transcripts kept, board-wide; past it the oldest are dropped
/// (in a fleet-wide outage, the most recent few thousand say what the others would).
pub const FAILURE_TRANSCRIPT_BYTES: usize = 8 << 20;
/// The most bytes of one kept transcript: longer ones keep their head and their tail,
/// where the failure is.
pub const MAX_TRANSCRIPT_BYTES: usize = 16 << 10;
/// Failure reasons whose counters one row remembers (the most recently seen).
const MAX_FAILURE_REASONS: usize = 8;

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

/// One finished probe, classified: what the board records for a row, what the `probe`
/// command prints, what a probe's reason is read from. Built by [`ProbeResult::from_report`]
/// (a login was tried) or [`ProbeResult::from_token_error`] (the token step failed), the
/// two places where a probe's outcome meets `crate::classify`. The detail and transcript
/// are already redacted (the prober redacts as it records).
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// The contract's reason; [`Reason::Ok`] when the login and post-auth check worked.
    pub reason: Reason,
    /// The human detail behind a failure (server reply, challenge JSON, AADSTS code),
    /// redacted; empty on success.
    pub detail: String,
    /// When the probe ended (wall clock): the row's `last_run`.
    pub finished_at: SystemTime,
    /// Connect start to the server's reply to the auth step (the contract's
    /// `mail_oauth_probe_duration_seconds`); `None` when the auth step was not reached.
    pub duration: Option<Duration>,
    pub phases: Phases,
    /// Earliest notAfter (unix seconds) of the chain the server presented.
    pub tls_not_after: Option<i64>,
    /// `TLSv1.3`, `TLSv1.2`; `None` when no TLS session was made.
    pub tls_version: Option<String>,
    /// `None` when no connection was made (the token step failed).
    pub transcript: Option<String>,
}

impl ProbeResult {
    /// A login that was tried, finished now: its outcome classified (`crate::classify`),
    /// its timings, TLS facts and transcript as the prober recorded them.
    pub fn from_report(report: &ProbeReport) -> ProbeResult {
        let (reason, detail) = match &report.outcome {
            Ok(()) => (Reason::Ok, String::new()),
            Err(e) => (crate::classify::probe::reason(e), e.detail()),
        };
        ProbeResult {
            reason,
            detail,
            finished_at: SystemTime::now(),
            duration: report.duration,
            phases: report.phases,
            tls_not_after: report.tls_not_after,
            tls_version: report.tls_version.clone(),
            transcript: Some(report.transcript.render()),
        }
    }

    /// A probe whose token request failed, finished now: the token's reason and detail
    /// (`crate::classify::token`); no login was attempted, so no timings, no TLS facts
    /// and no transcript.
    pub fn from_token_error(e: &TokenError) -> ProbeResult {
        ProbeResult {
            reason: crate::classify::token::reason(e),
            detail: crate::classify::token::detail(e),
            finished_at: SystemTime::now(),
            duration: None,
            phases: Phases::default(),
            tls_not_after: None,
            tls_version: None,
            transcript: None,
        }
    }
}

/// A row's fixed part; replaced only when a reload changes its target.
#[derive(Debug)]
pub struct RowInfo {
    pub target: TargetInfo,
    /// `mailbox="…",protocol="…"`, escaped for the exposition formats once, not per scrape.
    pub labels: Box<str>,
    /// Unique for the board's lifetime: a row removed and added again is a new row.
    id: u64,
}

/// One mailbox × protocol: what the page and the metrics show of it.
#[derive(Debug, Clone)]
pub struct Row {
    pub info: Arc<RowInfo>,
    /// Probes finished (`mail_oauth_probes_total`).
    pub probes: u64,
    /// The last probe's result, compacted; read through [`Row::last_reason`],
    /// [`Row::last_run`], [`Row::phase_micros`] and [`Board::transcript`].
    last: Option<CompactResult>,
    pub last_success: Option<SystemTime>,
    /// Connect start to the auth reply, of the most recent probe that reached the auth step.
    pub auth_duration: Option<Duration>,
    /// Earliest notAfter of the chain the server last presented, unix seconds; kept when a
    /// later probe does not get that far.
    pub tls_not_after: Option<i64>,
    /// Failed probes by reason, the most recently failed reason first.
    failures: Arc<[(Reason, u64)]>,
    /// The last probes' reasons and times (244 bytes, fixed).
    pub history: History,
    /// When the current run of failed probes began; `None` while the row logs in.
    pub failing_since: Option<SystemTime>,
}

/// The board's copy of a row's last [`ProbeResult`], in fewer bytes: boxed strings,
/// phases in microseconds, the transcript kept apart (in [`Transcripts`], bounded
/// board-wide) and the notAfter in the row (kept across probes that do not reach TLS).
#[derive(Debug, Clone)]
struct CompactResult {
    reason: Reason,
    /// Redacted; empty on success.
    detail: Box<str>,
    finished_at: SystemTime,
    /// Connect start to the auth reply; `None` when the auth step was not reached.
    duration: Option<Duration>,
    phases: CompactPhases,
    tls_version: Option<Box<str>>,
    /// False when no connection was made (the token step failed).
    connected: bool,
}

impl CompactResult {
    /// The compact copy of `result`, and its transcript, which the board keeps apart.
    fn split(result: ProbeResult) -> (CompactResult, Option<String>) {
        let compact = CompactResult {
            reason: result.reason,
            detail: result.detail.into_boxed_str(),
            finished_at: result.finished_at,
            duration: result.duration,
            phases: CompactPhases::new(&result.phases),
            tls_version: result.tls_version.map(String::into_boxed_str),
            connected: result.transcript.is_some(),
        };
        (compact, result.transcript)
    }

    /// The result again, with the row's notAfter and the transcript the board kept.
    fn expand(&self, tls_not_after: Option<i64>, transcript: Option<String>) -> ProbeResult {
        ProbeResult {
            reason: self.reason,
            detail: self.detail.to_string(),
            finished_at: self.finished_at,
            duration: self.duration,
            phases: self.phases.expand(),
            tls_not_after,
            tls_version: self.tls_version.as_deref().map(String::from),
            transcript,
        }
    }
}

/// Phases in microseconds (`ABSENT` for a phase not reached): 28 bytes instead of 112.
/// Saturates at 71 minutes, far beyond any probe timeout.
#[derive(Debug, Clone, Copy)]
struct CompactPhases([u32; 7]);

impl CompactPhases {
    const ABSENT: u32 = u32::MAX;

    fn new(p: &Phases) -> CompactPhases {
        let mut out = [Self::ABSENT; 7];
        for (slot, (_, d)) in out.iter_mut().zip(p.iter()) {
            if let Some(d) = d {
                *slot = u32::try_from(d.as_micros()).unwrap_or(Self::ABSENT - 1);
            }
        }
        CompactPhases(out)
    }

    fn expand(&self) -> Phases {
        let mut p = Phases::default();
        for (phase, us) in Phase::ALL.iter().zip(self.0) {
            if us != Self::ABSENT {
                p.add(*phase, Duration::from_micros(u64::from(us)));
            }
        }
        p
    }

    fn reached(&self) -> usize {
        self.0.iter().filter(|us| **us != Self::ABSENT).count()
    }
}

impl Row {
    fn new(info: Arc<RowInfo>) -> Row {
        Row {
            info,
            probes: 0,
            last: None,
            last_success: None,
            auth_duration: None,
            tls_not_after: None,
            failures: Arc::from(Vec::new()),
            history: History::default(),
            failing_since: None,
        }
    }

    /// The last probe's reason; `None` until the row's first probe finished.
    pub fn last_reason(&self) -> Option<Reason> {
        self.last.as_ref().map(|l| l.reason)
    }

    /// When the last probe finished; `None` until the row's first probe finished.
    pub fn last_run(&self) -> Option<SystemTime> {
        self.last.as_ref().map(|l| l.finished_at)
    }

    /// Each phase the last probe reached, in microseconds, in [`Phase::ALL`] order (none
    /// before the first probe).
    pub fn phase_micros(&self) -> impl Iterator<Item = (Phase, u32)> + '_ {
        let us = self
            .last
            .as_ref()
            .map_or([CompactPhases::ABSENT; 7], |l| l.phases.0);
        Phase::ALL
            .iter()
            .zip(us)
            .filter(|(_, us)| *us != CompactPhases::ABSENT)
            .map(|(p, us)| (*p, us))
    }

    /// The series this row has on `/metrics` besides its failure counters.
    pub fn series_without_failures(&self) -> usize {
        let Some(last) = &self.last else {
            return 1; // probes_total, 0 until the first probe
        };
        // probes_total, probe_success, probe_result, last_run
        4 + last.phases.reached()
            + usize::from(self.auth_duration.is_some())
            + usize::from(self.last_success.is_some())
            + usize::from(self.tls_not_after.is_some())
    }

    /// The failure counters `/metrics` shows: the most recently failed reasons, as many
    /// as keep the row within [`MAX_SERIES_PER_ROW`] (the current reason always among
    /// them). A counter left out keeps counting and comes back with its total.
    pub fn failures_shown(&self) -> &[(Reason, u64)] {
        let room = MAX_SERIES_PER_ROW
            .saturating_sub(self.series_without_failures())
            .max(1);
        &self.failures[..room.min(self.failures.len())]
    }

    /// Every failure counter the row remembers, the most recent reason first.
    pub fn failures(&self) -> &[(Reason, u64)] {
        &self.failures
    }
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
    /// The last failed token request (kept after later successes; compare with
    /// `token_last_success`).
    pub last_error: Option<TokenFailure>,
    /// Where the last token exchange (redacted) is served; absent before one was made.
    pub transcript_url: Option<String>,
}

/// A credential's last token exchange: when it ended, and what was sent and received,
/// redacted.
pub type TokenExchange = (SystemTime, Arc<str>);

/// A failed token request: the contract's reason and when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenFailure {
    pub reason: Reason,
    /// RFC 3339 UTC.
    #[serde(serialize_with = "ser_time_req")]
    pub at: SystemTime,
}

impl CredentialStatus {
    /// The last token request failed (no success since): the credential does not work now.
    pub fn failing(&self) -> Option<TokenFailure> {
        self.last_error
            .filter(|e| self.token_last_success.is_none_or(|ok| e.at >= ok))
    }
}

/// A kept transcript: the row's most recent one, from its probe number `probe`.
#[derive(Debug)]
struct Kept {
    probe: u64,
    failed: bool,
    text: Box<str>,
}

/// The transcripts the board keeps, by row id, within the bounds above.
#[derive(Debug, Default)]
struct Transcripts {
    kept: HashMap<u64, Kept>,
    /// Oldest first; (row id, probe number). An entry whose row has since moved on is
    /// skipped when it comes up.
    successes: VecDeque<(u64, u64)>,
    failures: VecDeque<(u64, u64)>,
    failure_bytes: usize,
    kept_failures: usize,
}

impl Transcripts {
    fn put(&mut self, id: u64, probe: u64, failed: bool, text: String) {
        self.remove(id);
        let text = cap_transcript(text);
        if failed {
            self.failure_bytes += text.len();
            self.kept_failures += 1;
            self.failures.push_back((id, probe));
        } else {
            self.successes.push_back((id, probe));
        }
        self.kept.insert(
            id,
            Kept {
                probe,
                failed,
                text,
            },
        );
        while self.successes.len() > SUCCESS_TRANSCRIPTS {
            if let Some((id, probe)) = self.successes.pop_front() {
                self.remove_if(id, probe);
            }
        }
        while self.failure_bytes > FAILURE_TRANSCRIPT_BYTES {
            let Some((id, probe)) = self.failures.pop_front() else {
                break;
            };
            self.remove_if(id, probe);
        }
        // Rows failing again and again leave stale entries behind: sweep them before the
        // queue outgrows what it tracks.
        if self.failures.len() > 2 * self.kept_failures + 64 {
            let kept = &self.kept;
            self.failures
                .retain(|(id, p)| kept.get(id).is_some_and(|k| k.probe == *p));
        }
    }

    fn remove_if(&mut self, id: u64, probe: u64) {
        if self.kept.get(&id).is_some_and(|k| k.probe == probe) {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(k) = self.kept.remove(&id)
            && k.failed
        {
            self.failure_bytes -= k.text.len();
            self.kept_failures -= 1;
        }
    }

    fn get(&self, id: u64, probe: u64) -> Option<&str> {
        self.kept
            .get(&id)
            .filter(|k| k.probe == probe)
            .map(|k| &*k.text)
    }
}

/// A transcript within [`MAX_TRANSCRIPT_BYTES`]: whole, or its head and tail cut at line
/// boundaries with a note of what was left out between them.
fn cap_transcript(text: String) -> Box<str> {
    if text.len() <= MAX_TRANSCRIPT_BYTES {
        return text.into_boxed_str();
    }
    let head_max = MAX_TRANSCRIPT_BYTES / 4;
    let tail_max = MAX_TRANSCRIPT_BYTES - head_max - 64;
    let mut head_end = head_max;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let head_end = text[..head_end].rfind('\n').map_or(head_end, |i| i + 1);
    let mut tail_start = text.len() - tail_max;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    let tail_start = text[tail_start..]
        .find('\n')
        .map_or(tail_start, |i| tail_start + i + 1);
    let cut = &text[head_end..tail_start];
    let mut out = String::with_capacity(head_end + 80 + text.len() - tail_start);
    out.push_str(&text[..head_end]);
    out.push_str(&format!(
        "... {} lines ({} bytes) not kept ...\n",
        cut.matches('\n').count(),
        cut.len()
    ));
    out.push_str(&text[tail_start..]);
    out.into_boxed_str()
}

#[derive(Debug, Default)]
struct Inner {
    rows: BTreeMap<Key, Arc<Row>>,
    /// Rows not probed yet.
    pending: usize,
    next_id: u64,
    transcripts: Transcripts,
    credentials: BTreeMap<String, CredentialStatus>,
    /// Per configured credential, its last redacted token exchange and when it ended
    /// (at most `token::http::MAX_EXCHANGE_BYTES` each).
    exchanges: BTreeMap<String, TokenExchange>,
    config: ConfigStatus,
    /// Once every configured probe has run, readiness stays (a reload adding mailboxes
    /// must not take a running exporter out of its Service).
    ready_latched: bool,
    stopping: bool,
    /// Per credential with `graph:`, what Microsoft Graph said last.
    graph: BTreeMap<String, crate::graph::GraphStatus>,
}

/// Shared by the prober (writes), the HTTP server and the metrics (reads).
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

impl Board {
    pub fn new() -> Board {
        Board::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data behind this lock: a panic cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the board hold exactly `targets`: new ones start pending, removed ones
    /// disappear (and with them their series), kept ones keep their history.
    pub fn set_targets(&self, targets: Vec<TargetInfo>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let wanted: BTreeMap<Key, TargetInfo> = targets
            .into_iter()
            .map(|t| (Key::new(&t.mailbox, t.protocol), t))
            .collect();
        inner.rows.retain(|key, row| {
            let keep = wanted.contains_key(key);
            if !keep {
                inner.transcripts.remove(row.info.id);
                if row.last.is_none() {
                    inner.pending -= 1;
                }
            }
            keep
        });
        for (key, target) in wanted {
            match inner.rows.get_mut(&key) {
                Some(row) if row.info.target == target => {}
                Some(row) => {
                    let info = row_info(target, row.info.id);
                    *row = Arc::new(Row {
                        info,
                        ..Row::clone(row)
                    });
                }
                None => {
                    let info = row_info(target, inner.next_id);
                    inner.next_id += 1;
                    inner.pending += 1;
                    inner.rows.insert(key, Arc::new(Row::new(info)));
                }
            }
        }
    }

    /// Records a finished probe; `false` (and nothing recorded) when its row is no longer
    /// configured.
    pub fn record(&self, key: &Key, result: ProbeResult) -> bool {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(slot) = inner.rows.get_mut(key) else {
            return false;
        };
        let old: &Row = slot;
        let ok = result.reason == Reason::Ok;
        let failures = if ok {
            old.failures.clone()
        } else {
            let mut f: Vec<(Reason, u64)> = Vec::with_capacity(old.failures.len() + 1);
            let before = old
                .failures
                .iter()
                .find(|(r, _)| *r == result.reason)
                .map_or(0, |(_, n)| *n);
            f.push((result.reason, before + 1));
            f.extend(old.failures.iter().filter(|(r, _)| *r != result.reason));
            f.truncate(MAX_FAILURE_REASONS);
            Arc::from(f)
        };
        if old.last.is_none() {
            inner.pending -= 1;
        }
        let probes = old.probes + 1;
        let (history, failing_since) = next_history(old, &result);
        let tls_not_after = result.tls_not_after.or(old.tls_not_after);
        let (last, transcript) = CompactResult::split(result);
        let row = Row {
            history,
            failing_since,
            info: old.info.clone(),
            probes,
            last_success: if ok {
                Some(last.finished_at)
            } else {
                old.last_success
            },
            auth_duration: last.duration.or(old.auth_duration),
            tls_not_after,
            failures,
            last: Some(last),
        };
        let id = row.info.id;
        *slot = Arc::new(row);
        match transcript {
            Some(t) => inner.transcripts.put(id, probes, !ok, t),
            None => inner.transcripts.remove(id),
        }
        true
    }

    /// Every row, in mailbox and protocol order: what a scrape renders. The lock is held
    /// only to copy the pointers.
    pub fn rows(&self) -> Vec<Arc<Row>> {
        self.lock().rows.values().cloned().collect()
    }

    /// Sets the credentials the config names; returns the names of those it no longer
    /// names (whose series the caller removes).
    pub fn set_credentials(&self, credentials: Vec<CredentialStatus>) -> Vec<String> {
        let mut inner = self.lock();
        let old = std::mem::take(&mut inner.credentials);
        inner.credentials = credentials
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let inner = &mut *inner;
        inner
            .exchanges
            .retain(|name, _| inner.credentials.contains_key(name));
        old.into_keys()
            .filter(|name| !inner.credentials.contains_key(name))
            .collect()
    }

    /// A credential's token state after a probe asked for its token; `false` when the
    /// credential is no longer configured.
    pub fn token_state(
        &self,
        name: &str,
        expiry: Option<SystemTime>,
        last_success: Option<SystemTime>,
        save_error: Option<String>,
    ) -> bool {
        let mut inner = self.lock();
        let Some(c) = inner.credentials.get_mut(name) else {
            return false;
        };
        c.token_expiry = expiry;
        c.token_last_success = last_success;
        c.save_error = save_error;
        true
    }

    /// A credential's last token exchange (redacted); `false` when the credential is no
    /// longer configured.
    pub fn token_exchange(&self, name: &str, exchange: Option<TokenExchange>) -> bool {
        let mut inner = self.lock();
        if !inner.credentials.contains_key(name) {
            return false;
        }
        match exchange {
            Some(e) => inner.exchanges.insert(name.to_string(), e),
            None => inner.exchanges.remove(name),
        };
        true
    }

    /// A credential's status and its last token exchange, redacted, with when it ended;
    /// `None` when the credential is not configured.
    pub fn token_transcript(
        &self,
        name: &str,
    ) -> Option<(CredentialStatus, Option<TokenExchange>)> {
        let inner = self.lock();
        let c = inner.credentials.get(name)?.clone();
        Some((c, inner.exchanges.get(name).cloned()))
    }

    /// A credential's last failed token request; `false` when the credential is no
    /// longer configured.
    pub fn token_failure(&self, name: &str, last_error: Option<TokenFailure>) -> bool {
        let mut inner = self.lock();
        let Some(c) = inner.credentials.get_mut(name) else {
            return false;
        };
        c.last_error = last_error;
        true
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
        if inner.pending == 0 {
            inner.ready_latched = true;
        }
        inner.ready_latched
    }

    /// Shutdown began: readiness goes to 503 so traffic and scrapes move elsewhere.
    pub fn set_stopping(&self) {
        self.lock().stopping = true;
    }

    /// The most recent probe of `key` with its redacted transcript: `None` inside when no
    /// connection was made, a note when the transcript was not kept.
    pub fn transcript(&self, key: &Key) -> Option<(TargetInfo, Option<ProbeResult>)> {
        let inner = self.lock();
        let row = inner.rows.get(key)?;
        let last = row.last.as_ref().map(|l| {
            let transcript = l.connected.then(|| {
                match inner.transcripts.get(row.info.id, row.probes) {
                    Some(t) => t.to_string(),
                    None => format!(
                        "# transcript not kept: the board keeps the latest {SUCCESS_TRANSCRIPTS} \
                         successful probes' transcripts and {} MiB of failed ones; \
                         `mail-oauth-exporter probe` shows a fresh one\n",
                        FAILURE_TRANSCRIPT_BYTES >> 20
                    ),
                }
            });
            l.expand(row.tls_not_after, transcript)
        });
        Some((row.info.target.clone(), last))
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
            probes: inner
                .rows
                .values()
                .map(|r| {
                    let kept = inner.transcripts.get(r.info.id, r.probes).is_some();
                    let mut p = RowStatus::new(r, kept);
                    // A row that failed before connecting links its token exchange.
                    if p.transcript_url.is_none()
                        && p.stage == Some("token")
                        && inner.exchanges.contains_key(&p.credential)
                    {
                        p.transcript_url = Some(credential_transcript_url(&p.credential));
                    }
                    p.fix_command = p
                        .reason
                        .filter(|_| {
                            // `login` bootstraps delegated (refresh token) credentials only.
                            inner
                                .credentials
                                .get(&p.credential)
                                .is_some_and(|c| c.grant == "refresh_token")
                        })
                        .and_then(|reason| fix_command(reason, &inner.config.file, &p.credential));
                    p
                })
                .collect(),
            credentials: inner
                .credentials
                .values()
                .map(|c| {
                    // A date the config declares wins; without one, the end date Microsoft
                    // Graph holds for the secret (or certificate) in use is the expiry.
                    let graph = inner.graph.get(&c.name);
                    CredentialStatus {
                        transcript_url: inner
                            .exchanges
                            .contains_key(&c.name)
                            .then(|| credential_transcript_url(&c.name)),
                        client_secret_expiry: c
                            .client_secret_expiry
                            .or_else(|| graph.and_then(|g| g.client_secret_end)),
                        certificate_expiry: c
                            .certificate_expiry
                            .or_else(|| graph.and_then(|g| g.certificate_end)),
                        ..c.clone()
                    }
                })
                .collect(),
            graph: inner.graph.values().cloned().collect(),
        }
    }
}

/// The command that fixes `reason` for `credential` (a delegated one: `login` makes a
/// refresh token), if a command does.
pub fn fix_command(reason: Reason, config_file: &str, credential: &str) -> Option<String> {
    match reason {
        Reason::TokenMissing | Reason::TokenInvalidGrant => Some(format!(
            "mail-oauth-exporter login --config {} --credential {}",
            shell_quote(config_file),
            shell_quote(credential)
        )),
        _ => None,
    }
}

/// `s` as one POSIX shell word: as is when it holds only characters no shell treats
/// specially, else in single quotes.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The history and failure streak start after `result`.
fn next_history(old: &Row, result: &ProbeResult) -> (History, Option<SystemTime>) {
    let mut history = old.history.clone();
    history.push(result.finished_at, result.reason);
    let failing_since = match result.reason {
        Reason::Ok => None,
        _ => Some(old.failing_since.unwrap_or(result.finished_at)),
    };
    (history, failing_since)
}

fn row_info(target: TargetInfo, id: u64) -> Arc<RowInfo> {
    let labels = crate::metrics::label_pairs(&[
        ("mailbox", &target.mailbox),
        ("protocol", target.protocol.as_str()),
    ]);
    Arc::new(RowInfo {
        target,
        labels: labels.into_boxed_str(),
        id,
    })
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
    /// One entry per row, in mailbox and protocol order (the key is `probes`, as
    /// docs/ documents it).
    pub probes: Vec<RowStatus>,
    pub credentials: Vec<CredentialStatus>,
    /// Microsoft Graph: per credential with `graph:`, service health, open incidents and
    /// secret end dates.
    pub graph: Vec<crate::graph::GraphStatus>,
}

/// One row (a mailbox and protocol) as `/api/v1/status` and the status page show it: its
/// target, its last probe's result, its counters and history. Built from a [`Row`] when a
/// snapshot is taken; a view of the row, not a probe's outcome (that is [`ProbeResult`]).
#[derive(Debug, Clone, Serialize)]
pub struct RowStatus {
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
    /// Earliest notAfter of the chain the server last presented (kept when a later
    /// probe does not reach TLS).
    #[serde(serialize_with = "ser_unix")]
    pub tls_not_after: Option<i64>,
    pub tls_version: Option<String>,
    pub probes: u64,
    /// Where the last redacted transcript is served; absent when none was recorded or kept.
    pub transcript_url: Option<String>,
    /// The command that fixes this failure, when one exists (`mail-oauth-exporter login
    /// --config FILE --credential NAME` for a refresh token that is missing or was
    /// rejected), with the running config's path and the credential's name, quoted for a
    /// POSIX shell where needed.
    pub fix_command: Option<String>,
    /// The last probes (at most [`crate::history::HISTORY_LEN`]), oldest first.
    pub history: Vec<HistoryEntry>,
    /// When the current run of failed probes began (RFC 3339); absent unless failing.
    #[serde(serialize_with = "ser_time", skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<SystemTime>,
}

/// One probe of a row's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// When the probe finished: RFC 3339 UTC, whole seconds.
    #[serde(serialize_with = "ser_time_req")]
    pub at: SystemTime,
    pub reason: Reason,
}

impl RowStatus {
    /// Page order: permanent failures, transient ones, logins that work, rows not probed
    /// yet (what someone opening the page looks for first).
    pub fn severity(&self) -> u8 {
        match (self.state, self.transient) {
            ("failed", Some(false)) => 0,
            ("failed", _) => 1,
            ("ok", _) => 2,
            _ => 3,
        }
    }

    fn new(row: &Row, transcript_kept: bool) -> RowStatus {
        let last = row.last.as_ref();
        let reason = last.map(|l| l.reason);
        let t = &row.info.target;
        RowStatus {
            mailbox: t.mailbox.clone(),
            protocol: t.protocol,
            credential: t.credential.clone(),
            address: t.address.clone(),
            target: t.target.clone(),
            interval_seconds: t.interval.as_secs_f64(),
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
            detail: last.map(|l| l.detail.to_string()).filter(|d| !d.is_empty()),
            last_run: last.map(|l| l.finished_at),
            last_success: row.last_success,
            duration_seconds: last.and_then(|l| l.duration).map(|d| d.as_secs_f64()),
            phases: last.map(|l| l.phases.expand()),
            tls_not_after: row.tls_not_after,
            tls_version: last.and_then(|l| l.tls_version.as_deref().map(String::from)),
            probes: row.probes,
            transcript_url: transcript_kept.then(|| transcript_url(&t.mailbox, t.protocol)),
            fix_command: None,
            history: row
                .history
                .iter()
                .map(|(at, reason)| HistoryEntry { at, reason })
                .collect(),
            failing_since: row.failing_since,
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

/// `/transcript?credential=..`, percent-encoded: the credential's last token exchange.
pub fn credential_transcript_url(credential: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("credential", credential)
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

fn ser_time_req<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_unix<S: serde::Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(secs) if *secs >= 0 => {
            s.serialize_str(&rfc3339(UNIX_EPOCH + Duration::from_secs(*secs as u64)))
        }
        _ => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(mailbox: &str) -> TargetInfo {
        TargetInfo {
            mailbox: mailbox.into(),
            protocol: Protocol::Imap,
            credential: "c".into(),
            address: "a@example.com".into(),
            target: "imap://h:993".into(),
            interval: Duration::from_secs(60),
        }
    }

    fn result(reason: Reason, transcript: &str) -> ProbeResult {
        ProbeResult {
            reason,
            detail: String::new(),
            finished_at: SystemTime::now(),
            duration: None,
            phases: Phases::default(),
            tls_not_after: None,
            tls_version: None,
            transcript: Some(transcript.to_string()),
        }
    }

    fn key(m: &str) -> Key {
        Key::new(m, Protocol::Imap)
    }

    fn kept(board: &Board, m: &str) -> Option<String> {
        board.transcript(&key(m))?.1?.transcript
    }

    #[test]
    fn failures_keep_their_transcripts_successes_only_the_latest() {
        let board = Board::new();
        let n = SUCCESS_TRANSCRIPTS + 10;
        board.set_targets((0..n).map(|i| target(&format!("m{i}"))).collect());
        assert!(!board.ready());
        board.record(&key("m0"), result(Reason::AuthRejected, "S: NO failed\n"));
        for i in 1..n {
            board.record(
                &key(&format!("m{i}")),
                result(Reason::Ok, &format!("S: OK {i}\n")),
            );
        }
        assert!(board.ready());
        assert_eq!(kept(&board, "m0").unwrap(), "S: NO failed\n");
        assert_eq!(
            kept(&board, &format!("m{}", n - 1)).unwrap(),
            format!("S: OK {}\n", n - 1)
        );
        // The oldest successes' transcripts were let go, with a note instead.
        let old = kept(&board, "m1").unwrap();
        assert!(old.starts_with("# transcript not kept"), "{old}");
        let snapshot = board.snapshot();
        let with_link = snapshot
            .probes
            .iter()
            .filter(|p| p.transcript_url.is_some())
            .count();
        assert_eq!(with_link, SUCCESS_TRANSCRIPTS + 1);
    }

    #[test]
    fn failed_transcripts_are_capped_each_and_in_all() {
        let board = Board::new();
        let rows = 2 * FAILURE_TRANSCRIPT_BYTES / MAX_TRANSCRIPT_BYTES;
        board.set_targets((0..rows).map(|i| target(&format!("m{i}"))).collect());
        let line = format!("S: {}\n", "x".repeat(500));
        let long = format!("S: first\n{}S: the failure\n", line.repeat(40));
        for round in 0..3 {
            for i in 0..rows {
                board.record(&key(&format!("m{i}")), result(Reason::ProtocolError, &long));
            }
            let inner = board.lock();
            let t = &inner.transcripts;
            assert!(t.failure_bytes <= FAILURE_TRANSCRIPT_BYTES, "round {round}");
            assert!(t.failure_bytes >= FAILURE_TRANSCRIPT_BYTES - MAX_TRANSCRIPT_BYTES);
            assert!(
                t.failures.len() <= 2 * t.kept_failures + 64 + 1,
                "{}",
                t.failures.len()
            );
        }
        let last = kept(&board, &format!("m{}", rows - 1)).unwrap();
        assert!(last.len() <= MAX_TRANSCRIPT_BYTES, "{}", last.len());
        assert!(last.starts_with("S: first\n") && last.ends_with("S: the failure\n"));
        assert!(
            last.contains("lines (") && last.contains("bytes) not kept ..."),
            "{last}"
        );
        assert!(
            kept(&board, "m0")
                .unwrap()
                .starts_with("# transcript not kept")
        );
        // Removing rows gives their bytes back.
        board.set_targets(vec![]);
        assert_eq!(board.lock().transcripts.failure_bytes, 0);
        assert!(board.lock().transcripts.kept.is_empty());
    }

    #[test]
    fn fix_commands_name_the_config_and_credential_quoted() {
        assert_eq!(
            fix_command(
                Reason::TokenInvalidGrant,
                "/etc/moe/config.yaml",
                "former-user"
            )
            .unwrap(),
            "mail-oauth-exporter login --config /etc/moe/config.yaml --credential former-user"
        );
        assert_eq!(
            fix_command(Reason::TokenMissing, "/etc/my dir/it's.yaml", "a;b").unwrap(),
            "mail-oauth-exporter login --config '/etc/my dir/it'\\''s.yaml' --credential 'a;b'"
        );
        assert_eq!(fix_command(Reason::AuthRejected, "/c.yaml", "x"), None);
    }

    #[test]
    fn history_and_failing_since_follow_the_results() {
        let board = Board::new();
        board.set_targets(vec![target("a")]);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let push = |s: u64, reason: Reason| {
            let mut r = result(reason, "");
            r.finished_at = at(s);
            board.record(&key("a"), r);
        };
        push(0, Reason::Ok);
        push(60, Reason::AuthRejected);
        push(120, Reason::TokenInvalidGrant);
        let row = &board.snapshot().probes[0];
        assert_eq!(row.failing_since, Some(at(60)));
        let h: Vec<_> = row.history.iter().map(|e| (e.at, e.reason)).collect();
        assert_eq!(
            h,
            [
                (at(0), Reason::Ok),
                (at(60), Reason::AuthRejected),
                (at(120), Reason::TokenInvalidGrant)
            ]
        );
        assert_eq!(row.severity(), 0);
        push(180, Reason::Ok);
        let row = &board.snapshot().probes[0];
        assert_eq!(row.failing_since, None);
        assert_eq!(row.severity(), 2);
        let json = serde_json::to_value(row).unwrap();
        assert!(json.get("failing_since").is_none(), "{json}");
        assert_eq!(json["history"][3]["at"], "2027-01-15T08:03:00Z");
        for s in 0..100 {
            push(240 + s, Reason::ConnectTimeout);
        }
        let row = &board.snapshot().probes[0];
        assert_eq!(row.history.len(), crate::history::HISTORY_LEN);
        assert_eq!(row.failing_since, Some(at(240)));
        assert_eq!(row.severity(), 1);
    }

    const REFUSAL: &str = "A01 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)";

    /// A report of a login the server refused at the auth step, over TLS 1.3.
    fn refused_report() -> ProbeReport {
        use crate::probe::transcript::Direction;
        use crate::probe::{ProbeError, Transcript};
        let mut transcript = Transcript::default();
        let redactor = crate::redact::Redactor::new();
        transcript.push(Duration::ZERO, Direction::Server, REFUSAL, &redactor);
        let mut phases = Phases::default();
        phases.add(Phase::Connect, Duration::from_millis(21));
        phases.add(Phase::Auth, Duration::from_millis(190));
        ProbeReport {
            outcome: Err(ProbeError::Refused {
                phase: Phase::Auth,
                reply: REFUSAL.into(),
                challenge: None,
            }),
            phases,
            duration: Some(Duration::from_millis(280)),
            total: Duration::from_millis(300),
            transcript,
            tls_not_after: Some(1_790_812_800),
            tls_version: Some("TLSv1.3".into()),
        }
    }

    #[test]
    fn results_classify_a_report_and_a_token_error() {
        let mut report = refused_report();
        let r = ProbeResult::from_report(&report);
        assert_eq!(r.reason, Reason::AuthRejected);
        assert_eq!(r.detail, REFUSAL);
        assert_eq!(r.duration, Some(Duration::from_millis(280)));
        assert_eq!(r.phases.get(Phase::Auth), Some(Duration::from_millis(190)));
        assert_eq!(r.tls_not_after, Some(1_790_812_800));
        assert_eq!(r.tls_version.as_deref(), Some("TLSv1.3"));
        assert!(r.transcript.unwrap().contains(REFUSAL));
        report.outcome = Ok(());
        let r = ProbeResult::from_report(&report);
        assert_eq!((r.reason, r.detail.as_str()), (Reason::Ok, ""));

        let e = TokenError::Missing {
            credential: "former-user".into(),
        };
        let r = ProbeResult::from_token_error(&e);
        assert_eq!(r.reason, Reason::TokenMissing);
        assert_eq!(r.detail, crate::classify::token::detail(&e));
        assert!(r.detail.contains("former-user"), "{}", r.detail);
        assert!(r.transcript.is_none() && r.duration.is_none());
        assert_eq!(r.phases, Phases::default());
    }

    #[test]
    fn the_board_gives_back_the_result_it_recorded() {
        let board = Board::new();
        board.set_targets(vec![target("a")]);
        let row = &board.rows()[0];
        assert_eq!((row.last_reason(), row.last_run()), (None, None));
        assert_eq!(row.phase_micros().count(), 0);
        let recorded = ProbeResult::from_report(&refused_report());
        board.record(&key("a"), recorded.clone());
        let row = &board.rows()[0];
        assert_eq!(row.last_reason(), Some(Reason::AuthRejected));
        assert_eq!(row.last_run(), Some(recorded.finished_at));
        assert_eq!(
            row.phase_micros().collect::<Vec<_>>(),
            [(Phase::Connect, 21_000), (Phase::Auth, 190_000)]
        );
        let (_, last) = board.transcript(&key("a")).unwrap();
        let last = last.unwrap();
        assert_eq!(last.reason, recorded.reason);
        assert_eq!(last.detail, REFUSAL);
        assert_eq!(last.finished_at, recorded.finished_at);
        assert_eq!(last.duration, recorded.duration);
        assert_eq!(last.phases, recorded.phases);
        assert_eq!(last.tls_not_after, recorded.tls_not_after);
        assert_eq!(last.tls_version, recorded.tls_version);
        assert_eq!(last.transcript, recorded.transcript);
    }

    #[test]
    fn a_token_failure_has_no_transcript_and_a_reload_keeps_history() {
        let board = Board::new();
        board.set_targets(vec![target("a")]);
        let mut r = result(Reason::TokenInvalidGrant, "");
        r.transcript = None;
        board.record(&key("a"), r);
        let (_, last) = board.transcript(&key("a")).unwrap();
        assert!(last.unwrap().transcript.is_none());
        let mut changed = target("a");
        changed.address = "b@example.com".into();
        board.set_targets(vec![changed]);
        let rows = board.rows();
        assert_eq!(rows[0].probes, 1);
        assert_eq!(rows[0].info.target.address, "b@example.com");
        assert_eq!(rows[0].failures(), &[(Reason::TokenInvalidGrant, 1)]);
    }
}
