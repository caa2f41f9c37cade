//! The simulated journal: the on-disk bytes of a log, in memory, with crashes that damage what
//! was never synced, recovered by the real recovery code.
//!
//! One home for every in-memory journal (the shard simulator, the rule tests, the benches), in
//! the manner of TigerBeetle's `src/testing/storage.zig`. A [`SimJournal`]:
//!
//! * keeps, per segment, exactly the bytes a segment file would hold (the segment header, then
//!   framed records, encoded by [`crate::frame::encode`]) and how much of it is synced;
//! * hands out the [`Lsn`]s the real log would: append ids from 1 in each "process", and the
//!   same byte rotation rule as the glommio `Log` (optionally also a record count, which seals
//!   a segment as soon as it holds that many records);
//! * [`SimJournal::commit`] is a group commit: everything appended (and every segment header
//!   written by rotation) becomes synced, and it says up to which append id;
//! * [`SimJournal::crash`] is a process or machine crash mid-commit. Synced bytes are never
//!   touched (a ✓ was given for them). The unsynced bytes, taken in write order (the real log
//!   writes and syncs segments one after the other), are, depending on the caller's random
//!   value, (a) all lost, (b) cut anywhere, mid-record included, keeping a prefix (a torn
//!   write), or (c) kept up to the end of a record in which one bit is flipped (the real log
//!   writes in order; see [`SimJournal::crash_with`] for why nothing after it is kept). Then
//!   the real
//!   [`recover_bytes`] scans what is left, its truncations are applied, and the journal reopens
//!   like `Log::open` on [`Recovery::next_segment`];
//! * deletes segments at once (the real log waits for the next commit: deleting earlier is the
//!   stricter test), and checks the caller's discipline: never the active segment, always the
//!   oldest readable one.
//!
//! Segments whose header a crash damaged stay, unreadable, like the files recovery skips: they
//! count as present (no false "missing segment"), are not offered to the caller, and are never
//! deleted.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::frame::{decode_frame, encode, encoded_len};
use crate::recovery::{recover_bytes, scan_segment, Recovery, RecoveryError, RecoveryOptions};
use crate::segment::{
    encode_segment_header, needs_rotation, DEFAULT_SEGMENT_BYTES_MAX, SEGMENT_HEADER_LEN,
};
use crate::{Encode, Journal, Lsn, RawRecord, ReadError, SegmentId};

/// Rotation limits of a [`SimJournal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Same meaning as `LogConfig::segment_bytes_max`: a record that would make the active
    /// segment larger goes to a new one (a lone record larger than this gets its own).
    pub segment_bytes_max: u64,
    /// Also seal the active segment as soon as it holds this many records (`None`: bytes
    /// only). Small values make the shard's segment deletion and compaction run often.
    pub segment_records_max: Option<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            segment_bytes_max: DEFAULT_SEGMENT_BYTES_MAX,
            segment_records_max: None,
        }
    }
}

impl SimConfig {
    /// Rotation by record count only (bytes at the default 64 MiB).
    pub fn records_per_segment(n: usize) -> Self {
        SimConfig {
            segment_records_max: Some(n.max(1)),
            ..SimConfig::default()
        }
    }
}

/// What a crash does to the unsynced bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// Every unsynced byte is lost.
    LoseUnsynced,
    /// A prefix of the unsynced bytes (in write order) survives, cut anywhere.
    TornPrefix,
    /// Every unsynced byte survives, with one bit flipped somewhere in them.
    BitFlip,
}

impl CrashMode {
    /// The three modes, in the order [`SimJournal::crash`] picks them from its random value.
    pub const ALL: [CrashMode; 3] = [
        CrashMode::LoseUnsynced,
        CrashMode::TornPrefix,
        CrashMode::BitFlip,
    ];
}

/// What a [`SimJournal::crash`] did, and what recovery made of it.
#[derive(Debug)]
pub struct Crash {
    /// The mode applied.
    pub mode: CrashMode,
    /// Unsynced bytes when it crashed.
    pub unsynced_bytes: usize,
    /// Of those, how many survived (flipped or not).
    pub kept_bytes: usize,
    /// Where a bit was flipped: segment, byte offset in it, bit (0..8).
    pub flipped: Option<(SegmentId, usize, u8)>,
    /// Whether the kept prefix ends inside a record (recovery saw a torn record).
    pub torn_mid_record: bool,
    /// What the real recovery returned (its truncations are already applied).
    pub recovery: Recovery,
}

