//! Start-up recovery: read every segment, repair torn tails, skip damaged records, report.
//!
//! Runs once per shard before it serves, with plain blocking `std::fs` (there is nothing else
//! to do on that core meanwhile). The scan itself works on bytes ([`recover_bytes`]), so the
//! simulated journal ([`crate::sim`]) runs exactly this code over what its crashes leave. What
//! it does with each kind of damage:
//!
//! * **Segment file header unreadable** (bad magic, CRC, version, id differing from the file
//!   name, shorter than a header): the whole segment is skipped and reported in
//!   [`RecoveryReport::skipped`]. The file is left alone (an operator may want it).
//! * **Torn tail**: the bytes from some offset to the end of a segment hold no sound record
//!   (an incomplete record, or garbage). That is what a commit interrupted by a crash leaves at
//!   the end of the newest segment (or of a segment it rotated away from). The segment is
//!   physically truncated there (`ftruncate` + `fsync`) and that is reported in
//!   [`RecoveryReport::truncated`].
//! * **Record header damaged before sound records** (bad magic or header CRC, and a sound
//!   record further on in the same segment, in any segment): the damaged record's length
//!   cannot be trusted, so recovery *resynchronises*: it scans forward byte by byte for the
//!   next offset where a record's header CRC and body CRC both check out (and the record after
//!   it, if any, frames soundly too), and carries on from there. The bytes jumped over are
//!   reported in [`RecoveryReport::resynced`] (offset and length) and nothing is truncated: one
//!   flipped bit costs the records it hit, not the rest of a 64 MiB segment.
//! * **Record body damaged, header sound** (bad body CRC): just that record is skipped and
//!   reported in [`RecoveryReport::skipped`]; reading continues with the next record.
//!
//! Keeping what follows damage is right for decay (the records after it were acknowledged),
//! and recovery cannot tell decay from a crash that persisted a commit's pages out of order
//! (then what follows was never acknowledged, and a client's resend of the lost record lands
//! after it: per-sender order breaks). Telling them apart needs commit boundaries in the log
//! or the shard treating records after a reported hole as unacknowledged; the simulator's
//! crashes stay within what recovery can repair (see [`crate::sim`]).
//! * **Segments missing from the middle** (files 1, 2 and 4 present: 3 is gone): the writer
//!   creates segments in id order and deletes them oldest-first, so a gap between the lowest
//!   and the highest readable segment is data lost outside the log's control (a file deleted or
//!   moved by hand, a partial restore). Recovery logs it at `ERROR` naming the ids, and
//!   refuses to start with [`RecoveryError::MissingSegments`] unless
//!   [`RecoveryOptions::accept_missing_segments`] is set; then it goes on without them and
//!   counts them in [`RecoveryReport::missing`]. Files are not changed before refusing.
//!   (Segments missing *below* the lowest present are the normal result of deletion; a lost
//!   *newest* segment cannot be told from one never written. An unreadable file counts as
//!   present; one below the lowest readable segment is debris the writer never knew, and the
//!   writer deleting past it does not make a gap.)
//!
//! What a body means is not recovery's business: every record whose framing and CRCs check out
//! is returned as a [`RawRecord`] (tag + body), and the schema owner decodes it (and reports
//! and counts bodies it cannot decode: unknown tag, wrong shape).
//!
//! Every such event is also logged with `tracing::warn!`. Recovery never panics on any file
//! content; it fails only on I/O errors (and then says which file).
//!
//! A limit of resynchronisation, stated plainly: CRCs detect accidents, not forgeries. A
//! message payload that happens to contain a well-framed record could be taken for one when
//! resynchronising inside the payload of a record whose header was damaged. Requiring the
//! following record to frame soundly too makes an accidental match vanishingly unlikely.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::frame::{decode_frame, FrameError, RECORD_MAGIC};
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
    /// Segments truncated at a torn tail; `offset` is the new length, `len` the bytes dropped.
    pub truncated: Vec<Damage>,
    /// Records skipped for a damaged body (`offset` = where the record starts, `len` its
    /// framed length), and segments skipped whole for a bad file header (`offset` = 0, `len`
    /// = the file's length).
    pub skipped: Vec<Damage>,
    /// Damaged record headers recovery resynchronised past: `offset` is where the damage
    /// starts, `len` how many bytes were jumped over to the next sound record.
    pub resynced: Vec<Damage>,
    /// Segment ids missing between the lowest and the highest present (only when
    /// [`RecoveryOptions::accept_missing_segments`] let recovery go on without them).
    pub missing: Vec<RangeInclusive<SegmentId>>,
    /// How many segment ids `missing` covers.
    pub segments_missing: u64,
}

