//! Rule tests of the prekey directory, driven through the public API with a synchronous
//! in-memory cluster: uploads (verified, all or nothing, capped), fetches across shards (one
//! one-time prekey each, answered only once its consumption is durable), racing fetches for the
//! last key, crashes before and after durability, low-water notices (online and at the next
//! login), the per-requester fetch limit, identity changes, and recovery, segment deletion and
//! compaction of the prekey records.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use common::{key, user_on, Cluster};
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason};
use protocol::{capability, frame, DeviceAddr, ErrorCode, Frame};
use rand::rngs::StdRng;
use rand::SeedableRng;
use switchboard_e2ee::keys::encode_public;
use switchboard_e2ee::IdentityKeyPair;
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, ConnId};

const CAPS: u64 = capability::MESSAGING | capability::PREKEYS;

fn error_code(f: &Frame) -> Option<ErrorCode> {
    match f {
        Frame::Error(frame::Error { code, .. }) => ErrorCode::from_u16(*code),
        _ => None,
    }
}

fn identity(seed: u64) -> IdentityKeyPair {
    IdentityKeyPair::generate(&mut StdRng::seed_from_u64(seed))
}

/// A canonical X25519 public key that encodes `n` (top byte clear).
fn x25519(n: u32, salt: u8) -> [u8; 32] {
    let mut k = [salt; 32];
    k[..4].copy_from_slice(&n.to_le_bytes());
    k[31] = 0x11;
    k
}

/// Device keys with a real signature by `id`.
fn device_keys(id: &IdentityKeyPair, spk_id: u32) -> DeviceKeys {
    let public = id.public();
    let signed_prekey = x25519(spk_id, 0xAA);
    DeviceKeys {
        identity_dh: public.dh,
        identity_sign: public.sign,
        signed_prekey_id: spk_id,
        signed_prekey,
        signed_prekey_sig: id.sign(&encode_public(&signed_prekey)),
    }
}

fn otks(ids: impl IntoIterator<Item = u32>) -> Vec<OneTimePrekey> {
    ids.into_iter()
        .map(|id| OneTimePrekey {
            id,
            key: x25519(id, 0x33),
        })
        .collect()
}

fn upload(keys: DeviceKeys, ids: impl IntoIterator<Item = u32>) -> Frame {
    Frame::PrekeyUpload(frame::PrekeyUpload {
        keys: Box::new(keys),
        one_time: otks(ids),
    })
}

fn fetch(request_id: u64, user: u64) -> Frame {
    Frame::PrekeyFetch(frame::PrekeyFetch {
        addr: DeviceAddr { user, device: 0 },
        request_id,
    })
}

fn status(frames: &[Frame]) -> Vec<(u32, PrekeyStatusReason)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::PrekeyStatus(frame::PrekeyStatus {
                one_time_remaining,
                reason,
                ..
            }) => Some((*one_time_remaining, *reason)),
            _ => None,
        })
        .collect()
}

/// The one-time prekey ids in the bundles among `frames`, by request id.
fn bundles(frames: &[Frame]) -> Vec<(u64, Option<u32>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::PrekeyBundle(frame::PrekeyBundle {
                request_id,
                one_time,
                ..
            }) => Some((*request_id, one_time.map(|k| k.id))),
            _ => None,
        })
        .collect()
}

/// Bob (the key owner) on shard `n - 1`, Alice and Carol (requesters) on shard 0, all
/// registered; Bob logged in with PREKEYS and holding `ids` one-time prekeys (durably).
struct Setup {
    c: Cluster,
    bob: u64,
    bob_conn: ConnId,
    bob_id: IdentityKeyPair,
    alice: u64,
    alice_conn: ConnId,
    carol_conn: ConnId,
}

fn setup(
    shards: u16,
    ids: impl IntoIterator<Item = u32>,
    tweak: impl Fn(&mut switchboard_shards::Config),
) -> Setup {
    let mut c = Cluster::new(shards, tweak);
    let bob = user_on(shards - 1, shards, 0);
    let alice = user_on(0, shards, 1);
    let carol = user_on(0, shards, 2);
    for u in [bob, alice, carol] {
        c.register(u, key(u));
    }
    let (bob_conn, frames) = c.login_caps(bob, key(bob), CAPS);
    assert_eq!(
        status(&frames),
        vec![(0, PrekeyStatusReason::EXHAUSTED)],
        "a device without keys is told at login"
    );
    let bob_id = identity(1);
    c.frame(bob_conn, upload(device_keys(&bob_id, 1), ids));
    c.settle();
    let frames = c.frames(bob_conn);
    assert!(
        matches!(
            status(&frames).as_slice(),
            [(_, PrekeyStatusReason::UPLOADED)]
        ),
        "{frames:?}"
    );
    let alice_conn = c.login(alice, key(alice));
    let carol_conn = c.login(carol, key(carol));
    Setup {
        c,
        bob,
        bob_conn,
        bob_id,
        alice,
        alice_conn,
        carol_conn,
    }
}

