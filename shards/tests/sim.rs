//! Deterministic simulation of a whole Switchboard process: N shards, a mesh of per-link FIFO
//! queues, a simulated journal per shard (`storage::sim`: real segment bytes), and simulated
//! clients that register, log in, send, retry, ack, read, disconnect and abandon connections,
//! while a seeded scheduler interleaves mesh deliveries, group commits, timer ticks and shard
//! crashes. A crash loses, tears (mid-record) or bit-flips the shard's unsynced log bytes, and
//! the shard restarts from what the real recovery scan and record decoder make of them.
//!
//! After the chaos phase the system heals (no more faults; every client reconnects and drains)
//! and the end-to-end guarantees are checked:
//!
//! * every message that got a ✓ (ServerAck) reached its recipient; after client dedup by
//!   `(sender, client_msg_id)` exactly once; every message sent was eventually acknowledged;
//! * per (sender, recipient) the delivery order is the send order;
//! * no `Deliver` ever carried a message that was not durable (checked when it is emitted);
//! * no seq was reused for different durable content across restarts;
//! * dedup holds across restarts: clients now and then send an acknowledged message again, and
//!   while fewer than `dedup_window_entries` messages were stored after it on its shard, the ✓
//!   carries the original time (it was not stored again);
//! * after a final restart of every shard nothing acknowledged comes back and every account
//!   still logs in;
//! * prekeys: clients upload one-time prekeys (topping up when told they run low, sometimes
//!   with a new identity) and fetch each other's bundles; no one-time prekey is ever handed out
//!   twice (crashes included), every one handed out was uploaded by its owner under the identity
//!   the bundle names, and after the final restart none that was handed out is still stored.
//!
//! `SIM_SEED=<n>` runs one seed (add `SIM_TRACE=1` for a step log); `SIM_SEEDS=<n>` sets how
//! many seeds the default run covers (300) and `SIM_STEPS=<n>` the length of the chaos phase
//! (2000). A failing seed prints the command that reproduces it.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use bytes::Bytes;
use common::TestJournal;
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason, ACK_SEQS_MAX};
use protocol::{
    capability, frame, Address, DeviceAddr, ErrorCode, Frame, Message, MsgType, ReceiptInfo, UserId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use switchboard_e2ee::keys::encode_public;
use switchboard_e2ee::IdentityKeyPair;
use switchboard_shards::record::Record;
use switchboard_shards::{Action, Config, ConnId, Event, MeshMsg, RecordRef, Shard, ShardId};

/// Prekey fetch request ids start here, far from client_msg_ids, so errors tell them apart.
const FIRST_REQUEST_ID: u64 = 1 << 40;

/// How long a client waits for a registration or login answer before starting over.
const CLIENT_TIMEOUT_MS: u64 = 3_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Connected, nothing asked (or not connected).
    Idle,
    AwaitCode {
        since: u64,
    },
    AwaitRegistered {
        since: u64,
    },
    LoggingIn {
        since: u64,
    },
    LoggedIn,
}

#[derive(Debug)]
struct Client {
    user: UserId,
    key: [u8; 32],
    ip: IpAddr,
    registered: bool,
    conn: Option<ConnId>,
    stage: Stage,
    /// Frames from the server, tagged with the connection they came on.
    inbox: VecDeque<(ConnId, Frame)>,
    next_cmid: u64,
    /// Every message sent: client_msg_id -> recipient (ids increase in send order).
    sent: BTreeMap<u64, UserId>,
    unacked: BTreeMap<u64, UserId>,
    acked: BTreeMap<u64, UserId>,
    /// The ✓ time of every acknowledged message (the latest, if it was stored twice).
    ack_ts: BTreeMap<u64, u64>,
    /// Retries whose ✓ must carry this time (they were in the dedup window when sent).
    expect_ts: BTreeMap<u64, u64>,
    /// Per sender, client_msg_ids in first-arrival order (after dedup).
    received: BTreeMap<UserId, Vec<u64>>,
    seen: HashSet<(UserId, u64)>,
    pending_acks: Vec<u64>,
    readable: Vec<(UserId, u64)>,
    /// E2EE identity, made at the first upload (replaced now and then: a reinstalled app).
    identity: Option<IdentityKeyPair>,
    /// Next one-time prekey id of the current identity.
    next_otk: u32,
    /// Every one-time prekey ever uploaded: key -> identity_dh it was uploaded under.
    uploaded: HashMap<[u8; 32], [u8; 32]>,
    upload_in_flight: bool,
    next_request: u64,
    /// The signed keys of the current identity, once made.
    keys: Option<DeviceKeys>,
    /// Every set of keys ever uploaded.
    published: Vec<DeviceKeys>,
}

impl Client {
    fn reset_conn(&mut self) {
        self.conn = None;
        self.stage = Stage::Idle;
        // Acks for frames of a dead connection are moot: the server resends what is unacked.
        self.pending_acks.clear();
        self.upload_in_flight = false;
    }
}

struct Node {
    shard: Shard,
    journal: TestJournal,
}

struct Sim {
    seed: u64,
    /// `ReadRecords` not answered yet: answered at a random later step, dropped by a crash of
    /// their shard.
    reads: Vec<(ShardId, u64, Vec<RecordRef>)>,
    /// Every action the shards emitted, in canonical bytes (see `hash_action`): with the
    /// journals' traces, the fingerprint a pure refactor must keep (`trace_hashes`).
    actions: Sha256,
    rng: StdRng,
    trace: bool,
    now: u64,
    configs: Vec<Config>,
    nodes: Vec<Node>,
    links: BTreeMap<(ShardId, ShardId), VecDeque<MeshMsg>>,
    /// Open connections: shard holding it, owning client.
    conns: HashMap<ConnId, (ShardId, usize)>,
    next_conn: ConnId,
    clients: Vec<Client>,
    sms: HashMap<UserId, u32>,
    /// Every Message record that was ever durable: (shard, seq) -> (from_user, client_msg_id).
    durable: HashMap<(ShardId, u64), (UserId, u64)>,
    /// Per shard, the seq of every Message record ever appended (durable or lost in a crash):
    /// each one pushed something out of the dedup window when it was stored.
    appended_msgs: HashMap<ShardId, BTreeSet<u64>>,
    /// (from_user, client_msg_id) -> every (shard, seq) it was durably stored as.
    storings: HashMap<(UserId, u64), BTreeSet<(ShardId, u64)>>,
    /// Retries of messages already acknowledged whose second ✓ was checked against the first.
    dedup_checked: u64,
    crashes: u32,
    /// Crashes that cut a record in half, flipped a bit, made recovery report damage; records
    /// that framed soundly but did not decode.
    torn_tails: u64,
    bit_flips: u64,
    damage_found: u64,
    undecodable: u64,
    delivers: u64,
    /// Counters of shards that crashed, added up (a restarted shard starts from zero).
    retired: Coverage,
    /// Every one-time prekey handed out in a bundle: (owner, key).
    handed_out: HashSet<(UserId, [u8; 32])>,
    /// Whether clients use the prekey directory in this run (a third of the seeds: Ed25519
    /// verification is slow in debug builds).
    prekeys: bool,
}

