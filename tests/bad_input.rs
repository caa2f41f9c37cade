//! Bad input against the real daemon: each case gets its error code or a clean close, the
//! daemon stays up, and a client that was already connected keeps working.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, ErrorCode, Frame, Message, PREAMBLE};

/// A bystander that must be unaffected: logged in, and able to message itself.
fn bystander(d: &Daemon) -> User {
    register_and_login(d, 15550009999)
}

fn bystander_still_works(d: &mut Daemon, u: &mut User, nonce: u64) {
    assert!(d.alive(), "daemon died");
    u.raw.send(Frame::Ping(frame::Ping { nonce }));
    assert_eq!(u.raw.recv(), Frame::Pong(frame::Pong { nonce }));
    u.raw.send(send_frame(u.phone, nonce, b"still here"));
    // A message to oneself: the ✓ and the delivery may arrive in either order.
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        match u.raw.recv() {
            Frame::ServerAck(frame::ServerAck { client_msg_id, .. }) if client_msg_id == nonce => {
                acked = true
            }
            Frame::Deliver(frame::Deliver {
                seq,
                message: Message { client_msg_id, .. },
            }) if client_msg_id == nonce => {
                delivered = true;
                u.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
            }
            Frame::Receipt(frame::Receipt { seq, .. }) => {
                u.raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }))
            }
            f => panic!("expected ServerAck/Deliver, got {f:?}"),
        }
    }
    // A fresh connection still completes a handshake.
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    r.send(Frame::Ping(frame::Ping { nonce: 1 }));
    assert_eq!(r.recv(), Frame::Pong(frame::Pong { nonce: 1 }));
}

/// Seals arbitrary plaintext bytes as one record.
fn seal_raw(r: &mut Raw, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::wire::put_len(&mut out, plain.len() + 16);
    out.extend_from_slice(plain);
    r.t.tx.seal_in_place(&mut out, 2).unwrap();
    out
}

