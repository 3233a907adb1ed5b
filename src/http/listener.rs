//! The listening side: a connection budget that an attacker holding every connection
//! cannot use to starve `/healthz`, `/readyz` or `/metrics`, and the limits every
//! connection lives under (header, write and TLS handshake timeouts, requests per
//! connection, buffer size), then the graceful drain at shutdown.
//!
//! The rule: the accept loop never waits for a free slot. When all [`MAX_CONNECTIONS`]
//! slots are taken, the new connection takes the slot of the connection that has gone the
//! longest without starting a request (idle keep-alive, a slowloris still sending its
//! headers, a client that stopped reading its responses, a request waiting its turn for
//! the status page). A new connection is the youngest, so it is served unless that many
//! newer connections arrive before its headers do; what an attacker holds is always the
//! oldest. This is nginx's rule for reusable connections, applied to every state.

use super::{Conn, WebConfig, handle};
use crate::service::Service;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_io_timeout::TimeoutStream;

/// Connections held open at once. Beyond it the stalest connection is closed for the new
/// one (see the module doc), so this bounds file descriptors and memory (each connection
/// buffers at most [`MAX_BUF`] of requests) and leaves the probes their descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must send a request's headers within this, counted from when the connection
/// is ready for the request: the first one, and each one after on a keep-alive connection
/// (so it is also the idle keep-alive timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long closes the connection: a client that
/// sends requests and never reads the responses cannot hold a connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses on one connection; the last carries `Connection: close`. Prometheus scrapes
/// once per interval, so it reconnects after this many scrapes; a pipelining client gets
/// no more than this many answers per connection.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 100;
/// hyper's read buffer per connection: request headers beyond this are refused (431).
pub const MAX_BUF: usize = 16 * 1024;
/// At shutdown, open connections get this long to finish their request.
const DRAIN: Duration = Duration::from_secs(5);
/// Evictions are logged at most this often, with their count: an attack must not flood
/// the log.
const EVICTION_LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves until `shutdown` completes, then lets open requests finish briefly. With TLS in
/// `web`, every connection must complete a TLS handshake first (a plain HTTP request is
/// dropped at the handshake); with basic auth, requests are checked before routing.
pub async fn serve_with(
    listener: TcpListener,
    service: Arc<Service>,
    web: Arc<WebConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let budget = Budget::new(MAX_CONNECTIONS);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = budget.admit();
        let service = service.clone();
        let web = web.clone();
        let stop = stop_rx.clone();
        conns.spawn(async move {
            tokio::select! {
                () = slot.evicted() => tracing::debug!(%peer, "connection closed for a newer one"),
                () = connection(stream, peer, slot.clone(), service, web, stop) => {}
            }
        });
        while conns.try_join_next().is_some() {}
        // The new connection's task runs now (tokio runs a task just spawned first when
        // this one yields), before the next accept: its request is read, and a health
        // check answered, before a flood of newer connections could push it out.
        tokio::task::yield_now().await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// One accepted connection: write timeout, TLS handshake when configured, then HTTP.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: Arc<Slot>,
    service: Arc<Service>,
    web: Arc<WebConfig>,
    stop: watch::Receiver<bool>,
) {
    // Below TLS, so handshake writes and every response are covered alike.
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let stream = Box::pin(stream);
    let Some(acceptor) = web.tls.clone() else {
        let conn = Conn {
            peer,
            client_cert: false,
        };
        return serve_connection(stream, conn, slot, service, web, stop).await;
    };
    // The handshake gets the same time as a request's headers: a client that connects
    // and says nothing cannot hold a connection slot.
    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let conn = Conn {
                peer,
                client_cert: tls.get_ref().1.peer_certificates().is_some(),
            };
            serve_connection(tls, conn, slot, service, web, stop).await
        }
        // A plain HTTP request to the TLS port ends here, without a byte of content.
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn serve_connection<S>(
    stream: S,
    conn: Conn,
    slot: Arc<Slot>,
    service: Arc<Service>,
    web: Arc<WebConfig>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = Arc::new(AtomicU32::new(0));
    let svc = service_fn(move |req| {
        let (service, web, slot) = (service.clone(), web.clone(), slot.clone());
        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            slot.request_started();
            let mut response = handle(&service, &web, req, conn).await;
            if n >= MAX_REQUESTS_PER_CONNECTION {
                // hyper closes the connection after a response saying so, and drops any
                // pipelined requests behind it.
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(response)
        }
    });
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => {}
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, http).await;
        }
    }
}

