//! Sender Keys: every receiver rule (order, skips, bounds, replay, signature, transactions),
//! rotation on removal, the `E2ee` group API with persistence and the state migration, codec
//! property tests, and the vectors of docs/e2ee.md "Sender Keys (groups)".

use proptest::prelude::*;
use rand::rngs::OsRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DecodeError, Error};
use crate::kdf::{expand_message_key_with, ChainKey, SENDER_KEY_MESSAGE_KEYS_INFO};
use crate::keys::PreKeyBundle;
use crate::sender_key::*;
use crate::{Address, E2ee, StateStore, STATE_VERSION};

const GROUP: u64 = 9001;
const ALICE: Address = Address {
    user: 14155550100,
    device: 0,
};
const BOB: Address = Address {
    user: 447700900123,
    device: 1,
};
const CAROL: Address = Address {
    user: 4915112345678,
    device: 0,
};
const MALLORY: Address = Address {
    user: 33612345678,
    device: 2,
};

fn fixed(label: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(format!("switchboard-e2ee-vector {label}").as_bytes()).into()
}

/// A sender key and a receiver state made from its distribution.
fn pair() -> (SenderKey, SenderKeyState) {
    let k = SenderKey::generate(GROUP, 42, &mut OsRng);
    let d = SenderKeyDistribution::decode(&k.distribution().encode()).unwrap();
    (k, SenderKeyState::from_distribution(&d))
}

fn encode_state(s: &SenderKeyState) -> Vec<u8> {
    let mut out = Vec::new();
    s.put(&mut out);
    out
}

fn pt(i: u32) -> Vec<u8> {
    format!("group message #{i}").into_bytes()
}

// ---------------------------------------------------------------------------------------
// Receiver rules on the state machine.
// ---------------------------------------------------------------------------------------

#[test]
fn in_order_out_of_order_and_replay() {
    let (mut k, mut r) = pair();
    let msgs: Vec<SenderKeyMessage> = (0..10).map(|i| k.encrypt(&pt(i)).unwrap()).collect();
    assert_eq!(k.iteration(), 10);
    // 0, then 5 (skips 1..=4), then 3, 1, 2, 4, then 9, 6, 8, 7.
    for i in [0u32, 5, 3, 1, 2, 4, 9, 6, 8, 7] {
        assert_eq!(&r.decrypt(&msgs[i as usize]).unwrap()[..], &pt(i)[..]);
    }
    assert_eq!(r.iteration(), 10);
    assert_eq!(r.skipped_key_count(), 0);
    // Every one again is a replay, and changes nothing.
    let before = encode_state(&r);
    for m in &msgs {
        assert!(matches!(r.decrypt(m), Err(Error::DuplicateMessage)));
    }
    assert_eq!(encode_state(&r), before);
}

#[test]
fn replay_of_a_skipped_key_after_use() {
    let (mut k, mut r) = pair();
    let m0 = k.encrypt(b"zero").unwrap();
    let m1 = k.encrypt(b"one").unwrap();
    r.decrypt(&m1).unwrap();
    assert_eq!(r.skipped_key_count(), 1);
    r.decrypt(&m0).unwrap();
    assert_eq!(r.skipped_key_count(), 0);
    assert!(matches!(r.decrypt(&m0), Err(Error::DuplicateMessage)));
    assert!(matches!(r.decrypt(&m1), Err(Error::DuplicateMessage)));
}

#[test]
fn too_far_ahead_refused_and_bound_exact() {
    let (mut k, mut r) = pair();
    // Iteration MAX_SKIP skips exactly MAX_SKIP keys: allowed. MAX_SKIP + 1: refused.
    let msgs: Vec<_> = (0..=MAX_SKIP + 1)
        .map(|_| k.encrypt(b"x").unwrap())
        .collect();
    let before = encode_state(&r);
    match r.decrypt(&msgs[MAX_SKIP as usize + 1]) {
        Err(Error::SenderKeyTooFarAhead {
            iteration,
            current,
            max,
        }) => {
            assert_eq!((iteration, current, max), (MAX_SKIP + 1, 0, MAX_SKIP));
        }
        other => panic!("expected SenderKeyTooFarAhead, got {other:?}"),
    }
    assert_eq!(
        encode_state(&r),
        before,
        "refused message changed the state"
    );
    r.decrypt(&msgs[MAX_SKIP as usize]).unwrap();
    assert_eq!(r.skipped_key_count(), MAX_SKIP as usize);
    // Every skipped one still decrypts, once.
    r.decrypt(&msgs[0]).unwrap();
    r.decrypt(&msgs[1999]).unwrap();
    r.decrypt(&msgs[MAX_SKIP as usize + 1]).unwrap();
    assert_eq!(r.skipped_key_count(), MAX_SKIP as usize - 2);
}

