//! Rule tests of groups, driven through the public API with a synchronous in-memory cluster:
//! create and the membership rules (admins only, the admins-only setting, the last admin, the
//! member limit, blobs), one upload fanned out as ONE record per destination shard with one
//! mailbox entry per member device, ✓ only once durable on the group's home, per-group order,
//! the removal rule, offline members (push, drain), re-drive after a crash of either side with
//! the destination's dedup, and recovery and compaction of the group records.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::{key, user_on, Cluster};
use protocol::frame::{self, GroupDone, GroupInfo};
use protocol::group::{GroupBlobKind, GroupBody, GroupEnvelope, GroupId, GroupOp, UserList};
use protocol::{capability, DeviceAddr, ErrorCode, Frame, UserId};
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, Action, ConnId, Event, ShardId};

const CAPS: u64 = capability::MESSAGING | capability::MULTI_DEVICE | capability::GROUPS;

/// `n` registered users spread over the shards (round robin), each logged in.
fn users(c: &mut Cluster, n: usize) -> Vec<(UserId, ConnId)> {
    let shards = c.n();
    let mut out = Vec::new();
    for i in 0..n {
        let user = user_on((i % usize::from(shards)) as ShardId, shards, i);
        c.register(user, key(user));
        let (conn, _) = c.login_caps(user, key(user), CAPS);
        out.push((user, conn));
    }
    c.settle();
    for &(_, conn) in &out {
        c.frames(conn);
    }
    out
}

/// Logs `user` in again; the frames after `Welcome` stay queued for the caller.
fn relogin(c: &mut Cluster, user: UserId) -> ConnId {
    let (conn, frames) = c.login_caps(user, key(user), CAPS);
    let shard = home_shard(user, c.n());
    for f in frames.into_iter().skip(1) {
        c.out.push((shard, Action::Send { conn, frame: f }));
    }
    conn
}

fn create(c: &mut Cluster, conn: ConnId, members: &[UserId]) -> Result<GroupInfo, ErrorCode> {
    let f = Frame::GroupCreate(frame::GroupCreate {
        request_id: 77,
        members: UserList::of(members.iter().copied()),
    });
    c.frame(conn, f);
    c.settle();
    answer(c, conn, |f| match f {
        Frame::GroupInfo(i) if i.request_id == 77 => Some(i.clone()),
        _ => None,
    })
}

fn change(
    c: &mut Cluster,
    conn: ConnId,
    group: GroupId,
    op: GroupOp,
    users: &[UserId],
) -> Result<GroupDone, ErrorCode> {
    let f = Frame::GroupChange(frame::GroupChange {
        request_id: 78,
        group,
        op,
        users: UserList::of(users.iter().copied()),
    });
    c.frame(conn, f);
    c.settle();
    answer(c, conn, |f| match f {
        Frame::GroupDone(d) if d.request_id == 78 => Some(d.clone()),
        _ => None,
    })
}

fn info(c: &mut Cluster, conn: ConnId, group: GroupId) -> Result<GroupInfo, ErrorCode> {
    let f = Frame::GroupInfoFetch(frame::GroupInfoFetch {
        request_id: 79,
        group,
    });
    c.frame(conn, f);
    c.settle();
    answer(c, conn, |f| match f {
        Frame::GroupInfo(i) if i.request_id == 79 => Some(i.clone()),
        _ => None,
    })
}

/// The answer picked by `pick` among the frames of `conn` (the rest are put back), or the
/// code of an `Error`.
fn answer<T>(
    c: &mut Cluster,
    conn: ConnId,
    pick: impl Fn(&Frame) -> Option<T>,
) -> Result<T, ErrorCode> {
    let frames = c.frames(conn);
    let shard = *c.conn_shard.get(&conn).unwrap();
    let mut found = None;
    for f in frames {
        if found.is_none() {
            if let Some(t) = pick(&f) {
                found = Some(Ok(t));
                continue;
            }
            if let Frame::Error(e) = &f {
                found = Some(Err(ErrorCode::from_u16(e.code).unwrap()));
                continue;
            }
        }
        c.out.push((shard, Action::Send { conn, frame: f }));
    }
    found.expect("an answer")
}

fn send(c: &mut Cluster, conn: ConnId, group: GroupId, id: u64, text: &str) {
    let f = Frame::GroupSend(frame::GroupSend {
        client_msg_id: id,
        group,
        payload: Bytes::copy_from_slice(text.as_bytes()),
    });
    c.frame(conn, f);
}

