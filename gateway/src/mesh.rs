//! Shard-to-shard messaging: what travels on glommio's channel mesh (bounded SPSC rings), and
//! the per-peer backlog that keeps a full ring from blocking the shard.
//!
//! A message for a peer goes straight into its ring when nothing is queued for that peer;
//! otherwise (the ring was full, or earlier messages still wait) it joins that peer's backlog,
//! a FIFO drained by one flusher task per peer, so a slow peer holds up only its own backlog.
//!
//! The backlog is bounded by `mesh_backlog_msgs_max` per peer. Policy when it is full:
//! * A *request* made on behalf of one of this shard's connections (`Store`, `RegisterRequest`,
//!   `RegisterVerify`, `PrekeyFetch`) is refused and that connection is closed with
//!   `Overloaded`. Closing, rather than answering one request with an error, keeps the
//!   per-sender order guarantee: the client reconnects after a back-off and resends every
//!   unacknowledged message in order, as after any disconnect. Counted in
//!   `switchboard_mesh_backlog_refused_total`.
//! * A *hand-off* is refused too: its socket is closed and the client reconnects (the same
//!   counter).
//! * Anything else finishes work the peer already did or asked for (`SendResult`, `ToConn`,
//!   `PrekeyFetchResult`, `StoreReceipt`, `ClaimKey`, `KeyClaimed`); refusing it would lose an
//!   outcome that may already be durable. It may use a reserve of another
//!   `mesh_backlog_msgs_max` messages (so this shard's own clients cannot crowd it out) and is
//!   dropped only past twice the bound, counted in `switchboard_mesh_backlog_dropped_total`
//!   and logged: that peer's client then sees no answer until it reconnects (a dropped ✓ is
//!   recovered by the resend and dedup).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;

use glommio::channels::channel_mesh::Senders;
use protocol::noise::Transport;
use shards::{ConnId, LoginInfo, MeshMsg, ShardId};

use crate::metrics::ShardMetrics;
use crate::notify::Notify;

/// A connection moving to its user's home shard after login: the socket, the transport cipher
/// state, and any bytes already read or sealed but not yet processed or written.
pub struct Handoff {
    /// The socket (a duplicate descriptor with no io_uring operation in flight).
    pub fd: OwnedFd,
    /// Noise transport state (keys and nonces).
    pub transport: Transport,
    /// Bytes received after the `Login` record, not yet processed.
    pub pending_in: Vec<u8>,
    /// Sealed records not yet written.
    pub pending_out: Vec<u8>,
    /// The login to replay on the home shard.
    pub info: LoginInfo,
    /// Peer address.
    pub peer: SocketAddr,
}

/// What travels on the channel mesh.
pub enum GatewayMsg {
    /// A state-machine message.
    Core(MeshMsg),
    /// A connection hand-off.
    Handoff(Box<Handoff>),
}

/// How a message counts against a full backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request on behalf of connection `.0` of this shard: refused when the backlog is full.
    Request(ConnId),
    /// A connection hand-off: refused when the backlog is full.
    Handoff,
    /// A reply or other follow-up: may use the reserve, dropped past it.
    FollowUp,
}

