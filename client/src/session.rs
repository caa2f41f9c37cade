//! A logged-in session: send, receive, acknowledge, keep alive, reconnect.
//!
//! # Acknowledgements (exactly when)
//!
//! Every `Deliver` and `Receipt` the server pushes carries a mailbox `seq`; the server keeps
//! re-sending it (after a reconnect) until the client `Ack`s it. The session acknowledges an
//! item only **after [`Session::recv`] has returned its event to the caller**, never before:
//!
//! * One socket read can bring several frames. They are decoded into an internal queue and
//!   handed out one per `recv` call. The seq of each event handed out is remembered.
//! * When the queue is empty and `recv` is about to read the socket again, it first sends
//!   **one `Ack` frame with every remembered seq** (a batch per read; split at 1024 seqs).
//!   [`Session::flush_acks`] and [`Session::close`] send the batch at once;
//!   [`Session::ping`] and [`Session::wait_server_ack`] do too before they read.
//! * So an event is acknowledged once the caller comes back for more. A process that dies
//!   while handling an event has not acknowledged it and gets it again: delivery is
//!   at-least-once. With `persist_dedup`, the dedup cache is saved to the state directory
//!   before each `Ack` is sent, so a redelivery after a restart is still recognised.
//! * A duplicate `Deliver` (same `(from_user, from_device, client_msg_id)` as a message
//!   already handed out) is not shown to the caller; its seq joins the next batch.
//! * Dropping a `Session` without [`Session::close`] sends nothing: unacknowledged items are
//!   redelivered next time (and deduplicated).
//!
//! # Keepalive
//!
//! While the caller is inside `recv` (or `ping` / `wait_server_ack`), the session sends a
//! `Ping` whenever it has sent nothing for `Welcome.keepalive_ms`, and declares the
//! connection dead ([`Error::Timeout`] `"pong"`, connection closed) if no frame at all
//! arrives within [`Timeouts::pong`] (default: two keepalive periods) of an unanswered ping. A caller that does not call
//! `recv` for longer than the server's idle timeout will be disconnected; call `recv` with a
//! short timeout (or [`Session::try_recv`]) from the application's loop.
//!
//! # End-to-end encryption
//!
//! With [`SessionOptions::e2ee`] every payload is end-to-end encrypted (see [`crate::secure`]):
//! `send` encrypts (fetching the peer's prekey bundle when there is no session yet), `recv`
//! decrypts each message when it hands it out, and the encryption state is saved before the
//! `Ack` that acknowledges it (after the dedup cache). An identity change is
//! [`Error::IdentityChanged`] on send and [`Event::IdentityChanged`] on receive; the message
//! stays held, unacknowledged, until [`Session::accept_identity`].
//!
//! # Memory bounds
//!
//! The outbox holds at most `outbox_capacity` messages, the dedup cache `dedup_capacity`
//! keys, and the event queue [`EVENT_QUEUE_CAPACITY`] events. When the queue is full (the
//! caller is not draining it) further events are dropped *without* acknowledgement, so the
//! server delivers them again after the next reconnect.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{
    sizes, DeviceKeys, OneTimePrekey, PrekeyStatusReason, ReceiptKind, ACK_SEQS_MAX,
};
use protocol::noise::KEY_BYTES;
use protocol::wire::{RECORD_BODY_MAX, TAG_BYTES};
use protocol::{
    frame, Address, DeviceAddr, DeviceId, ErrorCode, Frame, Message, MsgType, ReceiptInfo, UserId,
};

use crate::channel::Channel;
use crate::codec::{PayloadCodec, PlaintextCodec};
use crate::connection::{session_capabilities, Connection, ServerKeyPolicy, Timeouts, Welcome};
use crate::dedup::{DedupCache, MsgKey, DEDUP_CAPACITY_DEFAULT};
use crate::error::{Error, ProtocolError, Result, ServerCode};
use crate::outbox::{Outbox, PendingSend, OUTBOX_CAPACITY_DEFAULT};
use crate::secure::{self, Held, PrekeyCount, Secure, PREKEY_TOP_UP_DEFAULT};
use crate::state::{Identity, DEDUP_FILE};
use switchboard_e2ee::envelope::PREKEY_MESSAGE_OVERHEAD;
use switchboard_e2ee::{Error as E2eeError, PreKeyBundle, SafetyNumber};

/// Most decoded events waiting to be returned by [`Session::recv`].
pub const EVENT_QUEUE_CAPACITY: usize = 4096;

/// Pong timeout when neither the caller nor the server's keepalive sets one.
const PONG_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Frames per write when resending the outbox.
const RESEND_BATCH_FRAMES: usize = 64;

/// Session tuning. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// Keys remembered for deduplicating deliveries. Default 4096.
    pub dedup_capacity: usize,
    /// Load the dedup cache from `seen.txt` in the state directory at login and save it before
    /// every `Ack`, so duplicates are recognised across restarts. Ignored without a state
    /// directory. Default off.
    pub persist_dedup: bool,
    /// Most messages awaiting their ✓. Default 1024.
    pub outbox_capacity: usize,
    /// Overrides the keepalive interval the server announced (`Some(Duration::ZERO)`
    /// disables pings). Default `None`: use `Welcome.keepalive_ms`.
    pub keepalive: Option<Duration>,
    /// End-to-end encrypt every payload (X3DH + Double Ratchet, [`crate::secure`]); the state
    /// lives in `<state>/e2ee/`. Needs a server with the `PREKEYS` capability. Default off
    /// (payloads go through the [`PayloadCodec`]).
    pub e2ee: bool,
    /// With `e2ee`: one-time prekeys uploaded by itself whenever the server reports fewer than
    /// its low-water mark (at login, or as others use them up); 0 never uploads without
    /// [`Session::upload_prekeys`]. Default 100.
    pub prekey_top_up: u32,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            dedup_capacity: DEDUP_CAPACITY_DEFAULT,
            persist_dedup: false,
            outbox_capacity: OUTBOX_CAPACITY_DEFAULT,
            keepalive: None,
            e2ee: false,
            prekey_top_up: PREKEY_TOP_UP_DEFAULT,
        }
    }
}

