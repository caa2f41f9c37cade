//! The device signature of `docs/e2ee.md` §2.2 ("Device signature (linked devices)"): the
//! layout of the signed message, who verifies what, and the fixed vector published in that
//! document, recomputed here and compared with the document both ways. The `DeviceList` and
//! `LinkApprove` vectors of `docs/protocol.md` carry the same signature; it is verified here too.
//!
//! Print the block after a deliberate change:
//! `E2EE_PRINT_VECTORS=1 cargo test -p switchboard-e2ee --test device_signature -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test crate

use std::collections::BTreeMap;

use sha2::Digest;
use switchboard_e2ee::keys::{DEVICE_SIGNATURE_CONTEXT, DEVICE_SIGNATURE_MESSAGE_BYTES};
use switchboard_e2ee::{
    device_signature_message, sign_device, verify_device_signature, Error, IdentityKeyPair,
};

const E2EE_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/e2ee.md"));
const PROTOCOL_DOC: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// +1 415 555 0100, the account of the vector.
const USER: u64 = 14_155_550_100;

/// A fixed private value: SHA-256 of `switchboard-e2ee-vector ` and a label, as in the other
/// vectors of `docs/e2ee.md` §12.
fn fixed(label: &str) -> [u8; 32] {
    sha2::Sha256::digest(format!("switchboard-e2ee-vector {label}").as_bytes()).into()
}

/// The primary (Alice's device 0, the identity of the main vector block) and the companion.
fn keys() -> (IdentityKeyPair, IdentityKeyPair) {
    let primary = IdentityKeyPair::from_private_bytes(
        fixed("alice identity x25519"),
        fixed("alice identity ed25519"),
    );
    let companion = IdentityKeyPair::from_private_bytes(
        fixed("alice companion identity x25519"),
        fixed("alice companion identity ed25519"),
    );
    (primary, companion)
}

/// Every vector of the device block, as (name, hex), in document order.
fn compute_vectors() -> Vec<(String, String)> {
    let (primary, companion) = keys();
    let (p, c) = (primary.public(), companion.public());
    let msg = device_signature_message(USER, &c.dh, &c.sign);
    let sig = sign_device(&primary, USER, &c.dh, &c.sign);
    [
        ("device_user", USER.to_be_bytes().to_vec()),
        ("primary_identity_ed25519_public", p.sign.to_vec()),
        (
            "companion_identity_x25519_private",
            fixed("alice companion identity x25519").to_vec(),
        ),
        (
            "companion_identity_ed25519_seed",
            fixed("alice companion identity ed25519").to_vec(),
        ),
        ("companion_identity_x25519_public", c.dh.to_vec()),
        ("companion_identity_ed25519_public", c.sign.to_vec()),
        ("device_signature_message", msg.to_vec()),
        ("device_signature", sig.to_vec()),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_owned(), hex::encode(b)))
    .collect()
}

fn doc_block() -> BTreeMap<String, String> {
    let begin = E2EE_DOC
        .find("<!-- e2ee-device-vectors:begin -->")
        .expect("docs/e2ee.md has no device vector block start marker");
    let end = E2EE_DOC
        .find("<!-- e2ee-device-vectors:end -->")
        .expect("docs/e2ee.md has no device vector block end marker");
    assert!(begin < end, "device vector markers out of order");
    let mut out = BTreeMap::new();
    for l in E2EE_DOC[begin..end].lines() {
        if let Some((k, v)) = l.split_once(" = ") {
            let prev = out.insert(k.trim().to_owned(), v.trim().to_owned());
            assert!(prev.is_none(), "vector `{}` documented twice", k.trim());
        }
    }
    out
}

