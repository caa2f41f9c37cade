//! Privacy of the users homed here: who may see their last seen and online status, their
//! contact and block lists (kept on the server, capped), and their last-seen times.
//!
//! * **Durable, applied at once.** A `PrivacySet` or `ContactsEdit` changes memory when it
//!   arrives (the next presence frame already follows it) and appends the user's whole new
//!   settings / contact list / block list; the answer waits for that record. The record it
//!   replaces dies when the new one is durable (`Waiter::Kill`), so the last one per user
//!   wins at recovery. A crash before durability loses the change and its answer (the client
//!   retries; edits are idempotent).
//! * **Last seen is coarse.** When a user's last device disconnects its time is kept in
//!   memory and queued; each Tick writes the queue as one `LastSeen` record (at most
//!   [`LAST_SEEN_BATCH_ENTRIES_MAX`] entries each), never one per frame. A crash loses at most
//!   the last tick's times (the user then shows the previous last seen). A batch record is
//!   live while it holds the current time of at least one user.
//! * **Visibility** ([`Privacy::may_see`]): WhatsApp's rules. A viewer sees what the owner's
//!   setting allows (everyone; contacts: the viewer is on the owner's list; nobody), and only
//!   if the viewer shares the same thing with the owner (reciprocity: hiding yours hides
//!   others' from you). A block, either way, hides everything.

use crate::types::HashMap;
use std::collections::{BTreeMap, BTreeSet};

use protocol::frame::PrivacyState;
use protocol::presence::{ContactOp, Visibility};
use protocol::{ErrorCode, UserId};
use storage::SegmentId;

use crate::ledger::Log;
use crate::record::Record;
use crate::waiter::Waiter;

/// Most entries one `LastSeen` record holds (a longer queue is written as several).
pub(crate) const LAST_SEEN_BATCH_ENTRIES_MAX: usize = 1024;

/// What a visibility setting is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// When the user was last online.
    LastSeen,
    /// Whether the user is online now.
    Online,
}

/// One user's settings and lists.
#[derive(Debug)]
struct User {
    last_seen: Visibility,
    online: Visibility,
    contacts: BTreeSet<UserId>,
    blocked: BTreeSet<UserId>,
    /// Segments of the current records (none before the first change).
    settings_segment: Option<SegmentId>,
    contacts_segment: Option<SegmentId>,
    blocked_segment: Option<SegmentId>,
    settings_ts_ms: u64,
}

impl Default for User {
    fn default() -> Self {
        Self {
            last_seen: Visibility::EVERYONE,
            online: Visibility::EVERYONE,
            contacts: BTreeSet::new(),
            blocked: BTreeSet::new(),
            settings_segment: None,
            contacts_segment: None,
            blocked_segment: None,
            settings_ts_ms: 0,
        }
    }
}

/// A `LastSeen` record: where it is and how many users' current times it holds.
type BatchKey = (SegmentId, u32);

/// Which of a user's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PrivacyRef {
    Settings(UserId),
    Contacts(UserId),
    Blocked(UserId),
    LastSeen(BatchKey),
}

/// The limits this state enforces (from [`crate::Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    contacts_max: usize,
    blocked_max: usize,
}

/// Privacy settings, lists and last-seen times of the users homed on this shard.
#[derive(Debug)]
pub(crate) struct Privacy {
    limits: Limits,
    users: HashMap<UserId, User>,
    /// Current last-seen time of each user and the batch holding it (none while queued).
    last_seen: HashMap<UserId, (u64, Option<BatchKey>)>,
    /// Live `LastSeen` records: how many current times each holds.
    batches: BTreeMap<BatchKey, usize>,
    /// Last-seen times waiting for the next Tick's batch.
    queued: BTreeMap<UserId, u64>,
    /// Counters (see [`crate::ShardStats`]).
    pub contact_limit_refusals: u64,
    pub last_seen_records: u64,
    pub blocked_drops: u64,
}

/// A settings answer waiting for its record.
#[derive(Debug)]
pub(crate) struct SavedWaiter {
    pub reply: crate::ConnRef,
    pub frame: PrivacyState,
}

