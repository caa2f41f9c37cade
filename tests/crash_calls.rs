//! kill -9 against presence and calls: a call in progress leaves no stuck state after the
//! restart (calls are volatile: the callee can be called again and the call gauge is 0), and
//! privacy settings, contact and block lists and last seen survive the kill.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use protocol::frame::{CallSignal, ContactsEdit, PresenceSubscribe, PrivacySet};
use protocol::noise::StaticKeypair;
use protocol::presence::{CallKind, ContactOp, PresenceState, Visibility};
use protocol::{capability, Frame};

const CAPS: u64 = MD_CAPS | capability::PRESENCE | capability::CALLS;

fn dev(d: &Daemon, phone: u64, key: &StaticKeypair) -> Dev {
    let (raw, first) = login_as(d, phone, 0, key, CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    Dev {
        user: phone,
        device: 0,
        key: key.clone(),
        identity: client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng),
        raw,
        pending: Default::default(),
        one_time: Vec::new(),
    }
}

fn signal(call_id: u64, peer: u64, kind: CallKind) -> Frame {
    Frame::CallSignal(CallSignal {
        call_id,
        peer,
        kind,
        payload: Bytes::new(),
    })
}

fn is_event(f: &Frame, call_id: u64, kind: CallKind) -> bool {
    matches!(f, Frame::CallEvent(e) if e.call_id == call_id && e.kind == kind)
}

#[test]
fn kill9_mid_call_leaves_no_stuck_call_and_privacy_survives() {
    let mut d = Daemon::start(2, &[("tick-ms", "200")]);
    let keys: Vec<StaticKeypair> = (0..3).map(|_| StaticKeypair::generate()).collect();
    let phones = [14_155_550_501u64, 14_155_550_502, 14_155_550_503];
    for (p, k) in phones.iter().zip(&keys) {
        register(&d, *p, k);
    }
    let mut a = dev(&d, phones[0], &keys[0]);
    let mut b = dev(&d, phones[1], &keys[1]);
    // b: last seen for contacts only, a is a contact, c is blocked.
    b.raw.send(Frame::PrivacySet(PrivacySet {
        request_id: 1,
        last_seen: Visibility::CONTACTS,
        online: Visibility::EVERYONE,
    }));
    b.expect(
        "saved",
        |f| matches!(f, Frame::PrivacyState(s) if s.request_id == 1),
    );
    b.raw.send(Frame::ContactsEdit(ContactsEdit {
        request_id: 2,
        op: ContactOp::ADD,
        users: vec![phones[0]],
    }));
    b.expect(
        "saved",
        |f| matches!(f, Frame::PrivacyState(s) if s.request_id == 2),
    );
    b.raw.send(Frame::ContactsEdit(ContactsEdit {
        request_id: 3,
        op: ContactOp::BLOCK,
        users: vec![phones[2]],
    }));
    b.expect(
        "saved",
        |f| matches!(f, Frame::PrivacyState(s) if s.request_id == 3),
    );
    // A call in progress: a calls b, b answers.
    a.raw.send(signal(7, phones[1], CallKind::OFFER));
    b.expect("OFFER", |f| is_event(f, 7, CallKind::OFFER));
    b.raw.send(signal(7, phones[0], CallKind::ANSWER));
    a.expect("ANSWER", |f| is_event(f, 7, CallKind::ANSWER));
    wait_metric(&d, "switchboard_call_active", 1.0);
    // b disconnects and reconnects so that a last seen is written (one tick), then kill -9.
    drop(b);
    std::thread::sleep(Duration::from_millis(800));
    let b = dev(&d, phones[1], &keys[1]);
    drop(b);
    drop(a);
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    d.restart();

    wait_metric(&d, "switchboard_call_active", 0.0);
    let mut a = dev(&d, phones[0], &keys[0]);
    // The contact sees b's last seen from before the kill.
    let rid = next_request_id();
    a.raw.send(Frame::PresenceSubscribe(PresenceSubscribe {
        request_id: rid,
        user: phones[1],
        ttl_s: 60,
    }));
    match a.expect(
        "Presence",
        |f| matches!(f, Frame::Presence(p) if p.request_id == rid),
    ) {
        Frame::Presence(p) => {
            assert_eq!(p.state, PresenceState::OFFLINE);
            assert!(p.last_seen_ms > 0, "last seen survived: {p:?}");
        }
        other => panic!("{other:?}"),
    }
    // b is not stuck in the old call: a new call rings it.
    let mut b = dev(&d, phones[1], &keys[1]);
    a.raw.send(signal(8, phones[1], CallKind::OFFER));
    a.expect("RINGING", |f| is_event(f, 8, CallKind::RINGING));
    b.expect("OFFER", |f| is_event(f, 8, CallKind::OFFER));
    // A step of the old call is unknown.
    b.raw.send(signal(7, phones[0], CallKind::HANGUP));
    b.expect("CallUnknown", |f| {
        matches!(f, Frame::Error(e) if e.ref_id == 7
            && e.code == protocol::ErrorCode::CallUnknown as u16)
    });
    // The block survived: c's message gets ✓ and is not delivered; c sees no presence.
    let mut c = dev(&d, phones[2], &keys[2]);
    let rid = next_request_id();
    c.raw.send(Frame::PresenceSubscribe(PresenceSubscribe {
        request_id: rid,
        user: phones[1],
        ttl_s: 60,
    }));
    match c.expect(
        "Presence",
        |f| matches!(f, Frame::Presence(p) if p.request_id == rid),
    ) {
        Frame::Presence(p) => assert_eq!(p.state, PresenceState::UNAVAILABLE),
        other => panic!("{other:?}"),
    }
    c.raw.send(send_frame(phones[1], 99, b"still blocked"));
    c.expect_ack(99);
    b.assert_no_mail(Duration::from_secs(2), "blocked after restart");
}

/// Waits (at most 10 s) until the metric `name` sums to `want` (metrics follow the shards'
/// counters at their next tick).
fn wait_metric(d: &Daemon, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = d.metric_sum(name);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {got}, want {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
