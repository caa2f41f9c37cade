//! The SDK's multi-device side against scripted fake servers: `SendMulti` fan-out with sync
//! copies, the stale-list retry (same id, bounded), linking a new device (the identity in the
//! link string is the one it publishes) and approving it on the primary (signature, typed
//! refusals), device-list events, per-device receipts, `READ_ELSEWHERE`, sync copies on
//! receive, and `DeviceRemoved`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{welcome, FakeConn, FakeServer};
use protocol::frame::{DeviceEntry, DeviceListReason, PrekeyStatusReason, ReceiptKind};
use protocol::{capability, frame, DeviceAddr, ErrorCode, Frame, Message, MsgType, ReceiptInfo};
use switchboard_client::devices::{unwrap_sync, wrap_sync};
use switchboard_client::e2ee::{sign_device, verify_device_signature, IdentityKeyPair};
use switchboard_client::{
    Connection, Error, Event, Identity, LinkRefusal, LinkString, ServerKeyPolicy, Session,
    SessionOptions, Timeouts,
};

const ALICE: u64 = 14155550100;
const BOB: u64 = 14155550101;

fn timeouts() -> Timeouts {
    Timeouts {
        request: Duration::from_secs(5),
        close_linger: Duration::from_millis(200),
        ..Timeouts::default()
    }
}

/// Answers `Login` with a `Welcome` granting what was asked (MULTI_DEVICE included).
fn welcome_multi(c: &mut FakeConn) -> (u64, u16) {
    match c.recv() {
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device },
            capabilities,
            ..
        }) => {
            assert_ne!(capabilities & capability::MULTI_DEVICE, 0);
            let mut w = welcome(user, device, 30_000, 16_384);
            if let Frame::Welcome(frame::Welcome {
                capabilities: granted,
                ..
            }) = &mut w
            {
                *granted = capabilities;
            }
            c.send(&w);
            (user, device)
        }
        other => panic!("expected Login, got {other:?}"),
    }
}

fn entry(device: u16) -> DeviceEntry {
    DeviceEntry {
        device,
        linked_at_ms: 1_000 + u64::from(device),
        identity_dh: [0; 32],
        identity_sign: [0; 32],
        signature: [0; 64],
    }
}

fn list(request_id: u64, user: u64, version: u32, reason: DeviceListReason, ids: &[u16]) -> Frame {
    Frame::DeviceList(frame::DeviceList {
        request_id,
        user,
        version,
        reason,
        devices: ids.iter().map(|&d| entry(d)).collect(),
    })
}

/// Answers one `DeviceListFetch` for `user` with `ids`.
fn answer_fetch(c: &mut FakeConn, user: u64, ids: &[u16]) {
    match c.recv() {
        Frame::DeviceListFetch(frame::DeviceListFetch {
            request_id,
            user: u,
        }) => {
            assert_eq!(u, user);
            c.send(&list(request_id, user, 1, DeviceListReason::FETCHED, ids));
        }
        other => panic!("expected DeviceListFetch, got {other:?}"),
    }
}

fn expect_send_multi(c: &mut FakeConn) -> frame::SendMulti {
    loop {
        match c.recv() {
            Frame::SendMulti(m) => return m,
            Frame::Ack(_) | Frame::Ping(_) => {}
            other => panic!("expected SendMulti, got {other:?}"),
        }
    }
}

fn copy(m: &frame::SendMulti, own: bool, device: u16) -> Bytes {
    m.copies
        .iter()
        .find(|c| c.own == own && c.device == device)
        .unwrap_or_else(|| panic!("no copy own={own} device={device} in {:?}", m.copies))
        .payload
        .clone()
}

fn plaintext_login(server: &FakeServer) -> Session {
    Connection::connect(server.addr, &Identity::ephemeral(), timeouts())
        .unwrap()
        .login_with(ALICE, 0, SessionOptions::default())
        .unwrap()
}

