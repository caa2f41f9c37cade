//! Sealed calls: an offer to three callee devices over real pairwise sessions (each opens the
//! SDP, a fourth party cannot), answers and ICE both ways, every refusal as a typed error
//! (replay, reflection, another call, relabelled kind, tampering), the replay window, the
//! keyring's bounds and expiry, codec and single-byte-flip property tests, a missed offer that
//! leaves both pairwise states consistent, and the vectors of docs/e2ee.md §17.

use proptest::prelude::*;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::call::*;
use crate::error::{DecodeError, Error};
use crate::keys::PreKeyBundle;
use crate::{Address, E2ee};

const CALLER: Address = Address {
    user: 14155550100,
    device: 1,
};
const CALLEE: u64 = 447700900123;
const CALL_ID: u64 = 0x0c0f_fee0_0000_0001;
const ANSWER: u8 = 2;
const ICE: u8 = 3;
const HANGUP: u8 = 6;

fn ctx() -> CallContext {
    CallContext {
        call_id: CALL_ID,
        caller: CALLER,
        callee: CALLEE,
    }
}

fn fixed(label: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(format!("switchboard-e2ee-vector {label}").as_bytes()).into()
}

/// A caller and callee devices 0, 2 and 5, with the caller holding a bundle of each (so the
/// grants are PreKeyMessages, as for a first contact).
struct World {
    caller: E2ee,
    callees: Vec<E2ee>,
}

fn world() -> World {
    let mut caller = E2ee::in_memory(CALLER);
    let mut callees = Vec::new();
    for d in [0u16, 2, 5] {
        let mut e = E2ee::in_memory(Address::new(CALLEE, d));
        let (spk, otpks) = e.generate_prekeys(2).unwrap();
        let bundle = PreKeyBundle::new(&e.identity(), &spk, otpks.first());
        // Start the session with a first message that the callee reads.
        let first = caller
            .encrypt(Address::new(CALLEE, d), Some(&bundle), b"hi")
            .unwrap();
        e.decrypt(CALLER, &first).unwrap();
        callees.push(e);
    }
    World { caller, callees }
}

/// The caller's side of a new call and the offer payload for `devices`.
fn offer(caller: &mut E2ee, devices: &[u16], sdp: &[u8]) -> (LiveCall, Vec<u8>) {
    let key = CallKey::generate(&mut OsRng);
    let g = grant(CALL_ID, &key);
    let entries = devices
        .iter()
        .map(|&d| OfferEntry {
            device: d,
            grant: caller.encrypt(Address::new(CALLEE, d), None, &g).unwrap(),
        })
        .collect();
    let mut call = LiveCall::caller(key, ctx(), 0);
    let bytes = call.seal_offer(entries, sdp).unwrap();
    (call, bytes)
}

/// What a callee device does with an offer payload.
fn accept(e: &mut E2ee, ctx: CallContext, payload: &[u8]) -> Result<(LiveCall, Vec<u8>), String> {
    let me = e.local_address().device;
    let offer = CallOffer::decode(payload).map_err(|e| format!("decode: {e}"))?;
    let entry = offer.entry(me).map_err(|e| e.to_string())?;
    let pt = e
        .decrypt(ctx.caller, entry)
        .map_err(|e| format!("pairwise: {e}"))?;
    let key = open_grant(&pt, ctx.call_id).map_err(|e| e.to_string())?;
    let (call, sdp) = LiveCall::callee(key, ctx, me, &offer, 0).map_err(|e| e.to_string())?;
    Ok((call, sdp.to_vec()))
}

