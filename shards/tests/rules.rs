//! One test per shard rule, driven through the public API with a synchronous in-memory cluster.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use bytes::Bytes;
use common::{ip, key, user_on, Cluster, TestJournal};
use protocol::{capability, Address, ErrorCode, Frame};
use protocol::{frame, DeviceAddr, Message, MsgType, ReceiptInfo, ReceiptKind};
use switchboard_shards::record::Record;
use switchboard_shards::{
    home_shard, key_shard, Action, Config, Event, MeshMsg, RecordRef, Shard, StoreReceipt,
};

/// A record location for hand-made recovery input.
fn at(segment: u32, offset: u32) -> RecordRef {
    RecordRef { segment, offset }
}

fn error_code(f: &Frame) -> Option<ErrorCode> {
    match f {
        Frame::Error(frame::Error { code, .. }) => ErrorCode::from_u16(*code),
        _ => None,
    }
}

fn send(to: u64, client_msg_id: u64, mt: MsgType) -> Frame {
    Frame::Send(frame::Send {
        client_msg_id,
        to: Address::device(to, 0),
        msg_type: mt,
        payload: Bytes::from(format!("m{client_msg_id}")),
    })
}

fn delivers(frames: &[Frame]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(frame::Deliver {
                seq,
                message: Message { client_msg_id, .. },
            }) => Some((*seq, *client_msg_id)),
            _ => None,
        })
        .collect()
}

/// Two registered users on different home shards (when there is more than one shard).
fn pair(c: &mut Cluster) -> (u64, u64) {
    let a = user_on(0, c.n(), 0);
    let b = user_on(c.n() - 1, c.n(), 1);
    c.register(a, key(a));
    c.register(b, key(b));
    (a, b)
}

// ----- registration ---------------------------------------------------------------------------

/// Proves the whole registration path, and that neither the key claim nor the account answers
/// before its append is durable.
#[test]
fn registration_waits_for_durable_key_binding_and_account() {
    let mut c = Cluster::new(3, |_| {});
    let user = user_on(1, 3, 0);
    let k = key(77);
    let home = home_shard(user, 3);
    let ks = key_shard(&k, 3);
    let conn = c.connect(2, k, ip(1));
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
    );
    c.run();
    let code = c.sms(user).expect("sms sent");
    assert!((100_000..=999_999).contains(&code));
    assert_eq!(
        c.frames(conn),
        vec![Frame::RegisterCodeSent(frame::RegisterCodeSent {
            phone: user,
            expires_in_s: 600
        })]
    );

    c.frame(
        conn,
        Frame::RegisterVerify(frame::RegisterVerify { phone: user, code }),
    );
    c.run();
    assert!(
        matches!(c.journals[usize::from(ks)].pending_records().as_slice(), [Record::KeyBinding { user: u, device: 0, .. }] if *u == user)
    );
    assert!(
        c.frames(conn).is_empty(),
        "no answer before the binding is durable"
    );
    c.commit(ks);
    c.run();
    let pending = c.journals[usize::from(home)].pending_records();
    assert!(
        matches!(pending.last(), Some(Record::Account { user: u, device: 0, static_key, .. }) if *u == user && *static_key == k)
    );
    assert!(
        c.frames(conn).is_empty(),
        "no Registered before the account is durable"
    );
    c.commit(home);
    c.run();
    assert_eq!(
        c.frames(conn),
        vec![Frame::Registered(frame::Registered {
            addr: DeviceAddr { user, device: 0 }
        })]
    );
    assert_eq!(c.shards[usize::from(home)].stats().registrations, 1);

    // The code is consumed: replaying it finds nothing.
    c.frame(
        conn,
        Frame::RegisterVerify(frame::RegisterVerify { phone: user, code }),
    );
    c.settle();
    assert_eq!(
        c.frames(conn).iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::NoPendingCode)]
    );
}

/// Proves each registration error carries its own code and none of them closes the connection.
#[test]
fn registration_errors_have_their_codes() {
    let mut c = Cluster::new(2, |cfg| {
        cfg.register_verify_attempts_max = 2;
        cfg.register_per_number_per_hour = 2;
        cfg.register_per_ip_per_hour = 100;
    });
    let user = user_on(1, 2, 0);
    let conn = c.connect(0, key(1), ip(1));

    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: 0 }),
    );
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest {
            phone: 10_000_000_000_000_000,
        }),
    );
    c.settle();
    let got: Vec<_> = c.frames(conn).iter().map(error_code).collect();
    assert_eq!(
        got,
        vec![
            Some(ErrorCode::InvalidNumber),
            Some(ErrorCode::InvalidNumber)
        ]
    );

    c.frame(
        conn,
        Frame::RegisterVerify(frame::RegisterVerify {
            phone: user,
            code: 123_456,
        }),
    );
    c.settle();
    assert_eq!(
        c.frames(conn).iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::NoPendingCode)]
    );

    // Wrong twice: WrongCode, WrongCode, and the code is burnt.
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
    );
    c.settle();
    let code = c.sms(user).expect("code");
    let wrong = if code == 999_999 { 100_000 } else { code + 1 };
    for _ in 0..2 {
        c.frame(
            conn,
            Frame::RegisterVerify(frame::RegisterVerify {
                phone: user,
                code: wrong,
            }),
        );
    }
    c.frame(
        conn,
        Frame::RegisterVerify(frame::RegisterVerify { phone: user, code }),
    );
    c.settle();
    let got: Vec<_> = c.frames(conn).iter().filter_map(error_code).collect();
    assert_eq!(
        got,
        vec![
            ErrorCode::WrongCode,
            ErrorCode::WrongCode,
            ErrorCode::NoPendingCode
        ]
    );

    // Expired.
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
    );
    c.settle();
    let code = c.sms(user).expect("code");
    c.now += 10 * 60 * 1000;
    c.frame(
        conn,
        Frame::RegisterVerify(frame::RegisterVerify { phone: user, code }),
    );
    c.settle();
    let got: Vec<_> = c.frames(conn).iter().filter_map(error_code).collect();
    assert_eq!(got, vec![ErrorCode::CodeExpired]);

    // Per-number limit: two requests this hour already.
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
    );
    c.settle();
    assert_eq!(
        c.frames(conn)
            .iter()
            .filter_map(error_code)
            .collect::<Vec<_>>(),
        vec![ErrorCode::RegisterRateLimited]
    );
    assert!(c.sms(user).is_none());
    c.now += 3_600_000;
    c.frame(
        conn,
        Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
    );
    c.settle();
    assert!(c.sms(user).is_some(), "a new hour opens a new window");

    // Still open after all that.
    c.frame(conn, Frame::Ping(frame::Ping { nonce: 5 }));
    assert!(c
        .frames(conn)
        .contains(&Frame::Pong(frame::Pong { nonce: 5 })));
    assert_eq!(c.closed(conn), None);
}

