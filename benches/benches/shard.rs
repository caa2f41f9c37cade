//! The shard state machine routing one 100-byte message through its whole life, with an
//! in-memory journal that encodes every record as the real log does and group-commits at once:
//! `Send` → store (append) → durable → ✓ `ServerAck` to the sender and `Deliver` to the
//! recipient → recipient `Ack` (tombstone + receipt append) → durable → `Receipt` (✓✓) to the
//! sender → sender `Ack` (tombstone). Locally (both users on one shard) and cross-shard (two
//! shards, mesh messages carried synchronously). No sockets, no disk: this is the CPU cost of
//! the state machine per message.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use protocol::{frame, Address, Frame, MsgType};
use switchboard_benches::harness::{user_on, MiniCluster};

fn route(c: &mut Criterion) {
    let payload = common::payload();
    let mut g = c.benchmark_group("shard_route");
    g.throughput(Throughput::Elements(1));
    for (name, n) in [("local", 1u16), ("cross_shard", 2u16)] {
        let a = user_on(0, n, 0);
        let b = user_on(n - 1, n, 1);
        let mut cl = MiniCluster::new(n, &[a, b], &[], &payload);
        let ca = cl.login(a);
        let cb = cl.login(b);
        cl.out.clear();
        let mut id = 0u64;
        g.bench_function(format!("{name}_send_ack_deliver_receipt"), |bench| {
            bench.iter(|| {
                id += 1;
                cl.now_ms += 1;
                cl.frame(
                    ca,
                    Frame::Send(frame::Send {
                        client_msg_id: id,
                        to: Address::device(b, 0),
                        msg_type: MsgType::TEXT,
                        payload: payload.clone(),
                    }),
                );
                cl.settle();
                let (seqs, _) = cl.take_seqs(cb.1);
                cl.frame(cb, Frame::Ack(frame::Ack { seqs }));
                cl.settle();
                let (receipts, acks) = cl.take_seqs(ca.1);
                black_box(acks);
                cl.frame(ca, Frame::Ack(frame::Ack { seqs: receipts }));
                cl.settle();
                cl.out.clear();
            })
        });
        // Only the first half: send → durable → ✓ and Deliver. Deliveries are acknowledged in
        // batches of 128 (outside the measurement would distort; the batch ack is amortised).
        let mut pending = Vec::new();
        g.bench_function(format!("{name}_send_to_serverack_and_deliver"), |bench| {
            bench.iter(|| {
                id += 1;
                cl.now_ms += 1;
                cl.frame(
                    ca,
                    Frame::Send(frame::Send {
                        client_msg_id: id,
                        to: Address::device(b, 0),
                        msg_type: MsgType::TEXT,
                        payload: payload.clone(),
                    }),
                );
                cl.settle();
                let (seqs, _) = cl.take_seqs(cb.1);
                pending.extend(seqs);
                if pending.len() >= 128 {
                    cl.frame(
                        cb,
                        Frame::Ack(frame::Ack {
                            seqs: std::mem::take(&mut pending),
                        }),
                    );
                    cl.settle();
                    let (receipts, _) = cl.take_seqs(ca.1);
                    if !receipts.is_empty() {
                        for chunk in receipts.chunks(1024) {
                            cl.frame(
                                ca,
                                Frame::Ack(frame::Ack {
                                    seqs: chunk.to_vec(),
                                }),
                            );
                        }
                        cl.settle();
                    }
                }
                cl.out.clear();
            })
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = common::quick(); targets = route }
criterion_main!(benches);
