//! End-to-end encryption against the real daemon, through the SDK: a bundle fetched while its
//! owner is offline starts a session whose first messages the owner decrypts later; one-time
//! prekeys are handed out once, also when two clients race for the last one and across a
//! SIGKILL; the daemon's data directory and metrics hold no plaintext; a bad signed-prekey
//! signature is refused with its code; and an identity change is reported, never accepted
//! silently.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use client::e2ee::keys::encode_public;
use client::e2ee::{IdentityKeyPair, PreKeyBundle};
use client::{Connection, Error, Event, Identity, Session, SessionOptions, Timeouts};
use common::{contains_bytes, files_under, Daemon, Raw};
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason};
use protocol::noise::StaticKeypair;
use protocol::{capability, frame, DeviceAddr, ErrorCode, Frame, MsgType};

/// Phone numbers whose home shards differ (fetches cross shards), `n` of them.
fn users(shards: u16, n: usize) -> Vec<u64> {
    common::phones_across_shards(14_155_550_200, shards, n)
}

fn e2ee(top_up: u32) -> SessionOptions {
    SessionOptions {
        e2ee: true,
        prekey_top_up: top_up,
        ..SessionOptions::default()
    }
}

fn login(d: &Daemon, dir: &Path, phone: u64, options: SessionOptions) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    Connection::connect(d.addr.to_string().as_str(), &id, Timeouts::default())
        .unwrap()
        .login_with(phone, 0, options)
        .unwrap()
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

/// The next message (skipping receipts and acks), as (from, plaintext).
fn next_message(s: &mut Session) -> (u64, Vec<u8>) {
    loop {
        match next(s) {
            Event::Message(m) => return (m.from.user, m.payload.to_vec()),
            Event::ServerAck { .. } | Event::Delivered { .. } | Event::Read { .. } => {}
            e => panic!("expected a message, got {e:?}"),
        }
    }
}

/// Alice fetches Bob's bundle while Bob is offline and sends three messages; Bob logs in
/// later and decrypts all three (and answers). Nothing of the plaintexts is in any file of the
/// daemon's data directory, nor on its metrics page.
#[test]
fn offline_recipient_decrypts_and_the_server_stays_blind() {
    let d = Daemon::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let (alice_dir, bob_dir) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let u = users(2, 2);
    let (alice, bob) = (u[0], u[1]);
    common::register_device(&d, &alice_dir, alice);
    common::register_device(&d, &bob_dir, bob);

    // Bob publishes his prekeys and goes offline.
    let mut b = login(&d, &bob_dir, bob, e2ee(20));
    let count = b.upload_prekeys(20).unwrap();
    assert_eq!(count.one_time_remaining, 20);
    b.close().unwrap();

    let secrets: Vec<Vec<u8>> = (1..=3)
        .map(|i| format!("e2ee-secret-{i}: the eagle lands at midnight").into_bytes())
        .collect();
    let mut a = login(&d, &alice_dir, alice, e2ee(20));
    let mut ids = Vec::new();
    for s in &secrets {
        let id = a.send(bob, s, MsgType::TEXT).unwrap();
        a.wait_server_ack(id, Duration::from_secs(10)).unwrap();
        ids.push(id);
    }
    assert!(
        a.e2ee()
            .unwrap()
            .has_session(client::e2ee::Address::new(bob, 0)),
        "Alice started a session from Bob's bundle"
    );

    // Bob comes back (a new process: the state is reloaded from his state directory).
    let mut b = login(&d, &bob_dir, bob, e2ee(20));
    for s in &secrets {
        let (from, plain) = next_message(&mut b);
        assert_eq!(from, alice);
        assert_eq!(&plain, s);
    }
    let reply = b"e2ee-secret-reply: roger that".to_vec();
    let rid = b.send(alice, &reply, MsgType::TEXT).unwrap();
    b.wait_server_ack(rid, Duration::from_secs(10)).unwrap();
    assert_eq!(next_message(&mut a), (bob, reply.clone()));
    b.close().unwrap();
    a.close().unwrap();
    // The safety numbers agree on both sides.
    let sa = client::secure::open_saved(&Identity::load_or_create(&alice_dir).unwrap()).unwrap();
    let sb = client::secure::open_saved(&Identity::load_or_create(&bob_dir).unwrap()).unwrap();
    assert_eq!(
        client::secure::safety_number(&sa, bob).unwrap(),
        client::secure::safety_number(&sb, alice).unwrap()
    );

    std::thread::sleep(Duration::from_millis(1200)); // metrics sync on the shard tick
    let metrics = d.metrics();
    assert!(metrics.contains("switchboard_"), "metrics page served");
    let mut all = secrets.clone();
    all.push(reply);
    for s in &all {
        assert!(
            !contains_bytes(metrics.as_bytes(), s),
            "plaintext on the metrics page"
        );
        // A distinctive piece too, in case a payload were stored in pieces.
        assert!(!contains_bytes(metrics.as_bytes(), b"eagle lands"));
    }
    let files = files_under(&d.data_dir);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "log")),
        "{files:?}"
    );
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for s in &all {
            assert!(
                !contains_bytes(&bytes, s),
                "plaintext found in {}",
                f.display()
            );
        }
        assert!(
            !contains_bytes(&bytes, b"eagle lands"),
            "plaintext found in {}",
            f.display()
        );
        assert!(
            !contains_bytes(&bytes, b"roger that"),
            "plaintext found in {}",
            f.display()
        );
    }
}

