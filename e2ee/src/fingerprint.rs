//! Safety numbers (Signal's numeric fingerprint) and the trust-on-first-use identity record.
//!
//! Per side: `h0 = SHA-512(version ‖ key ‖ stable_id ‖ key)`, then
//! `h(i) = SHA-512(h(i-1) ‖ key)` up to [`FINGERPRINT_ITERATIONS`] hashes in all, where
//! `version` = `0x00 0x00`, `key` = [`IdentityPublic::fingerprint_bytes`]
//! (`Encode(IK) ‖ IKsig`, 65 bytes) and `stable_id` = the user's phone number as ASCII with a
//! leading `+` (Switchboard user ids are E.164 numbers). The first 30 bytes of the result are
//! read as six 5-byte big-endian integers, each taken mod 100000 and printed as 5 digits: 30
//! digits. The two sides' 30-digit strings are concatenated smaller first, so both users see
//! the same 60 digits, displayed as 12 groups of 5.

use std::collections::BTreeMap;

use sha2::{Digest, Sha512};

use crate::codec::{Put, Reader};
use crate::error::{DecodeError, Error};
use crate::keys::IdentityPublic;
use crate::Address;

/// Fingerprint format version (2 bytes, big-endian, hashed first), as Signal's.
pub const FINGERPRINT_VERSION: u16 = 0;
/// SHA-512 iterations per side, as Signal's.
pub const FINGERPRINT_ITERATIONS: u32 = 5200;
/// Most identities the trust store records.
pub const MAX_KNOWN_IDENTITIES: usize = 100_000;

/// The 30 digits of one side, from its stable id and identity key bytes.
pub fn fingerprint_digits(stable_id: &[u8], key: &[u8], iterations: u32) -> String {
    let mut hash = {
        let mut h = Sha512::new();
        h.update(FINGERPRINT_VERSION.to_be_bytes());
        h.update(key);
        h.update(stable_id);
        h.update(key);
        h.finalize()
    };
    for _ in 1..iterations {
        let mut h = Sha512::new();
        h.update(hash);
        h.update(key);
        hash = h.finalize();
    }
    let mut out = String::with_capacity(30);
    for chunk in hash.chunks_exact(5).take(6) {
        let v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&format!("{:05}", v % 100_000));
    }
    out
}

/// The stable identifier of a user: `+` and the E.164 digits.
pub fn stable_id(user: u64) -> String {
    format!("+{user}")
}

/// A 60-digit safety number, identical on both sides.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SafetyNumber {
    digits: String,
}

impl SafetyNumber {
    /// The safety number between `local` (user id, identity) and `remote`.
    pub fn new(
        local_user: u64,
        local: &IdentityPublic,
        remote_user: u64,
        remote: &IdentityPublic,
    ) -> Self {
        Self::from_parts(
            stable_id(local_user).as_bytes(),
            &local.fingerprint_bytes(),
            stable_id(remote_user).as_bytes(),
            &remote.fingerprint_bytes(),
        )
    }

    /// From raw stable ids and key bytes (used by the known-answer test against Signal's
    /// published vector, whose keys are 33-byte `Encode(IK)` values).
    pub fn from_parts(
        local_id: &[u8],
        local_key: &[u8],
        remote_id: &[u8],
        remote_key: &[u8],
    ) -> Self {
        let l = fingerprint_digits(local_id, local_key, FINGERPRINT_ITERATIONS);
        let r = fingerprint_digits(remote_id, remote_key, FINGERPRINT_ITERATIONS);
        let digits = if l < r { l + &r } else { r + &l };
        Self { digits }
    }

    /// The 60 digits without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// 12 groups of 5 digits separated by spaces.
    pub fn grouped(&self) -> String {
        let groups: Vec<&str> = (0..12)
            .filter_map(|i| self.digits.get(i * 5..i * 5 + 5))
            .collect();
        groups.join(" ")
    }
}

impl std::fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.grouped())
    }
}

