//! An in-memory [`Journal`] with explicit durability and crashes, for the deterministic
//! simulator.
//!
//! [`MemJournal`] models what the real `Log` (feature `glommio`) plus
//! [`recover`](crate::recovery::recover) guarantee, without I/O:
//!
//! * appends are buffered and get the same [`Lsn`]s the real log would give (same rotation
//!   rule by bytes, using the real record encoding; optionally also by record count);
//! * [`MemJournal::commit`] makes everything appended so far durable and then performs
//!   queued segment deletions, like a successful group commit;
//! * [`MemJournal::crash`] loses everything not committed; [`MemJournal::crash_with_torn_tail`]
//!   may keep a prefix of it, as a real disk may when a crash interrupts a commit;
//! * after a crash the journal behaves like a freshly recovered and reopened log: appends go
//!   to a new segment one past the highest existing one.
//!
//! Differences from the real log, on purpose: append ids continue after the durable ones
//! across a crash (the real log restarts them at 1 in each process), and there are no
//! partially damaged records (a torn tail is modelled as a clean prefix).

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::frame::encoded_len;
use crate::segment::{needs_rotation, SEGMENT_HEADER_LEN};
use crate::{Encode, Journal, Lsn, RawRecord, SegmentId};

/// Rotation limits of a [`MemJournal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemJournalConfig {
    /// Same meaning as `LogConfig::segment_bytes_max`
    /// (sizes computed with the real encoding and segment header).
    pub segment_bytes_max: u64,
    /// Also rotate once a segment holds this many records (`None`: bytes only).
    pub segment_records_max: Option<usize>,
}

impl Default for MemJournalConfig {
    fn default() -> Self {
        MemJournalConfig {
            segment_bytes_max: crate::segment::DEFAULT_SEGMENT_BYTES_MAX,
            segment_records_max: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    append_id: u64,
    segment: SegmentId,
    tag: u8,
    body: Bytes,
}

/// In-memory journal with explicit durability. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct MemJournal {
    config: MemJournalConfig,
    durable: Vec<Entry>,
    pending: Vec<Entry>,
    deletes: Vec<SegmentId>,
    /// Segments that exist durably (created and not deleted).
    segments: BTreeSet<SegmentId>,
    next_append_id: u64,
    durable_up_to: u64,
    active: SegmentId,
    active_len: u64,
    active_records: usize,
}

impl MemJournal {
    /// A journal as a log freshly opened on an empty directory: active segment 1.
    pub fn new(config: MemJournalConfig) -> Self {
        MemJournal {
            config,
            durable: Vec::new(),
            pending: Vec::new(),
            deletes: Vec::new(),
            segments: BTreeSet::from([1]),
            next_append_id: 1,
            durable_up_to: 0,
            active: 1,
            active_len: SEGMENT_HEADER_LEN as u64,
            active_records: 0,
        }
    }

    /// Makes everything appended so far durable, then deletes queued segments (never the
    /// active one). Returns the highest durable append id (0 if none).
    pub fn commit(&mut self) -> u64 {
        self.make_durable(self.pending.len());
        for id in std::mem::take(&mut self.deletes) {
            if id >= self.active {
                continue;
            }
            self.durable.retain(|e| e.segment != id);
            self.segments.remove(&id);
        }
        self.durable_up_to
    }

    /// Whether a commit has work to do (records or deletions).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.deletes.is_empty()
    }

    /// Records appended but not yet committed.
    pub fn pending_records(&self) -> usize {
        self.pending.len()
    }

    /// Highest durable append id (0 if none).
    pub fn durable_up_to(&self) -> u64 {
        self.durable_up_to
    }

    /// A crash: every record not committed is lost, queued deletions are forgotten. The
    /// journal then behaves like a recovered and reopened log (new active segment; append ids
    /// continue after the durable ones).
    pub fn crash(&mut self) {
        self.crash_keeping(0);
    }

    /// A crash in the middle of a commit: a prefix of the uncommitted records (of length
    /// `rng_value % (uncommitted + 1)`, possibly none, possibly all) survives and becomes
    /// durable; the rest is lost. Queued deletions are forgotten (the real log deletes only
    /// after its data is durable).
    pub fn crash_with_torn_tail(&mut self, rng_value: u64) {
        let n = self.pending.len() as u64;
        let keep = usize::try_from(rng_value % (n + 1)).unwrap_or(0);
        self.crash_keeping(keep);
    }

    fn crash_keeping(&mut self, keep: usize) {
        self.make_durable(keep);
        self.pending.clear();
        self.deletes.clear();
        let last = self.segments.last().copied().unwrap_or(0);
        // Like `Recovery::next_segment` + `Log::open`: a new segment past the highest file.
        self.active = last.saturating_add(1);
        self.segments.insert(self.active);
        self.active_len = SEGMENT_HEADER_LEN as u64;
        self.active_records = 0;
        self.next_append_id = self.durable_up_to + 1;
    }

    fn make_durable(&mut self, n: usize) {
        let n = n.min(self.pending.len());
        for e in self.pending.drain(..n) {
            self.segments.insert(e.segment);
            self.durable_up_to = e.append_id;
            self.durable.push(e);
        }
    }

