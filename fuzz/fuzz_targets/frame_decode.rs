//! Arbitrary bytes as one plaintext frame. A frame that decodes must re-encode to exactly the
//! input (the encoding is canonical), report its length correctly, and decode again to the same
//! value. A frame that does not decode must map to a fatal error code.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::{ErrorCode, Frame};

fuzz_target!(|data: &[u8]| {
    match Frame::decode(Bytes::copy_from_slice(data)) {
        Ok(frame) => {
            let encoded = frame.to_vec();
            assert_eq!(
                encoded.len(),
                frame.encoded_len(),
                "encoded_len disagrees with encode"
            );
            assert_eq!(encoded, data, "encoding is not canonical for {frame:?}");
            let again = Frame::decode(Bytes::from(encoded)).expect("re-encoded frame decodes");
            assert_eq!(again, frame);
        }
        Err(e) => {
            let code = e.code();
            assert!(code == ErrorCode::MalformedFrame || code == ErrorCode::UnknownKind);
            assert!(code.is_fatal());
        }
    }
});
