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
