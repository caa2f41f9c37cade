//! End-to-end 1:1 messaging against the real daemon over TCP: ✓ / ✓✓ / read receipts within
//! one shard and across shards, offline queueing with in-order drain, receipts for an offline
//! sender, and retry dedup.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use common::*;
use protocol::frame::ReceiptKind;
use protocol::{frame, Address, DeviceAddr, Frame, Message, ReceiptInfo};

/// Picks two phone numbers whose home shards are equal (`same`) or different.
fn pair(shards: u16, same: bool) -> (u64, u64) {
    let a = 14155550100u64;
    let ha = shards::home_shard(a, shards);
    let b = (a + 1..a + 1000)
        .find(|&b| (shards::home_shard(b, shards) == ha) == same)
        .unwrap();
    (a, b)
}

fn expect_ack(u: &mut User, id: u64) -> u64 {
    match u.raw.recv_skip_pong() {
        Frame::ServerAck(frame::ServerAck {
            client_msg_id,
            server_ts_ms,
        }) => {
            assert_eq!(client_msg_id, id);
            server_ts_ms
        }
        other => panic!("expected ServerAck for {id}, got {other:?}"),
    }
}

fn expect_deliver(u: &mut User, from: u64, id: u64, payload: &[u8]) -> u64 {
    match u.raw.recv_skip_pong() {
        Frame::Deliver(frame::Deliver {
            seq,
            message:
                Message {
                    from:
                        DeviceAddr {
                            user: from_user,
                            device: from_device,
                        },
                    client_msg_id,
                    payload: p,
                    ..
                },
        }) => {
            assert_eq!((from_user, from_device, client_msg_id), (from, 0, id));
            assert_eq!(&p[..], payload);
            seq
        }
        other => panic!("expected Deliver {id}, got {other:?}"),
    }
}

fn expect_receipt(u: &mut User, from: u64, id: u64, kind: ReceiptKind) -> u64 {
    match u.raw.recv_skip_pong() {
        Frame::Receipt(frame::Receipt {
            seq,
            receipt:
                ReceiptInfo {
                    from:
                        DeviceAddr {
                            user: from_user, ..
                        },
                    client_msg_id,
                    kind: k,
                    ..
                },
        }) => {
            assert_eq!((from_user, client_msg_id, k), (from, id, kind));
            seq
        }
        other => panic!("expected {kind:?} receipt for {id}, got {other:?}"),
    }
}

fn online_round_trip(shards: u16, same: bool) {
    online_round_trip_with(shards, same, &[]);
}

fn online_round_trip_with(shards: u16, same: bool, extra: &[(&str, &str)]) {
    let d = Daemon::start(shards as usize, extra);
    let (a, b) = pair(shards, same);
    let mut alice = register_and_login(&d, a);
    let mut bob = register_and_login(&d, b);

    alice.raw.send(send_frame(b, 1, b"hello bob"));
    expect_ack(&mut alice, 1); // ✓
    let seq = expect_deliver(&mut bob, a, 1, b"hello bob");
    bob.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
    let rseq = expect_receipt(&mut alice, b, 1, ReceiptKind::DELIVERED); // ✓✓
    alice.raw.send(Frame::Ack(frame::Ack { seqs: vec![rseq] }));
    bob.raw.send(Frame::Read(frame::Read {
        to: Address::device(a, 0),
        client_msg_id: 1,
    }));
    let rseq = expect_receipt(&mut alice, b, 1, ReceiptKind::READ); // blue ✓✓
    alice.raw.send(Frame::Ack(frame::Ack { seqs: vec![rseq] }));

    // And back the other way.
    bob.raw.send(send_frame(a, 77, b"hi alice"));
    expect_ack(&mut bob, 77);
    let seq = expect_deliver(&mut alice, b, 77, b"hi alice");
    alice.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
    expect_receipt(&mut bob, a, 77, ReceiptKind::DELIVERED);

    let routed = if same {
        "switchboard_routed_local_total"
    } else {
        "switchboard_routed_cross_shard_total"
    };
    std::thread::sleep(Duration::from_millis(1200)); // metrics sync on the shard tick
    assert!(d.metric_sum(routed) >= 2.0, "{routed} not counted");
}

