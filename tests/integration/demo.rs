//! The service end to end: the demo's emulated provider and the real service on port 0,
//! scraped over HTTP; reloads good and bad; and the binary (`demo`, `run`) as a child
//! process that reloads on SIGHUP and exits cleanly on SIGTERM.

use mail_oauth_exporter::command::demo::{Demo, expected};
use mail_oauth_exporter::command::run;
use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::service::Service;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// Every metric name of the contract (a restatement of docs/metrics.md, not of the code).
pub const CONTRACT_METRICS: &[&str] = &[
    "mail_oauth_probe_success",
    "mail_oauth_probe_result",
    "mail_oauth_probes_total",
    "mail_oauth_probe_failures_total",
    "mail_oauth_probe_duration_seconds",
    "mail_oauth_fleet_probe_duration_seconds",
    "mail_oauth_probe_phase_seconds",
    "mail_oauth_probe_last_run_timestamp_seconds",
    "mail_oauth_probe_last_success_timestamp_seconds",
    "mail_oauth_tls_certificate_expiry_timestamp_seconds",
    "mail_oauth_token_requests_total",
    "mail_oauth_token_failures_total",
    "mail_oauth_token_request_duration_seconds",
    "mail_oauth_token_expiry_timestamp_seconds",
    "mail_oauth_token_last_success_timestamp_seconds",
    "mail_oauth_credential_expiry_timestamp_seconds",
    "mail_oauth_config_last_reload_successful",
    "mail_oauth_config_last_reload_success_timestamp_seconds",
    "mail_oauth_build_info",
];

pub async fn http(method: &str, url: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    let req = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    let r = req
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

pub async fn get(url: &str) -> (u16, String) {
    http("GET", url).await
}

/// Polls `url` until it answers 200, for at most `limit`.
pub async fn wait_ok(url: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status() == 200
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} not 200 within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One sample line of the text format: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A strict parser for the Prometheus text format (and OpenMetrics, whose samples look
/// the same): label values are unescaped (`\\`, `\"`, `\n`); anything malformed panics.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, mut rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => panic!("sample without a value: {line}"),
        };
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            loop {
                let start = chars.offset();
                let eq = body[start..].find("=\"").expect("label k=\"v\"");
                let key = body[start..start + eq].to_string();
                for _ in 0..eq + 2 {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().expect("label value ends").1 {
                        '\\' => match chars.next().map(|c| c.1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?}: {line}"),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(key, value).is_none(), "label twice: {line}");
                match chars.next().map(|c| c.1) {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("{other:?} after a label value: {line}"),
                }
            }
            rest = &body[chars.offset()..];
        }
        let value = rest.strip_prefix(' ').expect("one space before the value");
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value
                .parse()
                .unwrap_or_else(|_| panic!("numeric value: {line}")),
        });
    }
    out
}