/// Every group `Deliver` of `conn` so far: (seq, gseq, body), acknowledged.
fn group_delivers(c: &mut Cluster, conn: ConnId) -> Vec<(u64, GroupBody)> {
    let mut got = Vec::new();
    let mut seqs = Vec::new();
    for f in c.frames(conn) {
        if let Frame::Deliver(d) = f {
            let env = GroupEnvelope::decode(d.message.msg_type, &d.message.payload).unwrap();
            seqs.push(d.seq);
            got.push((env.gseq, env.body));
        }
    }
    if !seqs.is_empty() {
        c.frame(conn, Frame::Ack(frame::Ack { seqs }));
        c.settle();
    }
    got
}

fn texts(d: &[(u64, GroupBody)]) -> Vec<String> {
    d.iter()
        .filter_map(|(_, b)| match b {
            GroupBody::Message(m) => Some(String::from_utf8(m.to_vec()).unwrap()),
            GroupBody::Event(_) => None,
        })
        .collect()
}

fn acks(c: &mut Cluster, conn: ConnId) -> Vec<u64> {
    let mut got = Vec::new();
    let shard = *c.conn_shard.get(&conn).unwrap();
    for f in c.frames(conn) {
        match f {
            Frame::ServerAck(a) => got.push(a.client_msg_id),
            other => c.out.push((shard, Action::Send { conn, frame: other })),
        }
    }
    got
}

fn group_copies(c: &Cluster, s: ShardId, gseq: u64) -> Vec<Record> {
    c.journals[usize::from(s)]
        .entries()
        .into_iter()
        .map(|a| a.record)
        .filter(|r| matches!(r, Record::GroupCopy { gseq: g, .. } if *g == gseq))
        .collect()
}

#[test]
fn one_upload_is_one_record_per_destination_shard_and_reaches_every_member_device_once() {
    let mut c = Cluster::new(3, |_| {});
    let us = users(&mut c, 9);
    let (alice, a_conn) = us[0];
    let others: Vec<UserId> = us[1..].iter().map(|u| u.0).collect();
    let g = create(&mut c, a_conn, &others).unwrap();
    assert_eq!(g.roster.members.len(), 9);
    assert!(g.roster.members.iter().any(|m| m.user == alice && m.admin));
    // Everyone but the creator's own device hears of the creation.
    for &(_, conn) in &us[1..] {
        let d = group_delivers(&mut c, conn);
        assert!(
            matches!(&d[..], [(1, GroupBody::Event(e))] if e.op == GroupOp::CREATED && e.users.len() == 9)
        );
    }
    assert!(group_delivers(&mut c, a_conn).is_empty());

    send(&mut c, a_conn, g.group, 1, "hello");
    c.settle();
    assert_eq!(acks(&mut c, a_conn), vec![1]);
    for &(_, conn) in &us[1..] {
        assert_eq!(texts(&group_delivers(&mut c, conn)), vec!["hello"]);
    }
    // The sending device gets nothing back.
    assert!(group_delivers(&mut c, a_conn).is_empty());
    // Stored once per destination shard: one record, one entry per member device there.
    for s in 0..3u16 {
        let copies = group_copies(&c, s, 2);
        assert_eq!(copies.len(), 1, "shard {s}");
        let Record::GroupCopy { entries, .. } = &copies[0] else {
            unreachable!()
        };
        let want = us
            .iter()
            .filter(|u| home_shard(u.0, 3) == s && u.0 != alice)
            .count();
        assert_eq!(entries.len(), want, "shard {s}");
    }
    let home = home_shard(g.group, 3);
    assert_eq!(c.shards[usize::from(home)].stats().group_messages, 1);
    assert_eq!(c.shards[usize::from(home)].stats().group_fanouts_pending, 0);
}

#[test]
fn the_ack_waits_for_the_group_home_log_and_fan_out_waits_too() {
    let mut c = Cluster::new(2, |_| {});
    let us = users(&mut c, 4);
    let members: Vec<UserId> = us[1..].iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &members).unwrap();
    for &(_, conn) in &us {
        group_delivers(&mut c, conn);
    }
    let home = home_shard(g.group, 2);
    send(&mut c, us[0].1, g.group, 5, "x");
    c.run();
    // Not durable on the home: no ✓, nothing fanned out.
    assert!(acks(&mut c, us[0].1).is_empty());
    for &(_, conn) in &us[1..] {
        assert!(group_delivers(&mut c, conn).is_empty());
    }
    c.commit(home);
    c.run();
    assert_eq!(acks(&mut c, us[0].1), vec![5]);
    c.settle();
    for &(_, conn) in &us[1..] {
        assert_eq!(texts(&group_delivers(&mut c, conn)), vec!["x"]);
    }
}

