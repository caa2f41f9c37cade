//! Rule tests of presence, privacy, blocking and typing, driven through the public API with the
//! synchronous in-memory cluster: presence reaches subscribers only (one frame each per change),
//! subscriptions expire and are capped, visibility follows the owner's setting, its contact list
//! and reciprocity, a block hides presence and drops messages (with ✓), typing is relayed and
//! never stored, and settings, lists and last-seen times survive recovery and compaction.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use common::{key, user_on, Cluster};
use protocol::frame::{self, ContactsEdit, PresenceSubscribe, PrivacySet, Typing};
use protocol::presence::{ContactOp, PresenceState, TypingState, Visibility};
use protocol::{capability, Address, ErrorCode, Frame, MsgType};
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, ConnId, ShardId};

const CAPS: u64 = capability::MESSAGING | capability::PRESENCE | capability::CALLS;

/// Four users on three shards, all registered (none logged in).
fn cluster() -> (Cluster, [u64; 4]) {
    let mut c = Cluster::new(3, |_| {});
    let users = [
        user_on(0, 3, 0),
        user_on(1, 3, 0),
        user_on(2, 3, 0),
        user_on(1, 3, 1),
    ];
    for (i, &u) in users.iter().enumerate() {
        c.register(u, key(i as u64 + 1));
    }
    (c, users)
}

fn login(c: &mut Cluster, users: &[u64; 4], i: usize) -> ConnId {
    let (conn, _) = c.login_caps(users[i], key(i as u64 + 1), CAPS);
    c.settle();
    conn
}

fn subscribe(c: &mut Cluster, conn: ConnId, user: u64, ttl_s: u32, request_id: u64) {
    c.frame(
        conn,
        Frame::PresenceSubscribe(PresenceSubscribe {
            request_id,
            user,
            ttl_s,
        }),
    );
    c.settle();
}

fn presences(frames: &[Frame]) -> Vec<frame::Presence> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Presence(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn errors(frames: &[Frame]) -> Vec<(ErrorCode, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Error(e) => Some((ErrorCode::from_u16(e.code).unwrap(), e.ref_id)),
            _ => None,
        })
        .collect()
}

fn set_privacy(c: &mut Cluster, conn: ConnId, last_seen: Visibility, online: Visibility) {
    c.frame(
        conn,
        Frame::PrivacySet(PrivacySet {
            request_id: 9,
            last_seen,
            online,
        }),
    );
    c.settle();
    let f = c.frames(conn);
    assert!(
        f.iter()
            .any(|f| matches!(f, Frame::PrivacyState(s) if s.request_id == 9
            && s.last_seen == last_seen && s.online == online)),
        "{f:?}"
    );
}

fn edit(c: &mut Cluster, conn: ConnId, op: ContactOp, users: Vec<u64>) -> Vec<Frame> {
    c.frame(
        conn,
        Frame::ContactsEdit(ContactsEdit {
            request_id: 11,
            op,
            users,
        }),
    );
    c.settle();
    c.frames(conn)
}

#[test]
fn presence_reaches_subscribers_only_one_frame_each() {
    let (mut c, u) = cluster();
    let watcher = login(&mut c, &u, 2);
    let bystander = login(&mut c, &u, 1);
    subscribe(&mut c, watcher, u[0], 60, 5);
    let first = presences(&c.frames(watcher));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].request_id, 5);
    assert_eq!(first[0].state, PresenceState::OFFLINE);
    assert_eq!(first[0].last_seen_ms, 0, "never seen disconnecting");

    let a = login(&mut c, &u, 0);
    let got = presences(&c.frames(watcher));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].request_id, got[0].state),
        (0, PresenceState::ONLINE)
    );
    assert!(presences(&c.frames(bystander)).is_empty(), "not subscribed");

    c.now += 5_000;
    let t = c.now;
    c.close_conn(a);
    c.settle();
    let got = presences(&c.frames(watcher));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].state, got[0].last_seen_ms),
        (PresenceState::OFFLINE, t)
    );
    assert!(presences(&c.frames(bystander)).is_empty());

    // A second device of the same connection count: a login while online sends nothing.
    let a = login(&mut c, &u, 0);
    let _ = c.frames(watcher);
    let a2 = {
        let (conn, _) = c.login_caps(u[0], key(1), CAPS);
        c.settle();
        conn
    };
    assert_eq!(c.closed(a), Some(ErrorCode::Replaced));
    c.close_conn(a);
    c.settle();
    assert!(
        presences(&c.frames(watcher)).is_empty(),
        "a replaced connection is no presence change"
    );
    c.close_conn(a2);
    c.settle();
    assert_eq!(presences(&c.frames(watcher)).len(), 1);
}

