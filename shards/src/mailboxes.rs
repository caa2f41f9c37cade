//! The mailboxes of the devices homed on this shard, the reads of cold entries, and the sender
//! dedup window.
//!
//! Durable entries are a prefix of each mailbox: seqs and append ids are handed out together
//! and durability is reported as a prefix of append ids, so delivery walks a mailbox in seq
//! order and stops at the first entry that is not durable yet; this is also what keeps
//! per-sender order.
//!
//! Cold entries (see `mailbox`) are read back before they are sent: `pump` sends the hot
//! entries at the front of the window and asks for the records of the cold ones behind them
//! (`Action::ReadRecords`, one batch per pump); nothing after a cold entry is sent before it.
//! A read that fails or returns another record than the entry's is counted and logged; the
//! entry stays queued and the device is pumped again on the next Tick.

use crate::types::{HashMap, HashSet};
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use protocol::{DeviceAddr, Message, MsgType, ReceiptInfo, ReceiptKind};
use storage::{ReadError, SegmentId};

use crate::record::{DecodeError, Record};

use crate::dedup::{DedupWindow, Seen};
use crate::ledger::{Ledger, Log};
use crate::mailbox::{Body, Entry, Loc, Mailbox};
use crate::out::Out;
use crate::registry::Registry;
use crate::types::DedupKey;
use crate::waiter::Waiter;
use crate::{home_shard, Action, Config, ConnRef, MeshMsg, RecordRef, StoreReceipt};

/// The limits mailboxes enforce (copied from [`Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    shards: u16,
    mailbox_cap_msgs: usize,
    delivery_window_msgs: usize,
    message_ttl_ms: u64,
    record_reads_inflight_max: usize,
}

/// What a batch of record reads is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadPurpose {
    /// Cold entries about to be delivered.
    Deliver,
    /// Cold live entries of a segment being compacted.
    Compact(SegmentId),
}

/// A `ReadRecords` batch waiting for its answer: the entries and where their records were,
/// in request order.
#[derive(Debug)]
struct PendingRead {
    purpose: ReadPurpose,
    items: Vec<(DeviceAddr, u64, Loc)>,
}

/// Why a record read back could not be used.
#[derive(Debug, thiserror::Error)]
enum ReadFailure {
    /// The log could not read it.
    #[error("{0}")]
    Read(ReadError),
    /// Its body does not decode.
    #[error("record does not decode: {0}")]
    Decode(DecodeError),
    /// It decodes, but is not this entry's record (another seq or recipient).
    #[error("the record there is not this entry's")]
    Mismatch,
    /// The answer had fewer results than the request.
    #[error("no result for this record in the answer")]
    Missing,
}

/// Every mailbox on this shard.
#[derive(Debug)]
pub(crate) struct Mailboxes {
    limits: Limits,
    /// Mailboxes of devices homed here (an empty one is removed).
    boxes: HashMap<DeviceAddr, Mailbox>,
    /// Entries queued on this shard.
    depth: usize,
    /// No entry expires before this (the oldest front entry's expiry when the sweep last ran;
    /// later entries are younger), so most Ticks skip the sweep.
    expiry_next_ms: u64,
    /// Record reads outstanding, by token (at most `record_reads_inflight_max` for delivery,
    /// plus one compaction).
    reads: BTreeMap<u64, PendingRead>,
    next_read_token: u64,
    /// Devices that found their next entries cold while every read slot was taken: pumped
    /// again when a batch completes.
    read_waiting: BTreeSet<DeviceAddr>,
    /// Devices whose last read failed: not read again before the next Tick.
    read_retry: BTreeSet<DeviceAddr>,
    dedup: DedupWindow,
    /// Counters (see [`crate::ShardStats`]).
    pub stored: u64,
    pub dedup_hits: u64,
    pub delivered: u64,
    pub receipts_stored: u64,
    pub acked: u64,
    pub pruned: u64,
    pub expired: u64,
    pub pushes: u64,
    pub records_read: u64,
    pub record_read_failures: u64,
    /// Entries whose content is in memory (kept in step where a body is set or dropped;
    /// checked against a walk on every Tick in debug builds).
    pub hot_entries: u64,
    /// `(group, gseq)` of group messages acknowledged since the dispatcher last took them
    /// (for the group receipts; at most the acks of one event).
    group_acked: Vec<(u64, u64)>,
}

