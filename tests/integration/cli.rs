//! The real binary: `probe` against the emulator prints a readable result and no secret,
//! with exit codes 0 (logged in), 1 (probe failed), 2 (bad usage or config); `check`; the
//! Prometheus exporter flags (`--config.file`, `--config.check`, `--web.*`, `--log.*`), their
//! 0.1 aliases, `--version` and the help texts.

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
    assert!(
        err.contains("credential external: token_file: token file"),
        "{err}"
    );

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
/// naming a missing file, and `check --syntax-only` passes on the example as shipped.
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
        // `check` parses what it reads: PEM files get real certificates and keys.
        let fixture = |name: &str| {
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures")
                    .join(name),
            )
            .unwrap()
        };
        let mut contents: std::collections::HashMap<std::path::PathBuf, String> =
            Default::default();
        let mut files: Vec<std::path::PathBuf> = config.ca_file.iter().cloned().collect();
        if let Some(ca) = &config.ca_file {
            contents.insert(ca.clone(), fixture("client-cert.pem"));
        }
        let mut env = Vec::new();
        for c in config.credentials.values() {
            match &c.client_auth {
                ClientAuth::Secret(SecretSource::File(p)) => files.push(p.clone()),
                ClientAuth::Secret(SecretSource::Env(v)) => env.push(v.clone()),
                ClientAuth::Certificate {
                    certificate_file,
                    private_key_file,
                } => {
                    contents.insert(certificate_file.clone(), fixture("client-cert.pem"));
                    contents.insert(private_key_file.clone(), fixture("client-key.pem"));
                    files.extend([certificate_file.clone(), private_key_file.clone()]);
                }
                ClientAuth::AssertionFile(p) => {
                    files.push(p.clone());
                    contents.insert(
                        p.clone(),
                        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n".into(),
                    );
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
                contents.insert(key_file.clone(), json.to_string());
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
            let content = contents.get(f).map_or("example-value\n", String::as_str);
            std::fs::write(&here, content).unwrap();
            text = text.replace(&format!("@@FILE{i}@@"), here.to_str().unwrap());
        }
        // Refresh tokens are kept in `state_dir`, which `check` wants writable: here, a
        // directory of the test's own.
        let state = dir.path().join("state");
        text = text.replace(
            &format!("state_dir: {}", config.state_dir.display()),
            &format!("state_dir: {}", state.display()),
        );
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

        // Issue 14: the shipped example as it is (placeholder paths, no variables set)
        // passes `check --syntax-only`.
        let (code, out, err) =
            run(&["check", "--syntax-only", "--config", path.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{name} --syntax-only: {out}{err}");
        assert!(
            out.contains(": syntax ok, named files not checked ("),
            "{name}: {out}"
        );

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

/// Issue 14: `check --syntax-only` opens no file the config names and does not try
/// `state_dir` (a FIFO secret, `/dev/zero` as the CA file and a regular file as `state_dir`
/// all pass, where the full check refuses them), yet refuses what is wrong in the config
/// itself, naming file, line and field.
#[tokio::test]
async fn check_syntax_only_reads_no_named_file_but_validates_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let not_a_dir = d.join("state-is-a-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let config = file_config(d, &fifo, Some(Path::new("/dev/zero")), &not_a_dir);
    let syntax = |config: std::path::PathBuf| async move {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            run(&[
                "check",
                "--syntax-only",
                "--config",
                config.to_str().unwrap(),
            ]),
        )
        .await
        .unwrap_or_else(|_| panic!("check --syntax-only hung on {}", config.display()))
    };
    let (code, out, err) = syntax(config.clone()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("syntax ok, named files not checked (2 credentials, 2 mailboxes, 2 probes)"),
        "{out}"
    );
    // The default is the full check, which refuses the same config for its files.
    let (code, out) = check(&config).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(fifo.to_str().unwrap()), "{out}");
    assert!(out.contains("/dev/zero"), "{out}");
    assert!(out.contains(not_a_dir.to_str().unwrap()), "{out}");

    // Config errors are still found: a bad URL, an interval out of range, an unknown key.
    let text = std::fs::read_to_string(&config).unwrap();
    for (from, to, field) in [
        (
            "authority: http://127.0.0.1:9\n    client_id: c1\n    grant: client_credentials",
            "authority: http://example.com\n    client_id: c1\n    grant: client_credentials",
            "authority",
        ),
        ("interval: 10m", "interval: 1s", "interval"),
        (
            "protocols: [imap]\n    interval",
            "protocols: [imap]\n    colour: blue\n    interval",
            "colour",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let bad = d.join(format!("bad-{field}.yaml"));
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let (code, out, err) = syntax(bad.clone()).await;
        assert_eq!(code, 2, "{field}: {out}{err}");
        assert!(err.contains(bad.to_str().unwrap()), "{field}: {err}");
        assert!(err.contains(field), "{field}: {err}");
    }
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// A client-credentials config on a secret file (and optionally a CA file, a certificate
/// pair, a token-file credential and a delegated one keeping refresh tokens in `state`);
/// nothing in it is contacted by `check`.
fn file_config(dir: &Path, secret: &Path, ca: Option<&Path>, state: &Path) -> std::path::PathBuf {
    let ca = ca.map_or(String::new(), |c| {
        format!("tls:\n  ca_file: {}\n", c.display())
    });
    let text = format!(
        "state_dir: {state}\n{ca}\
         credentials:\n  app:\n    provider: microsoft\n    tenant: contoso\n    authority: http://127.0.0.1:9\n    client_id: c1\n    grant: client_credentials\n    client_secret_file: {secret}\n\
         \x20 user:\n    provider: microsoft\n    tenant: contoso\n    authority: http://127.0.0.1:9\n    client_id: c1\n    grant: refresh_token\n\
         mailboxes:\n  m:\n    address: m@contoso.com\n    credential: app\n    protocols: [imap]\n    interval: 10m\n    imap: {{ host: 127.0.0.1, port: 9 }}\n\
         \x20 u:\n    address: u@contoso.com\n    credential: user\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: 9 }}\n",
        state = state.display(),
        secret = secret.display(),
    );
    // One file per call: a test builds several before checking them.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("config-{n}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `check`; a hang is a failure, reported as such rather than waited out.
async fn check(config: &Path) -> (i32, String) {
    let (code, out, err) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        run(&["check", "--config", config.to_str().unwrap()]),
    )
    .await
    .unwrap_or_else(|_| panic!("check hung on {}", config.display()));
    (code, format!("{out}{err}"))
}

/// Issue 16: a FIFO as a secret or CA file hung `check`; `/dev/zero` as a CA file aborted
/// the process and as a secret was read until memory ran out; a 10 MB secret was sent as
/// is. Each is refused, naming the file and what is wrong with it.
#[tokio::test]
async fn check_refuses_fifos_devices_huge_and_unparsable_files_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let good_secret = d.join("secret");
    std::fs::write(&good_secret, "s3cr3t\n").unwrap();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let huge = d.join("huge");
    std::fs::write(&huge, vec![b'x'; 10 * 1024 * 1024]).unwrap();
    let empty = d.join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let not_pem = d.join("not.pem");
    std::fs::write(
        &not_pem,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let a_file = d.join("a-file");
    std::fs::write(&a_file, "x").unwrap();
    let ca = d.join("ca.pem");
    std::fs::write(
        &ca,
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/client-cert.pem"))
            .unwrap(),
    )
    .unwrap();

    // The same config with good files passes: each failure below is the file's fault.
    let (code, out) = check(&file_config(d, &good_secret, Some(&ca), &state)).await;
    assert_eq!(code, 0, "{out}");

    let zero = Path::new("/dev/zero");
    let cases: Vec<(std::path::PathBuf, String)> = vec![
        (
            file_config(d, &fifo, None, &state),
            format!(
                "client secret file {}: a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (
            file_config(d, zero, None, &state),
            "client secret file /dev/zero: a character device, not a regular file".into(),
        ),
        (
            file_config(d, &huge, None, &state),
            format!(
                "client secret file {}: larger than 64 KiB, the limit for a secret file",
                huge.display()
            ),
        ),
        (
            file_config(d, &empty, None, &state),
            format!("client secret file {}: the file is empty", empty.display()),
        ),
        (
            file_config(d, d, None, &state),
            format!(
                "client secret file {}: a directory, not a regular file",
                d.display()
            ),
        ),
        (
            file_config(d, &good_secret, Some(&fifo), &state),
            format!(
                "tls.ca_file: {} is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (
            file_config(d, &good_secret, Some(zero), &state),
            "tls.ca_file: /dev/zero is a character device, not a regular file".into(),
        ),
        (
            file_config(d, &good_secret, Some(&not_pem), &state),
            format!("tls.ca_file: {}", not_pem.display()),
        ),
        (
            file_config(d, &good_secret, Some(&huge), &state),
            format!(
                "tls.ca_file: {} is larger than 1024 KiB, the limit for a PEM file",
                huge.display()
            ),
        ),
        (
            file_config(d, &good_secret, None, &a_file),
            format!(
                "state_dir {}: {} is not a directory",
                a_file.display(),
                a_file.display()
            ),
        ),
    ];
    for (config, want) in cases {
        let (code, out) = check(&config).await;
        assert_eq!(code, 2, "{want}: {out}");
        assert!(out.contains(&want), "want {want:?} in:\n{out}");
        // The error names the file, never its content.
        assert!(!out.contains("s3cr3t") && !out.contains("xxxx"), "{out}");
    }
}

/// Issue 16: a 0-byte config, or one of comments only, was a valid config that
/// probes nothing.
#[tokio::test]
async fn an_empty_config_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for text in ["", "# only a comment\n\n"] {
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, text).unwrap();
        let (code, out) = check(&config).await;
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&format!("{}:1:1: the config is empty", config.display())),
            "{out}"
        );
        let (code, _, err) = run(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("the config is empty"), "{err}");
    }
}

/// Issue 16: with a FIFO as `client_secret_file`, `run` bound its port and never served,
/// a reload hung and SIGTERM was then ignored. Now it serves, reloads (a reload to an
/// empty config is refused, reported, and the old config keeps running) and stops on
/// SIGTERM.
#[tokio::test]
async fn run_with_a_fifo_secret_serves_reloads_and_stops_on_sigterm() {
    use super::demo::{find, http, parse_metrics, spawn_run};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let config = file_config(d, &fifo, None, &d.join("state"));
    let (mut child, base, logs) = spawn_run(&config).await;

    let (status, _) = http("GET", &format!("{base}/healthz")).await;
    assert_eq!(status, 200);
    let (status, body) = http("POST", &format!("{base}/-/reload")).await;
    assert_eq!(status, 200, "{body}");

    std::fs::write(&config, "# emptied by mistake\n").unwrap();
    let (status, body) = http("POST", &format!("{base}/-/reload")).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("the config is empty"), "{body}");
    let (_, metrics) = http("GET", &format!("{base}/metrics")).await;
    let m = parse_metrics(&metrics);
    let ok = find(&m, "mail_oauth_config_last_reload_successful", &[]);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].value, 0.0, "{metrics}");
    let (_, status_json) = http("GET", &format!("{base}/api/v1/status")).await;
    assert!(
        status_json.contains("\"m\""),
        "old config dropped: {status_json}"
    );

    let pid = child.id().expect("still running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("SIGTERM ignored")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let logs = logs.await.unwrap();
    assert!(logs.contains("stopped"), "{logs}");
}

