//! No secret in any output: a demo run's metrics, status page, status JSON, transcripts
//! and logs (JSON, debug level) are scanned for every client secret, refresh token and
//! access token the emulated provider knows, and for the base64 SASL strings made of them.

use crate::demo::{Running, get, wait_ok};
use base64::Engine as _;
use mail_oauth_exporter::command::demo::Demo;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything secret the demo's provider issued or was given, in every form that could
/// leak: bare, and inside the XOAUTH2 / OAUTHBEARER initial responses.
pub fn secrets_of(demo: &Demo) -> Vec<String> {
    let mut secrets = Vec::new();
    for entry in std::fs::read_dir(demo.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "secret") {
            secrets.push(std::fs::read_to_string(&path).unwrap().trim().to_string());
        }
    }
    assert_eq!(secrets.len(), 3, "the demo's three client secrets");
    let refresh = demo.endpoint.all_refresh_tokens();
    let access = demo.endpoint.all_access_tokens();
    assert!(refresh.len() >= 2, "{refresh:?}");
    assert!(!access.is_empty());
    secrets.extend(refresh);
    let b64 = base64::engine::general_purpose::STANDARD;
    let users = [
        "helpdesk@contoso.com",
        "invoices@contoso.com",
        "scanner@contoso.com",
        "shared@contoso.com",
        "ceo@contoso.com",
        "busy@contoso.com",
        "slow@contoso.com",
    ];
    for token in access {
        for user in users {
            secrets.push(b64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01")));
        }
        secrets.push(b64.encode(&token));
        secrets.push(token);
    }
    secrets
}

/// Fails naming the output and the kind of secret found (never the secret itself).
pub fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for (i, s) in secrets.iter().enumerate() {
        assert!(!s.is_empty());
        assert!(
            !text.contains(s.as_str()),
            "{what} contains secret #{i} ({} chars)",
            s.len()
        );
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log capture of this test binary: a global subscriber (a scoped one misses events
/// whose callsites other tests, running in parallel, registered first), JSON at debug.
fn capture() -> &'static Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test installs a global subscriber");
        capture
    })
}

#[tokio::test]
async fn no_secret_in_metrics_status_transcripts_or_logs() {
    let capture = capture();
    let r = Running::start(|t| t).await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    // A second round, so rotated refresh tokens and renewed tokens are in play too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut outputs = Vec::new();
    for path in ["/metrics", "/", "/api/v1/status"] {
        let (code, body) = get(&r.url(path)).await;
        assert_eq!(code, 200, "{path}");
        outputs.push((path.to_string(), body));
    }
    let status: serde_json::Value = serde_json::from_str(&outputs[2].1).unwrap();
    let mut transcripts = 0;
    for p in status["probes"].as_array().unwrap() {
        if let Some(u) = p["transcript_url"].as_str() {
            let (code, body) = get(&r.url(u)).await;
            assert_eq!(code, 200);
            assert!(
                body.contains("<redacted>") || !body.contains("AUTH"),
                "{body}"
            );
            outputs.push((u.to_string(), body));
            transcripts += 1;
        }
    }
    assert!(transcripts >= 8, "{transcripts} transcripts");
    let secrets = secrets_of(&r.demo);
    r.stop().await;
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("probe failed") && logs.contains("probe succeeded"),
        "logs were captured"
    );
    outputs.push(("logs".into(), logs));
    for (what, text) in &outputs {
        assert_clean(what, text, &secrets);
    }
}

// ---------------------------------------------------------------------------------------
// Echoing peers: servers and token endpoints that repeat what they were sent.

use mail_oauth_exporter::emulator::token_endpoint::{
    ClientSpec, EmuGrant, Scripted, Target, TokenEndpoint,
};
use mail_oauth_exporter::emulator::{Behaviour, Echo, Emulator, EmulatorOptions, Proto, TlsKind};
use std::collections::HashSet;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The shortest run of a secret that must never appear in any output.
const WINDOW: usize = 16;

/// Every 16-character window of every secret, in its raw, URL-encoded and base64 forms.
pub struct Windows(HashSet<Vec<u8>>);

