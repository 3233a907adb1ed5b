//! `demo`: the embedded default. Starts an emulated Exchange Online (token endpoint and
//! IMAP, POP3, SMTP servers on loopback), writes a real config for it with healthy and
//! broken mailboxes, and runs the service against it: the status page and metrics show
//! every kind of failure within seconds. A Google Workspace service account (its token
//! endpoint emulated beside Microsoft's) probes two Workspace mailboxes.

use super::CommandError;
use crate::Protocol;
use crate::config::Config;
use crate::emulator::graph::{EmuIssue, EmuPasswordCredential};
use crate::emulator::token_endpoint::{
    ClientSpec, EmuGrant, Scripted, ServiceAccountSpec, Target, TokenEndpoint,
};
use crate::emulator::{Behaviour, Emulator, EmulatorOptions, Proto, TlsKind};
use crate::reason::Reason;
use crate::secret::Secret;
use crate::service::Service;
use crate::token::RefreshTokenStore;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// The delegated app users sign in to, and the service principal apps.
const DELEGATED_APP: &str = "helpdesk-app";
const APP: &str = "contoso-monitor";
const EXPIRED_APP: &str = "legacy-scanner-app";
const NO_CONSENT_APP: &str = "new-vendor-app";

/// Client secrets the emulated token endpoint knows. Demo values, not real secrets; they
/// are still never shown, as a real one would not be.
const APP_SECRET: &str = "demo-secret-Qm4~contoso-monitor";
const EXPIRED_SECRET: &str = "demo-secret-Lx2~legacy-scanner";
const NO_CONSENT_SECRET: &str = "demo-secret-Vn7~new-vendor";

/// The demo's Google Workspace service account and its key: a demo key made for this
/// purpose, in the binary so that `demo` needs no file; never used anywhere else.
const WORKSPACE_SA: &str = "mail-monitor@fabrikam-demo.iam.gserviceaccount.com";
const WORKSPACE_KEY_ID: &str = "d3m0k3y0000000000000000000000000000000001";
const WORKSPACE_KEY_PEM: &str = include_str!("../emulator/demo-service-account-key.pem");
/// Users of the Workspace domain (`departed@` was deleted: Google knows no such user).
const WORKSPACE_USERS: &[&str] = &["sales@fabrikam.example"];

/// Days until the demo's working client secret expires: inside the 14-day alert window.
const SECRET_EXPIRES_IN_DAYS: u64 = 10;

/// One demo mailbox: name, SASL user, credential, protocols, what the mail server does
/// with this user, and the reason each protocol ends in.
struct DemoMailbox {
    name: &'static str,
    user: &'static str,
    credential: &'static str,
    protocols: &'static [Protocol],
    behaviour: Behaviour,
    reason: Reason,
}

const FLEET: &[DemoMailbox] = &[
    DemoMailbox {
        name: "helpdesk",
        user: "helpdesk@contoso.com",
        credential: "helpdesk-user",
        protocols: &[Protocol::Imap, Protocol::Pop3, Protocol::Smtp],
        behaviour: Behaviour::Success,
        reason: Reason::Ok,
    },
    DemoMailbox {
        name: "invoices",
        user: "invoices@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Imap, Protocol::Smtp],
        behaviour: Behaviour::Success,
        reason: Reason::Ok,
    },
    DemoMailbox {
        name: "former-employee",
        user: "former@contoso.com",
        credential: "former-user",
        protocols: &[Protocol::Imap],
        behaviour: Behaviour::Success,
        reason: Reason::TokenInvalidGrant,
    },
    DemoMailbox {
        name: "legacy-scanner",
        user: "scanner-legacy@contoso.com",
        credential: "legacy-scanner",
        protocols: &[Protocol::Smtp],
        behaviour: Behaviour::Success,
        reason: Reason::TokenClientSecretExpired,
    },
    DemoMailbox {
        name: "new-vendor",
        user: "vendor@contoso.com",
        credential: "new-vendor",
        protocols: &[Protocol::Imap],
        behaviour: Behaviour::Success,
        reason: Reason::TokenConsentRequired,
    },
    DemoMailbox {
        name: "scanner",
        user: "scanner@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Smtp],
        behaviour: Behaviour::SmtpAuthDisabled,
        reason: Reason::SmtpAuthDisabled,
    },
    DemoMailbox {
        name: "shared-mailbox",
        user: "shared@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Imap],
        behaviour: Behaviour::AuthenticatedNotConnected,
        reason: Reason::MailboxUnavailable,
    },
    DemoMailbox {
        name: "ceo-no-permission",
        user: "ceo@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Pop3],
        // The app has no mailbox permission on it: the server refuses the token.
        behaviour: Behaviour::Success,
        reason: Reason::AuthRejected,
    },
    DemoMailbox {
        name: "busy",
        user: "busy@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Smtp],
        behaviour: Behaviour::Throttled,
        reason: Reason::Throttled,
    },
    DemoMailbox {
        name: "slow-server",
        user: "slow@contoso.com",
        credential: "contoso-monitor",
        protocols: &[Protocol::Imap],
        behaviour: Behaviour::Slow,
        reason: Reason::Ok,
    },
    DemoMailbox {
        name: "workspace-sales",
        user: "sales@fabrikam.example",
        credential: "workspace",
        protocols: &[Protocol::Imap, Protocol::Smtp],
        behaviour: Behaviour::Success,
        reason: Reason::Ok,
    },
    DemoMailbox {
        name: "workspace-departed",
        user: "departed@fabrikam.example",
        credential: "workspace",
        protocols: &[Protocol::Imap],
        behaviour: Behaviour::Success,
        // The account was deleted from the Workspace domain: "Invalid email or User ID".
        reason: Reason::TokenInvalidGrant,
    },
];

