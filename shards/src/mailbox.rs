//! Per-device mailboxes: entries in sequence order, plus a priority index for cap pruning.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use protocol::frame::{Deliver, Receipt};
use protocol::{DeviceAddr, DeviceId, Frame, Message, MsgType, ReceiptInfo, ReceiptKind, UserId};
use storage::SegmentId;

use crate::record::Record;
use crate::ConnId;

/// What a mailbox entry carries.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    /// A message for the device.
    Message {
        from_user: UserId,
        from_device: DeviceId,
        client_msg_id: u64,
        msg_type: u8,
        payload: Bytes,
    },
    /// A receipt for a message the device sent.
    Receipt {
        from_user: UserId,
        from_device: DeviceId,
        client_msg_id: u64,
        kind: ReceiptKind,
    },
}

/// One queued message or receipt.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Server accept time (TTL runs from it).
    pub ts_ms: u64,
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
    /// Pruning priority: receipts rank like text.
    pub fn priority(&self) -> u8 {
        match &self.body {
            Body::Message { msg_type, .. } => MsgType(*msg_type).priority(),
            Body::Receipt { .. } => MsgType::TEXT.priority(),
        }
    }

    /// Whether this is a message (acks of messages produce delivered receipts).
    pub fn is_message(&self) -> bool {
        matches!(self.body, Body::Message { .. })
    }

    /// The record that persists this entry (used by compaction to re-append it unchanged).
    pub fn record(&self, seq: u64, to_user: UserId, to_device: DeviceId) -> Record {
        match &self.body {
            Body::Message {
                from_user,
                from_device,
                client_msg_id,
                msg_type,
                payload,
            } => Record::Message {
                seq,
                to_user,
                to_device,
                from_user: *from_user,
                from_device: *from_device,
                client_msg_id: *client_msg_id,
                ts_ms: self.ts_ms,
                msg_type: *msg_type,
                payload: payload.clone(),
            },
            Body::Receipt {
                from_user,
                from_device,
                client_msg_id,
                kind,
            } => Record::Receipt {
                seq,
                to_user,
                to_device,
                from_user: *from_user,
                from_device: *from_device,
                client_msg_id: *client_msg_id,
                kind: kind.0,
                ts_ms: self.ts_ms,
            },
        }
    }

    /// The frame that delivers this entry.
    pub fn frame(&self, seq: u64) -> Frame {
        match &self.body {
            Body::Message {
                from_user,
                from_device,
                client_msg_id,
                msg_type,
                payload,
            } => Deliver {
                seq,
                message: Message {
                    from: DeviceAddr::new(*from_user, *from_device),
                    client_msg_id: *client_msg_id,
                    server_ts_ms: self.ts_ms,
                    msg_type: MsgType(*msg_type),
                    payload: payload.clone(),
                },
            }
            .into(),
            Body::Receipt {
                from_user,
                from_device,
                client_msg_id,
                kind,
            } => Receipt {
                seq,
                receipt: ReceiptInfo {
                    from: DeviceAddr::new(*from_user, *from_device),
                    client_msg_id: *client_msg_id,
                    kind: *kind,
                    ts_ms: self.ts_ms,
                },
            }
            .into(),
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
