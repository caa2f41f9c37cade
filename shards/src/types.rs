//! Names for the keys the sub-states index by.

use protocol::DeviceAddr;

/// `(from, client_msg_id)`: what makes two `Send`s the same message. (Devices themselves are
/// keyed by [`DeviceAddr`]: accounts, sessions, mailboxes, prekeys.)
pub(crate) type DedupKey = (DeviceAddr, u64);
/// A Noise static public key.
pub(crate) type StaticKey = [u8; 32];
