//! The HTTP server (hyper 1): `/metrics`, `/healthz`, `/readyz`, the status page, its
//! JSON, the last transcripts, and `POST /-/reload`.

mod auth;
mod listener;
pub mod page;
mod tls;
pub mod web_config;

pub use web_config::WebConfig;

use crate::Protocol;
use crate::service::Service;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use tokio::sync::Semaphore;

pub use listener::{
    HEADER_TIMEOUT, MAX_BUF, MAX_CONNECTIONS, MAX_REQUESTS_PER_CONNECTION, WRITE_TIMEOUT,
    serve_with,
};

/// A whole body (pages, JSON) or one rendered as it is sent (`/metrics`).
type Body = BoxBody<Bytes, Infallible>;

/// What the server knows about a connection beyond its requests.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    /// The client presented a certificate the configured client CA verified.
    client_cert: bool,
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
        Ok(()) => route(service, req, conn.peer, web.telemetry_path()).await,
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
        && cross_site(req.headers(), web.is_tls())
    {
        // A browser page elsewhere posting to the exporter (CSRF): the browser sends the
        // page's Origin, and a loopback peer or remembered basic auth must not vouch for it.
        tracing::warn!(peer = %conn.peer, "reload over HTTP refused: cross-site request");
        return Err(text(
            StatusCode::FORBIDDEN,
            PLAIN,
            "reload over HTTP refused: the request comes from a page of another site (Origin); \
             use curl, kubectl or SIGHUP\n",
        ));
    }
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

/// A request a browser sent on behalf of a page of another site: its `Origin` is not this
/// exporter's own (`http(s)://` + the `Host` it was sent to; `null` is never ours), or,
/// without `Origin`, `Sec-Fetch-Site` says it is not same-origin. Clients that are not
/// browsers (curl, kubectl, Prometheus) send neither header. RFC 6454 section 7,
/// Fetch Metadata (W3C).
fn cross_site(headers: &HeaderMap, tls: bool) -> bool {
    let value = |name| {
        headers
            .get(name)
            .map(|v: &header::HeaderValue| v.to_str().ok())
    };
    match value(header::ORIGIN) {
        Some(origin) => {
            let host = value(header::HOST).flatten();
            match (origin, host) {
                (Some(origin), Some(host)) => {
                    origin_of(origin)
                        != origin_of(&format!("{}://{host}", if tls { "https" } else { "http" }))
                }
                _ => true,
            }
        }
        None => match value(header::HeaderName::from_static("sec-fetch-site")) {
            None => false,
            Some(site) => !matches!(site, Some("same-origin" | "none")),
        },
    }
}

/// An origin in a comparable form: lower case, the scheme's default port dropped.
/// `None` for what is not `http(s)://host[:port]` (`null`, a path, userinfo).
fn origin_of(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let (scheme, rest) = s.split_once("://")?;
    let default = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    Some(format!(
        "{scheme}://{}",
        rest.strip_suffix(default).unwrap_or(rest)
    ))
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
    telemetry_path: &str,
) -> Response<Body> {
    let board = service.board();
    let path = match req.uri().path() {
        // `--web.telemetry-path`: the metrics are there, and only there.
        p if p == telemetry_path => "/metrics".to_string(),
        "/metrics" => String::new(),
        p => p.to_string(),
    };
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
        "/" if get => {
            let board = board.clone();
            off_the_runtime("text/html; charset=utf-8", move || {
                Ok(page::render(&board.snapshot()).into_bytes())
            })
            .await
        }
        "/api/v1/status" if get => {
            let board = board.clone();
            off_the_runtime("application/json", move || {
                serde_json::to_vec_pretty(&board.snapshot()).map_err(|e| e.to_string())
            })
            .await
        }
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

/// Renders a status page (HTML or JSON, one row per mailbox × protocol: large for a large
/// fleet) on a blocking thread, one at a time and then a pause as long as the render, so
/// that a client asking for it over and over on hundreds of connections costs at most half
/// a core and never takes the runtime's
/// worker threads from the probes, `/healthz`, `/readyz` and `/metrics`. At most
/// [`PAGES_IN_FLIGHT`] rendered pages exist at once: each holds its turn until the client
/// has received it (or the connection is gone), so clients that never read cannot make
/// the process hold a page per connection.
async fn off_the_runtime(
    content_type: &'static str,
    render: impl FnOnce() -> Result<Vec<u8>, String> + Send + 'static,
) -> Response<Body> {
    static IN_FLIGHT: Semaphore = Semaphore::const_new(PAGES_IN_FLIGHT);
    static RENDERING: Semaphore = Semaphore::const_new(1);
    let (Ok(in_flight), Ok(rendering)) = (IN_FLIGHT.acquire().await, RENDERING.acquire().await)
    else {
        return text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "shutting down\n");
    };
    let started = tokio::time::Instant::now();
    let rendered = tokio::task::spawn_blocking(render).await;
    // The next render waits as long again: pages asked for without pause cost at most
    // half a core.
    let spent = started.elapsed();
    tokio::spawn(async move {
        tokio::time::sleep(spent).await;
        drop(rendering);
    });
    match rendered {
        Ok(Ok(page)) => text(
            StatusCode::OK,
            content_type,
            Bytes::from_owner(Sending(page, in_flight)),
        ),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
    }
}

