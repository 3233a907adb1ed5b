//! The container image, built and started for real. Base images cannot be pulled here, so
//! the test follows deploy/Dockerfile itself rather than a copy of it:
//!
//! 1. The build stage: exactly the files its COPY lines name (each allowed by
//!    .dockerignore) go into a build directory standing for its WORKDIR, and its ARG, ENV
//!    and RUN lines run there, verbatim, with `sh -c`. One thing differs, through cargo's
//!    documented `CARGO_PROFILE_RELEASE_*` variables: the release profile is built without
//!    optimisation or LTO, in 16 codegen units and incrementally, so the suite pays a debug build's time on 2 cores,
//!    not an optimised build's (`MAIL_OAUTH_EXPORTER_IMAGE_RELEASE=1` builds exactly as
//!    docker does). The build directory's `target/` is kept between runs (as a docker
//!    cache mount would be) under the test's own target directory.
//! 2. The runtime stage's base (`gcr.io/distroless/cc-debian12:nonroot`) is stood in for
//!    by an image made from scratch with what distroless/cc holds and the binary needs:
//!    the shared libraries `ldd` lists, the CA bundle, /etc/passwd with `nonroot` (65532)
//!    and /tmp. It is tagged with the FROM line's name, and buildah (vfs storage, chroot
//!    isolation, storage in a temp dir) applies the stage's instructions to it.
//! 3. The image runs as its USER with the standalone manifest's arguments and volume
//!    mounts, its root file system mounted read-only, on the host network, probing the
//!    emulated provider on 127.0.0.1: `/healthz` and `/readyz` answer 200 and the probe
//!    logs in; SIGTERM stops it with exit 0. A second run shows the state volume is the
//!    one writable place (a write elsewhere fails with EROFS). buildah itself needs `/run`
//!    writable (see [`Buildah::make_read_only`]): a root-owned directory the container's
//!    user cannot write to, checked empty afterwards.
//!
//! Needs root and Debian's `buildah` (scripts/test installs it); without them it fails
//! saying so.

use super::probe::{TOKEN, options, start};
use mail_oauth_exporter::emulator::{Proto, TlsKind};
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_mail-oauth-exporter");
/// The image the test builds (in its own temporary buildah storage).
const IMAGE: &str = "localhost/mail-oauth-exporter:image-test";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation
/// lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

/// A stage: its FROM image, its `AS` name, its instructions.
#[derive(Debug)]
struct Stage {
    from: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("FROM {args}: not understood"),
            };
            stages.push(Stage {
                from: words[0].to_string(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before FROM")
                .instructions
                .push(Instruction { keyword, args });
        }
    }
    stages
}

/// `.dockerignore` in the shape this repository uses: `*` (everything out), then `!PATH`
/// lines letting single top-level files or directories back in. Whether `rel` (a COPY
/// source) is in the build context.
pub fn in_build_context(dockerignore: &str, rel: &str) -> bool {
    let lines: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"*"),
        ".dockerignore starts by leaving everything out"
    );
    let rel = rel.trim_start_matches("./").trim_end_matches('/');
    lines[1..].iter().any(|l| {
        let allowed = l
            .strip_prefix('!')
            .unwrap_or_else(|| panic!(".dockerignore: {l:?} is not an allow line"));
        let allowed = allowed.trim_start_matches('/').trim_end_matches('/');
        rel == allowed || rel.starts_with(&format!("{allowed}/"))
    })
}

