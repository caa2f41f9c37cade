//! Arbitrary bytes through every decoder of the E2EE crate, and through a real `decrypt`.
//!
//! * `Envelope::decode`, `PreKeyBundle::decode`, `ratchet::Header::decode`: never panic; what
//!   decodes re-encodes to exactly the input (the encodings are canonical).
//! * `E2ee::import_state` (the plaintext inside the state file) and `store::open_file_bytes`:
//!   never panic.
//! * `E2ee::decrypt` on a device with a session and prekeys: never panics, and a refused input
//!   leaves the state byte-for-byte unchanged (decryption is transactional).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard_e2ee::keys::PreKeyBundle;
use switchboard_e2ee::ratchet::Header;
use switchboard_e2ee::store::open_file_bytes;
use switchboard_e2ee::{Address, E2ee, Envelope, StoreKey};

const ALICE: Address = Address {
    user: 14155550100,
    device: 0,
};
const BOB: Address = Address {
    user: 447700900123,
    device: 0,
};

/// Bob's exported state: one established session with Alice, and spare one-time prekeys.
fn bob_state() -> &'static [u8] {
    static STATE: OnceLock<Vec<u8>> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut alice = E2ee::in_memory(ALICE);
        let mut bob = E2ee::in_memory(BOB);
        let (spk, otpks) = bob.generate_prekeys(4).expect("prekeys");
        let bundle = PreKeyBundle::new(&bob.identity(), &spk, otpks.first());
        let e = alice
            .encrypt(BOB, Some(&bundle), b"hello")
            .expect("encrypt");
        bob.decrypt(ALICE, &e).expect("decrypt");
        bob.export_state().to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(
            env.encode(),
            data,
            "envelope encoding not canonical: {env:?}"
        );
    }
    if let Ok(bundle) = PreKeyBundle::decode(data) {
        assert_eq!(bundle.encode(), data, "bundle encoding not canonical");
        let _ = bundle.verify_signature();
    }
    if let Ok(h) = Header::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    if let Ok(e) = E2ee::import_state(data) {
        let _ = e.export_state();
    }
    let _ = open_file_bytes(&StoreKey::from_bytes([7; 32]), data);

    let mut bob = E2ee::import_state(bob_state()).expect("seed state imports");
    if bob.decrypt(ALICE, data).is_err() {
        assert_eq!(
            &bob.export_state()[..],
            bob_state(),
            "a refused message changed the state"
        );
    }
});
