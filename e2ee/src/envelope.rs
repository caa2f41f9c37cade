//! The end-to-end message format: what the client puts in a Switchboard `Send` payload.
//! The server sees only these bytes.
//!
//! ```text
//! Message (type 0x02), 58 + plaintext bytes:
//!   0   1   version  = 0x01
//!   1   1   type     = 0x02
//!   2   32  ratchet public key   (header.dh)
//!   34  4   previous chain length (header.pn, u32 BE)
//!   38  4   message number        (header.n,  u32 BE)
//!   42  ..  AES-256-GCM ciphertext || 16-byte tag
//!
//! PreKeyMessage (type 0x01), 163 + plaintext bytes: sent by the initiator until the
//! responder has answered; carries the X3DH initial fields, then a Message body.
//!   0   1   version  = 0x01
//!   1   1   type     = 0x01
//!   2   32  initiator identity key IK_A (X25519)
//!   34  32  initiator identity signing key IKsig_A (Ed25519)
//!   66  32  initiator ephemeral (base) key EK_A
//!   98  4   responder signed prekey id (u32 BE)
//!   102 1   0x00 = no one-time prekey used, 0x01 = one was used
//!   103 4   responder one-time prekey id (u32 BE; must be 0 when the flag is 0x00)
//!   107 40  ratchet header (dh, pn, n) as above
//!   147 ..  ciphertext || tag
//! ```
//!
//! [`Envelope::decode`] never panics; it refuses unknown versions and types, short input,
//! non-canonical flags, ciphertexts shorter than the tag and envelopes above
//! [`MAX_ENVELOPE_BYTES`].
#![deny(clippy::expect_used, clippy::panic)]

use crate::codec::{Put, Reader};
use crate::error::DecodeError;
use crate::kdf::TAG_LEN;
use crate::keys::{read_public, IdentityPublic};
use crate::ratchet::Header;
use crate::x3dh::PreKeyInit;

/// Envelope format version.
pub const VERSION: u8 = 0x01;
/// Type byte of a [`PreKeyMessage`].
pub const TYPE_PREKEY_MESSAGE: u8 = 0x01;
/// Type byte of a normal [`Message`].
pub const TYPE_MESSAGE: u8 = 0x02;

/// Bytes a normal message adds to its plaintext: 2 (version, type) + 40 (header) + 16 (tag).
pub const MESSAGE_OVERHEAD: usize = 2 + Header::LEN + TAG_LEN;
/// Bytes a PreKeyMessage adds: 2 + 105 (X3DH fields) + 40 + 16.
pub const PREKEY_MESSAGE_OVERHEAD: usize = 2 + PREKEY_FIELDS_LEN + Header::LEN + TAG_LEN;
const PREKEY_FIELDS_LEN: usize = 32 + 32 + 32 + 4 + 1 + 4;

/// Largest envelope accepted or produced (64 KiB: more than any Switchboard frame can carry).
pub const MAX_ENVELOPE_BYTES: usize = 65_536;
/// Largest plaintext [`crate::E2ee::encrypt`] accepts, so that even a PreKeyMessage fits in
/// [`MAX_ENVELOPE_BYTES`].
pub const MAX_PLAINTEXT_BYTES: usize = MAX_ENVELOPE_BYTES - PREKEY_MESSAGE_OVERHEAD;

/// A Double Ratchet message: header and ciphertext (with tag).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    /// The ratchet header (authenticated as associated data).
    pub header: Header,
    /// AES-256-GCM ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// The initiator's message before the responder answered.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PreKeyMessage {
    /// The X3DH initial fields.
    pub init: PreKeyInit,
    /// The ratchet message.
    pub message: Message,
}

/// An end-to-end envelope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Envelope {
    /// First message(s) of a session, carrying the X3DH fields.
    PreKey(PreKeyMessage),
    /// A message in an established session.
    Message(Message),
}

