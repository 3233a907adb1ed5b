//! Microsoft Graph, read with a credential's own app: the end dates of its client secret
//! and certificate (`credential_expiry`) and Exchange Online's service health
//! (`service_health`).
//!
//! Needs the Graph application permissions `Application.Read.All` and
//! `ServiceHealth.Read.All` with admin consent. A Graph failure (403 for a missing
//! permission, 429 with `Retry-After`) never touches a probe's reason: it shows in
//! `mail_oauth_graph_last_success_timestamp_seconds`, on the status page and in one log
//! line. Every text that comes from outside (Graph's replies, the token endpoint's errors)
//! goes through [`crate::redact::Redactor`] and is cut to one short line.
//!
//! Sources: <https://learn.microsoft.com/graph/api/application-get>,
//! <https://learn.microsoft.com/graph/api/serviceannouncement-list-healthoverviews>,
//! <https://learn.microsoft.com/graph/api/serviceannouncement-list-issues>,
//! <https://learn.microsoft.com/graph/deployments> (national cloud hosts).

use crate::metrics::Metrics;
use crate::redact::Redactor;
use crate::secret::Secret;
use crate::status::Board;
use crate::token::http::{HttpClient, ReplyMeta};
use crate::token::{ClientAuth, Credential, TokenService};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A query `graph:` may list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphQuery {
    /// The app registration's `passwordCredentials` and `keyCredentials` end dates.
    CredentialExpiry,
    /// Exchange Online's health overview and open issues.
    ServiceHealth,
}

impl GraphQuery {
    /// The `query` label of `mail_oauth_graph_last_success_timestamp_seconds`.
    pub fn as_str(self) -> &'static str {
        match self {
            GraphQuery::CredentialExpiry => "credential_expiry",
            GraphQuery::ServiceHealth => "service_health",
        }
    }

    /// How often a successful query is repeated: end dates change when someone rotates a
    /// secret (hours are soon enough), service health is watched every 5 minutes.
    pub fn interval(self) -> Duration {
        match self {
            GraphQuery::CredentialExpiry => Duration::from_secs(6 * 3600),
            GraphQuery::ServiceHealth => Duration::from_secs(300),
        }
    }
}

/// A credential's validated `graph:` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSettings {
    pub queries: Vec<GraphQuery>,
    /// Graph's base URL, no trailing slash (`https://graph.microsoft.com`).
    pub url: String,
    /// The client credentials scope of the Graph token: `{url}/.default`.
    pub scope: String,
}

/// The service whose health is watched (Graph's `service` name).
pub const EXCHANGE_ONLINE: &str = "Exchange Online";

/// Graph's public host.
pub const GRAPH_PUBLIC: &str = "https://graph.microsoft.com";

/// Graph's base URL for an `authority`: national clouds have their own Graph host. The US
/// Government clouds share one sign-in host: it maps to GCC High's `graph.microsoft.us`;
/// DoD tenants set `graph_url: https://dod-graph.microsoft.us`.
pub fn graph_base_for_authority(authority: &str) -> &'static str {
    let host = url::Url::parse(authority)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default();
    match host.as_str() {
        "login.microsoftonline.us" => "https://graph.microsoft.us",
        "login.chinacloudapi.cn" | "login.partner.microsoftonline.cn" => {
            "https://microsoftgraph.chinacloudapi.cn"
        }
        _ => GRAPH_PUBLIC,
    }
}

/// Microsoft's service status values (`serviceHealthStatus`); anything else is `other`.
pub const HEALTH_STATUSES: [&str; 12] = [
    "serviceOperational",
    "investigating",
    "restoringService",
    "verifyingService",
    "serviceRestored",
    "postIncidentReviewPublished",
    "serviceDegradation",
    "serviceInterruption",
    "extendedRecovery",
    "falsePositive",
    "investigationSuspended",
    "other",
];

/// The `status` label for what Graph said: a known value, else `other` (no label value
/// ever comes from server text).
pub fn status_label(s: &str) -> &'static str {
    HEALTH_STATUSES
        .iter()
        .find(|k| **k == s)
        .copied()
        .unwrap_or("other")
}

