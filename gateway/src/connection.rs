//! One client connection's state on a shard: its transport, its output buffer, its lifecycle,
//! its token bucket and timestamps. Plain data and the operations on it; the task that drives a
//! connection is in [`crate::conn_task`].
//!
//! Memory discipline: an idle connection holds no output buffer once its output is flushed (a
//! buffer that grew past [`OUT_BUF_KEEP_BYTES`] is released).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use protocol::noise::Transport;
use protocol::Frame;
use shards::{ConnId, LoginInfo, ShardId};

use crate::notify::Notify;
use crate::preauth::PreauthSlot;
use crate::uring::Kick;

/// An output buffer with more capacity than this is freed once flushed, so idle connections
/// do not keep a burst's worth of memory.
pub const OUT_BUF_KEEP_BYTES: usize = 4096;

/// Lifecycle of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Reading and writing.
    Open,
    /// Flushing its output, then closing (after an error or a GoAway).
    Closing,
    /// Flush deadline passed: close now.
    ForceClose,
    /// Moving to another shard after login.
    HandingOff,
}

/// Shard-side state of one connection.
pub struct Conn {
    /// Process-unique id.
    pub id: ConnId,
    /// Peer address.
    pub peer: SocketAddr,
    /// Noise transport.
    pub transport: RefCell<Transport>,
    /// Sealed records waiting to be written, and how much of them was written.
    pub out: RefCell<Vec<u8>>,
    /// How much of `out` was written already.
    pub(crate) out_pos: Cell<usize>,
    /// Wakes the connection's task (output queued, state changed).
    pub wake: Notify,
    /// Lifecycle.
    pub state: Cell<ConnState>,
    /// Set with `HandingOff`.
    pub handoff: RefCell<Option<Box<(ShardId, LoginInfo)>>>,
    /// Last time a byte arrived (ms, shard clock).
    pub last_rx_ms: Cell<u64>,
    /// When `Closing` started (ms).
    pub closing_since_ms: Cell<u64>,
    /// When the connection was registered on this shard (ms).
    pub opened_ms: u64,
    /// Set by `Action::LoggedIn` (the login succeeded).
    pub logged_in: Cell<bool>,
    /// Its source address's pre-auth slot, released at login.
    pub preauth_slot: RefCell<Option<PreauthSlot>>,
    tokens: Cell<f64>,
    tokens_at_ms: Cell<u64>,
    /// The ring core's side of the connection (`connection_core = "uring"`); `None` for a
    /// connection driven by its own task.
    pub io: Option<RingIo>,
}

/// What the ring core keeps for one connection besides [`Conn`]: the socket, the bytes the
/// kernel is sending, a split record's head, and the state of its operations. Idle, it holds
/// no buffer (the vectors are empty and unallocated).
pub struct RingIo {
    /// The socket (owned here: no glommio stream, no task).
    pub fd: RefCell<Option<OwnedFd>>,
    /// The shard's run queue of connections with work to do (output, state change).
    pub kick: Rc<Kick>,
    /// Already in the run queue.
    pub kicked: Cell<bool>,
    /// Sealed bytes handed to the kernel by the send in flight (never touched until it
    /// completes).
    pub inflight: RefCell<Vec<u8>>,
    /// How much of `inflight` the kernel took so far.
    pub inflight_pos: Cell<usize>,
    /// A send is in flight.
    pub sending: Cell<bool>,
    /// The multishot receive is armed (its last completion has not arrived yet).
    pub receiving: Cell<bool>,
    /// A cancel was requested for the multishot receive (hand-off).
    pub cancelling: Cell<bool>,
    /// The head of a record split across receives (and, while handing off, bytes received
    /// after the login).
    pub pending_in: RefCell<Vec<u8>>,
}

impl RingIo {
    /// The ring state of a new connection on `fd`.
    pub fn new(fd: OwnedFd, kick: Rc<Kick>) -> Self {
        Self {
            fd: RefCell::new(Some(fd)),
            kick,
            kicked: Cell::new(false),
            inflight: RefCell::new(Vec::new()),
            inflight_pos: Cell::new(0),
            sending: Cell::new(false),
            receiving: Cell::new(false),
            cancelling: Cell::new(false),
            pending_in: RefCell::new(Vec::new()),
        }
    }
}