#[test]
fn admin_rules_member_limit_and_blobs() {
    let mut c = Cluster::new(2, |cfg| cfg.group_members_max = 4);
    let us = users(&mut c, 6);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    // Five members: over the limit of four.
    assert_eq!(
        create(&mut c, us[0].1, &ids[1..5]).unwrap_err(),
        ErrorCode::GroupFull
    );
    let g = create(&mut c, us[0].1, &ids[1..3]).unwrap().group;
    // A plain member may not add while admins-only is on (the default).
    let bob = us[1].1;
    assert_eq!(
        change(&mut c, bob, g, GroupOp::ADD, &ids[3..4]).unwrap_err(),
        ErrorCode::NotGroupAdmin
    );
    assert_eq!(
        change(&mut c, bob, g, GroupOp::ADMINS_ONLY_OFF, &[]).unwrap_err(),
        ErrorCode::NotGroupAdmin
    );
    assert_eq!(
        change(&mut c, bob, g, GroupOp::PROMOTE, &ids[1..2]).unwrap_err(),
        ErrorCode::NotGroupAdmin
    );
    // A non-member may do nothing.
    assert_eq!(
        change(&mut c, us[5].1, g, GroupOp::LEAVE, &[]).unwrap_err(),
        ErrorCode::NotGroupMember
    );
    assert_eq!(
        info(&mut c, us[5].1, g).unwrap_err(),
        ErrorCode::NotGroupMember
    );
    // Event-only ops and wrong lists are invalid.
    assert_eq!(
        change(&mut c, us[0].1, g, GroupOp::CREATED, &[]).unwrap_err(),
        ErrorCode::GroupOpInvalid
    );
    assert_eq!(
        change(&mut c, us[0].1, g, GroupOp::ADD, &ids[1..2]).unwrap_err(),
        ErrorCode::GroupOpInvalid
    );
    assert_eq!(
        change(&mut c, us[0].1, g, GroupOp::DEMOTE, &ids[0..1]).unwrap_err(),
        ErrorCode::GroupOpInvalid,
        "the last admin cannot be demoted"
    );
    let d = change(&mut c, us[0].1, g, GroupOp::ADMINS_ONLY_OFF, &[]).unwrap();
    assert_eq!(d.version, 2);
    let d = change(&mut c, bob, g, GroupOp::ADD, &ids[3..4]).unwrap();
    assert_eq!((d.version, d.seq), (3, 3));
    // The fifth member is refused.
    assert_eq!(
        change(&mut c, bob, g, GroupOp::ADD, &ids[4..5]).unwrap_err(),
        ErrorCode::GroupFull
    );
    let full: u64 = c.shards.iter().map(|s| s.stats().group_refused_full).sum();
    assert_eq!(full, 2);
    // Blobs: bounded, opaque, any member.
    let blob = |n| {
        Frame::GroupSetBlob(frame::GroupSetBlob {
            request_id: 78,
            group: g,
            which: GroupBlobKind::SUBJECT,
            blob: Bytes::from(vec![7u8; n]),
        })
    };
    c.frame(bob, blob(257));
    c.settle();
    let too_long = answer(&mut c, bob, |f| match f {
        Frame::GroupDone(d) => Some(d.clone()),
        _ => None,
    });
    assert_eq!(too_long.unwrap_err(), ErrorCode::GroupBlobTooLarge);
    c.frame(bob, blob(256));
    c.settle();
    let i = info(&mut c, us[0].1, g).unwrap();
    assert_eq!(i.roster.subject.len(), 256);
    assert_eq!(i.roster.members.len(), 4);
    assert_eq!(i.flags & 1, 0);
    // The last admin leaving makes the lowest remaining user admin.
    change(&mut c, us[0].1, g, GroupOp::LEAVE, &[]).unwrap();
    let i = info(&mut c, bob, g).unwrap();
    assert_eq!(i.roster.members.len(), 3);
    assert_eq!(i.roster.members.iter().filter(|m| m.admin).count(), 1);
    assert!(i.roster.members[0].admin);
}

