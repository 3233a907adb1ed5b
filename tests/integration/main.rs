//! Integration tests, one binary (as ripgrep does): real sockets, emulated servers on
//! 127.0.0.1:0, the real `mail-oauth-exporter` binary.

mod cli;
mod demo;
mod probe;
mod token;
