//! One client connection on a shard: handshake, then a single task that waits for readiness,
//! reads into the shard's shared receive buffer, opens and decodes records, feeds the shard
//! state machine, and writes whatever output accumulated in one send.
//!
//! Memory discipline: an idle connection holds no receive buffer (reads go into the shard-owned
//! buffer only once the socket is readable; glommio's non-buffered stream registers a poll, not a
//! read), no output buffer once its output is flushed (a buffer that grew past
//! [`OUT_BUF_KEEP_BYTES`] is released), and a partial-record buffer only while a record is split
//! across reads.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use protocol::noise::{ServerHandshake, StaticKeypair, Transport};
use protocol::wire::{self, Check};
use protocol::{ErrorCode, Frame, PREAMBLE};
use shards::{ConnId, Event, LoginInfo, ShardId};

use crate::notify::Notify;
use crate::runtime::{Ctx, GatewayMsg, Handoff};

/// An output buffer with more capacity than this is freed once flushed, so idle connections
/// do not keep a burst's worth of memory.
pub const OUT_BUF_KEEP_BYTES: usize = 4096;

/// Smallest transport record: the tag plus a one-byte frame kind.
const MIN_RECORD_BODY: usize = wire::TAG_BYTES + 1;

/// Largest handshake record accepted (msg1 and msg3 are 32 and 64 bytes with empty payloads).
const HANDSHAKE_RECORD_MAX: usize = 256;

/// Counts unauthenticated connections per source address on one shard.
#[derive(Clone, Debug, Default)]
pub struct PreauthCounter(Rc<RefCell<HashMap<IpAddr, u32>>>);

impl PreauthCounter {
    /// Takes a slot for `ip` unless it already holds `max` (0 = unlimited).
    pub fn try_acquire(&self, ip: IpAddr, max: u32) -> Option<PreauthSlot> {
        let mut m = self.0.borrow_mut();
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(PreauthSlot {
            counter: self.clone(),
            ip,
        })
    }

    /// Slots held by `ip`.
    pub fn held(&self, ip: IpAddr) -> u32 {
        self.0.borrow().get(&ip).copied().unwrap_or(0)
    }
}

/// One unauthenticated connection's place in its address's count; released on drop (login,
/// hand-off, close, or a failed handshake).
#[derive(Debug)]
pub struct PreauthSlot {
    counter: PreauthCounter,
    ip: IpAddr,
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        let mut m = self.counter.0.borrow_mut();
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

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
    out_pos: Cell<usize>,
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
    fn take_token(&self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
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

    fn unsent(&self) -> usize {
        self.out.borrow().len() - self.out_pos.get()
    }
}

/// Why a handshake ended early.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket error or EOF.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Not our preamble.
    #[error("bad preamble {0:02x?}")]
    BadPreamble([u8; 4]),
    /// Our preamble with another major version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A handshake record longer than any valid one.
    #[error("handshake record of {0} bytes")]
    Oversize(usize),
    /// Noise refused a message.
    #[error("noise: {0}")]
    Noise(#[from] protocol::noise::NoiseError),
    /// Did not finish in time.
    #[error("timed out")]
    Timeout,
}

impl HandshakeError {
    /// The metric code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::BadPreamble(_) => ErrorCode::BadPreamble,
            HandshakeError::Version(_) => ErrorCode::VersionUnsupported,
            HandshakeError::Oversize(_) => ErrorCode::FrameTooLarge,
            HandshakeError::Timeout => ErrorCode::HandshakeTimeout,
            HandshakeError::Io(_) | HandshakeError::Noise(_) => ErrorCode::HandshakeFailed,
        }
    }
}

