//! The refresh token store: the only place refresh tokens live, in memory and under `state_dir`.
//!
//! Every new refresh token is written here before anything else is done with the reply that
//! carried it: temp file in the same directory (the token and a newline, one write), fsync,
//! rename over the old file, fsync the directory. A crash at any instant leaves the old
//! file whole and, from the write on, the new token whole in a temp file or in place.
//!
//! At start ([`RefreshTokenStore::candidates`]) the store reads the committed file *and* the
//! complete temp files a crash left behind, newest first: with single-use rotation (Okta,
//! Auth0, Keycloak revoke-on-use) a token that reached a temp file is the only one still
//! valid. The token service tries the newest and falls back to an older one only when the
//! endpoint refuses the newer with `invalid_grant`; [`RefreshTokenStore::settle`] then makes
//! the winner (or the token it was rotated into) the committed file and deletes the losers.
//! If the disk write fails the new token is still kept in memory and used next (the old one
//! may already be invalid server-side), and the failure is reported through [`SaveStatus`].

use crate::secret::Secret;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// The on-disk state of one credential's refresh token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveStatus {
    /// When the newest refresh token was last written successfully.
    pub last_saved: Option<SystemTime>,
    /// Set while the newest refresh token exists only in memory: why it could not be saved.
    pub save_error: Option<String>,
}

#[derive(Debug, Default)]
struct Slot {
    token: Option<Secret>,
    status: SaveStatus,
    /// The file's (mtime, length) when we last wrote or read it: a different stamp means
    /// another process (`login`) wrote a newer token, which then wins over memory.
    disk_stamp: Option<(SystemTime, u64)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Where a [`Candidate`] was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This process received it (the disk may hold an older one after a failed save).
    Memory,
    /// The committed file, [`RefreshTokenStore::path_for`].
    Committed,
    /// A complete temp file: a crash came between its write and its rename.
    Temp(PathBuf),
}

/// A refresh token that may be the credential's newest one.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub token: Secret,
    pub origin: Origin,
    /// The file's mtime (`None` for memory).
    pub modified: Option<SystemTime>,
}

/// Refresh tokens longer than this are not tokens (Entra's are ~1.5 KiB); a bigger state
/// file is not read.
pub const MAX_TOKEN_FILE: u64 = 256 * 1024;

/// A temp file still incomplete after this long has lost its writer (a write, fsync and
/// rename take milliseconds); younger ones may belong to a `login` running now.
const STALE_TEMP: Duration = Duration::from_secs(10);

/// Refresh tokens per credential name.
#[derive(Debug)]
pub struct RefreshTokenStore {
    dir: PathBuf,
    memory: Mutex<HashMap<String, Slot>>,
}

