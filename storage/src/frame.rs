//! Record framing: how one record's bytes sit in a segment, independent of what they mean.
//!
//! The journal knows tags and bodies, never record kinds: the schema (which tag means what, how
//! a body is laid out) belongs to the crate that appends, through [`Encode`], and decodes what
//! recovery hands back as [`RawRecord`](crate::RawRecord)s.
//!
//! One framed record:
//!
//! ```text
//! offset  size  field
//!      0     1  magic          RECORD_MAGIC (0xB5)
//!      1     1  tag            record kind, chosen by the schema owner
//!      2     4  len            body length in bytes, u32 LE
//!      6     4  body_crc       CRC32C of the body, u32 LE
//!     10     4  header_crc     CRC32C of bytes 0..10, u32 LE
//!     14   len  body           opaque to this crate
//! ```
//!
//! The header has its own CRC so recovery can tell a damaged header (the length cannot be
//! trusted: resynchronise or truncate) from a damaged body (the length is sound: skip exactly
//! this record and carry on).

use crate::Encode;

/// First byte of every framed record. Neither `0x00` nor `0xFF`, so zero-filled or erased
/// regions never look like a record.
pub const RECORD_MAGIC: u8 = 0xB5;

/// Bytes in a record header (magic, tag, len, body CRC, header CRC).
pub const RECORD_HEADER_LEN: usize = 14;

/// Largest body length a decoder accepts. A header that passes its CRC but claims more is
/// treated as a damaged header.
pub const MAX_BODY_LEN: usize = 16 << 20;

/// A framed record found at the start of a buffer: its tag and body, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The tag byte.
    pub tag: u8,
    /// The body (its CRC checked).
    pub body: &'a [u8],
    /// Header + body length: where the next record starts.
    pub len: usize,
}

/// Why [`decode_frame`] found no record.
///
/// The variants fall in two groups, which is what recovery acts on:
///
/// * **header unusable** ([`Incomplete`](Self::Incomplete), [`BadMagic`](Self::BadMagic),
///   [`BadHeaderCrc`](Self::BadHeaderCrc), [`BodyTooLong`](Self::BodyTooLong)): the length
///   cannot be trusted or the bytes run out; [`FrameError::skip_len`] is `None`.
/// * **body unusable, framing sound** ([`BadBodyCrc`](Self::BadBodyCrc)): `len` bytes can be
///   skipped and decoding continues with the next record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The buffer ends before the header, or before the body the (sound) header announces.
    /// At the end of a segment this is a torn write.
    #[error("incomplete record: need {needed} bytes, have {available}")]
    Incomplete {
        /// Bytes the record needs (header, or header + body once the header is sound).
        needed: usize,
        /// Bytes that were available.
        available: usize,
        /// Whether the header checked out (only the body is missing): then the header's
        /// length says the rest of the buffer belongs to this record.
        header_sound: bool,
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
}

impl FrameError {
    /// For errors where the framing is sound (the body alone is unusable), the number of bytes
    /// to skip to reach the next record. `None` when the header itself is unusable.
    pub fn skip_len(&self) -> Option<usize> {
        match self {
            FrameError::BadBodyCrc { len } => Some(*len),
            FrameError::Incomplete { .. }
            | FrameError::BadMagic { .. }
            | FrameError::BadHeaderCrc
            | FrameError::BodyTooLong { .. } => None,
        }
    }
}

/// Bytes [`encode`] appends for `rec`: header plus body.
pub fn encoded_len(rec: &dyn Encode) -> usize {
    RECORD_HEADER_LEN + rec.body_len()
}

/// Appends the framed encoding of `rec` (header + body, exactly [`encoded_len`] bytes) to
/// `out`.
///
/// # Panics
///
/// If the body is longer than [`MAX_BODY_LEN`], or `encode_body` writes a different number of
/// bytes than `body_len` announced: both are bugs of the schema owner (its limits keep bodies
/// far below 16 MiB).
pub fn encode(rec: &dyn Encode, out: &mut Vec<u8>) {
    let body_len = rec.body_len();
    assert!(
        body_len <= MAX_BODY_LEN,
        "record body of {body_len} bytes exceeds MAX_BODY_LEN"
    );
    out.reserve(RECORD_HEADER_LEN + body_len);
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    let body_start = out.len();
    rec.encode_body(out);
    assert_eq!(
        out.len() - body_start,
        body_len,
        "encode_body wrote a different length than body_len announced"
    );
    let body_crc = crc32c::crc32c(out.get(body_start..).unwrap_or(&[]));
    // Bounded by MAX_BODY_LEN (asserted above), so it fits in u32.
    let header = make_header(rec.tag(), body_len as u32, body_crc);
    if let Some(h) = out.get_mut(start..body_start) {
        h.copy_from_slice(&header);
    }
}

/// Appends a framed record with `tag` and `body` to `out` (for tools and tests that hold raw
/// bytes rather than a schema type).
///
/// # Panics
///
/// If `body` is longer than [`MAX_BODY_LEN`].
pub fn encode_raw(tag: u8, body: &[u8], out: &mut Vec<u8>) {
    encode(&RawBody { tag, body }, out);
}

struct RawBody<'a> {
    tag: u8,
    body: &'a [u8],
}

impl Encode for RawBody<'_> {
    fn tag(&self) -> u8 {
        self.tag
    }
    fn body_len(&self) -> usize {
        self.body.len()
    }
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.body);
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