/// A send to a user is one SendMulti: a copy per recipient device and a sync copy per other
/// own device. Refused as stale (Bob linked a device), it is sent again with the same id and
/// a copy for the new device, and the ✓ then arrives.
#[test]
fn send_multi_fans_out_and_retries_a_stale_list_with_the_same_id() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_multi(&mut c);
        answer_fetch(&mut c, ALICE, &[0, 1]);
        answer_fetch(&mut c, BOB, &[0]);
        let first = expect_send_multi(&mut c);
        assert_eq!(first.to_user, BOB);
        assert_eq!(first.copies.len(), 2);
        assert_eq!(&copy(&first, false, 0)[..], b"hi bob");
        let sync = copy(&first, true, 1);
        assert_eq!(unwrap_sync(&sync), Some((BOB, &b"hi bob"[..])));
        // Bob has linked device 1 meanwhile.
        let id = first.client_msg_id;
        c.send(&list(id, BOB, 2, DeviceListReason::STALE, &[0, 1]));
        c.send(&Frame::error(ErrorCode::DeviceListStale, id, "stale"));
        let second = expect_send_multi(&mut c);
        assert_eq!(second.client_msg_id, id, "a retry reuses the id");
        assert_eq!(second.copies.len(), 3);
        assert_eq!(&copy(&second, false, 1)[..], b"hi bob");
        assert_eq!(copy(&second, true, 1), sync);
        c.send(&Frame::ServerAck(frame::ServerAck {
            client_msg_id: id,
            server_ts_ms: 42,
        }));
        // Receipts from both of Bob's devices.
        for (seq, device, kind) in [
            (1, 1, ReceiptKind::DELIVERED),
            (2, 0, ReceiptKind::DELIVERED),
            (3, 1, ReceiptKind::READ),
        ] {
            c.send(&Frame::Receipt(frame::Receipt {
                seq,
                receipt: ReceiptInfo {
                    from: DeviceAddr::new(BOB, device),
                    client_msg_id: id,
                    kind,
                    ts_ms: 100 + seq,
                },
            }));
        }
        c.expect_eof();
    });
    let mut s = plaintext_login(&server);
    assert!(s.is_multi_device());
    let id = s.send(BOB, b"hi bob", MsgType::TEXT).unwrap();
    assert_eq!(s.wait_server_ack(id, Duration::from_secs(5)).unwrap(), 42);
    assert!(s.outbox().is_empty());
    assert_eq!(s.cached_devices(BOB).unwrap().ids(), vec![0, 1]);
    let mut firsts = Vec::new();
    for _ in 0..3 {
        match s.recv(Some(Duration::from_secs(5))).unwrap().unwrap() {
            Event::Delivered { by, first, .. } => firsts.push(("delivered", by.device, first)),
            Event::Read { by, first, .. } => firsts.push(("read", by.device, first)),
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    assert_eq!(
        firsts,
        vec![
            ("delivered", 1, true),
            ("delivered", 0, false),
            ("read", 1, true)
        ]
    );
    let r = s.receipts(id).unwrap();
    assert_eq!(r.delivered.len(), 2);
    assert_eq!(
        r.read.keys().copied().collect::<Vec<_>>(),
        vec![DeviceAddr::new(BOB, 1)]
    );
    s.close().unwrap();
    server.join();
}

/// A list that changes under every attempt: after STALE_RETRIES_MAX retries the send fails
/// with a typed error and leaves the outbox.
#[test]
fn stale_retries_are_bounded() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_multi(&mut c);
        answer_fetch(&mut c, ALICE, &[0]);
        answer_fetch(&mut c, BOB, &[0]);
        let mut version = 1;
        let mut id = 0;
        for attempt in 0..=switchboard_client::session::STALE_RETRIES_MAX {
            let m = expect_send_multi(&mut c);
            if attempt > 0 {
                assert_eq!(m.client_msg_id, id);
            }
            id = m.client_msg_id;
            version += 1;
            // Alternately one and two devices: always different from what was sent.
            let ids: &[u16] = if m.copies.len() == 1 { &[0, 1] } else { &[0] };
            c.send(&list(id, BOB, version, DeviceListReason::STALE, ids));
            c.send(&Frame::error(ErrorCode::DeviceListStale, id, "stale"));
        }
        // No fifth attempt.
        loop {
            match c.next(Duration::from_secs(5)) {
                common::Next::Frame(Frame::SendMulti(_)) => panic!("retried too often"),
                common::Next::Frame(_) => {}
                common::Next::Eof => break,
                common::Next::Timeout => panic!("client did not close"),
            }
        }
    });
    let mut s = plaintext_login(&server);
    let id = s.send(BOB, b"x", MsgType::TEXT).unwrap();
    match s.wait_server_ack(id, Duration::from_secs(5)) {
        Err(Error::DeviceListStale { client_msg_id, .. }) => assert_eq!(client_msg_id, id),
        other => panic!("expected DeviceListStale, got {other:?}"),
    }
    assert!(s.outbox().is_empty());
    s.close().unwrap();
    server.join();
}

