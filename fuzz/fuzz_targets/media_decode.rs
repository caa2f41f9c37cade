//! The media decoders over arbitrary input: the media and status frames (kinds 0x60-0x63 and
//! 0xC0-0xC3) with the kind byte chosen by the first input byte, the HTTP token parser and
//! verifier (`Token::parse`, `Token::verify`), and the SDK's media and status messages
//! (`MediaMessage::decode`, `StatusMessage::decode`). None panics; whatever decodes re-encodes
//! to the same bytes, and a token verifies only under the secret that signed it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::media::{Token, TokenOp};
use protocol::Frame;
use switchboard_client::media::MediaMessage;
use switchboard_client::status::StatusMessage;

const KINDS: [u8; 8] = [0x60, 0x61, 0x62, 0x63, 0xC0, 0xC1, 0xC2, 0xC3];

fuzz_target!(|data: &[u8]| {
    if let Some((&first, rest)) = data.split_first() {
        let mut frame = vec![KINDS[usize::from(first) % KINDS.len()]];
        frame.extend_from_slice(rest);
        if let Ok(f) = Frame::decode(Bytes::from(frame.clone())) {
            assert_eq!(f.to_vec(), frame, "media frames have one encoding");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((token, _mac)) = Token::parse(text) {
            let secret = [0x42; 32];
            let signed = token.to_text(&secret);
            assert_eq!(Token::verify(&signed, &secret, token.op, 0), Ok(token));
            assert!(Token::verify(&signed, &[0x43; 32], token.op, 0).is_err());
        }
        let _ = Token::verify(text, &[0; 32], TokenOp::UPLOAD, u64::MAX);
    }
    if let Ok(m) = MediaMessage::decode(data) {
        assert_eq!(MediaMessage::decode(&m.encode()).ok(), Some(m));
    }
    if let Ok(s) = StatusMessage::decode(data) {
        assert_eq!(StatusMessage::decode(&s.encode()).ok(), Some(s));
    }
});
