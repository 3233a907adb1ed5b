//! Proven against a real mail server nobody here wrote: Dovecot (Debian 12's 2.3.19) over
//! IMAP, POP3 and submission, implicit TLS and STARTTLS, XOAUTH2 and OAUTHBEARER, its
//! `oauth2` passdb checking the very tokens the exporter obtained from the emulated token
//! endpoint (RFC 7662 introspection).
//!
//! Each test owns a [`Dovecot`]: a config written into a temp dir, `dovecot -F -c FILE`
//! as a child (never the system instance), listening on 127.0.0.1 high ports, killed on
//! drop. [`World`] adds the token endpoint and an exporter config around it; the `run`
//! command's tests can reuse both. Dovecot must be installed (`scripts/test` installs it
//! as root); when it is not, these tests fail and say how to install it.

use mail_oauth_exporter::emulator::TestCa;
use mail_oauth_exporter::emulator::token_endpoint::{
    ClientSpec, EmuGrant, Scripted, Target, TokenEndpoint,
};
use mail_oauth_exporter::probe::TlsClient;
use mail_oauth_exporter::{Mechanism, Protocol, TlsMode};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// What a machine without Dovecot needs (Debian packages; `scripts/test` runs this as root).
pub const INSTALL: &str =
    "apt-get install -y dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond";
const BIN: &str = env!("CARGO_BIN_EXE_mail-oauth-exporter");
pub const USER: &str = "helpdesk@contoso.com";
pub const CLIENT_ID: &str = "helpdesk-app";
/// Entra access tokens are JWTs of 1,500-2,500 characters: long enough that submission's
/// line limit (about 1,017 octets) matters. The emulator pads its tokens to this length.
pub const REAL_TOKEN_LEN: usize = 1800;
/// The address Dovecot sees as remote: a client from its own address (127.0.0.1) counts
/// as secured, and is offered XOAUTH2 before STARTTLS.
pub const REMOTE: &str = "127.0.0.2";
const FIXTURE: &str = "tests/integration/fixtures/dovecot_2.3_replies.txt";

/// The six listeners, in [`slot`] order.
const LISTENERS: [(Protocol, TlsMode, &str, &str); 6] = [
    (Protocol::Imap, TlsMode::Starttls, "imap-login", "imap"),
    (Protocol::Imap, TlsMode::Implicit, "imap-login", "imaps"),
    (Protocol::Pop3, TlsMode::Starttls, "pop3-login", "pop3"),
    (Protocol::Pop3, TlsMode::Implicit, "pop3-login", "pop3s"),
    (
        Protocol::Smtp,
        TlsMode::Starttls,
        "submission-login",
        "submission",
    ),
    (
        Protocol::Smtp,
        TlsMode::Implicit,
        "submission-login",
        "submissions",
    ),
];

fn slot(p: Protocol, t: TlsMode) -> usize {
    LISTENERS
        .iter()
        .position(|(lp, lt, ..)| *lp == p && *lt == t)
        .unwrap_or(0)
}

/// The `dovecot` binary, or a failure that says how to install it: these tests never
/// pass silently on a machine without Dovecot.
fn dovecot_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // /usr/sbin is not on every user's PATH, and Debian puts dovecot there.
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("dovecot"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p,
        None => panic!(
            "Dovecot is not installed, and the suite proves the exporter against it: \
             install it with `sudo {INSTALL}` (scripts/test does this when run as root)"
        ),
    }
}

/// Dovecot drops privileges to `dovecot`/`dovenull`, which only root can do; CI runs as
/// root. (`/proc/self` is owned by the process's user.)
fn assert_root() {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    assert_eq!(
        uid, 0,
        "the Dovecot tests start Dovecot, which must run as root (as CI and scripts/test do)"
    );
}

/// A private Dovecot instance. Dropping it stops it.
pub struct Dovecot {
    dir: tempfile::TempDir,
    child: Option<Child>,
    ports: [u16; 6],
    ca_pem: String,
    relay: tokio::task::JoinHandle<()>,
}