#[test]
fn offer_opens_on_every_callee_device_and_steps_go_both_ways() {
    let mut w = world();
    let sdp = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n";
    let (mut alice, payload) = offer(&mut w.caller, &[0, 2, 5], sdp);
    let mut sides = Vec::new();
    for e in &mut w.callees {
        let (call, got) = accept(e, ctx(), &payload).unwrap();
        assert_eq!(got, sdp);
        sides.push(call);
    }
    // Device 2 answers; the caller opens it.
    let answer = sides[1].seal_step(ANSWER, b"answer sdp").unwrap();
    let from2 = Address::new(CALLEE, 2);
    assert_eq!(
        &*alice.open_step(from2, ANSWER, &answer).unwrap(),
        b"answer sdp"
    );
    // ICE both ways.
    let ice = alice.seal_step(ICE, b"candidate:1").unwrap();
    assert_eq!(
        &*sides[1].open_step(CALLER, ICE, &ice).unwrap(),
        b"candidate:1"
    );
    // The same ICE at another ringing device opens too (the server relays one payload).
    assert_eq!(
        &*sides[0].open_step(CALLER, ICE, &ice).unwrap(),
        b"candidate:1"
    );
    let back = sides[1].seal_step(ICE, b"candidate:2").unwrap();
    assert_eq!(
        &*alice.open_step(from2, ICE, &back).unwrap(),
        b"candidate:2"
    );
    // A replayed ICE fails, both ways.
    assert_eq!(
        sides[1].open_step(CALLER, ICE, &ice),
        Err(CallError::Replayed { counter: 1 })
    );
    assert_eq!(
        alice.open_step(from2, ICE, &back),
        Err(CallError::Replayed { counter: 1 })
    );
    // Reflected to its sender: the direction differs.
    let ice2 = alice.seal_step(ICE, b"candidate:3").unwrap();
    assert_eq!(
        alice.open_step(from2, ICE, &ice2),
        Err(CallError::DecryptFailed)
    );
    // Relabelled as a hangup: the kind is in the associated data.
    assert_eq!(
        sides[1].open_step(CALLER, HANGUP, &ice2),
        Err(CallError::DecryptFailed)
    );
    // Claimed by another callee device than the one that sealed it.
    let from5 = Address::new(CALLEE, 5);
    let ice3 = sides[1].seal_step(ICE, b"candidate:4").unwrap();
    assert_eq!(
        alice.open_step(from5, ICE, &ice3),
        Err(CallError::DecryptFailed)
    );
    // From someone who is not in the call.
    assert_eq!(
        sides[1].open_step(Address::new(CALLER.user, 7), ICE, &ice2),
        Err(CallError::WrongParty)
    );
    // Nothing above changed the windows: the genuine steps still open.
    assert_eq!(
        &*sides[1].open_step(CALLER, ICE, &ice2).unwrap(),
        b"candidate:3"
    );
    assert_eq!(
        &*alice.open_step(from2, ICE, &ice3).unwrap(),
        b"candidate:4"
    );
}

#[test]
fn a_device_without_an_entry_and_a_fourth_party_cannot_open_the_offer() {
    let mut w = world();
    let (_, payload) = offer(&mut w.caller, &[0, 2], b"sdp marker");
    // Device 5 was not in the caller's list.
    assert_eq!(
        accept(&mut w.callees[2], ctx(), &payload).unwrap_err(),
        CallError::NotForThisDevice { device: 5 }.to_string()
    );
    // Mallory pretends to be device 2 (as a server could relay it to any device): its
    // pairwise state cannot open device 2's grant.
    let mut mallory = E2ee::in_memory(Address::new(CALLEE, 2));
    let err = accept(&mut mallory, ctx(), &payload).unwrap_err();
    assert!(err.starts_with("pairwise"), "{err}");
    // A real device 0 opens it under the right call id only.
    let mut other = ctx();
    other.call_id ^= 1;
    let err = accept(&mut w.callees[0], other, &payload).unwrap_err();
    assert!(err.contains("key grant for call"), "{err}");
}

#[test]
fn offer_entries_are_bound_to_the_call_and_the_sdp_to_the_parties() {
    let mut w = world();
    let (_, payload) = offer(&mut w.caller, &[0], b"sdp");
    // Another callee user than the offer was made for: the grant opens, the SDP does not.
    let mut c = ctx();
    c.callee += 1;
    let err = accept(&mut w.callees[0], c, &payload).unwrap_err();
    assert_eq!(err, CallError::DecryptFailed.to_string());
}