#[derive(Clone, Debug)]
struct Segment {
    /// The file's bytes, from offset `dropped`.
    bytes: Vec<u8>,
    /// Bytes of `bytes` that are synced.
    synced: usize,
    /// Bytes dropped from the front by [`SimJournal::forget_durable`].
    dropped: usize,
    /// Records appended to it since it was created or recovered.
    records: usize,
    /// Whether recovery can read it (its header was sound at the last crash).
    readable: bool,
    /// Offsets (file offsets) where the unsynced records start, in order.
    unsynced_starts: Vec<usize>,
}

impl Segment {
    fn created(id: SegmentId, synced: bool) -> Self {
        let bytes = encode_segment_header(id).to_vec();
        Segment {
            synced: if synced { bytes.len() } else { 0 },
            bytes,
            dropped: 0,
            records: 0,
            readable: true,
            unsynced_starts: Vec::new(),
        }
    }

    fn len(&self) -> u64 {
        (self.dropped + self.bytes.len()) as u64
    }

    fn unsynced(&self) -> usize {
        self.bytes.len() - self.synced
    }
}

/// The simulated journal. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct SimJournal {
    config: SimConfig,
    segments: BTreeMap<SegmentId, Segment>,
    active: SegmentId,
    next_append_id: u64,
    durable_up_to: u64,
    pending_records: usize,
    forgot: bool,
    trace: u64,
    /// Records appended over the journal's life (crashes included).
    pub appends: u64,
    /// Framed bytes appended over the journal's life.
    pub bytes_appended: u64,
}

/// FNV-1a, 64 bit: the trace fingerprint (stable across platforms and builds).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

impl SimJournal {
    /// A journal as a log freshly opened on an empty directory: segment 1, its header synced.
    pub fn new(config: SimConfig) -> Self {
        SimJournal {
            config,
            segments: BTreeMap::from([(1, Segment::created(1, true))]),
            active: 1,
            next_append_id: 1,
            durable_up_to: 0,
            pending_records: 0,
            forgot: false,
            trace: FNV_OFFSET,
            appends: 0,
            bytes_appended: 0,
        }
    }

    /// A journal whose segments already hold `records` (synced), as a log reopened on them:
    /// a fresh active segment one past the highest. `records` must be in log order (segment
    /// ids non-decreasing).
    ///
    /// # Panics
    ///
    /// If the segment ids decrease.
    pub fn with_durable<R: Encode>(
        config: SimConfig,
        records: impl IntoIterator<Item = (SegmentId, R)>,
    ) -> Self {
        let mut segments: BTreeMap<SegmentId, Segment> = BTreeMap::new();
        let mut last = 0;
        for (id, rec) in records {
            assert!(
                id >= last,
                "records out of log order: segment {id} after {last}"
            );
            last = id;
            let seg = segments
                .entry(id)
                .or_insert_with(|| Segment::created(id, true));
            encode(&rec, &mut seg.bytes);
            seg.synced = seg.bytes.len();
            seg.records += 1;
        }
        let active = last.saturating_add(1);
        segments.insert(active, Segment::created(active, true));
        SimJournal {
            config,
            segments,
            active,
            next_append_id: 1,
            durable_up_to: 0,
            pending_records: 0,
            forgot: false,
            trace: FNV_OFFSET,
            appends: 0,
            bytes_appended: 0,
        }
    }

    /// Group commit: every appended record and every rotated segment's header becomes
    /// synced. Returns the highest append id now durable if this commit made records durable,
    /// `None` if there were none to commit.
    pub fn commit(&mut self) -> Option<u64> {
        for seg in self.segments.values_mut() {
            seg.synced = seg.bytes.len();
            seg.unsynced_starts.clear();
        }
        if self.pending_records == 0 {
            return None;
        }
        self.pending_records = 0;
        self.durable_up_to = self.next_append_id - 1;
        Some(self.durable_up_to)
    }

    /// Records appended and not yet committed.
    pub fn pending_records(&self) -> usize {
        self.pending_records
    }

    /// Highest durable append id of this "process" (0 if none).
    pub fn durable_up_to(&self) -> u64 {
        self.durable_up_to
    }

