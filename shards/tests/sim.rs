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
//! * multi-device: in some runs users link 1-3 companions (`LinkRequest` on a new connection to
//!   any shard, `LinkApprove` with a real signature from the logged-in primary), which log in,
//!   send, disconnect and get crashed like any client; primaries remove companions and
//!   companions remove themselves (a removed companion may start over as a new device). Senders
//!   use `SendMulti` with the device sets they believe (refreshed from `DeviceList` STALE,
//!   CHANGED and FETCHED, retried with the same id) besides the legacy `Send`. Per device:
//!   every copy of an acknowledged message reaches its device unless that device was removed
//!   since; a `SendMulti` has a copy for every device linked before it was stored, the
//!   recipient's and the sender's other ones (none silently skipped); a `Deliver` only ever goes
//!   to the device (and incarnation) its record was stored for, and never to a device whose
//!   removal is durable; a companion is only closed with `DeviceRemoved` or refused with
//!   `UnknownKey` after someone asked to remove it; receipts come per device, none for sync
//!   copies, and `READ_ELSEWHERE` only to the reader's other devices.
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
use protocol::frame::{DeviceCopy, DeviceKeys, OneTimePrekey, PrekeyStatusReason, ACK_SEQS_MAX};
use protocol::{
    capability, frame, Address, DeviceAddr, ErrorCode, Frame, Message, MsgType, ReceiptInfo,
    ReceiptKind, UserId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use switchboard_e2ee::keys::encode_public;
use switchboard_e2ee::{sign_device, IdentityKeyPair};
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
    /// A new device waiting for its link code.
    AwaitLinkCode {
        since: u64,
    },
    /// A new device showing `code`, waiting for its primary's approval.
    AwaitLinked {
        since: u64,
        code: u64,
    },
}

/// One device: a primary (device 0, registers) or a companion (links to its primary's
/// account; after a removal it starts over as a new device with fresh keys).
#[derive(Debug)]
struct Client {
    user: UserId,
    /// 0 for a primary; a companion's id once it knows it is linked.
    device: u16,
    /// A companion's primary (client index).
    owner: Option<usize>,
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
    /// Per sending client, client_msg_ids in first-arrival order (after dedup).
    received: BTreeMap<usize, Vec<u64>>,
    seen: HashSet<(UserId, u64)>,
    pending_acks: Vec<u64>,
    readable: Vec<(DeviceAddr, u64)>,
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
    /// The identity the server has durably (a primary's, after `UPLOADED`): approvals wait
    /// for it.
    identity_confirmed: bool,
    /// Device lists as this device last heard them.
    views: HashMap<UserId, Vec<u16>>,
    /// Companions (client indexes) whose codes this primary is to approve.
    to_approve: Vec<usize>,
    /// When this incarnation's link became durable (companions).
    linked_at: Option<u64>,
    /// The public identity keys (dh, sign) of a companion (computing them is slow in debug).
    id_pub: ([u8; 32], [u8; 32]),
    /// A companion that was removed and will not link again.
    retired: bool,
}

impl Client {
    fn reset_conn(&mut self) {
        self.conn = None;
        self.stage = Stage::Idle;
        // Acks for frames of a dead connection are moot: the server resends what is unacked.
        self.pending_acks.clear();
        self.upload_in_flight = false;
    }

    fn addr(&self) -> DeviceAddr {
        DeviceAddr::new(self.user, self.device)
    }

    /// The devices of `user` as this device believes them.
    fn view(&self, user: UserId) -> Vec<u16> {
        self.views.get(&user).cloned().unwrap_or_else(|| vec![0])
    }

    /// Whether the device exists on the server as far as the client knows (a registered
    /// primary, a linked companion).
    fn active(&self) -> bool {
        self.registered
    }

    fn new(
        ci: usize,
        user: UserId,
        owner: Option<usize>,
        key: [u8; 32],
        identity: Option<IdentityKeyPair>,
    ) -> Self {
        Client {
            user,
            device: 0,
            owner,
            key,
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, (ci >> 8) as u8, ci as u8)),
            registered: false,
            conn: None,
            stage: Stage::Idle,
            inbox: VecDeque::new(),
            // Unique across clients and incarnations: the sender is `cmid >> 32`.
            next_cmid: ((ci as u64) << 32) + 1,
            sent: BTreeMap::new(),
            unacked: BTreeMap::new(),
            acked: BTreeMap::new(),
            ack_ts: BTreeMap::new(),
            expect_ts: BTreeMap::new(),
            received: BTreeMap::new(),
            seen: HashSet::new(),
            pending_acks: Vec::new(),
            readable: Vec::new(),
            next_otk: 1,
            uploaded: HashMap::new(),
            upload_in_flight: false,
            next_request: FIRST_REQUEST_ID,
            keys: None,
            published: Vec::new(),
            identity_confirmed: false,
            views: HashMap::new(),
            to_approve: Vec::new(),
            linked_at: None,
            retired: false,
            id_pub: identity.as_ref().map_or(([0; 32], [0; 32]), |id| {
                let p = id.public();
                (p.dh, p.sign)
            }),
            identity,
        }
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
    /// Every message sent, by its (globally unique) client_msg_id: (from_user, to_user,
    /// SendMulti rather than Send).
    all_sent: HashMap<u64, (UserId, UserId, bool)>,
    /// Every message acknowledged: (from_user, client_msg_id).
    acked_all: BTreeSet<(UserId, u64)>,
    /// Messages some attempt of which was refused as stale (retried later, so out of order).
    refused: HashSet<u64>,
    /// The durable key of each device, from the Account/Device/DeviceRemoved records in log
    /// order: (user, device) -> (static key, list version of its record).
    key_of: HashMap<(UserId, u16), ([u8; 32], u32)>,
    /// Durable copies of each message: (from_user, cmid) -> (shard, seq) -> (to, the key `to`
    /// had when the copy became durable, server_ts).
    copies: HashMap<(UserId, u64), Copies>,
    /// Devices (with the key they had) whose removal is durable: none may get a Deliver.
    /// (A companion whose link answers were lost can be linked twice, as two ids with one key.)
    removed_keys: HashSet<(UserId, u16, [u8; 32])>,
    /// The devices (with their keys) someone asked to remove.
    unlinking: HashSet<(UserId, u16, [u8; 32])>,
    /// (shard, seq) of every durable message record -> (to, the key `to` had then).
    seq_to: HashMap<(ShardId, u64), (DeviceAddr, [u8; 32])>,
    /// The key each connection was opened with.
    conn_keys: HashMap<ConnId, [u8; 32]>,
    /// Link approvals in flight: (primary, request_id) -> companion.
    approvals: HashMap<(usize, u64), usize>,
    /// No new links once the system heals.
    healing: bool,
    /// The checks that once failed (always on now): a retry of an acknowledged SendMulti that
    /// was stored without sync copies, after the sender linked a device, is answered with the
    /// original time; a message some of whose copies a crash kept (a torn tail) still reaches
    /// every device.
    strict: bool,
    /// The highest list version of any Device record seen per device (a crash replays the
    /// log: an old record seen again is no new link).
    versions_seen: HashMap<(UserId, u16), u32>,
    /// When each message was first sent.
    first_sent_at: HashMap<u64, u64>,
    /// Messages some of whose copies (appended together) a crash kept and some it lost.
    partial: HashSet<(UserId, u64)>,
    links_done: u64,
    unlinks_done: u64,
    multi_acked: u64,
}

