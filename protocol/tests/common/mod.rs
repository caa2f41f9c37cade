//! Fixed example values behind the test vectors of `docs/protocol.md`.
//!
//! Changing anything here changes the documented vectors: regenerate them (see `vectors.rs`).

#![allow(dead_code)]

pub mod media;
mod presence;
pub use presence::*;
mod groups;
pub use groups::*;

use bytes::Bytes;
use protocol::frame::{
    self, sizes, Ack, Deliver, DeviceKeys, DeviceLinked, DeviceList, DeviceListFetch,
    DeviceUnlinked, FrameBody, GoAway, LinkApprove, LinkCode, LinkKeys, LinkRequest, Login,
    OneTimePrekey, Ping, Pong, PrekeyBundle, PrekeyFetch, PrekeyStatus, PrekeyStatusReason,
    PrekeyUpload, Read, Receipt, RegisterCodeSent, RegisterRequest, RegisterVerify, Registered,
    Send, SendMulti, ServerAck, Unlink, Welcome,
};
use protocol::noise::{ClientHandshake, ServerHandshake, StaticKeypair, Transport, NOISE_PARAMS};
use protocol::{
    capability, Address, AddressKind, DeviceAddr, DeviceCopy, DeviceEntry, DeviceListReason,
    ErrorCode, Frame, Message, MsgType, ReceiptInfo, ReceiptKind, PREAMBLE, PROTOCOL_REVISION,
};

/// Alice: +1 415 555 0100.
pub const ALICE: u64 = 14_155_550_100;
/// Bob: +44 7700 900123.
pub const BOB: u64 = 447_700_900_123;
/// Alice's first message id.
pub const MSG_ID: u64 = 0x0000_0001_0000_002A;
/// 2023-11-14T22:13:20Z in ms.
pub const T0: u64 = 1_700_000_000_000;

/// Client (Alice, device 0) static private key: bytes 0x00..=0x1f.
pub const CLIENT_STATIC: [u8; 32] = seq_key(0x00);
/// Server static private key: bytes 0x20..=0x3f.
pub const SERVER_STATIC: [u8; 32] = seq_key(0x20);
/// Client ephemeral private key: bytes 0x40..=0x5f.
pub const CLIENT_EPHEMERAL: [u8; 32] = seq_key(0x40);
/// Server ephemeral private key: bytes 0x60..=0x7f.
pub const SERVER_EPHEMERAL: [u8; 32] = seq_key(0x60);

const fn seq_key(first: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = first + i as u8;
        i += 1;
    }
    k
}

/// Bob's published keys: the public values of the `docs/e2ee.md` §12 test vectors (identity
/// X25519 and Ed25519 keys, signed prekey id 1 with its real signature, one-time prekey id 7),
/// so the prekey frames below carry a bundle that verifies.
pub fn bob_keys() -> DeviceKeys {
    DeviceKeys {
        identity_dh: hex32("8489032aa94b1130fc7d0ed5c255ce32112a9b40b82ecc0dfffff306d68bdb2c"),
        identity_sign: hex32("60a44d21602c29ea0d34038d435432335802c907329c4e6a8f30f71ab554ef1a"),
        signed_prekey_id: 1,
        signed_prekey: hex32("9d3bf819908f2399606d38b2cdfafc4c1b1c6216d3730f65f784cbb82f3a595a"),
        signed_prekey_sig: hex::decode(
            "6c5a7a17bda497a57ef0cf977a3ae4b06e36968035966e2e3064937f21e470eb\
             0fef09596939cd34d73b39b1b6f729643e80052d405b73278ed1feaf4ffd910c",
        )
        .expect("hex")
        .try_into()
        .expect("64 bytes"),
    }
}

/// Bob's one-time prekey (id 7) from the same vectors.
pub fn bob_one_time() -> OneTimePrekey {
    OneTimePrekey {
        id: 7,
        key: hex32("b09c5c7b359f437fc936fa16567922ca2c82bf41d61cdb64236a01de61f74030"),
    }
}

/// The `request_id` of the prekey examples.
pub const REQUEST_ID: u64 = 0x0000_0002_0000_0001;

/// Alice's companion (device 1) Noise static private key: bytes 0x80..=0x9f.
pub const COMPANION_STATIC: [u8; 32] = seq_key(0x80);

