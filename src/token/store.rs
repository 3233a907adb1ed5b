//! The refresh token store: the only place refresh tokens live, in memory and under `state_dir`.
//!
//! Every new refresh token is written here before the access token that came with it is
//! handed out: temp file in the same directory, fsync, rename over the old file, fsync the
//! directory. A crash at any instant leaves the old or the new file whole. If the disk
//! write fails the new token is still kept in memory and used next (the old one may
//! already be invalid server-side), and the failure is reported through [`SaveStatus`].

use crate::secret::Secret;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

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

/// Refresh tokens per credential name.
#[derive(Debug)]
pub struct RefreshTokenStore {
    dir: PathBuf,
    memory: Mutex<HashMap<String, Slot>>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

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

    /// The newest refresh token: memory (it may be newer than the disk, after a failed
    /// save), unless the file changed since we last wrote or read it (a new `login`).
    pub fn current(&self, credential: &str) -> io::Result<Option<Secret>> {
        let path = self.path_for(credential);
        let on_disk = stamp(&path);
        if let Some(slot) = self.lock().get(credential)
            && let Some(t) = &slot.token
            && (on_disk.is_none() || on_disk == slot.disk_stamp)
        {
            return Ok(Some(t.clone()));
        }
        let token = match fs::read_to_string(&path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if token.is_empty() {
            return Ok(None);
        }
        let token = Secret::new(token);
        let mut map = self.lock();
        let slot = map.entry(credential.to_string()).or_default();
        slot.token = Some(token.clone());
        slot.disk_stamp = on_disk;
        Ok(Some(token))
    }

    /// Records a new refresh token: memory at once, then the disk. The returned error (also
    /// kept in [`SaveStatus`]) does not undo the memory update.
    pub async fn save(&self, credential: &str, token: &Secret) -> io::Result<()> {
        {
            let mut map = self.lock();
            map.entry(credential.to_string()).or_default().token = Some(token.clone());
        }
        let path = self.path_for(credential);
        let value = token.clone();
        let result = tokio::task::spawn_blocking(move || write_atomic(&path, value.expose()))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
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

/// Writes `value` to `path` so that a crash leaves the old or the new content, whole.
pub fn write_atomic(path: &Path, value: &str) -> io::Result<()> {
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
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above is filtered by the umask; the token must stay owner-only.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(value.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Without this the rename itself may not survive a power cut.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
}
