//! The CLI's commands as library functions: they take parsed arguments and a writer, and
//! return what `main` turns into an exit code.

pub mod check;
pub mod demo;
pub mod login;
pub mod probe;
pub mod run;

use crate::config::ConfigError;
use crate::probe::tls::TlsSetupError;
use thiserror::Error;

/// A command that could not run at all (exit code 2), as opposed to a failed probe (1).
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}
