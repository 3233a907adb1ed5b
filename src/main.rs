//! The `mail-oauth-exporter` binary: argument parsing, tracing, exit codes.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use mail_oauth_exporter::Protocol;
use mail_oauth_exporter::command::{self, CommandError};
use mail_oauth_exporter::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc instead of glibc's malloc: glibc keeps what a 10,000-mailbox config load or
/// the probes' churn freed in its per-thread arenas (about 45 MiB more resident than the
/// live heap at 10,000 × 3 in `benches/`); jemalloc returns unused pages to the system
/// within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `--version`: the fields of Prometheus' own version output.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision: ",
    env!("MAIL_OAUTH_EXPORTER_REVISION"),
    ")\n  build date:       ",
    env!("MAIL_OAUTH_EXPORTER_BUILD_DATE"),
    "\n  rustc version:    ",
    env!("MAIL_OAUTH_EXPORTER_RUSTC_VERSION"),
    "\n  platform:         ",
    env!("MAIL_OAUTH_EXPORTER_TARGET"),
);

/// Watches OAuth mail logins: real SASL XOAUTH2 logins over IMAP, POP3 and SMTP,
/// classified and exported for Prometheus.
///
/// Without a command it runs the service, as other Prometheus exporters do:
/// `mail-oauth-exporter --config.file /etc/mail-oauth-exporter/config.yaml`.
#[derive(Parser)]
#[command(
    name = "mail-oauth-exporter",
    version,
    long_version = LONG_VERSION,
    about,
    long_about,
    // `--config.file` is required without a command only; service flags given beside a
    // command are refused in `main` (clap's args_conflicts_with_subcommands would refuse
    // the global --log.* flags before a command too).
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    service: ServiceArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Logging, for every command.
#[derive(Args)]
struct LogArgs {
    /// Log format: text for people, json (one object per line) for a log collector.
    #[arg(
        long = "log.format",
        visible_alias = "log-format",
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text"
    )]
    format: LogFormat,
    /// Only log messages at this level or above [default: the RUST_LOG filter if set, else
    /// info]. Given, it wins over RUST_LOG.
    #[arg(long = "log.level", global = true, value_enum, value_name = "LEVEL")]
    level: Option<LogLevel>,
}

/// The service's flags: without a command, or after `run`.
#[derive(Args)]
struct ServiceArgs {
    /// The config file (YAML); reloads (SIGHUP, POST /-/reload) read it again.
    #[arg(
        long = "config.file",
        visible_alias = "config",
        value_name = "FILE",
        required = true
    )]
    config_file: Option<PathBuf>,
    /// Validate the config file and every secret and token file it names, then exit: 0 when
    /// sound, 2 with the error (file, line, column, field).
    #[arg(long = "config.check")]
    config_check: bool,
    /// Address for /metrics, the status page and the health checks: HOST:PORT, or :PORT for
    /// every interface [default: the config's `listen`, else 0.0.0.0:9925].
    #[arg(
        long = "web.listen-address",
        visible_alias = "listen",
        value_name = "ADDRESS",
        value_parser = parse_listen_address
    )]
    listen: Option<SocketAddr>,
    /// Path under which the metrics are served (then /metrics answers 404) [default:
    /// /metrics].
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        value_parser = parse_telemetry_path
    )]
    telemetry_path: Option<String>,
    /// TLS and basic auth for the HTTP endpoints (Prometheus exporter web config format).
    #[arg(long = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
    /// Probe only this replica's share of the mailboxes: INDEX/COUNT, INDEX may be a
    /// StatefulSet pod name ending in -INDEX (`--shard $(POD_NAME)/3`).
    #[arg(long, value_name = "INDEX/COUNT")]
    shard: Option<mail_oauth_exporter::shard::Shard>,
}