/// Mailboxes the monitoring app may open (`Add-MailboxPermission`); `ceo@` is left out.
const APP_MAILBOXES: &[&str] = &[
    "invoices@contoso.com",
    "scanner@contoso.com",
    "shared@contoso.com",
    "busy@contoso.com",
    "slow@contoso.com",
];

/// Every probe of the demo and the reason it is expected to end in.
pub fn expected() -> Vec<(String, Protocol, Reason)> {
    FLEET
        .iter()
        .flat_map(|m| {
            m.protocols
                .iter()
                .map(move |p| (m.name.to_string(), *p, m.reason))
        })
        .collect()
}

/// The emulated provider and the config written for it. Dropping it stops the servers
/// and removes the files.
pub struct Demo {
    pub endpoint: Arc<TokenEndpoint>,
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Demo {
    /// Starts the emulated provider and writes the demo's config, secrets and refresh
    /// tokens into a fresh temporary directory.
    pub async fn start() -> Result<Demo, CommandError> {
        let endpoint =
            Arc::new(TokenEndpoint::start().await.map_err(|e| {
                CommandError::Usage(format!("cannot start the token endpoint: {e}"))
            })?);
        endpoint.add_client(ClientSpec {
            id: DELEGATED_APP.into(),
            grants: vec![EmuGrant::RefreshToken, EmuGrant::DeviceCode],
            ..Default::default()
        });
        endpoint.add_client(ClientSpec {
            id: APP.into(),
            secret: Some(APP_SECRET.into()),
            grants: vec![EmuGrant::ClientCredentials],
            mailboxes: APP_MAILBOXES.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        });
        endpoint.add_client(ClientSpec {
            id: EXPIRED_APP.into(),
            secret: Some(EXPIRED_SECRET.into()),
            secret_expired: true,
            grants: vec![EmuGrant::ClientCredentials],
            ..Default::default()
        });
        endpoint.add_client(ClientSpec {
            id: NO_CONSENT_APP.into(),
            secret: Some(NO_CONSENT_SECRET.into()),
            grants: vec![EmuGrant::ClientCredentials],
            ..Default::default()
        });
        // Microsoft Graph's view of contoso-monitor: two secrets, the sooner one an older
        // secret no longer in use (it must not be the one exported), and an open Exchange
        // Online incident.
        let in_days = |days: u64| {
            humantime::format_rfc3339_seconds(
                SystemTime::now() + Duration::from_secs(days * 86_400),
            )
            .to_string()
        };
        endpoint.graph_set_application(
            APP,
            vec![
                EmuPasswordCredential {
                    hint: "old".into(),
                    end: in_days(1),
                },
                EmuPasswordCredential {
                    hint: APP_SECRET.chars().take(3).collect(),
                    end: in_days(SECRET_EXPIRES_IN_DAYS),
                },
            ],
            vec![],
        );
        endpoint.graph_set_health(crate::graph::EXCHANGE_ONLINE, "serviceDegradation");
        endpoint.graph_add_issue(EmuIssue {
            id: "EX918273".into(),
            title: "Some users may be unable to connect to Exchange Online using IMAP".into(),
            service: crate::graph::EXCHANGE_ONLINE.into(),
            classification: "incident".into(),
            status: "serviceDegradation".into(),
            resolved: false,
            last_modified: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        });
        // Google's copy of the service account's public key, with domain-wide delegation
        // of the mail scope.
        let demo_key = crate::token::service_account::ServiceAccountKey::parse(
            workspace_key_json("http://127.0.0.1").as_bytes(),
        )
        .map_err(|e| CommandError::Usage(format!("the demo's service account key: {e}")))?;
        endpoint.add_service_account(ServiceAccountSpec {
            client_email: WORKSPACE_SA.into(),
            private_key_id: WORKSPACE_KEY_ID.into(),
            public_key: demo_key.public_key().to_vec(),
            scopes: vec![crate::token::credential::GOOGLE_MAIL_SCOPE.into()],
            users: WORKSPACE_USERS.iter().map(|u| u.to_string()).collect(),
        });
        // The tenant's admin never consented to the vendor's app.
        endpoint.script_always(
            Target::Client(NO_CONSENT_APP.into()),
            Scripted::Aadsts(65001),
        );

        let mut options = EmulatorOptions::new(endpoint.clone());
        options.slow_delay = Duration::from_millis(1500);
        for m in FLEET {
            options.users.insert(m.user.to_string(), m.behaviour);
        }
        let emulator = Emulator::start(options).await.map_err(|e| {
            CommandError::Usage(format!("cannot start the emulated mail servers: {e}"))
        })?;

        let dir = tempfile::Builder::new()
            .prefix("mail-oauth-exporter-demo.")
            .tempdir()?;
        let d = dir.path();
        emulator.write_ca_pem(&d.join("ca.pem"))?;
        for (file, secret) in [
            ("contoso-monitor.secret", APP_SECRET),
            ("legacy-scanner.secret", EXPIRED_SECRET),
            ("new-vendor.secret", NO_CONSENT_SECRET),
        ] {
            crate::token::write_atomic(&d.join(file), secret)?;
        }
        crate::token::write_atomic(
            &d.join("workspace-sa.json"),
            &workspace_key_json(&endpoint.google_token_url()),
        )?;
        // Delegated users as if `login` had run: one current, one since revoked.
        let store = RefreshTokenStore::new(d.join("state"));
        let rt = endpoint.add_user("helpdesk@contoso.com", DELEGATED_APP, &[]);
        store.save("helpdesk-user", &Secret::new(rt)).await?;
        let rt = endpoint.add_user("former@contoso.com", DELEGATED_APP, &[]);
        store.save("former-user", &Secret::new(rt)).await?;
        endpoint.revoke_user("former@contoso.com");

        let config_path = d.join("demo.yaml");
        let places = Places {
            imap: emulator.addr(Proto::Imap, TlsKind::Implicit).port(),
            pop3: emulator.addr(Proto::Pop3, TlsKind::Implicit).port(),
            smtp: emulator.addr(Proto::Smtp, TlsKind::Starttls).port(),
            authority: endpoint.authority(),
            dir: d.to_owned(),
        };
        std::fs::write(&config_path, config_text(&places))?;
        Ok(Demo {
            endpoint,
            emulator,
            dir,
            config_path,
        })
    }

    pub fn config(&self) -> Result<Config, CommandError> {
        Ok(Config::load(&self.config_path)?)
    }
}

/// Runs the demo until `shutdown`; SIGHUP (`reloads`) reloads its config file.
/// `web_config` (`--web.config.file`) protects its HTTP endpoints as in `run`.
pub async fn run(
    listen: SocketAddr,
    web_config: Option<&std::path::Path>,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<()>,
) -> Result<(), CommandError> {
    let web = super::run::load_web_config(web_config)?;
    let demo = Demo::start().await?;
    let config = demo.config()?;
    let listener = super::run::bind(listen).await?;
    let addr = listener.local_addr()?;
    let service = Service::start(config)?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let scheme = if web.is_tls() { "https" } else { "http" };
    let base = format!("{scheme}://{host}:{}", addr.port());
    writeln!(
        out,
        "mail-oauth-exporter demo: an emulated Exchange Online on 127.0.0.1 and {} mailbox probes.\n\
         \n  status page   {base}/\n  metrics       {base}/metrics\n  status JSON   {base}/api/v1/status\n\
         \n  token endpoint {}\n  IMAP {} (TLS)  POP3 {} (TLS)  SMTP {} (STARTTLS)\n  config        {}\n\
         \nResults appear within a few seconds; probes repeat every 15 s. Ctrl-C to stop.\n\
         One probe by hand:\n  {} probe --config {} --mailbox scanner",
        expected().len(),
        demo.endpoint.authority(),
        demo.emulator.addr(Proto::Imap, TlsKind::Implicit),
        demo.emulator.addr(Proto::Pop3, TlsKind::Implicit),
        demo.emulator.addr(Proto::Smtp, TlsKind::Starttls),
        demo.config_path.display(),
        // The binary as started (under `cargo run` it is not on PATH).
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "mail-oauth-exporter".into()),
        demo.config_path.display(),
    )?;
    out.flush()?;
    super::run::serve_with(service, listener, Arc::new(web), shutdown, reloads).await;
    demo.emulator.shutdown();
    Ok(())
}

