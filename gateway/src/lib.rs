//! The Switchboard daemon as a library (the `switchboard` binary is a thin `main` over it).

pub mod config;
pub mod conn;
pub mod datadir;
pub mod metrics;
pub mod notify;
pub mod runtime;
pub mod sidecar;
