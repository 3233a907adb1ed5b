//! The long-running monitor: holds the config in force, the token service, the board and
//! the scheduler; turns a config into scheduled jobs and reloads it without losing the
//! old one when the new one is bad.

use crate::config::{Config, ConfigError, Endpoint, Mailbox};
use crate::graph::{GraphClient, GraphTask};
use crate::metrics::Metrics;
use crate::probe::{self, TlsClient};
use crate::reason::Reason;
use crate::scheduler::{Execute, Job, Scheduler};
use crate::shard::Shard;
use crate::status::{
    Board, ConfigStatus, CredentialStatus, Key, ProbeResult, TargetInfo, TokenFailure,
};
use crate::token::{
    Credential, CredentialExpiryKind, Grant, TokenBudget, TokenService, TokenServiceOptions,
};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// What a scheduled job carries: everything one probe needs, shared, compared on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Shared with the running [`Config`] (one copy per mailbox, whatever its protocols).
    pub mailbox: Arc<Mailbox>,
    /// Which of `mailbox.endpoints` this job probes.
    pub endpoint: usize,
    pub credential: Arc<Credential>,
}

impl Payload {
    /// The endpoint this job probes.
    pub fn endpoint(&self) -> &Endpoint {
        &self.mailbox.endpoints[self.endpoint]
    }
}

/// The parts rebuilt only when `tls.ca_file` or `state_dir` change: rebuilding the token
/// service forgets cached access tokens, so it is not done on every reload.
struct Engine {
    tls: TlsClient,
    tokens: TokenService,
    ca_file: Option<PathBuf>,
    state_dir: PathBuf,
}

impl Engine {
    fn new(config: &Config, metrics: &Arc<Metrics>) -> Result<Engine, ConfigError> {
        let file_error = |field: &str, message: String| ConfigError {
            file: config.file.clone(),
            line: 0,
            column: 0,
            field: field.to_string(),
            message,
        };
        let tls = TlsClient::new(config.ca_file.as_deref())
            .map_err(|e| file_error("tls.ca_file", e.to_string()))?;
        let mut options = TokenServiceOptions::new(&config.state_dir);
        options.ca_file = config.ca_file.clone();
        options.observer = metrics.clone();
        let tokens = TokenService::new(options)
            .map_err(|e| file_error("tls.ca_file", format!("token client: {e}")))?;
        Ok(Engine {
            tls,
            tokens,
            ca_file: config.ca_file.clone(),
            state_dir: config.state_dir.clone(),
        })
    }
}

/// Runs one scheduled probe: token, login, classify, record, log.
struct Prober {
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    engine: Arc<RwLock<Arc<Engine>>>,
}

impl Execute<Payload> for Prober {
    fn execute(&self, job: Arc<Job<Payload>>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let engine = read(&self.engine);
        let board = self.board.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let p = &job.payload;
            let cred = &p.credential;
            // One deadline for the run, token request included: a token endpoint that
            // never answers costs this probe its `timeout`, not the HTTP client's.
            let budget = TokenBudget::new(p.mailbox.timeout, p.mailbox.interval);
            // The mailbox is the subject of per-mailbox grants (service accounts).
            let subject = Some(p.mailbox.address.as_str());
            let result = match engine.tokens.access_token_as(cred, subject, budget).await {
                Err(e) => ProbeResult::from_token_error(&e),
                Ok(token) => {
                    let mut spec = p.mailbox.probe_spec(p.endpoint());
                    spec.timeout = budget
                        .deadline
                        .saturating_duration_since(tokio::time::Instant::now());
                    let report = probe::run(&spec, &engine.tls, &token.value).await;
                    let result = ProbeResult::from_report(&report);
                    if result.reason == Reason::AuthTokenExpired {
                        // The server knows better than our clock: fetch a new one next time.
                        engine.tokens.invalidate_as(cred, subject).await;
                    }
                    result
                }
            };
            let save = engine.tokens.save_status(&cred.name);
            let (expiry, last_success) = (
                engine.tokens.token_expiry(&cred.name),
                engine.tokens.last_success(&cred.name),
            );
            // A credential a reload removed meanwhile gets no series back.
            if board.token_state(&cred.name, expiry, last_success, save.save_error) {
                metrics.set_token_state(&cred.name, expiry, last_success);
            }
            board.token_failure(&cred.name, token_failure(&engine.tokens, &cred.name));
            board.token_exchange(&cred.name, engine.tokens.last_exchange(&cred.name));
            log_result(&job, &result);
            let duration = result.duration;
            // The board refuses the result of a row a reload removed meanwhile: then it
            // counts nowhere, the fleet histogram included.
            if board.record(&job.key(), result)
                && let Some(d) = duration
            {
                metrics.observe_probe_duration(job.key.protocol, d);
            }
        })
    }
}