/// The classifications counted by `mail_oauth_service_issues`.
pub const CLASSIFICATIONS: [&str; 2] = ["incident", "advisory"];

/// One open service issue, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    pub id: String,
    pub title: String,
    pub classification: String,
    pub service: String,
    /// Graph's `lastModifiedDateTime`, as sent (RFC 3339).
    pub last_update: String,
}

/// What the last queries of one query kind left.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryStatus {
    pub query: Option<GraphQuery>,
    #[serde(serialize_with = "ser_time")]
    pub last_success: Option<SystemTime>,
    /// The last failure, one trimmed line; cleared by a success.
    pub last_error: Option<String>,
    /// After a failure: seconds until the retry (backoff, at least `Retry-After`).
    pub retry_in_seconds: Option<u64>,
}

/// Per credential with `graph:`, what Graph said last (the status page's Graph section).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphStatus {
    pub credential: String,
    pub queries: Vec<QueryStatus>,
    /// The end date Graph holds for the client secret in use.
    #[serde(serialize_with = "ser_time")]
    pub client_secret_end: Option<SystemTime>,
    /// The end date Graph holds for the configured certificate.
    #[serde(serialize_with = "ser_time")]
    pub certificate_end: Option<SystemTime>,
    /// Disagreements worth a look (a declared date Graph contradicts).
    pub warnings: Vec<String>,
    /// `(service, status label)`.
    pub health: Vec<(String, String)>,
    pub incidents: Vec<Incident>,
}

fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&crate::status::rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// Why a Graph query failed: one short line, redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GraphError {
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// At most this many characters of outside text in a [`GraphError`].
const MESSAGE_MAX: usize = 240;

/// One line of at most [`MESSAGE_MAX`] characters, control characters blanked.
fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > MESSAGE_MAX {
        let cut: String = flat.chars().take(MESSAGE_MAX).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// Talks to Graph for one credential: its own token (the client credentials grant of
/// `crate::token::grant` for `{graph}/.default`, one per credential, cached here so that the
/// mail token's gauges and counters stay the mail token's), the token service's HTTP
/// client (bounded bodies, no redirects, `Retry-After` kept).
#[derive(Clone)]
pub struct GraphClient {
    tokens: TokenService,
    /// The configured credential, its scopes replaced by Graph's `.default`.
    cred: Credential,
    base: String,
    token: std::sync::Arc<tokio::sync::Mutex<Option<(Secret, Instant)>>>,
}

/// A Graph token is renewed this long before it expires.
const GRAPH_TOKEN_MARGIN: Duration = Duration::from_secs(300);

impl GraphClient {
    /// `None` when `cred` has no `graph:`.
    pub fn new(tokens: TokenService, cred: &Credential) -> Option<GraphClient> {
        let settings = cred.graph.as_ref()?;
        let mut graph_cred = cred.clone();
        graph_cred.scopes = vec![settings.scope.clone()];
        Some(GraphClient {
            tokens,
            base: settings.url.clone(),
            cred: graph_cred,
            token: Default::default(),
        })
    }

    /// The cached Graph token, or a new one (one request at a time: the lock is held).
    async fn access_token(&self) -> Result<Secret, crate::token::TokenError> {
        let mut cached = self.token.lock().await;
        if let Some((t, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(t.clone());
        }
        let granted = crate::token::grant::client_credentials(self.http(), &self.cred).await?;
        let lifetime = granted.lifetime.unwrap_or(Duration::from_secs(3600));
        let renew_at = Instant::now()
            + lifetime
                .saturating_sub(GRAPH_TOKEN_MARGIN)
                .max(lifetime / 2);
        *cached = Some((granted.access_token.clone(), renew_at));
        Ok(granted.access_token)
    }

    fn http(&self) -> &HttpClient {
        self.tokens.http()
    }

    /// `GET {base}{path_and_query}` with the app token; the JSON reply of a 200.
    pub async fn get(&self, path_and_query: &str) -> Result<serde_json::Value, GraphError> {
        let token = self.access_token().await.map_err(|e| {
            let reason = crate::classify::token::reason(&e);
            let detail = crate::classify::token::detail(&e);
            GraphError {
                status: None,
                retry_after: None,
                message: one_line(&format!("Graph token: {}: {detail}", reason.as_str())),
            }
        })?;
        let redactor = Redactor::new().with(&token);
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("{}{path_and_query}", self.base))
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            )
            .body(Vec::new())
            .map_err(|e| GraphError {
                status: None,
                retry_after: None,
                message: one_line(&format!("Graph request: {e}")),
            })?;
        let meta = Mutex::new(ReplyMeta::default());
        let reply = self.http().send(request, &meta).await;
        let meta = *meta.lock().unwrap_or_else(|e| e.into_inner());
        let reply = reply.map_err(|e| GraphError {
            status: None,
            retry_after: None,
            message: one_line(&redactor.redact(&format!("Graph unreachable: {e}"))),
        })?;
        let status = reply.status().as_u16();
        if status == 401 {
            // A token Graph refuses is not worth keeping.
            *self.token.lock().await = None;
        }
        if status != 200 {
            return Err(GraphError {
                status: Some(status),
                retry_after: meta.retry_after,
                message: one_line(&redactor.redact(&error_text(status, reply.body()))),
            });
        }
        serde_json::from_slice(reply.body()).map_err(|e| GraphError {
            status: Some(status),
            retry_after: None,
            message: one_line(&format!("Graph reply is not JSON: {e}")),
        })
    }
}

