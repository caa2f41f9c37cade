//! The prekey directory of the devices homed here, and the fetch limit of the requesters on
//! this shard.
//!
//! * **A one-time prekey is handed out at most once, ever.** A fetch takes the key out of memory
//!   and appends a `PrekeyConsumed` marker; the bundle is answered only once everything
//!   appended so far (the marker included) is durable. A crash before that loses the marker and
//!   the answer together, so the key may be handed out again only because nobody got it; after
//!   the answer the marker is durable and recovery removes the key.
//! * **Liveness.** A device's current `PrekeyIdentity` record is live; a `PrekeyBatch` is live
//!   while one of its keys is neither consumed nor replaced (by a newer identity, or by a
//!   compaction copy); a `PrekeyConsumed` marker is never live. A record superseded by an
//!   append dies only once that append is durable (`Waiter::Kill`).
//! * **Generations.** Each identity change of a device starts a new generation; batches carry
//!   theirs, and recovery keeps only the keys of the device's final generation.
//! * Uploads and fetches need a login. An upload is all or nothing: a bad signature
//!   (`BadPrekeySignature`), a non-canonical X25519 key or a repeated one-time id
//!   (`InvalidPrekey`), or more one-time keys than `prekeys_per_device_max` (`PrekeyLimit`)
//!   store nothing. Within one identity, one-time ids at or below the highest ever uploaded
//!   are skipped (a retried upload must not bring back a consumed key). A fetch hands out the
//!   lowest id. `PrekeyStatus` goes only to connections that announced `PREKEYS`.

use crate::types::HashMap;
use std::collections::{BTreeMap, BTreeSet};

use crate::record::MAX_PREKEY_BATCH_KEYS;
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatus, PrekeyStatusReason};
use protocol::{capability, DeviceAddr, ErrorCode, Frame};
use storage::SegmentId;

use crate::record::Record;
use switchboard_e2ee::keys::is_canonical_public;
use switchboard_e2ee::verify_signed_prekey;

use crate::ledger::Log;
use crate::limits::RateTable;
use crate::out::Out;
use crate::registry::Registry;
use crate::waiter::Waiter;
use crate::{home_shard, Config, ConnId, FetchedBundle, MeshMsg, PrekeyFetch, PrekeyFetchResult};

/// Prekey fetch windows are per minute (`prekey_fetches_per_requester_per_minute`).
const MINUTE_MS: u64 = 60_000;

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
    owner: DeviceAddr,
    segment: SegmentId,
    live: u32,
    generation: u32,
}

/// What an accepted upload changes.
#[derive(Debug)]
struct Accepted {
    keys: DeviceKeys,
    generation: u32,
    same_identity: bool,
    fresh: Vec<OneTimePrekey>,
    max_one_time_id: u32,
}

/// The limits the directory enforces (copied from [`Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    shard: crate::ShardId,
    shards: u16,
    prekey_low_water: u32,
    prekeys_per_device_max: usize,
    fetches_per_minute: u32,
    rate_table_max_entries: usize,
}

/// The directory.
#[derive(Debug)]
pub(crate) struct Prekeys {
    limits: Limits,
    /// Published prekeys of devices homed here.
    devices: HashMap<DeviceAddr, PrekeyDevice>,
    /// Live `PrekeyBatch` records by in-memory batch number.
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// Per-requester fetch limit (requester side).
    fetch_limits: RateTable<DeviceAddr>,
    /// Counters (see [`crate::ShardStats`]).
    pub uploads: u64,
    pub uploads_refused: u64,
    pub fetches: u64,
    pub consumed: u64,
    pub without_one_time: u64,
    pub rate_limited: u64,
    /// One-time prekeys stored (gauge).
    pub stored: u64,
}

impl Prekeys {
    pub fn new(cfg: &Config) -> Self {
        Self {
            limits: Limits {
                shard: cfg.shard,
                shards: cfg.shards,
                prekey_low_water: cfg.prekey_low_water,
                prekeys_per_device_max: cfg.prekeys_per_device_max,
                fetches_per_minute: cfg.prekey_fetches_per_requester_per_minute,
                rate_table_max_entries: cfg.prekey_rate_table_max_entries,
            },
            devices: HashMap::default(),
            batches: HashMap::default(),
            next_batch: 1,
            fetch_limits: RateTable::new(MINUTE_MS),
            uploads: 0,
            uploads_refused: 0,
            fetches: 0,
            consumed: 0,
            without_one_time: 0,
            rate_limited: 0,
            stored: 0,
        }
    }

