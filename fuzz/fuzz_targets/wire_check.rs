//! Arbitrary bytes as a receive buffer for `wire::check`, with several limits. Checks the
//! answer against the length prefix and, for complete records, the slice bounds; then walks the
//! buffer as a stream of records the way the gateway does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::wire::{check, Check, WireError, LEN_PREFIX_BYTES, RECORD_BODY_MAX, TAG_BYTES};
use protocol::ErrorCode;

const MAXES: [usize; 6] = [0, 17, 96, 16_384, RECORD_BODY_MAX, usize::MAX];
const MINS: [usize; 4] = [0, 1, 1 + TAG_BYTES, 32];

fn one(buf: &[u8], min: usize, max: usize) {
    let prefix = buf
        .get(..LEN_PREFIX_BYTES)
        .map(|p| usize::from(u16::from_be_bytes([p[0], p[1]])));
    match check(buf, min, max) {
        Ok(Check::Complete { total }) => {
            let len = prefix.expect("complete implies a prefix");
            assert_eq!(total, LEN_PREFIX_BYTES + len);
            assert!(total <= buf.len());
            let body = &buf[LEN_PREFIX_BYTES..total];
            assert!(
                body.len() >= min && body.len() <= max,
                "body {} outside {min}..={max}",
                body.len()
            );
        }
        Ok(Check::Incomplete { needed }) => {
            assert!(needed > 0);
            match prefix {
                None => assert_eq!(buf.len() + needed, LEN_PREFIX_BYTES),
                Some(len) => {
                    assert!(len >= min && len <= max);
                    assert_eq!(buf.len() + needed, LEN_PREFIX_BYTES + len);
                }
            }
        }
        Err(e @ WireError::TooLarge { len, max: m }) => {
            assert_eq!(Some(len), prefix);
            assert_eq!(m, max);
            assert!(len > max);
            assert_eq!(e.code(), ErrorCode::FrameTooLarge);
        }
        Err(e @ WireError::TooSmall { len, min: m }) => {
            assert_eq!(Some(len), prefix);
            assert_eq!(m, min);
            assert!(len < min && len <= max);
            assert_eq!(e.code(), ErrorCode::MalformedFrame);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for &max in &MAXES {
        for &min in &MINS {
            one(data, min, max);
        }
    }
    // Walk the buffer as a stream with the server's transport limits.
    let mut rest = data;
    loop {
        match check(rest, 1 + TAG_BYTES, 16_384) {
            Ok(Check::Complete { total }) => {
                assert!(total > LEN_PREFIX_BYTES && total <= rest.len());
                rest = &rest[total..];
            }
            Ok(Check::Incomplete { .. }) | Err(_) => break,
        }
    }
});
