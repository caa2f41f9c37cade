//! Rule tests of multi-device, driven through the public API with a synchronous in-memory
//! cluster: linking (one shard and across shards, every refusal, the device limit with links in
//! progress, lowest free id reuse), `SendMulti` (the exact set, the whole-send stale refusal,
//! dedup before the set check, one ✓ once every copy is durable, the two-phase store across
//! shards, note to self), per-device receipts and `READ_ELSEWHERE`, unlink (durable first, the
//! device's mailbox, prekeys and key gone), recovery and compaction of the device records, and
//! the companion identity check on `PrekeyUpload`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use bytes::Bytes;
use common::{ip, key, user_on, Cluster};
use protocol::frame::{DeviceCopy, DeviceKeys, DeviceListReason, PrekeyStatusReason};
use protocol::{capability, frame, Address, DeviceAddr, ErrorCode, Frame, Message, MsgType};
use protocol::{ReceiptInfo, ReceiptKind, UserId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use storage::Journal;
use switchboard_e2ee::keys::encode_public;
use switchboard_e2ee::{sign_device, IdentityKeyPair};
use switchboard_shards::record::Record;
use switchboard_shards::{home_shard, Action, ConnId, MeshMsg, ShardId};

const CAPS: u64 = capability::MESSAGING | capability::PREKEYS | capability::MULTI_DEVICE;

/// A logged-in device of a test account.
struct Dev {
    addr: DeviceAddr,
    key: [u8; 32],
    id: IdentityKeyPair,
    conn: ConnId,
}

fn identity(seed: u64) -> IdentityKeyPair {
    IdentityKeyPair::generate(&mut StdRng::seed_from_u64(seed))
}

/// Device keys with a real signed prekey by `id`.
fn device_keys(id: &IdentityKeyPair) -> DeviceKeys {
    let public = id.public();
    let mut signed_prekey = [0x2A; 32];
    signed_prekey[31] = 0x11;
    DeviceKeys {
        identity_dh: public.dh,
        identity_sign: public.sign,
        signed_prekey_id: 1,
        signed_prekey,
        signed_prekey_sig: id.sign(&encode_public(&signed_prekey)),
    }
}

fn upload(id: &IdentityKeyPair, n: u32) -> Frame {
    Frame::PrekeyUpload(frame::PrekeyUpload {
        keys: Box::new(device_keys(id)),
        one_time: (1..=n)
            .map(|i| frame::OneTimePrekey {
                id: i,
                key: {
                    let mut k = [0x33; 32];
                    k[..4].copy_from_slice(&i.to_le_bytes());
                    k[31] = 0x11;
                    k
                },
            })
            .collect(),
    })
}

fn errors(frames: &[Frame]) -> Vec<(ErrorCode, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Error(frame::Error { code, ref_id, .. }) => {
                Some((ErrorCode::from_u16(*code).expect("known code"), *ref_id))
            }
            _ => None,
        })
        .collect()
}

/// The device lists among `frames`: (request_id, user, version, reason, device ids).
fn lists(frames: &[Frame]) -> Vec<(u64, UserId, u32, DeviceListReason, Vec<u16>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::DeviceList(l) => Some((
                l.request_id,
                l.user,
                l.version,
                l.reason,
                l.devices.iter().map(|d| d.device).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// The delivers among `frames`: (seq, from, client_msg_id, payload).
fn delivers(frames: &[Frame]) -> Vec<(u64, DeviceAddr, u64, Bytes)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(frame::Deliver {
                seq,
                message:
                    Message {
                        from,
                        client_msg_id,
                        payload,
                        ..
                    },
            }) => Some((*seq, *from, *client_msg_id, payload.clone())),
            _ => None,
        })
        .collect()
}

/// The receipts among `frames`: (from, client_msg_id, kind).
fn receipts(frames: &[Frame]) -> Vec<(DeviceAddr, u64, ReceiptKind)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Receipt(frame::Receipt {
                receipt:
                    ReceiptInfo {
                        from,
                        client_msg_id,
                        kind,
                        ..
                    },
                ..
            }) => Some((*from, *client_msg_id, *kind)),
            _ => None,
        })
        .collect()
}

fn acks(frames: &[Frame]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::ServerAck(frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            }) => Some((*client_msg_id, *server_ts_ms)),
            _ => None,
        })
        .collect()
}

fn copy_payload(cmid: u64, own: bool, device: u16) -> Bytes {
    Bytes::from(format!("{cmid}:{}:{device}", u8::from(own)))
}

fn multi(cmid: u64, to_user: UserId, theirs: &[u16], own: &[u16]) -> Frame {
    let copies = theirs
        .iter()
        .map(|&d| (false, d))
        .chain(own.iter().map(|&d| (true, d)))
        .map(|(own, device)| DeviceCopy {
            own,
            device,
            payload: copy_payload(cmid, own, device),
        })
        .collect();
    Frame::SendMulti(frame::SendMulti {
        client_msg_id: cmid,
        to_user,
        msg_type: MsgType(1),
        copies,
    })
}

fn login_frame(addr: DeviceAddr) -> Frame {
    Frame::Login(frame::Login {
        addr,
        revision: 2,
        capabilities: CAPS,
    })
}

/// Logs `addr` in with `static_key` on a new connection to shard `via`; returns the
/// connection and its frames (Welcome first on success).
fn login_via(
    c: &mut Cluster,
    via: ShardId,
    addr: DeviceAddr,
    static_key: [u8; 32],
) -> (ConnId, Vec<Frame>) {
    let conn = c.connect(via, static_key, ip(2));
    c.frame(conn, login_frame(addr));
    c.run();
    (conn, c.frames(conn))
}

/// Registers `user`, logs its primary in with `CAPS` and publishes its identity (durably).
fn account(c: &mut Cluster, user: UserId) -> Dev {
    c.register(user, key(user));
    let addr = DeviceAddr::new(user, 0);
    let (conn, frames) = login_via(c, home_shard(user, c.n()), addr, key(user));
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    let id = identity(user);
    c.frame(conn, upload(&id, 2));
    c.settle();
    c.frames(conn);
    Dev {
        addr,
        key: key(user),
        id,
        conn,
    }
}

/// A new device on shard `via` asks for a link code: its connection and the code.
fn request_code(c: &mut Cluster, via: ShardId, static_key: [u8; 32]) -> (ConnId, u64) {
    let conn = c.connect(via, static_key, ip(3));
    c.frame(
        conn,
        Frame::LinkRequest(frame::LinkRequest { request_id: 5 }),
    );
    c.run();
    match c.frames(conn).as_slice() {
        [Frame::LinkCode(frame::LinkCode {
            request_id: 5,
            code,
            expires_in_s,
        })] => {
            let ttl = c.configs[usize::from(via)].link_code_ttl_ms / 1000;
            assert_eq!(u64::from(*expires_in_s), ttl);
            assert_eq!(*code & 0xFFFF, u64::from(via), "the code names its shard");
            (conn, *code)
        }
        other => panic!("no link code: {other:?}"),
    }
}

