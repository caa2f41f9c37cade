//! A shard's listener and accept path: bind with SO_REUSEPORT, refuse past the connection cap
//! and the per-address pre-auth cap, run the handshake, register the connection and start its
//! task.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use protocol::ErrorCode;
use shards::Event;

use crate::conn_task;
use crate::connection::RingIo;
use crate::ctx::Ctx;
use crate::handshake;
use crate::uring;

/// Accepts connections until the shard starts draining.
pub async fn accept_loop(ctx: &Rc<Ctx>, listener: TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.life.stop_accept.notified().await;
            None
        })
        .await;
        let Some(res) = accepted else { break };
        match res {
            Ok(stream) => {
                ctx.metrics.accepted_total.fetch_add(1, Relaxed);
                if ctx.conns.full() {
                    ctx.metrics.refused_overload_total.fetch_add(1, Relaxed);
                    ctx.metrics.error(ErrorCode::Overloaded);
                    drop(stream);
                    continue;
                }
                glommio::spawn_local(accept_one(ctx.clone(), stream)).detach();
            }
            Err(e) => {
                // EMFILE/ENFILE: out of descriptors. Back off instead of spinning.
                tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn accept_one(ctx: Rc<Ctx>, mut stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let Some(slot) = ctx
        .conns
        .preauth
        .try_acquire(peer.ip(), ctx.cfg.max_preauth_per_ip)
    else {
        ctx.metrics.refused_per_ip_total.fetch_add(1, Relaxed);
        ctx.metrics.error(ErrorCode::Overloaded);
        tracing::debug!(peer = %peer, "refused: max_preauth_per_ip reached for this address");
        return;
    };
    let _ = stream.set_nodelay(true);
    set_buffers(
        &stream,
        ctx.cfg.socket_rcvbuf_bytes,
        ctx.cfg.socket_sndbuf_bytes,
    );
    ctx.conns.handshake_started();
    let shaken = handshake::handshake(
        &mut stream,
        &ctx.key,
        Duration::from_millis(ctx.cfg.handshake_timeout_ms),
    )
    .await;
    ctx.conns.handshake_ended();
    match shaken {
        Ok((transport, client_static)) => {
            ctx.metrics.handshakes_total.fetch_add(1, Relaxed);
            if ctx.life.draining.get() {
                return;
            }
            ctx.refresh_now();
            let (io, stream_left) = match ctx.ring.as_ref() {
                None => (None, Some(stream)),
                Some(ring) => match uring::take_fd(stream) {
                    Ok(fd) => (Some(RingIo::new(fd, ring.kick.clone())), None),
                    Err(e) => {
                        tracing::warn!(peer = %peer, error = %e, "dup failed after the handshake");
                        return;
                    }
                },
            };
            let ring_core = io.is_some();
            let c = ctx.register(peer, transport, io);
            *c.preauth_slot.borrow_mut() = Some(slot);
            ctx.feed(Event::Connected {
                conn: c.id,
                peer_ip: peer.ip(),
                static_key: client_static,
            });
            if ring_core {
                // No task from here on: the shard's ring drives the connection.
                uring::start(&ctx, &c);
                return;
            }
            let Some(stream) = stream_left else { return };
            conn_task::run(ctx.clone(), c, stream, Vec::new()).await;
        }
        Err(e) => {
            ctx.metrics.handshake_failures_total.fetch_add(1, Relaxed);
            ctx.metrics.error(e.code());
            tracing::debug!(peer = %peer, error = %e, "handshake failed");
        }
    }
}

/// Binds a listener with SO_REUSEPORT (one per shard on the same address; the kernel spreads
/// connections across them) and the configured accept backlog. glommio's own `bind` fixes the
/// backlog at 1024, too short for a reconnect storm; somaxconn still caps what we ask.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    // SAFETY: a freshly bound, listening socket whose descriptor we hand over exactly once.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

/// Sets SO_RCVBUF/SO_SNDBUF on a client socket (0 keeps the kernel default).
fn set_buffers(stream: &TcpStream, rcv: usize, snd: usize) {
    // SAFETY: `stream` owns the descriptor and outlives this borrow, which ends with the
    // function.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    if rcv > 0 {
        if let Err(e) = sock.set_recv_buffer_size(rcv) {
            tracing::debug!(error = %e, "setting SO_RCVBUF failed");
        }
    }
    if snd > 0 {
        if let Err(e) = sock.set_send_buffer_size(snd) {
            tracing::debug!(error = %e, "setting SO_SNDBUF failed");
        }
    }
}
