//! The task that drives one client connection after its handshake: it waits for readiness,
//! reads into the shard's shared receive buffer, opens and decodes records, feeds the shard
//! state machine, and writes whatever output accumulated in one send.
//!
//! Memory discipline: an idle connection holds no receive buffer (reads go into the shard-owned
//! buffer only once the socket is readable; glommio's non-buffered stream registers a poll, not a
//! read), and a partial-record buffer only while a record is split across reads.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use protocol::wire::{self, Check};
use protocol::{ErrorCode, Frame};
use shards::Event;

use crate::connection::{Conn, ConnState, OUT_BUF_KEEP_BYTES};
use crate::ctx::Ctx;
use crate::mesh::{GatewayMsg, Handoff};

/// Smallest transport record: the tag plus a one-byte frame kind.
const MIN_RECORD_BODY: usize = wire::TAG_BYTES + 1;

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
    if flush_output(cx, ctx, conn, stream).is_err() {
        return Poll::Ready(Step::Gone);
    }
    match conn.state.get() {
        ConnState::Open => read_input(cx, ctx, conn, stream, pending),
        ConnState::Closing if conn.unsent() == 0 => Poll::Ready(Step::Closed),
        ConnState::Closing => Poll::Pending,
        ConnState::ForceClose => Poll::Ready(Step::Closed),
        ConnState::HandingOff => Poll::Ready(Step::Handoff),
    }
}

/// The peer is gone (EOF or a socket error).
struct Gone;

/// Writes everything queued since the last wake-up in as few sends as the socket allows
/// (write coalescing); releases a grown buffer once it is empty.
fn flush_output(
    cx: &mut Context<'_>,
    ctx: &Ctx,
    conn: &Conn,
    stream: &mut TcpStream,
) -> Result<(), Gone> {
    let mut out = conn.out.borrow_mut();
    let mut pos = conn.out_pos.get();
    while pos < out.len() {
        let Some(chunk) = out.get(pos..) else { break };
        match Pin::new(&mut *stream).poll_write(cx, chunk) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(Gone),
            Poll::Ready(Ok(n)) => {
                pos += n;
                ctx.metrics.bytes_out_total.fetch_add(n as u64, Relaxed);
                ctx.metrics.writes_total.fetch_add(1, Relaxed);
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
    Ok(())
}

/// Reads into the shard's buffer (borrowed only for this synchronous section) and processes
/// every whole record; a split record's head waits in `pending`.
fn read_input(
    cx: &mut Context<'_>,
    ctx: &Rc<Ctx>,
    conn: &Rc<Conn>,
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Poll<Step> {
    let scratch_cell = ctx.rx_buf.clone();
    let mut scratch = scratch_cell.borrow_mut();
    let n = match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Step::Gone),
        Poll::Ready(Ok(n)) => n,
        Poll::Pending => return Poll::Pending,
    };
    let now = ctx.refresh_now();
    conn.last_rx_ms.set(now);
    ctx.metrics.bytes_in_total.fetch_add(n as u64, Relaxed);
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
pub(crate) fn process(ctx: &Rc<Ctx>, conn: &Rc<Conn>, buf: &mut [u8]) -> usize {
    let mut off = 0;
    while conn.state.get() == ConnState::Open {
        let Some(rest) = buf.get_mut(off..) else {
            break;
        };
        match wire::check(rest, MIN_RECORD_BODY, ctx.cfg.max_frame_bytes as usize) {
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
                if !record(ctx, conn, body) {
                    break;
                }
            }
        }
    }
    off
}

/// Opens one record, applies the rate limit and feeds its frame; false if the connection is
/// being closed.
fn record(ctx: &Rc<Ctx>, conn: &Rc<Conn>, body: &mut [u8]) -> bool {
    let cfg = &ctx.cfg;
    // Bind the result first: the transport borrow must end before an error path seals an Error
    // frame with the same transport.
    let opened = conn.transport.borrow_mut().open_record(body);
    let plain_len = match opened {
        Ok(n) => n,
        Err(e) => {
            ctx.close_conn(conn, e.code(), &e.to_string());
            return false;
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
        return false;
    }
    let Some(plain) = body.get(..plain_len) else {
        return false;
    };
    // One copy out of the shared receive buffer; from here the payload is a reference-counted
    // slice shared by the mailbox, the log batch and the recipient.
    match Frame::decode(Bytes::copy_from_slice(plain)) {
        Ok(frame) => {
            ctx.metrics.frames_in_total.fetch_add(1, Relaxed);
            ctx.feed(Event::Frame {
                conn: conn.id,
                frame,
            });
            true
        }
        Err(e) => {
            ctx.close_conn(conn, e.code(), &e.to_string());
            false
        }
    }
}

async fn handoff(ctx: &Rc<Ctx>, conn: &Rc<Conn>, stream: TcpStream, pending_in: Vec<u8>) {
    let Some((to, info)) = conn.handoff.borrow_mut().take().map(|b| *b) else {
        ctx.conn_gone(conn.id);
        return;
    };
    // A duplicate with close-on-exec set (F_DUPFD_CLOEXEC), like every descriptor std creates.
    let dup = {
        // SAFETY: `stream` owns the descriptor and is alive for this borrow, which ends at the
        // end of this block, before the stream is dropped.
        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        borrowed.try_clone_to_owned()
    };
    // Dropping the glommio stream closes its descriptor and cancels its pending poll; the
    // duplicate keeps the socket open with no io_uring operation of ours in flight on it.
    drop(stream);
    ctx.forget_conn(conn.id);
    let fd = match dup {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(conn = conn.id, error = %e, "dup failed during hand-off");
            ctx.feed(Event::Closed { conn: conn.id });
            return;
        }
    };
    let transport = conn.transport.borrow().clone();
    ctx.metrics.handoffs_out_total.fetch_add(1, Relaxed);
    let h = Handoff {
        fd,
        transport,
        pending_in,
        pending_out: conn.unsent_bytes(),
        info,
        peer: conn.peer,
    };
    ctx.mesh_send(to, GatewayMsg::Handoff(Box::new(h)));
}