impl Dovecot {
    /// Starts Dovecot with its `oauth2` passdb asking `introspection_url`, and waits until
    /// every listener accepts connections.
    pub async fn start(introspection_url: &str) -> Dovecot {
        let bin = dovecot_binary();
        assert_root();
        let (relay, relay_port) = start_relay().await;
        // A port found free may be taken before Dovecot binds it: try again with others.
        let mut last_failure = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let ports = free_ports();
            let ca_pem = write_files(dir.path(), &ports, relay_port, introspection_url);
            let child = std::process::Command::new(&bin)
                .arg("-F")
                .arg("-c")
                .arg(dir.path().join("dovecot.conf"))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.path().join("stdout.txt")).expect("stdout"))
                .stderr(std::fs::File::create(dir.path().join("stderr.txt")).expect("stderr"))
                .spawn()
                .expect("dovecot starts");
            let mut d = Dovecot {
                dir,
                child: Some(child),
                ports,
                ca_pem,
                relay: tokio::spawn(async {}),
            };
            match d.wait_ready().await {
                Ok(()) => {
                    d.relay = relay;
                    return d;
                }
                Err(e) => {
                    last_failure = e;
                    if !last_failure.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        relay.abort();
        panic!("Dovecot did not start:\n{last_failure}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("dovecot exited ({status}):\n{}", self.log()));
            }
            let mut up = 0;
            for port in self.ports {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    up += 1;
                }
            }
            if up == self.ports.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("listeners not up after 30 s:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn port(&self, p: Protocol, t: TlsMode) -> u16 {
        self.ports[slot(p, t)]
    }

    /// The CA that issued Dovecot's certificate (for `tls.ca_file`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// An endpoint of the exporter's config, as a YAML flow mapping.
    pub fn endpoint_yaml(&self, p: Protocol, t: TlsMode, source: Option<&str>) -> String {
        let tls = match t {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
        };
        let source = source
            .map(|s| format!(", source_address: {s}"))
            .unwrap_or_default();
        format!(
            "{{ host: 127.0.0.1, port: {}, tls: {tls}{source} }}",
            self.port(p, t)
        )
    }

    /// Dovecot's log and its stdout/stderr, for failure messages.
    pub fn log(&self) -> String {
        ["dovecot.log", "stdout.txt", "stderr.txt"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops Dovecot and waits until none of its ports accepts a connection.
    pub async fn stop(&mut self) {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in self.ports {
            while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "port {port} still open after stop"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// SIGTERM, so that the master stops its children (a killed master leaves them
    /// holding the listening sockets for a while), then SIGKILL if it hangs.
    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.terminate();
        self.relay.abort();
    }
}

/// Six ports that were free a moment ago on 127.0.0.1.
fn free_ports() -> [u16; 6] {
    let listeners: Vec<std::net::TcpListener> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut ports = [0; 6];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().expect("addr").port();
    }
    ports
}

/// Writes the certificate, key, passdb args and `dovecot.conf`; returns the CA's PEM.
fn write_files(dir: &Path, ports: &[u16; 6], relay_port: u16, introspection_url: &str) -> String {
    // Dovecot's unprivileged processes (dovenull, dovecot) must reach the sockets and
    // files in here; the temp dir starts as 0700.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ca = TestCa::named("Dovecot test CA").expect("CA");
    let leaf = ca.issue_server(&["mail.test"]).expect("leaf");
    std::fs::write(dir.join("cert.pem"), leaf.chain_pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), leaf.key_pem()).expect("key");
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod key");
    // Mail homes are created by the mail processes, which run as `dovecot`.
    let home = dir.join("home");
    std::fs::create_dir(&home).expect("home");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o1777)).expect("chmod");

    // Introspection (RFC 7662) rather than Dovecot's local JWT validation: the emulated
    // endpoint issues opaque tokens, and asking it at every login means a revoked or
    // expired token fails at once, judged exactly as the emulated mail servers judge it;
    // local validation could not see a revocation before the token's own expiry.
    let oauth2 = format!(
        "introspection_mode = post\n\
         introspection_url = {introspection_url}\n\
         # RFC 7662's name for the resource owner; it must equal the SASL user.\n\
         username_attribute = username\n\
         active_attribute = active\n\
         active_value = true\n\
         timeout_msecs = 10000\n"
    );
    std::fs::write(dir.join("oauth2.conf.ext"), oauth2).expect("oauth2 conf");

    let mut listeners = String::new();
    for service in ["imap-login", "pop3-login", "submission-login"] {
        listeners.push_str(&format!("service {service} {{\n"));
        for (i, (_, tls, svc, name)) in LISTENERS.iter().enumerate() {
            if *svc == service {
                let ssl = if *tls == TlsMode::Implicit {
                    "    ssl = yes\n"
                } else {
                    ""
                };
                listeners.push_str(&format!(
                    "  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {}\n{ssl}  }}\n",
                    ports[i]
                ));
            }
        }
        listeners.push_str("}\n");
    }
    let d = dir.display();
    let conf = format!(
        "# Written by tests/integration/dovecot.rs: a private instance, never the system one.\n\
         protocols = imap pop3 submission\n\
         listen = 127.0.0.1\n\
         base_dir = {d}/run\n\
         state_dir = {d}/state\n\
         instance_name = mail-oauth-exporter-test\n\
         log_path = {d}/dovecot.log\n\
         hostname = mail.test\n\
         default_internal_user = dovecot\n\
         default_login_user = dovenull\n\
         ssl = required\n\
         ssl_cert = <{d}/cert.pem\n\
         ssl_key = <{d}/key.pem\n\
         ssl_min_protocol = TLSv1.2\n\
         auth_mechanisms = xoauth2 oauthbearer\n\
         # Without this a revoked token keeps working until the cache entry expires.\n\
         auth_cache_size = 0\n\
         # Every failure would wait 2 s; the tests provoke many.\n\
         auth_failure_delay = 0\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {d}/oauth2.conf.ext\n}}\n\
         # Post-auth checks (EXAMINE INBOX, STAT) need a mailbox: an empty Maildir per user.\n\
         userdb {{\n  driver = static\n  args = uid=dovecot gid=dovecot home={d}/home/%u\n}}\n\
         mail_location = maildir:~/Maildir\n\
         # The `dovecot` user's uid is below the default minimum of 500.\n\
         first_valid_uid = 1\n\
         # Submission connects to its relay at login; NOOP fails without one. A stub.\n\
         submission_relay_host = 127.0.0.1\n\
         submission_relay_port = {relay_port}\n\
         # Repeated failures from one address would be delayed 2, 4, 8, 15 s.\n\
         service anvil {{\n  unix_listener anvil-auth-penalty {{\n    mode = 0\n  }}\n}}\n\
         {listeners}"
    );
    std::fs::write(dir.join("dovecot.conf"), conf).expect("dovecot.conf");
    ca.ca_pem().to_string()
}

