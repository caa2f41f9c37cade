//! Groups on their home shard (`home_shard(group)`): state, changes, messages, and the home
//! side of the fan-out.
//!
//! A group's state (members, admins, version, times, settings, encrypted blobs) changes only
//! here, and every change is one `GroupState` record that is also the change's membership
//! event: it takes the next number in the group's sequence (`gseq`), the same sequence its
//! messages take (`GroupMessage` records). Each event or message is fanned out to the members
//! of the state it was appended under: one `MeshMsg::GroupFanout` per destination shard (the
//! shards the members are homed on), carrying the payload once and that shard's member users.
//!
//! Rules (see `docs/architecture.md`, "Groups"):
//!
//! * **✓ once durable here.** A `GroupSend` is answered (`SendResult`, then `ServerAck`) once
//!   its `GroupMessage` record is durable on this shard; from then on it is fanned out until
//!   every destination shard has acknowledged it durably, across crashes of either side.
//! * **Membership at the message's place in the order.** A message or event goes to the
//!   members of the state current when it was appended. A removal (event `r`) therefore
//!   never applies to messages before `r` and always to those after it; since appends become
//!   durable in order and fan-outs start when durable, every fan-out that starts after the
//!   removal is durable leaves the removed member out.
//! * **Fan-out is re-driven** after a restart (every fan-out without a `GroupFanoutDone`), when
//!   a destination shard restarted, and on the Tick after `group_fanout_retry_ms` without an
//!   answer. Destinations drop a `gseq` they already applied (see `fanout`), so a member device
//!   gets each message at least once, in the group's order.
//! * **Pins.** A fan-out pins the `GroupState` record of its version: an older state record
//!   stays live until the last fan-out under it is done, so recovery can rebuild the member
//!   set of every pending fan-out.
//! * **Receipts** are summed here from the destinations' per-message totals and reach the
//!   sender at most once per message per tick (see `fanout` and `docs/protocol.md` §18.5).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{GroupDone, GroupInfo, GroupReceipt};
use protocol::group::{
    GroupBlobKind, GroupBody, GroupEnvelope, GroupEvent, GroupId, GroupMember, GroupOp, GroupRoster,
};
use protocol::{DeviceAddr, ErrorCode, Frame, Message, MsgType, UserId};
use storage::SegmentId;

use crate::ledger::Log;
use crate::out::Out;
use crate::record::Record;
use crate::types::HashMap;
use crate::waiter::Waiter;
use crate::{
    home_shard, Config, ConnRef, GroupFanout, GroupFanoutAck, GroupJoin, GroupJoined,
    GroupReceiptNotice, GroupReceipts, GroupRelease, MeshMsg, ShardId,
};

/// Flag bit of `GroupState.flags` / `GroupInfo.flags`: only admins add and remove members.
pub(crate) const FLAG_ADMINS_ONLY: u8 = 1;

/// A group request, at the group's home shard (from the requester's home shard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRequest {
    /// The requester's connection.
    pub reply: ConnRef,
    /// The requesting device.
    pub from: DeviceAddr,
    /// What it asks.
    pub op: GroupReq,
}

/// What a [`GroupRequest`] asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupReq {
    /// Create group `group` (drawn by the requester's shard) with these other members.
    Create {
        /// Echoed in the answer.
        request_id: u64,
        /// The new group's id.
        group: GroupId,
        /// The other initial members.
        members: Vec<UserId>,
    },
    /// A `GroupChange`.
    Change {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// What to do.
        op: GroupOp,
        /// Whom it is about.
        users: Vec<UserId>,
    },
    /// A `GroupSetBlob`.
    SetBlob {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// Which blob.
        which: GroupBlobKind,
        /// The ciphertext.
        blob: Bytes,
    },
    /// A `GroupInfoFetch`.
    Info {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
    },
    /// A `GroupReceiptFetch`.
    ReceiptFetch {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// The message.
        gseq: u64,
    },
    /// A `GroupSend` (answered with `SendResult`).
    Send {
        /// The sender's id.
        client_msg_id: u64,
        /// The group.
        group: GroupId,
        /// The Sender Key ciphertext.
        payload: Bytes,
    },
}

impl GroupReq {
    /// The group it is about.
    pub fn group(&self) -> GroupId {
        match self {
            GroupReq::Create { group, .. }
            | GroupReq::Change { group, .. }
            | GroupReq::SetBlob { group, .. }
            | GroupReq::Info { group, .. }
            | GroupReq::ReceiptFetch { group, .. }
            | GroupReq::Send { group, .. } => *group,
        }
    }

    /// The id an error answer carries.
    fn ref_id(&self) -> u64 {
        match self {
            GroupReq::Create { request_id, .. }
            | GroupReq::Change { request_id, .. }
            | GroupReq::SetBlob { request_id, .. }
            | GroupReq::Info { request_id, .. }
            | GroupReq::ReceiptFetch { request_id, .. } => *request_id,
            GroupReq::Send { client_msg_id, .. } => *client_msg_id,
        }
    }
}

/// A group as its home shard holds it (for tests and tools).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// Grows with every change.
    pub version: u32,
    /// The last gseq used (events and messages).
    pub gseq: u64,
    /// Members, increasing, and whether each is an admin.
    pub members: Vec<(UserId, bool)>,
}

/// The limits groups enforce (copied from [`Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    shards: u16,
    shard: ShardId,
    members_max: usize,
    fanouts_pending_max: usize,
    fanout_retry_ms: u64,
    send_dedup_entries: usize,
    max_payload_bytes: usize,
    receipts_tracked_max: usize,
}

/// The receipts of one group message, at the group's home: the latest counts of each
/// destination shard.
#[derive(Debug)]
struct HomeReceipts {
    sender: DeviceAddr,
    client_msg_id: u64,
    per_shard: BTreeMap<ShardId, (u32, u32, u32)>,
    /// Changed since the sender was last told.
    dirty: bool,
}

/// A group's state as of its latest change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct State {
    pub version: u32,
    /// The gseq of the change that made this state.
    pub gseq: u64,
    pub created_ms: u64,
    pub changed_ms: u64,
    pub flags: u8,
    /// Members and whether each is an admin.
    pub members: BTreeMap<UserId, bool>,
    pub subject: Bytes,
    pub description: Bytes,
}

impl State {
    fn is_admin(&self, user: UserId) -> bool {
        self.members.get(&user).copied().unwrap_or(false)
    }

    fn admins(&self) -> usize {
        self.members.values().filter(|&&a| a).count()
    }

