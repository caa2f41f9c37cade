//! The crate's two error types: [`DecodeError`] for byte-exact encodings (bundles, envelopes,
//! the store file) and [`Error`] for everything else. Every variant says what went wrong and
//! whether the session state was touched (it never is on an error: see the crate docs).

use crate::keys::IdentityPublic;
use crate::Address;

/// A byte string did not decode. Decoders return this instead of panicking, whatever the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside `field`: it needs `needed` more bytes, `available` are left.
    #[error("truncated: field `{field}` needs {needed} bytes, {available} available")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The encoding is complete but `extra` bytes follow it.
    #[error("{extra} trailing bytes after the encoding")]
    TrailingBytes {
        /// How many bytes are left over.
        extra: usize,
    },
    /// The version byte is not one this build understands.
    #[error("unknown version {0:#04x}")]
    UnknownVersion(u8),
    /// The type byte of an envelope is not a known message type.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A field holds a value outside its allowed set (a flag that is neither 0 nor 1, a
    /// nonzero field that must be zero, ...).
    #[error("field `{field}` holds an invalid value")]
    InvalidValue {
        /// The field.
        field: &'static str,
    },
    /// A length is above its documented maximum.
    #[error("field `{field}` is {len} bytes, more than the maximum {max}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A ciphertext is shorter than the 16-byte AEAD tag.
    #[error("ciphertext is {len} bytes, shorter than the 16-byte tag")]
    CiphertextTooShort {
        /// The ciphertext length found.
        len: usize,
    },
}

