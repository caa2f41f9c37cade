//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;

use switchboard_storage::frame::encode;
use switchboard_storage::segment::{encode_segment_header, segment_path};
use switchboard_storage::{Encode, RawRecord, SegmentId};

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

/// A record as the journal sees it: a tag and an opaque body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Encode for Rec {
    fn tag(&self) -> u8 {
        self.tag
    }
    fn body_len(&self) -> usize {
        self.body.len()
    }
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.body);
    }
}

/// A varied record, deterministic in `i`: tags 1..=5, bodies of 8 to 112 bytes that start
/// with `i`.
pub fn sample(i: u64) -> Rec {
    let mut body = i.to_le_bytes().to_vec();
    body.extend(std::iter::repeat_n((i % 251) as u8, (i % 105) as usize));
    Rec {
        tag: 1 + (i % 5) as u8,
        body,
    }
}

/// A record whose body is `seq` (a stand-in for a tombstone).
pub fn small(seq: u64) -> Rec {
    Rec {
        tag: 3,
        body: seq.to_le_bytes().to_vec(),
    }
}

/// Writes segment `id` in `dir` holding `recs`, with std::fs. Returns the offset of each
/// record and the file length.
pub fn write_segment(dir: &Path, id: SegmentId, recs: &[Rec]) -> (Vec<usize>, usize) {
    let mut buf = encode_segment_header(id).to_vec();
    let mut offsets = Vec::new();
    for r in recs {
        offsets.push(buf.len());
        encode(r, &mut buf);
    }
    std::fs::write(segment_path(dir, id), &buf).unwrap();
    (offsets, buf.len())
}

/// Just the tags and bodies of `recovered`.
pub fn records_of(recovered: &[RawRecord]) -> Vec<Rec> {
    recovered
        .iter()
        .map(|r| Rec {
            tag: r.tag,
            body: r.body.to_vec(),
        })
        .collect()
}
