//! Presence by subscription: who watches whom, and who is online.
//!
//! * **Subscriptions, not broadcasts.** A device subscribes to the users whose chats it has
//!   open, each with a TTL (at most `presence_subscription_ttl_s_max`). The subscription lives
//!   on the watched user's home shard ([`Watched`]); the subscriber's shard keeps only which
//!   users each of its connections watches ([`Watching`], for the per-connection cap and to
//!   unsubscribe when the connection closes). A user's online/offline change sends one frame
//!   per live subscriber whose view of it changed, and nothing to anyone else: a login costs
//!   O(subscribers), never O(contacts).
//! * **Caps.** `presence_subscriptions_per_conn_max` live subscriptions per connection
//!   (`PresenceSubscriptionLimit`), `presence_subscribers_per_user_max` per watched user
//!   (`PresenceSubscriberLimit`). Both refuse; nothing is evicted.
//! * **Expiry.** Home side: an index by expiry time, swept at every Tick. Subscriber side:
//!   expired entries are dropped when the connection's count is checked.
//! * **Online** means a logged-in connection of any device of the user on this (its home)
//!   shard; this state counts them itself (login and `Event::Closed`), so a server-side close
//!   followed by its `Closed` is one offline change, and a replaced connection none.
//! * Volatile: a restart forgets every subscription (clients subscribe again when they
//!   reconnect: their connection dropped).

use crate::types::HashMap;
use std::collections::{BTreeMap, BTreeSet};

use protocol::{DeviceAddr, ErrorCode, UserId};

use crate::limits::RateTable;
use crate::{ConnId, ConnRef};

/// What the subscriber's home shard says about the subscriber's side of the visibility rules
/// (it owns the subscriber's settings): whether it shares its last seen and online status with
/// the watched user (reciprocity), and whether it blocked the watched user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reciprocity {
    /// The subscriber's last-seen setting lets the watched user see it.
    pub shares_last_seen: bool,
    /// The subscriber's online setting lets the watched user see it.
    pub shares_online: bool,
    /// The subscriber blocked the watched user.
    pub blocked: bool,
}

/// One subscriber of a watched user.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sub {
    pub conn: ConnRef,
    pub watcher: UserId,
    pub expires_ms: u64,
    pub recip: Reciprocity,
}

/// The limits this state enforces (from [`crate::Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    per_conn_max: usize,
    per_user_max: usize,
    ttl_ms_max: u64,
    typing_per_s: u32,
    rate_table_max: usize,
}

/// Presence state of one shard.
#[derive(Debug)]
pub(crate) struct Presence {
    limits: Limits,
    /// Home side: subscribers of each watched user homed here.
    watched: HashMap<UserId, Vec<Sub>>,
    /// Home side: (expires_ms, watched user, subscriber connection), for the sweep.
    expiry: BTreeSet<(u64, UserId, ShardConn)>,
    /// Subscriber side: the users each connection here watches, with their expiry.
    watching: HashMap<ConnId, BTreeMap<UserId, u64>>,
    /// Logged-in connections of this shard and their device.
    conns: HashMap<ConnId, DeviceAddr>,
    /// The connection each device is counted under (a login replacing another takes over its
    /// count: no presence change).
    device_conn: HashMap<DeviceAddr, ConnId>,
    /// Logged-in connections per user (online while > 0).
    online: HashMap<UserId, usize>,
    /// Typing notices per device per second.
    typing_rate: RateTable<DeviceAddr>,
    /// Counters (see [`crate::ShardStats`]).
    pub subscriptions_refused_conn: u64,
    pub subscriptions_refused_user: u64,
    pub changes: u64,
    pub change_frames: u64,
    pub typing_relayed: u64,
    pub typing_rate_limited: u64,
    pub subscriptions_expired: u64,
}

/// A connection as an ordered key: (shard, conn).
type ShardConn = (u16, ConnId);

fn key(c: ConnRef) -> ShardConn {
    (c.shard, c.conn)
}

