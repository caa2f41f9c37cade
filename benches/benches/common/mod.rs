//! Shared by the criterion benches: the reduced measurement profile, so that
//! `cargo bench -p switchboard-benches` finishes in a few minutes on a 2-core box.
#![allow(dead_code)]

use std::time::Duration;

use criterion::Criterion;

/// 20 samples, 500 ms warm-up, 2 s measurement per benchmark.
pub fn quick() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

/// 100 bytes of opaque payload, as in the messaging phase of the flood generator.
pub fn payload() -> bytes::Bytes {
    bytes::Bytes::from((0..100u8).collect::<Vec<u8>>())
}
