//! The Double Ratchet (Signal's "The Double Ratchet Algorithm", revision 1, §3), with
//! `GENERATE_DH` = X25519, `KDF_RK` = HKDF-SHA256, `KDF_CK` = HMAC-SHA256 (constants `0x01`
//! for the message key, `0x02` for the next chain key), and `ENCRYPT` = AES-256-GCM with key
//! and nonce derived from the message key by HKDF (see [`crate::kdf`]).
//!
//! The associated data given to the AEAD is `CONCAT(AD, header)` = X3DH AD (130 bytes, fixed
//! length, so the concatenation parses uniquely) ‖ the 40-byte encoded [`Header`].
//!
//! Decryption follows the spec's `RatchetDecrypt` but is transactional, as the spec's §3.5
//! asks ("if an exception is raised ... changes to the state object are discarded"): every
//! change (new skipped keys, a DH ratchet step, the advanced receiving chain) is computed
//! into a staging value and committed only after the AEAD accepted the message.
//!
//! Bounds: at most [`MAX_SKIP`] keys are skipped in one chain by one message
//! ([`Error::TooManySkippedMessages`]); at most [`MAX_SKIPPED_KEYS_TOTAL`] skipped keys are
//! kept per session (the oldest are evicted first: a session must not wedge because the
//! network lost messages). A message key is deleted when used, so a replay fails with
//! [`Error::DuplicateMessage`].

use std::collections::VecDeque;

use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::error::{DecodeError, Error};
use crate::kdf::{kdf_ck, kdf_rk, open, seal, ChainKey, MessageKey, RootKey, SharedKey};
use crate::keys::{dh, read_public};

/// Most message keys one message may make us skip in one receiving chain (the spec's
/// `MAX_SKIP`).
pub const MAX_SKIP: u32 = 1000;

/// Most skipped message keys a session keeps, across all chains. When a new skipped key
/// would exceed this, the oldest stored key is deleted.
pub const MAX_SKIPPED_KEYS_TOTAL: usize = 2000;

/// How many earlier receiving ratchet public keys a session remembers, so that a replayed
/// message of an old chain is reported as [`Error::DuplicateMessage`] rather than tried as a
/// new ratchet step.
pub const MAX_PREVIOUS_RECEIVING_CHAINS: usize = 32;

/// A Double Ratchet message header: the sender's current ratchet public key, the number of
/// messages in its previous sending chain (PN) and this message's number (N).
///
/// Encoding (40 bytes): `dh (32) ‖ pn (u32 BE) ‖ n (u32 BE)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// The sender's ratchet public key.
    pub dh: [u8; 32],
    /// Length of the sender's previous sending chain.
    pub pn: u32,
    /// Message number in the current sending chain.
    pub n: u32,
}

impl Header {
    /// Encoded length.
    pub const LEN: usize = 40;

    /// The 40-byte encoding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let (dh, rest) = out.split_at_mut(32);
        let (pn, n) = rest.split_at_mut(4);
        dh.copy_from_slice(&self.dh);
        pn.copy_from_slice(&self.pn.to_be_bytes());
        n.copy_from_slice(&self.n.to_be_bytes());
        out
    }

    /// Decodes exactly 40 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let h = Self::read(&mut r)?;
        r.finish()?;
        Ok(h)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            dh: read_public(r, "ratchet_key")?,
            pn: r.u32("previous_chain_length")?,
            n: r.u32("message_number")?,
        })
    }
}

/// `CONCAT(ad, header)`.
fn aead_ad(ad: &[u8], header: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(ad.len() + Header::LEN);
    out.extend_from_slice(ad);
    out.extend_from_slice(&header.encode());
    out
}

#[derive(Clone)]
struct SkippedKey {
    dh: [u8; 32],
    n: u32,
    mk: MessageKey,
}

/// The Double Ratchet state of one session (spec §3.2). Every secret in it is zeroized on
/// drop (`StaticSecret`, `RootKey`, `ChainKey`, `MessageKey` all are).
#[derive(Clone)]
pub struct RatchetState {
    dhs: StaticSecret,
    dhs_public: [u8; 32],
    dhr: Option<[u8; 32]>,
    rk: RootKey,
    cks: Option<ChainKey>,
    ckr: Option<ChainKey>,
    ns: u32,
    nr: u32,
    pn: u32,
    skipped: VecDeque<SkippedKey>,
    previous_dhr: VecDeque<[u8; 32]>,
}

impl std::fmt::Debug for RatchetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatchetState")
            .field("ns", &self.ns)
            .field("nr", &self.nr)
            .field("pn", &self.pn)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

/// A DH ratchet step computed but not yet committed.
struct Step {
    dhs: StaticSecret,
    dhr: [u8; 32],
    rk: RootKey,
    cks: ChainKey,
    pn: u32,
}

