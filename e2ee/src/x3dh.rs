//! X3DH (Signal's "The X3DH Key Agreement Protocol", revision 1), with curve = X25519,
//! hash = SHA-256, info = [`crate::kdf::X3DH_INFO`].
//!
//! Initiator (Alice), from Bob's bundle, after verifying `Sig(IKsig_B, Encode(SPK_B))`:
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
//! DH4 = DH(EK_A, OPK_B)   (only if the bundle had a one-time prekey)
//! SK  = HKDF-SHA256(salt = 0x00*32, IKM = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4],
//!                   info = "Switchboard_X3DH_v1", L = 32)
//! AD  = Encode(IK_A) || Encode(IK_B) || IKsig_A || IKsig_B
//! ```
//!
//! `AD` is the spec's `Encode(IK_A) || Encode(IK_B)` with the two Ed25519 identity signing keys
//! appended (§3.3 allows appending identifying information): the signing key is half of a
//! Switchboard identity, so it must be authenticated too. Alice deletes `EK_A`'s private key
//! and the DH outputs as soon as SK is computed (they are zeroized on drop).
//!
//! Responder (Bob) computes the same from the initial message and **deletes the one-time
//! prekey** it used ([`respond`] takes it out of the [`PreKeyStore`]).

use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::error::{DecodeError, Error};
use crate::kdf::{kdf_x3dh, SharedKey};
use crate::keys::{dh, encode_public, IdentityKeyPair, IdentityPublic, PreKeyBundle, PreKeyStore};

/// Length of the associated data: 33 + 33 + 32 + 32.
pub const AD_LEN: usize = 130;

/// X3DH associated data `AD = Encode(IK_A) ‖ Encode(IK_B) ‖ IKsig_A ‖ IKsig_B`
/// (A = initiator, B = responder). Both sides hold the same bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct AssociatedData(pub(crate) [u8; AD_LEN]);

impl std::fmt::Debug for AssociatedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AssociatedData(..)")
    }
}

impl AssociatedData {
    /// Builds AD for `initiator` → `responder`.
    pub fn new(initiator: &IdentityPublic, responder: &IdentityPublic) -> Self {
        let mut ad = Vec::with_capacity(AD_LEN);
        ad.put(&encode_public(&initiator.dh));
        ad.put(&encode_public(&responder.dh));
        ad.put(&initiator.sign);
        ad.put(&responder.sign);
        let mut out = [0u8; AD_LEN];
        out.copy_from_slice(&ad);
        Self(out)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; AD_LEN] {
        &self.0
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self(r.array("associated_data")?))
    }
}

/// The X3DH fields of Alice's initial message (§3.3): her identity, her ephemeral key, and
/// which of Bob's prekeys she used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PreKeyInit {
    /// Alice's identity (`IK_A`, `IKsig_A`).
    pub identity: IdentityPublic,
    /// Alice's ephemeral key `EK_A` (the "base key").
    pub base_key: [u8; 32],
    /// Which signed prekey of Bob's was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey of Bob's was used, if any.
    pub one_time_prekey_id: Option<u32>,
}

/// Alice's X3DH result.
#[derive(Debug)]
pub struct Initiated {
    /// SK: the Double Ratchet's first root key.
    pub shared_key: SharedKey,
    /// AD.
    pub ad: AssociatedData,
    /// The fields to send in every PreKeyMessage until Bob answers.
    pub init: PreKeyInit,
    /// Bob's identity (from the verified bundle).
    pub remote_identity: IdentityPublic,
    /// `SPK_B`: Bob's initial ratchet public key (Double Ratchet spec, "Integration with X3DH").
    pub remote_ratchet_key: [u8; 32],
}

