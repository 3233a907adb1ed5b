//! `probe`: one probe of a mailbox now, printed for a person (result, reason, fix, phase
//! timings and the redacted transcript) or, with `--output json`, for a script.
//!
//! # JSON output
//!
//! `--output json` prints one JSON array with one object per probed protocol:
//!
//! ```json
//! [{"mailbox": "helpdesk", "protocol": "imap", "credential": "contoso-app",
//!   "target": "imap://outlook.office365.com:993 (implicit TLS)",
//!   "user": "helpdesk@contoso.com", "mechanism": "xoauth2",
//!   "success": false, "reason": "auth_rejected", "stage": "auth", "transient": false,
//!   "detail": "A01 NO AUTHENTICATE failed.", "hint": "check the token's scope/audience, ...",
//!   "phases": {"resolve": 0.0011, "connect": 0.021, "tls": 0.034, "greeting": 0.012,
//!              "capability": 0.011, "auth": 0.19, "post_auth": null},
//!   "duration_seconds": 0.279, "total_seconds": 0.301,
//!   "tls_version": "TLSv1.3", "tls_certificate_expiry_timestamp_seconds": 1790812800,
//!   "tls_certificate_expiry": "2026-10-01T00:00:00Z",
//!   "transcript": ["S: * OK The Microsoft Exchange IMAP4 service is ready. [...]", "..."]}]
//! ```
//!
//! - `reason` is a contract label (`ok` on success); `stage` is `null` for `ok`, else one of
//!   `token`, `connect`, `protocol`, `auth`, `post_auth`; `transient` as in the contract.
//! - `phases`: seconds per phase, `null` for a phase the probe did not reach (all `null`
//!   when the token could not be obtained: no login is attempted then).
//! - `duration_seconds`: connect start to the server's reply to the auth step (the
//!   contract's `mail_oauth_probe_duration_seconds`), `null` when the auth step was not
//!   reached; `total_seconds`: the whole probe, logout included.
//! - TLS fields are `null` when no TLS session was made; the expiry is the earliest notAfter
//!   of the chain the server presented, as unix seconds and as RFC 3339.
//! - `transcript`: the redacted dialogue, one string a line (`[]` when no login was tried).
//!
//! The exit code is the same in both formats: 0 when every protocol succeeded, 1 otherwise.

use super::CommandError;
use crate::config::Config;
use crate::probe::{self, Phase, ProbeReport, TlsClient};
use crate::protocol::Protocol;
use crate::reason::Reason;
use crate::status::ProbeResult;
use crate::token::{TokenService, TokenServiceOptions};
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

/// How `probe` prints its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// For a person: labelled lines and the transcript.
    #[default]
    Text,
    /// For scripts: the JSON array described in the module docs.
    Json,
}

impl std::str::FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Output::Text),
            "json" => Ok(Output::Json),
            other => Err(format!("unknown output `{other}` (expected text or json)")),
        }
    }
}

/// Probes `mailbox` on `protocol` (or all its protocols) and prints the results as text.
/// Returns whether all succeeded.
pub async fn run(
    config: &Config,
    mailbox: &str,
    protocol: Option<Protocol>,
    out: &mut dyn Write,
) -> Result<bool, CommandError> {
    run_with(config, mailbox, protocol, Output::Text, out).await
}

