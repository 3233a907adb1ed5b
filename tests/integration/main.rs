//! Integration tests over real sockets: one binary, one module per area.

mod curl;
mod emulator;
