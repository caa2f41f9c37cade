//! Whole-protocol tests: conversations, loss, reordering, replay, tampering, caps, restart,
//! identity change, prekey deletion, and the fixed vectors published in docs/e2ee.md.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use rand::rngs::OsRng;
use rand::{CryptoRng, Rng, RngCore, SeedableRng};
use x25519_dalek::StaticSecret;

use crate::envelope::{Envelope, Message, MESSAGE_OVERHEAD, PREKEY_MESSAGE_OVERHEAD};
use crate::error::Error;
use crate::keys::{PreKeyBundle, PreKeyStore};
use crate::ratchet::{RatchetState, MAX_SKIP, MAX_SKIPPED_KEYS_TOTAL};
use crate::session::{Established, InitiatorPending, Session};
use crate::{Address, E2ee, IdentityKeyPair, StateStore};

const ALICE: Address = Address {
    user: 14155550100,
    device: 0,
};
const BOB: Address = Address {
    user: 447700900123,
    device: 1,
};

/// Bob with uploaded prekeys and a bundle for Alice (with a one-time prekey).
fn bob_with_bundle(n_otpk: usize) -> (E2ee, Vec<PreKeyBundle>) {
    let mut bob = E2ee::in_memory(BOB);
    let (spk, otpks) = bob.generate_prekeys(n_otpk).unwrap();
    let bundles = otpks
        .iter()
        .map(|k| PreKeyBundle::new(&bob.identity(), &spk, Some(k)))
        .collect();
    (bob, bundles)
}

fn established_pair() -> (E2ee, E2ee) {
    let mut alice = E2ee::in_memory(ALICE);
    let (mut bob, bundles) = bob_with_bundle(2);
    let env = alice.encrypt(BOB, Some(&bundles[0]), b"hi").unwrap();
    assert_eq!(&*bob.decrypt(ALICE, &env).unwrap(), b"hi");
    let env = bob.encrypt(ALICE, None, b"hi back").unwrap();
    assert_eq!(&*alice.decrypt(BOB, &env).unwrap(), b"hi back");
    (alice, bob)
}

fn msg(from: &str, i: usize) -> Vec<u8> {
    format!("{from} message #{i}").into_bytes()
}

/// Alternating and bursty traffic in both directions, hundreds of messages.
#[test]
fn long_conversation_alternating_and_bursty() {
    let (mut alice, mut bob) = established_pair();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut sent = 0usize;
    // 150 strict alternations (a DH ratchet step on every turn).
    for i in 0..150 {
        let e = alice.encrypt(BOB, None, &msg("a", i)).unwrap();
        assert_eq!(&*bob.decrypt(ALICE, &e).unwrap(), &msg("a", i)[..]);
        let e = bob.encrypt(ALICE, None, &msg("b", i)).unwrap();
        assert_eq!(&*alice.decrypt(BOB, &e).unwrap(), &msg("b", i)[..]);
        sent += 2;
    }
    // Bursts of random length from a random side.
    for round in 0..60 {
        let burst = rng.gen_range(1..20);
        let from_alice = rng.gen_bool(0.5);
        for j in 0..burst {
            let pt = msg(if from_alice { "A" } else { "B" }, round * 100 + j);
            if from_alice {
                let e = alice.encrypt(BOB, None, &pt).unwrap();
                assert_eq!(&*bob.decrypt(ALICE, &e).unwrap(), &pt[..]);
            } else {
                let e = bob.encrypt(ALICE, None, &pt).unwrap();
                assert_eq!(&*alice.decrypt(BOB, &e).unwrap(), &pt[..]);
            }
            sent += 1;
        }
    }
    assert!(sent > 400, "sent {sent}");
}

/// The initiator keeps sending PreKeyMessages until the first reply, then plain Messages.
#[test]
fn prekey_messages_until_first_reply() {
    let mut alice = E2ee::in_memory(ALICE);
    let (mut bob, bundles) = bob_with_bundle(1);
    let mut envs = Vec::new();
    for i in 0..3 {
        let e = alice.encrypt(BOB, Some(&bundles[0]), &msg("a", i)).unwrap();
        assert!(matches!(Envelope::decode(&e).unwrap(), Envelope::PreKey(_)));
        envs.push(e);
    }
    // Delivered out of order: the 3rd first starts the session, the others find it.
    let p = bob.decrypt(ALICE, &envs[2]).unwrap();
    assert!(p.session_started);
    assert_eq!(&*p, &msg("a", 2)[..]);
    assert!(!bob.decrypt(ALICE, &envs[0]).unwrap().session_started);
    assert_eq!(&*bob.decrypt(ALICE, &envs[1]).unwrap(), &msg("a", 1)[..]);
    // Replays of PreKeyMessages are refused.
    assert!(matches!(
        bob.decrypt(ALICE, &envs[0]),
        Err(Error::DuplicateMessage)
    ));
    let reply = bob.encrypt(ALICE, None, b"ok").unwrap();
    assert!(matches!(
        Envelope::decode(&reply).unwrap(),
        Envelope::Message(_)
    ));
    alice.decrypt(BOB, &reply).unwrap();
    let e = alice.encrypt(BOB, None, b"now plain").unwrap();
    assert!(matches!(
        Envelope::decode(&e).unwrap(),
        Envelope::Message(_)
    ));
    assert_eq!(&*bob.decrypt(ALICE, &e).unwrap(), b"now plain");
}

