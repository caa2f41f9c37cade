//! Sockets: pacing and starting connections, the epoll turn, reading records and writing
//! queued bytes, closing and retrying.

use std::cmp::Reverse;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};

use bytes::Bytes;
use protocol::noise::{ClientAwaitingHello, ClientHandshake};
use protocol::wire::{self, Check};
use protocol::{Frame, PREAMBLE};
use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, now_ns, Errno, EV_HUP, EV_IN, EV_OUT};

use super::{
    Conn, Engine, Failure, St, MS, READS_PER_EVENT, STARTS_PER_TURN, SWEEP_NS, TIMER_RETRY,
};

impl Engine {
    /// One turn: start paced connections, wait for readiness (at most `max_wait_ns`), handle
    /// it, fire due timers, sweep, flush.
    pub(super) fn turn(&mut self, max_wait_ns: u64) {
        self.start_connects();
        let now = now_ns();
        let mut wait = max_wait_ns;
        if let Some(Reverse((due, ..))) = self.timers.peek() {
            wait = wait.min(due.saturating_sub(now));
        }
        if !self.more_reads.is_empty() {
            wait = 0;
        } else if !self.connect_q.is_empty() && self.pending < self.max_pending {
            if self.rate > 0.0 {
                let next = self.rate_t0 + (self.rate_started as f64 / self.rate * 1e9) as u64;
                wait = wait.min(next.saturating_sub(now));
            } else {
                wait = 0;
            }
        }
        let timeout_ms = wait.div_ceil(MS).min(1000) as i32;
        let mut events = std::mem::take(&mut self.events);
        match self.ep.wait(&mut events, timeout_ms) {
            Ok(_) => {}
            Err(e) => {
                eprintln!("switchboard-flood: epoll_wait: {e}");
            }
        }
        for ev in events.iter() {
            let token = sys::event_token(ev);
            let flags = sys::event_flags(ev);
            let slot = (token & 0xffff_ffff) as u32;
            let gen = (token >> 32) as u32;
            if self
                .conns
                .get(slot as usize)
                .is_none_or(|c| c.gen != gen || c.sock.is_none())
            {
                continue;
            }
            if flags & EV_OUT != 0 {
                self.flush(slot);
            }
            if flags & (EV_IN | EV_HUP) != 0 {
                self.on_readable(slot);
            }
        }
        self.events = events;
        for slot in std::mem::take(&mut self.more_reads) {
            self.on_readable(slot);
        }
        self.fire_timers();
        let now = now_ns();
        if now >= self.next_sweep_ns {
            self.next_sweep_ns = now + SWEEP_NS;
            self.sweep(now);
        }
        self.flush_dirty();
    }

    pub(super) fn start_connects(&mut self) {
        if self.connect_q.is_empty() {
            return;
        }
        let now = now_ns();
        let mut budget = STARTS_PER_TURN as u64;
        if self.rate > 0.0 {
            let allowed = ((now.saturating_sub(self.rate_t0)) as f64 / 1e9 * self.rate) as u64 + 1;
            budget = budget.min(allowed.saturating_sub(self.rate_started));
        }
        while budget > 0 && self.pending < self.max_pending {
            let Some(s) = self.connect_q.pop_front() else {
                break;
            };
            let down_and_wanted = self
                .conns
                .get(s as usize)
                .is_some_and(|c| c.wanted && c.st == St::Down);
            if !down_and_wanted {
                continue;
            }
            budget -= 1;
            self.rate_started += 1;
            self.start_connect(s);
        }
    }

