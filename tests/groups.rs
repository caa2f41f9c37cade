//! Groups against the real daemon over TCP, through the SDK with end-to-end encryption on:
//! a 50-member group across both shards with some members offline (every member device gets
//! every message once, in order, and decrypts it; the offline ones drain on reconnect, and the
//! payload is stored once per shard); a removal (the remover and the other senders rotate, the
//! removed member gets nothing new and cannot decrypt later ciphertext nor a replay);
//! admin-only operations refused for non-admins; the member limit, configured and at its
//! default of 1024 (the 1,025th member is refused); and the aggregated receipts (delivered to
//! all 49 other member devices, in one answer).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::groups::{GroupClient, GroupUpdate};
use client::protocol::group::{GroupBody, GroupEnvelope, GroupOp};
use client::{Connection, Error, Event, Identity, ServerCode, Session, SessionOptions, Timeouts};
use common::Daemon;
use protocol::{DeviceAddr, ErrorCode};

/// Phone numbers alternating between the two shards.
fn users(n: usize) -> Vec<u64> {
    common::phones_across_shards(14_155_551_000, 2, n)
}

fn options() -> SessionOptions {
    SessionOptions {
        e2ee: true,
        prekey_top_up: 10,
        ..SessionOptions::default()
    }
}

fn login(d: &Daemon, dir: &Path, phone: u64) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    let mut s = Connection::connect(d.addr.to_string().as_str(), &id, Timeouts::default())
        .unwrap()
        .login_with(phone, 0, options())
        .unwrap();
    // The first prekey upload, so others can start sessions with this device.
    s.upload_prekeys(10).unwrap();
    s
}

/// A member: its session and group client.
struct Member {
    user: u64,
    dir: std::path::PathBuf,
    s: Option<Session>,
    g: GroupClient,
    /// Group messages decrypted so far: (gseq, plaintext).
    got: Vec<(u64, String)>,
    /// Raw envelopes of group messages delivered (for the replay checks).
    raw: Vec<(DeviceAddr, GroupEnvelope)>,
    events: Vec<(u64, GroupOp)>,
    undecryptable: usize,
}

impl Member {
    fn s(&mut self) -> &mut Session {
        self.s.as_mut().unwrap()
    }

    /// Handles events for up to `window` or until `done` holds.
    fn pump(&mut self, window: Duration, done: impl Fn(&Member) -> bool) {
        let deadline = Instant::now() + window;
        while !done(self) && Instant::now() < deadline {
            let s = self.s.as_mut().unwrap();
            let Some(ev) = s.recv(Some(Duration::from_millis(100))).unwrap() else {
                continue;
            };
            if let Event::Group { from, envelope, .. } = &ev {
                if matches!(envelope.body, GroupBody::Message(_)) {
                    self.raw.push((*from, envelope.clone()));
                }
            }
            match self.g.handle(s, &ev) {
                Some(GroupUpdate::Message {
                    gseq, plaintext, ..
                }) => self.got.push((gseq, String::from_utf8(plaintext).unwrap())),
                Some(GroupUpdate::Event { gseq, event, .. }) => self.events.push((gseq, event.op)),
                Some(GroupUpdate::Undecryptable { .. }) => self.undecryptable += 1,
                _ => {}
            }
        }
        self.s().flush_acks().unwrap();
    }

    fn texts(&self) -> Vec<&str> {
        self.got.iter().map(|(_, t)| t.as_str()).collect()
    }
}

fn members(d: &Daemon, root: &Path, phones: &[u64]) -> Vec<Member> {
    phones
        .iter()
        .map(|&user| {
            let dir = root.join(user.to_string());
            common::register_device(d, &dir, user);
            let s = login(d, &dir, user);
            Member {
                user,
                dir,
                s: Some(s),
                g: GroupClient::new(),
                got: Vec::new(),
                raw: Vec::new(),
                events: Vec::new(),
                undecryptable: 0,
            }
        })
        .collect()
}

fn server_code(e: Error) -> Option<ErrorCode> {
    match e {
        Error::Server { code, .. } => code.known(),
        _ => None,
    }
}

fn daemon(extra: &[(&str, &str)]) -> Daemon {
    let mut args = vec![("register-per-ip-per-hour", "1000")];
    args.extend_from_slice(extra);
    Daemon::start(2, &args)
}

