//! Noise `XX_25519_AESGCM_SHA256`: the handshake through `snow`, the transport on `aes-gcm`.
//!
//! The handshake is a chain of typed states; each transition consumes the previous state, so a
//! message cannot be read twice or out of order:
//!
//! ```text
//! client: ClientHandshake::start ──msg1──▶ server: ServerHandshake::read_hello
//! client: ClientAwaitingHello::read_hello ◀──msg2── server (→ ServerAwaitingFinish)
//! client ──msg3──▶ server: ServerAwaitingFinish::read_finish → Transport + client static key
//! ```
//!
//! After `Split()` the two cipher keys are taken from snow (`risky-raw-split`) and the transport
//! runs on [`CipherState`], which seals and opens records *in place* in the caller's buffer with
//! the Noise nonce rule for AES-GCM (four zero bytes, then the 64-bit counter big-endian) and
//! empty associated data. This is byte-for-byte what snow's own `TransportState` produces (a test
//! below checks it) but lets the gateway encrypt straight into its coalesced send buffer and
//! decrypt inside the receive buffer without copies. The cipher state is plain data, so it moves
//! to another shard with the socket.

use std::cell::RefCell;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::KeyInit;

use crate::frame::Frame;
use crate::wire::{self, TAG_BYTES};
use crate::{ErrorCode, PREAMBLE};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";

/// Length of an X25519 key.
pub const KEY_BYTES: usize = 32;

/// Size of handshake message 1 (`e`), no payload.
pub const MSG1_BYTES: usize = 32;
/// Size of handshake message 2 (`e, ee, s, es`), empty payload: 32 + (32+16) + 16.
pub const MSG2_BYTES: usize = 96;
/// Size of handshake message 3 (`s, se`), empty payload: (32+16) + 16.
pub const MSG3_BYTES: usize = 64;

/// Why a handshake or transport step failed. Always fatal for the connection.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// snow refused a handshake message (bad length, failed authentication, …).
    #[error("noise handshake: {0}")]
    Handshake(#[from] snow::Error),
    /// A transport record did not authenticate.
    #[error("transport record failed authentication")]
    Decrypt,
    /// A transport record is shorter than its tag.
    #[error("transport record shorter than the AEAD tag")]
    Short,
    /// The nonce counter is exhausted (2^64 - 1 records); the connection must be re-established.
    #[error("nonce exhausted")]
    NonceExhausted,
    /// Sealing failed (the AEAD refused the input).
    #[error("sealing a record failed")]
    Seal,
    /// The frame does not fit one record (body over 65535 bytes).
    #[error("frame of {0} bytes does not fit one record")]
    FrameTooLarge(usize),
    /// A handshake message had the wrong size for this protocol (payloads are empty).
    #[error("handshake message of {got} bytes, expected {expected}")]
    HandshakeSize {
        /// Received size.
        got: usize,
        /// Required size.
        expected: usize,
    },
}

impl NoiseError {
    /// The error code sent to the peer before closing (when the channel still allows it).
    pub fn code(&self) -> ErrorCode {
        match self {
            NoiseError::Handshake(_) | NoiseError::HandshakeSize { .. } => {
                ErrorCode::HandshakeFailed
            }
            NoiseError::Decrypt
            | NoiseError::Short
            | NoiseError::NonceExhausted
            | NoiseError::Seal => ErrorCode::DecryptFailed,
            NoiseError::FrameTooLarge(_) => ErrorCode::FrameTooLarge,
        }
    }
}

/// An X25519 static key pair: the server's identity, or a client device's credential.
#[derive(Clone)]
pub struct StaticKeypair {
    /// Secret scalar. Keep it secret.
    pub private: [u8; KEY_BYTES],
    /// Public key.
    pub public: [u8; KEY_BYTES],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl StaticKeypair {
    /// A fresh random key pair from the OS RNG.
    pub fn generate() -> Self {
        let mut private = [0u8; KEY_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut private);
        Self::from_private(private)
    }

    /// The pair for a given secret.
    pub fn from_private(private: [u8; KEY_BYTES]) -> Self {
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self { private, public }
    }
}

fn params() -> snow::params::NoiseParams {
    // The name is a constant that snow parses; a failure would be a build defect, caught by tests.
    NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("NOISE_PARAMS is a valid Noise name"))
}