/// What a run exercised, summed over shards and restarts.
#[derive(Clone, Copy, Debug, Default)]
struct Coverage {
    seeds: u64,
    /// Second ✓s of acknowledged messages checked against the first (dedup across restarts).
    dedup_checked: u64,
    crashes: u64,
    torn_tails: u64,
    bit_flips: u64,
    damage_found: u64,
    undecodable: u64,
    delivered: u64,
    dedup_hits: u64,
    receipts: u64,
    segments_deleted: u64,
    segments_compacted: u64,
    registrations: u64,
    prekeys_consumed: u64,
    bundles_without_one_time: u64,
    /// Cold mailbox records read back from the journal (for delivery or compaction).
    records_read: u64,
    record_read_failures: u64,
}

impl Coverage {
    fn add_stats(&mut self, s: &switchboard_shards::ShardStats) {
        self.prekeys_consumed += s.prekeys_consumed;
        self.bundles_without_one_time += s.prekey_bundles_without_one_time;
        self.delivered += s.delivered;
        self.dedup_hits += s.dedup_hits;
        self.receipts += s.receipts_stored;
        self.segments_deleted += s.segments_deleted;
        self.segments_compacted += s.segments_compacted;
        self.registrations += s.registrations;
        self.records_read += s.records_read;
        self.record_read_failures += s.record_read_failures;
    }

    fn add(&mut self, o: &Coverage) {
        self.seeds += o.seeds;
        self.dedup_checked += o.dedup_checked;
        self.crashes += o.crashes;
        self.torn_tails += o.torn_tails;
        self.bit_flips += o.bit_flips;
        self.damage_found += o.damage_found;
        self.undecodable += o.undecodable;
        self.delivered += o.delivered;
        self.dedup_hits += o.dedup_hits;
        self.receipts += o.receipts;
        self.segments_deleted += o.segments_deleted;
        self.segments_compacted += o.segments_compacted;
        self.registrations += o.registrations;
        self.prekeys_consumed += o.prekeys_consumed;
        self.bundles_without_one_time += o.bundles_without_one_time;
        self.records_read += o.records_read;
        self.record_read_failures += o.record_read_failures;
    }
}

