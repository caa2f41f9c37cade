//! In-process fake servers for the client tests, built on the same `protocol` crate as the
//! real gateway: std threads and std::net on 127.0.0.1.
//!
//! * [`FakeConn`] is one server-side connection that a test scripts frame by frame.
//! * [`MiniServer`] is a small stateful server (registration with a code file, login,
//!   store-and-forward with acks and receipts) for the CLI tests.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::frame::{DeviceKeys, OneTimePrekey, PrekeyStatusReason, ReceiptKind};
use protocol::noise::{ServerAwaitingFinish, ServerHandshake, StaticKeypair, Transport};
use protocol::wire::{self, Check, RECORD_BODY_MAX};
use protocol::{
    capability, frame, DeviceAddr, ErrorCode, Frame, Message, ReceiptInfo, PREAMBLE,
    PROTOCOL_REVISION,
};

/// How long a scripted server waits for the client before failing the test.
pub const SERVER_WAIT: Duration = Duration::from_secs(5);

/// A scripted fake server: one thread running `script` on a listener bound to 127.0.0.1.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub key: StaticKeypair,
    handle: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Starts a server with a fresh key; `script` gets the listener and the key.
    pub fn start(script: impl FnOnce(TcpListener, StaticKeypair) + Send + 'static) -> Self {
        Self::start_with_key(StaticKeypair::generate(), script)
    }

    /// Starts a server with a given key.
    pub fn start_with_key(
        key: StaticKeypair,
        script: impl FnOnce(TcpListener, StaticKeypair) + Send + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let k = key.clone();
        let handle = std::thread::spawn(move || script(listener, k));
        Self {
            addr,
            key,
            handle: Some(handle),
        }
    }

    /// Waits for the script to finish; a failed assertion in it fails the test here.
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// One server-side connection.
pub struct FakeConn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    transport: Option<Transport>,
    pub client_key: [u8; 32],
}

impl FakeConn {
    /// Accepts one connection and runs the whole server side of the handshake.
    pub fn accept(listener: &TcpListener, key: &StaticKeypair) -> FakeConn {
        let (hs, mut conn) = Self::accept_until_msg2(listener, key);
        let msg3 = conn.read_raw_record().expect("msg3");
        let (transport, client_key) = hs.read_finish(&msg3).expect("read msg3");
        conn.transport = Some(transport);
        conn.client_key = client_key;
        conn
    }