/// Rendered status pages that may exist at once (being sent, or waiting for a client that
/// reads slowly); more requests wait their turn.
const PAGES_IN_FLIGHT: usize = 4;

/// A rendered page and its turn, released when hyper drops the body.
struct Sending(
    Vec<u8>,
    #[allow(dead_code)] tokio::sync::SemaphorePermit<'static>,
);

impl AsRef<[u8]> for Sending {
    fn as_ref(&self) -> &[u8] {
        &self.0
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

/// `/transcript?credential=NAME`: the credential's last token exchange, redacted.
fn token_transcript(service: &Service, name: &str) -> Response<Body> {
    let Some((c, exchange)) = service.board().token_transcript(name) else {
        return text(StatusCode::NOT_FOUND, PLAIN, "no such credential\n");
    };
    let mut body = format!(
        "# credential {} ({} grant): the last token request\n",
        c.name, c.grant
    );
    match exchange {
        None => body.push_str("# no token request made yet\n"),
        Some((at, t)) => {
            body.push_str(&format!(
                "# ended {}{}\n",
                crate::status::rfc3339(at),
                match c.failing() {
                    Some(f) => format!(": {}", f.reason),
                    None => String::new(),
                }
            ));
            body.push_str(&t);
        }
    }
    text(StatusCode::OK, PLAIN, body)
}

fn transcript(service: &Service, req: &Request<Incoming>) -> Response<Body> {
    if let Some(name) = query_param(req, "credential") {
        return token_transcript(service, &name);
    }
    let (Some(mailbox), Some(protocol)) = (
        query_param(req, "mailbox"),
        query_param(req, "protocol").and_then(|p| p.parse::<Protocol>().ok()),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            PLAIN,
            "usage: /transcript?mailbox=NAME&protocol=imap|pop3|smtp or /transcript?credential=NAME\n",
        );
    };
    match service
        .board()
        .transcript(&crate::status::Key::new(&mailbox, protocol))
    {
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

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_reload_from_another_sites_page_is_cross_site() {
        for (pairs, tls) in [
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "http://evil.example"),
                ],
                false,
            ),
            (vec![("host", "127.0.0.1:9925"), ("origin", "null")], false),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "http://127.0.0.1:9926"),
                ],
                false,
            ),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "https://127.0.0.1:9925"),
                ],
                false,
            ),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "http://127.0.0.1:9925"),
                ],
                true,
            ),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "http://127.0.0.1:9925.evil.example"),
                ],
                false,
            ),
            (
                vec![
                    ("host", "exporter"),
                    ("origin", "http://exporter@evil.example"),
                ],
                false,
            ),
            (vec![("origin", "http://127.0.0.1:9925")], false),
            (
                vec![("host", "127.0.0.1:9925"), ("sec-fetch-site", "cross-site")],
                false,
            ),
            (
                vec![("host", "127.0.0.1:9925"), ("sec-fetch-site", "same-site")],
                false,
            ),
        ] {
            assert!(cross_site(&headers(&pairs), tls), "{pairs:?} tls={tls}");
        }
        for (pairs, tls) in [
            (vec![("host", "127.0.0.1:9925")], false),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("origin", "http://127.0.0.1:9925"),
                ],
                false,
            ),
            (
                vec![
                    ("host", "Exporter.Example:80"),
                    ("origin", "http://exporter.example"),
                ],
                false,
            ),
            (
                vec![
                    ("host", "exporter.example"),
                    ("origin", "https://exporter.example:443"),
                ],
                true,
            ),
            (
                vec![("host", "[::1]:9925"), ("origin", "http://[::1]:9925")],
                false,
            ),
            (
                vec![
                    ("host", "127.0.0.1:9925"),
                    ("sec-fetch-site", "same-origin"),
                ],
                false,
            ),
            (
                vec![("host", "127.0.0.1:9925"), ("sec-fetch-site", "none")],
                false,
            ),
        ] {
            assert!(!cross_site(&headers(&pairs), tls), "{pairs:?} tls={tls}");
        }
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
