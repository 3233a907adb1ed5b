//! The documentation in `docs/` against what it documents: the reasons table against
//! `Reason`, the metrics table against the families a running service exposes, the config
//! reference against the loader and its serde structs, the runbooks against the alert
//! rules; and no file of the repository points outside it.

use crate::demo::{Running, get, parse_metrics, wait_ok};
use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::{Protocol, Reason};
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The rows (header and separator left out) of every Markdown table whose header's first
/// cell is `first`, in document order. Cells are trimmed; `\|` is a literal bar.
fn table_rows(md: &str, first: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    let mut header_seen = false;
    for line in md.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            header_seen = false;
            continue;
        }
        let cells = split_cells(line);
        if !header_seen {
            header_seen = true;
            in_table = cells.first().map(String::as_str) == Some(first);
            continue;
        }
        if in_table && !cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
            rows.push(cells);
        }
    }
    rows
}

fn split_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim_matches('`')
}

/// Lines of `md` outside fenced code blocks.
fn prose_lines(md: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    md.lines().filter(move |l| {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The anchors GitHub gives the headings of `md`: lower case, punctuation other than `-`
/// and `_` dropped, spaces as `-`, repeats numbered `-1`, `-2`.
fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(md) {
        let Some(title) = line
            .strip_prefix('#')
            .map(|t| t.trim_start_matches('#'))
            .and_then(|t| t.strip_prefix(' '))
        else {
            continue;
        };
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// docs/reasons.md

#[test]
fn reasons_doc_lists_every_reason_with_its_stage_transience_and_hint() {
    let md = read("docs/reasons.md");
    let rows = table_rows(&md, "reason");
    let documented: Vec<&str> = rows.iter().map(|r| unquote(&r[0])).collect();
    let code: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        documented, code,
        "docs/reasons.md's table must list Reason::ALL, in its order"
    );
    for (row, reason) in rows.iter().zip(Reason::ALL) {
        let label = reason.as_str();
        assert_eq!(
            row.len(),
            5,
            "{label}: reason | stage | transient | meaning | what to do"
        );
        assert_eq!(row[1], reason.stage().as_str(), "{label}: stage");
        let transient = match (*reason, reason.is_transient()) {
            (Reason::Ok, _) => "",
            (_, true) => "yes",
            (_, false) => "no",
        };
        assert_eq!(row[2], transient, "{label}: transient");
        assert!(!row[3].is_empty(), "{label}: meaning is empty");
        if *reason == Reason::Ok {
            assert_eq!(row[4], "", "ok needs no action");
            continue;
        }
        let link = format!(" ([runbook](runbooks.md#{label}))");
        let hint = row[4].strip_suffix(&link).unwrap_or_else(|| {
            panic!("{label}: `what to do` must end with{link}, got: {}", row[4])
        });
        assert_eq!(hint, reason.hint(), "{label}: the hint the code prints");
    }
}

// ---------------------------------------------------------------------------
// docs/metrics.md

/// A family's documentation: type and label names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

#[tokio::test]
async fn metrics_doc_matches_the_families_a_running_service_exposes() {
    let md = read("docs/metrics.md");
    let mut documented: BTreeMap<String, Family> = BTreeMap::new();
    let mut conditional = BTreeSet::new();
    for row in table_rows(&md, "metric") {
        assert_eq!(row.len(), 4, "metric | type | labels | meaning: {row:?}");
        let name = unquote(&row[0]).to_owned();
        assert!(!row[3].is_empty(), "{name}: meaning is empty");
        // Families that exist only with an optional config key say so first.
        if row[3].starts_with("with `graph:") {
            conditional.insert(name.clone());
        }
        let labels = row[2]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let family = Family {
            kind: row[1].clone(),
            labels,
        };
        assert!(
            documented.insert(name.clone(), family).is_none(),
            "{name} twice"
        );
    }
    assert!(
        documented.len() >= 18,
        "{} metrics documented",
        documented.len()
    );

    // What the service really exposes: the demo's fleet, in this process, probed once.
    let r = Running::start(|t| t).await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(60)).await;
    let (status, text) = get(&r.url("/metrics")).await;
    assert_eq!(status, 200);
    r.stop().await;

    let samples = parse_metrics(&text);
    let mut exposed: BTreeMap<String, Family> = BTreeMap::new();
    let mut empty = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
        if !name.starts_with("mail_oauth_") {
            continue;
        }
        let own: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    || s.name
                        .strip_prefix(name)
                        .is_some_and(|t| ["_bucket", "_sum", "_count"].contains(&t))
            })
            .collect();
        if own.is_empty() {
            // A family announced without samples shows its type, not its labels.
            empty.insert(name.to_owned());
        }
        let labels = own
            .iter()
            .flat_map(|s| s.labels.keys().cloned())
            .filter(|l| l != "le")
            .collect();
        exposed.insert(
            name.to_owned(),
            Family {
                kind: kind.to_owned(),
                labels,
            },
        );
    }
    assert!(
        exposed.len() >= 15,
        "{} families exposed:\n{text}",
        exposed.len()
    );

    for (name, family) in &exposed {
        let doc = documented
            .get(name)
            .unwrap_or_else(|| panic!("{name} is exposed but not in docs/metrics.md"));
        if empty.contains(name) {
            assert_eq!(doc.kind, family.kind, "{name}: type in docs/metrics.md");
        } else {
            assert_eq!(doc, family, "{name}: docs/metrics.md against /metrics");
        }
    }
    for name in documented.keys() {
        assert!(
            exposed.contains_key(name) || conditional.contains(name),
            "{name} is documented but the demo does not expose it (only `with graph:` rows may be absent)"
        );
    }
}

