//! Test support shared by the rule tests and the simulator: an in-memory journal with explicit
//! durability and crash, and a small synchronous cluster harness.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use protocol::{capability, frame, DeviceAddr, Frame, UserId};
use sha2::{Digest, Sha256};
use storage::{Encode, Journal, Lsn, SegmentId};
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, Action, Config, ConnId, Event, MeshMsg, Shard, ShardId};

/// One buffered or durable append.
#[derive(Clone, Debug)]
pub struct Appended {
    pub append_id: u64,
    pub segment: SegmentId,
    pub record: Record,
    pub durable: bool,
}

/// An in-memory journal: appends buffer into the active segment (rotating after
/// `segment_records` records), `commit` makes everything durable, `crash` drops what is not.
/// It checks the shard's deletion discipline: never the active segment, always the oldest.
#[derive(Debug)]
pub struct TestJournal {
    pub entries: Vec<Appended>,
    next_id: u64,
    active: SegmentId,
    in_active: usize,
    pub segment_records: usize,
    /// Segments created and not deleted.
    pub present: BTreeSet<SegmentId>,
    pub deleted: Vec<SegmentId>,
    /// Check every deletion against [`LogModel`]: removing the segment must not change what
    /// recovery would rebuild from the whole log. (Off where TTL expiry is in play: an expired
    /// entry dies without a record, which the model does not know.)
    pub check_deletes: bool,
    /// Every append (its on-disk encoding) and every deletion, in order: the refactor safety
    /// net compares it across builds (see `sim.rs`, `trace_hashes`).
    pub trace: Sha256,
}

/// What recovery rebuilds from a log, computed independently of the shard: current account
/// keys (last record wins), key bindings, the live mailbox seqs (minus tombstones), and the
/// prekey directory (per device: the last identity record, and the one-time keys of its
/// generation that were not consumed).
#[derive(Debug, PartialEq, Eq)]
pub struct LogModel {
    pub accounts: BTreeMap<(u64, u16), [u8; 32]>,
    pub bindings: BTreeMap<[u8; 32], (u64, u16)>,
    pub live: BTreeSet<u64>,
    pub prekeys: BTreeMap<(u64, u16), ModelPrekeys>,
}

/// `(generation, identity_dh, identity_sign, signed_prekey_id, max_one_time_id)` of an
/// identity record.
pub type ModelIdentity = (u32, [u8; 32], [u8; 32], u32, u32);

/// A device's prekeys as recovery would rebuild them.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct ModelPrekeys {
    /// The last identity record.
    pub identity: Option<ModelIdentity>,
    /// id -> (generation, key).
    pub one_time: BTreeMap<u32, (u32, [u8; 32])>,
}

