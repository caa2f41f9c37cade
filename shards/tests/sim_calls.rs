//! Seeded simulation of presence, privacy and calls on a three-shard cluster (the synchronous
//! in-memory cluster of `common`, small log segments so compaction runs): users log in and out,
//! subscribe, change their settings, contacts and blocks, call each other, answer, hang up, let
//! rings time out; time advances in ticks, and now and then a shard crashes and recovers.
//!
//! Checked after every step:
//!
//! * presence frames go only to connections that subscribed to that user, and never ONLINE to
//!   a watcher the owner blocked;
//! * the durable log of every shard holds exactly the privacy settings, contact lists and block
//!   lists the model applied (last record per user wins), also across compaction and crashes;
//! * calls are bounded and expire: once everybody hangs up, disconnects and a ring timeout
//!   passes, no shard holds a call; a crashed shard comes back with none.
//!
//! A failure names its seed; `SIM_CALLS_SEEDS=a..b` runs other seeds.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use common::{key, user_on, Cluster};
use protocol::frame::{CallSignal, ContactsEdit, PresenceSubscribe, PrivacySet};
use protocol::presence::{CallKind, ContactOp, PresenceState, Visibility};
use protocol::{capability, Frame, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, ConnId, ShardId};

const CAPS: u64 = capability::MESSAGING | capability::PRESENCE | capability::CALLS;
const SHARDS: u16 = 3;
const USERS: usize = 6;
const STEPS: usize = 250;

/// What the model says each user's durable privacy is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Priv {
    settings: Option<(u8, u8)>,
    contacts: Option<BTreeSet<u64>>,
    blocked: Option<BTreeSet<u64>>,
}

struct World {
    c: Cluster,
    users: Vec<UserId>,
    conns: Vec<Option<ConnId>>,
    /// Per connection: the users it subscribed to, with the subscription's expiry.
    subs: BTreeMap<ConnId, BTreeMap<UserId, u64>>,
    model: BTreeMap<UserId, Priv>,
    /// Blocks as applied (for the presence check).
    blocked: BTreeMap<UserId, BTreeSet<UserId>>,
    next_call: u64,
    /// Offers made: (caller index, callee index, call id).
    offers: Vec<(usize, usize, u64)>,
    /// What happened (the run must not be vacuous).
    presence_frames: u64,
    crashes: u64,
}

impl World {
    fn new() -> Self {
        let mut c = Cluster::with_segments(SHARDS, 6, |cfg| {
            cfg.call_ring_timeout_ms = 5_000;
            cfg.call_max_ms = 60_000;
            cfg.compaction_live_ratio = 0.6;
        });
        let users: Vec<UserId> = (0..USERS)
            .map(|i| user_on((i % 3) as ShardId, SHARDS, i / 3))
            .collect();
        for (i, &u) in users.iter().enumerate() {
            c.register(u, key(i as u64 + 1));
        }
        World {
            c,
            users,
            conns: vec![None; USERS],
            subs: BTreeMap::new(),
            model: BTreeMap::new(),
            blocked: BTreeMap::new(),
            next_call: 1,
            offers: Vec::new(),
            presence_frames: 0,
            crashes: 0,
        }
    }

