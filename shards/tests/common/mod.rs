//! Test support shared by the rule tests and the simulator: the simulated journal with the
//! shard's schema on top, and a small synchronous cluster harness.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

use protocol::{capability, frame, DeviceAddr, Frame, UserId};
use storage::{
    CrashMode, Encode, Journal, Lsn, RawRecord, ReadError, SegmentId, SimConfig, SimJournal,
};
use switchboard_shards::record::Record;
use switchboard_shards::{
    decode_log, home_shard, Action, Config, ConnId, Event, MeshMsg, RecordRef, Shard, ShardId,
};

/// One buffered or durable append.
#[derive(Clone, Debug)]
pub struct Appended {
    pub segment: SegmentId,
    pub record: Record,
    pub durable: bool,
}

/// The simulated journal (`storage::sim`: real segment bytes, crashes that tear or flip what
/// was not synced, the real recovery scan) with the shard's schema on top: appends rotate after
/// `segment_records` records, `commit` makes everything durable, the crashes go through
/// `recover_bytes` and `decode_recovered`. Deletions are checked twice: by the sim journal
/// (never the active segment, always the oldest) and here against [`LogModel`].
#[derive(Debug)]
pub struct TestJournal {
    pub sim: SimJournal,
    pub segment_records: usize,
    /// Segments deleted, in order.
    pub deleted: Vec<SegmentId>,
    /// Check every deletion against [`LogModel`]: removing the segment must not change what
    /// recovery would rebuild from the whole log. (Off where TTL expiry is in play: an expired
    /// entry dies without a record, which the model does not know.)
    pub check_deletes: bool,
}

/// What a crash left, decoded for `Shard::recover`, and what it did.
#[derive(Debug)]
pub struct Crashed {
    pub segments: Vec<SegmentId>,
    pub records: Vec<(RecordRef, Record)>,
    pub mode: CrashMode,
    /// The cut fell inside a record.
    pub torn: bool,
    /// A bit was flipped in the unsynced bytes.
    pub flipped: bool,
    /// Recovery reported damage (truncation, resync, skipped record or segment).
    pub damage_found: bool,
    /// Soundly framed records whose body did not decode.
    pub undecodable: usize,
}

fn decode(raw: Vec<RawRecord>) -> Vec<(RecordRef, Record)> {
    let d = decode_log(raw);
    assert!(d.undecodable.is_empty(), "{:?}", d.undecodable);
    d.records
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
    /// Linked companions: (user, device) -> static key (last `Device` record wins, minus
    /// later removals).
    pub companions: BTreeMap<(u64, u16), [u8; 32]>,
    /// Per group homed in the log: its current version, its done mark, and every pending
    /// fan-out (gseq past the done mark) with whether the state record of its version is there.
    pub groups: BTreeMap<u64, GroupModel>,
    /// (user, group) memberships counted on the user's home (last record wins).
    pub memberships: BTreeSet<(u64, u64)>,
}