impl RecoveryReport {
    /// Whether recovery found no damage at all.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty()
            && self.skipped.is_empty()
            && self.resynced.is_empty()
            && self.missing.is_empty()
    }
}

/// What recovery may accept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryOptions {
    /// Start even though segments are missing between the lowest and the highest present
    /// (their records are lost for good). Default `false`: recovery refuses with
    /// [`RecoveryError::MissingSegments`]. The gateway's `accept_segment_loss` sets it.
    pub accept_missing_segments: bool,
}

/// One piece of damage found by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment it is in.
    pub segment: SegmentId,
    /// Byte offset in the segment file (see the [`RecoveryReport`] field it is in).
    pub offset: u64,
    /// Bytes affected (dropped, skipped or jumped over; see the field it is in).
    pub len: u64,
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
    /// Segment files are missing between the lowest and the highest present: the records
    /// they held are lost (segments are only ever deleted oldest-first, so this is not the
    /// log's own doing). Refused unless [`RecoveryOptions::accept_missing_segments`].
    #[error(
        "{count} segment(s) missing from the middle of the log (present: {lowest}..={highest}; \
         missing: {}): their records are lost, most likely a file deleted or moved by hand or \
         a partial restore. Restore the missing files, or accept the loss and start without \
         them (RecoveryOptions::accept_missing_segments; gateway: accept_segment_loss = true)",
        format_ranges(missing)
    )]
    MissingSegments {
        /// The missing ids, as ranges.
        missing: Vec<RangeInclusive<SegmentId>>,
        /// How many ids that is.
        count: u64,
        /// Lowest segment id present.
        lowest: SegmentId,
        /// Highest segment id present.
        highest: SegmentId,
    },
}

/// `2, 5..=9, 12` for the ranges `2..=2, 5..=9, 12..=12`.
fn format_ranges(ranges: &[RangeInclusive<SegmentId>]) -> String {
    let mut s = String::new();
    for (i, r) in ranges.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = if r.start() == r.end() {
            write!(s, "{}", r.start())
        } else {
            write!(s, "{}..={}", r.start(), r.end())
        };
    }
    s
}

/// The ids missing between the lowest and highest of `ids` (sorted ascending), as ranges.
fn gaps(ids: &[SegmentId]) -> Vec<RangeInclusive<SegmentId>> {
    ids.windows(2)
        .filter_map(|w| match *w {
            [a, b] if b > a.saturating_add(1) => Some(a + 1..=b - 1),
            _ => None,
        })
        .collect()
}

/// How many ids `ranges` cover.
fn ids_in(ranges: &[RangeInclusive<SegmentId>]) -> u64 {
    ranges
        .iter()
        .map(|r| u64::from(*r.end()) - u64::from(*r.start()) + 1)
        .sum()
}

