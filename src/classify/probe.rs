//! Probe failures → reasons of the connect, protocol, auth and post_auth stages.

use crate::probe::{Phase, ProbeError};
use crate::reason::Reason;

/// The contract reason for a failed probe.
pub fn reason(e: &ProbeError) -> Reason {
    match e {
        ProbeError::Resolve { .. } => Reason::DnsError,
        ProbeError::Connect { .. } => Reason::ConnectRefused,
        ProbeError::ConnectTimeout { .. } => Reason::ConnectTimeout,
        ProbeError::Tls {
            certificate: true, ..
        } => Reason::TlsCertificateInvalid,
        ProbeError::Tls { .. } => Reason::TlsHandshakeFailed,
        ProbeError::StarttlsUnavailable { .. } => Reason::StarttlsUnavailable,
        ProbeError::MechanismUnsupported { .. } => Reason::MechanismUnsupported,
        ProbeError::Timeout { .. } => Reason::Timeout,
        ProbeError::Closed { .. }
        | ProbeError::Io { .. }
        | ProbeError::LineTooLong { .. }
        | ProbeError::TooMuchData { .. }
        | ProbeError::Unexpected { .. } => Reason::ProtocolError,
        ProbeError::Refused { phase, reply, .. } => refusal(*phase, reply),
    }
}

/// A server's "no": decided by codes and stable words first, by phase last.
///
/// The order is the contract's ("Rules where two rows could apply"): token expiry, the
/// `5.7.139` variants, `4.7.66`, then connection and rate limits (whatever the status word,
/// response code or stage), then temporary failures, then the phase.
fn refusal(phase: Phase, reply: &str) -> Reason {
    let text = reply.to_ascii_lowercase();
    let has = |w: &str| text.contains(w);
    let code = smtp_code(reply);

    // Expiry first: `* BYE ... AccessTokenExpired` wins even after a tagged OK.
    if has("accesstokenexpired") || has("5.5.127") || has("token will expire") {
        return Reason::AuthTokenExpired;
    }
    if has("5.7.139") {
        return if has("smtpclientauthentication") {
            Reason::SmtpAuthDisabled
        } else if has("credentials were incorrect") {
            Reason::AuthRejected
        } else {
            Reason::AuthPolicyBlocked
        };
    }
    // `421 4.7.66 TLS 1.0 and 1.1 are not supported`: the TLS version, not the server.
    if has("4.7.66") {
        return Reason::TlsHandshakeFailed;
    }
    if is_limit(&text, code) {
        return Reason::Throttled;
    }
    if is_temporary(&text, code) {
        return Reason::ServerUnavailable;
    }
    match phase {
        Phase::Greeting => Reason::ServerUnavailable,
        Phase::Auth => Reason::AuthRejected,
        Phase::PostAuth => Reason::MailboxUnavailable,
        Phase::Tls => Reason::StarttlsUnavailable,
        Phase::Resolve | Phase::Connect | Phase::Capability => Reason::ProtocolError,
    }
}

/// SMTP's three-digit code, when the reply is an SMTP reply (`NNN ` or `NNN-`).
fn smtp_code(reply: &str) -> Option<u16> {
    reply
        .get(..3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| {
            reply
                .as_bytes()
                .get(3)
                .is_none_or(|b| *b == b' ' || *b == b'-')
        })
}

