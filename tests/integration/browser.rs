//! The status page in a real browser: Debian's Chromium, headless, renders it; its rows
//! match the metrics; no secret appears in what the browser sees.

use crate::demo::{Running, find, get, parse_metrics, wait_ok};
use crate::secrets::{assert_clean, secrets_of};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!(
        "Chromium is missing: scripts/test installs it (as root); by hand: sudo apt-get install -y chromium"
    );
}

/// Runs headless Chromium with the flags a closed network needs, and a fresh profile.
async fn chromium_run(profile: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("chromium finishes")
        .expect("chromium runs")
}

#[tokio::test]
async fn status_page_renders_in_chromium_and_matches_the_metrics() {
    let r = Running::start(|t| t).await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    let profile = tempfile::tempdir().unwrap();

    let dom = chromium_run(profile.path(), &["--dump-dom", &r.url("/")]).await;
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    let metrics = parse_metrics(&get(&r.url("/metrics")).await.1);

    // Rows as the browser parsed them: mailbox, protocol, reason.
    let mut rows = BTreeSet::new();
    for tr in dom.split("<tr data-mailbox=\"").skip(1) {
        let attr = |name: &str| {
            let key = format!("{name}=\"");
            let start = tr.find(&key).map(|i| i + key.len()).unwrap_or(0);
            tr[start..].split('"').next().unwrap().to_string()
        };
        let mailbox = tr.split('"').next().unwrap().to_string();
        rows.insert((mailbox, attr("data-protocol"), attr("data-reason")));
    }
    let from_metrics: BTreeSet<(String, String, String)> =
        find(&metrics, "mail_oauth_probe_result", &[])
            .iter()
            .map(|s| {
                (
                    s.labels["mailbox"].clone(),
                    s.labels["protocol"].clone(),
                    s.labels["reason"].clone(),
                )
            })
            .collect();
    assert!(from_metrics.len() >= 8);
    assert_eq!(
        rows, from_metrics,
        "status page rows differ from the metrics"
    );
    // The summary counts agree with the rows.
    let failing = from_metrics.iter().filter(|r| r.2 != "ok").count();
    assert!(
        dom.contains(&format!("id=\"count-failed\"><b>{failing}</b>")),
        "failing count {failing} not shown"
    );
    // A failure shows its fix.
    assert!(
        dom.contains("Fix: enable SMTP AUTH"),
        "no fix hint for smtp_auth_disabled"
    );
    // The history strip, the failure streak, the counts by reason, the fix as a command,
    // the token exchange of a row that failed before connecting, the last token error.
    assert!(
        dom.contains("<span class=\"tick permanent\" title=\""),
        "no history ticks"
    );
    assert!(
        dom.contains("<span class=\"tick ok\" title=\""),
        "no history ticks"
    );
    assert!(dom.contains("failing since "));
    assert!(dom.contains("id=\"count-reason-token_invalid_grant\""));
    assert!(dom.contains("<code>mail-oauth-exporter login --config "));
    assert!(dom.contains("<a href=\"/transcript?credential=former-user\">token exchange</a>"));
    assert!(dom.contains("token_invalid_grant</span><br>"));

    // It renders: a screenshot of the page is a real, non-trivial PNG.
    let shot = profile.path().join("page.png");
    let out = chromium_run(
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,4200",
            &r.url("/"),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    // Kept for a look: target/tmp/status-page.png.
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
        &png,
    );
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280);
    assert!(
        png.len() > 20_000,
        "a blank page compresses to almost nothing: {} bytes",
        png.len()
    );

    assert_clean("status page DOM", &dom, &secrets_of(&r.demo));
    r.stop().await;
}