/// The `request_id` the companion puts in its `LinkRequest` (echoed in `LinkCode`).
pub const LINK_REQUEST_ID: u64 = 0x0000_0003_0000_0001;
/// The `request_id` of the primary's `LinkApprove` (echoed in `DeviceLinked`).
pub const LINK_APPROVE_ID: u64 = 0x0000_0002_0000_0002;
/// The link code: random high 48 bits, the issuing shard (3) in the low 16 bits.
pub const LINK_CODE: u64 = 0x5A3C_91E2_7B04_0003;
/// The `request_id` of the device list examples.
pub const DEVICE_LIST_REQUEST_ID: u64 = 0x0000_0002_0000_0003;
/// The `request_id` of the unlink examples.
pub const UNLINK_REQUEST_ID: u64 = 0x0000_0002_0000_0004;
/// The `client_msg_id` of the `SendMulti` example (Alice's next message).
pub const MULTI_MSG_ID: u64 = MSG_ID + 1;

/// Alice's primary (device 0) identity: the public keys of the `docs/e2ee.md` §12 vectors
/// (`alice_identity_x25519_public`, `alice_identity_ed25519_public`).
pub fn alice_identity() -> ([u8; 32], [u8; 32]) {
    (
        hex32("2cd3ea9c29881226a742ca77dfc8aee5b98eeda3f1d0d25d7000892e852cc774"),
        hex32("d08a48a478388ebcec617b285ca209315f6d95c5f200645599155b2c75a19541"),
    )
}

/// Alice's companion (device 1) identity and the primary's device signature over it: the
/// device signature vector of `docs/e2ee.md` (`companion_identity_x25519_public`,
/// `companion_identity_ed25519_public`, `device_signature`), so the link and list frames
/// below carry a signature that verifies under Alice's `identity_sign`.
pub fn companion_identity() -> ([u8; 32], [u8; 32], [u8; 64]) {
    (
        hex32("a45b3abbd659bc272835e404422e2c07390851f242c4fdc7be392ee1641f3e4b"),
        hex32("041788cd65e1c4b9f77fcaa4647cf26850b3341559f34724c13c11d94d21f751"),
        hex::decode(
            "99bc4ce6a1c4a3f757cb2436c4e693ba2f9e6227bd6f2d4fd46fe3dc9a3491f1\
             0d13fd964920b3fad0cf343f937a67ae3a8d6e9cf727329d474768eead315708",
        )
        .expect("hex")
        .try_into()
        .expect("64 bytes"),
    )
}

/// Alice's device list after linking her companion: the primary (registered a year before
/// `T0`, all-zero signature) and device 1 (linked an hour before `T0`).
pub fn alice_devices() -> Vec<DeviceEntry> {
    let (p_dh, p_sign) = alice_identity();
    let (c_dh, c_sign, c_sig) = companion_identity();
    vec![
        DeviceEntry {
            device: 0,
            linked_at_ms: T0 - 365 * 86_400_000,
            identity_dh: p_dh,
            identity_sign: p_sign,
            signature: [0; 64],
        },
        DeviceEntry {
            device: 1,
            linked_at_ms: T0 - 3_600_000,
            identity_dh: c_dh,
            identity_sign: c_sign,
            signature: c_sig,
        },
    ]
}

pub fn link_approve_example() -> LinkApprove {
    let (identity_dh, identity_sign, signature) = companion_identity();
    LinkApprove {
        request_id: LINK_APPROVE_ID,
        code: LINK_CODE,
        keys: Box::new(LinkKeys {
            static_key: StaticKeypair::from_private(COMPANION_STATIC).public,
            identity_dh,
            identity_sign,
            signature,
        }),
    }
}

/// Alice (device 0) to Bob, who has devices 0 and 1, with the sync copy for her own device 1.
/// The payloads stand for the three different ciphertexts.
pub fn send_multi_example() -> SendMulti {
    let copy = |own: bool, device: u16, payload: &'static [u8]| DeviceCopy {
        own,
        device,
        payload: Bytes::from_static(payload),
    };
    SendMulti {
        client_msg_id: MULTI_MSG_ID,
        to_user: BOB,
        msg_type: MsgType::TEXT,
        copies: vec![
            copy(false, 0, b"ct:bob.0"),
            copy(false, 1, b"ct:bob.1"),
            copy(true, 1, b"ct:alice.1"),
        ],
    }
}

