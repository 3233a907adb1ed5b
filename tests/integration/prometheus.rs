//! The dashboard and the alert rules against the real Prometheus tools (Debian's
//! `prometheus` package): promtool checks the rules, runs their unit tests and lints a real
//! `/metrics`; a real Prometheus server scrapes the demo, loads the rules, and answers every
//! PromQL expression of the dashboard and of the rules with data.

use crate::demo::{CONTRACT_METRICS, Running, get, wait_ok};
use mail_oauth_exporter::command::demo::expected;
use mail_oauth_exporter::reason::Reason;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The scrape job the rules expect (MailOAuthExporterDown names it; README's scrape config).
const JOB: &str = "mail-oauth-exporter";
const DASHBOARD: &str = "dashboards/mail-oauth-exporter.json";
const RULES: &str = "deploy/prometheus/rules.yaml";
const RULES_TEST: &str = "deploy/prometheus/rules_test.yaml";
const PROMETHEUS_RULE: &str = "deploy/prometheus/prometheusrule.yaml";

/// The contract's transient reasons (docs/reasons.md, transient = yes), restated so
/// that the rules, the code and the contract are checked against each other.
const TRANSIENT: &[&str] = &[
    "token_throttled",
    "token_server_error",
    "token_network_error",
    "dns_error",
    "connect_refused",
    "connect_timeout",
    "server_unavailable",
    "throttled",
    "timeout",
    "auth_token_expired",
];

/// Grafana's own variables, and what stands in for them when Prometheus is asked directly.
const BUILTIN_VARIABLES: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "5m"),
];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `name` on PATH, else a failure saying how to install it: these tests never pass silently
/// for want of Prometheus.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is missing: scripts/test installs Debian's prometheus package (as root); \
                 by hand: sudo apt-get install -y prometheus"
            )
        })
}

/// Runs promtool with `args` (and `stdin`), returning success and everything it printed.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = std::process::Command::new(tool("promtool"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every alerting rule of a `groups:` list: (name, rule).
fn alert_rules(groups: &Yaml) -> Vec<(String, Yaml)> {
    let groups = groups.as_sequence().expect("groups is a list");
    let mut out = Vec::new();
    for group in groups {
        for rule in group["rules"].as_sequence().expect("a group has rules") {
            let name = rule["alert"].as_str().expect("only alerting rules here");
            out.push((name.to_string(), rule.clone()));
        }
    }
    out
}

fn rules_yaml() -> Yaml {
    serde_yaml::from_str(&read(RULES)).expect("rules.yaml is YAML")
}

// ---------------------------------------------------------------------------------------
// A small PromQL scanner: enough to find the metric selectors of an expression and to turn
// its comparisons into `bool` comparisons. Strings, label matchers and durations are
// skipped as wholes, so `!=` inside `{...}` is never taken for an operator.

/// Index just past the string literal that starts at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        j += if b[j] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    j + 1
}

/// Index of the byte closing the bracket opened at `i`, strings skipped.
fn closing(b: &[u8], i: usize) -> usize {
    let (open, close) = (
        b[i],
        match b[i] {
            b'{' => b'}',
            b'[' => b']',
            _ => b')',
        },
    );
    let (mut depth, mut j) = (0, i);
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(b, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
        j += 1;
    }
    panic!(
        "unbalanced {} in {}",
        open as char,
        String::from_utf8_lossy(b)
    );
}

fn next_non_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords followed by a parenthesised list of label names (optional for group_*).
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN",
];