/// The primary's approval of `code` for the device whose identity is `new_id`.
fn approve(
    primary: &Dev,
    request_id: u64,
    code: u64,
    static_key: [u8; 32],
    new_id: &IdentityKeyPair,
) -> Frame {
    let p = new_id.public();
    Frame::LinkApprove(frame::LinkApprove {
        request_id,
        code,
        keys: Box::new(frame::LinkKeys {
            static_key,
            identity_dh: p.dh,
            identity_sign: p.sign,
            signature: sign_device(&primary.id, primary.addr.user, &p.dh, &p.sign),
        }),
    })
}

/// Links a device (seed `seed`) through shard `via`, logs it in on the same connection and
/// publishes its identity. Drains the primary's frames.
fn link(c: &mut Cluster, primary: &Dev, via: ShardId, seed: u64) -> Dev {
    let (k, id) = (key(seed), identity(seed));
    let (conn, code) = request_code(c, via, k);
    c.frame(primary.conn, approve(primary, 77, code, k, &id));
    c.settle();
    let got = c.frames(primary.conn);
    let addr = got
        .iter()
        .find_map(|f| match f {
            Frame::DeviceLinked(frame::DeviceLinked {
                request_id: 77,
                addr,
            }) => Some(*addr),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not linked: {got:?}"));
    assert_eq!(
        c.frames(conn),
        vec![Frame::Registered(frame::Registered { addr })]
    );
    c.frame(conn, login_frame(addr));
    c.run();
    let frames = c.frames(conn);
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    c.frame(conn, upload(&id, 2));
    c.settle();
    c.frames(conn);
    Dev {
        addr,
        key: k,
        id,
        conn,
    }
}

/// Drains the frames of every device given.
fn drain(c: &mut Cluster, devs: &[&Dev]) {
    for d in devs {
        c.frames(d.conn);
    }
}

fn fetch_list(c: &mut Cluster, conn: ConnId, user: UserId) -> (u32, Vec<u16>) {
    c.frames(conn);
    c.frame(
        conn,
        Frame::DeviceListFetch(frame::DeviceListFetch {
            request_id: 9,
            user,
        }),
    );
    c.run();
    match lists(&c.frames(conn)).as_slice() {
        [(9, u, version, DeviceListReason::FETCHED, ids)] if *u == user => (*version, ids.clone()),
        other => panic!("no list: {other:?}"),
    }
}

// ----- linking ------------------------------------------------------------------------------

/// Proves the whole link on one shard: a code bound to the connection, the Device record
/// appended and nothing answered before it is durable, then DeviceLinked to the primary,
/// Registered to the new device and CHANGED to the account's devices; the new device logs in
/// with its own key only.
#[test]
fn link_on_one_shard_answers_once_durable() {
    let mut c = Cluster::new(1, |_| {});
    let u = user_on(0, 1, 0);
    let p = account(&mut c, u);
    let (nk, nid) = (key(500), identity(500));
    let (new_conn, code) = request_code(&mut c, 0, nk);
    c.frame(p.conn, approve(&p, 3, code, nk, &nid));
    c.run();
    assert!(
        matches!(c.journals[0].pending_records().as_slice(),
            [Record::Device { user, device: 1, version: 1, static_key, .. }] if *user == u && *static_key == nk),
        "{:?}",
        c.journals[0].pending_records()
    );
    assert!(c.frames(p.conn).is_empty(), "no answer before durable");
    assert!(
        c.frames(new_conn).is_empty(),
        "no Registered before durable"
    );
    c.commit(0);
    let addr = DeviceAddr::new(u, 1);
    let got = c.frames(p.conn);
    assert!(got.contains(&Frame::DeviceLinked(frame::DeviceLinked {
        request_id: 3,
        addr
    })));
    assert_eq!(
        lists(&got),
        vec![(0, u, 1, DeviceListReason::CHANGED, vec![0, 1])]
    );
    assert_eq!(
        c.frames(new_conn),
        vec![Frame::Registered(frame::Registered { addr })]
    );
    assert_eq!(c.shards[0].stats().links, 1);
    assert_eq!(c.shards[0].stats().devices_linked, 1);

    // The list carries the companion's identity and the primary's signature.
    let (version, ids) = fetch_list(&mut c, p.conn, u);
    assert_eq!((version, ids), (1, vec![0, 1]));

    // The new device logs in on the same connection.
    c.frame(new_conn, login_frame(addr));
    let got = c.frames(new_conn);
    assert!(
        matches!(got.first(), Some(Frame::Welcome(frame::Welcome { addr: a, .. })) if *a == addr)
    );
    // Another key, or the primary's, as device 1: UnknownKey.
    for k in [key(501), p.key] {
        let (conn, _) = login_via(&mut c, 0, addr, k);
        assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey));
    }
    // The companion's key does not log in as the primary either.
    let (conn, _) = login_via(&mut c, 0, DeviceAddr::new(u, 0), nk);
    assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey));
}

/// Proves the cross-shard link: the code is issued on the new device's shard, the approval on
/// the account's home claims it there (LinkClaim → LinkClaimed), and the answers wait for the
/// home shard's Device record to be durable; the new device logs in by hand-off.
#[test]
fn link_across_shards_claims_the_code_on_its_shard() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(1, 2, 0);
    let p = account(&mut c, u);
    let (nk, nid) = (key(600), identity(600));
    let (new_conn, code) = request_code(&mut c, 0, nk);
    c.frame(p.conn, approve(&p, 4, code, nk, &nid));
    assert!(
        matches!(c.mesh.front(), Some((1, 0, MeshMsg::LinkClaim(cl))) if cl.code == code && cl.static_key == nk),
        "{:?}",
        c.mesh
    );
    let (from, to, msg) = c.mesh.pop_front().unwrap();
    c.event(to, switchboard_shards::Event::Mesh { from, msg });
    assert!(
        matches!(c.mesh.front(), Some((0, 1, MeshMsg::LinkClaimed(cl))) if cl.result == Ok(switchboard_shards::ConnRef { shard: 0, conn: new_conn })),
        "{:?}",
        c.mesh
    );
    c.run();
    assert!(c.journals[0].pending_records().is_empty());
    assert!(matches!(
        c.journals[1].pending_records().as_slice(),
        [Record::Device { device: 1, .. }]
    ));
    assert!(c.frames(p.conn).is_empty() && c.frames(new_conn).is_empty());
    c.commit(1);
    c.run();
    let addr = DeviceAddr::new(u, 1);
    assert!(c
        .frames(p.conn)
        .contains(&Frame::DeviceLinked(frame::DeviceLinked {
            request_id: 4,
            addr
        })));
    assert_eq!(
        c.frames(new_conn),
        vec![Frame::Registered(frame::Registered { addr })]
    );
    c.frame(new_conn, login_frame(addr));
    c.run();
    assert!(matches!(
        c.frames(new_conn).first(),
        Some(Frame::Welcome(_))
    ));
    assert_eq!(c.conn_shard.get(&new_conn), Some(&1), "handed off home");
    // The code is used up.
    let again = approve(&p, 5, code, nk, &nid);
    c.frame(p.conn, again);
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::LinkCodeUsed, 5)]
    );
    // Reconnecting later with its static key works too.
    let (_, got) = login_via(&mut c, 0, addr, nk);
    assert!(matches!(got.first(), Some(Frame::Welcome(_))), "{got:?}");
}