pub fn device_list_example() -> DeviceList {
    DeviceList {
        request_id: DEVICE_LIST_REQUEST_ID,
        user: ALICE,
        version: 2,
        reason: DeviceListReason::FETCHED,
        devices: alice_devices(),
    }
}

fn hex32(s: &str) -> [u8; 32] {
    hex::decode(s).expect("hex").try_into().expect("32 bytes")
}

pub fn login_example() -> Frame {
    Frame::Login(Login {
        addr: DeviceAddr::new(ALICE, 0),
        revision: PROTOCOL_REVISION,
        capabilities: capability::MESSAGING,
    })
}

pub fn welcome_example() -> Frame {
    Frame::Welcome(Welcome {
        addr: DeviceAddr::new(ALICE, 0),
        revision: PROTOCOL_REVISION,
        capabilities: capability::MESSAGING,
        server_time_ms: T0,
        keepalive_ms: 30_000,
        max_frame_bytes: 16_384,
    })
}

pub fn send_example() -> Frame {
    Frame::Send(Send {
        client_msg_id: MSG_ID,
        to: Address::device(BOB, 0),
        msg_type: MsgType::TEXT,
        payload: Bytes::from_static(b"hello"),
    })
}

/// One example per frame kind (plus a few variants), named as in the document (`frame_NAME`).
pub fn example_frames() -> Vec<(&'static str, Frame)> {
    let mut all = vec![
        (
            "register_request",
            Frame::RegisterRequest(RegisterRequest { phone: ALICE }),
        ),
        (
            "register_verify",
            Frame::RegisterVerify(RegisterVerify {
                phone: ALICE,
                code: 123_456,
            }),
        ),
        ("login", login_example()),
        ("send", send_example()),
        (
            "send_empty_image_to_group",
            Frame::Send(Send {
                client_msg_id: 7,
                to: Address {
                    kind: AddressKind::Group as u8,
                    id: 0x0102_0304_0506_0708,
                    device: 0,
                },
                msg_type: MsgType::IMAGE,
                payload: Bytes::new(),
            }),
        ),
        (
            "ack",
            Frame::Ack(Ack {
                seqs: vec![1, 2, 300],
            }),
        ),
        (
            "read",
            Frame::Read(Read {
                to: Address::device(ALICE, 0),
                client_msg_id: MSG_ID,
            }),
        ),
        (
            "ping",
            Frame::Ping(Ping {
                nonce: 0x0123_4567_89AB_CDEF,
            }),
        ),
        (
            "pong",
            Frame::Pong(Pong {
                nonce: 0x0123_4567_89AB_CDEF,
            }),
        ),
        ("welcome", welcome_example()),
        (
            "register_code_sent",
            Frame::RegisterCodeSent(RegisterCodeSent {
                phone: ALICE,
                expires_in_s: 600,
            }),
        ),
        (
            "registered",
            Frame::Registered(Registered {
                addr: DeviceAddr::new(ALICE, 0),
            }),
        ),
        (
            "server_ack",
            Frame::ServerAck(ServerAck {
                client_msg_id: MSG_ID,
                server_ts_ms: T0 + 123,
            }),
        ),
        (
            "deliver",
            Frame::Deliver(Deliver {
                seq: 7,
                message: Message {
                    from: DeviceAddr::new(ALICE, 0),
                    client_msg_id: MSG_ID,
                    server_ts_ms: T0 + 123,
                    msg_type: MsgType::TEXT,
                    payload: Bytes::from_static(b"hello"),
                },
            }),
        ),
        (
            "receipt_delivered",
            Frame::Receipt(Receipt {
                seq: 8,
                receipt: ReceiptInfo {
                    from: DeviceAddr::new(BOB, 0),
                    client_msg_id: MSG_ID,
                    kind: ReceiptKind::DELIVERED,
                    ts_ms: T0 + 456,
                },
            }),
        ),
        (
            "receipt_read",
            Frame::Receipt(Receipt {
                seq: 9,
                receipt: ReceiptInfo {
                    from: DeviceAddr::new(BOB, 0),
                    client_msg_id: MSG_ID,
                    kind: ReceiptKind::READ,
                    ts_ms: T0 + 60_000,
                },
            }),
        ),
        (
            "error",
            Frame::Error(frame::Error {
                code: ErrorCode::NoSuchRecipient as u16,
                ref_id: MSG_ID,
                text: "no such recipient".into(),
            }),
        ),
        (
            "error_fatal_no_text",
            Frame::Error(frame::Error {
                code: ErrorCode::IdleTimeout as u16,
                ref_id: 0,
                text: String::new(),
            }),
        ),
        (
            "go_away",
            Frame::GoAway(GoAway {
                code: ErrorCode::ShuttingDown as u16,
                reconnect_after_ms: 5_000,
            }),
        ),
        (
            "prekey_upload",
            Frame::PrekeyUpload(PrekeyUpload {
                keys: Box::new(bob_keys()),
                one_time: vec![bob_one_time()],
            }),
        ),
        (
            "prekey_fetch",
            Frame::PrekeyFetch(PrekeyFetch {
                request_id: REQUEST_ID,
                addr: DeviceAddr::new(BOB, 0),
            }),
        ),
        (
            "prekey_bundle",
            Frame::PrekeyBundle(PrekeyBundle {
                request_id: REQUEST_ID,
                addr: DeviceAddr::new(BOB, 0),
                keys: Box::new(bob_keys()),
                one_time: Some(bob_one_time()),
            }),
        ),
        (
            "prekey_bundle_without_one_time",
            Frame::PrekeyBundle(PrekeyBundle {
                request_id: REQUEST_ID,
                addr: DeviceAddr::new(BOB, 0),
                keys: Box::new(bob_keys()),
                one_time: None,
            }),
        ),
        (
            "prekey_status_below_low_water",
            Frame::PrekeyStatus(PrekeyStatus {
                one_time_remaining: 9,
                low_water: 10,
                reason: PrekeyStatusReason::BELOW_LOW_WATER,
            }),
        ),
        (
            "link_request",
            Frame::LinkRequest(LinkRequest {
                request_id: LINK_REQUEST_ID,
            }),
        ),
        (
            "link_code",
            Frame::LinkCode(LinkCode {
                request_id: LINK_REQUEST_ID,
                code: LINK_CODE,
                expires_in_s: 60,
            }),
        ),
        ("link_approve", Frame::LinkApprove(link_approve_example())),
        (
            "device_linked",
            Frame::DeviceLinked(DeviceLinked {
                request_id: LINK_APPROVE_ID,
                addr: DeviceAddr::new(ALICE, 1),
            }),
        ),
        (
            "registered_linked_device",
            Frame::Registered(Registered {
                addr: DeviceAddr::new(ALICE, 1),
            }),
        ),
        (
            "login_multi_device",
            Frame::Login(Login {
                addr: DeviceAddr::new(ALICE, 1),
                revision: PROTOCOL_REVISION,
                capabilities: capability::MESSAGING
                    | capability::PREKEYS
                    | capability::MULTI_DEVICE,
            }),
        ),
        (
            "device_list_fetch",
            Frame::DeviceListFetch(DeviceListFetch {
                request_id: DEVICE_LIST_REQUEST_ID,
                user: ALICE,
            }),
        ),
        ("device_list", Frame::DeviceList(device_list_example())),
        ("send_multi", Frame::SendMulti(send_multi_example())),
        (
            "device_list_stale",
            Frame::DeviceList(DeviceList {
                request_id: MULTI_MSG_ID,
                user: BOB,
                version: 5,
                reason: DeviceListReason::STALE,
                devices: vec![DeviceEntry {
                    device: 0,
                    linked_at_ms: T0 - 30 * 86_400_000,
                    identity_dh: bob_keys().identity_dh,
                    identity_sign: bob_keys().identity_sign,
                    signature: [0; 64],
                }],
            }),
        ),
        (
            "error_device_list_stale",
            Frame::Error(frame::Error {
                code: ErrorCode::DeviceListStale as u16,
                ref_id: MULTI_MSG_ID,
                text: String::new(),
            }),
        ),
        (
            "receipt_read_elsewhere",
            Frame::Receipt(Receipt {
                seq: 10,
                receipt: ReceiptInfo {
                    from: DeviceAddr::new(BOB, 0),
                    client_msg_id: 0x0000_0007_0000_0011,
                    kind: ReceiptKind::READ_ELSEWHERE,
                    ts_ms: T0 + 90_000,
                },
            }),
        ),
        (
            "unlink",
            Frame::Unlink(Unlink {
                request_id: UNLINK_REQUEST_ID,
                device: 1,
            }),
        ),
        (
            "device_unlinked",
            Frame::DeviceUnlinked(DeviceUnlinked {
                request_id: UNLINK_REQUEST_ID,
                device: 1,
            }),
        ),
    ];
    all.extend(media::media_example_frames());
    all.extend(presence_example_frames());
    all.extend(group_example_frames());
    all
}

