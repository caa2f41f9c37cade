//! SDK tests against scripted fake servers (real TCP on 127.0.0.1, the real protocol crate).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{welcome, FakeConn, FakeServer, Next};
use protocol::{
    frame, Address, DeviceAddr, ErrorCode, Frame, FrameKind, Message, MsgType, ReceiptInfo,
    ReceiptKind,
};
use switchboard_client::{
    Connection, Error, Event, Identity, ProtocolError, ServerCode, ServerKeyPolicy, Session,
    SessionOptions, Timeouts,
};

const ALICE: u64 = 14155550100;
const BOB: u64 = 14155550101;

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        handshake: Duration::from_secs(5),
        request: Duration::from_secs(5),
        write: Duration::from_secs(5),
        pong: Some(Duration::from_secs(5)),
        close_linger: Duration::from_millis(200),
    }
}

/// Connects and logs in as ALICE device 0 against `server`.
fn login(server: &FakeServer, identity: &Identity, options: SessionOptions) -> Session {
    Connection::connect(server.addr, identity, timeouts())
        .expect("connect")
        .login_with(ALICE, 0, options)
        .expect("login")
}

fn deliver(seq: u64, from_user: u64, client_msg_id: u64, text: &'static str) -> Frame {
    Frame::Deliver(frame::Deliver {
        seq,
        message: Message {
            from: DeviceAddr {
                user: from_user,
                device: 0,
            },
            client_msg_id,
            server_ts_ms: 1_700_000_000_000 + seq,
            msg_type: MsgType::TEXT,
            payload: Bytes::from_static(text.as_bytes()),
        },
    })
}

/// Collects the seqs of every `Ack` the client sends within `window`.
fn acked_within(conn: &mut FakeConn, window: Duration) -> Vec<u64> {
    let deadline = Instant::now() + window;
    let mut seqs = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return seqs;
        }
        match conn.next(left) {
            Next::Frame(Frame::Ack(frame::Ack { seqs: s })) => seqs.extend(s),
            Next::Frame(Frame::Ping(frame::Ping { nonce })) => {
                conn.send(&Frame::Pong(frame::Pong { nonce }))
            }
            Next::Frame(other) => panic!("unexpected {other:?}"),
            Next::Eof | Next::Timeout => return seqs,
        }
    }
}

/// The handshake authenticates both sides: the server sees the device's static key, the
/// client pins the server's key in server.pub, and Login → Welcome yields a session.
#[test]
fn handshake_pins_server_key_and_logs_in() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let device_key = identity.public_key();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        assert_eq!(
            c.client_key, device_key,
            "the server sees the device's static key"
        );
        assert_eq!(c.expect_login(30_000, 65_535), (ALICE, 0));
        c.expect_eof();
    });
    let session = login(&server, &identity, SessionOptions::default());
    assert_eq!((session.user(), session.device()), (ALICE, 0));
    assert_eq!(session.server_key(), server.key.public);
    assert_eq!(session.welcome().keepalive_ms, 30_000);
    assert_eq!(
        identity.pinned_server_key().unwrap(),
        Some(server.key.public)
    );
    session.close().unwrap();
    server.join();
}

/// Registration: a refused request and a wrong code are typed, non-fatal errors (the same
/// connection goes on), the right code binds the account and saves it in the state dir.
#[test]
fn register_flow_with_errors() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        assert_eq!(
            c.recv(),
            Frame::RegisterRequest(frame::RegisterRequest { phone: ALICE })
        );
        c.send(&Frame::error(
            ErrorCode::RegisterRateLimited,
            0,
            "slow down",
        ));
        assert_eq!(
            c.recv(),
            Frame::RegisterRequest(frame::RegisterRequest { phone: ALICE })
        );
        c.send(&Frame::RegisterCodeSent(frame::RegisterCodeSent {
            phone: ALICE,
            expires_in_s: 300,
        }));
        assert_eq!(
            c.recv(),
            Frame::RegisterVerify(frame::RegisterVerify {
                phone: ALICE,
                code: 111111
            })
        );
        c.send(&Frame::error(ErrorCode::WrongCode, 0, "wrong code"));
        assert_eq!(
            c.recv(),
            Frame::RegisterVerify(frame::RegisterVerify {
                phone: ALICE,
                code: 424242
            })
        );
        c.send(&Frame::Registered(frame::Registered {
            addr: DeviceAddr {
                user: ALICE,
                device: 0,
            },
        }));
        c.expect_login(30_000, 65_535);
        c.expect_eof();
    });
    let mut conn = Connection::connect(server.addr, &identity, timeouts()).unwrap();
    let e = conn.register_request(ALICE).unwrap_err();
    assert!(
        matches!(&e, Error::Server { code, text, .. } if code.is(ErrorCode::RegisterRateLimited) && text == "slow down"),
        "{e:?}"
    );
    assert_eq!(conn.register_request(ALICE).unwrap().expires_in_s, 300);
    let e = conn.register_verify(ALICE, 111111).unwrap_err();
    assert_eq!(
        e.server_code(),
        Some(ServerCode::from(ErrorCode::WrongCode))
    );
    assert!(
        identity.account().unwrap().is_none(),
        "no account before success"
    );
    let account = conn.register_verify(ALICE, 424242).unwrap();
    assert_eq!((account.user, account.device), (ALICE, 0));
    assert_eq!(identity.account().unwrap(), Some(account));
    // The saved account is enough to log in.
    let session = conn.login_saved(SessionOptions::default()).unwrap();
    assert_eq!(session.user(), ALICE);
    session.close().unwrap();
    server.join();
}

