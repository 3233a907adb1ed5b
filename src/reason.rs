//! The contract's reasons: the one stable label every probe outcome ends in.
//!
//! The names, stages and transience here are public interface (docs/reasons.md):
//! dashboards and alerts match on them, so they never change silently.

use std::fmt;

/// Where in the life of a probe a reason belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The probe succeeded.
    None,
    Token,
    Connect,
    Protocol,
    Auth,
    PostAuth,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "",
            Stage::Token => "token",
            Stage::Connect => "connect",
            Stage::Protocol => "protocol",
            Stage::Auth => "auth",
            Stage::PostAuth => "post_auth",
        }
    }
}

macro_rules! reasons {
    ($( $variant:ident => $label:literal, $stage:ident, $transient:literal, $hint:literal; )*) => {
        /// One outcome of a probe or token request, exactly as the contract names it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason { $( $variant, )* }

        impl Reason {
            /// Every reason, in the contract's order.
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];

            /// The label value used in metrics, logs and the status API.
            pub fn as_str(self) -> &'static str {
                match self { $( Reason::$variant => $label, )* }
            }

            pub fn stage(self) -> Stage {
                match self { $( Reason::$variant => Stage::$stage, )* }
            }

            /// Transient reasons are expected to clear by themselves; alerts wait longer.
            pub fn is_transient(self) -> bool {
                match self { $( Reason::$variant => $transient, )* }
            }

            /// What an operator should do about it (empty when there is nothing to do).
            pub fn hint(self) -> &'static str {
                match self { $( Reason::$variant => $hint, )* }
            }

            /// Parses a label back (used by tests and tools reading our own output).
            pub fn from_label(s: &str) -> Option<Reason> {
                match s { $( $label => Some(Reason::$variant), )* _ => None }
            }
        }
    };
}

reasons! {
    Ok => "ok", None, false, "";
    TokenMissing => "token_missing", Token, false, "run `login` for this credential";
    TokenInvalidGrant => "token_invalid_grant", Token, false, "the refresh token expired or was revoked: run `login` again";
    TokenConsentRequired => "token_consent_required", Token, false, "grant (admin) consent for the application";
    TokenInteractionRequired => "token_interaction_required", Token, false, "MFA or conditional access applies: fix the policy or exclude the identity";
    TokenInvalidClient => "token_invalid_client", Token, false, "fix the client secret or certificate";
    TokenClientSecretExpired => "token_client_secret_expired", Token, false, "the client secret expired: rotate it";
    TokenUnauthorizedClient => "token_unauthorized_client", Token, false, "fix the client id, tenant or app registration";
    TokenInvalidScope => "token_invalid_scope", Token, false, "fix the requested scope";
    TokenAccountBlocked => "token_account_blocked", Token, false, "the account is disabled, locked or its password expired";
    TokenThrottled => "token_throttled", Token, true, "the token endpoint throttles: wait, and let the cache reuse tokens";
    TokenServerError => "token_server_error", Token, true, "the token endpoint failed: wait";
    TokenNetworkError => "token_network_error", Token, true, "the token endpoint is unreachable: check egress, DNS, proxy";
    TokenError => "token_error", Token, false, "read the detail";
    DnsError => "dns_error", Connect, true, "the mail host name does not resolve";
    ConnectRefused => "connect_refused", Connect, true, "the mail server refused or could not be reached";
    ConnectTimeout => "connect_timeout", Connect, true, "TCP connect timed out: check firewalls and egress";
    TlsCertificateInvalid => "tls_certificate_invalid", Connect, false, "the server certificate is expired, untrusted or for another name";
    TlsHandshakeFailed => "tls_handshake_failed", Connect, false, "TLS failed: check the port's TLS mode (implicit or starttls)";
    StarttlsUnavailable => "starttls_unavailable", Connect, false, "the server does not offer STARTTLS: use implicit TLS or fix the server";
    ServerUnavailable => "server_unavailable", Protocol, true, "the server is temporarily unavailable";
    Throttled => "throttled", Protocol, true, "the server throttles this mailbox: reduce concurrent connections";
    MechanismUnsupported => "mechanism_unsupported", Protocol, false, "the server does not offer the configured SASL mechanism";
    Timeout => "timeout", Protocol, true, "the server stopped answering";
    ProtocolError => "protocol_error", Protocol, false, "unexpected reply or connection closed: read the transcript";
    AuthRejected => "auth_rejected", Auth, false, "check the token's scope/audience, the service principal and the mailbox permission";
    SmtpAuthDisabled => "smtp_auth_disabled", Auth, false, "enable SMTP AUTH for the tenant or the mailbox";
    AuthPolicyBlocked => "auth_policy_blocked", Auth, false, "security defaults or conditional access block the login: fix the policy";
    AuthTokenExpired => "auth_token_expired", Auth, true, "the server says the token expired or will soon: refresh earlier";
    MailboxUnavailable => "mailbox_unavailable", PostAuth, false, "logged in, but the mailbox cannot be used: enable the protocol for the mailbox, grant access";
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "duplicate label {r}");
            assert_eq!(Reason::from_label(r.as_str()), Some(*r));
            // Every failure reason tells the operator something.
            if *r != Reason::Ok {
                assert!(!r.hint().is_empty(), "{r} has no hint");
            }
        }
        assert_eq!(Reason::ALL.len(), 30);
    }

    #[test]
    fn token_reasons_are_in_token_stage() {
        for r in Reason::ALL {
            assert_eq!(
                r.as_str().starts_with("token_"),
                r.stage() == Stage::Token,
                "{r}"
            );
        }
    }
}