pub fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The demo's provider and the service on 127.0.0.1:0, in this process.
pub struct Running {
    pub demo: Demo,
    #[allow(dead_code)] // kept alive beside the HTTP task; tests may inspect it
    pub service: Arc<Service>,
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// `edit` changes the demo's config text before the service loads it.
    pub async fn start(edit: impl FnOnce(String) -> String) -> Running {
        let demo = Demo::start().await.unwrap();
        let text = std::fs::read_to_string(&demo.config_path).unwrap();
        std::fs::write(&demo.config_path, edit(text)).unwrap();
        let service = Service::start(Config::load(&demo.config_path).unwrap()).unwrap();
        let listener = run::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(run::serve(
            service.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
            reloads,
        ));
        Running {
            demo,
            service,
            base,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn metrics(&self) -> Vec<Sample> {
        let (status, body) = get(&self.url("/metrics")).await;
        assert_eq!(status, 200);
        parse_metrics(&body)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("service stops")
            .unwrap();
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn service_end_to_end_metrics_status_and_reload() {
    // A wider first-run spread than the demo's, so "not ready yet" is certainly observed.
    let r = Running::start(|t| t.replace("startup_spread: 2s", "startup_spread: 4s")).await;

    let (code, body) = get(&r.url("/readyz")).await;
    assert_eq!(code, 503, "ready before any probe ran: {body}");
    assert_eq!(get(&r.url("/healthz")).await.0, 200);
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;

    let m = r.metrics().await;
    for name in CONTRACT_METRICS {
        let present = m.iter().any(|s| {
            s.name == *name
                || s.name
                    .strip_prefix(name)
                    .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
        });
        assert!(present, "contract metric {name} missing");
    }
    let expected = expected();
    assert!(expected.len() >= 8);
    for (mailbox, protocol, reason) in &expected {
        let p = protocol.as_str();
        let results = find(
            &m,
            "mail_oauth_probe_result",
            &[("mailbox", mailbox), ("protocol", p)],
        );
        assert_eq!(
            results.len(),
            1,
            "exactly one result series for {mailbox} {p}"
        );
        assert_eq!(
            results[0].labels["reason"],
            reason.as_str(),
            "{mailbox} {p}"
        );
        assert_eq!(results[0].value, 1.0);
        let success = find(
            &m,
            "mail_oauth_probe_success",
            &[("mailbox", mailbox), ("protocol", p)],
        );
        let ok = *reason == mail_oauth_exporter::Reason::Ok;
        assert_eq!(
            success[0].value,
            if ok { 1.0 } else { 0.0 },
            "{mailbox} {p}"
        );
        let runs = find(
            &m,
            "mail_oauth_probes_total",
            &[("mailbox", mailbox), ("protocol", p)],
        );
        assert!(runs[0].value >= 1.0);
        if !ok {
            let f = find(
                &m,
                "mail_oauth_probe_failures_total",
                &[
                    ("mailbox", mailbox),
                    ("protocol", p),
                    ("reason", reason.as_str()),
                ],
            );
            assert!(f[0].value >= 1.0, "{mailbox} {p}");
        }
    }
    // No series for anything that is not configured.
    let configured: Vec<(String, String)> = expected
        .iter()
        .map(|(m, p, _)| (m.clone(), p.as_str().to_string()))
        .collect();
    for s in m.iter().filter(|s| s.name == "mail_oauth_probe_result") {
        assert!(configured.contains(&(s.labels["mailbox"].clone(), s.labels["protocol"].clone())));
    }
    // The slow server's delay shows in its auth phase, and phases of a login are all there.
    let phase = |mb: &str, proto: &str, ph: &str| {
        find(
            &m,
            "mail_oauth_probe_phase_seconds",
            &[("mailbox", mb), ("protocol", proto), ("phase", ph)],
        )
        .first()
        .map(|s| s.value)
    };
    for ph in [
        "resolve",
        "connect",
        "tls",
        "greeting",
        "capability",
        "auth",
        "post_auth",
    ] {
        assert!(phase("helpdesk", "imap", ph).is_some(), "phase {ph}");
    }
    assert!(phase("slow-server", "imap", "auth").unwrap() >= 1.4);
    // A token failure never connected: no phases at all.
    assert!(phase("former-employee", "imap", "connect").is_none());
    // Token side.
    let secret = find(
        &m,
        "mail_oauth_credential_expiry_timestamp_seconds",
        &[("credential", "contoso-monitor"), ("kind", "client_secret")],
    );
    let days = (secret[0].value - now_unix()) / 86_400.0;
    assert!(
        (8.9..=10.1).contains(&days),
        "secret expires in {days} days"
    );
    assert!(
        !find(
            &m,
            "mail_oauth_token_expiry_timestamp_seconds",
            &[("credential", "helpdesk-user")]
        )
        .is_empty()
    );
    assert!(
        !find(
            &m,
            "mail_oauth_token_last_success_timestamp_seconds",
            &[("credential", "contoso-monitor")]
        )
        .is_empty()
    );
    assert!(
        find(
            &m,
            "mail_oauth_token_requests_total",
            &[
                ("credential", "contoso-monitor"),
                ("grant", "client_credentials")
            ]
        )[0]
        .value
            >= 1.0
    );
    assert!(
        find(
            &m,
            "mail_oauth_token_failures_total",
            &[
                ("credential", "former-user"),
                ("grant", "refresh_token"),
                ("reason", "token_invalid_grant")
            ]
        )[0]
        .value
            >= 1.0
    );
    let tls = find(
        &m,
        "mail_oauth_tls_certificate_expiry_timestamp_seconds",
        &[("mailbox", "helpdesk"), ("protocol", "imap")],
    );
    assert!(tls[0].value > now_unix());
    assert_eq!(
        find(&m, "mail_oauth_config_last_reload_successful", &[])[0].value,
        1.0
    );
    let build = find(&m, "mail_oauth_build_info", &[])[0];
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));

    // The JSON status says the same as the metrics.
    let (code, body) = get(&r.url("/api/v1/status")).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["ready"], true);
    let probes = status["probes"].as_array().unwrap();
    assert_eq!(probes.len(), expected.len());
    for (mailbox, protocol, reason) in &expected {
        let row = probes
            .iter()
            .find(|p| p["mailbox"] == mailbox.as_str() && p["protocol"] == protocol.as_str())
            .unwrap_or_else(|| panic!("no status row {mailbox} {protocol}"));
        assert_eq!(row["reason"], reason.as_str());
        if *reason != mail_oauth_exporter::Reason::Ok {
            assert!(
                row["hint"].as_str().is_some_and(|h| !h.is_empty()) || reason.hint().is_empty()
            );
            assert!(
                row["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{row}"
            );
        }
    }
    // The transcript link of a login shows the dialogue with the token redacted.
    let row = probes.iter().find(|p| p["mailbox"] == "scanner").unwrap();
    let (code, transcript) = get(&r.url(row["transcript_url"].as_str().unwrap())).await;
    assert_eq!(code, 200);
    assert!(transcript.contains("AUTH XOAUTH2"), "{transcript}");
    assert!(transcript.contains("5.7.139"), "{transcript}");
    assert!(transcript.contains("<redacted>"), "{transcript}");
    assert_eq!(
        get(&r.url("/transcript?mailbox=nope&protocol=imap"))
            .await
            .0,
        404
    );
    assert_eq!(get(&r.url("/nope")).await.0, 404);
    assert_eq!(http("POST", &r.url("/metrics")).await.0, 405);
    assert_eq!(get(&r.url("/-/reload")).await.0, 405);

    // A broken config is rejected with its location; the old one keeps running.
    let path = r.demo.config_path.clone();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace(
            "    credential: contoso-monitor\n",
            "    credentail: contoso-monitor\n",
        ),
    )
    .unwrap();
    let (code, body) = http("POST", &r.url("/-/reload")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains(&format!("{}:", path.display())), "{body}");
    assert!(body.contains("unknown field `credentail`"), "{body}");
    let m = r.metrics().await;
    assert_eq!(
        find(&m, "mail_oauth_config_last_reload_successful", &[])[0].value,
        0.0
    );
    assert_eq!(
        find(&m, "mail_oauth_probe_result", &[]).len(),
        expected.len(),
        "the old config keeps running"
    );
    let (_, body) = get(&r.url("/")).await;
    assert!(
        body.contains("reload-error"),
        "the page shows the rejected reload"
    );

    // A good config that drops a mailbox: its series disappear.
    let cleaned = remove_mailbox(&good, "busy");
    assert!(!cleaned.contains("busy@") && cleaned.contains("scanner@"));
    std::fs::write(&path, &cleaned).unwrap();
    let (code, body) = http("POST", &r.url("/-/reload")).await;
    assert_eq!(code, 200, "{body}");
    let m = r.metrics().await;
    assert_eq!(
        find(&m, "mail_oauth_config_last_reload_successful", &[])[0].value,
        1.0
    );
    assert!(
        !m.iter()
            .any(|s| s.labels.get("mailbox").is_some_and(|v| v == "busy")),
        "series of a removed mailbox remain"
    );
    assert_eq!(
        find(&m, "mail_oauth_probe_result", &[]).len(),
        expected.len() - 1
    );
    let (_, body) = get(&r.url("/api/v1/status")).await;
    assert!(!body.contains("\"busy\""));
    r.stop().await;
}

/// A mailbox name no label should ever break: quote, backslash and text that looks like
/// exposition syntax (a line feed is refused by the config; its escaping is a unit test
/// in `metrics::text`).
pub const HOSTILE_MAILBOX: &str = "we\"ird\\name # HELP x} 1";

/// /metrics through the service, as Prometheus (OpenMetrics, gzip) and curl (text) ask
/// for it: hostile mailbox names come back exactly, each family has one HELP, one TYPE
/// and one group, every row has exactly one `mail_oauth_probe_result` and at most 15
/// series, and `mail_oauth_probe_duration_seconds` is a gauge beside the fleet histogram.
#[tokio::test]
async fn metrics_exposition_is_exact_in_every_format() {
    use std::io::Read;
    let yaml_key = "\"we\\\"ird\\\\name # HELP x} 1\"";
    let r = Running::start(|t| {
        assert!(t.contains("\n  helpdesk:\n"));
        t.replacen("\n  helpdesk:\n", &format!("\n  {yaml_key}:\n"), 1)
    })
    .await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let mut bodies = Vec::new();
    for (accept, gzip) in [
        ("*/*", false),
        (prometheus_accept, true),
        (prometheus_accept, false),
    ] {
        let mut req = client.get(r.url("/metrics")).header("accept", accept);
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let (ctype, encoding) = (h("content-type"), h("content-encoding"));
        let raw = resp.bytes().await.unwrap();
        let body = if gzip {
            assert_eq!(encoding, "gzip");
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .expect("a gzip body");
            s
        } else {
            assert_eq!(encoding, "");
            String::from_utf8(raw.to_vec()).unwrap()
        };
        let om = accept == prometheus_accept;
        assert_eq!(
            ctype.starts_with("application/openmetrics-text"),
            om,
            "{ctype}"
        );
        assert_eq!(body.ends_with("# EOF\n"), om);
        bodies.push((om, body));
    }
    for (om, body) in &bodies {
        let mut headers = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| l.starts_with("# ") && *l != "# EOF")
        {
            let mut w = line.splitn(4, ' ');
            let (kind, family) = (w.nth(1).unwrap(), w.next().unwrap());
            *headers
                .entry((kind.to_string(), family.to_string()))
                .or_insert(0) += 1;
        }
        assert!(headers.values().all(|n| *n == 1), "{headers:?}");
        let m = parse_metrics(body);
        // Families in one group each: a name, once left, never comes back.
        let mut groups: Vec<String> = Vec::new();
        for s in &m {
            let family = s
                .name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string();
            if groups.last() != Some(&family) {
                assert!(
                    !groups.contains(&family),
                    "{family} in two groups (om: {om})"
                );
                groups.push(family);
            }
        }
        let mut per_row: BTreeMap<(String, String), usize> = BTreeMap::new();
        for s in m.iter().filter(|s| s.labels.contains_key("mailbox")) {
            *per_row
                .entry((s.labels["mailbox"].clone(), s.labels["protocol"].clone()))
                .or_default() += 1;
        }
        assert_eq!(per_row.len(), expected().len(), "{per_row:?}");
        for (row, n) in &per_row {
            assert!(*n <= 15, "{row:?}: {n} series");
            let results = find(
                &m,
                "mail_oauth_probe_result",
                &[("mailbox", &row.0), ("protocol", &row.1)],
            );
            assert_eq!(results.len(), 1, "{row:?}");
        }
        for p in ["imap", "pop3", "smtp"] {
            let hostile = find(
                &m,
                "mail_oauth_probe_result",
                &[("mailbox", HOSTILE_MAILBOX), ("protocol", p)],
            );
            assert_eq!(hostile.len(), 1, "{p} (om: {om})");
            assert_eq!(hostile[0].labels["reason"], "ok");
        }
        assert!(
            !find(
                &m,
                "mail_oauth_probe_duration_seconds",
                &[("mailbox", HOSTILE_MAILBOX)]
            )
            .is_empty()
        );
        // A token failure never reached the auth step: no duration.
        assert!(
            find(
                &m,
                "mail_oauth_probe_duration_seconds",
                &[("mailbox", "former-employee")]
            )
            .is_empty()
        );
        assert!(
            !find(
                &m,
                "mail_oauth_fleet_probe_duration_seconds_bucket",
                &[("protocol", "imap"), ("le", "+Inf")]
            )
            .is_empty()
        );
        assert!(body.contains("# TYPE mail_oauth_probe_duration_seconds gauge\n"));
    }
    // The status page and the JSON carry the same name, escaped for their own syntax.
    let (_, json) = get(&r.url("/api/v1/status")).await;
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        status["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["mailbox"] == HOSTILE_MAILBOX)
    );
    r.stop().await;
}