#[test]
fn grant_rules() {
    let key = CallKey::from_bytes(fixed("call key"));
    let g = grant(7, &key);
    assert_eq!(g.len(), CALL_GRANT_BYTES);
    assert_eq!(open_grant(&g, 7).unwrap(), key);
    assert_eq!(
        open_grant(&g, 8),
        Err(CallError::CallIdMismatch {
            expected: 8,
            found: 7
        })
    );
    let mut long = g.to_vec();
    long.push(0);
    assert!(matches!(
        open_grant(&long, 7),
        Err(CallError::Decode(DecodeError::TrailingBytes { extra: 1 }))
    ));
    let mut bad = g.to_vec();
    bad[8] = 2;
    assert!(matches!(
        open_grant(&bad, 7),
        Err(CallError::Decode(DecodeError::UnknownVersion(2)))
    ));
    let mut bad = g.to_vec();
    bad[0] ^= 1;
    assert!(open_grant(&bad, 7).is_err());
    for cut in 0..g.len() {
        assert!(open_grant(&g[..cut], 7).is_err());
    }
    assert_eq!(
        CALL_GRANT_ENVELOPE_BYTES_MAX, 212,
        "a PreKeyMessage of a grant"
    );
}

#[test]
fn offer_codec_rules() {
    let sealed = Sealed {
        counter: 0,
        ciphertext: vec![0; 16],
    };
    let entry = |device| OfferEntry {
        device,
        grant: vec![1; 10],
    };
    let ok = CallOffer {
        entries: vec![entry(0), entry(3)],
        sealed: sealed.clone(),
    };
    let bytes = ok.encode().unwrap();
    assert_eq!(bytes.len(), ok.encoded_len());
    assert_eq!(CallOffer::decode(&bytes).unwrap(), ok);
    // Devices out of order or repeated, no entry, too many, an empty or oversized grant, a
    // nonzero offer counter, a short ciphertext: all refused on both sides.
    let bad = [
        CallOffer {
            entries: vec![entry(3), entry(0)],
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: vec![entry(3), entry(3)],
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: vec![],
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: (0..33).map(entry).collect(),
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: vec![OfferEntry {
                device: 0,
                grant: vec![],
            }],
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: vec![OfferEntry {
                device: 0,
                grant: vec![0; CALL_GRANT_ENVELOPE_BYTES_MAX + 1],
            }],
            sealed: sealed.clone(),
        },
        CallOffer {
            entries: vec![entry(0)],
            sealed: Sealed {
                counter: 1,
                ciphertext: vec![0; 16],
            },
        },
        CallOffer {
            entries: vec![entry(0)],
            sealed: Sealed {
                counter: 0,
                ciphertext: vec![0; 15],
            },
        },
    ];
    for b in &bad {
        assert!(b.encode().is_err(), "{b:?}");
        // The same bytes written by hand are refused by the decoder.
        let mut raw = vec![CALL_VERSION, b.entries.len() as u8];
        for e in &b.entries {
            raw.extend_from_slice(&e.device.to_be_bytes());
            raw.extend_from_slice(&(e.grant.len() as u16).to_be_bytes());
            raw.extend_from_slice(&e.grant);
        }
        raw.extend_from_slice(&b.sealed.counter.to_be_bytes());
        raw.extend_from_slice(&b.sealed.ciphertext);
        assert!(CallOffer::decode(&raw).is_err(), "{b:?}");
    }
    let mut v2 = bytes.clone();
    v2[0] = 2;
    assert_eq!(CallOffer::decode(&v2), Err(DecodeError::UnknownVersion(2)));
    assert!(CallOffer::decode(&vec![1; CALL_PAYLOAD_BYTES_MAX + 1]).is_err());
    assert_eq!(
        CallStep::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 5]),
        Err(DecodeError::CiphertextTooShort { len: 1 })
    );
    assert_eq!(CallStep::decode(&[9]), Err(DecodeError::UnknownVersion(9)));
}

#[test]
fn nonces_differ_for_every_sender_and_direction() {
    let mut seen = std::collections::BTreeSet::new();
    for dir in [Direction::CallerToCallee, Direction::CalleeToCaller] {
        for device in [0u16, 1, 2, 0x0100, u16::MAX] {
            for counter in [0u64, 1, 1 << 40, u64::MAX] {
                assert!(seen.insert(nonce(dir, device, counter)));
            }
        }
    }
    // Two callee devices at counter 0 (both may send REJECT): different nonces.
    assert_ne!(
        nonce(Direction::CalleeToCaller, 0, 0),
        nonce(Direction::CalleeToCaller, 2, 0)
    );
}