/// Connection and rate limits, by response code (RFC 5530 `[LIMIT]`, RFC 2449 `[IN-USE]`,
/// Gmail's `[OVERQUOTA]` for its bandwidth limits), SMTP code (`432 4.3.2`; `421 4.7.0`
/// unless its words blame the server, as Exchange's "Temporary server error" and Gmail's
/// "Temporary System Problem" do) or the stable words servers use for them (Gmail's "Too
/// many simultaneous connections", Dovecot's "Maximum number of connections", Gmail's "Too
/// many login attempts", Exchange's "Request is throttled").
fn is_limit(text: &str, code: Option<u16>) -> bool {
    const CODES: &[&str] = &["[limit]", "[in-use]", "[overquota]", "[throttled]"];
    const WORDS: &[&str] = &[
        "throttl",
        "too many",
        "maximum number of connections",
        "connection limit",
        "connections limit",
        "concurrent connections",
        "simultaneous connections",
        "rate limit",
        "bandwidth limit",
    ];
    CODES.iter().chain(WORDS).any(|w| text.contains(w))
        || (code == Some(432) && text.contains("4.3.2"))
        || (code == Some(421) && text.contains("4.7.0") && !blames_server(text))
}

/// Words that put the fault on the server itself (not on how much the client asks).
fn blames_server(text: &str) -> bool {
    [
        "server error",
        "system problem",
        "system error",
        "internal error",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// Temporary failures: RFC 5530 `[UNAVAILABLE]` and `[SERVERBUG]`, RFC 3206 `[SYS/TEMP]`,
/// Yahoo's `[TEMPFAIL]`, any 4xx SMTP reply, or (for IMAP and POP3, which carry no code)
/// words saying the server cannot serve for now (Exchange's `Server Unavailable. 15`,
/// Gmail's `System Error (Failure)`, Dovecot's `Internal error occurred`). A 5xx SMTP reply
/// is permanent whatever its words.
fn is_temporary(text: &str, code: Option<u16>) -> bool {
    const CODES: &[&str] = &["[unavailable]", "[sys/temp]", "[tempfail]", "[serverbug]"];
    const WORDS: &[&str] = &[
        "server unavailable",
        "service unavailable",
        "temporar",
        "try again later",
        "system error",
        "server error",
        "internal error",
    ];
    match code {
        Some(c) => (400..500).contains(&c),
        // An untagged IMAP BYE: the server ends the session (the contract's "BYE").
        None => text.starts_with("* bye") || CODES.iter().chain(WORDS).any(|w| text.contains(w)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(phase: Phase, reply: &str) -> Reason {
        reason(&ProbeError::Refused {
            phase,
            reply: reply.into(),
            challenge: None,
        })
    }

    /// Every reply of docs/field-replies.md, with the phase it arrives in, and variants a
    /// real server sends (another bracketed host, other case, multi-line).
    #[test]
    fn every_reply_of_failures_md() {
        use Phase::*;
        use Reason::*;
        let cases: &[(Phase, &str, Reason)] = &[
            // Exchange Online
            (Auth, "A01 NO AUTHENTICATE failed.", AuthRejected),
            (Auth, "a01 no authenticate FAILED.", AuthRejected),
            (
                PostAuth,
                "A02 BAD User is authenticated but not connected.",
                MailboxUnavailable,
            ),
            (
                PostAuth,
                "* BYE Session invalidated - AccessTokenExpired",
                AuthTokenExpired,
            ),
            (
                Auth,
                "* BYE Session invalidated - AccessTokenExpired",
                AuthTokenExpired,
            ),
            (
                Auth,
                "A01 NO Request is throttled. Suggested Backoff Time: 299961 milliseconds",
                Throttled,
            ),
            (
                PostAuth,
                "E01 NO Request is throttled. Suggested Backoff Time: 1000 milliseconds",
                Throttled,
            ),
            (
                Auth,
                "-ERR Authentication failure: unknown user name or bad password.",
                AuthRejected,
            ),
            (
                Auth,
                "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
                AuthRejected,
            ),
            (
                Auth,
                "535 5.7.3 Authentication unsuccessful [AM0PR01CA0123.eurprd01.prod.exchangelabs.com]",
                AuthRejected,
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [host]",
                SmtpAuthDisabled,
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [BN8PR12CA0001.namprd12.prod.outlook.com]",
                SmtpAuthDisabled,
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
                AuthPolicyBlocked,
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.",
                AuthPolicyBlocked,
            ),
            (
                Auth,
                "530 5.7.57 Client not authenticated to send mail.",
                AuthRejected,
            ),
            (
                PostAuth,
                "530 5.7.57 Client not authenticated to send mail.",
                MailboxUnavailable,
            ),
            (
                Auth,
                "451 4.7.0 Temporary server error. Please try again later. PRX4 [host]",
                ServerUnavailable,
            ),
            (
                Greeting,
                "421 4.3.2 Service not active [host]",
                ServerUnavailable,
            ),
            (
                Auth,
                "421 4.3.2 Service not active [DM6PR02CA0042.namprd02.prod.outlook.com]",
                ServerUnavailable,
            ),
            (
                Greeting,
                "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [host]",
                Throttled,
            ),
            (
                Auth,
                "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [CH2PR04CA0001.namprd04.prod.outlook.com]",
                Throttled,
            ),
            (
                Greeting,
                "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls. [host]",
                TlsHandshakeFailed,
            ),
            (
                Auth,
                "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
                AuthTokenExpired,
            ),
            // Gmail
            (
                Auth,
                "A01 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)",
                AuthRejected,
            ),
            (
                Auth,
                "535-5.7.8 Username and Password not accepted. For more information, go to\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials x1-20020a05 - gsmtp",
                AuthRejected,
            ),
            (
                Auth,
                "454 4.7.0 Cannot authenticate due to temporary system problem. Try again later.",
                ServerUnavailable,
            ),
            (
                Greeting,
                "421 4.7.0 Try again later, closing connection.",
                Throttled,
            ),
            (
                Auth,
                "421 4.7.0 Try again later, closing connection.",
                Throttled,
            ),
            // Dovecot (issue 5's facts) and RFC 5530 response codes
            (
                Auth,
                "A01 NO [AUTHENTICATIONFAILED] Authentication failed.",
                AuthRejected,
            ),
            (Auth, "-ERR [AUTH] Authentication failed.", AuthRejected),
            (Auth, "535 5.7.8 Authentication failed.", AuthRejected),
            (
                Auth,
                "A01 NO [UNAVAILABLE] Temporary authentication failure. [host:2026-11-21]",
                ServerUnavailable,
            ),
            (
                Auth,
                "-ERR [SYS/TEMP] Temporary authentication failure.",
                ServerUnavailable,
            ),
            (Auth, "A01 NO [LIMIT] Too many connections", Throttled),
            (Auth, "-ERR [IN-USE] Mailbox locked", Throttled),
            // Greetings that are not OK
            (Greeting, "* BYE Server shutting down", ServerUnavailable),
            (Greeting, "-ERR Server unavailable", ServerUnavailable),
            (Greeting, "554 5.3.2 Service unavailable", ServerUnavailable),
            // Post-auth checks that fail
            (
                PostAuth,
                "E01 NO [NONEXISTENT] Mailbox doesn't exist: INBOX",
                MailboxUnavailable,
            ),
            (PostAuth, "-ERR Server Unavailable. 21", ServerUnavailable),
            (
                PostAuth,
                "421 4.4.2 Connection dropped due to timeout",
                ServerUnavailable,
            ),
            // Capability refused
            (Capability, "C01 BAD Command Error. 12", ProtocolError),
            (Capability, "500 5.5.1 Unrecognized command", ProtocolError),
        ];
        for (phase, reply, want) in cases {
            assert_eq!(refused(*phase, reply), *want, "{phase}: {reply}");
        }
    }

    /// Rule: connection and rate limits are `throttled`, whatever status word, response
    /// code or stage carries them.
    #[test]
    fn rule_limits_are_throttled_at_every_stage() {
        use Phase::*;
        let replies = [
            "A01 NO [ALERT] Too many simultaneous connections. (Failure)",
            "A01 NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)",
            "454 4.7.0 Too many login attempts, please try again later. x1-20020a05 - gsmtp",
            "E01 NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)",
            "-ERR [IN-USE] Unable to lock maildrop",
            "* BYE [ALERT] Too many simultaneous connections. (Failure)",
            "A01 BAD Too many connections",
        ];
        for reply in replies {
            for phase in [Greeting, Capability, Auth, PostAuth] {
                assert_eq!(refused(phase, reply), Reason::Throttled, "{phase}: {reply}");
            }
        }
    }

    /// Rule: after login, words saying the server is temporarily unable are
    /// `server_unavailable`; replies naming the mailbox or account are `mailbox_unavailable`.
    #[test]
    fn rule_post_login_temporary_failures() {
        use Phase::PostAuth;
        for reply in [
            "E01 NO Server Unavailable. 15",
            "-ERR Server Unavailable. 21",
            "E01 NO System Error (Failure)",
            "E01 NO [UNAVAILABLE] UID FETCH Service is temporarily not available",
            "E01 NO [TEMPFAIL] Temporary failure on server",
            "451 4.3.0 Temporary server error",
        ] {
            assert_eq!(
                refused(PostAuth, reply),
                Reason::ServerUnavailable,
                "{reply}"
            );
        }
        for reply in [
            "E01 BAD User is authenticated but not connected.",
            "-ERR User is authenticated but not connected.",
            "E01 NO [NONEXISTENT] Mailbox doesn't exist: INBOX",
            "E01 NO The requested item could not be found.",
            "530 5.7.57 Client not authenticated to send mail.",
        ] {
            assert_eq!(
                refused(PostAuth, reply),
                Reason::MailboxUnavailable,
                "{reply}"
            );
        }
        // The server ends the session: `* BYE`, whatever it says.
        assert_eq!(
            refused(PostAuth, "* BYE Connection closed. 14"),
            Reason::ServerUnavailable
        );
        assert_eq!(
            refused(Phase::Auth, "* BYE Jakarta is shutting down"),
            Reason::ServerUnavailable
        );
        // A 5xx SMTP reply is permanent, whatever its words.
        assert_eq!(
            refused(PostAuth, "554 5.3.2 Service unavailable, try again later"),
            Reason::MailboxUnavailable
        );
    }

    /// `421 4.7.0` is a rate limit unless its words blame the server; `432` is the
    /// concurrent-connection limit only as `4.3.2`.
    #[test]
    fn rule_421_4_7_0_and_432() {
        let r = |s| refused(Phase::Auth, s);
        assert_eq!(
            r("421 4.7.0 Try again later, closing connection."),
            Reason::Throttled
        );
        assert_eq!(
            r(
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints"
            ),
            Reason::Throttled
        );
        assert_eq!(
            r(
                "421 4.7.0 Temporary System Problem.  Try again later (10). q123-v6sm5523809pfq.169 - gsmtp"
            ),
            Reason::ServerUnavailable
        );
        assert_eq!(
            r("421 4.7.0 Temporary server error. Please try again later. PRX4 [host]"),
            Reason::ServerUnavailable
        );
        assert_eq!(
            r("432 4.7.12 A password transition is needed"),
            Reason::ServerUnavailable
        );
        assert_eq!(
            refused(
                Phase::PostAuth,
                "E01 NO [SERVERBUG] Internal error occurred. Refer to server log for more information. [2022-07-07 18:46:51]"
            ),
            Reason::ServerUnavailable
        );
    }

    /// Rule: `5.7.139` names SmtpClientAuthentication → `smtp_auth_disabled`, incorrect
    /// credentials → `auth_rejected`, anything else → `auth_policy_blocked`.
    #[test]
    fn rule_5_7_139_variants() {
        let r = |s| refused(Phase::Auth, s);
        assert_eq!(
            r(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [h]"
            ),
            Reason::SmtpAuthDisabled
        );
        assert_eq!(
            r(
                "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect. [PH0PR07CA0004.namprd07.prod.outlook.com]"
            ),
            Reason::AuthRejected
        );
        assert_eq!(
            r("535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [h]"),
            Reason::AuthPolicyBlocked
        );
        assert_eq!(
            r(
                "535 5.7.139 Authentication unsuccessful, the organization configuration does not allow this authentication request. [h]"
            ),
            Reason::AuthPolicyBlocked
        );
    }

    /// Rule: `421 4.7.66` (TLS version refused) is `tls_handshake_failed` at any stage.
    #[test]
    fn rule_4_7_66_is_tls() {
        for phase in [Phase::Greeting, Phase::Capability, Phase::Auth] {
            assert_eq!(
                refused(phase, "421 4.7.66 TLS 1.0 and 1.1 are not supported. [h]"),
                Reason::TlsHandshakeFailed
            );
        }
    }

    /// Every recorded field reply of `src/emulator/field_replies.txt`, classified as the
    /// file says (the same records are replayed over real sockets in the integration tests).
    #[test]
    fn field_replies() {
        use crate::emulator::field::{Kind, replies};
        let mut n = 0;
        for f in replies().iter() {
            let Kind::Mail { phase, .. } = f.kind else {
                continue;
            };
            let wire = f.wire_reply("A01");
            assert_eq!(
                refused(phase, &wire),
                f.reason,
                "{} ({})",
                f.reply,
                f.source
            );
            n += 1;
        }
        assert!(n >= 10, "only {n} mail replies recorded");
    }

    #[test]
    fn non_reply_failures() {
        use Reason::*;
        let cases = [
            (
                ProbeError::Resolve {
                    host: "x".into(),
                    message: "nxdomain".into(),
                },
                DnsError,
            ),
            (
                ProbeError::Connect {
                    addr: "x".into(),
                    message: "refused".into(),
                },
                ConnectRefused,
            ),
            (
                ProbeError::ConnectTimeout { addr: "x".into() },
                ConnectTimeout,
            ),
            (
                ProbeError::Tls {
                    certificate: true,
                    message: "expired".into(),
                },
                TlsCertificateInvalid,
            ),
            (
                ProbeError::Tls {
                    certificate: false,
                    message: "corrupt".into(),
                },
                TlsHandshakeFailed,
            ),
            (
                ProbeError::StarttlsUnavailable {
                    detail: "no".into(),
                },
                StarttlsUnavailable,
            ),
            (
                ProbeError::MechanismUnsupported {
                    mechanism: "XOAUTH2",
                    offered: "PLAIN".into(),
                },
                MechanismUnsupported,
            ),
            (
                ProbeError::Timeout {
                    phase: Phase::Greeting,
                },
                Timeout,
            ),
            (ProbeError::Closed { phase: Phase::Auth }, ProtocolError),
            (
                ProbeError::Io {
                    phase: Phase::Auth,
                    message: "reset".into(),
                },
                ProtocolError,
            ),
            (
                ProbeError::LineTooLong {
                    phase: Phase::Greeting,
                    limit: 1,
                },
                ProtocolError,
            ),
            (
                ProbeError::TooMuchData {
                    phase: Phase::Greeting,
                    limit: 1,
                },
                ProtocolError,
            ),
            (
                ProbeError::Unexpected {
                    phase: Phase::Greeting,
                    reply: "garbage".into(),
                },
                ProtocolError,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(reason(&e), want, "{e:?}");
        }
    }

    #[test]
    fn detail_keeps_reply_and_challenge() {
        let e = ProbeError::Refused {
            phase: Phase::Auth,
            reply: "A01 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)".into(),
            challenge: Some(r#"{"status":"400"}"#.into()),
        };
        assert_eq!(reason(&e), Reason::AuthRejected);
        assert_eq!(
            e.detail(),
            r#"A01 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure) (challenge: {"status":"400"})"#
        );
    }
}
