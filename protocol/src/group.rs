//! Groups on the wire (capability `GROUPS`, `docs/protocol.md` §18): the member lists and
//! roster that end group frames, the operations, and the envelope the server puts around a
//! group message or a membership event before it delivers it with `Deliver`.
//!
//! A group message reaches a member device as an ordinary `Deliver` whose `msg_type` is
//! [`MsgType::GROUP`] or [`MsgType::GROUP_EVENT`]; its payload is a [`GroupEnvelope`] the
//! group's home shard built: the group, the group sequence number (one sequence per group, for
//! messages and membership events alike), then the sender's Sender Key ciphertext (a message)
//! or the [`GroupEvent`] (a change of membership, admins, settings, subject or description).

use bytes::{BufMut, Bytes, BytesMut};
use zerocopy::byteorder::big_endian::U16;

use crate::addr::UserId;
use crate::codec::{Body, BodyError, Invalid};
use crate::message::MsgType;

/// A group id: drawn by the server at creation, homed on the shard `hash(group) % shards` like
/// a user. Group ids and user ids are separate namespaces.
pub type GroupId = u64;

/// Most users one `GroupCreate` / `GroupChange` list, or one `GroupInfo` roster, carries (the
/// server's own limit, `group_members_max`, is at most this).
pub const GROUP_USERS_MAX: usize = 1024;

/// Most bytes of an (end-to-end encrypted) group subject.
pub const GROUP_SUBJECT_BYTES_MAX: usize = 256;

/// Most bytes of an (end-to-end encrypted) group description.
pub const GROUP_DESCRIPTION_BYTES_MAX: usize = 2048;

/// Bytes one [`GroupMember`] takes in a `GroupInfo` roster: `user u64, role u8`.
pub const GROUP_MEMBER_BYTES: usize = 9;

/// Bytes of a [`GroupEnvelope`] before its body: `group u64, gseq u64`.
pub const GROUP_ENVELOPE_HEADER_BYTES: usize = 16;

/// Bytes of a [`GroupEvent`] before its users: `op u8, actor u64, version u32, count u16`.
pub const GROUP_EVENT_HEADER_BYTES: usize = 15;

wire_enum! {
    /// A change to a group (`GroupChange.op`), and what a membership event reports
    /// (`GroupEvent.op`). `CREATED`, `SUBJECT` and `DESCRIPTION` only appear in events (the
    /// server refuses them in `GroupChange` with `GroupOpInvalid`).
    pub struct GroupOp(u8) {
        /// Add the listed users as members (admins only, unless `admins_only` is off).
        ADD = 1,
        /// Remove the listed members (admins only, unless `admins_only` is off).
        REMOVE = 2,
        /// The sender leaves (the list is empty).
        LEAVE = 3,
        /// Make the listed members admins (admins only).
        PROMOTE = 4,
        /// Make the listed admins plain members (admins only; the last admin cannot go).
        DEMOTE = 5,
        /// Only admins may add and remove members (the default; admins only; list empty).
        ADMINS_ONLY_ON = 6,
        /// Any member may add and remove members (admins only; list empty).
        ADMINS_ONLY_OFF = 7,
        /// Event only: the group was created with the listed members (creator first).
        CREATED = 8,
        /// Event only: the subject changed (fetch it with `GroupInfoFetch`).
        SUBJECT = 9,
        /// Event only: the description changed.
        DESCRIPTION = 10,
    }
}

known_u8_field!(GroupOp, "group op");

wire_enum! {
    /// Which encrypted blob a `GroupSetBlob` replaces.
    pub struct GroupBlobKind(u8) {
        /// The subject (at most [`GROUP_SUBJECT_BYTES_MAX`] bytes).
        SUBJECT = 1,
        /// The description (at most [`GROUP_DESCRIPTION_BYTES_MAX`] bytes).
        DESCRIPTION = 2,
    }
}

known_u8_field!(GroupBlobKind, "group blob kind");