/// The config file itself goes through the same reader: a FIFO or a device is refused
/// at once, by name.
#[tokio::test]
async fn the_config_file_itself_cannot_be_a_fifo_or_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.yaml");
    mkfifo(&fifo);
    let (code, out) = check(&fifo).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "{}: a FIFO (named pipe), not a regular file",
            fifo.display()
        )),
        "{out}"
    );
    let (code, out) = check(Path::new("/dev/zero")).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("/dev/zero: a character device, not a regular file"),
        "{out}"
    );
}

/// A FIFO as the CA file stops `run` at start with the file named (it bound its port
/// and never served), and a FIFO as a token file fails `probe` at once with the reason
/// and the file named, instead of waiting for a writer.
#[tokio::test]
async fn run_and_probe_refuse_fifos_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let secret = d.join("secret");
    std::fs::write(&secret, "s3cr3t\n").unwrap();
    let config = file_config(d, &secret, Some(&fifo), &d.join("state"));
    let (code, _, err) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        run(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ]),
    )
    .await
    .expect("run hung on a FIFO CA file");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}", fifo.display())) && err.contains("a FIFO (named pipe)"),
        "{err}"
    );

    let config = d.join("token-file.yaml");
    std::fs::write(
        &config,
        format!(
            "credentials:\n  t:\n    grant: token_file\n    token_file: {}\n\
             mailboxes:\n  m:\n    address: m@contoso.com\n    credential: t\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: 9 }}\n",
            fifo.display()
        ),
    )
    .unwrap();
    let (code, out, err) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        run(&[
            "probe",
            "--config",
            config.to_str().unwrap(),
            "--mailbox",
            "m",
        ]),
    )
    .await
    .expect("probe hung on a FIFO token file");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "token file {}: a FIFO (named pipe), not a regular file",
            fifo.display()
        )),
        "{out}"
    );
}