fn builder<'a>(
    local: &'a StaticKeypair,
    fixed_ephemeral: Option<&'a [u8; KEY_BYTES]>,
) -> Result<snow::Builder<'a>, snow::Error> {
    let b = snow::Builder::new(params())
        .local_private_key(&local.private)?
        .prologue(&PREAMBLE)?;
    Ok(match fixed_ephemeral {
        Some(e) => b.fixed_ephemeral_key_for_testing_only(e),
        None => b,
    })
}

/// Client handshake, before anything was sent.
pub struct ClientHandshake;

/// Client handshake, msg1 sent, waiting for msg2.
pub struct ClientAwaitingHello {
    hs: snow::HandshakeState,
}

impl ClientHandshake {
    /// Starts a handshake: returns the next state and msg1 (the record body to send after the
    /// preamble).
    pub fn start(local: &StaticKeypair) -> Result<(ClientAwaitingHello, Vec<u8>), NoiseError> {
        Self::start_with(local, None)
    }

    /// As [`ClientHandshake::start`] with a fixed ephemeral key: for test vectors only.
    pub fn start_with(
        local: &StaticKeypair,
        fixed_ephemeral: Option<&[u8; KEY_BYTES]>,
    ) -> Result<(ClientAwaitingHello, Vec<u8>), NoiseError> {
        let mut hs = builder(local, fixed_ephemeral)?.build_initiator()?;
        let mut msg1 = vec![0u8; 256];
        let n = hs.write_message(&[], &mut msg1)?;
        msg1.truncate(n);
        Ok((ClientAwaitingHello { hs }, msg1))
    }
}

impl ClientAwaitingHello {
    /// Reads msg2; returns the transport, msg3 to send, and the server's static public key
    /// (pin it to detect a server key change).
    pub fn read_hello(
        mut self,
        msg2: &[u8],
    ) -> Result<(Transport, Vec<u8>, [u8; KEY_BYTES]), NoiseError> {
        let mut scratch = [0u8; 256];
        self.hs.read_message(msg2, &mut scratch)?;
        let mut msg3 = vec![0u8; 256];
        let n = self.hs.write_message(&[], &mut msg3)?;
        msg3.truncate(n);
        let server_static = remote_static(&self.hs)?;
        let (k_initiator, k_responder) = self.hs.dangerously_get_raw_split();
        Ok((
            Transport::new(&k_initiator, &k_responder),
            msg3,
            server_static,
        ))
    }
}

fn remote_static(hs: &snow::HandshakeState) -> Result<[u8; KEY_BYTES], NoiseError> {
    hs.get_remote_static()
        .and_then(|k| <[u8; KEY_BYTES]>::try_from(k).ok())
        .ok_or(NoiseError::Handshake(snow::Error::State(
            snow::error::StateProblem::MissingKeyMaterial,
        )))
}

/// Server handshake, waiting for msg1.
pub struct ServerHandshake {
    hs: snow::HandshakeState,
}

/// Server handshake, msg2 sent, waiting for msg3.
pub struct ServerAwaitingFinish {
    hs: snow::HandshakeState,
}

impl ServerHandshake {
    /// A responder with the server's static key.
    pub fn new(local: &StaticKeypair) -> Result<Self, NoiseError> {
        Self::new_with(local, None)
    }

    /// As [`ServerHandshake::new`] with a fixed ephemeral key: for test vectors only.
    pub fn new_with(
        local: &StaticKeypair,
        fixed_ephemeral: Option<&[u8; KEY_BYTES]>,
    ) -> Result<Self, NoiseError> {
        Ok(Self {
            hs: builder(local, fixed_ephemeral)?.build_responder()?,
        })
    }

    /// Reads msg1; returns the next state and msg2.
    pub fn read_hello(
        mut self,
        msg1: &[u8],
    ) -> Result<(ServerAwaitingFinish, Vec<u8>), NoiseError> {
        if msg1.len() != MSG1_BYTES {
            return Err(NoiseError::HandshakeSize {
                got: msg1.len(),
                expected: MSG1_BYTES,
            });
        }
        let mut scratch = [0u8; 256];
        self.hs.read_message(msg1, &mut scratch)?;
        let mut msg2 = vec![0u8; 256];
        let n = self.hs.write_message(&[], &mut msg2)?;
        msg2.truncate(n);
        Ok((ServerAwaitingFinish { hs: self.hs }, msg2))
    }
}

