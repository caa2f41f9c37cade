//! The flood generator's event loop: one thread, one epoll instance, thousands of non-blocking
//! client connections speaking the real protocol (preamble, Noise XX, Login or registration,
//! sealed frames).
//!
//! Per-connection memory is kept small: a connection holds its socket, its transport cipher
//! state (boxed), and receive/send buffers that are empty (unallocated) whenever nothing is
//! partially read or waiting to be written. Received bytes are parsed straight out of one shared
//! 64 KiB scratch buffer; only an incomplete record tail is copied into the connection.
//!
//! Every loop is bounded: reads per readiness event, connection starts and timer firings per
//! turn, and each step runs until its own deadline at the latest.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use bytes::Bytes;
use protocol::frame::ACK_SEQS_MAX;
use protocol::noise::{ClientAwaitingHello, ClientHandshake, StaticKeypair, Transport};
use protocol::wire::{self, Check};
use protocol::{capability, Address, ErrorCode, Frame, PREAMBLE, PROTOCOL_REVISION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};

use crate::accounts::hex;
use crate::phase::{Cmd, Dist, MsgParams, Outcome, QueueParams, Report, WorkerSpec};
use crate::stats::Lat;
use crate::sys::{self, now_ns, Epoll, Errno, EV_HUP, EV_IN, EV_OUT};

const MS: u64 = 1_000_000;
/// Reads per readiness event before moving on (64 KiB each); the rest is read next turn.
const READS_PER_EVENT: usize = 16;
/// Connection starts per loop turn, so reading keeps up during a burst.
const STARTS_PER_TURN: usize = 512;
/// Timer firings per loop turn.
const TIMERS_PER_TURN: usize = 4096;
/// Timeout and keepalive sweep period.
const SWEEP_NS: u64 = 250 * MS;
/// Progress report period.
const PROGRESS_NS: u64 = 500 * MS;
/// Receive scratch buffer.
const SCRATCH: usize = 64 * 1024;
/// Payload bytes that carry the scheduled and actual send times and the sender's index.
pub const PAYLOAD_MIN: usize = 20;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum St {
    /// No socket.
    #[default]
    Down,
    /// Socket connecting / preamble + msg1 queued; waiting for msg2.
    AwaitHello,
    /// msg3 and Login sent; waiting for Welcome.
    AwaitWelcome,
    /// Logged in.
    Ready,
    /// RegisterRequest sent.
    AwaitCodeSent,
    /// Waiting for the code to appear in the SMS file.
    AwaitCode,
    /// RegisterVerify sent.
    AwaitRegistered,
}

impl St {
    fn pending(self) -> bool {
        !matches!(self, St::Down | St::Ready)
    }
}

/// One client connection.
#[derive(Default)]
struct Conn {
    sock: Option<TcpStream>,
    st: St,
    /// Bumped for every new socket: stale readiness events and timers are ignored.
    gen: u32,
    /// Whether the current step wants this connection up (failures are retried).
    wanted: bool,
    /// In the dirty list.
    dirty: bool,
    attempts: u8,
    hs: Option<Box<ClientAwaitingHello>>,
    t: Option<Box<Transport>>,
    /// Incomplete record tail.
    rbuf: Vec<u8>,
    /// Sealed bytes not yet written.
    wbuf: Vec<u8>,
    /// Attempt start.
    t0_ns: u64,
    /// Last frame written.
    last_tx_ns: u64,
    next_id: u32,
    /// Sends waiting for ✓: (client_msg_id, scheduled send time, actual send time).
    inflight: VecDeque<(u64, u64, u64)>,
    /// Queue phase: next message number `k` of this sender (message `j = s + k*S`).
    qnext: u64,
}

/// What a new connection does after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Login,
    Register,
}

/// Messaging-phase state.
struct MsgState {
    p: MsgParams,
    started: bool,
    /// Open loop: ns between two sends of one connection.
    interval_ns: u64,
    zipf_cdf: Vec<f64>,
}

