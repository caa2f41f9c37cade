//! Sender Keys: group messages encrypted once (Signal's Sender Key construction, as in
//! WhatsApp's group encryption).
//!
//! Each member device has, per group, a [`SenderKey`]: a chain key, an iteration counter, an
//! Ed25519 signing key pair and a random `u32` key id. It sends the public half of that
//! state, a [`SenderKeyDistribution`], to every other member device inside the pairwise
//! (Double Ratchet) sessions before it first uses the key, and to members added later. A
//! group message, [`SenderKeyMessage`], is encrypted once under the chain's message key and
//! signed with the signing key; the server fans the one ciphertext out.
//!
//! * Chain: `KDF_CK` of the Double Ratchet: message key = HMAC-SHA256(ck, `0x01`), next
//!   chain key = HMAC-SHA256(ck, `0x02`) ([`crate::kdf`]).
//! * AEAD: AES-256-GCM with key ‖ nonce = HKDF-SHA256(salt = 32 zero bytes, IKM = message
//!   key, info = [`SENDER_KEY_MESSAGE_KEYS_INFO`], 44 bytes), associated data = the 18-byte
//!   message header (version, type, group id, key id, iteration).
//! * Signature: Ed25519 (RFC 8032) over every byte of the message before the signature,
//!   verified strictly **before** anything is decrypted.
//!
//! Receiving ([`SenderKeyState`]) is bounded and transactional: one message may skip at most
//! [`MAX_SKIP`] iterations ([`Error::SenderKeyTooFarAhead`]), at most [`MAX_SKIPPED_KEYS`]
//! skipped keys are stored per sender key (oldest evicted), a used key is deleted (a replay
//! is [`Error::DuplicateMessage`]) and a refused message changes nothing.
//!
//! The byte tables, constants and vectors are in docs/e2ee.md, "Sender Keys (groups)".
#![deny(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, VecDeque};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::error::{DecodeError, Error};
pub use crate::kdf::SENDER_KEY_MESSAGE_KEYS_INFO;
use crate::kdf::{kdf_ck, open_with, seal_with, ChainKey, MessageKey, TAG_LEN};
use crate::Address;

/// Version byte of both Sender Key encodings.
pub const VERSION: u8 = 0x01;
/// Type byte of a [`SenderKeyDistribution`] (distinct from the envelope types `0x01`/`0x02`).
pub const TYPE_DISTRIBUTION: u8 = 0x03;
/// Type byte of a [`SenderKeyMessage`].
pub const TYPE_MESSAGE: u8 = 0x04;
/// Length of an encoded [`SenderKeyDistribution`].
pub const DISTRIBUTION_LEN: usize = 2 + 8 + 4 + 4 + 32 + 32;
/// Length of a [`SenderKeyMessage`] header (the AEAD associated data).
pub const MESSAGE_HEADER_LEN: usize = 2 + 8 + 4 + 4;
/// Length of the Ed25519 signature that ends a [`SenderKeyMessage`].
pub const SIGNATURE_LEN: usize = 64;
/// Bytes a [`SenderKeyMessage`] adds to its plaintext: header 18 + tag 16 + signature 64.
pub const MESSAGE_OVERHEAD: usize = MESSAGE_HEADER_LEN + TAG_LEN + SIGNATURE_LEN;
/// Largest [`SenderKeyMessage`] accepted or produced (64 KiB, as envelopes).
pub const MAX_MESSAGE_BYTES: usize = 65_536;
/// Largest group plaintext: [`MAX_MESSAGE_BYTES`] − [`MESSAGE_OVERHEAD`].
pub const MAX_PLAINTEXT_BYTES: usize = MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD;
/// Most iterations one message may make a receiver skip in one sender key.
pub const MAX_SKIP: u32 = 2000;
/// Most skipped message keys stored per sender key; the oldest is deleted beyond it.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Sender keys kept per (group, sender device): the newest distributions, so that messages
/// sent under the previous key just before a rotation still decrypt. The oldest is dropped.
pub const MAX_KEYS_PER_SENDER: usize = 4;
/// Most groups this device holds its own sender key for.
pub const MAX_GROUPS: usize = 10_000;
/// Most (group, sender device) records of received sender keys.
pub const MAX_SENDER_RECORDS: usize = 200_000;