/// A stub SMTP relay for submission: greets, accepts every command, says goodbye to QUIT.
async fn start_relay() -> (tokio::task::JoinHandle<()>, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
    let port = listener.local_addr().expect("relay addr").port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 relay.test ESMTP\r\n").await.ok()?;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-relay.test\r\n250 PIPELINING\r\n",
                        "QUIT" => b"221 2.0.0 Bye\r\n",
                        _ => b"250 2.0.0 OK\r\n",
                    };
                    w.write_all(reply).await.ok()?;
                    if verb == "QUIT" {
                        break;
                    }
                }
                Some(())
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (task, port)
}

// ---------------------------------------------------------------------------
// The exporter around it.

/// One mailbox of the exporter's config.
pub struct Mailbox<'a> {
    pub name: &'a str,
    /// `delegated` (refresh token from the emulated endpoint) or `file` (token file).
    pub credential: &'a str,
    pub protocols: &'a [Protocol],
    pub tls: TlsMode,
    pub mechanism: Mechanism,
    /// Connect from this address (`Some(REMOTE)` to look like a remote client).
    pub source: Option<&'a str>,
}

/// The emulated token endpoint, a Dovecot checking its tokens, and an exporter config.
pub struct World {
    pub ep: Arc<TokenEndpoint>,
    pub dovecot: Dovecot,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Every stdout and stderr the binary printed, to be scanned for secrets.
    pub outputs: Vec<String>,
}

impl World {
    pub async fn start() -> World {
        let ep = Arc::new(TokenEndpoint::start().await.expect("token endpoint"));
        ep.add_client(ClientSpec {
            id: CLIENT_ID.into(),
            grants: vec![EmuGrant::RefreshToken],
            ..Default::default()
        });
        ep.set_access_token_length(REAL_TOKEN_LEN);
        let dovecot = Dovecot::start(&ep.introspection_url()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), dovecot.ca_pem()).expect("ca.pem");
        let config = dir.path().join("config.yaml");
        World {
            ep,
            dovecot,
            dir,
            config,
            outputs: Vec::new(),
        }
    }

    /// Writes the config: credentials `delegated` (Microsoft-style, pointed at the
    /// emulated endpoint) and `file` (the token in `token`), and `mailboxes`.
    pub fn write_config(&self, mailboxes: &[Mailbox<'_>]) {
        let d = self.dir.path().display();
        let mut yaml = format!(
            "state_dir: {d}/state\n\
             tls:\n  ca_file: {d}/ca.pem\n\
             credentials:\n\
             \x20 delegated:\n    provider: microsoft\n    tenant: contoso\n    authority: {auth}\n    client_id: {CLIENT_ID}\n    grant: refresh_token\n\
             \x20 file:\n    grant: token_file\n    token_file: {d}/token\n\
             mailboxes:\n",
            auth = self.ep.authority(),
        );
        for m in mailboxes {
            let protocols: Vec<&str> = m.protocols.iter().map(|p| p.as_str()).collect();
            yaml.push_str(&format!(
                "  {}:\n    address: {USER}\n    credential: {}\n    protocols: [{}]\n    mechanism: {}\n    timeout: 20s\n",
                m.name,
                m.credential,
                protocols.join(", "),
                m.mechanism.as_str(),
            ));
            for p in m.protocols {
                yaml.push_str(&format!(
                    "    {}: {}\n",
                    p.as_str(),
                    self.dovecot.endpoint_yaml(*p, m.tls, m.source)
                ));
            }
        }
        std::fs::write(&self.config, yaml).expect("config");
    }

    /// Signs the `delegated` credential in, as `login --refresh-token-file` does after a
    /// sign-in elsewhere.
    pub async fn login(&mut self) {
        let rt = self.ep.add_user(USER, CLIENT_ID, &[]);
        let file = self.dir.path().join("imported");
        std::fs::write(&file, &rt).expect("refresh token file");
        let file = file.to_str().expect("utf-8 path").to_owned();
        let (code, out) = self
            .run(&[
                "login",
                "--credential",
                "delegated",
                "--refresh-token-file",
                &file,
            ])
            .await;
        assert_eq!(code, 0, "{out}");
    }

    /// Puts `token` in the `file` credential's token file.
    pub fn set_token_file(&self, token: &str) {
        std::fs::write(self.dir.path().join("token"), format!("{token}\n")).expect("token");
    }

    /// Runs the binary with `args` and `--config`; returns its exit code and output.
    pub async fn run(&mut self, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .await
            .expect("binary runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.outputs.push(text.clone());
        (out.status.code().unwrap_or(-1), text)
    }

    pub async fn probe(&mut self, mailbox: &str) -> (i32, String) {
        self.run(&["probe", "--mailbox", mailbox]).await
    }

    /// Fails if any output of the binary or Dovecot's log holds a token.
    pub fn assert_no_secret_leaked(&self) {
        let mut secrets = self.ep.all_access_tokens();
        secrets.extend(self.ep.all_refresh_tokens());
        assert!(!secrets.is_empty());
        let printed = self.outputs.join("\n");
        let log = self.dovecot.log();
        for s in &secrets {
            assert!(!printed.contains(s.as_str()), "token printed:\n{printed}");
            assert!(!log.contains(s.as_str()), "token in Dovecot's log:\n{log}");
        }
    }
}

/// The output of `probe` split into one block per protocol (each starts with `probe `).
fn blocks(out: &str) -> Vec<&str> {
    let mut starts: Vec<usize> = out.match_indices("probe      ").map(|(i, _)| i).collect();
    starts.push(out.len());
    starts.windows(2).map(|w| &out[w[0]..w[1]]).collect()
}

/// A block's value of a `name       value` line.
fn field<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    block
        .lines()
        .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
        .map(str::trim)
}