async fn read_record(stream: &mut TcpStream) -> Result<Vec<u8>, HandshakeError> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > HANDSHAKE_RECORD_MAX {
        return Err(HandshakeError::Oversize(len));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Runs the server side of the preamble and the Noise XX handshake.
pub async fn handshake(
    stream: &mut TcpStream,
    key: &StaticKeypair,
    timeout: Duration,
) -> Result<(Transport, [u8; 32]), HandshakeError> {
    let fut = async {
        let mut pre = [0u8; 4];
        stream.read_exact(&mut pre).await?;
        if pre != PREAMBLE {
            return Err(if pre[..3] == PREAMBLE[..3] {
                HandshakeError::Version(pre[3])
            } else {
                HandshakeError::BadPreamble(pre)
            });
        }
        let msg1 = read_record(stream).await?;
        let (state, msg2) = ServerHandshake::new(key)?.read_hello(&msg1)?;
        let mut rec = Vec::with_capacity(2 + msg2.len());
        wire::put_len(&mut rec, msg2.len());
        rec.extend_from_slice(&msg2);
        stream.write_all(&rec).await?;
        let msg3 = read_record(stream).await?;
        let (transport, client_static) = state.read_finish(&msg3)?;
        Ok((transport, client_static))
    };
    match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout),
    }
}

enum Step {
    /// Bytes were read and processed; poll again.
    Again,
    /// Peer closed or an IO error.
    Gone,
    /// Output flushed after a close request.
    Closed,
    /// Hand the connection to another shard.
    Handoff,
}

/// Drives one connection until it closes or moves to another shard.
pub async fn run(ctx: Rc<Ctx>, conn: Rc<Conn>, mut stream: TcpStream, mut pending: Vec<u8>) {
    if !pending.is_empty() {
        let used = process(&ctx, &conn, &mut pending);
        pending.drain(..used);
    }
    loop {
        let step =
            std::future::poll_fn(|cx| poll_once(cx, &ctx, &conn, &mut stream, &mut pending)).await;
        match step {
            Step::Again => glommio::yield_if_needed().await,
            Step::Gone | Step::Closed => break,
            Step::Handoff => {
                handoff(&ctx, &conn, stream, pending).await;
                return;
            }
        }
    }
    // Closing: a final shutdown lets the peer see EOF after the error frame.
    let _ = stream.close().await;
    ctx.conn_gone(conn.id);
}

fn poll_once(
    cx: &mut Context<'_>,
    ctx: &Rc<Ctx>,
    conn: &Rc<Conn>,
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Poll<Step> {
    // Register for wake-ups first, so a notify raised while we run is not lost.
    let _ = conn.wake.poll_take(cx);

    // 1. Flush output: everything queued since the last wake-up goes out in as few sends as the
    //    socket allows (write coalescing).
    {
        let mut out = conn.out.borrow_mut();
        let mut pos = conn.out_pos.get();
        let mut wrote = false;
        while pos < out.len() {
            let Some(chunk) = out.get(pos..) else { break };
            match Pin::new(&mut *stream).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Step::Gone),
                Poll::Ready(Ok(n)) => {
                    pos += n;
                    wrote = true;
                    ctx.metrics
                        .bytes_out_total
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    ctx.metrics
                        .writes_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Poll::Pending => break,
            }
        }
        if pos >= out.len() {
            if out.capacity() > OUT_BUF_KEEP_BYTES {
                *out = Vec::new();
            } else {
                out.clear();
            }
            pos = 0;
        }
        conn.out_pos.set(pos);
        let _ = wrote;
    }

    match conn.state.get() {
        ConnState::Open => {}
        ConnState::Closing => {
            return if conn.unsent() == 0 {
                Poll::Ready(Step::Closed)
            } else {
                Poll::Pending
            };
        }
        ConnState::ForceClose => return Poll::Ready(Step::Closed),
        ConnState::HandingOff => return Poll::Ready(Step::Handoff),
    }

    // 2. Read into the shard's buffer (borrowed only for this synchronous section).
    let scratch_cell = ctx.rx_buf.clone();
    let mut scratch = scratch_cell.borrow_mut();
    let n = match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Step::Gone),
        Poll::Ready(Ok(n)) => n,
        Poll::Pending => return Poll::Pending,
    };
    let now = ctx.refresh_now();
    conn.last_rx_ms.set(now);
    ctx.metrics
        .bytes_in_total
        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    if pending.is_empty() {
        let Some(buf) = scratch.get_mut(..n) else {
            return Poll::Ready(Step::Gone);
        };
        let used = process(ctx, conn, buf);
        if let Some(rest) = buf.get(used..) {
            if !rest.is_empty() {
                pending.extend_from_slice(rest);
            }
        }
    } else {
        pending.extend_from_slice(scratch.get(..n).unwrap_or_default());
        let used = process(ctx, conn, pending);
        pending.drain(..used);
        if pending.is_empty() && pending.capacity() > OUT_BUF_KEEP_BYTES {
            *pending = Vec::new();
        }
    }
    Poll::Ready(Step::Again)
}

