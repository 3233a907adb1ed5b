//! Microsoft Graph (`graph: [credential_expiry, service_health]`) against the emulated Graph
//! over real sockets: the secret in use's end date (by hint, not the soonest), Exchange
//! Online's health and open incidents, and Graph failures (403, 429) that never change a
//! probe's reason.

use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::emulator::graph::{EmuIssue, EmuPasswordCredential, GraphScript};
use mail_oauth_exporter::emulator::token_endpoint::{ClientSpec, EmuGrant, TokenEndpoint};
use mail_oauth_exporter::emulator::{Emulator, EmulatorOptions, Proto, TlsKind};
use mail_oauth_exporter::service::Service;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SECRET: &str = "Abc~the-secret-in-use";
const USER: &str = "graph@contoso.com";

fn tmpdir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "moe-it-graph-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Setup {
    ep: Arc<TokenEndpoint>,
    _emu: Emulator,
    config: PathBuf,
}

async fn setup(tag: &str, graph: &str) -> Setup {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.add_client(ClientSpec {
        id: "app".into(),
        secret: Some(SECRET.into()),
        grants: vec![EmuGrant::ClientCredentials],
        mailboxes: vec![USER.into()],
        ..Default::default()
    });
    // Two secrets: the soonest is not the one in use.
    ep.graph_set_application(
        "app",
        vec![
            EmuPasswordCredential {
                hint: "Old".into(),
                end: "2026-12-01T00:00:00Z".into(),
            },
            EmuPasswordCredential {
                hint: "Abc".into(),
                end: "2028-03-04T05:06:07.89Z".into(),
            },
        ],
        vec![],
    );
    ep.graph_set_health("Exchange Online", "serviceDegradation");
    ep.graph_set_health("Microsoft Teams", "serviceOperational");
    ep.graph_add_issue(EmuIssue {
        id: "EX123456".into(),
        title: "Users can't connect with IMAP <b>".into(),
        service: "Exchange Online".into(),
        classification: "incident".into(),
        status: "serviceDegradation".into(),
        resolved: false,
        last_modified: "2026-11-29T10:00:00Z".into(),
    });
    ep.graph_add_issue(EmuIssue {
        id: "EX000001".into(),
        title: "resolved long ago".into(),
        service: "Exchange Online".into(),
        classification: "incident".into(),
        status: "serviceRestored".into(),
        resolved: true,
        last_modified: "2026-01-01T00:00:00Z".into(),
    });
    ep.graph_add_issue(EmuIssue {
        id: "TM1".into(),
        title: "Teams issue".into(),
        service: "Microsoft Teams".into(),
        classification: "advisory".into(),
        status: "investigating".into(),
        resolved: false,
        last_modified: "2026-11-29T10:00:00Z".into(),
    });
    let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let dir = tmpdir(tag);
    emu.write_ca_pem(&dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    let port = emu.addr(Proto::Imap, TlsKind::Implicit).port();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             scheduler:\n  startup_spread: 1ms\n  jitter: 0s\n\
             credentials:\n  app:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: app\n    grant: client_credentials\n    client_secret_file: {d}/secret\n    graph: {graph}\n    graph_url: {graph_url}\n\
             mailboxes:\n  m:\n    address: {USER}\n    credential: app\n    protocols: [imap]\n    interval: 5s\n    timeout: 2s\n    imap: {{ host: 127.0.0.1, port: {port} }}\n",
            d = dir.display(),
            auth = ep.authority(),
            graph_url = ep.graph_url(),
        ),
    )
    .unwrap();
    Setup {
        ep,
        _emu: emu,
        config,
    }
}