/// Two clients race for Carol's last one-time prekey: exactly one gets it, the other a bundle
/// without one; after a SIGKILL and restart the consumed key is not handed out again.
#[test]
fn the_last_one_time_prekey_goes_to_exactly_one_racer_even_across_sigkill() {
    let mut d = Daemon::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let u = users(2, 3);
    let (carol, alice, dave) = (u[0], u[1], u[2]);
    for (who, name) in [(carol, "carol"), (alice, "alice"), (dave, "dave")] {
        common::register_device(&d, &tmp.path().join(name), who);
    }
    // Carol publishes exactly one one-time prekey (no automatic top-up) and goes offline.
    let mut c = login(&d, &tmp.path().join("carol"), carol, e2ee(0));
    assert_eq!(c.upload_prekeys(1).unwrap().one_time_remaining, 1);
    c.close().unwrap();

    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [(alice, "alice"), (dave, "dave")]
        .into_iter()
        .map(|(who, name)| {
            let mut s = login(&d, &tmp.path().join(name), who, e2ee(20));
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let bundle = s.fetch_bundle(carol, 0).unwrap();
                s.close().unwrap();
                bundle
            })
        })
        .collect();
    let bundles: Vec<PreKeyBundle> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let with: Vec<_> = bundles.iter().filter_map(|b| b.one_time_prekey).collect();
    assert_eq!(
        with.len(),
        1,
        "exactly one racer got the one-time prekey: {bundles:?}"
    );
    assert!(bundles.iter().all(|b| b.verify_signature().is_ok()));
    assert_eq!(bundles[0].identity(), bundles[1].identity());

    d.kill9();
    d.restart();
    let mut a = login(&d, &tmp.path().join("alice"), alice, e2ee(20));
    let again = a.fetch_bundle(carol, 0).unwrap();
    assert_eq!(
        again.one_time_prekey, None,
        "the consumed key came back after a restart"
    );
    assert_eq!(again.identity(), bundles[0].identity());
    a.close().unwrap();

    // Carol learns at her next login that she ran out, and tops up by herself.
    let mut c = login(&d, &tmp.path().join("carol"), carol, e2ee(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.prekey_count().is_none_or(|n| n.one_time_remaining != 5) {
        assert!(
            Instant::now() < deadline,
            "no top-up: {:?}",
            c.prekey_count()
        );
        let _ = c.recv(Some(Duration::from_millis(100))).unwrap();
    }
    c.close().unwrap();
}

/// A `PrekeyUpload` whose signed prekey signature does not verify is refused with
/// `BadPrekeySignature` (non-fatal); the same keys correctly signed are accepted.
#[test]
fn a_bad_signed_prekey_signature_is_refused_with_its_code() {
    let d = Daemon::start(1, &[]);
    let phone = 14_155_550_300;
    let key = StaticKeypair::generate();
    common::register(&d, phone, &key);
    let mut r = Raw::connect(d.addr, &key);
    r.send(Frame::Login(frame::Login {
        addr: DeviceAddr {
            user: phone,
            device: 0,
        },
        revision: protocol::PROTOCOL_REVISION,
        capabilities: capability::MESSAGING | capability::PREKEYS,
    }));
    assert!(
        matches!(r.recv(), Frame::Welcome(frame::Welcome { capabilities, .. }) if capabilities & capability::PREKEYS != 0)
    );
    assert!(
        matches!(
            r.recv(),
            Frame::PrekeyStatus(frame::PrekeyStatus {
                one_time_remaining: 0,
                reason: PrekeyStatusReason::EXHAUSTED,
                ..
            })
        ),
        "a device without keys is told at login"
    );
    let id = IdentityKeyPair::generate(&mut rand::rngs::OsRng);
    let spk = {
        let mut k = [7u8; 32];
        k[31] = 0x10;
        k
    };
    let mut keys = DeviceKeys {
        identity_dh: id.public().dh,
        identity_sign: id.public().sign,
        signed_prekey_id: 1,
        signed_prekey: spk,
        signed_prekey_sig: id.sign(&encode_public(&spk)),
    };
    keys.signed_prekey_sig[10] ^= 0x01;
    let one_time = vec![OneTimePrekey {
        id: 1,
        key: [9; 32],
    }];
    r.send(Frame::PrekeyUpload(frame::PrekeyUpload {
        keys: Box::new(keys),
        one_time: one_time.clone(),
    }));
    match r.recv_skip_pong() {
        Frame::Error(frame::Error { code, ref_id, .. }) => {
            assert_eq!(code, ErrorCode::BadPrekeySignature as u16);
            assert_eq!(ref_id, 0);
        }
        other => panic!("expected BadPrekeySignature, got {other:?}"),
    }
    // Non-fatal: the connection goes on, and the correct signature is accepted.
    keys.signed_prekey_sig[10] ^= 0x01;
    r.send(Frame::PrekeyUpload(frame::PrekeyUpload {
        keys: Box::new(keys),
        one_time,
    }));
    assert_eq!(
        r.recv_skip_pong(),
        Frame::PrekeyStatus(frame::PrekeyStatus {
            one_time_remaining: 1,
            low_water: 10,
            reason: PrekeyStatusReason::UPLOADED
        })
    );
    // A fetch for a device that published nothing: NoSuchRecipient, ref_id = request_id.
    r.send(Frame::PrekeyFetch(frame::PrekeyFetch {
        addr: DeviceAddr {
            user: 14_155_550_301,
            device: 0,
        },
        request_id: 4242,
    }));
    match r.recv_skip_pong() {
        Frame::Error(frame::Error { code, ref_id, .. }) => {
            assert_eq!((code, ref_id), (ErrorCode::NoSuchRecipient as u16, 4242));
        }
        other => panic!("expected NoSuchRecipient, got {other:?}"),
    }
}

/// Bob reinstalls (new identity keys, same account). Alice's SDK refuses his new bundle with
/// `IdentityChanged` and holds his new first message behind an `IdentityChanged` event; only
/// after `accept_identity` does she get it.
#[test]
fn an_identity_change_is_reported_not_silently_accepted() {
    let d = Daemon::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let (alice_dir, bob_dir) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let u = users(2, 2);
    let (alice, bob) = (u[0], u[1]);
    common::register_device(&d, &alice_dir, alice);
    common::register_device(&d, &bob_dir, bob);
    let mut b = login(&d, &bob_dir, bob, e2ee(10));
    b.upload_prekeys(10).unwrap();
    let mut a = login(&d, &alice_dir, alice, e2ee(10));
    let id = a.send(bob, b"hello old bob", MsgType::TEXT).unwrap();
    a.wait_server_ack(id, Duration::from_secs(10)).unwrap();
    assert_eq!(next_message(&mut b), (alice, b"hello old bob".to_vec()));
    b.close().unwrap();
    let old_number = a.safety_number(bob).unwrap().unwrap();

    // Reinstall: the E2EE state is gone (the device key and account stay).
    std::fs::remove_dir_all(bob_dir.join("e2ee")).unwrap();
    let mut b = login(&d, &bob_dir, bob, e2ee(10));
    assert_eq!(
        b.upload_prekeys(10).unwrap().one_time_remaining,
        10,
        "new identity published"
    );

    // Send path: the new bundle is refused until accepted.
    match a.fetch_bundle(bob, 0) {
        Err(Error::IdentityChanged {
            user,
            device,
            safety_number,
        }) => {
            assert_eq!((user, device), (bob, 0));
            assert_ne!(safety_number, old_number.grouped());
        }
        other => panic!("expected IdentityChanged, got {other:?}"),
    }
    assert_eq!(
        a.safety_number(bob).unwrap().unwrap(),
        old_number,
        "nothing accepted"
    );

    // Receive path: Bob's first message under the new identity is held behind an event.
    let id = b
        .send(alice, b"new phone, same bob", MsgType::TEXT)
        .unwrap();
    b.wait_server_ack(id, Duration::from_secs(10)).unwrap();
    loop {
        match next(&mut a) {
            Event::IdentityChanged { user, device, .. } => {
                assert_eq!((user, device), (bob, 0));
                break;
            }
            Event::Delivered { .. } | Event::Read { .. } => {}
            other => panic!("expected IdentityChanged, got {other:?}"),
        }
    }
    while let Some(e) = a.recv(Some(Duration::from_millis(500))).unwrap() {
        assert!(
            matches!(e, Event::Delivered { .. } | Event::Read { .. }),
            "the message must stay held: {e:?}"
        );
    }
    assert_eq!(a.pending_identity_changes(), vec![(bob, 0)]);
    assert!(a.accept_identity(bob, 0).unwrap());
    assert_eq!(next_message(&mut a), (bob, b"new phone, same bob".to_vec()));
    assert_ne!(a.safety_number(bob).unwrap().unwrap(), old_number);

    // And the conversation goes on under the new identity.
    let id = a.send(bob, b"welcome back", MsgType::TEXT).unwrap();
    a.wait_server_ack(id, Duration::from_secs(10)).unwrap();
    assert_eq!(next_message(&mut b), (alice, b"welcome back".to_vec()));
    a.close().unwrap();
    b.close().unwrap();
}