/// Opens, decodes and dispatches every whole record at the front of `buf`; returns the bytes
/// used. Stops early when the connection starts closing or moving.
fn process(ctx: &Rc<Ctx>, conn: &Rc<Conn>, buf: &mut [u8]) -> usize {
    let cfg = &ctx.cfg;
    let mut off = 0;
    while conn.state.get() == ConnState::Open {
        let Some(rest) = buf.get_mut(off..) else {
            break;
        };
        match wire::check(rest, MIN_RECORD_BODY, cfg.max_frame_bytes as usize) {
            Ok(Check::Incomplete { .. }) => break,
            Err(e) => {
                ctx.close_conn(conn, e.code(), &e.to_string());
                break;
            }
            Ok(Check::Complete { total }) => {
                off += total;
                let Some(body) = rest.get_mut(wire::LEN_PREFIX_BYTES..total) else {
                    break;
                };
                // Bind the result first: the transport borrow must end before an error path
                // seals an Error frame with the same transport.
                let opened = conn.transport.borrow_mut().open_record(body);
                let plain_len = match opened {
                    Ok(n) => n,
                    Err(e) => {
                        ctx.close_conn(conn, e.code(), &e.to_string());
                        break;
                    }
                };
                if !conn.take_token(
                    ctx.now_ms.get(),
                    cfg.rate_limit_frames_per_s,
                    cfg.rate_limit_burst,
                ) {
                    ctx.close_conn(
                        conn,
                        ErrorCode::RateLimited,
                        "frame rate above rate_limit_frames_per_s",
                    );
                    break;
                }
                let Some(plain) = body.get(..plain_len) else {
                    break;
                };
                // One copy out of the shared receive buffer; from here the payload is a
                // reference-counted slice shared by the mailbox, the log batch and the recipient.
                match Frame::decode(Bytes::copy_from_slice(plain)) {
                    Ok(frame) => {
                        ctx.metrics
                            .frames_in_total
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        ctx.feed(Event::Frame {
                            conn: conn.id,
                            frame,
                        });
                    }
                    Err(e) => {
                        ctx.close_conn(conn, e.code(), &e.to_string());
                        break;
                    }
                }
            }
        }
    }
    off
}

async fn handoff(ctx: &Rc<Ctx>, conn: &Rc<Conn>, stream: TcpStream, pending_in: Vec<u8>) {
    let Some((to, info)) = conn.handoff.borrow_mut().take() else {
        ctx.conn_gone(conn.id);
        return;
    };
    // SAFETY: `dup` on a descriptor we own; the result is checked before use.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    // Dropping the glommio stream closes its descriptor and cancels its pending poll; the
    // duplicate keeps the socket open with no io_uring operation of ours in flight on it.
    drop(stream);
    ctx.forget_conn(conn.id);
    if dup < 0 {
        tracing::warn!(conn = conn.id, error = %std::io::Error::last_os_error(), "dup failed during hand-off");
        ctx.feed(Event::Closed { conn: conn.id });
        return;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let pos = conn.out_pos.get();
    let pending_out = conn
        .out
        .borrow()
        .get(pos..)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let transport = conn.transport.borrow().clone();
    ctx.metrics
        .handoffs_out_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let h = Handoff {
        fd,
        transport,
        pending_in,
        pending_out,
        info,
        peer: conn.peer,
    };
    ctx.mesh_send(to, GatewayMsg::Handoff(Box::new(h)));
}
