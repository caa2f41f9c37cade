//! The server side of a connection's opening: the 4-byte preamble, then the Noise XX
//! handshake, bounded in time (`handshake_timeout_ms`) and in record size.

use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use protocol::noise::{ServerHandshake, StaticKeypair, Transport};
use protocol::{wire, ErrorCode, PREAMBLE};

/// Largest handshake record accepted (msg1 and msg3 are 32 and 64 bytes with empty payloads).
const HANDSHAKE_RECORD_MAX: usize = 256;

/// Why a handshake ended early.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket error or EOF.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Not our preamble.
    #[error("bad preamble {0:02x?}")]
    BadPreamble([u8; 4]),
    /// Our preamble with another major version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A handshake record longer than any valid one.
    #[error("handshake record of {0} bytes")]
    Oversize(usize),
    /// Noise refused a message.
    #[error("noise: {0}")]
    Noise(#[from] protocol::noise::NoiseError),
    /// Did not finish in time.
    #[error("timed out")]
    Timeout,
}

impl HandshakeError {
    /// The metric code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::BadPreamble(_) => ErrorCode::BadPreamble,
            HandshakeError::Version(_) => ErrorCode::VersionUnsupported,
            HandshakeError::Oversize(_) => ErrorCode::FrameTooLarge,
            HandshakeError::Timeout => ErrorCode::HandshakeTimeout,
            HandshakeError::Io(_) | HandshakeError::Noise(_) => ErrorCode::HandshakeFailed,
        }
    }
}

async fn read_record(stream: &mut TcpStream) -> Result<Vec<u8>, HandshakeError> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > HANDSHAKE_RECORD_MAX {
        return Err(HandshakeError::Oversize(len));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads the preamble: ours, ours with another major version, or something else.
async fn read_preamble(stream: &mut TcpStream) -> Result<(), HandshakeError> {
    let mut pre = [0u8; 4];
    stream.read_exact(&mut pre).await?;
    if pre == PREAMBLE {
        return Ok(());
    }
    let [a, b, c, version] = pre;
    let [pa, pb, pc, _] = PREAMBLE;
    Err(if [a, b, c] == [pa, pb, pc] {
        HandshakeError::Version(version)
    } else {
        HandshakeError::BadPreamble(pre)
    })
}

/// Runs the server side of the preamble and the Noise XX handshake; returns the transport and
/// the client's static key.
pub async fn handshake(
    stream: &mut TcpStream,
    key: &StaticKeypair,
    timeout: Duration,
) -> Result<(Transport, [u8; 32]), HandshakeError> {
    let fut = async {
        read_preamble(stream).await?;
        let msg1 = read_record(stream).await?;
        let (state, msg2) = ServerHandshake::new(key)?.read_hello(&msg1)?;
        let mut rec = Vec::with_capacity(2 + msg2.len());
        wire::put_len(&mut rec, msg2.len());
        rec.extend_from_slice(&msg2);
        stream.write_all(&rec).await?;
        let msg3 = read_record(stream).await?;
        let (transport, client_static) = state.read_finish(&msg3)?;
        Ok((transport, client_static))
    };
    match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout),
    }
}
