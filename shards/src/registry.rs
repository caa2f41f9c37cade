//! The registry: every connection on this shard, and which connection each logged-in device
//! uses.

use crate::types::HashMap;
use std::collections::BTreeMap;
use std::net::IpAddr;

use protocol::DeviceAddr;

use crate::types::StaticKey;
use crate::{ConnId, ShardId};

/// A logged-in connection.
#[derive(Debug)]
pub(crate) struct Session {
    /// The logged-in device.
    pub addr: DeviceAddr,
    pub peer_ip: IpAddr,
    pub static_key: StaticKey,
    /// Capabilities the client announced (`PrekeyStatus` only with `PREKEYS`).
    pub capabilities: u64,
    /// `Deliver`/`Receipt` frames sent on this connection and not acknowledged yet.
    pub inflight: usize,
    /// `Store`s sent per destination shard whose `SendResult` has not come back. At most one
    /// entry per shard, so bounded by `Config::shards`.
    pub outstanding: BTreeMap<ShardId, u64>,
}

impl Session {
    pub fn key(&self) -> DeviceAddr {
        self.addr
    }
}

/// A connection on this shard.
#[derive(Debug)]
pub(crate) enum Conn {
    /// Handshake done, no `Login` yet.
    PreAuth {
        peer_ip: IpAddr,
        static_key: StaticKey,
    },
    /// Logged in; this shard is the user's home.
    LoggedIn(Session),
}

impl Conn {
    fn peer(&self) -> (IpAddr, StaticKey) {
        match self {
            Conn::PreAuth {
                peer_ip,
                static_key,
            } => (*peer_ip, *static_key),
            Conn::LoggedIn(s) => (s.peer_ip, s.static_key),
        }
    }
}

/// Connections (bounded by the gateway's connection limit) and online devices.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    conns: HashMap<ConnId, Conn>,
    /// Which connection each logged-in device uses.
    online: HashMap<DeviceAddr, ConnId>,
    /// Logins accepted.
    pub logins: u64,
}

impl Registry {
    /// A connection finished its handshake here.
    pub fn connected(&mut self, conn: ConnId, peer_ip: IpAddr, static_key: StaticKey) {
        self.forget(conn);
        self.conns.insert(
            conn,
            Conn::PreAuth {
                peer_ip,
                static_key,
            },
        );
    }

    /// Drops a connection's state. Entries it had in flight stay queued: `sent_on` no longer
    /// names the device's connection, so the next login resends them.
    pub fn forget(&mut self, conn: ConnId) {
        if let Some(Conn::LoggedIn(s)) = self.conns.remove(&conn) {
            let key = s.key();
            if self.online.get(&key) == Some(&conn) {
                self.online.remove(&key);
            }
        }
    }

    pub fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn)
    }

    pub fn contains(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    pub fn session(&self, conn: ConnId) -> Option<&Session> {
        match self.conns.get(&conn) {
            Some(Conn::LoggedIn(s)) => Some(s),
            _ => None,
        }
    }

    pub fn session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        match self.conns.get_mut(&conn) {
            Some(Conn::LoggedIn(s)) => Some(s),
            _ => None,
        }
    }

    /// The connection's peer address and static key, logged in or not.
    pub fn peer(&self, conn: ConnId) -> Option<(IpAddr, StaticKey)> {
        self.conns.get(&conn).map(Conn::peer)
    }

    /// Forgets a pre-auth connection that is about to log in.
    pub fn take_pre_auth(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// The connection `key` is logged in on.
    pub fn online(&self, key: DeviceAddr) -> Option<ConnId> {
        self.online.get(&key).copied()
    }

    pub fn is_online(&self, key: DeviceAddr) -> bool {
        self.online.contains_key(&key)
    }

    /// The session of the connection `key` is logged in on.
    pub fn online_session_mut(&mut self, key: DeviceAddr) -> Option<(ConnId, &mut Session)> {
        let conn = self.online(key)?;
        self.session_mut(conn).map(|s| (conn, s))
    }

    pub fn log_in(&mut self, conn: ConnId, session: Session) {
        let key = session.key();
        self.conns.insert(conn, Conn::LoggedIn(session));
        self.online.insert(key, conn);
        self.logins = self.logins.saturating_add(1);
    }

    /// An entry last sent on `sent_on` left the mailbox of `key`: free its window slot if that
    /// is the device's current connection.
    pub fn release_slot(&mut self, key: DeviceAddr, sent_on: Option<ConnId>) {
        if let (Some(sent), Some(current)) = (sent_on, self.online(key)) {
            if sent == current {
                if let Some(s) = self.session_mut(current) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
            }
        }
    }

    /// Logged-in connections still waiting for a `SendResult` from `shard`, in id order.
    pub fn waiting_on(&self, shard: ShardId) -> Vec<ConnId> {
        let mut doomed: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(&c, s)| match s {
                Conn::LoggedIn(s) if s.outstanding.get(&shard).is_some_and(|&n| n > 0) => Some(c),
                _ => None,
            })
            .collect();
        doomed.sort_unstable();
        doomed
    }

    /// Devices logged in here.
    pub fn logged_in(&self) -> usize {
        self.online.len()
    }
}
