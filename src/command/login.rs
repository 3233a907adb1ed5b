//! `login`: bootstraps a delegated credential with the device authorization grant, or
//! imports a refresh token obtained elsewhere (migrating from another tool).

use super::CommandError;
use super::probe::token_service;
use crate::config::Config;
use crate::token::{device_login, import_refresh_token};
use std::io::Write;
use std::path::Path;

pub async fn run(
    config: &Config,
    credential: &str,
    refresh_token_file: Option<&Path>,
    out: &mut (dyn Write + Send),
) -> Result<(), CommandError> {
    let cred = config.credentials.get(credential).ok_or_else(|| {
        let known: Vec<&str> = config.credentials.keys().map(String::as_str).collect();
        CommandError::Usage(format!(
            "no credential `{credential}` in {} (configured: {})",
            config.file.display(),
            known.join(", ")
        ))
    })?;
    let service = token_service(config)?;
    let store_path = service.store().path_for(&cred.name);
    match refresh_token_file {
        Some(file) => import_refresh_token(&service, cred, file).await,
        None => device_login(&service, cred, out).await,
    }
    .map_err(|e| CommandError::Usage(format!("login {credential}: {e}")))?;
    writeln!(
        out,
        "refresh token for `{credential}` stored in {}",
        store_path.display()
    )?;
    Ok(())
}
