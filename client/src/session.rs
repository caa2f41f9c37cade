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

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{
    sizes, DeviceKeys, DeviceListReason, OneTimePrekey, PrekeyStatusReason, ReceiptKind,
    ACK_SEQS_MAX, SEND_COPY_HEADER_BYTES,
};
use protocol::group::GroupEnvelope;
use protocol::noise::KEY_BYTES;
use protocol::wire::{RECORD_BODY_MAX, TAG_BYTES};
use protocol::{
    capability, frame, Address, DeviceAddr, DeviceCopy, DeviceId, ErrorCode, Frame, Message,
    MsgType, ReceiptInfo, UserId,
};

use crate::channel::Channel;
use crate::codec::{PayloadCodec, PlaintextCodec};
use crate::connection::{session_capabilities, Connection, ServerKeyPolicy, Timeouts, Welcome};
use crate::dedup::{DedupCache, MsgKey, DEDUP_CAPACITY_DEFAULT};
use crate::devices::{
    unwrap_sync, wrap_sync, DeviceInfo, DeviceList, DeviceListCache, DeviceListUpdate, LinkString,
    MessageReceipts, ReceiptTracker, SYNC_OVERHEAD,
};
use crate::error::{Error, LinkRefusal, ProtocolError, Result, ServerCode, UnlinkRefusal};
use crate::outbox::{Outbox, PendingSend, OUTBOX_CAPACITY_DEFAULT};
use crate::secure::{self, Held, PrekeyCount, Secure, PREKEY_TOP_UP_DEFAULT};
use crate::state::{Identity, DEDUP_FILE};
use switchboard_e2ee::envelope::PREKEY_MESSAGE_OVERHEAD;
use switchboard_e2ee::{E2ee, Error as E2eeError, IdentityPublic, PreKeyBundle, SafetyNumber};

/// Most decoded events waiting to be returned by [`Session::recv`].
pub const EVENT_QUEUE_CAPACITY: usize = 4096;

/// Pong timeout when neither the caller nor the server's keepalive sets one.
const PONG_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Frames per write when resending the outbox.
const RESEND_BATCH_FRAMES: usize = 64;

/// Times a `SendMulti` refused as stale is re-encrypted and sent again before it fails with
/// [`Error::DeviceListStale`].
pub const STALE_RETRIES_MAX: u32 = 3;

/// Senders of recently handed-out messages remembered for [`Session::mark_read`].
const SENDERS_REMEMBERED: usize = 4096;

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
    /// ✓✓: a message this device sent reached one of the recipient's devices (one event per
    /// device; [`Session::receipts`] has the per-device detail). May repeat.
    Delivered {
        /// The recipient's device that has it.
        by: DeviceAddr,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
        /// The first delivery receipt for this message (from any device): show ✓✓ now.
        first: bool,
    },
    /// Blue ✓✓: the recipient read a message this device sent, on device `by`. May repeat.
    Read {
        /// The reader's device.
        by: DeviceAddr,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
        /// The first read receipt for this message (from any device).
        first: bool,
    },
    /// Another device of this account read message `client_msg_id` from `from` (a
    /// `READ_ELSEWHERE` receipt): clear its unread mark here too.
    ReadElsewhere {
        /// The original sender's device.
        from: DeviceAddr,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
    },
    /// A sent-message sync copy: another device of this account (`message.from`) sent
    /// `message` to `to_user` (this account's own user for a note to self). The payload is
    /// the plaintext that was sent, unwrapped ([`crate::devices::wrap_sync`]). Acknowledged
    /// like a message; it needs no read receipt.
    SyncCopy {
        /// The recipient of the original message.
        to_user: UserId,
        /// The copy as delivered, its payload decoded and unwrapped.
        message: Message,
    },
    /// A device list changed (`DeviceList { CHANGED }`): a device was linked or removed, in
    /// this account or in a contact's whose list this session fetched. The cache
    /// ([`Session::cached_devices`]) already holds the new list; sessions with removed devices
    /// were dropped.
    DevicesChanged {
        /// Whose list.
        user: UserId,
        /// The new version.
        version: u32,
        /// Devices that are new (or have new keys).
        added: Vec<DeviceId>,
        /// Devices that are gone.
        removed: Vec<DeviceId>,
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
    /// A group message or membership event (capability `GROUPS`), as the group's home shard
    /// enveloped it: the Sender Key ciphertext is NOT decrypted here
    /// ([`crate::groups::GroupClient::open`] does that). Acknowledged when handed out.
    Group {
        /// The sending (or changing) device.
        from: DeviceAddr,
        /// The server's time for it.
        server_ts_ms: u64,
        /// Group, gseq and the ciphertext or event.
        envelope: protocol::group::GroupEnvelope,
    },
    /// A watched user's presence (`PresenceSubscribe` answer with its `request_id`, or a
    /// change with 0); see [`Session::subscribe_presence`].
    Presence(frame::Presence),
    /// This user's privacy settings after a [`Session::set_privacy`] or contact-list edit,
    /// durable on the server.
    PrivacySaved(frame::PrivacyState),
    /// The chat partner `from_user` is typing (never stored by the server).
    Typing {
        /// Who.
        from_user: UserId,
        /// Composing, paused or recording.
        state: protocol::presence::TypingState,
    },
    /// A call step relayed from the other party with its payload opened (docs/e2ee.md §17), or
    /// a server call event (ringing, busy, answered elsewhere, missed); see
    /// [`Session::call_offer`] and [`crate::calls`].
    Call(crate::calls::CallEvent),
    /// TURN relay credentials (coturn REST scheme), the answer to [`Session::request_turn`].
    TurnCredentials(frame::TurnCredentials),
    /// A group message this device sent: how many member devices it was stored for, got it
    /// (✓✓) and read it, aggregated by the server (at most one per message per server tick
    /// while the counts change). [`crate::groups::GroupClient::receipts`] asks for them.
    GroupReceipt(protocol::frame::GroupReceipt),
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
    pub(crate) secure: Option<Secure<Queued>>,
    /// Known device lists (own account included).
    devices: DeviceListCache,
    /// Per-message receipt detail for sent messages.
    receipts: ReceiptTracker,
    /// Requests waiting for their answer (link, device list, unlink), by request id.
    requests: HashMap<u64, RequestKind>,
    /// Answers to those requests.
    answers: HashMap<u64, Result<Answer>>,
    /// What a `SendMulti` in the outbox needs to be re-encrypted after a stale refusal.
    multi: HashMap<u64, MultiState>,
    /// `SendMulti`s refused as stale, waiting to be re-encrypted and sent again.
    stale: VecDeque<u64>,
    /// Senders of recently handed-out messages: (user, client_msg_id, device).
    senders: VecDeque<(UserId, u64, DeviceId)>,
    /// Live calls' keys (memory only).
    pub(crate) calls: crate::calls::Calls,
}

