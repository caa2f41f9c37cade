//! SIGKILL in the middle of group fan-outs under load: a member streams group messages without
//! waiting for each ✓ while the daemon is killed; after a restart every member device (online
//! ones and ones that were offline throughout, on both shards) gets every message that was
//! ✓'d, decrypts it, once, in the group's order.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use client::groups::{GroupClient, GroupUpdate};
use client::{Connection, Event, Identity, Session, SessionOptions, Timeouts};
use common::Daemon;

fn users(n: usize) -> Vec<u64> {
    common::phones_across_shards(14_155_552_000, 2, n)
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = Connection::connect(d.addr.to_string().as_str(), &id, Timeouts::default())
            .and_then(|c| c.login_with(phone, 0, options()));
        match attempt {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "login of {phone}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Receives until `want` distinct texts arrived (or 30 s); returns them by gseq, and how
/// many group messages were handed out in all (duplicates included).
fn drain(
    s: &mut Session,
    g: &mut GroupClient,
    want: &BTreeSet<String>,
) -> (BTreeMap<u64, String>, usize) {
    let mut got = BTreeMap::new();
    let mut handed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let have: BTreeSet<&String> = got.values().collect();
        if want.iter().all(|w| have.contains(w)) {
            break;
        }
        let Some(ev) = s.recv(Some(Duration::from_millis(100))).unwrap() else {
            continue;
        };
        if let Some(GroupUpdate::Message {
            gseq, plaintext, ..
        }) = g.handle(s, &ev)
        {
            handed += 1;
            got.insert(gseq, String::from_utf8(plaintext).unwrap());
        }
    }
    s.flush_acks().unwrap();
    (got, handed)
}

#[test]
fn every_acked_group_message_reaches_every_member_device_after_a_sigkill() {
    let mut d = Daemon::start(2, &[("register-per-ip-per-hour", "1000")]);
    let tmp = tempfile::tempdir().unwrap();
    let phones = users(8);
    let dirs: Vec<_> = phones
        .iter()
        .map(|p| tmp.path().join(p.to_string()))
        .collect();
    let mut sessions: Vec<Option<Session>> = Vec::new();
    for (p, dir) in phones.iter().zip(&dirs) {
        common::register_device(&d, dir, *p);
        let mut s = login(&d, dir, *p);
        s.upload_prekeys(10).unwrap();
        sessions.push(Some(s));
    }
    let mut g = GroupClient::new();
    let sender = sessions[0].as_mut().unwrap();
    let group = g.create(sender, &phones[1..]).unwrap().group;
    // The first message distributes the key (waits for its ✓s); members 4..8 then go offline.
    let id = g.send(sender, group, b"warm-up").unwrap();
    sender.wait_server_ack(id, Duration::from_secs(30)).unwrap();
    for s in sessions.iter_mut().skip(4) {
        s.take().unwrap().close().unwrap();
    }
    // Stream without waiting; collect ✓s as they come; SIGKILL part way.
    let sender = sessions[0].as_mut().unwrap();
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    let mut acked: BTreeSet<String> = BTreeSet::from(["warm-up".to_owned()]);
    for i in 0..300 {
        let text = format!("load {i}");
        match g.send(sender, group, text.as_bytes()) {
            Ok(id) => {
                texts.insert(id, text);
            }
            Err(_) => break,
        }
        while let Ok(Some(ev)) = sender.try_recv() {
            if let Event::ServerAck { client_msg_id, .. } = ev {
                if let Some(t) = texts.get(&client_msg_id) {
                    acked.insert(t.clone());
                }
            }
        }
        if i == 150 {
            d.kill9();
            break;
        }
    }
    // What the dead connection still had buffered.
    while let Ok(Some(ev)) = sender.try_recv() {
        if let Event::ServerAck { client_msg_id, .. } = ev {
            if let Some(t) = texts.get(&client_msg_id) {
                acked.insert(t.clone());
            }
        }
    }
    assert!(
        acked.len() > 1,
        "some messages were acknowledged before the kill"
    );
    eprintln!(
        "{} of {} group messages acknowledged before the SIGKILL",
        acked.len(),
        texts.len() + 1
    );
    d.restart();
    for (i, p) in phones.iter().enumerate().skip(1) {
        drop(sessions[i].take());
        let mut s = login(&d, &dirs[i], *p);
        let mut gi = GroupClient::new();
        let (got, handed) = drain(&mut s, &mut gi, &acked);
        let have: BTreeSet<&String> = got.values().collect();
        let missing: Vec<&String> = acked.iter().filter(|a| !have.contains(a)).collect();
        assert!(
            missing.is_empty(),
            "member {i} ({p}) misses {} acked messages: {missing:?}",
            missing.len()
        );
        // Once each (the SDK drops redeliveries), in the group's order: the sender's texts
        // go up with the gseq.
        assert_eq!(handed, got.len(), "member {i}: a message handed out twice");
        let order: Vec<u64> = got
            .values()
            .filter_map(|t| t.strip_prefix("load ").map(|n| n.parse().unwrap()))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "member {i}: {order:?}"
        );
    }
}