#[test]
fn online_delivery_with_ticks_within_one_shard() {
    online_round_trip(2, true);
}

#[test]
fn online_delivery_with_ticks_across_shards() {
    online_round_trip(2, false);
}

/// The ring core under each way the kernel may run its completion work (`defer`, the default,
/// is what every other test uses), and with the receive gather window on.
#[test]
fn online_delivery_under_every_uring_task_work_mode_and_with_a_gather_window() {
    for mode in ["coop", "signal"] {
        online_round_trip_with(2, false, &[("uring-task-work", mode)]);
    }
    online_round_trip_with(2, false, &[("uring-gather-us", "500")]);
}

#[test]
fn an_unknown_uring_task_work_mode_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_expecting_exit(dir.path(), 1, &[("uring-task-work", "poll")]);
    assert!(!status.success());
    assert!(stderr.contains("uring_task_work"), "stderr: {stderr}");
}

#[test]
fn offline_messages_drain_in_order_and_receipts_wait_for_offline_sender() {
    let d = Daemon::start(2, &[]);
    let (a, b) = pair(2, false);
    let akey = protocol::noise::StaticKeypair::generate();
    let bkey = protocol::noise::StaticKeypair::generate();
    register(&d, a, &akey);
    register(&d, b, &bkey);

    let mut alice = login(&d, a, &akey);
    let n = 50u64;
    for i in 1..=n {
        alice.raw.send(send_frame(b, i, format!("m{i}").as_bytes()));
    }
    for i in 1..=n {
        expect_ack(&mut alice, i);
    }
    drop(alice); // Alice goes offline before Bob reads anything.
    std::thread::sleep(Duration::from_millis(200));

    let mut bob = login(&d, b, &bkey);
    let mut seqs = Vec::new();
    for i in 1..=n {
        seqs.push(expect_deliver(&mut bob, a, i, format!("m{i}").as_bytes()));
    }
    bob.raw.send(Frame::Ack(frame::Ack { seqs }));
    bob.raw.send(Frame::Read(frame::Read {
        to: Address::device(a, 0),
        client_msg_id: n,
    }));
    std::thread::sleep(Duration::from_millis(300));

    // Alice comes back: the ✓✓ for every message and the read receipt are waiting, in order.
    let mut alice = login(&d, a, &akey);
    let mut acks = Vec::new();
    for i in 1..=n {
        acks.push(expect_receipt(&mut alice, b, i, ReceiptKind::DELIVERED));
    }
    acks.push(expect_receipt(&mut alice, b, n, ReceiptKind::READ));
    alice.raw.send(Frame::Ack(frame::Ack { seqs: acks }));
    // Nothing more is queued for either.
    assert_eq!(alice.raw.recv_timeout(Duration::from_millis(300)), None);
    assert_eq!(bob.raw.recv_timeout(Duration::from_millis(300)), None);
}

#[test]
fn unacked_deliveries_are_redelivered_after_reconnect() {
    let d = Daemon::start(1, &[]);
    let bkey = protocol::noise::StaticKeypair::generate();
    let mut alice = register_and_login(&d, 33600000001);
    register(&d, 33600000002, &bkey);
    let mut bob = login(&d, 33600000002, &bkey);
    alice.raw.send(send_frame(33600000002, 5, b"x"));
    expect_ack(&mut alice, 5);
    expect_deliver(&mut bob, 33600000001, 5, b"x");
    drop(bob); // no Ack sent
    std::thread::sleep(Duration::from_millis(200));
    let mut bob = login(&d, 33600000002, &bkey);
    let seq = expect_deliver(&mut bob, 33600000001, 5, b"x");
    bob.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
    expect_receipt(&mut alice, 33600000002, 5, ReceiptKind::DELIVERED);
}

