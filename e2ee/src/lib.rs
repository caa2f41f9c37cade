//! Switchboard end-to-end encryption: what makes the server blind.
//!
//! This crate implements Signal's published protocols on RustCrypto/dalek primitives:
//!
//! * [`x3dh`]: the X3DH key agreement (X25519, HKDF-SHA256, info `Switchboard_X3DH_v1`),
//!   with an Ed25519 identity signing key next to the X25519 identity key instead of XEdDSA.
//! * [`ratchet`]: the Double Ratchet (`KDF_RK` = HKDF-SHA256, `KDF_CK` = HMAC-SHA256 with
//!   `0x01`/`0x02`, AEAD = AES-256-GCM with key and nonce derived from each single-use
//!   message key), bounded skipped-key storage, replay refusal, transactional decryption.
//! * [`session`]: sessions as typed states (`InitiatorPending` → `Established`).
//! * [`envelope`]: the byte-exact message format carried in a `Send` payload.
//! * [`keys`]: identity and prekeys, and the [`keys::PreKeyBundle`] encoding the server stores.
//! * [`sender_key`]: Sender Keys for groups: one ciphertext per group message, signed, with
//!   [`SenderKeyDistribution`] sent over the pairwise sessions.
//! * [`call`]: sealed call signalling: a per-call key granted to each callee device over the
//!   pairwise sessions, AES-256-GCM for the SDP and every later step.
//! * [`store`]: the encrypted-at-rest, atomically written state file.
//! * [`fingerprint`]: safety numbers and trust-on-first-use identity records.
//! * [`E2ee`]: the API the client SDK calls.
//!
//! The construction, every constant, the encodings and test vectors are in `docs/e2ee.md`.
//!
//! Error discipline: decoders never panic and return [`DecodeError`]; every other failure is
//! an [`Error`] variant, and a failed operation leaves the session, prekey and trust state as
//! it was (decryption is computed on staged values and committed only after the AEAD
//! accepted the message).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
pub mod call;
mod codec;
pub mod envelope;
pub mod error;
pub mod fingerprint;
pub mod kdf;
pub mod keys;
pub mod ratchet;
pub mod sender_key;
pub mod session;
pub mod store;
pub mod x3dh;

#[cfg(test)]
mod call_tests;
#[cfg(test)]
mod sender_key_tests;
#[cfg(test)]
mod tests;

pub use api::{
    DistributionReceived, E2ee, Plaintext, MAX_PEERS, MAX_SESSIONS_PER_PEER, STATE_VERSION,
};
pub use call::{CallError, CallKey, CallKeyring, CallOffer, CallStep, LiveCall};
pub use envelope::Envelope;
pub use error::{DecodeError, Error};
pub use fingerprint::{SafetyNumber, TrustStore};
pub use keys::{
    device_signature_message, sign_device, verify_device_signature, verify_signed_prekey,
    IdentityKeyPair, IdentityPublic, OneTimePreKeyPublic, PreKeyBundle, SignedPreKeyPublic,
};
pub use sender_key::{SenderKeyDistribution, SenderKeyMessage};
pub use store::{StateStore, StoreKey};

use codec::{Put, Reader};

/// A Switchboard device address: user (E.164 number as an integer) and device id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Address {
    /// The user id (phone number, E.164 digits as an integer).
    pub user: u64,
    /// The device id (0 = primary).
    pub device: u16,
}

impl Address {
    /// A device address.
    pub fn new(user: u64, device: u16) -> Self {
        Self { user, device }
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u64(self.user);
        out.put_u16(self.device);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            user: r.u64("user")?,
            device: r.u16("device")?,
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.user, self.device)
    }
}