/// Every phase up to `last` timed (a number, not `-`).
fn assert_phases(block: &str, expected: &[&str]) {
    let phases = field(block, "phases").unwrap_or_else(|| panic!("no phases:\n{block}"));
    for p in expected {
        let value = phases
            .split("  ")
            .find_map(|kv| kv.strip_prefix(&format!("{p} ")))
            .unwrap_or_else(|| panic!("phase {p} missing:\n{block}"));
        assert!(value.ends_with("ms"), "phase {p} not timed:\n{block}");
    }
}

const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

// ---------------------------------------------------------------------------
// Tests.

/// Every protocol × TLS mode × mechanism logs in, with realistic (1,800-character)
/// tokens the exporter obtained itself and Dovecot checked with the token endpoint.
#[tokio::test]
async fn probe_logs_in_on_every_protocol_tls_mode_and_mechanism() {
    let mut w = World::start().await;
    let mut names = Vec::new();
    for tls in [TlsMode::Implicit, TlsMode::Starttls] {
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            names.push((format!("{}-{}", tls.as_str(), mech.as_str()), tls, mech));
        }
    }
    let mailboxes: Vec<Mailbox<'_>> = names
        .iter()
        .map(|(name, tls, mech)| Mailbox {
            name,
            credential: "delegated",
            protocols: &ALL,
            tls: *tls,
            mechanism: *mech,
            source: Some(REMOTE),
        })
        .collect();
    w.write_config(&mailboxes);
    w.login().await;
    for (name, tls, mech) in &names {
        let before = w.ep.introspection_count();
        let (code, out) = w.probe(name).await;
        let log = w.dovecot.log();
        assert_eq!(code, 0, "{name}:\n{out}\nDovecot's log:\n{log}");
        let blocks = blocks(&out);
        assert_eq!(blocks.len(), 3, "{out}");
        for b in blocks {
            assert_eq!(field(b, "result"), Some("OK"), "{b}");
            let mut phases = vec!["resolve", "connect", "tls", "greeting", "capability"];
            phases.extend(["auth", "post_auth"]);
            assert_phases(b, &phases);
            assert!(b.contains("Dovecot"), "not Dovecot's greeting:\n{b}");
            assert!(
                b.contains(&format!(" {} <redacted>", mech.sasl_name()))
                    || b.contains("C: <redacted>"),
                "{b}"
            );
            if *tls == TlsMode::Starttls {
                // From a remote address Dovecot offers no mechanism before TLS.
                let clear = b.split("TLS established").next().unwrap_or("");
                assert!(!clear.contains(mech.sasl_name()), "offered in clear:\n{b}");
            }
        }
        // Dovecot asked the token endpoint about each login: a real check, not a stub.
        assert_eq!(w.ep.introspection_count() - before, 3, "{name}");
    }
    // Long tokens go after `334` on submission (its line limit), inline elsewhere.
    let (_, out) = w.probe("starttls-xoauth2").await;
    assert!(
        out.contains("C: AUTH XOAUTH2\n") || out.contains("C: AUTH XOAUTH2\r"),
        "{out}"
    );
    assert!(out.contains("S: 334 "), "{out}");
    w.assert_no_secret_leaked();
}

/// A local client (Dovecot's own address) is offered XOAUTH2 in clear; the token still
/// goes only after STARTTLS.
#[tokio::test]
async fn no_token_before_starttls_even_when_dovecot_offers_the_mechanism_in_clear() {
    let mut w = World::start().await;
    w.write_config(&[Mailbox {
        name: "local",
        credential: "delegated",
        protocols: &ALL,
        tls: TlsMode::Starttls,
        mechanism: Mechanism::Xoauth2,
        source: None,
    }]);
    w.login().await;
    let (code, out) = w.probe("local").await;
    assert_eq!(code, 0, "{out}");
    for b in blocks(&out) {
        let (clear, secure) = b
            .split_once("TLS established")
            .unwrap_or_else(|| panic!("no STARTTLS:\n{b}"));
        assert!(
            clear.contains("XOAUTH2"),
            "Dovecot offered it in clear:\n{b}"
        );
        assert!(!clear.contains("<redacted>"), "token before TLS:\n{b}");
        assert!(secure.contains("<redacted>"), "{b}");
    }
}

