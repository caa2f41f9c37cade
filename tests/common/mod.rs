//! Test harness shared by the end-to-end tests: starts the real `switchboard` binary on
//! loopback with its own data directory and speaks the real protocol to it over TCP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::noise::{ClientHandshake, StaticKeypair, Transport};
use protocol::wire::{self, Check};
use protocol::{frame, Address, DeviceAddr, Frame, MsgType, PREAMBLE};

/// A loopback port no other daemon of this test process was given, below the kernel's
/// ephemeral range (so `bind(0)` and outgoing connections never land on it).
///
/// Why not `bind(0)` and release: a daemon that is killed and restarts reuses its ports, and in
/// between the kernel may hand the released port to another test running in parallel ("Address
/// already in use" at the restart). Ports come from a per-process counter instead, starting at a
/// pid-dependent base so test binaries run one after the other do not collide with a daemon
/// that is still dying; each is checked bindable before it is handed out.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 30;
    let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    /// Codes already returned by `sms_code`, per phone.
    sms_seen: std::sync::Mutex<std::collections::HashMap<u64, usize>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts a daemon with `shards` shards and extra `--flag value` pairs.
    pub fn start(shards: usize, extra: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut d = Daemon::start_in(&data_dir, shards, extra);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon on an existing data directory.
    pub fn start_in(data_dir: &Path, shards: usize, extra: &[(&str, &str)]) -> Daemon {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--shards".into(),
            shards.to_string(),
            "--pin-cpus".into(),
            "false".into(),
            "--log-filter".into(),
            std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        ];
        for (k, v) in extra {
            args.push(format!("--{k}"));
            args.push(v.to_string());
        }
        let mut d = Daemon {
            child: None,
            addr,
            admin,
            data_dir: data_dir.to_owned(),
            args,
            sms_seen: Default::default(),
            _tmp: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(&self.args)
            .arg("--listen-addr")
            .arg(self.addr.to_string())
            .arg("--admin-addr")
            .arg(self.admin.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn switchboard");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the client port accepts connections.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("switchboard exited during start-up: {status}");
            }
            // Ready means a full Noise handshake and a Ping answered, not just a TCP accept.
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
                && probe(self.addr)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("switchboard did not start listening on {}", self.addr);
    }

    /// SIGKILL and reap, then wait until the port refuses connections: the kernel tears a dead
    /// process's io_uring instance down asynchronously, and until the accept it had in flight is
    /// cancelled the old listening socket still completes handshakes (and later resets them).
    /// With SO_REUSEPORT a new daemon would share the port with that ghost.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.wait_listeners_gone();
    }

    /// Waits until both ports refuse connections: the kernel tears a dead process's io_uring
    /// instance down asynchronously, and until then its listeners may still accept.
    fn wait_listeners_gone(&self) {
        for addr in [self.addr, self.admin] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "the stopped daemon's listener on {addr} did not go away"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Restarts on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill or stop first");
        self.spawn();
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.wait_listeners_gone();
                return s;
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("switchboard did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The metrics page.
    pub fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Sum of a metric over shards (lines `name{...} value`).
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The next registration code the file SMS provider writes for `phone` after the ones this
    /// helper already returned. The provider appends on its own thread, so the file may not yet
    /// hold the code of a request whose `RegisterCodeSent` just arrived: reading "the last line"
    /// could return the previous code.
    pub fn sms_code(&self, phone: u64) -> u32 {
        let path = self.data_dir.join("sms").join(format!("{phone}.txt"));
        let mut seen = self.sms_seen.lock().unwrap();
        let want = seen.get(&phone).copied().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::fs::read_to_string(&path) {
                if let Some(l) = s.lines().nth(want) {
                    seen.insert(phone, want + 1);
                    return l.trim().parse().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no code number {want} for {phone}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs the daemon on `data_dir` expecting it to refuse to start: waits (at most 60 s) for it to
/// exit and returns its exit status and standard error. Panics if it is still running then.
pub fn run_expecting_exit(
    data_dir: &Path,
    shards: usize,
    extra: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--shards", &shards.to_string(), "--pin-cpus", "false"])
        .args(["--log-filter", "warn"])
        .arg("--listen-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()));
    for (k, v) in extra {
        cmd.arg(format!("--{k}")).arg(v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard was expected to refuse to start but ran for 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn probe(addr: SocketAddr) -> bool {
    std::panic::catch_unwind(|| {
        let mut r = Raw::connect(addr, &StaticKeypair::generate());
        r.send(Frame::Ping(frame::Ping { nonce: 7 }));
        r.recv_timeout(Duration::from_secs(5)) == Some(Frame::Pong(frame::Pong { nonce: 7 }))
    })
    .unwrap_or(false)
}

/// A minimal protocol client written against the `protocol` crate alone, so tests control
/// every byte.
pub struct Raw {
    pub stream: TcpStream,
    pub t: Transport,
    pub key: StaticKeypair,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and completes the handshake with `key`.
    pub fn connect(addr: SocketAddr, key: &StaticKeypair) -> Raw {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (state, msg1) = ClientHandshake::start(key).unwrap();
        let mut out = PREAMBLE.to_vec();
        wire::put_len(&mut out, msg1.len());
        out.extend_from_slice(&msg1);
        stream.write_all(&out).unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).unwrap();
        let mut msg2 = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut msg2).unwrap();
        let (t, msg3, _server) = state.read_hello(&msg2).unwrap();
        let mut out = Vec::new();
        wire::put_len(&mut out, msg3.len());
        out.extend_from_slice(&msg3);
        stream.write_all(&out).unwrap();
        Raw {
            stream,
            t,
            key: key.clone(),
            buf: Vec::new(),
        }
    }

    /// Seals and sends frames in one write.
    pub fn send_all(&mut self, frames: &[Frame]) {
        let mut out = Vec::new();
        for f in frames {
            self.t.seal_frame(f, &mut out).unwrap();
        }
        self.stream.write_all(&out).unwrap();
    }

    /// Seals and sends one frame.
    pub fn send(&mut self, f: Frame) {
        self.send_all(&[f]);
    }

    /// Next frame, or None on EOF/timeout.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Check::Complete { total }) = wire::check(&self.buf, 17, 65535) {
                let mut body = self.buf[2..total].to_vec();
                self.buf.drain(..total);
                let n = self
                    .t
                    .open_record(&mut body)
                    .expect("server record authenticates");
                return Some(
                    Frame::decode(Bytes::copy_from_slice(&body[..n]))
                        .expect("server frame decodes"),
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// Next frame; panics after 10 s.
    pub fn recv(&mut self) -> Frame {
        self.recv_timeout(Duration::from_secs(10))
            .expect("a frame within 10 s")
    }

    /// Next frame that is not a Pong.
    pub fn recv_skip_pong(&mut self) -> Frame {
        loop {
            match self.recv() {
                Frame::Pong { .. } => continue,
                f => return f,
            }
        }
    }

    /// True if the server closed the connection (EOF) within `timeout`, skipping frames.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut tmp = [0u8; 4096];
            self.stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// A registered, logged-in device.
pub struct User {
    pub phone: u64,
    pub raw: Raw,
}

/// Registers `phone` with a fresh key and logs in.
pub fn register_and_login(d: &Daemon, phone: u64) -> User {
    let key = StaticKeypair::generate();
    register(d, phone, &key);
    login(d, phone, &key)
}

/// Registers `phone` with `key` (on its own connection).
pub fn register(d: &Daemon, phone: u64, key: &StaticKeypair) {
    let mut r = Raw::connect(d.addr, key);
    r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
    match r.recv() {
        Frame::RegisterCodeSent(frame::RegisterCodeSent { phone: p, .. }) => assert_eq!(p, phone),
        other => panic!("expected RegisterCodeSent, got {other:?}"),
    }
    let code = d.sms_code(phone);
    r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
    match r.recv() {
        Frame::Registered(frame::Registered {
            addr: DeviceAddr { user, device },
        }) => assert_eq!((user, device), (phone, 0)),
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// Logs in with `key` and waits for Welcome.
pub fn login(d: &Daemon, phone: u64, key: &StaticKeypair) -> User {
    let mut raw = Raw::connect(d.addr, key);
    raw.send(Frame::Login(frame::Login {
        addr: DeviceAddr {
            user: phone,
            device: 0,
        },
        revision: protocol::PROTOCOL_REVISION,
        capabilities: protocol::capability::MESSAGING,
    }));
    match raw.recv() {
        Frame::Welcome(frame::Welcome {
            addr: DeviceAddr { user, .. },
            ..
        }) => assert_eq!(user, phone),
        other => panic!("expected Welcome, got {other:?}"),
    }
    User { phone, raw }
}

/// A Send frame to `to`.
pub fn send_frame(to: u64, id: u64, payload: &[u8]) -> Frame {
    Frame::Send(frame::Send {
        client_msg_id: id,
        to: Address::device(to, 0),
        msg_type: MsgType::TEXT,
        payload: Bytes::copy_from_slice(payload),
    })
}

// ----- multi-device ----------------------------------------------------------------------

/// The capabilities a multi-device client announces.
pub const MD_CAPS: u64 = protocol::capability::MESSAGING
    | protocol::capability::PREKEYS
    | protocol::capability::MULTI_DEVICE;

/// Request ids unique within the test process.
pub fn next_request_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Seals arbitrary plaintext bytes as one record and sends it.
pub fn send_plaintext(r: &mut Raw, plain: &[u8]) {
    let mut out = Vec::new();
    wire::put_len(&mut out, plain.len() + 16);
    out.extend_from_slice(plain);
    r.t.tx.seal_in_place(&mut out, 2).unwrap();
    r.stream.write_all(&out).unwrap();
}

/// Connects with `key` and sends `Login` for `(user, device)`; returns the connection and the
/// first frame the server answered with (a `Welcome`, or the `Error` refusing the login).
pub fn login_as(
    d: &Daemon,
    user: u64,
    device: u16,
    key: &StaticKeypair,
    capabilities: u64,
) -> (Raw, Frame) {
    let mut raw = Raw::connect(d.addr, key);
    raw.send(Frame::Login(frame::Login {
        addr: DeviceAddr { user, device },
        revision: protocol::PROTOCOL_REVISION,
        capabilities,
    }));
    let first = raw.recv_skip_pong();
    (raw, first)
}

/// A frame received but not yet claimed by a test (see [`Dev::expect`]).
fn is_noise(f: &Frame) -> bool {
    matches!(f, Frame::Pong(_))
}

/// A logged-in device of a multi-device account: its keys, its identity and the frames it
/// received that the test did not look at yet (so frames of unrelated kinds, such as a
/// `DeviceList { CHANGED }` or a `PrekeyStatus`, may arrive in any order around the ones
/// a test waits for).
pub struct Dev {
    pub user: u64,
    pub device: u16,
    pub key: StaticKeypair,
    pub identity: client::e2ee::IdentityKeyPair,
    pub raw: Raw,
    pub pending: std::collections::VecDeque<Frame>,
    /// The one-time prekeys this device uploaded (public halves).
    pub one_time: Vec<frame::OneTimePrekey>,
}

impl Dev {
    /// The device's address.
    pub fn addr(&self) -> DeviceAddr {
        DeviceAddr {
            user: self.user,
            device: self.device,
        }
    }

    /// The first frame (pending ones first) for which `pred` holds, leaving the others
    /// pending; None after `timeout` or when the connection closed.
    pub fn find(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Frame) -> bool,
    ) -> Option<Frame> {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let f = self.raw.recv_timeout(left)?;
            if is_noise(&f) {
                continue;
            }
            if pred(&f) {
                return Some(f);
            }
            self.pending.push_back(f);
        }
    }

    /// Like [`Dev::find`] with 10 s; panics naming `what` (and what did arrive) otherwise.
    pub fn expect(&mut self, what: &str, pred: impl FnMut(&Frame) -> bool) -> Frame {
        match self.find(Duration::from_secs(10), pred) {
            Some(f) => f,
            None => panic!(
                "device ({}, {}): expected {what}, got only {:?}",
                self.user, self.device, self.pending
            ),
        }
    }

    /// Everything that arrives within `window` (pending frames included), Pongs dropped.
    pub fn collect(&mut self, window: Duration) -> Vec<Frame> {
        let mut out: Vec<Frame> = self.pending.drain(..).collect();
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            match self.raw.recv_timeout(left) {
                Some(f) if is_noise(&f) => {}
                Some(f) => out.push(f),
                None => return out,
            }
        }
    }

    /// Asserts no `Deliver` nor `Receipt` arrives within `window` (others are kept pending).
    pub fn assert_no_mail(&mut self, window: Duration, why: &str) {
        let got = self.find(window, |f| {
            matches!(f, Frame::Deliver(_) | Frame::Receipt(_))
        });
        assert!(
            got.is_none(),
            "device ({}, {}): {why}: got {got:?}",
            self.user,
            self.device
        );
    }

    /// Waits for `Error { code, ref_id }` (non-fatal errors leave the connection open).
    pub fn expect_error(&mut self, code: protocol::ErrorCode, ref_id: u64) -> frame::Error {
        let what = format!("Error {{ {code:?}, ref_id: {ref_id} }}");
        match self.expect(&what, |f| {
            matches!(f, Frame::Error(e) if e.ref_id == ref_id)
                || matches!(f, Frame::Error(e) if protocol::ErrorCode::from_u16(e.code).is_some_and(|c| c.is_fatal()))
        }) {
            Frame::Error(e) => {
                assert_eq!(
                    e.code, code as u16,
                    "device ({}, {}): expected {what}, got {e:?}",
                    self.user, self.device
                );
                assert_eq!(e.ref_id, ref_id, "{e:?}");
                e
            }
            _ => unreachable!(),
        }
    }

    /// Waits for the `ServerAck` of `id`; returns its time.
    pub fn expect_ack(&mut self, id: u64) -> u64 {
        let what = format!("ServerAck {id}");
        match self.expect(&what, |f| {
            matches!(f, Frame::ServerAck(a) if a.client_msg_id == id)
                || matches!(f, Frame::Error(e) if e.ref_id == id)
        }) {
            Frame::ServerAck(a) => a.server_ts_ms,
            other => panic!(
                "device ({}, {}): expected {what}, got {other:?}",
                self.user, self.device
            ),
        }
    }

    /// Waits for the `Deliver` of message `id` from `from`; returns (seq, payload).
    pub fn expect_deliver(&mut self, from: DeviceAddr, id: u64) -> (u64, Bytes) {
        let what = format!("Deliver {id} from {from:?}");
        match self.expect(&what, |f| {
            matches!(f, Frame::Deliver(d) if d.message.client_msg_id == id && d.message.from == from)
        }) {
            Frame::Deliver(d) => (d.seq, d.message.payload),
            _ => unreachable!(),
        }
    }

    /// Waits for a `Receipt` of `kind` for message `id` from `from`; returns its seq.
    pub fn expect_receipt(&mut self, from: DeviceAddr, id: u64, kind: frame::ReceiptKind) -> u64 {
        let what = format!("{kind:?} receipt {id} from {from:?}");
        match self.expect(&what, |f| {
            matches!(f, Frame::Receipt(r) if r.receipt.client_msg_id == id
                && r.receipt.from == from && r.receipt.kind == kind)
        }) {
            Frame::Receipt(r) => r.seq,
            _ => unreachable!(),
        }
    }

    /// Acknowledges `seqs`.
    pub fn ack(&mut self, seqs: &[u64]) {
        self.raw.send(Frame::Ack(frame::Ack {
            seqs: seqs.to_vec(),
        }));
    }

    /// Fetches `user`'s device list (FETCHED).
    pub fn fetch_list(&mut self, user: u64) -> frame::DeviceList {
        let request_id = next_request_id();
        self.raw
            .send(Frame::DeviceListFetch(frame::DeviceListFetch {
                request_id,
                user,
            }));
        match self.expect("DeviceList FETCHED", |f| {
            matches!(f, Frame::DeviceList(l) if l.request_id == request_id)
                || matches!(f, Frame::Error(e) if e.ref_id == request_id)
        }) {
            Frame::DeviceList(l) => {
                assert_eq!(l.reason, frame::DeviceListReason::FETCHED);
                assert_eq!(l.user, user);
                l
            }
            other => panic!("DeviceListFetch {user}: {other:?}"),
        }
    }

    /// Waits for a `DeviceList { CHANGED }` of `user` whose device set is `devices`.
    pub fn expect_changed(&mut self, user: u64, devices: &[u16]) -> frame::DeviceList {
        let what = format!("DeviceList CHANGED of {user} with {devices:?}");
        match self.expect(&what, |f| {
            matches!(f, Frame::DeviceList(l) if l.reason == frame::DeviceListReason::CHANGED
                && l.user == user && l.request_id == 0
                && l.devices.iter().map(|e| e.device).eq(devices.iter().copied()))
        }) {
            Frame::DeviceList(l) => l,
            _ => unreachable!(),
        }
    }

    /// Uploads this device's prekeys with `identity` (normally its own) and `n` one-time
    /// prekeys; returns the keys sent. Does not wait for the answer.
    pub fn send_prekeys(
        &mut self,
        identity: &client::e2ee::IdentityKeyPair,
        n: usize,
    ) -> (frame::DeviceKeys, Vec<frame::OneTimePrekey>) {
        use client::e2ee::keys::{PreKeyStore, SignedPreKey};
        let mut rng = rand::rngs::OsRng;
        let spk = SignedPreKey::generate(1, identity, &mut rng).public();
        let keys = frame::DeviceKeys {
            identity_dh: identity.public().dh,
            identity_sign: identity.public().sign,
            signed_prekey_id: spk.id,
            signed_prekey: spk.public,
            signed_prekey_sig: spk.signature,
        };
        let one_time: Vec<frame::OneTimePrekey> = PreKeyStore::new()
            .generate_one_time_prekeys(n, &mut rng)
            .unwrap()
            .into_iter()
            .map(|k| frame::OneTimePrekey {
                id: k.id,
                key: k.public,
            })
            .collect();
        self.raw.send(Frame::PrekeyUpload(frame::PrekeyUpload {
            keys: Box::new(keys),
            one_time: one_time.clone(),
        }));
        (keys, one_time)
    }

    /// Publishes this device's own identity and `n` one-time prekeys; waits until stored.
    pub fn publish_prekeys(&mut self, n: usize) -> frame::DeviceKeys {
        let identity = self.identity.clone();
        let (keys, one_time) = self.send_prekeys(&identity, n);
        self.expect("PrekeyStatus UPLOADED", |f| {
            matches!(f, Frame::PrekeyStatus(s) if s.reason == frame::PrekeyStatusReason::UPLOADED)
        });
        self.one_time = one_time;
        keys
    }

    /// The `LinkApprove` this (primary) device sends for `n`, signed with its identity.
    pub fn approve_frame(&self, request_id: u64, n: &Linking) -> Frame {
        let public = n.identity.public();
        Frame::LinkApprove(frame::LinkApprove {
            request_id,
            code: n.code,
            keys: Box::new(frame::LinkKeys {
                static_key: n.raw.key.public,
                identity_dh: public.dh,
                identity_sign: public.sign,
                signature: client::e2ee::keys::sign_device(
                    &self.identity,
                    self.user,
                    &public.dh,
                    &public.sign,
                ),
            }),
        })
    }
}

/// Registers `phone`, logs its primary in with [`MD_CAPS`] and publishes its prekeys.
pub fn md_primary(d: &Daemon, phone: u64) -> Dev {
    let key = StaticKeypair::generate();
    register(d, phone, &key);
    let identity = client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng);
    let mut dev = md_login(d, phone, 0, &key, identity);
    dev.publish_prekeys(5);
    dev
}

/// Logs `(user, device)` in with `key` and [`MD_CAPS`]; panics unless welcomed.
pub fn md_login(
    d: &Daemon,
    user: u64,
    device: u16,
    key: &StaticKeypair,
    identity: client::e2ee::IdentityKeyPair,
) -> Dev {
    let (raw, first) = login_as(d, user, device, key, MD_CAPS);
    match first {
        Frame::Welcome(w) => assert_eq!(w.addr, DeviceAddr { user, device }),
        other => panic!("login as ({user}, {device}): expected Welcome, got {other:?}"),
    }
    Dev {
        user,
        device,
        key: key.clone(),
        identity,
        raw,
        pending: Default::default(),
        one_time: Vec::new(),
    }
}

/// A new device that asked for a link code and waits for an approval.
pub struct Linking {
    pub raw: Raw,
    pub identity: client::e2ee::IdentityKeyPair,
    pub code: u64,
}

impl Linking {
    /// Connects with a fresh static key and identity and asks for a link code.
    pub fn request(d: &Daemon) -> Linking {
        Linking::request_at(d.addr)
    }

    /// [`Linking::request`] against the daemon listening on `addr`.
    pub fn request_at(addr: SocketAddr) -> Linking {
        let mut raw = Raw::connect(addr, &StaticKeypair::generate());
        let request_id = next_request_id();
        raw.send(Frame::LinkRequest(frame::LinkRequest { request_id }));
        let code = match raw.recv_skip_pong() {
            Frame::LinkCode(c) => {
                assert_eq!(c.request_id, request_id);
                c.code
            }
            other => panic!("expected LinkCode, got {other:?}"),
        };
        Linking {
            raw,
            identity: client::e2ee::IdentityKeyPair::generate(&mut rand::rngs::OsRng),
            code,
        }
    }

    /// After the approval: `Registered { (user, device) }`, then `Login` on the same
    /// connection; the device is logged in (it has not published prekeys yet).
    pub fn finish(mut self, user: u64, device: u16) -> Dev {
        match self.raw.recv_skip_pong() {
            Frame::Registered(r) => assert_eq!(r.addr, DeviceAddr { user, device }),
            other => panic!("expected Registered ({user}, {device}), got {other:?}"),
        }
        self.raw.send(Frame::Login(frame::Login {
            addr: DeviceAddr { user, device },
            revision: protocol::PROTOCOL_REVISION,
            capabilities: MD_CAPS,
        }));
        match self.raw.recv_skip_pong() {
            Frame::Welcome(w) => assert_eq!(w.addr, DeviceAddr { user, device }),
            other => panic!("login of the linked ({user}, {device}): got {other:?}"),
        }
        let key = self.raw.key.clone();
        Dev {
            user,
            device,
            key,
            identity: self.identity,
            raw: self.raw,
            pending: Default::default(),
            one_time: Vec::new(),
        }
    }
}

/// Links a new device to `primary`'s account: code, approval, `DeviceLinked`, `Registered`,
/// login, prekeys published. Returns the new device.
pub fn md_link(d: &Daemon, primary: &mut Dev) -> Dev {
    let n = Linking::request(d);
    let request_id = next_request_id();
    primary.raw.send(primary.approve_frame(request_id, &n));
    let device = match primary.expect("DeviceLinked", |f| {
        matches!(f, Frame::DeviceLinked(l) if l.request_id == request_id)
            || matches!(f, Frame::Error(e) if e.ref_id == request_id)
    }) {
        Frame::DeviceLinked(l) => {
            assert_eq!(l.addr.user, primary.user);
            l.addr.device
        }
        other => panic!("LinkApprove: expected DeviceLinked, got {other:?}"),
    };
    let mut dev = n.finish(primary.user, device);
    dev.publish_prekeys(5);
    dev
}

/// A `SendMulti` of `id` to `to_user` with one copy per `(own, device)`; each payload says
/// which copy it is (see [`copy_payload`]).
pub fn send_multi(id: u64, to_user: u64, copies: &[(bool, u16)]) -> Frame {
    Frame::SendMulti(frame::SendMulti {
        client_msg_id: id,
        to_user,
        msg_type: MsgType::TEXT,
        copies: copies
            .iter()
            .map(|&(own, device)| frame::DeviceCopy {
                own,
                device,
                payload: copy_payload(id, own, device),
            })
            .collect(),
    })
}

/// The payload [`send_multi`] puts in the copy of `id` for `(own, device)`.
pub fn copy_payload(id: u64, own: bool, device: u16) -> Bytes {
    Bytes::from(format!(
        "msg {id} for {} device {device}",
        if own { "own" } else { "recipient" }
    ))
}

/// Checks a device list's shape and signatures: increasing ids, device 0 first with an
/// all-zero signature, every companion signed by device 0's identity.
pub fn verify_device_list(l: &frame::DeviceList) {
    assert!(!l.devices.is_empty(), "{l:?}");
    assert_eq!(l.devices[0].device, 0, "{l:?}");
    assert_eq!(l.devices[0].signature, [0u8; 64], "{l:?}");
    assert!(
        l.devices.windows(2).all(|w| w[0].device < w[1].device),
        "{l:?}"
    );
    let primary_sign = l.devices[0].identity_sign;
    for e in &l.devices[1..] {
        client::e2ee::keys::verify_device_signature(
            &primary_sign,
            l.user,
            (&e.identity_dh, &e.identity_sign),
            &e.signature,
        )
        .unwrap_or_else(|err| panic!("device {} of {}: bad signature: {err:?}", e.device, l.user));
    }
}

/// Logs `(user, device)` in (messaging and multi-device, no prekeys), takes every `Deliver`
/// until the connection is quiet for 2 s, acking each (and every `Receipt`); returns (from,
/// client_msg_id, payload) of each, duplicates included.
pub fn drain_device(
    d: &Daemon,
    user: u64,
    device: u16,
    key: &StaticKeypair,
) -> Vec<(DeviceAddr, u64, Bytes)> {
    let caps = protocol::capability::MESSAGING | protocol::capability::MULTI_DEVICE;
    let (mut raw, first) = login_as(d, user, device, key, caps);
    assert!(
        matches!(first, Frame::Welcome(_)),
        "login as ({user}, {device}): {first:?}"
    );
    let mut got = Vec::new();
    while let Some(f) = raw.recv_timeout(Duration::from_secs(2)) {
        match f {
            Frame::Deliver(frame::Deliver { seq, message }) => {
                got.push((message.from, message.client_msg_id, message.payload));
                raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }));
            }
            Frame::Receipt(frame::Receipt { seq, .. }) => {
                raw.send(Frame::Ack(frame::Ack { seqs: vec![seq] }))
            }
            _ => {}
        }
    }
    got
}

/// Every record of every shard's log under `data_dir`, decoded, in log order per shard (read
/// the way the daemon recovers it; the daemon must be stopped). Panics on undecodable records.
pub fn log_records(data_dir: &Path) -> Vec<shards::record::Record> {
    let mut shard_dirs: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
        })
        .collect();
    shard_dirs.sort();
    assert!(
        !shard_dirs.is_empty(),
        "no shard directories in {data_dir:?}"
    );
    let mut out = Vec::new();
    for dir in shard_dirs {
        let rec = storage::recovery::recover(&dir).unwrap();
        let decoded = shards::decode_log(rec.records);
        assert!(
            decoded.undecodable.is_empty(),
            "undecodable records in {dir:?}: {:?}",
            decoded.undecodable
        );
        out.extend(decoded.records.into_iter().map(|(_, r)| r));
    }
    out
}

/// Media and status helpers (tests/media.rs, tests/crash_media.rs, tests/status.rs).
pub mod media;

/// `n` phone numbers from `base` on, the i-th homed on shard `i % shards` of a daemon with
/// `shards` shards (so consecutive ones cross shards).
pub fn phones_across_shards(base: u64, shards: u16, n: usize) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut candidate = base;
    while out.len() < n {
        if shards::home_shard(candidate, shards) == (out.len() % usize::from(shards)) as u16 {
            out.push(candidate);
        }
        candidate += 1;
    }
    out
}

/// Registers `phone` through the SDK with a device whose state (keys) lives in `dir`.
pub fn register_device(d: &Daemon, dir: &Path, phone: u64) {
    let id = client::Identity::load_or_create(dir).unwrap();
    let addr = d.addr.to_string();
    let mut c =
        client::Connection::connect(addr.as_str(), &id, client::Timeouts::default()).unwrap();
    c.register_request(phone).unwrap();
    let code = d.sms_code(phone);
    c.register_verify(phone, code).unwrap();
    c.close();
}

/// Every file under `dir`, recursively (for tests that check what the daemon wrote).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
