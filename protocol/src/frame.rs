//! Plaintext frames: what travels inside one Noise transport message.
//!
//! A frame is `kind: u8`, then a fixed header for that kind (all integers big-endian, no
//! padding), then for some kinds a variable tail that runs to the end of the frame. The frame's
//! length is known from the record around it, so tails carry no length of their own. Bytes
//! after the header of a kind without a tail are refused ([`DecodeError::Trailing`]).
//!
//! Headers are parsed in place with `zerocopy` (no copy, no allocation); tails are handed out as
//! [`Bytes`] slices of the receive buffer, so a `Send` payload reaches the mailbox and the
//! recipient without being copied by this crate.
//!
//! Every kind is one struct ([`Send`], [`Ack`], [`Deliver`], ...) declared once in the table
//! below; the table generates the struct, its header layout, its [`FrameBody`] impl (decode,
//! encode, length), the [`FrameKind`] constant and the [`Frame`] variant. Adding a field to a
//! frame is one line in the table. A struct's doc gives its byte layout (kind byte excluded).
//!
//! The names here are the frames' names: `frame::Send`, `frame::Error` and `frame::Read` shadow
//! `std::marker::Send`, `std::error::Error` and `std::io::Read` when glob-imported, so import
//! them by name or refer to them as `frame::Send`.

use bytes::Bytes;
use zerocopy::byteorder::big_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::addr::{Address, DeviceAddr, DeviceId, UserId};
use crate::codec::{head_bytes, Body, BodyError, Field, Invalid};
use crate::group::{GroupBlobKind, GroupId, GroupOp, GroupRoster, UserList};
pub use crate::media::MediaClass;
pub use crate::message::{Message, MsgType, ReceiptInfo, ReceiptKind};
pub use crate::presence::{CallKind, ContactOp, PresenceState, TurnAuth, TypingState, Visibility};
use crate::ErrorCode;

/// Most sequence numbers one `Ack` frame may carry.
pub const ACK_SEQS_MAX: usize = 1024;

/// Most bytes of text in an `Error` frame.
pub const ERROR_TEXT_MAX: usize = 256;

/// Bytes one one-time prekey takes in a `PrekeyUpload` tail (`id u32, key [32]`).
pub const ONE_TIME_PREKEY_BYTES: usize = 36;

/// Most copies one `SendMulti` may carry (recipient devices plus the sender's own other
/// devices). The server's own limit, `devices_per_account_max`, is at most 32, so two full
/// device lists fit.
pub const SEND_COPIES_MAX: usize = 64;

/// Bytes of a copy's header in a `SendMulti` tail: `own u8, device u16, len u16`.
pub const SEND_COPY_HEADER_BYTES: usize = 5;

/// Most entries one `DeviceList` frame carries.
pub const DEVICE_LIST_MAX: usize = 32;

/// Bytes one [`DeviceEntry`] takes in a `DeviceList` tail.
pub const DEVICE_ENTRY_BYTES: usize = 138;

wire_struct! {
    /// One device of an account as the server publishes it in `DeviceList`: its id, when it
    /// was linked, its identity keys and the primary's signature over them (see
    /// `docs/e2ee.md`, "Device signature"). The primary (device 0) carries the identity it
    /// published with `PrekeyUpload` (zeros before it has) and an all-zero signature.
    /// 138 bytes ([`DEVICE_ENTRY_BYTES`]): `device u16, linked_at_ms u64, identity_dh [32],
    /// identity_sign [32], signature [64]`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DeviceEntry {
        /// Device id (0 = primary).
        device: DeviceId,
        /// When it was linked (registered, for the primary), ms since the Unix epoch.
        linked_at_ms: u64,
        /// X25519 identity key of the device.
        identity_dh: [u8; 32],
        /// Ed25519 identity signing key of the device.
        identity_sign: [u8; 32],
        /// Ed25519 signature by the primary's `identity_sign` over the device signature
        /// message; zeros for the primary.
        signature: [u8; 64],
    }
}

wire_struct! {
    /// What a `LinkApprove` says about the new device (160 bytes, in field order): its Noise
    /// static key (it must be the one its code was issued to), its identity keys, and the
    /// primary's Ed25519 signature over the device signature message.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct LinkKeys {
        /// The new device's Noise static key.
        static_key: [u8; 32],
        /// The new device's X25519 identity key.
        identity_dh: [u8; 32],
        /// The new device's Ed25519 identity signing key.
        identity_sign: [u8; 32],
        /// Ed25519 by the primary's identity signing key over the device signature message.
        signature: [u8; 64],
    }
}

wire_enum! {
    /// Why the server sent `DeviceList`.
    pub struct DeviceListReason(u8) {
        /// The answer to `DeviceListFetch` (`request_id` is the fetch's).
        FETCHED = 1,
        /// A `SendMulti` was refused because its device set is not the current one
        /// (`request_id` is the send's `client_msg_id`); an `Error { DeviceListStale }` with the
        /// same `ref_id` follows.
        STALE = 2,
        /// The list changed (a device was linked or removed); `request_id` is 0.
        CHANGED = 3,
    }
}

// Only the known reasons decode (another byte is a malformed frame).
known_u8_field!(DeviceListReason, "device list reason");

/// One ciphertext of a `SendMulti`: for a device of the recipient (`own == false`) or for
/// another device of the sender's own account (`own == true`, the sent-message sync copy).
/// On the wire: `own u8 (0 or 1), device u16, len u16`, then `len` bytes of payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCopy {
    /// Whether the copy is for one of the sender's own other devices.
    pub own: bool,
    /// The device it is for.
    pub device: DeviceId,
    /// Its end-to-end ciphertext; a slice of the receive buffer.
    pub payload: Bytes,
}

/// The copies of a `SendMulti`: `count u8` (`1 <= count <=` [`SEND_COPIES_MAX`]) in the head,
/// then `count` copies to the end of the frame. The same `(own, device)` twice is invalid.
impl Body for Vec<DeviceCopy> {
    type Head = u8;
    const HAS_REST: bool = true;
    fn head(&self) -> u8 {
        // An over-long list is refused by the peer (count mismatch); never truncated silently.
        u8::try_from(self.len()).unwrap_or(u8::MAX)
    }
    fn rest_len(&self) -> usize {
        // Matches `put_rest`, which writes at most `u16::MAX` bytes of a payload.
        self.iter()
            .map(|c| SEND_COPY_HEADER_BYTES + c.payload.len().min(usize::from(u16::MAX)))
            .sum()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for c in self {
            out.push(u8::from(c.own));
            out.extend_from_slice(&c.device.to_be_bytes());
            // A payload over 65,535 bytes cannot be in one frame (records are at most 65,535).
            let len = u16::try_from(c.payload.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(c.payload.get(..usize::from(len)).unwrap_or_default());
        }
    }
    fn decode(head: &u8, rest: Bytes) -> Result<Self, BodyError> {
        let count = usize::from(*head);
        if count == 0 || count > SEND_COPIES_MAX {
            return Err(BodyError::Invalid("count"));
        }
        let mut copies: Vec<DeviceCopy> = Vec::with_capacity(count);
        let mut at = 0usize;
        for _ in 0..count {
            let Some(h) = rest.get(at..at + SEND_COPY_HEADER_BYTES) else {
                return Err(BodyError::Invalid("copy header"));
            };
            let (own, device, len) = match *h {
                [own, d0, d1, l0, l1] => (
                    own,
                    u16::from_be_bytes([d0, d1]),
                    u16::from_be_bytes([l0, l1]),
                ),
                _ => return Err(BodyError::Invalid("copy header")),
            };
            let own = match own {
                0 => false,
                1 => true,
                _ => return Err(BodyError::Invalid("own")),
            };
            let start = at + SEND_COPY_HEADER_BYTES;
            let end = start + usize::from(len);
            if end > rest.len() {
                return Err(BodyError::Invalid("copy length"));
            }
            if copies.iter().any(|c| c.own == own && c.device == device) {
                return Err(BodyError::Invalid("device twice"));
            }
            copies.push(DeviceCopy {
                own,
                device,
                payload: rest.slice(start..end),
            });
            at = end;
        }
        if at != rest.len() {
            return Err(BodyError::Trailing(rest.len() - at));
        }
        Ok(copies)
    }
}

/// The entries of a `DeviceList`: `count u8` (`1 <= count <=` [`DEVICE_LIST_MAX`]) in the
/// head, then `count` × 138 bytes to the end of the frame, device ids strictly increasing.
impl Body for Vec<DeviceEntry> {
    type Head = u8;
    const HAS_REST: bool = true;
    fn head(&self) -> u8 {
        u8::try_from(self.len()).unwrap_or(u8::MAX)
    }
    fn rest_len(&self) -> usize {
        DEVICE_ENTRY_BYTES * self.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for e in self {
            out.extend_from_slice(e.to_wire().as_bytes());
        }
    }
    fn decode(head: &u8, rest: Bytes) -> Result<Self, BodyError> {
        let count = usize::from(*head);
        if count == 0 || count > DEVICE_LIST_MAX {
            return Err(BodyError::Invalid("count"));
        }
        let wires = <[<DeviceEntry as Field>::Wire]>::ref_from_bytes(rest.as_ref())
            .map_err(|_| BodyError::Trailing(rest.len() % DEVICE_ENTRY_BYTES))?;
        if wires.len() != count {
            return Err(BodyError::Invalid("count"));
        }
        let entries: Vec<DeviceEntry> = wires
            .iter()
            .map(DeviceEntry::from_wire)
            .collect::<Result<_, _>>()
            .map_err(BodyError::Invalid)?;
        if entries
            .windows(2)
            .any(|w| matches!(w, [a, b] if a.device >= b.device))
        {
            return Err(BodyError::Invalid("device order"));
        }
        Ok(entries)
    }
}

wire_struct! {
    /// The long-lived public keys of one device that the server publishes for X3DH: the X25519
    /// identity key, the Ed25519 identity signing key, and the current signed prekey with its
    /// signature (Ed25519 by `identity_sign` over `0x05 ‖ signed_prekey`, see `docs/e2ee.md`).
    /// 164 bytes on the wire, in field order.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DeviceKeys {
        /// X25519 identity key `IK`.
        identity_dh: [u8; 32],
        /// Ed25519 identity signing key `IKsig`.
        identity_sign: [u8; 32],
        /// Id of the signed prekey, chosen by the device.
        signed_prekey_id: u32,
        /// X25519 signed prekey `SPK`.
        signed_prekey: [u8; 32],
        /// Ed25519 signature by `identity_sign` over `0x05 ‖ signed_prekey`.
        signed_prekey_sig: [u8; 64],
    }
}

