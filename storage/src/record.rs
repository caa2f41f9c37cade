//! Records persisted in a shard's log.

use bytes::Bytes;

/// One persisted record. Encoding/decoding lives beside it; every variant has a one-byte tag
/// on disk so later record kinds (prekeys, groups) can be added without a new format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message queued in a device's mailbox.
    Message {
        /// Mailbox sequence number, unique within the shard, increasing.
        seq: u64,
        /// Recipient user.
        to_user: u64,
        /// Recipient device.
        to_device: u16,
        /// Sender user.
        from_user: u64,
        /// Sender device.
        from_device: u16,
        /// Sender's message id (dedup key with the sender).
        client_msg_id: u64,
        /// Server accept time, ms since the Unix epoch.
        ts_ms: u64,
        /// Message type (pruning priority).
        msg_type: u8,
        /// Opaque end-to-end ciphertext.
        payload: Bytes,
    },
    /// A receipt queued in a device's mailbox (for the original sender).
    Receipt {
        /// Mailbox sequence number.
        seq: u64,
        /// Who gets the receipt (the original sender).
        to_user: u64,
        /// Its device.
        to_device: u16,
        /// Who received/read the message.
        from_user: u64,
        /// Their device.
        from_device: u16,
        /// The original message id.
        client_msg_id: u64,
        /// 1 delivered, 2 read.
        kind: u8,
        /// When, ms since the Unix epoch.
        ts_ms: u64,
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
}

// ---------------------------------------------------------------------------------------------
// On-disk framing
// ---------------------------------------------------------------------------------------------
//
// One framed record:
//
// ```text
// offset  size  field
//      0     1  magic          RECORD_MAGIC (0xB5)
//      1     1  tag            record kind (see `tag`)
//      2     4  len            body length in bytes, u32 LE
//      6     4  body_crc       CRC32C of the body, u32 LE
//     10     4  header_crc     CRC32C of bytes 0..10, u32 LE
//     14   len  body           fixed little-endian fields of the variant
// ```
//
// The header has its own CRC so recovery can tell a damaged header (the length cannot be
// trusted: truncate the segment there) from a damaged body (the length is sound: skip exactly
// this record and carry on).

/// First byte of every framed record. Neither `0x00` nor `0xFF`, so zero-filled or erased
/// regions never look like a record.
pub const RECORD_MAGIC: u8 = 0xB5;

/// Bytes in a record header (magic, tag, len, body CRC, header CRC).
pub const RECORD_HEADER_LEN: usize = 14;

/// Largest body length a decoder accepts. A header that passes its CRC but claims more is
/// treated as a damaged header. Message payloads are bounded by the wire format (< 64 KiB),
/// far below this.
pub const MAX_BODY_LEN: usize = 16 << 20;

/// Largest `Message` payload [`encode`] accepts (the body must fit in [`MAX_BODY_LEN`]).
pub const MAX_PAYLOAD_LEN: usize = MAX_BODY_LEN - MESSAGE_FIXED_LEN;

/// On-disk tag byte of each record kind. `0` is never used; values not listed here are
/// reserved for later kinds (prekeys, groups, ...) and decode as [`RecordError::UnknownTag`].
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

/// Most one-time prekeys one `PrekeyBatch` record can hold (its body must fit in
/// [`MAX_BODY_LEN`]).
pub const MAX_PREKEY_BATCH_KEYS: usize =
    (MAX_BODY_LEN - PREKEY_BATCH_FIXED_LEN) / PREKEY_BATCH_KEY_LEN;

