//! Records what `--version` and `mail_oauth_build_info` show: the source revision, the
//! build date and the compiler, as Prometheus' own `--version` does.
use std::process::Command;

fn main() {
    // A container build has no .git: it passes the revision in.
    let given = std::env::var("MAIL_OAUTH_EXPORTER_REVISION").ok();
    let revision = given
        .filter(|s| !s.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        // Built outside a git checkout (a source tarball, a container build context).
        .unwrap_or_else(|| "unknown".to_string());
    // The compiler cargo builds this crate with (RUSTC), not whatever `rustc` is on PATH.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let rustc_version = output(&rustc, &["--version"]).unwrap_or_else(|| "unknown".to_string());
    // SOURCE_DATE_EPOCH (reproducible-builds.org) fixes the date for reproducible builds.
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=MAIL_OAUTH_EXPORTER_REVISION={revision}");
    println!(
        "cargo:rustc-env=MAIL_OAUTH_EXPORTER_BUILD_DATE={}",
        build_date(epoch)
    );
    println!("cargo:rustc-env=MAIL_OAUTH_EXPORTER_RUSTC_VERSION={rustc_version}");
    println!("cargo:rustc-env=MAIL_OAUTH_EXPORTER_TARGET={target}");
    // Run again when the checked-out commit changes. In a `git worktree`, `.git` is a file
    // and HEAD lives elsewhere: ask git where. Nothing else re-runs this script, so the
    // build date is that of the build that last saw a new commit (or this file change).
    println!("cargo:rerun-if-changed=build.rs");
    // A path that does not exist would re-run it on every build: only those present.
    let git_dir = output("git", &["rev-parse", "--git-dir"]);
    let common_dir = output("git", &["rev-parse", "--git-common-dir"]);
    let watched = [
        git_dir.map(|d| format!("{d}/HEAD")),
        common_dir.as_ref().map(|d| format!("{d}/refs/heads")),
        common_dir.map(|d| format!("{d}/packed-refs")),
    ];
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-env-changed=MAIL_OAUTH_EXPORTER_REVISION");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}

/// The first line `program args` prints, if it runs and succeeds.
fn output(program: &str, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|s| !s.is_empty())
}

/// `epoch` (seconds, UTC) as Prometheus prints its build date: `20060102-15:04:05`.
fn build_date(epoch: u64) -> String {
    let (days, secs) = (epoch / 86_400, epoch % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
