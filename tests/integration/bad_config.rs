//! The bad-config corpus: every file under `tests/bad_configs/` is rejected with exactly
//! the message its first line expects (`# expect: :LINE:COLUMN: field: message`), so a
//! change in wording or location is a visible, reviewed change.

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
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` first line", path.display()));
        let want = format!("{}{expect}", path.display());
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
    assert!(checked >= 30, "only {checked} bad configs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