/// Something that happened on the session, returned by [`Session::recv`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message for this device, as the server delivered it except for the payload, which
    /// is decoded by the [`PayloadCodec`] (or decrypted, with E2EE). Duplicates are removed.
    /// Pass its `client_msg_id` to [`Session::mark_read`].
    Message(Message),
    /// ✓✓: a message this device sent reached the recipient's device. May repeat.
    Delivered {
        /// The recipient's device.
        by: DeviceAddr,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
    },
    /// Blue ✓✓: the recipient read a message this device sent. May repeat.
    Read {
        /// The reader's device.
        by: DeviceAddr,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
    },
    /// ✓: the server stored a message durably. It left the outbox.
    ServerAck {
        /// The message.
        client_msg_id: u64,
        /// The server's timestamp for it, ms since the Unix epoch.
        server_ts_ms: u64,
    },
    /// The server refused a message this device sent (`NoSuchRecipient`, `PayloadTooLarge`,
    /// `UnsupportedAddress`: for good, it left the outbox; `StorageUnavailable`: for now, it
    /// stays in the outbox, and [`Session::resend_pending`] or [`Session::send_with_id`] with
    /// the same id retries it).
    SendFailed {
        /// The message.
        client_msg_id: u64,
        /// Why.
        code: ServerCode,
        /// The server's detail.
        text: String,
    },
    /// A non-fatal `Error` frame not tied to a message in the outbox (for example an answer to
    /// `Read`, or a code this build does not know).
    ServerError {
        /// The code.
        code: ServerCode,
        /// What it refers to, or 0.
        ref_id: u64,
        /// Detail.
        text: String,
    },
    /// A message arrived but the [`PayloadCodec`] could not decode it. It is acknowledged
    /// like any other event (it would never decode later).
    Undecodable {
        /// The message as delivered (its payload as received, not decoded).
        message: Message,
        /// The codec's reason.
        reason: String,
    },
    /// End-to-end encryption: a contact's identity key changed (a new first message under
    /// another identity). Its messages are held, unacknowledged, until
    /// [`Session::accept_identity`] (after the user compared the new safety number); then they
    /// are decrypted and handed out. Never silently accepted.
    IdentityChanged {
        /// The contact.
        user: UserId,
        /// The contact's device.
        device: DeviceId,
        /// The safety number with the new identity, grouped in blocks of five digits.
        safety_number: String,
    },
    /// The server is going away; it will close the connection. Call [`Session::reconnect`]
    /// after `reconnect_after_ms`.
    GoAway {
        /// Why (usually `ShuttingDown`).
        code: ServerCode,
        /// Wait at least this long before reconnecting.
        reconnect_after_ms: u32,
    },
}

pub(crate) struct Queued {
    event: Event,
    /// Mailbox seqs to acknowledge once the event is handed out (the item's own seq plus those
    /// of duplicates that arrived while it waited in the queue).
    seqs: Vec<u64>,
    /// Dedup key, for messages.
    key: Option<MsgKey>,
    /// A message whose payload is still an E2EE envelope (decrypted when handed out).
    encrypted: bool,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("seqs", &self.seqs)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// What handing out an encrypted message came to.
enum Opened {
    /// Decrypted (or undecodable): hand it out.
    Ready(Queued),
    /// Held or dropped; maybe an event to show instead.
    Consumed(Option<Event>),
}

/// A logged-in connection. Not thread-safe by itself (`&mut self` everywhere); move it into
/// the thread that drives it, and feed it work through a channel (see the `chat talk` command).
pub struct Session {
    chan: Channel,
    identity: Identity,
    server_key: [u8; KEY_BYTES],
    timeouts: Timeouts,
    welcome: Welcome,
    /// Ping after this long without sending (None: never).
    keepalive: Option<Duration>,
    /// The caller's override, kept to recompute `keepalive` after a reconnect.
    keepalive_option: Option<Duration>,
    codec: Box<dyn PayloadCodec>,
    outbox: Outbox,
    seen: DedupCache,
    seen_path: Option<PathBuf>,
    seen_dirty: bool,
    queue: VecDeque<Queued>,
    acks_due: Vec<u64>,
    last_tx: Instant,
    last_rx: Instant,
    /// Outstanding ping: nonce and when it was sent.
    ping: Option<(u64, Instant)>,
    /// The last pong that matched a ping: nonce and round-trip time.
    last_pong: Option<(u64, Duration)>,
    ping_nonce: u64,
    /// Capabilities announced at login (kept for reconnects).
    capabilities: u64,
    /// End-to-end encryption, when on.
    secure: Option<Secure<Queued>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("welcome", &self.welcome)
            .field("peer", &self.chan.raw().peer())
            .field("outbox", &self.outbox.len())
            .field("queued", &self.queue.len())
            .field("acks_due", &self.acks_due.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        chan: Channel,
        identity: Identity,
        server_key: [u8; KEY_BYTES],
        timeouts: Timeouts,
        welcome: Welcome,
        options: SessionOptions,
    ) -> Result<Self> {
        let capabilities = session_capabilities(&options);
        let mut chan = chan;
        let secure = if options.e2ee {
            if welcome.capabilities & protocol::capability::PREKEYS == 0 {
                chan.raw_mut().close();
                return Err(Error::E2eeUnsupported);
            }
            match secure::open(&identity, welcome.user, welcome.device) {
                Ok(e2ee) => Some(Secure::new(
                    e2ee,
                    options.prekey_top_up,
                    identity.state_dir(),
                )),
                Err(e) => {
                    chan.raw_mut().close();
                    return Err(e);
                }
            }
        } else {
            None
        };
        let seen_path = match (options.persist_dedup, identity.state_dir()) {
            (true, Some(dir)) => Some(dir.join(DEDUP_FILE)),
            _ => None,
        };
        let seen = match &seen_path {
            Some(p) => DedupCache::load(p, options.dedup_capacity)?,
            None => DedupCache::new(options.dedup_capacity),
        };
        let now = Instant::now();
        let mut session = Self {
            chan,
            identity,
            server_key,
            timeouts,
            keepalive: keepalive_interval(options.keepalive, &welcome),
            keepalive_option: options.keepalive,
            welcome,
            codec: Box::new(PlaintextCodec),
            outbox: Outbox::new(options.outbox_capacity),
            seen,
            seen_path,
            seen_dirty: false,
            queue: VecDeque::new(),
            acks_due: Vec::new(),
            last_tx: now,
            last_rx: now,
            ping: None,
            last_pong: None,
            ping_nonce: rand::random(),
            capabilities,
            secure,
        };
        // An identity the server never acknowledged (a new or wiped state): publish it now.
        let first_upload = session
            .secure
            .as_ref()
            .filter(|s| s.top_up > 0 && !s.published)
            .map(|s| s.top_up as usize);
        if let Some(n) = first_upload {
            session.start_upload(n)?;
        }
        Ok(session)
    }

