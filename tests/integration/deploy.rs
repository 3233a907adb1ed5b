//! The deployment manifests, validated offline: Kubernetes schemas (kubernetes-validate,
//! strict), the exporter config inside each ConfigMap (as `check` would), arguments the
//! real binary accepts, the config mounted as a directory (never `subPath`, which would
//! hide ConfigMap updates from reloads), probes on the right paths, a grace period longer
//! than the exporter's, monitors that select the exporter and name its port and whose
//! scrape job is the one the alert rules select (checked with promtool, firing and
//! quiet), and a Dockerfile that builds in stages and runs as a non-root user.

use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::shard::Shard;
use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_mail-oauth-exporter");
/// Where the exporter's config lives in every pod: a ConfigMap mounted as a directory.
const CONFIG_DIR: &str = "/etc/mail-oauth-exporter";

const INSTALL: &str = "kubernetes-validate is missing: scripts/test installs it; by hand: pip install kubernetes-validate";

fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    for dir in ["kubernetes", "prometheus"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            let is_manifest = p.extension().is_some_and(|x| x == "yaml")
                && std::fs::read_to_string(&p).unwrap().contains("apiVersion:");
            if is_manifest {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

#[test]
fn manifests_pass_kubernetes_schema_validation() {
    let files = manifests();
    // As a module: found whatever the pip install's script directory is.
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL} ({e})"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

/// Every pod spec running the exporter: a sound config, accepted arguments, health
/// probes, and room to finish probes at shutdown.
#[test]
fn exporter_workloads_are_consistent() {
    let mut workloads = 0;
    let mut monitors = 0;
    for file in manifests() {
        let docs = documents(&file);
        let name = file.display().to_string();
        // Config maps holding an exporter config.
        let mut configs = Vec::new();
        for d in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
            if let Some(text) = s(d, &["data", "config.yaml"]).and_then(Value::as_str) {
                let config = Config::parse(Path::new(&format!("{name} (ConfigMap)")), text)
                    .unwrap_or_else(|e| panic!("{e}"));
                configs.push(config);
            }
        }
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind == "ServiceMonitor" || kind == "PodMonitor" {
                monitors += 1;
                let (port, ports) = monitor_target(&name, &docs, d);
                assert!(
                    ports.contains(&port),
                    "{name}: {kind} scrapes port {port:?}, not among {ports:?}"
                );
            }
            let Some(pod) = s(d, &["spec", "template", "spec"]) else {
                continue;
            };
            let containers = ["containers", "initContainers"]
                .iter()
                .filter_map(|k| pod.get(*k).and_then(Value::as_sequence))
                .flatten();
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default();
                if !image.contains("mail-oauth-exporter") {
                    continue;
                }
                workloads += 1;
                let args: Vec<&str> = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                // Prometheus exporters' spelling, no command: the service.
                assert_ne!(args[0], "run", "{name}: no command needed");
                if let Some(i) = args.iter().position(|a| *a == "--shard") {
                    let shard = args[i + 1].replace("$(POD_NAME)", "mail-oauth-exporter-2");
                    let parsed: Shard = shard.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
                    let replicas = d["spec"]["replicas"].as_u64().unwrap();
                    assert_eq!(
                        u64::from(parsed.count),
                        replicas,
                        "{name}: COUNT != replicas"
                    );
                }
                let at = args
                    .iter()
                    .position(|a| *a == "--config.file")
                    .unwrap_or_else(|| panic!("{name}: no --config.file in {args:?}"));
                let config_path = Path::new(args[at + 1]);
                let mounts = c["volumeMounts"].as_sequence().unwrap();
                let config_text =
                    config_mounted_as_directory(&name, &docs, pod, mounts, config_path);
                accepted_by_the_binary(&name, &config_text, &args, at);
                assert!(
                    mounts
                        .iter()
                        .any(|m| m["mountPath"] == "/var/lib/mail-oauth-exporter"),
                    "{name}: no state volume"
                );
                assert_eq!(
                    s(c, &["livenessProbe", "httpGet", "path"]).unwrap(),
                    "/healthz"
                );
                assert_eq!(
                    s(c, &["readinessProbe", "httpGet", "path"]).unwrap(),
                    "/readyz"
                );
                assert_eq!(
                    s(c, &["securityContext", "readOnlyRootFilesystem"]),
                    Some(&Value::Bool(true)),
                    "{name}"
                );
                let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
                for config in &configs {
                    assert_eq!(config.state_dir, Path::new("/var/lib/mail-oauth-exporter"));
                    assert!(
                        grace > config.schedule.shutdown_grace.as_secs(),
                        "{name}: the pod is killed before probes in flight finish"
                    );
                }
            }
        }
    }
    assert!(workloads >= 3, "standalone, sidecar and sharded workloads");
    assert!(monitors >= 3, "a monitor for each layout");
}