/// The service started by the real binary; its stderr lines (JSON logs) and base URL.
async fn start_service(
    args: &[&str],
    env: &[(&str, &str)],
) -> (tokio::process::Child, serde_json::Value) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let start = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if v["fields"]["message"] == "mail-oauth-exporter running" {
                return v["fields"].clone();
            }
        }
        panic!("exited before it started: {seen:#?}");
    })
    .await
    .expect("the start-up line within 30 s");
    // Keep reading so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, start)
}

/// As Prometheus exporters are run: no command, dotted flags. The start-up line names
/// version and revision; the metrics move to --web.telemetry-path; --log.level wins over
/// RUST_LOG (which alone would hide that info line).
#[tokio::test]
async fn exporter_flags_run_the_service_without_a_command() {
    let (emu, _) = start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    let (mut child, start) = start_service(
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.telemetry-path",
            "/probe-metrics",
            "--log.format",
            "json",
            "--log.level",
            "info",
        ],
        &[("RUST_LOG", "error")],
    )
    .await;
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert_eq!(start["revision"], mail_oauth_exporter::REVISION, "{start}");
    assert_eq!(start["metrics"], "/probe-metrics", "{start}");
    let base = format!("http://{}", start["address"].as_str().unwrap());
    let (code, body) = crate::demo::get(&format!("{base}/probe-metrics")).await;
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!(
            "mail_oauth_build_info{{revision=\"{}\",version=\"{}\"}} 1",
            mail_oauth_exporter::REVISION,
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    let (code, _) = crate::demo::get(&format!("{base}/metrics")).await;
    assert_eq!(code, 404, "the metrics moved");
    let (code, _) = crate::demo::get(&format!("{base}/healthz")).await;
    assert_eq!(code, 200);
    child.kill().await.unwrap();
}