#[test]
fn group_requests_need_the_capability_and_a_login() {
    let mut c = Cluster::new(1, |_| {});
    let user = user_on(0, 1, 0);
    c.register(user, key(user));
    let (conn, _) = c.login_caps(user, key(user), capability::MESSAGING);
    let f = Frame::GroupCreate(frame::GroupCreate {
        request_id: 77,
        members: UserList::default(),
    });
    c.frame(conn, f.clone());
    c.settle();
    assert_eq!(
        answer(&mut c, conn, |_| None::<()>).unwrap_err(),
        ErrorCode::UnsupportedAddress
    );
    let pre = c.connect(0, key(99), common::ip(3));
    c.frame(pre, f);
    assert_eq!(c.closed(pre), Some(ErrorCode::NotAuthenticated));
}

#[test]
fn a_removal_applies_from_its_place_in_the_order() {
    let mut c = Cluster::new(2, |_| {});
    let us = users(&mut c, 4);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &ids[1..]).unwrap().group;
    for &(_, conn) in &us {
        group_delivers(&mut c, conn);
    }
    let home = home_shard(g, 2);
    // A message appended before the removal (not yet durable), then the removal, then one after.
    send(&mut c, us[1].1, g, 1, "before");
    c.run();
    let f = Frame::GroupChange(frame::GroupChange {
        request_id: 78,
        group: g,
        op: GroupOp::REMOVE,
        users: UserList::of([ids[3]]),
    });
    c.frame(us[0].1, f);
    c.run();
    send(&mut c, us[1].1, g, 2, "after");
    c.run();
    c.commit(home);
    c.settle();
    let carol = group_delivers(&mut c, us[3].1);
    // The removed member got the message before its removal and the removal itself.
    assert_eq!(texts(&carol), vec!["before"]);
    assert!(carol.iter().any(|(_, b)| matches!(b, GroupBody::Event(e) if e.op == GroupOp::REMOVE && e.users == vec![ids[3]])));
    let order: Vec<u64> = carol.iter().map(|d| d.0).collect();
    assert_eq!(order, vec![2, 3]);
    // The others get everything in the group's order.
    let bob = group_delivers(&mut c, us[2].1);
    assert_eq!(bob.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(texts(&bob), vec!["before", "after"]);
    // A removed member can neither send nor fetch.
    send(&mut c, us[3].1, g, 3, "sneak");
    c.settle();
    assert_eq!(
        answer(&mut c, us[3].1, |_| None::<()>).unwrap_err(),
        ErrorCode::NotGroupMember
    );
}

#[test]
fn offline_members_get_a_push_and_drain_in_order_on_login() {
    let mut c = Cluster::new(2, |_| {});
    let us = users(&mut c, 3);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &ids[1..]).unwrap().group;
    for &(_, conn) in &us {
        group_delivers(&mut c, conn);
    }
    c.close_conn(us[2].1);
    c.pushes();
    for i in 0..5 {
        send(&mut c, us[0].1, g, 10 + i, &format!("m{i}"));
    }
    c.settle();
    let pushes = c.pushes();
    let to_carol = pushes
        .iter()
        .filter(|a| matches!(a, Action::Push { to, .. } if to.user == ids[2]))
        .count();
    assert_eq!(to_carol, 5);
    let conn = relogin(&mut c, ids[2]);
    c.settle();
    let d = group_delivers(&mut c, conn);
    assert_eq!(texts(&d), vec!["m0", "m1", "m2", "m3", "m4"]);
}

/// Every text member `conn` got, by gseq (duplicates counted).
fn count_by_gseq(d: &[(u64, GroupBody)]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for (g, _) in d {
        *m.entry(*g).or_insert(0) += 1;
    }
    m
}