wire_struct! {
    /// One X25519 one-time prekey and its id (chosen by the device). 36 bytes on the wire
    /// ([`ONE_TIME_PREKEY_BYTES`]): `id u32, key [32]`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct OneTimePrekey {
        /// Prekey id.
        id: u32,
        /// X25519 public key `OPK`.
        key: [u8; 32],
    }
}

wire_enum! {
    /// Why the server sent `PrekeyStatus`.
    pub struct PrekeyStatusReason(u8) {
        /// The answer to a `PrekeyUpload`: the keys are durable on the server.
        UPLOADED = 1,
        /// Fewer one-time prekeys than the server's low-water mark remain: upload more.
        BELOW_LOW_WATER = 2,
        /// No one-time prekey remains (bundles go out without one): upload more.
        EXHAUSTED = 3,
    }
}

// Only the known reasons decode (another byte is a malformed frame).
known_u8_field!(PrekeyStatusReason, "prekey status reason");

/// The optional one-time prekey of a `PrekeyBundle`: `has_one_time u8, id u32, key [32]`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct MaybeOneTimeWire {
    has_one_time: u8,
    one_time: <OneTimePrekey as Field>::Wire,
}

/// `has_one_time` is 0 or 1; when 0 the id and key bytes must be zero.
impl Field for Option<OneTimePrekey> {
    type Wire = MaybeOneTimeWire;
    fn to_wire(&self) -> MaybeOneTimeWire {
        const NONE: OneTimePrekey = OneTimePrekey {
            id: 0,
            key: [0; 32],
        };
        MaybeOneTimeWire {
            has_one_time: u8::from(self.is_some()),
            one_time: self.unwrap_or(NONE).to_wire(),
        }
    }
    fn from_wire(wire: &MaybeOneTimeWire) -> Result<Self, Invalid> {
        let key = OneTimePrekey::from_wire(&wire.one_time)?;
        match wire.has_one_time {
            0 if key.id == 0 && key.key == [0u8; 32] => Ok(None),
            0 => Err("one_time (must be zero)"),
            1 => Ok(Some(key)),
            _ => Err("has_one_time"),
        }
    }
}

/// The `Ack` sequence list: `count u16` (`1 <= count <= ACK_SEQS_MAX`) in the head, then
/// `count` × `seq u64` to the end of the frame.
impl Body for Vec<u64> {
    type Head = U16;
    const HAS_REST: bool = true;
    fn head(&self) -> U16 {
        // An over-long list is refused by the peer (count mismatch); never truncated silently.
        U16::new(u16::try_from(self.len()).unwrap_or(u16::MAX))
    }
    fn rest_len(&self) -> usize {
        8 * self.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for seq in self {
            out.extend_from_slice(&seq.to_be_bytes());
        }
    }
    fn decode(head: &U16, rest: Bytes) -> Result<Self, BodyError> {
        let count = usize::from(head.get());
        if count == 0 || count > ACK_SEQS_MAX {
            return Err(BodyError::Invalid("count"));
        }
        let seqs = <[U64]>::ref_from_bytes(rest.as_ref())
            .map_err(|_| BodyError::Trailing(rest.len() % 8))?;
        if seqs.len() != count {
            return Err(BodyError::Invalid("count"));
        }
        Ok(seqs.iter().map(|s| s.get()).collect())
    }
}

/// The one-time prekeys of a `PrekeyUpload`: `N` × 36 bytes to the end of the frame, `N >= 0`.
impl Body for Vec<OneTimePrekey> {
    type Head = ();
    const HAS_REST: bool = true;
    fn head(&self) {}
    fn rest_len(&self) -> usize {
        ONE_TIME_PREKEY_BYTES * self.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for key in self {
            out.extend_from_slice(key.to_wire().as_bytes());
        }
    }
    fn decode(_head: &(), rest: Bytes) -> Result<Self, BodyError> {
        let keys = <[<OneTimePrekey as Field>::Wire]>::ref_from_bytes(rest.as_ref())
            .map_err(|_| BodyError::Trailing(rest.len() % ONE_TIME_PREKEY_BYTES))?;
        keys.iter()
            .map(OneTimePrekey::from_wire)
            .collect::<Result<_, _>>()
            .map_err(BodyError::Invalid)
    }
}

/// Most bytes of a URL in `MediaSlot` / `MediaDownload`.
pub const MEDIA_URL_BYTES_MAX: usize = 1024;

/// A URL of the media endpoint (`MediaSlot`, `MediaDownload`): 1 to [`MEDIA_URL_BYTES_MAX`]
/// bytes of UTF-8 to the end of the frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MediaUrl(pub String);

impl Body for MediaUrl {
    type Head = ();
    const HAS_REST: bool = true;
    fn head(&self) {}
    fn rest_len(&self) -> usize {
        self.0.len().min(MEDIA_URL_BYTES_MAX)
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        // An over-long URL is cut and refused by the peer (it no longer parses as the
        // server's); the server builds URLs far below the limit.
        out.extend_from_slice(self.0.as_bytes().get(..self.rest_len()).unwrap_or_default());
    }
    fn decode(_head: &(), rest: Bytes) -> Result<Self, BodyError> {
        if rest.len() > MEDIA_URL_BYTES_MAX {
            return Err(BodyError::Trailing(rest.len() - MEDIA_URL_BYTES_MAX));
        }
        if rest.is_empty() {
            return Err(BodyError::Invalid("url"));
        }
        let text = std::str::from_utf8(&rest).map_err(|_| BodyError::Invalid("url"))?;
        Ok(MediaUrl(text.to_owned()))
    }
}

/// Most blobs one status post names.
pub const STATUS_BLOBS_MAX: usize = 8;

/// The blobs and audience of a `StatusPublish`: `blob_count u8, audience_count u16` in the
/// head (`blob_count <=` [`STATUS_BLOBS_MAX`], `audience_count >= 1`), then `blob_count` ×
/// `sha256 [32]` and `audience_count` × `user u64` to the end of the frame. A user twice is
/// invalid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusRefs {
    /// SHA-256 of each media blob the post refers to (deleted with the post).
    pub blobs: Vec<[u8; 32]>,
    /// The users who may see the post (and download its blobs).
    pub audience: Vec<UserId>,
}

/// Head of [`StatusRefs`].
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct StatusRefsHead {
    blob_count: u8,
    audience_count: U16,
}

impl Body for StatusRefs {
    type Head = StatusRefsHead;
    const HAS_REST: bool = true;
    fn head(&self) -> StatusRefsHead {
        // Over-long lists are refused by the peer (count mismatch); never truncated silently.
        StatusRefsHead {
            blob_count: u8::try_from(self.blobs.len()).unwrap_or(u8::MAX),
            audience_count: U16::new(u16::try_from(self.audience.len()).unwrap_or(u16::MAX)),
        }
    }
    fn rest_len(&self) -> usize {
        32 * self.blobs.len() + 8 * self.audience.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        for b in &self.blobs {
            out.extend_from_slice(b);
        }
        for u in &self.audience {
            out.extend_from_slice(&u.to_be_bytes());
        }
    }
    fn decode(head: &StatusRefsHead, rest: Bytes) -> Result<Self, BodyError> {
        let blobs_n = usize::from(head.blob_count);
        let users_n = usize::from(head.audience_count.get());
        if blobs_n > STATUS_BLOBS_MAX {
            return Err(BodyError::Invalid("blob_count"));
        }
        if users_n == 0 {
            return Err(BodyError::Invalid("audience_count"));
        }
        let need = 32 * blobs_n + 8 * users_n;
        if rest.len() < need {
            return Err(BodyError::Invalid("counts"));
        }
        if rest.len() > need {
            return Err(BodyError::Trailing(rest.len() - need));
        }
        let (blob_bytes, user_bytes) = rest.split_at(32 * blobs_n);
        let blobs: Vec<[u8; 32]> = <[[u8; 32]]>::ref_from_bytes(blob_bytes)
            .map_err(|_| BodyError::Invalid("blobs"))?
            .to_vec();
        let audience: Vec<UserId> = <[U64]>::ref_from_bytes(user_bytes)
            .map_err(|_| BodyError::Invalid("audience"))?
            .iter()
            .map(|u| u.get())
            .collect();
        let mut sorted = audience.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| matches!(w, [a, b] if a == b)) {
            return Err(BodyError::Invalid("audience user twice"));
        }
        Ok(StatusRefs { blobs, audience })
    }
}

