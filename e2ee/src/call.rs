//! Sealed call signalling: the payloads of `CallSignal` / `CallEvent` (docs/protocol.md §21),
//! end-to-end encrypted so that the server sees the call id, the parties and the state, never
//! the SDP or the ICE candidates. The construction, the byte layouts and the vectors are in
//! docs/e2ee.md §17.
//!
//! Sans-IO: nothing here sends, stores or reads a clock (times are passed in as `now_ms`).
//!
//! * The caller device makes a fresh random 32-byte [`CallKey`] `K` per call.
//! * The `OFFER` payload is a [`CallOffer`]: one entry per callee device (its pairwise Double
//!   Ratchet envelope of a [`grant`] that binds `K` to the `call_id`), then the SDP sealed under
//!   `K`. The server relays that one payload to every ringing device; each opens its own entry.
//! * Every later step is a [`CallStep`]: sealed under `K` with AES-256-GCM.
//! * Sealing key: `HKDF-SHA256(salt = call_id u64 BE, ikm = K, info = "Switchboard_Call_v1")`.
//!   Nonce: `direction ‖ 0x00 ‖ sender device u16 ‖ counter u64`, unique because each sender
//!   (the caller device, each callee device) has its own (direction, device) and counts up.
//!   Associated data: [`associated_data`] (version, call id, caller, callee, direction, sender
//!   device, kind, counter; for the offer also the SHA-256 of its entries), so a step replayed
//!   into another call, reflected back to its sender, re-labelled as another kind or moved to
//!   another counter fails, and so does an offer whose entries were changed.
//! * Receivers keep a [`ReplayWindow`] per sender device: a counter seen before fails with
//!   [`CallError::Replayed`].
//! * [`CallKeyring`] is the bounded, expiring table of live calls' keys a session keeps in
//!   memory. Call keys are never persisted.
//!
//! Decoders never panic; every failure is a [`CallError`].
#![deny(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::codec::{Put, Reader};
use crate::envelope::PREKEY_MESSAGE_OVERHEAD;
use crate::error::DecodeError;
use crate::kdf::{aes_gcm_open, aes_gcm_seal, TAG_LEN};
use crate::Address;

/// Version byte of every call payload (offer and step) and of the key grant.
pub const CALL_VERSION: u8 = 0x01;
/// Bytes of a call key.
pub const CALL_KEY_BYTES: usize = 32;
/// HKDF info of the sealing key.
pub const CALL_HKDF_INFO: &[u8] = b"Switchboard_Call_v1";
/// First bytes of a key grant (the plaintext of a pairwise message in an offer).
pub const CALL_GRANT_MAGIC: &[u8; 8] = b"SWBCALLK";
/// Bytes of a key grant: magic (8), version (1), call id (8), key (32).
pub const CALL_GRANT_BYTES: usize = 8 + 1 + 8 + CALL_KEY_BYTES;
/// Largest pairwise envelope of a grant an offer entry may hold: a PreKeyMessage (the caller
/// had no session with that device yet) of a grant.
pub const CALL_GRANT_ENVELOPE_BYTES_MAX: usize = PREKEY_MESSAGE_OVERHEAD + CALL_GRANT_BYTES;
/// Most callee devices one offer carries entries for (the server's device-list limit,
/// `DEVICE_LIST_MAX` in docs/protocol.md).
pub const CALL_DEVICES_MAX: usize = 32;
/// Bytes of an offer entry's header: device (2) and length (2).
pub const CALL_OFFER_ENTRY_HEADER: usize = 4;
/// Bytes of an offer before its entries: version (1) and count (1).
pub const CALL_OFFER_HEADER: usize = 2;
/// Bytes a sealed part adds to its plaintext: counter (8) and tag (16).
pub const CALL_SEALED_OVERHEAD: usize = 8 + TAG_LEN;
/// Bytes a step payload adds to its plaintext: version (1), counter (8), tag (16).
pub const CALL_STEP_OVERHEAD: usize = 1 + CALL_SEALED_OVERHEAD;
/// Largest call payload decoded or produced: a record body can never carry more.
pub const CALL_PAYLOAD_BYTES_MAX: usize = 65_535;
/// Bytes of the associated data.
pub const CALL_AD_BYTES: usize = 39;
/// Counters a receiver still accepts below the highest it has seen (a late ICE candidate).
pub const CALL_REPLAY_WINDOW: u64 = 64;
/// Most live calls a [`CallKeyring`] holds.
pub const CALL_KEYS_MAX: usize = 16;
/// How long the key of an unanswered call is kept: the server's ring timeout (45 s by
/// default) with room to spare.
pub const CALL_RING_TTL_MS: u64 = 120_000;
/// How long the key of an answered call is kept: the server's `call_max_ms` (6 h by default)
/// and a minute.
pub const CALL_ANSWERED_TTL_MS: u64 = 6 * 3_600_000 + 60_000;

