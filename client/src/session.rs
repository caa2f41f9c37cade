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
use protocol::frame::{sizes, ReceiptKind, ACK_SEQS_MAX};
use protocol::noise::KEY_BYTES;
use protocol::wire::{RECORD_BODY_MAX, TAG_BYTES};
use protocol::{Address, DeviceId, ErrorCode, Frame, UserId};

use crate::channel::Channel;
use crate::codec::{PayloadCodec, PlaintextCodec};
use crate::connection::{Connection, ServerKeyPolicy, Timeouts, Welcome};
use crate::dedup::{DedupCache, MsgKey, DEDUP_CAPACITY_DEFAULT};
use crate::error::{Error, ProtocolError, Result, ServerCode};
use crate::outbox::{Outbox, PendingSend, OUTBOX_CAPACITY_DEFAULT};
use crate::state::{Identity, DEDUP_FILE};

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
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            dedup_capacity: DEDUP_CAPACITY_DEFAULT,
            persist_dedup: false,
            outbox_capacity: OUTBOX_CAPACITY_DEFAULT,
            keepalive: None,
        }
    }
}

/// Something that happened on the session, returned by [`Session::recv`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message for this device (decoded by the [`PayloadCodec`]; duplicates removed).
    Message {
        /// Sender user.
        from_user: UserId,
        /// Sender device.
        from_device: DeviceId,
        /// The sender's id for it (pass it to [`Session::mark_read`]).
        client_msg_id: u64,
        /// When the server accepted it, ms since the Unix epoch.
        server_ts_ms: u64,
        /// Message type (`protocol::frame::msg_type`).
        msg_type: u8,
        /// The decoded payload.
        payload: Bytes,
    },
    /// ✓✓: a message this device sent reached the recipient's device. May repeat.
    Delivered {
        /// The recipient.
        by_user: UserId,
        /// The recipient's device.
        by_device: DeviceId,
        /// The message.
        client_msg_id: u64,
        /// When (server clock), ms since the Unix epoch.
        ts_ms: u64,
    },
    /// Blue ✓✓: the recipient read a message this device sent. May repeat.
    Read {
        /// The reader.
        by_user: UserId,
        /// The reader's device.
        by_device: DeviceId,
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
        /// Sender user.
        from_user: UserId,
        /// Sender device.
        from_device: DeviceId,
        /// The sender's id for it.
        client_msg_id: u64,
        /// When the server accepted it.
        server_ts_ms: u64,
        /// Message type.
        msg_type: u8,
        /// The codec's reason.
        reason: String,
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

struct Queued {
    event: Event,
    /// Mailbox seqs to acknowledge once the event is handed out (the item's own seq plus those
    /// of duplicates that arrived while it waited in the queue).
    seqs: Vec<u64>,
    /// Dedup key, for messages.
    key: Option<MsgKey>,
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
        let seen_path = match (options.persist_dedup, identity.state_dir()) {
            (true, Some(dir)) => Some(dir.join(DEDUP_FILE)),
            _ => None,
        };
        let seen = match &seen_path {
            Some(p) => DedupCache::load(p, options.dedup_capacity)?,
            None => DedupCache::new(options.dedup_capacity),
        };
        let now = Instant::now();
        Ok(Self {
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
        })
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
        let announced = self.welcome.max_frame_bytes as usize;
        let record_max = if announced == 0 {
            RECORD_BODY_MAX
        } else {
            announced.min(RECORD_BODY_MAX)
        };
        record_max.saturating_sub(TAG_BYTES + 1 + sizes::SEND_HEADER)
    }

    /// Sends `payload` (encoded by the codec) to device 0 of `to_user` under a fresh random
    /// nonzero `client_msg_id`, which it returns. The message waits in the outbox until its
    /// ✓ ([`Event::ServerAck`]) or refusal ([`Event::SendFailed`]) arrives. If the write fails,
    /// the message stays in the outbox and [`Session::reconnect`] resends it: do not send it
    /// again under a new id.
    pub fn send(&mut self, to_user: UserId, payload: &[u8], msg_type: u8) -> Result<u64> {
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
        msg_type: u8,
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
                let encoded = self.codec.encode(to, msg_type, payload)?;
                let max = self.max_payload_bytes();
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
        self.write(&[Frame::Read {
            to: Address::device(from_user, 0),
            client_msg_id,
        }])
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
            .map(|c| Frame::Ack { seqs: c.to_vec() })
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
        let welcome = conn.login_exchange(self.welcome.user, self.welcome.device)?;
        self.chan = conn.into_channel();
        self.keepalive = keepalive_interval(self.keepalive_option, &welcome);
        self.welcome = welcome;
        self.queue.retain(|q| q.seqs.is_empty());
        self.acks_due.clear();
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

    /// Pops the next event and records what its hand-out owes (acks, dedup).
    fn pop(&mut self) -> Option<Event> {
        let q = self.queue.pop_front()?;
        self.acks_due.extend_from_slice(&q.seqs);
        if let Some(key) = q.key {
            self.seen.insert(key);
            self.seen_dirty = true;
        }
        Some(q.event)
    }

    fn save_dedup(&mut self) -> Result<()> {
        if let (true, Some(path)) = (self.seen_dirty, &self.seen_path) {
            self.seen.save(path)?;
            self.seen_dirty = false;
        }
        Ok(())
    }

    fn write(&mut self, frames: &[Frame]) -> Result<()> {
        if tracing::enabled!(tracing::Level::TRACE) {
            for f in frames {
                tracing::trace!(kind = f.kind(), "frame sent");
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
        self.write(&[Frame::Ping { nonce }])?;
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
                    tracing::trace!(kind = frame.kind(), "frame received");
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

    fn handle(&mut self, frame: Frame) -> Result<()> {
        match frame {
            Frame::Deliver {
                seq,
                from_user,
                from_device,
                client_msg_id,
                server_ts_ms,
                msg_type,
                payload,
            } => {
                let key = MsgKey {
                    from_user,
                    from_device,
                    client_msg_id,
                };
                if self.seen.contains(&key) {
                    tracing::debug!(from_user, client_msg_id, seq, "duplicate delivery dropped");
                    self.seen.insert(key);
                    self.acks_due.push(seq);
                    return Ok(());
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
                    return Ok(());
                }
                let event = match self.codec.decode(
                    Address::device(from_user, from_device),
                    msg_type,
                    payload,
                ) {
                    Ok(payload) => Event::Message {
                        from_user,
                        from_device,
                        client_msg_id,
                        server_ts_ms,
                        msg_type,
                        payload,
                    },
                    Err(e) => Event::Undecodable {
                        from_user,
                        from_device,
                        client_msg_id,
                        server_ts_ms,
                        msg_type,
                        reason: e.reason,
                    },
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![seq],
                    key: Some(key),
                });
            }
            Frame::Receipt {
                seq,
                from_user,
                from_device,
                client_msg_id,
                kind,
                ts_ms,
            } => {
                let event = match kind {
                    ReceiptKind::Delivered => Event::Delivered {
                        by_user: from_user,
                        by_device: from_device,
                        client_msg_id,
                        ts_ms,
                    },
                    ReceiptKind::Read => Event::Read {
                        by_user: from_user,
                        by_device: from_device,
                        client_msg_id,
                        ts_ms,
                    },
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![seq],
                    key: None,
                });
            }
            Frame::ServerAck {
                client_msg_id,
                server_ts_ms,
            } => {
                self.outbox.remove(client_msg_id);
                self.enqueue(Queued {
                    event: Event::ServerAck {
                        client_msg_id,
                        server_ts_ms,
                    },
                    seqs: vec![],
                    key: None,
                });
            }
            Frame::Error { code, ref_id, text } => {
                let code = ServerCode(code);
                if code.is_fatal() {
                    tracing::debug!(%code, %text, "fatal server error");
                    self.chan.raw_mut().close();
                    return Err(Error::Server { code, ref_id, text });
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
                });
            }
            Frame::GoAway {
                code,
                reconnect_after_ms,
            } => {
                let event = Event::GoAway {
                    code: ServerCode(code),
                    reconnect_after_ms,
                };
                self.enqueue(Queued {
                    event,
                    seqs: vec![],
                    key: None,
                });
            }
            Frame::Ping { nonce } => self.write(&[Frame::Pong { nonce }])?,
            Frame::Pong { nonce } => {
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
    Frame::Send {
        client_msg_id: p.client_msg_id,
        to: p.to,
        msg_type: p.msg_type,
        payload: p.payload.clone(),
    }
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
