//! The one way to read a file the configuration names: regular files only, size-capped,
//! and never blocking on a FIFO.
//!
//! Every file a config or the web config points at (client secrets, token files,
//! certificates and keys, CA bundles, the config files themselves) is read through
//! [`read`]. A FIFO, a device (`/dev/zero`), a directory or a socket is refused with an
//! error naming the file; the open itself uses `O_NONBLOCK`, so a FIFO without a writer
//! cannot hang the open, and the file type is checked on the opened descriptor. At most
//! [`FileKind::cap`] bytes are read, so a huge or endless file cannot eat memory.
//!
//! From async code use [`read_async`], which reads on the blocking pool: a file on a slow
//! disk or network mount never stalls the runtime's worker threads.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a file holds, which decides how large it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The exporter's YAML config: 16 MiB (30,000 mailboxes with their servers spelled out
    /// fit in a quarter of that).
    Config,
    /// The web config (`--web.config.file`): 1 MiB.
    WebConfig,
    /// A client secret, or a refresh token to import: 64 KiB (real ones are under 1 KiB).
    Secret,
    /// An access token file (`grant: token_file`): 64 KiB (a JWT with many claims is a
    /// few KiB).
    Token,
    /// A PEM file: certificate, chain, private key or CA bundle: 1 MiB (a system's whole CA
    /// bundle is about 200 KiB).
    Pem,
    /// A Google service account key (JSON): 64 KiB (Google's are about 2.3 KiB).
    ServiceAccountKey,
    /// A client assertion file (workload identity federation): 64 KiB (a Kubernetes
    /// projected service account token is 1–2 KiB).
    ClientAssertion,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl FileKind {
    /// The most bytes a file of this kind may hold.
    pub const fn cap(self) -> u64 {
        match self {
            FileKind::Config => 16 * MIB,
            FileKind::WebConfig => MIB,
            FileKind::Secret
            | FileKind::Token
            | FileKind::ServiceAccountKey
            | FileKind::ClientAssertion => 64 * KIB,
            FileKind::Pem => MIB,
        }
    }

    /// How errors name the kind.
    pub const fn what(self) -> &'static str {
        match self {
            FileKind::Config => "config file",
            FileKind::WebConfig => "web config file",
            FileKind::Secret => "secret file",
            FileKind::Token => "token file",
            FileKind::Pem => "PEM file",
            FileKind::ServiceAccountKey => "service account key file",
            FileKind::ClientAssertion => "client assertion file",
        }
    }
}

/// Why a file was not read. The text names the file and never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Missing, unreadable (permissions), or failing mid-read.
    #[error("cannot read {}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// A FIFO, device, directory or socket: reading it could block forever or never end.
    #[error("{} is {what}, not a regular file", path.display())]
    NotRegular { path: PathBuf, what: &'static str },
    /// Larger than the kind's cap.
    #[error("{} is larger than {} KiB, the limit for a {}", path.display(), kind.cap() / KIB, kind.what())]
    TooLarge { path: PathBuf, kind: FileKind },
}

