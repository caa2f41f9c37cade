//! Recovery over damaged segment files (written with std::fs, no glommio needed).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::fs;

use common::{records_of, sample, write_segment};
use proptest::prelude::*;
use switchboard_storage::frame::{encoded_len, RECORD_HEADER_LEN};
use switchboard_storage::segment::{segment_path, SEGMENT_HEADER_LEN};
use switchboard_storage::{recover, recover_with, RecoveryError, RecoveryOptions};

fn samples(r: std::ops::Range<u64>) -> Vec<common::Rec> {
    r.map(sample).collect()
}

#[test]
fn missing_dir_is_created_and_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/shard-0");
    let rec = recover(&dir).unwrap();
    assert!(dir.is_dir());
    assert!(rec.segments.is_empty());
    assert!(rec.records.is_empty());
    assert_eq!(rec.next_segment, 1);
    assert!(rec.report.is_clean());
}

#[test]
fn clean_segments_read_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..60);
    // Written out of order on purpose; recovery sorts by id.
    write_segment(tmp.path(), 4, &all[40..]);
    write_segment(tmp.path(), 2, &all[..20]);
    write_segment(tmp.path(), 3, &all[20..40]);
    fs::write(tmp.path().join("README"), b"not a segment").unwrap();
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(rec.segments, vec![2, 3, 4]);
    assert_eq!(records_of(&rec.records), all);
    assert_eq!(rec.records[0].segment, 2);
    assert_eq!(rec.records[59].segment, 4);
    assert_eq!(rec.next_segment, 5);
    assert_eq!(rec.report.segments_read, 3);
    assert_eq!(rec.report.records_read, 60);
    assert!(rec.report.is_clean(), "{:?}", rec.report);
}

#[test]
fn torn_tail_mid_record_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..30);
    let (offsets, len) = write_segment(tmp.path(), 1, &all);
    let path = segment_path(tmp.path(), 1);
    // Cut the last record in half (inside its body), and separately inside a header.
    for cut in [len - 3, offsets[29] + RECORD_HEADER_LEN / 2] {
        write_segment(tmp.path(), 1, &all);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let rec = recover(tmp.path()).unwrap();
        assert_eq!(records_of(&rec.records), all[..29].to_vec());
        assert_eq!(rec.report.truncated.len(), 1);
        let d = &rec.report.truncated[0];
        assert_eq!((d.segment, d.offset), (1, offsets[29] as u64));
        assert!(d.reason.contains("incomplete"), "{}", d.reason);
        assert!(rec.report.skipped.is_empty());
        assert_eq!(fs::metadata(&path).unwrap().len(), offsets[29] as u64);
        // Idempotent: a second recovery finds a clean file.
        let again = recover(tmp.path()).unwrap();
        assert!(again.report.is_clean(), "{:?}", again.report);
        assert_eq!(records_of(&again.records), all[..29].to_vec());
    }
}

#[test]
fn garbage_after_the_last_record_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..10);
    let (_, len) = write_segment(tmp.path(), 3, &all);
    let path = segment_path(tmp.path(), 3);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"\x00\x00\x00garbage garbage garbage");
    fs::write(&path, &bytes).unwrap();
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(records_of(&rec.records), all);
    assert_eq!(rec.report.truncated.len(), 1);
    assert_eq!(rec.report.truncated[0].offset, len as u64);
    assert!(rec.report.truncated[0].reason.contains("magic"));
    assert_eq!(fs::metadata(&path).unwrap().len(), len as u64);
    assert_eq!(rec.next_segment, 4);
}

#[test]
fn flipped_body_byte_skips_only_that_record() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..20);
    let (offsets, len) = write_segment(tmp.path(), 1, &all);
    let path = segment_path(tmp.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    let victim = 7;
    bytes[offsets[victim] + RECORD_HEADER_LEN + 2] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let rec = recover(tmp.path()).unwrap();
    let mut expect = all.clone();
    expect.remove(victim);
    assert_eq!(records_of(&rec.records), expect);
    assert!(rec.report.truncated.is_empty());
    assert_eq!(rec.report.skipped.len(), 1);
    let d = &rec.report.skipped[0];
    assert_eq!((d.segment, d.offset), (1, offsets[victim] as u64));
    assert!(d.reason.contains("body CRC"), "{}", d.reason);
    // The file is left as it was.
    assert_eq!(fs::metadata(&path).unwrap().len(), len as u64);
}

