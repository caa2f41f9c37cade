//! Frame encode / decode: the zero-copy parse of `Send` and `Deliver` with a 100-byte payload,
//! and the outer record check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use protocol::wire::{self, Check};
use protocol::{frame, Address, DeviceAddr, Frame, Message, MsgType};

fn send_frame() -> Frame {
    Frame::Send(frame::Send {
        client_msg_id: 42,
        to: Address::device(14_155_550_100, 0),
        msg_type: MsgType::TEXT,
        payload: common::payload(),
    })
}

fn deliver_frame() -> Frame {
    Frame::Deliver(frame::Deliver {
        seq: 7,
        message: Message {
            from: DeviceAddr {
                user: 14_155_550_101,
                device: 0,
            },
            client_msg_id: 42,
            server_ts_ms: 1_700_000_000_000,
            msg_type: MsgType::TEXT,
            payload: common::payload(),
        },
    })
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    for (name, f) in [("send", send_frame()), ("deliver", deliver_frame())] {
        let mut out = Vec::with_capacity(256);
        g.bench_function(format!("encode_{name}_100B"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&f).encode(&mut out);
                black_box(out.len())
            })
        });
        let wire_bytes = Bytes::from(f.to_vec());
        g.bench_function(format!("decode_{name}_100B"), |b| {
            b.iter(|| {
                // `clone` of `Bytes` is a refcount bump; the payload comes back as a slice of it.
                let f = Frame::decode(black_box(wire_bytes.clone())).expect("decodes");
                black_box(f)
            })
        });
    }
    // The outer record check over a buffer holding one sealed Send record (prefix + body).
    let mut rec = Vec::new();
    wire::put_len(&mut rec, send_frame().encoded_len() + wire::TAG_BYTES);
    rec.extend(std::iter::repeat_n(
        0u8,
        send_frame().encoded_len() + wire::TAG_BYTES,
    ));
    g.bench_function("wire_check_record", |b| {
        b.iter(|| match wire::check(black_box(&rec), 17, 16 * 1024) {
            Ok(Check::Complete { total }) => black_box(total),
            other => panic!("{other:?}"),
        })
    });
    g.finish();
}

criterion_group! { name = benches; config = common::quick(); targets = frames }
criterion_main!(benches);