fn payload(from: UserId, cmid: u64) -> Bytes {
    Bytes::from(format!("{from}:{cmid}"))
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let shards: u16 = rng.gen_range(2..=4);
        let n_clients: usize = rng.gen_range(3..=7);
        let segment_records: usize = rng.gen_range(4..=24);
        // Half the runs without compaction: only deletion then guards the log.
        let compaction_live_ratio = if rng.gen_bool(0.5) { 0.5 } else { 0.0 };
        let configs: Vec<Config> = (0..shards)
            .map(|i| {
                let mut c = Config::new(i, shards);
                c.delivery_window_msgs = rng.gen_range(1..=6);
                c.dedup_window_entries = rng.gen_range(16..=256);
                c.compaction_live_ratio = compaction_live_ratio;
                c.register_per_ip_per_hour = 1_000_000;
                c.register_per_number_per_hour = 1_000_000;
                c.prekey_low_water = 3;
                c.prekeys_per_device_max = 12;
                c.prekey_fetches_per_requester_per_minute = 1_000_000;
                c
            })
            .collect();
        let nodes = configs
            .iter()
            .map(|c| Node {
                shard: Shard::new(c.clone(), seed ^ u64::from(c.shard)),
                journal: TestJournal::new(segment_records),
            })
            .collect();
        let clients = (0..n_clients)
            .map(|i| {
                let mut key = [0u8; 32];
                rng.fill(&mut key[..]);
                Client {
                    user: 14_155_550_000 + i as u64 * 7_919,
                    key,
                    ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, i as u8)),
                    registered: false,
                    conn: None,
                    stage: Stage::Idle,
                    inbox: VecDeque::new(),
                    next_cmid: 1,
                    sent: BTreeMap::new(),
                    unacked: BTreeMap::new(),
                    acked: BTreeMap::new(),
                    ack_ts: BTreeMap::new(),
                    expect_ts: BTreeMap::new(),
                    received: BTreeMap::new(),
                    seen: HashSet::new(),
                    pending_acks: Vec::new(),
                    readable: Vec::new(),
                    identity: None,
                    next_otk: 1,
                    uploaded: HashMap::new(),
                    upload_in_flight: false,
                    next_request: FIRST_REQUEST_ID,
                    keys: None,
                    published: Vec::new(),
                }
            })
            .collect();
        Self {
            seed,
            reads: Vec::new(),
            actions: Sha256::new(),
            rng,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            now: 1_700_000_000_000,
            configs,
            nodes,
            links: BTreeMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            clients,
            sms: HashMap::new(),
            durable: HashMap::new(),
            appended_msgs: HashMap::new(),
            storings: HashMap::new(),
            dedup_checked: 0,
            crashes: 0,
            torn_tails: 0,
            bit_flips: 0,
            damage_found: 0,
            undecodable: 0,
            delivers: 0,
            retired: Coverage::default(),
            handed_out: HashSet::new(),
            prekeys: matches!(seed % 3, 0),
        }
    }

    fn n(&self) -> u16 {
        self.nodes.len() as u16
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{} t={}] {}", self.seed, self.now, what());
        }
    }

    fn client_of(&self, user: UserId) -> Option<usize> {
        self.clients.iter().position(|c| c.user == user)
    }

    // ----- the server side ------------------------------------------------------------------

    /// Hands `ev` to shard `s` and carries out everything that follows (hand-offs included).
    fn handle(&mut self, s: ShardId, ev: Event) {
        let mut queue = VecDeque::from([(s, ev)]);
        while let Some((s, ev)) = queue.pop_front() {
            self.log(|| format!("shard {s} <- {ev:?}"));
            let node = &mut self.nodes[usize::from(s)];
            node.shard.handle(self.now, ev, &mut node.journal);
            let actions: Vec<Action> = node.shard.drain_actions().collect();
            for a in actions {
                self.log(|| format!("shard {s} -> {a:?}"));
                hash_action(&mut self.actions, s, &a);
                match a {
                    Action::Send { conn, frame } => {
                        if let Frame::Deliver(frame::Deliver {
                            seq,
                            message:
                                Message {
                                    from:
                                        DeviceAddr {
                                            user: from_user, ..
                                        },
                                    client_msg_id,
                                    ref payload,
                                    ..
                                },
                        }) = frame
                        {
                            self.delivers += 1;
                            assert_eq!(
                                self.durable.get(&(s, seq)),
                                Some(&(from_user, client_msg_id)),
                                "Deliver of seq {seq} on shard {s} that was never durable (or a reused seq)"
                            );
                            assert_eq!(
                                payload,
                                &self::payload(from_user, client_msg_id),
                                "payload altered"
                            );
                        }
                        if let Some(&(shard, ci)) = self.conns.get(&conn) {
                            assert_eq!(
                                shard, s,
                                "frame for connection {conn} from a shard that does not hold it"
                            );
                            self.clients[ci].inbox.push_back((conn, frame));
                        }
                    }
                    Action::Close { conn, code, text } => {
                        if let Some((_, ci)) = self.conns.remove(&conn) {
                            let c = &mut self.clients[ci];
                            if c.conn == Some(conn) {
                                // The current connection may only be closed because a shard
                                // restarted; anything else (UnknownKey, Replaced, ...) is a bug.
                                assert_eq!(
                                    code,
                                    ErrorCode::Internal,
                                    "client {} closed: {code:?} {text}",
                                    c.user
                                );
                                c.reset_conn();
                            }
                        }
                        // The gateway reports every close back; the shard must ignore it.
                        queue.push_back((s, Event::Closed { conn }));
                    }
                    Action::Handoff { conn, to, info } => {
                        let entry = self
                            .conns
                            .get_mut(&conn)
                            .expect("hand-off of an open connection");
                        entry.0 = to;
                        queue.push_back((to, Event::Login { conn, info }));
                    }
                    Action::ToShard { shard, msg } => {
                        self.links.entry((s, shard)).or_default().push_back(msg)
                    }
                    Action::SendSms { phone, code } => {
                        self.sms.insert(phone, code);
                    }
                    Action::LoggedIn {
                        conn,
                        addr: DeviceAddr { user, .. },
                        ..
                    } => {
                        let ci = self.conns.get(&conn).map(|&(_, ci)| ci);
                        assert_eq!(
                            ci.map(|ci| self.clients[ci].user),
                            Some(user),
                            "login announced for connection {conn} of another user"
                        );
                    }
                    Action::Push {
                        to: DeviceAddr { user, .. },
                        ..
                    } => {
                        assert!(
                            self.client_of(user).is_some(),
                            "push for unknown user {user}"
                        );
                    }
                    Action::ReadRecords { token, reads } => self.reads.push((s, token, reads)),
                }
            }
        }
    }

    fn deliver_mesh(&mut self, link: (ShardId, ShardId)) {
        let Some(msg) = self.links.get_mut(&link).and_then(VecDeque::pop_front) else {
            return;
        };
        self.handle(link.1, Event::Mesh { from: link.0, msg });
    }

    /// Answers outstanding read `i` from its shard's journal (the bytes as they are now).
    fn answer_read(&mut self, i: usize) {
        let (s, token, refs) = self.reads.remove(i);
        let sim = &self.nodes[usize::from(s)].journal.sim;
        let results = refs
            .iter()
            .map(|r| {
                sim.read_record(r.segment, r.offset)
                    .map(|raw| (raw.tag, raw.body))
            })
            .collect();
        self.handle(s, Event::RecordsRead { token, results });
    }

    /// Answers every outstanding read (of shard `s` only, if given), oldest first.
    fn answer_reads(&mut self, s: Option<ShardId>) {
        while let Some(i) = self
            .reads
            .iter()
            .position(|(sh, _, _)| s.is_none_or(|s| s == *sh))
        {
            self.answer_read(i);
        }
    }

    fn commit(&mut self, s: ShardId) {
        let pending = self.nodes[usize::from(s)].journal.pending_records();
        self.note_durable(s, &pending);
        if let Some(up_to) = self.nodes[usize::from(s)].journal.commit() {
            self.handle(s, Event::Durable { up_to });
        }
    }

    /// Message records that are durable now: a seq must never come back with other content.
    fn note_durable(&mut self, s: ShardId, records: &[Record]) {
        for r in records {
            if let Record::Message {
                seq,
                message:
                    Message {
                        from:
                            DeviceAddr {
                                user: from_user, ..
                            },
                        client_msg_id,
                        ..
                    },
                ..
            } = *r
            {
                self.appended_msgs.entry(s).or_default().insert(seq);
                self.storings
                    .entry((from_user, client_msg_id))
                    .or_default()
                    .insert((s, seq));
                let prev = self.durable.insert((s, seq), (from_user, client_msg_id));
                assert!(
                    prev.is_none() || prev == Some((from_user, client_msg_id)),
                    "seq {seq} on shard {s} reused for different content: {prev:?} then {:?}",
                    (from_user, client_msg_id)
                );
            }
        }
    }

    /// A crash of shard `s`: its volatile state, connections and the mesh traffic to and from
    /// it are gone; what it appended since its last commit is lost, torn (cut anywhere) or kept
    /// with a bit flipped, as the random value picks. It restarts at once from what the real
    /// recovery scan and the record decoder make of its log bytes.
    fn crash(&mut self, s: ShardId) {
        self.crashes += 1;
        // Reads in flight die with the process.
        self.reads.retain(|(sh, _, _)| *sh != s);
        // What is lost still evicted dedup entries while it was in memory.
        for r in self.nodes[usize::from(s)].journal.pending_records() {
            if let Record::Message { seq, .. } = r {
                self.appended_msgs.entry(s).or_default().insert(seq);
            }
        }
        let crashed = self.nodes[usize::from(s)]
            .journal
            .crash_random(self.rng.gen());
        self.log(|| {
            format!(
                "CRASH shard {s}: {:?} torn={} flipped={} damage={}",
                crashed.mode, crashed.torn, crashed.flipped, crashed.damage_found
            )
        });
        self.torn_tails += u64::from(crashed.torn);
        self.bit_flips += u64::from(crashed.flipped);
        self.damage_found += u64::from(crashed.damage_found);
        self.undecodable += crashed.undecodable as u64;
        // Unsynced records a torn or flipped tail kept are durable from now on.
        let recovered: Vec<Record> = crashed.records.iter().map(|(_, r)| r.clone()).collect();
        self.note_durable(s, &recovered);
        let seed = self.rng.gen();
        let mut shard = Shard::new(self.configs[usize::from(s)].clone(), seed);
        shard.recover(self.now, &crashed.segments, crashed.records);
        let old = std::mem::replace(&mut self.nodes[usize::from(s)].shard, shard);
        self.retired.add_stats(old.stats());
        let dead: Vec<(ConnId, usize)> = self
            .conns
            .iter()
            .filter(|(_, (sh, _))| *sh == s)
            .map(|(&c, &(_, ci))| (c, ci))
            .collect();
        for (conn, ci) in dead {
            self.conns.remove(&conn);
            if self.clients[ci].conn == Some(conn) {
                self.clients[ci].reset_conn();
            }
        }
        self.links.retain(|(from, to), _| *from != s && *to != s);
        for t in 0..self.n() {
            if t != s {
                self.handle(t, Event::PeerRestarted { shard: s });
            }
        }
    }

    // ----- the client side ------------------------------------------------------------------

    fn client_frame(&mut self, ci: usize, frame: Frame) {
        let Some(conn) = self.clients[ci].conn else {
            return;
        };
        let Some(&(shard, _)) = self.conns.get(&conn) else {
            return;
        };
        self.handle(shard, Event::Frame { conn, frame });
    }

    fn connect(&mut self, ci: usize) {
        let shard = self.rng.gen_range(0..self.n());
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, (shard, ci));
        let (ip, key) = (self.clients[ci].ip, self.clients[ci].key);
        self.clients[ci].conn = Some(conn);
        self.handle(
            shard,
            Event::Connected {
                conn,
                peer_ip: ip,
                static_key: key,
            },
        );
        if self.clients[ci].conn != Some(conn) {
            return;
        }
        if self.clients[ci].registered {
            self.login(ci);
        } else {
            self.request_code(ci);
        }
    }

    fn login(&mut self, ci: usize) {
        self.clients[ci].stage = Stage::LoggingIn { since: self.now };
        let user = self.clients[ci].user;
        self.client_frame(
            ci,
            Frame::Login(frame::Login {
                addr: DeviceAddr { user, device: 0 },
                revision: 1,
                capabilities: if self.prekeys {
                    capability::MESSAGING | capability::PREKEYS
                } else {
                    capability::MESSAGING
                },
            }),
        );
    }

    /// Uploads a few fresh one-time prekeys (sometimes under a new identity first).
    fn upload_prekeys(&mut self, ci: usize) {
        if self.clients[ci].stage != Stage::LoggedIn || self.clients[ci].upload_in_flight {
            return;
        }
        if self.clients[ci].identity.is_none() || self.rng.gen_ratio(1, 40) {
            let c = &mut self.clients[ci];
            c.identity = Some(IdentityKeyPair::generate(&mut self.rng));
            c.keys = None;
            c.next_otk = 1;
        }
        let n = self.rng.gen_range(0..=6);
        let mut one_time = Vec::new();
        for _ in 0..n {
            let mut key = [0u8; 32];
            self.rng.fill(&mut key[..]);
            key[31] &= 0x3F; // canonical X25519
            let c = &mut self.clients[ci];
            let id = c.next_otk;
            c.next_otk += 1;
            one_time.push(OneTimePrekey { id, key });
        }
        let c = &mut self.clients[ci];
        if c.keys.is_none() {
            // Signed once per identity: Ed25519 is slow in debug builds.
            let mut spk = [0u8; 32];
            self.rng.fill(&mut spk[..]);
            spk[31] &= 0x3F;
            let Some(identity) = &c.identity else { return };
            let public = identity.public();
            let keys = DeviceKeys {
                identity_dh: public.dh,
                identity_sign: public.sign,
                signed_prekey_id: 1,
                signed_prekey: spk,
                signed_prekey_sig: identity.sign(&encode_public(&spk)),
            };
            c.keys = Some(keys);
            c.published.push(keys);
        }
        let Some(keys) = c.keys else { return };
        for k in &one_time {
            c.uploaded.insert(k.key, keys.identity_dh);
        }
        c.upload_in_flight = true;
        self.client_frame(
            ci,
            Frame::PrekeyUpload(frame::PrekeyUpload {
                keys: Box::new(keys),
                one_time,
            }),
        );
    }

    fn fetch_bundle(&mut self, ci: usize) {
        if self.clients[ci].stage != Stage::LoggedIn {
            return;
        }
        let peers: Vec<UserId> = self
            .clients
            .iter()
            .filter(|c| c.registered)
            .map(|c| c.user)
            .collect();
        if peers.is_empty() {
            return;
        }
        let user = peers[self.rng.gen_range(0..peers.len())];
        let c = &mut self.clients[ci];
        let request_id = c.next_request;
        c.next_request += 1;
        self.client_frame(
            ci,
            Frame::PrekeyFetch(frame::PrekeyFetch {
                addr: DeviceAddr { user, device: 0 },
                request_id,
            }),
        );
    }

    fn request_code(&mut self, ci: usize) {
        self.clients[ci].stage = Stage::AwaitCode { since: self.now };
        let phone = self.clients[ci].user;
        self.client_frame(ci, Frame::RegisterRequest(frame::RegisterRequest { phone }));
    }

    /// Graceful close by the client.
    fn disconnect(&mut self, ci: usize) {
        if let Some(conn) = self.clients[ci].conn {
            if let Some((shard, _)) = self.conns.remove(&conn) {
                self.handle(shard, Event::Closed { conn });
            }
        }
        self.clients[ci].reset_conn();
    }

    /// The client gives up on its connection without the server noticing (a dead NAT): the
    /// server keeps sending to it until the next login replaces it.
    fn abandon(&mut self, ci: usize) {
        self.clients[ci].reset_conn();
    }

    /// Sends an already acknowledged message again, as a client that lost its outbox state
    /// would: the server must answer from its dedup window (see `check_dedup_time`).
    fn retry_acked(&mut self, ci: usize) {
        let c = &self.clients[ci];
        if c.acked.is_empty() {
            return;
        }
        let pick = self.rng.gen_range(0..c.acked.len());
        let Some((&cmid, &to)) = c.acked.iter().nth(pick) else {
            return;
        };
        self.clients[ci].unacked.insert(cmid, to);
        let msg_type = self.rng.gen_range(0..5);
        self.send_as(ci, cmid, to, msg_type);
    }

    /// Sends again up to `n` acknowledged messages of client `ci` that its recipients' shards
    /// still remember (newest first), expecting their original ✓ times. Only with no other
    /// traffic in flight: a concurrent store could push one out of the window on the way.
    fn retry_latest_acked(&mut self, ci: usize, n: usize) {
        let c = &self.clients[ci];
        let from = c.user;
        let remembered: Vec<(u64, UserId)> = c
            .acked
            .iter()
            .rev()
            .filter(|(&cmid, _)| self.in_dedup_window(from, cmid))
            .take(n)
            .map(|(&m, &t)| (m, t))
            .collect();
        for (cmid, to) in remembered {
            let c = &mut self.clients[ci];
            c.unacked.insert(cmid, to);
            if let Some(&ts) = c.ack_ts.get(&cmid) {
                c.expect_ts.insert(cmid, ts);
            }
            self.send_as(ci, cmid, to, 0);
        }
    }

    /// Whether (from, cmid) was stored exactly once and fewer than `dedup_window_entries`
    /// messages were stored after it on its shard.
    fn in_dedup_window(&self, from: UserId, cmid: u64) -> bool {
        let Some(stored) = self.storings.get(&(from, cmid)) else {
            return false;
        };
        let [(shard, seq)] = stored.iter().copied().collect::<Vec<_>>()[..] else {
            return false;
        };
        let newer = self
            .appended_msgs
            .get(&shard)
            .map_or(0, |s| s.range(seq + 1..).count());
        newer < self.configs[usize::from(shard)].dedup_window_entries
    }

    /// Dedup holds across restarts: the ✓ of a retry sent while the message was in its shard's
    /// dedup window (see `retry_latest_acked`) carries the original time.
    fn check_dedup_time(&mut self, ci: usize, cmid: u64, ts: u64) {
        let c = &mut self.clients[ci];
        c.ack_ts.insert(cmid, ts);
        if let Some(expected) = c.expect_ts.remove(&cmid) {
            self.dedup_checked += 1;
            assert_eq!(
                ts, expected,
                "retry of ({}, {cmid}) got a new time though its shard's dedup window still held \
                 it when it was sent: it was stored again",
                c.user
            );
        }
    }

    /// Client `ci` sends message `cmid` to `to` (a first send or a retry: same payload).
    fn send_as(&mut self, ci: usize, cmid: u64, to: UserId, msg_type: u8) {
        let from = self.clients[ci].user;
        self.client_frame(
            ci,
            Frame::Send(frame::Send {
                client_msg_id: cmid,
                to: Address::device(to, 0),
                msg_type: MsgType(msg_type),
                payload: payload(from, cmid),
            }),
        );
    }

    fn send_new(&mut self, ci: usize) {
        let peers: Vec<UserId> = self
            .clients
            .iter()
            .filter(|c| c.registered)
            .map(|c| c.user)
            .collect();
        if peers.is_empty() {
            return;
        }
        let to = peers[self.rng.gen_range(0..peers.len())];
        let c = &mut self.clients[ci];
        let cmid = c.next_cmid;
        c.next_cmid += 1;
        c.sent.insert(cmid, to);
        c.unacked.insert(cmid, to);
        let msg_type = self.rng.gen_range(0..5);
        self.send_as(ci, cmid, to, msg_type);
    }

    fn flush_acks(&mut self, ci: usize) {
        if self.clients[ci].stage != Stage::LoggedIn || self.clients[ci].pending_acks.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.clients[ci].pending_acks);
        for chunk in seqs.chunks(ACK_SEQS_MAX) {
            self.client_frame(
                ci,
                Frame::Ack(frame::Ack {
                    seqs: chunk.to_vec(),
                }),
            );
        }
    }

    fn read_one(&mut self, ci: usize) {
        if self.clients[ci].stage != Stage::LoggedIn {
            return;
        }
        if let Some((from, cmid)) = self.clients[ci].readable.pop() {
            self.client_frame(
                ci,
                Frame::Read(frame::Read {
                    to: Address::device(from, 0),
                    client_msg_id: cmid,
                }),
            );
        }
    }

    fn check_timeout(&mut self, ci: usize) {
        let since = match self.clients[ci].stage {
            Stage::AwaitCode { since }
            | Stage::AwaitRegistered { since }
            | Stage::LoggingIn { since } => since,
            Stage::Idle | Stage::LoggedIn => return,
        };
        if self.now.saturating_sub(since) > CLIENT_TIMEOUT_MS {
            self.log(|| format!("client {ci} timed out in {:?}", self.clients[ci].stage));
            self.disconnect(ci);
        }
    }

    /// Processes the oldest frame in the client's inbox.
    fn process_one(&mut self, ci: usize) {
        let Some((conn, frame)) = self.clients[ci].inbox.pop_front() else {
            return;
        };
        if self.clients[ci].conn != Some(conn) {
            return; // from a connection the client has given up on
        }
        let me = self.clients[ci].user;
        match frame {
            Frame::RegisterCodeSent(frame::RegisterCodeSent { phone, .. }) => {
                assert_eq!(phone, me);
                if !matches!(self.clients[ci].stage, Stage::AwaitCode { .. }) {
                    return;
                }
                match self.sms.get(&me).copied() {
                    Some(code) => {
                        self.clients[ci].stage = Stage::AwaitRegistered { since: self.now };
                        self.client_frame(
                            ci,
                            Frame::RegisterVerify(frame::RegisterVerify { phone: me, code }),
                        );
                    }
                    None => self.request_code(ci),
                }
            }
            Frame::Registered(frame::Registered {
                addr: DeviceAddr { user, device },
            }) => {
                assert_eq!((user, device), (me, 0));
                self.clients[ci].registered = true;
                self.login(ci);
            }
            Frame::Welcome(frame::Welcome {
                addr: DeviceAddr { user, .. },
                ..
            }) => {
                assert_eq!(user, me);
                assert!(
                    matches!(self.clients[ci].stage, Stage::LoggingIn { .. }),
                    "Welcome in {:?}",
                    self.clients[ci].stage
                );
                self.clients[ci].stage = Stage::LoggedIn;
                // Resend everything unacknowledged, in send order, same ids.
                let retry: Vec<(u64, UserId)> = self.clients[ci]
                    .unacked
                    .iter()
                    .map(|(&k, &v)| (k, v))
                    .collect();
                for (cmid, to) in retry {
                    let msg_type = (cmid % 5) as u8;
                    self.client_frame(
                        ci,
                        Frame::Send(frame::Send {
                            client_msg_id: cmid,
                            to: Address::device(to, 0),
                            msg_type: MsgType(msg_type),
                            payload: payload(me, cmid),
                        }),
                    );
                }
            }
            Frame::ServerAck(frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            }) => {
                self.check_dedup_time(ci, client_msg_id, server_ts_ms);
                let c = &mut self.clients[ci];
                assert!(
                    c.sent.contains_key(&client_msg_id),
                    "ServerAck for unknown id {client_msg_id}"
                );
                if let Some(to) = c.unacked.remove(&client_msg_id) {
                    c.acked.insert(client_msg_id, to);
                }
            }
            Frame::Deliver(frame::Deliver {
                seq,
                message:
                    Message {
                        from:
                            DeviceAddr {
                                user: from_user, ..
                            },
                        client_msg_id,
                        ..
                    },
            }) => {
                let sender = self.client_of(from_user).expect("known sender");
                assert_eq!(
                    self.clients[sender].sent.get(&client_msg_id),
                    Some(&me),
                    "Deliver of a message not sent to {me}"
                );
                let c = &mut self.clients[ci];
                if c.seen.insert((from_user, client_msg_id)) {
                    c.received.entry(from_user).or_default().push(client_msg_id);
                    c.readable.push((from_user, client_msg_id));
                }
                c.pending_acks.push(seq);
            }
            Frame::Receipt(frame::Receipt {
                seq,
                receipt:
                    ReceiptInfo {
                        from:
                            DeviceAddr {
                                user: from_user, ..
                            },
                        client_msg_id,
                        ..
                    },
            }) => {
                let c = &mut self.clients[ci];
                assert_eq!(
                    c.sent.get(&client_msg_id),
                    Some(&from_user),
                    "receipt for a message {me} did not send to {from_user}"
                );
                c.pending_acks.push(seq);
            }
            Frame::Pong { .. } => {}
            Frame::PrekeyStatus(frame::PrekeyStatus { reason, .. }) => match reason {
                PrekeyStatusReason::UPLOADED => self.clients[ci].upload_in_flight = false,
                PrekeyStatusReason::BELOW_LOW_WATER | PrekeyStatusReason::EXHAUSTED => {
                    self.upload_prekeys(ci)
                }
                other => panic!("unknown prekey status reason {other:?}"),
            },
            Frame::PrekeyBundle(frame::PrekeyBundle {
                addr: DeviceAddr { user, device },
                keys,
                one_time,
                ..
            }) => {
                assert_eq!(device, 0);
                let owner = &self.clients[self.client_of(user).expect("known owner")];
                // (The server verified the signature on upload; the keys must be ones the owner
                // published, byte for byte.)
                assert!(
                    owner.published.contains(&keys),
                    "bundle of {user} with keys it never published"
                );
                if let Some(k) = one_time {
                    assert_eq!(
                        owner.uploaded.get(&k.key),
                        Some(&keys.identity_dh),
                        "one-time prekey {} of {user} handed out under another identity (or never uploaded)",
                        k.id
                    );
                    assert!(
                        self.handed_out.insert((user, k.key)),
                        "one-time prekey {} of {user} handed out twice",
                        k.id
                    );
                }
            }
            Frame::Error(frame::Error { code, ref_id, text }) => {
                let code = ErrorCode::from_u16(code);
                let registering = matches!(
                    self.clients[ci].stage,
                    Stage::AwaitCode { .. } | Stage::AwaitRegistered { .. }
                );
                match code {
                    // A fetch for someone who has not uploaded yet.
                    Some(ErrorCode::NoSuchRecipient) if ref_id >= FIRST_REQUEST_ID => {}
                    // Top-ups racing each other (a status per fetch) can pass the cap.
                    Some(ErrorCode::PrekeyLimit) => self.clients[ci].upload_in_flight = false,
                    // Lost codes (a restarted home), a stale code, a restarted key registry.
                    Some(
                        ErrorCode::NoPendingCode
                        | ErrorCode::CodeExpired
                        | ErrorCode::WrongCode
                        | ErrorCode::StorageUnavailable
                        | ErrorCode::RegisterRateLimited,
                    ) if registering => self.request_code(ci),
                    _ => panic!(
                        "client {me}: unexpected error {code:?} ref {ref_id}: {text} in {:?}",
                        self.clients[ci].stage
                    ),
                }
            }
            other => panic!("client {me}: unexpected frame {other:?}"),
        }
    }

    /// One random client action.
    fn client_step(&mut self, ci: usize) {
        self.check_timeout(ci);
        if self.clients[ci].conn.is_none() {
            return self.connect(ci);
        }
        if !self.clients[ci].inbox.is_empty() && self.rng.gen_bool(0.6) {
            return self.process_one(ci);
        }
        let logged_in = self.clients[ci].stage == Stage::LoggedIn;
        match self.rng.gen_range(0..110) {
            100..=106 if self.prekeys => self.fetch_bundle(ci),
            107 if self.prekeys => self.upload_prekeys(ci),
            0..=39 if logged_in => self.send_new(ci),
            40..=69 => self.flush_acks(ci),
            70..=74 => self.read_one(ci),
            75..=76 => self.disconnect(ci),
            77 if logged_in => self.abandon(ci),
            78..=79 if logged_in => self.retry_acked(ci),
            _ => self.process_one(ci),
        }
    }

    // ----- phases ---------------------------------------------------------------------------

    fn chaos(&mut self, steps: usize, crash_per_mille: u32) {
        for _ in 0..steps {
            self.now += self.rng.gen_range(0..30);
            let roll = self.rng.gen_range(0..1000);
            if roll < crash_per_mille {
                let s = self.rng.gen_range(0..self.n());
                self.crash(s);
                continue;
            }
            match self.rng.gen_range(0..100) {
                0..=39 => {
                    let busy: Vec<(ShardId, ShardId)> = self
                        .links
                        .iter()
                        .filter(|(_, q)| !q.is_empty())
                        .map(|(&k, _)| k)
                        .collect();
                    if !busy.is_empty() {
                        let link = busy[self.rng.gen_range(0..busy.len())];
                        self.deliver_mesh(link);
                    }
                }
                40..=54 => {
                    let s = self.rng.gen_range(0..self.n());
                    self.commit(s);
                }
                55..=59 => {
                    let s = self.rng.gen_range(0..self.n());
                    self.handle(s, Event::Tick);
                }
                60..=67 => {
                    if !self.reads.is_empty() {
                        let i = self.rng.gen_range(0..self.reads.len());
                        self.answer_read(i);
                    }
                }
                _ => {
                    let ci = self.rng.gen_range(0..self.clients.len());
                    self.client_step(ci);
                }
            }
        }
    }

    fn quiescent(&self) -> bool {
        self.reads.is_empty()
            && self.links.values().all(VecDeque::is_empty)
            && self
                .nodes
                .iter()
                .all(|n| n.journal.pending() == 0 && n.shard.stats().mailbox_depth == 0)
            && self.clients.iter().all(|c| {
                c.registered
                    && c.stage == Stage::LoggedIn
                    && c.unacked.is_empty()
                    && c.inbox.is_empty()
                    && c.pending_acks.is_empty()
            })
    }

    /// No more faults: everyone reconnects, every queue drains.
    fn heal(&mut self) {
        for round in 0..2_000 {
            self.now += 50;
            for ci in 0..self.clients.len() {
                self.check_timeout(ci);
                if self.clients[ci].conn.is_none() {
                    self.connect(ci);
                }
                while !self.clients[ci].inbox.is_empty() {
                    self.process_one(ci);
                }
                self.flush_acks(ci);
            }
            for _ in 0..10_000 {
                let Some(link) = self
                    .links
                    .iter()
                    .find(|(_, q)| !q.is_empty())
                    .map(|(&k, _)| k)
                else {
                    break;
                };
                self.deliver_mesh(link);
            }
            self.answer_reads(None);
            for s in 0..self.n() {
                self.commit(s);
            }
            if round % 20 == 0 {
                for s in 0..self.n() {
                    self.handle(s, Event::Tick);
                }
            }
            if self.quiescent() {
                return;
            }
        }
        let stuck: Vec<String> = self
            .clients
            .iter()
            .filter(|c| !(c.registered && c.stage == Stage::LoggedIn && c.unacked.is_empty()))
            .map(|c| {
                format!(
                    "{}: {:?} registered={} unacked={:?}",
                    c.user, c.stage, c.registered, c.unacked
                )
            })
            .collect();
        let depth: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.shard.stats().mailbox_depth)
            .collect();
        panic!("did not heal: stuck clients {stuck:?}, mailbox depths {depth:?}");
    }

    fn check(&self) {
        let mut sent_total = 0;
        let mut seen_total = 0;
        for a in &self.clients {
            assert!(
                a.unacked.is_empty(),
                "{} still has unacknowledged messages",
                a.user
            );
            sent_total += a.sent.len();
            for (&cmid, &to) in &a.acked {
                let b = &self.clients[self.client_of(to).expect("recipient")];
                assert!(
                    b.seen.contains(&(a.user, cmid)),
                    "message {cmid} from {} to {to} was acknowledged but never delivered",
                    a.user
                );
            }
        }
        for b in &self.clients {
            seen_total += b.seen.len();
            for (from, ids) in &b.received {
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "order broken from {from} to {}: {ids:?}",
                    b.user
                );
            }
        }
        assert_eq!(
            seen_total, sent_total,
            "every message delivered exactly once after dedup"
        );
        for (s, node) in self.nodes.iter().enumerate() {
            let here = self
                .clients
                .iter()
                .filter(|c| {
                    c.conn
                        .and_then(|k| self.conns.get(&k))
                        .is_some_and(|(sh, _)| usize::from(*sh) == s)
                })
                .count();
            assert_eq!(
                node.shard.stats().connections_logged_in,
                here as u64,
                "connections_logged_in on shard {s}"
            );
        }
    }

    /// Restart every shard from its log: nothing acknowledged may come back, every account
    /// must still log in.
    fn restart_all_and_recheck(&mut self) {
        // Twice: let the drained shards delete what they can, then restart them all. A restart
        // seals the active segment, so the second round can delete the segment that held the
        // newest tombstones: that is where a lost seq high-water mark would show.
        for _ in 0..2 {
            for _ in 0..4 {
                for s in 0..self.n() {
                    self.handle(s, Event::Tick);
                    self.answer_reads(Some(s));
                    self.commit(s);
                }
            }
            for s in 0..self.n() {
                self.crash(s);
            }
        }
        for (s, node) in self.nodes.iter().enumerate() {
            assert_eq!(
                node.shard.stats().mailbox_depth,
                0,
                "shard {s} resurrected entries after restart"
            );
        }
        for ci in 0..self.clients.len() {
            self.connect(ci);
            while !self.clients[ci].inbox.is_empty() {
                self.process_one(ci);
            }
            assert_eq!(
                self.clients[ci].stage,
                Stage::LoggedIn,
                "client {} cannot log in after restart",
                self.clients[ci].user
            );
        }
        // No one-time prekey that was handed out is still stored; every stored one was
        // uploaded by its owner under the identity the directory names.
        for c in &self.clients {
            let home = switchboard_shards::home_shard(c.user, self.n());
            let Some((keys, stored)) = self.nodes[usize::from(home)]
                .shard
                .published_prekeys(c.user, 0)
            else {
                continue;
            };
            for k in stored {
                assert!(
                    !self.handed_out.contains(&(c.user, k.key)),
                    "one-time prekey {} of {} was handed out and is stored again after restart",
                    k.id,
                    c.user
                );
                assert_eq!(c.uploaded.get(&k.key), Some(&keys.identity_dh));
            }
        }
    }
}