    /// The one-time prekey ids stored for `key`, lowest first.
    pub fn one_time_ids(&self, key: DeviceAddr) -> Option<Vec<u32>> {
        self.devices
            .get(&key)
            .map(|d| d.one_time.keys().copied().collect())
    }

    /// The keys published for `key` (identity and signed prekey).
    pub fn identity(&self, key: DeviceAddr) -> Option<&DeviceKeys> {
        self.devices.get(&key).map(|d| &d.keys)
    }

    /// Everything published for `key`.
    pub fn published(&self, key: DeviceAddr) -> Option<(DeviceKeys, Vec<OneTimePrekey>)> {
        self.devices.get(&key).map(|d| {
            let one_time = d
                .one_time
                .iter()
                .map(|(&id, k)| OneTimePrekey { id, key: k.key })
                .collect();
            (d.keys, one_time)
        })
    }

    /// Timer: forget ended fetch windows.
    pub fn sweep(&mut self, now_ms: u64) {
        self.fetch_limits.sweep(now_ms);
    }

    // ----- upload ------------------------------------------------------------------------

    /// A `PrekeyUpload` from a logged-in device (this is its home shard). All or nothing.
    pub fn upload(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        key: DeviceAddr,
        (keys, one_time): (DeviceKeys, Vec<OneTimePrekey>),
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        if log.ledger.is_poisoned() {
            return self.refuse(
                conn,
                ErrorCode::StorageUnavailable,
                "storage unavailable",
                out,
            );
        }
        let accepted = match self.check_upload(key, keys, one_time) {
            Ok(a) => a,
            Err((code, text)) => return self.refuse(conn, code, &text, out),
        };
        let unchanged = accepted.same_identity
            && accepted.fresh.is_empty()
            && self.devices.get(&key).is_some_and(|d| d.keys == keys);
        if !unchanged {
            self.apply_upload(now_ms, key, accepted, log);
        }
        self.uploads = self.uploads.saturating_add(1);
        log.ledger.wait_all(Waiter::PrekeyUploaded { conn, key });
    }