impl LogModel {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut m = LogModel {
            accounts: BTreeMap::new(),
            bindings: BTreeMap::new(),
            live: BTreeSet::new(),
            prekeys: BTreeMap::new(),
        };
        let mut dead = BTreeSet::new();
        for r in records {
            match r {
                Record::Message { seq, .. } | Record::Receipt { seq, .. } => {
                    m.live.insert(*seq);
                }
                Record::Tombstone { seq } => {
                    dead.insert(*seq);
                }
                Record::Account {
                    user,
                    device,
                    static_key,
                    ..
                } => {
                    m.accounts.insert((*user, *device), *static_key);
                }
                Record::KeyBinding {
                    static_key,
                    user,
                    device,
                    ..
                } => {
                    m.bindings.insert(*static_key, (*user, *device));
                }
                Record::PrekeyIdentity {
                    user,
                    device,
                    generation,
                    identity_dh,
                    identity_sign,
                    signed_prekey_id,
                    max_one_time_id,
                    ..
                } => {
                    let d = m.prekeys.entry((*user, *device)).or_default();
                    if d.identity.is_some_and(|i| i.0 > *generation) {
                        continue;
                    }
                    let max = match d.identity {
                        Some(i) if i.0 == *generation => i.4.max(*max_one_time_id),
                        _ => *max_one_time_id,
                    };
                    d.identity = Some((
                        *generation,
                        *identity_dh,
                        *identity_sign,
                        *signed_prekey_id,
                        max,
                    ));
                    d.one_time.retain(|_, (g, _)| *g >= *generation);
                }
                Record::PrekeyBatch {
                    user,
                    device,
                    generation,
                    keys,
                } => {
                    let d = m.prekeys.entry((*user, *device)).or_default();
                    if d.identity.is_some_and(|i| i.0 > *generation) {
                        continue;
                    }
                    for (id, key) in keys {
                        d.one_time.insert(*id, (*generation, *key));
                    }
                }
                Record::PrekeyConsumed { user, device, id } => {
                    if let Some(d) = m.prekeys.get_mut(&(*user, *device)) {
                        d.one_time.remove(id);
                    }
                }
            }
        }
        m.live.retain(|s| !dead.contains(s));
        m.prekeys.retain(|_, d| match d.identity {
            Some((g, ..)) => {
                d.one_time.retain(|_, (kg, _)| *kg == g);
                true
            }
            None => false,
        });
        // The watermark as recovery computes it: at least the highest key id left.
        for d in m.prekeys.values_mut() {
            if let (Some(i), Some((&top, _))) = (d.identity.as_mut(), d.one_time.last_key_value()) {
                i.4 = i.4.max(top);
            }
        }
        m
    }
}

impl TestJournal {
    pub fn new(segment_records: usize) -> Self {
        Self {
            entries: Vec::new(),
            next_id: 0,
            active: 1,
            in_active: 0,
            segment_records: segment_records.max(1),
            present: BTreeSet::from([1]),
            deleted: Vec::new(),
            check_deletes: true,
            trace: Sha256::new(),
        }
    }

    /// A journal holding `records` as durable, in the given segments, with a fresh active
    /// segment after them.
    pub fn with_durable(segment_records: usize, records: Vec<(SegmentId, Record)>) -> Self {
        let mut j = Self::new(segment_records);
        j.present.clear();
        let mut max = 0;
        for (segment, record) in records {
            j.present.insert(segment);
            max = max.max(segment);
            j.entries.push(Appended {
                append_id: 0,
                segment,
                record,
                durable: true,
            });
        }
        j.active = max + 1;
        j.present.insert(j.active);
        j
    }

    /// Marks every append durable; returns the highest append id if anything was pending.
    pub fn commit(&mut self) -> Option<u64> {
        let mut up_to = None;
        for e in self.entries.iter_mut().filter(|e| !e.durable) {
            e.durable = true;
            up_to = Some(e.append_id);
        }
        up_to
    }

    pub fn pending(&self) -> usize {
        self.entries.iter().filter(|e| !e.durable).count()
    }

    /// Appends not yet durable, newest last.
    pub fn pending_records(&self) -> Vec<Record> {
        self.entries
            .iter()
            .filter(|e| !e.durable)
            .map(|e| e.record.clone())
            .collect()
    }

    /// What recovery would read now (durable records in log order) and the segments present.
    pub fn durable_view(&self) -> (Vec<SegmentId>, Vec<(SegmentId, Record)>) {
        let mut recs: Vec<(SegmentId, u64, usize, Record)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.durable)
            .map(|(i, e)| (e.segment, e.append_id, i, e.record.clone()))
            .collect();
        // Log order: segment ascending, then position in it (entries are in append order).
        recs.sort_by_key(|(s, _, i, _)| (*s, *i));
        (
            self.present.iter().copied().collect(),
            recs.into_iter().map(|(s, _, _, r)| (s, r)).collect(),
        )
    }

    /// Process crash: non-durable appends vanish, append ids restart, a new segment opens.
    pub fn crash(&mut self) -> (Vec<SegmentId>, Vec<(SegmentId, Record)>) {
        self.entries.retain(|e| e.durable);
        self.next_id = 0;
        let max = self
            .present
            .iter()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.active);
        self.active = max + 1;
        self.in_active = 0;
        self.present.insert(self.active);
        self.durable_view()
    }
}

