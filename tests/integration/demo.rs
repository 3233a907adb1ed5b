//! `demo`, the README's first command: it starts, shows each broken mailbox with its
//! reason, and stops cleanly on SIGINT.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn demo_shows_every_reason_and_stops_on_sigint() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .arg("demo")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("demo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut round = Vec::new();
    let read = async {
        let mut in_round = false;
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("round 1") {
                in_round = true;
            } else if in_round && line.is_empty() {
                break;
            } else if in_round {
                round.push(line);
                // 15 probes in the demo fleet, plus the header line.
                if round.len() == 16 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("a round within 30s");
    let row = |mailbox: &str, proto: &str| -> String {
        round
            .iter()
            .find(|l| l.split_whitespace().take(2).eq([mailbox, proto]))
            .unwrap_or_else(|| panic!("no row {mailbox} {proto} in {round:#?}"))
            .clone()
    };
    let expect = [
        ("healthy", "imap", "ok"),
        ("healthy", "pop3", "ok"),
        ("healthy", "smtp", "ok"),
        ("token-refused", "pop3", "auth_rejected"),
        ("smtp-auth-disabled", "smtp", "smtp_auth_disabled"),
        ("security-defaults", "smtp", "auth_policy_blocked"),
        ("not-connected", "imap", "mailbox_unavailable"),
        ("throttled", "smtp", "throttled"),
        ("gmail-style-challenge", "imap", "auth_rejected"),
        ("token-expiring", "smtp", "auth_token_expired"),
        ("slow-server", "imap", "ok"),
    ];
    for (mailbox, proto, reason) in expect {
        let r = row(mailbox, proto);
        assert_eq!(r.split_whitespace().nth(2), Some(reason), "{r}");
    }
    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGINT")
        .unwrap();
    assert!(status.success(), "{status}");
}