/// Out-of-order delivery across several ratchet steps, lost messages, duplicates.
#[test]
fn out_of_order_lost_and_duplicates() {
    let (mut alice, mut bob) = established_pair();
    // Three chains from Alice, interleaved with Bob's replies.
    let mut held = Vec::new();
    for chain in 0..3 {
        for i in 0..10 {
            held.push((
                msg("a", chain * 10 + i),
                alice.encrypt(BOB, None, &msg("a", chain * 10 + i)).unwrap(),
            ));
        }
        // Bob answers using the first message of this chain to trigger a ratchet.
        let (pt, e) = &held[chain * 10];
        assert_eq!(&*bob.decrypt(ALICE, e).unwrap(), &pt[..]);
        let r = bob.encrypt(ALICE, None, b"ack").unwrap();
        alice.decrypt(BOB, &r).unwrap();
    }
    // Deliver the rest in reverse, dropping every 7th (lost).
    let mut delivered = 0;
    for (k, (pt, e)) in held.iter().enumerate().rev() {
        if k % 10 == 0 || k % 7 == 3 {
            continue;
        }
        assert_eq!(&*bob.decrypt(ALICE, e).unwrap(), &pt[..], "message {k}");
        delivered += 1;
    }
    assert!(delivered > 20);
    // Every already-decrypted message is refused on replay.
    for (k, (_, e)) in held.iter().enumerate() {
        if k % 7 == 3 && k % 10 != 0 {
            continue;
        }
        assert!(
            matches!(bob.decrypt(ALICE, e), Err(Error::DuplicateMessage)),
            "replay of {k} accepted"
        );
    }
    // The lost ones still decrypt late (their keys were kept).
    for (k, (pt, e)) in held.iter().enumerate() {
        if k % 7 == 3 && k % 10 != 0 {
            assert_eq!(&*bob.decrypt(ALICE, e).unwrap(), &pt[..]);
        }
    }
    // And the session keeps working.
    let e = bob.encrypt(ALICE, None, b"still here").unwrap();
    assert_eq!(&*alice.decrypt(BOB, &e).unwrap(), b"still here");
}

/// A replayed message in the current chain is refused; the session is unaffected.
#[test]
fn replay_refused() {
    let (mut alice, mut bob) = established_pair();
    let e = alice.encrypt(BOB, None, b"once").unwrap();
    bob.decrypt(ALICE, &e).unwrap();
    assert!(matches!(
        bob.decrypt(ALICE, &e),
        Err(Error::DuplicateMessage)
    ));
    let e2 = alice.encrypt(BOB, None, b"twice?").unwrap();
    assert_eq!(&*bob.decrypt(ALICE, &e2).unwrap(), b"twice?");
}

/// More than MAX_SKIP keys skipped in one chain is refused with a typed error, and the
/// session state is untouched (the skipped message still decrypts afterwards).
#[test]
fn skipped_key_cap() {
    let (mut alice, mut bob) = established_pair();
    let first = alice.encrypt(BOB, None, b"first").unwrap();
    let mut last = Vec::new();
    for _ in 0..(MAX_SKIP as usize + 1) {
        last = alice.encrypt(BOB, None, b"x").unwrap();
    }
    // `last` is message number MAX_SKIP + 1: decrypting it would skip MAX_SKIP + 1 keys.
    match bob.decrypt(ALICE, &last) {
        Err(Error::TooManySkippedMessages { requested, max }) => {
            assert_eq!(max, MAX_SKIP);
            assert_eq!(requested, u64::from(MAX_SKIP) + 1);
        }
        other => panic!("expected TooManySkippedMessages, got {other:?}"),
    }
    assert_eq!(&*bob.decrypt(ALICE, &first).unwrap(), b"first");
    // Now exactly MAX_SKIP keys need skipping: accepted.
    assert_eq!(&*bob.decrypt(ALICE, &last).unwrap(), b"x");
}

