//! The glommio log writer, end to end with recovery.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::fs;
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

use common::{records_of, run, sample, small, Rec};
use switchboard_storage::frame::encoded_len;
use switchboard_storage::segment::{segment_path, SEGMENT_HEADER_LEN};
use switchboard_storage::{
    recover, Journal, Log, LogConfig, LogError, Lsn, ReadError, SimConfig, SimJournal,
};

fn tmpdir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-0");
    (tmp, dir)
}

fn tiny(dir: &std::path::Path, segment_bytes_max: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        ..LogConfig::new(dir)
    }
}

#[test]
fn append_commit_recover_round_trip() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let rec = recover(&d).unwrap();
        assert_eq!(rec.next_segment, 1);
        let log = Log::open(LogConfig::new(&d), rec.next_segment)
            .await
            .unwrap();
        assert!(!log.has_pending());
        let mut id = 0;
        let mut offset = SEGMENT_HEADER_LEN as u32;
        for batch in 0..5u64 {
            for i in 0..100 {
                let rec = sample(batch * 100 + i);
                let lsn = log.append(&rec);
                id += 1;
                assert_eq!(
                    lsn,
                    Lsn {
                        append_id: id,
                        segment: 1,
                        offset,
                    }
                );
                offset += encoded_len(&rec) as u32;
            }
            assert!(log.has_pending());
            assert!(log.pending_bytes() > 0);
            let st = log.commit().await.unwrap();
            assert_eq!(st.up_to, id);
            assert_eq!(st.records, 100);
            assert!(!log.has_pending());
            assert_eq!(log.pending_bytes(), 0);
        }
        // An empty commit is fine and reports the same watermark.
        let st = log.commit().await.unwrap();
        assert_eq!((st.up_to, st.records, st.fdatasyncs), (500, 0, 0));
        log.close().await.unwrap();
    });
    let rec = recover(&dir).unwrap();
    assert!(rec.report.is_clean(), "{:?}", rec.report);
    assert_eq!(rec.segments, vec![1]);
    assert_eq!(
        records_of(&rec.records),
        (0..500).map(sample).collect::<Vec<_>>()
    );
    assert_eq!(rec.next_segment, 2);
}

#[test]
fn reopen_never_appends_to_a_recovered_segment() {
    let (_tmp, dir) = tmpdir();
    for round in 0..3u64 {
        let d = dir.clone();
        run(move || async move {
            let rec = recover(&d).unwrap();
            assert_eq!(rec.records.len() as u64, round * 10);
            assert_eq!(rec.next_segment as u64, round + 1);
            let log = Log::open(LogConfig::new(&d), rec.next_segment)
                .await
                .unwrap();
            for i in 0..10 {
                let lsn = log.append(&sample(round * 10 + i));
                assert_eq!(lsn.append_id, i + 1, "append ids restart per process");
                assert_eq!(lsn.segment as u64, round + 1);
            }
            // close() commits what is pending.
            log.close().await.unwrap();
        });
    }
    let rec = recover(&dir).unwrap();
    assert_eq!(rec.segments, vec![1, 2, 3]);
    assert_eq!(
        records_of(&rec.records),
        (0..30).map(sample).collect::<Vec<_>>()
    );

    // Opening at an id that exists is refused.
    let d = dir.clone();
    run(move || async move {
        let err = Log::open(LogConfig::new(&d), 2).await.unwrap_err();
        assert!(matches!(err, LogError::Io { .. }), "{err}");
    });
}