impl ServiceArgs {
    /// Whether any of these flags was given.
    fn any(&self) -> bool {
        self.config_file.is_some()
            || self.config_check
            || self.listen.is_some()
            || self.telemetry_path.is_some()
            || self.web_config_file.is_some()
            || self.shard.is_some()
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The levels Prometheus exporters offer.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and that every secret and token file it names is readable.
    Check {
        /// The config file (YAML).
        #[arg(long = "config.file", visible_alias = "config", value_name = "FILE")]
        config: PathBuf,
        /// Check the config alone (parsing, fields, ranges, URLs, schedule), not that the
        /// files it names exist and load, nor `state_dir`: for examples and CI.
        #[arg(long)]
        syntax_only: bool,
    },
    /// Bootstrap a delegated credential (device code), or import a refresh token.
    Login {
        /// The config file (YAML) that names the credential and the state_dir.
        #[arg(long = "config.file", visible_alias = "config", value_name = "FILE")]
        config: PathBuf,
        /// The credential (its name in the config) to sign in for.
        #[arg(long, value_name = "NAME")]
        credential: String,
        /// Import this refresh token (obtained elsewhere) instead of signing in.
        #[arg(long, value_name = "FILE")]
        refresh_token_file: Option<PathBuf>,
    },
    /// The service (the same as no command): scheduler and HTTP server, until
    /// SIGTERM/SIGINT; SIGHUP reloads.
    Run(ServiceArgs),
    /// The embedded default: an emulated provider with healthy and broken mailboxes,
    /// and the service running against it; prints the URLs to open.
    Demo {
        /// Address for /metrics and the status page.
        #[arg(
            long = "web.listen-address",
            visible_alias = "listen",
            value_name = "ADDRESS",
            default_value = "127.0.0.1:9925",
            value_parser = parse_listen_address
        )]
        listen: SocketAddr,
        /// TLS and basic auth for the HTTP endpoints (Prometheus exporter web config format).
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config_file: Option<PathBuf>,
    },
    /// Probe one mailbox now and print the result, phases and redacted transcript.
    Probe {
        /// The config file (YAML).
        #[arg(long = "config.file", visible_alias = "config", value_name = "FILE")]
        config: PathBuf,
        /// The mailbox (its name in the config) to probe.
        #[arg(long, value_name = "NAME")]
        mailbox: String,
        /// Only this protocol (imap, pop3, smtp); default: all the mailbox's protocols.
        #[arg(long, value_name = "PROTOCOL")]
        protocol: Option<Protocol>,
        /// `text` for a person, `json` for scripts (one object per protocol; see README).
        #[arg(long, default_value = "text")]
        output: command::probe::Output,
    },
}

/// `HOST:PORT`, or `:PORT` (every IPv4 interface), as Go exporters accept it.
fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    full.parse()
        .map_err(|e| format!("{e}: expected HOST:PORT (an IP address) or :PORT"))
}

fn parse_telemetry_path(s: &str) -> Result<String, String> {
    mail_oauth_exporter::http::web_config::validate_telemetry_path(s)?;
    Ok(s.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap exits 0 for --help/--version and 2 for usage errors, as we do.
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    init_tracing(cli.log.format, cli.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // No command: the service, from the top-level flags.
    let command = match cli.command {
        None => Command::Run(cli.service),
        Some(_) if cli.service.any() => {
            eprintln!(
                "error: service flags (--config.file, --web.*, --shard) go after `run` or \
                 without a command, not before a command"
            );
            return ExitCode::from(2);
        }
        Some(command) => command,
    };
    let result = runtime.block_on(run(command));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, CommandError> {
    let mut out = std::io::stdout();
    match command {
        Command::Login {
            config,
            credential,
            refresh_token_file,
        } => {
            let config = Config::load(&config)?;
            let ok = command::login::run(
                &config,
                &credential,
                refresh_token_file.as_deref(),
                &mut out,
            )
            .await?;
            // A token endpoint that refused is a failed login (1), not bad usage (2).
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Check {
            config,
            syntax_only,
        } => {
            let scope = if syntax_only {
                command::check::Scope::SyntaxOnly
            } else {
                command::check::Scope::Full
            };
            command::check::run(&config, scope, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let Some(config_file) = args.config_file else {
                return Err(CommandError::Usage("--config.file is required".into()));
            };
            if args.config_check {
                // The full check: the flag vets a deployment, where the files exist.
                command::check::run(&config_file, command::check::Scope::Full, &mut out).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let options = command::run::RunOptions {
                config_file,
                listen: args.listen,
                shard: args.shard,
                web_config_file: args.web_config_file,
                telemetry_path: args.telemetry_path.unwrap_or_else(|| "/metrics".into()),
            };
            command::run::run(&options, shutdown_signal(), reload_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            listen,
            web_config_file,
        } => {
            command::demo::run(
                listen,
                web_config_file.as_deref(),
                &mut out,
                shutdown_signal(),
                reload_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe {
            config,
            mailbox,
            protocol,
            output,
        } => {
            let config = Config::load(&config)?;
            let ok =
                command::probe::run_with(&config, &mailbox, protocol, output, &mut out).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Completes on SIGINT or SIGTERM (a container's stop).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A message per SIGHUP: reload the config.
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    // A reload already queued covers this one too.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /-/reload")
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

fn init_tracing(format: LogFormat, level: Option<LogLevel>) {
    let filter = match level {
        Some(level) => tracing_subscriber::EnvFilter::new(match level {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a log collector's file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