impl RefreshTokenStore {
    pub fn new(dir: impl Into<PathBuf>) -> RefreshTokenStore {
        RefreshTokenStore {
            dir: dir.into(),
            memory: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `credential`'s refresh token. The name keeps the safe characters of
    /// the credential name (readable for operators) plus a hash of the whole name, so two
    /// names never share a file and no name can climb out of the directory.
    pub fn path_for(&self, credential: &str) -> PathBuf {
        let safe: String = credential
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let digest = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes());
        let hash: String = digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(format!("{safe}-{hash}.refresh_token"))
    }

    /// The newest refresh token (the first of [`RefreshTokenStore::candidates`]).
    pub fn current(&self, credential: &str) -> io::Result<Option<Secret>> {
        Ok(self
            .candidates(credential)?
            .into_iter()
            .next()
            .map(|c| c.token))
    }

    /// The refresh tokens that may be `credential`'s newest, newest first, distinct.
    ///
    /// Memory alone while this process holds the newest one and the committed file is as
    /// it left it. Otherwise (at start, or after a `login` by another process) the
    /// committed file and every complete temp file a crash left behind, by mtime (a temp
    /// file before the committed file of the same mtime: it was written to replace it).
    /// A temp file is complete when it ends with the newline written with the token and
    /// holds only RFC 6749 VSCHARs. Empty when there is no token at all.
    pub fn candidates(&self, credential: &str) -> io::Result<Vec<Candidate>> {
        let path = self.path_for(credential);
        let on_disk = stamp(&path);
        if let Some(slot) = self.lock().get(credential)
            && let Some(t) = &slot.token
            && (on_disk.is_none() || on_disk == slot.disk_stamp)
        {
            return Ok(vec![Candidate {
                token: t.clone(),
                origin: Origin::Memory,
                modified: None,
            }]);
        }
        let mut found = Vec::new();
        match read_capped(&path) {
            Ok(s) => {
                let t = s.trim();
                if !t.is_empty() {
                    found.push(Candidate {
                        token: Secret::new(t),
                        origin: Origin::Committed,
                        modified: on_disk.map(|(m, _)| m),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for (tmp, modified) in self.temp_files(credential) {
            // An unreadable or torn temp file is no candidate; `settle` tidies it.
            if let Ok(s) = read_capped(&tmp)
                && let Some(t) = complete_token(&s)
            {
                found.push(Candidate {
                    token: Secret::new(t),
                    origin: Origin::Temp(tmp),
                    modified: Some(modified),
                });
            }
        }
        // Newest first; at equal mtimes a temp file before the committed one.
        found.sort_by(|a, b| {
            b.modified.cmp(&a.modified).then_with(|| {
                let temp = |c: &Candidate| matches!(c.origin, Origin::Temp(_));
                temp(b).cmp(&temp(a))
            })
        });
        let mut distinct: Vec<Candidate> = Vec::new();
        for c in found {
            if !distinct.iter().any(|d| d.token == c.token) {
                distinct.push(c);
            }
        }
        if let Some(first) = distinct.first()
            && first.origin == Origin::Committed
            && distinct.len() == 1
        {
            let mut map = self.lock();
            let slot = map.entry(credential.to_string()).or_default();
            slot.token = Some(first.token.clone());
            slot.disk_stamp = on_disk;
        }
        Ok(distinct)
    }

    /// After the endpoint accepted `winner` (one of `tried`, from
    /// [`RefreshTokenStore::candidates`]): makes it the committed token unless `rotated`
    /// (the token it was rotated into is already saved), then deletes every other
    /// candidate's temp file and torn temp files whose writer is gone. With single-use
    /// rotation every loser is dead; with reusable tokens they are older ones.
    pub async fn settle(
        &self,
        credential: &str,
        winner: &Candidate,
        tried: &[Candidate],
        rotated: bool,
    ) -> io::Result<()> {
        if !rotated {
            if let Origin::Temp(_) = winner.origin {
                self.save(credential, &winner.token).await?;
            } else {
                let mut map = self.lock();
                let slot = map.entry(credential.to_string()).or_default();
                slot.token = Some(winner.token.clone());
                if winner.origin == Origin::Committed {
                    slot.disk_stamp = stamp(&self.path_for(credential));
                }
            }
        }
        let losers: Vec<PathBuf> = tried
            .iter()
            .filter_map(|c| match &c.origin {
                Origin::Temp(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let now = SystemTime::now();
        for (tmp, modified) in self.temp_files(credential) {
            let torn = read_capped(&tmp)
                .ok()
                .and_then(|s| complete_token(&s).map(|_| ()))
                .is_none();
            let old = now.duration_since(modified).unwrap_or_default() > STALE_TEMP;
            if losers.contains(&tmp) || (torn && old) {
                match fs::remove_file(&tmp) {
                    Ok(()) => {
                        tracing::info!(credential, file = %tmp.display(), "removed a superseded refresh token temp file")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(credential, file = %tmp.display(), error = %e, "cannot remove a stale temp file")
                    }
                }
            }
        }
        Ok(())
    }

    /// `credential`'s temp files (written by [`write_atomic`], any process) and their mtimes.
    fn temp_files(&self, credential: &str) -> Vec<(PathBuf, SystemTime)> {
        let path = self.path_for(credential);
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Vec::new();
        };
        let prefix = format!(".{name}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".tmp")
            })
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then_some(())?;
                Some((e.path(), m.modified().ok()?))
            })
            .collect()
    }

    /// Records a new refresh token: memory at once, then the disk. The returned error (also
    /// kept in [`SaveStatus`]) does not undo the memory update.
    pub async fn save(&self, credential: &str, token: &Secret) -> io::Result<()> {
        let staged = self.stage(credential, token);
        self.commit(credential, staged).await
    }

    /// The first half of [`RefreshTokenStore::save`], synchronous and fast, for the moment a
    /// reply carrying a rotated token is in: memory, then a temp file holding the token and
    /// its newline (one `write`, no fsync). From here a killed process loses nothing: the
    /// page cache outlives it and the next start recovers the temp file. Power loss needs
    /// [`RefreshTokenStore::commit`]'s fsync.
    pub fn stage(&self, credential: &str, token: &Secret) -> Staged {
        {
            let mut map = self.lock();
            map.entry(credential.to_string()).or_default().token = Some(token.clone());
        }
        let path = self.path_for(credential);
        let temp = write_temp(&path, token.expose());
        Staged {
            token: token.clone(),
            temp,
        }
    }

    /// The second half of [`RefreshTokenStore::save`]: fsync the staged temp file, rename
    /// it over the committed one, fsync the directory (a staging that failed is retried
    /// whole). The outcome goes to [`SaveStatus`].
    pub async fn commit(&self, credential: &str, staged: Staged) -> io::Result<()> {
        let path = self.path_for(credential);
        let file = path.display().to_string();
        // The blocking write runs to its end even if the caller is cancelled meanwhile.
        let result = tokio::task::spawn_blocking(move || match staged.temp {
            Ok(tmp) => commit_temp(&tmp, &path),
            Err(_) => write_atomic(&path, staged.token.expose()),
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {file}: {e}")));
        let mut map = self.lock();
        let slot = map.entry(credential.to_string()).or_default();
        match &result {
            Ok(()) => {
                slot.disk_stamp = stamp(&self.path_for(credential));
                slot.status.last_saved = Some(SystemTime::now());
                slot.status.save_error = None;
            }
            Err(e) => slot.status.save_error = Some(e.to_string()),
        }
        result
    }

    /// Writes the in-memory refresh token of `credential` again if the last save failed
    /// (at shutdown: the disk may have recovered, and memory is about to go).
    pub async fn flush(&self, credential: &str) -> io::Result<()> {
        let pending = {
            let map = self.lock();
            map.get(credential)
                .filter(|s| s.status.save_error.is_some())
                .and_then(|s| s.token.clone())
        };
        match pending {
            Some(token) => self.save(credential, &token).await,
            None => Ok(()),
        }
    }

    pub fn status(&self, credential: &str) -> SaveStatus {
        self.lock()
            .get(credential)
            .map(|s| s.status.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Temp file names: the process id and a per-process counter are not enough (in a
/// container the exporter is PID 1 at every start, and a crash leaves temp files behind).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_suffix() -> String {
    let mut r = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let random: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}.{}.{random}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads a state file of at most [`MAX_TOKEN_FILE`] bytes, refusing anything but a
/// regular file (a FIFO would block, a device never end).
fn read_capped(path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(io::Error::other(format!(
            "larger than {MAX_TOKEN_FILE} bytes: not a refresh token"
        )));
    }
    let mut s = String::new();
    io::Read::take(fs::File::open(path)?, MAX_TOKEN_FILE).read_to_string(&mut s)?;
    Ok(s)
}

/// The token of a temp file [`write_atomic`] finished writing: the value and its newline,
/// the value made of RFC 6749 VSCHARs (`%x20-7E`). `None` for a torn or foreign file.
fn complete_token(content: &str) -> Option<&str> {
    let value = content.strip_suffix('\n')?;
    (!value.trim().is_empty() && value.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .then(|| value.trim())
}

/// A refresh token written to a temp file beside its state file, not yet fsynced nor
/// renamed ([`RefreshTokenStore::stage`]).
#[derive(Debug)]
pub struct Staged {
    token: Secret,
    temp: io::Result<PathBuf>,
}

/// Creates a temp file beside `path` holding `value` and a newline, written with one
/// `write` (the newline is the completeness mark [`RefreshTokenStore::candidates`] checks).
fn write_temp(path: &Path, value: &str) -> io::Result<PathBuf> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("state file has no directory"))?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("state file has no name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", temp_suffix()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above is filtered by the umask; the token must stay owner-only.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        let mut content = String::with_capacity(value.len() + 1);
        content.push_str(value);
        content.push('\n');
        f.write_all(content.as_bytes())
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// fsync `tmp`, rename it to `path`, fsync the directory.
fn commit_temp(tmp: &Path, path: &Path) -> io::Result<()> {
    let result = (|| {
        fs::File::open(tmp)?.sync_all()?;
        fs::rename(tmp, path)?;
        // Without this the rename itself may not survive a power cut.
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("state file has no directory"))?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Writes `value` to `path` so that a crash leaves the old or the new content, whole: the
/// value and a newline in one write to a temp file beside it (its completeness mark for
/// [`RefreshTokenStore::candidates`]), fsync, rename, directory fsync.
pub fn write_atomic(path: &Path, value: &str) -> io::Result<()> {
    let tmp = write_temp(path, value)?;
    commit_temp(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "moe-store-{tag}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let s = RefreshTokenStore::new("/state");
        let a = s.path_for("../etc/passwd");
        assert_eq!(a.parent(), Some(Path::new("/state")));
        assert!(!a.file_name().unwrap().to_string_lossy().starts_with('.'));
        assert_ne!(s.path_for("a/b"), s.path_for("a_b"));
        assert!(
            s.path_for("helpdesk-user")
                .to_string_lossy()
                .contains("helpdesk-user-")
        );
    }

    #[tokio::test]
    async fn save_then_load_in_a_new_store_mode_0600() {
        let dir = tmpdir("roundtrip");
        let s = RefreshTokenStore::new(&dir);
        assert_eq!(s.current("c").unwrap(), None);
        s.save("c", &Secret::new("rt-1")).await.unwrap();
        s.save("c", &Secret::new("rt-2")).await.unwrap();
        let again = RefreshTokenStore::new(&dir);
        assert_eq!(again.current("c").unwrap().unwrap().expose(), "rt-2");
        let mode = fs::metadata(s.path_for("c")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(s.status("c").save_error.is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_login_by_another_process_wins_over_memory() {
        let dir = tmpdir("relogin");
        let service = RefreshTokenStore::new(&dir);
        service.save("c", &Secret::new("rt-old")).await.unwrap();
        assert_eq!(service.current("c").unwrap().unwrap().expose(), "rt-old");
        // Same second, other length: the stamp still differs.
        let login = RefreshTokenStore::new(&dir);
        login
            .save("c", &Secret::new("rt-from-login"))
            .await
            .unwrap();
        assert_eq!(
            service.current("c").unwrap().unwrap().expose(),
            "rt-from-login"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn failed_save_keeps_the_new_token_in_memory_and_reports() {
        let dir = tmpdir("fail");
        // A file where the directory should be: every write fails.
        fs::write(&dir, "not a dir").unwrap();
        let s = RefreshTokenStore::new(dir.join("sub"));
        assert!(s.save("c", &Secret::new("rt-new")).await.is_err());
        assert_eq!(s.current("c").unwrap().unwrap().expose(), "rt-new");
        let status = s.status("c");
        assert!(status.save_error.is_some());
        assert!(!status.save_error.unwrap().contains("rt-new"));
        fs::remove_file(&dir).unwrap();
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[tokio::test]
    async fn candidates_newest_first_torn_and_foreign_temp_files_ignored() {
        let dir = tmpdir("candidates");
        let s = RefreshTokenStore::new(&dir);
        s.save("c", &Secret::new("rt-committed")).await.unwrap();
        let name = s
            .path_for("c")
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let temp = |tag: &str| dir.join(format!(".{name}.1.{tag}.tmp"));
        let now = SystemTime::now();
        fs::write(temp("newer"), "rt-staged\n").unwrap();
        set_mtime(&temp("newer"), now + Duration::from_secs(2));
        fs::write(temp("torn"), "rt-torn").unwrap();
        set_mtime(&temp("torn"), now + Duration::from_secs(3));
        fs::write(temp("binary"), b"rt\x00\xff\n").unwrap();
        fs::write(temp("empty"), "").unwrap();
        fs::write(
            dir.join(".other-000000.refresh_token.1.x.tmp"),
            "rt-other\n",
        )
        .unwrap();
        let fresh = RefreshTokenStore::new(&dir);
        let got: Vec<(String, bool)> = fresh
            .candidates("c")
            .unwrap()
            .into_iter()
            .map(|c| {
                (
                    c.token.expose().to_string(),
                    matches!(c.origin, Origin::Temp(_)),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("rt-staged".into(), true), ("rt-committed".into(), false)]
        );
        assert_eq!(fresh.current("c").unwrap().unwrap().expose(), "rt-staged");

        // Settled on the staged one without a rotation: it becomes the committed token,
        // the other temp files of this credential go when torn and old.
        let all = fresh.candidates("c").unwrap();
        set_mtime(&temp("empty"), now - Duration::from_secs(60));
        fresh.settle("c", &all[0], &all, false).await.unwrap();
        assert_eq!(
            fs::read_to_string(s.path_for("c")).unwrap().trim(),
            "rt-staged"
        );
        assert!(!temp("newer").exists() && !temp("empty").exists());
        // Young torn files may be a writer at work; other credentials' files are not ours.
        assert!(temp("torn").exists());
        assert!(dir.join(".other-000000.refresh_token.1.x.tmp").exists());
        let again = RefreshTokenStore::new(&dir);
        assert_eq!(again.candidates("c").unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_staged_token_survives_without_its_commit() {
        let dir = tmpdir("staged");
        let s = RefreshTokenStore::new(&dir);
        s.save("c", &Secret::new("rt-1")).await.unwrap();
        // Staged, then the process dies before the commit.
        let _staged = s.stage("c", &Secret::new("rt-2"));
        let next_start = RefreshTokenStore::new(&dir);
        assert_eq!(next_start.current("c").unwrap().unwrap().expose(), "rt-2");
        fs::remove_dir_all(&dir).unwrap();
    }
}
