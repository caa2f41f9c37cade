//! The seam where end-to-end encryption plugs in.
//!
//! The server never needs to see plaintext: a `Send` payload is opaque to it. Every payload
//! the [`crate::Session`] sends goes through [`PayloadCodec::encode`] exactly once (retries
//! resend the stored encoded bytes, so a ratchet is never stepped twice for one message), and
//! every delivered payload goes through [`PayloadCodec::decode`] exactly once per delivery the
//! caller sees (duplicates are dropped before decoding).
//!
//! This revision ships only [`PlaintextCodec`]: the payload is the caller's bytes (the `chat`
//! CLI sends UTF-8 text). The E2EE issue replaces it with an X3DH + Double Ratchet codec that
//! keeps its sessions in the state directory; nothing else in the SDK changes.

use bytes::Bytes;
use protocol::{Address, MsgType};

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct CodecError {
    /// Human-readable reason (never contains key material or plaintext).
    pub reason: String,
}

impl CodecError {
    /// An error with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Turns plaintext into wire payloads and back, per peer.
///
/// Implementations hold per-peer state (sessions, ratchets), hence `&mut self`. `Send` so a
/// [`crate::Session`] can move to another thread.
pub trait PayloadCodec: Send {
    /// Encodes `plaintext` for `to`. Called once per new message (not per retry).
    fn encode(
        &mut self,
        to: Address,
        msg_type: MsgType,
        plaintext: &[u8],
    ) -> Result<Bytes, CodecError>;

    /// Decodes a payload delivered from `from`. Called once per message handed to the caller.
    fn decode(
        &mut self,
        from: Address,
        msg_type: MsgType,
        payload: Bytes,
    ) -> Result<Bytes, CodecError>;
}

/// The identity codec: payload bytes are the plaintext. No confidentiality from the server.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlaintextCodec;

impl PayloadCodec for PlaintextCodec {
    fn encode(
        &mut self,
        _to: Address,
        _msg_type: MsgType,
        plaintext: &[u8],
    ) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(plaintext))
    }

    fn decode(
        &mut self,
        _from: Address,
        _msg_type: MsgType,
        payload: Bytes,
    ) -> Result<Bytes, CodecError> {
        Ok(payload)
    }
}