/// The vector selectors of a PromQL expression, as written (`name{matchers}`, `{matchers}`
/// or a bare `name`).
fn selectors(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i);
        } else if c == b'[' {
            i = closing(b, i) + 1;
        } else if c == b'{' {
            let end = closing(b, i);
            out.push(expr[i..=end].to_string());
            i = end + 1;
        } else if c.is_ascii_digit() || c == b'.' {
            // Numbers, durations after `offset`, exponents: one token.
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let next = next_non_space(b, i);
            if LABEL_LISTS.contains(&word) {
                if next < b.len() && b[next] == b'(' {
                    i = closing(b, next) + 1;
                }
            } else if AGGREGATIONS.contains(&word)
                || KEYWORDS.contains(&word)
                || (next < b.len() && b[next] == b'(')
            {
                // An operator or a function call: its arguments are scanned on.
            } else if next < b.len() && b[next] == b'{' {
                let end = closing(b, next);
                out.push(format!("{word}{}", &expr[next..=end]));
                i = end + 1;
            } else {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The expression with every comparison made a `bool` comparison: it keeps every selector,
/// function and label match of the alert, but answers 0 or 1 for each series instead of
/// filtering, so "the alert's query returns data" holds on a healthy demo too.
fn with_bool_comparisons(expr: &str) -> String {
    let b = expr.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let end = match c {
            b'"' | b'\'' | b'`' => skip_string(b, i),
            b'{' | b'[' => closing(b, i) + 1,
            b'=' | b'!' | b'<' | b'>' => {
                let two = b.get(i + 1) == Some(&b'=');
                if (c == b'=' || c == b'!') && !two {
                    i + 1 // `=~`, `!~` only occur inside matchers; nothing else to do
                } else {
                    let op_end = i + if two { 2 } else { 1 };
                    out.push_str(&expr[i..op_end]);
                    let rest = &expr[next_non_space(b, op_end)..];
                    let has_bool = rest.strip_prefix("bool").is_some_and(|r| {
                        !r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                    });
                    if !has_bool {
                        out.push_str(" bool");
                        if !b.get(op_end).is_some_and(u8::is_ascii_whitespace) {
                            out.push(' ');
                        }
                    }
                    i = op_end;
                    continue;
                }
            }
            _ => i + 1,
        };
        out.push_str(&expr[i..end]);
        i = end;
    }
    out
}

/// Replaces Grafana variables (`$name`, `${name}`) with `values` or the built-ins; an
/// unknown variable is an error (a panel would show nothing).
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let close = braced.find('}').ok_or("unclosed ${")?;
            (&braced[..close], close + 2)
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..len], len)
        };
        let value = values
            .get(name)
            .map(String::as_str)
            .or_else(|| {
                BUILTIN_VARIABLES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| *v)
            })
            .ok_or_else(|| format!("unknown variable ${name} in {expr}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn promql_scanner_finds_selectors_and_makes_comparisons_bool() {
    // The helpers the Prometheus test relies on, on the shapes the rules use.
    assert_eq!(
        selectors(
            r#"sum by (le, mailbox) (rate(a_bucket{x=~"$m", y!="b"}[5m])) / count(b) > 3 * 2 or absent(up{job="j"}) and on (instance) c offset 5m"#
        ),
        vec![r#"a_bucket{x=~"$m", y!="b"}"#, "b", r#"up{job="j"}"#, "c"]
    );
    assert_eq!(
        selectors(r#"up and on (instance, job) group_left d"#),
        vec!["up", "d"]
    );
    assert_eq!(
        with_bool_comparisons(
            r#"a{r!="ok", s=~"x|y"} == 1 or b > bool 2 or c != 0 and d<=e > boolean"#
        ),
        r#"a{r!="ok", s=~"x|y"} == bool 1 or b > bool 2 or c != bool 0 and d<= bool e > bool boolean"#
    );
    let vars = BTreeMap::from([("mailbox".to_string(), ".*".to_string())]);
    assert_eq!(
        substitute(
            "rate(a{m=~\"$mailbox\"}[$__rate_interval]) ${mailbox}",
            &vars
        )
        .unwrap(),
        "rate(a{m=~\".*\"}[1m]) .*"
    );
    assert!(substitute("a{m=~\"$nosuch\"}", &vars).is_err());
}

// ---------------------------------------------------------------------------------------
// promtool

#[test]
fn promtool_checks_the_rules_and_every_alert_has_unit_tests_firing_and_not() {
    let (ok, out) = promtool(
        &["check", "rules", repo_file(RULES).to_str().unwrap()],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &["test", "rules", repo_file(RULES_TEST).to_str().unwrap()],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert is shown firing and shown quiet by rules_test.yaml.
    let tests: Yaml = serde_yaml::from_str(&read(RULES_TEST)).unwrap();
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for group in tests["tests"].as_sequence().expect("tests") {
        for case in group["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            let expected = case["exp_alerts"].as_sequence().map(Vec::len).unwrap_or(0);
            if expected > 0 {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let rules = alert_rules(&rules_yaml()["groups"]);
    assert!(rules.len() >= 9, "{} alerts", rules.len());
    for (name, rule) in &rules {
        assert!(firing.contains(name), "{name}: no unit test where it fires");
        assert!(
            quiet.contains(name),
            "{name}: no unit test where it stays quiet"
        );
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            // `info` for what only explains other alerts (a Microsoft incident).
            ["info", "warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let summary = rule["annotations"]["summary"].as_str().unwrap_or("");
        let description = rule["annotations"]["description"].as_str().unwrap_or("");
        assert!(!summary.is_empty(), "{name}: no summary");
        assert!(
            description.contains("Action:"),
            "{name}: the description must name the operator's action: {description}"
        );
    }
}

/// The reasons the rules match on are the contract's, and the transient/permanent split
/// is the contract's transient column (which the code must agree with too): a misspelt
/// reason in a regex would match nothing, silently.
#[test]
fn rules_match_only_contract_reasons_and_split_them_as_the_contract_does() {
    let contract_transient: BTreeSet<String> = TRANSIENT.iter().map(|r| r.to_string()).collect();
    let code_transient: BTreeSet<String> = Reason::ALL
        .iter()
        .filter(|r| r.is_transient())
        .map(|r| r.as_str().to_string())
        .collect();
    assert_eq!(contract_transient, code_transient, "contract vs reason.rs");

    let mut regex_sets = Vec::new();
    for (name, rule) in alert_rules(&rules_yaml()["groups"]) {
        let expr = rule["expr"].as_str().unwrap();
        for part in expr.split("reason").skip(1) {
            let Some(value) = part
                .trim_start_matches(['!', '=', '~'])
                .strip_prefix('"')
                .and_then(|v| v.split('"').next())
            else {
                continue;
            };
            let set: BTreeSet<String> = value.split('|').map(String::from).collect();
            for reason in &set {
                assert!(
                    Reason::from_label(reason).is_some(),
                    "{name}: {reason} is not a contract reason"
                );
            }
            regex_sets.push((name.clone(), set));
        }
    }
    let transient_alert = regex_sets
        .iter()
        .find(|(n, _)| n == "MailOAuthLoginFailingTransient")
        .expect("the transient alert matches on reason");
    assert_eq!(transient_alert.1, contract_transient);
    let mut with_ok = contract_transient.clone();
    with_ok.insert("ok".to_string());
    assert!(
        regex_sets
            .iter()
            .any(|(n, s)| n == "MailOAuthLoginFailing" && *s == with_ok),
        "MailOAuthLoginFailing excludes exactly ok and the transient reasons"
    );
}

#[test]
fn prometheusrule_manifest_carries_the_same_rules() {
    let manifest: Yaml = serde_yaml::from_str(&read(PROMETHEUS_RULE)).unwrap();
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(manifest["kind"].as_str(), Some("PrometheusRule"));
    assert!(manifest["metadata"]["name"].as_str().is_some());
    assert_eq!(
        manifest["spec"]["groups"],
        rules_yaml()["groups"],
        "prometheusrule.yaml's spec.groups differ from rules.yaml"
    );
    // What the operator would load, checked by promtool as a rule file of its own.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.yaml");
    let mut spec = serde_yaml::Mapping::new();
    spec.insert("groups".into(), manifest["spec"]["groups"].clone());
    std::fs::write(&file, serde_yaml::to_string(&spec).unwrap()).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()], None);
    assert!(
        ok,
        "promtool check rules on the PrometheusRule's groups:\n{out}"
    );
}

/// promtool's metric linter on the demo's real /metrics: it flags names (counters not
/// ending in _total, units, non-snake case), missing HELP and the like. Any finding fails
/// the test with promtool's words.
#[tokio::test]
async fn promtool_check_metrics_accepts_the_demo_metrics() {
    let r = Running::start(|t| t).await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    let (code, body) = get(&r.url("/metrics")).await;
    assert_eq!(code, 200);
    for name in CONTRACT_METRICS {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    let (ok, out) = promtool(&["check", "metrics"], Some(&body));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    // The linter does lint: a counter without _total and without HELP is reported.
    let (ok, out) = promtool(
        &["check", "metrics"],
        Some("# TYPE mail_oauth_bad counter\nmail_oauth_bad 1\n"),
    );
    assert!(!ok && out.contains("mail_oauth_bad"), "{out}");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// The dashboard

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Panels, rows' nested panels included.
fn panels(d: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (where, PromQL) for every panel target, and for every query variable the selector of
/// its `label_values(selector, label)`.
fn dashboard_queries(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            let expr = t["expr"].as_str().unwrap_or("").to_string();
            out.push((format!("panel {title:?} {}", t["refId"]), expr));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: {q}", v["name"]));
            let (selector, _label) = inner.rsplit_once(',').expect("label_values(sel, label)");
            out.push((
                format!("variable {}", v["name"]),
                selector.trim().to_string(),
            ));
        }
    }
    out
}

/// The variables the dashboard defines, each standing for every value (`.*`).
fn all_values(d: &Json) -> BTreeMap<String, String> {
    d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| (v["name"].as_str().unwrap().to_string(), ".*".to_string()))
        .collect()
}

#[test]
fn dashboard_is_valid_grafana_json_with_variables_and_every_section() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 30,
        "schemaVersion"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["mailbox", "protocol", "credential"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "{name}");
    }

    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for p in panels(&d) {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id reused"
        );
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        assert!(
            x.zip(w).is_some_and(|(x, w)| w > 0 && x + w <= 24) && h.is_some() && g["y"].is_u64(),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            [
                "stat",
                "timeseries",
                "table",
                "bargauge",
                "state-timeline",
                "gauge"
            ]
            .contains(&p["type"].as_str().unwrap_or("")),
            "{title}: panel type {}",
            p["type"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let ts = p["targets"].as_array().expect("targets");
        assert!(!ts.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in ts {
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.is_empty(), "{title}: empty expr");
            targets += 1;
            // Every series of a mailbox follows the mailbox and protocol variables, every
            // series of a credential the credential variable.
            for sel in selectors(expr) {
                if sel.starts_with("mail_oauth_probe") || sel.starts_with("mail_oauth_tls") {
                    assert!(
                        sel.contains(r#"mailbox=~"$mailbox""#)
                            && sel.contains(r#"protocol=~"$protocol""#),
                        "{title}: {sel} ignores $mailbox/$protocol"
                    );
                }
                if sel.starts_with("mail_oauth_token") || sel.starts_with("mail_oauth_credential") {
                    assert!(
                        sel.contains(r#"credential=~"$credential""#),
                        "{title}: {sel} ignores $credential"
                    );
                }
            }
        }
    }
    assert!(targets >= 20, "{targets} targets");

    // The sections the issue asks for, by the series they show.
    let all: String = dashboard_queries(&d)
        .into_iter()
        .map(|(_, q)| q + "\n")
        .collect();
    for needed in [
        "mail_oauth_probe_success",                            // success ratio
        "mail_oauth_probe_result",                             // failing mailboxes by reason
        "mail_oauth_probe_phase_seconds",                      // phases
        "mail_oauth_probe_duration_seconds{",                  // latency per mailbox
        "mail_oauth_fleet_probe_duration_seconds_bucket",      // latency quantiles (fleet)
        "mail_oauth_probe_last_success_timestamp_seconds",     // last success
        "mail_oauth_token_failures_total",                     // token failures by reason
        "mail_oauth_token_expiry_timestamp_seconds",           // access tokens
        "mail_oauth_credential_expiry_timestamp_seconds",      // client secrets, certificates
        "mail_oauth_tls_certificate_expiry_timestamp_seconds", // TLS certificates
    ] {
        assert!(all.contains(needed), "the dashboard does not show {needed}");
    }
    assert!(all.contains("histogram_quantile("), "latency quantiles");
    // Every variable a query uses is defined (or one of Grafana's own).
    let values = all_values(&d);
    for (place, q) in dashboard_queries(&d) {
        substitute(&q, &values).unwrap_or_else(|e| panic!("{place}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// A real Prometheus server

/// Prometheus run as a child from a config in a temp dir, on 127.0.0.1; killed on drop.
struct Prometheus {
    _child: tokio::process::Child,
    base: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

/// What an instant or range query answered.
#[derive(Debug)]
struct Answer {
    series: usize,
    values: Vec<f64>,
}

impl Prometheus {
    async fn start(target: &str, rule_files: &[PathBuf]) -> Prometheus {
        let binary = tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        // A free port: bound, read, released; Prometheus takes it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rules: String = rule_files
            .iter()
            .map(|f| format!("  - {}\n", f.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let p = Prometheus {
            _child: child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            client: reqwest::Client::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = p
                .client
                .get(format!("{}/-/ready", p.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus not ready within 30 s:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Json, String> {
        let query = params
            .iter()
            .fold(
                form_urlencoded::Serializer::new(String::new()),
                |mut s, (k, v)| {
                    s.append_pair(k, v);
                    s
                },
            )
            .finish();
        let r = self
            .client
            .get(format!("{}{path}?{query}", self.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        let body: Json = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if status != 200 || body["status"] != "success" {
            return Err(format!("{status}: {}", body["error"]));
        }
        Ok(body["data"].clone())
    }

    fn answer(data: &Json) -> Answer {
        let number = |v: &Json| v[1].as_str().and_then(|s| s.parse::<f64>().ok());
        match data["resultType"].as_str() {
            Some("scalar") => Answer {
                series: 1,
                values: number(&data["result"]).into_iter().collect(),
            },
            Some("vector") => {
                let r = data["result"].as_array().unwrap();
                Answer {
                    series: r.len(),
                    values: r.iter().filter_map(|s| number(&s["value"])).collect(),
                }
            }
            Some("matrix") => {
                let r = data["result"].as_array().unwrap();
                Answer {
                    series: r.len(),
                    values: r
                        .iter()
                        .flat_map(|s| s["values"].as_array().unwrap().iter())
                        .filter_map(number)
                        .collect(),
                }
            }
            other => panic!("result type {other:?}"),
        }
    }

    /// An instant query now; Err if Prometheus refuses it (a parse error, for one).
    async fn query(&self, q: &str) -> Result<Answer, String> {
        Ok(Self::answer(
            &self.api("/api/v1/query", &[("query", q)]).await?,
        ))
    }

    /// A range query over the last 30 s, as a Grafana time series panel asks.
    async fn query_range(&self, q: &str) -> Result<Answer, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let (start, end) = (format!("{:.3}", now - 30.0), format!("{now:.3}"));
        let data = self
            .api(
                "/api/v1/query_range",
                &[
                    ("query", q),
                    ("start", &start),
                    ("end", &end),
                    ("step", "5"),
                ],
            )
            .await?;
        Ok(Self::answer(&data))
    }

    /// Polls `q` until `done` holds for its answer, for at most `limit`.
    async fn wait_for(&self, q: &str, limit: Duration, done: impl Fn(&Answer) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let a = self.query(q).await;
            if a.as_ref().is_ok_and(&done) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{q}: {a:?} after {limit:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Asks `q`, requiring that it parses and returns at least one series; says why not.
async fn returns_data(p: &Prometheus, place: &str, q: &str, range: bool) -> Result<(), String> {
    let a = if range {
        p.query_range(q).await
    } else {
        p.query(q).await
    };
    match a {
        Err(e) => Err(format!("{place}: `{q}` refused: {e}")),
        Ok(a) if a.series == 0 || a.values.is_empty() => {
            Err(format!("{place}: `{q}` returned no data"))
        }
        Ok(_) => Ok(()),
    }
}

/// Pending or firing alerts, as (alertname, mailbox or credential, protocol or kind).
async fn active_alerts(p: &Prometheus) -> BTreeSet<(String, String, String)> {
    let data = p.api("/api/v1/alerts", &[]).await.unwrap();
    data["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let l = &a["labels"];
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            let who = if l["mailbox"].is_string() {
                (s("mailbox"), s("protocol"))
            } else {
                (s("credential"), s("kind"))
            };
            (s("alertname"), who.0, who.1)
        })
        .collect()
}

/// Prometheus scrapes the demo (the emulated provider and the service on 127.0.0.1:0, in
/// this process, on a real socket) every second with the rules loaded. Then every PromQL
/// expression must parse and return data:
/// - each dashboard target with the variables set to `.*` (and `$__rate_interval` 1m), as
///   an instant query and, for time series, as a range query; each variable's selector;
/// - each alert expression as written must parse; with its comparisons made `bool` (which
///   keeps every selector, function and label match but no longer filters, so a healthy
///   demo still answers) it must return data;
/// - and every selector of either, alone, must return data: a misspelt metric or label
///   value hidden in one branch of an `or` cannot pass.
/// The rules must load healthy, and the alerts pending on the demo must be exactly the
/// ones its mailboxes call for.
// Two worker threads: the service keeps probing on its schedule while the test thread
// waits on Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_demo_and_every_query_returns_data() {
    let r = Running::start(|t| t).await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    let target = r.base.trim_start_matches("http://").to_string();
    let p = Prometheus::start(&target, &[repo_file(RULES)]).await;

    // Up, and a few scrapes in hand so that rate() over 1m has samples.
    let up = format!(r#"up{{job="{JOB}"}}"#);
    p.wait_for(&up, Duration::from_secs(30), |a| a.values == [1.0])
        .await;
    p.wait_for(
        &format!("count_over_time({up}[1m])"),
        Duration::from_secs(30),
        |a| a.values.first().is_some_and(|v| *v >= 5.0),
    )
    .await;
    p.wait_for(
        "count(mail_oauth_probe_result)",
        Duration::from_secs(10),
        |a| a.values == [expected().len() as f64],
    )
    .await;

    // The checker can fail: no data and a parse error are both told apart from data.
    assert!(
        returns_data(&p, "control", "mail_oauth_no_such_metric", false)
            .await
            .is_err()
    );
    assert!(p.query("sum by (mailbox (up)").await.is_err());

    let mut failures = Vec::new();
    let d = dashboard();
    let values = all_values(&d);
    let range_targets: BTreeSet<String> = panels(&d)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| t["range"] == true)
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    let mut checked = 0;
    for (place, q) in dashboard_queries(&d) {
        let expr = substitute(&q, &values).unwrap();
        let mut results = vec![returns_data(&p, &place, &expr, false).await];
        if range_targets.contains(&q) {
            results.push(returns_data(&p, &place, &expr, true).await);
        }
        for sel in selectors(&expr) {
            results.push(returns_data(&p, &format!("{place} selector"), &sel, false).await);
        }
        failures.extend(results.into_iter().filter_map(Result::err));
        checked += 1;
    }
    for (name, rule) in alert_rules(&rules_yaml()["groups"]) {
        let expr = rule["expr"].as_str().unwrap();
        let place = format!("alert {name}");
        if let Err(e) = p.query(expr).await {
            failures.push(format!("{place}: refused: {e}"));
        }
        let mut results = vec![returns_data(&p, &place, &with_bool_comparisons(expr), false).await];
        for sel in selectors(expr) {
            // absent() is true exactly when its selector has no data: the selector must
            // have data here all the same, the exporter being up.
            results.push(returns_data(&p, &format!("{place} selector"), &sel, false).await);
        }
        failures.extend(results.into_iter().filter_map(Result::err));
        checked += 1;
    }
    assert!(checked >= 30, "{checked} expressions");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The rules loaded into Prometheus are healthy and have been evaluated.
    let rule_count = alert_rules(&rules_yaml()["groups"]).len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let data = p.api("/api/v1/rules", &[]).await.unwrap();
        let rules: Vec<&Json> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        assert_eq!(rules.len(), rule_count, "rules loaded");
        for rule in &rules {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
        let evaluated = rules.iter().all(|r| {
            !r["lastEvaluation"]
                .as_str()
                .unwrap_or("0001")
                .starts_with("0001")
        });
        if evaluated {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rules not evaluated"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The alerts the demo calls for are pending (their `for` has not run out), no others:
    // each failing mailbox raises the one alert its reason belongs to, and contoso-monitor's
    // client secret, 10 days from expiry, is inside 14 days but not 2.
    let mut want = BTreeSet::new();
    for (mailbox, protocol, reason) in expected() {
        let alert = match reason.as_str() {
            "ok" => continue,
            "token_invalid_grant" | "token_missing" => "MailOAuthRefreshTokenInvalid",
            "token_consent_required" => "MailOAuthConsentMissing",
            "smtp_auth_disabled" => "MailOAuthSmtpAuthDisabled",
            r if TRANSIENT.contains(&r) => "MailOAuthLoginFailingTransient",
            _ => "MailOAuthLoginFailing",
        };
        want.insert((alert.to_string(), mailbox, protocol.as_str().to_string()));
    }
    // Microsoft's open Exchange Online incident, seen by contoso-monitor's graph queries.
    want.insert((
        "MailOAuthExchangeOnlineIncident".to_string(),
        "contoso-monitor".to_string(),
        String::new(),
    ));
    want.insert((
        "MailOAuthCredentialExpiringSoon".to_string(),
        "contoso-monitor".to_string(),
        "client_secret".to_string(),
    ));
    // 45 s: on a loaded machine the slow server may time out once; its `timeout` alert
    // goes away with the next probe, 15 s later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let got = active_alerts(&p).await;
        if got == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alerts on the demo:\n got  {got:?}\n want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(p);
    r.stop().await;
}