/// The total number of stored skipped keys never exceeds MAX_SKIPPED_KEYS_TOTAL; the oldest
/// go first and are then reported as expired/duplicate.
#[test]
fn skipped_key_total_cap_evicts_oldest() {
    let sk = crate::kdf::SharedKey([9; 32]);
    let bob_spk = StaticSecret::random_from_rng(OsRng);
    let bob_pub = x25519_dalek::PublicKey::from(&bob_spk).to_bytes();
    let mut alice = RatchetState::init_alice(&sk, &bob_pub, &mut OsRng).unwrap();
    let mut bob = RatchetState::init_bob(&sk, bob_spk);
    let ad = [0u8; 4];
    let mut oldest_skipped = None;
    for round in 0..4 {
        // Alice sends MAX_SKIP + 1 messages; Bob sees only the last one of each chain.
        let mut last = None;
        for i in 0..=MAX_SKIP {
            let m = alice.encrypt(b"m", &ad).unwrap();
            if round == 0 && i == 0 {
                oldest_skipped = Some(m.clone());
            }
            last = Some(m);
        }
        let (h, c) = last.unwrap();
        bob.decrypt(&h, &c, &ad, &mut OsRng).unwrap();
        assert!(bob.skipped_key_count() <= MAX_SKIPPED_KEYS_TOTAL);
        // Bob replies so that Alice's next chain is a new ratchet step.
        let (h, c) = bob.encrypt(b"r", &ad).unwrap();
        alice.decrypt(&h, &c, &ad, &mut OsRng).unwrap();
    }
    assert_eq!(bob.skipped_key_count(), MAX_SKIPPED_KEYS_TOTAL);
    let (h, c) = oldest_skipped.unwrap();
    assert!(matches!(
        bob.decrypt(&h, &c, &ad, &mut OsRng),
        Err(Error::DuplicateMessage)
    ));
}

/// Any single flipped bit in an envelope (header, ciphertext, tag, X3DH fields) is refused,
/// and the session still decrypts the genuine message afterwards.
#[test]
fn tampering_rejected_and_state_intact() {
    for prekey in [true, false] {
        let (mut alice, mut bob, env) = if prekey {
            let mut alice = E2ee::in_memory(ALICE);
            let (bob, bundles) = bob_with_bundle(1);
            let env = alice
                .encrypt(BOB, Some(&bundles[0]), b"attack at dawn")
                .unwrap();
            (alice, bob, env)
        } else {
            let (mut alice, bob) = established_pair();
            let env = alice.encrypt(BOB, None, b"attack at dawn").unwrap();
            (alice, bob, env)
        };
        let otpks_before = bob.one_time_prekey_count();
        for i in 0..env.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = env.clone();
                bad[i] ^= bit;
                assert!(
                    bob.decrypt(ALICE, &bad).is_err(),
                    "flip at byte {i} bit {bit:#x} accepted (prekey={prekey})"
                );
            }
        }
        // Truncation and extension are refused too.
        assert!(bob.decrypt(ALICE, &env[..env.len() - 1]).is_err());
        let mut longer = env.clone();
        longer.push(0);
        assert!(bob.decrypt(ALICE, &longer).is_err());
        // Nothing was consumed by the forgeries.
        assert_eq!(bob.one_time_prekey_count(), otpks_before);
        assert_eq!(&*bob.decrypt(ALICE, &env).unwrap(), b"attack at dawn");
        let e = bob.encrypt(ALICE, None, b"ok").unwrap();
        assert_eq!(&*alice.decrypt(BOB, &e).unwrap(), b"ok");
    }
}

/// The associated data is authenticated: the same ciphertext under another AD fails, and
/// the failure leaves the ratchet unchanged.
#[test]
fn associated_data_authenticated() {
    let sk = crate::kdf::SharedKey([3; 32]);
    let bob_spk = StaticSecret::random_from_rng(OsRng);
    let bob_pub = x25519_dalek::PublicKey::from(&bob_spk).to_bytes();
    let mut alice = RatchetState::init_alice(&sk, &bob_pub, &mut OsRng).unwrap();
    let mut bob = RatchetState::init_bob(&sk, bob_spk);
    let ad = [1u8; 130];
    let (h, c) = alice.encrypt(b"payload", &ad).unwrap();
    let mut other = ad;
    other[129] ^= 1;
    assert!(matches!(
        bob.decrypt(&h, &c, &other, &mut OsRng),
        Err(Error::DecryptFailed)
    ));
    // Header fields are authenticated as well.
    let mut h2 = h;
    h2.pn ^= 1;
    assert!(bob.decrypt(&h2, &c, &ad, &mut OsRng).is_err());
    assert_eq!(
        &bob.decrypt(&h, &c, &ad, &mut OsRng).unwrap()[..],
        b"payload"
    );
}