/// The config text without mailbox `name` (its block ends at the next mailbox).
pub fn remove_mailbox(config: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in config.lines() {
        if line.starts_with("  ") && !line.starts_with("   ") {
            skipping = line == format!("  {name}:");
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `run` as a child (JSON logs at info, HTTP on 127.0.0.1:0): waits for its start event
/// and returns the child, its base URL, and a task that collects every log line until it
/// exits (to be scanned for secrets).
pub async fn spawn_run(
    config: &std::path::Path,
) -> (
    tokio::process::Child,
    String,
    tokio::task::JoinHandle<String>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args([
            "--log-format",
            "json",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let base = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen.push(line);
            if v["fields"]["message"] == "mail-oauth-exporter running" {
                return format!("http://{}", v["fields"]["address"].as_str().unwrap());
            }
        }
        panic!("run exited: {seen:?}");
    })
    .await
    .expect("run logs its start");
    let logs = tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push(l);
        }
        seen.join("\n")
    });
    (child, base, logs)
}

/// Reads a child's stdout until a line contains `needle`; returns all lines read.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("no `{needle}` within 30 s"));
    seen
}

pub fn signal_pid(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// The README's first command as a user runs it: URLs printed, status page alive,
/// a clean exit 0 on SIGTERM (a Kubernetes pod's stop).
#[tokio::test]
async fn demo_binary_serves_and_exits_cleanly_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("demo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed = read_until(&mut lines, "status page").await;
    let url = printed
        .last()
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    wait_ok(&format!("{url}readyz"), Duration::from_secs(30)).await;
    let (code, page) = get(&url).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("smtp_auth_disabled"),
        "status page shows reasons"
    );
    let mut stderr = child.stderr.take().unwrap();
    signal_pid(child.id().unwrap(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).await.unwrap();
    assert!(logs.contains("stopped"), "{logs}");
}

/// `run` against a config: JSON logs with one event per probe, SIGHUP reloads (a bad
/// file is refused, a good one applied), SIGTERM exits 0.
#[tokio::test]
async fn run_binary_reloads_on_sighup_and_exits_on_sigterm() {
    let demo = Demo::start().await.unwrap();
    let good = std::fs::read_to_string(&demo.config_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args([
            "--log-format",
            "json",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&demo.config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run starts");
    let pid = child.id().unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut next_event =
        async |seen: &mut Vec<serde_json::Value>, pred: &dyn Fn(&serde_json::Value) -> bool| {
            let read = async {
                while let Some(line) = logs.next_line().await.unwrap() {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                    let hit = pred(&v);
                    seen.push(v.clone());
                    if hit {
                        return v;
                    }
                }
                panic!("logs ended");
            };
            tokio::time::timeout(Duration::from_secs(30), read)
                .await
                .expect("log event within 30 s")
        };
    let started = next_event(&mut seen, &|v| {
        v["fields"]["message"] == "mail-oauth-exporter running"
    })
    .await;
    let addr: SocketAddr = started["fields"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let base = format!("http://{addr}");
    // One event per probe result, with the contract's fields.
    let failed = next_event(&mut seen, &|v| {
        v["fields"]["message"] == "probe failed" && v["fields"]["mailbox"] == "scanner"
    })
    .await;
    assert_eq!(failed["fields"]["protocol"], "smtp");
    assert_eq!(failed["fields"]["reason"], "smtp_auth_disabled");
    assert!(
        failed["fields"]["detail"]
            .as_str()
            .unwrap()
            .contains("5.7.139")
    );
    assert!(failed["fields"]["duration_ms"].as_f64().is_some());
    assert_eq!(failed["level"], "WARN");

    std::fs::write(&demo.config_path, "mailboxes: [oops\n").unwrap();
    signal_pid(pid, "HUP");
    let rejected = next_event(&mut seen, &|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("reload failed"))
    })
    .await;
    let error = rejected["fields"]["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{}:", demo.config_path.display())),
        "{error}"
    );
    let m = parse_metrics(&get(&format!("{base}/metrics")).await.1);
    assert_eq!(
        find(&m, "mail_oauth_config_last_reload_successful", &[])[0].value,
        0.0
    );

    std::fs::write(&demo.config_path, remove_mailbox(&good, "scanner")).unwrap();
    signal_pid(pid, "HUP");
    next_event(&mut seen, &|v| v["fields"]["message"] == "config reloaded").await;
    let m = parse_metrics(&get(&format!("{base}/metrics")).await.1);
    assert_eq!(
        find(&m, "mail_oauth_config_last_reload_successful", &[])[0].value,
        1.0
    );
    assert!(find(&m, "mail_oauth_probe_result", &[("mailbox", "scanner")]).is_empty());
    assert!(!find(&m, "mail_oauth_probe_result", &[("mailbox", "busy")]).is_empty());

    signal_pid(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    while let Ok(Some(line)) = logs.next_line().await {
        seen.push(serde_json::Value::String(line));
    }
    let all: Vec<String> = seen.iter().map(|v| v.to_string()).collect();
    crate::secrets::assert_clean(
        "run's logs",
        &all.join("\n"),
        &crate::secrets::secrets_of(&demo),
    );
}

/// `--shard INDEX/COUNT`: three replicas on one config probe every mailbox exactly once,
/// each only its own; a bad shard is a usage error (exit 2).
#[tokio::test]
async fn shards_cover_the_fleet_exactly_once() {
    use mail_oauth_exporter::scheduler::Key;
    use mail_oauth_exporter::shard::Shard;
    let demo = Demo::start().await.unwrap();
    let all: std::collections::BTreeSet<_> = expected()
        .into_iter()
        .map(|(m, p, _)| Key::new(&m, p))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut services = Vec::new();
    for index in 0..3 {
        let shard = Shard { index, count: 3 };
        let service = Service::start_sharded(demo.config().unwrap(), Some(shard)).unwrap();
        let keys = service.keys();
        for k in &keys {
            assert!(seen.insert(k.clone()), "{k:?} probed by two replicas");
            assert!(shard.owns(&k.mailbox));
        }
        // The board (and so /metrics and the page) holds only this replica's rows.
        let rows = service.board().snapshot().probes.len();
        assert_eq!(rows, keys.len(), "shard {shard}");
        // Each replica exports the credentials its mailboxes use, and no other.
        let config = service.config();
        for c in config.credentials.keys() {
            assert!(config.mailboxes.values().any(|m| &m.credential == c));
        }
        services.push(service);
    }
    assert_eq!(seen, all, "the replicas together cover the fleet");
    assert!(services.iter().filter(|s| !s.keys().is_empty()).count() >= 2);
    for s in services {
        s.shutdown().await;
    }

    let out = Command::new(env!("CARGO_BIN_EXE_mail-oauth-exporter"))
        .args(["run", "--shard", "3/3", "--config"])
        .arg(&demo.config_path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INDEX must be below COUNT"));
}

/// Fetches `/api/v1/status` as JSON.
async fn status_json(r: &Running) -> serde_json::Value {
    let (code, body) = get(&r.url("/api/v1/status")).await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// The page order: permanent failures, transient ones, ok, not probed yet.
fn severity(row: &serde_json::Value) -> u8 {
    match (row["state"].as_str().unwrap(), row["transient"].as_bool()) {
        ("failed", Some(false)) => 0,
        ("failed", _) => 1,
        ("ok", _) => 2,
        _ => 3,
    }
}

#[tokio::test]
async fn status_history_failing_since_order_and_counts() {
    // Probes every 5 s (the least allowed), so a second result comes soon.
    let r = Running::start(|t| {
        t.replace("interval: 15s", "interval: 5s")
            .replace("timeout: 10s", "timeout: 4s")
    })
    .await;
    wait_ok(&r.url("/readyz"), Duration::from_secs(30)).await;
    let first = status_json(&r).await;
    // The history grows with each probe, oldest first, one entry a probe.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = status_json(&r).await;
        if s["probes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["history"].as_array().unwrap().len() >= 2)
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history does not grow: {s}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for p in first["probes"].as_array().unwrap() {
        assert_eq!(
            p["history"].as_array().unwrap().len() as u64,
            p["probes"].as_u64().unwrap(),
            "{p}"
        );
    }
    let probes = status["probes"].as_array().unwrap();
    for p in probes {
        let history = p["history"].as_array().unwrap();
        let times: Vec<SystemTime> = history
            .iter()
            .map(|e| humantime::parse_rfc3339(e["at"].as_str().unwrap()).unwrap())
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {p}");
        let last = history.last().unwrap();
        assert_eq!(last["reason"], p["reason"], "{p}");
        if p["state"] == "failed" {
            // The demo's failures fail every time: the streak began with the first probe.
            let since = p["failing_since"].as_str().unwrap_or_else(|| panic!("{p}"));
            assert_eq!(since, history[0]["at"].as_str().unwrap(), "{p}");
        } else {
            assert!(p.get("failing_since").is_none(), "{p}");
        }
    }

    // The page: rows in severity order, the counts by reason at the top, the strips.
    let (code, page) = get(&r.url("/")).await;
    assert_eq!(code, 200);
    let order: Vec<u8> = page
        .split("<tr data-mailbox=\"")
        .skip(1)
        .map(|tr| {
            let mailbox = tr.split('"').next().unwrap();
            let protocol = tr
                .split("data-protocol=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let row = probes
                .iter()
                .find(|p| p["mailbox"] == mailbox && p["protocol"] == protocol)
                .unwrap();
            severity(row)
        })
        .collect();
    assert_eq!(order.len(), probes.len());
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    assert!(
        order.contains(&0) && order.contains(&1) && order.contains(&2),
        "{order:?}"
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in probes.iter().filter(|p| p["state"] == "failed") {
        *counts
            .entry(p["reason"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(counts.len() >= 4);
    for (reason, n) in &counts {
        assert!(
            page.contains(&format!("id=\"count-reason-{reason}\" title="))
                && page.contains(&format!("<b>{n}</b> {reason}</span>")),
            "no count {n} for {reason}"
        );
    }
    assert!(!page.contains("count-reason-ok"));
    assert!(page.contains("class=\"tick permanent\" title=\""));
    assert!(page.contains("class=\"tick ok\" title=\""));
    assert!(page.contains("failing since "));

    // Credentials: the last token error with its time, the revoked refresh token not
    // "saved", colours by kind.
    let creds = status["credentials"].as_array().unwrap();
    let cred = |name: &str| creds.iter().find(|c| c["name"] == name).unwrap();
    let former = cred("former-user");
    assert_eq!(
        former["last_error"]["reason"], "token_invalid_grant",
        "{former}"
    );
    humantime::parse_rfc3339(former["last_error"]["at"].as_str().unwrap()).unwrap();
    assert!(cred("helpdesk-user")["last_error"].is_null());
    let row = |name: &str| {
        let start = page
            .find(&format!("<tr data-credential=\"{name}\">"))
            .unwrap_or_else(|| panic!("no credential row {name}"));
        page[start..].split("</tr>").next().unwrap().to_string()
    };
    let former = row("former-user");
    assert!(former.contains("token_invalid_grant</span>"), "{former}");
    assert!(
        former.contains("rejected by the token endpoint"),
        "{former}"
    );
    assert!(!former.contains(">saved<"), "{former}");
    let helpdesk = row("helpdesk-user");
    assert!(helpdesk.contains(">saved<"), "{helpdesk}");
    assert!(
        helpdesk.contains("<td class=\"muted\">none</td>"),
        "{helpdesk}"
    );
    // An access token just obtained (an hour's lifetime) is not painted; the demo's client
    // secret, 10 days from expiry, warns as the alert does.
    let monitor = row("contoso-monitor");
    let cells: Vec<&str> = monitor.split("<td").collect();
    assert!(
        cells[3].starts_with(" title=\"") && cells[3].contains(">in "),
        "{monitor}"
    );
    assert!(
        cells[6].starts_with(" class=\"warn\"") && cells[6].contains(" days</td>"),
        "{monitor}"
    );
    assert!(!monitor.contains("class=\"bad\""), "{monitor}");

    // The fix as a command, with this config's path and the credential's name.
    let config = r.demo.config_path.display().to_string();
    let former = probes
        .iter()
        .find(|p| p["credential"] == "former-user")
        .unwrap();
    let command = format!("mail-oauth-exporter login --config {config} --credential former-user");
    assert_eq!(former["fix_command"], command.as_str(), "{former}");
    assert!(page.contains(&format!("<code>{command}</code>")));
    let ok = probes.iter().find(|p| p["state"] == "ok").unwrap();
    assert!(ok["fix_command"].is_null(), "{ok}");
    // A service account's rejected grant is not fixed by `login`.
    let departed = probes
        .iter()
        .find(|p| p["credential"] == "workspace" && p["state"] == "failed")
        .unwrap();
    assert_eq!(departed["reason"], "token_invalid_grant");
    assert!(departed["fix_command"].is_null(), "{departed}");

    // A row that failed at the token stage links what was exchanged with the token
    // endpoint: the request and the reply, no secret value.
    let url = former["transcript_url"]
        .as_str()
        .unwrap_or_else(|| panic!("{former}"));
    assert_eq!(url, "/transcript?credential=former-user");
    assert!(page.contains(&format!("<a href=\"{url}\">token exchange</a>")));
    let (code, exchange) = get(&r.url(url)).await;
    assert_eq!(code, 200);
    let token_url = format!("> POST {}", r.demo.endpoint.authority());
    assert!(exchange.contains(&token_url), "{exchange}");
    assert!(
        exchange.contains("> grant_type=refresh_token\n"),
        "{exchange}"
    );
    assert!(
        exchange.contains("> refresh_token=<redacted>\n"),
        "{exchange}"
    );
    assert!(exchange.contains("< HTTP 400\n"), "{exchange}");
    assert!(exchange.contains("invalid_grant"), "{exchange}");
    let secrets = crate::secrets::secrets_of(&r.demo);
    crate::secrets::assert_clean("token exchange", &exchange, &secrets);
    crate::secrets::Windows::new(&secrets).assert_clean("token exchange", &exchange);
    // A client credentials exchange that worked: its client secret and access token blanked.
    let (code, exchange) = get(&r.url("/transcript?credential=contoso-monitor")).await;
    assert_eq!(code, 200);
    assert!(
        exchange.contains("> client_secret=<redacted>\n"),
        "{exchange}"
    );
    assert!(exchange.contains("< HTTP 200\n"), "{exchange}");
    assert!(
        exchange.contains("\"access_token\":\"<redacted>\""),
        "{exchange}"
    );
    let secrets = crate::secrets::secrets_of(&r.demo);
    crate::secrets::assert_clean("token exchange", &exchange, &secrets);
    crate::secrets::Windows::new(&secrets).assert_clean("token exchange", &exchange);
    assert_eq!(get(&r.url("/transcript?credential=nope")).await.0, 404);
    r.stop().await;
}
