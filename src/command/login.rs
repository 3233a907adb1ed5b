//! `login`: bootstraps a delegated credential with the device authorization grant, or
//! imports a refresh token obtained elsewhere (migrating from another tool).

use super::CommandError;
use super::probe::token_service;
use crate::classify;
use crate::config::Config;
use crate::token::{LoginError, device_login, import_refresh_token};
use std::io::Write;
use std::path::Path;

/// Runs `login`. `Ok(false)`: the token endpoint refused (the imported refresh token, or the
/// device flow's token request); its reason, detail and fix are printed like a failed probe's
/// and nothing is stored. Other failures (unknown credential, unreadable file, declined or
/// expired sign-in, store errors) are `Err`.
pub async fn run(
    config: &Config,
    credential: &str,
    refresh_token_file: Option<&Path>,
    out: &mut (dyn Write + Send),
) -> Result<bool, CommandError> {
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
    let result = match refresh_token_file {
        Some(file) => import_refresh_token(&service, cred, file).await,
        None => device_login(&service, cred, out).await,
    };
    match result {
        Ok(()) => {}
        Err(LoginError::Token(e)) => {
            let (reason, detail) = (classify::token::reason(&e), classify::token::detail(&e));
            super::probe::print_result(out, "login", reason, &detail)?;
            writeln!(out, "nothing stored for `{credential}`")?;
            return Ok(false);
        }
        Err(e) => return Err(CommandError::Usage(format!("login {credential}: {e}"))),
    }
    if refresh_token_file.is_some() {
        writeln!(out, "imported refresh token redeemed at the token endpoint")?;
    }
    writeln!(
        out,
        "refresh token for `{credential}` stored in {}",
        store_path.display()
    )?;
    Ok(true)
}
