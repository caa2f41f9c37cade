//! The `Storm` step (phase `storm`): closes every connection at once and reconnects them all.

use crate::sys::now_ns;

use super::{Engine, Ticker};

impl Engine {
    /// Closes every slot, then logs them all in again with at most `max_pending` handshakes
    /// in flight; the step's clock starts after the closes.
    pub(super) fn step_storm(&mut self, max_pending: usize, deadline_ns: u64, t: &mut Ticker) {
        let all = 0..self.conns.len() as u32;
        self.want(all.clone(), false);
        for s in all.clone() {
            self.close(s, None);
        }
        self.out.t_start_ns = now_ns();
        let total = self.conns.len() as u64;
        self.want(all.clone(), true);
        self.set_pacing(0.0, max_pending);
        self.connect_until(all, total, deadline_ns, t);
    }
}
