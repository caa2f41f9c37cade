//! The home-shard test vectors of `docs/protocol.md` §7 match `shards::home_shard` and
//! `shards::key_shard`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// The rows of the §7 vector table: (first cell, [2, 4, 8 shards]).
fn expected() -> Vec<(&'static str, u64, [u16; 3])> {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = i as u8;
    }
    let key_input = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        [2u16, 4, 8].map(|n| shards::key_shard(&key, n)),
        [2u16, 4, 8].map(|n| shards::home_shard(key_input, n)),
    );
    let of = |u: u64| [2u16, 4, 8].map(|n| shards::home_shard(u, n));
    vec![
        (
            "`home_shard(14155550100)`",
            14_155_550_100,
            of(14_155_550_100),
        ),
        (
            "`home_shard(447700900123)`",
            447_700_900_123,
            of(447_700_900_123),
        ),
        (
            "`key_shard(00 01 02 … 1f)` (`u64_le` = `0706050403020100`)",
            key_input,
            [2u16, 4, 8].map(|n| shards::key_shard(&key, n)),
        ),
    ]
}

/// The doc's `z` column, the 64-bit value before `% shards`. The code returns only the
/// reduction, so the test compares `z % n` with it for every shard count `n`.
fn splitmix(user: u64) -> u64 {
    let mut z = user.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn home_shard_vectors_match_the_doc() {
    assert_eq!(
        splitmix(0),
        0xe220_a839_7b1d_cdaf,
        "reference SplitMix64(0)"
    );
    for (cell, input, shards_2_4_8) in expected() {
        for n in 1..=u16::MAX {
            assert_eq!(
                shards::home_shard(input, n),
                (splitmix(input) % u64::from(n)) as u16,
                "{cell} with {n} shards"
            );
        }
        let row = format!(
            "| {cell} | `{:016x}` | {} | {} | {} |",
            splitmix(input),
            shards_2_4_8[0],
            shards_2_4_8[1],
            shards_2_4_8[2]
        );
        assert!(
            DOC.contains(&row),
            "docs/protocol.md §7 lacks the row\n{row}"
        );
    }
    assert!(DOC.contains("`z` is `e220a8397b1dcdaf`"));
    assert_eq!(
        shards::home_shard(14_155_550_100, 0),
        0,
        "0 shards counts as 1"
    );
}
