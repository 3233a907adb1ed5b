//! `Redactor`: the one redaction point for text that comes from outside (a mail server's
//! lines, a token endpoint's bodies) and for the lines we send.
//!
//! Servers echo what they got (`NO Invalid credentials for: AUTHENTICATE XOAUTH2 <base64>`,
//! `error_description: client_secret=...&refresh_token=...`), so every transcript line,
//! every server reply kept in a `ProbeError` and every token endpoint error body or excerpt
//! kept in a `TokenError` passes through a `Redactor` as it first enters the process. Details,
//! log fields, status fields and pages are made from those values only, so no unredacted
//! copy exists to leak later.
//!
//! A `Redactor` knows the secrets in play for one probe or one token request and blanks:
//! - any run of [`WINDOW`] or more consecutive bytes of a secret, in its raw, URL-encoded
//!   (`application/x-www-form-urlencoded` and `%20` percent-encoding) and base64 forms
//!   (standard and URL-safe alphabets, at each of the three byte alignments a secret can
//!   have inside a longer base64 text, RFC 4648 §4–5); a secret shorter than `WINDOW` is
//!   blanked where it appears whole;
//! - the value of every field whose name contains `token`, `secret`, `assertion`,
//!   `password` or `device_code` (any case; not one ending in `type`, such as
//!   `token_type`, which names a kind) in a JSON object or a form body (`"name": "v"`, `name=v`,
//!   `name: v`), even when the JSON is broken, escaped inside another JSON string, or
//!   base64-encoded (an RFC 7628 §3.2.2 error challenge): such a base64 text is decoded,
//!   redacted and encoded again, so it still decodes.

use crate::secret::{REDACTED, Secret};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Shortest run of a secret's bytes that is blanked wherever it appears: no 16
/// consecutive characters of a secret survive, in any of its forms.
pub const WINDOW: usize = 16;
/// Secrets shorter than this are not searched for: they would blank ordinary words, and a
/// value this short is no secret (config validation refuses empty ones).
pub const MIN_SECRET: usize = 4;
/// Field names whose values are blanked, compared in lower case.
/// `device_code` is RFC 8628's device verification code, a secret without the words.
pub const SENSITIVE_NAMES: [&str; 5] = ["token", "secret", "assertion", "password", "device_code"];

/// Length of the sampled pieces the index holds. Pieces are taken every `STRIDE` bytes of a
/// form, so any `WINDOW` bytes of it contain one whole piece (STRIDE + GRAM - 1 = WINDOW).
const GRAM: usize = 8;
const STRIDE: usize = WINDOW - GRAM + 1;
/// Base64 inside base64 is decoded this deep, no deeper (bounded work per line).
const MAX_DEPTH: u8 = 2;
/// Shortest run of base64 characters tried as encoded text.
const MIN_BLOB: usize = 16;

/// The secrets of one probe or one token request, and the rules above. Cheap to build
/// (the index holds one entry per 9 bytes of each form); `redact` is linear in the text.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Forms shorter than [`WINDOW`] and decoded SASL strings, longest first: blanked where
    /// they appear whole.
    whole: Vec<String>,
    /// Forms of at least [`WINDOW`] bytes: any run of `WINDOW` of their bytes is blanked.
    long: Vec<Vec<u8>>,
    /// Sampled `GRAM`-byte pieces of `long` (as little-endian `u64`) → the first of their
    /// places in `places`.
    index: HashMap<u64, u32, BuildHasherDefault<PieceHasher>>,
    /// Where each piece occurs: (form, offset, next place of the same piece or `u32::MAX`).
    /// One list for all, so building costs no allocation per piece.
    places: Vec<(u32, u32, u32)>,
}

/// One multiply for a piece already 8 bytes wide: the lookup runs once per byte of every
/// line read, where SipHash would cost more than the rest of the redaction. The keys are
/// the secrets' own bytes, which a server cannot choose, so flooding one bucket needs
/// knowing the secret it is meant to hide.
#[derive(Default)]
struct PieceHasher(u64);

impl Hasher for PieceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 ^= self.0 >> 32;
    }
}

fn piece(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..GRAM].try_into().expect("GRAM bytes"))
}

/// Never prints the secrets it holds.
impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("forms", &(self.whole.len() + self.long.len()))
            .finish()
    }
}