/// A revoked or expired token is `auth_rejected`, with Dovecot's reply and its error
/// challenge as detail, on every protocol and with both mechanisms.
#[tokio::test]
async fn revoked_and_expired_tokens_are_auth_rejected_with_dovecots_reply() {
    let mut w = World::start().await;
    let mailboxes: Vec<Mailbox<'_>> = [
        ("xoauth2", Mechanism::Xoauth2),
        ("oauthbearer", Mechanism::Oauthbearer),
    ]
    .iter()
    .map(|(name, mech)| Mailbox {
        name,
        credential: "file",
        protocols: &ALL,
        tls: TlsMode::Implicit,
        mechanism: *mech,
        source: Some(REMOTE),
    })
    .collect();
    w.write_config(&mailboxes);
    let token = w.ep.issue_access_token(CLIENT_ID, Some(USER), &[]);
    w.set_token_file(&token);
    let (code, out) = w.probe("xoauth2").await;
    assert_eq!(code, 0, "a live token logs in first:\n{out}");

    let expired = w.ep.issue_access_token(CLIENT_ID, Some(USER), &[]);
    w.ep.expire_access_token(&expired);
    w.ep.revoke_access_token(&token);
    for t in [&token, &expired] {
        w.set_token_file(t);
        for (mailbox, challenge) in [
            (
                "xoauth2",
                r#"{"status":"401","schemes":"bearer","scope":"mail"}"#,
            ),
            ("oauthbearer", r#"{"status":"invalid_token"}"#),
        ] {
            let (code, out) = w.probe(mailbox).await;
            assert_eq!(code, 1, "{out}");
            let replies = [
                "A01 NO [AUTHENTICATIONFAILED] Authentication failed.",
                "-ERR [AUTH] Authentication failed.",
                "535 5.7.8 Authentication failed.",
            ];
            for (b, reply) in blocks(&out).into_iter().zip(replies) {
                assert!(
                    b.contains("result     FAILED: auth_rejected (stage auth, permanent)"),
                    "{b}"
                );
                let detail = field(b, "detail").unwrap_or_default();
                assert!(detail.contains(reply), "{detail}");
                assert!(detail.contains(challenge), "{detail}");
                assert_phases(b, &["connect", "tls", "greeting", "auth"]);
            }
        }
    }
    w.assert_no_secret_leaked();
}

/// The token endpoint failing (Dovecot's introspection gets a 503) is a temporary
/// failure on Dovecot's side: `server_unavailable`, transient.
#[tokio::test]
async fn introspection_failure_is_server_unavailable() {
    let mut w = World::start().await;
    w.write_config(&[Mailbox {
        name: "m",
        credential: "file",
        protocols: &ALL,
        tls: TlsMode::Implicit,
        mechanism: Mechanism::Xoauth2,
        source: Some(REMOTE),
    }]);
    w.set_token_file(&w.ep.issue_access_token(CLIENT_ID, Some(USER), &[]));
    w.ep.script_always(Target::Introspection, Scripted::ServerError(503));
    let (code, out) = w.probe("m").await;
    assert_eq!(code, 1, "{out}");
    let replies = [
        "A01 NO [UNAVAILABLE] Temporary authentication failure.",
        "-ERR [SYS/TEMP] Temporary authentication failure.",
        "454 4.7.0 Temporary authentication failure.",
    ];
    for (b, reply) in blocks(&out).into_iter().zip(replies) {
        assert!(
            b.contains("result     FAILED: server_unavailable (stage protocol, transient)"),
            "{b}"
        );
        assert!(
            field(b, "detail").unwrap_or_default().contains(reply),
            "{b}"
        );
    }
}

/// Dovecot stopped: `connect_refused`, with the connect phase timed.
#[tokio::test]
async fn stopped_dovecot_is_connect_refused() {
    let mut w = World::start().await;
    w.write_config(&[Mailbox {
        name: "m",
        credential: "delegated",
        protocols: &ALL,
        tls: TlsMode::Starttls,
        mechanism: Mechanism::Oauthbearer,
        source: Some(REMOTE),
    }]);
    w.login().await;
    let (code, out) = w.probe("m").await;
    assert_eq!(code, 0, "{out}");
    w.dovecot.stop().await;
    let (code, out) = w.probe("m").await;
    assert_eq!(code, 1, "{out}");
    for b in blocks(&out) {
        assert!(
            b.contains("result     FAILED: connect_refused (stage connect, transient)"),
            "{b}"
        );
        assert_phases(b, &["resolve"]);
    }
}

// ---------------------------------------------------------------------------
// What Dovecot really sends, recorded by a bare client of our own.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A bare line client that records the dialogue, the client's SASL strings replaced by
/// `<b64>` and Dovecot's `[host:time]` suffix by `[<host>:<time>]`.
struct Raw {
    io: BufReader<Box<dyn Io>>,
    log: Vec<String>,
}