// ---------------------------------------------------------------------------
// docs/config.md

/// The key paths the config's serde structs accept, read from their source
/// (`src/config/raw.rs`): `credentials.<name>.client_id`; map entries as `<name>`, the
/// per-protocol endpoints as `<protocol>`.
fn raw_key_paths() -> BTreeSet<String> {
    let src = read("src/config/raw.rs");
    // struct name -> [(key, type)]
    let mut structs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut rename: Option<String> = None;
    let mut renames_all = false;
    for line in src.lines() {
        let t = line.trim();
        if let Some(cur) = &current {
            if line.starts_with('}') {
                current = None;
                continue;
            }
            if t.starts_with("//") || t.is_empty() {
                continue;
            }
            if t.starts_with("#[") {
                assert!(
                    !t.contains("flatten"),
                    "teach tests/integration/docs.rs about #[serde(flatten)]: {t}"
                );
                if let Some(r) = t.split("rename = \"").nth(1) {
                    rename = Some(r.split('"').next().unwrap().to_owned());
                }
                continue;
            }
            let t = t
                .strip_prefix("pub(super) ")
                .or_else(|| t.strip_prefix("pub(crate) "))
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            let (name, ty) = t
                .split_once(':')
                .unwrap_or_else(|| panic!("raw.rs: a field line `{t}`"));
            let key = rename.take().unwrap_or_else(|| name.trim().to_owned());
            structs
                .get_mut(cur)
                .unwrap()
                .push((key, ty.trim().trim_end_matches(',').to_owned()));
            continue;
        }
        if t.starts_with("#[serde(") && t.contains("rename_all") {
            // Enums use it for their values; on a struct it would rename the keys.
            renames_all = true;
        } else if let Some(rest) = t.split("struct ").nth(1)
            && t.ends_with('{')
            && !t.starts_with("//")
        {
            let name = rest.trim_end_matches('{').trim().to_owned();
            assert!(
                !renames_all,
                "teach tests/integration/docs.rs about rename_all on struct {name}"
            );
            structs.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if t.contains("enum ") {
            renames_all = false;
        }
    }
    assert!(structs.contains_key("RawConfig"), "raw.rs has RawConfig");
    let protocols: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
    let mut out = BTreeSet::new();
    fn walk(
        structs: &BTreeMap<String, Vec<(String, String)>>,
        protocols: &[&str],
        name: &str,
        prefix: &str,
        out: &mut BTreeSet<String>,
    ) {
        for (key, ty) in &structs[name] {
            let segment = if protocols.contains(&key.as_str()) {
                "<protocol>"
            } else {
                key
            };
            let path = format!("{prefix}{segment}");
            out.insert(path.clone());
            let words: Vec<&str> = ty
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .collect();
            for child in structs.keys().filter(|s| words.contains(&s.as_str())) {
                let sub = if ty.contains("Map<") {
                    format!("{path}.<name>.")
                } else {
                    format!("{path}.")
                };
                walk(structs, protocols, child, &sub, out);
            }
        }
    }
    walk(&structs, &protocols, "RawConfig", "", &mut out);
    out
}

/// The first ```yaml block after the heading `heading`.
fn yaml_block_after<'a>(md: &'a str, heading: &str) -> &'a str {
    let start = md
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading}"));
    let rest = &md[start..];
    let open = rest.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let len = rest[open..].find("```").expect("the block ends");
    &rest[open..open + len]
}