/// Proves a fetch crosses shards, hands out exactly one one-time prekey (lowest id first), never
/// answers before the consumption is durable, and goes on without a one-time prekey when none is
/// left; and that the owner is told when it drops below the low-water mark and when it runs out.
#[test]
fn fetch_consumes_one_key_and_answers_only_when_durable() {
    let Setup {
        mut c,
        bob,
        bob_conn,
        bob_id,
        alice_conn,
        ..
    } = setup(2, [1, 2, 3], |cfg| cfg.prekey_low_water = 3);
    let home = home_shard(bob, 2);
    c.frame(alice_conn, fetch(10, bob));
    c.run();
    assert!(
        matches!(
            c.journals[usize::from(home)].pending_records().as_slice(),
            [Record::PrekeyConsumed { id: 1, .. }]
        ),
        "the consumption is logged"
    );
    assert!(
        c.frames(alice_conn).is_empty(),
        "no bundle before the consumption is durable"
    );
    c.commit(home);
    c.run();
    let got = c.frames(alice_conn);
    match got.as_slice() {
        [Frame::PrekeyBundle(frame::PrekeyBundle {
            addr: DeviceAddr { user, device: 0 },
            request_id: 10,
            keys,
            one_time: Some(k),
        })] => {
            assert_eq!(*user, bob);
            assert_eq!(*keys, Box::new(device_keys(&bob_id, 1)));
            assert_eq!(*k, otks([1])[0]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![(2, PrekeyStatusReason::BELOW_LOW_WATER)]
    );
    for r in 11..=13 {
        c.frame(alice_conn, fetch(r, bob));
        c.settle();
    }
    assert_eq!(
        bundles(&c.frames(alice_conn)),
        vec![(11, Some(2)), (12, Some(3)), (13, None)]
    );
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![
            (1, PrekeyStatusReason::BELOW_LOW_WATER),
            (0, PrekeyStatusReason::EXHAUSTED),
            (0, PrekeyStatusReason::EXHAUSTED)
        ]
    );
    let s = c.shards[usize::from(home)].stats();
    assert_eq!(
        (
            s.prekey_fetches,
            s.prekeys_consumed,
            s.prekey_bundles_without_one_time
        ),
        (4, 3, 1)
    );
}

/// Proves the crash rule: a consumption that never became durable was never answered, so the
/// key may be handed out again after the crash; once a bundle was answered, a crash cannot bring
/// its key back.
#[test]
fn a_consumed_key_is_never_handed_out_twice_across_crashes() {
    let Setup {
        mut c,
        bob,
        alice_conn,
        ..
    } = setup(2, [1, 2], |_| {});
    let home = home_shard(bob, 2);
    // Crash before durable: no answer went out, key 1 is still there.
    c.frame(alice_conn, fetch(1, bob));
    c.run();
    assert_eq!(c.journals[usize::from(home)].pending(), 1);
    c.crash(home);
    c.run();
    assert!(bundles(&c.frames(alice_conn)).is_empty(), "never answered");
    assert_eq!(
        c.shards[usize::from(home)].one_time_prekey_ids(bob, 0),
        Some(vec![1, 2])
    );
    // Answered after durable; then a crash: key 1 stays consumed.
    c.frame(alice_conn, fetch(2, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)), vec![(2, Some(1))]);
    c.crash(home);
    c.frame(alice_conn, fetch(3, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)), vec![(3, Some(2))]);
    c.crash(home);
    c.frame(alice_conn, fetch(4, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)), vec![(4, None)]);
}