/// Proves NotPrimary and LinkSignatureInvalid (a wrong signature, and a primary that has not
/// published its identity), each a non-fatal error naming the request.
#[test]
fn link_refusals_primary_and_signature() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(0, 2, 0);
    let p = account(&mut c, u);
    let comp = link(&mut c, &p, 1, 700);
    let (nk, nid) = (key(701), identity(701));
    let (_, code) = request_code(&mut c, 1, nk);

    // A companion approving.
    let as_companion = Dev {
        addr: comp.addr,
        key: comp.key,
        id: identity(u),
        conn: comp.conn,
    };
    c.frame(comp.conn, approve(&as_companion, 10, code, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(comp.conn)),
        vec![(ErrorCode::NotPrimary, 10)]
    );

    // Signed by another identity.
    let forger = Dev {
        addr: p.addr,
        key: p.key,
        id: identity(9999),
        conn: p.conn,
    };
    c.frame(p.conn, approve(&forger, 11, code, nk, &nid));
    // Signed over other keys.
    let mut f = approve(&p, 12, code, nk, &nid);
    if let Frame::LinkApprove(a) = &mut f {
        a.keys.identity_dh[0] ^= 1;
    }
    c.frame(p.conn, f);
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![
            (ErrorCode::LinkSignatureInvalid, 11),
            (ErrorCode::LinkSignatureInvalid, 12)
        ]
    );
    assert_eq!(c.closed(p.conn), None, "non-fatal");

    // A primary without published keys.
    let v = user_on(0, 2, 1);
    c.register(v, key(v));
    let (vconn, _) = login_via(&mut c, 0, DeviceAddr::new(v, 0), key(v));
    let vdev = Dev {
        addr: DeviceAddr::new(v, 0),
        key: key(v),
        id: identity(v),
        conn: vconn,
    };
    c.frame(vconn, approve(&vdev, 13, code, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(vconn)),
        vec![(ErrorCode::LinkSignatureInvalid, 13)]
    );
    // The code is still good after all that.
    c.frame(p.conn, approve(&p, 14, code, nk, &nid));
    c.settle();
    assert!(c
        .frames(p.conn)
        .iter()
        .any(|f| matches!(f, Frame::DeviceLinked(frame::DeviceLinked { request_id: 14, addr }) if addr.device == 2)));
    assert_eq!(c.shards[0].stats().links_refused, 4);
}

/// Proves the device limit counts the primary, the companions, links being claimed and links
/// appended but not durable yet.
#[test]
fn device_limit_counts_links_in_progress() {
    let mut c = Cluster::new(2, |cfg| cfg.devices_per_account_max = 3);
    let u = user_on(1, 2, 0);
    let p = account(&mut c, u);
    link(&mut c, &p, 0, 800);
    // Two codes; the first approval is claiming (its LinkClaim not delivered yet).
    let (k1, id1) = (key(801), identity(801));
    let (k2, id2) = (key(802), identity(802));
    let (_, code1) = request_code(&mut c, 0, k1);
    let (_, code2) = request_code(&mut c, 0, k2);
    c.frame(p.conn, approve(&p, 20, code1, k1, &id1));
    c.frame(p.conn, approve(&p, 21, code2, k2, &id2));
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::DeviceLimit, 21)],
        "a claim in flight counts"
    );
    // Claimed and appended, not durable: still counts.
    c.run();
    assert!(matches!(
        c.journals[1].pending_records().as_slice(),
        [Record::Device { device: 2, .. }]
    ));
    c.frame(p.conn, approve(&p, 22, code2, k2, &id2));
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::DeviceLimit, 22)],
        "a link appended counts"
    );
    c.settle();
    c.frame(p.conn, approve(&p, 23, code2, k2, &id2));
    c.run();
    let got = c.frames(p.conn);
    assert_eq!(errors(&got), vec![(ErrorCode::DeviceLimit, 23)], "{got:?}");
    assert_eq!(fetch_list(&mut c, p.conn, u), (2, vec![0, 1, 2]));
}

/// Proves every LinkCodeUnknown case: a code never issued, a code issued to another static
/// key, a code whose connection closed, and a code naming a shard that does not exist.
#[test]
fn link_code_unknown_cases() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(0, 2, 0);
    let p = account(&mut c, u);
    let (nk, nid) = (key(900), identity(900));
    let (conn, code) = request_code(&mut c, 1, nk);
    let never = code ^ 0xFFFF_0000;
    c.frame(p.conn, approve(&p, 30, never, nk, &nid));
    c.frame(p.conn, approve(&p, 31, code, key(901), &nid));
    c.frame(p.conn, approve(&p, 32, (7 << 16) | 5, nk, &nid));
    c.frame(p.conn, approve(&p, 33, 1, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![
            (ErrorCode::LinkCodeUnknown, 32),
            (ErrorCode::LinkCodeUnknown, 33),
            (ErrorCode::LinkCodeUnknown, 30),
            (ErrorCode::LinkCodeUnknown, 31),
        ]
    );
    // A wrong key does not burn the code...
    c.frame(conn, Frame::Ping(frame::Ping { nonce: 1 }));
    c.frames(conn);
    // ...but a closed connection makes it unknown.
    c.close_conn(conn);
    c.frame(p.conn, approve(&p, 34, code, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::LinkCodeUnknown, 34)]
    );
    // A second LinkRequest replaces the first code.
    let conn = c.connect(1, nk, ip(3));
    let mut codes = Vec::new();
    for request_id in [1, 2] {
        c.frame(conn, Frame::LinkRequest(frame::LinkRequest { request_id }));
        if let [Frame::LinkCode(l)] = c.frames(conn).as_slice() {
            codes.push(l.code);
        }
    }
    assert_eq!(codes.len(), 2);
    c.frame(p.conn, approve(&p, 35, codes[0], nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::LinkCodeUnknown, 35)]
    );
    // A LinkRequest after login is refused.
    c.frame(
        p.conn,
        Frame::LinkRequest(frame::LinkRequest { request_id: 3 }),
    );
    assert_eq!(c.closed(p.conn), Some(ErrorCode::MalformedFrame));
    assert_eq!(c.shards[0].stats().links, 0);
}

