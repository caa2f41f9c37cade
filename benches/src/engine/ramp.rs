//! The `Connect` and `Disconnect` steps: the ramp (phase `ramp`), the reconnects before other
//! phases, and taking users offline (phase `queue`).

use super::{Engine, St, Ticker};

impl Engine {
    /// Logs in the slots of accounts `lo..hi` that are not up, at `rate`/s with at most
    /// `max_pending` handshakes in flight.
    pub(super) fn step_connect(
        &mut self,
        lo: usize,
        hi: usize,
        rate: f64,
        max_pending: usize,
        deadline_ns: u64,
        t: &mut Ticker,
    ) {
        let r = self.local_range(lo, hi);
        let total = r
            .clone()
            .filter(|&s| {
                self.conns
                    .get(s as usize)
                    .is_some_and(|c| c.st != St::Ready)
            })
            .count() as u64;
        self.want(r.clone(), true);
        self.set_pacing(rate, max_pending);
        self.connect_until(r, total, deadline_ns, t);
    }

    /// Closes the slots of accounts `lo..hi` and keeps them down.
    pub(super) fn step_disconnect(&mut self, lo: usize, hi: usize) {
        let r = self.local_range(lo, hi);
        self.want(r.clone(), false);
        for s in r {
            self.close(s, None);
        }
    }
}