fn run_seed(seed: u64) -> (Coverage, String) {
    let mut sim = Sim::new(seed);
    // Registration and login happen under faults too: nobody is registered at the start.
    let steps = std::env::var("SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    sim.chaos(steps, 4);
    sim.heal();
    sim.check();
    sim.restart_all_and_recheck();
    // Dedup across the restart: every client sends its latest acknowledged messages again
    // (the window must answer with their original times: `check_dedup_time`).
    sim.heal();
    for ci in 0..sim.clients.len() {
        sim.retry_latest_acked(ci, 32);
    }
    // Answered before any new message is stored (a new store could evict one on the way).
    sim.heal();
    // Traffic after the restart: new seqs must not collide with any seq ever made durable.
    for ci in 0..sim.clients.len() {
        sim.send_new(ci);
    }
    sim.heal();
    sim.check();
    let mut cov = sim.retired;
    for n in &sim.nodes {
        cov.add_stats(n.shard.stats());
    }
    cov.seeds = 1;
    cov.crashes = u64::from(sim.crashes);
    cov.torn_tails = sim.torn_tails;
    cov.bit_flips = sim.bit_flips;
    cov.damage_found = sim.damage_found;
    cov.undecodable = sim.undecodable;
    cov.dedup_checked = sim.dedup_checked;
    sim.log(|| format!("seed {seed}: {cov:?}"));
    (cov, sim.fingerprint())
}

fn run_reporting(seed: u64) -> (Coverage, String) {
    match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
        Ok(cov) => cov,
        Err(e) => {
            eprintln!(
                "simulation failed; reproduce with: SIM_SEED={seed} SIM_TRACE=1 cargo test -p switchboard-shards --test sim -- --nocapture"
            );
            resume_unwind(e)
        }
    }
}