impl ServerAwaitingFinish {
    /// Reads msg3; returns the transport and the client's static public key (its credential).
    pub fn read_finish(mut self, msg3: &[u8]) -> Result<(Transport, [u8; KEY_BYTES]), NoiseError> {
        if msg3.len() != MSG3_BYTES {
            return Err(NoiseError::HandshakeSize {
                got: msg3.len(),
                expected: MSG3_BYTES,
            });
        }
        let mut scratch = [0u8; 256];
        self.hs.read_message(msg3, &mut scratch)?;
        let client_static = remote_static(&self.hs)?;
        let (k_initiator, k_responder) = self.hs.dangerously_get_raw_split();
        // The responder sends with the second key and receives with the first.
        Ok((Transport::new(&k_responder, &k_initiator), client_static))
    }
}

/// AES-256-GCM with the encryption key schedule only (GCM never decrypts a block), so an
/// expanded key is about half of `Aes256Gcm`'s. Same bytes on the wire.
type Cipher = aes_gcm::AesGcm<aes_gcm::aes::Aes256Enc, aes_gcm::aead::consts::U12>;

/// Slots of the per-thread cache of expanded keys (a power of two).
pub const KEY_CACHE_SLOTS: usize = 1024;

/// One cached expansion: the key it was made from, and the expanded cipher.
struct CachedKey {
    key: [u8; KEY_BYTES],
    cipher: Cipher,
}

impl Drop for CachedKey {
    fn drop(&mut self) {
        // The cipher zeroizes its own schedule (the `aes` crate's `zeroize` feature).
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

thread_local! {
    /// Expanded keys of the connections active on this thread, direct-mapped by the key's
    /// first bytes (keys are uniformly random): bounded at [`KEY_CACHE_SLOTS`] entries, so an
    /// idle connection costs only its 32-byte keys while an active one skips the expansion.
    static KEY_CACHE: RefCell<Vec<Option<Box<CachedKey>>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the expanded cipher for `key`, from the thread's cache or expanded into it.
fn with_cipher<R>(key: &[u8; KEY_BYTES], f: impl FnOnce(&Cipher) -> R) -> R {
    KEY_CACHE.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            // Not re-entered today; expand on the stack rather than fail.
            return f(&Cipher::new(key.into()));
        };
        if cache.is_empty() {
            cache.resize_with(KEY_CACHE_SLOTS, || None);
        }
        let [a, b, ..] = *key;
        let i = (usize::from(a) | (usize::from(b) << 8)) & (KEY_CACHE_SLOTS - 1);
        let Some(slot) = cache.get_mut(i) else {
            return f(&Cipher::new(key.into()));
        };
        match slot {
            Some(c) if c.key == *key => f(&c.cipher),
            _ => {
                let c = slot.insert(Box::new(CachedKey {
                    key: *key,
                    cipher: Cipher::new(key.into()),
                }));
                f(&c.cipher)
            }
        }
    })
}

/// One direction of the transport: a key and a nonce counter.
///
/// Only the 32-byte key is kept per connection. The AES-256 key schedule and the GHASH key are
/// expanded on use into a bounded per-thread cache ([`KEY_CACHE_SLOTS`] entries, direct-mapped):
/// an active connection's records skip the expansion, an idle connection holds no expanded key
/// (~0.5 KiB each, two per connection).
#[derive(Clone)]
pub struct CipherState {
    key: [u8; KEY_BYTES],
    nonce: u64,
}

impl Drop for CipherState {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl std::fmt::Debug for CipherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CipherState")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl CipherState {
    fn new(key: &[u8; KEY_BYTES]) -> Self {
        Self {
            key: *key,
            nonce: 0,
        }
    }

    fn next_nonce(&mut self) -> Result<aes_gcm::Nonce<aes_gcm::aead::consts::U12>, NoiseError> {
        // Noise reserves 2^64-1; refuse before reaching it.
        if self.nonce == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        self.nonce += 1;
        Ok(n.into())
    }

