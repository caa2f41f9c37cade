//! Rule tests of media slots on the home shard: a granted slot's URL carries a token that
//! verifies under the secret and names exactly the request; class limits, the daily quota and
//! the per-minute rate refuse with their typed errors before anything is granted; media needs
//! the capability, a configured endpoint and a login; slot ids never repeat.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use common::{key, Cluster};
use protocol::frame::{MediaClass, MediaDownloadRequest, MediaSlotRequest};
use protocol::media::{Token, TokenOp};
use protocol::{capability, frame, ErrorCode, Frame};
use switchboard_shards::media::MediaSecret;
use switchboard_shards::ConnId;

const CAPS: u64 = capability::MESSAGING | capability::MEDIA;
const SECRET: [u8; 32] = [0x5C; 32];
const MIB: u64 = 1 << 20;

fn cluster(tweak: impl Fn(&mut switchboard_shards::Config)) -> Cluster {
    Cluster::new(2, |c| {
        c.media.secret = MediaSecret(SECRET);
        c.media.public_url = "http://media.test".into();
        tweak(c);
    })
}

fn ask(c: &mut Cluster, conn: ConnId, class: MediaClass, size: u64) -> Frame {
    c.frame(
        conn,
        Frame::MediaSlotRequest(MediaSlotRequest {
            request_id: 77,
            class,
            size,
            sha256: [3; 32],
        }),
    );
    let mut frames = c.frames(conn);
    assert_eq!(frames.len(), 1, "{frames:?}");
    frames.remove(0)
}