/// The durable copies of one message: (shard, seq) -> (to, its key then, server_ts).
type Copies = BTreeMap<(ShardId, u64), (DeviceAddr, [u8; 32], u64)>;

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
    links: u64,
    links_refused: u64,
    unlinks: u64,
    sends_multi: u64,
    sends_stale: u64,
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
        self.links += s.links;
        self.links_refused += s.links_refused;
        self.unlinks += s.unlinks;
        self.sends_multi += s.sends_multi;
        self.sends_stale += s.sends_stale;
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
        self.links += o.links;
        self.links_refused += o.links_refused;
        self.unlinks += o.unlinks;
        self.sends_multi += o.sends_multi;
        self.sends_stale += o.sends_stale;
        self.prekeys_consumed += o.prekeys_consumed;
        self.bundles_without_one_time += o.bundles_without_one_time;
        self.records_read += o.records_read;
        self.record_read_failures += o.record_read_failures;
    }
}

/// A companion's identity: a real key pair where clients use the prekey directory (it uploads
/// prekeys signed by it); elsewhere only its public keys matter (the primary signs them, the
/// server compares them), and random bytes spare the slow key generation of debug builds.
fn companion_identity(
    rng: &mut StdRng,
    seed: u64,
) -> (Option<IdentityKeyPair>, ([u8; 32], [u8; 32])) {
    if prekeys_seed(seed) {
        let id = IdentityKeyPair::generate(rng);
        let p = id.public();
        (Some(id), (p.dh, p.sign))
    } else {
        let (mut dh, mut sign) = ([0u8; 32], [0u8; 32]);
        rng.fill(&mut dh[..]);
        rng.fill(&mut sign[..]);
        (None, (dh, sign))
    }
}

/// Whether users link companion devices in this seed (a third of the runs without the prekey
/// directory, a fifth of those with it).
fn companions_seed(seed: u64) -> bool {
    seed % 3 == 1 || seed.is_multiple_of(15)
}

