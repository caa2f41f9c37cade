//! Long-term and medium-term keys: the identity key pair, signed prekeys, one-time prekeys,
//! the local prekey store, and the public [`PreKeyBundle`] the server hands out.
//!
//! Identity: X3DH needs an X25519 identity key (`IK`) for Diffie-Hellman and a way to sign the
//! signed prekey. Signal uses XEdDSA so that one X25519 key does both. Switchboard instead
//! publishes **two** keys per device: the X25519 key `IK` and a separate Ed25519 signing key
//! `IKsig` (RFC 8032, `ed25519-dalek`), which signs `Encode(SPK)`. Both halves are part of the
//! identity: the trust store, the safety number and the X3DH associated data cover both.
#![deny(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, VecDeque};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::error::{DecodeError, Error};

/// The single-byte curve type prefix of `Encode(PK)` (X3DH §2.1: "some single-byte constant
/// to represent the type of curve"): `0x05` for X25519, as Signal uses.
pub const KEY_TYPE_X25519: u8 = 0x05;

/// How many signed prekeys the store keeps (the current one and the last few rotated out, so
/// that first messages in flight during a rotation still decrypt).
pub const MAX_SIGNED_PREKEYS_KEPT: usize = 4;

/// The most one-time prekeys the store holds at once.
pub const MAX_ONE_TIME_PREKEYS: usize = 2000;

/// `Encode(PK)`: `0x05 ‖ u-coordinate` (33 bytes).
pub fn encode_public(pk: &[u8; 32]) -> [u8; 33] {
    let mut out = [0u8; 33];
    let (ty, rest) = out.split_at_mut(1);
    ty.copy_from_slice(&[KEY_TYPE_X25519]);
    rest.copy_from_slice(pk);
    out
}

/// Whether `pk` is the canonical encoding of an X25519 u-coordinate: `u < 2^255 - 19` (so in
/// particular the top bit is clear). X25519 ignores the top bit, so without this check a
/// public key would have two encodings, and a flipped bit in a field that is not covered by
/// the AEAD's associated data (the PreKeyMessage base key) would go unnoticed. Decoders
/// refuse non-canonical keys; every key this crate generates is canonical.
pub fn is_canonical_public(pk: &[u8; 32]) -> bool {
    // p = 2^255 - 19, little-endian.
    let mut p = [0xffu8; 32];
    if let Some(lo) = p.first_mut() {
        *lo = 0xed;
    }
    if let Some(hi) = p.last_mut() {
        *hi = 0x7f;
    }
    // Compare from the most significant byte down.
    for (a, b) in pk.iter().rev().zip(p.iter().rev()) {
        if a != b {
            return a < b;
        }
    }
    false
}

/// Reads a 32-byte X25519 public key, refusing non-canonical encodings.
pub(crate) fn read_public(
    r: &mut Reader<'_>,
    field: &'static str,
) -> Result<[u8; 32], DecodeError> {
    let pk = r.array(field)?;
    if !is_canonical_public(&pk) {
        return Err(DecodeError::InvalidValue { field });
    }
    Ok(pk)
}

/// X25519 of a secret and a peer's public key; refuses low-order peer keys (all-zero output).
pub(crate) fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, Error> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(Error::InvalidPublicKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// The public identity of a device: its X25519 identity key and its Ed25519 signing key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityPublic {
    /// X25519 identity key `IK` (used in X3DH).
    pub dh: [u8; 32],
    /// Ed25519 identity signing key `IKsig` (verifies signed prekeys).
    pub sign: [u8; 32],
}

impl IdentityPublic {
    /// Encoded length: `dh ‖ sign`.
    pub const LEN: usize = 64;

    /// The bytes the safety number hashes: `Encode(IK) ‖ IKsig` (65 bytes).
    pub fn fingerprint_bytes(&self) -> [u8; 65] {
        let mut out = [0u8; 65];
        let (a, b) = out.split_at_mut(33);
        a.copy_from_slice(&encode_public(&self.dh));
        b.copy_from_slice(&self.sign);
        out
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put(&self.dh);
        out.put(&self.sign);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            dh: read_public(r, "identity_dh")?,
            sign: r.array("identity_sign")?,
        })
    }
}

