//! A shard's table of its connections: the open ones by id, the count still in the handshake,
//! the per-address pre-auth counts, and the shard's share of `max_connections`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use protocol::noise::Transport;
use shards::{ConnId, ShardId};

use crate::connection::{Conn, RingIo};
use crate::preauth::PreauthCounter;

/// One shard's connections.
pub struct ConnTable {
    shard: ShardId,
    conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    next: Cell<u64>,
    /// Connections accepted and still in the handshake (they count against the cap too, so a
    /// flood of half-open handshakes cannot exceed it).
    handshaking: Cell<usize>,
    /// Unauthenticated connections per source address (`max_preauth_per_ip`).
    pub preauth: PreauthCounter,
    max: usize,
}

impl ConnTable {
    /// An empty table for `shard` holding at most `max` connections.
    pub fn new(shard: ShardId, max: usize) -> Self {
        Self {
            shard,
            conns: RefCell::new(HashMap::new()),
            next: Cell::new(0),
            handshaking: Cell::new(0),
            preauth: PreauthCounter::default(),
            max,
        }
    }

    /// The connection `id`, if open here.
    pub fn get(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Every open connection (a snapshot: the table may change while the caller walks it).
    pub fn all(&self) -> Vec<Rc<Conn>> {
        self.conns.borrow().values().cloned().collect()
    }

    /// No connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.borrow().is_empty()
    }

    /// True when open plus handshaking connections reached the cap.
    pub fn full(&self) -> bool {
        self.conns.borrow().len() + self.handshaking.get() >= self.max
    }

    /// A connection entered the handshake.
    pub fn handshake_started(&self) {
        self.handshaking.set(self.handshaking.get() + 1);
    }

    /// A connection left the handshake (either way).
    pub fn handshake_ended(&self) {
        self.handshaking
            .set(self.handshaking.get().saturating_sub(1));
    }

    /// Adds a new open connection with a process-unique id (the shard in the top 16 bits).
    pub fn insert(
        &self,
        peer: SocketAddr,
        transport: Transport,
        now_ms: u64,
        burst: u32,
        io: Option<RingIo>,
    ) -> Rc<Conn> {
        let n = self.next.get() + 1;
        self.next.set(n);
        let id = (u64::from(self.shard) << 48) | n;
        let c = Rc::new(Conn::new(id, peer, transport, now_ms, burst, io));
        self.conns.borrow_mut().insert(id, c.clone());
        c
    }

    /// How many connections are open here.
    pub fn len(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Removes `id`; true if it was there.
    pub fn remove(&self, id: ConnId) -> bool {
        self.conns.borrow_mut().remove(&id).is_some()
    }
}
