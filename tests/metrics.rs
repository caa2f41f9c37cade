//! The metrics endpoint against the real daemon: every `Error` frame sent to a client is
//! counted in `switchboard_errors_total` by code, the non-fatal ones (answers to a bad request
//! on a connection that stays open) as well as the fatal ones.

mod common;

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{ErrorCode, Frame};

/// `switchboard_errors_total` for `code`, summed over shards.
fn errors_total(d: &Daemon, code: ErrorCode) -> f64 {
    let label = format!("code=\"{}\"}}", code.name());
    d.metrics()
        .lines()
        .filter(|l| l.starts_with("switchboard_errors_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn expect_error(r: &mut Raw, code: ErrorCode) {
    match r.recv() {
        Frame::Error { code: c, .. } => assert_eq!(c, code as u16, "expected {code:?}"),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Non-fatal registration errors (NoPendingCode, WrongCode, InvalidNumber) are counted once
/// each, by code, and the connection that got them keeps working.
#[test]
fn non_fatal_error_frames_are_counted_by_code() {
    let d = Daemon::start(2, &[]);
    let codes = [
        ErrorCode::NoPendingCode,
        ErrorCode::WrongCode,
        ErrorCode::InvalidNumber,
    ];
    for c in codes {
        assert_eq!(errors_total(&d, c), 0.0, "{c:?} counted before any request");
    }
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let phone = 447700900201;
    r.send(Frame::RegisterVerify {
        phone,
        code: 123456,
    });
    expect_error(&mut r, ErrorCode::NoPendingCode);
    r.send(Frame::RegisterRequest { phone });
    assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    let code = d.sms_code(phone);
    r.send(Frame::RegisterVerify {
        phone,
        code: (code + 1) % 1_000_000,
    });
    expect_error(&mut r, ErrorCode::WrongCode);
    r.send(Frame::RegisterRequest { phone: 0 });
    expect_error(&mut r, ErrorCode::InvalidNumber);
    // Still open: these were answers, not closes.
    r.send(Frame::Ping { nonce: 5 });
    assert_eq!(r.recv(), Frame::Pong { nonce: 5 });
    // Each is counted before its frame is queued, so the page already shows it.
    for c in codes {
        assert_eq!(errors_total(&d, c), 1.0, "{c:?}");
    }
}

/// The mesh backlog's bound is visible: the per-peer depth gauge and the refused/dropped
/// counters are exported for every shard, beside the old all-peers gauge.
#[test]
fn mesh_backlog_metrics_are_exported_per_peer() {
    let d = Daemon::start(2, &[("mesh-backlog-msgs-max", "128")]);
    let page = d.metrics();
    for line in [
        "switchboard_mesh_backlog_msgs{shard=\"0\",peer=\"1\"} 0",
        "switchboard_mesh_backlog_msgs{shard=\"1\",peer=\"0\"} 0",
        "switchboard_mesh_backlog{shard=\"0\"} 0",
        "switchboard_mesh_backlog_refused_total{shard=\"1\"} 0",
        "switchboard_mesh_backlog_dropped_total{shard=\"0\"} 0",
    ] {
        assert!(
            page.lines().any(|l| l == line),
            "missing {line:?} in\n{page}"
        );
    }
}
