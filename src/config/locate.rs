//! Finds where a key path (`mailboxes.helpdesk.credential`) is written in a YAML file, so
//! errors found after parsing still name a line and column.
//!
//! serde_yaml keeps no spans once a value is deserialized; walking the text by indentation
//! is enough for the block and flow mappings config files use.

/// 1-based (line, column) of the last key of `path` that can be found; the deepest found
/// ancestor when the key itself is absent (a missing field is reported at its parent).
pub fn locate(text: &str, path: &[&str]) -> (usize, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = (1, 1);
    let mut from = 0; // first line to search
    let mut parent_indent: Option<usize> = None;
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(from) {
            let content = line.trim_start();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let indent = line.len() - content.len();
            // Left the parent's block: the key is not there.
            if i > from && parent_indent.is_some_and(|p| indent <= p) {
                break;
            }
            if let Some(col) = key_column(line, key) {
                hit = Some((i, indent, col));
                break;
            }
        }
        match hit {
            Some((i, indent, col)) => {
                found = (i + 1, col + 1);
                from = i; // flow mappings keep children on the same line
                parent_indent = Some(indent);
            }
            None => break,
        }
    }
    found
}

/// Byte column of `key:` in `line`, as a block key or inside a flow mapping.
fn key_column(line: &str, key: &str) -> Option<usize> {
    let quoted = [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ];
    for pat in &quoted {
        let mut start = 0;
        while let Some(pos) = line[start..].find(pat.as_str()) {
            let at = start + pos;
            let before = line[..at].trim_end();
            // A key starts a line, follows a list dash, or follows `{`/`,` in a flow map.
            if before.is_empty()
                || before.ends_with('-')
                || before.ends_with('{')
                || before.ends_with(',')
            {
                return Some(at);
            }
            start = at + pat.len();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listen: 0.0.0.0:9925
credentials:
  a:
    grant: token_file
mailboxes:
  helpdesk:
    address: helpdesk@contoso.com
    credential: b   # unknown
    imap: { host: outlook.office365.com, port: 993 }
  other:
    credential: a
";

    #[test]
    fn finds_nested_and_flow_keys() {
        assert_eq!(
            locate(DOC, &["mailboxes", "helpdesk", "credential"]),
            (8, 5)
        );
        assert_eq!(
            locate(DOC, &["mailboxes", "helpdesk", "imap", "port"]),
            (9, 42)
        );
        assert_eq!(locate(DOC, &["mailboxes", "other", "credential"]), (11, 5));
        // Missing key: its deepest existing ancestor.
        assert_eq!(locate(DOC, &["mailboxes", "other", "address"]), (10, 3));
        assert_eq!(locate(DOC, &["credentials", "a", "grant"]), (4, 5));
    }
}
