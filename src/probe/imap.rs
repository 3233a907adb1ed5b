//! IMAP prober (RFC 9051/3501): greeting, CAPABILITY, STARTTLS, AUTHENTICATE with
//! XOAUTH2/OAUTHBEARER (SASL-IR when offered), EXAMINE INBOX, LOGOUT.

use super::negotiate::{Negotiate, negotiate};
use super::session::Session;
use super::{Phase, ProbeError, sasl};
use crate::secret::Secret;
use std::time::Duration;
use tokio::time::Instant;

/// Most untagged lines kept while waiting for a tagged reply (EXAMINE sends a handful).
const MAX_UNTAGGED: usize = 1000;

enum Reply {
    Tagged(Tagged),
    /// A `+` continuation request, with its text (base64 challenge or free text).
    Continuation(String),
}

struct Tagged {
    status: Status,
    line: String,
    untagged: Vec<String>,
    /// An untagged BYE seen before the tagged reply: the server is closing on us.
    bye: Option<String>,
}

#[derive(PartialEq, Eq)]
enum Status {
    Ok,
    No,
    Bad,
}

pub(crate) async fn dialogue(
    s: &mut Session<'_>,
    token: &Secret,
    auth_done: &mut Option<Instant>,
) -> Result<(), ProbeError> {
    s.begin(Phase::Greeting);
    greeting(s).await?;

    let caps = negotiate::<Imap>(s).await?;
    let mech = s.spec.mechanism;

    s.begin(Phase::Auth);
    let target = &s.spec.target;
    let ir = sasl::initial_response(mech, &s.spec.user, token, &target.host, target.port);
    s.add_sasl_response(&ir);
    let mut reply = if has(&caps, "SASL-IR") {
        command(
            s,
            "A01",
            &format!("AUTHENTICATE {} {}", mech.sasl_name(), ir.expose()),
        )
        .await?
    } else {
        match command(s, "A01", &format!("AUTHENTICATE {}", mech.sasl_name())).await? {
            Reply::Continuation(_) => {
                s.send(ir.expose()).await?;
                read_reply(s, "A01").await?
            }
            tagged => tagged,
        }
    };
    let mut challenge = None;
    if let Reply::Continuation(text) = reply {
        // An error challenge: answer it as the mechanism requires, then read the verdict.
        challenge = sasl::decode_challenge(&text);
        if challenge.is_none() {
            return Err(unexpected(s, format!("+ {text}")));
        }
        s.send(sasl::error_challenge_answer(mech)).await?;
        reply = read_reply(s, "A01").await?;
    }
    *auth_done = Some(Instant::now());
    let t = match reply {
        Reply::Tagged(t) => t,
        Reply::Continuation(c) => return Err(unexpected(s, format!("+ {c}"))),
    };
    if t.status != Status::Ok || t.bye.is_some() {
        return Err(ProbeError::Refused {
            phase: Phase::Auth,
            reply: t.bye.unwrap_or(t.line),
            challenge,
        });
    }

    s.begin(Phase::PostAuth);
    match command(s, "E01", "EXAMINE INBOX").await? {
        Reply::Tagged(t) if t.status == Status::Ok && t.bye.is_none() => {}
        Reply::Tagged(t) => {
            return Err(ProbeError::Refused {
                phase: Phase::PostAuth,
                reply: t.bye.unwrap_or(t.line),
                challenge: None,
            });
        }
        Reply::Continuation(c) => return Err(unexpected(s, format!("+ {c}"))),
    }
    s.end_phase();

    // LOGOUT is a courtesy: its failure does not fail a probe that logged in.
    s.limit_deadline(Duration::from_secs(2));
    let _ = command(s, "L01", "LOGOUT").await;
    Ok(())
}

/// IMAP's part of the negotiation (RFC 3501/9051): CAPABILITY, `STARTTLS`, `AUTH=` atoms.
struct Imap;

impl Negotiate for Imap {
    const STARTTLS: &'static str = "STARTTLS";

    async fn capabilities(s: &mut Session<'_>, after_tls: bool) -> Result<Vec<String>, ProbeError> {
        capability(s, if after_tls { "C02" } else { "C01" }).await
    }

    async fn starttls(s: &mut Session<'_>) -> Result<Option<String>, ProbeError> {
        match command(s, "S01", "STARTTLS").await? {
            Reply::Tagged(t) if t.status == Status::Ok => Ok(None),
            Reply::Tagged(t) => Ok(Some(t.line)),
            Reply::Continuation(c) => Err(unexpected(s, c)),
        }
    }