/// A session survives a restart: state saved to the encrypted file and reloaded.
#[test]
fn session_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("alice");
    let b_dir = dir.path().join("bob");
    let mut alice = E2ee::new(StateStore::open_dir(&a_dir).unwrap(), ALICE).unwrap();
    let mut bob = E2ee::new(StateStore::open_dir(&b_dir).unwrap(), BOB).unwrap();
    let (spk, otpks) = bob.generate_prekeys(5).unwrap();
    let bundle = PreKeyBundle::new(&bob.identity(), &spk, otpks.first());
    let e = alice
        .encrypt(BOB, Some(&bundle), b"before restart")
        .unwrap();
    // A message in flight across the restart, plus one skipped key.
    let skipped = alice
        .encrypt(BOB, None, b"skipped, delivered later")
        .unwrap();
    let e3 = alice.encrypt(BOB, None, b"third").unwrap();
    bob.decrypt(ALICE, &e).unwrap();
    bob.decrypt(ALICE, &e3).unwrap();
    let alice_id = alice.identity();
    let bob_id = bob.identity();
    let sn = alice.safety_number(BOB).unwrap();
    drop(alice);
    drop(bob);

    let mut alice = E2ee::new(StateStore::open_dir(&a_dir).unwrap(), ALICE).unwrap();
    let mut bob = E2ee::new(StateStore::open_dir(&b_dir).unwrap(), BOB).unwrap();
    assert_eq!(alice.identity(), alice_id);
    assert_eq!(bob.identity(), bob_id);
    assert_eq!(alice.safety_number(BOB).unwrap(), sn);
    assert_eq!(bob.safety_number(ALICE).unwrap(), sn);
    assert_eq!(
        &*bob.decrypt(ALICE, &skipped).unwrap(),
        b"skipped, delivered later"
    );
    assert!(matches!(
        bob.decrypt(ALICE, &e3),
        Err(Error::DuplicateMessage)
    ));
    for i in 0..20 {
        let m = bob.encrypt(ALICE, None, &msg("b", i)).unwrap();
        assert_eq!(&*alice.decrypt(BOB, &m).unwrap(), &msg("b", i)[..]);
        let m = alice.encrypt(BOB, None, &msg("a", i)).unwrap();
        assert_eq!(&*bob.decrypt(ALICE, &m).unwrap(), &msg("a", i)[..]);
    }
    // The one-time prekey used before the restart stays deleted.
    assert_eq!(bob.one_time_prekey_count(), 4);
    // Opening another device's state file is refused.
    assert!(matches!(
        E2ee::new(StateStore::open_dir(&a_dir).unwrap(), BOB),
        Err(Error::StoreAddressMismatch { .. })
    ));
}

/// `decrypt_deferred` changes nothing on disk until `save`: a crash before `save` means the
/// redelivered envelope decrypts again; after `save` it is a duplicate.
#[test]
fn deferred_decrypt_is_redeliverable_until_saved() {
    let dir = tempfile::tempdir().unwrap();
    let b_dir = dir.path().join("bob");
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::new(StateStore::open_dir(&b_dir).unwrap(), BOB).unwrap();
    let (spk, otpks) = bob.generate_prekeys(2).unwrap();
    let bundle = PreKeyBundle::new(&bob.identity(), &spk, otpks.first());
    let e1 = alice.encrypt(BOB, Some(&bundle), b"one").unwrap();
    assert_eq!(&*bob.decrypt_deferred(ALICE, &e1).unwrap(), b"one");
    drop(bob); // "crash" before save
    let mut bob = E2ee::new(StateStore::open_dir(&b_dir).unwrap(), BOB).unwrap();
    assert!(!bob.has_session(ALICE));
    assert_eq!(
        bob.one_time_prekey_count(),
        2,
        "prekey deletion was not persisted"
    );
    assert_eq!(&*bob.decrypt_deferred(ALICE, &e1).unwrap(), b"one");
    bob.save().unwrap();
    drop(bob);
    let mut bob = E2ee::new(StateStore::open_dir(&b_dir).unwrap(), BOB).unwrap();
    assert!(matches!(
        bob.decrypt(ALICE, &e1),
        Err(Error::DuplicateMessage)
    ));
    assert_eq!(bob.one_time_prekey_count(), 1);
}

/// Exported state decodes; any truncation is a typed error, never a panic.
#[test]
fn state_encoding_roundtrip_and_truncation() {
    let (alice, _bob) = established_pair();
    let bytes = alice.export_state();
    let again = E2ee::import_state(&bytes).unwrap();
    assert_eq!(&*again.export_state(), &*bytes);
    for cut in (0..bytes.len()).step_by(7) {
        assert!(E2ee::import_state(&bytes[..cut]).is_err());
    }
}