impl Windows {
    pub fn new(secrets: &[String]) -> Windows {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut set = HashSet::new();
        for s in secrets {
            assert!(s.len() >= WINDOW, "test secrets are long enough to window");
            let url: String = form_urlencoded::byte_serialize(s.as_bytes()).collect();
            for form in [s.clone(), url, b64.encode(s)] {
                for w in form.as_bytes().windows(WINDOW) {
                    set.insert(w.to_vec());
                }
            }
        }
        Windows(set)
    }

    /// Fails naming the output and where in it a window was found (never the secret).
    pub fn assert_clean(&self, what: &str, text: &str) {
        for (i, w) in text.as_bytes().windows(WINDOW).enumerate() {
            assert!(
                !self.0.contains(w),
                "{what}: 16 characters of a secret at byte {i}, after {:?}",
                String::from_utf8_lossy(&text.as_bytes()[i.saturating_sub(60)..i])
            );
        }
    }
}

/// The hostile world: one emulated provider whose mail servers echo, per user, what they
/// got, and a token endpoint whose clients get echoing or unusable replies.
struct EchoWorld {
    _ep: Arc<TokenEndpoint>,
    emu: Emulator,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    /// Secrets the test made up (client secrets, refresh token, unusable tokens).
    made_up: Vec<String>,
    ep: Arc<TokenEndpoint>,
    /// (mailbox, detail words that show the echo arrived and was blanked).
    mailboxes: Vec<(&'static str, &'static str)>,
}

const ECHO_USERS: [(&str, Echo); 4] = [
    ("authline@contoso.com", Echo::AuthLine),
    ("token@contoso.com", Echo::Token),
    ("bye@contoso.com", Echo::Bye),
    ("challenge@contoso.com", Echo::Challenge),
];

/// A 200 token reply without `access_token` (the token under another name).
fn unusable_missing(token: &str) -> String {
    format!(
        r#"{{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"accessToken":"{token}"}}"#
    )
}

