//! Start-up recovery: read every segment, repair torn tails, skip damaged records, report.
//!
//! Runs once per shard before it serves, with plain blocking `std::fs` (there is nothing else
//! to do on that core meanwhile). What it does with each kind of damage:
//!
//! * **Segment file header unreadable** (bad magic, CRC, version, id differing from the file
//!   name, shorter than a header): the whole segment is skipped and reported in
//!   [`RecoveryReport::skipped`]. The file is left alone (an operator may want it).
//! * **Record header unusable** ([`FrameError::skip_len`] is `None`: incomplete record,
//!   bad magic, bad header CRC): the record's length cannot be trusted, so nothing after it in
//!   that segment can be framed. The segment is physically truncated to the end of the last
//!   good record (`ftruncate` + `fsync`) and that is reported in
//!   [`RecoveryReport::truncated`]. At the end of the last segment this is the ordinary torn
//!   tail of a commit that never completed.
//! * **Record body damaged, header sound** (bad body CRC): just that record is skipped and
//!   reported in [`RecoveryReport::skipped`]; reading continues with the next record.
//!
//! What a body means is not recovery's business: every record whose framing and CRCs check out
//! is returned as a [`RawRecord`] (tag + body), and the schema owner decodes it (and reports
//! and counts bodies it cannot decode: unknown tag, wrong shape).
//!
//! Every such event is also logged with `tracing::warn!`. Recovery never panics on any file
//! content; it fails only on I/O errors (and then says which file).

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::frame::{decode_frame, FrameError};
use crate::segment::{
    create_dir_durable, decode_segment_header, list_segments, SEGMENT_HEADER_LEN,
};
use crate::{RawRecord, SegmentId};

/// What recovery found.
#[derive(Debug)]
pub struct Recovery {
    /// Segments whose header was sound, in id order (their records are in `records`).
    /// Segments skipped whole are not listed here (they are in `report.skipped`).
    pub segments: Vec<SegmentId>,
    /// Every soundly framed record, in log order (segment ascending, then offset).
    pub records: Vec<RawRecord>,
    /// Counters and every piece of damage found.
    pub report: RecoveryReport,
    /// The id the writer must create next: one past the highest segment file present
    /// (including skipped ones, so no file is ever reused), or 1 if there are none.
    pub next_segment: SegmentId,
}

/// Counters and damage found by [`recover`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files read (including ones skipped for a bad header).
    pub segments_read: usize,
    /// Soundly framed records returned.
    pub records_read: usize,
    /// Bytes read from segment files (their sizes before any truncation).
    pub bytes_read: u64,
    /// Segments truncated at a torn or damaged record header; `offset` is the new length.
    pub truncated: Vec<Damage>,
    /// Records skipped for a damaged body (`offset` = where the record starts), and segments
    /// skipped whole for a bad file header (`offset` = 0).
    pub skipped: Vec<Damage>,
}

impl RecoveryReport {
    /// Whether recovery found no damage at all.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty() && self.skipped.is_empty()
    }
}

/// One piece of damage found by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment it is in.
    pub segment: SegmentId,
    /// Byte offset in the segment file (see the [`RecoveryReport`] field it is in).
    pub offset: u64,
    /// Human-readable reason.
    pub reason: String,
}

/// Why recovery failed (I/O only: file content never makes it fail).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// An I/O operation failed.
    #[error("recovery: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A segment file with id `u32::MAX` exists, so there is no id left for the writer.
    #[error("segment ids exhausted (segment {0} exists)")]
    SegmentIdsExhausted(SegmentId),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RecoveryError + 'a {
    move |source| RecoveryError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Recovers the log in `dir` (created if missing). See the [module docs](self).
pub fn recover(dir: &Path) -> Result<Recovery, RecoveryError> {
    create_dir_durable(dir).map_err(io_err("creating directory", dir))?;
    let listed = list_segments(dir).map_err(io_err("listing", dir))?;
    let mut out = Recovery {
        segments: Vec::with_capacity(listed.len()),
        records: Vec::new(),
        report: RecoveryReport::default(),
        next_segment: 1,
    };
    for (id, path) in &listed {
        recover_segment(*id, path, &mut out)?;
    }
    if let Some((last, _)) = listed.last() {
        out.next_segment = last
            .checked_add(1)
            .ok_or(RecoveryError::SegmentIdsExhausted(*last))?;
    }
    Ok(out)
}

fn recover_segment(id: SegmentId, path: &Path, out: &mut Recovery) -> Result<(), RecoveryError> {
    let buf = Bytes::from(std::fs::read(path).map_err(io_err("reading", path))?);
    out.report.segments_read += 1;
    out.report.bytes_read += buf.len() as u64;

    let header = match decode_segment_header(&buf) {
        Ok(h) if h.segment == id => h,
        Ok(h) => {
            let reason = format!(
                "segment header names segment {} but the file is {}; segment skipped",
                h.segment,
                path.display()
            );
            skip_segment(id, reason, out);
            return Ok(());
        }
        Err(e) => {
            let reason = format!("{e}; segment skipped ({} bytes)", buf.len());
            skip_segment(id, reason, out);
            return Ok(());
        }
    };
    debug_assert_eq!(header.segment, id);
    out.segments.push(id);

    let mut pos = SEGMENT_HEADER_LEN;
    while let Some(rest) = buf.get(pos..).filter(|r| !r.is_empty()) {
        match decode_frame(rest) {
            Ok(frame) => {
                out.records.push(RawRecord {
                    segment: id,
                    offset: pos as u64,
                    tag: frame.tag,
                    body: buf.slice_ref(frame.body),
                });
                out.report.records_read += 1;
                pos += frame.len;
            }
            Err(e) => match e.skip_len() {
                Some(n) => {
                    let reason = format!("{e}; record skipped");
                    tracing::warn!(segment = id, offset = pos, %reason, "damaged record");
                    out.report.skipped.push(Damage {
                        segment: id,
                        offset: pos as u64,
                        reason,
                    });
                    pos += n;
                }
                None => {
                    truncate(id, path, pos, buf.len(), &e, out)?;
                    break;
                }
            },
        }
    }
    Ok(())
}

fn skip_segment(id: SegmentId, reason: String, out: &mut Recovery) {
    tracing::warn!(segment = id, %reason, "unreadable segment");
    out.report.skipped.push(Damage {
        segment: id,
        offset: 0,
        reason,
    });
}

fn truncate(
    id: SegmentId,
    path: &Path,
    at: usize,
    len: usize,
    e: &FrameError,
    out: &mut Recovery,
) -> Result<(), RecoveryError> {
    let reason = format!(
        "{e}; truncated segment from {len} to {at} bytes ({} bytes dropped)",
        len - at
    );
    tracing::warn!(segment = id, offset = at, %reason, "torn or damaged segment tail");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening for truncation", path))?;
    file.set_len(at as u64)
        .map_err(io_err("truncating", path))?;
    file.sync_all()
        .map_err(io_err("fsync after truncation", path))?;
    out.report.truncated.push(Damage {
        segment: id,
        offset: at as u64,
        reason,
    });
    Ok(())
}