#[test]
fn subscriptions_expire_and_end_with_the_connection() {
    let (mut c, u) = cluster();
    let watcher = login(&mut c, &u, 2);
    subscribe(&mut c, watcher, u[0], 10, 1);
    let _ = c.frames(watcher);
    c.now += 11_000;
    for s in 0..3 {
        c.tick(s);
    }
    c.settle();
    let a = login(&mut c, &u, 0);
    assert!(presences(&c.frames(watcher)).is_empty(), "expired");
    let home: ShardId = home_shard(u[0], 3);
    assert_eq!(
        c.shards[usize::from(home)].stats().presence_subscriptions,
        0
    );
    assert!(
        c.shards[usize::from(home)]
            .stats()
            .presence_subscriptions_expired
            >= 1
    );

    // A subscription ends when its connection closes.
    subscribe(&mut c, watcher, u[0], 60, 2);
    assert_eq!(
        c.shards[usize::from(home)].stats().presence_subscriptions,
        1
    );
    c.close_conn(watcher);
    c.settle();
    assert_eq!(
        c.shards[usize::from(home)].stats().presence_subscriptions,
        0
    );
    c.close_conn(a);
    c.settle();

    // A TTL longer than the cap is cut to it.
    let watcher = login(&mut c, &u, 2);
    subscribe(&mut c, watcher, u[0], u32::MAX, 3);
    let _ = c.frames(watcher);
    c.now += 601_000;
    c.tick(home);
    c.settle();
    let _a = login(&mut c, &u, 0);
    assert!(presences(&c.frames(watcher)).is_empty(), "capped at 600 s");
}

#[test]
fn subscription_caps_refuse_with_typed_errors() {
    let mut c = Cluster::new(2, |cfg| {
        cfg.presence_subscriptions_per_conn_max = 2;
        cfg.presence_subscribers_per_user_max = 1;
    });
    let users: Vec<u64> = (0..4)
        .map(|i| user_on(i % 2, 2, usize::from(i / 2)))
        .collect();
    for (i, &u) in users.iter().enumerate() {
        c.register(u, key(i as u64 + 1));
    }
    let (w, _) = c.login_caps(users[0], key(1), CAPS);
    subscribe(&mut c, w, users[1], 60, 1);
    subscribe(&mut c, w, users[2], 60, 2);
    subscribe(&mut c, w, users[1], 60, 3); // a renewal fits
    subscribe(&mut c, w, users[3], 60, 4);
    let f = c.frames(w);
    assert_eq!(presences(&f).len(), 3, "{f:?}");
    assert_eq!(errors(&f), vec![(ErrorCode::PresenceSubscriptionLimit, 4)]);

    let (w2, _) = c.login_caps(users[3], key(4), CAPS);
    subscribe(&mut c, w2, users[1], 60, 5);
    assert_eq!(
        errors(&c.frames(w2)),
        vec![(ErrorCode::PresenceSubscriberLimit, 5)]
    );
    let total: u64 = c
        .shards
        .iter()
        .map(|s| s.stats().presence_subscription_limit + s.stats().presence_subscriber_limit)
        .sum();
    assert_eq!(total, 2);
}

