//! Credentials without a human, over real sockets: Google Workspace service accounts (the
//! JWT bearer grant, one token per mailbox) and workload identity federation (a client
//! assertion file re-read for every request), against the emulated token endpoint and
//! mail servers, through the library and the real binary. No key, assertion or token
//! reaches any output.

use mail_oauth_exporter::classify::token::reason;
use mail_oauth_exporter::emulator::token_endpoint::{
    ClientSpec, EmuGrant, FEDERATED_AUDIENCE, FederatedCredential, ServiceAccountSpec,
    TokenEndpoint,
};
use mail_oauth_exporter::emulator::{Emulator, EmulatorOptions, Proto, TlsKind};
use mail_oauth_exporter::protocol::{Mechanism, TlsMode};
use mail_oauth_exporter::status::ProbeResult;
use mail_oauth_exporter::token::{
    ClientAuth, Credential, Grant, GrantKind, Provider, RecordingObserver, TokenBudget,
    TokenService, TokenServiceOptions,
};
use mail_oauth_exporter::{Protocol, Reason, classify, probe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::process::Command;

const SA: &str = "mail-monitor@fabrikam-mail.iam.gserviceaccount.com";
const KID: &str = "5f1c0ffee0ddba11";
const MAIL_SCOPE: &str = "https://mail.google.com/";
const ALICE: &str = "alice@fabrikam.example";
const BOB: &str = "bob@fabrikam.example";
const GHOST: &str = "nobody@fabrikam.example";
const TENANT: &str = "contoso.onmicrosoft.com";
const FED_APP: &str = "aks-mail-monitor";
const ISSUER: &str = "https://oidc.prod-aks.azure.com/11111111-2222-3333-4444-555555555555/";
const SUBJECT: &str = "system:serviceaccount:mail:mail-oauth-exporter";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The PKCS#1 public key of a fixture's PEM private key (what Google keeps of a key).
fn public_key(key_fixture: &str) -> Vec<u8> {
    let pem = std::fs::read(fixture(key_fixture)).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(&p.contents)
        .or_else(|_| ring::signature::RsaKeyPair::from_der(&p.contents))
        .unwrap();
    use ring::signature::KeyPair;
    key.public_key().as_ref().to_vec()
}

/// A JSON key in Google's shape, signed with `client-key.pem`.
fn key_json(token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "fabrikam-mail",
        "private_key_id": KID,
        "private_key": std::fs::read_to_string(fixture("client-key.pem")).unwrap(),
        "client_email": SA,
        "client_id": "104857600000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
    .to_string()
}

fn account(scopes: &[&str], key_fixture: &str) -> ServiceAccountSpec {
    ServiceAccountSpec {
        client_email: SA.into(),
        private_key_id: KID.into(),
        public_key: public_key(key_fixture),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        users: vec![ALICE.into(), BOB.into()],
    }
}

fn service(dir: &Path, observer: Arc<RecordingObserver>) -> TokenService {
    let mut o = TokenServiceOptions::new(dir.join("state"));
    o.observer = observer;
    o.request_timeout = Duration::from_secs(5);
    o.backoff_base = Duration::from_millis(1);
    o.backoff_max = Duration::from_millis(2);
    TokenService::new(o).unwrap()
}

fn budget() -> TokenBudget {
    TokenBudget::new(Duration::from_secs(5), Duration::from_millis(4))
}

fn workspace(name: &str, key_file: &Path) -> Credential {
    Credential {
        name: name.into(),
        provider: Provider::Google,
        client_id: String::new(),
        grant: Grant::ServiceAccount {
            key_file: key_file.to_owned(),
        },
        client_auth: ClientAuth::None,
        client_secret_expires: None,
        graph: None,
        scopes: vec![MAIL_SCOPE.into()],
    }
}

#[tokio::test]
async fn service_account_one_token_per_mailbox_bound_to_it() {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.add_service_account(account(&[MAIL_SCOPE], "client-key.pem"));
    let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let tls = probe::TlsClient::with_ca_pem(emu.ca_pem().as_bytes()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sa.json");
    std::fs::write(&key_file, key_json(&ep.google_token_url())).unwrap();
    let obs = Arc::new(RecordingObserver::default());
    let svc = service(dir.path(), obs.clone());
    let c = workspace("workspace", &key_file);

    // One request per mailbox; the second ask of a mailbox is served from the cache.
    let alice = svc
        .access_token_as(&c, Some(ALICE), budget())
        .await
        .unwrap();
    let again = svc
        .access_token_as(&c, Some(ALICE), budget())
        .await
        .unwrap();
    assert_eq!(alice, again);
    let bob = svc.access_token_as(&c, Some(BOB), budget()).await.unwrap();
    assert_ne!(alice.value, bob.value);
    assert_eq!(
        ep.request_count(SA, "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        2
    );
    assert_eq!(obs.count("workspace", GrantKind::JwtBearer), 2);
    assert!(alice.expires_at.is_some());

    // Single flight per mailbox: many concurrent asks for one new mailbox, one request.
    ep.add_service_account(ServiceAccountSpec {
        users: vec![ALICE.into(), BOB.into(), "carol@fabrikam.example".into()],
        ..account(&[MAIL_SCOPE], "client-key.pem")
    });
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (svc, c) = (svc.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            svc.access_token_as(&c, Some("carol@fabrikam.example"), budget())
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        ep.request_count(SA, "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        3
    );

    // The JWT the endpoint received: Google's header and claims.
    let assertion = ep
        .requests()
        .last()
        .unwrap()
        .client_assertion
        .clone()
        .unwrap();
    let claims = mail_oauth_exporter::token::assertion::unverified_claims(&assertion).unwrap();
    assert_eq!(claims["iss"], SA);
    assert_eq!(claims["sub"], "carol@fabrikam.example");
    assert_eq!(claims["scope"], MAIL_SCOPE);
    assert_eq!(claims["aud"], ep.google_token_url());

    // The mail server takes alice's token for alice, and refuses it for bob.
    let spec = |user: &str| probe::ProbeSpec {
        target: probe::Target {
            protocol: Protocol::Imap,
            host: "127.0.0.1".into(),
            port: emu.addr(Proto::Imap, TlsKind::Implicit).port(),
            tls: TlsMode::Implicit,
            source_address: None,
        },
        user: user.into(),
        mechanism: Mechanism::Xoauth2,
        timeout: Duration::from_secs(5),
        limits: probe::Limits::default(),
    };
    let r = probe::run(&spec(ALICE), &tls, &alice.value).await;
    assert_eq!(
        ProbeResult::from_report(&r).reason,
        Reason::Ok,
        "{}",
        r.transcript
    );
    let r = probe::run(&spec(BOB), &tls, &alice.value).await;
    assert_eq!(
        ProbeResult::from_report(&r).reason,
        Reason::AuthRejected,
        "{}",
        r.transcript
    );

    // The metrics label the requests `grant="jwt_bearer"`, per credential.
    let metrics = Arc::new(mail_oauth_exporter::metrics::Metrics::new());
    let mut o = TokenServiceOptions::new(dir.path().join("state2"));
    o.observer = metrics.clone();
    let counted = TokenService::new(o).unwrap();
    counted
        .access_token_as(&c, Some(ALICE), budget())
        .await
        .unwrap();
    let text = String::from_utf8(metrics.render(
        &[],
        mail_oauth_exporter::metrics::Format::Prometheus,
        false,
    ))
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("mail_oauth_token_requests_total")
                && l.contains(r#"credential="workspace""#)
                && l.contains(r#"grant="jwt_bearer""#)
                && l.ends_with(" 1")),
        "{text}"
    );
    assert!(!text.contains(alice.value.expose()));

    // Nothing secret in Debug output.
    let shown = format!("{alice:?} {c:?} {:?}", obs.seen());
    assert!(!shown.contains(alice.value.expose()), "{shown}");
    assert!(!shown.contains(&assertion), "{shown}");
}

#[tokio::test]
async fn service_account_failures_map_to_googles_reasons() {
    let ep = TokenEndpoint::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sa.json");
    std::fs::write(&key_file, key_json(&ep.google_token_url())).unwrap();
    let svc = service(dir.path(), Arc::new(RecordingObserver::default()));
    let mut n = 0;
    let mut ask = async |user: &str| {
        n += 1;
        // A fresh credential name each time: no cache, no backoff from the previous case.
        let c = workspace(&format!("case{n}"), &key_file);
        svc.access_token_as(&c, Some(user), budget()).await
    };

    // Unknown user of the domain.
    ep.add_service_account(account(&[MAIL_SCOPE], "client-key.pem"));
    let e = ask(GHOST).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenInvalidGrant, "{e}");
    assert!(classify::token::detail(&e).contains("Invalid email or User ID"));

    // Domain-wide delegation not granted for the mail scope.
    ep.add_service_account(account(
        &["https://www.googleapis.com/auth/calendar"],
        "client-key.pem",
    ));
    let e = ask(ALICE).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenUnauthorizedClient, "{e}");

    // The key was deleted: Google holds another public key now.
    ep.add_service_account(account(&[MAIL_SCOPE], "other-key.pem"));
    let e = ask(ALICE).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenInvalidClient, "{e}");

    // Throttled by Google: 429 is token_throttled whatever the body.
    ep.script_once(
        mail_oauth_exporter::emulator::token_endpoint::Target::Client(SA.into()),
        mail_oauth_exporter::emulator::token_endpoint::Scripted::Throttle {
            retry_after: Some(1),
        },
    );
    let e = ask(ALICE).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenThrottled, "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));

    // Back to a good setup: a token again.
    ep.add_service_account(account(&[MAIL_SCOPE], "client-key.pem"));
    ask(ALICE).await.unwrap();

    // A key file that is not a key: a token_error naming the file and field, no request.
    let before = ep.requests().len();
    std::fs::write(
        &key_file,
        r#"{"type":"service_account","client_email":"x@y"}"#,
    )
    .unwrap();
    let e = ask(ALICE).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenError);
    assert!(e.to_string().contains("private_key_id"), "{e}");
    assert_eq!(ep.requests().len(), before);

    // No subject: service accounts are asked for a mailbox.
    std::fs::write(&key_file, key_json(&ep.google_token_url())).unwrap();
    let c = workspace("no-subject", &key_file);
    let e = svc.access_token(&c).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenError, "{e}");
}

