//! The key derivation functions and the AEAD, exactly as docs/e2ee.md states them.
//!
//! * X3DH `KDF(KM)`: HKDF-SHA256, IKM = 32 × `0xFF` ‖ KM, salt = 32 zero bytes,
//!   info = [`X3DH_INFO`], 32 bytes out (X3DH spec §2.2).
//! * `KDF_RK(rk, dh_out)`: HKDF-SHA256, salt = rk, IKM = dh_out, info = [`RATCHET_INFO`],
//!   64 bytes out: new root key ‖ chain key (Double Ratchet spec §5.2).
//! * `KDF_CK(ck)`: HMAC-SHA256 keyed with ck: message key = HMAC(ck, `0x01`),
//!   next chain key = HMAC(ck, `0x02`) (Double Ratchet spec §5.2).
//! * `ENCRYPT(mk, pt, ad)`: HKDF-SHA256, salt = 32 zero bytes, IKM = mk,
//!   info = [`MESSAGE_KEYS_INFO`], 44 bytes out: AES-256 key (32) ‖ GCM nonce (12); then
//!   AES-256-GCM over pt with ad as associated data, 16-byte tag appended.
//!   Each message key encrypts exactly one message, so the derived nonce never repeats under
//!   a key.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::Error;

/// HKDF info of the X3DH KDF.
pub const X3DH_INFO: &[u8] = b"Switchboard_X3DH_v1";
/// HKDF info of `KDF_RK`.
pub const RATCHET_INFO: &[u8] = b"Switchboard_Ratchet_v1";
/// HKDF info of the message-key expansion inside `ENCRYPT`/`DECRYPT`.
pub const MESSAGE_KEYS_INFO: &[u8] = b"Switchboard_MessageKeys_v1";
/// HKDF info of the message-key expansion of a Sender Key group message
/// ([`crate::sender_key`]): the same construction as `ENCRYPT`, another info string.
pub const SENDER_KEY_MESSAGE_KEYS_INFO: &[u8] = b"Switchboard_SenderKey_MessageKeys_v1";
/// HMAC input that derives a message key from a chain key.
pub const MESSAGE_KEY_SEED: u8 = 0x01;
/// HMAC input that derives the next chain key from a chain key.
pub const CHAIN_KEY_SEED: u8 = 0x02;
/// The X3DH `F` prefix for X25519: 32 bytes of `0xFF`.
pub const X3DH_F: [u8; 32] = [0xFF; 32];
/// Length of the AES-GCM tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

macro_rules! secret32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
        pub struct $name(pub(crate) [u8; 32]);

        impl $name {
            /// The raw bytes (secret: do not log).
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Wraps raw bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret32!(
    /// The X3DH output SK, which becomes the first root key of the Double Ratchet.
    SharedKey
);
secret32!(
    /// A Double Ratchet root key.
    RootKey
);
secret32!(
    /// A Double Ratchet sending or receiving chain key.
    ChainKey
);
secret32!(
    /// A Double Ratchet message key: encrypts exactly one message.
    MessageKey
);

/// X3DH `KDF(KM)`.
pub(crate) fn kdf_x3dh(km: &[u8]) -> SharedKey {
    let mut ikm = Zeroizing::new(Vec::with_capacity(X3DH_F.len() + km.len()));
    ikm.extend_from_slice(&X3DH_F);
    ikm.extend_from_slice(km);
    let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm);
    let mut out = SharedKey([0u8; 32]);
    hk.expand(X3DH_INFO, &mut out.0)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// `KDF_RK(rk, dh_out) -> (rk', ck)`.
pub(crate) fn kdf_rk(rk: &RootKey, dh_out: &[u8; 32]) -> (RootKey, ChainKey) {
    let hk = Hkdf::<Sha256>::new(Some(&rk.0), dh_out);
    let mut okm = Zeroizing::new([0u8; 64]);
    hk.expand(RATCHET_INFO, &mut okm[..])
        .expect("64 bytes is a valid HKDF-SHA256 output length");
    let mut new_rk = RootKey([0u8; 32]);
    let mut ck = ChainKey([0u8; 32]);
    // okm is exactly new_rk ‖ ck (64 = 32 + 32), so the zip copies every byte of both.
    let outs = new_rk.0.iter_mut().chain(ck.0.iter_mut());
    for (dst, src) in outs.zip(okm.iter()) {
        *dst = *src;
    }
    (new_rk, ck)
}

fn hmac_sha256(key: &[u8; 32], input: u8) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(&[input]);
    mac.finalize().into_bytes().into()
}