#[test]
fn fan_out_is_redriven_after_a_destination_or_home_crash_and_deduplicated() {
    let mut c = Cluster::new(2, |_| {});
    let us = users(&mut c, 6);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &ids[1..]).unwrap().group;
    for &(_, conn) in &us {
        group_delivers(&mut c, conn);
    }
    let home = home_shard(g, 2);
    let other = 1 - home;
    let sender = *us.iter().find(|u| home_shard(u.0, 2) == home).unwrap();
    // 1. The destination crashes with the fan-out in flight: the home sends it again.
    send(&mut c, sender.1, g, 1, "one");
    c.run();
    c.commit(home);
    // Deliver the durable notice but drop everything travelling to the other shard.
    c.mesh.retain(|(_, to, _)| *to != other);
    c.crash(other);
    c.event(home, Event::PeerRestarted { shard: other });
    // 2. The home crashes after ✓ (fan-out acknowledged by nobody yet).
    send(&mut c, sender.1, g, 2, "two");
    c.run();
    c.commit(home);
    c.run();
    assert!(acks(&mut c, sender.1).contains(&2));
    c.mesh.clear();
    c.crash(home);
    c.tick(home);
    c.settle();
    // Everyone (logged in again) gets both, once each, in order.
    let mut seen = Vec::new();
    for &u in &us {
        if u.0 == sender.0 {
            continue;
        }
        let conn = relogin(&mut c, u.0);
        c.settle();
        let d = group_delivers(&mut c, conn);
        let texts = texts(&d);
        assert_eq!(
            texts,
            vec!["one", "two"],
            "user {} on {} (home {home}): {d:?}",
            u.0,
            home_shard(u.0, 2)
        );
        assert!(count_by_gseq(&d).values().all(|&n| n == 1));
        seen.push(u.0);
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(c.shards[usize::from(home)].stats().group_fanouts_pending, 0);
}

#[test]
fn group_state_and_pending_fan_outs_survive_recovery_and_compaction() {
    let mut c = Cluster::with_segments(2, 8, |cfg| cfg.compaction_live_ratio = 0.9);
    let us = users(&mut c, 4);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &ids[1..3]).unwrap().group;
    change(&mut c, us[0].1, g, GroupOp::ADD, &ids[3..4]).unwrap();
    change(&mut c, us[0].1, g, GroupOp::PROMOTE, &ids[1..2]).unwrap();
    for i in 0..30 {
        send(&mut c, us[1].1, g, 100 + i, &format!("m{i}"));
        c.settle();
        for s in 0..2 {
            c.tick(s);
        }
        c.settle();
        for &(_, conn) in &us {
            group_delivers(&mut c, conn);
        }
    }
    let home = home_shard(g, 2);
    assert!(c.shards[usize::from(home)].stats().segments_deleted > 0);
    let before = info(&mut c, us[0].1, g).unwrap();
    c.crash(home);
    c.tick(home);
    c.settle();
    let conn = relogin(&mut c, ids[0]);
    let after = info(&mut c, conn, g).unwrap();
    assert_eq!(before.roster, after.roster);
    assert_eq!((before.version, before.seq), (after.version, after.seq));
    // New messages continue the sequence after recovery.
    send(&mut c, conn, g, 500, "after");
    c.settle();
    let bob = relogin(&mut c, ids[2]);
    c.settle();
    let d = group_delivers(&mut c, bob);
    assert!(d.iter().any(|(gseq, _)| *gseq == after.seq + 1), "{d:?}");
    let _ = DeviceAddr::new(0, 0);
}