fn copy_recursively(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_recursively(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

/// `$NAME` and `${NAME}` from `vars`.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    // Longest names first, so `$REV` never replaces inside `$REVISION`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    out
}

/// Runs the build stage in `workdir` (standing for its WORKDIR). Returns the WORKDIR path
/// the stage names, so that the runtime stage's `COPY --from` can be mapped to `workdir`.
fn run_build_stage(stage: &Stage, workdir: &Path, build_args: &BTreeMap<&str, String>) -> String {
    let dockerignore = std::fs::read_to_string(repo().join(".dockerignore"))
        .expect(".dockerignore keeps target/ and .git out of the build context");
    // A fresh WORKDIR but for cargo's target directory (the build cache).
    if workdir.exists() {
        for e in std::fs::read_dir(workdir).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "target" {
                let p = e.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
    }
    std::fs::create_dir_all(workdir).unwrap();
    let release = std::env::var("MAIL_OAUTH_EXPORTER_IMAGE_RELEASE").is_ok_and(|v| v == "1");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    // What cargo and rustup need from this environment, nothing of the test's own cargo
    // (CARGO_TARGET_DIR would move target/ away from where the Dockerfile looks).
    for key in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
    ] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    // The crates of Cargo.lock are in the local registry already (the suite was built).
    env.insert("CARGO_NET_OFFLINE".into(), "true".into());
    if !release {
        env.insert("CARGO_PROFILE_RELEASE_OPT_LEVEL".into(), "0".into());
        env.insert("CARGO_PROFILE_RELEASE_DEBUG".into(), "false".into());
        env.insert("CARGO_PROFILE_RELEASE_INCREMENTAL".into(), "true".into());
        env.insert("CARGO_PROFILE_RELEASE_LTO".into(), "false".into());
        env.insert("CARGO_PROFILE_RELEASE_CODEGEN_UNITS".into(), "16".into());
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut workdir_name = None;
    for ins in &stage.instructions {
        match ins.keyword.as_str() {
            "WORKDIR" => {
                assert!(workdir_name.is_none(), "one WORKDIR in the build stage");
                workdir_name = Some(ins.args.clone());
            }
            "COPY" => {
                let words: Vec<&str> = ins.args.split_whitespace().collect();
                assert!(
                    !words[0].starts_with("--"),
                    "COPY {}: no flags in the build stage",
                    ins.args
                );
                let (dest, srcs) = words.split_last().unwrap();
                for src in srcs {
                    assert!(
                        in_build_context(&dockerignore, src),
                        "COPY {src}: left out of the build context by .dockerignore"
                    );
                    let from = repo().join(src);
                    assert!(from.exists(), "COPY {src}: not in the repository");
                    let into_dir = dest.ends_with('/') || *dest == "." || srcs.len() > 1;
                    let to = if into_dir {
                        workdir.join(dest).join(from.file_name().unwrap())
                    } else {
                        workdir.join(dest)
                    };
                    copy_recursively(&from, &to);
                }
            }
            "ARG" => {
                let (name, default) = ins.args.split_once('=').unwrap_or((&ins.args, ""));
                let value = build_args
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| default.to_string());
                vars.insert(name.to_string(), value);
            }
            "ENV" => {
                let (name, value) = ins
                    .args
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {}: write NAME=VALUE", ins.args));
                let value = expand(value, &vars);
                vars.insert(name.to_string(), value.clone());
                // The test's profile overrides win over the Dockerfile's where they meet.
                if release || !env.contains_key(name) {
                    env.insert(name.to_string(), value);
                }
            }
            "RUN" => {
                let workdir_name = workdir_name.as_deref().expect("WORKDIR before RUN");
                // Paths outside WORKDIR would be the host's here: the stage keeps to it.
                for word in ins.args.split_whitespace() {
                    assert!(
                        !word.starts_with('/') || word.starts_with(workdir_name),
                        "RUN {}: {word} is outside WORKDIR {workdir_name}",
                        ins.args
                    );
                }
                eprintln!("image: RUN {}", ins.args);
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(&ins.args)
                    .current_dir(workdir)
                    .env_clear()
                    .envs(&env)
                    .output()
                    .expect("sh runs");
                assert!(
                    out.status.success(),
                    "RUN {} failed:\n{}{}",
                    ins.args,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            other => panic!("{other} {}: not modelled in the build stage", ins.args),
        }
    }
    workdir_name.expect("the build stage has a WORKDIR")
}

/// buildah with its storage in a temp dir (vfs, chroot isolation); unmounts what it
/// mounted and removes its containers when dropped.
struct Buildah {
    storage: tempfile::TempDir,
    bind_mounts: Vec<PathBuf>,
}

impl Buildah {
    fn new() -> Buildah {
        // buildah with vfs storage and chroot isolation needs root.
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "the image test runs buildah as root (vfs storage, chroot isolation)"
        );
        let version = Command::new("buildah").arg("--version").output();
        assert!(
            version.is_ok_and(|o| o.status.success()),
            "`buildah` is missing: scripts/test installs it; by hand: sudo apt-get install -y buildah"
        );
        Buildah {
            storage: tempfile::tempdir().unwrap(),
            bind_mounts: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.storage.path().join("root"))
            .arg("--runroot")
            .arg(self.storage.path().join("runroot"))
            .args(["--storage-driver", "vfs"])
            .env("BUILDAH_ISOLATION", "chroot");
        c
    }

    /// Runs `buildah ARGS`, returning its stdout (trimmed); fails with its words.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("buildah runs");
        assert!(
            out.status.success(),
            "buildah {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Mounts `path` (a container's root) read-only onto itself: what `readOnlyRootFilesystem`
    /// does. Mounts buildah adds when it runs the container inherit read-only. One
    /// exception, `run_dir` (root-owned, 0755, so the container's user cannot write there
    /// either) over `/run`: buildah 1.28 creates and afterwards removes `/run/.containerenv`
    /// in the root itself, and crashes when it cannot.
    fn make_read_only(&mut self, path: &Path, run_dir: &Path) {
        let p = path.to_str().unwrap();
        let run = path.join("run");
        let steps: [Vec<&str>; 3] = [
            vec!["--bind", p, p],
            vec!["-o", "remount,bind,ro", p],
            vec!["--bind", run_dir.to_str().unwrap(), run.to_str().unwrap()],
        ];
        for args in steps {
            let st = Command::new("mount").args(&args).status().unwrap();
            assert!(st.success(), "mount {args:?}");
            if args[0] == "--bind" {
                self.bind_mounts.push(PathBuf::from(args[2]));
            }
        }
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        for p in self.bind_mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
        let _ = self
            .command()
            .args(["rm", "--all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The files `ldd` says `binary` loads (the interpreter included), as absolute paths.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "ldd {}: {text}",
        binary.display()
    );
    libs
}

/// A stand-in for `gcr.io/distroless/cc-debian12:nonroot`, built from scratch and
/// committed under `name`: the libraries `binary` links against, the CA bundle, the
/// `nonroot` user, /tmp; no shell, no package manager.
fn make_base(b: &Buildah, name: &str, binary: &Path) {
    let ctr = b.run(&["from", "scratch"]);
    let root = PathBuf::from(b.run(&["mount", &ctr]));
    for lib in shared_libraries(binary) {
        let to = root.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        // Follows symbolic links: the file itself lands under the path the binary asks for.
        std::fs::copy(&lib, &to).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    }
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let to = root.join("etc/ssl/certs/ca-certificates.crt");
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(certs, &to).expect("the host's CA bundle (ca-certificates)");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    for (dir, mode, owner) in [("tmp", 0o1777, 0), ("home/nonroot", 0o700, 65532)] {
        let p = root.join(dir);
        std::fs::create_dir_all(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(owner), Some(owner)).unwrap();
    }
    b.run(&[
        "config",
        "--user",
        "65532:65532",
        "--env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--env",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        &ctr,
    ]);
    b.run(&["unmount", &ctr]);
    b.run(&["commit", "--quiet", &ctr, name]);
    b.run(&["rm", &ctr]);
}

/// Applies the runtime stage to its FROM image with buildah and commits [`IMAGE`].
/// `COPY --from=STAGE /WORKDIR/x` takes `x` from `build_dir`.
fn assemble_runtime(
    b: &Buildah,
    stage: &Stage,
    build_stage: &str,
    workdir: &str,
    build_dir: &Path,
) {
    let ctr = b.run(&["from", "--pull=never", &stage.from]);
    for ins in &stage.instructions {
        let args = ins.args.as_str();
        match ins.keyword.as_str() {
            "COPY" => {
                let mut words: Vec<&str> = args.split_whitespace().collect();
                let mut chown = None;
                let mut from = None;
                words.retain(|w| {
                    if let Some(v) = w.strip_prefix("--from=") {
                        from = Some(v.to_string());
                        false
                    } else if let Some(v) = w.strip_prefix("--chown=") {
                        chown = Some(v.to_string());
                        false
                    } else {
                        true
                    }
                });
                assert_eq!(
                    from.as_deref(),
                    Some(build_stage),
                    "COPY {args}: the runtime stage copies from the build stage only"
                );
                let [src, dest] = words[..] else {
                    panic!("COPY {args}: one source, one destination")
                };
                let rel = Path::new(src)
                    .strip_prefix(workdir)
                    .unwrap_or_else(|_| panic!("COPY {args}: {src} is outside {workdir}"));
                let local = build_dir.join(rel);
                let mut cmd = vec!["copy", "--quiet"];
                if let Some(c) = chown.as_deref() {
                    cmd.extend(["--chown", c]);
                }
                let local = local.to_str().unwrap().to_string();
                cmd.extend([ctr.as_str(), local.as_str(), dest]);
                b.run(&cmd);
            }
            "USER" => drop(b.run(&["config", "--user", args, &ctr])),
            "EXPOSE" => drop(b.run(&["config", "--port", args, &ctr])),
            "STOPSIGNAL" => drop(b.run(&["config", "--stop-signal", args, &ctr])),
            "VOLUME" => {
                let volumes: Vec<String> = serde_json::from_str(args).expect("VOLUME [\"...\"]");
                for v in volumes {
                    b.run(&["config", "--volume", &v, &ctr]);
                }
            }
            "ENTRYPOINT" => drop(b.run(&["config", "--entrypoint", args, &ctr])),
            "CMD" => drop(b.run(&["config", "--cmd", args, &ctr])),
            other => panic!("{other} {args}: not modelled in the runtime stage"),
        }
    }
    b.run(&["commit", "--quiet", &ctr, IMAGE]);
    b.run(&["rm", &ctr]);
}

/// The OCI image config of [`IMAGE`] (`User`, `Entrypoint`, `Cmd`, `StopSignal`, ...).
fn image_config(b: &Buildah) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&b.run(&["inspect", "--type", "image", IMAGE])).unwrap();
    all["OCIv1"]["config"].clone()
}

/// The standalone manifest's exporter container: its arguments, its mounts (path →
/// read-only), and its pod's runAsUser.
fn standalone_container() -> (Vec<String>, Vec<(String, bool)>, u64) {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/standalone.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let d: Value = serde::Deserialize::deserialize(doc).unwrap();
        if d["kind"] != "Deployment" {
            continue;
        }
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let mounts = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["readOnly"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        let user = pod["securityContext"]["runAsUser"].as_u64().unwrap();
        return (args, mounts, user);
    }
    panic!("standalone.yaml has no Deployment");
}

async fn get(url: &str) -> (u16, String) {
    super::demo::get(url).await
}

/// The process running `program` among the descendants of `ancestor` (the container's
/// process under `buildah run`), from /proc.
fn descendant_running(ancestor: u32, program: &str) -> Option<u32> {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    parent.keys().copied().find(|&pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let mut p = pid;
        let below = std::iter::from_fn(|| {
            p = *parent.get(&p)?;
            Some(p)
        })
        .take(16)
        .any(|p| p == ancestor);
        below && argv0 == program.as_bytes()
    })
}

/// Stops the service in the container, also when the test fails early: SIGTERM to the
/// container's process, as a container runtime sends the image's STOPSIGNAL (buildah
/// itself answers SIGTERM by killing its child, which would skip the graceful stop).
struct Running {
    buildah: u32,
    program: String,
}

impl Running {
    fn stop(&self) {
        let pid = descendant_running(self.buildah, &self.program).unwrap_or(self.buildah);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_and_serves_read_only_as_non_root() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let stages = parse_dockerfile(&dockerfile);
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);
    let build_name = build.name.as_deref().expect("the build stage is named");

    // Root and buildah first: no point building without them.
    let mut b = Buildah::new();

    // 1. The build stage, on exactly the files it copies.
    let target_dir = Path::new(BIN).parent().unwrap().parent().unwrap();
    let build_dir = target_dir.join("image-build").join("workdir");
    let revision = "imagetest0123";
    let build_args = BTreeMap::from([("REVISION", revision.to_string())]);
    let b_dir = build_dir.clone();
    let workdir = tokio::task::spawn_blocking(move || {
        let stages =
            parse_dockerfile(&std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap());
        run_build_stage(&stages[0], &b_dir, &build_args)
    })
    .await
    .unwrap();

    // 2. The runtime stage on a local stand-in for its base.
    let binary = build_dir.join(
        runtime
            .instructions
            .iter()
            .find(|i| i.keyword == "COPY" && i.args.contains("/mail-oauth-exporter "))
            .map(|i| {
                let src = i.args.split_whitespace().rev().nth(1).unwrap();
                Path::new(src).strip_prefix(&workdir).unwrap().to_path_buf()
            })
            .expect("the runtime stage copies the binary"),
    );
    make_base(&b, &runtime.from, &binary);
    assemble_runtime(&b, runtime, build_name, &workdir, &build_dir);

    // What the image says about itself: non-root, the binary as entrypoint, no shell.
    let image = image_config(&b);
    let user = image["User"].as_str().unwrap_or_default().to_string();
    let (args, mounts, run_as) = standalone_container();
    assert_eq!(
        user,
        format!("{run_as}:{run_as}"),
        "the manifests' runAsUser"
    );
    let entrypoint: Vec<String> = serde_json::from_value(image["Entrypoint"].clone()).unwrap();
    assert_eq!(entrypoint, ["/usr/local/bin/mail-oauth-exporter"]);
    // Without arguments (docker run IMAGE) it runs the service on the mounted config.
    assert_eq!(
        image["Cmd"],
        serde_json::json!(["--config.file", "/etc/mail-oauth-exporter/config.yaml"])
    );
    let ctr = b.run(&["from", "--pull=never", IMAGE]);
    // `buildah run` mounts the image's VOLUMEs itself, over a --volume of the same path;
    // Kubernetes mounts the pod's volume there instead. Drop them from this container
    // (not the image) so that the manifest's mounts are the ones used.
    let volumes: Vec<String> = serde_json::from_value(
        image["Volumes"]
            .as_object()
            .map(|v| serde_json::json!(v.keys().collect::<Vec<_>>()))
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert!(
        volumes.iter().any(|v| v == "/var/lib/mail-oauth-exporter"),
        "the image declares its state volume: {image}"
    );
    for v in &volumes {
        b.run(&["config", "--volume", &format!("{v}-"), &ctr]);
    }
    let root = PathBuf::from(b.run(&["mount", &ctr]));
    for absent in ["bin/sh", "usr/bin/apt-get", "usr/bin/dpkg"] {
        assert!(!root.join(absent).exists(), "{absent} in the image");
    }
    let state = root.join("var/lib/mail-oauth-exporter");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&state).unwrap().uid(),
        65532,
        "state dir owner"
    );
    let size: u64 = walk(&root)
        .iter()
        .map(|p| p.symlink_metadata().unwrap().len())
        .sum();
    eprintln!("image: {} MiB of files", size / (1 << 20));

    // 3. Run it as Kubernetes would: the manifest's arguments after the entrypoint, its
    // mounts, read-only root. The mount points a runtime would create exist first.
    let (emu, _) = start(options()).await;
    let host = tempfile::tempdir().unwrap();
    let mut volumes = Vec::new();
    for (path, read_only) in &mounts {
        let dir = host.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(root.join(path.trim_start_matches('/'))).unwrap();
        volumes.push((dir, path.clone(), *read_only));
    }
    for dir in ["proc", "dev", "sys", "run"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in [
        "run/.containerenv",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
    ] {
        std::fs::write(root.join(file), "").unwrap();
    }
    let host_dir = |path: &str| {
        volumes
            .iter()
            .find(|(_, p, _)| p == path)
            .unwrap_or_else(|| panic!("the manifest mounts no {path}"))
            .0
            .clone()
    };
    let config_dir = host_dir("/etc/mail-oauth-exporter");
    let secrets = host_dir("/secrets");
    let state_dir = host_dir("/var/lib/mail-oauth-exporter");
    std::os::unix::fs::chown(&state_dir, Some(65532), Some(65532)).unwrap();
    std::fs::write(secrets.join("token"), format!("{TOKEN}\n")).unwrap();
    // `login --refresh-token-file` redeems what it imports: two users' refresh tokens from
    // an emulated token endpoint on loopback (the container shares the host's network).
    let ep = mail_oauth_exporter::emulator::token_endpoint::TokenEndpoint::start()
        .await
        .unwrap();
    ep.add_client(mail_oauth_exporter::emulator::token_endpoint::ClientSpec {
        id: "c".into(),
        grants: vec![mail_oauth_exporter::emulator::token_endpoint::EmuGrant::RefreshToken],
        ..Default::default()
    });
    for (file, user) in [("refresh", "a@contoso.com"), ("refresh2", "b@contoso.com")] {
        let rt = ep.add_user(user, "c", &[]);
        std::fs::write(secrets.join(file), format!("{rt}\n")).unwrap();
    }
    emu.write_ca_pem(&secrets.join("ca.pem")).unwrap();
    for f in ["token", "refresh", "refresh2", "ca.pem"] {
        std::os::unix::fs::chown(secrets.join(f), Some(65532), Some(65532)).unwrap();
    }
    let config = |state_dir: &str| {
        format!(
            "listen: 127.0.0.1:0\nstate_dir: {state_dir}\n\
             tls:\n  ca_file: /secrets/ca.pem\n\
             defaults:\n  interval: 10s\n  timeout: 5s\n\
             credentials:\n\
             \x20 external:\n    grant: token_file\n    token_file: /secrets/token\n\
             \x20 delegated:\n    provider: generic\n    token_url: {token_url}\n    client_id: c\n    grant: refresh_token\n\
             mailboxes:\n\
             \x20 helpdesk:\n    address: helpdesk@contoso.com\n    credential: external\n    protocols: [imap]\n\
             \x20   imap: {{ host: 127.0.0.1, port: {imap}, tls: implicit }}\n",
            imap = emu.addr(Proto::Imap, TlsKind::Implicit).port(),
            token_url = ep.token_url("contoso"),
        )
    };
    std::fs::write(
        config_dir.join("config.yaml"),
        config("/var/lib/mail-oauth-exporter"),
    )
    .unwrap();
    std::fs::write(
        config_dir.join("elsewhere.yaml"),
        config("/var/lib/elsewhere"),
    )
    .unwrap();
    let run_dir = host.path().join("run-for-buildah");
    std::fs::create_dir(&run_dir).unwrap();
    b.make_read_only(&root, &run_dir);

    let run_args = |extra: &[String]| {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--isolation".into(),
            "chroot".into(),
            "--network".into(),
            "host".into(),
            "--user".into(),
            user.clone(),
        ];
        for (host, path, ro) in &volumes {
            a.push("--volume".into());
            let ro = if *ro { ":ro" } else { "" };
            a.push(format!("{}:{path}{ro}", host.display()));
        }
        a.push(ctr.clone());
        a.push("--".into());
        a.extend(entrypoint.iter().cloned());
        a.extend(extra.iter().cloned());
        a
    };
    let mut service = b.command();
    service
        .args(run_args(&args))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(service)
        .spawn()
        .expect("buildah run starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let guard = Running {
        buildah: child.id().expect("a pid"),
        program: entrypoint[0].clone(),
    };
    let mut seen = Vec::new();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if line.contains("mail-oauth-exporter running") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("address="))
                    .expect("the start line names the address");
                // The REVISION build argument reached the binary.
                assert!(line.contains(&format!("revision={revision}")), "{line}");
                assert!(line.contains("version="), "{line}");
                return format!("http://{addr}");
            }
        }
        panic!("the container exited: {seen:#?}");
    })
    .await
    .expect("the container starts within 60 s");
    let logs = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            rest.push(l);
        }
        rest
    });

    let (code, body) = get(&format!("{base}/healthz")).await;
    assert_eq!(code, 200, "{body}");
    super::demo::wait_ok(&format!("{base}/readyz"), Duration::from_secs(60)).await;
    let (code, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"mail_oauth_probe_success{mailbox="helpdesk",protocol="imap"} 1"#),
        "the probe from inside the image logged in:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!(r#"revision="{revision}""#)),
        "the REVISION build argument reaches mail_oauth_build_info"
    );
    assert_eq!(image["StopSignal"], "SIGTERM");
    assert!(descendant_running(guard.buildah, &guard.program).is_some());
    drop(guard);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the container stops on SIGTERM")
        .unwrap();
    let rest = logs.await.unwrap();
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "{status}: {rest:#?}"
    );

    // The state volume is the one writable place: storing a refresh token works there and
    // fails on the read-only root (EROFS), with the same image and mounts.
    let login = |config: &str, refresh: &str| {
        let extra: Vec<String> = [
            "login",
            "--config.file",
            config,
            "--credential",
            "delegated",
            "--refresh-token-file",
            refresh,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        b.command().args(run_args(&extra)).output().unwrap()
    };
    let ok = login("/etc/mail-oauth-exporter/config.yaml", "/secrets/refresh");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stored: Vec<PathBuf> = walk(&state_dir);
    assert!(
        !stored.is_empty(),
        "the token is in the state volume: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = login(
        "/etc/mail-oauth-exporter/elsewhere.yaml",
        "/secrets/refresh2",
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "wrote outside the volume");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(walk(&run_dir), Vec::<PathBuf>::new(), "left in /run");
}

/// Every file under `dir` (not directories), symbolic links not followed.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
