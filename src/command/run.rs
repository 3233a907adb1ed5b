//! `run`: the service. Loads the config, listens, schedules probes, reloads on request,
//! and on shutdown lets probes in flight finish before it returns.

use super::CommandError;
use crate::config::{Config, DEFAULT_LISTEN};
use crate::http::WebConfig;
use crate::service::Service;
use crate::shard::Shard;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The service's command-line settings (`--config.file`, `--web.*`, `--shard`), whether
/// given to `run` or to the binary without a command.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--config.file`: the YAML config, re-read on every reload.
    pub config_file: PathBuf,
    /// `--web.listen-address`; `None`: the config's `listen`, else [`DEFAULT_LISTEN`].
    pub listen: Option<SocketAddr>,
    /// `--shard INDEX/COUNT`: probe only this replica's share of the mailboxes.
    pub shard: Option<Shard>,
    /// `--web.config.file`: TLS and basic auth for the HTTP endpoints, read once at start.
    pub web_config_file: Option<PathBuf>,
    /// `--web.telemetry-path`: where the metrics are served (`/metrics`).
    pub telemetry_path: String,
}

/// Runs the service as `options` say until `shutdown` completes. Every message on
/// `reloads` (SIGHUP) reloads the config.
pub async fn run(
    options: &RunOptions,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<()>,
) -> Result<(), CommandError> {
    let config_path = options.config_file.as_path();
    let (listen, shard) = (options.listen, options.shard);
    // Read on the blocking pool: files never stall the runtime (see `crate::fsread`).
    let (config, web) = {
        let (path, web_path) = (config_path.to_owned(), options.web_config_file.clone());
        tokio::task::spawn_blocking(move || {
            Ok::<_, CommandError>((Config::load(&path)?, load_web_config(web_path.as_deref())?))
        })
        .await
        .map_err(|e| CommandError::Usage(format!("cannot read the config: {e}")))??
    };
    let web = web
        .with_telemetry_path(&options.telemetry_path)
        .map_err(|e| CommandError::Usage(format!("--web.telemetry-path {e}")))?;
    let addr = listen.or(config.listen).unwrap_or_else(|| {
        DEFAULT_LISTEN
            .parse()
            .expect("the default listen address is valid")
    });
    let listener = bind(addr).await?;
    let service = Service::start_sharded(config, shard)?;
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        revision = %crate::REVISION,
        address = %listener.local_addr().unwrap_or(addr),
        metrics = web.telemetry_path(),
        config = %config_path.display(),
        shard = shard.map(|s| s.to_string()),
        probes = service.keys().len(),
        http = %web.describe(),
        "mail-oauth-exporter running"
    );
    serve_with(service, listener, Arc::new(web), shutdown, reloads).await;
    Ok(())
}

/// The web config at `path`, or plain HTTP open to all without one. A bad file is a
/// config error (exit 2), before anything listens.
pub fn load_web_config(path: Option<&Path>) -> Result<WebConfig, CommandError> {
    Ok(match path {
        Some(p) => WebConfig::load(p)?,
        None => WebConfig::default(),
    })
}

/// Binds the HTTP listener, with an error that says which address failed.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, CommandError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CommandError::Usage(format!("cannot listen on {addr}: {e}")))
}

/// Serves plain HTTP, open to all, and reloads until `shutdown`: [`serve_with`] without a
/// web config.
pub async fn serve(
    service: Arc<Service>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<()>,
) {
    serve_with(
        service,
        listener,
        Arc::new(WebConfig::default()),
        shutdown,
        reloads,
    )
    .await
}

/// Serves HTTP (TLS and basic auth as `web` says) and reloads until `shutdown`, then
/// stops scheduling, waits for probes in flight (the config's `scheduler.shutdown_grace`),
/// saves state and stops serving.
pub async fn serve_with(
    service: Arc<Service>,
    listener: TcpListener,
    web: Arc<WebConfig>,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<()>,
) {
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(crate::http::serve_with(
        listener,
        service.clone(),
        web,
        async {
            let _ = http_stopped.await;
        },
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = reloads.recv() => match r {
                // Errors are logged and shown by the service; the old config keeps running.
                Some(()) => { let _ = service.reload().await; }
                None => { shutdown.as_mut().await; break; }
            },
        }
    }
    tracing::info!("shutting down: no new probes; waiting for those in flight");
    service.shutdown().await;
    let _ = stop_http.send(());
    let _ = http.await;
    tracing::info!("stopped");
}