#[test]
fn privacy_settings_contacts_and_reciprocity() {
    let (mut c, u) = cluster();
    let a = login(&mut c, &u, 0);
    c.now += 1_000;
    let seen = c.now;
    c.close_conn(a);
    c.settle();
    for s in 0..3 {
        c.tick(s);
    }
    c.settle();
    let a = login(&mut c, &u, 0);
    set_privacy(&mut c, a, Visibility::CONTACTS, Visibility::CONTACTS);
    let f = edit(&mut c, a, ContactOp::ADD, vec![u[2]]);
    assert!(f
        .iter()
        .any(|f| matches!(f, Frame::PrivacyState(s) if s.contacts == 1)));
    c.close_conn(a);
    c.settle();
    let gone = c.now;
    let _ = seen;

    // A contact sees the last seen; a non-contact sees nothing.
    let contact = login(&mut c, &u, 2);
    subscribe(&mut c, contact, u[0], 60, 1);
    let p = presences(&c.frames(contact));
    assert_eq!(
        (p[0].state, p[0].last_seen_ms),
        (PresenceState::OFFLINE, gone)
    );
    let stranger = login(&mut c, &u, 1);
    subscribe(&mut c, stranger, u[0], 60, 2);
    let p = presences(&c.frames(stranger));
    assert_eq!(
        (p[0].state, p[0].last_seen_ms),
        (PresenceState::UNAVAILABLE, 0)
    );

    // The owner coming online: the contact hears it, the stranger does not.
    let a = login(&mut c, &u, 0);
    assert_eq!(
        presences(&c.frames(contact))[0].state,
        PresenceState::ONLINE
    );
    assert!(presences(&c.frames(stranger)).is_empty());

    // Reciprocity: the contact hides its own last seen and online status, so at once it
    // cannot see A's any more (its subscription is sent again with its new side).
    c.frame(
        contact,
        Frame::PrivacySet(PrivacySet {
            request_id: 9,
            last_seen: Visibility::NOBODY,
            online: Visibility::NOBODY,
        }),
    );
    c.settle();
    let p = presences(&c.frames(contact));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].request_id, p[0].state),
        (0, PresenceState::UNAVAILABLE)
    );
    subscribe(&mut c, contact, u[0], 60, 3);
    assert_eq!(
        presences(&c.frames(contact))[0].state,
        PresenceState::UNAVAILABLE
    );

    // The owner hiding everything takes effect at once for its subscribers.
    set_privacy(&mut c, contact, Visibility::EVERYONE, Visibility::EVERYONE);
    subscribe(&mut c, contact, u[0], 60, 4);
    assert_eq!(
        presences(&c.frames(contact))[0].state,
        PresenceState::ONLINE
    );
    set_privacy(&mut c, a, Visibility::NOBODY, Visibility::NOBODY);
    let p = presences(&c.frames(contact));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].state, PresenceState::UNAVAILABLE);

    // Online hidden, last seen visible: shown offline with the previous last seen.
    set_privacy(&mut c, a, Visibility::EVERYONE, Visibility::NOBODY);
    let p = presences(&c.frames(contact));
    assert_eq!(
        (p[0].state, p[0].last_seen_ms),
        (PresenceState::OFFLINE, gone)
    );
}

#[test]
fn contact_list_is_capped() {
    let mut c = Cluster::new(1, |cfg| cfg.contacts_per_user_max = 3);
    let a = user_on(0, 1, 0);
    c.register(a, key(1));
    let (conn, _) = c.login_caps(a, key(1), CAPS);
    let f = edit(&mut c, conn, ContactOp::ADD, vec![a + 1, a + 2]);
    assert!(errors(&f).is_empty(), "{f:?}");
    let f = edit(&mut c, conn, ContactOp::ADD, vec![a + 2, a + 3, a + 4]);
    assert_eq!(errors(&f), vec![(ErrorCode::ContactLimit, 11)]);
    let f = edit(&mut c, conn, ContactOp::ADD, vec![a + 2, a + 3]);
    assert!(f
        .iter()
        .any(|f| matches!(f, Frame::PrivacyState(s) if s.contacts == 3)));
    assert_eq!(c.shards[0].stats().presence_contact_limit, 1);
}