/// What a member device sends every other member device, inside a pairwise session, before
/// it uses its sender key: the state from which every later message key is derived.
///
/// Encoding (82 bytes, big-endian): `version 0x01 ‖ type 0x03 ‖ group_id u64 ‖ key_id u32 ‖
/// iteration u32 ‖ chain_key (32) ‖ signing_key (32, Ed25519 public)`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SenderKeyDistribution {
    /// The group.
    pub group_id: u64,
    /// Which of the sender's keys for this group (a rotation makes a new one).
    pub key_id: u32,
    /// The iteration `chain_key` is at: the first message the receiver can decrypt.
    pub iteration: u32,
    /// The chain key at `iteration` (secret).
    pub chain_key: ChainKey,
    /// The sender's Ed25519 public signing key for this key id.
    pub signing_key: [u8; 32],
}

impl SenderKeyDistribution {
    /// The byte-exact encoding (secret: it holds the chain key; send it only inside a
    /// pairwise session).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(DISTRIBUTION_LEN));
        out.put_u8(VERSION);
        out.put_u8(TYPE_DISTRIBUTION);
        out.put_u64(self.group_id);
        out.put_u32(self.key_id);
        out.put_u32(self.iteration);
        out.put(self.chain_key.as_bytes());
        out.put(&self.signing_key);
        out
    }

    /// Decodes exactly [`DISTRIBUTION_LEN`] bytes; never panics. The signing key must be a
    /// valid, not small-order, Ed25519 point.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        read_version_type(&mut r, TYPE_DISTRIBUTION)?;
        let group_id = r.u64("group_id")?;
        let key_id = r.u32("key_id")?;
        let iteration = r.u32("iteration")?;
        let chain_key = ChainKey(*Zeroizing::new(r.array::<32>("chain_key")?));
        let signing_key = r.array::<32>("signing_key")?;
        r.finish()?;
        match VerifyingKey::from_bytes(&signing_key) {
            Ok(k) if !k.is_weak() => {}
            _ => {
                return Err(DecodeError::InvalidValue {
                    field: "signing_key",
                })
            }
        }
        Ok(Self {
            group_id,
            key_id,
            iteration,
            chain_key,
            signing_key,
        })
    }
}

/// A group message, encrypted once for every member device.
///
/// Encoding (98 + plaintext bytes, big-endian): `version 0x01 ‖ type 0x04 ‖ group_id u64 ‖
/// key_id u32 ‖ iteration u32 ‖ AES-256-GCM ciphertext ‖ 16-byte tag ‖ Ed25519 signature
/// (64)` over everything before it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SenderKeyMessage {
    /// The group.
    pub group_id: u64,
    /// The sender key used.
    pub key_id: u32,
    /// The chain iteration whose message key encrypted this message.
    pub iteration: u32,
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
    /// Ed25519 signature over [`SenderKeyMessage::signed_bytes`].
    pub signature: [u8; 64],
}

impl SenderKeyMessage {
    /// The 18-byte header: version, type, group id, key id, iteration (the AEAD's associated
    /// data).
    pub fn header(&self) -> [u8; MESSAGE_HEADER_LEN] {
        header(self.group_id, self.key_id, self.iteration)
    }

