//! Who may look (`--web.config.file`), over real sockets: basic auth on every endpoint
//! but the health checks, TLS only when configured (a plain HTTP client gets no byte of a
//! page), client certificates, certificate renewal without a restart, `POST /-/reload`
//! refused without authentication, and the binary's exit code for a bad web config.
//!
//! The "not from loopback" half of the reload rule cannot be reached through a socket here
//! (servers may only listen on 127.0.0.0/8, and every peer there is loopback); it is unit
//! tested in `src/http/mod.rs` with fake peer addresses.

use mail_oauth_exporter::command::demo::Demo;
use mail_oauth_exporter::command::run;
use mail_oauth_exporter::emulator::TestCa;
use mail_oauth_exporter::http::WebConfig;
use mail_oauth_exporter::service::Service;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_mail-oauth-exporter");
const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse: battery staple";

/// A bcrypt hash at the lowest cost, so the suite stays fast; production uses 10+.
fn hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

/// The demo's service behind a web config, on 127.0.0.1:0, in this process.
struct Served {
    base: String,
    _demo: Demo,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(dir: &tempfile::TempDir, web_yaml: &str) -> Served {
        let path = dir.path().join("web.yml");
        std::fs::write(&path, web_yaml).unwrap();
        let web = WebConfig::load(&path).unwrap();
        let scheme = if web.is_tls() { "https" } else { "http" };
        let demo = Demo::start().await.unwrap();
        let service = Service::start(demo.config().unwrap()).unwrap();
        let listener = run::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(run::serve_with(
            service,
            listener,
            Arc::new(web),
            async {
                let _ = stopped.await;
            },
            reloads,
        ));
        Served {
            base,
            _demo: demo,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.split_once("://").unwrap().1.to_string()
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("service stops")
            .unwrap();
    }
}

/// A client trusting only `ca` (PEM); no roots when `None`.
fn client(ca: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(pem) = ca {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

struct Answer {
    status: u16,
    challenge: Option<String>,
    frame_options: Option<String>,
    body: String,
}

async fn send(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    auth: Option<(&str, &str)>,
) -> reqwest::Result<Answer> {
    let mut req = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await?;
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let status = r.status().as_u16();
    let challenge = header("www-authenticate");
    let frame_options = header("x-frame-options");
    Ok(Answer {
        status,
        challenge,
        frame_options,
        body: r.text().await?,
    })
}

/// Words that appear only in what auth protects: mailbox names, metric names.
fn assert_no_content(what: &str, body: &str) {
    for word in [
        "helpdesk",
        "invoices",
        "mail_oauth_",
        "contoso",
        "<html",
        "\"version\"",
    ] {
        assert!(
            !body.contains(word),
            "{what} leaked {word:?} to an unauthenticated client: {body}"
        );
    }
}

fn write_server_cert(dir: &tempfile::TempDir, ca: &TestCa) {
    let leaf = ca.issue_server(&[]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), leaf.chain_pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), leaf.key_pem()).unwrap();
}

const TLS_FILES: &str = "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n";

#[tokio::test]
async fn basic_auth_guards_every_page_and_the_reload() {
    let dir = tempfile::tempdir().unwrap();
    let web = format!(
        "basic_auth_users:\n  {USER}: {}\n  alice: {}\n\
         http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
        hash(PASSWORD),
        hash("alice's password"),
    );
    let s = Served::start(&dir, &web).await;
    let c = client(None);

    let protected = [
        "/",
        "/metrics",
        "/api/v1/status",
        "/transcript?mailbox=helpdesk&protocol=imap",
        "/no-such-page",
    ];
    let wrong: [Option<(&str, &str)>; 5] = [
        None,
        Some((USER, "correct horse")),
        Some((USER, "")),
        Some(("alice", PASSWORD)),
        Some(("mallory", PASSWORD)),
    ];
    for path in protected {
        for creds in wrong {
            let a = send(&c, "GET", &s.url(path), creds).await.unwrap();
            assert_eq!(a.status, 401, "{path} with {creds:?}: {}", a.body);
            assert_eq!(
                a.challenge.as_deref(),
                Some("Basic realm=\"mail-oauth-exporter\""),
                "{path}"
            );
            assert_eq!(
                a.frame_options.as_deref(),
                Some("deny"),
                "configured headers on 401 too"
            );
            assert_no_content(path, &a.body);
        }
    }

    let page = send(&c, "GET", &s.url("/"), Some((USER, PASSWORD)))
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("helpdesk"), "{}", page.body);
    assert_eq!(page.frame_options.as_deref(), Some("deny"));
    // Twice more: the remembered success answers the same.
    for _ in 0..2 {
        let m = send(&c, "GET", &s.url("/metrics"), Some((USER, PASSWORD)))
            .await
            .unwrap();
        assert_eq!(m.status, 200);
        assert!(m.body.contains("mail_oauth_build_info"), "{}", m.body);
    }
    let other = send(
        &c,
        "GET",
        &s.url("/api/v1/status"),
        Some(("alice", "alice's password")),
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200);
    assert!(other.body.contains("helpdesk"));
    // Right after a success, a wrong password is still refused.
    let a = send(
        &c,
        "GET",
        &s.url("/metrics"),
        Some((USER, "Correct horse: battery staple")),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 401);