impl Raw {
    async fn connect(port: u16, tls: Option<&TlsClient>, source: &str) -> Raw {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind((source.parse::<std::net::IpAddr>().expect("ip"), 0).into())
            .expect("bind source");
        let tcp = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        let io: Box<dyn Io> = match tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
                let connector = tokio_rustls::TlsConnector::from(tls.config().clone());
                Box::new(connector.connect(name, tcp).await.expect("TLS"))
            }
        };
        Raw {
            io: BufReader::new(io),
            log: Vec::new(),
        }
    }

    async fn line(&mut self) -> String {
        let mut buf = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut buf))
            .await
            .expect("Dovecot answers within 10 s")
            .expect("read");
        assert!(
            read > 0,
            "Dovecot closed the connection:\n{}",
            self.log.join("\n")
        );
        let line = buf.trim_end_matches(['\r', '\n']).to_owned();
        self.log.push(format!("S: {}", normalise(&line)));
        // An error challenge is base64 JSON: show it decoded too.
        let b64 = line
            .strip_prefix("+ ")
            .or_else(|| line.strip_prefix("334 "));
        if let Some(json) = b64.and_then(mail_oauth_exporter::probe::sasl::decode_challenge) {
            self.log.push(format!("   = {json}"));
        }
        line
    }

    /// Reads SMTP reply lines up to the last one (`250 ...` after `250-...`).
    async fn smtp_reply(&mut self) -> String {
        loop {
            let line = self.line().await;
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    async fn send(&mut self, line: &str, shown: &str) {
        self.log.push(format!("C: {shown}"));
        let io = self.io.get_mut();
        io.write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        io.flush().await.expect("flush");
    }
}

/// `... failure. [vm:2026-11-21 22:02:51]` → `... failure. [<host>:<time>]`.
fn normalise(line: &str) -> String {
    match line.rfind(" [") {
        Some(i) if line.ends_with(']') && line[i..].contains(':') && !line[i..].contains('=') => {
            format!("{} [<host>:<time>]", &line[..i])
        }
        _ => line.to_owned(),
    }
}

/// One SASL login on implicit TLS from [`REMOTE`], answering an error challenge with
/// `answer` (`None`: what the mechanism prescribes). Returns the recorded dialogue.
async fn login_dialogue(
    d: &Dovecot,
    tls: &TlsClient,
    p: Protocol,
    mech: Mechanism,
    token: &str,
    answer: Option<&str>,
) -> Vec<String> {
    let secret = mail_oauth_exporter::Secret::new(token);
    let ir =
        mail_oauth_exporter::probe::sasl::initial_response(mech, USER, &secret, "127.0.0.1", 1);
    let ir = ir.expose();
    let ack = answer.unwrap_or(mail_oauth_exporter::probe::sasl::error_challenge_answer(
        mech,
    ));
    let name = mech.sasl_name();
    let mut c = Raw::connect(d.port(p, TlsMode::Implicit), Some(tls), REMOTE).await;
    match p {
        Protocol::Imap => {
            c.line().await;
            c.send(
                &format!("A01 AUTHENTICATE {name} {ir}"),
                &format!("A01 AUTHENTICATE {name} <b64>"),
            )
            .await;
            if c.line().await.starts_with("+ ") {
                c.send(ack, ack).await;
                c.line().await;
            }
        }
        Protocol::Pop3 => {
            c.line().await;
            c.send(&format!("AUTH {name}"), &format!("AUTH {name}"))
                .await;
            c.line().await;
            c.send(ir, "<b64>").await;
            if c.line().await.starts_with("+ ") {
                c.send(ack, ack).await;
                c.line().await;
            }
        }
        Protocol::Smtp => {
            c.smtp_reply().await;
            c.send("EHLO [127.0.0.2]", "EHLO [127.0.0.2]").await;
            c.smtp_reply().await;
            c.send(&format!("AUTH {name} {ir}"), &format!("AUTH {name} <b64>"))
                .await;
            if c.smtp_reply().await.starts_with("334 ") {
                c.send(ack, ack).await;
                c.smtp_reply().await;
            }
        }
    }
    c.log
}

/// Whether submission accepts an `AUTH XOAUTH2 <response>` line of `len` octets (CRLF
/// not counted): anything but `500 5.5.2 Line too long` counts as accepted.
async fn submission_accepts(
    d: &Dovecot,
    tls: &TlsClient,
    mech: Mechanism,
    len: usize,
) -> (bool, String) {
    let mut c = Raw::connect(d.port(Protocol::Smtp, TlsMode::Implicit), Some(tls), REMOTE).await;
    c.smtp_reply().await;
    c.send("EHLO [127.0.0.2]", "").await;
    c.smtp_reply().await;
    let prefix = format!("AUTH {} ", mech.sasl_name());
    // Valid base64 of nothing in particular: the length is checked before the content.
    let line = format!("{prefix}{}", "A".repeat(len - prefix.len()));
    c.send(&line, "").await;
    let reply = c.smtp_reply().await;
    (!reply.starts_with("500 5.5.2"), reply)
}

/// Records what Dovecot sends on failure and compares it with the fixture, so that the
/// fixture stays what this Dovecot really says. `DOVECOT_RECORD=1` rewrites the fixture.
#[tokio::test]
async fn dovecot_replies_match_the_recorded_fixture() {
    let ep = TokenEndpoint::start().await.expect("endpoint");
    let d = Dovecot::start(&ep.introspection_url()).await;
    let tls = TlsClient::with_ca_pem(d.ca_pem().as_bytes()).expect("CA");
    let mut out = vec![
        "# What Dovecot 2.3.19 (Debian 12) sends to XOAUTH2/OAUTHBEARER clients, recorded by"
            .to_string(),
        "# tests/integration/dovecot.rs against its oauth2 passdb (RFC 7662 introspection).".into(),
        "# Rewrite with: DOVECOT_RECORD=1 cargo test --test integration dovecot_replies".into(),
        "# <b64>: the client's SASL response; [<host>:<time>]: Dovecot's system host name and"
            .into(),
        "# local time. Implicit TLS, from 127.0.0.2 unless said otherwise.".into(),
    ];
    let unknown = "a-token-the-endpoint-never-issued";
    for p in ALL {
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            out.push(String::new());
            out.push(format!(
                "== {p} {}: introspection says {{\"active\": false}}",
                mech.as_str()
            ));
            out.extend(login_dialogue(&d, &tls, p, mech, unknown, None).await);
        }
    }
    for p in ALL {
        out.push(String::new());
        out.push(format!(
            "== {p} xoauth2: the error challenge answered with AQ== instead of an empty line"
        ));
        out.extend(login_dialogue(&d, &tls, p, Mechanism::Xoauth2, unknown, Some("AQ==")).await);
    }
    ep.script_always(Target::Introspection, Scripted::ServerError(503));
    for p in ALL {
        out.push(String::new());
        out.push(format!(
            "== {p} xoauth2: introspection answers HTTP 503 (a temporary failure)"
        ));
        out.extend(login_dialogue(&d, &tls, p, Mechanism::Xoauth2, unknown, None).await);
    }
    ep.clear_scripts();

    // Submission's line limit, found by bisection: accepted at `lo`, refused at `hi`.
    out.push(String::new());
    out.push("== submission: the longest AUTH command line accepted (CRLF not counted)".into());
    for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
        let (mut lo, mut hi) = (100, 4000);
        assert!(submission_accepts(&d, &tls, mech, lo).await.0);
        let (accepted, too_long) = submission_accepts(&d, &tls, mech, hi).await;
        assert!(!accepted, "{too_long}");
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if submission_accepts(&d, &tls, mech, mid).await.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        out.push(format!(
            "AUTH {}: {lo} octets; {hi} octets: {too_long}",
            mech.sasl_name()
        ));
        // The emulator's Dovecot-like limit is this one.
        assert_eq!(
            lo,
            mail_oauth_exporter::emulator::DOVECOT_SMTP_MAX_AUTH_LINE,
            "{}",
            mech.sasl_name()
        );
    }

    // In clear, Dovecot counts a client from its own address as secured.
    for source in ["127.0.0.1", REMOTE] {
        out.push(String::new());
        out.push(format!(
            "== in clear on the STARTTLS ports, from {source}: the mechanisms offered"
        ));
        let mut c = Raw::connect(d.port(Protocol::Imap, TlsMode::Starttls), None, source).await;
        c.line().await;
        out.extend(c.log);
        let mut c = Raw::connect(d.port(Protocol::Pop3, TlsMode::Starttls), None, source).await;
        c.line().await;
        c.send("CAPA", "CAPA").await;
        while c.line().await != "." {}
        out.extend(
            c.log
                .into_iter()
                .filter(|l| l.starts_with("S: SASL") || l.starts_with("S: +OK D")),
        );
        let mut c = Raw::connect(d.port(Protocol::Smtp, TlsMode::Starttls), None, source).await;
        c.smtp_reply().await;
        c.send("EHLO [127.0.0.2]", "EHLO [127.0.0.2]").await;
        c.smtp_reply().await;
        out.extend(
            c.log
                .into_iter()
                .filter(|l| l.contains("AUTH") || l.contains("STARTTLS")),
        );
    }
    let recorded = out.join("\n") + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    if std::env::var_os("DOVECOT_RECORD").is_some() {
        std::fs::write(&path, &recorded).expect("write fixture");
    }
    let fixture = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        recorded, fixture,
        "Dovecot's replies differ from {FIXTURE}: check the difference and re-record with \
         DOVECOT_RECORD=1 cargo test --test integration dovecot_replies"
    );
}

