//! The `Message` step (phase `messaging`): closed-loop windows or open-loop schedules of 1:1
//! messages, with send times carried in the payload for the latency figures.

use std::cmp::Reverse;

use bytes::Bytes;
use protocol::{frame, Address, Frame, MsgType};
use rand::Rng;

use crate::phase::{Dist, MsgParams};
use crate::sys::now_ns;

use super::{Conn, Engine, Failure, St, Ticker, MS, PAYLOAD_MIN, TIMER_SEND};

/// Messaging-step state.
pub(super) struct MsgState {
    pub(super) p: MsgParams,
    pub(super) started: bool,
    /// Open loop: ns between two sends of one connection.
    pub(super) interval_ns: u64,
    pub(super) zipf_cdf: Vec<f64>,
}

impl Engine {
    /// Runs a messaging step: from `p.start_ns` sends (closed or open loop) until
    /// `p.measure_to_ns`, then waits (at most `p.grace_ns`) for what is in flight.
    pub(super) fn step_message(&mut self, p: MsgParams, t: &mut Ticker) {
        let senders = p.senders_total.max(1) as f64;
        let interval_ns = p
            .offered_rate
            .map(|r| (senders / r.max(1e-3) * 1e9) as u64)
            .unwrap_or(0)
            .max(1);
        let zipf_cdf = match p.dist {
            Dist::Uniform => Vec::new(),
            Dist::Zipf(s) => zipf_cdf(self.spec.phones.len() / self.devices, s),
        };
        self.payload = payload_template(p.payload);
        let (start, stop, grace) = (p.start_ns, p.measure_to_ns, p.grace_ns);
        self.msg = Some(MsgState {
            p,
            started: false,
            interval_ns,
            zipf_cdf,
        });
        let total = stop.saturating_sub(start) / MS;
        loop {
            let now = now_ns();
            if self.stopped() || now >= stop + grace {
                break;
            }
            if now >= start && !self.msg.as_ref().is_some_and(|m| m.started) {
                self.start_messaging(now);
            }
            if now >= stop && self.conns.iter().all(|c| c.inflight.is_empty()) {
                // Give deliveries in flight a moment after the last ✓.
                let until = now + (200 * MS).min(grace);
                while now_ns() < until {
                    self.turn(10 * MS);
                }
                break;
            }
            self.turn(MS);
            let d = now_ns().saturating_sub(start) / MS;
            t.tick(d.min(total), total);
        }
        self.msg = None;
        // Whatever is still outstanding is abandoned: the next step starts clean.
        for c in &mut self.conns {
            c.inflight.clear();
        }
    }

    /// Closed loop: send until the window is full (nothing in the open loop or after the
    /// measurement window).
    pub(super) fn refill_messaging(
        &mut self,
        c: &mut Conn,
        global: usize,
        now: u64,
    ) -> Result<(), Failure> {
        let Some(m) = &self.msg else { return Ok(()) };
        if !m.started || m.p.offered_rate.is_some() || now >= m.p.measure_to_ns {
            return Ok(());
        }
        if !global.is_multiple_of(self.devices) {
            // Multi-device: the primaries send; companions receive, ack and get sync copies.
            return Ok(());
        }
        if self.spec.group_size > 0 && !self.groups.contains_key(&self.slot_of(global)) {
            // Group messaging: only a group's creator sends, once its group exists.
            return Ok(());
        }
        let window = m.p.window.max(1);
        // Bounded by the window.
        while c.inflight.len() < window {
            let to = self.pick_recipient(global);
            self.send_one(c, global, to, now)?;
        }
        Ok(())
    }