/// Proves the per-address limit is applied on the accepting shard, before any mesh traffic.
#[test]
fn registration_is_limited_per_source_address() {
    let mut c = Cluster::new(2, |cfg| cfg.register_per_ip_per_hour = 2);
    let conn = c.connect(0, key(1), ip(9));
    for i in 0..3 {
        c.frame(
            conn,
            Frame::RegisterRequest(frame::RegisterRequest {
                phone: user_on(1, 2, i),
            }),
        );
    }
    assert_eq!(
        c.mesh.len(),
        2,
        "the third request never leaves the accepting shard"
    );
    assert_eq!(
        c.frames(conn)
            .iter()
            .filter_map(error_code)
            .collect::<Vec<_>>(),
        vec![ErrorCode::RegisterRateLimited]
    );
    let other = c.connect(0, key(2), ip(10));
    c.frame(
        other,
        Frame::RegisterRequest(frame::RegisterRequest {
            phone: user_on(1, 2, 5),
        }),
    );
    assert_eq!(c.mesh.len(), 3, "another address has its own window");
}

/// Proves a key bound to one number cannot be registered to another, and that re-registering a
/// number replaces its key while the old key stays bound to it.
#[test]
fn key_binding_rules_and_re_registration() {
    let mut c = Cluster::new(3, |_| {});
    let (u1, u2) = (user_on(0, 3, 0), user_on(1, 3, 0));
    c.register(u1, key(1));
    let frames = c.register_via(2, u2, key(1));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![ErrorCode::KeyBoundToOtherUser]
    );

    // Re-register u1 with a new key.
    c.register(u1, key(2));
    let conn = c.connect(0, key(1), ip(1));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr {
                user: u1,
                device: 0,
            },
            revision: 1,
            capabilities: 1,
        }),
    );
    assert_eq!(
        c.closed(conn),
        Some(ErrorCode::UnknownKey),
        "the old key no longer logs in"
    );
    c.login(u1, key(2));
    // The old key is still bound to u1 in the reverse index.
    let frames = c.register_via(1, u2, key(1));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![ErrorCode::KeyBoundToOtherUser]
    );
    // Re-registering with the same key is fine (already bound to the same user and device).
    c.register(u1, key(2));
}

// ----- connections ----------------------------------------------------------------------------

/// Proves login checks the key, answers Welcome with the negotiated values, hands a connection
/// accepted elsewhere to the home shard, and replaces an older connection of the same device.
#[test]
fn login_rules() {
    let mut c = Cluster::new(2, |_| {});
    let user = user_on(1, 2, 0);
    c.register(user, key(5));

    let conn = c.connect(1, key(6), ip(1));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device: 0 },
            revision: 1,
            capabilities: 1,
        }),
    );
    assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey), "wrong key");
    let conn = c.connect(1, key(5), ip(1));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device: 3 },
            revision: 1,
            capabilities: 1,
        }),
    );
    assert_eq!(
        c.closed(conn),
        Some(ErrorCode::UnknownKey),
        "unknown device"
    );
    let conn = c.connect(1, key(5), ip(1));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr {
                user: user_on(1, 2, 1),
                device: 0,
            },
            revision: 1,
            capabilities: 1,
        }),
    );
    assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey), "unknown user");
    let conn = c.connect(1, key(5), ip(1));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device: 0 },
            revision: 0,
            capabilities: 1,
        }),
    );
    assert_eq!(c.closed(conn), Some(ErrorCode::VersionUnsupported));

    // Accepted on shard 0, handed to shard 1.
    let first = c.connect(0, key(5), ip(1));
    c.now = 42_000;
    c.frame(
        first,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device: 0 },
            revision: 9,
            // A bit no revision defines: the server leaves it out of `Welcome`.
            capabilities: capability::MESSAGING | (1 << 40),
        }),
    );
    assert!(c.out.iter().any(|(s, a)| *s == 0 && matches!(a, Action::Handoff { conn, to: 1, info } if *conn == first && info.static_key == key(5) && info.peer_ip == ip(1))));
    assert_eq!(
        c.frames(first),
        vec![Frame::Welcome(frame::Welcome {
            addr: DeviceAddr { user, device: 0 },
            revision: protocol::PROTOCOL_REVISION,
            capabilities: capability::MESSAGING,
            server_time_ms: 42_000,
            keepalive_ms: 30_000,
            max_frame_bytes: 16 * 1024
        })]
    );
    assert_eq!(c.shards[1].stats().connections_logged_in, 1);
    assert_eq!(c.shards[0].stats().connections_logged_in, 0);

    let second = c.login(user, key(5));
    assert_eq!(c.closed(first), Some(ErrorCode::Replaced));
    assert_eq!(c.shards[1].stats().connections_logged_in, 1);
    assert_eq!(c.shards[1].stats().logins, 2);
    c.close_conn(second);
    assert_eq!(c.shards[1].stats().connections_logged_in, 0);
}