#[test]
fn replay_window_accepts_late_and_refuses_repeats_and_the_too_old() {
    let mut w = ReplayWindow::default();
    for c in [0u64, 2, 1, 5] {
        w.check(c).unwrap();
        w.accept(c);
    }
    for c in [0u64, 1, 2, 5] {
        assert_eq!(w.check(c), Err(CallError::Replayed { counter: c }));
    }
    w.check(3).unwrap();
    w.check(4).unwrap();
    w.accept(100);
    assert_eq!(w.check(36), Err(CallError::Replayed { counter: 36 }));
    w.check(37).unwrap();
    w.check(99).unwrap();
    assert!(w.check(100).is_err());
    assert!(
        w.check(u64::MAX).is_err(),
        "never sent: the counter is exhausted first"
    );
}

#[test]
fn callers_counter_zero_is_the_offers_and_offers_are_sealed_once() {
    let key = CallKey::from_bytes([7; 32]);
    let mut call = LiveCall::caller(key.clone(), ctx(), 0);
    assert_eq!(call.seal_step(ICE, b"x"), Err(CallError::WrongParty));
    let e = || {
        vec![OfferEntry {
            device: 0,
            grant: vec![1],
        }]
    };
    call.seal_offer(e(), b"sdp").unwrap();
    assert_eq!(call.seal_offer(e(), b"sdp"), Err(CallError::WrongParty));
    let big = vec![0u8; CALL_PAYLOAD_BYTES_MAX];
    assert!(matches!(
        call.seal_step(ICE, &big),
        Err(CallError::TooLarge { .. })
    ));
    let entries = (0..33)
        .map(|d| OfferEntry {
            device: d,
            grant: vec![1],
        })
        .collect();
    let mut fresh = LiveCall::caller(key, ctx(), 0);
    assert_eq!(
        fresh.seal_offer(entries, b""),
        Err(CallError::TooManyDevices { count: 33, max: 32 })
    );
}

#[test]
fn keyring_is_bounded_expires_and_keeps_ids_apart() {
    let mut ring = CallKeyring::new();
    let call = |id: u64, now| {
        let mut c = ctx();
        c.call_id = id;
        LiveCall::caller(CallKey::from_bytes([1; 32]), c, now)
    };
    ring.insert(0, call(1, 0)).unwrap();
    ring.call(0, 1).unwrap().mark_answered(0);
    for id in 2..=CALL_KEYS_MAX as u64 {
        ring.insert(id, call(id, id)).unwrap();
    }
    assert_eq!(ring.len(), CALL_KEYS_MAX);
    // Full: the oldest unanswered (2) makes room; the answered call 1 stays.
    ring.insert(100, call(100, 100)).unwrap();
    assert_eq!(ring.len(), CALL_KEYS_MAX);
    assert!(ring.get_mut(100, 2).is_none());
    assert!(ring.get_mut(100, 1).is_some());
    // The same id for other parties is refused; the live call is kept.
    let mut other = ctx();
    other.call_id = 1;
    other.callee += 1;
    let intruder = LiveCall::caller(CallKey::from_bytes([2; 32]), other, 100);
    assert_eq!(ring.insert(100, intruder), Err(CallError::CallIdInUse(1)));
    // Unanswered keys expire after the ring TTL, answered ones after the call TTL.
    let later = 100 + CALL_RING_TTL_MS;
    assert!(ring.get_mut(later, 100).is_none());
    assert!(ring.get_mut(later, 1).is_some());
    assert_eq!(ring.len(), 1);
    assert!(ring.get_mut(CALL_ANSWERED_TTL_MS, 1).is_none());
    assert!(ring.is_empty());
    assert_eq!(ring.call(0, 1).unwrap_err(), CallError::UnknownCall(1));
    // Full of answered calls: refused.
    for id in 0..CALL_KEYS_MAX as u64 {
        ring.insert(0, call(id, 0)).unwrap();
        ring.call(0, id).unwrap().mark_answered(0);
    }
    assert_eq!(
        ring.insert(0, call(999, 0)),
        Err(CallError::TooManyCalls { max: CALL_KEYS_MAX })
    );
    assert!(ring.remove(3));
    assert!(!ring.remove(3));
}