/// An invalid number is refused locally, before anything is sent.
#[test]
fn invalid_phone_is_refused_locally() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_eof();
    });
    let mut conn = Connection::connect(server.addr, &Identity::ephemeral(), timeouts()).unwrap();
    assert!(matches!(
        conn.register_request(0),
        Err(Error::InvalidPhone(_))
    ));
    assert!(matches!(
        conn.register_verify(10_000_000_000_000_000, 1),
        Err(Error::InvalidPhone(_))
    ));
    conn.close();
    server.join();
}

/// Login with a key the server does not know: UnknownKey is fatal and typed.
#[test]
fn login_with_unknown_key_is_a_fatal_server_error() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        assert!(matches!(c.recv(), Frame::Login { .. }));
        c.send(&Frame::error(ErrorCode::UnknownKey, 0, "unknown key"));
        c.close();
    });
    let conn = Connection::connect(server.addr, &Identity::ephemeral(), timeouts()).unwrap();
    let e = conn.login(ALICE, 0).unwrap_err();
    assert!(
        matches!(&e, Error::Server { code, .. } if code.is(ErrorCode::UnknownKey) && code.is_fatal()),
        "{e:?}"
    );
    assert!(!e.is_transient());
    server.join();
}

/// Send → ServerAck: the frame carries the recipient's device 0 and the payload, the ✓ comes
/// back with the server timestamp and empties the outbox; a refusal comes back as SendFailed
/// (via recv) or SendRejected (via wait_server_ack).
#[test]
fn send_gets_server_ack_or_refusal() {
    let (id_tx, id_rx) = mpsc::channel::<u64>();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        let Frame::Send(frame::Send {
            client_msg_id,
            to,
            msg_type,
            payload,
        }) = c.recv()
        else {
            panic!("expected Send")
        };
        assert_eq!(to, Address::device(BOB, 0));
        assert_eq!((msg_type, &payload[..]), (MsgType::TEXT, &b"hi bob"[..]));
        assert_eq!(client_msg_id, id_rx.recv().unwrap());
        c.send(&Frame::ServerAck(frame::ServerAck {
            client_msg_id,
            server_ts_ms: 1234,
        }));
        // Second message: refused, observed through recv.
        let Frame::Send(frame::Send { client_msg_id, .. }) = c.recv() else {
            panic!("expected Send")
        };
        c.send(&Frame::error(
            ErrorCode::NoSuchRecipient,
            client_msg_id,
            "who?",
        ));
        // Third: refused, observed through wait_server_ack.
        let Frame::Send(frame::Send { client_msg_id, .. }) = c.recv() else {
            panic!("expected Send")
        };
        c.send(&Frame::error(ErrorCode::PayloadTooLarge, client_msg_id, ""));
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    let id = s.send(BOB, b"hi bob", MsgType::TEXT).unwrap();
    assert_ne!(id, 0);
    id_tx.send(id).unwrap();
    assert_eq!(s.outbox().len(), 1);
    assert_eq!(s.wait_server_ack(id, Duration::from_secs(5)).unwrap(), 1234);
    assert!(s.outbox().is_empty());

    let id2 = s.send(BOB, b"second", MsgType::TEXT).unwrap();
    let ev = s.recv(Some(Duration::from_secs(5))).unwrap().unwrap();
    assert_eq!(
        ev,
        Event::SendFailed {
            client_msg_id: id2,
            code: ServerCode::from(ErrorCode::NoSuchRecipient),
            text: "who?".into()
        }
    );
    assert!(s.outbox().is_empty());

    let id3 = s.send(BOB, b"third", MsgType::TEXT).unwrap();
    let e = s.wait_server_ack(id3, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(&e, Error::SendRejected { client_msg_id, code, .. } if *client_msg_id == id3 && code.is(ErrorCode::PayloadTooLarge)),
        "{e:?}"
    );
    assert!(!s.is_closed(), "a refused message does not end the session");
    s.close().unwrap();
    server.join();
}