/// Proves what a connection may do before and after login.
#[test]
fn frames_allowed_by_connection_state() {
    let mut c = Cluster::new(1, |_| {});
    let user = user_on(0, 1, 0);
    c.register(user, key(1));
    for f in [
        send(user, 1, MsgType::TEXT),
        Frame::Ack(frame::Ack { seqs: vec![1] }),
        Frame::Read(frame::Read {
            to: Address::device(user, 0),
            client_msg_id: 1,
        }),
    ] {
        let conn = c.connect(0, key(1), ip(1));
        c.frame(conn, Frame::Ping(frame::Ping { nonce: 9 }));
        assert_eq!(
            c.frames(conn),
            vec![Frame::Pong(frame::Pong { nonce: 9 })],
            "ping works before login"
        );
        c.frame(conn, f);
        assert_eq!(c.closed(conn), Some(ErrorCode::NotAuthenticated));
    }
    let conn = c.login(user, key(1));
    c.frame(conn, Frame::Pong(frame::Pong { nonce: 1 }));
    c.frame(
        conn,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device: 0 },
            revision: 1,
            capabilities: 1,
        }),
    );
    assert_eq!(
        c.closed(conn),
        Some(ErrorCode::NotAuthenticated),
        "login twice"
    );
    assert_eq!(c.shards[0].stats().connections_logged_in, 0);

    for f in [
        Frame::ServerAck(frame::ServerAck {
            client_msg_id: 1,
            server_ts_ms: 1,
        }),
        Frame::Registered(frame::Registered {
            addr: DeviceAddr { user, device: 0 },
        }),
        Frame::Error(frame::Error {
            code: 1,
            ref_id: 0,
            text: String::new(),
        }),
    ] {
        let conn = c.login(user, key(1));
        c.frame(conn, f);
        assert_eq!(c.closed(conn), Some(ErrorCode::MalformedFrame));
    }

    // Unknown connections are ignored silently.
    let before = c.out.len();
    c.event(0, Event::Closed { conn: 9999 });
    c.event(
        0,
        Event::Frame {
            conn: 9999,
            frame: Frame::Ping(frame::Ping { nonce: 1 }),
        },
    );
    assert_eq!(c.out.len(), before);
}

// ----- messages -------------------------------------------------------------------------------

/// Proves per-message errors: too large, unsupported address, no such recipient; none closes.
#[test]
fn send_errors_refer_to_the_message() {
    let mut c = Cluster::new(2, |cfg| cfg.max_payload_bytes = 4);
    let (a, b) = pair(&mut c);
    let conn = c.login(a, key(a));
    c.frame(
        conn,
        Frame::Send(frame::Send {
            client_msg_id: 1,
            to: Address::device(b, 0),
            msg_type: MsgType::TEXT,
            payload: Bytes::from_static(b"12345"),
        }),
    );
    c.frame(
        conn,
        Frame::Send(frame::Send {
            client_msg_id: 2,
            to: Address {
                kind: 3,
                id: b,
                device: 0,
            },
            msg_type: MsgType::TEXT,
            payload: Bytes::new(),
        }),
    );
    c.frame(
        conn,
        Frame::Send(frame::Send {
            client_msg_id: 3,
            to: Address::device(b, 7),
            msg_type: MsgType::TEXT,
            payload: Bytes::new(),
        }),
    );
    c.frame(
        conn,
        Frame::Send(frame::Send {
            client_msg_id: 4,
            to: Address::device(user_on(1, 2, 9), 0),
            msg_type: MsgType::TEXT,
            payload: Bytes::new(),
        }),
    );
    c.settle();
    let got: Vec<_> = c
        .frames(conn)
        .into_iter()
        .map(|f| match f {
            Frame::Error(frame::Error { code, ref_id, .. }) => (ErrorCode::from_u16(code), ref_id),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(ErrorCode::PayloadTooLarge), 1),
            (Some(ErrorCode::UnsupportedAddress), 2),
            (Some(ErrorCode::NoSuchRecipient), 3),
            (Some(ErrorCode::NoSuchRecipient), 4),
        ]
    );
    assert_eq!(c.closed(conn), None);
}

/// Proves the ✓ and the delivery both wait for the recipient shard's durability.
#[test]
fn nothing_is_acknowledged_or_delivered_before_durable() {
    let mut c = Cluster::new(2, |_| {});
    let (a, b) = pair(&mut c);
    let home_b = home_shard(b, 2);
    let ca = c.login(a, key(a));
    let cb = c.login(b, key(b));
    c.now = 5_000_000;
    c.frame(ca, send(b, 11, MsgType::TEXT));
    c.run();
    assert!(matches!(
        c.journals[usize::from(home_b)].pending_records().as_slice(),
        [Record::Message {
            message: Message {
                client_msg_id: 11,
                server_ts_ms: 5_000_000,
                ..
            },
            ..
        }]
    ));
    assert!(c.frames(ca).is_empty());
    assert!(c.frames(cb).is_empty());
    assert_eq!(c.shards[0].stats().routed_cross_shard, 1);
    c.commit(home_b);
    c.run();
    assert_eq!(
        c.frames(ca),
        vec![Frame::ServerAck(frame::ServerAck {
            client_msg_id: 11,
            server_ts_ms: 5_000_000
        })]
    );
    let got = c.frames(cb);
    assert!(
        matches!(got.as_slice(), [Frame::Deliver(frame::Deliver { message: Message { from: DeviceAddr { user: from_user, device: 0 }, client_msg_id: 11, server_ts_ms: 5_000_000, msg_type: MsgType::TEXT, payload }, .. })] if *from_user == a && payload == &Bytes::from_static(b"m11"))
    );
    let s = c.shards[usize::from(home_b)].stats();
    assert_eq!(
        (s.stored, s.delivered, s.mailbox_depth, s.pushes),
        (1, 1, 1, 0)
    );
}

/// Proves an offline recipient gets one push per message and drains in order on login.
#[test]
fn offline_recipient_gets_a_push_and_drains_in_order() {
    let mut c = Cluster::new(2, |_| {});
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    for id in [5, 3, 9] {
        c.frame(ca, send(b, id, MsgType::IMAGE));
    }
    c.settle();
    let pushes = c.pushes();
    assert_eq!(pushes.len(), 3);
    assert!(pushes.iter().all(|p| matches!(p, Action::Push { to: DeviceAddr { user, device: 0 }, from_user, msg_type: MsgType(1) } if *user == b && *from_user == a)));
    let cb = c.login(b, key(b));
    let got = delivers(&c.frames(cb));
    assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![5, 3, 9]);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "seq order");
    c.settle();
    assert!(c.pushes().is_empty(), "no second push");
}

/// Proves dedup: a repeat while pending waits for the original's durability, a repeat after
/// answers at once with the original time, and the window forgets FIFO.
#[test]
fn dedup_window() {
    let mut c = Cluster::new(1, |cfg| cfg.dedup_window_entries = 2);
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    let cb = c.login(b, key(b));
    c.now = 7_000;
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.run();
    c.now = 8_000;
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.run();
    assert!(
        c.frames(ca).is_empty(),
        "the repeat waits for the original to be durable"
    );
    c.commit(0);
    c.run();
    let acks = c.frames(ca);
    assert_eq!(
        acks,
        vec![
            Frame::ServerAck(frame::ServerAck {
                client_msg_id: 1,
                server_ts_ms: 7_000
            });
            2
        ]
    );
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.run();
    assert_eq!(
        c.frames(ca),
        vec![Frame::ServerAck(frame::ServerAck {
            client_msg_id: 1,
            server_ts_ms: 7_000
        })],
        "answered at once"
    );
    assert_eq!(c.shards[0].stats().stored, 1);
    assert_eq!(c.shards[0].stats().dedup_hits, 2);
    assert_eq!(delivers(&c.frames(cb)).len(), 1);

    // Window of 2: after 2 and 3, message 1 is forgotten and stored again.
    c.frame(ca, send(b, 2, MsgType::TEXT));
    c.frame(ca, send(b, 3, MsgType::TEXT));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.settle();
    assert_eq!(c.shards[0].stats().stored, 4);
}

