//! One connection's protocol: the handshake's second half, login or registration, the frames
//! the server sends, timers (retries, SMS code polling, open-loop sends) and keepalives.

use std::cmp::Reverse;

use protocol::frame::ACK_SEQS_MAX;
use protocol::wire;
use protocol::{frame, DeviceAddr, ErrorCode, Frame, Message, MsgType, PROTOCOL_REVISION};

use crate::sys::now_ns;

use super::{
    Conn, Engine, Failure, Purpose, St, MS, TIMERS_PER_TURN, TIMER_CODE, TIMER_RETRY, TIMER_SEND,
};

impl Engine {
    pub(super) fn on_hello(&mut self, slot: u32, c: &mut Conn, msg2: &[u8]) -> Result<(), Failure> {
        let hs = c.hs.take().ok_or("no handshake state")?;
        let (t, msg3, server) = hs.read_hello(msg2).map_err(|e| format!("handshake: {e}"))?;
        if self.server_key.is_none() {
            self.server_key = Some(server);
        }
        wire::put_len(&mut c.wbuf, msg3.len());
        c.wbuf.extend_from_slice(&msg3);
        let mut t = Box::new(t);
        let global = self.global(slot);
        let phone = self.phone(global)?;
        let frame = match self.purpose {
            Purpose::Link if self.dev_index(slot) != 0 => {
                c.st = St::AwaitLinkCode;
                Frame::LinkRequest(frame::LinkRequest {
                    request_id: global as u64 + 1,
                })
            }
            Purpose::Login | Purpose::Link => {
                c.st = St::AwaitWelcome;
                let device = if self.purpose == Purpose::Link {
                    0
                } else {
                    self.device_id(global)
                };
                Frame::Login(frame::Login {
                    addr: DeviceAddr {
                        user: phone,
                        device,
                    },
                    revision: PROTOCOL_REVISION,
                    capabilities: self.capabilities(),
                })
            }
            Purpose::Register => {
                c.st = St::AwaitCodeSent;
                let len = self
                    .sms_path(phone)
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .unwrap_or(0);
                self.sms_marks.insert(slot, len);
                Frame::RegisterRequest(frame::RegisterRequest { phone })
            }
        };
        t.seal_frame(&frame, &mut c.wbuf)
            .map_err(|e| format!("seal: {e}"))?;
        c.t = Some(t);
        c.last_tx_ns = now_ns();
        Ok(())
    }

    pub(super) fn sms_path(&self, phone: u64) -> Option<std::path::PathBuf> {
        self.spec
            .data_dir
            .as_ref()
            .map(|d| d.join("sms").join(format!("{phone}.txt")))
    }

    pub(super) fn seal(c: &mut Conn, f: &Frame) -> Result<(), Failure> {
        let t = c.t.as_mut().ok_or("no transport")?;
        t.seal_frame(f, &mut c.wbuf)
            .map_err(|e| format!("seal: {e}"))?;
        c.last_tx_ns = now_ns();
        Ok(())
    }

    pub(super) fn flush_acks(&mut self, c: &mut Conn) {
        if self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        if c.t.is_some() {
            for chunk in acks.chunks(ACK_SEQS_MAX) {
                let _ = Self::seal(
                    c,
                    &Frame::Ack(frame::Ack {
                        seqs: chunk.to_vec(),
                    }),
                );
            }
        }
        self.acks = acks;
        self.acks.clear();
    }

