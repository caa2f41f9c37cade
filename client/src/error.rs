//! The SDK's error type.
//!
//! One [`Error`] enum for every fallible call. Each variant says whether the connection is
//! still usable afterwards; when it is not, the SDK has already closed the socket and every
//! later call on that [`crate::Connection`] or [`crate::Session`] returns [`Error::Closed`].

use std::path::PathBuf;

use protocol::frame::DecodeError;
use protocol::noise::NoiseError;
use protocol::wire::WireError;
use protocol::{ErrorCode, FrameKind};

/// Shorthand for `Result<T, switchboard_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A raw error code as sent by the server in an `Error` or `GoAway` frame.
///
/// Kept raw so that codes added by a newer server survive; [`ServerCode::known`] maps it to
/// the protocol's [`ErrorCode`] when this build knows the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerCode(pub u16);

impl ServerCode {
    /// The typed code, if this build of the protocol crate knows it.
    pub fn known(self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.0)
    }

    /// Is this exactly `code`?
    pub fn is(self, code: ErrorCode) -> bool {
        self.0 == code as u16
    }

    /// Whether the server closes the connection after this code. Unknown codes count as not
    /// fatal: the protocol says to treat them as a per-request failure unless the server then
    /// closes the connection, which the SDK notices as [`Error::Closed`] on the next read.
    pub fn is_fatal(self) -> bool {
        self.known().is_some_and(ErrorCode::is_fatal)
    }
}

impl From<ErrorCode> for ServerCode {
    fn from(code: ErrorCode) -> Self {
        ServerCode(code as u16)
    }
}

impl std::fmt::Display for ServerCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.known() {
            Some(code) => write!(f, "{code}"),
            None => write!(f, "unknown error code ({})", self.0),
        }
    }
}

