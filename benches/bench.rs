//! Benchmarks, printed as a table (run by `benches/run`): CPU per TLS XOAUTH2 login and
//! logins per second, blackbox_exporter probing the same server, the service's memory,
//! CPU and scrape at 10 / 1,000 / 10,000 mailboxes × 3 protocols, `/healthz` and
//! `/metrics` latency while the listener is attacked (pipelining non-readers, slowloris),
//! and the accuracy of the measured auth phase against a server that delays its reply by
//! a known amount.
//!
//! Everything runs on loopback against the emulated provider. CPU times come from
//! `/proc` (per thread for our client, per process for the others), so they do not count
//! the emulated servers' work.

use mail_oauth_exporter::emulator::{
    Behaviour, Emulator, EmulatorOptions, Proto, StaticTokens, TlsKind,
};
use mail_oauth_exporter::probe::{self, Limits, ProbeSpec, Target, TlsClient};
use mail_oauth_exporter::{Mechanism, Protocol, Reason, Secret, TlsMode};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-access-token-0123456789abcdef";
const USER: &str = "bench@contoso.com";

/// Clock ticks per second of /proc's utime and stime (USER_HZ: 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) from a /proc `stat` file.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the `(comm)`, which may hold spaces: utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / TICKS
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn spec(protocol: Protocol, addr: std::net::SocketAddr, tls: TlsMode) -> ProbeSpec {
    ProbeSpec {
        target: Target {
            protocol,
            host: "127.0.0.1".into(),
            port: addr.port(),
            tls,
            source_address: None,
        },
        user: USER.into(),
        mechanism: Mechanism::Xoauth2,
        timeout: Duration::from_secs(10),
        limits: Limits::default(),
    }
}

fn endpoint(emu: &Emulator, p: Protocol) -> (std::net::SocketAddr, TlsMode) {
    match p {
        Protocol::Imap => (emu.addr(Proto::Imap, TlsKind::Implicit), TlsMode::Implicit),
        Protocol::Pop3 => (emu.addr(Proto::Pop3, TlsKind::Implicit), TlsMode::Implicit),
        Protocol::Smtp => (emu.addr(Proto::Smtp, TlsKind::Starttls), TlsMode::Starttls),
    }
}

struct Table {
    rows: Vec<(String, String, String)>,
}

impl Table {
    fn row(&mut self, what: impl Into<String>, value: impl Into<String>, target: &str) {
        let (w, v) = (what.into(), value.into());
        eprintln!("  {w}: {v}");
        self.rows.push((w, v, target.to_string()));
    }
}

/// Our client's CPU per login: sequential logins on this thread only (a current-thread
/// runtime), the emulator on its own threads.
fn cpu_per_login(emu: &Emulator, tls: &TlsClient, table: &mut Table) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = Secret::new(TOKEN);
    for p in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
        let (addr, mode) = endpoint(emu, p);
        let s = spec(p, addr, mode);
        let n = 1000;
        rt.block_on(async {
            // Warm up: first connections pay for lazy initialisation.
            for _ in 0..20 {
                probe::run(&s, tls, &token).await;
            }
        });
        let before = cpu_seconds("/proc/thread-self/stat");
        let ok = rt.block_on(async {
            let mut ok = 0;
            for _ in 0..n {
                let r = probe::run(&s, tls, &token).await;
                ok += usize::from(
                    mail_oauth_exporter::classify::probe_outcome(&r.outcome).reason == Reason::Ok,
                );
            }
            ok
        });
        let cpu = cpu_seconds("/proc/thread-self/stat") - before;
        assert_eq!(ok, n, "every bench login must succeed");
        table.row(
            format!("CPU per TLS XOAUTH2 login, client side, {p} ({n} logins)"),
            format!("{:.3} ms", cpu * 1000.0 / n as f64),
            "≤ 0.35 ms",
        );
    }
}