#[test]
fn simulation() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        run_reporting(seed);
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut total = Coverage::default();
    let mut hashes = Vec::new();
    for seed in 0..seeds {
        let (cov, hash) = run_reporting(seed);
        total.add(&cov);
        hashes.push((seed, hash));
    }
    if std::env::var_os("SIM_SEEDS").is_none() && std::env::var_os("SIM_STEPS").is_none() {
        check_trace_hashes(&hashes);
    }
    eprintln!("simulation coverage: {total:?}");
    // The run must actually exercise what it claims to check.
    if seeds >= 50 {
        assert!(total.crashes > seeds, "{total:?}");
        // Crashes really tore records and flipped bits, and the real recovery saw it.
        assert!(
            total.torn_tails > 0 && total.bit_flips > 0 && total.damage_found > 0,
            "{total:?}"
        );
        assert!(
            total.dedup_hits > 0 && total.receipts > 0 && total.delivered > 0,
            "{total:?}"
        );
        // Retries of acknowledged messages were answered from the dedup window (restarts
        // included) and their time checked.
        assert!(total.dedup_checked > 0, "{total:?}");
        assert!(
            total.segments_deleted > 0 && total.segments_compacted > 0,
            "{total:?}"
        );
        assert!(
            total.prekeys_consumed > 0 && total.bundles_without_one_time > 0,
            "{total:?}"
        );
        // Cold entries were read back (after restarts and for offline devices).
        assert!(total.records_read > 0, "{total:?}");
    }
}

