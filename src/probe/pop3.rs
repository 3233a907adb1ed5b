//! POP3 prober (RFC 1939/2449/5034): greeting, CAPA, STLS, `AUTH XOAUTH2` then the
//! response on its own line (as Microsoft documents), STAT, QUIT.

use super::negotiate::{Negotiate, negotiate};
use super::session::Session;
use super::{Phase, ProbeError, sasl};
use crate::secret::Secret;
use std::time::Duration;
use tokio::time::Instant;

/// Most CAPA lines read; a real server sends about ten.
const MAX_CAPA_LINES: usize = 200;

pub(crate) async fn dialogue(
    s: &mut Session<'_>,
    token: &Secret,
    auth_done: &mut Option<Instant>,
) -> Result<(), ProbeError> {
    s.begin(Phase::Greeting);
    let greeting = s.read_line().await?;
    if !is_ok(&greeting) {
        return Err(refused_or_unexpected(s, greeting, None));
    }

    negotiate::<Pop3>(s).await?;
    let mech = s.spec.mechanism;

    s.begin(Phase::Auth);
    let target = &s.spec.target;
    let ir = sasl::initial_response(mech, &s.spec.user, token, &target.host, target.port);
    s.add_sasl_response(&ir);
    // No initial response: with a real token the command would pass POP3's 255-octet
    // limit (RFC 5034 §4), and Microsoft documents this two-line form.
    s.send(&format!("AUTH {}", mech.sasl_name())).await?;
    let reply = s.read_line().await?;
    if !is_continuation(&reply) {
        *auth_done = Some(Instant::now());
        return Err(refused_or_unexpected(s, reply, None));
    }
    s.send(ir.expose()).await?;
    let mut reply = s.read_line().await?;
    let mut challenge = None;
    if is_continuation(&reply) {
        challenge = sasl::decode_challenge(reply.get(2..).unwrap_or(""));
        if challenge.is_none() {
            return Err(unexpected(s, reply));
        }
        s.send(sasl::error_challenge_answer(mech)).await?;
        reply = s.read_line().await?;
    }
    *auth_done = Some(Instant::now());
    if !is_ok(&reply) {
        return Err(refused_or_unexpected(s, reply, challenge));
    }

    s.begin(Phase::PostAuth);
    s.send("STAT").await?;
    let reply = s.read_line().await?;
    if !is_ok(&reply) {
        return Err(refused_or_unexpected(s, reply, None));
    }
    s.end_phase();

    s.limit_deadline(Duration::from_secs(2));
    if s.send("QUIT").await.is_ok() {
        let _ = s.read_line().await;
    }
    Ok(())
}

/// POP3's part of the negotiation (RFC 1939/2449, RFC 2595 §4): CAPA, `STLS`, `SASL`.
struct Pop3;

impl Negotiate for Pop3 {
    const STARTTLS: &'static str = "STLS";

    async fn capabilities(
        s: &mut Session<'_>,
        _after_tls: bool,
    ) -> Result<Vec<String>, ProbeError> {
        capa(s).await
    }

    async fn starttls(s: &mut Session<'_>) -> Result<Option<String>, ProbeError> {
        s.send("STLS").await?;
        let reply = s.read_line().await?;
        Ok((!is_ok(&reply)).then_some(reply))
    }

    fn mechanisms(caps: &[String]) -> Option<String> {
        caps.iter()
            .find(|c| c.starts_with("SASL ") || *c == "SASL")
            .and_then(|l| l.strip_prefix("SASL "))
            .map(str::to_owned)
    }
}

/// CAPA's lines, upper-cased; a server without CAPA (`-ERR`) has no capabilities we need.
async fn capa(s: &mut Session<'_>) -> Result<Vec<String>, ProbeError> {
    s.send("CAPA").await?;
    let first = s.read_line().await?;
    if !is_ok(&first) {
        if first.starts_with("-ERR") {
            return Ok(Vec::new());
        }
        return Err(unexpected(s, first));
    }
    let mut caps = Vec::new();
    loop {
        let line = s.read_line().await?;
        if line == "." {
            return Ok(caps);
        }
        if caps.len() >= MAX_CAPA_LINES {
            return Err(unexpected(s, "CAPA list without end".into()));
        }
        // Dot-stuffing (RFC 1939 §3): a leading ".." stands for ".".
        let line = line.strip_prefix('.').unwrap_or(&line);
        caps.push(line.trim().to_ascii_uppercase());
    }
}

fn is_ok(line: &str) -> bool {
    line.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("+OK"))
}

/// `+` or `+ <base64>`: a SASL continuation, as opposed to `+OK`.
fn is_continuation(line: &str) -> bool {
    line == "+" || line.starts_with("+ ")
}

fn refused_or_unexpected(s: &Session<'_>, line: String, challenge: Option<String>) -> ProbeError {
    if line.starts_with("-ERR") || line.starts_with("-err") {
        ProbeError::Refused {
            phase: s.phase(),
            reply: line,
            challenge,
        }
    } else {
        unexpected(s, line)
    }
}

fn unexpected(s: &Session<'_>, reply: String) -> ProbeError {
    ProbeError::Unexpected {
        phase: s.phase(),
        reply,
    }
}