/// What a monitor scrapes: the port it names and the port names of what it selects (a
/// ServiceMonitor's Service, a PodMonitor's pods, init containers included).
fn monitor_target(name: &str, docs: &[Value], monitor: &Value) -> (Value, Vec<Value>) {
    let want = s(monitor, &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{name}: a monitor without matchLabels"));
    let selects = |labels: Option<&Value>| {
        want.iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    };
    if monitor["kind"] == "ServiceMonitor" {
        let port = s(monitor, &["spec", "endpoints"]).unwrap()[0]["port"].clone();
        let service = docs
            .iter()
            .filter(|o| o["kind"] == "Service")
            .find(|svc| selects(s(svc, &["metadata", "labels"])))
            .unwrap_or_else(|| panic!("{name}: ServiceMonitor selects no Service"));
        let ports = s(service, &["spec", "ports"])
            .unwrap()
            .as_sequence()
            .unwrap();
        (port, ports.iter().map(|p| p["name"].clone()).collect())
    } else {
        let port = s(monitor, &["spec", "podMetricsEndpoints"]).unwrap()[0]["port"].clone();
        let pod = docs
            .iter()
            .find(|w| selects(s(w, &["spec", "template", "metadata", "labels"])))
            .unwrap_or_else(|| panic!("{name}: PodMonitor selects no pod template"));
        let spec = s(pod, &["spec", "template", "spec"]).unwrap();
        let ports = ["containers", "initContainers"]
            .iter()
            .filter_map(|k| spec.get(*k).and_then(Value::as_sequence))
            .flatten()
            .filter_map(|c| c["ports"].as_sequence())
            .flatten()
            .map(|p| p["name"].clone())
            .collect();
        (port, ports)
    }
}

/// The config file is in a ConfigMap mounted whole as a directory: the kubelet updates
/// such a mount when the ConfigMap changes, a `subPath` mount never (and a reload would
/// read the old file). Nothing else is mounted inside that directory. Returns the config.
fn config_mounted_as_directory(
    name: &str,
    docs: &[Value],
    pod: &Value,
    mounts: &[Value],
    config_path: &Path,
) -> String {
    let dir = config_path.parent().unwrap();
    assert_eq!(dir, Path::new(CONFIG_DIR), "{name}");
    let volumes = pod["volumes"].as_sequence().unwrap();
    for m in mounts {
        // Not among the pod's volumes: a StatefulSet's volumeClaimTemplates (a PVC).
        let volume = volumes.iter().find(|v| v["name"] == m["name"]);
        // The kinds of volume the kubelet updates in place while the pod runs.
        let updated = ["configMap", "secret", "projected", "downwardAPI"]
            .iter()
            .any(|k| volume.is_some_and(|v| v.get(*k).is_some()));
        assert!(
            !(updated && m.get("subPath").is_some()),
            "{name}: {:?} is mounted with subPath: Kubernetes never updates such a file, \
             so reloads would re-read the old one",
            m["name"]
        );
        let at = Path::new(m["mountPath"].as_str().unwrap());
        assert!(
            at == dir || !at.starts_with(dir),
            "{name}: {} is mounted inside the config directory",
            at.display()
        );
    }
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == dir.to_str())
        .unwrap_or_else(|| panic!("{name}: {} is not mounted", dir.display()));
    assert_eq!(mount["readOnly"], Value::Bool(true), "{name}");
    let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
    let map_name = s(volume, &["configMap", "name"])
        .unwrap_or_else(|| panic!("{name}: {} is not a ConfigMap", dir.display()));
    let file = config_path.file_name().unwrap().to_str().unwrap();
    config_map_text(docs, map_name, file).unwrap_or_else(|| {
        panic!("{name}: no ConfigMap {map_name:?} with {file} in deploy/kubernetes")
    })
}

/// `data[file]` of the ConfigMap `map_name`, looked for in `docs`, then in every manifest
/// (the sharded layout uses the standalone one's).
fn config_map_text(docs: &[Value], map_name: &Value, file: &str) -> Option<String> {
    let all: Vec<Value> = manifests().iter().flat_map(|f| documents(f)).collect();
    docs.iter()
        .chain(all.iter())
        .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == *map_name)
        .find_map(|d| s(d, &["data", file]).and_then(Value::as_str))
        .map(str::to_string)
}