/// Byte strings every decoder must refuse, with the code the server answers (then closes).
pub fn reject_vectors() -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    let ping = Ping { nonce: 1 }.to_vec();
    let mut ping_long = ping.clone();
    ping_long.push(0);
    let mut ack_mismatch = vec![0x11, 0x00, 0x02];
    ack_mismatch.extend_from_slice(&5u64.to_be_bytes());
    let mut ack_ragged = vec![0x11, 0x00, 0x01];
    ack_ragged.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5, 0]);
    let mut receipt_bad = Receipt {
        seq: 1,
        receipt: ReceiptInfo {
            from: DeviceAddr::new(BOB, 0),
            client_msg_id: 1,
            kind: ReceiptKind::DELIVERED,
            ts_ms: 0,
        },
    }
    .to_vec();
    // 1, 2 and 3 (READ_ELSEWHERE) are assigned.
    receipt_bad[1 + 8 + 8 + 2 + 8] = 4;
    let mut error_bad_utf8 = frame::Error {
        code: 6,
        ref_id: 0,
        text: String::new(),
    }
    .to_vec();
    error_bad_utf8.extend_from_slice(&[0xC3, 0x28]);
    let mut upload_ragged = PrekeyUpload {
        keys: Box::new(bob_keys()),
        one_time: vec![],
    }
    .to_vec();
    upload_ragged.extend_from_slice(&[0, 0, 0, 7]);
    let mut bundle_bad_flag = PrekeyBundle {
        request_id: 1,
        addr: DeviceAddr::new(BOB, 0),
        keys: Box::new(bob_keys()),
        one_time: None,
    }
    .to_vec();
    bundle_bad_flag[1 + 8 + 8 + 2 + 164] = 2;
    let mut status_bad = PrekeyStatus {
        one_time_remaining: 0,
        low_water: 10,
        reason: PrekeyStatusReason::EXHAUSTED,
    }
    .to_vec();
    status_bad[9] = 0;
    // SendMulti: the first copy header starts after kind and the 18-byte header.
    let multi = send_multi_example();
    let first_copy = 1 + sizes::SEND_MULTI_HEADER;
    let mut multi_own_2 = multi.to_vec();
    multi_own_2[first_copy] = 2;
    let multi_twice = SendMulti {
        copies: vec![
            DeviceCopy {
                own: false,
                device: 1,
                payload: Bytes::from_static(b"ct:bob.1"),
            },
            DeviceCopy {
                own: false,
                device: 1,
                payload: Bytes::from_static(b"ct:bob.1"),
            },
        ],
        ..multi.clone()
    }
    .to_vec();
    // One copy whose `len` (9) claims one byte more than the 8 that follow.
    let mut multi_past_end = SendMulti {
        copies: vec![DeviceCopy {
            own: false,
            device: 0,
            payload: Bytes::from_static(b"ct:bob.0"),
        }],
        ..multi.clone()
    }
    .to_vec();
    multi_past_end[first_copy + 4] = 9;
    let mut multi_zero = multi.to_vec();
    multi_zero.truncate(first_copy);
    multi_zero[first_copy - 1] = 0;
    let mut multi_trailing = multi.to_vec();
    multi_trailing.push(0);
    // DeviceList: reason at offset 21, count at 22.
    let list = device_list_example();
    let mut list_swapped = list.clone();
    list_swapped.devices.reverse();
    let list_out_of_order = list_swapped.to_vec();
    let mut list_count = list.to_vec();
    list_count[22] = 3;
    let mut list_reason = list.to_vec();
    list_reason[21] = 4;
    let approve = link_approve_example().to_vec();
    vec![
        ("unknown_kind", vec![0x7F], ErrorCode::UnknownKind),
        (
            "ping_truncated",
            ping[..ping.len() - 1].to_vec(),
            ErrorCode::MalformedFrame,
        ),
        ("ping_trailing_byte", ping_long, ErrorCode::MalformedFrame),
        (
            "send_truncated_header",
            send_example().to_vec()[..20].to_vec(),
            ErrorCode::MalformedFrame,
        ),
        (
            "ack_zero_count",
            vec![0x11, 0x00, 0x00],
            ErrorCode::MalformedFrame,
        ),
        (
            "ack_count_mismatch",
            ack_mismatch,
            ErrorCode::MalformedFrame,
        ),
        ("ack_ragged_tail", ack_ragged, ErrorCode::MalformedFrame),
        (
            "receipt_unknown_kind",
            receipt_bad,
            ErrorCode::MalformedFrame,
        ),
        (
            "error_text_not_utf8",
            error_bad_utf8,
            ErrorCode::MalformedFrame,
        ),
        (
            "prekey_upload_ragged_tail",
            upload_ragged,
            ErrorCode::MalformedFrame,
        ),
        (
            "prekey_bundle_bad_flag",
            bundle_bad_flag,
            ErrorCode::MalformedFrame,
        ),
        (
            "prekey_status_unknown_reason",
            status_bad,
            ErrorCode::MalformedFrame,
        ),
        ("send_multi_own_2", multi_own_2, ErrorCode::MalformedFrame),
        (
            "send_multi_device_twice",
            multi_twice,
            ErrorCode::MalformedFrame,
        ),
        (
            "send_multi_copy_past_end",
            multi_past_end,
            ErrorCode::MalformedFrame,
        ),
        (
            "send_multi_zero_count",
            multi_zero,
            ErrorCode::MalformedFrame,
        ),
        (
            "send_multi_trailing_byte",
            multi_trailing,
            ErrorCode::MalformedFrame,
        ),
        (
            "device_list_out_of_order",
            list_out_of_order,
            ErrorCode::MalformedFrame,
        ),
        (
            "device_list_count_mismatch",
            list_count,
            ErrorCode::MalformedFrame,
        ),
        (
            "device_list_unknown_reason",
            list_reason,
            ErrorCode::MalformedFrame,
        ),
        (
            "link_approve_truncated",
            approve[..approve.len() - 1].to_vec(),
            ErrorCode::MalformedFrame,
        ),
    ]
    .into_iter()
    .chain(media::media_reject_vectors())
    .chain(group_reject_vectors())
    .collect()
}