/// Queue-step state.
struct QueueState {
    p: QueueParams,
    started: bool,
}

const TIMER_SEND: u8 = 0;
const TIMER_RETRY: u8 = 1;
const TIMER_CODE: u8 = 2;

/// The event loop of one worker. See the module docs.
pub struct Engine {
    spec: WorkerSpec,
    keys: Vec<StaticKeypair>,
    conns: Vec<Conn>,
    ep: Epoll,
    events: Vec<sys::Event>,
    scratch: Vec<u8>,
    acks: Vec<u64>,
    dirty: Vec<u32>,
    /// (due, slot, gen, kind).
    timers: BinaryHeap<Reverse<(u64, u32, u32, u8)>>,
    connect_q: VecDeque<u32>,
    rate: f64,
    rate_t0: u64,
    rate_started: u64,
    max_pending: usize,
    pending: usize,
    ready: usize,
    purpose: Purpose,
    out: Outcome,
    lat_hs: Lat,
    lat_ack: Lat,
    lat_dlv: Lat,
    lat_lag: Lat,
    lat_ack_sent: Lat,
    lat_dlv_sent: Lat,
    msg: Option<MsgState>,
    queue: Option<QueueState>,
    rng: StdRng,
    payload: Vec<u8>,
    keepalive_ns: u64,
    next_sweep_ns: u64,
    /// Registration: SMS file length before the request, per slot.
    sms_marks: HashMap<u32, u64>,
    next_ping: u64,
    stop: Arc<AtomicBool>,
    server_key: Option<[u8; 32]>,
    /// Slots whose reads were cut short by [`READS_PER_EVENT`].
    more_reads: Vec<u32>,
}

