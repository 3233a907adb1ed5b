//! Config validation: defaults filled in, and each error located by file, line, column, field.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("mail.yaml"), text)
}

fn err(text: &str) -> String {
    parse(text)
        .expect_err("config must be rejected")
        .to_string()
}

/// The smallest valid config: one mailbox on a token file.
const MINIMAL: &str = "credentials:\n  t:\n    grant: token_file\n    token_file: /run/t\n\
mailboxes:\n  m:\n    address: m@example.com\n    credential: t\n    protocols: [imap]\n";

const CONTRACT_SHAPE: &str = "\
listen: 0.0.0.0:9925
state_dir: /var/lib/mail-oauth-exporter
tls:
  ca_file: /etc/mail-oauth-exporter/ca.pem
defaults:
  interval: 5m
  timeout: 30s
credentials:
  contoso-app:
    provider: microsoft
    tenant: contoso.onmicrosoft.com
    client_id: 11111111-2222-3333-4444-555555555555
    grant: client_credentials
    client_secret_file: /secrets/contoso-app
    client_secret_expires: 2027-03-01
  external:
    grant: token_file
    token_file: /run/tokens/helpdesk
mailboxes:
  helpdesk:
    address: helpdesk@contoso.com
    credential: contoso-app
    protocols: [imap, pop3, smtp]
    mechanism: xoauth2
    interval: 2m
    imap: { host: outlook.office365.com, port: 993, tls: implicit }
    pop3: { host: outlook.office365.com, port: 995, tls: implicit }
    smtp: { host: smtp.office365.com, port: 587, tls: starttls }
  scanner:
    address: scanner@contoso.com
    credential: external
    protocols: [smtp, imap]
";

#[test]
fn the_contracts_example_is_valid_and_defaults_fill_in() {
    let c = parse(CONTRACT_SHAPE).unwrap();
    assert_eq!(c.listen, Some("0.0.0.0:9925".parse().unwrap()));
    let h = &c.mailboxes["helpdesk"];
    assert_eq!(h.interval, Duration::from_secs(120));
    assert_eq!(h.timeout, Duration::from_secs(30));
    assert_eq!(h.endpoints.len(), 3);
    let s = &c.mailboxes["scanner"];
    assert_eq!(s.interval, Duration::from_secs(300));
    // Ordered imap, pop3, smtp whatever the list's order; Exchange Online by default.
    assert_eq!(
        s.endpoints,
        vec![
            Endpoint {
                protocol: Protocol::Imap,
                host: "outlook.office365.com".into(),
                port: 993,
                tls: TlsMode::Implicit,
                source_address: None
            },
            Endpoint {
                protocol: Protocol::Smtp,
                host: "smtp.office365.com".into(),
                port: 587,
                tls: TlsMode::Starttls,
                source_address: None
            },
        ]
    );
    let app = &c.credentials["contoso-app"];
    assert_eq!(
        app.client_auth,
        ClientAuth::Secret(SecretSource::File("/secrets/contoso-app".into()))
    );
    // Client credentials: Exchange's .default scope; delegated: exactly the protocols used.
    assert_eq!(
        app.scopes,
        vec!["https://outlook.office365.com/.default".to_string()]
    );
    assert!(c.credentials["external"].scopes.is_empty());
    assert_eq!(
        app.client_secret_expires
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_803_859_200
    );
}

#[test]
fn delegated_scopes_follow_the_protocols_of_the_mailboxes() {
    let c = parse(
        "credentials:\n  u:\n    provider: microsoft\n    tenant: t\n    client_id: x\n    grant: refresh_token\n\
         mailboxes:\n  a:\n    address: a@b.c\n    credential: u\n    protocols: [smtp]\n\
         \x20 b:\n    address: b@b.c\n    credential: u\n    protocols: [imap]\n",
    )
    .unwrap();
    assert_eq!(
        c.credentials["u"].scopes,
        [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access"
        ]
    );
    assert_eq!(
        c.credentials["u"].provider.token_url(),
        "https://login.microsoftonline.com/t/oauth2/v2.0/token"
    );
}