impl Presence {
    pub fn new(cfg: &crate::Config) -> Self {
        Self {
            limits: Limits {
                per_conn_max: cfg.presence_subscriptions_per_conn_max,
                per_user_max: cfg.presence_subscribers_per_user_max,
                ttl_ms_max: u64::from(cfg.presence_subscription_ttl_s_max).saturating_mul(1000),
                typing_per_s: cfg.typing_per_device_per_s,
                rate_table_max: cfg.presence_rate_table_max_entries,
            },
            watched: HashMap::default(),
            expiry: BTreeSet::new(),
            watching: HashMap::default(),
            conns: HashMap::default(),
            device_conn: HashMap::default(),
            online: HashMap::default(),
            typing_rate: RateTable::new(1000),
            subscriptions_refused_conn: 0,
            subscriptions_refused_user: 0,
            changes: 0,
            change_frames: 0,
            typing_relayed: 0,
            typing_rate_limited: 0,
            subscriptions_expired: 0,
        }
    }

    /// The TTL a subscription gets for a requested `ttl_s` (capped).
    pub fn ttl_ms(&self, ttl_s: u32) -> u64 {
        u64::from(ttl_s)
            .saturating_mul(1000)
            .min(self.limits.ttl_ms_max)
    }

    // ----- online --------------------------------------------------------------------------

    /// Whether any device of `user` is logged in here.
    pub fn is_online(&self, user: UserId) -> bool {
        self.online.get(&user).is_some_and(|&n| n > 0)
    }

    /// A connection logged in as `addr`; true when its user just came online. A connection
    /// that replaces another of the same device takes over its count (the replaced one's
    /// `Closed` then changes nothing).
    pub fn logged_in(&mut self, conn: ConnId, addr: DeviceAddr) -> bool {
        if self.conns.contains_key(&conn) {
            return false;
        }
        self.conns.insert(conn, addr);
        if let Some(old) = self.device_conn.insert(addr, conn) {
            if self.conns.remove(&old).is_some() {
                return false;
            }
        }
        let n = self.online.entry(addr.user).or_insert(0);
        *n = n.saturating_add(1);
        *n == 1
    }