impl Kind {
    /// Classifies a message.
    pub fn of(msg: &GatewayMsg) -> Kind {
        match msg {
            GatewayMsg::Handoff(_) => Kind::Handoff,
            GatewayMsg::Core(m) => match m {
                MeshMsg::Store(shards::Store { reply, .. })
                | MeshMsg::RegisterRequest { reply, .. }
                | MeshMsg::RegisterVerify(shards::RegisterVerify { reply, .. })
                | MeshMsg::PrekeyFetch(shards::PrekeyFetch { reply, .. })
                                | MeshMsg::DeviceListFetch(shards::DeviceListFetch { reply, .. }) => {
                    Kind::Request(reply.conn)
                }
                MeshMsg::StoreMulti(s) => Kind::Request(s.reply.conn),
                MeshMsg::GroupRequest(r) => Kind::Request(r.reply.conn),
                // Re-sent by the group's home after group_fanout_retry_ms until acknowledged,
                // so one dropped past the reserve only delays delivery.
                MeshMsg::GroupFanout(_) | MeshMsg::GroupFanoutAck(_) => Kind::FollowUp,
                // A change whose reservation answer is lost fails on the home's Tick after
                // group_fanout_retry_ms (its reservations released); a lost release leaves a
                // membership counted (see shards/src/memberships.rs).
                MeshMsg::GroupJoin(_) | MeshMsg::GroupJoined(_) | MeshMsg::GroupRelease(_) => {
                    Kind::FollowUp
                }
                // Best effort: the next change is sent on a later tick, and fetches answer.
                MeshMsg::GroupReceipts(_) | MeshMsg::GroupReceiptNotice(_) => Kind::FollowUp,
                MeshMsg::SendResult { .. }
                | MeshMsg::StoreReceipt { .. }
                | MeshMsg::ToConn { .. }
                | MeshMsg::ClaimKey { .. }
                | MeshMsg::KeyClaimed { .. }
                | MeshMsg::PrekeyFetchResult { .. }
                // Sent by a shard for an approval it holds (no connection of its own to
                // close): if dropped, the primary's approval times out and it approves again.
                | MeshMsg::LinkClaim { .. }
                | MeshMsg::LinkClaimed { .. }
                // Presence and calls are best effort (see `shards::social`): a dropped one is
                // repaired by the subscription TTL, the ring timeout or the client's hangup.
                | MeshMsg::Presence(_)
                | MeshMsg::Call(_) => Kind::FollowUp,
            },
        }
    }

    /// Whether a message of this kind may join a backlog already holding `depth` messages.
    pub fn admitted(self, depth: usize, max: usize) -> bool {
        match self {
            Kind::Request(_) | Kind::Handoff => depth < max,
            Kind::FollowUp => depth < max.saturating_mul(2),
        }
    }
}

/// A message the backlog to its peer had no room for.
pub enum Refused {
    /// A request on behalf of this local connection: the caller closes it with `Overloaded`.
    Request(ConnId),
    /// A hand-off: dropping it closes the socket; the client reconnects.
    Handoff(Box<Handoff>),
    /// A follow-up past the reserve, dropped.
    Dropped,
}

/// The backlog to one peer.
#[derive(Default)]
struct Peer {
    queue: RefCell<VecDeque<GatewayMsg>>,
    /// The flusher holds a message it popped but has not yet placed in the ring.
    flushing: Cell<bool>,
    /// Wakes the peer's flusher.
    notify: Notify,
}

/// The sending side of one shard's mesh: the rings to every peer and, per peer, the messages
/// waiting because that ring was full.
pub struct MeshOut {
    senders: Senders<GatewayMsg>,
    peers: Vec<Peer>,
    backlog_max: usize,
}

impl MeshOut {
    /// The sending side over `senders`, for a mesh of `peers` shards, each backlog bounded by
    /// `backlog_max` (`mesh_backlog_msgs_max`).
    pub fn new(senders: Senders<GatewayMsg>, peers: usize, backlog_max: usize) -> Self {
        Self {
            senders,
            peers: (0..peers).map(|_| Peer::default()).collect(),
            backlog_max,
        }
    }

