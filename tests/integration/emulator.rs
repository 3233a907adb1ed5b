//! Tests of the emulated provider with a raw client: the seed's transcripts, every
//! behaviour on every protocol, protocol details, hostile clients, certificates.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::prelude::*;
use mail_oauth_exporter::emulator::{
    Behaviour, CertKind, Emulator, EmulatorOptions, Proto, ServerBehaviour, StaticTokens, TlsKind,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;

/// The user and token encoded in the seed's base64.
pub(crate) const USER: &str = "someuser@example.com";
pub(crate) const TOKEN: &str = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg";
/// How long a test waits for any one reply.
const WAIT: Duration = Duration::from_secs(10);

/// Starts an emulator accepting `tokens`, after `tweak` adjusted the options.
pub(crate) async fn start(tokens: &[&str], tweak: impl FnOnce(&mut EmulatorOptions)) -> Emulator {
    let mut options = EmulatorOptions::new(Arc::new(StaticTokens::new(tokens.iter().copied())));
    tweak(&mut options);
    Emulator::start(options).await.expect("emulator starts")
}

pub(crate) fn xoauth2(user: &str, token: &str) -> String {
    BASE64_STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

pub(crate) fn oauthbearer(user: Option<&str>, token: &str) -> String {
    let a = user.map(|u| format!("a={u}")).unwrap_or_default();
    BASE64_STANDARD.encode(format!(
        "n,{a},\x01host=127.0.0.1\x01port=993\x01auth=Bearer {token}\x01\x01"
    ))
}

/// Client transport: TCP or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn tls_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("CA certificate parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// TLS handshake as a client of 127.0.0.1 trusting `ca`.
async fn handshake(
    tcp: TcpStream,
    ca: &CertificateDer<'static>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca));
    let name = ServerName::try_from("127.0.0.1").expect("IP server name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// A line-oriented test client.
pub(crate) struct Client {
    io: BufReader<Stream>,
    ca: CertificateDer<'static>,
}

impl Client {
    /// Connects to one listener; implicit-TLS ports get the TLS handshake.
    pub(crate) async fn connect(emu: &Emulator, proto: Proto, kind: TlsKind) -> Client {
        let tcp = TcpStream::connect(emu.addr(proto, kind))
            .await
            .expect("connect");
        let stream = match kind {
            TlsKind::Implicit => Stream::Tls(Box::new(
                handshake(tcp, emu.ca_der()).await.expect("TLS handshake"),
            )),
            TlsKind::Starttls => Stream::Plain(tcp),
        };
        Client {
            io: BufReader::new(stream),
            ca: emu.ca_der().clone(),
        }
    }

    /// Connects without TLS, whatever the port.
    async fn raw(emu: &Emulator, proto: Proto, kind: TlsKind) -> Client {
        let tcp = TcpStream::connect(emu.addr(proto, kind))
            .await
            .expect("connect");
        Client {
            io: BufReader::new(Stream::Plain(tcp)),
            ca: emu.ca_der().clone(),
        }
    }

    /// TLS over the plain connection (after STARTTLS / STLS).
    pub(crate) async fn upgrade(self) -> Client {
        assert!(
            self.io.buffer().is_empty(),
            "server sent data before the TLS handshake"
        );
        let Stream::Plain(tcp) = self.io.into_inner() else {
            panic!("already TLS")
        };
        let tls = handshake(tcp, &self.ca)
            .await
            .expect("TLS handshake after STARTTLS");
        Client {
            io: BufReader::new(Stream::Tls(Box::new(tls))),
            ca: self.ca,
        }
    }

    pub(crate) async fn send(&mut self, line: &str) {
        let bytes = format!("{line}\r\n");
        self.io
            .get_mut()
            .write_all(bytes.as_bytes())
            .await
            .expect("send");
        self.io.get_mut().flush().await.expect("flush");
    }

    /// The next line, `None` at end of stream.
    async fn next(&mut self) -> io::Result<Option<String>> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(WAIT, self.io.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))??;
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&buf);
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
    }

    /// The next line; the test fails on end of stream or timeout.
    pub(crate) async fn line(&mut self) -> String {
        match self.next().await {
            Ok(Some(l)) => l,
            Ok(None) => panic!("connection closed while a reply was expected"),
            Err(e) => panic!("no reply: {e}"),
        }
    }

    /// Reads lines until one satisfies `last`.
    async fn until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = last(&l);
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// IMAP: sends `TAG command` and reads through the tagged reply.
    pub(crate) async fn imap(&mut self, command: &str) -> Vec<String> {
        let tag = format!("{} ", command.split(' ').next().unwrap_or(""));
        self.send(command).await;
        self.until(|l| l.starts_with(&tag)).await
    }

    /// SMTP: sends a command and reads the (multi-line) reply.
    pub(crate) async fn smtp(&mut self, command: &str) -> Vec<String> {
        self.send(command).await;
        self.smtp_reply().await
    }

    async fn smtp_reply(&mut self) -> Vec<String> {
        self.until(|l| l.len() < 4 || l.as_bytes()[3] == b' ').await
    }

    /// POP3: sends a command whose reply is multi-line on success.
    async fn pop3_multi(&mut self, command: &str) -> Vec<String> {
        self.send(command).await;
        let first = self.line().await;
        if !first.starts_with("+OK") {
            return vec![first];
        }
        let mut lines = vec![first];
        lines.extend(self.until(|l| l == ".").await);
        lines
    }

    /// Asserts the server closes the connection (EOF or reset) without more lines.
    async fn expect_closed(&mut self) {
        match self.next().await {
            Ok(None) => {}
            Err(e) if e.kind() != io::ErrorKind::TimedOut => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
}

/// IMAP connection ready for AUTHENTICATE (greeting read; STARTTLS done on the plain port).
async fn imap_ready(emu: &Emulator, kind: TlsKind) -> Client {
    let mut c = Client::connect(emu, Proto::Imap, kind).await;
    let greeting = c.line().await;
    assert!(
        greeting.starts_with("* OK The Microsoft Exchange IMAP4 service is ready. ["),
        "{greeting}"
    );
    if kind == TlsKind::Starttls {
        assert_eq!(
            c.imap("S0 STARTTLS").await,
            ["S0 OK Begin TLS negotiation now."]
        );
        c = c.upgrade().await;
    }
    c
}

/// POP3 connection ready for AUTH.
async fn pop3_ready(emu: &Emulator, kind: TlsKind) -> Client {
    let mut c = Client::connect(emu, Proto::Pop3, kind).await;
    let greeting = c.line().await;
    assert!(
        greeting.starts_with("+OK The Microsoft Exchange POP3 service is ready. ["),
        "{greeting}"
    );
    if kind == TlsKind::Starttls {
        c.send("STLS").await;
        assert_eq!(c.line().await, "+OK Begin TLS negotiation.");
        c = c.upgrade().await;
    }
    c
}

/// SMTP connection ready for AUTH: greeting, EHLO, STARTTLS, EHLO again.
pub(crate) async fn smtp_ready(emu: &Emulator, kind: TlsKind) -> Client {
    let mut c = Client::connect(emu, Proto::Smtp, kind).await;
    let greeting = c.line().await;
    assert!(
        greeting.starts_with(&format!(
            "220 {} Microsoft ESMTP MAIL Service ready at ",
            emu.hostname()
        )),
        "{greeting}"
    );
    if kind == TlsKind::Starttls {
        let ehlo = c.smtp("EHLO client.example").await;
        assert!(ehlo.iter().any(|l| l == "250-STARTTLS"), "{ehlo:?}");
        assert_eq!(c.smtp("STARTTLS").await, ["220 2.0.0 SMTP server ready"]);
        c = c.upgrade().await;
    }
    let ehlo = c.smtp("EHLO client.example").await;
    assert!(
        ehlo.iter().any(|l| l.starts_with("250-AUTH LOGIN XOAUTH2")),
        "{ehlo:?}"
    );
    c
}

// ---------------------------------------------------------------------------
// The seed's six transcripts, replayed literally.

const SEED: &str = include_str!("fixtures/seed_001_transcripts.txt");

#[derive(Debug)]
enum Step {
    Client(String),
    Server(String),
}

/// The steps of one named transcript. Continuation lines (no `C:`/`S:` prefix) belong to
/// the client line before them and are joined into one line, trimmed, as the base64 is
/// one SASL response. IMAP transcripts start with `C01 CAPABILITY` (the failure one
/// omits it in the seed).
fn transcript(name: &str) -> Vec<Step> {
    let section = SEED
        .split("## ")
        .find(|s| s.starts_with(&format!("{name}\n")))
        .unwrap_or_else(|| panic!("transcript {name} missing"));
    let mut steps: Vec<Step> = Vec::new();
    let mut continued = false;
    for raw in section.lines().skip(1) {
        if raw.trim_start().starts_with('[') {
            continued = false;
            continue;
        }
        if let Some(c) = raw.strip_prefix("C: ") {
            steps.push(Step::Client(c.to_string()));
            continued = true;
        } else if let Some(s) = raw.strip_prefix("S: ") {
            steps.push(Step::Server(s.trim_end().to_string()));
            continued = false;
        } else if continued && let Some(Step::Client(c)) = steps.last_mut() {
            *c = format!("{}{}", c.trim_end(), raw.trim());
        }
    }
    if name.starts_with("imap") && !matches!(steps.first(), Some(Step::Client(_))) {
        steps.insert(0, Step::Client("C01 CAPABILITY".into()));
    }
    steps
}

/// Whether `line` matches `pattern`, where `…` stands for any text.
fn matches_seed(pattern: &str, line: &str) -> bool {
    let line = line.trim_end();
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return line == pattern;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line.ends_with(last) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Replays a transcript on both kinds of port; the STARTTLS upgrade (and, for SMTP, the
/// EHLO the seed leaves out on 587) happens before the transcript starts.
async fn replay(name: &str, tokens: &[&str]) {
    let proto = match &name[..4] {
        "imap" => Proto::Imap,
        "pop3" => Proto::Pop3,
        _ => Proto::Smtp,
    };
    let steps = transcript(name);
    assert!(steps.len() >= 4, "{steps:?}");
    for kind in [TlsKind::Implicit, TlsKind::Starttls] {
        let emu = start(tokens, |_| {}).await;
        let mut c = match (proto, kind) {
            (Proto::Imap, _) => imap_ready(&emu, kind).await,
            (Proto::Pop3, _) => pop3_ready(&emu, kind).await,
            (Proto::Smtp, TlsKind::Implicit) => {
                // The seed starts AUTH right after the greeting.
                let mut c = Client::connect(&emu, Proto::Smtp, kind).await;
                assert!(c.line().await.starts_with("220 "));
                c
            }
            (Proto::Smtp, TlsKind::Starttls) => smtp_ready(&emu, kind).await,
        };
        for step in &steps {
            match step {
                Step::Client(line) => c.send(line).await,
                Step::Server(pattern) => {
                    let got = c.line().await;
                    assert!(
                        matches_seed(pattern, &got),
                        "{name} {kind:?}: expected {pattern:?}, got {got:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn seed_wildcard_matching() {
    assert!(matches_seed(
        "* CAPABILITY … AUTH=XOAUTH2",
        "* CAPABILITY IMAP4 AUTH=XOAUTH2"
    ));
    assert!(!matches_seed(
        "* CAPABILITY … AUTH=XOAUTH2",
        "* CAPABILITY IMAP4 AUTH=PLAIN"
    ));
    assert!(!matches_seed("C01 OK Completed", "C01 OK Completed."));
    assert_eq!(transcript("pop3-success").len(), 4);
    assert_eq!(transcript("imap-failure").len(), 5);
}

#[tokio::test]
async fn seed_imap_success() {
    replay("imap-success", &[TOKEN]).await;
}

#[tokio::test]
async fn seed_imap_failure() {
    replay("imap-failure", &[]).await;
}

#[tokio::test]
async fn seed_pop3_success() {
    replay("pop3-success", &[TOKEN]).await;
}

#[tokio::test]
async fn seed_pop3_failure() {
    replay("pop3-failure", &[]).await;
    // The seed's failing base64 is also truncated (one `=`): refused even for a good token.
    replay("pop3-failure", &[TOKEN]).await;
}

#[tokio::test]
async fn seed_smtp_success() {
    replay("smtp-success", &[TOKEN]).await;
}

#[tokio::test]
async fn seed_smtp_failure() {
    replay("smtp-failure", &[]).await;
}

// ---------------------------------------------------------------------------
// Per-user behaviours, on every protocol.

const IMAP_OK: &str = "A01 OK AUTHENTICATE completed.";
const IMAP_NO: &str = "A01 NO AUTHENTICATE failed.";
/// Dovecot's temporary failure; the emulator adds Dovecot's `[host:time]` stamp, which
/// [`unstamped`] removes before comparing.
const IMAP_TEMP: &str = "A01 NO [UNAVAILABLE] Temporary authentication failure.";
const POP3_OK: &str = "+OK User successfully authenticated.";
const POP3_NO: &str = "-ERR Authentication failure: unknown user name or bad password.";
const POP3_TEMP: &str = "-ERR [SYS/TEMP] Temporary authentication failure.";

/// A reply without Dovecot's trailing `[host:YYYY-MM-DD HH:MM:SS]` stamp (the time varies).
fn unstamped(reply: &str) -> String {
    let host = format!(" [{HOST}:");
    match reply.rfind(&host) {
        Some(i) if reply.ends_with(']') && reply.len() - i == host.len() + 20 => {
            reply[..i].to_string()
        }
        _ => reply.to_string(),
    }
}
const SMTP_OK: &str = "235 2.7.0 Authentication successful";
const HOST: &str = "SN2PR00CA0018.namprd00.prod.outlook.com";
const CHALLENGE_XOAUTH2: &str = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
const CHALLENGE_OAUTHBEARER: &str =
    "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
const SLOW: Duration = Duration::from_millis(400);

/// One behaviour case: the reply to the auth step and, optionally, a next command and its last reply line.
type Case = (Behaviour, String, Option<(&'static str, String)>);

fn smtp_host(text: &str) -> String {
    format!("{text} [{HOST}]")
}

async fn slow_emulator() -> Emulator {
    start(&[TOKEN], |o| o.slow_delay = SLOW).await
}

#[tokio::test]
async fn imap_user_behaviours() {
    use Behaviour::*;
    let examine = Some((
        "A02 EXAMINE INBOX",
        "A02 OK [READ-ONLY] EXAMINE completed.".to_string(),
    ));
    let cases: Vec<Case> = vec![
        (Success, IMAP_OK.into(), examine.clone()),
        (TokenRefused, IMAP_NO.into(), None),
        (SmtpAuthDisabled, IMAP_OK.into(), examine.clone()),
        (SmtpAuthDisabledMailbox, IMAP_OK.into(), None),
        (PolicyBlocked, IMAP_NO.into(), None),
        (ConditionalAccess, IMAP_NO.into(), None),
        (
            AuthenticatedNotConnected,
            IMAP_OK.into(),
            Some((
                "A02 EXAMINE INBOX",
                "A02 BAD User is authenticated but not connected.".into(),
            )),
        ),
        (
            Throttled,
            "A01 NO Request is throttled. Suggested Backoff Time: 299961 milliseconds".into(),
            None,
        ),
        (TemporaryFailure, IMAP_TEMP.into(), None),
        (ServerError451, IMAP_TEMP.into(), None),
        (TryAgainLater, IMAP_TEMP.into(), None),
        (Slow, IMAP_OK.into(), examine.clone()),
    ];
    let emu = slow_emulator().await;
    for (i, (behaviour, auth, after)) in cases.into_iter().enumerate() {
        let user = format!("User{i}@Contoso.com");
        emu.set_behaviour(&user.to_lowercase(), behaviour);
        let mut c = imap_ready(&emu, TlsKind::Implicit).await;
        let started = Instant::now();
        let reply = c
            .imap(&format!(
                "A01 AUTHENTICATE XOAUTH2 {}",
                xoauth2(&user, TOKEN)
            ))
            .await;
        let reply: Vec<String> = reply.iter().map(|r| unstamped(r)).collect();
        assert_eq!(reply, [auth], "{behaviour:?}");
        assert_eq!(
            behaviour == Slow,
            started.elapsed() >= SLOW,
            "{behaviour:?} timing"
        );
        if let Some((command, want)) = after {
            assert_eq!(c.imap(command).await.last(), Some(&want), "{behaviour:?}");
        }
    }
}

#[tokio::test]
async fn imap_token_expiring_ends_session() {
    let emu = start(&[TOKEN], |o| o.default_behaviour = Behaviour::TokenExpiring).await;
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    assert_eq!(
        c.imap(&format!(
            "A01 AUTHENTICATE XOAUTH2 {}",
            xoauth2(USER, TOKEN)
        ))
        .await,
        [IMAP_OK]
    );
    c.send("A02 EXAMINE INBOX").await;
    assert_eq!(
        c.line().await,
        "* BYE Session invalidated - AccessTokenExpired"
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn login_behaviours_need_a_valid_token() {
    use Behaviour::*;
    let emu = slow_emulator().await;
    for behaviour in [
        Success,
        Slow,
        AuthenticatedNotConnected,
        TokenExpiring,
        SmtpAuthDisabled,
    ] {
        emu.set_behaviour(USER, behaviour);
        let mut c = imap_ready(&emu, TlsKind::Implicit).await;
        let r = c
            .imap(&format!(
                "A01 AUTHENTICATE XOAUTH2 {}",
                xoauth2(USER, "wrong")
            ))
            .await;
        assert_eq!(r, [IMAP_NO], "{behaviour:?}");
        let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
        c.send(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "wrong")))
            .await;
        assert_eq!(c.line().await, POP3_NO, "{behaviour:?}");
        if behaviour != SmtpAuthDisabled && behaviour != TokenExpiring {
            let mut c = smtp_ready(&emu, TlsKind::Implicit).await;
            let r = c
                .smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "wrong")))
                .await;
            assert_eq!(
                r,
                [smtp_host("535 5.7.3 Authentication unsuccessful")],
                "{behaviour:?}"
            );
        }
    }
}

#[tokio::test]
async fn pop3_user_behaviours() {
    use Behaviour::*;
    let stat = Some(("STAT", "+OK 0 0".to_string()));
    let cases: Vec<Case> = vec![
        (Success, POP3_OK.into(), stat.clone()),
        (TokenRefused, POP3_NO.into(), None),
        (SmtpAuthDisabled, POP3_OK.into(), stat.clone()),
        (SmtpAuthDisabledMailbox, POP3_OK.into(), None),
        (PolicyBlocked, POP3_NO.into(), None),
        (ConditionalAccess, POP3_NO.into(), None),
        (
            AuthenticatedNotConnected,
            POP3_OK.into(),
            Some((
                "STAT",
                "-ERR User is authenticated but not connected.".into(),
            )),
        ),
        (
            TokenExpiring,
            POP3_OK.into(),
            Some((
                "STAT",
                "-ERR Session invalidated - AccessTokenExpired".into(),
            )),
        ),
        (
            Throttled,
            "-ERR [IN-USE] Request is throttled.".into(),
            None,
        ),
        (TemporaryFailure, POP3_TEMP.into(), None),
        (ServerError451, POP3_TEMP.into(), None),
        (TryAgainLater, POP3_TEMP.into(), None),
        (Slow, POP3_OK.into(), stat.clone()),
    ];
    let emu = slow_emulator().await;
    for (i, (behaviour, auth, after)) in cases.into_iter().enumerate() {
        let user = format!("user{i}@contoso.com");
        emu.set_behaviour(&user, behaviour);
        let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
        c.send("AUTH XOAUTH2").await;
        assert_eq!(c.line().await.trim_end(), "+", "{behaviour:?}");
        let started = Instant::now();
        c.send(&xoauth2(&user, TOKEN)).await;
        assert_eq!(unstamped(&c.line().await), auth, "{behaviour:?}");
        assert_eq!(
            behaviour == Slow,
            started.elapsed() >= SLOW,
            "{behaviour:?} timing"
        );
        if let Some((command, want)) = after {
            c.send(command).await;
            assert_eq!(c.line().await, want, "{behaviour:?}");
        }
    }
}

#[tokio::test]
async fn smtp_user_behaviours() {
    use Behaviour::*;
    let noop = Some(("NOOP", "250 2.0.0 OK".to_string()));
    let cases: Vec<Case> = vec![
        (Success, SMTP_OK.into(), noop.clone()),
        (TokenRefused, smtp_host("535 5.7.3 Authentication unsuccessful"), None),
        (SmtpAuthDisabled, smtp_host("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."), None),
        (SmtpAuthDisabledMailbox, smtp_host("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."), None),
        (PolicyBlocked, "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.".into(), None),
        (ConditionalAccess, "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.".into(), None),
        (AuthenticatedNotConnected, SMTP_OK.into(), Some(("NOOP", "530 5.7.57 Client not authenticated to send mail.".into()))),
        (Throttled, smtp_host("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information."), None),
        (TokenExpiring, "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon".into(), None),
        (TemporaryFailure, "454 4.7.0 Cannot authenticate due to temporary system problem. Try again later.".into(), None),
        (ServerError451, smtp_host("451 4.7.0 Temporary server error. Please try again later. PRX4"), None),
        (Slow, SMTP_OK.into(), noop.clone()),
    ];
    let emu = slow_emulator().await;
    for kind in [TlsKind::Starttls, TlsKind::Implicit] {
        for (i, (behaviour, auth, after)) in cases.iter().cloned().enumerate() {
            let user = format!("user{i}@contoso.com");
            emu.set_behaviour(&user, behaviour);
            let mut c = smtp_ready(&emu, kind).await;
            let started = Instant::now();
            let reply = c
                .smtp(&format!("AUTH XOAUTH2 {}", xoauth2(&user, TOKEN)))
                .await;
            assert_eq!(reply, [auth], "{behaviour:?}");
            assert_eq!(
                behaviour == Slow,
                started.elapsed() >= SLOW,
                "{behaviour:?} timing"
            );
            if let Some((command, want)) = after {
                assert_eq!(c.smtp(command).await, [want], "{behaviour:?}");
            }
        }
    }
}

#[tokio::test]
async fn smtp_try_again_later_closes() {
    let emu = start(&[TOKEN], |o| o.default_behaviour = Behaviour::TryAgainLater).await;
    let mut c = smtp_ready(&emu, TlsKind::Starttls).await;
    let reply = c
        .smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
        .await;
    assert_eq!(reply, ["421 4.7.0 Try again later, closing connection."]);
    c.expect_closed().await;
}

#[tokio::test]
async fn error_challenge_on_every_protocol_and_mechanism() {
    let emu = start(&[TOKEN], |o| {
        o.default_behaviour = Behaviour::ErrorChallenge
    })
    .await;
    for (mech, response, challenge, ack) in [
        ("XOAUTH2", xoauth2(USER, TOKEN), CHALLENGE_XOAUTH2, ""),
        (
            "OAUTHBEARER",
            oauthbearer(Some(USER), TOKEN),
            CHALLENGE_OAUTHBEARER,
            "AQ==",
        ),
    ] {
        // IMAP, with the response after the continuation.
        let mut c = imap_ready(&emu, TlsKind::Implicit).await;
        c.send(&format!("A01 AUTHENTICATE {mech}")).await;
        assert_eq!(c.line().await.trim_end(), "+");
        c.send(&response).await;
        assert_eq!(c.line().await, format!("+ {challenge}"));
        c.send(ack).await;
        assert_eq!(
            c.line().await,
            "A01 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
        );
        // POP3, with an initial response.
        let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
        c.send(&format!("AUTH {mech} {response}")).await;
        assert_eq!(c.line().await, format!("+ {challenge}"));
        c.send(ack).await;
        assert_eq!(c.line().await, "-ERR [AUTH] Invalid credentials.");
        // SMTP.
        let mut c = smtp_ready(&emu, TlsKind::Starttls).await;
        assert_eq!(
            c.smtp(&format!("AUTH {mech} {response}")).await,
            [format!("334 {challenge}")]
        );
        assert_eq!(
            c.smtp(ack).await,
            [
                "535-5.7.8 Username and Password not accepted. For more information, go to",
                "535 5.7.8  https://support.google.com/mail/?p=BadCredentials x1-20020a05 - gsmtp"
            ]
        );
    }
}

#[tokio::test]
async fn error_challenge_wrong_answer_is_a_protocol_error() {
    let emu = start(&[TOKEN], |o| {
        o.default_behaviour = Behaviour::ErrorChallenge
    })
    .await;
    // XOAUTH2 wants an empty line: AQ== is wrong; OAUTHBEARER wants AQ==: empty is wrong.
    for (mech, response, wrong) in [
        ("XOAUTH2", xoauth2(USER, TOKEN), "AQ=="),
        ("OAUTHBEARER", oauthbearer(Some(USER), TOKEN), ""),
    ] {
        let mut c = imap_ready(&emu, TlsKind::Implicit).await;
        c.send(&format!("A01 AUTHENTICATE {mech} {response}")).await;
        assert!(c.line().await.starts_with("+ eyJ"));
        c.send(wrong).await;
        assert!(c.line().await.starts_with("A01 BAD "), "{mech}");
        let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
        c.send(&format!("AUTH {mech} {response}")).await;
        assert!(c.line().await.starts_with("+ eyJ"));
        c.send(wrong).await;
        assert!(c.line().await.starts_with("-ERR "), "{mech}");
        assert_ne!(
            c.line_after("NOOP").await,
            "",
            "{mech}: the session goes on"
        );
        let mut c = smtp_ready(&emu, TlsKind::Implicit).await;
        assert!(c.smtp(&format!("AUTH {mech} {response}")).await[0].starts_with("334 eyJ"));
        let reply = c.smtp(wrong).await;
        assert!(reply[0].starts_with("501 "), "{mech}: {reply:?}");
    }
}

impl Client {
    async fn line_after(&mut self, command: &str) -> String {
        self.send(command).await;
        self.line().await
    }
}

#[tokio::test]
async fn oauthbearer_logs_in_and_needs_a_user() {
    let emu = start(&[TOKEN], |_| {}).await;
    let mut c = imap_ready(&emu, TlsKind::Starttls).await;
    assert_eq!(
        c.imap(&format!(
            "A01 AUTHENTICATE OAUTHBEARER {}",
            oauthbearer(Some(USER), TOKEN)
        ))
        .await,
        [IMAP_OK]
    );
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    assert_eq!(
        c.imap(&format!(
            "A01 AUTHENTICATE OAUTHBEARER {}",
            oauthbearer(None, TOKEN)
        ))
        .await,
        [IMAP_NO]
    );
    let mut c = pop3_ready(&emu, TlsKind::Starttls).await;
    assert_eq!(
        c.line_after(&format!(
            "AUTH OAUTHBEARER {}",
            oauthbearer(Some(USER), TOKEN)
        ))
        .await,
        POP3_OK
    );
    let mut c = smtp_ready(&emu, TlsKind::Starttls).await;
    assert_eq!(
        c.smtp(&format!(
            "AUTH OAUTHBEARER {}",
            oauthbearer(Some(USER), TOKEN)
        ))
        .await,
        [SMTP_OK]
    );
    // Without the option, OAUTHBEARER is neither offered nor accepted.
    let emu = start(&[TOKEN], |o| o.advertise_oauthbearer = false).await;
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    assert!(!c.imap("C01 CAPABILITY").await[0].contains("OAUTHBEARER"));
    let r = c
        .imap(&format!(
            "A01 AUTHENTICATE OAUTHBEARER {}",
            oauthbearer(Some(USER), TOKEN)
        ))
        .await;
    assert!(r[0].starts_with("A01 NO "), "{r:?}");
    let mut c = smtp_ready(&emu, TlsKind::Implicit).await;
    assert_eq!(
        c.smtp(&format!(
            "AUTH OAUTHBEARER {}",
            oauthbearer(Some(USER), TOKEN)
        ))
        .await,
        ["504 5.7.4 Unrecognized authentication type"]
    );
}

#[tokio::test]
async fn malformed_sasl_is_refused_not_fatal() {
    let emu = start(&[TOKEN], |_| {}).await;
    for junk in [
        "%%%",
        "AAAA",
        "=",
        "dXNlcj1h",
        &BASE64_STANDARD.encode([0xff_u8; 40]),
    ] {
        let mut c = imap_ready(&emu, TlsKind::Implicit).await;
        assert_eq!(
            c.imap(&format!("A01 AUTHENTICATE XOAUTH2 {junk}")).await,
            [IMAP_NO],
            "{junk}"
        );
        assert_eq!(c.imap("A02 NOOP").await, ["A02 OK NOOP completed."]);
        let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
        assert_eq!(
            c.line_after(&format!("AUTH XOAUTH2 {junk}")).await,
            POP3_NO,
            "{junk}"
        );
        let mut c = smtp_ready(&emu, TlsKind::Implicit).await;
        assert_eq!(
            c.smtp(&format!("AUTH XOAUTH2 {junk}")).await,
            [smtp_host("535 5.7.3 Authentication unsuccessful")],
            "{junk}"
        );
    }
}

// ---------------------------------------------------------------------------
// Server-wide behaviours.

async fn server(behaviour: ServerBehaviour) -> Emulator {
    start(&[TOKEN], |o| {
        o.server = behaviour;
        o.slow_delay = SLOW;
    })
    .await
}

#[tokio::test]
async fn server_no_xoauth2() {
    let emu = server(ServerBehaviour::NoXoauth2).await;
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    let caps = c.imap("C01 CAPABILITY").await;
    assert!(
        caps[0].contains("AUTH=PLAIN")
            && !caps[0].contains("XOAUTH2")
            && !caps[0].contains("OAUTHBEARER"),
        "{caps:?}"
    );
    assert!(
        c.imap(&format!(
            "A01 AUTHENTICATE XOAUTH2 {}",
            xoauth2(USER, TOKEN)
        ))
        .await[0]
            .starts_with("A01 NO ")
    );
    let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
    c.send("CAPA").await;
    assert!(
        c.until(|l| l == ".")
            .await
            .contains(&"SASL PLAIN".to_string())
    );
    assert!(
        c.line_after(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await
            .starts_with("-ERR ")
    );
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Implicit).await;
    c.line().await;
    assert!(
        c.smtp("EHLO x")
            .await
            .contains(&"250-AUTH LOGIN".to_string())
    );
    assert_eq!(
        c.smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await,
        ["504 5.7.4 Unrecognized authentication type"]
    );
}

#[tokio::test]
async fn server_no_starttls() {
    let emu = server(ServerBehaviour::NoStarttls).await;
    let mut c = Client::connect(&emu, Proto::Imap, TlsKind::Starttls).await;
    c.line().await;
    assert!(!c.imap("C01 CAPABILITY").await[0].contains("STARTTLS"));
    assert!(c.imap("S1 STARTTLS").await[0].starts_with("S1 BAD "));
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    c.send("CAPA").await;
    assert!(!c.until(|l| l == ".").await.contains(&"STLS".to_string()));
    assert!(c.line_after("STLS").await.starts_with("-ERR "));
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    assert!(
        !c.smtp("EHLO x")
            .await
            .iter()
            .any(|l| l.contains("STARTTLS"))
    );
    assert!(c.smtp("STARTTLS").await[0].starts_with("500 "));
}

#[tokio::test]
async fn server_refuse_starttls() {
    let emu = server(ServerBehaviour::RefuseStarttls).await;
    let mut c = Client::connect(&emu, Proto::Imap, TlsKind::Starttls).await;
    c.line().await;
    assert!(c.imap("C01 CAPABILITY").await[0].contains(" STARTTLS"));
    assert!(c.imap("S1 STARTTLS").await[0].starts_with("S1 NO "));
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    c.send("CAPA").await;
    assert!(c.until(|l| l == ".").await.contains(&"STLS".to_string()));
    assert!(c.line_after("STLS").await.starts_with("-ERR "));
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    assert!(c.smtp("EHLO x").await.contains(&"250-STARTTLS".to_string()));
    assert_eq!(c.smtp("STARTTLS").await, ["454 4.7.0 TLS not available"]);
}

#[tokio::test]
async fn plain_ports_hide_auth_until_tls() {
    let emu = server(ServerBehaviour::Normal).await;
    let mut c = Client::connect(&emu, Proto::Imap, TlsKind::Starttls).await;
    c.line().await;
    let caps = c.imap("C01 CAPABILITY").await;
    assert!(
        caps[0].contains("LOGINDISABLED STARTTLS") && !caps[0].contains("AUTH="),
        "{caps:?}"
    );
    let r = c
        .imap(&format!(
            "A01 AUTHENTICATE XOAUTH2 {}",
            xoauth2(USER, TOKEN)
        ))
        .await;
    assert_eq!(r, ["A01 BAD Command received in Invalid state."]);
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    c.send("CAPA").await;
    assert_eq!(
        c.until(|l| l == ".").await,
        ["+OK", "TOP", "UIDL", "USER", "STLS", "."]
    );
    assert!(
        c.line_after(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await
            .starts_with("-ERR ")
    );
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    assert!(!c.smtp("EHLO x").await.iter().any(|l| l.contains("AUTH")));
    assert_eq!(
        c.smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await,
        ["504 5.7.4 Unrecognized authentication type"]
    );
}

#[tokio::test]
async fn server_offer_auth_before_tls() {
    let emu = server(ServerBehaviour::OfferAuthBeforeTls).await;
    let mut c = Client::connect(&emu, Proto::Imap, TlsKind::Starttls).await;
    c.line().await;
    let caps = c.imap("C01 CAPABILITY").await;
    assert!(
        caps[0].contains("STARTTLS")
            && caps[0].contains("AUTH=XOAUTH2")
            && !caps[0].contains("LOGINDISABLED"),
        "{caps:?}"
    );
    // STARTTLS still works, and AUTH in the clear would be accepted.
    assert_eq!(
        c.imap("S1 STARTTLS").await,
        ["S1 OK Begin TLS negotiation now."]
    );
    let mut c = c.upgrade().await;
    assert_eq!(
        c.imap(&format!(
            "A01 AUTHENTICATE XOAUTH2 {}",
            xoauth2(USER, TOKEN)
        ))
        .await,
        [IMAP_OK]
    );
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    c.send("CAPA").await;
    let capa = c.until(|l| l == ".").await;
    assert!(
        capa.contains(&"STLS".to_string())
            && capa.iter().any(|l| l.starts_with("SASL PLAIN XOAUTH2")),
        "{capa:?}"
    );
    assert_eq!(
        c.line_after(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await,
        POP3_OK
    );
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    let ehlo = c.smtp("EHLO x").await;
    assert!(
        ehlo.contains(&"250-STARTTLS".to_string())
            && ehlo.iter().any(|l| l.starts_with("250-AUTH LOGIN XOAUTH2")),
        "{ehlo:?}"
    );
}

#[tokio::test]
async fn server_bye_greeting() {
    let emu = server(ServerBehaviour::ByeGreeting).await;
    for kind in [TlsKind::Implicit, TlsKind::Starttls] {
        let mut c = Client::connect(&emu, Proto::Imap, kind).await;
        assert!(c.line().await.starts_with("* BYE "));
        c.expect_closed().await;
        let mut c = Client::connect(&emu, Proto::Pop3, kind).await;
        assert!(c.line().await.starts_with("-ERR "));
        c.expect_closed().await;
        let mut c = Client::connect(&emu, Proto::Smtp, kind).await;
        assert_eq!(c.line().await, smtp_host("421 4.3.2 Service not active"));
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn server_concurrent_limit_and_old_tls() {
    let emu = server(ServerBehaviour::ConcurrentLimit).await;
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    assert_eq!(
        c.line().await,
        smtp_host(
            "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information."
        )
    );
    c.expect_closed().await;
    imap_ready(&emu, TlsKind::Implicit).await;
    let emu = server(ServerBehaviour::OldTlsRejected).await;
    let mut c = smtp_ready(&emu, TlsKind::Starttls).await;
    let r = c
        .smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
        .await;
    assert_eq!(
        r,
        [smtp_host(
            "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls."
        )]
    );
    c.expect_closed().await;
}

/// Reads raw bytes for `window`, returning what arrived and whether the stream ended.
async fn read_for(c: &mut Client, window: Duration, limit: usize) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < limit {
        match tokio::time::timeout_at(deadline, c.io.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (got, false)
}

#[tokio::test]
async fn server_silent() {
    let emu = server(ServerBehaviour::Silent).await;
    for (proto, kind) in [
        (Proto::Imap, TlsKind::Implicit),
        (Proto::Pop3, TlsKind::Starttls),
        (Proto::Smtp, TlsKind::Starttls),
    ] {
        let mut c = Client::connect(&emu, proto, kind).await;
        let (got, closed) = read_for(&mut c, Duration::from_secs(1), 1).await;
        assert!(
            got.is_empty() && !closed,
            "{proto:?}: {got:?} closed={closed}"
        );
    }
}

#[tokio::test]
async fn server_endless_line() {
    let emu = server(ServerBehaviour::EndlessLine).await;
    for (proto, kind) in [
        (Proto::Imap, TlsKind::Starttls),
        (Proto::Smtp, TlsKind::Implicit),
    ] {
        let mut c = Client::connect(&emu, proto, kind).await;
        let (got, closed) = read_for(&mut c, Duration::from_secs(10), 2 * 1024 * 1024).await;
        assert!(
            !closed && got.len() >= 2 * 1024 * 1024,
            "{proto:?}: {} bytes",
            got.len()
        );
        assert!(!got.contains(&b'\n'));
    }
}

#[tokio::test]
async fn server_trickle() {
    let emu = server(ServerBehaviour::Trickle).await;
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Implicit).await;
    let (got, closed) = read_for(&mut c, Duration::from_millis(1300), 1000).await;
    assert!(!closed && (4..=9).contains(&got.len()), "{got:?}");
    assert!(b"+OK The Microsoft".starts_with(&got), "{got:?}");
}

#[tokio::test]
async fn server_garbage() {
    let emu = server(ServerBehaviour::Garbage).await;
    let mut c = Client::connect(&emu, Proto::Imap, TlsKind::Starttls).await;
    let (got, closed) = read_for(&mut c, Duration::from_secs(5), usize::MAX).await;
    assert!(
        closed && got.len() >= 4096,
        "{} bytes closed={closed}",
        got.len()
    );
    assert!(got.iter().filter(|b| !b.is_ascii()).count() > 1000);
}

async fn expect_reset(c: &mut Client, what: &str) {
    match c.next().await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a TCP reset, got {other:?}"),
    }
}

#[tokio::test]
async fn server_resets() {
    let emu = server(ServerBehaviour::ResetAfterGreeting).await;
    for (proto, kind) in [
        (Proto::Imap, TlsKind::Implicit),
        (Proto::Pop3, TlsKind::Starttls),
        (Proto::Smtp, TlsKind::Starttls),
    ] {
        let mut c = Client::connect(&emu, proto, kind).await;
        c.line().await;
        expect_reset(&mut c, "after greeting").await;
    }
    emu.set_server_behaviour(ServerBehaviour::ResetAfterCapability);
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    assert_eq!(c.imap("C01 CAPABILITY").await.len(), 2);
    expect_reset(&mut c, "after CAPABILITY").await;
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    c.send("CAPA").await;
    c.until(|l| l == ".").await;
    expect_reset(&mut c, "after CAPA").await;
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    c.smtp("EHLO x").await;
    expect_reset(&mut c, "after EHLO").await;
    emu.set_server_behaviour(ServerBehaviour::ResetAtAuth);
    let mut c = imap_ready(&emu, TlsKind::Starttls).await;
    c.send(&format!(
        "A01 AUTHENTICATE XOAUTH2 {}",
        xoauth2(USER, TOKEN)
    ))
    .await;
    expect_reset(&mut c, "at IMAP auth").await;
    let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
    c.send("AUTH XOAUTH2").await;
    expect_reset(&mut c, "at POP3 auth").await;
    let mut c = smtp_ready(&emu, TlsKind::Starttls).await;
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
        .await;
    expect_reset(&mut c, "at SMTP auth").await;
}

#[tokio::test]
async fn server_no_tls_on_implicit_port() {
    let emu = server(ServerBehaviour::NoTls).await;
    let mut c = Client::raw(&emu, Proto::Imap, TlsKind::Implicit).await;
    assert!(
        c.line()
            .await
            .starts_with("* OK The Microsoft Exchange IMAP4")
    );
    let tcp = TcpStream::connect(emu.addr(Proto::Smtp, TlsKind::Implicit))
        .await
        .unwrap();
    assert!(handshake(tcp, emu.ca_der()).await.is_err());
}

#[tokio::test]
async fn server_slow_delays_every_reply() {
    let emu = server(ServerBehaviour::Slow).await;
    let started = Instant::now();
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Implicit).await;
    c.line().await;
    assert!(started.elapsed() >= SLOW);
    let started = Instant::now();
    c.line_after("NOOP").await;
    assert!(started.elapsed() >= SLOW);
}

// ---------------------------------------------------------------------------
// Protocol details.

#[tokio::test]
async fn imap_session_commands() {
    let emu = start(&[TOKEN], |_| {}).await;
    let mut c = imap_ready(&emu, TlsKind::Implicit).await;
    let caps = c.imap("c01 capability").await;
    assert_eq!(
        caps,
        [
            "* CAPABILITY IMAP4 IMAP4rev1 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+ AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2",
            "c01 OK Completed"
        ]
    );
    assert_eq!(
        c.imap("A00 EXAMINE INBOX").await,
        ["A00 BAD Command received in Invalid state."]
    );
    assert_eq!(c.imap("A00 FROB").await, ["A00 BAD Command Error. 12"]);
    assert_eq!(
        c.imap("A00 ID (\"name\" \"probe\")").await,
        ["* ID NIL", "A00 OK ID completed."]
    );
    // A client "*" cancels the exchange.
    c.send("A01 AUTHENTICATE XOAUTH2").await;
    assert_eq!(c.line().await.trim_end(), "+");
    c.send("*").await;
    assert!(c.line().await.starts_with("A01 BAD "));
    assert_eq!(
        c.imap(&format!(
            "a02 authenticate xoauth2 {}",
            xoauth2(USER, TOKEN)
        ))
        .await,
        ["a02 OK AUTHENTICATE completed."]
    );
    let examine = c.imap("A03 examine \"INBOX\"").await;
    assert_eq!(examine[..2], ["* 0 EXISTS", "* 0 RECENT"]);
    assert!(examine.iter().any(|l| l.starts_with("* FLAGS (")));
    assert!(examine.contains(&"* OK [UIDVALIDITY 14] UIDVALIDITY value".to_string()));
    assert!(examine.contains(&"* OK [UIDNEXT 1] The next unique identifier value".to_string()));
    assert_eq!(
        examine.last().unwrap(),
        "A03 OK [READ-ONLY] EXAMINE completed."
    );
    assert_eq!(
        c.imap("A04 UID FETCH 1:* (FLAGS)").await,
        ["A04 OK UID FETCH completed."]
    );
    assert_eq!(
        c.imap("A05 FETCH 1:* (FLAGS)").await,
        ["A05 OK FETCH completed."]
    );
    assert_eq!(
        c.imap("A06 SELECT INBOX").await.last().unwrap(),
        "A06 OK [READ-WRITE] SELECT completed."
    );
    assert_eq!(
        c.imap("A07 LIST \"\" *").await,
        [
            "* LIST (\\Marked \\HasNoChildren) \"/\" INBOX",
            "A07 OK LIST completed."
        ]
    );
    assert_eq!(c.imap("A08 LSUB \"\" *").await.len(), 2);
    assert_eq!(
        c.imap("A09 NAMESPACE").await,
        [
            "* NAMESPACE ((\"\" \"/\")) NIL NIL",
            "A09 OK NAMESPACE completed."
        ]
    );
    assert_eq!(c.imap("A10 NOOP").await, ["A10 OK NOOP completed."]);
    assert_eq!(
        c.imap("A11 EXAMINE Nowhere").await,
        ["A11 NO The requested item could not be found."]
    );
    // A synchronising literal gets a continuation.
    c.send("A12 EXAMINE {5}").await;
    assert!(c.line().await.starts_with("+ "));
    c.send("INBOX").await;
    assert_eq!(
        c.until(|l| l.starts_with("A12 ")).await.last().unwrap(),
        "A12 OK [READ-ONLY] EXAMINE completed."
    );
    assert_eq!(
        c.imap("A13 LOGOUT").await,
        [
            "* BYE Microsoft Exchange Server IMAP4 server signing off.",
            "A13 OK LOGOUT completed."
        ]
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn pop3_session_commands() {
    let emu = start(&[TOKEN], |_| {}).await;
    let mut c = pop3_ready(&emu, TlsKind::Implicit).await;
    assert_eq!(
        c.pop3_multi("capa").await,
        [
            "+OK",
            "TOP",
            "UIDL",
            "SASL PLAIN XOAUTH2 OAUTHBEARER",
            "USER",
            "."
        ]
    );
    assert_eq!(
        c.line_after("STAT").await,
        "-ERR Command is not valid in this state."
    );
    assert_eq!(c.line_after("FROB").await, "-ERR Protocol error. 14");
    // A client "*" cancels the exchange.
    c.send("AUTH XOAUTH2").await;
    c.line().await;
    assert!(c.line_after("*").await.starts_with("-ERR "));
    assert_eq!(
        c.line_after(&format!("auth xoauth2 {}", xoauth2(USER, TOKEN)))
            .await,
        POP3_OK
    );
    assert_eq!(c.line_after("stat").await, "+OK 0 0");
    assert_eq!(c.pop3_multi("LIST").await, ["+OK", "."]);
    assert_eq!(c.pop3_multi("UIDL").await, ["+OK", "."]);
    assert_eq!(c.line_after("NOOP").await, "+OK");
    assert_eq!(
        c.line_after("QUIT").await,
        "+OK Microsoft Exchange Server POP3 server signing off."
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn smtp_session_commands() {
    let emu = start(&[TOKEN], |_| {}).await;
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    assert_eq!(
        c.smtp("MAIL FROM:<a@b>").await,
        ["503 5.5.2 Send hello first"]
    );
    let ehlo = c.smtp("ehlo client.example").await;
    assert_eq!(ehlo[0], format!("250-{HOST} Hello [127.0.0.1]"));
    assert_eq!(
        ehlo[1..],
        [
            "250-SIZE 157286400",
            "250-PIPELINING",
            "250-DSN",
            "250-ENHANCEDSTATUSCODES",
            "250-STARTTLS",
            "250-8BITMIME",
            "250-BINARYMIME",
            "250-CHUNKING",
            "250 SMTPUTF8"
        ]
    );
    assert_eq!(c.smtp("starttls").await, ["220 2.0.0 SMTP server ready"]);
    let mut c = c.upgrade().await;
    let ehlo = c.smtp("EHLO client.example").await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    assert!(
        ehlo.contains(&"250-AUTH LOGIN XOAUTH2 OAUTHBEARER".to_string()),
        "{ehlo:?}"
    );
    assert_eq!(
        c.smtp("MAIL FROM:<a@b>").await,
        ["530 5.7.57 Client not authenticated to send mail."]
    );
    assert_eq!(c.smtp("HELP").await.last().unwrap().get(..4), Some("214 "));
    assert_eq!(c.smtp("VRFY x").await, ["252 2.1.5 Cannot VRFY user"]);
    // The seed's lowercase form, with a long token on the continuation line.
    let long = "x".repeat(3000);
    let emu2 = start(&[&long], |o| o.smtp_max_auth_line = Some(512)).await;
    let mut c2 = smtp_ready(&emu2, TlsKind::Implicit).await;
    let too_long = c2
        .smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &long)))
        .await;
    assert_eq!(too_long, ["500 5.5.2 Line too long"]);
    assert_eq!(c2.smtp("auth xoauth2").await[0].trim_end(), "334");
    assert_eq!(c2.smtp(&xoauth2(USER, &long)).await, [SMTP_OK]);
    // Back on the first connection: a full mail transaction.
    assert_eq!(
        c.smtp(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await,
        [SMTP_OK]
    );
    assert_eq!(c.smtp("NOOP").await, ["250 2.0.0 OK"]);
    assert_eq!(
        c.smtp("RCPT TO:<c@d>").await,
        ["503 5.5.1 Need mail command"]
    );
    assert_eq!(c.smtp("MAIL FROM:<a@b>").await, ["250 2.1.0 Sender OK"]);
    assert_eq!(c.smtp("RCPT TO:<c@d>").await, ["250 2.1.5 Recipient OK"]);
    assert_eq!(
        c.smtp("DATA").await,
        ["354 Start mail input; end with <CRLF>.<CRLF>"]
    );
    c.send("Subject: probe\r\n\r\nhello").await;
    let queued = c.smtp(".").await;
    assert!(queued[0].starts_with("250 2.6.0 "), "{queued:?}");
    assert_eq!(c.smtp("RSET").await, ["250 2.0.0 Resetting"]);
    assert_eq!(c.smtp("FROB").await, ["500 5.3.3 Unrecognized command"]);
    assert_eq!(
        c.smtp("QUIT").await,
        ["221 2.0.0 Service closing transmission channel"]
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn received_log_keeps_client_lines() {
    let emu = start(&[TOKEN], |o| o.log_capacity = 3).await;
    let mut c = imap_ready(&emu, TlsKind::Starttls).await;
    for i in 0..5 {
        c.imap(&format!("N{i} NOOP")).await;
    }
    assert_eq!(emu.received(Proto::Imap), ["N2 NOOP", "N3 NOOP", "N4 NOOP"]);
    assert!(emu.received(Proto::Smtp).is_empty());
    emu.clear_received();
    assert!(emu.received(Proto::Imap).is_empty());
}

// ---------------------------------------------------------------------------
// Hostile clients, limits, shutdown.

#[tokio::test]
async fn ten_megabyte_line_is_cut_off_and_others_are_served() {
    let emu = start(&[TOKEN], |_| {}).await;
    for (proto, kind) in [
        (Proto::Imap, TlsKind::Starttls),
        (Proto::Pop3, TlsKind::Implicit),
        (Proto::Smtp, TlsKind::Starttls),
    ] {
        let mut hostile = Client::connect(&emu, proto, kind).await;
        hostile.line().await;
        let (mut reader, mut writer) = tokio::io::split(hostile.io.into_inner());
        let flood = tokio::spawn(async move {
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..160 {
                if writer.write_all(&chunk).await.is_err() {
                    return false;
                }
            }
            true
        });
        // The server answers (or not) and closes long before 10 MB.
        let mut sink = Vec::new();
        let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "{proto:?}: connection still open");
        assert!(sink.len() < 1024, "{proto:?}");
        let completed = tokio::time::timeout(WAIT, flood)
            .await
            .expect("flood ends")
            .expect("join");
        assert!(!completed, "{proto:?}: the server swallowed 10 MB");
        // Others are still served.
        let mut c = Client::connect(&emu, proto, kind).await;
        assert!(!c.line().await.is_empty());
    }
}

#[tokio::test]
async fn idle_clients_are_dropped() {
    let emu = start(&[TOKEN], |o| o.idle_timeout = Duration::from_millis(300)).await;
    let mut c = Client::connect(&emu, Proto::Smtp, TlsKind::Starttls).await;
    c.line().await;
    let started = Instant::now();
    c.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_stops_listeners_and_connections() {
    let emu = start(&[TOKEN], |_| {}).await;
    let addr = emu.addr(Proto::Pop3, TlsKind::Starttls);
    let mut c = Client::connect(&emu, Proto::Pop3, TlsKind::Starttls).await;
    c.line().await;
    emu.shutdown();
    c.expect_closed().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
    drop(emu);
}

// ---------------------------------------------------------------------------
// Certificates.

#[tokio::test]
async fn certificate_is_valid_for_loopback_with_definite_expiry() {
    let emu = start(&[TOKEN], |_| {}).await;
    let tcp = TcpStream::connect(emu.addr(Proto::Imap, TlsKind::Implicit))
        .await
        .unwrap();
    let tls = handshake(tcp, emu.ca_der()).await.expect("handshake");
    let chain = tls.get_ref().1.peer_certificates().expect("chain").to_vec();
    assert_eq!(chain.len(), 2);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(leaf.validity().not_after.timestamp(), emu.cert_not_after());
    let days = (emu.cert_not_after() - x509_parser::time::ASN1Time::now().timestamp()) / 86_400;
    assert!((85..=90).contains(&days), "{days}");
    assert!(emu.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
}

#[tokio::test]
async fn bad_certificates_are_rejected_by_a_verifying_client() {
    for (kind, why) in [
        (CertKind::Expired, "xpired"),
        (CertKind::WrongName, "NotValidForName"),
        (CertKind::Untrusted, "UnknownIssuer"),
    ] {
        let emu = start(&[TOKEN], |o| o.certificate = kind).await;
        let tcp = TcpStream::connect(emu.addr(Proto::Smtp, TlsKind::Implicit))
            .await
            .unwrap();
        let err = handshake(tcp, emu.ca_der())
            .await
            .expect_err("handshake must fail");
        assert!(format!("{err:?}").contains(why), "{kind:?}: {err:?}");
    }
}
