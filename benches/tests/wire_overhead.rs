//! Wire overhead of a multi-device send, measured on real sealed records: a `Send` of a 100-byte
//! payload costs 39 bytes on top of the payload (2 length prefix + 16 AES-GCM tag + 1 kind + 20
//! header); a `SendMulti` with one 100-byte copy per device costs 2 + 16 + 1 + 18 + 5 per copy
//! (57 bytes for 4 copies). The figures in `hardware.md` ("Multi-device fan-out") come from here.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

use bytes::Bytes;
use protocol::noise::{ClientHandshake, ServerHandshake, StaticKeypair, Transport};
use protocol::{frame, Address, Frame, MsgType};

fn pair() -> (Transport, Transport) {
    let c = StaticKeypair::from_private([1u8; 32]);
    let s = StaticKeypair::from_private([2u8; 32]);
    let (c1, m1) = ClientHandshake::start(&c).unwrap();
    let (s1, m2) = ServerHandshake::new(&s).unwrap().read_hello(&m1).unwrap();
    let (ct, m3, _) = c1.read_hello(&m2).unwrap();
    let (st, _) = s1.read_finish(&m3).unwrap();
    (ct, st)
}

/// Sealed bytes of `f` (length prefix and tag included), checked to open to the same frame.
fn sealed(f: &Frame) -> usize {
    let (mut c, mut s) = pair();
    let mut rec = Vec::new();
    c.seal_frame(f, &mut rec).unwrap();
    let body = &mut rec[2..];
    let n = s.open_record(body).unwrap();
    assert_eq!(
        &Frame::decode(Bytes::copy_from_slice(&body[..n])).unwrap(),
        f
    );
    rec.len()
}

fn multi(recipient_devices: u16, own_devices: u16, payload: &Bytes) -> Frame {
    let copies = (0..recipient_devices)
        .map(|d| (false, d))
        .chain((1..=own_devices).map(|d| (true, d)))
        .map(|(own, device)| frame::DeviceCopy {
            own,
            device,
            payload: payload.clone(),
        })
        .collect();
    Frame::SendMulti(frame::SendMulti {
        client_msg_id: 7,
        to_user: 14_155_550_100,
        msg_type: MsgType::TEXT,
        copies,
    })
}

#[test]
fn send_multi_overhead_matches_the_computation() {
    let payload = Bytes::from(vec![0xab; 100]);
    let send = Frame::Send(frame::Send {
        client_msg_id: 7,
        to: Address::device(14_155_550_100, 0),
        msg_type: MsgType::TEXT,
        payload: payload.clone(),
    });
    let legacy = sealed(&send);
    assert_eq!(legacy - 100, 39, "Send: 2 + 16 + 1 + 20");
    let one = sealed(&multi(1, 0, &payload));
    assert_eq!(one - 100, 2 + 16 + 1 + 18 + 5);
    let four = sealed(&multi(4, 0, &payload));
    assert_eq!(
        four - 400,
        57,
        "SendMulti, 4 copies: 2 + 1 + 18 + 4 × 5 + 16"
    );
    // Four devices on both sides: 4 recipient copies + 3 sync copies, what the flood sends
    // with --devices 4.
    let seven = sealed(&multi(4, 3, &payload));
    assert_eq!(seven, 2 + 16 + 1 + 18 + 7 * (5 + 100));
    eprintln!(
        "sealed bytes, 100 B payload: Send {legacy} (overhead {}), SendMulti ×1 {one} ({}), ×4 {four} ({}), 4+3 sync {seven} ({})",
        legacy - 100,
        one - 100,
        four - 400,
        seven - 700
    );
}
