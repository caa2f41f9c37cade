//! The `Hold` step (phase `idle`): serves the connections (keepalive pings) until a time.

use crate::sys::now_ns;

use super::{Engine, Ticker, MS};

impl Engine {
    /// Runs the loop until `until_ns`; progress is in ms.
    pub(super) fn step_hold(&mut self, until_ns: u64, t: &mut Ticker) {
        let t0 = now_ns();
        let total = until_ns.saturating_sub(t0) / MS;
        while now_ns() < until_ns && !self.stopped() {
            self.turn(10 * MS);
            let d = (now_ns() - t0) / MS;
            t.tick(d, total);
        }
    }
}