    /// Accepts, checks the preamble, reads msg1 and sends msg2; the caller decides what comes
    /// next.
    pub fn accept_until_msg2(
        listener: &TcpListener,
        key: &StaticKeypair,
    ) -> (ServerAwaitingFinish, FakeConn) {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).ok();
        let mut conn = FakeConn {
            stream,
            rbuf: Vec::new(),
            transport: None,
            client_key: [0; 32],
        };
        let mut preamble = [0u8; 4];
        conn.stream.set_read_timeout(Some(SERVER_WAIT)).ok();
        conn.stream.read_exact(&mut preamble).expect("preamble");
        assert_eq!(preamble, PREAMBLE, "client must open with the preamble");
        let msg1 = conn.read_raw_record().expect("msg1");
        let (hs, msg2) = ServerHandshake::new(key)
            .expect("hs")
            .read_hello(&msg1)
            .expect("read msg1");
        conn.send_raw_record(&msg2);
        (hs, conn)
    }

    /// Writes `body` as one record without encryption (handshake records, garbage).
    pub fn send_raw_record(&mut self, body: &[u8]) {
        let mut out = Vec::new();
        wire::put_len(&mut out, body.len());
        out.extend_from_slice(body);
        self.stream.write_all(&out).expect("write");
    }

    /// Seals arbitrary plaintext bytes (not necessarily a valid frame) into one record.
    pub fn send_sealed_bytes(&mut self, plain: &[u8]) {
        let t = self.transport.as_mut().expect("handshake done");
        let mut out = Vec::new();
        wire::put_len(&mut out, plain.len() + wire::TAG_BYTES);
        let start = out.len();
        out.extend_from_slice(plain);
        t.tx.seal_in_place(&mut out, start).expect("seal");
        self.stream.write_all(&out).expect("write");
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &Frame) {
        let t = self.transport.as_mut().expect("handshake done");
        let mut out = Vec::new();
        t.seal_frame(frame, &mut out).expect("seal");
        self.stream.write_all(&out).expect("write");
    }

    /// Reads one raw record body; `None` on EOF.
    pub fn read_raw_record(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            if let Check::Complete { total } =
                wire::check(&self.rbuf, 1, RECORD_BODY_MAX).expect("record length")
            {
                let body = self.rbuf[2..total].to_vec();
                self.rbuf.drain(..total);
                return Some(body);
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => return None,
                Fill::Timeout => panic!("timed out waiting for a raw record"),
            }
        }
    }

    /// The next frame within `timeout`; `None` on timeout. Panics on EOF or garbage.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Frame> {
        match self.next(timeout) {
            Next::Frame(f) => Some(f),
            Next::Timeout => None,
            Next::Eof => panic!("client closed the connection while a frame was expected"),
        }
    }

    /// The next frame; panics if none comes within [`SERVER_WAIT`].
    pub fn recv(&mut self) -> Frame {
        self.recv_timeout(SERVER_WAIT)
            .expect("timed out waiting for a frame from the client")
    }

    /// The next frame, EOF, or timeout.
    pub fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if let Check::Complete { total } =
                wire::check(&self.rbuf, 17, RECORD_BODY_MAX).expect("record length")
            {
                let mut body = self.rbuf[2..total].to_vec();
                self.rbuf.drain(..total);
                let t = self.transport.as_mut().expect("handshake done");
                let n = t
                    .open_record(&mut body)
                    .expect("client record authenticates");
                body.truncate(n);
                return Next::Frame(
                    Frame::decode(Bytes::from(body)).expect("client frame decodes"),
                );
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => return Next::Eof,
                Fill::Timeout => return Next::Timeout,
            }
        }
    }

    /// Waits for the client to close the connection, skipping frames; panics on timeout.
    pub fn expect_eof(&mut self) {
        loop {
            match self.next(SERVER_WAIT) {
                Next::Eof => return,
                Next::Frame(_) => {}
                Next::Timeout => panic!("client did not close"),
            }
        }
    }

    /// Accepts a `Login` and answers `Welcome` with the given keepalive and frame limit.
    pub fn expect_login(&mut self, keepalive_ms: u32, max_frame_bytes: u32) -> (u64, u16) {
        match self.recv() {
            Frame::Login(frame::Login {
                addr: DeviceAddr { user, device },
                revision,
                capabilities,
            }) => {
                assert_eq!(revision, PROTOCOL_REVISION);
                assert_eq!(capabilities & capability::MESSAGING, capability::MESSAGING);
                self.send(&welcome(user, device, keepalive_ms, max_frame_bytes));
                (user, device)
            }
            other => panic!("expected Login, got {other:?}"),
        }
    }

    /// Closes the server side.
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fill::Timeout;
        }
        self.stream.set_read_timeout(Some(left)).ok();
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => Fill::Eof,
            Ok(n) => {
                self.rbuf.extend_from_slice(&buf[..n]);
                Fill::Data
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Fill::Timeout
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                Fill::Eof
            }
            Err(e) => panic!("server read: {e}"),
        }
    }
}

enum Fill {
    Data,
    Eof,
    Timeout,
}

/// What [`FakeConn::next`] found.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    Eof,
    Timeout,
}

/// A `Welcome` frame.
pub fn welcome(user: u64, device: u16, keepalive_ms: u32, max_frame_bytes: u32) -> Frame {
    Frame::Welcome(frame::Welcome {
        addr: DeviceAddr { user, device },
        revision: PROTOCOL_REVISION,
        capabilities: capability::MESSAGING,
        server_time_ms: now_ms(),
        keepalive_ms,
        max_frame_bytes,
    })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// MiniServer: just enough of the gateway's behaviour for end-to-end CLI tests.

struct Item {
    seq: u64,
    frame: Frame,
}

#[derive(Default)]
struct MiniState {
    codes: HashMap<u64, u32>,
    users_by_key: HashMap<[u8; 32], u64>,
    mailboxes: HashMap<u64, Vec<Item>>,
    online: HashMap<u64, mpsc::Sender<Frame>>,
    accepted: HashSet<(u64, u64)>,
    next_seq: u64,
    /// Published prekeys per user (device 0): keys and the one-time prekeys left.
    prekeys: HashMap<u64, (DeviceKeys, VecDeque<OneTimePrekey>)>,
    /// Every `Send` payload received, as the server saw it.
    payloads: Vec<Bytes>,
}

/// A small stateful server: registration (codes appended to `<data_dir>/sms/<phone>.txt`),
/// login, store-and-forward with server acks, delivery, acks, ✓✓ and read receipts, and a
/// prekey directory (upload, fetch consuming one one-time prekey; no signature check, no
/// limits).
pub struct MiniServer {
    pub addr: SocketAddr,
    pub key: StaticKeypair,
    pub data_dir: PathBuf,
    state: Arc<Mutex<MiniState>>,
    _data: tempfile::TempDir,
}

impl MiniServer {
    pub fn start() -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let data_dir = data.path().to_path_buf();
        let key = StaticKeypair::generate();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(MiniState {
            next_seq: 1,
            ..MiniState::default()
        }));
        let (k, dir, shared) = (key.clone(), data_dir.clone(), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (k, dir, state) = (k.clone(), dir.clone(), shared.clone());
                std::thread::spawn(move || mini_connection(stream, &k, &dir, &state));
            }
        });
        Self {
            addr,
            key,
            data_dir,
            state,
            _data: data,
        }
    }

    /// Every `Send` payload the server received so far.
    pub fn payloads(&self) -> Vec<Bytes> {
        self.state.lock().expect("lock").payloads.clone()
    }
}

