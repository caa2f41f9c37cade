//! Mailbox drain: a device with N durable queued messages (100-byte payloads, recovered from the
//! log) logs in; the shard sends `Welcome` and the first delivery window of `Deliver`s, and the
//! device acknowledges each batch until all N were delivered (tombstones and ✓✓ receipts for the
//! offline sender are appended and group-committed on the way). Throughput is N elements, so
//! "thrpt" is messages drained per second of shard CPU. Setup (recovery) is not timed.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use protocol::{frame, Frame};
use switchboard_benches::harness::{user_on, MiniCluster};

fn drain(c: &mut Criterion) {
    let payload = common::payload();
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let mut g = c.benchmark_group("mailbox_drain");
    for n in [100usize, 1_000, 10_000] {
        g.throughput(Throughput::Elements(n as u64));
        if n >= 10_000 {
            g.sample_size(10);
        }
        g.bench_with_input(
            BenchmarkId::new("login_and_drain_all", n),
            &n,
            |bench, &n| {
                bench.iter_batched(
                    || MiniCluster::new(1, &[a, b], &[(b, n, a)], &payload),
                    |mut cl| {
                        let cb = cl.login(b);
                        let mut delivered = 0usize;
                        // Bounded: each round delivers at least one message or stops.
                        for _ in 0..=n {
                            let (seqs, _) = cl.take_seqs(cb.1);
                            if seqs.is_empty() {
                                break;
                            }
                            delivered += seqs.len();
                            for chunk in seqs.chunks(1024) {
                                cl.frame(
                                    cb,
                                    Frame::Ack(frame::Ack {
                                        seqs: chunk.to_vec(),
                                    }),
                                );
                            }
                            cl.settle();
                        }
                        assert_eq!(delivered, n);
                        black_box(cl)
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("login_first_window", n),
            &n,
            |bench, &n| {
                bench.iter_batched(
                    || MiniCluster::new(1, &[a, b], &[(b, n, a)], &payload),
                    |mut cl| {
                        let cb = cl.login(b);
                        let (seqs, _) = cl.take_seqs(cb.1);
                        assert!(!seqs.is_empty());
                        black_box(cl)
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group! { name = benches; config = common::quick(); targets = drain }
criterion_main!(benches);