impl Redactor {
    /// A redactor that knows no secret yet: it still blanks sensitive fields.
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Adds a secret (access token, client secret, refresh token, client assertion, device
    /// code) in all its forms. Values shorter than [`MIN_SECRET`] are ignored.
    pub fn add(&mut self, secret: &Secret) {
        self.add_str(secret.expose());
    }

    /// Builder form of [`Redactor::add`].
    pub fn with(mut self, secret: &Secret) -> Self {
        self.add(secret);
        self
    }

    /// Adds a SASL initial response (base64): the base64 text in all its forms, and what
    /// it decodes to where it appears whole. Pieces of the decoded text are not searched
    /// for: they hold the user, host and port, which are no secret and appear elsewhere;
    /// the token inside is a secret of its own ([`Redactor::add`]).
    pub fn add_sasl(&mut self, initial_response: &Secret) {
        self.add(initial_response);
        if let Ok(raw) = STANDARD.decode(initial_response.expose())
            && let Ok(text) = String::from_utf8(raw)
            && text.len() >= MIN_SECRET
            && !self.whole.contains(&text)
        {
            self.whole.push(text);
            self.whole.sort_by_key(|f| std::cmp::Reverse(f.len()));
        }
    }

    /// Adds the value of every field of a form body (`application/x-www-form-urlencoded`,
    /// a token request) whose name is sensitive ([`SENSITIVE_NAMES`]).
    pub fn add_form_secrets(&mut self, body: &[u8]) {
        for (name, value) in form_urlencoded::parse(body) {
            if is_sensitive(&name) {
                self.add_str(&value);
            }
        }
    }

    fn add_str(&mut self, s: &str) {
        if s.len() < MIN_SECRET {
            return;
        }
        let bytes = s.as_bytes();
        let mut forms: Vec<String> = vec![s.to_owned()];
        let form: String = form_urlencoded::byte_serialize(bytes).collect();
        forms.push(form.replace('+', "%20"));
        forms.push(form);
        for engine in [&STANDARD, &URL_SAFE] {
            forms.push(engine.encode(bytes));
        }
        if bytes.len() >= WINDOW {
            // Inside a longer base64 text the secret starts at byte offset 0, 1 or 2 of a
            // 3-byte group; the characters that depend on its bytes alone are the same
            // whatever surrounds it.
            for k in 0..3usize {
                let mut padded = vec![0u8; k];
                padded.extend_from_slice(bytes);
                for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                    let enc = engine.encode(&padded);
                    let start = (8 * k).div_ceil(6);
                    let end = (8 * (k + bytes.len()) / 6).min(enc.len());
                    if start < end {
                        forms.push(enc[start..end].to_owned());
                    }
                }
            }
        }
        for f in forms {
            self.add_form(f);
        }
        self.whole.sort_by_key(|f| std::cmp::Reverse(f.len()));
    }

    fn add_form(&mut self, form: String) {
        if form.len() < MIN_SECRET {
            return;
        }
        if form.len() < WINDOW {
            if !self.whole.contains(&form) {
                self.whole.push(form);
            }
            return;
        }
        let bytes = form.into_bytes();
        if self.long.contains(&bytes) {
            return;
        }
        let id = self.long.len() as u32;
        let last = bytes.len() - GRAM;
        // Every STRIDE bytes, and the last piece too, so the form's tail is found however
        // its length falls.
        let offsets = (0..=last)
            .step_by(STRIDE)
            .chain((!last.is_multiple_of(STRIDE)).then_some(last));
        for off in offsets {
            let at = self.places.len() as u32;
            let next = self.index.insert(piece(&bytes[off..]), at);
            self.places.push((id, off as u32, next.unwrap_or(u32::MAX)));
        }
        self.long.push(bytes);
    }

    /// Whether this redactor knows any secret (besides the field rules).
    pub fn has_secrets(&self) -> bool {
        !self.whole.is_empty() || !self.long.is_empty()
    }

