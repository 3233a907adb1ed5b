//! The part of every dialogue between the greeting and authentication, written once:
//! capabilities → STARTTLS → capabilities again → require TLS → mechanism offered?
//! Each protocol gives only what differs, through [`Negotiate`].

use super::session::Session;
use super::{Phase, ProbeError, require_tls};
use crate::protocol::TlsMode;

/// What one protocol contributes to [`negotiate`].
pub(crate) trait Negotiate {
    /// The capability that advertises the upgrade: `STARTTLS` (IMAP, RFC 3501/9051;
    /// SMTP, RFC 3207) or `STLS` (POP3, RFC 2595 §4, RFC 2449).
    const STARTTLS: &'static str;

    /// Asks for and reads the capabilities, upper-cased, one entry each: IMAP's
    /// CAPABILITY atoms, POP3's CAPA lines, SMTP's EHLO keywords (after the greeting
    /// line). `after_tls` is true for the second reading, over TLS.
    async fn capabilities(s: &mut Session<'_>, after_tls: bool) -> Result<Vec<String>, ProbeError>;

    /// Sends the STARTTLS command and reads its reply: `Ok(None)` when the server agreed
    /// to the upgrade, `Ok(Some(reply))` when it refused (the reply as received).
    async fn starttls(s: &mut Session<'_>) -> Result<Option<String>, ProbeError>;

    /// The SASL mechanisms the capabilities advertise, space-separated as the server
    /// wrote them (IMAP `AUTH=` atoms, RFC 3501/9051; POP3 `SASL`, RFC 2449/5034; SMTP
    /// `AUTH`, RFC 4954), or `None` when they advertise no mechanism list.
    fn mechanisms(caps: &[String]) -> Option<String>;
}

/// Reads the capabilities, upgrades with STARTTLS when the target asks for it (then
/// reads them again), refuses to go on without TLS and checks that the configured
/// mechanism is offered. Returns the capabilities last read (IMAP looks for `SASL-IR`).
///
/// Errors: `StarttlsUnavailable` when the upgrade is not advertised or is refused, or
/// the connection is not encrypted; `MechanismUnsupported` with what was offered; the
/// protocol's own errors from reading capabilities.
pub(crate) async fn negotiate<P: Negotiate>(
    s: &mut Session<'_>,
) -> Result<Vec<String>, ProbeError> {
    s.begin(Phase::Capability);
    let mut caps = P::capabilities(s, false).await?;
    if s.spec.target.tls == TlsMode::Starttls {
        s.begin(Phase::Tls);
        // STARTTLS configured but not offered is a failure, whatever is offered in clear.
        if !caps.iter().any(|c| c == P::STARTTLS) {
            return Err(ProbeError::StarttlsUnavailable {
                detail: format!("{} not advertised", P::STARTTLS),
            });
        }
        if let Some(reply) = P::starttls(s).await? {
            return Err(ProbeError::StarttlsUnavailable { detail: reply });
        }
        s.start_tls().await?;
        // Capabilities seen before TLS may have been forged: forget them and ask again
        // (RFC 2595 §4, RFC 3207 §4.2, RFC 9051 §6.2.1).
        s.begin(Phase::Capability);
        caps = P::capabilities(s, true).await?;
    }
    // A token is never sent before TLS.
    require_tls(s)?;
    let mech = s.spec.mechanism;
    let offered = P::mechanisms(&caps);
    let offers = offered
        .as_deref()
        .is_some_and(|l| l.split_ascii_whitespace().any(|m| m == mech.sasl_name()));
    if !offers {
        return Err(ProbeError::MechanismUnsupported {
            mechanism: mech.sasl_name(),
            offered: offered.unwrap_or_else(|| "no SASL mechanism".into()),
        });
    }
    Ok(caps)
}