/// `KDF_CK(ck) -> (ck', mk)`.
pub(crate) fn kdf_ck(ck: &ChainKey) -> (ChainKey, MessageKey) {
    let mk = MessageKey(hmac_sha256(&ck.0, MESSAGE_KEY_SEED));
    let next = ChainKey(hmac_sha256(&ck.0, CHAIN_KEY_SEED));
    (next, mk)
}

/// The AES-256-GCM key and nonce derived from a message key (info [`MESSAGE_KEYS_INFO`]).
fn expand_message_key(mk: &MessageKey) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
    expand_message_key_with(mk, MESSAGE_KEYS_INFO)
}

/// HKDF-SHA256(salt = 32 zero bytes, IKM = mk, info, L = 44) split into AES-256 key ‖ nonce.
pub(crate) fn expand_message_key_with(
    mk: &MessageKey,
    info: &[u8],
) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
    let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &mk.0);
    let mut okm = Zeroizing::new([0u8; 44]);
    hk.expand(info, &mut okm[..])
        .expect("44 bytes is a valid HKDF-SHA256 output length");
    let mut key = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 12];
    // okm is exactly key ‖ nonce (44 = 32 + 12).
    let outs = key.iter_mut().chain(nonce.iter_mut());
    for (dst, src) in outs.zip(okm.iter()) {
        *dst = *src;
    }
    (key, nonce)
}

/// `ENCRYPT(mk, plaintext, ad)`: ciphertext ‖ 16-byte tag.
pub(crate) fn seal(mk: &MessageKey, plaintext: &[u8], ad: &[u8]) -> Vec<u8> {
    let (key, nonce) = expand_message_key(mk);
    aes_gcm_seal(&key, &nonce, plaintext, ad)
}

/// `DECRYPT(mk, ciphertext, ad)`.
pub(crate) fn open(
    mk: &MessageKey,
    ciphertext: &[u8],
    ad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (key, nonce) = expand_message_key(mk);
    aes_gcm_open(&key, &nonce, ciphertext, ad)
}

/// `ENCRYPT` with another HKDF info string (Sender Keys use
/// [`SENDER_KEY_MESSAGE_KEYS_INFO`]).
pub(crate) fn seal_with(mk: &MessageKey, info: &[u8], plaintext: &[u8], ad: &[u8]) -> Vec<u8> {
    let (key, nonce) = expand_message_key_with(mk, info);
    aes_gcm_seal(&key, &nonce, plaintext, ad)
}

/// `DECRYPT` with another HKDF info string.
pub(crate) fn open_with(
    mk: &MessageKey,
    info: &[u8],
    ciphertext: &[u8],
    ad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (key, nonce) = expand_message_key_with(mk, info);
    aes_gcm_open(&key, &nonce, ciphertext, ad)
}

/// Raw AES-256-GCM encryption (also used by the store file).
pub(crate) fn aes_gcm_seal(
    key: &[u8; 32],
    nonce: &[u8; 12],
    plaintext: &[u8],
    ad: &[u8],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: ad,
            },
        )
        .expect("AES-GCM encryption fails only above 64 GiB of plaintext")
}

/// Raw AES-256-GCM decryption; any failure is [`Error::DecryptFailed`].
pub(crate) fn aes_gcm_open(
    key: &[u8; 32],
    nonce: &[u8; 12],
    ciphertext: &[u8],
    ad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: ad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::DecryptFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5869 appendix A.1, test case 1 (HKDF-SHA256).
    #[test]
    fn hkdf_sha256_rfc5869_case1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            hex::encode(prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    /// AES-256-GCM, McGrew & Viega "The Galois/Counter Mode of Operation (GCM)", test case 16
    /// (256-bit key, 60-byte plaintext, 20-byte AAD, 96-bit IV).
    #[test]
    fn aes256gcm_mcgrew_viega_case16() {
        let key: [u8; 32] =
            hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
                .unwrap()
                .try_into()
                .unwrap();
        let iv: [u8; 12] = hex::decode("cafebabefacedbaddecaf888")
            .unwrap()
            .try_into()
            .unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let out = aes_gcm_seal(&key, &iv, &pt, &aad);
        assert_eq!(
            hex::encode(&out[..pt.len()]),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        );
        assert_eq!(
            hex::encode(&out[pt.len()..]),
            "76fc6ece0f4e1768cddf8853bb2d551b"
        );
        let back = aes_gcm_open(&key, &iv, &out, &aad).unwrap();
        assert_eq!(&back[..], &pt[..]);
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(
            aes_gcm_open(&key, &iv, &bad, &aad),
            Err(Error::DecryptFailed)
        ));
    }

    #[test]
    fn chain_kdf_constants_differ() {
        let ck = ChainKey([7u8; 32]);
        let (next, mk) = kdf_ck(&ck);
        assert_ne!(next.0, mk.0);
        assert_ne!(next.0, ck.0);
    }
}
