//! Records the source revision for `mail_oauth_build_info`.
use std::process::Command;

fn main() {
    // A container build has no .git: it passes the revision in.
    let given = std::env::var("MAIL_OAUTH_EXPORTER_REVISION").ok();
    let revision = given
        .filter(|s| !s.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        // Built outside a git checkout (a source tarball, a container build context).
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=MAIL_OAUTH_EXPORTER_REVISION={revision}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=MAIL_OAUTH_EXPORTER_REVISION");
}