/// `": text"` for a server's detail text, or nothing when it is empty or only repeats the
/// code's name.
fn detail(code: ServerCode, text: &str) -> String {
    if text.is_empty() || code.known().is_some_and(|c| c.name() == text) {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// The server broke the protocol. Always fatal: the SDK closes the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A record's length prefix is outside what any valid record can have.
    #[error("bad record length: {0}")]
    Wire(#[from] WireError),
    /// A transport record failed AEAD authentication (or the nonce counter ran out).
    #[error("transport: {0}")]
    Transport(#[source] NoiseError),
    /// A decrypted record does not hold a well-formed frame.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// A well-formed frame arrived that the server must not send at this point (for example a
    /// client-to-server kind, or `Welcome` in answer to `RegisterRequest`).
    #[error("unexpected frame kind 0x{kind:02x} while {during}")]
    Unexpected {
        /// The frame's kind.
        kind: FrameKind,
        /// What the client was doing.
        during: &'static str,
    },
    /// A reply names a different user, device or number than the request did.
    #[error("reply does not match the request: {0}")]
    Mismatch(&'static str),
}

/// Everything that can go wrong in the SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed (connect, read or write). The connection is closed.
    #[error("{op}: {source}")]
    Io {
        /// What the SDK was doing (`"connect"`, `"read"`, `"write"`, …).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A state-directory file could not be read or written.
    #[error("{}: {source}", path.display())]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A state-directory file exists but does not hold what it should (truncated, edited by
    /// hand, from an incompatible version). The SDK never overwrites such a file by itself.
    #[error("{}: {reason}", path.display())]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Something did not happen within its timeout. `what` names the step (`"connect"`,
    /// `"handshake"`, `"reply to Login"`, `"write"`, `"pong"`, …). A timed-out write or a
    /// missing pong closes the connection; a timed-out wait for a reply before login does too,
    /// because a late reply would be taken for the answer to the next request.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// The step that timed out.
        what: &'static str,
    },
    /// The server closed the connection, or a previous fatal error closed it on this side.
    #[error("connection closed")]
    Closed,
    /// The Noise handshake failed (the server is not a Switchboard server, or an attacker is in
    /// the path). The connection is closed.
    #[error("handshake failed: {0}")]
    Handshake(#[source] NoiseError),
    /// The server's static key differs from the one pinned in `server.pub` on first use. Either
    /// the operator replaced the key or someone is impersonating the server. The connection was
    /// closed before this device's static key was revealed to the peer. Connect with
    /// [`crate::ServerKeyPolicy::Repin`] to accept the new key deliberately.
    #[error(
        "server key changed: pinned {}, server presented {}",
        hex::encode(pinned),
        hex::encode(presented)
    )]
    ServerKeyChanged {
        /// The key pinned earlier (or expected by the caller).
        pinned: [u8; 32],
        /// The key the server presented now.
        presented: [u8; 32],
    },
    /// The server answered a request with an `Error` frame. If `code.is_fatal()` the server
    /// closes the connection and so has the SDK; otherwise the connection stays usable (for
    /// example retry `register_verify` after `WrongCode`).
    #[error("server error {code}{}", detail(*code, text))]
    Server {
        /// The code.
        code: ServerCode,
        /// The request it refers to (a `client_msg_id`), or 0.
        ref_id: u64,
        /// The server's human-readable detail (may be empty).
        text: String,
    },
    /// The server sent `GoAway` while the client waited for a reply: reconnect after the delay.
    #[error("server going away ({code}); reconnect after {reconnect_after_ms} ms")]
    GoAway {
        /// Why.
        code: ServerCode,
        /// Wait at least this long before reconnecting.
        reconnect_after_ms: u32,
    },
    /// A `Send` this client waited for was rejected by the server (see
    /// [`crate::Session::wait_server_ack`]). The connection stays usable.
    #[error("message {client_msg_id} rejected: {code}{}", detail(*code, text))]
    SendRejected {
        /// The rejected message.
        client_msg_id: u64,
        /// Why.
        code: ServerCode,
        /// Detail.
        text: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A phone number is not a valid E.164 number (1 to 15 digits, no leading zero).
    #[error("invalid phone number {0:?} (expected E.164 digits such as 14155550100)")]
    InvalidPhone(String),
    /// A registration code is not a number of at most 9 digits.
    #[error("invalid registration code {0:?}")]
    InvalidCode(String),
    /// The payload (after encoding) does not fit in one frame the server accepts. Nothing was
    /// sent.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Encoded payload size.
        len: usize,
        /// Largest payload that fits.
        max: usize,
    },
    /// The outbox of messages waiting for their ✓ is full. Nothing was sent; wait for
    /// `ServerAck`s (keep calling `recv`) and try again.
    #[error("outbox full ({capacity} messages await their server ack)")]
    OutboxFull {
        /// The outbox's capacity.
        capacity: usize,
    },
    /// A `client_msg_id` of 0 was given; 0 means "no message" in `Error.ref_id`, so ids are
    /// nonzero. Nothing was sent.
    #[error("client_msg_id must be nonzero")]
    ZeroMessageId,
    /// The state directory holds no account: run registration first (or pass the user id).
    #[error("no account in {}: register first", path.display())]
    NotRegistered {
        /// The state directory.
        path: PathBuf,
    },
    /// The [`crate::PayloadCodec`] refused to encode an outgoing payload. Nothing was sent.
    #[error("payload codec: {0}")]
    Codec(#[from] crate::codec::CodecError),
    /// End-to-end encryption failed: a bundle whose signed prekey signature does not verify
    /// (`BadSignature`: the server may be misbehaving), a state file that does not open, a
    /// message too large, … Nothing was sent. The connection stays usable.
    #[error("end-to-end encryption: {0}")]
    E2ee(#[from] switchboard_e2ee::Error),
    /// The contact's identity key differs from the one recorded for it (a reinstalled app, a
    /// new phone, or an attack). Nothing was sent and nothing was accepted: show the new safety
    /// number, and call [`crate::Session::accept_identity`] only after the user agreed; then
    /// send again. The connection stays usable.
    #[error(
        "the identity of +{user} (device {device}) changed; new safety number {safety_number}: \
         verify it with them, then accept the change"
    )]
    IdentityChanged {
        /// The contact.
        user: protocol::UserId,
        /// The contact's device.
        device: protocol::DeviceId,
        /// The safety number with the new identity, grouped in blocks of five digits.
        safety_number: String,
    },
    /// End-to-end encryption was asked for, but the server does not offer the prekey
    /// directory (no `PREKEYS` capability in `Welcome`). The connection is closed.
    #[error("the server does not support end-to-end encryption (no PREKEYS capability)")]
    E2eeUnsupported,
    /// A sealed call step could not be made: no live key for the call (never offered or
    /// opened here, over, or expired), a step this side cannot send, or a limit
    /// (docs/e2ee.md §17.5). Nothing was sent.
    #[error("call: {0}")]
    Call(#[from] switchboard_e2ee::CallError),
    /// An end-to-end encryption call on a session opened without
    /// [`crate::SessionOptions::e2ee`].
    #[error("end-to-end encryption is off for this session")]
    E2eeDisabled,
    /// A link string could not be read (see [`crate::devices::LinkString`]). Nothing was sent.
    #[error("invalid link string: {0}")]
    InvalidLinkString(#[from] crate::devices::LinkStringError),
    /// The server refused a `LinkApprove` (a non-fatal `Error` with one of the codes 33–38).
    /// The connection stays usable.
    #[error("linking refused: {reason}{}", detail(reason.code(), text))]
    LinkRefused {
        /// Why.
        reason: LinkRefusal,
        /// The server's detail.
        text: String,
    },
    /// The server refused an `Unlink` (`NotPrimary` or `NoSuchDevice`). The connection stays
    /// usable.
    #[error("unlink refused: {reason}{}", detail(reason.code(), text))]
    UnlinkRefused {
        /// Why.
        reason: UnlinkRefusal,
        /// The server's detail.
        text: String,
    },
    /// This device was removed from its account (unlinked by the primary or by itself): the
    /// server sent `DeviceRemoved` and closed the connection. Its key no longer logs in
    /// (`UnknownKey`); link it again to use it.
    #[error("this device (+{user}, device {device}) was removed from the account")]
    DeviceRemoved {
        /// The account.
        user: protocol::UserId,
        /// This device.
        device: protocol::DeviceId,
    },
    /// A `SendMulti` kept being refused as stale (the recipient's or this account's device
    /// list changed under every attempt), or it could not be re-encrypted for the new list.
    /// The message left the outbox; nothing was stored.
    #[error("message {client_msg_id} not sent: the device list kept changing ({reason})")]
    DeviceListStale {
        /// The message.
        client_msg_id: u64,
        /// What happened on the last attempt.
        reason: String,
    },
    /// With end-to-end encryption, a device of the recipient (or of this account) is not
    /// trusted: its entry in the device list does not carry a valid signature by its primary,
    /// the primary has not published an identity, or the server handed out a prekey bundle
    /// whose identity is not the one in the signed list. Nothing was encrypted to it and
    /// nothing was sent.
    #[error("device {device} of +{user} is not verified by its primary; not sending")]
    UnverifiedDevice {
        /// The user.
        user: protocol::UserId,
        /// The device.
        device: protocol::DeviceId,
    },
    /// A note to self (a send to this device's own user) on an account with no other
    /// device: there is nobody to deliver it to. Nothing was sent.
    #[error("+{user} has no other device to send to")]
    NoDevices {
        /// The user.
        user: protocol::UserId,
    },
    /// A multi-device call (linking, device lists, unlink) on a connection where the server
    /// did not grant the `MULTI_DEVICE` capability.
    #[error("the server does not support linked devices (no MULTI_DEVICE capability)")]
    MultiDeviceUnsupported,
    /// Linking was asked for on a state directory that already holds an account: a linked
    /// device needs a fresh state directory.
    #[error("{} already holds the account +{} (device {}); link with a new state directory", path.display(), account.user, account.device)]
    AlreadyRegistered {
        /// The state directory.
        path: PathBuf,
        /// The account it holds.
        account: crate::state::Account,
    },
}

/// Why the server refused to link a device (`LinkApprove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LinkRefusal {
    /// `LinkCodeUnknown` (33): no such code, a code issued to another device key, or the new
    /// device disconnected (it must ask for a new code).
    CodeUnknown,
    /// `LinkCodeExpired` (34): the code is past its lifetime.
    CodeExpired,
    /// `LinkCodeUsed` (35): the code was already approved.
    CodeUsed,
    /// `LinkSignatureInvalid` (36): the signature does not verify under the primary's
    /// published identity (or the primary published none yet).
    SignatureInvalid,
    /// `DeviceLimit` (37): the account has the most devices the server allows.
    DeviceLimit,
    /// `NotPrimary` (38): only the primary (device 0) may approve a link.
    NotPrimary,
}

impl LinkRefusal {
    /// The refusal for a server code, if it is one of 33–38.
    pub fn from_code(code: ServerCode) -> Option<Self> {
        Some(match code.known()? {
            ErrorCode::LinkCodeUnknown => Self::CodeUnknown,
            ErrorCode::LinkCodeExpired => Self::CodeExpired,
            ErrorCode::LinkCodeUsed => Self::CodeUsed,
            ErrorCode::LinkSignatureInvalid => Self::SignatureInvalid,
            ErrorCode::DeviceLimit => Self::DeviceLimit,
            ErrorCode::NotPrimary => Self::NotPrimary,
            _ => return None,
        })
    }

    /// The server code.
    pub fn code(self) -> ServerCode {
        ServerCode::from(match self {
            Self::CodeUnknown => ErrorCode::LinkCodeUnknown,
            Self::CodeExpired => ErrorCode::LinkCodeExpired,
            Self::CodeUsed => ErrorCode::LinkCodeUsed,
            Self::SignatureInvalid => ErrorCode::LinkSignatureInvalid,
            Self::DeviceLimit => ErrorCode::DeviceLimit,
            Self::NotPrimary => ErrorCode::NotPrimary,
        })
    }
}

impl std::fmt::Display for LinkRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CodeUnknown => {
                "unknown link code (mistyped, or the new device disconnected: ask it for a new one)"
            }
            Self::CodeExpired => "the link code expired (ask the new device for a new one)",
            Self::CodeUsed => "the link code was already used",
            Self::SignatureInvalid => {
                "the server did not accept this device's signature (are its prekeys published?)"
            }
            Self::DeviceLimit => "the account already has the most devices allowed",
            Self::NotPrimary => "only the primary device (device 0) can link devices",
        })
    }
}