    /// Starts the sends: every slot's open-loop schedule (spread over one interval), or a
    /// full window on every logged-in slot.
    pub(super) fn start_messaging(&mut self, now: u64) {
        let Some(m) = self.msg.as_mut() else { return };
        m.started = true;
        let open = m.p.offered_rate.is_some();
        let interval = m.interval_ns;
        for s in 0..self.conns.len() as u32 {
            if !open && self.conns.get(s as usize).is_none_or(|c| c.st != St::Ready) {
                continue;
            }
            if open && !(s as usize).is_multiple_of(self.devices) {
                continue;
            }
            if self.spec.group_size > 0 {
                let global = self.global(s);
                if !self.is_group_creator(global) {
                    continue;
                }
                if let Err(e) = self
                    .with_conn(s, |e, c| e.create_group(c, global))
                    .unwrap_or(Ok(()))
                {
                    self.close(s, Some(&e));
                    continue;
                }
                self.mark_dirty(s);
            }
            if open {
                let due = now + self.rng.gen_range(0..interval.max(1));
                self.timers.push(Reverse((due, s, 0, TIMER_SEND)));
            } else if let Some(r) = self.with_conn(s, |e, c| e.refill(s, c, now)) {
                self.mark_dirty(s);
                if let Err(e) = r {
                    self.close(s, Some(&e));
                }
            }
        }
    }

    /// An open-loop send of `slot` is due: send (or count it skipped) and schedule the next.
    pub(super) fn open_loop_send(&mut self, slot: u32, due: u64, now: u64) {
        let Some(m) = &self.msg else { return };
        if due >= m.p.measure_to_ns {
            return;
        }
        let interval = m.interval_ns;
        let max_inflight = m.p.max_inflight.max(1);
        self.timers
            .push(Reverse((due + interval, slot, 0, TIMER_SEND)));
        let Some(c) = self.conns.get(slot as usize) else {
            return;
        };
        let no_group = self.spec.group_size > 0 && !self.groups.contains_key(&slot);
        if c.st != St::Ready || c.inflight.len() >= max_inflight || no_group {
            self.out.skipped_sends += 1;
            return;
        }
        let global = self.global(slot);
        let to = self.pick_recipient(global);
        let Some(r) = self.with_conn(slot, |e, c| e.send_one(c, global, to, due)) else {
            return;
        };
        self.mark_dirty(slot);
        if let Err(e) = r {
            self.close(slot, Some(&e));
        }
        if due >= self.msg.as_ref().map_or(u64::MAX, |m| m.p.measure_from_ns) {
            self.lat_lag.record_ns(now.saturating_sub(due));
        }
    }

    /// A recipient account other than `me`'s, by `--dist`: the global slot of its primary.
    pub(super) fn pick_recipient(&mut self, me: usize) -> usize {
        let d = self.devices;
        self.pick_account(me / d) * d
    }

    /// An account other than `me` (account indexes), by `--dist`.
    fn pick_account(&mut self, me: usize) -> usize {
        let n = self.spec.phones.len() / self.devices;
        if n < 2 {
            return me;
        }
        let cdf = self.msg.as_ref().map(|m| &m.zipf_cdf);
        match cdf {
            Some(cdf) if !cdf.is_empty() => {
                // Bounded retries to avoid drawing oneself.
                for _ in 0..8 {
                    let u: f64 = self.rng.gen();
                    let r = cdf.partition_point(|&p| p < u).min(n - 1);
                    if r != me {
                        return r;
                    }
                }
                (me + 1) % n
            }
            _ => {
                let r = self.rng.gen_range(0..n - 1);
                if r >= me {
                    r + 1
                } else {
                    r
                }
            }
        }
    }