    /// Validates an upload against what `key` has: signature, keys, ids, the per-device cap.
    fn check_upload(
        &self,
        key: DeviceAddr,
        keys: DeviceKeys,
        one_time: Vec<OneTimePrekey>,
    ) -> Result<Accepted, (ErrorCode, String)> {
        let current = self.devices.get(&key);
        // A top-up repeats the stored signed prekey, which was verified when it was stored
        // (verification is deterministic): only a new signature costs a verification.
        let verified_before = current.is_some_and(|d| {
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
            let text = "signed prekey signature does not verify under the identity signing key";
            return Err((ErrorCode::BadPrekeySignature, text.to_owned()));
        }
        if !is_canonical_public(&keys.identity_dh)
            || !is_canonical_public(&keys.signed_prekey)
            || one_time.iter().any(|k| !is_canonical_public(&k.key))
        {
            let text = "a key is not a canonical X25519 public key";
            return Err((ErrorCode::InvalidPrekey, text.to_owned()));
        }
        let mut ids = BTreeSet::new();
        if !one_time.iter().all(|k| ids.insert(k.id)) {
            let text = "a one-time prekey id appears twice";
            return Err((ErrorCode::InvalidPrekey, text.to_owned()));
        }
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
            .limits
            .prekeys_per_device_max
            .min(MAX_PREKEY_BATCH_KEYS);
        if kept.saturating_add(fresh.len()) > max {
            let text = format!(
                "{kept} stored + {} new one-time prekeys exceed prekeys_per_device_max {max}",
                fresh.len()
            );
            return Err((ErrorCode::PrekeyLimit, text));
        }
        let max_one_time_id = fresh.iter().map(|k| k.id).fold(watermark, u32::max);
        Ok(Accepted {
            keys,
            generation,
            same_identity,
            fresh,
            max_one_time_id,
        })
    }

    /// Appends the identity record (and a batch of the fresh one-time keys) and switches to it.
    fn apply_upload(&mut self, now_ms: u64, key: DeviceAddr, a: Accepted, log: &mut Log<'_>) {
        let DeviceAddr { user, device } = key;
        let rec = Record::PrekeyIdentity {
            user,
            device,
            generation: a.generation,
            identity_dh: a.keys.identity_dh,
            identity_sign: a.keys.identity_sign,
            signed_prekey_id: a.keys.signed_prekey_id,
            signed_prekey: a.keys.signed_prekey,
            signed_prekey_sig: a.keys.signed_prekey_sig,
            max_one_time_id: a.max_one_time_id,
            ts_ms: now_ms,
        };
        let lsn = log.append(&rec, true);
        let mut stored = BTreeMap::new();
        if let Some(old) = self.devices.remove(&key) {
            // The old record dies once its successor is durable.
            let kill = Waiter::Kill {
                segment: old.segment,
            };
            log.ledger.wait(lsn.append_id, kill);
            if a.same_identity {
                stored = old.one_time;
            } else {
                self.stored = self.stored.saturating_sub(old.one_time.len() as u64);
                for k in old.one_time.values() {
                    self.release_key(k.batch, lsn.append_id, log);
                }
            }
        }
        if !a.fresh.is_empty() {
            let rec = Record::PrekeyBatch {
                user,
                device,
                generation: a.generation,
                keys: a.fresh.iter().map(|k| (k.id, k.key)).collect(),
            };
            let batch_lsn = log.append(&rec, true);
            let batch = self.new_batch(key, batch_lsn.segment, a.fresh.len(), a.generation);
            for k in &a.fresh {
                stored.insert(k.id, OneTimeKey { key: k.key, batch });
            }
            self.stored = self.stored.saturating_add(a.fresh.len() as u64);
        }
        let dev = PrekeyDevice {
            keys: a.keys,
            generation: a.generation,
            max_one_time_id: a.max_one_time_id,
            ts_ms: now_ms,
            segment: lsn.segment,
            one_time: stored,
        };
        self.devices.insert(key, dev);
    }

    fn refuse(&mut self, conn: ConnId, code: ErrorCode, text: &str, out: &mut Out) {
        self.uploads_refused = self.uploads_refused.saturating_add(1);
        out.send(conn, Frame::error(code, 0, text));
    }

    fn new_batch(
        &mut self,
        owner: DeviceAddr,
        segment: SegmentId,
        keys: usize,
        generation: u32,
    ) -> u64 {
        let batch = self.next_batch;
        self.next_batch = self.next_batch.saturating_add(1);
        let live = u32::try_from(keys).unwrap_or(u32::MAX);
        self.batches.insert(
            batch,
            Batch {
                owner,
                segment,
                live,
                generation,
            },
        );
        batch
    }

    /// A key of `batch` left the store because of the append `cause`: when it was the batch's
    /// last key, the batch record dies once `cause` is durable.
    fn release_key(&mut self, batch: u64, cause: u64, log: &mut Log<'_>) {
        if let Some(segment) = drop_from_batch(&mut self.batches, batch) {
            log.ledger.wait(cause, Waiter::Kill { segment });
        }
    }

    // ----- fetch -------------------------------------------------------------------------

    /// A `PrekeyFetch` from a logged-in device (requester side): rate limit, then ask the home
    /// shard of the target.
    pub fn fetch_frame(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        requester: DeviceAddr,
        frame: &protocol::frame::PrekeyFetch,
        out: &mut Out,
    ) {
        let request_id = frame.request_id;
        let (limit, max) = (
            self.limits.fetches_per_minute,
            self.limits.rate_table_max_entries,
        );
        if !self.fetch_limits.hit(requester, now_ms, limit, max) {
            self.rate_limited = self.rate_limited.saturating_add(1);
            let text = "too many prekey fetches; try again in a minute";
            let error = Frame::error(ErrorCode::PrekeyFetchRateLimited, request_id, text);
            return out.send(conn, error);
        }
        let fetch = PrekeyFetch {
            reply: out.here(conn),
            request_id,
            addr: frame.addr,
        };
        out.mesh(
            home_shard(frame.addr.user, self.limits.shards),
            MeshMsg::PrekeyFetch(fetch),
        );
    }

    /// Home side of a fetch: take one one-time prekey, log its consumption, and answer once
    /// that (and everything before it) is durable.
    pub fn fetch(&mut self, f: PrekeyFetch, log: &mut Log<'_>, out: &mut Out) {
        let key = f.addr;
        let fail = |code| {
            MeshMsg::PrekeyFetchResult(PrekeyFetchResult {
                conn: f.reply.conn,
                request_id: f.request_id,
                result: Err(code),
            })
        };
        if home_shard(key.user, self.limits.shards) != self.limits.shard
            || !self.devices.contains_key(&key)
        {
            return out.mesh(f.reply.shard, fail(ErrorCode::NoSuchRecipient));
        }
        if log.ledger.is_poisoned() {
            return out.mesh(f.reply.shard, fail(ErrorCode::StorageUnavailable));
        }
        let Some(dev) = self.devices.get_mut(&key) else {
            return;
        };
        let keys = dev.keys;
        let taken = dev.one_time.pop_first();
        let remaining = dev.one_time.len();
        let one_time = self.consume(key, taken, log);
        self.fetches = self.fetches.saturating_add(1);
        // Everything appended so far: the marker, and the records that published these keys.
        let at = log.ledger.last_append_id();
        let bundle = FetchedBundle {
            addr: key,
            keys: Box::new(keys),
            one_time,
        };
        let answer = Waiter::PrekeyReply {
            reply: f.reply,
            request_id: f.request_id,
            bundle,
        };
        log.ledger.wait(at, answer);
        if remaining == 0 || remaining < self.limits.prekey_low_water as usize {
            log.ledger.wait(at, Waiter::PrekeyNotice { key });
        }
    }

    /// Logs the consumption of the one-time key taken for a bundle (if any was left).
    fn consume(
        &mut self,
        key: DeviceAddr,
        taken: Option<(u32, OneTimeKey)>,
        log: &mut Log<'_>,
    ) -> Option<OneTimePrekey> {
        let Some((id, k)) = taken else {
            self.without_one_time = self.without_one_time.saturating_add(1);
            return None;
        };
        let DeviceAddr { user, device } = key;
        let lsn = log.append(&Record::PrekeyConsumed { user, device, id }, false);
        self.release_key(k.batch, lsn.append_id, log);
        self.consumed = self.consumed.saturating_add(1);
        self.stored = self.stored.saturating_sub(1);
        Some(OneTimePrekey { id, key: k.key })
    }

    /// `PrekeyStatus` for `key` if it holds fewer one-time prekeys than the low-water mark (or
    /// none, or never uploaded).
    pub fn low_status(&self, key: DeviceAddr) -> Option<Frame> {
        let low_water = self.limits.prekey_low_water;
        let remaining = self.devices.get(&key).map_or(0, |d| d.one_time.len());
        if remaining != 0 && remaining >= low_water as usize {
            return None;
        }
        let reason = if remaining == 0 {
            PrekeyStatusReason::EXHAUSTED
        } else {
            PrekeyStatusReason::BELOW_LOW_WATER
        };
        let status = PrekeyStatus {
            one_time_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            low_water,
            reason,
        };
        Some(status.into())
    }

    /// Tells the owner, if it is online with `PREKEYS`, that it runs low.
    pub fn notice(&self, key: DeviceAddr, registry: &Registry, out: &mut Out) {
        let Some(conn) = registry.online(key) else {
            return;
        };
        let wants = registry
            .session(conn)
            .is_some_and(|s| s.capabilities & capability::PREKEYS != 0);
        if !wants {
            return;
        }
        if let Some(frame) = self.low_status(key) {
            out.send(conn, frame);
        }
    }

    /// An upload is durable: tell the uploading connection (if it is still there).
    pub fn uploaded(&self, conn: ConnId, key: DeviceAddr, registry: &Registry, out: &mut Out) {
        if registry.session(conn).map(|s| s.key()) != Some(key) {
            return;
        }
        let remaining = self.devices.get(&key).map_or(0, |d| d.one_time.len());
        out.send(
            conn,
            PrekeyStatus {
                one_time_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                low_water: self.limits.prekey_low_water,
                reason: PrekeyStatusReason::UPLOADED,
            }
            .into(),
        );
    }

    /// A device was removed: its keys go. Returns the segments of its records (they die once
    /// the removal record is durable; recovery drops what was recorded before it).
    pub fn remove_device(&mut self, key: DeviceAddr) -> Vec<SegmentId> {
        let Some(d) = self.devices.remove(&key) else {
            return Vec::new();
        };
        let mut dead = vec![d.segment];
        self.stored = self.stored.saturating_sub(d.one_time.len() as u64);
        for k in d.one_time.values() {
            dead.extend(drop_from_batch(&mut self.batches, k.batch));
        }
        dead
    }

    // ----- compaction --------------------------------------------------------------------

    /// Devices whose identity record, and batches with keys, live in `segment`.
    pub fn live_in(&self, segment: SegmentId) -> (Vec<DeviceAddr>, Vec<u64>) {
        let identities = self
            .devices
            .iter()
            .filter(|(_, d)| d.segment == segment)
            .map(|(&k, _)| k)
            .collect();
        let batches = self
            .batches
            .iter()
            .filter(|(_, b)| b.segment == segment)
            .map(|(&b, _)| b)
            .collect();
        (identities, batches)
    }

    /// Compaction: re-appends a device's current identity record unchanged.
    pub fn copy_identity(&mut self, key: DeviceAddr, from: SegmentId, log: &mut Log<'_>) {
        let Some(d) = self.devices.get(&key) else {
            return;
        };
        let rec = Record::PrekeyIdentity {
            user: key.user,
            device: key.device,
            generation: d.generation,
            identity_dh: d.keys.identity_dh,
            identity_sign: d.keys.identity_sign,
            signed_prekey_id: d.keys.signed_prekey_id,
            signed_prekey: d.keys.signed_prekey,
            signed_prekey_sig: d.keys.signed_prekey_sig,
            max_one_time_id: d.max_one_time_id,
            ts_ms: d.ts_ms,
        };
        let lsn = log.append(&rec, true);
        log.ledger.kill(from);
        if let Some(d) = self.devices.get_mut(&key) {
            d.segment = lsn.segment;
        }
    }

    /// Compaction: re-appends the keys of `batch` that are still stored as a new batch record.
    pub fn copy_batch(&mut self, batch: u64, from: SegmentId, log: &mut Log<'_>) {
        let Some(&Batch {
            owner, generation, ..
        }) = self.batches.get(&batch)
        else {
            return;
        };
        let keys: Vec<(u32, [u8; 32])> = self
            .devices
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
        let DeviceAddr { user, device } = owner;
        let rec = Record::PrekeyBatch {
            user,
            device,
            generation,
            keys,
        };
        let lsn = log.append(&rec, true);
        let copy = self.new_batch(owner, lsn.segment, n, generation);
        if let Some(d) = self.devices.get_mut(&owner) {
            for k in d.one_time.values_mut() {
                if k.batch == batch {
                    k.batch = copy;
                }
            }
        }
        // The old record's keys all moved: it is dead (its segment waits for the copies).
        self.batches.remove(&batch);
        log.ledger.kill(from);
    }

    // ----- recovery ----------------------------------------------------------------------

    /// The segment of every live record (each counts once towards its segment's liveness).
    pub fn live_segments(&self) -> Vec<SegmentId> {
        let identities = self.devices.values().map(|d| d.segment);
        identities
            .chain(self.batches.values().map(|b| b.segment))
            .collect()
    }
}

/// A device's prekey state while the log is replayed.
#[derive(Debug, Default)]
struct RecoveredDevice {
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

/// The prekey directory while the log is replayed: the last identity record per device;
/// one-time keys of batches of the device's final identity generation, minus consumed ones; a
/// key id seen again (which compaction causes) is kept in its latest batch.
#[derive(Debug, Default)]
pub(crate) struct PrekeyReplay {
    devices: HashMap<DeviceAddr, RecoveredDevice>,
}

impl PrekeyReplay {
    /// A prekey record; false for any other kind.
    pub fn record(&mut self, seg: SegmentId, rec: &Record, into: &mut Prekeys) -> bool {
        match rec {
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
                let identity = RecoveredIdentity {
                    keys: DeviceKeys {
                        identity_dh: *identity_dh,
                        identity_sign: *identity_sign,
                        signed_prekey_id: *signed_prekey_id,
                        signed_prekey: *signed_prekey,
                        signed_prekey_sig: *signed_prekey_sig,
                    },
                    generation: *generation,
                    max_one_time_id: *max_one_time_id,
                    ts_ms: *ts_ms,
                    segment: seg,
                };
                self.identity(DeviceAddr::new(*user, *device), identity, into);
            }
            Record::PrekeyBatch {
                user,
                device,
                generation,
                keys,
            } => {
                let owner = DeviceAddr::new(*user, *device);
                self.batch(seg, owner, *generation, keys, into)
            }
            Record::PrekeyConsumed { user, device, id } => {
                if let Some(k) = self
                    .devices
                    .get_mut(&DeviceAddr::new(*user, *device))
                    .and_then(|d| d.one_time.remove(id))
                {
                    drop_from_batch(&mut into.batches, k.batch);
                }
            }
            _ => return false,
        }
        true
    }

