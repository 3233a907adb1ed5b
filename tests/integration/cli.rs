//! The real binary: `probe` against the emulator prints a readable result and no secret,
//! with exit codes 0 (logged in), 1 (probe failed), 2 (bad usage or config); `check`.

use super::probe::{TOKEN, options, start};
use mail_oauth_exporter::emulator::{Behaviour, Proto, TlsKind};
use std::path::Path;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mail-oauth-exporter");

fn write_config(
    dir: &Path,
    emu: &mail_oauth_exporter::emulator::Emulator,
    token: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    emu.write_ca_pem(&dir.join("ca.pem")).unwrap();
    let config = format!(
        "tls:\n  ca_file: {dir}/ca.pem\n\
         credentials:\n  external:\n    grant: token_file\n    token_file: {dir}/token\n\
         mailboxes:\n\
         \x20 helpdesk:\n    address: helpdesk@contoso.com\n    credential: external\n    protocols: [imap, pop3, smtp]\n    timeout: 5s\n\
         \x20   imap: {{ host: 127.0.0.1, port: {imap}, tls: implicit }}\n\
         \x20   pop3: {{ host: 127.0.0.1, port: {pop3}, tls: starttls }}\n\
         \x20   smtp: {{ host: 127.0.0.1, port: {smtp}, tls: starttls }}\n\
         \x20 refused:\n    address: refused@contoso.com\n    credential: external\n    protocols: [smtp]\n    mechanism: oauthbearer\n\
         \x20   smtp: {{ host: 127.0.0.1, port: {smtp}, tls: starttls }}\n",
        dir = dir.display(),
        imap = emu.addr(Proto::Imap, TlsKind::Implicit).port(),
        pop3 = emu.addr(Proto::Pop3, TlsKind::Starttls).port(),
        smtp = emu.addr(Proto::Smtp, TlsKind::Starttls).port(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs the binary without blocking the runtime the emulator's tasks run on.
async fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .await
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn probe_prints_a_readable_result_and_no_secret() {
    let mut opts = options();
    opts.users
        .insert("refused@contoso.com".into(), Behaviour::TokenRefused);
    let (emu, _) = start(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    let config = config.to_str().unwrap();

    let (code, out, err) = run(&["probe", "--config", config, "--mailbox", "helpdesk"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("result     OK").count(), 3, "{out}");
    for needle in [
        "phases     resolve",
        "post_auth",
        "transcript",
        "C: A01 AUTHENTICATE XOAUTH2 <redacted>",
        "S: A01 OK AUTHENTICATE completed.",
        "TLS established",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // Neither the token nor any base64 SASL string of it.
    let b64 = |user: &str| {
        mail_oauth_exporter::probe::sasl::initial_response(
            mail_oauth_exporter::Mechanism::Xoauth2,
            user,
            &mail_oauth_exporter::Secret::new(TOKEN),
            "127.0.0.1",
            0,
        )
    };
    for text in [&out, &err] {
        assert!(!text.contains(TOKEN), "token leaked:\n{text}");
        assert!(
            !text.contains(b64("helpdesk@contoso.com").expose()),
            "base64 leaked:\n{text}"
        );
        // Any long base64 run starting like `user=` / `n,a=` would be a SASL blob.
        assert!(!text.contains("dXNlcj1"), "{text}");
        assert!(!text.contains("bixhPW"), "{text}");
    }

    let (code, out, _) = run(&[
        "probe",
        "--config",
        config,
        "--mailbox",
        "refused",
        "--protocol",
        "smtp",
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("result     FAILED: auth_rejected (stage auth, permanent)"),
        "{out}"
    );
    assert!(
        out.contains("detail     535 5.7.3 Authentication unsuccessful"),
        "{out}"
    );
    assert!(out.contains("fix        check the token's scope"), "{out}");
    assert!(!out.contains(TOKEN));

    let (code, _, err) = run(&["probe", "--config", config, "--mailbox", "nobody"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no mailbox `nobody`"), "{err}");
    let (code, _, err) = run(&[
        "probe",
        "--config",
        config,
        "--mailbox",
        "refused",
        "--protocol",
        "imap",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("does not probe imap"), "{err}");
}

#[tokio::test]
async fn a_missing_token_file_is_a_token_error_without_a_login() {
    let (emu, _) = start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let (code, out, _) = run(&[
        "probe",
        "--config",
        config.to_str().unwrap(),
        "--mailbox",
        "helpdesk",
        "--protocol",
        "imap",
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: token_error"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(
        emu.received(Proto::Imap).is_empty(),
        "no login may be attempted without a token"
    );
}

#[tokio::test]
async fn check_validates_files_and_reports_locations() {
    let (emu, _) = start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    let config_s = config.to_str().unwrap();
    let (code, out, err) = run(&["check", "--config", config_s]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok (1 credentials, 2 mailboxes, 4 probes)"),
        "{out}"
    );

    std::fs::remove_file(dir.path().join("token")).unwrap();
    let (code, _, err) = run(&["check", "--config", config_s]).await;
    assert_eq!(code, 2);
    assert!(err.contains("credential external: token_file"), "{err}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "mailboxes:\n  m:\n    address: a@b.c\n    credentail: x\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", bad.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "{}:4:5: mailboxes.m: unknown field `credentail`",
            bad.display()
        )),
        "{err}"
    );
}

/// `check` on every example under `config/`: with the files each names present (written
/// into a temp dir, the paths rewritten to point there) it passes; without them it fails
/// naming a missing file.
#[tokio::test]
async fn check_passes_on_every_example_in_config() {
    use mail_oauth_exporter::config::Config;
    use mail_oauth_exporter::token::{ClientAuth, Grant, SecretSource};
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut files: Vec<std::path::PathBuf> = config.ca_file.iter().cloned().collect();
        let mut env = Vec::new();
        // Files whose content `check` parses, beside those it only reads.
        let mut contents: Vec<(std::path::PathBuf, String)> = Vec::new();
        for c in config.credentials.values() {
            match &c.client_auth {
                ClientAuth::Secret(SecretSource::File(p)) => files.push(p.clone()),
                ClientAuth::Secret(SecretSource::Env(v)) => env.push(v.clone()),
                ClientAuth::Certificate {
                    certificate_file,
                    private_key_file,
                } => files.extend([certificate_file.clone(), private_key_file.clone()]),
                ClientAuth::AssertionFile(p) => {
                    files.push(p.clone());
                    contents.push((
                        p.clone(),
                        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n".into(),
                    ));
                }
                ClientAuth::None => {}
            }
            if let Grant::TokenFile { path } = &c.grant {
                files.push(path.clone());
            }
            // `check` parses a service account key: give it one in Google's shape.
            if let Grant::ServiceAccount { key_file } = &c.grant {
                files.push(key_file.clone());
                let key = std::fs::read_to_string(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/client-key.pem"),
                )
                .unwrap();
                let json = serde_json::json!({
                    "type": "service_account",
                    "client_email": "monitor@example.iam.gserviceaccount.com",
                    "private_key_id": "example",
                    "private_key": key,
                    "token_uri": "https://oauth2.googleapis.com/token",
                });
                contents.push((key_file.clone(), json.to_string()));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        // Longest first, so no path is rewritten inside a longer one.
        files.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        files.dedup();
        // Placeholders first: `/secrets/app` must not be rewritten inside `/secrets/app-cert.pem`.
        for (i, f) in files.iter().enumerate() {
            text = text.replace(f.to_str().unwrap(), &format!("@@FILE{i}@@"));
        }
        for (i, f) in files.iter().enumerate() {
            let here = dir.path().join(f.strip_prefix("/").unwrap_or(f));
            std::fs::create_dir_all(here.parent().unwrap()).unwrap();
            let content = contents
                .iter()
                .find(|(p, _)| p == f)
                .map_or("example-value\n", |(_, c)| c.as_str());
            std::fs::write(&here, content).unwrap();
            text = text.replace(&format!("@@FILE{i}@@"), here.to_str().unwrap());
        }
        let rewritten = dir.path().join(path.file_name().unwrap());
        std::fs::write(&rewritten, text).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();

        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&rewritten)
            .envs(env.iter().map(|v| (v.as_str(), "example-value")))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": ok ("), "{name}: {stdout}");

        if let Some(first) = files.first() {
            let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]).await;
            assert_eq!(code, 2, "{name} passed without its files");
            let named = files.iter().any(|f| err.contains(f.to_str().unwrap()));
            assert!(
                named,
                "{name}: no missing file named (e.g. {}): {err}",
                first.display()
            );
        }
        checked.push(name);
    }
    checked.sort();
    for want in [
        "demo.yaml",
        "generic.yaml",
        "google.yaml",
        "microsoft-client-credentials.yaml",
        "microsoft-delegated.yaml",
        "token-file.yaml",
    ] {
        assert!(
            checked.iter().any(|c| c == want),
            "no example {want}: {checked:?}"
        );
    }
}
