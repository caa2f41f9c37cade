//! The simulated journal: durability, rotation, crashes through the real recovery, deletion
//! discipline.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use common::{records_of, sample, small, write_segment, Rec};
use switchboard_storage::frame::encoded_len;
use switchboard_storage::segment::{segment_path, SEGMENT_HEADER_LEN};
use switchboard_storage::{recover, CrashMode, Journal, Lsn, ReadError, SimConfig, SimJournal};

fn appended(j: &SimJournal) -> Vec<Rec> {
    records_of(&j.appended())
}

/// Whether `sub` is an in-order subsequence of `all`.
fn is_subsequence(sub: &[Rec], all: &[Rec]) -> bool {
    let mut it = all.iter();
    sub.iter().all(|r| it.any(|x| x == r))
}

#[test]
fn commit_then_crash_loses_only_the_unsynced() {
    let mut j = SimJournal::new(SimConfig::default());
    for s in 1..=3 {
        assert_eq!(j.append(&small(s)).append_id, s);
    }
    assert_eq!(j.pending_records(), 3);
    assert_eq!(j.commit(), Some(3));
    assert_eq!(j.commit(), None, "nothing left to commit");
    j.append(&small(4));
    j.append(&small(5));
    assert_eq!(records_of(&j.unsynced()), vec![small(4), small(5)]);
    let crash = j.crash_with(CrashMode::LoseUnsynced, 0).expect("recovery");
    assert_eq!(crash.unsynced_bytes, 2 * encoded_len(&small(4)));
    assert_eq!(crash.kept_bytes, 0);
    assert!(crash.recovery.report.is_clean());
    assert_eq!(
        records_of(&crash.recovery.records),
        vec![small(1), small(2), small(3)]
    );
    assert_eq!(j.segments(), vec![1, 2]);
    assert_eq!(
        j.append(&small(6)),
        Lsn {
            append_id: 1,
            segment: 2,
            offset: SEGMENT_HEADER_LEN as u32,
        },
        "append ids restart, a new segment opens"
    );
    j.commit();
    assert_eq!(appended(&j), vec![small(1), small(2), small(3), small(6)]);
}

/// Every cut of the unsynced bytes: recovery keeps every synced record and a prefix of the
/// rest, and a cut inside a record shows as a truncated torn tail.
#[test]
fn torn_prefix_at_every_cut() {
    let build = || {
        let mut j = SimJournal::new(SimConfig {
            segment_bytes_max: 120,
            segment_records_max: None,
        });
        for i in 0..4 {
            j.append(&sample(i));
        }
        j.commit();
        // Enough to rotate inside the uncommitted batch.
        for i in 4..10 {
            j.append(&sample(i));
        }
        j
    };
    let all: Vec<Rec> = (0..10).map(sample).collect();
    assert!(build().active_segment() >= 3, "the batch spans segments");
    let total = build()
        .crash_with(CrashMode::LoseUnsynced, 0)
        .unwrap()
        .unsynced_bytes;
    let mut torn = 0;
    for cut in 0..=total as u64 {
        let mut j = build();
        let crash = j.crash_with(CrashMode::TornPrefix, cut).unwrap();
        assert_eq!(crash.kept_bytes as u64, cut);
        let got = records_of(&crash.recovery.records);
        assert_eq!(got[..4], all[..4], "synced records survive (cut {cut})");
        assert_eq!(got[..], all[..got.len()], "a prefix (cut {cut})");
        let report = &crash.recovery.report;
        assert!(report.resynced.is_empty() && report.missing.is_empty());
        if crash.torn_mid_record {
            torn += 1;
            assert!(
                !report.truncated.is_empty() || !report.skipped.is_empty(),
                "cut {cut}: {report:?}"
            );
        } else {
            assert!(report.is_clean(), "cut {cut}: {report:?}");
        }
        // What the journal holds now is exactly what recovery returned, and stays so.
        assert_eq!(appended(&j), got);
        assert!(j.durable_view().unwrap().report.is_clean() || !report.skipped.is_empty());
    }
    assert!(torn > total / 2, "most cuts tear a record");
}

