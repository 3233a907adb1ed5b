//! Reading YAML text safely before serde sees it: the byte order mark, UTF-8 errors with
//! their line, empty documents, and a nesting limit checked in one linear pass. The one
//! load prologue of every YAML file the exporter reads (the config and the web config):
//! [`read`] the file, then [`document`] for its raw serde struct.
//!
//! The nesting limit exists because libyaml (under serde_yaml) rescans its stack of
//! possible keys at every token, so a document nested 100,000 flow levels deep takes
//! tens of seconds to be refused. [`check_nesting`] walks the text once, following the
//! YAML rules that decide what is structure (flow brackets, block `-`/`?` indicators,
//! indentation) and what is content (quoted scalars, comments). Where it cannot be sure,
//! it counts a bracket rather than skip it: an error can only err on the deep side.

use super::ConfigError;
use crate::fsread::{self, FileKind};
use std::path::Path;

/// The deepest nesting of collections a config file may have. The configs need five
/// (`mailboxes.m.imap.host` inside the document); 32 leaves room for any layout.
pub const MAX_DEPTH: usize = 32;

const BOM: char = '\u{feff}';

fn at(path: &Path, line: usize, column: usize, message: String) -> ConfigError {
    ConfigError {
        file: path.to_owned(),
        line,
        column,
        field: String::new(),
        message,
    }
}

/// The file's bytes as text: a UTF-8 byte order mark is dropped; invalid UTF-8 is an
/// error at the line and column of the first bad byte.
pub fn decode(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            if text.starts_with(BOM) {
                text.drain(..BOM.len_utf8());
            }
            Ok(text)
        }
        Err(e) => {
            let good = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let before = std::str::from_utf8(&bytes[..good]).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            Err(at(
                path,
                line,
                column,
                format!(
                    "the file is not UTF-8 text (byte 0x{:02x} here)",
                    bytes[good]
                ),
            ))
        }
    }
}

/// The text of the YAML file `path` (the config or the web config): read through
/// [`crate::fsread`] with `kind`'s cap (never a FIFO or device), UTF-8 (errors located),
/// byte order mark dropped. Blocking.
pub(crate) fn read(path: &Path, kind: FileKind) -> Result<String, ConfigError> {
    let bytes = fsread::read(path, kind).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        field: String::new(),
        message: match e {
            fsread::ReadError::Io { message, .. } => format!("cannot read: {message}"),
            other => other.reason(),
        },
    })?;
    decode(path, bytes)
}

/// `text` without its leading byte order mark, if any.
pub(crate) fn without_bom(text: &str) -> &str {
    text.strip_prefix(BOM).unwrap_or(text)
}

/// The document in `text` (read from `path`, named in errors) deserialized as `T`, or
/// `None` when it holds no node at all ([`is_blank`]: each caller says what that means).
/// A leading byte order mark is dropped; the nesting limit ([`MAX_DEPTH`]) is checked in
/// one linear pass first (libyaml alone takes tens of seconds to refuse 100,000 levels).
pub(crate) fn document<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<Option<T>, ConfigError> {
    let text = without_bom(text);
    if is_blank(text) {
        return Ok(None);
    }
    check_nesting(path, text)?;
    serde_yaml::from_str(text)
        .map(Some)
        .map_err(|e| serde_error(path, &e))
}

/// serde_yaml's error as file:line:column, key path and message.
fn serde_error(path: &Path, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    // serde_yaml prefixes the key path ("mailboxes.helpdesk: unknown field ...") and
    // appends the position, which we print in front instead.
    let msg = e.to_string();
    let msg = msg
        .rsplit_once(" at line ")
        .map(|(m, _)| m.to_owned())
        .unwrap_or(msg);
    let (field, message) = match msg.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_owned(), m.to_owned()),
        _ => (String::new(), msg),
    };
    ConfigError {
        file: path.to_owned(),
        line,
        column,
        field,
        message,
    }
}

/// Whether `text` holds no YAML node at all: nothing but whitespace, comments and
/// document markers (`---`, `...`).
pub fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim_matches(|c: char| c.is_whitespace() || c == BOM);
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