impl Conn {
    /// A new open connection.
    pub fn new(
        id: ConnId,
        peer: SocketAddr,
        transport: Transport,
        now_ms: u64,
        burst: u32,
        io: Option<RingIo>,
    ) -> Self {
        Self {
            id,
            peer,
            transport: RefCell::new(transport),
            out: RefCell::new(Vec::new()),
            out_pos: Cell::new(0),
            wake: Notify::default(),
            state: Cell::new(ConnState::Open),
            handoff: RefCell::new(None),
            last_rx_ms: Cell::new(now_ms),
            closing_since_ms: Cell::new(0),
            opened_ms: now_ms,
            logged_in: Cell::new(false),
            preauth_slot: RefCell::new(None),
            tokens: Cell::new(f64::from(burst)),
            tokens_at_ms: Cell::new(now_ms),
            io,
        }
    }

    /// Wakes whatever drives the connection: its task, or the ring core's run queue.
    pub fn notify(&self) {
        match &self.io {
            Some(io) => {
                if !io.kicked.replace(true) {
                    io.kick.push(self.id);
                }
            }
            None => self.wake.notify(),
        }
    }

    /// The shard logged this connection in (`Action::LoggedIn`): it no longer counts against
    /// the pre-auth limits and deadline.
    pub fn mark_logged_in(&self) {
        self.logged_in.set(true);
        self.preauth_slot.borrow_mut().take();
    }

    /// Seals `frame` into the output buffer. Returns false when the buffer passed `max_bytes`
    /// (the caller closes the connection as a slow consumer).
    pub fn push_frame(&self, frame: &Frame, max_bytes: usize) -> bool {
        if matches!(self.state.get(), ConnState::ForceClose) {
            return true;
        }
        let mut out = self.out.borrow_mut();
        if out.len() - self.out_pos.get() > max_bytes {
            return false;
        }
        if self
            .transport
            .borrow_mut()
            .seal_frame(frame, &mut out)
            .is_err()
        {
            // Nonce exhaustion after 2^64 records: the connection cannot continue.
            drop(out);
            self.begin_close(0);
            return true;
        }
        drop(out);
        self.notify();
        true
    }

    /// Starts closing: output is flushed first.
    pub fn begin_close(&self, now_ms: u64) {
        if matches!(self.state.get(), ConnState::Open) {
            self.state.set(ConnState::Closing);
            self.closing_since_ms.set(now_ms);
        }
        self.notify();
    }

    /// Stops waiting for output to flush.
    pub fn force_close(&self) {
        self.state.set(ConnState::ForceClose);
        self.notify();
    }

    /// Token bucket: true if one more frame is allowed at `now_ms`.
    pub(crate) fn take_token(&self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.tokens_at_ms.get()) as f64 / 1000.0;
        let t = (self.tokens.get() + elapsed * f64::from(rate_per_s)).min(f64::from(burst));
        self.tokens_at_ms.set(now_ms);
        if t >= 1.0 {
            self.tokens.set(t - 1.0);
            true
        } else {
            self.tokens.set(t);
            false
        }
    }

    /// Sealed bytes not yet written (including what a ring send has in flight).
    pub fn unsent(&self) -> usize {
        let inflight = self
            .io
            .as_ref()
            .map_or(0, |io| io.inflight.borrow().len() - io.inflight_pos.get());
        self.out.borrow().len() - self.out_pos.get() + inflight
    }

    /// A copy of the sealed bytes not yet written (for a hand-off).
    pub fn unsent_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        if let Some(io) = &self.io {
            if let Some(rest) = io.inflight.borrow().get(io.inflight_pos.get()..) {
                v.extend_from_slice(rest);
            }
        }
        if let Some(rest) = self.out.borrow().get(self.out_pos.get()..) {
            v.extend_from_slice(rest);
        }
        v
    }
}