    /// What recovery would return now: the existing segments in id order, and the durable
    /// records in append order (offsets are not modelled: 0).
    pub fn recovered(&self) -> (Vec<SegmentId>, Vec<RawRecord>) {
        (
            self.segments.iter().copied().collect(),
            self.durable
                .iter()
                .map(|e| RawRecord {
                    segment: e.segment,
                    offset: 0,
                    tag: e.tag,
                    body: e.body.clone(),
                })
                .collect(),
        )
    }
}

impl Journal for MemJournal {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        let n = encoded_len(rec);
        let by_count = self
            .config
            .segment_records_max
            .is_some_and(|m| self.active_records >= m.max(1));
        let by_bytes = needs_rotation(self.active_len, n, self.config.segment_bytes_max);
        if by_count || by_bytes {
            if let Some(next) = self.active.checked_add(1) {
                self.active = next;
                self.active_len = SEGMENT_HEADER_LEN as u64;
                self.active_records = 0;
            }
        }
        self.active_len += n as u64;
        self.active_records += 1;
        let lsn = Lsn {
            append_id: self.next_append_id,
            segment: self.active,
        };
        self.next_append_id += 1;
        self.pending.push(Entry {
            append_id: lsn.append_id,
            segment: lsn.segment,
            tag: rec.tag(),
            body: {
                let mut body = Vec::with_capacity(rec.body_len());
                rec.encode_body(&mut body);
                Bytes::from(body)
            },
        });
        lsn
    }

    fn delete_segment(&mut self, segment: SegmentId) {
        if segment < self.active && !self.deletes.contains(&segment) {
            self.deletes.push(segment);
        }
    }

    fn active_segment(&self) -> SegmentId {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seq: u64) -> RawRecord {
        RawRecord {
            segment: 0,
            offset: 0,
            tag: 3,
            body: Bytes::copy_from_slice(&seq.to_le_bytes()),
        }
    }

    fn seqs(j: &MemJournal) -> Vec<u64> {
        j.recovered()
            .1
            .into_iter()
            .map(|r| u64::from_le_bytes(r.body[..].try_into().unwrap()))
            .collect()
    }

    #[test]
    fn commit_and_crash() {
        let mut j = MemJournal::new(MemJournalConfig::default());
        for s in 1..=3 {
            assert_eq!(j.append(&t(s)).append_id, s);
        }
        assert_eq!(j.commit(), 3);
        j.append(&t(4));
        j.append(&t(5));
        j.crash();
        assert_eq!(seqs(&j), vec![1, 2, 3]);
        assert_eq!(j.active_segment(), 2);
        assert_eq!(j.recovered().0, vec![1, 2]);
        let lsn = j.append(&t(6));
        assert_eq!(
            lsn,
            Lsn {
                append_id: 4,
                segment: 2
            }
        );
        assert_eq!(j.commit(), 4);
        assert_eq!(seqs(&j), vec![1, 2, 3, 6]);
    }

    #[test]
    fn torn_tail_keeps_a_prefix() {
        for rng in 0..10u64 {
            let mut j = MemJournal::new(MemJournalConfig::default());
            j.append(&t(1));
            j.commit();
            for s in 2..=5 {
                j.append(&t(s));
            }
            j.crash_with_torn_tail(rng);
            let kept = (rng % 5) as usize;
            let expect: Vec<u64> = (1..=1 + kept as u64).collect();
            assert_eq!(seqs(&j), expect);
            assert_eq!(j.durable_up_to(), 1 + kept as u64);
            assert_eq!(j.append(&t(99)).append_id, 2 + kept as u64);
        }
    }

    #[test]
    fn rotation_matches_the_byte_rule_and_counts() {
        let rec_len = encoded_len(&t(0)) as u64; // 22
        let cfg = MemJournalConfig {
            segment_bytes_max: SEGMENT_HEADER_LEN as u64 + 2 * rec_len,
            segment_records_max: None,
        };
        let mut j = MemJournal::new(cfg);
        let segs: Vec<_> = (0..5).map(|s| j.append(&t(s)).segment).collect();
        assert_eq!(segs, vec![1, 1, 2, 2, 3]);

        let mut j = MemJournal::new(MemJournalConfig {
            segment_records_max: Some(3),
            ..MemJournalConfig::default()
        });
        let segs: Vec<_> = (0..7).map(|s| j.append(&t(s)).segment).collect();
        assert_eq!(segs, vec![1, 1, 1, 2, 2, 2, 3]);
    }

    #[test]
    fn delete_at_commit_never_active() {
        let mut j = MemJournal::new(MemJournalConfig {
            segment_records_max: Some(2),
            ..MemJournalConfig::default()
        });
        for s in 0..5 {
            j.append(&t(s));
        }
        j.commit();
        assert_eq!(j.recovered().0, vec![1, 2, 3]);
        j.delete_segment(1);
        j.delete_segment(3); // active: ignored
        assert_eq!(seqs(&j), vec![0, 1, 2, 3, 4], "not before commit");
        j.crash();
        assert_eq!(
            seqs(&j),
            vec![0, 1, 2, 3, 4],
            "a crash forgets the deletion"
        );
        j.delete_segment(1);
        j.commit();
        assert_eq!(seqs(&j), vec![2, 3, 4]);
        assert_eq!(j.recovered().0, vec![2, 3, 4]);
    }
}