    /// The logged-in user.
    pub fn user(&self) -> UserId {
        self.welcome.user
    }

    /// The logged-in device.
    pub fn device(&self) -> DeviceId {
        self.welcome.device
    }

    /// What the server said at login.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The server's static public key.
    pub fn server_key(&self) -> [u8; KEY_BYTES] {
        self.server_key
    }

    /// The server address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.chan.raw().peer()
    }

    /// The underlying socket, for inspection (addresses, socket options). Reading from or
    /// writing to it directly would corrupt the encrypted record stream. The session sets the
    /// socket's read timeout on every read from the deadline it was given, and its write
    /// timeout once to [`Timeouts::write`].
    pub fn stream(&self) -> &TcpStream {
        self.chan.raw().stream()
    }

    /// Has the connection been closed (by the server, by a fatal error, or by `close`)? Then
    /// every call but [`Session::reconnect`] fails with [`Error::Closed`].
    pub fn is_closed(&self) -> bool {
        self.chan.raw().is_closed()
    }

    /// Messages sent and not yet acknowledged by the server.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The dedup cache.
    pub fn dedup(&self) -> &DedupCache {
        &self.seen
    }

    /// Seqs of events handed out whose `Ack` has not been sent yet.
    pub fn acks_due(&self) -> usize {
        self.acks_due.len()
    }

    /// Replaces the payload codec (the end-to-end encryption seam; default
    /// [`PlaintextCodec`]).
    pub fn set_codec(&mut self, codec: Box<dyn PayloadCodec>) {
        self.codec = codec;
    }