/// A JWT as a Kubernetes projected service account token looks (unsigned here: the
/// emulator checks issuer, subject, audience and time, as documented).
fn federated_token(sub: &str, exp_from_now: i64, jti: &str) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "kid": "k8s"})),
        b64(serde_json::json!({
            "aud": [FEDERATED_AUDIENCE],
            "iss": ISSUER,
            "sub": sub,
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + exp_from_now,
            "jti": jti,
        }))
    )
}

fn federated_app(ep: &TokenEndpoint) {
    ep.add_client(ClientSpec {
        id: FED_APP.into(),
        grants: vec![EmuGrant::ClientCredentials],
        mailboxes: vec![ALICE.into()],
        federated: vec![FederatedCredential {
            issuer: ISSUER.into(),
            subject: SUBJECT.into(),
        }],
        ..Default::default()
    });
}

#[tokio::test]
async fn client_assertion_file_is_reread_for_every_request() {
    let ep = TokenEndpoint::start().await.unwrap();
    federated_app(&ep);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    let first = federated_token(SUBJECT, 3600, "first");
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let svc = service(dir.path(), Arc::new(RecordingObserver::default()));
    let cred = |name: &str| Credential {
        name: name.into(),
        provider: Provider::Microsoft {
            tenant: TENANT.into(),
            authority: ep.authority(),
        },
        client_id: FED_APP.into(),
        grant: Grant::ClientCredentials,
        client_auth: ClientAuth::AssertionFile(file.clone()),
        client_secret_expires: None,
        graph: None,
        scopes: vec!["https://outlook.office365.com/.default".into()],
    };
    let c = cred("wi");
    let t = svc.access_token(&c).await.unwrap();
    let sent = ep.requests().last().unwrap().clone();
    assert_eq!(sent.client_assertion.as_deref(), Some(first.as_str()));
    assert_eq!(sent.client_secret, None);
    assert_eq!(sent.status, 200);

    // The file rotates: the next request sends the new content.
    let second = federated_token(SUBJECT, 3600, "second");
    std::fs::write(&file, &second).unwrap();
    svc.invalidate(&c).await;
    let t2 = svc.access_token(&c).await.unwrap();
    assert_ne!(t.value, t2.value);
    assert_eq!(
        ep.requests().last().unwrap().client_assertion.as_deref(),
        Some(second.as_str())
    );

    // The same file on a `generic` credential: RFC 7523 client authentication anywhere.
    let generic = Credential {
        provider: Provider::Generic {
            token_url: ep.token_url(TENANT),
            device_authorization_url: None,
        },
        ..cred("wi-generic")
    };
    svc.access_token(&generic).await.unwrap();
    let sent = ep.requests().last().unwrap().clone();
    assert_eq!(sent.client_assertion.as_deref(), Some(second.as_str()));
    assert_eq!(sent.status, 200);

    // No federated credential for this subject: AADSTS70021.
    std::fs::write(
        &file,
        federated_token("system:serviceaccount:other:sa", 3600, "x"),
    )
    .unwrap();
    let e = svc.access_token(&cred("wi-70021")).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenInvalidClient, "{e}");
    assert!(e.to_string().contains("AADSTS70021"), "{e}");

    // A stale file (the kubelet stopped rotating it): AADSTS700024.
    std::fs::write(&file, federated_token(SUBJECT, -600, "old")).unwrap();
    let e = svc.access_token(&cred("wi-700024")).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenInvalidClient, "{e}");
    assert!(e.to_string().contains("AADSTS700024"), "{e}");

    // An empty file: no request, a token_error naming the file, never its content.
    let before = ep.requests().len();
    std::fs::write(&file, "\n").unwrap();
    let e = svc.access_token(&cred("wi-empty")).await.unwrap_err();
    assert_eq!(reason(&e), Reason::TokenError);
    assert!(e.to_string().contains("azure-identity-token"), "{e}");
    assert_eq!(ep.requests().len(), before);
    let shown = format!("{:?}", cred("x"));
    assert!(!shown.contains(&second), "{shown}");
}

