//! Switchboard's capacity tooling.
//!
//! * Criterion benches live in `benches/` (frames, Noise, log group commit, shard routing,
//!   mailbox drain); [`harness`] is the in-memory shard driver they share.
//! * `switchboard-flood` (in `src/bin/`) is the connection and message load generator. Its
//!   logic is here: [`controller`] (command line, daemon, workers, the run and its report),
//!   `phases` (one module per phase: ramp, idle, messaging, storm, queue, restart, drain, and
//!   provisioning: what the controller asks the workers and which figures it records),
//!   [`engine`] (the epoll event loop that owns a worker's connections and speaks the protocol;
//!   its steps are likewise one module per phase), [`phase`] (commands and reports between the
//!   controller and its workers), [`daemon`] (spawning and querying `switchboard`), [`sysmem`]
//!   (RSS, sockstat, slab readings), [`stats`] (latency histograms), [`accounts`] (the
//!   provisioned-accounts cache), [`sys`] (clock, epoll, pinning, limits).

pub mod accounts;
pub mod controller;
pub mod daemon;
pub mod engine;
pub mod harness;
pub mod phase;
mod phases;
pub mod stats;
pub mod sys;
pub mod sysmem;