/// Whether clients use the prekey directory in this seed (a third: Ed25519 is slow in debug
/// builds).
fn prekeys_seed(seed: u64) -> bool {
    matches!(seed % 3, 0)
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
        let mut clients: Vec<Client> = (0..n_clients)
            .map(|i| {
                let mut key = [0u8; 32];
                rng.fill(&mut key[..]);
                Client::new(i, 14_155_550_000 + i as u64 * 7_919, None, key, None)
            })
            .collect();
        // In some runs some users get 1-3 companion devices, which link during the run (a
        // link signs and verifies Ed25519, slow in debug builds: not in every run).
        let companions = companions_seed(seed);
        for owner in 0..n_clients {
            if !companions || rng.gen_bool(0.7) {
                continue;
            }
            for _ in 0..rng.gen_range(1..=3) {
                let mut key = [0u8; 32];
                rng.fill(&mut key[..]);
                let user = clients[owner].user;
                let ci = clients.len();
                let (identity, id_pub) = companion_identity(&mut rng, seed);
                let mut c = Client::new(ci, user, Some(owner), key, identity);
                c.id_pub = id_pub;
                clients.push(c);
            }
        }
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
            prekeys: prekeys_seed(seed),
            all_sent: HashMap::new(),
            acked_all: BTreeSet::new(),
            refused: HashSet::new(),
            key_of: HashMap::new(),
            copies: HashMap::new(),
            removed_keys: HashSet::new(),
            unlinking: HashSet::new(),
            seq_to: HashMap::new(),
            conn_keys: HashMap::new(),
            approvals: HashMap::new(),
            healing: false,
            strict: true,
            partial: HashSet::new(),
            first_sent_at: HashMap::new(),
            versions_seen: HashMap::new(),
            links_done: 0,
            unlinks_done: 0,
            multi_acked: 0,
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
                            if let Some(key) = self.conn_keys.get(&conn) {
                                let (to, to_key) = self.seq_to[&(s, seq)];
                                assert_eq!(
                                    &to_key, key,
                                    "Deliver of seq {seq} (stored for {to:?}) to connection \
                                     {conn} of another device (or incarnation)"
                                );
                                assert!(
                                    !self.removed_keys.contains(&(to.user, to.device, *key)),
                                    "Deliver of seq {seq} to {to:?} after its removal was durable"
                                );
                            }
                        }
                        if let Frame::Error(frame::Error { code, ref_id, .. }) = frame {
                            if code == ErrorCode::DeviceListStale as u16 {
                                // Retried later (if the client hears it), so out of order.
                                self.refused.insert(ref_id);
                            }
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
                                // restarted, or (a companion) because someone removed it;
                                // anything else (UnknownKey, Replaced, ...) is a bug.
                                let removed = matches!(
                                    code,
                                    ErrorCode::DeviceRemoved | ErrorCode::UnknownKey
                                ) && c.owner.is_some()
                                    && self.unlinking.contains(&(c.user, c.device, c.key));
                                assert!(
                                    code == ErrorCode::Internal || removed,
                                    "client {} device {} closed: {code:?} {text}",
                                    c.user,
                                    c.device
                                );
                                c.reset_conn();
                                if removed {
                                    self.reincarnate(ci);
                                }
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
                        if let MeshMsg::SendResult(r) = &msg {
                            if r.result == Err(ErrorCode::DeviceListStale) {
                                // Refused where it was checked, whether or not the client
                                // hears it (a crash may eat the answer): retried later.
                                self.refused.insert(r.client_msg_id);
                            }
                        }
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
                    // The simulation sends no media frames.
                    Action::MediaAcl { .. } | Action::MediaDelete { .. } => {}
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

    /// Records that are durable now, in log order: a seq must never come back with other
    /// content; the device records give each device's key (and its incarnation), which every
    /// message record is stored for.
    fn note_durable(&mut self, s: ShardId, records: &[Record]) {
        for r in records.iter().map(plain) {
            match r {
                Record::Account {
                    user,
                    device,
                    static_key,
                    ..
                } => {
                    self.key_of.insert((user, device), (static_key, 0));
                }
                Record::Device {
                    user,
                    device,
                    version,
                    static_key,
                    ..
                } => {
                    let prev = self.key_of.get(&(user, device)).map(|&(_, v)| v);
                    let seen = self.versions_seen.entry((user, device)).or_default();
                    if version > *seen {
                        *seen = version;
                        // A new link (not a compaction copy): the same companion may be linked
                        // again as an id it had before (its answers were lost, the duplicate
                        // was removed).
                        self.removed_keys.remove(&(user, device, static_key));
                        self.unlinking.remove(&(user, device, static_key));
                    }
                    if prev.is_none_or(|v| version >= v) {
                        self.key_of.insert((user, device), (static_key, version));
                        let now = self.now;
                        if let Some(c) = self.clients.iter_mut().find(|c| c.key == static_key) {
                            c.linked_at.get_or_insert(now);
                        }
                    }
                }
                Record::DeviceRemoved {
                    user,
                    device,
                    version,
                    ..
                } => {
                    // A removal older than the device's record (a copy) removes nothing.
                    if let Some(&(key, v)) = self.key_of.get(&(user, device)) {
                        if version > v {
                            self.key_of.remove(&(user, device));
                            self.removed_keys.insert((user, device, key));
                        }
                    }
                }
                Record::Message {
                    seq,
                    to,
                    message:
                        Message {
                            from:
                                DeviceAddr {
                                    user: from_user, ..
                                },
                            client_msg_id,
                            server_ts_ms,
                            ..
                        },
                } => {
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
                    if prev.is_none() {
                        let Some(&(key, _)) = self.key_of.get(&(to.user, to.device)) else {
                            panic!(
                                "message {client_msg_id} stored for {to:?}, which is not linked"
                            );
                        };
                        self.seq_to.insert((s, seq), (to, key));
                        self.copies
                            .entry((from_user, client_msg_id))
                            .or_default()
                            .insert((s, seq), (to, key, server_ts_ms));
                    }
                }
                _ => {}
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
        let mut pending_copies: HashMap<(UserId, u64), Vec<u64>> = HashMap::new();
        for r in self.nodes[usize::from(s)].journal.pending_records() {
            if let Record::Message { seq, message, .. } = plain(&r) {
                self.appended_msgs.entry(s).or_default().insert(seq);
                pending_copies
                    .entry((message.from.user, message.client_msg_id))
                    .or_default()
                    .push(seq);
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
        // A tail cut inside the copies of one message keeps some of them (see `strict`).
        let kept: HashSet<u64> = recovered
            .iter()
            .filter_map(|r| match plain(r) {
                Record::Message { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        for (msg, seqs) in pending_copies {
            let n = seqs.iter().filter(|s| kept.contains(s)).count();
            if n > 0 && n < seqs.len() {
                self.log(|| format!("copies of {msg:?} partly kept by the crash"));
                self.partial.insert(msg);
            }
        }
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
        self.conn_keys.insert(conn, key);
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
        } else if self.clients[ci].owner.is_some() {
            self.request_link(ci);
        } else {
            self.request_code(ci);
        }
    }

    /// Whether `ci`'s account has companion devices in this run (they need the primary's
    /// published identity, so those accounts always use the prekey directory).
    fn has_companions(&self, ci: usize) -> bool {
        let owner = self.clients[ci].owner.unwrap_or(ci);
        self.clients.iter().any(|c| c.owner == Some(owner))
    }

    /// A new device asks for a link code (on whatever shard it connected to).
    fn request_link(&mut self, ci: usize) {
        self.clients[ci].stage = Stage::AwaitLinkCode { since: self.now };
        let c = &mut self.clients[ci];
        let request_id = c.next_request;
        c.next_request += 1;
        self.client_frame(ci, Frame::LinkRequest(frame::LinkRequest { request_id }));
    }

    /// The primary approves the next code a companion shows it (signing the companion's
    /// identity), once its own identity is durably published.
    fn approve_link(&mut self, ci: usize) {
        if !self.clients[ci].identity_confirmed {
            return self.upload_prekeys(ci);
        }
        let Some(j) = self.clients[ci].to_approve.pop() else {
            return;
        };
        let Stage::AwaitLinked { code, .. } = self.clients[j].stage else {
            return;
        };
        let Some(primary) = &self.clients[ci].identity else {
            return;
        };
        let (dh, sign) = self.clients[j].id_pub;
        let user = self.clients[ci].user;
        let signature = sign_device(primary, user, &dh, &sign);
        let static_key = self.clients[j].key;
        let c = &mut self.clients[ci];
        let request_id = c.next_request;
        c.next_request += 1;
        self.approvals.insert((ci, request_id), j);
        self.log(|| format!("client {ci} approves client {j} code {code:x}"));
        self.client_frame(
            ci,
            Frame::LinkApprove(frame::LinkApprove {
                request_id,
                code,
                keys: Box::new(frame::LinkKeys {
                    static_key,
                    identity_dh: dh,
                    identity_sign: sign,
                    signature,
                }),
            }),
        );
    }

    /// Companion `j` learns it is device `device` (from Registered, or from its primary: the
    /// DeviceLinked answer or a list naming its identity) and logs in.
    fn assign(&mut self, j: usize, device: u16) {
        let c = &mut self.clients[j];
        if c.registered {
            return;
        }
        c.registered = true;
        c.device = device;
        self.links_done += 1;
        self.log(|| format!("client {j} is device {device}"));
        if self.clients[j].conn.is_some()
            && !matches!(
                self.clients[j].stage,
                Stage::LoggingIn { .. } | Stage::LoggedIn
            )
        {
            self.login(j);
        }
    }

    /// Asks to remove `device` of `ci`'s account (the primary any companion, a companion
    /// itself).
    /// (`again`: also when asked before; the removal may have been lost in a crash.)
    fn unlink(&mut self, ci: usize, device: u16, again: bool) {
        let user = self.clients[ci].user;
        let Some(&(key, _)) = self.key_of.get(&(user, device)) else {
            return;
        };
        if device == 0 || (!self.unlinking.insert((user, device, key)) && !again) {
            return;
        }
        let c = &mut self.clients[ci];
        let request_id = c.next_request;
        c.next_request += 1;
        self.unlinks_done += 1;
        self.log(|| format!("client {ci} unlinks device {device} of {user}"));
        self.client_frame(ci, Frame::Unlink(frame::Unlink { request_id, device }));
    }

    /// The primary removes a random companion; a companion removes itself.
    fn unlink_some(&mut self, ci: usize) {
        let c = &self.clients[ci];
        if c.owner.is_some() {
            return self.unlink(ci, c.device, false);
        }
        let linked: Vec<u16> = self
            .clients
            .iter()
            .filter(|d| d.owner == Some(ci) && d.registered)
            .map(|d| d.device)
            .collect();
        if !linked.is_empty() {
            let d = linked[self.rng.gen_range(0..linked.len())];
            self.unlink(ci, d, false);
        }
    }

    /// The primary reads its own list: a device naming the identity of a companion that does
    /// not know its id yet is that companion; a device nobody holds (a link whose answers were
    /// lost and that was made again) is removed.
    fn reconcile(&mut self, ci: usize, entries: &[frame::DeviceEntry]) {
        if self.clients[ci].owner.is_some() {
            return;
        }
        for e in entries.iter().filter(|e| e.device != 0) {
            let holder = (0..self.clients.len()).find(|&j| {
                self.clients[j].owner == Some(ci) && self.clients[j].id_pub.1 == e.identity_sign
            });
            match holder {
                Some(j) if self.clients[j].registered && self.clients[j].device == e.device => {}
                Some(j) if !self.clients[j].registered => self.assign(j, e.device),
                _ => self.unlink(ci, e.device, true),
            }
        }
    }

    /// A removed companion starts over as a new device: fresh keys, nothing of the old one.
    fn reincarnate(&mut self, ci: usize) {
        let mut key = [0u8; 32];
        self.rng.fill(&mut key[..]);
        let (identity, id_pub) = companion_identity(&mut self.rng, self.seed);
        self.log(|| format!("client {ci} was removed; starts over"));
        // Answers to approvals of the old device are not about this one.
        self.approvals.retain(|_, j| *j != ci);
        for c in &mut self.clients {
            c.to_approve.retain(|&j| j != ci);
        }
        let c = &mut self.clients[ci];
        c.key = key;
        c.identity = identity;
        c.id_pub = id_pub;
        // Most removed devices stay away (a link is slow to simulate: Ed25519 in debug).
        c.retired = self.rng.gen_ratio(2, 3);
        c.registered = false;
        c.device = 0;
        c.inbox.clear();
        c.unacked.clear();
        c.acked.clear();
        c.ack_ts.clear();
        c.expect_ts.clear();
        c.received.clear();
        c.seen.clear();
        c.readable.clear();
        c.keys = None;
        c.next_otk = 1;
        c.views.clear();
        c.linked_at = None;
        c.reset_conn();
    }

    fn login(&mut self, ci: usize) {
        self.clients[ci].stage = Stage::LoggingIn { since: self.now };
        let addr = self.clients[ci].addr();
        let prekeys = self.prekeys;
        self.client_frame(
            ci,
            Frame::Login(frame::Login {
                addr,
                revision: 2,
                capabilities: if prekeys {
                    capability::MESSAGING | capability::PREKEYS | capability::MULTI_DEVICE
                } else {
                    capability::MESSAGING | capability::MULTI_DEVICE
                },
            }),
        );
    }

    /// Uploads a few fresh one-time prekeys (sometimes under a new identity first).
    fn upload_prekeys(&mut self, ci: usize) {
        if self.clients[ci].stage != Stage::LoggedIn || self.clients[ci].upload_in_flight {
            return;
        }
        // (A companion keeps the identity its primary signed.)
        let primary = self.clients[ci].owner.is_none();
        if self.clients[ci].identity.is_none() || (primary && self.rng.gen_ratio(1, 40)) {
            let c = &mut self.clients[ci];
            c.identity = Some(IdentityKeyPair::generate(&mut self.rng));
            c.keys = None;
            c.next_otk = 1;
            c.identity_confirmed = false;
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
        if !self.prekeys {
            // Without PREKEYS no UPLOADED comes: take it as published (a LinkSignatureInvalid
            // says otherwise and makes it publish again).
            c.upload_in_flight = false;
            c.identity_confirmed = true;
        }
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
        // A SendMulti stored without sync copies (the sender had no other device then) gets
        // them stored now, and a new time, if the sender has other devices now (see
        // `strict`): only checked in strict runs.
        let own_now = self.clients[ci].view(from).len() > 1;
        for (cmid, to) in remembered {
            let multi = self.all_sent[&cmid].2;
            let c = &mut self.clients[ci];
            c.unacked.insert(cmid, to);
            if let Some(&ts) = c.ack_ts.get(&cmid) {
                if self.strict || !multi || !own_now {
                    c.expect_ts.insert(cmid, ts);
                }
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

    /// Client `ci` sends message `cmid` to `to` (a first send or a retry: same payload, same
    /// form): a `Send` to device 0, or a `SendMulti` to the devices it believes `to` and its
    /// own account have.
    fn send_as(&mut self, ci: usize, cmid: u64, to: UserId, msg_type: u8) {
        let from = self.clients[ci].user;
        if self.all_sent.get(&cmid).is_some_and(|m| m.2) {
            return self.send_multi(ci, cmid, to, msg_type);
        }
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

    fn send_multi(&mut self, ci: usize, cmid: u64, to: UserId, msg_type: u8) {
        let c = &self.clients[ci];
        let me = c.addr();
        let own: Vec<u16> = c
            .view(me.user)
            .into_iter()
            .filter(|&d| d != me.device)
            .collect();
        let body = payload(me.user, cmid);
        let copy = |own: bool, device: u16| DeviceCopy {
            own,
            device,
            payload: body.clone(),
        };
        let copies: Vec<DeviceCopy> = if to == me.user {
            own.iter().map(|&d| copy(false, d)).collect()
        } else {
            let theirs = c.view(to).into_iter().map(|d| copy(false, d));
            theirs.chain(own.iter().map(|&d| copy(true, d))).collect()
        };
        if copies.is_empty() {
            // A note to self with no other device left: nothing to send (the wire needs a
            // copy).
            self.clients[ci].unacked.remove(&cmid);
            return;
        }
        self.client_frame(
            ci,
            Frame::SendMulti(frame::SendMulti {
                client_msg_id: cmid,
                to_user: to,
                msg_type: MsgType(msg_type),
                copies,
            }),
        );
    }

    fn send_new(&mut self, ci: usize) {
        let peers: Vec<UserId> = self
            .clients
            .iter()
            .filter(|c| c.registered && c.owner.is_none())
            .map(|c| c.user)
            .collect();
        if peers.is_empty() {
            return;
        }
        let mut to = peers[self.rng.gen_range(0..peers.len())];
        let multi = self.rng.gen_bool(0.6);
        let me = self.clients[ci].addr();
        if multi && self.clients[ci].view(me.user).len() > 1 && self.rng.gen_ratio(1, 8) {
            to = me.user;
        }
        let c = &mut self.clients[ci];
        let cmid = c.next_cmid;
        c.next_cmid += 1;
        c.sent.insert(cmid, to);
        c.unacked.insert(cmid, to);
        self.all_sent.insert(cmid, (me.user, to, multi));
        self.first_sent_at.insert(cmid, self.now);
        let msg_type = self.rng.gen_range(0..5);
        self.send_as(ci, cmid, to, msg_type);
    }

    fn fetch_list(&mut self, ci: usize, user: UserId) {
        let c = &mut self.clients[ci];
        let request_id = c.next_request;
        c.next_request += 1;
        self.client_frame(
            ci,
            Frame::DeviceListFetch(frame::DeviceListFetch { request_id, user }),
        );
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
                    to: Address::device(from.user, from.device),
                    client_msg_id: cmid,
                }),
            );
        }
    }

    fn check_timeout(&mut self, ci: usize) {
        let since = match self.clients[ci].stage {
            Stage::AwaitCode { since }
            | Stage::AwaitRegistered { since }
            | Stage::LoggingIn { since }
            | Stage::AwaitLinkCode { since } => since,
            // The primary has to come by and approve.
            Stage::AwaitLinked { since, .. } => since.saturating_add(4 * CLIENT_TIMEOUT_MS),
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
                assert_eq!(user, me);
                if self.clients[ci].owner.is_none() {
                    assert_eq!(device, 0);
                    self.clients[ci].registered = true;
                    self.login(ci);
                } else {
                    assert_ne!(device, 0);
                    // (Already known from the primary, or a second link of the same device,
                    // which the primary removes.)
                    self.assign(ci, device);
                }
            }
            Frame::LinkCode(frame::LinkCode { code, .. }) => {
                let c = &mut self.clients[ci];
                if !matches!(c.stage, Stage::AwaitLinkCode { .. }) || c.registered {
                    return;
                }
                c.stage = Stage::AwaitLinked {
                    since: self.now,
                    code,
                };
                let owner = c.owner.expect("a companion");
                self.clients[owner].to_approve.push(ci);
            }
            Frame::DeviceLinked(frame::DeviceLinked { request_id, addr }) => {
                assert_eq!(addr.user, me);
                let Some(j) = self.approvals.remove(&(ci, request_id)) else {
                    return;
                };
                if !self.clients[j].registered {
                    self.assign(j, addr.device);
                } else if self.clients[j].device != addr.device {
                    self.unlink(ci, addr.device, false);
                }
            }
            Frame::DeviceList(frame::DeviceList {
                user, ref devices, ..
            }) => {
                let ids = devices.iter().map(|d| d.device).collect();
                self.clients[ci].views.insert(user, ids);
                if user == me {
                    let devices = devices.clone();
                    self.reconcile(ci, &devices);
                }
            }
            Frame::DeviceUnlinked(_) => {}
            Frame::Welcome(frame::Welcome { addr, .. }) => {
                assert_eq!(addr, self.clients[ci].addr());
                assert!(
                    matches!(self.clients[ci].stage, Stage::LoggingIn { .. }),
                    "Welcome in {:?}",
                    self.clients[ci].stage
                );
                self.clients[ci].stage = Stage::LoggedIn;
                if self.has_companions(ci) {
                    self.fetch_list(ci, me);
                }
                // Resend everything unacknowledged, in send order, same ids.
                let retry: Vec<(u64, UserId)> = self.clients[ci]
                    .unacked
                    .iter()
                    .map(|(&k, &v)| (k, v))
                    .collect();
                for (cmid, to) in retry {
                    self.send_as(ci, cmid, to, (cmid % 5) as u8);
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
                    if self.all_sent[&client_msg_id].2 {
                        self.multi_acked += 1;
                    }
                }
                self.acked_all.insert((me, client_msg_id));
            }
            Frame::Deliver(frame::Deliver {
                seq,
                message:
                    Message {
                        from,
                        client_msg_id,
                        ..
                    },
            }) => {
                let sender = (client_msg_id >> 32) as usize;
                let sent = self.all_sent.get(&client_msg_id).copied();
                let Some((from_user, to_user, multi)) = sent else {
                    panic!("Deliver of a message never sent: {from:?} {client_msg_id}");
                };
                assert_eq!(from.user, from_user, "Deliver with another sender");
                if from.user != me || !multi {
                    assert_eq!(to_user, me, "Deliver of a message not sent to {me}");
                } else {
                    assert_ne!(sender, ci, "a device got its own SendMulti back");
                }
                let c = &mut self.clients[ci];
                if c.seen.insert((from.user, client_msg_id)) {
                    c.received.entry(sender).or_default().push(client_msg_id);
                    if from.user != me {
                        c.readable.push((from, client_msg_id));
                    }
                }
                c.pending_acks.push(seq);
            }
            Frame::Receipt(frame::Receipt {
                seq,
                receipt:
                    ReceiptInfo {
                        from,
                        client_msg_id,
                        kind,
                        ..
                    },
            }) => {
                let sent = self.all_sent.get(&client_msg_id).copied();
                let Some((from_user, to_user, _)) = sent else {
                    panic!("receipt for a message never sent: {client_msg_id}");
                };
                if kind == ReceiptKind::READ_ELSEWHERE {
                    assert_eq!(
                        (to_user, from.user),
                        (me, from_user),
                        "READ_ELSEWHERE for a message not sent to {me}"
                    );
                } else {
                    assert_eq!(
                        (from_user, from.user),
                        (me, to_user),
                        "receipt for a message {me} did not send to {}",
                        from.user
                    );
                    assert!(
                        kind != ReceiptKind::DELIVERED
                            || from.user != me
                            || from == self.clients[ci].addr(),
                        "a DELIVERED receipt for a sync copy"
                    );
                }
                self.clients[ci].pending_acks.push(seq);
            }
            Frame::Pong { .. } => {}
            Frame::PrekeyStatus(frame::PrekeyStatus { reason, .. }) => match reason {
                PrekeyStatusReason::UPLOADED => {
                    let c = &mut self.clients[ci];
                    c.upload_in_flight = false;
                    c.identity_confirmed = true;
                }
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
                    // The list changed under the send: retry it (same id) with the list the
                    // server sent just before.
                    Some(ErrorCode::DeviceListStale) => {
                        self.refused.insert(ref_id);
                        if let Some(&to) = self.clients[ci].unacked.get(&ref_id) {
                            self.send_as(ci, ref_id, to, (ref_id % 5) as u8);
                        }
                    }
                    // A link that did not happen: the new device starts over later (a
                    // restarted shard forgot the code, the primary's identity is not
                    // published yet, the account is full).
                    Some(
                        ErrorCode::LinkCodeUnknown
                        | ErrorCode::LinkCodeExpired
                        | ErrorCode::LinkCodeUsed
                        | ErrorCode::LinkSignatureInvalid
                        | ErrorCode::DeviceLimit,
                    ) if ref_id >= FIRST_REQUEST_ID => {
                        if code == Some(ErrorCode::LinkSignatureInvalid) {
                            self.clients[ci].identity_confirmed = false;
                        }
                        // (Not known any more: the approval was for a device since removed.)
                        if let Some(j) = self.approvals.remove(&(ci, ref_id)) {
                            if !self.clients[j].registered
                                && matches!(self.clients[j].stage, Stage::AwaitLinked { .. })
                            {
                                self.disconnect(j);
                            }
                        }
                    }
                    // An unlink racing another (or a removal lost in a crash, retried).
                    Some(ErrorCode::NoSuchDevice) if ref_id >= FIRST_REQUEST_ID => {}
                    // An upload from a companion being removed (gone in memory, its close
                    // waits for the removal record).
                    Some(ErrorCode::IdentityMismatch)
                        if self.unlinking.contains(&(
                            me,
                            self.clients[ci].device,
                            self.clients[ci].key,
                        )) =>
                    {
                        self.clients[ci].upload_in_flight = false;
                    }
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
            // A companion not linked (yet, or again) starts linking now and then, once its
            // primary has an account.
            if let Some(owner) = self.clients[ci].owner {
                if !self.clients[ci].registered
                    && (self.healing
                        || self.clients[ci].retired
                        || !self.clients[owner].registered
                        || !self.rng.gen_ratio(1, 4))
                {
                    return;
                }
            }
            return self.connect(ci);
        }
        if !self.clients[ci].inbox.is_empty() && self.rng.gen_bool(0.6) {
            return self.process_one(ci);
        }
        let logged_in = self.clients[ci].stage == Stage::LoggedIn;
        if logged_in && !self.clients[ci].to_approve.is_empty() && self.rng.gen_bool(0.5) {
            return self.approve_link(ci);
        }
        match self.rng.gen_range(0..114) {
            110 if logged_in => self.unlink_some(ci),
            111..=112 if logged_in => {
                let users: Vec<UserId> = self
                    .clients
                    .iter()
                    .filter(|c| c.registered && c.owner.is_none())
                    .map(|c| c.user)
                    .collect();
                let user = users[self.rng.gen_range(0..users.len())];
                self.fetch_list(ci, user);
            }
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
                if !c.active() {
                    // A companion that is not linked stays away.
                    return c.owner.is_some() && c.conn.is_none() && c.inbox.is_empty();
                }
                c.stage == Stage::LoggedIn
                    && c.unacked.is_empty()
                    && c.inbox.is_empty()
                    && c.pending_acks.is_empty()
            })
    }

    /// No more faults: everyone reconnects, every queue drains.
    fn heal(&mut self) {
        // No new links: companions still linking give up (a link already claimed completes,
        // and its primary tells the companion when it sees its list).
        self.healing = true;
        for ci in 0..self.clients.len() {
            self.clients[ci].to_approve.clear();
            if self.clients[ci].owner.is_some() && !self.clients[ci].registered {
                self.disconnect(ci);
            }
        }
        for round in 0..2_000 {
            self.now += 50;
            for ci in 0..self.clients.len() {
                self.check_timeout(ci);
                if self.clients[ci].owner.is_some()
                    && !self.clients[ci].registered
                    && self.clients[ci].conn.is_some()
                {
                    self.disconnect(ci);
                }
                if self.clients[ci].conn.is_none()
                    && (self.clients[ci].registered || self.clients[ci].owner.is_none())
                {
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
            .filter(|c| {
                (c.active() || c.owner.is_none())
                    && !(c.registered && c.stage == Stage::LoggedIn && c.unacked.is_empty())
            })
            .map(|c| {
                format!(
                    "{}/{}: {:?} registered={} unacked={:?}",
                    c.user, c.device, c.stage, c.registered, c.unacked
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

    /// The end-to-end guarantees, per device.
    fn check(&self) {
        for a in &self.clients {
            assert!(
                !a.active() || a.unacked.is_empty(),
                "{}/{} still has unacknowledged messages",
                a.user,
                a.device
            );
        }
        for &(from_user, cmid) in &self.acked_all {
            let copies = self.copies.get(&(from_user, cmid)).unwrap_or_else(|| {
                panic!("message {cmid} from {from_user} acknowledged, never stored")
            });
            // Every device a copy was stored for has it, unless it was removed since.
            for (to, key, _) in copies.values() {
                let holder = self
                    .clients
                    .iter()
                    .find(|c| c.key == *key && c.addr() == *to && c.active());
                if let Some(b) = holder {
                    assert!(
                        b.seen.contains(&(from_user, cmid)),
                        "message {cmid} from {from_user} was acknowledged and stored for {to:?} \
                         but never delivered"
                    );
                }
            }
            // A SendMulti was stored for every device linked before it (the recipient's, and
            // the sender's other devices), still linked now: no device silently skipped.
            let (_, to_user, multi) = self.all_sent[&cmid];
            // Known bug (checked in strict runs): a crash that keeps some copies of a
            // message makes the retry a duplicate, and the lost copies are never stored.
            if !multi || (!self.strict && self.partial.contains(&(from_user, cmid))) {
                continue;
            }
            let sender = (cmid >> 32) as usize;
            let first_ts = copies.values().map(|c| c.2).min().unwrap_or(0);
            let mut groups = vec![to_user];
            if from_user != to_user {
                groups.push(from_user);
            }
            for user in groups {
                let stored: BTreeSet<[u8; 32]> = copies
                    .values()
                    .filter(|c| c.0.user == user)
                    .map(|c| c.1)
                    .collect();
                // No copy at all for the group: the sender's shard checked its devices when
                // the first attempt was sent at the latest.
                let ts = copies
                    .values()
                    .filter(|c| c.0.user == user)
                    .map(|c| c.2)
                    .min()
                    .unwrap_or_else(|| self.first_sent_at[&cmid].min(first_ts));
                for (ci, c) in self.clients.iter().enumerate() {
                    let before = c.owner.is_none() || c.linked_at.is_some_and(|t| t < ts);
                    if c.user == user && c.active() && ci != sender && before {
                        assert!(
                            stored.contains(&c.key),
                            "message {cmid} from {from_user} to {to_user} (stored at {ts}) has \
                             no copy for {user}/{}, linked at {:?}; copies {:?}",
                            c.device,
                            c.linked_at,
                            copies
                                .iter()
                                .map(|(k, v)| (k, v.0, v.2))
                                .collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
        // Per sending device, what each device got from other accounts came in send order
        // (sends refused as stale are retried later, so they are left out).
        for b in self.clients.iter().filter(|c| c.active()) {
            for (from, ids) in &b.received {
                let ids: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| !self.refused.contains(id) && self.all_sent[id].0 != b.user)
                    .collect();
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "order broken from client {from} to {}/{}: {ids:?}",
                    b.user,
                    b.device
                );
            }
        }
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
            if !self.clients[ci].active() {
                continue;
            }
            self.connect(ci);
            while !self.clients[ci].inbox.is_empty() {
                self.process_one(ci);
            }
            assert_eq!(
                self.clients[ci].stage,
                Stage::LoggedIn,
                "client {} device {} cannot log in after restart",
                self.clients[ci].user,
                self.clients[ci].device
            );
        }
        // No one-time prekey that was handed out is still stored; every stored one was
        // uploaded by its owner under the identity the directory names.
        for c in self.clients.iter().filter(|c| c.owner.is_none()) {
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
    run_seed_with(seed, false)
}

fn run_seed_with(seed: u64, strict: bool) -> (Coverage, String) {
    let mut sim = Sim::new(seed);
    sim.strict |= strict;
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
        if sim.clients[ci].active() {
            sim.retry_latest_acked(ci, 32);
        }
    }
    // Answered before any new message is stored (a new store could evict one on the way).
    sim.heal();
    // Traffic after the restart: new seqs must not collide with any seq ever made durable.
    for ci in 0..sim.clients.len() {
        if sim.clients[ci].active() {
            sim.send_new(ci);
        }
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
        // Devices were linked and removed, SendMulti fanned out and was refused as stale.
        assert!(
            total.links > 0 && total.unlinks > 0 && total.sends_multi > 0 && total.sends_stale > 0,
            "{total:?}"
        );
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
        Action::MediaAcl {
            blobs,
            users,
            expires_at_ms,
        } => {
            h.update(b"A");
            blobs.iter().for_each(|b| h.update(b));
            users.iter().for_each(|u| h.update(u.to_le_bytes()));
            h.update(expires_at_ms.to_le_bytes());
        }
        Action::MediaDelete { blobs } => {
            h.update(b"D");
            blobs.iter().for_each(|b| h.update(b));
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

/// A record with a `MessageCopy` seen as the `Message` it stores (the checks here are per copy).
fn plain(r: &Record) -> Record {
    match r {
        Record::MessageCopy {
            seq, to, message, ..
        } => Record::Message {
            seq: *seq,
            to: *to,
            message: message.clone(),
        },
        other => other.clone(),
    }
}

// ----- groups ------------------------------------------------------------------------------

/// A seeded simulation of one group over three shards (separate from the main simulation, so
/// its trace fingerprints stay what they were): members on every shard send group messages
/// and retry unacknowledged ones after reconnecting, the admin adds and removes members,
/// clients ack late or never and drop their connections, while the scheduler interleaves
/// per-link FIFO mesh deliveries, group commits, ticks (re-drive timers) and shard crashes that
/// lose, tear or flip unsynced log bytes. Segments are small, so compaction and deletion run.
/// After healing it checks the group invariants:
///
/// * every ✓'d group message was durable on the group's home when acknowledged, and reached
///   every member device of the group's state at its place in the order (the sending device
///   excepted), exactly once after dedup by `(group, gseq)`;
/// * every device saw the group's messages and events in increasing `gseq` (first copies);
/// * no device got a message or event of a state it was not a member of (a removed member
///   gets its removal and nothing after it until added again).
mod group_sim {
    use super::common::{key, user_on, Cluster};
    use super::*;
    use protocol::group::{GroupBody, GroupEnvelope, GroupId, GroupOp, UserList};
    use switchboard_shards::home_shard;

    const SHARDS: u16 = 3;
    const USERS: usize = 7;
    const CAPS: u64 = capability::MESSAGING | capability::MULTI_DEVICE | capability::GROUPS;

    struct GUser {
        id: UserId,
        conn: Option<ConnId>,
        /// Sends not acknowledged yet, by client_msg_id (resent after a reconnect).
        outbox: BTreeMap<u64, Bytes>,
        /// Deliveries not acked yet.
        unacked: Vec<u64>,
    }

    struct GSim {
        c: Cluster,
        rng: StdRng,
        users: Vec<GUser>,
        group: GroupId,
        next_id: u64,
        /// Acknowledged sends: (sender, client_msg_id).
        acked: BTreeSet<(UserId, u64)>,
        /// Durable records seen on the group's home: states by version, messages by
        /// (from user, client_msg_id) -> (gseq, version), and the state version of each gseq.
        states: BTreeMap<u32, BTreeSet<UserId>>,
        removed_by: BTreeMap<u64, Vec<UserId>>,
        /// (A retry whose first record is gone from the log is stored again: at least once.)
        messages: BTreeMap<(UserId, u64), BTreeSet<(u64, u32)>>,
        version_of: BTreeMap<u64, u32>,
        /// Per user, every group delivery in arrival order: (gseq, is_message).
        got: BTreeMap<UserId, Vec<(u64, bool)>>,
        crashes: u32,
    }

    impl GSim {
        fn new(seed: u64) -> Self {
            let c = Cluster::with_segments(SHARDS, 24, |cfg| {
                cfg.compaction_live_ratio = 0.5;
                cfg.group_fanout_retry_ms = 2_000;
            });
            let users = (0..USERS)
                .map(|i| GUser {
                    id: user_on((i % usize::from(SHARDS)) as ShardId, SHARDS, i),
                    conn: None,
                    outbox: BTreeMap::new(),
                    unacked: Vec::new(),
                })
                .collect();
            GSim {
                c,
                rng: StdRng::seed_from_u64(seed),
                users,
                group: 0,
                next_id: 1,
                acked: BTreeSet::new(),
                states: BTreeMap::new(),
                removed_by: BTreeMap::new(),
                messages: BTreeMap::new(),
                version_of: BTreeMap::new(),
                got: BTreeMap::new(),
                crashes: 0,
            }
        }

        fn login(&mut self, i: usize) {
            let id = self.users[i].id;
            let (conn, frames) = self.c.login_caps(id, key(id), CAPS);
            self.users[i].conn = Some(conn);
            self.absorb(i, frames);
            // Resend what was not acknowledged, in order, with the same ids.
            let pending: Vec<(u64, Bytes)> = self.users[i]
                .outbox
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (cmid, payload) in pending {
                self.frame(i, group_send(self.group, cmid, payload));
            }
        }

        fn frame(&mut self, i: usize, f: Frame) {
            if let Some(conn) = self.users[i].conn {
                if self.c.conn_shard.contains_key(&conn) {
                    self.c.frame(conn, f);
                }
            }
        }

        fn absorb(&mut self, i: usize, frames: Vec<Frame>) {
            let me = self.users[i].id;
            for f in frames {
                match f {
                    Frame::Deliver(d) => {
                        let env = GroupEnvelope::decode(d.message.msg_type, &d.message.payload)
                            .expect("a group envelope");
                        assert_eq!(env.group, self.group);
                        let is_msg = matches!(env.body, GroupBody::Message(_));
                        self.got.entry(me).or_default().push((env.gseq, is_msg));
                        self.users[i].unacked.push(d.seq);
                    }
                    Frame::ServerAck(a)
                        if self.users[i].outbox.remove(&a.client_msg_id).is_some() =>
                    {
                        self.acked.insert((me, a.client_msg_id));
                    }
                    Frame::GroupInfo(g) if self.group == 0 => self.group = g.group,
                    // A send refused for good (the sender was removed meanwhile) leaves the
                    // outbox unacknowledged; StorageUnavailable does not happen here.
                    Frame::Error(e) => {
                        self.users[i].outbox.remove(&e.ref_id);
                    }
                    _ => {}
                }
            }
        }

        /// Collects every frame sent to the users' connections; notes closed connections.
        fn pump_clients(&mut self) {
            for i in 0..self.users.len() {
                let Some(conn) = self.users[i].conn else {
                    continue;
                };
                let frames = self.c.frames(conn);
                self.absorb(i, frames);
                if self.c.closed(conn).is_some() || !self.c.conn_shard.contains_key(&conn) {
                    self.users[i].conn = None;
                    self.users[i].unacked.clear();
                }
            }
        }

        fn ack(&mut self, i: usize) {
            let seqs = std::mem::take(&mut self.users[i].unacked);
            if !seqs.is_empty() {
                self.frame(i, Frame::Ack(frame::Ack { seqs }));
            }
        }

        /// Notes the durable group records of the group's home (before a crash can lose the
        /// unsynced ones, and before compaction moves them).
        fn note_durable(&mut self) {
            if self.group == 0 {
                return;
            }
            let home = usize::from(home_shard(self.group, SHARDS));
            for a in self.c.journals[home].entries() {
                if !a.durable {
                    continue;
                }
                match a.record {
                    Record::GroupState {
                        version,
                        gseq,
                        op,
                        event_users,
                        members,
                        ..
                    } => {
                        let m: BTreeSet<UserId> = members.iter().map(|&(u, _)| u).collect();
                        self.states.insert(version, m);
                        self.version_of.insert(gseq, version);
                        if op == GroupOp::REMOVE.0 {
                            self.removed_by.insert(gseq, event_users);
                        }
                    }
                    Record::GroupMessage {
                        gseq,
                        version,
                        message,
                        ..
                    } => {
                        let k = (message.from.user, message.client_msg_id);
                        self.messages.entry(k).or_default().insert((gseq, version));
                        self.version_of.insert(gseq, version);
                    }
                    _ => {}
                }
            }
        }

        fn crash(&mut self, s: ShardId) {
            let v = self.rng.gen::<u64>();
            let crashed = self.c.journals[usize::from(s)].crash_random(v);
            let mut shard = Shard::new(
                self.c.configs[usize::from(s)].clone(),
                5_000 + u64::from(self.crashes),
            );
            shard.recover(self.c.now, &crashed.segments, crashed.records);
            self.c.shards[usize::from(s)] = shard;
            self.c.conn_shard.retain(|_, sh| *sh != s);
            self.c.mesh.retain(|(from, to, _)| *from != s && *to != s);
            self.c.reads.clear();
            self.crashes += 1;
            for o in 0..SHARDS {
                if o != s {
                    self.c.event(o, Event::PeerRestarted { shard: s });
                }
            }
        }

        /// Delivers the first message of one random link with traffic (FIFO per link).
        fn deliver_one(&mut self) {
            let links: BTreeSet<(ShardId, ShardId)> =
                self.c.mesh.iter().map(|(f, t, _)| (*f, *t)).collect();
            if links.is_empty() {
                return;
            }
            let pick = self.rng.gen_range(0..links.len());
            let link = *links.iter().nth(pick).unwrap();
            let at = self
                .c
                .mesh
                .iter()
                .position(|(f, t, _)| (*f, *t) == link)
                .unwrap();
            let (from, to, msg) = self.c.mesh.remove(at).unwrap();
            self.c.event(to, Event::Mesh { from, msg });
        }

        fn step(&mut self) {
            let r = self.rng.gen_range(0..100u32);
            let n = self.users.len();
            match r {
                0..=29 => self.deliver_one(),
                30..=39 => {
                    let s = self.rng.gen_range(0..SHARDS);
                    self.note_durable_after(|c| c.commit(s));
                }
                40..=57 => {
                    let i = self.rng.gen_range(0..n);
                    if self.users[i].conn.is_some() {
                        let cmid = self.next_id;
                        self.next_id += 1;
                        let payload = Bytes::from(format!("{i}:{cmid}"));
                        self.users[i].outbox.insert(cmid, payload.clone());
                        self.frame(i, group_send(self.group, cmid, payload));
                    }
                }
                58..=64 => {
                    // The admin (user 0, never removed) adds or removes someone.
                    let j = self.rng.gen_range(1..n);
                    let op = if self.rng.gen_bool(0.5) {
                        GroupOp::ADD
                    } else {
                        GroupOp::REMOVE
                    };
                    let f = Frame::GroupChange(frame::GroupChange {
                        request_id: self.next_id,
                        group: self.group,
                        op,
                        users: UserList::of([self.users[j].id]),
                    });
                    self.next_id += 1;
                    self.frame(0, f);
                }
                65..=74 => {
                    let i = self.rng.gen_range(0..n);
                    self.ack(i);
                }
                75..=80 => {
                    let i = self.rng.gen_range(0..n);
                    match self.users[i].conn.take() {
                        Some(conn) => {
                            self.users[i].unacked.clear();
                            self.c.close_conn(conn);
                        }
                        None => self.login(i),
                    }
                }
                81..=86 => {
                    self.c.now += 700;
                    let s = self.rng.gen_range(0..SHARDS);
                    self.c.tick(s);
                }
                87..=88 => {
                    let s = self.rng.gen_range(0..SHARDS);
                    self.note_durable();
                    self.crash(s);
                }
                _ => {}
            }
            self.pump_clients();
        }

        fn note_durable_after(&mut self, f: impl FnOnce(&mut Cluster)) {
            f(&mut self.c);
            self.note_durable();
        }

        fn heal(&mut self) {
            for round in 0..200 {
                for i in 0..self.users.len() {
                    if self.users[i].conn.is_none() {
                        self.login(i);
                    }
                }
                self.c.run();
                for s in 0..SHARDS {
                    self.c.commit(s);
                }
                self.note_durable();
                self.c.run();
                self.c.now += 2_500;
                for s in 0..SHARDS {
                    self.c.tick(s);
                }
                self.c.run();
                self.pump_clients();
                for i in 0..self.users.len() {
                    self.ack(i);
                }
                let pending: u64 = self
                    .c
                    .shards
                    .iter()
                    .map(|s| s.stats().group_fanouts_pending)
                    .sum();
                let busy = !self.c.mesh.is_empty()
                    || (0..SHARDS).any(|s| self.c.journals[usize::from(s)].pending() > 0)
                    || self
                        .users
                        .iter()
                        .any(|u| !u.outbox.is_empty() || !u.unacked.is_empty());
                if pending == 0 && !busy && round > 2 {
                    return;
                }
            }
            let pending: Vec<u64> = self
                .c
                .shards
                .iter()
                .map(|s| s.stats().group_fanouts_pending)
                .collect();
            let outboxes: Vec<usize> = self.users.iter().map(|u| u.outbox.len()).collect();
            panic!(
                "the group simulation did not settle: pending {pending:?}, mesh {}, outboxes {outboxes:?}",
                self.c.mesh.len()
            );
        }

        fn check(&self) {
            let index = |u: UserId| self.users.iter().position(|x| x.id == u).unwrap();
            for &(from, cmid) in &self.acked {
                let copies = self
                    .messages
                    .get(&(from, cmid))
                    .unwrap_or_else(|| panic!("✓ for ({from}, {cmid}) without a durable record"));
                for &(gseq, version) in copies {
                    let members = &self.states[&version];
                    for &m in members {
                        if m == from {
                            continue;
                        }
                        let n = self
                            .got
                            .get(&m)
                            .map_or(0, |g| g.iter().filter(|d| d.0 == gseq).count());
                        if n == 0 {
                            let home = home_shard(m, SHARDS);
                            let copies: Vec<String> = self.c.journals[usize::from(home)]
                            .entries()
                            .into_iter()
                            .filter(|a| matches!(&a.record, Record::GroupCopy { gseq: g, .. } if *g == gseq))
                            .map(|a| format!("{:?} durable {}", a.record, a.durable))
                            .collect();
                            eprintln!("states {:?}\nversion_of {:?}\ngot {:?}\ncopies on {home}: {copies:?}", self.states, self.version_of, self.got.get(&m));
                        }
                        assert!(
                            n >= 1,
                            "member {} missed gseq {gseq} (from {}, version {version})",
                            index(m),
                            index(from)
                        );
                    }
                }
            }
            for (&u, got) in &self.got {
                // Dedup by gseq (first copies), then increasing.
                let mut seen = BTreeSet::new();
                let firsts: Vec<u64> = got
                    .iter()
                    .filter(|d| seen.insert(d.0))
                    .map(|d| d.0)
                    .collect();
                assert!(
                    firsts.windows(2).all(|w| w[0] < w[1]),
                    "user {} out of order: {firsts:?}",
                    index(u)
                );
                for &(gseq, is_msg) in got {
                    let Some(version) = self.version_of.get(&gseq) else {
                        panic!("user {} got gseq {gseq} that was never durable", index(u));
                    };
                    let member = self.states[version].contains(&u);
                    let removed_now =
                        !is_msg && self.removed_by.get(&gseq).is_some_and(|r| r.contains(&u));
                    assert!(
                        member || removed_now,
                        "user {} got gseq {gseq} of a state it is not in",
                        index(u)
                    );
                }
            }
        }
    }

    fn group_send(group: GroupId, cmid: u64, payload: Bytes) -> Frame {
        Frame::GroupSend(frame::GroupSend {
            client_msg_id: cmid,
            group,
            payload,
        })
    }

    fn run(seed: u64, steps: usize) -> (usize, u32) {
        let mut g = GSim::new(seed);
        for i in 0..g.users.len() {
            let id = g.users[i].id;
            g.c.register(id, key(id));
            g.login(i);
        }
        let others = UserList::of(g.users[1..].iter().map(|u| u.id));
        g.frame(
            0,
            Frame::GroupCreate(frame::GroupCreate {
                request_id: 1,
                members: others,
            }),
        );
        g.c.settle();
        g.pump_clients();
        assert_ne!(g.group, 0, "group created");
        g.note_durable();
        for _ in 0..steps {
            g.step();
        }
        g.note_durable();
        g.heal();
        g.note_durable();
        g.check();
        (g.acked.len(), g.crashes)
    }

    #[test]
    fn group_simulation() {
        let seeds: u64 = std::env::var("SIM_GROUP_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(150);
        let (mut acked, mut crashes) = (0, 0);
        for seed in 0..seeds {
            let r = catch_unwind(AssertUnwindSafe(|| run(seed, 600)));
            match r {
                Ok((a, c)) => {
                    acked += a;
                    crashes += c;
                }
                Err(e) => {
                    eprintln!("group simulation failed at seed {seed}");
                    resume_unwind(e)
                }
            }
        }
        eprintln!(
            "group simulation: {seeds} seeds, {acked} acknowledged messages, {crashes} crashes"
        );
        assert!(acked > 0 && crashes > 0);
    }
}