    /// `text` with every known secret and every sensitive field's value shown as
    /// [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        self.redact_at(text, 0)
    }

    /// [`Redactor::redact`] on bytes that may not be UTF-8 (invalid sequences become U+FFFD).
    pub fn redact_bytes(&self, bytes: &[u8]) -> String {
        self.redact(&String::from_utf8_lossy(bytes))
    }

    fn redact_at(&self, text: &str, depth: u8) -> String {
        let marks = self.secret_marks(text);
        // Edits, in order and not overlapping: a secret becomes `<redacted>`; an encoded
        // text holding one (and not itself a secret throughout) is decoded, redacted and
        // encoded again, so an error challenge still decodes.
        let mut edits: Vec<(usize, usize, String)> = Vec::new();
        if depth < MAX_DEPTH {
            for (start, end) in base64_runs(text) {
                let inside: Vec<(usize, usize)> = marks
                    .iter()
                    .copied()
                    .filter(|&(s, e)| s < end && e > start)
                    .collect();
                let crosses = inside.iter().any(|&(s, e)| s < start || e > end);
                if crosses || marks_cover(&inside, start, end) {
                    continue;
                }
                if let Some(blob) = self.reencode(&text[start..end], depth) {
                    edits.push((start, end, blob));
                }
            }
        }
        for &(s, e) in &marks {
            if !edits.iter().any(|&(bs, be, _)| s >= bs && e <= be) {
                edits.push((s, e, REDACTED.to_owned()));
            }
        }
        edits.sort_unstable_by_key(|&(s, _, _)| s);
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (s, e, replacement) in edits {
            out.push_str(&text[at..s]);
            out.push_str(&replacement);
            at = e;
        }
        out.push_str(&text[at..]);
        blank_fields(&out)
    }

    /// A base64 text that decodes to UTF-8 whose redaction changes it: encoded again,
    /// redacted, with the same alphabet and padding.
    fn reencode(&self, blob: &str, depth: u8) -> Option<String> {
        let engines = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD];
        for engine in engines {
            let Ok(raw) = engine.decode(blob) else {
                continue;
            };
            let text = String::from_utf8(raw).ok()?;
            let redacted = self.redact_at(&text, depth + 1);
            if redacted == text {
                return None;
            }
            // The new encoding could, by chance, spell a secret's run itself (a secret of
            // base64 characters): blank that too, even if the text then no longer decodes.
            let encoded = engine.encode(redacted);
            let marks = self.secret_marks(&encoded);
            return Some(replace(&encoded, &marks));
        }
        None
    }

    /// Byte ranges of `text` that hold secrets: sorted, merged, on char boundaries.
    fn secret_marks(&self, text: &str) -> Vec<(usize, usize)> {
        let mut marks = Vec::new();
        // Longest first: a text shorter than a form cannot hold it (and building the
        // searcher for a long form costs more than a short line's whole redaction).
        for form in self.whole.iter().skip_while(|f| f.len() > text.len()) {
            for (i, m) in text.match_indices(form.as_str()) {
                marks.push((i, i + m.len()));
            }
        }
        let bytes = text.as_bytes();
        if !self.index.is_empty() && bytes.len() >= GRAM {
            let mut covered = 0;
            for i in 0..=bytes.len() - GRAM {
                if i + GRAM <= covered {
                    continue;
                }
                let mut next = match self.index.get(&piece(&bytes[i..])) {
                    Some(&at) => at,
                    None => continue,
                };
                while let Some(&(id, off, after)) = self.places.get(next as usize) {
                    next = after;
                    let form = &self.long[id as usize];
                    let off = off as usize;
                    let mut left = 0;
                    while left < i && left < off && bytes[i - left - 1] == form[off - left - 1] {
                        left += 1;
                    }
                    let mut right = 0;
                    while i + GRAM + right < bytes.len()
                        && off + GRAM + right < form.len()
                        && bytes[i + GRAM + right] == form[off + GRAM + right]
                    {
                        right += 1;
                    }
                    if left + GRAM + right >= WINDOW {
                        marks.push((i - left, i + GRAM + right));
                        covered = covered.max(i + GRAM + right);
                    }
                }
            }
        }
        for m in &mut marks {
            while !text.is_char_boundary(m.0) {
                m.0 -= 1;
            }
            while !text.is_char_boundary(m.1) {
                m.1 += 1;
            }
        }
        marks.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(marks.len());
        for (s, e) in marks {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }
}