/// Why [`decode_one`] could not produce a record.
///
/// The variants fall in two groups, which is what recovery acts on:
///
/// * **header unusable** ([`Incomplete`](Self::Incomplete), [`BadMagic`](Self::BadMagic),
///   [`BadHeaderCrc`](Self::BadHeaderCrc), [`BodyTooLong`](Self::BodyTooLong)): the length
///   cannot be trusted or the bytes run out, so nothing after this point can be framed; a
///   segment is truncated here.
/// * **record unusable, framing sound** ([`BadBodyCrc`](Self::BadBodyCrc),
///   [`UnknownTag`](Self::UnknownTag), [`Malformed`](Self::Malformed)): `len` bytes can be
///   skipped and decoding continues with the next record. Use [`RecordError::skip_len`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The buffer ends before the header, or before the body the (sound) header announces.
    /// At the end of a segment this is a torn write.
    #[error("incomplete record: need {needed} bytes, have {available}")]
    Incomplete {
        /// Bytes the record needs (header, or header + body once the header is sound).
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// The first byte is not [`RECORD_MAGIC`]: not the start of a record.
    #[error("bad record magic {found:#04x}")]
    BadMagic {
        /// The byte found instead.
        found: u8,
    },
    /// The header CRC does not match: tag and length cannot be trusted.
    #[error("record header CRC mismatch")]
    BadHeaderCrc,
    /// The header is intact but announces a body larger than [`MAX_BODY_LEN`].
    #[error("record body length {body_len} exceeds the maximum {MAX_BODY_LEN}")]
    BodyTooLong {
        /// The announced body length.
        body_len: usize,
    },
    /// The header is sound but the body CRC does not match. `len` is the whole framed record
    /// length (header + body): skip that many bytes.
    #[error("record body CRC mismatch ({len} framed bytes)")]
    BadBodyCrc {
        /// Header + body length of the damaged record.
        len: usize,
    },
    /// Header and body CRCs are fine but the tag is not one this version knows (a newer
    /// writer, or a reserved tag). `len` is the whole framed length to skip.
    #[error("unknown record tag {tag} ({len} framed bytes)")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
        /// Header + body length of the record.
        len: usize,
    },
    /// Header and body CRCs are fine, the tag is known, but the body does not have the shape
    /// of that variant (wrong length). `len` is the whole framed length to skip.
    #[error("malformed record body for tag {tag}: {what} ({len} framed bytes)")]
    Malformed {
        /// The tag byte.
        tag: u8,
        /// What was wrong.
        what: &'static str,
        /// Header + body length of the record.
        len: usize,
    },
}

impl RecordError {
    /// For errors where the framing is sound (the record alone is unusable), the number of
    /// bytes to skip to reach the next record. `None` when the header itself is unusable and
    /// nothing after this point can be framed.
    pub fn skip_len(&self) -> Option<usize> {
        match self {
            RecordError::BadBodyCrc { len }
            | RecordError::UnknownTag { len, .. }
            | RecordError::Malformed { len, .. } => Some(*len),
            RecordError::Incomplete { .. }
            | RecordError::BadMagic { .. }
            | RecordError::BadHeaderCrc
            | RecordError::BodyTooLong { .. } => None,
        }
    }
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
        }
    }

    /// Length of the encoded body (without the header).
    fn body_len(&self) -> usize {
        match self {
            Record::Message { payload, .. } => MESSAGE_FIXED_LEN + payload.len(),
            Record::Receipt { .. } => RECEIPT_LEN,
            Record::Tombstone { .. } => TOMBSTONE_LEN,
            Record::Account { .. } => ACCOUNT_LEN,
            Record::KeyBinding { .. } => KEY_BINDING_LEN,
            Record::PrekeyIdentity { .. } => PREKEY_IDENTITY_LEN,
            Record::PrekeyBatch { keys, .. } => {
                PREKEY_BATCH_FIXED_LEN + PREKEY_BATCH_KEY_LEN * keys.len()
            }
            Record::PrekeyConsumed { .. } => PREKEY_CONSUMED_LEN,
        }
    }
}

/// Bytes [`encode`] appends for `rec`: header plus body.
pub fn encoded_len(rec: &Record) -> usize {
    RECORD_HEADER_LEN + rec.body_len()
}

/// Appends the framed encoding of `rec` (header + body, exactly [`encoded_len`] bytes) to
/// `out`.
///
/// # Panics
///
/// If a `Message` payload is longer than [`MAX_PAYLOAD_LEN`] (16 MiB minus a few bytes), or a
/// `PrekeyBatch` holds more than [`MAX_PREKEY_BATCH_KEYS`]. The wire format and the shard's
/// limits bound both far below that, so this is a caller bug.
pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let body_len = rec.body_len();
    assert!(
        body_len <= MAX_BODY_LEN,
        "record body of {body_len} bytes exceeds MAX_BODY_LEN"
    );
    out.reserve(RECORD_HEADER_LEN + body_len);
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    let body_start = out.len();
    encode_body(rec, out);
    debug_assert_eq!(out.len() - body_start, body_len);
    let body_crc = crc32c::crc32c(out.get(body_start..).unwrap_or(&[]));
    let header = make_header(rec.tag(), body_len as u32, body_crc);
    if let Some(h) = out.get_mut(start..body_start) {
        h.copy_from_slice(&header);
    }
}