#[test]
fn rotation_across_segments_matches_mem_journal() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    let max = 300u64;
    let lsns = run(move || async move {
        let log = Log::open(tiny(&d, max), 1).await.unwrap();
        let mut lsns = Vec::new();
        let mut touched_total = 0;
        for c in 0..4u64 {
            let open_seg = log.active_segment();
            let batch: Vec<Lsn> = (0..25).map(|i| log.append(&sample(c * 25 + i))).collect();
            let st = log.commit().await.unwrap();
            // One fdatasync per file touched, one dir fsync per segment created.
            let mut touched: Vec<_> = batch.iter().map(|l| l.segment).collect();
            touched.dedup();
            let created = touched.iter().filter(|s| **s != open_seg).count();
            assert_eq!(st.fdatasyncs, touched.len());
            assert_eq!(st.segments_created, created);
            assert_eq!(st.dir_syncs, created);
            assert_eq!(st.writes, touched.len(), "one write per segment touched");
            touched_total += touched.len();
            lsns.extend(batch);
        }
        assert!(touched_total > 8);
        log.close().await.unwrap();
        lsns
    });

    // The simulator's journal makes exactly the same rotation decisions.
    let mut mem = SimJournal::new(SimConfig {
        segment_bytes_max: max,
        segment_records_max: None,
    });
    let mem_lsns: Vec<Lsn> = (0..100).map(|i| mem.append(&sample(i))).collect();
    assert_eq!(lsns, mem_lsns);

    let rec = recover(&dir).unwrap();
    assert!(rec.report.is_clean(), "{:?}", rec.report);
    let last = lsns.last().unwrap().segment;
    assert!(last >= 5, "expected several segments, got {last}");
    assert_eq!(rec.segments, (1..=last).collect::<Vec<_>>());
    assert_eq!(
        records_of(&rec.records),
        (0..100).map(sample).collect::<Vec<_>>()
    );
    // Every record is in the segment its Lsn named, and no file exceeds the limit unless it
    // holds a single record.
    for (lsn, r) in lsns.iter().zip(&rec.records) {
        assert_eq!(lsn.segment, r.segment);
    }
    for id in 1..=last {
        let len = fs::metadata(segment_path(&dir, id)).unwrap().len();
        let n = rec.records.iter().filter(|r| r.segment == id).count();
        assert!(
            len <= max || n == 1,
            "segment {id}: {len} bytes, {n} records"
        );
    }
    // And holds byte for byte what the real log wrote.
    mem.commit();
    assert_eq!(mem.segments(), rec.segments);
    assert_eq!(mem.appended(), rec.records);
    for id in 1..=last {
        assert_eq!(
            mem.segment_bytes(id).unwrap(),
            &fs::read(segment_path(&dir, id)).unwrap()[..],
            "segment {id}"
        );
    }
}

#[test]
fn oversized_records_and_write_cap() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let big = |seq: u64| Rec {
            tag: 1,
            body: seq
                .to_le_bytes()
                .into_iter()
                .chain(std::iter::repeat_n(7u8, 1000))
                .collect(),
        };
        let cfg = LogConfig {
            segment_bytes_max: 500,
            batch_bytes_max: 2048,
            ..LogConfig::new(&d)
        };
        let log = Log::open(cfg, 1).await.unwrap();
        // Larger than a segment: each gets a segment of its own.
        let segs: Vec<_> = (0..3).map(|i| log.append(&big(i)).segment).collect();
        assert_eq!(segs, vec![1, 2, 3]);
        let st = log.commit().await.unwrap();
        assert_eq!((st.fdatasyncs, st.segments_created), (3, 2));

        // Many small records into one big segment: writes are capped at 2 KiB.
        let cfg = LogConfig {
            batch_bytes_max: 2048,
            ..LogConfig::new(&d)
        };
        let log2 = Log::open(cfg, 4).await.unwrap();
        let n = 500u64;
        let mut bytes = 0;
        for i in 0..n {
            let r = small(i);
            bytes += encoded_len(&r);
            log2.append(&r);
        }
        let st = log2.commit().await.unwrap();
        assert_eq!(st.bytes, bytes);
        assert_eq!(st.writes, bytes.div_ceil(2048 / 22 * 22));
        assert_eq!(st.fdatasyncs, 1);
        log.close().await.unwrap();
        log2.close().await.unwrap();
    });
    let rec = recover(&dir).unwrap();
    assert!(rec.report.is_clean(), "{:?}", rec.report);
    assert_eq!(rec.records.len(), 503);
    assert_eq!(rec.segments, vec![1, 2, 3, 4]);
}

#[test]
fn group_commit_one_fdatasync_for_1000_appends() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(LogConfig::new(&d), 1).await.unwrap();
        let before = log.counters();
        for i in 0..1000 {
            log.append(&sample(i));
        }
        let st = log.commit().await.unwrap();
        assert_eq!(st.up_to, 1000);
        assert_eq!(st.records, 1000);
        assert_eq!(st.fdatasyncs, 1);
        assert_eq!(st.writes, 1);
        assert_eq!(st.dir_syncs, 0);
        let after = log.counters();
        assert_eq!(after.fdatasyncs - before.fdatasyncs, 1);
        assert_eq!(after.writes - before.writes, 1);
        assert_eq!(after.commits, 1);
        assert_eq!(log.durable_up_to(), 1000);
        log.close().await.unwrap();
    });
    assert_eq!(recover(&dir).unwrap().records.len(), 1000);
}