    fn step(&mut self, rng: &mut StdRng, seed: u64) {
        let i = rng.gen_range(0..USERS);
        let j = (i + rng.gen_range(1..USERS)) % USERS;
        let (me, peer) = (self.users[i], self.users[j]);
        match (rng.gen_range(0..100), self.conns[i]) {
            (0..=14, None) => {
                let (conn, _) = self.c.login_caps(me, key(i as u64 + 1), CAPS);
                self.conns[i] = Some(conn);
            }
            (0..=9, Some(conn)) => {
                self.c.close_conn(conn);
                self.conns[i] = None;
                self.subs.remove(&conn);
            }
            (10..=29, Some(conn)) => {
                let ttl_s = if rng.gen_bool(0.1) {
                    0
                } else {
                    rng.gen_range(1..30)
                };
                self.c.frame(
                    conn,
                    Frame::PresenceSubscribe(PresenceSubscribe {
                        request_id: 1,
                        user: peer,
                        ttl_s,
                    }),
                );
                let now = self.c.now;
                let s = self.subs.entry(conn).or_default();
                if ttl_s == 0 {
                    s.remove(&peer);
                } else {
                    s.insert(peer, now + u64::from(ttl_s) * 1000);
                }
            }
            (30..=39, Some(conn)) => {
                let v = |r: &mut StdRng| Visibility(r.gen_range(0..3));
                let (last_seen, online) = (v(rng), v(rng));
                self.c.frame(
                    conn,
                    Frame::PrivacySet(PrivacySet {
                        request_id: 2,
                        last_seen,
                        online,
                    }),
                );
                self.model.entry(me).or_default().settings = Some((last_seen.0, online.0));
            }
            (40..=54, Some(conn)) => {
                let op = ContactOp(rng.gen_range(1..=4));
                self.c.frame(
                    conn,
                    Frame::ContactsEdit(ContactsEdit {
                        request_id: 3,
                        op,
                        users: vec![peer],
                    }),
                );
                let m = self.model.entry(me).or_default();
                let b = self.blocked.entry(me).or_default();
                match op {
                    ContactOp::ADD => {
                        m.contacts.get_or_insert_with(BTreeSet::new).insert(peer);
                    }
                    ContactOp::REMOVE => {
                        m.contacts.get_or_insert_with(BTreeSet::new).remove(&peer);
                    }
                    ContactOp::BLOCK => {
                        m.blocked.get_or_insert_with(BTreeSet::new).insert(peer);
                        b.insert(peer);
                    }
                    _ => {
                        m.blocked.get_or_insert_with(BTreeSet::new).remove(&peer);
                        b.remove(&peer);
                    }
                }
            }
            (55..=74, Some(conn)) => {
                let kind = match rng.gen_range(0..4) {
                    0 | 1 => CallKind::OFFER,
                    2 => CallKind::ANSWER,
                    _ => CallKind::HANGUP,
                };
                let mine: Vec<(usize, usize, u64)> = self
                    .offers
                    .iter()
                    .copied()
                    .filter(|&(a, b, _)| a == i || b == i)
                    .collect();
                let (call_id, peer) = if kind == CallKind::OFFER || mine.is_empty() {
                    self.next_call += 1;
                    self.offers.push((i, j, self.next_call));
                    (self.next_call, peer)
                } else {
                    let (a, b, id) = mine[rng.gen_range(0..mine.len())];
                    let other = if a == i { b } else { a };
                    (id, self.users[other])
                };
                let kind = if mine.is_empty() {
                    CallKind::OFFER
                } else {
                    kind
                };
                self.c.frame(
                    conn,
                    Frame::CallSignal(CallSignal {
                        call_id,
                        peer,
                        kind,
                        payload: Bytes::new(),
                    }),
                );
            }
            (75..=84, _) => {
                self.c.now += rng.gen_range(100..4_000);
                for s in 0..SHARDS {
                    self.c.tick(s);
                }
            }
            (85..=86, _) => {
                self.c.settle();
                let s = rng.gen_range(0..SHARDS);
                self.c.crash(s);
                self.crashes += 1;
                for (k, &u) in self.users.iter().enumerate() {
                    if home_shard(u, SHARDS) == s {
                        if let Some(conn) = self.conns[k].take() {
                            self.subs.remove(&conn);
                        }
                    }
                }
                let stats = self.c.shards[usize::from(s)].stats();
                assert_eq!(stats.calls_active, 0, "seed {seed}: calls after a crash");
                assert_eq!(stats.presence_subscriptions, 0, "seed {seed}");
            }
            _ => {}
        }
        self.c.settle();
        self.check_presence(seed);
    }

