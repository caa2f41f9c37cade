//! Fixed example values behind the group vectors of `docs/protocol.md` §18.

use bytes::Bytes;
use protocol::frame::{
    GroupChange, GroupCreate, GroupDone, GroupInfo, GroupInfoFetch, GroupReceipt,
    GroupReceiptFetch, GroupSend, GroupSetBlob,
};
use protocol::group::{
    GroupBlobKind, GroupBody, GroupEnvelope, GroupEvent, GroupMember, GroupOp, GroupRoster,
    UserList,
};
use protocol::{ErrorCode, Frame};

use super::{ALICE, BOB, MSG_ID, T0};

/// Carol: +1 212 555 0199.
pub const CAROL: u64 = 12_125_550_199;
/// The example group's id (drawn by the server).
pub const GROUP: u64 = 0x5EED_0000_0000_0009;
/// The create's request id.
pub const GROUP_CREATE_ID: u64 = 0x50;
/// The change's request id.
pub const GROUP_CHANGE_ID: u64 = 0x51;

/// The example roster: Alice (admin), Bob and Carol, a 4-byte subject blob.
pub fn roster() -> GroupRoster {
    GroupRoster {
        members: vec![
            GroupMember {
                user: CAROL,
                admin: false,
            },
            GroupMember {
                user: ALICE,
                admin: true,
            },
            GroupMember {
                user: BOB,
                admin: false,
            },
        ],
        subject: Bytes::from_static(&[0xC1, 0xC2, 0xC3, 0xC4]),
        description: Bytes::new(),
    }
}

/// The example envelopes: a message (gseq 2) and the removal of Carol (gseq 3).
pub fn envelopes() -> Vec<(&'static str, GroupEnvelope)> {
    vec![
        (
            "group_envelope_message",
            GroupEnvelope {
                group: GROUP,
                gseq: 2,
                body: GroupBody::Message(Bytes::from_static(b"sk-ct")),
            },
        ),
        (
            "group_envelope_event_remove",
            GroupEnvelope {
                group: GROUP,
                gseq: 3,
                body: GroupBody::Event(GroupEvent {
                    op: GroupOp::REMOVE,
                    actor: ALICE,
                    version: 2,
                    users: vec![CAROL],
                }),
            },
        ),
    ]
}

pub fn group_example_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "group_create",
            Frame::GroupCreate(GroupCreate {
                request_id: GROUP_CREATE_ID,
                members: UserList::of([BOB, CAROL]),
            }),
        ),
        (
            "group_change_remove",
            Frame::GroupChange(GroupChange {
                request_id: GROUP_CHANGE_ID,
                group: GROUP,
                op: GroupOp::REMOVE,
                users: UserList::of([CAROL]),
            }),
        ),
        (
            "group_set_blob_subject",
            Frame::GroupSetBlob(GroupSetBlob {
                request_id: 0x52,
                group: GROUP,
                which: GroupBlobKind::SUBJECT,
                blob: Bytes::from_static(&[0xC1, 0xC2, 0xC3, 0xC4]),
            }),
        ),
        (
            "group_info_fetch",
            Frame::GroupInfoFetch(GroupInfoFetch {
                request_id: 0x53,
                group: GROUP,
            }),
        ),
        (
            "group_send",
            Frame::GroupSend(GroupSend {
                client_msg_id: MSG_ID,
                group: GROUP,
                payload: Bytes::from_static(b"sk-ct"),
            }),
        ),
        (
            "group_info",
            Frame::GroupInfo(GroupInfo {
                request_id: GROUP_CREATE_ID,
                group: GROUP,
                version: 1,
                seq: 1,
                created_ms: T0,
                changed_ms: T0,
                flags: 1,
                roster: Box::new(roster()),
            }),
        ),
        (
            "group_done",
            Frame::GroupDone(GroupDone {
                request_id: GROUP_CHANGE_ID,
                group: GROUP,
                version: 2,
                seq: 3,
            }),
        ),
        (
            "group_receipt_fetch",
            Frame::GroupReceiptFetch(GroupReceiptFetch {
                request_id: 0x55,
                group: GROUP,
                gseq: 2,
            }),
        ),
        (
            "group_receipt",
            Frame::GroupReceipt(GroupReceipt {
                request_id: 0,
                group: GROUP,
                gseq: 2,
                client_msg_id: MSG_ID,
                devices: 3,
                delivered: 2,
                read: 1,
            }),
        ),
    ]
}

/// Group frames every decoder must refuse.
pub fn group_reject_vectors() -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    let create = |users: &[u64]| {
        let mut v = vec![0x50];
        v.extend_from_slice(&GROUP_CREATE_ID.to_be_bytes());
        v.extend_from_slice(&(users.len() as u16).to_be_bytes());
        for u in users {
            v.extend_from_slice(&u.to_be_bytes());
        }
        v
    };
    let mut count_mismatch = create(&[BOB, CAROL]);
    count_mismatch[10] = 3;
    let mut change_op = Frame::GroupChange(GroupChange {
        request_id: GROUP_CHANGE_ID,
        group: GROUP,
        op: GroupOp::LEAVE,
        users: UserList::default(),
    })
    .to_vec();
    change_op[17] = 0xEE;
    let mut info = Frame::GroupInfo(GroupInfo {
        request_id: GROUP_CREATE_ID,
        group: GROUP,
        version: 1,
        seq: 1,
        created_ms: T0,
        changed_ms: T0,
        flags: 1,
        roster: Box::new(roster()),
    })
    .to_vec();
    // The first member's role byte (after the 47-byte header and its user id).
    info[1 + 47 + 8] = 2;
    vec![
        (
            "group_create_users_out_of_order",
            create(&[BOB, CAROL]),
            ErrorCode::MalformedFrame,
        ),
        (
            "group_create_count_mismatch",
            count_mismatch,
            ErrorCode::MalformedFrame,
        ),
        (
            "group_change_unknown_op",
            change_op,
            ErrorCode::MalformedFrame,
        ),
        ("group_info_bad_role", info, ErrorCode::MalformedFrame),
    ]
}
