//! Plaintext frames: what travels inside one Noise transport message.
//!
//! A frame is `kind: u8`, then a fixed header for that kind (all integers big-endian, no
//! padding), then for some kinds a variable tail that runs to the end of the frame. The frame's
//! length is known from the record around it, so tails carry no length of their own.
//!
//! Headers are parsed in place with `zerocopy` (no copy, no allocation); tails are handed out as
//! [`Bytes`] slices of the receive buffer, so a `Send` payload reaches the mailbox and the
//! recipient without being copied by this crate.

use bytes::Bytes;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::addr::{Address, DeviceId, UserId};
use crate::ErrorCode;

/// Frame kind bytes. Client-to-server kinds are below `0x80`, server-to-client kinds at or
/// above it; `Ping`/`Pong` go both ways.
pub mod kind {
    /// C→S: ask for a one-time registration code for a number.
    pub const REGISTER_REQUEST: u8 = 0x01;
    /// C→S: prove the code; binds the connection's static key to the number.
    pub const REGISTER_VERIFY: u8 = 0x02;
    /// C→S: log in as (user, device) with the static key proven in the handshake.
    pub const LOGIN: u8 = 0x03;
    /// C→S: send a message.
    pub const SEND: u8 = 0x10;
    /// C→S: acknowledge `Deliver`/`Receipt` frames by sequence number.
    pub const ACK: u8 = 0x11;
    /// C→S: tell a message's sender it was read.
    pub const READ: u8 = 0x12;
    /// Both ways: keepalive probe.
    pub const PING: u8 = 0x20;
    /// Both ways: keepalive answer.
    pub const PONG: u8 = 0x21;
    /// C→S: publish this device's identity keys, signed prekey and one-time prekeys.
    pub const PREKEY_UPLOAD: u8 = 0x30;
    /// C→S: ask for a device's prekey bundle (consumes one of its one-time prekeys).
    pub const PREKEY_FETCH: u8 = 0x31;
    /// S→C: login accepted.
    pub const WELCOME: u8 = 0x80;
    /// S→C: a registration code was sent out of band.
    pub const REGISTER_CODE_SENT: u8 = 0x81;
    /// S→C: registration complete.
    pub const REGISTERED: u8 = 0x82;
    /// S→C: one tick (✓): the message is durable on the server.
    pub const SERVER_ACK: u8 = 0x83;
    /// S→C: a message for this device.
    pub const DELIVER: u8 = 0x84;
    /// S→C: a delivered (✓✓) or read receipt for a message this device sent.
    pub const RECEIPT: u8 = 0x85;
    /// S→C: the answer to `PrekeyFetch`.
    pub const PREKEY_BUNDLE: u8 = 0xA0;
    /// S→C: how many one-time prekeys the server holds for this device, and why it says so.
    pub const PREKEY_STATUS: u8 = 0xA1;
    /// S→C: an error; fatal codes are followed by a close.
    pub const ERROR: u8 = 0xE0;
    /// S→C: the server is going away; reconnect after the given delay.
    pub const GO_AWAY: u8 = 0xE1;
}

/// Most sequence numbers one `Ack` frame may carry.
pub const ACK_SEQS_MAX: usize = 1024;

/// Most bytes of text in an `Error` frame.
pub const ERROR_TEXT_MAX: usize = 256;

/// Bytes one one-time prekey takes in a `PrekeyUpload` tail (`id u32, key [32]`).
pub const ONE_TIME_PREKEY_BYTES: usize = 36;

/// The long-lived public keys of one device that the server publishes for X3DH: the X25519
/// identity key, the Ed25519 identity signing key, and the current signed prekey with its
/// signature (Ed25519 by `identity_sign` over `0x05 ‖ signed_prekey`, see `docs/e2ee.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceKeys {
    /// X25519 identity key `IK`.
    pub identity_dh: [u8; 32],
    /// Ed25519 identity signing key `IKsig`.
    pub identity_sign: [u8; 32],
    /// Id of the signed prekey, chosen by the device.
    pub signed_prekey_id: u32,
    /// X25519 signed prekey `SPK`.
    pub signed_prekey: [u8; 32],
    /// Ed25519 signature by `identity_sign` over `0x05 ‖ signed_prekey`.
    pub signed_prekey_sig: [u8; 64],
}

/// One X25519 one-time prekey and its id (chosen by the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OneTimePrekey {
    /// Prekey id.
    pub id: u32,
    /// X25519 public key `OPK`.
    pub key: [u8; 32],
}

/// Why the server sent `PrekeyStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PrekeyStatusReason {
    /// The answer to a `PrekeyUpload`: the keys are durable on the server.
    Uploaded = 1,
    /// Fewer one-time prekeys than the server's low-water mark remain: upload more.
    BelowLowWater = 2,
    /// No one-time prekey remains (bundles go out without one): upload more.
    Exhausted = 3,
}

impl PrekeyStatusReason {
    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Uploaded),
            2 => Some(Self::BelowLowWater),
            3 => Some(Self::Exhausted),
            _ => None,
        }
    }
}

/// Receipt kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReceiptKind {
    /// ✓✓: the recipient device acknowledged the message.
    Delivered = 1,
    /// Blue ✓✓: the recipient read it.
    Read = 2,
}

impl ReceiptKind {
    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Delivered),
            2 => Some(Self::Read),
            _ => None,
        }
    }
}

/// Message type carried with a `Send`: it sets the message's priority when a full mailbox is
/// pruned (the seeds' order: calls, voice, image, text, status). Unknown values are stored
/// as given and ranked like text.
pub mod msg_type {
    /// Text message.
    pub const TEXT: u8 = 0;
    /// Image.
    pub const IMAGE: u8 = 1;
    /// Voice message.
    pub const VOICE: u8 = 2;
    /// Call signalling.
    pub const CALL: u8 = 3;
    /// Status update.
    pub const STATUS: u8 = 4;