fn refused(f: &Frame) -> ErrorCode {
    match f {
        Frame::Error(frame::Error { code, ref_id, .. }) => {
            assert_eq!(*ref_id, 77);
            ErrorCode::from_u16(*code).unwrap()
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

fn token_of(url: &str) -> &str {
    url.rsplit_once('/').unwrap().1
}

#[test]
fn a_granted_slot_carries_a_token_for_exactly_the_request() {
    let mut c = cluster(|_| {});
    let user = 12025550400;
    c.register(user, key(1));
    let (conn, _) = c.login_caps(user, key(1), CAPS);
    let Frame::MediaSlot(s) = ask(&mut c, conn, MediaClass::VIDEO, 100 * MIB) else {
        panic!("no slot");
    };
    assert!(s.url.0.starts_with("http://media.test/v1/upload/"));
    let now_s = c.now / 1000;
    let t = Token::verify(token_of(&s.url.0), &SECRET, TokenOp::UPLOAD, now_s).unwrap();
    assert_eq!((t.user, t.slot_id, t.size), (user, s.slot_id, 100 * MIB));
    assert_eq!((t.sha256, t.class), ([3; 32], MediaClass::VIDEO));
    assert_eq!(t.expires_at_s, (c.now + 3_600_000) / 1000);
    assert_eq!(s.expires_at_ms, t.expires_at_s * 1000);
    // Another secret does not verify it; slot ids grow.
    assert!(Token::verify(token_of(&s.url.0), &[0; 32], TokenOp::UPLOAD, now_s).is_err());
    let Frame::MediaSlot(s2) = ask(&mut c, conn, MediaClass::IMAGE, 1) else {
        panic!("no slot");
    };
    assert!(s2.slot_id > s.slot_id);

    c.frame(
        conn,
        Frame::MediaDownloadRequest(MediaDownloadRequest {
            request_id: 78,
            sha256: [3; 32],
        }),
    );
    let frames = c.frames(conn);
    let Some(Frame::MediaDownload(d)) = frames.first() else {
        panic!("{frames:?}");
    };
    let t = Token::verify(token_of(&d.url.0), &SECRET, TokenOp::DOWNLOAD, now_s).unwrap();
    assert_eq!((t.user, t.sha256, t.size), (user, [3; 32], 0));
}

#[test]
fn class_limits_quota_and_rate_refuse_before_granting() {
    let mut c = cluster(|c| {
        c.media.quota_bytes_per_day = 20 * MIB;
        c.media.requests_per_minute = 5;
    });
    let user = 12025550410;
    c.register(user, key(2));
    let (conn, _) = c.login_caps(user, key(2), CAPS);
    let e = refused(&ask(&mut c, conn, MediaClass::IMAGE, 16 * MIB + 1));
    assert_eq!(e, ErrorCode::MediaTooLarge);
    let e = refused(&ask(&mut c, conn, MediaClass::DOCUMENT, 0));
    assert_eq!(e, ErrorCode::MediaTooLarge);
    assert!(matches!(
        ask(&mut c, conn, MediaClass::IMAGE, 16 * MIB),
        Frame::MediaSlot(_)
    ));
    // 16 + 8 > 20 MiB: over the quota; a refused request charges nothing.
    let e = refused(&ask(&mut c, conn, MediaClass::IMAGE, 8 * MIB));
    assert_eq!(e, ErrorCode::MediaQuotaExceeded);
    assert!(matches!(
        ask(&mut c, conn, MediaClass::IMAGE, 4 * MIB),
        Frame::MediaSlot(_)
    ));
    // Five requests this minute so far: the sixth is rate limited.
    let e = refused(&ask(&mut c, conn, MediaClass::IMAGE, 1));
    assert_eq!(e, ErrorCode::MediaRateLimited);
    // A minute later the rate allows again; a day later the quota is fresh.
    c.now += 60_000;
    let e = refused(&ask(&mut c, conn, MediaClass::IMAGE, 2 * MIB));
    assert_eq!(e, ErrorCode::MediaQuotaExceeded);
    c.now += 24 * 3_600_000;
    c.tick(switchboard_shards::home_shard(user, 2));
    let _ = c.frames(conn);
    assert!(matches!(
        ask(&mut c, conn, MediaClass::IMAGE, 16 * MIB),
        Frame::MediaSlot(_)
    ));
}

#[test]
fn media_needs_the_capability_a_configured_endpoint_and_a_login() {
    let mut c = cluster(|_| {});
    let user = 12025550420;
    c.register(user, key(3));
    let (conn, _) = c.login_caps(user, key(3), capability::MESSAGING);
    let e = refused(&ask(&mut c, conn, MediaClass::IMAGE, 1));
    assert_eq!(e, ErrorCode::MediaUnavailable);

    let mut off = Cluster::new(1, |_| {});
    off.register(user, key(3));
    let (conn, _) = off.login_caps(user, key(3), CAPS);
    let e = refused(&ask(&mut off, conn, MediaClass::IMAGE, 1));
    assert_eq!(e, ErrorCode::MediaUnavailable);

    let shard = switchboard_shards::home_shard(user, 2);
    let pre = c.connect(shard, key(9), common::ip(9));
    c.frame(
        pre,
        Frame::MediaSlotRequest(MediaSlotRequest {
            request_id: 1,
            class: MediaClass::IMAGE,
            size: 1,
            sha256: [0; 32],
        }),
    );
    assert_eq!(c.closed(pre), Some(ErrorCode::NotAuthenticated));
}

// ----- status posts ----------------------------------------------------------------------

fn publish(c: &mut Cluster, conn: ConnId, post_id: u64, blob: u8, audience: &[u64]) -> Frame {
    c.frame(
        conn,
        Frame::StatusPublish(frame::StatusPublish {
            post_id,
            refs: frame::StatusRefs {
                blobs: vec![[blob; 32]],
                audience: audience.to_vec(),
            },
        }),
    );
    c.settle();
    let mut frames = c.frames(conn);
    assert_eq!(frames.len(), 1, "{frames:?}");
    frames.remove(0)
}

fn media_actions(c: &mut Cluster) -> Vec<switchboard_shards::Action> {
    let mut got = Vec::new();
    c.out.retain(|(_, a)| {
        let media = matches!(
            a,
            switchboard_shards::Action::MediaAcl { .. }
                | switchboard_shards::Action::MediaDelete { .. }
        );
        if media {
            got.push(a.clone());
        }
        !media
    });
    got
}

#[test]
fn a_status_post_restricts_its_blobs_and_is_deleted_with_them_at_expiry() {
    let mut c = cluster(|c| c.status_ttl_ms = 60_000);
    let user = 12025550430;
    c.register(user, key(4));
    let (conn, _) = c.login_caps(user, key(4), CAPS);
    let f = publish(&mut c, conn, 5, 0xAA, &[7, 8]);
    assert_eq!(
        f,
        Frame::StatusPublished(frame::StatusPublished {
            post_id: 5,
            expires_at_ms: c.now + 60_000
        })
    );
    let acts = media_actions(&mut c);
    assert_eq!(
        acts,
        vec![switchboard_shards::Action::MediaAcl {
            blobs: vec![[0xAA; 32]],
            users: vec![7, 8, user],
            expires_at_ms: c.now + 60_000,
        }]
    );
    // Not yet: a tick before the expiry deletes nothing.
    let home = switchboard_shards::home_shard(user, 2);
    c.now += 59_000;
    c.tick(home);
    c.settle();
    assert!(media_actions(&mut c).is_empty());
    c.now += 1_000;
    c.tick(home);
    c.settle();
    let acts = media_actions(&mut c);
    assert_eq!(
        acts,
        vec![switchboard_shards::Action::MediaDelete {
            blobs: vec![[0xAA; 32]]
        }]
    );
    assert_eq!(c.shards[usize::from(home)].stats().status_expired, 1);
    // Gone: deleting it now is NoSuchStatus.
    c.frame(
        conn,
        Frame::StatusDelete(frame::StatusDelete { post_id: 5 }),
    );
    c.settle();
    let frames = c.frames(conn);
    assert!(
        matches!(frames.first(), Some(Frame::Error(e)) if e.code == ErrorCode::NoSuchStatus as u16),
        "{frames:?}"
    );
}

#[test]
fn status_posts_survive_a_crash_and_compaction_and_the_poster_can_delete_early() {
    let mut c = Cluster::with_segments(1, 3, |c| {
        c.compaction_live_ratio = 2.0;
        c.status_posts_per_user_max = 3;
    });
    let user = 12025550440;
    c.register(user, key(5));
    let (conn, _) = c.login_caps(user, key(5), CAPS);
    assert!(matches!(
        publish(&mut c, conn, 1, 1, &[9]),
        Frame::StatusPublished(_)
    ));
    // Churn: posts published and deleted roll segments over; ticks compact the old ones.
    for i in 0..12u64 {
        assert!(matches!(
            publish(&mut c, conn, 100 + i, 2, &[9]),
            Frame::StatusPublished(_)
        ));
        c.frame(
            conn,
            Frame::StatusDelete(frame::StatusDelete { post_id: 100 + i }),
        );
        c.settle();
        assert_eq!(
            c.frames(conn),
            vec![Frame::StatusDeleted(frame::StatusDeleted {
                post_id: 100 + i
            })]
        );
        c.tick(0);
        c.settle();
    }
    assert!(c.shards[0].stats().segments_compacted > 0);
    let _ = media_actions(&mut c);
    // The limit counts live posts: two more fit, the fourth does not.
    assert!(matches!(
        publish(&mut c, conn, 2, 3, &[9]),
        Frame::StatusPublished(_)
    ));
    assert!(matches!(
        publish(&mut c, conn, 3, 3, &[9]),
        Frame::StatusPublished(_)
    ));
    let f = publish(&mut c, conn, 4, 3, &[9]);
    assert!(
        matches!(f, Frame::Error(ref e) if e.code == ErrorCode::StatusLimit as u16),
        "{f:?}"
    );

    let _ = media_actions(&mut c);
    c.crash(0);
    // After the restart the first tick announces the ACLs again (and deletes again the blobs
    // of removals still in the log).
    c.tick(0);
    c.settle();
    let acls = media_actions(&mut c);
    let posts: Vec<_> = acls
        .iter()
        .filter(|a| matches!(a, switchboard_shards::Action::MediaAcl { .. }))
        .collect();
    assert_eq!(posts.len(), 3, "{acls:?}");
    let (conn, _) = c.login_caps(user, key(5), CAPS);
    c.frame(
        conn,
        Frame::StatusDelete(frame::StatusDelete { post_id: 1 }),
    );
    c.settle();
    assert_eq!(
        c.frames(conn),
        vec![Frame::StatusDeleted(frame::StatusDeleted { post_id: 1 })]
    );
    assert_eq!(
        media_actions(&mut c),
        vec![switchboard_shards::Action::MediaDelete {
            blobs: vec![[1; 32]]
        }]
    );
}
