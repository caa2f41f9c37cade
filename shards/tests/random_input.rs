//! Arbitrary input never panics a shard: random frames (every kind, wild field values, prekey
//! uploads and fetches), mesh messages, durability reports, ticks, closes, hand-offs, peer
//! restarts and storage failures, on a small cluster whose journals check the deletion
//! discipline.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use bytes::Bytes;
use common::{key, Cluster};
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason, ReceiptKind};
use protocol::{frame, Address, DeviceAddr, ErrorCode, Frame, Message, MsgType, ReceiptInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchboard_e2ee::keys::encode_public;
use switchboard_e2ee::IdentityKeyPair;
use switchboard_shards::{
    ClaimKey, ConnRef, Event, FetchedBundle, KeyClaimed, LoginInfo, MeshMsg, PrekeyFetch,
    PrekeyFetchResult, RegisterVerify, SendResult, Store, StoreReceipt,
};

/// Key sets to upload: two valid identities and one with a bad signature. (Few distinct sets,
/// because Ed25519 verification is slow in debug builds and only a new set is verified.)
fn key_pool() -> Vec<DeviceKeys> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut pool = Vec::new();
    for n in 0..3u8 {
        let id = IdentityKeyPair::generate(&mut rng);
        let spk = [n + 1; 32];
        let mut sig = id.sign(&encode_public(&spk));
        if n == 2 {
            sig[0] ^= 1;
        }
        pool.push(DeviceKeys {
            identity_dh: id.public().dh,
            identity_sign: id.public().sign,
            signed_prekey_id: u32::from(n),
            signed_prekey: spk,
            signed_prekey_sig: sig,
        });
    }
    pool
}

fn prekey_frame(rng: &mut StdRng, pool: &[DeviceKeys]) -> Frame {
    let keys = match rng.gen_range(0..20) {
        0 => pool[1],
        1 => pool[2],
        _ => pool[0],
    };
    match rng.gen_range(0..5) {
        0 => Frame::PrekeyUpload(frame::PrekeyUpload {
            keys: Box::new(keys),
            one_time: (0..rng.gen_range(0..12))
                .map(|_| OneTimePrekey {
                    id: rng.gen_range(0..40),
                    key: [rng.gen_range(0..0x80); 32],
                })
                .collect(),
        }),
        1 | 2 => Frame::PrekeyFetch(frame::PrekeyFetch {
            addr: DeviceAddr {
                user: user(rng),
                device: rng.gen_range(0..2),
            },
            request_id: rng.gen(),
        }),
        3 => Frame::PrekeyBundle(frame::PrekeyBundle {
            addr: DeviceAddr { user: 1, device: 0 },
            request_id: 1,
            keys: Box::new(keys),
            one_time: None,
        }),
        _ => Frame::PrekeyStatus(frame::PrekeyStatus {
            one_time_remaining: 1,
            low_water: 1,
            reason: PrekeyStatusReason::EXHAUSTED,
        }),
    }
}

fn user(rng: &mut StdRng) -> u64 {
    // Mostly a handful of plausible users so requests meet state; sometimes anything.
    if rng.gen_bool(0.9) {
        14_155_550_000 + rng.gen_range(0..6)
    } else {
        rng.gen()
    }
}

fn addr(rng: &mut StdRng) -> Address {
    Address {
        kind: rng.gen_range(0..4),
        id: user(rng),
        device: rng.gen_range(0..2),
    }
}