impl std::fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityPublic(dh=")?;
        for b in self.dh {
            write!(f, "{b:02x}")?;
        }
        write!(f, ", sign=")?;
        for b in self.sign {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A device's identity key pair (X25519 + Ed25519). Private halves are zeroized on drop.
#[derive(Clone)]
pub struct IdentityKeyPair {
    dh: StaticSecret,
    sign: SigningKey,
}

impl std::fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl IdentityKeyPair {
    /// A fresh identity from a cryptographic RNG.
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let dh = StaticSecret::random_from_rng(&mut *rng);
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut seed[..]);
        Self {
            dh,
            sign: SigningKey::from_bytes(&seed),
        }
    }

    /// From the X25519 private key and the Ed25519 seed (RFC 8032 private key).
    pub fn from_private_bytes(dh: [u8; 32], sign_seed: [u8; 32]) -> Self {
        let dh = StaticSecret::from(dh);
        let sign = SigningKey::from_bytes(&sign_seed);
        Self { dh, sign }
    }

    /// The public identity.
    pub fn public(&self) -> IdentityPublic {
        IdentityPublic {
            dh: public_of(&self.dh),
            sign: self.sign.verifying_key().to_bytes(),
        }
    }

    /// Ed25519 signature of `message` under the identity signing key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.sign.sign(message).to_bytes()
    }

    pub(crate) fn dh_secret(&self) -> &StaticSecret {
        &self.dh
    }

    pub(crate) fn put_private(&self, out: &mut Vec<u8>) {
        out.put(Zeroizing::new(self.dh.to_bytes()).as_slice());
        out.put(Zeroizing::new(self.sign.to_bytes()).as_slice());
    }

    pub(crate) fn read_private(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let dh = Zeroizing::new(r.array::<32>("identity_dh_private")?);
        let seed = Zeroizing::new(r.array::<32>("identity_sign_private")?);
        Ok(Self::from_private_bytes(*dh, *seed))
    }
}

/// The public part of a signed prekey, as uploaded to the server.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedPreKeyPublic {
    /// Prekey id, chosen by the owner.
    pub id: u32,
    /// X25519 public key `SPK`.
    pub public: [u8; 32],
    /// Ed25519 signature by `IKsig` over `Encode(SPK)`.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedPreKeyPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedPreKeyPublic")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A signed prekey pair: id, X25519 pair, signature over `Encode(SPK)`.
#[derive(Clone)]
pub struct SignedPreKey {
    id: u32,
    secret: StaticSecret,
    public: [u8; 32],
    signature: [u8; 64],
}

impl std::fmt::Debug for SignedPreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedPreKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SignedPreKey {
    /// A new signed prekey with `id`, signed by `identity`.
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(
        id: u32,
        identity: &IdentityKeyPair,
        rng: &mut R,
    ) -> Self {
        Self::from_secret(id, identity, StaticSecret::random_from_rng(&mut *rng))
    }

    /// A signed prekey from a given private key (test vectors).
    pub fn from_secret(id: u32, identity: &IdentityKeyPair, secret: StaticSecret) -> Self {
        let public = public_of(&secret);
        let signature = identity.sign(&encode_public(&public));
        Self {
            id,
            secret,
            public,
            signature,
        }
    }

    /// The id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The part to upload.
    pub fn public(&self) -> SignedPreKeyPublic {
        SignedPreKeyPublic {
            id: self.id,
            public: self.public,
            signature: self.signature,
        }
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.id);
        out.put(Zeroizing::new(self.secret.to_bytes()).as_slice());
        out.put(&self.signature);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.u32("signed_prekey_id")?;
        let secret = StaticSecret::from(*Zeroizing::new(r.array::<32>("signed_prekey_private")?));
        let signature = r.array("signed_prekey_signature")?;
        let public = public_of(&secret);
        Ok(Self {
            id,
            secret,
            public,
            signature,
        })
    }
}

