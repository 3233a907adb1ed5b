//! `Secret`: a string that never prints itself (tokens, client secrets, SASL blobs).
//!
//! `Debug` and `Display` show `<redacted>`; the value is reached only through
//! [`Secret::expose`], so every place that sends a secret over the wire is greppable.
//! Text from outside that may repeat a secret (a server's reply, a token endpoint's body)
//! is blanked by `crate::redact::Redactor`, which shows it as [`REDACTED`] too.

use std::fmt;

/// What every redacted value is shown as, in transcripts, logs and status pages.
pub const REDACTED: &str = "<redacted>";

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value: call only where it must go on the wire or to disk.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("eyJ0eXAiOiJKV1Qi.very.secret");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{:?}", Some(&s)), format!("Some({REDACTED})"));
        assert_eq!(s.expose(), "eyJ0eXAiOiJKV1Qi.very.secret");
    }
}
