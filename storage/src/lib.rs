//! Per-shard append-only segmented log.
//!
//! * [`record`]: the records a shard persists and their on-disk framing (length + CRC32C).
//! * [`Journal`]: the narrow, synchronous, IO-free interface the shard state machine appends
//!   through. An append only buffers; durability is reported later (group commit).
//! * [`recovery`]: reads segments at start-up, truncates a torn tail, skips damaged records,
//!   and says why in a report.
//! * [`log`]: the glommio-backed writer: one `fdatasync` per batch of appends, segment rotation
//!   with a directory fsync, poisoning on an fsync error.
//! * [`mem`]: an in-memory journal with explicit durability and crash, for the simulator.
//! * [`segment`]: segment file naming, the segment file header, listing.
//!
//! Start-up sequence of a shard: [`recovery::recover`] the directory (blocking, before
//! serving), replay [`recovery::Recovery::records`], then [`log::Log::open`] with
//! [`recovery::Recovery::next_segment`] and append through [`Journal`] while a task runs
//! [`log::Log::commit`] in a loop.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]
#![warn(missing_docs)]

pub mod log;
pub mod mem;
pub mod record;
pub mod recovery;
pub mod segment;

pub use log::{CommitStats, Log, LogConfig, LogError};
pub use mem::{MemJournal, MemJournalConfig};
pub use record::{Record, RecordError};
pub use recovery::{recover, Damage, Recovery, RecoveryError, RecoveryReport};

/// A segment file's number (`seg-{id:010}.log`). Segments are created in increasing order.
pub type SegmentId = u32;

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn {
    /// Monotonic id of the append within this process (1, 2, 3, …). Durability is reported as
    /// "every append with id <= N is durable".
    pub append_id: u64,
    /// The segment the record is in.
    pub segment: SegmentId,
}

/// What the shard state machine appends through. Implementations only buffer: no IO happens
/// inside `append`, so the shard stays deterministic.
pub trait Journal {
    /// Buffers `rec` for the next group commit and says where it will land.
    fn append(&mut self, rec: &Record) -> Lsn;
    /// Asks for a sealed segment to be deleted once it holds nothing live. Never the active one.
    fn delete_segment(&mut self, segment: SegmentId);
    /// The segment new appends go to.
    fn active_segment(&self) -> SegmentId;
}
