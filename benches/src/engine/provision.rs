//! The `Provision` step (phase `provision`): registers every account of this worker,
//! `concurrency` at a time.

use crate::sys::now_ns;

use super::{Engine, Purpose, Ticker, MS};

impl Engine {
    /// Connects every slot with the registration purpose until all registered or gave up.
    pub(super) fn step_provision(&mut self, concurrency: usize, deadline_ns: u64, t: &mut Ticker) {
        self.purpose = Purpose::Register;
        let all = 0..self.conns.len() as u32;
        self.want(all.clone(), true);
        self.set_pacing(0.0, concurrency);
        let total = self.conns.len() as u64;
        while now_ns() < deadline_ns && !self.stopped() {
            if self.out.registered + self.out.gave_up >= total && self.pending == 0 {
                break;
            }
            self.turn(10 * MS);
            let d = self.out.registered;
            t.tick(d, total);
        }
        self.want(all, false);
        self.purpose = Purpose::Login;
    }
}
