//! The message and the receipt as the server stores and delivers them.
//!
//! A [`Message`] is what a `Send` becomes once the server has accepted it: the sender's device,
//! the sender's id for it, the server's timestamp, its type and the payload. The `Deliver` frame
//! carries one whole, after the mailbox sequence number; so does every layer between the
//! gateway that accepted it and the one that delivers it. [`ReceiptInfo`] is the same for a
//! delivered / read receipt and the `Receipt` frame.

use bytes::Bytes;

use crate::addr::DeviceAddr;
use crate::codec::{Field, Invalid};

wire_enum! {
    /// Message type carried with a `Send`: it sets the message's priority when a full mailbox
    /// is pruned (the seeds' order: calls, voice, image, text, status). Unknown values are
    /// stored and delivered as given and ranked like text.
    pub struct MsgType(u8) {
        /// Text message.
        TEXT = 0,
        /// Image.
        IMAGE = 1,
        /// Voice message.
        VOICE = 2,
        /// Call signalling.
        CALL = 3,
        /// Status update.
        STATUS = 4,
        /// A missed call, stored by the server in each device of the callee when a ring times
        /// out (`docs/protocol.md` §21): `from` is the calling device, `client_msg_id` the
        /// `call_id`, the payload empty. Pruned like a call.
        MISSED_CALL = 0x60,
        /// A group message (capability `GROUPS`): the payload is a `group::GroupEnvelope`
        /// around the sender's Sender Key ciphertext, built by the group's home shard.
        GROUP = 0x40,
        /// A group membership event (capability `GROUPS`): a `group::GroupEnvelope` around a
        /// `group::GroupEvent`, in the group's order with its messages.
        GROUP_EVENT = 0x41,
    }
}

impl MsgType {
    /// Pruning priority: higher survives longer.
    pub fn priority(self) -> u8 {
        match self {
            MsgType::CALL | MsgType::MISSED_CALL => 100,
            MsgType::VOICE => 50,
            MsgType::IMAGE => 30,
            MsgType::STATUS => 5,
            // A lost membership event would leave a member device with a wrong member list.
            MsgType::GROUP_EVENT => 60,
            _ => 10,
        }
    }
}

/// Any byte is a message type (unknown ones are carried as given).
impl Field for MsgType {
    type Wire = u8;
    fn to_wire(&self) -> u8 {
        self.0
    }
    fn from_wire(wire: &u8) -> Result<Self, Invalid> {
        Ok(MsgType(*wire))
    }
}

wire_enum! {
    /// What a receipt reports.
    pub struct ReceiptKind(u8) {
        /// ✓✓: the recipient device acknowledged the message.
        DELIVERED = 1,
        /// Blue ✓✓: the recipient read it.
        READ = 2,
        /// To the reader's own other devices (capability `MULTI_DEVICE`): another device of
        /// this account read the message `client_msg_id` from `from` (the original sender),
        /// so its unread mark clears here too.
        READ_ELSEWHERE = 3,
    }
}

// Only the known kinds decode: a `Receipt` with another kind byte is a malformed frame (the
// server never sends one, so a client cannot have asked for it).
known_u8_field!(ReceiptKind, "receipt kind");

wire_struct! {
    /// One accepted message, as stored in a mailbox and delivered. On the wire (inside
    /// `Deliver`, after `seq`): `from_user u64, from_device u16, client_msg_id u64,
    /// server_ts_ms u64, msg_type u8` (27 bytes), then the payload to the end of the frame.
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    pub struct Message {
        /// The sending device.
        from: DeviceAddr,
        /// The sender's id for the message, unique per sending device (the dedup key with
        /// `from`).
        client_msg_id: u64,
        /// When the server accepted it, ms since the Unix epoch (server clock).
        server_ts_ms: u64,
        /// Sets pruning priority.
        msg_type: MsgType,
        ..
        /// Opaque payload (end-to-end ciphertext); a slice of the buffer it was received in.
        payload: Bytes,
    }
}

wire_struct! {
    /// A delivered / read receipt, as stored in a mailbox and delivered. On the wire (inside
    /// `Receipt`, after `seq`): `from_user u64, from_device u16, client_msg_id u64, kind u8,
    /// ts_ms u64` (27 bytes).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ReceiptInfo {
        /// The device that received / read the message.
        from: DeviceAddr,
        /// The original message's `client_msg_id`.
        client_msg_id: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// When it happened, ms since the Unix epoch (server clock).
        ts_ms: u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_names_and_unknown_numbers() {
        assert_eq!(format!("{:?}", MsgType::VOICE), "VOICE");
        assert_eq!(format!("{:?}", MsgType(9)), "MsgType(9)");
        assert_eq!(format!("{:?}", ReceiptKind::READ), "READ");
        assert_eq!(format!("{:?}", ReceiptKind(0)), "ReceiptKind(0)");
        assert!(!ReceiptKind(4).is_known());
        assert_eq!(ReceiptKind::known(2), Some(ReceiptKind::READ));
        assert_eq!(ReceiptKind::known(4), None);
        assert_eq!(
            ReceiptKind::ALL,
            &[
                ReceiptKind::DELIVERED,
                ReceiptKind::READ,
                ReceiptKind::READ_ELSEWHERE
            ]
        );
    }

    #[test]
    fn priorities_are_the_documented_ones() {
        let p: Vec<u8> = MsgType::ALL.iter().map(|t| t.priority()).collect();
        assert_eq!(p, [10, 30, 50, 100, 5, 100, 10, 60]);
        assert_eq!(MsgType(200).priority(), MsgType::TEXT.priority());
    }

    #[test]
    fn unknown_receipt_kinds_do_not_decode() {
        assert_eq!(ReceiptKind::from_wire(&2), Ok(ReceiptKind::READ));
        assert_eq!(ReceiptKind::from_wire(&3), Ok(ReceiptKind::READ_ELSEWHERE));
        assert_eq!(ReceiptKind::from_wire(&4), Err("receipt kind"));
        assert_eq!(MsgType::from_wire(&77), Ok(MsgType(77)));
    }
}
