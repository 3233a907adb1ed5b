//! One client connection: plain-or-TLS stream, bounded line reader, paced writer, and
//! the server-wide misbehaviours that do not speak any protocol.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{Proto, Shared};

/// The transport under a connection: TCP, or TLS over TCP after the handshake.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why no line could be read.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The client closed the connection.
    Closed,
    /// The client sent more than the line cap without a newline.
    TooLong,
    /// Read error or idle timeout.
    Io,
}

/// How many bytes one read asks for.
const READ_CHUNK: usize = 8 * 1024;

/// A client connection with its read buffer and pacing.
pub(crate) struct Conn {
    io: Io,
    /// Bytes received but not yet consumed as lines.
    buf: Vec<u8>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) proto: Proto,
    pub(crate) peer: SocketAddr,
    /// Added before every reply (the `Slow` behaviours).
    pub(crate) delay: Duration,
}

impl Conn {
    pub(crate) fn new(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, proto: Proto) -> Self {
        // Replies go out at once (no Nagle wait), so a reset right after one cannot swallow it.
        let _ = tcp.set_nodelay(true);
        Self {
            io: Io::Plain(tcp),
            buf: Vec::new(),
            shared,
            proto,
            peer,
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    /// Runs the server side of the TLS handshake (implicit TLS, or after STARTTLS).
    /// Anything the client pipelined before the handshake is discarded, so plaintext
    /// cannot be injected into the TLS session.
    pub(crate) async fn start_tls(self) -> io::Result<Conn> {
        let Conn {
            io,
            shared,
            proto,
            peer,
            delay,
            ..
        } = self;
        let tcp = match io {
            Io::Plain(tcp) => tcp,
            Io::Tls(_) => return Err(io::Error::other("TLS already active")),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
        let tls = tokio::time::timeout(shared.idle_timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn {
            io: Io::Tls(Box::new(tls)),
            buf: Vec::new(),
            shared,
            proto,
            peer,
            delay,
        })
    }

    /// Reads one line (without CR LF), bounded by the line cap and the idle timeout.
    /// Every line is appended to the protocol's received log.
    pub(crate) async fn read_line(&mut self) -> Result<String, LineError> {
        let max = self.shared.max_line;
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > max {
                    return Err(LineError::TooLong);
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                self.shared.record(self.proto, &text);
                return Ok(text);
            }
            scanned = self.buf.len();
            if self.buf.len() > max + 1 {
                return Err(LineError::TooLong);
            }
            self.fill().await?;
        }
    }

    /// Reads exactly `n` bytes (an IMAP literal); the caller bounds `n`.
    pub(crate) async fn read_exact_bytes(&mut self, n: usize) -> Result<Vec<u8>, LineError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        let bytes: Vec<u8> = self.buf.drain(..n).collect();
        self.shared
            .record(self.proto, &String::from_utf8_lossy(&bytes));
        Ok(bytes)
    }

    async fn fill(&mut self) -> Result<(), LineError> {
        self.buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout(self.shared.idle_timeout, self.io.read_buf(&mut self.buf));
        match read.await {
            Err(_) | Ok(Err(_)) => Err(LineError::Io),
            Ok(Ok(0)) => Err(LineError::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Sends one reply line (CR LF added).
    pub(crate) async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes).await
    }

    /// Sends several reply lines in one write (one delay), as servers do for multi-line replies.
    pub(crate) async fn send_all(&mut self, lines: &[String]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        self.send_raw(&bytes).await
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.write_timed(bytes).await
    }

    /// Writes and flushes, giving up if the client stops reading for the idle timeout.
    async fn write_timed(&mut self, bytes: &[u8]) -> io::Result<()> {
        let io = &mut self.io;
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        tokio::time::timeout(self.shared.idle_timeout, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client not reading"))?
    }

    /// Closes cleanly (TLS close_notify, then FIN).
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.io.shutdown()).await;
    }

    /// Closes with a TCP reset: SO_LINGER 0, then drop. SO_LINGER 0 discards unsent
    /// data, so the last reply is given a moment to leave first.
    pub(crate) async fn reset(self) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let tcp = match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        };
        if let Err(e) = tcp.set_zero_linger() {
            tracing::debug!(error = %e, "could not set SO_LINGER for a reset");
        }
        drop(self);
    }

    /// `Silent`: never writes; reads and discards until the client leaves or idles out.
    pub(crate) async fn silent(mut self) {
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            let read = tokio::time::timeout(self.shared.idle_timeout, self.io.read(&mut scratch));
            match read.await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return,
            }
        }
    }

    /// `EndlessLine`: `prefix`, then filler without a newline until the client gives up.
    /// `write_all` waits for the client to read, so this cannot outrun a slow client.
    pub(crate) async fn endless(mut self, prefix: &str) {
        if self.write_timed(prefix.as_bytes()).await.is_err() {
            return;
        }
        let filler = vec![b'A'; 16 * 1024];
        while self.write_timed(&filler).await.is_ok() {}
    }

    /// `Trickle`: the greeting one byte every 200 ms, round and round, never a line end.
    pub(crate) async fn trickle(mut self, greeting: &str) {
        let text: Vec<u8> = greeting
            .bytes()
            .filter(|b| *b != b'\r' && *b != b'\n')
            .collect();
        if text.is_empty() {
            return;
        }
        for b in text.iter().cycle() {
            if self.write_timed(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `Flood`: short, well-formed lines, `total` bytes of them, then close. A client
    /// that keeps every line it reads would hold all of them.
    pub(crate) async fn flood(mut self, line: &str, total: usize) {
        let mut chunk = Vec::with_capacity(64 * 1024);
        while chunk.len() + line.len() + 2 <= 64 * 1024 {
            chunk.extend_from_slice(line.as_bytes());
            chunk.extend_from_slice(b"\r\n");
        }
        let mut sent = 0;
        while sent < total {
            if self.write_timed(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
        self.close().await;
    }

    /// `Garbage`: 4 KiB of pseudo-random bytes, then close.
    pub(crate) async fn garbage(mut self) {
        // xorshift64: deterministic noise is enough and needs no extra crate.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(self.peer.port());
        let mut noise = Vec::with_capacity(4096);
        while noise.len() < 4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        let _ = self.write_timed(&noise).await;
        self.close().await;
    }
}