/// Defect 6: one damaged record header used to drop the rest of its segment (up to 64 MiB).
/// Now recovery resynchronises at the next sound record: a segment of N records with one header
/// byte flipped in record k gives back the other N-1 (all after k too), reports the bytes it
/// jumped over, and truncates nothing. The next segment is unaffected either way.
#[test]
fn flipped_header_byte_mid_segment_resynchronises() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 20;
    let all = samples(0..n);
    let (offsets, len) = write_segment(tmp.path(), 1, &all);
    write_segment(tmp.path(), 2, &samples(20..25));
    let path = segment_path(tmp.path(), 1);
    let victim = 12;
    for header_byte in [0, 1, 3, 8, 12] {
        write_segment(tmp.path(), 1, &all);
        let mut bytes = fs::read(&path).unwrap();
        bytes[offsets[victim] + header_byte] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let rec = recover(tmp.path()).unwrap();
        let mut expect = all.clone();
        expect.remove(victim);
        expect.extend(samples(20..25));
        assert_eq!(
            records_of(&rec.records),
            expect,
            "header byte {header_byte}"
        );
        assert!(rec.report.truncated.is_empty(), "{:?}", rec.report);
        assert!(rec.report.skipped.is_empty(), "{:?}", rec.report);
        assert_eq!(rec.report.resynced.len(), 1);
        let d = &rec.report.resynced[0];
        assert_eq!(
            (d.segment, d.offset, d.len),
            (
                1,
                offsets[victim] as u64,
                (offsets[victim + 1] - offsets[victim]) as u64
            )
        );
        assert!(d.reason.contains("resynchronised"), "{}", d.reason);
        assert_eq!(fs::metadata(&path).unwrap().len(), len as u64, "file kept");
        assert_eq!(rec.segments, vec![1, 2]);
    }
}

/// A damaged header in the LAST record of a segment has nothing sound after it: that is a
/// torn tail, and it is truncated as before.
#[test]
fn flipped_header_byte_in_the_last_record_truncates_there() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..10);
    let (offsets, _) = write_segment(tmp.path(), 1, &all);
    let path = segment_path(tmp.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[offsets[9] + 3] ^= 0x80;
    fs::write(&path, &bytes).unwrap();
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(records_of(&rec.records), all[..9].to_vec());
    assert_eq!(rec.report.truncated.len(), 1);
    assert_eq!(rec.report.truncated[0].offset, offsets[9] as u64);
    assert!(rec.report.resynced.is_empty());
    assert_eq!(fs::metadata(&path).unwrap().len(), offsets[9] as u64);
}

/// The newest segment too: damage with sound records after it costs only the damaged record
/// (the ones after it may have been acknowledged; a damaged header is resynchronised past, a
/// damaged body skipped).
#[test]
fn damage_in_the_newest_segment_before_sound_records_costs_one_record() {
    let all = samples(0..20);
    for (what, at) in [("header", 3), ("body", RECORD_HEADER_LEN + 1)] {
        let tmp = tempfile::tempdir().unwrap();
        write_segment(tmp.path(), 1, &samples(100..105));
        let (offsets, len) = write_segment(tmp.path(), 2, &all);
        let path = segment_path(tmp.path(), 2);
        let mut bytes = fs::read(&path).unwrap();
        bytes[offsets[12] + at] ^= 0x04;
        fs::write(&path, &bytes).unwrap();
        let rec = recover(tmp.path()).unwrap();
        let mut expect = samples(100..105);
        expect.extend_from_slice(&all);
        expect.remove(5 + 12);
        assert_eq!(records_of(&rec.records), expect, "{what}");
        assert!(rec.report.truncated.is_empty(), "{what}");
        assert_eq!(
            rec.report.resynced.len() + rec.report.skipped.len(),
            1,
            "{what}"
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), len as u64);
    }
}

/// A run of garbage over several records in the middle (an overwritten sector) costs just
/// those records.
#[test]
fn garbage_over_several_records_mid_segment_resynchronises() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..30);
    let (offsets, _) = write_segment(tmp.path(), 1, &all);
    let path = segment_path(tmp.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    // From inside record 10's header to inside record 13's body.
    for b in &mut bytes[offsets[10] + 5..offsets[13] + 20] {
        *b = 0xB5;
    }
    fs::write(&path, &bytes).unwrap();
    let rec = recover(tmp.path()).unwrap();
    let mut expect = all[..10].to_vec();
    expect.extend_from_slice(&all[14..]);
    assert_eq!(records_of(&rec.records), expect);
    assert_eq!(rec.report.resynced.len(), 1);
    assert_eq!(rec.report.resynced[0].offset, offsets[10] as u64);
    assert_eq!(
        rec.report.resynced[0].len,
        (offsets[14] - offsets[10]) as u64
    );
}