impl RatchetState {
    /// `RatchetInitAlice(SK, bob_dh_public_key)`, drawing Alice's first ratchet key pair.
    pub fn init_alice<R: RngCore + CryptoRng + ?Sized>(
        sk: &SharedKey,
        bob_ratchet_public: &[u8; 32],
        rng: &mut R,
    ) -> Result<Self, Error> {
        Self::init_alice_with_key(
            sk,
            bob_ratchet_public,
            StaticSecret::random_from_rng(&mut *rng),
        )
    }

    /// `RatchetInitAlice` with a given first ratchet key pair (test vectors).
    pub fn init_alice_with_key(
        sk: &SharedKey,
        bob_ratchet_public: &[u8; 32],
        dhs: StaticSecret,
    ) -> Result<Self, Error> {
        let shared = dh(&dhs, bob_ratchet_public)?;
        let (rk, cks) = kdf_rk(&RootKey(sk.0), &shared);
        Ok(Self {
            dhs_public: PublicKey::from(&dhs).to_bytes(),
            dhs,
            dhr: Some(*bob_ratchet_public),
            rk,
            cks: Some(cks),
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: VecDeque::new(),
            previous_dhr: VecDeque::new(),
        })
    }

    /// `RatchetInitBob(SK, bob_dh_key_pair)`: Bob's key pair is his signed prekey.
    pub fn init_bob(sk: &SharedKey, bob_ratchet_key: StaticSecret) -> Self {
        Self {
            dhs_public: PublicKey::from(&bob_ratchet_key).to_bytes(),
            dhs: bob_ratchet_key,
            dhr: None,
            rk: RootKey(sk.0),
            cks: None,
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: VecDeque::new(),
            previous_dhr: VecDeque::new(),
        }
    }

    /// Our current ratchet public key.
    pub fn ratchet_public(&self) -> [u8; 32] {
        self.dhs_public
    }

    /// Whether the session has a sending chain.
    pub fn can_send(&self) -> bool {
        self.cks.is_some()
    }

    /// How many skipped message keys are stored.
    pub fn skipped_key_count(&self) -> usize {
        self.skipped.len()
    }

    /// `RatchetEncrypt(state, plaintext, AD)`: header and ciphertext ‖ tag.
    pub fn encrypt(&mut self, plaintext: &[u8], ad: &[u8]) -> Result<(Header, Vec<u8>), Error> {
        let cks = self.cks.as_ref().ok_or(Error::NoSendingChain)?;
        let ns = self.ns.checked_add(1).ok_or(Error::CounterExhausted)?;
        let (next, mk) = kdf_ck(cks);
        let header = Header {
            dh: self.dhs_public,
            pn: self.pn,
            n: self.ns,
        };
        let ciphertext = seal(&mk, plaintext, &aead_ad(ad, &header));
        self.cks = Some(next);
        self.ns = ns;
        Ok((header, ciphertext))
    }

    /// `RatchetDecrypt(state, header, ciphertext, AD)`, transactional: on `Err` the state is
    /// exactly as before. `rng` draws the new ratchet key pair of a DH ratchet step.
    pub fn decrypt<R: RngCore + CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        ciphertext: &[u8],
        ad: &[u8],
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let aad = aead_ad(ad, header);

        // TrySkippedMessageKeys: the key is deleted only if the message authenticates.
        if let Some(pos) = self
            .skipped
            .iter()
            .position(|k| k.dh == header.dh && k.n == header.n)
        {
            let plaintext = match self.skipped.get(pos) {
                Some(k) => open(&k.mk, ciphertext, &aad)?,
                None => return Err(Error::DecryptFailed),
            };
            self.skipped.remove(pos);
            return Ok(plaintext);
        }

        // Keys already consumed: same chain with a number we passed, or an old chain whose
        // unskipped keys were all used.
        if self.dhr == Some(header.dh) && header.n < self.nr {
            return Err(Error::DuplicateMessage);
        }
        if self.previous_dhr.contains(&header.dh) {
            return Err(Error::DuplicateMessage);
        }

        let mut new_skipped: Vec<SkippedKey> = Vec::new();
        let mut ckr = self.ckr.clone();
        let mut nr = self.nr;
        let mut step: Option<Step> = None;

        if self.dhr != Some(header.dh) {
            // SkipMessageKeys(state, header.pn) in the old receiving chain, then DHRatchet.
            if let Some(old) = self.dhr {
                skip_message_keys(&mut ckr, &mut nr, &old, header.pn, &mut new_skipped)?;
            } else {
                check_skip(nr, header.pn)?;
            }
            let dh1 = dh(&self.dhs, &header.dh)?;
            let (rk1, new_ckr) = kdf_rk(&self.rk, &dh1);
            let dhs = StaticSecret::random_from_rng(&mut *rng);
            let dh2 = dh(&dhs, &header.dh)?;
            let (rk2, cks) = kdf_rk(&rk1, &dh2);
            step = Some(Step {
                dhs,
                dhr: header.dh,
                rk: rk2,
                cks,
                pn: self.ns,
            });
            ckr = Some(new_ckr);
            nr = 0;
        }

