//! The emulated IMAP4rev1 server (RFC 3501 / 9051 subset) with Exchange Online's replies.

use base64::prelude::*;

use super::behaviour::{
    Behaviour, Echo, FieldStage, ServerBehaviour, echo_challenge, echoed_token, field_on, judge,
};
use super::conn::{Conn, LineError};
use super::sasl::Mechanism;
use super::{Session, Shared};
use crate::protocol::Protocol;

/// Exchange shows its back-end host as base64 of UTF-16LE in the greeting.
pub(crate) fn host_token(host: &str) -> String {
    let utf16: Vec<u8> = host.encode_utf16().flat_map(u16::to_le_bytes).collect();
    BASE64_STANDARD.encode(utf16)
}

pub(crate) fn greeting(shared: &Shared) -> String {
    format!(
        "* OK The Microsoft Exchange IMAP4 service is ready. [{}]",
        host_token(&shared.hostname)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotAuthenticated,
    Authenticated,
    Selected,
}

/// What the session does after a login, per behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterLogin {
    Normal,
    NotConnected,
    TokenExpired,
    /// Every command but LOGOUT gets this recorded reply (`field_replies.txt`).
    Field(&'static super::field::FieldReply),
}

const INVALID_STATE: &str = "BAD Command received in Invalid state.";
const UNKNOWN: &str = "BAD Command Error. 12";
const REFUSED: &str = "NO AUTHENTICATE failed.";
const FLAGS: &str = r"(\Seen \Answered \Flagged \Deleted \Draft $MDNSent)";

/// Whether the auth mechanisms may be used (and are advertised) on this connection.
fn auth_allowed(conn: &Conn, s: &Session) -> bool {
    conn.is_tls() || s.server == ServerBehaviour::OfferAuthBeforeTls
}

fn capabilities(conn: &Conn, s: &Session) -> String {
    let mut caps = vec!["IMAP4", "IMAP4rev1"];
    let pre_tls = !conn.is_tls();
    if pre_tls && s.server != ServerBehaviour::OfferAuthBeforeTls {
        caps.push("LOGINDISABLED");
    }
    if pre_tls && s.server != ServerBehaviour::NoStarttls {
        caps.push("STARTTLS");
    }
    caps.extend([
        "SASL-IR",
        "UIDPLUS",
        "MOVE",
        "ID",
        "UNSELECT",
        "CHILDREN",
        "IDLE",
        "NAMESPACE",
        "LITERAL+",
    ]);
    // The AUTH= entries come last, XOAUTH2 at the very end, so the line reads like
    // Microsoft's documented `* CAPABILITY … AUTH=XOAUTH2`.
    if auth_allowed(conn, s) {
        caps.push("AUTH=PLAIN");
        if s.server != ServerBehaviour::NoXoauth2 {
            if conn.shared.oauthbearer {
                caps.push("AUTH=OAUTHBEARER");
            }
            caps.push("AUTH=XOAUTH2");
        }
    }
    format!("* CAPABILITY {}", caps.join(" "))
}

/// A tag is an atom without `+` (RFC 3501 `tag`).
fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]+".contains(&b))
}

/// Reads one command, following literals (`{n}` synchronising, `{n+}` LITERAL+) so a
/// client using them is not misparsed; the whole command stays under the line cap.
async fn read_command(conn: &mut Conn) -> Result<String, LineError> {
    let max = conn.shared.max_line;
    let mut command = conn.read_line().await?;
    loop {
        let Some((n, plus, open)) = trailing_literal(&command) else {
            return Ok(command);
        };
        if n.saturating_add(command.len()) > max {
            return Err(LineError::TooLong);
        }
        if !plus
            && conn
                .send("+ Ready for additional command text.")
                .await
                .is_err()
        {
            return Err(LineError::Closed);
        }
        let bytes = conn.read_exact_bytes(n).await?;
        // The literal's text stands where its `{n}` marker was.
        command.truncate(open);
        command.push_str(&String::from_utf8_lossy(&bytes));
        let rest = conn.read_line().await?;
        command.push_str(&rest);
        if command.len() > max {
            return Err(LineError::TooLong);
        }
    }
}

/// `{123}` or `{123+}` at the end of a line: size, LITERAL+, marker position.
fn trailing_literal(line: &str) -> Option<(usize, bool, usize)> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    let spec = &inner[open + 1..];
    let (digits, plus) = match spec.strip_suffix('+') {
        Some(d) => (d, true),
        None => (spec, false),
    };
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, plus, open))
}

/// Strips IMAP quotes from a simple astring.
fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