/// A contact's identity change is detected on both paths (bundle and incoming message),
/// refused until accepted, and changes the safety number.
#[test]
fn identity_change_detected() {
    let (mut alice, mut bob) = established_pair();
    let sn_before = alice.safety_number(BOB).unwrap();
    assert_eq!(sn_before, bob.safety_number(ALICE).unwrap());
    assert_eq!(sn_before.digits().len(), 60);
    assert_eq!(sn_before.to_string().split(' ').count(), 12);

    // Bob reinstalls: new identity, new prekeys.
    let (mut bob2, bundles) = bob_with_bundle(1);
    // Sending with the new bundle: refused.
    match alice.encrypt(BOB, Some(&bundles[0]), b"hello?") {
        Err(Error::IdentityChanged {
            peer,
            known,
            received,
        }) => {
            assert_eq!(peer, BOB);
            assert_eq!(*known, bob.identity());
            assert_eq!(*received, bob2.identity());
        }
        other => panic!("expected IdentityChanged, got {other:?}"),
    }
    // A message from the new identity: refused as well.
    let mut alice2 = E2ee::in_memory(ALICE);
    let (_, bob_bundle) = {
        let (spk, otpks) = bob.generate_prekeys(1).unwrap();
        ((), PreKeyBundle::new(&bob.identity(), &spk, otpks.first()))
    };
    let from_new_alice = alice2.encrypt(BOB, Some(&bob_bundle), b"it's me").unwrap();
    assert!(matches!(
        bob.decrypt(ALICE, &from_new_alice),
        Err(Error::IdentityChanged { .. })
    ));
    // After the user accepts, the new identity works and the safety number changed.
    alice.accept_identity(BOB, &bob2.identity()).unwrap();
    assert!(!alice.has_session(BOB));
    let e = alice
        .encrypt(BOB, Some(&bundles[0]), b"hello again")
        .unwrap();
    assert_eq!(&*bob2.decrypt(ALICE, &e).unwrap(), b"hello again");
    let sn_after = alice.safety_number(BOB).unwrap();
    assert_ne!(sn_before, sn_after);
    assert_eq!(sn_after, bob2.safety_number(ALICE).unwrap());
}

/// After an X3DH the responder no longer has the one-time prekey: a second X3DH naming it
/// (a replayed first message after session loss, or another initiator given the same
/// bundle) fails.
#[test]
fn one_time_prekey_deleted_after_use() {
    let mut alice = E2ee::in_memory(ALICE);
    let (mut bob, bundles) = bob_with_bundle(3);
    let e = alice.encrypt(BOB, Some(&bundles[0]), b"x").unwrap();
    assert_eq!(bob.one_time_prekey_count(), 3);
    bob.decrypt(ALICE, &e).unwrap();
    assert_eq!(bob.one_time_prekey_count(), 2);
    let id = bundles[0].one_time_prekey.unwrap().0;
    // Another device of Alice's (new X3DH, new base key) given the same bundle.
    let carol_addr = Address::new(15550001111, 0);
    let mut carol = E2ee::in_memory(carol_addr);
    let e2 = carol.encrypt(BOB, Some(&bundles[0]), b"y").unwrap();
    assert!(matches!(
        bob.decrypt(carol_addr, &e2),
        Err(Error::UnknownOneTimePreKey(x)) if x == id
    ));
}

/// Simultaneous initiation: both sides start a session at once; they converge.
#[test]
fn simultaneous_initiation_converges() {
    let mut alice = E2ee::in_memory(ALICE);
    let (spk, otpks) = alice.generate_prekeys(1).unwrap();
    let alice_bundle = PreKeyBundle::new(&alice.identity(), &spk, otpks.first());
    let (mut bob, bundles) = bob_with_bundle(1);
    let a1 = alice
        .encrypt(BOB, Some(&bundles[0]), b"from alice")
        .unwrap();
    let b1 = bob
        .encrypt(ALICE, Some(&alice_bundle), b"from bob")
        .unwrap();
    assert_eq!(&*alice.decrypt(BOB, &b1).unwrap(), b"from bob");
    assert_eq!(&*bob.decrypt(ALICE, &a1).unwrap(), b"from alice");
    for i in 0..10 {
        let e = alice.encrypt(BOB, None, &msg("a", i)).unwrap();
        assert_eq!(&*bob.decrypt(ALICE, &e).unwrap(), &msg("a", i)[..]);
        let e = bob.encrypt(ALICE, None, &msg("b", i)).unwrap();
        assert_eq!(&*alice.decrypt(BOB, &e).unwrap(), &msg("b", i)[..]);
    }
}

/// Without a session or a bundle there is nothing to encrypt with; a Message from a stranger
/// is refused with a typed error; a forged bundle is refused.
#[test]
fn typed_errors_for_missing_sessions_and_forged_bundles() {
    let mut alice = E2ee::in_memory(ALICE);
    assert!(matches!(
        alice.encrypt(BOB, None, b"x"),
        Err(Error::NoSession(a)) if a == BOB
    ));
    let (mut alice2, mut bob) = established_pair();
    let e = alice2.encrypt(BOB, None, b"x").unwrap();
    let stranger = Address::new(1, 0);
    assert!(matches!(
        bob.decrypt(stranger, &e),
        Err(Error::NoSessionForMessage(_))
    ));
    let (_, mut bundles) = bob_with_bundle(1);
    bundles[0].signed_prekey_sig[0] ^= 1;
    assert!(matches!(
        alice.encrypt(BOB, Some(&bundles[0]), b"x"),
        Err(Error::BadSignature)
    ));
    assert!(!alice.has_session(BOB));
    assert!(matches!(
        alice.encrypt(
            BOB,
            None,
            &vec![0; crate::envelope::MAX_PLAINTEXT_BYTES + 1]
        ),
        Err(Error::NoSession(_))
    ));
    assert!(matches!(
        alice2.encrypt(
            BOB,
            None,
            &vec![0; crate::envelope::MAX_PLAINTEXT_BYTES + 1]
        ),
        Err(Error::PlaintextTooLarge { .. })
    ));
}