/// The real binary takes the container's arguments: the config file (the ConfigMap's
/// text, written to a temp dir) is checked with `--config.check`. Secret files are not
/// here, so a complaint about one under a Secret mount is all that may go wrong.
fn accepted_by_the_binary(name: &str, text: &str, args: &[&str], at: usize) {
    let file = Path::new(args[at + 1]).file_name().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join(file);
    std::fs::write(&local, text).unwrap();
    let mut argv: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(POD_NAME)", "mail-oauth-exporter-2"))
        .collect();
    argv[at + 1] = local.to_str().unwrap().to_string();
    argv.push("--config.check".into());
    let out = std::process::Command::new(BIN)
        .args(&argv)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("Usage:"), "{name}: {argv:?} refused:\n{err}");
    match out.status.code() {
        Some(0) => {}
        Some(2) => assert!(
            err.contains("/secrets/"),
            "{name}: {argv:?}: a config error besides the absent secrets:\n{err}"
        ),
        other => panic!("{name}: {argv:?}: exit {other:?}\n{err}"),
    }
}

/// The job a Prometheus Operator monitor gives its targets, as the Operator builds it: a
/// ServiceMonitor's is the Service's name (or the value of the Service label `jobLabel`
/// names), a PodMonitor's is `NAMESPACE/NAME` (or the pod label `jobLabel` names); then
/// the endpoint's relabelings that set `job` apply. Relabelings this does not model fail.
fn operator_job(name: &str, docs: &[Value], monitor: &Value) -> String {
    let want = s(monitor, &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .unwrap();
    let selects = |labels: Option<&Value>| {
        want.iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    };
    let job_label = s(monitor, &["spec", "jobLabel"]).and_then(Value::as_str);
    let (mut job, endpoints) = if monitor["kind"] == "ServiceMonitor" {
        let service = docs
            .iter()
            .filter(|o| o["kind"] == "Service")
            .find(|svc| selects(s(svc, &["metadata", "labels"])))
            .unwrap();
        let labels = s(service, &["metadata", "labels"]);
        let job = job_label
            .and_then(|l| labels.and_then(|m| m.get(l)).and_then(Value::as_str))
            .unwrap_or_else(|| service["metadata"]["name"].as_str().unwrap());
        (job.to_string(), &monitor["spec"]["endpoints"])
    } else {
        let pod = docs
            .iter()
            .find(|w| selects(s(w, &["spec", "template", "metadata", "labels"])))
            .unwrap();
        let labels = s(pod, &["spec", "template", "metadata", "labels"]);
        let job = match job_label.and_then(|l| labels.and_then(|m| m.get(l))) {
            Some(v) => v.as_str().unwrap().to_string(),
            None => format!(
                "{}/{}",
                monitor["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default"),
                monitor["metadata"]["name"].as_str().unwrap()
            ),
        };
        (job, &monitor["spec"]["podMetricsEndpoints"])
    };
    let endpoints = endpoints.as_sequence().unwrap();
    assert_eq!(endpoints.len(), 1, "{name}: one endpoint, one job");
    for r in endpoints[0]["relabelings"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        if r["targetLabel"] != "job" {
            continue;
        }
        let action = r["action"].as_str().unwrap_or("replace").to_lowercase();
        assert!(
            action == "replace" && r.get("sourceLabels").is_none(),
            "{name}: a job relabeling this test does not model: {r:?}"
        );
        job = r["replacement"].as_str().unwrap().to_string();
    }
    job
}

/// `promtool` on PATH, else a failure saying how to install it.
fn promtool() -> std::process::Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join("promtool").is_file());
    assert!(
        found,
        "`promtool` is missing: scripts/test installs Debian's prometheus package (as root); \
         by hand: sudo apt-get install -y prometheus"
    );
    std::process::Command::new("promtool")
}