impl ReadError {
    /// The message without the file's name, for errors that name the file themselves
    /// (`token file /run/t: a FIFO (named pipe), not a regular file`).
    pub fn reason(&self) -> String {
        match self {
            ReadError::Io { message, .. } => message.clone(),
            ReadError::NotRegular { what, .. } => format!("{what}, not a regular file"),
            ReadError::TooLarge { kind, .. } => format!(
                "larger than {} KiB, the limit for a {}",
                kind.cap() / KIB,
                kind.what()
            ),
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> ReadError {
    // A socket cannot be opened at all (ENXIO): say what it is rather than the errno.
    if let Ok(m) = std::fs::metadata(path)
        && let Some(what) = not_regular(&m.file_type())
    {
        return ReadError::NotRegular {
            path: path.to_owned(),
            what,
        };
    }
    ReadError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// `None` for a regular file, else what it is, in words.
fn not_regular(t: &std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Reads the regular file at `path` (symbolic links followed, as Kubernetes mounts
/// secrets), at most `kind.cap()` bytes. Blocking: call [`read_async`] from async code.
///
/// # Errors
/// [`ReadError::NotRegular`] for a FIFO, device, directory or socket (checked before the
/// open and again on the opened descriptor), [`ReadError::TooLarge`] past the cap,
/// [`ReadError::Io`] otherwise.
pub fn read(path: &Path, kind: FileKind) -> Result<Vec<u8>, ReadError> {
    // Before opening: opening some devices has effects of its own.
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if let Some(what) = not_regular(&meta.file_type()) {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            what,
        });
    }
    // O_NONBLOCK: if the path was swapped for a FIFO since, the open still returns at once
    // (reads of a regular file ignore the flag).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    read_open(path, file, kind)
}

fn read_open(path: &Path, file: File, kind: FileKind) -> Result<Vec<u8>, ReadError> {
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if let Some(what) = not_regular(&meta.file_type()) {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            what,
        });
    }
    let cap = kind.cap();
    let too_large = || ReadError::TooLarge {
        path: path.to_owned(),
        kind,
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // One byte past the cap tells a file that grew since the stat.
    file.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(path, e))?;
    if buf.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(buf)
}

/// [`read`] on tokio's blocking pool.
pub async fn read_async(path: &Path, kind: FileKind) -> Result<Vec<u8>, ReadError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read(&owned, kind))
        .await
        .unwrap_or_else(|e| {
            Err(ReadError::Io {
                path: path.to_owned(),
                message: format!("reader task failed: {e}"),
            })
        })
}

/// A secret or token file's value: [`read`], UTF-8, surrounding whitespace trimmed,
/// not empty.
pub fn read_trimmed(path: &Path, kind: FileKind) -> Result<String, ReadError> {
    let bytes = read(path, kind)?;
    let text = String::from_utf8(bytes).map_err(|_| ReadError::Io {
        path: path.to_owned(),
        message: "not UTF-8 text".into(),
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ReadError::Io {
            path: path.to_owned(),
            message: "the file is empty".into(),
        });
    }
    Ok(value.to_owned())
}

/// [`read_trimmed`] on tokio's blocking pool.
pub async fn read_trimmed_async(path: &Path, kind: FileKind) -> Result<String, ReadError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_trimmed(&owned, kind))
        .await
        .unwrap_or_else(|e| {
            Err(ReadError::Io {
                path: path.to_owned(),
                message: format!("reader task failed: {e}"),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_whole_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, vec![b'a'; 64 * 1024]).unwrap();
        assert_eq!(read(&p, FileKind::Secret).unwrap().len(), 64 * 1024);
        std::fs::write(&p, vec![b'a'; 64 * 1024 + 1]).unwrap();
        let e = read(&p, FileKind::Secret).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is larger than 64 KiB, the limit for a secret file",
                p.display()
            )
        );
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_blocking() {
        let e = read(Path::new("/dev/zero"), FileKind::Pem).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero is a character device, not a regular file"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path(), FileKind::Secret).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is a directory, not a regular file"),
            "{e}"
        );
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // No writer ever opens it: a blocking open would never return.
        let e = read(&fifo, FileKind::Secret).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is a FIFO (named pipe), not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn trimmed_values_must_not_be_empty_or_binary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "  value \n").unwrap();
        assert_eq!(read_trimmed(&p, FileKind::Secret).unwrap(), "value");
        std::fs::write(&p, " \n").unwrap();
        assert!(
            read_trimmed(&p, FileKind::Secret)
                .unwrap_err()
                .to_string()
                .ends_with("the file is empty")
        );
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(
            read_trimmed(&p, FileKind::Secret)
                .unwrap_err()
                .to_string()
                .ends_with("not UTF-8 text")
        );
    }
}
