//! Client-side deduplication of deliveries.
//!
//! Delivery is at-least-once: the server re-sends a `Deliver` whose `Ack` it did not get (the
//! client crashed, the connection dropped, the ack was lost). The client recognises a message
//! it already handed to the application by `(from_user, from_device, client_msg_id)` and drops
//! it (while still acknowledging it, so the server stops re-sending).
//!
//! The cache is bounded: it remembers the `capacity` most recently seen keys and forgets the
//! least recently seen one when full. A duplicate arriving after its key was forgotten is
//! delivered again, so the capacity must cover the redelivery window (the messages that can be
//! in flight unacknowledged); the default of 4096 does by a wide margin.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use protocol::{DeviceId, Message, UserId};

use crate::error::{Error, Result};

/// Identifies one message for deduplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgKey {
    /// Sender user.
    pub from_user: UserId,
    /// Sender device.
    pub from_device: DeviceId,
    /// The sender's id for the message.
    pub client_msg_id: u64,
}

impl MsgKey {
    /// The key of a delivered message.
    pub fn of(message: &Message) -> Self {
        Self {
            from_user: message.from.user,
            from_device: message.from.device,
            client_msg_id: message.client_msg_id,
        }
    }
}

/// Default number of keys remembered.
pub const DEDUP_CAPACITY_DEFAULT: usize = 4096;

/// First line of the persisted file (format and version).
const FILE_HEADER: &str = "switchboard-dedup v1";

/// A bounded least-recently-seen set of [`MsgKey`]s.
#[derive(Clone, Debug)]
pub struct DedupCache {
    capacity: usize,
    /// Monotonic recency stamp; larger is more recent.
    clock: u64,
    stamp_by_key: HashMap<MsgKey, u64>,
    key_by_stamp: BTreeMap<u64, MsgKey>,
}

impl DedupCache {
    /// An empty cache holding at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            clock: 0,
            stamp_by_key: HashMap::new(),
            key_by_stamp: BTreeMap::new(),
        }
    }

    /// Has `key` been seen (and not yet forgotten)? Does not change its recency.
    pub fn contains(&self, key: &MsgKey) -> bool {
        self.stamp_by_key.contains_key(key)
    }

    /// Records `key` as seen most recently. Returns `true` if it was new, `false` if it was
    /// already present (its recency is refreshed). Evicts the least recently seen key when the
    /// cache is full.
    pub fn insert(&mut self, key: MsgKey) -> bool {
        self.clock += 1;
        let stamp = self.clock;
        if let Some(old) = self.stamp_by_key.insert(key, stamp) {
            self.key_by_stamp.remove(&old);
            self.key_by_stamp.insert(stamp, key);
            return false;
        }
        self.key_by_stamp.insert(stamp, key);
        while self.stamp_by_key.len() > self.capacity {
            let Some((_, oldest)) = self.key_by_stamp.pop_first() else {
                break;
            };
            self.stamp_by_key.remove(&oldest);
        }
        true
    }

    /// Number of keys remembered.
    pub fn len(&self) -> usize {
        self.stamp_by_key.len()
    }

    /// Is the cache empty?
    pub fn is_empty(&self) -> bool {
        self.stamp_by_key.is_empty()
    }

    /// Most keys remembered.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The keys, least recently seen first.
    pub fn iter(&self) -> impl Iterator<Item = &MsgKey> {
        self.key_by_stamp.values()
    }

    /// Loads a cache saved by [`DedupCache::save`]; a missing file gives an empty cache. If the
    /// file holds more than `capacity` keys, the most recent ones are kept.
    pub fn load(path: &Path, capacity: usize) -> Result<Self> {
        let mut cache = Self::new(capacity);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(e) => return Err(Error::state(path, e)),
        };
        let mut lines = text.lines();
        if lines.next() != Some(FILE_HEADER) {
            return Err(Error::corrupt(
                path,
                format!("first line is not {FILE_HEADER:?}"),
            ));
        }
        for (i, line) in lines.enumerate() {
            let key = parse_line(line).ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!("line {}: expected `user device client_msg_id`", i + 2),
                )
            })?;
            cache.insert(key);
        }
        Ok(cache)
    }

    /// Writes the cache to `path` atomically (temporary file, fsync, rename), least recently
    /// seen first.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::with_capacity(32 + self.len() * 40);
        text.push_str(FILE_HEADER);
        text.push('\n');
        for k in self.iter() {
            text.push_str(&format!(
                "{} {} {}\n",
                k.from_user, k.from_device, k.client_msg_id
            ));
        }
        crate::state::write_atomic(path, text.as_bytes())
    }
}

