//! Outer record framing: `len: u16 big-endian` then `len` bytes.
//!
//! The decoder separates "need more bytes" (normal: wait for the socket) from "invalid"
//! (close the connection with an error code), in the manner of mini-redis' `Frame::check`.

use crate::ErrorCode;

/// Bytes of the length prefix.
pub const LEN_PREFIX_BYTES: usize = 2;

/// Largest record body a `u16` prefix can describe.
pub const RECORD_BODY_MAX: usize = u16::MAX as usize;

/// Bytes of the AES-GCM tag that ends every transport record.
pub const TAG_BYTES: usize = 16;

/// What [`check`] found at the front of a receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A whole record is present: the body is `buf[LEN_PREFIX_BYTES..total]`.
    Complete {
        /// Prefix plus body, in bytes.
        total: usize,
    },
    /// Not enough bytes yet; at least `needed` more must arrive.
    Incomplete {
        /// How many more bytes are needed at minimum.
        needed: usize,
    },
}

/// Why a record can never become valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix is larger than the configured maximum.
    #[error("record of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The announced body length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The length prefix is smaller than any valid record (a transport record carries at
    /// least a 16-byte tag and a 1-byte frame kind).
    #[error("record of {len} bytes is shorter than the minimum of {min}")]
    TooSmall {
        /// The announced body length.
        len: usize,
        /// The minimum.
        min: usize,
    },
}

impl WireError {
    /// The error code sent to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::TooSmall { .. } => ErrorCode::MalformedFrame,
        }
    }
}

/// Looks at the front of `buf` and says whether a whole record of at least `min_body` and at
/// most `max_body` bytes is there. Never reads past what it needs; never allocates.
pub fn check(buf: &[u8], min_body: usize, max_body: usize) -> Result<Check, WireError> {
    let Some(&[hi, lo]) = buf.get(..LEN_PREFIX_BYTES) else {
        return Ok(Check::Incomplete {
            needed: LEN_PREFIX_BYTES - buf.len(),
        });
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > max_body {
        return Err(WireError::TooLarge { len, max: max_body });
    }
    if len < min_body {
        return Err(WireError::TooSmall { len, min: min_body });
    }
    let total = LEN_PREFIX_BYTES + len;
    if buf.len() >= total {
        Ok(Check::Complete { total })
    } else {
        Ok(Check::Incomplete {
            needed: total - buf.len(),
        })
    }
}

/// Appends the length prefix for a body of `len` bytes.
///
/// # Panics
/// If `len` exceeds [`RECORD_BODY_MAX`]; callers bound frames by `max_frame_bytes` first.
pub fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u16::try_from(len).expect("record body bounded by max_frame_bytes <= 65535");
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_then_complete() {
        assert_eq!(check(&[], 1, 100), Ok(Check::Incomplete { needed: 2 }));
        assert_eq!(check(&[0], 1, 100), Ok(Check::Incomplete { needed: 1 }));
        assert_eq!(
            check(&[0, 3, 1], 1, 100),
            Ok(Check::Incomplete { needed: 2 })
        );
        assert_eq!(
            check(&[0, 3, 1, 2, 3, 9], 1, 100),
            Ok(Check::Complete { total: 5 })
        );
    }

    #[test]
    fn invalid_lengths() {
        assert_eq!(
            check(&[0xff, 0xff], 1, 100),
            Err(WireError::TooLarge {
                len: 65535,
                max: 100
            })
        );
        assert_eq!(
            check(&[0, 0], 1, 100),
            Err(WireError::TooSmall { len: 0, min: 1 })
        );
    }
}