    /// Sends one message from `me` to `to`, scheduled at `sched_ns`, and tracks it until ✓.
    pub(super) fn send_one(
        &mut self,
        c: &mut Conn,
        me: usize,
        to: usize,
        sched_ns: u64,
    ) -> Result<(), Failure> {
        let id = (u64::from(self.spec.run_id) << 32) | u64::from(c.next_id);
        c.next_id = c.next_id.wrapping_add(1);
        if let Some(stamp) = self.payload.first_chunk_mut::<PAYLOAD_MIN>() {
            stamp[..8].copy_from_slice(&sched_ns.to_be_bytes());
            stamp[8..16].copy_from_slice(&now_ns().to_be_bytes());
            stamp[16..20].copy_from_slice(&(me as u32).to_be_bytes());
        }
        let payload = Bytes::copy_from_slice(&self.payload);
        let group = self.groups.get(&self.slot_of(me)).copied();
        let f = if let Some(group) = group {
            Frame::GroupSend(frame::GroupSend {
                client_msg_id: id,
                group,
                payload,
            })
        } else if self.spec.multi {
            // One copy per device of the recipient, one per other device of the sender.
            let d = self.devices;
            let (them, us) = (to - to % d, me - me % d);
            let copies = (them..them + d)
                .map(|g| (false, g))
                .chain((us..us + d).filter(|&g| g != me).map(|g| (true, g)))
                .map(|(own, g)| frame::DeviceCopy {
                    own,
                    device: self.device_id(g),
                    payload: payload.clone(),
                })
                .collect();
            Frame::SendMulti(frame::SendMulti {
                client_msg_id: id,
                to_user: self.phone(to)?,
                msg_type: MsgType::TEXT,
                copies,
            })
        } else {
            Frame::Send(frame::Send {
                client_msg_id: id,
                to: Address::device(self.phone(to)?, self.device_id(to)),
                msg_type: MsgType::TEXT,
                payload,
            })
        };
        let before = c.wbuf.len();
        Self::seal(c, &f)?;
        self.out.send_wire_bytes += c.wbuf.len().saturating_sub(before) as u64;
        c.inflight.push_back((id, sched_ns, now_ns()));
        self.out.sent += 1;
        Ok(())
    }
}

impl Engine {
    /// The local slot of global slot `global`.
    fn slot_of(&self, global: usize) -> u32 {
        global.saturating_sub(self.spec.base) as u32
    }

    /// Group messaging: whether the account of `global` (its primary) creates and sends to a
    /// group: the first account of every run of `group_size` accounts.
    pub(super) fn is_group_creator(&self, global: usize) -> bool {
        let (d, size) = (self.devices, self.spec.group_size);
        size > 0 && global.is_multiple_of(d) && (global / d).is_multiple_of(size)
    }

    /// Sends `GroupCreate` for the group `global`'s account creates: the next `group_size − 1`
    /// accounts of the run (fewer at the end). The answer (`GroupInfo`) starts its sends.
    fn create_group(&mut self, c: &mut Conn, global: usize) -> Result<(), Failure> {
        if c.st != St::Ready || self.groups.contains_key(&self.slot_of(global)) {
            return Ok(());
        }
        let (d, size) = (self.devices, self.spec.group_size);
        let accounts = self.spec.phones.len() / d;
        let first = global / d;
        let members = (first + 1..(first + size).min(accounts))
            .map(|a| self.phone(a * d))
            .collect::<Result<Vec<_>, _>>()?;
        let f = Frame::GroupCreate(frame::GroupCreate {
            request_id: u64::from(self.slot_of(global)),
            members: protocol::group::UserList::of(members),
        });
        Self::seal(c, &f)
    }
}

/// A payload of `n` bytes (at least [`PAYLOAD_MIN`]); the first 20 are overwritten per send.
pub(super) fn payload_template(n: usize) -> Vec<u8> {
    let n = n.max(PAYLOAD_MIN);
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Cumulative Zipf(s) probabilities over ranks 1..=n (index 0 is rank 1).
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    for x in &mut w {
        acc += *x / total;
        *x = acc;
    }
    if let Some(last) = w.last_mut() {
        *last = 1.0;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_a_cdf_and_skewed() {
        let c = zipf_cdf(1000, 1.1);
        assert_eq!(c.len(), 1000);
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert!((c[999] - 1.0).abs() < 1e-12);
        assert!(c[0] > 0.1, "rank 1 is hot: {}", c[0]);
    }
}