    /// The state record of this state, made by `actor` doing `op` on `users`.
    fn record(&self, group: GroupId, actor: DeviceAddr, op: GroupOp, users: &[UserId]) -> Record {
        Record::GroupState {
            group,
            version: self.version,
            gseq: self.gseq,
            created_ms: self.created_ms,
            changed_ms: self.changed_ms,
            flags: self.flags,
            actor,
            op: op.0,
            event_users: users.to_vec(),
            members: self
                .members
                .iter()
                .map(|(&u, &a)| (u, u8::from(a)))
                .collect(),
            subject: self.subject.clone(),
            description: self.description.clone(),
        }
    }

    /// The state a `GroupState` record holds.
    pub fn of_record(rec: &Record) -> Option<(GroupId, State)> {
        let Record::GroupState {
            group,
            version,
            gseq,
            created_ms,
            changed_ms,
            flags,
            members,
            subject,
            description,
            ..
        } = rec
        else {
            return None;
        };
        let state = State {
            version: *version,
            gseq: *gseq,
            created_ms: *created_ms,
            changed_ms: *changed_ms,
            flags: *flags,
            members: members.iter().map(|&(u, r)| (u, r == 1)).collect(),
            subject: subject.clone(),
            description: description.clone(),
        };
        Some((*group, state))
    }
}

/// The membership event a `GroupState` record is, as its members get it.
pub(crate) fn event_message(rec: &Record) -> Option<(GroupId, u64, Message, Vec<UserId>)> {
    let Record::GroupState {
        group,
        version,
        gseq,
        changed_ms,
        actor,
        op,
        event_users,
        members,
        ..
    } = rec
    else {
        return None;
    };
    let op = GroupOp(*op);
    let envelope = GroupEnvelope {
        group: *group,
        gseq: *gseq,
        body: GroupBody::Event(GroupEvent {
            op,
            actor: actor.user,
            version: *version,
            users: event_users.clone(),
        }),
    };
    let message = Message {
        from: *actor,
        // Events have no sender id: one derived from (group, gseq), distinct per event.
        client_msg_id: event_msg_id(*group, *gseq),
        server_ts_ms: *changed_ms,
        msg_type: MsgType::GROUP_EVENT,
        payload: envelope.encode(),
    };
    // Removed members hear of their removal (and get nothing after it).
    let mut to: BTreeSet<UserId> = members.iter().map(|&(u, _)| u).collect();
    if op == GroupOp::REMOVE || op == GroupOp::LEAVE {
        to.extend(event_users.iter().copied());
    }
    Some((*group, *gseq, message, to.into_iter().collect()))
}

/// The `client_msg_id` a membership event is delivered with: `rotl(group, 32) xor gseq`, so
/// devices that deduplicate by (sender device, id) never confuse events of two groups.
pub fn event_msg_id(group: GroupId, gseq: u64) -> u64 {
    group.rotate_left(32) ^ gseq
}

/// A state record still live: the current one, or one pinned by pending fan-outs.
#[derive(Debug)]
struct Snap {
    segment: SegmentId,
    /// Pending fan-outs started under this version.
    pins: u32,
    /// Its record (re-appended by compaction).
    rec: Record,
}

/// A group homed here.
#[derive(Debug)]
struct Group {
    state: State,
    /// The last gseq used (events and messages).
    last_gseq: u64,
    /// Live state records by version (the current one always).
    snaps: BTreeMap<u32, Snap>,
    /// The latest `GroupFanoutDone`: its gseq and segment (live).
    done: Option<(u64, SegmentId)>,
}

/// A fan-out not yet acknowledged by every destination.
#[derive(Debug)]
struct Fanout {
    /// The state version it pins.
    version: u32,
    /// The message or event as delivered.
    message: Message,
    /// The members of each destination shard.
    dests: BTreeMap<ShardId, Vec<UserId>>,
    /// Destinations that have not acknowledged.
    unacked: BTreeSet<ShardId>,
    /// When it was last sent (0: not started: its record is not durable yet).
    sent_at_ms: u64,
    /// The `GroupMessage` record and its segment (`None` for an event: its record is the
    /// pinned state record).
    record: Option<(SegmentId, Record)>,
}

/// A create or add waiting for the users' home shards to reserve the memberships.
#[derive(Debug)]
struct PendingJoin {
    req: GroupRequest,
    /// The users to reserve, by home shard.
    by_shard: BTreeMap<ShardId, Vec<UserId>>,
    /// Shards that have not answered.
    waiting: BTreeSet<ShardId>,
    /// Shards that reserved.
    reserved: BTreeSet<ShardId>,
    /// Why the change will be refused, once a shard said no.
    failed: Option<(ErrorCode, &'static str)>,
    /// When the reservations were asked for (a change still waiting
    /// `group_fanout_retry_ms` later fails).
    started_ms: u64,
}

/// Every group homed on this shard, and the fan-outs in flight.
#[derive(Debug)]
pub(crate) struct Groups {
    limits: Limits,
    groups: HashMap<GroupId, Group>,
    /// Pending fan-outs in the groups' orders.
    pending: BTreeMap<(GroupId, u64), Fanout>,
    /// Recent sends by `(device, client_msg_id)`: their gseq, append id and time (retries are
    /// answered with the first ✓); oldest first in `send_order`, at most `send_dedup_entries`.
    sends: HashMap<(DeviceAddr, u64), (u64, u64)>,
    send_order: VecDeque<(DeviceAddr, u64)>,
    /// Draws group ids (SplitMix64 over a seeded counter).
    id_state: u64,
    /// After a restart, every pending fan-out is sent again on the first Tick.
    redrive_all: bool,
    /// Receipts of recent group messages homed here, oldest first in `receipt_order` (at most
    /// `group_receipts_tracked_max`; in memory only, best effort).
    receipts: BTreeMap<(GroupId, u64), HomeReceipts>,
    receipt_order: VecDeque<(GroupId, u64)>,
    /// Aggregated receipts sent (pushed or fetched).
    pub receipts_sent: u64,
    /// Creates and adds waiting for membership reservations, by token (at most
    /// `group_fanouts_pending_max`).
    joins: BTreeMap<u64, PendingJoin>,
    next_join_token: u64,
    /// Set by `create` / `change` when the change is valid but its new members' memberships
    /// are not reserved yet: the users to reserve.
    want_join: Option<Vec<UserId>>,
    /// Counters (see [`crate::ShardStats`]).
    pub created: u64,
    pub changes: u64,
    pub messages: u64,
    pub fanouts_sent: u64,
    pub fanouts_redriven: u64,
    pub refused_full: u64,
    pub refused_backlog: u64,
}

impl Groups {
    pub fn new(config: &Config, seed: u64) -> Self {
        Self {
            limits: Limits {
                shards: config.shards,
                shard: config.shard,
                members_max: config.group_members_max,
                fanouts_pending_max: config.group_fanouts_pending_max,
                fanout_retry_ms: config.group_fanout_retry_ms,
                send_dedup_entries: config.group_send_dedup_entries,
                max_payload_bytes: config.max_payload_bytes,
                receipts_tracked_max: config.group_receipts_tracked_max,
            },
            groups: HashMap::default(),
            pending: BTreeMap::new(),
            sends: HashMap::default(),
            send_order: VecDeque::new(),
            // Seeds that differ in a few bits (shard after shard) must not draw the same ids.
            id_state: mix(seed ^ 0x6772_6f75_7073_0000)
                ^ u64::from(config.shard).wrapping_mul(0xD6E8_FEB8_6659_FD93),
            redrive_all: false,
            joins: BTreeMap::new(),
            next_join_token: 1,
            receipts: BTreeMap::new(),
            receipt_order: VecDeque::new(),
            receipts_sent: 0,
            want_join: None,
            created: 0,
            changes: 0,
            messages: 0,
            fanouts_sent: 0,
            fanouts_redriven: 0,
            refused_full: 0,
            refused_backlog: 0,
        }
    }