/// Proves the delivery window: at most N unacknowledged, each ack lets one more out; duplicate
/// and unknown acks are ignored.
#[test]
fn delivery_window_flow_control() {
    let mut c = Cluster::new(1, |cfg| cfg.delivery_window_msgs = 2);
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    for id in 1..=5 {
        c.frame(ca, send(b, id, MsgType::TEXT));
    }
    c.settle();
    let cb = c.login(b, key(b));
    let first = delivers(&c.frames(cb));
    assert_eq!(first.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 2]);
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![first[0].0],
        }),
    );
    let next = delivers(&c.frames(cb));
    assert_eq!(next.iter().map(|d| d.1).collect::<Vec<_>>(), vec![3]);
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![first[0].0, 999_999],
        }),
    );
    assert!(c.frames(cb).is_empty(), "a duplicate ack frees nothing");
    assert_eq!(c.shards[0].stats().acked, 1);
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![first[1].0, next[0].0],
        }),
    );
    let rest = delivers(&c.frames(cb));
    assert_eq!(rest.iter().map(|d| d.1).collect::<Vec<_>>(), vec![4, 5]);

    // Reconnecting resends what was in flight.
    let cb2 = c.login(b, key(b));
    assert_eq!(
        delivers(&c.frames(cb2))
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
}