impl Mailboxes {
    pub fn new(config: &Config) -> Self {
        Self {
            limits: Limits {
                shards: config.shards,
                mailbox_cap_msgs: config.mailbox_cap_msgs,
                delivery_window_msgs: config.delivery_window_msgs,
                message_ttl_ms: config.message_ttl_ms,
                record_reads_inflight_max: config.record_reads_inflight_max.max(1),
            },
            boxes: HashMap::default(),
            depth: 0,
            expiry_next_ms: 0,
            reads: BTreeMap::new(),
            next_read_token: 1,
            read_waiting: BTreeSet::new(),
            read_retry: BTreeSet::new(),
            dedup: DedupWindow::new(config.dedup_window_entries),
            stored: 0,
            dedup_hits: 0,
            delivered: 0,
            receipts_stored: 0,
            acked: 0,
            pruned: 0,
            expired: 0,
            pushes: 0,
            records_read: 0,
            record_read_failures: 0,
            hot_entries: 0,
            group_acked: Vec::new(),
        }
    }

    /// Takes the group messages acknowledged since the last call.
    pub fn take_group_acked(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.group_acked)
    }

    /// Entries queued on this shard.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Entries whose content is in memory, counted by a walk (checks `hot_entries`).
    fn count_hot(&self) -> u64 {
        let hot: usize = self
            .boxes
            .values()
            .map(|m| m.iter().filter(|e| e.body.is_some()).count())
            .sum();
        hot as u64
    }

    /// `ReadRecords` batches outstanding.
    pub fn reads_inflight(&self) -> usize {
        self.reads.len()
    }

    pub fn entry(&self, key: DeviceAddr, seq: u64) -> Option<&Entry> {
        self.boxes.get(&key).and_then(|m| m.get(seq))
    }

    /// Stores `message` for the device `key` homed here (the caller checked the account and
    /// the log), accepted at `now_ms` (its `server_ts_ms` from now on), or answers a duplicate
    /// with its original time once that is durable.
    pub fn store(
        &mut self,
        now_ms: u64,
        reply: ConnRef,
        (key, message): (DeviceAddr, Message),
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) {
        if self.answer_duplicate(reply, &message, log) {
            return;
        }
        let payload = message.payload.clone();
        self.store_copies(now_ms, reply, message, vec![(key, payload)], log, registry);
    }

    /// Whether the dedup window remembers `(from, client_msg_id)` as stored here.
    pub fn seen(&self, from: DeviceAddr, client_msg_id: u64) -> bool {
        self.dedup.get(&(from, client_msg_id)).is_some()
    }

    /// If `(message.from, message.client_msg_id)` was stored here before, answers `reply` with
    /// its original time (never before that store is durable) and returns true.
    pub fn answer_duplicate(
        &mut self,
        reply: ConnRef,
        message: &Message,
        log: &mut Log<'_>,
    ) -> bool {
        let id = message.client_msg_id;
        let Some(d) = self.dedup.get(&(message.from, id)) else {
            return false;
        };
        self.dedup_hits = self.dedup_hits.saturating_add(1);
        let answer = Waiter::SendReply {
            reply,
            client_msg_id: id,
            ts_ms: d.ts_ms,
        };
        log.ledger.wait(d.append_id, answer);
        true
    }

    /// Stores one copy of `message` per device (each with its own payload; the caller checked
    /// the accounts, the log, the device sets and dedup): one record per copy, one dedup entry,
    /// and one answer to `reply` once the last copy is durable (durability is a prefix, so all
    /// of them are then).
    pub fn store_copies(
        &mut self,
        now_ms: u64,
        reply: ConnRef,
        mut message: Message,
        copies: Vec<(DeviceAddr, Bytes)>,
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) {
        let id = message.client_msg_id;
        let dkey = (message.from, id);
        // A time set by the sender's shard (sync copies: the recipient's store time) is kept;
        // it is never later than this shard's clock.
        if message.server_ts_ms == 0 || message.server_ts_ms > now_ms {
            message.server_ts_ms = now_ms;
        }
        let now_ms = message.server_ts_ms;
        let mut last = None;
        // Two or more copies are recorded as such, so recovery can tell a complete send from
        // one a crash cut short (see `Record::MessageCopy`).
        let n = u8::try_from(copies.len()).unwrap_or(u8::MAX);
        for (key, payload) in copies {
            message.payload = payload;
            let seq = log.ledger.take_seq();
            let rec = if n > 1 {
                Record::MessageCopy {
                    seq,
                    to: key,
                    copies: n,
                    message: message.clone(),
                }
            } else {
                Record::Message {
                    seq,
                    to: key,
                    message: message.clone(),
                }
            };
            let lsn = log.append(&rec, true);
            log.ledger.note_fresh(lsn);
            let seen = Seen {
                ts_ms: now_ms,
                append_id: lsn.append_id,
                seq,
                segment: lsn.segment,
                in_marker: false,
            };
            self.dedup.insert(dkey, seen, log.ledger);
            log.ledger.wait(lsn.append_id, Waiter::Stored { key, seq });
            last = Some(lsn.append_id);
            self.stored = self.stored.saturating_add(1);
            let entry = Entry::hot(seq, lsn, Body::Message(message.clone()));
            self.enqueue(key, entry, log, registry);
        }
        if let Some(append_id) = last {
            let answer = Waiter::SendReply {
                reply,
                client_msg_id: id,
                ts_ms: now_ms,
            };
            log.ledger.wait(append_id, answer);
        }
    }

    /// Stores group event or message `(group, gseq)` for `devices` (homed here; the caller
    /// checked the log): ONE `GroupCopy` record, and per device a mailbox entry (its own seq)
    /// pointing at it. Returns the record's append id, or `None` when there is no device.
    pub fn store_group(
        &mut self,
        (group, gseq): (u64, u64),
        message: Message,
        devices: &[DeviceAddr],
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) -> Option<u64> {
        if devices.is_empty() {
            return None;
        }
        let entries: Vec<(DeviceAddr, u64)> = devices
            .iter()
            .map(|&d| (d, log.ledger.take_seq()))
            .collect();
        let rec = Record::GroupCopy {
            group,
            gseq,
            entries,
            message,
        };
        // Live once per entry (below), not once for the record.
        let lsn = log.append(&rec, false);
        log.ledger.note_fresh(lsn);
        let Record::GroupCopy {
            entries, message, ..
        } = rec
        else {
            return None;
        };
        for (key, seq) in entries {
            log.ledger.add_live(lsn.segment);
            log.ledger.wait(lsn.append_id, Waiter::Stored { key, seq });
            self.stored = self.stored.saturating_add(1);
            let entry = Entry::hot(seq, lsn, Body::Message(message.clone()));
            self.enqueue(key, entry, log, registry);
        }
        Some(lsn.append_id)
    }

    /// A device was removed: its mailbox goes. Returns the segments of its entries (they die
    /// once the removal record is durable; recovery drops entries recorded before it).
    pub fn remove_device(&mut self, key: DeviceAddr, registry: &mut Registry) -> Vec<SegmentId> {
        self.read_waiting.remove(&key);
        self.read_retry.remove(&key);
        let Some(mailbox) = self.boxes.remove(&key) else {
            return Vec::new();
        };
        let mut segments = Vec::new();
        for entry in mailbox.iter() {
            self.depth = self.depth.saturating_sub(1);
            if entry.body.is_some() {
                self.hot_entries = self.hot_entries.saturating_sub(1);
            }
            registry.release_slot(key, entry.sent_on());
            segments.push(entry.loc.segment);
        }
        segments
    }

    /// Queues a receipt for its original sender, homed here (the caller checked the account
    /// and the log). An unknown kind is dropped.
    pub fn store_receipt(&mut self, r: StoreReceipt, log: &mut Log<'_>, registry: &mut Registry) {
        if !r.receipt.kind.is_known() {
            return;
        }
        let key = r.to;
        let seq = log.ledger.take_seq();
        let rec = Record::Receipt {
            seq,
            to: key,
            receipt: r.receipt,
        };
        let lsn = log.append(&rec, true);
        log.ledger.note_fresh(lsn);
        log.ledger.wait(lsn.append_id, Waiter::Stored { key, seq });
        self.receipts_stored = self.receipts_stored.saturating_add(1);
        let entry = Entry::hot(seq, lsn, Body::Receipt(r.receipt));
        self.enqueue(key, entry, log, registry);
    }

    /// The device acknowledged `seqs`: tombstone them and send the senders a delivered receipt.
    /// Unknown seqs (duplicate acks) are ignored, and so are entries that are not durable:
    /// they were never delivered, so an ack for them is a guess. A cold message (delivered by
    /// an earlier process) is read first, for its receipt: the ack completes when it is hot.
    pub fn ack(
        &mut self,
        now_ms: u64,
        key: DeviceAddr,
        seqs: Vec<u64>,
        log: &mut Log<'_>,
        registry: &mut Registry,
        out: &mut Out,
    ) {
        for seq in seqs {
            let Some(entry) = self.boxes.get_mut(&key).and_then(|m| m.get_mut(seq)) else {
                continue;
            };
            if !log.ledger.is_durable(entry.append_id) {
                continue;
            }
            if entry.is_message() && entry.body.is_none() {
                entry.set_ack_wanted();
                continue;
            }
            self.finish_ack(now_ms, key, seq, log, registry, out);
        }
    }

    /// Removes an acknowledged entry, tombstones it and queues the sender's delivered receipt.
    fn finish_ack(
        &mut self,
        now_ms: u64,
        key: DeviceAddr,
        seq: u64,
        log: &mut Log<'_>,
        registry: &mut Registry,
        out: &mut Out,
    ) {
        let Some(entry) = self.remove_entry(key, seq, log.ledger, registry) else {
            return;
        };
        log.tombstone(seq);
        self.acked = self.acked.saturating_add(1);
        // A sync copy (sent by another device of this account) gets no receipt; a message a
        // device sent itself does, as before devices were linked.
        // Group messages and events get no receipt per member device: a message is counted
        // for its group's aggregated receipt instead (see `fanout`).
        if let Some(Body::Message(m)) = entry.body.as_deref() {
            if m.msg_type == MsgType::GROUP {
                if let Some((g, s)) = m
                    .payload
                    .split_first_chunk::<16>()
                    .map(|(h, _)| h.split_at(8))
                {
                    let (mut gb, mut sb) = ([0u8; 8], [0u8; 8]);
                    gb.copy_from_slice(g);
                    sb.copy_from_slice(s);
                    self.group_acked
                        .push((u64::from_be_bytes(gb), u64::from_be_bytes(sb)));
                }
            }
        }
        let message = match entry.body.as_deref() {
            Some(Body::Message(m)) if is_group(m.msg_type) => None,
            Some(Body::Message(m)) if m.from == key || m.from.user != key.user => Some(m),
            _ => None,
        };
        if let Some(m) = message {
            let receipt = StoreReceipt {
                to: m.from,
                receipt: ReceiptInfo {
                    from: key,
                    client_msg_id: m.client_msg_id,
                    kind: ReceiptKind::DELIVERED,
                    ts_ms: now_ms,
                },
                sent_at_ms: m.server_ts_ms,
            };
            let home = home_shard(m.from.user, self.limits.shards);
            out.mesh(home, MeshMsg::StoreReceipt(receipt));
        }
    }

    /// Queues an entry and enforces the mailbox cap.
    fn enqueue(
        &mut self,
        key: DeviceAddr,
        entry: Entry,
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) {
        self.depth = self.depth.saturating_add(1);
        if entry.body.is_some() {
            self.hot_entries = self.hot_entries.saturating_add(1);
        }
        self.boxes.entry(key).or_default().insert(entry);
        loop {
            let victim = match self.boxes.get(&key) {
                Some(m) if m.len() > self.limits.mailbox_cap_msgs => m.lowest(),
                _ => None,
            };
            let Some(victim) = victim else { break };
            if self
                .remove_entry(key, victim, log.ledger, registry)
                .is_none()
            {
                break;
            }
            // The tombstone makes the prune survive a restart.
            log.tombstone(victim);
            self.pruned = self.pruned.saturating_add(1);
        }
    }

    /// Removes an entry: mailbox, depth, segment liveness, and its window slot if it is in
    /// flight on the device's current connection.
    fn remove_entry(
        &mut self,
        key: DeviceAddr,
        seq: u64,
        ledger: &mut Ledger,
        registry: &mut Registry,
    ) -> Option<Entry> {
        let mailbox = self.boxes.get_mut(&key)?;
        let entry = mailbox.remove(seq)?;
        if mailbox.is_empty() {
            self.boxes.remove(&key);
        }
        self.depth = self.depth.saturating_sub(1);
        if entry.body.is_some() {
            self.hot_entries = self.hot_entries.saturating_sub(1);
        }
        ledger.kill(entry.loc.segment);
        registry.release_slot(key, entry.sent_on());
        Some(entry)
    }

    /// Sends what the device's window allows, in seq order: the hot entries up to the first
    /// cold one, and asks for the records of the cold ones (one `ReadRecords` per pump).
    pub fn pump(
        &mut self,
        key: DeviceAddr,
        registry: &mut Registry,
        ledger: &Ledger,
        out: &mut Out,
    ) {
        let Some((conn, session)) = registry.online_session_mut(key) else {
            return;
        };
        let Some(mailbox) = self.boxes.get_mut(&key) else {
            return;
        };
        let may_read = !self.read_retry.contains(&key);
        let slot_free = self.reads.len() < self.limits.record_reads_inflight_max;
        let mut budget = self
            .limits
            .delivery_window_msgs
            .saturating_sub(session.inflight);
        let mut wants: Vec<(u64, Loc)> = Vec::new();
        for entry in mailbox.iter_mut() {
            // Durable entries are a prefix of the mailbox: stopping at the first that is not
            // keeps "nothing before durable" and the seq order at once.
            if budget == 0 || !ledger.is_durable(entry.append_id) || entry.is_reading() {
                break;
            }
            if entry.sent_on() == Some(conn) {
                continue;
            }
            budget -= 1;
            // Behind a cold entry a hot one waits for that read (seq order): no frame built.
            if entry.is_hot() && !wants.is_empty() {
                continue;
            }
            match entry.frame() {
                Some(frame) => {
                    entry.set_sent_on(conn);
                    session.inflight = session.inflight.saturating_add(1);
                    if entry.is_message() {
                        self.delivered = self.delivered.saturating_add(1);
                    }
                    out.send(conn, frame);
                }
                None if !may_read => break,
                None if !slot_free => {
                    self.read_waiting.insert(key);
                    break;
                }
                None => {
                    entry.set_reading(true);
                    wants.push((entry.seq, entry.loc));
                }
            }
        }
        if !wants.is_empty() {
            self.request_reads(key, wants, out);
        }
    }

    /// Emits one `ReadRecords` for entries of `key`.
    fn request_reads(&mut self, key: DeviceAddr, wants: Vec<(u64, Loc)>, out: &mut Out) {
        let items = wants.iter().map(|&(seq, loc)| (key, seq, loc)).collect();
        self.request(ReadPurpose::Deliver, items, out);
    }

    fn request(&mut self, purpose: ReadPurpose, items: Vec<(DeviceAddr, u64, Loc)>, out: &mut Out) {
        let reads = items.iter().map(|&(_, _, loc)| loc.into()).collect();
        let token = self.next_read_token;
        self.next_read_token = self.next_read_token.saturating_add(1);
        self.reads.insert(token, PendingRead { purpose, items });
        out.push(Action::ReadRecords { token, reads });
    }

    /// A durable entry of an offline device (or one its window did not reach) goes cold: its
    /// content is read back from the log when it is delivered.
    pub fn cool_unsent(&mut self, key: DeviceAddr, seq: u64, registry: &Registry) {
        let conn = registry.online(key);
        if let Some(e) = self.boxes.get_mut(&key).and_then(|m| m.get_mut(seq)) {
            if (conn.is_none() || e.sent_on() != conn) && e.body.take().is_some() {
                self.hot_entries = self.hot_entries.saturating_sub(1);
            }
        }
    }

    /// A content-free push for a durable message to an offline device (none for receipts).
    /// Called when it becomes durable, while its content is still in memory.
    pub fn push_for(&mut self, key: DeviceAddr, seq: u64) -> Option<Action> {
        let entry = self.entry(key, seq)?;
        let Some(Body::Message(m)) = entry.body.as_deref() else {
            return None;
        };
        let push = Action::Push {
            to: key,
            from_user: m.from.user,
            msg_type: m.msg_type,
        };
        self.pushes = self.pushes.saturating_add(1);
        Some(push)
    }

    /// Drops entries past the TTL: per device, oldest first (seqs follow arrival time, so each
    /// walk stops at the first live entry; a clock stepping back only delays expiry). Skipped
    /// until the oldest front entry can have expired. No record: recovery applies the same
    /// rule. Also pumps the devices whose reads failed since the last Tick.
    pub fn tick(&mut self, now_ms: u64, log: &mut Log<'_>, registry: &mut Registry, out: &mut Out) {
        if now_ms >= self.expiry_next_ms {
            self.expire(now_ms, log.ledger, registry);
        }
        for key in std::mem::take(&mut self.read_retry) {
            self.pump(key, registry, log.ledger, out);
        }
        debug_assert_eq!(
            self.hot_entries,
            self.count_hot(),
            "hot entry count out of step"
        );
    }

    fn expire(&mut self, now_ms: u64, ledger: &mut Ledger, registry: &mut Registry) {
        let ttl = self.limits.message_ttl_ms;
        let mut victims = Vec::new();
        let mut next = u64::MAX;
        for (&key, mailbox) in &self.boxes {
            for e in mailbox.iter() {
                if !expired(e.ts_ms, now_ms, ttl) {
                    next = next.min(e.ts_ms.saturating_add(ttl));
                    break;
                }
                victims.push((key, e.seq));
            }
        }
        // Removal order does not matter (no action, no append), so the map's order is fine.
        for (key, seq) in victims {
            self.remove_entry(key, seq, ledger, registry);
            self.expired = self.expired.saturating_add(1);
        }
        self.expiry_next_ms = next;
    }

    // ----- reads -------------------------------------------------------------------------

    /// `Event::RecordsRead`. Deliveries: the entries read become hot, acks waiting for them
    /// complete, and their devices are pumped. A compaction's reads are handed back (the
    /// dispatcher finishes it): the segment, and the records by seq or why not.
    pub fn records_read(
        &mut self,
        now_ms: u64,
        token: u64,
        results: Vec<Result<(u8, Bytes), ReadError>>,
        log: &mut Log<'_>,
        registry: &mut Registry,
        out: &mut Out,
    ) -> Option<(SegmentId, Option<BTreeMap<u64, Record>>)> {
        let job = self.reads.remove(&token)?;
        let done = match job.purpose {
            ReadPurpose::Deliver => {
                self.deliver_reads(now_ms, job.items, results, log, registry, out);
                None
            }
            ReadPurpose::Compact(segment) => {
                Some((segment, self.compaction_reads(job.items, results)))
            }
        };
        // A slot is free again.
        for key in std::mem::take(&mut self.read_waiting) {
            self.pump(key, registry, log.ledger, out);
        }
        done
    }

    fn deliver_reads(
        &mut self,
        now_ms: u64,
        items: Vec<(DeviceAddr, u64, Loc)>,
        results: Vec<Result<(u8, Bytes), ReadError>>,
        log: &mut Log<'_>,
        registry: &mut Registry,
        out: &mut Out,
    ) {
        let mut results = results.into_iter();
        let mut keys = BTreeSet::new();
        for (key, seq, loc) in items {
            let result = results.next();
            let Some(entry) = self.boxes.get_mut(&key).and_then(|m| m.get_mut(seq)) else {
                continue; // acked, pruned or expired meanwhile
            };
            entry.set_reading(false);
            keys.insert(key);
            if entry.loc != loc {
                // Compaction moved it meanwhile (the old copy may be gone): read it again.
                continue;
            }
            match read_record(result)
                .and_then(|r| Body::of_record(r, seq, key).ok_or(ReadFailure::Mismatch))
            {
                Ok(body) => {
                    if entry.body.replace(Box::new(body)).is_none() {
                        self.hot_entries = self.hot_entries.saturating_add(1);
                    }
                    self.records_read = self.records_read.saturating_add(1);
                }
                Err(failure) => {
                    self.record_read_failures = self.record_read_failures.saturating_add(1);
                    tracing::error!(device = %key, seq, segment = entry.loc.segment, offset = entry.loc.offset, %failure, "mailbox record read failed; the entry stays queued and is read again on the next tick");
                    self.read_retry.insert(key);
                }
            }
        }
        for key in keys {
            let wanted: Vec<u64> = self.boxes.get(&key).map_or_else(Vec::new, |m| {
                m.iter()
                    .filter(|e| e.ack_wanted() && e.body.is_some())
                    .map(|e| e.seq)
                    .collect()
            });
            for seq in wanted {
                self.finish_ack(now_ms, key, seq, log, registry, out);
            }
            self.pump(key, registry, log.ledger, out);
        }
    }

    // ----- compaction --------------------------------------------------------------------

    /// `(seq, device)` of every entry whose live record is in `segment`.
    pub fn live_in(&self, segment: SegmentId) -> Vec<(u64, DeviceAddr)> {
        let mut live = Vec::new();
        for (&key, mailbox) in &self.boxes {
            live.extend(
                mailbox
                    .iter()
                    .filter(|e| e.loc.segment == segment)
                    .map(|e| (e.seq, key)),
            );
        }
        live
    }

    /// Asks for the records of the cold live entries of `segment` (for its compaction);
    /// false when there are none (nothing to wait for).
    pub fn read_cold_in(&mut self, segment: SegmentId, out: &mut Out) -> bool {
        let mut cold: Vec<(DeviceAddr, u64, Loc)> = Vec::new();
        for (&key, mailbox) in &self.boxes {
            cold.extend(
                mailbox
                    .iter()
                    .filter(|e| e.loc.segment == segment && e.body.is_none())
                    .map(|e| (key, e.seq, e.loc)),
            );
        }
        if cold.is_empty() {
            return false;
        }
        // Deterministic request order whatever the map's.
        cold.sort_unstable_by_key(|&(key, seq, _)| (seq, key));
        self.request(ReadPurpose::Compact(segment), cold, out);
        true
    }

    /// A compaction's reads: every record by seq, or `None` if any failed.
    fn compaction_reads(
        &mut self,
        items: Vec<(DeviceAddr, u64, Loc)>,
        results: Vec<Result<(u8, Bytes), ReadError>>,
    ) -> Option<BTreeMap<u64, Record>> {
        let mut results = results.into_iter();
        let mut recs = BTreeMap::new();
        for (key, seq, _) in items {
            let result = read_record(results.next()).and_then(|r| {
                let body = Body::of_record(r.clone(), seq, key).ok_or(ReadFailure::Mismatch)?;
                Ok((r, body))
            });
            match result {
                Ok((rec, _)) => {
                    self.records_read = self.records_read.saturating_add(1);
                    recs.insert(seq, rec);
                }
                Err(failure) => {
                    self.record_read_failures = self.record_read_failures.saturating_add(1);
                    tracing::warn!(device = %key, seq, %failure, "record read for compaction failed; compaction abandoned");
                    return None;
                }
            }
        }
        Some(recs)
    }

    /// Whether every live entry of `segment` can be copied: hot, or its record in `read`.
    pub fn can_copy(&self, segment: SegmentId, read: &BTreeMap<u64, Record>) -> bool {
        self.boxes.values().all(|m| {
            m.iter()
                .filter(|e| e.loc.segment == segment)
                .all(|e| e.body.is_some() || read.contains_key(&e.seq))
        })
    }
    /// Dedup window entries carried by a record in `segment`, by seq.
    pub fn dedup_live_in(&self, segment: SegmentId) -> Vec<(u64, DedupKey)> {
        self.dedup.live_in(segment)
    }

    /// Writes a `Dedup` marker for a window entry carried by a record in `from`.
    pub fn copy_dedup(&mut self, key: DedupKey, from: SegmentId, log: &mut Log<'_>) {
        self.dedup.copy(key, from, log);
    }

    /// Entries the dedup window remembers.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Re-appends entry `seq` of `key` unchanged (from its content, or from `read`, its
    /// record read back); its record in `from` dies.
    pub fn copy_entry(
        &mut self,
        (seq, key): (u64, DeviceAddr),
        from: SegmentId,
        read: Option<&Record>,
        log: &mut Log<'_>,
    ) {
        let Some(entry) = self.entry(key, seq) else {
            return;
        };
        let rec = match (entry.body.as_deref(), read) {
            (Some(body), _) => body.record(seq, key),
            // A group copy shared with other entries: this entry alone, as a plain message.
            (None, Some(rec @ Record::GroupCopy { .. })) => {
                match Body::of_record(rec.clone(), seq, key) {
                    Some(body) => body.record(seq, key),
                    None => return,
                }
            }
            (None, Some(rec)) => rec.clone(),
            // `can_copy` said otherwise: not expected. The entry keeps its old record.
            (None, None) => return,
        };
        let lsn = log.append(&rec, true);
        log.ledger.kill(from);
        if let Some(e) = self.boxes.get_mut(&key).and_then(|m| m.get_mut(seq)) {
            e.loc = lsn.into();
        }
    }

    // ----- recovery ----------------------------------------------------------------------

    /// Rebuilds the mailboxes from the entries recovery kept (one per seq), minus tombstoned
    /// and expired ones. Every entry is cold: its content is read back when it is delivered.
    pub fn recover(&mut self, now_ms: u64, mut replay: MailboxReplay, ledger: &mut Ledger) {
        for (_, (key, entry)) in std::mem::take(&mut replay.entries) {
            if replay.tombstones.contains(&entry.seq) {
                continue;
            }
            if expired(entry.ts_ms, now_ms, self.limits.message_ttl_ms) {
                // Same rule as the TTL sweep, so an expiry needs no record.
                self.expired = self.expired.saturating_add(1);
                continue;
            }
            ledger.add_live(entry.loc.segment);
            self.depth = self.depth.saturating_add(1);
            self.boxes.entry(key).or_default().insert(entry);
        }
        // A send some of whose copies a crash lost is not remembered: its retry stores it
        // again (the copies that survived are delivered twice; devices dedup on the id).
        let cut_short: HashSet<DedupKey> = replay
            .multi
            .iter()
            .filter(|(k, (copies, seqs))| {
                !replay.whole.contains(k) && seqs.len() < usize::from(*copies)
            })
            .map(|(&k, _)| k)
            .collect();
        let mut sent = replay.sent;
        if !cut_short.is_empty() {
            sent.retain(|_, (key, ..)| !cut_short.contains(key));
        }
        // The newest `cap` by seq, each alive on the latest segment holding a record of it.
        let skip = sent.len().saturating_sub(self.dedup.cap());
        for (seq, (key, ts_ms, segment, in_marker)) in sent.into_iter().skip(skip) {
            let seen = Seen {
                ts_ms,
                append_id: 0,
                seq,
                segment,
                in_marker,
            };
            self.dedup.insert(key, seen, ledger);
        }
    }
}