    /// Groups homed here (gauge).
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Fan-outs not yet acknowledged by every destination (gauge).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// A fresh group id (nonzero), drawn on the creator's shard (the gateway seeds each shard
    /// from the OS generator at every start, so ids do not repeat across restarts; the group's
    /// home refuses an id it already has with `GroupOpInvalid`, and the client creates again).
    pub fn draw_id(&mut self) -> GroupId {
        loop {
            self.id_state = self.id_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = mix(self.id_state);
            if z != 0 {
                return z;
            }
        }
    }

    /// The state of `group` (for tests and tools).
    pub fn state(&self, group: GroupId) -> Option<&State> {
        self.groups.get(&group).map(|g| &g.state)
    }

    /// The last gseq of `group` (0 when it is not homed here).
    pub fn last_gseq(&self, group: GroupId) -> u64 {
        self.groups.get(&group).map_or(0, |g| g.last_gseq)
    }

    /// A request for a group homed here.
    pub fn request(
        &mut self,
        now_ms: u64,
        req: GroupRequest,
        poisoned: bool,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        self.request_inner(now_ms, req, None, poisoned, log, out);
    }

    /// A request; `reserved` names the memberships reserved for it (a create or add whose
    /// reservations all succeeded), released again if the change is refused now.
    fn request_inner(
        &mut self,
        now_ms: u64,
        req: GroupRequest,
        reserved: Option<BTreeMap<ShardId, Vec<UserId>>>,
        poisoned: bool,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        let kept = req.clone();
        let GroupRequest { reply, from, op } = req;
        let ref_id = op.ref_id();
        let group = op.group();
        let ready = reserved.is_some();
        let result = if home_shard(group, self.limits.shards) != self.limits.shard {
            Err((ErrorCode::Internal, "group request at the wrong shard"))
        } else if poisoned && !matches!(op, GroupReq::Info { .. }) {
            Err((ErrorCode::StorageUnavailable, "storage unavailable"))
        } else {
            match op {
                GroupReq::Send {
                    client_msg_id,
                    group,
                    payload,
                } => {
                    let send = (client_msg_id, group, payload);
                    return self.send(now_ms, (reply, from), send, log, out);
                }
                GroupReq::Info { request_id, group } => self.info(request_id, group, from, out),
                GroupReq::ReceiptFetch {
                    request_id,
                    group,
                    gseq,
                } => self.receipt_fetch(request_id, (group, gseq), from),
                GroupReq::Create {
                    request_id,
                    group,
                    members,
                } => self.create(
                    now_ms,
                    (reply, from),
                    (request_id, group),
                    &members,
                    ready,
                    log,
                ),
                GroupReq::Change {
                    request_id,
                    group,
                    op,
                    users,
                } => {
                    let who = (reply, from);
                    self.change(now_ms, who, (request_id, group), (op, &users), ready, log)
                }
                GroupReq::SetBlob {
                    request_id,
                    group,
                    which,
                    blob,
                } => self.set_blob(now_ms, (reply, from), (request_id, group), which, blob, log),
            }
        };
        if let Some(users) = self.want_join.take() {
            return self.start_join(now_ms, kept, &users, out);
        }
        match result {
            Ok(Some(frame)) => out.reply(reply, frame),
            Ok(None) => {}
            Err((code, text)) => {
                if let Some(r) = reserved {
                    release(group, r, out);
                }
                out.reply(reply, Frame::error(code, ref_id, text));
            }
        }
    }

    /// Asks the home shards of `users` to reserve the memberships of a valid create or add.
    fn start_join(&mut self, now_ms: u64, req: GroupRequest, users: &[UserId], out: &mut Out) {
        if self.joins.len() >= self.limits.fanouts_pending_max {
            self.refused_backlog = self.refused_backlog.saturating_add(1);
            let error = Frame::error(
                ErrorCode::GroupBacklog,
                req.op.ref_id(),
                "too many changes in flight",
            );
            return out.reply(req.reply, error);
        }
        let mut by_shard: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for &u in users {
            by_shard
                .entry(home_shard(u, self.limits.shards))
                .or_default()
                .push(u);
        }
        let token = self.next_join_token;
        self.next_join_token = self.next_join_token.wrapping_add(1);
        let group = req.op.group();
        for (&shard, users) in &by_shard {
            let join = GroupJoin {
                reply_shard: self.limits.shard,
                token,
                group,
                users: users.clone(),
            };
            out.mesh(shard, MeshMsg::GroupJoin(Box::new(join)));
        }
        let pending = PendingJoin {
            req,
            waiting: by_shard.keys().copied().collect(),
            by_shard,
            reserved: BTreeSet::new(),
            failed: None,
            started_ms: now_ms,
        };
        self.joins.insert(token, pending);
    }

    /// A users' home shard answered a reservation.
    pub fn joined(
        &mut self,
        now_ms: u64,
        j: GroupJoined,
        poisoned: bool,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        let Some(p) = self.joins.get_mut(&j.token) else {
            return;
        };
        if !p.waiting.remove(&j.shard) {
            return;
        }
        match j.result {
            Ok(()) => {
                p.reserved.insert(j.shard);
            }
            Err(users) if users.is_empty() => {
                p.failed = Some((ErrorCode::StorageUnavailable, "storage unavailable"));
            }
            Err(_) => {
                let text = "a user already belongs to groups_per_user_max groups";
                p.failed = Some((ErrorCode::GroupsPerUserLimit, text));
            }
        }
        if p.waiting.is_empty() {
            if let Some(p) = self.joins.remove(&j.token) {
                self.finish_join(now_ms, p, poisoned, log, out);
            }
        }
    }