/// Polls `fut` once; `Some` if it completed.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *fut).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[test]
fn appends_during_a_commit_go_to_the_next_batch() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(LogConfig::new(&d), 1).await.unwrap();
        for i in 0..10 {
            log.append(&sample(i));
        }
        {
            let mut commit = pin!(log.commit());
            match poll_once(&mut commit).await {
                Some(st) => {
                    // The I/O finished at once (unlikely); nothing concurrent to check.
                    assert_eq!(st.unwrap().up_to, 10);
                }
                None => {
                    // In flight: the batch was taken.
                    assert!(!log.has_pending());
                    assert_eq!(log.append(&sample(10)).append_id, 11);
                    assert!(matches!(
                        log.commit().await,
                        Err(LogError::CommitInProgress)
                    ));
                    let st = commit.await.unwrap();
                    assert_eq!((st.up_to, st.records), (10, 10));
                    assert!(log.has_pending());
                    let st = log.commit().await.unwrap();
                    assert_eq!((st.up_to, st.records), (11, 1));
                }
            }
        }
        assert!(log.poisoned().is_none());
        log.close().await.unwrap();
    });
}

#[test]
fn delete_segment_removes_the_file_after_commit() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Rc::new(Log::open(tiny(&d, 200), 1).await.unwrap());
        let mut j = log.clone(); // the shard's handle, through the trait
        while j.active_segment() < 4 {
            j.append(&small(1));
        }
        log.commit().await.unwrap();
        for id in 1..=4 {
            assert!(segment_path(&d, id).exists());
        }
        j.delete_segment(1);
        j.delete_segment(4); // active: refused
        j.delete_segment(9); // future: refused
        assert!(log.has_pending());
        assert!(
            segment_path(&d, 1).exists(),
            "nothing happens before commit"
        );
        let st = log.commit().await.unwrap();
        assert_eq!(st.segments_deleted, 1);
        assert_eq!(st.dir_syncs, 1);
        assert_eq!(st.fdatasyncs, 0);
        assert!(!segment_path(&d, 1).exists());
        assert!(segment_path(&d, 4).exists());
        // Deleting a segment that is already gone is harmless.
        // (through `impl Journal for &Log` this time)
        let mut by_ref: &Log = &log;
        Journal::delete_segment(&mut by_ref, 1);
        let st = log.commit().await.unwrap();
        assert_eq!(st.segments_deleted, 0);
        assert!(log.poisoned().is_none());
        drop(j);
        Rc::try_unwrap(log).unwrap().close().await.unwrap();
    });
    let rec = recover(&dir).unwrap();
    assert_eq!(rec.segments, vec![2, 3, 4]);
    assert!(rec.report.is_clean());
}

#[test]
fn fsync_failure_poisons_for_good() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(LogConfig::new(&d), 1).await.unwrap();
        for i in 0..5 {
            log.append(&sample(i));
        }
        assert_eq!(log.commit().await.unwrap().up_to, 5);

        for i in 5..10 {
            log.append(&sample(i));
        }
        log.inject_failure_for_test();
        let err = log.commit().await.unwrap_err();
        match &err {
            LogError::Io { op, source, .. } => {
                assert_eq!(*op, "fdatasync");
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("expected Io, got {other:?}"),
        }
        let reason = log.poisoned().expect("poisoned");
        assert!(reason.contains("fdatasync"), "{reason}");
        assert_eq!(
            log.durable_up_to(),
            5,
            "the failed batch is not reported durable"
        );

        // Every later commit refuses, without writing.
        let writes = log.counters().writes;
        for i in 10..12 {
            let lsn = log.append(&sample(i));
            assert_eq!(lsn.append_id, i + 1);
            assert!(
                !log.has_pending(),
                "appends to a poisoned log are discarded"
            );
            match log.commit().await {
                Err(LogError::Poisoned(r)) => assert_eq!(r, reason),
                other => panic!("expected Poisoned, got {other:?}"),
            }
        }
        assert_eq!(log.counters().writes, writes);
        assert!(matches!(log.close().await, Err(LogError::Poisoned(_))));
    });
    // What is on disk is what recovery says; at least the acknowledged prefix.
    let rec = recover(&dir).unwrap();
    let got = records_of(&rec.records);
    assert!(got.len() >= 5);
    assert_eq!(got[..5], (0..5).map(sample).collect::<Vec<_>>()[..]);
}