/// The values at `path` (segments; `<name>` is any key, `<protocol>` any protocol).
fn values_at<'a>(v: &'a Yaml, path: &[&str]) -> Vec<&'a Yaml> {
    let Some((first, rest)) = path.split_first() else {
        return vec![v];
    };
    let Some(map) = v.as_mapping() else {
        return Vec::new();
    };
    let protocols: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
    map.iter()
        .filter(|(k, _)| {
            let k = k.as_str().unwrap_or("");
            match *first {
                "<name>" => true,
                "<protocol>" => protocols.contains(&k),
                f => f == k,
            }
        })
        .flat_map(|(_, v)| values_at(v, rest))
        .collect()
}

#[test]
fn config_doc_names_every_key_the_loader_accepts_and_its_example_loads() {
    let md = read("docs/config.md");
    let rows = table_rows(&md, "key");
    let mut documented = BTreeMap::new();
    for row in &rows {
        assert_eq!(
            row.len(),
            5,
            "key | type | default | example | meaning: {row:?}"
        );
        let key = unquote(&row[0]).to_owned();
        assert!(!row[1].is_empty(), "{key}: type is empty");
        assert!(!row[4].is_empty(), "{key}: meaning is empty");
        assert!(
            documented.insert(key.clone(), row[1].clone()).is_none(),
            "{key} twice"
        );
    }
    let keys: BTreeSet<String> = documented.keys().cloned().collect();
    let accepted = raw_key_paths();
    let missing: Vec<_> = accepted.difference(&keys).collect();
    let extra: Vec<_> = keys.difference(&accepted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/config.md against src/config/raw.rs: undocumented keys {missing:?}, documented keys the loader does not have {extra:?}"
    );

    // The full example is valid for the real loader (unknown keys are errors there), and
    // shows every key except the refused ones.
    let example = yaml_block_after(&md, "## Full example");
    let path = Path::new("docs/config.md");
    if let Err(e) = Config::parse(path, example) {
        panic!("the full example of docs/config.md does not load: {e}");
    }
    let tree: Yaml = serde_yaml::from_str(example).unwrap();
    for (key, kind) in &documented {
        let segments: Vec<&str> = key.split('.').collect();
        let found = values_at(&tree, &segments);
        if kind == "refused" {
            assert!(found.is_empty(), "{key} is refused, yet in the example");
            // Refused means refused, by its name: put it in the first place it fits.
            let mut bad = tree.clone();
            let (parent, last) = segments.split_at(segments.len() - 1);
            let mut target = &mut bad;
            for seg in parent {
                let map = target.as_mapping_mut().expect("a map on the way");
                let k = map
                    .keys()
                    .find(|k| match *seg {
                        "<name>" => true,
                        s => k.as_str() == Some(s),
                    })
                    .cloned()
                    .unwrap_or_else(|| panic!("{key}: nothing at {seg} in the example"));
                target = map.get_mut(&k).unwrap();
            }
            target
                .as_mapping_mut()
                .unwrap()
                .insert(Yaml::from(last[0]), Yaml::from("x"));
            let text = serde_yaml::to_string(&bad).unwrap();
            let err = Config::parse(path, &text).expect_err("a refused key is refused");
            assert!(
                err.field.ends_with(last[0]),
                "{key}: the error names the key: {err}"
            );
        } else {
            assert!(!found.is_empty(), "{key} is not shown in the full example");
        }
    }
}

// ---------------------------------------------------------------------------
// docs/runbooks.md and the alert rules

fn alerts(groups: &Yaml) -> Vec<(String, Yaml)> {
    let mut out = Vec::new();
    for group in groups.as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                out.push((name.to_owned(), rule.clone()));
            }
        }
    }
    out
}

