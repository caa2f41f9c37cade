//! Arbitrary bytes through the sealed-call decoders (docs/e2ee.md §17) and through a real
//! callee device's open path.
//!
//! * `CallOffer::decode`, `CallStep::decode`: never panic; what decodes re-encodes to exactly
//!   the input (the encodings are canonical). `open_grant`: never panics.
//! * The offer path of a callee device (its entry, the pairwise decrypt, the grant, the SDP)
//!   on a fixed state: never panics, and a pairwise decrypt that refuses the input leaves the
//!   state byte for byte unchanged.
//! * `LiveCall::open_step` on a fixed live call, with the kind from the first byte: never
//!   panics, and after a refused input the genuine next step still opens (a refusal never
//!   moves the replay window).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard_e2ee::call::{grant, open_grant, CallContext, CallOffer, CallStep, OfferEntry};
use switchboard_e2ee::{Address, CallKey, E2ee, LiveCall, PreKeyBundle};

const CALL_ID: u64 = 0x0c0f_fee0_0000_0001;
const CALLER: Address = Address {
    user: 14155550100,
    device: 1,
};
const CALLEE: Address = Address {
    user: 447700900123,
    device: 2,
};

struct Fixture {
    /// The callee device's exported state, with a session from the caller.
    callee_state: Vec<u8>,
    /// The callee's live call, opened from a genuine offer.
    live: LiveCall,
    /// The caller's next ICE step (counter 1).
    ice: Vec<u8>,
}

fn ctx() -> CallContext {
    CallContext {
        call_id: CALL_ID,
        caller: CALLER,
        callee: CALLEE.user,
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut caller = E2ee::in_memory(CALLER);
        let mut callee = E2ee::in_memory(CALLEE);
        let (spk, otpks) = callee.generate_prekeys(2).expect("prekeys");
        let bundle = PreKeyBundle::new(&callee.identity(), &spk, otpks.first());
        let first = caller.encrypt(CALLEE, Some(&bundle), b"hi").expect("encrypt");
        callee.decrypt(CALLER, &first).expect("decrypt");
        let callee_state = callee.export_state().to_vec();
        let key = CallKey::from_bytes([0x42; 32]);
        let entry = OfferEntry {
            device: CALLEE.device,
            grant: caller
                .encrypt(CALLEE, None, &grant(CALL_ID, &key))
                .expect("grant"),
        };
        let mut call = LiveCall::caller(key.clone(), ctx(), 0);
        let offer = call.seal_offer(vec![entry], b"v=0").expect("offer");
        let offer = CallOffer::decode(&offer).expect("decode");
        let (live, _) = LiveCall::callee(key, ctx(), CALLEE.device, &offer, 0).expect("open");
        let ice = call.seal_step(3, b"candidate:1").expect("ice");
        Fixture {
            callee_state,
            live,
            ice,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(o) = CallOffer::decode(data) {
        assert_eq!(o.encode().expect("a decoded offer encodes"), data, "offer not canonical");
    }
    if let Ok(s) = CallStep::decode(data) {
        assert_eq!(s.encode(), data, "step not canonical");
    }
    let _ = open_grant(data, CALL_ID);

    let f = fixture();
    if let Ok(offer) = CallOffer::decode(data) {
        if let Ok(entry) = offer.entry(CALLEE.device) {
            let mut callee = E2ee::import_state(&f.callee_state).expect("seed state imports");
            match callee.decrypt(CALLER, entry) {
                Ok(granted) => {
                    if let Ok(key) = open_grant(&granted, CALL_ID) {
                        let _ = LiveCall::callee(key, ctx(), CALLEE.device, &offer, 0);
                    }
                }
                Err(_) => assert_eq!(
                    &callee.export_state()[..],
                    &f.callee_state[..],
                    "a refused grant changed the state"
                ),
            }
        }
    }

    let kind = data.first().map_or(3, |k| k % 8);
    let mut live = f.live.clone();
    if live.open_step(CALLER, kind, data).is_err() {
        let got = live
            .open_step(CALLER, 3, &f.ice)
            .expect("a refused step moved the replay window");
        assert_eq!(&got[..], b"candidate:1");
    }
});