/// Kind byte of an `OFFER` (docs/protocol.md §21); the other kinds are passed in by the caller.
pub const KIND_OFFER: u8 = 1;

/// Why a call payload could not be made or opened. Nothing is ever half-applied: a payload
/// that fails leaves the live call (counters, replay windows) as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The bytes are not a well-formed call payload or key grant.
    #[error("malformed call payload: {0}")]
    Decode(#[from] DecodeError),
    /// The offer has no key entry for this device: the caller did not know it (its device
    /// list was older than this device) or the entry was removed on the way.
    #[error("the offer carries no key for device {device}")]
    NotForThisDevice {
        /// This device.
        device: u16,
    },
    /// The key grant names another call: an entry copied from another offer.
    #[error("key grant for call {found:#x}, not {expected:#x}")]
    CallIdMismatch {
        /// The call the offer was delivered as.
        expected: u64,
        /// The call the grant names.
        found: u64,
    },
    /// AES-GCM authentication failed: the payload was altered, sealed under another key, or
    /// its associated data differs (another call, parties, kind, direction or counter).
    #[error("call payload authentication failed")]
    DecryptFailed,
    /// This counter was accepted before from this sender, or is older than the replay window:
    /// a replay.
    #[error("call payload counter {counter} replayed (or too old)")]
    Replayed {
        /// The counter in the payload.
        counter: u64,
    },
    /// No live key for this call: never offered to this device, over, expired or dropped.
    #[error("no key for call {0:#x}")]
    UnknownCall(u64),
    /// An offer for a call id that is live with other parties; the live call is kept.
    #[error("call id {0:#x} is already in use")]
    CallIdInUse(u64),
    /// More callee devices than one offer carries.
    #[error("{count} callee devices, more than {max}")]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
        /// [`CALL_DEVICES_MAX`].
        max: usize,
    },
    /// The payload would be larger than [`CALL_PAYLOAD_BYTES_MAX`].
    #[error("call payload of {len} bytes, more than {max}")]
    TooLarge {
        /// Bytes it would take.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The sender's counter is exhausted (2^64 steps: never in practice).
    #[error("call counter exhausted")]
    CounterExhausted,
    /// The keyring is full of answered calls.
    #[error("more than {max} live calls")]
    TooManyCalls {
        /// [`CALL_KEYS_MAX`].
        max: usize,
    },
    /// A step from a device that cannot send it: a callee step from another user, a caller
    /// step from another device than the caller's, or an offer sealed twice.
    #[error("call payload from the wrong party")]
    WrongParty,
}

/// A call's random key `K`. Zeroized on drop; never persisted.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct CallKey([u8; CALL_KEY_BYTES]);

impl std::fmt::Debug for CallKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallKey(<secret>)")
    }
}

