//! `probe`: one probe of a mailbox now, printed for a person: result, reason, fix, phase
//! timings and the redacted transcript.

use super::CommandError;
use crate::classify::{self, Classified};
use crate::config::Config;
use crate::probe::{self, Phase, ProbeReport, TlsClient};
use crate::protocol::Protocol;
use crate::reason::Reason;
use crate::token::{TokenService, TokenServiceOptions};
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

/// Probes `mailbox` on `protocol` (or all its protocols). Returns whether all succeeded.
pub async fn run(
    config: &Config,
    mailbox: &str,
    protocol: Option<Protocol>,
    out: &mut dyn Write,
) -> Result<bool, CommandError> {
    let mb = config.mailboxes.get(mailbox).ok_or_else(|| {
        let known: Vec<&str> = config.mailboxes.keys().map(String::as_str).collect();
        CommandError::Usage(format!(
            "no mailbox `{mailbox}` in {} (configured: {})",
            config.file.display(),
            known.join(", ")
        ))
    })?;
    let endpoints: Vec<_> = match protocol {
        None => mb.endpoints.iter().collect(),
        Some(p) => vec![mb.endpoint(p).ok_or_else(|| {
            CommandError::Usage(format!("mailbox `{mailbox}` does not probe {p}"))
        })?],
    };
    let tls = TlsClient::new(config.ca_file.as_deref())?;
    let tokens = token_service(config)?;
    let credential = &config.credentials[&mb.credential];
    let mut all_ok = true;
    for endpoint in endpoints {
        let spec = mb.probe_spec(endpoint);
        writeln!(
            out,
            "probe      {mailbox} {} {}  user {}  mechanism {}",
            endpoint.protocol,
            spec.target,
            spec.user,
            spec.mechanism.as_str()
        )?;
        // The token request counts against the mailbox's `timeout`, as in `run`.
        let budget = crate::token::TokenBudget::new(mb.timeout, mb.interval);
        let subject = Some(mb.address.as_str());
        match tokens.access_token_as(credential, subject, budget).await {
            Err(e) => {
                // No token, no login: the probe reports the token's reason.
                all_ok = false;
                print_result(out, &classify::token_failure(&e))?;
            }
            Ok(token) => {
                let mut spec = spec.clone();
                spec.timeout = budget
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                let report = probe::run(&spec, &tls, &token.value).await;
                let c = classify::probe_outcome(&report.outcome);
                all_ok &= c.reason == Reason::Ok;
                print_result(out, &c)?;
                print_report(out, &report)?;
            }
        }
        writeln!(out)?;
    }
    Ok(all_ok)
}

/// The token service over the config's state directory and trust roots.
pub(crate) fn token_service(config: &Config) -> Result<TokenService, CommandError> {
    let mut options = TokenServiceOptions::new(&config.state_dir);
    options.ca_file = config.ca_file.clone();
    TokenService::new(options).map_err(|e| CommandError::Usage(format!("token client: {e}")))
}

fn print_result(out: &mut dyn Write, c: &Classified) -> std::io::Result<()> {
    if c.reason == Reason::Ok {
        return writeln!(out, "result     OK");
    }
    let r = c.reason;
    writeln!(
        out,
        "result     FAILED: {r} (stage {}, {})",
        r.stage().as_str(),
        if r.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    )?;
    writeln!(out, "detail     {}", c.detail)?;
    writeln!(out, "fix        {}", r.hint())
}

fn print_report(out: &mut dyn Write, r: &ProbeReport) -> std::io::Result<()> {
    let ms = |d: Duration| format!("{:.1}ms", d.as_secs_f64() * 1000.0);
    let phases: Vec<String> = Phase::ALL
        .iter()
        .map(|p| format!("{p} {}", r.phases.get(*p).map(ms).unwrap_or("-".into())))
        .collect();
    writeln!(out, "phases     {}", phases.join("  "))?;
    writeln!(
        out,
        "duration   {} (connect to auth reply), {} in all",
        r.duration.map(ms).unwrap_or("-".into()),
        ms(r.total)
    )?;
    if let Some(not_after) = r.tls_not_after {
        let when = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
        );
        writeln!(
            out,
            "tls        {}, server certificate chain valid until {when}",
            r.tls_version.as_deref().unwrap_or("?")
        )?;
    }
    writeln!(out, "transcript")?;
    write!(out, "{}", r.transcript)
}
