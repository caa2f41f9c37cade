//! Double Ratchet cost in an established session, 100-byte messages.
//!
//! * `same_chain`: Alice encrypts, Bob decrypts, always in the same direction: the symmetric
//!   ratchet only (two HMACs, one HKDF, one AES-256-GCM each way).
//! * `dh_step_round_trip`: Alice → Bob then Bob → Alice: every message starts a new chain,
//!   so each decrypt runs a DH ratchet step (key generation + two X25519 + two HKDF).
//! * `api_same_chain`: the same as `same_chain` through `E2ee` (envelope encoding and
//!   decoding, session record copy for the transactional commit; in memory, no disk).
//!
//! Reduced profile (2-core box): 20 samples, 2 s measurement.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::OsRng;
use switchboard_e2ee::keys::{PreKeyBundle, PreKeyStore};
use switchboard_e2ee::session::{Established, InitiatorPending};
use switchboard_e2ee::{Address, E2ee, Envelope, IdentityKeyPair};

fn established() -> (Established, Established) {
    let alice_id = IdentityKeyPair::generate(&mut OsRng);
    let bob_id = IdentityKeyPair::generate(&mut OsRng);
    let mut store = PreKeyStore::new();
    let spk = store.rotate_signed_prekey(&bob_id, &mut OsRng);
    let otpk = store.generate_one_time_prekeys(1, &mut OsRng).unwrap();
    let bundle = PreKeyBundle::new(&bob_id.public(), &spk, otpk.first());
    let mut pending = InitiatorPending::start(&alice_id, &bundle, &mut OsRng).unwrap();
    let first = pending.encrypt(b"hello").unwrap();
    let (mut bob, _) = Established::respond(&bob_id, &mut store, &first, &mut OsRng).unwrap();
    let reply = bob.encrypt(b"hi").unwrap();
    let (alice, _) = pending.decrypt(&reply, &mut OsRng).unwrap();
    (alice, bob)
}

fn ratchet(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratchet");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    let msg = [0x5au8; 100];

    let (mut alice, mut bob) = established();
    g.bench_function("same_chain_encrypt_decrypt_100B", |b| {
        b.iter(|| {
            let m = alice.encrypt(black_box(&msg)).unwrap();
            let pt = bob.decrypt(&m, &mut OsRng).unwrap();
            black_box(pt.len())
        })
    });

    let (mut alice, mut bob) = established();
    g.bench_function("dh_step_round_trip_2x100B", |b| {
        b.iter(|| {
            let m = alice.encrypt(black_box(&msg)).unwrap();
            black_box(bob.decrypt(&m, &mut OsRng).unwrap().len());
            let m = bob.encrypt(black_box(&msg)).unwrap();
            black_box(alice.decrypt(&m, &mut OsRng).unwrap().len())
        })
    });

    let a = Address::new(14155550100, 0);
    let b = Address::new(447700900123, 0);
    let mut alice = E2ee::in_memory(a);
    let mut bob = E2ee::in_memory(b);
    let (spk, otpk) = bob.generate_prekeys(1).unwrap();
    let bundle = PreKeyBundle::new(&bob.identity(), &spk, otpk.first());
    let e = alice.encrypt(b, Some(&bundle), b"hello").unwrap();
    bob.decrypt(a, &e).unwrap();
    let e = bob.encrypt(a, None, b"hi").unwrap();
    alice.decrypt(b, &e).unwrap();
    g.bench_function("api_same_chain_encrypt_decrypt_100B", |bch| {
        bch.iter(|| {
            let env = alice.encrypt(b, None, black_box(&msg)).unwrap();
            debug_assert!(matches!(Envelope::decode(&env), Ok(Envelope::Message(_))));
            black_box(bob.decrypt(a, &env).unwrap().len())
        })
    });
    g.finish();
}

criterion_group!(benches, ratchet);
criterion_main!(benches);
