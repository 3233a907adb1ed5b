//! An emulated mail provider (IMAP, POP3 and SMTP servers speaking like Exchange Online,
//! with Gmail-style failures) on loopback, for tests and the `demo` command.
//!
//! # Starting
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use mail_oauth_exporter::emulator::{
//!     Behaviour, Emulator, EmulatorOptions, Proto, StaticTokens, TlsKind,
//! };
//! let mut options = EmulatorOptions::new(Arc::new(StaticTokens::new(["good-token"])));
//! options.users.insert("blocked@contoso.com".into(), Behaviour::TokenRefused);
//! let emu = Emulator::start(options).await?;
//! let imaps = emu.addr(Proto::Imap, TlsKind::Implicit); // like outlook.office365.com:993
//! let ca_pem = emu.ca_pem(); // trust this (or `emu.write_ca_pem(path)`) in the client
//! # let _ = (imaps, ca_pem);
//! emu.shutdown(); // or drop it
//! # Ok(()) }
//! ```
//!
//! [`Emulator::start`] binds six listeners on `127.0.0.1:0`: IMAP implicit TLS (993-like)
//! and plain + STARTTLS (143-like), POP3 implicit (995) and plain + STLS (110), SMTP plain +
//! STARTTLS (587) and implicit (465). The server certificate is issued at start by a fresh
//! [`TestCa`] for `localhost`, `127.0.0.1` and [`EmulatorOptions::cert_names`]; see
//! [`CertKind`] for expired, wrong-name and untrusted certificates.
//!
//! # Behaviours
//!
//! The SASL user (lowercased) picks a [`Behaviour`] from [`EmulatorOptions::users`], else
//! [`EmulatorOptions::default_behaviour`]; the token is judged by
//! [`EmulatorOptions::tokens`] (a [`TokenCheck`]). A [`ServerBehaviour`] applies to every
//! connection before any user is known. Both can be changed while running
//! ([`Emulator::set_behaviour`], [`Emulator::set_server_behaviour`]).
//!
//! | behaviour | IMAP | POP3 | SMTP |
//! |---|---|---|---|
//! | refusal | `TAG NO AUTHENTICATE failed.` | `-ERR Authentication failure: unknown user name or bad password.` | `535 5.7.3 Authentication unsuccessful [host]` |
//! | `AuthenticatedNotConnected` | next command: `TAG BAD User is authenticated but not connected.` | next command: `-ERR User is authenticated but not connected.` | next command: `530 5.7.57 Client not authenticated to send mail.` |
//! | `Throttled` | `TAG NO Request is throttled. Suggested Backoff Time: 299961 milliseconds` | `-ERR [IN-USE] Request is throttled.` | `432 4.3.2 Concurrent connections limit exceeded. ...` |
//! | `ErrorChallenge` | `+ <b64 JSON>`, then `TAG NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)` | `+ <b64 JSON>`, then `-ERR [AUTH] Invalid credentials.` | `334 <b64 JSON>`, then `535-5.7.8 ...` / `535 5.7.8 ...` |
//! | `TokenExpiring` | next command: `* BYE Session invalidated - AccessTokenExpired` | next command: `-ERR Session invalidated - AccessTokenExpired` | `501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon` |
//! | `TemporaryFailure` | `TAG NO [UNAVAILABLE] Temporary authentication failure. [host:time]` (Dovecot's words) | `-ERR [SYS/TEMP] Temporary authentication failure. [host:time]` | `454 4.7.0 Cannot authenticate due to temporary system problem. Try again later.` |
//! | `Field(i)` | the reply recorded at index `i` of [`field::replies`], on its protocol and stage (other protocols: as `Success`) | | |
//!
//! | `Echo(_)` | the client's SASL response or token repeated in the refusal, a `BYE` or an error challenge (see [`Echo`]) | same | same |
//!
//! After an error challenge the client must answer with an empty line (XOAUTH2) or `AQ==`
//! (OAUTHBEARER); anything else gets a protocol error (`BAD`, `-ERR`, `501`).
//!
//! Every connection is its own task, with a cap on line length
//! ([`EmulatorOptions::max_line`]) and an idle timeout; the last client lines of each
//! protocol are kept for tests ([`Emulator::received`]). Tokens are never logged through
//! `tracing`.
#![forbid(unsafe_code)]

mod behaviour;
mod ca;
mod conn;
pub mod field;
pub mod graph;
mod imap;
mod pop3;
mod sasl;
mod smtp;
pub mod token_endpoint;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use behaviour::{Behaviour, Echo, ServerBehaviour, StaticTokens, TokenCheck, TokenVerdict};
pub use ca::{CaError, ServerCert, TestCa};

use conn::Conn;

/// The longest SMTP `AUTH` command line (CRLF not counted) Dovecot's submission server
/// accepts before `500 5.5.2 Line too long`, as measured against Dovecot 2.3.19 by
/// `tests/integration/dovecot.rs`: a value for [`EmulatorOptions::smtp_max_auth_line`].
pub const DOVECOT_SMTP_MAX_AUTH_LINE: usize = 1030;

/// The mail protocols served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Imap,
    Pop3,
    Smtp,
}