/// Deliver → event → Ack: the ack is sent only after recv handed the event out (when the
/// client next reads), duplicates of a delivered message are hidden but still acked, and one
/// read's worth of events is acked in one batch.
#[test]
fn deliver_is_acked_after_recv_and_duplicates_are_dropped() {
    let (step_tx, step_rx) = mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        c.send(&deliver(1, BOB, 77, "one"));
        assert_eq!(step_rx.recv().unwrap(), "got one");
        // The client holds the event but has not come back: no ack yet.
        assert!(
            acked_within(&mut c, Duration::from_millis(300)).is_empty(),
            "ack before the caller came back"
        );
        done_tx.send(()).unwrap();
        // Now the client reads again: the ack for seq 1 arrives.
        assert_eq!(acked_within(&mut c, Duration::from_millis(500)), vec![1]);
        // A redelivery (new seq, same message) and a new message in one write.
        c.send(&deliver(2, BOB, 77, "one again"));
        c.send(&deliver(3, BOB, 78, "two"));
        c.send(&Frame::Receipt(frame::Receipt {
            seq: 4,
            receipt: ReceiptInfo {
                from: DeviceAddr {
                    user: BOB,
                    device: 0,
                },
                client_msg_id: 5,
                kind: ReceiptKind::DELIVERED,
                ts_ms: 9,
            },
        }));
        c.send(&Frame::Receipt(frame::Receipt {
            seq: 5,
            receipt: ReceiptInfo {
                from: DeviceAddr {
                    user: BOB,
                    device: 0,
                },
                client_msg_id: 5,
                kind: ReceiptKind::READ,
                ts_ms: 10,
            },
        }));
        let mut acked = acked_within(&mut c, Duration::from_secs(2));
        acked.sort_unstable();
        assert_eq!(acked, vec![2, 3, 4, 5]);
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    match s.recv(Some(Duration::from_secs(5))).unwrap().unwrap() {
        Event::Message(Message {
            from:
                DeviceAddr {
                    user: from_user,
                    device: from_device,
                },
            client_msg_id,
            server_ts_ms,
            msg_type,
            payload,
        }) => {
            assert_eq!(
                (from_user, from_device, client_msg_id, msg_type),
                (BOB, 0, 77, MsgType::TEXT)
            );
            assert_eq!(server_ts_ms, 1_700_000_000_001);
            assert_eq!(&payload[..], b"one");
        }
        other => panic!("expected a message, got {other:?}"),
    }
    assert_eq!(s.acks_due(), 1);
    step_tx.send("got one").unwrap();
    done_rx.recv().unwrap();
    let mut events = Vec::new();
    while let Some(ev) = s.recv(Some(Duration::from_millis(800))).unwrap() {
        events.push(ev);
    }
    assert_eq!(events.len(), 3, "the duplicate is hidden: {events:?}");
    assert!(
        matches!(&events[0], Event::Message(Message { client_msg_id: 78, payload, .. }) if &payload[..] == b"two")
    );
    assert_eq!(
        events[1],
        Event::Delivered {
            by: DeviceAddr::new(BOB, 0),
            client_msg_id: 5,
            ts_ms: 9,
            first: true
        }
    );
    assert_eq!(
        events[2],
        Event::Read {
            by: DeviceAddr::new(BOB, 0),
            client_msg_id: 5,
            ts_ms: 10,
            first: true
        }
    );
    assert_eq!(s.dedup().len(), 2);
    s.close().unwrap();
    server.join();
}