/// Mailbox records while the log is replayed.
#[derive(Debug, Default)]
pub(crate) struct MailboxReplay {
    /// Messages and receipts by seq (cold): the copy in the latest segment.
    entries: BTreeMap<u64, (DeviceAddr, Entry)>,
    tombstones: HashSet<u64>,
    /// Every message and dedup record by seq, in its latest segment (and whether that record
    /// is a `Dedup` record): the dedup window's source.
    sent: BTreeMap<u64, (DedupKey, u64, SegmentId, bool)>,
    /// Sends recorded as `MessageCopy` records: how many copies each stored, and the seqs found.
    multi: HashMap<DedupKey, (u8, BTreeSet<u64>)>,
    /// Sends a `Message` or `Dedup` record carries (complete whatever their copies say).
    whole: HashSet<DedupKey>,
    /// The highest seq in any record, and the latest segment holding it.
    pub max_seq: u64,
    pub max_seq_segment: Option<SegmentId>,
}

impl MailboxReplay {
    /// A `Message`, `Receipt`, `Tombstone` or `Dedup` record at `at`; false for any other kind.
    pub fn record(&mut self, at: RecordRef, rec: &Record) -> bool {
        let seg = at.segment;
        match rec {
            Record::MessageCopy {
                seq,
                to,
                copies,
                message,
            } => {
                let dkey = (message.from, message.client_msg_id);
                let m = self.multi.entry(dkey).or_insert((*copies, BTreeSet::new()));
                m.1.insert(*seq);
                self.message(at, *seq, *to, message);
            }
            Record::Message { seq, to, message } => {
                if !is_group(message.msg_type) {
                    self.whole.insert((message.from, message.client_msg_id));
                }
                self.message(at, *seq, *to, message);
            }
            Record::GroupCopy {
                entries, message, ..
            } => {
                for &(to, seq) in entries {
                    self.message(at, seq, to, message);
                }
            }
            Record::Receipt { seq, to, receipt } => {
                self.note_seq(*seq, seg);
                // An unknown receipt kind cannot be delivered; drop it (it is not live).
                if receipt.kind.is_known() {
                    let entry = Entry::cold_of(
                        *seq,
                        at.into(),
                        receipt.ts_ms,
                        MsgType::TEXT.priority(),
                        false,
                    );
                    self.entry(*to, entry);
                }
            }
            Record::Tombstone { seq } => {
                self.note_seq(*seq, seg);
                self.tombstones.insert(*seq);
            }
            Record::Dedup {
                seq,
                from,
                client_msg_id,
                ts_ms,
            } => {
                self.note_seq(*seq, seg);
                self.whole.insert((*from, *client_msg_id));
                self.sent
                    .insert(*seq, ((*from, *client_msg_id), *ts_ms, seg, true));
            }
            _ => return false,
        }
        true
    }