/// The text of an `Error`: up to [`ERROR_TEXT_MAX`] bytes of UTF-8 to the end of the frame.
/// A longer string is cut at a character boundary when encoded.
impl Body for String {
    type Head = ();
    const HAS_REST: bool = true;
    fn head(&self) {}
    fn rest_len(&self) -> usize {
        error_text_len(self)
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            self.get(..error_text_len(self))
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    fn decode(_head: &(), rest: Bytes) -> Result<Self, BodyError> {
        if rest.len() > ERROR_TEXT_MAX {
            return Err(BodyError::Trailing(rest.len() - ERROR_TEXT_MAX));
        }
        let text = std::str::from_utf8(&rest).map_err(|_| BodyError::Invalid("text"))?;
        Ok(text.to_owned())
    }
}

/// Bytes of `text` an `Error` frame carries: at most [`ERROR_TEXT_MAX`], cut at a character
/// boundary. `encoded_len` and `encode` both use it, so they always agree.
fn error_text_len(text: &str) -> usize {
    let mut end = text.len().min(ERROR_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// One frame kind's struct: its kind byte, its header size, and its codec. Implemented by the
/// table for every kind; [`Frame`] dispatches to these.
pub trait FrameBody: Sized + Into<Frame> {
    /// The kind byte.
    const KIND: FrameKind;
    /// Fixed header bytes after the kind byte (the tail, if any, follows).
    const HEADER_BYTES: usize;
    /// Whether a variable tail follows the header. Without one, bytes after the header are
    /// refused.
    const HAS_TAIL: bool;
    /// Decodes the bytes after the kind byte. The tail, if any, is a slice of `body`.
    fn decode(body: Bytes) -> Result<Self, DecodeError>;
    /// Length of the encoded frame in bytes (kind byte included).
    fn encoded_len(&self) -> usize;
    /// Appends the whole frame, kind byte first, to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Encodes into a fresh vector.
    fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

fn decode_body<T: Body>(kind: FrameKind, body: Bytes) -> Result<T, DecodeError> {
    let needed = head_bytes::<T>();
    let Ok((head, rest)) = T::Head::ref_from_prefix(body.as_ref()) else {
        return Err(DecodeError::Truncated {
            kind,
            needed,
            got: body.len(),
        });
    };
    if !T::HAS_REST && !rest.is_empty() {
        return Err(DecodeError::Trailing {
            kind,
            extra: rest.len(),
        });
    }
    T::decode(head, body.slice(needed..)).map_err(|e| match e {
        BodyError::Trailing(extra) => DecodeError::Trailing { kind, extra },
        BodyError::Invalid(field) => DecodeError::InvalidField { kind, field },
    })
}

fn encode_body<T: Body>(kind: FrameKind, body: &T, out: &mut Vec<u8>) {
    let len = 1 + head_bytes::<T>() + body.rest_len();
    let start = out.len();
    out.reserve(len);
    out.push(kind.0);
    out.extend_from_slice(body.head().as_bytes());
    body.put_rest(out);
    // Paired with the length the record layer reserved from `encoded_len`.
    debug_assert_eq!(
        out.len() - start,
        len,
        "{kind:?}: rest_len disagrees with put_rest"
    );
}

/// The frame table: `Name(KIND_CONSTANT = kind byte) { fields }`. Fields before `..` form the
/// fixed header in order; the one after `..` (if any) ends the frame: its own fixed part joins
/// the header, its variable part is the tail. See `codec::wire_struct!`.
macro_rules! frames {
    (
        $(
            $(#[$meta:meta])*
            $name:ident($konst:ident = $val:literal) {
                $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
                $( .. $(#[$rmeta:meta])* $rest:ident : $rty:ty $(,)? )?
            }
        )*
    ) => {
        wire_enum! {
            /// A frame's kind byte. Client-to-server kinds are below `0x80`, server-to-client
            /// kinds at or above it; `Ping`/`Pong` go both ways.
            pub struct FrameKind(u8) {
                $(
                    #[doc = concat!("[`", stringify!($name), "`].")]
                    $konst = $val,
                )*
            }
        }

        $(
            wire_struct! {
                $(#[$meta])*
                #[derive(Clone, Debug, PartialEq, Eq)]
                pub struct $name {
                    $( $(#[$fmeta])* $field: $ty, )*
                    $( .. $(#[$rmeta])* $rest: $rty, )?
                }
            }

            impl FrameBody for $name {
                const KIND: FrameKind = FrameKind::$konst;
                const HEADER_BYTES: usize = head_bytes::<$name>();
                const HAS_TAIL: bool = <$name as Body>::HAS_REST;
                fn decode(body: Bytes) -> Result<Self, DecodeError> {
                    decode_body(Self::KIND, body)
                }
                fn encoded_len(&self) -> usize {
                    1 + Self::HEADER_BYTES + Body::rest_len(self)
                }
                fn encode(&self, out: &mut Vec<u8>) {
                    encode_body(Self::KIND, self, out)
                }
            }

            impl From<$name> for Frame {
                fn from(f: $name) -> Frame {
                    Frame::$name(f)
                }
            }
        )*

        /// One plaintext frame: one variant per [`FrameKind`], each carrying its kind's struct.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Frame {
            $(
                #[doc = concat!("[`", stringify!($name), "`], kind `", stringify!($val), "`.")]
                $name($name),
            )*
        }

        impl Frame {
            /// Decodes one frame. `frame` is the whole plaintext (kind byte first); tails are
            /// returned as slices of it without copying.
            pub fn decode(frame: Bytes) -> Result<Frame, DecodeError> {
                let Some(&kind) = frame.first() else {
                    return Err(DecodeError::Empty);
                };
                let body = frame.slice(1..);
                match FrameKind(kind) {
                    $( FrameKind::$konst => <$name as FrameBody>::decode(body).map(Frame::$name), )*
                    other => Err(DecodeError::UnknownKind(other)),
                }
            }

            /// The kind byte.
            pub fn kind(&self) -> FrameKind {
                match self {
                    $( Frame::$name(_) => FrameKind::$konst, )*
                }
            }

            /// Length of the encoded frame in bytes (kind byte included).
            pub fn encoded_len(&self) -> usize {
                match self {
                    $( Frame::$name(f) => f.encoded_len(), )*
                }
            }

            /// Appends the encoded frame to `out`.
            pub fn encode(&self, out: &mut Vec<u8>) {
                match self {
                    $( Frame::$name(f) => f.encode(out), )*
                }
            }
        }
    };
}

frames! {
    /// C→S `0x01`: ask for a one-time registration code for `phone`. Header: `phone u64`
    /// (8 bytes).
    RegisterRequest(REGISTER_REQUEST = 0x01) {
        /// E.164 number as an integer.
        phone: UserId,
    }

    /// C→S `0x02`: prove the code; binds the connection's static key to the number. Header:
    /// `phone u64, code u32` (12 bytes).
    RegisterVerify(REGISTER_VERIFY = 0x02) {
        /// E.164 number as an integer.
        phone: UserId,
        /// The 6-digit code.
        code: u32,
    }

    /// C→S `0x03`: log in as a device with the static key proven in the handshake. Header:
    /// `user u64, device u16, revision u16, capabilities u64` (20 bytes).
    Login(LOGIN = 0x03) {
        /// Who the client says it is; the server checks the handshake's static key against it.
        addr: DeviceAddr,
        /// The client's [`crate::PROTOCOL_REVISION`].
        revision: u16,
        /// The client's [`crate::capability`] bits.
        capabilities: u64,
    }

    /// C→S `0x10`: send a message. Header: `client_msg_id u64, to Address(11), msg_type u8`
    /// (20 bytes), then the payload (end-to-end ciphertext) to the end of the frame.
    Send(SEND = 0x10) {
        /// Chosen by the sender, unique per sending device; retries reuse it (dedup key).
        client_msg_id: u64,
        /// Recipient.
        to: Address,
        /// Sets pruning priority.
        msg_type: MsgType,
        ..
        /// Opaque payload.
        payload: Bytes,
    }

    /// C→S `0x11`: acknowledge `Deliver` / `Receipt` frames by sequence number. Header:
    /// `count u16`, then `count` × `seq u64`; `1 <= count <=` [`ACK_SEQS_MAX`].
    Ack(ACK = 0x11) {
        ..
        /// Sequence numbers from `Deliver` / `Receipt` frames.
        seqs: Vec<u64>,
    }

    /// C→S `0x12`: mark a received message read; the server routes a read receipt to its
    /// sender. Header: `to Address(11)` (the original sender), `client_msg_id u64` (19 bytes).
    Read(READ = 0x12) {
        /// The original sender.
        to: Address,
        /// The original message's `client_msg_id`.
        client_msg_id: u64,
    }

    /// C→S `0x13`: send one message to every device of a user, and the sync copies to the
    /// sender's own other devices, in one frame (capability `MULTI_DEVICE`). Header:
    /// `client_msg_id u64, to_user u64, msg_type u8, count u8` (18 bytes), then `count` copies
    /// (`own u8, device u16, len u16, payload`) to the end of the frame. The recipient copies
    /// (`own = 0`) must name exactly the devices of `to_user`'s current list, the own copies
    /// (`own = 1`) exactly the sender's other devices; otherwise the whole send is refused
    /// with `DeviceList { reason: STALE }` and `Error { DeviceListStale }`, nothing stored. A
    /// message to one's own account (`to_user` = the sender's user) has only `own = 0` copies,
    /// naming exactly the sender's other devices. One `ServerAck` once every copy is durable.
    SendMulti(SEND_MULTI = 0x13) {
        /// Chosen by the sender, unique per sending device; retries reuse it (dedup key).
        client_msg_id: u64,
        /// The recipient user.
        to_user: UserId,
        /// Sets pruning priority (the same for every copy).
        msg_type: MsgType,
        ..
        /// One ciphertext per device.
        copies: Vec<DeviceCopy>,
    }

    /// Both ways `0x20`: keepalive probe. Header: `nonce u64` (8 bytes).
    Ping(PING = 0x20) {
        /// Echoed in the `Pong`.
        nonce: u64,
    }

    /// Both ways `0x21`: keepalive answer. Header: `nonce u64` (8 bytes).
    Pong(PONG = 0x21) {
        /// The `Ping`'s nonce.
        nonce: u64,
    }

    /// C→S `0x30`: publish this device's keys (logged in; stored on the user's home shard).
    /// Header: `identity_dh [32], identity_sign [32], signed_prekey_id u32, signed_prekey [32],
    /// signed_prekey_sig [64]` (164 bytes), then `N` × `(id u32, key [32])` (36 bytes each) to
    /// the end of the frame, `N >= 0`. The identity and signed prekey replace the stored ones;
    /// the one-time prekeys are added. Answer: `PrekeyStatus { reason: UPLOADED }` once durable.
    PrekeyUpload(PREKEY_UPLOAD = 0x30) {
        /// Identity keys and the current signed prekey (boxed: keeps `Frame` small for the
        /// hot message kinds).
        keys: Box<DeviceKeys>,
        ..
        /// One-time prekeys to add.
        one_time: Vec<OneTimePrekey>,
    }

    /// C→S `0x31`: ask for a device's prekey bundle (consumes one of its one-time prekeys).
    /// Header: `request_id u64, user u64, device u16` (18 bytes). Answer: `PrekeyBundle` with
    /// the same `request_id`, or a non-fatal `Error` whose `ref_id` is `request_id`.
    PrekeyFetch(PREKEY_FETCH = 0x31) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Whose bundle.
        addr: DeviceAddr,
    }

    /// C→S `0x40`: a new device (connected, not logged in) asks to be linked to an account.
    /// Header: `request_id u64` (8 bytes). Answer: `LinkCode` with the same `request_id`. The
    /// code is bound to this connection and its handshake static key; once a primary approves
    /// it, the server sends this connection `Registered { user, device }` and the device logs
    /// in with `Login` as usual. A second `LinkRequest` replaces the first code.
    LinkRequest(LINK_REQUEST = 0x40) {
        /// Chosen by the client; echoed in `LinkCode`.
        request_id: u64,
    }

    /// C→S `0x41`: the primary (logged in as device 0) approves a link code with the new
    /// device's keys, as read from its screen, and its signature over them. Header:
    /// `request_id u64, code u64, static_key [32], identity_dh [32], identity_sign [32],
    /// signature [64]` (176 bytes). Answer: `DeviceLinked`, or a non-fatal `Error` whose
    /// `ref_id` is `request_id`.
    LinkApprove(LINK_APPROVE = 0x41) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The code the new device shows.
        code: u64,
        /// The new device's keys and the primary's signature (boxed: keeps `Frame` small for
        /// the hot message kinds).
        keys: Box<LinkKeys>,
    }

    /// C→S `0x42`: ask for a user's current device list (logged in). Header: `request_id u64,
    /// user u64` (16 bytes). Answer: `DeviceList { reason: FETCHED }`, or `Error
    /// { NoSuchRecipient }`. The connection also gets `DeviceList { reason: CHANGED }` when
    /// that list changes later (while the server remembers it as a watcher).
    DeviceListFetch(DEVICE_LIST_FETCH = 0x42) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Whose list.
        user: UserId,
    }

    /// C→S `0x43`: remove a device from the account (logged in): the primary may remove any
    /// companion, a companion only itself. Header: `request_id u64, device u16` (10 bytes).
    /// Answer: `DeviceUnlinked` once the removal is durable, or a non-fatal `Error`.
    Unlink(UNLINK = 0x43) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The device to remove (never 0).
        device: DeviceId,
    }

    /// C→S `0x60`: ask the home shard for an upload slot (capability `MEDIA`). Header:
    /// `request_id u64, class u8, size u64, sha256 [32]` (49 bytes). Answer: `MediaSlot` with
    /// the same `request_id`, or a non-fatal `Error` (`MediaTooLarge`, `MediaQuotaExceeded`,
    /// `MediaRateLimited`, `MediaUnavailable`) whose `ref_id` is `request_id`.
    MediaSlotRequest(MEDIA_SLOT_REQUEST = 0x60) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// What kind of media (sets the size limit).
        class: MediaClass,
        /// Exact size of the ciphertext to upload, bytes.
        size: u64,
        /// SHA-256 of the ciphertext.
        sha256: [u8; 32],
    }

    /// C→S `0x61`: ask for a download URL of the blob whose ciphertext has this SHA-256
    /// (capability `MEDIA`). Header: `request_id u64, sha256 [32]` (40 bytes). Answer:
    /// `MediaDownload`, or a non-fatal `Error` (`MediaRateLimited`, `MediaUnavailable`).
    MediaDownloadRequest(MEDIA_DOWNLOAD_REQUEST = 0x61) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// SHA-256 of the ciphertext (from the media message).
        sha256: [u8; 32],
    }

    /// C→S `0x62`: register a status post with the server (capability `MEDIA`), before its
    /// copies are sent (`SendMulti` to each audience user, `msg_type` STATUS). Header:
    /// `post_id u64, blob_count u8, audience_count u16` (11 bytes), then the blobs' SHA-256s
    /// and the audience's user ids. The server keeps the post for `status_ttl_s`, lets only the
    /// poster and the audience download its blobs, and deletes them when it expires or is
    /// deleted. Answer: `StatusPublished` once durable, or a non-fatal `Error` (`StatusLimit`,
    /// `MediaUnavailable`, `StorageUnavailable`) with `ref_id` = `post_id`.
    StatusPublish(STATUS_PUBLISH = 0x62) {
        /// Chosen by the poster, unique among its posts.
        post_id: u64,
        ..
        /// Blobs and audience.
        refs: StatusRefs,
    }

    /// C→S `0x63`: delete one of this user's status posts now. Header: `post_id u64` (8
    /// bytes). Answer: `StatusDeleted` once durable, or `Error { NoSuchStatus }`.
    StatusDelete(STATUS_DELETE = 0x63) {
        /// The post.
        post_id: u64,
    }

    /// C→S `0x70` (capability `PRESENCE`): watch a user's presence for `ttl_s` seconds (the
    /// chats this device has open). Header: `request_id u64, user u64, ttl_s u32` (20 bytes).
    /// `ttl_s` is capped by the server (`presence_subscription_ttl_s_max`); 0 unsubscribes.
    /// Answer: `Presence` with the same `request_id` (the state now), then a `Presence` with
    /// `request_id` 0 at every change while the subscription lasts; or a non-fatal `Error`
    /// (`PresenceSubscriptionLimit`, `PresenceSubscriberLimit`, `NoSuchRecipient`). Renewing a
    /// subscription before it expires replaces its TTL. Nothing answers an unsubscribe.
    PresenceSubscribe(PRESENCE_SUBSCRIBE = 0x70) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Whose presence.
        user: UserId,
        /// Lifetime of the subscription in seconds; 0 ends it.
        ttl_s: u32,
    }

    /// C→S `0x71` (capability `PRESENCE`): who may see this user's last seen and online
    /// status. Header: `request_id u64, last_seen u8, online u8` (10 bytes). Answer:
    /// `PrivacyState` once durable.
    PrivacySet(PRIVACY_SET = 0x71) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Who may see when this user was last online.
        last_seen: Visibility,
        /// Who may see that this user is online now.
        online: Visibility,
    }

    /// C→S `0x72` (capability `PRESENCE`): edit the contact list or the block list kept on the
    /// server. Header: `request_id u64, op u8, count u16` (11 bytes), then `count` × `user
    /// u64` (`1 <= count <= 1024`). Answer: `PrivacyState` once durable, or a non-fatal
    /// `Error { ContactLimit }` (nothing changed).
    ContactsEdit(CONTACTS_EDIT = 0x72) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Add, remove, block or unblock.
        op: ContactOp,
        ..
        /// The users.
        users: Vec<u64>,
    }

    /// C→S `0x73` (capability `PRESENCE`): this device is typing to `to_user`. Header:
    /// `to_user u64, state u8` (9 bytes). Relayed to the online devices of `to_user` that
    /// announced `PRESENCE`, never stored; dropped when none is online, when either blocked the
    /// other, or past `typing_per_device_per_s`. No answer (past the rate, a non-fatal
    /// `Error { TypingRateLimited }`).
    Typing(TYPING = 0x73) {
        /// The chat partner.
        to_user: UserId,
        /// Composing, paused or recording.
        state: TypingState,
    }

    /// C→S `0x74` (capability `CALLS`): one call signal to `peer` (the other party's user).
    /// Header: `call_id u64, peer u64, kind u8` (17 bytes), then the end-to-end encrypted
    /// payload (SDP, ICE candidate; empty for reject/busy/hangup) to the end of the frame. An
    /// `OFFER` with a fresh `call_id` (chosen by the caller) starts a call that rings every
    /// device of `peer`; the state machine is in §21.
    CallSignal(CALL_SIGNAL = 0x74) {
        /// The call, chosen by the caller.
        call_id: u64,
        /// The other party.
        peer: UserId,
        /// Which step.
        kind: CallKind,
        ..
        /// Opaque to the server.
        payload: Bytes,
    }

    /// C→S `0x75` (capability `CALLS`): ask for TURN relay credentials. Header: `request_id
    /// u64` (8 bytes). Answer: `TurnCredentials`, or a non-fatal `Error` (`TurnRateLimited`,
    /// `TurnUnavailable`).
    TurnRequest(TURN_REQUEST = 0x75) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
    }

    /// C→S `0x50`: create a group (capability `GROUPS`, §18); the sender becomes its first
    /// admin. Header: `request_id u64, count u16` (10 bytes), then `count` × `user u64`, the
    /// other initial members, strictly increasing (`count` may be 0). Answer: `GroupInfo` once
    /// the group is durable on its home shard, or a non-fatal `Error` whose `ref_id` is
    /// `request_id`.
    GroupCreate(GROUP_CREATE = 0x50) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        ..
        /// The other initial members.
        members: UserList,
    }

