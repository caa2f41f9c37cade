//! Compaction, part of the dispatcher: it asks every sub-state what of the oldest segment is
//! still live and has each re-append its own records.
//!
//! Two phases when the segment holds cold mailbox entries (their content is only in the log):
//! first their records are read back (`Action::ReadRecords`), then, on `Event::RecordsRead`,
//! everything still live is copied as before. Entries acked meanwhile are not copied. A failed
//! read abandons the compaction (a `WARN`, `compactions_abandoned`); a later Tick tries again.

use std::collections::BTreeMap;

use bytes::Bytes;
use protocol::{DeviceAddr, UserId};
use storage::{Journal, ReadError, SegmentId};

use crate::ledger::Log;
use crate::privacy::PrivacyRef;
use crate::record::Record;
use crate::types::{DedupKey, StaticKey};
use crate::Shard;

/// A live record found in a segment being compacted. The order of the variants is the order
/// of the copies (identity before batches, so the copies replay in the same order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LiveRef {
    Entry(u64, DeviceAddr),
    Account(DeviceAddr),
    Binding(StaticKey),
    Companion(DeviceAddr),
    Removal(UserId),
    PrekeyIdentity(DeviceAddr),
    PrekeyBatch(u64),
    Dedup(u64, DedupKey),
    Status(UserId, u64),
    Privacy(PrivacyRef),
    /// A group record: (group, version or gseq, kind), see `Groups::live_in`.
    Group(u64, u64, u8),
    /// A membership join record: (user, group).
    Membership(u64, u64),
}

impl Shard {
    /// If the oldest sealed segment is mostly dead, re-appends its live records (same seq, same
    /// content) and deletes it once those re-appends are durable; first reads back the records
    /// of its cold mailbox entries if it has any.
    pub(crate) fn maybe_compact(&mut self, journal: &mut dyn Journal) {
        let active = journal.active_segment();
        let ratio = self.config.compaction_live_ratio;
        let Some(id) = self.ledger.compaction_candidate(active, ratio) else {
            return;
        };
        if self.mailboxes.read_cold_in(id, &mut self.out) {
            self.ledger.compaction_reading(id);
            return;
        }
        self.compact(id, &BTreeMap::new(), journal);
    }

    /// `Event::RecordsRead`: a delivery's reads (the mailboxes deliver) or a compaction's.
    pub(crate) fn on_records_read(
        &mut self,
        now_ms: u64,
        token: u64,
        results: Vec<Result<(u8, Bytes), ReadError>>,
        journal: &mut dyn Journal,
    ) {
        let mut log = Log {
            ledger: &mut self.ledger,
            journal: &mut *journal,
        };
        let (registry, out) = (&mut self.registry, &mut self.out);
        let done = self
            .mailboxes
            .records_read(now_ms, token, results, &mut log, registry, out);
        let Some((id, read)) = done else {
            return;
        };
        let ready = read.filter(|read| {
            self.ledger.is_compacting(id)
                && !self.ledger.is_poisoned()
                && self.mailboxes.can_copy(id, read)
        });
        match ready {
            Some(read) => self.compact(id, &read, journal),
            None => {
                tracing::warn!(segment = id, "compaction abandoned; a later tick retries");
                self.ledger.compactions_abandoned =
                    self.ledger.compactions_abandoned.saturating_add(1);
                self.ledger.compaction_abandoned();
            }
        }
    }

    /// Copies every live record of `id` (cold entries from `read`) and waits for the copies.
    fn compact(&mut self, id: SegmentId, read: &BTreeMap<u64, Record>, journal: &mut dyn Journal) {
        let live = self.live_refs(id);
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        for item in live {
            match item {
                LiveRef::Entry(seq, key) => {
                    let rec = read.get(&seq);
                    self.mailboxes.copy_entry((seq, key), id, rec, &mut log);
                }
                LiveRef::Account(key) => self.accounts.copy_account(key, id, &mut log),
                LiveRef::Binding(key) => self.accounts.copy_binding(key, id, &mut log),
                LiveRef::Companion(addr) => self.devices.copy_companion(addr, id, &mut log),
                LiveRef::Removal(user) => self.devices.copy_removal(user, id, &mut log),
                LiveRef::PrekeyIdentity(key) => self.prekeys.copy_identity(key, id, &mut log),
                LiveRef::PrekeyBatch(batch) => self.prekeys.copy_batch(batch, id, &mut log),
                LiveRef::Dedup(_, key) => self.mailboxes.copy_dedup(key, id, &mut log),
                LiveRef::Status(poster, post) => self.status.copy((poster, post), id, &mut log),
                LiveRef::Privacy(item) => self.privacy.copy(item, id, &mut log),
                LiveRef::Group(g, n, kind) => self.groups.copy((g, n, kind), id, &mut log),
                LiveRef::Membership(u, g) => self.memberships.copy((u, g), id, &mut log),
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
        let (companions, removals) = self.devices.live_in(segment);
        let mut live: Vec<LiveRef> = entries
            .into_iter()
            .map(|(seq, key)| LiveRef::Entry(seq, key))
            .chain(accounts.into_iter().map(LiveRef::Account))
            .chain(bindings.into_iter().map(LiveRef::Binding))
            .chain(companions.into_iter().map(LiveRef::Companion))
            .chain(removals.into_iter().map(LiveRef::Removal))
            .chain(identities.into_iter().map(LiveRef::PrekeyIdentity))
            .chain(batches.into_iter().map(LiveRef::PrekeyBatch))
            .chain(dedup.into_iter().map(|(seq, key)| LiveRef::Dedup(seq, key)))
            .chain(
                self.status
                    .live_in(segment)
                    .into_iter()
                    .map(|(u, p)| LiveRef::Status(u, p)),
            )
            .chain(
                self.privacy
                    .live_in(segment)
                    .into_iter()
                    .map(LiveRef::Privacy),
            )
            .chain(
                self.groups
                    .live_in(segment)
                    .into_iter()
                    .map(|(g, n, k)| LiveRef::Group(g, n, k)),
            )
            .chain(
                self.memberships
                    .live_in(segment)
                    .into_iter()
                    .map(|(u, g)| LiveRef::Membership(u, g)),
            )
            .collect();
        live.sort_unstable();
        live
    }
}
