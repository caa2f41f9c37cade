//! One client connection's state on a shard: its transport, its output buffer, its lifecycle,
//! its token bucket and timestamps. Plain data and the operations on it; the task that drives a
//! connection is in [`crate::conn_task`].
//!
//! Memory discipline: an idle connection holds no output buffer once its output is flushed (a
//! buffer that grew past [`OUT_BUF_KEEP_BYTES`] is released).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

use protocol::noise::Transport;
use protocol::Frame;
use shards::{ConnId, LoginInfo, ShardId};

use crate::notify::Notify;
use crate::preauth::PreauthSlot;

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
    pub handoff: RefCell<Option<(ShardId, LoginInfo)>>,
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
}

impl Conn {
    /// A new open connection.
    pub fn new(
        id: ConnId,
        peer: SocketAddr,
        transport: Transport,
        now_ms: u64,
        burst: u32,
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
        self.wake.notify();
        true
    }

    /// Starts closing: output is flushed first.
    pub fn begin_close(&self, now_ms: u64) {
        if matches!(self.state.get(), ConnState::Open) {
            self.state.set(ConnState::Closing);
            self.closing_since_ms.set(now_ms);
        }
        self.wake.notify();
    }

    /// Stops waiting for output to flush.
    pub fn force_close(&self) {
        self.state.set(ConnState::ForceClose);
        self.wake.notify();
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

    /// Sealed bytes not yet written.
    pub fn unsent(&self) -> usize {
        self.out.borrow().len() - self.out_pos.get()
    }

    /// A copy of the sealed bytes not yet written (for a hand-off).
    pub fn unsent_bytes(&self) -> Vec<u8> {
        self.out
            .borrow()
            .get(self.out_pos.get()..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}