fn log_result(job: &Job<Payload>, r: &ProbeResult) {
    // Tenths of a millisecond: finer is noise in a log line.
    let ms = r
        .duration
        .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0);
    if r.reason == Reason::Ok {
        tracing::info!(
            mailbox = %job.key.mailbox,
            protocol = %job.key.protocol,
            reason = %r.reason,
            duration_ms = ms,
            "probe succeeded"
        );
    } else {
        // The one WARN line of a failed probe, a token failure included (the token service
        // logs those at DEBUG): the detail trimmed, in full at DEBUG.
        tracing::warn!(
            mailbox = %job.key.mailbox,
            protocol = %job.key.protocol,
            credential = %job.payload.credential.name,
            reason = %r.reason,
            detail = %crate::token::error::bounded(&r.detail, crate::token::error::LOG_DETAIL_MAX),
            duration_ms = ms,
            "probe failed"
        );
        if r.detail.len() > crate::token::error::LOG_DETAIL_MAX {
            tracing::debug!(
                mailbox = %job.key.mailbox,
                protocol = %job.key.protocol,
                detail = %r.detail,
                "probe failed (full detail)"
            );
        }
    }
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    // Only whole values are swapped in under this lock.
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|e| e.into_inner()) = v;
}

/// The running monitor.
pub struct Service {
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    engine: Arc<RwLock<Arc<Engine>>>,
    config: RwLock<Arc<Config>>,
    scheduler: tokio::sync::Mutex<Option<Scheduler<Payload>>>,
    /// Milliseconds since `started` at the heartbeat's last turn.
    heartbeat: Arc<AtomicU64>,
    started: tokio::time::Instant,
    stopping: AtomicBool,
    shard: Option<Shard>,
    /// The running Microsoft Graph loop of each credential with `graph:`, with the
    /// credential and engine it was started for (a change restarts it).
    graph_tasks: Mutex<HashMap<String, GraphRun>>,
}

struct GraphRun {
    cred: Credential,
    engine: usize,
    task: tokio::task::JoinHandle<()>,
}

/// The heartbeat turns this often; `/healthz` fails when it missed many turns.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

impl Service {
    /// Starts scheduling `config`'s probes. Needs a tokio runtime.
    pub fn start(config: Config) -> Result<Arc<Service>, ConfigError> {
        Service::start_sharded(config, None)
    }

