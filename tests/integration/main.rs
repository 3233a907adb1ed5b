//! Integration tests, one binary (as ripgrep does): real sockets, emulated servers on
//! 127.0.0.1:0, the real `mail-oauth-exporter` binary, curl as an independent client.

mod bad_config;
mod browser;
mod cli;
mod crash;
mod credentials;
mod curl;
mod demo;
mod deploy;
mod docs;
mod dovecot;
mod emulator;
mod graph;
mod hostile;
mod image;
mod listener;
mod oauth;
mod probe;
mod prometheus;
mod proptests;
mod secrets;
mod token;
mod web;
