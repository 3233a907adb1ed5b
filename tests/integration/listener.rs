//! The HTTP listener under attack, over real sockets against `run` (the binary, a child
//! process): 260 connections pipelining `GET /api/v1/status` that never read, and 1,000
//! slowloris connections sending header bytes at 1 byte/s. While each holds every
//! connection slot, `/healthz`, `/readyz` and `/metrics` still answer. Also the
//! per-connection limits (requests per connection, write timeout) and `POST /-/reload`
//! refused to a browser page of another site (`Origin`).
//!
//! How fast they answer during an attack is measured in `benches/` (p50/p99), not here:
//! the 10 s client timeout only keeps a broken listener from hanging the test.

use crate::demo::{Running, get, spawn_run, wait_ok};
use mail_oauth_exporter::command::demo::Demo;
use mail_oauth_exporter::http::{MAX_CONNECTIONS, MAX_REQUESTS_PER_CONNECTION, WRITE_TIMEOUT};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Attacking clients, each a task that reconnects as soon as the server closes it.
struct Attack {
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    /// Connections opened so far (reconnections included).
    opened: Arc<AtomicU64>,
}

impl Attack {
    /// `n` clients; each runs `one` on a fresh connection until it fails, then reconnects.
    fn start<F, Fut>(addr: SocketAddr, n: usize, one: F) -> Attack
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (stop, stopped) = watch::channel(false);
        let opened = Arc::new(AtomicU64::new(0));
        let one = Arc::new(one);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (one, opened, mut stopped) = (one.clone(), opened.clone(), stopped.clone());
            tasks.spawn(async move {
                let attack = async {
                    loop {
                        match TcpStream::connect(addr).await {
                            Ok(s) => {
                                opened.fetch_add(1, Ordering::Relaxed);
                                one(s).await;
                            }
                            // Out of ports or descriptors for a moment: try again.
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                };
                tokio::select! {
                    () = attack => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            });
        }
        Attack {
            stop,
            tasks,
            opened,
        }
    }

    /// Waits until every client has connected at least once.
    async fn wait_connected(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while self.opened.load(Ordering::Relaxed) < n as u64 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the attacking clients connect");
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Pipelined `GET /api/v1/status`, written over and over, never a byte read.
async fn pipeline_never_read(mut s: TcpStream) {
    let burst = "GET /api/v1/status HTTP/1.1\r\nHost: exporter\r\n\r\n".repeat(20);
    while s.write_all(burst.as_bytes()).await.is_ok() {}
}

/// Slowloris: the headers of a request, one byte per second, never finished.
async fn slowloris(mut s: TcpStream) {
    let headers = b"GET /api/v1/status HTTP/1.1\r\nHost: exporter\r\nX-Padding: ";
    for b in headers.iter().chain(std::iter::repeat(&b'a')) {
        if s.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sockets the process holds open (the attack's share of them is the listener's).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The soft limit on open files of this process (`ulimit -n`).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

/// The demo's config with `rows` more mailboxes (IMAP to a closed port, probed once an
/// hour), so that `/api/v1/status` is large (~1 KiB a row): a client that does not read
/// it stalls the server's writes within a few responses, beyond what the kernel buffers.
fn padded(config: String, rows: usize) -> String {
    let mut s = config;
    for i in 0..rows {
        s.push_str(&format!(
            "  padding-{i}:\n    address: padding-{i}@contoso.com\n    credential: contoso-monitor\n    \
             protocols: [imap]\n    interval: 1h\n    imap: {{ host: 127.0.0.1, port: 1, tls: implicit }}\n"
        ));
    }
    s
}

/// While `attack` holds every slot of `run`'s listener, each health and metrics endpoint
/// answers, five times over.
async fn endpoints_answer_during(name: &str, n: usize, one: fn(TcpStream) -> BoxFut) {
    let demo = Demo::start().await.unwrap();
    let text = std::fs::read_to_string(&demo.config_path).unwrap();
    std::fs::write(&demo.config_path, padded(text, 300)).unwrap();
    let (mut child, base, _logs) = spawn_run(&demo.config_path).await;
    let pid = child.id().unwrap();
    wait_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    let addr: SocketAddr = base.strip_prefix("http://").unwrap().parse().unwrap();

    let attack = Attack::start(addr, n, one);
    attack.wait_connected(n).await;
    // The attack is real: run holds as many connections as its budget allows.
    let full = tokio::time::timeout(Duration::from_secs(60), async {
        while sockets(pid) < MAX_CONNECTIONS {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let held = sockets(pid);
    assert!(
        full.is_ok(),
        "{name}: the attack holds {held} sockets of run, fewer than its {MAX_CONNECTIONS} slots"
    );
    // A fresh connection per request, as kubelet and a first scrape make.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for round in 0..5 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{name}, round {round}: {path}: {e:?}"));
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            assert_eq!(status, 200, "{name}, round {round}: {path}: {body}");
            if path == "/metrics" {
                assert!(body.contains("mail_oauth_probe_result"), "{body}");
            }
        }
    }
    let opened = attack.opened.load(Ordering::Relaxed);
    attack.stop().await;
    eprintln!("{name}: {n} clients opened {opened} connections; run held {held} sockets");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    crate::demo::signal_pid(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("run exits after the attack")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

type BoxFut = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_while_260_connections_pipeline_and_never_read() {
    endpoints_answer_during("pipelining", 260, |s| Box::pin(pipeline_never_read(s))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_during_1000_slowloris_connections() {
    // Each client is one descriptor here; keep room for the emulator and the test.
    let n = 1000.min(open_files_limit().saturating_sub(200));
    assert!(
        n > MAX_CONNECTIONS,
        "ulimit -n is too low to hold more than {MAX_CONNECTIONS} connections: raise it"
    );
    endpoints_answer_during("slowloris", n, |s| Box::pin(slowloris(s))).await;
}

/// Reads until the server closes; returns what came.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    got
}

fn responses(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes)
        .matches("HTTP/1.1 200 OK")
        .count()
}

#[tokio::test]
async fn one_connection_gets_at_most_the_request_limit_then_is_closed() {
    let r = Running::start(|t| t).await;
    let addr = r.base.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let n = MAX_REQUESTS_PER_CONNECTION as usize + 50;
    let requests = "GET /healthz HTTP/1.1\r\nHost: exporter\r\n\r\n".repeat(n);
    s.write_all(requests.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s).await;
    assert_eq!(
        responses(&got),
        MAX_REQUESTS_PER_CONNECTION as usize,
        "{n} pipelined requests on one connection"
    );
    let text = String::from_utf8_lossy(&got);
    let last = text
        .rsplit("HTTP/1.1 ")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(last.contains("connection: close"), "{last}");
    r.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_its_responses_is_closed_after_the_write_timeout() {
    let r = Running::start(|t| padded(t, 300)).await;
    let addr: SocketAddr = r.base.strip_prefix("http://").unwrap().parse().unwrap();
    // A small receive window and large responses, so the server's writes stall well
    // before the request limit.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let one = get(&r.url("/api/v1/status")).await.1.len();
    let requests = "GET /api/v1/status HTTP/1.1\r\nHost: exporter\r\n\r\n"
        .repeat(MAX_REQUESTS_PER_CONNECTION as usize);
    s.write_all(requests.as_bytes()).await.unwrap();
    tokio::time::sleep(WRITE_TIMEOUT + Duration::from_secs(3)).await;
    let got = read_to_close(&mut s).await;
    let answered = responses(&got);
    eprintln!("{answered} responses of {one} bytes reached the client before the server gave up");
    assert!(
        answered < MAX_REQUESTS_PER_CONNECTION as usize,
        "the server kept writing to a client that did not read for {WRITE_TIMEOUT:?}"
    );
    // The service itself is unharmed.
    assert_eq!(get(&r.url("/healthz")).await.0, 200);
    r.stop().await;
}

/// What the status JSON shows: whether `mailbox` is configured.
async fn configured(r: &Running, mailbox: &str) -> bool {
    let (code, body) = get(&r.url("/api/v1/status")).await;
    assert_eq!(code, 200);
    body.contains(&format!("\"{mailbox}\""))
}

async fn post_reload(r: &Running, origin: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(r.url("/-/reload"))
        .timeout(Duration::from_secs(10));
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn reload_from_another_sites_page_is_refused_and_changes_nothing() {
    let r = Running::start(|t| t).await;
    let path = r.demo.config_path.clone();
    let good = std::fs::read_to_string(&path).unwrap();
    assert!(configured(&r, "busy").await);
    std::fs::write(&path, crate::demo::remove_mailbox(&good, "busy")).unwrap();

    // A page on evil.example posting to the exporter from the operator's browser.
    for origin in ["http://evil.example", "null"] {
        let (code, body) = post_reload(&r, Some(origin)).await;
        assert_eq!(code, 403, "Origin: {origin}: {body}");
        assert!(body.contains("another site"), "{body}");
        assert!(configured(&r, "busy").await, "reloaded for Origin {origin}");
    }
    // The same request with Sec-Fetch-Site only (no Origin).
    let resp = reqwest::Client::new()
        .post(r.url("/-/reload"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(configured(&r, "busy").await);

    // curl and kubectl send no Origin: reloaded.
    let (code, body) = post_reload(&r, None).await;
    assert_eq!(code, 200, "{body}");
    assert!(!configured(&r, "busy").await);

    // The exporter's own origin (a page it served): reloaded too.
    std::fs::write(&path, &good).unwrap();
    let own = r.base.clone();
    let (code, body) = post_reload(&r, Some(&own)).await;
    assert_eq!(code, 200, "Origin: {own}: {body}");
    assert!(configured(&r, "busy").await);
    r.stop().await;
}