fn expect_error_then_close(r: &mut Raw, code: ErrorCode) {
    match r.recv_timeout(Duration::from_secs(10)) {
        Some(Frame::Error(frame::Error { code: c, .. })) => {
            assert_eq!(c, code as u16, "expected {code:?}")
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
    assert!(
        r.closed_within(Duration::from_secs(5)),
        "not closed after {code:?}"
    );
}

fn closed_without_reply(s: &mut TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn garbage_before_the_handshake_is_closed() {
    let mut d = Daemon::start(2, &[]);
    let mut u = bystander(&d);
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: switchboard\r\n\r\n")
        .unwrap();
    assert!(closed_without_reply(&mut s));
    // Right magic, wrong version.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"SWB\x09").unwrap();
    assert!(closed_without_reply(&mut s));
    bystander_still_works(&mut d, &mut u, 10);
    std::thread::sleep(Duration::from_millis(1200));
    let m = d.metrics();
    assert!(
        m.contains("code=\"BadPreamble\"} 1")
            || d.metric_sum("switchboard_handshake_failures_total") >= 2.0,
        "{m}"
    );
}

#[test]
fn a_failed_handshake_is_closed() {
    let mut d = Daemon::start(2, &[]);
    let mut u = bystander(&d);
    // A msg1 of the wrong size.
    let mut s = TcpStream::connect(d.addr).unwrap();
    let mut out = PREAMBLE.to_vec();
    out.extend_from_slice(&[0, 5, 1, 2, 3, 4, 5]);
    s.write_all(&out).unwrap();
    assert!(closed_without_reply(&mut s));
    // A good msg1, then a msg3 that does not authenticate.
    let key = StaticKeypair::generate();
    let (_, msg1) = protocol::noise::ClientHandshake::start(&key).unwrap();
    let mut s = TcpStream::connect(d.addr).unwrap();
    let mut out = PREAMBLE.to_vec();
    protocol::wire::put_len(&mut out, msg1.len());
    out.extend_from_slice(&msg1);
    s.write_all(&out).unwrap();
    let mut msg2 = [0u8; 98];
    std::io::Read::read_exact(&mut s, &mut msg2).unwrap();
    let mut bad3 = Vec::new();
    protocol::wire::put_len(&mut bad3, 64);
    bad3.extend_from_slice(&[0xAB; 64]);
    s.write_all(&bad3).unwrap();
    assert!(closed_without_reply(&mut s));
    // A handshake record announcing more than any handshake message.
    let mut s = TcpStream::connect(d.addr).unwrap();
    let mut out = PREAMBLE.to_vec();
    out.extend_from_slice(&[0xFF, 0xFF]);
    s.write_all(&out).unwrap();
    assert!(closed_without_reply(&mut s));
    bystander_still_works(&mut d, &mut u, 11);
}

#[test]
fn an_oversize_length_prefix_gets_frame_too_large() {
    let mut d = Daemon::start(1, &[]);
    let mut u = bystander(&d);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    r.stream.write_all(&[0xFF, 0xFF]).unwrap();
    expect_error_then_close(&mut r, ErrorCode::FrameTooLarge);
    bystander_still_works(&mut d, &mut u, 12);
}

#[test]
fn truncated_frames_and_records() {
    let mut d = Daemon::start(1, &[]);
    let mut u = bystander(&d);
    // A Send whose header is cut short: MalformedFrame.
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let rec = seal_raw(&mut r, &[protocol::FrameKind::PING.0, 1, 2, 3]);
    r.stream.write_all(&rec).unwrap();
    expect_error_then_close(&mut r, ErrorCode::MalformedFrame);
    // A record cut short on the wire, then the peer goes away: nothing breaks.
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let rec = seal_raw(&mut r, &Frame::Ping(frame::Ping { nonce: 1 }).to_vec());
    r.stream.write_all(&rec[..rec.len() / 2]).unwrap();
    drop(r);
    // A record that does not authenticate: DecryptFailed.
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let mut rec = seal_raw(&mut r, &Frame::Ping(frame::Ping { nonce: 1 }).to_vec());
    let last = rec.len() - 1;
    rec[last] ^= 0x55;
    r.stream.write_all(&rec).unwrap();
    expect_error_then_close(&mut r, ErrorCode::DecryptFailed);
    bystander_still_works(&mut d, &mut u, 13);
}

#[test]
fn an_unknown_kind_gets_unknown_kind() {
    let mut d = Daemon::start(1, &[]);
    let mut u = bystander(&d);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let rec = seal_raw(&mut r, &[0x7F, 0, 0, 0]);
    r.stream.write_all(&rec).unwrap();
    expect_error_then_close(&mut r, ErrorCode::UnknownKind);
    bystander_still_works(&mut d, &mut u, 14);
}

#[test]
fn a_frame_flood_past_the_rate_limit_is_cut_off() {
    let mut d = Daemon::start(
        1,
        &[
            ("rate-limit-frames-per-s", "50"),
            ("rate-limit-burst", "100"),
        ],
    );
    let mut u = bystander(&d);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    let flood: Vec<Frame> = (0..1000)
        .map(|nonce| Frame::Ping(frame::Ping { nonce }))
        .collect();
    r.send_all(&flood);
    let mut pongs = 0;
    loop {
        match r.recv_timeout(Duration::from_secs(10)) {
            Some(Frame::Pong { .. }) => pongs += 1,
            Some(Frame::Error(frame::Error { code, .. })) => {
                assert_eq!(code, ErrorCode::RateLimited as u16);
                break;
            }
            other => panic!("expected pongs then RateLimited, got {other:?}"),
        }
    }
    assert!((100..=110).contains(&pongs), "{pongs} pongs before the cut");
    assert!(r.closed_within(Duration::from_secs(5)));
    bystander_still_works(&mut d, &mut u, 15);
}

#[test]
fn an_idle_connection_is_closed_after_the_timeout() {
    let mut d = Daemon::start(
        1,
        &[
            ("idle-timeout-ms", "1500"),
            ("keepalive-ms", "500"),
            ("tick-ms", "200"),
        ],
    );
    let key = StaticKeypair::generate();
    register(&d, 15550001111, &key);
    let mut idle = login(&d, 15550001111, &key);
    let mut u = bystander(&d);
    // The bystander keeps pinging; the idle one says nothing.
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        u.raw.send(Frame::Ping(frame::Ping { nonce: i }));
        assert_eq!(u.raw.recv(), Frame::Pong(frame::Pong { nonce: i }));
    }
    expect_error_then_close(&mut idle.raw, ErrorCode::IdleTimeout);
    bystander_still_works(&mut d, &mut u, 16);
}

#[test]
fn an_oversize_payload_is_refused_without_closing() {
    let mut d = Daemon::start(1, &[("max-payload-bytes", "1000")]);
    let mut u = bystander(&d);
    u.raw.send(send_frame(u.phone, 99, &[7u8; 1001]));
    match u.raw.recv() {
        Frame::Error(frame::Error { code, ref_id, .. }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge as u16);
            assert_eq!(ref_id, 99);
        }
        f => panic!("expected PayloadTooLarge, got {f:?}"),
    }
    bystander_still_works(&mut d, &mut u, 17);
}

#[test]
fn connections_past_max_connections_are_refused_and_counted() {
    let mut d = Daemon::start(1, &[("max-connections", "4")]);
    let mut u = bystander(&d); // 1
    let _held: Vec<Raw> = (0..3)
        .map(|_| Raw::connect(d.addr, &StaticKeypair::generate()))
        .collect(); // 2..=4
    std::thread::sleep(Duration::from_millis(200));
    let mut s = TcpStream::connect(d.addr).unwrap();
    let mut out = PREAMBLE.to_vec();
    out.extend_from_slice(&[0, 32]);
    out.extend_from_slice(&[1u8; 32]);
    let _ = s.write_all(&out);
    assert!(
        closed_without_reply(&mut s),
        "the fifth connection must be closed at accept"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.metric_sum("switchboard_refused_overload_total") >= 1.0);
    assert!(d.alive());
    u.raw.send(Frame::Ping(frame::Ping { nonce: 5 }));
    assert_eq!(u.raw.recv(), Frame::Pong(frame::Pong { nonce: 5 }));
}

#[test]
fn an_unauthenticated_connection_cannot_be_held_open_by_pinging() {
    let mut d = Daemon::start(1, &[("preauth-timeout-ms", "1000"), ("tick-ms", "200")]);
    let mut u = bystander(&d);
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    // Pings keep it from being idle, but it never logs in.
    let mut closed_by = None;
    for nonce in 0..30 {
        r.send(Frame::Ping(frame::Ping { nonce }));
        match r.recv_timeout(Duration::from_secs(2)) {
            Some(Frame::Pong { .. }) => std::thread::sleep(Duration::from_millis(100)),
            Some(Frame::Error(frame::Error { code, .. })) => {
                closed_by = Some(code);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(closed_by, Some(ErrorCode::NotAuthenticated as u16));
    assert!(r.closed_within(Duration::from_secs(5)));
    // The bystander logged in long before the deadline and is not affected.
    std::thread::sleep(Duration::from_millis(500));
    bystander_still_works(&mut d, &mut u, 18);
}

#[test]
fn unauthenticated_connections_per_address_are_capped() {
    let mut d = Daemon::start(1, &[("max-preauth-per-ip", "3")]);
    // A logged-in bystander does not count against its address.
    let mut u = bystander(&d);
    let held: Vec<Raw> = (0..3)
        .map(|_| Raw::connect(d.addr, &StaticKeypair::generate()))
        .collect();
    let mut s = TcpStream::connect(d.addr).unwrap();
    let _ = s.write_all(&PREAMBLE);
    assert!(
        closed_without_reply(&mut s),
        "a fourth unauthenticated connection must be refused"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.metric_sum("switchboard_refused_per_ip_total") >= 1.0);
    // Closing one frees its slot.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut r = Raw::connect(d.addr, &StaticKeypair::generate());
    r.send(Frame::Ping(frame::Ping { nonce: 9 }));
    assert_eq!(r.recv(), Frame::Pong(frame::Pong { nonce: 9 }));
    drop(r);
    std::thread::sleep(Duration::from_millis(200));
    bystander_still_works(&mut d, &mut u, 19);
}
