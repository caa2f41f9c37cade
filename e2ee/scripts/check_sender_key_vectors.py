#!/usr/bin/env python3
"""Independent check of the Sender Key vectors of docs/e2ee.md ("Sender Keys (groups)"),
written from that document only: HMAC-SHA256 chain, HKDF-SHA256 message keys, AES-256-GCM,
Ed25519, and both byte layouts. Needs the `cryptography` package.

    python3 e2ee/scripts/check_sender_key_vectors.py docs/e2ee.md
"""
import hashlib
import hmac
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def block(doc):
    b = doc.index("<!-- e2ee-sender-key-vectors:begin -->")
    e = doc.index("<!-- e2ee-sender-key-vectors:end -->")
    out = {}
    for line in doc[b:e].splitlines():
        if " = " in line:
            k, v = line.split(" = ", 1)
            out[k.strip()] = v.strip()
    return out


def fixed(label):
    return hashlib.sha256(("switchboard-e2ee-vector " + label).encode()).digest()


def step(ck):
    return (hmac.new(ck, b"\x02", hashlib.sha256).digest(),
            hmac.new(ck, b"\x01", hashlib.sha256).digest())


def expand(mk):
    okm = HKDF(hashes.SHA256(), 44, b"\x00" * 32,
               b"Switchboard_SenderKey_MessageKeys_v1").derive(mk)
    return okm[:32], okm[32:]


def main():
    doc = open(sys.argv[1] if len(sys.argv) > 1 else "docs/e2ee.md").read()
    want = block(doc)
    got = {}
    group, key_id = 0x2329, 0x12345678
    ck0, seed = fixed("alice sender chain key"), fixed("alice sender signing key")
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def dist(it, ck):
        return bytes([1, 3]) + struct.pack(">QII", group, key_id, it) + ck + pub

    def message(it, ck, pt):
        nxt, mk = step(ck)
        key, nonce = expand(mk)
        header = bytes([1, 4]) + struct.pack(">QII", group, key_id, it)
        ct = AESGCM(key).encrypt(nonce, pt, header)
        sig = sk.sign(header + ct)
        return nxt, mk, key, nonce, header, ct, sig

    got["sender_group_id"] = struct.pack(">Q", group)
    got["sender_key_id"] = struct.pack(">I", key_id)
    got["sender_chain_key_0"] = ck0
    got["sender_signing_seed"] = seed
    got["sender_signing_public"] = pub
    got["sender_distribution"] = dist(0, ck0)
    p1 = b"Hello group, this is Alice."
    ck1, mk0, key0, nonce0, h1, ct1, sig1 = message(0, ck0, p1)
    got["sender_message_key_0"] = mk0
    got["sender_aes_key_0"] = key0
    got["sender_nonce_0"] = nonce0
    got["sender_chain_key_1"] = ck1
    got["sender_message_1_plaintext"] = p1
    got["sender_message_1_header"] = h1
    got["sender_message_1_ciphertext"] = ct1
    got["sender_message_1_signature"] = sig1
    got["sender_message_1"] = h1 + ct1 + sig1
    p2 = b"Second."
    ck2, mk1, _, _, h2, ct2, sig2 = message(1, ck1, p2)
    got["sender_message_key_1"] = mk1
    got["sender_message_2_plaintext"] = p2
    got["sender_message_2"] = h2 + ct2 + sig2
    got["sender_chain_key_2"] = ck2
    got["sender_distribution_2"] = dist(2, ck2)

    bad = 0
    for k, v in got.items():
        if want.get(k) != v.hex():
            print(f"MISMATCH {k}: doc {want.get(k)} computed {v.hex()}")
            bad += 1
    if set(want) != set(got):
        print("names differ:", sorted(set(want) ^ set(got)))
        bad += 1
    print(f"{len(got) - bad} of {len(got)} sender key vectors agree")
    sys.exit(1 if bad else 0)


main()
