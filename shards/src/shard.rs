//! The shard state machine.
//!
//! One [`Shard`] owns, for the users whose home it is: accounts (device keys), the registry of
//! logged-in connections, mailboxes and the sender dedup window; for the static keys that hash
//! to it: the reverse key index; and for the connections it accepted: their pre-auth state and
//! per-address registration limits.
//!
//! Rules that cut across the handlers:
//!
//! * **Durability gates every answer.** A `SendResult`, a `Deliver`, a `KeyClaimed` or a
//!   `Registered` goes out only once the append behind it is covered by `Event::Durable`.
//!   Waiting work sits in `waiters`, keyed by append id, and runs in append order.
//! * **Durable entries are a prefix of each mailbox.** Seqs and append ids are handed out
//!   together and durability is reported as a prefix of append ids, so delivery walks a mailbox
//!   in seq order and stops at the first entry that is not durable yet; this is also what keeps
//!   per-sender order.
//! * **Segments die oldest-first.** A tombstone in segment N only refers to records in segments
//!   <= N, so deleting a segment is safe once it holds nothing live *and* every older segment is
//!   gone. Liveness is counted per segment: a message or receipt is live while it is queued, an
//!   account record while it is the device's current one, a key binding always.
//! * **Seqs are never reused, even after deletions.** Recovery starts above the highest seq in
//!   any surviving record (tombstones included). Deleting old segments could remove every
//!   record carrying the highest seqs, so a segment is deleted only when a *durable* record
//!   written after everything in it, and carrying a fresh seq, survives in a younger segment;
//!   when none does, the shard appends a seq marker (`Tombstone` of a never-used seq, which
//!   kills nothing) and deletes on a later `Tick`, once the marker is durable. Compaction
//!   appends one marker with its copies.
//! * **Determinism.** No hash-map iteration order leaks into actions or appends: whenever a
//!   hash map is walked to produce output, the keys are sorted first.
//! * **A one-time prekey is handed out at most once, ever.** A fetch takes the key out of memory
//!   and appends a `PrekeyConsumed` marker; the bundle is answered only once everything
//!   appended so far (the marker included) is durable. A crash before that loses the marker and
//!   the answer together, so the key may be handed out again only because nobody got it; after
//!   the answer the marker is durable and recovery removes the key.
//! * **Prekey liveness.** A device's current `PrekeyIdentity` record is live; a `PrekeyBatch`
//!   is live while one of its keys is neither consumed nor replaced (by a newer identity, or by
//!   a compaction copy); a `PrekeyConsumed` marker is never live (like a tombstone, it refers
//!   only to a batch in its own or an older segment). A record superseded by an append dies
//!   only once that append is durable (`Waiter::Kill`), so a segment is never deleted while its
//!   replacement could still be lost.
//! * **Prekey generations.** Each identity change of a device starts a new generation; batches
//!   carry theirs, and recovery keeps only the keys of the device's final generation. So a
//!   batch whose identity record was deleted (an older segment) can never be adopted by another
//!   identity.
//!
//! Protocol decisions made here:
//!
//! * A server-to-client frame kind (`Welcome`, `Deliver`, …) from a client closes it with
//!   `MalformedFrame` (well-formed bytes, wrong direction); `UnknownKind` stays for kind bytes
//!   the decoder does not know. An `Ack` with more than `ACK_SEQS_MAX` seqs is `MalformedFrame`.
//! * `Login` with revision 0 or without the `MESSAGING` capability closes with
//!   `VersionUnsupported`; a login that reaches a shard that is not the user's home closes with
//!   `Internal`.
//! * Registration frames are accepted before and after login. Errors found on the accepting
//!   shard (`InvalidNumber`, the per-address limit) are sent directly; every answer from the
//!   number's home shard travels as `MeshMsg::ToConn`, also when that is this shard.
//! * Registration codes live in memory only: a restart invalidates them (`NoPendingCode`) and
//!   the client asks again. A verification whose key claim gets no answer within
//!   `registration_code_ttl_ms` (or whose key shard restarts) fails with `StorageUnavailable`.
//! * Acks for unknown seqs, or for entries not durable yet (never delivered), are ignored.
//! * Receipts are best effort: one whose original sender has no account, or that reaches a
//!   poisoned shard, is dropped; a crash between the tombstone and the receipt's append loses it.
//! * The per-device TTL sweep walks entries in seq order and stops at the first live one, so a
//!   wall clock that steps back delays expiry rather than breaking it.
//! * Prekeys: uploads and fetches need a login (`NotAuthenticated` otherwise). An upload is all
//!   or nothing: a bad signature (`BadPrekeySignature`), a non-canonical X25519 key or a repeated
//!   one-time id (`InvalidPrekey`), or more one-time keys than `prekeys_per_device_max`
//!   (`PrekeyLimit`) store nothing. Within one identity, one-time ids at or below the highest
//!   ever uploaded are skipped (a retried upload must not bring back a consumed key). A fetch
//!   hands out the lowest id. `PrekeyStatus` goes only to connections that announced
//!   `PREKEYS`: after an upload, when a fetch leaves fewer than `prekey_low_water` keys (or
//!   none), and after `Welcome` while fewer than `prekey_low_water` remain.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason, ReceiptKind, ACK_SEQS_MAX};
use protocol::{capability, Address, AddressKind, DeviceId, ErrorCode, Frame, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storage::{Journal, Lsn, SegmentId};
use switchboard_e2ee::keys::is_canonical_public;
use switchboard_e2ee::verify_signed_prekey;

use crate::limits::RateTable;
use crate::mailbox::{Body, Entry, Mailbox};
use crate::record::{Record, MAX_PREKEY_BATCH_KEYS};
use crate::{
    home_shard, key_shard, Action, Config, ConnId, ConnRef, Event, FetchedBundle, LoginInfo,
    MeshMsg, ShardId, ShardStats, StoredMessage,
};

/// A device of a user: the key of accounts, sessions and mailboxes.
type DeviceKey = (UserId, DeviceId);
/// `(from_user, from_device, client_msg_id)`: what makes two `Send`s the same message.
type DedupKey = (UserId, DeviceId, u64);
/// A Noise static public key.
type StaticKey = [u8; 32];

/// Registration rate windows are per hour (`register_per_*_per_hour`).
const HOUR_MS: u64 = 3_600_000;
/// Prekey fetch windows are per minute (`prekey_fetches_per_requester_per_minute`).
const MINUTE_MS: u64 = 60_000;
/// Registration codes have six digits.
const CODE_MIN: u32 = 100_000;
const CODE_MAX: u32 = 999_999;

/// A logged-in connection.
#[derive(Debug)]
struct Session {
    user: UserId,
    device: DeviceId,
    peer_ip: IpAddr,
    static_key: StaticKey,
    /// Capabilities the client announced (`PrekeyStatus` only with `PREKEYS`).
    capabilities: u64,
    /// `Deliver`/`Receipt` frames sent on this connection and not acknowledged yet.
    inflight: usize,
    /// `Store`s sent per destination shard whose `SendResult` has not come back. At most one
    /// entry per shard, so bounded by `Config::shards`.
    outstanding: BTreeMap<ShardId, u64>,
}

/// A connection on this shard.
#[derive(Debug)]
enum Conn {
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

/// A device's current key, and where its record lives.
#[derive(Clone, Copy, Debug)]
struct Account {
    static_key: StaticKey,
    ts_ms: u64,
    segment: SegmentId,
}

/// A durable reverse-index entry.
#[derive(Clone, Copy, Debug)]
struct Binding {
    user: UserId,
    device: DeviceId,
    ts_ms: u64,
    segment: SegmentId,
}

/// A key binding appended but not durable yet, and who waits for it.
#[derive(Debug)]
struct PendingBinding {
    user: UserId,
    device: DeviceId,
    ts_ms: u64,
    answers: Vec<(ShardId, u64)>,
}

/// A device's published prekeys (home side). Changes apply in memory at once; every answer
/// that reveals them waits for durability.
#[derive(Debug)]
struct PrekeyDevice {
    keys: DeviceKeys,
    /// Identity generation (+1 on every identity change).
    generation: u32,
    /// Highest one-time id ever uploaded in this generation.
    max_one_time_id: u32,
    ts_ms: u64,
    /// The segment of its current `PrekeyIdentity` record.
    segment: SegmentId,
    /// Unconsumed one-time prekeys by id.
    one_time: BTreeMap<u32, OneTimeKey>,
}

/// A stored one-time prekey and the batch record it lives in.
#[derive(Clone, Copy, Debug)]
struct OneTimeKey {
    key: [u8; 32],
    batch: u64,
}

/// A live `PrekeyBatch` record: how many of its keys are still stored.
#[derive(Clone, Copy, Debug)]
struct Batch {
    owner: DeviceKey,
    segment: SegmentId,
    live: u32,
    generation: u32,
}

/// What the dedup window remembers of a stored message.
#[derive(Clone, Copy, Debug)]
struct Dedup {
    ts_ms: u64,
    append_id: u64,
}

/// Per-segment bookkeeping for deletion and compaction.
#[derive(Clone, Copy, Debug, Default)]
struct SegmentInfo {
    /// Records in it that are still live.
    live: u64,
    /// Records ever written to it (the denominator of the live fraction).
    total: u64,
    /// Highest append id in it (0 for recovered segments: durable).
    max_append_id: u64,
}

/// An outstanding registration code (volatile: a restart invalidates it).
#[derive(Clone, Copy, Debug)]
struct PendingCode {
    code: u32,
    expires_at_ms: u64,
    wrong: u32,
}

/// A verified code waiting for the key registry's answer.
#[derive(Clone, Copy, Debug)]
struct PendingVerify {
    reply: ConnRef,
    phone: UserId,
    static_key: StaticKey,
    claim_shard: ShardId,
    started_ms: u64,
}

/// Work that runs once an append is durable.
#[derive(Debug)]
enum Waiter {
    /// A mailbox entry became durable: deliver it, or push if the device is offline.
    Stored { key: DeviceKey, seq: u64 },
    /// Tell a sender its message is stored.
    SendReply {
        reply: ConnRef,
        client_msg_id: u64,
        ts_ms: u64,
    },
    /// A device's new account record is durable: switch to it and answer `Registered`.
    Account {
        key: DeviceKey,
        static_key: StaticKey,
        ts_ms: u64,
        segment: SegmentId,
        reply: ConnRef,
    },
    /// A key binding is durable: record it and answer every claimant.
    Binding {
        static_key: StaticKey,
        segment: SegmentId,
    },
    /// The re-appends of a compaction are durable: the old segment may go.
    Compaction { segment: SegmentId },
    /// The append that superseded a record in `segment` is durable: that record is dead.
    Kill { segment: SegmentId },
    /// A fetch's consumption (and everything before it) is durable: answer the requester.
    PrekeyReply {
        reply: ConnRef,
        request_id: u64,
        bundle: FetchedBundle,
    },
    /// An upload is durable: tell the uploading connection.
    PrekeyUploaded { conn: ConnId, key: DeviceKey },
    /// Tell the owner (if online) that its one-time prekeys run low.
    PrekeyNotice { key: DeviceKey },
}

/// A live record found in a segment being compacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LiveRef {
    Entry(u64, DeviceKey),
    Account(DeviceKey),
    Binding(StaticKey),
    PrekeyIdentity(DeviceKey),
    PrekeyBatch(u64),
}

/// One shard's state.
pub struct Shard {
    config: Config,
    actions: Vec<Action>,
    stats: ShardStats,
    poisoned: Option<String>,
    rng: StdRng,

    /// Every connection on this shard (bounded by the gateway's connection limit).
    conns: HashMap<ConnId, Conn>,
    /// Which connection each logged-in device uses.
    online: HashMap<DeviceKey, ConnId>,

    /// Devices and their current keys (durable records only).
    accounts: HashMap<DeviceKey, Account>,
    /// Account appends not durable yet, per device (compaction must not re-append the current
    /// record behind a newer pending one: the last record in the log wins at recovery).
    pending_accounts: HashMap<DeviceKey, u32>,
    /// Reverse key index (durable records only).
    bindings: HashMap<StaticKey, Binding>,
    /// Key bindings appended, not durable yet.
    pending_bindings: HashMap<StaticKey, PendingBinding>,

    /// Mailboxes of devices homed here (an empty one is removed).
    mailboxes: HashMap<DeviceKey, Mailbox>,
    /// Every queued entry by seq: the TTL sweep walks it oldest first.
    seq_index: BTreeMap<u64, DeviceKey>,
    /// Next mailbox seq; strictly above every seq in the log.
    next_seq: u64,

    /// Sender dedup window, `Config::dedup_window_entries` long, evicted FIFO.
    dedup: HashMap<DedupKey, Dedup>,
    dedup_fifo: VecDeque<DedupKey>,

    /// Work waiting for durability, by append id.
    waiters: BTreeMap<u64, Vec<Waiter>>,
    /// Highest append id known durable.
    durable_up_to: u64,
    /// Highest append id handed out.
    last_append_id: u64,

    /// Live segments, oldest first.
    segments: BTreeMap<SegmentId, SegmentInfo>,
    /// The segment whose live records were re-appended and which waits for them to be durable.
    compacting: Option<SegmentId>,
    /// Appends carrying a fresh seq (a new message, receipt or seq marker) not known durable
    /// yet: the first such append of each segment, oldest first (so at most a few entries).
    pending_fresh: VecDeque<(u64, SegmentId)>,
    /// A segment holding a durable record whose seq is above every seq in older segments.
    /// Only segments older than it may be deleted: recovery computes the next seq from the
    /// records that remain, so the record carrying the high-water seq must outlive them.
    fresh_durable_segment: Option<SegmentId>,

    /// Outstanding codes per number (home side).
    codes: HashMap<UserId, PendingCode>,
    number_limits: RateTable<UserId>,
    /// Per-address limit (accepting side).
    ip_limits: RateTable<IpAddr>,
    /// Verifications waiting for `KeyClaimed`, by token.
    verifies: HashMap<u64, PendingVerify>,
    next_token: u64,

    /// Published prekeys of devices homed here.
    prekeys: HashMap<DeviceKey, PrekeyDevice>,
    /// Live `PrekeyBatch` records by in-memory batch number.
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// Per-requester fetch limit (requester side).
    fetch_limits: RateTable<DeviceKey>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("shard", &self.config.shard)
            .field("poisoned", &self.poisoned)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// A fresh shard; `seed` drives the only randomness (registration codes).
    pub fn new(config: Config, seed: u64) -> Self {
        Self {
            config,
            actions: Vec::new(),
            stats: ShardStats::default(),
            poisoned: None,
            rng: StdRng::seed_from_u64(seed),
            conns: HashMap::new(),
            online: HashMap::new(),
            accounts: HashMap::new(),
            pending_accounts: HashMap::new(),
            bindings: HashMap::new(),
            pending_bindings: HashMap::new(),
            mailboxes: HashMap::new(),
            seq_index: BTreeMap::new(),
            next_seq: 1,
            dedup: HashMap::new(),
            dedup_fifo: VecDeque::new(),
            waiters: BTreeMap::new(),
            durable_up_to: 0,
            last_append_id: 0,
            segments: BTreeMap::new(),
            compacting: None,
            pending_fresh: VecDeque::new(),
            fresh_durable_segment: None,
            codes: HashMap::new(),
            number_limits: RateTable::new(HOUR_MS),
            ip_limits: RateTable::new(HOUR_MS),
            verifies: HashMap::new(),
            next_token: 1,
            prekeys: HashMap::new(),
            batches: HashMap::new(),
            next_batch: 1,
            fetch_limits: RateTable::new(MINUTE_MS),
        }
    }

    /// Rebuilds state from the recovered log before any event is handled.
    ///
    /// `segments` lists every segment present (empty ones too); `records` must come in log order
    /// (segment ascending, then offset). Everything recovered is durable. What is rebuilt:
    /// accounts (the last record per device wins), key bindings, mailboxes (messages and
    /// receipts minus tombstones minus entries past `message_ttl_ms` at `now_ms`; a seq seen
    /// twice, which compaction causes, is kept once, in its latest segment), the dedup window
    /// (the newest `dedup_window_entries` message records, tombstoned or not), the next seq
    /// (above every seq in any record, tombstones included, so seqs are never reused) and the
    /// live count of every segment, and the prekey directory (the last identity record per
    /// device; one-time keys of batches of the device's final identity generation, minus
    /// consumed ones; a key id seen again, which compaction causes, is kept in its latest
    /// batch). Registration codes are not persisted: a restart invalidates outstanding codes and
    /// the client asks for a new one.
    pub fn recover(
        &mut self,
        now_ms: u64,
        segments: &[SegmentId],
        records: impl IntoIterator<Item = (SegmentId, Record)>,
    ) {
        for &s in segments {
            self.segments.entry(s).or_default();
        }
        let mut entries: BTreeMap<u64, (SegmentId, DeviceKey, Entry)> = BTreeMap::new();
        let mut tombstones: HashSet<u64> = HashSet::new();
        let mut sent: BTreeMap<u64, (DedupKey, u64)> = BTreeMap::new();
        let mut max_seq = 0u64;
        let mut max_seq_segment = None;
        let mut recovered_prekeys: HashMap<DeviceKey, RecoveredPrekeys> = HashMap::new();
        for (seg, rec) in records {
            let info = self.segments.entry(seg).or_default();
            info.total = info.total.saturating_add(1);
            match rec {
                Record::Message {
                    seq,
                    to_user,
                    to_device,
                    from_user,
                    from_device,
                    client_msg_id,
                    ts_ms,
                    msg_type,
                    payload,
                } => {
                    note_max(&mut max_seq, &mut max_seq_segment, seq, seg);
                    sent.insert(seq, ((from_user, from_device, client_msg_id), ts_ms));
                    let body = Body::Message {
                        from_user,
                        from_device,
                        client_msg_id,
                        msg_type,
                        payload,
                    };
                    let entry = Entry {
                        ts_ms,
                        append_id: 0,
                        segment: seg,
                        sent_on: None,
                        body,
                    };
                    insert_latest(&mut entries, seq, seg, (to_user, to_device), entry);
                }
                Record::Receipt {
                    seq,
                    to_user,
                    to_device,
                    from_user,
                    from_device,
                    client_msg_id,
                    kind,
                    ts_ms,
                } => {
                    note_max(&mut max_seq, &mut max_seq_segment, seq, seg);
                    // An unknown receipt kind cannot be delivered; drop it (it is not live).
                    if let Some(kind) = ReceiptKind::from_u8(kind) {
                        let body = Body::Receipt {
                            from_user,
                            from_device,
                            client_msg_id,
                            kind,
                        };
                        let entry = Entry {
                            ts_ms,
                            append_id: 0,
                            segment: seg,
                            sent_on: None,
                            body,
                        };
                        insert_latest(&mut entries, seq, seg, (to_user, to_device), entry);
                    }
                }
                Record::Tombstone { seq } => {
                    note_max(&mut max_seq, &mut max_seq_segment, seq, seg);
                    tombstones.insert(seq);
                }
                Record::Account {
                    user,
                    device,
                    static_key,
                    ts_ms,
                } => {
                    self.accounts.insert(
                        (user, device),
                        Account {
                            static_key,
                            ts_ms,
                            segment: seg,
                        },
                    );
                }
                Record::KeyBinding {
                    static_key,
                    user,
                    device,
                    ts_ms,
                } => {
                    self.bindings.insert(
                        static_key,
                        Binding {
                            user,
                            device,
                            ts_ms,
                            segment: seg,
                        },
                    );
                }
                Record::PrekeyIdentity {
                    user,
                    device,
                    generation,
                    identity_dh,
                    identity_sign,
                    signed_prekey_id,
                    signed_prekey,
                    signed_prekey_sig,
                    max_one_time_id,
                    ts_ms,
                } => {
                    let dev = recovered_prekeys.entry((user, device)).or_default();
                    let current = dev
                        .identity
                        .as_ref()
                        .map(|i| (i.generation, i.max_one_time_id));
                    // Generations only grow in log order; an older one would be a dead record.
                    if current.is_some_and(|(g, _)| g > generation) {
                        continue;
                    }
                    let max_one_time_id = match current {
                        Some((g, m)) if g == generation => m.max(max_one_time_id),
                        _ => max_one_time_id,
                    };
                    dev.identity = Some(RecoveredIdentity {
                        keys: DeviceKeys {
                            identity_dh,
                            identity_sign,
                            signed_prekey_id,
                            signed_prekey,
                            signed_prekey_sig,
                        },
                        generation,
                        max_one_time_id,
                        ts_ms,
                        segment: seg,
                    });
                    // Keys of an older generation belong to an identity that is gone.
                    let batches = &mut self.batches;
                    dev.one_time.retain(|_, k| {
                        let keep = batches
                            .get(&k.batch)
                            .is_some_and(|b| b.generation >= generation);
                        if !keep {
                            drop_from_batch(batches, k.batch);
                        }
                        keep
                    });
                }
                Record::PrekeyBatch {
                    user,
                    device,
                    generation,
                    keys,
                } => {
                    let dev = recovered_prekeys.entry((user, device)).or_default();
                    if dev
                        .identity
                        .as_ref()
                        .is_some_and(|i| i.generation > generation)
                    {
                        continue;
                    }
                    let batch = self.next_batch;
                    self.next_batch = self.next_batch.saturating_add(1);
                    self.batches.insert(
                        batch,
                        Batch {
                            owner: (user, device),
                            segment: seg,
                            live: 0,
                            generation,
                        },
                    );
                    for (id, key) in keys {
                        // A key seen again (a compaction copy) now lives in this batch.
                        match dev.one_time.insert(id, OneTimeKey { key, batch }) {
                            Some(prev) if prev.batch == batch => continue,
                            Some(prev) => {
                                drop_from_batch(&mut self.batches, prev.batch);
                            }
                            None => {}
                        }
                        if let Some(b) = self.batches.get_mut(&batch) {
                            b.live = b.live.saturating_add(1);
                        }
                    }
                }
                Record::PrekeyConsumed { user, device, id } => {
                    if let Some(k) = recovered_prekeys
                        .get_mut(&(user, device))
                        .and_then(|d| d.one_time.remove(&id))
                    {
                        drop_from_batch(&mut self.batches, k.batch);
                    }
                }
            }
        }
        for (key, dev) in recovered_prekeys {
            let Some(identity) = dev.identity else {
                // No identity record left for these keys (cannot happen while the device's
                // current record is live); they cannot be handed out.
                for k in dev.one_time.values() {
                    drop_from_batch(&mut self.batches, k.batch);
                }
                continue;
            };
            let mut one_time = dev.one_time;
            let batches = &mut self.batches;
            one_time.retain(|_, k| {
                let keep = batches
                    .get(&k.batch)
                    .is_some_and(|b| b.generation == identity.generation);
                if !keep {
                    drop_from_batch(batches, k.batch);
                }
                keep
            });
            let max_one_time_id = one_time
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0)
                .max(identity.max_one_time_id);
            self.prekeys.insert(
                key,
                PrekeyDevice {
                    keys: identity.keys,
                    generation: identity.generation,
                    max_one_time_id,
                    ts_ms: identity.ts_ms,
                    segment: identity.segment,
                    one_time,
                },
            );
        }
        self.batches.retain(|_, b| b.live > 0);
        self.stats.prekeys_stored = self.prekeys.values().map(|d| d.one_time.len() as u64).sum();
        for (seq, (seg, key, entry)) in entries {
            if tombstones.contains(&seq) {
                continue;
            }
            if expired(entry.ts_ms, now_ms, self.config.message_ttl_ms) {
                // Same rule as the TTL sweep, so an expiry needs no record.
                self.stats.expired = self.stats.expired.saturating_add(1);
                continue;
            }
            self.add_live(seg);
            self.seq_index.insert(seq, key);
            self.mailboxes.entry(key).or_default().insert(seq, entry);
        }
        let account_segs: Vec<SegmentId> = self.accounts.values().map(|a| a.segment).collect();
        let binding_segs: Vec<SegmentId> = self.bindings.values().map(|b| b.segment).collect();
        let identity_segs: Vec<SegmentId> = self.prekeys.values().map(|d| d.segment).collect();
        let batch_segs: Vec<SegmentId> = self.batches.values().map(|b| b.segment).collect();
        for seg in account_segs
            .into_iter()
            .chain(binding_segs)
            .chain(identity_segs)
            .chain(batch_segs)
        {
            self.add_live(seg);
        }
        let keep = self.config.dedup_window_entries;
        let skip = sent.len().saturating_sub(keep);
        for (_, (key, ts_ms)) in sent.into_iter().skip(skip) {
            self.dedup_insert(
                key,
                Dedup {
                    ts_ms,
                    append_id: 0,
                },
            );
        }
        self.next_seq = self.next_seq.max(max_seq.saturating_add(1));
        self.fresh_durable_segment = self.fresh_durable_segment.max(max_seq_segment);
        self.refresh_gauges();
    }

    /// Handles one event at `now_ms`; appends go through `journal`.
    pub fn handle(&mut self, now_ms: u64, event: Event, journal: &mut dyn Journal) {
        match event {
            Event::Connected {
                conn,
                peer_ip,
                static_key,
            } => {
                self.forget(conn);
                self.conns.insert(
                    conn,
                    Conn::PreAuth {
                        peer_ip,
                        static_key,
                    },
                );
            }
            Event::Frame { conn, frame } => self.on_frame(now_ms, conn, frame, journal),
            Event::Login { conn, info } => self.login(now_ms, conn, info),
            Event::Closed { conn } => self.forget(conn),
            Event::Mesh { from, msg } => self.on_mesh(now_ms, from, msg, journal),
            Event::Durable { up_to } => {
                // After a failure nothing more is trusted to become durable.
                if self.poisoned.is_none() {
                    self.durable_up_to = self.durable_up_to.max(up_to);
                }
            }
            Event::StorageFailed { reason } => self.on_storage_failed(reason),
            Event::Tick => self.on_tick(now_ms, journal),
            Event::PeerRestarted { shard } => self.on_peer_restarted(shard),
        }
        // Run whatever became durable (also covers an append id already <= durable_up_to).
        self.fire_ready(journal);
        self.refresh_gauges();
    }

    /// Takes the actions produced so far, in order.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Why the shard refuses writes, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The ids of the one-time prekeys stored for (user, device), lowest first, or `None` when
    /// the device never uploaded keys here (for tests and tools: the directory's content as
    /// the next fetches would see it).
    pub fn one_time_prekey_ids(&self, user: UserId, device: DeviceId) -> Option<Vec<u32>> {
        self.prekeys
            .get(&(user, device))
            .map(|d| d.one_time.keys().copied().collect())
    }

    /// Everything published for (user, device): its keys and the one-time prekeys stored,
    /// lowest id first (for tests and tools).
    pub fn published_prekeys(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Option<(DeviceKeys, Vec<OneTimePrekey>)> {
        self.prekeys.get(&(user, device)).map(|d| {
            let one_time = d
                .one_time
                .iter()
                .map(|(&id, k)| OneTimePrekey { id, key: k.key })
                .collect();
            (d.keys, one_time)
        })
    }

    // ----- connections -------------------------------------------------------------------

    fn on_frame(&mut self, now_ms: u64, conn: ConnId, frame: Frame, journal: &mut dyn Journal) {
        // Unknown connection: a frame racing a close or hand-off. Nothing to answer.
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        let session = match state {
            Conn::PreAuth { .. } => None,
            Conn::LoggedIn(s) => Some((s.user, s.device)),
        };
        match frame {
            Frame::Ping { nonce } => self.send(conn, Frame::Pong { nonce }),
            // A keepalive answer (Pong goes both ways): nothing to do.
            Frame::Pong { .. } => {}
            // Registration is allowed in both states (a logged-in device may re-register).
            Frame::RegisterRequest { phone } => self.register_request_frame(now_ms, conn, phone),
            Frame::RegisterVerify { phone, code } => self.register_verify_frame(conn, phone, code),
            Frame::Login {
                user,
                device,
                revision,
                capabilities,
            } => self.login_frame(now_ms, conn, user, device, revision, capabilities),
            Frame::Send {
                client_msg_id,
                to,
                msg_type,
                payload,
            } => match session {
                Some(key) => self.on_send(conn, key, client_msg_id, to, msg_type, payload),
                None => self.close(conn, ErrorCode::NotAuthenticated, "send before login"),
            },
            Frame::Ack { seqs } => match session {
                Some(key) => self.on_ack(now_ms, conn, key, seqs, journal),
                None => self.close(conn, ErrorCode::NotAuthenticated, "ack before login"),
            },
            Frame::Read { to, client_msg_id } => match session {
                Some(key) => self.on_read(now_ms, conn, key, to, client_msg_id),
                None => self.close(conn, ErrorCode::NotAuthenticated, "read before login"),
            },
            Frame::PrekeyUpload { keys, one_time } => match session {
                Some(key) => self.on_prekey_upload(now_ms, conn, key, *keys, one_time, journal),
                None => self.close(
                    conn,
                    ErrorCode::NotAuthenticated,
                    "prekey upload before login",
                ),
            },
            Frame::PrekeyFetch {
                request_id,
                user,
                device,
            } => match session {
                Some(key) => {
                    self.on_prekey_fetch_frame(now_ms, conn, key, request_id, user, device)
                }
                None => self.close(
                    conn,
                    ErrorCode::NotAuthenticated,
                    "prekey fetch before login",
                ),
            },
            // Server-to-client kinds decode fine but make no sense from a client: the frame is
            // well-formed bytes with a wrong meaning, so MalformedFrame (UnknownKind is kept for
            // kind bytes the decoder does not know).
            Frame::Welcome { .. }
            | Frame::RegisterCodeSent { .. }
            | Frame::Registered { .. }
            | Frame::ServerAck { .. }
            | Frame::Deliver { .. }
            | Frame::Receipt { .. }
            | Frame::Error { .. }
            | Frame::GoAway { .. }
            | Frame::PrekeyBundle { .. }
            | Frame::PrekeyStatus { .. } => self.close(
                conn,
                ErrorCode::MalformedFrame,
                "server-to-client frame kind sent by a client",
            ),
        }
    }

    fn login_frame(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        user: UserId,
        device: DeviceId,
        revision: u16,
        capabilities: u64,
    ) {
        let (peer_ip, static_key) = match self.conns.get(&conn) {
            Some(Conn::PreAuth {
                peer_ip,
                static_key,
            }) => (*peer_ip, *static_key),
            Some(Conn::LoggedIn(_)) => {
                return self.close(conn, ErrorCode::NotAuthenticated, "login twice")
            }
            None => return,
        };
        let info = LoginInfo {
            user,
            device,
            revision,
            capabilities,
            static_key,
            peer_ip,
        };
        let to = home_shard(user, self.config.shards);
        // Either way this shard forgets the pre-auth connection now.
        self.conns.remove(&conn);
        if to == self.config.shard {
            self.login(now_ms, conn, info);
        } else {
            self.actions.push(Action::Handoff { conn, to, info });
        }
    }

    /// `Event::Login`, or a local `Frame::Login`: this is the user's home shard.
    fn login(&mut self, now_ms: u64, conn: ConnId, info: LoginInfo) {
        self.forget(conn);
        if home_shard(info.user, self.config.shards) != self.config.shard {
            return self.close_unknown(
                conn,
                ErrorCode::Internal,
                "login routed to the wrong shard",
            );
        }
        let key = (info.user, info.device);
        match self.accounts.get(&key) {
            Some(a) if a.static_key == info.static_key => {}
            _ => {
                return self.close_unknown(
                    conn,
                    ErrorCode::UnknownKey,
                    "key not bound to this user and device",
                )
            }
        }
        // Revision 1 is the first; a client that cannot do 1:1 messaging has nothing to do here.
        if info.revision == 0 || info.capabilities & capability::MESSAGING == 0 {
            return self.close_unknown(
                conn,
                ErrorCode::VersionUnsupported,
                "revision 0 or no messaging capability",
            );
        }
        if let Some(old) = self.online.get(&key).copied() {
            self.close(
                old,
                ErrorCode::Replaced,
                "another connection logged in as this device",
            );
        }
        self.conns.insert(
            conn,
            Conn::LoggedIn(Session {
                user: info.user,
                device: info.device,
                peer_ip: info.peer_ip,
                static_key: info.static_key,
                capabilities: info.capabilities,
                inflight: 0,
                outstanding: BTreeMap::new(),
            }),
        );
        self.online.insert(key, conn);
        self.stats.logins = self.stats.logins.saturating_add(1);
        self.send(
            conn,
            Frame::Welcome {
                user: info.user,
                device: info.device,
                revision: protocol::PROTOCOL_REVISION,
                capabilities: info.capabilities & capability::SERVER_SUPPORTED,
                server_time_ms: now_ms,
                keepalive_ms: self.config.keepalive_ms,
                max_frame_bytes: self.config.max_frame_bytes,
            },
        );
        // A device that ran low while it was offline (or never uploaded) hears it now.
        if info.capabilities & capability::PREKEYS != 0 {
            if let Some(frame) = self.low_prekeys_status(key) {
                self.send(conn, frame);
            }
        }
        self.pump(key);
    }

    /// Drops a connection's state. Entries it had in flight stay queued: `sent_on` no longer
    /// names the device's connection, so the next login resends them.
    fn forget(&mut self, conn: ConnId) {
        if let Some(Conn::LoggedIn(s)) = self.conns.remove(&conn) {
            let key = (s.user, s.device);
            if self.online.get(&key) == Some(&conn) {
                self.online.remove(&key);
            }
        }
    }

    fn close(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.forget(conn);
        self.close_unknown(conn, code, text);
    }

    /// Close a connection this shard holds no state for (already forgotten).
    fn close_unknown(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.actions.push(Action::Close {
            conn,
            code,
            text: text.to_owned(),
        });
    }

    fn send(&mut self, conn: ConnId, frame: Frame) {
        self.actions.push(Action::Send { conn, frame });
    }

    fn mesh(&mut self, shard: ShardId, msg: MeshMsg) {
        self.actions.push(Action::ToShard { shard, msg });
    }

    /// Answers a pre-auth request. Home-side answers always travel as `ToConn` to the shard
    /// holding the connection, this one included, so there is one path.
    fn reply(&mut self, to: ConnRef, frame: Frame) {
        self.mesh(
            to.shard,
            MeshMsg::ToConn {
                conn: to.conn,
                frame,
            },
        );
    }

    fn reply_error(&mut self, to: ConnRef, code: ErrorCode, text: &str) {
        self.reply(to, Frame::error(code, 0, text));
    }

    fn here(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            shard: self.config.shard,
            conn,
        }
    }

    fn on_peer_restarted(&mut self, shard: ShardId) {
        // Stores in flight to or from `shard` are gone; a later Send from the same connection
        // could be stored ahead of a lost earlier one. Closing makes the client resend all its
        // unacknowledged messages, in order, on a new connection (dedup absorbs repeats).
        let mut doomed: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(&c, s)| match s {
                Conn::LoggedIn(s) if s.outstanding.get(&shard).is_some_and(|&n| n > 0) => Some(c),
                _ => None,
            })
            .collect();
        doomed.sort_unstable();
        for c in doomed {
            self.close(
                c,
                ErrorCode::Internal,
                "a shard restarted; reconnect and resend",
            );
        }
        self.fail_verifies(
            |v| v.claim_shard == shard,
            "key registry restarted; register again",
        );
    }

    // ----- messages: sender side -----------------------------------------------------------

    fn on_send(
        &mut self,
        conn: ConnId,
        (user, device): DeviceKey,
        client_msg_id: u64,
        to: Address,
        msg_type: u8,
        payload: Bytes,
    ) {
        if payload.len() > self.config.max_payload_bytes {
            return self.send(
                conn,
                Frame::error(
                    ErrorCode::PayloadTooLarge,
                    client_msg_id,
                    "payload too large",
                ),
            );
        }
        if to.kind() != Some(AddressKind::Device) {
            return self.send(
                conn,
                Frame::error(
                    ErrorCode::UnsupportedAddress,
                    client_msg_id,
                    "only device addresses are routed",
                ),
            );
        }
        let home = home_shard(to.id, self.config.shards);
        if home == self.config.shard {
            self.stats.routed_local = self.stats.routed_local.saturating_add(1);
        } else {
            self.stats.routed_cross_shard = self.stats.routed_cross_shard.saturating_add(1);
        }
        if let Some(Conn::LoggedIn(s)) = self.conns.get_mut(&conn) {
            let n = s.outstanding.entry(home).or_insert(0);
            *n = n.saturating_add(1);
        }
        let msg = StoredMessage {
            from_user: user,
            from_device: device,
            to_user: to.id,
            to_device: to.device,
            client_msg_id,
            msg_type,
            payload,
        };
        let reply = self.here(conn);
        self.mesh(home, MeshMsg::Store { reply, msg });
    }

    fn on_send_result(
        &mut self,
        from: ShardId,
        conn: ConnId,
        client_msg_id: u64,
        result: Result<u64, ErrorCode>,
    ) {
        // The connection may be gone (closed, replaced): the client resends after reconnecting.
        let Some(Conn::LoggedIn(s)) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(n) = s.outstanding.get_mut(&from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.outstanding.remove(&from);
            }
        }
        let frame = match result {
            Ok(server_ts_ms) => Frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            },
            Err(code) => Frame::error(code, client_msg_id, code.name()),
        };
        self.send(conn, frame);
    }

    fn on_read(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        (user, device): DeviceKey,
        to: Address,
        client_msg_id: u64,
    ) {
        if to.kind() != Some(AddressKind::Device) {
            return self.send(
                conn,
                Frame::error(
                    ErrorCode::UnsupportedAddress,
                    client_msg_id,
                    "only device addresses are routed",
                ),
            );
        }
        self.mesh(
            home_shard(to.id, self.config.shards),
            MeshMsg::StoreReceipt {
                to_user: to.id,
                to_device: to.device,
                from_user: user,
                from_device: device,
                client_msg_id,
                kind: ReceiptKind::Read as u8,
                ts_ms: now_ms,
            },
        );
    }

    // ----- messages: home side -------------------------------------------------------------

    fn on_store(
        &mut self,
        now_ms: u64,
        reply: ConnRef,
        msg: StoredMessage,
        journal: &mut dyn Journal,
    ) {
        let key = (msg.to_user, msg.to_device);
        let id = msg.client_msg_id;
        if home_shard(msg.to_user, self.config.shards) != self.config.shard
            || !self.accounts.contains_key(&key)
        {
            return self.send_result(reply, id, Err(ErrorCode::NoSuchRecipient));
        }
        if self.poisoned.is_some() {
            return self.send_result(reply, id, Err(ErrorCode::StorageUnavailable));
        }
        let dkey = (msg.from_user, msg.from_device, id);
        if let Some(d) = self.dedup.get(&dkey).copied() {
            self.stats.dedup_hits = self.stats.dedup_hits.saturating_add(1);
            // Stored before: answer with the original time, but never before it is durable.
            self.wait(
                d.append_id,
                Waiter::SendReply {
                    reply,
                    client_msg_id: id,
                    ts_ms: d.ts_ms,
                },
            );
            return;
        }
        let seq = self.take_seq();
        let rec = Record::Message {
            seq,
            to_user: msg.to_user,
            to_device: msg.to_device,
            from_user: msg.from_user,
            from_device: msg.from_device,
            client_msg_id: id,
            ts_ms: now_ms,
            msg_type: msg.msg_type,
            payload: msg.payload.clone(),
        };
        let lsn = self.append(journal, &rec, true);
        self.note_fresh(lsn);
        self.dedup_insert(
            dkey,
            Dedup {
                ts_ms: now_ms,
                append_id: lsn.append_id,
            },
        );
        self.wait(lsn.append_id, Waiter::Stored { key, seq });
        self.wait(
            lsn.append_id,
            Waiter::SendReply {
                reply,
                client_msg_id: id,
                ts_ms: now_ms,
            },
        );
        self.stats.stored = self.stats.stored.saturating_add(1);
        let body = Body::Message {
            from_user: msg.from_user,
            from_device: msg.from_device,
            client_msg_id: id,
            msg_type: msg.msg_type,
            payload: msg.payload,
        };
        let entry = Entry {
            ts_ms: now_ms,
            append_id: lsn.append_id,
            segment: lsn.segment,
            sent_on: None,
            body,
        };
        self.enqueue(key, seq, entry, journal);
    }

    fn send_result(&mut self, reply: ConnRef, client_msg_id: u64, result: Result<u64, ErrorCode>) {
        self.mesh(
            reply.shard,
            MeshMsg::SendResult {
                conn: reply.conn,
                client_msg_id,
                result,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_store_receipt(
        &mut self,
        to_user: UserId,
        to_device: DeviceId,
        from_user: UserId,
        from_device: DeviceId,
        client_msg_id: u64,
        kind: u8,
        ts_ms: u64,
        journal: &mut dyn Journal,
    ) {
        let key = (to_user, to_device);
        // Receipts are best effort: for a sender without an account (deleted, or a forged
        // address in Read), with an unknown kind, or while the log refuses writes, drop it.
        if home_shard(to_user, self.config.shards) != self.config.shard
            || !self.accounts.contains_key(&key)
            || self.poisoned.is_some()
        {
            return;
        }
        let Some(kind) = ReceiptKind::from_u8(kind) else {
            return;
        };
        let seq = self.take_seq();
        let rec = Record::Receipt {
            seq,
            to_user,
            to_device,
            from_user,
            from_device,
            client_msg_id,
            kind: kind as u8,
            ts_ms,
        };
        let lsn = self.append(journal, &rec, true);
        self.note_fresh(lsn);
        self.wait(lsn.append_id, Waiter::Stored { key, seq });
        self.stats.receipts_stored = self.stats.receipts_stored.saturating_add(1);
        let body = Body::Receipt {
            from_user,
            from_device,
            client_msg_id,
            kind,
        };
        let entry = Entry {
            ts_ms,
            append_id: lsn.append_id,
            segment: lsn.segment,
            sent_on: None,
            body,
        };
        self.enqueue(key, seq, entry, journal);
    }

    fn on_ack(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        key: DeviceKey,
        seqs: Vec<u64>,
        journal: &mut dyn Journal,
    ) {
        if seqs.len() > ACK_SEQS_MAX {
            return self.close(conn, ErrorCode::MalformedFrame, "too many seqs in one ack");
        }
        for seq in seqs {
            // Unknown seqs (duplicate acks) are ignored, and so are entries that are not durable:
            // they were never delivered, so an ack for them is a guess.
            let durable = self
                .mailboxes
                .get(&key)
                .and_then(|m| m.get(seq))
                .map(|e| e.append_id <= self.durable_up_to);
            if durable != Some(true) {
                continue;
            }
            let Some(entry) = self.remove_entry(key, seq) else {
                continue;
            };
            self.tombstone(seq, journal);
            self.stats.acked = self.stats.acked.saturating_add(1);
            if let Body::Message {
                from_user,
                from_device,
                client_msg_id,
                ..
            } = entry.body
            {
                self.mesh(
                    home_shard(from_user, self.config.shards),
                    MeshMsg::StoreReceipt {
                        to_user: from_user,
                        to_device: from_device,
                        from_user: key.0,
                        from_device: key.1,
                        client_msg_id,
                        kind: ReceiptKind::Delivered as u8,
                        ts_ms: now_ms,
                    },
                );
            }
        }
        self.pump(key);
    }

    /// Queues an entry and enforces the mailbox cap.
    fn enqueue(&mut self, key: DeviceKey, seq: u64, entry: Entry, journal: &mut dyn Journal) {
        self.seq_index.insert(seq, key);
        self.mailboxes.entry(key).or_default().insert(seq, entry);
        loop {
            let victim = match self.mailboxes.get(&key) {
                Some(m) if m.len() > self.config.mailbox_cap_msgs => m.lowest(),
                _ => None,
            };
            let Some(victim) = victim else { break };
            if self.remove_entry(key, victim).is_none() {
                break;
            }
            // The tombstone makes the prune survive a restart.
            self.tombstone(victim, journal);
            self.stats.pruned = self.stats.pruned.saturating_add(1);
        }
    }

    /// Removes an entry: mailbox, seq index, segment liveness, and its window slot if it is in
    /// flight on the device's current connection.
    fn remove_entry(&mut self, key: DeviceKey, seq: u64) -> Option<Entry> {
        let mailbox = self.mailboxes.get_mut(&key)?;
        let entry = mailbox.remove(seq)?;
        if mailbox.is_empty() {
            self.mailboxes.remove(&key);
        }
        self.seq_index.remove(&seq);
        self.kill(entry.segment);
        if let (Some(sent), Some(&current)) = (entry.sent_on, self.online.get(&key)) {
            if sent == current {
                if let Some(Conn::LoggedIn(s)) = self.conns.get_mut(&current) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
            }
        }
        Some(entry)
    }

    /// Sends what the device's window allows, in seq order.
    fn pump(&mut self, key: DeviceKey) {
        let Some(&conn) = self.online.get(&key) else {
            return;
        };
        let Some(Conn::LoggedIn(session)) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(mailbox) = self.mailboxes.get_mut(&key) else {
            return;
        };
        for (&seq, entry) in mailbox.iter_mut() {
            if session.inflight >= self.config.delivery_window_msgs {
                break;
            }
            // Durable entries are a prefix of the mailbox: stopping at the first that is not
            // keeps "nothing before durable" and the seq order at once.
            if entry.append_id > self.durable_up_to {
                break;
            }
            if entry.sent_on == Some(conn) {
                continue;
            }
            entry.sent_on = Some(conn);
            session.inflight = session.inflight.saturating_add(1);
            if entry.is_message() {
                self.stats.delivered = self.stats.delivered.saturating_add(1);
            }
            self.actions.push(Action::Send {
                conn,
                frame: entry.frame(seq),
            });
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    fn dedup_insert(&mut self, key: DedupKey, d: Dedup) {
        if self.config.dedup_window_entries == 0 {
            return;
        }
        if self.dedup.insert(key, d).is_none() {
            self.dedup_fifo.push_back(key);
        }
        while self.dedup_fifo.len() > self.config.dedup_window_entries {
            if let Some(old) = self.dedup_fifo.pop_front() {
                self.dedup.remove(&old);
            }
        }
    }

    // ----- registration --------------------------------------------------------------------

    fn register_request_frame(&mut self, now_ms: u64, conn: ConnId, phone: UserId) {
        if !is_valid_user_id(phone) {
            return self.send(
                conn,
                Frame::error(ErrorCode::InvalidNumber, 0, "not an E.164 number"),
            );
        }
        let Some((peer_ip, _)) = self.conns.get(&conn).map(Conn::peer) else {
            return;
        };
        let (limit, max) = (
            self.config.register_per_ip_per_hour,
            self.config.register_table_max_entries,
        );
        if !self.ip_limits.hit(peer_ip, now_ms, limit, max) {
            return self.send(
                conn,
                Frame::error(
                    ErrorCode::RegisterRateLimited,
                    0,
                    "too many registrations from this address",
                ),
            );
        }
        let reply = self.here(conn);
        self.mesh(
            home_shard(phone, self.config.shards),
            MeshMsg::RegisterRequest { reply, phone },
        );
    }

    fn register_verify_frame(&mut self, conn: ConnId, phone: UserId, code: u32) {
        if !is_valid_user_id(phone) {
            return self.send(
                conn,
                Frame::error(ErrorCode::InvalidNumber, 0, "not an E.164 number"),
            );
        }
        let Some((_, static_key)) = self.conns.get(&conn).map(Conn::peer) else {
            return;
        };
        let reply = self.here(conn);
        self.mesh(
            home_shard(phone, self.config.shards),
            MeshMsg::RegisterVerify {
                reply,
                phone,
                code,
                static_key,
            },
        );
    }

    fn on_register_request(&mut self, now_ms: u64, reply: ConnRef, phone: UserId) {
        if !is_valid_user_id(phone) || home_shard(phone, self.config.shards) != self.config.shard {
            return self.reply_error(reply, ErrorCode::InvalidNumber, "not an E.164 number");
        }
        if self.poisoned.is_some() {
            return self.reply_error(reply, ErrorCode::StorageUnavailable, "storage unavailable");
        }
        let max = self.config.register_table_max_entries;
        if !self
            .number_limits
            .hit(phone, now_ms, self.config.register_per_number_per_hour, max)
            || (!self.codes.contains_key(&phone) && self.codes.len() >= max)
        {
            return self.reply_error(
                reply,
                ErrorCode::RegisterRateLimited,
                "too many registrations for this number",
            );
        }
        let code = self.rng.gen_range(CODE_MIN..=CODE_MAX);
        let ttl = self.config.registration_code_ttl_ms;
        // A new request replaces an outstanding code (and its wrong-try count).
        self.codes.insert(
            phone,
            PendingCode {
                code,
                expires_at_ms: now_ms.saturating_add(ttl),
                wrong: 0,
            },
        );
        self.actions.push(Action::SendSms { phone, code });
        let expires_in_s = u32::try_from(ttl / 1000).unwrap_or(u32::MAX);
        self.reply(
            reply,
            Frame::RegisterCodeSent {
                phone,
                expires_in_s,
            },
        );
    }

    fn on_register_verify(
        &mut self,
        now_ms: u64,
        reply: ConnRef,
        phone: UserId,
        code: u32,
        static_key: StaticKey,
    ) {
        if self.poisoned.is_some() {
            return self.reply_error(reply, ErrorCode::StorageUnavailable, "storage unavailable");
        }
        let Some(pending) = self.codes.get_mut(&phone) else {
            return self.reply_error(
                reply,
                ErrorCode::NoPendingCode,
                "no outstanding code for this number",
            );
        };
        if now_ms >= pending.expires_at_ms {
            self.codes.remove(&phone);
            return self.reply_error(reply, ErrorCode::CodeExpired, "code expired");
        }
        if pending.code != code {
            pending.wrong = pending.wrong.saturating_add(1);
            if pending.wrong >= self.config.register_verify_attempts_max {
                // Burnt: guessing must start over with a new (rate-limited) code.
                self.codes.remove(&phone);
            }
            return self.reply_error(reply, ErrorCode::WrongCode, "wrong code");
        }
        if self.verifies.len() >= self.config.register_table_max_entries {
            // Checked before consuming the code, so the client can simply retry.
            return self.reply_error(
                reply,
                ErrorCode::RegisterRateLimited,
                "too many registrations in progress",
            );
        }
        // Consumed: a replay of the same code gets NoPendingCode.
        self.codes.remove(&phone);
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        let claim_shard = key_shard(&static_key, self.config.shards);
        self.verifies.insert(
            token,
            PendingVerify {
                reply,
                phone,
                static_key,
                claim_shard,
                started_ms: now_ms,
            },
        );
        self.mesh(
            claim_shard,
            MeshMsg::ClaimKey {
                reply_shard: self.config.shard,
                token,
                static_key,
                user: phone,
                device: 0,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_claim_key(
        &mut self,
        now_ms: u64,
        reply_shard: ShardId,
        token: u64,
        static_key: StaticKey,
        user: UserId,
        device: DeviceId,
        journal: &mut dyn Journal,
    ) {
        if let Some(b) = self.bindings.get(&static_key) {
            let result = if (b.user, b.device) == (user, device) {
                Ok(())
            } else {
                Err(b.user)
            };
            return self.mesh(reply_shard, MeshMsg::KeyClaimed { token, result });
        }
        if let Some(p) = self.pending_bindings.get_mut(&static_key) {
            if (p.user, p.device) == (user, device) {
                // Same claim while the first is in flight: answer both when it is durable.
                p.answers.push((reply_shard, token));
                return;
            }
            let owner = p.user;
            return self.mesh(
                reply_shard,
                MeshMsg::KeyClaimed {
                    token,
                    result: Err(owner),
                },
            );
        }
        // KeyClaimed has no error form; when the claim cannot be written the requester's
        // pending verification times out (or fails on PeerRestarted) with StorageUnavailable.
        if self.poisoned.is_some()
            || self.pending_bindings.len() >= self.config.register_table_max_entries
        {
            return;
        }
        let rec = Record::KeyBinding {
            static_key,
            user,
            device,
            ts_ms: now_ms,
        };
        let lsn = self.append(journal, &rec, true);
        let answers = vec![(reply_shard, token)];
        self.pending_bindings.insert(
            static_key,
            PendingBinding {
                user,
                device,
                ts_ms: now_ms,
                answers,
            },
        );
        self.wait(
            lsn.append_id,
            Waiter::Binding {
                static_key,
                segment: lsn.segment,
            },
        );
    }

    fn on_key_claimed(
        &mut self,
        now_ms: u64,
        token: u64,
        result: Result<(), UserId>,
        journal: &mut dyn Journal,
    ) {
        let Some(v) = self.verifies.remove(&token) else {
            return;
        };
        if result.is_err() {
            return self.reply_error(
                v.reply,
                ErrorCode::KeyBoundToOtherUser,
                "key already bound to another number",
            );
        }
        if self.poisoned.is_some() {
            return self.reply_error(
                v.reply,
                ErrorCode::StorageUnavailable,
                "storage unavailable",
            );
        }
        let key = (v.phone, 0);
        // Re-registering a number replaces its device-0 key. The old key stays bound to the
        // number in the reverse index (bindings are never removed), so it cannot be registered
        // to another number, and it no longer logs in (the account check wants the new key).
        let rec = Record::Account {
            user: v.phone,
            device: 0,
            static_key: v.static_key,
            ts_ms: now_ms,
        };
        let lsn = self.append(journal, &rec, true);
        let n = self.pending_accounts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        self.wait(
            lsn.append_id,
            Waiter::Account {
                key,
                static_key: v.static_key,
                ts_ms: now_ms,
                segment: lsn.segment,
                reply: v.reply,
            },
        );
    }

    // ----- prekey directory ----------------------------------------------------------------

    /// A `PrekeyUpload` from a logged-in device (this is its home shard). All or nothing.
    fn on_prekey_upload(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        key: DeviceKey,
        keys: DeviceKeys,
        one_time: Vec<OneTimePrekey>,
        journal: &mut dyn Journal,
    ) {
        if self.poisoned.is_some() {
            return self.upload_refused(conn, ErrorCode::StorageUnavailable, "storage unavailable");
        }
        // A top-up repeats the stored signed prekey, which was verified when it was stored
        // (verification is deterministic): only a new signature costs a verification.
        let verified_before = self.prekeys.get(&key).is_some_and(|d| {
            d.keys.identity_sign == keys.identity_sign
                && d.keys.signed_prekey == keys.signed_prekey
                && d.keys.signed_prekey_sig == keys.signed_prekey_sig
        });
        if !verified_before
            && verify_signed_prekey(
                &keys.identity_sign,
                &keys.signed_prekey,
                &keys.signed_prekey_sig,
            )
            .is_err()
        {
            return self.upload_refused(
                conn,
                ErrorCode::BadPrekeySignature,
                "signed prekey signature does not verify under the identity signing key",
            );
        }
        if !is_canonical_public(&keys.identity_dh)
            || !is_canonical_public(&keys.signed_prekey)
            || one_time.iter().any(|k| !is_canonical_public(&k.key))
        {
            return self.upload_refused(
                conn,
                ErrorCode::InvalidPrekey,
                "a key is not a canonical X25519 public key",
            );
        }
        let mut ids = BTreeSet::new();
        if !one_time.iter().all(|k| ids.insert(k.id)) {
            return self.upload_refused(
                conn,
                ErrorCode::InvalidPrekey,
                "a one-time prekey id appears twice",
            );
        }
        let current = self.prekeys.get(&key);
        let same_identity = current.is_some_and(|d| {
            d.keys.identity_dh == keys.identity_dh && d.keys.identity_sign == keys.identity_sign
        });
        let (generation, watermark, kept) = match current {
            Some(d) if same_identity => (d.generation, d.max_one_time_id, d.one_time.len()),
            Some(d) => (d.generation.saturating_add(1), 0, 0),
            None => (1, 0, 0),
        };
        // Ids at or below the watermark were uploaded before (a retry) and may be consumed.
        let fresh: Vec<OneTimePrekey> = one_time.into_iter().filter(|k| k.id > watermark).collect();
        let max = self
            .config
            .prekeys_per_device_max
            .min(MAX_PREKEY_BATCH_KEYS);
        if kept.saturating_add(fresh.len()) > max {
            let text = format!(
                "{kept} stored + {} new one-time prekeys exceed prekeys_per_device_max {max}",
                fresh.len()
            );
            return self.upload_refused(conn, ErrorCode::PrekeyLimit, &text);
        }
        let max_one_time_id = fresh.iter().map(|k| k.id).fold(watermark, u32::max);
        let unchanged =
            same_identity && fresh.is_empty() && current.is_some_and(|d| d.keys == keys);
        if !unchanged {
            let (user, device) = key;
            let rec = Record::PrekeyIdentity {
                user,
                device,
                generation,
                identity_dh: keys.identity_dh,
                identity_sign: keys.identity_sign,
                signed_prekey_id: keys.signed_prekey_id,
                signed_prekey: keys.signed_prekey,
                signed_prekey_sig: keys.signed_prekey_sig,
                max_one_time_id,
                ts_ms: now_ms,
            };
            let lsn = self.append(journal, &rec, true);
            let mut stored = BTreeMap::new();
            if let Some(old) = self.prekeys.remove(&key) {
                // The old record dies once its successor is durable.
                self.wait(
                    lsn.append_id,
                    Waiter::Kill {
                        segment: old.segment,
                    },
                );
                if same_identity {
                    stored = old.one_time;
                } else {
                    self.stats.prekeys_stored = self
                        .stats
                        .prekeys_stored
                        .saturating_sub(old.one_time.len() as u64);
                    for k in old.one_time.values() {
                        self.release_key(k.batch, lsn.append_id);
                    }
                }
            }
            if !fresh.is_empty() {
                let rec = Record::PrekeyBatch {
                    user,
                    device,
                    generation,
                    keys: fresh.iter().map(|k| (k.id, k.key)).collect(),
                };
                let batch_lsn = self.append(journal, &rec, true);
                let batch = self.new_batch(key, batch_lsn.segment, fresh.len(), generation);
                for k in &fresh {
                    stored.insert(k.id, OneTimeKey { key: k.key, batch });
                }
                self.stats.prekeys_stored =
                    self.stats.prekeys_stored.saturating_add(fresh.len() as u64);
            }
            self.prekeys.insert(
                key,
                PrekeyDevice {
                    keys,
                    generation,
                    max_one_time_id,
                    ts_ms: now_ms,
                    segment: lsn.segment,
                    one_time: stored,
                },
            );
        }
        self.stats.prekey_uploads = self.stats.prekey_uploads.saturating_add(1);
        self.wait(self.last_append_id, Waiter::PrekeyUploaded { conn, key });
    }

    fn upload_refused(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.stats.prekey_uploads_refused = self.stats.prekey_uploads_refused.saturating_add(1);
        self.send(conn, Frame::error(code, 0, text));
    }

    fn new_batch(
        &mut self,
        owner: DeviceKey,
        segment: SegmentId,
        keys: usize,
        generation: u32,
    ) -> u64 {
        let batch = self.next_batch;
        self.next_batch = self.next_batch.saturating_add(1);
        self.batches.insert(
            batch,
            Batch {
                owner,
                segment,
                live: u32::try_from(keys).unwrap_or(u32::MAX),
                generation,
            },
        );
        batch
    }

    /// A key of `batch` left the store because of the append `cause`: when it was the batch's
    /// last key, the batch record dies once `cause` is durable.
    fn release_key(&mut self, batch: u64, cause: u64) {
        if let Some(segment) = drop_from_batch(&mut self.batches, batch) {
            self.wait(cause, Waiter::Kill { segment });
        }
    }

    /// A `PrekeyFetch` from a logged-in device (requester side): rate limit, then ask the home
    /// shard of the target.
    fn on_prekey_fetch_frame(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        requester: DeviceKey,
        request_id: u64,
        user: UserId,
        device: DeviceId,
    ) {
        let (limit, max) = (
            self.config.prekey_fetches_per_requester_per_minute,
            self.config.prekey_rate_table_max_entries,
        );
        if !self.fetch_limits.hit(requester, now_ms, limit, max) {
            self.stats.prekey_fetches_rate_limited =
                self.stats.prekey_fetches_rate_limited.saturating_add(1);
            return self.send(
                conn,
                Frame::error(
                    ErrorCode::PrekeyFetchRateLimited,
                    request_id,
                    "too many prekey fetches; try again in a minute",
                ),
            );
        }
        let reply = self.here(conn);
        self.mesh(
            home_shard(user, self.config.shards),
            MeshMsg::PrekeyFetch {
                reply,
                request_id,
                user,
                device,
            },
        );
    }

    /// Home side of a fetch: take one one-time prekey, log its consumption, and answer once
    /// that (and everything before it) is durable.
    fn on_prekey_fetch(
        &mut self,
        reply: ConnRef,
        request_id: u64,
        user: UserId,
        device: DeviceId,
        journal: &mut dyn Journal,
    ) {
        let key = (user, device);
        let fail = |code| MeshMsg::PrekeyFetchResult {
            conn: reply.conn,
            request_id,
            result: Err(code),
        };
        if home_shard(user, self.config.shards) != self.config.shard
            || !self.prekeys.contains_key(&key)
        {
            return self.mesh(reply.shard, fail(ErrorCode::NoSuchRecipient));
        }
        if self.poisoned.is_some() {
            return self.mesh(reply.shard, fail(ErrorCode::StorageUnavailable));
        }
        let Some(dev) = self.prekeys.get_mut(&key) else {
            return;
        };
        let keys = dev.keys;
        let taken = dev.one_time.pop_first();
        let remaining = dev.one_time.len();
        let one_time = match taken {
            Some((id, k)) => {
                let lsn = self.append(journal, &Record::PrekeyConsumed { user, device, id }, false);
                self.release_key(k.batch, lsn.append_id);
                self.stats.prekeys_consumed = self.stats.prekeys_consumed.saturating_add(1);
                self.stats.prekeys_stored = self.stats.prekeys_stored.saturating_sub(1);
                Some(OneTimePrekey { id, key: k.key })
            }
            None => {
                self.stats.prekey_bundles_without_one_time =
                    self.stats.prekey_bundles_without_one_time.saturating_add(1);
                None
            }
        };
        self.stats.prekey_fetches = self.stats.prekey_fetches.saturating_add(1);
        // Everything appended so far: the marker, and the records that published these keys.
        let at = self.last_append_id;
        let bundle = FetchedBundle {
            user,
            device,
            keys: Box::new(keys),
            one_time,
        };
        self.wait(
            at,
            Waiter::PrekeyReply {
                reply,
                request_id,
                bundle,
            },
        );
        if remaining == 0 || remaining < self.config.prekey_low_water as usize {
            self.wait(at, Waiter::PrekeyNotice { key });
        }
    }

    /// Requester side: the bundle (or error) for a fetch.
    fn on_prekey_fetch_result(
        &mut self,
        conn: ConnId,
        request_id: u64,
        result: Result<FetchedBundle, ErrorCode>,
    ) {
        // The connection may be gone: the client fetches again after reconnecting (the key
        // handed out meanwhile is burnt, never reused).
        if !matches!(self.conns.get(&conn), Some(Conn::LoggedIn(_))) {
            return;
        }
        let frame = match result {
            Ok(b) => Frame::PrekeyBundle {
                request_id,
                user: b.user,
                device: b.device,
                keys: Box::new(*b.keys),
                one_time: b.one_time,
            },
            Err(code) => Frame::error(code, request_id, code.name()),
        };
        self.send(conn, frame);
    }

    /// `PrekeyStatus` for `key` if it holds fewer one-time prekeys than the low-water mark (or
    /// none, or never uploaded).
    fn low_prekeys_status(&self, key: DeviceKey) -> Option<Frame> {
        let remaining = self.prekeys.get(&key).map_or(0, |d| d.one_time.len());
        let low_water = self.config.prekey_low_water;
        if remaining != 0 && remaining >= low_water as usize {
            return None;
        }
        Some(Frame::PrekeyStatus {
            one_time_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            low_water,
            reason: if remaining == 0 {
                PrekeyStatusReason::Exhausted
            } else {
                PrekeyStatusReason::BelowLowWater
            },
        })
    }

    /// Tells the owner, if it is online with `PREKEYS`, that it runs low.
    fn prekey_notice(&mut self, key: DeviceKey) {
        let Some(&conn) = self.online.get(&key) else {
            return;
        };
        let wants = matches!(
            self.conns.get(&conn),
            Some(Conn::LoggedIn(s)) if s.capabilities & capability::PREKEYS != 0
        );
        if !wants {
            return;
        }
        if let Some(frame) = self.low_prekeys_status(key) {
            self.send(conn, frame);
        }
    }

    /// An upload is durable: tell the uploading connection (if it is still there).
    fn prekey_uploaded(&mut self, conn: ConnId, key: DeviceKey) {
        match self.conns.get(&conn) {
            Some(Conn::LoggedIn(s)) if (s.user, s.device) == key => {}
            _ => return,
        }
        let remaining = self.prekeys.get(&key).map_or(0, |d| d.one_time.len());
        self.send(
            conn,
            Frame::PrekeyStatus {
                one_time_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                low_water: self.config.prekey_low_water,
                reason: PrekeyStatusReason::Uploaded,
            },
        );
    }

    fn on_mesh(&mut self, now_ms: u64, from: ShardId, msg: MeshMsg, journal: &mut dyn Journal) {
        match msg {
            MeshMsg::Store { reply, msg } => self.on_store(now_ms, reply, msg, journal),
            MeshMsg::SendResult {
                conn,
                client_msg_id,
                result,
            } => self.on_send_result(from, conn, client_msg_id, result),
            MeshMsg::StoreReceipt {
                to_user,
                to_device,
                from_user,
                from_device,
                client_msg_id,
                kind,
                ts_ms,
            } => self.on_store_receipt(
                to_user,
                to_device,
                from_user,
                from_device,
                client_msg_id,
                kind,
                ts_ms,
                journal,
            ),
            MeshMsg::ToConn { conn, frame } => {
                if self.conns.contains_key(&conn) {
                    self.send(conn, frame);
                }
            }
            MeshMsg::RegisterRequest { reply, phone } => {
                self.on_register_request(now_ms, reply, phone)
            }
            MeshMsg::RegisterVerify {
                reply,
                phone,
                code,
                static_key,
            } => self.on_register_verify(now_ms, reply, phone, code, static_key),
            MeshMsg::ClaimKey {
                reply_shard,
                token,
                static_key,
                user,
                device,
            } => self.on_claim_key(
                now_ms,
                reply_shard,
                token,
                static_key,
                user,
                device,
                journal,
            ),
            MeshMsg::KeyClaimed { token, result } => {
                self.on_key_claimed(now_ms, token, result, journal)
            }
            MeshMsg::PrekeyFetch {
                reply,
                request_id,
                user,
                device,
            } => self.on_prekey_fetch(reply, request_id, user, device, journal),
            MeshMsg::PrekeyFetchResult {
                conn,
                request_id,
                result,
            } => self.on_prekey_fetch_result(conn, request_id, result),
        }
    }

    // ----- durability ----------------------------------------------------------------------

    fn append(&mut self, journal: &mut dyn Journal, rec: &Record, live: bool) -> Lsn {
        let lsn = journal.append(rec);
        self.stats.appends = self.stats.appends.saturating_add(1);
        self.last_append_id = self.last_append_id.max(lsn.append_id);
        let info = self.segments.entry(lsn.segment).or_default();
        info.total = info.total.saturating_add(1);
        if live {
            info.live = info.live.saturating_add(1);
        }
        info.max_append_id = info.max_append_id.max(lsn.append_id);
        lsn
    }

    fn tombstone(&mut self, seq: u64, journal: &mut dyn Journal) {
        // A poisoned log refuses writes: the entry is gone from memory and may come back
        // after the restart, which at-least-once delivery allows.
        if self.poisoned.is_none() {
            self.append(journal, &Record::Tombstone { seq }, false);
        }
    }

    fn add_live(&mut self, segment: SegmentId) {
        let info = self.segments.entry(segment).or_default();
        info.live = info.live.saturating_add(1);
    }

    fn kill(&mut self, segment: SegmentId) {
        if let Some(info) = self.segments.get_mut(&segment) {
            info.live = info.live.saturating_sub(1);
        }
    }

    fn wait(&mut self, append_id: u64, waiter: Waiter) {
        self.waiters.entry(append_id).or_default().push(waiter);
    }

    /// Runs every waiter whose append is durable, in append order.
    fn fire_ready(&mut self, journal: &mut dyn Journal) {
        self.promote_fresh();
        let mut to_pump: BTreeSet<DeviceKey> = BTreeSet::new();
        let mut compactions: Vec<SegmentId> = Vec::new();
        while let Some(first) = self.waiters.first_entry() {
            if *first.key() > self.durable_up_to {
                break;
            }
            for waiter in first.remove() {
                match waiter {
                    Waiter::Stored { key, seq } => {
                        if self.online.contains_key(&key) {
                            to_pump.insert(key);
                        } else if let Some(Body::Message {
                            from_user,
                            msg_type,
                            ..
                        }) = self
                            .mailboxes
                            .get(&key)
                            .and_then(|m| m.get(seq))
                            .map(|e| &e.body)
                        {
                            // Offline: one content-free push per message (not for receipts).
                            let (from_user, msg_type) = (*from_user, *msg_type);
                            self.stats.pushes = self.stats.pushes.saturating_add(1);
                            self.actions.push(Action::Push {
                                user: key.0,
                                device: key.1,
                                from_user,
                                msg_type,
                            });
                        }
                    }
                    Waiter::SendReply {
                        reply,
                        client_msg_id,
                        ts_ms,
                    } => self.send_result(reply, client_msg_id, Ok(ts_ms)),
                    Waiter::Account {
                        key,
                        static_key,
                        ts_ms,
                        segment,
                        reply,
                    } => {
                        self.pending_account_done(key);
                        if let Some(old) = self.accounts.insert(
                            key,
                            Account {
                                static_key,
                                ts_ms,
                                segment,
                            },
                        ) {
                            // The replaced record dies only now that its successor is durable.
                            self.kill(old.segment);
                        }
                        self.stats.registrations = self.stats.registrations.saturating_add(1);
                        self.reply(
                            reply,
                            Frame::Registered {
                                user: key.0,
                                device: key.1,
                            },
                        );
                    }
                    Waiter::Binding {
                        static_key,
                        segment,
                    } => {
                        if let Some(p) = self.pending_bindings.remove(&static_key) {
                            let binding = Binding {
                                user: p.user,
                                device: p.device,
                                ts_ms: p.ts_ms,
                                segment,
                            };
                            self.bindings.insert(static_key, binding);
                            for (shard, token) in p.answers {
                                self.mesh(
                                    shard,
                                    MeshMsg::KeyClaimed {
                                        token,
                                        result: Ok(()),
                                    },
                                );
                            }
                        }
                    }
                    Waiter::Compaction { segment } => compactions.push(segment),
                    Waiter::Kill { segment } => self.kill(segment),
                    Waiter::PrekeyReply {
                        reply,
                        request_id,
                        bundle,
                    } => self.mesh(
                        reply.shard,
                        MeshMsg::PrekeyFetchResult {
                            conn: reply.conn,
                            request_id,
                            result: Ok(bundle),
                        },
                    ),
                    Waiter::PrekeyUploaded { conn, key } => self.prekey_uploaded(conn, key),
                    Waiter::PrekeyNotice { key } => self.prekey_notice(key),
                }
            }
        }
        for key in to_pump {
            self.pump(key);
        }
        for segment in compactions {
            self.finish_compaction(segment, journal);
        }
    }

    fn pending_account_done(&mut self, key: DeviceKey) {
        if let Some(n) = self.pending_accounts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_accounts.remove(&key);
            }
        }
    }

    fn on_storage_failed(&mut self, reason: String) {
        self.poisoned = Some(reason);
        // Nothing pending will become durable: answer what can be answered with an error.
        let waiters = std::mem::take(&mut self.waiters);
        for waiter in waiters.into_values().flatten() {
            match waiter {
                Waiter::SendReply {
                    reply,
                    client_msg_id,
                    ..
                } => self.send_result(reply, client_msg_id, Err(ErrorCode::StorageUnavailable)),
                Waiter::Account { key, reply, .. } => {
                    self.pending_account_done(key);
                    self.reply_error(reply, ErrorCode::StorageUnavailable, "storage unavailable");
                }
                Waiter::Binding { static_key, .. } => {
                    self.pending_bindings.remove(&static_key);
                }
                Waiter::Stored { .. } | Waiter::Kill { .. } | Waiter::PrekeyNotice { .. } => {}
                Waiter::Compaction { .. } => self.compacting = None,
                Waiter::PrekeyReply {
                    reply, request_id, ..
                } => self.mesh(
                    reply.shard,
                    MeshMsg::PrekeyFetchResult {
                        conn: reply.conn,
                        request_id,
                        result: Err(ErrorCode::StorageUnavailable),
                    },
                ),
                Waiter::PrekeyUploaded { conn, .. } => {
                    if matches!(self.conns.get(&conn), Some(Conn::LoggedIn(_))) {
                        self.send(
                            conn,
                            Frame::error(ErrorCode::StorageUnavailable, 0, "storage unavailable"),
                        );
                    }
                }
            }
        }
    }

    // ----- timer: TTL, registration sweep, segments -----------------------------------------

    fn on_tick(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        self.expire(now_ms);
        self.sweep_registration(now_ms);
        if self.poisoned.is_none() {
            self.delete_segments(journal);
            self.maybe_compact(journal);
        }
    }

    /// Drops entries past the TTL, oldest seq first. Seqs follow arrival time, so the walk stops
    /// at the first live entry (a clock stepping back only delays expiry). No record: recovery
    /// applies the same rule.
    fn expire(&mut self, now_ms: u64) {
        while let Some((&seq, &key)) = self.seq_index.first_key_value() {
            let ts = self
                .mailboxes
                .get(&key)
                .and_then(|m| m.get(seq))
                .map(|e| e.ts_ms);
            match ts {
                Some(ts) if expired(ts, now_ms, self.config.message_ttl_ms) => {
                    self.remove_entry(key, seq);
                    self.stats.expired = self.stats.expired.saturating_add(1);
                }
                Some(_) => break,
                // Index out of step with the mailbox (not expected): repair it.
                None => {
                    self.seq_index.remove(&seq);
                }
            }
        }
    }

    fn sweep_registration(&mut self, now_ms: u64) {
        self.fetch_limits.sweep(now_ms);
        self.ip_limits.sweep(now_ms);
        self.number_limits.sweep(now_ms);
        // Keep an expired code one more lifetime so the late verify gets CodeExpired rather
        // than NoPendingCode.
        let ttl = self.config.registration_code_ttl_ms;
        self.codes
            .retain(|_, c| now_ms < c.expires_at_ms.saturating_add(ttl));
        self.fail_verifies(
            |v| now_ms.saturating_sub(v.started_ms) >= ttl,
            "key registry did not answer; register again",
        );
    }

    /// Answers `StorageUnavailable` to every pending verification `pred` selects (in token
    /// order, for determinism) and forgets it.
    fn fail_verifies(&mut self, pred: impl Fn(&PendingVerify) -> bool, text: &str) {
        let mut tokens: Vec<u64> = self
            .verifies
            .iter()
            .filter(|(_, v)| pred(v))
            .map(|(&t, _)| t)
            .collect();
        tokens.sort_unstable();
        for token in tokens {
            if let Some(v) = self.verifies.remove(&token) {
                self.reply_error(v.reply, ErrorCode::StorageUnavailable, text);
            }
        }
    }

    /// Deletes sealed segments with nothing live, oldest first, stopping at the first that must
    /// stay (a tombstone in a younger segment may still refer to its records).
    fn delete_segments(&mut self, journal: &mut dyn Journal) {
        self.promote_fresh();
        let active = journal.active_segment();
        while let Some((&id, info)) = self.segments.first_key_value() {
            let deletable = id != active
                && info.live == 0
                && info.max_append_id <= self.durable_up_to
                && self.compacting != Some(id);
            if !deletable {
                break;
            }
            if !self.keeps_high_water(id) {
                // Only the seq high-water mark holds this segment back: write a newer one and
                // delete once it is durable (a later Tick).
                if self.pending_fresh.is_empty() {
                    self.append_seq_marker(journal);
                }
                break;
            }
            self.segments.remove(&id);
            journal.delete_segment(id);
            self.stats.segments_deleted = self.stats.segments_deleted.saturating_add(1);
        }
    }

    /// If the oldest sealed segment is mostly dead, re-appends its live records (same seq, same
    /// content) and deletes it once those re-appends are durable.
    fn maybe_compact(&mut self, journal: &mut dyn Journal) {
        if self.compacting.is_some() {
            return;
        }
        let active = journal.active_segment();
        let Some((&id, info)) = self.segments.first_key_value() else {
            return;
        };
        // Only a fully durable segment: its records are the ones recovery would see.
        if id == active
            || info.live == 0
            || info.total == 0
            || info.max_append_id > self.durable_up_to
        {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let fraction = info.live as f64 / info.total as f64;
        if fraction >= self.config.compaction_live_ratio {
            return;
        }
        let mut live: Vec<LiveRef> = Vec::new();
        for (&key, mailbox) in &self.mailboxes {
            live.extend(
                mailbox
                    .iter()
                    .filter(|(_, e)| e.segment == id)
                    .map(|(&seq, _)| LiveRef::Entry(seq, key)),
            );
        }
        for (&key, account) in &self.accounts {
            // Behind a newer pending record it must not be re-appended (the last record wins
            // at recovery); it dies when that one is durable, which the wait below covers.
            if account.segment == id && !self.pending_accounts.contains_key(&key) {
                live.push(LiveRef::Account(key));
            }
        }
        for (&static_key, binding) in &self.bindings {
            if binding.segment == id {
                live.push(LiveRef::Binding(static_key));
            }
        }
        // The device's current identity record (a superseded one is not in memory), then its
        // batches: identity first, so the copies replay in the same order.
        for (&key, dev) in &self.prekeys {
            if dev.segment == id {
                live.push(LiveRef::PrekeyIdentity(key));
            }
        }
        for (&batch, b) in &self.batches {
            if b.segment == id {
                live.push(LiveRef::PrekeyBatch(batch));
            }
        }
        live.sort_unstable();
        for item in live {
            match item {
                LiveRef::Entry(seq, key) => {
                    let Some(rec) = self
                        .mailboxes
                        .get(&key)
                        .and_then(|m| m.get(seq))
                        .map(|e| e.record(seq, key.0, key.1))
                    else {
                        continue;
                    };
                    let lsn = self.append(journal, &rec, true);
                    self.kill(id);
                    if let Some(e) = self.mailboxes.get_mut(&key).and_then(|m| m.get_mut(seq)) {
                        e.segment = lsn.segment;
                    }
                }
                LiveRef::Account(key) => {
                    let Some(a) = self.accounts.get(&key).copied() else {
                        continue;
                    };
                    let rec = Record::Account {
                        user: key.0,
                        device: key.1,
                        static_key: a.static_key,
                        ts_ms: a.ts_ms,
                    };
                    let lsn = self.append(journal, &rec, true);
                    self.kill(id);
                    self.accounts.insert(
                        key,
                        Account {
                            segment: lsn.segment,
                            ..a
                        },
                    );
                }
                LiveRef::Binding(static_key) => {
                    let Some(b) = self.bindings.get(&static_key).copied() else {
                        continue;
                    };
                    let rec = Record::KeyBinding {
                        static_key,
                        user: b.user,
                        device: b.device,
                        ts_ms: b.ts_ms,
                    };
                    let lsn = self.append(journal, &rec, true);
                    self.kill(id);
                    self.bindings.insert(
                        static_key,
                        Binding {
                            segment: lsn.segment,
                            ..b
                        },
                    );
                }
                LiveRef::PrekeyIdentity(key) => self.copy_prekey_identity(key, id, journal),
                LiveRef::PrekeyBatch(batch) => self.copy_prekey_batch(batch, id, journal),
            }
        }
        // The old segment may hold the seq high-water mark: carry it forward too.
        self.append_seq_marker(journal);
        // Until the copies (and any pending record that replaces one not copied) are durable
        // the old segment is the only durable home of these records: it waits.
        self.compacting = Some(id);
        self.wait(self.last_append_id, Waiter::Compaction { segment: id });
    }

    /// Compaction: re-appends a device's current identity record unchanged.
    fn copy_prekey_identity(&mut self, key: DeviceKey, from: SegmentId, journal: &mut dyn Journal) {
        let Some(d) = self.prekeys.get(&key) else {
            return;
        };
        let rec = Record::PrekeyIdentity {
            user: key.0,
            device: key.1,
            generation: d.generation,
            identity_dh: d.keys.identity_dh,
            identity_sign: d.keys.identity_sign,
            signed_prekey_id: d.keys.signed_prekey_id,
            signed_prekey: d.keys.signed_prekey,
            signed_prekey_sig: d.keys.signed_prekey_sig,
            max_one_time_id: d.max_one_time_id,
            ts_ms: d.ts_ms,
        };
        let lsn = self.append(journal, &rec, true);
        self.kill(from);
        if let Some(d) = self.prekeys.get_mut(&key) {
            d.segment = lsn.segment;
        }
    }

    /// Compaction: re-appends the keys of `batch` that are still stored as a new batch record.
    fn copy_prekey_batch(&mut self, batch: u64, from: SegmentId, journal: &mut dyn Journal) {
        let Some(&Batch {
            owner, generation, ..
        }) = self.batches.get(&batch)
        else {
            return;
        };
        let (user, device) = owner;
        let keys: Vec<(u32, [u8; 32])> = self
            .prekeys
            .get(&owner)
            .map(|d| {
                d.one_time
                    .iter()
                    .filter(|(_, k)| k.batch == batch)
                    .map(|(&id, k)| (id, k.key))
                    .collect()
            })
            .unwrap_or_default();
        if keys.is_empty() {
            return;
        }
        let n = keys.len();
        let rec = Record::PrekeyBatch {
            user,
            device,
            generation,
            keys,
        };
        let lsn = self.append(journal, &rec, true);
        let copy = self.new_batch(owner, lsn.segment, n, generation);
        if let Some(d) = self.prekeys.get_mut(&(user, device)) {
            for k in d.one_time.values_mut() {
                if k.batch == batch {
                    k.batch = copy;
                }
            }
        }
        // The old record's keys all moved: it is dead (its segment waits for the copies).
        self.batches.remove(&batch);
        self.kill(from);
    }

    fn finish_compaction(&mut self, segment: SegmentId, journal: &mut dyn Journal) {
        if self.compacting == Some(segment) {
            self.compacting = None;
        }
        let oldest = self
            .segments
            .first_key_value()
            .map(|(&id, info)| (id, info.live));
        // Still the oldest and now empty (it should be); otherwise leave it for a later Tick.
        if oldest == Some((segment, 0))
            && segment != journal.active_segment()
            && self.poisoned.is_none()
            && self.keeps_high_water(segment)
        {
            self.segments.remove(&segment);
            journal.delete_segment(segment);
            self.stats.segments_deleted = self.stats.segments_deleted.saturating_add(1);
            self.stats.segments_compacted = self.stats.segments_compacted.saturating_add(1);
        }
    }

    /// Records that `lsn` carries a seq above every seq in older segments.
    fn note_fresh(&mut self, lsn: Lsn) {
        self.promote_fresh();
        // The first fresh append of a segment is the one that becomes durable first.
        if self
            .pending_fresh
            .back()
            .is_none_or(|&(_, seg)| seg != lsn.segment)
        {
            self.pending_fresh.push_back((lsn.append_id, lsn.segment));
        }
    }

    fn promote_fresh(&mut self) {
        while let Some(&(append_id, segment)) = self.pending_fresh.front() {
            if append_id > self.durable_up_to {
                break;
            }
            self.fresh_durable_segment = self.fresh_durable_segment.max(Some(segment));
            self.pending_fresh.pop_front();
        }
    }

    /// Whether deleting `segment` leaves a durable record with a seq at least as high as any
    /// in it: one in a younger segment written after everything in it.
    fn keeps_high_water(&self, segment: SegmentId) -> bool {
        self.fresh_durable_segment.is_some_and(|f| segment < f)
    }

    /// A tombstone for a seq never given to an entry: it kills nothing, and recovery (which
    /// takes tombstones into account) will start above it.
    fn append_seq_marker(&mut self, journal: &mut dyn Journal) {
        let seq = self.take_seq();
        let lsn = self.append(journal, &Record::Tombstone { seq }, false);
        self.note_fresh(lsn);
    }

    fn refresh_gauges(&mut self) {
        self.stats.mailbox_depth = self.seq_index.len() as u64;
        self.stats.connections_logged_in = self.online.len() as u64;
    }
}

/// A device's prekey state while the log is replayed.
#[derive(Debug, Default)]
struct RecoveredPrekeys {
    identity: Option<RecoveredIdentity>,
    one_time: BTreeMap<u32, OneTimeKey>,
}

/// The latest `PrekeyIdentity` record of a device seen so far.
#[derive(Debug)]
struct RecoveredIdentity {
    keys: DeviceKeys,
    generation: u32,
    max_one_time_id: u32,
    ts_ms: u64,
    segment: SegmentId,
}

/// One key of `batch` is gone (consumed or replaced). Returns the batch's segment when that was
/// its last key: the record is dead.
fn drop_from_batch(batches: &mut HashMap<u64, Batch>, batch: u64) -> Option<SegmentId> {
    let b = batches.get_mut(&batch)?;
    b.live = b.live.saturating_sub(1);
    if b.live > 0 {
        return None;
    }
    let segment = b.segment;
    batches.remove(&batch);
    Some(segment)
}

/// Tracks the highest seq and the (latest) segment holding it.
fn note_max(max_seq: &mut u64, max_seq_segment: &mut Option<SegmentId>, seq: u64, seg: SegmentId) {
    if seq >= *max_seq {
        *max_seq = seq;
        *max_seq_segment = Some(max_seq_segment.map_or(seg, |s| s.max(seg)));
    }
}

fn expired(ts_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    ts_ms.saturating_add(ttl_ms) <= now_ms
}

/// Keeps one copy per seq: the one in the latest segment (the older copy is compaction's
/// leftover and its segment is on its way out).
fn insert_latest(
    entries: &mut BTreeMap<u64, (SegmentId, DeviceKey, Entry)>,
    seq: u64,
    seg: SegmentId,
    key: DeviceKey,
    entry: Entry,
) {
    let keep_old = entries
        .get(&seq)
        .is_some_and(|(old_seg, _, _)| *old_seg > seg);
    if !keep_old {
        entries.insert(
            seq,
            (
                seg,
                key,
                Entry {
                    segment: seg,
                    ..entry
                },
            ),
        );
    }
}