    /// C→S `0x51`: change a group's membership, admins or settings. Header: `request_id u64,
    /// group u64, op u8, count u16` (19 bytes), then `count` × `user u64` strictly increasing
    /// (empty for `LEAVE` and the settings). Answer: `GroupDone` once the change is durable
    /// (its membership event is then in the group's order), or a non-fatal `Error`.
    GroupChange(GROUP_CHANGE = 0x51) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// What to do.
        op: GroupOp,
        ..
        /// Whom it is about.
        users: UserList,
    }

    /// C→S `0x52`: replace the group's encrypted subject or description (any member).
    /// Header: `request_id u64, group u64, which u8` (17 bytes), then the blob to the end of
    /// the frame. Answer: `GroupDone`, or `Error { GroupBlobTooLarge }`.
    GroupSetBlob(GROUP_SET_BLOB = 0x52) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// Subject or description.
        which: GroupBlobKind,
        ..
        /// End-to-end ciphertext the server stores as given.
        blob: Bytes,
    }

    /// C→S `0x53`: ask for a group's state (members only). Header: `request_id u64, group u64`
    /// (16 bytes). Answer: `GroupInfo`, or a non-fatal `Error`.
    GroupInfoFetch(GROUP_INFO_FETCH = 0x53) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
    }

    /// C→S `0x54`: send one message to a group: one Sender Key ciphertext, fanned out by the
    /// server to every member device. Header: `client_msg_id u64, group u64` (16 bytes), then
    /// the ciphertext to the end of the frame. `ServerAck` once the message
    /// is durable on the group's home shard (from then on every member device at that point
    /// of the group's order gets it), or a non-fatal `Error` whose `ref_id` is `client_msg_id`.
    GroupSend(GROUP_SEND = 0x54) {
        /// Chosen by the sender, unique per sending device; retries reuse it (dedup key).
        client_msg_id: u64,
        /// The group.
        group: GroupId,
        ..
        /// The Sender Key ciphertext.
        payload: Bytes,
    }

    /// C→S `0x55`: ask for a group message's receipts (members only). Header: `request_id u64,
    /// group u64, gseq u64` (24 bytes). Answer: `GroupReceipt` with the same `request_id`.
    GroupReceiptFetch(GROUP_RECEIPT_FETCH = 0x55) {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// The message's place in the group's order.
        gseq: u64,
    }

    /// S→C `0x80`: login accepted. Header: `user u64, device u16, revision u16, capabilities
    /// u64, server_time_ms u64, keepalive_ms u32, max_frame_bytes u32` (36 bytes).
    Welcome(WELCOME = 0x80) {
        /// The logged-in device.
        addr: DeviceAddr,
        /// The server's revision.
        revision: u16,
        /// Capabilities the server will use on this connection (intersection).
        capabilities: u64,
        /// Server wall clock, ms since the Unix epoch.
        server_time_ms: u64,
        /// Send a `Ping` at least this often; the server closes after `idle_timeout_ms`.
        keepalive_ms: u32,
        /// Largest record body the server accepts.
        max_frame_bytes: u32,
    }

    /// S→C `0x81`: a registration code was sent out of band. Header: `phone u64,
    /// expires_in_s u32` (12 bytes).
    RegisterCodeSent(REGISTER_CODE_SENT = 0x81) {
        /// The number.
        phone: UserId,
        /// Code lifetime in seconds.
        expires_in_s: u32,
    }

    /// S→C `0x82`: registration complete. Header: `user u64, device u16` (10 bytes).
    Registered(REGISTERED = 0x82) {
        /// The user (the number) and the device id bound to this static key.
        addr: DeviceAddr,
    }

    /// S→C `0x83`: one tick (✓): the message is durable on the server. Header:
    /// `client_msg_id u64, server_ts_ms u64` (16 bytes).
    ServerAck(SERVER_ACK = 0x83) {
        /// The acknowledged `Send`.
        client_msg_id: u64,
        /// When the server accepted it.
        server_ts_ms: u64,
    }

    /// S→C `0x84`: a message for this device. Header: `seq u64`, then the [`Message`]'s 27
    /// bytes (35 in all); its payload is the tail.
    Deliver(DELIVER = 0x84) {
        /// Mailbox sequence number; acknowledge it with `Ack`.
        seq: u64,
        ..
        /// The message.
        message: Message,
    }

    /// S→C `0x85`: a delivered (✓✓) or read receipt for a message this device sent. Header:
    /// `seq u64`, then the [`ReceiptInfo`]'s 27 bytes (35 in all). Acknowledge it with `Ack`
    /// like a `Deliver`.
    Receipt(RECEIPT = 0x85) {
        /// Mailbox sequence number.
        seq: u64,
        /// Who, which message, what and when.
        receipt: ReceiptInfo,
    }

    /// S→C `0xA0`: the answer to `PrekeyFetch`. Header: `request_id u64, user u64, device u16`,
    /// the 164 bytes of keys as in `PrekeyUpload`, `has_one_time u8, one_time_id u32,
    /// one_time [32]` (219 bytes). When `has_one_time` is 0 the id and key bytes are zero. The
    /// one-time prekey was consumed durably before this frame was sent and is never handed out
    /// again.
    PrekeyBundle(PREKEY_BUNDLE = 0xA0) {
        /// From the `PrekeyFetch`.
        request_id: u64,
        /// Whose bundle.
        addr: DeviceAddr,
        /// Identity keys and signed prekey (the client verifies the signature; boxed).
        keys: Box<DeviceKeys>,
        /// One one-time prekey, or none when the device has run out.
        one_time: Option<OneTimePrekey>,
    }

    /// S→C `0xA1`: how many one-time prekeys the server holds for this device, and why it says
    /// so. Header: `one_time_remaining u32, low_water u32, reason u8` (9 bytes).
    PrekeyStatus(PREKEY_STATUS = 0xA1) {
        /// One-time prekeys stored for this device.
        one_time_remaining: u32,
        /// The server's low-water mark (`prekey_low_water`).
        low_water: u32,
        /// Why it was sent.
        reason: PrekeyStatusReason,
    }

    /// S→C `0xA2`: the answer to `LinkRequest`: the code to show (as text or a QR code) with
    /// the device's keys. Header: `request_id u64, code u64, expires_in_s u32` (20 bytes).
    LinkCode(LINK_CODE = 0xA2) {
        /// From the `LinkRequest`.
        request_id: u64,
        /// Single use, valid for `expires_in_s` seconds while this connection stays open.
        code: u64,
        /// Lifetime (`link_code_ttl_ms`, in seconds).
        expires_in_s: u32,
    }

    /// S→C `0xA3`: the answer to `LinkApprove`: the new device is bound to the account, durably.
    /// Header: `request_id u64, user u64, device u16` (18 bytes).
    DeviceLinked(DEVICE_LINKED = 0xA3) {
        /// From the `LinkApprove`.
        request_id: u64,
        /// The new device's address.
        addr: DeviceAddr,
    }

    /// S→C `0xA4`: a user's device list. Header: `request_id u64, user u64, version u32,
    /// reason u8, count u8` (22 bytes), then `count` × 138-byte [`DeviceEntry`] in increasing
    /// device order. `version` grows with every link and removal.
    DeviceList(DEVICE_LIST = 0xA4) {
        /// The fetch's `request_id`, the refused send's `client_msg_id`, or 0.
        request_id: u64,
        /// Whose list.
        user: UserId,
        /// List version.
        version: u32,
        /// Why it was sent.
        reason: DeviceListReason,
        ..
        /// The devices, primary first.
        devices: Vec<DeviceEntry>,
    }

    /// S→C `0xA5`: the answer to `Unlink`: the device is removed, durably (its mailbox and
    /// prekeys are gone and its connection was closed with `DeviceRemoved`). Header:
    /// `request_id u64, device u16` (10 bytes).
    DeviceUnlinked(DEVICE_UNLINKED = 0xA5) {
        /// From the `Unlink`.
        request_id: u64,
        /// The removed device.
        device: DeviceId,
    }

    /// S→C `0xC0`: the answer to `MediaSlotRequest`: `PUT` the ciphertext to `url` before
    /// `expires_at_ms`. Header: `request_id u64, slot_id u64, expires_at_ms u64` (24 bytes),
    /// then the URL (UTF-8, 1..=1024 bytes) to the end of the frame.
    MediaSlot(MEDIA_SLOT = 0xC0) {
        /// From the `MediaSlotRequest`.
        request_id: u64,
        /// The slot, unique for this user.
        slot_id: u64,
        /// When the URL's token expires, ms since the Unix epoch (second resolution).
        expires_at_ms: u64,
        ..
        /// `<media_public_url>/v1/upload/<token>`.
        url: MediaUrl,
    }

    /// S→C `0xC1`: the answer to `MediaDownloadRequest`: `GET` the blob from `url` before
    /// `expires_at_ms`. Header: `request_id u64, expires_at_ms u64` (16 bytes), then the URL
    /// to the end of the frame.
    MediaDownload(MEDIA_DOWNLOAD = 0xC1) {
        /// From the `MediaDownloadRequest`.
        request_id: u64,
        /// When the URL's token expires, ms since the Unix epoch (second resolution).
        expires_at_ms: u64,
        ..
        /// `<media_public_url>/v1/blob/<token>`.
        url: MediaUrl,
    }

    /// S→C `0xC2`: the answer to `StatusPublish`: the post is durable and visible until
    /// `expires_at_ms`. Header: `post_id u64, expires_at_ms u64` (16 bytes).
    StatusPublished(STATUS_PUBLISHED = 0xC2) {
        /// From the `StatusPublish`.
        post_id: u64,
        /// When the server deletes it (`status_ttl_s` after it was published).
        expires_at_ms: u64,
    }

    /// S→C `0xC3`: the answer to `StatusDelete`: the post and its blobs are gone. Header:
    /// `post_id u64` (8 bytes).
    StatusDeleted(STATUS_DELETED = 0xC3) {
        /// The deleted post.
        post_id: u64,
    }

    /// S→C `0xD0` (capability `PRESENCE`): a watched user's presence, as this subscriber may
    /// see it. Header: `request_id u64, user u64, state u8, last_seen_ms u64` (25 bytes).
    /// `request_id` is the subscription's for its first answer, 0 for a change.
    Presence(PRESENCE = 0xD0) {
        /// From the `PresenceSubscribe`, or 0.
        request_id: u64,
        /// Whose presence.
        user: UserId,
        /// Online, offline, or unavailable to this subscriber.
        state: PresenceState,
        /// When the user was last seen (ms since the Unix epoch), 0 when hidden or unknown.
        last_seen_ms: u64,
    }

    /// S→C `0xD1` (capability `PRESENCE`): this user's privacy settings after a `PrivacySet`
    /// or `ContactsEdit`, durable. Header: `request_id u64, last_seen u8, online u8, contacts
    /// u16, blocked u16` (14 bytes).
    PrivacyState(PRIVACY_STATE = 0xD1) {
        /// From the request.
        request_id: u64,
        /// Who may see the last seen.
        last_seen: Visibility,
        /// Who may see the online status.
        online: Visibility,
        /// Users on the contact list.
        contacts: u16,
        /// Users blocked.
        blocked: u16,
    }

    /// S→C `0xD2` (capability `PRESENCE`): the chat partner `from_user` is typing. Header:
    /// `from_user u64, state u8` (9 bytes).
    TypingNotice(TYPING_NOTICE = 0xD2) {
        /// Who.
        from_user: UserId,
        /// Composing, paused or recording.
        state: TypingState,
    }

    /// S→C `0xD3` (capability `CALLS`): a call signal relayed from device `from`, or said by
    /// the server (`RINGING`, `BUSY`, `ANSWERED_ELSEWHERE`, `MISSED`; then `from` is the other
    /// party's device the call is with, or its device 0). Header: `call_id u64, from_user
    /// u64, from_device u16, kind u8` (19 bytes), then the payload to the end of the frame.
    CallEvent(CALL_EVENT = 0xD3) {
        /// The call.
        call_id: u64,
        /// The signalling device.
        from: DeviceAddr,
        /// Which step.
        kind: CallKind,
        ..
        /// As the other device sent it (empty for server events).
        payload: Bytes,
    }

    /// S→C `0xD4` (capability `CALLS`): TURN credentials in coturn's REST scheme. Header:
    /// `request_id u64, ttl_s u32, count u8` (13 bytes), then `count` strings (`len u8`, UTF-8):
    /// username (`expiry:user`), password (base64 HMAC-SHA1), then the TURN URIs.
    TurnCredentials(TURN_CREDENTIALS = 0xD4) {
        /// From the `TurnRequest`.
        request_id: u64,
        /// Seconds the credentials stay valid (`turn_ttl_s`).
        ttl_s: u32,
        ..
        /// Username, password and URIs.
        auth: TurnAuth,
    }

    /// S→C `0xB0`: a group's state: the answer to `GroupCreate` and `GroupInfoFetch`. Header:
    /// `request_id u64, group u64, version u32, seq u64, created_ms u64, changed_ms u64, flags
    /// u8, count u16` (47 bytes), then `count` × (`user u64, role u8`) strictly increasing,
    /// `subject_len u16`, subject, `description_len u16`, description. Flag bit 0: admins only.
    GroupInfo(GROUP_INFO = 0xB0) {
        /// From the request.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// Grows with every change.
        version: u32,
        /// The group's last sequence number (messages and events).
        seq: u64,
        /// When created, ms since the Unix epoch.
        created_ms: u64,
        /// When last changed.
        changed_ms: u64,
        /// Bit 0: only admins add and remove members.
        flags: u8,
        ..
        /// Members, roles and the encrypted blobs (boxed: keeps `Frame` small for the hot
        /// message kinds).
        roster: Box<GroupRoster>,
    }

    /// S→C `0xB1`: the answer to `GroupChange` and `GroupSetBlob`: the change is durable and is
    /// event `seq` of the group. Header: `request_id u64, group u64, version u32, seq u64`
    /// (28 bytes).
    GroupDone(GROUP_DONE = 0xB1) {
        /// From the request.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// The version after the change.
        version: u32,
        /// The change's place in the group's order.
        seq: u64,
    }

    /// S→C `0xB2`: a group message's receipts, aggregated over its member devices: to the
    /// sending device at most once per message per server tick while the counts change
    /// (`request_id` 0), and as the answer to `GroupReceiptFetch`. Header: `request_id u64,
    /// group u64, gseq u64, client_msg_id u64, devices u32, delivered u32, read u32` (44 bytes).
    GroupReceipt(GROUP_RECEIPT = 0xB2) {
        /// 0, or the fetch's.
        request_id: u64,
        /// The group.
        group: GroupId,
        /// The message's place in the group's order.
        gseq: u64,
        /// The sender's id for it.
        client_msg_id: u64,
        /// Member devices it was stored for.
        devices: u32,
        /// Of those, how many acknowledged it (✓✓).
        delivered: u32,
        /// Of those, how many marked it read.
        read: u32,
    }

    /// S→C `0xE0`: an error; fatal codes are followed by a close. Header: `code u16, ref_id
    /// u64` (10 bytes), then up to [`ERROR_TEXT_MAX`] bytes of UTF-8 text. `ref_id` is the
    /// `client_msg_id` of the `Send` (or the `request_id` of the request) it refers to, or 0.
    Error(ERROR = 0xE0) {
        /// Raw code (see [`ErrorCode`]); kept raw so unknown codes survive decoding.
        code: u16,
        /// The request it refers to, or 0.
        ref_id: u64,
        ..
        /// Human-readable detail.
        text: String,
    }

    /// S→C `0xE1`: the server is going away; reconnect after the given delay. Header:
    /// `code u16, reconnect_after_ms u32` (6 bytes).
    GoAway(GO_AWAY = 0xE1) {
        /// Why (usually `ShuttingDown`).
        code: u16,
        /// Wait at least this long before reconnecting.
        reconnect_after_ms: u32,
    }
}

