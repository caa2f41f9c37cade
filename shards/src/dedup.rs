//! The sender dedup window: which `(sender, device, client_msg_id)` were stored, and when.

use std::collections::{HashMap, VecDeque};

use crate::types::DedupKey;

/// What the window remembers of a stored message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    /// The server timestamp the message was first stored with.
    pub ts_ms: u64,
    /// Its append (0 when recovered: durable).
    pub append_id: u64,
}

/// `Config::dedup_window_entries` long, evicted FIFO.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    seen: HashMap<DedupKey, Seen>,
    fifo: VecDeque<DedupKey>,
    cap: usize,
}

impl DedupWindow {
    pub fn new(cap: usize) -> Self {
        Self {
            seen: HashMap::new(),
            fifo: VecDeque::new(),
            cap,
        }
    }

    pub fn get(&self, key: &DedupKey) -> Option<Seen> {
        self.seen.get(key).copied()
    }

    pub fn insert(&mut self, key: DedupKey, seen: Seen) {
        if self.cap == 0 {
            return;
        }
        if self.seen.insert(key, seen).is_none() {
            self.fifo.push_back(key);
        }
        while self.fifo.len() > self.cap {
            if let Some(old) = self.fifo.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}