impl CallKey {
    /// A fresh random key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut k = [0u8; CALL_KEY_BYTES];
        rng.fill_bytes(&mut k);
        Self(k)
    }

    /// Wraps raw bytes (vectors, tests).
    pub fn from_bytes(bytes: [u8; CALL_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw bytes (secret: do not log).
    pub fn as_bytes(&self) -> &[u8; CALL_KEY_BYTES] {
        &self.0
    }

    /// The AES-256-GCM key of `call_id`: HKDF-SHA256(salt = `call_id` u64 BE, ikm = K,
    /// info = [`CALL_HKDF_INFO`], 32 bytes).
    pub fn sealing_key(&self, call_id: u64) -> Zeroizing<[u8; 32]> {
        let mut okm = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit: `expand` cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(&call_id.to_be_bytes()), &self.0)
            .expand(CALL_HKDF_INFO, okm.as_mut());
        okm
    }
}

/// Which way a step goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// From the caller device to the callee's devices (offer, caller ICE, caller hangup).
    CallerToCallee,
    /// From one callee device to the caller device.
    CalleeToCaller,
}

impl Direction {
    /// The byte in the nonce and the associated data: 0 or 1.
    pub fn byte(self) -> u8 {
        match self {
            Direction::CallerToCallee => 0,
            Direction::CalleeToCaller => 1,
        }
    }
}

/// Who is in a call: what both sides know without the payload (the caller device from the
/// `CallEvent`'s `from`, the callee user from the `CallSignal`'s `peer`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CallContext {
    /// The call id (the caller's random 64 bits).
    pub call_id: u64,
    /// The calling device.
    pub caller: Address,
    /// The called user.
    pub callee: u64,
}

/// The associated data of a sealed part (39 bytes): `version u8 ‖ call_id u64 ‖ caller user
/// u64 ‖ caller device u16 ‖ callee user u64 ‖ direction u8 ‖ sender device u16 ‖ kind u8 ‖
/// counter u64`, integers big-endian.
pub fn associated_data(
    ctx: &CallContext,
    direction: Direction,
    sender_device: u16,
    kind: u8,
    counter: u64,
) -> [u8; CALL_AD_BYTES] {
    let mut v = Vec::with_capacity(CALL_AD_BYTES);
    v.put_u8(CALL_VERSION);
    v.put_u64(ctx.call_id);
    ctx.caller.put(&mut v);
    v.put_u64(ctx.callee);
    v.put_u8(direction.byte());
    v.put_u16(sender_device);
    v.put_u8(kind);
    v.put_u64(counter);
    let mut ad = [0u8; CALL_AD_BYTES];
    debug_assert_eq!(v.len(), CALL_AD_BYTES);
    ad.copy_from_slice(&v);
    ad
}

/// [`associated_data`], then the offer's entries digest if there is one (71 bytes for an
/// offer, 39 for a step).
fn full_ad(
    ctx: &CallContext,
    direction: Direction,
    sender_device: u16,
    kind: u8,
    counter: u64,
    entries_digest: Option<&[u8; 32]>,
) -> Vec<u8> {
    let mut ad = Vec::with_capacity(CALL_AD_BYTES + 32);
    ad.put(&associated_data(
        ctx,
        direction,
        sender_device,
        kind,
        counter,
    ));
    if let Some(d) = entries_digest {
        ad.put(d);
    }
    ad
}

/// The nonce of a sealed part: `direction u8 ‖ 0x00 ‖ sender device u16 ‖ counter u64`.
pub fn nonce(direction: Direction, sender_device: u16, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    let (head, count) = n.split_at_mut(4);
    head.copy_from_slice(&[
        direction.byte(),
        0,
        (sender_device >> 8) as u8,
        sender_device as u8,
    ]);
    count.copy_from_slice(&counter.to_be_bytes());
    n
}

