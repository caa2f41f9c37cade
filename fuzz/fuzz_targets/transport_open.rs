//! Records fed to `Transport::open_record` after a real in-process handshake.
//!
//! Input: a sequence of operations. Each starts with an `op` byte; bit 2 (`op & 4`) picks the
//! direction (0: client → server, 1: server → client) and `op & 3` the operation:
//! * 0 sealed: `len` byte, `len` plaintext bytes. The sender seals them; the receiver must open
//!   them to exactly those bytes; `Frame::decode` on them must not panic and, when it succeeds,
//!   re-encode to the same bytes.
//! * 1 tampered: like 0 plus a `pos` byte and a `mask` byte; the sealed body gets
//!   `body[pos % len] ^= mask | 1` and must fail to open.
//! * 2 raw: `len` byte, `len` bytes given as the record body; opening must fail (nobody can forge
//!   a tag) without panicking.
//! * 3 replay: the previous record of that direction again; must fail.
//!
//! After a failure the receiving direction is dead (the server closes the connection); further
//! operations in that direction are skipped, the other direction goes on.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::noise::{ClientHandshake, NoiseError, ServerHandshake, StaticKeypair, Transport};
use protocol::wire::{LEN_PREFIX_BYTES, TAG_BYTES};
use protocol::{ErrorCode, Frame};

fn transports() -> &'static (Transport, Transport) {
    static T: OnceLock<(Transport, Transport)> = OnceLock::new();
    T.get_or_init(|| {
        let client = StaticKeypair::from_private([0x11; 32]);
        let server = StaticKeypair::from_private([0x22; 32]);
        let (c, msg1) = ClientHandshake::start_with(&client, Some(&[0x33; 32])).expect("client");
        let (s, msg2) = ServerHandshake::new_with(&server, Some(&[0x44; 32]))
            .expect("server")
            .read_hello(&msg1)
            .expect("msg1");
        let (ct, msg3, _) = c.read_hello(&msg2).expect("msg2");
        let (st, _) = s.read_finish(&msg3).expect("msg3");
        (ct, st)
    })
}

struct Dir {
    tx: Transport,
    rx: Transport,
    dead: bool,
    last: Option<Vec<u8>>,
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (a, b) = data.split_at(n);
    *data = b;
    Some(a)
}

fn seal(d: &mut Dir, plain: &[u8]) -> Vec<u8> {
    let mut rec = Vec::new();
    rec.extend_from_slice(&((plain.len() + TAG_BYTES) as u16).to_be_bytes());
    let start = rec.len();
    rec.extend_from_slice(plain);
    d.tx.tx.seal_in_place(&mut rec, start).expect("seal");
    assert_eq!(rec.len(), LEN_PREFIX_BYTES + plain.len() + TAG_BYTES);
    rec
}

fn must_fail(d: &mut Dir, body: &mut [u8]) {
    match d.rx.open_record(body) {
        Ok(n) => panic!("forged record of {} bytes opened to {n} bytes", body.len()),
        Err(e) => {
            assert!(matches!(e, NoiseError::Decrypt | NoiseError::Short));
            assert_eq!(e.code(), ErrorCode::DecryptFailed);
        }
    }
    d.dead = true;
}

fuzz_target!(|data: &[u8]| {
    let (c, s) = transports();
    let mut dirs = [
        Dir {
            tx: c.clone(),
            rx: s.clone(),
            dead: false,
            last: None,
        },
        Dir {
            tx: s.clone(),
            rx: c.clone(),
            dead: false,
            last: None,
        },
    ];
    let mut data = data;
    while let Some(&[op]) = take(&mut data, 1) {
        let d = &mut dirs[usize::from((op >> 2) & 1)];
        match op & 3 {
            0 | 1 => {
                let Some(&[len]) = take(&mut data, 1) else {
                    return;
                };
                let Some(plain) = take(&mut data, usize::from(len)) else {
                    return;
                };
                let tamper = if op & 3 == 1 {
                    let Some(&[pos, mask]) = take(&mut data, 2) else {
                        return;
                    };
                    Some((pos, mask | 1))
                } else {
                    None
                };
                if d.dead {
                    continue;
                }
                let rec = seal(d, plain);
                let mut body = rec[LEN_PREFIX_BYTES..].to_vec();
                d.last = Some(body.clone());
                match tamper {
                    None => {
                        let n = d.rx.open_record(&mut body).expect("genuine record opens");
                        assert_eq!(n, plain.len());
                        assert_eq!(&body[..n], plain);
                        if let Ok(f) = Frame::decode(Bytes::copy_from_slice(&body[..n])) {
                            assert_eq!(f.to_vec(), plain);
                        }
                    }
                    Some((pos, mask)) => {
                        let i = usize::from(pos) % body.len();
                        body[i] ^= mask;
                        must_fail(d, &mut body);
                    }
                }
            }
            2 => {
                let Some(&[len]) = take(&mut data, 1) else {
                    return;
                };
                let Some(raw) = take(&mut data, usize::from(len)) else {
                    return;
                };
                if d.dead {
                    continue;
                }
                let mut body = raw.to_vec();
                must_fail(d, &mut body);
            }
            _ => {
                if d.dead {
                    continue;
                }
                if let Some(mut body) = d.last.clone() {
                    must_fail(d, &mut body);
                }
            }
        }
    }
});
