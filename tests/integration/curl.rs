//! curl as an independent client of the emulated provider: both TLS modes of each
//! protocol must log in with a valid token and be denied (exit 67) with an invalid one.

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};

use mail_oauth_exporter::emulator::{Emulator, Proto, TlsKind};

use crate::emulator::{TOKEN, USER, start};

/// curl's exit code for "login denied".
const LOGIN_DENIED: i32 = 67;

/// A scratch directory with the CA file and a small message, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(emu: &Emulator) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mail-oauth-emu-curl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        emu.write_ca_pem(&dir.join("ca.pem")).expect("CA file");
        std::fs::write(
            dir.join("message.txt"),
            "From: someuser@example.com\r\nTo: someone@example.com\r\nSubject: probe\r\n\r\nhello\r\n",
        )
        .expect("message file");
        Scratch { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs curl against one listener with `token`; fails the test if curl is missing.
async fn curl(
    emu: &Emulator,
    scratch: &Scratch,
    proto: Proto,
    kind: TlsKind,
    token: &str,
) -> Output {
    let port = emu.addr(proto, kind).port();
    let scheme = match (proto, kind) {
        (Proto::Imap, TlsKind::Implicit) => "imaps",
        (Proto::Imap, TlsKind::Starttls) => "imap",
        (Proto::Pop3, TlsKind::Implicit) => "pop3s",
        (Proto::Pop3, TlsKind::Starttls) => "pop3",
        (Proto::Smtp, TlsKind::Implicit) => "smtps",
        (Proto::Smtp, TlsKind::Starttls) => "smtp",
    };
    let path = if proto == Proto::Imap { "/INBOX" } else { "/" };
    let mut cmd = tokio::process::Command::new("curl");
    cmd.arg("-sS")
        .arg("-v")
        .args(["--max-time", "20"])
        .arg("--cacert")
        .arg(scratch.dir.join("ca.pem"))
        .args(["-u", &format!("{USER}:")])
        .args(["--oauth2-bearer", token])
        .arg(format!("{scheme}://127.0.0.1:{port}{path}"));
    if kind == TlsKind::Starttls {
        cmd.arg("--ssl-reqd");
    }
    if proto == Proto::Smtp {
        cmd.args(["--mail-from", USER, "--mail-rcpt", "someone@example.com"])
            .arg("-T")
            .arg(scratch.dir.join("message.txt"));
    }
    match cmd.output().await {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("curl is not installed (needed as an independent client): apt-get install curl")
        }
        Err(e) => panic!("cannot run curl: {e}"),
    }
}

/// Valid token logs in, invalid is denied, on both TLS modes; `mech` is what curl must use.
async fn check(proto: Proto, oauthbearer: bool) {
    let emu = start(&[TOKEN], |o| o.advertise_oauthbearer = oauthbearer).await;
    let scratch = Scratch::new(&emu);
    let mech = if oauthbearer {
        "OAUTHBEARER"
    } else {
        "XOAUTH2"
    };
    for kind in [TlsKind::Implicit, TlsKind::Starttls] {
        emu.clear_received();
        let out = curl(&emu, &scratch, proto, kind, TOKEN).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{proto:?} {kind:?} valid token: {stderr}"
        );
        let received = emu.received(proto);
        assert!(
            received
                .iter()
                .any(|l| l.to_ascii_uppercase().contains(&format!(
                    "AUTH{} {mech}",
                    if proto == Proto::Imap { "ENTICATE" } else { "" }
                ))),
            "{proto:?} {kind:?}: curl did not use {mech}: {received:?}"
        );
        if kind == TlsKind::Starttls {
            let upgrade = if proto == Proto::Pop3 {
                "STLS"
            } else {
                "STARTTLS"
            };
            assert!(
                received
                    .iter()
                    .any(|l| l.to_ascii_uppercase().ends_with(upgrade)),
                "{received:?}"
            );
        }
        if proto == Proto::Smtp {
            assert!(
                stderr.contains("235 2.7.0 Authentication successful"),
                "{stderr}"
            );
        }
        let out = curl(&emu, &scratch, proto, kind, "not-the-token").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(LOGIN_DENIED),
            "{proto:?} {kind:?} invalid token: {stderr}"
        );
    }
}

#[tokio::test]
async fn curl_imap_oauthbearer() {
    check(Proto::Imap, true).await;
}

#[tokio::test]
async fn curl_imap_xoauth2() {
    check(Proto::Imap, false).await;
}

#[tokio::test]
async fn curl_pop3_oauthbearer() {
    check(Proto::Pop3, true).await;
}

#[tokio::test]
async fn curl_pop3_xoauth2() {
    check(Proto::Pop3, false).await;
}

#[tokio::test]
async fn curl_smtp_oauthbearer() {
    check(Proto::Smtp, true).await;
}

#[tokio::test]
async fn curl_smtp_xoauth2() {
    check(Proto::Smtp, false).await;
}
