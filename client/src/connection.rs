//! Connecting: TCP, preamble, Noise XX handshake, server-key pinning, registration, login.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use protocol::addr::is_valid_user_id;
use protocol::noise::{ClientHandshake, KEY_BYTES};
use protocol::{
    capability, frame, wire, DeviceAddr, DeviceId, Frame, UserId, PREAMBLE, PROTOCOL_REVISION,
};

use std::path::Path;

use switchboard_e2ee::{E2ee, IdentityKeyPair};

use crate::channel::{Channel, RawStream};
use crate::devices::LinkString;
use crate::error::{Error, ProtocolError, Result, ServerCode};
use crate::secure;
use crate::session::{Session, SessionOptions};
use crate::state::{Account, Identity};

/// Capabilities this SDK announces in `Login` (plus `PREKEYS` when the session uses
/// end-to-end encryption, [`SessionOptions::e2ee`]): messaging and linked devices
/// (`MULTI_DEVICE`: the session handles `DeviceList`, `READ_ELSEWHERE` and sends with
/// `SendMulti` when the server grants it; `PRESENCE` and `CALLS`: the session turns
/// presence, typing and call frames into events, see `crate::presence`).
pub const CLIENT_CAPABILITIES: u64 = capability::MESSAGING
    | capability::MULTI_DEVICE
    | capability::MEDIA
    | capability::GROUPS
    | capability::PRESENCE
    | capability::CALLS;

/// How long each step may take. Every wait in the SDK is bounded by one of these or by a
/// timeout the caller passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, per resolved address. Default 5 s.
    pub connect: Duration,
    /// From writing the preamble to receiving handshake message 2. Default 10 s.
    pub handshake: Duration,
    /// Waiting for the reply to `RegisterRequest`, `RegisterVerify` or `Login`. Default 10 s.
    pub request: Duration,
    /// One socket write. A server that does not drain its socket for this long is treated as
    /// gone (the connection is closed). Default 10 s.
    pub write: Duration,
    /// Waiting for the `Pong` to a keepalive or explicit `Ping`, counted from the later of
    /// the ping and the last frame received; past it the connection is declared dead.
    /// Default `None`: two keepalive periods, as the protocol suggests (30 s when the server
    /// announced no keepalive).
    pub pong: Option<Duration>,
    /// How long [`Session::close`] waits for the server to close after this side finished
    /// writing. Default 1 s.
    pub close_linger: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            request: Duration::from_secs(10),
            write: Duration::from_secs(10),
            pong: None,
            close_linger: Duration::from_secs(1),
        }
    }
}

/// What to do with the server's static key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerKeyPolicy {
    /// Trust on first use: pin the key in `server.pub` the first time, then refuse any other
    /// key with [`Error::ServerKeyChanged`]. Without a state directory, accept any key.
    #[default]
    TrustOnFirstUse,
    /// Accept whatever key the server presents and pin it, replacing a different earlier pin
    /// (the caller knows the operator rotated the key). Logged at warn level.
    Repin,
    /// Require exactly this key (and leave `server.pub` alone).
    Expect([u8; KEY_BYTES]),
}

/// What the server said to `RegisterRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeSent {
    /// The number the code was sent to.
    pub phone: UserId,
    /// How long the code stays valid, in seconds.
    pub expires_in_s: u32,
}

/// What the server said to `Login`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The logged-in user.
    pub user: UserId,
    /// The logged-in device.
    pub device: DeviceId,
    /// The server's protocol revision.
    pub revision: u16,
    /// Capabilities in force on this connection.
    pub capabilities: u64,
    /// Server wall clock at login, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// The session pings when it has sent nothing for this long (0: never).
    pub keepalive_ms: u32,
    /// Largest record body the server accepts; bounds the payload size.
    pub max_frame_bytes: u32,
}

