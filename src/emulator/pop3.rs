//! The emulated POP3 server (RFC 1939, 2449 CAPA, 2595 STLS, 5034 AUTH) with Exchange Online's replies.

use super::behaviour::{
    Behaviour, Echo, FieldStage, ServerBehaviour, echo_challenge, echoed_token, field_on, judge,
};
use super::conn::{Conn, LineError};
use super::imap::host_token;
use super::sasl::Mechanism;
use super::{Session, Shared};
use crate::protocol::Protocol;

pub(crate) fn greeting(shared: &Shared) -> String {
    format!(
        "+OK The Microsoft Exchange POP3 service is ready. [{}]",
        host_token(&shared.hostname)
    )
}

const INVALID_STATE: &str = "-ERR Command is not valid in this state.";
const UNKNOWN: &str = "-ERR Protocol error. 14";
const REFUSED: &str = "-ERR Authentication failure: unknown user name or bad password.";
const OUT_OF_RANGE: &str = "-ERR The specified message is out of range.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterLogin {
    Normal,
    NotConnected,
    TokenExpired,
    /// Every command but QUIT gets this recorded reply (`field_replies.txt`).
    Field(&'static super::field::FieldReply),
}

fn auth_allowed(conn: &Conn, s: &Session) -> bool {
    conn.is_tls() || s.server == ServerBehaviour::OfferAuthBeforeTls
}

/// The SASL mechanisms offered on this connection, in CAPA order.
fn mechanisms(conn: &Conn, s: &Session) -> Vec<&'static str> {
    let mut mechs = vec!["PLAIN"];
    if s.server != ServerBehaviour::NoXoauth2 {
        mechs.push("XOAUTH2");
        if conn.shared.oauthbearer {
            mechs.push("OAUTHBEARER");
        }
    }
    mechs
}

fn capa(conn: &Conn, s: &Session) -> Vec<String> {
    let mut lines = vec!["+OK".to_string(), "TOP".into(), "UIDL".into()];
    if auth_allowed(conn, s) {
        lines.push(format!("SASL {}", mechanisms(conn, s).join(" ")));
    }
    lines.push("USER".into());
    if !conn.is_tls() && s.server != ServerBehaviour::NoStarttls {
        lines.push("STLS".into());
    }
    lines.push(".".into());
    lines
}

