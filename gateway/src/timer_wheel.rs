//! A hashed timer wheel of connection deadlines (idle, pre-auth, closing): a fixed ring of
//! slots, each the connections whose next deadline falls in that slot's span. Advancing the
//! clock takes only the slots that passed, so a tick costs O(expiring), not a scan of every
//! connection. Deadlines past the wheel's horizon sit in its last slot and are re-armed when
//! they come up (lazy: an entry is checked against the connection's real deadlines when it
//! fires, and re-inserted if one is still ahead).

use shards::ConnId;

/// The wheel.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<ConnId>>,
    slot_ms: u64,
    /// Start of the next slot to fire, ms (a multiple of `slot_ms`).
    cursor_ms: u64,
}

impl TimerWheel {
    /// A wheel of `slots` slots of `slot_ms` each, starting at `now_ms`.
    pub fn new(slots: usize, slot_ms: u64, now_ms: u64) -> Self {
        let slot_ms = slot_ms.max(1);
        Self {
            slots: (0..slots.max(2)).map(|_| Vec::new()).collect(),
            slot_ms,
            cursor_ms: now_ms - now_ms % slot_ms,
        }
    }

    fn index(&self, at_ms: u64) -> usize {
        ((at_ms / self.slot_ms) % self.slots.len() as u64) as usize
    }

    /// Arms `id` to fire once the clock reaches `at_ms` (no earlier; at most one slot later).
    pub fn insert(&mut self, id: ConnId, at_ms: u64) {
        let horizon = self.cursor_ms + (self.slots.len() as u64 - 1) * self.slot_ms;
        let at = at_ms.clamp(self.cursor_ms, horizon);
        let i = self.index(at);
        if let Some(slot) = self.slots.get_mut(i) {
            slot.push(id);
        }
    }

    /// Moves every entry whose slot ended at or before `now_ms` into `out`.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<ConnId>) {
        let n = self.slots.len() as u64;
        let mut turns = 0;
        while self.cursor_ms + self.slot_ms <= now_ms {
            let i = self.index(self.cursor_ms);
            if let Some(slot) = self.slots.get_mut(i) {
                out.append(slot);
                if slot.capacity() > 64 && slot.capacity() > 4 * out.len().max(1) {
                    slot.shrink_to_fit();
                }
            }
            self.cursor_ms += self.slot_ms;
            turns += 1;
            if turns >= n {
                // The clock jumped past the whole wheel: everything was taken.
                self.cursor_ms = now_ms - now_ms % self.slot_ms;
                break;
            }
        }
    }

    /// Entries armed.
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    /// No entry is armed.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_no_earlier_than_the_deadline_and_only_once() {
        let mut w = TimerWheel::new(16, 100, 1_000);
        w.insert(1, 1_250);
        w.insert(2, 1_000);
        w.insert(3, 99_999); // past the horizon: parked in the last slot
        let mut out = Vec::new();
        w.expire(1_099, &mut out);
        assert!(out.is_empty());
        w.expire(1_100, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        w.expire(1_299, &mut out);
        assert!(out.is_empty());
        w.expire(1_300, &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        w.expire(1_000 + 16 * 100, &mut out);
        assert_eq!(out, vec![3]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_clock_jump_takes_everything() {
        let mut w = TimerWheel::new(8, 10, 0);
        for i in 0..8 {
            w.insert(i, i * 10);
        }
        let mut out = Vec::new();
        w.expire(1_000_000, &mut out);
        assert_eq!(out.len(), 8);
        w.insert(9, 1_000_005);
        out.clear();
        w.expire(1_000_010, &mut out);
        assert_eq!(out, vec![9]);
    }
}