/// A connection that finished the Noise handshake and is not logged in yet.
///
/// Use it to register ([`Connection::register_request`], [`Connection::register_verify`])
/// and/or to log in ([`Connection::login`]), which turns it into a [`Session`]. The server
/// closes a connection that does not log in within its handshake timeout.
pub struct Connection {
    chan: Channel,
    identity: Identity,
    server_key: [u8; KEY_BYTES],
    timeouts: Timeouts,
    /// A new device's end-to-end identity, made by the first [`Connection::request_link`].
    link_identity: Option<IdentityKeyPair>,
    /// After linking without a state directory: the E2EE state the session must use.
    linked_e2ee: Option<E2ee>,
}

/// What the server said to `LinkRequest` ([`Connection::request_link`]): the code and the link
/// string to show on the new device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkOffer {
    /// The single-use code (also inside `link`).
    pub code: u64,
    /// How long the code stays valid, in seconds (while this connection stays open).
    pub expires_in_s: u32,
    /// What to show (print it with `to_string()`, or as a QR code): the primary passes it to
    /// [`Session::approve_link`].
    pub link: LinkString,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.chan.raw().peer())
            .field("server_key", &hex::encode(self.server_key))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` with [`ServerKeyPolicy::TrustOnFirstUse`].
    pub fn connect(
        addr: impl ToSocketAddrs,
        identity: &Identity,
        timeouts: Timeouts,
    ) -> Result<Self> {
        Self::connect_with(addr, identity, timeouts, ServerKeyPolicy::TrustOnFirstUse)
    }

    /// Connects to `addr` (each resolved address in turn), sends the preamble and runs the
    /// Noise XX handshake as `identity`. The server's key is checked against `policy` before
    /// handshake message 3 (which carries this device's static key) is sent.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        identity: &Identity,
        timeouts: Timeouts,
        policy: ServerKeyPolicy,
    ) -> Result<Self> {
        let (stream, peer) = tcp_connect(addr, timeouts.connect)?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(timeouts.write))
            .map_err(|e| Error::Io {
                op: "set write timeout",
                source: e,
            })?;
        let mut raw = RawStream::new(stream, peer);

        let (hs, msg1) = ClientHandshake::start(identity.keypair()).map_err(Error::Handshake)?;
        let mut out = Vec::with_capacity(PREAMBLE.len() + wire::LEN_PREFIX_BYTES + msg1.len());
        out.extend_from_slice(&PREAMBLE);
        wire::put_len(&mut out, msg1.len());
        out.extend_from_slice(&msg1);
        raw.write_all(&out)?;

        let msg2 = raw.read_handshake_record(Instant::now() + timeouts.handshake)?;
        let (transport, msg3, server_key) = match hs.read_hello(&msg2) {
            Ok(t) => t,
            Err(e) => {
                raw.close();
                return Err(Error::Handshake(e));
            }
        };
        if let Err(e) = check_server_key(identity, policy, &server_key) {
            raw.close();
            return Err(e);
        }
        out.clear();
        wire::put_len(&mut out, msg3.len());
        out.extend_from_slice(&msg3);
        raw.write_all(&out)?;
        tracing::debug!(%peer, server_key = %hex::encode(server_key), "handshake complete");
        Ok(Self {
            chan: Channel::new(raw, transport),
            identity: identity.clone(),
            server_key,
            timeouts,
            link_identity: None,
            linked_e2ee: None,
        })
    }

    /// The server's static public key, as authenticated by the handshake.
    pub fn server_key(&self) -> [u8; KEY_BYTES] {
        self.server_key
    }

    /// The server address this connection reached.
    pub fn peer_addr(&self) -> SocketAddr {
        self.chan.raw().peer()
    }

    /// Asks the server to send a one-time code to `phone`. Server refusals come back as
    /// [`Error::Server`] (`InvalidNumber`, `RegisterRateLimited`, …); the connection stays
    /// usable after a non-fatal one.
    pub fn register_request(&mut self, phone: UserId) -> Result<CodeSent> {
        if !is_valid_user_id(phone) {
            return Err(Error::InvalidPhone(phone.to_string()));
        }
        match self.request(
            &Frame::RegisterRequest(frame::RegisterRequest { phone }),
            "reply to RegisterRequest",
        )? {
            Frame::RegisterCodeSent(frame::RegisterCodeSent {
                phone: p,
                expires_in_s,
            }) if p == phone => Ok(CodeSent {
                phone,
                expires_in_s,
            }),
            Frame::RegisterCodeSent { .. } => {
                Err(self.fail(ProtocolError::Mismatch("RegisterCodeSent.phone")))
            }
            other => Err(self.unexpected(&other, "waiting for RegisterCodeSent")),
        }
    }

    /// Proves the code sent to `phone`, binding this device's key to the number. On success
    /// the account is saved in the identity's state directory (`account.json`). Refusals come
    /// back as [`Error::Server`] (`WrongCode`, `CodeExpired`, `NoPendingCode`,
    /// `KeyBoundToOtherUser`, …); after a non-fatal one the connection stays usable (a person
    /// can retype the code).
    pub fn register_verify(&mut self, phone: UserId, code: u32) -> Result<Account> {
        if !is_valid_user_id(phone) {
            return Err(Error::InvalidPhone(phone.to_string()));
        }
        match self.request(
            &Frame::RegisterVerify(frame::RegisterVerify { phone, code }),
            "reply to RegisterVerify",
        )? {
            Frame::Registered(frame::Registered {
                addr: DeviceAddr { user, device },
            }) if user == phone => {
                let account = Account { user, device };
                self.identity.save_account(&account)?;
                Ok(account)
            }
            Frame::Registered { .. } => Err(self.fail(ProtocolError::Mismatch("Registered.user"))),
            other => Err(self.unexpected(&other, "waiting for Registered")),
        }
    }

    /// New device: asks the server to link this device to an existing account
    /// (`LinkRequest`, capability `MULTI_DEVICE`; the connection must not be logged in). The
    /// first call creates this device's end-to-end identity (in memory; saved once linked), so
    /// the returned link string carries the identity it will publish; a later call on the same
    /// connection (say, after the code expired) keeps that identity and replaces the code.
    ///
    /// Show `offer.link` to the user, have the primary approve it
    /// ([`Session::approve_link`]), then call [`Connection::wait_linked`]. Refused with
    /// [`Error::AlreadyRegistered`] when the state directory already holds an account.
    pub fn request_link(&mut self) -> Result<LinkOffer> {
        if let Some(account) = self.identity.account()? {
            return Err(Error::AlreadyRegistered {
                path: self
                    .identity
                    .state_dir()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                account,
            });
        }
        let identity = self
            .link_identity
            .get_or_insert_with(|| IdentityKeyPair::generate(&mut rand::rngs::OsRng))
            .public();
        let request_id = crate::session::new_client_msg_id();
        match self.request(
            &Frame::LinkRequest(frame::LinkRequest { request_id }),
            "reply to LinkRequest",
        )? {
            Frame::LinkCode(frame::LinkCode {
                request_id: r,
                code,
                expires_in_s,
            }) if r == request_id => Ok(LinkOffer {
                code,
                expires_in_s,
                link: LinkString {
                    code,
                    static_key: self.identity.public_key(),
                    identity,
                },
            }),
            Frame::LinkCode { .. } => {
                Err(self.fail(ProtocolError::Mismatch("LinkCode.request_id")))
            }
            other => Err(self.unexpected(&other, "waiting for LinkCode")),
        }
    }

    /// New device: waits up to `timeout` for the primary's approval (the server's
    /// `Registered { user, device }` on this connection), then saves the account
    /// (`account.json`) and this device's end-to-end state (`e2ee/`, with the identity from
    /// the link string) in the state directory, and returns the account. Log in next
    /// ([`Connection::login_with`] with [`SessionOptions::e2ee`]: the session publishes the
    /// prekeys of that identity). Running out of time is [`Error::Timeout`]
    /// `"link approval"`, and the connection stays open (call [`Connection::request_link`]
    /// again when the code expired, and show the new string).
    pub fn wait_linked(&mut self, timeout: Duration) -> Result<Account> {
        let Some(link_identity) = self.link_identity.clone() else {
            return Err(Error::Protocol(ProtocolError::Mismatch(
                "wait_linked before request_link",
            )));
        };
        let deadline = Instant::now().checked_add(timeout);
        loop {
            match self.next_frame(deadline)? {
                None => {
                    return Err(Error::Timeout {
                        what: "link approval",
                    })
                }
                Some(Frame::Error(frame::Error { code, ref_id, text })) => {
                    let code = ServerCode(code);
                    if code.is_fatal() {
                        self.chan.raw_mut().close();
                        return Err(Error::Server { code, ref_id, text });
                    }
                    tracing::warn!(%code, %text, "server error while waiting for link approval");
                }
                Some(Frame::Registered(frame::Registered {
                    addr: DeviceAddr { user, device },
                })) => {
                    let account = Account { user, device };
                    let e2ee = E2ee::with_identity(secure::peer(user, device), link_identity);
                    match self.identity.state_dir() {
                        Some(dir) => secure::save_linked(dir, &e2ee)?,
                        None => self.linked_e2ee = Some(e2ee),
                    }
                    self.identity.save_account(&account)?;
                    tracing::info!(user, device, "device linked");
                    return Ok(account);
                }
                Some(other) => return Err(self.unexpected(&other, "waiting for Registered")),
            }
        }
    }

    /// Logs in as `(user, device)` with default [`SessionOptions`].
    pub fn login(self, user: UserId, device: DeviceId) -> Result<Session> {
        self.login_with(user, device, SessionOptions::default())
    }

    /// Logs in as the account saved in the state directory ([`Error::NotRegistered`] if none).
    pub fn login_saved(self, options: SessionOptions) -> Result<Session> {
        let account = self.identity.require_account()?;
        self.login_with(account.user, account.device, options)
    }

    /// Logs in as `(user, device)`. The server checks the handshake's static key against the
    /// pair; a key it does not know is refused with `UnknownKey` ([`Error::Server`], fatal).
    pub fn login_with(
        mut self,
        user: UserId,
        device: DeviceId,
        options: SessionOptions,
    ) -> Result<Session> {
        let capabilities = session_capabilities(&options);
        let welcome = self.login_exchange(user, device, capabilities)?;
        Session::new(
            self.chan,
            self.identity,
            self.server_key,
            self.timeouts,
            welcome,
            options,
            self.linked_e2ee.take(),
        )
    }

    /// Closes the connection.
    pub fn close(mut self) {
        self.chan
            .raw_mut()
            .close_gracefully(self.timeouts.close_linger);
    }

    /// Sends `Login` announcing `capabilities` and waits for `Welcome`.
    pub(crate) fn login_exchange(
        &mut self,
        user: UserId,
        device: DeviceId,
        capabilities: u64,
    ) -> Result<Welcome> {
        let login = Frame::Login(frame::Login {
            addr: DeviceAddr { user, device },
            revision: PROTOCOL_REVISION,
            capabilities,
        });
        match self.request(&login, "reply to Login")? {
            Frame::Welcome(frame::Welcome {
                addr: DeviceAddr { user: u, device: d },
                revision,
                capabilities,
                server_time_ms,
                keepalive_ms,
                max_frame_bytes,
            }) => {
                if u != user || d != device {
                    return Err(self.fail(ProtocolError::Mismatch("Welcome.user/device")));
                }
                tracing::debug!(
                    user,
                    device,
                    revision,
                    keepalive_ms,
                    max_frame_bytes,
                    "logged in"
                );
                Ok(Welcome {
                    user,
                    device,
                    revision,
                    capabilities,
                    server_time_ms,
                    keepalive_ms,
                    max_frame_bytes,
                })
            }
            other => Err(self.unexpected(&other, "waiting for Welcome")),
        }
    }

    pub(crate) fn into_channel(self) -> Channel {
        self.chan
    }

    /// Sends `frame` and returns the server's reply, answering pings in between. `Error` and
    /// `GoAway` replies become errors. No reply within the request timeout closes the
    /// connection: a late reply would be taken for the answer to the next request.
    fn request(&mut self, frame: &Frame, what: &'static str) -> Result<Frame> {
        self.chan.send(frame)?;
        let deadline = Instant::now() + self.timeouts.request;
        match self.next_frame(Some(deadline))? {
            None => {
                self.chan.raw_mut().close();
                Err(Error::Timeout { what })
            }
            Some(Frame::Error(frame::Error { code, ref_id, text })) => {
                let code = ServerCode(code);
                if code.is_fatal() {
                    self.chan.raw_mut().close();
                }
                Err(Error::Server { code, ref_id, text })
            }
            Some(reply) => Ok(reply),
        }
    }

    /// The next frame before `deadline` (`None` when it passes) that is not a keepalive:
    /// answers `Ping`s, skips `Pong`s, and turns `GoAway` into an error (closing).
    fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>> {
        loop {
            match self.chan.recv(deadline)? {
                Some(Frame::Ping(frame::Ping { nonce })) => {
                    self.chan.send(&Frame::Pong(frame::Pong { nonce }))?
                }
                Some(Frame::Pong { .. }) => {}
                Some(Frame::GoAway(frame::GoAway {
                    code,
                    reconnect_after_ms,
                })) => {
                    self.chan.raw_mut().close();
                    return Err(Error::GoAway {
                        code: ServerCode(code),
                        reconnect_after_ms,
                    });
                }
                other => return Ok(other),
            }
        }
    }

    fn fail(&mut self, e: ProtocolError) -> Error {
        self.chan.raw_mut().close();
        e.into()
    }

    fn unexpected(&mut self, frame: &Frame, during: &'static str) -> Error {
        self.fail(ProtocolError::Unexpected {
            kind: frame.kind(),
            during,
        })
    }
}

fn tcp_connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
    let addrs = addr.to_socket_addrs().map_err(|e| Error::Io {
        op: "resolve server address",
        source: e,
    })?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok((s, a)),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Error::Timeout { what: "connect" }
        }
        Some(e) => Error::Io {
            op: "connect",
            source: e,
        },
        None => Error::Io {
            op: "resolve server address",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        },
    })
}

fn check_server_key(
    identity: &Identity,
    policy: ServerKeyPolicy,
    presented: &[u8; KEY_BYTES],
) -> Result<()> {
    match policy {
        ServerKeyPolicy::Expect(expected) if &expected == presented => Ok(()),
        ServerKeyPolicy::Expect(expected) => Err(Error::ServerKeyChanged {
            pinned: expected,
            presented: *presented,
        }),
        ServerKeyPolicy::TrustOnFirstUse => match identity.pinned_server_key()? {
            Some(pinned) if &pinned == presented => Ok(()),
            Some(pinned) => Err(Error::ServerKeyChanged {
                pinned,
                presented: *presented,
            }),
            None => {
                tracing::info!(server_key = %hex::encode(presented), "pinning server key on first use");
                identity.pin_server_key(presented)
            }
        },
        ServerKeyPolicy::Repin => match identity.pinned_server_key()? {
            Some(pinned) if &pinned == presented => Ok(()),
            previous => {
                if let Some(old) = previous {
                    tracing::warn!(old = %hex::encode(old), new = %hex::encode(presented), "server key changed; re-pinning as asked");
                }
                identity.pin_server_key(presented)
            }
        },
    }
}

/// What a session with `options` announces in `Login`.
pub(crate) fn session_capabilities(options: &SessionOptions) -> u64 {
    if options.e2ee {
        CLIENT_CAPABILITIES | capability::PREKEYS
    } else {
        CLIENT_CAPABILITIES
    }
}