/// A duplicate that arrives while the original still waits in the queue is merged into it:
/// nothing is acked until the original was handed out.
#[test]
fn duplicate_of_a_queued_message_is_acked_with_it() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        c.send(&deliver(1, BOB, 77, "one"));
        c.send(&deliver(2, BOB, 77, "one"));
        let mut acked = acked_within(&mut c, Duration::from_secs(2));
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 2]);
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    // Let both records arrive, then pull: the second is folded into the first.
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(
        s.recv(Some(Duration::from_secs(5))).unwrap(),
        Some(Event::Message(Message {
            client_msg_id: 77,
            ..
        }))
    ));
    assert_eq!(s.recv(Some(Duration::from_millis(300))).unwrap(), None);
    s.close().unwrap();
    server.join();
}

/// With persist_dedup, a message handed out before a restart is recognised when the server
/// redelivers it to the next process (the ack was lost), and acked without being shown.
#[test]
fn persisted_dedup_survives_restart() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        c.send(&deliver(1, BOB, 99, "once"));
        // Pretend the ack was lost: ignore it and drop the connection.
        let _ = acked_within(&mut c, Duration::from_millis(500));
        c.close();
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        c.send(&deliver(1, BOB, 99, "once"));
        c.send(&deliver(2, BOB, 100, "fresh"));
        let mut acked = acked_within(&mut c, Duration::from_secs(2));
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 2]);
        c.expect_eof();
    });
    let options = SessionOptions {
        persist_dedup: true,
        ..SessionOptions::default()
    };
    let mut s = login(&server, &identity, options.clone());
    assert!(matches!(
        s.recv(Some(Duration::from_secs(5))).unwrap(),
        Some(Event::Message(Message {
            client_msg_id: 99,
            ..
        }))
    ));
    // close flushes: saves seen.txt, then acks.
    let _ = s.close();
    assert!(state.path().join("seen.txt").exists());

    let mut s = login(&server, &identity, options);
    let ev = s.recv(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(
            ev,
            Some(Event::Message(Message {
                client_msg_id: 100,
                ..
            }))
        ),
        "{ev:?}"
    );
    assert_eq!(s.recv(Some(Duration::from_millis(300))).unwrap(), None);
    s.close().unwrap();
    server.join();
}

/// Keepalive: while the caller waits in recv with nothing to read, the session pings every
/// Welcome.keepalive_ms; a server that stops answering is detected and the session closes.
#[test]
fn keepalive_pings_when_idle_and_detects_a_dead_server() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(100, 65_535);
        let mut pings = 0;
        let deadline = Instant::now() + Duration::from_millis(700);
        while Instant::now() < deadline {
            match c.next(Duration::from_millis(50)) {
                Next::Frame(Frame::Ping(frame::Ping { nonce })) => {
                    pings += 1;
                    c.send(&Frame::Pong(frame::Pong { nonce }));
                }
                Next::Frame(other) => panic!("unexpected {other:?}"),
                Next::Timeout => {}
                Next::Eof => break,
            }
        }
        assert!(
            pings >= 2,
            "expected a ping about every 100 ms, got {pings}"
        );
        // Second connection: never answer.
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(100, 65_535);
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    assert_eq!(s.recv(Some(Duration::from_millis(600))).unwrap(), None);
    assert!(!s.is_closed());
    s.close().unwrap();

    let t = Timeouts {
        pong: Some(Duration::from_millis(300)),
        ..timeouts()
    };
    let mut s = Connection::connect(server.addr, &Identity::ephemeral(), t)
        .unwrap()
        .login(ALICE, 0)
        .unwrap();
    let started = Instant::now();
    let e = s.recv(Some(Duration::from_secs(5))).unwrap_err();
    assert!(matches!(e, Error::Timeout { what: "pong" }), "{e:?}");
    assert!(e.is_transient());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(s.is_closed());
    assert!(matches!(
        s.send(BOB, b"x", MsgType::TEXT),
        Err(Error::Closed)
    ));
    drop(s);
    server.join();
}