/// Serves one IMAP connection to its end.
pub(crate) async fn run(mut conn: Conn, s: Session) {
    let shared = conn.shared.clone();
    if s.server == ServerBehaviour::ByeGreeting {
        let _ = conn.send("* BYE Connection is closed. 13").await;
        conn.close().await;
        return;
    }
    if conn.send(&greeting(&shared)).await.is_err() {
        return;
    }
    if s.server == ServerBehaviour::ResetAfterGreeting {
        conn.reset().await;
        return;
    }
    let mut state = State::NotAuthenticated;
    let mut after = AfterLogin::Normal;
    loop {
        let line = match read_command(&mut conn).await {
            Ok(line) => line,
            Err(LineError::TooLong) => {
                let _ = conn.send("* BYE Command line too long.").await;
                conn.close().await;
                return;
            }
            Err(_) => return,
        };
        let line = line.trim_end();
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        if !valid_tag(tag) {
            if conn.send("* BAD Command Error. 12").await.is_err() {
                return;
            }
            continue;
        }
        let (name, args) = rest.trim_start().split_once(' ').unwrap_or((rest, ""));
        let name = name.to_ascii_uppercase();
        let args = args.trim();

        match after {
            AfterLogin::TokenExpired => {
                let _ = conn
                    .send("* BYE Session invalidated - AccessTokenExpired")
                    .await;
                conn.close().await;
                return;
            }
            AfterLogin::NotConnected if name != "LOGOUT" => {
                let reply = format!("{tag} BAD User is authenticated but not connected.");
                if conn.send(&reply).await.is_err() {
                    return;
                }
                continue;
            }
            AfterLogin::Field(f) if name != "LOGOUT" => {
                if conn.send_all(&f.wire_lines(tag)).await.is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }

        let tagged = |text: &str| format!("{tag} {text}");
        let mut replies: Vec<String> = Vec::new();
        match name.as_str() {
            "CAPABILITY" => {
                replies.push(capabilities(&conn, &s));
                replies.push(tagged("OK Completed"));
                if conn.send_all(&replies).await.is_err() {
                    return;
                }
                if s.server == ServerBehaviour::ResetAfterCapability {
                    conn.reset().await;
                    return;
                }
                continue;
            }
            "NOOP" | "CHECK" => replies.push(tagged(&format!("OK {name} completed."))),
            "ID" => {
                replies.push("* ID NIL".to_string());
                replies.push(tagged("OK ID completed."));
            }
            "LOGOUT" => {
                replies.push("* BYE Microsoft Exchange Server IMAP4 server signing off.".into());
                replies.push(tagged("OK LOGOUT completed."));
                let _ = conn.send_all(&replies).await;
                conn.close().await;
                return;
            }
            "STARTTLS" => {
                let reply = if conn.is_tls() || state != State::NotAuthenticated {
                    tagged(INVALID_STATE)
                } else if s.server == ServerBehaviour::NoStarttls {
                    tagged(UNKNOWN)
                } else if s.server == ServerBehaviour::RefuseStarttls {
                    tagged("NO STARTTLS is not available.")
                } else {
                    if conn
                        .send(&tagged("OK Begin TLS negotiation now."))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    conn = match conn.start_tls().await {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    continue;
                };
                replies.push(reply);
            }
            "AUTHENTICATE" => {
                if state != State::NotAuthenticated || !auth_allowed(&conn, &s) {
                    replies.push(tagged(INVALID_STATE));
                } else {
                    if s.server == ServerBehaviour::ResetAtAuth {
                        conn.reset().await;
                        return;
                    }
                    let (mech, ir) = args.split_once(' ').unwrap_or((args, ""));
                    match authenticate(&mut conn, &s, tag, mech, ir.trim()).await {
                        Some(Some(next)) => {
                            state = State::Authenticated;
                            after = next;
                        }
                        Some(None) => {}
                        None => return,
                    }
                    continue;
                }
            }
            "LOGIN" => {
                if state != State::NotAuthenticated || !auth_allowed(&conn, &s) {
                    replies.push(tagged(INVALID_STATE));
                } else {
                    // The emulator has no passwords: basic auth is always refused.
                    replies.push(tagged("NO LOGIN failed."));
                }
            }
            "SELECT" | "EXAMINE" if state != State::NotAuthenticated => {
                if args.is_empty() {
                    replies.push(tagged("BAD Command Argument Error. 11"));
                } else if unquote(args).eq_ignore_ascii_case("INBOX") {
                    replies.extend([
                        "* 0 EXISTS".to_string(),
                        "* 0 RECENT".to_string(),
                        format!("* FLAGS {FLAGS}"),
                        format!("* OK [PERMANENTFLAGS {FLAGS}] Permanent flags"),
                        "* OK [UIDVALIDITY 14] UIDVALIDITY value".to_string(),
                        "* OK [UIDNEXT 1] The next unique identifier value".to_string(),
                    ]);
                    replies.push(if name == "EXAMINE" {
                        tagged("OK [READ-ONLY] EXAMINE completed.")
                    } else {
                        tagged("OK [READ-WRITE] SELECT completed.")
                    });
                    state = State::Selected;
                } else {
                    replies.push(tagged("NO The requested item could not be found."));
                    state = State::Authenticated;
                }
            }
            "LIST" | "LSUB" if state != State::NotAuthenticated => {
                let pattern = args.rsplit(' ').next().map(unquote).unwrap_or("");
                if pattern.is_empty() {
                    replies.push(format!("* {name} (\\Noselect) \"/\" \"\""));
                } else {
                    replies.push(format!("* {name} (\\Marked \\HasNoChildren) \"/\" INBOX"));
                }
                replies.push(tagged(&format!("OK {name} completed.")));
            }
            "NAMESPACE" if state != State::NotAuthenticated => {
                replies.push("* NAMESPACE ((\"\" \"/\")) NIL NIL".into());
                replies.push(tagged("OK NAMESPACE completed."));
            }
            "STATUS" if state != State::NotAuthenticated => {
                replies.push(
                    "* STATUS INBOX (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY 14 UNSEEN 0)".into(),
                );
                replies.push(tagged("OK STATUS completed."));
            }
            "IDLE" if state != State::NotAuthenticated => {
                if conn
                    .send("+ IDLE accepted, awaiting DONE command.")
                    .await
                    .is_err()
                {
                    return;
                }
                match conn.read_line().await {
                    Ok(l) if l.trim().eq_ignore_ascii_case("DONE") => {
                        replies.push(tagged("OK IDLE completed."))
                    }
                    Ok(_) => replies.push(tagged(UNKNOWN)),
                    Err(_) => return,
                }
            }
            "FETCH" | "SEARCH" | "STORE" | "COPY" | "MOVE" | "EXPUNGE"
                if state == State::Selected =>
            {
                if name == "SEARCH" {
                    replies.push("* SEARCH".into());
                }
                replies.push(tagged(&format!("OK {name} completed.")));
            }
            "UID" if state == State::Selected => {
                let sub = args.split(' ').next().unwrap_or("").to_ascii_uppercase();
                if ["FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE"].contains(&sub.as_str()) {
                    if sub == "SEARCH" {
                        replies.push("* SEARCH".into());
                    }
                    replies.push(tagged(&format!("OK UID {sub} completed.")));
                } else {
                    replies.push(tagged(UNKNOWN));
                }
            }
            "CLOSE" | "UNSELECT" if state == State::Selected => {
                state = State::Authenticated;
                replies.push(tagged(&format!("OK {name} completed.")));
            }
            "SELECT" | "EXAMINE" | "LIST" | "LSUB" | "NAMESPACE" | "STATUS" | "IDLE" | "FETCH"
            | "SEARCH" | "STORE" | "COPY" | "MOVE" | "EXPUNGE" | "UID" | "CLOSE" | "UNSELECT"
            | "CREATE" | "DELETE" | "RENAME" | "SUBSCRIBE" | "UNSUBSCRIBE" | "APPEND" => {
                replies.push(tagged(INVALID_STATE))
            }
            _ => replies.push(tagged(UNKNOWN)),
        }
        if conn.send_all(&replies).await.is_err() {
            return;
        }
    }
}

/// Runs one AUTHENTICATE exchange and sends its final reply.
/// `None`: the connection is gone; `Some(None)`: not logged in; `Some(Some(a))`: logged in.
async fn authenticate(
    conn: &mut Conn,
    s: &Session,
    tag: &str,
    mech_name: &str,
    initial: &str,
) -> Option<Option<AfterLogin>> {
    let shared = conn.shared.clone();
    let mech = Mechanism::from_name(mech_name).filter(|m| {
        s.server != ServerBehaviour::NoXoauth2 && (*m == Mechanism::Xoauth2 || shared.oauthbearer)
    });
    let plain = mech_name.eq_ignore_ascii_case("PLAIN");
    if mech.is_none() && !plain {
        let reply = format!("{tag} NO Unsupported authentication mechanism.");
        return conn.send(&reply).await.ok().map(|_| None);
    }
    let response = if initial.is_empty() {
        conn.send("+ ").await.ok()?;
        match conn.read_line().await {
            Ok(l) => l.trim().to_string(),
            Err(LineError::TooLong) => {
                let _ = conn.send("* BYE Command line too long.").await;
                return None;
            }
            Err(_) => return None,
        }
    } else if initial == "=" {
        String::new()
    } else {
        initial.to_string()
    };
    if response == "*" {
        let reply = format!("{tag} BAD AUTHENTICATE aborted.");
        return conn.send(&reply).await.ok().map(|_| None);
    }
    let refused = format!("{tag} {REFUSED}");
    let Some(mech) = mech else {
        // PLAIN: the emulator has no passwords.
        return conn.send(&refused).await.ok().map(|_| None);
    };
    let Some((behaviour, ok)) = judge(&shared, mech, &response) else {
        return conn.send(&refused).await.ok().map(|_| None);
    };
    let success = format!("{tag} OK AUTHENTICATE completed.");
    let (reply, after) = match behaviour {
        Behaviour::Success
        | Behaviour::SmtpAuthDisabled
        | Behaviour::SmtpAuthDisabledMailbox
        | Behaviour::Slow => (success, Some(AfterLogin::Normal)),
        Behaviour::AuthenticatedNotConnected => (success, Some(AfterLogin::NotConnected)),
        Behaviour::TokenExpiring => (success, Some(AfterLogin::TokenExpired)),
        Behaviour::TokenRefused | Behaviour::PolicyBlocked | Behaviour::ConditionalAccess => {
            (refused.clone(), None)
        }
        Behaviour::Throttled => (
            format!("{tag} NO Request is throttled. Suggested Backoff Time: 299961 milliseconds"),
            None,
        ),
        Behaviour::TemporaryFailure | Behaviour::ServerError451 | Behaviour::TryAgainLater => (
            // Dovecot's words, which the response code comes from (recorded in
            // tests/integration/fixtures/dovecot_2.3_replies.txt).
            format!(
                "{tag} NO [UNAVAILABLE] Temporary authentication failure. {}",
                super::behaviour::dovecot_stamp(&shared.hostname)
            ),
            None,
        ),
        Behaviour::Echo(Echo::AuthLine) => (
            format!(
                "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials for: AUTHENTICATE {} {response}",
                mech_name.to_ascii_uppercase()
            ),
            None,
        ),
        Behaviour::Echo(Echo::Token) => (
            format!(
                "{tag} NO token {} is not valid",
                echoed_token(mech, &response)
            ),
            None,
        ),
        Behaviour::Echo(Echo::Challenge) => {
            let challenge = echo_challenge(&echoed_token(mech, &response));
            let failure = format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)");
            (
                error_challenge(conn, mech, &challenge, tag, failure).await?,
                None,
            )
        }
        Behaviour::Echo(Echo::Bye) => {
            let _ = conn.send(&format!("* BYE {response}")).await;
            return None;
        }
        Behaviour::ErrorChallenge => {
            let failure = format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)");
            (
                error_challenge(conn, mech, mech.error_challenge(), tag, failure).await?,
                None,
            )
        }
        Behaviour::Field(i) => match field_on(i, Protocol::Imap) {
            None => (success, Some(AfterLogin::Normal)),
            Some((f, FieldStage::PostAuth)) => (success, Some(AfterLogin::Field(f))),
            Some((f, FieldStage::Auth)) => (f.wire_reply(tag), None),
            Some((f, FieldStage::AuthAfterChallenge)) => (
                error_challenge(conn, mech, mech.error_challenge(), tag, f.wire_reply(tag)).await?,
                None,
            ),
        },
    };
    if behaviour == Behaviour::Slow {
        conn.delay = shared.slow_delay;
    }
    // Behaviours that end in a login still need a valid token.
    let (reply, after) = if after.is_some() && !ok {
        (refused, None)
    } else {
        (reply, after)
    };
    conn.send(&reply).await.ok()?;
    Some(after)
}

