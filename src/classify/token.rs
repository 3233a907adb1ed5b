//! Token errors → the contract's `token_*` reasons, plus the detail shown beside them.
//!
//! Rules (docs/reasons.md): HTTP 429 is `token_throttled` whatever the body; a known AADSTS code
//! (from `error_codes`, else the description's `AADSTSnnnn:` prefix) decides before `error`;
//! an unknown code falls back on `error`; a reply that is not OAuth JSON is classified by its
//! HTTP status. Description text is never matched, with one exception: Google's JWT bearer
//! grant says a service account key was deleted or is wrong only as `invalid_grant` with
//! the fixed description `Invalid JWT Signature.`, which is `token_invalid_client`.

use crate::reason::Reason;
use crate::token::error::TokenError;

/// The reason of a known AADSTS code (docs/field-replies.md), `None` for codes we do not know.
pub fn aadsts_reason(code: u64) -> Option<Reason> {
    Some(match code {
        70008 | 700082 | 50173 | 700084 => Reason::TokenInvalidGrant,
        65001 | 65004 => Reason::TokenConsentRequired,
        50076 | 50079 | 50158 | 53003 | 70043 => Reason::TokenInteractionRequired,
        // 70021: no federated identity credential matches the assertion (workload identity);
        // 700024: the assertion is outside its validity (a stale projected token file).
        7000215 | 700027 | 70021 | 700024 => Reason::TokenInvalidClient,
        7000222 => Reason::TokenClientSecretExpired,
        // 900023: the tenant in the URL is neither a GUID nor a domain; 90002: no such tenant.
        700016 | 90002 | 900023 => Reason::TokenUnauthorizedClient,
        70011 | 500011 => Reason::TokenInvalidScope,
        // 50034: the user is not in the directory (deleted or never created); 50020: the
        // user's identity provider's account is not in the tenant.
        50057 | 50053 | 50055 | 50034 | 50020 => Reason::TokenAccountBlocked,
        50196 | 90055 => Reason::TokenThrottled,
        _ => return None,
    })
}

/// The reason of an OAuth `error` value (RFC 6749 §5.2 and OIDC).
pub fn error_reason(error: &str) -> Reason {
    match error {
        "invalid_grant" => Reason::TokenInvalidGrant,
        // Google: `deleted_client` when the OAuth client was deleted from the project.
        "invalid_client" | "deleted_client" => Reason::TokenInvalidClient,
        // Google: an "Internal" app used by an account outside its organisation.
        "unauthorized_client" | "org_internal" => Reason::TokenUnauthorizedClient,
        "invalid_scope" => Reason::TokenInvalidScope,
        // Google: a Workspace admin blocks the app or its scopes (admin consent needed).
        "consent_required" | "admin_policy_enforced" => Reason::TokenConsentRequired,
        "interaction_required" => Reason::TokenInteractionRequired,
        "temporarily_unavailable" | "server_error" => Reason::TokenServerError,
        _ => Reason::TokenError,
    }
}

/// Google's refinements of `invalid_grant`: `invalid_rapt` (re-authentication required by
/// the Workspace session control policy) is a policy that needs a person, not a dead token.
/// Google sends it as `error_subtype`, and older endpoints only inside the description as
/// `(invalid_rapt)`: a code in parentheses, not prose, so it is matched there too.
fn google_subtype_reason(body: &crate::token::OAuthErrorBody) -> Option<Reason> {
    let rapt = body.error_subtype.as_deref() == Some("invalid_rapt")
        || body
            .error_description
            .as_deref()
            .is_some_and(|d| d.contains("(invalid_rapt)"));
    (body.error == "invalid_grant" && rapt).then_some(Reason::TokenInteractionRequired)
}