    /// The largest payload (after encoding) one `Send` can carry on this connection.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_record_body()
            .saturating_sub(TAG_BYTES + 1 + sizes::SEND_HEADER)
    }

    /// The largest record body the server accepts on this connection.
    fn max_record_body(&self) -> usize {
        let announced = self.welcome.max_frame_bytes as usize;
        if announced == 0 {
            RECORD_BODY_MAX
        } else {
            announced.min(RECORD_BODY_MAX)
        }
    }

    // ----- end-to-end encryption -----

    /// Whether payloads are end-to-end encrypted on this session.
    pub fn is_e2ee(&self) -> bool {
        self.secure.is_some()
    }

    /// The device's end-to-end encryption state (identity, sessions, known identities), when
    /// [`SessionOptions::e2ee`] is on.
    pub fn e2ee(&self) -> Option<&switchboard_e2ee::E2ee> {
        self.secure.as_ref().map(|s| &s.e2ee)
    }

    /// What the server last said about this device's one-time prekeys.
    pub fn prekey_count(&self) -> Option<PrekeyCount> {
        self.secure.as_ref().and_then(|s| s.last_count)
    }

    /// The safety number with `contact` (device 0), from the identity recorded for it: compare
    /// it with theirs out of band. `Ok(None)` when nothing is recorded yet.
    pub fn safety_number(&self, contact: UserId) -> Result<Option<SafetyNumber>> {
        let s = self.secure.as_ref().ok_or(Error::E2eeDisabled)?;
        Ok(secure::safety_number(&s.e2ee, contact))
    }

    /// Accepts the changed identity of (`user`, `device`) that [`Error::IdentityChanged`] or
    /// [`Event::IdentityChanged`] reported: call it only after the user agreed (compared the
    /// new safety number). Records the new identity, drops sessions made with the old one, and
    /// puts the held messages of that contact back at the front of the queue, where
    /// [`Session::recv`] decrypts them. Returns whether a change was pending.
    pub fn accept_identity(&mut self, user: UserId, device: DeviceId) -> Result<bool> {
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        let peer = secure::peer(user, device);
        let Some(identity) = s.pending_identity.remove(&peer) else {
            return Ok(false);
        };
        if let Err(e) = s.e2ee.accept_identity(peer, &identity) {
            s.pending_identity.insert(peer, identity);
            return Err(e.into());
        }
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut s.held)
            .into_iter()
            .partition(|h| h.peer == peer);
        s.held = rest;
        for h in mine.into_iter().rev() {
            self.queue.push_front(h.item);
        }
        tracing::info!(user, device, "accepted a changed identity");
        Ok(true)
    }

    /// Contacts whose changed identity waits for [`Session::accept_identity`].
    pub fn pending_identity_changes(&self) -> Vec<(UserId, DeviceId)> {
        let mut v: Vec<(UserId, DeviceId)> = self
            .secure
            .as_ref()
            .map(|s| {
                s.pending_identity
                    .keys()
                    .map(|p| (p.user, p.device))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Fetches the prekey bundle of (`user`, `device`) from the server (consuming one of its
    /// one-time prekeys), verifies the signed prekey signature, and checks the identity against
    /// the one recorded for that contact. Other events that arrive meanwhile stay queued.
    /// Errors: [`Error::Server`] (`NoSuchRecipient` when the device has published no keys,
    /// `PrekeyFetchRateLimited`), [`Error::E2ee`] (`BadSignature`),
    /// [`Error::IdentityChanged`], [`Error::Timeout`].
    pub fn fetch_bundle(&mut self, user: UserId, device: DeviceId) -> Result<PreKeyBundle> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let request_id = new_client_msg_id();
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        s.fetches.insert(request_id, (user, device));
        self.write(&[Frame::PrekeyFetch(frame::PrekeyFetch {
            addr: DeviceAddr { user, device },
            request_id,
        })])?;
        let deadline = Instant::now().checked_add(self.timeouts.request);
        let answer = loop {
            if let Some(a) = self
                .secure
                .as_mut()
                .and_then(|s| s.answers.remove(&request_id))
            {
                break a;
            }
            self.flush_acks()?;
            if !self.pump(deadline)? {
                if let Some(s) = &mut self.secure {
                    s.fetches.remove(&request_id);
                }
                return Err(Error::Timeout {
                    what: "prekey bundle",
                });
            }
        };
        let bundle = answer?;
        bundle.verify_signature()?;
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        let peer = secure::peer(user, device);
        if let Some(known) = s.e2ee.known_identity(peer) {
            if known != bundle.identity() {
                let received = bundle.identity();
                s.bundle_cache.insert(peer, bundle);
                return Err(s.identity_changed(peer, received));
            }
        }
        Ok(bundle)
    }

    /// Uploads `count` new one-time prekeys (and, the first time, a signed prekey) and waits
    /// for the server's answer: what it now holds. The session also does this by itself at
    /// login when its identity has never been published, and when the server reports it runs
    /// low ([`SessionOptions::prekey_top_up`]); if such an upload is on its way, this call
    /// waits for its answer instead of sending another. At most what fits one frame (450 with
    /// 16 KiB records) is uploaded. Refusals are [`Error::Server`]
    /// (`PrekeyLimit`, `BadPrekeySignature`, `InvalidPrekey`, `StorageUnavailable`).
    pub fn upload_prekeys(&mut self, count: usize) -> Result<PrekeyCount> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // One already on its way (a top-up, or the first upload at login) answers this call.
        if !self.secure.as_ref().is_some_and(|s| s.upload_in_flight) {
            self.start_upload(count)?;
        }
        let deadline = Instant::now().checked_add(self.timeouts.request);
        loop {
            if let Some(r) = self.secure.as_mut().and_then(|s| s.upload_result.take()) {
                return r;
            }
            self.flush_acks()?;
            if !self.pump(deadline)? {
                return Err(Error::Timeout {
                    what: "prekey upload answer",
                });
            }
        }
    }

    /// Generates and sends one `PrekeyUpload` (not waiting for the answer).
    fn start_upload(&mut self, count: usize) -> Result<()> {
        let n = count.min(sizes::prekey_upload_max_keys(self.max_record_body()));
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        let (spk, one_time) = match s.e2ee.signed_prekey() {
            Some(spk) => (spk, s.e2ee.generate_one_time_prekeys(n)?),
            None => s.e2ee.generate_prekeys(n)?,
        };
        let identity = s.e2ee.identity();
        s.upload_in_flight = true;
        s.upload_result = None;
        let frame = Frame::PrekeyUpload(frame::PrekeyUpload {
            keys: Box::new(DeviceKeys {
                identity_dh: identity.dh,
                identity_sign: identity.sign,
                signed_prekey_id: spk.id,
                signed_prekey: spk.public,
                signed_prekey_sig: spk.signature,
            }),
            one_time: one_time
                .iter()
                .map(|k| OneTimePrekey {
                    id: k.id,
                    key: k.public,
                })
                .collect(),
        });
        self.write(&[frame])
    }

    /// Encrypts for `to`: with the session there is, else from a fetched (or cached) bundle.
    fn encrypt_for(&mut self, to: Address, plaintext: &[u8]) -> Result<Vec<u8>> {
        let peer = secure::peer(to.id, to.device);
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        match s.e2ee.encrypt(peer, None, plaintext) {
            Ok(envelope) => return Ok(envelope),
            Err(E2eeError::NoSession(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let bundle = match s.bundle_cache.remove(&peer) {
            Some(b) => b,
            None => self.fetch_bundle(to.id, to.device)?,
        };
        let s = self.secure.as_mut().ok_or(Error::E2eeDisabled)?;
        match s.e2ee.encrypt(peer, Some(&bundle), plaintext) {
            Ok(envelope) => Ok(envelope),
            Err(E2eeError::IdentityChanged { received, .. }) => {
                s.bundle_cache.insert(peer, bundle);
                Err(s.identity_changed(peer, *received))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `payload` (end-to-end encrypted with [`SessionOptions::e2ee`], else encoded by
    /// the codec) to device 0 of `to_user` under a fresh random
    /// nonzero `client_msg_id`, which it returns. The message waits in the outbox until its
    /// ✓ ([`Event::ServerAck`]) or refusal ([`Event::SendFailed`]) arrives. If the write fails,
    /// the message stays in the outbox and [`Session::reconnect`] resends it: do not send it
    /// again under a new id.
    pub fn send(&mut self, to_user: UserId, payload: &[u8], msg_type: MsgType) -> Result<u64> {
        let client_msg_id = new_client_msg_id();
        self.send_with_id(client_msg_id, to_user, payload, msg_type)?;
        Ok(client_msg_id)
    }

    /// Sends under a caller-chosen `client_msg_id` (nonzero, unique per device). If that id is
    /// still in the outbox, the stored encoded payload is sent again unchanged (`payload` is
    /// ignored): that is a retry, which the server deduplicates.
    pub fn send_with_id(
        &mut self,
        client_msg_id: u64,
        to_user: UserId,
        payload: &[u8],
        msg_type: MsgType,
    ) -> Result<()> {
        if client_msg_id == 0 {
            return Err(Error::ZeroMessageId);
        }
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let frame = match self.outbox.get(client_msg_id) {
            Some(p) => send_frame(p),
            None => {
                if !is_valid_user_id(to_user) {
                    return Err(Error::InvalidPhone(to_user.to_string()));
                }
                if self.outbox.is_full() {
                    return Err(Error::OutboxFull {
                        capacity: self.outbox.capacity(),
                    });
                }
                let to = Address::device(to_user, 0);
                let max = self.max_payload_bytes();
                let encoded = if self.secure.is_some() {
                    // Checked before encrypting, so a refusal does not step the ratchet.
                    if payload.len() + PREKEY_MESSAGE_OVERHEAD > max {
                        return Err(Error::PayloadTooLarge {
                            len: payload.len() + PREKEY_MESSAGE_OVERHEAD,
                            max,
                        });
                    }
                    Bytes::from(self.encrypt_for(to, payload)?)
                } else {
                    self.codec.encode(to, msg_type, payload)?
                };
                if encoded.len() > max {
                    return Err(Error::PayloadTooLarge {
                        len: encoded.len(),
                        max,
                    });
                }
                let entry = PendingSend {
                    client_msg_id,
                    to,
                    msg_type,
                    payload: encoded,
                    attempts: 0,
                    first_sent_at: Instant::now(),
                };
                let frame = send_frame(&entry);
                self.outbox.push(entry);
                frame
            }
        };
        self.outbox.note_attempt(client_msg_id);
        self.write(&[frame])
    }

    /// Sends everything in the outbox again, oldest first, with the same ids (after a
    /// reconnect; [`Session::reconnect`] calls it). Returns how many messages were sent.
    pub fn resend_pending(&mut self) -> Result<usize> {
        let frames: Vec<(u64, Frame)> = self
            .outbox
            .iter()
            .map(|p| (p.client_msg_id, send_frame(p)))
            .collect();
        for chunk in frames.chunks(RESEND_BATCH_FRAMES) {
            let batch: Vec<Frame> = chunk.iter().map(|(_, f)| f.clone()).collect();
            self.write(&batch)?;
            for (id, _) in chunk {
                self.outbox.note_attempt(*id);
            }
        }
        Ok(frames.len())
    }

    /// Tells the sender (device 0 of `from_user`) that message `client_msg_id` was read.
    pub fn mark_read(&mut self, from_user: UserId, client_msg_id: u64) -> Result<()> {
        self.write(&[Frame::Read(frame::Read {
            to: Address::device(from_user, 0),
            client_msg_id,
        })])
    }

    /// The next event, waiting up to `timeout` (`None`: until one arrives). `Ok(None)` means
    /// the timeout passed. `Some(Duration::ZERO)` polls (it looks at the socket for at most
    /// about a millisecond). See the module documentation for when acks are sent.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Event>> {
        // A timeout too large for an Instant means "forever".
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if let Some(event) = self.pop() {
                return Ok(Some(event));
            }
            self.flush_acks()?;
            if !self.pump(deadline)? {
                return Ok(None);
            }
        }
    }

    /// `recv(Some(Duration::ZERO))`: an event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Event>> {
        self.recv(Some(Duration::ZERO))
    }

    /// Sends the `Ack` for every event already handed out (and for dropped duplicates), after
    /// saving the dedup cache when it is persisted.
    pub fn flush_acks(&mut self) -> Result<()> {
        if self.acks_due.is_empty() {
            return self.save_dedup();
        }
        self.save_dedup()?;
        let frames: Vec<Frame> = self
            .acks_due
            .chunks(ACK_SEQS_MAX)
            .map(|c| Frame::Ack(frame::Ack { seqs: c.to_vec() }))
            .collect();
        self.write(&frames)?;
        self.acks_due.clear();
        Ok(())
    }

    /// Sends a `Ping` and waits for its `Pong`, queueing whatever else arrives meanwhile for
    /// [`Session::recv`]. Returns the round-trip time. No answer within [`Timeouts::pong`]
    /// closes the connection ([`Error::Timeout`]).
    pub fn ping(&mut self) -> Result<Duration> {
        self.flush_acks()?;
        let nonce = self.send_ping()?;
        loop {
            if let Some((n, rtt)) = self.last_pong {
                if n == nonce {
                    return Ok(rtt);
                }
            }
            // The pong deadline is enforced inside pump (connection declared dead).
            self.pump(None)?;
        }
    }

    /// Waits up to `timeout` for the ✓ of `client_msg_id` and returns the server timestamp.
    /// Other events that arrive meanwhile stay queued for [`Session::recv`]; the matching
    /// `ServerAck` (or `SendFailed`) event is consumed. A refusal is [`Error::SendRejected`];
    /// running out of time is [`Error::Timeout`] (the connection stays open and the message
    /// stays in the outbox).
    pub fn wait_server_ack(&mut self, client_msg_id: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let found = self.queue.iter().position(|q| match &q.event {
                Event::ServerAck {
                    client_msg_id: id, ..
                }
                | Event::SendFailed {
                    client_msg_id: id, ..
                } => *id == client_msg_id,
                _ => false,
            });
            if let Some(event) = found.and_then(|i| self.queue.remove(i)).map(|q| q.event) {
                return match event {
                    Event::ServerAck { server_ts_ms, .. } => Ok(server_ts_ms),
                    Event::SendFailed { code, text, .. } => Err(Error::SendRejected {
                        client_msg_id,
                        code,
                        text,
                    }),
                    _ => Err(Error::Closed),
                };
            }
            self.flush_acks()?;
            if !self.pump(deadline)? {
                return Err(Error::Timeout { what: "server ack" });
            }
        }
    }

    /// Opens a new connection to the same server (the server key must be unchanged), logs in
    /// as the same device, and resends the outbox. Events that were queued but not yet handed
    /// out, and acks not yet sent, are dropped: the server redelivers those items, and the
    /// dedup cache hides the ones already handed out. Returns how many messages were resent.
    pub fn reconnect(&mut self) -> Result<usize> {
        self.chan.raw_mut().close();
        let peer = self.chan.raw().peer();
        let mut conn = Connection::connect_with(
            peer,
            &self.identity,
            self.timeouts,
            ServerKeyPolicy::Expect(self.server_key),
        )?;
        let welcome =
            conn.login_exchange(self.welcome.user, self.welcome.device, self.capabilities)?;
        self.chan = conn.into_channel();
        self.keepalive = keepalive_interval(self.keepalive_option, &welcome);
        self.welcome = welcome;
        self.queue.retain(|q| q.seqs.is_empty());
        self.acks_due.clear();
        if let Some(s) = &mut self.secure {
            // Held deliveries were not acknowledged: the server sends them again (and they are
            // held again while the identity change is pending). Fetches in flight are lost.
            s.held.clear();
            s.fetches.clear();
            s.upload_in_flight = false;
        }
        // A first upload that was lost with the old connection is sent again.
        let republish = self
            .secure
            .as_ref()
            .filter(|s| s.top_up > 0 && !s.published)
            .map(|s| s.top_up as usize);
        if let Some(n) = republish {
            self.start_upload(n)?;
        }
        let now = Instant::now();
        self.last_tx = now;
        self.last_rx = now;
        self.ping = None;
        self.resend_pending()
    }

    /// Sends the pending acks, saves the dedup cache, and closes the connection gracefully
    /// (this side stops writing, then waits up to [`Timeouts::close_linger`] for the server to
    /// close). Returns the error of the final flush, if any; the connection is closed anyway.
    pub fn close(mut self) -> Result<()> {
        let flushed = if self.is_closed() {
            self.save_dedup()
        } else {
            self.flush_acks()
        };
        self.chan
            .raw_mut()
            .close_gracefully(self.timeouts.close_linger);
        flushed
    }

    // ----- internals -----

    /// Pops the next event and records what its hand-out owes (acks, dedup). Encrypted
    /// messages are decrypted here, when they are handed out.
    fn pop(&mut self) -> Option<Event> {
        loop {
            let mut q = self.queue.pop_front()?;
            if q.encrypted {
                match self.open_envelope(q) {
                    Opened::Ready(ready) => q = ready,
                    Opened::Consumed(Some(event)) => return Some(event),
                    Opened::Consumed(None) => continue,
                }
            }
            self.mark_handed_out(&q);
            return Some(q.event);
        }
    }

    fn mark_handed_out(&mut self, q: &Queued) {
        self.acks_due.extend_from_slice(&q.seqs);
        if let Some(key) = q.key {
            self.seen.insert(key);
            self.seen_dirty = true;
        }
    }

    /// Decrypts a queued envelope (deferred: saved before the next `Ack`), holds it for a
    /// pending identity change, or drops a replay.
    fn open_envelope(&mut self, mut q: Queued) -> Opened {
        let Some(secure) = self.secure.as_mut() else {
            q.encrypted = false;
            return Opened::Ready(q);
        };
        let Event::Message(message) = &q.event else {
            q.encrypted = false;
            return Opened::Ready(q);
        };
        let DeviceAddr {
            user: from_user,
            device: from_device,
        } = message.from;
        let client_msg_id = message.client_msg_id;
        let peer = secure::peer(from_user, from_device);
        if let Some(pending) = secure.pending_identity.get(&peer) {
            // The peer's identity change waits for acceptance: hold this message too (in
            // order), and say so when it is the first one held (the change may have been seen
            // on the send path only).
            let first = !secure.held.iter().any(|h| h.peer == peer);
            let event = first.then(|| Event::IdentityChanged {
                user: from_user,
                device: from_device,
                safety_number: secure::safety_number_with(&secure.e2ee, from_user, pending)
                    .grouped(),
            });
            secure.held.push(Held { peer, item: q });
            return Opened::Consumed(event);
        }
        match secure.e2ee.decrypt_deferred(peer, &message.payload) {
            Ok(plaintext) => {
                secure.dirty = true;
                q.event = Event::Message(Message {
                    payload: Bytes::copy_from_slice(&plaintext),
                    ..message.clone()
                });
                q.encrypted = false;
                Opened::Ready(q)
            }
            Err(E2eeError::IdentityChanged { received, .. }) => {
                let event = match secure.identity_changed(peer, *received) {
                    Error::IdentityChanged {
                        user,
                        device,
                        safety_number,
                    } => Some(Event::IdentityChanged {
                        user,
                        device,
                        safety_number,
                    }),
                    _ => None,
                };
                tracing::warn!(
                    user = from_user,
                    device = from_device,
                    "identity key changed; message held until accept_identity"
                );
                secure.held.push(Held { peer, item: q });
                Opened::Consumed(event)
            }
            Err(E2eeError::DuplicateMessage) => {
                // Its key was used: this message was handed out before (and the state saved).
                tracing::debug!(from_user, client_msg_id, "replayed envelope dropped");
                self.mark_handed_out(&q);
                Opened::Consumed(None)
            }
            Err(e) => {
                tracing::debug!(from_user, client_msg_id, error = %e, "undecryptable message");
                q.event = Event::Undecodable {
                    message: message.clone(),
                    reason: e.to_string(),
                };
                q.encrypted = false;
                Opened::Ready(q)
            }
        }
    }

    fn save_dedup(&mut self) -> Result<()> {
        if let (true, Some(path)) = (self.seen_dirty, &self.seen_path) {
            self.seen.save(path)?;
            self.seen_dirty = false;
        }
        // Decryptions handed out since the last ack become durable before their ack.
        if let Some(s) = &mut self.secure {
            s.save_if_dirty()?;
        }
        Ok(())
    }

    fn write(&mut self, frames: &[Frame]) -> Result<()> {
        if tracing::enabled!(tracing::Level::TRACE) {
            for f in frames {
                tracing::trace!(kind = ?f.kind(), "frame sent");
            }
        }
        self.chan.send_all(frames)?;
        self.last_tx = Instant::now();
        Ok(())
    }

    /// How long an unanswered ping may wait (see [`Timeouts::pong`]).
    fn pong_timeout(&self) -> Duration {
        self.timeouts
            .pong
            .unwrap_or_else(|| self.keepalive.map_or(PONG_TIMEOUT_DEFAULT, |k| 2 * k))
    }

    fn send_ping(&mut self) -> Result<u64> {
        self.ping_nonce = self.ping_nonce.wrapping_add(1);
        let nonce = self.ping_nonce;
        self.write(&[Frame::Ping(frame::Ping { nonce })])?;
        self.ping = Some((nonce, Instant::now()));
        tracing::trace!(nonce, "ping");
        Ok(nonce)
    }

    /// Reads and handles one frame, keeping the connection alive meanwhile. `Ok(false)` when
    /// `deadline` passed first.
    fn pump(&mut self, deadline: Option<Instant>) -> Result<bool> {
        loop {
            let now = Instant::now();
            let mut wake = deadline;
            if let Some((_, sent)) = self.ping {
                let dead_at = sent.max(self.last_rx) + self.pong_timeout();
                if now >= dead_at {
                    self.chan.raw_mut().close();
                    return Err(Error::Timeout { what: "pong" });
                }
                wake = Some(wake.map_or(dead_at, |w| w.min(dead_at)));
            } else if let Some(interval) = self.keepalive {
                let due = self.last_tx + interval;
                if now >= due {
                    self.send_ping()?;
                    continue;
                }
                wake = Some(wake.map_or(due, |w| w.min(due)));
            }
            match self.chan.recv(wake)? {
                Some(frame) => {
                    self.last_rx = Instant::now();
                    tracing::trace!(kind = ?frame.kind(), "frame received");
                    self.handle(frame)?;
                    return Ok(true);
                }
                None if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(false),
                None => {}
            }
        }
    }

    fn enqueue(&mut self, q: Queued) {
        if self.queue.len() >= EVENT_QUEUE_CAPACITY {
            tracing::warn!(
                capacity = EVENT_QUEUE_CAPACITY,
                "event queue full; dropping an event unacknowledged (the server will redeliver it)"
            );
            return;
        }
        self.queue.push_back(q);
    }

    /// A `Deliver`: drop a duplicate (still acknowledged), else queue the message, its payload
    /// decoded (or left encrypted for [`Session::recv`] to open).
    fn on_deliver(&mut self, frame::Deliver { seq, message }: frame::Deliver) {
        let key = MsgKey::of(&message);
        let (from_user, client_msg_id) = (message.from.user, message.client_msg_id);
        if self.seen.contains(&key) {
            tracing::debug!(from_user, client_msg_id, seq, "duplicate delivery dropped");
            self.seen.insert(key);
            self.acks_due.push(seq);
            return;
        }
        if let Some(q) = self.queue.iter_mut().find(|q| q.key == Some(key)) {
            tracing::debug!(
                from_user,
                client_msg_id,
                seq,
                "duplicate delivery of a queued message dropped"
            );
            if !q.seqs.contains(&seq) {
                q.seqs.push(seq);
            }
            return;
        }
        if self.secure.is_some() {
            return self.enqueue(Queued {
                event: Event::Message(message),
                seqs: vec![seq],
                key: Some(key),
                encrypted: true,
            });
        }
        let from = Address::from(message.from);
        let event = match self
            .codec
            .decode(from, message.msg_type, message.payload.clone())
        {
            Ok(payload) => Event::Message(Message { payload, ..message }),
            Err(e) => Event::Undecodable {
                message,
                reason: e.reason,
            },
        };
        self.enqueue(Queued {
            event,
            seqs: vec![seq],
            key: Some(key),
            encrypted: false,
        });
    }

    fn handle(&mut self, frame: Frame) -> Result<()> {
        match frame {
            Frame::Deliver(d) => self.on_deliver(d),
            Frame::Receipt(frame::Receipt { seq, receipt }) => {
                let ReceiptInfo {
                    from: by,
                    client_msg_id,
                    kind,
                    ts_ms,
                } = receipt;
                let event = match kind {
                    ReceiptKind::DELIVERED => Event::Delivered {
                        by,
                        client_msg_id,
                        ts_ms,
                    },
                    ReceiptKind::READ => Event::Read {
                        by,
                        client_msg_id,
                        ts_ms,
                    },
                    // The decoder refuses kinds it does not know: not reached.
                    _ => return Ok(()),
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![seq],
                    key: None,
                    encrypted: false,
                });
            }
            Frame::ServerAck(frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            }) => {
                self.outbox.remove(client_msg_id);
                self.enqueue(Queued {
                    event: Event::ServerAck {
                        client_msg_id,
                        server_ts_ms,
                    },
                    seqs: vec![],
                    key: None,
                    encrypted: false,
                });
            }
            Frame::Error(frame::Error { code, ref_id, text }) => {
                let code = ServerCode(code);
                if code.is_fatal() {
                    tracing::debug!(%code, %text, "fatal server error");
                    self.chan.raw_mut().close();
                    return Err(Error::Server { code, ref_id, text });
                }
                if let Some(s) = &mut self.secure {
                    // The answer to a prekey fetch.
                    if ref_id != 0 && s.fetches.remove(&ref_id).is_some() {
                        s.answers
                            .insert(ref_id, Err(Error::Server { code, ref_id, text }));
                        return Ok(());
                    }
                    // The answer to a prekey upload.
                    let upload_error = matches!(
                        code.known(),
                        Some(
                            ErrorCode::BadPrekeySignature
                                | ErrorCode::PrekeyLimit
                                | ErrorCode::InvalidPrekey
                        )
                    ) || (ref_id == 0
                        && s.upload_in_flight
                        && code.is(ErrorCode::StorageUnavailable));
                    if upload_error {
                        tracing::warn!(%code, %text, "prekey upload refused");
                        s.upload_in_flight = false;
                        s.upload_result = Some(Err(Error::Server {
                            code,
                            ref_id,
                            text: text.clone(),
                        }));
                    }
                }
                // StorageUnavailable is temporary: the message stays in the outbox for
                // resend_pending. Every other refusal of a Send is final.
                let pending = ref_id != 0 && self.outbox.get(ref_id).is_some();
                if pending && !code.is(ErrorCode::StorageUnavailable) {
                    self.outbox.remove(ref_id);
                }
                let event = if pending {
                    Event::SendFailed {
                        client_msg_id: ref_id,
                        code,
                        text,
                    }
                } else {
                    Event::ServerError { code, ref_id, text }
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![],
                    key: None,
                    encrypted: false,
                });
            }
            Frame::GoAway(frame::GoAway {
                code,
                reconnect_after_ms,
            }) => {
                let event = Event::GoAway {
                    code: ServerCode(code),
                    reconnect_after_ms,
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![],
                    key: None,
                    encrypted: false,
                });
            }
            Frame::PrekeyBundle(frame::PrekeyBundle {
                request_id,
                keys,
                one_time,
                ..
            }) => {
                if let Some(s) = &mut self.secure {
                    if s.fetches.remove(&request_id).is_some() {
                        let bundle = secure::bundle_from_frame(&keys, one_time);
                        s.answers.insert(request_id, Ok(bundle));
                    }
                }
            }
            Frame::PrekeyStatus(frame::PrekeyStatus {
                one_time_remaining,
                low_water,
                reason,
            }) => {
                let Some(s) = &mut self.secure else {
                    return Ok(());
                };
                let count = PrekeyCount {
                    one_time_remaining,
                    low_water,
                };
                s.last_count = Some(count);
                match reason {
                    PrekeyStatusReason::UPLOADED => {
                        s.upload_in_flight = false;
                        s.upload_result = Some(Ok(count));
                        s.mark_published();
                    }
                    PrekeyStatusReason::BELOW_LOW_WATER | PrekeyStatusReason::EXHAUSTED
                        if s.top_up > 0 && !s.upload_in_flight =>
                    {
                        let n = s.top_up as usize;
                        tracing::debug!(one_time_remaining, n, "topping up one-time prekeys");
                        match self.start_upload(n) {
                            Ok(()) => {}
                            // The write failure closed the connection; recv reports it.
                            Err(e @ Error::Io { .. }) => return Err(e),
                            Err(e) => tracing::warn!(error = %e, "prekey top-up failed"),
                        }
                    }
                    // Low, but top-up is off or an upload is on its way; the decoder refuses
                    // reasons it does not know, so nothing else arrives here.
                    _ => {}
                }
            }
            Frame::Ping(frame::Ping { nonce }) => {
                self.write(&[Frame::Pong(frame::Pong { nonce })])?
            }
            Frame::Pong(frame::Pong { nonce }) => {
                if let Some((expected, sent)) = self.ping {
                    if expected == nonce {
                        self.ping = None;
                        self.last_pong = Some((nonce, sent.elapsed()));
                    }
                }
            }
            other => {
                self.chan.raw_mut().close();
                return Err(ProtocolError::Unexpected {
                    kind: other.kind(),
                    during: "logged in",
                }
                .into());
            }
        }
        Ok(())
    }
}

fn keepalive_interval(option: Option<Duration>, welcome: &Welcome) -> Option<Duration> {
    match option {
        Some(d) => (!d.is_zero()).then_some(d),
        None => (welcome.keepalive_ms != 0)
            .then(|| Duration::from_millis(u64::from(welcome.keepalive_ms))),
    }
}

fn send_frame(p: &PendingSend) -> Frame {
    Frame::Send(frame::Send {
        client_msg_id: p.client_msg_id,
        to: p.to,
        msg_type: p.msg_type,
        payload: p.payload.clone(),
    })
}

/// A fresh `client_msg_id`: 64 random bits from the thread RNG (seeded from the OS), never 0.
/// Random ids need no state across restarts or between processes sharing a state directory;
/// two ids of one device collide with probability about n²/2⁶⁵ for n messages.
pub fn new_client_msg_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}
