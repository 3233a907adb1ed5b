//! The small vocabulary shared by config, tokens, probes and metrics: protocol, TLS mode, SASL mechanism.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A mail protocol we log in to. Its label is the contract's `protocol` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Pop3,
    Smtp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "imap" => Ok(Protocol::Imap),
            "pop3" => Ok(Protocol::Pop3),
            "smtp" => Ok(Protocol::Smtp),
            other => Err(format!(
                "unknown protocol `{other}` (expected imap, pop3 or smtp)"
            )),
        }
    }
}

/// How TLS is reached: from the first byte, or by upgrading a plain connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
        }
    }
}

/// The SASL mechanism used to present the bearer token. There is no fallback between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    #[default]
    Xoauth2,
    Oauthbearer,
}

impl Mechanism {
    /// The name as servers advertise it (`AUTH=XOAUTH2`, `SASL XOAUTH2`, `AUTH XOAUTH2`).
    pub fn sasl_name(self) -> &'static str {
        match self {
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::Oauthbearer => "OAUTHBEARER",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Xoauth2 => "xoauth2",
            Mechanism::Oauthbearer => "oauthbearer",
        }
    }
}