/// The 0.1 spellings still work, at the top level and after `run`; `:PORT` listens on
/// every interface as in Go exporters.
#[tokio::test]
async fn the_old_spellings_remain_aliases() {
    let (emu, _) = start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    let config = config.to_str().unwrap();
    for args in [
        vec!["--log-format", "json", "--config", config, "--listen", ":0"],
        vec![
            "--log-format",
            "json",
            "run",
            "--config",
            config,
            "--listen",
            ":0",
        ],
    ] {
        let (mut child, start) = start_service(&args, &[]).await;
        let address = start["address"].as_str().unwrap();
        let port = address
            .strip_prefix("0.0.0.0:")
            .unwrap_or_else(|| panic!("{args:?}: {address} is not every interface"));
        let (code, body) = crate::demo::get(&format!("http://127.0.0.1:{port}/metrics")).await;
        assert_eq!(code, 200, "{args:?}");
        assert!(body.contains("mail_oauth_build_info"), "{args:?}");
        child.kill().await.unwrap();
    }
}

/// `--config.check`: exit 0 for a sound config, 2 with file, line, column and field for a
/// bad one, 2 naming a missing secret file; after `run` as well. Nothing starts.
#[tokio::test]
async fn config_check_validates_and_exits() {
    let (emu, _) = start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &emu, TOKEN);
    let config = config.to_str().unwrap();
    for prefix in [vec![], vec!["run"]] {
        let with = |rest: &[&'static str]| {
            let mut a: Vec<String> = prefix.iter().map(|s: &&str| s.to_string()).collect();
            a.extend(rest.iter().map(|s| s.to_string()));
            a
        };
        let mut args = with(&["--config.check", "--config.file"]);
        args.push(config.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run(&args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(
            out.contains(": ok (1 credentials, 2 mailboxes, 4 probes)"),
            "{out}"
        );
    }
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "mailboxes:\n  m:\n    adress: a@b.c\n").unwrap();
    let (code, _, err) = run(&["--config.file", bad.to_str().unwrap(), "--config.check"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "{}:3:5: mailboxes.m: unknown field `adress`",
            bad.display()
        )),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let (code, _, err) = run(&["--config.file", config, "--config.check"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("credential external: token_file"), "{err}");
    // Usage errors are 2 too, and say what is wrong.
    let (code, _, err) = run(&["--config.file", config, "check", "--config", config]).await;
    assert_eq!(code, 2);
    assert!(err.contains("not before a command"), "{err}");
    let (code, _, err) = run(&[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--config.file <FILE>"), "{err}");
    for path in ["metrics", "/healthz", "/a?b"] {
        let (code, _, err) = run(&["--config.file", config, "--web.telemetry-path", path]).await;
        assert_eq!(code, 2, "{path}");
        assert!(err.contains("--web.telemetry-path"), "{err}");
    }
}

/// `--version` as Prometheus prints it: version and revision, build date, compiler,
/// platform.
#[tokio::test]
async fn version_names_revision_build_date_and_compiler() {
    let (code, out, _) = run(&["--version"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "mail-oauth-exporter {} (revision: {})",
            env!("CARGO_PKG_VERSION"),
            mail_oauth_exporter::REVISION
        )
    );
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"))
    };
    let date = field("build date:");
    let shape = date.len() == 17
        && date.char_indices().all(|(i, c)| match i {
            8 => c == '-',
            11 | 14 => c == ':',
            _ => c.is_ascii_digit(),
        });
    assert!(shape, "build date {date:?} is not YYYYMMDD-HH:MM:SS");
    assert!(field("rustc version:").starts_with("rustc 1."), "{out}");
    assert!(field("platform:").contains(std::env::consts::ARCH), "{out}");
}

/// Every flag of every command says what it does in `--help`.
#[tokio::test]
async fn every_flag_has_a_help_text() {
    let commands: [&[&str]; 6] = [&[], &["run"], &["check"], &["login"], &["probe"], &["demo"]];
    let mut flags = 0;
    for command in commands {
        let mut args = command.to_vec();
        args.push("-h");
        let (code, out, err) = run(&args).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        for line in out.lines().map(str::trim).filter(|l| l.starts_with('-')) {
            flags += 1;
            // `--flag <VALUE>   What it does`: the help text follows two or more spaces.
            let help = line.split_once("  ").map(|(_, h)| h.trim()).unwrap_or("");
            assert!(help.len() > 3, "{args:?}: no help for `{line}`");
        }
    }
    for flag in [
        "--config.file",
        "--config.check",
        "--web.listen-address",
        "--web.telemetry-path",
        "--log.level",
        "--log.format",
    ] {
        let (_, out, _) = run(&["-h"]).await;
        assert!(out.contains(flag), "{flag} missing from --help");
    }
    assert!(flags > 20, "{flags} flags seen");
}

/// Issue 14: a failed token request logged two WARN lines of ~400 characters (the token
/// service's and the probe's), and the one-shot `probe` printed a backoff ("retry_in") it
/// never waits out. Now: the real binary, `run` with JSON logs against the emulator and a
/// credential whose secret the token endpoint refuses, logs one WARN line per failed
/// token request, its detail trimmed, the full detail at DEBUG; `probe` on the same
/// mailbox prints the failure and no backoff or retry line.
#[tokio::test]
async fn a_failed_token_request_logs_one_short_warn_line_and_probe_no_backoff() {
    use mail_oauth_exporter::emulator::EmulatorOptions;
    use mail_oauth_exporter::emulator::token_endpoint::{ClientSpec, EmuGrant, TokenEndpoint};
    use mail_oauth_exporter::token::error::{LOG_DETAIL_MAX, bounded};
    use tokio::io::{AsyncBufReadExt, BufReader};
    const USER: &str = "helpdesk@contoso.com";
    let ep = std::sync::Arc::new(TokenEndpoint::start().await.unwrap());
    ep.add_client(ClientSpec {
        id: "monitor-app".into(),
        secret: Some("the-right-secret".into()),
        grants: vec![EmuGrant::ClientCredentials],
        mailboxes: vec![USER.into()],
        ..Default::default()
    });
    let emu = mail_oauth_exporter::emulator::Emulator::start(EmulatorOptions::new(ep.clone()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    std::fs::write(d.join("secret"), "a-wrong-secret\n").unwrap();
    // One probe (the next is 10 minutes away): every line it causes is seen below.
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
             defaults:\n  interval: 10m\n  timeout: 5s\n\
             scheduler:\n  startup_spread: 1s\n\
             credentials:\n  monitor:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: monitor-app\n    grant: client_credentials\n    client_secret_file: {d}/secret\n\
             mailboxes:\n  helpdesk:\n    address: {USER}\n    credential: monitor\n    protocols: [imap]\n\
             \x20   imap: {{ host: 127.0.0.1, port: {port}, tls: starttls }}\n",
            d = d.display(),
            auth = ep.authority(),
            port = emu.addr(Proto::Imap, TlsKind::Starttls).port(),
        ),
    )
    .unwrap();

    let mut child = Command::new(BIN)
        .args(["--log.format", "json", "run", "--web.listen-address"])
        .args(["127.0.0.1:0", "--config.file"])
        .arg(&config)
        .env("RUST_LOG", "info,mail_oauth_exporter=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut raw: Vec<String> = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let done = v["fields"]["message"] == "probe failed";
            seen.push(v);
            raw.push(line);
            if done {
                return;
            }
        }
        panic!("exited before the probe: {raw:#?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no probe within 60 s: {raw:#?}"));
    child.kill().await.unwrap();

    let requests = ep.request_count("monitor-app", "client_credentials");
    assert_eq!(requests, 1, "{raw:#?}");
    let warns: Vec<(&serde_json::Value, &String)> = seen
        .iter()
        .zip(&raw)
        .filter(|(v, _)| v["level"] == "WARN")
        .collect();
    assert_eq!(
        warns.len(),
        requests,
        "one WARN line per failed token request: {warns:#?}"
    );
    let (warn, line) = warns[0];
    assert_eq!(warn["fields"]["mailbox"], "helpdesk", "{line}");
    let reason = warn["fields"]["reason"].as_str().unwrap();
    assert_eq!(reason, "token_invalid_client", "{line}");
    let short = warn["fields"]["detail"].as_str().unwrap();
    assert!(short.len() <= LOG_DETAIL_MAX + '…'.len_utf8(), "{line}");
    assert!(line.len() < 400, "{} characters: {line}", line.len());
    // The full detail, at DEBUG, is what the WARN line trims.
    let full = seen
        .iter()
        .find(|v| v["level"] == "DEBUG" && v["fields"]["message"] == "token request failed")
        .unwrap_or_else(|| panic!("no DEBUG line with the full detail: {raw:#?}"));
    let full = full["fields"]["detail"].as_str().unwrap();
    assert!(full.contains("AADSTS7000215"), "{full}");
    assert_eq!(short, bounded(full, LOG_DETAIL_MAX), "{line}");

    // The one-shot `probe`: the failure on stdout, no backoff or retry on stderr.
    let (code, out, err) = run(&[
        "probe",
        "--config",
        config.to_str().unwrap(),
        "--mailbox",
        "helpdesk",
    ])
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("token_invalid_client"), "{out}");
    assert_eq!(ep.request_count("monitor-app", "client_credentials"), 2);
    for line in err.lines() {
        let l = line.to_lowercase();
        assert!(
            !l.contains("retry") && !l.contains("backoff"),
            "a backoff line from a one-shot probe: {line}"
        );
    }
}

/// `check` on a delegated credential that was never bootstrapped passes (`run` starts)
/// but says so, with the `login` command; once a refresh token is stored, it says nothing.
#[tokio::test]
async fn check_notes_a_delegated_credential_without_a_refresh_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = d.join("secret");
    std::fs::write(&secret, "s3cr3t\n").unwrap();
    let state = d.join("state");
    let config = file_config(d, &secret, None, &state);
    let (code, out) = check(&config).await;
    assert_eq!(code, 0, "{out}");
    let note = format!(
        "note: credential user has no refresh token yet; until `mail-oauth-exporter login --config {} --credential user` is run",
        config.display()
    );
    assert!(out.contains(&note), "{out}");
    assert!(
        !out.contains("credential app"),
        "only delegated credentials: {out}"
    );
    mail_oauth_exporter::token::RefreshTokenStore::new(&state)
        .save(
            "user",
            &mail_oauth_exporter::secret::Secret::new("0.AAAA-stored-refresh-token"),
        )
        .await
        .unwrap();
    let (code, out) = check(&config).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("note:"), "{out}");
}
