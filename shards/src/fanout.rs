//! The dispatcher's group arms: group frames on the requester's home shard, group requests on
//! the group's home shard (`groups`), and the destination side of a fan-out.
//!
//! Destination side: a `GroupFanout` names the member users homed on this shard. The shard
//! expands them to their current devices (all of them; the sending device itself excepted),
//! stores the payload ONCE (one `GroupCopy` record) with one small mailbox entry per device
//! pointing at it, delivers to the online devices and pushes (content-free) to the offline
//! ones, and acknowledges (`GroupFanoutAck`) once the record is durable. It remembers the last
//! `gseq` it applied per group and acknowledges anything at or below it without storing it
//! again. Each fan-out names the group's previous one this shard had not acknowledged
//! (`after`); one that arrives before that one is applied is dropped unanswered (the home
//! re-drives unacknowledged fan-outs in order), so nothing overtakes a lost fan-out, duplicates
//! are dropped here, and each device sees the group's order.

use protocol::frame::{
    GroupChange, GroupCreate, GroupInfoFetch, GroupReceiptFetch, GroupSend, GroupSetBlob,
};
use protocol::group::GroupId;
use protocol::{capability, DeviceAddr, ErrorCode, Frame};
use storage::Journal;

use crate::groups::{GroupReplay, GroupReq, GroupRequest};
use crate::ledger::Log;
use crate::record::Record;
use crate::types::HashMap;
use crate::waiter::Waiter;
use crate::{
    home_shard, ConnId, GroupFanout, GroupFanoutAck, GroupJoin, GroupJoined, GroupRelease, MeshMsg,
    Shard,
};
use protocol::group::{GroupBody, GroupEnvelope, GroupOp};
use protocol::MsgType;

/// Receipt counts of one group message on its destination shard.
#[derive(Debug)]
struct DestReceipts {
    home: crate::ShardId,
    devices: u32,
    delivered: u32,
    /// Devices that marked it read (each counted once).
    readers: std::collections::BTreeSet<DeviceAddr>,
    /// Changed since last reported to the home.
    dirty: bool,
}

/// What a destination shard remembers of the groups it stores for.
#[derive(Debug, Default)]
pub(crate) struct FanoutDest {
    /// Receipt counts of the group messages stored here, by (group, gseq), newest
    /// `group_receipts_tracked_max` (oldest first in `receipt_order`). In memory only: a
    /// restart forgets them (receipts are best effort, as everywhere).
    receipts: std::collections::BTreeMap<(GroupId, u64), DestReceipts>,
    receipt_order: std::collections::VecDeque<(GroupId, u64)>,
    /// The last gseq stored per group (rebuilt at recovery from the `GroupCopy` records left;
    /// a re-drive of a gseq whose records are all gone is stored again: at least once).
    applied: HashMap<GroupId, u64>,
    /// Fan-outs stored here (one record each).
    pub stored: u64,
    /// Mailbox entries they made.
    pub entries: u64,
    /// Fan-outs dropped as already stored.
    pub duplicates: u64,
    /// Fan-outs dropped because they overtook an earlier one not applied yet.
    pub out_of_order: u64,
}

impl FanoutDest {
    /// Starts counting receipts of a group message stored here for `devices` devices.
    fn track(&mut self, home: crate::ShardId, key: (GroupId, u64), devices: usize, max: usize) {
        let d = DestReceipts {
            home,
            devices: u32::try_from(devices).unwrap_or(u32::MAX),
            delivered: 0,
            readers: std::collections::BTreeSet::new(),
            dirty: false,
        };
        if self.receipts.insert(key, d).is_none() {
            self.receipt_order.push_back(key);
        }
        while self.receipt_order.len() > max {
            if let Some(old) = self.receipt_order.pop_front() {
                self.receipts.remove(&old);
            }
        }
    }

    /// Member devices here acknowledged these group messages.
    pub fn acked(&mut self, keys: Vec<(GroupId, u64)>) {
        for key in keys {
            if let Some(d) = self.receipts.get_mut(&key) {
                d.delivered = d.delivered.saturating_add(1).min(d.devices);
                d.dirty = true;
            }
        }
    }

    /// `reader` (homed here) read group message `key`.
    pub fn read(&mut self, key: (GroupId, u64), reader: DeviceAddr) {
        if let Some(d) = self.receipts.get_mut(&key) {
            let room = d.readers.len() < usize::try_from(d.devices).unwrap_or(usize::MAX);
            if room && d.readers.insert(reader) {
                d.dirty = true;
            }
        }
    }

    /// The Tick: the counts that changed, to their group's home (one message per group
    /// message per tick at most).
    pub fn tick(&mut self, me: crate::ShardId, out: &mut crate::out::Out) {
        for (&(group, gseq), d) in self.receipts.iter_mut().filter(|(_, d)| d.dirty) {
            d.dirty = false;
            let r = crate::GroupReceipts {
                shard: me,
                group,
                gseq,
                devices: d.devices,
                delivered: d.delivered,
                read: u32::try_from(d.readers.len()).unwrap_or(u32::MAX),
            };
            out.mesh(d.home, MeshMsg::GroupReceipts(Box::new(r)));
        }
    }