    pub(super) fn start_connect(&mut self, slot: u32) {
        let global = self.global(slot);
        let target = self.spec.target;
        let ips = &self.spec.source_ips;
        let src = global
            .checked_rem(ips.len())
            .and_then(|i| ips.get(i))
            .copied();
        let Some(key) = self.keys.get(slot as usize) else {
            return;
        };
        let res = (|| -> io::Result<(TcpStream, ClientAwaitingHello, Vec<u8>)> {
            let sock = Socket::new(
                Domain::for_address(target),
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            sock.set_nodelay(true)?;
            if let Some(ip) = src {
                if matches!(ip, IpAddr::V4(_)) {
                    let _ = sys::set_bind_address_no_port(&sock);
                }
                sock.bind(&std::net::SocketAddr::new(ip, 0).into())?;
            }
            match sock.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if sys::errno(&e) == Some(Errno::INPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let (hs, msg1) =
                ClientHandshake::start(key).map_err(|e| io::Error::other(e.to_string()))?;
            let mut w = Vec::with_capacity(PREAMBLE.len() + 2 + msg1.len());
            w.extend_from_slice(&PREAMBLE);
            wire::put_len(&mut w, msg1.len());
            w.extend_from_slice(&msg1);
            Ok((sock.into(), hs, w))
        })();
        self.out.connects_started += 1;
        let now = now_ns();
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        c.attempts = c.attempts.saturating_add(1);
        c.t0_ns = now;
        match res {
            Ok((stream, hs, w)) => {
                c.gen = c.gen.wrapping_add(1);
                let token = (u64::from(c.gen) << 32) | u64::from(slot);
                if let Err(e) = self.ep.add(&stream, token) {
                    self.attempt_failed(slot, &format!("epoll: {e}"));
                    return;
                }
                let Some(c) = self.conns.get_mut(slot as usize) else {
                    return;
                };
                c.sock = Some(stream);
                c.st = St::AwaitHello;
                c.hs = Some(Box::new(hs));
                c.t = None;
                c.rbuf = Vec::new();
                c.wbuf = w;
                c.last_tx_ns = now;
                c.inflight.clear();
                self.pending += 1;
                self.mark_dirty(slot);
            }
            Err(e) => {
                let reason = io_reason(&e);
                self.attempt_failed(slot, &reason);
            }
        }
    }

    /// An attempt failed before login/registration completed: retry later or give up.
    pub(super) fn attempt_failed(&mut self, slot: u32, reason: &str) {
        self.out.attempt_failures += 1;
        *self.out.fail_reasons.entry(reason.to_owned()).or_default() += 1;
        let max = self.spec.max_attempts.max(1);
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.wanted && u32::from(c.attempts) < max {
            let backoff = (100 * MS) << c.attempts.min(4);
            let jitter = self.rng.gen_range(0..=backoff / 2);
            let due = now_ns() + backoff + jitter;
            let gen = c.gen;
            self.timers.push(Reverse((due, slot, gen, TIMER_RETRY)));
        } else if c.wanted {
            c.wanted = false;
            self.out.gave_up += 1;
            self.link_gave_up(slot);
        }
    }

    /// Closes a slot's socket. `failure` is set when an attempt (not a logged-in connection)
    /// failed; a logged-in connection that is closed while wanted counts as a disconnect.
    pub(super) fn close(&mut self, slot: u32, failure: Option<&str>) {
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.sock.is_none() {
            return;
        }
        let was = c.st;
        c.sock = None; // closing the descriptor removes it from the epoll set
        c.st = St::Down;
        c.hs = None;
        c.t = None;
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        c.inflight.clear();
        c.gen = c.gen.wrapping_add(1);
        let wanted = c.wanted;
        if was.pending() {
            self.pending = self.pending.saturating_sub(1);
        }
        if was == St::Ready {
            self.ready = self.ready.saturating_sub(1);
            if wanted {
                self.out.disconnects += 1;
            }
        }
        self.sms_marks.remove(&slot);
        if let Some(reason) = failure {
            if was.pending() {
                self.attempt_failed(slot, reason);
            } else if was == St::Ready && wanted {
                // A logged-in connection lost while the step wants it: reconnect (counted).
                *self
                    .out
                    .fail_reasons
                    .entry(format!("lost: {reason}"))
                    .or_default() += 1;
                if let Some(c) = self.conns.get_mut(slot as usize) {
                    c.attempts = 0;
                }
                self.connect_q.push_back(slot);
            }
        }
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &s in &dirty {
            if let Some(c) = self.conns.get_mut(s as usize) {
                c.dirty = false;
            }
            self.flush(s);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes what the connection has queued until the socket would block.
    pub(super) fn flush(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        let Some(sock) = c.sock.as_mut() else { return };
        let mut off = 0usize;
        let mut err = None;
        // Bounded: every successful write makes progress through a finite buffer.
        while let Some(rest) = c.wbuf.get(off..).filter(|r| !r.is_empty()) {
            match sock.write(rest) {
                Ok(0) => {
                    err = Some("write returned 0".to_owned());
                    break;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if sys::errno(&e) == Some(Errno::NOTCONN) => break, // still connecting
                Err(e) => {
                    err = Some(io_reason(&e));
                    break;
                }
            }
        }
        if off > 0 {
            if off == c.wbuf.len() {
                // Free the buffer of a connection that has nothing to send.
                if c.wbuf.capacity() > 4096 {
                    c.wbuf = Vec::new();
                } else {
                    c.wbuf.clear();
                }
            } else {
                c.wbuf.drain(..off);
            }
        }
        if let Some(e) = err {
            self.close(slot, Some(&e));
        }
    }

    /// Handles the `n` bytes just read into `scratch`: whole records are processed, an
    /// incomplete tail is kept in the connection's buffer.
    fn absorb(
        &mut self,
        slot: u32,
        c: &mut Conn,
        scratch: &mut [u8],
        n: usize,
    ) -> Result<(), Failure> {
        let len = scratch.len();
        let Some(got) = scratch.get_mut(..n) else {
            return Err(format!("read {n} bytes into a {len}-byte buffer"));
        };
        if c.rbuf.is_empty() {
            // Fast path: parse in place in the scratch buffer; keep only the tail.
            let r = self.process(slot, c, got);
            if let Ok(used) = r {
                c.rbuf
                    .extend_from_slice(got.get(used..).unwrap_or_default());
            }
            r.map(|_| ())
        } else {
            c.rbuf.extend_from_slice(got);
            let mut buf = std::mem::take(&mut c.rbuf);
            let r = self.process(slot, c, &mut buf);
            if let Ok(used) = r {
                buf.drain(..used);
                c.rbuf = if buf.is_empty() { Vec::new() } else { buf };
            }
            r.map(|_| ())
        }
    }

    /// Reads what the socket has (at most [`READS_PER_EVENT`] reads; the rest next turn),
    /// handles it, and queues the acks it produced.
    pub(super) fn on_readable(&mut self, slot: u32) {
        let Some(home) = self.conns.get_mut(slot as usize) else {
            return;
        };
        let mut c = std::mem::take(home);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut failure: Option<Failure> = None;
        let mut eof = false;
        let mut more = false;
        for i in 0..READS_PER_EVENT {
            let Some(sock) = c.sock.as_mut() else { break };
            match sock.read(&mut scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if let Err(e) = self.absorb(slot, &mut c, &mut scratch, n) {
                        failure = Some(e);
                        break;
                    }
                    if c.sock.is_none() {
                        break; // closed while handling (registration done)
                    }
                    if n < scratch.len() {
                        break; // drained the socket for now (edge-triggered: a short read)
                    }
                    if i + 1 == READS_PER_EVENT {
                        more = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(io_reason(&e));
                    break;
                }
            }
        }
        self.flush_acks(&mut c);
        let has_out = !c.wbuf.is_empty();
        if let Some(home) = self.conns.get_mut(slot as usize) {
            *home = c;
        }
        self.scratch = scratch;
        if has_out {
            self.mark_dirty(slot);
        }
        if more {
            self.more_reads.push(slot);
        }
        if let Some(e) = failure {
            self.close(slot, Some(&e));
        } else if eof {
            self.close(slot, Some("closed by server"));
        }
    }

    /// Parses and handles every complete record at the front of `buf`; returns bytes used.
    pub(super) fn process(
        &mut self,
        slot: u32,
        c: &mut Conn,
        buf: &mut [u8],
    ) -> Result<usize, Failure> {
        let mut pos = 0usize;
        // Bounded: each iteration consumes at least one whole record.
        while let Some(rest) = buf.get_mut(pos..).filter(|r| !r.is_empty()) {
            let total = match wire::check(rest, 1, wire::RECORD_BODY_MAX) {
                Ok(Check::Complete { total }) => total,
                Ok(Check::Incomplete { .. }) => break,
                Err(e) => return Err(format!("bad record: {e}")),
            };
            let body = rest
                .get_mut(wire::LEN_PREFIX_BYTES..total)
                .ok_or_else(|| format!("bad record: length {total}"))?;
            pos += total;
            if c.st == St::AwaitHello {
                self.on_hello(slot, c, body)?;
                continue;
            }
            let Some(t) = c.t.as_mut() else {
                return Err("record before handshake".into());
            };
            let n = t.open_record(body).map_err(|e| format!("open: {e}"))?;
            let plain = body.get(..n).ok_or("open: length past the record")?;
            let frame =
                Frame::decode(Bytes::copy_from_slice(plain)).map_err(|e| format!("decode: {e}"))?;
            self.on_frame(slot, c, frame)?;
            if c.sock.is_none() {
                break;
            }
        }
        Ok(pos)
    }
}

/// A short text for a socket error (the key it is counted under in `fail_reasons`).
pub(super) fn io_reason(e: &io::Error) -> String {
    match sys::errno(e) {
        Some(Errno::CONNREFUSED) => "connection refused".into(),
        Some(Errno::CONNRESET) => "connection reset".into(),
        Some(Errno::PIPE) => "broken pipe".into(),
        Some(Errno::MFILE) | Some(Errno::NFILE) => "out of file descriptors".into(),
        Some(Errno::ADDRNOTAVAIL) => "no source port/address available".into(),
        Some(Errno::TIMEDOUT) => "connect timed out".into(),
        _ => e.to_string(),
    }
}