/// Proves LinkCodeExpired past the TTL and LinkCodeUsed for a second approval.
#[test]
fn link_code_expired_and_used() {
    let mut c = Cluster::new(2, |cfg| cfg.link_code_ttl_ms = 5_000);
    let u = user_on(1, 2, 0);
    let p = account(&mut c, u);
    let (nk, nid) = (key(950), identity(950));
    let (_, code) = request_code(&mut c, 0, nk);
    c.now += 5_000;
    c.frame(p.conn, approve(&p, 40, code, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::LinkCodeExpired, 40)]
    );
    let (_, code) = request_code(&mut c, 0, nk);
    c.now += 4_999;
    c.frame(p.conn, approve(&p, 41, code, nk, &nid));
    c.settle();
    assert!(c
        .frames(p.conn)
        .iter()
        .any(|f| matches!(f, Frame::DeviceLinked(_))));
    c.frame(p.conn, approve(&p, 42, code, nk, &nid));
    c.run();
    assert_eq!(
        errors(&c.frames(p.conn)),
        vec![(ErrorCode::LinkCodeUsed, 42)]
    );
    assert_eq!(c.shards[1].stats().links_refused, 2);
}

/// Proves a link takes the lowest free id: an unlinked id is reused.
#[test]
fn lowest_free_device_id_is_reused_after_unlink() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(0, 2, 0);
    let p = account(&mut c, u);
    let ids: Vec<u16> = (0..3)
        .map(|i| link(&mut c, &p, 1, 1000 + i).addr.device)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    c.frame(
        p.conn,
        Frame::Unlink(frame::Unlink {
            request_id: 1,
            device: 2,
        }),
    );
    c.settle();
    assert!(c
        .frames(p.conn)
        .contains(&Frame::DeviceUnlinked(frame::DeviceUnlinked {
            request_id: 1,
            device: 2
        })));
    assert_eq!(link(&mut c, &p, 0, 1010).addr.device, 2);
    assert_eq!(link(&mut c, &p, 1, 1011).addr.device, 4);
    // Three links, one removal, two links: version 6.
    assert_eq!(fetch_list(&mut c, p.conn, u), (6, vec![0, 1, 2, 3, 4]));
}

// ----- SendMulti ----------------------------------------------------------------------------

/// Alice (primary and one companion) on shard `a_shard`, Bob (primary and two companions) on
/// shard `b_shard`, everyone logged in.
struct Pair {
    c: Cluster,
    a0: Dev,
    a1: Dev,
    b0: Dev,
    b1: Dev,
    b2: Dev,
}

fn pair(shards: u16, a_shard: ShardId, b_shard: ShardId) -> Pair {
    let mut c = Cluster::new(shards, |_| {});
    let a = user_on(a_shard, shards, 0);
    let b = user_on(b_shard, shards, 1);
    let a0 = account(&mut c, a);
    let a1 = link(&mut c, &a0, shards - 1, 2001);
    let b0 = account(&mut c, b);
    let b1 = link(&mut c, &b0, 0, 2002);
    let b2 = link(&mut c, &b0, shards - 1, 2003);
    drain(&mut c, &[&a0, &a1, &b0, &b1, &b2]);
    Pair {
        c,
        a0,
        a1,
        b0,
        b1,
        b2,
    }
}

/// Proves a send naming exactly the devices is stored for each, delivered to each with the
/// sending device as `from`, and answered by one ✓ only once every copy is durable.
#[test]
fn send_multi_exact_set_one_ack_when_all_durable() {
    let Pair {
        mut c,
        a0,
        a1,
        b0,
        b1,
        b2,
    } = pair(1, 0, 0);
    let b = b0.addr.user;
    c.frame(a0.conn, multi(1, b, &[2, 0, 1], &[1]));
    c.run();
    let pending = c.journals[0].pending_records();
    let tos: Vec<DeviceAddr> = pending
        .iter()
        .filter_map(|r| match r {
            Record::Message { to, .. } | Record::MessageCopy { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(tos.len(), 4, "{pending:?}");
    assert!(acks(&c.frames(a0.conn)).is_empty());
    assert!(
        delivers(&c.frames(b0.conn)).is_empty(),
        "not before durable"
    );
    c.commit(0);
    let ack = acks(&c.frames(a0.conn));
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0], (1, c.now));
    for d in [&b0, &b1, &b2] {
        let got = delivers(&c.frames(d.conn));
        assert_eq!(got.len(), 1, "{:?}", d.addr);
        assert_eq!(got[0].1, a0.addr);
        assert_eq!(got[0].3, copy_payload(1, false, d.addr.device));
    }
    let got = delivers(&c.frames(a1.conn));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].1, got[0].3.clone()),
        (a0.addr, copy_payload(1, true, 1)),
        "the sync copy is from the sending device"
    );
    assert_eq!(c.shards[0].stats().sends_multi, 1);
}

/// Proves the whole-send stale refusal: a missing or extra recipient device and wrong own
/// copies each get DeviceList STALE (with the current list) then DeviceListStale, and nothing
/// is appended anywhere; wrong own copies are refused on the sender's shard at once.
#[test]
fn send_multi_stale_sets_store_nothing() {
    let Pair {
        mut c, a0, a1, b0, ..
    } = pair(2, 0, 1);
    let (a, b) = (a0.addr.user, b0.addr.user);
    let appended = |c: &Cluster| -> Vec<usize> {
        c.journals
            .iter()
            .map(|j| j.entries().len())
            .collect::<Vec<_>>()
    };
    let before = appended(&c);
    for (cmid, theirs, own) in [
        (1, &[0u16, 1][..], &[1u16][..]),
        (2, &[0, 1, 2, 3][..], &[1][..]),
        (3, &[][..], &[1][..]),
    ] {
        c.frame(a0.conn, multi(cmid, b, theirs, own));
        c.settle();
        let got = c.frames(a0.conn);
        assert_eq!(
            lists(&got),
            vec![(cmid, b, 2, DeviceListReason::STALE, vec![0, 1, 2])],
            "{got:?}"
        );
        assert_eq!(errors(&got), vec![(ErrorCode::DeviceListStale, cmid)]);
        assert!(acks(&got).is_empty());
        // The refusal names the list after the error: the list first.
        assert!(matches!(got.last(), Some(Frame::Error(_))));
    }
    // Own copies: none, an extra one, the sending device itself.
    for (cmid, own) in [(4, &[][..]), (5, &[1u16, 2][..]), (6, &[0u16, 1][..])] {
        c.frame(a0.conn, multi(cmid, b, &[0, 1, 2], own));
        let got = c.frames(a0.conn);
        assert_eq!(
            lists(&got),
            vec![(cmid, a, 1, DeviceListReason::STALE, vec![0, 1])],
            "synchronous: {got:?}"
        );
        assert_eq!(errors(&got), vec![(ErrorCode::DeviceListStale, cmid)]);
        assert!(c.mesh.is_empty(), "nothing routed");
    }
    c.settle();
    assert_eq!(appended(&c), before, "nothing appended");
    assert!(delivers(&c.frames(b0.conn)).is_empty());
    assert!(delivers(&c.frames(a1.conn)).is_empty());
    assert_eq!(
        c.shards[0].stats().sends_stale + c.shards[1].stats().sends_stale,
        6
    );
    // The retry with the right set is stored.
    c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[1]));
    c.settle();
    assert_eq!(acks(&c.frames(a0.conn)).len(), 1);
}

