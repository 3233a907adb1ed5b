//! The emulated SMTP submission server (RFC 5321, 3207 STARTTLS, 4954 AUTH) with Exchange
//! Online's replies (and Gmail's for its failure modes).

use x509_parser::time::ASN1Time;

use super::behaviour::{
    Behaviour, Echo, FieldStage, ServerBehaviour, echo_challenge, echoed_token, field_on, judge,
};
use super::conn::{Conn, LineError};
use super::sasl::Mechanism;
use super::{Session, Shared};
use crate::protocol::Protocol;

pub(crate) fn greeting(shared: &Shared) -> String {
    let date = ASN1Time::now()
        .to_rfc2822()
        .unwrap_or_else(|_| "Thu, 1 Jan 1970 00:00:00 +0000".to_string());
    format!(
        "220 {} Microsoft ESMTP MAIL Service ready at {date}",
        shared.hostname
    )
}

/// Largest message accepted by DATA / BDAT; beyond it the connection is closed.
const MAX_MESSAGE: usize = 10 * 1024 * 1024;
const UNKNOWN: &str = "500 5.3.3 Unrecognized command";
const NOT_AUTHENTICATED: &str = "530 5.7.57 Client not authenticated to send mail.";
const UNRECOGNIZED_AUTH: &str = "504 5.7.4 Unrecognized authentication type";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterLogin {
    Normal,
    NotConnected,
    /// Every command but QUIT gets this recorded reply (`field_replies.txt`).
    Field(&'static super::field::FieldReply),
}

/// The mail transaction in progress.
#[derive(Debug, Default)]
struct Envelope {
    from: bool,
    rcpts: usize,
}

fn auth_allowed(conn: &Conn, s: &Session) -> bool {
    conn.is_tls() || s.server == ServerBehaviour::OfferAuthBeforeTls
}

fn ehlo_lines(conn: &Conn, s: &Session) -> Vec<String> {
    let shared = &conn.shared;
    let mut keywords = vec![
        format!("{} Hello [{}]", shared.hostname, conn.peer.ip()),
        "SIZE 157286400".to_string(),
        "PIPELINING".into(),
        "DSN".into(),
        "ENHANCEDSTATUSCODES".into(),
    ];
    if !conn.is_tls() && s.server != ServerBehaviour::NoStarttls {
        keywords.push("STARTTLS".into());
    }
    if auth_allowed(conn, s) {
        let mut auth = "AUTH LOGIN".to_string();
        if s.server != ServerBehaviour::NoXoauth2 {
            auth.push_str(" XOAUTH2");
            if shared.oauthbearer {
                auth.push_str(" OAUTHBEARER");
            }
        }
        keywords.push(auth);
    }
    keywords.extend(
        ["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"]
            .into_iter()
            .map(String::from),
    );
    let last = keywords.len() - 1;
    keywords
        .into_iter()
        .enumerate()
        .map(|(i, k)| format!("250{}{k}", if i == last { ' ' } else { '-' }))
        .collect()
}

/// Serves one SMTP connection to its end.
pub(crate) async fn run(mut conn: Conn, s: Session) {
    let shared = conn.shared.clone();
    let host = shared.hostname.clone();
    match s.server {
        ServerBehaviour::ByeGreeting => {
            let _ = conn
                .send(&format!("421 4.3.2 Service not active [{host}]"))
                .await;
            conn.close().await;
            return;
        }
        ServerBehaviour::ConcurrentLimit => {
            let _ = conn
                .send(&format!("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [{host}]"))
                .await;
            conn.close().await;
            return;
        }
        _ => {}
    }
    if conn.send(&greeting(&shared)).await.is_err() {
        return;
    }
    if s.server == ServerBehaviour::ResetAfterGreeting {
        conn.reset().await;
        return;
    }
    let mut helo = false;
    let mut logged_in: Option<AfterLogin> = None;
    let mut envelope = Envelope::default();
    let mut messages = 0u64;
    loop {
        let raw = match conn.read_line().await {
            Ok(line) => line,
            Err(LineError::TooLong) => {
                let _ = conn.send("500 5.5.2 Line too long").await;
                conn.close().await;
                return;
            }
            Err(_) => return,
        };
        let line = raw.trim();
        let (name, args) = line.split_once(' ').unwrap_or((line, ""));
        let name = name.to_ascii_uppercase();
        let args = args.trim();

        if logged_in == Some(AfterLogin::NotConnected) && name != "QUIT" {
            if conn.send(NOT_AUTHENTICATED).await.is_err() {
                return;
            }
            continue;
        }
        if let Some(AfterLogin::Field(f)) = logged_in
            && name != "QUIT"
        {
            if conn.send_all(&f.wire_lines("")).await.is_err() {
                return;
            }
            continue;
        }

        let reply: String = match name.as_str() {
            "EHLO" => {
                if args.is_empty() {
                    "501 5.5.4 Invalid domain name".into()
                } else {
                    helo = true;
                    envelope = Envelope::default();
                    if conn.send_all(&ehlo_lines(&conn, &s)).await.is_err() {
                        return;
                    }
                    if s.server == ServerBehaviour::ResetAfterCapability {
                        conn.reset().await;
                        return;
                    }
                    continue;
                }
            }
            "HELO" => {
                if args.is_empty() {
                    "501 5.5.4 Invalid domain name".into()
                } else {
                    helo = true;
                    envelope = Envelope::default();
                    format!("250 {host} Hello [{}]", conn.peer.ip())
                }
            }
            "STARTTLS" => {
                if conn.is_tls() {
                    "503 5.5.1 Bad sequence of commands".into()
                } else if s.server == ServerBehaviour::NoStarttls {
                    UNKNOWN.into()
                } else if s.server == ServerBehaviour::RefuseStarttls {
                    "454 4.7.0 TLS not available".into()
                } else {
                    if conn.send("220 2.0.0 SMTP server ready").await.is_err() {
                        return;
                    }
                    conn = match conn.start_tls().await {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    // RFC 3207: the session starts over, the client must EHLO again.
                    helo = false;
                    envelope = Envelope::default();
                    continue;
                }
            }
            "AUTH" => {
                if shared.smtp_max_auth_line.is_some_and(|max| raw.len() > max) {
                    "500 5.5.2 Line too long".into()
                } else if logged_in.is_some() {
                    "503 5.5.1 Already authenticated".into()
                } else if !auth_allowed(&conn, &s) {
                    UNRECOGNIZED_AUTH.into()
                } else {
                    if s.server == ServerBehaviour::ResetAtAuth {
                        conn.reset().await;
                        return;
                    }
                    if s.server == ServerBehaviour::OldTlsRejected {
                        let _ = conn
                            .send(&format!("421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls. [{host}]"))
                            .await;
                        conn.close().await;
                        return;
                    }
                    let (mech, ir) = args.split_once(' ').unwrap_or((args, ""));
                    match authenticate(&mut conn, &s, mech, ir.trim()).await {
                        Flow::LoggedIn(after) => logged_in = Some(after),
                        Flow::Continue => {}
                        Flow::Close => {
                            conn.close().await;
                            return;
                        }
                        Flow::Gone => return,
                    }
                    continue;
                }
            }
            "NOOP" => "250 2.0.0 OK".into(),
            "RSET" => {
                envelope = Envelope::default();
                "250 2.0.0 Resetting".into()
            }
            "VRFY" => "252 2.1.5 Cannot VRFY user".into(),
            "HELP" => {
                let help = [
                    "214-This server supports the following commands:".to_string(),
                    "214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT".to_string(),
                ];
                if conn.send_all(&help).await.is_err() {
                    return;
                }
                continue;
            }
            "QUIT" => {
                let _ = conn
                    .send("221 2.0.0 Service closing transmission channel")
                    .await;
                conn.close().await;
                return;
            }
            "MAIL" => {
                if !helo {
                    "503 5.5.2 Send hello first".into()
                } else if logged_in.is_none() {
                    NOT_AUTHENTICATED.into()
                } else if envelope.from {
                    "503 5.5.2 Sender already specified".into()
                } else if !args.to_ascii_uppercase().starts_with("FROM:") {
                    "501 5.5.4 Invalid arguments".into()
                } else {
                    envelope.from = true;
                    "250 2.1.0 Sender OK".into()
                }
            }
            "RCPT" => {
                if !envelope.from {
                    "503 5.5.1 Need mail command".into()
                } else if !args.to_ascii_uppercase().starts_with("TO:") {
                    "501 5.5.4 Invalid arguments".into()
                } else {
                    envelope.rcpts += 1;
                    "250 2.1.5 Recipient OK".into()
                }
            }
            "DATA" => {
                if envelope.rcpts == 0 {
                    "503 5.5.1 Need rcpt command".into()
                } else {
                    if conn
                        .send("354 Start mail input; end with <CRLF>.<CRLF>")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut size = 0usize;
                    loop {
                        match conn.read_line().await {
                            Ok(l) if l == "." => break,
                            Ok(l) => {
                                size += l.len() + 2;
                                if size > MAX_MESSAGE {
                                    let _ = conn.send("552 5.3.4 Message size exceeds fixed maximum message size").await;
                                    conn.close().await;
                                    return;
                                }
                            }
                            Err(LineError::TooLong) => {
                                let _ = conn.send("500 5.5.2 Line too long").await;
                                conn.close().await;
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    envelope = Envelope::default();
                    messages += 1;
                    format!(
                        "250 2.6.0 <{messages}@{host}> [InternalId={messages}] Queued mail for delivery"
                    )
                }
            }
            "BDAT" => {
                let mut parts = args.split_whitespace();
                let size = parts.next().and_then(|n| n.parse::<usize>().ok());
                let last = parts.next().is_some_and(|p| p.eq_ignore_ascii_case("LAST"));
                match size {
                    None => "501 5.5.4 Invalid arguments".into(),
                    Some(n) if n > MAX_MESSAGE => {
                        let _ = conn
                            .send("552 5.3.4 Message size exceeds fixed maximum message size")
                            .await;
                        conn.close().await;
                        return;
                    }
                    Some(n) => {
                        // The chunk is read even when refused: it is already on its way.
                        if conn.read_exact_bytes(n).await.is_err() {
                            return;
                        }
                        if envelope.rcpts == 0 {
                            "503 5.5.1 Need rcpt command".into()
                        } else if last {
                            envelope = Envelope::default();
                            messages += 1;
                            format!(
                                "250 2.6.0 <{messages}@{host}> [InternalId={messages}] Queued mail for delivery"
                            )
                        } else {
                            format!("250 2.0.0 BDAT {n} bytes received")
                        }
                    }
                }
            }
            _ => UNKNOWN.into(),
        };
        if conn.send(&reply).await.is_err() {
            return;
        }
    }
}

/// How an AUTH exchange left the session.
enum Flow {
    LoggedIn(AfterLogin),
    Continue,
    /// The reply said the server closes the connection.
    Close,
    /// The connection failed.
    Gone,
}

/// Runs one AUTH exchange and sends its final reply.
async fn authenticate(conn: &mut Conn, s: &Session, mech_name: &str, initial: &str) -> Flow {
    let shared = conn.shared.clone();
    let host = shared.hostname.clone();
    let refused = format!("535 5.7.3 Authentication unsuccessful [{host}]");
    let mech = Mechanism::from_name(mech_name).filter(|m| {
        s.server != ServerBehaviour::NoXoauth2 && (*m == Mechanism::Xoauth2 || shared.oauthbearer)
    });
    if mech_name.eq_ignore_ascii_case("LOGIN") {
        return login(conn, initial, refused).await;
    }
    let Some(mech) = mech else {
        return match conn.send(UNRECOGNIZED_AUTH).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        };
    };
    let response = if initial.is_empty() {
        if conn.send("334 ").await.is_err() {
            return Flow::Gone;
        }
        match conn.read_line().await {
            Ok(l) => l.trim().to_string(),
            Err(_) => return Flow::Gone,
        }
    } else if initial == "=" {
        String::new()
    } else {
        initial.to_string()
    };
    if response == "*" {
        return match conn.send("501 5.7.0 Authentication aborted").await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        };
    }
    let (reply, flow): (Vec<String>, Flow) = match judge(&shared, mech, &response) {
        None => (vec![refused], Flow::Continue),
        Some((behaviour, ok)) => {
            if behaviour == Behaviour::Slow {
                conn.delay = shared.slow_delay;
            }
            let success = "235 2.7.0 Authentication successful".to_string();
            match behaviour {
                Behaviour::Success | Behaviour::Slow if ok => {
                    (vec![success], Flow::LoggedIn(AfterLogin::Normal))
                }
                Behaviour::AuthenticatedNotConnected if ok => {
                    (vec![success], Flow::LoggedIn(AfterLogin::NotConnected))
                }
                Behaviour::Field(i) => match field_on(i, Protocol::Smtp) {
                    None | Some((_, FieldStage::PostAuth)) if !ok => (vec![refused], Flow::Continue),
                    None => (vec![success], Flow::LoggedIn(AfterLogin::Normal)),
                    Some((f, FieldStage::PostAuth)) => {
                        (vec![success], Flow::LoggedIn(AfterLogin::Field(f)))
                    }
                    Some((f, FieldStage::Auth)) => (f.wire_lines(""), Flow::Continue),
                    Some((f, FieldStage::AuthAfterChallenge)) => {
                        if conn
                            .send(&format!("334 {}", mech.error_challenge()))
                            .await
                            .is_err()
                        {
                            return Flow::Gone;
                        }
                        match conn.read_line().await {
                            Ok(a) if mech.is_challenge_ack(a.trim()) => {
                                (f.wire_lines(""), Flow::Continue)
                            }
                            Ok(_) => (vec!["501 5.5.2 Cannot decode response".to_string()], Flow::Continue),
                            Err(_) => return Flow::Gone,
                        }
                    }
                },
                Behaviour::Success
                | Behaviour::Slow
                | Behaviour::AuthenticatedNotConnected
                | Behaviour::TokenRefused => (vec![refused], Flow::Continue),
                Behaviour::SmtpAuthDisabled => (
                    vec![format!("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [{host}]")],
                    Flow::Continue,
                ),
                Behaviour::SmtpAuthDisabledMailbox => (
                    vec![format!("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [{host}]")],
                    Flow::Continue,
                ),
                Behaviour::PolicyBlocked => (
                    vec!["535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.".into()],
                    Flow::Continue,
                ),
                Behaviour::ConditionalAccess => (
                    vec!["535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.".into()],
                    Flow::Continue,
                ),
                Behaviour::Throttled => (
                    vec![format!("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [{host}]")],
                    Flow::Continue,
                ),
                Behaviour::TokenExpiring => (
                    vec!["501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon".into()],
                    Flow::Continue,
                ),
                Behaviour::TemporaryFailure => (
                    vec!["454 4.7.0 Cannot authenticate due to temporary system problem. Try again later.".into()],
                    Flow::Continue,
                ),
                Behaviour::ServerError451 => (
                    vec![format!("451 4.7.0 Temporary server error. Please try again later. PRX4 [{host}]")],
                    Flow::Continue,
                ),
                Behaviour::TryAgainLater => (
                    vec!["421 4.7.0 Try again later, closing connection.".into()],
                    Flow::Close,
                ),
                Behaviour::Echo(Echo::AuthLine) => (
                    vec![format!(
                        "535 5.7.8 Invalid credentials for: AUTH {} {response}",
                        mech_name.to_ascii_uppercase()
                    )],
                    Flow::Continue,
                ),
                Behaviour::Echo(Echo::Token) => (
                    vec![format!(
                        "535 5.7.3 token {} is not valid",
                        echoed_token(mech, &response)
                    )],
                    Flow::Continue,
                ),
                Behaviour::Echo(Echo::Bye) => (vec![format!("421 4.7.0 {response}")], Flow::Close),
                Behaviour::ErrorChallenge | Behaviour::Echo(Echo::Challenge) => {
                    let challenge = match behaviour {
                        Behaviour::ErrorChallenge => mech.error_challenge().to_string(),
                        _ => echo_challenge(&echoed_token(mech, &response)),
                    };
                    if conn.send(&format!("334 {challenge}")).await.is_err() {
                        return Flow::Gone;
                    }
                    let answer = match conn.read_line().await {
                        Ok(a) => a,
                        Err(_) => return Flow::Gone,
                    };
                    let answer = answer.trim();
                    let reply = if mech.is_challenge_ack(answer) {
                        vec![
                            "535-5.7.8 Username and Password not accepted. For more information, go to".to_string(),
                            "535 5.7.8  https://support.google.com/mail/?p=BadCredentials x1-20020a05 - gsmtp".to_string(),
                        ]
                    } else if answer == "*" {
                        vec!["501 5.7.0 Authentication aborted".to_string()]
                    } else {
                        vec!["501 5.5.2 Cannot decode response".to_string()]
                    };
                    (reply, Flow::Continue)
                }
            }
        }
    };
    match conn.send_all(&reply).await {
        Ok(()) => flow,
        Err(_) => Flow::Gone,
    }
}

/// AUTH LOGIN: prompts for user and password, then refuses (no passwords here).
async fn login(conn: &mut Conn, initial: &str, refused: String) -> Flow {
    let mut prompts = vec!["334 UGFzc3dvcmQ6"];
    if initial.is_empty() {
        prompts.insert(0, "334 VXNlcm5hbWU6");
    }
    for prompt in prompts {
        if conn.send(prompt).await.is_err() {
            return Flow::Gone;
        }
        match conn.read_line().await {
            Ok(l) if l.trim() == "*" => {
                return match conn.send("501 5.7.0 Authentication aborted").await {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Gone,
                };
            }
            Ok(_) => {}
            Err(_) => return Flow::Gone,
        }
    }
    match conn.send(&refused).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Gone,
    }
}
