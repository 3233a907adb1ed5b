//! OAuth end to end through the real binary: the emulated token endpoint issues tokens,
//! the emulated mail servers accept only those, and `login`, rotation, revocation and
//! app permissions show as the contract's reasons. No secret reaches any output.

use mail_oauth_exporter::emulator::token_endpoint::{
    ClientSpec, DevicePoll, EmuGrant, TokenEndpoint,
};
use mail_oauth_exporter::emulator::{Emulator, EmulatorOptions, Proto, TlsKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::process::Command;

const USER: &str = "helpdesk@contoso.com";
const SECRET: &str = "app-secret-value-Zx9~q";

struct World {
    ep: Arc<TokenEndpoint>,
    emu: Emulator,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Every stdout and stderr the binary printed, to be scanned for secrets.
    outputs: Vec<String>,
}

impl World {
    async fn new() -> World {
        let ep = Arc::new(TokenEndpoint::start().await.unwrap());
        ep.add_client(ClientSpec {
            id: "helpdesk-app".into(),
            grants: vec![EmuGrant::RefreshToken, EmuGrant::DeviceCode],
            ..Default::default()
        });
        ep.add_client(ClientSpec {
            id: "contoso-app".into(),
            secret: Some(SECRET.into()),
            grants: vec![EmuGrant::ClientCredentials],
            mailboxes: vec![USER.into()],
            ..Default::default()
        });
        let emu = Emulator::start(EmulatorOptions::new(ep.clone()))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        emu.write_ca_pem(&d.join("ca.pem")).unwrap();
        std::fs::write(d.join("secret"), format!("{SECRET}\n")).unwrap();
        let imap = emu.addr(Proto::Imap, TlsKind::Implicit).port();
        let pop3 = emu.addr(Proto::Pop3, TlsKind::Implicit).port();
        let smtp = emu.addr(Proto::Smtp, TlsKind::Starttls).port();
        let server = |p: &str| {
            let port = match p {
                "imap" => imap,
                "pop3" => pop3,
                _ => smtp,
            };
            format!("    {p}: {{ host: 127.0.0.1, port: {port} }}\n")
        };
        let config = format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             credentials:\n\
             \x20 delegated:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: helpdesk-app\n    grant: refresh_token\n\
             \x20 app:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: contoso-app\n    grant: client_credentials\n    client_secret_file: {d}/secret\n\
             mailboxes:\n\
             \x20 user:\n    address: {USER}\n    credential: delegated\n    protocols: [imap, smtp]\n{imap_s}{smtp_s}\
             \x20 app-ok:\n    address: {USER}\n    credential: app\n    protocols: [pop3]\n{pop3_s}\
             \x20 app-no-permission:\n    address: ceo@contoso.com\n    credential: app\n    protocols: [imap]\n{imap_s}",
            d = d.display(),
            auth = ep.authority(),
            imap_s = server("imap"),
            pop3_s = server("pop3"),
            smtp_s = server("smtp"),
        );
        let path = d.join("config.yaml");
        std::fs::write(&path, config).unwrap();
        World {
            ep,
            emu,
            dir,
            config: path,
            outputs: Vec::new(),
        }
    }

    async fn run(&mut self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.outputs.push(format!("{stdout}{stderr}"));
        (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
    }

    /// Like `run`, with stdout alone (the logs go to stderr).
    async fn run_stdout(&mut self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.outputs.push(format!("{stdout}{stderr}"));
        (out.status.code().unwrap_or(-1), stdout)
    }

    async fn probe(&mut self, mailbox: &str) -> (i32, String) {
        self.run(&["probe", "--mailbox", mailbox]).await
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

fn read_dir_text(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn login_rotation_revocation_and_app_permissions_end_to_end() {
    let mut w = World::new().await;

    // Before login there is no refresh token, and no login is attempted.
    let (code, out) = w.probe("user").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: token_missing"), "{out}");
    assert!(w.emu.received(Proto::Imap).is_empty());

    // Device code login: the URL and code are printed, the refresh token lands on disk.
    w.ep.set_device_interval(1);
    w.ep.script_device(vec![DevicePoll::Pending, DevicePoll::Approve(USER.into())]);
    let (code, out) = w.run(&["login", "--credential", "delegated"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("To sign in, open http://127.0.0.1:"), "{out}");
    assert!(out.contains("enter the code"), "{out}");
    let stored = read_dir_text(&w.state_file());
    assert!(!stored.trim().is_empty(), "no refresh token stored");

    // Each run refreshes once and saves the rotated token, which the next run uses.
    for round in 0..3 {
        let (code, out) = w.probe("user").await;
        assert_eq!(code, 0, "round {round}: {out}");
        assert_eq!(out.matches("result     OK").count(), 2, "{out}");
        let now = read_dir_text(&w.state_file());
        let valid = w.ep.valid_refresh_tokens(USER);
        assert!(
            valid.iter().any(|t| now.contains(t.as_str())),
            "the stored token is the live one"
        );
    }
    // The emulator refuses reuse of rotated tokens; we never tried (no 400 on refresh).
    assert!(
        w.ep.requests()
            .iter()
            .filter(|r| r.grant == "refresh_token")
            .all(|r| r.status == 200),
        "{:?}",
        w.ep.requests()
            .iter()
            .map(|r| (&r.grant, r.status))
            .collect::<Vec<_>>()
    );

    // Client credentials: the app may open the mailbox it was granted, not another one.
    let (code, out) = w.probe("app-ok").await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = w.probe("app-no-permission").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: auth_rejected"), "{out}");

    // A wrong secret is a token failure, and no login happens.
    std::fs::write(w.dir.path().join("secret"), "not-the-secret").unwrap();
    w.emu.clear_received();
    let (code, out) = w.probe("app-ok").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: token_invalid_client"), "{out}");
    assert!(out.contains("AADSTS7000215"), "{out}");
    assert!(w.emu.received(Proto::Pop3).is_empty());

    // Revoked grant: token_invalid_grant with Microsoft's code, and no login attempted.
    w.ep.revoke_user(USER);
    w.emu.clear_received();
    let (code, out) = w.probe("user").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: token_invalid_grant"), "{out}");
    assert!(out.contains("50173"), "{out}");
    assert!(
        out.contains("fix        the refresh token expired or was revoked: run `login` again"),
        "{out}"
    );
    assert!(w.emu.received(Proto::Imap).is_empty());

    // Migrating from another tool: import a refresh token obtained elsewhere.
    let rt = w.ep.add_user(USER, "helpdesk-app", &[]);
    let rt_file = w.dir.path().join("imported");
    std::fs::write(&rt_file, &rt).unwrap();
    let (code, out) = w
        .run(&[
            "login",
            "--credential",
            "delegated",
            "--refresh-token-file",
            rt_file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = w.probe("user").await;
    assert_eq!(code, 0, "{out}");

    // Nothing secret in anything the binary printed.
    let printed = w.outputs.join("\n");
    let mut secrets = w.ep.all_refresh_tokens();
    secrets.extend(w.ep.all_access_tokens());
    secrets.push(SECRET.into());
    assert!(secrets.len() > 5);
    for s in &secrets {
        assert!(
            !printed.contains(s.as_str()),
            "secret {s} printed:\n{printed}"
        );
    }
}

#[tokio::test]
async fn login_for_an_unknown_or_app_credential_is_a_usage_error() {
    let mut w = World::new().await;
    let (code, out) = w.run(&["login", "--credential", "nope"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no credential `nope`"), "{out}");
    let (code, out) = w.run(&["login", "--credential", "app"]).await;
    assert_eq!(code, 2, "{out}");
}

/// `login --refresh-token-file` through the binary: `fake-refresh` fails at once (exit 1,
/// the endpoint's reason, nothing stored); a real token is redeemed once and the rotated
/// token is what lands on disk.
#[tokio::test]
async fn login_import_redeems_once_and_refuses_a_fake_token() {
    let mut w = World::new().await;
    let fake = w.dir.path().join("fake");
    std::fs::write(&fake, "fake-refresh\n").unwrap();
    let fake = fake.to_str().unwrap().to_owned();
    let (code, out) = w
        .run(&[
            "login",
            "--credential",
            "delegated",
            "--refresh-token-file",
            &fake,
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("login      FAILED: token_invalid_grant (stage token, permanent)"),
        "{out}"
    );
    assert!(out.contains("reason     token_invalid_grant"), "{out}");
    assert!(out.contains("nothing stored"), "{out}");
    assert!(!out.contains("stored in"), "{out}");
    assert!(read_dir_text(&w.state_file()).trim().is_empty());

    let rt = w.ep.add_user(USER, "helpdesk-app", &[]);
    let file = w.dir.path().join("imported");
    std::fs::write(&file, &rt).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let (code, out) = w
        .run(&[
            "login",
            "--credential",
            "delegated",
            "--refresh-token-file",
            &file,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("redeemed"), "{out}");
    let stored = read_dir_text(&w.state_file());
    assert!(!stored.contains(&rt), "the imported token was stored as is");
    assert_eq!(
        w.ep.valid_refresh_tokens(USER),
        vec![stored.trim().to_string()]
    );
    assert_eq!(
        w.ep.requests()
            .iter()
            .filter(|r| r.grant == "refresh_token")
            .count(),
        2
    );
    let printed = w.outputs.join("\n");
    for s in w.ep.all_refresh_tokens() {
        assert!(!printed.contains(&s), "refresh token printed");
    }
}

/// `probe --output json` through the binary: one object per protocol with the documented
/// fields, for a success, a refused login and a token failure; and the text output names
/// the reason on success too.
#[tokio::test]
async fn probe_json_output_carries_the_documented_fields() {
    let mut w = World::new().await;
    let rt = w.ep.add_user(USER, "helpdesk-app", &[]);
    let file = w.dir.path().join("imported");
    std::fs::write(&file, &rt).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let (code, out) = w
        .run(&[
            "login",
            "--credential",
            "delegated",
            "--refresh-token-file",
            &file,
        ])
        .await;
    assert_eq!(code, 0, "{out}");

    let (code, out) = w.probe("user").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("reason     ok").count(), 2, "{out}");

    let (code, out) = w
        .run_stdout(&["probe", "--mailbox", "user", "--output", "json"])
        .await;
    assert_eq!(code, 0, "{out}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).expect(&out);
    assert_eq!(all.len(), 2, "{out}");
    let protocols: Vec<&str> = all
        .iter()
        .map(|o| o["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["imap", "smtp"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for o in &all {
        assert_eq!(o["mailbox"], "user");
        assert_eq!(o["credential"], "delegated");
        assert!(o["target"].as_str().unwrap().contains("127.0.0.1:"), "{o}");
        assert_eq!(o["reason"], "ok");
        assert_eq!(o["success"], true);
        assert!(o["stage"].is_null());
        assert_eq!(o["transient"], false);
        assert_eq!(o["detail"], "");
        assert_eq!(o["user"], USER);
        assert_eq!(o["mechanism"], "xoauth2");
        let phases = o["phases"].as_object().unwrap();
        assert_eq!(phases.len(), 7);
        for p in [
            "connect",
            "tls",
            "greeting",
            "capability",
            "auth",
            "post_auth",
        ] {
            assert!(phases[p].as_f64().unwrap() >= 0.0, "{p}: {o}");
        }
        let duration = o["duration_seconds"].as_f64().unwrap();
        assert!(duration > 0.0 && duration <= o["total_seconds"].as_f64().unwrap());
        let expiry = o["tls_certificate_expiry_timestamp_seconds"]
            .as_i64()
            .unwrap();
        assert!(expiry > now && expiry <= w.emu.cert_not_after(), "{o}");
        assert!(o["tls_certificate_expiry"].as_str().unwrap().ends_with('Z'));
        assert!(o["tls_version"].as_str().unwrap().starts_with("TLS"));
        let transcript = o["transcript"].as_array().unwrap();
        assert!(transcript.len() > 3, "{o}");
        assert!(
            transcript
                .iter()
                .any(|l| l.as_str().unwrap().contains("<redacted>"))
        );
    }

    // A refused login: auth stage, the server's words, exit 1.
    let (code, out) = w
        .run_stdout(&[
            "probe",
            "--mailbox",
            "app-no-permission",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).expect(&out);
    assert_eq!(all.len(), 1);
    let o = &all[0];
    assert_eq!(o["reason"], "auth_rejected", "{o}");
    assert_eq!(o["stage"], "auth");
    assert_eq!(o["success"], false);
    assert!(
        o["detail"]
            .as_str()
            .unwrap()
            .contains("AUTHENTICATE failed"),
        "{o}"
    );
    assert!(o["phases"]["post_auth"].is_null());

    // A token failure: no login was tried, so no phases, duration or TLS.
    w.ep.revoke_user(USER);
    let (code, out) = w
        .run_stdout(&[
            "probe",
            "--mailbox",
            "user",
            "--protocol",
            "imap",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).expect(&out);
    let o = &all[0];
    assert_eq!(o["reason"], "token_invalid_grant", "{o}");
    assert_eq!(o["stage"], "token");
    assert!(o["detail"].as_str().unwrap().contains("AADSTS50173"), "{o}");
    assert!(
        o["phases"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v.is_null())
    );
    assert!(o["duration_seconds"].is_null() && o["tls_certificate_expiry"].is_null());

    // Bad usage is still exit 2.
    let (code, out) = w
        .run(&["probe", "--mailbox", "user", "--output", "yaml"])
        .await;
    assert_eq!(code, 2, "{out}");
    let printed = w.outputs.join("\n");
    for s in
        w.ep.all_refresh_tokens()
            .iter()
            .chain(&w.ep.all_access_tokens())
    {
        assert!(!printed.contains(s.as_str()), "a token printed");
    }
}