/// Proves dedup comes before the set check: a retry of a stored send after the recipient's
/// list changed is ✓ with the original time and stores nothing again.
#[test]
fn send_multi_dedup_before_set_check() {
    for (shards, a_shard, b_shard) in [(1, 0, 0), (2, 0, 1)] {
        let Pair {
            mut c,
            a0,
            a1,
            b0,
            b1,
            b2,
        } = pair(shards, a_shard, b_shard);
        let b = b0.addr.user;
        c.frame(a0.conn, multi(7, b, &[0, 1, 2], &[1]));
        c.settle();
        let first = acks(&c.frames(a0.conn));
        assert_eq!(first.len(), 1);
        c.now += 1_000;
        // Bob unlinks device 2 and links another (id 2 again, new key) and a third.
        c.frame(
            b0.conn,
            Frame::Unlink(frame::Unlink {
                request_id: 1,
                device: 1,
            }),
        );
        c.settle();
        link(&mut c, &b0, 0, 3001);
        link(&mut c, &b0, 0, 3002);
        drain(&mut c, &[&a0, &a1, &b0, &b1, &b2]);
        let stored = c.shards.iter().map(|s| s.stats().stored).sum::<u64>();
        c.frame(a0.conn, multi(7, b, &[0, 1, 2], &[1]));
        c.settle();
        let got = c.frames(a0.conn);
        assert_eq!(acks(&got), first, "{got:?}");
        assert_eq!(
            c.shards.iter().map(|s| s.stats().stored).sum::<u64>(),
            stored,
            "nothing stored again"
        );
        assert!(delivers(&c.frames(a1.conn)).is_empty());
    }
}

/// Proves dedup comes before the set check for the sender's own devices too: a retry of a
/// stored send after the sender linked another device is ✓ with the original time (the spec:
/// "checked before the device set").
#[test]
fn send_multi_dedup_before_own_set_check() {
    let Pair { mut c, a0, b0, .. } = pair(2, 0, 1);
    let b = b0.addr.user;
    c.frame(a0.conn, multi(8, b, &[0, 1, 2], &[1]));
    c.settle();
    let first = acks(&c.frames(a0.conn));
    assert_eq!(first.len(), 1);
    c.now += 1_000;
    link(&mut c, &a0, 0, 3101);
    c.frames(a0.conn);
    c.frame(a0.conn, multi(8, b, &[0, 1, 2], &[1]));
    c.settle();
    assert_eq!(acks(&c.frames(a0.conn)), first);
}

/// Proves the two-phase store across shards: the recipient copies first; the sync copies are
/// appended on the sender's shard only after the recipient shard's ✓, and the one ServerAck
/// only once those are durable too. A refusal at the recipient's shard stores no sync copy.
#[test]
fn send_multi_two_phase_across_shards() {
    let Pair {
        mut c,
        a0,
        a1,
        b0,
        b1,
        b2,
    } = pair(2, 0, 1);
    let b = b0.addr.user;
    c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[1]));
    c.run();
    let msgs = |c: &Cluster, s: usize| {
        c.journals[s]
            .pending_records()
            .iter()
            .filter(|r| matches!(r, Record::Message { .. } | Record::MessageCopy { .. }))
            .count()
    };
    assert_eq!((msgs(&c, 0), msgs(&c, 1)), (0, 3), "recipient copies first");
    c.commit(0);
    c.run();
    assert_eq!(msgs(&c, 0), 0);
    c.commit(1);
    assert!(
        c.mesh.iter().any(|(f, t, m)| (*f, *t) == (1, 0)
            && matches!(m, MeshMsg::SendResult(r) if r.result.is_ok())),
        "{:?}",
        c.mesh
    );
    assert_eq!(msgs(&c, 0), 0, "not before the recipient shard's ✓ arrives");
    c.run();
    assert_eq!(msgs(&c, 0), 1, "the sync copy after it");
    assert!(acks(&c.frames(a0.conn)).is_empty(), "no ✓ yet");
    for d in [&b0, &b1, &b2] {
        assert_eq!(delivers(&c.frames(d.conn)).len(), 1);
    }
    assert!(delivers(&c.frames(a1.conn)).is_empty());
    c.commit(0);
    assert_eq!(acks(&c.frames(a0.conn)).len(), 1);
    assert_eq!(delivers(&c.frames(a1.conn)).len(), 1);

    // Stale at the recipient's shard: no sync copy.
    c.frame(a0.conn, multi(2, b, &[0, 1], &[1]));
    c.settle();
    assert_eq!(
        errors(&c.frames(a0.conn)),
        vec![(ErrorCode::DeviceListStale, 2)]
    );
    assert!(delivers(&c.frames(a1.conn)).is_empty());
    assert_eq!(c.shards[0].stats().stored, 1);
}

/// Proves a note to self: only own = 0 copies naming exactly the sender's other devices.
#[test]
fn send_multi_note_to_self() {
    let Pair { mut c, a0, a1, .. } = pair(2, 0, 1);
    let a = a0.addr.user;
    c.frame(a0.conn, multi(1, a, &[1], &[]));
    c.settle();
    assert_eq!(acks(&c.frames(a0.conn)).len(), 1);
    let got = delivers(&c.frames(a1.conn));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, a0.addr);
    c.frame(a0.conn, multi(2, a, &[0, 1], &[]));
    c.frame(a0.conn, multi(3, a, &[], &[1]));
    c.settle();
    let got = c.frames(a0.conn);
    assert_eq!(
        errors(&got),
        vec![
            (ErrorCode::DeviceListStale, 2),
            (ErrorCode::UnsupportedAddress, 3)
        ]
    );
    assert_eq!(
        lists(&got),
        vec![(2, a, 1, DeviceListReason::STALE, vec![0, 1])]
    );
    // From the companion: the primary is its other device.
    c.frame(a1.conn, multi(1, a, &[0], &[]));
    c.settle();
    assert_eq!(acks(&c.frames(a1.conn)).len(), 1);
    let got = delivers(&c.frames(a0.conn));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, a1.addr);
}