    fn finish_join(
        &mut self,
        now_ms: u64,
        p: PendingJoin,
        poisoned: bool,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        let reserved: BTreeMap<ShardId, Vec<UserId>> = p
            .by_shard
            .into_iter()
            .filter(|(s, _)| p.reserved.contains(s))
            .collect();
        match p.failed {
            Some((code, text)) => {
                release(p.req.op.group(), reserved, out);
                let error = Frame::error(code, p.req.op.ref_id(), text);
                out.reply(p.req.reply, error);
            }
            None => self.request_inner(now_ms, p.req, Some(reserved), poisoned, log, out),
        }
    }

    /// Shard `shard` restarted: reservations asked of it may be lost; their changes fail.
    fn fail_joins_on(&mut self, shard: ShardId, out: &mut Out) {
        let tokens: Vec<u64> = self
            .joins
            .iter()
            .filter(|(_, p)| p.waiting.contains(&shard))
            .map(|(&t, _)| t)
            .collect();
        self.fail_joins(&tokens, out);
    }

    /// Fails the changes `tokens` wait for: every shard asked releases, the requester is told.
    fn fail_joins(&mut self, tokens: &[u64], out: &mut Out) {
        for t in tokens {
            let Some(p) = self.joins.remove(t) else {
                continue;
            };
            // A shard that did not answer may have reserved: release everywhere.
            let reserved: BTreeMap<ShardId, Vec<UserId>> = p.by_shard;
            release(p.req.op.group(), reserved, out);
            let text = "a shard restarted; try again";
            let error = Frame::error(ErrorCode::StorageUnavailable, p.req.op.ref_id(), text);
            out.reply(p.req.reply, error);
        }
    }

    /// `GroupInfoFetch`: the state, to members only.
    fn info(
        &self,
        request_id: u64,
        group: GroupId,
        from: DeviceAddr,
        _out: &mut Out,
    ) -> Result<Option<Frame>, (ErrorCode, &'static str)> {
        let g = self.member_group(group, from.user)?;
        Ok(Some(info_frame(request_id, group, g)))
    }

    /// `GroupReceiptFetch`: the aggregated counts of one message, to members only.
    fn receipt_fetch(
        &mut self,
        request_id: u64,
        key: (GroupId, u64),
        from: DeviceAddr,
    ) -> Result<Option<Frame>, (ErrorCode, &'static str)> {
        self.member_group(key.0, from.user)?;
        self.receipts_sent = self.receipts_sent.saturating_add(1);
        Ok(Some(self.receipt_frame(request_id, key).into()))
    }

    /// The `GroupReceipt` of message `key` (zeros when its receipts are not tracked).
    fn receipt_frame(&self, request_id: u64, (group, gseq): (GroupId, u64)) -> GroupReceipt {
        let r = self.receipts.get(&(group, gseq));
        let (mut devices, mut delivered, mut read) = (0u32, 0u32, 0u32);
        for (d, v, rd) in r.into_iter().flat_map(|r| r.per_shard.values()) {
            devices = devices.saturating_add(*d);
            delivered = delivered.saturating_add(*v);
            read = read.saturating_add(*rd);
        }
        GroupReceipt {
            request_id,
            group,
            gseq,
            client_msg_id: r.map_or(0, |r| r.client_msg_id),
            devices,
            delivered,
            read,
        }
    }

    /// A destination's counts for a message homed here.
    pub fn on_receipts(&mut self, r: GroupReceipts) {
        if let Some(h) = self.receipts.get_mut(&(r.group, r.gseq)) {
            h.per_shard
                .insert(r.shard, (r.devices, r.delivered, r.read));
            h.dirty = true;
        }
    }

    /// Starts aggregating the receipts of a message accepted here.
    fn track_receipts(&mut self, key: (GroupId, u64), sender: DeviceAddr, client_msg_id: u64) {
        let h = HomeReceipts {
            sender,
            client_msg_id,
            per_shard: BTreeMap::new(),
            dirty: false,
        };
        if self.receipts.insert(key, h).is_none() {
            self.receipt_order.push_back(key);
        }
        while self.receipt_order.len() > self.limits.receipts_tracked_max {
            if let Some(old) = self.receipt_order.pop_front() {
                self.receipts.remove(&old);
            }
        }
    }

    /// The Tick: one `GroupReceipt` to the sender of each message whose counts changed.
    fn push_receipts(&mut self, out: &mut Out) {
        let dirty: Vec<(GroupId, u64)> = self
            .receipts
            .iter()
            .filter(|(_, h)| h.dirty)
            .map(|(&k, _)| k)
            .collect();
        for key in dirty {
            let frame = self.receipt_frame(0, key);
            let Some(h) = self.receipts.get_mut(&key) else {
                continue;
            };
            h.dirty = false;
            let to = h.sender;
            let notice = GroupReceiptNotice { to, frame };
            self.receipts_sent = self.receipts_sent.saturating_add(1);
            out.mesh(
                home_shard(to.user, self.limits.shards),
                MeshMsg::GroupReceiptNotice(Box::new(notice)),
            );
        }
    }

    /// The group, if `user` is a member of it.
    fn member_group(
        &self,
        group: GroupId,
        user: UserId,
    ) -> Result<&Group, (ErrorCode, &'static str)> {
        match self.groups.get(&group) {
            Some(g) if g.state.members.is_empty() => Err((ErrorCode::NoSuchGroup, "no such group")),
            Some(g) if g.state.members.contains_key(&user) => Ok(g),
            Some(_) => Err((ErrorCode::NotGroupMember, "not a member of the group")),
            None => Err((ErrorCode::NoSuchGroup, "no such group")),
        }
    }