    /// Like [`Service::start`], probing only `shard`'s mailboxes (also after reloads).
    pub fn start_sharded(
        config: Config,
        shard: Option<Shard>,
    ) -> Result<Arc<Service>, ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let board = Arc::new(Board::new());
        let engine = Arc::new(RwLock::new(Arc::new(Engine::new(&config, &metrics)?)));
        let prober = Prober {
            board: board.clone(),
            metrics: metrics.clone(),
            engine: engine.clone(),
        };
        let scheduler = Scheduler::new(
            Arc::new(prober) as Arc<dyn Execute<Payload>>,
            config.schedule.max_concurrent_probes,
        );
        let service = Arc::new(Service {
            board,
            metrics,
            engine,
            config: RwLock::new(Arc::new(config.clone())),
            scheduler: tokio::sync::Mutex::new(Some(scheduler)),
            heartbeat: Arc::new(AtomicU64::new(0)),
            started: tokio::time::Instant::now(),
            stopping: AtomicBool::new(false),
            shard,
            graph_tasks: Mutex::new(HashMap::new()),
        });
        service.apply_now(config);
        // A runtime wedged by a blocking call stops this loop, and `/healthz` says so.
        let (beat, started) = (Arc::downgrade(&service.heartbeat), service.started);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                let Some(beat) = beat.upgrade() else { return };
                beat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        });
        Ok(service)
    }

    /// Alive: not shutting down, and the runtime's timers are turning.
    pub fn healthy(&self) -> bool {
        let last = Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        !self.stopping.load(Ordering::Relaxed)
            && self.started.elapsed().saturating_sub(last) < HEARTBEAT_STALE
    }

    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        read(&self.config)
    }

    /// Reloads the config file. A bad one is rejected, logged with its location and
    /// reported by `mail_oauth_config_last_reload_successful`; the old one keeps running.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        let path = self.config().file.clone();
        let mut guard = self.scheduler.lock().await;
        let Some(scheduler) = guard.as_mut() else {
            return Err(ConfigError {
                file: path,
                line: 0,
                column: 0,
                field: String::new(),
                message: "shutting down; not reloaded".into(),
            });
        };
        // Files are read on the blocking pool (the config, and through the engine and
        // `check_files` every file it names): none of them can stall the runtime, and none
        // can block at all (`crate::fsread` refuses FIFOs and devices).
        let current = read(&self.engine);
        let metrics = self.metrics.clone();
        let file = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let config = Config::load(&file)?;
            let engine = engine_for(&current, &config, &metrics)?;
            let problems = config.check_files();
            Ok((config, engine, problems))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError {
                file: path.clone(),
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("reload task failed: {e}"),
            })
        });
        match result {
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; the previous config keeps running");
                self.metrics.config_loaded(false, SystemTime::now());
                let mut st = self.board.config_status();
                st.last_reload_successful = false;
                st.last_error = Some(e.to_string());
                self.board.set_config_status(st);
                Err(e)
            }
            Ok((config, engine, problems)) => {
                if let Some(engine) = engine {
                    write(&self.engine, Arc::new(engine));
                }
                let old = self.config();
                if old.listen != config.listen {
                    tracing::warn!("`listen` changed; it takes effect at the next restart");
                }
                self.install(config, scheduler, problems);
                tracing::info!(file = %path.display(), "config reloaded");
                Ok(())
            }
        }
    }

    fn apply_now(&self, config: Config) {
        let problems = config.check_files();
        // Called from `start` only, before anyone else can hold the lock.
        let mut guard = self
            .scheduler
            .try_lock()
            .expect("the scheduler is not shared yet");
        if let Some(s) = guard.as_mut() {
            self.install(config, s, problems);
        }
    }

    /// Puts `config` in force; `problems` are its [`Config::check_files`] findings.
    fn install(&self, config: Config, scheduler: &mut Scheduler<Payload>, problems: Vec<String>) {
        let config = match self.shard {
            Some(shard) => shard.filter(config),
            None => config,
        };
        for problem in problems {
            // Not fatal: a token file may be written later by another tool; the probes
            // report it with a reason until then.
            tracing::warn!(file = %config.file.display(), "{problem}");
        }
        let engine = read(&self.engine);
        let jobs = jobs(&config);
        let targets = jobs
            .iter()
            .map(|j| {
                let mb = &j.payload.mailbox;
                TargetInfo {
                    mailbox: mb.name.clone(),
                    protocol: j.key.protocol,
                    credential: mb.credential.clone(),
                    address: mb.address.clone(),
                    target: mb.probe_spec(j.payload.endpoint()).target.to_string(),
                    interval: mb.interval,
                }
            })
            .collect();
        let credentials: Vec<CredentialStatus> = config
            .credentials
            .values()
            .map(|c| credential_status(c, &engine.tokens))
            .collect();
        for c in &credentials {
            let m = &self.metrics;
            m.set_credential_expiry(
                &c.name,
                CredentialExpiryKind::ClientSecret,
                c.client_secret_expiry,
            );
            m.set_credential_expiry(
                &c.name,
                CredentialExpiryKind::Certificate,
                c.certificate_expiry,
            );
            m.set_token_state(&c.name, c.token_expiry, c.token_last_success);
        }
        self.board.set_targets(targets);
        for gone in self.board.set_credentials(credentials) {
            self.metrics.remove_credential(&gone);
        }
        self.start_graph(&config, &engine);
        scheduler.apply(jobs, &config.schedule);
        let now = SystemTime::now();
        self.metrics.config_loaded(true, now);
        self.board.set_config_status(ConfigStatus {
            file: config.file.display().to_string(),
            last_reload_successful: true,
            last_reload_success: Some(now),
            last_error: None,
        });
        write(&self.config, Arc::new(config));
    }

    /// Starts, keeps or stops each credential's Microsoft Graph loop to match `config`. A
    /// kept loop's Graph end date is put back on the expiry gauge that `set_credentials`
    /// just reset to the declared dates.
    fn start_graph(&self, config: &Config, engine: &Arc<Engine>) {
        let engine_id = Arc::as_ptr(engine) as usize;
        let mut runs = self.graph_tasks.lock().unwrap_or_else(|e| e.into_inner());
        runs.retain(|name, run| {
            let keep = run.engine == engine_id
                && config
                    .credentials
                    .get(name)
                    .is_some_and(|c| **c == run.cred);
            if !keep {
                run.task.abort();
                self.metrics.remove_graph(name);
            }
            keep
        });
        for c in config.credentials.values() {
            if runs.contains_key(&c.name) {
                if c.client_secret_expires.is_none()
                    && let Some(end) = self.board.graph(&c.name).and_then(|g| g.client_secret_end)
                {
                    self.metrics.set_credential_expiry(
                        &c.name,
                        CredentialExpiryKind::ClientSecret,
                        Some(end),
                    );
                }
                continue;
            }
            let Some(client) = GraphClient::new(engine.tokens.clone(), c) else {
                continue;
            };
            let task = GraphTask {
                client,
                cred: Credential::clone(c),
                metrics: self.metrics.clone(),
                board: self.board.clone(),
            }
            .spawn();
            runs.insert(
                c.name.clone(),
                GraphRun {
                    cred: Credential::clone(c),
                    engine: engine_id,
                    task,
                },
            );
        }
        let names: Vec<String> = runs.keys().cloned().collect();
        self.board.retain_graph(&names);
    }

    fn stop_graph(&self) {
        let mut runs = self.graph_tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, run) in runs.drain() {
            run.task.abort();
        }
    }

    /// Stops scheduling, lets probes in flight finish within the config's grace period,
    /// and writes any refresh token still held only in memory.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.board.set_stopping();
        self.stop_graph();
        let grace = self.config().schedule.shutdown_grace;
        let scheduler = self.scheduler.lock().await.take();
        if let Some(s) = scheduler {
            let left = s.shutdown(grace).await;
            if left > 0 {
                tracing::warn!(
                    cancelled = left,
                    ?grace,
                    "probes still running at the end of the grace period were cancelled"
                );
            }
        }
        let engine = read(&self.engine);
        for cred in self.config().credentials.values() {
            if let Err(e) = engine.tokens.store().flush(&cred.name).await {
                tracing::error!(credential = %cred.name, error = %e, "cannot save the refresh token");
            }
        }
    }

    /// The mailbox+protocol pairs configured now.
    pub fn keys(&self) -> Vec<Key> {
        self.config()
            .mailboxes
            .values()
            .flat_map(|m| m.endpoints.iter().map(|e| Key::new(&m.name, e.protocol)))
            .collect()
    }
}