    /// The bytes the signature covers: header ‖ ciphertext.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MESSAGE_HEADER_LEN + self.ciphertext.len());
        out.put(&self.header());
        out.put(&self.ciphertext);
        out
    }

    /// The byte-exact encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.signed_bytes();
        out.put(&self.signature);
        out
    }

    /// Decodes a message; never panics. Refuses more than [`MAX_MESSAGE_BYTES`], unknown
    /// version or type, and a ciphertext shorter than the tag.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge {
                field: "sender_key_message",
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        read_version_type(&mut r, TYPE_MESSAGE)?;
        let group_id = r.u64("group_id")?;
        let key_id = r.u32("key_id")?;
        let iteration = r.u32("iteration")?;
        let rest = r.rest();
        let Some(ct_len) = rest.len().checked_sub(SIGNATURE_LEN) else {
            return Err(DecodeError::Truncated {
                field: "signature",
                needed: SIGNATURE_LEN,
                available: rest.len(),
            });
        };
        let (ciphertext, signature) = rest.split_at(ct_len);
        if ciphertext.len() < TAG_LEN {
            return Err(DecodeError::CiphertextTooShort {
                len: ciphertext.len(),
            });
        }
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(signature);
        Ok(Self {
            group_id,
            key_id,
            iteration,
            ciphertext: ciphertext.to_vec(),
            signature: sig,
        })
    }

    /// Verifies the signature (strict Ed25519) under `signing_key`.
    pub fn verify(&self, signing_key: &[u8; 32]) -> Result<(), Error> {
        let key = VerifyingKey::from_bytes(signing_key).map_err(|_| Error::InvalidSigningKey)?;
        key.verify_strict(
            &self.signed_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| Error::SenderKeySignatureInvalid)
    }
}

fn read_version_type(r: &mut Reader<'_>, ty: u8) -> Result<(), DecodeError> {
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let t = r.u8("type")?;
    if t != ty {
        return Err(DecodeError::UnknownType(t));
    }
    Ok(())
}

fn header(group_id: u64, key_id: u32, iteration: u32) -> [u8; MESSAGE_HEADER_LEN] {
    let mut out = Vec::with_capacity(MESSAGE_HEADER_LEN);
    out.put_u8(VERSION);
    out.put_u8(TYPE_MESSAGE);
    out.put_u64(group_id);
    out.put_u32(key_id);
    out.put_u32(iteration);
    let mut h = [0u8; MESSAGE_HEADER_LEN];
    for (d, s) in h.iter_mut().zip(out) {
        *d = s;
    }
    h
}

/// `KDF_CK` of a sender chain: the message key of this iteration and the next chain key.
/// (HMAC-SHA256(ck, `0x01`), HMAC-SHA256(ck, `0x02`), exactly the Double Ratchet's.)
pub fn chain_step(chain_key: &ChainKey) -> (ChainKey, MessageKey) {
    kdf_ck(chain_key)
}

/// This device's own sender key for one group (secret).
#[derive(Clone)]
pub struct SenderKey {
    group_id: u64,
    key_id: u32,
    iteration: u32,
    chain_key: ChainKey,
    signing: SigningKey,
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("group_id", &self.group_id)
            .field("key_id", &self.key_id)
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

impl SenderKey {
    /// A fresh key: random chain key and signing key, iteration 0.
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(
        group_id: u64,
        key_id: u32,
        rng: &mut R,
    ) -> Self {
        let mut chain = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut chain[..]);
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut seed[..]);
        Self::from_parts(group_id, key_id, 0, *chain, *seed)
    }

    /// A key from given parts (test vectors, import).
    pub fn from_parts(
        group_id: u64,
        key_id: u32,
        iteration: u32,
        chain_key: [u8; 32],
        signing_seed: [u8; 32],
    ) -> Self {
        Self {
            group_id,
            key_id,
            iteration,
            chain_key: ChainKey(chain_key),
            signing: SigningKey::from_bytes(&signing_seed),
        }
    }

    /// The group.
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The iteration the next message will use.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// The Ed25519 public signing key.
    pub fn signing_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The distribution of the current state (current iteration and chain key): a member
    /// given it now cannot decrypt earlier messages.
    pub fn distribution(&self) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group_id: self.group_id,
            key_id: self.key_id,
            iteration: self.iteration,
            chain_key: self.chain_key.clone(),
            signing_key: self.signing_public(),
        }
    }

    /// Encrypts and signs one group message, then advances the chain. On `Err` nothing
    /// changed.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<SenderKeyMessage, Error> {
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(Error::PlaintextTooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_BYTES,
            });
        }
        let next_iteration = self
            .iteration
            .checked_add(1)
            .ok_or(Error::CounterExhausted)?;
        let (next, mk) = chain_step(&self.chain_key);
        let h = header(self.group_id, self.key_id, self.iteration);
        let ciphertext = seal_with(&mk, SENDER_KEY_MESSAGE_KEYS_INFO, plaintext, &h);
        let mut m = SenderKeyMessage {
            group_id: self.group_id,
            key_id: self.key_id,
            iteration: self.iteration,
            ciphertext,
            signature: [0; SIGNATURE_LEN],
        };
        m.signature = self.signing.sign(&m.signed_bytes()).to_bytes();
        self.chain_key = next;
        self.iteration = next_iteration;
        Ok(m)
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u64(self.group_id);
        out.put_u32(self.key_id);
        out.put_u32(self.iteration);
        out.put(self.chain_key.as_bytes());
        out.put(Zeroizing::new(self.signing.to_bytes()).as_slice());
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group_id = r.u64("own_group_id")?;
        let key_id = r.u32("own_key_id")?;
        let iteration = r.u32("own_iteration")?;
        let chain = Zeroizing::new(r.array::<32>("own_chain_key")?);
        let seed = Zeroizing::new(r.array::<32>("own_signing_seed")?);
        Ok(Self::from_parts(group_id, key_id, iteration, *chain, *seed))
    }
}