/// Receiving: a message from another own device is a sync copy; READ_ELSEWHERE and a
/// changed list are events; `mark_read` answers the sending device; DeviceRemoved is typed.
#[test]
fn sync_copies_read_elsewhere_changes_and_removal() {
    let server = FakeServer::start(|l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_multi(&mut c);
        let deliver = |seq, from: DeviceAddr, id, payload: Vec<u8>| {
            Frame::Deliver(frame::Deliver {
                seq,
                message: Message {
                    from,
                    client_msg_id: id,
                    server_ts_ms: 5,
                    msg_type: MsgType::TEXT,
                    payload: Bytes::from(payload),
                },
            })
        };
        c.send(&deliver(
            1,
            DeviceAddr::new(ALICE, 1),
            7,
            wrap_sync(BOB, b"sent from phone 2"),
        ));
        c.send(&deliver(
            2,
            DeviceAddr::new(BOB, 2),
            8,
            b"from bob's tablet".to_vec(),
        ));
        c.send(&Frame::Receipt(frame::Receipt {
            seq: 3,
            receipt: ReceiptInfo {
                from: DeviceAddr::new(BOB, 2),
                client_msg_id: 8,
                kind: ReceiptKind::READ_ELSEWHERE,
                ts_ms: 6,
            },
        }));
        c.send(&list(0, ALICE, 3, DeviceListReason::CHANGED, &[0, 1, 2]));
        // The Read goes to the device that sent message 8.
        loop {
            match c.recv() {
                Frame::Read(frame::Read { to, client_msg_id }) => {
                    assert_eq!(to, protocol::Address::device(BOB, 2));
                    assert_eq!(client_msg_id, 8);
                    break;
                }
                Frame::Ack(_) | Frame::Ping(_) => {}
                other => panic!("expected Read, got {other:?}"),
            }
        }
        c.send(&Frame::error(ErrorCode::DeviceRemoved, 0, "removed"));
    });
    let mut s = plaintext_login(&server);
    let mut next = || s.recv(Some(Duration::from_secs(5))).unwrap().unwrap();
    match next() {
        Event::SyncCopy { to_user, message } => {
            assert_eq!(to_user, BOB);
            assert_eq!(message.from, DeviceAddr::new(ALICE, 1));
            assert_eq!(&message.payload[..], b"sent from phone 2");
        }
        other => panic!("expected a sync copy, got {other:?}"),
    }
    assert!(matches!(next(), Event::Message(m) if m.from == DeviceAddr::new(BOB, 2)));
    assert_eq!(
        next(),
        Event::ReadElsewhere {
            from: DeviceAddr::new(BOB, 2),
            client_msg_id: 8,
            ts_ms: 6
        }
    );
    match next() {
        Event::DevicesChanged {
            user,
            version,
            added,
            removed,
        } => {
            assert_eq!((user, version), (ALICE, 3));
            assert_eq!(added, vec![0, 1, 2], "first list seen");
            assert!(removed.is_empty());
        }
        other => panic!("expected DevicesChanged, got {other:?}"),
    }
    assert_eq!(s.cached_devices(ALICE).unwrap().version, 3);
    s.mark_read(BOB, 8).unwrap();
    match s.recv(Some(Duration::from_secs(5))) {
        Err(Error::DeviceRemoved { user, device }) => assert_eq!((user, device), (ALICE, 0)),
        other => panic!("expected DeviceRemoved, got {other:?}"),
    }
    assert!(s.is_closed());
    server.join();
}

