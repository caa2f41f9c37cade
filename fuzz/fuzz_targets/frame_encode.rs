//! Encode side: frames built from arbitrary field values (as the server and client build them)
//! must encode to exactly `encoded_len()` bytes, seal into a record whose length prefix matches
//! its body, and decode back to themselves — except for the two documented normalisations:
//! an `Ack` with 0 or more than 1024 seqs does not decode, and `Error.text` is cut to 256 bytes
//! on a character boundary.
//!
//! Input: `variant` byte (mod 16), then field bytes (big-endian integers, missing bytes read as
//! 0); `Send`/`Deliver` payloads, `Ack` seqs and `Error` text take the rest (text through
//! `String::from_utf8_lossy`, `len` = the rest, so texts longer than 256 bytes occur).
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::frame::{
    DeviceKeys, OneTimePrekey, PrekeyStatusReason, ReceiptKind, ACK_SEQS_MAX, ERROR_TEXT_MAX,
};
use protocol::noise::{ClientHandshake, ServerHandshake, StaticKeypair, Transport};
use protocol::wire::LEN_PREFIX_BYTES;
use protocol::{frame, Address, DeviceAddr, Frame, Message, MsgType, ReceiptInfo};

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes())
    }
    fn addr(&mut self) -> Address {
        Address {
            kind: self.u8(),
            id: self.u64(),
            device: self.u16(),
        }
    }
    fn device_keys(&mut self) -> DeviceKeys {
        DeviceKeys {
            identity_dh: self.bytes(),
            identity_sign: self.bytes(),
            signed_prekey_id: self.u32(),
            signed_prekey: self.bytes(),
            signed_prekey_sig: self.bytes(),
        }
    }
    fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