/// Everything the fixed-key handshake produces.
pub struct Handshake {
    pub client_static_public: [u8; 32],
    pub server_static_public: [u8; 32],
    pub client_ephemeral_public: [u8; 32],
    pub server_ephemeral_public: [u8; 32],
    pub msg1: Vec<u8>,
    pub msg2: Vec<u8>,
    pub msg3: Vec<u8>,
    pub h: Vec<u8>,
    pub k1: [u8; 32],
    pub k2: [u8; 32],
    /// `Login`, client → server, nonce 0, with its length prefix.
    pub record_c2s_0: Vec<u8>,
    /// `Welcome`, server → client, nonce 0, with its length prefix.
    pub record_s2c_0: Vec<u8>,
    /// `Send`, client → server, nonce 1, with its length prefix.
    pub record_c2s_1: Vec<u8>,
    /// The client's transport after the handshake (nonces at 0).
    pub client_transport: Transport,
    /// The server's transport after the handshake (nonces at 0).
    pub server_transport: Transport,
}

impl Handshake {
    pub fn vectors(&self) -> Vec<(String, Vec<u8>)> {
        [
            ("hs_prologue", PREAMBLE.to_vec()),
            ("hs_client_static_private", CLIENT_STATIC.to_vec()),
            (
                "hs_client_static_public",
                self.client_static_public.to_vec(),
            ),
            ("hs_server_static_private", SERVER_STATIC.to_vec()),
            (
                "hs_server_static_public",
                self.server_static_public.to_vec(),
            ),
            ("hs_client_ephemeral_private", CLIENT_EPHEMERAL.to_vec()),
            (
                "hs_client_ephemeral_public",
                self.client_ephemeral_public.to_vec(),
            ),
            ("hs_server_ephemeral_private", SERVER_EPHEMERAL.to_vec()),
            (
                "hs_server_ephemeral_public",
                self.server_ephemeral_public.to_vec(),
            ),
            ("hs_msg1", self.msg1.clone()),
            ("hs_msg2", self.msg2.clone()),
            ("hs_msg3", self.msg3.clone()),
            ("hs_handshake_hash", self.h.clone()),
            ("hs_k1_initiator_to_responder", self.k1.to_vec()),
            ("hs_k2_responder_to_initiator", self.k2.to_vec()),
            ("record_c2s_0_login", self.record_c2s_0.clone()),
            ("record_s2c_0_welcome", self.record_s2c_0.clone()),
            ("record_c2s_1_send", self.record_c2s_1.clone()),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b))
        .collect()
    }
}

