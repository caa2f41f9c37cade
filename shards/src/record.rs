//! The records a shard persists: the schema of its log.
//!
//! The journal (`storage`) frames and checksums bytes; what a tag means and how a body is laid
//! out is decided here, beside the type ([`Record`], [`tag`], [`Record::decode`]). Encoding
//! reaches the journal through [`storage::Encode`]; recovery hands back
//! [`RawRecord`]s, which [`decode_recovered`] turns into records for [`Shard::recover`]
//! (reporting and counting bodies it cannot decode).
//!
//! Every record kind is declared once, in the `records!` table below: the table generates the
//! [`Record`] variant, its [`tag`] constant, its body length, encode and decode. A body is the
//! variant's fields in table order, each laid out by the little-endian field codec (`LeField`,
//! at the end of this file): integers and byte arrays as they are, a [`DeviceAddr`] as `user
//! u64, device u16`, a [`Message`] / [`ReceiptInfo`] as their fields in order, a list as a
//! `u32` count then its items, a payload as a `u32` length then its bytes. Adding a field to a
//! record kind is one line in the table (and a change of the on-disk format).
//!
//! Decoding never panics, for any input: a kind whose fields are all fixed-size refuses any
//! other body length, a count or length is checked against the bytes left before anything is
//! allocated, and trailing bytes are refused.
//!
//! [`Shard::recover`]: crate::Shard::recover

use bytes::Bytes;
use protocol::{DeviceAddr, Message, MsgType, ReceiptInfo, ReceiptKind};
use storage::frame::MAX_BODY_LEN;
use storage::{Encode, RawRecord, SegmentId};

