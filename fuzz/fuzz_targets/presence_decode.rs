//! The presence and call frames (`docs/protocol.md` §20, §21) and their records (tags 40-43):
//! the first byte picks one of the eleven frame kinds or four record tags, the rest is its
//! body. Decoding never panics, and whatever decodes encodes back to exactly the same bytes.
//! (The generic `frame_decode` / `record_decode` targets reach these kinds only by chance.)
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::frame::{Frame, FrameKind};
use shards::record::Record;

const KINDS: [FrameKind; 11] = [
    FrameKind::PRESENCE_SUBSCRIBE,
    FrameKind::PRIVACY_SET,
    FrameKind::CONTACTS_EDIT,
    FrameKind::TYPING,
    FrameKind::CALL_SIGNAL,
    FrameKind::TURN_REQUEST,
    FrameKind::PRESENCE,
    FrameKind::PRIVACY_STATE,
    FrameKind::TYPING_NOTICE,
    FrameKind::CALL_EVENT,
    FrameKind::TURN_CREDENTIALS,
];

const TAGS: [u8; 4] = [40, 41, 42, 43];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let pick = usize::from(pick) % (KINDS.len() + TAGS.len());
    if let Some(kind) = KINDS.get(pick) {
        let mut bytes = vec![kind.0];
        bytes.extend_from_slice(body);
        if let Ok(f) = Frame::decode(Bytes::from(bytes.clone())) {
            assert_eq!(f.kind(), *kind);
            assert_eq!(f.encoded_len(), bytes.len());
            assert_eq!(f.to_vec(), bytes, "re-encoding changed the bytes");
        }
    } else if let Some(&tag) = TAGS.get(pick - KINDS.len()) {
        let body = Bytes::copy_from_slice(body);
        if let Ok(rec) = Record::decode(tag, &body) {
            let mut framed = Vec::new();
            storage::frame::encode(&rec, &mut framed);
            let frame = storage::frame::decode_frame(&framed).expect("own framing decodes");
            assert_eq!(frame.body, &body[..], "re-encoding changed the bytes");
        }
    }
});
