//! Many idle logged-in connections against the real daemon: 10,000 connections (registered
//! and logged in on two shards, so about half are handed off to their home shard) are held
//! through several keepalive periods with a short keepalive and idle timeout, and every one of
//! them must still answer its Ping at the end. Bounded in time; nothing here asserts on how
//! long anything took.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, DeviceAddr, Frame};

const CONNS: usize = 10_000;
const THREADS: usize = 16;
const KEEPALIVE_MS: u64 = 2_000;
const IDLE_TIMEOUT_MS: u64 = 6_000;
/// Keepalive periods the whole set is held for once every connection is up.
const PERIODS: u64 = 4;
/// Upper bound of the whole test, so a stuck daemon fails it instead of hanging CI.
const BOUND: Duration = Duration::from_secs(1_500);

/// Raises this process's open-file soft limit to its hard limit (the daemon, spawned after,
/// inherits it): 10,000 client sockets here, 10,000 server sockets there.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// Registers and logs in `phone` on one connection (the registry keeps a registered
/// connection pre-authenticated, so Login may follow on it).
fn connect_logged_in(d: &Daemon, phone: u64) -> Raw {
    let key = StaticKeypair::generate();
    let mut r = Raw::connect(d.addr, &key);
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    match r.recv() {
        Frame::RegisterCodeSent(_) => {}
        other => panic!("expected RegisterCodeSent, got {other:?}"),
    }
    let code = first_sms_code(d, phone);
    r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
    match r.recv() {
        Frame::Registered(_) => {}
        other => panic!("expected Registered, got {other:?}"),
    }
    r.send(Frame::Login(frame::Login {
        addr: DeviceAddr {
            user: phone,
            device: 0,
        },
        revision: protocol::PROTOCOL_REVISION,
        capabilities: protocol::capability::MESSAGING,
    }));
    match r.recv_skip_pong() {
        Frame::Welcome(w) => assert_eq!(w.addr.user, phone),
        other => panic!("expected Welcome, got {other:?}"),
    }
    r
}

/// The first code sent to `phone` (each phone registers once here), read without the shared
/// lock of `Daemon::sms_code`, so the workers do not wait on each other.
fn first_sms_code(d: &Daemon, phone: u64) -> u32 {
    let path = d.data_dir.join("sms").join(format!("{phone}.txt"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(&path) {
            if let Some(l) = s.lines().next() {
                return l.trim().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no code for {phone}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ping_all(conns: &mut [Raw], nonce: u64) {
    for c in conns.iter_mut() {
        c.send(Frame::Ping(frame::Ping { nonce }));
    }
}

/// Reads every connection up to the Pong for `nonce` (older Pongs are skipped); returns how
/// many did not answer (closed, or nothing within the bound).
fn await_pongs(conns: &mut [Raw], nonce: u64) -> usize {
    let mut lost = 0;
    for c in conns.iter_mut() {
        loop {
            match c.recv_timeout(Duration::from_secs(60)) {
                Some(Frame::Pong(p)) if p.nonce == nonce => break,
                Some(Frame::Pong(_)) => continue,
                Some(other) => panic!("unexpected frame on an idle connection: {other:?}"),
                None => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    lost
}

/// One worker: opens its share, keeping the ones already open alive while the rest come up,
/// keeps pinging until every worker is up, then answers `PERIODS` more keepalive rounds.
/// Returns connections lost, and the connections (still open).
fn worker(d: &Daemon, first_phone: u64, n: usize, ready: &AtomicUsize) -> (usize, Vec<Raw>) {
    let mut conns = Vec::with_capacity(n);
    let mut last_ping = Instant::now();
    let mut nonce = 1u64 << 40;
    for i in 0..n {
        conns.push(connect_logged_in(d, first_phone + i as u64));
        if last_ping.elapsed() >= Duration::from_millis(KEEPALIVE_MS / 2) {
            nonce += 1;
            ping_all(&mut conns, nonce);
            last_ping = Instant::now();
        }
    }
    ready.fetch_add(1, Ordering::SeqCst);
    let mut lost = 0;
    let mut held = 0u64;
    while held <= PERIODS {
        nonce += 1;
        ping_all(&mut conns, nonce);
        lost += await_pongs(&mut conns, nonce);
        if ready.load(Ordering::SeqCst) == THREADS {
            held += 1;
        }
        std::thread::sleep(Duration::from_millis(KEEPALIVE_MS));
    }
    assert_eq!(conns.len(), n);
    (lost, conns)
}

#[test]
fn ten_thousand_idle_connections_survive_several_keepalive_periods() {
    let limit = raise_nofile();
    assert!(
        limit >= CONNS as u64 + 256,
        "this test needs an open-file limit of at least {} (hard limit is {limit})",
        CONNS + 256
    );
    let keepalive = KEEPALIVE_MS.to_string();
    let idle = IDLE_TIMEOUT_MS.to_string();
    let d = Daemon::start(
        2,
        &[
            ("keepalive-ms", &keepalive),
            ("idle-timeout-ms", &idle),
            ("max-preauth-per-ip", "0"),
            ("register-per-ip-per-hour", "100000000"),
            ("register-per-number-per-hour", "1000"),
        ],
    );
    let started = Instant::now();
    let ready = AtomicUsize::new(0);
    let per = CONNS / THREADS;
    let results: Vec<(usize, Vec<Raw>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (d, ready) = (&d, &ready);
                s.spawn(move || worker(d, 15_550_000_000 + (t * per) as u64, per, ready))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let lost: usize = results.iter().map(|(l, _)| l).sum();
    let open: usize = results.iter().map(|(_, c)| c.len()).sum();
    assert_eq!(open, CONNS);
    assert!(started.elapsed() < BOUND, "the test exceeded its bound");
    assert_eq!(lost, 0, "connections lost during the idle hold");
    let logged_in = d.metric_sum("switchboard_connections_logged_in");
    assert_eq!(logged_in as usize, CONNS, "daemon's logged-in gauge");
    drop(results);
}