impl Journal for TestJournal {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        let mut bytes = Vec::new();
        storage::frame::encode(rec, &mut bytes);
        let frame = storage::frame::decode_frame(&bytes).expect("a frame just encoded");
        let record = Record::decode(frame.tag, &Bytes::copy_from_slice(frame.body))
            .expect("the shard appends only records it can decode");
        self.next_id += 1;
        let lsn = Lsn {
            append_id: self.next_id,
            segment: self.active,
        };
        self.entries.push(Appended {
            append_id: lsn.append_id,
            segment: lsn.segment,
            record,
            durable: false,
        });
        self.trace.update(b"A");
        self.trace.update(lsn.append_id.to_le_bytes());
        self.trace.update(lsn.segment.to_le_bytes());
        self.trace.update(&bytes);
        self.in_active += 1;
        if self.in_active >= self.segment_records {
            self.active += 1;
            self.in_active = 0;
            self.present.insert(self.active);
        }
        lsn
    }

    fn delete_segment(&mut self, segment: SegmentId) {
        assert_ne!(segment, self.active, "deleted the active segment");
        assert_eq!(
            self.present.first().copied(),
            Some(segment),
            "segment {segment} deleted before an older one: {:?}",
            self.present
        );
        if self.check_deletes {
            let before = LogModel::of(self.entries.iter().map(|e| &e.record));
            let after = LogModel::of(
                self.entries
                    .iter()
                    .filter(|e| e.segment != segment)
                    .map(|e| &e.record),
            );
            assert_eq!(
                before, after,
                "deleting segment {segment} loses live records"
            );
        }
        self.trace.update(b"D");
        self.trace.update(segment.to_le_bytes());
        self.present.remove(&segment);
        self.entries.retain(|e| e.segment != segment);
        self.deleted.push(segment);
    }

    fn active_segment(&self) -> SegmentId {
        self.active
    }
}

/// A static key whose first bytes (and so its key shard) depend on `n`.
pub fn key(n: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    k[8..16].copy_from_slice(&n.to_le_bytes());
    k
}

/// The `skip`-th valid phone number homed on `shard`.
pub fn user_on(shard: ShardId, shards: u16, skip: usize) -> UserId {
    (14_155_550_000u64..)
        .filter(|&u| home_shard(u, shards) == shard)
        .nth(skip)
        .expect("a user")
}

pub fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// Synchronous cluster: mesh messages go on one FIFO queue, delivered by `run`.
pub struct Cluster {
    pub shards: Vec<Shard>,
    pub journals: Vec<TestJournal>,
    pub configs: Vec<Config>,
    pub now: u64,
    pub mesh: VecDeque<(ShardId, ShardId, MeshMsg)>,
    /// Every non-mesh action, with the shard that emitted it.
    pub out: Vec<(ShardId, Action)>,
    /// Mesh messages a shard addressed to itself through the driver (should stay 0).
    pub self_mesh: usize,
    /// Which shard holds each connection.
    pub conn_shard: HashMap<ConnId, ShardId>,
    pub next_conn: ConnId,
    pub segment_records: usize,
}

impl Cluster {
    pub fn new(n: u16, tweak: impl Fn(&mut Config)) -> Self {
        Self::with_segments(n, 1_000_000, tweak)
    }

    pub fn with_segments(n: u16, segment_records: usize, tweak: impl Fn(&mut Config)) -> Self {
        let configs: Vec<Config> = (0..n)
            .map(|i| {
                let mut c = Config::new(i, n);
                tweak(&mut c);
                c
            })
            .collect();
        Self {
            shards: configs
                .iter()
                .map(|c| Shard::new(c.clone(), 1000 + u64::from(c.shard)))
                .collect(),
            journals: (0..n).map(|_| TestJournal::new(segment_records)).collect(),
            configs,
            now: 1_000_000,
            mesh: VecDeque::new(),
            out: Vec::new(),
            self_mesh: 0,
            conn_shard: HashMap::new(),
            next_conn: 1,
            segment_records,
        }
    }