/// A sealed part: the sender's counter and the AES-256-GCM ciphertext with its tag.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Sealed {
    /// The sender's counter (0 for an offer, then one more per step of that sender).
    pub counter: u64,
    /// Ciphertext ‖ 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    fn put(&self, out: &mut Vec<u8>) {
        out.put_u64(self.counter);
        out.put(&self.ciphertext);
    }

    /// The counter, then everything left as ciphertext (at least a tag).
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let counter = r.u64("counter")?;
        let ciphertext = r.rest().to_vec();
        if ciphertext.len() < TAG_LEN {
            return Err(DecodeError::CiphertextTooShort {
                len: ciphertext.len(),
            });
        }
        Ok(Self {
            counter,
            ciphertext,
        })
    }
}

/// Seals `plaintext` under `key` for `ctx` (docs/e2ee.md §17.3). `entries_digest` is the
/// offer's [`CallOffer::entries_digest`] (appended to the associated data), `None` for a step.
pub fn seal(
    key: &CallKey,
    ctx: &CallContext,
    direction: Direction,
    sender_device: u16,
    kind: u8,
    counter: u64,
    entries_digest: Option<&[u8; 32]>,
    plaintext: &[u8],
) -> Sealed {
    let k = key.sealing_key(ctx.call_id);
    let ad = full_ad(ctx, direction, sender_device, kind, counter, entries_digest);
    let ciphertext = aes_gcm_seal(
        &k,
        &nonce(direction, sender_device, counter),
        plaintext,
        &ad,
    );
    Sealed {
        counter,
        ciphertext,
    }
}

/// Opens a sealed part; any mismatch is [`CallError::DecryptFailed`].
pub fn open(
    key: &CallKey,
    ctx: &CallContext,
    direction: Direction,
    sender_device: u16,
    kind: u8,
    entries_digest: Option<&[u8; 32]>,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, CallError> {
    let k = key.sealing_key(ctx.call_id);
    let ad = full_ad(
        ctx,
        direction,
        sender_device,
        kind,
        sealed.counter,
        entries_digest,
    );
    let n = nonce(direction, sender_device, sealed.counter);
    aes_gcm_open(&k, &n, &sealed.ciphertext, &ad).map_err(|_| CallError::DecryptFailed)
}

/// The key grant of `call_id` (49 bytes): `"SWBCALLK" ‖ version u8 ‖ call_id u64 ‖ K`. The
/// plaintext a caller encrypts to each callee device with the pairwise session.
pub fn grant(call_id: u64, key: &CallKey) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(CALL_GRANT_BYTES));
    v.put(CALL_GRANT_MAGIC);
    v.put_u8(CALL_VERSION);
    v.put_u64(call_id);
    v.put(key.as_bytes());
    debug_assert_eq!(v.len(), CALL_GRANT_BYTES);
    v
}

/// Reads a key grant and checks that it names `call_id`.
pub fn open_grant(bytes: &[u8], call_id: u64) -> Result<CallKey, CallError> {
    let mut r = Reader::new(bytes);
    if r.take(CALL_GRANT_MAGIC.len(), "grant_magic")? != CALL_GRANT_MAGIC {
        return Err(DecodeError::InvalidValue {
            field: "grant_magic",
        }
        .into());
    }
    let version = r.u8("grant_version")?;
    if version != CALL_VERSION {
        return Err(DecodeError::UnknownVersion(version).into());
    }
    let found = r.u64("grant_call_id")?;
    let key = CallKey(r.array::<CALL_KEY_BYTES>("call_key")?);
    r.finish()?;
    if found != call_id {
        return Err(CallError::CallIdMismatch {
            expected: call_id,
            found,
        });
    }
    Ok(key)
}

fn entries_digest(entries: &[OfferEntry]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([entries.len() as u8]);
    for e in entries {
        h.update(e.device.to_be_bytes());
        h.update((e.grant.len() as u16).to_be_bytes());
        h.update(&e.grant);
    }
    h.finalize().into()
}

/// One callee device's entry in an offer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OfferEntry {
    /// The callee device.
    pub device: u16,
    /// The pairwise envelope (docs/e2ee.md §5) of the [`grant`] for that device.
    pub grant: Vec<u8>,
}

