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

pub mod record;

pub use record::Record;

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