/// One group in [`LogModel`]: current version, done mark, pending `(gseq, state record there)`.
pub type GroupModel = (u32, u64, BTreeSet<(u64, bool)>);

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
            companions: BTreeMap::new(),
            groups: BTreeMap::new(),
            memberships: BTreeSet::new(),
        };
        let mut dead = BTreeSet::new();
        let mut states: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        let mut messages: BTreeMap<(u64, u64), u32> = BTreeMap::new();
        let mut done: BTreeMap<u64, u64> = BTreeMap::new();
        // Recipient of every live seq, for removals.
        let mut to_of: BTreeMap<u64, (u64, u16)> = BTreeMap::new();
        for r in records {
            match r {
                Record::Message { seq, to, .. }
                | Record::MessageCopy { seq, to, .. }
                | Record::Receipt { seq, to, .. } => {
                    m.live.insert(*seq);
                    to_of.insert(*seq, (to.user, to.device));
                }
                Record::Device {
                    user,
                    device,
                    static_key,
                    ..
                } => {
                    m.companions.insert((*user, *device), *static_key);
                }
                Record::DeviceRemoved { user, device, .. } => {
                    let addr = (*user, *device);
                    m.companions.remove(&addr);
                    m.prekeys.remove(&addr);
                    m.live.retain(|s| to_of.get(s) != Some(&addr));
                }
                Record::Tombstone { seq } => {
                    dead.insert(*seq);
                }
                // Privacy records: modelled by `sim_calls.rs`.
                Record::PrivacySettings { .. }
                | Record::Contacts { .. }
                | Record::Blocked { .. }
                | Record::LastSeen { .. } => {}
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
                // The dedup window's content is checked end to end by the simulator (retries
                // of acknowledged messages across restarts), not modelled here.
                Record::Dedup { .. } => {}
                // Status posts (tests/media.rs checks them through the shard).
                Record::StatusPost { .. } | Record::StatusGone { .. } => {}
                Record::GroupCopy { entries, .. } => {
                    for (to, seq) in entries {
                        m.live.insert(*seq);
                        to_of.insert(*seq, (to.user, to.device));
                    }
                }
                Record::GroupState {
                    group,
                    version,
                    gseq,
                    ..
                } => {
                    states.insert((*group, *version), *gseq);
                }
                Record::GroupMessage {
                    group,
                    gseq,
                    version,
                    ..
                } => {
                    messages.insert((*group, *gseq), *version);
                }
                Record::GroupMembership {
                    user,
                    group,
                    joined,
                } => {
                    if *joined == 1 {
                        m.memberships.insert((*user, *group));
                    } else {
                        m.memberships.remove(&(*user, *group));
                    }
                }
                Record::GroupFanoutDone { group, gseq } => {
                    let d = done.entry(*group).or_insert(0);
                    *d = (*d).max(*gseq);
                }
            }
        }
        for (&(group, version), &gseq) in &states {
            let hw = done.get(&group).copied().unwrap_or(0);
            let g = m.groups.entry(group).or_insert((0, hw, BTreeSet::new()));
            g.0 = g.0.max(version);
            if gseq > hw {
                g.2.insert((gseq, true));
            }
        }
        for (&(group, gseq), &version) in &messages {
            let hw = done.get(&group).copied().unwrap_or(0);
            if gseq > hw {
                let present = states.contains_key(&(group, version));
                if let Some(g) = m.groups.get_mut(&group) {
                    g.2.insert((gseq, present));
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
        Self::from_sim(SimJournal::new(config(segment_records)), segment_records)
    }

    /// A journal holding `records` as durable, in the given segments, with a fresh active
    /// segment after them.
    pub fn with_durable(segment_records: usize, records: Vec<(SegmentId, Record)>) -> Self {
        Self::from_sim(
            SimJournal::with_durable(config(segment_records), records),
            segment_records,
        )
    }

    fn from_sim(sim: SimJournal, segment_records: usize) -> Self {
        Self {
            sim,
            segment_records,
            deleted: Vec::new(),
            check_deletes: true,
        }
    }

    /// Marks every append durable; returns the highest append id if anything was pending.
    pub fn commit(&mut self) -> Option<u64> {
        self.sim.commit()
    }

    pub fn pending(&self) -> usize {
        self.sim.pending_records()
    }

    /// Appends not yet durable, newest last.
    pub fn pending_records(&self) -> Vec<Record> {
        decode(self.sim.unsynced())
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// Every record in the log (durable or not), in log order.
    pub fn entries(&self) -> Vec<Appended> {
        let unsynced: BTreeSet<(SegmentId, u64)> = self
            .sim
            .unsynced()
            .iter()
            .map(|r| (r.segment, r.offset))
            .collect();
        let raw = self.sim.appended();
        let keys: Vec<(SegmentId, u64)> = raw.iter().map(|r| (r.segment, r.offset)).collect();
        decode(raw)
            .into_iter()
            .zip(keys)
            .map(|((at, record), key)| Appended {
                segment: at.segment,
                record,
                durable: !unsynced.contains(&key),
            })
            .collect()
    }

    /// What recovery would read now (durable records in log order) and the segments present.
    pub fn durable_view(&self) -> (Vec<SegmentId>, Vec<(RecordRef, Record)>) {
        let rec = self
            .sim
            .durable_view()
            .expect("recovery of the durable bytes");
        (rec.segments, decode(rec.records))
    }

    /// Process crash losing every unsynced append; append ids restart, a new segment opens.
    pub fn crash(&mut self) -> (Vec<SegmentId>, Vec<(RecordRef, Record)>) {
        let c = self.crash_with(CrashMode::LoseUnsynced, 0);
        (c.segments, c.records)
    }

    /// A crash whose mode (lose, tear, flip a bit) and damage `rng_value` picks.
    pub fn crash_random(&mut self, rng_value: u64) -> Crashed {
        let c = self.sim.crash(rng_value).expect("recovery after a crash");
        self.crashed(c)
    }

    pub fn crash_with(&mut self, mode: CrashMode, rng_value: u64) -> Crashed {
        let c = self
            .sim
            .crash_with(mode, rng_value)
            .expect("recovery after a crash");
        self.crashed(c)
    }

    fn crashed(&mut self, c: storage::sim::Crash) -> Crashed {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "crash {:?} unsynced={} kept={} flipped={:?} report={:?} segments={:?}",
                c.mode,
                c.unsynced_bytes,
                c.kept_bytes,
                c.flipped,
                c.recovery.report,
                c.recovery.segments
            );
        }
        let d = decode_log(c.recovery.records);
        Crashed {
            segments: c.recovery.segments,
            records: d.records,
            mode: c.mode,
            torn: c.torn_mid_record,
            flipped: c.flipped.is_some(),
            damage_found: !c.recovery.report.is_clean(),
            undecodable: d.undecodable.len(),
        }
    }
}