/// Checks the segment files `ids` (sorted ascending) for gaps between the lowest and the
/// highest `readable` one (unreadable files count as present: they are reported as skipped,
/// and one left below the readable ones is old debris the writer never knew, not a gap);
/// logs them at `ERROR`; refuses unless accepted.
fn check_missing(
    ids: &[SegmentId],
    readable: &[SegmentId],
    options: RecoveryOptions,
) -> Result<Vec<RangeInclusive<SegmentId>>, RecoveryError> {
    let (Some(&lowest), Some(&highest)) = (readable.first(), readable.last()) else {
        return Ok(Vec::new());
    };
    let within: Vec<SegmentId> = ids
        .iter()
        .copied()
        .filter(|id| (lowest..=highest).contains(id))
        .collect();
    let missing = gaps(&within);
    if missing.is_empty() {
        return Ok(missing);
    }
    let count = ids_in(&missing);
    tracing::error!(
        missing = %format_ranges(&missing),
        count,
        lowest,
        highest,
        accepted = options.accept_missing_segments,
        "segments missing from the middle of the log: their records are lost"
    );
    if options.accept_missing_segments {
        return Ok(missing);
    }
    Err(RecoveryError::MissingSegments {
        missing,
        count,
        lowest,
        highest,
    })
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RecoveryError + 'a {
    move |source| RecoveryError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Recovers the log in `dir` (created if missing) with the default [`RecoveryOptions`]
/// (missing segments refused). See the [module docs](self).
pub fn recover(dir: &Path) -> Result<Recovery, RecoveryError> {
    recover_with(dir, RecoveryOptions::default())
}

/// Recovers the log in `dir` (created if missing). See the [module docs](self).
///
/// Reads every segment and scans it as [`recover_bytes`] does (refusing on missing segments
/// before anything is changed), then truncates on disk every segment the report lists in
/// [`RecoveryReport::truncated`].
pub fn recover_with(dir: &Path, options: RecoveryOptions) -> Result<Recovery, RecoveryError> {
    create_dir_durable(dir).map_err(io_err("creating directory", dir))?;
    let listed = list_segments(dir).map_err(io_err("listing", dir))?;
    let mut segments = Vec::with_capacity(listed.len());
    for (id, path) in &listed {
        let buf = std::fs::read(path).map_err(io_err("reading", path))?;
        segments.push((*id, Bytes::from(buf)));
    }
    let out = recover_bytes(segments, options)?;
    for d in &out.report.truncated {
        if let Some((_, path)) = listed.iter().find(|(id, _)| *id == d.segment) {
            truncate_file(path, d.offset)?;
        }
    }
    Ok(out)
}

/// The scan [`recover`] runs, over segment contents already in memory: `(id, bytes)` per
/// segment file, in any order, gaps checked as [`recover_with`] does. Pure: it changes nothing, and lists in
/// [`RecoveryReport::truncated`] what the caller must cut (the file-based [`recover`] does it
/// with `ftruncate`, the simulated journal on its buffers).
pub fn recover_bytes(
    segments: impl IntoIterator<Item = (SegmentId, Bytes)>,
    options: RecoveryOptions,
) -> Result<Recovery, RecoveryError> {
    let mut segments: Vec<(SegmentId, Bytes)> = segments.into_iter().collect();
    segments.sort_unstable_by_key(|(id, _)| *id);
    let mut out = Recovery {
        segments: Vec::with_capacity(segments.len()),
        records: Vec::new(),
        report: RecoveryReport::default(),
        next_segment: 1,
    };
    for (id, buf) in &segments {
        scan_segment(*id, buf, &mut out);
    }
    let ids: Vec<SegmentId> = segments.iter().map(|(id, _)| *id).collect();
    let missing = check_missing(&ids, &out.segments, options)?;
    out.report.segments_missing = ids_in(&missing);
    out.report.missing = missing;
    if let Some((last, _)) = segments.last() {
        out.next_segment = last
            .checked_add(1)
            .ok_or(RecoveryError::SegmentIdsExhausted(*last))?;
    }
    Ok(out)
}

/// Scans one segment into `out` (records, damage, counters). Changes nothing.
pub(crate) fn scan_segment(id: SegmentId, buf: &Bytes, out: &mut Recovery) {
    out.report.segments_read += 1;
    out.report.bytes_read += buf.len() as u64;

    let header = match decode_segment_header(buf) {
        Ok(h) if h.segment == id => h,
        Ok(h) => {
            let reason = format!(
                "segment header names segment {} but the file is segment {id}; segment skipped",
                h.segment
            );
            skip_segment(id, buf.len(), reason, out);
            return;
        }
        Err(e) => {
            let reason = format!("{e}; segment skipped ({} bytes)", buf.len());
            skip_segment(id, buf.len(), reason, out);
            return;
        }
    };
    debug_assert_eq!(header.segment, id);
    out.segments.push(id);

    let mut pos = SEGMENT_HEADER_LEN;
    while let Some(rest) = buf.get(pos..).filter(|r| !r.is_empty()) {
        let e = match decode_frame(rest) {
            Ok(frame) => {
                out.records.push(RawRecord {
                    segment: id,
                    offset: pos as u64,
                    tag: frame.tag,
                    body: buf.slice_ref(frame.body),
                });
                out.report.records_read += 1;
                pos += frame.len;
                continue;
            }
            Err(e) => e,
        };
        if let Some(n) = e.skip_len() {
            let reason = format!("{e}; record skipped");
            tracing::warn!(segment = id, offset = pos, len = n, %reason, "damaged record");
            out.report.skipped.push(Damage {
                segment: id,
                offset: pos as u64,
                len: n as u64,
                reason,
            });
            pos += n;
            continue;
        }
        // A sound header saying the rest of the segment is its body is a torn write, nothing
        // else: do not look inside it for records.
        let torn = matches!(
            e,
            FrameError::Incomplete {
                header_sound: true,
                ..
            }
        );
        match resync_point(buf, pos + 1).filter(|_| !torn) {
            Some(next) => {
                let reason = format!(
                    "{e}; resynchronised at offset {next} ({} bytes skipped)",
                    next - pos
                );
                tracing::warn!(
                    segment = id,
                    offset = pos,
                    len = next - pos,
                    %reason,
                    "damaged record header before sound records"
                );
                out.report.resynced.push(Damage {
                    segment: id,
                    offset: pos as u64,
                    len: (next - pos) as u64,
                    reason,
                });
                pos = next;
            }
            None => {
                truncate_at(id, buf, pos, &e, out);
                break;
            }
        }
    }
}

fn truncate_at(id: SegmentId, buf: &[u8], pos: usize, e: &FrameError, out: &mut Recovery) {
    let reason = format!(
        "{e}; truncated segment from {} to {pos} bytes ({} bytes dropped)",
        buf.len(),
        buf.len() - pos
    );
    tracing::warn!(segment = id, offset = pos, %reason, "torn or damaged segment tail");
    out.report.truncated.push(Damage {
        segment: id,
        offset: pos as u64,
        len: (buf.len() - pos) as u64,
        reason,
    });
}

/// The first offset at or after `from` where a record frames soundly (header and body CRC)
/// and is followed by the end of the segment or by another sound header. `None` if there is
/// none: the damage runs to the end of the segment.
fn resync_point(buf: &[u8], from: usize) -> Option<usize> {
    let tail = buf.get(from..)?;
    // Bounded by the segment's length; candidates are only the offsets holding the magic.
    for (i, _) in tail.iter().enumerate().filter(|(_, b)| **b == RECORD_MAGIC) {
        let at = from + i;
        let Some(Ok(frame)) = buf.get(at..).map(decode_frame) else {
            continue;
        };
        let next = at + frame.len;
        let chained = match buf.get(next..) {
            None | Some([]) => true,
            Some(after) => match decode_frame(after) {
                // A sound record or header, or a torn stub too short to judge.
                Ok(_) | Err(FrameError::BadBodyCrc { .. } | FrameError::Incomplete { .. }) => true,
                Err(_) => false,
            },
        };
        if chained {
            return Some(at);
        }
    }
    None
}

fn skip_segment(id: SegmentId, len: usize, reason: String, out: &mut Recovery) {
    tracing::warn!(segment = id, %reason, "unreadable segment");
    out.report.skipped.push(Damage {
        segment: id,
        offset: 0,
        len: len as u64,
        reason,
    });
}

fn truncate_file(path: &Path, at: u64) -> Result<(), RecoveryError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening for truncation", path))?;
    file.set_len(at).map_err(io_err("truncating", path))?;
    file.sync_all()
        .map_err(io_err("fsync after truncation", path))?;
    Ok(())
}