fn visibility(byte: u8) -> Visibility {
    // Only known values are ever written; a foreign byte fails closed.
    Visibility::known(byte).unwrap_or(Visibility::NOBODY)
}

impl Privacy {
    pub fn new(cfg: &crate::Config) -> Self {
        Self {
            limits: Limits {
                contacts_max: cfg.contacts_per_user_max,
                blocked_max: cfg.blocked_per_user_max,
            },
            users: HashMap::default(),
            last_seen: HashMap::default(),
            batches: BTreeMap::new(),
            queued: BTreeMap::new(),
            contact_limit_refusals: 0,
            last_seen_records: 0,
            blocked_drops: 0,
        }
    }

    // ----- queries -----------------------------------------------------------------------

    /// Whether `owner` blocked `other`.
    pub fn blocks(&self, owner: UserId, other: UserId) -> bool {
        self.users
            .get(&owner)
            .is_some_and(|u| u.blocked.contains(&other))
    }

    /// Whether `owner`'s setting lets `viewer` see `what` (the owner's side only; the
    /// viewer's reciprocity is checked on the viewer's home shard and carried along).
    pub fn allows(&self, owner: UserId, viewer: UserId, what: Seen) -> bool {
        let Some(u) = self.users.get(&owner) else {
            return true;
        };
        if u.blocked.contains(&viewer) {
            return false;
        }
        let v = match what {
            Seen::LastSeen => u.last_seen,
            Seen::Online => u.online,
        };
        match v {
            Visibility::EVERYONE => true,
            Visibility::CONTACTS => u.contacts.contains(&viewer),
            _ => false,
        }
    }

    /// The current last-seen time of `user` (0 when never seen disconnecting).
    pub fn last_seen_ms(&self, user: UserId) -> u64 {
        self.last_seen.get(&user).map_or(0, |&(ts, _)| ts)
    }

    /// `user`'s settings as a frame.
    pub fn state(&self, user: UserId, request_id: u64) -> PrivacyState {
        let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        match self.users.get(&user) {
            Some(u) => PrivacyState {
                request_id,
                last_seen: u.last_seen,
                online: u.online,
                contacts: count(u.contacts.len()),
                blocked: count(u.blocked.len()),
            },
            None => PrivacyState {
                request_id,
                last_seen: Visibility::EVERYONE,
                online: Visibility::EVERYONE,
                contacts: 0,
                blocked: 0,
            },
        }
    }

    // ----- changes -----------------------------------------------------------------------

    /// `PrivacySet`: applies and appends; the answer waits for the record.
    pub fn set(
        &mut self,
        now_ms: u64,
        user: UserId,
        (last_seen, online): (Visibility, Visibility),
        reply: (crate::ConnRef, u64),
        log: &mut Log<'_>,
    ) {
        let u = self.users.entry(user).or_default();
        u.last_seen = last_seen;
        u.online = online;
        u.settings_ts_ms = now_ms;
        let rec = Record::PrivacySettings {
            user,
            last_seen: last_seen.0,
            online: online.0,
            ts_ms: now_ms,
        };
        let old = u.settings_segment;
        let lsn = log.append(&rec, true);
        u.settings_segment = Some(lsn.segment);
        self.finish_change(user, old, lsn.append_id, reply, log);
    }

