//! Tests of the emulated provider with a raw client: the seed's transcripts, every
//! behaviour on every protocol, protocol details, hostile clients, certificates.

use std::io;
use std::net::SocketAddr;
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
        } else if continued {
            if let Some(Step::Client(c)) = steps.last_mut() {
                *c = format!("{}{}", c.trim_end(), raw.trim());
            }
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
