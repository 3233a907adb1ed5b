//! `demo`: the embedded default. Starts the emulated provider with healthy and broken
//! mailboxes, writes a real config for it, and probes every mailbox in rounds until stopped.

use super::CommandError;
use crate::classify;
use crate::config::Config;
use crate::emulator::{Behaviour, Emulator, EmulatorOptions, Proto, StaticTokens, TlsKind};
use crate::probe::{self, Phase, TlsClient};
use crate::secret::Secret;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// How often the demo probes every mailbox.
const ROUND: Duration = Duration::from_secs(10);

/// The demo fleet: mailbox name, SASL user, protocols, emulated behaviour.
const FLEET: &[(&str, &str, &str, Behaviour)] = &[
    (
        "healthy",
        "helpdesk@contoso.com",
        "[imap, pop3, smtp]",
        Behaviour::Success,
    ),
    (
        "token-refused",
        "no-permission@contoso.com",
        "[imap, pop3, smtp]",
        Behaviour::TokenRefused,
    ),
    (
        "smtp-auth-disabled",
        "scanner@contoso.com",
        "[smtp]",
        Behaviour::SmtpAuthDisabled,
    ),
    (
        "security-defaults",
        "printer@contoso.com",
        "[smtp]",
        Behaviour::PolicyBlocked,
    ),
    (
        "not-connected",
        "shared-mailbox@contoso.com",
        "[imap]",
        Behaviour::AuthenticatedNotConnected,
    ),
    (
        "throttled",
        "busy@contoso.com",
        "[imap, smtp]",
        Behaviour::Throttled,
    ),
    (
        "gmail-style-challenge",
        "someone@gmail.example",
        "[imap, smtp]",
        Behaviour::ErrorChallenge,
    ),
    (
        "token-expiring",
        "hve@contoso.com",
        "[smtp]",
        Behaviour::TokenExpiring,
    ),
    ("slow-server", "slow@contoso.com", "[imap]", Behaviour::Slow),
];

const DEMO_TOKEN: &str = "demo-access-token-issued-by-the-emulator";

/// Runs until `shutdown` completes.
pub async fn run(
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CommandError> {
    let mut options = EmulatorOptions::new(Arc::new(StaticTokens::new([DEMO_TOKEN])));
    options.slow_delay = Duration::from_millis(1500);
    for (_, user, _, behaviour) in FLEET {
        options.users.insert(user.to_string(), *behaviour);
    }
    let emu = Emulator::start(options)
        .await
        .map_err(|e| CommandError::Usage(format!("cannot start the emulated provider: {e}")))?;
    let dir = tempfile::Builder::new()
        .prefix("mail-oauth-exporter-demo.")
        .tempdir()?;
    let config_path = dir.path().join("demo.yaml");
    emu.write_ca_pem(&dir.path().join("ca.pem"))?;
    std::fs::write(dir.path().join("token"), DEMO_TOKEN)?;
    std::fs::write(&config_path, config_text(&emu, dir.path()))?;
    let config = Config::load(&config_path)?;
    let tls = TlsClient::new(config.ca_file.as_deref())?;

    writeln!(
        out,
        "mail-oauth-exporter demo: an emulated Exchange Online on 127.0.0.1\n  \
         IMAP {} (TLS), {} (STARTTLS)  POP3 {}  SMTP {} (STARTTLS)\n  \
         config: {}\n  \
         one probe by hand: mail-oauth-exporter probe --config {} --mailbox smtp-auth-disabled\n\
         Probing {} mailboxes every {}s; Ctrl-C to stop.",
        emu.addr(Proto::Imap, TlsKind::Implicit),
        emu.addr(Proto::Imap, TlsKind::Starttls),
        emu.addr(Proto::Pop3, TlsKind::Implicit),
        emu.addr(Proto::Smtp, TlsKind::Starttls),
        config_path.display(),
        config_path.display(),
        config.mailboxes.len(),
        ROUND.as_secs(),
    )?;
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(ROUND);
    let mut round = 0;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        round += 1;
        let token = Secret::new(std::fs::read_to_string(dir.path().join("token"))?);
        // All probes of a round at once, each its own task (as the scheduler will run them).
        let mut set = tokio::task::JoinSet::new();
        for mb in config.mailboxes.values() {
            for e in &mb.endpoints {
                let (spec, tls, token) = (mb.probe_spec(e), tls.clone(), token.clone());
                let name = mb.name.clone();
                set.spawn(async move {
                    (
                        name,
                        spec.target.protocol,
                        probe::run(&spec, &tls, &token).await,
                    )
                });
            }
        }
        let mut results = tokio::select! {
            _ = &mut shutdown => break,
            r = set.join_all() => r,
        };
        results.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        writeln!(out, "\nround {round}")?;
        writeln!(
            out,
            "{:<22} {:<6} {:<22} {:>9}  detail",
            "mailbox", "proto", "reason", "auth ms"
        )?;
        for (name, protocol, report) in &results {
            let c = classify::probe_outcome(&report.outcome);
            let name = name.as_str();
            let auth = report
                .phases
                .get(Phase::Auth)
                .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into());
            let detail: String = c.detail.chars().take(70).collect();
            writeln!(
                out,
                "{name:<22} {:<6} {:<22} {auth:>9}  {detail}",
                protocol.as_str(),
                c.reason.as_str()
            )?;
        }
        out.flush()?;
    }
    emu.shutdown();
    writeln!(out, "demo stopped")?;
    Ok(())
}

/// The demo's config: a real file in the contract's shape, pointing at the emulator.
fn config_text(emu: &Emulator, dir: &std::path::Path) -> String {
    let mut s = format!(
        "# Written by `mail-oauth-exporter demo` for its emulated provider.\n\
         tls:\n  ca_file: {dir}/ca.pem\n\
         defaults:\n  interval: 10s\n  timeout: 5s\n\
         credentials:\n  demo:\n    grant: token_file\n    token_file: {dir}/token\n\
         mailboxes:\n",
        dir = dir.display()
    );
    let imap = emu.addr(Proto::Imap, TlsKind::Implicit).port();
    let pop3 = emu.addr(Proto::Pop3, TlsKind::Implicit).port();
    let smtp = emu.addr(Proto::Smtp, TlsKind::Starttls).port();
    for (name, user, protocols, _) in FLEET {
        s.push_str(&format!(
            "  {name}:\n    address: {user}\n    credential: demo\n    protocols: {protocols}\n"
        ));
        for (p, port, tls) in [
            ("imap", imap, "implicit"),
            ("pop3", pop3, "implicit"),
            ("smtp", smtp, "starttls"),
        ] {
            if protocols.contains(p) {
                s.push_str(&format!(
                    "    {p}: {{ host: 127.0.0.1, port: {port}, tls: {tls} }}\n"
                ));
            }
        }
    }
    s
}
