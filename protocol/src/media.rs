//! Media: the classes a slot is asked for, and the signed tokens of the HTTP media endpoint.
//!
//! A client asks its home shard for an upload slot (`MediaSlotRequest`: size, ciphertext
//! SHA-256, class); the answer carries an upload URL whose last path segment is a [`Token`].
//! The HTTP endpoint (`media_addr`) trusts nothing but the token: it names the user, the slot,
//! the exact size and hash the body must have, and when it stops being valid, under an
//! HMAC-SHA256 by a secret only the server holds (`<data_dir>/media.key`). Download URLs carry
//! a token of the same shape with [`TokenOp::DOWNLOAD`].
//!
//! Token bytes (99, all integers big-endian), sent as unpadded base64url (132 characters):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 1 | `version` = 1 |
//! | 1 | 1 | `op`: 1 upload, 2 download |
//! | 2 | 8 | `user` |
//! | 10 | 8 | `slot_id` (0 in a download token) |
//! | 18 | 8 | `size` in bytes (0 in a download token) |
//! | 26 | 32 | `sha256` of the ciphertext |
//! | 58 | 8 | `expires_at_s`, Unix seconds |
//! | 66 | 1 | `class` (0 in a download token) |
//! | 67 | 32 | `mac` = HMAC-SHA256(secret, `"SWB-MEDIA-TOKEN-1"` ‖ bytes 0..67) |

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::addr::UserId;

wire_enum! {
    /// The kind of media a slot is for; each has its own size limit on the server.
    pub struct MediaClass(u8) {
        /// A picture (`media_image_bytes_max`, 16 MiB by default).
        IMAGE = 1,
        /// A video (`media_video_bytes_max`, 100 MiB by default).
        VIDEO = 2,
        /// A voice note or audio file (`media_audio_bytes_max`).
        AUDIO = 3,
        /// Any other file (`media_document_bytes_max`).
        DOCUMENT = 4,
    }
}

// Only the known classes decode (another byte is a malformed frame).
known_u8_field!(MediaClass, "media class");

wire_enum! {
    /// What a token allows.
    pub struct TokenOp(u8) {
        /// `PUT`/`HEAD /v1/upload/<token>`.
        UPLOAD = 1,
        /// `GET`/`HEAD /v1/blob/<token>`.
        DOWNLOAD = 2,
    }
}

/// Bytes of a token before base64url.
pub const TOKEN_BYTES: usize = 99;
/// Bytes covered by the MAC (everything before it).
pub const TOKEN_SIGNED_BYTES: usize = 67;
/// Characters of a token in base64url without padding.
pub const TOKEN_TEXT_BYTES: usize = 132;
/// The token format's version byte.
pub const TOKEN_VERSION: u8 = 1;
/// Domain separation prefix of the MAC input.
pub const TOKEN_MAC_DOMAIN: &[u8] = b"SWB-MEDIA-TOKEN-1";

/// The fields of a media token (see the module doc for the bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token {
    /// What it allows.
    pub op: TokenOp,
    /// The user it was issued to.
    pub user: UserId,
    /// The upload slot (unique per user); 0 for a download.
    pub slot_id: u64,
    /// Exact ciphertext size the upload must have; 0 for a download.
    pub size: u64,
    /// SHA-256 of the ciphertext: the blob's name in the store.
    pub sha256: [u8; 32],
    /// Unix seconds after which the token is refused.
    pub expires_at_s: u64,
    /// The slot's class; 0 for a download.
    pub class: MediaClass,
}

/// Why a token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not 132 base64url characters, or the decoded bytes are not a token of this version.
    #[error("malformed token")]
    Malformed,
    /// The MAC does not verify under this server's secret (forged or altered).
    #[error("token signature does not verify")]
    BadMac,
    /// Past its `expires_at_s`.
    #[error("token expired")]
    Expired,
    /// A download token used to upload, or the other way round.
    #[error("token not valid for this operation")]
    WrongOp,
}

fn mac(secret: &[u8; 32], signed: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for 32 bytes.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(TOKEN_MAC_DOMAIN);
    m.update(signed);
    m
}

impl Token {
    /// The signed bytes (before the MAC).
    pub fn signed_bytes(&self) -> [u8; TOKEN_SIGNED_BYTES] {
        let mut b = [0u8; TOKEN_SIGNED_BYTES];
        let mut w = Writer { buf: &mut b, at: 0 };
        w.put(&[TOKEN_VERSION, self.op.0]);
        w.put(&self.user.to_be_bytes());
        w.put(&self.slot_id.to_be_bytes());
        w.put(&self.size.to_be_bytes());
        w.put(&self.sha256);
        w.put(&self.expires_at_s.to_be_bytes());
        w.put(&[self.class.0]);
        debug_assert_eq!(w.at, TOKEN_SIGNED_BYTES);
        b
    }