/// `check` and `probe` through the binary with both credential kinds in one config.
#[tokio::test]
async fn check_and_probe_through_the_binary() {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.add_service_account(account(&[MAIL_SCOPE], "client-key.pem"));
    federated_app(&ep);
    let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    std::fs::write(d.join("sa.json"), key_json(&ep.google_token_url())).unwrap();
    let fed = federated_token(SUBJECT, 3600, "bin");
    std::fs::write(d.join("federated-token"), &fed).unwrap();
    let imap = emu.addr(Proto::Imap, TlsKind::Implicit).port();
    let config = format!(
        "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
         credentials:\n\
         \x20 workspace:\n    provider: google\n    grant: service_account\n    service_account_key_file: {d}/sa.json\n\
         \x20 aks:\n    provider: microsoft\n    tenant: {TENANT}\n    authority: {auth}\n    client_id: {FED_APP}\n    grant: client_credentials\n    client_assertion_file: {d}/federated-token\n\
         mailboxes:\n\
         \x20 alice:\n    address: {ALICE}\n    credential: workspace\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: {imap} }}\n\
         \x20 ghost:\n    address: {GHOST}\n    credential: workspace\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: {imap} }}\n\
         \x20 alice-app:\n    address: {ALICE}\n    credential: aks\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: {imap} }}\n",
        d = d.display(),
        auth = ep.authority(),
    );
    let path = d.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let mut outputs = Vec::new();
    let mut run = async |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(text.clone());
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, out) = run(&["check"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&["probe", "--mailbox", "alice"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&["probe", "--mailbox", "ghost"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("token_invalid_grant"), "{out}");
    let (code, out) = run(&["probe", "--mailbox", "alice-app"]).await;
    assert_eq!(code, 0, "{out}");

    // `check` reads the files: a key that is not Google's JSON, an assertion that is empty.
    std::fs::write(
        d.join("sa.json"),
        "{\"private_key\": \"-----BEGIN PRIVATE KEY-----MIIE",
    )
    .unwrap();
    std::fs::write(d.join("federated-token"), "").unwrap();
    let (code, out) = run(&["check"]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("service_account_key_file") && out.contains("sa.json"),
        "{out}"
    );
    assert!(
        out.contains("client_assertion_file") && out.contains("empty"),
        "{out}"
    );

    let key = std::fs::read_to_string(fixture("client-key.pem")).unwrap();
    let key_body: String = key.lines().nth(1).unwrap().to_string();
    let all = outputs.join("\n");
    for secret in ep
        .all_access_tokens()
        .into_iter()
        .chain([fed, key_body, "MIIE".to_string()])
    {
        assert!(!all.contains(&secret), "a secret in the output: {all}");
    }
}

/// The Azure Workload Identity sidecar: the webhook's label and annotation, the config's
/// assertion file at the path the webhook projects, and no secret anywhere.
#[test]
fn workload_identity_sidecar_has_no_secret() {
    use serde::Deserialize;
    use serde_yaml::Value;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes/sidecar-workload-identity.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap();
    let sa = of("ServiceAccount");
    let client_id = &sa["metadata"]["annotations"]["azure.workload.identity/client-id"];
    assert!(client_id.is_string(), "{sa:?}");
    let pod = &of("Deployment")["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["azure.workload.identity/use"],
        Value::from("true")
    );
    assert_eq!(pod["spec"]["serviceAccountName"], sa["metadata"]["name"]);
    assert!(!text.contains("kind: Secret") && !text.contains("secretName"));
    assert!(
        pod["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|v| v.get("secret").is_none())
    );
    let config_text = of("ConfigMap")["data"]["config.yaml"].as_str().unwrap();
    let config = mail_oauth_exporter::config::Config::parse(&path, config_text).unwrap();
    let cred = config.credentials.values().next().unwrap();
    assert_eq!(
        cred.client_auth,
        ClientAuth::AssertionFile("/var/run/secrets/azure/tokens/azure-identity-token".into())
    );
    assert_eq!(&cred.client_id, client_id.as_str().unwrap());
}