fn parse_line(line: &str) -> Option<MsgKey> {
    let mut it = line.split_ascii_whitespace();
    let key = MsgKey {
        from_user: it.next()?.parse().ok()?,
        from_device: it.next()?.parse().ok()?,
        client_msg_id: it.next()?.parse().ok()?,
    };
    it.next().is_none().then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(id: u64) -> MsgKey {
        MsgKey {
            from_user: 14155550100,
            from_device: 0,
            client_msg_id: id,
        }
    }

    #[test]
    fn duplicates_are_recognised() {
        let mut c = DedupCache::new(8);
        assert!(c.insert(k(1)));
        assert!(!c.insert(k(1)));
        assert!(c.contains(&k(1)));
        assert!(!c.contains(&k(2)));
        // Same id from another device or user is a different message.
        assert!(c.insert(MsgKey {
            from_device: 1,
            ..k(1)
        }));
        assert!(c.insert(MsgKey {
            from_user: 7,
            ..k(1)
        }));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn evicts_least_recently_seen() {
        let mut c = DedupCache::new(3);
        for i in 1..=3 {
            c.insert(k(i));
        }
        // Refresh 1 so that 2 is now the oldest.
        assert!(!c.insert(k(1)));
        c.insert(k(4));
        assert_eq!(c.len(), 3);
        assert!(!c.contains(&k(2)));
        assert!(c.contains(&k(1)) && c.contains(&k(3)) && c.contains(&k(4)));
        let order: Vec<u64> = c.iter().map(|k| k.client_msg_id).collect();
        assert_eq!(order, vec![3, 1, 4]);
    }

    #[test]
    fn contains_does_not_refresh() {
        let mut c = DedupCache::new(2);
        c.insert(k(1));
        c.insert(k(2));
        assert!(c.contains(&k(1)));
        c.insert(k(3));
        assert!(!c.contains(&k(1)), "contains must not have refreshed key 1");
    }

    #[test]
    fn bounded_under_many_inserts() {
        let mut c = DedupCache::new(100);
        for i in 0..10_000 {
            c.insert(k(i));
        }
        assert_eq!(c.len(), 100);
        assert_eq!(c.iter().count(), 100);
        assert!(c.contains(&k(9_999)) && !c.contains(&k(9_899)));
    }

    #[test]
    fn save_and_load_round_trip_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.txt");
        assert!(DedupCache::load(&path, 10).unwrap().is_empty());
        let mut c = DedupCache::new(10);
        for i in [5, 3, 9] {
            c.insert(k(i));
        }
        c.save(&path).unwrap();
        let back = DedupCache::load(&path, 10).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            c.iter().collect::<Vec<_>>()
        );
        // Loading into a smaller cache keeps the most recent keys.
        let small = DedupCache::load(&path, 2).unwrap();
        assert_eq!(
            small.iter().map(|k| k.client_msg_id).collect::<Vec<_>>(),
            vec![3, 9]
        );
    }

    #[test]
    fn corrupt_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.txt");
        std::fs::write(&path, "switchboard-dedup v1\n1 2 x\n").unwrap();
        assert!(matches!(
            DedupCache::load(&path, 10),
            Err(Error::CorruptState { .. })
        ));
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            DedupCache::load(&path, 10),
            Err(Error::CorruptState { .. })
        ));
    }
}
