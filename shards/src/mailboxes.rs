//! The mailboxes of the devices homed on this shard, the seq index the TTL sweep walks, and
//! the sender dedup window.
//!
//! Durable entries are a prefix of each mailbox: seqs and append ids are handed out together
//! and durability is reported as a prefix of append ids, so delivery walks a mailbox in seq
//! order and stops at the first entry that is not durable yet; this is also what keeps
//! per-sender order.

use std::collections::{BTreeMap, HashMap};

use protocol::{DeviceAddr, Message, ReceiptInfo, ReceiptKind};
use storage::SegmentId;

use crate::record::Record;

use crate::dedup::{DedupWindow, Seen};
use crate::ledger::{Ledger, Log};
use crate::mailbox::{Body, Entry, Mailbox};
use crate::out::Out;
use crate::registry::Registry;
use crate::types::DedupKey;
use crate::waiter::Waiter;
use crate::{home_shard, Action, Config, ConnRef, MeshMsg, StoreReceipt};

/// The limits mailboxes enforce (copied from [`Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    shards: u16,
    mailbox_cap_msgs: usize,
    delivery_window_msgs: usize,
    message_ttl_ms: u64,
}

/// Every mailbox on this shard.
#[derive(Debug)]
pub(crate) struct Mailboxes {
    limits: Limits,
    /// Mailboxes of devices homed here (an empty one is removed).
    boxes: HashMap<DeviceAddr, Mailbox>,
    /// Every queued entry by seq: the TTL sweep walks it oldest first.
    seq_index: BTreeMap<u64, DeviceAddr>,
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
}

impl Mailboxes {
    pub fn new(config: &Config) -> Self {
        Self {
            limits: Limits {
                shards: config.shards,
                mailbox_cap_msgs: config.mailbox_cap_msgs,
                delivery_window_msgs: config.delivery_window_msgs,
                message_ttl_ms: config.message_ttl_ms,
            },
            boxes: HashMap::new(),
            seq_index: BTreeMap::new(),
            dedup: DedupWindow::new(config.dedup_window_entries),
            stored: 0,
            dedup_hits: 0,
            delivered: 0,
            receipts_stored: 0,
            acked: 0,
            pruned: 0,
            expired: 0,
            pushes: 0,
        }
    }

    /// Entries queued on this shard.
    pub fn depth(&self) -> usize {
        self.seq_index.len()
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
        (key, mut message): (DeviceAddr, Message),
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) {
        let id = message.client_msg_id;
        let dkey = (message.from, id);
        if let Some(d) = self.dedup.get(&dkey) {
            self.dedup_hits = self.dedup_hits.saturating_add(1);
            // Stored before: answer with the original time, but never before it is durable.
            let answer = Waiter::SendReply {
                reply,
                client_msg_id: id,
                ts_ms: d.ts_ms,
            };
            return log.ledger.wait(d.append_id, answer);
        }
        let seq = log.ledger.take_seq();
        message.server_ts_ms = now_ms;
        let rec = Record::Message {
            seq,
            to: key,
            message: message.clone(),
        };
        let lsn = log.append(&rec, true);
        log.ledger.note_fresh(lsn);
        let seen = Seen {
            ts_ms: now_ms,
            append_id: lsn.append_id,
            seq,
            segment: lsn.segment,
        };
        self.dedup.insert(dkey, seen, log.ledger);
        log.ledger.wait(lsn.append_id, Waiter::Stored { key, seq });
        let answer = Waiter::SendReply {
            reply,
            client_msg_id: id,
            ts_ms: now_ms,
        };
        log.ledger.wait(lsn.append_id, answer);
        self.stored = self.stored.saturating_add(1);
        let entry = Entry {
            append_id: lsn.append_id,
            segment: lsn.segment,
            sent_on: None,
            body: Body::Message(message),
        };
        self.enqueue(key, seq, entry, log, registry);
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
        let entry = Entry {
            append_id: lsn.append_id,
            segment: lsn.segment,
            sent_on: None,
            body: Body::Receipt(r.receipt),
        };
        self.enqueue(key, seq, entry, log, registry);
    }

