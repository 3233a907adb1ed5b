//! What the emulated provider does: token verdicts, per-user and server-wide behaviours.

use std::collections::HashSet;

/// The emulator's opinion of an access token presented by a SASL client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    /// The token is known and current.
    Valid,
    /// The token is unknown or malformed.
    Invalid,
    /// The token was once valid but has expired. Refused like `Invalid`: Exchange's
    /// refusal does not say why.
    Expired,
}

/// Decides whether a token is accepted for a user.
///
/// Kept minimal and object-safe so a token-endpoint emulator can plug in a checker
/// that knows the tokens it issued.
pub trait TokenCheck: Send + Sync {
    /// Judges `token` as presented by the SASL user `user` (as the client wrote it).
    fn check(&self, user: &str, token: &str) -> TokenVerdict;
}

/// A fixed set of accepted tokens, valid for any user.
#[derive(Debug, Clone, Default)]
pub struct StaticTokens {
    tokens: HashSet<String>,
}

impl StaticTokens {
    /// Accepts exactly the given tokens.
    pub fn new<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            tokens: tokens.into_iter().map(Into::into).collect(),
        }
    }
}

impl TokenCheck for StaticTokens {
    fn check(&self, _user: &str, token: &str) -> TokenVerdict {
        if self.tokens.contains(token) {
            TokenVerdict::Valid
        } else {
            TokenVerdict::Invalid
        }
    }
}

/// What happens to one SASL user, on every protocol, once the server has parsed the user
/// from the SASL response. Each protocol answers with its own words (see the module docs
/// of [`crate::emulator`] for the exact replies).
///
/// Behaviours that end in a login (`Success`, `Slow`, `AuthenticatedNotConnected`, the
/// IMAP/POP3 side of `SmtpAuthDisabled*` and `TokenExpiring`) need a token the
/// [`TokenCheck`] calls valid; otherwise the provider's normal refusal is sent. All other
/// behaviours answer the same whatever the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Valid token logs in, any other token gets the normal refusal.
    #[default]
    Success,
    /// Always the normal refusal (`NO AUTHENTICATE failed.`, `-ERR Authentication failure...`, `535 5.7.3`).
    TokenRefused,
    /// SMTP `535 5.7.139 ... disabled for the Tenant`; IMAP/POP3 as `Success`.
    SmtpAuthDisabled,
    /// SMTP `535 5.7.139 ... disabled for the Mailbox`; IMAP/POP3 as `Success`.
    SmtpAuthDisabledMailbox,
    /// SMTP `535 5.7.139 ... security defaults policy`; IMAP/POP3 refuse normally.
    PolicyBlocked,
    /// SMTP `535 5.7.139 ... did not meet the criteria` (conditional access); IMAP/POP3 refuse normally.
    ConditionalAccess,
    /// Login succeeds, then the mailbox cannot be used (`BAD User is authenticated but not connected.`,
    /// `-ERR Server Unavailable. 21`, `530 5.7.57`).
    AuthenticatedNotConnected,
    /// `NO Request is throttled...`, `-ERR [IN-USE] Request is throttled.`, `432 4.3.2 ...`.
    Throttled,
    /// Gmail style: an error challenge with JSON, then the final failure.
    ErrorChallenge,
    /// SMTP `501 5.5.127 ... Token will expire soon`; IMAP/POP3 log in, then the next command
    /// gets `* BYE Session invalidated - AccessTokenExpired` (POP3: `-ERR ...`) and the connection closes.
    TokenExpiring,
    /// `NO [UNAVAILABLE] Temporary authentication failure`, `-ERR [SYS/TEMP] ...`, `454 4.7.0 ...`.
    TemporaryFailure,
    /// SMTP `451 4.7.0 Temporary server error. Please try again later. PRX4 [host]`;
    /// IMAP/POP3 as `TemporaryFailure`.
    ServerError451,
    /// Gmail SMTP `421 4.7.0 Try again later, closing connection.` and close;
    /// IMAP/POP3 as `TemporaryFailure`.
    TryAgainLater,
    /// Like `Success`, but every reply from the auth step on is delayed by `slow_delay`.
    Slow,
    /// The record at this index of [`super::field::replies`], on its protocol: at `auth`,
    /// the recorded reply to the auth command (after the XOAUTH2 error challenge for
    /// `auth+challenge`); at `post_auth`, a login (valid token needed) and then the recorded
    /// reply to every command but the logout. Other protocols (and token records) behave
    /// as `Success`.
    Field(usize),
    /// A hostile or careless server that repeats what the client sent in its refusal
    /// (whatever the token): see [`Echo`].
    Echo(Echo),
}

/// What a [`Behaviour::Field`] record does on `protocol`: `None` when it is not a mail
/// record of that protocol (then the user behaves as `Success`).
pub(crate) fn field_on(
    index: usize,
    protocol: crate::protocol::Protocol,
) -> Option<(&'static super::field::FieldReply, FieldStage)> {
    let f = super::field::get(index)?;
    match f.kind {
        super::field::Kind::Mail {
            protocol: p,
            phase,
            challenge,
        } if p == protocol => Some((
            f,
            match (phase, challenge) {
                (crate::probe::Phase::PostAuth, _) => FieldStage::PostAuth,
                (_, true) => FieldStage::AuthAfterChallenge,
                (_, false) => FieldStage::Auth,
            },
        )),
        _ => None,
    }
}