/// The introspection endpoint Dovecot asks, on its own (needs no Dovecot): RFC 7662's
/// answers, inactive tokens as HTTP 200 `{"active": false}`.
#[tokio::test]
async fn introspection_answers_as_rfc_7662_says() {
    let ep = TokenEndpoint::start().await.expect("endpoint");
    let live = ep.issue_access_token(CLIENT_ID, Some(USER), &["IMAP.AccessAsUser.All"]);
    let revoked = ep.issue_access_token(CLIENT_ID, Some(USER), &[]);
    let expired = ep.issue_access_token(CLIENT_ID, Some(USER), &[]);
    let app = ep.issue_access_token("app", None, &[]);
    ep.revoke_access_token(&revoked);
    ep.expire_access_token(&expired);
    let client = reqwest::Client::new();
    let ask = |token: &str| {
        client
            .post(ep.introspection_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };
    let body = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200);
        let bytes = r.bytes().await.expect("body");
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("JSON")
    };
    let v = body(ask(&live).await.expect("post")).await;
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["username"], USER, "{v}");
    assert_eq!(v["client_id"], CLIENT_ID, "{v}");
    assert_eq!(v["scope"], "IMAP.AccessAsUser.All", "{v}");
    assert!(v["exp"].as_u64().is_some(), "{v}");
    for t in [&revoked, &expired, "never-issued"] {
        let v = body(ask(t).await.expect("post")).await;
        assert_eq!(v, serde_json::json!({"active": false}));
    }
    // An application token has no user to name.
    let v = body(ask(&app).await.expect("post")).await;
    assert_eq!(v["active"], true, "{v}");
    assert!(v.get("username").is_none(), "{v}");
    let r = client
        .post(ep.introspection_url())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let r = client
        .get(ep.introspection_url())
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 405);
    assert_eq!(ep.introspection_count(), 7);
    // The emulated mail servers agree with introspection.
    assert!(ep.validate(&live).is_some());
    assert!(ep.validate(&revoked).is_none());
    assert!(ep.validate(&expired).is_none());
    assert!(live.len() < 100, "no padding unless asked");
    ep.set_access_token_length(REAL_TOKEN_LEN);
    assert_eq!(
        ep.issue_access_token(CLIENT_ID, Some(USER), &[]).len(),
        REAL_TOKEN_LEN
    );
}