/// The offer is relayed only to online devices: an offline callee never gets it, but its
/// grant advanced the caller's sending chain (and, for a first contact, was a PreKeyMessage
/// naming a one-time prekey). The next ordinary message still decrypts (one skipped key),
/// the one-time prekey is consumed exactly once, and a later offer opens.
#[test]
fn an_undelivered_offer_leaves_the_pairwise_sessions_consistent() {
    let mut caller = E2ee::in_memory(CALLER);
    let bob = Address::new(CALLEE, 0);
    let mut callee = E2ee::in_memory(bob);
    let (spk, otpks) = callee.generate_prekeys(1).unwrap();
    let bundle = PreKeyBundle::new(&callee.identity(), &spk, otpks.first());
    // First contact: the grant is the first message, and it is lost.
    let key = CallKey::generate(&mut OsRng);
    let lost = caller
        .encrypt(bob, Some(&bundle), &grant(CALL_ID, &key))
        .unwrap();
    assert!(matches!(
        crate::Envelope::decode(&lost).unwrap(),
        crate::Envelope::PreKey(_)
    ));
    // The next message (a text) carries the same X3DH fields and decrypts.
    let text = caller.encrypt(bob, None, b"you missed my call").unwrap();
    let p = callee.decrypt(CALLER, &text).unwrap();
    assert!(p.session_started);
    assert_eq!(&*p, b"you missed my call");
    assert_eq!(callee.one_time_prekey_count(), 0);
    // The lost grant arriving late (it never does: offers are not stored) would still open:
    // the skipped key covers it.
    assert_eq!(
        &*callee.decrypt(CALLER, &lost).unwrap(),
        &grant(CALL_ID, &key)[..]
    );
    // Many missed offers in a row stay within MAX_SKIP for the next message.
    for _ in 0..50 {
        let _ = caller.encrypt(bob, None, b"lost grant").unwrap();
    }
    let after = caller.encrypt(bob, None, b"still here").unwrap();
    assert_eq!(&*callee.decrypt(CALLER, &after).unwrap(), b"still here");
    // A replayed grant is refused by the ratchet.
    assert!(matches!(
        callee.decrypt(CALLER, &lost),
        Err(Error::DuplicateMessage)
    ));
}

fn flip_offer_fails(pos: usize, mask: u8) -> Result<(), TestCaseError> {
    let mut w = world();
    let (_, payload) = offer(&mut w.caller, &[0, 2, 5], b"v=0 sdp");
    let state = w.callees[1].export_state();
    let mut bad = payload.clone();
    let i = pos % bad.len();
    bad[i] ^= mask | 1;
    let mut e = E2ee::import_state(&state).unwrap();
    prop_assert!(accept(&mut e, ctx(), &bad).is_err(), "flip at {i} accepted");
    // The untouched offer still opens on the same state.
    let mut e = E2ee::import_state(&state).unwrap();
    prop_assert!(accept(&mut e, ctx(), &payload).is_ok());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_single_byte_flip_of_an_offer_fails(pos in any::<usize>(), mask in any::<u8>()) {
        flip_offer_fails(pos, mask)?;
    }
}

proptest! {
    #[test]
    fn steps_round_trip_and_any_single_byte_flip_fails(
        key in any::<[u8; 32]>(),
        call_id in any::<u64>(),
        caller_device in any::<u16>(),
        callee_device in any::<u16>(),
        kind in 2u8..=6,
        plaintext in proptest::collection::vec(any::<u8>(), 0..200),
        pos in any::<usize>(),
        mask in any::<u8>(),
    ) {
        let c = CallContext { call_id, caller: Address::new(CALLER.user, caller_device), callee: CALLEE };
        let key = CallKey::from_bytes(key);
        let offer_bytes = {
            let mut caller = LiveCall::caller(key.clone(), c, 0);
            caller.seal_offer(vec![OfferEntry { device: callee_device, grant: vec![1] }], b"o")
                .unwrap()
        };
        let offer = CallOffer::decode(&offer_bytes).unwrap();
        prop_assert_eq!(offer.encode().unwrap(), offer_bytes);
        let (mut callee, sdp) = LiveCall::callee(key.clone(), c, callee_device, &offer, 0).unwrap();
        prop_assert_eq!(&sdp[..], b"o");
        let step = callee.seal_step(kind, &plaintext).unwrap();
        prop_assert_eq!(step.len(), plaintext.len() + CALL_STEP_OVERHEAD);
        prop_assert_eq!(CallStep::decode(&step).unwrap().encode(), step.clone());
        let from = Address::new(CALLEE, callee_device);
        let mut caller = LiveCall::caller(key.clone(), c, 0);
        let mut bad = step.clone();
        let i = pos % bad.len();
        bad[i] ^= mask | 1;
        prop_assert!(caller.open_step(from, kind, &bad).is_err());
        let got = caller.open_step(from, kind, &step).unwrap();
        prop_assert_eq!(&got[..], &plaintext[..]);
        prop_assert_eq!(caller.open_step(from, kind, &step), Err(CallError::Replayed { counter: 0 }));
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), call_id in any::<u64>()) {
        if let Ok(o) = CallOffer::decode(&bytes) {
            prop_assert_eq!(o.encode().unwrap(), bytes.clone());
        }
        if let Ok(s) = CallStep::decode(&bytes) {
            prop_assert_eq!(s.encode(), bytes.clone());
        }
        let _ = open_grant(&bytes, call_id);
    }
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