// ----- receipts -----------------------------------------------------------------------------

/// Proves one DELIVERED receipt per recipient device, none for the sync copy, and that a Read
/// from one device tells the sender READ and the reader's other devices READ_ELSEWHERE.
#[test]
fn receipts_per_device_and_read_elsewhere() {
    let Pair {
        mut c,
        a0,
        a1,
        b0,
        b1,
        b2,
    } = pair(2, 0, 1);
    let b = b0.addr.user;
    c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[1]));
    c.settle();
    c.frames(a0.conn);
    for d in [&b1, &b0, &a1] {
        let seqs = delivers(&c.frames(d.conn))
            .into_iter()
            .map(|d| d.0)
            .collect();
        c.frame(d.conn, Frame::Ack(frame::Ack { seqs }));
        c.settle();
    }
    let got = receipts(&c.frames(a0.conn));
    assert_eq!(
        got,
        vec![
            (b1.addr, 1, ReceiptKind::DELIVERED),
            (b0.addr, 1, ReceiptKind::DELIVERED)
        ],
        "none for the sync copy"
    );
    c.frame(
        b1.conn,
        Frame::Read(frame::Read {
            to: Address::device(a0.addr.user, 0),
            client_msg_id: 1,
        }),
    );
    c.settle();
    assert_eq!(
        receipts(&c.frames(a0.conn)),
        vec![(b1.addr, 1, ReceiptKind::READ)]
    );
    for d in [&b0, &b2] {
        assert_eq!(
            receipts(&c.frames(d.conn)),
            vec![(a0.addr, 1, ReceiptKind::READ_ELSEWHERE)],
            "{:?}",
            d.addr
        );
    }
    assert!(receipts(&c.frames(b1.conn)).is_empty());
    assert!(receipts(&c.frames(a1.conn)).is_empty());
}

// ----- unlink -------------------------------------------------------------------------------

/// Proves an unlink by the primary: nothing answered and the device not closed before the
/// removal record is durable; then DeviceUnlinked, a DeviceRemoved close, CHANGED to the
/// account; its mailbox and prekeys are gone, sends to it are refused, its key no longer logs
/// in.
#[test]
fn unlink_by_primary_once_durable() {
    let Pair {
        mut c,
        a0,
        b0,
        b1,
        b2,
        ..
    } = pair(2, 0, 1);
    let b = b0.addr.user;
    assert!(c.shards[1].published_prekeys(b, 1).is_some());
    // b1 offline with a message waiting.
    c.close_conn(b1.conn);
    c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[1]));
    c.settle();
    drain(&mut c, &[&a0, &b0, &b2]);
    let depth = c.shards[1].stats().mailbox_depth;
    // Log b1 in again so there is a connection to close.
    let (b1c, got) = login_via(&mut c, 0, b1.addr, b1.key);
    assert_eq!(delivers(&got).len(), 1);
    c.frame(
        b0.conn,
        Frame::Unlink(frame::Unlink {
            request_id: 44,
            device: 1,
        }),
    );
    c.run();
    assert!(matches!(
        c.journals[1].pending_records().as_slice(),
        [Record::DeviceRemoved {
            device: 1,
            version: 3,
            ..
        }]
    ));
    assert!(c.frames(b0.conn).is_empty(), "no answer before durable");
    assert_eq!(c.closed(b1c), None, "not closed before durable");
    assert_eq!(c.shards[1].stats().mailbox_depth, depth - 1, "mailbox gone");
    assert!(
        c.shards[1].published_prekeys(b, 1).is_none(),
        "prekeys gone"
    );
    c.commit(1);
    c.run();
    let got = c.frames(b0.conn);
    assert!(got.contains(&Frame::DeviceUnlinked(frame::DeviceUnlinked {
        request_id: 44,
        device: 1
    })));
    assert_eq!(
        lists(&got),
        vec![(0, b, 3, DeviceListReason::CHANGED, vec![0, 2])]
    );
    assert_eq!(c.closed(b1c), Some(ErrorCode::DeviceRemoved));
    assert_eq!(
        lists(&c.frames(b2.conn)),
        vec![(0, b, 3, DeviceListReason::CHANGED, vec![0, 2])]
    );
    // A legacy send to it: NoSuchRecipient; a SendMulti naming it: stale.
    c.frame(
        a0.conn,
        Frame::Send(frame::Send {
            client_msg_id: 2,
            to: Address::device(b, 1),
            msg_type: MsgType(1),
            payload: Bytes::from_static(b"x"),
        }),
    );
    c.frame(a0.conn, multi(3, b, &[0, 1, 2], &[1]));
    c.settle();
    assert_eq!(
        errors(&c.frames(a0.conn)),
        vec![
            (ErrorCode::NoSuchRecipient, 2),
            (ErrorCode::DeviceListStale, 3)
        ]
    );
    // Its key no longer logs in.
    let (conn, _) = login_via(&mut c, 1, b1.addr, b1.key);
    assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey));
    assert_eq!(c.shards[1].stats().unlinks, 1);
}

/// Proves a companion may remove itself (the answer, then the DeviceRemoved close) and
/// nothing else; the primary cannot be removed, and an unknown device is NoSuchDevice.
#[test]
fn unlink_by_companion_and_refusals() {
    let Pair {
        mut c, b0, b1, b2, ..
    } = pair(2, 0, 1);
    let unlink = |request_id, device| Frame::Unlink(frame::Unlink { request_id, device });
    c.frame(b2.conn, unlink(1, 1));
    c.frame(b2.conn, unlink(2, 0));
    c.frame(b0.conn, unlink(3, 0));
    c.frame(b0.conn, unlink(4, 7));
    c.settle();
    assert_eq!(
        errors(&c.frames(b2.conn)),
        vec![(ErrorCode::NotPrimary, 1), (ErrorCode::NotPrimary, 2)]
    );
    assert_eq!(
        errors(&c.frames(b0.conn)),
        vec![(ErrorCode::NotPrimary, 3), (ErrorCode::NoSuchDevice, 4)]
    );
    c.frame(b1.conn, unlink(5, 1));
    c.run();
    assert!(c.frames(b1.conn).is_empty());
    c.commit(1);
    c.run();
    // The answer comes before the close, on the same connection.
    let pos = |c: &Cluster, pred: &dyn Fn(&Action) -> bool| c.out.iter().position(|(_, a)| pred(a));
    let answer = pos(
        &c,
        &|a| matches!(a, Action::Send { conn, frame: Frame::DeviceUnlinked(frame::DeviceUnlinked { request_id: 5, device: 1 }) } if *conn == b1.conn),
    );
    let close = pos(
        &c,
        &|a| matches!(a, Action::Close { conn, code: ErrorCode::DeviceRemoved, .. } if *conn == b1.conn),
    );
    assert!(
        answer.is_some() && close.is_some() && answer < close,
        "{:?}",
        c.out
    );
    // Unlinking it again: NoSuchDevice.
    c.frame(b0.conn, unlink(6, 1));
    c.settle();
    let got = c.frames(b0.conn);
    assert_eq!(errors(&got), vec![(ErrorCode::NoSuchDevice, 6)]);
}

