//! The records a shard persists: the schema of its log.
//!
//! The journal (`storage`) frames and checksums bytes; what a tag means and how a body is laid
//! out is decided here, beside the type ([`Record`], [`tag`], [`Record::decode`]). Encoding
//! reaches the journal through [`storage::Encode`]; recovery hands back
//! [`RawRecord`]s, which [`decode_recovered`] turns into records for [`Shard::recover`]
//! (reporting and counting bodies it cannot decode).
//!
//! Bodies are fixed little-endian fields per variant; trailing bytes are refused.
//!
//! [`Shard::recover`]: crate::Shard::recover

use bytes::Bytes;
use protocol::{DeviceAddr, Message, MsgType, ReceiptInfo, ReceiptKind};
use storage::frame::MAX_BODY_LEN;
use storage::{Encode, RawRecord, SegmentId};

/// One persisted record. Encoding/decoding lives beside it; every variant has a one-byte tag
/// on disk so later record kinds (prekeys, groups) can be added without a new format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message queued in a device's mailbox. On disk: `seq, to.user, to.device, from.user,
    /// from.device, client_msg_id, server_ts_ms, msg_type, payload_len u32, payload` (the
    /// layout predates [`Message`]; the fields are the same).
    Message {
        /// Mailbox sequence number, unique within the shard, increasing.
        seq: u64,
        /// The recipient device.
        to: DeviceAddr,
        /// The message as delivered; `server_ts_ms` is the accept time the TTL runs from.
        message: Message,
    },
    /// A receipt queued in a device's mailbox (for the original sender). On disk: `seq,
    /// to.user, to.device, from.user, from.device, client_msg_id, kind, ts_ms`.
    Receipt {
        /// Mailbox sequence number.
        seq: u64,
        /// Who gets the receipt (the original sender's device).
        to: DeviceAddr,
        /// The receipt as delivered. Any kind byte decodes (recovery drops unknown ones).
        receipt: ReceiptInfo,
    },
    /// The mailbox entry `seq` was delivered and acknowledged, or pruned: it is dead.
    Tombstone {
        /// The dead entry.
        seq: u64,
    },
    /// A device of a user and the static key it logs in with (home shard of `user`).
    Account {
        /// The user (phone number).
        user: u64,
        /// The device.
        device: u16,
        /// Its Noise static public key.
        static_key: [u8; 32],
        /// When bound.
        ts_ms: u64,
    },
    /// Reverse index: which (user, device) a static key is bound to (shard of hash(key)).
    KeyBinding {
        /// The Noise static public key.
        static_key: [u8; 32],
        /// Bound user.
        user: u64,
        /// Bound device.
        device: u16,
        /// When bound.
        ts_ms: u64,
    },
    /// A device's published end-to-end identity and signed prekey (home shard of `user`). The
    /// last one per device wins at recovery. `generation` counts identity changes of the device:
    /// one-time prekeys of an older generation belong to an identity that is gone.
    PrekeyIdentity {
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
    },
    /// One-time prekeys of a device, added to what it has (home shard of `user`).
    PrekeyBatch {
        /// The user.
        user: u64,
        /// The device.
        device: u16,
        /// The identity generation they belong to (see `PrekeyIdentity`).
        generation: u32,
        /// `(id, X25519 public key)` pairs.
        keys: Vec<(u32, [u8; 32])>,
    },
    /// One-time prekey `id` of a device was handed out in a bundle: it is gone for good.
    PrekeyConsumed {
        /// The user.
        user: u64,
        /// The device.
        device: u16,
        /// The one-time prekey id.
        id: u32,
    },
    /// What the sender dedup window remembers of a stored message whose own record may be
    /// gone: `(from_user, from_device, client_msg_id)` was stored as `seq` at `ts_ms`.
    /// Compaction writes one for every window entry remembered in the segment it empties, so
    /// the window outlives the segments of the messages it remembers.
    Dedup {
        /// The message's mailbox seq (orders the window: the newest seqs are kept).
        seq: u64,
        /// The sending device.
        from: DeviceAddr,
        /// Sender's message id.
        client_msg_id: u64,
        /// The server time the message was first stored with (a retry is answered with it).
        ts_ms: u64,
    },
}