/// The `OFFER` payload: `version u8 ‖ count u8 ‖ count × (device u16 ‖ len u16 ‖ grant
/// envelope) ‖ counter u64 (= 0) ‖ ciphertext ‖ tag`. Devices strictly increasing.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CallOffer {
    /// One entry per callee device, by device id.
    pub entries: Vec<OfferEntry>,
    /// The SDP offer, sealed (counter 0).
    pub sealed: Sealed,
}

impl CallOffer {
    /// The payload bytes. Checks the documented rules first.
    pub fn encode(&self) -> Result<Vec<u8>, CallError> {
        self.check()?;
        let len = self.encoded_len();
        if len > CALL_PAYLOAD_BYTES_MAX {
            return Err(CallError::TooLarge {
                len,
                max: CALL_PAYLOAD_BYTES_MAX,
            });
        }
        let mut out = Vec::with_capacity(len);
        out.put_u8(CALL_VERSION);
        out.put_u8(self.entries.len() as u8);
        for e in &self.entries {
            out.put_u16(e.device);
            out.put_u16(e.grant.len() as u16);
            out.put(&e.grant);
        }
        self.sealed.put(&mut out);
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }

    /// SHA-256 of the entries as encoded (`count u8` and every entry): appended to the
    /// associated data of the offer's SDP, so that no entry can be altered, added or removed
    /// without every device's SDP failing.
    pub fn entries_digest(&self) -> [u8; 32] {
        entries_digest(&self.entries)
    }

    /// Bytes [`CallOffer::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        CALL_OFFER_HEADER
            + self
                .entries
                .iter()
                .map(|e| CALL_OFFER_ENTRY_HEADER + e.grant.len())
                .sum::<usize>()
            + 8
            + self.sealed.ciphertext.len()
    }

    fn check(&self) -> Result<(), DecodeError> {
        if self.entries.is_empty() || self.entries.len() > CALL_DEVICES_MAX {
            return Err(DecodeError::TooLarge {
                field: "entry_count",
                len: self.entries.len(),
                max: CALL_DEVICES_MAX,
            });
        }
        for pair in self.entries.windows(2) {
            if let [a, b] = pair {
                if a.device >= b.device {
                    return Err(DecodeError::InvalidValue {
                        field: "entry_device",
                    });
                }
            }
        }
        for e in &self.entries {
            if e.grant.is_empty() || e.grant.len() > CALL_GRANT_ENVELOPE_BYTES_MAX {
                return Err(DecodeError::TooLarge {
                    field: "entry_len",
                    len: e.grant.len(),
                    max: CALL_GRANT_ENVELOPE_BYTES_MAX,
                });
            }
        }
        if self.sealed.counter != 0 {
            return Err(DecodeError::InvalidValue {
                field: "offer_counter",
            });
        }
        if self.sealed.ciphertext.len() < TAG_LEN {
            return Err(DecodeError::CiphertextTooShort {
                len: self.sealed.ciphertext.len(),
            });
        }
        Ok(())
    }

    /// Parses an offer payload; refuses anything [`CallOffer::encode`] would not write.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > CALL_PAYLOAD_BYTES_MAX {
            return Err(DecodeError::TooLarge {
                field: "call_payload",
                len: bytes.len(),
                max: CALL_PAYLOAD_BYTES_MAX,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != CALL_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let count = usize::from(r.u8("entry_count")?);
        if count == 0 || count > CALL_DEVICES_MAX {
            return Err(DecodeError::TooLarge {
                field: "entry_count",
                len: count,
                max: CALL_DEVICES_MAX,
            });
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let device = r.u16("entry_device")?;
            let len = usize::from(r.u16("entry_len")?);
            if len == 0 || len > CALL_GRANT_ENVELOPE_BYTES_MAX {
                return Err(DecodeError::TooLarge {
                    field: "entry_len",
                    len,
                    max: CALL_GRANT_ENVELOPE_BYTES_MAX,
                });
            }
            let grant = r.take(len, "entry_grant")?.to_vec();
            entries.push(OfferEntry { device, grant });
        }
        let sealed = Sealed::read(&mut r)?;
        let offer = Self { entries, sealed };
        offer.check()?;
        Ok(offer)
    }

    /// This device's grant envelope.
    pub fn entry(&self, device: u16) -> Result<&[u8], CallError> {
        self.entries
            .iter()
            .find(|e| e.device == device)
            .map(|e| e.grant.as_slice())
            .ok_or(CallError::NotForThisDevice { device })
    }
}