    // Health checks stay open for kubelet probes, and say nothing about mailboxes.
    let h = send(&c, "GET", &s.url("/healthz"), None).await.unwrap();
    assert_eq!(h.status, 200, "{}", h.body);
    assert_no_content("/healthz", &h.body);
    let r = send(&c, "GET", &s.url("/readyz"), None).await.unwrap();
    assert!(r.status == 200 || r.status == 503, "{}", r.status);
    assert_no_content("/readyz", &r.body);

    // Reload: not from loopback without the password; with it, yes.
    let a = send(&c, "POST", &s.url("/-/reload"), None).await.unwrap();
    assert_eq!(a.status, 401, "{}", a.body);
    let a = send(&c, "POST", &s.url("/-/reload"), Some((USER, "nope")))
        .await
        .unwrap();
    assert_eq!(a.status, 401, "{}", a.body);
    let a = send(&c, "POST", &s.url("/-/reload"), Some((USER, PASSWORD)))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    s.stop().await;
}

#[tokio::test]
async fn tls_only_refuses_plain_http_and_serves_clients_trusting_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    write_server_cert(&dir, &ca);
    let s = Served::start(&dir, TLS_FILES).await;
    assert!(s.base.starts_with("https://"));

    // A plain HTTP request on the TLS port: the handshake fails, the connection closes,
    // and nothing of a page or an HTTP answer comes back.
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .ok();
    let got = String::from_utf8_lossy(&got);
    assert!(!got.contains("HTTP/1."), "answered plain HTTP: {got}");
    assert_no_content("plain HTTP to the TLS port", &got);
    // The same through an HTTP client.
    let plain_url = s.url("/").replacen("https://", "http://", 1);
    assert!(send(&client(None), "GET", &plain_url, None).await.is_err());
    // A client that does not trust the CA refuses the server.
    let untrusted = TestCa::named("another CA").unwrap();
    assert!(
        send(&client(Some(untrusted.ca_pem())), "GET", &s.url("/"), None)
            .await
            .is_err()
    );

    let c = client(Some(ca.ca_pem()));
    let page = send(&c, "GET", &s.url("/"), None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("helpdesk"));
    // No basic auth configured: a loopback client may reload.
    let a = send(&c, "POST", &s.url("/-/reload"), None).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);

    // Renewal: new files under the same names are served at the next handshake.
    let renewed = TestCa::named("renewed CA").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // a new modification time
    write_server_cert(&dir, &renewed);
    let fresh = client(Some(renewed.ca_pem()));
    let page = send(&fresh, "GET", &s.url("/metrics"), None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(
        send(&client(Some(ca.ca_pem())), "GET", &s.url("/"), None)
            .await
            .is_err()
    );
    // A half-written renewal (a key that does not match) keeps the last good pair.
    let stray = renewed.issue_server(&[]).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(dir.path().join("tls.key"), stray.key_pem()).unwrap();
    let page = send(&client(Some(renewed.ca_pem())), "GET", &s.url("/"), None)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn tls_and_basic_auth_together() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    write_server_cert(&dir, &ca);
    let web = format!(
        "{TLS_FILES}  min_version: TLS13\nbasic_auth_users:\n  {USER}: {}\n",
        hash(PASSWORD)
    );
    let s = Served::start(&dir, &web).await;
    let c = client(Some(ca.ca_pem()));
    let a = send(&c, "GET", &s.url("/"), None).await.unwrap();
    assert_eq!(a.status, 401);
    assert_no_content("/", &a.body);
    let a = send(&c, "GET", &s.url("/"), Some((USER, "wrong")))
        .await
        .unwrap();
    assert_eq!(a.status, 401);
    let a = send(&c, "GET", &s.url("/"), Some((USER, PASSWORD)))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body.contains("helpdesk"));
    let a = send(&c, "POST", &s.url("/-/reload"), None).await.unwrap();
    assert_eq!(a.status, 401);
    // TLS 1.2 only clients are refused when min_version is TLS13.
    let tls12 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).unwrap())
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    assert!(
        send(&tls12, "GET", &s.url("/"), Some((USER, PASSWORD)))
            .await
            .is_err()
    );
    s.stop().await;
}

