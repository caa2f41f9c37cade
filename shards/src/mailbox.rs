//! Per-device mailboxes: entries in sequence order, plus a priority index for cap pruning.

use std::collections::{BTreeMap, BTreeSet};

use protocol::frame::{Deliver, Receipt};
use protocol::{DeviceAddr, Frame, Message, MsgType, ReceiptInfo};
use storage::SegmentId;

use crate::record::Record;
use crate::ConnId;

/// What a mailbox entry carries: exactly what its `Deliver` or `Receipt` frame will.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    /// A message for the device.
    Message(Message),
    /// A receipt for a message the device sent (of a known kind: unknown ones are dropped
    /// before they are queued).
    Receipt(ReceiptInfo),
}

/// One queued message or receipt.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The append that made it durable; 0 for entries recovered from the log (durable).
    pub append_id: u64,
    /// The segment holding its live record (moves when compaction re-appends it).
    pub segment: SegmentId,
    /// The connection it was last sent on. It counts as in flight only while that is the
    /// device's current connection; connection ids are never reused, so a stale value is
    /// harmless and no reset is needed when a connection goes away.
    pub sent_on: Option<ConnId>,
    /// Content.
    pub body: Body,
}

impl Entry {
    /// Server accept time of a message, or the time of a receipt: the TTL runs from it.
    pub fn ts_ms(&self) -> u64 {
        match &self.body {
            Body::Message(m) => m.server_ts_ms,
            Body::Receipt(r) => r.ts_ms,
        }
    }

    /// Pruning priority: receipts rank like text.
    pub fn priority(&self) -> u8 {
        match &self.body {
            Body::Message(m) => m.msg_type.priority(),
            Body::Receipt(_) => MsgType::TEXT.priority(),
        }
    }

    /// Whether this is a message (acks of messages produce delivered receipts).
    pub fn is_message(&self) -> bool {
        matches!(self.body, Body::Message(_))
    }

    /// The record that persists this entry (used by compaction to re-append it unchanged).
    pub fn record(&self, seq: u64, to: DeviceAddr) -> Record {
        match &self.body {
            Body::Message(m) => Record::Message {
                seq,
                to,
                message: m.clone(),
            },
            Body::Receipt(r) => Record::Receipt {
                seq,
                to,
                receipt: *r,
            },
        }
    }

    /// The frame that delivers this entry.
    pub fn frame(&self, seq: u64) -> Frame {
        match &self.body {
            Body::Message(m) => Deliver {
                seq,
                message: m.clone(),
            }
            .into(),
            Body::Receipt(r) => Receipt { seq, receipt: *r }.into(),
        }
    }
}

/// A device's queue. Sequence order is arrival order, hence per-sender order.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    entries: BTreeMap<u64, Entry>,
    /// `(priority, seq)` of every entry: its first element is the next one to prune.
    by_priority: BTreeSet<(u8, u64)>,
}

impl Mailbox {
    pub fn insert(&mut self, seq: u64, entry: Entry) {
        self.by_priority.insert((entry.priority(), seq));
        if let Some(old) = self.entries.insert(seq, entry) {
            // Not expected (seqs are unique); keep the index consistent anyway.
            self.by_priority.remove(&(old.priority(), seq));
            if let Some(e) = self.entries.get(&seq) {
                self.by_priority.insert((e.priority(), seq));
            }
        }
    }

    pub fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.by_priority.remove(&(entry.priority(), seq));
        Some(entry)
    }

    pub fn get(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(&seq)
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry to prune first: lowest priority, then oldest.
    pub fn lowest(&self) -> Option<u64> {
        self.by_priority.first().map(|&(_, seq)| seq)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Entry)> {
        self.entries.iter_mut()
    }
}