    /// A `DeviceRemoved` record: the entries of `key` recorded so far are dead.
    pub fn remove_device(&mut self, key: DeviceAddr) {
        self.entries.retain(|_, (to, _)| *to != key);
    }

    /// A message record (plain or one of several copies) at `at`.
    fn message(&mut self, at: RecordRef, seq: u64, to: DeviceAddr, message: &Message) {
        let seg = at.segment;
        self.note_seq(seq, seg);
        let dkey = (message.from, message.client_msg_id);
        // Group copies are deduplicated by their group's sequence, not the sender window.
        if !is_group(message.msg_type) {
            self.sent
                .insert(seq, (dkey, message.server_ts_ms, seg, false));
        }
        let entry = Entry::cold_of(
            seq,
            at.into(),
            message.server_ts_ms,
            message.msg_type.priority(),
            true,
        );
        self.entry(to, entry);
    }

    /// Tracks the highest seq and the (latest) segment holding it.
    fn note_seq(&mut self, seq: u64, seg: SegmentId) {
        if seq >= self.max_seq {
            self.max_seq = seq;
            self.max_seq_segment = Some(self.max_seq_segment.map_or(seg, |s| s.max(seg)));
        }
    }

    /// Keeps one copy per seq: the one in the latest segment (the older copy is compaction's
    /// leftover and its segment is on its way out).
    fn entry(&mut self, key: DeviceAddr, entry: Entry) {
        let keep_old = self
            .entries
            .get(&entry.seq)
            .is_some_and(|(_, old)| old.loc.segment > entry.loc.segment);
        if !keep_old {
            self.entries.insert(entry.seq, (key, entry));
        }
    }
}

/// The record a read returned, decoded.
fn read_record(result: Option<Result<(u8, Bytes), ReadError>>) -> Result<Record, ReadFailure> {
    let (tag, body) = result
        .ok_or(ReadFailure::Missing)?
        .map_err(ReadFailure::Read)?;
    Record::decode(tag, &body).map_err(ReadFailure::Decode)
}

/// Whether a message is a group message or event (fanned out by a group's home shard).
fn is_group(t: MsgType) -> bool {
    t == MsgType::GROUP || t == MsgType::GROUP_EVENT
}

fn expired(ts_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    ts_ms.saturating_add(ttl_ms) <= now_ms
}