/// Proves an ack tombstones the entry and sends a delivered receipt that waits in the offline
/// sender's mailbox (without a push) until it logs in; acking the receipt ends the chain.
#[test]
fn receipts_queue_for_an_offline_sender() {
    let mut c = Cluster::new(2, |_| {});
    let (a, b) = pair(&mut c);
    let (home_a, home_b) = (home_shard(a, 2), home_shard(b, 2));
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 42, MsgType::TEXT));
    c.settle();
    c.close_conn(ca);
    c.pushes();

    let cb = c.login(b, key(b));
    let (seq, _) = delivers(&c.frames(cb))[0];
    c.now = 9_999;
    c.frame(cb, Frame::Ack(frame::Ack { seqs: vec![seq] }));
    assert!(
        matches!(c.journals[usize::from(home_b)].pending_records().last(), Some(Record::Tombstone { seq: s }) if *s == seq)
    );
    c.frame(
        cb,
        Frame::Read(frame::Read {
            to: Address::device(a, 0),
            client_msg_id: 42,
        }),
    );
    c.settle();
    assert!(c.pushes().is_empty(), "receipts do not push");
    assert_eq!(c.shards[usize::from(home_a)].stats().receipts_stored, 2);
    assert_eq!(c.shards[usize::from(home_a)].stats().mailbox_depth, 2);

    let ca = c.login(a, key(a));
    let got = c.frames(ca);
    let receipts: Vec<_> = got
        .iter()
        .filter_map(|f| match f {
            Frame::Receipt(frame::Receipt {
                seq,
                receipt:
                    ReceiptInfo {
                        from:
                            DeviceAddr {
                                user: from_user,
                                device: 0,
                            },
                        client_msg_id: 42,
                        kind,
                        ts_ms,
                    },
            }) if *from_user == b => Some((*seq, *kind, *ts_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(
        receipts.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
        vec![(ReceiptKind::DELIVERED, 9_999), (ReceiptKind::READ, 9_999)]
    );
    c.frame(
        ca,
        Frame::Ack(frame::Ack {
            seqs: receipts.iter().map(|r| r.0).collect(),
        }),
    );
    assert!(c.mesh.is_empty(), "acking a receipt produces no receipt");
    c.settle();
    assert_eq!(c.shards[usize::from(home_a)].stats().mailbox_depth, 0);
    assert_eq!(c.shards[usize::from(home_b)].stats().mailbox_depth, 0);
}

/// Proves receipts for a sender without an account are dropped.
#[test]
fn receipts_for_unknown_sender_are_dropped() {
    let mut c = Cluster::new(1, |_| {});
    let (a, _) = pair(&mut c);
    c.event(
        0,
        Event::Mesh {
            from: 0,
            msg: MeshMsg::StoreReceipt(StoreReceipt {
                to: DeviceAddr {
                    user: a + 1000,
                    device: 0,
                },
                receipt: ReceiptInfo {
                    from: DeviceAddr { user: a, device: 0 },
                    client_msg_id: 1,
                    kind: ReceiptKind(1),
                    ts_ms: 1,
                },
                sent_at_ms: 0,
            }),
        },
    );
    c.event(
        0,
        Event::Mesh {
            from: 0,
            msg: MeshMsg::StoreReceipt(StoreReceipt {
                to: DeviceAddr { user: a, device: 0 },
                receipt: ReceiptInfo {
                    from: DeviceAddr { user: a, device: 0 },
                    client_msg_id: 1,
                    kind: ReceiptKind(9),
                    ts_ms: 1,
                },
                sent_at_ms: 0,
            }),
        },
    );
    assert_eq!(c.shards[0].stats().receipts_stored, 0);
    assert_eq!(c.journals[0].pending(), 0);
}

/// Proves the cap prunes lowest priority first, oldest first among equals, with tombstones.
#[test]
fn mailbox_cap_prunes_by_priority_then_age() {
    let mut c = Cluster::new(1, |cfg| cfg.mailbox_cap_msgs = 3);
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    let types = [
        MsgType::CALL,
        MsgType::TEXT,
        MsgType::STATUS,
        MsgType::IMAGE,
        MsgType::VOICE,
        MsgType::TEXT,
        MsgType::CALL,
    ];
    for (i, t) in types.iter().enumerate() {
        c.frame(ca, send(b, i as u64 + 1, *t));
    }
    c.settle();
    // Pruned: STATUS (3), then TEXT (2), then the new TEXT (6), then IMAGE (4).
    assert_eq!(c.shards[0].stats().pruned, 4);
    let tombstones = c.journals[0]
        .entries()
        .iter()
        .filter(|e| matches!(e.record, Record::Tombstone { .. }))
        .count();
    assert_eq!(tombstones, 4);
    // Every sender still got its ✓ (the message was accepted, then pruned).
    assert_eq!(c.frames(ca).len(), 7);
    let cb = c.login(b, key(b));
    assert_eq!(
        delivers(&c.frames(cb))
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        vec![1, 5, 7]
    );
    // The prune survives a restart.
    assert_eq!(c.recovered(0).stats().mailbox_depth, 3);
}

/// Proves TTL expiry on Tick, with no record, and the same rule at recovery.
#[test]
fn ttl_expiry_on_tick_and_at_recovery() {
    let mut c = Cluster::new(1, |cfg| cfg.message_ttl_ms = 1_000);
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.settle();
    c.now += 500;
    c.frame(ca, send(b, 2, MsgType::TEXT));
    c.settle();
    let appends = c.shards[0].stats().appends;
    c.now += 500;
    assert_eq!(
        c.recovered(0).stats().mailbox_depth,
        1,
        "recovery drops the expired one too"
    );
    c.tick(0);
    assert_eq!(c.shards[0].stats().expired, 1);
    assert_eq!(c.shards[0].stats().mailbox_depth, 1);
    assert_eq!(
        c.shards[0].stats().appends,
        appends,
        "expiry writes nothing"
    );
    let cb = c.login(b, key(b));
    assert_eq!(
        delivers(&c.frames(cb))
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        vec![2]
    );
}

/// Proves recovery rebuilds mailboxes, accounts, dedup and a seq counter above every seq seen,
/// tombstones included; and that non-durable appends are lost in a crash.
#[test]
fn recovery_rebuilds_state() {
    let mut c = Cluster::new(1, |_| {});
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    for id in 1..=3 {
        c.frame(ca, send(b, id, MsgType::TEXT));
    }
    c.settle();
    let cb = c.login(b, key(b));
    let got = delivers(&c.frames(cb));
    // Ack the newest: its tombstone holds the highest seq in the log.
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![got[2].0],
        }),
    );
    c.settle();
    c.frame(ca, send(b, 4, MsgType::TEXT));
    c.run(); // not committed: lost in the crash
    c.crash(0);
    // Messages 1 and 2, plus the delivered receipt of 3 waiting for a.
    assert_eq!(c.shards[0].stats().mailbox_depth, 3);
    let ca = c.login(a, key(a));
    let cb = c.login(b, key(b));
    assert_eq!(
        delivers(&c.frames(cb))
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Dedup survived: message 3 (acked, tombstoned) is not stored again.
    c.frame(ca, send(b, 3, MsgType::TEXT));
    c.frame(ca, send(b, 4, MsgType::TEXT));
    c.settle();
    assert_eq!(c.shards[0].stats().stored, 1);
    let new = delivers(&c.frames(cb));
    assert_eq!(new.len(), 1);
    assert!(new[0].0 > got[2].0, "seq {} reused after restart", new[0].0);
}

/// Proves recovery keeps one copy of a seq that compaction wrote twice.
#[test]
fn recovery_keeps_one_copy_per_seq() {
    let user = 14_155_550_100;
    let msg = Record::Message {
        seq: 5,
        to: DeviceAddr { user, device: 0 },
        message: Message {
            from: DeviceAddr { user: 1, device: 0 },
            client_msg_id: 1,
            server_ts_ms: 10,
            msg_type: MsgType::TEXT,
            payload: Bytes::new(),
        },
    };
    let mut s = Shard::new(Config::new(0, 1), 1);
    s.recover(
        10,
        &[1, 2],
        vec![
            (at(1, 16), msg.clone()),
            (at(2, 16), msg),
            (at(2, 100), Record::Tombstone { seq: 9 }),
        ],
    );
    assert_eq!(s.stats().mailbox_depth, 1);
}

// ----- storage lifecycle ----------------------------------------------------------------------

fn message(seq: u64, to_user: u64) -> Record {
    Record::Message {
        seq,
        to: DeviceAddr {
            user: to_user,
            device: 0,
        },
        message: Message {
            from: DeviceAddr {
                user: 14_155_559_999,
                device: 0,
            },
            client_msg_id: seq,
            server_ts_ms: 1_000_000,
            msg_type: MsgType::TEXT,
            payload: Bytes::new(),
        },
    }
}

fn account(user: u64) -> [Record; 2] {
    [
        Record::Account {
            user,
            device: 0,
            static_key: key(user),
            ts_ms: 1,
        },
        Record::KeyBinding {
            static_key: key(user),
            user,
            device: 0,
            ts_ms: 1,
        },
    ]
}

/// A one-shard cluster whose journal already holds `records` (durable), recovered.
fn preloaded(records: Vec<(u32, Record)>, tweak: impl Fn(&mut Config)) -> Cluster {
    let mut c = Cluster::new(1, tweak);
    c.journals[0] = TestJournal::with_durable(1000, records);
    c.crash(0);
    c
}

/// Proves segments are deleted only when they hold nothing live and every older one is gone,
/// and never the active one.
#[test]
fn segments_are_deleted_oldest_first() {
    let b = 14_155_550_100;
    let [acc, bind] = account(b);
    let mut c = preloaded(
        vec![
            (1, message(1, b)),
            (1, message(2, b)),
            (2, acc),
            (2, bind),
            (3, message(3, b)),
        ],
        // Without a dedup window: it would keep the acked messages' segments (own test).
        |cfg| {
            cfg.compaction_live_ratio = 0.0;
            cfg.dedup_window_entries = 0;
        },
    );
    let cb = c.login(b, key(b));
    let got = delivers(&c.frames(cb));
    assert_eq!(got.len(), 3);
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![got[2].0],
        }),
    );
    c.settle();
    c.tick(0);
    assert!(
        c.journals[0].deleted.is_empty(),
        "segment 3 is empty but 1 and 2 are older and live"
    );
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![got[0].0, got[1].0],
        }),
    );
    c.settle();
    c.tick(0);
    assert_eq!(
        c.journals[0].deleted,
        vec![1],
        "2 holds the account, so 3 must wait"
    );
    assert_eq!(c.shards[0].stats().segments_deleted, 1);
    c.tick(0);
    assert_eq!(c.journals[0].deleted, vec![1]);
}