    fn create(
        &mut self,
        now_ms: u64,
        (reply, from): (ConnRef, DeviceAddr),
        (request_id, group): (u64, GroupId),
        members: &[UserId],
        ready: bool,
        log: &mut Log<'_>,
    ) -> Result<Option<Frame>, (ErrorCode, &'static str)> {
        if self.groups.contains_key(&group) || group == 0 {
            return Err((ErrorCode::GroupOpInvalid, "group id taken; create again"));
        }
        if members.iter().any(|&u| !is_valid_user_id(u)) {
            return Err((ErrorCode::GroupOpInvalid, "not a user id"));
        }
        let mut all: BTreeMap<UserId, bool> = members.iter().map(|&u| (u, false)).collect();
        all.insert(from.user, true);
        if all.len() > self.limits.members_max {
            self.refused_full = self.refused_full.saturating_add(1);
            return Err((ErrorCode::GroupFull, "more members than group_members_max"));
        }
        if !ready {
            // Valid: reserve every member's membership first (`groups_per_user_max`).
            self.want_join = Some(all.keys().copied().collect());
            return Ok(None);
        }
        let state = State {
            version: 1,
            gseq: 1,
            created_ms: now_ms,
            changed_ms: now_ms,
            flags: FLAG_ADMINS_ONLY,
            members: all,
            subject: Bytes::new(),
            description: Bytes::new(),
        };
        let mut users: Vec<UserId> = state.members.keys().copied().collect();
        users.retain(|&u| u != from.user);
        users.insert(0, from.user);
        // The creator first, then the others increasing: the event's user list is sorted, so
        // the creator is named by `actor` and the list is every member.
        users.sort_unstable();
        let g = Group {
            state,
            last_gseq: 0,
            snaps: BTreeMap::new(),
            done: None,
        };
        self.groups.insert(group, g);
        self.created = self.created.saturating_add(1);
        self.commit(
            group,
            (reply, from),
            (request_id, GroupOp::CREATED),
            &users,
            log,
        );
        Ok(None)
    }

    fn change(
        &mut self,
        now_ms: u64,
        (reply, from): (ConnRef, DeviceAddr),
        (request_id, group): (u64, GroupId),
        (op, users): (GroupOp, &[UserId]),
        ready: bool,
        log: &mut Log<'_>,
    ) -> Result<Option<Frame>, (ErrorCode, &'static str)> {
        let members_max = self.limits.members_max;
        let g = self.member_group(group, from.user)?;
        let mut next = g.state.clone();
        let admin = next.is_admin(from.user);
        let admins_only = next.flags & FLAG_ADMINS_ONLY != 0;
        let invalid = |text| Err((ErrorCode::GroupOpInvalid, text));
        let needs_list = matches!(
            op,
            GroupOp::ADD | GroupOp::REMOVE | GroupOp::PROMOTE | GroupOp::DEMOTE
        );
        if needs_list == users.is_empty() {
            return invalid("this op takes a user list exactly when it names users");
        }
        let mut event_users = users.to_vec();
        match op {
            GroupOp::ADD | GroupOp::REMOVE if admins_only && !admin => {
                return Err((
                    ErrorCode::NotGroupAdmin,
                    "only admins add and remove members",
                ))
            }
            GroupOp::PROMOTE
            | GroupOp::DEMOTE
            | GroupOp::ADMINS_ONLY_ON
            | GroupOp::ADMINS_ONLY_OFF
                if !admin =>
            {
                return Err((
                    ErrorCode::NotGroupAdmin,
                    "only admins change admins and settings",
                ))
            }
            GroupOp::ADD => {
                if users
                    .iter()
                    .any(|u| next.members.contains_key(u) || !is_valid_user_id(*u))
                {
                    return invalid("a user is already a member, or is not a user id");
                }
                if next.members.len().saturating_add(users.len()) > members_max {
                    self.refused_full = self.refused_full.saturating_add(1);
                    return Err((ErrorCode::GroupFull, "more members than group_members_max"));
                }
                if !ready {
                    // Valid: reserve the new members' memberships first.
                    self.want_join = Some(users.to_vec());
                    return Ok(None);
                }
                next.members.extend(users.iter().map(|&u| (u, false)));
            }
            GroupOp::REMOVE => {
                if users.iter().any(|u| !next.members.contains_key(u)) {
                    return invalid("a user is not a member");
                }
                if !admin && users.iter().any(|&u| next.is_admin(u)) {
                    return Err((ErrorCode::NotGroupAdmin, "only admins remove admins"));
                }
                for u in users {
                    next.members.remove(u);
                }
            }
            GroupOp::LEAVE => {
                next.members.remove(&from.user);
                event_users = vec![from.user];
            }
            GroupOp::PROMOTE | GroupOp::DEMOTE => {
                if users.iter().any(|u| !next.members.contains_key(u)) {
                    return invalid("a user is not a member");
                }
                for u in users {
                    next.members.insert(*u, op == GroupOp::PROMOTE);
                }
                if next.admins() == 0 {
                    return invalid("the last admin cannot be demoted");
                }
            }
            GroupOp::ADMINS_ONLY_ON => next.flags |= FLAG_ADMINS_ONLY,
            GroupOp::ADMINS_ONLY_OFF => next.flags &= !FLAG_ADMINS_ONLY,
            _ => return invalid("not an op a client may ask for"),
        }
        // A group whose last admin left or was removed gets the lowest remaining user as admin.
        if next.admins() == 0 {
            if let Some((_, a)) = next.members.iter_mut().next() {
                *a = true;
            }
        }
        next.changed_ms = now_ms;
        self.apply(group, next);
        self.changes = self.changes.saturating_add(1);
        self.commit(group, (reply, from), (request_id, op), &event_users, log);
        Ok(None)
    }

    fn set_blob(
        &mut self,
        now_ms: u64,
        (reply, from): (ConnRef, DeviceAddr),
        (request_id, group): (u64, GroupId),
        which: GroupBlobKind,
        blob: Bytes,
        log: &mut Log<'_>,
    ) -> Result<Option<Frame>, (ErrorCode, &'static str)> {
        let g = self.member_group(group, from.user)?;
        if blob.len() > which.bytes_max() {
            return Err((
                ErrorCode::GroupBlobTooLarge,
                "blob longer than its kind allows",
            ));
        }
        let mut next = g.state.clone();
        let op = if which == GroupBlobKind::SUBJECT {
            next.subject = blob;
            GroupOp::SUBJECT
        } else {
            next.description = blob;
            GroupOp::DESCRIPTION
        };
        next.changed_ms = now_ms;
        self.apply(group, next);
        self.changes = self.changes.saturating_add(1);
        self.commit(group, (reply, from), (request_id, op), &[], log);
        Ok(None)
    }