/// Decodes the framed record at the start of `buf`.
///
/// Never panics, for any input. The checks run in this order: magic, enough bytes for a
/// header, header CRC, body length bound, enough bytes for the body, body CRC. What the tag and
/// body mean is not checked here.
pub fn decode_frame(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    let Some(&first) = buf.first() else {
        return Err(FrameError::Incomplete {
            needed: RECORD_HEADER_LEN,
            available: 0,
            header_sound: false,
        });
    };
    if first != RECORD_MAGIC {
        return Err(FrameError::BadMagic { found: first });
    }
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER_LEN>() else {
        return Err(FrameError::Incomplete {
            needed: RECORD_HEADER_LEN,
            available: buf.len(),
            header_sound: false,
        });
    };
    let [m, tag, l0, l1, l2, l3, b0, b1, b2, b3, h0, h1, h2, h3] = *header;
    let header_crc = u32::from_le_bytes([h0, h1, h2, h3]);
    if crc32c::crc32c(&[m, tag, l0, l1, l2, l3, b0, b1, b2, b3]) != header_crc {
        return Err(FrameError::BadHeaderCrc);
    }
    let body_len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(FrameError::BodyTooLong { body_len });
    }
    let len = RECORD_HEADER_LEN + body_len;
    let Some(body) = rest.get(..body_len) else {
        return Err(FrameError::Incomplete {
            needed: len,
            available: buf.len(),
            header_sound: true,
        });
    };
    if crc32c::crc32c(body) != u32::from_le_bytes([b0, b1, b2, b3]) {
        return Err(FrameError::BadBodyCrc { len });
    }
    Ok(Frame { tag, body, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(
            tag in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            prefix in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut buf = prefix.clone();
            encode_raw(tag, &body, &mut buf);
            prop_assert_eq!(buf.len(), prefix.len() + RECORD_HEADER_LEN + body.len());
            let f = decode_frame(&buf[prefix.len()..]).unwrap();
            prop_assert_eq!(f, Frame { tag, body: &body, len: RECORD_HEADER_LEN + body.len() });
        }

        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&buf);
            // And with a plausible magic in front.
            let mut b = vec![RECORD_MAGIC];
            b.extend_from_slice(&buf);
            let _ = decode_frame(&b);
        }

        #[test]
        fn every_prefix_is_incomplete(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = Vec::new();
            encode_raw(tag, &body, &mut buf);
            for cut in 0..buf.len() {
                let is_incomplete = matches!(decode_frame(&buf[..cut]), Err(FrameError::Incomplete { .. }));
                prop_assert!(is_incomplete, "cut {}", cut);
            }
        }

        /// CRC32C detects every error burst of up to 32 bits, so changing any single byte is
        /// always caught, and classified by where it happened.
        #[test]
        fn single_byte_damage_is_detected_and_classified(
            tag in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..100),
            pos in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut buf = Vec::new();
            encode_raw(tag, &body, &mut buf);
            let i = pos.index(buf.len());
            buf[i] ^= xor;
            let err = decode_frame(&buf).unwrap_err();
            if i < RECORD_HEADER_LEN {
                let header_damage = matches!(
                    err,
                    FrameError::BadMagic { .. } | FrameError::BadHeaderCrc
                );
                prop_assert!(header_damage, "{:?}", err);
                prop_assert_eq!(err.skip_len(), None);
            } else {
                prop_assert_eq!(err.clone(), FrameError::BadBodyCrc { len: buf.len() });
                prop_assert_eq!(err.skip_len(), Some(buf.len()));
            }
        }
    }

    #[test]
    fn too_long_body_is_header_damage() {
        let mut h = make_header(1, (MAX_BODY_LEN + 1) as u32, 0).to_vec();
        h.extend_from_slice(&[0; 8]);
        let err = decode_frame(&h).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLong { .. }));
        assert_eq!(err.skip_len(), None);
    }

    #[test]
    fn zeroes_and_ones_are_not_records() {
        assert!(matches!(
            decode_frame(&[0u8; 64]),
            Err(FrameError::BadMagic { found: 0 })
        ));
        assert!(matches!(
            decode_frame(&[0xFFu8; 64]),
            Err(FrameError::BadMagic { found: 0xFF })
        ));
    }

    /// The byte layout, pinned: a tag-3 record with an 8-byte body.
    #[test]
    fn known_encoding() {
        let mut buf = Vec::new();
        encode_raw(3, &[2, 1, 0, 0, 0, 0, 0, 0], &mut buf);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 8);
        assert_eq!(buf[0], RECORD_MAGIC);
        assert_eq!(buf[1], 3);
        assert_eq!(&buf[2..6], &8u32.to_le_bytes());
        assert_eq!(&buf[14..], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[6..10], &crc32c::crc32c(&buf[14..]).to_le_bytes());
        assert_eq!(&buf[10..14], &crc32c::crc32c(&buf[..10]).to_le_bytes());
    }

    #[test]
    #[should_panic(expected = "different length")]
    fn lying_body_len_is_caught() {
        struct Liar;
        impl Encode for Liar {
            fn tag(&self) -> u8 {
                1
            }
            fn body_len(&self) -> usize {
                4
            }
            fn encode_body(&self, out: &mut Vec<u8>) {
                out.push(0);
            }
        }
        encode(&Liar, &mut Vec::new());
    }
}