/// A 200 token reply cut in the middle of its access token (bad JSON).
fn unusable_cut(token: &str) -> String {
    format!(r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"{token}"#)
}

impl EchoWorld {
    async fn start() -> EchoWorld {
        let ep = Arc::new(TokenEndpoint::start().await.unwrap());
        let mut made_up = Vec::new();
        let secret =
            |name: &str| format!("cs~{name}+Q8/kT3=vW.9zR_xY2mN5pL7-{}", std::process::id());
        let users: Vec<String> = ECHO_USERS.iter().map(|(u, _)| u.to_string()).collect();
        // Access tokens of unusable 200 replies (made up: never issued, never valid).
        let missing_token = format!(
            "at1.7f3a9c1e5b2d8046a1c3e5f7{}",
            "9b2d4f6a8c0e1a3c5e7f9b1d3f5a7c9e".repeat(4)
        );
        let cut_token = format!(
            "at2.0e1d2c3b4a5968778695a4b3c2d1e0f{}",
            "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d".repeat(4)
        );
        made_up.push(missing_token.clone());
        made_up.push(cut_token.clone());
        let apps: [(&str, Option<Scripted>, EmuGrant); 5] = [
            ("good", None, EmuGrant::ClientCredentials),
            (
                "echo-cc",
                Some(Scripted::EchoForm(400)),
                EmuGrant::ClientCredentials,
            ),
            (
                "echo-rt",
                Some(Scripted::EchoForm(400)),
                EmuGrant::RefreshToken,
            ),
            (
                "missing",
                Some(Scripted::Raw {
                    status: 200,
                    content_type: "application/json".into(),
                    body: unusable_missing(&missing_token),
                }),
                EmuGrant::ClientCredentials,
            ),
            (
                "cut",
                Some(Scripted::Raw {
                    status: 200,
                    content_type: "application/json".into(),
                    body: unusable_cut(&cut_token),
                }),
                EmuGrant::ClientCredentials,
            ),
        ];
        for (name, script, grant) in &apps {
            ep.add_client(ClientSpec {
                id: format!("{name}-app"),
                secret: Some(secret(name)),
                grants: vec![*grant],
                mailboxes: users.clone(),
                ..Default::default()
            });
            made_up.push(secret(name));
            if let Some(s) = script {
                ep.script_always(Target::Client(format!("{name}-app")), s.clone());
            }
        }
        let mut options = EmulatorOptions::new(ep.clone());
        options.advertise_oauthbearer = true;
        for (user, echo) in ECHO_USERS {
            options.users.insert(user.into(), Behaviour::Echo(echo));
        }
        let emu = Emulator::start(options).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        emu.write_ca_pem(&d.join("ca.pem")).unwrap();
        let mut config = format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             defaults:\n  interval: 10m\n  timeout: 5s\n\
             scheduler:\n  startup_spread: 1s\n  shutdown_grace: 2s\n\
             credentials:\n",
            d = d.display()
        );
        for (name, _, grant) in &apps {
            std::fs::write(d.join(format!("{name}.secret")), secret(name)).unwrap();
            let grant = match grant {
                EmuGrant::RefreshToken => "refresh_token",
                _ => "client_credentials",
            };
            config.push_str(&format!(
                "  {name}:\n    provider: microsoft\n    tenant: contoso\n    authority: {}\n    client_id: {name}-app\n    grant: {grant}\n    client_secret_file: {}/{name}.secret\n",
                ep.authority(),
                d.display()
            ));
        }
        let port = |p: Proto| emu.addr(p, TlsKind::Implicit).port();
        let servers = format!(
            "    imap: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n    pop3: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n    smtp: {{ host: 127.0.0.1, port: {}, tls: starttls }}",
            port(Proto::Imap),
            port(Proto::Pop3),
            emu.addr(Proto::Smtp, TlsKind::Starttls).port(),
        );
        config.push_str("mailboxes:\n");
        let mut mailboxes = Vec::new();
        for (mailbox, user, mechanism, credential, words) in [
            (
                "echo-authline",
                "authline@contoso.com",
                "xoauth2",
                "good",
                "Invalid credentials for: AUTH",
            ),
            (
                "echo-token",
                "token@contoso.com",
                "xoauth2",
                "good",
                "token <redacted> is not valid",
            ),
            (
                "echo-bye",
                "bye@contoso.com",
                "xoauth2",
                "good",
                "<redacted>",
            ),
            (
                "echo-challenge",
                "challenge@contoso.com",
                "xoauth2",
                "good",
                "token <redacted> is not valid",
            ),
            (
                "echo-challenge-ob",
                "challenge@contoso.com",
                "oauthbearer",
                "good",
                "<redacted>",
            ),
            (
                "token-echo-secret",
                "token@contoso.com",
                "xoauth2",
                "echo-cc",
                "client_secret=<redacted>",
            ),
            (
                "token-echo-refresh",
                "token@contoso.com",
                "xoauth2",
                "echo-rt",
                "refresh_token=<redacted>",
            ),
            (
                "token-unusable-missing",
                "token@contoso.com",
                "xoauth2",
                "missing",
                r#"accessToken\":\"<redacted>\""#,
            ),
            (
                "token-unusable-cut",
                "token@contoso.com",
                "xoauth2",
                "cut",
                r#"access_token\":\"<redacted>"#,
            ),
        ] {
            let (protocols, servers) = if mailbox.starts_with("echo-") {
                ("[imap, pop3, smtp]", servers.as_str())
            } else {
                ("[imap]", servers.lines().next().unwrap())
            };
            config.push_str(&format!(
                "  {mailbox}:\n    address: {user}\n    credential: {credential}\n    mechanism: {mechanism}\n    protocols: {protocols}\n{servers}\n"
            ));
            mailboxes.push((mailbox, words));
        }
        let path = d.join("config.yaml");
        std::fs::write(&path, config).unwrap();

        // The delegated credential's refresh token, imported as an operator would.
        let rt = format!(
            "0.AAAA-echo-refresh-token-{}-Zm9vYmFyYmF6cXV4",
            std::process::id()
        );
        std::fs::write(d.join("rt"), &rt).unwrap();
        made_up.push(rt);
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(["login", "--config"])
            .arg(&path)
            .args(["--credential", "echo-rt", "--refresh-token-file"])
            .arg(d.join("rt"))
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "login import: {out:?}");
        EchoWorld {
            _ep: ep.clone(),
            emu,
            dir,
            config: path,
            made_up,
            ep,
            mailboxes,
        }
    }

    /// Every secret in play: the made-up ones, every access token issued, and every SASL
    /// string the mail servers received.
    fn windows(&self) -> Windows {
        let mut secrets = self.made_up.clone();
        secrets.extend(self.ep.all_access_tokens());
        for proto in [Proto::Imap, Proto::Pop3, Proto::Smtp] {
            for line in self.emu.received(proto) {
                for word in line.split_whitespace() {
                    if word.len() >= 40 {
                        secrets.push(word.to_string());
                    }
                }
            }
        }
        assert!(
            secrets.len() > self.made_up.len() + 2,
            "tokens were issued and sent"
        );
        Windows::new(&secrets)
    }
}