    /// Makes `next` the group's state (version and gseq are set by `commit`).
    fn apply(&mut self, group: GroupId, next: State) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.state = next;
        }
    }

    /// Records the group's (already updated) state as the next event, answers the requester
    /// once durable, and fans the event out.
    fn commit(
        &mut self,
        group: GroupId,
        (reply, from): (ConnRef, DeviceAddr),
        (request_id, op): (u64, GroupOp),
        users: &[UserId],
        log: &mut Log<'_>,
    ) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let created = op == GroupOp::CREATED;
        if !created {
            g.state.version = g.state.version.saturating_add(1);
        }
        g.last_gseq = g.last_gseq.saturating_add(1);
        g.state.gseq = g.last_gseq;
        let rec = g.state.record(group, from, op, users);
        let lsn = log.append(&rec, true);
        let old = g.state.version.checked_sub(1).filter(|_| !created);
        g.snaps.insert(
            g.state.version,
            Snap {
                segment: lsn.segment,
                pins: 0,
                rec: rec.clone(),
            },
        );
        let answer = if created {
            info_frame(request_id, group, g)
        } else {
            GroupDone {
                request_id,
                group,
                version: g.state.version,
                seq: g.state.gseq,
            }
            .into()
        };
        if let Some(old) = old {
            self.unpin(group, old, log);
        }
        log.ledger.wait(
            lsn.append_id,
            Waiter::GroupReply {
                reply,
                frame: Box::new(answer),
            },
        );
        if let Some((group, gseq, message, to)) = event_message(&rec) {
            let version = self.groups.get(&group).map_or(0, |g| g.state.version);
            self.add_fanout((group, gseq), version, message, &to, None);
            log.ledger
                .wait(lsn.append_id, Waiter::GroupFanout { group, gseq });
        }
    }

    /// A `GroupSend` at the group's home.
    fn send(
        &mut self,
        now_ms: u64,
        (reply, from): (ConnRef, DeviceAddr),
        (client_msg_id, group, payload): (u64, GroupId, Bytes),
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        let refuse = |out: &mut Out, code| out.send_result(reply, client_msg_id, Err(code));
        if let Some(&(append_id, ts_ms)) = self.sends.get(&(from, client_msg_id)) {
            let answer = Waiter::SendReply {
                reply,
                client_msg_id,
                ts_ms,
            };
            return log.ledger.wait(append_id, answer);
        }
        let g = match self.member_group(group, from.user) {
            Ok(g) => g,
            Err((code, _)) => return refuse(out, code),
        };
        if payload.len() > self.limits.max_payload_bytes {
            return refuse(out, ErrorCode::PayloadTooLarge);
        }
        if self.pending.len() >= self.limits.fanouts_pending_max {
            self.refused_backlog = self.refused_backlog.saturating_add(1);
            return refuse(out, ErrorCode::GroupBacklog);
        }
        let version = g.state.version;
        let to: Vec<UserId> = g.state.members.keys().copied().collect();
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        g.last_gseq = g.last_gseq.saturating_add(1);
        let gseq = g.last_gseq;
        let envelope = GroupEnvelope {
            group,
            gseq,
            body: GroupBody::Message(payload),
        };
        let message = Message {
            from,
            client_msg_id,
            server_ts_ms: now_ms,
            msg_type: MsgType::GROUP,
            payload: envelope.encode(),
        };
        let rec = Record::GroupMessage {
            group,
            gseq,
            version,
            message: message.clone(),
        };
        let lsn = log.append(&rec, true);
        self.remember_send((from, client_msg_id), (lsn.append_id, now_ms));
        self.track_receipts((group, gseq), from, client_msg_id);
        self.messages = self.messages.saturating_add(1);
        let record = Some((lsn.segment, rec));
        self.add_fanout((group, gseq), version, message, &to, record);
        let answer = Waiter::SendReply {
            reply,
            client_msg_id,
            ts_ms: now_ms,
        };
        log.ledger.wait(lsn.append_id, answer);
        log.ledger
            .wait(lsn.append_id, Waiter::GroupFanout { group, gseq });
    }

    fn remember_send(&mut self, key: (DeviceAddr, u64), value: (u64, u64)) {
        if self.sends.insert(key, value).is_none() {
            self.send_order.push_back(key);
        }
        while self.send_order.len() > self.limits.send_dedup_entries {
            if let Some(old) = self.send_order.pop_front() {
                self.sends.remove(&old);
            }
        }
    }

    /// A fan-out of `message` to `to`, pinning state `version`; started once durable.
    fn add_fanout(
        &mut self,
        key: (GroupId, u64),
        version: u32,
        message: Message,
        to: &[UserId],
        record: Option<(SegmentId, Record)>,
    ) {
        let mut dests: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for &u in to {
            dests
                .entry(home_shard(u, self.limits.shards))
                .or_default()
                .push(u);
        }
        if let Some(snap) = self
            .groups
            .get_mut(&key.0)
            .and_then(|g| g.snaps.get_mut(&version))
        {
            snap.pins = snap.pins.saturating_add(1);
        }
        let unacked = dests.keys().copied().collect();
        let fanout = Fanout {
            version,
            message,
            dests,
            unacked,
            sent_at_ms: 0,
            record,
        };
        self.pending.insert(key, fanout);
    }

    /// The record of fan-out `(group, gseq)` is durable: send it to every destination.
    pub fn start(&mut self, now_ms: u64, key: (GroupId, u64), log: &mut Log<'_>, out: &mut Out) {
        // After a restart the recovered fan-outs go first (the group's order).
        if std::mem::take(&mut self.redrive_all) {
            self.resend(now_ms, |_| true, None, out);
        }
        let after = self.after_of(key);
        let Some(f) = self.pending.get_mut(&key) else {
            return;
        };
        f.sent_at_ms = now_ms.max(1);
        let sends = fanout_msgs(self.limits.shard, key, f, None, &after);
        self.fanouts_sent = self.fanouts_sent.saturating_add(sends.len() as u64);
        for (shard, msg) in sends {
            out.mesh(shard, msg);
        }
        // A group of no member devices anywhere (every member left) is done at once.
        self.maybe_done(key, log);
    }

    /// A destination stored fan-out `(group, gseq)` durably.
    pub fn acked(&mut self, a: GroupFanoutAck, log: &mut Log<'_>) {
        let key = (a.group, a.gseq);
        if let Some(f) = self.pending.get_mut(&key) {
            f.unacked.remove(&a.shard);
        }
        self.maybe_done(key, log);
    }

    /// Records fan-outs of `group` done, in the group's order, from the first pending one
    /// while it is acknowledged by every destination (and was started). Done marks are a
    /// high-water mark: `GroupFanoutDone { gseq }` says every fan-out up to `gseq` is done.
    fn maybe_done(&mut self, (group, _): (GroupId, u64), log: &mut Log<'_>) {
        loop {
            let first = self
                .pending
                .range((group, 0)..=(group, u64::MAX))
                .next()
                .map(|(&k, f)| (k, f.unacked.is_empty() && f.sent_at_ms != 0));
            let Some((key, true)) = first else {
                return;
            };
            if log.ledger.is_poisoned() {
                return;
            }
            let Some(f) = self.pending.remove(&key) else {
                return;
            };
            let gseq = key.1;
            let lsn = log.append(&Record::GroupFanoutDone { group, gseq }, true);
            // The message record and the previous done mark die once this one is durable.
            if let Some((segment, _)) = f.record {
                log.ledger.wait(lsn.append_id, Waiter::Kill { segment });
            }
            if let Some(g) = self.groups.get_mut(&group) {
                let old = g.done.replace((gseq, lsn.segment));
                if let Some((_, segment)) = old {
                    log.ledger.wait(lsn.append_id, Waiter::Kill { segment });
                }
            }
            self.unpin_after(group, f.version, lsn.append_id, log);
        }
    }

    /// One fewer pending fan-out under `version`; the state record dies (once `after` is
    /// durable) when it is neither pinned nor current.
    fn unpin_after(&mut self, group: GroupId, version: u32, after: u64, log: &mut Log<'_>) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let current = g.state.version;
        let Some(snap) = g.snaps.get_mut(&version) else {
            return;
        };
        snap.pins = snap.pins.saturating_sub(1);
        if snap.pins == 0 && version != current {
            let segment = snap.segment;
            g.snaps.remove(&version);
            log.ledger.wait(after, Waiter::Kill { segment });
        }
    }

    /// State `version` stopped being current: it dies when no pending fan-out pins it.
    fn unpin(&mut self, group: GroupId, version: u32, log: &mut Log<'_>) {
        let after = log.ledger.last_append_id();
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if let Some(snap) = g.snaps.get(&version).filter(|s| s.pins == 0) {
            let segment = snap.segment;
            g.snaps.remove(&version);
            log.ledger.wait(after, Waiter::Kill { segment });
        }
    }

    /// Shard `shard` restarted: send it again every fan-out it has not acknowledged, and fail
    /// the changes waiting for its reservations.
    pub fn peer_restarted(&mut self, now_ms: u64, shard: ShardId, out: &mut Out) {
        self.fail_joins_on(shard, out);
        self.resend(now_ms, |f| f.unacked.contains(&shard), Some(shard), out);
    }

    /// The Tick: after a restart every pending fan-out, else those unanswered for
    /// `group_fanout_retry_ms`, go out again.
    pub fn tick(&mut self, now_ms: u64, out: &mut Out) {
        self.push_receipts(out);
        let stale: Vec<u64> = self
            .joins
            .iter()
            .filter(|(_, p)| p.started_ms.saturating_add(self.limits.fanout_retry_ms) <= now_ms)
            .map(|(&t, _)| t)
            .collect();
        self.fail_joins(&stale, out);
        if std::mem::take(&mut self.redrive_all) {
            return self.resend(now_ms, |_| true, None, out);
        }
        let retry = self.limits.fanout_retry_ms;
        self.resend(
            now_ms,
            |f| f.sent_at_ms != 0 && f.sent_at_ms.saturating_add(retry) <= now_ms,
            None,
            out,
        );
    }

    fn resend(
        &mut self,
        now_ms: u64,
        which: impl Fn(&Fanout) -> bool,
        only: Option<ShardId>,
        out: &mut Out,
    ) {
        let me = self.limits.shard;
        let keys: Vec<(GroupId, u64)> = self
            .pending
            .iter()
            // Not started: its record is not durable yet (it starts when it is).
            .filter(|(_, f)| f.sent_at_ms != 0 && which(f))
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            let after = self.after_of(key);
            let Some(f) = self.pending.get_mut(&key) else {
                continue;
            };
            f.sent_at_ms = now_ms.max(1);
            let sends = fanout_msgs(me, key, f, only, &after);
            self.fanouts_redriven = self.fanouts_redriven.saturating_add(sends.len() as u64);
            for (shard, msg) in sends {
                out.mesh(shard, msg);
            }
        }
    }

    /// Per destination of fan-out `key`: the gseq of the group's previous fan-out that this
    /// destination has not acknowledged (0: none). The destination stores a fan-out only once it
    /// has applied that one, so a fan-out that overtakes an earlier one (lost, dropped, or
    /// re-driven later) is dropped and comes again, and each device sees the group's order.
    fn after_of(&self, (group, gseq): (GroupId, u64)) -> BTreeMap<ShardId, u64> {
        let mut after = BTreeMap::new();
        let Some(f) = self.pending.get(&(group, gseq)) else {
            return after;
        };
        for &shard in &f.unacked {
            let prev = self
                .pending
                .range((group, 0)..(group, gseq))
                .rev()
                .find(|(_, p)| p.unacked.contains(&shard))
                .map_or(0, |(&(_, g), _)| g);
            after.insert(shard, prev);
        }
        after
    }

    /// Copies for compaction: every live group record in `segment`.
    pub fn live_in(&self, segment: SegmentId) -> Vec<(GroupId, u64, u8)> {
        let mut live = Vec::new();
        for (&id, g) in &self.groups {
            for (&v, s) in &g.snaps {
                if s.segment == segment {
                    live.push((id, u64::from(v), 0));
                }
            }
            if let Some((gseq, s)) = g.done {
                if s == segment {
                    live.push((id, gseq, 2));
                }
            }
        }
        for (&(id, gseq), f) in &self.pending {
            if f.record.as_ref().is_some_and(|(s, _)| *s == segment) {
                live.push((id, gseq, 1));
            }
        }
        live.sort_unstable();
        live
    }

    /// Re-appends one live record found by `live_in` (its old copy in `from` dies).
    pub fn copy(
        &mut self,
        (group, n, kind): (GroupId, u64, u8),
        from: SegmentId,
        log: &mut Log<'_>,
    ) {
        match kind {
            0 => {
                let Some(snap) = self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.snaps.get_mut(&(n as u32)))
                else {
                    return;
                };
                let lsn = log.append(&snap.rec, true);
                snap.segment = lsn.segment;
            }
            1 => {
                let Some((seg, rec)) = self
                    .pending
                    .get_mut(&(group, n))
                    .and_then(|f| f.record.as_mut())
                else {
                    return;
                };
                let lsn = log.append(rec, true);
                *seg = lsn.segment;
            }
            _ => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                let lsn = log.append(&Record::GroupFanoutDone { group, gseq: n }, true);
                g.done = Some((n, lsn.segment));
            }
        }
        log.ledger.kill(from);
    }
}