    fn identity(&mut self, key: DeviceAddr, mut identity: RecoveredIdentity, into: &mut Prekeys) {
        let dev = self.devices.entry(key).or_default();
        let current = dev
            .identity
            .as_ref()
            .map(|i| (i.generation, i.max_one_time_id));
        // Generations only grow in log order; an older one would be a dead record.
        if current.is_some_and(|(g, _)| g > identity.generation) {
            return;
        }
        if let Some((g, m)) = current {
            if g == identity.generation {
                identity.max_one_time_id = m.max(identity.max_one_time_id);
            }
        }
        let generation = identity.generation;
        dev.identity = Some(identity);
        // Keys of an older generation belong to an identity that is gone.
        let batches = &mut into.batches;
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

    fn batch(
        &mut self,
        seg: SegmentId,
        owner: DeviceAddr,
        generation: u32,
        keys: &[(u32, [u8; 32])],
        into: &mut Prekeys,
    ) {
        let dev = self.devices.entry(owner).or_default();
        if dev
            .identity
            .as_ref()
            .is_some_and(|i| i.generation > generation)
        {
            return;
        }
        let batch = into.next_batch;
        into.next_batch = into.next_batch.saturating_add(1);
        let record = Batch {
            owner,
            segment: seg,
            live: 0,
            generation,
        };
        into.batches.insert(batch, record);
        for &(id, key) in keys {
            // A key seen again (a compaction copy) now lives in this batch.
            match dev.one_time.insert(id, OneTimeKey { key, batch }) {
                Some(prev) if prev.batch == batch => continue,
                Some(prev) => {
                    drop_from_batch(&mut into.batches, prev.batch);
                }
                None => {}
            }
            if let Some(b) = into.batches.get_mut(&batch) {
                b.live = b.live.saturating_add(1);
            }
        }
    }

    /// A `DeviceRemoved` record: what the device published so far is gone.
    pub fn remove_device(&mut self, key: DeviceAddr, into: &mut Prekeys) {
        if let Some(dev) = self.devices.remove(&key) {
            for k in dev.one_time.values() {
                drop_from_batch(&mut into.batches, k.batch);
            }
        }
    }

    /// Installs the final state of every device.
    pub fn finish(self, into: &mut Prekeys) {
        for (key, dev) in self.devices {
            let Some(identity) = dev.identity else {
                // No identity record left for these keys (cannot happen while the device's
                // current record is live); they cannot be handed out.
                for k in dev.one_time.values() {
                    drop_from_batch(&mut into.batches, k.batch);
                }
                continue;
            };
            let mut one_time = dev.one_time;
            let batches = &mut into.batches;
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
            let device = PrekeyDevice {
                keys: identity.keys,
                generation: identity.generation,
                max_one_time_id,
                ts_ms: identity.ts_ms,
                segment: identity.segment,
                one_time,
            };
            into.devices.insert(key, device);
        }
        into.batches.retain(|_, b| b.live > 0);
        into.stored = into.devices.values().map(|d| d.one_time.len() as u64).sum();
    }
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
