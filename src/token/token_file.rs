//! The `token_file` grant: another tool keeps an access token fresh in a file; we read it.
//!
//! The file is tiny, but reading it on every probe costs four system calls, a JWT parse and
//! a hop to the blocking pool each time. [`TokenFileCache`] keeps the last value of each
//! file and checks only its metadata (device, inode, length, modification and change
//! times) on use: a rewrite in place changes the times and usually the length, a
//! replacement (a rename, Kubernetes' symlink swap) the inode, so a rotated token is seen
//! at once. Its expiry is known only when the token is a JWT with `exp` (read without
//! verifying: we are not the audience, the mail server checks it).

use super::assertion::unverified_claims;
use super::credential::AccessToken;
use super::error::TokenError;
use crate::fsread::{self, FileKind};
use crate::secret::Secret;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads the token file at `path` (blocking; capped at 64 KiB, never a FIFO or device:
/// see `crate::fsread`). The service reads through [`TokenFileCache`].
pub fn read_token_file(path: &Path) -> Result<AccessToken, TokenError> {
    let value = fsread::read_trimmed(path, FileKind::Token).map_err(|e| TokenError::TokenFile {
        path: path.display().to_string(),
        detail: e.reason(),
    })?;
    let value = value.as_str();
    let expires_at = unverified_claims(value)
        .and_then(|c| c.get("exp").and_then(|e| e.as_u64()))
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));
    Ok(AccessToken {
        value: Secret::new(value),
        expires_at,
    })
}

/// What a file's metadata said when its value was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The change time, as a point in time (`None` before 1970: never trusted).
    fn changed_at(&self) -> Option<SystemTime> {
        let (secs, nanos) = self.ctime;
        Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, u32::try_from(nanos).ok()?))
    }
}

/// A file changed within this long before it was read may change again with the same
/// times (file systems keep times in clock ticks, a network one in its server's clock):
/// its value is read again next time, until it has been still for this long.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Distinct files remembered; past this the cache starts afresh (a config names a few).
const MAX_FILES: usize = 1024;

/// The last value of each token file, re-read only when the file's metadata changed.
/// Cheap to clone; clones share the cache.
#[derive(Debug, Clone)]
pub struct TokenFileCache {
    files: Arc<Mutex<HashMap<PathBuf, Cached>>>,
    settle: Duration,
    /// Files actually read, for the tests.
    #[cfg(test)]
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug)]
struct Cached {
    stamp: Stamp,
    token: AccessToken,
}

impl Default for TokenFileCache {
    fn default() -> Self {
        TokenFileCache::with_settle(SETTLE)
    }
}

impl TokenFileCache {
    /// A cache that trusts a value once its file has been still for `settle` ([`SETTLE`]
    /// in the service).
    pub fn with_settle(settle: Duration) -> TokenFileCache {
        TokenFileCache {
            files: Arc::default(),
            settle,
            #[cfg(test)]
            reads: Arc::default(),
        }
    }

