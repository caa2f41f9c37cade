//! Switchboard's wire format, sans IO.
//!
//! This crate holds everything a peer needs to speak Switchboard and nothing that touches a
//! socket, a clock or a runtime: the outer length-prefixed record framing ([`wire`]), the
//! plaintext frames carried inside the Noise transport ([`frame`]), the error codes
//! ([`ErrorCode`]) and the Noise `XX_25519_AESGCM_SHA256` handshake and transport ([`noise`]).
//! It also owns the two values every layer passes around whole: the device address
//! ([`DeviceAddr`]) and the accepted message ([`Message`], with [`ReceiptInfo`] for receipts).
//! The gateway, the client SDK, the flood generator, the benches and the fuzz targets all link
//! this same code.
//!
//! Layering, outermost first (see `docs/protocol.md` for the byte-exact description):
//!
//! 1. The client opens with the 4-byte [`PREAMBLE`] (`"SWB"`, protocol major version).
//! 2. Every record after that is `len: u16 big-endian` followed by `len` bytes ([`wire`]).
//! 3. The first three records are the Noise XX handshake messages.
//! 4. Every later record is one Noise transport message: AES-256-GCM ciphertext of exactly one
//!    [`frame::Frame`] plus a 16-byte tag.
#![forbid(unsafe_code)]

#[macro_use]
mod codec;
pub mod addr;
pub mod error;
pub mod frame;
pub mod group;
pub mod media;
pub mod message;
pub mod noise;
pub mod presence;
pub mod wire;

pub use addr::{Address, AddressKind, DeviceAddr, DeviceId, UserId};
pub use error::ErrorCode;
pub use frame::{
    DecodeError, DeviceCopy, DeviceEntry, DeviceListReason, Frame, FrameBody, FrameKind,
};
pub use message::{Message, MsgType, ReceiptInfo, ReceiptKind};

/// Protocol major version carried in the preamble. A server closes a connection whose preamble
/// names a version it does not speak (no error frame: there is no channel yet; it is counted as
/// `VersionUnsupported`).
pub const PROTOCOL_VERSION: u8 = 1;

/// The first four bytes a client sends: ASCII `SWB` and [`PROTOCOL_VERSION`]. They are also
/// the Noise prologue, so a man in the middle cannot change them unnoticed.
pub const PREAMBLE: [u8; 4] = [b'S', b'W', b'B', PROTOCOL_VERSION];

/// Minor protocol revision a peer reports in `Login` / `Welcome`. Bumped when fields are added
/// to existing frames or frame kinds are added outside a capability; the kinds of a capability
/// (`GROUPS`, `MEDIA`, `PRESENCE`, `CALLS`) are negotiated by its bit alone, so old peers keep
/// working: new kinds are only sent to peers that announced the matching bit.
pub const PROTOCOL_REVISION: u16 = 2;

/// Capability bits announced in `Login.capabilities` and `Welcome.capabilities`.
pub mod capability {
    /// 1:1 store-and-forward messaging with ✓ / ✓✓ / read receipts (this revision).
    pub const MESSAGING: u64 = 1 << 0;
    /// Prekey directory for end-to-end encryption (X3DH bundles): the `PrekeyUpload`,
    /// `PrekeyFetch`, `PrekeyBundle` and `PrekeyStatus` frames. The server sends
    /// `PrekeyStatus` only to connections that announced this bit.
    pub const PREKEYS: u64 = 1 << 1;
    /// Groups (`docs/protocol.md` §18): `GroupCreate`, `GroupChange`, `GroupSetBlob`,
    /// `GroupInfoFetch`, `GroupSend`, `GroupInfo`, `GroupDone`, and the `GROUP` / `GROUP_EVENT`
    /// message types in `Deliver`. The server answers group requests only from connections
    /// that announced this bit.
    pub const GROUPS: u64 = 1 << 2;
    /// Multi-device accounts: `SendMulti`, linking (`LinkRequest`, `LinkApprove`, `LinkCode`,
    /// `DeviceLinked`), device lists (`DeviceListFetch`, `DeviceList`), `Unlink` /
    /// `DeviceUnlinked`, and the `READ_ELSEWHERE` receipt kind. The server sends
    /// `DeviceList { CHANGED }` only to connections that announced this bit.
    pub const MULTI_DEVICE: u64 = 1 << 3;
    /// Presence, last seen, privacy, contacts, blocking and typing: `PresenceSubscribe` /
    /// `Presence`, `PrivacySet` / `ContactsEdit` / `PrivacyState`, `Typing` / `TypingNotice`
    /// (`docs/protocol.md` §20). The server sends `Presence` and `TypingNotice` only to
    /// connections that announced this bit.
    pub const PRESENCE: u64 = 1 << 4;
    /// Media and status: `MediaSlotRequest` / `MediaSlot`, `MediaDownloadRequest` /
    /// `MediaDownload` (docs/protocol.md §19). The server sends these answers only to
    /// connections that announced this bit.
    pub const MEDIA: u64 = 1 << 5;
    /// Call signalling and TURN credentials: `CallSignal` / `CallEvent`, `TurnRequest` /
    /// `TurnCredentials` (`docs/protocol.md` §21). The server sends `CallEvent` only to
    /// connections that announced this bit (an offer rings only those devices).
    pub const CALLS: u64 = 1 << 6;
    /// What this build of the server implements.
    pub const SERVER_SUPPORTED: u64 =
        MESSAGING | PREKEYS | MULTI_DEVICE | GROUPS | MEDIA | PRESENCE | CALLS;
}
