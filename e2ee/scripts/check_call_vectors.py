#!/usr/bin/env python3
"""Independent check of the call vectors of docs/e2ee.md (§17.6 "Call vectors"), written from
that section only: HKDF-SHA256 sealing key, the key grant, the offer's entries digest, the
associated data and nonce rules, AES-256-GCM, and the offer and step layouts. Needs the
`cryptography` package.

    python3 e2ee/scripts/check_call_vectors.py docs/e2ee.md
"""
import hashlib
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CALL_ID = 0x0C0FFEE000000001
CALLER_USER, CALLER_DEVICE, CALLEE_USER = 14155550100, 1, 447700900123


def block(doc):
    b = doc.index("<!-- e2ee-call-vectors:begin -->")
    e = doc.index("<!-- e2ee-call-vectors:end -->")
    return dict(
        line.split(" = ", 1) for line in doc[b:e].splitlines() if " = " in line
    )


def u(n, width):
    return n.to_bytes(width, "big")


def ad(direction, device, kind, counter):
    return (
        u(1, 1) + u(CALL_ID, 8) + u(CALLER_USER, 8) + u(CALLER_DEVICE, 2)
        + u(CALLEE_USER, 8) + u(direction, 1) + u(device, 2) + u(kind, 1) + u(counter, 8)
    )


def nonce(direction, device, counter):
    return u(direction, 1) + b"\x00" + u(device, 2) + u(counter, 8)


def main(path):
    v = block(open(path, encoding="utf-8").read())
    got = {}
    key = hashlib.sha256(b"switchboard-e2ee-vector call key").digest()
    sk = HKDF(hashes.SHA256(), 32, u(CALL_ID, 8), b"Switchboard_Call_v1").derive(key)
    grant = b"SWBCALLK" + b"\x01" + u(CALL_ID, 8) + key
    entries = u(1, 1) + u(0, 2) + u(len(grant), 2) + grant
    digest = hashlib.sha256(entries).digest()
    sdp = bytes.fromhex(v["call_offer_sdp"])
    offer_ad = ad(0, CALLER_DEVICE, 1, 0) + digest
    offer_ct = AESGCM(sk).encrypt(nonce(0, CALLER_DEVICE, 0), sdp, offer_ad)
    answer_sdp = bytes.fromhex(v["call_answer_sdp"])
    answer_ct = AESGCM(sk).encrypt(nonce(1, 2, 0), answer_sdp, ad(1, 2, 2, 0))
    cand = bytes.fromhex(v["call_ice_candidate"])
    ice_ct = AESGCM(sk).encrypt(nonce(0, CALLER_DEVICE, 1), cand, ad(0, CALLER_DEVICE, 3, 1))
    got["call_id"] = u(CALL_ID, 8)
    got["call_key"] = key
    got["call_sealing_key"] = sk
    got["call_grant"] = grant
    got["call_offer_sdp"] = sdp
    got["call_offer_entries_digest"] = digest
    got["call_offer_ad"] = offer_ad
    got["call_offer_nonce"] = nonce(0, CALLER_DEVICE, 0)
    got["call_offer"] = u(1, 1) + entries + u(0, 8) + offer_ct
    got["call_answer_sdp"] = answer_sdp
    got["call_answer_ad"] = ad(1, 2, 2, 0)
    got["call_answer_nonce"] = nonce(1, 2, 0)
    got["call_answer"] = u(1, 1) + u(0, 8) + answer_ct
    got["call_ice_candidate"] = cand
    got["call_ice_caller_1"] = u(1, 1) + u(1, 8) + ice_ct
    bad = [k for k in v if got.get(k, b"").hex() != v[k].strip()]
    missing = [k for k in got if k not in v]
    if bad or missing:
        print("differ:", bad, "missing:", missing)
        return 1
    print(f"call vectors: all {len(got)} values agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/e2ee.md"))