/// Builds a record header for a body of `body_len` bytes with CRC `body_crc`.
fn make_header(tag: u8, body_len: u32, body_crc: u32) -> [u8; RECORD_HEADER_LEN] {
    let [l0, l1, l2, l3] = body_len.to_le_bytes();
    let [b0, b1, b2, b3] = body_crc.to_le_bytes();
    let pre = [RECORD_MAGIC, tag, l0, l1, l2, l3, b0, b1, b2, b3];
    let [h0, h1, h2, h3] = crc32c::crc32c(&pre).to_le_bytes();
    [
        RECORD_MAGIC,
        tag,
        l0,
        l1,
        l2,
        l3,
        b0,
        b1,
        b2,
        b3,
        h0,
        h1,
        h2,
        h3,
    ]
}

fn encode_body(rec: &Record, out: &mut Vec<u8>) {
    match rec {
        Record::Message {
            seq,
            to_user,
            to_device,
            from_user,
            from_device,
            client_msg_id,
            ts_ms,
            msg_type,
            payload,
        } => {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&to_user.to_le_bytes());
            out.extend_from_slice(&to_device.to_le_bytes());
            out.extend_from_slice(&from_user.to_le_bytes());
            out.extend_from_slice(&from_device.to_le_bytes());
            out.extend_from_slice(&client_msg_id.to_le_bytes());
            out.extend_from_slice(&ts_ms.to_le_bytes());
            out.push(*msg_type);
            // Bounded by MAX_BODY_LEN (asserted in `encode`), so it fits in u32.
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(payload);
        }
        Record::Receipt {
            seq,
            to_user,
            to_device,
            from_user,
            from_device,
            client_msg_id,
            kind,
            ts_ms,
        } => {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&to_user.to_le_bytes());
            out.extend_from_slice(&to_device.to_le_bytes());
            out.extend_from_slice(&from_user.to_le_bytes());
            out.extend_from_slice(&from_device.to_le_bytes());
            out.extend_from_slice(&client_msg_id.to_le_bytes());
            out.push(*kind);
            out.extend_from_slice(&ts_ms.to_le_bytes());
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
    }
}

/// Decodes the framed record at the start of `buf`.
///
/// Returns the record and the number of bytes it occupied (header + body). Never panics, for
/// any input. The checks run in this order: enough bytes for a header, magic, header CRC,
/// body length bound, enough bytes for the body, body CRC, tag, body shape.
pub fn decode_one(buf: &[u8]) -> Result<(Record, usize), RecordError> {
    let Some(&first) = buf.first() else {
        return Err(RecordError::Incomplete {
            needed: RECORD_HEADER_LEN,
            available: 0,
        });
    };
    if first != RECORD_MAGIC {
        return Err(RecordError::BadMagic { found: first });
    }
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER_LEN>() else {
        return Err(RecordError::Incomplete {
            needed: RECORD_HEADER_LEN,
            available: buf.len(),
        });
    };
    let [m, tag, l0, l1, l2, l3, b0, b1, b2, b3, h0, h1, h2, h3] = *header;
    let header_crc = u32::from_le_bytes([h0, h1, h2, h3]);
    if crc32c::crc32c(&[m, tag, l0, l1, l2, l3, b0, b1, b2, b3]) != header_crc {
        return Err(RecordError::BadHeaderCrc);
    }
    let body_len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(RecordError::BodyTooLong { body_len });
    }
    let len = RECORD_HEADER_LEN + body_len;
    let Some(body) = rest.get(..body_len) else {
        return Err(RecordError::Incomplete {
            needed: len,
            available: buf.len(),
        });
    };
    if crc32c::crc32c(body) != u32::from_le_bytes([b0, b1, b2, b3]) {
        return Err(RecordError::BadBodyCrc { len });
    }
    let rec = decode_body(tag, body, len)?;
    Ok((rec, len))
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
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
}