/// The record table: `Name(TAG_CONSTANT = tag byte) { fields }`, fields in on-disk order, each
/// an [`LeField`]. Generates the [`Record`] variant, the [`tag`] constant, the kind's
/// [`BodyLen`] (in `body_len`), and `Record::{tag, encoded_body_len, put_body, decode}`. A tag
/// used twice is an unreachable pattern in `decode` (an error under `-D warnings`) and fails
/// the const check below the table.
macro_rules! records {
    (
        $(
            $(#[$meta:meta])*
            $name:ident($konst:ident = $val:literal) {
                $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
            }
        )*
    ) => {
        /// One persisted record. Encoding/decoding lives beside it; every variant has a
        /// one-byte tag on disk so later record kinds (groups, ...) can be added without a new
        /// format.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Record {
            $(
                $(#[$meta])*
                #[doc = concat!("\n\nTag `", stringify!($val), "` ([`tag::", stringify!($konst), "`]).")]
                $name { $( $(#[$fmeta])* $field: $ty, )* },
            )*
        }

        /// On-disk tag byte of each record kind. `0` is never used; values not listed here are
        /// reserved for later kinds (groups, ...) and decode as [`DecodeError::UnknownTag`].
        pub mod tag {
            $(
                #[doc = concat!("[`Record::", stringify!($name), "`](super::Record::", stringify!($name), ").")]
                pub const $konst: u8 = $val;
            )*
        }

        /// Body bytes of each record kind (named by its tag constant), summed from its fields.
        mod body_len {
            use super::*;
            $(
                pub(super) const $konst: BodyLen = BodyLen {
                    min: 0 $( + <$ty as LeField>::MIN_LEN )*,
                    fixed: true $( && <$ty as LeField>::FIXED )*,
                };
            )*
        }

        /// Every tag in the table, in table order (checked distinct and nonzero below).
        const TAGS: &[u8] = &[ $( $val, )* ];

        impl Record {
            /// The on-disk tag byte of this record's kind (see [`tag`]).
            pub fn tag(&self) -> u8 {
                match self {
                    $( Record::$name { .. } => tag::$konst, )*
                }
            }

            /// Length of the encoded body (without the frame header).
            pub fn encoded_body_len(&self) -> usize {
                match self {
                    $(
                        Record::$name { $( $field, )* } => {
                            0 $( + <$ty as LeField>::len($field) )*
                        }
                    )*
                }
            }

            /// Appends the body: the fields in table order.
            fn put_body(&self, out: &mut Vec<u8>) {
                match self {
                    $(
                        Record::$name { $( $field, )* } => {
                            $( <$ty as LeField>::put($field, out); )*
                        }
                    )*
                }
            }

            /// Decodes a body written under `tag` (see [`tag`]). Never panics, for any input. A
            /// `Message` payload is a slice of `body` (no copy).
            pub fn decode(tag: u8, body: &Bytes) -> Result<Record, DecodeError> {
                let malformed = move |what| DecodeError::Malformed { tag, what };
                let mut r = Reader::new(body);
                let rec = match tag {
                    $(
                        tag::$konst => {
                            body_len::$konst.check(body.len()).map_err(malformed)?;
                            Record::$name {
                                $( $field: <$ty as LeField>::take(&mut r).map_err(malformed)?, )*
                            }
                        }
                    )*
                    other => return Err(DecodeError::UnknownTag { tag: other }),
                };
                if !r.rest.is_empty() {
                    return Err(malformed("trailing bytes after the fields"));
                }
                Ok(rec)
            }
        }
    };
}

records! {
    /// A message queued in a device's mailbox. On disk: `seq`, `to`, then the message's fields
    /// in order, its payload `u32`-length-prefixed (the layout predates [`Message`]; the
    /// fields are the same).
    Message(MESSAGE = 1) {
        /// Mailbox sequence number, unique within the shard, increasing.
        seq: u64,
        /// The recipient device.
        to: DeviceAddr,
        /// The message as delivered; `server_ts_ms` is the accept time the TTL runs from.
        message: Message,
    }

    /// A receipt queued in a device's mailbox (for the original sender). On disk: `seq`, `to`,
    /// then the receipt's fields in order.
    Receipt(RECEIPT = 2) {
        /// Mailbox sequence number.
        seq: u64,
        /// Who gets the receipt (the original sender's device).
        to: DeviceAddr,
        /// The receipt as delivered. Any kind byte decodes (recovery drops unknown ones).
        receipt: ReceiptInfo,
    }

    /// The mailbox entry `seq` was delivered and acknowledged, or pruned: it is dead.
    Tombstone(TOMBSTONE = 3) {
        /// The dead entry.
        seq: u64,
    }

    /// A device of a user and the static key it logs in with (home shard of `user`).
    Account(ACCOUNT = 4) {
        /// The user (phone number).
        user: u64,
        /// The device.
        device: u16,
        /// Its Noise static public key.
        static_key: [u8; 32],
        /// When bound.
        ts_ms: u64,
    }

    /// Reverse index: which (user, device) a static key is bound to (shard of hash(key)).
    KeyBinding(KEY_BINDING = 5) {
        /// The Noise static public key.
        static_key: [u8; 32],
        /// Bound user.
        user: u64,
        /// Bound device.
        device: u16,
        /// When bound.
        ts_ms: u64,
    }

    /// A device's published end-to-end identity and signed prekey (home shard of `user`). The
    /// last one per device wins at recovery. `generation` counts identity changes of the device:
    /// one-time prekeys of an older generation belong to an identity that is gone.
    PrekeyIdentity(PREKEY_IDENTITY = 6) {
        /// The user.
        user: u64,
        /// The device.
        device: u16,
        /// Identity generation: 1 for the first identity, +1 whenever the identity keys change.
        generation: u32,
        /// X25519 identity key.
        identity_dh: [u8; 32],
        /// Ed25519 identity signing key.
        identity_sign: [u8; 32],
        /// Signed prekey id.
        signed_prekey_id: u32,
        /// X25519 signed prekey.
        signed_prekey: [u8; 32],
        /// Ed25519 signature over `0x05 ‖ signed_prekey` (verified before it was written).
        signed_prekey_sig: [u8; 64],
        /// Highest one-time prekey id ever uploaded for this identity: uploads of ids at or
        /// below it are skipped, so a consumed key can never come back through a retried upload.
        max_one_time_id: u32,
        /// When uploaded.
        ts_ms: u64,
    }

    /// One-time prekeys of a device, added to what it has (home shard of `user`). At most
    /// [`MAX_PREKEY_BATCH_KEYS`].
    PrekeyBatch(PREKEY_BATCH = 7) {
        /// The user.
        user: u64,
        /// The device.
        device: u16,
        /// The identity generation they belong to (see `PrekeyIdentity`).
        generation: u32,
        /// `(id, X25519 public key)` pairs; on disk a `u32` count, then `id u32, key [32]` each.
        keys: Vec<(u32, [u8; 32])>,
    }

    /// One-time prekey `id` of a device was handed out in a bundle: it is gone for good.
    PrekeyConsumed(PREKEY_CONSUMED = 8) {
        /// The user.
        user: u64,
        /// The device.
        device: u16,
        /// The one-time prekey id.
        id: u32,
    }

    /// What the sender dedup window remembers of a stored message whose own record may be
    /// gone: `(from_user, from_device, client_msg_id)` was stored as `seq` at `ts_ms`.
    /// Compaction writes one for every window entry remembered in the segment it empties, so
    /// the window outlives the segments of the messages it remembers.
    Dedup(DEDUP = 9) {
        /// The message's mailbox seq (orders the window: the newest seqs are kept).
        seq: u64,
        /// The sending device.
        from: DeviceAddr,
        /// Sender's message id.
        client_msg_id: u64,
        /// The server time the message was first stored with (a retry is answered with it).
        ts_ms: u64,
    }

    /// One of several copies of a message stored together (a `SendMulti`'s copies for the
    /// devices homed on one shard, each its own ciphertext). As `Message`, plus how many copies
    /// the send stored on this shard: recovery restores the send into the dedup window only when
    /// it finds all of them (or a `Dedup` record for it), so a crash that keeps some copies and
    /// loses others makes the client's retry store the send again instead of answering ✓ for
    /// copies that are gone. Compaction re-appends a live copy as a plain `Message`.
    MessageCopy(MESSAGE_COPY = 12) {
        /// Mailbox sequence number.
        seq: u64,
        /// The recipient device.
        to: DeviceAddr,
        /// Copies of this send stored on this shard (2 or more).
        copies: u8,
        /// The message as delivered.
        message: Message,
    }

    /// A companion device linked to an account (home shard of `user`): the key it logs in
    /// with, the identity keys the primary signed, the signature, and the device-list version
    /// this change made. Live while the device is linked; the last record per device wins.
    Device(DEVICE = 10) {
        /// The user.
        user: u64,
        /// The device id (>= 1).
        device: u16,
        /// The account's device-list version after this link.
        version: u32,
        /// Its Noise static public key.
        static_key: [u8; 32],
        /// X25519 identity key.
        identity_dh: [u8; 32],
        /// Ed25519 identity signing key.
        identity_sign: [u8; 32],
        /// The primary's Ed25519 signature over the device signature message.
        signature: [u8; 64],
        /// When linked.
        linked_at_ms: u64,
    }

    /// A companion was removed: its account binding, mailbox entries and prekeys recorded
    /// before this record are dead. Live while it carries the account's current device-list
    /// version (so the version survives compaction).
    DeviceRemoved(DEVICE_REMOVED = 11) {
        /// The user.
        user: u64,
        /// The removed device.
        device: u16,
        /// The account's device-list version after this removal.
        version: u32,
        /// When removed.
        ts_ms: u64,
    }

    /// A status post (docs/protocol.md §19.7) on its poster's home shard: live while the post
    /// is (until `expires_at_ms` or a `StatusGone`).
    StatusPost(STATUS_POST = 30) {
        /// The poster.
        poster: u64,
        /// The poster's id for it.
        post_id: u64,
        /// When the server deletes it, ms since the Unix epoch.
        expires_at_ms: u64,
        /// SHA-256 of each media blob it refers to.
        blobs: Vec<[u8; 32]>,
        /// Users who may download its blobs.
        audience: Vec<u64>,
    }

    /// A status post deleted (expired, or by its poster), with its blobs: a restart that
    /// still finds this record deletes them again (idempotent). Never live.
    StatusGone(STATUS_GONE = 31) {
        /// The poster.
        poster: u64,
        /// The post.
        post_id: u64,
        /// Its blobs.
        blobs: Vec<[u8; 32]>,
    }

    /// A user's privacy settings (home shard of `user`): who may see its last seen and its
    /// online status (`protocol::presence::Visibility` bytes; another byte reads as
    /// `NOBODY`). The last one per user wins; live while it is the user's current one.
    PrivacySettings(PRIVACY_SETTINGS = 40) {
        /// The user.
        user: u64,
        /// Last-seen visibility.
        last_seen: u8,
        /// Online visibility.
        online: u8,
        /// When set.
        ts_ms: u64,
    }

    /// A user's whole contact list (home shard of `user`), written at every change. The last
    /// one per user wins; live while current.
    Contacts(CONTACTS = 41) {
        /// The user.
        user: u64,
        /// The contacts, increasing.
        users: Vec<u64>,
    }

    /// A user's whole block list (home shard of `user`), written at every change. The last one
    /// per user wins; live while current.
    Blocked(BLOCKED = 42) {
        /// The user.
        user: u64,
        /// The blocked users, increasing.
        users: Vec<u64>,
    }

    /// Last-seen times of users homed here, batched: one record per shard tick for the users
    /// whose last device disconnected since the previous one. Live while it holds the current
    /// last-seen time of at least one user.
    LastSeen(LAST_SEEN = 43) {
        /// `(user, last_seen_ms)` pairs.
        entries: Vec<(u64, u64)>,
    }

    /// A group's state after a change, and the membership event the change is (home shard of
    /// `group`): event `gseq` of the group; its fan-out goes to `members`, plus `event_users`
    /// when the event removed them. Live while it is the group's current state, and while a
    /// fan-out started under its `version` is pending (recovery takes the membership of a
    /// pending fan-out from the state record of its version).
    GroupState(GROUP_STATE = 20) {
        /// The group.
        group: u64,
        /// Grows with every change.
        version: u32,
        /// The event's place in the group's order.
        gseq: u64,
        /// When the group was created.
        created_ms: u64,
        /// When this change was made.
        changed_ms: u64,
        /// Bit 0: admins only.
        flags: u8,
        /// Who made the change.
        actor: DeviceAddr,
        /// What the change was (a `GroupOp` byte).
        op: u8,
        /// Whom the change was about.
        event_users: Vec<u64>,
        /// `(user, role)` of every member after the change, increasing (role 1 = admin).
        members: Vec<(u64, u8)>,
        /// The encrypted subject.
        subject: Bytes,
        /// The encrypted description.
        description: Bytes,
    }

    /// A group message accepted by the group's home shard: message `gseq` of `group`, fanned
    /// out to the members of the group's state `version`. Live until its fan-out is done.
    /// The message's payload is the envelope the members get.
    GroupMessage(GROUP_MESSAGE = 21) {
        /// The group.
        group: u64,
        /// Its place in the group's order.
        gseq: u64,
        /// The state version whose members it goes to.
        version: u32,
        /// The message as delivered (`msg_type` `GROUP`).
        message: Message,
    }

    /// Every destination shard stored group event or message `gseq` of `group`: its fan-out
    /// is done. Live while it is the group's latest (it carries the group's sequence
    /// high-water mark).
    GroupFanoutDone(GROUP_FANOUT_DONE = 22) {
        /// The group.
        group: u64,
        /// The event or message.
        gseq: u64,
    }

    /// A group message or event stored once on a destination shard for the member devices
    /// homed there: one mailbox entry per device (its own seq), each pointing at this record.
    /// Live while any of its entries is queued. Compaction re-appends a live entry as a plain
    /// `Message`.
    GroupCopy(GROUP_COPY = 23) {
        /// The group.
        group: u64,
        /// Its place in the group's order.
        gseq: u64,
        /// `(device, mailbox seq)` of every entry.
        entries: Vec<(DeviceAddr, u64)>,
        /// The message as delivered.
        message: Message,
    }

    /// `user` (homed on this shard) joined (`joined` 1) or left (0) `group`: what
    /// `groups_per_user_max` counts. The last record per (user, group) wins; a join is live
    /// while it is the user's current one.
    GroupMembership(GROUP_MEMBERSHIP = 24) {
        /// The user.
        user: u64,
        /// The group.
        group: u64,
        /// 1 joined, 0 left.
        joined: u8,
    }
}

const _: () = assert!(
    tags_distinct_and_nonzero(TAGS),
    "two record kinds share a tag, or a kind uses tag 0"
);

const fn tags_distinct_and_nonzero(mut tags: &[u8]) -> bool {
    while let [first, rest @ ..] = tags {
        if *first == 0 {
            return false;
        }
        let mut others = rest;
        while let [other, more @ ..] = others {
            if *other == *first {
                return false;
            }
            others = more;
        }
        tags = rest;
    }
    true
}

/// The body lengths the format had when the table replaced the hand-written codec: a change
/// here is a change of the on-disk format (old logs would no longer decode).
const _: () = {
    assert!(body_len::MESSAGE.min == 49 && !body_len::MESSAGE.fixed);
    assert!(body_len::RECEIPT.min == 45 && body_len::RECEIPT.fixed);
    assert!(body_len::TOMBSTONE.min == 8 && body_len::TOMBSTONE.fixed);
    assert!(body_len::ACCOUNT.min == 50 && body_len::ACCOUNT.fixed);
    assert!(body_len::KEY_BINDING.min == 50 && body_len::KEY_BINDING.fixed);
    assert!(body_len::PREKEY_IDENTITY.min == 190 && body_len::PREKEY_IDENTITY.fixed);
    assert!(body_len::PREKEY_BATCH.min == 18 && !body_len::PREKEY_BATCH.fixed);
    assert!(PREKEY_BATCH_KEY_LEN == 36);
    assert!(body_len::PREKEY_CONSUMED.min == 14 && body_len::PREKEY_CONSUMED.fixed);
    assert!(body_len::DEDUP.min == 34 && body_len::DEDUP.fixed);
};

/// Body bytes of a `Message` before its payload.
const MESSAGE_FIXED_LEN: usize = body_len::MESSAGE.min;
/// Body bytes of a `PrekeyBatch` before its keys.
const PREKEY_BATCH_FIXED_LEN: usize = body_len::PREKEY_BATCH.min;
/// Body bytes of one key in a `PrekeyBatch`.
const PREKEY_BATCH_KEY_LEN: usize = <(u32, [u8; 32]) as LeField>::MIN_LEN;

/// Largest `Message` payload that can be encoded (the body must fit in [`MAX_BODY_LEN`]).
pub const MAX_PAYLOAD_LEN: usize = MAX_BODY_LEN - MESSAGE_FIXED_LEN;

/// Most one-time prekeys one `PrekeyBatch` record can hold (its body must fit in
/// [`MAX_BODY_LEN`]).
pub const MAX_PREKEY_BATCH_KEYS: usize =
    (MAX_BODY_LEN - PREKEY_BATCH_FIXED_LEN) / PREKEY_BATCH_KEY_LEN;

/// Why [`Record::decode`] could not make a record of a soundly framed body (its CRC checked
/// out: the bytes are what was written, by a writer that does not agree with this schema).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The tag is not one this version knows (a newer writer, or a reserved tag).
    #[error("unknown record tag {tag}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },
    /// The tag is known but the body does not have the shape of that variant.
    #[error("malformed record body for tag {tag}: {what}")]
    Malformed {
        /// The tag byte.
        tag: u8,
        /// What was wrong.
        what: &'static str,
    },
}

impl Encode for Record {
    fn tag(&self) -> u8 {
        Record::tag(self)
    }
    fn body_len(&self) -> usize {
        self.encoded_body_len()
    }
    fn encode_body(&self, out: &mut Vec<u8>) {
        self.put_body(out);
    }
}

/// What a record kind's body length may be: `min` bytes and more when some field is variable,
/// exactly `min` when all are fixed-size.
struct BodyLen {
    min: usize,
    fixed: bool,
}

impl BodyLen {
    /// Refuses a body that cannot be of this kind by its length alone (before any field is
    /// read: a fixed-size kind refuses every other length).
    fn check(&self, len: usize) -> Result<(), &'static str> {
        if self.fixed && len != self.min {
            Err("body length does not match the record kind")
        } else {
            Ok(())
        }
    }
}

/// A field of a record body: how one value is laid out on disk, little-endian.
trait LeField: Sized {
    /// Bytes every value takes: all of them for a fixed-size field, the length or count prefix
    /// for a variable one.
    const MIN_LEN: usize;
    /// Whether every value takes exactly [`LeField::MIN_LEN`] bytes.
    const FIXED: bool;
    /// Bytes this value takes.
    fn len(&self) -> usize {
        Self::MIN_LEN
    }
    /// Appends the value ([`LeField::len`] bytes).
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value; `Err(what)` when the body cannot hold it.
    fn take(r: &mut Reader<'_>) -> Result<Self, &'static str>;
}

/// Little-endian cursor over a record body; every read is checked.
struct Reader<'a> {
    /// The whole body: payloads are slices of it.
    body: &'a Bytes,
    /// What is left to read.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(body: &'a Bytes) -> Self {
        Reader { body, rest: body }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or("body too short")?;
        self.rest = rest;
        Ok(*head)
    }

    /// The next `n` bytes as a slice of the body (no copy).
    fn bytes(&mut self, n: usize) -> Result<Bytes, &'static str> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or("payload length exceeds the body")?;
        self.rest = rest;
        Ok(self.body.slice_ref(head))
    }

    /// A `u32` count of items of at least `item_len_min` bytes each, checked against the bytes
    /// left before the caller allocates for them.
    fn count(&mut self, item_len_min: usize) -> Result<usize, &'static str> {
        let count = u32::take(self)? as usize;
        match count.checked_mul(item_len_min) {
            Some(n) if n <= self.rest.len() => Ok(count),
            _ => Err("count exceeds what the body holds"),
        }
    }
}