#[test]
fn blocking_hides_presence_drops_messages_with_a_tick_and_typing() {
    let (mut c, u) = cluster();
    let a = login(&mut c, &u, 0);
    let b = login(&mut c, &u, 1);
    let f = edit(&mut c, a, ContactOp::BLOCK, vec![u[1]]);
    assert!(f
        .iter()
        .any(|f| matches!(f, Frame::PrivacyState(s) if s.blocked == 1)));

    subscribe(&mut c, b, u[0], 60, 1);
    assert_eq!(presences(&c.frames(b))[0].state, PresenceState::UNAVAILABLE);

    c.frame(
        b,
        Frame::Send(frame::Send {
            client_msg_id: 77,
            to: Address::device(u[0], 0),
            msg_type: MsgType::TEXT,
            payload: bytes::Bytes::from_static(b"hi"),
        }),
    );
    c.settle();
    let fb = c.frames(b);
    assert!(
        fb.iter()
            .any(|f| matches!(f, Frame::ServerAck(a) if a.client_msg_id == 77)),
        "the blocked sender gets its tick: {fb:?}"
    );
    c.frame(
        b,
        Frame::Typing(Typing {
            to_user: u[0],
            state: TypingState::COMPOSING,
        }),
    );
    c.settle();
    let fa = c.frames(a);
    assert!(
        !fa.iter()
            .any(|f| matches!(f, Frame::Deliver(_) | Frame::TypingNotice(_))),
        "{fa:?}"
    );
    let home = usize::from(home_shard(u[0], 3));
    assert!(c.shards[home].stats().presence_blocked_drops >= 2);
    assert!(
        !c.journals[home]
            .entries()
            .iter()
            .any(|e| matches!(e.record, Record::Message { .. })),
        "nothing stored for a blocked sender"
    );

    // Unblocked: messages flow again.
    edit(&mut c, a, ContactOp::UNBLOCK, vec![u[1]]);
    c.frame(b, common_send(u[0], 78));
    c.settle();
    assert!(c
        .frames(a)
        .iter()
        .any(|f| matches!(f, Frame::Deliver(d) if d.message.client_msg_id == 78)));
}

fn common_send(to: u64, id: u64) -> Frame {
    Frame::Send(frame::Send {
        client_msg_id: id,
        to: Address::device(to, 0),
        msg_type: MsgType::TEXT,
        payload: bytes::Bytes::from_static(b"x"),
    })
}

#[test]
fn typing_is_relayed_to_online_devices_rate_limited_and_never_stored() {
    let mut c = Cluster::new(3, |cfg| cfg.typing_per_device_per_s = 2);
    let u: Vec<u64> = (0..2).map(|i| user_on(i, 3, 0)).collect();
    c.register(u[0], key(1));
    c.register(u[1], key(2));
    let (a, _) = c.login_caps(u[0], key(1), CAPS);
    let before: usize = c.journals.iter().map(|j| j.entries().len()).sum();
    let typing = Frame::Typing(Typing {
        to_user: u[1],
        state: TypingState::COMPOSING,
    });
    // The partner offline: dropped.
    c.frame(a, typing.clone());
    c.settle();
    let (b, _) = c.login_caps(u[1], key(2), CAPS);
    c.now += 1_000;
    c.frame(a, typing.clone());
    c.frame(a, typing.clone());
    c.frame(a, typing.clone());
    c.settle();
    let got: Vec<Frame> = c
        .frames(b)
        .into_iter()
        .filter(|f| matches!(f, Frame::TypingNotice(_)))
        .collect();
    assert_eq!(
        got,
        vec![
            Frame::TypingNotice(frame::TypingNotice {
                from_user: u[0],
                state: TypingState::COMPOSING
            });
            2
        ]
    );
    assert_eq!(
        errors(&c.frames(a)),
        vec![(ErrorCode::TypingRateLimited, 0)]
    );
    let after: usize = c.journals.iter().map(|j| j.entries().len()).sum();
    // Only the login of b appends nothing either: typing wrote no record.
    assert_eq!(after, before, "typing is never stored");
}