    /// Encrypts `buf[start..]` in place and appends the 16-byte tag.
    pub fn seal_in_place(&mut self, buf: &mut Vec<u8>, start: usize) -> Result<(), NoiseError> {
        let nonce = self.next_nonce()?;
        let plain = buf.get_mut(start..).ok_or(NoiseError::Short)?;
        let tag = with_cipher(&self.key, |cipher| {
            cipher.encrypt_in_place_detached(&nonce, &[], plain)
        })
        .map_err(|_| NoiseError::Seal)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts `record` (ciphertext then tag) in place; the plaintext is `record[..n]`.
    pub fn open_in_place(&mut self, record: &mut [u8]) -> Result<usize, NoiseError> {
        let n = record
            .len()
            .checked_sub(TAG_BYTES)
            .ok_or(NoiseError::Short)?;
        let nonce = self.next_nonce()?;
        let (ct, tag) = record.split_at_mut(n);
        let tag = aes_gcm::Tag::<aes_gcm::aead::consts::U16>::from_slice(tag);
        with_cipher(&self.key, |cipher| {
            cipher.decrypt_in_place_detached(&nonce, &[], ct, tag)
        })
        .map_err(|_| NoiseError::Decrypt)?;
        Ok(n)
    }

    /// Records sealed/opened so far.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }
}

/// The established transport: one cipher per direction.
#[derive(Clone, Debug)]
pub struct Transport {
    /// Seals what this side sends.
    pub tx: CipherState,
    /// Opens what this side receives.
    pub rx: CipherState,
}

impl Transport {
    fn new(tx_key: &[u8; KEY_BYTES], rx_key: &[u8; KEY_BYTES]) -> Self {
        Self {
            tx: CipherState::new(tx_key),
            rx: CipherState::new(rx_key),
        }
    }

    /// Appends one sealed record carrying `frame` to `out`: `len u16`, ciphertext, tag. The frame
    /// is encoded straight into `out` and encrypted there (no intermediate buffer).
    ///
    /// On error `out` is left exactly as it was (no plaintext is ever left behind in it).
    pub fn seal_frame(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let body_len = frame.encoded_len() + TAG_BYTES;
        if body_len > wire::RECORD_BODY_MAX {
            return Err(NoiseError::FrameTooLarge(body_len));
        }
        let before = out.len();
        wire::put_len(out, body_len);
        let start = out.len();
        frame.encode(out);
        let sealed = self.tx.seal_in_place(out, start);
        if sealed.is_err() {
            out.truncate(before);
        }
        sealed
    }

    /// Opens one record body (ciphertext then tag) in place; returns the plaintext length.
    pub fn open_record(&mut self, body: &mut [u8]) -> Result<usize, NoiseError> {
        self.rx.open_in_place(body)
    }
}

/// Overhead in bytes that the record layer adds to a frame: length prefix plus tag.
pub const RECORD_OVERHEAD_BYTES: usize = wire::LEN_PREFIX_BYTES + TAG_BYTES;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pair() -> (StaticKeypair, StaticKeypair) {
        (
            StaticKeypair::from_private([1u8; 32]),
            StaticKeypair::from_private([2u8; 32]),
        )
    }

    fn handshake() -> (Transport, Transport, [u8; 32], [u8; 32]) {
        let (c, s) = pair();
        let (c1, msg1) = ClientHandshake::start(&c).unwrap();
        assert_eq!(msg1.len(), MSG1_BYTES);
        let (s1, msg2) = ServerHandshake::new(&s).unwrap().read_hello(&msg1).unwrap();
        assert_eq!(msg2.len(), MSG2_BYTES);
        let (ct, msg3, server_pub) = c1.read_hello(&msg2).unwrap();
        assert_eq!(msg3.len(), MSG3_BYTES);
        let (st, client_pub) = s1.read_finish(&msg3).unwrap();
        assert_eq!(client_pub, c.public);
        assert_eq!(server_pub, s.public);
        (ct, st, c.public, s.public)
    }

