//! The SDK's end-to-end encryption against scripted fake servers and the documents: the first
//! login publishes the identity, a bundle with a bad signature is refused before anything is
//! sent, a server without the PREKEYS capability is refused, held messages are not
//! acknowledged, and the documented prekey frames carry the documented E2EE bundle.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{welcome, FakeConn, FakeServer, Next};
use protocol::frame::{DeviceKeys, PrekeyStatusReason};
use protocol::{capability, frame, DeviceAddr, Frame, Message, MsgType};
use switchboard_client::e2ee::keys::encode_public;
use switchboard_client::e2ee::{Address, E2ee, IdentityKeyPair, PreKeyBundle};
use switchboard_client::{
    secure, Connection, Error, Event, Identity, Session, SessionOptions, Timeouts,
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

fn e2ee() -> SessionOptions {
    SessionOptions {
        e2ee: true,
        prekey_top_up: 3,
        ..SessionOptions::default()
    }
}

/// Answers `Login` with a `Welcome` offering `capabilities`.
fn welcome_with(c: &mut FakeConn, capabilities: u64) {
    match c.recv() {
        Frame::Login(frame::Login {
            addr: DeviceAddr { user, device },
            capabilities: asked,
            ..
        }) => {
            assert_ne!(
                asked & capability::PREKEYS,
                0,
                "an E2EE session asks for PREKEYS"
            );
            let mut w = welcome(user, device, 30_000, 16_384);
            if let Frame::Welcome(frame::Welcome {
                capabilities: c, ..
            }) = &mut w
            {
                *c = capabilities;
            }
            c.send(&w);
        }
        other => panic!("expected Login, got {other:?}"),
    }
}

/// Accepts the first upload (the new identity) and answers it.
fn accept_first_upload(c: &mut FakeConn) -> DeviceKeys {
    match c.recv() {
        Frame::PrekeyUpload(frame::PrekeyUpload { keys, one_time }) => {
            assert_eq!(one_time.len(), 3, "prekey_top_up keys");
            assert!(
                switchboard_client::e2ee::verify_signed_prekey(
                    &keys.identity_sign,
                    &keys.signed_prekey,
                    &keys.signed_prekey_sig
                )
                .is_ok(),
                "the SDK signs its signed prekey"
            );
            c.send(&Frame::PrekeyStatus(frame::PrekeyStatus {
                one_time_remaining: 3,
                low_water: 10,
                reason: PrekeyStatusReason::UPLOADED,
            }));
            *keys
        }
        other => panic!("expected PrekeyUpload, got {other:?}"),
    }
}

fn login(server: &FakeServer, identity: &Identity) -> switchboard_client::Result<Session> {
    Connection::connect(server.addr, identity, timeouts())?.login_with(ALICE, 0, e2ee())
}

/// The first login publishes the identity; a bundle whose signature does not verify is
/// refused (`BadSignature`) and nothing is sent; the `published` marker means the next login
/// does not upload again.
#[test]
fn first_login_publishes_and_a_forged_bundle_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_with(&mut c, capability::MESSAGING | capability::PREKEYS);
        accept_first_upload(&mut c);
        // The client fetches Bob's bundle: answer with a forged signature.
        let request_id = match c.recv() {
            Frame::PrekeyFetch(frame::PrekeyFetch {
                addr:
                    DeviceAddr {
                        user: BOB,
                        device: 0,
                    },
                request_id,
            }) => request_id,
            other => panic!("expected PrekeyFetch, got {other:?}"),
        };
        let bob = IdentityKeyPair::generate(&mut rand::rngs::OsRng);
        let spk = [5u8; 32];
        let mut sig = bob.sign(&encode_public(&spk));
        sig[3] ^= 1;
        c.send(&Frame::PrekeyBundle(frame::PrekeyBundle {
            addr: DeviceAddr {
                user: BOB,
                device: 0,
            },
            request_id,
            keys: Box::new(DeviceKeys {
                identity_dh: bob.public().dh,
                identity_sign: bob.public().sign,
                signed_prekey_id: 1,
                signed_prekey: spk,
                signed_prekey_sig: sig,
            }),
            one_time: None,
        }));
        // Nothing else may come (no Send): the client closes.
        loop {
            match c.next(Duration::from_secs(5)) {
                Next::Frame(Frame::Ack { .. } | Frame::Ping { .. }) => {}
                Next::Frame(other) => {
                    panic!("nothing may be sent after a forged bundle: {other:?}")
                }
                Next::Eof => break,
                Next::Timeout => panic!("client did not close"),
            }
        }
        // Second login: already published, so no upload.
        let mut c = FakeConn::accept(&l, &key);
        welcome_with(&mut c, capability::MESSAGING | capability::PREKEYS);
        match c.next(Duration::from_millis(500)) {
            Next::Timeout | Next::Eof => {}
            Next::Frame(f) => panic!("unexpected {f:?} after the second login"),
        }
    });
    let mut s = login(&server, &identity).unwrap();
    match s.send(BOB, b"never sent", MsgType::TEXT) {
        Err(Error::E2ee(switchboard_client::e2ee::Error::BadSignature)) => {}
        other => panic!("expected BadSignature, got {other:?}"),
    }
    assert!(s.outbox().is_empty());
    s.close().unwrap();
    assert!(state.path().join("e2ee").join("published").exists());
    let s = login(&server, &identity).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    drop(s);
    server.join();
}

/// A server that does not offer PREKEYS cannot carry an E2EE session.
#[test]
fn a_server_without_prekeys_is_refused() {
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_with(&mut c, capability::MESSAGING);
        c.expect_eof();
    });
    let identity = Identity::ephemeral();
    match login(&server, &identity) {
        Err(Error::E2eeUnsupported) => {}
        other => panic!("expected E2eeUnsupported, got {other:?}"),
    }
    server.join();
}

