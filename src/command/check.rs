//! `check`: validate a config file and everything it points to, without probing.

use super::CommandError;
use crate::config::{Config, ConfigError};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How much `check` looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The config and everything it names (the default): what `run` needs to start.
    Full,
    /// The config alone (`check --syntax-only`): parsing, validation, ranges, URLs and the
    /// schedule, but no file it names is opened (secrets, certificates, token files, the CA
    /// file), no `client_secret_env` variable is read and `state_dir` is not tried; for
    /// examples and CI, where those files do not exist.
    SyntaxOnly,
}

/// Validates the config and, in [`Scope::Full`], reads everything it names as `run` would:
/// secret and token files (regular files within their caps, not empty), certificates and
/// keys (PEM that loads), the CA file, and `state_dir` (writable) when refresh tokens are
/// kept there; then builds the service's engine and schedule without probing. When a full
/// `check` passes, `run` starts. Files are read on the blocking pool and never block
/// (FIFOs and devices are refused: [`crate::fsread`]).
pub async fn run(path: &Path, scope: Scope, out: &mut dyn Write) -> Result<Config, CommandError> {
    let file = path.to_owned();
    let (config, problems) = tokio::task::spawn_blocking(move || {
        let config = Config::load(&file)?;
        let problems = match scope {
            Scope::Full => config.check_files(),
            Scope::SyntaxOnly => Vec::new(),
        };
        Ok::<_, ConfigError>((config, problems))
    })
    .await
    .map_err(|e| CommandError::Usage(format!("check task failed: {e}")))??;
    if let Some(first) = problems.first() {
        // Files outside the config have no line of their own: point at the config file.
        return Err(CommandError::Config(ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message: if problems.len() == 1 {
                first.clone()
            } else {
                format!("{} problems:\n  {}", problems.len(), problems.join("\n  "))
            },
        }));
    }
    if scope == Scope::Full {
        crate::service::rehearse(&config, Duration::ZERO).await?;
    } else {
        // The engine loads the CA file: rehearse without it.
        let mut syntax = config.clone();
        syntax.ca_file = None;
        crate::service::rehearse(&syntax, Duration::ZERO).await?;
    }
    writeln!(
        out,
        "{}: {} ({} credentials, {} mailboxes, {} probes)",
        path.display(),
        match scope {
            Scope::Full => "ok",
            Scope::SyntaxOnly => "syntax ok, named files not checked",
        },
        config.credentials.len(),
        config.mailboxes.len(),
        config
            .mailboxes
            .values()
            .map(|m| m.endpoints.len())
            .sum::<usize>()
    )?;
    if scope == Scope::Full {
        // Not an error (`run` starts, and `login` may come later), but every probe of such
        // a credential would say `token_missing` until then: say it now, with the command.
        let store = crate::token::RefreshTokenStore::new(&config.state_dir);
        for c in config.credentials.values() {
            if c.grant == crate::token::Grant::RefreshToken
                && store
                    .candidates(&c.name)
                    .is_ok_and(|found| found.is_empty())
            {
                writeln!(
                    out,
                    "note: credential {name} has no refresh token yet; until `mail-oauth-exporter login --config {file} --credential {name}` is run, its probes report token_missing",
                    name = c.name,
                    file = path.display(),
                )?;
            }
        }
    }
    Ok(config)
}
