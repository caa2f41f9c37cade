//! Names for the keys the sub-states index by.

use protocol::DeviceAddr;

/// `(from, client_msg_id)`: what makes two `Send`s the same message. (Devices themselves are
/// keyed by [`DeviceAddr`]: accounts, sessions, mailboxes, prekeys.)
pub(crate) type DedupKey = (DeviceAddr, u64);
/// A Noise static public key.
pub(crate) type StaticKey = [u8; 32];

/// The shard's hash map: std's table with foldhash's keyed fast hasher (a per-process random
/// seed, like std's SipHash keys, so colliding keys cannot be precomputed; several times
/// cheaper per lookup for the small keys here). Iteration order never reaches an action or an
/// append (the dispatcher sorts whenever it walks a map to produce output), so the seed does
/// not make the state machine less deterministic.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The shard's hash set (see [`HashMap`]).
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