// ----- recovery and compaction ----------------------------------------------------------------

/// Proves recovery rebuilds the device lists (ids, keys, version) after links and removals, a
/// removed device's mailbox entries and prekeys do not come back, and a relinked id starts
/// empty.
#[test]
fn recovery_rebuilds_lists_and_drops_removed_state() {
    let Pair { mut c, a0, b0, .. } = pair(2, 0, 1);
    let b = b0.addr.user;
    // Device 1 holds a message when it is removed.
    c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[1]));
    c.settle();
    c.frame(
        b0.conn,
        Frame::Unlink(frame::Unlink {
            request_id: 1,
            device: 1,
        }),
    );
    c.settle();
    let before = fetch_list(&mut c, b0.conn, b);
    assert_eq!(before, (3, vec![0, 2]));
    let depth = c.shards[1].stats().mailbox_depth;
    c.crash(1);
    assert_eq!(c.shards[1].stats().mailbox_depth, depth);
    assert!(c.shards[1].published_prekeys(b, 1).is_none());
    assert!(c.shards[1].published_prekeys(b, 2).is_some());
    let b0 = Dev {
        conn: login_via(&mut c, 1, b0.addr, b0.key).0,
        ..b0
    };
    c.frames(b0.conn);
    assert_eq!(fetch_list(&mut c, b0.conn, b), before);
    // The removed key stays out; the other companion logs in.
    let (conn, _) = login_via(&mut c, 0, DeviceAddr::new(b, 1), key(2002));
    assert_eq!(c.closed(conn), Some(ErrorCode::UnknownKey));
    let (_, got) = login_via(&mut c, 0, DeviceAddr::new(b, 2), key(2003));
    assert!(matches!(got.first(), Some(Frame::Welcome(_))));
    // Relink id 1: it starts empty, also after another restart.
    let d = link(&mut c, &b0, 0, 4001);
    assert_eq!(d.addr.device, 1);
    assert!(delivers(&c.frames(d.conn)).is_empty());
    assert!(c.shards[1].published_prekeys(b, 1).is_some());
    c.crash(1);
    let (_, got) = login_via(&mut c, 1, d.addr, d.key);
    assert!(matches!(got.first(), Some(Frame::Welcome(_))), "{got:?}");
    assert!(delivers(&got).is_empty(), "{got:?}");
    let (conn, _) = login_via(&mut c, 1, b0.addr, b0.key);
    c.frames(conn);
    assert_eq!(fetch_list(&mut c, conn, b), (4, vec![0, 1, 2]));
}

/// Proves compaction copies live Device records and the current removal record: after the
/// segments holding them are compacted and deleted, a restart rebuilds the same lists and the
/// version never goes back.
#[test]
fn compaction_keeps_device_lists_and_version() {
    // A ratio above 1: every tick compacts the oldest sealed segment, live or not.
    let mut c = Cluster::with_segments(1, 4, |cfg| {
        cfg.compaction_live_ratio = 2.0;
        cfg.dedup_window_entries = 0;
    });
    let u = user_on(0, 1, 0);
    let p = account(&mut c, u);
    let d1 = link(&mut c, &p, 0, 5001);
    let d2 = link(&mut c, &p, 0, 5002);
    c.frame(
        p.conn,
        Frame::Unlink(frame::Unlink {
            request_id: 1,
            device: 2,
        }),
    );
    c.settle();
    drain(&mut c, &[&p, &d1, &d2]);
    let before = fetch_list(&mut c, p.conn, u);
    assert_eq!(before, (3, vec![0, 1]));
    for _ in 0..20 {
        c.tick(0);
        c.settle();
    }
    let compacted = c.shards[0].stats().segments_compacted;
    assert!(compacted >= 2, "{compacted}");
    assert!(
        c.journals[0].entries().iter().all(|e| e.segment > 2),
        "the first segments are gone: {:?}",
        c.journals[0].deleted
    );
    c.crash(0);
    let (conn, _) = login_via(&mut c, 0, p.addr, p.key);
    c.frames(conn);
    assert_eq!(fetch_list(&mut c, conn, u), before);
    let (_, got) = login_via(&mut c, 0, d1.addr, d1.key);
    assert!(matches!(got.first(), Some(Frame::Welcome(_))));
    let p = Dev { conn, ..p };
    let d3 = link(&mut c, &p, 0, 5003);
    assert_eq!(d3.addr.device, 2);
    assert_eq!(fetch_list(&mut c, p.conn, u), (4, vec![0, 1, 2]));
}

/// Proves a relink of a removed id survives a compaction that copies the (still current)
/// removal record of that id while the link's record is not durable yet: after a restart the
/// relinked device is still linked.
#[test]
fn compaction_during_relink_keeps_the_device() {
    let mut c = Cluster::with_segments(1, 5, |cfg| {
        cfg.compaction_live_ratio = 2.0;
        cfg.dedup_window_entries = 0;
    });
    let u = user_on(0, 1, 0);
    let p = account(&mut c, u);
    link(&mut c, &p, 0, 6001);
    c.frame(
        p.conn,
        Frame::Unlink(frame::Unlink {
            request_id: 1,
            device: 1,
        }),
    );
    c.settle();
    c.frames(p.conn);
    // Compact until the oldest segment is sealed and holds the (current) removal record.
    for _ in 0..50 {
        let entries = c.journals[0].entries();
        let oldest = entries.iter().map(|e| e.segment).min().unwrap();
        let removal_in_oldest = entries
            .iter()
            .any(|e| e.segment == oldest && matches!(e.record, Record::DeviceRemoved { .. }));
        if removal_in_oldest && oldest != c.journals[0].active_segment() {
            break;
        }
        c.tick(0);
        c.settle();
    }
    // Relink: id 1 again. While its Device record is pending, that segment is compacted.
    let (nk, nid) = (key(6002), identity(6002));
    let (new_conn, code) = request_code(&mut c, 0, nk);
    c.frame(p.conn, approve(&p, 2, code, nk, &nid));
    c.run();
    let pending = c.journals[0].pending_records();
    assert!(
        matches!(pending.as_slice(), [Record::Device { device: 1, .. }]),
        "{pending:?}"
    );
    let compacted = c.shards[0].stats().segments_compacted;
    c.tick(0);
    c.settle();
    let entries: Vec<Record> = c.journals[0]
        .entries()
        .into_iter()
        .map(|e| e.record)
        .collect();
    assert_eq!(
        c.shards[0].stats().segments_compacted,
        compacted + 1,
        "{entries:?}"
    );
    assert_eq!(c.frames(new_conn).len(), 1, "Registered");
    let addr = DeviceAddr::new(u, 1);
    let (_, got) = login_via(&mut c, 0, addr, nk);
    assert!(matches!(got.first(), Some(Frame::Welcome(_))), "{got:?}");
    c.crash(0);
    let (_, got) = login_via(&mut c, 0, addr, nk);
    assert!(
        matches!(got.first(), Some(Frame::Welcome(_))),
        "the relinked device is gone after the restart: {got:?}; log {entries:?}"
    );
}