#[test]
fn every_alert_links_its_runbook_and_every_reason_has_one() {
    let md = read("docs/runbooks.md");
    let anchors = anchors(&md);
    // The one documented base: the first https address ending in runbooks.md, quoted
    // on a line of its own under "Where the alerts link".
    let section = md
        .split("\n## Where the alerts link\n")
        .nth(1)
        .expect("runbooks.md has a section `Where the alerts link`");
    let base = section
        .lines()
        .find_map(|l| {
            l.strip_prefix("`https://")
                .and_then(|r| r.strip_suffix("runbooks.md`"))
        })
        .map(|mid| format!("https://{mid}runbooks.md"))
        .expect("the base URL, quoted on a line of its own");

    for reason in Reason::ALL {
        assert!(
            anchors.contains(reason.as_str()),
            "docs/runbooks.md has no section for {reason}"
        );
    }

    let rules: Yaml = serde_yaml::from_str(&read("deploy/prometheus/rules.yaml")).unwrap();
    let operator: Yaml =
        serde_yaml::from_str(&read("deploy/prometheus/prometheusrule.yaml")).unwrap();
    for (file, groups) in [
        ("rules.yaml", &rules["groups"]),
        ("prometheusrule.yaml", &operator["spec"]["groups"]),
    ] {
        let all = alerts(groups);
        assert!(all.len() >= 9, "{file}: {} alerts", all.len());
        for (name, rule) in all {
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: {name} has no runbook_url"));
            let anchor = url
                .strip_prefix(&format!("{base}#"))
                .unwrap_or_else(|| panic!("{file}: {name}: {url} does not start with {base}#"));
            assert_eq!(
                anchor,
                name.to_lowercase(),
                "{file}: {name} links its own section"
            );
            assert!(
                anchors.contains(anchor),
                "{file}: {name}: docs/runbooks.md has no #{anchor}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Nothing points outside the repository

/// The repository's files: tracked and new ones (git), else every file but build output.
fn repo_files() -> Vec<PathBuf> {
    let root = root();
    let git = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output();
    if let Ok(out) = git
        && out.status.success()
    {
        return out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
            .filter(|p| p.is_file())
            .collect();
    }
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `target` (a path, maybe with `#anchor`) as seen from `file`: inside the repository and
/// existing, and the anchor present when it is a Markdown file. Returns the problem.
fn check_target(root: &Path, file: &Path, target: &str) -> Option<String> {
    let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
    let dir = file.parent().unwrap();
    let resolved = if path.is_empty() {
        file.to_owned()
    } else if dir.join(path).exists() {
        dir.join(path)
    } else if root.join(path).exists() {
        root.join(path)
    } else {
        return Some(format!("{target}: no such file in the repository"));
    };
    let resolved = resolved.canonicalize().unwrap();
    if !resolved.starts_with(root) {
        return Some(format!("{target}: outside the repository"));
    }
    if !anchor.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
        let md = std::fs::read_to_string(&resolved).unwrap();
        if !anchors(&md).contains(anchor) {
            return Some(format!("{target}: no heading with anchor #{anchor}"));
        }
    }
    None
}

#[test]
fn no_file_points_outside_the_repository() {
    let root = root().canonicalize().unwrap();
    // The developers' sibling directory and their machine's workspace; built, so that
    // this file does not name them itself.
    let outside = [["..", "/shared"].concat(), ["/wo", "rk/"].concat()];
    let files = repo_files();
    assert!(files.len() > 50, "{} files found", files.len());
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_prefix(&root).ok())
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    let mut problems = Vec::new();
    let mut links = 0;
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not text
        };
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            for needle in &outside {
                if line.contains(needle.as_str()) {
                    problems.push(format!("{rel}:{}: names {needle}", n + 1));
                }
            }
            // Every Markdown file named anywhere is a file of this repository (web
            // addresses aside), by its path from here, from the root, or its tail.
            for word in line.split(|c: char| !(c.is_alphanumeric() || "_./-".contains(c))) {
                if word.ends_with(".md") && word.len() > 3 && !word.contains("//") {
                    let tail = word.trim_start_matches("../").trim_start_matches("./");
                    let known = names
                        .iter()
                        .any(|r| r == tail || r.ends_with(&format!("/{tail}")));
                    if !known && let Some(p) = check_target(&root, file, word) {
                        problems.push(format!("{rel}:{}: {p}", n + 1));
                    }
                }
            }
        }
        // Markdown links: relative ones stay inside and land on a file and heading.
        if rel.ends_with(".md") {
            let mut fenced = false;
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("```") {
                    fenced = !fenced;
                }
                if fenced {
                    continue;
                }
                for part in line.split("](").skip(1) {
                    let target = part.split(')').next().unwrap_or("");
                    if target.contains("://") || target.starts_with("mailto:") {
                        continue;
                    }
                    links += 1;
                    if let Some(p) = check_target(&root, file, target) {
                        problems.push(format!("{rel}:{}: link {p}", n + 1));
                    }
                }
            }
        }
    }
    assert!(links >= 40, "only {links} relative Markdown links checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The README's first real mailbox: its config loads with the real loader, as the
/// client-credentials credential the steps before it set up.
#[test]
fn readme_first_mailbox_config_loads() {
    use mail_oauth_exporter::token::Grant;
    let md = read("README.md");
    let block = yaml_block_after(
        &md,
        "### Microsoft, application permissions (client credentials)",
    );
    // The block sits in a numbered list item, indented by three spaces.
    let text: Vec<&str> = block
        .lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .collect();
    let config = Config::parse(Path::new("README.md"), &text.join("\n"))
        .unwrap_or_else(|e| panic!("the README's first config does not load: {e}"));
    assert_eq!(config.mailboxes.len(), 1);
    let cred = &config.credentials["contoso-app"];
    assert_eq!(cred.grant, Grant::ClientCredentials);
}