/// Proves two requesters racing for the last one-time prekey: exactly one gets it, the other a
/// bundle without one, both only after durability; a restart does not hand it out again.
#[test]
fn racing_fetches_for_the_last_key() {
    for shards in [1u16, 3] {
        let Setup {
            mut c,
            bob,
            alice,
            alice_conn,
            carol_conn,
            ..
        } = setup(shards, [9], |_| {});
        let home = home_shard(bob, shards);
        c.frame(alice_conn, fetch(1, bob));
        c.frame(carol_conn, fetch(2, bob));
        c.run();
        assert!(c.frames(alice_conn).is_empty() && c.frames(carol_conn).is_empty());
        c.settle();
        let a = bundles(&c.frames(alice_conn));
        let b = bundles(&c.frames(carol_conn));
        let winners: Vec<_> = a.iter().chain(&b).filter(|(_, k)| k.is_some()).collect();
        assert_eq!(winners.len(), 1, "exactly one gets the key: {a:?} {b:?}");
        assert_eq!(a.len() + b.len(), 2, "both are answered");
        c.crash(home);
        let alice_conn = c.login(alice, key(alice));
        c.frame(alice_conn, fetch(3, bob));
        c.settle();
        let after = bundles(&c.frames(alice_conn));
        assert_eq!(
            after,
            vec![(3, None)],
            "the key stays consumed after a restart"
        );
    }
}

/// Proves every refusal has its code, refers to no message, and stores nothing: a bad
/// signature, a non-canonical key, a repeated id, an upload past the per-device cap (refused
/// whole, not cut), frames before login, and a fetch for a device without keys.
#[test]
fn refused_uploads_store_nothing_and_have_their_codes() {
    let Setup {
        mut c,
        bob,
        bob_conn,
        bob_id,
        alice_conn,
        ..
    } = setup(2, [1, 2], |cfg| cfg.prekeys_per_device_max = 4);
    let home = usize::from(home_shard(bob, 2));
    let good = device_keys(&bob_id, 1);
    let mut bad_sig = good;
    bad_sig.signed_prekey_sig[5] ^= 1;
    let mut other_signer = good;
    other_signer.identity_sign = identity(99).public().sign;
    let mut non_canonical = good;
    non_canonical.signed_prekey = [0xFF; 32];
    non_canonical.signed_prekey_sig = bob_id.sign(&encode_public(&non_canonical.signed_prekey));
    let cases = [
        (upload(bad_sig, [3]), ErrorCode::BadPrekeySignature),
        (upload(other_signer, [3]), ErrorCode::BadPrekeySignature),
        (upload(non_canonical, [3]), ErrorCode::InvalidPrekey),
        (
            Frame::PrekeyUpload(frame::PrekeyUpload {
                keys: Box::new(good),
                one_time: vec![OneTimePrekey {
                    id: 3,
                    key: [0xFF; 32],
                }],
            }),
            ErrorCode::InvalidPrekey,
        ),
        (upload(good, [3, 3]), ErrorCode::InvalidPrekey),
        (upload(good, [3, 4, 5]), ErrorCode::PrekeyLimit),
    ];
    for (frame, code) in cases {
        let appends = c.journals[home].entries().len();
        c.frame(bob_conn, frame);
        c.settle();
        let got = c.frames(bob_conn);
        assert_eq!(
            got.iter().map(error_code).collect::<Vec<_>>(),
            vec![Some(code)]
        );
        assert!(matches!(
            got[0],
            Frame::Error(frame::Error { ref_id: 0, .. })
        ));
        assert_eq!(
            c.journals[home].entries().len(),
            appends,
            "{code:?} stored something"
        );
        assert!(c.closed(bob_conn).is_none(), "{code:?} is not fatal");
    }
    assert_eq!(c.shards[home].one_time_prekey_ids(bob, 0), Some(vec![1, 2]));
    // Exactly up to the cap is fine.
    c.frame(bob_conn, upload(good, [3, 4]));
    c.settle();
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![(4, PrekeyStatusReason::UPLOADED)]
    );
    assert_eq!(c.shards[home].stats().prekey_uploads_refused, 6);

    // A fetch for a device that never uploaded: NoSuchRecipient, ref_id = request_id.
    c.frame(alice_conn, fetch(77, user_on(1, 2, 5)));
    c.settle();
    let got = c.frames(alice_conn);
    assert_eq!(
        got.iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::NoSuchRecipient)]
    );
    assert!(matches!(
        got[0],
        Frame::Error(frame::Error { ref_id: 77, .. })
    ));

    // Before login: fatal NotAuthenticated.
    for f in [upload(good, [9]), fetch(1, bob)] {
        let conn = c.connect(0, key(4242), common::ip(9));
        c.frame(conn, f);
        assert_eq!(c.closed(conn), Some(ErrorCode::NotAuthenticated));
    }
    // A client sending the server's prekey frames: MalformedFrame.
    c.frame(
        alice_conn,
        Frame::PrekeyStatus(frame::PrekeyStatus {
            one_time_remaining: 1,
            low_water: 1,
            reason: PrekeyStatusReason::UPLOADED,
        }),
    );
    assert_eq!(c.closed(alice_conn), Some(ErrorCode::MalformedFrame));
}

