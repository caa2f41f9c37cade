//! Registration and login against the real daemon: every failure has its own error code.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, DeviceAddr, ErrorCode, Frame};

fn expect_error(r: &mut Raw, code: ErrorCode) {
    match r.recv() {
        Frame::Error(frame::Error { code: c, .. }) => {
            assert_eq!(c, code as u16, "expected {code:?}")
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[test]
fn wrong_expired_and_reused_codes_are_refused() {
    let d = Daemon::start(2, &[("registration-code-ttl-s", "1")]);
    let key = StaticKeypair::generate();
    let mut r = Raw::connect(d.addr, &key);
    let phone = 447700900001;

    // No code requested yet.
    r.send(Frame::RegisterVerify(frame::RegisterVerify {
        phone,
        code: 123456,
    }));
    expect_error(&mut r, ErrorCode::NoPendingCode);

    // Wrong code.
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    let code = d.sms_code(phone);
    r.send(Frame::RegisterVerify(frame::RegisterVerify {
        phone,
        code: (code + 1) % 1_000_000,
    }));
    expect_error(&mut r, ErrorCode::WrongCode);

    // Expired code (the shard keeps an expired code for one more lifetime so a late verify is
    // told CodeExpired rather than NoPendingCode: sleep past 1 s, not past 2 s).
    std::thread::sleep(Duration::from_millis(1300));
    r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
    expect_error(&mut r, ErrorCode::CodeExpired);

    // A fresh code works once; reusing it fails.
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    let code = d.sms_code(phone);
    r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
    assert_eq!(
        r.recv(),
        Frame::Registered(frame::Registered {
            addr: DeviceAddr {
                user: phone,
                device: 0
            }
        })
    );
    r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
    expect_error(&mut r, ErrorCode::NoPendingCode);

    // Invalid numbers are refused.
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone: 0 }));
    expect_error(&mut r, ErrorCode::InvalidNumber);
}

#[test]
fn unknown_key_and_key_bound_to_another_number() {
    let d = Daemon::start(2, &[]);
    let key = StaticKeypair::generate();
    register(&d, 447700900010, &key);

    // Same key, another number: refused.
    let mut r = Raw::connect(d.addr, &key);
    r.send(Frame::RegisterRequest(frame::RegisterRequest {
        phone: 447700900011,
    }));
    assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    let code = d.sms_code(447700900011);
    r.send(Frame::RegisterVerify(frame::RegisterVerify {
        phone: 447700900011,
        code,
    }));
    expect_error(&mut r, ErrorCode::KeyBoundToOtherUser);

    // Login with a key that was never registered: UnknownKey, then close.
    let stranger = StaticKeypair::generate();
    let mut r = Raw::connect(d.addr, &stranger);
    r.send(Frame::Login(frame::Login {
        addr: DeviceAddr {
            user: 447700900010,
            device: 0,
        },
        revision: 1,
        capabilities: 1,
    }));
    expect_error(&mut r, ErrorCode::UnknownKey);
    assert!(r.closed_within(Duration::from_secs(5)));

    // Frames before login are refused.
    let mut r = Raw::connect(d.addr, &stranger);
    r.send(send_frame(447700900010, 1, b"sneaky"));
    expect_error(&mut r, ErrorCode::NotAuthenticated);
    assert!(r.closed_within(Duration::from_secs(5)));

    // The registered key still logs in.
    let _u = login(&d, 447700900010, &key);
}

#[test]
fn registration_is_rate_limited_per_number() {
    let d = Daemon::start(1, &[("register-per-number-per-hour", "2")]);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let phone = 447700900020;
    for _ in 0..2 {
        r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
        assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    }
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    expect_error(&mut r, ErrorCode::RegisterRateLimited);
}

#[test]
fn registration_is_rate_limited_per_source_address() {
    let d = Daemon::start(1, &[("register-per-ip-per-hour", "3")]);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    for i in 0..3 {
        r.send(Frame::RegisterRequest(frame::RegisterRequest {
            phone: 447700900030 + i,
        }));
        assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
    }
    r.send(Frame::RegisterRequest(frame::RegisterRequest {
        phone: 447700900039,
    }));
    expect_error(&mut r, ErrorCode::RegisterRateLimited);
}

#[test]
fn a_second_login_replaces_the_first() {
    let d = Daemon::start(2, &[]);
    let key = StaticKeypair::generate();
    register(&d, 447700900040, &key);
    let mut first = login(&d, 447700900040, &key);
    let _second = login(&d, 447700900040, &key);
    expect_error(&mut first.raw, ErrorCode::Replaced);
    assert!(first.raw.closed_within(Duration::from_secs(5)));
}