/// ping() measures a round trip and keeps what arrived meanwhile for recv; the session also
/// answers the server's pings.
#[test]
fn explicit_ping_and_server_ping() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(0, 65_535);
        let Frame::Ping(frame::Ping { nonce }) = c.recv() else {
            panic!("expected Ping")
        };
        c.send(&deliver(1, BOB, 5, "meanwhile"));
        c.send(&Frame::Pong(frame::Pong {
            nonce: nonce.wrapping_add(1000),
        })); // stale pong: ignored
        c.send(&Frame::Pong(frame::Pong { nonce }));
        c.send(&Frame::Ping(frame::Ping { nonce: 4242 }));
        loop {
            match c.recv() {
                Frame::Pong(frame::Pong { nonce }) => {
                    assert_eq!(nonce, 4242);
                    break;
                }
                Frame::Ack { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    let rtt = s.ping().unwrap();
    assert!(rtt < Duration::from_secs(5));
    assert!(matches!(
        s.recv(Some(Duration::from_secs(5))).unwrap(),
        Some(Event::Message(Message {
            client_msg_id: 5,
            ..
        }))
    ));
    // Reading on answers the server's ping.
    assert_eq!(s.recv(Some(Duration::from_millis(300))).unwrap(), None);
    s.close().unwrap();
    server.join();
}

/// Bad server input is a typed protocol error that closes the session, never a panic: an
/// unknown frame kind, a truncated frame, a record that does not authenticate, a frame kind
/// the server must not send, and an impossible record length.
#[test]
fn malformed_server_input_is_a_typed_error() {
    type Inject = fn(&mut FakeConn);
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Inject, Check)> = vec![
        (
            "unknown kind",
            |c| c.send_sealed_bytes(&[0x7f, 1, 2, 3]),
            |e| {
                matches!(
                    e,
                    Error::Protocol(ProtocolError::Decode(protocol::DecodeError::UnknownKind(
                        FrameKind(0x7f)
                    )))
                )
            },
        ),
        (
            "truncated deliver",
            |c| c.send_sealed_bytes(&[FrameKind::DELIVER.0, 0, 0, 1]),
            |e| {
                matches!(
                    e,
                    Error::Protocol(ProtocolError::Decode(
                        protocol::DecodeError::Truncated { .. }
                    ))
                )
            },
        ),
        (
            "garbage record",
            |c| c.send_raw_record(&[0xAB; 40]),
            |e| matches!(e, Error::Protocol(ProtocolError::Transport(_))),
        ),
        (
            "client-bound kind",
            |c| {
                c.send(&Frame::Login(frame::Login {
                    addr: DeviceAddr { user: 1, device: 0 },
                    revision: 1,
                    capabilities: 1,
                }))
            },
            |e| {
                matches!(
                    e,
                    Error::Protocol(ProtocolError::Unexpected {
                        kind: FrameKind::LOGIN,
                        ..
                    })
                )
            },
        ),
        (
            "record shorter than a tag",
            |c| c.send_raw_record(&[1, 2, 3]),
            |e| matches!(e, Error::Protocol(ProtocolError::Wire(_))),
        ),
    ];
    for (name, inject, check) in cases {
        let server = FakeServer::start(move |l, key| {
            let mut c = FakeConn::accept(&l, &key);
            c.expect_login(30_000, 65_535);
            inject(&mut c);
            c.expect_eof();
        });
        let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
        let e = s.recv(Some(Duration::from_secs(5))).expect_err(name);
        assert!(check(&e), "{name}: {e:?}");
        assert!(!e.is_transient(), "{name}");
        assert!(s.is_closed(), "{name}: the session closes on bad input");
        assert!(
            matches!(s.recv(Some(Duration::ZERO)), Err(Error::Closed)),
            "{name}"
        );
        drop(s);
        server.join();
    }
}

/// A reply that names another number than the request is a protocol error.
#[test]
fn mismatched_reply_is_a_protocol_error() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        assert!(matches!(c.recv(), Frame::Login { .. }));
        c.send(&welcome(BOB, 0, 30_000, 65_535));
        c.expect_eof();
    });
    let conn = Connection::connect(server.addr, &Identity::ephemeral(), timeouts()).unwrap();
    let e = conn.login(ALICE, 0).unwrap_err();
    assert!(
        matches!(e, Error::Protocol(ProtocolError::Mismatch(_))),
        "{e:?}"
    );
    server.join();
}