#[test]
fn device_vectors_match_docs() {
    let computed = compute_vectors();
    if std::env::var_os("E2EE_PRINT_VECTORS").is_some() {
        println!("<!-- e2ee-device-vectors:begin -->\n```text");
        for (k, v) in &computed {
            println!("{k} = {v}");
        }
        println!("```\n<!-- e2ee-device-vectors:end -->");
    }
    let doc = doc_block();
    for (k, v) in &computed {
        assert_eq!(
            doc.get(k),
            Some(v),
            "device vector `{k}` differs from docs/e2ee.md"
        );
    }
    for k in doc.keys() {
        assert!(
            computed.iter().any(|(n, _)| n == k),
            "documented device vector `{k}` is not computed (stale?)"
        );
    }
}

/// The layout the document gives, byte by byte, and the figures in its prose.
#[test]
fn message_layout_is_the_documented_one() {
    let (_, companion) = keys();
    let c = companion.public();
    let msg = device_signature_message(USER, &c.dh, &c.sign);
    assert_eq!(DEVICE_SIGNATURE_CONTEXT, b"SWB-device-v1");
    assert_eq!(DEVICE_SIGNATURE_CONTEXT.len(), 13);
    assert_eq!(DEVICE_SIGNATURE_MESSAGE_BYTES, 13 + 8 + 32 + 32);
    assert_eq!(msg.len(), 85);
    assert_eq!(&msg[..13], b"SWB-device-v1");
    assert_eq!(&msg[13..21], &USER.to_be_bytes());
    assert_eq!(&msg[21..53], &c.dh);
    assert_eq!(&msg[53..85], &c.sign);
    for figure in [
        "`SWB-device-v1`",
        "13 bytes",
        "85 bytes",
        "| 0 | 13 |",
        "| 13 | 8 |",
        "| 21 | 32 |",
        "| 53 | 32 |",
    ] {
        assert!(
            E2EE_DOC.contains(figure),
            "docs/e2ee.md should state `{figure}`"
        );
    }
}

/// Strict Ed25519 by the primary: anything else, or any other message, is refused.
#[test]
fn verification_accepts_exactly_the_signed_keys() {
    let (primary, companion) = keys();
    let (p, c) = (primary.public(), companion.public());
    let sig = sign_device(&primary, USER, &c.dh, &c.sign);
    assert_eq!(
        sig,
        primary.sign(&device_signature_message(USER, &c.dh, &c.sign))
    );
    assert_eq!(
        sig,
        sign_device(&primary, USER, &c.dh, &c.sign),
        "deterministic"
    );
    verify_device_signature(&p.sign, USER, (&c.dh, &c.sign), &sig).unwrap();

    let bad = |r: Result<(), Error>| assert!(matches!(r, Err(Error::BadSignature)), "{r:?}");
    // Another account, or the keys swapped / changed.
    bad(verify_device_signature(
        &p.sign,
        USER + 1,
        (&c.dh, &c.sign),
        &sig,
    ));
    bad(verify_device_signature(
        &p.sign,
        USER,
        (&c.sign, &c.dh),
        &sig,
    ));
    let mut dh = c.dh;
    dh[0] ^= 1;
    bad(verify_device_signature(&p.sign, USER, (&dh, &c.sign), &sig));
    let mut sign = c.sign;
    sign[31] ^= 0x40;
    bad(verify_device_signature(&p.sign, USER, (&c.dh, &sign), &sig));
    // Signed by the companion itself instead of the primary.
    let self_signed = sign_device(&companion, USER, &c.dh, &c.sign);
    bad(verify_device_signature(
        &p.sign,
        USER,
        (&c.dh, &c.sign),
        &self_signed,
    ));
    // A flipped signature bit, and the primary's all-zero list signature.
    for i in [0usize, 31, 32, 63] {
        let mut s = sig;
        s[i] ^= 0x01;
        bad(verify_device_signature(&p.sign, USER, (&c.dh, &c.sign), &s));
    }
    bad(verify_device_signature(
        &p.sign,
        USER,
        (&c.dh, &c.sign),
        &[0u8; 64],
    ));
    // Not-strict encodings: S + L (malleated signature) is refused.
    let mut malleated = sig;
    add_group_order(&mut malleated[32..]);
    bad(verify_device_signature(
        &p.sign,
        USER,
        (&c.dh, &c.sign),
        &malleated,
    ));
    // A verifying key that is not a point.
    let mut not_a_point = [0u8; 32];
    not_a_point[0] = 2;
    not_a_point[31] = 0x80; // y = 2 with the sign bit: not on the curve
    let r = verify_device_signature(&not_a_point, USER, (&c.dh, &c.sign), &sig);
    assert!(r.is_err(), "{r:?}");
}