/// The values of docs/e2ee.md §17.6, recomputed.
fn compute_vectors() -> Vec<(String, String)> {
    let key = CallKey::from_bytes(fixed("call key"));
    let c = ctx();
    let mut v: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, val: String| v.push((k.to_string(), val));
    put("call_id", format!("{CALL_ID:016x}"));
    put("call_key", hex(key.as_bytes()));
    put("call_sealing_key", hex(&key.sealing_key(CALL_ID)[..]));
    let g: Zeroizing<Vec<u8>> = grant(CALL_ID, &key);
    put("call_grant", hex(&g));
    let sdp = b"v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\n";
    put("call_offer_sdp", hex(sdp));
    // The entry's bytes stand for device 0's pairwise envelope of the grant (random per X3DH).
    let entry = OfferEntry {
        device: 0,
        grant: g.to_vec(),
    };
    let digest = CallOffer {
        entries: vec![entry.clone()],
        sealed: Sealed {
            counter: 0,
            ciphertext: vec![0; 16],
        },
    }
    .entries_digest();
    put("call_offer_entries_digest", hex(&digest));
    let mut ad =
        associated_data(&c, Direction::CallerToCallee, CALLER.device, KIND_OFFER, 0).to_vec();
    ad.extend_from_slice(&digest);
    put("call_offer_ad", hex(&ad));
    put(
        "call_offer_nonce",
        hex(&nonce(Direction::CallerToCallee, CALLER.device, 0)),
    );
    let mut caller = LiveCall::caller(key.clone(), c, 0);
    let offer = caller.seal_offer(vec![entry], sdp).unwrap();
    put("call_offer", hex(&offer));
    let decoded = CallOffer::decode(&offer).unwrap();
    let (mut callee, opened) = LiveCall::callee(key.clone(), c, 2, &decoded, 0).unwrap();
    assert_eq!(&opened[..], sdp);
    let answer_sdp = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n";
    put("call_answer_sdp", hex(answer_sdp));
    put(
        "call_answer_ad",
        hex(&associated_data(
            &c,
            Direction::CalleeToCaller,
            2,
            ANSWER,
            0,
        )),
    );
    put(
        "call_answer_nonce",
        hex(&nonce(Direction::CalleeToCaller, 2, 0)),
    );
    let answer = callee.seal_step(ANSWER, answer_sdp).unwrap();
    put("call_answer", hex(&answer));
    let candidate = b"candidate:1 1 udp 2122260223 192.0.2.7 54400 typ host";
    put("call_ice_candidate", hex(candidate));
    let ice = caller.seal_step(ICE, candidate).unwrap();
    put("call_ice_caller_1", hex(&ice));
    assert_eq!(&callee.open_step(CALLER, ICE, &ice).unwrap()[..], candidate);
    assert_eq!(
        &caller
            .open_step(Address::new(CALLEE, 2), ANSWER, &answer)
            .unwrap()[..],
        answer_sdp
    );
    v
}

/// docs/e2ee.md §17.6 is exactly what this implementation computes. Regenerate with
/// `E2EE_PRINT_VECTORS=1 cargo test -p switchboard-e2ee call_vectors_match_docs -- --nocapture`.
#[test]
fn call_vectors_match_docs() {
    crate::tests::check_doc_vectors("e2ee-call-vectors", &compute_vectors());
}