impl Error {
    /// An `Error` for `code`; `text` is cut to [`ERROR_TEXT_MAX`] bytes at a character boundary.
    pub fn new(code: ErrorCode, ref_id: u64, text: impl Into<String>) -> Self {
        let mut text: String = text.into();
        text.truncate(error_text_len(&text));
        Error {
            code: code as u16,
            ref_id,
            text,
        }
    }
}

/// Why a frame could not be decoded. Always fatal for the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame was empty.
    #[error("empty frame")]
    Empty,
    /// The kind byte is not known.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(FrameKind),
    /// The frame is shorter than its kind's header.
    #[error("frame kind {kind:?} (0x{kind:02x}) needs {needed} header bytes, got {got}")]
    Truncated {
        /// Kind byte.
        kind: FrameKind,
        /// Header size.
        needed: usize,
        /// Bytes present after the kind.
        got: usize,
    },
    /// Bytes remain after a kind that has no tail, or a count does not match the tail.
    #[error("frame kind {kind:?} (0x{kind:02x}) has {extra} unexpected trailing bytes")]
    Trailing {
        /// Kind byte.
        kind: FrameKind,
        /// How many.
        extra: usize,
    },
    /// A field has a value outside its domain.
    #[error("frame kind {kind:?} (0x{kind:02x}): invalid {field}")]
    InvalidField {
        /// Kind byte.
        kind: FrameKind,
        /// Field name.
        field: &'static str,
    },
}