    /// A `GroupCopy` record found at recovery.
    pub fn recover(&mut self, rec: &Record) {
        if let Record::GroupCopy { group, gseq, .. } = rec {
            let a = self.applied.entry(*group).or_insert(0);
            *a = (*a).max(*gseq);
        }
    }
}

impl Shard {
    /// A group frame from the logged-in device `key` on `conn`: to the group's home shard.
    pub(crate) fn on_group_frame(&mut self, conn: ConnId, key: DeviceAddr, frame: Frame) {
        let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
        let (op, ref_id) = match frame {
            Frame::GroupCreate(GroupCreate {
                request_id,
                members,
            }) => {
                let group = self.groups.draw_id();
                let members = members.0;
                (
                    GroupReq::Create {
                        request_id,
                        group,
                        members,
                    },
                    request_id,
                )
            }
            Frame::GroupChange(GroupChange {
                request_id,
                group,
                op,
                users,
            }) => (
                GroupReq::Change {
                    request_id,
                    group,
                    op,
                    users: users.0,
                },
                request_id,
            ),
            Frame::GroupSetBlob(GroupSetBlob {
                request_id,
                group,
                which,
                blob,
            }) => (
                GroupReq::SetBlob {
                    request_id,
                    group,
                    which,
                    blob,
                },
                request_id,
            ),
            Frame::GroupInfoFetch(GroupInfoFetch { request_id, group }) => {
                (GroupReq::Info { request_id, group }, request_id)
            }
            Frame::GroupReceiptFetch(GroupReceiptFetch {
                request_id,
                group,
                gseq,
            }) => (
                GroupReq::ReceiptFetch {
                    request_id,
                    group,
                    gseq,
                },
                request_id,
            ),
            Frame::GroupSend(GroupSend {
                client_msg_id,
                group,
                payload,
            }) => (
                GroupReq::Send {
                    client_msg_id,
                    group,
                    payload,
                },
                client_msg_id,
            ),
            _ => return,
        };
        if caps & capability::GROUPS == 0 {
            let text = "group frames need the GROUPS capability";
            let error = Frame::error(ErrorCode::UnsupportedAddress, ref_id, text);
            return self.out.send(conn, error);
        }
        let home = home_shard(op.group(), self.config.shards);
        if matches!(op, GroupReq::Send { .. }) {
            // Tracked like a Store: a restart of the group's home closes this connection so
            // the client resends what was not acknowledged.
            self.sender
                .route(conn, home, &self.config, &mut self.registry);
        }
        let req = GroupRequest {
            reply: self.out.here(conn),
            from: key,
            op,
        };
        self.out.mesh(home, MeshMsg::GroupRequest(Box::new(req)));
    }

    /// A group request at the group's home shard.
    pub(crate) fn on_group_request(
        &mut self,
        now_ms: u64,
        req: GroupRequest,
        journal: &mut dyn Journal,
    ) {
        let poisoned = self.ledger.is_poisoned();
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.groups
            .request(now_ms, req, poisoned, &mut log, &mut self.out);
    }