/// A bit flipped anywhere in the unsynced bytes is always detected, never touches what was
/// synced, and recovery returns a prefix of what was appended.
#[test]
fn bit_flips_are_detected_and_spare_synced_bytes() {
    let all: Vec<Rec> = (0..12).map(sample).collect();
    for r in 0..400u64 {
        let mut j = SimJournal::new(SimConfig::records_per_segment(4));
        for rec in &all[..5] {
            j.append(rec);
        }
        j.commit();
        for rec in &all[5..] {
            j.append(rec);
        }
        let crash = j
            .crash_with(CrashMode::BitFlip, r.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .unwrap();
        assert!(crash.flipped.is_some());
        assert!(crash.kept_bytes <= crash.unsynced_bytes);
        let got = records_of(&crash.recovery.records);
        assert_eq!(got[..5], all[..5], "synced records survive ({r})");
        assert!(is_subsequence(&got, &all), "{r}");
        // Nothing is kept after the record holding the flip: what survives is a prefix.
        assert_eq!(got[..], all[..got.len()], "{r}");
        assert!(!crash.recovery.report.is_clean(), "detected ({r})");
    }
}

#[test]
fn crash_picks_every_mode_from_the_random_value() {
    let mut seen = std::collections::HashSet::new();
    for r in 0..30u64 {
        let mut j = SimJournal::new(SimConfig::default());
        j.append(&small(1));
        seen.insert(j.crash(r).unwrap().mode);
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn rotation_by_bytes_and_by_count() {
    let rec_len = encoded_len(&small(0)) as u64; // 22
    let mut j = SimJournal::new(SimConfig {
        segment_bytes_max: SEGMENT_HEADER_LEN as u64 + 2 * rec_len,
        segment_records_max: None,
    });
    let segs: Vec<_> = (0..5).map(|s| j.append(&small(s)).segment).collect();
    assert_eq!(segs, vec![1, 1, 2, 2, 3]);

    // By count the segment is sealed as soon as it is full.
    let mut j = SimJournal::new(SimConfig::records_per_segment(3));
    let mut segs = Vec::new();
    for s in 0..7 {
        segs.push(j.append(&small(s)).segment);
        if s == 2 {
            assert_eq!(j.active_segment(), 2);
        }
    }
    assert_eq!(segs, vec![1, 1, 1, 2, 2, 2, 3]);
}

/// The bytes are those of segment files: written out, the file-based recovery reads them back.
#[test]
fn segment_bytes_are_the_file_format() {
    let mut j = SimJournal::new(SimConfig::records_per_segment(7));
    for i in 0..20 {
        j.append(&sample(i));
    }
    j.commit();
    let tmp = tempfile::tempdir().unwrap();
    for id in j.segments() {
        std::fs::write(segment_path(tmp.path(), id), j.segment_bytes(id).unwrap()).unwrap();
    }
    let rec = recover(tmp.path()).unwrap();
    assert!(rec.report.is_clean());
    assert_eq!(
        records_of(&rec.records),
        (0..20).map(sample).collect::<Vec<_>>()
    );
    assert_eq!(rec.records, j.appended());
    assert_eq!(rec.segments, j.segments());

    // And the other way: files written by hand load as durable segments.
    let tmp = tempfile::tempdir().unwrap();
    let (_, len) = write_segment(tmp.path(), 1, &[small(1), small(2)]);
    let j = SimJournal::with_durable(SimConfig::default(), [(1, small(1)), (1, small(2))]);
    assert_eq!(
        j.segment_bytes(1).unwrap(),
        &std::fs::read(segment_path(tmp.path(), 1)).unwrap()[..len]
    );
    assert_eq!(j.segments(), vec![1, 2]);
    assert_eq!(j.active_segment(), 2);
}

#[test]
fn deletion_is_immediate_and_oldest_first() {
    let mut j = SimJournal::new(SimConfig::records_per_segment(2));
    for s in 0..5 {
        j.append(&small(s));
    }
    j.commit();
    assert_eq!(j.segments(), vec![1, 2, 3]);
    let before = j.trace_hash();
    j.delete_segment(1);
    assert_ne!(j.trace_hash(), before);
    assert_eq!(appended(&j), vec![small(2), small(3), small(4)]);
    let crash = j.crash_with(CrashMode::LoseUnsynced, 0).unwrap();
    assert!(
        crash.recovery.report.is_clean(),
        "{:?}",
        crash.recovery.report
    );
    assert_eq!(j.segments(), vec![2, 3, 4]);
}

#[test]
#[should_panic(expected = "deleted the active segment")]
fn deleting_the_active_segment_panics() {
    let mut j = SimJournal::new(SimConfig::default());
    j.delete_segment(1);
}

#[test]
#[should_panic(expected = "deleted before an older one")]
fn deleting_out_of_order_panics() {
    let mut j = SimJournal::new(SimConfig::records_per_segment(1));
    j.append(&small(1));
    j.append(&small(2));
    j.delete_segment(2);
}

#[test]
fn forgetting_keeps_rotation_and_memory_flat() {
    let cfg = SimConfig {
        segment_bytes_max: 1000,
        segment_records_max: None,
    };
    let mut a = SimJournal::new(cfg.clone());
    let mut b = SimJournal::new(cfg);
    for i in 0..200 {
        assert_eq!(a.append(&sample(i)), b.append(&sample(i)));
        a.commit();
        b.commit();
        b.forget_durable();
    }
    assert_eq!(a.trace_hash(), b.trace_hash());
    assert!(b.appended().is_empty());
    assert_eq!(b.appends, 200);
}

#[test]
fn the_trace_tells_runs_apart() {
    let run = |n| {
        let mut j = SimJournal::new(SimConfig::default());
        for i in 0..n {
            j.append(&sample(i));
        }
        j.trace_hash()
    };
    assert_eq!(run(10), run(10));
    assert_ne!(run(10), run(11));
}

/// Records read back by offset, synced or not; a crash-lost record or a deleted segment is a
/// typed error.
#[test]
fn read_record_by_offset() {
    let mut j = SimJournal::new(SimConfig::records_per_segment(3));
    let lsns: Vec<Lsn> = (1..=7).map(|s| j.append(&small(s))).collect();
    j.commit();
    let late = j.append(&small(8));
    for (lsn, s) in lsns.iter().zip(1..) {
        let raw = j.read_record(lsn.segment, lsn.offset).unwrap();
        assert_eq!(records_of(&[raw]), vec![small(s)]);
    }
    let raw = j.read_record(late.segment, late.offset).unwrap();
    assert_eq!(records_of(&[raw]), vec![small(8)]);
    assert!(matches!(
        j.read_record(lsns[0].segment, lsns[0].offset + 1),
        Err(ReadError::Frame { .. })
    ));
    j.crash_with(CrashMode::LoseUnsynced, 0).expect("recovery");
    assert!(j.read_record(late.segment, late.offset).is_err());
    j.delete_segment(1);
    assert_eq!(
        j.read_record(1, lsns[0].offset),
        Err(ReadError::NoSegment { segment: 1 })
    );
}
