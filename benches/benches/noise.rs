//! Noise: transport seal / open of a `Send` frame with a 100-byte payload (AES-256-GCM, in
//! place), and the full `XX_25519_AESGCM_SHA256` handshake, both sides.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use protocol::noise::{ClientHandshake, ServerHandshake, StaticKeypair, Transport};
use protocol::{frame, Address, Frame, MsgType};

fn pair() -> (Transport, Transport) {
    let c = StaticKeypair::from_private([1u8; 32]);
    let s = StaticKeypair::from_private([2u8; 32]);
    let (c1, m1) = ClientHandshake::start(&c).expect("msg1");
    let (s1, m2) = ServerHandshake::new(&s)
        .expect("server")
        .read_hello(&m1)
        .expect("msg2");
    let (ct, m3, _) = c1.read_hello(&m2).expect("msg3");
    let (st, _) = s1.read_finish(&m3).expect("finish");
    (ct, st)
}

fn transport(c: &mut Criterion) {
    let f = Frame::Send(frame::Send {
        client_msg_id: 1,
        to: Address::device(14_155_550_100, 0),
        msg_type: MsgType::TEXT,
        payload: common::payload(),
    });
    let mut g = c.benchmark_group("noise_transport");
    g.throughput(Throughput::Elements(1));
    let (mut client, _) = pair();
    let mut out = Vec::with_capacity(256);
    g.bench_function("seal_frame_send_100B", |b| {
        b.iter(|| {
            out.clear();
            client.seal_frame(black_box(&f), &mut out).expect("seal");
            black_box(out.len())
        })
    });
    // Opening needs records sealed with consecutive nonces: seal a batch (untimed), then open
    // it (timed), in batches of up to 1024.
    g.bench_function("open_record_send_100B", |b| {
        b.iter_custom(|iters| {
            let (mut c, mut s) = pair();
            let mut recs: Vec<Vec<u8>> = Vec::with_capacity(1024);
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let m = left.min(1024);
                recs.clear();
                for _ in 0..m {
                    let mut r = Vec::with_capacity(160);
                    c.seal_frame(&f, &mut r).expect("seal");
                    recs.push(r);
                }
                let t = Instant::now();
                for r in recs.iter_mut() {
                    let n = s.open_record(&mut r[2..]).expect("open");
                    black_box(n);
                }
                total += t.elapsed();
                left -= m;
            }
            total
        })
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("noise_handshake");
    g.throughput(Throughput::Elements(1));
    let client = StaticKeypair::generate();
    let server = StaticKeypair::generate();
    g.bench_function("xx_both_sides", |b| {
        b.iter(|| {
            let (c1, m1) = ClientHandshake::start(&client).expect("msg1");
            let (s1, m2) = ServerHandshake::new(&server)
                .expect("server")
                .read_hello(&m1)
                .expect("msg2");
            let (ct, m3, _) = c1.read_hello(&m2).expect("msg3");
            let (st, _) = s1.read_finish(&m3).expect("finish");
            black_box((ct, st))
        })
    });
    // Each side's share, timed separately over full handshakes (the other side's work runs
    // untimed between the timed steps).
    for side in ["client", "server"] {
        g.bench_function(format!("xx_{side}_side"), |b| {
            b.iter_custom(|iters| {
                let mut client_t = Duration::ZERO;
                let mut server_t = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let (c1, m1) = ClientHandshake::start(&client).expect("msg1");
                    client_t += t.elapsed();
                    let t = Instant::now();
                    let (s1, m2) = ServerHandshake::new(&server)
                        .expect("server")
                        .read_hello(&m1)
                        .expect("msg2");
                    server_t += t.elapsed();
                    let t = Instant::now();
                    let (ct, m3, _) = c1.read_hello(&m2).expect("msg3");
                    client_t += t.elapsed();
                    let t = Instant::now();
                    let (st, _) = s1.read_finish(&m3).expect("finish");
                    server_t += t.elapsed();
                    black_box((ct, st));
                }
                if side == "client" {
                    client_t
                } else {
                    server_t
                }
            })
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = common::quick(); targets = transport, handshake }
criterion_main!(benches);