/// `probe` (the CLI, debug logs on stderr) against every echoing peer: the echoes arrive,
/// blanked, and no 16 characters of any secret are printed.
#[tokio::test]
async fn echoing_peers_leak_nothing_through_probe() {
    let world = EchoWorld::start().await;
    let mut outputs = Vec::new();
    for (mailbox, words) in &world.mailboxes {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(["--log-format", "json", "probe", "--config"])
            .arg(&world.config)
            .args(["--mailbox", mailbox])
            .env("RUST_LOG", "debug")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{mailbox}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let detail = stdout
            .lines()
            .filter(|l| l.starts_with("detail"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            detail.contains(words),
            "{mailbox}: the echo arrived, blanked: {stdout}"
        );
        outputs.push((format!("probe {mailbox} stdout"), stdout));
        outputs.push((
            format!("probe {mailbox} stderr"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let windows = world.windows();
    for (what, text) in &outputs {
        windows.assert_clean(what, text);
    }
    drop(world.dir);
}

/// `run` (a child, JSON logs at debug level) against the same peers: `/`, `/api/v1/status`,
/// every transcript, `/metrics` and the log hold no 16 characters of any secret.
#[tokio::test]
async fn echoing_peers_leak_nothing_through_run() {
    let world = EchoWorld::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args([
            "--log-format",
            "json",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&world.config)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let base = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("run logs its start")
            .unwrap()
            .expect("run is running");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        log.push(line);
        if v["fields"]["message"] == "mail-oauth-exporter running" {
            break format!("http://{}", v["fields"]["address"].as_str().unwrap());
        }
    };
    let logs = tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            log.push(l);
        }
        log.join("\n")
    });
    wait_ok(&format!("{base}/readyz"), Duration::from_secs(60)).await;

    let (code, status) = get(&format!("{base}/api/v1/status")).await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    let mut outputs = vec![("/api/v1/status".to_string(), status.clone())];
    for (mailbox, words) in &world.mailboxes {
        let rows: Vec<&serde_json::Value> = json["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["mailbox"] == *mailbox)
            .collect();
        assert!(!rows.is_empty(), "{mailbox}");
        for row in rows {
            let detail = row["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(words), "{mailbox}: {row}");
        }
    }
    for path in ["/", "/metrics"] {
        let (code, body) = get(&format!("{base}{path}")).await;
        assert_eq!(code, 200, "{path}");
        outputs.push((path.to_string(), body));
    }
    let mut transcripts = 0;
    for p in json["probes"].as_array().unwrap() {
        if let Some(u) = p["transcript_url"].as_str() {
            let (code, body) = get(&format!("{base}{u}")).await;
            assert_eq!(code, 200, "{u}");
            outputs.push((u.to_string(), body));
            transcripts += 1;
        }
    }
    assert!(transcripts >= 15, "{transcripts} transcripts");

    let pid = child.id().unwrap();
    crate::demo::signal_pid(pid, "TERM");
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let logs = logs.await.unwrap();
    assert!(logs.contains("\"DEBUG\""), "debug level was logged");
    outputs.push(("log".into(), logs));
    let windows = world.windows();
    for (what, text) in &outputs {
        windows.assert_clean(what, text);
    }
}
