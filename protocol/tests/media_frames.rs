//! Property tests of the media frame codecs: every value round-trips, and any bytes after a
//! media kind byte decode or are refused without a panic.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

extern crate switchboard_protocol as protocol;

use bytes::Bytes;
use proptest::prelude::*;
use protocol::frame::{
    MediaClass, MediaDownload, MediaDownloadRequest, MediaSlot, MediaSlotRequest, MediaUrl,
    MEDIA_URL_BYTES_MAX,
};
use protocol::{frame, Frame};

fn media_frame() -> impl Strategy<Value = Frame> {
    let url = "\\PC{1,200}".prop_map(MediaUrl);
    prop_oneof![
        (any::<u64>(), 1u8..=4, any::<u64>(), any::<[u8; 32]>()).prop_map(|(r, c, s, h)| {
            Frame::MediaSlotRequest(MediaSlotRequest {
                request_id: r,
                class: MediaClass(c),
                size: s,
                sha256: h,
            })
        }),
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(r, h)| {
            Frame::MediaDownloadRequest(MediaDownloadRequest {
                request_id: r,
                sha256: h,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>(), url.clone()).prop_map(|(r, s, e, url)| {
            Frame::MediaSlot(MediaSlot {
                request_id: r,
                slot_id: s,
                expires_at_ms: e,
                url,
            })
        }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..=8),
            proptest::collection::btree_set(any::<u64>(), 1..20)
        )
            .prop_map(|(post_id, blobs, users)| {
                Frame::StatusPublish(frame::StatusPublish {
                    post_id,
                    refs: frame::StatusRefs {
                        blobs,
                        audience: users.into_iter().collect(),
                    },
                })
            }),
        any::<u64>().prop_map(|post_id| Frame::StatusDelete(frame::StatusDelete { post_id })),
        (any::<u64>(), any::<u64>()).prop_map(|(post_id, expires_at_ms)| {
            Frame::StatusPublished(frame::StatusPublished {
                post_id,
                expires_at_ms,
            })
        }),
        (any::<u64>(), any::<u64>(), url).prop_map(|(r, e, url)| {
            Frame::MediaDownload(MediaDownload {
                request_id: r,
                expires_at_ms: e,
                url,
            })
        }),
    ]
}

proptest! {
    #[test]
    fn media_frames_round_trip(f in media_frame()) {
        let bytes = f.to_vec();
        prop_assert_eq!(bytes.len(), f.encoded_len());
        prop_assert_eq!(Frame::decode(Bytes::from(bytes)).unwrap(), f);
    }

    #[test]
    fn media_kinds_never_panic(kind in prop::sample::select(vec![0x60u8, 0x61, 0x62, 0x63, 0xC0, 0xC1, 0xC2, 0xC3]),
                               body in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let mut b = vec![kind];
        b.extend_from_slice(&body);
        if let Ok(f) = Frame::decode(Bytes::from(b.clone())) {
            prop_assert_eq!(f.to_vec(), b);
        }
    }
}

#[test]
fn urls_past_the_limit_and_unknown_classes_are_refused() {
    let slot = MediaSlot {
        request_id: 1,
        slot_id: 2,
        expires_at_ms: 3,
        url: MediaUrl("x".repeat(MEDIA_URL_BYTES_MAX)),
    };
    let mut b = Frame::MediaSlot(slot).to_vec();
    assert!(Frame::decode(Bytes::from(b.clone())).is_ok());
    b.push(b'x');
    assert!(Frame::decode(Bytes::from(b)).is_err());
    for class in [0u8, 5, 255] {
        let mut b = Frame::MediaSlotRequest(MediaSlotRequest {
            request_id: 1,
            class: MediaClass::IMAGE,
            size: 1,
            sha256: [0; 32],
        })
        .to_vec();
        b[9] = class;
        assert!(Frame::decode(Bytes::from(b)).is_err(), "class {class}");
    }
}
