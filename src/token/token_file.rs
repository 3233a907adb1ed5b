//! The `token_file` grant: another tool keeps an access token fresh in a file; we read it.
//!
//! The file is read on every use (it is tiny), so a rewrite is seen at once. Its expiry is
//! known only when the token is a JWT with `exp` (read without verifying: we are not the
//! audience, the mail server checks it).

use super::assertion::unverified_claims;
use super::credential::AccessToken;
use super::error::TokenError;
use crate::fsread::{self, FileKind};
use crate::secret::Secret;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// Reads the token file at `path` (blocking; capped at 64 KiB, never a FIFO or device:
/// see `crate::fsread`). [`read_token_file_async`] is the same off the runtime.
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

/// [`read_token_file`] on tokio's blocking pool.
pub async fn read_token_file_async(path: &Path) -> Result<AccessToken, TokenError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_token_file(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(TokenError::TokenFile {
                path: path.display().to_string(),
                detail: format!("reader task failed: {e}"),
            })
        })
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
}
