//! The sender dedup window: which `(sender, device, client_msg_id)` were stored, and when.
//!
//! The window outlives the records of the messages it remembers: each entry is remembered on
//! the segment of a record that carries it (the message record, or a `Record::Dedup` marker
//! that compaction writes when it empties that segment), so a segment is not deleted while the
//! window still needs it ([`crate::ledger::SegmentInfo::remembered`]). Eviction releases it.

use crate::types::HashMap;
use std::collections::VecDeque;

use storage::SegmentId;

use crate::ledger::{Ledger, Log};
use crate::record::Record;
use crate::types::DedupKey;

/// What the window remembers of a stored message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    /// The server timestamp the message was first stored with.
    pub ts_ms: u64,
    /// Its append (0 when recovered: durable).
    pub append_id: u64,
    /// Its mailbox seq.
    pub seq: u64,
    /// The segment of the record that carries this entry (it is remembered there).
    pub segment: SegmentId,
    /// Whether that record is a `Dedup` record (else the message's own record).
    pub in_marker: bool,
}

/// `Config::dedup_window_entries` long, evicted FIFO.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    seen: HashMap<DedupKey, Seen>,
    fifo: VecDeque<DedupKey>,
    cap: usize,
}

impl DedupWindow {
    pub fn new(cap: usize) -> Self {
        Self {
            seen: HashMap::default(),
            fifo: VecDeque::new(),
            cap,
        }
    }

    pub fn get(&self, key: &DedupKey) -> Option<Seen> {
        self.seen.get(key).copied()
    }

    /// Remembers `key`; the entry keeps `seen.segment` from deletion until it is evicted.
    pub fn insert(&mut self, key: DedupKey, seen: Seen, ledger: &mut Ledger) {
        if self.cap == 0 {
            return;
        }
        ledger.remember(seen.segment, seen.in_marker);
        match self.seen.insert(key, seen) {
            Some(old) => ledger.release(old.segment, old.in_marker),
            None => self.fifo.push_back(key),
        }
        while self.fifo.len() > self.cap {
            if let Some(old) = self.fifo.pop_front().and_then(|k| self.seen.remove(&k)) {
                ledger.release(old.segment, old.in_marker);
            }
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Entries carried by a record in `segment`, by seq.
    pub fn live_in(&self, segment: SegmentId) -> Vec<(u64, DedupKey)> {
        self.seen
            .iter()
            .filter(|(_, s)| s.segment == segment)
            .map(|(&k, s)| (s.seq, k))
            .collect()
    }

    /// Compaction: writes a `Dedup` marker for `key` and remembers it on the marker's segment
    /// instead of `segment`.
    pub fn copy(&mut self, key: DedupKey, segment: SegmentId, log: &mut Log<'_>) {
        let Some(seen) = self.seen.get_mut(&key) else {
            return;
        };
        let (from, client_msg_id) = key;
        let rec = Record::Dedup {
            seq: seen.seq,
            from,
            client_msg_id,
            ts_ms: seen.ts_ms,
        };
        let lsn = log.append(&rec, false);
        log.ledger.remember(lsn.segment, true);
        log.ledger.release(segment, seen.in_marker);
        seen.segment = lsn.segment;
        seen.in_marker = true;
    }

    /// Entries remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }
}
