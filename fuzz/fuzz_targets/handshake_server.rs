//! Arbitrary bytes as handshake messages 1 and 3 fed to a server with a fixed static key. Must
//! never panic; a success must only happen with a genuine msg3 and must yield a working
//! transport.
//!
//! Input: `mode` byte, then by `mode % 3`:
//! * 0: `len` byte, `len` bytes of msg1, the rest is msg3 (both arbitrary);
//! * 1: msg1 is a genuine client msg1 (fixed keys), the rest is msg3;
//! * 2: msg1 is genuine; msg3 is the genuine msg3 XOR the rest (bytes past 64 are appended), so
//!   an all-zero rest of 64 bytes is the success path.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::noise::{ClientHandshake, ServerHandshake, StaticKeypair, Transport};
use protocol::{frame, ErrorCode, Frame};

const SERVER_STATIC: [u8; 32] = [0x20; 32];
const SERVER_EPHEMERAL: [u8; 32] = [0x60; 32];
const CLIENT_STATIC: [u8; 32] = [0x01; 32];
const CLIENT_EPHEMERAL: [u8; 32] = [0x40; 32];

struct Genuine {
    server: StaticKeypair,
    client: StaticKeypair,
    msg1: Vec<u8>,
    msg3: Vec<u8>,
    client_transport: Transport,
}

fn genuine() -> &'static Genuine {
    static G: OnceLock<Genuine> = OnceLock::new();
    G.get_or_init(|| {
        let server = StaticKeypair::from_private(SERVER_STATIC);
        let client = StaticKeypair::from_private(CLIENT_STATIC);
        let (c, msg1) =
            ClientHandshake::start_with(&client, Some(&CLIENT_EPHEMERAL)).expect("client start");
        let (_, msg2) = ServerHandshake::new_with(&server, Some(&SERVER_EPHEMERAL))
            .expect("server")
            .read_hello(&msg1)
            .expect("genuine msg1");
        let (client_transport, msg3, _) = c.read_hello(&msg2).expect("genuine msg2");
        Genuine {
            server,
            client,
            msg1,
            msg3,
            client_transport,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let g = genuine();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (msg1, msg3): (Vec<u8>, Vec<u8>) = match mode % 3 {
        0 => {
            let Some((&len, rest)) = rest.split_first() else {
                return;
            };
            let n = usize::from(len).min(rest.len());
            (rest[..n].to_vec(), rest[n..].to_vec())
        }
        1 => (g.msg1.clone(), rest.to_vec()),
        _ => {
            let mut m3: Vec<u8> = g.msg3.iter().zip(rest).map(|(a, b)| a ^ b).collect();
            m3.extend_from_slice(rest.get(g.msg3.len()..).unwrap_or_default());
            (g.msg1.clone(), m3)
        }
    };
    let server = ServerHandshake::new_with(&g.server, Some(&SERVER_EPHEMERAL)).expect("server");
    let (awaiting, msg2) = match server.read_hello(&msg1) {
        Ok(v) => v,
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::HandshakeFailed);
            return;
        }
    };
    assert!(msg2.len() >= protocol::noise::MSG2_BYTES);
    match awaiting.read_finish(&msg3) {
        Ok((mut server_t, client_static)) => {
            // Only the genuine client can finish: it proves the client static key.
            assert_eq!(msg1, g.msg1, "handshake finished with a forged msg1");
            assert_eq!(
                &msg3[..g.msg3.len()],
                &g.msg3[..],
                "handshake finished with a forged msg3"
            );
            assert_eq!(client_static, g.client.public);
            let mut ct = g.client_transport.clone();
            let ping = Frame::Ping(frame::Ping { nonce: 7 });
            let mut rec = Vec::new();
            ct.seal_frame(&ping, &mut rec).expect("seal");
            let mut body = rec[2..].to_vec();
            let n = server_t.open_record(&mut body).expect("open");
            assert_eq!(
                Frame::decode(Bytes::copy_from_slice(&body[..n])).expect("decode"),
                ping
            );
        }
        Err(e) => assert_eq!(e.code(), ErrorCode::HandshakeFailed),
    }
});
