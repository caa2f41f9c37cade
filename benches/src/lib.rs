//! Switchboard's capacity tooling.
//!
//! * Criterion benches live in `benches/` (frames, Noise, log group commit, shard routing,
//!   mailbox drain); [`harness`] is the in-memory shard driver they share.
//! * `switchboard-flood` (in `src/bin/`) is the connection and message load generator; its
//!   logic is in the modules below: [`engine`] (the epoll event loop that owns connections),
//!   [`conn`] (one client connection's protocol state), [`phase`] (commands and reports that
//!   travel between the controller and its workers), [`controller`] (phases, workers, daemon,
//!   measurements, report), [`sysmem`] (RSS, sockstat, slab readings), [`stats`] (latency
//!   histograms), [`accounts`] (the provisioned-accounts cache), [`daemon`] (spawning and
//!   querying `switchboard`).

pub mod harness;
