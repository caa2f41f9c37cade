//! Compaction, part of the dispatcher: it asks every sub-state what of the oldest segment is
//! still live and has each re-append its own records.

use protocol::DeviceAddr;
use storage::{Journal, SegmentId};

use crate::ledger::Log;
use crate::types::{DedupKey, StaticKey};
use crate::Shard;

/// A live record found in a segment being compacted. The order of the variants is the order
/// of the copies (identity before batches, so the copies replay in the same order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LiveRef {
    Entry(u64, DeviceAddr),
    Account(DeviceAddr),
    Binding(StaticKey),
    PrekeyIdentity(DeviceAddr),
    PrekeyBatch(u64),
    Dedup(u64, DedupKey),
}

impl Shard {
    /// If the oldest sealed segment is mostly dead, re-appends its live records (same seq, same
    /// content) and deletes it once those re-appends are durable.
    pub(crate) fn maybe_compact(&mut self, journal: &mut dyn Journal) {
        let active = journal.active_segment();
        let ratio = self.config.compaction_live_ratio;
        let Some(id) = self.ledger.compaction_candidate(active, ratio) else {
            return;
        };
        let live = self.live_refs(id);
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        for item in live {
            match item {
                LiveRef::Entry(seq, key) => self.mailboxes.copy_entry(seq, key, id, &mut log),
                LiveRef::Account(key) => self.accounts.copy_account(key, id, &mut log),
                LiveRef::Binding(key) => self.accounts.copy_binding(key, id, &mut log),
                LiveRef::PrekeyIdentity(key) => self.prekeys.copy_identity(key, id, &mut log),
                LiveRef::PrekeyBatch(batch) => self.prekeys.copy_batch(batch, id, &mut log),
                LiveRef::Dedup(_, key) => self.mailboxes.copy_dedup(key, id, &mut log),
            }
        }
        // The old segment may hold the seq high-water mark: carry it forward too.
        log.append_seq_marker();
        // Until the copies (and any pending record that replaces one not copied) are durable
        // the old segment is the only durable home of these records: it waits.
        self.ledger.compaction_started(id);
    }

    /// Every live record of `segment`, in copy order.
    fn live_refs(&self, segment: SegmentId) -> Vec<LiveRef> {
        let entries = self.mailboxes.live_in(segment);
        let (accounts, bindings) = self.accounts.live_in(segment);
        let (identities, batches) = self.prekeys.live_in(segment);
        let dedup = self.mailboxes.dedup_live_in(segment);
        let mut live: Vec<LiveRef> = entries
            .into_iter()
            .map(|(seq, key)| LiveRef::Entry(seq, key))
            .chain(accounts.into_iter().map(LiveRef::Account))
            .chain(bindings.into_iter().map(LiveRef::Binding))
            .chain(identities.into_iter().map(LiveRef::PrekeyIdentity))
            .chain(batches.into_iter().map(LiveRef::PrekeyBatch))
            .chain(dedup.into_iter().map(|(seq, key)| LiveRef::Dedup(seq, key)))
            .collect();
        live.sort_unstable();
        live
    }
}