    /// Destination side of a fan-out (see the module doc).
    pub(crate) fn on_group_fanout(&mut self, f: GroupFanout, journal: &mut dyn Journal) {
        // A poisoned log stores nothing and acknowledges nothing: the home keeps re-driving.
        if self.ledger.is_poisoned() {
            return;
        }
        let ack = Waiter::GroupStored {
            home: f.home,
            group: f.group,
            gseq: f.gseq,
        };
        let applied = self.fanout.applied.get(&f.group).copied().unwrap_or(0);
        if f.gseq <= applied {
            self.fanout.duplicates = self.fanout.duplicates.saturating_add(1);
            // Stored before, perhaps not durable yet: answer once everything so far is.
            return self.ledger.wait_all(ack);
        }
        if f.after > applied {
            // It overtook an earlier fan-out this shard has not applied: drop it unanswered;
            // the home sends both again, in order.
            self.fanout.out_of_order = self.fanout.out_of_order.saturating_add(1);
            return;
        }
        let me = self.config.shard;
        let mut devices = Vec::new();
        for &user in &f.users {
            if home_shard(user, self.config.shards) != me {
                continue;
            }
            for d in self.devices_of(user) {
                let addr = DeviceAddr::new(user, d);
                if addr != f.message.from {
                    devices.push(addr);
                }
            }
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        // A removal or leave releases the removed users' memberships here (their home).
        if f.message.msg_type == MsgType::GROUP_EVENT {
            if let Ok(GroupEnvelope {
                body: GroupBody::Event(e),
                ..
            }) = GroupEnvelope::decode(f.message.msg_type, &f.message.payload)
            {
                if e.op == GroupOp::REMOVE || e.op == GroupOp::LEAVE {
                    let mine: Vec<_> = e
                        .users
                        .iter()
                        .copied()
                        .filter(|&u| home_shard(u, self.config.shards) == me)
                        .collect();
                    self.memberships.release(f.group, &mine, &mut log);
                }
            }
        }
        let key = (f.group, f.gseq);
        let is_message = f.message.msg_type == MsgType::GROUP;
        let stored =
            self.mailboxes
                .store_group(key, f.message, &devices, &mut log, &mut self.registry);
        self.fanout.applied.insert(f.group, f.gseq);
        if stored.is_some() && is_message {
            let max = self.config.group_receipts_tracked_max;
            self.fanout.track(f.home, key, devices.len(), max);
        }
        if stored.is_some() {
            self.fanout.stored = self.fanout.stored.saturating_add(1);
            self.fanout.entries = self.fanout.entries.saturating_add(devices.len() as u64);
        }
        self.ledger.wait_all(ack);
    }

    /// Users' home side: reserve memberships (all or nothing), answer once durable.
    pub(crate) fn on_group_join(&mut self, j: GroupJoin, journal: &mut dyn Journal) {
        let answer = |result| GroupJoined {
            token: j.token,
            shard: self.config.shard,
            result,
        };
        if self.ledger.is_poisoned() {
            let msg = MeshMsg::GroupJoined(Box::new(answer(Err(Vec::new()))));
            return self.out.mesh(j.reply_shard, msg);
        }
        let me = self.config.shard;
        let users: Vec<_> = j
            .users
            .iter()
            .copied()
            .filter(|&u| home_shard(u, self.config.shards) == me)
            .collect();
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        match self.memberships.reserve(j.group, &users, &mut log) {
            Ok(_) => {
                let w = Waiter::GroupJoined {
                    reply_shard: j.reply_shard,
                    token: j.token,
                };
                self.ledger.wait_all(w);
            }
            Err(over) => {
                let msg = MeshMsg::GroupJoined(Box::new(answer(Err(over))));
                self.out.mesh(j.reply_shard, msg);
            }
        }
    }

    /// Users' home side: a refused change gives its reservations back.
    pub(crate) fn on_group_release(&mut self, r: GroupRelease, journal: &mut dyn Journal) {
        if self.ledger.is_poisoned() {
            return;
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.memberships.release(r.group, &r.users, &mut log);
    }

    /// Group home side: a reservation answer.
    pub(crate) fn on_group_joined(
        &mut self,
        now_ms: u64,
        j: GroupJoined,
        journal: &mut dyn Journal,
    ) {
        let poisoned = self.ledger.is_poisoned();
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.groups
            .joined(now_ms, j, poisoned, &mut log, &mut self.out);
    }

    /// Sender's home side: an aggregated receipt for a device homed here (dropped when it is
    /// offline or did not announce `GROUPS`; it can fetch the counts later).
    pub(crate) fn on_group_receipt_notice(&mut self, n: crate::GroupReceiptNotice) {
        let Some(conn) = self.registry.online(n.to) else {
            return;
        };
        let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
        if caps & capability::GROUPS != 0 {
            self.out.send(conn, n.frame.into());
        }
    }

    /// Home side: a destination acknowledged a fan-out.
    pub(crate) fn on_group_fanout_ack(&mut self, a: GroupFanoutAck, journal: &mut dyn Journal) {
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.groups.acked(a, &mut log);
    }

    /// A group waiter whose append is durable.
    pub(crate) fn run_group_waiter(
        &mut self,
        now_ms: u64,
        waiter: Waiter,
        journal: &mut dyn Journal,
    ) {
        match waiter {
            Waiter::GroupReply { reply, frame } => self.out.reply(reply, *frame),
            Waiter::GroupFanout { group, gseq } => {
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                self.groups
                    .start(now_ms, (group, gseq), &mut log, &mut self.out);
            }
            Waiter::GroupJoined { reply_shard, token } => {
                let j = GroupJoined {
                    token,
                    shard: self.config.shard,
                    result: Ok(()),
                };
                self.out
                    .mesh(reply_shard, MeshMsg::GroupJoined(Box::new(j)));
            }
            Waiter::GroupStored { home, group, gseq } => {
                let ack = GroupFanoutAck {
                    shard: self.config.shard,
                    group,
                    gseq,
                };
                self.out.mesh(home, MeshMsg::GroupFanoutAck(ack));
            }
            _ => {}
        }
    }

    /// Group records at recovery (home and destination side); false for other kinds.
    pub(crate) fn recover_group_record(
        &mut self,
        replay: &mut GroupReplay,
        segment: storage::SegmentId,
        rec: &Record,
    ) -> bool {
        replay.record(segment, rec) || self.memberships.recover(segment, rec)
    }
}