/// Runs the rules' MailOAuthExporterDown (its real expression, `for` and labels) with
/// promtool against targets of `job`: one that goes down (the alert must fire, naming the
/// job and instance) and one that stays up (it must stay quiet). Ok, or promtool's words.
fn exporter_down_alert_follows(job: &str) -> Result<(), String> {
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut rule = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .find(|r| r["alert"] == "MailOAuthExporterDown")
        .expect("rules.yaml has MailOAuthExporterDown")
        .clone();
    // The annotations are rules_test.yaml's business; here: does it fire for this job.
    rule.as_mapping_mut().unwrap().remove("annotations");
    let severity = rule["labels"]["severity"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let group = serde_yaml::to_string(
        &serde_yaml::from_str::<Value>(&format!(
            "groups: [{{name: down, rules: [{}]}}]",
            serde_json::to_string(&rule).unwrap()
        ))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("rules.yaml"), group).unwrap();
    let series = |instance: &str| format!(r#"'up{{job="{job}",instance="{instance}"}}'"#);
    let tests = format!(
        "rule_files: [rules.yaml]\n\
         evaluation_interval: 1m\n\
         tests:\n\
         \x20 - interval: 1m\n\
         \x20   input_series:\n\
         \x20     - series: {down}\n\
         \x20       values: '1x2 0x12'\n\
         \x20   alert_rule_test:\n\
         \x20     - {{eval_time: 2m, alertname: MailOAuthExporterDown, exp_alerts: []}}\n\
         \x20     - eval_time: 10m\n\
         \x20       alertname: MailOAuthExporterDown\n\
         \x20       exp_alerts:\n\
         \x20         - exp_labels: {{severity: {severity}, job: \"{job}\", instance: \"10.1.0.7:9925\"}}\n\
         \x20 - interval: 1m\n\
         \x20   input_series:\n\
         \x20     - series: {up}\n\
         \x20       values: '1x14'\n\
         \x20   alert_rule_test:\n\
         \x20     - {{eval_time: 10m, alertname: MailOAuthExporterDown, exp_alerts: []}}\n",
        down = series("10.1.0.7:9925"),
        up = series("10.1.0.8:9925"),
    );
    std::fs::write(dir.path().join("tests.yaml"), tests).unwrap();
    let out = promtool()
        .args(["test", "rules", "tests.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("SUCCESS") {
        Ok(())
    } else {
        Err(text)
    }
}

/// Each layout's monitor → the job the Operator gives its targets → the alert: the rules
/// name one job, every monitor yields it, and MailOAuthExporterDown fires for a target of
/// that job that goes down and stays quiet for one that is up (promtool). The sharded
/// layout's job before the fix (named after its Service) is shown to fail the same check.
#[test]
fn every_layout_scrapes_into_the_job_the_rules_alert_on() {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yaml"),
    )
    .unwrap();
    let jobs: std::collections::BTreeSet<&str> = rules
        .split("job=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert_eq!(jobs.len(), 1, "the rules select one job: {jobs:?}");
    let rules_job = *jobs.first().unwrap();

    let mut layouts = Vec::new();
    for file in manifests() {
        let docs = documents(&file);
        let name = file.display().to_string();
        for monitor in docs
            .iter()
            .filter(|d| d["kind"] == "ServiceMonitor" || d["kind"] == "PodMonitor")
        {
            let job = operator_job(&name, &docs, monitor);
            assert_eq!(
                job,
                rules_job,
                "{name}: {} {} scrapes into job {job:?}, the rules alert on {rules_job:?}",
                monitor["kind"].as_str().unwrap(),
                monitor["metadata"]["name"].as_str().unwrap()
            );
            exporter_down_alert_follows(&job).unwrap_or_else(|e| panic!("{name}: {e}"));
            layouts.push(file.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    layouts.sort();
    assert_eq!(layouts, ["sharded", "sidecar", "standalone"]);
    // The check can fail: the Service's name as the job (the sharded layout without its
    // relabeling) leaves a down shard unnoticed while absent() fires for nothing.
    let err = exporter_down_alert_follows("mail-oauth-exporter-shards")
        .expect_err("the alert cannot follow a job it does not select");
    assert!(err.contains("FAILED"), "{err}");
}

#[test]
fn dockerfile_builds_in_stages_and_runs_unprivileged() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile");
    let text = std::fs::read_to_string(path).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.starts_with(' '))
        .collect();
    assert!(
        instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2
    );
    let user = instructions
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER instruction");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(text.contains("cargo build --release --locked"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/mail-oauth-exporter\"]"));
    // Every file the build copies exists in the repository.
    for l in instructions
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().skip(1).collect();
        for src in &parts[..parts.len() - 1] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(p.exists(), "COPY {src}: not in the repository");
        }
    }
}

/// The build context is the Dockerfile's files and nothing else: every COPY source is
/// allowed by .dockerignore, build output and git history are not (the image test follows
/// the same rules when it builds; this checks them without root or buildah).
#[test]
fn dockerignore_admits_what_the_dockerfile_copies_and_nothing_big() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let mut sources = 0;
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        if line.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            sources += 1;
            assert!(
                super::image::in_build_context(&ignore, src),
                "COPY {src}: .dockerignore leaves it out of the build context"
            );
        }
    }
    assert!(sources >= 5, "{sources} COPY sources");
    for big in [
        "target",
        "target/debug/x",
        ".git",
        "fuzz/target",
        "tests",
        "dashboards",
    ] {
        assert!(
            !super::image::in_build_context(&ignore, big),
            "{big} is in the build context"
        );
    }
}