/// Every payload after the offer: `version u8 ‖ counter u64 ‖ ciphertext ‖ tag`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CallStep {
    /// The sealed part.
    pub sealed: Sealed,
}

impl CallStep {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + self.sealed.ciphertext.len());
        out.put_u8(CALL_VERSION);
        self.sealed.put(&mut out);
        out
    }

    /// Parses a step payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > CALL_PAYLOAD_BYTES_MAX {
            return Err(DecodeError::TooLarge {
                field: "call_payload",
                len: bytes.len(),
                max: CALL_PAYLOAD_BYTES_MAX,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != CALL_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        Ok(Self {
            sealed: Sealed::read(&mut r)?,
        })
    }
}

/// The counters accepted from one sender: anything above the highest seen, and the unseen
/// ones among the [`CALL_REPLAY_WINDOW`] below it (the IPsec anti-replay window, RFC 4303
/// §3.4.3). Checked before opening, updated only after the AEAD accepted the payload.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    /// Bit `i` set: counter `next - 1 - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// Whether `counter` would be accepted.
    pub fn check(&self, counter: u64) -> Result<(), CallError> {
        // No sender ever uses u64::MAX (its counter is exhausted first), so `next` never
        // overflows.
        if counter == u64::MAX {
            return Err(CallError::Replayed { counter });
        }
        if counter >= self.next {
            return Ok(());
        }
        let back = self.next - 1 - counter;
        if back >= CALL_REPLAY_WINDOW || self.seen & (1u64 << back) != 0 {
            return Err(CallError::Replayed { counter });
        }
        Ok(())
    }

    /// Records `counter` as accepted (after [`ReplayWindow::check`] and the AEAD).
    pub fn accept(&mut self, counter: u64) {
        if counter >= self.next {
            let shift = counter - self.next + 1;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = counter.saturating_add(1);
        } else {
            let back = self.next - 1 - counter;
            if back < 64 {
                self.seen |= 1u64 << back;
            }
        }
        debug_assert!(
            self.check(counter).is_err(),
            "an accepted counter is refused next"
        );
    }
}

/// This device's side of a call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// This device called.
    Caller,
    /// This device is one of the callee's devices.
    Callee,
}

/// A live call's key and counters: what a device needs to seal its steps and open the other
/// side's.
#[derive(Clone, Debug)]
pub struct LiveCall {
    key: CallKey,
    ctx: CallContext,
    role: Role,
    /// This device.
    me: u16,
    /// The counter of this device's next sealed part.
    next_counter: u64,
    /// Per sender device of the other side.
    windows: BTreeMap<u16, ReplayWindow>,
    answered: bool,
    expires_at_ms: u64,
}

impl LiveCall {
    /// The caller's side of a new call, before its offer is sealed.
    pub fn caller(key: CallKey, ctx: CallContext, now_ms: u64) -> Self {
        Self {
            key,
            ctx,
            role: Role::Caller,
            me: ctx.caller.device,
            next_counter: 0,
            windows: BTreeMap::new(),
            answered: false,
            expires_at_ms: now_ms.saturating_add(CALL_RING_TTL_MS),
        }
    }