    pub fn n(&self) -> u16 {
        self.shards.len() as u16
    }

    pub fn event(&mut self, shard: ShardId, ev: Event) {
        let s = usize::from(shard);
        self.shards[s].handle(self.now, ev, &mut self.journals[s]);
        let actions: Vec<Action> = self.shards[s].drain_actions().collect();
        for a in actions {
            match a {
                Action::ToShard { shard: to, msg } => {
                    if to == shard {
                        self.self_mesh += 1;
                    }
                    self.mesh.push_back((shard, to, msg))
                }
                Action::Handoff { conn, to, ref info } => {
                    let info = info.clone();
                    self.out.push((shard, a));
                    self.conn_shard.insert(conn, to);
                    self.event(to, Event::Login { conn, info });
                }
                Action::Close { conn, .. } => {
                    self.conn_shard.remove(&conn);
                    self.out.push((shard, a));
                }
                other => self.out.push((shard, other)),
            }
        }
    }

    /// Delivers mesh messages until none are left.
    pub fn run(&mut self) {
        while let Some((from, to, msg)) = self.mesh.pop_front() {
            self.event(to, Event::Mesh { from, msg });
        }
    }

    /// Makes shard `s`'s appends durable and tells it.
    pub fn commit(&mut self, s: ShardId) {
        if let Some(up_to) = self.journals[usize::from(s)].commit() {
            self.event(s, Event::Durable { up_to });
        }
    }

    /// Runs the mesh and commits every journal until nothing moves.
    pub fn settle(&mut self) {
        loop {
            self.run();
            let pending: Vec<ShardId> = (0..self.n())
                .filter(|&s| self.journals[usize::from(s)].pending() > 0)
                .collect();
            if pending.is_empty() && self.mesh.is_empty() {
                break;
            }
            for s in pending {
                self.commit(s);
            }
        }
    }

    pub fn tick(&mut self, s: ShardId) {
        self.event(s, Event::Tick);
    }

