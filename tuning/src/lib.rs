//! Host tuning for Switchboard gateway boxes.
//!
//! This crate ships two things:
//!
//! * static tuning profiles next to it (`tuning/sysctl/99-switchboard.conf`,
//!   `tuning/limits/switchboard.conf`, `tuning/systemd/switchboard.service`), and
//! * the `switchboard-preflight` binary, built from this library, which reads the
//!   live host and computes how many persistent connections a gateway process
//!   could hold *as the host is configured right now*, which limit binds first,
//!   and the exact change needed to reach a target.
//!
//! The library is split so the arithmetic is testable without a host:
//!
//! * [`parse`]: pure parsers for the `/proc` formats involved,
//! * [`host`]: reads the live host into a [`host::HostReadings`] (the only
//!   module that touches the system),
//! * [`capacity`]: pure functions from readings + [`capacity::Params`] to a
//!   [`capacity::Report`],
//! * [`render`]: the human-readable table.
//!
//! Exit codes of `switchboard-preflight`: `0` the target is reachable as
//! configured, `1` it is not (some factor allows fewer connections than the
//! target, or a hard requirement such as io_uring fails), `2` the host could not
//! be read or the arguments were invalid.

#![deny(missing_docs)]

pub mod capacity;
pub mod host;
pub mod parse;
pub mod render;

pub use capacity::{evaluate, Params, Report};
pub use host::{read_host, HostReadings};

/// Errors raised while reading the host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file under `/proc` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that failed.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content was not in the expected format.
    #[error("cannot parse {what}: {input:?}")]
    Parse {
        /// What was being parsed (usually a path).
        what: String,
        /// The offending text (trimmed to a reasonable length).
        input: String,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call name, e.g. `getrlimit(RLIMIT_NOFILE)`.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Convenience alias for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
