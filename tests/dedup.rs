//! Sender dedup against the real daemon: a retried `client_msg_id` within the dedup window gets
//! the original ✓ time and is not stored or delivered again, also after the segments holding the
//! original messages were deleted and the daemon restarted (SIGTERM or SIGKILL).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, Frame};

/// Messages sent and acknowledged before the restart: with 64 KiB segments and 100-byte
/// payloads, several segments fill, and once every message is delivered and acknowledged the
/// shard deletes them.
const MESSAGES: u64 = 1_200;

/// Sends `MESSAGES` from A to B (online, acking), acks A's receipts, and returns the ✓ time of
/// every message.
fn send_and_drain(d: &Daemon, a: &mut User, b: &mut User) -> HashMap<u64, u64> {
    let payload = [7u8; 100];
    let mut acked = HashMap::new();
    let mut delivered = 0u64;
    for id in 1..=MESSAGES {
        a.raw.send(send_frame(b.phone, id, &payload));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (acked.len() as u64) < MESSAGES || delivered < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "acked {} delivered {delivered}",
            acked.len()
        );
        while let Some(f) = a.raw.recv_timeout(Duration::from_millis(20)) {
            match f {
                Frame::ServerAck(frame::ServerAck {
                    client_msg_id,
                    server_ts_ms,
                }) => {
                    acked.insert(client_msg_id, server_ts_ms);
                }
                Frame::Receipt(frame::Receipt { seq, .. }) => {
                    a.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }))
                }
                _ => {}
            }
        }
        while let Some(f) = b.raw.recv_timeout(Duration::from_millis(20)) {
            if let Frame::Deliver(frame::Deliver { seq, .. }) = f {
                delivered += 1;
                b.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
            }
        }
    }
    // The delivered receipts: A acks them as they come (they are entries in A's mailbox).
    while let Some(f) = a.raw.recv_timeout(Duration::from_millis(300)) {
        if let Frame::Receipt(frame::Receipt { seq, .. }) = f {
            a.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
        }
    }
    let _ = d;
    acked
}

/// Waits until the daemon has deleted at least `n` segments (the timer runs every `tick_ms`).
fn wait_for_deleted_segments(d: &Daemon, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.metric_sum("switchboard_segments_deleted_total") < n {
        assert!(
            Instant::now() < deadline,
            "segments were not deleted (deleted {}, compacted {}, mailbox depth {}, segment files {:?}): \
             the test does not exercise what it claims",
            d.metric_sum("switchboard_segments_deleted_total"),
            d.metric_sum("switchboard_segments_compacted_total"),
            d.metric_sum("switchboard_mailbox_depth"),
            std::fs::read_dir(d.data_dir.join("shard-0"))
                .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn retries_keep_original_time_after_restart(kill: bool) {
    let mut d = Daemon::start(
        1,
        &[
            ("segment-bytes-max", "65536"),
            ("tick-ms", "100"),
            ("rate-limit-frames-per-s", "100000"),
            ("rate-limit-burst", "100000"),
        ],
    );
    let (pa, pb) = (14155550301, 14155550302);
    let (ka, kb) = (StaticKeypair::generate(), StaticKeypair::generate());
    register(&d, pa, &ka);
    register(&d, pb, &kb);
    let mut a = login(&d, pa, &ka);
    let mut b = login(&d, pb, &kb);
    let acked = send_and_drain(&d, &mut a, &mut b);
    wait_for_deleted_segments(&d, 2.0);
    drop((a, b));
    if kill {
        d.kill9();
    } else {
        assert!(d.terminate().success());
    }
    d.restart();

    let mut a = login(&d, pa, &ka);
    let mut b = login(&d, pb, &kb);
    let retried = [1, 2, MESSAGES / 2, MESSAGES];
    for &id in &retried {
        a.raw.send(send_frame(pb, id, b"retry"));
    }
    let mut answers = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers.len() < retried.len() {
        assert!(Instant::now() < deadline, "answers so far: {answers:?}");
        match a.raw.recv_timeout(Duration::from_millis(100)) {
            Some(Frame::ServerAck(frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            })) => {
                answers.insert(client_msg_id, server_ts_ms);
            }
            Some(Frame::Receipt(frame::Receipt { seq, .. })) => {
                a.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }))
            }
            _ => {}
        }
    }
    for &id in &retried {
        assert_eq!(
            answers.get(&id),
            acked.get(&id),
            "retry of message {id} after the restart got a new time: it was stored again"
        );
    }
    // Nothing is delivered again.
    let mut again = Vec::new();
    while let Some(f) = b.raw.recv_timeout(Duration::from_millis(1500)) {
        if let Frame::Deliver(d) = f {
            again.push(d.message.client_msg_id);
        }
    }
    assert!(again.is_empty(), "delivered a second time: {again:?}");
}

#[test]
fn retry_after_sigterm_and_segment_deletion_is_deduplicated() {
    retries_keep_original_time_after_restart(false);
}

#[test]
fn retry_after_sigkill_and_segment_deletion_is_deduplicated() {
    retries_keep_original_time_after_restart(true);
}