#[derive(Clone)]
struct SkippedKey {
    iteration: u32,
    mk: MessageKey,
}

/// What a receiver holds for one (group, sender device, key id): the signing key and the
/// chain at the next iteration not yet seen, plus skipped message keys (bounded).
#[derive(Clone)]
pub struct SenderKeyState {
    key_id: u32,
    signing_key: [u8; 32],
    iteration: u32,
    chain_key: ChainKey,
    skipped: VecDeque<SkippedKey>,
}

impl std::fmt::Debug for SenderKeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKeyState")
            .field("key_id", &self.key_id)
            .field("iteration", &self.iteration)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl SenderKeyState {
    /// The receiver state a distribution sets up.
    pub fn from_distribution(d: &SenderKeyDistribution) -> Self {
        Self {
            key_id: d.key_id,
            signing_key: d.signing_key,
            iteration: d.iteration,
            chain_key: d.chain_key.clone(),
            skipped: VecDeque::new(),
        }
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The sender's public signing key.
    pub fn signing_key(&self) -> &[u8; 32] {
        &self.signing_key
    }

    /// The next iteration not yet received (the chain key is at it).
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Stored skipped message keys.
    pub fn skipped_key_count(&self) -> usize {
        self.skipped.len()
    }

    /// Verifies the signature, then decrypts; transactional (on `Err` the state is exactly as
    /// before). The caller has matched the group and key id.
    pub fn decrypt(&mut self, m: &SenderKeyMessage) -> Result<Zeroizing<Vec<u8>>, Error> {
        m.verify(&self.signing_key)?;
        let ad = m.header();
        if m.iteration < self.iteration {
            let pos = self
                .skipped
                .iter()
                .position(|k| k.iteration == m.iteration)
                .ok_or(Error::DuplicateMessage)?;
            let pt = match self.skipped.get(pos) {
                Some(k) => open_with(&k.mk, SENDER_KEY_MESSAGE_KEYS_INFO, &m.ciphertext, &ad)?,
                None => return Err(Error::DuplicateMessage),
            };
            self.skipped.remove(pos);
            return Ok(pt);
        }
        let ahead = m.iteration - self.iteration;
        if ahead > MAX_SKIP {
            return Err(Error::SenderKeyTooFarAhead {
                iteration: m.iteration,
                current: self.iteration,
                max: MAX_SKIP,
            });
        }
        let next_iteration = m.iteration.checked_add(1).ok_or(Error::CounterExhausted)?;
        let mut ck = self.chain_key.clone();
        let mut new_skipped = Vec::with_capacity(ahead as usize);
        for iteration in self.iteration..m.iteration {
            let (next, mk) = chain_step(&ck);
            new_skipped.push(SkippedKey { iteration, mk });
            ck = next;
        }
        let (next, mk) = chain_step(&ck);
        let pt = open_with(&mk, SENDER_KEY_MESSAGE_KEYS_INFO, &m.ciphertext, &ad)?;
        // Commit.
        self.chain_key = next;
        self.iteration = next_iteration;
        self.skipped.extend(new_skipped);
        while self.skipped.len() > MAX_SKIPPED_KEYS {
            self.skipped.pop_front();
        }
        Ok(pt)
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.key_id);
        out.put(&self.signing_key);
        out.put_u32(self.iteration);
        out.put(self.chain_key.as_bytes());
        out.put_u32(self.skipped.len() as u32);
        for k in &self.skipped {
            out.put_u32(k.iteration);
            out.put(k.mk.as_bytes());
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let key_id = r.u32("sender_key_id")?;
        let signing_key = r.array("sender_signing_key")?;
        let iteration = r.u32("sender_iteration")?;
        let chain_key = ChainKey(*Zeroizing::new(r.array::<32>("sender_chain_key")?));
        let n = r.count("sender_skipped_count", MAX_SKIPPED_KEYS)?;
        let mut skipped = VecDeque::with_capacity(n);
        for _ in 0..n {
            skipped.push_back(SkippedKey {
                iteration: r.u32("sender_skipped_iteration")?,
                mk: MessageKey(*Zeroizing::new(r.array::<32>("sender_skipped_key")?)),
            });
        }
        Ok(Self {
            key_id,
            signing_key,
            iteration,
            chain_key,
            skipped,
        })
    }
}

/// Every sender key state of one device: its own key per group and the keys received from
/// other member devices, per (group, sender), newest first.
#[derive(Clone, Default, Debug)]
pub(crate) struct GroupKeys {
    pub(crate) own: BTreeMap<u64, SenderKey>,
    pub(crate) received: BTreeMap<(u64, Address), Vec<SenderKeyState>>,
}

impl GroupKeys {
    /// The range of `received` keys of one group.
    pub(crate) fn group_range(group: u64) -> std::ops::RangeInclusive<(u64, Address)> {
        (group, Address::new(0, 0))..=(group, Address::new(u64::MAX, u16::MAX))
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.own.len() as u32);
        for k in self.own.values() {
            k.put(out);
        }
        out.put_u32(self.received.len() as u32);
        for ((group, sender), record) in &self.received {
            out.put_u64(*group);
            sender.put(out);
            out.put_u32(record.len() as u32);
            for s in record {
                s.put(out);
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut own = BTreeMap::new();
        for _ in 0..r.count("own_sender_key_count", MAX_GROUPS)? {
            let k = SenderKey::read(r)?;
            if own.insert(k.group_id, k).is_some() {
                return Err(DecodeError::InvalidValue {
                    field: "own_group_id",
                });
            }
        }
        let mut received = BTreeMap::new();
        for _ in 0..r.count("sender_record_count", MAX_SENDER_RECORDS)? {
            let group = r.u64("sender_group_id")?;
            let sender = Address::read(r)?;
            let k = r.count("sender_keys_per_sender", MAX_KEYS_PER_SENDER)?;
            if k == 0 {
                return Err(DecodeError::InvalidValue {
                    field: "sender_keys_per_sender",
                });
            }
            let mut record: Vec<SenderKeyState> = Vec::with_capacity(k);
            for _ in 0..k {
                let s = SenderKeyState::read(r)?;
                if record.iter().any(|o| o.key_id == s.key_id) {
                    return Err(DecodeError::InvalidValue {
                        field: "sender_key_id",
                    });
                }
                record.push(s);
            }
            if received.insert((group, sender), record).is_some() {
                return Err(DecodeError::InvalidValue {
                    field: "sender_address",
                });
            }
        }
        Ok(Self { own, received })
    }
}
