//! The HTTP server (hyper 1): `/metrics`, `/healthz`, `/readyz`, the status page, its
//! JSON, the last transcripts, and `POST /-/reload`.

mod auth;
pub mod page;
mod tls;
pub mod web_config;

pub use web_config::WebConfig;

use crate::Protocol;
use crate::service::Service;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// More connections than this wait: a scraper storm or a slowloris cannot exhaust memory.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, open connections get this long to finish their request.
const DRAIN: Duration = Duration::from_secs(5);

/// A whole body (pages, JSON) or one rendered as it is sent (`/metrics`).
type Body = BoxBody<Bytes, Infallible>;

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
        let web = web.clone();
        let stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let Some(acceptor) = web.tls.clone() else {
                let conn = Conn {
                    peer,
                    client_cert: false,
                };
                return serve_connection(stream, conn, service, web, stop).await;
            };
            // The handshake gets the same time as a request's headers: a client that
            // connects and says nothing cannot hold a connection slot.
            match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let conn = Conn {
                        peer,
                        client_cert: tls.get_ref().1.peer_certificates().is_some(),
                    };
                    serve_connection(tls, conn, service, web, stop).await
                }
                // A plain HTTP request to the TLS port ends here, without a byte of content.
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
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

/// What the server knows about a connection beyond its requests.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    /// The client presented a certificate the configured client CA verified.
    client_cert: bool,
}

async fn serve_connection<S>(
    stream: S,
    conn: Conn,
    service: Arc<Service>,
    web: Arc<WebConfig>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let service = service.clone();
        let web = web.clone();
        async move { Ok::<_, Infallible>(handle(&service, &web, req, conn).await) }
    });
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
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

/// Paths served without basic auth even when it is on: kubelet probes cannot easily send
/// credentials, and these answer only "ok"/"ready" (nothing about mailboxes). Everything
/// else, unknown paths included, needs the password.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The realm clients are asked to authenticate for.
const CHALLENGE: &str = "Basic realm=\"mail-oauth-exporter\"";

/// Checks who is asking, then routes; adds the configured response headers.
async fn handle(
    service: &Service,
    web: &WebConfig,
    req: Request<Incoming>,
    conn: Conn,
) -> Response<Body> {
    let mut response = match gate(web, &req, conn).await {
        Ok(()) => route(service, req, conn.peer).await,
        Err(refused) => refused,
    };
    for (name, value) in &web.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// `Err` is the response for a request that may not go on: 401 without the right user
/// and password, 403 for a reload nobody vouched for.
async fn gate(web: &WebConfig, req: &Request<Incoming>, conn: Conn) -> Result<(), Response<Body>> {
    let path = req.uri().path();
    let authenticated = match &web.auth {
        None => false,
        Some(_) if open_path(path) => false,
        Some(auth) => {
            if !auth.check(req.headers().get(header::AUTHORIZATION)).await {
                tracing::info!(peer = %conn.peer, path, "HTTP request refused: no valid basic auth");
                let mut r = text(StatusCode::UNAUTHORIZED, PLAIN, "unauthorized\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(CHALLENGE),
                );
                return Err(r);
            }
            true
        }
    };
    if path == "/-/reload"
        && req.method() == Method::POST
        && !may_reload(web.auth.is_some(), authenticated, conn)
    {
        tracing::warn!(peer = %conn.peer, "reload over HTTP refused: client not authenticated and not on loopback");
        return Err(text(
            StatusCode::FORBIDDEN,
            PLAIN,
            "reload over HTTP needs basic auth, a verified client certificate, or a loopback \
             client; or send SIGHUP\n",
        ));
    }
    Ok(())
}

/// Who may reload the config over HTTP. With basic auth on, an authenticated user (the
/// gate already refused everyone else). Without it, a client whose certificate the client
/// CA verified, or a client on this host: 127.0.0.0/8 and ::1, also as IPv4-mapped IPv6
/// from a dual-stack listener. A reverse proxy on the same host counts as on this host.
fn may_reload(basic_auth: bool, authenticated: bool, conn: Conn) -> bool {
    if basic_auth {
        return authenticated;
    }
    conn.client_cert || is_loopback(conn.peer.ip())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
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
        "/metrics" if get => metrics(service, &req),
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

/// `/metrics`: the board's rows are copied (pointers, under its lock for a moment) and
/// the body is rendered from them as the connection takes it, in the format and encoding
/// the scraper accepts; the board is never locked while the body is written.
fn metrics(service: &Service, req: &Request<Incoming>) -> Response<Body> {
    use crate::metrics::{Format, accepts_gzip};
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(header(header::ACCEPT));
    let gzip = accepts_gzip(header(header::ACCEPT_ENCODING));
    let body = service
        .metrics()
        .exposition(service.board().rows(), format, gzip);
    let mut r = text(StatusCode::OK, format.content_type(), Bytes::new());
    *r.body_mut() = body.boxed();
    let h = r.headers_mut();
    if gzip {
        h.insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
    }
    h.insert(
        header::VARY,
        header::HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    r
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str, client_cert: bool) -> Conn {
        Conn {
            peer: peer.parse().unwrap(),
            client_cert,
        }
    }

    #[test]
    fn reload_without_basic_auth_only_from_loopback_or_a_verified_certificate() {
        for local in [
            "127.0.0.1:5000",
            "127.0.0.2:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(may_reload(false, false, conn(local, false)), "{local}");
        }
        for remote in [
            "10.1.2.3:5000",
            "192.168.0.9:5000",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.1]:5000",
            "0.0.0.0:5000",
        ] {
            assert!(!may_reload(false, false, conn(remote, false)), "{remote}");
            assert!(
                may_reload(false, false, conn(remote, true)),
                "{remote} with a client certificate"
            );
        }
    }

    #[test]
    fn reload_with_basic_auth_needs_the_password_even_from_loopback() {
        assert!(!may_reload(true, false, conn("127.0.0.1:5000", false)));
        assert!(!may_reload(true, false, conn("10.1.2.3:5000", true)));
        assert!(may_reload(true, true, conn("10.1.2.3:5000", false)));
    }

    #[test]
    fn only_health_checks_are_open() {
        assert!(open_path("/healthz") && open_path("/readyz"));
        for p in [
            "/",
            "/metrics",
            "/api/v1/status",
            "/transcript",
            "/-/reload",
            "/nope",
            "/healthz/",
        ] {
            assert!(!open_path(p), "{p}");
        }
    }
}