/// Why the server refused to remove a device (`Unlink`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnlinkRefusal {
    /// `NotPrimary` (38): a companion may remove only itself, and nobody the primary.
    NotPrimary,
    /// `NoSuchDevice` (39): the account has no such device.
    NoSuchDevice,
}

impl UnlinkRefusal {
    /// The refusal for a server code, if it is `NotPrimary` or `NoSuchDevice`.
    pub fn from_code(code: ServerCode) -> Option<Self> {
        match code.known()? {
            ErrorCode::NotPrimary => Some(Self::NotPrimary),
            ErrorCode::NoSuchDevice => Some(Self::NoSuchDevice),
            _ => None,
        }
    }

    /// The server code.
    pub fn code(self) -> ServerCode {
        ServerCode::from(match self {
            Self::NotPrimary => ErrorCode::NotPrimary,
            Self::NoSuchDevice => ErrorCode::NoSuchDevice,
        })
    }
}

impl std::fmt::Display for UnlinkRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotPrimary => {
                "a linked device can remove only itself, and the primary cannot be removed"
            }
            Self::NoSuchDevice => "the account has no such device",
        })
    }
}

impl Error {
    /// Is this a connection-level failure that a later [`crate::Session::reconnect`] may cure
    /// (socket error, close, timeout, `GoAway`, or a fatal server code that means "not now":
    /// `ShuttingDown`, `Overloaded`, `IdleTimeout`, `SlowConsumer`, `RateLimited`,
    /// `HandshakeTimeout`, `DecryptFailed`, `Internal`; `docs/protocol.md` §10)? `false` for everything a retry cannot fix (a changed
    /// server key, `UnknownKey`, `Replaced`, a protocol violation, a bad argument).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io { .. } | Error::Closed | Error::Timeout { .. } | Error::GoAway { .. } => true,
            Error::Server { code, .. } => matches!(
                code.known(),
                Some(
                    ErrorCode::ShuttingDown
                        | ErrorCode::Overloaded
                        | ErrorCode::IdleTimeout
                        | ErrorCode::SlowConsumer
                        | ErrorCode::RateLimited
                        | ErrorCode::HandshakeTimeout
                        | ErrorCode::DecryptFailed
                        | ErrorCode::Internal
                )
            ),
            _ => false,
        }
    }

    /// The server's error code, for [`Error::Server`], [`Error::SendRejected`] and
    /// [`Error::GoAway`].
    pub fn server_code(&self) -> Option<ServerCode> {
        match self {
            Error::Server { code, .. }
            | Error::SendRejected { code, .. }
            | Error::GoAway { code, .. } => Some(*code),
            Error::LinkRefused { reason, .. } => Some(reason.code()),
            Error::UnlinkRefused { reason, .. } => Some(reason.code()),
            Error::DeviceRemoved { .. } => Some(ServerCode::from(ErrorCode::DeviceRemoved)),
            Error::DeviceListStale { .. } => Some(ServerCode::from(ErrorCode::DeviceListStale)),
            _ => None,
        }
    }

    pub(crate) fn state(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::State {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::CorruptState {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
