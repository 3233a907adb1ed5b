//! One probe's connection: resolve, connect, TLS (implicit or upgraded), a bounded line
//! reader, the phase clock and the redacted transcript. Shared by the three protocols.

use super::tls::{TlsClient, is_certificate_error};
use super::transcript::{Direction, Transcript};
use super::{Phase, Phases, ProbeError, ProbeSpec};
use crate::protocol::TlsMode;
use crate::redact::Redactor;
use crate::secret::Secret;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::client::TlsStream;

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf).await,
            Stream::Tls(s) => {
                s.write_all(buf).await?;
                // rustls buffers records; flush so the line leaves now.
                s.flush().await
            }
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

pub(crate) struct Session<'a> {
    pub(crate) spec: &'a ProbeSpec,
    tls: &'a TlsClient,
    stream: Option<Stream>,
    /// Bytes received and not yet returned as a line; never longer than `max_line`.
    pending: Vec<u8>,
    total_read: usize,
    deadline: Instant,
    started: Instant,
    phase: Phase,
    phase_started: Instant,
    pub(crate) phases: Phases,
    pub(crate) transcript: Transcript,
    pub(crate) tls_not_after: Option<i64>,
    pub(crate) tls_version: Option<String>,
    /// Knows the token and the SASL strings: every line, sent or received, passes through it.
    redactor: Redactor,
    /// When the connection attempt began: the contract's probe duration starts here.
    pub(crate) connect_started: Option<Instant>,
}

impl<'a> Session<'a> {
    pub(crate) fn new(spec: &'a ProbeSpec, tls: &'a TlsClient, token: &Secret) -> Self {
        let now = Instant::now();
        Session {
            spec,
            tls,
            stream: None,
            pending: Vec::new(),
            total_read: 0,
            deadline: now + spec.timeout,
            started: now,
            phase: Phase::Resolve,
            phase_started: now,
            phases: Phases::default(),
            transcript: Transcript::default(),
            tls_not_after: None,
            tls_version: None,
            redactor: Redactor::new().with(token),
            connect_started: None,
        }
    }

    /// Adds the SASL initial response (base64) to the secrets, before it is sent.
    pub(crate) fn add_sasl_response(&mut self, ir: &Secret) {
        self.redactor.add_sasl(ir);
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the running phase (its time is added to its total) and starts `phase`.
    pub(crate) fn begin(&mut self, phase: Phase) {
        self.end_phase();
        self.phase = phase;
        self.phase_started = Instant::now();
    }

    pub(crate) fn end_phase(&mut self) {
        let now = Instant::now();
        self.phases.add(self.phase, now - self.phase_started);
        self.phase_started = now;
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Shortens the deadline (for the courtesy LOGOUT/QUIT, which must not cost a full timeout).
    pub(crate) fn limit_deadline(&mut self, within: Duration) {
        self.deadline = self.deadline.min(Instant::now() + within);
    }

    pub(crate) fn note(&mut self, text: &str) {
        let at = self.elapsed();
        self.transcript
            .push(at, Direction::Note, text, &self.redactor);
    }

    /// Resolves the host, connects, and for implicit TLS completes the handshake.
    pub(crate) async fn connect(&mut self) -> Result<(), ProbeError> {
        let spec = self.spec;
        self.begin(Phase::Resolve);
        let addrs = self.resolve().await?;
        self.begin(Phase::Connect);
        self.connect_started = Some(Instant::now());
        let tcp = self.connect_any(&addrs).await?;
        self.stream = Some(Stream::Plain(tcp));
        if spec.target.tls == TlsMode::Implicit {
            self.begin(Phase::Tls);
            self.start_tls().await?;
        }
        Ok(())
    }

    async fn resolve(&mut self) -> Result<Vec<SocketAddr>, ProbeError> {
        let host = self.spec.target.host.as_str();
        let port = self.spec.target.port;
        let err = |message: String| ProbeError::Resolve {
            host: host.to_owned(),
            message,
        };
        let lookup =
            tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port));
        let addrs: Vec<SocketAddr> = match timeout_at(self.deadline, lookup).await {
            Err(_) => return Err(err("timed out".into())),
            Ok(Err(e)) => return Err(err(e.to_string())),
            Ok(Ok(a)) => a.collect(),
        };
        // With a source address, only its family can be reached.
        let addrs: Vec<SocketAddr> = match self.spec.target.source_address {
            Some(src) => addrs
                .into_iter()
                .filter(|a| a.is_ipv4() == src.is_ipv4())
                .collect(),
            None => addrs,
        };
        if addrs.is_empty() {
            return Err(err("no usable address".into()));
        }
        Ok(addrs)
    }