/// Largest `Message` payload that can be encoded (the body must fit in [`MAX_BODY_LEN`]).
pub const MAX_PAYLOAD_LEN: usize = MAX_BODY_LEN - MESSAGE_FIXED_LEN;

/// On-disk tag byte of each record kind. `0` is never used; values not listed here are
/// reserved for later kinds (prekeys, groups, ...) and decode as [`DecodeError::UnknownTag`].
pub mod tag {
    /// [`Record::Message`](super::Record::Message).
    pub const MESSAGE: u8 = 1;
    /// [`Record::Receipt`](super::Record::Receipt).
    pub const RECEIPT: u8 = 2;
    /// [`Record::Tombstone`](super::Record::Tombstone).
    pub const TOMBSTONE: u8 = 3;
    /// [`Record::Account`](super::Record::Account).
    pub const ACCOUNT: u8 = 4;
    /// [`Record::KeyBinding`](super::Record::KeyBinding).
    pub const KEY_BINDING: u8 = 5;
    /// [`Record::PrekeyIdentity`](super::Record::PrekeyIdentity).
    pub const PREKEY_IDENTITY: u8 = 6;
    /// [`Record::PrekeyBatch`](super::Record::PrekeyBatch).
    pub const PREKEY_BATCH: u8 = 7;
    /// [`Record::PrekeyConsumed`](super::Record::PrekeyConsumed).
    pub const PREKEY_CONSUMED: u8 = 8;
    /// [`Record::Dedup`](super::Record::Dedup).
    pub const DEDUP: u8 = 9;
}

/// Body bytes of a `Message` before its payload: seq 8, to_user 8, to_device 2, from_user 8,
/// from_device 2, client_msg_id 8, ts_ms 8, msg_type 1, payload_len 4.
const MESSAGE_FIXED_LEN: usize = 8 + 8 + 2 + 8 + 2 + 8 + 8 + 1 + 4;
/// Body bytes of a `Receipt`.
const RECEIPT_LEN: usize = 8 + 8 + 2 + 8 + 2 + 8 + 1 + 8;
/// Body bytes of a `Tombstone`.
const TOMBSTONE_LEN: usize = 8;
/// Body bytes of an `Account`.
const ACCOUNT_LEN: usize = 8 + 2 + 32 + 8;
/// Body bytes of a `KeyBinding`.
const KEY_BINDING_LEN: usize = 32 + 8 + 2 + 8;
/// Body bytes of a `PrekeyIdentity`: user 8, device 2, generation 4, identity_dh 32,
/// identity_sign 32, signed_prekey_id 4, signed_prekey 32, signed_prekey_sig 64,
/// max_one_time_id 4, ts_ms 8.
const PREKEY_IDENTITY_LEN: usize = 8 + 2 + 4 + 32 + 32 + 4 + 32 + 64 + 4 + 8;
/// Body bytes of a `PrekeyBatch` before its keys: user 8, device 2, generation 4, count 4.
const PREKEY_BATCH_FIXED_LEN: usize = 8 + 2 + 4 + 4;
/// Body bytes of one key in a `PrekeyBatch`: id 4, key 32.
const PREKEY_BATCH_KEY_LEN: usize = 4 + 32;
/// Body bytes of a `PrekeyConsumed`: user 8, device 2, id 4.
const PREKEY_CONSUMED_LEN: usize = 8 + 2 + 4;
/// Body bytes of a `Dedup`: seq 8, from_user 8, from_device 2, client_msg_id 8, ts_ms 8.
const DEDUP_LEN: usize = 8 + 8 + 2 + 8 + 8;

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

