//! The HTTP server (hyper 1): `/metrics`, `/healthz`, `/readyz`, the status page, its
//! JSON, the last transcripts, and `POST /-/reload`.

pub mod page;

use crate::Protocol;
use crate::service::Service;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// More connections than this wait: a scraper storm or a slowloris cannot exhaust memory.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, open connections get this long to finish their request.
const DRAIN: Duration = Duration::from_secs(5);

type Body = Full<Bytes>;

/// Serves until `shutdown` completes, then lets open requests finish briefly.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
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
        let service = service.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(route(&service, req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn route(
    service: &Service,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    let board = service.board();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    match path.as_str() {
        "/metrics" if get => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            service.metrics().encode(),
        ),
        "/healthz" if get => {
            if service.healthy() {
                text(StatusCode::OK, PLAIN, "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "scheduler stopped\n",
                )
            }
        }
        "/readyz" if get => {
            if board.ready() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: some mailboxes have not been probed yet\n",
                )
            }
        }
        "/" if get => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::render(&board.snapshot()),
        ),
        "/api/v1/status" if get => match serde_json::to_vec_pretty(&board.snapshot()) {
            Ok(body) => text(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
        },
        "/transcript" if get => transcript(service, &req),
        "/-/reload" if method == Method::POST => {
            tracing::info!(%peer, "reload requested over HTTP");
            match service.reload().await {
                Ok(()) => text(StatusCode::OK, PLAIN, "config reloaded\n"),
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    PLAIN,
                    format!("config rejected, the previous one keeps running: {e}\n"),
                ),
            }
        }
        "/metrics" | "/healthz" | "/readyz" | "/" | "/api/v1/status" | "/transcript"
        | "/-/reload" => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "method not allowed\n",
            );
            let allow = if path == "/-/reload" {
                "POST"
            } else {
                "GET, HEAD"
            };
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
            r
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

fn transcript(service: &Service, req: &Request<Incoming>) -> Response<Body> {
    let (Some(mailbox), Some(protocol)) = (
        query_param(req, "mailbox"),
        query_param(req, "protocol").and_then(|p| p.parse::<Protocol>().ok()),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            PLAIN,
            "usage: /transcript?mailbox=NAME&protocol=imap|pop3|smtp\n",
        );
    };
    match service.board().transcript(&(mailbox, protocol)) {
        None => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "no such mailbox and protocol\n",
        ),
        Some((info, last)) => {
            let mut body = format!(
                "# {} {} ({}), user {}\n",
                info.mailbox, info.protocol, info.target, info.address
            );
            match last {
                None => body.push_str("# not probed yet\n"),
                Some(r) => {
                    body.push_str(&format!(
                        "# finished {}: {}{}\n",
                        crate::status::rfc3339(r.finished_at),
                        r.reason,
                        if r.detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.detail)
                        }
                    ));
                    match r.transcript {
                        Some(t) => body.push_str(&t),
                        None => body.push_str("# no connection was made (token step failed)\n"),
                    }
                }
            }
            text(StatusCode::OK, PLAIN, body)
        }
    }
}
