//! Arbitrary bytes through the Sender Key decoders and through a real group decrypt.
//!
//! * `SenderKeyDistribution::decode`, `SenderKeyMessage::decode`: never panic; what decodes
//!   re-encodes to exactly the input (the encodings are canonical).
//! * `E2ee::group_decrypt` and `E2ee::process_sender_key_distribution` on a member holding
//!   the sender's key: never panic, and a refused input leaves the state byte-for-byte
//!   unchanged (transactional).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard_e2ee::{Address, E2ee, SenderKeyDistribution, SenderKeyMessage};

const GROUP: u64 = 9001;
const ALICE: Address = Address {
    user: 14155550100,
    device: 0,
};
const BOB: Address = Address {
    user: 447700900123,
    device: 0,
};

/// Bob's exported state: Alice's sender key for GROUP, with one message received out of
/// order (so a skipped key is stored).
fn bob_state() -> &'static [u8] {
    static STATE: OnceLock<Vec<u8>> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut alice = E2ee::in_memory(ALICE);
        let mut bob = E2ee::in_memory(BOB);
        let d = alice.sender_key_distribution(GROUP).expect("distribution");
        bob.process_sender_key_distribution(ALICE, &d)
            .expect("process");
        let _first = alice.group_encrypt(GROUP, b"zero").expect("encrypt");
        let second = alice.group_encrypt(GROUP, b"one").expect("encrypt");
        bob.group_decrypt(GROUP, ALICE, &second).expect("decrypt");
        bob.export_state().to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = SenderKeyDistribution::decode(data) {
        assert_eq!(&d.encode()[..], data, "distribution encoding not canonical");
    }
    if let Ok(m) = SenderKeyMessage::decode(data) {
        assert_eq!(m.encode(), data, "message encoding not canonical: {m:?}");
    }

    let mut bob = E2ee::import_state(bob_state()).expect("seed state imports");
    if bob.group_decrypt(GROUP, ALICE, data).is_err() {
        assert_eq!(
            &bob.export_state()[..],
            bob_state(),
            "a refused group message changed the state"
        );
    }
    let mut bob = E2ee::import_state(bob_state()).expect("seed state imports");
    if bob.process_sender_key_distribution(ALICE, data).is_err() {
        assert_eq!(
            &bob.export_state()[..],
            bob_state(),
            "a refused distribution changed the state"
        );
    }
});