/// The public part of a one-time prekey, as uploaded to the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OneTimePreKeyPublic {
    /// Prekey id.
    pub id: u32,
    /// X25519 public key `OPK`.
    pub public: [u8; 32],
}

/// A one-time prekey pair. Deleted from the store by the X3DH that uses it.
#[derive(Clone)]
pub struct OneTimePreKey {
    id: u32,
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for OneTimePreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneTimePreKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl OneTimePreKey {
    /// A one-time prekey from a given private key (test vectors).
    pub fn from_secret(id: u32, secret: StaticSecret) -> Self {
        let public = public_of(&secret);
        Self { id, secret, public }
    }

    /// The id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The part to upload.
    pub fn public(&self) -> OneTimePreKeyPublic {
        OneTimePreKeyPublic {
            id: self.id,
            public: self.public,
        }
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

/// The private prekeys of this device. One-time prekeys leave it through
/// [`PreKeyStore::take_one_time_prekey`], which X3DH's responder calls: a one-time prekey is
/// used for at most one X3DH and then deleted (X3DH §3.4).
#[derive(Clone, Debug, Default)]
pub struct PreKeyStore {
    /// Oldest first; the last one is the current signed prekey.
    signed: VecDeque<SignedPreKey>,
    one_time: BTreeMap<u32, OneTimePreKey>,
    next_signed_id: u32,
    next_one_time_id: u32,
}

impl PreKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            signed: VecDeque::new(),
            one_time: BTreeMap::new(),
            next_signed_id: 1,
            next_one_time_id: 1,
        }
    }

    /// Generates a new signed prekey, makes it current, and forgets the oldest ones beyond
    /// [`MAX_SIGNED_PREKEYS_KEPT`].
    pub fn rotate_signed_prekey<R: RngCore + CryptoRng + ?Sized>(
        &mut self,
        identity: &IdentityKeyPair,
        rng: &mut R,
    ) -> SignedPreKeyPublic {
        let id = self.next_signed_id;
        self.next_signed_id = self.next_signed_id.wrapping_add(1).max(1);
        self.insert_signed_prekey(SignedPreKey::generate(id, identity, rng))
    }

    /// Inserts a signed prekey and makes it current (test vectors, rotation).
    pub fn insert_signed_prekey(&mut self, spk: SignedPreKey) -> SignedPreKeyPublic {
        self.signed.retain(|k| k.id != spk.id);
        let public = spk.public();
        self.signed.push_back(spk);
        while self.signed.len() > MAX_SIGNED_PREKEYS_KEPT {
            self.signed.pop_front();
        }
        public
    }

    /// The current signed prekey, if any was generated.
    pub fn current_signed_prekey(&self) -> Option<&SignedPreKey> {
        self.signed.back()
    }

    /// A signed prekey by id.
    pub fn signed_prekey(&self, id: u32) -> Option<&SignedPreKey> {
        self.signed.iter().find(|k| k.id == id)
    }

    /// Generates `count` one-time prekeys with fresh ids.
    pub fn generate_one_time_prekeys<R: RngCore + CryptoRng + ?Sized>(
        &mut self,
        count: usize,
        rng: &mut R,
    ) -> Result<Vec<OneTimePreKeyPublic>, Error> {
        let room = MAX_ONE_TIME_PREKEYS.saturating_sub(self.one_time.len());
        if count > room {
            return Err(Error::OutOfRange {
                what: "one-time prekeys to generate",
                value: count,
                max: room,
            });
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            // Ids wrap after 2^32 - 1; skip 0 and ids still in the store.
            let mut id = self.next_one_time_id;
            while id == 0 || self.one_time.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            self.next_one_time_id = id.wrapping_add(1);
            let key = OneTimePreKey::from_secret(id, StaticSecret::random_from_rng(&mut *rng));
            out.push(key.public());
            self.one_time.insert(id, key);
        }
        Ok(out)
    }

