//! mail-oauth-exporter: real SASL XOAUTH2 logins over IMAP, POP3 and SMTP, timed,
//! classified into the contract's reasons, and exported for Prometheus.
#![forbid(unsafe_code)]

pub mod emulator;
pub mod reason;
pub mod secret;

pub use reason::{Reason, Stage};
pub use secret::Secret;