macro_rules! le_int {
    ($($ty:ty),*) => {$(
        impl LeField for $ty {
            const MIN_LEN: usize = std::mem::size_of::<$ty>();
            const FIXED: bool = true;
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
                r.array().map(<$ty>::from_le_bytes)
            }
        }
    )*};
}

le_int!(u8, u16, u32, u64);

impl<const N: usize> LeField for [u8; N] {
    const MIN_LEN: usize = N;
    const FIXED: bool = true;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        r.array()
    }
}

/// A one-byte wire enum as its byte: any value decodes (unknown ones stay representable).
macro_rules! le_newtype {
    ($($ty:ident($inner:ty)),*) => {$(
        impl LeField for $ty {
            const MIN_LEN: usize = <$inner as LeField>::MIN_LEN;
            const FIXED: bool = true;
            fn put(&self, out: &mut Vec<u8>) {
                self.0.put(out);
            }
            fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
                <$inner>::take(r).map($ty)
            }
        }
    )*};
}

le_newtype!(MsgType(u8), ReceiptKind(u8));

/// A struct as its fields in the order listed (the compiler checks each type against the
/// struct's).
macro_rules! le_struct {
    ($( $(#[$meta:meta])* $ty:ident { $( $field:ident : $fty:ty ),* $(,)? } )*) => {$(
        $(#[$meta])*
        impl LeField for $ty {
            const MIN_LEN: usize = 0 $( + <$fty as LeField>::MIN_LEN )*;
            const FIXED: bool = true $( && <$fty as LeField>::FIXED )*;
            fn len(&self) -> usize {
                0 $( + <$fty as LeField>::len(&self.$field) )*
            }
            fn put(&self, out: &mut Vec<u8>) {
                $( <$fty as LeField>::put(&self.$field, out); )*
            }
            fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
                Ok($ty { $( $field: <$fty as LeField>::take(r)?, )* })
            }
        }
    )*};
}

le_struct! {
    /// `user u64, device u16`, little-endian (unlike the big-endian wire form of
    /// [`DeviceAddr::to_bytes`]).
    DeviceAddr { user: u64, device: u16 }
    /// As a `Message` record stored it before [`Message`] existed.
    Message {
        from: DeviceAddr,
        client_msg_id: u64,
        server_ts_ms: u64,
        msg_type: MsgType,
        payload: Bytes,
    }
    /// As a `Receipt` record stored it before [`ReceiptInfo`] existed.
    ReceiptInfo {
        from: DeviceAddr,
        client_msg_id: u64,
        kind: ReceiptKind,
        ts_ms: u64,
    }
}

/// An `id, key` pair (a one-time prekey in a `PrekeyBatch`).
impl<A: LeField, B: LeField> LeField for (A, B) {
    const MIN_LEN: usize = A::MIN_LEN + B::MIN_LEN;
    const FIXED: bool = A::FIXED && B::FIXED;
    fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        Ok((A::take(r)?, B::take(r)?))
    }
}