/// A new engine when `config` changes what `current` was built from.
fn engine_for(
    current: &Engine,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Engine>, ConfigError> {
    if current.ca_file == config.ca_file && current.state_dir == config.state_dir {
        return Ok(None);
    }
    Engine::new(config, metrics).map(Some)
}

/// Builds what [`Service::start`] builds from `config`, without probing or listening: the
/// TLS clients from `tls.ca_file` and the token service, then every job on a scheduler
/// whose runs do nothing, kept running for `run_for` (on a paused test clock, long
/// enough for every job to run and reschedule) before it shuts down with the config's
/// grace period. `check` and the property tests call it, so a config `check` accepts is
/// one `run` starts with. Reads the CA file: on the blocking pool.
///
/// # Errors
/// What [`Service::start`] would fail with (an unusable CA file).
pub async fn rehearse(config: &Config, run_for: Duration) -> Result<(), ConfigError> {
    let owned = config.clone();
    tokio::task::spawn_blocking(move || Engine::new(&owned, &Arc::new(Metrics::new())).map(drop))
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError {
                file: config.file.clone(),
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("engine task failed: {e}"),
            })
        })?;
    struct Idle;
    impl Execute<Payload> for Idle {
        fn execute(&self, _: Arc<Job<Payload>>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(async {})
        }
    }
    let schedule = &config.schedule;
    let mut s = Scheduler::new(
        Arc::new(Idle) as Arc<dyn Execute<Payload>>,
        schedule.max_concurrent_probes,
    );
    let jobs = jobs(config);
    s.apply(jobs.clone(), schedule);
    tokio::time::sleep(run_for).await;
    // A reload of the same config, as `reload` applies it.
    s.apply(jobs, schedule);
    s.shutdown(schedule.shutdown_grace).await;
    Ok(())
}