/// The connection slots: who holds one, since when it last started a request, and how to
/// close it when its slot is taken.
struct Budget {
    capacity: usize,
    state: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    next_id: u64,
    open: HashMap<u64, Entry>,
    /// Evictions not logged yet, and when the last log line was written.
    unlogged: u64,
    logged_at: Option<Instant>,
}

struct Entry {
    /// When the connection was accepted or last started a request.
    since: Instant,
    close: Arc<Notify>,
}

impl Budget {
    fn new(capacity: usize) -> Arc<Budget> {
        Arc::new(Budget {
            capacity,
            state: Mutex::new(Slots::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding this lock leaves plain data behind: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection just accepted; when all are taken, the stalest
    /// connection's slot (it is told to close).
    fn admit(self: &Arc<Self>) -> Arc<Slot> {
        let now = Instant::now();
        let mut s = self.lock();
        while s.open.len() >= self.capacity {
            let Some(victim) = s
                .open
                .iter()
                .min_by_key(|(id, e)| (e.since, **id))
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(e) = s.open.remove(&victim) {
                e.close.notify_one();
            }
            s.unlogged += 1;
            if s.logged_at
                .is_none_or(|t| now.duration_since(t) >= EVICTION_LOG_EVERY)
            {
                tracing::warn!(
                    limit = self.capacity,
                    closed = s.unlogged,
                    "HTTP connection limit reached: closed the connections idle or stalled the longest for new ones"
                );
                s.unlogged = 0;
                s.logged_at = Some(now);
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let close = Arc::new(Notify::new());
        s.open.insert(
            id,
            Entry {
                since: now,
                close: close.clone(),
            },
        );
        Arc::new(Slot {
            budget: self.clone(),
            id,
            close,
        })
    }
}

/// One connection's hold on the budget; released when dropped.
struct Slot {
    budget: Arc<Budget>,
    id: u64,
    close: Arc<Notify>,
}

impl Slot {
    /// Completes when a newer connection took this slot.
    async fn evicted(&self) {
        self.close.notified().await
    }

    /// Marks a request as started: the connection is fresh again. Not when it ends: a
    /// handler waiting its turn (the status page renders one at a time) must not make
    /// its connection look fresher than a new one.
    fn request_started(&self) {
        if let Some(e) = self.budget.lock().open.get_mut(&self.id) {
            e.since = Instant::now();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_evicted(slot: &Slot) -> bool {
        use std::task::{Context, Poll, Waker};
        let f = std::pin::pin!(slot.evicted());
        f.poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_closes_the_stalest_connection_not_the_new_one() {
        let budget = Budget::new(3);
        let a = budget.admit();
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = budget.admit();
        tokio::time::advance(Duration::from_secs(1)).await;
        let c = budget.admit();
        tokio::time::advance(Duration::from_secs(1)).await;
        // `a` starts a request: now `b` has gone longest without one.
        a.request_started();
        let d = budget.admit();
        assert!(is_evicted(&b), "the stalest connection is closed");
        assert!(!is_evicted(&a) && !is_evicted(&c) && !is_evicted(&d));
        assert_eq!(budget.lock().open.len(), 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        let e = budget.admit();
        assert!(is_evicted(&c), "then the next stalest");
        assert!(!is_evicted(&a) && !is_evicted(&d) && !is_evicted(&e));
        // Dropping a connection frees its slot: no eviction for the next one.
        drop(d);
        let _f = budget.admit();
        assert!(!is_evicted(&a) && !is_evicted(&e));
        assert_eq!(budget.lock().open.len(), 3);
    }
}
