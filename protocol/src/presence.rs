//! The field types of the presence and call frames (capabilities `PRESENCE` and `CALLS`,
//! `docs/protocol.md` §20 and §21): privacy visibility, contact-list operations, presence
//! states, typing states, call signal kinds and the TURN credential strings.
//!
//! Every one-byte enum here refuses unknown values (a frame carrying one is malformed): the
//! server never sends a value the client did not ask for, and the server acts on each value.

use bytes::Bytes;

use crate::codec::{Body, BodyError};

wire_enum! {
    /// Who may see a user's last seen or online status (`PrivacySet`, `PrivacyState`).
    pub struct Visibility(u8) {
        /// Everybody (the default).
        EVERYONE = 0,
        /// Only the users on this user's contact list (kept on the server, `ContactsEdit`).
        CONTACTS = 1,
        /// Nobody.
        NOBODY = 2,
    }
}

known_u8_field!(Visibility, "visibility");

wire_enum! {
    /// What a `ContactsEdit` does with the users it names.
    pub struct ContactOp(u8) {
        /// Add them to the contact list.
        ADD = 1,
        /// Remove them from the contact list.
        REMOVE = 2,
        /// Block them: no presence, no messages (a blocked sender still gets ✓), no calls.
        BLOCK = 3,
        /// Unblock them.
        UNBLOCK = 4,
    }
}

known_u8_field!(ContactOp, "contact op");

wire_enum! {
    /// A user's presence as one subscriber may see it (`Presence`).
    pub struct PresenceState(u8) {
        /// At least one device of the user is connected.
        ONLINE = 1,
        /// No device is connected; `last_seen_ms` is when the last one went away (0 when the
        /// subscriber may not see it, or the server never saw the user connected).
        OFFLINE = 2,
        /// The subscriber may see neither (privacy settings, reciprocity or a block: the three
        /// are not told apart).
        UNAVAILABLE = 3,
    }
}

known_u8_field!(PresenceState, "presence state");

wire_enum! {
    /// What the chat partner is doing (`Typing`, `TypingNotice`). Never stored.
    pub struct TypingState(u8) {
        /// Typing a message.
        COMPOSING = 1,
        /// Stopped typing.
        PAUSED = 2,
        /// Recording a voice message.
        RECORDING = 3,
    }
}

known_u8_field!(TypingState, "typing state");

wire_enum! {
    /// One step of a call (`CallSignal` from a client, `CallEvent` from the server). The first
    /// six are relayed between devices with their end-to-end encrypted payload; the rest are
    /// said by the server (a client that sends one gets `CallInvalid`).
    pub struct CallKind(u8) {
        /// Caller → every device of the callee: start ringing (payload: the SDP offer).
        OFFER = 1,
        /// Callee device → caller: picked up (payload: the SDP answer). The first one wins.
        ANSWER = 2,
        /// Either way: an ICE candidate.
        ICE = 3,
        /// Callee device → caller: declined (the callee's other devices stop ringing).
        REJECT = 4,
        /// Callee device → caller: already in a call. The server also says it itself when the
        /// callee is in another call.
        BUSY = 5,
        /// Either way: the call is over.
        HANGUP = 6,
        /// Server → the callee's other devices: another device answered.
        ANSWERED_ELSEWHERE = 7,
        /// Server → caller and callee devices: nobody answered within `call_ring_timeout_ms`.
        MISSED = 8,
        /// Server → caller: the offer is ringing the callee's devices (payload empty).
        RINGING = 9,
    }
}

known_u8_field!(CallKind, "call kind");

impl CallKind {
    /// Whether a client may send this kind in a `CallSignal`.
    pub const fn client_may_send(self) -> bool {
        matches!(self.0, 1..=6)
    }
}

/// Most bytes of one string of [`TurnAuth`] (each is length-prefixed with one byte).
pub const TURN_STRING_BYTES_MAX: usize = 255;

/// Most TURN URIs one `TurnCredentials` frame carries.
pub const TURN_URIS_MAX: usize = 8;

/// The credentials of a `TurnCredentials` frame, coturn's REST scheme (`use-auth-secret`):
/// `username` is `expiry_unix_s:user`, `password` is base64(HMAC-SHA1(secret, username)).
/// On the wire: `count u8` (`2 <= count <= 2 +` [`TURN_URIS_MAX`]) in the head, then `count`
/// strings to the end of the frame, each `len u8` and `len` bytes of UTF-8: the username, the
/// password, then the URIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnAuth {
    /// `expiry_unix_s:user`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
    /// `turn:` / `turns:` / `stun:` URIs, as configured.
    pub uris: Vec<String>,
}