/// Runs the handshake through the crate's wrapper with the fixed keys, then seals the first
/// records. Handshake hash and split keys come from the raw snow replay (the wrapper hides them).
pub fn run_handshake() -> Handshake {
    let client_static = StaticKeypair::from_private(CLIENT_STATIC);
    let server_static = StaticKeypair::from_private(SERVER_STATIC);
    let (c, msg1) =
        ClientHandshake::start_with(&client_static, Some(&CLIENT_EPHEMERAL)).expect("client start");
    let (s, msg2) = ServerHandshake::new_with(&server_static, Some(&SERVER_EPHEMERAL))
        .expect("server new")
        .read_hello(&msg1)
        .expect("server reads msg1");
    let (client_transport, msg3, server_pub) = c.read_hello(&msg2).expect("client reads msg2");
    let (server_transport, client_pub) = s.read_finish(&msg3).expect("server reads msg3");
    assert_eq!(server_pub, server_static.public);
    assert_eq!(client_pub, client_static.public);

    let mut ct = client_transport.clone();
    let mut st = server_transport.clone();
    let mut record_c2s_0 = Vec::new();
    ct.seal_frame(&login_example(), &mut record_c2s_0)
        .expect("seal login");
    let mut record_s2c_0 = Vec::new();
    st.seal_frame(&welcome_example(), &mut record_s2c_0)
        .expect("seal welcome");
    let mut record_c2s_1 = Vec::new();
    ct.seal_frame(&send_example(), &mut record_c2s_1)
        .expect("seal send");

    let raw = raw_snow_handshake();
    Handshake {
        client_static_public: client_static.public,
        server_static_public: server_static.public,
        client_ephemeral_public: StaticKeypair::from_private(CLIENT_EPHEMERAL).public,
        server_ephemeral_public: StaticKeypair::from_private(SERVER_EPHEMERAL).public,
        msg1,
        msg2,
        msg3,
        h: raw.h,
        k1: raw.k1,
        k2: raw.k2,
        record_c2s_0,
        record_s2c_0,
        record_c2s_1,
        client_transport,
        server_transport,
    }
}