/// Gmail's error challenge: `+ <base64 JSON>`, then `final_reply` once the client answers
/// it properly. `None`: the connection is gone.
async fn error_challenge(
    conn: &mut Conn,
    mech: Mechanism,
    challenge: &str,
    tag: &str,
    final_reply: String,
) -> Option<String> {
    conn.send(&format!("+ {challenge}")).await.ok()?;
    let answer = conn.read_line().await.ok()?;
    let answer = answer.trim();
    Some(if mech.is_challenge_ack(answer) {
        final_reply
    } else if answer == "*" {
        format!("{tag} BAD AUTHENTICATE aborted.")
    } else {
        format!("{tag} BAD Invalid response to the error challenge.")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_recognised() {
        assert_eq!(trailing_literal("A1 LOGIN {5}"), Some((5, false, 9)));
        assert_eq!(trailing_literal("A1 LOGIN {12+}"), Some((12, true, 9)));
        assert_eq!(trailing_literal("A1 LOGIN {}"), None);
        assert_eq!(trailing_literal("A1 LOGIN {99999999999}"), None);
        assert_eq!(trailing_literal("A1 NOOP"), None);
    }

    #[test]
    fn tags_and_host_token() {
        assert!(valid_tag("A01"));
        assert!(!valid_tag("*"));
        assert!(!valid_tag("A+"));
        assert!(!valid_tag(""));
        assert_eq!(host_token("AB"), "QQBCAA==");
    }
}