    /// Segments the caller knows (readable, not deleted), in id order, the active one last.
    pub fn segments(&self) -> Vec<SegmentId> {
        self.segments
            .iter()
            .filter(|(_, s)| s.readable)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The bytes of segment `id` as a file would hold them (synced or not).
    ///
    /// `None` for a segment that does not exist, or whose front [`Self::forget_durable`]
    /// dropped.
    pub fn segment_bytes(&self, id: SegmentId) -> Option<&[u8]> {
        self.segments
            .get(&id)
            .filter(|s| s.dropped == 0)
            .map(|s| s.bytes.as_slice())
    }

    /// Reads back the record whose header is at `offset` in `segment`, synced or not, CRCs
    /// checked, as the real log's `read_record` does from the file.
    pub fn read_record(&self, segment: SegmentId, offset: u32) -> Result<RawRecord, ReadError> {
        let seg = self
            .segments
            .get(&segment)
            .filter(|s| s.readable)
            .ok_or(ReadError::NoSegment { segment })?;
        let frame_error = |error| ReadError::Frame {
            segment,
            offset,
            error,
        };
        let at = (offset as usize)
            .checked_sub(seg.dropped)
            .ok_or(ReadError::NoSegment { segment })?;
        let bytes = seg.bytes.get(at..).unwrap_or(&[]);
        let frame = decode_frame(bytes).map_err(frame_error)?;
        Ok(RawRecord {
            segment,
            offset: u64::from(offset),
            tag: frame.tag,
            body: Bytes::copy_from_slice(frame.body),
        })
    }

    /// Every record in the readable segments, synced or not, in log order: what recovery would
    /// return if nothing more were lost (the real scan runs, so records a crash damaged are
    /// left out). Framing only (decode the bodies yourself). Empty after
    /// [`Self::forget_durable`] dropped segment fronts.
    pub fn appended(&self) -> Vec<RawRecord> {
        let mut out = Recovery {
            segments: Vec::new(),
            records: Vec::new(),
            report: Default::default(),
            next_segment: 1,
        };
        for (&id, seg) in self.segments.iter().filter(|(_, s)| s.readable) {
            if seg.dropped == 0 {
                scan_segment(id, &Bytes::copy_from_slice(&seg.bytes), &mut out);
            }
        }
        out.records
    }

    /// The records appended and not yet committed, in append order.
    pub fn unsynced(&self) -> Vec<RawRecord> {
        let mut out = Vec::new();
        for (&id, seg) in self.segments.iter().filter(|(_, s)| s.unsynced() > 0) {
            // Commits end on record boundaries; a segment created since starts with its header.
            let mut pos = if seg.dropped + seg.synced < SEGMENT_HEADER_LEN {
                SEGMENT_HEADER_LEN - seg.dropped
            } else {
                seg.synced
            };
            while let Some(Ok(f)) = seg
                .bytes
                .get(pos..)
                .filter(|r| !r.is_empty())
                .map(decode_frame)
            {
                out.push(RawRecord {
                    segment: id,
                    offset: (seg.dropped + pos) as u64,
                    tag: f.tag,
                    body: Bytes::copy_from_slice(f.body),
                });
                pos += f.len;
            }
        }
        out
    }

    /// What recovery would return after a crash that loses every unsynced byte, without
    /// crashing.
    ///
    /// # Errors
    ///
    /// As [`recover_bytes`] (missing segments, exhausted ids).
    pub fn durable_view(&self) -> Result<Recovery, RecoveryError> {
        assert!(!self.forgot, "the journal forgot its durable bytes");
        recover_bytes(
            self.segments
                .iter()
                .filter(|(_, s)| s.synced > 0)
                .map(|(id, s)| {
                    (
                        *id,
                        Bytes::copy_from_slice(s.bytes.get(..s.synced).unwrap_or(&[])),
                    )
                }),
            RecoveryOptions::default(),
        )
    }

    /// Drops the synced bytes (keeping lengths, so rotation is unchanged): memory stays flat
    /// for a caller that never crashes or reads back (the benches).
    ///
    /// After this, [`Self::crash`] and [`Self::durable_view`] panic.
    pub fn forget_durable(&mut self) {
        self.forgot = true;
        for seg in self.segments.values_mut() {
            seg.bytes.drain(..seg.synced);
            seg.dropped += seg.synced;
            seg.synced = 0;
        }
    }

    /// A fingerprint of every append (append id, segment, framed bytes) and deletion so far,
    /// in order: equal across runs that appended and deleted the same things.
    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    /// Crashes with the mode `rng_value % 3` picks (see [`CrashMode::ALL`]); the rest of the
    /// value places the cut or the flipped bit. See [`Self::crash_with`].
    ///
    /// # Errors
    ///
    /// As [`Self::crash_with`].
    pub fn crash(&mut self, rng_value: u64) -> Result<Crash, RecoveryError> {
        let mode = match rng_value % 3 {
            0 => CrashMode::LoseUnsynced,
            1 => CrashMode::TornPrefix,
            _ => CrashMode::BitFlip,
        };
        self.crash_with(mode, rng_value / 3)
    }

    /// A crash in `mode` (the cut or the bit placed by `rng_value`), then recovery by the real
    /// scan and a reopen. In [`CrashMode::BitFlip`] the bytes after the record holding the
    /// flipped bit are lost: sound records kept after a damaged one would be a hole among
    /// unacknowledged records, which recovery keeps (it cannot tell them from acknowledged
    /// records after decay) and which breaks per-sender order once clients resend the lost
    /// one. Afterwards the journal holds what recovery left, append ids restart
    /// at 1, and appends go to a new segment past the highest one present.
    ///
    /// # Errors
    ///
    /// As [`recover_bytes`] with default options (a missing segment; the simulated crash
    /// never makes one), or when segment ids are exhausted.
    ///
    /// # Panics
    ///
    /// After [`Self::forget_durable`].
    pub fn crash_with(&mut self, mode: CrashMode, rng_value: u64) -> Result<Crash, RecoveryError> {
        assert!(!self.forgot, "the journal forgot its durable bytes");
        let unsynced_bytes: usize = self.segments.values().map(Segment::unsynced).sum();
        let total = unsynced_bytes as u64;
        let (keep, flip) = match mode {
            CrashMode::LoseUnsynced => (0, None),
            CrashMode::TornPrefix => (rng_value % (total + 1), None),
            CrashMode::BitFlip if total > 0 => {
                let at = (rng_value >> 3) % total;
                (
                    self.end_of_record_holding(at),
                    Some((at, (rng_value & 7) as u8)),
                )
            }
            CrashMode::BitFlip => (0, None),
        };
        let (torn_mid_record, flipped) = self.damage_unsynced(keep, flip);
        let recovery = recover_bytes(
            self.segments
                .iter()
                .map(|(id, s)| (*id, Bytes::copy_from_slice(&s.bytes))),
            RecoveryOptions::default(),
        )?;
        for d in &recovery.report.truncated {
            if let Some(seg) = self.segments.get_mut(&d.segment) {
                seg.bytes
                    .truncate(usize::try_from(d.offset).unwrap_or(usize::MAX));
            }
        }
        for (id, seg) in &mut self.segments {
            seg.readable = recovery.segments.contains(id);
            seg.synced = seg.bytes.len();
            seg.records = 0;
            seg.unsynced_starts.clear();
        }
        self.active = recovery.next_segment;
        self.segments
            .insert(self.active, Segment::created(self.active, true));
        self.next_append_id = 1;
        self.durable_up_to = 0;
        self.pending_records = 0;
        Ok(Crash {
            mode,
            unsynced_bytes,
            kept_bytes: usize::try_from(keep).unwrap_or(usize::MAX),
            flipped,
            torn_mid_record,
            recovery,
        })
    }

    /// The position (in the stream of unsynced bytes, segment by segment) just past the end of
    /// the record holding unsynced byte `at` (or of the segment header, for a segment created
    /// by the interrupted commit). A crash that flips a bit leaves nothing after that record:
    /// sound unacknowledged records after a damaged one would be a hole recovery cannot tell
    /// from decay of acknowledged ones (see the `recovery` module docs), so recovery keeps
    /// them, and a client's resend of the lost one would overtake them.
    fn end_of_record_holding(&self, at: u64) -> u64 {
        let mut before = 0u64;
        for seg in self.segments.values() {
            let pending = seg.unsynced() as u64;
            if at >= before + pending {
                before += pending;
                continue;
            }
            let off = seg.synced + usize::try_from(at - before).unwrap_or(0);
            let end = if seg.synced == 0 && off < SEGMENT_HEADER_LEN {
                SEGMENT_HEADER_LEN.min(seg.bytes.len())
            } else {
                seg.unsynced_starts
                    .iter()
                    .map(|s| s - seg.dropped)
                    .find(|s| *s > off)
                    .unwrap_or(seg.bytes.len())
            };
            return before + (end - seg.synced) as u64;
        }
        before
    }

    /// Keeps the first `keep` unsynced bytes (in write order: segment by segment) and drops the
    /// rest; flips bit `flip.1` of unsynced byte `flip.0`. Segments left with no byte at all
    /// were never created. Returns whether the cut fell inside a record, and where a bit was
    /// flipped.
    fn damage_unsynced(
        &mut self,
        keep: u64,
        flip: Option<(u64, u8)>,
    ) -> (bool, Option<(SegmentId, usize, u8)>) {
        let mut left = keep;
        let mut before = 0u64;
        let mut torn = false;
        let mut flipped = None;
        let mut gone = Vec::new();
        for (&id, seg) in &mut self.segments {
            let pending = seg.unsynced() as u64;
            if pending == 0 {
                continue;
            }
            if let Some((at, bit)) = flip.filter(|(at, _)| *at >= before && *at < before + pending)
            {
                let off = seg.synced + usize::try_from(at - before).unwrap_or(0);
                if let Some(b) = seg.bytes.get_mut(off) {
                    *b ^= 1 << bit;
                    flipped = Some((id, seg.dropped + off, bit));
                }
            }
            before += pending;
            let k = left.min(pending);
            left -= k;
            let cut = seg.synced + usize::try_from(k).unwrap_or(0);
            if k < pending {
                // Torn unless the cut is where the unsynced bytes start, where a record starts,
                // or (in a segment created by this commit) where its header ends.
                let boundary = cut == seg.synced
                    || seg.unsynced_starts.contains(&(seg.dropped + cut))
                    || (seg.synced == 0 && cut == SEGMENT_HEADER_LEN);
                torn |= !boundary;
            }
            seg.bytes.truncate(cut);
            if seg.bytes.is_empty() {
                gone.push(id);
            }
        }
        for id in gone {
            self.segments.remove(&id);
        }
        (torn, flipped)
    }

    fn rotate(&mut self) {
        if let Some(next) = self.active.checked_add(1) {
            self.active = next;
            self.segments.insert(next, Segment::created(next, false));
        }
    }
}

impl Journal for SimJournal {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        let n = encoded_len(rec);
        let active_len = self.segments.get(&self.active).map_or(0, Segment::len);
        if needs_rotation(active_len, n, self.config.segment_bytes_max) {
            self.rotate();
        }
        let active = self.active;
        let seg = self
            .segments
            .entry(active)
            .or_insert_with(|| Segment::created(active, false));
        let lsn = Lsn {
            append_id: self.next_append_id,
            segment: active,
            // Same bound as the real log: a record starts inside a segment of at most
            // `segment_bytes_max` bytes.
            offset: u32::try_from(seg.len()).unwrap_or(u32::MAX),
        };
        self.next_append_id += 1;
        self.pending_records += 1;
        self.appends += 1;
        self.bytes_appended += n as u64;
        let start = seg.bytes.len();
        seg.unsynced_starts.push(seg.dropped + start);
        encode(rec, &mut seg.bytes);
        seg.records += 1;
        let full = self
            .config
            .segment_records_max
            .is_some_and(|m| seg.records >= m.max(1));
        self.trace = fnv(self.trace, b"A");
        self.trace = fnv(self.trace, &lsn.append_id.to_le_bytes());
        self.trace = fnv(self.trace, &lsn.segment.to_le_bytes());
        self.trace = fnv(self.trace, seg.bytes.get(start..).unwrap_or(&[]));
        if full {
            self.rotate();
        }
        lsn
    }

    /// Deletes `segment` at once.
    ///
    /// # Panics
    ///
    /// If `segment` is the active one, or not the oldest readable segment present: the caller
    /// broke the deletion discipline (segments die oldest-first, never the one being written).
    fn delete_segment(&mut self, segment: SegmentId) {
        assert_ne!(segment, self.active, "deleted the active segment");
        let oldest = self
            .segments
            .iter()
            .find(|(_, s)| s.readable)
            .map(|(id, _)| *id);
        assert_eq!(
            oldest,
            Some(segment),
            "segment {segment} deleted before an older one: {:?}",
            self.segments()
        );
        self.segments.remove(&segment);
        self.trace = fnv(self.trace, b"D");
        self.trace = fnv(self.trace, &segment.to_le_bytes());
    }

    fn active_segment(&self) -> SegmentId {
        self.active
    }
}
