//! Crash safety of the running exporter against single-use refresh token rotation (Okta,
//! Auth0, Keycloak with revoke-on-use: the presented token dies the moment its successor
//! is issued). `run` is killed with SIGKILL 1,000 times at random moments around its first
//! refresh (every start refreshes at once).
//!
//! After every kill the one valid refresh token is either in a file under `state_dir` (the
//! committed file, or a temp file the kill left before its rename, which the next start
//! recovers), or it is lost. A loss is counted, split by whether the endpoint sent the
//! reply after the kill or before it (then it was on the wire or being parsed, not yet
//! written: no client can keep a token it has not received), and the credential is
//! re-seeded. What must never happen: a token that had reached the disk is not used by the
//! next start. The endpoint's log shows that: every refresh request was answered 200, i.e.
//! no start ever presented a rotated-out token. Afterwards `probe` logs in with the token
//! on disk.

use mail_oauth_exporter::emulator::token_endpoint::{ClientSpec, EmuGrant, TokenEndpoint};
use mail_oauth_exporter::emulator::{Emulator, EmulatorOptions, Proto, TlsKind};
use mail_oauth_exporter::secret::Secret;
use mail_oauth_exporter::token::RefreshTokenStore;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

const USER: &str = "helpdesk@contoso.com";
const KILLS: usize = 1000;

/// Every file under `dir` and its content, trimmed.
fn files(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    text.trim().to_string(),
                ))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Waits until the endpoint has handled whatever the killed process had sent: its request
/// log stops growing.
async fn quiet(ep: &TokenEndpoint) {
    let mut last = ep.requests().len();
    let mut still = 0;
    while still < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = ep.requests().len();
        if now == last {
            still += 1;
        } else {
            (last, still) = (now, 0);
        }
    }
}

#[tokio::test]
async fn kill_9_during_single_use_rotation_never_loses_a_token_that_reached_the_disk() {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.allow_refresh_token_reuse(false);
    ep.add_client(ClientSpec {
        id: "helpdesk-app".into(),
        grants: vec![EmuGrant::RefreshToken],
        ..Default::default()
    });
    let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    let port = emu.addr(Proto::Imap, TlsKind::Implicit).port();
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             scheduler:\n  startup_spread: 1ms\n  jitter: 0s\n\
             credentials:\n  delegated:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: helpdesk-app\n    grant: refresh_token\n\
             mailboxes:\n  m:\n    address: {USER}\n    credential: delegated\n    protocols: [imap]\n    interval: 5s\n    timeout: 1s\n    imap: {{ host: 127.0.0.1, port: {port} }}\n",
            d = d.display(),
            auth = ep.authority(),
        ),
    )
    .unwrap();
    let state = d.join("state");
    let store = RefreshTokenStore::new(&state);
    let first = ep.add_user(USER, "helpdesk-app", &[]);
    store
        .save("delegated", &Secret::new(first.clone()))
        .await
        .unwrap();
    let state_file = store.path_for("delegated");

    // How long a start takes to its first saved rotation on this machine, now (a loaded
    // CI machine is slower): the kills are spread around it.
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(["run", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut samples = Vec::new();
    for _ in 0..3 {
        let before = std::fs::read_to_string(&state_file).unwrap();
        let started = tokio::time::Instant::now();
        let mut child = spawn();
        while std::fs::read_to_string(&state_file).unwrap() == before {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no rotation within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(started.elapsed());
        child.start_kill().unwrap();
        let _ = child.wait().await;
    }
    samples.sort();
    let to_save = samples[1];
    eprintln!("a start saves its first rotation after {to_save:?}");
    quiet(&ep).await;

    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut last = ep.valid_refresh_tokens(USER);
    let (mut rotations_seen, mut recovered_from_temp) = (0, 0);
    let mut lost_sent_after_kill = 0;
    // How long before the kill the endpoint had built each reply that was lost anyway.
    let mut lost_sent_before_kill: Vec<Duration> = Vec::new();
    for i in 0..KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Between half and one and a half times the time to the first save: before,
        // during and after the refresh and its write.
        let micros = to_save.as_micros() as u64;
        let wait = Duration::from_micros(micros / 2 + seed % micros.max(1));
        let mut child = spawn();
        tokio::time::sleep(wait).await;
        let killed_at = std::time::Instant::now();
        child.start_kill().unwrap(); // SIGKILL
        let _ = child.wait().await;
        quiet(&ep).await;

        let valid = ep.valid_refresh_tokens(USER);
        assert_eq!(
            valid.len(),
            1,
            "kill {i}: single-use rotation keeps one token"
        );
        let valid = &valid[0];
        let on_disk = files(&state);
        for (name, content) in &on_disk {
            // Torn temp files are allowed (the next start ignores them); whole ones must
            // hold tokens the endpoint issued.
            assert!(
                content.is_empty()
                    || ep.all_refresh_tokens().contains(content)
                    || name.ends_with(".tmp"),
                "kill {i}: {name} holds something the endpoint never issued"
            );
        }
        match on_disk.iter().find(|(_, c)| c == valid) {
            Some((name, _)) => {
                if last.first() != Some(valid) {
                    rotations_seen += 1;
                }
                if name.ends_with(".tmp") {
                    recovered_from_temp += 1;
                }
            }
            None => {
                // Lost before it reached the disk: count it and log in again.
                match ep.refresh_token_sent_at(valid) {
                    Some(sent) if sent > killed_at => lost_sent_after_kill += 1,
                    Some(sent) => lost_sent_before_kill.push(killed_at - sent),
                    None => panic!("kill {i}: the seeded token vanished from the disk"),
                }
                ep.revoke_user(USER);
                let fresh = ep.add_user(USER, "helpdesk-app", &[]);
                for (name, _) in &on_disk {
                    let _ = std::fs::remove_file(state.join(name));
                }
                RefreshTokenStore::new(&state)
                    .save("delegated", &Secret::new(fresh))
                    .await
                    .unwrap();
            }
        }
        last = ep.valid_refresh_tokens(USER);
    }
    lost_sent_before_kill.sort();
    let lost = lost_sent_after_kill + lost_sent_before_kill.len();
    eprintln!(
        "{KILLS} kills: {rotations_seen} rotations reached the disk ({recovered_from_temp} \
         times only a temp file, recovered by the next start); {lost} lost before reaching \
         the disk: {lost_sent_after_kill} sent by the endpoint after the kill, \
         {} built before it (on the wire or not yet read by the process; built this long \
         before the kill: {lost_sent_before_kill:?})",
        lost_sent_before_kill.len()
    );
    // No start ever presented a rotated-out token: every token that reached the disk was
    // used by the next start.
    let refused: Vec<_> = ep
        .requests()
        .into_iter()
        .filter(|r| r.grant == "refresh_token" && r.status != 200)
        .map(|r| r.status)
        .collect();
    assert!(
        refused.is_empty(),
        "rotated-out tokens presented: {refused:?}"
    );
    // The kills really landed around rotations: many saved ones, and not all.
    assert!(
        rotations_seen > KILLS / 10,
        "only {rotations_seen} rotations saved"
    );
    assert!(rotations_seen < KILLS, "every kill came after the save");

    // The next start continues with the token on disk.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args(["probe", "--mailbox", "m", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
