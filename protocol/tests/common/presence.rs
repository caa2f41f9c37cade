//! Fixed example values behind the presence and call vectors of `docs/protocol.md` §20 and
//! §21. Changing anything here changes the documented vectors (see `vectors.rs`).

use bytes::Bytes;
use protocol::frame::{
    CallEvent, CallSignal, ContactsEdit, Presence, PresenceSubscribe, PrivacySet, PrivacyState,
    TurnCredentials, TurnRequest, Typing, TypingNotice,
};
use protocol::presence::{CallKind, ContactOp, PresenceState, TurnAuth, TypingState, Visibility};
use protocol::{DeviceAddr, Frame};

use super::{ALICE, BOB, T0};

/// Request ids of the presence examples.
const R: u64 = 0x0000_0000_0000_0070;
/// The example call.
pub const CALL_ID: u64 = 0x0C0F_FEE0_0000_0001;

/// One example per presence and call frame kind, in kind order.
pub fn presence_example_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "presence_subscribe",
            Frame::PresenceSubscribe(PresenceSubscribe {
                request_id: R,
                user: BOB,
                ttl_s: 300,
            }),
        ),
        (
            "privacy_set",
            Frame::PrivacySet(PrivacySet {
                request_id: R + 1,
                last_seen: Visibility::CONTACTS,
                online: Visibility::EVERYONE,
            }),
        ),
        (
            "contacts_edit",
            Frame::ContactsEdit(ContactsEdit {
                request_id: R + 2,
                op: ContactOp::ADD,
                users: vec![BOB],
            }),
        ),
        (
            "typing",
            Frame::Typing(Typing {
                to_user: BOB,
                state: TypingState::COMPOSING,
            }),
        ),
        (
            "call_signal",
            Frame::CallSignal(CallSignal {
                call_id: CALL_ID,
                peer: BOB,
                kind: CallKind::OFFER,
                payload: Bytes::from_static(b"sdp"),
            }),
        ),
        (
            "turn_request",
            Frame::TurnRequest(TurnRequest { request_id: R + 3 }),
        ),
        (
            "presence",
            Frame::Presence(Presence {
                request_id: 0,
                user: BOB,
                state: PresenceState::OFFLINE,
                last_seen_ms: T0,
            }),
        ),
        (
            "privacy_state",
            Frame::PrivacyState(PrivacyState {
                request_id: R + 1,
                last_seen: Visibility::CONTACTS,
                online: Visibility::EVERYONE,
                contacts: 1,
                blocked: 0,
            }),
        ),
        (
            "typing_notice",
            Frame::TypingNotice(TypingNotice {
                from_user: ALICE,
                state: TypingState::COMPOSING,
            }),
        ),
        (
            "call_event",
            Frame::CallEvent(CallEvent {
                call_id: CALL_ID,
                from: DeviceAddr::new(ALICE, 0),
                kind: CallKind::OFFER,
                payload: Bytes::from_static(b"sdp"),
            }),
        ),
        (
            "turn_credentials",
            Frame::TurnCredentials(TurnCredentials {
                request_id: R + 3,
                ttl_s: 86_400,
                auth: TurnAuth {
                    username: format!("{}:{ALICE}", T0 / 1000 + 86_400),
                    password: "c2VjcmV0".to_owned(),
                    uris: vec!["turn:127.0.0.1:3478".to_owned()],
                },
            }),
        ),
    ]
}
