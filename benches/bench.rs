//! Benchmarks, printed as a table (run by `benches/run`): CPU per TLS XOAUTH2 login (our
//! client alone, and the whole service process) and logins per second, blackbox_exporter
//! probing the same server, rendering `/metrics` two ways, the service at steady state at
//! 10 / 1,000 / 10,000 / 30,000 mailboxes × 3 protocols (memory, CPU per probe, samples
//! per row, scrape latency and body as Prometheus and as curl ask), `/healthz` and
//! `/metrics` latency while the listener is attacked (pipelining non-readers, slowloris),
//! and the accuracy of the measured auth phase against a server that delays its reply by a known amount.
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

/// This thread's time on a CPU, nanosecond resolution (the scheduler's own account):
/// what a computation costs, whatever else the machine is doing.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
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
                // An error's reason is never `ok` (tests/integration/proptests.rs).
                ok += usize::from(r.outcome.is_ok());
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
fn blackbox(
    emu: &Emulator,
    dir: &Path,
    ours_ms: Option<f64>,
    whole_ms: Option<f64>,
    table: &mut Table,
) {
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
            "our client's CPU per IMAP login ÷ blackbox's per probe",
            format!("{:.2}×", ours / per),
            "≤ 0.5×",
        );
    }
    if let Some(whole) = whole_ms {
        table.row(
            "our whole process's CPU per IMAP login (log level info) ÷ blackbox's whole process per probe",
            format!("{:.2}×", whole / per),
            "",
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The service's config: `n` mailboxes, each on `protocols`, one `token_file` credential.
fn service_config(
    n: usize,
    protocols: &[Protocol],
    interval: Duration,
    emu: &Emulator,
    d: &Path,
) -> PathBuf {
    std::fs::create_dir_all(d).unwrap();
    emu.write_ca_pem(&d.join("ca.pem")).unwrap();
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let (imap, _) = endpoint(emu, Protocol::Imap);
    let (pop3, _) = endpoint(emu, Protocol::Pop3);
    let (smtp, _) = endpoint(emu, Protocol::Smtp);
    let secs = interval.as_secs();
    let mut config = format!(
        "state_dir: {d}/state\ntls:\n  ca_file: {d}/ca.pem\ndefaults:\n  interval: {secs}s\n  timeout: {t}s\n\
         scheduler:\n  startup_spread: {spread}s\n  max_concurrent_probes: 64\n\
         credentials:\n  file:\n    grant: token_file\n    token_file: {d}/token\nmailboxes:\n",
        d = d.display(),
        // Within the interval with the scheduler's default jitter (1 s).
        t = (secs - 1).min(10),
        // First runs spread over the whole interval: from the first minute on, probes
        // arrive at the steady rate.
        spread = secs,
    );
    let names: Vec<&str> = protocols.iter().map(|p| p.as_str()).collect();
    for i in 0..n {
        let _ = write!(
            config,
            "  mb{i}:\n    address: {USER}\n    credential: file\n    protocols: [{}]\n",
            names.join(", ")
        );
        for p in protocols {
            let (port, tls) = match p {
                Protocol::Imap => (imap.port(), "implicit"),
                Protocol::Pop3 => (pop3.port(), "implicit"),
                Protocol::Smtp => (smtp.port(), "starttls"),
            };
            let _ = writeln!(
                config,
                "    {p}: {{ host: 127.0.0.1, port: {port}, tls: {tls} }}"
            );
        }
    }
    let path = d.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Waits for `/readyz` 200; panics when the child exits first (a config the service
/// refuses, printed on its stderr) or after `within`, rather than waiting forever.
fn wait_ready(child: &mut Child, s: &Scraper, within: Duration) {
    let started = Instant::now();
    while s.status("/readyz") != Some(200) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the service exited before it was ready ({status}): run it by hand to see why");
        }
        assert!(
            started.elapsed() < within,
            "the service was not ready within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `run` as a child on a free port; stderr (the logs, at `log_level`) to /dev/null.
fn spawn_service(bin: &Path, config: &Path, log_level: &str) -> (Child, u16) {
    spawn_service_with(bin, config, log_level, &[])
}

fn spawn_service_with(
    bin: &Path,
    config: &Path,
    log_level: &str,
    env: &[(&str, &str)],
) -> (Child, u16) {
    let port = free_port();
    // BENCH_WRAP runs the service under a profiler, e.g.
    // `BENCH_WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"`.
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = command
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(config)
        .env("RUST_LOG", log_level)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port)
}

/// How a scrape asks: as Prometheus does (OpenMetrics, gzip), or as curl does.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    Prometheus,
    Plain,
}

const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

struct Scraper {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Scraper {
    fn new(port: u16) -> Scraper {
        Scraper {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            // No pooled connections: each scrape is timed alone, connect included.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn status(&self, path: &str) -> Option<u16> {
        self.rt.block_on(async {
            let r = self
                .client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .ok()?;
            Some(r.status().as_u16())
        })
    }

    fn post(&self, path: &str) -> Option<u16> {
        self.rt.block_on(async {
            let r = self
                .client
                .post(format!("{}{path}", self.base))
                .send()
                .await
                .ok()?;
            Some(r.status().as_u16())
        })
    }

    /// One scrape: time to the last byte, and the body as sent.
    fn scrape(&self, ask: Ask) -> (Duration, Vec<u8>) {
        self.rt.block_on(async {
            let started = Instant::now();
            let mut req = self.client.get(format!("{}/metrics", self.base));
            if ask == Ask::Prometheus {
                req = req
                    .header("accept", PROMETHEUS_ACCEPT)
                    .header("accept-encoding", "gzip");
            }
            let body = req.send().await.unwrap().bytes().await.unwrap();
            (started.elapsed(), body.to_vec())
        })
    }
}

fn gunzip(body: &[u8]) -> String {
    use std::io::Read;
    let mut s = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut s)
        .unwrap();
    s
}

fn probes_done(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("mail_oauth_probes_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The service with `n` mailboxes × 3 protocols at steady state: every row probed and
/// `/readyz` 200, then 30 s more; then CPU per probe over one minute, then scrapes as
/// Prometheus and as curl ask, RSS now and at its peak.
fn service_at(n: usize, emu: &Emulator, bin: &Path, dir: &Path, table: &mut Table) {
    let rows = n * 3;
    // About 100 probes a second, whatever the size (at most 300 s, so that the largest
    // fleet is ready within 5 minutes): the interval grows with the fleet, as it would in
    // an installation.
    let interval = std::env::var("BENCH_INTERVAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or_else(
            || Duration::from_secs((rows as u64 / 100).clamp(30, 300)),
            Duration::from_secs,
        );
    let config = service_config(
        n,
        &Protocol::ALL,
        interval,
        emu,
        &dir.join(format!("service-{n}")),
    );
    let started = Instant::now();
    let (mut child, port) = spawn_service(bin, &config, "warn");
    let pid = child.id();
    let s = Scraper::new(port);
    wait_ready(&mut child, &s, Duration::from_secs(1800));
    let to_ready = started.elapsed();
    eprintln!("  ready after {to_ready:.0?}");
    std::thread::sleep(Duration::from_secs(30));

    let p0 = probes_done(&gunzip(&s.scrape(Ask::Prometheus).1));
    let cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
    std::thread::sleep(Duration::from_secs(60));
    let cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - cpu0;
    let probes = probes_done(&gunzip(&s.scrape(Ask::Prometheus).1)) - p0;

    let k = if rows > 10_000 { 11 } else { 21 };
    let mut results = Vec::new();
    for ask in [Ask::Prometheus, Ask::Plain] {
        let c0 = cpu_seconds(&format!("/proc/{pid}/stat"));
        let mut times = Vec::new();
        let mut last = Vec::new();
        for _ in 0..k {
            let (t, body) = s.scrape(ask);
            times.push(t);
            last = body;
        }
        let scrape_cpu = (cpu_seconds(&format!("/proc/{pid}/stat")) - c0) / k as f64;
        times.sort();
        results.push((ask, times, last, scrape_cpu));
    }
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    // A reload of the same file: what parsing the config costs on top of the steady state
    // (serde_yaml holds the whole document's events while it parses).
    let reloaded = s.post("/-/reload");
    std::thread::sleep(Duration::from_secs(5));
    let hwm_reload = status_kib(pid, "VmHWM:");
    let plain = String::from_utf8(results[1].2.clone()).unwrap();
    let samples = plain
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("mailbox=\""))
        .count();
    let (rss_target, scrape_target) = match n {
        10 => ("peak ≤ 10 MiB", ""),
        1000 => ("peak ≤ 24 MiB", "median ≤ 10 ms"),
        10_000 => ("peak ≤ 100 MiB", "median ≤ 100 ms"),
        _ => ("", ""),
    };
    let label = format!("{n} × 3 ({rows} rows, interval {}s)", interval.as_secs());
    table.row(
        format!("run, {label}: time to ready (every row probed)"),
        format!("{:.0} s", to_ready.as_secs_f64()),
        "",
    );
    table.row(
        format!("run, {label}: RSS at steady state (peak)"),
        format!("{} ({})", mib(rss), mib(hwm)),
        rss_target,
    );
    table.row(
        format!("run, {label}: RSS peak once a reload of the same config has been applied"),
        match reloaded {
            Some(200) => mib(hwm_reload),
            other => format!("reload failed: {other:?}"),
        },
        "",
    );
    table.row(
        format!("run, {label}: whole-process CPU per probe over 60 s ({probes:.0} probes)"),
        if probes > 0.0 {
            format!("{:.3} ms", cpu * 1000.0 / probes)
        } else {
            "-".into()
        },
        "",
    );
    table.row(
        format!("run, {label}: per-row samples on /metrics"),
        format!(
            "{:.2} per row ({samples} in all)",
            samples as f64 / rows as f64
        ),
        "≤ 15",
    );
    for (ask, times, body, scrape_cpu) in &results {
        let how = match ask {
            Ask::Prometheus => "as Prometheus asks (OpenMetrics, gzip)",
            Ask::Plain => "as curl asks (text, no gzip)",
        };
        table.row(
            format!("run, {label}: /metrics {how}: p50 / p99 of {k}, body, CPU per scrape"),
            format!(
                "{} / {}, {:.0} KiB, {:.1} ms",
                ms(percentile(times, 0.5)),
                ms(percentile(times, 0.99)),
                body.len() as f64 / 1024.0,
                scrape_cpu * 1000.0
            ),
            if *ask == Ask::Prometheus {
                scrape_target
            } else {
                ""
            },
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whole-process CPU per IMAP login: the service probing 50 mailboxes (IMAP only) every
/// 5 s (the interval's floor), 10 logins a second, for a minute, at the default log level, at `warn`, and on one runtime worker
/// thread instead of one per core: what the process spends beside the client's own TLS
/// and SASL work (scheduler and cross-thread wake-ups, token file, board, logs).
const WHOLE_MAILBOXES: usize = 50;
const WHOLE_INTERVAL: Duration = Duration::from_secs(5);

fn whole_process_cpu(emu: &Emulator, bin: &Path, dir: &Path, table: &mut Table) -> Option<f64> {
    let mut at_info = None;
    for (level, workers) in [("info", None), ("warn", None), ("info", Some("1"))] {
        let config = service_config(
            WHOLE_MAILBOXES,
            &[Protocol::Imap],
            WHOLE_INTERVAL,
            emu,
            &dir.join(format!("whole-{level}-{}", workers.unwrap_or("all"))),
        );
        let env: Vec<(&str, &str)> = workers
            .map(|w| ("TOKIO_WORKER_THREADS", w))
            .into_iter()
            .collect();
        let (mut child, port) = spawn_service_with(bin, &config, level, &env);
        let pid = child.id();
        let s = Scraper::new(port);
        wait_ready(&mut child, &s, Duration::from_secs(300));
        std::thread::sleep(Duration::from_secs(5));
        let p0 = probes_done(&gunzip(&s.scrape(Ask::Prometheus).1));
        let cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
        std::thread::sleep(Duration::from_secs(60));
        let cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - cpu0;
        let probes = probes_done(&gunzip(&s.scrape(Ask::Prometheus).1)) - p0;
        let per = cpu * 1000.0 / probes;
        let threads = match workers {
            Some(w) => format!(", {w} runtime worker thread"),
            None => String::new(),
        };
        table.row(
            format!(
                "whole process CPU per IMAP login, `run` with {WHOLE_MAILBOXES} mailboxes every {}s, log level {level}{threads} ({probes:.0} logins)",
                WHOLE_INTERVAL.as_secs()
            ),
            format!("{per:.3} ms"),
            "",
        );
        table.row(
            format!(
                "run, {WHOLE_MAILBOXES} mailboxes × IMAP, log level {level}{threads}: RSS (peak)"
            ),
            format!(
                "{} ({})",
                mib(status_kib(pid, "VmRSS:")),
                mib(status_kib(pid, "VmHWM:"))
            ),
            "",
        );
        if level == "info" && workers.is_none() {
            at_info = Some(per);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    at_info
}

/// Rendering the per-row families from the board, two ways, at `rows` rows: a custom
/// `prometheus::core::Collector` over the board's rows, encoded by the crate's
/// `TextEncoder`, against writing the exposition directly (what the service does).
fn render_compare(rows: usize, emu: &Emulator, tls: &TlsClient, table: &mut Table) {
    use mail_oauth_exporter::metrics::{Format, Metrics};
    use mail_oauth_exporter::status::{Board, ProbeResult, TargetInfo};
    // Real phases, from a real login.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr, mode) = endpoint(emu, Protocol::Imap);
    let report = rt.block_on(probe::run(
        &spec(Protocol::Imap, addr, mode),
        tls,
        &Secret::new(TOKEN),
    ));
    let board = Arc::new(Board::new());
    let n = rows / 3;
    board.set_targets(
        (0..n)
            .flat_map(|i| {
                Protocol::ALL.map(|p| TargetInfo {
                    mailbox: format!("mb{i}"),
                    protocol: p,
                    credential: "file".into(),
                    address: USER.into(),
                    target: format!("{p}://127.0.0.1:993 (implicit TLS)"),
                    interval: Duration::from_secs(600),
                })
            })
            .collect(),
    );
    for i in 0..n {
        for p in Protocol::ALL {
            board.record(
                &mail_oauth_exporter::status::Key::new(&format!("mb{i}"), p),
                ProbeResult {
                    reason: Reason::Ok,
                    detail: String::new(),
                    finished_at: std::time::SystemTime::now(),
                    duration: report.duration,
                    phases: report.phases,
                    tls_not_after: report.tls_not_after,
                    tls_version: report.tls_version.clone(),
                    transcript: Some(report.transcript.render()),
                },
            );
        }
    }
    let metrics = Metrics::new();
    // CPU time of this thread, median of 7: wall time on a shared machine says more
    // about the neighbours than about the code.
    let time = |f: &mut dyn FnMut() -> usize| {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..7 {
            let t = thread_cpu();
            size = f();
            times.push(thread_cpu() - t);
        }
        times.sort();
        (times[3], size)
    };
    let (copy, _) = time(&mut || board.rows().len());
    let (direct, size) = time(&mut || {
        metrics
            .render(&board.rows(), Format::Prometheus, false)
            .len()
    });
    let (direct_gz, gz_size) = time(&mut || {
        metrics
            .render(&board.rows(), Format::OpenMetrics, true)
            .len()
    });
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(collector::BoardCollector::new(board.clone())))
        .unwrap();
    let (collected, csize) = time(&mut || {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .unwrap();
        buf.len()
    });
    table.row(
        format!("render {rows} rows: board lock held to copy the rows (CPU, median of 7)"),
        ms(copy),
        "",
    );
    table.row(
        format!("render {rows} rows: custom Collector + TextEncoder (CPU, median of 7)"),
        format!("{}, {:.0} KiB", ms(collected), csize as f64 / 1024.0),
        "",
    );
    table.row(
        format!("render {rows} rows: exposition written directly, text (CPU, median of 7)"),
        format!("{}, {:.0} KiB", ms(direct), size as f64 / 1024.0),
        "",
    );
    table.row(
        format!("render {rows} rows: exposition written directly, OpenMetrics + gzip level 1 (CPU, median of 7)"),
        format!("{}, {:.0} KiB", ms(direct_gz), gz_size as f64 / 1024.0),
        "",
    );
}

/// The alternative the service does not use: the per-row families as protobuf
/// `MetricFamily` values built from the board at each collect.
mod collector {
    use mail_oauth_exporter::Reason;
    use mail_oauth_exporter::status::{Board, Row};
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
    use std::sync::Arc;

    const FAMILIES: [(&str, &str, MetricType); 9] = [
        ("mail_oauth_probe_success", "success", MetricType::GAUGE),
        ("mail_oauth_probe_result", "result", MetricType::GAUGE),
        ("mail_oauth_probes_total", "probes", MetricType::COUNTER),
        (
            "mail_oauth_probe_failures_total",
            "failures",
            MetricType::COUNTER,
        ),
        (
            "mail_oauth_probe_duration_seconds",
            "duration",
            MetricType::GAUGE,
        ),
        (
            "mail_oauth_probe_phase_seconds",
            "phases",
            MetricType::GAUGE,
        ),
        (
            "mail_oauth_probe_last_run_timestamp_seconds",
            "last run",
            MetricType::GAUGE,
        ),
        (
            "mail_oauth_probe_last_success_timestamp_seconds",
            "last success",
            MetricType::GAUGE,
        ),
        (
            "mail_oauth_tls_certificate_expiry_timestamp_seconds",
            "tls",
            MetricType::GAUGE,
        ),
    ];

    pub struct BoardCollector {
        board: Arc<Board>,
        descs: Vec<Desc>,
    }

    impl BoardCollector {
        pub fn new(board: Arc<Board>) -> BoardCollector {
            let descs = FAMILIES
                .iter()
                .map(|(name, help, _)| {
                    Desc::new(
                        name.to_string(),
                        help.to_string(),
                        vec![],
                        Default::default(),
                    )
                    .unwrap()
                })
                .collect();
            BoardCollector { board, descs }
        }
    }

    fn pair(k: &str, v: &str) -> LabelPair {
        let mut l = LabelPair::default();
        l.set_name(k.into());
        l.set_value(v.into());
        l
    }

    fn metric(row: &Row, extra: Option<(&str, &str)>, value: f64, counter: bool) -> Metric {
        let t = &row.info.target;
        let mut labels = vec![
            pair("mailbox", &t.mailbox),
            pair("protocol", t.protocol.as_str()),
        ];
        if let Some((k, v)) = extra {
            labels.push(pair(k, v));
        }
        let mut m = Metric::default();
        m.set_label(labels);
        if counter {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        m
    }

    fn unix(t: std::time::SystemTime) -> f64 {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    impl Collector for BoardCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let rows = self.board.rows();
            let mut fams: Vec<Vec<Metric>> = vec![Vec::new(); 9];
            for r in &rows {
                fams[2].push(metric(r, None, r.probes as f64, true));
                for (reason, n) in r.failures_shown() {
                    fams[3].push(metric(
                        r,
                        Some(("reason", reason.as_str())),
                        *n as f64,
                        true,
                    ));
                }
                if let Some(d) = r.auth_duration {
                    fams[4].push(metric(r, None, d.as_secs_f64(), false));
                }
                if let Some(t) = r.last_success {
                    fams[7].push(metric(r, None, unix(t), false));
                }
                if let Some(t) = r.tls_not_after {
                    fams[8].push(metric(r, None, t as f64, false));
                }
                let (Some(reason), Some(last_run)) = (r.last_reason(), r.last_run()) else {
                    continue;
                };
                fams[0].push(metric(
                    r,
                    None,
                    f64::from(u8::from(reason == Reason::Ok)),
                    false,
                ));
                fams[1].push(metric(r, Some(("reason", reason.as_str())), 1.0, false));
                for (phase, us) in r.phase_micros() {
                    fams[5].push(metric(
                        r,
                        Some(("phase", phase.as_str())),
                        f64::from(us) / 1e6,
                        false,
                    ));
                }
                fams[6].push(metric(r, None, unix(last_run), false));
            }
            FAMILIES
                .iter()
                .zip(fams)
                .filter(|(_, m)| !m.is_empty())
                .map(|((name, help, kind), metrics)| {
                    let mut f = MetricFamily::default();
                    f.set_name(name.to_string());
                    f.set_help(help.to_string());
                    f.set_field_type(*kind);
                    f.set_metric(metrics);
                    f
                })
                .collect()
        }
    }
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
        .unwrap_or_else(|| vec![10, 1000, 10_000, 30_000]);
    // BENCH_BIN measures another build of the binary (another profile or allocator, say;
    // BENCH_WRAP, below, runs it under a profiler); BENCH_INTERVAL (seconds) replaces the
    // service part's interval, for a quicker steady state while looking into memory.
    let bin = std::env::var_os("BENCH_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_mail-oauth-exporter")),
        PathBuf::from,
    );
    // BENCH_PARTS=render,service runs only those parts (login, saturation, whole, listener,
    // blackbox, render, service, accuracy).
    let parts = std::env::var("BENCH_PARTS").ok();
    let part = |name: &str| {
        parts
            .as_deref()
            .is_none_or(|p| p.split(',').any(|x| x == name))
    };
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

    let mut ours_imap = None;
    if part("login") {
        eprintln!("client CPU per login");
        cpu_per_login(&emu, &tls, &mut table);
        ours_imap = table
            .rows
            .first()
            .and_then(|r| r.1.strip_suffix(" ms")?.parse::<f64>().ok());
    }
    if part("saturation") {
        eprintln!("saturation");
        saturation(&emu, &tls, &mut table);
    }
    let mut whole = None;
    if part("whole") {
        eprintln!("whole process CPU per login");
        whole = whole_process_cpu(&emu, &bin, dir.path(), &mut table);
    }
    if part("blackbox") {
        eprintln!("blackbox_exporter");
        blackbox(&emu, dir.path(), ours_imap, whole, &mut table);
    }
    if part("render") {
        eprintln!("rendering /metrics two ways");
        for rows in [30_000, 90_000] {
            render_compare(rows, &emu, &tls, &mut table);
        }
    }
    if part("service") {
        for n in sizes {
            eprintln!("service at {n} mailboxes");
            service_at(n, &emu, &bin, dir.path(), &mut table);
        }
    }
    if part("listener") {
        eprintln!("listener under attack");
        listener_attacks(&emu, &bin, dir.path(), &mut table);
    }
    if part("accuracy") {
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