/// A new device asks for a code, gets a link string carrying its static key and a fresh
/// identity, is registered when approved, and then publishes exactly that identity.
#[test]
fn linking_a_new_device_publishes_the_identity_of_its_link_string() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let (link_tx, link_rx) = std::sync::mpsc::channel::<()>();
    let (uploaded_tx, uploaded_rx) = std::sync::mpsc::channel::<([u8; 32], [u8; 32])>();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        match c.recv() {
            Frame::LinkRequest(frame::LinkRequest { request_id }) => {
                c.send(&Frame::LinkCode(frame::LinkCode {
                    request_id,
                    code: 0xabcd_0001,
                    expires_in_s: 60,
                }));
            }
            other => panic!("expected LinkRequest, got {other:?}"),
        }
        link_rx.recv().unwrap();
        c.send(&Frame::Registered(frame::Registered {
            addr: DeviceAddr::new(ALICE, 1),
        }));
        let (user, device) = welcome_multi(&mut c);
        assert_eq!((user, device), (ALICE, 1));
        match c.recv() {
            Frame::PrekeyUpload(frame::PrekeyUpload { keys, .. }) => {
                uploaded_tx
                    .send((keys.identity_dh, keys.identity_sign))
                    .unwrap();
                c.send(&Frame::PrekeyStatus(frame::PrekeyStatus {
                    one_time_remaining: 3,
                    low_water: 1,
                    reason: PrekeyStatusReason::UPLOADED,
                }));
            }
            other => panic!("expected PrekeyUpload, got {other:?}"),
        }
        c.expect_eof();
    });
    let mut conn = Connection::connect(server.addr, &identity, timeouts()).unwrap();
    let offer = conn.request_link().unwrap();
    assert_eq!(offer.code, 0xabcd_0001);
    assert_eq!(offer.link.code, offer.code);
    assert_eq!(offer.link.static_key, identity.public_key());
    let parsed = LinkString::parse(&offer.link.to_string()).unwrap();
    assert_eq!(parsed, offer.link);
    // Not approved yet: a bounded wait that keeps the connection.
    assert!(matches!(
        conn.wait_linked(Duration::from_millis(200)),
        Err(Error::Timeout { .. })
    ));
    link_tx.send(()).unwrap();
    let account = conn.wait_linked(Duration::from_secs(5)).unwrap();
    assert_eq!((account.user, account.device), (ALICE, 1));
    assert_eq!(identity.account().unwrap(), Some(account));
    let options = SessionOptions {
        e2ee: true,
        prekey_top_up: 3,
        ..SessionOptions::default()
    };
    let mut s = conn.login_with(ALICE, 1, options).unwrap();
    assert_eq!(s.e2ee().unwrap().identity(), offer.link.identity);
    s.upload_prekeys(3).unwrap();
    let (dh, sign) = uploaded_rx.recv().unwrap();
    assert_eq!(
        (dh, sign),
        (offer.link.identity.dh, offer.link.identity.sign)
    );
    s.close().unwrap();
    server.join();
    // A second link on the same state directory is refused.
    let server = FakeServer::start(|l, key| {
        let c = FakeConn::accept(&l, &key);
        drop(c);
    });
    let mut conn =
        Connection::connect_with(server.addr, &identity, timeouts(), ServerKeyPolicy::Repin)
            .unwrap();
    assert!(matches!(
        conn.request_link(),
        Err(Error::AlreadyRegistered { .. })
    ));
    drop(conn);
    server.join();
}

