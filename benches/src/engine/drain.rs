//! The `Drain` step (phase `drain`): logs the offline users in at once and counts what their
//! mailboxes deliver.

use crate::sys::now_ns;

use super::{Engine, Ticker, MS};

impl Engine {
    /// Connects the slots of accounts `lo..hi` (at most `max_pending` handshakes in flight)
    /// until `expected` deliveries arrived, nothing more arrives for 5 s, or the deadline.
    pub(super) fn step_drain(
        &mut self,
        lo: usize,
        hi: usize,
        expected: u64,
        max_pending: usize,
        deadline_ns: u64,
        t: &mut Ticker,
    ) {
        let r = self.local_range(lo, hi);
        self.want(r, true);
        self.set_pacing(0.0, max_pending);
        let mut last = (0u64, now_ns());
        while now_ns() < deadline_ns && !self.stopped() {
            if self.out.delivered >= expected && self.pending == 0 {
                break;
            }
            let now = now_ns();
            if self.out.delivered != last.0 {
                last = (self.out.delivered, now);
            } else if last.0 > 0 && self.pending == 0 && now - last.1 > 5_000 * MS {
                break; // nothing more arrives: fewer were queued than expected
            }
            self.turn(5 * MS);
            let d = self.out.delivered;
            t.tick(d, expected);
        }
        // Let the last acks go out.
        let until = now_ns() + 100 * MS;
        while now_ns() < until {
            self.turn(5 * MS);
        }
    }
}
