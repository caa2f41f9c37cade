#!/usr/bin/env python3
"""Independent re-implementation of docs/e2ee.md's construction (X3DH + first Double Ratchet
messages + envelope encoding) with the `cryptography` package, checked against the vector
block of docs/e2ee.md. It uses only what the document states, not the Rust code.

    python3 e2ee/scripts/check_vectors.py [path/to/docs/e2ee.md]
"""
import hashlib
import hmac
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw


def fixed(label):
    return hashlib.sha256(label.encode()).digest()


def x_pub(priv):
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def ed_pub(seed):
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def dh(priv, pub):
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def hkdf(salt, ikm, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)


def enc(pk):
    return b"\x05" + pk


def kdf_rk(rk, dh_out):
    out = hkdf(rk, dh_out, b"Switchboard_Ratchet_v1", 64)
    return out[:32], out[32:]


def kdf_ck(ck):
    return hmac.new(ck, b"\x02", hashlib.sha256).digest(), hmac.new(ck, b"\x01", hashlib.sha256).digest()


def seal(mk, pt, ad):
    km = hkdf(b"\x00" * 32, mk, b"Switchboard_MessageKeys_v1", 44)
    return AESGCM(km[:32]).encrypt(km[32:], pt, ad)


def header(dh_pub, pn, n):
    return dh_pub + struct.pack(">II", pn, n)


def main():
    doc_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../docs/e2ee.md")
    doc = open(doc_path).read()
    block = doc[doc.index("<!-- e2ee-vectors:begin -->"):doc.index("<!-- e2ee-vectors:end -->")]
    want = dict(l.split(" = ", 1) for l in block.splitlines() if " = " in l)
    want = {k.strip(): v.strip() for k, v in want.items()}
    got = {}
    L = "switchboard-e2ee-vector "
    a_ik, a_sig = fixed(L + "alice identity x25519"), fixed(L + "alice identity ed25519")
    b_ik, b_sig = fixed(L + "bob identity x25519"), fixed(L + "bob identity ed25519")
    b_spk, b_opk = fixed(L + "bob signed prekey"), fixed(L + "bob one-time prekey")
    a_ek, a_rk, b_rk = fixed(L + "alice ephemeral"), fixed(L + "alice ratchet 1"), fixed(L + "bob ratchet 1")
    for n, k in [("alice_identity_x25519_private", a_ik), ("alice_identity_ed25519_seed", a_sig),
                 ("bob_identity_x25519_private", b_ik), ("bob_identity_ed25519_seed", b_sig),
                 ("bob_signed_prekey_private", b_spk), ("bob_one_time_prekey_private", b_opk),
                 ("alice_ephemeral_private", a_ek), ("alice_ratchet_private", a_rk),
                 ("bob_ratchet_private", b_rk)]:
        got[n] = k
    A_IK, A_SIG, B_IK, B_SIG = x_pub(a_ik), ed_pub(a_sig), x_pub(b_ik), ed_pub(b_sig)
    SPK, OPK, EK, A_R, B_R = x_pub(b_spk), x_pub(b_opk), x_pub(a_ek), x_pub(a_rk), x_pub(b_rk)
    got.update(alice_identity_x25519_public=A_IK, alice_identity_ed25519_public=A_SIG,
               bob_identity_x25519_public=B_IK, bob_identity_ed25519_public=B_SIG)
    sig = Ed25519PrivateKey.from_private_bytes(b_sig).sign(enc(SPK))
    got.update(bob_signed_prekey_public=SPK, bob_signed_prekey_signature=sig, bob_one_time_prekey_public=OPK)
    got["bundle"] = b"\x01" + B_IK + B_SIG + struct.pack(">I", 1) + SPK + sig + b"\x01" + struct.pack(">I", 7) + OPK
    got["alice_ephemeral_public"] = EK
    d1, d2, d3, d4 = dh(a_ik, SPK), dh(a_ek, B_IK), dh(a_ek, SPK), dh(a_ek, OPK)
    got.update(x3dh_dh1=d1, x3dh_dh2=d2, x3dh_dh3=d3, x3dh_dh4=d4)
    sk = hkdf(b"\x00" * 32, b"\xff" * 32 + d1 + d2 + d3 + d4, b"Switchboard_X3DH_v1", 32)
    ad = enc(A_IK) + enc(B_IK) + A_SIG + B_SIG
    got.update(x3dh_sk=sk, x3dh_ad=ad, alice_ratchet_public=A_R)
    rk1, ck = kdf_rk(sk, dh(a_rk, SPK))
    got.update(alice_root_key_1=rk1, alice_sending_chain_key_0=ck)
    prekey_fields = A_IK + A_SIG + EK + struct.pack(">I", 1) + b"\x01" + struct.pack(">I", 7)
    msgs = [b"Hello Bob, this is the first message.", b"And this is the second."]
    for i, pt in enumerate(msgs):
        ck, mk = kdf_ck(ck)
        if i == 0:
            got["message_key_0"] = mk
        h = header(A_R, 0, i)
        ct = seal(mk, pt, ad + h)
        got[f"message_{i+1}_plaintext"] = pt
        got[f"message_{i+1}_header"] = h
        got[f"message_{i+1}_ciphertext"] = ct
        got[f"message_{i+1}_envelope"] = b"\x01\x01" + prekey_fields + h + ct
    # Bob: RatchetInitBob(SK, SPK), receives Alice's chain (DH ratchet with his new key B_R).
    rk, ckr = kdf_rk(sk, dh(b_spk, A_R))
    rk, cks = kdf_rk(rk, dh(b_rk, A_R))
    cks, mk = kdf_ck(cks)
    pt = b"Hi Alice, Bob here."
    h = header(B_R, 0, 0)
    ct = seal(mk, pt, ad + h)
    got.update(message_3_plaintext=pt, message_3_header=h, message_3_ciphertext=ct,
               message_3_envelope=b"\x01\x02" + h + ct)
    bad = 0
    for k, v in got.items():
        if want.get(k) != v.hex():
            print(f"MISMATCH {k}: doc {want.get(k)} computed {v.hex()}")
            bad += 1
    missing = set(want) - set(got)
    for k in sorted(missing):
        print(f"not checked: {k}")
    print(f"{len(got) - bad} passed, {bad + len(missing)} failed")
    sys.exit(1 if bad or missing else 0)


if __name__ == "__main__":
    main()