/// Logins per second with 32 in flight, client and emulator sharing the machine.
fn saturation(emu: &Emulator, tls: &TlsClient, table: &mut Table) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr, mode) = endpoint(emu, Protocol::Imap);
    let s = Arc::new(spec(Protocol::Imap, addr, mode));
    let window = Duration::from_secs(5);
    let done = rt.block_on(async {
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (s, tls) = (s.clone(), tls.clone());
            set.spawn(async move {
                let token = Secret::new(TOKEN);
                let mut n = 0u64;
                while started.elapsed() < window {
                    probe::run(&s, &tls, &token).await;
                    n += 1;
                }
                n
            });
        }
        set.join_all().await.into_iter().sum::<u64>()
    });
    table.row(
        "IMAP TLS logins per second at saturation (32 in flight; client and server share 2 cores)",
        format!("{:.0}/s", done as f64 / window.as_secs_f64()),
        "",
    );
}

/// blackbox_exporter's tcp prober (TLS, greeting, CAPABILITY) on the same IMAP server.
fn blackbox(emu: &Emulator, dir: &Path, ours_ms: Option<f64>, table: &mut Table) {
    let bin = ["prometheus-blackbox-exporter", "blackbox_exporter"]
        .into_iter()
        .find(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(bin) = bin else {
        table.row(
            "blackbox_exporter",
            "not installed (apt-get install prometheus-blackbox-exporter)",
            "",
        );
        return;
    };
    let ca = dir.join("ca.pem");
    emu.write_ca_pem(&ca).unwrap();
    let config = dir.join("blackbox.yml");
    std::fs::write(
        &config,
        format!(
            "modules:\n  imap_tls:\n    prober: tcp\n    timeout: 5s\n    tcp:\n      tls: true\n      tls_config:\n        ca_file: {}\n        server_name: localhost\n      query_response:\n        - expect: \"^\\\\* OK\"\n        - send: \"a1 CAPABILITY\"\n        - expect: \"^a1 OK\"\n",
            ca.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child: Child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let target = emu.addr(Proto::Imap, TlsKind::Implicit);
    let url = format!(
        "http://127.0.0.1:{port}/probe?module=imap_tls&target=127.0.0.1:{}",
        target.port()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let ok = rt.block_on(async {
        for _ in 0..100 {
            if client.get(&url).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let body = client.get(&url).send().await.unwrap().text().await.unwrap();
        body.contains("probe_success 1")
    });
    if !ok {
        table.row(
            "blackbox_exporter",
            "its probe did not succeed against the emulator",
            "",
        );
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let n = 1000;
    let before = cpu_seconds(&format!("/proc/{pid}/stat"));
    rt.block_on(async {
        for _ in 0..n {
            let _ = client.get(&url).send().await.unwrap().text().await;
        }
    });
    let cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - before;
    let per = cpu * 1000.0 / n as f64;
    table.row(
        format!("blackbox_exporter CPU per probe (tcp, TLS + greeting + CAPABILITY; {n} probes)"),
        format!("{per:.3} ms"),
        "",
    );
    table.row(
        "blackbox_exporter RSS after the probes",
        mib(status_kib(pid, "VmRSS:")),
        "",
    );
    if let Some(ours) = ours_ms {
        table.row(
            "our CPU per IMAP login ÷ blackbox's per probe",
            format!("{:.2}×", ours / per),
            "≤ 0.5×",
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The service with `n` mailboxes × 3 protocols: memory, CPU per probe, one scrape.
fn service_at(n: usize, emu: &Emulator, bin: &Path, dir: &Path, table: &mut Table) {
    let d = dir.join(format!("service-{n}"));
    std::fs::create_dir_all(&d).unwrap();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let (imap, _) = endpoint(emu, Protocol::Imap);
    let (pop3, _) = endpoint(emu, Protocol::Pop3);
    let (smtp, _) = endpoint(emu, Protocol::Smtp);
    // First runs spread over 2 minutes: the window below sees a steady share of them.
    let mut config = format!(
        "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\ndefaults:\n  interval: 10m\n  timeout: 10s\n\
         scheduler:\n  startup_spread: 2m\n  max_concurrent_probes: 64\n\
         credentials:\n  file:\n    grant: token_file\n    token_file: {d}/token\nmailboxes:\n",
        d = d.display()
    );
    for i in 0..n {
        let _ = write!(
            config,
            "  mb{i}:\n    address: {USER}\n    credential: file\n    protocols: [imap, pop3, smtp]\n\
             \x20   imap: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n\
             \x20   pop3: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n\
             \x20   smtp: {{ host: 127.0.0.1, port: {}, tls: starttls }}\n",
            imap.port(),
            pop3.port(),
            smtp.port()
        );
    }
    let path = d.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(bin)
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // No pooled connections: the server closes idle ones, and a scrape is timed alone.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let scrape = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let started = Instant::now();
            let body = client.get(&url).send().await.ok()?.bytes().await.ok()?;
            Some((started.elapsed(), body))
        })
    };
    let mut up = false;
    for _ in 0..200 {
        if scrape(&rt).is_some() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "service with {n} mailboxes did not start");
    let cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
    let probes_done = |body: &[u8]| -> f64 {
        String::from_utf8_lossy(body)
            .lines()
            .filter(|l| l.starts_with("mail_oauth_probes_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let (_, b0) = scrape(&rt).unwrap();
    let p0 = probes_done(&b0);
    std::thread::sleep(Duration::from_secs(30));
    let cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - cpu0;
    // Three scrapes; the median is reported.
    let mut scrapes: Vec<(Duration, usize, String)> = (0..3)
        .map(|_| {
            let (t, body) = scrape(&rt).unwrap();
            (t, body.len(), String::from_utf8_lossy(&body).into_owned())
        })
        .collect();
    scrapes.sort_by_key(|s| s.0);
    let (t, size, body) = &scrapes[1];
    let probes = probes_done(body.as_bytes()) - p0;
    let series = body
        .lines()
        .filter(|l| l.starts_with("mail_oauth_"))
        .count();
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let (rss_target, scrape_target) = match n {
        10 => ("≤ 12 MiB", ""),
        10_000 => ("≤ 100 MiB", "≤ 50 ms at 30,000 series"),
        _ => ("", ""),
    };
    table.row(
        format!("run, {n} × 3 probes: RSS (peak)"),
        format!("{} ({})", mib(rss), mib(hwm)),
        rss_target,
    );
    table.row(
        format!("run, {n} × 3 probes: CPU per probe over 30 s ({probes:.0} probes)"),
        if probes > 0.0 {
            format!("{:.3} ms", cpu * 1000.0 / probes)
        } else {
            "-".into()
        },
        "",
    );
    table.row(
        format!("run, {n} × 3 probes: one /metrics scrape ({series} mail_oauth_ samples)"),
        format!(
            "{:.1} ms, {:.0} KiB",
            t.as_secs_f64() * 1000.0,
            *size as f64 / 1024.0
        ),
        scrape_target,
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Pipelined `GET /api/v1/status`, written over and over, never a byte read.
async fn pipeline_never_read(mut s: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let burst = "GET /api/v1/status HTTP/1.1\r\nHost: exporter\r\n\r\n".repeat(20);
    while s.write_all(burst.as_bytes()).await.is_ok() {}
}

/// Slowloris: request headers at one byte per second, never finished.
async fn slowloris(mut s: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let headers = b"GET /api/v1/status HTTP/1.1\r\nHost: exporter\r\nX-Padding: ";
    for b in headers.iter().chain(std::iter::repeat(&b'a')) {
        if s.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `run` (300 mailboxes × 3, so `/api/v1/status` is ~0.5 MiB) under each attack of issue
/// 16: 260 connections pipelining `GET /api/v1/status` that never read, and 1,000
/// slowloris connections (1 byte/s); every client reconnects at once when closed. While
/// the attack holds every connection slot, `/healthz` and `/metrics` are fetched on fresh
/// connections for 15 s; a request that fails counts as 10 s.
fn listener_attacks(emu: &Emulator, bin: &Path, dir: &Path, table: &mut Table) {
    let d = dir.join("listener");
    std::fs::create_dir_all(&d).unwrap();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let (imap, _) = endpoint(emu, Protocol::Imap);
    let (pop3, _) = endpoint(emu, Protocol::Pop3);
    let (smtp, _) = endpoint(emu, Protocol::Smtp);
    let mut config = format!(
        "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\ndefaults:\n  interval: 1m\n  timeout: 10s\n\
         scheduler:\n  startup_spread: 10s\n\
         credentials:\n  file:\n    grant: token_file\n    token_file: {d}/token\nmailboxes:\n",
        d = d.display()
    );
    for i in 0..300 {
        let _ = write!(
            config,
            "  mb{i}:\n    address: {USER}\n    credential: file\n    protocols: [imap, pop3, smtp]\n\
             \x20   imap: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n\
             \x20   pop3: {{ host: 127.0.0.1, port: {}, tls: implicit }}\n\
             \x20   smtp: {{ host: 127.0.0.1, port: {}, tls: starttls }}\n",
            imap.port(),
            pop3.port(),
            smtp.port()
        );
    }
    let path = d.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    type Attacker = fn(tokio::net::TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
    let attacks: [(&str, usize, Attacker); 2] = [
        ("260 pipelining connections that never read", 260, |s| {
            Box::pin(pipeline_never_read(s))
        }),
        ("1,000 slowloris connections (1 byte/s)", 1000, |s| {
            Box::pin(slowloris(s))
        }),
    ];
    for (name, n, one) in attacks {
        let mut child = Command::new(bin)
            .args(["run", "--listen", &addr.to_string(), "--config"])
            .arg(&path)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let get = |path: &'static str| {
            let (client, url) = (client.clone(), format!("http://{addr}{path}"));
            async move {
                let started = Instant::now();
                let ok = match client.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    started.elapsed()
                } else {
                    Duration::from_secs(10)
                }
            }
        };
        let (health, metrics, failed, cpu, before) = rt.block_on(async {
            let up = async {
                while client
                    .get(format!("http://{addr}/readyz"))
                    .send()
                    .await
                    .map_or(true, |r| r.status() != 200)
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            assert!(
                tokio::time::timeout(Duration::from_secs(60), up)
                    .await
                    .is_ok(),
                "run is not ready"
            );
            let before = status_kib(pid, "VmRSS:");
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut attackers = tokio::task::JoinSet::new();
            for _ in 0..n {
                let mut stopped = stopped.clone();
                attackers.spawn(async move {
                    let attack = async {
                        loop {
                            match tokio::net::TcpStream::connect(addr).await {
                                Ok(s) => one(s).await,
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                    };
                    tokio::select! {
                        () = attack => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
            let full = Instant::now();
            while sockets(pid) < mail_oauth_exporter::http::MAX_CONNECTIONS
                && full.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (mut health, mut metrics, mut failed) = (Vec::new(), Vec::new(), 0);
            let cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
            let window = Instant::now();
            while window.elapsed() < Duration::from_secs(15) {
                for (path, into) in [("/healthz", &mut health), ("/metrics", &mut metrics)] {
                    let t = get(path).await;
                    failed += usize::from(t >= Duration::from_secs(10));
                    into.push(t);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let cpu =
                (cpu_seconds(&format!("/proc/{pid}/stat")) - cpu0) / window.elapsed().as_secs_f64();
            let _ = stop.send(true);
            while attackers.join_next().await.is_some() {}
            (health, metrics, failed, cpu, before)
        });
        let rss = status_kib(pid, "VmRSS:");
        let hwm = status_kib(pid, "VmHWM:");
        for (what, mut t) in [("/healthz", health), ("/metrics", metrics)] {
            t.sort();
            table.row(
                format!(
                    "listener under {name}: {what} p50 / p99 ({} requests)",
                    t.len()
                ),
                format!(
                    "{:.1} / {:.1} ms",
                    percentile(&t, 0.5).as_secs_f64() * 1000.0,
                    percentile(&t, 0.99).as_secs_f64() * 1000.0
                ),
                "≤ 1 s",
            );
        }
        table.row(
            format!(
                "listener under {name}: RSS before → during (peak), CPU of run, failed requests"
            ),
            format!(
                "{} → {} ({}), {:.0} % of a core, {failed}",
                mib(before),
                mib(rss),
                mib(hwm),
                cpu * 100.0
            ),
            "bounded",
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The auth phase against a server that delays its replies after auth by `delay`.
fn accuracy(tls: &TlsClient, table: &mut Table) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let delay = Duration::from_millis(200);
    let errors = rt.block_on(async {
        let mut options = EmulatorOptions::new(Arc::new(StaticTokens::new([TOKEN])));
        options.slow_delay = delay;
        options.users.insert(USER.to_string(), Behaviour::Slow);
        let emu = Emulator::start(options).await.unwrap();
        let tls = TlsClient::with_ca_pem(emu.ca_pem().as_bytes()).unwrap_or_else(|_| tls.clone());
        let (addr, mode) = endpoint(&emu, Protocol::Imap);
        let s = spec(Protocol::Imap, addr, mode);
        let token = Secret::new(TOKEN);
        // The same login to a user without delay: what the auth step costs on its own
        // (server work, loopback). The error is what remains beyond delay + that cost.
        let plain = ProbeSpec {
            user: "plain@contoso.com".into(),
            ..s.clone()
        };
        let mut base = Vec::new();
        for _ in 0..20 {
            let r = probe::run(&plain, &tls, &token).await;
            base.push(r.phases.get(probe::Phase::Auth).unwrap().as_secs_f64());
        }
        base.sort_by(f64::total_cmp);
        let baseline = base[base.len() / 2];
        let mut errors = Vec::new();
        for _ in 0..20 {
            let r = probe::run(&s, &tls, &token).await;
            let auth = r.phases.get(probe::Phase::Auth).unwrap();
            errors.push(auth.as_secs_f64() - delay.as_secs_f64() - baseline);
        }
        emu.shutdown();
        errors
    });
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let max = errors.iter().cloned().fold(f64::MIN, f64::max);
    let min = errors.iter().cloned().fold(f64::MAX, f64::min);
    table.row(
        format!(
            "auth phase − (known server delay of {} ms + the undelayed auth step), 20 probes: mean / min / max",
            delay.as_millis()
        ),
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            mean * 1000.0,
            min * 1000.0,
            max * 1000.0
        ),
        "≤ 1 ms",
    );
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 1000, 10_000]);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("release/mail-oauth-exporter");
    // `BENCH_ONLY=listener benches/run`: only the listener under attack.
    let all = std::env::var("BENCH_ONLY").map_or(true, |v| v != "listener");
    assert!(
        bin.exists(),
        "build the release binary first (benches/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut table = Table { rows: Vec::new() };

    // The emulator on its own runtime threads, for the whole run.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let emu = server_rt.block_on(async {
        let mut options = EmulatorOptions::new(Arc::new(StaticTokens::new([TOKEN])));
        options.cert_names.push("localhost".into());
        options.log_capacity = 0;
        Emulator::start(options).await.unwrap()
    });
    let tls = TlsClient::with_ca_pem(emu.ca_pem().as_bytes()).unwrap();

    if all {
        eprintln!("client CPU per login");
        cpu_per_login(&emu, &tls, &mut table);
        let ours_imap = table
            .rows
            .first()
            .and_then(|r| r.1.strip_suffix(" ms")?.parse::<f64>().ok());
        eprintln!("saturation");
        saturation(&emu, &tls, &mut table);
        eprintln!("blackbox_exporter");
        blackbox(&emu, dir.path(), ours_imap, &mut table);
        for n in sizes {
            eprintln!("service at {n} mailboxes");
            service_at(n, &emu, &bin, dir.path(), &mut table);
        }
    }
    eprintln!("listener under attack");
    listener_attacks(&emu, &bin, dir.path(), &mut table);
    if all {
        eprintln!("phase accuracy");
        accuracy(&tls, &mut table);
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("Machine: {cpu}, {cores} cores; release build; loopback; emulated provider.\n");
    println!("| measurement | result | target |\n|---|---|---|");
    for (w, v, t) in &table.rows {
        println!("| {w} | {v} | {t} |");
    }
}