fn transports() -> &'static (Transport, Transport) {
    static T: OnceLock<(Transport, Transport)> = OnceLock::new();
    T.get_or_init(|| {
        let (c, m1) =
            ClientHandshake::start_with(&StaticKeypair::from_private([5; 32]), Some(&[6; 32]))
                .expect("c");
        let (s, m2) =
            ServerHandshake::new_with(&StaticKeypair::from_private([7; 32]), Some(&[8; 32]))
                .expect("s")
                .read_hello(&m1)
                .expect("m1");
        let (ct, m3, _) = c.read_hello(&m2).expect("m2");
        let (st, _) = s.read_finish(&m3).expect("m3");
        (ct, st)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let frame = match r.u8() % 20 {
        0 => Frame::RegisterRequest(frame::RegisterRequest { phone: r.u64() }),
        1 => Frame::RegisterVerify(frame::RegisterVerify {
            phone: r.u64(),
            code: r.u32(),
        }),
        2 => Frame::Login(frame::Login {
            addr: DeviceAddr {
                user: r.u64(),
                device: r.u16(),
            },
            revision: r.u16(),
            capabilities: r.u64(),
        }),
        3 => Frame::Send(frame::Send {
            client_msg_id: r.u64(),
            to: r.addr(),
            msg_type: MsgType(r.u8()),
            payload: Bytes::copy_from_slice(r.rest()),
        }),
        4 => {
            let rest = r.rest();
            // Up to 2048 seqs, so counts past ACK_SEQS_MAX occur.
            let seqs: Vec<u64> = rest.chunks(2).take(2048).map(|c| u64::from(c[0])).collect();
            Frame::Ack(frame::Ack { seqs })
        }
        5 => Frame::Read(frame::Read {
            to: r.addr(),
            client_msg_id: r.u64(),
        }),
        6 => Frame::Ping(frame::Ping { nonce: r.u64() }),
        7 => Frame::Pong(frame::Pong { nonce: r.u64() }),
        8 => Frame::Welcome(frame::Welcome {
            addr: DeviceAddr {
                user: r.u64(),
                device: r.u16(),
            },
            revision: r.u16(),
            capabilities: r.u64(),
            server_time_ms: r.u64(),
            keepalive_ms: r.u32(),
            max_frame_bytes: r.u32(),
        }),
        9 => Frame::RegisterCodeSent(frame::RegisterCodeSent {
            phone: r.u64(),
            expires_in_s: r.u32(),
        }),
        10 => Frame::Registered(frame::Registered {
            addr: DeviceAddr {
                user: r.u64(),
                device: r.u16(),
            },
        }),
        11 => Frame::ServerAck(frame::ServerAck {
            client_msg_id: r.u64(),
            server_ts_ms: r.u64(),
        }),
        12 => Frame::Deliver(frame::Deliver {
            seq: r.u64(),
            message: Message {
                from: DeviceAddr {
                    user: r.u64(),
                    device: r.u16(),
                },
                client_msg_id: r.u64(),
                server_ts_ms: r.u64(),
                msg_type: MsgType(r.u8()),
                payload: Bytes::copy_from_slice(r.rest()),
            },
        }),
        13 => Frame::Receipt(frame::Receipt {
            seq: r.u64(),
            receipt: ReceiptInfo {
                from: DeviceAddr {
                    user: r.u64(),
                    device: r.u16(),
                },
                client_msg_id: r.u64(),
                kind: if r.u8() & 1 == 0 {
                    ReceiptKind::DELIVERED
                } else {
                    ReceiptKind::READ
                },
                ts_ms: r.u64(),
            },
        }),
        14 => Frame::Error(frame::Error {
            code: r.u16(),
            ref_id: r.u64(),
            text: String::from_utf8_lossy(r.rest()).into_owned(),
        }),
        15 => Frame::PrekeyUpload(frame::PrekeyUpload {
            keys: Box::new(r.device_keys()),
            one_time: r
                .rest()
                .chunks_exact(36)
                .take(1800)
                .map(|c| OneTimePrekey {
                    id: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                    key: c[4..36].try_into().expect("32 bytes"),
                })
                .collect(),
        }),
        16 => Frame::PrekeyFetch(frame::PrekeyFetch {
            addr: DeviceAddr {
                user: r.u64(),
                device: r.u16(),
            },
            request_id: r.u64(),
        }),
        17 => {
            let request_id = r.u64();
            let user = r.u64();
            let device = r.u16();
            let keys = r.device_keys();
            let one_time = (r.u8() % 2 == 1).then(|| OneTimePrekey {
                id: r.u32(),
                key: r.bytes(),
            });
            Frame::PrekeyBundle(frame::PrekeyBundle {
                addr: DeviceAddr { user, device },
                request_id,
                keys: Box::new(keys),
                one_time,
            })
        }
        18 => Frame::PrekeyStatus(frame::PrekeyStatus {
            one_time_remaining: r.u32(),
            low_water: r.u32(),
            reason: match r.u8() % 3 {
                0 => PrekeyStatusReason::UPLOADED,
                1 => PrekeyStatusReason::BELOW_LOW_WATER,
                _ => PrekeyStatusReason::EXHAUSTED,
            },
        }),
        _ => Frame::GoAway(frame::GoAway {
            code: r.u16(),
            reconnect_after_ms: r.u32(),
        }),
    };

    let encoded = frame.to_vec();
    assert_eq!(
        encoded.len(),
        frame.encoded_len(),
        "encoded_len() disagrees with encode() for {frame:?}"
    );

    // Sealed: the length prefix must describe exactly the body that follows.
    let (client, server) = transports();
    let mut tx = server.clone();
    let mut rx = client.clone();
    let mut rec = Vec::new();
    tx.seal_frame(&frame, &mut rec).expect("seal");
    let len = usize::from(u16::from_be_bytes([rec[0], rec[1]]));
    assert_eq!(
        len,
        rec.len() - LEN_PREFIX_BYTES,
        "record length prefix disagrees with the body"
    );
    let mut body = rec[LEN_PREFIX_BYTES..].to_vec();
    let n = rx.open_record(&mut body).expect("open own record");
    assert_eq!(&body[..n], &encoded[..]);

    // Decoded: equal, modulo the documented normalisations.
    let decoded = Frame::decode(Bytes::from(encoded));
    match &frame {
        Frame::Ack(frame::Ack { seqs }) if seqs.is_empty() || seqs.len() > ACK_SEQS_MAX => {
            assert!(decoded.is_err())
        }
        Frame::Error(frame::Error { code, ref_id, text }) if text.len() > ERROR_TEXT_MAX => {
            let mut end = ERROR_TEXT_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let cut = Frame::Error(frame::Error {
                code: *code,
                ref_id: *ref_id,
                text: text[..end].to_owned(),
            });
            assert_eq!(decoded.expect("decode"), cut);
        }
        _ => assert_eq!(decoded.expect("decode"), frame),
    }
});
