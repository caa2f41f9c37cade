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