/// The service (`run`) against Dovecot: every protocol × TLS mode × mechanism shows `ok`
/// in `/metrics` with its phases; the tokens in the service's cache revoked at the token
/// endpoint turn into `auth_rejected` with Dovecot's reply on the status API; Dovecot
/// stopped turns into `connect_refused`; SIGTERM exits 0; no token in any output.
#[tokio::test]
async fn run_reports_dovecot_logins_rejections_and_outage() {
    use crate::demo::{find, get, parse_metrics, wait_ok};
    let mut w = World::start().await;
    let mut names = Vec::new();
    for tls in [TlsMode::Implicit, TlsMode::Starttls] {
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            names.push((format!("{}-{}", tls.as_str(), mech.as_str()), tls, mech));
        }
    }
    let mailboxes: Vec<Mailbox<'_>> = names
        .iter()
        .map(|(name, tls, mech)| Mailbox {
            name,
            credential: "delegated",
            protocols: &ALL,
            tls: *tls,
            mechanism: *mech,
            source: Some(REMOTE),
        })
        .collect();
    w.write_config(&mailboxes);
    // Short rounds, first runs within a second.
    let text = std::fs::read_to_string(&w.config).unwrap();
    let text = text.replace("    timeout: 20s\n", "    timeout: 4s\n    interval: 5s\n");
    std::fs::write(
        &w.config,
        format!("scheduler:\n  startup_spread: 1s\n  jitter: 0s\n{text}"),
    )
    .unwrap();
    w.login().await;

    let (mut child, base, logs) = crate::demo::spawn_run(&w.config).await;

    wait_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    let m = parse_metrics(&get(&format!("{base}/metrics")).await.1);
    for (name, _, _) in &names {
        for p in ALL {
            let labels = [("mailbox", name.as_str()), ("protocol", p.as_str())];
            let r = find(&m, "mail_oauth_probe_result", &labels);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].labels["reason"], "ok", "{name} {p}: {r:?}");
            for phase in [
                "connect",
                "tls",
                "greeting",
                "capability",
                "auth",
                "post_auth",
            ] {
                let mut l = labels.to_vec();
                l.push(("phase", phase));
                let s = find(&m, "mail_oauth_probe_phase_seconds", &l);
                assert!(
                    s.first().is_some_and(|s| s.value > 0.0),
                    "{name} {p} {phase}"
                );
            }
        }
    }

    // Revoked at the token endpoint while cached in the service: Dovecot refuses them.
    for t in w.ep.all_access_tokens() {
        w.ep.revoke_access_token(&t);
    }
    let reasons = async |want: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = parse_metrics(&get(&format!("{base}/metrics")).await.1);
            let results = find(&m, "mail_oauth_probe_result", &[]);
            if results.len() == names.len() * 3
                && results.iter().all(|s| s.labels["reason"] == want)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not all {want} within 30 s: {:?}",
                results
                    .iter()
                    .map(|s| (
                        &s.labels["mailbox"],
                        &s.labels["protocol"],
                        &s.labels["reason"]
                    ))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    reasons("auth_rejected").await;
    let (_, body) = get(&format!("{base}/api/v1/status")).await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    for row in status["probes"].as_array().unwrap() {
        let detail = row["detail"].as_str().unwrap_or_default();
        let reply = match row["protocol"].as_str().unwrap() {
            "imap" => "NO [AUTHENTICATIONFAILED] Authentication failed.",
            "pop3" => "-ERR [AUTH] Authentication failed.",
            _ => "535 5.7.8 Authentication failed.",
        };
        assert!(detail.contains(reply), "{row}");
    }

    w.outputs.push(get(&format!("{base}/metrics")).await.1);
    w.dovecot.stop().await;
    reasons("connect_refused").await;

    crate::demo::signal_pid(child.id().unwrap(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs = logs.await.unwrap();
    assert!(
        logs.contains("\"reason\":\"auth_rejected\""),
        "one event per probe result"
    );
    w.outputs.push(logs);
    w.outputs.push(body);
    w.assert_no_secret_leaked();
}