    /// Tries each address in turn (a host with a dead IPv6 address still works over IPv4).
    async fn connect_any(&mut self, addrs: &[SocketAddr]) -> Result<TcpStream, ProbeError> {
        let mut last = None;
        for addr in addrs {
            let attempt = async {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(src) = self.spec.target.source_address {
                    socket.bind(SocketAddr::new(src, 0))?;
                }
                socket.connect(*addr).await
            };
            match timeout_at(self.deadline, attempt).await {
                Err(_) => {
                    return Err(ProbeError::ConnectTimeout {
                        addr: addr.to_string(),
                    });
                }
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    self.note(&format!("connected to {addr}"));
                    return Ok(tcp);
                }
                Ok(Err(e)) => {
                    last = Some(ProbeError::Connect {
                        addr: addr.to_string(),
                        message: e.to_string(),
                    })
                }
            }
        }
        Err(last.expect("addrs is not empty"))
    }

    /// TLS handshake on the current connection (implicit TLS, or after STARTTLS's OK).
    pub(crate) async fn start_tls(&mut self) -> Result<(), ProbeError> {
        // Bytes the server sent after its STARTTLS reply but before the handshake would be
        // read as if they came over TLS: a known injection attack (CVE-2011-0411 class).
        if !self.pending.is_empty() {
            return Err(ProbeError::Unexpected {
                phase: Phase::Tls,
                reply: "data after the STARTTLS reply, before the TLS handshake".into(),
            });
        }
        let tcp = match self.stream.take() {
            Some(Stream::Plain(tcp)) => tcp,
            Some(tls @ Stream::Tls(_)) => {
                self.stream = Some(tls);
                return Ok(());
            }
            None => unreachable!("start_tls before connect"),
        };
        let handshake = self.tls.handshake(&self.spec.target.host, tcp);
        let tls = match timeout_at(self.deadline, handshake).await {
            Err(_) => return Err(ProbeError::Timeout { phase: Phase::Tls }),
            Ok(Err(e)) => {
                return Err(ProbeError::Tls {
                    certificate: is_certificate_error(&e),
                    message: e.to_string(),
                });
            }
            Ok(Ok(tls)) => tls,
        };
        let (_, conn) = tls.get_ref();
        self.tls_not_after = conn
            .peer_certificates()
            .and_then(|chain| self.tls.chain_not_after(chain));
        // rustls names versions `TLSv1_3`; operators read `TLSv1.3` (as openssl prints it).
        self.tls_version = conn
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."));
        let note = format!(
            "TLS established ({})",
            self.tls_version.as_deref().unwrap_or("?")
        );
        self.stream = Some(Stream::Tls(Box::new(tls)));
        self.note(&note);
        Ok(())
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::is_tls)
    }

    /// Sends one line (CRLF added). The transcript shows it with secrets redacted.
    pub(crate) async fn send(&mut self, line: &str) -> Result<(), ProbeError> {
        let at = self.elapsed();
        self.transcript
            .push(at, Direction::Client, line, &self.redactor);
        let phase = self.phase;
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let stream = self.stream.as_mut().expect("send after connect");
        match timeout_at(self.deadline, stream.write_all(&bytes)).await {
            Err(_) => Err(ProbeError::Timeout { phase }),
            Ok(Err(e)) => Err(io_error(phase, e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one line (without its CRLF), bounded in length, total bytes and time, with
    /// every secret and sensitive field value already `<redacted>`.
    pub(crate) async fn read_line(&mut self) -> Result<String, ProbeError> {
        let phase = self.phase;
        let limits = self.spec.limits;
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut raw: Vec<u8> = self.pending.drain(..=end).collect();
                raw.pop();
                if raw.last() == Some(&b'\r') {
                    raw.pop();
                }
                // The one point where server text enters: redacted here, before the dialogue
                // parses it or keeps it in a `ProbeError`, so no unredacted copy is stored.
                // An error challenge stays decodable (its inside is redacted, re-encoded).
                let line = self.redactor.redact_bytes(&raw);
                let at = self.elapsed();
                self.transcript.push_redacted(at, Direction::Server, &line);
                return Ok(line);
            }
            scanned = self.pending.len();
            if self.pending.len() >= limits.max_line {
                return Err(ProbeError::LineTooLong {
                    phase,
                    limit: limits.max_line,
                });
            }
            let room = (limits.max_line - self.pending.len()).min(8192);
            self.read_some(room).await?;
        }
    }

    /// Reads and discards `n` bytes (an IMAP literal we have no use for).
    pub(crate) async fn skip_bytes(&mut self, mut n: usize) -> Result<(), ProbeError> {
        loop {
            let take = n.min(self.pending.len());
            self.pending.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.read_some(n.min(8192)).await?;
        }
    }

    /// One read of at most `room` bytes into `pending`; counts against the byte budget.
    async fn read_some(&mut self, room: usize) -> Result<usize, ProbeError> {
        let phase = self.phase;
        let limits = self.spec.limits;
        let mut chunk = [0u8; 8192];
        let room = room.min(chunk.len());
        let stream = self.stream.as_mut().expect("read after connect");
        let n = match timeout_at(self.deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return Err(ProbeError::Timeout { phase }),
            Ok(Err(e)) => return Err(io_error(phase, e)),
            Ok(Ok(0)) => return Err(ProbeError::Closed { phase }),
            Ok(Ok(n)) => n,
        };
        self.total_read += n;
        if self.total_read > limits.max_bytes {
            return Err(ProbeError::TooMuchData {
                phase,
                limit: limits.max_bytes,
            });
        }
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The local address, for `EHLO [addr]`.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        match self.stream.as_ref()? {
            Stream::Plain(s) => s.local_addr().ok(),
            Stream::Tls(s) => s.get_ref().0.local_addr().ok(),
        }
    }

    /// Ends the session politely: best effort, never longer than a moment.
    pub(crate) async fn close(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            let shutdown = async {
                match stream {
                    Stream::Plain(s) => s.shutdown().await,
                    Stream::Tls(s) => s.shutdown().await,
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(200), shutdown).await;
        }
        self.stream = None;
    }
}

fn io_error(phase: Phase, e: io::Error) -> ProbeError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => ProbeError::Closed { phase },
        _ => ProbeError::Io {
            phase,
            message: e.to_string(),
        },
    }
}