    /// Inserts a one-time prekey (test vectors). Refused when the store is full.
    pub fn insert_one_time_prekey(&mut self, key: OneTimePreKey) -> Result<(), Error> {
        if self.one_time.len() >= MAX_ONE_TIME_PREKEYS && !self.one_time.contains_key(&key.id) {
            return Err(Error::OutOfRange {
                what: "one-time prekeys held",
                value: self.one_time.len() + 1,
                max: MAX_ONE_TIME_PREKEYS,
            });
        }
        self.one_time.insert(key.id, key);
        Ok(())
    }

    /// Whether the one-time prekey `id` is still held.
    pub fn has_one_time_prekey(&self, id: u32) -> bool {
        self.one_time.contains_key(&id)
    }

    /// One-time prekey `id`, without removing it.
    pub fn one_time_prekey(&self, id: u32) -> Option<&OneTimePreKey> {
        self.one_time.get(&id)
    }

    /// Removes and returns one-time prekey `id`: the deletion X3DH requires after use.
    pub fn take_one_time_prekey(&mut self, id: u32) -> Option<OneTimePreKey> {
        self.one_time.remove(&id)
    }

    /// How many one-time prekeys are left (top up on the server when low).
    pub fn one_time_prekey_count(&self) -> usize {
        self.one_time.len()
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.next_signed_id);
        out.put_u32(self.next_one_time_id);
        out.put_u32(self.signed.len() as u32);
        for k in &self.signed {
            k.put(out);
        }
        out.put_u32(self.one_time.len() as u32);
        for k in self.one_time.values() {
            out.put_u32(k.id);
            out.put(Zeroizing::new(k.secret.to_bytes()).as_slice());
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let next_signed_id = r.u32("next_signed_prekey_id")?;
        let next_one_time_id = r.u32("next_one_time_prekey_id")?;
        let n = r.count("signed_prekey_count", MAX_SIGNED_PREKEYS_KEPT)?;
        let mut signed = VecDeque::with_capacity(n);
        for _ in 0..n {
            signed.push_back(SignedPreKey::read(r)?);
        }
        let n = r.count("one_time_prekey_count", MAX_ONE_TIME_PREKEYS)?;
        let mut one_time = BTreeMap::new();
        for _ in 0..n {
            let id = r.u32("one_time_prekey_id")?;
            let secret =
                StaticSecret::from(*Zeroizing::new(r.array::<32>("one_time_prekey_private")?));
            if one_time
                .insert(id, OneTimePreKey::from_secret(id, secret))
                .is_some()
            {
                return Err(DecodeError::InvalidValue {
                    field: "one_time_prekey_id",
                });
            }
        }
        Ok(Self {
            signed,
            one_time,
            next_signed_id,
            next_one_time_id,
        })
    }
}

/// Verifies a signed prekey signature: Ed25519 (strict) by `identity_sign` over
/// `Encode(spk)` = `0x05 ‖ spk`. The server calls this on upload; clients call it (through
/// [`PreKeyBundle::verify_signature`]) before using a bundle.
pub fn verify_signed_prekey(
    identity_sign: &[u8; 32],
    spk: &[u8; 32],
    sig: &[u8; 64],
) -> Result<(), Error> {
    let key = VerifyingKey::from_bytes(identity_sign).map_err(|_| Error::InvalidSigningKey)?;
    let sig = Signature::from_bytes(sig);
    key.verify_strict(&encode_public(spk), &sig)
        .map_err(|_| Error::BadSignature)
}

/// Domain separator of the device signature message.
pub const DEVICE_SIGNATURE_CONTEXT: &[u8; 13] = b"SWB-device-v1";

/// Bytes of [`device_signature_message`]: 13 + 8 + 2 × 32.
pub const DEVICE_SIGNATURE_MESSAGE_BYTES: usize = 85;