    /// `ContactsEdit`: applies and appends the whole new list, or refuses past the cap
    /// (nothing changed).
    pub fn edit(
        &mut self,
        user: UserId,
        op: ContactOp,
        users: &[UserId],
        reply: (crate::ConnRef, u64),
        log: &mut Log<'_>,
    ) -> Result<(), ErrorCode> {
        let limits = self.limits;
        let u = self.users.entry(user).or_default();
        let (list, max) = match op {
            ContactOp::ADD | ContactOp::REMOVE => (&mut u.contacts, limits.contacts_max),
            _ => (&mut u.blocked, limits.blocked_max),
        };
        let adding = matches!(op, ContactOp::ADD | ContactOp::BLOCK);
        if adding {
            let new = users
                .iter()
                .filter(|&&x| x != user && !list.contains(&x))
                .collect::<BTreeSet<_>>()
                .len();
            if list.len().saturating_add(new) > max {
                self.contact_limit_refusals = self.contact_limit_refusals.saturating_add(1);
                return Err(ErrorCode::ContactLimit);
            }
            list.extend(users.iter().copied().filter(|&x| x != user));
        } else {
            for x in users {
                list.remove(x);
            }
        }
        let all: Vec<u64> = list.iter().copied().collect();
        let contacts = matches!(op, ContactOp::ADD | ContactOp::REMOVE);
        let (rec, slot) = if contacts {
            let rec = Record::Contacts { user, users: all };
            (rec, &mut u.contacts_segment)
        } else {
            let rec = Record::Blocked { user, users: all };
            (rec, &mut u.blocked_segment)
        };
        let old = *slot;
        let lsn = log.append(&rec, true);
        *slot = Some(lsn.segment);
        self.finish_change(user, old, lsn.append_id, reply, log);
        Ok(())
    }

    /// The record replacing one in `old` was appended as `append_id`: the old one dies and the
    /// requester hears the new state once it is durable.
    fn finish_change(
        &mut self,
        user: UserId,
        old: Option<SegmentId>,
        append_id: u64,
        (reply, request_id): (crate::ConnRef, u64),
        log: &mut Log<'_>,
    ) {
        if let Some(segment) = old {
            log.ledger.wait(append_id, Waiter::Kill { segment });
        }
        let frame = self.state(user, request_id);
        let waiter = SavedWaiter { reply, frame };
        log.ledger
            .wait(append_id, Waiter::PrivacySaved(Box::new(waiter)));
    }

    /// The last device of `user` disconnected at `now_ms`: remembered now, written at the next
    /// Tick.
    pub fn went_offline(&mut self, user: UserId, now_ms: u64) {
        self.queued.insert(user, now_ms);
        // The batch holding the previous time keeps it as a holder until the new batch is
        // appended (`flush` releases it), so a crash before then still finds a time.
        let batch = self.last_seen.get(&user).and_then(|&(_, b)| b);
        self.last_seen.insert(user, (now_ms, batch));
    }

    /// Tick: writes the queued last-seen times as batches. A batch that loses its last holder
    /// dies once the new batch is durable.
    pub fn flush(&mut self, log: &mut Log<'_>) {
        if self.queued.is_empty() || log.ledger.is_poisoned() {
            return;
        }
        let queued: Vec<(u64, u64)> = std::mem::take(&mut self.queued).into_iter().collect();
        for chunk in queued.chunks(LAST_SEEN_BATCH_ENTRIES_MAX) {
            let rec = Record::LastSeen {
                entries: chunk.to_vec(),
            };
            let lsn = log.append(&rec, true);
            self.last_seen_records = self.last_seen_records.saturating_add(1);
            let key = (lsn.segment, lsn.offset);
            let mut holders = 0usize;
            for &(user, ts) in chunk {
                let prev = self.last_seen.insert(user, (ts, Some(key)));
                holders = holders.saturating_add(1);
                if let Some((_, Some(old))) = prev {
                    self.release_batch(old, lsn.append_id, log);
                }
            }
            self.batches.insert(key, holders);
        }
    }

