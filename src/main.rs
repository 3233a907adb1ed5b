//! The `mail-oauth-exporter` binary: argument parsing, tracing, exit codes.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use mail_oauth_exporter::Protocol;
use mail_oauth_exporter::command::{self, CommandError};
use mail_oauth_exporter::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Watches OAuth mail logins: real SASL XOAUTH2 logins over IMAP, POP3 and SMTP,
/// classified and exported for Prometheus.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and that every secret and token file it names is readable.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Bootstrap a delegated credential (device code), or import a refresh token.
    Login {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        credential: String,
        /// Import this refresh token (obtained elsewhere) instead of signing in.
        #[arg(long)]
        refresh_token_file: Option<PathBuf>,
    },
    /// The service: scheduler and HTTP server, until SIGTERM/SIGINT; SIGHUP reloads.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Address for /metrics and the status page [default: the config's `listen`, else 0.0.0.0:9925].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Probe only this replica's share of the mailboxes: INDEX/COUNT, INDEX may be a
        /// StatefulSet pod name ending in -INDEX (`--shard $(POD_NAME)/3`).
        #[arg(long)]
        shard: Option<mail_oauth_exporter::shard::Shard>,
        /// TLS and basic auth for the HTTP endpoints (Prometheus exporter web config format).
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config_file: Option<PathBuf>,
    },
    /// The embedded default: an emulated provider with healthy and broken mailboxes,
    /// and the service running against it; prints the URLs to open.
    Demo {
        /// Address for /metrics and the status page.
        #[arg(long, default_value = "127.0.0.1:9925")]
        listen: SocketAddr,
        /// TLS and basic auth for the HTTP endpoints (Prometheus exporter web config format).
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config_file: Option<PathBuf>,
    },
    /// Probe one mailbox now and print the result, phases and redacted transcript.
    Probe {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        mailbox: String,
        /// Only this protocol (imap, pop3, smtp); default: all the mailbox's protocols.
        #[arg(long)]
        protocol: Option<Protocol>,
        /// `text` for a person, `json` for scripts (one object per protocol; see README).
        #[arg(long, default_value = "text")]
        output: command::probe::Output,
    },
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
    init_tracing(cli.log_format);
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
    let result = runtime.block_on(run(cli.command));
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
        Command::Check { config } => {
            command::check::run(&config, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            listen,
            shard,
            web_config_file,
        } => {
            command::run::run(
                &config,
                listen,
                shard,
                web_config_file.as_deref(),
                shutdown_signal(),
                reload_signal(),
            )
            .await?;
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