    #[test]
    fn frames_flow_both_ways() {
        let (mut c, mut s, _, _) = handshake();
        for i in 0..5u64 {
            let f = Frame::Ping(crate::frame::Ping { nonce: i });
            let mut out = Vec::new();
            c.seal_frame(&f, &mut out).unwrap();
            let mut body = out[2..].to_vec();
            let n = s.open_record(&mut body).unwrap();
            assert_eq!(
                Frame::decode(Bytes::copy_from_slice(&body[..n])).unwrap(),
                f
            );
            let mut back = Vec::new();
            s.seal_frame(&Frame::Pong(crate::frame::Pong { nonce: i }), &mut back)
                .unwrap();
            let mut body = back[2..].to_vec();
            let n = c.open_record(&mut body).unwrap();
            assert_eq!(
                Frame::decode(Bytes::copy_from_slice(&body[..n])).unwrap(),
                Frame::Pong(crate::frame::Pong { nonce: i })
            );
        }
    }

    #[test]
    fn transport_state_is_small() {
        // Two keys and two counters, not two expanded AES-GCM instances (~2 KiB).
        assert!(
            std::mem::size_of::<Transport>() <= 96,
            "{}",
            std::mem::size_of::<Transport>()
        );
    }

    #[test]
    fn an_expanded_key_is_small_and_the_cache_bounded() {
        assert!(
            std::mem::size_of::<CachedKey>() <= 1_100,
            "{}",
            std::mem::size_of::<CachedKey>()
        );
        // Many more transports than slots: every record still opens (evictions re-expand).
        let mut pairs: Vec<_> = (0..3).map(|_| handshake()).collect();
        for round in 0..3u64 {
            for (c, s, _, _) in pairs.iter_mut() {
                let mut out = Vec::new();
                c.seal_frame(&Frame::Ping(crate::frame::Ping { nonce: round }), &mut out)
                    .unwrap();
                let mut body = out[2..].to_vec();
                assert!(s.open_record(&mut body).is_ok());
            }
        }
        KEY_CACHE.with(|c| assert!(c.borrow().len() <= KEY_CACHE_SLOTS));
    }

    #[test]
    fn tampering_is_detected() {
        let (mut c, mut s, _, _) = handshake();
        let mut out = Vec::new();
        c.seal_frame(&Frame::Ping(crate::frame::Ping { nonce: 1 }), &mut out)
            .unwrap();
        out[5] ^= 1;
        let mut body = out[2..].to_vec();
        assert!(matches!(s.open_record(&mut body), Err(NoiseError::Decrypt)));
    }

    #[test]
    fn wrong_prologue_or_garbage_fails_handshake() {
        let (_, s) = pair();
        let r = ServerHandshake::new(&s).unwrap().read_hello(&[0u8; 5]);
        assert!(r.is_err());
    }

    /// Our in-place transport must produce exactly what snow's TransportState produces.
    #[test]
    fn transport_matches_snow() {
        let (c, s) = pair();
        let p = params();
        let mut ci = snow::Builder::new(p.clone())
            .local_private_key(&c.private)
            .unwrap()
            .prologue(&PREAMBLE)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut sr = snow::Builder::new(p)
            .local_private_key(&s.private)
            .unwrap()
            .prologue(&PREAMBLE)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut b1 = [0u8; 200];
        let mut b2 = [0u8; 200];
        let n = ci.write_message(&[], &mut b1).unwrap();
        sr.read_message(&b1[..n], &mut b2).unwrap();
        let n = sr.write_message(&[], &mut b1).unwrap();
        ci.read_message(&b1[..n], &mut b2).unwrap();
        let n = ci.write_message(&[], &mut b1).unwrap();
        sr.read_message(&b1[..n], &mut b2).unwrap();
        let (ki, kr) = ci.dangerously_get_raw_split();
        let mut ours = Transport::new(&ki, &kr);
        let mut snow_t = ci.into_transport_mode().unwrap();
        for i in 0..3u64 {
            let f = Frame::Ping(crate::frame::Ping { nonce: i });
            let plain = f.to_vec();
            let mut theirs = vec![0u8; plain.len() + 16];
            let n = snow_t.write_message(&plain, &mut theirs).unwrap();
            let mut mine = Vec::new();
            ours.seal_frame(&f, &mut mine).unwrap();
            assert_eq!(&mine[2..], &theirs[..n]);
        }
    }
}
