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
//!
//! Layout: this module holds the state and the step dispatcher; `net` the sockets and the
//! epoll turn, `session` each connection's protocol (handshake, login, registration, frames,
//! timers), and one module per step the controller sends (the phases of `benches/README.md`):
//! `provision`, `link` (multi-device setup), `ramp` (connect and disconnect), `idle`,
//! `messaging`, `storm`, `queue`, `drain`.
//!
//! Slots: with `devices` D per account, account `u` (global index) owns the global slots
//! `u * D .. (u + 1) * D`, its primary first; a worker holds whole accounts.

mod drain;
mod idle;
mod link;
mod messaging;
mod net;
mod provision;
mod queue;
mod ramp;
mod session;
mod storm;

pub use messaging::zipf_cdf;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use protocol::noise::{ClientAwaitingHello, StaticKeypair, Transport};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::accounts::{hex, identity_pair, static_pair};
use crate::phase::{Cmd, Outcome, Report, WorkerSpec};
use crate::stats::Lat;
use crate::sys::{self, now_ns, Epoll};

use link::LinkState;
use messaging::MsgState;
use queue::QueueState;
use switchboard_e2ee::IdentityKeyPair;

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
    /// Link step, a companion: LinkRequest sent.
    AwaitLinkCode,
    /// Link step, a companion: its primary approved the code; waiting for Registered.
    AwaitLinked,
    /// Link step, a companion: Login sent after Registered.
    AwaitLinkWelcome,
    /// Link step, a companion: PrekeyUpload sent; waiting for PrekeyStatus UPLOADED.
    AwaitKeys,
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
    /// The link step: primaries log in, companions ask for a link code.
    Link,
}

/// Why a connection attempt or a connection failed: the text it is counted under in the
/// outcome's `fail_reasons` (part of the report), so a plain string rather than an error type.
type Failure = String;

/// Timer kinds: an open-loop send is due.
const TIMER_SEND: u8 = 0;
/// A failed attempt may be retried.
const TIMER_RETRY: u8 = 1;
/// Look for the registration code in the SMS file.
const TIMER_CODE: u8 = 2;

/// The event loop of one worker. See the module docs.
pub struct Engine {
    spec: WorkerSpec,
    /// Noise static key of every local slot.
    keys: Vec<StaticKeypair>,
    /// Identity keys of every local slot, where the account has them (link step).
    idents: Vec<Option<IdentityKeyPair>>,
    /// Devices (connections) per account.
    devices: usize,
    link: Option<LinkState>,
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
    /// Group messaging: the group each creator slot made (slot → group id).
    groups: HashMap<u32, u64>,
}

