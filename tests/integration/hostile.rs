//! The running service (`run`, a child process) against hostile and broken peers: mail
//! servers that never greet, send an endless line, trickle, flood 100 MB, send garbage or
//! reset; token endpoints that hang, answer HTML, answer 200 without a token or 64 MiB of
//! JSON. Each probe ends in its named reason, the service keeps serving `/metrics`
//! meanwhile, and its peak memory stays far below what the peers sent.

use crate::demo::{find, get, parse_metrics};
use mail_oauth_exporter::emulator::token_endpoint::{
    ClientSpec, EmuGrant, Scripted, Target, TokenEndpoint,
};
use mail_oauth_exporter::emulator::{
    Emulator, EmulatorOptions, FLOOD_BYTES, Proto, ServerBehaviour, TlsKind,
};
use std::sync::Arc;
use std::time::Duration;

const USER: &str = "victim@contoso.com";

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test]
async fn hostile_peers_end_in_named_reasons_and_the_service_stays_up() {
    let ep = Arc::new(TokenEndpoint::start().await.unwrap());
    let apps = [
        ("good", None),
        ("hang", Some(Scripted::Hang)),
        ("html", Some(Scripted::Html(502))),
        ("empty", Some(Scripted::Empty)),
        ("huge", Some(Scripted::Huge(64 * 1024 * 1024))),
    ];
    for (name, script) in &apps {
        ep.add_client(ClientSpec {
            id: format!("{name}-app"),
            secret: Some(format!("{name}-secret")),
            grants: vec![EmuGrant::ClientCredentials],
            mailboxes: vec![USER.into()],
            ..Default::default()
        });
        if let Some(s) = script {
            ep.script_always(Target::Client(format!("{name}-app")), s.clone());
        }
    }
    let servers = [
        ("silent", ServerBehaviour::Silent, "timeout"),
        (
            "endless-line",
            ServerBehaviour::EndlessLine,
            "protocol_error",
        ),
        ("trickle", ServerBehaviour::Trickle, "timeout"),
        ("flood", ServerBehaviour::Flood, "protocol_error"),
        ("garbage", ServerBehaviour::Garbage, "protocol_error"),
        (
            "reset-after-greeting",
            ServerBehaviour::ResetAfterGreeting,
            "protocol_error",
        ),
        (
            "reset-at-auth",
            ServerBehaviour::ResetAtAuth,
            "protocol_error",
        ),
        ("normal", ServerBehaviour::Normal, "ok"),
    ];
    let mut emulators = Vec::new();
    for (_, behaviour, _) in &servers {
        let mut options = EmulatorOptions::new(ep.clone());
        options.server = *behaviour;
        emulators.push(Emulator::start(options).await.unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each emulator has its own CA: trust them all.
    let cas: Vec<String> = emulators.iter().map(|e| e.ca_pem().to_string()).collect();
    std::fs::write(d.join("ca.pem"), cas.join("\n")).unwrap();
    let mut config = format!(
        "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\n\
         defaults:\n  interval: 10m\n  timeout: 3s\n\
         scheduler:\n  startup_spread: 1s\n  shutdown_grace: 2s\n\
         credentials:\n",
        d = d.display()
    );
    for (name, _) in &apps {
        std::fs::write(d.join(format!("{name}.secret")), format!("{name}-secret")).unwrap();
        config.push_str(&format!(
            "  {name}:\n    provider: microsoft\n    tenant: contoso\n    authority: {}\n    client_id: {name}-app\n    grant: client_credentials\n    client_secret_file: {}/{name}.secret\n",
            ep.authority(),
            d.display()
        ));
    }
    config.push_str("mailboxes:\n");
    let mut expected = Vec::new();
    // Each hostile server, probed with a good token on its STARTTLS port.
    for ((name, _, reason), emu) in servers.iter().zip(&emulators) {
        let port = emu.addr(Proto::Imap, TlsKind::Starttls).port();
        config.push_str(&format!(
            "  server-{name}:\n    address: {USER}\n    credential: good\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: {port}, tls: starttls }}\n"
        ));
        expected.push((format!("server-{name}"), *reason));
    }
    let normal = emulators
        .last()
        .unwrap()
        .addr(Proto::Imap, TlsKind::Starttls)
        .port();
    for (name, reason) in [
        ("hang", "token_network_error"),
        ("html", "token_server_error"),
        ("empty", "token_error"),
        ("huge", "token_error"),
    ] {
        config.push_str(&format!(
            "  token-{name}:\n    address: {USER}\n    credential: {name}\n    protocols: [imap]\n    imap: {{ host: 127.0.0.1, port: {normal}, tls: starttls }}\n"
        ));
        expected.push((format!("token-{name}"), reason));
    }
    let path = d.join("config.yaml");
    std::fs::write(&path, config).unwrap();

    let (mut child, base, _logs) = crate::demo::spawn_run(&path).await;
    let pid = child.id().unwrap();

    // While probes hang on silent servers and a hanging token endpoint, /metrics answers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, _) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200, "/metrics while probes hang");

    // The token request's own deadline (30 s) is the longest wait here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let m = parse_metrics(&get(&format!("{base}/metrics")).await.1);
        let got: Vec<(String, String)> = find(&m, "mail_oauth_probe_result", &[])
            .iter()
            .map(|s| (s.labels["mailbox"].clone(), s.labels["reason"].clone()))
            .collect();
        if got.len() == expected.len() || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for (mailbox, reason) in &expected {
        let found = got.iter().find(|(m, _)| m == mailbox);
        assert_eq!(
            found.map(|(_, r)| r.as_str()),
            Some(*reason),
            "{mailbox}: all results {got:?}"
        );
    }

    // 100 MB flooded and 64 MiB of JSON offered: the process kept a small part of it.
    let peak_mib = peak_rss_kib(pid) / 1024;
    let sent_mib = (FLOOD_BYTES / (1024 * 1024)) as u64;
    eprintln!("peak RSS of run: {peak_mib} MiB");
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB after peers sent {sent_mib} + 64 MiB"
    );
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    crate::demo::signal_pid(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