/// Serves one POP3 connection to its end.
pub(crate) async fn run(mut conn: Conn, s: Session) {
    let shared = conn.shared.clone();
    if s.server == ServerBehaviour::ByeGreeting {
        let _ = conn.send("-ERR Connection is closed. 11").await;
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
    let mut logged_in: Option<AfterLogin> = None;
    loop {
        let line = match conn.read_line().await {
            Ok(line) => line,
            Err(LineError::TooLong) => {
                let _ = conn.send("-ERR Line too long.").await;
                conn.close().await;
                return;
            }
            Err(_) => return,
        };
        let line = line.trim();
        let (name, args) = line.split_once(' ').unwrap_or((line, ""));
        let name = name.to_ascii_uppercase();
        let args = args.trim();

        match logged_in {
            Some(AfterLogin::TokenExpired) => {
                let _ = conn
                    .send("-ERR Session invalidated - AccessTokenExpired")
                    .await;
                conn.close().await;
                return;
            }
            Some(AfterLogin::Field(f)) if name != "QUIT" => {
                if conn.send_all(&f.wire_lines("")).await.is_err() {
                    return;
                }
                continue;
            }
            // Exchange's IMAP words for a principal without access to the mailbox; its POP3
            // words for it are not recorded (`-ERR Server Unavailable. 21` is its temporary
            // failure, a `server_unavailable`).
            Some(AfterLogin::NotConnected) if name != "QUIT" => {
                if conn
                    .send("-ERR User is authenticated but not connected.")
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            _ => {}
        }
        let transaction = logged_in.is_some();

        let mut replies: Vec<String> = Vec::new();
        match name.as_str() {
            "CAPA" => {
                if conn.send_all(&capa(&conn, &s)).await.is_err() {
                    return;
                }
                if s.server == ServerBehaviour::ResetAfterCapability {
                    conn.reset().await;
                    return;
                }
                continue;
            }
            "QUIT" => {
                let _ = conn
                    .send("+OK Microsoft Exchange Server POP3 server signing off.")
                    .await;
                conn.close().await;
                return;
            }
            "NOOP" => replies.push("+OK".into()),
            "STLS" => {
                if conn.is_tls() || transaction {
                    replies.push(INVALID_STATE.into());
                } else if s.server == ServerBehaviour::NoStarttls {
                    replies.push(UNKNOWN.into());
                } else if s.server == ServerBehaviour::RefuseStarttls {
                    replies.push("-ERR TLS is not available.".into());
                } else {
                    if conn.send("+OK Begin TLS negotiation.").await.is_err() {
                        return;
                    }
                    conn = match conn.start_tls().await {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    continue;
                }
            }
            "AUTH" if !transaction && auth_allowed(&conn, &s) => {
                if args.is_empty() {
                    // RFC 5034 leaves AUTH without a mechanism to list them, as many servers do.
                    replies.push("+OK".into());
                    replies.extend(mechanisms(&conn, &s).into_iter().map(String::from));
                    replies.push(".".into());
                } else {
                    if s.server == ServerBehaviour::ResetAtAuth {
                        conn.reset().await;
                        return;
                    }
                    let (mech, ir) = args.split_once(' ').unwrap_or((args, ""));
                    match authenticate(&mut conn, &s, mech, ir.trim()).await {
                        Some(Some(after)) => logged_in = Some(after),
                        Some(None) => {}
                        None => return,
                    }
                    continue;
                }
            }
            "USER" if !transaction && auth_allowed(&conn, &s) => replies.push("+OK".into()),
            "PASS" if !transaction && auth_allowed(&conn, &s) => {
                // The emulator has no passwords: basic auth is always refused.
                replies.push("-ERR Logon failure: unknown user name or bad password.".into())
            }
            "STAT" if transaction => replies.push("+OK 0 0".into()),
            "LIST" | "UIDL" if transaction => {
                if args.is_empty() {
                    replies.push("+OK".into());
                    replies.push(".".into());
                } else {
                    replies.push(OUT_OF_RANGE.into());
                }
            }
            "RETR" | "TOP" | "DELE" if transaction => replies.push(OUT_OF_RANGE.into()),
            "RSET" if transaction => replies.push("+OK".into()),
            "AUTH" | "USER" | "PASS" | "STAT" | "LIST" | "UIDL" | "RETR" | "TOP" | "DELE"
            | "RSET" | "APOP" => replies.push(INVALID_STATE.into()),
            _ => replies.push(UNKNOWN.into()),
        }
        if conn.send_all(&replies).await.is_err() {
            return;
        }
    }
}

/// The error challenge (`+ <base64 JSON>`), then `final_reply` once the client answers it.
/// `None`: the connection is gone.
async fn error_challenge(
    conn: &mut Conn,
    mech: Mechanism,
    challenge: &str,
    final_reply: String,
) -> Option<String> {
    conn.send(&format!("+ {challenge}")).await.ok()?;
    let answer = conn.read_line().await.ok()?;
    let answer = answer.trim();
    Some(if mech.is_challenge_ack(answer) {
        final_reply
    } else if answer == "*" {
        "-ERR Authentication canceled.".to_string()
    } else {
        UNKNOWN.to_string()
    })
}

/// Runs one AUTH exchange and sends its final reply.
/// `None`: the connection is gone; `Some(None)`: not logged in; `Some(Some(a))`: logged in.
async fn authenticate(
    conn: &mut Conn,
    s: &Session,
    mech_name: &str,
    initial: &str,
) -> Option<Option<AfterLogin>> {
    let shared = conn.shared.clone();
    let mech = Mechanism::from_name(mech_name).filter(|m| {
        s.server != ServerBehaviour::NoXoauth2 && (*m == Mechanism::Xoauth2 || shared.oauthbearer)
    });
    let plain = mech_name.eq_ignore_ascii_case("PLAIN");
    if mech.is_none() && !plain {
        return conn
            .send("-ERR Unrecognized authentication type.")
            .await
            .ok()
            .map(|_| None);
    }
    let response = if initial.is_empty() {
        conn.send("+ ").await.ok()?;
        conn.read_line().await.ok()?.trim().to_string()
    } else if initial == "=" {
        String::new()
    } else {
        initial.to_string()
    };
    if response == "*" {
        return conn
            .send("-ERR Authentication canceled.")
            .await
            .ok()
            .map(|_| None);
    }
    let Some(mech) = mech else {
        return conn.send(REFUSED).await.ok().map(|_| None);
    };
    let Some((behaviour, ok)) = judge(&shared, mech, &response) else {
        return conn.send(REFUSED).await.ok().map(|_| None);
    };
    let success = "+OK User successfully authenticated.".to_string();
    let (reply, after) = match behaviour {
        Behaviour::Success
        | Behaviour::SmtpAuthDisabled
        | Behaviour::SmtpAuthDisabledMailbox
        | Behaviour::Slow => (success, Some(AfterLogin::Normal)),
        Behaviour::AuthenticatedNotConnected => (success, Some(AfterLogin::NotConnected)),
        Behaviour::TokenExpiring => (success, Some(AfterLogin::TokenExpired)),
        Behaviour::TokenRefused | Behaviour::PolicyBlocked | Behaviour::ConditionalAccess => {
            (REFUSED.to_string(), None)
        }
        Behaviour::Throttled => ("-ERR [IN-USE] Request is throttled.".to_string(), None),
        Behaviour::TemporaryFailure | Behaviour::ServerError451 | Behaviour::TryAgainLater => (
            // Dovecot's words (tests/integration/fixtures/dovecot_2.3_replies.txt).
            format!(
                "-ERR [SYS/TEMP] Temporary authentication failure. {}",
                super::behaviour::dovecot_stamp(&shared.hostname)
            ),
            None,
        ),
        Behaviour::Echo(Echo::AuthLine) => (
            format!(
                "-ERR [AUTH] Invalid credentials for: AUTH {} {response}",
                mech_name.to_ascii_uppercase()
            ),
            None,
        ),
        Behaviour::Echo(Echo::Token) => (
            format!("-ERR token {} is not valid", echoed_token(mech, &response)),
            None,
        ),
        Behaviour::Echo(Echo::Challenge) => {
            let challenge = echo_challenge(&echoed_token(mech, &response));
            let failure = "-ERR [AUTH] Invalid credentials.".to_string();
            (
                error_challenge(conn, mech, &challenge, failure).await?,
                None,
            )
        }
        Behaviour::Echo(Echo::Bye) => {
            let _ = conn.send(&format!("-ERR {response}")).await;
            return None;
        }
        Behaviour::ErrorChallenge => (
            error_challenge(
                conn,
                mech,
                mech.error_challenge(),
                "-ERR [AUTH] Invalid credentials.".into(),
            )
            .await?,
            None,
        ),
        Behaviour::Field(i) => match field_on(i, Protocol::Pop3) {
            None => (success, Some(AfterLogin::Normal)),
            Some((f, FieldStage::PostAuth)) => (success, Some(AfterLogin::Field(f))),
            Some((f, FieldStage::Auth)) => (f.wire_reply(""), None),
            Some((f, FieldStage::AuthAfterChallenge)) => (
                error_challenge(conn, mech, mech.error_challenge(), f.wire_reply("")).await?,
                None,
            ),
        },
    };
    if behaviour == Behaviour::Slow {
        conn.delay = shared.slow_delay;
    }
    // Behaviours that end in a login still need a valid token.
    let (reply, after) = if after.is_some() && !ok {
        (REFUSED.to_string(), None)
    } else {
        (reply, after)
    };
    conn.send(&reply).await.ok()?;
    Some(after)
}