/// Graph's error body (`{"error":{"code","message"}}`), else the start of the body.
fn error_text(status: u16, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => format!("HTTP {status} {}: {}", b.error.code, b.error.message),
        Err(_) => format!(
            "HTTP {status}: {}",
            crate::token::http::excerpt(&body[..body.len().min(4096)])
        ),
    }
}

/// What `credential_expiry` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expiries {
    pub client_secret_end: Option<SystemTime>,
    pub certificate_end: Option<SystemTime>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Application {
    #[serde(default)]
    password_credentials: Vec<PasswordCredential>,
    #[serde(default)]
    key_credentials: Vec<KeyCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PasswordCredential {
    hint: Option<String>,
    end_date_time: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyCredential {
    custom_key_identifier: Option<String>,
    end_date_time: Option<String>,
}

fn graph_time(s: Option<&str>) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s?.trim_end_matches('Z').split('.').next()?).ok()
}

/// The SHA-1 thumbprint of the configured certificate (what Graph's
/// `customKeyIdentifier` holds for certificates uploaded to an app registration).
fn certificate_thumbprint(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let der = crate::token::assertion::certificate_der(path).map_err(|e| e.to_string())?;
    Ok(
        ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der)
            .as_ref()
            .to_vec(),
    )
}

/// Whether `custom_key_identifier` names `thumbprint`: base64 of the 20 bytes (Graph's
/// form), or base64 of the hex string (what some scripts upload).
fn thumbprint_matches(custom_key_identifier: &str, thumbprint: &[u8]) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(custom_key_identifier.trim())
    else {
        return false;
    };
    if raw == thumbprint {
        return true;
    }
    let hex: String = thumbprint.iter().map(|b| format!("{b:02x}")).collect();
    std::str::from_utf8(&raw).is_ok_and(|s| s.eq_ignore_ascii_case(&hex))
}

