//! The log record schema's decoder (`shards::record::Record::decode`) over arbitrary bodies:
//! it never panics, and whatever it accepts encodes back to exactly the bytes it was given
//! (one meaning per byte string: recovery and compaction cannot silently change a record).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shards::record::Record;

fuzz_target!(|data: &[u8]| {
    let Some((&tag, body)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    if let Ok(rec) = Record::decode(tag, &body) {
        assert_eq!(rec.tag(), tag);
        let mut framed = Vec::new();
        storage::frame::encode(&rec, &mut framed);
        let frame = storage::frame::decode_frame(&framed).expect("own framing decodes");
        assert_eq!(frame.tag, tag);
        assert_eq!(frame.body, &body[..], "re-encoding changed the bytes");
    }
});