#[test]
fn skipped_key_cap_evicts_oldest() {
    let (mut k, mut r) = pair();
    let msgs: Vec<_> = (0..3002).map(|_| k.encrypt(b"m").unwrap()).collect();
    r.decrypt(&msgs[2000]).unwrap(); // skips 0..=1999: 2000 keys (the cap)
    assert_eq!(r.skipped_key_count(), MAX_SKIPPED_KEYS);
    r.decrypt(&msgs[3001]).unwrap(); // skips 2001..=3000: 1000 more, 1000 oldest evicted
    assert_eq!(r.skipped_key_count(), MAX_SKIPPED_KEYS);
    assert!(matches!(r.decrypt(&msgs[0]), Err(Error::DuplicateMessage)));
    assert!(matches!(
        r.decrypt(&msgs[999]),
        Err(Error::DuplicateMessage)
    ));
    r.decrypt(&msgs[1000]).unwrap();
    r.decrypt(&msgs[2500]).unwrap();
}

#[test]
fn signature_checked_before_decryption_and_state_unchanged() {
    let (mut k, mut r) = pair();
    let m = k.encrypt(b"hello group").unwrap();
    let before = encode_state(&r);
    // Any flipped bit anywhere: bad signature (header and ciphertext are signed), or a bad
    // signature field itself.
    let enc = m.encode();
    for i in [
        0usize,
        2,
        9,
        10,
        14,
        17,
        18,
        enc.len() - 65,
        enc.len() - 64,
        enc.len() - 1,
    ] {
        let mut b = enc.clone();
        b[i] ^= 0x01;
        match SenderKeyMessage::decode(&b) {
            Ok(bad) => {
                let e = r.decrypt(&bad).unwrap_err();
                assert!(
                    matches!(e, Error::SenderKeySignatureInvalid),
                    "byte {i}: {e:?}"
                );
            }
            Err(DecodeError::UnknownVersion(_) | DecodeError::UnknownType(_)) => {}
            Err(e) => panic!("byte {i}: {e:?}"),
        }
        assert_eq!(encode_state(&r), before);
    }
    // Another member knows the chain key (it has the distribution) but not the signing key:
    // its forgery is refused.
    let d = k.distribution();
    let mut forger =
        SenderKey::from_parts(GROUP, 42, d.iteration, *d.chain_key.as_bytes(), [9; 32]);
    let forged = forger.encrypt(b"I am Alice").unwrap();
    assert!(matches!(
        r.decrypt(&forged),
        Err(Error::SenderKeySignatureInvalid)
    ));
    assert_eq!(encode_state(&r), before);
    assert_eq!(&r.decrypt(&m).unwrap()[..], b"hello group");
}

#[test]
fn aead_failure_under_a_valid_signature_changes_nothing() {
    // The sender's own signing key but a chain the receiver does not have: the signature
    // verifies, AES-GCM refuses.
    let seed = [5u8; 32];
    let good = SenderKey::from_parts(GROUP, 1, 0, [1; 32], seed);
    let mut r = SenderKeyState::from_distribution(&good.distribution());
    let mut wrong_chain = SenderKey::from_parts(GROUP, 1, 0, [2; 32], seed);
    let _ = wrong_chain.encrypt(b"a").unwrap();
    let m = wrong_chain.encrypt(b"b").unwrap(); // iteration 1: would skip one key
    let before = encode_state(&r);
    assert!(matches!(r.decrypt(&m), Err(Error::DecryptFailed)));
    assert_eq!(encode_state(&r), before);
    assert_eq!(r.skipped_key_count(), 0);
}