impl GroupBlobKind {
    /// Most bytes the blob may have.
    pub fn bytes_max(self) -> usize {
        match self {
            GroupBlobKind::SUBJECT => GROUP_SUBJECT_BYTES_MAX,
            _ => GROUP_DESCRIPTION_BYTES_MAX,
        }
    }
}

/// A list of users ending a group frame: `count u16` (`0 <= count <=` [`GROUP_USERS_MAX`]) in
/// the head, then `count` × `user u64`, strictly increasing (so no user twice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserList(pub Vec<UserId>);

impl UserList {
    /// The list of `users`, sorted and without repeats.
    pub fn of(users: impl IntoIterator<Item = UserId>) -> Self {
        let mut v: Vec<UserId> = users.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        UserList(v)
    }
}

impl Body for UserList {
    type Head = U16;
    const HAS_REST: bool = true;
    fn head(&self) -> U16 {
        // An over-long list is refused by the peer (count mismatch); never truncated silently.
        U16::new(u16::try_from(self.0.len()).unwrap_or(u16::MAX))
    }
    fn rest_len(&self) -> usize {
        8 * self.0.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for u in &self.0 {
            out.extend_from_slice(&u.to_be_bytes());
        }
    }
    fn decode(head: &U16, rest: Bytes) -> Result<Self, BodyError> {
        let users = users_of(usize::from(head.get()), &rest).map_err(BodyError::Invalid)?;
        Ok(UserList(users))
    }
}

/// `count` big-endian user ids, all of `rest`, strictly increasing, at most [`GROUP_USERS_MAX`].
fn users_of(count: usize, rest: &[u8]) -> Result<Vec<UserId>, Invalid> {
    if count > GROUP_USERS_MAX || rest.len() != count * 8 {
        return Err("user count");
    }
    let users: Vec<UserId> = rest
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect();
    if users.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
        return Err("user order");
    }
    Ok(users)
}

/// One member in a `GroupInfo` roster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupMember {
    /// The member.
    pub user: UserId,
    /// Whether it is an admin (role byte 1; 0 is a plain member).
    pub admin: bool,
}

/// The roster ending a `GroupInfo`: `count u16` in the head, then `count` × (`user u64, role
/// u8`) strictly increasing by user, `subject_len u16`, the subject, `description_len u16`, the
/// description. Both blobs are end-to-end ciphertext the server stores but cannot read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupRoster {
    /// The members, by user.
    pub members: Vec<GroupMember>,
    /// The encrypted subject (at most [`GROUP_SUBJECT_BYTES_MAX`] bytes).
    pub subject: Bytes,
    /// The encrypted description (at most [`GROUP_DESCRIPTION_BYTES_MAX`] bytes).
    pub description: Bytes,
}