#[test]
fn a_retried_client_msg_id_is_delivered_once() {
    let d = Daemon::start(2, &[]);
    let (a, b) = pair(2, false);
    let mut alice = register_and_login(&d, a);
    let mut bob = register_and_login(&d, b);
    // The same message three times: a retry on the same connection, then after a reconnect.
    alice.raw.send(send_frame(b, 42, b"once"));
    alice.raw.send(send_frame(b, 42, b"once"));
    expect_ack(&mut alice, 42);
    expect_ack(&mut alice, 42);
    let key = alice.raw.key.clone();
    drop(alice);
    let mut alice = login(&d, a, &key);
    alice.raw.send(send_frame(b, 42, b"once"));
    expect_ack(&mut alice, 42);
    let seq = expect_deliver(&mut bob, a, 42, b"once");
    bob.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
    assert_eq!(
        bob.raw.recv_timeout(Duration::from_millis(500)),
        None,
        "duplicate delivered"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert!(d.metric_sum("switchboard_dedup_hits_total") >= 2.0);
}

#[test]
fn sending_to_an_unknown_user_is_an_error_not_a_tick() {
    let d = Daemon::start(1, &[]);
    let mut alice = register_and_login(&d, 4915100000001);
    alice.raw.send(send_frame(4915100000099, 9, b"anyone?"));
    match alice.raw.recv() {
        Frame::Error(frame::Error { code, ref_id, .. }) => {
            assert_eq!(code, protocol::ErrorCode::NoSuchRecipient as u16);
            assert_eq!(ref_id, 9);
        }
        other => panic!("expected NoSuchRecipient, got {other:?}"),
    }
    // The connection stays usable.
    alice.raw.send(Frame::Ping(frame::Ping { nonce: 3 }));
    assert_eq!(alice.raw.recv(), Frame::Pong(frame::Pong { nonce: 3 }));
}

#[test]
fn the_metrics_endpoint_exposes_the_operational_series() {
    let d = Daemon::start(2, &[("tick-ms", "100")]);
    let (a, b) = pair(2, false);
    let mut alice = register_and_login(&d, a);
    let mut bob = register_and_login(&d, b);
    alice.raw.send(send_frame(b, 1, b"m"));
    expect_ack(&mut alice, 1);
    let seq = expect_deliver(&mut bob, a, 1, b"m");
    bob.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
    expect_receipt(&mut alice, b, 1, ReceiptKind::DELIVERED);
    std::thread::sleep(Duration::from_millis(400));
    let m = d.metrics();
    for series in [
        "switchboard_connections{shard=\"0\"}",
        "switchboard_connections{shard=\"1\"}",
        "switchboard_handshakes_total",
        "switchboard_frames_in_total",
        "switchboard_frames_out_total",
        "switchboard_routed_local_total",
        "switchboard_routed_cross_shard_total",
        "switchboard_log_appends_total",
        "switchboard_fsync_seconds_bucket",
        "switchboard_fsync_seconds_count",
        "switchboard_commit_batch_records_bucket",
        "switchboard_mailbox_depth",
        "switchboard_errors_total{shard=\"0\",code=\"RateLimited\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(series), "missing {series}");
    }
    assert!(d.metric_sum("switchboard_handshakes_total") >= 2.0);
    assert!(d.metric_sum("switchboard_connections_logged_in") == 2.0);
    assert!(d.metric_sum("switchboard_routed_cross_shard_total") >= 1.0);
    assert!(d.metric_sum("switchboard_log_appends_total") >= 3.0);
    assert!(d.metric_sum("switchboard_fsync_seconds_count") >= 1.0);
    // Welcome ×2 (+ registration replies), ServerAck, Deliver, Receipt.
    assert!(d.metric_sum("switchboard_frames_out_total") >= 5.0);
    assert!(d.metric_sum("switchboard_writes_total") >= 1.0);
}

/// `heap_huge_pages` (off by default) is applied to the running daemon: the kernel reports
/// transparent huge pages disabled for it, and enabled again with the key on.
#[test]
fn the_daemon_runs_without_transparent_huge_pages_unless_asked() {
    fn thp_enabled(d: &Daemon) -> Option<String> {
        let pid = d.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_owned())
    }
    let off = Daemon::start(1, &[]);
    let Some(value) = thp_enabled(&off) else {
        eprintln!("this kernel does not report THP_enabled in /proc/PID/status; nothing to check");
        return;
    };
    assert_eq!(value, "0", "huge pages should be off by default");
    let on = Daemon::start(1, &[("heap-huge-pages", "true")]);
    assert_eq!(thp_enabled(&on).as_deref(), Some("1"));
}
