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