#[test]
fn a_cancelled_commit_poisons() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(LogConfig::new(&d), 1).await.unwrap();
        log.append(&sample(0));
        let mut commit = Box::pin(log.commit());
        if poll_once(&mut commit).await.is_none() {
            drop(commit);
            assert!(log.poisoned().unwrap().contains("cancelled"));
            assert!(matches!(log.commit().await, Err(LogError::Poisoned(_))));
        }
    });
}

#[test]
fn invalid_config_is_refused() {
    let (_tmp, dir) = tmpdir();
    run(move || async move {
        let err = Log::open(tiny(&dir, SEGMENT_HEADER_LEN as u64), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, LogError::InvalidConfig(_)));
        let cfg = LogConfig {
            batch_bytes_max: 0,
            ..LogConfig::new(&dir)
        };
        assert!(matches!(
            Log::open(cfg, 1).await.unwrap_err(),
            LogError::InvalidConfig(_)
        ));
    });
}

#[test]
fn crash_simulation_torn_commit_recovers_a_prefix() {
    // Write a committed prefix with the real log, then simulate a crash in the middle of the
    // next commit by writing its bytes partially, and check recovery keeps exactly the
    // complete records.
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(LogConfig::new(&d), 1).await.unwrap();
        for i in 0..20 {
            log.append(&sample(i));
        }
        log.commit().await.unwrap();
        log.close().await.unwrap();
    });
    let path = segment_path(&dir, 1);
    let full = fs::read(&path).unwrap();
    let mut tail = Vec::new();
    for i in 20..30 {
        switchboard_storage::frame::encode(&sample(i), &mut tail);
    }
    let lens: Vec<usize> = (20..30).map(|i| encoded_len(&sample(i))).collect();
    for cut in [
        0,
        1,
        lens[0] - 1,
        lens[0],
        lens[0] + lens[1] + 5,
        tail.len() - 1,
    ] {
        let mut bytes = full.clone();
        bytes.extend_from_slice(&tail[..cut]);
        fs::write(&path, &bytes).unwrap();
        let rec = recover(&dir).unwrap();
        let mut complete = 0;
        let mut acc = 0;
        for l in &lens {
            if acc + l > cut {
                break;
            }
            acc += l;
            complete += 1;
        }
        assert_eq!(rec.records.len(), 20 + complete, "cut {cut}");
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            full.len() + acc,
            "truncated to the last complete record"
        );
    }
}

/// Records read back by offset: from the pending batch before the commit, from the file after
/// it, CRC-checked; a wrong offset or a deleted segment is a typed error.
#[test]
fn read_record_by_offset() {
    let (_tmp, dir) = tmpdir();
    let d = dir.clone();
    run(move || async move {
        let log = Log::open(tiny(&d, 300), 1).await.unwrap();
        let recs: Vec<Rec> = (0..20).map(sample).collect();
        let lsns: Vec<Lsn> = recs.iter().map(|r| log.append(r)).collect();
        assert!(lsns.iter().any(|l| l.segment > 1), "rotation happened");
        let pending = log
            .read_record(lsns[3].segment, lsns[3].offset)
            .await
            .unwrap();
        assert_eq!(records_of(&[pending]), vec![recs[3].clone()]);
        log.commit().await.unwrap();
        for (lsn, rec) in lsns.iter().zip(&recs) {
            let raw = log.read_record(lsn.segment, lsn.offset).await.unwrap();
            assert_eq!(raw.offset, u64::from(lsn.offset));
            assert_eq!(records_of(&[raw]), vec![rec.clone()]);
        }
        let bad = log.read_record(lsns[0].segment, lsns[0].offset + 1).await;
        assert!(matches!(bad, Err(ReadError::Frame { .. })), "{bad:?}");
        let past = log.read_record(lsns[0].segment, 1 << 20).await;
        assert!(matches!(past, Err(ReadError::Frame { .. })), "{past:?}");
        log.delete_segment(1);
        log.commit().await.unwrap();
        let gone = log.read_record(1, lsns[0].offset).await;
        assert_eq!(gone.unwrap_err(), ReadError::NoSegment { segment: 1 });
        assert!(log.counters().records_read >= 21);
    });
}