/// Picks, from the app registration Graph returned, the end date of the secret in use (its
/// `hint` is the secret's first three characters: never merely the soonest) and of the
/// configured certificate (by thumbprint). `secret` and `thumbprint` are what the config
/// points at; warnings never quote the secret or its hint.
pub fn pick_expiries(
    app: &serde_json::Value,
    secret: Option<&Secret>,
    thumbprint: Option<&[u8]>,
) -> Result<Expiries, String> {
    let app: Application = serde_json::from_value(app.clone())
        .map_err(|e| one_line(&format!("Graph's application reply cannot be read: {e}")))?;
    let mut out = Expiries::default();
    if let Some(secret) = secret {
        let hint: String = secret.expose().chars().take(3).collect();
        let matching: Vec<&PasswordCredential> = app
            .password_credentials
            .iter()
            .filter(|p| p.hint.as_deref() == Some(hint.as_str()))
            .collect();
        match matching.as_slice() {
            [] => out.warnings.push(format!(
                "none of the app's {} client secrets in Graph is the configured one (no hint matches)",
                app.password_credentials.len()
            )),
            [one] => out.client_secret_end = graph_time(one.end_date_time.as_deref()),
            several => {
                // Same first three characters: cannot tell them apart, so the earliest is
                // the safe date to alert on, and the page says why.
                out.client_secret_end = several
                    .iter()
                    .filter_map(|p| graph_time(p.end_date_time.as_deref()))
                    .min();
                out.warnings.push(format!(
                    "{} client secrets in Graph start like the configured one; the earliest end date is shown",
                    several.len()
                ));
            }
        }
    }
    if let Some(thumbprint) = thumbprint {
        match app.key_credentials.iter().find(|k| {
            k.custom_key_identifier
                .as_deref()
                .is_some_and(|c| thumbprint_matches(c, thumbprint))
        }) {
            Some(k) => out.certificate_end = graph_time(k.end_date_time.as_deref()),
            None => out.warnings.push(format!(
                "none of the app's {} certificates in Graph has the configured certificate's thumbprint",
                app.key_credentials.len()
            )),
        }
    }
    Ok(out)
}