impl DecodeError {
    /// The error code sent to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownKind(_) => ErrorCode::UnknownKind,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

impl Frame {
    /// Convenience: an `Error` frame for `code` (see [`Error::new`]).
    pub fn error(code: ErrorCode, ref_id: u64, text: impl Into<String>) -> Frame {
        Frame::Error(Error::new(code, ref_id, text))
    }

    /// Encodes into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

/// Header sizes (kind byte excluded), exported for docs and overhead figures.
pub mod sizes {
    use super::*;
    /// `Send` header.
    pub const SEND_HEADER: usize = <Send as FrameBody>::HEADER_BYTES;
    /// `Deliver` header.
    pub const DELIVER_HEADER: usize = <Deliver as FrameBody>::HEADER_BYTES;
    /// `Receipt` header.
    pub const RECEIPT_HEADER: usize = <Receipt as FrameBody>::HEADER_BYTES;
    /// `Welcome` header.
    pub const WELCOME_HEADER: usize = <Welcome as FrameBody>::HEADER_BYTES;
    /// `PrekeyUpload` fixed header (the one-time prekeys follow, 36 bytes each).
    pub const PREKEY_UPLOAD_HEADER: usize = <PrekeyUpload as FrameBody>::HEADER_BYTES;
    /// `PrekeyFetch` header.
    pub const PREKEY_FETCH_HEADER: usize = <PrekeyFetch as FrameBody>::HEADER_BYTES;
    /// `PrekeyBundle` header.
    pub const PREKEY_BUNDLE_HEADER: usize = <PrekeyBundle as FrameBody>::HEADER_BYTES;
    /// `PrekeyStatus` header.
    pub const PREKEY_STATUS_HEADER: usize = <PrekeyStatus as FrameBody>::HEADER_BYTES;
    /// `SendMulti` fixed header (the copies follow, 5 bytes plus the payload each).
    pub const SEND_MULTI_HEADER: usize = <SendMulti as FrameBody>::HEADER_BYTES;
    /// `LinkApprove` header.
    pub const LINK_APPROVE_HEADER: usize = <LinkApprove as FrameBody>::HEADER_BYTES;
    /// `DeviceList` fixed header (the entries follow, 138 bytes each).
    pub const DEVICE_LIST_HEADER: usize = <DeviceList as FrameBody>::HEADER_BYTES;

    /// Most one-time prekeys one `PrekeyUpload` can carry in a record body of
    /// `max_record_body` bytes (16-byte tag, kind byte and fixed header included).
    pub const fn prekey_upload_max_keys(max_record_body: usize) -> usize {
        max_record_body.saturating_sub(16 + 1 + PREKEY_UPLOAD_HEADER) / super::ONE_TIME_PREKEY_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = Address> {
        (any::<u8>(), any::<u64>(), any::<u16>()).prop_map(|(kind, id, device)| Address {
            kind,
            id,
            device,
        })
    }

    fn device_addr() -> impl Strategy<Value = DeviceAddr> {
        (any::<u64>(), any::<u16>()).prop_map(|(user, device)| DeviceAddr { user, device })
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            device_addr(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            payload(),
        )
            .prop_map(
                |(from, client_msg_id, server_ts_ms, msg_type, payload)| Message {
                    from,
                    client_msg_id,
                    server_ts_ms,
                    msg_type: MsgType(msg_type),
                    payload,
                },
            )
    }

    fn receipt_info() -> impl Strategy<Value = ReceiptInfo> {
        (device_addr(), any::<u64>(), 1u8..=3, any::<u64>()).prop_map(
            |(from, client_msg_id, kind, ts_ms)| ReceiptInfo {
                from,
                client_msg_id,
                kind: ReceiptKind(kind),
                ts_ms,
            },
        )
    }

    pub(crate) fn any_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<u64>().prop_map(|phone| RegisterRequest { phone }.into()),
            (any::<u64>(), any::<u32>())
                .prop_map(|(phone, code)| RegisterVerify { phone, code }.into()),
            (device_addr(), any::<u16>(), any::<u64>()).prop_map(
                |(addr, revision, capabilities)| Login {
                    addr,
                    revision,
                    capabilities,
                }
                .into()
            ),
            (any::<u64>(), addr(), any::<u8>(), payload()).prop_map(
                |(client_msg_id, to, msg_type, payload)| Send {
                    client_msg_id,
                    to,
                    msg_type: MsgType(msg_type),
                    payload,
                }
                .into()
            ),
            proptest::collection::vec(any::<u64>(), 1..=ACK_SEQS_MAX)
                .prop_map(|seqs| Ack { seqs }.into()),
            (addr(), any::<u64>())
                .prop_map(|(to, client_msg_id)| Read { to, client_msg_id }.into()),
            any::<u64>().prop_map(|nonce| Ping { nonce }.into()),
            any::<u64>().prop_map(|nonce| Pong { nonce }.into()),
            (
                device_addr(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(
                    |(
                        addr,
                        revision,
                        capabilities,
                        server_time_ms,
                        keepalive_ms,
                        max_frame_bytes,
                    )| Welcome {
                        addr,
                        revision,
                        capabilities,
                        server_time_ms,
                        keepalive_ms,
                        max_frame_bytes,
                    }
                    .into()
                ),
            (any::<u64>(), any::<u32>()).prop_map(|(phone, expires_in_s)| {
                RegisterCodeSent {
                    phone,
                    expires_in_s,
                }
                .into()
            }),
            device_addr().prop_map(|addr| Registered { addr }.into()),
            (any::<u64>(), any::<u64>()).prop_map(|(client_msg_id, server_ts_ms)| {
                ServerAck {
                    client_msg_id,
                    server_ts_ms,
                }
                .into()
            }),
            (any::<u64>(), message()).prop_map(|(seq, message)| Deliver { seq, message }.into()),
            (any::<u64>(), receipt_info())
                .prop_map(|(seq, receipt)| Receipt { seq, receipt }.into()),
            (any::<u16>(), any::<u64>(), "[a-z ]{0,200}").prop_map(|(code, ref_id, text)| Error {
                code,
                ref_id,
                text
            }
            .into()),
            (any::<u16>(), any::<u32>()).prop_map(|(code, reconnect_after_ms)| GoAway {
                code,
                reconnect_after_ms
            }
            .into()),
            (device_keys(), proptest::collection::vec(one_time(), 0..40)).prop_map(
                |(keys, one_time)| PrekeyUpload {
                    keys: Box::new(keys),
                    one_time
                }
                .into()
            ),
            (any::<u64>(), device_addr()).prop_map(|(request_id, addr)| PrekeyFetch {
                request_id,
                addr
            }
            .into()),
            (
                any::<u64>(),
                device_addr(),
                device_keys(),
                proptest::option::of(one_time())
            )
                .prop_map(|(request_id, addr, keys, one_time)| {
                    PrekeyBundle {
                        request_id,
                        addr,
                        keys: Box::new(keys),
                        one_time,
                    }
                    .into()
                }),
            (any::<u32>(), any::<u32>(), 1u8..=3).prop_map(|(one_time_remaining, low_water, r)| {
                PrekeyStatus {
                    one_time_remaining,
                    low_water,
                    reason: PrekeyStatusReason(r),
                }
                .into()
            }),
            send_multi().prop_map(Frame::from),
            device_list().prop_map(Frame::from),
            multi_device_fixed_frame(),
        ]
    }

    /// A `SendMulti` with 1..=64 copies, each `(own, device)` pair once, in random order.
    fn send_multi() -> impl Strategy<Value = SendMulti> {
        let copy = (
            any::<bool>(),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..40),
        );
        (
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            proptest::collection::vec(copy, 1..=SEND_COPIES_MAX),
        )
            .prop_map(|(client_msg_id, to_user, msg_type, raw)| {
                let mut copies: Vec<DeviceCopy> = Vec::with_capacity(raw.len());
                for (own, device, payload) in raw {
                    if !copies.iter().any(|c| c.own == own && c.device == device) {
                        copies.push(DeviceCopy {
                            own,
                            device,
                            payload: Bytes::from(payload),
                        });
                    }
                }
                SendMulti {
                    client_msg_id,
                    to_user,
                    msg_type: MsgType(msg_type),
                    copies,
                }
            })
    }

