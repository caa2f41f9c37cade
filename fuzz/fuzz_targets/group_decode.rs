//! The group decoders over arbitrary bytes: the `Deliver` payload envelope
//! (`protocol::group::GroupEnvelope::decode`, both group message types) and the group frames
//! (the first byte picks one of the nine group kinds, the rest is its body). Neither panics,
//! and whatever decodes re-encodes to exactly the input (one encoding per value).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::frame::FrameKind;
use protocol::group::GroupEnvelope;
use protocol::{Frame, MsgType};

const KINDS: [FrameKind; 9] = [
    FrameKind::GROUP_CREATE,
    FrameKind::GROUP_CHANGE,
    FrameKind::GROUP_SET_BLOB,
    FrameKind::GROUP_INFO_FETCH,
    FrameKind::GROUP_SEND,
    FrameKind::GROUP_INFO,
    FrameKind::GROUP_DONE,
    FrameKind::GROUP_RECEIPT_FETCH,
    FrameKind::GROUP_RECEIPT,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    for t in [MsgType::GROUP, MsgType::GROUP_EVENT] {
        if let Ok(env) = GroupEnvelope::decode(t, &payload) {
            assert_eq!(env.msg_type(), t);
            assert_eq!(env.encode(), payload, "re-encoding changed the envelope");
        }
    }
    let kind = KINDS[usize::from(first) % KINDS.len()];
    let mut frame = vec![kind.0];
    frame.extend_from_slice(rest);
    if let Ok(f) = Frame::decode(Bytes::from(frame.clone())) {
        assert_eq!(f.kind(), kind);
        assert_eq!(f.to_vec(), frame, "re-encoding changed the frame");
    }
});