    /// The callee device `me`'s side, from the key its grant carried and the offer: opens the
    /// SDP (sealed by the caller device with counter 0) and returns it.
    pub fn callee(
        key: CallKey,
        ctx: CallContext,
        me: u16,
        offer: &CallOffer,
        now_ms: u64,
    ) -> Result<(Self, Zeroizing<Vec<u8>>), CallError> {
        let mut call = Self {
            key,
            ctx,
            role: Role::Callee,
            me,
            next_counter: 0,
            windows: BTreeMap::new(),
            answered: false,
            expires_at_ms: now_ms.saturating_add(CALL_RING_TTL_MS),
        };
        let digest = offer.entries_digest();
        let sdp = call.open_sealed(ctx.caller.device, KIND_OFFER, Some(&digest), &offer.sealed)?;
        Ok((call, sdp))
    }

    /// Who is in the call.
    pub fn context(&self) -> &CallContext {
        &self.ctx
    }

    /// This device's side.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the call was answered (the key then lives up to [`CALL_ANSWERED_TTL_MS`]).
    pub fn is_answered(&self) -> bool {
        self.answered
    }

    /// When the key expires.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    /// Marks the call answered: the key is kept up to [`CALL_ANSWERED_TTL_MS`] from now.
    pub fn mark_answered(&mut self, now_ms: u64) {
        self.answered = true;
        self.expires_at_ms = now_ms.saturating_add(CALL_ANSWERED_TTL_MS);
    }

    fn outgoing(&self) -> Direction {
        match self.role {
            Role::Caller => Direction::CallerToCallee,
            Role::Callee => Direction::CalleeToCaller,
        }
    }

    fn take_counter(&mut self) -> Result<u64, CallError> {
        let c = self.next_counter;
        self.next_counter = c.checked_add(1).ok_or(CallError::CounterExhausted)?;
        Ok(c)
    }

    /// Caller: the offer payload with `entries` (the grant envelopes) and the sealed `sdp`.
    /// Only once, as the first sealed part of the call.
    pub fn seal_offer(
        &mut self,
        entries: Vec<OfferEntry>,
        sdp: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        if self.role != Role::Caller || self.next_counter != 0 {
            return Err(CallError::WrongParty);
        }
        if entries.len() > CALL_DEVICES_MAX {
            return Err(CallError::TooManyDevices {
                count: entries.len(),
                max: CALL_DEVICES_MAX,
            });
        }
        let digest = entries_digest(&entries);
        let sealed = seal(
            &self.key,
            &self.ctx,
            Direction::CallerToCallee,
            self.me,
            KIND_OFFER,
            0,
            Some(&digest),
            sdp,
        );
        let bytes = CallOffer { entries, sealed }.encode()?;
        self.next_counter = 1;
        Ok(bytes)
    }

    /// A later step of this device (`kind` 2..=6): the step payload sealing `plaintext`.
    pub fn seal_step(&mut self, kind: u8, plaintext: &[u8]) -> Result<Vec<u8>, CallError> {
        let len = plaintext.len() + CALL_STEP_OVERHEAD;
        if len > CALL_PAYLOAD_BYTES_MAX {
            return Err(CallError::TooLarge {
                len,
                max: CALL_PAYLOAD_BYTES_MAX,
            });
        }
        if self.role == Role::Caller && self.next_counter == 0 {
            // Counter 0 of the caller is the offer's.
            return Err(CallError::WrongParty);
        }
        let counter = self.take_counter()?;
        let sealed = seal(
            &self.key,
            &self.ctx,
            self.outgoing(),
            self.me,
            kind,
            counter,
            None,
            plaintext,
        );
        Ok(CallStep { sealed }.encode())
    }

    /// Opens a step payload of `kind` that the other side's device `from` (user, device) sent.
    pub fn open_step(
        &mut self,
        from: Address,
        kind: u8,
        payload: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let step = CallStep::decode(payload)?;
        let expected_user = match self.role {
            Role::Caller => self.ctx.callee,
            Role::Callee => self.ctx.caller.user,
        };
        if from.user != expected_user
            || (self.role == Role::Callee && from.device != self.ctx.caller.device)
        {
            return Err(CallError::WrongParty);
        }
        self.open_sealed(from.device, kind, None, &step.sealed)
    }