/// The same handshake straight through snow, for the values the wrapper does not expose.
pub struct RawHandshake {
    pub msg1: Vec<u8>,
    pub msg2: Vec<u8>,
    pub msg3: Vec<u8>,
    pub h: Vec<u8>,
    pub k1: [u8; 32],
    pub k2: [u8; 32],
}

pub fn raw_snow_handshake() -> RawHandshake {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().expect("params");
    let mut i = snow::Builder::new(params.clone())
        .local_private_key(&CLIENT_STATIC)
        .and_then(|b| b.prologue(&PREAMBLE))
        .expect("builder")
        .fixed_ephemeral_key_for_testing_only(&CLIENT_EPHEMERAL)
        .build_initiator()
        .expect("initiator");
    let mut r = snow::Builder::new(params)
        .local_private_key(&SERVER_STATIC)
        .and_then(|b| b.prologue(&PREAMBLE))
        .expect("builder")
        .fixed_ephemeral_key_for_testing_only(&SERVER_EPHEMERAL)
        .build_responder()
        .expect("responder");
    let mut buf = [0u8; 256];
    let mut scratch = [0u8; 256];
    let n = i.write_message(&[], &mut buf).expect("msg1");
    let msg1 = buf[..n].to_vec();
    r.read_message(&msg1, &mut scratch).expect("read msg1");
    let n = r.write_message(&[], &mut buf).expect("msg2");
    let msg2 = buf[..n].to_vec();
    i.read_message(&msg2, &mut scratch).expect("read msg2");
    let n = i.write_message(&[], &mut buf).expect("msg3");
    let msg3 = buf[..n].to_vec();
    r.read_message(&msg3, &mut scratch).expect("read msg3");
    let h = i.get_handshake_hash().to_vec();
    assert_eq!(h, r.get_handshake_hash(), "both sides agree on h");
    let (k1, k2) = i.dangerously_get_raw_split();
    assert_eq!(
        (k1, k2),
        r.dangerously_get_raw_split(),
        "both sides agree on the split"
    );
    RawHandshake {
        msg1,
        msg2,
        msg3,
        h,
        k1,
        k2,
    }
}