/// Proves compaction re-appends the live records of a sparse oldest segment, deletes it only
/// once the copies are durable, and that the state survives a restart either side of that.
#[test]
fn compaction_waits_for_durability() {
    let b = 14_155_550_100;
    let [acc, bind] = account(b);
    let records = vec![
        (1, message(1, b)),
        (1, message(2, b)),
        (1, message(3, b)),
        (1, message(4, b)),
        (1, acc),
        (1, bind),
    ];
    // Without a dedup window: it would keep the acked messages' segment (own test).
    let mut c = preloaded(records, |cfg| {
        cfg.compaction_live_ratio = 0.6;
        cfg.dedup_window_entries = 0;
    });
    let cb = c.login(b, key(b));
    let got = delivers(&c.frames(cb));
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![got[0].0, got[1].0],
        }),
    );
    c.settle();
    c.tick(0);
    assert_eq!(
        c.shards[0].stats().segments_compacted,
        0,
        "4/6 live is above 0.6"
    );
    c.frame(
        cb,
        Frame::Ack(frame::Ack {
            seqs: vec![got[2].0],
        }),
    );
    c.settle();
    c.tick(0);
    let copies = c.journals[0].pending_records();
    assert_eq!(
        copies.len(),
        4,
        "message 4, the account, the binding and a seq marker: {copies:?}"
    );
    assert!(
        matches!(copies.last(), Some(Record::Tombstone { seq: 5 })),
        "marker above every seq"
    );
    assert!(copies.contains(&message(4, b)));
    assert!(
        c.journals[0].deleted.is_empty(),
        "not before the copies are durable"
    );
    assert_eq!(
        c.recovered(0).stats().mailbox_depth,
        1,
        "a crash now still finds the original"
    );
    c.tick(0);
    assert!(c.journals[0].deleted.is_empty());
    c.commit(0);
    assert_eq!(c.journals[0].deleted, vec![1]);
    assert_eq!(c.shards[0].stats().segments_compacted, 1);

    // After a restart the copies carry the state: the account logs in, message 4 is there once.
    c.crash(0);
    assert_eq!(c.shards[0].stats().mailbox_depth, 1);
    let cb = c.login(b, key(b));
    assert_eq!(delivers(&c.frames(cb)), vec![(4, 4)]);
    // The entry moved: acking it leaves the new segment with only the account and binding.
    c.frame(cb, Frame::Ack(frame::Ack { seqs: vec![4] }));
    c.settle();
    assert_eq!(c.recovered(0).stats().mailbox_depth, 0);
}

/// Proves the dedup window outlives the segments of the messages it remembers: a segment whose
/// messages were all delivered and acknowledged is kept while the window remembers them, then
/// compacted into `Dedup` markers and deleted; after a restart a retry of one of those messages
/// is answered with its original time and is not stored again.
#[test]
fn dedup_window_outlives_deleted_segments() {
    let (a, b) = (14_155_559_999, 14_155_550_100);
    let [acc_a, bind_a] = account(a);
    let [acc_b, bind_b] = account(b);
    // Segment 1: two messages and four dead records (tombstones of other entries), so once the
    // messages are acknowledged only the window still needs it: 2 of 6 records carried.
    let records = vec![
        (1, message(1, b)),
        (1, message(2, b)),
        (1, Record::Tombstone { seq: 90 }),
        (1, Record::Tombstone { seq: 91 }),
        (1, Record::Tombstone { seq: 92 }),
        (1, Record::Tombstone { seq: 93 }),
        (2, acc_a),
        (2, bind_a),
        (2, acc_b),
        (2, bind_b),
    ];
    let mut c = preloaded(records, |cfg| cfg.compaction_live_ratio = 0.5);
    let cb = c.login(b, key(b));
    let got = delivers(&c.frames(cb));
    assert_eq!(got.len(), 2);
    c.frame(cb, Frame::Ack(frame::Ack { seqs: vec![1, 2] }));
    c.settle();
    c.tick(0);
    let copies = c.journals[0].pending_records();
    assert!(
        copies.contains(&Record::Dedup {
            seq: 1,
            from: DeviceAddr::new(a, 0),
            client_msg_id: 1,
            ts_ms: 1_000_000,
        }),
        "the window's entries are carried forward as markers: {copies:?}"
    );
    assert!(
        c.journals[0].deleted.is_empty(),
        "not before the markers are durable"
    );
    c.commit(0);
    c.tick(0);
    assert_eq!(
        c.journals[0].deleted,
        vec![1],
        "segment 1 held only remembered messages"
    );

    c.crash(0);
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 2, MsgType::TEXT));
    c.settle();
    let acks: Vec<Frame> = c.frames(ca);
    assert!(
        acks.iter().any(|f| matches!(
            f,
            Frame::ServerAck(frame::ServerAck {
                client_msg_id: 2,
                server_ts_ms: 1_000_000
            })
        )),
        "the retry gets the original time: {acks:?}"
    );
    assert_eq!(c.shards[0].stats().stored, 0, "and is not stored again");
    assert_eq!(c.shards[0].stats().dedup_hits, 1);
}

/// Proves a segment whose records are all still needed by the dedup window is not compacted:
/// copying its `Dedup` records would free nothing (and did, before: each Tick moved them into
/// the next segment again).
#[test]
fn remembered_dedup_records_are_not_compacted_again() {
    let (a, b) = (14_155_559_999, 14_155_550_100);
    let [acc_a, bind_a] = account(a);
    let [acc_b, bind_b] = account(b);
    let dedup = |seq| Record::Dedup {
        seq,
        from: DeviceAddr::new(a, 0),
        client_msg_id: seq,
        ts_ms: 1_000_000,
    };
    let records = vec![
        (1, dedup(1)),
        (1, dedup(2)),
        (1, dedup(3)),
        (2, acc_a),
        (2, bind_a),
        (2, acc_b),
        (2, bind_b),
    ];
    let mut c = preloaded(records, |cfg| cfg.compaction_live_ratio = 0.5);
    for _ in 0..3 {
        c.tick(0);
        c.commit(0);
    }
    assert_eq!(c.shards[0].stats().segments_compacted, 0);
    assert!(c.journals[0].deleted.is_empty());
    assert_eq!(c.shards[0].stats().dedup_entries, 3);
}

