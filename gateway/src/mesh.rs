//! Shard-to-shard messaging: what travels on glommio's channel mesh (bounded SPSC rings), and
//! the per-peer backlog that keeps a full ring from blocking the shard.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;

use glommio::channels::channel_mesh::Senders;
use protocol::noise::Transport;
use shards::{LoginInfo, MeshMsg, ShardId};

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

/// The sending side of one shard's mesh: the rings to every peer and, per peer, the messages
/// waiting because that ring was full.
pub struct MeshOut {
    senders: Senders<GatewayMsg>,
    backlog: RefCell<Vec<VecDeque<GatewayMsg>>>,
    flushing: Vec<Cell<bool>>,
    notify: Notify,
}

impl MeshOut {
    /// The sending side over `senders`, for a mesh of `peers` shards.
    pub fn new(senders: Senders<GatewayMsg>, peers: usize) -> Self {
        Self {
            senders,
            backlog: RefCell::new((0..peers).map(|_| VecDeque::new()).collect()),
            flushing: (0..peers).map(|_| Cell::new(false)).collect(),
            notify: Notify::default(),
        }
    }

    /// Sends a mesh message to `to`, preserving per-peer order: straight into the ring when
    /// nothing is queued for that peer, else behind the queued ones (flushed by a task).
    pub fn send(&self, to: ShardId, msg: GatewayMsg, metrics: &ShardMetrics) {
        let i = usize::from(to);
        let idle = self.backlog.borrow().get(i).is_some_and(VecDeque::is_empty)
            && !self.flushing.get(i).is_some_and(Cell::get);
        let msg = if idle {
            match self.senders.try_send_to(i, msg) {
                Ok(()) => return,
                Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)))
                | Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                Err(e) => {
                    tracing::warn!(to, error = %e, "mesh send failed");
                    return;
                }
            }
        } else {
            msg
        };
        if let Some(q) = self.backlog.borrow_mut().get_mut(i) {
            q.push_back(msg);
        }
        metrics.mesh_backlog.fetch_add(1, Relaxed);
        self.notify.notify();
    }

    /// The backlog flusher: waits for the ring of each peer with a backlog to have room and
    /// moves the backlog into it in order. Runs forever (one task per shard).
    pub async fn flush_forever(&self, shard: ShardId, metrics: &ShardMetrics) {
        loop {
            self.notify.notified().await;
            for peer in 0..self.flushing.len() {
                self.flush_peer(shard, peer, metrics).await;
            }
        }
    }

    async fn flush_peer(&self, shard: ShardId, peer: usize, metrics: &ShardMetrics) {
        loop {
            let Some(msg) = self
                .backlog
                .borrow_mut()
                .get_mut(peer)
                .and_then(VecDeque::pop_front)
            else {
                break;
            };
            if let Some(f) = self.flushing.get(peer) {
                f.set(true);
            }
            metrics.mesh_backlog.fetch_sub(1, Relaxed);
            if self.senders.send_to(peer, msg).await.is_err() {
                tracing::warn!(shard, peer, "mesh peer gone; message dropped");
            }
            if let Some(f) = self.flushing.get(peer) {
                f.set(false);
            }
        }
    }
}
