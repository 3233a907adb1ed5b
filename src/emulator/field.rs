//! Replies and token bodies recorded from the field (`field_replies.txt`), each with the
//! public report it came from and the reason a monitor must report for it.
//!
//! The emulated servers serve a mail record to a user set to [`Behaviour::Field`]`(i)`, and
//! the token endpoint a token record with [`Scripted::Field`]`(i)`, so the tests replay
//! them over real sockets; the classifier's unit tests read the same records.
//!
//! [`Behaviour::Field`]: super::Behaviour::Field
//! [`Scripted::Field`]: super::token_endpoint::Scripted::Field

use crate::probe::Phase;
use crate::protocol::Protocol;
use crate::reason::Reason;
use std::sync::LazyLock;

/// The recorded file, compiled in.
pub const FIELD_REPLIES: &str = include_str!("field_replies.txt");

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A mail server's reply to the auth command (`phase` [`Phase::Auth`], after an XOAUTH2
    /// error challenge when `challenge`) or to the post-auth check ([`Phase::PostAuth`]).
    Mail {
        protocol: Protocol,
        phase: Phase,
        challenge: bool,
    },
    /// A token endpoint's error body, sent with this HTTP status.
    Token { status: u16 },
}

/// One recorded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReply {
    pub kind: Kind,
    /// The reason the contract gives it.
    pub reason: Reason,
    /// As recorded: IMAP replies without their tag, lines joined by `\n`; token bodies as JSON.
    pub reply: String,
    /// The public report (repository issue or pull request URL).
    pub source: String,
    /// Line in `field_replies.txt`.
    pub line: usize,
}

impl FieldReply {
    /// The reply as the server sends it: IMAP tagged replies get `tag`.
    pub fn wire_reply(&self, tag: &str) -> String {
        match self.kind {
            Kind::Mail {
                protocol: Protocol::Imap,
                ..
            } if !self.reply.starts_with("* ") => format!("{tag} {}", self.reply),
            _ => self.reply.clone(),
        }
    }

    /// The reply's lines, for servers that send multi-line replies.
    pub fn wire_lines(&self, tag: &str) -> Vec<String> {
        self.wire_reply(tag).lines().map(str::to_string).collect()
    }
}

/// Parses the record format; errors name the line and the field.
pub fn parse(text: &str) -> Result<Vec<FieldReply>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = raw.split(" | ").map(str::trim).collect();
        let [kind, stage, reason, reply, source] = fields.as_slice() else {
            return Err(format!(
                "line {line}: {} fields, want 5 (kind | stage | reason | reply | source)",
                fields.len()
            ));
        };
        let reason = Reason::from_label(reason)
            .ok_or_else(|| format!("line {line}: reason: unknown `{reason}`"))?;
        let kind = if *kind == "token" {
            let status = stage
                .parse::<u16>()
                .ok()
                .filter(|s| (100..600).contains(s))
                .ok_or_else(|| format!("line {line}: stage: `{stage}` is not an HTTP status"))?;
            Kind::Token { status }
        } else {
            let protocol: Protocol = kind
                .parse()
                .map_err(|_| format!("line {line}: kind: unknown `{kind}`"))?;
            let (phase, challenge) = match *stage {
                "auth" => (Phase::Auth, false),
                "auth+challenge" => (Phase::Auth, true),
                "post_auth" => (Phase::PostAuth, false),
                other => return Err(format!("line {line}: stage: unknown `{other}`")),
            };
            Kind::Mail {
                protocol,
                phase,
                challenge,
            }
        };
        if !source.starts_with("https://github.com/") {
            return Err(format!("line {line}: source: not a GitHub issue URL"));
        }
        out.push(FieldReply {
            kind,
            reason,
            // Mail replies use `\n` between lines; token bodies are JSON, escapes and all.
            reply: match kind {
                Kind::Mail { .. } => reply.replace("\\n", "\n"),
                Kind::Token { .. } => reply.to_string(),
            },
            source: source.to_string(),
            line,
        });
    }
    Ok(out)
}

static REPLIES: LazyLock<Vec<FieldReply>> =
    LazyLock::new(|| parse(FIELD_REPLIES).unwrap_or_default());

/// Every record of `field_replies.txt` (empty only if the file is malformed, which the unit
/// test below forbids).
pub fn replies() -> &'static [FieldReply] {
    &REPLIES
}

/// The record at `index`, if any.
pub fn get(index: usize) -> Option<&'static FieldReply> {
    REPLIES.get(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_parses_and_is_big_enough() {
        let all = parse(FIELD_REPLIES).expect("field_replies.txt parses");
        assert_eq!(all.len(), replies().len());
        let mail = all
            .iter()
            .filter(|f| matches!(f.kind, Kind::Mail { .. }))
            .count();
        let token = all.len() - mail;
        assert!(mail >= 10 && token >= 5, "{mail} mail, {token} token");
        // Token bodies are OAuth JSON.
        for f in &all {
            if let Kind::Token { .. } = f.kind {
                let v: serde_json::Value = serde_json::from_str(&f.reply).expect(&f.reply);
                assert!(v["error"].is_string(), "line {}", f.line);
            }
        }
    }

    #[test]
    fn bad_records_name_line_and_field() {
        assert_eq!(
            parse("# c\nimap | auth | nope | NO x | https://github.com/a/b/issues/1").unwrap_err(),
            "line 2: reason: unknown `nope`"
        );
        assert_eq!(
            parse("token | 99 | token_error | {} | https://github.com/a/b/issues/1").unwrap_err(),
            "line 1: stage: `99` is not an HTTP status"
        );
        assert!(parse("imap | auth | ok").unwrap_err().contains("3 fields"));
        assert!(
            parse("imap | greeting | ok | x | https://github.com/a")
                .unwrap_err()
                .contains("stage")
        );
    }

    #[test]
    fn imap_replies_get_the_tag() {
        let f = &parse("imap | auth | throttled | NO [LIMIT] x | https://github.com/a/b/issues/1")
            .unwrap()[0];
        assert_eq!(f.wire_reply("A7"), "A7 NO [LIMIT] x");
    }
}