fn config(segment_records: usize) -> SimConfig {
    SimConfig::records_per_segment(segment_records.max(1))
}

impl Journal for TestJournal {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        self.sim.append(rec)
    }

    fn delete_segment(&mut self, segment: SegmentId) {
        if self.check_deletes {
            let entries = self.entries();
            let before = LogModel::of(entries.iter().map(|e| &e.record));
            let after = LogModel::of(
                entries
                    .iter()
                    .filter(|e| e.segment != segment)
                    .map(|e| &e.record),
            );
            assert_eq!(
                before, after,
                "deleting segment {segment} loses live records"
            );
        }
        self.sim.delete_segment(segment);
        self.deleted.push(segment);
    }

    fn active_segment(&self) -> SegmentId {
        self.sim.active_segment()
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
    /// `ReadRecords` not answered yet, in order (answered by `run` unless `hold_reads`).
    pub reads: VecDeque<(ShardId, u64, Vec<RecordRef>)>,
    /// Leave reads unanswered (a test answers them with `answer_reads`).
    pub hold_reads: bool,
    /// The next this many record reads fail with an IO error.
    pub fail_reads: usize,
    /// `ReadRecords` batches seen.
    pub read_batches: usize,
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
            reads: VecDeque::new(),
            hold_reads: false,
            fail_reads: 0,
            read_batches: 0,
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
                Action::ReadRecords { token, reads } => {
                    self.read_batches += 1;
                    self.reads.push_back((shard, token, reads));
                }
                other => self.out.push((shard, other)),
            }
        }
        // Reads are answered at once (a fast disk) unless a test holds them.
        if !self.hold_reads {
            self.answer_reads();
        }
    }

    /// Delivers mesh messages (and answers record reads unless `hold_reads`) until none are
    /// left.
    pub fn run(&mut self) {
        loop {
            while let Some((from, to, msg)) = self.mesh.pop_front() {
                self.event(to, Event::Mesh { from, msg });
            }
            if self.hold_reads || self.reads.is_empty() {
                break;
            }
            self.answer_reads();
        }
    }

    /// Answers every outstanding `ReadRecords` from the journals (`fail_reads` of them fail).
    pub fn answer_reads(&mut self) {
        while let Some((s, token, refs)) = self.reads.pop_front() {
            let results = refs
                .iter()
                .map(|r| {
                    if self.fail_reads > 0 {
                        self.fail_reads -= 1;
                        return Err(ReadError::Io {
                            segment: r.segment,
                            offset: r.offset,
                            kind: std::io::ErrorKind::Other,
                            message: "injected".to_owned(),
                        });
                    }
                    let sim = &self.journals[usize::from(s)].sim;
                    sim.read_record(r.segment, r.offset)
                        .map(|raw| (raw.tag, raw.body))
                })
                .collect();
            self.event(s, Event::RecordsRead { token, results });
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
        self.reads.retain(|(sh, _, _)| *sh != s);
    }
}