/// Refuses `text` when its collections nest deeper than [`MAX_DEPTH`], at the line and
/// column where the limit is crossed. Linear in the length of `text`.
pub fn check_nesting(path: &Path, text: &str) -> Result<(), ConfigError> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let is_break = |c: char| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}');
    let is_blank_or_end =
        |i: usize| i >= n || chars[i] == ' ' || chars[i] == '\t' || is_break(chars[i]);
    let mut line = 1;
    let mut col = 0; // of chars[i], 1-based once advanced
    let mut flow = 0usize;
    // Block structure: indentation of the enclosing block nodes, and `-`/`?` indicators
    // seen on the current line.
    let mut indents: Vec<usize> = Vec::new();
    let mut inline = 0usize;
    let mut line_start = true;
    let mut indent = 0usize;
    let mut node_start = true; // the next character may begin a node
    let mut after_space = true;
    let too_deep = |line: usize, col: usize| {
        Err(at(
            path,
            line,
            col,
            format!("collections nest deeper than {MAX_DEPTH} levels"),
        ))
    };
    let mut i = 0;
    while i < n {
        let c = chars[i];
        col += 1;
        if is_break(c) {
            // CR LF is one break.
            if c == '\r' && i + 1 < n && chars[i + 1] == '\n' {
                i += 1;
            }
            line += 1;
            col = 0;
            line_start = true;
            indent = 0;
            inline = 0;
            after_space = true;
            if flow == 0 {
                node_start = true;
            }
            i += 1;
            continue;
        }
        if c == ' ' || c == '\t' || c == BOM {
            if line_start {
                indent += 1;
            }
            after_space = true;
            i += 1;
            continue;
        }
        if line_start {
            line_start = false;
            if flow == 0 && c != '#' {
                // A block node at this indentation: it closes the deeper ones.
                while indents.last().is_some_and(|&top| top >= indent) {
                    indents.pop();
                }
                indents.push(indent);
                if indents.len() > MAX_DEPTH {
                    return too_deep(line, col);
                }
            }
        }
        let depth =
            |flow: usize, inline: usize, indents: &Vec<usize>| flow + inline + indents.len();
        match c {
            '#' if after_space => {
                // A comment, to the end of the line.
                while i < n && !is_break(chars[i]) {
                    i += 1;
                }
                continue;
            }
            '\'' | '"' if node_start => {
                // A quoted scalar: content only. One that spans lines is read for its
                // opening brackets anyway, since a mistaken start must not hide structure.
                let quote = c;
                let start_line = line;
                let mut j = i + 1;
                let mut opened = 0usize;
                let mut closed = false;
                while j < n {
                    let d = chars[j];
                    if quote == '"' && d == '\\' {
                        j += 2;
                        continue;
                    }
                    if d == quote {
                        if quote == '\'' && j + 1 < n && chars[j + 1] == '\'' {
                            j += 2;
                            continue;
                        }
                        closed = true;
                        break;
                    }
                    if is_break(d) {
                        line += 1;
                        col = 0;
                    } else {
                        col += 1;
                    }
                    if line != start_line && (d == '[' || d == '{') {
                        opened += 1;
                        if depth(flow, inline, &indents) + opened > MAX_DEPTH {
                            return too_deep(line, col);
                        }
                    }
                    j += 1;
                }
                if !closed {
                    return Ok(()); // unterminated: serde_yaml reports it
                }
                col += 1;
                i = j + 1;
                node_start = false;
                after_space = false;
                continue;
            }
            '[' | '{' if flow > 0 || node_start => {
                flow += 1;
                if depth(flow, inline, &indents) > MAX_DEPTH {
                    return too_deep(line, col);
                }
                node_start = true;
            }
            ']' | '}' if flow > 0 => {
                flow -= 1;
                node_start = false;
            }
            ',' if flow > 0 => node_start = true,
            ':' if is_blank_or_end(i + 1)
                || (flow > 0 && matches!(chars.get(i + 1), Some(',' | '[' | ']' | '{' | '}'))) =>
            {
                node_start = true;
            }
            '-' | '?' if flow == 0 && node_start && is_blank_or_end(i + 1) => {
                // `- - - x`: each indicator opens a collection inside the last.
                inline += 1;
                if depth(flow, inline, &indents) > MAX_DEPTH {
                    return too_deep(line, col);
                }
                node_start = true;
            }
            '&' | '!' if node_start => {
                // Anchor or tag: the node follows it.
                while i + 1 < n && !is_blank_or_end(i + 1) {
                    i += 1;
                    col += 1;
                }
            }
            _ => node_start = false,
        }
        after_space = false;
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(text: &str) -> Option<(usize, usize)> {
        check_nesting(Path::new("c.yaml"), text)
            .err()
            .map(|e| (e.line, e.column))
    }

    #[test]
    fn deep_flow_block_and_inline_nesting_is_refused_where_it_crosses_the_limit() {
        let n = 100_000;
        assert_eq!(
            depth_error(&format!("{}{}", "[".repeat(n), "]".repeat(n))),
            Some((1, 32))
        );
        assert_eq!(
            depth_error(&format!("{}1{}", "{a: ".repeat(n), "}".repeat(n))),
            Some((1, 4 * 31 + 1))
        );
        assert_eq!(
            depth_error(&format!("{}x\n", "- ".repeat(n))),
            Some((1, 2 * 31 + 1))
        );
        assert_eq!(depth_error(&format!("k: {}", "[".repeat(n))), Some((1, 35)));
        let mut block = String::new();
        for d in 0..40 {
            block.push_str(&format!("{}k{d}:\n", " ".repeat(d)));
        }
        assert_eq!(depth_error(&block), Some((33, 33)));
    }

    #[test]
    fn brackets_in_quotes_and_comments_are_content() {
        let ok = format!(
            "a: '{0}'\nb: \"{0}\\\" {0}\"\nc: x{0} # {0}\n# {0}\nd: [\"]]]\", '{{', x]\n",
            "[".repeat(50)
        );
        assert_eq!(depth_error(&ok), None);
        // A closing bracket in a string does not make room for more opening ones.
        let text = format!(
            "{}\"{}\", {}",
            "[".repeat(20),
            "]".repeat(20),
            "[".repeat(20)
        );
        assert!(depth_error(&text).is_some());
        // A quote that spans lines counts the brackets it holds.
        let text = format!("a: abc\n  'x\nb: {}\n'", "[".repeat(40));
        assert!(depth_error(&text).is_some());
    }

    #[test]
    fn real_configs_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(depth_error(&text), None, "{}", p.display());
        }
    }

    #[test]
    fn bom_is_dropped_and_bad_utf8_is_located() {
        let p = Path::new("c.yaml");
        assert_eq!(decode(p, b"\xef\xbb\xbfa: 1\n".to_vec()).unwrap(), "a: 1\n");
        let e = decode(p, b"a: 1\nbb: \xff\n".to_vec()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.yaml:2:5: the file is not UTF-8 text (byte 0xff here)"
        );
    }

    #[test]
    fn blank_means_no_node() {
        assert!(is_blank(""));
        assert!(is_blank("\n  # only a comment\n---\n"));
        assert!(!is_blank("listen: 1\n"));
        assert!(!is_blank("~\n"));
    }
}