    /// Presence frames only to subscribers; never ONLINE to a blocked watcher.
    fn check_presence(&mut self, seed: u64) {
        for (k, conn) in self.conns.clone().into_iter().enumerate() {
            let Some(conn) = conn else { continue };
            let me = self.users[k];
            for f in self.c.frames(conn) {
                if let Frame::Presence(p) = f {
                    self.presence_frames += 1;
                    // The synchronous cluster delivers everything before the next step, so
                    // a change reaches only a live subscription (its expiry still ahead),
                    // and a first answer only a connection that subscribed.
                    let expires = self.subs.get(&conn).and_then(|s| s.get(&p.user));
                    let ok = match expires {
                        Some(&e) => p.request_id != 0 || e > self.c.now,
                        None => false,
                    };
                    assert!(
                        ok,
                        "seed {seed}: presence {p:?} to {conn}: not a live subscriber ({expires:?}, now {})",
                        self.c.now
                    );
                    let blocked = self.blocked.get(&p.user).is_some_and(|b| b.contains(&me));
                    assert!(
                        !(blocked && p.state == PresenceState::ONLINE),
                        "seed {seed}: ONLINE of {} to blocked {me}",
                        p.user
                    );
                }
            }
        }
    }

    /// The durable privacy of every user, as recovery would rebuild it, is the model's.
    fn check_log(&self, seed: u64) {
        let mut got: BTreeMap<UserId, Priv> = BTreeMap::new();
        for s in 0..SHARDS {
            let (_, records) = self.c.journals[usize::from(s)].durable_view();
            for (_, r) in records {
                match r {
                    Record::PrivacySettings {
                        user,
                        last_seen,
                        online,
                        ..
                    } => got.entry(user).or_default().settings = Some((last_seen, online)),
                    Record::Contacts { user, users } => {
                        got.entry(user).or_default().contacts = Some(users.into_iter().collect())
                    }
                    Record::Blocked { user, users } => {
                        got.entry(user).or_default().blocked = Some(users.into_iter().collect())
                    }
                    _ => {}
                }
            }
        }
        // An edit that changed nothing still writes the list: compare contents only.
        let norm = |m: &BTreeMap<UserId, Priv>| -> BTreeMap<UserId, Priv> {
            m.iter()
                .map(|(&u, p)| {
                    let p = Priv {
                        settings: p.settings,
                        contacts: p.contacts.clone().filter(|c| !c.is_empty()),
                        blocked: p.blocked.clone().filter(|b| !b.is_empty()),
                    };
                    (u, p)
                })
                .filter(|(_, p)| *p != Priv::default())
                .collect()
        };
        assert_eq!(
            norm(&got),
            norm(&self.model),
            "seed {seed}: durable privacy"
        );
    }

    /// Everybody hangs up and leaves; after a ring timeout no call is left anywhere.
    fn finish(&mut self, seed: u64) {
        for k in 0..USERS {
            if let Some(conn) = self.conns[k].take() {
                self.c.close_conn(conn);
            }
        }
        self.c.settle();
        self.c.now += 61_000;
        for s in 0..SHARDS {
            self.c.tick(s);
        }
        self.c.settle();
        for s in 0..SHARDS {
            let st = self.c.shards[usize::from(s)].stats();
            assert_eq!(st.calls_active, 0, "seed {seed}: a stuck call on shard {s}");
        }
    }
}

fn seeds() -> std::ops::Range<u64> {
    std::env::var("SIM_CALLS_SEEDS")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(0..24)
}

#[test]
fn simulation_of_presence_privacy_and_calls() {
    let (mut frames, mut crashes, mut offers, mut answered, mut compacted) = (0, 0, 0, 0, 0);
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w = World::new();
        for _ in 0..STEPS {
            w.step(&mut rng, seed);
        }
        w.c.settle();
        w.check_log(seed);
        for sh in &w.c.shards {
            let st = sh.stats();
            offers += st.call_offers;
            answered += st.calls_answered;
            compacted += st.segments_compacted + st.segments_deleted;
        }
        frames += w.presence_frames;
        crashes += w.crashes;
        w.finish(seed);
    }
    println!(
        "sim_calls: {frames} presence frames, {offers} offers, {answered} answered, \
         {compacted} segments compacted or deleted, {crashes} crashes"
    );
    assert!(frames > 0 && offers > 0 && answered > 0 && crashes > 0 && compacted > 0);
}
