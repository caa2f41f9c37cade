//! Fixed-window rate limits with a bounded table.

use crate::types::HashMap;
use std::hash::Hash;

/// One key's window.
#[derive(Clone, Copy, Debug)]
struct Window {
    start_ms: u64,
    count: u32,
}

/// Counts events per key in fixed windows of `window_ms`. Holds at most `max_entries` keys;
/// when full, unknown keys are refused (fail closed) until [`RateTable::sweep`] drops windows
/// that have ended.
#[derive(Debug)]
pub(crate) struct RateTable<K> {
    windows: HashMap<K, Window>,
    window_ms: u64,
}

impl<K: Hash + Eq> RateTable<K> {
    pub fn new(window_ms: u64) -> Self {
        Self {
            windows: HashMap::default(),
            window_ms,
        }
    }

    /// Records one event for `key` at `now_ms` if fewer than `limit` happened in its current
    /// window; says whether it was allowed.
    pub fn hit(&mut self, key: K, now_ms: u64, limit: u32, max_entries: usize) -> bool {
        if let Some(w) = self.windows.get_mut(&key) {
            // `saturating_sub`: a clock that steps back keeps the window open rather than panic.
            if now_ms.saturating_sub(w.start_ms) >= self.window_ms {
                *w = Window {
                    start_ms: now_ms,
                    count: 0,
                };
            }
            if w.count >= limit {
                return false;
            }
            w.count = w.count.saturating_add(1);
            return true;
        }
        if limit == 0 || self.windows.len() >= max_entries {
            return false;
        }
        self.windows.insert(
            key,
            Window {
                start_ms: now_ms,
                count: 1,
            },
        );
        true
    }

    /// Forgets windows that have ended.
    pub fn sweep(&mut self, now_ms: u64) {
        let window_ms = self.window_ms;
        self.windows
            .retain(|_, w| now_ms.saturating_sub(w.start_ms) < window_ms);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_window_and_fails_closed_when_full() {
        let mut t = RateTable::new(1000);
        assert!(t.hit(1u32, 0, 2, 2));
        assert!(t.hit(1, 10, 2, 2));
        assert!(!t.hit(1, 20, 2, 2), "third in the window");
        assert!(t.hit(1, 1000, 2, 2), "new window");
        assert!(t.hit(2, 1000, 2, 2));
        assert!(!t.hit(3, 1000, 2, 2), "table full: unknown key refused");
        t.sweep(2500);
        assert_eq!(t.len(), 0);
        assert!(t.hit(3, 2500, 2, 2));
        assert!(!t.hit(4, 2500, 0, 2), "limit 0 refuses all");
    }
}