/// Defect 4: a segment missing from the middle of the log (1, 2 and 4 present) used to be
/// skipped silently. Recovery now refuses to start, says which ids are gone and how to accept
/// the loss, and changes nothing on disk before refusing (segment 4's torn tail stays).
#[test]
fn missing_segment_in_the_middle_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_segment(tmp.path(), 1, &samples(0..5));
    write_segment(tmp.path(), 2, &samples(5..10));
    let (_, len4) = write_segment(tmp.path(), 4, &samples(15..20));
    let p4 = segment_path(tmp.path(), 4);
    let mut bytes = fs::read(&p4).unwrap();
    bytes.extend_from_slice(b"torn");
    fs::write(&p4, &bytes).unwrap();

    let err = recover(tmp.path()).unwrap_err();
    match &err {
        RecoveryError::MissingSegments {
            missing,
            count,
            lowest,
            highest,
        } => {
            assert_eq!(missing, &vec![3..=3]);
            assert_eq!((*count, *lowest, *highest), (1, 1, 4));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("missing: 3)"), "{msg}");
    assert!(msg.contains("accept_segment_loss"), "{msg}");
    assert_eq!(
        fs::metadata(&p4).unwrap().len(),
        len4 as u64 + 4,
        "nothing changed"
    );

    // Told to accept the loss: it starts without segment 3, and the report says so.
    let accept = RecoveryOptions {
        accept_missing_segments: true,
    };
    let rec = recover_with(tmp.path(), accept).unwrap();
    let mut expect = samples(0..10);
    expect.extend(samples(15..20));
    assert_eq!(records_of(&rec.records), expect);
    assert_eq!(rec.segments, vec![1, 2, 4]);
    assert_eq!(rec.report.missing, vec![3..=3]);
    assert_eq!(rec.report.segments_missing, 1);
    assert!(!rec.report.is_clean());
    assert_eq!(rec.next_segment, 5);
}

/// Segments are deleted oldest-first, so ids missing below the lowest present are normal;
/// several gaps are all named.
#[test]
fn only_gaps_between_lowest_and_highest_count() {
    let tmp = tempfile::tempdir().unwrap();
    for id in [5, 6, 7] {
        write_segment(tmp.path(), id, &samples(0..2));
    }
    let rec = recover(tmp.path()).unwrap();
    assert!(rec.report.is_clean(), "{:?}", rec.report);
    assert_eq!(rec.report.segments_missing, 0);

    let tmp = tempfile::tempdir().unwrap();
    for id in [1, 4, 5, 9] {
        write_segment(tmp.path(), id, &samples(0..2));
    }
    let err = recover(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, RecoveryError::MissingSegments { missing, count: 5, .. } if *missing == vec![2..=3, 6..=8]),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing: 2..=3, 6..=8)"), "{err}");
    // A segment with an unreadable header is present (skipped), not missing.
    let tmp = tempfile::tempdir().unwrap();
    write_segment(tmp.path(), 1, &samples(0..2));
    fs::write(segment_path(tmp.path(), 2), b"junk").unwrap();
    write_segment(tmp.path(), 3, &samples(2..4));
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(rec.segments, vec![1, 3]);
    assert!(rec.report.missing.is_empty());
    // An unreadable file left below the readable ones (a crash tore a new segment's header;
    // the writer never knew it and deleted younger segments past it) is not a gap.
    let tmp = tempfile::tempdir().unwrap();
    fs::write(segment_path(tmp.path(), 6), b"SBL").unwrap();
    write_segment(tmp.path(), 11, &samples(0..2));
    write_segment(tmp.path(), 12, &samples(2..4));
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(rec.segments, vec![11, 12]);
    assert!(rec.report.missing.is_empty());
    assert_eq!(rec.report.skipped.len(), 1);
}

/// Tags mean nothing to the journal: a well-framed record of any tag comes back raw (the
/// schema owner decides whether it knows it).
#[test]
fn any_tag_is_returned_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(0..3);
    let (offsets, _) = write_segment(tmp.path(), 1, &all);
    let path = segment_path(tmp.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    // Insert a well-framed record of a future kind (tag 77) between records 0 and 1.
    let body = [1u8, 2, 3, 4];
    let mut hdr = vec![0xB5, 77];
    hdr.extend_from_slice(&(body.len() as u32).to_le_bytes());
    hdr.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let hcrc = crc32c::crc32c(&hdr);
    hdr.extend_from_slice(&hcrc.to_le_bytes());
    hdr.extend_from_slice(&body);
    let at = offsets[1];
    bytes.splice(at..at, hdr);
    fs::write(&path, &bytes).unwrap();
    let rec = recover(tmp.path()).unwrap();
    let mut expect = all.clone();
    expect.insert(
        1,
        common::Rec {
            tag: 77,
            body: body.to_vec(),
        },
    );
    assert_eq!(records_of(&rec.records), expect);
    assert_eq!(rec.records[1].offset, at as u64);
    assert!(rec.report.is_clean(), "{:?}", rec.report);
}

