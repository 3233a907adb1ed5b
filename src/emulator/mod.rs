//! Emulated servers for tests and `demo`: the Microsoft-style token endpoint lives here.

pub mod token_endpoint;