/// The message a primary signs to vouch for a companion device of its account (the signed
/// device identity): `"SWB-device-v1" ‖ user u64 BE ‖ identity_dh ‖ identity_sign`. The
/// device id is not covered (the server assigns it when it binds the device: the signature
/// vouches that these identity keys belong to the account), nor the Noise static key (the
/// server binds that to the link code; contacts never see it).
pub fn device_signature_message(
    user: u64,
    identity_dh: &[u8; 32],
    identity_sign: &[u8; 32],
) -> [u8; DEVICE_SIGNATURE_MESSAGE_BYTES] {
    let mut m = [0u8; DEVICE_SIGNATURE_MESSAGE_BYTES];
    let parts: [&[u8]; 4] = [
        DEVICE_SIGNATURE_CONTEXT,
        &user.to_be_bytes(),
        identity_dh,
        identity_sign,
    ];
    let mut at = 0;
    for p in parts {
        if let Some(dst) = m.get_mut(at..at + p.len()) {
            dst.copy_from_slice(p);
        }
        at += p.len();
    }
    m
}

/// The primary's signature over a companion's keys ([`device_signature_message`]), Ed25519 by
/// the primary's identity signing key.
pub fn sign_device(
    primary: &IdentityKeyPair,
    user: u64,
    identity_dh: &[u8; 32],
    identity_sign: &[u8; 32],
) -> [u8; 64] {
    primary.sign(&device_signature_message(user, identity_dh, identity_sign))
}

/// Verifies a device signature: Ed25519 (strict) by `primary_sign` (the primary's identity
/// signing key) over [`device_signature_message`]. The server calls this on `LinkApprove`;
/// clients call it on every `DeviceList` entry before trusting a companion.
pub fn verify_device_signature(
    primary_sign: &[u8; 32],
    user: u64,
    (identity_dh, identity_sign): (&[u8; 32], &[u8; 32]),
    sig: &[u8; 64],
) -> Result<(), Error> {
    let key = VerifyingKey::from_bytes(primary_sign).map_err(|_| Error::InvalidSigningKey)?;
    let sig = Signature::from_bytes(sig);
    let msg = device_signature_message(user, identity_dh, identity_sign);
    key.verify_strict(&msg, &sig)
        .map_err(|_| Error::BadSignature)
}

/// What the server hands out for a (user, device): identity, signed prekey with signature,
/// and at most one one-time prekey (consumed once by the server).
///
/// Encoding (big-endian), [`PreKeyBundle::encode`]:
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 1 | version `0x01` |
/// | 1 | 32 | `identity_dh` |
/// | 33 | 32 | `identity_sign` |
/// | 65 | 4 | `signed_prekey_id` |
/// | 69 | 32 | `signed_prekey` |
/// | 101 | 64 | `signed_prekey_sig` |
/// | 165 | 1 | `0x00` no one-time prekey, `0x01` one follows |
/// | 166 | 4 | one-time prekey id (only if flag is 1) |
/// | 170 | 32 | one-time prekey (only if flag is 1) |
///
/// 166 bytes without a one-time prekey, 202 with one; nothing may follow.
#[derive(Clone, PartialEq, Eq)]
pub struct PreKeyBundle {
    /// X25519 identity key `IK`.
    pub identity_dh: [u8; 32],
    /// Ed25519 identity signing key `IKsig`.
    pub identity_sign: [u8; 32],
    /// Signed prekey id.
    pub signed_prekey_id: u32,
    /// X25519 signed prekey `SPK`.
    pub signed_prekey: [u8; 32],
    /// Ed25519 signature by `IKsig` over `Encode(SPK)`.
    pub signed_prekey_sig: [u8; 64],
    /// One-time prekey (id, `OPK`), if the server had one left.
    pub one_time_prekey: Option<(u32, [u8; 32])>,
}

impl std::fmt::Debug for PreKeyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreKeyBundle")
            .field("identity", &self.identity())
            .field("signed_prekey_id", &self.signed_prekey_id)
            .field(
                "one_time_prekey_id",
                &self.one_time_prekey.map(|(id, _)| id),
            )
            .finish_non_exhaustive()
    }
}