impl Body for GroupRoster {
    type Head = U16;
    const HAS_REST: bool = true;
    fn head(&self) -> U16 {
        U16::new(u16::try_from(self.members.len()).unwrap_or(u16::MAX))
    }
    fn rest_len(&self) -> usize {
        GROUP_MEMBER_BYTES * self.members.len() + 4 + self.subject.len() + self.description.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for m in &self.members {
            out.extend_from_slice(&m.user.to_be_bytes());
            out.push(u8::from(m.admin));
        }
        for blob in [&self.subject, &self.description] {
            // Longer blobs are refused before they are stored; a u16 always holds the bounds.
            let len = u16::try_from(blob.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(blob.get(..usize::from(len)).unwrap_or_default());
        }
    }
    fn decode(head: &U16, rest: Bytes) -> Result<Self, BodyError> {
        let count = usize::from(head.get());
        if count > GROUP_USERS_MAX {
            return Err(BodyError::Invalid("member count"));
        }
        let list_len = count * GROUP_MEMBER_BYTES;
        let list = rest
            .get(..list_len)
            .ok_or(BodyError::Invalid("member count"))?;
        let mut members = Vec::with_capacity(count);
        for c in list.chunks_exact(GROUP_MEMBER_BYTES) {
            let (user, role) = c.split_at(8);
            let mut b = [0u8; 8];
            b.copy_from_slice(user);
            let admin = match role {
                [0] => false,
                [1] => true,
                _ => return Err(BodyError::Invalid("member role")),
            };
            members.push(GroupMember {
                user: u64::from_be_bytes(b),
                admin,
            });
        }
        if members
            .windows(2)
            .any(|w| matches!(w, [a, b] if a.user >= b.user))
        {
            return Err(BodyError::Invalid("member order"));
        }
        let mut at = list_len;
        let mut blob = |max: usize, what: Invalid| -> Result<Bytes, BodyError> {
            let len = match rest.get(at..at + 2) {
                Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
                _ => return Err(BodyError::Invalid(what)),
            };
            if len > max || at + 2 + len > rest.len() {
                return Err(BodyError::Invalid(what));
            }
            let b = rest.slice(at + 2..at + 2 + len);
            at += 2 + len;
            Ok(b)
        };
        let subject = blob(GROUP_SUBJECT_BYTES_MAX, "subject length")?;
        let description = blob(GROUP_DESCRIPTION_BYTES_MAX, "description length")?;
        if at != rest.len() {
            return Err(BodyError::Trailing(rest.len() - at));
        }
        Ok(GroupRoster {
            members,
            subject,
            description,
        })
    }
}

/// Boxed in `GroupInfo` (keeps `Frame` small for the hot message kinds): the same layout.
impl Body for Box<GroupRoster> {
    type Head = U16;
    const HAS_REST: bool = true;
    fn head(&self) -> U16 {
        Body::head(&**self)
    }
    fn rest_len(&self) -> usize {
        Body::rest_len(&**self)
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        Body::put_rest(&**self, out)
    }
    fn decode(head: &U16, rest: Bytes) -> Result<Self, BodyError> {
        <GroupRoster as Body>::decode(head, rest).map(Box::new)
    }
}

/// A membership event as delivered to the members (`Deliver` with [`MsgType::GROUP_EVENT`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEvent {
    /// What changed.
    pub op: GroupOp,
    /// Who changed it (the leaving user for `LEAVE`, the creator for `CREATED`).
    pub actor: UserId,
    /// The group's version after the change.
    pub version: u32,
    /// The users it is about (strictly increasing; empty for settings and blobs).
    pub users: Vec<UserId>,
}

/// What a group `Deliver` carries, after `group u64, gseq u64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupBody {
    /// A member's Sender Key ciphertext ([`MsgType::GROUP`]).
    Message(Bytes),
    /// A membership event ([`MsgType::GROUP_EVENT`]).
    Event(GroupEvent),
}

/// The payload of a group `Deliver`, built by the group's home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEnvelope {
    /// The group.
    pub group: GroupId,
    /// The group sequence number: one sequence per group for messages and events; a member
    /// device sees it increase (duplicates after a server crash carry the same value).
    pub gseq: u64,
    /// The message or the event.
    pub body: GroupBody,
}

/// Why a group `Deliver` payload does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupPayloadError {
    /// The message type is neither `GROUP` nor `GROUP_EVENT`.
    #[error("not a group message type")]
    NotGroup,
    /// The payload is shorter than its fixed part.
    #[error("group payload truncated")]
    Truncated,
    /// A field is out of its domain, or the bytes do not match the count.
    #[error("group payload: invalid {0}")]
    Invalid(&'static str),
}