impl Record {
    /// The on-disk tag byte of this record's kind (see [`tag`]).
    pub fn tag(&self) -> u8 {
        match self {
            Record::Message { .. } => tag::MESSAGE,
            Record::Receipt { .. } => tag::RECEIPT,
            Record::Tombstone { .. } => tag::TOMBSTONE,
            Record::Account { .. } => tag::ACCOUNT,
            Record::KeyBinding { .. } => tag::KEY_BINDING,
            Record::PrekeyIdentity { .. } => tag::PREKEY_IDENTITY,
            Record::PrekeyBatch { .. } => tag::PREKEY_BATCH,
            Record::PrekeyConsumed { .. } => tag::PREKEY_CONSUMED,
            Record::Dedup { .. } => tag::DEDUP,
        }
    }

    /// Length of the encoded body (without the frame header).
    pub fn encoded_body_len(&self) -> usize {
        match self {
            Record::Message { message, .. } => MESSAGE_FIXED_LEN + message.payload.len(),
            Record::Receipt { .. } => RECEIPT_LEN,
            Record::Tombstone { .. } => TOMBSTONE_LEN,
            Record::Account { .. } => ACCOUNT_LEN,
            Record::KeyBinding { .. } => KEY_BINDING_LEN,
            Record::PrekeyIdentity { .. } => PREKEY_IDENTITY_LEN,
            Record::PrekeyBatch { keys, .. } => {
                PREKEY_BATCH_FIXED_LEN + PREKEY_BATCH_KEY_LEN * keys.len()
            }
            Record::PrekeyConsumed { .. } => PREKEY_CONSUMED_LEN,
            Record::Dedup { .. } => DEDUP_LEN,
        }
    }

    /// Decodes a body written under `tag` (see [`tag`]). Never panics, for any input. A
    /// `Message` payload is a slice of `body` (no copy).
    pub fn decode(tag: u8, body: &Bytes) -> Result<Record, DecodeError> {
        decode_body(tag, body)
    }
}

impl Encode for Record {
    fn tag(&self) -> u8 {
        Record::tag(self)
    }
    fn body_len(&self) -> usize {
        self.encoded_body_len()
    }
    fn encode_body(&self, out: &mut Vec<u8>) {
        encode_body(self, out);
    }
}