/// Google's service account grant: `invalid_grant` with `Invalid JWT Signature.` means the
/// key that signed the assertion is not (or no longer) the service account's: a deleted or
/// wrong key, the client's own credential, not a user's grant.
fn google_jwt_signature_reason(body: &crate::token::OAuthErrorBody) -> Option<Reason> {
    let signature = body
        .error_description
        .as_deref()
        .is_some_and(|d| d.trim_start().starts_with("Invalid JWT Signature"));
    (body.error == "invalid_grant" && signature).then_some(Reason::TokenInvalidClient)
}

fn status_reason(status: u16) -> Reason {
    match status {
        429 => Reason::TokenThrottled,
        500..=599 => Reason::TokenServerError,
        _ => Reason::TokenError,
    }
}

pub fn reason(e: &TokenError) -> Reason {
    match e {
        TokenError::Missing { .. } => Reason::TokenMissing,
        TokenError::Network { .. } => Reason::TokenNetworkError,
        TokenError::Http { status, .. } => status_reason(*status),
        TokenError::Endpoint { status: 429, .. } => Reason::TokenThrottled,
        TokenError::Endpoint { body, .. } => body
            .aadsts_code()
            .and_then(aadsts_reason)
            .or_else(|| google_subtype_reason(body))
            .or_else(|| google_jwt_signature_reason(body))
            .unwrap_or_else(|| error_reason(&body.error)),
        TokenError::Config { .. } | TokenError::TokenFile { .. } | TokenError::Store { .. } => {
            Reason::TokenError
        }
    }
}

