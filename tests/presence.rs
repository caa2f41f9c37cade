//! Presence against the real daemon: a login reaches the subscribers only, a subscription
//! expires, privacy settings and reciprocity hide last seen, a block hides presence and drops
//! messages (the sender still gets ✓), and typing is relayed but never stored (the data
//! directory is searched for the notice's bytes).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::Duration;

use common::*;
use protocol::frame::{self, ContactsEdit, PresenceSubscribe, PrivacySet, Typing};
use protocol::noise::StaticKeypair;
use protocol::presence::{ContactOp, PresenceState, TypingState, Visibility};
use protocol::{capability, Frame};

const CAPS: u64 = MD_CAPS | capability::PRESENCE | capability::CALLS;

struct P {
    phone: u64,
    key: StaticKeypair,
    dev: Option<Dev>,
}

fn user(d: &Daemon, phone: u64) -> P {
    let key = StaticKeypair::generate();
    register(d, phone, &key);
    P {
        phone,
        key,
        dev: None,
    }
}

fn online<'a>(d: &Daemon, p: &'a mut P) -> &'a mut Dev {
    let (raw, first) = login_as(d, p.phone, 0, &p.key, CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    p.dev = Some(Dev {
        user: p.phone,
        device: 0,
        key: p.key.clone(),
        identity: client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng),
        raw,
        pending: Default::default(),
        one_time: Vec::new(),
    });
    p.dev.as_mut().unwrap()
}

fn subscribe(dev: &mut Dev, user: u64, ttl_s: u32) -> frame::Presence {
    let request_id = next_request_id();
    dev.raw.send(Frame::PresenceSubscribe(PresenceSubscribe {
        request_id,
        user,
        ttl_s,
    }));
    match dev.expect(
        "Presence",
        |f| matches!(f, Frame::Presence(p) if p.request_id == request_id),
    ) {
        Frame::Presence(p) => p,
        other => panic!("{other:?}"),
    }
}

fn change(dev: &mut Dev, user: u64) -> Option<frame::Presence> {
    match dev.find(
        Duration::from_secs(3),
        |f| matches!(f, Frame::Presence(p) if p.request_id == 0 && p.user == user),
    ) {
        Some(Frame::Presence(p)) => Some(p),
        _ => None,
    }
}

