//! Groups in the SDK (capability `GROUPS`, `docs/protocol.md` §18, `docs/e2ee.md` §15): the
//! requests, the Sender Key bookkeeping around them, and opening what the server fans out.
//!
//! [`GroupClient`] sits beside a [`Session`] (it needs end-to-end encryption on): it keeps, per
//! group this device knows, the member list as of the last event or fetch, the users this
//! device's sender key was sent to, and whether it must rotate before its next message.
//!
//! * **Distribution before first use.** [`GroupClient::send`] first sends this device's sender
//!   key distribution to every member user it has not reached yet, over the pairwise sessions
//!   (a `SendMulti` to all of the user's devices, with the sync copies reaching this account's
//!   other devices), waits for those ✓s (so every member device's mailbox holds the key before
//!   the group message), then encrypts once with the sender key and uploads ONE `GroupSend`.
//!   Members added later get the key before this device's next message.
//! * **Rotation on removal.** When a member is removed or leaves (the event, or this device's
//!   own change), or a member's device is unlinked ([`Event::DevicesChanged`]), this device
//!   forgets the removed devices' sender keys and its next [`GroupClient::send`] rotates the
//!   sender key and distributes the new one to the remaining members only: the removed member
//!   holds only the old chain and cannot decrypt later messages, even if it obtains their
//!   ciphertext.
//! * **Opening.** [`GroupClient::handle`] turns session events into [`GroupUpdate`]s: a pairwise
//!   message carrying a distribution installs the sender key; a group `Deliver` is decrypted
//!   with the sender's key, or reported [`GroupUpdate::Undecryptable`].
//!
//! The state here is in memory: after a restart, [`GroupClient::info`] fetches the member
//! list again, and the next send distributes the key to every member again (receivers keep a
//! key they already hold; the chain never rewinds).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use protocol::frame::{self, GroupDone, GroupInfo};
use protocol::group::{GroupBlobKind, GroupBody, GroupEvent, GroupId, GroupOp, UserList};
use protocol::{DeviceAddr, DeviceId, Frame, MsgType, UserId};
use switchboard_e2ee::Address;

use crate::error::{Error, ProtocolError, Result};
use crate::session::{new_client_msg_id, Event, Session};

/// First bytes of a pairwise plaintext that carries a sender key distribution.
pub const DISTRIBUTION_MAGIC: &[u8; 5] = b"SWBK\x01";

