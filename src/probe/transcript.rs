//! The redacted record of a probe's dialogue: what each side said, and when.
//!
//! Lines are redacted as they are recorded, through the probe's [`Redactor`] (the same
//! one that redacts every received line as it is read), so no unredacted copy of a secret
//! ever exists in a transcript, however it is later shown (CLI, status page, logs).

use crate::redact::Redactor;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Longest line kept in a transcript; longer ones are cut (a server may send megabytes).
const MAX_SHOWN: usize = 512;
/// Most lines kept; a chatty or hostile server cannot grow the transcript without bound.
const MAX_LINES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Direction {
    /// Sent by us.
    #[serde(rename = "C")]
    Client,
    /// Received from the server.
    #[serde(rename = "S")]
    Server,
    /// A note of ours (TLS established, connection closed...).
    #[serde(rename = "*")]
    Note,
}

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Time since the probe started.
    #[serde(serialize_with = "as_millis")]
    pub at: Duration,
    pub dir: Direction,
    pub text: String,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Transcript {
    pub lines: Vec<Line>,
    /// Lines not kept because the transcript was full.
    pub dropped: usize,
}

impl Transcript {
    /// Records a line after passing it through `redactor` (every secret of the probe and
    /// every sensitive field value shown as `<redacted>`), before it is cut to width.
    pub(crate) fn push(&mut self, at: Duration, dir: Direction, raw: &str, redactor: &Redactor) {
        if self.lines.len() >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        self.record(at, dir, &redactor.redact(raw));
    }

    /// Records a line that already went through the probe's redactor (a received line,
    /// redacted as it was read).
    pub(crate) fn push_redacted(&mut self, at: Duration, dir: Direction, redacted: &str) {
        if self.lines.len() >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        self.record(at, dir, redacted);
    }

    fn record(&mut self, at: Duration, dir: Direction, redacted: &str) {
        let mut text = printable(redacted);
        if text.len() > MAX_SHOWN {
            let mut cut = MAX_SHOWN;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("… (cut)");
        }
        self.lines.push(Line { at, dir, text });
    }

    /// Text of the whole transcript, one line each, as the CLI prints it.
    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            let d = match l.dir {
                Direction::Client => "C:",
                Direction::Server => "S:",
                Direction::Note => "*",
            };
            writeln!(f, "{:>9.1}ms {d} {}", l.at.as_secs_f64() * 1000.0, l.text)?;
        }
        if self.dropped > 0 {
            writeln!(f, "... {} more lines not kept", self.dropped)?;
        }
        Ok(())
    }
}

/// Shows control characters and invalid UTF-8 visibly instead of passing them to a terminal.
fn printable(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '\t' => out.push(' '),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn secrets_are_replaced_and_controls_escaped() {
        let mut t = Transcript::default();
        let secrets = Redactor::new()
            .with(&Secret::new("tok3n"))
            .with(&Secret::new("dXNlcj1"));
        t.push(
            Duration::ZERO,
            Direction::Client,
            "A01 AUTHENTICATE XOAUTH2 dXNlcj1",
            &secrets,
        );
        t.push(
            Duration::ZERO,
            Direction::Server,
            "echo tok3n\x1b[2J",
            &secrets,
        );
        let s = t.render();
        assert!(!s.contains("tok3n") && !s.contains("dXNlcj1"), "{s}");
        assert!(s.contains("A01 AUTHENTICATE XOAUTH2 <redacted>"), "{s}");
        assert!(s.contains("echo <redacted>\\x1b[2J"), "{s}");
    }

    #[test]
    fn bounded_in_lines_and_width() {
        let mut t = Transcript::default();
        for _ in 0..(MAX_LINES + 5) {
            t.push(
                Duration::ZERO,
                Direction::Server,
                &"x".repeat(10_000),
                &Redactor::new(),
            );
        }
        assert_eq!(t.lines.len(), MAX_LINES);
        assert_eq!(t.dropped, 5);
        assert!(t.lines[0].text.len() < MAX_SHOWN + 20);
    }
}