    /// Sends a mesh message to `to`, preserving per-peer order: straight into the ring when
    /// nothing is queued for that peer, else behind the queued ones (flushed by that peer's
    /// task). Returns what the full backlog refused (see the module doc for the policy).
    pub fn send(
        &self,
        to: ShardId,
        msg: GatewayMsg,
        metrics: &ShardMetrics,
    ) -> Result<(), Refused> {
        let i = usize::from(to);
        let Some(peer) = self.peers.get(i) else {
            tracing::warn!(to, "mesh send to an unknown shard dropped");
            return Err(Refused::Dropped);
        };
        let idle = peer.queue.borrow().is_empty() && !peer.flushing.get();
        let msg = if idle {
            match self.senders.try_send_to(i, msg) {
                Ok(()) => return Ok(()),
                Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)))
                | Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                Err(e) => {
                    tracing::warn!(to, error = %e, "mesh send failed");
                    return Ok(());
                }
            }
        } else {
            msg
        };
        let depth = peer.queue.borrow().len();
        let kind = Kind::of(&msg);
        if !kind.admitted(depth, self.backlog_max) {
            return Err(refuse(kind, msg, to, depth, metrics));
        }
        peer.queue.borrow_mut().push_back(msg);
        metrics.mesh_backlog.fetch_add(1, Relaxed);
        if let Some(g) = metrics.mesh_backlog_peer.get(i) {
            g.store(depth as u64 + 1, Relaxed);
        }
        peer.notify.notify();
        Ok(())
    }

    /// Peer `peer`'s flusher: waits for its ring to have room and moves its backlog into it in
    /// order. Runs forever (one task per peer, so a full ring to one shard does not hold up
    /// the others).
    pub async fn flush_forever(&self, shard: ShardId, peer: usize, metrics: &ShardMetrics) {
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        loop {
            p.notify.notified().await;
            loop {
                let Some(msg) = p.queue.borrow_mut().pop_front() else {
                    break;
                };
                p.flushing.set(true);
                metrics.mesh_backlog.fetch_sub(1, Relaxed);
                if let Some(g) = metrics.mesh_backlog_peer.get(peer) {
                    g.store(p.queue.borrow().len() as u64, Relaxed);
                }
                if self.senders.send_to(peer, msg).await.is_err() {
                    tracing::warn!(shard, peer, "mesh peer gone; message dropped");
                }
                p.flushing.set(false);
            }
        }
    }
}

