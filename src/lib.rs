//! mail-oauth-exporter: real SASL XOAUTH2 logins over IMAP, POP3 and SMTP, timed,
//! classified into the contract's reasons, and exported for Prometheus.
#![forbid(unsafe_code)]

pub mod classify;
pub mod command;
pub mod config;
pub mod emulator;
pub mod fsread;
pub mod graph;
pub mod history;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod protocol;
pub mod reason;
pub mod redact;
pub mod scheduler;
pub mod secret;
pub mod service;
pub mod shard;
pub mod status;
pub mod token;

pub use protocol::{Mechanism, Protocol, TlsMode};
pub use reason::{Reason, Stage};
pub use secret::Secret;

/// The source revision this binary was built from (`mail_oauth_build_info`).
pub const REVISION: &str = env!("MAIL_OAUTH_EXPORTER_REVISION");
