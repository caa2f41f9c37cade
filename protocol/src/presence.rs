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