    /// The whole token, MAC included.
    pub fn to_bytes(&self, secret: &[u8; 32]) -> [u8; TOKEN_BYTES] {
        let signed = self.signed_bytes();
        let tag = mac(secret, &signed).finalize().into_bytes();
        let mut b = [0u8; TOKEN_BYTES];
        let mut w = Writer { buf: &mut b, at: 0 };
        w.put(&signed);
        w.put(&tag);
        b
    }

    /// The token as it appears in a URL (unpadded base64url, [`TOKEN_TEXT_BYTES`] characters).
    pub fn to_text(&self, secret: &[u8; 32]) -> String {
        URL_SAFE_NO_PAD.encode(self.to_bytes(secret))
    }

    /// Parses a token's text without checking its MAC or expiry (the fuzzed surface).
    pub fn parse(text: &str) -> Result<(Token, [u8; 32]), TokenError> {
        if text.len() != TOKEN_TEXT_BYTES {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| TokenError::Malformed)?;
        let bytes: [u8; TOKEN_BYTES] = bytes.try_into().map_err(|_| TokenError::Malformed)?;
        let mut r = Reader { buf: &bytes, at: 0 };
        let [version, op] = r.take::<2>();
        if version != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let op = TokenOp(op);
        if !op.is_known() {
            return Err(TokenError::Malformed);
        }
        let user = u64::from_be_bytes(r.take());
        let slot_id = u64::from_be_bytes(r.take());
        let size = u64::from_be_bytes(r.take());
        let sha256 = r.take::<32>();
        let expires_at_s = u64::from_be_bytes(r.take());
        let [class] = r.take::<1>();
        let class = MediaClass(class);
        let tag = r.take::<32>();
        let token = Token {
            op,
            user,
            slot_id,
            size,
            sha256,
            expires_at_s,
            class,
        };
        // Re-encoding must give the same bytes: no field has a second spelling.
        let valid = match op {
            TokenOp::UPLOAD => class.is_known(),
            _ => class.0 == 0 && slot_id == 0 && size == 0,
        };
        if !valid {
            return Err(TokenError::Malformed);
        }
        Ok((token, tag))
    }

    /// Parses and checks a token: its MAC under `secret` (constant time), that it allows `op`,
    /// and that `now_s` is not past its expiry.
    pub fn verify(
        text: &str,
        secret: &[u8; 32],
        op: TokenOp,
        now_s: u64,
    ) -> Result<Token, TokenError> {
        let (token, tag) = Self::parse(text)?;
        mac(secret, &token.signed_bytes())
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadMac)?;
        if token.op != op {
            return Err(TokenError::WrongOp);
        }
        if now_s > token.expires_at_s {
            return Err(TokenError::Expired);
        }
        Ok(token)
    }
}

/// Sequential writes into a fixed buffer whose size the caller computed.
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.at..self.at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.at += bytes.len();
    }
}

/// Sequential fixed-size reads from a buffer whose length the caller checked.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token() -> impl Strategy<Value = Token> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            1u8..=4,
        )
            .prop_map(|(user, slot_id, size, sha256, expires_at_s, class)| Token {
                op: TokenOp::UPLOAD,
                user,
                slot_id,
                size,
                sha256,
                expires_at_s,
                class: MediaClass(class),
            })
    }

    proptest! {
        #[test]
        fn tokens_round_trip_and_any_flipped_bit_is_refused(t in token(), bit in 0usize..TOKEN_BYTES * 8) {
            let secret = [7u8; 32];
            let text = t.to_text(&secret);
            prop_assert_eq!(text.len(), TOKEN_TEXT_BYTES);
            prop_assert_eq!(Token::verify(&text, &secret, TokenOp::UPLOAD, 0), Ok(t));
            let mut bytes = t.to_bytes(&secret);
            if let Some(b) = bytes.get_mut(bit / 8) {
                *b ^= 1 << (bit % 8);
            }
            let forged = URL_SAFE_NO_PAD.encode(bytes);
            prop_assert!(Token::verify(&forged, &secret, TokenOp::UPLOAD, 0).is_err());
        }

        #[test]
        fn parse_never_panics(text in "[A-Za-z0-9_-]{0,140}") {
            let _ = Token::parse(&text);
        }
    }

    #[test]
    fn expired_wrong_op_and_other_secret_are_refused() {
        let t = Token {
            op: TokenOp::UPLOAD,
            user: 1,
            slot_id: 2,
            size: 3,
            sha256: [4; 32],
            expires_at_s: 100,
            class: MediaClass::IMAGE,
        };
        let text = t.to_text(&[1; 32]);
        assert_eq!(Token::verify(&text, &[1; 32], TokenOp::UPLOAD, 100), Ok(t));
        let e = Token::verify(&text, &[1; 32], TokenOp::UPLOAD, 101);
        assert_eq!(e, Err(TokenError::Expired));
        let e = Token::verify(&text, &[1; 32], TokenOp::DOWNLOAD, 0);
        assert_eq!(e, Err(TokenError::WrongOp));
        let e = Token::verify(&text, &[2; 32], TokenOp::UPLOAD, 0);
        assert_eq!(e, Err(TokenError::BadMac));
    }
}