impl PreKeyBundle {
    /// Encoding version byte.
    pub const VERSION: u8 = 0x01;
    /// Encoded length without a one-time prekey.
    pub const LEN_WITHOUT_ONE_TIME: usize = 166;
    /// Encoded length with a one-time prekey.
    pub const LEN_WITH_ONE_TIME: usize = 202;

    /// Assembles a bundle from the published parts.
    pub fn new(
        identity: &IdentityPublic,
        signed_prekey: &SignedPreKeyPublic,
        one_time_prekey: Option<&OneTimePreKeyPublic>,
    ) -> Self {
        Self {
            identity_dh: identity.dh,
            identity_sign: identity.sign,
            signed_prekey_id: signed_prekey.id,
            signed_prekey: signed_prekey.public,
            signed_prekey_sig: signed_prekey.signature,
            one_time_prekey: one_time_prekey.map(|k| (k.id, k.public)),
        }
    }

    /// The owner's identity.
    pub fn identity(&self) -> IdentityPublic {
        IdentityPublic {
            dh: self.identity_dh,
            sign: self.identity_sign,
        }
    }

    /// Checks the signed prekey signature ([`verify_signed_prekey`]).
    pub fn verify_signature(&self) -> Result<(), Error> {
        verify_signed_prekey(
            &self.identity_sign,
            &self.signed_prekey,
            &self.signed_prekey_sig,
        )
    }

