//! Per-device mailboxes: compact entries in sequence order.
//!
//! An entry keeps in memory only what the shard decides with (seq, TTL time, pruning
//! priority, kind, where its record is in the log, durability, the connection it was sent on).
//! Its content (`Body`) is held only while it is *hot*: from store until first delivered when
//! the device is online, and from a read for delivery until it is acknowledged. A *cold* entry
//! is read back from its log record when it is about to be delivered (or compacted).

use std::collections::VecDeque;

use protocol::frame::{Deliver, Receipt};
use protocol::{DeviceAddr, Frame, Message, MsgType, ReceiptInfo};
use storage::{Lsn, SegmentId};

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

impl Body {
    /// The record that persists this body as entry `seq` of `to`.
    pub fn record(&self, seq: u64, to: DeviceAddr) -> Record {
        match self {
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

    /// The body a record read back for entry `seq` of `to` carries, if it is that entry's.
    pub fn of_record(rec: Record, seq: u64, to: DeviceAddr) -> Option<Body> {
        match rec {
            Record::Message {
                seq: s,
                to: t,
                message,
            } if s == seq && t == to => Some(Body::Message(message)),
            Record::MessageCopy {
                seq: s,
                to: t,
                message,
                ..
            } if s == seq && t == to => Some(Body::Message(message)),
            Record::Receipt {
                seq: s,
                to: t,
                receipt,
            } if s == seq && t == to => Some(Body::Receipt(receipt)),
            Record::GroupCopy {
                entries, message, ..
            } if entries.contains(&(to, seq)) => Some(Body::Message(message)),
            _ => None,
        }
    }
}

/// Where an entry's live record is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub segment: SegmentId,
    pub offset: u32,
}

impl From<Loc> for crate::RecordRef {
    fn from(loc: Loc) -> Self {
        crate::RecordRef {
            segment: loc.segment,
            offset: loc.offset,
        }
    }
}

impl From<crate::RecordRef> for Loc {
    fn from(at: crate::RecordRef) -> Self {
        Loc {
            segment: at.segment,
            offset: at.offset,
        }
    }
}

impl From<Lsn> for Loc {
    fn from(lsn: Lsn) -> Self {
        Loc {
            segment: lsn.segment,
            offset: lsn.offset,
        }
    }
}

/// `sent_on` value of an entry never sent.
const NOT_SENT: u64 = u64::MAX;
/// Flag: the entry is a message (else a receipt).
const MESSAGE: u8 = 1;
/// Flag: a read of its record is in flight.
const READING: u8 = 2;
/// Flag: the device acknowledged it while it was cold; the ack completes once it is read.
const ACK_WANTED: u8 = 4;

/// One queued message or receipt.
#[derive(Debug)]
pub(crate) struct Entry {
    pub seq: u64,
    /// Server accept time of a message, or the time of a receipt: the TTL runs from it.
    pub ts_ms: u64,
    /// The append that made it durable; 0 for entries recovered from the log (durable).
    pub append_id: u64,
    /// The connection it was last sent on ([`NOT_SENT`] if none). It counts as in flight only
    /// while that is the device's current connection; connection ids are never reused, so a
    /// stale value is harmless and no reset is needed when a connection goes away.
    sent_on: ConnId,
    /// Content, while hot.
    pub body: Option<Box<Body>>,
    /// Its live record (moves when compaction re-appends it).
    pub loc: Loc,
    /// Pruning priority: receipts rank like text.
    pub priority: u8,
    flags: u8,
}

// Per queued message this is the whole in-memory cost besides the deque's spare capacity (the
// issue's target is 64 bytes per queued message).
const _: () = assert!(std::mem::size_of::<Entry>() <= 56);

impl Entry {
    /// A hot entry for `body`, stored as `lsn`.
    pub fn hot(seq: u64, lsn: Lsn, body: Body) -> Self {
        let mut e = Self::cold(seq, lsn.into(), &body);
        e.append_id = lsn.append_id;
        e.body = Some(Box::new(body));
        e
    }

    /// A cold, durable entry of `body`'s kind and time, whose record is at `loc`.
    fn cold(seq: u64, loc: Loc, body: &Body) -> Self {
        match body {
            Body::Message(m) => {
                Self::cold_of(seq, loc, m.server_ts_ms, m.msg_type.priority(), true)
            }
            Body::Receipt(r) => Self::cold_of(seq, loc, r.ts_ms, MsgType::TEXT.priority(), false),
        }
    }

    /// A cold, durable entry (recovered): a message or a receipt, its time and priority, where
    /// its record is.
    pub fn cold_of(seq: u64, loc: Loc, ts_ms: u64, priority: u8, is_message: bool) -> Self {
        let flags = if is_message { MESSAGE } else { 0 };
        Entry {
            seq,
            ts_ms,
            append_id: 0,
            sent_on: NOT_SENT,
            body: None,
            loc,
            priority,
            flags,
        }
    }