// ----- prekeys of companions ----------------------------------------------------------------

/// Proves a companion may publish only the identity keys its primary signed: other keys get
/// IdentityMismatch and nothing is stored.
#[test]
fn companion_prekey_upload_identity_mismatch() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(1, 2, 0);
    let p = account(&mut c, u);
    let (nk, nid) = (key(7001), identity(7001));
    let (conn, code) = request_code(&mut c, 0, nk);
    c.frame(p.conn, approve(&p, 1, code, nk, &nid));
    c.settle();
    let addr = DeviceAddr::new(u, 1);
    c.frames(conn);
    c.frame(conn, login_frame(addr));
    c.run();
    c.frames(conn);
    c.frame(conn, upload(&identity(7002), 3));
    c.settle();
    assert_eq!(
        errors(&c.frames(conn)),
        vec![(ErrorCode::IdentityMismatch, 0)]
    );
    assert!(c.shards[1].published_prekeys(u, 1).is_none());
    c.frame(conn, upload(&nid, 3));
    c.settle();
    let got = c.frames(conn);
    assert!(
        got.iter().any(
            |f| matches!(f, Frame::PrekeyStatus(s) if s.reason == PrekeyStatusReason::UPLOADED)
        ),
        "{got:?}"
    );
    let (keys, otks) = c.shards[1].published_prekeys(u, 1).unwrap();
    assert_eq!(keys.identity_sign, nid.public().sign);
    assert_eq!(otks.len(), 3);
    // The primary may change its identity (no signature binds it).
    c.frame(p.conn, upload(&identity(7003), 0));
    c.settle();
    assert!(errors(&c.frames(p.conn)).is_empty());
}

/// Proves a list fetch for a user without an account is NoSuchRecipient, and a fetcher on
/// another shard hears CHANGED when the list changes.
#[test]
fn device_list_fetch_and_watchers() {
    let mut c = Cluster::new(2, |_| {});
    let u = user_on(1, 2, 0);
    let w = user_on(0, 2, 1);
    let p = account(&mut c, u);
    c.register(w, key(w));
    let (wc, _) = login_via(&mut c, 0, DeviceAddr::new(w, 0), key(w));
    c.frames(wc);
    c.frame(
        wc,
        Frame::DeviceListFetch(frame::DeviceListFetch {
            request_id: 3,
            user: user_on(1, 2, 7),
        }),
    );
    c.run();
    assert_eq!(errors(&c.frames(wc)), vec![(ErrorCode::NoSuchRecipient, 3)]);
    assert_eq!(fetch_list(&mut c, wc, u), (0, vec![0]));
    link(&mut c, &p, 0, 8001);
    assert_eq!(
        lists(&c.frames(wc)),
        vec![(0, u, 1, DeviceListReason::CHANGED, vec![0, 1])]
    );
}

/// Proves the copies of one SendMulti stored on a shard are all or nothing across a crash: when
/// a torn tail keeps some of them, the retry (same id) still reaches every device.
#[test]
fn send_multi_copies_all_or_nothing_across_a_torn_crash() {
    for cut in (1..4_000).step_by(53) {
        let Pair {
            mut c,
            a0,
            b0,
            b1,
            b2,
            ..
        } = pair(1, 0, 0);
        // Alice's companion leaves, so the send has only Bob's three copies.
        c.frame(
            a0.conn,
            Frame::Unlink(frame::Unlink {
                request_id: 1,
                device: 1,
            }),
        );
        c.settle();
        drain(&mut c, &[&a0, &b0, &b1, &b2]);
        let b = b0.addr.user;
        c.frame(a0.conn, multi(1, b, &[0, 1, 2], &[]));
        c.run();
        let crashed = c.journals[0].crash_with(storage::CrashMode::TornPrefix, cut);
        let kept = crashed
            .records
            .iter()
            .filter(|(_, r)| matches!(r, Record::Message { .. } | Record::MessageCopy { .. }))
            .count();
        if kept == 0 || kept == 3 {
            continue;
        }
        let mut shard = switchboard_shards::Shard::new(c.configs[0].clone(), 99);
        shard.recover(c.now, &crashed.segments, crashed.records);
        c.shards[0] = shard;
        c.conn_shard.clear();
        c.mesh.clear();
        c.out.clear();
        // Alice resends under the same id; then Bob's devices log in.
        let (a0c, _) = login_via(&mut c, 0, a0.addr, a0.key);
        c.frame(a0c, multi(1, b, &[0, 1, 2], &[]));
        c.settle();
        assert_eq!(acks(&c.frames(a0c)).len(), 1);
        // Every device gets it; one whose copy survived gets it twice (the retry stored the
        // send again: at least once, and devices dedup on the sender's id).
        for d in [&b0, &b1, &b2] {
            let (_, got) = login_via(&mut c, 0, d.addr, d.key);
            let n = delivers(&got).len();
            assert!(
                (1..=2).contains(&n),
                "{:?} got message 1 {n} times ({kept} of 3 copies survived the crash)",
                d.addr
            );
        }
        return;
    }
    panic!("no cut kept part of the copies");
}

/// Proves `device_list_watchers_max` bounds the watchers of one list: past it the oldest is
/// forgotten (counted) and only the newer ones hear of the change.
#[test]
fn device_list_watchers_are_bounded() {
    let mut c = Cluster::new(2, |cfg| cfg.device_list_watchers_max = 1);
    let u = user_on(1, 2, 0);
    let p = account(&mut c, u);
    let mut conns = Vec::new();
    for i in 1..=2 {
        let w = user_on(0, 2, i);
        c.register(w, key(w));
        let (wc, _) = login_via(&mut c, 0, DeviceAddr::new(w, 0), key(w));
        assert_eq!(fetch_list(&mut c, wc, u), (0, vec![0]));
        conns.push(wc);
    }
    assert_eq!(c.shards[1].stats().device_list_watchers_evicted, 1);
    link(&mut c, &p, 0, 8101);
    assert!(
        lists(&c.frames(conns[0])).is_empty(),
        "the forgotten watcher"
    );
    assert_eq!(
        lists(&c.frames(conns[1])),
        vec![(0, u, 1, DeviceListReason::CHANGED, vec![0, 1])]
    );
}
