//! The per-shard log on glommio: `append` a batch of B message records (100-byte payload), then
//! one group `commit` (write + `fdatasync`), for B = 1, 16, 256, 4096. Criterion's throughput is
//! set to B elements, so the "thrpt" line is records per second and time / B is the per-record
//! cost. Every commit is fsync-bound: what this measures is mostly the disk's sync latency,
//! amortised over the batch.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use protocol::{DeviceAddr, Message, MsgType};
use shards::record::Record;
use storage::log::{Log, LogConfig};

fn message(seq: u64, payload: &Bytes) -> Record {
    Record::Message {
        seq,
        to: DeviceAddr {
            user: 14_155_550_100,
            device: 0,
        },
        message: Message {
            from: DeviceAddr {
                user: 14_155_550_101,
                device: 0,
            },
            client_msg_id: seq,
            server_ts_ms: 1_700_000_000_000,
            msg_type: MsgType::TEXT,
            payload: payload.clone(),
        },
    }
}

fn group_commit(c: &mut Criterion) {
    let ex: LocalExecutor = LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .expect("glommio executor");
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = common::payload();
    let mut g = c.benchmark_group("log_group_commit");
    for batch in [1usize, 16, 256, 4096] {
        // A fresh log per batch size, so segment rotation is comparable.
        let log = ex
            .run(Log::open(
                LogConfig::new(dir.path().join(format!("b{batch}"))),
                1,
            ))
            .expect("open log");
        let mut seq = 0u64;
        g.throughput(Throughput::Elements(batch as u64));
        if batch >= 256 {
            g.sample_size(10);
        }
        g.bench_with_input(
            BenchmarkId::new("append_then_commit", batch),
            &batch,
            |b, &batch| {
                b.iter_custom(|iters| {
                    ex.run(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let t = Instant::now();
                            for _ in 0..batch {
                                seq += 1;
                                log.append(&message(seq, &payload));
                            }
                            let stats = log.commit().await.expect("commit");
                            total += t.elapsed();
                            assert_eq!(stats.records, batch);
                        }
                        total
                    })
                })
            },
        );
        ex.run(async move { log.close().await.expect("close log") });
    }
    g.finish();
}

criterion_group! { name = benches; config = common::quick(); targets = group_commit }
criterion_main!(benches);