/// A CA for client certificates and one client identity (certificate + key PEM) from it.
fn client_ca(name: &str) -> (String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["prometheus.example".to_string()]).unwrap();
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )
}

#[tokio::test]
async fn client_certificates_required_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    write_server_cert(&dir, &ca);
    let (client_ca_pem, identity) = client_ca("clients CA");
    let (_, stranger) = client_ca("someone else's CA");
    std::fs::write(dir.path().join("clients.crt"), client_ca_pem).unwrap();
    let web = format!(
        "{TLS_FILES}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients.crt\n"
    );
    let s = Served::start(&dir, &web).await;
    let with = |identity: Option<&str>| {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).unwrap());
        if let Some(pem) = identity {
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    assert!(send(&with(None), "GET", &s.url("/"), None).await.is_err());
    assert!(
        send(&with(Some(&stranger)), "GET", &s.url("/"), None)
            .await
            .is_err()
    );
    let c = with(Some(&identity));
    let page = send(&c, "GET", &s.url("/"), None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("helpdesk"));
    // A verified client certificate is authentication: reload allowed.
    let a = send(&c, "POST", &s.url("/-/reload"), None).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    s.stop().await;
}

#[tokio::test]
async fn a_bad_web_config_stops_run_with_exit_2_and_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start().await.unwrap();
    let cases = [
        (
            "basic_auth_users:\n  prometheus: hunter2\n".to_string(),
            "web.yml:2:15: basic_auth_users.prometheus: not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n".to_string(),
            "web.yml:2:3: tls_server_config.cert_file: cannot read",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n"
                .to_string(),
            "web.yml:4:",
        ),
        (
            "basic_auth_user:\n  prometheus: x\n".to_string(),
            "web.yml:1:1: unknown field `basic_auth_user`",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("web.yml");
        std::fs::write(&path, &text).unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(BIN)
                .args(["run", "--listen", "127.0.0.1:0", "--config"])
                .arg(&demo.config_path)
                .arg("--web.config.file")
                .arg(&path)
                .output(),
        )
        .await
        .expect("run exits")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{text}: want {expected:?} in {stderr}"
        );
        assert!(
            !stderr.contains("hunter2"),
            "the refused value is not echoed: {stderr}"
        );
    }
}