/// Proves the next seq after a restart is above a seq that survives only as a tombstone (its
/// message's segment already deleted): seqs are never reused.
#[test]
fn next_seq_is_above_tombstoned_seqs() {
    let (a, b) = (14_155_550_100, 14_155_550_200);
    let [acc_a, bind_a] = account(a);
    let [acc_b, bind_b] = account(b);
    let mut c = preloaded(
        vec![
            (2, acc_a),
            (2, bind_a),
            (2, acc_b),
            (2, bind_b),
            (3, Record::Tombstone { seq: 50 }),
        ],
        |_| {},
    );
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.settle();
    let cb = c.login(b, key(b));
    assert_eq!(delivers(&c.frames(cb)), vec![(51, 1)]);
}

/// Proves seqs are not reused when every record that carried the highest seq (a message and
/// its tombstone) has been deleted: deletion waits for a newer durable seq marker.
#[test]
fn seqs_survive_segment_deletion() {
    let (a, b) = (14_155_550_100, 14_155_550_200);
    let [acc_a, bind_a] = account(a);
    let [acc_b, bind_b] = account(b);
    let records = vec![
        (1, message(7, b)),
        (2, Record::Tombstone { seq: 7 }),
        (3, acc_a),
        (3, bind_a),
        (3, acc_b),
        (3, bind_b),
    ];
    // Without a dedup window: it would keep message 7's segment (own test).
    let mut c = preloaded(records, |cfg| cfg.dedup_window_entries = 0);
    c.tick(0);
    assert_eq!(
        c.journals[0].deleted,
        vec![1],
        "segment 2 holds the high-water seq"
    );
    assert_eq!(
        c.journals[0].pending_records(),
        vec![Record::Tombstone { seq: 8 }]
    );
    c.tick(0);
    assert_eq!(
        c.journals[0].deleted,
        vec![1],
        "not before the marker is durable"
    );
    assert_eq!(c.journals[0].pending(), 1, "one marker at a time");
    c.commit(0);
    c.tick(0);
    assert_eq!(c.journals[0].deleted, vec![1, 2]);
    c.crash(0);
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.settle();
    let cb = c.login(b, key(b));
    assert_eq!(delivers(&c.frames(cb)), vec![(9, 1)]);
}

/// Proves a poisoned shard refuses writes, fails what waited for durability, and keeps
/// delivering what was already durable.
#[test]
fn storage_failure_poisons_writes_but_not_deliveries() {
    let mut c = Cluster::new(2, |_| {});
    let (a, b) = pair(&mut c);
    let home_b = home_shard(b, 2);
    let ca = c.login(a, key(a));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.settle();
    c.frame(ca, send(b, 2, MsgType::TEXT));
    c.run();
    c.event(
        home_b,
        Event::StorageFailed {
            reason: "fsync: EIO".into(),
        },
    );
    assert_eq!(c.shards[usize::from(home_b)].poisoned(), Some("fsync: EIO"));
    c.frame(ca, send(b, 3, MsgType::TEXT));
    c.settle();
    let got: Vec<_> = c
        .frames(ca)
        .into_iter()
        .map(|f| match f {
            Frame::ServerAck(frame::ServerAck { client_msg_id, .. }) => (client_msg_id, None),
            Frame::Error(frame::Error { code, ref_id, .. }) => (ref_id, ErrorCode::from_u16(code)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, None),
            (2, Some(ErrorCode::StorageUnavailable)),
            (3, Some(ErrorCode::StorageUnavailable))
        ]
    );
    let cb = c.login(b, key(b));
    assert_eq!(
        delivers(&c.frames(cb))
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        vec![1]
    );
    // Registration at the poisoned home fails too.
    let frames = c.register_via(0, user_on(home_b, 2, 3), key(1234));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![ErrorCode::StorageUnavailable]
    );
}

/// Proves a peer restart closes exactly the connections waiting on that peer.
#[test]
fn peer_restart_closes_connections_waiting_on_it() {
    let mut c = Cluster::new(2, |_| {});
    let a = user_on(0, 2, 0);
    let a2 = user_on(0, 2, 1);
    let b = user_on(1, 2, 0);
    for u in [a, a2, b] {
        c.register(u, key(u));
    }
    let ca = c.login(a, key(a));
    let ca2 = c.login(a2, key(a2));
    c.frame(ca, send(b, 1, MsgType::TEXT));
    c.frame(ca2, send(a, 1, MsgType::TEXT)); // local: waits on shard 0 only
    c.event(0, Event::PeerRestarted { shard: 1 });
    assert_eq!(c.closed(ca), Some(ErrorCode::Internal));
    assert_eq!(c.closed(ca2), None);
    // Once the result came back, nothing waits any more.
    c.settle();
    let ca3 = c.login(a2, key(a2));
    c.frame(ca3, send(b, 2, MsgType::TEXT));
    c.settle();
    c.event(0, Event::PeerRestarted { shard: 1 });
    assert_eq!(c.closed(ca3), None);
}

// ----- the driver boundary --------------------------------------------------------------------

/// Proves that a shard never sends a mesh message to itself through the driver (it handles its
/// own inside the state machine), and that a login is announced by `Action::LoggedIn` before the
/// `Welcome` goes out.
#[test]
fn same_shard_mesh_stays_inside_and_login_is_an_action() {
    let mut c = Cluster::new(1, |_| {});
    let (a, b) = pair(&mut c);
    let _conn_b = c.login(b, key(b));
    let conn_a = c.connect(0, key(a), ip(2));
    c.frame(
        conn_a,
        Frame::Login(frame::Login {
            addr: DeviceAddr { user: a, device: 0 },
            revision: 1,
            capabilities: capability::MESSAGING,
        }),
    );
    let actions: Vec<Action> = c.out.iter().map(|(_, x)| x.clone()).collect();
    let logged_in = actions
        .iter()
        .position(|x| matches!(x, Action::LoggedIn { conn, addr: DeviceAddr { user, device: 0 } } if *conn == conn_a && *user == a))
        .expect("LoggedIn for the connection");
    let welcome = actions
        .iter()
        .position(
            |x| matches!(x, Action::Send { conn, frame: Frame::Welcome { .. } } if *conn == conn_a),
        )
        .expect("Welcome for the connection");
    assert!(logged_in < welcome, "LoggedIn must precede the Welcome");
    c.frame(conn_a, send(b, 1, MsgType::TEXT));
    c.settle();
    assert_eq!(
        c.self_mesh, 0,
        "a shard sent itself a mesh message through the driver"
    );
    assert!(
        c.frames(conn_a).iter().any(|f| matches!(
            f,
            Frame::ServerAck(frame::ServerAck {
                client_msg_id: 1,
                ..
            })
        )),
        "the local store was acknowledged"
    );
}

