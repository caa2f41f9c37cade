//! Per-shard append-only segmented log.
//!
//! The journal is domain-free: it knows framing (tag, length, CRCs), never what a record means.
//! The schema lives with the crate that appends (the shards' `record` module) and reaches the
//! journal through [`Encode`]; recovery hands back [`RawRecord`]s (tag + body) for it to decode.
//!
//! * [`frame`]: one record's on-disk framing (magic, tag, length, CRC32C of body and header).
//! * [`Journal`]: the narrow, synchronous, IO-free interface the shard state machine appends
//!   through. An append only buffers; durability is reported later (group commit).
//! * [`recovery`]: reads segments at start-up, truncates a torn tail, skips damaged records,
//!   and says why in a report.
//! * `log` (feature `glommio`): the glommio-backed writer: one `fdatasync` per batch of appends, segment rotation
//!   with a directory fsync, poisoning on an fsync error.
//! * [`sim`]: the simulated journal: segment bytes in memory, crashes that tear or flip
//!   unsynced bytes, recovered by the real scan.
//! * [`segment`]: segment file naming, the segment file header, listing.
//!
//! Start-up sequence of a shard: [`recovery::recover`] the directory (blocking, before
//! serving), replay [`recovery::Recovery::records`], then `log::Log::open` with
//! [`recovery::Recovery::next_segment`] and append through [`Journal`] while a task runs
//! `log::Log::commit` in a loop.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blob;
pub mod frame;
#[cfg(feature = "glommio")]
pub mod log;
pub mod recovery;
pub mod segment;
pub mod sim;

use bytes::Bytes;

pub use frame::FrameError;
#[cfg(feature = "glommio")]
pub use log::{CommitStats, Log, LogConfig, LogError};
pub use recovery::{
    recover, recover_bytes, recover_with, Damage, Recovery, RecoveryError, RecoveryOptions,
    RecoveryReport,
};
pub use sim::{CrashMode, SimConfig, SimJournal};

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
    /// Byte offset of the record's header in its segment file: what
    /// [`SimJournal::read_record`] and `Log::read_record` take back. A `u32` is enough because
    /// a record starts inside its segment and a segment is at most `segment_bytes_max` bytes,
    /// which the log refuses above [`SEGMENT_OFFSET_MAX`] (4 GiB − 1).
    pub offset: u32,
}

/// The largest `segment_bytes_max` a log accepts: record offsets are stored as `u32`.
pub const SEGMENT_OFFSET_MAX: u64 = u32::MAX as u64;

/// Why reading one record back from a segment failed. Typed (and `Clone`, `Eq`) so the shard
/// state machine can be handed it in an event and count it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The segment does not exist (deleted, never created, or dropped by the simulator's
    /// `forget_durable`).
    #[error("segment {segment} is not there")]
    NoSegment {
        /// The segment asked for.
        segment: SegmentId,
    },
    /// The bytes at the offset are not a sound record (out of range, torn, CRC mismatch).
    #[error("no sound record at segment {segment} offset {offset}: {error}")]
    Frame {
        /// The segment.
        segment: SegmentId,
        /// The offset asked for.
        offset: u32,
        /// What the framing check found.
        error: FrameError,
    },
    /// Opening or reading the file failed.
    #[error("reading segment {segment} at offset {offset} failed: {message}")]
    Io {
        /// The segment.
        segment: SegmentId,
        /// The offset asked for.
        offset: u32,
        /// The OS error kind.
        kind: std::io::ErrorKind,
        /// The error, as text.
        message: String,
    },
}

/// A record the journal can frame: a tag byte and a body the journal never looks into.
///
/// Implemented by the schema owner (the shards' `Record`). `encode_body` must append exactly
/// `body_len()` bytes (checked by [`frame::encode`]), and `body_len()` must not exceed
/// [`frame::MAX_BODY_LEN`].
pub trait Encode {
    /// The record kind's tag byte, stored in the frame header.
    fn tag(&self) -> u8;
    /// Length of the body `encode_body` writes, in bytes.
    fn body_len(&self) -> usize;
    /// Appends the body to `out`.
    fn encode_body(&self, out: &mut Vec<u8>);
}

/// A framed record as recovery found it: framing and body CRC checked, meaning not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// The segment it is in.
    pub segment: SegmentId,
    /// Byte offset of its header in the segment file.
    pub offset: u64,
    /// Its tag byte.
    pub tag: u8,
    /// Its body (a slice of the segment as read: no copy).
    pub body: Bytes,
}

impl Encode for RawRecord {
    fn tag(&self) -> u8 {
        self.tag
    }
    fn body_len(&self) -> usize {
        self.body.len()
    }
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.body);
    }
}

/// What the shard state machine appends through. Implementations only buffer: no IO happens
/// inside `append`, so the shard stays deterministic.
pub trait Journal {
    /// Buffers `rec` for the next group commit and says where it will land.
    fn append(&mut self, rec: &dyn Encode) -> Lsn;
    /// Asks for a sealed segment to be deleted once it holds nothing live. Never the active one.
    fn delete_segment(&mut self, segment: SegmentId);
    /// The segment new appends go to.
    fn active_segment(&self) -> SegmentId;
}