    pub fn connect(&mut self, shard: ShardId, static_key: [u8; 32], peer_ip: IpAddr) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conn_shard.insert(conn, shard);
        self.event(
            shard,
            Event::Connected {
                conn,
                peer_ip,
                static_key,
            },
        );
        conn
    }

    pub fn frame(&mut self, conn: ConnId, frame: Frame) {
        let shard = *self.conn_shard.get(&conn).expect("connection is open");
        self.event(shard, Event::Frame { conn, frame });
    }

    pub fn close_conn(&mut self, conn: ConnId) {
        if let Some(shard) = self.conn_shard.remove(&conn) {
            self.event(shard, Event::Closed { conn });
        }
    }

    /// Takes the frames sent to `conn` so far, in order.
    pub fn frames(&mut self, conn: ConnId) -> Vec<Frame> {
        let mut got = Vec::new();
        self.out.retain(|(_, a)| match a {
            Action::Send { conn: c, frame } if *c == conn => {
                got.push(frame.clone());
                false
            }
            _ => true,
        });
        got
    }

    /// Takes the `Close` of `conn`, if any.
    pub fn closed(&mut self, conn: ConnId) -> Option<protocol::ErrorCode> {
        let mut code = None;
        self.out.retain(|(_, a)| match a {
            Action::Close {
                conn: c, code: k, ..
            } if *c == conn => {
                code = Some(*k);
                false
            }
            _ => true,
        });
        code
    }

    /// Takes the last SMS code sent to `phone`.
    pub fn sms(&mut self, phone: UserId) -> Option<u32> {
        let mut code = None;
        self.out.retain(|(_, a)| match a {
            Action::SendSms { phone: p, code: c } if *p == phone => {
                code = Some(*c);
                false
            }
            _ => true,
        });
        code
    }

    /// Takes every `Push`.
    pub fn pushes(&mut self) -> Vec<Action> {
        let mut got = Vec::new();
        self.out.retain(|(_, a)| {
            if matches!(a, Action::Push { .. }) {
                got.push(a.clone());
                false
            } else {
                true
            }
        });
        got
    }

    /// Full registration of `user` with `static_key` through shard `via`; returns the frames the
    /// registering connection got (the last should be `Registered`).
    pub fn register_via(&mut self, via: ShardId, user: UserId, static_key: [u8; 32]) -> Vec<Frame> {
        let conn = self.connect(via, static_key, ip(1));
        self.frame(
            conn,
            Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
        );
        self.settle();
        let mut frames = self.frames(conn);
        let Some(code) = self.sms(user) else {
            return frames;
        };
        self.frame(
            conn,
            Frame::RegisterVerify(frame::RegisterVerify { phone: user, code }),
        );
        self.settle();
        frames.extend(self.frames(conn));
        self.close_conn(conn);
        frames
    }

    pub fn register(&mut self, user: UserId, static_key: [u8; 32]) {
        let frames = self.register_via(0, user, static_key);
        assert_eq!(
            frames.last(),
            Some(&Frame::Registered(frame::Registered {
                addr: DeviceAddr { user, device: 0 }
            })),
            "registration of {user}: {frames:?}"
        );
    }

    /// Logs `user` in (connecting to its home shard) and returns the connection after Welcome.
    pub fn login(&mut self, user: UserId, static_key: [u8; 32]) -> ConnId {
        let home = home_shard(user, self.n());
        let conn = self.connect(home, static_key, ip(2));
        self.frame(
            conn,
            Frame::Login(frame::Login {
                addr: DeviceAddr { user, device: 0 },
                revision: 1,
                capabilities: capability::MESSAGING,
            }),
        );
        let frames = self.frames(conn);
        assert!(
            matches!(frames.first(), Some(Frame::Welcome { .. })),
            "login of {user}: {frames:?}"
        );
        // Keep anything delivered right after Welcome for the caller.
        for f in frames.into_iter().skip(1) {
            self.out.push((home, Action::Send { conn, frame: f }));
        }
        conn
    }

    /// Logs `user` in on its home shard announcing `capabilities`; returns the connection and
    /// every frame it got (Welcome first).
    pub fn login_caps(
        &mut self,
        user: UserId,
        static_key: [u8; 32],
        capabilities: u64,
    ) -> (ConnId, Vec<Frame>) {
        let home = home_shard(user, self.n());
        let conn = self.connect(home, static_key, ip(2));
        self.frame(
            conn,
            Frame::Login(frame::Login {
                addr: DeviceAddr { user, device: 0 },
                revision: 1,
                capabilities,
            }),
        );
        let frames = self.frames(conn);
        assert!(
            matches!(frames.first(), Some(Frame::Welcome { .. })),
            "login of {user}: {frames:?}"
        );
        (conn, frames)
    }

    /// A fresh shard recovered from `s`'s durable records as they are now (no crash).
    pub fn recovered(&self, s: ShardId) -> Shard {
        let (segments, records) = self.journals[usize::from(s)].durable_view();
        let mut shard = Shard::new(self.configs[usize::from(s)].clone(), 7);
        shard.recover(self.now, &segments, records);
        shard
    }

    /// Crashes shard `s`: non-durable appends, connections and mesh traffic to/from it are lost.
    pub fn crash(&mut self, s: ShardId) {
        let (segments, records) = self.journals[usize::from(s)].crash();
        let mut shard = Shard::new(self.configs[usize::from(s)].clone(), 99);
        shard.recover(self.now, &segments, records);
        self.shards[usize::from(s)] = shard;
        self.conn_shard.retain(|_, sh| *sh != s);
        self.mesh.retain(|(from, to, _)| *from != s && *to != s);
    }
}
