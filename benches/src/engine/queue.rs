//! The `Queue` step (phase `queue`): the senders fill the offline users' mailboxes.

use crate::phase::QueueParams;
use crate::sys::now_ns;

use super::messaging::payload_template;
use super::{Conn, Engine, Failure, St, Ticker, MS};

/// Queue-step state.
pub(super) struct QueueState {
    pub(super) p: QueueParams,
    pub(super) started: bool,
}

impl Engine {
    /// Runs a queue step: every logged-in sender of `p.senders` sends its share of
    /// `p.messages` to `p.rcpts` (window `p.window`), until all are ✓'d or the deadline.
    pub(super) fn step_queue(&mut self, p: QueueParams, t: &mut Ticker) {
        self.payload = payload_template(p.payload);
        let deadline = p.deadline_ns;
        let r = self.local_range(p.senders.0, p.senders.1);
        // Only logged-in senders can send their share.
        let expected: u64 = r
            .clone()
            .filter(|&s| {
                self.conns
                    .get(s as usize)
                    .is_some_and(|c| c.st == St::Ready)
            })
            .map(|s| self.quota(&p, self.global(s)))
            .sum();
        for s in r {
            if let Some(c) = self.conns.get_mut(s as usize) {
                c.qnext = 0;
            }
        }
        self.queue = Some(QueueState { p, started: false });
        while now_ns() < deadline && !self.stopped() {
            if !self.queue.as_ref().is_some_and(|q| q.started) {
                self.start_queue();
            }
            let outstanding: usize = self.conns.iter().map(|c| c.inflight.len()).sum();
            if self.out.sent >= expected && outstanding == 0 {
                break;
            }
            self.turn(MS);
            let d = self.out.acked;
            t.tick(d, expected);
        }
        self.queue = None;
        for c in &mut self.conns {
            c.inflight.clear();
        }
    }

    /// Sends sender `global`'s next messages of its share until the window is full: its `k`-th
    /// is message `j = s + k * senders`, to recipient `j % recipients`.
    pub(super) fn refill_queue(
        &mut self,
        c: &mut Conn,
        global: usize,
        now: u64,
    ) -> Result<(), Failure> {
        let Some(q) = &self.queue else { return Ok(()) };
        if !q.started {
            return Ok(());
        }
        let p = q.p.clone();
        let quota = self.quota(&p, global);
        let s_count = (p.senders.1 - p.senders.0) as u64;
        let r_count = (p.rcpts.1 - p.rcpts.0).max(1) as u64;
        let s = (global.saturating_sub(p.senders.0)) as u64;
        while c.inflight.len() < p.window.max(1) && c.qnext < quota {
            let j = s + c.qnext * s_count;
            c.qnext += 1;
            let to = p.rcpts.0 + (j % r_count) as usize;
            self.send_one(c, global, to, now)?;
        }
        Ok(())
    }

    /// Starts the queue step: a full window on every logged-in sender.
    pub(super) fn start_queue(&mut self) {
        let Some(q) = self.queue.as_mut() else { return };
        q.started = true;
        let now = now_ns();
        for s in 0..self.conns.len() as u32 {
            if self.conns.get(s as usize).is_none_or(|c| c.st != St::Ready) {
                continue;
            }
            let Some(r) = self.with_conn(s, |e, c| e.refill(s, c, now)) else {
                continue;
            };
            self.mark_dirty(s);
            if let Err(e) = r {
                self.close(s, Some(&e));
            }
        }
    }

    /// Messages sender `global` sends in the queue step.
    pub(super) fn quota(&self, p: &QueueParams, global: usize) -> u64 {
        let s_count = (p.senders.1 - p.senders.0) as u64;
        if global < p.senders.0 || global >= p.senders.1 || s_count == 0 {
            return 0;
        }
        let s = (global - p.senders.0) as u64;
        if s >= p.messages {
            0
        } else {
            (p.messages - s).div_ceil(s_count)
        }
    }
}