/// The SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Releases memberships reserved for a change that was refused.
fn release(group: GroupId, reserved: BTreeMap<ShardId, Vec<UserId>>, out: &mut Out) {
    for (shard, users) in reserved {
        let r = GroupRelease { group, users };
        out.mesh(shard, MeshMsg::GroupRelease(Box::new(r)));
    }
}

/// The `GroupInfo` of a group.
fn info_frame(request_id: u64, group: GroupId, g: &Group) -> Frame {
    let s = &g.state;
    GroupInfo {
        request_id,
        group,
        version: s.version,
        seq: g.last_gseq,
        created_ms: s.created_ms,
        changed_ms: s.changed_ms,
        flags: s.flags,
        roster: Box::new(GroupRoster {
            members: s
                .members
                .iter()
                .map(|(&user, &admin)| GroupMember { user, admin })
                .collect(),
            subject: s.subject.clone(),
            description: s.description.clone(),
        }),
    }
    .into()
}

/// The mesh messages of a fan-out: one per unacknowledged destination (or only `only`).
fn fanout_msgs(
    me: ShardId,
    (group, gseq): (GroupId, u64),
    f: &Fanout,
    only: Option<ShardId>,
    after: &BTreeMap<ShardId, u64>,
) -> Vec<(ShardId, MeshMsg)> {
    f.unacked
        .iter()
        .filter(|&&s| only.is_none_or(|o| o == s))
        .filter_map(|&shard| {
            let users = f.dests.get(&shard)?.clone();
            let msg = GroupFanout {
                home: me,
                group,
                gseq,
                after: after.get(&shard).copied().unwrap_or(0),
                message: f.message.clone(),
                users,
            };
            Some((shard, MeshMsg::GroupFanout(Box::new(msg))))
        })
        .collect()
}