    /// A connection closed: its device (if it was logged in) and whether its user just went
    /// offline. Its subscriptions are forgotten here and returned (the caller unsubscribes
    /// them at their homes).
    pub fn closed(&mut self, conn: ConnId) -> (Option<(DeviceAddr, bool)>, Vec<UserId>) {
        let watched = self
            .watching
            .remove(&conn)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default();
        let Some(addr) = self.conns.remove(&conn) else {
            return (None, watched);
        };
        if self.device_conn.get(&addr) == Some(&conn) {
            self.device_conn.remove(&addr);
        }
        let gone = match self.online.get_mut(&addr.user) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            self.online.remove(&addr.user);
        }
        (Some((addr, gone)), watched)
    }

    /// The device logged in on `conn`, if it is.
    pub fn device_of(&self, conn: ConnId) -> Option<DeviceAddr> {
        self.conns.get(&conn).copied()
    }

    /// Whether `user` has exactly one logged-in connection here (closing it takes the user
    /// offline).
    pub fn last_conn(&self, user: UserId) -> bool {
        self.online.get(&user) == Some(&1)
    }

    // ----- subscriber side -----------------------------------------------------------------

    /// A `PresenceSubscribe` from `conn` for `user` until `expires_ms`: counts it against the
    /// per-connection cap (a renewal always fits). `Err` when the cap is reached.
    pub fn watch(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        user: UserId,
        expires_ms: u64,
    ) -> Result<(), ErrorCode> {
        let max = self.limits.per_conn_max;
        let m = self.watching.entry(conn).or_default();
        if !m.contains_key(&user) {
            m.retain(|_, &mut e| e > now_ms);
            if m.len() >= max {
                self.subscriptions_refused_conn = self.subscriptions_refused_conn.saturating_add(1);
                return Err(ErrorCode::PresenceSubscriptionLimit);
            }
        }
        m.insert(user, expires_ms);
        Ok(())
    }

    /// The live subscriptions of `conn`: (watched user, expiry), by user.
    pub fn watched_by(&self, conn: ConnId, now_ms: u64) -> Vec<(UserId, u64)> {
        self.watching
            .get(&conn)
            .map(|m| {
                m.iter()
                    .filter(|(_, &e)| e > now_ms)
                    .map(|(&u, &e)| (u, e))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The subscription of `conn` to `user` ended (unsubscribed, or refused at the home).
    pub fn unwatch(&mut self, conn: ConnId, user: UserId) {
        if let Some(m) = self.watching.get_mut(&conn) {
            m.remove(&user);
            if m.is_empty() {
                self.watching.remove(&conn);
            }
        }
    }

    // ----- home side -----------------------------------------------------------------------

    /// Adds or renews the subscription of `sub.conn` to `user` (homed here).
    pub fn subscribe(&mut self, user: UserId, sub: Sub) -> Result<(), ErrorCode> {
        let max = self.limits.per_user_max;
        let subs = self.watched.entry(user).or_default();
        if let Some(old) = subs.iter_mut().find(|s| s.conn == sub.conn) {
            self.expiry.remove(&(old.expires_ms, user, key(old.conn)));
            *old = sub;
        } else {
            if subs.len() >= max {
                self.subscriptions_refused_user = self.subscriptions_refused_user.saturating_add(1);
                if subs.is_empty() {
                    self.watched.remove(&user);
                }
                return Err(ErrorCode::PresenceSubscriberLimit);
            }
            subs.push(sub);
        }
        self.expiry.insert((sub.expires_ms, user, key(sub.conn)));
        Ok(())
    }

    /// Ends the subscription of `conn` to `user`, if any.
    pub fn unsubscribe(&mut self, user: UserId, conn: ConnRef) {
        let Some(subs) = self.watched.get_mut(&user) else {
            return;
        };
        if let Some(i) = subs.iter().position(|s| s.conn == conn) {
            let s = subs.swap_remove(i);
            self.expiry.remove(&(s.expires_ms, user, key(s.conn)));
        }
        if subs.is_empty() {
            self.watched.remove(&user);
        }
    }

    /// The live subscribers of `user`, in connection order (deterministic output).
    pub fn subscribers(&self, user: UserId, now_ms: u64) -> Vec<Sub> {
        let mut subs: Vec<Sub> = self
            .watched
            .get(&user)
            .map(|v| {
                v.iter()
                    .filter(|s| s.expires_ms > now_ms)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        subs.sort_unstable_by_key(|s| key(s.conn));
        subs
    }

    /// Tick: forgets subscriptions past their TTL.
    pub fn sweep(&mut self, now_ms: u64) {
        while let Some(&(at, user, conn)) = self.expiry.first() {
            if at > now_ms {
                break;
            }
            self.expiry.pop_first();
            if let Some(subs) = self.watched.get_mut(&user) {
                subs.retain(|s| key(s.conn) != conn || s.expires_ms != at);
                if subs.is_empty() {
                    self.watched.remove(&user);
                }
            }
            self.subscriptions_expired = self.subscriptions_expired.saturating_add(1);
        }
        self.typing_rate.sweep(now_ms);
    }

    /// Subscriptions held for users homed here (gauge).
    pub fn subscriptions(&self) -> usize {
        self.expiry.len()
    }

    // ----- typing --------------------------------------------------------------------------

    /// Whether `from` may send one more typing notice now.
    pub fn typing_allowed(&mut self, from: DeviceAddr, now_ms: u64) -> bool {
        let l = self.limits;
        let ok = self
            .typing_rate
            .hit(from, now_ms, l.typing_per_s, l.rate_table_max);
        if !ok {
            self.typing_rate_limited = self.typing_rate_limited.saturating_add(1);
        }
        ok
    }
}