/// The open issues of `service` in an `/issues` reply (`isResolved` false).
pub fn open_issues(reply: &serde_json::Value, service: &str) -> Vec<Incident> {
    let text = |v: &serde_json::Value, k: &str| one_line(v[k].as_str().unwrap_or_default());
    reply["value"]
        .as_array()
        .map(|issues| {
            issues
                .iter()
                .filter(|i| i["isResolved"].as_bool() != Some(true))
                .filter(|i| i["service"].as_str().is_none_or(|s| s == service))
                .map(|i| Incident {
                    id: text(i, "id"),
                    title: text(i, "title"),
                    classification: text(i, "classification"),
                    service: service.to_owned(),
                    last_update: text(i, "lastModifiedDateTime"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `service`'s status label in a `/healthOverviews` reply; `None` if it is not listed.
pub fn health_status(reply: &serde_json::Value, service: &str) -> Option<&'static str> {
    reply["value"]
        .as_array()?
        .iter()
        .find(|o| o["service"].as_str() == Some(service))
        .map(|o| status_label(o["status"].as_str().unwrap_or_default()))
}

/// `$filter` values, percent-encoded for the query string.
fn filter(expr: &str) -> String {
    form_urlencoded::byte_serialize(expr.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Runs a credential's Graph queries until aborted: each on its own timer, retried sooner
/// after a failure (1 min doubling up to the query's interval, never before a
/// `Retry-After`).
pub struct GraphTask {
    pub client: GraphClient,
    pub cred: Credential,
    pub metrics: std::sync::Arc<Metrics>,
    pub board: std::sync::Arc<Board>,
}

const RETRY_FIRST: Duration = Duration::from_secs(60);

impl GraphTask {
    /// Spawns the loop on the current runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        let queries = self
            .cred
            .graph
            .as_ref()
            .map(|g| g.queries.clone())
            .unwrap_or_default();
        let mut status = GraphStatus {
            credential: self.cred.name.clone(),
            queries: queries
                .iter()
                .map(|q| QueryStatus {
                    query: Some(*q),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.board.set_graph(status.clone());
        let mut next: Vec<Instant> = queries.iter().map(|_| Instant::now()).collect();
        let mut failures: Vec<u32> = queries.iter().map(|_| 0).collect();
        loop {
            let Some((i, at)) = next.iter().copied().enumerate().min_by_key(|(_, t)| *t) else {
                return;
            };
            tokio::time::sleep_until(at).await;
            let q = queries[i];
            let result = match q {
                GraphQuery::CredentialExpiry => self.credential_expiry(&mut status).await,
                GraphQuery::ServiceHealth => self.service_health(&mut status).await,
            };
            let qs = &mut status.queries[i];
            match result {
                Ok(()) => {
                    let now = SystemTime::now();
                    failures[i] = 0;
                    qs.last_success = Some(now);
                    qs.last_error = None;
                    qs.retry_in_seconds = None;
                    self.metrics
                        .set_graph_success(&self.cred.name, q.as_str(), now);
                    next[i] = Instant::now() + q.interval();
                }
                Err(e) => {
                    failures[i] = failures[i].saturating_add(1);
                    let backoff = RETRY_FIRST
                        .saturating_mul(1 << failures[i].min(8).saturating_sub(1))
                        .min(q.interval());
                    let wait = backoff.max(e.retry_after.unwrap_or_default());
                    tracing::warn!(
                        credential = %self.cred.name,
                        query = q.as_str(),
                        retry_in_s = wait.as_secs(),
                        "Microsoft Graph query failed (probes unaffected): {e}"
                    );
                    qs.last_error = Some(e.message);
                    qs.retry_in_seconds = Some(wait.as_secs());
                    next[i] = Instant::now() + wait;
                }
            }
            self.board.set_graph(status.clone());
        }
    }

    async fn credential_expiry(&self, status: &mut GraphStatus) -> Result<(), GraphError> {
        let app = self
            .client
            .get(&format!(
                "/v1.0/applications(appId='{}')?$select=passwordCredentials,keyCredentials",
                form_urlencoded::byte_serialize(self.cred.client_id.as_bytes()).collect::<String>()
            ))
            .await?;
        let auth = self.cred.client_auth.clone();
        // The secret and certificate files are read on the blocking pool, fresh each time
        // (a rotated secret is picked up).
        let material = tokio::task::spawn_blocking(move || match &auth {
            ClientAuth::Secret(source) => {
                crate::token::grant::read_secret(source).map(|s| (Some(s), None))
            }
            ClientAuth::Certificate {
                certificate_file, ..
            } => certificate_thumbprint(certificate_file).map(|t| (None, Some(t))),
            _ => Ok((None, None)),
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (secret, thumbprint) = material.map_err(|e| GraphError {
            status: None,
            retry_after: None,
            message: one_line(&e),
        })?;
        let found = pick_expiries(&app, secret.as_ref(), thumbprint.as_deref()).map_err(|m| {
            GraphError {
                status: Some(200),
                retry_after: None,
                message: m,
            }
        })?;
        let mut warnings = found.warnings;
        if let (Some(declared), Some(graph)) =
            (self.cred.client_secret_expires, found.client_secret_end)
        {
            let apart = declared
                .duration_since(graph)
                .or_else(|e| Ok::<_, ()>(e.duration()))
                .unwrap_or_default();
            // `client_secret_expires` is a day; Graph's is to the second.
            if apart > Duration::from_secs(86_400) {
                warnings.push(format!(
                    "client_secret_expires is {} but Microsoft Graph says the secret in use ends {}",
                    crate::status::rfc3339(declared),
                    crate::status::rfc3339(graph)
                ));
            }
        }
        if self.cred.client_secret_expires.is_none()
            && let Some(end) = found.client_secret_end
        {
            self.metrics.set_credential_expiry(
                &self.cred.name,
                crate::token::CredentialExpiryKind::ClientSecret,
                Some(end),
            );
        }
        status.client_secret_end = found.client_secret_end;
        status.certificate_end = found.certificate_end;
        status.warnings = warnings;
        Ok(())
    }

    async fn service_health(&self, status: &mut GraphStatus) -> Result<(), GraphError> {
        let service_filter = format!("service eq '{EXCHANGE_ONLINE}'");
        let overview = self
            .client
            .get(&format!(
                "/v1.0/admin/serviceAnnouncement/healthOverviews?$filter={}",
                filter(&service_filter)
            ))
            .await?;
        let issues = self
            .client
            .get(&format!(
                "/v1.0/admin/serviceAnnouncement/issues?$filter={}",
                filter(&format!("{service_filter} and isResolved eq false"))
            ))
            .await?;
        let state = health_status(&overview, EXCHANGE_ONLINE).unwrap_or("other");
        let open = open_issues(&issues, EXCHANGE_ONLINE);
        self.metrics
            .set_service_health(&self.cred.name, EXCHANGE_ONLINE, state);
        for class in CLASSIFICATIONS {
            let n = open.iter().filter(|i| i.classification == class).count();
            self.metrics
                .set_service_issues(&self.cred.name, EXCHANGE_ONLINE, class, n);
        }
        status.health = vec![(EXCHANGE_ONLINE.to_owned(), state.to_owned())];
        status.incidents = open;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_host_follows_the_authority() {
        assert_eq!(
            graph_base_for_authority("https://login.microsoftonline.com"),
            "https://graph.microsoft.com"
        );
        assert_eq!(
            graph_base_for_authority("https://login.microsoftonline.us/"),
            "https://graph.microsoft.us"
        );
        assert_eq!(
            graph_base_for_authority("https://LOGIN.chinacloudapi.cn"),
            "https://microsoftgraph.chinacloudapi.cn"
        );
        assert_eq!(
            graph_base_for_authority("http://127.0.0.1:4000"),
            GRAPH_PUBLIC
        );
    }

    #[test]
    fn unknown_status_is_other() {
        assert_eq!(status_label("serviceDegradation"), "serviceDegradation");
        assert_eq!(status_label("<script>"), "other");
        assert_eq!(status_label(""), "other");
    }

    #[test]
    fn the_secret_in_use_wins_over_the_soonest() {
        let app = serde_json::json!({"passwordCredentials": [
            {"hint": "old", "endDateTime": "2026-01-01T00:00:00Z"},
            {"hint": "new", "endDateTime": "2028-05-06T07:08:09.123Z"},
        ], "keyCredentials": []});
        let e = pick_expiries(&app, Some(&Secret::new("new-secret-value")), None).unwrap();
        assert_eq!(
            e.client_secret_end,
            humantime::parse_rfc3339("2028-05-06T07:08:09Z").ok()
        );
        assert!(e.warnings.is_empty());
        let none = pick_expiries(&app, Some(&Secret::new("xyz")), None).unwrap();
        assert_eq!(none.client_secret_end, None);
        assert!(!none.warnings.join(" ").contains("xyz"));
    }

    #[test]
    fn thumbprint_in_both_encodings() {
        let t = [0xabu8; 20];
        let b64 = base64::engine::general_purpose::STANDARD;
        assert!(thumbprint_matches(&b64.encode(t), &t));
        assert!(thumbprint_matches(&b64.encode("AB".repeat(20)), &t));
        assert!(!thumbprint_matches(&b64.encode([0u8; 20]), &t));
        assert!(!thumbprint_matches("not base64!", &t));
    }

    #[test]
    fn hostile_service_health_replies() {
        let overview = serde_json::json!({"value": [
            {"service": "Exchange Online", "status": "down\nnow{job=\"x\"}"},
        ]});
        assert_eq!(health_status(&overview, EXCHANGE_ONLINE), Some("other"));
        assert_eq!(
            health_status(&serde_json::json!({"value": 3}), EXCHANGE_ONLINE),
            None
        );
        assert_eq!(
            health_status(&serde_json::json!("x"), EXCHANGE_ONLINE),
            None
        );
        let issues = serde_json::json!({"value": [
            {"id": "EX1", "title": "line one\r\nline two\u{0}", "service": "Exchange Online",
             "classification": "incident", "isResolved": false},
            {"id": "EX2", "service": "Exchange Online", "isResolved": true},
            {"id": "TM1", "service": "Microsoft Teams", "isResolved": false},
            {"id": 7, "title": ["not text"]},
        ]});
        let open = open_issues(&issues, EXCHANGE_ONLINE);
        assert_eq!(open.len(), 2, "{open:?}");
        assert_eq!(open[0].title, "line one line two");
        assert_eq!(open[1].id, "");
        assert!(open_issues(&serde_json::json!({}), EXCHANGE_ONLINE).is_empty());
        let app = serde_json::json!({"passwordCredentials": "nope"});
        assert!(pick_expiries(&app, Some(&Secret::new("abc")), None).is_err());
    }

    #[test]
    fn outside_text_is_one_short_line() {
        let long = format!("a\nb\r\n{}", "x".repeat(1000));
        let l = one_line(&long);
        assert!(!l.contains('\n'));
        assert!(l.chars().count() <= MESSAGE_MAX + 1);
    }
}