fn mini_connection(
    stream: TcpStream,
    key: &StaticKeypair,
    data_dir: &std::path::Path,
    state: &Mutex<MiniState>,
) {
    // Reuse FakeConn's handshake over an already-accepted stream via a one-shot listener is
    // awkward; do the handshake inline instead.
    let mut conn = FakeConn {
        stream,
        rbuf: Vec::new(),
        transport: None,
        client_key: [0; 32],
    };
    let mut preamble = [0u8; 4];
    conn.stream.set_read_timeout(Some(SERVER_WAIT)).ok();
    if conn.stream.read_exact(&mut preamble).is_err() || preamble != PREAMBLE {
        return;
    }
    let Some(msg1) = conn.read_raw_record() else {
        return;
    };
    let Ok((hs, msg2)) = ServerHandshake::new(key).and_then(|h| h.read_hello(&msg1)) else {
        return;
    };
    conn.send_raw_record(&msg2);
    let Some(msg3) = conn.read_raw_record() else {
        return;
    };
    let Ok((transport, client_key)) = hs.read_finish(&msg3) else {
        return;
    };
    conn.transport = Some(transport);
    conn.client_key = client_key;

    let (push_tx, push_rx) = mpsc::channel::<Frame>();
    let mut user: Option<u64> = None;
    loop {
        while let Ok(f) = push_rx.try_recv() {
            conn.send(&f);
        }
        let frame = match conn.next(Duration::from_millis(20)) {
            Next::Frame(f) => f,
            Next::Timeout => continue,
            Next::Eof => break,
        };
        let mut st = state.lock().expect("lock");
        match (frame, user) {
            (Frame::RegisterRequest(frame::RegisterRequest { phone }), None) => {
                if !protocol::addr::is_valid_user_id(phone) {
                    conn.send(&Frame::error(ErrorCode::InvalidNumber, 0, "invalid number"));
                    continue;
                }
                let code = 100_000 + rand::random::<u32>() % 900_000;
                st.codes.insert(phone, code);
                let sms = data_dir.join("sms");
                std::fs::create_dir_all(&sms).expect("sms dir");
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(sms.join(format!("{phone}.txt")))
                    .expect("code file");
                writeln!(f, "{code}").expect("write code");
                conn.send(&Frame::RegisterCodeSent(frame::RegisterCodeSent {
                    phone,
                    expires_in_s: 300,
                }));
            }
            (Frame::RegisterVerify(frame::RegisterVerify { phone, code }), None) => {
                match st.codes.get(&phone) {
                    None => conn.send(&Frame::error(ErrorCode::NoPendingCode, 0, "")),
                    Some(c) if *c != code => {
                        conn.send(&Frame::error(ErrorCode::WrongCode, 0, "wrong code"))
                    }
                    Some(_) => {
                        st.codes.remove(&phone);
                        st.users_by_key.insert(conn.client_key, phone);
                        conn.send(&Frame::Registered(frame::Registered {
                            addr: DeviceAddr {
                                user: phone,
                                device: 0,
                            },
                        }));
                    }
                }
            }
            (
                Frame::Login(frame::Login {
                    addr: DeviceAddr { user: u, device },
                    ..
                }),
                None,
            ) => {
                if st.users_by_key.get(&conn.client_key) != Some(&u) || device != 0 {
                    conn.send(&Frame::error(ErrorCode::UnknownKey, 0, "unknown key"));
                    break;
                }
                user = Some(u);
                st.online.insert(u, push_tx.clone());
                let mut w = welcome(u, 0, 30_000, 65_535);
                if let Frame::Welcome(frame::Welcome { capabilities, .. }) = &mut w {
                    *capabilities = capability::MESSAGING | capability::PREKEYS;
                }
                conn.send(&w);
                for item in st
                    .mailboxes
                    .get(&u)
                    .map(|v| v.as_slice())
                    .unwrap_or_default()
                {
                    conn.send(&item.frame);
                }
            }
            (
                Frame::Send(frame::Send {
                    client_msg_id,
                    to,
                    msg_type,
                    payload,
                }),
                Some(me),
            ) => {
                if !st.users_by_key.values().any(|u| *u == to.id) {
                    conn.send(&Frame::error(
                        ErrorCode::NoSuchRecipient,
                        client_msg_id,
                        "no such user",
                    ));
                    continue;
                }
                st.payloads.push(payload.clone());
                if st.accepted.insert((me, client_msg_id)) {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let frame = Frame::Deliver(frame::Deliver {
                        seq,
                        message: Message {
                            from: DeviceAddr {
                                user: me,
                                device: 0,
                            },
                            client_msg_id,
                            server_ts_ms: now_ms(),
                            msg_type,
                            payload,
                        },
                    });
                    push(&mut st, to.id, Item { seq, frame });
                }
                conn.send(&Frame::ServerAck(frame::ServerAck {
                    client_msg_id,
                    server_ts_ms: now_ms(),
                }));
            }
            (Frame::Ack(frame::Ack { seqs }), Some(me)) => {
                let mut receipts = Vec::new();
                if let Some(mb) = st.mailboxes.get_mut(&me) {
                    mb.retain(|item| {
                        if !seqs.contains(&item.seq) {
                            return true;
                        }
                        if let Frame::Deliver(frame::Deliver {
                            message:
                                Message {
                                    from:
                                        DeviceAddr {
                                            user: from_user, ..
                                        },
                                    client_msg_id,
                                    ..
                                },
                            ..
                        }) = item.frame
                        {
                            receipts.push((from_user, client_msg_id));
                        }
                        false
                    });
                }
                for (sender, client_msg_id) in receipts {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let frame = Frame::Receipt(frame::Receipt {
                        seq,
                        receipt: ReceiptInfo {
                            from: DeviceAddr {
                                user: me,
                                device: 0,
                            },
                            client_msg_id,
                            kind: ReceiptKind::DELIVERED,
                            ts_ms: now_ms(),
                        },
                    });
                    push(&mut st, sender, Item { seq, frame });
                }
            }
            (Frame::Read(frame::Read { to, client_msg_id }), Some(me)) => {
                let seq = st.next_seq;
                st.next_seq += 1;
                let frame = Frame::Receipt(frame::Receipt {
                    seq,
                    receipt: ReceiptInfo {
                        from: DeviceAddr {
                            user: me,
                            device: 0,
                        },
                        client_msg_id,
                        kind: ReceiptKind::READ,
                        ts_ms: now_ms(),
                    },
                });
                push(&mut st, to.id, Item { seq, frame });
            }
            (Frame::PrekeyUpload(frame::PrekeyUpload { keys, one_time }), Some(me)) => {
                let entry = st
                    .prekeys
                    .entry(me)
                    .or_insert_with(|| (*keys, VecDeque::new()));
                if entry.0.identity_dh != keys.identity_dh {
                    entry.1.clear();
                }
                entry.0 = *keys;
                entry.1.extend(one_time);
                let remaining = entry.1.len() as u32;
                conn.send(&Frame::PrekeyStatus(frame::PrekeyStatus {
                    one_time_remaining: remaining,
                    low_water: 10,
                    reason: PrekeyStatusReason::UPLOADED,
                }));
            }
            (
                Frame::PrekeyFetch(frame::PrekeyFetch {
                    addr: DeviceAddr { user: u, device },
                    request_id,
                }),
                Some(_),
            ) => match st.prekeys.get_mut(&u) {
                Some((keys, left)) if device == 0 => {
                    let frame = Frame::PrekeyBundle(frame::PrekeyBundle {
                        addr: DeviceAddr { user: u, device },
                        request_id,
                        keys: Box::new(*keys),
                        one_time: left.pop_front(),
                    });
                    conn.send(&frame);
                }
                _ => conn.send(&Frame::error(
                    ErrorCode::NoSuchRecipient,
                    request_id,
                    "no prekeys",
                )),
            },
            (Frame::Ping(frame::Ping { nonce }), _) => {
                conn.send(&Frame::Pong(frame::Pong { nonce }))
            }
            (_, _) => {
                conn.send(&Frame::error(
                    ErrorCode::NotAuthenticated,
                    0,
                    "unexpected frame",
                ));
                break;
            }
        }
    }
    if let Some(u) = user {
        let mut st = state.lock().expect("lock");
        st.online.remove(&u);
    }
}

fn push(st: &mut MiniState, to: u64, item: Item) {
    if let Some(tx) = st.online.get(&to) {
        let _ = tx.send(item.frame.clone());
    }
    st.mailboxes.entry(to).or_default().push(item);
}