    /// The device acknowledged `seqs`: tombstone them and send the senders a delivered receipt.
    /// Unknown seqs (duplicate acks) are ignored, and so are entries that are not durable:
    /// they were never delivered, so an ack for them is a guess.
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
            let durable = self
                .entry(key, seq)
                .map(|e| log.ledger.is_durable(e.append_id));
            if durable != Some(true) {
                continue;
            }
            let Some(entry) = self.remove_entry(key, seq, log.ledger, registry) else {
                continue;
            };
            log.tombstone(seq);
            self.acked = self.acked.saturating_add(1);
            if let Body::Message(m) = entry.body {
                let receipt = StoreReceipt {
                    to: m.from,
                    receipt: ReceiptInfo {
                        from: key,
                        client_msg_id: m.client_msg_id,
                        kind: ReceiptKind::DELIVERED,
                        ts_ms: now_ms,
                    },
                };
                let home = home_shard(m.from.user, self.limits.shards);
                out.mesh(home, MeshMsg::StoreReceipt(receipt));
            }
        }
    }

    /// Queues an entry and enforces the mailbox cap.
    fn enqueue(
        &mut self,
        key: DeviceAddr,
        seq: u64,
        entry: Entry,
        log: &mut Log<'_>,
        registry: &mut Registry,
    ) {
        self.seq_index.insert(seq, key);
        self.boxes.entry(key).or_default().insert(seq, entry);
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

    /// Removes an entry: mailbox, seq index, segment liveness, and its window slot if it is in
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
        self.seq_index.remove(&seq);
        ledger.kill(entry.segment);
        registry.release_slot(key, entry.sent_on);
        Some(entry)
    }

    /// Sends what the device's window allows, in seq order.
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
        for (&seq, entry) in mailbox.iter_mut() {
            if session.inflight >= self.limits.delivery_window_msgs {
                break;
            }
            // Durable entries are a prefix of the mailbox: stopping at the first that is not
            // keeps "nothing before durable" and the seq order at once.
            if !ledger.is_durable(entry.append_id) {
                break;
            }
            if entry.sent_on == Some(conn) {
                continue;
            }
            entry.sent_on = Some(conn);
            session.inflight = session.inflight.saturating_add(1);
            if entry.is_message() {
                self.delivered = self.delivered.saturating_add(1);
            }
            out.send(conn, entry.frame(seq));
        }
    }

    /// A content-free push for a durable message to an offline device (none for receipts).
    pub fn push_for(&mut self, key: DeviceAddr, seq: u64) -> Option<Action> {
        let Some(Body::Message(m)) = self.entry(key, seq).map(|e| &e.body) else {
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

    /// Drops entries past the TTL, oldest seq first. Seqs follow arrival time, so the walk stops
    /// at the first live entry (a clock stepping back only delays expiry). No record: recovery
    /// applies the same rule.
    pub fn expire(&mut self, now_ms: u64, ledger: &mut Ledger, registry: &mut Registry) {
        while let Some((&seq, &key)) = self.seq_index.first_key_value() {
            let ts = self.entry(key, seq).map(Entry::ts_ms);
            match ts {
                Some(ts) if expired(ts, now_ms, self.limits.message_ttl_ms) => {
                    self.remove_entry(key, seq, ledger, registry);
                    self.expired = self.expired.saturating_add(1);
                }
                Some(_) => break,
                // Index out of step with the mailbox (not expected): repair it.
                None => {
                    self.seq_index.remove(&seq);
                }
            }
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
                    .filter(|(_, e)| e.segment == segment)
                    .map(|(&seq, _)| (seq, key)),
            );
        }
        live
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

    /// Re-appends entry `seq` of `key` unchanged; its record in `from` dies.
    pub fn copy_entry(&mut self, seq: u64, key: DeviceAddr, from: SegmentId, log: &mut Log<'_>) {
        let Some(rec) = self.entry(key, seq).map(|e| e.record(seq, key)) else {
            return;
        };
        let lsn = log.append(&rec, true);
        log.ledger.kill(from);
        if let Some(e) = self.boxes.get_mut(&key).and_then(|m| m.get_mut(seq)) {
            e.segment = lsn.segment;
        }
    }

    // ----- recovery ----------------------------------------------------------------------

    /// Rebuilds the mailboxes from the entries recovery kept (one per seq), minus tombstoned
    /// and expired ones.
    pub fn recover(&mut self, now_ms: u64, replay: MailboxReplay, ledger: &mut Ledger) {
        for (seq, (seg, key, entry)) in replay.entries {
            if replay.tombstones.contains(&seq) {
                continue;
            }
            if expired(entry.ts_ms(), now_ms, self.limits.message_ttl_ms) {
                // Same rule as the TTL sweep, so an expiry needs no record.
                self.expired = self.expired.saturating_add(1);
                continue;
            }
            ledger.add_live(seg);
            self.seq_index.insert(seq, key);
            self.boxes.entry(key).or_default().insert(seq, entry);
        }
        // The newest `cap` by seq, each alive on the latest segment holding a record of it.
        let skip = replay.sent.len().saturating_sub(self.dedup.cap());
        for (seq, (key, ts_ms, segment)) in replay.sent.into_iter().skip(skip) {
            let seen = Seen {
                ts_ms,
                append_id: 0,
                seq,
                segment,
            };
            self.dedup.insert(key, seen, ledger);
        }
    }
}

/// Mailbox records while the log is replayed.
#[derive(Debug, Default)]
pub(crate) struct MailboxReplay {
    /// Messages and receipts by seq: the copy in the latest segment.
    entries: BTreeMap<u64, (SegmentId, DeviceAddr, Entry)>,
    tombstones: std::collections::HashSet<u64>,
    /// Every message and dedup record by seq, in its latest segment: the dedup window's source.
    sent: BTreeMap<u64, (DedupKey, u64, SegmentId)>,
    /// The highest seq in any record, and the latest segment holding it.
    pub max_seq: u64,
    pub max_seq_segment: Option<SegmentId>,
}

impl MailboxReplay {
    /// A `Message`, `Receipt`, `Tombstone` or `Dedup` record; false for any other kind.
    pub fn record(&mut self, seg: SegmentId, rec: &Record) -> bool {
        match rec {
            Record::Message { seq, to, message } => {
                self.note_seq(*seq, seg);
                let dkey = (message.from, message.client_msg_id);
                self.sent.insert(*seq, (dkey, message.server_ts_ms, seg));
                self.entry(*seq, seg, *to, Body::Message(message.clone()));
            }
            Record::Receipt { seq, to, receipt } => {
                self.note_seq(*seq, seg);
                // An unknown receipt kind cannot be delivered; drop it (it is not live).
                if receipt.kind.is_known() {
                    self.entry(*seq, seg, *to, Body::Receipt(*receipt));
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
                self.sent
                    .insert(*seq, ((*from, *client_msg_id), *ts_ms, seg));
            }
            _ => return false,
        }
        true
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
    fn entry(&mut self, seq: u64, seg: SegmentId, key: DeviceAddr, body: Body) {
        let keep_old = self
            .entries
            .get(&seq)
            .is_some_and(|(old_seg, _, _)| *old_seg > seg);
        if !keep_old {
            let entry = Entry {
                append_id: 0,
                segment: seg,
                sent_on: None,
                body,
            };
            self.entries.insert(seq, (seg, key, entry));
        }
    }
}

fn expired(ts_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    ts_ms.saturating_add(ttl_ms) <= now_ms
}