/// The server's key is pinned on first use; a different key later is refused before the
/// device's static key is sent (msg3 never leaves), unless the caller re-pins on purpose.
#[test]
fn changed_server_key_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let first = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_eof();
    });
    Connection::connect(first.addr, &identity, timeouts())
        .unwrap()
        .close();
    first.join();
    let pinned = identity.pinned_server_key().unwrap().unwrap();

    let impostor = FakeServer::start(|l, key| {
        let (_hs, mut c) = FakeConn::accept_until_msg2(&l, &key);
        assert_eq!(
            c.read_raw_record(),
            None,
            "the client must hang up instead of sending msg3"
        );
        // Then the operator-approved re-pin connects fully.
        let mut c = FakeConn::accept(&l, &key);
        c.expect_eof();
    });
    let e = Connection::connect(impostor.addr, &identity, timeouts()).unwrap_err();
    match e {
        Error::ServerKeyChanged {
            pinned: p,
            presented,
        } => {
            assert_eq!(p, pinned);
            assert_eq!(presented, impostor.key.public);
        }
        other => panic!("expected ServerKeyChanged, got {other:?}"),
    }
    assert_eq!(
        identity.pinned_server_key().unwrap(),
        Some(pinned),
        "a refused key is not pinned"
    );

    Connection::connect_with(impostor.addr, &identity, timeouts(), ServerKeyPolicy::Repin)
        .unwrap()
        .close();
    assert_eq!(
        identity.pinned_server_key().unwrap(),
        Some(impostor.key.public)
    );
    impostor.join();

    // Expect policy, with an ephemeral identity.
    let other = FakeServer::start(|l, key| {
        let (_hs, mut c) = FakeConn::accept_until_msg2(&l, &key);
        assert_eq!(c.read_raw_record(), None);
    });
    let e = Connection::connect_with(
        other.addr,
        &Identity::ephemeral(),
        timeouts(),
        ServerKeyPolicy::Expect([9; 32]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ServerKeyChanged { .. }), "{e:?}");
    other.join();
}

/// A peer that answers the handshake with garbage fails with a handshake error; one that never
/// answers times out.
#[test]
fn bad_or_missing_handshake_reply() {
    let server = FakeServer::start(|l, _key| {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 38];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        let mut out = vec![0, 96];
        out.extend_from_slice(&[0x55; 96]);
        std::io::Write::write_all(&mut s, &out).unwrap();
        let (_s2, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(800));
    });
    let e = Connection::connect(server.addr, &Identity::ephemeral(), timeouts()).unwrap_err();
    assert!(matches!(e, Error::Handshake(_)), "{e:?}");
    let t = Timeouts {
        handshake: Duration::from_millis(200),
        ..timeouts()
    };
    let e = Connection::connect(server.addr, &Identity::ephemeral(), t).unwrap_err();
    assert!(matches!(e, Error::Timeout { what: "handshake" }), "{e:?}");
    server.join();
}

/// A fatal Error while logged in ends the session with a typed error; GoAway is an event.
#[test]
fn fatal_error_and_goaway() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        c.send(&Frame::GoAway(frame::GoAway {
            code: ErrorCode::ShuttingDown as u16,
            reconnect_after_ms: 250,
        }));
        c.send(&Frame::error(ErrorCode::Replaced, 0, "logged in elsewhere"));
        c.close();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    assert_eq!(
        s.recv(Some(Duration::from_secs(5))).unwrap(),
        Some(Event::GoAway {
            code: ServerCode::from(ErrorCode::ShuttingDown),
            reconnect_after_ms: 250
        })
    );
    let e = s.recv(Some(Duration::from_secs(5))).unwrap_err();
    assert!(
        matches!(&e, Error::Server { code, .. } if code.is(ErrorCode::Replaced)),
        "{e:?}"
    );
    assert!(
        !e.is_transient(),
        "Replaced must not trigger a reconnect fight"
    );
    assert!(s.is_closed());
    server.join();
}

/// After the connection drops, reconnect() logs in again and resends the unacknowledged
/// message with the same client_msg_id (the server deduplicates on it).
#[test]
fn reconnect_resends_the_outbox_with_the_same_id() {
    let (id_tx, id_rx) = mpsc::channel::<u64>();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        let Frame::Send(frame::Send {
            client_msg_id: first,
            ..
        }) = c.recv()
        else {
            panic!("expected Send")
        };
        c.close(); // crash before the ✓
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        let Frame::Send(frame::Send {
            client_msg_id,
            payload,
            ..
        }) = c.recv()
        else {
            panic!("expected resent Send")
        };
        assert_eq!(client_msg_id, first);
        assert_eq!(&payload[..], b"important");
        id_tx.send(first).unwrap();
        c.send(&Frame::ServerAck(frame::ServerAck {
            client_msg_id,
            server_ts_ms: 77,
        }));
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    let id = s.send(BOB, b"important", MsgType::TEXT).unwrap();
    let e = s.recv(Some(Duration::from_secs(5))).unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert_eq!(s.outbox().len(), 1);
    assert_eq!(s.reconnect().unwrap(), 1);
    assert_eq!(s.wait_server_ack(id, Duration::from_secs(5)).unwrap(), 77);
    assert_eq!(id_rx.recv().unwrap(), id);
    assert!(s.outbox().is_empty());
    assert_eq!(s.outbox().iter().count(), 0);
    s.close().unwrap();
    server.join();
}