/// A payload: `len u32`, then the bytes (decoded as a slice of the body, no copy).
impl LeField for Bytes {
    const MIN_LEN: usize = 4;
    const FIXED: bool = false;
    fn len(&self) -> usize {
        4 + self.as_ref().len()
    }
    fn put(&self, out: &mut Vec<u8>) {
        // Bounded by MAX_BODY_LEN (asserted in `storage::frame::encode`), so it fits in u32.
        (self.as_ref().len() as u32).put(out);
        out.extend_from_slice(self);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        let len = u32::take(r)? as usize;
        r.bytes(len)
    }
}

/// A list: `count u32`, then the items. The count is checked against the bytes left before the
/// list is allocated.
impl<T: LeField> LeField for Vec<T> {
    const MIN_LEN: usize = 4;
    const FIXED: bool = false;
    fn len(&self) -> usize {
        4 + self.iter().map(T::len).sum::<usize>()
    }
    fn put(&self, out: &mut Vec<u8>) {
        // Bounded by MAX_BODY_LEN (asserted in `storage::frame::encode`), so it fits in u32.
        (self.as_slice().len() as u32).put(out);
        for item in self {
            item.put(out);
        }
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        // An item of no bytes would let any count through the check.
        const { assert!(T::MIN_LEN > 0) };
        let count = r.count(T::MIN_LEN)?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(T::take(r)?);
        }
        Ok(items)
    }
}