    fn mechanisms(caps: &[String]) -> Option<String> {
        let auth: Vec<&str> = caps
            .iter()
            .filter_map(|c| c.strip_prefix("AUTH="))
            .collect();
        (!auth.is_empty()).then(|| auth.join(" "))
    }
}

async fn greeting(s: &mut Session<'_>) -> Result<(), ProbeError> {
    let line = s.read_line().await?;
    let upper = line.to_ascii_uppercase();
    if upper.starts_with("* OK") {
        Ok(())
    } else if upper.starts_with("* BYE") {
        Err(ProbeError::Refused {
            phase: Phase::Greeting,
            reply: line,
            challenge: None,
        })
    } else {
        // PREAUTH included: a server that logs us in without a token proves nothing.
        Err(unexpected(s, line))
    }
}

/// Asks CAPABILITY and returns the upper-cased capability atoms.
async fn capability(s: &mut Session<'_>, tag: &str) -> Result<Vec<String>, ProbeError> {
    let t = match command(s, tag, "CAPABILITY").await? {
        Reply::Tagged(t) => t,
        Reply::Continuation(c) => return Err(unexpected(s, format!("+ {c}"))),
    };
    if t.status != Status::Ok || t.bye.is_some() {
        return Err(ProbeError::Refused {
            phase: Phase::Capability,
            reply: t.bye.unwrap_or(t.line),
            challenge: None,
        });
    }
    let caps: Vec<String> = t
        .untagged
        .iter()
        .filter_map(|l| {
            let mut words = l.split_ascii_whitespace();
            let star = words.next()?;
            let name = words.next()?;
            (star == "*" && name.eq_ignore_ascii_case("CAPABILITY")).then_some(words)
        })
        .flatten()
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if caps.is_empty() {
        return Err(unexpected(s, format!("no CAPABILITY in reply: {}", t.line)));
    }
    Ok(caps)
}

async fn command(s: &mut Session<'_>, tag: &str, cmd: &str) -> Result<Reply, ProbeError> {
    s.send(&format!("{tag} {cmd}")).await?;
    read_reply(s, tag).await
}

/// Reads untagged lines until the tagged reply for `tag` or a continuation request.
async fn read_reply(s: &mut Session<'_>, tag: &str) -> Result<Reply, ProbeError> {
    let mut untagged = Vec::new();
    let mut bye: Option<String> = None;
    loop {
        let line = match s.read_line().await {
            Ok(l) => l,
            // A server that says BYE and hangs up has told us why: keep its words.
            Err(ProbeError::Closed { phase } | ProbeError::Io { phase, .. }) if bye.is_some() => {
                return Err(ProbeError::Refused {
                    phase,
                    reply: bye.unwrap_or_default(),
                    challenge: None,
                });
            }
            Err(e) => return Err(e),
        };
        if let Some(rest) = line.strip_prefix("* ") {
            if let Some(n) = literal_len(&line) {
                s.skip_bytes(n).await?;
            }
            if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case("BYE") {
                bye = Some(line.clone());
            }
            if untagged.len() < MAX_UNTAGGED {
                untagged.push(line);
            }
            continue;
        }
        if line == "+" || line.starts_with("+ ") {
            return Ok(Reply::Continuation(line.get(2..).unwrap_or("").to_owned()));
        }
        if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            let word = rest.split(' ').next().unwrap_or("").to_ascii_uppercase();
            let status = match word.as_str() {
                "OK" => Status::Ok,
                "NO" => Status::No,
                "BAD" => Status::Bad,
                _ => return Err(unexpected(s, line)),
            };
            return Ok(Reply::Tagged(Tagged {
                status,
                line,
                untagged,
                bye,
            }));
        }
        return Err(unexpected(s, line));
    }
}

/// `{123}` or `{123+}` at the end of a line announces a literal of that many bytes.
fn literal_len(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].trim_end_matches('+').parse().ok()
}

fn has(caps: &[String], cap: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(cap))
}

fn unexpected(s: &Session<'_>, reply: String) -> ProbeError {
    ProbeError::Unexpected {
        phase: s.phase(),
        reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(literal_len("* 1 FETCH (BODY[] {12}"), Some(12));
        assert_eq!(literal_len("* LIST () \"/\" {5+}"), Some(5));
        assert_eq!(literal_len("* OK done"), None);
        assert_eq!(literal_len("* OK {abc}"), None);
    }
}