fn decode_body(tag: u8, body: &[u8], len: usize) -> Result<Record, RecordError> {
    let malformed = |what| RecordError::Malformed { tag, what, len };
    let exact = |expected: usize| {
        if body.len() == expected {
            Ok(())
        } else {
            Err(malformed("body length does not match the record kind"))
        }
    };
    let short = || malformed("body too short");
    let mut c = Cur { buf: body };
    let rec = match tag {
        tag::MESSAGE => {
            let seq = c.u64().ok_or_else(short)?;
            let to_user = c.u64().ok_or_else(short)?;
            let to_device = c.u16().ok_or_else(short)?;
            let from_user = c.u64().ok_or_else(short)?;
            let from_device = c.u16().ok_or_else(short)?;
            let client_msg_id = c.u64().ok_or_else(short)?;
            let ts_ms = c.u64().ok_or_else(short)?;
            let msg_type = c.u8().ok_or_else(short)?;
            let payload_len = c.u32().ok_or_else(short)? as usize;
            if c.buf.len() != payload_len {
                return Err(malformed("payload length does not match the body length"));
            }
            let payload = c.bytes(payload_len).ok_or_else(short)?;
            Record::Message {
                seq,
                to_user,
                to_device,
                from_user,
                from_device,
                client_msg_id,
                ts_ms,
                msg_type,
                payload: Bytes::copy_from_slice(payload),
            }
        }
        tag::RECEIPT => {
            exact(RECEIPT_LEN)?;
            Record::Receipt {
                seq: c.u64().ok_or_else(short)?,
                to_user: c.u64().ok_or_else(short)?,
                to_device: c.u16().ok_or_else(short)?,
                from_user: c.u64().ok_or_else(short)?,
                from_device: c.u16().ok_or_else(short)?,
                client_msg_id: c.u64().ok_or_else(short)?,
                kind: c.u8().ok_or_else(short)?,
                ts_ms: c.u64().ok_or_else(short)?,
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
        other => return Err(RecordError::UnknownTag { tag: other, len }),
    };
    if !c.buf.is_empty() {
        return Err(malformed("trailing bytes after the fields"));
    }
    Ok(rec)
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
                    to_user: tu,
                    to_device: td,
                    from_user: fu,
                    from_device: fd,
                    client_msg_id: id,
                    ts_ms: ts,
                    msg_type: mt,
                    payload: Bytes::from(p),
                }),
            any::<(u64, u64, u16, u64, u16, u64, u8, u64)>().prop_map(
                |(seq, tu, td, fu, fd, id, kind, ts)| Record::Receipt {
                    seq,
                    to_user: tu,
                    to_device: td,
                    from_user: fu,
                    from_device: fd,
                    client_msg_id: id,
                    kind,
                    ts_ms: ts,
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
        ]
    }

    proptest! {
        #[test]
        fn round_trip(rec in arb_record(), prefix in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = prefix.clone();
            encode(&rec, &mut buf);
            prop_assert_eq!(buf.len(), prefix.len() + encoded_len(&rec));
            let (back, n) = decode_one(&buf[prefix.len()..]).unwrap();
            prop_assert_eq!(n, encoded_len(&rec));
            prop_assert_eq!(back, rec);
        }

        #[test]
        fn round_trip_sequence(recs in proptest::collection::vec(arb_record(), 0..20)) {
            let mut buf = Vec::new();
            for r in &recs {
                encode(r, &mut buf);
            }
            let mut pos = 0;
            let mut out = Vec::new();
            while pos < buf.len() {
                let (r, n) = decode_one(&buf[pos..]).unwrap();
                out.push(r);
                pos += n;
            }
            prop_assert_eq!(out, recs);
        }

        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_one(&buf);
            // And with a plausible magic in front.
            let mut b = vec![RECORD_MAGIC];
            b.extend_from_slice(&buf);
            let _ = decode_one(&b);
        }

        #[test]
        fn every_prefix_is_incomplete(rec in arb_record()) {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            for cut in 0..buf.len() {
                let is_incomplete = matches!(decode_one(&buf[..cut]), Err(RecordError::Incomplete { .. }));
                prop_assert!(is_incomplete, "cut {}", cut);
            }
        }

        /// CRC32C detects every error burst of up to 32 bits, so changing any single byte is
        /// always caught, and classified by where it happened.
        #[test]
        fn single_byte_damage_is_detected_and_classified(
            rec in arb_record(),
            pos in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            let i = pos.index(buf.len());
            buf[i] ^= xor;
            let err = decode_one(&buf).unwrap_err();
            if i < RECORD_HEADER_LEN {
                let header_damage = matches!(
                    err,
                    RecordError::BadMagic { .. } | RecordError::BadHeaderCrc
                );
                prop_assert!(header_damage, "{:?}", err);
                prop_assert_eq!(err.skip_len(), None);
            } else {
                prop_assert_eq!(err.clone(), RecordError::BadBodyCrc { len: buf.len() });
                prop_assert_eq!(err.skip_len(), Some(buf.len()));
            }
        }
    }

    /// Frames an arbitrary body under an arbitrary tag with valid CRCs.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = make_header(tag, body.len() as u32, crc32c::crc32c(body)).to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn unknown_tag_is_typed_and_skippable() {
        let buf = frame(42, &[1, 2, 3]);
        let err = decode_one(&buf).unwrap_err();
        assert_eq!(err, RecordError::UnknownTag { tag: 42, len: 17 });
        assert_eq!(err.skip_len(), Some(17));
        let err = decode_one(&frame(0, &[])).unwrap_err();
        assert!(matches!(err, RecordError::UnknownTag { tag: 0, .. }));
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
            let buf = frame(t, &[0u8; 7]);
            let err = decode_one(&buf).unwrap_err();
            assert!(
                matches!(err, RecordError::Malformed { len: 21, .. }),
                "{err:?}"
            );
        }
        // Message whose payload_len disagrees with the body.
        let mut body = vec![0u8; MESSAGE_FIXED_LEN];
        body[MESSAGE_FIXED_LEN - 4] = 5;
        let err = decode_one(&frame(tag::MESSAGE, &body)).unwrap_err();
        assert!(matches!(err, RecordError::Malformed { .. }), "{err:?}");
        // Trailing bytes after a fixed-size record.
        let err = decode_one(&frame(tag::TOMBSTONE, &[0u8; 9])).unwrap_err();
        assert!(matches!(err, RecordError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn prekey_batch_count_must_match_the_body() {
        // Claims 2 keys, carries 1 (the count is at offset 14).
        let mut body = vec![0u8; PREKEY_BATCH_FIXED_LEN + PREKEY_BATCH_KEY_LEN];
        body[14] = 2;
        let err = decode_one(&frame(tag::PREKEY_BATCH, &body)).unwrap_err();
        assert!(matches!(err, RecordError::Malformed { .. }), "{err:?}");
        // A huge count is refused before anything is allocated.
        let mut body = vec![0u8; PREKEY_BATCH_FIXED_LEN];
        body[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_one(&frame(tag::PREKEY_BATCH, &body)).unwrap_err();
        assert!(matches!(err, RecordError::Malformed { .. }), "{err:?}");
        // Empty batch is fine.
        body[14..18].copy_from_slice(&0u32.to_le_bytes());
        let (rec, _) = decode_one(&frame(tag::PREKEY_BATCH, &body)).unwrap();
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
        encode(
            &Record::PrekeyConsumed {
                user: 0x0102,
                device: 3,
                id: 7,
            },
            &mut buf,
        );
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 14);
        assert_eq!(buf[1], tag::PREKEY_CONSUMED);
        assert_eq!(&buf[14..], &[2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn too_long_body_is_header_damage() {
        let mut h = make_header(tag::MESSAGE, (MAX_BODY_LEN + 1) as u32, 0).to_vec();
        h.extend_from_slice(&[0; 8]);
        let err = decode_one(&h).unwrap_err();
        assert!(matches!(err, RecordError::BodyTooLong { .. }));
        assert_eq!(err.skip_len(), None);
    }

    #[test]
    fn zeroes_and_ones_are_not_records() {
        assert!(matches!(
            decode_one(&[0u8; 64]),
            Err(RecordError::BadMagic { found: 0 })
        ));
        assert!(matches!(
            decode_one(&[0xFFu8; 64]),
            Err(RecordError::BadMagic { found: 0xFF })
        ));
    }

    #[test]
    fn known_encoding_of_a_tombstone() {
        let mut buf = Vec::new();
        encode(&Record::Tombstone { seq: 0x0102 }, &mut buf);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 8);
        assert_eq!(buf[0], RECORD_MAGIC);
        assert_eq!(buf[1], tag::TOMBSTONE);
        assert_eq!(&buf[2..6], &8u32.to_le_bytes());
        assert_eq!(&buf[14..], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[6..10], &crc32c::crc32c(&buf[14..]).to_le_bytes());
        assert_eq!(&buf[10..14], &crc32c::crc32c(&buf[..10]).to_le_bytes());
    }
}