/// How long [`GroupClient::send`] waits for the ✓ of each distribution.
const DISTRIBUTION_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a group session event came to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupUpdate {
    /// A group message, decrypted.
    Message {
        /// The group.
        group: GroupId,
        /// Its place in the group's order.
        gseq: u64,
        /// The sending device.
        from: DeviceAddr,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// A membership event (the local member list is updated).
    Event {
        /// The group.
        group: GroupId,
        /// Its place in the group's order.
        gseq: u64,
        /// The event.
        event: GroupEvent,
    },
    /// A member device's sender key for `group` was installed.
    KeyReceived {
        /// The group.
        group: GroupId,
        /// Whose key.
        from: DeviceAddr,
    },
    /// A group message this device cannot decrypt (no key from the sender for it: sent
    /// before this device was a member, after it was removed, or before the key arrived), or
    /// a replay.
    Undecryptable {
        /// The group.
        group: GroupId,
        /// Its place in the group's order.
        gseq: u64,
        /// The sending device.
        from: DeviceAddr,
        /// Why.
        reason: String,
    },
}

/// What this device knows of one group.
#[derive(Clone, Debug, Default)]
struct Local {
    members: BTreeSet<UserId>,
    /// Users this device's current sender key was sent to.
    distributed: BTreeSet<UserId>,
    /// A member was removed: rotate before the next message.
    rotate: bool,
    /// The highest gseq handed out (devices drop older or repeated ones).
    last_gseq: u64,
}

/// Groups beside a session. See the module documentation.
#[derive(Debug, Default)]
pub struct GroupClient {
    groups: BTreeMap<GroupId, Local>,
}

impl GroupClient {
    /// An empty client.
    pub fn new() -> Self {
        Self::default()
    }

    /// The members of `group` as this device last learnt them.
    pub fn members(&self, group: GroupId) -> Option<Vec<UserId>> {
        self.groups
            .get(&group)
            .map(|l| l.members.iter().copied().collect())
    }

    /// Creates a group with `members` (this user is the creator and first admin) and returns
    /// its state.
    pub fn create(&mut self, s: &mut Session, members: &[UserId]) -> Result<GroupInfo> {
        let request_id = new_client_msg_id();
        let f = Frame::GroupCreate(frame::GroupCreate {
            request_id,
            members: UserList::of(members.iter().copied().filter(|&u| u != s.user())),
        });
        let info = expect_info(s.group_request(request_id, f)?)?;
        self.learn(&info);
        Ok(info)
    }

    /// Fetches `group`'s state (members only) and updates the local member list.
    pub fn info(&mut self, s: &mut Session, group: GroupId) -> Result<GroupInfo> {
        let request_id = new_client_msg_id();
        let f = Frame::GroupInfoFetch(frame::GroupInfoFetch { request_id, group });
        let info = expect_info(s.group_request(request_id, f)?)?;
        self.learn(&info);
        Ok(info)
    }

    /// A `GroupChange` (add, remove, leave, promote, demote, settings).
    pub fn change(
        &mut self,
        s: &mut Session,
        group: GroupId,
        op: GroupOp,
        users: &[UserId],
    ) -> Result<GroupDone> {
        let request_id = new_client_msg_id();
        let f = Frame::GroupChange(frame::GroupChange {
            request_id,
            group,
            op,
            users: UserList::of(users.iter().copied()),
        });
        let done = match s.group_request(request_id, f)? {
            Frame::GroupDone(d) => d,
            _ => return Err(ProtocolError::Mismatch("GroupDone").into()),
        };
        let me = s.user();
        let l = self.groups.entry(group).or_default();
        apply(l, op, users, me);
        if op == GroupOp::LEAVE {
            self.forget(s, group);
        }
        Ok(done)
    }

    /// Adds `users` to `group`.
    pub fn add(&mut self, s: &mut Session, group: GroupId, users: &[UserId]) -> Result<GroupDone> {
        self.change(s, group, GroupOp::ADD, users)
    }

    /// Removes `users` from `group` (this device rotates its key before its next message).
    pub fn remove(
        &mut self,
        s: &mut Session,
        group: GroupId,
        users: &[UserId],
    ) -> Result<GroupDone> {
        self.change(s, group, GroupOp::REMOVE, users)
    }

    /// Leaves `group` and forgets its keys.
    pub fn leave(&mut self, s: &mut Session, group: GroupId) -> Result<GroupDone> {
        self.change(s, group, GroupOp::LEAVE, &[])
    }

    /// Sets the group's subject: `setter user u64, setter device u16` (big-endian), then the
    /// subject encrypted with this device's sender key (members decrypt it with
    /// [`GroupClient::subject`]); the server stores it as given.
    pub fn set_subject(&mut self, s: &mut Session, group: GroupId, subject: &str) -> Result<()> {
        self.ensure_key(s, group)?;
        let ct = encrypt(s, group, subject.as_bytes())?;
        let mut blob = Vec::with_capacity(10 + ct.len());
        blob.extend_from_slice(&s.user().to_be_bytes());
        blob.extend_from_slice(&s.device().to_be_bytes());
        blob.extend_from_slice(&ct);
        let request_id = new_client_msg_id();
        let f = Frame::GroupSetBlob(frame::GroupSetBlob {
            request_id,
            group,
            which: GroupBlobKind::SUBJECT,
            blob: Bytes::from(blob),
        });
        match s.group_request(request_id, f)? {
            Frame::GroupDone(_) => Ok(()),
            _ => Err(ProtocolError::Mismatch("GroupDone").into()),
        }
    }

    /// The subject of a fetched group state, decrypted (`None` when there is none, or this
    /// device does not hold the setter's key for it: set before it joined).
    pub fn subject(s: &mut Session, info: &GroupInfo) -> Option<String> {
        let blob = info.roster.subject.as_ref();
        let (user, rest) = blob.split_first_chunk::<8>()?;
        let (device, ct) = rest.split_first_chunk::<2>()?;
        let setter = DeviceAddr::new(u64::from_be_bytes(*user), u16::from_be_bytes(*device));
        if setter == DeviceAddr::new(s.user(), s.device()) {
            // This device's own ciphertext: its sending chain cannot open it again.
            return None;
        }
        let plain = Self::open_blob(s, info.group, setter, ct).ok()?;
        String::from_utf8(plain).ok()
    }

    /// Decrypts a blob encrypted with `setter`'s sender key (a device that distributed its key
    /// to this one).
    pub fn open_blob(
        s: &mut Session,
        group: GroupId,
        setter: DeviceAddr,
        blob: &[u8],
    ) -> Result<Vec<u8>> {
        let from = Address {
            user: setter.user,
            device: setter.device,
        };
        let r = s
            .with_e2ee(|e| e.group_decrypt(group, from, blob))
            .ok_or(Error::E2eeDisabled)?;
        r.map(|p| p.bytes.to_vec()).map_err(Error::from)
    }

    /// Tells the server that this device read group message `gseq` (counted in the sender's
    /// aggregated receipt).
    pub fn mark_read(s: &mut Session, group: GroupId, gseq: u64) -> Result<()> {
        s.read_group(group, gseq)
    }

    /// Fetches the aggregated receipts of group message `gseq` (members only).
    pub fn receipts(s: &mut Session, group: GroupId, gseq: u64) -> Result<frame::GroupReceipt> {
        let request_id = new_client_msg_id();
        let f = Frame::GroupReceiptFetch(frame::GroupReceiptFetch {
            request_id,
            group,
            gseq,
        });
        match s.group_request(request_id, f)? {
            Frame::GroupReceipt(r) => Ok(r),
            _ => Err(ProtocolError::Mismatch("GroupReceipt").into()),
        }
    }

    /// Sends `plaintext` to `group`: rotates and distributes this device's sender key as
    /// needed (see the module documentation), encrypts once, uploads once. Returns the
    /// `client_msg_id` ([`Session::wait_server_ack`] waits for its ✓).
    pub fn send(&mut self, s: &mut Session, group: GroupId, plaintext: &[u8]) -> Result<u64> {
        self.ensure_key(s, group)?;
        let ct = encrypt(s, group, plaintext)?;
        s.group_send(group, Bytes::from(ct))
    }

    /// Makes sure every current member user holds this device's current sender key (rotating
    /// first after a removal), waiting for the ✓ of each distribution.
    fn ensure_key(&mut self, s: &mut Session, group: GroupId) -> Result<()> {
        if !self.groups.contains_key(&group) {
            self.info(s, group)?;
        }
        let me = s.user();
        let Some(l) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        let dist = if l.rotate {
            l.distributed.clear();
            l.rotate = false;
            s.with_e2ee(|e| e.rotate_sender_key(group))
        } else {
            s.with_e2ee(|e| e.sender_key_distribution(group))
        }
        .ok_or(Error::E2eeDisabled)?
        .map_err(Error::from)?;
        let todo: Vec<UserId> = l
            .members
            .iter()
            .copied()
            .filter(|u| *u != me && !l.distributed.contains(u))
            .collect();
        let mut payload = DISTRIBUTION_MAGIC.to_vec();
        payload.extend_from_slice(&dist);
        let mut sent = Vec::new();
        for &user in &todo {
            sent.push((user, s.send(user, &payload, MsgType::TEXT)?));
        }
        for (user, id) in sent {
            s.wait_server_ack(id, DISTRIBUTION_ACK_TIMEOUT)?;
            if let Some(l) = self.groups.get_mut(&group) {
                l.distributed.insert(user);
            }
        }
        Ok(())
    }

    /// Looks at a session event: `Some` for what concerns groups (the event is consumed),
    /// `None` for anything else (hand it on).
    pub fn handle(&mut self, s: &mut Session, event: &Event) -> Option<GroupUpdate> {
        match event {
            Event::Message(m) => self.distribution(s, m.from, &m.payload),
            Event::SyncCopy { message, .. } => self.distribution(s, message.from, &message.payload),
            Event::DevicesChanged { user, removed, .. } if !removed.is_empty() => {
                // A member's device was unlinked: forget its keys, rotate before the next send
                // in every group the user is in. (The event stays the caller's: `None`.)
                let groups: Vec<GroupId> = self
                    .groups
                    .iter()
                    .filter(|(_, l)| l.members.contains(user))
                    .map(|(&g, _)| g)
                    .collect();
                for group in groups {
                    if let Some(l) = self.groups.get_mut(&group) {
                        l.rotate = true;
                    }
                    forget_devices(s, group, *user, removed);
                }
                None
            }
            Event::Group { from, envelope, .. } => {
                let (group, gseq) = (envelope.group, envelope.gseq);
                let l = self.groups.entry(group).or_default();
                l.last_gseq = l.last_gseq.max(gseq);
                match &envelope.body {
                    GroupBody::Message(ct) => Some(open(s, group, gseq, *from, ct)),
                    GroupBody::Event(e) => {
                        let me = s.user();
                        self.on_event(s, group, e, me);
                        Some(GroupUpdate::Event {
                            group,
                            gseq,
                            event: e.clone(),
                        })
                    }
                }
            }
            _ => None,
        }
    }

    /// A pairwise plaintext carrying a distribution: install the key.
    fn distribution(
        &mut self,
        s: &mut Session,
        from: DeviceAddr,
        payload: &[u8],
    ) -> Option<GroupUpdate> {
        let dist = payload.strip_prefix(DISTRIBUTION_MAGIC.as_slice())?;
        let sender = Address {
            user: from.user,
            device: from.device,
        };
        match s.with_e2ee(|e| e.process_sender_key_distribution(sender, dist))? {
            Ok(r) => Some(GroupUpdate::KeyReceived {
                group: r.group_id,
                from,
            }),
            Err(e) => {
                tracing::warn!(user = from.user, error = %e, "sender key distribution refused");
                None
            }
        }
    }

    fn on_event(&mut self, s: &mut Session, group: GroupId, e: &GroupEvent, me: UserId) {
        let l = self.groups.entry(group).or_default();
        if e.op == GroupOp::CREATED {
            l.members = e.users.iter().copied().collect();
            return;
        }
        apply(l, e.op, &e.users, me);
        let gone = matches!(e.op, GroupOp::REMOVE | GroupOp::LEAVE);
        if gone && e.users.contains(&me) {
            return self.forget(s, group);
        }
        if gone {
            // The removed members' keys go: their later messages are refused here.
            let all: Vec<DeviceId> = (0..=MAX_DEVICE_ID).collect();
            for &u in &e.users {
                forget_devices(s, group, u, &all);
            }
        }
    }

    /// Drops what this device holds for `group` (it left or was removed).
    fn forget(&mut self, s: &mut Session, group: GroupId) {
        self.groups.remove(&group);
        if let Some(Err(e)) = s.with_e2ee(|e| e.forget_group(group)) {
            tracing::warn!(group, error = %e, "forgetting group keys failed");
        }
    }

    fn learn(&mut self, info: &GroupInfo) {
        let l = self.groups.entry(info.group).or_default();
        let members: BTreeSet<UserId> = info.roster.members.iter().map(|m| m.user).collect();
        // A member gone since the last view: rotate.
        if l.members.iter().any(|u| !members.contains(u)) {
            l.rotate = true;
        }
        l.members = members;
    }
}

/// Applies a change to the local view (removals set the rotation flag).
fn apply(l: &mut Local, op: GroupOp, users: &[UserId], me: UserId) {
    match op {
        GroupOp::ADD => l.members.extend(users.iter().copied()),
        GroupOp::REMOVE | GroupOp::LEAVE => {
            let users: Vec<UserId> = if op == GroupOp::LEAVE && users.is_empty() {
                vec![me]
            } else {
                users.to_vec()
            };
            for u in &users {
                l.members.remove(u);
                l.distributed.remove(u);
            }
            l.rotate = true;
        }
        _ => {}
    }
}

/// Highest device id an account may have (the server's `devices_per_account_max` is at most
/// 32, ids start at 0).
const MAX_DEVICE_ID: DeviceId = 31;

/// Drops the sender keys of `user`'s `devices` in `group`.
fn forget_devices(s: &mut Session, group: GroupId, user: UserId, devices: &[DeviceId]) {
    for &device in devices {
        let member = Address { user, device };
        if let Some(Err(e)) = s.with_e2ee(|e| e.forget_group_member(group, member)) {
            tracing::warn!(group, user, device, error = %e, "forgetting a member's key failed");
        }
    }
}

fn encrypt(s: &mut Session, group: GroupId, plaintext: &[u8]) -> Result<Vec<u8>> {
    s.with_e2ee(|e| e.group_encrypt(group, plaintext))
        .ok_or(Error::E2eeDisabled)?
        .map_err(Error::from)
}

fn open(s: &mut Session, group: GroupId, gseq: u64, from: DeviceAddr, ct: &[u8]) -> GroupUpdate {
    let sender = Address {
        user: from.user,
        device: from.device,
    };
    match s.with_e2ee(|e| e.group_decrypt(group, sender, ct)) {
        Some(Ok(p)) => GroupUpdate::Message {
            group,
            gseq,
            from,
            plaintext: p.bytes.to_vec(),
        },
        Some(Err(e)) => GroupUpdate::Undecryptable {
            group,
            gseq,
            from,
            reason: e.to_string(),
        },
        None => GroupUpdate::Undecryptable {
            group,
            gseq,
            from,
            reason: "end-to-end encryption is off".to_owned(),
        },
    }
}

fn expect_info(f: Frame) -> Result<GroupInfo> {
    match f {
        Frame::GroupInfo(i) => Ok(i),
        _ => Err(ProtocolError::Mismatch("GroupInfo").into()),
    }
}