    fn device_entry() -> impl Strategy<Value = DeviceEntry> {
        (
            any::<u16>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(device, linked_at_ms, identity_dh, identity_sign, s1, s2)| {
                    let mut signature = [0u8; 64];
                    signature[..32].copy_from_slice(&s1);
                    signature[32..].copy_from_slice(&s2);
                    DeviceEntry {
                        device,
                        linked_at_ms,
                        identity_dh,
                        identity_sign,
                        signature,
                    }
                },
            )
    }

    /// A `DeviceList` with 1..=32 entries, device ids unique and increasing.
    fn device_list() -> impl Strategy<Value = DeviceList> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            1u8..=3,
            proptest::collection::vec(device_entry(), 1..=DEVICE_LIST_MAX),
        )
            .prop_map(|(request_id, user, version, reason, mut devices)| {
                devices.sort_by_key(|e| e.device);
                devices.dedup_by_key(|e| e.device);
                DeviceList {
                    request_id,
                    user,
                    version,
                    reason: DeviceListReason(reason),
                    devices,
                }
            })
    }

    /// The fixed-size multi-device frames.
    fn multi_device_fixed_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<u64>().prop_map(|request_id| LinkRequest { request_id }.into()),
            (
                any::<(u64, u64)>(),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                any::<([u8; 32], [u8; 32])>()
            )
                .prop_map(
                    |((request_id, code), static_key, identity_dh, identity_sign, (s1, s2))| {
                        let mut signature = [0u8; 64];
                        signature[..32].copy_from_slice(&s1);
                        signature[32..].copy_from_slice(&s2);
                        LinkApprove {
                            request_id,
                            code,
                            keys: Box::new(LinkKeys {
                                static_key,
                                identity_dh,
                                identity_sign,
                                signature,
                            }),
                        }
                        .into()
                    }
                ),
            (any::<u64>(), any::<u64>()).prop_map(|(request_id, user)| DeviceListFetch {
                request_id,
                user
            }
            .into()),
            (any::<u64>(), any::<u16>()).prop_map(|(request_id, device)| Unlink {
                request_id,
                device
            }
            .into()),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
                |(request_id, code, expires_in_s)| LinkCode {
                    request_id,
                    code,
                    expires_in_s,
                }
                .into()
            ),
            (any::<u64>(), device_addr()).prop_map(|(request_id, addr)| DeviceLinked {
                request_id,
                addr
            }
            .into()),
            (any::<u64>(), any::<u16>()).prop_map(|(request_id, device)| DeviceUnlinked {
                request_id,
                device
            }
            .into()),
        ]
    }

    /// The kinds added for multi-device accounts.
    const MULTI_DEVICE_KINDS: [FrameKind; 9] = [
        FrameKind::SEND_MULTI,
        FrameKind::LINK_REQUEST,
        FrameKind::LINK_APPROVE,
        FrameKind::DEVICE_LIST_FETCH,
        FrameKind::UNLINK,
        FrameKind::LINK_CODE,
        FrameKind::DEVICE_LINKED,
        FrameKind::DEVICE_LIST,
        FrameKind::DEVICE_UNLINKED,
    ];

    /// One mutation of an encoded frame: overwrite a byte, cut the end, or append bytes.
    #[derive(Clone, Debug)]
    enum Mutation {
        Set(usize, u8),
        Cut(usize),
        Append(Vec<u8>),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            3 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
            1 => any::<usize>().prop_map(Mutation::Cut),
            1 => proptest::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
        ]
    }

    /// Applies the mutations to `bytes` (the kind byte is left alone) and checks that decoding
    /// does not panic and that whatever still decodes is canonical.
    fn mutated_decodes_canonically(
        mut bytes: Vec<u8>,
        muts: Vec<Mutation>,
    ) -> Result<(), TestCaseError> {
        for m in muts {
            match m {
                Mutation::Set(at, b) if bytes.len() > 1 => {
                    let at = 1 + at % (bytes.len() - 1);
                    bytes[at] = b;
                }
                Mutation::Cut(n) if bytes.len() > 1 => {
                    let keep = 1 + n % (bytes.len() - 1);
                    bytes.truncate(keep);
                }
                Mutation::Append(more) => bytes.extend_from_slice(&more),
                _ => {}
            }
        }
        if let Ok(f) = Frame::decode(Bytes::from(bytes.clone())) {
            prop_assert_eq!(f.to_vec(), bytes);
        }
        Ok(())
    }

    fn device_keys() -> impl Strategy<Value = DeviceKeys> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(identity_dh, identity_sign, signed_prekey_id, signed_prekey, s1, s2)| {
                    let mut signed_prekey_sig = [0u8; 64];
                    signed_prekey_sig[..32].copy_from_slice(&s1);
                    signed_prekey_sig[32..].copy_from_slice(&s2);
                    DeviceKeys {
                        identity_dh,
                        identity_sign,
                        signed_prekey_id,
                        signed_prekey,
                        signed_prekey_sig,
                    }
                },
            )
    }

    fn one_time() -> impl Strategy<Value = OneTimePrekey> {
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, key)| OneTimePrekey { id, key })
    }

    proptest! {
        #[test]
        fn round_trip(f in any_frame()) {
            let bytes = f.to_vec();
            prop_assert_eq!(bytes.len(), f.encoded_len());
            prop_assert_eq!(bytes.first().copied(), Some(f.kind().0));
            let back = Frame::decode(Bytes::from(bytes)).expect("decode");
            prop_assert_eq!(back, f);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(Bytes::from(bytes));
        }

        #[test]
        fn send_multi_round_trips(m in send_multi()) {
            let bytes = m.to_vec();
            let copies: usize = m.copies.iter().map(|c| SEND_COPY_HEADER_BYTES + c.payload.len()).sum();
            prop_assert_eq!(bytes.len(), 1 + sizes::SEND_MULTI_HEADER + copies);
            prop_assert_eq!(bytes.len(), m.encoded_len());
            prop_assert_eq!(bytes.get(sizes::SEND_MULTI_HEADER).copied(), u8::try_from(m.copies.len()).ok());
            let back = Frame::decode(Bytes::from(bytes)).expect("decode");
            prop_assert_eq!(back, Frame::SendMulti(m));
        }

        #[test]
        fn device_list_round_trips(l in device_list()) {
            let bytes = l.to_vec();
            prop_assert_eq!(bytes.len(), 1 + sizes::DEVICE_LIST_HEADER + DEVICE_ENTRY_BYTES * l.devices.len());
            prop_assert_eq!(bytes.len(), l.encoded_len());
            let back = Frame::decode(Bytes::from(bytes)).expect("decode");
            prop_assert_eq!(back, Frame::DeviceList(l));
        }

        /// A `SendMulti` naming some (own, device) twice never decodes, whatever else it holds.
        #[test]
        fn send_multi_with_a_repeated_copy_is_refused(m in send_multi(), pick in any::<usize>()) {
            let mut m = m;
            let dup = m.copies[pick % m.copies.len()].clone();
            if m.copies.len() < SEND_COPIES_MAX {
                m.copies.push(dup);
                prop_assert_eq!(
                    Frame::decode(Bytes::from(m.to_vec())),
                    Err(DecodeError::InvalidField { kind: FrameKind::SEND_MULTI, field: "device twice" })
                );
            }
        }

        /// A `DeviceList` whose ids are not strictly increasing never decodes.
        #[test]
        fn device_list_out_of_order_is_refused(l in device_list(), pick in any::<usize>()) {
            let mut l = l;
            if l.devices.len() >= 2 {
                let i = pick % (l.devices.len() - 1);
                l.devices.swap(i, i + 1);
            } else {
                let e = l.devices[0];
                l.devices.push(e);
            }
            prop_assert_eq!(
                Frame::decode(Bytes::from(l.to_vec())),
                Err(DecodeError::InvalidField { kind: FrameKind::DEVICE_LIST, field: "device order" })
            );
        }

        /// Random bodies behind each multi-device kind byte (the generic test above rarely
        /// picks them, and never with bodies long enough for a `DeviceList`).
        #[test]
        fn multi_device_kinds_never_panic_on_random_bodies(
            k in 0usize..MULTI_DEVICE_KINDS.len(),
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![MULTI_DEVICE_KINDS[k].0];
            bytes.extend_from_slice(&body);
            if let Ok(f) = Frame::decode(Bytes::from(bytes.clone())) {
                prop_assert_eq!(f.kind(), MULTI_DEVICE_KINDS[k]);
                prop_assert_eq!(f.to_vec(), bytes);
            }
        }

        /// Valid multi-device frames with bytes changed, cut or appended: no panic, and what
        /// still decodes re-encodes to the same bytes.
        #[test]
        fn mutated_multi_device_frames_never_panic(
            f in prop_oneof![
                send_multi().prop_map(Frame::from),
                device_list().prop_map(Frame::from),
                multi_device_fixed_frame(),
            ],
            muts in proptest::collection::vec(mutation(), 1..4),
        ) {
            mutated_decodes_canonically(f.to_vec(), muts)?;
        }

        #[test]
        fn truncation_is_an_error_not_a_panic(f in any_frame(), cut in 0usize..40) {
            let bytes = f.to_vec();
            if cut < bytes.len() {
                let short = Bytes::copy_from_slice(&bytes[..bytes.len() - cut - 1]);
                // Frames with tails may still decode (shorter payload); fixed ones must not.
                let _ = Frame::decode(short);
            }
        }
    }

    #[test]
    fn send_payload_is_a_slice_not_a_copy() {
        let f = Frame::Send(Send {
            client_msg_id: 7,
            to: Address::device(14155550100, 0),
            msg_type: MsgType::TEXT,
            payload: Bytes::from_static(b"hi"),
        });
        let wire = Bytes::from(f.to_vec());
        let base = wire.as_ptr() as usize;
        let Frame::Send(send) = Frame::decode(wire.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(
            send.payload.as_ptr() as usize,
            base + 1 + sizes::SEND_HEADER
        );
        let deliver = Deliver {
            seq: 1,
            message: Message {
                from: DeviceAddr::new(1, 2),
                client_msg_id: 3,
                server_ts_ms: 4,
                msg_type: MsgType::IMAGE,
                payload: Bytes::from_static(b"pixels"),
            },
        };
        let wire = Bytes::from(deliver.to_vec());
        let base = wire.as_ptr() as usize;
        let Frame::Deliver(d) = Frame::decode(wire.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(
            d.message.payload.as_ptr() as usize,
            base + 1 + sizes::DELIVER_HEADER
        );
    }

    /// The layouts spelled out field by field, as `docs/protocol.md` §5 gives them (and as the
    /// frame code wrote them before the table): the struct nesting adds no byte.
    #[test]
    fn nested_structs_encode_flat() {
        let deliver = Deliver {
            seq: 0x0102_0304_0506_0708,
            message: Message {
                from: DeviceAddr::new(0x1112_1314_1516_1718, 0x2122),
                client_msg_id: 0x3132_3334_3536_3738,
                server_ts_ms: 0x4142_4344_4546_4748,
                msg_type: MsgType(0x51),
                payload: Bytes::from_static(b"xyz"),
            },
        };
        let mut want = vec![0x84];
        want.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        want.extend_from_slice(&0x1112_1314_1516_1718u64.to_be_bytes());
        want.extend_from_slice(&0x2122u16.to_be_bytes());
        want.extend_from_slice(&0x3132_3334_3536_3738u64.to_be_bytes());
        want.extend_from_slice(&0x4142_4344_4546_4748u64.to_be_bytes());
        want.push(0x51);
        want.extend_from_slice(b"xyz");
        assert_eq!(deliver.to_vec(), want);
        assert_eq!(Frame::from(deliver.clone()).to_vec(), want);

        let receipt = Receipt {
            seq: 9,
            receipt: ReceiptInfo {
                from: DeviceAddr::new(0x1112_1314_1516_1718, 0x2122),
                client_msg_id: 0x3132_3334_3536_3738,
                kind: ReceiptKind::READ,
                ts_ms: 0x4142_4344_4546_4748,
            },
        };
        let mut want = vec![0x85];
        want.extend_from_slice(&9u64.to_be_bytes());
        want.extend_from_slice(&0x1112_1314_1516_1718u64.to_be_bytes());
        want.extend_from_slice(&0x2122u16.to_be_bytes());
        want.extend_from_slice(&0x3132_3334_3536_3738u64.to_be_bytes());
        want.push(2);
        want.extend_from_slice(&0x4142_4344_4546_4748u64.to_be_bytes());
        assert_eq!(receipt.to_vec(), want);

        let login = Login {
            addr: DeviceAddr::new(0x3132_3334_3536_3738, 0x393A),
            revision: 0x3B3C,
            capabilities: 0x4142_4344_4546_4748,
        };
        let mut want = vec![0x03];
        want.extend_from_slice(&0x3132_3334_3536_3738u64.to_be_bytes());
        want.extend_from_slice(&[0x39, 0x3A, 0x3B, 0x3C]);
        want.extend_from_slice(&0x4142_4344_4546_4748u64.to_be_bytes());
        assert_eq!(login.to_vec(), want);
    }

    #[test]
    fn long_error_text_is_cut_at_a_char_boundary_consistently() {
        let text = "é".repeat(200); // 400 bytes; byte 256 is inside a character? 256 is even: boundary.
        let text = format!("x{text}"); // now byte 256 falls inside a 2-byte character
        let f = Frame::Error(Error {
            code: 1,
            ref_id: 2,
            text: text.clone(),
        });
        let v = f.to_vec();
        assert_eq!(v.len(), f.encoded_len());
        let Frame::Error(back) = Frame::decode(Bytes::from(v)).unwrap() else {
            panic!()
        };
        assert_eq!(back.text.len(), 255);
        assert_eq!(Error::new(ErrorCode::Internal, 2, text).text, back.text);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(Frame::decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            Frame::decode(Bytes::from_static(&[0x7f])),
            Err(DecodeError::UnknownKind(FrameKind(0x7f)))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[0x20, 1, 2])),
            Err(DecodeError::Truncated {
                kind: FrameKind::PING,
                needed: 8,
                got: 2
            })
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[0x20, 0, 0, 0, 0, 0, 0, 0, 0, 9])),
            Err(DecodeError::Trailing {
                kind: FrameKind::PING,
                extra: 1
            })
        );
        assert_eq!(
            DecodeError::UnknownKind(FrameKind(1)).code(),
            ErrorCode::UnknownKind
        );
        let ack0 = [0x11, 0, 0];
        assert!(matches!(
            Frame::decode(Bytes::copy_from_slice(&ack0)),
            Err(DecodeError::InvalidField { .. })
        ));
        assert_eq!(
            DecodeError::Trailing {
                kind: FrameKind::PING,
                extra: 1
            }
            .to_string(),
            "frame kind PING (0x20) has 1 unexpected trailing bytes"
        );
        assert_eq!(
            DecodeError::UnknownKind(FrameKind(0x7f)).to_string(),
            "unknown frame kind 0x7f"
        );
    }

    #[test]
    fn kinds_are_named_and_unknown_ones_representable() {
        assert_eq!(format!("{:?}", FrameKind::DELIVER), "DELIVER");
        assert_eq!(format!("{:?}", FrameKind(0x7f)), "FrameKind(127)");
        assert_eq!(FrameKind::ALL.len(), 57);
        for &k in FrameKind::ALL {
            // Every named kind decodes to something other than `UnknownKind`.
            let r = Frame::decode(Bytes::copy_from_slice(&[k.0]));
            assert!(!matches!(r, Err(DecodeError::UnknownKind(_))), "{k:?}");
        }
        assert_eq!(format!("{:?}", PrekeyStatusReason::EXHAUSTED), "EXHAUSTED");
        assert_eq!(<Ping as FrameBody>::KIND, FrameKind::PING);
        const _: () = assert!(<Send as FrameBody>::HAS_TAIL && !<Receipt as FrameBody>::HAS_TAIL);
    }

    #[test]
    fn header_sizes_are_as_documented() {
        assert_eq!(sizes::SEND_HEADER, 20);
        assert_eq!(sizes::DELIVER_HEADER, 35);
        assert_eq!(sizes::RECEIPT_HEADER, 35);
        assert_eq!(sizes::WELCOME_HEADER, 36);
        assert_eq!(sizes::PREKEY_UPLOAD_HEADER, 164);
        assert_eq!(sizes::PREKEY_FETCH_HEADER, 18);
        assert_eq!(sizes::PREKEY_BUNDLE_HEADER, 219);
        assert_eq!(sizes::PREKEY_STATUS_HEADER, 9);
        assert_eq!(<Ack as FrameBody>::HEADER_BYTES, 2);
        assert_eq!(<Error as FrameBody>::HEADER_BYTES, 10);
        assert_eq!(
            ONE_TIME_PREKEY_BYTES,
            std::mem::size_of::<<OneTimePrekey as Field>::Wire>()
        );
        // 16 KiB records: 450 one-time prekeys per upload.
        assert_eq!(sizes::prekey_upload_max_keys(16 * 1024), 450);
    }

    fn keys() -> DeviceKeys {
        DeviceKeys {
            identity_dh: [1; 32],
            identity_sign: [2; 32],
            signed_prekey_id: 3,
            signed_prekey: [4; 32],
            signed_prekey_sig: [5; 64],
        }
    }

    #[test]
    fn prekey_frames_refuse_bad_fields() {
        // An upload tail that is not a whole number of one-time prekeys.
        let mut v = PrekeyUpload {
            keys: Box::new(keys()),
            one_time: vec![OneTimePrekey {
                id: 1,
                key: [9; 32],
            }],
        }
        .to_vec();
        v.push(0);
        assert_eq!(
            Frame::decode(Bytes::from(v)),
            Err(DecodeError::Trailing {
                kind: FrameKind::PREKEY_UPLOAD,
                extra: 1
            })
        );
        // An upload with no one-time prekeys is fine (identity / signed prekey rotation only).
        let v = PrekeyUpload {
            keys: Box::new(keys()),
            one_time: vec![],
        }
        .to_vec();
        assert_eq!(v.len(), 165);
        assert!(Frame::decode(Bytes::from(v)).is_ok());
        // A bundle flag other than 0/1, and a flag of 0 with key bytes present.
        let b = PrekeyBundle {
            request_id: 1,
            addr: DeviceAddr::new(2, 0),
            keys: Box::new(keys()),
            one_time: None,
        }
        .to_vec();
        let flag_at = 1 + 8 + 8 + 2 + 164;
        let mut bad = b.clone();
        bad[flag_at] = 2;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
        let mut bad = b.clone();
        bad[flag_at + 5] = 1;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
        let status = PrekeyStatus {
            one_time_remaining: 0,
            low_water: 10,
            reason: PrekeyStatusReason::EXHAUSTED,
        };
        let mut bad = status.to_vec();
        bad[9] = 4;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
    }
}