/// Per-message overhead for a 100-byte plaintext, as stated in docs/e2ee.md.
#[test]
fn overhead_for_100_bytes() {
    let mut alice = E2ee::in_memory(ALICE);
    let (mut bob, bundles) = bob_with_bundle(1);
    let first = alice.encrypt(BOB, Some(&bundles[0]), &[0x41; 100]).unwrap();
    assert_eq!(first.len(), 100 + PREKEY_MESSAGE_OVERHEAD);
    assert_eq!(first.len(), 263);
    bob.decrypt(ALICE, &first).unwrap();
    let reply = bob.encrypt(ALICE, None, &[0x42; 100]).unwrap();
    assert_eq!(reply.len(), 100 + MESSAGE_OVERHEAD);
    assert_eq!(reply.len(), 158);
}

// ---------------------------------------------------------------------------------------
// Property test: a random schedule of sends, deliveries (any order), drops and duplicates.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Send { from_alice: bool, burst: u8 },
    Deliver { to_bob: bool, pick: u16 },
    Replay { to_bob: bool, pick: u16 },
    Drop { to_bob: bool, pick: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<bool>(), 1u8..6).prop_map(|(from_alice, burst)| Op::Send { from_alice, burst }),
        4 => (any::<bool>(), any::<u16>()).prop_map(|(to_bob, pick)| Op::Deliver { to_bob, pick }),
        1 => (any::<bool>(), any::<u16>()).prop_map(|(to_bob, pick)| Op::Replay { to_bob, pick }),
        1 => (any::<bool>(), any::<u16>()).prop_map(|(to_bob, pick)| Op::Drop { to_bob, pick }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_delivery_schedules(ops in proptest::collection::vec(op(), 1..80)) {
        let (mut alice, mut bob) = established_pair();
        // In flight: (plaintext, envelope) per direction; delivered: for replays.
        let mut to_bob: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut to_alice: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut done_bob: Vec<Vec<u8>> = Vec::new();
        let mut done_alice: Vec<Vec<u8>> = Vec::new();
        let mut counter = 0usize;
        for op in ops {
            match op {
                Op::Send { from_alice, burst } => {
                    for _ in 0..burst {
                        counter += 1;
                        let pt = msg(if from_alice { "a" } else { "b" }, counter);
                        if from_alice {
                            to_bob.push((pt.clone(), alice.encrypt(BOB, None, &pt).unwrap()));
                        } else {
                            to_alice.push((pt.clone(), bob.encrypt(ALICE, None, &pt).unwrap()));
                        }
                    }
                }
                Op::Deliver { to_bob: tb, pick } => {
                    let (q, done) = if tb { (&mut to_bob, &mut done_bob) } else { (&mut to_alice, &mut done_alice) };
                    if q.is_empty() { continue; }
                    let (pt, env) = q.remove(pick as usize % q.len());
                    let got = if tb { bob.decrypt(ALICE, &env) } else { alice.decrypt(BOB, &env) };
                    prop_assert_eq!(&got.unwrap().bytes[..], &pt[..]);
                    done.push(env);
                }
                Op::Replay { to_bob: tb, pick } => {
                    let done = if tb { &done_bob } else { &done_alice };
                    if done.is_empty() { continue; }
                    let env = &done[pick as usize % done.len()];
                    let got = if tb { bob.decrypt(ALICE, env) } else { alice.decrypt(BOB, env) };
                    prop_assert!(matches!(got, Err(Error::DuplicateMessage)), "replay: {:?}", got);
                }
                Op::Drop { to_bob: tb, pick } => {
                    let q = if tb { &mut to_bob } else { &mut to_alice };
                    if q.is_empty() { continue; }
                    q.remove(pick as usize % q.len());
                }
            }
        }
        // Everything still in flight decrypts, in any order.
        for (pt, env) in to_bob.iter().rev() {
            prop_assert_eq!(&bob.decrypt(ALICE, env).unwrap().bytes[..], &pt[..]);
        }
        for (pt, env) in to_alice.iter() {
            prop_assert_eq!(&alice.decrypt(BOB, env).unwrap().bytes[..], &pt[..]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fixed vectors, checked against docs/e2ee.md.
// ---------------------------------------------------------------------------------------

/// An RNG that hands out given 32-byte values, in order (each `fill_bytes` call takes one).
struct FixedRng(VecDeque<[u8; 32]>);

impl RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        panic!("FixedRng only serves 32-byte fills")
    }
    fn next_u64(&mut self) -> u64 {
        panic!("FixedRng only serves 32-byte fills")
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        assert_eq!(dest.len(), 32, "FixedRng only serves 32-byte fills");
        dest.copy_from_slice(&self.0.pop_front().expect("FixedRng ran out of values"));
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for FixedRng {}

/// A fixed private value: SHA-256 of a label (documented in docs/e2ee.md).
fn fixed(label: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(label.as_bytes()).into()
}

/// Computes every vector published in docs/e2ee.md, as (name, hex) in document order.
fn compute_vectors() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| v.push((name.to_string(), hex::encode(bytes)));

    let a_ik = fixed("switchboard-e2ee-vector alice identity x25519");
    let a_sig = fixed("switchboard-e2ee-vector alice identity ed25519");
    let b_ik = fixed("switchboard-e2ee-vector bob identity x25519");
    let b_sig = fixed("switchboard-e2ee-vector bob identity ed25519");
    let b_spk = fixed("switchboard-e2ee-vector bob signed prekey");
    let b_opk = fixed("switchboard-e2ee-vector bob one-time prekey");
    let a_ek = fixed("switchboard-e2ee-vector alice ephemeral");
    let a_rk = fixed("switchboard-e2ee-vector alice ratchet 1");
    let b_rk = fixed("switchboard-e2ee-vector bob ratchet 1");
    for (n, k) in [
        ("alice_identity_x25519_private", a_ik),
        ("alice_identity_ed25519_seed", a_sig),
        ("bob_identity_x25519_private", b_ik),
        ("bob_identity_ed25519_seed", b_sig),
        ("bob_signed_prekey_private", b_spk),
        ("bob_one_time_prekey_private", b_opk),
        ("alice_ephemeral_private", a_ek),
        ("alice_ratchet_private", a_rk),
        ("bob_ratchet_private", b_rk),
    ] {
        put(n, &k);
    }

    let alice = IdentityKeyPair::from_private_bytes(a_ik, a_sig);
    let bob = IdentityKeyPair::from_private_bytes(b_ik, b_sig);
    put("alice_identity_x25519_public", &alice.public().dh);
    put("alice_identity_ed25519_public", &alice.public().sign);
    put("bob_identity_x25519_public", &bob.public().dh);
    put("bob_identity_ed25519_public", &bob.public().sign);

    let mut bob_store = PreKeyStore::new();
    let spk = crate::keys::SignedPreKey::from_secret(1, &bob, StaticSecret::from(b_spk));
    let spk_pub = bob_store.insert_signed_prekey(spk);
    let opk = crate::keys::OneTimePreKey::from_secret(7, StaticSecret::from(b_opk));
    let opk_pub = opk.public();
    bob_store.insert_one_time_prekey(opk).unwrap();
    put("bob_signed_prekey_public", &spk_pub.public);
    put("bob_signed_prekey_signature", &spk_pub.signature);
    put("bob_one_time_prekey_public", &opk_pub.public);
    let bundle = PreKeyBundle::new(&bob.public(), &spk_pub, Some(&opk_pub));
    put("bundle", &bundle.encode());

    // X3DH.
    let ek = StaticSecret::from(a_ek);
    let x = crate::x3dh::initiate_with_ephemeral(&alice, &bundle, &ek).unwrap();
    put("alice_ephemeral_public", &x.init.base_key);
    let dh = |s: &[u8; 32], p: &[u8; 32]| *crate::keys::dh(&StaticSecret::from(*s), p).unwrap();
    put("x3dh_dh1", &dh(&a_ik, &spk_pub.public));
    put("x3dh_dh2", &dh(&a_ek, &bob.public().dh));
    put("x3dh_dh3", &dh(&a_ek, &spk_pub.public));
    put("x3dh_dh4", &dh(&a_ek, &opk_pub.public));
    put("x3dh_sk", x.shared_key.as_bytes());
    put("x3dh_ad", x.ad.as_bytes());

    // Double Ratchet: Alice's init and her first two messages.
    let a_ratchet_pub = x25519_dalek::PublicKey::from(&StaticSecret::from(a_rk)).to_bytes();
    put("alice_ratchet_public", &a_ratchet_pub);
    let (rk1, ck0) = crate::kdf::kdf_rk(
        &crate::kdf::RootKey(*x.shared_key.as_bytes()),
        &dh(&a_rk, &spk_pub.public),
    );
    put("alice_root_key_1", &rk1.0);
    put("alice_sending_chain_key_0", &ck0.0);
    let (_, mk0) = crate::kdf::kdf_ck(&ck0);
    put("message_key_0", &mk0.0);
    let mut alice_session = InitiatorPending::from_x3dh(x, StaticSecret::from(a_rk)).unwrap();
    let p1 = b"Hello Bob, this is the first message.";
    let p2 = b"And this is the second.";
    let m1 = alice_session.encrypt(p1).unwrap();
    let m2 = alice_session.encrypt(p2).unwrap();
    put("message_1_plaintext", p1);
    put("message_1_header", &m1.message.header.encode());
    put("message_1_ciphertext", &m1.message.ciphertext);
    put("message_1_envelope", &Envelope::PreKey(m1.clone()).encode());
    put("message_2_plaintext", p2);
    put("message_2_header", &m2.message.header.encode());
    put("message_2_ciphertext", &m2.message.ciphertext);
    put("message_2_envelope", &Envelope::PreKey(m2.clone()).encode());

    // Bob: X3DH responder, decrypts both, replies with his first ratchet key.
    let mut rng = FixedRng(VecDeque::from([b_rk]));
    let (mut bob_session, pt1) = Established::respond(&bob, &mut bob_store, &m1, &mut rng).unwrap();
    assert_eq!(&pt1[..], p1);
    assert!(!bob_store.has_one_time_prekey(7));
    assert_eq!(&bob_session.decrypt(&m2.message, &mut rng).unwrap()[..], p2);
    let p3 = b"Hi Alice, Bob here.";
    let m3 = bob_session.encrypt(p3).unwrap();
    put("message_3_plaintext", p3);
    put("message_3_header", &m3.header.encode());
    put("message_3_ciphertext", &m3.ciphertext);
    put(
        "message_3_envelope",
        &Envelope::Message(m3.clone()).encode(),
    );
    let (est, pt3) = Session::Pending(alice_session).decrypt(&m3, &mut OsRng);
    assert_eq!(&pt3.unwrap()[..], p3);
    assert!(est.is_established());
    let _: &Message = &m3;
    v
}

/// The `name = hex` lines between `<!-- {block}:begin -->` and `<!-- {block}:end -->` in
/// docs/e2ee.md.
fn doc_vectors(block: &str) -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/e2ee.md"))
        .expect("docs/e2ee.md is readable");
    let begin = doc
        .find(&format!("<!-- {block}:begin -->"))
        .unwrap_or_else(|| panic!("{block} start marker"));
    let end = doc
        .find(&format!("<!-- {block}:end -->"))
        .unwrap_or_else(|| panic!("{block} end marker"));
    assert!(begin < end, "{block} markers out of order");
    doc[begin..end]
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Requires the vector block `block` of docs/e2ee.md to be exactly `computed` (printed first
/// with `E2EE_PRINT_VECTORS=1`, to paste after a deliberate change).
pub(crate) fn check_doc_vectors(block: &str, computed: &[(String, String)]) {
    if std::env::var_os("E2EE_PRINT_VECTORS").is_some() {
        for (k, v) in computed {
            println!("{k} = {v}");
        }
    }
    let doc = doc_vectors(block);
    assert_eq!(doc.len(), computed.len(), "vector count differs from docs");
    for (k, v) in computed {
        assert_eq!(
            doc.get(k),
            Some(v),
            "vector `{k}` differs from docs/e2ee.md"
        );
    }
}

/// The fixed vectors in docs/e2ee.md are exactly what this implementation computes.
/// Regenerate the block with `E2EE_PRINT_VECTORS=1 cargo test -p switchboard-e2ee
/// vectors_match_docs -- --nocapture`.
#[test]
fn vectors_match_docs() {
    check_doc_vectors("e2ee-vectors", &compute_vectors());
}

/// A top-up adds one-time prekeys with fresh, increasing ids and keeps the signed prekey; the
/// new keys work for X3DH; the state survives a reopen.
#[test]
fn top_up_keeps_the_signed_prekey_and_grows_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = || StateStore::open_dir(&dir.path().join("e2ee")).unwrap();
    let mut bob = E2ee::new(store(), BOB).unwrap();
    assert!(bob.signed_prekey().is_none());
    let (spk, first) = bob.generate_prekeys(3).unwrap();
    assert_eq!(bob.signed_prekey(), Some(spk));
    let more = bob.generate_one_time_prekeys(2).unwrap();
    assert_eq!(bob.signed_prekey(), Some(spk), "a top-up does not rotate");
    let max_first = first.iter().map(|k| k.id).max().unwrap();
    assert!(more.iter().all(|k| k.id > max_first));
    assert_eq!(bob.one_time_prekey_count(), 5);
    drop(bob);
    let mut bob = E2ee::new(store(), BOB).unwrap();
    assert_eq!(bob.one_time_prekey_count(), 5, "persisted");
    let mut alice = E2ee::in_memory(ALICE);
    let bundle = PreKeyBundle::new(&bob.identity(), &spk, Some(&more[1]));
    let env = alice.encrypt(BOB, Some(&bundle), b"topped up").unwrap();
    assert_eq!(&*bob.decrypt(ALICE, &env).unwrap(), b"topped up");
    assert_eq!(bob.one_time_prekey_count(), 4);
}
