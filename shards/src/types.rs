//! Names for the keys the sub-states index by.

use protocol::{DeviceId, UserId};

/// A device of a user: the key of accounts, sessions and mailboxes.
pub(crate) type DeviceKey = (UserId, DeviceId);
/// `(from_user, from_device, client_msg_id)`: what makes two `Send`s the same message.
pub(crate) type DedupKey = (UserId, DeviceId, u64);
/// A Noise static public key.
pub(crate) type StaticKey = [u8; 32];