#[test]
fn scheduler_defaults_and_overrides() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.schedule, crate::config::Schedule::default());
    let c = parse(&format!(
        "scheduler:\n  max_concurrent_probes: 4\n  startup_spread: 30s\n  jitter: 0s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.schedule.max_concurrent_probes, 4);
    assert_eq!(c.schedule.startup_spread, Some(Duration::from_secs(30)));
    assert_eq!(c.schedule.jitter, Duration::ZERO);
}

#[test]
fn google_defaults_and_port_follows_tls_mode() {
    let c = parse(
        "credentials:\n  g:\n    provider: google\n    client_id: x\n    grant: refresh_token\n\
         mailboxes:\n  m:\n    address: a@gmail.com\n    credential: g\n    protocols: [imap, pop3, smtp]\n    imap: { tls: starttls }\n",
    )
    .unwrap();
    let m = &c.mailboxes["m"];
    assert_eq!(m.endpoint(Protocol::Imap).unwrap().port, 143);
    assert_eq!(m.endpoint(Protocol::Pop3).unwrap().host, "pop.gmail.com");
    assert_eq!(m.endpoint(Protocol::Smtp).unwrap().host, "smtp.gmail.com");
}

#[test]
fn errors_name_file_line_column_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            "mailboxes:\n  m:\n    adress: a@b\n",
            "mail.yaml:3:5: mailboxes.m: unknown field `adress`, expected one of",
        ),
        (
            "credentials:\n  x:\n    grant: token_file\n    token_file: /t\nmailboxes:\n  m:\n    address: a@b.c\n    credential: y\n    protocols: [imap]\n",
            "mail.yaml:8:5: mailboxes.m.credential: no credential named `y` (configured: x)",
        ),
        (
            "credentials:\n  x:\n    provider: microsoft\n    grant: client_credentials\n    client_id: c\n    tenant: t\n    client_secret: hunter2\n",
            "mail.yaml:7:5: credentials.x.client_secret: secrets are never written in the config",
        ),
        (
            "defaults:\n  interval: often\n",
            "mail.yaml:2:3: defaults.interval: `often` is not a duration",
        ),
        (
            "credentials:\n  x:\n    provider: generic\n    token_url: https://idp/token\n    client_id: c\n    grant: refresh_token\nmailboxes:\n  m:\n    address: a@b.c\n    credential: x\n    protocols: [smtp]\n",
            "mail.yaml:8:3: mailboxes.m.smtp.host: `host` is required",
        ),
        (
            "credentials:\n  x:\n    provider: microsoft\n    client_id: c\n    grant: refresh_token\n",
            "mail.yaml:2:3: credentials.x.tenant: `tenant` is required for grant refresh_token",
        ),
        (
            "credentials:\n  x:\n    grant: token_file\n    token_file: /t\nmailboxes:\n  m:\n    address: a@b.c\n    credential: x\n    protocols: [imap, ftp]\n",
            "mail.yaml:9:23: mailboxes.m.protocols[1]: unknown variant `ftp`",
        ),
        (
            "credentials:\n  x:\n    grant: token_file\n    token_file: /t\nmailboxes:\n  m:\n    address: a@b.c\n    credential: x\n    protocols: [imap]\n    imap: { host: h, port: 99999 }\n",
            "mail.yaml:10:28: mailboxes.m.imap.port: invalid value",
        ),
        (
            "listen: [1, 2]\n",
            "mail.yaml:1:9: listen: invalid type: sequence",
        ),
        (
            "scheduler:\n  max_concurrent_probes: 0\n",
            "mail.yaml:2:3: scheduler.max_concurrent_probes: must be at least 1",
        ),
        (
            "scheduler:\n  jitter: 1s\n  shutdown_grace: soon\n",
            "mail.yaml:3:3: scheduler.shutdown_grace: `soon` is not a duration",
        ),
        (
            "scheduler:\n  spread: 1s\n",
            "mail.yaml:2:3: scheduler: unknown field `spread`",
        ),
    ];
    for (text, want) in cases {
        let got = err(text);
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}...");
    }
}

/// Every example under `config/` is a valid config (files it names are checked by `check`
/// on a real deployment, not here).
#[test]
fn the_examples_in_config_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no examples in {}", dir.display());
}

/// Issue 16 §4: the loopback exception was a string prefix, so
/// `http://localhost@attacker.example` sent the secret in clear to attacker.example.
#[test]
fn plain_http_only_to_this_host() {
    for ok in [
        "https://login.microsoftonline.us",
        "https://idp.example.net/oauth2/token?tenant=x",
        "http://127.0.0.1:10080",
        "http://127.8.9.10/token",
        "http://[::1]:8080/token",
        "http://localhost:8080",
        "http://LOCALHOST/token",
    ] {
        assert!(endpoint_url(ok, false).is_ok(), "{ok} refused");
    }
    for bad in [
        "http://localhost@attacker.example",
        "http://127.0.0.1.nip.io",
        "http://localhost.attacker.example",
        "http://127.0.0.1@attacker.example",
        "https://user:secret@idp.example.net/token",
        "https://user@idp.example.net/token",
        "http://10.0.0.1/token",
        "http://localhost./token",
        "ftp://idp.example.net/token",
        "idp.example.net/token",
        "https://idp.example.net/token#frag",
    ] {
        assert!(endpoint_url(bad, false).is_err(), "{bad} accepted");
    }
    // An authority is a base: the tenant and path are appended to it.
    assert!(endpoint_url("https://login.microsoftonline.us/?x=1", true).is_err());
}