/// A payload that cannot fit the server's announced frame limit is refused locally.
#[test]
fn oversized_payload_is_refused_before_sending() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 100);
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    let max = s.max_payload_bytes();
    assert_eq!(max, 100 - 16 - 1 - 20);
    let e = s.send(BOB, &vec![0u8; max + 1], MsgType::TEXT).unwrap_err();
    assert!(
        matches!(e, Error::PayloadTooLarge { len, max: m } if len == max + 1 && m == max),
        "{e:?}"
    );
    assert!(s.outbox().is_empty());
    assert!(matches!(
        s.send_with_id(0, BOB, b"x", MsgType::TEXT),
        Err(Error::ZeroMessageId)
    ));
    s.close().unwrap();
    server.join();
}

/// The outbox is bounded: once full, send refuses until ✓s arrive.
#[test]
fn outbox_is_bounded() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        let Frame::Send(frame::Send { client_msg_id, .. }) = c.recv() else {
            panic!()
        };
        let Frame::Send { .. } = c.recv() else {
            panic!()
        };
        c.send(&Frame::ServerAck(frame::ServerAck {
            client_msg_id,
            server_ts_ms: 1,
        }));
        c.expect_eof();
    });
    let options = SessionOptions {
        outbox_capacity: 2,
        ..SessionOptions::default()
    };
    let mut s = login(&server, &Identity::ephemeral(), options);
    let first = s.send(BOB, b"1", MsgType::TEXT).unwrap();
    s.send(BOB, b"2", MsgType::TEXT).unwrap();
    assert!(matches!(
        s.send(BOB, b"3", MsgType::TEXT),
        Err(Error::OutboxFull { capacity: 2 })
    ));
    assert_eq!(s.wait_server_ack(first, Duration::from_secs(5)).unwrap(), 1);
    s.send(BOB, b"3", MsgType::TEXT).unwrap();
    s.close().unwrap();
    server.join();
}

/// StorageUnavailable is temporary: the message stays in the outbox and a retry under the same
/// id resends the stored payload.
#[test]
fn storage_unavailable_keeps_the_message_for_a_retry() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        c.expect_login(30_000, 65_535);
        let Frame::Send(frame::Send {
            client_msg_id,
            payload,
            ..
        }) = c.recv()
        else {
            panic!("expected Send")
        };
        c.send(&Frame::error(
            ErrorCode::StorageUnavailable,
            client_msg_id,
            "log poisoned",
        ));
        let Frame::Send(frame::Send {
            client_msg_id: again,
            payload: p2,
            ..
        }) = c.recv()
        else {
            panic!("expected retry")
        };
        assert_eq!((again, &p2[..]), (client_msg_id, &payload[..]));
        c.send(&Frame::ServerAck(frame::ServerAck {
            client_msg_id,
            server_ts_ms: 5,
        }));
        c.expect_eof();
    });
    let mut s = login(&server, &Identity::ephemeral(), SessionOptions::default());
    let id = s.send(BOB, b"keep me", MsgType::TEXT).unwrap();
    let ev = s.recv(Some(Duration::from_secs(5))).unwrap().unwrap();
    assert!(
        matches!(ev, Event::SendFailed { client_msg_id, code, .. } if client_msg_id == id && code.is(ErrorCode::StorageUnavailable))
    );
    assert_eq!(s.outbox().len(), 1, "kept for a retry");
    s.send_with_id(
        id,
        BOB,
        b"ignored: the stored payload is resent",
        MsgType::TEXT,
    )
    .unwrap();
    assert_eq!(s.outbox().get(id).map(|p| p.attempts), Some(2));
    assert_eq!(s.wait_server_ack(id, Duration::from_secs(5)).unwrap(), 5);
    assert!(s.outbox().is_empty());
    s.close().unwrap();
    server.join();
}