    /// Pruning priority: higher survives longer.
    pub fn priority(t: u8) -> u8 {
        match t {
            CALL => 100,
            VOICE => 50,
            IMAGE => 30,
            STATUS => 5,
            _ => 10,
        }
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegisterRequestHdr {
    phone: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegisterVerifyHdr {
    phone: U64,
    code: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct LoginHdr {
    user: U64,
    device: U16,
    revision: U16,
    capabilities: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AddressWire {
    kind: u8,
    id: U64,
    device: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SendHdr {
    client_msg_id: U64,
    to: AddressWire,
    msg_type: u8,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AckHdr {
    count: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ReadHdr {
    to: AddressWire,
    client_msg_id: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct NonceHdr {
    nonce: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DeviceKeysWire {
    identity_dh: [u8; 32],
    identity_sign: [u8; 32],
    signed_prekey_id: U32,
    signed_prekey: [u8; 32],
    signed_prekey_sig: [u8; 64],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OneTimePrekeyWire {
    id: U32,
    key: [u8; 32],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PrekeyFetchHdr {
    request_id: U64,
    user: U64,
    device: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PrekeyBundleHdr {
    request_id: U64,
    user: U64,
    device: U16,
    keys: DeviceKeysWire,
    has_one_time: u8,
    one_time: OneTimePrekeyWire,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PrekeyStatusHdr {
    one_time_remaining: U32,
    low_water: U32,
    reason: u8,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WelcomeHdr {
    user: U64,
    device: U16,
    revision: U16,
    capabilities: U64,
    server_time_ms: U64,
    keepalive_ms: U32,
    max_frame_bytes: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegisterCodeSentHdr {
    phone: U64,
    expires_in_s: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegisteredHdr {
    user: U64,
    device: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ServerAckHdr {
    client_msg_id: U64,
    server_ts_ms: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DeliverHdr {
    seq: U64,
    from_user: U64,
    from_device: U16,
    client_msg_id: U64,
    server_ts_ms: U64,
    msg_type: u8,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ReceiptHdr {
    seq: U64,
    from_user: U64,
    from_device: U16,
    client_msg_id: U64,
    kind: u8,
    ts_ms: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ErrorHdr {
    code: U16,
    ref_id: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GoAwayHdr {
    code: U16,
    reconnect_after_ms: U32,
}

/// One plaintext frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// C→S `0x01`: request a code for `phone`. Header: `phone u64` (8 bytes).
    RegisterRequest {
        /// E.164 number as an integer.
        phone: UserId,
    },
    /// C→S `0x02`: prove the code. Header: `phone u64, code u32` (12 bytes).
    RegisterVerify {
        /// E.164 number as an integer.
        phone: UserId,
        /// The 6-digit code.
        code: u32,
    },
    /// C→S `0x03`: log in. Header: `user u64, device u16, revision u16, capabilities u64`
    /// (20 bytes).
    Login {
        /// Who the client says it is; the server checks the handshake's static key against it.
        user: UserId,
        /// Which of the user's devices.
        device: DeviceId,
        /// The client's [`crate::PROTOCOL_REVISION`].
        revision: u16,
        /// The client's [`crate::capability`] bits.
        capabilities: u64,
    },
    /// C→S `0x10`: send. Header: `client_msg_id u64, to Address(11), msg_type u8` (20 bytes),
    /// then the payload (end-to-end ciphertext) to the end of the frame.
    Send {
        /// Chosen by the sender, unique per sending device; retries reuse it (dedup key).
        client_msg_id: u64,
        /// Recipient.
        to: Address,
        /// [`msg_type`] (sets pruning priority).
        msg_type: u8,
        /// Opaque payload.
        payload: Bytes,
    },
    /// C→S `0x11`: acknowledge deliveries/receipts. Header: `count u16`, then `count` × `seq
    /// u64`. `1 <= count <= ACK_SEQS_MAX`.
    Ack {
        /// Sequence numbers from `Deliver` / `Receipt` frames.
        seqs: Vec<u64>,
    },
    /// C→S `0x12`: mark a received message read; the server routes a read receipt to its
    /// sender. Header: `to Address(11)` (the original sender), `client_msg_id u64` (19 bytes).
    Read {
        /// The original sender.
        to: Address,
        /// The original message's `client_msg_id`.
        client_msg_id: u64,
    },
    /// Both ways `0x20`: keepalive. Header: `nonce u64`.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Both ways `0x21`: keepalive answer. Header: `nonce u64`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// C→S `0x30`: publish this device's keys (logged in; stored on the user's home shard).
    /// Header: `identity_dh [32], identity_sign [32], signed_prekey_id u32, signed_prekey [32],
    /// signed_prekey_sig [64]` (164 bytes), then `N` × `(id u32, key [32])` (36 bytes each) to
    /// the end of the frame, `N >= 0`. The identity and signed prekey replace the stored ones;
    /// the one-time prekeys are added. Answer: `PrekeyStatus{reason: Uploaded}` once durable.
    PrekeyUpload {
        /// Identity keys and the current signed prekey (boxed: keeps `Frame` small for the
        /// hot message kinds).
        keys: Box<DeviceKeys>,
        /// One-time prekeys to add.
        one_time: Vec<OneTimePrekey>,
    },
    /// C→S `0x31`: ask for the bundle of (`user`, `device`). Header: `request_id u64, user u64,
    /// device u16` (18 bytes). Answer: `PrekeyBundle` with the same `request_id`, or a
    /// non-fatal `Error` whose `ref_id` is `request_id`.
    PrekeyFetch {
        /// Chosen by the client; echoed in the answer.
        request_id: u64,
        /// Whose bundle.
        user: UserId,
        /// Which device.
        device: DeviceId,
    },
    /// S→C `0xA0`: a prekey bundle. Header: `request_id u64, user u64, device u16`, the 164
    /// bytes of keys as in `PrekeyUpload`, `has_one_time u8, one_time_id u32, one_time [32]`
    /// (219 bytes). When `has_one_time` is 0 the id and key bytes are zero. The one-time prekey
    /// was consumed durably before this frame was sent and is never handed out again.
    PrekeyBundle {
        /// From the `PrekeyFetch`.
        request_id: u64,
        /// Whose bundle.
        user: UserId,
        /// Which device.
        device: DeviceId,
        /// Identity keys and signed prekey (the client verifies the signature; boxed).
        keys: Box<DeviceKeys>,
        /// One one-time prekey, or none when the device has run out.
        one_time: Option<OneTimePrekey>,
    },
    /// S→C `0xA1`: the server's count of this device's one-time prekeys. Header:
    /// `one_time_remaining u32, low_water u32, reason u8` (9 bytes).
    PrekeyStatus {
        /// One-time prekeys stored for this device.
        one_time_remaining: u32,
        /// The server's low-water mark (`prekey_low_water`).
        low_water: u32,
        /// Why it was sent.
        reason: PrekeyStatusReason,
    },
    /// S→C `0x80`: login accepted. Header: `user u64, device u16, revision u16, capabilities
    /// u64, server_time_ms u64, keepalive_ms u32, max_frame_bytes u32` (36 bytes).
    Welcome {
        /// The logged-in user.
        user: UserId,
        /// The logged-in device.
        device: DeviceId,
        /// The server's revision.
        revision: u16,
        /// Capabilities the server will use on this connection (intersection).
        capabilities: u64,
        /// Server wall clock, ms since the Unix epoch.
        server_time_ms: u64,
        /// Send a `Ping` at least this often; the server closes after `idle_timeout_ms`.
        keepalive_ms: u32,
        /// Largest record body the server accepts.
        max_frame_bytes: u32,
    },
    /// S→C `0x81`: a code was sent. Header: `phone u64, expires_in_s u32` (12 bytes).
    RegisterCodeSent {
        /// The number.
        phone: UserId,
        /// Code lifetime in seconds.
        expires_in_s: u32,
    },
    /// S→C `0x82`: registered. Header: `user u64, device u16` (10 bytes).
    Registered {
        /// The user (the number).
        user: UserId,
        /// The device id bound to this static key.
        device: DeviceId,
    },
    /// S→C `0x83`: ✓. Header: `client_msg_id u64, server_ts_ms u64` (16 bytes).
    ServerAck {
        /// The acknowledged `Send`.
        client_msg_id: u64,
        /// When the server accepted it.
        server_ts_ms: u64,
    },
    /// S→C `0x84`: a message. Header: `seq u64, from_user u64, from_device u16,
    /// client_msg_id u64, server_ts_ms u64, msg_type u8` (35 bytes), then the payload.
    Deliver {
        /// Mailbox sequence number; acknowledge it with `Ack`.
        seq: u64,
        /// Sender user.
        from_user: UserId,
        /// Sender device.
        from_device: DeviceId,
        /// Sender's id for the message (dedup key with the sender).
        client_msg_id: u64,
        /// When the server accepted it.
        server_ts_ms: u64,
        /// [`msg_type`].
        msg_type: u8,
        /// Opaque payload.
        payload: Bytes,
    },
    /// S→C `0x85`: a receipt. Header: `seq u64, from_user u64, from_device u16, client_msg_id
    /// u64, kind u8, ts_ms u64` (35 bytes). Acknowledge it with `Ack` like a `Deliver`.
    Receipt {
        /// Mailbox sequence number.
        seq: u64,
        /// The user whose device received/read the message.
        from_user: UserId,
        /// That device.
        from_device: DeviceId,
        /// The original message's `client_msg_id`.
        client_msg_id: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// When it happened (server clock).
        ts_ms: u64,
    },
    /// S→C `0xE0`: an error. Header: `code u16, ref_id u64` (10 bytes), then up to 256 bytes of
    /// UTF-8 text. `ref_id` is the `client_msg_id` of the `Send` it refers to, or 0.
    Error {
        /// Raw code (see [`ErrorCode`]); kept raw so unknown codes survive decoding.
        code: u16,
        /// The request it refers to, or 0.
        ref_id: u64,
        /// Human-readable detail.
        text: String,
    },
    /// S→C `0xE1`: going away. Header: `code u16, reconnect_after_ms u32` (6 bytes).
    GoAway {
        /// Why (usually `ShuttingDown`).
        code: u16,
        /// Wait at least this long before reconnecting.
        reconnect_after_ms: u32,
    },
}

/// Bytes of `text` an `Error` frame carries: at most [`ERROR_TEXT_MAX`], cut at a character
/// boundary. `encoded_len` and `encode` both use it, so they always agree.
fn error_text_len(text: &str) -> usize {
    let mut end = text.len().min(ERROR_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Why a frame could not be decoded. Always fatal for the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame was empty.
    #[error("empty frame")]
    Empty,
    /// The kind byte is not known.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The frame is shorter than its kind's header.
    #[error("frame kind 0x{kind:02x} needs {needed} header bytes, got {got}")]
    Truncated {
        /// Kind byte.
        kind: u8,
        /// Header size.
        needed: usize,
        /// Bytes present after the kind.
        got: usize,
    },
    /// Bytes remain after a kind that has no tail, or a count does not match the tail.
    #[error("frame kind 0x{kind:02x} has {extra} unexpected trailing bytes")]
    Trailing {
        /// Kind byte.
        kind: u8,
        /// How many.
        extra: usize,
    },
    /// A field has a value outside its domain.
    #[error("frame kind 0x{kind:02x}: invalid {field}")]
    InvalidField {
        /// Kind byte.
        kind: u8,
        /// Field name.
        field: &'static str,
    },
}

impl DecodeError {
    /// The error code sent to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownKind(_) => ErrorCode::UnknownKind,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

fn header<T: FromBytes + KnownLayout + Immutable + Unaligned>(
    kind: u8,
    body: &[u8],
) -> Result<(&T, usize), DecodeError> {
    match T::ref_from_prefix(body) {
        Ok((h, _rest)) => Ok((h, std::mem::size_of::<T>())),
        Err(_) => Err(DecodeError::Truncated {
            kind,
            needed: std::mem::size_of::<T>(),
            got: body.len(),
        }),
    }
}

fn exact<T: FromBytes + KnownLayout + Immutable + Unaligned>(
    kind: u8,
    body: &[u8],
) -> Result<&T, DecodeError> {
    let (h, used) = header::<T>(kind, body)?;
    if body.len() != used {
        return Err(DecodeError::Trailing {
            kind,
            extra: body.len() - used,
        });
    }
    Ok(h)
}

fn addr_from(w: &AddressWire) -> Address {
    Address {
        kind: w.kind,
        id: w.id.get(),
        device: w.device.get(),
    }
}

fn addr_to(a: &Address) -> AddressWire {
    AddressWire {
        kind: a.kind,
        id: U64::new(a.id),
        device: U16::new(a.device),
    }
}

fn keys_from(w: &DeviceKeysWire) -> DeviceKeys {
    DeviceKeys {
        identity_dh: w.identity_dh,
        identity_sign: w.identity_sign,
        signed_prekey_id: w.signed_prekey_id.get(),
        signed_prekey: w.signed_prekey,
        signed_prekey_sig: w.signed_prekey_sig,
    }
}

fn keys_to(k: &DeviceKeys) -> DeviceKeysWire {
    DeviceKeysWire {
        identity_dh: k.identity_dh,
        identity_sign: k.identity_sign,
        signed_prekey_id: U32::new(k.signed_prekey_id),
        signed_prekey: k.signed_prekey,
        signed_prekey_sig: k.signed_prekey_sig,
    }
}

fn one_time_from(w: &OneTimePrekeyWire) -> OneTimePrekey {
    OneTimePrekey {
        id: w.id.get(),
        key: w.key,
    }
}

fn one_time_to(k: &OneTimePrekey) -> OneTimePrekeyWire {
    OneTimePrekeyWire {
        id: U32::new(k.id),
        key: k.key,
    }
}

impl Frame {
    /// Decodes one frame. `frame` is the whole plaintext (kind byte first); tails are returned as
    /// slices of it without copying.
    pub fn decode(frame: Bytes) -> Result<Frame, DecodeError> {
        let (&k, body) = frame.split_first().ok_or(DecodeError::Empty)?;
        let tail_at = |used: usize| frame.slice(1 + used..);
        Ok(match k {
            kind::REGISTER_REQUEST => {
                let h = exact::<RegisterRequestHdr>(k, body)?;
                Frame::RegisterRequest {
                    phone: h.phone.get(),
                }
            }
            kind::REGISTER_VERIFY => {
                let h = exact::<RegisterVerifyHdr>(k, body)?;
                Frame::RegisterVerify {
                    phone: h.phone.get(),
                    code: h.code.get(),
                }
            }
            kind::LOGIN => {
                let h = exact::<LoginHdr>(k, body)?;
                Frame::Login {
                    user: h.user.get(),
                    device: h.device.get(),
                    revision: h.revision.get(),
                    capabilities: h.capabilities.get(),
                }
            }
            kind::SEND => {
                let (h, used) = header::<SendHdr>(k, body)?;
                Frame::Send {
                    client_msg_id: h.client_msg_id.get(),
                    to: addr_from(&h.to),
                    msg_type: h.msg_type,
                    payload: tail_at(used),
                }
            }
            kind::ACK => {
                let (h, used) = header::<AckHdr>(k, body)?;
                let count = usize::from(h.count.get());
                if count == 0 || count > ACK_SEQS_MAX {
                    return Err(DecodeError::InvalidField {
                        kind: k,
                        field: "count",
                    });
                }
                let rest = body.get(used..).unwrap_or_default();
                let seqs = <[U64]>::ref_from_bytes(rest).map_err(|_| DecodeError::Trailing {
                    kind: k,
                    extra: rest.len() % 8,
                })?;
                if seqs.len() != count {
                    return Err(DecodeError::InvalidField {
                        kind: k,
                        field: "count",
                    });
                }
                Frame::Ack {
                    seqs: seqs.iter().map(|s| s.get()).collect(),
                }
            }
            kind::READ => {
                let h = exact::<ReadHdr>(k, body)?;
                Frame::Read {
                    to: addr_from(&h.to),
                    client_msg_id: h.client_msg_id.get(),
                }
            }
            kind::PING => Frame::Ping {
                nonce: exact::<NonceHdr>(k, body)?.nonce.get(),
            },
            kind::PONG => Frame::Pong {
                nonce: exact::<NonceHdr>(k, body)?.nonce.get(),
            },
            kind::PREKEY_UPLOAD => {
                let (h, used) = header::<DeviceKeysWire>(k, body)?;
                let rest = body.get(used..).unwrap_or_default();
                let keys = <[OneTimePrekeyWire]>::ref_from_bytes(rest).map_err(|_| {
                    DecodeError::Trailing {
                        kind: k,
                        extra: rest.len() % ONE_TIME_PREKEY_BYTES,
                    }
                })?;
                Frame::PrekeyUpload {
                    keys: Box::new(keys_from(h)),
                    one_time: keys.iter().map(one_time_from).collect(),
                }
            }
            kind::PREKEY_FETCH => {
                let h = exact::<PrekeyFetchHdr>(k, body)?;
                Frame::PrekeyFetch {
                    request_id: h.request_id.get(),
                    user: h.user.get(),
                    device: h.device.get(),
                }
            }
            kind::PREKEY_BUNDLE => {
                let h = exact::<PrekeyBundleHdr>(k, body)?;
                let one_time = match h.has_one_time {
                    0 if h.one_time.id.get() == 0 && h.one_time.key == [0u8; 32] => None,
                    0 => {
                        return Err(DecodeError::InvalidField {
                            kind: k,
                            field: "one_time (must be zero)",
                        })
                    }
                    1 => Some(one_time_from(&h.one_time)),
                    _ => {
                        return Err(DecodeError::InvalidField {
                            kind: k,
                            field: "has_one_time",
                        })
                    }
                };
                Frame::PrekeyBundle {
                    request_id: h.request_id.get(),
                    user: h.user.get(),
                    device: h.device.get(),
                    keys: Box::new(keys_from(&h.keys)),
                    one_time,
                }
            }
            kind::PREKEY_STATUS => {
                let h = exact::<PrekeyStatusHdr>(k, body)?;
                Frame::PrekeyStatus {
                    one_time_remaining: h.one_time_remaining.get(),
                    low_water: h.low_water.get(),
                    reason: PrekeyStatusReason::from_u8(h.reason).ok_or(
                        DecodeError::InvalidField {
                            kind: k,
                            field: "prekey status reason",
                        },
                    )?,
                }
            }
            kind::WELCOME => {
                let h = exact::<WelcomeHdr>(k, body)?;
                Frame::Welcome {
                    user: h.user.get(),
                    device: h.device.get(),
                    revision: h.revision.get(),
                    capabilities: h.capabilities.get(),
                    server_time_ms: h.server_time_ms.get(),
                    keepalive_ms: h.keepalive_ms.get(),
                    max_frame_bytes: h.max_frame_bytes.get(),
                }
            }
            kind::REGISTER_CODE_SENT => {
                let h = exact::<RegisterCodeSentHdr>(k, body)?;
                Frame::RegisterCodeSent {
                    phone: h.phone.get(),
                    expires_in_s: h.expires_in_s.get(),
                }
            }
            kind::REGISTERED => {
                let h = exact::<RegisteredHdr>(k, body)?;
                Frame::Registered {
                    user: h.user.get(),
                    device: h.device.get(),
                }
            }
            kind::SERVER_ACK => {
                let h = exact::<ServerAckHdr>(k, body)?;
                Frame::ServerAck {
                    client_msg_id: h.client_msg_id.get(),
                    server_ts_ms: h.server_ts_ms.get(),
                }
            }
            kind::DELIVER => {
                let (h, used) = header::<DeliverHdr>(k, body)?;
                Frame::Deliver {
                    seq: h.seq.get(),
                    from_user: h.from_user.get(),
                    from_device: h.from_device.get(),
                    client_msg_id: h.client_msg_id.get(),
                    server_ts_ms: h.server_ts_ms.get(),
                    msg_type: h.msg_type,
                    payload: tail_at(used),
                }
            }
            kind::RECEIPT => {
                let h = exact::<ReceiptHdr>(k, body)?;
                Frame::Receipt {
                    seq: h.seq.get(),
                    from_user: h.from_user.get(),
                    from_device: h.from_device.get(),
                    client_msg_id: h.client_msg_id.get(),
                    kind: ReceiptKind::from_u8(h.kind).ok_or(DecodeError::InvalidField {
                        kind: k,
                        field: "receipt kind",
                    })?,
                    ts_ms: h.ts_ms.get(),
                }
            }
            kind::ERROR => {
                let (h, used) = header::<ErrorHdr>(k, body)?;
                let tail = body.get(used..).unwrap_or_default();
                if tail.len() > ERROR_TEXT_MAX {
                    return Err(DecodeError::Trailing {
                        kind: k,
                        extra: tail.len() - ERROR_TEXT_MAX,
                    });
                }
                let text = std::str::from_utf8(tail)
                    .map_err(|_| DecodeError::InvalidField {
                        kind: k,
                        field: "text",
                    })?
                    .to_owned();
                Frame::Error {
                    code: h.code.get(),
                    ref_id: h.ref_id.get(),
                    text,
                }
            }
            kind::GO_AWAY => {
                let h = exact::<GoAwayHdr>(k, body)?;
                Frame::GoAway {
                    code: h.code.get(),
                    reconnect_after_ms: h.reconnect_after_ms.get(),
                }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }

    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::RegisterRequest { .. } => kind::REGISTER_REQUEST,
            Frame::RegisterVerify { .. } => kind::REGISTER_VERIFY,
            Frame::Login { .. } => kind::LOGIN,
            Frame::Send { .. } => kind::SEND,
            Frame::Ack { .. } => kind::ACK,
            Frame::Read { .. } => kind::READ,
            Frame::Ping { .. } => kind::PING,
            Frame::Pong { .. } => kind::PONG,
            Frame::PrekeyUpload { .. } => kind::PREKEY_UPLOAD,
            Frame::PrekeyFetch { .. } => kind::PREKEY_FETCH,
            Frame::PrekeyBundle { .. } => kind::PREKEY_BUNDLE,
            Frame::PrekeyStatus { .. } => kind::PREKEY_STATUS,
            Frame::Welcome { .. } => kind::WELCOME,
            Frame::RegisterCodeSent { .. } => kind::REGISTER_CODE_SENT,
            Frame::Registered { .. } => kind::REGISTERED,
            Frame::ServerAck { .. } => kind::SERVER_ACK,
            Frame::Deliver { .. } => kind::DELIVER,
            Frame::Receipt { .. } => kind::RECEIPT,
            Frame::Error { .. } => kind::ERROR,
            Frame::GoAway { .. } => kind::GO_AWAY,
        }
    }

    /// Length of the encoded frame in bytes (kind byte included).
    pub fn encoded_len(&self) -> usize {
        use std::mem::size_of;
        1 + match self {
            Frame::RegisterRequest { .. } => size_of::<RegisterRequestHdr>(),
            Frame::RegisterVerify { .. } => size_of::<RegisterVerifyHdr>(),
            Frame::Login { .. } => size_of::<LoginHdr>(),
            Frame::Send { payload, .. } => size_of::<SendHdr>() + payload.len(),
            Frame::Ack { seqs } => size_of::<AckHdr>() + 8 * seqs.len(),
            Frame::Read { .. } => size_of::<ReadHdr>(),
            Frame::Ping { .. } | Frame::Pong { .. } => size_of::<NonceHdr>(),
            Frame::PrekeyUpload { one_time, .. } => {
                size_of::<DeviceKeysWire>() + ONE_TIME_PREKEY_BYTES * one_time.len()
            }
            Frame::PrekeyFetch { .. } => size_of::<PrekeyFetchHdr>(),
            Frame::PrekeyBundle { .. } => size_of::<PrekeyBundleHdr>(),
            Frame::PrekeyStatus { .. } => size_of::<PrekeyStatusHdr>(),
            Frame::Welcome { .. } => size_of::<WelcomeHdr>(),
            Frame::RegisterCodeSent { .. } => size_of::<RegisterCodeSentHdr>(),
            Frame::Registered { .. } => size_of::<RegisteredHdr>(),
            Frame::ServerAck { .. } => size_of::<ServerAckHdr>(),
            Frame::Deliver { payload, .. } => size_of::<DeliverHdr>() + payload.len(),
            Frame::Receipt { .. } => size_of::<ReceiptHdr>(),
            Frame::Error { text, .. } => size_of::<ErrorHdr>() + error_text_len(text),
            Frame::GoAway { .. } => size_of::<GoAwayHdr>(),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(self.kind());
        match self {
            Frame::RegisterRequest { phone } => out.extend_from_slice(
                RegisterRequestHdr {
                    phone: U64::new(*phone),
                }
                .as_bytes(),
            ),
            Frame::RegisterVerify { phone, code } => out.extend_from_slice(
                RegisterVerifyHdr {
                    phone: U64::new(*phone),
                    code: U32::new(*code),
                }
                .as_bytes(),
            ),
            Frame::Login {
                user,
                device,
                revision,
                capabilities,
            } => out.extend_from_slice(
                LoginHdr {
                    user: U64::new(*user),
                    device: U16::new(*device),
                    revision: U16::new(*revision),
                    capabilities: U64::new(*capabilities),
                }
                .as_bytes(),
            ),
            Frame::Send {
                client_msg_id,
                to,
                msg_type,
                payload,
            } => {
                out.extend_from_slice(
                    SendHdr {
                        client_msg_id: U64::new(*client_msg_id),
                        to: addr_to(to),
                        msg_type: *msg_type,
                    }
                    .as_bytes(),
                );
                out.extend_from_slice(payload);
            }
            Frame::Ack { seqs } => {
                let count = u16::try_from(seqs.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(
                    AckHdr {
                        count: U16::new(count),
                    }
                    .as_bytes(),
                );
                for s in seqs {
                    out.extend_from_slice(&s.to_be_bytes());
                }
            }
            Frame::Read { to, client_msg_id } => out.extend_from_slice(
                ReadHdr {
                    to: addr_to(to),
                    client_msg_id: U64::new(*client_msg_id),
                }
                .as_bytes(),
            ),
            Frame::Ping { nonce } | Frame::Pong { nonce } => out.extend_from_slice(
                NonceHdr {
                    nonce: U64::new(*nonce),
                }
                .as_bytes(),
            ),
            Frame::PrekeyUpload { keys, one_time } => {
                out.extend_from_slice(keys_to(keys).as_bytes());
                for k in one_time {
                    out.extend_from_slice(one_time_to(k).as_bytes());
                }
            }
            Frame::PrekeyFetch {
                request_id,
                user,
                device,
            } => out.extend_from_slice(
                PrekeyFetchHdr {
                    request_id: U64::new(*request_id),
                    user: U64::new(*user),
                    device: U16::new(*device),
                }
                .as_bytes(),
            ),
            Frame::PrekeyBundle {
                request_id,
                user,
                device,
                keys,
                one_time,
            } => out.extend_from_slice(
                PrekeyBundleHdr {
                    request_id: U64::new(*request_id),
                    user: U64::new(*user),
                    device: U16::new(*device),
                    keys: keys_to(keys),
                    has_one_time: u8::from(one_time.is_some()),
                    one_time: one_time_to(&one_time.unwrap_or(OneTimePrekey {
                        id: 0,
                        key: [0; 32],
                    })),
                }
                .as_bytes(),
            ),
            Frame::PrekeyStatus {
                one_time_remaining,
                low_water,
                reason,
            } => out.extend_from_slice(
                PrekeyStatusHdr {
                    one_time_remaining: U32::new(*one_time_remaining),
                    low_water: U32::new(*low_water),
                    reason: *reason as u8,
                }
                .as_bytes(),
            ),
            Frame::Welcome {
                user,
                device,
                revision,
                capabilities,
                server_time_ms,
                keepalive_ms,
                max_frame_bytes,
            } => out.extend_from_slice(
                WelcomeHdr {
                    user: U64::new(*user),
                    device: U16::new(*device),
                    revision: U16::new(*revision),
                    capabilities: U64::new(*capabilities),
                    server_time_ms: U64::new(*server_time_ms),
                    keepalive_ms: U32::new(*keepalive_ms),
                    max_frame_bytes: U32::new(*max_frame_bytes),
                }
                .as_bytes(),
            ),
            Frame::RegisterCodeSent {
                phone,
                expires_in_s,
            } => out.extend_from_slice(
                RegisterCodeSentHdr {
                    phone: U64::new(*phone),
                    expires_in_s: U32::new(*expires_in_s),
                }
                .as_bytes(),
            ),
            Frame::Registered { user, device } => out.extend_from_slice(
                RegisteredHdr {
                    user: U64::new(*user),
                    device: U16::new(*device),
                }
                .as_bytes(),
            ),
            Frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            } => out.extend_from_slice(
                ServerAckHdr {
                    client_msg_id: U64::new(*client_msg_id),
                    server_ts_ms: U64::new(*server_ts_ms),
                }
                .as_bytes(),
            ),
            Frame::Deliver {
                seq,
                from_user,
                from_device,
                client_msg_id,
                server_ts_ms,
                msg_type,
                payload,
            } => {
                out.extend_from_slice(
                    DeliverHdr {
                        seq: U64::new(*seq),
                        from_user: U64::new(*from_user),
                        from_device: U16::new(*from_device),
                        client_msg_id: U64::new(*client_msg_id),
                        server_ts_ms: U64::new(*server_ts_ms),
                        msg_type: *msg_type,
                    }
                    .as_bytes(),
                );
                out.extend_from_slice(payload);
            }
            Frame::Receipt {
                seq,
                from_user,
                from_device,
                client_msg_id,
                kind,
                ts_ms,
            } => out.extend_from_slice(
                ReceiptHdr {
                    seq: U64::new(*seq),
                    from_user: U64::new(*from_user),
                    from_device: U16::new(*from_device),
                    client_msg_id: U64::new(*client_msg_id),
                    kind: *kind as u8,
                    ts_ms: U64::new(*ts_ms),
                }
                .as_bytes(),
            ),
            Frame::Error { code, ref_id, text } => {
                out.extend_from_slice(
                    ErrorHdr {
                        code: U16::new(*code),
                        ref_id: U64::new(*ref_id),
                    }
                    .as_bytes(),
                );
                out.extend_from_slice(
                    text.get(..error_text_len(text))
                        .unwrap_or_default()
                        .as_bytes(),
                );
            }
            Frame::GoAway {
                code,
                reconnect_after_ms,
            } => out.extend_from_slice(
                GoAwayHdr {
                    code: U16::new(*code),
                    reconnect_after_ms: U32::new(*reconnect_after_ms),
                }
                .as_bytes(),
            ),
        }
    }

    /// Convenience: an `Error` frame for `code`.
    pub fn error(code: ErrorCode, ref_id: u64, text: impl Into<String>) -> Frame {
        let mut text: String = text.into();
        if text.len() > ERROR_TEXT_MAX {
            let mut end = ERROR_TEXT_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Frame::Error {
            code: code as u16,
            ref_id,
            text,
        }
    }

    /// Encodes into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

/// Header sizes (kind byte excluded), exported for docs and overhead figures.
pub mod sizes {
    use super::*;
    /// `Send` header.
    pub const SEND_HEADER: usize = std::mem::size_of::<SendHdr>();
    /// `Deliver` header.
    pub const DELIVER_HEADER: usize = std::mem::size_of::<DeliverHdr>();
    /// `Receipt` header.
    pub const RECEIPT_HEADER: usize = std::mem::size_of::<ReceiptHdr>();
    /// `Welcome` header.
    pub const WELCOME_HEADER: usize = std::mem::size_of::<WelcomeHdr>();
    /// `PrekeyUpload` fixed header (the one-time prekeys follow, 36 bytes each).
    pub const PREKEY_UPLOAD_HEADER: usize = std::mem::size_of::<DeviceKeysWire>();
    /// `PrekeyFetch` header.
    pub const PREKEY_FETCH_HEADER: usize = std::mem::size_of::<PrekeyFetchHdr>();
    /// `PrekeyBundle` header.
    pub const PREKEY_BUNDLE_HEADER: usize = std::mem::size_of::<PrekeyBundleHdr>();
    /// `PrekeyStatus` header.
    pub const PREKEY_STATUS_HEADER: usize = std::mem::size_of::<PrekeyStatusHdr>();

    /// Most one-time prekeys one `PrekeyUpload` can carry in a record body of
    /// `max_record_body` bytes (16-byte tag, kind byte and fixed header included).
    pub const fn prekey_upload_max_keys(max_record_body: usize) -> usize {
        max_record_body.saturating_sub(16 + 1 + PREKEY_UPLOAD_HEADER) / super::ONE_TIME_PREKEY_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = Address> {
        (any::<u8>(), any::<u64>(), any::<u16>()).prop_map(|(kind, id, device)| Address {
            kind,
            id,
            device,
        })
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    pub(crate) fn any_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<u64>().prop_map(|phone| Frame::RegisterRequest { phone }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(phone, code)| Frame::RegisterVerify { phone, code }),
            (any::<u64>(), any::<u16>(), any::<u16>(), any::<u64>()).prop_map(
                |(user, device, revision, capabilities)| {
                    Frame::Login {
                        user,
                        device,
                        revision,
                        capabilities,
                    }
                }
            ),
            (any::<u64>(), addr(), any::<u8>(), payload()).prop_map(
                |(client_msg_id, to, msg_type, payload)| Frame::Send {
                    client_msg_id,
                    to,
                    msg_type,
                    payload
                }
            ),
            proptest::collection::vec(any::<u64>(), 1..=ACK_SEQS_MAX)
                .prop_map(|seqs| Frame::Ack { seqs }),
            (addr(), any::<u64>())
                .prop_map(|(to, client_msg_id)| Frame::Read { to, client_msg_id }),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            (
                any::<u64>(),
                any::<u16>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(
                    |(
                        user,
                        device,
                        revision,
                        capabilities,
                        server_time_ms,
                        keepalive_ms,
                        max_frame_bytes,
                    )| Frame::Welcome {
                        user,
                        device,
                        revision,
                        capabilities,
                        server_time_ms,
                        keepalive_ms,
                        max_frame_bytes
                    }
                ),
            (any::<u64>(), any::<u32>()).prop_map(|(phone, expires_in_s)| {
                Frame::RegisterCodeSent {
                    phone,
                    expires_in_s,
                }
            }),
            (any::<u64>(), any::<u16>())
                .prop_map(|(user, device)| Frame::Registered { user, device }),
            (any::<u64>(), any::<u64>()).prop_map(|(client_msg_id, server_ts_ms)| {
                Frame::ServerAck {
                    client_msg_id,
                    server_ts_ms,
                }
            }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u8>(),
                payload()
            )
                .prop_map(
                    |(
                        seq,
                        from_user,
                        from_device,
                        client_msg_id,
                        server_ts_ms,
                        msg_type,
                        payload,
                    )| Frame::Deliver {
                        seq,
                        from_user,
                        from_device,
                        client_msg_id,
                        server_ts_ms,
                        msg_type,
                        payload
                    }
                ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
                any::<u64>(),
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(
                    |(seq, from_user, from_device, client_msg_id, read, ts_ms)| Frame::Receipt {
                        seq,
                        from_user,
                        from_device,
                        client_msg_id,
                        kind: if read {
                            ReceiptKind::Read
                        } else {
                            ReceiptKind::Delivered
                        },
                        ts_ms
                    }
                ),
            (any::<u16>(), any::<u64>(), "[a-z ]{0,200}")
                .prop_map(|(code, ref_id, text)| Frame::Error { code, ref_id, text }),
            (any::<u16>(), any::<u32>()).prop_map(|(code, reconnect_after_ms)| Frame::GoAway {
                code,
                reconnect_after_ms
            }),
            (device_keys(), proptest::collection::vec(one_time(), 0..40)).prop_map(
                |(keys, one_time)| Frame::PrekeyUpload {
                    keys: Box::new(keys),
                    one_time
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u16>()).prop_map(|(request_id, user, device)| {
                Frame::PrekeyFetch {
                    request_id,
                    user,
                    device,
                }
            }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
                device_keys(),
                proptest::option::of(one_time())
            )
                .prop_map(|(request_id, user, device, keys, one_time)| {
                    Frame::PrekeyBundle {
                        request_id,
                        user,
                        device,
                        keys: Box::new(keys),
                        one_time,
                    }
                }),
            (any::<u32>(), any::<u32>(), 1u8..=3).prop_map(|(one_time_remaining, low_water, r)| {
                Frame::PrekeyStatus {
                    one_time_remaining,
                    low_water,
                    reason: PrekeyStatusReason::from_u8(r).expect("1..=3"),
                }
            }),
        ]
    }

    fn device_keys() -> impl Strategy<Value = DeviceKeys> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(identity_dh, identity_sign, signed_prekey_id, signed_prekey, s1, s2)| {
                    let mut signed_prekey_sig = [0u8; 64];
                    signed_prekey_sig[..32].copy_from_slice(&s1);
                    signed_prekey_sig[32..].copy_from_slice(&s2);
                    DeviceKeys {
                        identity_dh,
                        identity_sign,
                        signed_prekey_id,
                        signed_prekey,
                        signed_prekey_sig,
                    }
                },
            )
    }

    fn one_time() -> impl Strategy<Value = OneTimePrekey> {
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, key)| OneTimePrekey { id, key })
    }

    proptest! {
        #[test]
        fn round_trip(f in any_frame()) {
            let bytes = f.to_vec();
            prop_assert_eq!(bytes.len(), f.encoded_len());
            let back = Frame::decode(Bytes::from(bytes)).expect("decode");
            prop_assert_eq!(back, f);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(Bytes::from(bytes));
        }

        #[test]
        fn truncation_is_an_error_not_a_panic(f in any_frame(), cut in 0usize..40) {
            let bytes = f.to_vec();
            if cut < bytes.len() {
                let short = Bytes::copy_from_slice(&bytes[..bytes.len() - cut - 1]);
                // Frames with tails may still decode (shorter payload); fixed ones must not.
                let _ = Frame::decode(short);
            }
        }
    }

    #[test]
    fn send_payload_is_a_slice_not_a_copy() {
        let f = Frame::Send {
            client_msg_id: 7,
            to: Address::device(14155550100, 0),
            msg_type: 0,
            payload: Bytes::from_static(b"hi"),
        };
        let wire = Bytes::from(f.to_vec());
        let base = wire.as_ptr() as usize;
        let Frame::Send { payload, .. } = Frame::decode(wire.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(payload.as_ptr() as usize, base + 1 + sizes::SEND_HEADER);
    }

    #[test]
    fn long_error_text_is_cut_at_a_char_boundary_consistently() {
        let text = "é".repeat(200); // 400 bytes; byte 256 is inside a character? 256 is even: boundary.
        let text = format!("x{text}"); // now byte 256 falls inside a 2-byte character
        let f = Frame::Error {
            code: 1,
            ref_id: 2,
            text,
        };
        let v = f.to_vec();
        assert_eq!(v.len(), f.encoded_len());
        let Frame::Error { text, .. } = Frame::decode(Bytes::from(v)).unwrap() else {
            panic!()
        };
        assert_eq!(text.len(), 255);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(Frame::decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            Frame::decode(Bytes::from_static(&[0x7f])),
            Err(DecodeError::UnknownKind(0x7f))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[kind::PING, 1, 2])),
            Err(DecodeError::Truncated {
                kind: kind::PING,
                needed: 8,
                got: 2
            })
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[kind::PING, 0, 0, 0, 0, 0, 0, 0, 0, 9])),
            Err(DecodeError::Trailing {
                kind: kind::PING,
                extra: 1
            })
        );
        assert_eq!(DecodeError::UnknownKind(1).code(), ErrorCode::UnknownKind);
        let ack0 = [kind::ACK, 0, 0];
        assert!(matches!(
            Frame::decode(Bytes::copy_from_slice(&ack0)),
            Err(DecodeError::InvalidField { .. })
        ));
    }

    #[test]
    fn header_sizes_are_as_documented() {
        assert_eq!(sizes::SEND_HEADER, 20);
        assert_eq!(sizes::DELIVER_HEADER, 35);
        assert_eq!(sizes::RECEIPT_HEADER, 35);
        assert_eq!(sizes::WELCOME_HEADER, 36);
        assert_eq!(sizes::PREKEY_UPLOAD_HEADER, 164);
        assert_eq!(sizes::PREKEY_FETCH_HEADER, 18);
        assert_eq!(sizes::PREKEY_BUNDLE_HEADER, 219);
        assert_eq!(sizes::PREKEY_STATUS_HEADER, 9);
        assert_eq!(
            ONE_TIME_PREKEY_BYTES,
            std::mem::size_of::<OneTimePrekeyWire>()
        );
        // 16 KiB records: 450 one-time prekeys per upload.
        assert_eq!(sizes::prekey_upload_max_keys(16 * 1024), 450);
    }

    fn keys() -> DeviceKeys {
        DeviceKeys {
            identity_dh: [1; 32],
            identity_sign: [2; 32],
            signed_prekey_id: 3,
            signed_prekey: [4; 32],
            signed_prekey_sig: [5; 64],
        }
    }

    #[test]
    fn prekey_frames_refuse_bad_fields() {
        // An upload tail that is not a whole number of one-time prekeys.
        let mut v = Frame::PrekeyUpload {
            keys: Box::new(keys()),
            one_time: vec![OneTimePrekey {
                id: 1,
                key: [9; 32],
            }],
        }
        .to_vec();
        v.push(0);
        assert_eq!(
            Frame::decode(Bytes::from(v)),
            Err(DecodeError::Trailing {
                kind: kind::PREKEY_UPLOAD,
                extra: 1
            })
        );
        // An upload with no one-time prekeys is fine (identity / signed prekey rotation only).
        let v = Frame::PrekeyUpload {
            keys: Box::new(keys()),
            one_time: vec![],
        }
        .to_vec();
        assert_eq!(v.len(), 165);
        assert!(Frame::decode(Bytes::from(v)).is_ok());
        // A bundle flag other than 0/1, and a flag of 0 with key bytes present.
        let b = Frame::PrekeyBundle {
            request_id: 1,
            user: 2,
            device: 0,
            keys: Box::new(keys()),
            one_time: None,
        }
        .to_vec();
        let flag_at = 1 + 8 + 8 + 2 + 164;
        let mut bad = b.clone();
        bad[flag_at] = 2;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
        let mut bad = b.clone();
        bad[flag_at + 5] = 1;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
        let status = Frame::PrekeyStatus {
            one_time_remaining: 0,
            low_water: 10,
            reason: PrekeyStatusReason::Exhausted,
        };
        let mut bad = status.to_vec();
        bad[9] = 4;
        assert!(matches!(
            Frame::decode(Bytes::from(bad)),
            Err(DecodeError::InvalidField { .. })
        ));
    }
}
