//! Records persisted in a shard's log.

use bytes::Bytes;

/// One persisted record. Encoding/decoding lives beside it; every variant has a one-byte tag
/// on disk so later record kinds (prekeys, groups) can be added without a new format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message queued in a device's mailbox.
    Message {
        /// Mailbox sequence number, unique within the shard, increasing.
        seq: u64,
        /// Recipient user.
        to_user: u64,
        /// Recipient device.
        to_device: u16,
        /// Sender user.
        from_user: u64,
        /// Sender device.
        from_device: u16,
        /// Sender's message id (dedup key with the sender).
        client_msg_id: u64,
        /// Server accept time, ms since the Unix epoch.
        ts_ms: u64,
        /// Message type (pruning priority).
        msg_type: u8,
        /// Opaque end-to-end ciphertext.
        payload: Bytes,
    },
    /// A receipt queued in a device's mailbox (for the original sender).
    Receipt {
        /// Mailbox sequence number.
        seq: u64,
        /// Who gets the receipt (the original sender).
        to_user: u64,
        /// Its device.
        to_device: u16,
        /// Who received/read the message.
        from_user: u64,
        /// Their device.
        from_device: u16,
        /// The original message id.
        client_msg_id: u64,
        /// 1 delivered, 2 read.
        kind: u8,
        /// When, ms since the Unix epoch.
        ts_ms: u64,
    },
    /// The mailbox entry `seq` was delivered and acknowledged, or pruned: it is dead.
    Tombstone {
        /// The dead entry.
        seq: u64,
    },
    /// A device of a user and the static key it logs in with (home shard of `user`).
    Account {
        /// The user (phone number).
        user: u64,
        /// The device.
        device: u16,
        /// Its Noise static public key.
        static_key: [u8; 32],
        /// When bound.
        ts_ms: u64,
    },
    /// Reverse index: which (user, device) a static key is bound to (shard of hash(key)).
    KeyBinding {
        /// The Noise static public key.
        static_key: [u8; 32],
        /// Bound user.
        user: u64,
        /// Bound device.
        device: u16,
        /// When bound.
        ts_ms: u64,
    },
}
