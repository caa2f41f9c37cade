//! The Rust SDK (`switchboard-client`) against the real daemon: register with the code the
//! file SMS provider wrote, log in, exchange messages with ✓ / ✓✓ / read, and survive a
//! reconnect with the outbox resent under the same client_msg_id.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::{Duration, Instant};

use client::protocol::MsgType;
use client::{Connection, Event, Identity, Session, Timeouts};
use common::Daemon;

fn account(d: &Daemon, dir: &std::path::Path, phone: u64) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    let mut c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.register_request(phone).unwrap();
    let code = d.sms_code(phone);
    c.register_verify(phone, code).unwrap();
    let c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.login(phone, 0).unwrap()
}

fn next(s: &mut Session) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ev) = s.recv(Some(Duration::from_millis(200))).unwrap() {
            return ev;
        }
        assert!(Instant::now() < deadline, "no event within 10 s");
    }
}

#[test]
fn two_sdk_clients_talk_through_the_daemon() {
    let d = Daemon::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = account(&d, &tmp.path().join("alice"), 12025550100);
    let mut bob = account(&d, &tmp.path().join("bob"), 12025550101);

    let id = alice
        .send(12025550101, b"hello from the sdk", MsgType::TEXT)
        .unwrap();
    assert!(
        matches!(next(&mut alice), Event::ServerAck { client_msg_id, .. } if client_msg_id == id)
    );
    match next(&mut bob) {
        Event::Message(m) => {
            assert_eq!((m.from.user, m.client_msg_id), (12025550100, id));
            assert_eq!(&m.payload[..], b"hello from the sdk");
        }
        e => panic!("expected a message, got {e:?}"),
    }
    bob.flush_acks().unwrap();
    bob.mark_read(12025550100, id).unwrap();
    assert!(
        matches!(next(&mut alice), Event::Delivered { client_msg_id, .. } if client_msg_id == id)
    );
    assert!(matches!(next(&mut alice), Event::Read { client_msg_id, .. } if client_msg_id == id));

    // Reconnect: the session logs in again. Receipts whose acks were still batched may repeat
    // (the protocol allows it); the next message is acknowledged and delivered once.
    alice.reconnect().unwrap();
    let id2 = alice
        .send(12025550101, b"after reconnect", MsgType::TEXT)
        .unwrap();
    loop {
        match next(&mut alice) {
            Event::Delivered { client_msg_id, .. } | Event::Read { client_msg_id, .. }
                if client_msg_id == id =>
            {
                continue
            }
            Event::ServerAck { client_msg_id, .. } => {
                assert_eq!(client_msg_id, id2);
                break;
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    assert!(matches!(next(&mut bob), Event::Message(m) if m.client_msg_id == id2));
}
