//! Start-up: the dispatcher replays the recovered log into every sub-state.

use storage::SegmentId;

use crate::record::Record;

use crate::mailboxes::MailboxReplay;
use crate::prekeys::PrekeyReplay;
use crate::Shard;

impl Shard {
    /// Rebuilds state from the recovered log before any event is handled.
    ///
    /// `segments` lists every segment present (empty ones too); `records` must come in log order
    /// (segment ascending, then offset). Everything recovered is durable. What is rebuilt:
    /// accounts (the last record per device wins), key bindings, mailboxes (messages and
    /// receipts minus tombstones minus entries past `message_ttl_ms` at `now_ms`; a seq seen
    /// twice, which compaction causes, is kept once, in its latest segment), the dedup window
    /// (the newest `dedup_window_entries` message records, tombstoned or not), the next seq
    /// (above every seq in any record, tombstones included, so seqs are never reused) and the
    /// live count of every segment, and the prekey directory (the last identity record per
    /// device; one-time keys of batches of the device's final identity generation, minus
    /// consumed ones; a key id seen again, which compaction causes, is kept in its latest
    /// batch). Registration codes are not persisted: a restart invalidates outstanding codes and
    /// the client asks for a new one.
    pub fn recover(
        &mut self,
        now_ms: u64,
        segments: &[SegmentId],
        records: impl IntoIterator<Item = (SegmentId, Record)>,
    ) {
        for &s in segments {
            self.ledger.recovered_segment(s);
        }
        let mut mail = MailboxReplay::default();
        let mut keys = PrekeyReplay::default();
        for (seg, rec) in records {
            self.ledger.recovered_record(seg);
            if !mail.record(seg, &rec) && !self.accounts.recover(seg, &rec) {
                keys.record(seg, &rec, &mut self.prekeys);
            }
        }
        keys.finish(&mut self.prekeys);
        let (max_seq, max_seq_segment) = (mail.max_seq, mail.max_seq_segment);
        self.mailboxes.recover(now_ms, mail, &mut self.ledger);
        for seg in self
            .accounts
            .live_segments()
            .into_iter()
            .chain(self.prekeys.live_segments())
        {
            self.ledger.add_live(seg);
        }
        self.ledger.recovered_seqs(max_seq, max_seq_segment);
        self.refresh_stats();
    }
}