/// What the trust store says about a presented identity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Trust {
    /// No identity was recorded for this (user, device): it will be recorded on first use.
    FirstSeen,
    /// The presented identity is the recorded one.
    Known,
}

/// The first identity seen per (user, device) (trust on first use). A different identity
/// later is reported as [`Error::IdentityChanged`] and never silently accepted.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    known: BTreeMap<Address, IdentityPublic>,
}

impl TrustStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `identity` for `peer` without changing anything.
    pub fn check(&self, peer: Address, identity: &IdentityPublic) -> Result<Trust, Error> {
        match self.known.get(&peer) {
            None => Ok(Trust::FirstSeen),
            Some(k) if k == identity => Ok(Trust::Known),
            Some(k) => Err(Error::IdentityChanged {
                peer,
                known: Box::new(*k),
                received: Box::new(*identity),
            }),
        }
    }

    /// Records `identity` for `peer` if none is recorded; errors if a different one is.
    pub fn remember(&mut self, peer: Address, identity: &IdentityPublic) -> Result<Trust, Error> {
        let t = self.check(peer, identity)?;
        if t == Trust::FirstSeen {
            if self.known.len() >= MAX_KNOWN_IDENTITIES {
                return Err(Error::OutOfRange {
                    what: "known identities",
                    value: self.known.len() + 1,
                    max: MAX_KNOWN_IDENTITIES,
                });
            }
            self.known.insert(peer, *identity);
        }
        Ok(t)
    }

    /// Replaces the recorded identity (after the user accepted the change).
    pub fn replace(&mut self, peer: Address, identity: &IdentityPublic) {
        self.known.insert(peer, *identity);
    }

    /// Drops the record of `peer` (rollback of a failed write).
    pub(crate) fn forget(&mut self, peer: Address) {
        self.known.remove(&peer);
    }

    /// The recorded identity of `peer`.
    pub fn get(&self, peer: Address) -> Option<&IdentityPublic> {
        self.known.get(&peer)
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.known.len() as u32);
        for (a, id) in &self.known {
            a.put(out);
            id.put(out);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.count("known_identity_count", MAX_KNOWN_IDENTITIES)?;
        let mut known = BTreeMap::new();
        for _ in 0..n {
            let a = Address::read(r)?;
            let id = IdentityPublic::read(r)?;
            if known.insert(a, id).is_some() {
                return Err(DecodeError::InvalidValue {
                    field: "known_identity_address",
                });
            }
        }
        Ok(Self { known })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signal's published vector (libsignal NumericFingerprintGeneratorTest, version 1):
    /// identity keys as 33-byte `Encode(IK)`, stable ids "+14152222222" / "+14153333333",
    /// 5200 iterations.
    #[test]
    fn signal_known_answer() {
        let alice =
            hex::decode("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
                .unwrap();
        let bob = hex::decode("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
            .unwrap();
        let a = SafetyNumber::from_parts(b"+14152222222", &alice, b"+14153333333", &bob);
        let b = SafetyNumber::from_parts(b"+14153333333", &bob, b"+14152222222", &alice);
        assert_eq!(
            a.digits(),
            "300354477692869396892869876765458257569162576843440918079131"
        );
        assert_eq!(a, b);
        assert_eq!(
            a.grouped(),
            "30035 44776 92869 39689 28698 76765 45825 75691 62576 84344 09180 79131"
        );
    }

    #[test]
    fn trust_on_first_use() {
        let mut t = TrustStore::new();
        let peer = Address {
            user: 14155550100,
            device: 0,
        };
        let a = IdentityPublic {
            dh: [1; 32],
            sign: [2; 32],
        };
        let mut b = a;
        b.sign[0] ^= 1;
        assert_eq!(t.remember(peer, &a).unwrap(), Trust::FirstSeen);
        assert_eq!(t.remember(peer, &a).unwrap(), Trust::Known);
        assert!(matches!(
            t.check(peer, &b),
            Err(Error::IdentityChanged { .. })
        ));
        t.replace(peer, &b);
        assert_eq!(t.check(peer, &b).unwrap(), Trust::Known);
    }
}