/// Proves the per-requester fetch limit: refused fetches carry their request id, consume
/// nothing, are counted, and the window reopens after a minute.
#[test]
fn fetches_are_rate_limited_per_requester() {
    let Setup {
        mut c,
        bob,
        alice_conn,
        carol_conn,
        ..
    } = setup(2, 1..=10, |cfg| {
        cfg.prekey_fetches_per_requester_per_minute = 2
    });
    for r in 1..=3 {
        c.frame(alice_conn, fetch(r, bob));
    }
    c.frame(carol_conn, fetch(4, bob));
    c.settle();
    let got = c.frames(alice_conn);
    assert_eq!(bundles(&got), vec![(1, Some(1)), (2, Some(2))]);
    assert!(got.iter().any(|f| matches!(
        f,
        Frame::Error(frame::Error { code, ref_id: 3, .. }) if *code == ErrorCode::PrekeyFetchRateLimited as u16
    )));
    assert_eq!(
        bundles(&c.frames(carol_conn)),
        vec![(4, Some(3))],
        "per requester"
    );
    assert_eq!(c.shards[0].stats().prekey_fetches_rate_limited, 1);
    c.now += 60_000;
    c.frame(alice_conn, fetch(5, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)), vec![(5, Some(4))]);
}

/// Proves a retried upload cannot bring back a consumed key (ids at or below the highest
/// uploaded are skipped), and an identity change drops the old identity's keys, also after a
/// restart.
#[test]
fn retried_uploads_and_identity_changes() {
    let Setup {
        mut c,
        bob,
        bob_conn,
        bob_id,
        alice_conn,
        ..
    } = setup(2, [1, 2], |_| {});
    let home = home_shard(bob, 2);
    c.frame(alice_conn, fetch(1, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)), vec![(1, Some(1))]);
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![(1, PrekeyStatusReason::BELOW_LOW_WATER)]
    );
    // The same upload again (a retry): key 1 is not resurrected; key 3 is new.
    c.frame(bob_conn, upload(device_keys(&bob_id, 1), [1, 2, 3]));
    c.settle();
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![(2, PrekeyStatusReason::UPLOADED)]
    );
    assert_eq!(
        c.shards[usize::from(home)].one_time_prekey_ids(bob, 0),
        Some(vec![2, 3])
    );

    // A new identity (a reinstalled app): old keys go, the new identity's keys count from 1.
    let new_id = identity(2);
    c.frame(bob_conn, upload(device_keys(&new_id, 1), [1]));
    c.settle();
    assert_eq!(
        status(&c.frames(bob_conn)),
        vec![(1, PrekeyStatusReason::UPLOADED)]
    );
    c.crash(home);
    assert_eq!(
        c.shards[usize::from(home)].one_time_prekey_ids(bob, 0),
        Some(vec![1])
    );
    c.frame(alice_conn, fetch(2, bob));
    c.settle();
    match c.frames(alice_conn).as_slice() {
        [Frame::PrekeyBundle(frame::PrekeyBundle {
            keys,
            one_time: Some(k),
            ..
        })] => {
            assert_eq!(
                keys.identity_dh,
                new_id.public().dh,
                "the new identity is served"
            );
            assert_eq!(k.id, 1);
        }
        other => panic!("{other:?}"),
    }
}

/// Proves an owner that was offline while its keys ran low is told at its next login, and that a
/// connection without the PREKEYS capability never gets a PrekeyStatus.
#[test]
fn offline_owner_is_told_at_next_login() {
    let Setup {
        mut c,
        bob,
        bob_conn,
        alice_conn,
        ..
    } = setup(2, 1..=3, |cfg| cfg.prekey_low_water = 3);
    c.close_conn(bob_conn);
    c.frame(alice_conn, fetch(1, bob));
    c.settle();
    assert_eq!(bundles(&c.frames(alice_conn)).len(), 1);
    let (conn, frames) = c.login_caps(bob, key(bob), CAPS);
    assert_eq!(
        status(&frames),
        vec![(2, PrekeyStatusReason::BELOW_LOW_WATER)]
    );
    c.close_conn(conn);
    let (_, frames) = c.login_caps(bob, key(bob), capability::MESSAGING);
    assert!(status(&frames).is_empty(), "{frames:?}");
}