/// Where a recorded reply is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldStage {
    Auth,
    AuthAfterChallenge,
    PostAuth,
}

/// What an echoing server repeats, and where. Each protocol answers in its own words:
///
/// | echo | IMAP | POP3 | SMTP |
/// |---|---|---|---|
/// | `AuthLine` | `TAG NO [AUTHENTICATIONFAILED] Invalid credentials for: AUTHENTICATE XOAUTH2 <b64>` | `-ERR [AUTH] Invalid credentials for: AUTH XOAUTH2 <b64>` | `535 5.7.8 Invalid credentials for: AUTH XOAUTH2 <b64>` |
/// | `Token` | `TAG NO token <token> is not valid` | `-ERR token <token> is not valid` | `535 5.7.3 token <token> is not valid` |
/// | `Bye` | `* BYE <b64>`, close | `-ERR <b64>`, close | `421 4.7.0 <b64>`, close |
/// | `Challenge` | `+ <b64 JSON with the token>`, then the `ErrorChallenge` refusal | same with `+` | same with `334` |
///
/// `<b64>` is the client's initial response as received, `<token>` the bearer token in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    AuthLine,
    Token,
    Bye,
    Challenge,
}

/// The bearer token inside a SASL response, for the echo behaviours (empty if malformed).
pub(crate) fn echoed_token(mech: super::sasl::Mechanism, response: &str) -> String {
    super::sasl::parse_response(mech, response)
        .map(|c| c.token)
        .unwrap_or_default()
}

/// An RFC 7628 error challenge that carries the token twice: as a JSON field and inside
/// the error text, base64-encoded as a server sends it.
pub(crate) fn echo_challenge(token: &str) -> String {
    use base64::Engine;
    let json = serde_json::json!({
        "status": "invalid_token",
        "schemes": "Bearer",
        "scope": "https://outlook.office.com/",
        "bearer_token": token,
        "error": format!("token {token} is not valid"),
    });
    base64::engine::general_purpose::STANDARD.encode(json.to_string())
}

/// What the server does before any user is known (all protocols, all ports).
///
/// On implicit-TLS ports the TLS handshake comes first and the behaviour acts inside
/// TLS, except for [`ServerBehaviour::NoTls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerBehaviour {
    /// Speaks like Exchange Online.
    #[default]
    Normal,
    /// Capabilities without XOAUTH2 and OAUTHBEARER; those mechanisms are refused.
    NoXoauth2,
    /// The plain ports do not advertise (nor accept) STARTTLS / STLS.
    NoStarttls,
    /// STARTTLS / STLS advertised but refused (`NO`, `-ERR`, `454 4.7.0 TLS not available`).
    RefuseStarttls,
    /// The plain ports advertise and accept the auth mechanisms before TLS (like Dovecot
    /// to local clients); STARTTLS still works.
    OfferAuthBeforeTls,
    /// Greeting refuses service (`* BYE ...`, `-ERR ...`, `421 4.3.2 Service not active`), then close.
    ByeGreeting,
    /// Accepts the connection and never writes.
    Silent,
    /// Writes one line without end, forever (with backpressure).
    EndlessLine,
    /// Sends the greeting one byte every 200 ms, never finishing the line.
    Trickle,
    /// 100 MB of short, well-formed lines (`* OK ...`, `+OK ...`, `220-...`), then close.
    Flood,
    /// Sends binary noise, then closes.
    Garbage,
    /// Greeting, then TCP reset.
    ResetAfterGreeting,
    /// Greeting and the first capability reply (CAPABILITY / CAPA / EHLO), then TCP reset.
    ResetAfterCapability,
    /// TCP reset when the client sends its auth command (no reply).
    ResetAtAuth,
    /// SMTP greets with `432 4.3.2 Concurrent connections limit exceeded...` and closes;
    /// IMAP/POP3 serve normally.
    ConcurrentLimit,
    /// SMTP answers AUTH with `421 4.7.66 TLS 1.0 and 1.1 are not supported...` and closes;
    /// IMAP/POP3 serve normally.
    OldTlsRejected,
    /// The implicit-TLS ports speak plain text (no TLS handshake).
    NoTls,
    /// Every reply, greeting included, is delayed by `slow_delay`.
    Slow,
}

/// Whether a behaviour that ends in a login lets this verdict in.
/// Dovecot's `[host:time]` stamp on temporary failures (`NO [UNAVAILABLE] Temporary
/// authentication failure. [mail:2026-11-21 22:02:51]`), which lets an admin find the
/// matching log line; the time is UTC here, local time in Dovecot.
pub(crate) fn dovecot_stamp(host: &str) -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let now = now.trim_end_matches('Z').replacen('T', " ", 1);
    format!("[{host}:{now}]")
}

pub(crate) fn granted(verdict: TokenVerdict) -> bool {
    verdict == TokenVerdict::Valid
}

/// Reads a SASL response: `None` if it is malformed or names no user (the caller refuses
/// normally), else the user's behaviour and whether its token lets a login through.
pub(crate) fn judge(
    shared: &super::Shared,
    mech: super::sasl::Mechanism,
    response: &str,
) -> Option<(Behaviour, bool)> {
    let creds = super::sasl::parse_response(mech, response).ok()?;
    let user = creds.user?;
    let behaviour = shared.behaviour_for(&user);
    Some((behaviour, granted(shared.check(&user, &creds.token))))
}
