//! The deployment manifests, validated offline: Kubernetes schemas (kubernetes-validate,
//! strict), the exporter config inside each ConfigMap (as `check` would), arguments the
//! binary accepts, probes on the right paths, a grace period longer than the exporter's,
//! ServiceMonitors that select a Service and name its port, and a Dockerfile that builds
//! in stages and runs as a non-root user.

use mail_oauth_exporter::config::Config;
use mail_oauth_exporter::shard::Shard;
use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

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
            if kind == "ServiceMonitor" {
                monitors += 1;
                let want = s(d, &["spec", "selector", "matchLabels"]).unwrap();
                let port = s(d, &["spec", "endpoints"]).unwrap()[0]["port"].clone();
                let service = docs
                    .iter()
                    .filter(|o| o["kind"] == "Service")
                    .find(|svc| {
                        want.as_mapping()
                            .unwrap()
                            .iter()
                            .all(|(k, v)| s(svc, &["metadata", "labels"]).unwrap()[k] == *v)
                    })
                    .unwrap_or_else(|| panic!("{name}: ServiceMonitor selects no Service"));
                let ports = s(service, &["spec", "ports"])
                    .unwrap()
                    .as_sequence()
                    .unwrap();
                assert!(
                    ports.iter().any(|p| p["name"] == port),
                    "{name}: no port {port:?}"
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
                assert_eq!(args[0], "run", "{name}");
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
                let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
                let mounts = c["volumeMounts"].as_sequence().unwrap();
                assert!(
                    mounts.iter().any(|m| m["mountPath"] == config_path),
                    "{name}: {config_path} is not mounted"
                );
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
    assert!(monitors >= 2);
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
