//! The bad-config corpus: every file under `tests/bad_configs/` is rejected with exactly
//! the message its first line expects (`# expect: :LINE:COLUMN: field: message`), so a
//! change in wording or location is a visible, reviewed change. `check` refuses each one
//! with the same message and exit code 2.

use mail_oauth_exporter::config::Config;
use std::path::Path;

#[test]
fn every_bad_config_is_rejected_with_its_expected_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_configs");
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        // Bytes, not text: some cases are not UTF-8 or start with a byte order mark.
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let expect = text
            .trim_start_matches('\u{feff}')
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` first line", path.display()));
        let want = format!("{}{expect}", path.display());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2) || !err.contains(&want) {
            failures.push(format!("\ncheck: {:?} {err}", out.status.code()));
        }
        match Config::load(&path) {
            Ok(_) => failures.push(format!("{}: accepted", path.display())),
            Err(e) => {
                // Every one is located: a line, a column, and a field unless the whole
                // document is at fault.
                assert!(e.line > 0 && e.column > 0, "{e}");
                if e.to_string() != want {
                    failures.push(format!("\n got: {e}\nwant: {want}"));
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 70, "only {checked} bad configs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