/// Alice's side: verifies the bundle's signature (refuses with [`Error::BadSignature`]),
/// draws an ephemeral key, and computes SK and AD.
pub fn initiate<R: RngCore + CryptoRng + ?Sized>(
    identity: &IdentityKeyPair,
    bundle: &PreKeyBundle,
    rng: &mut R,
) -> Result<Initiated, Error> {
    let ephemeral = StaticSecret::random_from_rng(&mut *rng);
    initiate_with_ephemeral(identity, bundle, &ephemeral)
}

/// [`initiate`] with a given ephemeral private key (for test vectors only: an ephemeral key
/// must be fresh and is dropped, hence zeroized, right after).
pub fn initiate_with_ephemeral(
    identity: &IdentityKeyPair,
    bundle: &PreKeyBundle,
    ephemeral: &StaticSecret,
) -> Result<Initiated, Error> {
    bundle.verify_signature()?;
    let dh1 = dh(identity.dh_secret(), &bundle.signed_prekey)?;
    let dh2 = dh(ephemeral, &bundle.identity_dh)?;
    let dh3 = dh(ephemeral, &bundle.signed_prekey)?;
    let mut km = Zeroizing::new(Vec::with_capacity(128));
    km.extend_from_slice(&dh1[..]);
    km.extend_from_slice(&dh2[..]);
    km.extend_from_slice(&dh3[..]);
    if let Some((_, opk)) = &bundle.one_time_prekey {
        let dh4 = dh(ephemeral, opk)?;
        km.extend_from_slice(&dh4[..]);
    }
    let shared_key = kdf_x3dh(&km);
    let ours = identity.public();
    let remote_identity = bundle.identity();
    Ok(Initiated {
        shared_key,
        ad: AssociatedData::new(&ours, &remote_identity),
        init: PreKeyInit {
            identity: ours,
            base_key: PublicKey::from(ephemeral).to_bytes(),
            signed_prekey_id: bundle.signed_prekey_id,
            one_time_prekey_id: bundle.one_time_prekey.map(|(id, _)| id),
        },
        remote_identity,
        remote_ratchet_key: bundle.signed_prekey,
    })
}

/// Bob's X3DH result.
pub struct Responded {
    /// SK.
    pub shared_key: SharedKey,
    /// AD.
    pub ad: AssociatedData,
    /// Alice's identity as claimed in the initial message (authenticated once the first
    /// message decrypts, since AD covers it).
    pub remote_identity: IdentityPublic,
    /// Bob's signed prekey pair: his initial ratchet key pair.
    pub ratchet_key: StaticSecret,
    /// The one-time prekey that was used and deleted from the store.
    pub used_one_time_prekey: Option<u32>,
}

impl std::fmt::Debug for Responded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responded")
            .field("remote_identity", &self.remote_identity)
            .field("used_one_time_prekey", &self.used_one_time_prekey)
            .finish_non_exhaustive()
    }
}

