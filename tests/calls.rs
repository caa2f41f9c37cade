//! Call signalling and TURN credentials against the real daemon: an offer rings all three
//! devices of the callee and the first answer wins; a ring times out into a missed call (push
//! for the offline callee, queued message, `MISSED` to the caller); a callee in a call is busy;
//! and the TURN credentials the daemon hands out over the protocol allocate a relay on a real
//! coturn `turnserver`, while an expired credential and one made with another secret are
//! refused by it.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use protocol::frame::{self, CallSignal, TurnRequest};
use protocol::noise::StaticKeypair;
use protocol::presence::CallKind;
use protocol::{capability, DeviceAddr, Frame, MsgType};

const CALL_CAPS: u64 = MD_CAPS | capability::PRESENCE | capability::CALLS;

fn signal(call_id: u64, peer: u64, kind: CallKind) -> Frame {
    Frame::CallSignal(CallSignal {
        call_id,
        peer,
        kind,
        payload: Bytes::from_static(b"sealed sdp"),
    })
}

fn is_event(f: &Frame, call_id: u64, kind: CallKind) -> bool {
    matches!(f, Frame::CallEvent(e) if e.call_id == call_id && e.kind == kind)
}

/// Logs `dev` in again announcing `CALL_CAPS` (replacing its connection).
fn relogin(d: &Daemon, dev: Dev) -> Dev {
    let (raw, first) = login_as(d, dev.user, dev.device, &dev.key, CALL_CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    Dev {
        raw,
        pending: Default::default(),
        ..dev
    }
}

fn caller(d: &Daemon, phone: u64) -> Dev {
    let key = StaticKeypair::generate();
    register(d, phone, &key);
    let identity = client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng);
    let (raw, first) = login_as(d, phone, 0, &key, CALL_CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    Dev {
        user: phone,
        device: 0,
        key,
        identity,
        raw,
        pending: Default::default(),
        one_time: Vec::new(),
    }
}

#[test]
fn a_ring_to_three_devices_is_answered_on_one() {
    let d = Daemon::start(2, &[]);
    let bob = 14_155_550_301;
    let mut primary = md_primary(&d, bob);
    let c1 = md_link(&d, &mut primary);
    let c2 = md_link(&d, &mut primary);
    let mut devs: Vec<Dev> = vec![primary, c1, c2]
        .into_iter()
        .map(|x| relogin(&d, x))
        .collect();
    let mut alice = caller(&d, 14_155_550_302);
    let id = 0xA1;
    alice.raw.send(signal(id, bob, CallKind::OFFER));
    alice.expect("RINGING", |f| is_event(f, id, CallKind::RINGING));
    for dev in devs.iter_mut() {
        match dev.expect("OFFER", |f| is_event(f, id, CallKind::OFFER)) {
            Frame::CallEvent(e) => {
                assert_eq!(e.from, DeviceAddr::new(alice.user, 0));
                assert_eq!(e.payload, Bytes::from_static(b"sealed sdp"));
            }
            other => panic!("{other:?}"),
        }
    }
    devs[1].raw.send(signal(id, alice.user, CallKind::ANSWER));
    match alice.expect("ANSWER", |f| is_event(f, id, CallKind::ANSWER)) {
        Frame::CallEvent(e) => assert_eq!(e.from, DeviceAddr::new(bob, devs[1].device)),
        other => panic!("{other:?}"),
    }
    for i in [0, 2] {
        devs[i].expect("ANSWERED_ELSEWHERE", |f| {
            is_event(f, id, CallKind::ANSWERED_ELSEWHERE)
        });
    }
    // A late answer from another device: answered elsewhere.
    devs[2].raw.send(signal(id, alice.user, CallKind::ANSWER));
    devs[2].expect("late ANSWERED_ELSEWHERE", |f| {
        is_event(f, id, CallKind::ANSWERED_ELSEWHERE)
    });
    alice.raw.send(signal(id, bob, CallKind::ICE));
    devs[1].expect("ICE", |f| is_event(f, id, CallKind::ICE));
    alice.raw.send(signal(id, bob, CallKind::HANGUP));
    devs[1].expect("HANGUP", |f| is_event(f, id, CallKind::HANGUP));
    wait_metric(&d, "switchboard_call_answered_total", 1.0);
}

#[test]
fn ring_timeout_missed_call_push_and_busy() {
    let d = Daemon::start(2, &[("call-ring-timeout-ms", "1500"), ("tick-ms", "200")]);
    let bob = 14_155_550_311;
    let bob_key = StaticKeypair::generate();
    register(&d, bob, &bob_key);
    let mut alice = caller(&d, 14_155_550_312);
    let pushes_before = d.metric_sum("switchboard_pushes_total");
    let id = 0xB1;
    alice.raw.send(signal(id, bob, CallKind::OFFER));
    alice.expect("RINGING", |f| is_event(f, id, CallKind::RINGING));
    alice.expect("MISSED", |f| is_event(f, id, CallKind::MISSED));
    // One push for the ring, one for the missed call.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.metric_sum("switchboard_pushes_total") < pushes_before + 2.0 {
        assert!(
            Instant::now() < deadline,
            "no pushes for the offline callee"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_metric(&d, "switchboard_call_missed_total", 1.0);
    // The missed call waits for the callee.
    let (mut raw, first) = login_as(&d, bob, 0, &bob_key, CALL_CAPS);
    assert!(matches!(first, Frame::Welcome(_)));
    let deliver = loop {
        match raw.recv_timeout(Duration::from_secs(10)) {
            Some(Frame::Deliver(dl)) => break dl,
            Some(_) => continue,
            None => panic!("no missed call delivered"),
        }
    };
    assert_eq!(deliver.message.msg_type, MsgType::MISSED_CALL);
    assert_eq!(deliver.message.client_msg_id, id);
    assert_eq!(deliver.message.from, DeviceAddr::new(alice.user, 0));

    // Busy: bob answers a call from alice; carol calling bob hears BUSY.
    let mut bob_dev = Dev {
        user: bob,
        device: 0,
        key: bob_key,
        identity: client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng),
        raw,
        pending: Default::default(),
        one_time: Vec::new(),
    };
    let id2 = 0xB2;
    alice.raw.send(signal(id2, bob, CallKind::OFFER));
    bob_dev.expect("OFFER", |f| is_event(f, id2, CallKind::OFFER));
    bob_dev.raw.send(signal(id2, alice.user, CallKind::ANSWER));
    alice.expect("ANSWER", |f| is_event(f, id2, CallKind::ANSWER));
    let mut carol = caller(&d, 14_155_550_313);
    carol.raw.send(signal(0xC3, bob, CallKind::OFFER));
    carol.expect("BUSY", |f| is_event(f, 0xC3, CallKind::BUSY));
    wait_metric(&d, "switchboard_call_busy_total", 1.0);
}

/// A `turnserver` on loopback, killed when dropped (also when the test fails).
struct Coturn {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Coturn {
    fn start(secret: &str) -> Option<Coturn> {
        if Command::new("turnserver")
            .arg("--version")
            .output()
            .is_err()
        {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let relay_min = free_port();
        let log = dir.path().join("turn.log");
        let child = Command::new("turnserver")
            .args([
                "-n",
                "-v",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
            ])
            .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", &relay_min.to_string()])
            .args(["--max-port", &(relay_min + 20).to_string()])
            .args(["--use-auth-secret", "--static-auth-secret", secret])
            .args(["--realm", "switchboard", "--allow-loopback-peers"])
            .arg("--pidfile")
            .arg(dir.path().join("turn.pid"))
            .arg("--userdb")
            .arg(dir.path().join("turndb"))
            .arg("--log-file")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnserver");
        let mut t = Coturn {
            child,
            port,
            log,
            _dir: dir,
        };
        // Ready when the UDP port is taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "turnserver did not start");
            assert!(t.child.try_wait().unwrap().is_none(), "turnserver exited");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(t)
    }

    /// Runs `turnutils_uclient` with these credentials (bounded to 5 s); whether coturn
    /// completed the allocation.
    fn allocates(&self, username: &str, password: &str) -> bool {
        let mut c = Command::new("turnutils_uclient")
            .args(["-t", "-n", "1", "-m", "1", "-u", username, "-w", password])
            .args(["-p", &self.port.to_string(), "-e", "127.0.0.1", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnutils_uclient");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let out = c.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        !text.contains("Cannot complete Allocation") && text.contains("tot_send_msgs=")
    }

    fn log_text(&self) -> String {
        // coturn may append a date to the log file name: read every file next to it.
        let dir = self.log.parent().unwrap();
        let mut s = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("turn") {
                s.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        s
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn turn_creds(dev: &mut Dev, request_id: u64) -> frame::TurnCredentials {
    dev.raw.send(Frame::TurnRequest(TurnRequest { request_id }));
    match dev.expect("TurnCredentials", |f| {
        matches!(f, Frame::TurnCredentials(t) if t.request_id == request_id)
            || matches!(f, Frame::Error(e) if e.ref_id == request_id)
    }) {
        Frame::TurnCredentials(t) => t,
        other => panic!("expected TurnCredentials, got {other:?}"),
    }
}

#[test]
fn turn_credentials_allocate_on_a_real_coturn() {
    let secret = "switchboard-test-secret";
    let Some(turn) = Coturn::start(secret) else {
        // .ci/run installs coturn; a developer machine without it says so loudly.
        panic!("turnserver not installed (apt-get install coturn; .ci/run does it)");
    };
    let uri = format!("turn:127.0.0.1:{}", turn.port);
    // turn_uris is a list: set it through a config file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("turn_secret = \"{secret}\"\nturn_uris = [\"{uri}\"]\nturn_ttl_s = 600\n"),
    )
    .unwrap();
    let d = Daemon::start(1, &[("config", cfg.to_str().unwrap())]);
    let mut alice = caller(&d, 14_155_550_321);
    let t = turn_creds(&mut alice, 1);
    assert_eq!(t.ttl_s, 600);
    assert_eq!(t.auth.uris, vec![uri]);
    assert!(t.auth.username.ends_with(&format!(":{}", alice.user)));
    assert!(
        turn.allocates(&t.auth.username, &t.auth.password),
        "coturn refused the daemon's credentials:\n{}",
        turn.log_text()
    );

    // A credential made with another secret is refused.
    let forged = shards::turn_password("not-the-secret", &t.auth.username);
    assert!(!turn.allocates(&t.auth.username, &forged));

    // An expired credential (a daemon with a 1 s TTL, used after it ran out) is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = dir2.path().join("c.toml");
    std::fs::write(
        &cfg2,
        format!("turn_secret = \"{secret}\"\nturn_ttl_s = 1\n"),
    )
    .unwrap();
    let d2 = Daemon::start(1, &[("config", cfg2.to_str().unwrap())]);
    let mut bob = caller(&d2, 14_155_550_322);
    let short = turn_creds(&mut bob, 2);
    std::thread::sleep(Duration::from_millis(2_100));
    assert!(!turn.allocates(&short.auth.username, &short.auth.password));
}

/// Waits (at most 10 s) until the metric `name` sums to `want` (metrics follow the shards'
/// counters at their next tick).
fn wait_metric(d: &Daemon, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = d.metric_sum(name);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {got}, want {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