/// Issue 16 §7: a byte order mark at the start is accepted and does not shift the
/// location of errors on the first line.
#[test]
fn a_byte_order_mark_is_accepted() {
    let c = parse(&format!("\u{feff}{MINIMAL}")).unwrap();
    assert_eq!(c.mailboxes.len(), 1);
    let e = err(&format!("\u{feff}listen: nowhere\n{MINIMAL}"));
    assert!(e.starts_with("mail.yaml:1:1: listen: `nowhere`"), "{e}");
}

/// The limits are inclusive: the floor and ceilings themselves are valid.
#[test]
fn limits_are_inclusive() {
    let c = parse(&format!(
        "scheduler:\n  max_concurrent_probes: 10000\n  shutdown_grace: 1h\n  jitter: 0s\n\
         defaults:\n  interval: 5s\n  timeout: 5s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.mailboxes["m"].interval, MIN_INTERVAL);
    assert_eq!(c.schedule.max_concurrent_probes, MAX_CONCURRENT_PROBES);
    let c = parse(&format!("defaults:\n  interval: 24h\n{MINIMAL}")).unwrap();
    assert_eq!(c.mailboxes["m"].interval, MAX_INTERVAL);
    // Timeout plus jitter may fill the interval exactly.
    parse(&format!(
        "scheduler:\n  jitter: 1s\ndefaults:\n  interval: 30s\n  timeout: 29s\n{MINIMAL}"
    ))
    .unwrap();
}

/// Service accounts and client assertion files: what they need, what they refuse, each
/// error at its key.
#[test]
fn credentials_without_a_human() {
    let sa = "\
credentials:
  workspace:
    provider: google
    grant: service_account
    service_account_key_file: /secrets/sa.json
mailboxes:
  sales:
    address: sales@fabrikam.example
    credential: workspace
    protocols: [imap]
";
    let c = parse(sa).unwrap();
    let cred = &c.credentials["workspace"];
    assert_eq!(
        cred.grant,
        Grant::ServiceAccount {
            key_file: "/secrets/sa.json".into()
        }
    );
    assert_eq!(cred.scopes, vec!["https://mail.google.com/"]);
    assert_eq!(c.mailboxes["sales"].endpoints[0].host, "imap.gmail.com");

    let wi = "\
credentials:
  aks:
    provider: microsoft
    tenant: contoso.onmicrosoft.com
    client_id: app
    grant: client_credentials
    client_assertion_file: /var/run/secrets/azure/tokens/azure-identity-token
mailboxes:
  helpdesk:
    address: helpdesk@contoso.com
    credential: aks
    protocols: [imap]
";
    let c = parse(wi).unwrap();
    assert_eq!(
        c.credentials["aks"].client_auth,
        ClientAuth::AssertionFile("/var/run/secrets/azure/tokens/azure-identity-token".into())
    );

    for (text, want) in [
        (
            sa.replace("    service_account_key_file: /secrets/sa.json\n", ""),
            "mail.yaml:4:5: credentials.workspace.grant: grant service_account needs `service_account_key_file`",
        ),
        (
            sa.replace("provider: google", "provider: microsoft"),
            "mail.yaml:3:5: credentials.workspace.provider: grant service_account is Google's",
        ),
        (
            sa.replace("    provider: google\n", ""),
            "mail.yaml:2:3: credentials.workspace.provider: grant service_account is Google's",
        ),
        (
            sa.replace(
                "grant: service_account",
                "grant: service_account\n    client_id: x",
            ),
            "mail.yaml:5:5: credentials.workspace.client_id: client_id does not apply to grant service_account",
        ),
        (
            sa.replace(
                "grant: service_account",
                "grant: service_account\n    client_secret_file: /s",
            ),
            "mail.yaml:5:5: credentials.workspace.client_secret_file: client_secret_file does not apply",
        ),
        (
            sa.replace(
                "grant: service_account",
                "grant: refresh_token\n    client_id: x",
            ),
            "credentials.workspace.service_account_key_file: service_account_key_file is only for grant service_account",
        ),
        (
            wi.replace(
                "    client_id: app\n",
                "    client_id: app\n    client_secret_env: S\n",
            ),
            "mail.yaml:8:5: credentials.aks.client_assertion_file: give client_assertion_file or client_secret_env, not both",
        ),
        (
            wi.replace("grant: client_credentials", "grant: refresh_token"),
            "mail.yaml:7:5: credentials.aks.client_assertion_file: client_assertion_file is only for grant client_credentials",
        ),
        (
            wi.replace("provider: microsoft", "provider: google"),
            "credentials.aks.client_assertion_file: Google takes no client assertion",
        ),
    ] {
        let got = err(&text);
        assert!(got.contains(want), "want {want}\n got {got}");
    }
}

#[test]
fn graph_only_on_microsoft_client_credentials_and_only_known_queries() {
    let app = "credentials:\n  app:\n    provider: microsoft\n    tenant: t\n    client_id: x\n    grant: client_credentials\n    client_secret_env: S\n    graph: [credential_expiry, service_health]\n\
mailboxes:\n  m:\n    address: m@example.com\n    credential: app\n    protocols: [imap]\n";
    let c = parse(app).unwrap();
    let g = c.credentials["app"].graph.clone().unwrap();
    assert_eq!(g.url, "https://graph.microsoft.com");
    assert_eq!(g.scope, "https://graph.microsoft.com/.default");
    assert_eq!(
        g.queries,
        [
            crate::graph::GraphQuery::CredentialExpiry,
            crate::graph::GraphQuery::ServiceHealth
        ]
    );
    // A national cloud's authority moves Graph too; graph_url overrides it.
    let gov = app.replace(
        "    tenant: t\n",
        "    tenant: t\n    authority: https://login.microsoftonline.us\n",
    );
    assert_eq!(
        parse(&gov).unwrap().credentials["app"]
            .graph
            .clone()
            .unwrap()
            .url,
        "https://graph.microsoft.us"
    );
    let dod = gov.replace(
        "service_health]\n",
        "service_health]\n    graph_url: https://dod-graph.microsoft.us/\n",
    );
    let g = parse(&dod).unwrap().credentials["app"]
        .graph
        .clone()
        .unwrap();
    assert_eq!(g.url, "https://dod-graph.microsoft.us");
    assert_eq!(g.scope, "https://dod-graph.microsoft.us/.default");
    for (text, want) in [
        (
            app.replace("service_health]", "service_status]"),
            "mail.yaml:8:",
        ),
        (
            app.replace("service_health]", "credential_expiry]"),
            "credentials.app.graph: `credential_expiry` is listed twice",
        ),
        (
            app.replace("[credential_expiry, service_health]", "[]"),
            "credentials.app.graph: graph: lists no query",
        ),
        (
            app.replace(
                "grant: client_credentials\n    client_secret_env: S",
                "grant: refresh_token",
            ),
            "mail.yaml:7:5: credentials.app.graph: graph: needs grant client_credentials",
        ),
        (
            app.replace(
                "provider: microsoft\n    tenant: t",
                "provider: generic\n    token_url: https://idp.example/token",
            ),
            "credentials.app.graph: graph: reads Microsoft Graph: only for `provider: microsoft`",
        ),
        (
            app.replace(
                "    graph: [credential_expiry, service_health]\n",
                "    graph_url: https://graph.microsoft.com\n",
            ),
            "credentials.app.graph_url: graph_url needs `graph:`",
        ),
        (
            app.replace(
                "service_health]\n",
                "service_health]\n    graph_url: http://graph.example.net\n",
            ),
            "credentials.app.graph_url: `http://graph.example.net` must be an https:// URL",
        ),
        (
            app.replace(
                "service_health]\n",
                "service_health]\n    graph_url: https://u:p@graph.example.net\n",
            ),
            "credentials.app.graph_url:",
        ),
    ] {
        let got = err(&text);
        assert!(got.contains(want), "want {want}\n got {got}");
    }
    // Plain http to loopback, as the emulator serves it.
    let local = app.replace(
        "service_health]\n",
        "service_health]\n    graph_url: http://127.0.0.1:8080\n",
    );
    assert_eq!(
        parse(&local).unwrap().credentials["app"]
            .graph
            .clone()
            .unwrap()
            .url,
        "http://127.0.0.1:8080"
    );
}