#[test]
fn bad_segment_header_skips_the_segment_and_keeps_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_segment(tmp.path(), 1, &samples(0..5));
    write_segment(tmp.path(), 2, &samples(5..10));
    write_segment(tmp.path(), 3, &samples(10..15));
    let p2 = segment_path(tmp.path(), 2);
    let mut bytes = fs::read(&p2).unwrap();
    bytes[9] ^= 0xFF; // segment id byte: header CRC fails
    fs::write(&p2, &bytes).unwrap();
    // A segment whose header names another id.
    write_segment(tmp.path(), 15, &samples(15..16));
    fs::rename(segment_path(tmp.path(), 15), segment_path(tmp.path(), 4)).unwrap();
    // A crash right after creating a segment: empty file.
    fs::write(segment_path(tmp.path(), 5), b"").unwrap();

    let rec = recover(tmp.path()).unwrap();
    let mut expect = samples(0..5);
    expect.extend(samples(10..15));
    assert_eq!(records_of(&rec.records), expect);
    assert_eq!(rec.segments, vec![1, 3]);
    let skipped: Vec<_> = rec
        .report
        .skipped
        .iter()
        .map(|d| (d.segment, d.offset))
        .collect();
    assert_eq!(skipped, vec![(2, 0), (4, 0), (5, 0)]);
    assert!(rec.report.skipped[0].reason.contains("CRC"));
    assert!(rec.report.skipped[1].reason.contains("names segment 15"));
    assert!(rec.report.skipped[2].reason.contains("incomplete"));
    assert!(p2.exists(), "a damaged segment is never deleted");
    assert_eq!(rec.next_segment, 6, "never reuse an existing file's id");
    assert_eq!(rec.report.segments_read, 5);
}

#[test]
fn damage_in_an_earlier_segment_does_not_stop_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (offsets, _) = write_segment(tmp.path(), 1, &samples(0..10));
    write_segment(tmp.path(), 2, &samples(10..20));
    let p1 = segment_path(tmp.path(), 1);
    fs::OpenOptions::new()
        .write(true)
        .open(&p1)
        .unwrap()
        .set_len(offsets[5] as u64 + 4)
        .unwrap();
    let rec = recover(tmp.path()).unwrap();
    let mut expect = samples(0..5);
    expect.extend(samples(10..20));
    assert_eq!(records_of(&rec.records), expect);
    assert_eq!(rec.report.truncated.len(), 1);
    assert_eq!(rec.report.truncated[0].segment, 1);
}

#[test]
fn header_only_segment_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, len) = write_segment(tmp.path(), 4, &[]);
    assert_eq!(len, SEGMENT_HEADER_LEN);
    let rec = recover(tmp.path()).unwrap();
    assert_eq!(rec.segments, vec![4]);
    assert!(rec.records.is_empty());
    assert!(rec.report.is_clean());
    assert_eq!(rec.next_segment, 5);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary damage (overwrites, truncation, appended junk) never makes recovery panic
    /// or fail, what it returns is an in-order subsequence of what was written, and a second
    /// recovery finds nothing more to repair.
    #[test]
    fn arbitrary_damage_never_panics(
        n in 1u64..40,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        junk in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let all = samples(0..n);
        write_segment(tmp.path(), 1, &all);
        let path = segment_path(tmp.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        for (i, v) in &edits {
            let i = i.index(bytes.len());
            bytes[i] = *v;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        bytes.extend_from_slice(&junk);
        fs::write(&path, &bytes).unwrap();

        let rec = recover(tmp.path()).unwrap();
        let got = records_of(&rec.records);
        let mut it = all.iter();
        for r in &got {
            prop_assert!(it.any(|x| x == r), "not an in-order subsequence");
        }
        let again = recover(tmp.path()).unwrap();
        prop_assert!(again.report.truncated.is_empty());
        prop_assert_eq!(&again.report.resynced, &rec.report.resynced);
        prop_assert_eq!(records_of(&again.records), got);
        // Total bytes account for everything kept.
        if !rec.segments.is_empty() {
            let kept: usize = SEGMENT_HEADER_LEN + again.records.iter().map(|r| encoded_len(r)).sum::<usize>();
            prop_assert!(fs::metadata(&path).unwrap().len() as usize >= kept);
        }
    }

    /// Random bytes as a whole segment file, or after a valid header.
    #[test]
    fn random_files_never_panic(
        junk in proptest::collection::vec(any::<u8>(), 0..300),
        with_header in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = if with_header {
            switchboard_storage::segment::encode_segment_header(1).to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&junk);
        fs::write(segment_path(tmp.path(), 1), &bytes).unwrap();
        let rec = recover(tmp.path()).unwrap();
        prop_assert_eq!(rec.next_segment, 2);
    }
}
