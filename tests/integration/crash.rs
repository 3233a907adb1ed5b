//! Crash safety of the running exporter: `run` is killed with SIGKILL 1,000 times at
//! random moments around its refresh-token rotation (every start refreshes at once). After
//! every kill the state file is whole, holds a refresh token the endpoint issued and
//! honours, and never goes back to an older one; afterwards `probe` logs in with it.
//!
//! The endpoint keeps used refresh tokens valid, as Entra ID does. With single-use
//! rotation (the emulator's default) no client can survive a kill between the provider's
//! reply and the disk write: the new token exists only in the dead process. A first run of
//! this test against single-use rotation hit that window once in 28 kills.

use mail_oauth_exporter::emulator::token_endpoint::{ClientSpec, EmuGrant, TokenEndpoint};
use mail_oauth_exporter::emulator::{Emulator, EmulatorOptions, Proto, TlsKind};
use mail_oauth_exporter::secret::Secret;
use mail_oauth_exporter::token::RefreshTokenStore;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

const USER: &str = "helpdesk@contoso.com";
const KILLS: usize = 1000;

#[tokio::test]
async fn kill_9_during_rotation_never_loses_the_refresh_token() {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    ep.allow_refresh_token_reuse(true);
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
    let store = RefreshTokenStore::new(d.join("state"));
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
    let last_saved = std::fs::read_to_string(&state_file)
        .unwrap()
        .trim()
        .to_string();

    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rotations_seen = 0;
    let mut seen = std::collections::HashSet::from([first, last_saved.clone()]);
    let mut last = last_saved;
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
        child.start_kill().unwrap(); // SIGKILL
        let _ = child.wait().await;

        let on_disk = std::fs::read_to_string(&state_file)
            .unwrap_or_else(|e| panic!("kill {i}: state file unreadable: {e}"));
        let token = on_disk.trim();
        assert!(!token.is_empty(), "kill {i}: empty state file");
        assert!(
            ep.valid_refresh_tokens(USER).iter().any(|t| t == token),
            "kill {i}: the state file holds a token the endpoint does not honour ({} bytes)",
            token.len()
        );
        assert!(
            ep.all_refresh_tokens().iter().any(|t| t == token),
            "kill {i}: not a whole token the endpoint issued"
        );
        if token != last {
            assert!(
                seen.insert(token.to_string()),
                "kill {i}: went back to an older token"
            );
            rotations_seen += 1;
            last = token.to_string();
        }
    }
    // The kills really landed around rotations: many saved ones, and not all.
    assert!(
        rotations_seen > KILLS / 10,
        "only {rotations_seen} rotations saved"
    );
    assert!(rotations_seen < KILLS, "every kill came after the save");
    eprintln!("{KILLS} kills, {rotations_seen} rotations saved in between");

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