    pub fn is_message(&self) -> bool {
        self.flags & MESSAGE != 0
    }

    pub fn is_reading(&self) -> bool {
        self.flags & READING != 0
    }

    pub fn set_reading(&mut self, on: bool) {
        self.set_flag(READING, on);
    }

    pub fn ack_wanted(&self) -> bool {
        self.flags & ACK_WANTED != 0
    }

    pub fn set_ack_wanted(&mut self) {
        self.set_flag(ACK_WANTED, true);
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn sent_on(&self) -> Option<ConnId> {
        (self.sent_on != NOT_SENT).then_some(self.sent_on)
    }

    pub fn set_sent_on(&mut self, conn: ConnId) {
        debug_assert_ne!(conn, NOT_SENT, "connection id reserved for 'not sent'");
        self.sent_on = conn;
    }

    /// The frame that delivers this entry, if it is hot.
    /// Whether the body is in memory (the entry can be sent without a read).
    pub fn is_hot(&self) -> bool {
        self.body.is_some()
    }

    pub fn frame(&self) -> Option<Frame> {
        let frame = match self.body.as_deref()? {
            Body::Message(m) => Deliver {
                seq: self.seq,
                message: m.clone(),
            }
            .into(),
            Body::Receipt(r) => Receipt {
                seq: self.seq,
                receipt: *r,
            }
            .into(),
        };
        Some(frame)
    }
}

/// A device's queue in seq order (arrival order, hence per-sender order).
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    entries: VecDeque<Entry>,
}

impl Mailbox {
    /// Adds an entry; seqs normally arrive in increasing order (then this is a push).
    pub fn insert(&mut self, entry: Entry) {
        match self.entries.back() {
            Some(last) if last.seq >= entry.seq => {
                match self.entries.binary_search_by_key(&entry.seq, |e| e.seq) {
                    // Not expected (seqs are unique): the newer copy wins.
                    Ok(i) => {
                        if let Some(e) = self.entries.get_mut(i) {
                            *e = entry;
                        }
                    }
                    Err(i) => self.entries.insert(i, entry),
                }
            }
            _ => self.entries.push_back(entry),
        }
    }

    fn position(&self, seq: u64) -> Option<usize> {
        // Acks arrive mostly in seq order, so the entry asked for is usually the oldest; a
        // lookup right after a store is for the newest. Both are checked before the search.
        match (self.entries.front(), self.entries.back()) {
            (Some(f), _) if f.seq == seq => return Some(0),
            (_, Some(b)) if b.seq == seq => return Some(self.entries.len() - 1),
            (Some(f), Some(b)) if seq < f.seq || seq > b.seq => return None,
            (None, _) | (_, None) => return None,
            _ => {}
        }
        let (a, b) = self.entries.as_slices();
        match a.last() {
            Some(last) if seq <= last.seq => a.binary_search_by_key(&seq, |e| e.seq).ok(),
            _ => b
                .binary_search_by_key(&seq, |e| e.seq)
                .ok()
                .map(|i| i + a.len()),
        }
    }

    pub fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(self.position(seq)?)?;
        // Give back the spare capacity of a queue that drained (deques never shrink by
        // themselves).
        let (len, cap) = (self.entries.len(), self.entries.capacity());
        if cap > 64 && len < cap / 4 {
            self.entries.shrink_to(len * 2);
        }
        Some(entry)
    }

    pub fn get(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(self.position(seq)?)
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        let i = self.position(seq)?;
        self.entries.get_mut(i)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry to prune first: lowest priority, then oldest. A scan: only run when the cap
    /// is exceeded.
    pub fn lowest(&self) -> Option<u64> {
        self.entries
            .iter()
            .min_by_key(|e| (e.priority, e.seq))
            .map(|e| e.seq)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.entries.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        let loc = Loc {
            segment: 1,
            offset: 0,
        };
        Entry::cold_of(seq, loc, 0, 0, true)
    }

    /// Lookups agree with a linear scan at every point of a queue that wraps around its
    /// ring buffer (so both halves of `as_slices` hold entries) and has gaps.
    #[test]
    fn position_finds_every_entry_across_the_wrap() {
        let mut m = Mailbox::default();
        let mut live: Vec<u64> = Vec::new();
        let mut next = 10u64;
        for round in 0..200u64 {
            for _ in 0..3 {
                m.insert(entry(next));
                live.push(next);
                next += 2;
            }
            // Remove from the front, and now and then from the middle.
            let victim = if round % 5 == 0 && live.len() > 2 {
                live[live.len() / 2]
            } else {
                live[0]
            };
            assert_eq!(m.remove(victim).map(|e| e.seq), Some(victim));
            live.retain(|&s| s != victim);
            for probe in 0..next + 3 {
                let want = live.contains(&probe);
                assert_eq!(m.get(probe).is_some(), want, "seq {probe} round {round}");
                if want {
                    assert_eq!(m.get(probe).map(|e| e.seq), Some(probe));
                }
            }
        }
    }
}