impl Engine {
    /// An engine for `spec`'s accounts. Fails if an account key does not parse or epoll fails.
    pub fn new(spec: WorkerSpec, stop: Arc<AtomicBool>) -> io::Result<Self> {
        let keys = spec
            .accounts
            .iter()
            .map(|a| {
                a.keypair().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad key for {}", a.phone),
                    )
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let n = keys.len();
        Ok(Self {
            keys,
            conns: (0..n).map(|_| Conn::default()).collect(),
            ep: Epoll::new()?,
            events: Vec::with_capacity(1024),
            scratch: vec![0u8; SCRATCH],
            acks: Vec::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            connect_q: VecDeque::new(),
            rate: 0.0,
            rate_t0: 0,
            rate_started: 0,
            max_pending: usize::MAX,
            pending: 0,
            ready: 0,
            purpose: Purpose::Login,
            out: Outcome::default(),
            lat_hs: Lat::new(),
            lat_ack: Lat::new(),
            lat_dlv: Lat::new(),
            lat_lag: Lat::new(),
            lat_ack_sent: Lat::new(),
            lat_dlv_sent: Lat::new(),
            msg: None,
            queue: None,
            rng: StdRng::seed_from_u64(u64::from(spec.run_id) ^ ((spec.index as u64) << 40)),
            payload: Vec::new(),
            keepalive_ns: if spec.keepalive_ms > 0 {
                spec.keepalive_ms * MS
            } else {
                30_000 * MS
            },
            next_sweep_ns: 0,
            sms_marks: HashMap::new(),
            next_ping: 1,
            stop,
            server_key: None,
            more_reads: Vec::new(),
            spec,
        })
    }

    /// Local slots.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// No local slots.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Logged-in connections.
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Serves connections and executes commands from `rx` until `Shutdown`, a closed channel,
    /// the stop flag or the hard deadline. Every step's outcome goes to `sink`.
    pub fn run(mut self, rx: Receiver<Cmd>, sink: &mut dyn FnMut(Report)) {
        sink(Report::Ready {
            pid: std::process::id(),
        });
        loop {
            if self.stop.load(Ordering::Relaxed) || now_ns() > self.spec.hard_deadline_ns {
                break;
            }
            match rx.try_recv() {
                Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => break,
                Ok(Cmd::Init(_)) => sink(Report::Fatal("Init sent twice".into())),
                Ok(cmd) => {
                    let o = self.exec(cmd, sink);
                    sink(Report::Done(Box::new(o)));
                }
                Err(TryRecvError::Empty) => self.turn(5 * MS),
            }
        }
    }

    fn global(&self, slot: u32) -> usize {
        self.spec.base + slot as usize
    }

    fn local_range(&self, lo: usize, hi: usize) -> std::ops::Range<u32> {
        let a = lo
            .max(self.spec.base)
            .min(self.spec.base + self.conns.len());
        let b = hi.max(a).min(self.spec.base + self.conns.len());
        (a - self.spec.base) as u32..(b - self.spec.base) as u32
    }

    fn reset_outcome(&mut self) {
        self.out = Outcome {
            t_start_ns: now_ns(),
            ..Outcome::default()
        };
        self.lat_hs.reset();
        self.lat_ack.reset();
        self.lat_dlv.reset();
        self.lat_lag.reset();
        self.lat_ack_sent.reset();
        self.lat_dlv_sent.reset();
    }

    fn finish_outcome(&mut self) -> Outcome {
        let mut o = std::mem::take(&mut self.out);
        o.t_end_ns = now_ns();
        o.hist_handshake = self.lat_hs.to_hex();
        o.hist_ack = self.lat_ack.to_hex();
        o.hist_deliver = self.lat_dlv.to_hex();
        o.hist_send_lag = self.lat_lag.to_hex();
        o.hist_ack_from_write = self.lat_ack_sent.to_hex();
        o.hist_deliver_from_write = self.lat_dlv_sent.to_hex();
        o.ready_at_end = self.ready as u64;
        o.inflight_left = self.conns.iter().map(|c| c.inflight.len() as u64).sum();
        o.worker_mem = crate::sysmem::proc_mem(std::process::id()).unwrap_or_default();
        o.workers = 1;
        o.server_key = self.server_key.map(|k| hex(&k)).unwrap_or_default();
        o
    }

    /// Executes one step to completion (or its deadline) and returns its outcome.
    pub fn exec(&mut self, cmd: Cmd, sink: &mut dyn FnMut(Report)) -> Outcome {
        self.reset_outcome();
        let mut next_progress = now_ns() + PROGRESS_NS;
        let mut progress = |e: &mut Engine, done: u64, total: u64| {
            let now = now_ns();
            if now >= next_progress {
                next_progress = now + PROGRESS_NS;
                let _ = e;
                sink(Report::Progress { done, total });
            }
        };
        match cmd {
            Cmd::Init(_) | Cmd::Shutdown => {}
            Cmd::Provision {
                concurrency,
                deadline_ns,
            } => {
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
                    progress(self, d, total);
                }
                self.want(all, false);
                self.purpose = Purpose::Login;
            }
            Cmd::Connect {
                lo,
                hi,
                rate,
                max_pending,
                deadline_ns,
            } => {
                let r = self.local_range(lo, hi);
                let total = r
                    .clone()
                    .filter(|&s| self.conns[s as usize].st != St::Ready)
                    .count() as u64;
                self.want(r.clone(), true);
                self.set_pacing(rate, max_pending);
                self.connect_until(r, total, deadline_ns, &mut progress);
            }
            Cmd::Disconnect { lo, hi } => {
                let r = self.local_range(lo, hi);
                self.want(r.clone(), false);
                for s in r {
                    self.close(s, None);
                }
            }
            Cmd::Storm {
                max_pending,
                deadline_ns,
            } => {
                let all = 0..self.conns.len() as u32;
                self.want(all.clone(), false);
                for s in all.clone() {
                    self.close(s, None);
                }
                self.out.t_start_ns = now_ns();
                let total = self.conns.len() as u64;
                self.want(all.clone(), true);
                self.set_pacing(0.0, max_pending);
                self.connect_until(all, total, deadline_ns, &mut progress);
            }
            Cmd::Hold { until_ns } => {
                let t0 = now_ns();
                let total = until_ns.saturating_sub(t0) / MS;
                while now_ns() < until_ns && !self.stopped() {
                    self.turn(10 * MS);
                    let d = (now_ns() - t0) / MS;
                    progress(self, d, total);
                }
            }
            Cmd::Message(p) => {
                let senders = p.senders_total.max(1) as f64;
                let interval_ns = p
                    .offered_rate
                    .map(|r| (senders / r.max(1e-3) * 1e9) as u64)
                    .unwrap_or(0)
                    .max(1);
                let zipf_cdf = match p.dist {
                    Dist::Uniform => Vec::new(),
                    Dist::Zipf(s) => zipf_cdf(self.spec.phones.len(), s),
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
                    progress(self, d.min(total), total);
                }
                self.msg = None;
                // Whatever is still outstanding is abandoned: the next step starts clean.
                for c in &mut self.conns {
                    c.inflight.clear();
                }
            }
            Cmd::Queue(p) => {
                self.payload = payload_template(p.payload);
                let deadline = p.deadline_ns;
                let r = self.local_range(p.senders.0, p.senders.1);
                // Only logged-in senders can send their share.
                let expected: u64 = r
                    .clone()
                    .filter(|&s| self.conns[s as usize].st == St::Ready)
                    .map(|s| self.quota(&p, self.global(s)))
                    .sum();
                for s in r {
                    self.conns[s as usize].qnext = 0;
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
                    progress(self, d, expected);
                }
                self.queue = None;
                for c in &mut self.conns {
                    c.inflight.clear();
                }
            }
            Cmd::Drain {
                lo,
                hi,
                expected,
                max_pending,
                deadline_ns,
            } => {
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
                    progress(self, d, expected);
                }
                // Let the last acks go out.
                let until = now_ns() + 100 * MS;
                while now_ns() < until {
                    self.turn(5 * MS);
                }
            }
        }
        self.connect_q.clear();
        self.finish_outcome()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || now_ns() > self.spec.hard_deadline_ns
    }

    fn connect_until(
        &mut self,
        r: std::ops::Range<u32>,
        total: u64,
        deadline_ns: u64,
        progress: &mut dyn FnMut(&mut Engine, u64, u64),
    ) {
        let mut next_check = 0u64;
        while now_ns() < deadline_ns && !self.stopped() {
            let now = now_ns();
            if now >= next_check || self.pending == 0 {
                next_check = now + 50 * MS;
                let settled = r.clone().all(|s| {
                    let c = &self.conns[s as usize];
                    c.st == St::Ready || (!c.wanted && c.st == St::Down)
                });
                if settled && self.pending == 0 {
                    break;
                }
            }
            self.turn(5 * MS);
            let d = self.out.logged_in;
            progress(self, d, total);
        }
        // Whatever is not up by now is given up.
        for s in r {
            let c = &mut self.conns[s as usize];
            if c.st != St::Ready && c.wanted {
                c.wanted = false;
                self.out.gave_up += 1;
                if c.st.pending() {
                    self.close(s, None);
                }
            }
        }
    }

    /// Marks slots wanted (queued for connecting unless up) or not.
    fn want(&mut self, r: std::ops::Range<u32>, on: bool) {
        for s in r {
            let c = &mut self.conns[s as usize];
            c.wanted = on;
            if on {
                c.attempts = 0;
                if c.st == St::Down {
                    self.connect_q.push_back(s);
                }
            }
        }
    }

    fn set_pacing(&mut self, rate: f64, max_pending: usize) {
        self.rate = rate;
        self.rate_t0 = now_ns();
        self.rate_started = 0;
        self.max_pending = if max_pending == 0 {
            usize::MAX
        } else {
            max_pending
        };
    }

    // ----- the loop ----------------------------------------------------------------------------

    /// One turn: start paced connections, wait for readiness (at most `max_wait_ns`), handle
    /// it, fire due timers, sweep, flush.
    fn turn(&mut self, max_wait_ns: u64) {
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

    fn start_connects(&mut self) {
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
            let c = &self.conns[s as usize];
            if !c.wanted || c.st != St::Down {
                continue;
            }
            budget -= 1;
            self.rate_started += 1;
            self.start_connect(s);
        }
    }

    fn start_connect(&mut self, slot: u32) {
        let global = self.global(slot);
        let target = self.spec.target;
        let src = (!self.spec.source_ips.is_empty())
            .then(|| self.spec.source_ips[global % self.spec.source_ips.len()]);
        let key = &self.keys[slot as usize];
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
        let c = &mut self.conns[slot as usize];
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
                let c = &mut self.conns[slot as usize];
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
    fn attempt_failed(&mut self, slot: u32, reason: &str) {
        self.out.attempt_failures += 1;
        *self.out.fail_reasons.entry(reason.to_owned()).or_default() += 1;
        let max = self.spec.max_attempts.max(1);
        let c = &mut self.conns[slot as usize];
        if c.wanted && u32::from(c.attempts) < max {
            let backoff = (100 * MS) << c.attempts.min(4);
            let jitter = self.rng.gen_range(0..=backoff / 2);
            let due = now_ns() + backoff + jitter;
            let gen = c.gen;
            self.timers.push(Reverse((due, slot, gen, TIMER_RETRY)));
        } else if c.wanted {
            c.wanted = false;
            self.out.gave_up += 1;
        }
    }

    /// Closes a slot's socket. `failure` is set when an attempt (not a logged-in connection)
    /// failed; a logged-in connection that is closed while wanted counts as a disconnect.
    fn close(&mut self, slot: u32, failure: Option<&str>) {
        let c = &mut self.conns[slot as usize];
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
                self.conns[slot as usize].attempts = 0;
                self.connect_q.push_back(slot);
            }
        }
    }

    fn mark_dirty(&mut self, slot: u32) {
        let c = &mut self.conns[slot as usize];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &s in &dirty {
            self.conns[s as usize].dirty = false;
            self.flush(s);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes what the connection has queued until the socket would block.
    fn flush(&mut self, slot: u32) {
        let c = &mut self.conns[slot as usize];
        let Some(sock) = c.sock.as_mut() else { return };
        let mut off = 0usize;
        let mut err = None;
        // Bounded: every successful write makes progress through a finite buffer.
        while off < c.wbuf.len() {
            match sock.write(&c.wbuf[off..]) {
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

    fn on_readable(&mut self, slot: u32) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut c = std::mem::take(&mut self.conns[slot as usize]);
        let mut failure: Option<String> = None;
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
                    let r = if c.rbuf.is_empty() {
                        // Fast path: parse in place in the scratch buffer; keep only the tail.
                        let r = self.process(slot, &mut c, &mut scratch[..n]);
                        if let Ok(used) = r {
                            if used < n {
                                c.rbuf.extend_from_slice(&scratch[used..n]);
                            }
                        }
                        r.map(|_| ())
                    } else {
                        c.rbuf.extend_from_slice(&scratch[..n]);
                        let mut buf = std::mem::take(&mut c.rbuf);
                        let r = self.process(slot, &mut c, &mut buf);
                        if let Ok(used) = r {
                            buf.drain(..used);
                            c.rbuf = if buf.is_empty() { Vec::new() } else { buf };
                        }
                        r.map(|_| ())
                    };
                    if let Err(e) = r {
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
        self.conns[slot as usize] = c;
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
    fn process(&mut self, slot: u32, c: &mut Conn, buf: &mut [u8]) -> Result<usize, String> {
        let mut pos = 0usize;
        // Bounded: each iteration consumes at least one whole record.
        while pos < buf.len() {
            let total = match wire::check(&buf[pos..], 1, wire::RECORD_BODY_MAX) {
                Ok(Check::Complete { total }) => total,
                Ok(Check::Incomplete { .. }) => break,
                Err(e) => return Err(format!("bad record: {e}")),
            };
            let body = &mut buf[pos + wire::LEN_PREFIX_BYTES..pos + total];
            pos += total;
            if c.st == St::AwaitHello {
                self.on_hello(slot, c, body)?;
                continue;
            }
            let Some(t) = c.t.as_mut() else {
                return Err("record before handshake".into());
            };
            let n = t.open_record(body).map_err(|e| format!("open: {e}"))?;
            let frame = Frame::decode(Bytes::copy_from_slice(&body[..n]))
                .map_err(|e| format!("decode: {e}"))?;
            self.on_frame(slot, c, frame)?;
            if c.sock.is_none() {
                break;
            }
        }
        Ok(pos)
    }

    fn on_hello(&mut self, slot: u32, c: &mut Conn, msg2: &[u8]) -> Result<(), String> {
        let hs = c.hs.take().ok_or("no handshake state")?;
        let (t, msg3, server) = hs.read_hello(msg2).map_err(|e| format!("handshake: {e}"))?;
        if self.server_key.is_none() {
            self.server_key = Some(server);
        }
        wire::put_len(&mut c.wbuf, msg3.len());
        c.wbuf.extend_from_slice(&msg3);
        let mut t = Box::new(t);
        let global = self.global(slot);
        let phone = self.spec.phones[global];
        let frame = match self.purpose {
            Purpose::Login => {
                c.st = St::AwaitWelcome;
                Frame::Login {
                    user: phone,
                    device: 0,
                    revision: PROTOCOL_REVISION,
                    capabilities: capability::MESSAGING,
                }
            }
            Purpose::Register => {
                c.st = St::AwaitCodeSent;
                let len = self
                    .sms_path(phone)
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .unwrap_or(0);
                self.sms_marks.insert(slot, len);
                Frame::RegisterRequest { phone }
            }
        };
        t.seal_frame(&frame, &mut c.wbuf)
            .map_err(|e| format!("seal: {e}"))?;
        c.t = Some(t);
        c.last_tx_ns = now_ns();
        Ok(())
    }

    fn sms_path(&self, phone: u64) -> Option<std::path::PathBuf> {
        self.spec
            .data_dir
            .as_ref()
            .map(|d| d.join("sms").join(format!("{phone}.txt")))
    }

    fn seal(c: &mut Conn, f: &Frame) -> Result<(), String> {
        let t = c.t.as_mut().ok_or("no transport")?;
        t.seal_frame(f, &mut c.wbuf)
            .map_err(|e| format!("seal: {e}"))?;
        c.last_tx_ns = now_ns();
        Ok(())
    }

    fn flush_acks(&mut self, c: &mut Conn) {
        if self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        if c.t.is_some() {
            for chunk in acks.chunks(ACK_SEQS_MAX) {
                let _ = Self::seal(
                    c,
                    &Frame::Ack {
                        seqs: chunk.to_vec(),
                    },
                );
            }
        }
        self.acks = acks;
        self.acks.clear();
    }

    fn on_frame(&mut self, slot: u32, c: &mut Conn, f: Frame) -> Result<(), String> {
        let now = now_ns();
        match f {
            Frame::Welcome { keepalive_ms, .. } => {
                if c.st == St::AwaitWelcome {
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
                    self.on_ready(slot, c, now)?;
                }
            }
            Frame::ServerAck { client_msg_id, .. } => {
                if let Some(i) = c.inflight.iter().position(|&(id, ..)| id == client_msg_id) {
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
                    self.refill(slot, c, now)?;
                }
            }
            Frame::Deliver { seq, payload, .. } => {
                self.acks.push(seq);
                self.out.delivered += 1;
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
                    }
                } else if sched > 0 && sched <= now {
                    self.lat_dlv.record_ns(now - sched);
                }
            }
            Frame::Receipt { seq, .. } => {
                self.acks.push(seq);
                self.out.receipts += 1;
            }
            Frame::Pong { .. } => self.out.pongs += 1,
            Frame::Ping { nonce } => Self::seal(c, &Frame::Pong { nonce })?,
            Frame::Error { code, ref_id, .. } => {
                let name = ErrorCode::from_u16(code)
                    .map(|c| c.name().to_owned())
                    .unwrap_or_else(|| format!("code_{code}"));
                *self.out.errors.entry(name).or_default() += 1;
                if ref_id != 0 {
                    if let Some(i) = c.inflight.iter().position(|&(id, ..)| id == ref_id) {
                        c.inflight.remove(i);
                        self.refill(slot, c, now)?;
                    }
                }
                if c.st == St::AwaitCodeSent || c.st == St::AwaitRegistered {
                    return Err(format!(
                        "registration refused: {}",
                        ErrorCode::from_u16(code).map(|c| c.name()).unwrap_or("?")
                    ));
                }
            }
            Frame::GoAway { .. } => self.out.goaways += 1,
            Frame::RegisterCodeSent { .. } if c.st == St::AwaitCodeSent => {
                c.st = St::AwaitCode;
                self.timers
                    .push(Reverse((now + MS, slot, c.gen, TIMER_CODE)));
            }
            Frame::Registered { .. } if c.st == St::AwaitRegistered => {
                self.out.registered += 1;
                self.ok_time(now);
                self.lat_hs.record_ns(now - c.t0_ns);
                // Done with this account: close without counting a failure.
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

    fn ok_time(&mut self, now: u64) {
        if self.out.t_first_ok_ns == 0 {
            self.out.t_first_ok_ns = now;
        }
        self.out.t_last_ok_ns = now;
    }

    // ----- timers and sweeps -------------------------------------------------------------------

    fn fire_timers(&mut self) {
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

    fn poll_code(&mut self, slot: u32, now: u64) {
        let phone = self.spec.phones[self.global(slot)];
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
        let c = &mut self.conns[slot as usize];
        match code {
            Some(code) => {
                c.st = St::AwaitRegistered;
                if let Err(e) = Self::seal(c, &Frame::RegisterVerify { phone, code }) {
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
    fn sweep(&mut self, now: u64) {
        let timeout = self.spec.connect_timeout_ms * MS;
        for s in 0..self.conns.len() as u32 {
            let c = &mut self.conns[s as usize];
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
                    if Self::seal(c, &Frame::Ping { nonce }).is_ok() {
                        self.out.pings += 1;
                        self.mark_dirty(s);
                    }
                }
            }
        }
    }

    // ----- messaging ---------------------------------------------------------------------------

    fn on_ready(&mut self, slot: u32, c: &mut Conn, now: u64) -> Result<(), String> {
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

    fn start_messaging(&mut self, now: u64) {
        let Some(m) = self.msg.as_mut() else { return };
        m.started = true;
        let open = m.p.offered_rate.is_some();
        let interval = m.interval_ns;
        for s in 0..self.conns.len() as u32 {
            if !open && self.conns[s as usize].st != St::Ready {
                continue;
            }
            if open {
                let due = now + self.rng.gen_range(0..interval.max(1));
                self.timers.push(Reverse((due, s, 0, TIMER_SEND)));
            } else {
                let mut c = std::mem::take(&mut self.conns[s as usize]);
                let r = self.refill(s, &mut c, now);
                self.conns[s as usize] = c;
                self.mark_dirty(s);
                if let Err(e) = r {
                    self.close(s, Some(&e));
                }
            }
        }
    }

    fn start_queue(&mut self) {
        let Some(q) = self.queue.as_mut() else { return };
        q.started = true;
        let now = now_ns();
        for s in 0..self.conns.len() as u32 {
            if self.conns[s as usize].st != St::Ready {
                continue;
            }
            let mut c = std::mem::take(&mut self.conns[s as usize]);
            let r = self.refill(s, &mut c, now);
            self.conns[s as usize] = c;
            self.mark_dirty(s);
            if let Err(e) = r {
                self.close(s, Some(&e));
            }
        }
    }

    /// Messages sender `global` sends in the queue step.
    fn quota(&self, p: &QueueParams, global: usize) -> u64 {
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

    /// Closed loop (messaging) and queue step: send until the window is full.
    fn refill(&mut self, slot: u32, c: &mut Conn, now: u64) -> Result<(), String> {
        if c.st != St::Ready {
            return Ok(());
        }
        let global = self.global(slot);
        if let Some(m) = &self.msg {
            if !m.started || m.p.offered_rate.is_some() || now >= m.p.measure_to_ns {
                return Ok(());
            }
            let window = m.p.window.max(1);
            // Bounded by the window.
            while c.inflight.len() < window {
                let to = self.pick_recipient(global);
                self.send_one(c, global, to, now)?;
            }
            return Ok(());
        }
        if let Some(q) = &self.queue {
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
        }
        Ok(())
    }

    fn open_loop_send(&mut self, slot: u32, due: u64, now: u64) {
        let Some(m) = &self.msg else { return };
        if due >= m.p.measure_to_ns {
            return;
        }
        let interval = m.interval_ns;
        let max_inflight = m.p.max_inflight.max(1);
        self.timers
            .push(Reverse((due + interval, slot, 0, TIMER_SEND)));
        let c = &self.conns[slot as usize];
        if c.st != St::Ready || c.inflight.len() >= max_inflight {
            self.out.skipped_sends += 1;
            return;
        }
        let global = self.global(slot);
        let to = self.pick_recipient(global);
        let mut c = std::mem::take(&mut self.conns[slot as usize]);
        let r = self.send_one(&mut c, global, to, due);
        self.conns[slot as usize] = c;
        self.mark_dirty(slot);
        if let Err(e) = r {
            self.close(slot, Some(&e));
        }
        if due >= self.msg.as_ref().map_or(u64::MAX, |m| m.p.measure_from_ns) {
            self.lat_lag.record_ns(now.saturating_sub(due));
        }
    }

    fn pick_recipient(&mut self, me: usize) -> usize {
        let n = self.spec.phones.len();
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

    fn send_one(
        &mut self,
        c: &mut Conn,
        me: usize,
        to: usize,
        sched_ns: u64,
    ) -> Result<(), String> {
        let id = (u64::from(self.spec.run_id) << 32) | u64::from(c.next_id);
        c.next_id = c.next_id.wrapping_add(1);
        if self.payload.len() >= PAYLOAD_MIN {
            self.payload[..8].copy_from_slice(&sched_ns.to_be_bytes());
            self.payload[8..16].copy_from_slice(&now_ns().to_be_bytes());
            self.payload[16..20].copy_from_slice(&(me as u32).to_be_bytes());
        }
        let f = Frame::Send {
            client_msg_id: id,
            to: Address::device(self.spec.phones[to], 0),
            msg_type: 0,
            payload: Bytes::copy_from_slice(&self.payload),
        };
        Self::seal(c, &f)?;
        c.inflight.push_back((id, sched_ns, now_ns()));
        self.out.sent += 1;
        Ok(())
    }
}

fn payload_template(n: usize) -> Vec<u8> {
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

fn io_reason(e: &io::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_state_is_small() {
        // The slot itself; the transport (boxed) and buffers (empty when idle) come on top.
        let n = std::mem::size_of::<Conn>();
        eprintln!(
            "size_of::<Conn>() = {n}, size_of::<Transport>() = {}",
            std::mem::size_of::<Transport>()
        );
        assert!(n <= 192, "{n}");
    }

    #[test]
    fn zipf_is_a_cdf_and_skewed() {
        let c = zipf_cdf(1000, 1.1);
        assert_eq!(c.len(), 1000);
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert!((c[999] - 1.0).abs() < 1e-12);
        assert!(c[0] > 0.1, "rank 1 is hot: {}", c[0]);
    }
}