fn frame(rng: &mut StdRng) -> Frame {
    let payload = Bytes::from(vec![7u8; rng.gen_range(0..64)]);
    match rng.gen_range(0..16) {
        0 => Frame::RegisterRequest(frame::RegisterRequest { phone: user(rng) }),
        1 => Frame::RegisterVerify(frame::RegisterVerify {
            phone: user(rng),
            code: rng.gen_range(99_999..1_000_001),
        }),
        2 => Frame::Login(frame::Login {
            addr: DeviceAddr {
                user: user(rng),
                device: rng.gen_range(0..2),
            },
            revision: rng.gen_range(0..3),
            capabilities: rng.gen(),
        }),
        3 | 4 => Frame::Send(frame::Send {
            client_msg_id: rng.gen_range(0..20),
            to: addr(rng),
            msg_type: MsgType(rng.gen()),
            payload,
        }),
        5 => Frame::Ack(frame::Ack {
            seqs: (0..rng.gen_range(0..2000))
                .map(|_| rng.gen_range(0..60))
                .collect(),
        }),
        6 => Frame::Read(frame::Read {
            to: addr(rng),
            client_msg_id: rng.gen_range(0..20),
        }),
        7 => Frame::Ping(frame::Ping { nonce: rng.gen() }),
        8 => Frame::Pong(frame::Pong { nonce: rng.gen() }),
        9 => Frame::Welcome(frame::Welcome {
            addr: DeviceAddr { user: 1, device: 0 },
            revision: 1,
            capabilities: 1,
            server_time_ms: 1,
            keepalive_ms: 1,
            max_frame_bytes: 1,
        }),
        10 => Frame::Deliver(frame::Deliver {
            seq: 1,
            message: Message {
                from: DeviceAddr { user: 1, device: 0 },
                client_msg_id: 1,
                server_ts_ms: 1,
                msg_type: MsgType::TEXT,
                payload,
            },
        }),
        11 => Frame::Receipt(frame::Receipt {
            seq: 1,
            receipt: ReceiptInfo {
                from: DeviceAddr { user: 1, device: 0 },
                client_msg_id: 1,
                kind: ReceiptKind::READ,
                ts_ms: 1,
            },
        }),
        12 => Frame::Error(frame::Error {
            code: rng.gen(),
            ref_id: 0,
            text: String::new(),
        }),
        13 => Frame::GoAway(frame::GoAway {
            code: 22,
            reconnect_after_ms: 1,
        }),
        14 => Frame::ServerAck(frame::ServerAck {
            client_msg_id: 1,
            server_ts_ms: 1,
        }),
        _ => Frame::RegisterCodeSent(frame::RegisterCodeSent {
            phone: 1,
            expires_in_s: 1,
        }),
    }
}

fn mesh(rng: &mut StdRng, shards: u16) -> MeshMsg {
    let reply = ConnRef {
        shard: rng.gen_range(0..shards),
        conn: rng.gen_range(0..30),
    };
    match rng.gen_range(0..10) {
        8 => MeshMsg::PrekeyFetch(PrekeyFetch {
            reply,
            request_id: rng.gen(),
            addr: DeviceAddr {
                user: user(rng),
                device: rng.gen_range(0..2),
            },
        }),
        9 => MeshMsg::PrekeyFetchResult(PrekeyFetchResult {
            conn: reply.conn,
            request_id: 1,
            result: if rng.gen() {
                Err(ErrorCode::NoSuchRecipient)
            } else {
                Ok(FetchedBundle {
                    addr: DeviceAddr {
                        user: user(rng),
                        device: 0,
                    },
                    keys: Box::new(DeviceKeys {
                        identity_dh: [1; 32],
                        identity_sign: [2; 32],
                        signed_prekey_id: 1,
                        signed_prekey: [3; 32],
                        signed_prekey_sig: [4; 64],
                    }),
                    one_time: None,
                })
            },
        }),
        0 => {
            let from = DeviceAddr::new(user(rng), 0);
            let to = DeviceAddr::new(user(rng), rng.gen_range(0..2));
            let message = Message {
                from,
                client_msg_id: rng.gen_range(0..20),
                server_ts_ms: 0,
                msg_type: MsgType(rng.gen()),
                payload: Bytes::new(),
            };
            MeshMsg::Store(Store { reply, to, message })
        }
        1 => MeshMsg::SendResult(SendResult {
            conn: reply.conn,
            client_msg_id: 1,
            result: if rng.gen() {
                Ok(1)
            } else {
                Err(ErrorCode::NoSuchRecipient)
            },
        }),
        2 => MeshMsg::StoreReceipt(StoreReceipt {
            to: DeviceAddr {
                user: user(rng),
                device: 0,
            },
            receipt: ReceiptInfo {
                from: DeviceAddr {
                    user: user(rng),
                    device: 0,
                },
                client_msg_id: 1,
                kind: ReceiptKind(rng.gen_range(0..4)),
                ts_ms: rng.gen(),
            },
            sent_at_ms: 0,
        }),
        3 => MeshMsg::ToConn {
            conn: reply.conn,
            frame: Frame::Pong(frame::Pong { nonce: 1 }),
        },
        4 => MeshMsg::RegisterRequest {
            reply,
            phone: user(rng),
        },
        5 => MeshMsg::RegisterVerify(RegisterVerify {
            reply,
            phone: user(rng),
            code: rng.gen_range(100_000..1_000_000),
            static_key: key(rng.gen_range(0..8)),
        }),
        6 => MeshMsg::ClaimKey(ClaimKey {
            reply_shard: reply.shard,
            token: rng.gen_range(0..10),
            static_key: key(rng.gen_range(0..8)),
            addr: DeviceAddr {
                user: user(rng),
                device: 0,
            },
        }),
        _ => MeshMsg::KeyClaimed(KeyClaimed {
            token: rng.gen_range(0..10),
            result: if rng.gen() { Ok(()) } else { Err(1) },
        }),
    }
}