/// The primary signs the new device's identity with its own (published) identity; the
/// server's refusals are typed; DeviceLinked returns the new address.
#[test]
fn approving_a_link_signs_the_new_identity() {
    let companion = IdentityKeyPair::generate(&mut rand::rngs::OsRng).public();
    let link = LinkString {
        code: 77,
        static_key: [3u8; 32],
        identity: companion,
    };
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_multi(&mut c);
        let primary_sign = match c.recv() {
            Frame::PrekeyUpload(frame::PrekeyUpload { keys, .. }) => {
                c.send(&Frame::PrekeyStatus(frame::PrekeyStatus {
                    one_time_remaining: 3,
                    low_water: 1,
                    reason: PrekeyStatusReason::UPLOADED,
                }));
                keys.identity_sign
            }
            other => panic!("expected PrekeyUpload, got {other:?}"),
        };
        for answer in [Some(ErrorCode::LinkCodeExpired), None] {
            let approve = loop {
                match c.recv() {
                    Frame::LinkApprove(a) => break a,
                    Frame::Ack(_) | Frame::Ping(_) => {}
                    other => panic!("expected LinkApprove, got {other:?}"),
                }
            };
            assert_eq!(approve.code, 77);
            assert_eq!(approve.keys.static_key, [3u8; 32]);
            assert_eq!(approve.keys.identity_dh, companion.dh);
            verify_device_signature(
                &primary_sign,
                ALICE,
                (&approve.keys.identity_dh, &approve.keys.identity_sign),
                &approve.keys.signature,
            )
            .expect("the primary signs the companion's identity");
            match answer {
                Some(code) => c.send(&Frame::error(code, approve.request_id, "")),
                None => c.send(&Frame::DeviceLinked(frame::DeviceLinked {
                    request_id: approve.request_id,
                    addr: DeviceAddr::new(ALICE, 1),
                })),
            }
        }
        c.expect_eof();
    });
    let options = SessionOptions {
        e2ee: true,
        prekey_top_up: 3,
        ..SessionOptions::default()
    };
    let mut s = Connection::connect(server.addr, &Identity::ephemeral(), timeouts())
        .unwrap()
        .login_with(ALICE, 0, options)
        .unwrap();
    match s.approve_link(&link) {
        Err(Error::LinkRefused { reason, .. }) => assert_eq!(reason, LinkRefusal::CodeExpired),
        other => panic!("expected LinkRefused, got {other:?}"),
    }
    assert_eq!(s.approve_link(&link).unwrap(), DeviceAddr::new(ALICE, 1));
    s.close().unwrap();
    server.join();
}

/// With E2EE, a companion whose list entry is not signed by the primary gets nothing: the
/// send fails with a typed error before any SendMulti.
#[test]
fn e2ee_refuses_an_unsigned_companion() {
    let primary = IdentityKeyPair::generate(&mut rand::rngs::OsRng);
    let rogue = IdentityKeyPair::generate(&mut rand::rngs::OsRng).public();
    let good = IdentityKeyPair::generate(&mut rand::rngs::OsRng).public();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_multi(&mut c);
        if let Frame::PrekeyUpload(_) = c.recv() {
            c.send(&Frame::PrekeyStatus(frame::PrekeyStatus {
                one_time_remaining: 3,
                low_water: 1,
                reason: PrekeyStatusReason::UPLOADED,
            }));
        }
        answer_fetch(&mut c, ALICE, &[0]);
        match c.recv() {
            Frame::DeviceListFetch(frame::DeviceListFetch { request_id, .. }) => {
                let p = primary.public();
                let devices = vec![
                    DeviceEntry {
                        identity_dh: p.dh,
                        identity_sign: p.sign,
                        ..entry(0)
                    },
                    DeviceEntry {
                        identity_dh: good.dh,
                        identity_sign: good.sign,
                        signature: sign_device(&primary, BOB, &good.dh, &good.sign),
                        ..entry(1)
                    },
                    DeviceEntry {
                        identity_dh: rogue.dh,
                        identity_sign: rogue.sign,
                        signature: [9u8; 64],
                        ..entry(2)
                    },
                ];
                c.send(&Frame::DeviceList(frame::DeviceList {
                    request_id,
                    user: BOB,
                    version: 3,
                    reason: DeviceListReason::FETCHED,
                    devices,
                }));
            }
            other => panic!("expected DeviceListFetch, got {other:?}"),
        }
        loop {
            match c.next(Duration::from_secs(5)) {
                common::Next::Frame(Frame::SendMulti(_) | Frame::PrekeyFetch(_)) => {
                    panic!("nothing may be sent to an unverified device's user")
                }
                common::Next::Frame(_) => {}
                common::Next::Eof => break,
                common::Next::Timeout => panic!("client did not close"),
            }
        }
    });
    let options = SessionOptions {
        e2ee: true,
        prekey_top_up: 3,
        ..SessionOptions::default()
    };
    let mut s = Connection::connect(server.addr, &Identity::ephemeral(), timeouts())
        .unwrap()
        .login_with(ALICE, 0, options)
        .unwrap();
    match s.send(BOB, b"secret", MsgType::TEXT) {
        Err(Error::UnverifiedDevice { user, device }) => assert_eq!((user, device), (BOB, 2)),
        other => panic!("expected UnverifiedDevice, got {other:?}"),
    }
    let list = s.cached_devices(BOB).unwrap();
    assert_eq!(list.unverified(), vec![2]);
    assert!(s.outbox().is_empty());
    s.close().unwrap();
    server.join();
}