// ----- cold mailbox entries -------------------------------------------------------------------

/// A message record for `to_user` whose payload names its seq.
fn message_with_payload(seq: u64, to_user: u64) -> Record {
    let mut rec = message(seq, to_user);
    if let Record::Message { message, .. } = &mut rec {
        message.payload = Bytes::from(format!("payload of {seq}").repeat(8));
    }
    rec
}

/// The payloads of the `Deliver` frames in `frames`, by seq.
fn delivered_payloads(frames: &[Frame]) -> Vec<(u64, Bytes)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(frame::Deliver { seq, message }) => {
                Some((*seq, message.payload.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Proves an offline recipient's entries go cold (their content is not kept in memory) and
/// are delivered, in order and intact, only once their records have been read back.
#[test]
fn cold_entry_is_delivered_after_a_read() {
    let mut c = Cluster::new(1, |_| {});
    let (a, b) = pair(&mut c);
    let ca = c.login(a, key(a));
    for id in 1..=3 {
        c.frame(ca, send(b, id, MsgType::TEXT));
    }
    c.settle();
    c.tick(0);
    assert_eq!(c.shards[0].stats().mailbox_depth, 3);
    assert_eq!(c.shards[0].stats().mailbox_hot, 0, "offline: all cold");
    c.hold_reads = true;
    let cb = c.login(b, key(b));
    assert!(
        delivers(&c.frames(cb)).is_empty(),
        "nothing before the read"
    );
    assert_eq!(c.reads.len(), 1, "one batch for the window");
    c.answer_reads();
    let got = delivered_payloads(&c.frames(cb));
    let want: Vec<Bytes> = (1..=3).map(|id| Bytes::from(format!("m{id}"))).collect();
    assert_eq!(got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), want);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "seq order");
    assert_eq!(c.shards[0].stats().records_read, 3);
}

/// Proves a failed record read is counted, keeps the entry queued and is retried on the next
/// Tick, after which the entry is delivered intact.
#[test]
fn failed_read_is_retried_and_counted() {
    let b = 14_155_550_100;
    let [acc, bind] = account(b);
    let records = vec![
        (1, message_with_payload(1, b)),
        (1, message_with_payload(2, b)),
        (1, acc),
        (1, bind),
    ];
    let mut c = preloaded(records, |_| {});
    c.fail_reads = 1;
    let cb = c.login(b, key(b));
    assert!(
        delivers(&c.frames(cb)).is_empty(),
        "seq 1 failed: nothing passes it"
    );
    let stats = c.shards[0].stats();
    assert_eq!((stats.record_read_failures, stats.mailbox_depth), (1, 2));
    c.tick(0);
    let got = delivered_payloads(&c.frames(cb));
    let want: Vec<(u64, Bytes)> = [1, 2]
        .iter()
        .map(|&s| match message_with_payload(s, b) {
            Record::Message { message, .. } => (s, message.payload),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(c.shards[0].stats().record_read_failures, 1);
}

/// Proves compaction of a segment with cold live entries reads their records back and copies
/// them intact (same seq, same content); an entry acked while the reads are outstanding is not
/// copied; a failed read abandons the compaction, which a later Tick retries.
#[test]
fn compaction_copies_cold_entries_intact() {
    let b = 14_155_550_100;
    let [acc, bind] = account(b);
    let mut records: Vec<(u32, Record)> =
        (1..=6).map(|s| (1, message_with_payload(s, b))).collect();
    records.extend([(1, acc), (1, bind)]);
    let mut c = preloaded(records, |cfg| {
        cfg.compaction_live_ratio = 0.99;
        cfg.dedup_window_entries = 0;
        cfg.delivery_window_msgs = 1;
    });
    let cb = c.login(b, key(b));
    assert_eq!(delivers(&c.frames(cb)), vec![(1, 1)]);
    c.frame(cb, Frame::Ack(frame::Ack { seqs: vec![1] }));
    c.settle();
    let _ = c.frames(cb);
    // Entries 3..=6 are cold (2 is hot: read for the window). A failed read abandons.
    c.fail_reads = 1;
    c.tick(0);
    assert_eq!(c.shards[0].stats().compactions_abandoned, 1);
    assert!(c.journals[0].pending_records().is_empty(), "nothing copied");
    c.settle();
    c.hold_reads = true;
    c.tick(0);
    assert_eq!(c.reads.len(), 1, "the compaction's reads");
    // Acked while the reads are outstanding: not copied.
    c.frame(cb, Frame::Ack(frame::Ack { seqs: vec![2] }));
    c.answer_reads();
    c.hold_reads = false;
    let copies: Vec<Record> = c.journals[0]
        .pending_records()
        .into_iter()
        .filter(|r| matches!(r, Record::Message { .. }))
        .collect();
    let want: Vec<Record> = (3..=6).map(|s| message_with_payload(s, b)).collect();
    assert_eq!(copies, want, "cold entries copied byte for byte, 2 skipped");
    c.settle();
    c.tick(0);
    // Segment 2 is the empty one the preloading restart sealed.
    assert_eq!(c.journals[0].deleted, vec![1, 2]);
    assert_eq!(c.shards[0].stats().segments_compacted, 1);
    // After a restart the copies are what is delivered.
    c.crash(0);
    let cb = c.login(b, key(b));
    let got = delivered_payloads(&c.frames(cb));
    assert_eq!(got.first().map(|g| g.0), Some(3));
}

/// Every event, action and mesh message is moved several times on its way through a shard, so
/// the big rare kinds are boxed (`PrekeyUpload`'s and `LinkApprove`'s keys, `StoreMulti`).
/// These bounds are today's sizes: a new kind that makes the common ones bigger must box.
#[test]
fn hot_types_stay_small() {
    use std::mem::size_of;
    assert!(
        size_of::<protocol::Frame>() <= 88,
        "{}",
        size_of::<protocol::Frame>()
    );
    assert!(size_of::<MeshMsg>() <= 112, "{}", size_of::<MeshMsg>());
    assert!(size_of::<Event>() <= 120, "{}", size_of::<Event>());
    assert!(size_of::<Action>() <= 120, "{}", size_of::<Action>());
}
