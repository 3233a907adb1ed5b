//! `check`: validate a config file and everything it points to, without probing.

use super::CommandError;
use crate::config::{Config, ConfigError};
use std::io::Write;
use std::path::Path;

/// Validates the config and that every secret and token file it names is readable.
pub fn run(path: &Path, out: &mut dyn Write) -> Result<Config, CommandError> {
    let config = Config::load(path)?;
    let problems = config.check_files();
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