/// `text` with each of the (sorted, disjoint) `marks` shown as [`REDACTED`].
fn replace(text: &str, marks: &[(usize, usize)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for &(s, e) in marks {
        out.push_str(&text[at..s]);
        out.push_str(REDACTED);
        at = e;
    }
    out.push_str(&text[at..]);
    out
}

/// Whether the marks cover all of `start..end`.
fn marks_cover(marks: &[(usize, usize)], start: usize, end: usize) -> bool {
    let mut at = start;
    for &(s, e) in marks {
        if s > at {
            return false;
        }
        at = at.max(e);
    }
    at >= end
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
}

/// Maximal runs of base64 characters at least [`MIN_BLOB`] long.
fn base64_runs(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_base64_char(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_base64_char(bytes[i]) {
            i += 1;
        }
        if i - start >= MIN_BLOB {
            runs.push((start, i));
        }
    }
    runs
}

/// Whether a field of this name holds a secret (`access_token`, `client_secret`,
/// `client_assertion`, `password`, ...).
///
/// A name ending in `type` or `type_hint` (`token_type`, `client_assertion_type`,
/// `token_type_hint`) names a kind (`Bearer`, a public URN), not a secret.
pub fn is_sensitive(name: &str) -> bool {
    // Without allocating: this runs for every word of every line.
    let name = name.as_bytes();
    let lower_ends = |suffix: &str| {
        name.len() >= suffix.len()
            && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    if lower_ends("type") || lower_ends("type_hint") {
        return false;
    }
    SENSITIVE_NAMES.iter().any(|k| {
        name.windows(k.len())
            .any(|w| w.eq_ignore_ascii_case(k.as_bytes()))
    })
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Blanks the value after every sensitive name followed by `:` or `=`, in JSON (also
/// broken or escaped JSON), form bodies and `name: value` text.
fn blank_fields(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_name_char(bytes[i]) {
            i += 1;
            continue;
        }
        let name_start = i;
        while i < bytes.len() && is_name_char(bytes[i]) {
            i += 1;
        }
        if !is_sensitive(&text[name_start..i]) {
            continue;
        }
        // Closing quote of a JSON key (maybe escaped), spaces, then `:` or `=`.
        let mut j = i;
        while j < bytes.len() && matches!(bytes[j], b'"' | b'\'' | b'\\' | b' ' | b'\t') {
            j += 1;
        }
        if j >= bytes.len() || !matches!(bytes[j], b':' | b'=') {
            continue;
        }
        j += 1;
        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t') {
            j += 1;
        }
        // A quoted value runs to its closing quote (of the same escaping); a bare one to
        // the next delimiter.
        let (value_start, quote): (usize, Option<&[u8]>) = if bytes[j..].starts_with(b"\\\"") {
            (j + 2, Some(b"\\\""))
        } else if j < bytes.len() && matches!(bytes[j], b'"' | b'\'') {
            (j + 1, Some(&bytes[j..j + 1]))
        } else {
            (j, None)
        };
        let value_end = match quote {
            Some(q) => find_closing(bytes, value_start, q),
            None => {
                let mut k = value_start;
                while k < bytes.len()
                    && !matches!(
                        bytes[k],
                        b'&' | b','
                            | b';'
                            | b'}'
                            | b']'
                            | b')'
                            | b'"'
                            | b'\''
                            | b'\\'
                            | b'<'
                            | b'>'
                            | b' '
                            | b'\t'
                            | b'\r'
                            | b'\n'
                    )
                {
                    k += 1;
                }
                k
            }
        };
        if value_end > value_start && &text[value_start..value_end] != REDACTED {
            out.push_str(&text[at..value_start]);
            out.push_str(REDACTED);
            at = value_end;
        }
        i = value_end.max(i);
    }
    out.push_str(&text[at..]);
    out
}

/// End of a quoted value starting at `from`: the next `quote` not escaped (`\"` for a
/// plain quote), or the end of the text (a cut or broken body).
fn find_closing(bytes: &[u8], from: usize, quote: &[u8]) -> usize {
    let mut k = from;
    while k < bytes.len() {
        if quote.len() == 1 && bytes[k] == b'\\' {
            k += 2;
            continue;
        }
        if bytes[k..].starts_with(quote) {
            return k;
        }
        k += 1;
    }
    bytes.len()
}

#[cfg(test)]
mod tests;