/// The simulator must be deterministic, or a seed would not reproduce a failure.
#[test]
fn simulation_is_deterministic() {
    let fingerprint = |seed| {
        let mut sim = Sim::new(seed);
        sim.chaos(1_500, 4);
        let stats: Vec<String> = sim
            .nodes
            .iter()
            .map(|n| format!("{:?}", n.shard.stats()))
            .collect();
        (sim.now, sim.delivers, sim.crashes, stats)
    };
    assert_eq!(fingerprint(7), fingerprint(7));
}

// ----- the refactor safety net ----------------------------------------------------------------

/// Feeds one action into `h` as canonical bytes: the encoded frame for `Send`, the fields for the
/// others. Mesh messages are internal (their effects show as frames and appends), so only their
/// endpoints are hashed; a change of their Rust shape keeps the hash.
fn hash_action(h: &mut Sha256, shard: ShardId, a: &Action) {
    h.update(shard.to_le_bytes());
    match a {
        Action::Send { conn, frame } => {
            let mut out = Vec::new();
            frame.encode(&mut out);
            h.update(b"S");
            h.update(conn.to_le_bytes());
            h.update((out.len() as u64).to_le_bytes());
            h.update(&out);
        }
        Action::Close { conn, code, text } => {
            h.update(b"C");
            h.update(conn.to_le_bytes());
            h.update((*code as u16).to_le_bytes());
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        Action::Handoff { conn, to, info } => {
            h.update(b"H");
            h.update(conn.to_le_bytes());
            h.update(to.to_le_bytes());
            h.update(info.addr.user.to_le_bytes());
            h.update(info.addr.device.to_le_bytes());
            h.update(info.revision.to_le_bytes());
            h.update(info.capabilities.to_le_bytes());
            h.update(info.static_key);
            h.update(info.peer_ip.to_string().as_bytes());
        }
        Action::ToShard { shard, .. } => {
            h.update(b"M");
            h.update(shard.to_le_bytes());
        }
        Action::LoggedIn {
            conn,
            addr: DeviceAddr { user, device },
        } => {
            h.update(b"L");
            h.update(conn.to_le_bytes());
            h.update(user.to_le_bytes());
            h.update(device.to_le_bytes());
        }
        Action::SendSms { phone, code } => {
            h.update(b"R");
            h.update(phone.to_le_bytes());
            h.update(code.to_le_bytes());
        }
        Action::Push {
            to: DeviceAddr { user, device },
            from_user,
            msg_type,
        } => {
            h.update(b"P");
            h.update(user.to_le_bytes());
            h.update(device.to_le_bytes());
            h.update(from_user.to_le_bytes());
            h.update([msg_type.0]);
        }
        Action::ReadRecords { token, reads } => {
            h.update(b"Q");
            h.update(token.to_le_bytes());
            for r in reads {
                h.update(r.segment.to_le_bytes());
                h.update(r.offset.to_le_bytes());
            }
        }
    }
}

impl Sim {
    /// The seed's fingerprint: every action and every append and deletion of every shard.
    fn fingerprint(&self) -> String {
        let mut h = self.actions.clone();
        for n in &self.nodes {
            h.update(n.journal.sim.trace_hash().to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// Where the fingerprints of the default run (seeds 0..300, 2,000 chaos steps) are kept.
const TRACE_FILE: &str = "tests/sim_trace_hashes.txt";

/// Checks the default run's fingerprints against [`TRACE_FILE`]: a commit that only moves code
/// must leave every seed's stream of actions and appends as it was. A commit that changes
/// behaviour on purpose rewrites the file with `SIM_RECORD_TRACE=1` and says so.
fn check_trace_hashes(hashes: &[(u64, String)]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(TRACE_FILE);
    let text: String = hashes.iter().map(|(s, h)| format!("{s} {h}\n")).collect();
    if std::env::var_os("SIM_RECORD_TRACE").is_some() {
        std::fs::write(&path, text).expect("write trace hashes");
        return;
    }
    let recorded = std::fs::read_to_string(&path).expect("read trace hashes");
    let changed: Vec<&str> = recorded
        .lines()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a)
        .collect();
    assert!(
        changed.is_empty() && recorded.lines().count() == text.lines().count(),
        "{} of {} seeds changed their actions or appends (first: {:?}); a pure refactor must \
         keep them; rewrite {TRACE_FILE} with SIM_RECORD_TRACE=1 only for an intended change",
        changed.len(),
        hashes.len(),
        changed.first()
    );
}
