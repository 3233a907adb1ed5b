//! The `mail-oauth-exporter` binary: argument parsing, tracing, exit codes.
#![forbid(unsafe_code)]

fn main() {}