/// Everything else that can go wrong. On any `Err` returned by a session or by [`crate::E2ee`],
/// no session, prekey or trust state has changed (decryption works on a staged copy and commits
/// only on success), except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bytes did not decode (envelope, bundle, store file).
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// The signed prekey's Ed25519 signature does not verify under the bundle's identity
    /// signing key. The bundle is refused: it may have been forged by the server.
    #[error("signed prekey signature does not verify")]
    BadSignature,
    /// A public key is a low-order point: the X25519 output was all zeros (non-contributory).
    #[error("invalid public key (non-contributory X25519 result)")]
    InvalidPublicKey,
    /// An Ed25519 public key does not decode to a curve point.
    #[error("invalid Ed25519 public key")]
    InvalidSigningKey,
    /// A PreKeyMessage names a signed prekey this device does not hold (rotated out long ago,
    /// or never existed).
    #[error("unknown signed prekey id {0}")]
    UnknownSignedPreKey(u32),
    /// A PreKeyMessage names a one-time prekey this device does not hold: it was already used
    /// (and deleted) by an earlier X3DH, or never existed. A replayed first message ends here.
    #[error("unknown or already used one-time prekey id {0}")]
    UnknownOneTimePreKey(u32),
    /// AEAD authentication failed: the ciphertext, the header or the associated data was
    /// altered, or the message was not encrypted for this session. The message is discarded;
    /// the session is unchanged.
    #[error("message authentication failed")]
    DecryptFailed,
    /// The message's key was already consumed: this message (same ratchet key and number) was
    /// decrypted before and is refused as a replay. Also returned for a message so old that its
    /// skipped key was evicted by [`crate::ratchet::MAX_SKIPPED_KEYS_TOTAL`]. For a group
    /// message ([`crate::sender_key`]): an iteration already received, evicted by
    /// [`crate::sender_key::MAX_SKIPPED_KEYS`], or older than the distribution we hold.
    #[error("duplicate message (key already used) or message key expired")]
    DuplicateMessage,
    /// Decrypting this message would skip more than [`crate::ratchet::MAX_SKIP`] message keys
    /// in one chain. Refused so that a forged header cannot make us derive and store an
    /// unbounded number of keys.
    #[error("message skips {requested} keys in one chain, more than the maximum {max}")]
    TooManySkippedMessages {
        /// Keys this message would have skipped.
        requested: u64,
        /// [`crate::ratchet::MAX_SKIP`].
        max: u32,
    },
    /// A chain's 32-bit message counter is exhausted (2^32 - 1 messages without a reply).
    #[error("message counter exhausted in this chain")]
    CounterExhausted,
    /// The session has no sending chain yet (a responder that has not received a message).
    #[error("session cannot send yet")]
    NoSendingChain,
    /// There is no session with this peer and no bundle was given to start one.
    #[error("no session with {0} and no prekey bundle to start one")]
    NoSession(Address),
    /// A normal message arrived from a peer with whom there is no session (for example after
    /// the local state was lost). The peer must start a new session.
    #[error("message from {0} but no session with it")]
    NoSessionForMessage(Address),
    /// The peer's identity key differs from the one first seen for this (user, device). The
    /// operation was refused; show the safety-number-changed warning, and call
    /// [`crate::E2ee::accept_identity`] only after the user agreed.
    #[error("identity key of {peer} changed")]
    IdentityChanged {
        /// The peer.
        peer: Address,
        /// The identity recorded earlier.
        known: Box<IdentityPublic>,
        /// The identity now presented.
        received: Box<IdentityPublic>,
    },
    /// A plaintext is larger than [`crate::envelope::MAX_PLAINTEXT_BYTES`].
    #[error("plaintext of {len} bytes exceeds the maximum {max}")]
    PlaintextTooLarge {
        /// The plaintext length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A count argument is out of range (for example more one-time prekeys than the store keeps).
    #[error("{what}: {value} is out of range (max {max})")]
    OutOfRange {
        /// What was counted.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The limit.
        max: usize,
    },
    /// This device has no sender key for the group: call
    /// [`crate::E2ee::sender_key_distribution`] (and send the distribution to every member
    /// device) before [`crate::E2ee::group_encrypt`].
    #[error("no own sender key for group {0}")]
    NoSenderKey(u64),
    /// A group message names a sender key (group, sender device, key id) this device has no
    /// distribution for: not received yet (keep the message and retry after the next
    /// distribution from that sender), forgotten, or a key made after this device was removed
    /// from the group. Nothing changed.
    #[error("no sender key {key_id} of {sender} in group {group}")]
    UnknownSenderKey {
        /// The group.
        group: u64,
        /// The sender device.
        sender: Address,
        /// The key id in the message.
        key_id: u32,
    },
    /// A group message's Ed25519 signature does not verify under the sender key's signing key:
    /// forged or altered (by the server or by another member, who knows the chain key but not
    /// the signing key). Checked before decryption; nothing changed.
    #[error("group message signature does not verify")]
    SenderKeySignatureInvalid,
    /// A group message is more than [`crate::sender_key::MAX_SKIP`] iterations ahead of the
    /// receiver's chain for its sender key. Nothing changed.
    #[error("group message iteration {iteration} is too far ahead of {current} (max skip {max})")]
    SenderKeyTooFarAhead {
        /// The message's iteration.
        iteration: u32,
        /// The next iteration the receiver expected.
        current: u32,
        /// [`crate::sender_key::MAX_SKIP`].
        max: u32,
    },
    /// A group message (or distribution) is for another group than the one it was delivered
    /// as: the server misfiled it. Nothing changed.
    #[error("group message for group {found}, delivered as group {expected}")]
    GroupMismatch {
        /// The group the caller said it was for.
        expected: u64,
        /// The group id in the message.
        found: u64,
    },
    /// The store file could not be read or written.
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The store file did not decrypt: wrong key, or the file was altered or truncated.
    #[error("store file does not decrypt (wrong key, or altered)")]
    StoreDecryptFailed,
    /// The store file belongs to another local address than the one asked for.
    #[error("store file belongs to {found}, not {expected}")]
    StoreAddressMismatch {
        /// The address asked for.
        expected: Address,
        /// The address in the file.
        found: Address,
    },
    /// An earlier write of the store failed (fsync, rename): what is on disk is unknown, so
    /// this instance refuses further work. Reopen it from the store.
    #[error("poisoned by an earlier store write failure; reopen from disk")]
    Poisoned,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
