//! The durability ledger: append ids, seqs, waiters, and the liveness of every segment.
//!
//! Rules it keeps (see the header of `shard.rs` for why):
//!
//! * **Durability gates every answer.** Work waits in `waiters`, keyed by append id, and runs
//!   in append order once `Event::Durable` covers it ([`Ledger::take_ready`]).
//! * **Segments die oldest-first**, and only once nothing in them is live.
//! * **Seqs are never reused.** A segment is deleted only when a durable record carrying a
//!   fresher seq survives in a younger one; when none does, a seq marker is appended first.

use std::collections::{BTreeMap, VecDeque};

use storage::{Journal, Lsn, SegmentId};

use crate::record::Record;
use crate::waiter::Waiter;

/// Per-segment bookkeeping for deletion and compaction.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SegmentInfo {
    /// Records in it that are still live.
    pub live: u64,
    /// Records ever written to it (the denominator of the live fraction).
    pub total: u64,
    /// Highest append id in it (0 for recovered segments: durable).
    pub max_append_id: u64,
    /// Dedup window entries carried by records in it. They keep it from being deleted.
    pub remembered: u64,
    /// Those of them carried by `Dedup` records. These count as carried (like live records)
    /// for the compaction ratio: copying them frees nothing (counting them as dead made a
    /// segment of `Dedup` records compact into the next one on every Tick). Entries carried
    /// by message records do not: compaction replaces a message of up to 16 KiB by a 48-byte
    /// `Dedup` record.
    pub remembered_markers: u64,
}

/// What the shard knows about its log.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Work waiting for durability, in append-id order (equal ids in the order they were
    /// registered). Almost every wait is for the newest append, so this is a queue with an
    /// occasional insert behind the back (a duplicate's answer waits for its original).
    waiters: VecDeque<(u64, Waiter)>,
    /// Highest append id known durable.
    durable_up_to: u64,
    /// Highest append id handed out.
    last_append_id: u64,
    /// Live segments, oldest first.
    segments: BTreeMap<SegmentId, SegmentInfo>,
    /// The segment whose live records were re-appended and which waits for them to be durable.
    compacting: Option<SegmentId>,
    /// Appends carrying a fresh seq (a new message, receipt or seq marker) not known durable
    /// yet: the first such append of each segment, oldest first (so at most a few entries).
    pending_fresh: VecDeque<(u64, SegmentId)>,
    /// A segment holding a durable record whose seq is above every seq in older segments.
    /// Only segments older than it may be deleted: recovery computes the next seq from the
    /// records that remain, so the record carrying the high-water seq must outlive them.
    fresh_durable_segment: Option<SegmentId>,
    /// Next mailbox seq; strictly above every seq in the log.
    next_seq: u64,
    /// Why the log refuses writes, once it does.
    poisoned: Option<String>,
    /// Records appended.
    pub appends: u64,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Segments compacted.
    pub segments_compacted: u64,
    /// Compactions abandoned (a record read failed).
    pub compactions_abandoned: u64,
}

/// The ledger together with the journal of the event being handled: what sub-states append
/// through.
pub(crate) struct Log<'a> {
    pub ledger: &'a mut Ledger,
    pub journal: &'a mut dyn Journal,
}

impl Log<'_> {
    /// Appends `rec`; `live` records count towards their segment's liveness.
    pub fn append(&mut self, rec: &Record, live: bool) -> Lsn {
        self.ledger.append(self.journal, rec, live)
    }

    /// Appends a tombstone for `seq` (unless the log refuses writes).
    pub fn tombstone(&mut self, seq: u64) {
        if self.ledger.poisoned.is_none() {
            self.append(&Record::Tombstone { seq }, false);
        }
    }

    /// A tombstone for a seq never given to an entry: it kills nothing, and recovery (which
    /// takes tombstones into account) will start above it.
    pub fn append_seq_marker(&mut self) {
        let seq = self.ledger.take_seq();
        let lsn = self.append(&Record::Tombstone { seq }, false);
        self.ledger.note_fresh(lsn);
    }
}