    /// Handles one frame from the server.
    pub(super) fn on_frame(&mut self, slot: u32, c: &mut Conn, f: Frame) -> Result<(), Failure> {
        let now = now_ns();
        match f {
            Frame::Welcome(frame::Welcome { keepalive_ms, .. }) => {
                if c.st == St::AwaitWelcome {
                    self.on_welcome(slot, c, keepalive_ms, now)?;
                } else if c.st == St::AwaitLinkWelcome {
                    self.on_companion_welcome(slot, c)?;
                }
            }
            Frame::LinkCode(frame::LinkCode { code, .. }) if c.st == St::AwaitLinkCode => {
                self.on_link_code(slot, c, code)?;
            }
            Frame::Registered(frame::Registered { addr }) if c.st == St::AwaitLinked => {
                self.on_companion_registered(slot, c, addr)?;
            }
            Frame::PrekeyStatus(frame::PrekeyStatus { reason, .. }) => {
                if reason == frame::PrekeyStatusReason::UPLOADED {
                    self.on_keys_uploaded(slot, c, now);
                }
            }
            Frame::DeviceLinked(_) => self.ok_time(now),
            Frame::DeviceList(_) => self.out.device_lists += 1,
            Frame::ServerAck(frame::ServerAck { client_msg_id, .. }) => {
                self.on_server_ack(slot, c, client_msg_id, now)?;
            }
            Frame::Deliver(frame::Deliver {
                seq,
                message:
                    Message {
                        payload,
                        from,
                        msg_type,
                        ..
                    },
            }) => {
                if msg_type == MsgType::GROUP_EVENT {
                    // A membership event (the group's creation): acknowledged, not a message.
                    self.acks.push(seq);
                    self.out.group_events += 1;
                    return Ok(());
                }
                let own = self.phone(self.global(slot)).is_ok_and(|p| p == from.user);
                // A group message's payload is the group envelope; the sender's bytes follow it.
                let skip = if msg_type == MsgType::GROUP {
                    protocol::group::GROUP_ENVELOPE_HEADER_BYTES
                } else {
                    0
                };
                self.on_deliver(seq, payload.get(skip..).unwrap_or_default(), own, now);
            }
            Frame::GroupInfo(frame::GroupInfo {
                request_id, group, ..
            }) if self.spec.group_size > 0 => {
                self.groups.insert(request_id as u32, group);
                self.out.groups_created += 1;
                self.refill(slot, c, now)?;
            }
            Frame::Receipt(frame::Receipt { seq, .. }) => {
                self.acks.push(seq);
                self.out.receipts += 1;
            }
            // Group messages: the server's aggregated counts (no seq to acknowledge).
            Frame::GroupReceipt(_) => self.out.receipts += 1,
            Frame::Pong { .. } => self.out.pongs += 1,
            Frame::Ping(frame::Ping { nonce }) => {
                Self::seal(c, &Frame::Pong(frame::Pong { nonce }))?
            }
            Frame::Error(frame::Error { code, ref_id, .. }) => {
                self.on_error(slot, c, code, ref_id, now)?
            }
            Frame::GoAway { .. } => self.out.goaways += 1,
            Frame::RegisterCodeSent { .. } if c.st == St::AwaitCodeSent => {
                c.st = St::AwaitCode;
                self.timers
                    .push(Reverse((now + MS, slot, c.gen, TIMER_CODE)));
            }
            Frame::Registered { .. } if c.st == St::AwaitRegistered => {
                self.on_registered(slot, c, now);
            }
            _ => {
                *self
                    .out
                    .errors
                    .entry("unexpected_frame".into())
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    /// Logged in: count it, adopt the server's keepalive, start the step's sends.
    fn on_welcome(
        &mut self,
        slot: u32,
        c: &mut Conn,
        keepalive_ms: u32,
        now: u64,
    ) -> Result<(), Failure> {
        c.st = St::Ready;
        self.pending = self.pending.saturating_sub(1);
        self.ready += 1;
        self.out.logged_in += 1;
        self.ok_time(now);
        self.lat_hs.record_ns(now - c.t0_ns);
        c.attempts = 0;
        if self.spec.keepalive_ms == 0 && keepalive_ms > 0 {
            self.keepalive_ns = u64::from(keepalive_ms) * MS;
        }
        self.on_ready(slot, c, now)
    }

    /// ✓ for one of our sends: latency (inside the measurement window), then refill.
    fn on_server_ack(
        &mut self,
        slot: u32,
        c: &mut Conn,
        client_msg_id: u64,
        now: u64,
    ) -> Result<(), Failure> {
        let Some(i) = c.inflight.iter().position(|&(id, ..)| id == client_msg_id) else {
            return Ok(());
        };
        let (_, sched, sent) = c.inflight.remove(i).unwrap_or_default();
        self.out.acked += 1;
        if let Some(m) = &self.msg {
            if sched >= m.p.measure_from_ns && sched < m.p.measure_to_ns {
                self.lat_ack.record_ns(now.saturating_sub(sched));
                self.lat_ack_sent.record_ns(now.saturating_sub(sent));
            }
            if now >= m.p.measure_from_ns && now < m.p.measure_to_ns {
                self.out.acked_in_window += 1;
            }
        } else {
            self.lat_ack.record_ns(now.saturating_sub(sched));
        }
        self.refill(slot, c, now)
    }

    /// A message for us: ack it (batched) and take its latency from the send times in the
    /// payload (scheduled at bytes 0..8, written at 8..16).
    fn on_deliver(&mut self, seq: u64, payload: &[u8], sync: bool, now: u64) {
        self.acks.push(seq);
        self.out.delivered += 1;
        if sync {
            self.out.delivered_sync += 1;
        }
        if self.out.t_first_deliver_ns == 0 {
            self.out.t_first_deliver_ns = now;
        }
        self.out.t_last_deliver_ns = now;
        let sched = payload
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        let sent = payload
            .get(8..16)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        if let Some(m) = &self.msg {
            if sched >= m.p.measure_from_ns && sched < m.p.measure_to_ns {
                self.lat_dlv.record_ns(now.saturating_sub(sched));
                self.lat_dlv_sent.record_ns(now.saturating_sub(sent));
            }
            if now >= m.p.measure_from_ns && now < m.p.measure_to_ns {
                self.out.delivered_in_window += 1;
                if sync {
                    self.out.delivered_sync_in_window += 1;
                }
            }
        } else if sched > 0 && sched <= now {
            self.lat_dlv.record_ns(now - sched);
        }
    }

    /// An `Error`: count it by name; a refused send leaves the window; a refused registration
    /// fails the attempt.
    fn on_error(
        &mut self,
        slot: u32,
        c: &mut Conn,
        code: u16,
        ref_id: u64,
        now: u64,
    ) -> Result<(), Failure> {
        let name = ErrorCode::from_u16(code)
            .map(|c| c.name().to_owned())
            .unwrap_or_else(|| format!("code_{code}"));
        *self.out.errors.entry(name).or_default() += 1;
        if ref_id != 0 {
            if let Some(i) = c.inflight.iter().position(|&(id, ..)| id == ref_id) {
                c.inflight.remove(i);
                self.refill(slot, c, now)?;
            }
            if self.link.is_some() && self.dev_index(slot) == 0 {
                self.link_refused(
                    ref_id,
                    ErrorCode::from_u16(code).map(|c| c.name()).unwrap_or("?"),
                );
            }
        }
        if c.st == St::AwaitCodeSent || c.st == St::AwaitRegistered {
            return Err(format!(
                "registration refused: {}",
                ErrorCode::from_u16(code).map(|c| c.name()).unwrap_or("?")
            ));
        }
        Ok(())
    }

    /// Registered: count it and close the connection without counting a failure.
    fn on_registered(&mut self, slot: u32, c: &mut Conn, now: u64) {
        self.out.registered += 1;
        self.ok_time(now);
        self.lat_hs.record_ns(now - c.t0_ns);
        self.finish_conn(slot, c);
    }

    /// Done with a connection that has not logged in for the step (a registration, a linked
    /// companion): close it without counting a failure.
    pub(super) fn finish_conn(&mut self, slot: u32, c: &mut Conn) {
        c.wanted = false;
        c.sock = None;
        c.st = St::Down;
        c.t = None;
        c.wbuf = Vec::new();
        c.rbuf = Vec::new();
        c.gen = c.gen.wrapping_add(1);
        self.pending = self.pending.saturating_sub(1);
        self.sms_marks.remove(&slot);
    }

    pub(super) fn ok_time(&mut self, now: u64) {
        if self.out.t_first_ok_ns == 0 {
            self.out.t_first_ok_ns = now;
        }
        self.out.t_last_ok_ns = now;
    }

    pub(super) fn fire_timers(&mut self) {
        let now = now_ns();
        for _ in 0..TIMERS_PER_TURN {
            match self.timers.peek() {
                Some(Reverse((due, ..))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((due, slot, gen, kind))) = self.timers.pop() else {
                break;
            };
            let Some(c) = self.conns.get(slot as usize) else {
                continue;
            };
            match kind {
                TIMER_RETRY if c.wanted && c.st == St::Down => self.connect_q.push_back(slot),
                TIMER_CODE if c.gen == gen && c.st == St::AwaitCode => self.poll_code(slot, now),
                TIMER_SEND => self.open_loop_send(slot, due, now),
                _ => {}
            }
        }
    }

    pub(super) fn poll_code(&mut self, slot: u32, now: u64) {
        let phone = match self.phone(self.global(slot)) {
            Ok(phone) => phone,
            Err(e) => return self.close(slot, Some(&e)),
        };
        let mark = self.sms_marks.get(&slot).copied().unwrap_or(0);
        let code = self
            .sms_path(phone)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| {
                if (s.len() as u64) <= mark {
                    return None;
                }
                s.lines().last().and_then(|l| l.trim().parse::<u32>().ok())
            });
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        match code {
            Some(code) => {
                c.st = St::AwaitRegistered;
                if let Err(e) = Self::seal(
                    c,
                    &Frame::RegisterVerify(frame::RegisterVerify { phone, code }),
                ) {
                    self.close(slot, Some(&e));
                    return;
                }
                self.mark_dirty(slot);
            }
            None if now.saturating_sub(c.t0_ns) < self.spec.connect_timeout_ms * MS => {
                let gen = c.gen;
                self.timers
                    .push(Reverse((now + 2 * MS, slot, gen, TIMER_CODE)));
            }
            None => self.close(
                slot,
                Some("no registration code in the SMS file (is --data-dir the daemon's?)"),
            ),
        }
    }

    /// Handshake timeouts and keepalive pings.
    pub(super) fn sweep(&mut self, now: u64) {
        let timeout = self.spec.connect_timeout_ms * MS;
        for s in 0..self.conns.len() as u32 {
            let Some(c) = self.conns.get_mut(s as usize) else {
                continue;
            };
            if c.st.pending() && c.st != St::AwaitCode && now.saturating_sub(c.t0_ns) > timeout {
                self.close(s, Some("timeout"));
                continue;
            }
            if c.st == St::Ready {
                // Spread pings over [0.5, 0.8] of the keepalive interval.
                let frac = 0.5 + 0.3 * f64::from(s % 97) / 97.0;
                if now.saturating_sub(c.last_tx_ns) as f64 > self.keepalive_ns as f64 * frac {
                    let nonce = self.next_ping;
                    self.next_ping += 1;
                    if Self::seal(c, &Frame::Ping(frame::Ping { nonce })).is_ok() {
                        self.out.pings += 1;
                        self.mark_dirty(s);
                    }
                }
            }
        }
    }

    pub(super) fn on_ready(&mut self, slot: u32, c: &mut Conn, now: u64) -> Result<(), Failure> {
        if self.link.is_some() && self.dev_index(slot) == 0 {
            self.upload_keys(slot, c)?;
        }
        // Open loop: every slot's send schedule runs from the start of the phase, up or not.
        if self
            .msg
            .as_ref()
            .is_some_and(|m| m.started && m.p.offered_rate.is_none())
        {
            self.refill(slot, c, now)?;
        }
        if self.queue.as_ref().is_some_and(|q| q.started) {
            self.refill(slot, c, now)?;
        }
        Ok(())
    }

    /// Closed loop (messaging) and queue step: send until the window is full.
    pub(super) fn refill(&mut self, slot: u32, c: &mut Conn, now: u64) -> Result<(), Failure> {
        if c.st != St::Ready {
            return Ok(());
        }
        let global = self.global(slot);
        if self.msg.is_some() {
            return self.refill_messaging(c, global, now);
        }
        if self.queue.is_some() {
            return self.refill_queue(c, global, now);
        }
        Ok(())
    }
}