/// Polls `service`'s metrics until `until` holds (the loops run in the background).
async fn metrics_when(service: &Service, until: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        let text = String::from_utf8(service.metrics().render(
            &service.board().rows(),
            mail_oauth_exporter::metrics::Format::Prometheus,
            false,
        ))
        .unwrap();
        if until(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    String::from_utf8(service.metrics().render(
        &service.board().rows(),
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap()
}

async fn probed_ok(service: &Service) {
    for _ in 0..200 {
        let snap = service.board().snapshot();
        if snap.probes.iter().all(|p| p.state != "pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snap = service.board().snapshot();
    assert_eq!(snap.probes[0].state, "ok", "{:?}", snap.probes[0].detail);
}

#[tokio::test]
async fn graph_exports_the_secret_in_use_and_exchange_online_health() {
    let s = setup("ok", "[credential_expiry, service_health]").await;
    let service = Service::start(Config::load(&s.config).unwrap()).unwrap();
    let text = metrics_when(&service, |t| {
        t.matches("mail_oauth_graph_last_success_timestamp_seconds{")
            .count()
            == 2
    })
    .await;
    // 2028-03-04T05:06:07Z: the secret whose hint is the configured secret's start.
    assert!(
        text.contains(
            "mail_oauth_credential_expiry_timestamp_seconds{credential=\"app\",kind=\"client_secret\"} 1835759167"
        ),
        "{text}"
    );
    assert!(text.contains(
        "mail_oauth_service_health{credential=\"app\",service=\"Exchange Online\",status=\"serviceDegradation\"} 1"
    ));
    assert_eq!(text.matches("mail_oauth_service_health{").count(), 1);
    assert!(text.contains(
        "mail_oauth_service_issues{classification=\"incident\",credential=\"app\",service=\"Exchange Online\"} 1"
    ), "{text}");
    assert!(text.contains(
        "mail_oauth_service_issues{classification=\"advisory\",credential=\"app\",service=\"Exchange Online\"} 0"
    ));
    // The Graph token is the app's own, for Graph's `.default`, checked by the emulated Graph.
    assert!(
        s.ep.graph_requests()
            .iter()
            .any(|p| p.contains("applications(appId='app')"))
    );
    probed_ok(&service).await;
    // One Graph token for the three Graph requests, beside the mail token; the token
    // metrics count the mail token only.
    assert_eq!(s.ep.graph_requests().len(), 3);
    assert_eq!(s.ep.request_count("app", "client_credentials"), 2);
    let text = String::from_utf8(service.metrics().render(
        &service.board().rows(),
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap();
    assert!(
        text.contains(
            "mail_oauth_token_requests_total{credential=\"app\",grant=\"client_credentials\"} 1"
        ),
        "{text}"
    );

    let snap = service.board().snapshot();
    let g = &snap.graph[0];
    assert_eq!(g.incidents.len(), 1);
    assert_eq!(g.incidents[0].id, "EX123456");
    let page = mail_oauth_exporter::http::page::render(&snap);
    let incidents = page.find("id=\"incidents\"").expect("an incidents section");
    let failing = page.find("id=\"probes\"").unwrap();
    assert!(incidents < failing, "incidents come above the rows");
    assert!(page.contains("EX123456"));
    assert!(page.contains("connect with IMAP &lt;b&gt;"));
    assert!(page.contains("2026-11-29T10:00:00Z"));
    assert!(!page.contains(SECRET));
    service.shutdown().await;
}

#[tokio::test]
async fn graph_403_and_429_never_change_a_probe_reason() {
    let s = setup("forbidden", "[credential_expiry]").await;
    s.ep.graph_script(GraphScript::Forbidden);
    let service = Service::start(Config::load(&s.config).unwrap()).unwrap();
    probed_ok(&service).await;
    for _ in 0..200 {
        if service.board().snapshot().graph[0].queries[0]
            .last_error
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snap = service.board().snapshot();
    let err = snap.graph[0].queries[0].last_error.clone().unwrap();
    assert!(
        err.contains("403") && err.contains("Authorization_RequestDenied"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    let text = String::from_utf8(service.metrics().render(
        &service.board().rows(),
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap();
    assert!(!text.contains("mail_oauth_graph_last_success_timestamp_seconds{"));
    assert!(!text.contains("kind=\"client_secret\""));
    assert!(
        text.contains("mail_oauth_probe_result{mailbox=\"m\",protocol=\"imap\",reason=\"ok\"} 1")
    );
    let page = mail_oauth_exporter::http::page::render(&snap);
    assert!(page.contains("Authorization_RequestDenied"));
    service.shutdown().await;

    let s = setup("throttled", "[service_health]").await;
    s.ep.graph_script(GraphScript::Throttled { retry_after: 7200 });
    let service = Service::start(Config::load(&s.config).unwrap()).unwrap();
    probed_ok(&service).await;
    for _ in 0..200 {
        if service.board().snapshot().graph[0].queries[0]
            .last_error
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = service.board().snapshot().graph[0].queries[0].clone();
    let err = q.last_error.unwrap();
    assert!(err.contains("429"), "{err}");
    // Not retried before Graph's Retry-After (the backoff alone would say 60 s).
    assert_eq!(q.retry_in_seconds, Some(7200));
    let text = String::from_utf8(service.metrics().render(
        &service.board().rows(),
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap();
    assert!(!text.contains("mail_oauth_service_health{"));
    assert!(
        text.contains("mail_oauth_probe_result{mailbox=\"m\",protocol=\"imap\",reason=\"ok\"} 1")
    );
    service.shutdown().await;
}

fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Base64 of the SHA-1 of the certificate's DER: Graph's `customKeyIdentifier`.
fn graph_thumbprint(pem_file: &str) -> String {
    use base64::Engine;
    let pem = std::fs::read(fixture(pem_file)).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &block.contents);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[tokio::test]
async fn graph_matches_the_certificate_by_thumbprint() {
    use mail_oauth_exporter::emulator::graph::EmuKeyCredential;
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.add_client(ClientSpec {
        id: "cert-app".into(),
        certificate_pem: Some(std::fs::read_to_string(fixture("client-cert.pem")).unwrap()),
        grants: vec![EmuGrant::ClientCredentials],
        mailboxes: vec![USER.into()],
        ..Default::default()
    });
    // Another certificate of the app ends sooner: it is not the configured one.
    ep.graph_set_application(
        "cert-app",
        vec![],
        vec![
            EmuKeyCredential {
                custom_key_identifier: graph_thumbprint("other-cert.pem"),
                end: "2026-12-24T00:00:00Z".into(),
            },
            EmuKeyCredential {
                custom_key_identifier: graph_thumbprint("client-cert.pem"),
                end: "2029-01-02T03:04:05Z".into(),
            },
        ],
    );
    let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let dir = tmpdir("thumbprint");
    emu.write_ca_pem(&dir.join("ca.pem")).unwrap();
    let port = emu.addr(Proto::Imap, TlsKind::Implicit).port();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             scheduler:\n  startup_spread: 1ms\n  jitter: 0s\n\
             credentials:\n  app:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: cert-app\n    grant: client_credentials\n    certificate_file: {cert}\n    private_key_file: {key}\n    graph: [credential_expiry]\n    graph_url: {auth}\n\
             mailboxes:\n  m:\n    address: {USER}\n    credential: app\n    protocols: [imap]\n    interval: 5s\n    timeout: 2s\n    imap: {{ host: 127.0.0.1, port: {port} }}\n",
            d = dir.display(),
            auth = ep.authority(),
            cert = fixture("client-cert.pem").display(),
            key = fixture("client-key.pem").display(),
        ),
    )
    .unwrap();
    let service = Service::start(Config::load(&config).unwrap()).unwrap();
    metrics_when(&service, |t| {
        t.contains("mail_oauth_graph_last_success_timestamp_seconds{credential=\"app\",query=\"credential_expiry\"}")
    })
    .await;
    let g = service.board().snapshot().graph[0].clone();
    assert_eq!(
        g.certificate_end,
        humantime::parse_rfc3339("2029-01-02T03:04:05Z").ok()
    );
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
    probed_ok(&service).await;
    service.shutdown().await;
}

#[tokio::test]
async fn a_declared_date_wins_and_a_disagreeing_graph_date_is_a_warning() {
    let s = setup("declared", "[credential_expiry]").await;
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "    graph: [credential_expiry]\n",
        "    client_secret_expires: 2027-01-01\n    graph: [credential_expiry]\n",
    );
    std::fs::write(&s.config, text).unwrap();
    let service = Service::start(Config::load(&s.config).unwrap()).unwrap();
    metrics_when(&service, |t| {
        t.contains("mail_oauth_graph_last_success_timestamp_seconds{credential=\"app\"")
    })
    .await;
    let snap = service.board().snapshot();
    let warnings = snap.graph[0].warnings.join(" ");
    assert!(
        warnings.contains("client_secret_expires is 2027-01-01")
            && warnings.contains("2028-03-04T05:06:07Z"),
        "{warnings}"
    );
    // The declared date stays the metric's value (2027-01-01T00:00:00Z).
    let text = String::from_utf8(service.metrics().render(
        &service.board().rows(),
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap();
    assert!(text.contains(
        "mail_oauth_credential_expiry_timestamp_seconds{credential=\"app\",kind=\"client_secret\"} 1798761600"
    ), "{text}");
    let page = mail_oauth_exporter::http::page::render(&snap);
    assert!(page.contains("client_secret_expires is 2027-01-01"));
    service.shutdown().await;
}
