//! Segment files: naming, the file header, and listing a shard's segments.
//!
//! A shard's log is a directory of files named `seg-{id:010}.log` (`seg-0000000001.log`, …).
//! Each starts with a [`SEGMENT_HEADER_LEN`]-byte header, followed by framed records (see
//! [`crate::frame`]):
//!
//! ```text
//! offset  size  field
//!      0     5  magic          ASCII "SBLOG"
//!      5     2  version        SEGMENT_FORMAT_VERSION, u16 LE
//!      7     1  reserved       0
//!      8     4  segment id     u32 LE, equals the id in the file name
//!     12     4  header_crc     CRC32C of bytes 0..12, u32 LE
//!     16     …  records
//! ```

use std::io;
use std::path::{Path, PathBuf};

use crate::SegmentId;

/// First five bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 5] = *b"SBLOG";

/// Segment format version this crate writes and reads.
pub const SEGMENT_FORMAT_VERSION: u16 = 1;

/// Default largest segment size (`LogConfig::segment_bytes_max`): 64 MiB.
pub const DEFAULT_SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// Bytes in a segment file header.
pub const SEGMENT_HEADER_LEN: usize = 16;

/// File name of segment `id`: `seg-{id:010}.log`.
pub fn segment_file_name(id: SegmentId) -> String {
    format!("seg-{id:010}.log")
}

/// Path of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(segment_file_name(id))
}

/// The segment id in a file name of the form `seg-{id:010}.log`, or `None` for any other name
/// (which recovery ignores).
pub fn parse_segment_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, in increasing id order. Other files are ignored.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(SegmentId, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(parse_segment_file_name) else {
            continue;
        };
        if entry.file_type()?.is_file() {
            out.push((id, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(id, _)| *id);
    Ok(out)
}

/// Creates `dir` (and missing parents) if it does not exist, and fsyncs the parent of every
/// directory it creates so the new entries survive a crash. Blocking; for start-up.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fsync_dir(parent)
}

/// `fsync(2)` on a directory, making the entries created or removed in it durable.
/// Blocking.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The header written at the start of segment `id`.
pub fn encode_segment_header(id: SegmentId) -> [u8; SEGMENT_HEADER_LEN] {
    let [m0, m1, m2, m3, m4] = SEGMENT_MAGIC;
    let [v0, v1] = SEGMENT_FORMAT_VERSION.to_le_bytes();
    let [i0, i1, i2, i3] = id.to_le_bytes();
    let pre = [m0, m1, m2, m3, m4, v0, v1, 0, i0, i1, i2, i3];
    let [c0, c1, c2, c3] = crc32c::crc32c(&pre).to_le_bytes();
    [
        m0, m1, m2, m3, m4, v0, v1, 0, i0, i1, i2, i3, c0, c1, c2, c3,
    ]
}

/// A decoded segment file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version.
    pub version: u16,
    /// Segment id recorded in the file.
    pub segment: SegmentId,
}

/// Why a segment file header was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentHeaderError {
    /// The file is shorter than a header (a crash while creating it, or not a segment).
    #[error("segment header incomplete: {len} of {SEGMENT_HEADER_LEN} bytes")]
    Incomplete {
        /// Bytes present.
        len: usize,
    },
    /// The file does not start with `SBLOG`.
    #[error("not a segment file (bad magic)")]
    BadMagic,
    /// The header CRC does not match.
    #[error("segment header CRC mismatch")]
    BadCrc,
    /// A format version this build does not read.
    #[error("unsupported segment format version {0}")]
    UnsupportedVersion(u16),
}

/// Decodes the header at the start of `buf` (the start of a segment file).
pub fn decode_segment_header(buf: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
    let Some((h, _)) = buf.split_first_chunk::<SEGMENT_HEADER_LEN>() else {
        if !buf.is_empty() && !SEGMENT_MAGIC.starts_with(buf.get(..5).unwrap_or(buf)) {
            return Err(SegmentHeaderError::BadMagic);
        }
        return Err(SegmentHeaderError::Incomplete { len: buf.len() });
    };
    let [m0, m1, m2, m3, m4, v0, v1, r, i0, i1, i2, i3, c0, c1, c2, c3] = *h;
    if [m0, m1, m2, m3, m4] != SEGMENT_MAGIC {
        return Err(SegmentHeaderError::BadMagic);
    }
    let pre = [m0, m1, m2, m3, m4, v0, v1, r, i0, i1, i2, i3];
    if crc32c::crc32c(&pre) != u32::from_le_bytes([c0, c1, c2, c3]) {
        return Err(SegmentHeaderError::BadCrc);
    }
    let version = u16::from_le_bytes([v0, v1]);
    if version != SEGMENT_FORMAT_VERSION {
        return Err(SegmentHeaderError::UnsupportedVersion(version));
    }
    Ok(SegmentHeader {
        version,
        segment: u32::from_le_bytes([i0, i1, i2, i3]),
    })
}

/// Whether a record of `rec_len` framed bytes must go to a new segment when the active one
/// already holds `active_len` bytes (header included). A segment always takes at least one
/// record, so a record larger than the limit gets a segment of its own. Shared by
/// the glommio `Log` and [`crate::sim::SimJournal`] so both rotate identically.
pub(crate) fn needs_rotation(active_len: u64, rec_len: usize, segment_bytes_max: u64) -> bool {
    active_len > SEGMENT_HEADER_LEN as u64
        && active_len.saturating_add(rec_len as u64) > segment_bytes_max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(1), "seg-0000000001.log");
        assert_eq!(segment_file_name(u32::MAX), "seg-4294967295.log");
        for id in [0, 1, 42, 1_000_000, u32::MAX] {
            assert_eq!(parse_segment_file_name(&segment_file_name(id)), Some(id));
        }
        for bad in [
            "seg-1.log",
            "seg-00000000001.log",
            "seg-000000000a.log",
            "seg-0000000001.log.tmp",
            "xseg-0000000001.log",
            "seg-9999999999.log",
            "seg-+000000001.log",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = encode_segment_header(7);
        assert_eq!(&h[..5], b"SBLOG");
        assert_eq!(
            decode_segment_header(&h),
            Ok(SegmentHeader {
                version: SEGMENT_FORMAT_VERSION,
                segment: 7
            })
        );
        for i in 0..SEGMENT_HEADER_LEN {
            let mut d = h;
            d[i] ^= 0x10;
            assert!(decode_segment_header(&d).is_err(), "byte {i}");
        }
        assert_eq!(
            decode_segment_header(&h[..3]),
            Err(SegmentHeaderError::Incomplete { len: 3 })
        );
        assert_eq!(
            decode_segment_header(b"XBLOG"),
            Err(SegmentHeaderError::BadMagic)
        );
        assert_eq!(
            decode_segment_header(&[]),
            Err(SegmentHeaderError::Incomplete { len: 0 })
        );
    }

    #[test]
    fn listing_is_in_id_order_and_ignores_strangers() {
        let dir = tempfile::tempdir().unwrap();
        for id in [10, 2, 33] {
            std::fs::write(segment_path(dir.path(), id), b"").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        std::fs::create_dir(dir.path().join("seg-0000000005.log")).unwrap();
        let ids: Vec<_> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![2, 10, 33]);
    }

    #[test]
    fn rotation_rule() {
        let h = SEGMENT_HEADER_LEN as u64;
        assert!(
            !needs_rotation(h, 1000, 100),
            "an empty segment takes any record"
        );
        assert!(!needs_rotation(h + 10, 50, 100));
        assert!(needs_rotation(h + 10, 75, 100));
        assert!(!needs_rotation(h + 10, 74, 100));
    }
}
