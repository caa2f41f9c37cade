//! Status posts end to end (real daemon, real HTTP): the audience gets the post on every
//! device and can fetch its file; a user outside the audience gets nothing and is refused the
//! blob even with its hash; viewers' read receipts reach the poster; the post and its blob are
//! gone after a short configured TTL, or at once when the poster deletes it; and all of it
//! survives kill -9.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use client::media_session;
use client::status::{delete_status, post_status, Post, StatusContent, StatusMessage};
use client::{Connection, Event, Identity, Session, Timeouts};
use common::media::*;
use common::Daemon;
use protocol::MsgType;

const ALICE: u64 = 12025550500;
const BOB: u64 = 12025550501;
const CAROL: u64 = 12025550502;

fn account(d: &Daemon, dir: &Path, phone: u64) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    let mut c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.register_request(phone).unwrap();
    let code = d.sms_code(phone);
    c.register_verify(phone, code).unwrap();
    relogin(d, dir, phone)
}

fn relogin(d: &Daemon, dir: &Path, phone: u64) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    let c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.login(phone, 0).unwrap()
}

/// The next status message for `s` (other events skipped), with its sender's message id.
fn next_status(s: &mut Session) -> (StatusMessage, u64, MsgType) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Event::Message(m)) = s.recv(Some(Duration::from_millis(200))).unwrap() {
            if StatusMessage::is_status(&m.payload) {
                let msg = StatusMessage::decode(&m.payload).unwrap();
                return (msg, m.client_msg_id, m.msg_type);
            }
        }
        assert!(Instant::now() < deadline, "no status within 20 s");
    }
}

/// Polls `f` for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn blob_file(d: &Daemon, sha: &[u8; 32]) -> std::path::PathBuf {
    d.data_dir.join("media/blobs").join(storage::blob::hex(sha))
}

#[test]
fn the_audience_sees_the_post_others_cannot_fetch_it_and_views_reach_the_poster() {
    let (d, _media) = start_media(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = account(&d, &tmp.path().join("a"), ALICE);
    let mut bob = account(&d, &tmp.path().join("b"), BOB);
    let mut carol = account(&d, &tmp.path().join("c"), CAROL);
    let pic = tmp.path().join("beach.jpg");
    let plain_sha = gen_file(&pic, 300_000, 61);

    let post = Post::File(&pic, "sunset");
    let posted = post_status(&mut alice, &[BOB], post, tmp.path(), &mut |_, _| {}).unwrap();
    assert_eq!(posted.copies.len(), 1);

    let (msg, msg_id, msg_type) = next_status(&mut bob);
    assert_eq!(msg_type, MsgType::STATUS);
    assert_eq!(
        (msg.post_id, msg.expires_at_ms),
        (posted.post_id, posted.expires_at_ms)
    );
    let StatusContent::Media(media) = &msg.content else {
        panic!("{:?}", msg.content);
    };
    assert_eq!(media.caption, "sunset");
    let got = media_session::receive_file(
        &mut bob,
        media,
        &tmp.path().join("bob-files"),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(sha_file(&got), plain_sha);

    // Bob views it: the read receipt reaches Alice with the copy's id.
    bob.flush_acks().unwrap();
    bob.mark_read(ALICE, msg_id).unwrap();
    assert_eq!(posted.copies, vec![(BOB, msg_id)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Event::Read {
            client_msg_id, by, ..
        }) = alice.recv(Some(Duration::from_millis(200))).unwrap()
        {
            assert_eq!((client_msg_id, by.user), (msg_id, BOB));
            break;
        }
        assert!(Instant::now() < deadline, "no viewed receipt within 20 s");
    }

    // Carol is not in the audience: no copy, and the blob is refused even with its hash.
    assert!(carol
        .recv(Some(Duration::from_millis(500)))
        .unwrap()
        .is_none());
    let url = carol.media_download_url(media.sha256).unwrap().url;
    let out = tmp.path().join("carol.bin");
    assert_eq!(curl(&[&url], &out), 403);
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("not_audience"));
    let e = media_session::receive_file(
        &mut carol,
        media,
        &tmp.path().join("c-files"),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, client::media::MediaError::Http { status: 403, .. }),
        "{e:?}"
    );

    // The poster deletes it early: the blob goes, a second delete is refused.
    delete_status(&mut alice, posted.post_id).unwrap();
    eventually("the blob deleted", || {
        !blob_file(&d, &media.sha256).exists()
    });
    let url = bob.media_download_url(media.sha256).unwrap().url;
    assert_eq!(curl(&[&url], &out), 404);
    assert!(delete_status(&mut alice, posted.post_id).is_err());
    // Shard counters reach /metrics at the next tick.
    eventually("the deletion counted", || {
        d.metric_sum("switchboard_status_deleted_total") >= 1.0
    });
}

#[test]
fn a_post_and_its_blob_are_gone_after_the_ttl_also_across_kill9() {
    let (mut d, _media) = start_media(1, &[("status-ttl-s", "4"), ("tick-ms", "200")]);
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = account(&d, &tmp.path().join("a"), ALICE);
    let mut bob = account(&d, &tmp.path().join("b"), BOB);
    let _carol = account(&d, &tmp.path().join("c"), CAROL);
    let clip = tmp.path().join("clip.mp4");
    gen_file(&clip, 200_000, 62);
    let post = Post::File(&clip, "");
    let posted = post_status(&mut alice, &[BOB], post, tmp.path(), &mut |_, _| {}).unwrap();
    let (msg, _, _) = next_status(&mut bob);
    let StatusContent::Media(media) = msg.content else {
        panic!()
    };
    let sha = media.sha256;
    assert!(blob_file(&d, &sha).exists());
    let text = post_status(
        &mut alice,
        &[BOB, CAROL],
        Post::Text("hello"),
        tmp.path(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_ne!(text.post_id, posted.post_id);

    // kill -9 right after the posts are durable: the restart still knows them, keeps the
    // blob restricted, and deletes post and blob when the TTL passes.
    drop(alice);
    drop(bob);
    d.kill9();
    d.restart();
    let mut carol = relogin(&d, &tmp.path().join("c"), CAROL);
    let url = carol.media_download_url(sha).unwrap().url;
    let out = tmp.path().join("out");
    eventually("the ACL re-announced or kept", || {
        curl(&[&url], &out) == 403
    });
    eventually("the blob expired", || !blob_file(&d, &sha).exists());
    assert_eq!(curl(&[&url], &out), 404);
    eventually("both posts expired", || {
        d.metric_sum("switchboard_status_expired_total") >= 2.0
    });
    let mut alice = relogin(&d, &tmp.path().join("a"), ALICE);
    assert!(
        delete_status(&mut alice, posted.post_id).is_err(),
        "expired: NoSuchStatus"
    );
}