/// The scheduled jobs of `config`, one per mailbox × protocol.
fn jobs(config: &Config) -> Vec<Job<Payload>> {
    let mut jobs = Vec::new();
    for mb in config.mailboxes.values() {
        let Some(credential) = config.credentials.get(&mb.credential) else {
            continue; // the validator guarantees it exists
        };
        for (index, e) in mb.endpoints.iter().enumerate() {
            jobs.push(Job {
                key: Key::new(&mb.name, e.protocol),
                interval: mb.interval,
                payload: Payload {
                    mailbox: mb.clone(),
                    endpoint: index,
                    credential: credential.clone(),
                },
            });
        }
    }
    jobs
}

/// The board's form of the token service's last failed request: classified here, at the
/// status boundary.
fn token_failure(tokens: &TokenService, credential: &str) -> Option<TokenFailure> {
    tokens.last_error(credential).map(|(e, at)| TokenFailure {
        reason: crate::classify::token::reason(&e),
        at,
    })
}

fn credential_status(c: &Credential, tokens: &TokenService) -> CredentialStatus {
    let mut st = CredentialStatus {
        name: c.name.clone(),
        grant: match &c.grant {
            Grant::TokenFile { .. } => "token_file".to_string(),
            g => g.kind().map(|k| k.as_str().to_string()).unwrap_or_default(),
        },
        token_expiry: tokens.token_expiry(&c.name),
        token_last_success: tokens.last_success(&c.name),
        save_error: tokens.save_status(&c.name).save_error,
        last_error: token_failure(tokens, &c.name),
        ..Default::default()
    };
    for e in tokens.credential_expiries(c) {
        match e.kind {
            CredentialExpiryKind::ClientSecret => st.client_secret_expiry = Some(e.at),
            CredentialExpiryKind::Certificate => st.certificate_expiry = Some(e.at),
        }
    }
    st
}