impl Engine {
    /// An engine for `spec`'s accounts. Fails if an account key does not parse or epoll fails.
    pub fn new(spec: WorkerSpec, stop: Arc<AtomicBool>) -> io::Result<Self> {
        let devices = spec.devices.max(1);
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut keys = Vec::with_capacity(spec.accounts.len() * devices);
        let mut idents = Vec::with_capacity(spec.accounts.len() * devices);
        for a in &spec.accounts {
            keys.push(
                a.keypair()
                    .ok_or_else(|| bad(format!("bad key for {}", a.phone)))?,
            );
            idents.push(a.identity.as_deref().and_then(identity_pair));
            if a.companions.len() + 1 < devices {
                return Err(bad(format!(
                    "account {} has {} companions, {} devices wanted",
                    a.phone,
                    a.companions.len(),
                    devices
                )));
            }
            for c in a.companions.iter().take(devices - 1) {
                keys.push(
                    static_pair(&c.key)
                        .ok_or_else(|| bad(format!("bad companion key for {}", a.phone)))?,
                );
                idents.push(identity_pair(&c.identity));
            }
        }
        let n = keys.len();
        Ok(Self {
            keys,
            idents,
            devices,
            link: None,
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
            groups: HashMap::new(),
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

    /// Which of its account's devices a slot is (0: the primary).
    fn dev_index(&self, slot: u32) -> usize {
        slot as usize % self.devices
    }

    /// The primary's slot of `slot`'s account.
    fn primary_slot(&self, slot: u32) -> u32 {
        slot - (self.dev_index(slot) as u32)
    }

    /// The server's device id of global slot `global`.
    fn device_id(&self, global: usize) -> u16 {
        self.spec.slot_devices.get(global).copied().unwrap_or(0)
    }

    /// The capabilities a login announces.
    fn capabilities(&self) -> u64 {
        use protocol::capability::{GROUPS, MESSAGING, MULTI_DEVICE, PREKEYS};
        if self.spec.group_size > 0 && self.purpose != Purpose::Link {
            MESSAGING | GROUPS | if self.devices > 1 { MULTI_DEVICE } else { 0 }
        } else if self.purpose == Purpose::Link {
            MESSAGING | PREKEYS | MULTI_DEVICE
        } else if self.spec.multi || self.devices > 1 {
            MESSAGING | MULTI_DEVICE
        } else {
            MESSAGING
        }
    }

    /// The phone number of account `global`.
    fn phone(&self, global: usize) -> Result<u64, Failure> {
        self.spec
            .phones
            .get(global)
            .copied()
            .ok_or_else(|| format!("no account {global}"))
    }

    /// Runs `f` on `slot`'s connection taken out of the table (so that `f` may borrow the engine
    /// mutably) and puts it back; `None` for a slot the engine does not have.
    fn with_conn<R>(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut Conn) -> R) -> Option<R> {
        let mut c = std::mem::take(self.conns.get_mut(slot as usize)?);
        let r = f(self, &mut c);
        if let Some(home) = self.conns.get_mut(slot as usize) {
            *home = c;
        }
        Some(r)
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
        let mut t = Ticker {
            next_ns: now_ns() + PROGRESS_NS,
            sink,
        };
        match cmd {
            Cmd::Init(_) | Cmd::Shutdown => {}
            Cmd::Provision {
                concurrency,
                deadline_ns,
            } => self.step_provision(concurrency, deadline_ns, &mut t),
            Cmd::Link {
                concurrency,
                deadline_ns,
            } => self.step_link(concurrency, deadline_ns, &mut t),
            Cmd::Connect {
                lo,
                hi,
                rate,
                max_pending,
                deadline_ns,
            } => self.step_connect(lo, hi, rate, max_pending, deadline_ns, &mut t),
            Cmd::Disconnect { lo, hi } => self.step_disconnect(lo, hi),
            Cmd::Storm {
                max_pending,
                deadline_ns,
            } => self.step_storm(max_pending, deadline_ns, &mut t),
            Cmd::Hold { until_ns } => self.step_hold(until_ns, &mut t),
            Cmd::Message(p) => self.step_message(p, &mut t),
            Cmd::Queue(p) => self.step_queue(p, &mut t),
            Cmd::Drain {
                lo,
                hi,
                expected,
                max_pending,
                deadline_ns,
            } => self.step_drain(lo, hi, expected, max_pending, deadline_ns, &mut t),
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
        progress: &mut Ticker<'_>,
    ) {
        let mut next_check = 0u64;
        while now_ns() < deadline_ns && !self.stopped() {
            let now = now_ns();
            if now >= next_check || self.pending == 0 {
                next_check = now + 50 * MS;
                let settled = r.clone().all(|s| {
                    self.conns
                        .get(s as usize)
                        .is_none_or(|c| c.st == St::Ready || (!c.wanted && c.st == St::Down))
                });
                if settled && self.pending == 0 {
                    break;
                }
            }
            self.turn(5 * MS);
            let d = self.out.logged_in;
            progress.tick(d, total);
        }
        // Whatever is not up by now is given up.
        for s in r {
            let Some(c) = self.conns.get_mut(s as usize) else {
                continue;
            };
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
            let Some(c) = self.conns.get_mut(s as usize) else {
                continue;
            };
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
}

/// A step's progress reports to the controller, at most one per [`PROGRESS_NS`].
struct Ticker<'a> {
    next_ns: u64,
    sink: &'a mut dyn FnMut(Report),
}

impl Ticker<'_> {
    /// Reports `done` of `total` if the last report is old enough.
    fn tick(&mut self, done: u64, total: u64) {
        let now = now_ns();
        if now >= self.next_ns {
            self.next_ns = now + PROGRESS_NS;
            (self.sink)(Report::Progress { done, total });
        }
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
}