    /// A user's time moved out of batch `key` (by an append with `append_id`).
    fn release_batch(&mut self, key: BatchKey, append_id: u64, log: &mut Log<'_>) {
        let Some(n) = self.batches.get_mut(&key) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.batches.remove(&key);
            log.ledger.wait(append_id, Waiter::Kill { segment: key.0 });
        }
    }

    // ----- compaction and recovery -------------------------------------------------------

    /// Records live in `segment`.
    pub fn live_in(&self, segment: SegmentId) -> Vec<PrivacyRef> {
        let mut live = Vec::new();
        for (&user, u) in &self.users {
            if u.settings_segment == Some(segment) {
                live.push(PrivacyRef::Settings(user));
            }
            if u.contacts_segment == Some(segment) {
                live.push(PrivacyRef::Contacts(user));
            }
            if u.blocked_segment == Some(segment) {
                live.push(PrivacyRef::Blocked(user));
            }
        }
        live.extend(
            self.batches
                .keys()
                .filter(|k| k.0 == segment)
                .map(|&k| PrivacyRef::LastSeen(k)),
        );
        live
    }

    /// Compaction: re-appends the current content of a record found live in `from`.
    pub fn copy(&mut self, item: PrivacyRef, from: SegmentId, log: &mut Log<'_>) {
        match item {
            PrivacyRef::LastSeen(key) => self.copy_batch(key, log),
            PrivacyRef::Settings(user) | PrivacyRef::Contacts(user) | PrivacyRef::Blocked(user) => {
                let Some(u) = self.users.get_mut(&user) else {
                    return;
                };
                let (rec, slot) = match item {
                    PrivacyRef::Settings(_) => (
                        Record::PrivacySettings {
                            user,
                            last_seen: u.last_seen.0,
                            online: u.online.0,
                            ts_ms: u.settings_ts_ms,
                        },
                        &mut u.settings_segment,
                    ),
                    PrivacyRef::Contacts(_) => (
                        Record::Contacts {
                            user,
                            users: u.contacts.iter().copied().collect(),
                        },
                        &mut u.contacts_segment,
                    ),
                    _ => (
                        Record::Blocked {
                            user,
                            users: u.blocked.iter().copied().collect(),
                        },
                        &mut u.blocked_segment,
                    ),
                };
                if *slot != Some(from) {
                    return;
                }
                let lsn = log.append(&rec, true);
                *slot = Some(lsn.segment);
                log.ledger.kill(from);
            }
        }
    }

    fn copy_batch(&mut self, key: BatchKey, log: &mut Log<'_>) {
        if self.batches.remove(&key).is_none() {
            return;
        }
        let mut entries: Vec<(u64, u64)> = self
            .last_seen
            .iter()
            .filter(|(_, &(_, b))| b == Some(key))
            .map(|(&u, &(ts, _))| (u, ts))
            .collect();
        entries.sort_unstable();
        log.ledger.kill(key.0);
        if entries.is_empty() {
            return;
        }
        let rec = Record::LastSeen {
            entries: entries.clone(),
        };
        let lsn = log.append(&rec, true);
        let new = (lsn.segment, lsn.offset);
        for &(user, ts) in &entries {
            self.last_seen.insert(user, (ts, Some(new)));
        }
        self.batches.insert(new, entries.len());
    }

    /// A record in log order, at `at`; false for any other kind.
    pub fn recover(&mut self, at: (SegmentId, u32), rec: &Record) -> bool {
        let seg = at.0;
        match rec {
            Record::PrivacySettings {
                user,
                last_seen,
                online,
                ts_ms,
            } => {
                let u = self.users.entry(*user).or_default();
                u.last_seen = visibility(*last_seen);
                u.online = visibility(*online);
                u.settings_ts_ms = *ts_ms;
                u.settings_segment = Some(seg);
            }
            Record::Contacts { user, users } => {
                let u = self.users.entry(*user).or_default();
                u.contacts = users.iter().copied().collect();
                u.contacts_segment = Some(seg);
            }
            Record::Blocked { user, users } => {
                let u = self.users.entry(*user).or_default();
                u.blocked = users.iter().copied().collect();
                u.blocked_segment = Some(seg);
            }
            Record::LastSeen { entries } => {
                for &(user, ts) in entries {
                    let prev = self.last_seen.insert(user, (ts, Some(at)));
                    if let Some((_, Some(old))) = prev {
                        if let Some(n) = self.batches.get_mut(&old) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                self.batches.remove(&old);
                            }
                        }
                    }
                    *self.batches.entry(at).or_insert(0) += 1;
                }
            }
            _ => return false,
        }
        true
    }

    /// The segment of every live record (each counts once towards its segment's liveness).
    pub fn live_segments(&self) -> Vec<SegmentId> {
        let mut out = Vec::new();
        for u in self.users.values() {
            out.extend(u.settings_segment);
            out.extend(u.contacts_segment);
            out.extend(u.blocked_segment);
        }
        out.extend(self.batches.keys().map(|k| k.0));
        out
    }
}
