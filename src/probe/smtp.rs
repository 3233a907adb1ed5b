//! SMTP submission prober (RFC 5321/3207/4954): greeting, EHLO, STARTTLS, `AUTH XOAUTH2`
//! with an initial response only when the line fits, else `334` continuation; NOOP, QUIT.

use super::negotiate::{Negotiate, negotiate};
use super::session::Session;
use super::{Phase, ProbeError, sasl};
use crate::secret::Secret;
use std::time::Duration;
use tokio::time::Instant;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included. Dovecot
/// answers `500 5.5.2 Line too long` past its own limit, so long tokens use `334`.
const MAX_COMMAND_LINE: usize = 512;
/// Most lines of one multi-line reply; EHLO sends about a dozen.
const MAX_REPLY_LINES: usize = 200;

/// One SMTP reply: its code and all its lines, as received.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    /// The text after the code of each line (`AUTH LOGIN XOAUTH2`, a 334 challenge...).
    fn texts(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.get(4..).unwrap_or(""))
    }

    fn joined(&self) -> String {
        self.lines.join("\n")
    }
}

pub(crate) async fn dialogue(
    s: &mut Session<'_>,
    token: &Secret,
    auth_done: &mut Option<Instant>,
) -> Result<(), ProbeError> {
    s.begin(Phase::Greeting);
    let greeting = read_reply(s).await?;
    if greeting.code != 220 {
        return Err(refused(s, &greeting, None));
    }

    negotiate::<Smtp>(s).await?;
    let mech = s.spec.mechanism;

    s.begin(Phase::Auth);
    let target = &s.spec.target;
    let ir = sasl::initial_response(mech, &s.spec.user, token, &target.host, target.port);
    s.add_sasl_response(&ir);
    let with_ir = format!("AUTH {} {}", mech.sasl_name(), ir.expose());
    let mut reply = if with_ir.len() + 2 <= MAX_COMMAND_LINE {
        s.send(&with_ir).await?;
        read_reply(s).await?
    } else {
        s.send(&format!("AUTH {}", mech.sasl_name())).await?;
        let go_ahead = read_reply(s).await?;
        if go_ahead.code != 334 {
            *auth_done = Some(Instant::now());
            return Err(refused(s, &go_ahead, None));
        }
        s.send(ir.expose()).await?;
        read_reply(s).await?
    };
    let mut challenge = None;
    if reply.code == 334 {
        challenge = reply.texts().next().and_then(sasl::decode_challenge);
        if challenge.is_none() {
            return Err(unexpected(s, &reply));
        }
        s.send(sasl::error_challenge_answer(mech)).await?;
        reply = read_reply(s).await?;
    }
    *auth_done = Some(Instant::now());
    if reply.code != 235 {
        return Err(refused(s, &reply, challenge));
    }

    s.begin(Phase::PostAuth);
    s.send("NOOP").await?;
    let reply = read_reply(s).await?;
    if reply.code != 250 {
        return Err(refused(s, &reply, None));
    }
    s.end_phase();

    s.limit_deadline(Duration::from_secs(2));
    if s.send("QUIT").await.is_ok() {
        let _ = read_reply(s).await;
    }
    Ok(())
}

/// SMTP's part of the negotiation (RFC 5321, RFC 3207, RFC 4954): EHLO, `STARTTLS`, `AUTH`.
struct Smtp;

impl Negotiate for Smtp {
    const STARTTLS: &'static str = "STARTTLS";

    async fn capabilities(
        s: &mut Session<'_>,
        _after_tls: bool,
    ) -> Result<Vec<String>, ProbeError> {
        ehlo(s).await
    }

    async fn starttls(s: &mut Session<'_>) -> Result<Option<String>, ProbeError> {
        s.send("STARTTLS").await?;
        let reply = read_reply(s).await?;
        Ok((reply.code != 220).then(|| reply.joined()))
    }

    fn mechanisms(caps: &[String]) -> Option<String> {
        caps.iter()
            .find(|k| k.starts_with("AUTH ") || k.starts_with("AUTH="))
            .map(|l| l[5..].to_owned())
    }
}

async fn ehlo(s: &mut Session<'_>) -> Result<Vec<String>, ProbeError> {
    // An address literal is the right EHLO argument for a client without a public name.
    let name = match s.local_addr().map(|a| a.ip()) {
        Some(std::net::IpAddr::V4(ip)) => format!("[{ip}]"),
        Some(std::net::IpAddr::V6(ip)) => format!("[IPv6:{ip}]"),
        None => "[127.0.0.1]".into(),
    };
    s.send(&format!("EHLO {name}")).await?;
    let reply = read_reply(s).await?;
    if reply.code != 250 {
        return Err(refused(s, &reply, None));
    }
    // The first line is the server's greeting name; the rest are keywords.
    Ok(reply
        .texts()
        .skip(1)
        .map(|t| t.trim().to_ascii_uppercase())
        .collect())
}

/// Reads one reply, multi-line (`250-...` then `250 ...`) or not; all lines share a code.
async fn read_reply(s: &mut Session<'_>) -> Result<Reply, ProbeError> {
    let mut lines = Vec::new();
    let mut code = None;
    loop {
        let line = s.read_line().await?;
        let parsed = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c));
        let sep = line.as_bytes().get(3).copied();
        let (Some(c), Some(b' ' | b'-') | None) = (parsed, sep) else {
            return Err(unexpected_line(s, line));
        };
        if code.is_some_and(|prev| prev != c) {
            return Err(unexpected_line(s, line));
        }
        code = Some(c);
        let last = sep != Some(b'-');
        lines.push(line);
        if last {
            return Ok(Reply { code: c, lines });
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(unexpected_line(s, "multi-line reply without end".into()));
        }
    }
}

fn refused(s: &Session<'_>, reply: &Reply, challenge: Option<String>) -> ProbeError {
    if reply.code >= 400 {
        ProbeError::Refused {
            phase: s.phase(),
            reply: reply.joined(),
            challenge,
        }
    } else {
        unexpected(s, reply)
    }
}

fn unexpected(s: &Session<'_>, reply: &Reply) -> ProbeError {
    unexpected_line(s, reply.joined())
}

fn unexpected_line(s: &Session<'_>, reply: String) -> ProbeError {
    ProbeError::Unexpected {
        phase: s.phase(),
        reply,
    }
}