    /// The byte-exact encoding (see the type's docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN_WITH_ONE_TIME);
        out.put_u8(Self::VERSION);
        out.put(&self.identity_dh);
        out.put(&self.identity_sign);
        out.put_u32(self.signed_prekey_id);
        out.put(&self.signed_prekey);
        out.put(&self.signed_prekey_sig);
        match &self.one_time_prekey {
            None => out.put_flag(false),
            Some((id, key)) => {
                out.put_flag(true);
                out.put_u32(*id);
                out.put(key);
            }
        }
        out
    }

    /// Decodes [`PreKeyBundle::encode`]'s output; never panics. Does not verify the
    /// signature (call [`PreKeyBundle::verify_signature`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != Self::VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let identity_dh = read_public(&mut r, "identity_dh")?;
        let identity_sign = r.array("identity_sign")?;
        let signed_prekey_id = r.u32("signed_prekey_id")?;
        let signed_prekey = read_public(&mut r, "signed_prekey")?;
        let signed_prekey_sig = r.array("signed_prekey_sig")?;
        let one_time_prekey = if r.flag("one_time_prekey_present")? {
            Some((
                r.u32("one_time_prekey_id")?,
                read_public(&mut r, "one_time_prekey")?,
            ))
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            identity_dh,
            identity_sign,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_sig,
            one_time_prekey,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    /// RFC 7748 §6.1: X25519 Alice/Bob keys and shared secret.
    #[test]
    fn x25519_rfc7748_section_6_1() {
        let a: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let b: [u8; 32] =
            hex::decode("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
                .unwrap()
                .try_into()
                .unwrap();
        let a = StaticSecret::from(a);
        let b = StaticSecret::from(b);
        let a_pub = public_of(&a);
        let b_pub = public_of(&b);
        assert_eq!(
            hex::encode(a_pub),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(
            hex::encode(b_pub),
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
        );
        let k1 = dh(&a, &b_pub).unwrap();
        let k2 = dh(&b, &a_pub).unwrap();
        assert_eq!(
            hex::encode(*k1),
            "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
        );
        assert_eq!(*k1, *k2);
    }

    #[test]
    fn canonical_public_keys() {
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert!(!is_canonical_public(&p));
        let mut below = p;
        below[0] = 0xec;
        assert!(is_canonical_public(&below));
        assert!(is_canonical_public(&[0u8; 32]));
        let mut top = [0u8; 32];
        top[31] = 0x80;
        assert!(!is_canonical_public(&top));
        for _ in 0..64 {
            let k = public_of(&StaticSecret::random_from_rng(OsRng));
            assert!(is_canonical_public(&k));
        }
    }

    #[test]
    fn low_order_point_refused() {
        let a = StaticSecret::random_from_rng(OsRng);
        assert!(matches!(dh(&a, &[0u8; 32]), Err(Error::InvalidPublicKey)));
    }

    fn bundle(with_otpk: bool) -> PreKeyBundle {
        let id = IdentityKeyPair::generate(&mut OsRng);
        let mut store = PreKeyStore::new();
        let spk = store.rotate_signed_prekey(&id, &mut OsRng);
        let otpk = store.generate_one_time_prekeys(1, &mut OsRng).unwrap();
        PreKeyBundle::new(
            &id.public(),
            &spk,
            if with_otpk { otpk.first() } else { None },
        )
    }

    #[test]
    fn bundle_roundtrip_and_lengths() {
        for with in [false, true] {
            let b = bundle(with);
            let enc = b.encode();
            assert_eq!(
                enc.len(),
                if with {
                    PreKeyBundle::LEN_WITH_ONE_TIME
                } else {
                    PreKeyBundle::LEN_WITHOUT_ONE_TIME
                }
            );
            assert_eq!(PreKeyBundle::decode(&enc).unwrap(), b);
            b.verify_signature().unwrap();
            for cut in 0..enc.len() {
                assert!(PreKeyBundle::decode(&enc[..cut]).is_err());
            }
            let mut long = enc.clone();
            long.push(0);
            assert_eq!(
                PreKeyBundle::decode(&long),
                Err(DecodeError::TrailingBytes { extra: 1 })
            );
        }
    }

    #[test]
    fn bundle_bad_flag_and_version() {
        let mut enc = bundle(false).encode();
        enc[165] = 2;
        assert!(matches!(
            PreKeyBundle::decode(&enc),
            Err(DecodeError::InvalidValue { .. })
        ));
        enc[0] = 9;
        assert_eq!(
            PreKeyBundle::decode(&enc),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    #[test]
    fn forged_signature_refused() {
        let mut b = bundle(true);
        b.signed_prekey[0] ^= 1;
        assert!(matches!(b.verify_signature(), Err(Error::BadSignature)));
        let mut b = bundle(true);
        b.signed_prekey_sig[10] ^= 1;
        assert!(matches!(b.verify_signature(), Err(Error::BadSignature)));
        // A signature by another identity.
        let mut b = bundle(true);
        let other = IdentityKeyPair::generate(&mut OsRng);
        b.signed_prekey_sig = other.sign(&encode_public(&b.signed_prekey));
        assert!(matches!(b.verify_signature(), Err(Error::BadSignature)));
    }

    #[test]
    fn one_time_prekeys_bounded_and_taken_once() {
        let mut store = PreKeyStore::new();
        let keys = store.generate_one_time_prekeys(10, &mut OsRng).unwrap();
        assert_eq!(store.one_time_prekey_count(), 10);
        let id = keys[3].id;
        assert!(store.take_one_time_prekey(id).is_some());
        assert!(store.take_one_time_prekey(id).is_none());
        assert!(matches!(
            store.generate_one_time_prekeys(MAX_ONE_TIME_PREKEYS, &mut OsRng),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn signed_prekeys_rotate_bounded() {
        let id = IdentityKeyPair::generate(&mut OsRng);
        let mut store = PreKeyStore::new();
        let first = store.rotate_signed_prekey(&id, &mut OsRng);
        for _ in 0..MAX_SIGNED_PREKEYS_KEPT {
            store.rotate_signed_prekey(&id, &mut OsRng);
        }
        assert!(store.signed_prekey(first.id).is_none());
        assert_eq!(
            store.current_signed_prekey().unwrap().id(),
            first.id + MAX_SIGNED_PREKEYS_KEPT as u32
        );
    }
}