/// How a listener starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsKind {
    /// TLS from the first byte (993, 995, 465).
    Implicit,
    /// Plain text, upgraded by STARTTLS / STLS (143, 110, 587).
    Starttls,
}

/// Which server certificate the listeners present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertKind {
    /// Issued by the emulator's CA for the loopback names, valid ~90 days.
    #[default]
    Valid,
    /// Issued by the emulator's CA, expired a day ago.
    Expired,
    /// Issued by the emulator's CA for `wrong-name.invalid` only.
    WrongName,
    /// Valid, but issued by another CA than [`Emulator::ca_pem`].
    Untrusted,
}

/// How the emulator is set up.
#[derive(Clone)]
pub struct EmulatorOptions {
    /// Judges tokens.
    pub tokens: Arc<dyn TokenCheck>,
    /// Behaviour per SASL user (keys lowercase).
    pub users: HashMap<String, Behaviour>,
    /// Behaviour of users not in `users`.
    pub default_behaviour: Behaviour,
    /// Server-wide behaviour.
    pub server: ServerBehaviour,
    /// The host name shown in replies.
    pub hostname: String,
    /// Delay of the `Slow` behaviours.
    pub slow_delay: Duration,
    /// Advertise and accept OAUTHBEARER beside XOAUTH2.
    pub advertise_oauthbearer: bool,
    /// Longest SMTP `AUTH` command line accepted (`500 5.5.2 Line too long` beyond);
    /// `None` accepts any line up to `max_line`, as Exchange does.
    pub smtp_max_auth_line: Option<usize>,
    /// Longest client line; longer lines close the connection.
    pub max_line: usize,
    /// A client silent (or not reading) for this long is dropped.
    pub idle_timeout: Duration,
    /// Client lines kept per protocol for [`Emulator::received`].
    pub log_capacity: usize,
    /// Extra names for the server certificate.
    pub cert_names: Vec<String>,
    /// Which certificate to present.
    pub certificate: CertKind,
}

impl std::fmt::Debug for EmulatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorOptions")
            .field("users", &self.users)
            .field("default_behaviour", &self.default_behaviour)
            .field("server", &self.server)
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl EmulatorOptions {
    /// Exchange-like defaults with the given token checker.
    pub fn new(tokens: Arc<dyn TokenCheck>) -> Self {
        Self {
            tokens,
            users: HashMap::new(),
            default_behaviour: Behaviour::Success,
            server: ServerBehaviour::Normal,
            hostname: "SN2PR00CA0018.namprd00.prod.outlook.com".to_string(),
            slow_delay: Duration::from_secs(2),
            advertise_oauthbearer: true,
            smtp_max_auth_line: None,
            max_line: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            log_capacity: 1000,
            cert_names: Vec::new(),
            certificate: CertKind::Valid,
        }
    }
}

impl Default for EmulatorOptions {
    /// No token is accepted.
    fn default() -> Self {
        Self::new(Arc::new(StaticTokens::default()))
    }
}

/// The settings that may change while running.
struct Live {
    users: HashMap<String, Behaviour>,
    default_behaviour: Behaviour,
    server: ServerBehaviour,
}