impl GroupEnvelope {
    /// The `msg_type` a `Deliver` of this envelope carries.
    pub fn msg_type(&self) -> MsgType {
        match self.body {
            GroupBody::Message(_) => MsgType::GROUP,
            GroupBody::Event(_) => MsgType::GROUP_EVENT,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(GROUP_ENVELOPE_HEADER_BYTES + self.body_len());
        out.put_u64(self.group);
        out.put_u64(self.gseq);
        match &self.body {
            GroupBody::Message(ct) => out.put_slice(ct),
            GroupBody::Event(e) => {
                out.put_u8(e.op.0);
                out.put_u64(e.actor);
                out.put_u32(e.version);
                out.put_u16(u16::try_from(e.users.len()).unwrap_or(u16::MAX));
                for u in &e.users {
                    out.put_u64(*u);
                }
            }
        }
        out.freeze()
    }

    fn body_len(&self) -> usize {
        match &self.body {
            GroupBody::Message(ct) => ct.len(),
            GroupBody::Event(e) => GROUP_EVENT_HEADER_BYTES + 8 * e.users.len(),
        }
    }

    /// Decodes the payload of a `Deliver` of type `msg_type`. Never panics; the ciphertext is
    /// a slice of `payload`.
    pub fn decode(msg_type: MsgType, payload: &Bytes) -> Result<Self, GroupPayloadError> {
        if msg_type != MsgType::GROUP && msg_type != MsgType::GROUP_EVENT {
            return Err(GroupPayloadError::NotGroup);
        }
        let (head, rest) = payload
            .split_first_chunk::<GROUP_ENVELOPE_HEADER_BYTES>()
            .ok_or(GroupPayloadError::Truncated)?;
        let (g, s) = head.split_at(8);
        let group = u64::from_be_bytes(g.try_into().map_err(|_| GroupPayloadError::Truncated)?);
        let gseq = u64::from_be_bytes(s.try_into().map_err(|_| GroupPayloadError::Truncated)?);
        let body = if msg_type == MsgType::GROUP {
            GroupBody::Message(payload.slice_ref(rest))
        } else {
            GroupBody::Event(decode_event(rest)?)
        };
        Ok(GroupEnvelope { group, gseq, body })
    }
}

fn decode_event(rest: &[u8]) -> Result<GroupEvent, GroupPayloadError> {
    let (head, users) = rest
        .split_first_chunk::<GROUP_EVENT_HEADER_BYTES>()
        .ok_or(GroupPayloadError::Truncated)?;
    let [op, a0, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, c0, c1] = *head;
    let op = GroupOp::known(op).ok_or(GroupPayloadError::Invalid("op"))?;
    let actor = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    let version = u32::from_be_bytes([v0, v1, v2, v3]);
    let count = usize::from(u16::from_be_bytes([c0, c1]));
    let users = users_of(count, users).map_err(GroupPayloadError::Invalid)?;
    Ok(GroupEvent {
        op,
        actor,
        version,
        users,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_users() -> impl Strategy<Value = Vec<UserId>> {
        proptest::collection::btree_set(any::<u64>(), 0..40).prop_map(|s| s.into_iter().collect())
    }

    use crate::frame::{
        FrameKind, GroupChange, GroupCreate, GroupDone, GroupInfo, GroupInfoFetch, GroupSend,
        GroupSetBlob,
    };
    use crate::Frame;

    fn arb_blob(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
    }

    fn arb_roster() -> impl Strategy<Value = GroupRoster> {
        (
            proptest::collection::btree_map(any::<u64>(), any::<bool>(), 0..40),
            arb_blob(GROUP_SUBJECT_BYTES_MAX),
            arb_blob(64),
        )
            .prop_map(|(m, subject, description)| GroupRoster {
                members: m
                    .into_iter()
                    .map(|(user, admin)| GroupMember { user, admin })
                    .collect(),
                subject,
                description,
            })
    }

    fn arb_group_frame() -> impl Strategy<Value = Frame> {
        let ids = any::<(u64, u64)>();
        prop_oneof![
            (any::<u64>(), arb_users()).prop_map(|(request_id, u)| Frame::GroupCreate(
                GroupCreate {
                    request_id,
                    members: UserList(u)
                }
            )),
            (ids, 1u8..=10, arb_users()).prop_map(|((request_id, group), op, u)| {
                Frame::GroupChange(GroupChange {
                    request_id,
                    group,
                    op: GroupOp(op),
                    users: UserList(u),
                })
            }),
            (ids, 1u8..=2, arb_blob(300)).prop_map(|((request_id, group), w, blob)| {
                Frame::GroupSetBlob(GroupSetBlob {
                    request_id,
                    group,
                    which: GroupBlobKind(w),
                    blob,
                })
            }),
            ids.prop_map(|(request_id, group)| Frame::GroupInfoFetch(GroupInfoFetch {
                request_id,
                group
            })),
            (ids, arb_blob(300)).prop_map(|((client_msg_id, group), payload)| {
                Frame::GroupSend(GroupSend {
                    client_msg_id,
                    group,
                    payload,
                })
            }),
            (ids, any::<(u32, u64, u64, u64, u8)>(), arb_roster()).prop_map(
                |((request_id, group), (version, seq, created_ms, changed_ms, flags), r)| {
                    Frame::GroupInfo(GroupInfo {
                        request_id,
                        group,
                        version,
                        seq,
                        created_ms,
                        changed_ms,
                        flags,
                        roster: Box::new(r),
                    })
                }
            ),
            (ids, any::<(u32, u64)>()).prop_map(|((request_id, group), (version, seq))| {
                Frame::GroupDone(GroupDone {
                    request_id,
                    group,
                    version,
                    seq,
                })
            }),
        ]
    }

    const GROUP_KINDS: [FrameKind; 9] = [
        FrameKind::GROUP_CREATE,
        FrameKind::GROUP_CHANGE,
        FrameKind::GROUP_SET_BLOB,
        FrameKind::GROUP_INFO_FETCH,
        FrameKind::GROUP_SEND,
        FrameKind::GROUP_INFO,
        FrameKind::GROUP_DONE,
        FrameKind::GROUP_RECEIPT_FETCH,
        FrameKind::GROUP_RECEIPT,
    ];

    proptest! {
        /// Every group frame encodes to its `encoded_len` and decodes back to itself.
        #[test]
        fn group_frames_round_trip(f in arb_group_frame()) {
            let bytes = f.to_vec();
            prop_assert_eq!(bytes.len(), f.encoded_len());
            prop_assert_eq!(Frame::decode(Bytes::from(bytes)), Ok(f));
        }

        /// Random bodies behind each group kind byte: never a panic; what decodes re-encodes
        /// to the same bytes (one encoding per value).
        #[test]
        fn group_kinds_never_panic_on_random_bodies(
            k in 0usize..GROUP_KINDS.len(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = vec![GROUP_KINDS[k % GROUP_KINDS.len()].0];
            bytes.extend_from_slice(&body);
            if let Ok(f) = Frame::decode(Bytes::from(bytes.clone())) {
                prop_assert_eq!(f.to_vec(), bytes);
            }
        }

        #[test]
        fn envelopes_round_trip(
            group in any::<u64>(),
            gseq in any::<u64>(),
            ct in proptest::collection::vec(any::<u8>(), 0..200),
            op in 1u8..=10,
            actor in any::<u64>(),
            version in any::<u32>(),
            users in arb_users(),
            event in any::<bool>(),
        ) {
            let body = if event {
                GroupBody::Event(GroupEvent { op: GroupOp(op), actor, version, users })
            } else {
                GroupBody::Message(Bytes::from(ct))
            };
            let env = GroupEnvelope { group, gseq, body };
            let bytes = env.encode();
            prop_assert_eq!(GroupEnvelope::decode(env.msg_type(), &bytes), Ok(env));
        }

        #[test]
        fn envelope_decode_never_panics(
            mt in any::<u8>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let b = Bytes::from(bytes);
            if let Ok(env) = GroupEnvelope::decode(MsgType(mt), &b) {
                // What decodes re-encodes to the same bytes (one encoding per value).
                prop_assert_eq!(env.encode(), b);
            }
        }
    }
}