fn encode_body(rec: &Record, out: &mut Vec<u8>) {
    match rec {
        Record::Message { seq, to, message } => {
            out.extend_from_slice(&seq.to_le_bytes());
            encode_addr(*to, out);
            encode_addr(message.from, out);
            out.extend_from_slice(&message.client_msg_id.to_le_bytes());
            out.extend_from_slice(&message.server_ts_ms.to_le_bytes());
            out.push(message.msg_type.0);
            // Bounded by MAX_BODY_LEN (asserted in `encode`), so it fits in u32.
            out.extend_from_slice(&(message.payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&message.payload);
        }
        Record::Receipt { seq, to, receipt } => {
            out.extend_from_slice(&seq.to_le_bytes());
            encode_addr(*to, out);
            encode_addr(receipt.from, out);
            out.extend_from_slice(&receipt.client_msg_id.to_le_bytes());
            out.push(receipt.kind.0);
            out.extend_from_slice(&receipt.ts_ms.to_le_bytes());
        }
        Record::Tombstone { seq } => {
            out.extend_from_slice(&seq.to_le_bytes());
        }
        Record::Account {
            user,
            device,
            static_key,
            ts_ms,
        } => {
            out.extend_from_slice(&user.to_le_bytes());
            out.extend_from_slice(&device.to_le_bytes());
            out.extend_from_slice(static_key);
            out.extend_from_slice(&ts_ms.to_le_bytes());
        }
        Record::KeyBinding {
            static_key,
            user,
            device,
            ts_ms,
        } => {
            out.extend_from_slice(static_key);
            out.extend_from_slice(&user.to_le_bytes());
            out.extend_from_slice(&device.to_le_bytes());
            out.extend_from_slice(&ts_ms.to_le_bytes());
        }
        Record::PrekeyIdentity {
            user,
            device,
            generation,
            identity_dh,
            identity_sign,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_sig,
            max_one_time_id,
            ts_ms,
        } => {
            out.extend_from_slice(&user.to_le_bytes());
            out.extend_from_slice(&device.to_le_bytes());
            out.extend_from_slice(&generation.to_le_bytes());
            out.extend_from_slice(identity_dh);
            out.extend_from_slice(identity_sign);
            out.extend_from_slice(&signed_prekey_id.to_le_bytes());
            out.extend_from_slice(signed_prekey);
            out.extend_from_slice(signed_prekey_sig);
            out.extend_from_slice(&max_one_time_id.to_le_bytes());
            out.extend_from_slice(&ts_ms.to_le_bytes());
        }
        Record::PrekeyBatch {
            user,
            device,
            generation,
            keys,
        } => {
            out.extend_from_slice(&user.to_le_bytes());
            out.extend_from_slice(&device.to_le_bytes());
            out.extend_from_slice(&generation.to_le_bytes());
            // Bounded by MAX_BODY_LEN (asserted in `encode`), so it fits in u32.
            out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for (id, key) in keys {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(key);
            }
        }
        Record::PrekeyConsumed { user, device, id } => {
            out.extend_from_slice(&user.to_le_bytes());
            out.extend_from_slice(&device.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Record::Dedup {
            seq,
            from,
            client_msg_id,
            ts_ms,
        } => {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&from.user.to_le_bytes());
            out.extend_from_slice(&from.device.to_le_bytes());
            out.extend_from_slice(&client_msg_id.to_le_bytes());
            out.extend_from_slice(&ts_ms.to_le_bytes());
        }
    }
}

/// A device as record bodies lay it out: `user u64, device u16`, little-endian (unlike the
/// big-endian wire form of [`DeviceAddr::to_bytes`]).
fn encode_addr(addr: DeviceAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&addr.user.to_le_bytes());
    out.extend_from_slice(&addr.device.to_le_bytes());
}

/// Little-endian cursor over a record body; every read is checked.
struct Cur<'a> {
    buf: &'a [u8],
}