/// State shared by all listeners and connections.
pub(crate) struct Shared {
    tokens: Arc<dyn TokenCheck>,
    live: RwLock<Live>,
    pub(crate) hostname: String,
    pub(crate) slow_delay: Duration,
    pub(crate) oauthbearer: bool,
    pub(crate) smtp_max_auth_line: Option<usize>,
    pub(crate) max_line: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    log_capacity: usize,
    logs: [Mutex<VecDeque<String>>; 3],
}

impl Shared {
    fn live(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        // A poisoned lock only means a writer panicked; the data is still usable.
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn behaviour_for(&self, user: &str) -> Behaviour {
        let live = self.live();
        live.users
            .get(&user.to_lowercase())
            .copied()
            .unwrap_or(live.default_behaviour)
    }

    pub(crate) fn server_behaviour(&self) -> ServerBehaviour {
        self.live().server
    }

    pub(crate) fn check(&self, user: &str, token: &str) -> TokenVerdict {
        self.tokens.check(user, token)
    }

    fn log_index(proto: Proto) -> usize {
        match proto {
            Proto::Imap => 0,
            Proto::Pop3 => 1,
            Proto::Smtp => 2,
        }
    }

    pub(crate) fn record(&self, proto: Proto, line: &str) {
        let mut log = self.logs[Self::log_index(proto)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if log.len() >= self.log_capacity {
            log.pop_front();
        }
        if self.log_capacity > 0 {
            // Keep the log bounded in bytes too: a 64 KiB line is stored cut short.
            let mut end = line.len().min(4096);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            log.push_back(line[..end].to_string());
        }
    }
}

/// A running emulated provider. Dropping it stops all servers.
pub struct Emulator {
    shared: Arc<Shared>,
    addrs: HashMap<(Proto, TlsKind), SocketAddr>,
    ca: TestCa,
    not_after: i64,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

const LISTENERS: [(Proto, TlsKind); 6] = [
    (Proto::Imap, TlsKind::Implicit),
    (Proto::Imap, TlsKind::Starttls),
    (Proto::Pop3, TlsKind::Implicit),
    (Proto::Pop3, TlsKind::Starttls),
    (Proto::Smtp, TlsKind::Starttls),
    (Proto::Smtp, TlsKind::Implicit),
];

impl Emulator {
    /// Generates the CA and certificate, binds the six listeners on 127.0.0.1 and serves
    /// until [`Emulator::shutdown`] or drop. Must be called inside a tokio runtime.
    pub async fn start(options: EmulatorOptions) -> io::Result<Emulator> {
        let ca = TestCa::new()?;
        let names: Vec<&str> = options.cert_names.iter().map(String::as_str).collect();
        let cert = match options.certificate {
            CertKind::Valid => ca.issue_server(&names)?,
            CertKind::Expired => ca.issue_expired_server(&names)?,
            CertKind::WrongName => ca.issue_for_names_only(&["wrong-name.invalid"])?,
            CertKind::Untrusted => TestCa::named("untrusted CA")?.issue_server(&names)?,
        };
        let shared = Arc::new(Shared {
            tokens: options.tokens,
            live: RwLock::new(Live {
                users: options
                    .users
                    .into_iter()
                    .map(|(k, v)| (k.to_lowercase(), v))
                    .collect(),
                default_behaviour: options.default_behaviour,
                server: options.server,
            }),
            hostname: options.hostname,
            slow_delay: options.slow_delay,
            oauthbearer: options.advertise_oauthbearer,
            smtp_max_auth_line: options.smtp_max_auth_line,
            max_line: options.max_line,
            idle_timeout: options.idle_timeout,
            tls: cert.server_config()?,
            log_capacity: options.log_capacity,
            logs: Default::default(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut addrs = HashMap::new();
        for (proto, kind) in LISTENERS {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            addrs.insert((proto, kind), listener.local_addr()?);
            tokio::spawn(accept_loop(
                listener,
                proto,
                kind,
                shared.clone(),
                stop_rx.clone(),
            ));
        }
        Ok(Emulator {
            shared,
            addrs,
            ca,
            not_after: cert.not_after,
            stop,
        })
    }

    /// The address of one listener.
    pub fn addr(&self, proto: Proto, kind: TlsKind) -> SocketAddr {
        // Every (Proto, TlsKind) pair is bound in `start`, so the fallback is never used.
        self.addrs
            .get(&(proto, kind))
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The CA certificate (PEM) that issued the server certificate (except [`CertKind::Untrusted`]).
    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// The CA certificate (DER), for building a client root store.
    pub fn ca_der(&self) -> &rustls_pki_types::CertificateDer<'static> {
        self.ca.ca_der()
    }

    /// Writes the CA certificate PEM to `path` (for curl's `--cacert` or a config's `ca_file`).
    pub fn write_ca_pem(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.ca.ca_pem())
    }

    /// The server certificate's notAfter, in unix seconds.
    pub fn cert_not_after(&self) -> i64 {
        self.not_after
    }

    /// The host name shown in replies.
    pub fn hostname(&self) -> &str {
        &self.shared.hostname
    }

    /// The last client lines received by one protocol's servers, oldest first.
    /// Test-only data: it contains tokens.
    pub fn received(&self, proto: Proto) -> Vec<String> {
        self.shared.logs[Shared::log_index(proto)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Forgets the received lines.
    pub fn clear_received(&self) {
        for log in &self.shared.logs {
            log.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Sets the behaviour of a SASL user from now on.
    pub fn set_behaviour(&self, user: &str, behaviour: Behaviour) {
        let mut live = self.shared.live.write().unwrap_or_else(|e| e.into_inner());
        live.users.insert(user.to_lowercase(), behaviour);
    }

    /// Sets the server-wide behaviour for new connections.
    pub fn set_server_behaviour(&self, behaviour: ServerBehaviour) {
        let mut live = self.shared.live.write().unwrap_or_else(|e| e.into_inner());
        live.server = behaviour;
    }

    /// Stops all listeners and open connections.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Resolves once the emulator is stopped (or gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    proto: Proto,
    kind: TlsKind,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let stop_fut = stopped(stop.clone());
    tokio::pin!(stop_fut);
    loop {
        tokio::select! {
            _ = &mut stop_fut => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let shared = shared.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stopped(stop) => {}
                            _ = serve(tcp, peer, shared, proto, kind) => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Per-connection settings the protocol servers need.
/// How much the `Flood` behaviour sends: far more than any client should keep.
pub const FLOOD_BYTES: usize = 100 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    pub(crate) server: ServerBehaviour,
}

async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, proto: Proto, kind: TlsKind) {
    let server = shared.server_behaviour();
    let mut conn = Conn::new(tcp, peer, shared.clone(), proto);
    if server == ServerBehaviour::Slow {
        conn.delay = shared.slow_delay;
    }
    if kind == TlsKind::Implicit && server != ServerBehaviour::NoTls {
        conn = match conn.start_tls().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, ?proto, "emulator TLS handshake failed");
                return;
            }
        };
    }
    let session = Session { server };
    let (greeting, prefix) = match proto {
        Proto::Imap => (imap::greeting(&shared), "* OK "),
        Proto::Pop3 => (pop3::greeting(&shared), "+OK "),
        Proto::Smtp => (smtp::greeting(&shared), "220 "),
    };
    match server {
        ServerBehaviour::Silent => conn.silent().await,
        ServerBehaviour::EndlessLine => conn.endless(prefix).await,
        ServerBehaviour::Trickle => conn.trickle(&greeting).await,
        ServerBehaviour::Flood => {
            let line = match proto {
                Proto::Imap => "* OK this server never stops talking",
                Proto::Pop3 => "+OK this server never stops talking",
                Proto::Smtp => "220-this server never stops talking",
            };
            conn.flood(line, FLOOD_BYTES).await
        }
        ServerBehaviour::Garbage => conn.garbage().await,
        _ => match proto {
            Proto::Imap => imap::run(conn, session).await,
            Proto::Pop3 => pop3::run(conn, session).await,
            Proto::Smtp => smtp::run(conn, session).await,
        },
    }
}