/// A delivery under a changed identity is held: no `Ack` for it until `accept_identity`, and
/// then it is decrypted, handed out and acknowledged.
#[test]
fn held_messages_are_acknowledged_only_after_acceptance() {
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(state.path()).unwrap();
    // Bob's two identities, and the envelopes he sends Alice under each (prepared after Alice's
    // keys are known: the fake server forwards them).
    let (keys_tx, keys_rx) = std::sync::mpsc::channel::<E2ee>();
    let server = FakeServer::start(move |l, key| {
        let mut c = FakeConn::accept(&l, &key);
        welcome_with(&mut c, capability::MESSAGING | capability::PREKEYS);
        let alice_keys = accept_first_upload(&mut c);
        let alice = keys_rx.recv().unwrap();
        let alice_bundle = alice.own_bundle(None).unwrap();
        assert_eq!(alice_bundle.identity_dh, alice_keys.identity_dh);
        let me = Address::new(ALICE, 0);
        let mut old_bob = E2ee::in_memory(Address::new(BOB, 0));
        let env1 = old_bob
            .encrypt(me, Some(&alice_bundle), b"from old bob")
            .unwrap();
        let mut new_bob = E2ee::in_memory(Address::new(BOB, 0));
        let env2 = new_bob
            .encrypt(me, Some(&alice_bundle), b"from new bob")
            .unwrap();
        let deliver = |seq, id, env: Vec<u8>| {
            Frame::Deliver(frame::Deliver {
                seq,
                message: Message {
                    from: DeviceAddr {
                        user: BOB,
                        device: 0,
                    },
                    client_msg_id: id,
                    server_ts_ms: 1,
                    msg_type: MsgType::TEXT,
                    payload: Bytes::from(env),
                },
            })
        };
        c.send(&deliver(1, 11, env1));
        c.send(&deliver(2, 22, env2));
        let mut acked = Vec::new();
        while acked.len() < 2 {
            match c.next(Duration::from_secs(5)) {
                Next::Frame(Frame::Ack(frame::Ack { seqs })) => {
                    if acked.is_empty() {
                        assert_eq!(seqs, vec![1], "the held message is not acknowledged");
                    }
                    acked.extend(seqs);
                }
                Next::Frame(Frame::Ping(frame::Ping { nonce })) => {
                    c.send(&Frame::Pong(frame::Pong { nonce }))
                }
                Next::Frame(other) => panic!("unexpected {other:?}"),
                Next::Eof | Next::Timeout => panic!("acks missing: {acked:?}"),
            }
        }
        assert_eq!(acked, vec![1, 2]);
        c.expect_eof();
    });
    let mut s = login(&server, &identity).unwrap();
    // Give the fake server Alice's public keys through an in-memory copy of her state.
    let copy = E2ee::import_state(&s.e2ee().unwrap().export_state()).unwrap();
    keys_tx.send(copy).unwrap();
    let mut next = || loop {
        if let Some(e) = s.recv(Some(Duration::from_millis(100))).unwrap() {
            return e;
        }
    };
    match next() {
        Event::Message(Message { payload, .. }) => assert_eq!(&payload[..], b"from old bob"),
        e => panic!("{e:?}"),
    }
    let changed = match next() {
        Event::IdentityChanged {
            user,
            device,
            safety_number,
        } => {
            assert_eq!((user, device), (BOB, 0));
            safety_number
        }
        e => panic!("{e:?}"),
    };
    assert!(s.recv(Some(Duration::from_millis(300))).unwrap().is_none());
    s.flush_acks().unwrap(); // acks seq 1 only
    let before = s.safety_number(BOB).unwrap().unwrap().grouped();
    assert_ne!(before, changed);
    assert!(s.accept_identity(BOB, 0).unwrap());
    assert_eq!(s.safety_number(BOB).unwrap().unwrap().grouped(), changed);
    match s.recv(Some(Duration::from_secs(1))).unwrap() {
        Some(Event::Message(Message { payload, .. })) => assert_eq!(&payload[..], b"from new bob"),
        e => panic!("{e:?}"),
    }
    s.close().unwrap();
    server.join();
}

/// The documented `frame_prekey_bundle` (docs/protocol.md) carries exactly the documented
/// E2EE bundle (`bundle` in docs/e2ee.md §12), and its signature verifies.
#[test]
fn documented_prekey_frames_carry_the_documented_bundle() {
    let protocol_md = include_str!("../../docs/protocol.md");
    let e2ee_md = include_str!("../../docs/e2ee.md");
    let frame_hex = vector(protocol_md, "vector frame_prekey_bundle:");
    let frame = Frame::decode(Bytes::from(hex::decode(frame_hex).unwrap())).unwrap();
    let Frame::PrekeyBundle(frame::PrekeyBundle { keys, one_time, .. }) = frame else {
        panic!("not a bundle: {frame:?}")
    };
    let bundle = secure::bundle_from_frame(&keys, one_time);
    bundle.verify_signature().unwrap();
    let documented = hex::decode(vector(e2ee_md, "bundle =")).unwrap();
    assert_eq!(bundle.encode(), documented);
    assert_eq!(PreKeyBundle::decode(&documented).unwrap(), bundle);
}

/// The hex after `prefix` in `doc`, continuation lines included.
fn vector(doc: &str, prefix: &str) -> String {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(prefix));
    let first = lines.next().unwrap_or_else(|| panic!("no {prefix}"));
    let mut hex: String = first[prefix.len()..].split_whitespace().collect();
    for l in lines {
        if !l.starts_with("    ") {
            break;
        }
        hex.extend(l.split_whitespace());
    }
    hex
}

#[test]
fn a_session_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Session>();
}