/// Bob's side. Looks up the signed prekey, **removes** the one-time prekey named by `init`
/// from `prekeys` (a second X3DH naming it fails with [`Error::UnknownOneTimePreKey`]), and
/// computes SK and AD. On error nothing is removed.
///
/// To keep the one-time prekey when the first message then fails to decrypt, run this on a
/// copy of the store and keep the copy only on success (as [`crate::session`] does).
pub fn respond(
    identity: &IdentityKeyPair,
    prekeys: &mut PreKeyStore,
    init: &PreKeyInit,
) -> Result<Responded, Error> {
    let spk = prekeys
        .signed_prekey(init.signed_prekey_id)
        .ok_or(Error::UnknownSignedPreKey(init.signed_prekey_id))?;
    let dh1 = dh(spk.secret(), &init.identity.dh)?;
    let dh2 = dh(identity.dh_secret(), &init.base_key)?;
    let dh3 = dh(spk.secret(), &init.base_key)?;
    let mut km = Zeroizing::new(Vec::with_capacity(128));
    km.extend_from_slice(&dh1[..]);
    km.extend_from_slice(&dh2[..]);
    km.extend_from_slice(&dh3[..]);
    if let Some(id) = init.one_time_prekey_id {
        // Compute with the key first; delete it only once everything succeeded.
        let opk = prekeys
            .one_time_prekey(id)
            .ok_or(Error::UnknownOneTimePreKey(id))?;
        let dh4 = dh(opk.secret(), &init.base_key)?;
        km.extend_from_slice(&dh4[..]);
    }
    let ratchet_key = spk.secret().clone();
    let shared_key = kdf_x3dh(&km);
    let ours = identity.public();
    if let Some(id) = init.one_time_prekey_id {
        // The deletion X3DH §3.4 requires: this one-time prekey is never used again.
        prekeys.take_one_time_prekey(id);
    }
    Ok(Responded {
        shared_key,
        ad: AssociatedData::new(&init.identity, &ours),
        remote_identity: init.identity,
        ratchet_key,
        used_one_time_prekey: init.one_time_prekey_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn bob() -> (IdentityKeyPair, PreKeyStore, PreKeyBundle) {
        let id = IdentityKeyPair::generate(&mut OsRng);
        let mut store = PreKeyStore::new();
        let spk = store.rotate_signed_prekey(&id, &mut OsRng);
        let otpks = store.generate_one_time_prekeys(3, &mut OsRng).unwrap();
        let bundle = PreKeyBundle::new(&id.public(), &spk, otpks.first());
        (id, store, bundle)
    }

    #[test]
    fn both_sides_agree_with_and_without_one_time_prekey() {
        for with_otpk in [true, false] {
            let alice = IdentityKeyPair::generate(&mut OsRng);
            let (bob_id, mut store, mut bundle) = bob();
            if !with_otpk {
                bundle.one_time_prekey = None;
            }
            let a = initiate(&alice, &bundle, &mut OsRng).unwrap();
            let before = store.one_time_prekey_count();
            let b = respond(&bob_id, &mut store, &a.init).unwrap();
            assert_eq!(a.shared_key, b.shared_key);
            assert_eq!(a.ad, b.ad);
            assert_eq!(b.remote_identity, alice.public());
            assert_eq!(
                store.one_time_prekey_count(),
                before - usize::from(with_otpk)
            );
        }
    }

    #[test]
    fn one_time_prekey_deleted_after_use() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let (bob_id, mut store, bundle) = bob();
        let a = initiate(&alice, &bundle, &mut OsRng).unwrap();
        respond(&bob_id, &mut store, &a.init).unwrap();
        let id = a.init.one_time_prekey_id.unwrap();
        assert!(!store.has_one_time_prekey(id));
        // Replaying the same initial message: the one-time prekey is gone.
        assert!(matches!(
            respond(&bob_id, &mut store, &a.init),
            Err(Error::UnknownOneTimePreKey(x)) if x == id
        ));
        // A second, fresh X3DH from the same bundle also fails.
        let a2 = initiate(&alice, &bundle, &mut OsRng).unwrap();
        assert!(matches!(
            respond(&bob_id, &mut store, &a2.init),
            Err(Error::UnknownOneTimePreKey(_))
        ));
    }

    #[test]
    fn forged_bundle_refused() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let (_, _, mut bundle) = bob();
        // The server swaps in its own signed prekey.
        bundle.signed_prekey = PublicKey::from(&StaticSecret::random_from_rng(OsRng)).to_bytes();
        assert!(matches!(
            initiate(&alice, &bundle, &mut OsRng),
            Err(Error::BadSignature)
        ));
    }

    #[test]
    fn unknown_signed_prekey() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let (bob_id, mut store, bundle) = bob();
        let mut a = initiate(&alice, &bundle, &mut OsRng).unwrap();
        a.init.signed_prekey_id = 999;
        assert!(matches!(
            respond(&bob_id, &mut store, &a.init),
            Err(Error::UnknownSignedPreKey(999))
        ));
        assert_eq!(store.one_time_prekey_count(), 3, "nothing deleted on error");
    }
}