/// Recovered records decoded for [`Shard::recover`](crate::Shard::recover), and what could not
/// be decoded.
#[derive(Clone, Debug, Default)]
pub struct Decoded {
    /// Every decodable record, in log order, with its segment.
    pub records: Vec<(SegmentId, Record)>,
    /// Soundly framed records whose body this schema cannot decode (a newer writer, or a bug):
    /// skipped, logged, counted here.
    pub undecodable: Vec<Undecodable>,
}

/// A recovered record [`decode_recovered`] skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecodable {
    /// Its segment.
    pub segment: SegmentId,
    /// Byte offset of its frame in the segment.
    pub offset: u64,
    /// Why.
    pub error: DecodeError,
}

/// Decodes what recovery returned (`storage::Recovery::records`), in order. A body that does
/// not decode is skipped with a `WARN` line and listed in [`Decoded::undecodable`]; reading
/// goes on with the next record (its framing was sound, so nothing else is affected).
pub fn decode_recovered(raw: impl IntoIterator<Item = RawRecord>) -> Decoded {
    let mut out = Decoded::default();
    for r in raw {
        match Record::decode(r.tag, &r.body) {
            Ok(rec) => out.records.push((r.segment, rec)),
            Err(error) => {
                tracing::warn!(
                    segment = r.segment,
                    offset = r.offset,
                    %error,
                    "recovered record skipped: body does not decode"
                );
                out.undecodable.push(Undecodable {
                    segment: r.segment,
                    offset: r.offset,
                    error,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<(u64, u64, u16, u64, u16, u64, u64, u8)>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|((seq, tu, td, fu, fd, id, ts, mt), p)| Record::Message {
                    seq,
                    to: DeviceAddr::new(tu, td),
                    message: Message {
                        from: DeviceAddr::new(fu, fd),
                        client_msg_id: id,
                        server_ts_ms: ts,
                        msg_type: MsgType(mt),
                        payload: Bytes::from(p),
                    },
                }),
            any::<(u64, u64, u16, u64, u16, u64, u8, u64)>().prop_map(
                |(seq, tu, td, fu, fd, id, kind, ts)| Record::Receipt {
                    seq,
                    to: DeviceAddr::new(tu, td),
                    receipt: ReceiptInfo {
                        from: DeviceAddr::new(fu, fd),
                        client_msg_id: id,
                        kind: ReceiptKind(kind),
                        ts_ms: ts,
                    },
                }
            ),
            any::<u64>().prop_map(|seq| Record::Tombstone { seq }),
            any::<(u64, u16, [u8; 32], u64)>().prop_map(|(user, device, static_key, ts_ms)| {
                Record::Account {
                    user,
                    device,
                    static_key,
                    ts_ms,
                }
            }),
            any::<([u8; 32], u64, u16, u64)>().prop_map(|(static_key, user, device, ts_ms)| {
                Record::KeyBinding {
                    static_key,
                    user,
                    device,
                    ts_ms,
                }
            }),
            (
                any::<(u64, u16, [u8; 32], [u8; 32], u32, [u8; 32])>(),
                any::<([u8; 32], [u8; 32], u32, u64, u32)>()
            )
                .prop_map(
                    |(
                        (user, device, identity_dh, identity_sign, spk_id, signed_prekey),
                        (s1, s2, max, ts_ms, generation),
                    )| {
                        let mut signed_prekey_sig = [0u8; 64];
                        signed_prekey_sig[..32].copy_from_slice(&s1);
                        signed_prekey_sig[32..].copy_from_slice(&s2);
                        Record::PrekeyIdentity {
                            user,
                            device,
                            generation,
                            identity_dh,
                            identity_sign,
                            signed_prekey_id: spk_id,
                            signed_prekey,
                            signed_prekey_sig,
                            max_one_time_id: max,
                            ts_ms,
                        }
                    }
                ),
            (
                any::<(u64, u16, u32)>(),
                proptest::collection::vec(any::<(u32, [u8; 32])>(), 0..20)
            )
                .prop_map(|((user, device, generation), keys)| Record::PrekeyBatch {
                    user,
                    device,
                    generation,
                    keys
                }),
            any::<(u64, u16, u32)>().prop_map(|(user, device, id)| Record::PrekeyConsumed {
                user,
                device,
                id
            }),
            any::<(u64, u64, u16, u64, u64)>().prop_map(
                |(seq, from_user, from_device, client_msg_id, ts_ms)| Record::Dedup {
                    seq,
                    from: DeviceAddr::new(from_user, from_device),
                    client_msg_id,
                    ts_ms
                }
            ),
            (
                any::<(u64, u64, u16, u8, u64, u16, u64, u64)>(),
                proptest::collection::vec(any::<u8>(), 0..100)
            )
                .prop_map(|((seq, tu, td, copies, fu, fd, id, ts), p)| {
                    Record::MessageCopy {
                        seq,
                        to: DeviceAddr::new(tu, td),
                        copies,
                        message: Message {
                            from: DeviceAddr::new(fu, fd),
                            client_msg_id: id,
                            server_ts_ms: ts,
                            msg_type: MsgType(2),
                            payload: Bytes::from(p),
                        },
                    }
                }),
            any::<(u64, u16, u32, [u8; 32], [u8; 32], [u8; 32], u64)>().prop_map(
                |(user, device, version, static_key, identity_dh, identity_sign, linked_at_ms)| {
                    Record::Device {
                        user,
                        device,
                        version,
                        static_key,
                        identity_dh,
                        identity_sign,
                        signature: [7; 64],
                        linked_at_ms,
                    }
                }
            ),
            any::<(u64, u16, u32, u64)>().prop_map(|(user, device, version, ts_ms)| {
                Record::DeviceRemoved {
                    user,
                    device,
                    version,
                    ts_ms,
                }
            }),
            privacy_record(),
            arb_group_record(),
        ]
    }

    /// The presence records (tags 40-43).
    fn privacy_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            any::<(u64, u8, u8, u64)>().prop_map(|(user, last_seen, online, ts_ms)| {
                Record::PrivacySettings {
                    user,
                    last_seen,
                    online,
                    ts_ms,
                }
            }),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..50))
                .prop_map(|(user, users)| Record::Contacts { user, users }),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..50))
                .prop_map(|(user, users)| Record::Blocked { user, users }),
            proptest::collection::vec(any::<(u64, u64)>(), 0..50)
                .prop_map(|entries| Record::LastSeen { entries }),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            any::<(u64, u16, u64, u64, u8)>(),
            proptest::collection::vec(any::<u8>(), 0..100),
        )
            .prop_map(|((fu, fd, id, ts, mt), p)| Message {
                from: DeviceAddr::new(fu, fd),
                client_msg_id: id,
                server_ts_ms: ts,
                msg_type: MsgType(mt),
                payload: Bytes::from(p),
            })
    }

    /// The group records (tags 20–23).
    fn arb_group_record() -> impl Strategy<Value = Record> {
        let blob = || proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            (
                any::<(u64, u32, u64, u64, u64, u8, u64, u16, u8)>(),
                proptest::collection::vec(any::<u64>(), 0..8),
                proptest::collection::vec(any::<(u64, u8)>(), 0..8),
                blob(),
                blob(),
            )
                .prop_map(|(h, event_users, members, subject, description)| {
                    let (group, version, gseq, created_ms, changed_ms, flags, au, ad, op) = h;
                    Record::GroupState {
                        group,
                        version,
                        gseq,
                        created_ms,
                        changed_ms,
                        flags,
                        actor: DeviceAddr::new(au, ad),
                        op,
                        event_users,
                        members,
                        subject,
                        description,
                    }
                }),
            (any::<(u64, u64, u32)>(), arb_message()).prop_map(
                |((group, gseq, version), message)| {
                    Record::GroupMessage {
                        group,
                        gseq,
                        version,
                        message,
                    }
                }
            ),
            any::<(u64, u64)>().prop_map(|(group, gseq)| Record::GroupFanoutDone { group, gseq }),
            any::<(u64, u64, u8)>().prop_map(|(user, group, joined)| Record::GroupMembership {
                user,
                group,
                joined
            }),
            (
                any::<(u64, u64)>(),
                proptest::collection::vec(any::<(u64, u16, u64)>(), 0..8),
                arb_message()
            )
                .prop_map(|((group, gseq), e, message)| Record::GroupCopy {
                    group,
                    gseq,
                    entries: e
                        .into_iter()
                        .map(|(u, d, s)| (DeviceAddr::new(u, d), s))
                        .collect(),
                    message,
                }),
        ]
    }

    /// Frames `rec` as the journal would and reads it back through the framing.
    fn round(rec: &Record) -> Record {
        let mut buf = Vec::new();
        storage::frame::encode(rec, &mut buf);
        assert_eq!(buf.len(), storage::frame::encoded_len(rec));
        let f = storage::frame::decode_frame(&buf).unwrap();
        assert_eq!(f.len, buf.len());
        Record::decode(f.tag, &Bytes::copy_from_slice(f.body)).unwrap()
    }

    proptest! {
        #[test]
        fn round_trip(rec in arb_record()) {
            prop_assert_eq!(round(&rec), rec);
        }

        #[test]
        fn random_bodies_never_panic(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(tag, &Bytes::from(body));
        }

        /// Cutting a body short (or adding a byte) is always refused, never misread.
        #[test]
        fn wrong_length_bodies_are_refused(rec in arb_record(), cut in any::<prop::sample::Index>()) {
            let mut body = Vec::new();
            rec.encode_body(&mut body);
            let n = cut.index(body.len().max(1));
            let short = Bytes::copy_from_slice(&body[..n.min(body.len())]);
            if short.len() < body.len() {
                prop_assert!(Record::decode(rec.tag(), &short).is_err());
            }
            body.push(0);
            prop_assert!(Record::decode(rec.tag(), &Bytes::from(body)).is_err());
        }
    }

    #[test]
    fn unknown_tag_is_typed() {
        assert_eq!(
            Record::decode(200, &Bytes::from_static(&[1, 2, 3])),
            Err(DecodeError::UnknownTag { tag: 200 })
        );
        assert_eq!(
            Record::decode(0, &Bytes::new()),
            Err(DecodeError::UnknownTag { tag: 0 })
        );
    }

    #[test]
    fn wrong_body_shape_is_malformed() {
        for t in [
            tag::MESSAGE,
            tag::RECEIPT,
            tag::TOMBSTONE,
            tag::ACCOUNT,
            tag::KEY_BINDING,
            tag::PREKEY_IDENTITY,
            tag::PREKEY_BATCH,
            tag::PREKEY_CONSUMED,
        ] {
            let err = Record::decode(t, &Bytes::from_static(&[0u8; 7])).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        }
        // Message whose payload_len disagrees with the body.
        let mut body = vec![0u8; MESSAGE_FIXED_LEN];
        body[MESSAGE_FIXED_LEN - 4] = 5;
        let err = Record::decode(tag::MESSAGE, &Bytes::from(body)).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        // Trailing bytes after a fixed-size record.
        let err = Record::decode(tag::TOMBSTONE, &Bytes::from_static(&[0u8; 9])).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn prekey_batch_count_must_match_the_body() {
        // Claims 2 keys, carries 1 (the count is at offset 14).
        let mut body = vec![0u8; PREKEY_BATCH_FIXED_LEN + PREKEY_BATCH_KEY_LEN];
        body[14] = 2;
        let err = Record::decode(tag::PREKEY_BATCH, &Bytes::from(body)).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        // A huge count is refused before anything is allocated.
        let mut body = vec![0u8; PREKEY_BATCH_FIXED_LEN];
        body[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Record::decode(tag::PREKEY_BATCH, &Bytes::from(body.clone())).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        // Empty batch is fine.
        body[14..18].copy_from_slice(&0u32.to_le_bytes());
        let rec = Record::decode(tag::PREKEY_BATCH, &Bytes::from(body)).unwrap();
        assert_eq!(
            rec,
            Record::PrekeyBatch {
                user: 0,
                device: 0,
                generation: 0,
                keys: vec![]
            }
        );
    }

    #[test]
    fn known_encoding_of_a_prekey_consumed_marker() {
        let mut buf = Vec::new();
        storage::frame::encode(
            &Record::PrekeyConsumed {
                user: 0x0102,
                device: 3,
                id: 7,
            },
            &mut buf,
        );
        assert_eq!(buf.len(), storage::frame::RECORD_HEADER_LEN + 14);
        assert_eq!(buf[1], tag::PREKEY_CONSUMED);
        assert_eq!(&buf[14..], &[2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn known_encoding_of_a_dedup_marker() {
        let mut buf = Vec::new();
        let rec = Record::Dedup {
            seq: 5,
            from: DeviceAddr::new(0x0102, 3),
            client_msg_id: 9,
            ts_ms: 0x0a0b,
        };
        storage::frame::encode(&rec, &mut buf);
        assert_eq!(buf.len(), storage::frame::RECORD_HEADER_LEN + 34);
        assert_eq!(buf[1], tag::DEDUP);
        let body: [u8; 34] = [
            5, 0, 0, 0, 0, 0, 0, 0, // seq
            2, 1, 0, 0, 0, 0, 0, 0, // from_user
            3, 0, // from_device
            9, 0, 0, 0, 0, 0, 0, 0, // client_msg_id
            0x0b, 0x0a, 0, 0, 0, 0, 0, 0, // ts_ms
        ];
        assert_eq!(&buf[14..], &body);
    }

    /// The body of a message record, pinned field by field: seq, to_user, to_device,
    /// from_user, from_device, client_msg_id, ts_ms, msg_type, payload_len, payload.
    #[test]
    fn known_encoding_of_a_message() {
        let rec = Record::Message {
            seq: 0x0102,
            to: DeviceAddr::new(0x0304, 5),
            message: Message {
                from: DeviceAddr::new(0x0607, 8),
                client_msg_id: 0x090A,
                server_ts_ms: 0x0B0C,
                msg_type: MsgType(3),
                payload: Bytes::from_static(b"hi"),
            },
        };
        let mut buf = Vec::new();
        storage::frame::encode(&rec, &mut buf);
        assert_eq!(buf[1], tag::MESSAGE);
        #[rustfmt::skip]
        let body: &[u8] = &[
            2, 1, 0, 0, 0, 0, 0, 0,
            4, 3, 0, 0, 0, 0, 0, 0, 5, 0,
            7, 6, 0, 0, 0, 0, 0, 0, 8, 0,
            0x0A, 9, 0, 0, 0, 0, 0, 0,
            0x0C, 0x0B, 0, 0, 0, 0, 0, 0,
            3,
            2, 0, 0, 0, b'h', b'i',
        ];
        assert_eq!(&buf[storage::frame::RECORD_HEADER_LEN..], body);
        assert_eq!(
            Record::decode(tag::MESSAGE, &Bytes::from_static(body)),
            Ok(rec)
        );
    }

    /// The body of a receipt record, pinned field by field: seq, to_user, to_device,
    /// from_user, from_device, client_msg_id, kind, ts_ms.
    #[test]
    fn known_encoding_of_a_receipt() {
        let rec = Record::Receipt {
            seq: 0x0102,
            to: DeviceAddr::new(0x0304, 5),
            receipt: ReceiptInfo {
                from: DeviceAddr::new(0x0607, 8),
                client_msg_id: 0x090A,
                kind: ReceiptKind::READ,
                ts_ms: 0x0B0C,
            },
        };
        let mut buf = Vec::new();
        storage::frame::encode(&rec, &mut buf);
        assert_eq!(buf[1], tag::RECEIPT);
        #[rustfmt::skip]
        let body: &[u8] = &[
            2, 1, 0, 0, 0, 0, 0, 0,
            4, 3, 0, 0, 0, 0, 0, 0, 5, 0,
            7, 6, 0, 0, 0, 0, 0, 0, 8, 0,
            0x0A, 9, 0, 0, 0, 0, 0, 0,
            2,
            0x0C, 0x0B, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&buf[storage::frame::RECORD_HEADER_LEN..], body);
        assert_eq!(
            Record::decode(tag::RECEIPT, &Bytes::from_static(body)),
            Ok(rec)
        );
    }

    /// The bytes the journal wrote before the schema moved here, pinned: a tombstone.
    #[test]
    fn known_encoding_of_a_tombstone() {
        let mut buf = Vec::new();
        storage::frame::encode(&Record::Tombstone { seq: 0x0102 }, &mut buf);
        assert_eq!(buf.len(), storage::frame::RECORD_HEADER_LEN + 8);
        assert_eq!(buf[0], storage::frame::RECORD_MAGIC);
        assert_eq!(buf[1], tag::TOMBSTONE);
        assert_eq!(&buf[2..6], &8u32.to_le_bytes());
        assert_eq!(&buf[14..], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[6..10], &crc32c(&buf[14..]).to_le_bytes());
        assert_eq!(&buf[10..14], &crc32c(&buf[..10]).to_le_bytes());
    }

    /// CRC32C (Castagnoli), bitwise: enough to pin the header layout without a dependency.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn decode_recovered_skips_and_counts_undecodable_bodies() {
        let raw = |offset, tag, body: &[u8]| RawRecord {
            segment: 2,
            offset,
            tag,
            body: Bytes::copy_from_slice(body),
        };
        let d = decode_recovered([
            raw(16, tag::TOMBSTONE, &5u64.to_le_bytes()),
            raw(38, 77, &[1, 2]),
            raw(54, tag::TOMBSTONE, &[0; 3]),
            raw(71, tag::TOMBSTONE, &6u64.to_le_bytes()),
        ]);
        assert_eq!(
            d.records,
            vec![
                (2, Record::Tombstone { seq: 5 }),
                (2, Record::Tombstone { seq: 6 })
            ]
        );
        let skipped: Vec<_> = d
            .undecodable
            .iter()
            .map(|u| (u.segment, u.offset))
            .collect();
        assert_eq!(skipped, vec![(2, 38), (2, 54)]);
        assert_eq!(d.undecodable[0].error, DecodeError::UnknownTag { tag: 77 });
    }
}