fn refuse(kind: Kind, msg: GatewayMsg, to: ShardId, depth: usize, m: &ShardMetrics) -> Refused {
    match (kind, msg) {
        (Kind::Handoff, GatewayMsg::Handoff(h)) => {
            m.mesh_backlog_refused_total.fetch_add(1, Relaxed);
            tracing::warn!(
                to,
                depth,
                "mesh backlog full (mesh_backlog_msgs_max): hand-off refused"
            );
            Refused::Handoff(h)
        }
        (Kind::Request(conn), _) => {
            m.mesh_backlog_refused_total.fetch_add(1, Relaxed);
            tracing::warn!(
                to,
                depth,
                conn,
                "mesh backlog full (mesh_backlog_msgs_max): request refused"
            );
            Refused::Request(conn)
        }
        _ => {
            m.mesh_backlog_dropped_total.fetch_add(1, Relaxed);
            tracing::warn!(
                to,
                depth,
                "mesh backlog past twice mesh_backlog_msgs_max: message dropped"
            );
            Refused::Dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::channels::channel_mesh::{Full, MeshBuilder};
    use glommio::{LocalExecutorBuilder, Placement};
    use shards::ConnRef;
    use std::rc::Rc;
    use std::time::Duration;

    fn follow_up(token: u64) -> GatewayMsg {
        GatewayMsg::Core(MeshMsg::KeyClaimed(shards::KeyClaimed {
            token,
            result: Ok(()),
        }))
    }

    fn request(conn: ConnId) -> GatewayMsg {
        GatewayMsg::Core(MeshMsg::RegisterRequest {
            reply: ConnRef { shard: 0, conn },
            phone: 14155550100,
        })
    }

    fn token(m: &GatewayMsg) -> Option<u64> {
        match m {
            GatewayMsg::Core(MeshMsg::KeyClaimed(k)) => Some(k.token),
            GatewayMsg::Core(MeshMsg::RegisterRequest { reply, .. }) => Some(1000 + reply.conn),
            _ => None,
        }
    }

    #[test]
    fn admission_reserves_room_for_follow_ups() {
        assert!(Kind::Request(1).admitted(1, 2));
        assert!(!Kind::Request(1).admitted(2, 2));
        assert!(!Kind::Handoff.admitted(2, 2));
        assert!(Kind::FollowUp.admitted(3, 2));
        assert!(!Kind::FollowUp.admitted(4, 2));
    }

    /// The peer's side: joins, blocks until told how many messages to expect, reads them.
    async fn read_after_go(mesh: Mesh, go: std::sync::mpsc::Receiver<usize>) -> Vec<u64> {
        let (_senders, mut receivers) = mesh.join().await.unwrap();
        // Blocks this executor: nothing is read until the producer says how many.
        let count = go.recv().unwrap();
        let (_, rx) = receivers.streams().into_iter().next().unwrap();
        let mut got = Vec::new();
        for _ in 0..count {
            let m = glommio::timer::timeout(Duration::from_secs(30), async { Ok(rx.recv().await) })
                .await
                .unwrap()
                .unwrap();
            got.push(token(&m).unwrap());
        }
        got
    }

    /// Fills the ring, then the backlog (max 2) past both limits; returns what was accepted.
    fn fill_past_limits(out: &MeshOut, metrics: &ShardMetrics, peer: usize) -> Vec<u64> {
        let to = peer as ShardId;
        let gauge = |m: &ShardMetrics| m.mesh_backlog_peer[peer].load(Relaxed);
        let mut sent = Vec::new();
        // Fill the ring until the first message lands in the backlog.
        let mut t = 0;
        while gauge(metrics) == 0 {
            assert!(t < 4096, "the ring never filled");
            assert!(out.send(to, follow_up(t), metrics).is_ok());
            sent.push(t);
            t += 1;
        }
        assert!(out.send(to, request(7), metrics).is_ok());
        sent.push(1007);
        assert!(matches!(
            out.send(to, request(8), metrics),
            Err(Refused::Request(8))
        ));
        for _ in 0..2 {
            assert!(out.send(to, follow_up(t), metrics).is_ok());
            sent.push(t);
            t += 1;
        }
        assert!(matches!(
            out.send(to, follow_up(t), metrics),
            Err(Refused::Dropped)
        ));
        assert_eq!(gauge(metrics), 4);
        assert_eq!(metrics.mesh_backlog.load(Relaxed), 4);
        assert_eq!(metrics.mesh_backlog_refused_total.load(Relaxed), 1);
        assert_eq!(metrics.mesh_backlog_dropped_total.load(Relaxed), 1);
        sent
    }

    /// This shard's side: fills past the limits, lets the peer read, flushes the backlog.
    async fn fill_then_flush(mesh: Mesh, go: std::sync::mpsc::Sender<usize>) -> Vec<u64> {
        let (senders, _receivers) = mesh.join().await.unwrap();
        let me = senders.peer_id();
        let peer = 1 - me;
        let out = Rc::new(MeshOut::new(senders, 2, 2));
        let metrics = Rc::new(ShardMetrics::new(2));
        let sent = fill_past_limits(&out, &metrics, peer);
        go.send(sent.len()).unwrap();
        let (o, m) = (out.clone(), metrics.clone());
        glommio::spawn_local(async move { o.flush_forever(me as ShardId, peer, &m).await })
            .detach();
        out.peers[peer].notify.notify();
        for _ in 0..3000 {
            if metrics.mesh_backlog.load(Relaxed) == 0 && !out.peers[peer].flushing.get() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.mesh_backlog_peer[peer].load(Relaxed), 0);
        sent
    }

    type Mesh = MeshBuilder<GatewayMsg, Full>;

    /// With the peer not reading, messages fill its ring, then its backlog up to
    /// `backlog_max` for requests (the next is refused with its connection) and twice that for
    /// follow-ups (the next is dropped); gauges and counters say so; once the peer reads, the
    /// flusher delivers every accepted message in order.
    #[test]
    fn full_backlog_refuses_requests_drops_past_reserve_and_keeps_order() {
        let mesh: Mesh = MeshBuilder::full(2, 1);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<usize>();
        let consumer_mesh = mesh.clone();
        let consumer = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || read_after_go(consumer_mesh, go_rx))
            .unwrap();
        let producer = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || fill_then_flush(mesh, go_tx))
            .unwrap();
        let sent = producer.join().unwrap();
        let got = consumer.join().unwrap();
        assert_eq!(got, sent);
    }
}