impl<'a> Cur<'a> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    /// The counterpart of [`encode_addr`].
    fn addr(&mut self) -> Option<DeviceAddr> {
        Some(DeviceAddr::new(self.u64()?, self.u16()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
}

fn decode_body(tag: u8, body: &Bytes) -> Result<Record, DecodeError> {
    let malformed = |what| DecodeError::Malformed { tag, what };
    let exact = |expected: usize| {
        if body.len() == expected {
            Ok(())
        } else {
            Err(malformed("body length does not match the record kind"))
        }
    };
    let short = || malformed("body too short");
    let mut c = Cur { buf: body.as_ref() };
    let rec = match tag {
        tag::MESSAGE => {
            let seq = c.u64().ok_or_else(short)?;
            let to = c.addr().ok_or_else(short)?;
            let from = c.addr().ok_or_else(short)?;
            let client_msg_id = c.u64().ok_or_else(short)?;
            let server_ts_ms = c.u64().ok_or_else(short)?;
            let msg_type = MsgType(c.u8().ok_or_else(short)?);
            let payload_len = c.u32().ok_or_else(short)? as usize;
            if c.buf.len() != payload_len {
                return Err(malformed("payload length does not match the body length"));
            }
            let payload = c.bytes(payload_len).ok_or_else(short)?;
            let message = Message {
                from,
                client_msg_id,
                server_ts_ms,
                msg_type,
                payload: body.slice_ref(payload),
            };
            Record::Message { seq, to, message }
        }
        tag::RECEIPT => {
            exact(RECEIPT_LEN)?;
            Record::Receipt {
                seq: c.u64().ok_or_else(short)?,
                to: c.addr().ok_or_else(short)?,
                receipt: ReceiptInfo {
                    from: c.addr().ok_or_else(short)?,
                    client_msg_id: c.u64().ok_or_else(short)?,
                    kind: ReceiptKind(c.u8().ok_or_else(short)?),
                    ts_ms: c.u64().ok_or_else(short)?,
                },
            }
        }
        tag::TOMBSTONE => {
            exact(TOMBSTONE_LEN)?;
            Record::Tombstone {
                seq: c.u64().ok_or_else(short)?,
            }
        }
        tag::ACCOUNT => {
            exact(ACCOUNT_LEN)?;
            Record::Account {
                user: c.u64().ok_or_else(short)?,
                device: c.u16().ok_or_else(short)?,
                static_key: c.array::<32>().ok_or_else(short)?,
                ts_ms: c.u64().ok_or_else(short)?,
            }
        }
        tag::KEY_BINDING => {
            exact(KEY_BINDING_LEN)?;
            Record::KeyBinding {
                static_key: c.array::<32>().ok_or_else(short)?,
                user: c.u64().ok_or_else(short)?,
                device: c.u16().ok_or_else(short)?,
                ts_ms: c.u64().ok_or_else(short)?,
            }
        }
        tag::PREKEY_IDENTITY => {
            exact(PREKEY_IDENTITY_LEN)?;
            Record::PrekeyIdentity {
                user: c.u64().ok_or_else(short)?,
                device: c.u16().ok_or_else(short)?,
                generation: c.u32().ok_or_else(short)?,
                identity_dh: c.array::<32>().ok_or_else(short)?,
                identity_sign: c.array::<32>().ok_or_else(short)?,
                signed_prekey_id: c.u32().ok_or_else(short)?,
                signed_prekey: c.array::<32>().ok_or_else(short)?,
                signed_prekey_sig: c.array::<64>().ok_or_else(short)?,
                max_one_time_id: c.u32().ok_or_else(short)?,
                ts_ms: c.u64().ok_or_else(short)?,
            }
        }
        tag::PREKEY_BATCH => {
            let user = c.u64().ok_or_else(short)?;
            let device = c.u16().ok_or_else(short)?;
            let generation = c.u32().ok_or_else(short)?;
            let count = c.u32().ok_or_else(short)? as usize;
            // Checked against the bytes present before anything is allocated.
            if count.checked_mul(PREKEY_BATCH_KEY_LEN) != Some(c.buf.len()) {
                return Err(malformed("key count does not match the body length"));
            }
            let mut keys = Vec::with_capacity(count);
            for _ in 0..count {
                let id = c.u32().ok_or_else(short)?;
                let key = c.array::<32>().ok_or_else(short)?;
                keys.push((id, key));
            }
            Record::PrekeyBatch {
                user,
                device,
                generation,
                keys,
            }
        }
        tag::PREKEY_CONSUMED => {
            exact(PREKEY_CONSUMED_LEN)?;
            Record::PrekeyConsumed {
                user: c.u64().ok_or_else(short)?,
                device: c.u16().ok_or_else(short)?,
                id: c.u32().ok_or_else(short)?,
            }
        }
        tag::DEDUP => {
            exact(DEDUP_LEN)?;
            Record::Dedup {
                seq: c.u64().ok_or_else(short)?,
                from: c.addr().ok_or_else(short)?,
                client_msg_id: c.u64().ok_or_else(short)?,
                ts_ms: c.u64().ok_or_else(short)?,
            }
        }
        other => return Err(DecodeError::UnknownTag { tag: other }),
    };
    if !c.buf.is_empty() {
        return Err(malformed("trailing bytes after the fields"));
    }
    Ok(rec)
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
            Record::decode(42, &Bytes::from_static(&[1, 2, 3])),
            Err(DecodeError::UnknownTag { tag: 42 })
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