/// Adds the Ed25519 group order L to a little-endian 32-byte scalar (wrapping).
fn add_group_order(s: &mut [u8]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (b, l) in s.iter_mut().zip(L) {
        let v = u16::from(*b) + u16::from(l) + carry;
        *b = (v & 0xff) as u8;
        carry = v >> 8;
    }
}

/// Reads `vector NAME: HEX` (with indented continuation lines) from `docs/protocol.md`.
fn protocol_vector(name: &str) -> Vec<u8> {
    let start = PROTOCOL_DOC
        .find(&format!("vector {name}:"))
        .unwrap_or_else(|| panic!("docs/protocol.md has no vector {name}"));
    let rest = &PROTOCOL_DOC[start..];
    let mut hex_text = String::new();
    for (i, line) in rest.lines().enumerate() {
        if i == 0 {
            hex_text.push_str(line.split_once(':').map_or("", |(_, h)| h));
        } else if line.starts_with(' ') && !line.trim().is_empty() {
            hex_text.push_str(line);
        } else {
            break;
        }
    }
    let compact: String = hex_text.split_whitespace().collect();
    hex::decode(compact).expect("hex")
}

/// The companion entry of `frame_device_list` and the `frame_link_approve` of
/// `docs/protocol.md` carry this vector's keys and a signature that verifies under the
/// primary's entry.
#[test]
fn protocol_vectors_carry_a_valid_device_signature() {
    let (primary, companion) = keys();
    let (p, c) = (primary.public(), companion.public());
    let list = protocol_vector("frame_device_list");
    // kind, request_id, user, version, reason, count, then 138-byte entries.
    assert_eq!(list[0], 0xA4);
    let user = u64::from_be_bytes(list[9..17].try_into().unwrap());
    assert_eq!(user, USER);
    let count = usize::from(list[22]);
    assert_eq!(list.len(), 23 + 138 * count);
    let entry = |i: usize| &list[23 + 138 * i..23 + 138 * (i + 1)];
    let primary_entry = entry(0);
    assert_eq!(&primary_entry[..2], &[0, 0], "device 0 first");
    assert_eq!(&primary_entry[10..42], &p.dh);
    assert_eq!(&primary_entry[42..74], &p.sign);
    assert_eq!(
        &primary_entry[74..138],
        &[0u8; 64][..],
        "primary: zero signature"
    );
    let primary_sign: [u8; 32] = primary_entry[42..74].try_into().unwrap();
    for i in 1..count {
        let e = entry(i);
        let dh: [u8; 32] = e[10..42].try_into().unwrap();
        let sign: [u8; 32] = e[42..74].try_into().unwrap();
        let sig: [u8; 64] = e[74..138].try_into().unwrap();
        verify_device_signature(&primary_sign, user, (&dh, &sign), &sig)
            .unwrap_or_else(|e| panic!("entry {i}: {e:?}"));
        assert_eq!((dh, sign), (c.dh, c.sign));
    }
    let approve = protocol_vector("frame_link_approve");
    // kind, request_id, code, static_key, identity_dh, identity_sign, signature.
    assert_eq!(approve.len(), 1 + 176);
    assert_eq!(approve[0], 0x41);
    let dh: [u8; 32] = approve[49..81].try_into().unwrap();
    let sign: [u8; 32] = approve[81..113].try_into().unwrap();
    let sig: [u8; 64] = approve[113..177].try_into().unwrap();
    assert_eq!((dh, sign), (c.dh, c.sign));
    verify_device_signature(&p.sign, USER, (&dh, &sign), &sig).unwrap();
}