/// The demo service account's JSON key, in Google's shape, for the token endpoint `token_uri`.
fn workspace_key_json(token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "fabrikam-demo",
        "private_key_id": WORKSPACE_KEY_ID,
        "private_key": WORKSPACE_KEY_PEM,
        "client_email": WORKSPACE_SA,
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    })
    .to_string()
}

/// Where the demo's emulated provider listens and keeps its files.
struct Places {
    imap: u16,
    pop3: u16,
    smtp: u16,
    authority: String,
    dir: PathBuf,
}

/// The demo's config: a real file in the contract's shape, pointing at the emulator.
/// `config/demo.yaml` is this text for fixed ports and paths (a test keeps them equal).
fn config_text(p: &Places) -> String {
    let d = p.dir.display();
    let auth = &p.authority;
    let microsoft = |client: &str, grant: &str| {
        format!(
            "    provider: microsoft\n    tenant: contoso.onmicrosoft.com\n    authority: {auth}\n    client_id: {client}\n    grant: {grant}\n"
        )
    };
    let mut s = format!(
        "# The config `mail-oauth-exporter demo` writes for its emulated Exchange Online\n\
         # (token endpoint and mail servers on 127.0.0.1, ports chosen at start), into a\n\
         # temporary directory with the client secrets, the CA and the refresh tokens.\n\
         # config/demo.yaml shows it with example ports; `demo` prints where the live one is.\n\
         listen: 127.0.0.1:9925\n\
         state_dir: {d}/state           # refresh tokens of the delegated users\n\
         tls:\n  ca_file: {d}/ca.pem       # the emulator's own CA\n\
         defaults:\n  interval: 15s\n  timeout: 10s             # the slow server takes ~4.5 s\n\
         scheduler:\n  startup_spread: 2s               # first results within seconds\n  jitter: 500ms\n  shutdown_grace: 5s\n\
         credentials:\n"
    );
    s.push_str(&format!(
        "  helpdesk-user:                   # delegated, refresh token stored as if `login` ran\n{}",
        microsoft(DELEGATED_APP, "refresh_token")
    ));
    s.push_str(&format!(
        "  former-user:                     # delegated, refresh token revoked since\n{}",
        microsoft(DELEGATED_APP, "refresh_token")
    ));
    s.push_str(&format!(
        "  contoso-monitor:                 # service principal; Microsoft Graph says its secret expires in {SECRET_EXPIRES_IN_DAYS} days\n{}    client_secret_file: {d}/contoso-monitor.secret\n    graph: [credential_expiry, service_health]   # secret expiry and Exchange Online's health\n    graph_url: {auth}                # the emulated Microsoft Graph\n",
        microsoft(APP, "client_credentials")
    ));
    s.push_str(&format!(
        "  legacy-scanner:                  # its client secret has expired\n{}    client_secret_file: {d}/legacy-scanner.secret\n",
        microsoft(EXPIRED_APP, "client_credentials")
    ));
    s.push_str(&format!(
        "  new-vendor:                      # no admin consent in the tenant\n{}    client_secret_file: {d}/new-vendor.secret\n",
        microsoft(NO_CONSENT_APP, "client_credentials")
    ));
    s.push_str(&format!(
        "  workspace:                       # Google Workspace service account (domain-wide delegation)\n    provider: google\n    grant: service_account\n    service_account_key_file: {d}/workspace-sa.json\n"
    ));
    s.push_str("mailboxes:\n");
    for m in FLEET {
        let protocols: Vec<&str> = m.protocols.iter().map(|p| p.as_str()).collect();
        s.push_str(&format!(
            "  {}:\n    address: {}\n    credential: {}\n    protocols: [{}]\n",
            m.name,
            m.user,
            m.credential,
            protocols.join(", ")
        ));
        for proto in m.protocols {
            let (port, tls) = match proto {
                Protocol::Imap => (p.imap, "implicit"),
                Protocol::Pop3 => (p.pop3, "implicit"),
                Protocol::Smtp => (p.smtp, "starttls"),
            };
            s.push_str(&format!(
                "    {proto}: {{ host: 127.0.0.1, port: {port}, tls: {tls} }}\n"
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// `config/demo.yaml` is exactly what `demo` writes, for the example places.
    #[test]
    fn the_demo_example_in_config_is_what_demo_writes() {
        let places = Places {
            imap: 10993,
            pop3: 10995,
            smtp: 10587,
            authority: "http://127.0.0.1:10080".into(),
            dir: PathBuf::from("/tmp/mail-oauth-exporter-demo"),
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
        let text = config_text(&places);
        if std::env::var_os("UPDATE_DEMO_EXAMPLE").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let example = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            example, text,
            "run with UPDATE_DEMO_EXAMPLE=1 to rewrite config/demo.yaml"
        );
        Config::parse(&path, &text).unwrap();
    }
}