/// Proves the prekey records recover exactly, that segments holding only dead prekey records are
/// deleted (the journal checks every deletion against a model of recovery), and that compaction
/// carries live batches and the identity forward.
#[test]
fn prekey_records_recover_and_their_segments_die() {
    // 1.5: every tick compacts the oldest segment (it holds the live accounts), so the
    // segments of dead prekey records become the oldest and go.
    for ratio in [0.0, 1.5] {
        let mut c = Cluster::with_segments(1, 3, |cfg| cfg.compaction_live_ratio = ratio);
        let bob = user_on(0, 1, 0);
        let alice = user_on(0, 1, 1);
        c.register(bob, key(bob));
        c.register(alice, key(alice));
        let (bob_conn, _) = c.login_caps(bob, key(bob), CAPS);
        let alice_conn = c.login(alice, key(alice));
        let id = identity(5);
        for round in 0..6u32 {
            c.frame(
                bob_conn,
                upload(
                    device_keys(&id, 1 + round / 3),
                    round * 4 + 1..=round * 4 + 4,
                ),
            );
            c.settle();
            for r in 0..3 {
                c.frame(alice_conn, fetch(u64::from(round * 10 + r), bob));
                c.settle();
            }
            c.tick(0);
            c.settle();
        }
        for _ in 0..6 {
            c.tick(0);
            c.settle();
        }
        let expected = c.shards[0].one_time_prekey_ids(bob, 0);
        assert_eq!(
            expected.as_ref().map(Vec::len),
            Some(6),
            "24 uploaded, 18 fetched"
        );
        let recovered = c.recovered(0);
        assert_eq!(
            recovered.one_time_prekey_ids(bob, 0),
            expected,
            "ratio {ratio}"
        );
        if ratio > 0.0 {
            // (Without compaction the oldest segments hold the live accounts, so nothing after
            // them may go.)
            assert!(c.shards[0].stats().segments_compacted > 0);
            assert!(
                !c.journals[0].deleted.is_empty(),
                "dead segments were deleted"
            );
        }
        // And the recovered directory keeps serving, in order.
        c.crash(0);
        let alice_conn = c.login(alice, key(alice));
        let next = expected.and_then(|e| e.first().copied());
        c.frame(alice_conn, fetch(999, bob));
        c.settle();
        assert_eq!(bundles(&c.frames(alice_conn)), vec![(999, next)]);
    }
}

/// Proves a storage failure answers waiting fetches and uploads with StorageUnavailable and
/// refuses new ones.
#[test]
fn storage_failure_refuses_prekey_writes() {
    let Setup {
        mut c,
        bob,
        bob_conn,
        bob_id,
        alice_conn,
        ..
    } = setup(1, [1, 2], |_| {});
    c.frame(alice_conn, fetch(1, bob));
    c.frame(bob_conn, upload(device_keys(&bob_id, 2), [5]));
    c.run();
    c.event(
        0,
        switchboard_shards::Event::StorageFailed {
            reason: "fsync".into(),
        },
    );
    c.run();
    let got = c.frames(alice_conn);
    assert!(
        matches!(got.as_slice(), [Frame::Error(frame::Error { ref_id: 1, code, .. })] if *code == ErrorCode::StorageUnavailable as u16),
        "{got:?}"
    );
    assert_eq!(
        c.frames(bob_conn)
            .iter()
            .map(error_code)
            .collect::<Vec<_>>(),
        vec![Some(ErrorCode::StorageUnavailable)]
    );
    c.frame(alice_conn, fetch(2, bob));
    c.frame(bob_conn, upload(device_keys(&bob_id, 3), [6]));
    c.run();
    assert_eq!(
        c.frames(alice_conn)
            .iter()
            .map(error_code)
            .collect::<Vec<_>>(),
        vec![Some(ErrorCode::StorageUnavailable)]
    );
    assert_eq!(
        c.frames(bob_conn)
            .iter()
            .map(error_code)
            .collect::<Vec<_>>(),
        vec![Some(ErrorCode::StorageUnavailable)]
    );
}