    /// The token in the file at `path`: the remembered value while the file's metadata is
    /// what it was when that value was read, else [`read_token_file`] (with its caps and
    /// refusals). Blocking: a `stat` at least.
    pub fn read(&self, path: &Path) -> Result<AccessToken, TokenError> {
        let lock = || self.files.lock().unwrap_or_else(|e| e.into_inner());
        // Taken before the metadata: a change after it makes the stamp differ.
        let started = SystemTime::now();
        // Symbolic links followed, as `fsread` does; anything but a regular file is left
        // to `read_token_file` to refuse.
        let stamp = std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| Stamp::of(&m));
        if let Some(stamp) = stamp
            && let Some(c) = lock().get(path)
            && c.stamp == stamp
        {
            return Ok(c.token.clone());
        }
        // The stamp was taken before the read: if the file changes in between, the next
        // stamp differs from the kept one and the file is read again.
        let token = read_token_file(path);
        #[cfg(test)]
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut files = lock();
        match (&token, stamp) {
            (Ok(t), Some(stamp))
                if stamp
                    .changed_at()
                    .is_some_and(|at| at + self.settle <= started) =>
            {
                if files.len() >= MAX_FILES && !files.contains_key(path) {
                    files.clear();
                }
                files.insert(
                    path.to_owned(),
                    Cached {
                        stamp,
                        token: t.clone(),
                    },
                );
            }
            _ => {
                files.remove(path);
            }
        }
        token
    }

    /// [`TokenFileCache::read`] on tokio's blocking pool.
    pub async fn read_async(&self, path: &Path) -> Result<AccessToken, TokenError> {
        let this = self.clone();
        let owned = path.to_owned();
        tokio::task::spawn_blocking(move || this.read(&owned))
            .await
            .unwrap_or_else(|e| {
                Err(TokenError::TokenFile {
                    path: path.display().to_string(),
                    detail: format!("reader task failed: {e}"),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn reads_trimmed_value_and_jwt_exp_and_sees_rewrites() {
        let path = std::env::temp_dir().join(format!("moe-tokenfile-{}", std::process::id()));
        std::fs::write(&path, "  opaque-token \n").unwrap();
        let t = read_token_file(&path).unwrap();
        assert_eq!(t.value.expose(), "opaque-token");
        assert_eq!(t.expires_at, None);
        let payload = URL_SAFE_NO_PAD.encode(r#"{"exp":2000000000,"aud":"x"}"#);
        std::fs::write(&path, format!("eyJhbGciOiJub25lIn0.{payload}.sig\n")).unwrap();
        let t = read_token_file(&path).unwrap();
        assert_eq!(
            t.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        std::fs::write(&path, "\n").unwrap();
        let e = read_token_file(&path).unwrap_err();
        assert!(matches!(e, TokenError::TokenFile { .. }));
        std::fs::remove_file(&path).unwrap();
        assert!(read_token_file(&path).is_err());
    }

    fn reads(cache: &TokenFileCache) -> usize {
        cache.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn the_cache_reads_a_still_file_once_and_again_after_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // Trusted at once: every change below must be seen by its metadata alone.
        let cache = TokenFileCache::with_settle(Duration::ZERO);
        std::fs::write(&path, "first-token\n").unwrap();
        assert_eq!(cache.read(&path).unwrap().value.expose(), "first-token");
        assert_eq!(cache.read(&path).unwrap().value.expose(), "first-token");
        assert_eq!(reads(&cache), 1, "an unchanged file is not read again");
        // Rewritten in place, longer.
        std::fs::write(&path, "second-token-longer\n").unwrap();
        assert_eq!(
            cache.read(&path).unwrap().value.expose(),
            "second-token-longer"
        );
        assert_eq!(reads(&cache), 2);
        // Replaced by a rename, as rotating tools and Kubernetes' symlink swap do: the
        // same length, another inode.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "third--token-longer\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(
            cache.read(&path).unwrap().value.expose(),
            "third--token-longer"
        );
        // A symbolic link moved to another file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(
            cache.read(&link).unwrap().value.expose(),
            "third--token-longer"
        );
        let other = dir.path().join("other");
        std::fs::write(&other, "fourth-token\n").unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert_eq!(cache.read(&link).unwrap().value.expose(), "fourth-token");
        // Gone, then emptied: errors, never the remembered value.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            cache.read(&path),
            Err(TokenError::TokenFile { .. })
        ));
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            cache.read(&path),
            Err(TokenError::TokenFile { .. })
        ));
        std::fs::write(&path, "fifth-token\n").unwrap();
        assert_eq!(cache.read(&path).unwrap().value.expose(), "fifth-token");
    }

    #[test]
    fn a_file_just_written_is_read_again_even_with_the_same_metadata_size() {
        // With the service's settle time, a file changed moments ago is never trusted: a
        // rewrite of the same length within one clock tick would keep every time stamp.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let cache = TokenFileCache::default();
        std::fs::write(&path, "aaaa-token\n").unwrap();
        assert_eq!(cache.read(&path).unwrap().value.expose(), "aaaa-token");
        std::fs::write(&path, "bbbb-token\n").unwrap();
        assert_eq!(cache.read(&path).unwrap().value.expose(), "bbbb-token");
        assert_eq!(reads(&cache), 2);
    }

    #[test]
    fn the_cache_keeps_the_refusals_of_non_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TokenFileCache::with_settle(Duration::ZERO);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = cache.read(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO (named pipe), not a regular file"), "{e}");
        let e = cache.read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory, not a regular file"), "{e}");
        // A cached file swapped for a FIFO is refused, not served from memory.
        let path = dir.path().join("token");
        std::fs::write(&path, "cached-token\n").unwrap();
        assert!(cache.read(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(&fifo, &path).unwrap();
        let e = cache.read(&path).unwrap_err().to_string();
        assert!(e.contains("a FIFO (named pipe), not a regular file"), "{e}");
        // Over the cap.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![b'a'; 64 * 1024 + 1]).unwrap();
        let e = cache.read(&path).unwrap_err().to_string();
        assert!(e.contains("larger than 64 KiB"), "{e}");
    }
}