impl Ledger {
    pub fn new() -> Self {
        Self {
            waiters: VecDeque::new(),
            durable_up_to: 0,
            last_append_id: 0,
            segments: BTreeMap::new(),
            compacting: None,
            pending_fresh: VecDeque::new(),
            fresh_durable_segment: None,
            next_seq: 1,
            poisoned: None,
            appends: 0,
            segments_deleted: 0,
            segments_compacted: 0,
            compactions_abandoned: 0,
        }
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    pub fn is_durable(&self, append_id: u64) -> bool {
        append_id <= self.durable_up_to
    }

    pub fn last_append_id(&self) -> u64 {
        self.last_append_id
    }

    /// `Event::Durable`. After a failure nothing more is trusted to become durable.
    pub fn on_durable(&mut self, up_to: u64) {
        if self.poisoned.is_none() {
            self.durable_up_to = self.durable_up_to.max(up_to);
        }
    }

    fn append(&mut self, journal: &mut dyn Journal, rec: &Record, live: bool) -> Lsn {
        let lsn = journal.append(rec);
        self.appends = self.appends.saturating_add(1);
        self.last_append_id = self.last_append_id.max(lsn.append_id);
        let info = self.segments.entry(lsn.segment).or_default();
        info.total = info.total.saturating_add(1);
        if live {
            info.live = info.live.saturating_add(1);
        }
        info.max_append_id = info.max_append_id.max(lsn.append_id);
        lsn
    }

    pub fn add_live(&mut self, segment: SegmentId) {
        let info = self.segments.entry(segment).or_default();
        info.live = info.live.saturating_add(1);
    }

    pub fn kill(&mut self, segment: SegmentId) {
        if let Some(info) = self.segments.get_mut(&segment) {
            info.live = info.live.saturating_sub(1);
        }
    }

    /// A dedup window entry is carried by a record in `segment` (a `Dedup` record when
    /// `marker`, else the message's own).
    pub fn remember(&mut self, segment: SegmentId, marker: bool) {
        let info = self.segments.entry(segment).or_default();
        info.remembered = info.remembered.saturating_add(1);
        if marker {
            info.remembered_markers = info.remembered_markers.saturating_add(1);
        }
    }

    /// The window no longer needs the record in `segment` (evicted, or moved by compaction).
    pub fn release(&mut self, segment: SegmentId, marker: bool) {
        if let Some(info) = self.segments.get_mut(&segment) {
            info.remembered = info.remembered.saturating_sub(1);
            if marker {
                info.remembered_markers = info.remembered_markers.saturating_sub(1);
            }
        }
    }

    pub fn wait(&mut self, append_id: u64, waiter: Waiter) {
        let at = match self.waiters.back() {
            Some(&(last, _)) if last > append_id => {
                self.waiters.partition_point(|&(id, _)| id <= append_id)
            }
            _ => self.waiters.len(),
        };
        self.waiters.insert(at, (append_id, waiter));
    }

    /// Waits for everything appended so far.
    pub fn wait_all(&mut self, waiter: Waiter) {
        self.wait(self.last_append_id, waiter);
    }

    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    /// Every waiter whose append is durable, in append order. (Running a waiter never adds
    /// one, so taking them all at once is the same as running them one by one.)
    pub fn take_ready(&mut self) -> Vec<Waiter> {
        self.promote_fresh();
        let mut ready = Vec::new();
        while let Some(&(id, _)) = self.waiters.front() {
            if id > self.durable_up_to {
                break;
            }
            ready.extend(self.waiters.pop_front().map(|(_, w)| w));
        }
        ready
    }

    /// The log failed: refuse writes from now on and hand back every waiter, in append order,
    /// so each can be answered with an error.
    pub fn fail(&mut self, reason: String) -> Vec<Waiter> {
        self.poisoned = Some(reason);
        std::mem::take(&mut self.waiters)
            .into_iter()
            .map(|(_, w)| w)
            .collect()
    }

    /// Records that `lsn` carries a seq above every seq in older segments.
    pub fn note_fresh(&mut self, lsn: Lsn) {
        self.promote_fresh();
        // The first fresh append of a segment is the one that becomes durable first.
        if self
            .pending_fresh
            .back()
            .is_none_or(|&(_, seg)| seg != lsn.segment)
        {
            self.pending_fresh.push_back((lsn.append_id, lsn.segment));
        }
    }

    fn promote_fresh(&mut self) {
        while let Some(&(append_id, segment)) = self.pending_fresh.front() {
            if append_id > self.durable_up_to {
                break;
            }
            self.fresh_durable_segment = self.fresh_durable_segment.max(Some(segment));
            self.pending_fresh.pop_front();
        }
    }

    /// Whether deleting `segment` leaves a durable record with a seq at least as high as any
    /// in it: one in a younger segment written after everything in it.
    fn keeps_high_water(&self, segment: SegmentId) -> bool {
        self.fresh_durable_segment.is_some_and(|f| segment < f)
    }

    // ----- recovery ----------------------------------------------------------------------

    /// A segment present at start-up (empty ones too).
    pub fn recovered_segment(&mut self, segment: SegmentId) {
        self.segments.entry(segment).or_default();
    }

    /// One record read back from `segment`.
    pub fn recovered_record(&mut self, segment: SegmentId) {
        let info = self.segments.entry(segment).or_default();
        info.total = info.total.saturating_add(1);
    }

    /// The highest seq found in any record, and the latest segment holding it.
    pub fn recovered_seqs(&mut self, max_seq: u64, max_seq_segment: Option<SegmentId>) {
        self.next_seq = self.next_seq.max(max_seq.saturating_add(1));
        self.fresh_durable_segment = self.fresh_durable_segment.max(max_seq_segment);
    }

    // ----- segments ----------------------------------------------------------------------

    /// Deletes sealed segments with nothing live, oldest first, stopping at the first that must
    /// stay (a tombstone in a younger segment may still refer to its records).
    pub fn delete_segments(&mut self, journal: &mut dyn Journal) {
        self.promote_fresh();
        let active = journal.active_segment();
        while let Some((&id, info)) = self.segments.first_key_value() {
            let deletable = id != active
                && info.live == 0
                && info.remembered == 0
                && info.max_append_id <= self.durable_up_to
                && self.compacting != Some(id);
            if !deletable {
                break;
            }
            if !self.keeps_high_water(id) {
                // Only the seq high-water mark holds this segment back: write a newer one and
                // delete once it is durable (a later Tick).
                if self.pending_fresh.is_empty() {
                    Log {
                        ledger: self,
                        journal,
                    }
                    .append_seq_marker();
                }
                break;
            }
            self.segments.remove(&id);
            journal.delete_segment(id);
            self.segments_deleted = self.segments_deleted.saturating_add(1);
        }
    }

    /// The oldest sealed segment if it is fully durable, holds something still needed (live
    /// records or dedup window entries) and the fraction of its records that compaction would
    /// copy unchanged (live ones and remembered `Dedup` records) is below `live_ratio`.
    pub fn compaction_candidate(&self, active: SegmentId, live_ratio: f64) -> Option<SegmentId> {
        if self.compacting.is_some() {
            return None;
        }
        let (&id, info) = self.segments.first_key_value()?;
        // Only a fully durable segment: its records are the ones recovery would see.
        if id == active
            || (info.live == 0 && info.remembered == 0)
            || info.total == 0
            || info.max_append_id > self.durable_up_to
        {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        let fraction = info.live.saturating_add(info.remembered_markers) as f64 / info.total as f64;
        (fraction < live_ratio).then_some(id)
    }

    /// The live records of `segment` were re-appended: it waits for them (and everything
    /// appended before) to be durable.
    pub fn compaction_started(&mut self, segment: SegmentId) {
        self.compacting = Some(segment);
        self.wait_all(Waiter::Compaction { segment });
    }

    pub fn compaction_abandoned(&mut self) {
        self.compacting = None;
    }

    /// `segment` is being compacted and waits for the reads of its cold records: no other
    /// compaction starts and it is not deleted meanwhile.
    pub fn compaction_reading(&mut self, segment: SegmentId) {
        self.compacting = Some(segment);
    }

    /// Whether `segment` is the one being compacted.
    pub fn is_compacting(&self, segment: SegmentId) -> bool {
        self.compacting == Some(segment)
    }

    /// The copies out of `segment` are durable: delete it if it is still the oldest and now
    /// empty (it should be); otherwise leave it for a later Tick.
    pub fn finish_compaction(&mut self, segment: SegmentId, journal: &mut dyn Journal) {
        if self.compacting == Some(segment) {
            self.compacting = None;
        }
        let oldest = self
            .segments
            .first_key_value()
            .map(|(&id, info)| (id, info.live, info.remembered));
        if oldest == Some((segment, 0, 0))
            && segment != journal.active_segment()
            && self.poisoned.is_none()
            && self.keeps_high_water(segment)
        {
            self.segments.remove(&segment);
            journal.delete_segment(segment);
            self.segments_deleted = self.segments_deleted.saturating_add(1);
            self.segments_compacted = self.segments_compacted.saturating_add(1);
        }
    }
}
