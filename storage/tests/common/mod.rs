//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use switchboard_storage::record::encode;
use switchboard_storage::segment::{encode_segment_header, segment_path};
use switchboard_storage::{Record, SegmentId};

/// Runs `f` to completion on a fresh glommio executor thread.
pub fn run<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// A varied record, deterministic in `i`.
pub fn sample(i: u64) -> Record {
    match i % 5 {
        0 => Record::Message {
            seq: i,
            to_user: 1000 + i,
            to_device: (i % 7) as u16,
            from_user: 2000 + i,
            from_device: 1,
            client_msg_id: i * 31,
            ts_ms: 1_700_000_000_000 + i,
            msg_type: (i % 3) as u8,
            payload: Bytes::from(vec![(i % 251) as u8; (i % 97) as usize + 1]),
        },
        1 => Record::Receipt {
            seq: i,
            to_user: 3,
            to_device: 4,
            from_user: 5,
            from_device: 6,
            client_msg_id: i,
            kind: 1 + (i % 2) as u8,
            ts_ms: i,
        },
        2 => Record::Tombstone { seq: i },
        3 => Record::Account {
            user: i,
            device: 2,
            static_key: [(i % 256) as u8; 32],
            ts_ms: i,
        },
        _ => Record::KeyBinding {
            static_key: [(i % 13) as u8; 32],
            user: i,
            device: 9,
            ts_ms: i,
        },
    }
}

/// Writes segment `id` in `dir` holding `recs`, with std::fs. Returns the offset of each
/// record and the file length.
pub fn write_segment(dir: &Path, id: SegmentId, recs: &[Record]) -> (Vec<usize>, usize) {
    let mut buf = encode_segment_header(id).to_vec();
    let mut offsets = Vec::new();
    for r in recs {
        offsets.push(buf.len());
        encode(r, &mut buf);
    }
    std::fs::write(segment_path(dir, id), &buf).unwrap();
    (offsets, buf.len())
}

/// Just the records of `recovered`.
pub fn records_of(recovered: &[(SegmentId, Record)]) -> Vec<Record> {
    recovered.iter().map(|(_, r)| r.clone()).collect()
}