impl Envelope {
    /// The byte-exact encoding.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Envelope::Message(m) => {
                let mut out = Vec::with_capacity(MESSAGE_OVERHEAD + m.ciphertext.len());
                out.put_u8(VERSION);
                out.put_u8(TYPE_MESSAGE);
                put_message(&mut out, m);
                out
            }
            Envelope::PreKey(p) => {
                let mut out =
                    Vec::with_capacity(PREKEY_MESSAGE_OVERHEAD + p.message.ciphertext.len());
                out.put_u8(VERSION);
                out.put_u8(TYPE_PREKEY_MESSAGE);
                out.put(&p.init.identity.dh);
                out.put(&p.init.identity.sign);
                out.put(&p.init.base_key);
                out.put_u32(p.init.signed_prekey_id);
                match p.init.one_time_prekey_id {
                    None => {
                        out.put_flag(false);
                        out.put_u32(0);
                    }
                    Some(id) => {
                        out.put_flag(true);
                        out.put_u32(id);
                    }
                }
                put_message(&mut out, &p.message);
                out
            }
        }
    }

    /// Decodes an envelope; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge {
                field: "envelope",
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        match r.u8("type")? {
            TYPE_MESSAGE => Ok(Envelope::Message(read_message(&mut r)?)),
            TYPE_PREKEY_MESSAGE => {
                let identity = IdentityPublic::read(&mut r)?;
                let base_key = read_public(&mut r, "base_key")?;
                let signed_prekey_id = r.u32("signed_prekey_id")?;
                let has_one_time = r.flag("one_time_prekey_used")?;
                let one_time_id = r.u32("one_time_prekey_id")?;
                let one_time_prekey_id = match (has_one_time, one_time_id) {
                    (true, id) => Some(id),
                    (false, 0) => None,
                    (false, _) => {
                        return Err(DecodeError::InvalidValue {
                            field: "one_time_prekey_id",
                        })
                    }
                };
                let message = read_message(&mut r)?;
                Ok(Envelope::PreKey(PreKeyMessage {
                    init: PreKeyInit {
                        identity,
                        base_key,
                        signed_prekey_id,
                        one_time_prekey_id,
                    },
                    message,
                }))
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

fn put_message(out: &mut Vec<u8>, m: &Message) {
    out.put(&m.header.encode());
    out.put(&m.ciphertext);
}

fn read_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let header = Header::read(r)?;
    let ciphertext = r.rest();
    if ciphertext.len() < TAG_LEN {
        return Err(DecodeError::CiphertextTooShort {
            len: ciphertext.len(),
        });
    }
    Ok(Message {
        header,
        ciphertext: ciphertext.to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_prekey(otpk: Option<u32>, ct_len: usize) -> Envelope {
        Envelope::PreKey(PreKeyMessage {
            init: PreKeyInit {
                identity: IdentityPublic {
                    dh: [1; 32],
                    sign: [2; 32],
                },
                base_key: [3; 32],
                signed_prekey_id: 7,
                one_time_prekey_id: otpk,
            },
            message: Message {
                header: Header {
                    dh: [4; 32],
                    pn: 5,
                    n: 6,
                },
                ciphertext: vec![9; ct_len],
            },
        })
    }

    #[test]
    fn overheads() {
        assert_eq!(MESSAGE_OVERHEAD, 58);
        assert_eq!(PREKEY_MESSAGE_OVERHEAD, 163);
        let m = Envelope::Message(Message {
            header: Header {
                dh: [0; 32],
                pn: 0,
                n: 0,
            },
            ciphertext: vec![0; 116],
        });
        assert_eq!(m.encode().len(), 100 + MESSAGE_OVERHEAD);
        assert_eq!(
            sample_prekey(Some(1), 116).encode().len(),
            100 + PREKEY_MESSAGE_OVERHEAD
        );
    }

    #[test]
    fn noncanonical_one_time_id_refused() {
        let mut enc = sample_prekey(None, 16).encode();
        assert_eq!(Envelope::decode(&enc).unwrap(), sample_prekey(None, 16));
        enc[106] = 1;
        assert_eq!(
            Envelope::decode(&enc),
            Err(DecodeError::InvalidValue {
                field: "one_time_prekey_id"
            })
        );
    }

    #[test]
    fn short_tag_unknown_type_version() {
        let enc = sample_prekey(Some(3), 15).encode();
        assert_eq!(
            Envelope::decode(&enc),
            Err(DecodeError::CiphertextTooShort { len: 15 })
        );
        assert_eq!(
            Envelope::decode(&[2, 2]),
            Err(DecodeError::UnknownVersion(2))
        );
        assert_eq!(Envelope::decode(&[1, 3]), Err(DecodeError::UnknownType(3)));
        assert!(matches!(
            Envelope::decode(&[]),
            Err(DecodeError::Truncated { .. })
        ));
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(env) = Envelope::decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes (canonical encoding).
                prop_assert_eq!(env.encode(), bytes);
            }
        }

        #[test]
        fn roundtrip(otpk in proptest::option::of(any::<u32>()), ct_len in 16usize..300,
                     prekey in any::<bool>()) {
            let env = if prekey {
                sample_prekey(otpk, ct_len)
            } else {
                Envelope::Message(Message {
                    header: Header { dh: [8; 32], pn: 1, n: 2 },
                    ciphertext: vec![5; ct_len],
                })
            };
            let enc = env.encode();
            prop_assert_eq!(Envelope::decode(&enc).unwrap(), env);
            for cut in 0..enc.len().min(170) {
                let _ = Envelope::decode(&enc[..cut]);
            }
        }
    }
}
