//! Call signalling and TURN credentials against the real daemon: an offer rings all three
//! devices of the callee and the first answer wins; a ring times out into a missed call (push
//! for the offline callee, queued message, `MISSED` to the caller); a callee in a call is busy;
//! the TURN credentials the daemon hands out over the protocol allocate a relay on a real
//! coturn `turnserver`, while an expired credential and one made with another secret are
//! refused by it; and, through the SDK, a sealed call (docs/e2ee.md §17): every ringing device
//! of a three-device callee opens the SDP, the answer and ICE open both ways, a replayed ICE
//! and a fourth party fail with typed errors, and the SDP's marker is nowhere in the daemon's
//! data directory nor in the payloads it relayed.
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

// ----- sealed calls through the SDK -------------------------------------------------------

fn sdk_options() -> client::SessionOptions {
    client::SessionOptions {
        e2ee: true,
        prekey_top_up: 10,
        ..client::SessionOptions::default()
    }
}

/// A registered primary device logged in through the SDK, its prekeys published.
fn sdk_primary(d: &Daemon, dir: &std::path::Path, phone: u64) -> client::Session {
    register_device(d, dir, phone);
    let id = client::Identity::load_or_create(dir).unwrap();
    let mut s = client::Connection::connect(d.addr.to_string().as_str(), &id, Default::default())
        .unwrap()
        .login_with(phone, 0, sdk_options())
        .unwrap();
    s.upload_prekeys(10).unwrap();
    s
}

/// A companion linked to `primary` through the SDK (`request_link`, `approve_link`,
/// `wait_linked`), logged in with its prekeys published.
fn sdk_companion(
    d: &Daemon,
    dir: &std::path::Path,
    primary: &mut client::Session,
) -> client::Session {
    let id = client::Identity::load_or_create(dir).unwrap();
    let mut conn =
        client::Connection::connect(d.addr.to_string().as_str(), &id, Default::default()).unwrap();
    let offer = conn.request_link().unwrap();
    primary.approve_link(&offer.link).unwrap();
    let account = conn.wait_linked(Duration::from_secs(10)).unwrap();
    let mut s = conn
        .login_with(account.user, account.device, sdk_options())
        .unwrap();
    s.upload_prekeys(10).unwrap();
    s
}

/// The next call event of `call_id` and `kind` on `s` (other events are skipped).
fn next_call(s: &mut client::Session, call_id: u64, kind: CallKind) -> client::CallEvent {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            Instant::now() < deadline,
            "no {kind:?} for call {call_id:#x} on +{}.{}",
            s.user(),
            s.device()
        );
        if let Some(client::Event::Call(e)) = s.recv(Some(Duration::from_millis(100))).unwrap() {
            if e.call_id == call_id && e.kind == kind {
                return e;
            }
        }
    }
}

fn opened(e: &client::CallEvent) -> &[u8] {
    e.payload
        .opened()
        .unwrap_or_else(|| panic!("{:?} did not open: {:?}", e.kind, e.payload))
}