/// Proves no sequence of inputs panics a shard (nor breaks the deletion discipline).
#[test]
fn random_input_never_panics() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let shards = rng.gen_range(1..=3);
        let mut c = Cluster::with_segments(shards, rng.gen_range(2..10), |cfg| {
            cfg.mailbox_cap_msgs = 5;
            cfg.dedup_window_entries = 4;
            cfg.delivery_window_msgs = 2;
            cfg.register_table_max_entries = 5;
            cfg.compaction_live_ratio = 0.9;
            cfg.prekeys_per_device_max = 15;
            cfg.prekey_fetches_per_requester_per_minute = 20;
            cfg.prekey_rate_table_max_entries = 3;
        });
        let pool = key_pool();
        // Some real accounts so messages get stored, delivered, acked, pruned, compacted.
        for u in 0..4u64 {
            let user = 14_155_550_000 + u;
            c.register(user, key(100 + u));
        }
        for _ in 0..3_000 {
            c.now = c.now.wrapping_add(rng.gen_range(0..5_000));
            let s = rng.gen_range(0..shards);
            let conn = rng.gen_range(0..30);
            let ev = match rng.gen_range(0..100) {
                0..=9 => Event::Connected {
                    conn,
                    peer_ip: common::ip(rng.gen()),
                    static_key: key(rng.gen_range(0..8)),
                },
                10..=44 => Event::Frame {
                    conn,
                    frame: frame(&mut rng),
                },
                45..=49 => Event::Frame {
                    conn,
                    frame: prekey_frame(&mut rng, &pool),
                },
                50..=54 => {
                    let u = rng.gen_range(0..4u64);
                    let info = LoginInfo {
                        addr: DeviceAddr {
                            user: 14_155_550_000 + u,
                            device: 0,
                        },
                        revision: 1,
                        capabilities: rng.gen_range(1..4),
                        static_key: key(100 + u),
                        peer_ip: common::ip(1),
                    };
                    Event::Login { conn, info }
                }
                55..=59 => Event::Closed { conn },
                60..=74 => Event::Mesh {
                    from: rng.gen_range(0..shards),
                    msg: mesh(&mut rng, shards),
                },
                75..=84 => {
                    let up_to = c.journals[usize::from(s)].commit().unwrap_or(0);
                    Event::Durable { up_to }
                }
                85..=92 => Event::Tick,
                93..=96 => {
                    c.run();
                    continue;
                }
                97 => Event::PeerRestarted {
                    shard: rng.gen_range(0..shards),
                },
                98 if rng.gen_bool(0.05) => Event::StorageFailed {
                    reason: "injected".into(),
                },
                _ => {
                    if rng.gen_bool(0.1) {
                        c.crash(s);
                    }
                    continue;
                }
            };
            c.event(s, ev);
            c.out.clear();
        }
        c.settle();
    }
}