#[test]
fn groups_per_user_are_capped_on_the_users_home_shards_and_released_by_removals() {
    let mut c = Cluster::new(2, |cfg| cfg.groups_per_user_max = 2);
    let us = users(&mut c, 4);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let (a, b) = (us[0].1, us[1].1);
    let g1 = create(&mut c, a, &ids[1..2]).unwrap().group;
    let g2 = create(&mut c, a, &ids[2..3]).unwrap().group;
    // Alice is in two groups: a third create is refused, nothing recorded.
    assert_eq!(
        create(&mut c, a, &ids[3..4]).unwrap_err(),
        ErrorCode::GroupsPerUserLimit
    );
    let home_a = usize::from(home_shard(ids[0], 2));
    assert_eq!(c.shards[home_a].groups_of(ids[0]), 2);
    // Dave's reservation for the refused group was given back.
    let home_d = usize::from(home_shard(ids[3], 2));
    assert_eq!(c.shards[home_d].groups_of(ids[3]), 0);
    // Bob creates two groups of his own with Carol; adding Bob to g2 (his third) is refused.
    let _g3 = create(&mut c, b, &ids[2..3]).unwrap().group;
    assert_eq!(
        change(&mut c, a, g2, GroupOp::ADD, &ids[1..2]).unwrap_err(),
        ErrorCode::GroupsPerUserLimit
    );
    // Bob is removed from g1: his count goes down (released by the removal's fan-out), and
    // the add succeeds. Counts survive a restart of Bob's home shard.
    change(&mut c, a, g1, GroupOp::REMOVE, &ids[1..2]).unwrap();
    let home_b = home_shard(ids[1], 2);
    assert_eq!(c.shards[usize::from(home_b)].groups_of(ids[1]), 1);
    change(&mut c, a, g2, GroupOp::ADD, &ids[1..2]).unwrap();
    assert_eq!(c.shards[usize::from(home_b)].groups_of(ids[1]), 2);
    c.crash(home_b);
    assert_eq!(c.shards[usize::from(home_b)].groups_of(ids[1]), 2);
    let b = relogin(&mut c, ids[1]);
    assert_eq!(
        create(&mut c, b, &ids[3..4]).unwrap_err(),
        ErrorCode::GroupsPerUserLimit
    );
    // Leaving releases too.
    change(&mut c, b, g2, GroupOp::LEAVE, &[]).unwrap();
    assert_eq!(c.shards[usize::from(home_b)].groups_of(ids[1]), 1);
    // (Counters start again at a restart: the refusal after it.)
    assert!(c.shards[usize::from(home_b)].stats().group_joins_refused >= 1);
}

#[test]
fn receipts_reach_the_sender_aggregated_at_most_once_per_message_per_tick() {
    let mut c = Cluster::new(2, |_| {});
    let us = users(&mut c, 5);
    let ids: Vec<UserId> = us.iter().map(|u| u.0).collect();
    let g = create(&mut c, us[0].1, &ids[1..4]).unwrap().group;
    for &(_, conn) in &us {
        group_delivers(&mut c, conn);
    }
    // Dave (us[3]) is offline: stored for, never acknowledged.
    c.close_conn(us[3].1);
    send(&mut c, us[0].1, g, 9, "counted");
    c.settle();
    assert_eq!(acks(&mut c, us[0].1), vec![9]);
    let gseq = {
        let d = group_delivers(&mut c, us[1].1);
        assert_eq!(texts(&d), vec!["counted"]);
        d[0].0
    };
    group_delivers(&mut c, us[2].1);
    // Carol reads it.
    let read = Frame::Read(frame::Read {
        to: protocol::Address::group(g),
        client_msg_id: gseq,
    });
    c.frame(us[2].1, read.clone());
    c.frame(us[2].1, read);
    c.settle();
    let receipts = |c: &mut Cluster| -> Vec<frame::GroupReceipt> {
        c.frames(us[0].1)
            .into_iter()
            .filter_map(|f| match f {
                Frame::GroupReceipt(r) => Some(r),
                _ => None,
            })
            .collect()
    };
    assert!(receipts(&mut c).is_empty(), "nothing before a tick");
    let mut pushed = Vec::new();
    for _ in 0..3 {
        for s in 0..2 {
            c.tick(s);
        }
        c.settle();
        let got = receipts(&mut c);
        // At most one frame per message per tick, however many devices changed.
        assert!(got.len() <= 1, "{got:?}");
        pushed.extend(got);
    }
    let last = pushed.last().expect("the sender was told");
    assert_eq!(
        (
            last.devices,
            last.delivered,
            last.read,
            last.client_msg_id,
            last.gseq
        ),
        (3, 2, 1, 9, gseq)
    );
    // The sums are what a fetch says: 3 devices, 2 delivered, 1 read (counted once).
    let f = Frame::GroupReceiptFetch(frame::GroupReceiptFetch {
        request_id: 81,
        group: g,
        gseq,
    });
    c.frame(us[1].1, f.clone());
    c.settle();
    let r = answer(&mut c, us[1].1, |f| match f {
        Frame::GroupReceipt(r) if r.request_id == 81 => Some(r.clone()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        (r.devices, r.delivered, r.read, r.client_msg_id),
        (3, 2, 1, 9)
    );
    // No more frames when nothing changes.
    for s in 0..2 {
        c.tick(s);
    }
    c.settle();
    assert!(receipts(&mut c).is_empty());
    // Non-members may not ask.
    c.frame(us[4].1, f);
    c.settle();
    assert_eq!(
        answer(&mut c, us[4].1, |_| None::<()>).unwrap_err(),
        ErrorCode::NotGroupMember
    );
}
