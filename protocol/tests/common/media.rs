//! Fixed example values behind the media vectors of `docs/protocol.md` §19.

use protocol::frame::{self, MediaClass, MediaDownload, MediaDownloadRequest, MediaSlot};
use protocol::frame::{MediaSlotRequest, MediaUrl};
use protocol::media::{Token, TokenOp};
use protocol::{ErrorCode, Frame};

use super::{ALICE, BOB, T0};

/// The media secret of the examples: bytes 0xA0..=0xBF.
pub const MEDIA_SECRET: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = 0xA0 + i as u8;
        i += 1;
    }
    k
};
/// The slot request's id.
pub const MEDIA_REQUEST_ID: u64 = 0x0000_0008_0000_0001;
/// The download request's id.
pub const MEDIA_DOWNLOAD_ID: u64 = 0x0000_0008_0000_0002;
/// The example base URL (`media_public_url`).
pub const MEDIA_BASE: &str = "http://127.0.0.1:7302";
/// SHA-256 of the example ciphertext: bytes 0x00, 0x11, …, 0xF1 repeated.
pub const MEDIA_SHA: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = (i as u8).wrapping_mul(0x11);
        i += 1;
    }
    k
};
/// Size of the example ciphertext (a 1 MiB image).
pub const MEDIA_SIZE: u64 = 1_048_576 + 16 * 16;
/// The example slot id (`T0 << 16`).
pub const MEDIA_SLOT_ID: u64 = T0 << 16;
/// Token expiry: an hour after T0, in seconds.
pub const MEDIA_EXPIRES_S: u64 = T0 / 1000 + 3600;

/// Alice's upload token.
pub fn upload_token() -> Token {
    Token {
        op: TokenOp::UPLOAD,
        user: ALICE,
        slot_id: MEDIA_SLOT_ID,
        size: MEDIA_SIZE,
        sha256: MEDIA_SHA,
        expires_at_s: MEDIA_EXPIRES_S,
        class: MediaClass::IMAGE,
    }
}

/// Bob's download token for the same blob.
pub fn download_token() -> Token {
    Token {
        op: TokenOp::DOWNLOAD,
        user: BOB,
        slot_id: 0,
        size: 0,
        sha256: MEDIA_SHA,
        expires_at_s: MEDIA_EXPIRES_S,
        class: MediaClass(0),
    }
}

/// The media frames' examples, in document order.
pub fn media_example_frames() -> Vec<(&'static str, Frame)> {
    let up = upload_token().to_text(&MEDIA_SECRET);
    let down = download_token().to_text(&MEDIA_SECRET);
    vec![
        (
            "media_slot_request",
            Frame::MediaSlotRequest(MediaSlotRequest {
                request_id: MEDIA_REQUEST_ID,
                class: MediaClass::IMAGE,
                size: MEDIA_SIZE,
                sha256: MEDIA_SHA,
            }),
        ),
        (
            "media_slot",
            Frame::MediaSlot(MediaSlot {
                request_id: MEDIA_REQUEST_ID,
                slot_id: MEDIA_SLOT_ID,
                expires_at_ms: MEDIA_EXPIRES_S * 1000,
                url: MediaUrl(format!("{MEDIA_BASE}/v1/upload/{up}")),
            }),
        ),
        (
            "error_media_too_large",
            Frame::Error(frame::Error {
                code: ErrorCode::MediaTooLarge as u16,
                ref_id: MEDIA_REQUEST_ID,
                text: String::new(),
            }),
        ),
        (
            "media_download_request",
            Frame::MediaDownloadRequest(MediaDownloadRequest {
                request_id: MEDIA_DOWNLOAD_ID,
                sha256: MEDIA_SHA,
            }),
        ),
        (
            "status_publish",
            Frame::StatusPublish(status_publish_example()),
        ),
        (
            "status_published",
            Frame::StatusPublished(frame::StatusPublished {
                post_id: STATUS_POST_ID,
                expires_at_ms: T0 + 86_400_000,
            }),
        ),
        (
            "status_delete",
            Frame::StatusDelete(frame::StatusDelete {
                post_id: STATUS_POST_ID,
            }),
        ),
        (
            "status_deleted",
            Frame::StatusDeleted(frame::StatusDeleted {
                post_id: STATUS_POST_ID,
            }),
        ),
        (
            "media_download",
            Frame::MediaDownload(MediaDownload {
                request_id: MEDIA_DOWNLOAD_ID,
                expires_at_ms: MEDIA_EXPIRES_S * 1000,
                url: MediaUrl(format!("{MEDIA_BASE}/v1/blob/{down}")),
            }),
        ),
    ]
}

/// Alice's status post id.
pub const STATUS_POST_ID: u64 = 0x0000_0009_0000_0001;

/// Alice posts the example blob to Bob and Carol (+1 202 555 0199).
pub fn status_publish_example() -> frame::StatusPublish {
    frame::StatusPublish {
        post_id: STATUS_POST_ID,
        refs: frame::StatusRefs {
            blobs: vec![MEDIA_SHA],
            audience: vec![BOB, 12_025_550_199],
        },
    }
}

/// Media frames a decoder must refuse (all `MalformedFrame`).
pub fn media_reject_vectors() -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    let (_, req) = media_example_frames().swap_remove(0);
    let mut class_zero = req.to_vec();
    class_zero[9] = 0;
    let mut slot_no_url = media_example_frames().swap_remove(1).1.to_vec();
    slot_no_url.truncate(1 + 24);
    let mut slot_bad_utf8 = slot_no_url.clone();
    slot_bad_utf8.extend_from_slice(&[0xC3, 0x28]);
    let publish = Frame::StatusPublish(status_publish_example()).to_vec();
    let mut publish_twice = publish.clone();
    let bob_at = publish.len() - 16;
    let bob = publish[bob_at..bob_at + 8].to_vec();
    publish_twice[bob_at + 8..].copy_from_slice(&bob);
    let mut publish_nobody = publish[..1 + 8 + 3 + 32].to_vec();
    publish_nobody[1 + 8 + 1..1 + 8 + 3].copy_from_slice(&[0, 0]);
    vec![
        (
            "status_publish_user_twice",
            publish_twice,
            ErrorCode::MalformedFrame,
        ),
        (
            "status_publish_no_audience",
            publish_nobody,
            ErrorCode::MalformedFrame,
        ),
        (
            "media_slot_request_class_0",
            class_zero,
            ErrorCode::MalformedFrame,
        ),
        (
            "media_slot_without_url",
            slot_no_url,
            ErrorCode::MalformedFrame,
        ),
        (
            "media_slot_url_not_utf8",
            slot_bad_utf8,
            ErrorCode::MalformedFrame,
        ),
    ]
}