#[test]
fn a_frame_without_its_capability_closes_the_connection() {
    let mut c = Cluster::new(1, |_| {});
    let a = user_on(0, 1, 0);
    c.register(a, key(1));
    let (conn, _) = c.login_caps(a, key(1), capability::MESSAGING);
    subscribe(&mut c, conn, a + 1, 60, 1);
    assert_eq!(c.closed(conn), Some(ErrorCode::CapabilityNotAnnounced));
}

#[test]
fn settings_lists_and_last_seen_survive_recovery_and_compaction() {
    // Small segments so compaction moves the privacy records.
    let mut c = Cluster::with_segments(1, 4, |cfg| cfg.compaction_live_ratio = 1.01);
    let users: Vec<u64> = (0..3).map(|i| user_on(0, 1, i)).collect();
    for (i, &u) in users.iter().enumerate() {
        c.register(u, key(i as u64 + 1));
    }
    let (a, _) = c.login_caps(users[0], key(1), CAPS);
    set_privacy(&mut c, a, Visibility::CONTACTS, Visibility::NOBODY);
    edit(&mut c, a, ContactOp::ADD, vec![users[1]]);
    edit(&mut c, a, ContactOp::BLOCK, vec![users[2]]);
    c.now += 2_000;
    let gone = c.now;
    c.close_conn(a);
    c.settle();
    c.tick(0);
    c.settle();
    assert_eq!(c.shards[0].stats().presence_last_seen_records, 1);
    // Churn the log so the first segments are compacted away.
    for round in 0..6 {
        c.now += 1_000;
        c.tick(0);
        c.settle();
        let (b, _) = c.login_caps(users[1], key(2), CAPS);
        c.frame(b, common_send(users[1], 1000 + round));
        c.settle();
        for _ in 0..4 {
            let seqs: Vec<u64> = c
                .frames(b)
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Deliver(d) => Some(d.seq),
                    Frame::Receipt(r) => Some(r.seq),
                    _ => None,
                })
                .collect();
            if seqs.is_empty() {
                break;
            }
            c.frame(b, Frame::Ack(frame::Ack { seqs }));
            c.settle();
        }
        c.close_conn(b);
        c.settle();
    }
    assert!(
        c.shards[0].stats().segments_compacted + c.shards[0].stats().segments_deleted > 0,
        "{:?}",
        c.shards[0].stats()
    );
    let mut shard = c.recovered(0);
    // Ask the recovered shard through the protocol: a contact sees the last seen, the blocked
    // user nothing, settings as set.
    let mut j = common::TestJournal::new(1000);
    let conn = 9_000;
    let now = c.now;
    let (b_key, b_user) = (key(2), users[1]);
    shard.handle(
        now,
        switchboard_shards::Event::Connected {
            conn,
            peer_ip: common::ip(3),
            static_key: b_key,
        },
        &mut j,
    );
    shard.handle(
        now,
        switchboard_shards::Event::Frame {
            conn,
            frame: Frame::Login(frame::Login {
                addr: protocol::DeviceAddr::new(b_user, 0),
                revision: 1,
                capabilities: CAPS,
            }),
        },
        &mut j,
    );
    shard.handle(
        now,
        switchboard_shards::Event::Frame {
            conn,
            frame: Frame::PresenceSubscribe(PresenceSubscribe {
                request_id: 4,
                user: users[0],
                ttl_s: 60,
            }),
        },
        &mut j,
    );
    let frames: Vec<Frame> = shard
        .drain_actions()
        .filter_map(|a| match a {
            switchboard_shards::Action::Send { frame, .. } => Some(frame),
            _ => None,
        })
        .collect();
    let p = presences(&frames);
    assert_eq!(p.len(), 1, "{frames:?}");
    assert_eq!(
        (p[0].state, p[0].last_seen_ms),
        (PresenceState::OFFLINE, gone)
    );
    // The block list survived: a message from the blocked user is not stored.
    let recs: Vec<Record> = c.journals[0]
        .entries()
        .into_iter()
        .map(|e| e.record)
        .collect();
    assert!(recs
        .iter()
        .any(|r| matches!(r, Record::Blocked { users: b, .. } if b == &vec![users[2]])));
}