    fn open_sealed(
        &mut self,
        sender_device: u16,
        kind: u8,
        entries_digest: Option<&[u8; 32]>,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let incoming = match self.role {
            Role::Caller => Direction::CalleeToCaller,
            Role::Callee => Direction::CallerToCallee,
        };
        // A callee hears from one caller device, a caller from the callee's devices: at most
        // CALL_DEVICES_MAX windows (a sender past that is refused before anything is opened).
        let window = match self.windows.get(&sender_device) {
            Some(w) => *w,
            None if self.windows.len() >= CALL_DEVICES_MAX => return Err(CallError::WrongParty),
            None => ReplayWindow::default(),
        };
        window.check(sealed.counter)?;
        let plaintext = open(
            &self.key,
            &self.ctx,
            incoming,
            sender_device,
            kind,
            entries_digest,
            sealed,
        )?;
        let mut window = window;
        window.accept(sealed.counter);
        self.windows.insert(sender_device, window);
        debug_assert!(self.windows.len() <= CALL_DEVICES_MAX);
        Ok(plaintext)
    }
}

/// The live calls' keys of one session, by call id: at most [`CALL_KEYS_MAX`], each expiring
/// ([`CALL_RING_TTL_MS`] until answered, then [`CALL_ANSWERED_TTL_MS`]). Memory only.
#[derive(Default, Debug)]
pub struct CallKeyring {
    calls: BTreeMap<u64, LiveCall>,
}

impl CallKeyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Live calls held (expired ones included until the next call that takes `now_ms`).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether no call is held.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        self.calls.retain(|_, c| c.expires_at_ms > now_ms);
    }

    /// Adds a call. An id already held for the same parties is replaced (a new offer of the
    /// same call after a restart of the caller); for other parties it is
    /// [`CallError::CallIdInUse`]. When full, the oldest unanswered call makes room; when all
    /// are answered, [`CallError::TooManyCalls`].
    pub fn insert(&mut self, now_ms: u64, call: LiveCall) -> Result<(), CallError> {
        self.expire(now_ms);
        let id = call.ctx.call_id;
        if let Some(old) = self.calls.get(&id) {
            if old.ctx != call.ctx || old.role != call.role {
                return Err(CallError::CallIdInUse(id));
            }
            self.calls.insert(id, call);
            return Ok(());
        }
        if self.calls.len() >= CALL_KEYS_MAX {
            let victim = self
                .calls
                .iter()
                .filter(|(_, c)| !c.answered)
                .min_by_key(|(_, c)| c.expires_at_ms)
                .map(|(id, _)| *id)
                .ok_or(CallError::TooManyCalls { max: CALL_KEYS_MAX })?;
            self.calls.remove(&victim);
        }
        self.calls.insert(id, call);
        debug_assert!(self.calls.len() <= CALL_KEYS_MAX);
        Ok(())
    }

    /// The live call `call_id`, unless it expired.
    pub fn get_mut(&mut self, now_ms: u64, call_id: u64) -> Option<&mut LiveCall> {
        self.expire(now_ms);
        self.calls.get_mut(&call_id)
    }

    /// The live call `call_id`, or [`CallError::UnknownCall`].
    pub fn call(&mut self, now_ms: u64, call_id: u64) -> Result<&mut LiveCall, CallError> {
        self.get_mut(now_ms, call_id)
            .ok_or(CallError::UnknownCall(call_id))
    }

    /// Drops the key of `call_id` (hangup, reject, busy, missed, answered elsewhere).
    /// Returns whether it was held.
    pub fn remove(&mut self, call_id: u64) -> bool {
        self.calls.remove(&call_id).is_some()
    }
}