/// A request the session waits for an answer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    Link,
    DeviceList,
    Unlink,
    MediaSlot,
    MediaDownload,
    StatusPublish,
    StatusDelete,
    Group,
}

/// An answer to a [`RequestKind`].
#[derive(Debug)]
enum Answer {
    Linked(DeviceAddr),
    Devices(DeviceList),
    Unlinked(DeviceId),
    MediaUrl(crate::media_session::MediaGrant),
    StatusPublished(u64),
    StatusDeleted,
    Group(Frame),
}

/// One copy of a `SendMulti` and the identity of the device it was made for.
#[derive(Clone, Debug)]
struct CopyMeta {
    copy: DeviceCopy,
    identity: IdentityPublic,
}

/// A `SendMulti` in the outbox: what a re-encryption needs.
struct MultiState {
    to_user: UserId,
    msg_type: MsgType,
    /// The caller's plaintext (memory only; dropped with the outbox entry).
    plaintext: Vec<u8>,
    copies: Vec<CopyMeta>,
    stale_retries: u32,
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
        linked: Option<E2ee>,
    ) -> Result<Self> {
        let capabilities = session_capabilities(&options);
        let mut chan = chan;
        let secure = if options.e2ee {
            if welcome.capabilities & protocol::capability::PREKEYS == 0 {
                chan.raw_mut().close();
                return Err(Error::E2eeUnsupported);
            }
            let opened = match linked {
                Some(e) => Ok(e),
                None => secure::open(&identity, welcome.user, welcome.device),
            };
            match opened {
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
            devices: DeviceListCache::default(),
            receipts: ReceiptTracker::default(),
            requests: HashMap::new(),
            answers: HashMap::new(),
            multi: HashMap::new(),
            stale: VecDeque::new(),
            senders: VecDeque::new(),
            calls: crate::calls::Calls::new(),
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
    pub(crate) fn max_record_body(&self) -> usize {
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

    /// Encrypts for `to`: with the session there is, else from a fetched (or cached) bundle,
    /// whose identity must be `expected` when given (the one in the signed device list).
    pub(crate) fn encrypt_for(
        &mut self,
        to: Address,
        plaintext: &[u8],
        expected: Option<&IdentityPublic>,
    ) -> Result<Vec<u8>> {
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
        if expected.is_some_and(|e| *e != bundle.identity()) && to.device != 0 {
            tracing::warn!(
                user = to.id,
                device = to.device,
                "prekey bundle identity differs from the signed device list"
            );
            return Err(Error::UnverifiedDevice {
                user: to.id,
                device: to.device,
            });
        }
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

    // ----- linked devices -----

    /// Whether the server granted `MULTI_DEVICE` on this connection: sends go to every device
    /// of the recipient with `SendMulti`, and linking, device lists and unlink are available.
    pub fn is_multi_device(&self) -> bool {
        self.welcome.capabilities & capability::MULTI_DEVICE != 0
    }

    /// The device list of `user` this session last saw (fetched, or pushed by the server),
    /// without asking the server.
    pub fn cached_devices(&self, user: UserId) -> Option<&DeviceList> {
        self.devices.get(user)
    }

    /// The whole device-list cache.
    pub fn device_cache(&self) -> &DeviceListCache {
        &self.devices
    }

    /// A group request (`GroupCreate`, `GroupChange`, `GroupSetBlob`, `GroupInfoFetch`, whose
    /// `request_id` is `request_id`): sends it and waits for its `GroupInfo` or `GroupDone`.
    /// A refusal is [`Error::Server`] with the group error code. See [`crate::groups`].
    pub fn group_request(&mut self, request_id: u64, frame: Frame) -> Result<Frame> {
        match self.request(request_id, RequestKind::Group, frame, "group answer")? {
            Answer::Group(f) => Ok(f),
            _ => Err(ProtocolError::Mismatch("GroupInfo").into()),
        }
    }

    /// Queues and sends a `GroupSend` of `ciphertext` (already Sender Key encrypted) to
    /// `group` under a new id: it stays in the outbox until its ✓ and is resent with the same
    /// id after a reconnect. Returns the id.
    pub fn group_send(&mut self, group: u64, ciphertext: Bytes) -> Result<u64> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if self.outbox.is_full() {
            return Err(Error::OutboxFull {
                capacity: self.outbox.capacity(),
            });
        }
        let max = self.max_payload_bytes();
        if ciphertext.len() > max {
            return Err(Error::PayloadTooLarge {
                len: ciphertext.len(),
                max,
            });
        }
        let client_msg_id = new_client_msg_id();
        let entry = PendingSend {
            client_msg_id,
            to: Address::group(group),
            msg_type: MsgType::GROUP,
            payload: ciphertext,
            copies: Vec::new(),
            attempts: 0,
            first_sent_at: Instant::now(),
        };
        let frame = send_frame(&entry);
        self.outbox.push(entry);
        self.outbox.note_attempt(client_msg_id);
        self.write(&[frame])?;
        Ok(client_msg_id)
    }

    /// Sends `Read` for group message `gseq` of `group` (group address, the gseq as id).
    pub fn read_group(&mut self, group: u64, gseq: u64) -> Result<()> {
        self.write(&[Frame::Read(frame::Read {
            to: Address::group(group),
            client_msg_id: gseq,
        })])
    }

    /// Runs `f` on the end-to-end state (None without E2EE); what it changes is saved before
    /// the next `Ack` (so a decryption is durable before the server forgets the message).
    pub fn with_e2ee<R>(&mut self, f: impl FnOnce(&mut E2ee) -> R) -> Option<R> {
        let s = self.secure.as_mut()?;
        s.dirty = true;
        Some(f(&mut s.e2ee))
    }

    /// Fetches `user`'s current device list (`DeviceListFetch`; `user` may be this account's
    /// own), checks every companion's signature against the primary's identity signing key,
    /// stores it in the cache and returns it. Entries that fail the check are kept with
    /// `verified == false` (and never encrypted to). The server then tells this connection
    /// about later changes ([`Event::DevicesChanged`]). Errors: [`Error::Server`]
    /// `NoSuchRecipient`, [`Error::MultiDeviceUnsupported`], [`Error::Timeout`].
    pub fn devices(&mut self, user: UserId) -> Result<DeviceList> {
        if !self.is_multi_device() {
            return Err(Error::MultiDeviceUnsupported);
        }
        let request_id = new_client_msg_id();
        let frame = Frame::DeviceListFetch(frame::DeviceListFetch { request_id, user });
        match self.request(request_id, RequestKind::DeviceList, frame, "device list")? {
            Answer::Devices(list) => Ok(list),
            _ => Err(ProtocolError::Mismatch("DeviceList").into()),
        }
    }

    /// Primary (device 0, end-to-end encryption on): approves the new device that shows
    /// `link` ([`crate::Connection::request_link`] on it). Signs the new device's identity
    /// keys with this device's identity ([`switchboard_e2ee::sign_device`]), sends
    /// `LinkApprove`, and waits for `DeviceLinked`: the new device's address. Publishes this
    /// device's identity first if the server has not acknowledged it yet. Refusals are
    /// [`Error::LinkRefused`] (`CodeUnknown`, `CodeExpired`, `CodeUsed`, `SignatureInvalid`,
    /// `DeviceLimit`, `NotPrimary`); also [`Error::E2eeDisabled`],
    /// [`Error::MultiDeviceUnsupported`], [`Error::Timeout`].
    pub fn approve_link(&mut self, link: &LinkString) -> Result<DeviceAddr> {
        if !self.is_multi_device() {
            return Err(Error::MultiDeviceUnsupported);
        }
        let s = self.secure.as_ref().ok_or(Error::E2eeDisabled)?;
        if s.upload_in_flight || !s.published {
            // The server checks the signature against the published identity.
            self.upload_prekeys(0)?;
        }
        let s = self.secure.as_ref().ok_or(Error::E2eeDisabled)?;
        let signature = s.e2ee.sign_device(self.user(), &link.identity);
        let request_id = new_client_msg_id();
        let frame = Frame::LinkApprove(frame::LinkApprove {
            request_id,
            code: link.code,
            keys: Box::new(frame::LinkKeys {
                static_key: link.static_key,
                identity_dh: link.identity.dh,
                identity_sign: link.identity.sign,
                signature,
            }),
        });
        match self.request(request_id, RequestKind::Link, frame, "DeviceLinked")? {
            Answer::Linked(addr) => {
                tracing::info!(user = addr.user, device = addr.device, "device linked");
                Ok(addr)
            }
            _ => Err(ProtocolError::Mismatch("DeviceLinked").into()),
        }
    }

    /// Removes `device` from this account (`Unlink`): the primary may remove any companion,
    /// a companion only itself (then the server closes this connection right after the
    /// answer; the next call reports [`Error::DeviceRemoved`]). Waits for `DeviceUnlinked`.
    /// Refusals are [`Error::UnlinkRefused`] (`NotPrimary`, `NoSuchDevice`).
    pub fn unlink(&mut self, device: DeviceId) -> Result<()> {
        if !self.is_multi_device() {
            return Err(Error::MultiDeviceUnsupported);
        }
        let request_id = new_client_msg_id();
        let frame = Frame::Unlink(frame::Unlink { request_id, device });
        match self.request(request_id, RequestKind::Unlink, frame, "DeviceUnlinked")? {
            Answer::Unlinked(d) if d == device => Ok(()),
            _ => Err(ProtocolError::Mismatch("DeviceUnlinked.device").into()),
        }
    }

    /// Which devices delivered and read message `client_msg_id` (sent by this device), as far
    /// as receipts arrived since login (the most recent 4096 messages are remembered).
    pub fn receipts(&self, client_msg_id: u64) -> Option<&MessageReceipts> {
        self.receipts.get(client_msg_id)
    }

    /// Sends a request and waits (up to [`Timeouts::request`]) for its answer; other events
    /// stay queued.
    fn request(
        &mut self,
        request_id: u64,
        kind: RequestKind,
        frame: Frame,
        what: &'static str,
    ) -> Result<Answer> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        self.requests.insert(request_id, kind);
        if let Err(e) = self.write(&[frame]) {
            self.requests.remove(&request_id);
            return Err(e);
        }
        let deadline = Instant::now().checked_add(self.timeouts.request);
        loop {
            if let Some(a) = self.answers.remove(&request_id) {
                return a;
            }
            self.flush_acks()?;
            if !self.pump(deadline)? {
                self.requests.remove(&request_id);
                return Err(Error::Timeout { what });
            }
        }
    }

    /// Asks the home shard for an upload slot for `size` bytes of ciphertext hashing to
    /// `sha256` (docs/protocol.md §19). Refusals are [`Error::Server`] (`MediaTooLarge`,
    /// `MediaQuotaExceeded`, `MediaRateLimited`, `MediaUnavailable`).
    pub fn media_slot(
        &mut self,
        class: protocol::media::MediaClass,
        size: u64,
        sha256: [u8; 32],
    ) -> Result<crate::media_session::MediaGrant> {
        let request_id = new_client_msg_id();
        let frame = Frame::MediaSlotRequest(frame::MediaSlotRequest {
            request_id,
            class,
            size,
            sha256,
        });
        match self.request(request_id, RequestKind::MediaSlot, frame, "media slot")? {
            Answer::MediaUrl(g) => Ok(g),
            _ => Err(ProtocolError::Mismatch("MediaSlot").into()),
        }
    }

    /// Asks the home shard for a download URL of the blob `sha256`.
    pub fn media_download_url(
        &mut self,
        sha256: [u8; 32],
    ) -> Result<crate::media_session::MediaGrant> {
        let request_id = new_client_msg_id();
        let frame = Frame::MediaDownloadRequest(frame::MediaDownloadRequest { request_id, sha256 });
        match self.request(
            request_id,
            RequestKind::MediaDownload,
            frame,
            "media download",
        )? {
            Answer::MediaUrl(g) => Ok(g),
            _ => Err(ProtocolError::Mismatch("MediaDownload").into()),
        }
    }

    /// Registers a status post with the server (`StatusPublish`): its blobs are then served
    /// only to the poster and `audience`, and deleted with the post. Returns when the server
    /// deletes it (ms since the Unix epoch). Refusals: [`Error::Server`] (`StatusLimit`,
    /// `MediaUnavailable`, `StorageUnavailable`).
    pub fn status_publish(
        &mut self,
        post_id: u64,
        blobs: Vec<[u8; 32]>,
        audience: Vec<UserId>,
    ) -> Result<u64> {
        let refs = frame::StatusRefs { blobs, audience };
        let frame = Frame::StatusPublish(frame::StatusPublish { post_id, refs });
        match self.request(post_id, RequestKind::StatusPublish, frame, "status publish")? {
            Answer::StatusPublished(expires_at_ms) => Ok(expires_at_ms),
            _ => Err(ProtocolError::Mismatch("StatusPublished").into()),
        }
    }

    /// Deletes one of this user's status posts (and its blobs) now. Refusal:
    /// [`Error::Server`] `NoSuchStatus`.
    pub fn status_delete(&mut self, post_id: u64) -> Result<()> {
        let frame = Frame::StatusDelete(frame::StatusDelete { post_id });
        match self.request(post_id, RequestKind::StatusDelete, frame, "status delete")? {
            Answer::StatusDeleted => Ok(()),
            _ => Err(ProtocolError::Mismatch("StatusDeleted").into()),
        }
    }

    fn on_media_grant(
        &mut self,
        kind: RequestKind,
        request_id: u64,
        slot_id: u64,
        expires_at_ms: u64,
        url: String,
    ) {
        if self.requests.get(&request_id) == Some(&kind) {
            self.requests.remove(&request_id);
            let grant = crate::media_session::MediaGrant {
                slot_id,
                expires_at_ms,
                url,
            };
            self.answers.insert(request_id, Ok(Answer::MediaUrl(grant)));
        }
    }

    /// The cached list of `user`, fetched when there is none.
    pub(crate) fn device_list_for(&mut self, user: UserId) -> Result<DeviceList> {
        match self.devices.get(user) {
            Some(l) => Ok(l.clone()),
            None => self.devices(user),
        }
    }

    /// Applies a `DeviceList` frame: cache, drop sessions of removed companions, event.
    fn on_device_list(&mut self, list: DeviceList, reason: DeviceListReason) -> Option<Event> {
        let (user, version) = (list.user, list.version);
        let update = self.devices.update(list)?;
        self.drop_removed(user, &update);
        (reason == DeviceListReason::CHANGED).then(|| Event::DevicesChanged {
            user,
            version,
            added: update.added,
            removed: update.removed,
        })
    }

    /// Forgets the E2EE sessions and recorded identities of removed companions (device 0's
    /// identity is never dropped silently: a change there is an identity change).
    fn drop_removed(&mut self, user: UserId, update: &DeviceListUpdate) {
        let Some(s) = &mut self.secure else { return };
        for &d in update.removed.iter().filter(|&&d| d != 0) {
            match s.e2ee.forget_peer(secure::peer(user, d)) {
                Ok(true) => {
                    tracing::debug!(user, device = d, "dropped the session of a removed device")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(user, device = d, error = %e, "could not drop a removed device's session")
                }
            }
        }
    }

    /// Encodes one copy of a `SendMulti` per target device, reusing `previous` copies made
    /// for a device that is still there with the same keys.
    fn build_copies(
        &mut self,
        to_user: UserId,
        payload: &[u8],
        msg_type: MsgType,
        previous: &[CopyMeta],
    ) -> Result<Vec<CopyMeta>> {
        let (me, my_device) = (self.user(), self.device());
        if self.secure.is_some() {
            for user in [to_user, me] {
                if !(user == me && my_device == 0) {
                    self.check_primary(user)?;
                }
            }
        }
        let own = self.device_list_for(me)?;
        // (own flag, user of the device, device, wrap as a sync copy)
        let mut targets: Vec<(bool, UserId, DeviceInfo, bool)> = Vec::new();
        if to_user == me {
            for d in own.devices.iter().filter(|d| d.device != my_device) {
                targets.push((false, me, *d, true));
            }
        } else {
            let theirs = self.device_list_for(to_user)?;
            for d in &theirs.devices {
                targets.push((false, to_user, *d, false));
            }
            for d in own.devices.iter().filter(|d| d.device != my_device) {
                targets.push((true, me, *d, true));
            }
        }
        if targets.is_empty() {
            return Err(Error::NoDevices { user: to_user });
        }
        let e2ee = self.secure.is_some();
        // Checked before encrypting, so a refusal does not step any ratchet.
        let overhead = if e2ee { PREKEY_MESSAGE_OVERHEAD } else { 0 };
        let need: usize = targets
            .iter()
            .map(|&(_, _, _, wrap)| {
                SEND_COPY_HEADER_BYTES
                    + payload.len()
                    + overhead
                    + if wrap { SYNC_OVERHEAD } else { 0 }
            })
            .sum();
        let budget = self.max_multi_body();
        if need > budget {
            return Err(Error::PayloadTooLarge {
                len: need,
                max: budget,
            });
        }
        if e2ee {
            for &(_, user, d, _) in &targets {
                if !d.verified {
                    return Err(Error::UnverifiedDevice {
                        user,
                        device: d.device,
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(targets.len());
        for (own_copy, user, d, wrap) in targets {
            if let Some(p) = previous.iter().find(|p| {
                p.copy.own == own_copy && p.copy.device == d.device && p.identity == d.identity
            }) {
                out.push(p.clone());
                continue;
            }
            let wrapped;
            let plaintext: &[u8] = if wrap {
                wrapped = wrap_sync(to_user, payload);
                &wrapped
            } else {
                payload
            };
            let to = Address::device(user, d.device);
            let encoded = if e2ee {
                Bytes::from(self.encrypt_for(to, plaintext, Some(&d.identity))?)
            } else {
                self.codec.encode(to, msg_type, plaintext)?
            };
            out.push(CopyMeta {
                copy: DeviceCopy {
                    own: own_copy,
                    device: d.device,
                    payload: encoded,
                },
                identity: d.identity,
            });
        }
        let total: usize = out
            .iter()
            .map(|c| SEND_COPY_HEADER_BYTES + c.copy.payload.len())
            .sum();
        if total > budget {
            return Err(Error::PayloadTooLarge {
                len: total,
                max: budget,
            });
        }
        Ok(out)
    }

    /// With E2EE: the primary of `user` in its (cached) list must carry the identity recorded
    /// for device 0 (companions are verified against that key). A cached list that disagrees
    /// is fetched again (device 0 may have published a new identity since, which the caller
    /// accepted); a current list that still disagrees is an identity change, never accepted
    /// silently.
    pub(crate) fn check_primary(&mut self, user: UserId) -> Result<()> {
        let peer = secure::peer(user, 0);
        let Some(known) = self
            .secure
            .as_ref()
            .and_then(|s| s.e2ee.known_identity(peer))
        else {
            return Ok(());
        };
        let listed = |list: &DeviceList| list.get(0).map(|d| d.identity);
        let mut list = self.device_list_for(user)?;
        if listed(&list).is_some_and(|l| l != known) {
            list = self.devices(user)?;
        }
        match (listed(&list), &mut self.secure) {
            (Some(l), Some(s)) if l != known => Err(s.identity_changed(peer, l)),
            _ => Ok(()),
        }
    }

    /// Bytes the copies of one `SendMulti` may take on this connection.
    fn max_multi_body(&self) -> usize {
        self.max_record_body()
            .saturating_sub(TAG_BYTES + 1 + sizes::SEND_MULTI_HEADER)
    }

    /// Re-encrypts and resends the `SendMulti`s refused as stale (the cache already holds the
    /// lists the server sent with the refusal), or fails them past [`STALE_RETRIES_MAX`].
    fn process_stale(&mut self) -> Result<()> {
        while let Some(id) = self.stale.pop_front() {
            if self.outbox.get(id).is_none() {
                self.multi.remove(&id);
                continue;
            }
            let Some(state) = self.multi.get_mut(&id) else {
                continue;
            };
            state.stale_retries += 1;
            if state.stale_retries > STALE_RETRIES_MAX {
                let text = format!("refused as stale {} times", state.stale_retries);
                self.fail_multi(id, text);
                continue;
            }
            let (to_user, msg_type) = (state.to_user, state.msg_type);
            let plaintext = std::mem::take(&mut state.plaintext);
            let previous = std::mem::take(&mut state.copies);
            let built = self.build_copies(to_user, &plaintext, msg_type, &previous);
            let Some(state) = self.multi.get_mut(&id) else {
                continue;
            };
            state.plaintext = plaintext;
            match built {
                Ok(copies) => {
                    tracing::debug!(
                        client_msg_id = id,
                        copies = copies.len(),
                        "resending a SendMulti for the new device list"
                    );
                    self.outbox
                        .set_copies(id, copies.iter().map(|c| c.copy.clone()).collect());
                    state.copies = copies;
                    let frame = self.outbox.get(id).map(send_frame);
                    if let Some(frame) = frame {
                        self.outbox.note_attempt(id);
                        self.write(&[frame])?;
                    }
                }
                Err(e) if e.is_transient() => {
                    // The outbox still holds the last copies: the resend after the reconnect
                    // is refused as stale again, and this starts over.
                    state.copies = previous;
                    return Err(e);
                }
                Err(e) => self.fail_multi(id, e.to_string()),
            }
        }
        Ok(())
    }

    /// A `SendMulti` that cannot be sent: out of the outbox, [`Event::SendFailed`].
    fn fail_multi(&mut self, client_msg_id: u64, text: String) {
        tracing::warn!(client_msg_id, %text, "SendMulti failed for a changing device list");
        self.outbox.remove(client_msg_id);
        self.multi.remove(&client_msg_id);
        self.enqueue(Queued {
            event: Event::SendFailed {
                client_msg_id,
                code: ServerCode::from(ErrorCode::DeviceListStale),
                text,
            },
            seqs: vec![],
            key: None,
            encrypted: false,
        });
    }

    /// Sends `payload` (end-to-end encrypted with [`SessionOptions::e2ee`], else encoded by
    /// the codec) to `to_user` under a fresh random nonzero `client_msg_id`, which it returns.
    /// The message waits in the outbox until its ✓ ([`Event::ServerAck`]) or refusal
    /// ([`Event::SendFailed`]) arrives. If the write fails, the message stays in the outbox
    /// and [`Session::reconnect`] resends it: do not send it again under a new id.
    ///
    /// When the server granted `MULTI_DEVICE` ([`Session::is_multi_device`]) this is one
    /// `SendMulti`: a copy for every device of `to_user` (encrypted per device, X3DH per
    /// device bundle) and a sync copy ([`crate::devices::wrap_sync`]) for every other device
    /// of this account; the device lists come from the cache, fetched when missing. If the
    /// server refuses it as stale (a device was linked or removed), the session updates the
    /// cache, encrypts for the new devices and sends it again under the same id, at most
    /// [`STALE_RETRIES_MAX`] times, then reports [`Event::SendFailed`] with
    /// `DeviceListStale` ([`Error::DeviceListStale`] from [`Session::wait_server_ack`]). With
    /// E2EE, a device whose list entry does not verify is [`Error::UnverifiedDevice`].
    /// Without `MULTI_DEVICE` it is a `Send` to device 0.
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
                if self.is_multi_device() {
                    return self.send_multi(client_msg_id, to_user, payload, msg_type);
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
                    Bytes::from(self.encrypt_for(to, payload, None)?)
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
                    copies: Vec::new(),
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

    /// A new `SendMulti` (checked: id nonzero, connection open, not in the outbox).
    fn send_multi(
        &mut self,
        client_msg_id: u64,
        to_user: UserId,
        payload: &[u8],
        msg_type: MsgType,
    ) -> Result<()> {
        let copies = self.build_copies(to_user, payload, msg_type, &[])?;
        let entry = PendingSend {
            client_msg_id,
            to: Address::device(to_user, 0),
            msg_type,
            payload: Bytes::new(),
            copies: copies.iter().map(|c| c.copy.clone()).collect(),
            attempts: 0,
            first_sent_at: Instant::now(),
        };
        let frame = send_frame(&entry);
        self.outbox.push(entry);
        self.multi.insert(
            client_msg_id,
            MultiState {
                to_user,
                msg_type,
                plaintext: payload.to_vec(),
                copies,
                stale_retries: 0,
            },
        );
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

    /// Tells the sender that message `client_msg_id` from `from_user` was read. The `Read`
    /// goes to the device that sent it (remembered for the last 4096 messages handed out;
    /// device 0 otherwise); use [`Session::mark_read_device`] to name it.
    pub fn mark_read(&mut self, from_user: UserId, client_msg_id: u64) -> Result<()> {
        let device = self
            .senders
            .iter()
            .rev()
            .find(|(u, id, _)| *u == from_user && *id == client_msg_id)
            .map_or(0, |(_, _, d)| *d);
        self.mark_read_device(DeviceAddr::new(from_user, device), client_msg_id)
    }

    /// Tells the sender device `from` (a message's `from`) that message `client_msg_id` was
    /// read. With `MULTI_DEVICE` the server also tells this account's other devices
    /// ([`Event::ReadElsewhere`] there).
    pub fn mark_read_device(&mut self, from: DeviceAddr, client_msg_id: u64) -> Result<()> {
        self.write(&[Frame::Read(frame::Read {
            to: Address::device(from.user, from.device),
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
            self.process_stale()?;
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
            self.process_stale()?;
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
                    Event::SendFailed { code, text, .. } if code.is(ErrorCode::DeviceListStale) => {
                        Err(Error::DeviceListStale {
                            client_msg_id,
                            reason: text,
                        })
                    }
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
        // Requests in flight are lost with the old connection (their callers got the error).
        self.requests.clear();
        self.answers.clear();
        // The resend below carries the last copies; a stale refusal starts re-encryption.
        self.stale.clear();
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
        if let Event::Message(m) = &q.event {
            if self.senders.len() >= SENDERS_REMEMBERED {
                self.senders.pop_front();
            }
            self.senders
                .push_back((m.from.user, m.client_msg_id, m.from.device));
        }
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
                q.event = classify(
                    self.welcome.user,
                    Message {
                        payload: Bytes::copy_from_slice(&plaintext),
                        ..message.clone()
                    },
                );
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

    /// Queues an event that needs no ack (presence, typing, calls).
    fn enqueue_event(&mut self, event: Event) {
        self.enqueue(Queued {
            event,
            seqs: Vec::new(),
            key: None,
            encrypted: false,
        });
    }

    /// Writes one control frame (presence, privacy, typing, calls: `crate::presence`).
    pub(crate) fn write_control(&mut self, frame: Frame) -> Result<()> {
        self.write(&[frame])
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
        if message.msg_type == MsgType::GROUP || message.msg_type == MsgType::GROUP_EVENT {
            let event = match GroupEnvelope::decode(message.msg_type, &message.payload) {
                Ok(envelope) => Event::Group {
                    from: message.from,
                    server_ts_ms: message.server_ts_ms,
                    envelope,
                },
                Err(e) => Event::Undecodable {
                    message,
                    reason: e.to_string(),
                },
            };
            return self.enqueue(Queued {
                event,
                seqs: vec![seq],
                key: Some(key),
                encrypted: false,
            });
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
            Ok(payload) => classify(self.welcome.user, Message { payload, ..message }),
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
                        first: self.receipts.record(client_msg_id, by, false, ts_ms),
                    },
                    ReceiptKind::READ => Event::Read {
                        by,
                        client_msg_id,
                        ts_ms,
                        first: self.receipts.record(client_msg_id, by, true, ts_ms),
                    },
                    ReceiptKind::READ_ELSEWHERE => Event::ReadElsewhere {
                        from: by,
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
                self.multi.remove(&client_msg_id);
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
                    if code.is(ErrorCode::DeviceRemoved) {
                        return Err(Error::DeviceRemoved {
                            user: self.welcome.user,
                            device: self.welcome.device,
                        });
                    }
                    return Err(Error::Server { code, ref_id, text });
                }
                if let Some(kind) = (ref_id != 0)
                    .then(|| self.requests.remove(&ref_id))
                    .flatten()
                {
                    let error = match kind {
                        RequestKind::Link => {
                            LinkRefusal::from_code(code).map(|reason| Error::LinkRefused {
                                reason,
                                text: text.clone(),
                            })
                        }
                        RequestKind::Unlink => {
                            UnlinkRefusal::from_code(code).map(|reason| Error::UnlinkRefused {
                                reason,
                                text: text.clone(),
                            })
                        }
                        RequestKind::DeviceList
                        | RequestKind::MediaSlot
                        | RequestKind::MediaDownload
                        | RequestKind::StatusPublish
                        | RequestKind::StatusDelete
                        | RequestKind::Group => None,
                    };
                    let error = error.unwrap_or(Error::Server { code, ref_id, text });
                    self.answers.insert(ref_id, Err(error));
                    return Ok(());
                }
                if code.is(ErrorCode::DeviceListStale)
                    && ref_id != 0
                    && self.multi.contains_key(&ref_id)
                    && self.outbox.get(ref_id).is_some()
                {
                    tracing::debug!(client_msg_id = ref_id, "SendMulti refused as stale");
                    if !self.stale.contains(&ref_id) {
                        self.stale.push_back(ref_id);
                    }
                    return Ok(());
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
                                | ErrorCode::IdentityMismatch
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
                    self.multi.remove(&ref_id);
                }
                let event = if pending {
                    Event::SendFailed {
                        client_msg_id: ref_id,
                        code,
                        text,
                    }
                } else {
                    self.on_call_error(code, ref_id);
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
            Frame::DeviceList(frame::DeviceList {
                request_id,
                user,
                version,
                reason,
                devices,
            }) => {
                let list = DeviceList::from_entries(user, version, &devices);
                let event = self.on_device_list(list.clone(), reason);
                if reason == DeviceListReason::FETCHED
                    && self.requests.get(&request_id) == Some(&RequestKind::DeviceList)
                {
                    self.requests.remove(&request_id);
                    // The cache may hold a newer version (a CHANGED that overtook the
                    // answer): return what the cache holds.
                    let current = self.devices.get(user).cloned().unwrap_or(list);
                    self.answers
                        .insert(request_id, Ok(Answer::Devices(current)));
                }
                if let Some(event) = event {
                    self.enqueue(Queued {
                        event,
                        seqs: vec![],
                        key: None,
                        encrypted: false,
                    });
                }
            }
            Frame::DeviceLinked(frame::DeviceLinked { request_id, addr }) => {
                if self.requests.get(&request_id) == Some(&RequestKind::Link) {
                    self.requests.remove(&request_id);
                    self.answers.insert(request_id, Ok(Answer::Linked(addr)));
                }
            }
            Frame::MediaSlot(frame::MediaSlot {
                request_id,
                slot_id,
                expires_at_ms,
                url,
            }) => self.on_media_grant(
                RequestKind::MediaSlot,
                request_id,
                slot_id,
                expires_at_ms,
                url.0,
            ),
            Frame::MediaDownload(frame::MediaDownload {
                request_id,
                expires_at_ms,
                url,
            }) => self.on_media_grant(
                RequestKind::MediaDownload,
                request_id,
                0,
                expires_at_ms,
                url.0,
            ),
            Frame::StatusPublished(frame::StatusPublished {
                post_id,
                expires_at_ms,
            }) => {
                if self.requests.get(&post_id) == Some(&RequestKind::StatusPublish) {
                    self.requests.remove(&post_id);
                    let answer = Ok(Answer::StatusPublished(expires_at_ms));
                    self.answers.insert(post_id, answer);
                }
            }
            Frame::StatusDeleted(frame::StatusDeleted { post_id }) => {
                if self.requests.get(&post_id) == Some(&RequestKind::StatusDelete) {
                    self.requests.remove(&post_id);
                    self.answers.insert(post_id, Ok(Answer::StatusDeleted));
                }
            }
            Frame::GroupReceipt(r) if r.request_id == 0 => self.enqueue(Queued {
                event: Event::GroupReceipt(r),
                seqs: vec![],
                key: None,
                encrypted: false,
            }),
            Frame::GroupInfo(frame::GroupInfo { request_id, .. })
            | Frame::GroupDone(frame::GroupDone { request_id, .. })
            | Frame::GroupReceipt(frame::GroupReceipt { request_id, .. }) => {
                if self.requests.get(&request_id) == Some(&RequestKind::Group) {
                    self.requests.remove(&request_id);
                    self.answers.insert(request_id, Ok(Answer::Group(frame)));
                }
            }
            Frame::DeviceUnlinked(frame::DeviceUnlinked { request_id, device }) => {
                if self.requests.get(&request_id) == Some(&RequestKind::Unlink) {
                    self.requests.remove(&request_id);
                    self.answers
                        .insert(request_id, Ok(Answer::Unlinked(device)));
                }
            }
            Frame::Presence(p) => self.enqueue_event(Event::Presence(p)),
            Frame::PrivacyState(p) => self.enqueue_event(Event::PrivacySaved(p)),
            Frame::TypingNotice(t) => self.enqueue_event(Event::Typing {
                from_user: t.from_user,
                state: t.state,
            }),
            Frame::CallEvent(c) => {
                let event = self.on_call_event(c);
                self.enqueue_event(Event::Call(event))
            }
            Frame::TurnCredentials(t) => self.enqueue_event(Event::TurnCredentials(t)),
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
    if p.to.kind() == Some(protocol::AddressKind::Group) {
        return Frame::GroupSend(frame::GroupSend {
            client_msg_id: p.client_msg_id,
            group: p.to.id,
            payload: p.payload.clone(),
        });
    }
    if !p.copies.is_empty() {
        return Frame::SendMulti(frame::SendMulti {
            client_msg_id: p.client_msg_id,
            to_user: p.to.id,
            msg_type: p.msg_type,
            copies: p.copies.clone(),
        });
    }
    Frame::Send(frame::Send {
        client_msg_id: p.client_msg_id,
        to: p.to,
        msg_type: p.msg_type,
        payload: p.payload.clone(),
    })
}

/// The event for a decoded message: a sync copy when it comes from another device of this
/// account (`from.user == own_user`) and unwraps, else an ordinary message.
fn classify(own_user: UserId, message: Message) -> Event {
    if message.from.user == own_user {
        if let Some((to_user, inner)) = unwrap_sync(&message.payload) {
            let payload = message.payload.slice_ref(inner);
            return Event::SyncCopy {
                to_user,
                message: Message { payload, ..message },
            };
        }
    }
    Event::Message(message)
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