#[test]
fn fifty_members_on_both_shards_get_every_message_once_in_order_offline_ones_on_reconnect() {
    let d = daemon(&[("group-members-max", "50")]);
    let tmp = tempfile::tempdir().unwrap();
    let phones = users(51);
    let mut m = members(&d, tmp.path(), &phones);
    let others: Vec<u64> = phones[1..50].to_vec();
    let info = {
        let a = &mut m[0];
        a.g.create(a.s.as_mut().unwrap(), &others).unwrap()
    };
    let group = info.group;
    assert_eq!(info.roster.members.len(), 50);
    // The 51st member is refused (the configured limit).
    {
        let a = &mut m[0];
        let e =
            a.g.add(a.s.as_mut().unwrap(), group, &[phones[50]])
                .unwrap_err();
        assert_eq!(server_code(e), Some(ErrorCode::GroupFull));
    }
    // Ten members (both shards) go offline.
    let offline: Vec<usize> = (40..50).collect();
    for &i in &offline {
        m[i].s.take().unwrap().close().unwrap();
    }
    // Two senders, on both shards, three messages each, interleaved.
    for round in 0..3 {
        for sender in [0usize, 1] {
            let text = format!("m{round} from {sender}");
            let s = &mut m[sender];
            let id =
                s.g.send(s.s.as_mut().unwrap(), group, text.as_bytes())
                    .unwrap();
            s.s().wait_server_ack(id, Duration::from_secs(30)).unwrap();
        }
    }
    let want_from = |me: usize| -> Vec<String> {
        let mut v = Vec::new();
        for round in 0..3 {
            for sender in [0usize, 1] {
                if sender != me {
                    v.push(format!("m{round} from {sender}"));
                }
            }
        }
        v
    };
    for (i, x) in m.iter_mut().enumerate().take(40) {
        let want = want_from(i).len();
        x.pump(Duration::from_secs(20), |x| x.got.len() >= want);
    }
    for &i in &offline {
        let s = login(&d, &m[i].dir.clone(), m[i].user);
        m[i].s = Some(s);
        let want = want_from(i).len();
        m[i].pump(Duration::from_secs(20), |x| x.got.len() >= want);
    }
    // A short extra window: nothing more (no duplicates) arrives.
    for x in m.iter_mut().take(50).step_by(7) {
        x.pump(Duration::from_millis(300), |_| false);
    }
    for (i, x) in m.iter().enumerate().take(50) {
        assert_eq!(x.texts(), want_from(i), "member {i} ({})", x.user);
        assert_eq!(x.undecryptable, 0, "member {i}");
        let gseqs: Vec<u64> = x.got.iter().map(|g| g.0).collect();
        assert!(
            gseqs.windows(2).all(|w| w[0] < w[1]),
            "member {i}: {gseqs:?}"
        );
        if i != 0 {
            assert!(x.events.contains(&(1, GroupOp::CREATED)), "member {i}");
        }
    }
    // Receipts at group scale: the sender's first message reached all 49 other member
    // devices (each acknowledged it), aggregated by the server into one answer.
    let first_gseq = m[1].got.first().unwrap().0;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = GroupClient::receipts(m[0].s(), group, first_gseq).unwrap();
        if r.delivered == 49 {
            assert_eq!(r.devices, 49);
            break;
        }
        assert!(Instant::now() < deadline, "receipts stuck at {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One upload per message; stored once per destination shard per message (two shards).
    assert_eq!(d.metric_sum("switchboard_group_messages_total"), 6.0);
    let copies = d.metric_sum("switchboard_group_copies_stored_total");
    assert!((12.0..=14.0).contains(&copies), "{copies}");
    assert_eq!(d.metric_sum("switchboard_group_refused_full_total"), 1.0);
}

#[test]
fn removal_rotates_keys_and_the_removed_member_cannot_read_later_messages() {
    let d = daemon(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let phones = users(4);
    let mut m = members(&d, tmp.path(), &phones);
    let group = {
        let a = &mut m[0];
        a.g.create(a.s.as_mut().unwrap(), &phones[1..])
            .unwrap()
            .group
    };
    // Non-admins may not add, remove, promote or change settings.
    {
        let c = &mut m[2];
        let s = c.s.as_mut().unwrap();
        for (op, users) in [
            (GroupOp::ADD, vec![19_175_550_123u64]),
            (GroupOp::REMOVE, vec![phones[3]]),
            (GroupOp::PROMOTE, vec![phones[2]]),
            (GroupOp::ADMINS_ONLY_OFF, vec![]),
        ] {
            let e = c.g.change(s, group, op, &users).unwrap_err();
            assert_eq!(server_code(e), Some(ErrorCode::NotGroupAdmin), "{op:?}");
        }
    }
    let send = |x: &mut Member, text: &str| {
        let id =
            x.g.send(x.s.as_mut().unwrap(), group, text.as_bytes())
                .unwrap();
        x.s().wait_server_ack(id, Duration::from_secs(30)).unwrap();
    };
    send(&mut m[0], "before");
    send(&mut m[1], "bob before");
    for (i, x) in m.iter_mut().enumerate().skip(1) {
        let want = if i == 1 { 1 } else { 2 };
        x.pump(Duration::from_secs(10), |x| x.got.len() >= want);
    }
    m[0].pump(Duration::from_secs(10), |x| !x.got.is_empty());
    let key_before = m[0].s().e2ee().unwrap().sender_key_id(group);
    // Alice removes Dave; everyone who sends afterwards rotates first.
    {
        let a = &mut m[0];
        a.g.remove(a.s.as_mut().unwrap(), group, &[phones[3]])
            .unwrap();
    }
    m[1].pump(Duration::from_secs(10), |x| {
        x.events.iter().any(|e| e.1 == GroupOp::REMOVE)
    });
    send(&mut m[0], "after");
    send(&mut m[1], "bob after");
    let key_after = m[0].s().e2ee().unwrap().sender_key_id(group);
    assert_ne!(key_before, key_after, "the remover rotated its sender key");
    m[2].pump(Duration::from_secs(10), |x| x.got.len() >= 4);
    assert_eq!(
        m[2].texts(),
        vec!["before", "bob before", "after", "bob after"]
    );
    // Dave got the removal and nothing after it.
    m[3].pump(Duration::from_secs(2), |_| false);
    assert!(m[3].events.iter().any(|e| e.1 == GroupOp::REMOVE));
    assert_eq!(m[3].texts(), vec!["before", "bob before"]);
    // Given the new ciphertexts (an old mailbox entry, a leak) Dave cannot decrypt them, nor a
    // replay of what it already read.
    let leaked: Vec<(DeviceAddr, GroupEnvelope)> = m[2].raw.clone();
    assert_eq!(leaked.len(), 4);
    let dave = &mut m[3];
    let mut refused = 0;
    for (from, envelope) in leaked {
        let ev = Event::Group {
            from,
            server_ts_ms: 0,
            envelope,
        };
        match dave.g.handle(dave.s.as_mut().unwrap(), &ev) {
            Some(GroupUpdate::Undecryptable { .. }) => refused += 1,
            other => panic!("the removed member opened a group message: {other:?}"),
        }
    }
    assert_eq!(refused, 4);
    // And the server refuses it as a sender.
    let ct = Bytes::from_static(b"not a member any more");
    let s = dave.s.as_mut().unwrap();
    let id = s.group_send(group, ct).unwrap();
    match s.wait_server_ack(id, Duration::from_secs(10)).unwrap_err() {
        Error::SendRejected { code, .. } => {
            assert_eq!(code, ServerCode(ErrorCode::NotGroupMember as u16))
        }
        e => panic!("{e}"),
    }
}

#[test]
fn the_default_limit_refuses_the_1025th_member() {
    let d = daemon(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let phones = users(1);
    let mut m = members(&d, tmp.path(), &phones);
    // Members need not be registered for the count; 1,024 others plus the creator is 1,025.
    let others: Vec<u64> = (0..1024u64).map(|i| 12_125_550_000 + i).collect();
    let a = &mut m[0];
    let s = a.s.as_mut().unwrap();
    let e = a.g.create(s, &others).unwrap_err();
    assert_eq!(server_code(e), Some(ErrorCode::GroupFull));
    let info = a.g.create(s, &others[..1023]).unwrap();
    assert_eq!(info.roster.members.len(), 1024);
    let e = a.g.add(s, info.group, &[19_175_550_199]).unwrap_err();
    assert_eq!(server_code(e), Some(ErrorCode::GroupFull));
}
