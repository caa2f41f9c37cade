//! The metrics endpoint against the real daemon: every `Error` frame sent to a client is
//! counted in `switchboard_errors_total` by code, the non-fatal ones (answers to a bad request
//! on a connection that stays open) as well as the fatal ones.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, ErrorCode, Frame};

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
        Frame::Error(e) => assert_eq!(e.code, code as u16, "expected {code:?}"),
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
    r.send(Frame::RegisterVerify(frame::RegisterVerify {
        phone,
        code: 123456,
    }));
    expect_error(&mut r, ErrorCode::NoPendingCode);
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    let code = d.sms_code(phone);
    r.send(Frame::RegisterVerify(frame::RegisterVerify {
        phone,
        code: (code + 1) % 1_000_000,
    }));
    expect_error(&mut r, ErrorCode::WrongCode);
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone: 0 }));
    expect_error(&mut r, ErrorCode::InvalidNumber);
    // Still open: these were answers, not closes.
    r.send(Frame::Ping(frame::Ping { nonce: 5 }));
    assert_eq!(r.recv(), Frame::Pong(frame::Pong { nonce: 5 }));
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

/// One scrape that may be refused (closed or reset without an answer).
fn try_scrape(admin: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Reads from a connection the admin endpoint should be holding open without an answer: true
/// if nothing has arrived and it is still open (the read would block).
fn still_waiting(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = s.read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A scraper that connects and sends nothing (and one that stops mid-request) does not stall
/// a concurrent scrape: the scrape is answered while both are still held open, unanswered.
/// (The old responder served one connection at a time and had to time the silent one out and
/// close it before it could answer the next.)
#[test]
fn silent_scraper_does_not_stall_a_concurrent_scrape() {
    use std::io::Write;
    let d = Daemon::start(1, &[("admin-request-timeout-ms", "600000")]);
    let mut silent = std::net::TcpStream::connect(d.admin).unwrap();
    let mut partial = std::net::TcpStream::connect(d.admin).unwrap();
    partial.write_all(b"GET /metr").unwrap();
    let page = d.metrics();
    assert!(page.contains("switchboard_shards 1"), "{page}");
    // Both earlier connections were accepted first (the accept queue is FIFO) and are open.
    assert!(
        page.lines().any(|l| l == "switchboard_admin_connections 3"),
        "{page}"
    );
    assert!(
        still_waiting(&mut silent),
        "the silent scraper was answered or closed"
    );
    assert!(
        still_waiting(&mut partial),
        "the partial request was answered or closed"
    );
}

/// A connection that never completes its request is closed after admin_request_timeout_ms and
/// counted.
#[test]
fn admin_request_timeout_closes_silent_connections() {
    use std::io::Read;
    let d = Daemon::start(1, &[("admin-request-timeout-ms", "200")]);
    let mut silent = std::net::TcpStream::connect(d.admin).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 64];
    let n = silent.read(&mut b);
    assert!(
        matches!(n, Ok(0))
            || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected the silent connection closed, got {n:?}"
    );
    assert!(d.metric_sum("switchboard_admin_timeouts_total") >= 1.0);
}

/// Past admin_connections_max open connections a new one is closed at accept and counted; the
/// endpoint serves again once they are gone.
#[test]
fn admin_connections_max_refuses_extra_connections() {
    use std::io::Read;
    let d = Daemon::start(
        1,
        &[
            ("admin-connections-max", "2"),
            ("admin-request-timeout-ms", "600000"),
        ],
    );
    let held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(d.admin).unwrap())
        .collect();
    let mut extra = std::net::TcpStream::connect(d.admin).unwrap();
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 64];
    let n = extra.read(&mut b);
    assert!(
        matches!(n, Ok(0))
            || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected the extra connection closed, got {n:?}"
    );
    drop(held);
    // The endpoint notices the two closes asynchronously: retry a bounded number of times.
    let mut page = String::new();
    for _ in 0..200 {
        page = try_scrape(d.admin).unwrap_or_default();
        if page.contains("switchboard_admin_refused_total") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let refused: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_admin_refused_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no admin_refused_total in {page:?}"));
    assert!(refused >= 1.0);
}