/// The SDK seals call payloads end to end: alice rings bob's three devices with one sealed
/// offer that each of them opens; the answering device's SDP and ICE open at alice and hers at
/// it; a replay of a relayed ICE payload and a fourth party's attempt on the offer fail with
/// typed errors; and the SDP markers appear neither in the daemon's data directory nor in the
/// bytes it relayed.
#[test]
fn sdk_sealed_call_opens_on_every_ringing_device_and_never_in_the_server() {
    use client::e2ee::call::CallOffer;
    use client::e2ee::CallError;
    use client::{CallOpenError, CallPayload};

    let d = Daemon::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let phones = phones_across_shards(14_155_550_340, 2, 3);
    let (bob, alice_phone, mallory_phone) = (phones[0], phones[1], phones[2]);
    let mut bobs = vec![sdk_primary(&d, &tmp.path().join("bob0"), bob)];
    for i in 1..3 {
        let dir = tmp.path().join(format!("bob{i}"));
        let c = sdk_companion(&d, &dir, &mut bobs[0]);
        bobs.push(c);
    }
    let mut alice = sdk_primary(&d, &tmp.path().join("alice"), alice_phone);
    let mut mallory = sdk_primary(&d, &tmp.path().join("mallory"), mallory_phone);

    let marker = format!("swb-sdp-marker-{:016x}", rand::random::<u64>());
    let answer_marker = format!("swb-answer-marker-{:016x}", rand::random::<u64>());
    let sdp = format!("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns={marker}\r\nt=0 0\r\n");
    let answer_sdp = format!("v=0\r\no=- 2 2 IN IP4 0.0.0.0\r\ns={answer_marker}\r\nt=0 0\r\n");

    // Too large for one frame with three entries: refused before any ratchet steps; and no
    // step for a call without a key.
    let max = alice.max_call_payload_bytes();
    match alice.call_offer(bob, &vec![b'x'; max - 600]) {
        Err(client::Error::PayloadTooLarge { len, max: m }) => assert!(len > m && m == max),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert!(matches!(
        alice.call_ice(0x5eed, b"candidate"),
        Err(client::Error::Call(CallError::UnknownCall(0x5eed)))
    ));

    let id = alice.call_offer(bob, sdp.as_bytes()).unwrap();
    assert!(alice.has_call_key(id));
    let ringing = next_call(&mut alice, id, CallKind::RINGING);
    assert_eq!(ringing.payload, CallPayload::Empty);
    let mut relayed_offer = Bytes::new();
    for b in bobs.iter_mut() {
        let e = next_call(b, id, CallKind::OFFER);
        assert_eq!(e.from, DeviceAddr::new(alice_phone, 0));
        assert_eq!(opened(&e), sdp.as_bytes(), "device {}", b.device());
        assert!(b.has_call_key(id));
        relayed_offer = e.relayed;
    }
    let offer = CallOffer::decode(&relayed_offer).unwrap();
    let mut devices: Vec<u16> = offer.entries.iter().map(|e| e.device).collect();
    devices.sort_unstable();
    let mut expected: Vec<u16> = bobs.iter().map(|b| b.device()).collect();
    expected.sort_unstable();
    assert_eq!(devices, expected, "one key entry per callee device");

    // A fourth party with the relayed bytes: no entry for a device it is not, and its own
    // pairwise state cannot open a real entry (it has no session with alice).
    assert_eq!(
        offer.entry(7).unwrap_err(),
        CallError::NotForThisDevice { device: 7 }
    );
    let stolen = offer.entry(0).unwrap().to_vec();
    let caller = client::e2ee::Address::new(alice_phone, 0);
    let tried = mallory.with_e2ee(|e| e.decrypt(caller, &stolen)).unwrap();
    assert!(tried.is_err(), "a fourth party opened a callee's key grant");

    // Device 1 answers with its SDP and a candidate; alice opens both.
    let answerer = bobs[1].device();
    bobs[1].call_answer(id, answer_sdp.as_bytes()).unwrap();
    bobs[1]
        .call_ice(id, b"candidate:2 1 udp 1 192.0.2.2 5000 typ host")
        .unwrap();
    let ans = next_call(&mut alice, id, CallKind::ANSWER);
    assert_eq!(ans.from, DeviceAddr::new(bob, answerer));
    assert_eq!(opened(&ans), answer_sdp.as_bytes());
    let ice = next_call(&mut alice, id, CallKind::ICE);
    assert_eq!(opened(&ice), b"candidate:2 1 udp 1 192.0.2.2 5000 typ host");
    for i in [0, 2] {
        next_call(&mut bobs[i], id, CallKind::ANSWERED_ELSEWHERE);
        assert!(
            !bobs[i].has_call_key(id),
            "key dropped when answered elsewhere"
        );
    }

    // Alice's candidate opens at the answering device.
    alice
        .call_ice(id, b"candidate:1 1 udp 1 192.0.2.1 5000 typ host")
        .unwrap();
    let ice = next_call(&mut bobs[1], id, CallKind::ICE);
    assert_eq!(opened(&ice), b"candidate:1 1 udp 1 192.0.2.1 5000 typ host");
    // The same sealed bytes again (alice's raw resend): refused as a replay.
    alice
        .call_signal(id, bob, CallKind::ICE, ice.relayed.clone())
        .unwrap();
    let replayed = next_call(&mut bobs[1], id, CallKind::ICE);
    assert_eq!(
        replayed.payload,
        CallPayload::Failed(CallOpenError::Call(CallError::Replayed { counter: 1 }))
    );
    // A tampered byte: refused, and the call goes on.
    // (Byte 8 is the counter's lowest: 1 becomes 5, past the window's check, so the AEAD
    // is what refuses it.)
    let mut tampered = ice.relayed.to_vec();
    tampered[8] ^= 4;
    alice
        .call_signal(id, bob, CallKind::ICE, Bytes::from(tampered))
        .unwrap();
    let bad = next_call(&mut bobs[1], id, CallKind::ICE);
    assert_eq!(
        bad.payload,
        CallPayload::Failed(CallOpenError::Call(CallError::DecryptFailed))
    );

    // Alice hangs up (sealed); both drop the key.
    alice.call_end(id, CallKind::HANGUP).unwrap();
    assert!(!alice.has_call_key(id));
    let hangup = next_call(&mut bobs[1], id, CallKind::HANGUP);
    assert_eq!(opened(&hangup), b"");
    assert!(!bobs[1].has_call_key(id));

    // The server never saw the SDPs: not in what it relayed, not in its data directory.
    for (what, bytes) in [
        ("offer", &relayed_offer),
        ("answer", &ans.relayed),
        ("ice", &ice.relayed),
    ] {
        assert!(
            !contains_bytes(bytes, marker.as_bytes()),
            "{what} relayed the SDP"
        );
        assert!(
            !contains_bytes(bytes, answer_marker.as_bytes()),
            "{what} relayed the answer"
        );
        assert!(
            !contains_bytes(bytes, b"candidate:"),
            "{what} relayed a candidate"
        );
    }
    let all = files_under(&d.data_dir);
    assert!(!all.is_empty());
    for f in all {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !contains_bytes(&bytes, marker.as_bytes())
                && !contains_bytes(&bytes, answer_marker.as_bytes()),
            "an SDP marker is in {}",
            f.display()
        );
    }
    let metrics = d.metrics();
    assert!(!metrics.contains(&marker) && !metrics.contains(&answer_marker));
}
