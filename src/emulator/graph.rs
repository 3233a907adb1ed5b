//! The emulated Microsoft Graph, on the token endpoint's HTTP server: an app registration's
//! secrets and certificates (`/v1.0/applications(appId='…')`) and Exchange Online's
//! service health (`/v1.0/admin/serviceAnnouncement/healthOverviews`, `/issues`), behind
//! a bearer token this emulator issued for Graph's `.default` scope. 403 and 429 can be
//! scripted, as Graph sends them for a missing permission and for throttling.

use super::token_endpoint::IssuedToken;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

/// A client secret as Graph lists it (`passwordCredential`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuPasswordCredential {
    /// The secret's first three characters.
    pub hint: String,
    /// RFC 3339.
    pub end: String,
}

/// A certificate as Graph lists it (`keyCredential`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuKeyCredential {
    /// Base64 of the certificate's SHA-1 thumbprint.
    pub custom_key_identifier: String,
    pub end: String,
}

/// One service issue (`serviceHealthIssue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuIssue {
    pub id: String,
    pub title: String,
    pub service: String,
    /// `incident` or `advisory`.
    pub classification: String,
    pub status: String,
    pub resolved: bool,
    pub last_modified: String,
}

/// A scripted Graph failure, answered instead of the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphScript {
    /// 403 `Authorization_RequestDenied` (the permission was not consented).
    Forbidden,
    /// 429 `TooManyRequests` with `Retry-After` (seconds).
    Throttled { retry_after: u64 },
}

/// What the emulated Graph knows.
#[derive(Debug, Default)]
pub struct GraphState {
    /// App registrations by `appId`.
    pub applications: HashMap<String, (Vec<EmuPasswordCredential>, Vec<EmuKeyCredential>)>,
    /// `(service, status)`.
    pub health: Vec<(String, String)>,
    pub issues: Vec<EmuIssue>,
    pub scripts: VecDeque<GraphScript>,
    /// Requests served, by path (tests count them).
    pub requests: Vec<String>,
}

fn reply(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        serde_json::json!({"error": {"code": code, "message": message,
            "innerError": {"request-id": "00000000-0000-0000-0000-000000000000"}}}),
    )
}

/// Graph's `.default` scopes this emulator issues Graph tokens for.
fn is_graph_scope(scope: &str, base_url: &str) -> bool {
    scope == format!("{base_url}/.default")
        || [
            "https://graph.microsoft.com/.default",
            "https://graph.microsoft.us/.default",
            "https://dod-graph.microsoft.us/.default",
            "https://microsoftgraph.chinacloudapi.cn/.default",
        ]
        .contains(&scope)
}

/// Answers one Graph request. `authorization` is the request's header; `tokens` what the
/// token endpoint issued.
pub fn respond(
    st: &mut GraphState,
    tokens: &HashMap<String, IssuedToken>,
    base_url: &str,
    method: &http::Method,
    path: &str,
    query: &str,
    authorization: Option<&str>,
) -> Response<Full<Bytes>> {
    st.requests.push(path.to_owned());
    let token = authorization.and_then(|a| a.strip_prefix("Bearer "));
    let valid = token.and_then(|t| tokens.get(t)).is_some_and(|t| {
        SystemTime::now() < t.expires_at
            && t.user.is_none()
            && t.scopes.iter().any(|s| is_graph_scope(s, base_url))
    });
    if !valid {
        return error(
            401,
            "InvalidAuthenticationToken",
            "Access token is empty, expired, or not issued for Microsoft Graph.",
        );
    }
    if method != http::Method::GET {
        return error(405, "Request_BadRequest", "Only GET is served here.");
    }
    match st.scripts.pop_front() {
        Some(GraphScript::Forbidden) => {
            return error(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            );
        }
        Some(GraphScript::Throttled { retry_after }) => {
            let mut r = error(
                429,
                "TooManyRequests",
                "Too many requests. Please try again later.",
            );
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from(retry_after));
            return r;
        }
        None => {}
    }
    let query: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let filter = query.get("$filter").cloned().unwrap_or_default();
    if let Some(app_id) = path
        .strip_prefix("/v1.0/applications(appId='")
        .and_then(|r| r.strip_suffix("')"))
    {
        let Some((passwords, keys)) = st.applications.get(app_id) else {
            return error(
                404,
                "Request_ResourceNotFound",
                "Resource does not exist or one of its queried reference-property objects are not present.",
            );
        };
        let passwords: Vec<_> = passwords
            .iter()
            .map(|p| {
                serde_json::json!({"hint": p.hint, "endDateTime": p.end,
                    "displayName": "monitor", "keyId": "11111111-0000-0000-0000-000000000000",
                    "secretText": null})
            })
            .collect();
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({"customKeyIdentifier": k.custom_key_identifier,
                    "endDateTime": k.end, "type": "AsymmetricX509Cert", "usage": "Verify"})
            })
            .collect();
        return reply(
            200,
            serde_json::json!({"passwordCredentials": passwords, "keyCredentials": keys}),
        );
    }
    // `service eq 'X'` narrows to one service; `isResolved eq false` to open issues.
    let service = filter
        .split("service eq '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .map(str::to_owned);
    let open_only = filter.contains("isResolved eq false");
    let wanted = |s: &str| service.as_deref().is_none_or(|w| w == s);
    match path {
        "/v1.0/admin/serviceAnnouncement/healthOverviews" => {
            let value: Vec<_> = st
                .health
                .iter()
                .filter(|(s, _)| wanted(s))
                .map(|(s, status)| serde_json::json!({"service": s, "status": status, "id": s}))
                .collect();
            reply(200, serde_json::json!({"value": value}))
        }
        "/v1.0/admin/serviceAnnouncement/issues" => {
            let value: Vec<_> = st
                .issues
                .iter()
                .filter(|i| wanted(&i.service) && !(open_only && i.resolved))
                .map(|i| {
                    serde_json::json!({"id": i.id, "title": i.title, "service": i.service,
                        "classification": i.classification, "status": i.status,
                        "isResolved": i.resolved, "lastModifiedDateTime": i.last_modified})
                })
                .collect();
            reply(200, serde_json::json!({"value": value}))
        }
        _ => error(404, "ResourceNotFound", "Resource not found."),
    }
}