        skip_message_keys(&mut ckr, &mut nr, &header.dh, header.n, &mut new_skipped)?;
        let ck = ckr.ok_or(Error::DecryptFailed)?;
        let (next_ckr, mk) = kdf_ck(&ck);
        let next_nr = nr.checked_add(1).ok_or(Error::CounterExhausted)?;
        let plaintext = open(&mk, ciphertext, &aad)?;

        // Commit.
        if let Some(step) = step {
            if let Some(old) = self.dhr.replace(step.dhr) {
                self.previous_dhr.push_back(old);
                while self.previous_dhr.len() > MAX_PREVIOUS_RECEIVING_CHAINS {
                    self.previous_dhr.pop_front();
                }
            }
            self.pn = step.pn;
            self.ns = 0;
            self.dhs_public = PublicKey::from(&step.dhs).to_bytes();
            self.dhs = step.dhs;
            self.rk = step.rk;
            self.cks = Some(step.cks);
        }
        self.ckr = Some(next_ckr);
        self.nr = next_nr;
        self.skipped.extend(new_skipped);
        while self.skipped.len() > MAX_SKIPPED_KEYS_TOTAL {
            self.skipped.pop_front();
        }
        Ok(plaintext)
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put(Zeroizing::new(self.dhs.to_bytes()).as_slice());
        put_opt(out, self.dhr.as_ref());
        out.put(&self.rk.0);
        put_opt(out, self.cks.as_ref().map(|k| &k.0));
        put_opt(out, self.ckr.as_ref().map(|k| &k.0));
        out.put_u32(self.ns);
        out.put_u32(self.nr);
        out.put_u32(self.pn);
        out.put_u32(self.skipped.len() as u32);
        for k in &self.skipped {
            out.put(&k.dh);
            out.put_u32(k.n);
            out.put(&k.mk.0);
        }
        out.put_u32(self.previous_dhr.len() as u32);
        for k in &self.previous_dhr {
            out.put(k);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let dhs = StaticSecret::from(*Zeroizing::new(r.array::<32>("ratchet_private")?));
        let dhr = read_opt(r, "remote_ratchet_key")?;
        let rk = RootKey(r.array("root_key")?);
        let cks = read_opt(r, "sending_chain_key")?.map(ChainKey);
        let ckr = read_opt(r, "receiving_chain_key")?.map(ChainKey);
        let ns = r.u32("ns")?;
        let nr = r.u32("nr")?;
        let pn = r.u32("pn")?;
        let n = r.count("skipped_key_count", MAX_SKIPPED_KEYS_TOTAL)?;
        let mut skipped = VecDeque::with_capacity(n);
        for _ in 0..n {
            skipped.push_back(SkippedKey {
                dh: r.array("skipped_ratchet_key")?,
                n: r.u32("skipped_n")?,
                mk: MessageKey(r.array("skipped_message_key")?),
            });
        }
        let n = r.count("previous_chain_count", MAX_PREVIOUS_RECEIVING_CHAINS)?;
        let mut previous_dhr = VecDeque::with_capacity(n);
        for _ in 0..n {
            previous_dhr.push_back(r.array("previous_ratchet_key")?);
        }
        Ok(Self {
            dhs_public: PublicKey::from(&dhs).to_bytes(),
            dhs,
            dhr,
            rk,
            cks,
            ckr,
            ns,
            nr,
            pn,
            skipped,
            previous_dhr,
        })
    }
}

fn put_opt(out: &mut Vec<u8>, v: Option<&[u8; 32]>) {
    match v {
        None => out.put_flag(false),
        Some(k) => {
            out.put_flag(true);
            out.put(k);
        }
    }
}

fn read_opt(r: &mut Reader<'_>, field: &'static str) -> Result<Option<[u8; 32]>, DecodeError> {
    if r.flag(field)? {
        Ok(Some(r.array(field)?))
    } else {
        Ok(None)
    }
}

fn check_skip(nr: u32, until: u32) -> Result<(), Error> {
    // The spec's `if state.Nr + MAX_SKIP < until: raise Error()`, without overflow.
    if u64::from(nr) + u64::from(MAX_SKIP) < u64::from(until) {
        return Err(Error::TooManySkippedMessages {
            requested: u64::from(until) - u64::from(nr),
            max: MAX_SKIP,
        });
    }
    Ok(())
}

/// `SkipMessageKeys(state, until)` into a staging list.
fn skip_message_keys(
    ckr: &mut Option<ChainKey>,
    nr: &mut u32,
    dhr: &[u8; 32],
    until: u32,
    out: &mut Vec<SkippedKey>,
) -> Result<(), Error> {
    check_skip(*nr, until)?;
    if let Some(ck) = ckr.as_mut() {
        while *nr < until {
            let (next, mk) = kdf_ck(ck);
            out.push(SkippedKey {
                dh: *dhr,
                n: *nr,
                mk,
            });
            *ck = next;
            *nr += 1;
        }
    }
    Ok(())
}