/// What the status page and logs show beside the reason: [`TokenError::detail`] (a
/// rendering of the error, not a classification; kept here beside [`reason`]).
pub fn detail(e: &TokenError) -> String {
    e.detail()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::error::OAuthErrorBody;

    fn ms(status: u16, error: &str, code: u64) -> TokenError {
        TokenError::Endpoint {
            status,
            body: Box::new(OAuthErrorBody {
                error: error.into(),
                error_description: Some(format!("AADSTS{code}: something.\r\nTrace ID: x")),
                error_codes: vec![code],
                trace_id: Some("trace-1".into()),
                correlation_id: Some("corr-1".into()),
                ..Default::default()
            }),
            retry_after: None,
        }
    }

    fn google(status: u16, error: &str, description: &str) -> TokenError {
        TokenError::Endpoint {
            status,
            body: Box::new(OAuthErrorBody {
                error: error.into(),
                error_description: Some(description.into()),
                ..Default::default()
            }),
            retry_after: None,
        }
    }

    /// Every AADSTS row of docs/field-replies.md, with the `error` and status Microsoft sends.
    pub const FAILURES_AADSTS: &[(u64, &str, u16, Reason)] = &[
        (70008, "invalid_grant", 400, Reason::TokenInvalidGrant),
        (700082, "invalid_grant", 400, Reason::TokenInvalidGrant),
        (50173, "invalid_grant", 400, Reason::TokenInvalidGrant),
        (700084, "invalid_grant", 400, Reason::TokenInvalidGrant),
        (65001, "invalid_grant", 400, Reason::TokenConsentRequired),
        (65004, "invalid_grant", 400, Reason::TokenConsentRequired),
        (
            50076,
            "invalid_grant",
            400,
            Reason::TokenInteractionRequired,
        ),
        (
            50079,
            "invalid_grant",
            400,
            Reason::TokenInteractionRequired,
        ),
        (
            50158,
            "invalid_grant",
            400,
            Reason::TokenInteractionRequired,
        ),
        (
            53003,
            "invalid_grant",
            400,
            Reason::TokenInteractionRequired,
        ),
        (
            70043,
            "invalid_grant",
            400,
            Reason::TokenInteractionRequired,
        ),
        (7000215, "invalid_client", 401, Reason::TokenInvalidClient),
        (
            7000222,
            "invalid_client",
            401,
            Reason::TokenClientSecretExpired,
        ),
        (700027, "invalid_client", 401, Reason::TokenInvalidClient),
        (
            700016,
            "unauthorized_client",
            400,
            Reason::TokenUnauthorizedClient,
        ),
        (
            90002,
            "invalid_request",
            400,
            Reason::TokenUnauthorizedClient,
        ),
        (70011, "invalid_scope", 400, Reason::TokenInvalidScope),
        (500011, "invalid_resource", 400, Reason::TokenInvalidScope),
        (50057, "invalid_grant", 400, Reason::TokenAccountBlocked),
        (50053, "invalid_grant", 400, Reason::TokenAccountBlocked),
        (50055, "invalid_grant", 400, Reason::TokenAccountBlocked),
        (50196, "invalid_request", 400, Reason::TokenThrottled),
        (90055, "invalid_request", 429, Reason::TokenThrottled),
    ];

    #[test]
    fn every_aadsts_code_of_failures_md() {
        for (code, error, status, want) in FAILURES_AADSTS {
            assert_eq!(reason(&ms(*status, error, *code)), *want, "AADSTS{code}");
            // The prefix counts only when error_codes is absent.
            let mut e = ms(*status, error, *code);
            if let TokenError::Endpoint { body, .. } = &mut e {
                body.error_codes.clear();
            }
            assert_eq!(reason(&e), *want, "AADSTS{code} from prefix");
        }
    }

    #[test]
    fn google_errors() {
        assert_eq!(
            reason(&google(
                400,
                "invalid_grant",
                "Token has been expired or revoked."
            )),
            Reason::TokenInvalidGrant
        );
        assert_eq!(
            reason(&google(
                401,
                "invalid_client",
                "The OAuth client was not found."
            )),
            Reason::TokenInvalidClient
        );
        assert_eq!(
            reason(&google(
                401,
                "unauthorized_client",
                "Client is unauthorized"
            )),
            Reason::TokenUnauthorizedClient
        );
    }

    /// Rule: token endpoint codes beyond the table.
    #[test]
    fn rule_codes_beyond_the_table() {
        assert_eq!(
            reason(&ms(400, "invalid_grant", 50034)),
            Reason::TokenAccountBlocked
        );
        assert_eq!(
            reason(&ms(400, "invalid_request", 900023)),
            Reason::TokenUnauthorizedClient
        );
        assert_eq!(
            reason(&ms(400, "invalid_request", 90002)),
            Reason::TokenUnauthorizedClient
        );
        // Google invalid_rapt, as error_subtype and as the description's code only.
        let mut e = google(400, "invalid_grant", "reauth related error (invalid_rapt)");
        assert_eq!(reason(&e), Reason::TokenInteractionRequired);
        if let TokenError::Endpoint { body, .. } = &mut e {
            body.error_description = Some("reauth related error".into());
            body.error_subtype = Some("invalid_rapt".into());
        }
        assert_eq!(reason(&e), Reason::TokenInteractionRequired);
        // Without the subtype it stays an invalid grant.
        assert_eq!(
            reason(&google(400, "invalid_grant", "reauth related error")),
            Reason::TokenInvalidGrant
        );
        assert_eq!(
            reason(&google(
                401,
                "deleted_client",
                "The OAuth client was deleted."
            )),
            Reason::TokenInvalidClient
        );
        assert_eq!(
            reason(&google(400, "admin_policy_enforced", "blocked by admin")),
            Reason::TokenConsentRequired
        );
        assert_eq!(
            reason(&google(403, "org_internal", "internal app")),
            Reason::TokenUnauthorizedClient
        );
        assert_eq!(
            reason(&ms(400, "invalid_grant", 50020)),
            Reason::TokenAccountBlocked
        );
    }

    /// Every recorded token body of `src/emulator/field_replies.txt`, parsed as the token
    /// client parses it and classified as the file says.
    #[test]
    fn field_token_bodies() {
        use crate::emulator::field::{Kind, replies};
        let mut n = 0;
        for f in replies().iter() {
            let Kind::Token { status } = f.kind else {
                continue;
            };
            let body: OAuthErrorBody = serde_json::from_str(&f.reply).expect(&f.reply);
            let e = TokenError::Endpoint {
                status,
                body: Box::new(body),
                retry_after: None,
            };
            assert_eq!(reason(&e), f.reason, "{} ({})", f.reply, f.source);
            n += 1;
        }
        assert!(n >= 5, "only {n} token bodies recorded");
    }

    #[test]
    fn rule_order() {
        // 429 wins over the body.
        assert_eq!(
            reason(&ms(429, "invalid_grant", 70008)),
            Reason::TokenThrottled
        );
        // A known code wins over `error`.
        assert_eq!(
            reason(&ms(400, "invalid_grant", 65001)),
            Reason::TokenConsentRequired
        );
        // error_codes wins over the description prefix.
        let mut e = ms(400, "invalid_grant", 50057);
        if let TokenError::Endpoint { body, .. } = &mut e {
            body.error_description = Some("AADSTS70011: scope".into());
        }
        assert_eq!(reason(&e), Reason::TokenAccountBlocked);
        // Unknown codes fall back on `error`.
        for (error, want) in [
            ("invalid_grant", Reason::TokenInvalidGrant),
            ("invalid_client", Reason::TokenInvalidClient),
            ("unauthorized_client", Reason::TokenUnauthorizedClient),
            ("invalid_scope", Reason::TokenInvalidScope),
            ("consent_required", Reason::TokenConsentRequired),
            ("interaction_required", Reason::TokenInteractionRequired),
            ("temporarily_unavailable", Reason::TokenServerError),
            ("server_error", Reason::TokenServerError),
            ("invalid_request", Reason::TokenError),
        ] {
            assert_eq!(reason(&ms(400, error, 9_999_999)), want, "{error}");
        }
    }

    #[test]
    fn non_oauth_replies_by_status_and_local_errors() {
        let http = |status| TokenError::Http {
            status,
            excerpt: "<html>".into(),
            retry_after: None,
        };
        assert_eq!(reason(&http(503)), Reason::TokenServerError);
        assert_eq!(reason(&http(500)), Reason::TokenServerError);
        assert_eq!(reason(&http(429)), Reason::TokenThrottled);
        assert_eq!(reason(&http(404)), Reason::TokenError);
        assert_eq!(reason(&http(200)), Reason::TokenError);
        assert_eq!(
            reason(&TokenError::Network {
                detail: "connect refused".into()
            }),
            Reason::TokenNetworkError
        );
        assert_eq!(
            reason(&TokenError::Missing {
                credential: "c".into()
            }),
            Reason::TokenMissing
        );
    }

    #[test]
    fn detail_names_code_ids_and_first_line() {
        let d = detail(&ms(400, "invalid_grant", 70008));
        assert_eq!(
            d,
            "HTTP 400; AADSTS70008; invalid_grant; AADSTS70008: something.; trace_id=trace-1; correlation_id=corr-1"
        );
    }

    /// Service accounts (Google's JWT bearer grant) and workload identity federation.
    #[test]
    fn credentials_without_a_human() {
        assert_eq!(
            reason(&google(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."
            )),
            Reason::TokenUnauthorizedClient
        );
        assert_eq!(
            reason(&google(400, "invalid_grant", "Invalid email or User ID")),
            Reason::TokenInvalidGrant
        );
        assert_eq!(
            reason(&google(400, "invalid_grant", "Invalid JWT Signature.")),
            Reason::TokenInvalidClient
        );
        // Only with invalid_grant: the same words under another error do not move it.
        assert_eq!(
            reason(&google(400, "invalid_request", "Invalid JWT Signature.")),
            Reason::TokenError
        );
        assert_eq!(
            reason(&ms(400, "invalid_client", 70021)),
            Reason::TokenInvalidClient
        );
        assert_eq!(
            reason(&ms(400, "invalid_client", 700024)),
            Reason::TokenInvalidClient
        );
    }
}