#[test]
fn late_distribution_cannot_read_earlier_messages() {
    let mut k = SenderKey::generate(GROUP, 3, &mut OsRng);
    let early = k.encrypt(b"before you joined").unwrap();
    let mut r = SenderKeyState::from_distribution(&k.distribution());
    assert_eq!(r.iteration(), 1);
    assert!(matches!(r.decrypt(&early), Err(Error::DuplicateMessage)));
    let later = k.encrypt(b"welcome").unwrap();
    assert_eq!(&r.decrypt(&later).unwrap()[..], b"welcome");
}

#[test]
fn sender_limits() {
    let mut k = SenderKey::from_parts(GROUP, 1, u32::MAX, [1; 32], [2; 32]);
    assert!(matches!(k.encrypt(b"x"), Err(Error::CounterExhausted)));
    let mut k = SenderKey::generate(GROUP, 1, &mut OsRng);
    let big = vec![0u8; MAX_PLAINTEXT_BYTES + 1];
    assert!(matches!(
        k.encrypt(&big),
        Err(Error::PlaintextTooLarge { .. })
    ));
    assert_eq!(k.iteration(), 0);
    let max = k.encrypt(&big[1..]).unwrap().encode();
    assert_eq!(max.len(), MAX_MESSAGE_BYTES);
    assert!(SenderKeyMessage::decode(&max).is_ok());
    let mut too_big = max.clone();
    too_big.push(0);
    assert!(matches!(
        SenderKeyMessage::decode(&too_big),
        Err(DecodeError::TooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// Codecs.
// ---------------------------------------------------------------------------------------

#[test]
fn codec_lengths_and_refusals() {
    assert_eq!(DISTRIBUTION_LEN, 82);
    assert_eq!(MESSAGE_OVERHEAD, 98);
    let mut k = SenderKey::generate(GROUP, 0xdead_beef, &mut OsRng);
    let d = k.distribution().encode();
    assert_eq!(d.len(), DISTRIBUTION_LEN);
    let m = k.encrypt(&[7u8; 100]).unwrap().encode();
    assert_eq!(m.len(), 100 + MESSAGE_OVERHEAD);

    assert!(matches!(
        SenderKeyDistribution::decode(&[]),
        Err(DecodeError::Truncated { .. })
    ));
    let mut b = d.to_vec();
    b[0] = 2;
    assert_eq!(
        SenderKeyDistribution::decode(&b),
        Err(DecodeError::UnknownVersion(2))
    );
    // A message is not a distribution and the other way round; nor is an envelope.
    assert_eq!(
        SenderKeyDistribution::decode(&m),
        Err(DecodeError::UnknownType(TYPE_MESSAGE))
    );
    assert_eq!(
        SenderKeyMessage::decode(&d),
        Err(DecodeError::UnknownType(TYPE_DISTRIBUTION))
    );
    assert_eq!(
        SenderKeyMessage::decode(&[1, 2]),
        Err(DecodeError::UnknownType(2))
    );
    let mut long = d.to_vec();
    long.push(0);
    assert_eq!(
        SenderKeyDistribution::decode(&long),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
    // The identity point and a non-point as signing key are refused.
    let mut weak = d.to_vec();
    weak[50..82].copy_from_slice(&{
        let mut id = [0u8; 32];
        id[0] = 1;
        id
    });
    assert_eq!(
        SenderKeyDistribution::decode(&weak),
        Err(DecodeError::InvalidValue {
            field: "signing_key"
        })
    );
    // Message: signature missing or ciphertext shorter than the tag.
    assert!(matches!(
        SenderKeyMessage::decode(&m[..18 + 63]),
        Err(DecodeError::Truncated {
            field: "signature",
            ..
        })
    ));
    let mut short = m[..18 + 15].to_vec();
    short.extend_from_slice(&[0; 64]);
    assert_eq!(
        SenderKeyMessage::decode(&short),
        Err(DecodeError::CiphertextTooShort { len: 15 })
    );
}

fn sample_message(group: u64, key_id: u32, iteration: u32, ct_len: usize) -> SenderKeyMessage {
    SenderKeyMessage {
        group_id: group,
        key_id,
        iteration,
        ciphertext: vec![0xab; ct_len],
        signature: [0x5a; 64],
    }
}

proptest! {
    #[test]
    fn distribution_roundtrip(group in any::<u64>(), key_id in any::<u32>(),
                              iteration in any::<u32>(), chain in any::<[u8; 32]>(),
                              seed in any::<[u8; 32]>()) {
        let d = SenderKey::from_parts(group, key_id, iteration, chain, seed).distribution();
        let enc = d.encode();
        prop_assert_eq!(SenderKeyDistribution::decode(&enc).unwrap(), d);
        for cut in 0..enc.len() {
            prop_assert!(SenderKeyDistribution::decode(&enc[..cut]).is_err());
        }
    }

    #[test]
    fn message_roundtrip(group in any::<u64>(), key_id in any::<u32>(),
                         iteration in any::<u32>(), ct_len in 16usize..300) {
        let m = sample_message(group, key_id, iteration, ct_len);
        let enc = m.encode();
        prop_assert_eq!(enc.len(), ct_len + MESSAGE_HEADER_LEN + SIGNATURE_LEN);
        prop_assert_eq!(SenderKeyMessage::decode(&enc).unwrap(), m);
        for cut in 0..enc.len() {
            let _ = SenderKeyMessage::decode(&enc[..cut]);
        }
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(d) = SenderKeyDistribution::decode(&bytes) {
            prop_assert_eq!(&d.encode()[..], &bytes[..]);
        }
        if let Ok(m) = SenderKeyMessage::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }

    #[test]
    fn decoders_never_panic_on_valid_prefixes(tail in proptest::collection::vec(any::<u8>(), 0..200),
                                              ty in prop_oneof![Just(TYPE_DISTRIBUTION), Just(TYPE_MESSAGE)]) {
        let mut bytes = vec![VERSION, ty];
        bytes.extend_from_slice(&tail);
        if let Ok(d) = SenderKeyDistribution::decode(&bytes) {
            prop_assert_eq!(&d.encode()[..], &bytes[..]);
        }
        if let Ok(m) = SenderKeyMessage::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any delivery order with duplicates: each message decrypts exactly once, to its
    /// plaintext; every other delivery is a replay.
    #[test]
    fn random_delivery_schedules(seed in any::<u64>(), n in 1u32..60, dups in 0usize..30) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut k, mut r) = pair();
        let msgs: Vec<_> = (0..n).map(|i| k.encrypt(&pt(i)).unwrap()).collect();
        let mut order: Vec<u32> = (0..n).collect();
        for j in 0..dups {
            order.push(j as u32 % n);
        }
        order.shuffle(&mut rng);
        let mut seen = std::collections::BTreeSet::new();
        for i in order {
            match r.decrypt(&msgs[i as usize]) {
                Ok(p) => {
                    prop_assert!(seen.insert(i), "decrypted twice");
                    prop_assert_eq!(&p[..], &pt(i)[..]);
                }
                Err(Error::DuplicateMessage) => prop_assert!(seen.contains(&i)),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
        prop_assert_eq!(seen.len(), n as usize);
        prop_assert_eq!(r.skipped_key_count(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// The E2ee API.
// ---------------------------------------------------------------------------------------

/// Sends `bytes` from `a` to `b` over their pairwise session (starting it if needed).
fn pairwise(a: &mut E2ee, b: &mut E2ee, bytes: &[u8]) -> Vec<u8> {
    let to = b.local_address();
    let env = match a.encrypt(to, None, bytes) {
        Err(Error::NoSession(_)) => {
            let (spk, otpks) = b.generate_prekeys(1).unwrap();
            let bundle = PreKeyBundle::new(&b.identity(), &spk, otpks.first());
            a.encrypt(to, Some(&bundle), bytes).unwrap()
        }
        other => other.unwrap(),
    };
    b.decrypt(a.local_address(), &env).unwrap().bytes.to_vec()
}

/// `from` sends its distribution to each of `to` over pairwise sessions.
fn distribute(from: &mut E2ee, to: &mut [&mut E2ee]) {
    let d = from.sender_key_distribution(GROUP).unwrap();
    for m in to.iter_mut() {
        let got = pairwise(from, m, &d);
        let r = m
            .process_sender_key_distribution(from.local_address(), &got)
            .unwrap();
        assert_eq!(r.group_id, GROUP);
        assert_eq!(Some(r.key_id), from.sender_key_id(GROUP));
    }
}

#[test]
fn group_of_three_over_pairwise_sessions() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    let mut carol = E2ee::in_memory(CAROL);
    assert!(matches!(
        alice.group_encrypt(GROUP, b"too early"),
        Err(Error::NoSenderKey(GROUP))
    ));
    distribute(&mut alice, &mut [&mut bob, &mut carol]);
    distribute(&mut bob, &mut [&mut alice, &mut carol]);
    distribute(&mut carol, &mut [&mut alice, &mut bob]);
    for round in 0..5u32 {
        let m = alice.group_encrypt(GROUP, &pt(round)).unwrap();
        assert_eq!(
            &*bob.group_decrypt(GROUP, ALICE, &m).unwrap(),
            &pt(round)[..]
        );
        assert_eq!(
            &*carol.group_decrypt(GROUP, ALICE, &m).unwrap(),
            &pt(round)[..]
        );
        let m = carol.group_encrypt(GROUP, &pt(100 + round)).unwrap();
        assert_eq!(
            &*alice.group_decrypt(GROUP, CAROL, &m).unwrap(),
            &pt(100 + round)[..]
        );
        assert_eq!(
            &*bob.group_decrypt(GROUP, CAROL, &m).unwrap(),
            &pt(100 + round)[..]
        );
        assert!(matches!(
            bob.group_decrypt(GROUP, CAROL, &m),
            Err(Error::DuplicateMessage)
        ));
    }
    // Asking again returns the same key, at its current iteration.
    let id = alice.sender_key_id(GROUP);
    let d = alice.sender_key_distribution(GROUP).unwrap();
    let d = SenderKeyDistribution::decode(&d).unwrap();
    assert_eq!(Some(d.key_id), id);
    assert_eq!(d.iteration, 5);
}

#[test]
fn typed_errors_at_the_api() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    let m = {
        alice.sender_key_distribution(GROUP).unwrap();
        alice.group_encrypt(GROUP, b"hi").unwrap()
    };
    let key_id = alice.sender_key_id(GROUP).unwrap();
    // No distribution yet.
    match bob.group_decrypt(GROUP, ALICE, &m) {
        Err(Error::UnknownSenderKey {
            group,
            sender,
            key_id: k,
        }) => assert_eq!((group, sender, k), (GROUP, ALICE, key_id)),
        other => panic!("{other:?}"),
    }
    distribute(&mut alice, &mut [&mut bob]);
    // The distribution was made after `m`: too old for Bob.
    assert!(matches!(
        bob.group_decrypt(GROUP, ALICE, &m),
        Err(Error::DuplicateMessage)
    ));
    let m = alice.group_encrypt(GROUP, b"hi again").unwrap();
    let before = bob.export_state().to_vec();
    // Delivered as another group, or as from another device: refused, nothing changed.
    assert!(matches!(
        bob.group_decrypt(GROUP + 1, ALICE, &m),
        Err(Error::GroupMismatch {
            expected,
            found: GROUP
        }) if expected == GROUP + 1
    ));
    assert!(matches!(
        bob.group_decrypt(GROUP, CAROL, &m),
        Err(Error::UnknownSenderKey { .. })
    ));
    assert!(matches!(
        bob.group_decrypt(GROUP, ALICE, &m[..20]),
        Err(Error::Decode(_))
    ));
    assert!(matches!(
        bob.process_sender_key_distribution(ALICE, &m),
        Err(Error::Decode(DecodeError::UnknownType(TYPE_MESSAGE)))
    ));
    let mut bad = m.clone();
    bad[30] ^= 4;
    assert!(matches!(
        bob.group_decrypt(GROUP, ALICE, &bad),
        Err(Error::SenderKeySignatureInvalid)
    ));
    assert_eq!(bob.export_state().to_vec(), before);
    assert_eq!(&*bob.group_decrypt(GROUP, ALICE, &m).unwrap(), b"hi again");
}

/// The removal rule: the remaining members rotate; the removed member, holding only the
/// old distribution, cannot decrypt anything sent under the new key (whether it reads the
/// ciphertext from an old mailbox entry or gets it replayed), while messages sent before the
/// rotation and still in flight decrypt for the members that stay.
#[test]
fn rotation_on_removal_locks_the_removed_member_out() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    let mut mallory = E2ee::in_memory(MALLORY);
    distribute(&mut alice, &mut [&mut bob, &mut mallory]);
    distribute(&mut mallory, &mut [&mut alice, &mut bob]);
    let old_id = alice.sender_key_id(GROUP).unwrap();
    let before = alice
        .group_encrypt(GROUP, b"while mallory was here")
        .unwrap();
    let in_flight = alice
        .group_encrypt(GROUP, b"sent just before removal")
        .unwrap();
    assert_eq!(
        &*mallory.group_decrypt(GROUP, ALICE, &before).unwrap(),
        b"while mallory was here"
    );

    // Mallory is removed: Alice and Bob forget its keys, Alice rotates and sends the new
    // distribution to Bob only.
    assert!(alice.forget_group_member(GROUP, MALLORY).unwrap());
    assert!(bob.forget_group_member(GROUP, MALLORY).unwrap());
    assert!(!bob.forget_group_member(GROUP, MALLORY).unwrap());
    let d = alice.rotate_sender_key(GROUP).unwrap();
    let new_id = alice.sender_key_id(GROUP).unwrap();
    assert_ne!(new_id, old_id);
    let got = pairwise(&mut alice, &mut bob, &d);
    let r = bob.process_sender_key_distribution(ALICE, &got).unwrap();
    assert!(r.new);
    assert_eq!(
        bob.received_sender_key_ids(GROUP, ALICE),
        vec![new_id, old_id]
    );

    let after = alice.group_encrypt(GROUP, b"mallory is gone").unwrap();
    assert_eq!(
        SenderKeyMessage::decode(&after).unwrap().iteration,
        0,
        "a new chain"
    );
    assert_eq!(
        &*bob.group_decrypt(GROUP, ALICE, &after).unwrap(),
        b"mallory is gone"
    );
    // The old key still serves the message in flight.
    assert_eq!(
        &*bob.group_decrypt(GROUP, ALICE, &in_flight).unwrap(),
        b"sent just before removal"
    );
    // Mallory: the ciphertext from an old mailbox entry, and again as a replay.
    for _ in 0..2 {
        match mallory.group_decrypt(GROUP, ALICE, &after) {
            Err(Error::UnknownSenderKey { key_id, .. }) => assert_eq!(key_id, new_id),
            other => panic!("removed member: {other:?}"),
        }
    }
    // Even a forged distribution claim is useless: the new chain key never reached it.
    assert!(mallory
        .received_sender_key_ids(GROUP, ALICE)
        .iter()
        .all(|k| *k == old_id));
    // And Mallory's own messages are no longer accepted by the members.
    let from_mallory = mallory.group_encrypt(GROUP, b"still here?").unwrap();
    assert!(matches!(
        bob.group_decrypt(GROUP, MALLORY, &from_mallory),
        Err(Error::UnknownSenderKey { .. })
    ));
}

#[test]
fn repeated_distribution_never_rewinds_and_reset_replaces() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    let d0 = alice.sender_key_distribution(GROUP).unwrap();
    bob.process_sender_key_distribution(ALICE, &d0).unwrap();
    let m0 = alice.group_encrypt(GROUP, b"m0").unwrap();
    bob.group_decrypt(GROUP, ALICE, &m0).unwrap();
    let again = bob.process_sender_key_distribution(ALICE, &d0).unwrap();
    assert!(!again.new);
    assert!(matches!(
        bob.group_decrypt(GROUP, ALICE, &m0),
        Err(Error::DuplicateMessage)
    ));
    // Same key id, another signing key (Alice lost her state and made a key that happens to
    // reuse the id): replaces the old one.
    let d = SenderKeyDistribution::decode(&d0).unwrap();
    let mut reset = SenderKey::from_parts(GROUP, d.key_id, 0, [3; 32], [4; 32]);
    let r = bob
        .process_sender_key_distribution(ALICE, &reset.distribution().encode())
        .unwrap();
    assert!(r.new);
    assert_eq!(bob.received_sender_key_ids(GROUP, ALICE), vec![d.key_id]);
    let m = reset.encrypt(b"after reset").unwrap().encode();
    assert_eq!(
        &*bob.group_decrypt(GROUP, ALICE, &m).unwrap(),
        b"after reset"
    );
}

#[test]
fn keys_per_sender_capped() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    let mut ids = Vec::new();
    for i in 0..MAX_KEYS_PER_SENDER + 2 {
        let d = if i == 0 {
            alice.sender_key_distribution(GROUP).unwrap()
        } else {
            alice.rotate_sender_key(GROUP).unwrap()
        };
        bob.process_sender_key_distribution(ALICE, &d).unwrap();
        ids.insert(0, alice.sender_key_id(GROUP).unwrap());
    }
    ids.truncate(MAX_KEYS_PER_SENDER);
    assert_eq!(bob.received_sender_key_ids(GROUP, ALICE), ids);
}

#[test]
fn forget_group_and_forget_peer() {
    let mut alice = E2ee::in_memory(ALICE);
    let mut bob = E2ee::in_memory(BOB);
    distribute(&mut alice, &mut [&mut bob]);
    distribute(&mut bob, &mut [&mut alice]);
    let other = GROUP + 7;
    let d = alice.sender_key_distribution(other).unwrap();
    bob.process_sender_key_distribution(ALICE, &d).unwrap();
    assert!(bob.forget_group(GROUP).unwrap());
    assert!(!bob.forget_group(GROUP).unwrap());
    assert_eq!(bob.sender_key_id(GROUP), None);
    assert!(bob.received_sender_key_ids(GROUP, ALICE).is_empty());
    assert_eq!(bob.received_sender_key_ids(other, ALICE).len(), 1);
    // forget_peer drops that device's sender keys in every group.
    assert!(bob.forget_peer(ALICE).unwrap());
    assert!(bob.received_sender_key_ids(other, ALICE).is_empty());
    let m = alice.group_encrypt(other, b"x").unwrap();
    assert!(matches!(
        bob.group_decrypt(other, ALICE, &m),
        Err(Error::UnknownSenderKey { .. })
    ));
}

#[test]
fn group_state_persists_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = |n: &str| StateStore::open_dir(&dir.path().join(n)).unwrap();
    let mut alice = E2ee::new(store("a"), ALICE).unwrap();
    let mut bob = E2ee::new(store("b"), BOB).unwrap();
    let d = alice.sender_key_distribution(GROUP).unwrap();
    bob.process_sender_key_distribution(ALICE, &d).unwrap();
    let m0 = alice.group_encrypt(GROUP, b"m0").unwrap();
    let m1 = alice.group_encrypt(GROUP, b"m1").unwrap();
    bob.group_decrypt(GROUP, ALICE, &m1).unwrap();
    // A deferred decrypt is not on disk until save.
    bob.group_decrypt_deferred(GROUP, ALICE, &m0).unwrap();
    drop((alice, bob));
    let mut alice = E2ee::new(store("a"), ALICE).unwrap();
    let mut bob = E2ee::new(store("b"), BOB).unwrap();
    assert_eq!(&*bob.group_decrypt(GROUP, ALICE, &m0).unwrap(), b"m0");
    assert!(matches!(
        bob.group_decrypt(GROUP, ALICE, &m1),
        Err(Error::DuplicateMessage)
    ));
    // Alice's chain advanced on disk: her next message is iteration 2, never a reuse.
    let m2 = alice.group_encrypt(GROUP, b"m2").unwrap();
    assert_eq!(SenderKeyMessage::decode(&m2).unwrap().iteration, 2);
    assert_eq!(&*bob.group_decrypt(GROUP, ALICE, &m2).unwrap(), b"m2");
    // Export/import round trip is exact, and every truncation is an error, not a panic.
    let s = bob.export_state();
    assert_eq!(s[0], STATE_VERSION);
    let back = E2ee::import_state(&s).unwrap();
    assert_eq!(&back.export_state()[..], &s[..]);
    for cut in (0..s.len()).step_by(7) {
        assert!(E2ee::import_state(&s[..cut]).is_err());
    }
}

#[test]
fn version_1_state_migrates_and_unknown_versions_refused() {
    let (mut alice, mut bob) = {
        let mut a = E2ee::in_memory(ALICE);
        let mut b = E2ee::in_memory(BOB);
        pairwise(&mut a, &mut b, b"hello");
        (a, b)
    };
    // A version 1 state is a version 2 state without the group section (two zero counts).
    let v2 = bob.export_state().to_vec();
    assert_eq!(&v2[v2.len() - 8..], &[0; 8]);
    let mut v1 = v2[..v2.len() - 8].to_vec();
    v1[0] = 1;
    let mut migrated = E2ee::import_state(&v1).unwrap();
    assert_eq!(&migrated.export_state()[..], &v2[..]);
    // It still talks to Alice, and now does groups.
    let env = alice.encrypt(BOB, None, b"after migration").unwrap();
    assert_eq!(&*migrated.decrypt(ALICE, &env).unwrap(), b"after migration");
    let d = alice.sender_key_distribution(GROUP).unwrap();
    migrated.process_sender_key_distribution(ALICE, &d).unwrap();
    // Version 1 bytes followed by a group section are trailing bytes; unknown versions
    // are refused.
    let mut v1_with_groups = v2.clone();
    v1_with_groups[0] = 1;
    assert!(matches!(
        E2ee::import_state(&v1_with_groups),
        Err(Error::Decode(DecodeError::TrailingBytes { extra: 8 }))
    ));
    for v in [0u8, 3, 0xff] {
        let mut b = v2.clone();
        b[0] = v;
        assert!(matches!(
            E2ee::import_state(&b),
            Err(Error::Decode(DecodeError::UnknownVersion(x))) if x == v
        ));
    }
    let _ = &mut bob;
}

// ---------------------------------------------------------------------------------------
// Vectors of docs/e2ee.md "Sender Keys (groups)".
// ---------------------------------------------------------------------------------------

const VECTOR_GROUP: u64 = 0x0000_0000_0000_2329;
const VECTOR_KEY_ID: u32 = 0x1234_5678;

fn compute_vectors() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| v.push((name.to_string(), hex::encode(bytes)));
    let chain = fixed("alice sender chain key");
    let seed = fixed("alice sender signing key");
    let mut k = SenderKey::from_parts(VECTOR_GROUP, VECTOR_KEY_ID, 0, chain, seed);
    put("sender_group_id", &VECTOR_GROUP.to_be_bytes());
    put("sender_key_id", &VECTOR_KEY_ID.to_be_bytes());
    put("sender_chain_key_0", &chain);
    put("sender_signing_seed", &seed);
    put("sender_signing_public", &k.signing_public());
    let dist = k.distribution().encode();
    put("sender_distribution", &dist);

    let (ck1, mk0) = chain_step(&ChainKey(chain));
    let (aes0, nonce0) = expand_message_key_with(&mk0, SENDER_KEY_MESSAGE_KEYS_INFO);
    put("sender_message_key_0", mk0.as_bytes());
    put("sender_aes_key_0", &aes0[..]);
    put("sender_nonce_0", &nonce0);
    put("sender_chain_key_1", ck1.as_bytes());
    let p1 = b"Hello group, this is Alice.";
    let m1 = k.encrypt(p1).unwrap();
    put("sender_message_1_plaintext", p1);
    put("sender_message_1_header", &m1.header());
    put("sender_message_1_ciphertext", &m1.ciphertext);
    put("sender_message_1_signature", &m1.signature);
    put("sender_message_1", &m1.encode());

    let (ck2, mk1) = chain_step(&ck1);
    put("sender_message_key_1", mk1.as_bytes());
    let p2 = b"Second.";
    let m2 = k.encrypt(p2).unwrap();
    put("sender_message_2_plaintext", p2);
    put("sender_message_2", &m2.encode());
    put("sender_chain_key_2", ck2.as_bytes());
    put("sender_distribution_2", &k.distribution().encode());

    // A receiver from the first distribution reads message 2, then message 1.
    let mut r = SenderKeyState::from_distribution(&SenderKeyDistribution::decode(&dist).unwrap());
    assert_eq!(&r.decrypt(&m2).unwrap()[..], p2);
    assert_eq!(&r.decrypt(&m1).unwrap()[..], p1);
    v
}

/// The Sender Key vectors in docs/e2ee.md are exactly what this implementation computes.
/// Regenerate with `E2EE_PRINT_VECTORS=1 cargo test -p switchboard-e2ee
/// sender_key_vectors_match_docs -- --nocapture`.
#[test]
fn sender_key_vectors_match_docs() {
    crate::tests::check_doc_vectors("e2ee-sender-key-vectors", &compute_vectors());
}
