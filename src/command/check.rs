//! `check`: validate a config file and everything it points to, without probing.

use super::CommandError;
use crate::config::{Config, ConfigError};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Validates the config and reads everything it names as `run` would: secret and token
/// files (regular files within their caps, not empty), certificates and keys (PEM that
/// loads), the CA file, and `state_dir` (writable) when refresh tokens are kept there;
/// then builds the service's engine and schedule without probing. When `check` passes,
/// `run` starts. Files are read on the blocking pool and never block (FIFOs and devices
/// are refused: [`crate::fsread`]).
pub async fn run(path: &Path, out: &mut dyn Write) -> Result<Config, CommandError> {
    let file = path.to_owned();
    let (config, problems) = tokio::task::spawn_blocking(move || {
        let config = Config::load(&file)?;
        let problems = config.check_files();
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
    crate::service::rehearse(&config, Duration::ZERO).await?;
    writeln!(
        out,
        "{}: ok ({} credentials, {} mailboxes, {} probes)",
        path.display(),
        config.credentials.len(),
        config.mailboxes.len(),
        config
            .mailboxes
            .values()
            .map(|m| m.endpoints.len())
            .sum::<usize>()
    )?;
    Ok(config)
}
