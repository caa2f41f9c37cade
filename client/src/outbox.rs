//! Messages sent but not yet acknowledged by the server (no ✓ yet).
//!
//! A `Send` is durable only once its `ServerAck` arrives. Until then it sits in the outbox with
//! its already-encoded payload, so that after a reconnect [`crate::Session::resend_pending`]
//! can send it again with the same `client_msg_id`; the server deduplicates on
//! `(sender, client_msg_id)`, so a message whose first copy did reach the log is not stored
//! twice. Entries keep their sending order, which preserves per-recipient order on resend.
//!
//! The outbox lives in memory: a process that exits before its ✓ arrived loses the entry
//! (the `chat send --wait-ack` command waits for the ✓ for this reason).

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use protocol::{Address, DeviceCopy, MsgType};

/// Default number of unacknowledged messages a session may have in flight.
pub const OUTBOX_CAPACITY_DEFAULT: usize = 1024;

/// One unacknowledged `Send`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSend {
    /// The sender-chosen id (the server's dedup key).
    pub client_msg_id: u64,
    /// Recipient.
    pub to: Address,
    /// Message type.
    pub msg_type: MsgType,
    /// The encoded payload exactly as sent (never re-encoded for a retry). Empty for a
    /// `SendMulti` (see `copies`).
    pub payload: Bytes,
    /// For a `SendMulti` (a send to every device of `to.id`, capability `MULTI_DEVICE`): one
    /// encoded copy per device, exactly as last sent; empty for a legacy `Send`. A retry
    /// resends them unchanged; only a refusal as stale (`DeviceListStale`) makes the session
    /// replace them (re-encrypting for the devices that are new).
    pub copies: Vec<DeviceCopy>,
    /// How many times it was written to a connection.
    pub attempts: u32,
    /// When it was first sent.
    pub first_sent_at: Instant,
}

/// A bounded, ordered set of [`PendingSend`]s keyed by `client_msg_id`.
#[derive(Clone, Debug)]
pub struct Outbox {
    capacity: usize,
    entries: VecDeque<PendingSend>,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: VecDeque::new(),
        }
    }

    /// Most messages held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Messages waiting for their ✓.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Is nothing waiting?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Is there no room for another message?
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// The entry for `client_msg_id`, if it is waiting.
    pub fn get(&self, client_msg_id: u64) -> Option<&PendingSend> {
        self.entries
            .iter()
            .find(|e| e.client_msg_id == client_msg_id)
    }

    /// Adds a message after its first send. Returns `false` (and changes nothing) when the
    /// outbox is full or already holds `client_msg_id`.
    pub fn push(&mut self, entry: PendingSend) -> bool {
        if self.is_full() || self.get(entry.client_msg_id).is_some() {
            return false;
        }
        self.entries.push_back(entry);
        true
    }

    /// Counts one more send attempt of `client_msg_id`.
    pub fn note_attempt(&mut self, client_msg_id: u64) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.client_msg_id == client_msg_id)
        {
            e.attempts = e.attempts.saturating_add(1);
        }
    }

    /// Replaces the copies of the `SendMulti` `client_msg_id` (after re-encrypting it for a new
    /// device list). Returns whether the entry was there.
    pub fn set_copies(&mut self, client_msg_id: u64, copies: Vec<DeviceCopy>) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.client_msg_id == client_msg_id)
        {
            Some(e) => {
                e.copies = copies;
                true
            }
            None => false,
        }
    }

    /// Removes and returns the entry for `client_msg_id` (on its `ServerAck`, or on a
    /// rejection). Acks usually arrive in sending order, so the search ends at the front.
    pub fn remove(&mut self, client_msg_id: u64) -> Option<PendingSend> {
        let i = self
            .entries
            .iter()
            .position(|e| e.client_msg_id == client_msg_id)?;
        self.entries.remove(i)
    }

    /// The waiting messages, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &PendingSend> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> PendingSend {
        PendingSend {
            client_msg_id: id,
            to: Address::device(14155550101, 0),
            msg_type: MsgType::TEXT,
            payload: Bytes::from(format!("m{id}")),
            copies: Vec::new(),
            attempts: 1,
            first_sent_at: Instant::now(),
        }
    }

    #[test]
    fn keeps_order_and_removes_on_ack() {
        let mut o = Outbox::new(10);
        for i in 1..=4 {
            assert!(o.push(entry(i)));
        }
        assert_eq!(o.remove(2).map(|e| e.client_msg_id), Some(2));
        assert_eq!(o.remove(2), None, "a second ack for the same id is a no-op");
        let ids: Vec<u64> = o.iter().map(|e| e.client_msg_id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn bounded_and_no_duplicate_ids() {
        let mut o = Outbox::new(2);
        assert!(o.push(entry(1)));
        assert!(!o.push(entry(1)), "same id twice");
        assert!(o.push(entry(2)));
        assert!(o.is_full());
        assert!(!o.push(entry(3)), "over capacity");
        assert_eq!(o.len(), 2);
        o.remove(1);
        assert!(o.push(entry(3)));
    }

    #[test]
    fn attempts_are_counted() {
        let mut o = Outbox::new(4);
        o.push(entry(9));
        o.note_attempt(9);
        o.note_attempt(9);
        o.note_attempt(10);
        assert_eq!(o.get(9).map(|e| e.attempts), Some(3));
        assert_eq!(o.get(9).map(|e| e.payload.clone()), Some(Bytes::from("m9")));
    }
}
