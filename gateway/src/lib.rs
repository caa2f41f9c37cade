//! The Switchboard daemon as a library (the `switchboard` binary is a thin `main` over it).
//!
//! Layering (no module imports one above it): `config`, `metrics`, `notify`, `sidecar`,
//! `datadir`, `preauth`, `handshake` and `connection` know nothing of a shard's runtime;
//! `mesh` and `conn_table` build on `connection`; `ctx` (a shard's context) on those;
//! `timer_wheel` and `uring` (the ring connection core) sit beside `conn_table`;
//! `conn_task` and `accept` drive connections through `ctx`; `executor` runs a shard's tasks;
//! `runtime` runs the process; `admin` serves the metrics from its own thread.

pub mod accept;
pub mod admin;
pub mod config;
pub mod conn_table;
pub mod conn_task;
pub mod connection;
pub mod ctx;
pub mod datadir;
pub mod executor;
pub mod handshake;
mod hyper_io;
pub mod media;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod preauth;
pub mod runtime;
pub mod sidecar;
pub mod timer_wheel;
pub mod uring;