impl TurnAuth {
    fn strings(&self) -> impl Iterator<Item = &str> {
        [self.username.as_str(), self.password.as_str()]
            .into_iter()
            .chain(self.uris.iter().map(String::as_str))
    }
}

/// Bytes of `s` a length-prefixed string carries: at most [`TURN_STRING_BYTES_MAX`], cut at a
/// character boundary (so `rest_len` and `put_rest` agree, and the peer can decode it).
fn cut(s: &str) -> &str {
    let mut end = s.len().min(TURN_STRING_BYTES_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

impl Body for TurnAuth {
    type Head = u8;
    const HAS_REST: bool = true;
    fn head(&self) -> u8 {
        // An over-long URI list is refused by the peer (count check); never truncated silently.
        u8::try_from(self.strings().count()).unwrap_or(u8::MAX)
    }
    fn rest_len(&self) -> usize {
        self.strings().map(|s| 1 + cut(s).len()).sum()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for s in self.strings() {
            let s = cut(s);
            out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(s.as_bytes());
        }
    }
    fn decode(head: &u8, rest: Bytes) -> Result<Self, BodyError> {
        let count = usize::from(*head);
        if !(2..=2 + TURN_URIS_MAX).contains(&count) {
            return Err(BodyError::Invalid("count"));
        }
        let mut strings = Vec::with_capacity(count);
        let mut at = 0usize;
        for _ in 0..count {
            let Some(&len) = rest.get(at) else {
                return Err(BodyError::Invalid("string length"));
            };
            let start = at + 1;
            let end = start + usize::from(len);
            let Some(bytes) = rest.get(start..end) else {
                return Err(BodyError::Invalid("string length"));
            };
            let s = std::str::from_utf8(bytes).map_err(|_| BodyError::Invalid("utf-8"))?;
            strings.push(s.to_owned());
            at = end;
        }
        if at != rest.len() {
            return Err(BodyError::Trailing(rest.len() - at));
        }
        let mut it = strings.into_iter();
        let (Some(username), Some(password)) = (it.next(), it.next()) else {
            return Err(BodyError::Invalid("count"));
        };
        Ok(TurnAuth {
            username,
            password,
            uris: it.collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{
        CallEvent, CallSignal, ContactsEdit, Frame, FrameBody, FrameKind, Presence,
        PresenceSubscribe, PrivacySet, PrivacyState, TurnCredentials, TurnRequest, Typing,
        TypingNotice,
    };
    use crate::DeviceAddr;
    use proptest::prelude::*;

    fn short_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:+/=._-]{0,40}"
    }

    fn presence_frame() -> impl Strategy<Value = Frame> {
        let vis = (0u8..3).prop_map(Visibility);
        let bytes = proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(request_id, user, ttl_s)| {
                Frame::PresenceSubscribe(PresenceSubscribe {
                    request_id,
                    user,
                    ttl_s,
                })
            }),
            (any::<u64>(), vis.clone(), vis.clone()).prop_map(|(request_id, last_seen, online)| {
                Frame::PrivacySet(PrivacySet {
                    request_id,
                    last_seen,
                    online,
                })
            }),
            (
                any::<u64>(),
                1u8..=4,
                proptest::collection::vec(any::<u64>(), 1..50)
            )
                .prop_map(|(request_id, op, users)| {
                    Frame::ContactsEdit(ContactsEdit {
                        request_id,
                        op: ContactOp(op),
                        users,
                    })
                }),
            (any::<u64>(), 1u8..=3).prop_map(|(to_user, s)| {
                Frame::Typing(Typing {
                    to_user,
                    state: TypingState(s),
                })
            }),
            (any::<u64>(), any::<u64>(), 1u8..=9, bytes.clone()).prop_map(
                |(call_id, peer, k, payload)| {
                    Frame::CallSignal(CallSignal {
                        call_id,
                        peer,
                        kind: CallKind(k),
                        payload,
                    })
                }
            ),
            any::<u64>().prop_map(|request_id| Frame::TurnRequest(TurnRequest { request_id })),
            (any::<u64>(), any::<u64>(), 1u8..=3, any::<u64>()).prop_map(
                |(request_id, user, s, last_seen_ms)| {
                    Frame::Presence(Presence {
                        request_id,
                        user,
                        state: PresenceState(s),
                        last_seen_ms,
                    })
                }
            ),
            (any::<u64>(), vis.clone(), vis, any::<u16>(), any::<u16>()).prop_map(
                |(request_id, last_seen, online, contacts, blocked)| {
                    Frame::PrivacyState(PrivacyState {
                        request_id,
                        last_seen,
                        online,
                        contacts,
                        blocked,
                    })
                }
            ),
            (any::<u64>(), 1u8..=3).prop_map(|(from_user, s)| {
                Frame::TypingNotice(TypingNotice {
                    from_user,
                    state: TypingState(s),
                })
            }),
            (any::<u64>(), any::<u64>(), any::<u16>(), 1u8..=9, bytes).prop_map(
                |(call_id, user, device, k, payload)| {
                    Frame::CallEvent(CallEvent {
                        call_id,
                        from: DeviceAddr::new(user, device),
                        kind: CallKind(k),
                        payload,
                    })
                }
            ),
            (
                any::<u64>(),
                any::<u32>(),
                short_string(),
                short_string(),
                proptest::collection::vec(short_string(), 0..=TURN_URIS_MAX)
            )
                .prop_map(|(request_id, ttl_s, username, password, uris)| {
                    Frame::TurnCredentials(TurnCredentials {
                        request_id,
                        ttl_s,
                        auth: TurnAuth {
                            username,
                            password,
                            uris,
                        },
                    })
                }),
        ]
    }

    const KINDS: [FrameKind; 11] = [
        FrameKind::PRESENCE_SUBSCRIBE,
        FrameKind::PRIVACY_SET,
        FrameKind::CONTACTS_EDIT,
        FrameKind::TYPING,
        FrameKind::CALL_SIGNAL,
        FrameKind::TURN_REQUEST,
        FrameKind::PRESENCE,
        FrameKind::PRIVACY_STATE,
        FrameKind::TYPING_NOTICE,
        FrameKind::CALL_EVENT,
        FrameKind::TURN_CREDENTIALS,
    ];

    proptest! {
        #[test]
        fn presence_frames_round_trip(f in presence_frame()) {
            let bytes = f.to_vec();
            prop_assert_eq!(bytes.len(), f.encoded_len());
            let back = Frame::decode(Bytes::from(bytes)).expect("decode");
            prop_assert_eq!(back, f);
        }

        /// Random bodies behind each presence or call kind: no panic, and what decodes
        /// re-encodes to the same bytes.
        #[test]
        fn random_bodies_decode_canonically(
            k in 0usize..KINDS.len(),
            body in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut bytes = vec![KINDS[k].0];
            bytes.extend_from_slice(&body);
            if let Ok(f) = Frame::decode(Bytes::from(bytes.clone())) {
                prop_assert_eq!(f.kind(), KINDS[k]);
                prop_assert_eq!(f.to_vec(), bytes);
            }
        }
    }

    #[test]
    fn unknown_enum_values_and_bad_strings_are_refused() {
        let set = PrivacySet {
            request_id: 1,
            last_seen: Visibility::EVERYONE,
            online: Visibility::NOBODY,
        };
        let mut v = set.to_vec();
        v[9] = 3;
        assert!(Frame::decode(Bytes::from(v)).is_err(), "visibility 3");
        let call = CallSignal {
            call_id: 1,
            peer: 2,
            kind: CallKind::OFFER,
            payload: Bytes::new(),
        };
        let mut v = call.to_vec();
        v[17] = 10;
        assert!(Frame::decode(Bytes::from(v)).is_err(), "call kind 10");
        assert!(!CallKind::MISSED.client_may_send() && CallKind::HANGUP.client_may_send());
        let t = TurnCredentials {
            request_id: 1,
            ttl_s: 2,
            auth: TurnAuth {
                username: "1:2".into(),
                password: "p".into(),
                uris: vec![],
            },
        };
        let good = t.to_vec();
        // Not UTF-8, a length past the end, one string only, trailing bytes.
        let mut bad = good.clone();
        let at = good.len() - 1;
        bad[at] = 0xFF;
        assert!(Frame::decode(Bytes::from(bad)).is_err());
        // Header: kind, request_id (1..9), ttl_s (9..13), count (13); the first string's
        // length at 14.
        let mut bad = good.clone();
        bad[14] = 200;
        assert!(Frame::decode(Bytes::from(bad)).is_err());
        let mut bad = good.clone();
        bad[13] = 1;
        assert!(Frame::decode(Bytes::from(bad)).is_err());
        let mut bad = good;
        bad.push(0);
        assert!(Frame::decode(Bytes::from(bad)).is_err());
        // An over-long string is cut at a character boundary, and still decodes.
        let long = TurnAuth {
            username: "é".repeat(200),
            password: "x".into(),
            uris: vec![],
        };
        let f = TurnCredentials {
            request_id: 1,
            ttl_s: 1,
            auth: long,
        };
        let v = f.to_vec();
        assert_eq!(v.len(), f.encoded_len());
        let Ok(Frame::TurnCredentials(back)) = Frame::decode(Bytes::from(v)) else {
            panic!("cut string must decode")
        };
        assert_eq!(back.auth.username.len(), 254);
    }
}