/// [`run`] with a choice of output format.
pub async fn run_with(
    config: &Config,
    mailbox: &str,
    protocol: Option<Protocol>,
    output: Output,
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
    let mut objects = Vec::new();
    for endpoint in endpoints {
        let spec = mb.probe_spec(endpoint);
        if output == Output::Text {
            writeln!(
                out,
                "probe      {mailbox} {} {}  user {}  mechanism {}",
                endpoint.protocol,
                spec.target,
                spec.user,
                spec.mechanism.as_str()
            )?;
        }
        // The token request counts against the mailbox's `timeout`, as in `run`.
        let budget = crate::token::TokenBudget::new(mb.timeout, mb.interval);
        // No token, no login: the probe reports the token's reason.
        let (result, report) = match tokens
            .access_token_as(credential, Some(mb.address.as_str()), budget)
            .await
        {
            Err(e) => (ProbeResult::from_token_error(&e), None),
            Ok(token) => {
                let mut spec = spec.clone();
                spec.timeout = budget
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                let report = probe::run(&spec, &tls, &token.value).await;
                (ProbeResult::from_report(&report), Some(report))
            }
        };
        all_ok &= result.reason == Reason::Ok;
        match output {
            Output::Text => {
                print_result(out, "result", result.reason, &result.detail)?;
                if let Some(report) = &report {
                    print_report(out, report)?;
                }
                writeln!(out)?;
            }
            Output::Json => {
                let mut o =
                    json_result(mailbox, endpoint.protocol, &spec, &result, report.as_ref());
                o["credential"] = mb.credential.clone().into();
                objects.push(o);
            }
        }
    }
    if output == Output::Json {
        writeln!(out, "[")?;
        for (i, o) in objects.iter().enumerate() {
            let sep = if i + 1 < objects.len() { "," } else { "" };
            writeln!(out, "{o}{sep}")?;
        }
        writeln!(out, "]")?;
    }
    Ok(all_ok)
}

/// One protocol's result as the JSON object of the module docs: the reason and detail
/// from `result`, timings, TLS facts and transcript from `report` (`None` when the token
/// step failed and no login was tried).
pub fn json_result(
    mailbox: &str,
    protocol: Protocol,
    spec: &probe::ProbeSpec,
    result: &ProbeResult,
    report: Option<&ProbeReport>,
) -> serde_json::Value {
    let r = result.reason;
    let phases: serde_json::Map<String, serde_json::Value> = Phase::ALL
        .iter()
        .map(|p| {
            let secs = report
                .and_then(|rep| rep.phases.get(*p))
                .map(|d| d.as_secs_f64());
            (p.as_str().to_string(), secs.into())
        })
        .collect();
    let not_after = report.and_then(|rep| rep.tls_not_after);
    serde_json::json!({
        "mailbox": mailbox,
        "protocol": protocol.as_str(),
        "target": spec.target.to_string(),
        "user": spec.user,
        "mechanism": spec.mechanism.as_str(),
        "success": r == Reason::Ok,
        "reason": r.as_str(),
        "stage": (r != Reason::Ok).then(|| r.stage().as_str()),
        "transient": r.is_transient(),
        "detail": result.detail,
        "hint": r.hint(),
        "phases": phases,
        "duration_seconds": report.and_then(|rep| rep.duration).map(|d| d.as_secs_f64()),
        "total_seconds": report.map(|rep| rep.total.as_secs_f64()),
        "tls_version": report.and_then(|rep| rep.tls_version.clone()),
        "tls_certificate_expiry_timestamp_seconds": not_after,
        "tls_certificate_expiry": not_after.map(rfc3339),
        "transcript": report
            .map(|rep| rep.transcript.render().lines().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default(),
    })
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64))
        .to_string()
}

/// The token service over the config's state directory and trust roots.
pub(crate) fn token_service(config: &Config) -> Result<TokenService, CommandError> {
    let mut options = TokenServiceOptions::new(&config.state_dir);
    options.ca_file = config.ca_file.clone();
    TokenService::new(options).map_err(|e| CommandError::Usage(format!("token client: {e}")))
}

/// Prints a classified outcome as `probe` and `login` show it: `{label}` (padded to the
/// column), `OK` or `FAILED: reason (stage, transience)`, then reason, detail and fix.
pub(crate) fn print_result(
    out: &mut dyn Write,
    label: &str,
    r: Reason,
    detail: &str,
) -> std::io::Result<()> {
    if r == Reason::Ok {
        writeln!(out, "{label:<10} OK")?;
        return writeln!(out, "reason     {r}");
    }
    writeln!(
        out,
        "{label:<10} FAILED: {r} (stage {}, {})",
        r.stage().as_str(),
        if r.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    )?;
    writeln!(out, "reason     {r}")?;
    writeln!(out, "detail     {detail}")?;
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
        let when = rfc3339(not_after);
        writeln!(
            out,
            "tls        {}, server certificate chain valid until {when}",
            r.tls_version.as_deref().unwrap_or("?")
        )?;
    }
    writeln!(out, "transcript")?;
    write!(out, "{}", r.transcript)
}