fn saved(dev: &mut Dev, frame: Frame, request_id: u64) -> frame::PrivacyState {
    dev.raw.send(frame);
    match dev.expect(
        "PrivacyState",
        |f| matches!(f, Frame::PrivacyState(s) if s.request_id == request_id),
    ) {
        Frame::PrivacyState(s) => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn presence_reaches_subscribers_only_and_expires() {
    let d = Daemon::start(2, &[("tick-ms", "200")]);
    let mut a = user(&d, 14_155_550_401);
    let mut w = user(&d, 14_155_550_402);
    let mut x = user(&d, 14_155_550_403);
    let (wp, xp) = (w.phone, x.phone);
    let _ = (wp, xp);
    online(&d, &mut w);
    online(&d, &mut x);
    let first = subscribe(w.dev.as_mut().unwrap(), a.phone, 60);
    assert_eq!(first.state, PresenceState::OFFLINE);
    online(&d, &mut a);
    let p = change(w.dev.as_mut().unwrap(), a.phone).expect("subscriber hears the login");
    assert_eq!(p.state, PresenceState::ONLINE);
    assert!(
        change(x.dev.as_mut().unwrap(), a.phone).is_none(),
        "a non-subscriber hears nothing"
    );
    drop(a.dev.take());
    let p = change(w.dev.as_mut().unwrap(), a.phone).expect("subscriber hears the logout");
    assert_eq!(p.state, PresenceState::OFFLINE);
    assert!(p.last_seen_ms > 0);

    // A 1 s subscription: expired by the next login.
    subscribe(x.dev.as_mut().unwrap(), a.phone, 1);
    std::thread::sleep(Duration::from_millis(1_500));
    online(&d, &mut a);
    assert!(
        change(x.dev.as_mut().unwrap(), a.phone).is_none(),
        "expired"
    );
    wait_metric(&d, "switchboard_presence_subscriptions_expired_total", 1.0);
}

#[test]
fn privacy_reciprocity_and_blocking() {
    let d = Daemon::start(2, &[("tick-ms", "200")]);
    let mut a = user(&d, 14_155_550_411);
    let mut c = user(&d, 14_155_550_412);
    let mut s = user(&d, 14_155_550_413);
    let cp = c.phone;
    let sp = s.phone;
    {
        let ad = online(&d, &mut a);
        let st = saved(
            ad,
            Frame::PrivacySet(PrivacySet {
                request_id: 1,
                last_seen: Visibility::CONTACTS,
                online: Visibility::CONTACTS,
            }),
            1,
        );
        assert_eq!(st.last_seen, Visibility::CONTACTS);
        let st = saved(
            ad,
            Frame::ContactsEdit(ContactsEdit {
                request_id: 2,
                op: ContactOp::ADD,
                users: vec![cp],
            }),
            2,
        );
        assert_eq!(st.contacts, 1);
        let st = saved(
            ad,
            Frame::ContactsEdit(ContactsEdit {
                request_id: 3,
                op: ContactOp::BLOCK,
                users: vec![sp],
            }),
            3,
        );
        assert_eq!(st.blocked, 1);
    }
    drop(a.dev.take());
    std::thread::sleep(Duration::from_millis(500));
    let cd = online(&d, &mut c);
    let p = subscribe(cd, a.phone, 60);
    assert_eq!(p.state, PresenceState::OFFLINE);
    assert!(p.last_seen_ms > 0, "a contact sees the last seen");
    // Reciprocity: hiding one's own last seen hides the others'.
    saved(
        cd,
        Frame::PrivacySet(PrivacySet {
            request_id: 4,
            last_seen: Visibility::NOBODY,
            online: Visibility::NOBODY,
        }),
        4,
    );
    assert_eq!(subscribe(cd, a.phone, 60).state, PresenceState::UNAVAILABLE);

    // The blocked user: no presence, and its message gets ✓ but is never delivered.
    let sd = online(&d, &mut s);
    assert_eq!(subscribe(sd, a.phone, 60).state, PresenceState::UNAVAILABLE);
    sd.raw.send(send_frame(a.phone, 77, b"blocked hello"));
    sd.expect_ack(77);
    let ad = online(&d, &mut a);
    ad.assert_no_mail(Duration::from_secs(2), "a blocked sender's message");
    wait_metric(&d, "switchboard_presence_blocked_drops_total", 1.0);
}

#[test]
fn typing_is_relayed_and_never_stored() {
    let d = Daemon::start(2, &[]);
    let mut a = user(&d, 14_155_550_421);
    let mut b = user(&d, 14_155_550_422);
    online(&d, &mut b);
    let bp = b.phone;
    let ad = online(&d, &mut a);
    ad.raw.send(Frame::Typing(Typing {
        to_user: bp,
        state: TypingState::RECORDING,
    }));
    let bd = b.dev.as_mut().unwrap();
    match bd.expect("TypingNotice", |f| matches!(f, Frame::TypingNotice(_))) {
        Frame::TypingNotice(t) => {
            assert_eq!((t.from_user, t.state), (a.phone, TypingState::RECORDING))
        }
        other => panic!("{other:?}"),
    }
    let mut d = d;
    d.terminate();
    let data_dir = d.data_dir.clone();
    // No record of the log holds anything but the kinds presence writes; none is typing.
    for r in log_records(&data_dir) {
        assert!(
            !format!("{r:?}").contains("Typing"),
            "typing was stored: {r:?}"
        );
    }
    // And the raw bytes: the typing frame's body (to_user, state) appears in no file.
    let mut needle = bp.to_be_bytes().to_vec();
    needle.push(TypingState::RECORDING.0);
    for p in files_under(&data_dir) {
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            !contains_bytes(&bytes, &needle),
            "typing bytes found in {p:?}"
        );
    }
}

/// Waits (at most 10 s) until the metric `name` sums to `want` (metrics follow the shards'
/// counters at their next tick).
fn wait_metric(d: &Daemon, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = d.metric_sum(name);
        if got >= want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {got}, want {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