/// Group records while the log is replayed (home side).
#[derive(Debug, Default)]
pub(crate) struct GroupReplay {
    /// State records by (group, version): the copy in the latest segment.
    states: BTreeMap<(GroupId, u32), (SegmentId, Record)>,
    /// Message records by (group, gseq): the copy in the latest segment.
    messages: BTreeMap<(GroupId, u64), (SegmentId, Record)>,
    /// The highest done mark per group and its (latest) segment.
    done: BTreeMap<GroupId, (u64, SegmentId)>,
}

impl GroupReplay {
    /// A home-side group record; false for any other kind.
    pub fn record(&mut self, segment: SegmentId, rec: &Record) -> bool {
        match rec {
            Record::GroupState { group, version, .. } => {
                keep_latest(&mut self.states, (*group, *version), segment, rec);
            }
            Record::GroupMessage { group, gseq, .. } => {
                keep_latest(&mut self.messages, (*group, *gseq), segment, rec);
            }
            Record::GroupFanoutDone { group, gseq } => {
                let d = self.done.entry(*group).or_insert((*gseq, segment));
                if (*gseq, segment) >= *d {
                    *d = (*gseq, segment);
                }
            }
            _ => return false,
        }
        true
    }
}

fn keep_latest<K: Ord>(
    map: &mut BTreeMap<K, (SegmentId, Record)>,
    key: K,
    segment: SegmentId,
    rec: &Record,
) {
    if map.get(&key).is_none_or(|(s, _)| *s <= segment) {
        map.insert(key, (segment, rec.clone()));
    }
}

impl Groups {
    /// Rebuilds the groups from the replay: the current state of each (its latest version),
    /// every fan-out past the group's done mark as pending (sent again on the first Tick), the
    /// state records those pin, and the send dedup from the message records left. Returns the
    /// segments of the live records (for the ledger's liveness counts).
    pub fn recover(&mut self, replay: GroupReplay) -> Vec<SegmentId> {
        let GroupReplay {
            states,
            messages,
            done,
        } = replay;
        let mut live = Vec::new();
        // The versions pending messages go to: their state records stay live.
        let needed: BTreeSet<(GroupId, u32)> = messages
            .iter()
            .filter_map(|(&(group, gseq), (_, rec))| match rec {
                Record::GroupMessage { version, .. }
                    if gseq > done.get(&group).map_or(0, |&(d, _)| d) =>
                {
                    Some((group, *version))
                }
                _ => None,
            })
            .collect();
        let mut by_group: BTreeMap<GroupId, Vec<(u32, SegmentId, Record)>> = BTreeMap::new();
        for ((group, version), (segment, rec)) in states {
            by_group
                .entry(group)
                .or_default()
                .push((version, segment, rec));
        }
        for (group, snaps) in by_group {
            let hw = done.get(&group).map_or(0, |&(g, _)| g);
            let Some((_, _, current)) = snaps.last() else {
                continue;
            };
            let Some((_, state)) = State::of_record(current) else {
                continue;
            };
            let mut g = Group {
                last_gseq: state.gseq.max(hw),
                state,
                snaps: BTreeMap::new(),
                done: done.get(&group).copied(),
            };
            if let Some((_, segment)) = g.done {
                live.push(segment);
            }
            let current_version = g.state.version;
            for (version, segment, rec) in snaps {
                let pending_event = matches!(&rec, Record::GroupState { gseq, .. } if *gseq > hw);
                if version == current_version || pending_event || needed.contains(&(group, version))
                {
                    g.snaps.insert(
                        version,
                        Snap {
                            segment,
                            pins: 0,
                            rec,
                        },
                    );
                }
            }
            self.groups.insert(group, g);
        }
        // Pending events, then messages, each pinning its version.
        let events: Vec<(GroupId, u32, Record)> = self
            .groups
            .iter()
            .flat_map(|(&id, g)| {
                let hw = g.done.map_or(0, |(d, _)| d);
                g.snaps
                    .iter()
                    .filter(move |(_, s)| matches!(&s.rec, Record::GroupState { gseq, .. } if *gseq > hw))
                    .map(move |(&v, s)| (id, v, s.rec.clone()))
            })
            .collect();
        for (group, version, rec) in events {
            if let Some((_, gseq, message, to)) = event_message(&rec) {
                self.add_fanout((group, gseq), version, message, &to, None);
            }
        }
        for ((group, gseq), (segment, rec)) in messages {
            let Record::GroupMessage {
                version, message, ..
            } = &rec
            else {
                continue;
            };
            self.remember_send(
                (message.from, message.client_msg_id),
                (0, message.server_ts_ms),
            );
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            g.last_gseq = g.last_gseq.max(gseq);
            if gseq <= g.done.map_or(0, |(d, _)| d) {
                continue;
            }
            // The members of the state it was accepted under (pinned, so still in the log).
            let to: Vec<UserId> = match g.snaps.get(version).and_then(|s| State::of_record(&s.rec))
            {
                Some((_, s)) => s.members.keys().copied().collect(),
                None => {
                    tracing::warn!(group, gseq, version, "pending group message without its state record; fanned out to the current members");
                    g.state.members.keys().copied().collect()
                }
            };
            let (version, message) = (*version, message.clone());
            live.push(segment);
            self.add_fanout((group, gseq), version, message, &to, Some((segment, rec)));
        }
        for f in self.pending.values_mut() {
            // Durable: started (sent again on the first Tick).
            f.sent_at_ms = 1;
        }
        for g in self.groups.values() {
            live.extend(g.snaps.values().map(|s| s.segment));
        }
        self.redrive_all = !self.pending.is_empty();
        live.sort_unstable();
        live
    }
}
