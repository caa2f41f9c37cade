//! The shard state machine: a dispatcher over owned sub-states.
//!
//! One [`Shard`] owns, for the users whose home it is: accounts (device keys), the registry of
//! logged-in connections, mailboxes and the sender dedup window, the prekey directory; for the
//! static keys that hash to it: the reverse key index; and for the connections it accepted:
//! their pre-auth state and per-address registration limits. Each lives in its own module
//! with its methods; the lower layers they need are passed in explicitly:
//!
//! | sub-state | module | owns |
//! |---|---|---|
//! | [`Registry`] | `registry` | connections, online devices, delivery windows |
//! | [`Accounts`] | `accounts` | device keys, key bindings |
//! | [`Registration`] | `registration` | codes, rate windows, pending verifications, the RNG |
//! | [`Mailboxes`] | `mailboxes`, `mailbox`, `dedup` | queued entries, seq index, dedup window |
//! | [`Prekeys`] | `prekeys` | published keys, one-time prekeys, fetch limits |
//! | [`Sender`] | `sender` | the sender side of routing |
//! | [`Ledger`] | `ledger`, `waiter` | append ids, seqs, waiters, segment liveness |
//! | [`Out`] | `out` | the actions of the event being handled |
//!
//! Only this dispatcher (with `recover.rs` and `compaction.rs`, which are part of it) crosses
//! concerns: `handle`, frames, mesh messages, login, the timer, firing durable work.
//!
//! Rules that cut across the sub-states:
//!
//! * **Durability gates every answer.** A `SendResult`, a `Deliver`, a `KeyClaimed` or a
//!   `Registered` goes out only once the append behind it is covered by `Event::Durable`
//!   (the ledger's waiters, run in append order).
//! * **Durable entries are a prefix of each mailbox**, which keeps per-sender order.
//! * **Segments die oldest-first.** A tombstone in segment N only refers to records in segments
//!   <= N, so deleting a segment is safe once it holds nothing live *and* every older segment is
//!   gone. Liveness is counted per segment: a message or receipt is live while it is queued, an
//!   account record while it is the device's current one, a key binding always, prekey records
//!   as `prekeys` says.
//! * **Seqs are never reused, even after deletions.** Recovery starts above the highest seq in
//!   any surviving record (tombstones included); the ledger keeps a durable record carrying the
//!   high-water seq alive in a younger segment before it deletes an older one (a seq marker,
//!   `Tombstone` of a never-used seq, when nothing else does). Compaction appends one marker
//!   with its copies.
//! * **Determinism.** No hash-map iteration order leaks into actions or appends: whenever a
//!   hash map is walked to produce output, the keys are sorted first.
//!
//! Protocol decisions made here:
//!
//! * A server-to-client frame kind (`Welcome`, `Deliver`, …) from a client closes it with
//!   `MalformedFrame` (well-formed bytes, wrong direction); `UnknownKind` stays for kind bytes
//!   the decoder does not know. An `Ack` with more than `ACK_SEQS_MAX` seqs is `MalformedFrame`.
//! * `Login` with revision 0 or without the `MESSAGING` capability closes with
//!   `VersionUnsupported`; a login that reaches a shard that is not the user's home closes with
//!   `Internal`.
//! * Registration frames are accepted before and after login. Errors found on the accepting
//!   shard (`InvalidNumber`, the per-address limit) are sent directly; every answer from the
//!   number's home shard travels as `MeshMsg::ToConn`, also when that is this shard (where it
//!   is handled inside the state machine, like every mesh message a shard sends itself).
//! * A login is announced to the driver by `Action::LoggedIn` just before the `Welcome`.
//! * Acks for unknown seqs, or for entries not durable yet (never delivered), are ignored.
//! * Receipts are best effort: one whose original sender has no account, or that reaches a
//!   poisoned shard, is dropped; a crash between the tombstone and the receipt's append loses it.
//! * Prekey uploads and fetches need a login (`NotAuthenticated` otherwise); the rest is in
//!   `prekeys`.

use std::collections::BTreeSet;

use protocol::frame::{
    DeviceKeys, Login, OneTimePrekey, Pong, PrekeyBundle, Welcome, ACK_SEQS_MAX,
};
use protocol::{capability, DeviceAddr, DeviceId, ErrorCode, Frame, UserId};
use storage::Journal;

use crate::accounts::Accounts;
use crate::calls::Calls;
use crate::devices::Devices;
use crate::fanout::FanoutDest;
use crate::groups::Groups;
use crate::ledger::{Ledger, Log};
use crate::mailboxes::Mailboxes;
use crate::media::Media;
use crate::memberships::Memberships;
use crate::out::Out;
use crate::prekeys::Prekeys;
use crate::presence::Presence;
use crate::privacy::Privacy;
use crate::registration::Registration;
use crate::registry::{Conn, Registry, Session};
use crate::sender::Sender;
use crate::status::Status;
use crate::waiter::Waiter;
use crate::{
    home_shard, Action, Config, ConnId, Event, KeyClaimed, LoginInfo, MeshMsg, PrekeyFetchResult,
    ShardId, ShardStats, Store, StoreReceipt,
};

/// One shard's state.
pub struct Shard {
    pub(crate) config: Config,
    pub(crate) out: Out,
    pub(crate) stats: ShardStats,
    pub(crate) ledger: Ledger,
    pub(crate) registry: Registry,
    pub(crate) accounts: Accounts,
    pub(crate) mailboxes: Mailboxes,
    pub(crate) sender: Sender,
    pub(crate) registration: Registration,
    pub(crate) prekeys: Prekeys,
    pub(crate) devices: Devices,
    pub(crate) media: Media,
    pub(crate) status: Status,
    pub(crate) presence: Presence,
    pub(crate) privacy: Privacy,
    pub(crate) calls: Calls,
    pub(crate) groups: Groups,
    pub(crate) fanout: FanoutDest,
    pub(crate) memberships: Memberships,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("shard", &self.config.shard)
            .field("poisoned", &self.ledger.poisoned())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// A fresh shard; `seed` drives the only randomness (registration codes).
    pub fn new(config: Config, seed: u64) -> Self {
        Self {
            out: Out::new(config.shard),
            stats: ShardStats::default(),
            ledger: Ledger::new(),
            registry: Registry::default(),
            accounts: Accounts::default(),
            mailboxes: Mailboxes::new(&config),
            sender: Sender::default(),
            registration: Registration::new(seed),
            prekeys: Prekeys::new(&config),
            devices: Devices::new(&config),
            media: Media::new(),
            status: Status::default(),
            presence: Presence::new(&config),
            privacy: Privacy::new(&config),
            calls: Calls::new(&config),
            groups: Groups::new(&config, seed),
            fanout: FanoutDest::default(),
            memberships: Memberships::new(config.groups_per_user_max),
            config,
        }
    }

    /// Handles one event at `now_ms`; appends go through `journal`.
    pub fn handle(&mut self, now_ms: u64, event: Event, journal: &mut dyn Journal) {
        match event {
            Event::Connected {
                conn,
                peer_ip,
                static_key,
            } => self.registry.connected(conn, peer_ip, static_key),
            Event::Frame { conn, frame } => self.on_frame(now_ms, conn, frame, journal),
            Event::Login { conn, info } => self.login(now_ms, conn, info),
            Event::Closed { conn } => {
                self.registry.forget(conn);
                self.sender.forget_conn(conn);
                self.social_closed(now_ms, conn);
            }
            Event::Mesh { from, msg } => self.on_mesh(now_ms, from, msg, journal),
            Event::Durable { up_to } => self.ledger.on_durable(up_to),
            Event::StorageFailed { reason } => self.on_storage_failed(reason),
            Event::Tick => self.on_tick(now_ms, journal),
            Event::PeerRestarted { shard } => self.on_peer_restarted(now_ms, shard),
            Event::RecordsRead { token, results } => {
                self.on_records_read(now_ms, token, results, journal)
            }
        }
        self.settle(now_ms, journal);
        let acked = self.mailboxes.take_group_acked();
        if !acked.is_empty() {
            self.fanout.acked(acked);
        }
        self.refresh_stats();
    }

    /// Handles the mesh messages this shard sent itself and runs whatever became durable (also
    /// an append id already <= the durable mark), until neither produces more. Each round
    /// only answers work of the round before (a `Store` becomes a `SendResult`, a claim a
    /// `KeyClaimed`), so the loop ends.
    fn settle(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        loop {
            while let Some(msg) = self.out.pop_local() {
                self.on_mesh(now_ms, self.config.shard, msg, journal);
            }
            self.fire_ready(now_ms, journal);
            if !self.out.has_local() {
                break;
            }
        }
    }

    /// Takes the actions produced so far, in order.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.out.drain()
    }

    /// Counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Why the shard refuses writes, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.ledger.poisoned()
    }

    /// The ids of the one-time prekeys stored for (user, device), lowest first, or `None` when
    /// the device never uploaded keys here (for tests and tools: the directory's content as
    /// the next fetches would see it).
    pub fn one_time_prekey_ids(&self, user: UserId, device: DeviceId) -> Option<Vec<u32>> {
        self.prekeys.one_time_ids(DeviceAddr::new(user, device))
    }

    /// Everything published for (user, device): its keys and the one-time prekeys stored,
    /// lowest id first (for tests and tools).
    pub fn published_prekeys(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Option<(DeviceKeys, Vec<OneTimePrekey>)> {
        self.prekeys.published(DeviceAddr::new(user, device))
    }

    /// How many groups `user` (homed here) belongs to, as `groups_per_user_max` counts.
    pub fn groups_of(&self, user: UserId) -> usize {
        self.memberships.count(user)
    }

    /// A group homed here (for tests and tools).
    pub fn group_view(&self, group: u64) -> Option<crate::groups::GroupView> {
        let s = self.groups.state(group)?;
        Some(crate::groups::GroupView {
            version: s.version,
            gseq: self.groups.last_gseq(group),
            members: s.members.iter().map(|(&u, &a)| (u, a)).collect(),
        })
    }

    // ----- connections -------------------------------------------------------------------

    fn on_frame(&mut self, now_ms: u64, conn: ConnId, frame: Frame, journal: &mut dyn Journal) {
        // Unknown connection: a frame racing a close or hand-off. Nothing to answer.
        if !self.registry.contains(conn) {
            return;
        }
        let session = self.registry.session(conn).map(Session::key);
        match frame {
            Frame::Ping(p) => self.out.send(conn, Pong { nonce: p.nonce }.into()),
            // A keepalive answer (Pong goes both ways): nothing to do.
            Frame::Pong { .. } => {}
            // Registration is allowed in both states (a logged-in device may re-register).
            Frame::RegisterRequest(r) => {
                let peer = self.registry.peer(conn).map(|(ip, _)| ip);
                let (cfg, out) = (&self.config, &mut self.out);
                self.registration
                    .request_frame(now_ms, conn, r.phone, peer, cfg, out);
            }
            Frame::RegisterVerify(v) => {
                let key = self.registry.peer(conn).map(|(_, key)| key);
                Registration::verify_frame(conn, v.phone, v.code, key, &self.config, &mut self.out);
            }
            Frame::Login(l) => self.login_frame(now_ms, conn, &l),
            Frame::LinkRequest(r) => self.on_link_request(now_ms, conn, &r),
            Frame::Send { .. }
            | Frame::SendMulti { .. }
            | Frame::Ack { .. }
            | Frame::Read { .. }
            | Frame::PrekeyUpload { .. }
            | Frame::PrekeyFetch { .. }
            | Frame::LinkApprove { .. }
            | Frame::DeviceListFetch { .. }
            | Frame::Unlink { .. }
            | Frame::MediaSlotRequest { .. }
            | Frame::MediaDownloadRequest { .. }
            | Frame::StatusPublish { .. }
            | Frame::StatusDelete { .. }
            | Frame::PresenceSubscribe { .. }
            | Frame::PrivacySet { .. }
            | Frame::ContactsEdit { .. }
            | Frame::Typing { .. }
            | Frame::CallSignal { .. }
            | Frame::TurnRequest { .. }
            | Frame::GroupCreate { .. }
            | Frame::GroupChange { .. }
            | Frame::GroupSetBlob { .. }
            | Frame::GroupInfoFetch { .. }
            | Frame::GroupReceiptFetch { .. }
            | Frame::GroupSend { .. } => match session {
                Some(key) => self.on_session_frame(now_ms, conn, key, frame, journal),
                None => {
                    let text = before_login(&frame);
                    self.close(conn, ErrorCode::NotAuthenticated, text);
                }
            },
            // Server-to-client kinds decode fine but make no sense from a client: the frame is
            // well-formed bytes with a wrong meaning, so MalformedFrame (UnknownKind is kept for
            // kind bytes the decoder does not know).
            Frame::Welcome { .. }
            | Frame::RegisterCodeSent { .. }
            | Frame::Registered { .. }
            | Frame::ServerAck { .. }
            | Frame::Deliver { .. }
            | Frame::Receipt { .. }
            | Frame::Error { .. }
            | Frame::GoAway { .. }
            | Frame::PrekeyBundle { .. }
            | Frame::PrekeyStatus { .. }
            | Frame::LinkCode { .. }
            | Frame::DeviceLinked { .. }
            | Frame::DeviceList { .. }
            | Frame::DeviceUnlinked { .. }
            | Frame::MediaSlot { .. }
            | Frame::MediaDownload { .. }
            | Frame::StatusPublished { .. }
            | Frame::StatusDeleted { .. }
            | Frame::Presence { .. }
            | Frame::PrivacyState { .. }
            | Frame::TypingNotice { .. }
            | Frame::CallEvent { .. }
            | Frame::TurnCredentials { .. }
            | Frame::GroupInfo { .. }
            | Frame::GroupDone { .. }
            | Frame::GroupReceipt { .. } => self.close(
                conn,
                ErrorCode::MalformedFrame,
                "server-to-client frame kind sent by a client",
            ),
        }
    }

    /// A frame that needs a login, from the logged-in device `key`.
    fn on_session_frame(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        key: DeviceAddr,
        frame: Frame,
        journal: &mut dyn Journal,
    ) {
        let cfg = &self.config;
        match frame {
            Frame::Send(s) => {
                let (registry, out) = (&mut self.registry, &mut self.out);
                self.sender.send(conn, key, s, cfg, registry, out);
            }
            Frame::SendMulti(s) => self.on_send_multi(conn, key, s),
            Frame::Ack(a) => self.on_ack(now_ms, conn, key, a.seqs, journal),
            // A group message read: counted here (the reader's home, where its copy was
            // stored) for the group's aggregated receipt; `client_msg_id` is its gseq.
            Frame::Read(r) if r.to.kind() == Some(protocol::AddressKind::Group) => {
                self.fanout.read((r.to.id, r.client_msg_id), key)
            }
            Frame::Read(r) => {
                let own = self.other_devices(key);
                let cfg = &self.config;
                Sender::read(now_ms, (conn, key), &r, &own, cfg, &mut self.out);
            }
            Frame::LinkApprove(a) => self.on_link_approve(conn, key, &a),
            Frame::DeviceListFetch(f) => self.on_list_fetch_frame(conn, &f),
            Frame::Unlink(u) => self.on_unlink(now_ms, (conn, key), &u, journal),
            Frame::GroupCreate(_)
            | Frame::GroupChange(_)
            | Frame::GroupSetBlob(_)
            | Frame::GroupInfoFetch(_)
            | Frame::GroupReceiptFetch(_)
            | Frame::GroupSend(_) => self.on_group_frame(conn, key, frame),
            Frame::PrekeyUpload(u) if !self.identity_allowed(key, &u.keys) => {
                let text = "identity keys are not the ones the primary signed for this device";
                let error = Frame::error(ErrorCode::IdentityMismatch, 0, text);
                self.out.send(conn, error);
            }
            Frame::PrekeyUpload(u) => {
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                let upload = (*u.keys, u.one_time);
                self.prekeys
                    .upload(now_ms, conn, key, upload, &mut log, &mut self.out);
            }
            Frame::PrekeyFetch(f) => {
                self.prekeys
                    .fetch_frame(now_ms, conn, key, &f, &mut self.out);
            }
            Frame::MediaSlotRequest(r) => {
                let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
                let (media, cfg) = (&mut self.media, &self.config.media);
                media.slot_request(now_ms, (conn, key, caps), &r, cfg, &mut self.out);
            }
            Frame::MediaDownloadRequest(r) => {
                let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
                let (media, cfg) = (&mut self.media, &self.config.media);
                media.download_request(now_ms, (conn, key, caps), &r, cfg, &mut self.out);
            }
            Frame::StatusPublish(p) => {
                let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                let (cfg, out) = (&self.config, &mut self.out);
                let who = (conn, key.user, caps);
                self.status.publish(now_ms, who, &p, cfg, &mut log, out);
            }
            Frame::StatusDelete(d) => {
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                let out = &mut self.out;
                self.status
                    .delete((conn, key.user), d.post_id, &mut log, out);
            }
            other => {
                // Presence, privacy, typing and calls (`social`); nothing else reaches here.
                let _ = self.on_social_frame(now_ms, (conn, key), other, journal);
            }
        }
    }

    fn on_ack(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        key: DeviceAddr,
        seqs: Vec<u64>,
        journal: &mut dyn Journal,
    ) {
        if seqs.len() > ACK_SEQS_MAX {
            return self.close(conn, ErrorCode::MalformedFrame, "too many seqs in one ack");
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        let (registry, out) = (&mut self.registry, &mut self.out);
        self.mailboxes
            .ack(now_ms, key, seqs, &mut log, registry, out);
        self.pump(key);
    }

    fn login_frame(&mut self, now_ms: u64, conn: ConnId, login: &Login) {
        let (peer_ip, static_key) = match self.registry.get(conn) {
            Some(Conn::PreAuth {
                peer_ip,
                static_key,
            }) => (*peer_ip, *static_key),
            Some(Conn::LoggedIn(_)) => {
                return self.close(conn, ErrorCode::NotAuthenticated, "login twice")
            }
            None => return,
        };
        let info = LoginInfo {
            addr: login.addr,
            revision: login.revision,
            capabilities: login.capabilities,
            static_key,
            peer_ip,
        };
        let to = home_shard(info.addr.user, self.config.shards);
        // Either way this shard forgets the pre-auth connection now.
        self.registry.take_pre_auth(conn);
        if to == self.config.shard {
            self.login(now_ms, conn, info);
        } else {
            self.out.push(Action::Handoff { conn, to, info });
        }
    }

    /// `Event::Login`, or a local `Frame::Login`: this is the user's home shard.
    fn login(&mut self, now_ms: u64, conn: ConnId, info: LoginInfo) {
        self.registry.forget(conn);
        if let Err((code, text)) = self.check_login(&info) {
            return self.out.close(conn, code, text);
        }
        let key = info.addr;
        if let Some(old) = self.registry.online(key) {
            let text = "another connection logged in as this device";
            self.close(old, ErrorCode::Replaced, text);
        }
        let session = Session {
            addr: key,
            peer_ip: info.peer_ip,
            static_key: info.static_key,
            capabilities: info.capabilities,
            inflight: 0,
            outstanding: Default::default(),
        };
        self.registry.log_in(conn, session);
        self.out.push(Action::LoggedIn { conn, addr: key });
        let welcome = Welcome {
            addr: key,
            revision: protocol::PROTOCOL_REVISION,
            capabilities: info.capabilities & capability::SERVER_SUPPORTED,
            server_time_ms: now_ms,
            keepalive_ms: self.config.keepalive_ms,
            max_frame_bytes: self.config.max_frame_bytes,
        };
        self.out.send(conn, welcome.into());
        self.social_logged_in(now_ms, conn, key);
        // A device that ran low while it was offline (or never uploaded) hears it now.
        if info.capabilities & capability::PREKEYS != 0 {
            if let Some(frame) = self.prekeys.low_status(key) {
                self.out.send(conn, frame);
            }
        }
        self.pump(key);
    }

    /// Why a login is refused, if it is.
    fn check_login(&self, info: &LoginInfo) -> Result<(), (ErrorCode, &'static str)> {
        if home_shard(info.addr.user, self.config.shards) != self.config.shard {
            return Err((ErrorCode::Internal, "login routed to the wrong shard"));
        }
        if !self.device_key_matches(info.addr, &info.static_key) {
            let text = "key not bound to this user and device";
            return Err((ErrorCode::UnknownKey, text));
        }
        // Revision 1 is the first; a client that cannot do 1:1 messaging has nothing to do here.
        if info.revision == 0 || info.capabilities & capability::MESSAGING == 0 {
            let text = "revision 0 or no messaging capability";
            return Err((ErrorCode::VersionUnsupported, text));
        }
        Ok(())
    }

    pub(crate) fn close(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.registry.forget(conn);
        self.out.close(conn, code, text);
    }

    fn pump(&mut self, key: DeviceAddr) {
        let (registry, out) = (&mut self.registry, &mut self.out);
        self.mailboxes.pump(key, registry, &self.ledger, out);
    }

    fn on_peer_restarted(&mut self, now_ms: u64, shard: ShardId) {
        // Fan-outs in flight to it are gone: send them again (it drops what it has).
        self.groups.peer_restarted(now_ms, shard, &mut self.out);
        // Stores in flight to or from `shard` are gone; a later Send from the same connection
        // could be stored ahead of a lost earlier one. Closing makes the client resend all its
        // unacknowledged messages, in order, on a new connection (dedup absorbs repeats).
        for c in self.registry.waiting_on(shard) {
            let text = "a shard restarted; reconnect and resend";
            self.close(c, ErrorCode::Internal, text);
        }
        self.registration.fail_verifies(
            |v| v.claim_shard == shard,
            "key registry restarted; register again",
            &mut self.out,
        );
    }

    // ----- mesh --------------------------------------------------------------------------

    fn on_mesh(&mut self, now_ms: u64, from: ShardId, msg: MeshMsg, journal: &mut dyn Journal) {
        let poisoned = self.ledger.is_poisoned();
        let (cfg, out) = (&self.config, &mut self.out);
        match msg {
            MeshMsg::Store(s) => self.on_store(now_ms, s, journal),
            MeshMsg::SendResult(r) => self.sender.result(from, r, cfg, &mut self.registry, out),
            MeshMsg::StoreReceipt(r) => self.on_store_receipt(r, journal),
            MeshMsg::ToConn { conn, frame } => {
                if self.registry.contains(conn) {
                    out.send(conn, frame);
                }
            }
            MeshMsg::RegisterRequest { reply, phone } => self
                .registration
                .on_request(now_ms, reply, phone, poisoned, cfg, out),
            MeshMsg::RegisterVerify(v) => {
                self.registration.on_verify(now_ms, v, poisoned, cfg, out)
            }
            MeshMsg::ClaimKey(c) => {
                let max = cfg.register_table_max_entries;
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                self.accounts.claim(now_ms, c, max, &mut log, out);
            }
            MeshMsg::KeyClaimed(k) => self.on_key_claimed(now_ms, k, journal),
            MeshMsg::PrekeyFetch(f) => {
                let mut log = Log {
                    ledger: &mut self.ledger,
                    journal,
                };
                self.prekeys.fetch(f, &mut log, out);
            }
            MeshMsg::PrekeyFetchResult(r) => self.on_prekey_fetch_result(r),
            MeshMsg::StoreMulti(s) => self.on_store_multi(now_ms, *s, journal),
            MeshMsg::LinkClaim(c) => self.on_link_claim(now_ms, &c),
            MeshMsg::LinkClaimed(c) => self.on_link_claimed(now_ms, c, journal),
            MeshMsg::DeviceListFetch(f) => self.on_list_fetch(f),
            MeshMsg::Presence(p) => self.on_presence_mesh(*p),
            MeshMsg::Call(c) => self.on_call_mesh(now_ms, *c, journal),
            MeshMsg::GroupRequest(r) => self.on_group_request(now_ms, *r, journal),
            MeshMsg::GroupFanout(f) => self.on_group_fanout(*f, journal),
            MeshMsg::GroupFanoutAck(a) => self.on_group_fanout_ack(a, journal),
            MeshMsg::GroupJoin(j) => self.on_group_join(*j, journal),
            MeshMsg::GroupJoined(j) => self.on_group_joined(now_ms, *j, journal),
            MeshMsg::GroupRelease(r) => self.on_group_release(*r, journal),
            MeshMsg::GroupReceipts(r) => self.groups.on_receipts(*r),
            MeshMsg::GroupReceiptNotice(n) => self.on_group_receipt_notice(*n),
        }
    }

    /// Home side of a message: the recipient must be ours and the log writable.
    fn on_store(&mut self, now_ms: u64, s: Store, journal: &mut dyn Journal) {
        let id = s.message.client_msg_id;
        if home_shard(s.to.user, self.config.shards) != self.config.shard
            || !self.device_exists(s.to)
        {
            let error = Err(ErrorCode::NoSuchRecipient);
            return self.out.send_result(s.reply, id, error);
        }
        if self.ledger.is_poisoned() {
            let error = Err(ErrorCode::StorageUnavailable);
            return self.out.send_result(s.reply, id, error);
        }
        if self.blocked_send(s.to.user, s.message.from.user) {
            // ✓ for the blocked sender, nothing for the recipient (WhatsApp's behaviour).
            return self.out.send_result(s.reply, id, Ok(now_ms));
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.mailboxes.store(
            now_ms,
            s.reply,
            (s.to, s.message),
            &mut log,
            &mut self.registry,
        );
    }

    /// Receipts are best effort: for a sender without an account (deleted, or a forged address
    /// in Read), or while the log refuses writes, drop it.
    fn on_store_receipt(&mut self, r: StoreReceipt, journal: &mut dyn Journal) {
        // A companion linked after the message was stored has the id of a removed device: the
        // receipt is not about anything it sent.
        let successor = self
            .devices
            .companion(r.to)
            .is_some_and(|c| c.linked_at_ms > r.sent_at_ms && r.sent_at_ms != 0);
        if home_shard(r.to.user, self.config.shards) != self.config.shard
            || !self.device_exists(r.to)
            || successor
            || self.ledger.is_poisoned()
            || self.blocked_send(r.to.user, r.receipt.from.user)
        {
            return;
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.mailboxes
            .store_receipt(r, &mut log, &mut self.registry);
    }

    /// The key registry answered a verification: bind the number's device 0 to the key.
    fn on_key_claimed(&mut self, now_ms: u64, k: KeyClaimed, journal: &mut dyn Journal) {
        let Some(v) = self.registration.take_verify(k.token) else {
            return;
        };
        if k.result.is_err() {
            let text = "key already bound to another number";
            return self
                .out
                .reply_error(v.reply, ErrorCode::KeyBoundToOtherUser, text);
        }
        if self.ledger.is_poisoned() {
            let text = "storage unavailable";
            return self
                .out
                .reply_error(v.reply, ErrorCode::StorageUnavailable, text);
        }
        let primary = DeviceAddr::new(v.phone, 0);
        if self.accounts.exists(primary) && !self.accounts.key_matches(primary, &v.static_key) {
            self.remove_companions(now_ms, v.phone, &mut *journal);
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.accounts
            .register(now_ms, v.phone, v.static_key, v.reply, &mut log);
    }

    /// Requester side: the bundle (or error) for a fetch. The connection may be gone: the
    /// client fetches again after reconnecting (the key handed out meanwhile is burnt).
    fn on_prekey_fetch_result(&mut self, r: PrekeyFetchResult) {
        if self.registry.session(r.conn).is_none() {
            return;
        }
        let frame = match r.result {
            Ok(b) => PrekeyBundle {
                request_id: r.request_id,
                addr: b.addr,
                keys: Box::new(*b.keys),
                one_time: b.one_time,
            }
            .into(),
            Err(code) => Frame::error(code, r.request_id, code.name()),
        };
        self.out.send(r.conn, frame);
    }

    // ----- durability --------------------------------------------------------------------

    /// Runs every waiter whose append is durable, in append order; then delivers to the
    /// devices that got something and finishes compactions.
    fn fire_ready(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        let mut to_pump: BTreeSet<DeviceAddr> = BTreeSet::new();
        let mut stored = Vec::new();
        let mut compactions = Vec::new();
        for waiter in self.ledger.take_ready() {
            match waiter {
                Waiter::Stored { key, seq } => {
                    stored.push((key, seq));
                    if self.registry.is_online(key) {
                        to_pump.insert(key);
                    } else if let Some(push) = self.mailboxes.push_for(key, seq) {
                        // Offline: one content-free push per message (not for receipts).
                        self.out.push(push);
                    }
                }
                Waiter::Compaction { segment } => compactions.push(segment),
                w @ (Waiter::GroupReply { .. }
                | Waiter::GroupFanout { .. }
                | Waiter::GroupJoined { .. }
                | Waiter::GroupStored { .. }) => self.run_group_waiter(now_ms, w, journal),
                other => self.run_waiter(other),
            }
        }
        for key in to_pump {
            self.pump(key);
        }
        // What was not sent now goes cold: read back from the log when its turn comes.
        for (key, seq) in stored {
            self.mailboxes.cool_unsent(key, seq, &self.registry);
        }
        for segment in compactions {
            self.ledger.finish_compaction(segment, journal);
        }
    }

    fn run_waiter(&mut self, waiter: Waiter) {
        match waiter {
            Waiter::SendReply {
                reply,
                client_msg_id,
                ts_ms,
            } => self.out.send_result(reply, client_msg_id, Ok(ts_ms)),
            Waiter::Account(a) => self
                .accounts
                .account_durable(a, &mut self.ledger, &mut self.out),
            Waiter::Binding {
                static_key,
                segment,
            } => self
                .accounts
                .binding_durable(static_key, segment, &mut self.out),
            Waiter::Kill { segment } => self.ledger.kill(segment),
            Waiter::PrekeyReply {
                reply,
                request_id,
                bundle,
            } => {
                let result = PrekeyFetchResult {
                    conn: reply.conn,
                    request_id,
                    result: Ok(bundle),
                };
                self.out
                    .mesh(reply.shard, MeshMsg::PrekeyFetchResult(result));
            }
            Waiter::PrekeyUploaded { conn, key } => {
                self.prekeys
                    .uploaded(conn, key, &self.registry, &mut self.out)
            }
            Waiter::PrekeyNotice { key } => self.prekeys.notice(key, &self.registry, &mut self.out),
            Waiter::Linked(w) => self.link_durable(&w),
            Waiter::Unlinked(w) => self.unlink_durable(&w),
            Waiter::Status(w) => self.status.durable(w, &self.registry, &mut self.out),
            Waiter::PrivacySaved(w) => self.out.reply(w.reply, w.frame.into()),
            // Run by `fire_ready` itself.
            Waiter::Stored { .. }
            | Waiter::Compaction { .. }
            | Waiter::GroupReply { .. }
            | Waiter::GroupFanout { .. }
            | Waiter::GroupJoined { .. }
            | Waiter::GroupStored { .. } => {}
        }
    }

    /// The log failed: refuse writes from now on and answer what can be answered with an error.
    fn on_storage_failed(&mut self, reason: String) {
        let unavailable = ErrorCode::StorageUnavailable;
        for waiter in self.ledger.fail(reason) {
            match waiter {
                Waiter::SendReply {
                    reply,
                    client_msg_id,
                    ..
                } => self.out.send_result(reply, client_msg_id, Err(unavailable)),
                Waiter::Account(a) => {
                    self.accounts.pending_account_done(a.key);
                    self.out
                        .reply_error(a.reply, unavailable, "storage unavailable");
                }
                Waiter::Binding { static_key, .. } => self.accounts.binding_failed(static_key),
                Waiter::Stored { .. }
                | Waiter::Kill { .. }
                | Waiter::PrekeyNotice { .. }
                | Waiter::GroupFanout { .. }
                | Waiter::GroupStored { .. } => {}
                Waiter::GroupJoined { reply_shard, token } => {
                    let j = crate::GroupJoined {
                        token,
                        shard: self.config.shard,
                        result: Err(Vec::new()),
                    };
                    self.out
                        .mesh(reply_shard, MeshMsg::GroupJoined(Box::new(j)));
                }
                Waiter::GroupReply { reply, .. } => {
                    self.out
                        .reply_error(reply, unavailable, "storage unavailable");
                }
                Waiter::Compaction { .. } => self.ledger.compaction_abandoned(),
                Waiter::PrekeyReply {
                    reply, request_id, ..
                } => {
                    let result = PrekeyFetchResult {
                        conn: reply.conn,
                        request_id,
                        result: Err(unavailable),
                    };
                    self.out
                        .mesh(reply.shard, MeshMsg::PrekeyFetchResult(result));
                }
                Waiter::PrekeyUploaded { conn, .. } => {
                    if self.registry.session(conn).is_some() {
                        let error = Frame::error(unavailable, 0, "storage unavailable");
                        self.out.send(conn, error);
                    }
                }
                Waiter::Linked(w) => {
                    self.devices.link_failed(&w);
                    let error = Frame::error(unavailable, w.request_id, "storage unavailable");
                    self.out.reply(w.primary, error);
                }
                Waiter::Status(w) => self.status.failed(w, &self.registry, &mut self.out),
                Waiter::PrivacySaved(w) => {
                    let id = w.frame.request_id;
                    let error = Frame::error(unavailable, id, "storage unavailable");
                    self.out.reply(w.reply, error);
                }
                Waiter::Unlinked(w) => {
                    let requester = w.requester.filter(|(r, _)| self.registry.contains(r.conn));
                    if let Some((r, id)) = requester {
                        let error = Frame::error(unavailable, id, "storage unavailable");
                        self.out.send(r.conn, error);
                    }
                }
            }
        }
    }

    // ----- timer: TTL, registration sweep, segments ---------------------------------------

    fn on_tick(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        let mut log = Log {
            ledger: &mut self.ledger,
            journal: &mut *journal,
        };
        let (registry, out) = (&mut self.registry, &mut self.out);
        self.mailboxes.tick(now_ms, &mut log, registry, out);
        self.prekeys.sweep(now_ms);
        self.devices.sweep(now_ms);
        self.media.sweep(now_ms);
        self.presence.sweep(now_ms);
        let mut log = Log {
            ledger: &mut self.ledger,
            journal: &mut *journal,
        };
        self.status.tick(now_ms, &mut log, &mut self.out);
        self.privacy.flush(&mut log);
        self.calls_tick(now_ms, &mut *journal);
        self.registration.sweep(now_ms, &self.config, &mut self.out);
        self.fanout.tick(self.config.shard, &mut self.out);
        self.groups.tick(now_ms, &mut self.out);
        if !self.ledger.is_poisoned() {
            self.ledger.delete_segments(journal);
            self.maybe_compact(journal);
        }
    }

    /// Copies every sub-state's counters into [`ShardStats`].
    pub(crate) fn refresh_stats(&mut self) {
        let s = &mut self.stats;
        s.routed_local = self.sender.routed_local;
        s.routed_cross_shard = self.sender.routed_cross_shard;
        let m = &self.mailboxes;
        s.stored = m.stored;
        s.dedup_hits = m.dedup_hits;
        s.delivered = m.delivered;
        s.receipts_stored = m.receipts_stored;
        s.acked = m.acked;
        s.pruned = m.pruned;
        s.expired = m.expired;
        s.pushes = m.pushes;
        s.mailbox_depth = m.depth() as u64;
        s.dedup_entries = m.dedup_len() as u64;
        s.mailbox_hot = m.hot_entries;
        s.records_read = m.records_read;
        s.record_read_failures = m.record_read_failures;
        s.record_reads_inflight = m.reads_inflight() as u64;
        s.compactions_abandoned = self.ledger.compactions_abandoned;
        s.appends = self.ledger.appends;
        s.segments_deleted = self.ledger.segments_deleted;
        s.segments_compacted = self.ledger.segments_compacted;
        s.connections_logged_in = self.registry.logged_in() as u64;
        s.logins = self.registry.logins;
        s.registrations = self.accounts.registrations;
        let p = &self.prekeys;
        s.prekey_uploads = p.uploads;
        s.prekey_uploads_refused = p.uploads_refused;
        s.prekey_fetches = p.fetches;
        s.prekeys_consumed = p.consumed;
        s.prekey_bundles_without_one_time = p.without_one_time;
        s.prekey_fetches_rate_limited = p.rate_limited;
        s.prekeys_stored = p.stored;
        let d = &self.devices;
        s.devices_linked = d.companions() as u64;
        s.links = d.linked;
        s.unlinks = d.unlinked;
        s.links_refused = d.link_refused;
        s.link_codes_issued = d.codes_issued;
        s.link_codes = d.codes() as u64;
        s.device_list_fetches = d.list_fetches;
        s.sends_stale = d.stale_sends;
        s.sends_multi = self.sender.sends_multi;
        s.device_list_watchers_evicted = d.watchers_evicted;
        let md = &self.media;
        s.media_slots_granted = md.slots_granted;
        s.media_slot_bytes_granted = md.slot_bytes_granted;
        s.media_slots_refused = md.slots_refused;
        s.media_downloads_granted = md.downloads_granted;
        let st = &self.status;
        s.status_published = st.published;
        s.status_deleted = st.deleted;
        s.status_expired = st.expired;
        s.status_live = st.live() as u64;
        let pr = &self.presence;
        s.presence_subscriptions = pr.subscriptions() as u64;
        s.presence_subscription_limit = pr.subscriptions_refused_conn;
        s.presence_subscriber_limit = pr.subscriptions_refused_user;
        s.presence_subscriptions_expired = pr.subscriptions_expired;
        s.presence_changes = pr.changes;
        s.presence_change_frames = pr.change_frames;
        s.presence_typing_relayed = pr.typing_relayed;
        s.presence_typing_rate_limited = pr.typing_rate_limited;
        let pv = &self.privacy;
        s.presence_contact_limit = pv.contact_limit_refusals;
        s.presence_last_seen_records = pv.last_seen_records;
        s.presence_blocked_drops = pv.blocked_drops;
        let c = &self.calls;
        s.calls_active = c.len() as u64;
        s.call_offers = c.offers;
        s.calls_answered = c.answered;
        s.calls_missed = c.missed;
        s.calls_busy = c.busy;
        s.call_limit = c.refused_limit;
        s.turn_credentials = c.turn_issued;
        s.turn_rate_limited = c.turn_rate_limited;
        s.turn_unavailable = c.turn_unavailable;
        let g = &self.groups;
        s.groups = g.len() as u64;
        s.groups_created = g.created;
        s.group_changes = g.changes;
        s.group_messages = g.messages;
        s.group_fanouts_pending = g.pending_len() as u64;
        s.group_fanouts_sent = g.fanouts_sent;
        s.group_fanouts_redriven = g.fanouts_redriven;
        s.group_refused_full = g.refused_full;
        s.group_refused_backlog = g.refused_backlog;
        s.group_copies_stored = self.fanout.stored;
        s.group_copy_entries = self.fanout.entries;
        s.group_copies_duplicate = self.fanout.duplicates;
        s.group_joins_refused = self.memberships.refused;
        s.group_copies_out_of_order = self.fanout.out_of_order;
        s.group_receipts_sent = self.groups.receipts_sent;
    }

    /// A companion may only publish the identity keys its primary signed.
    fn identity_allowed(&self, key: DeviceAddr, keys: &DeviceKeys) -> bool {
        match self.devices.companion(key) {
            Some(c) => c.identity_dh == keys.identity_dh && c.identity_sign == keys.identity_sign,
            None => key.device == 0,
        }
    }
}

/// The close text for a frame that needs a login, sent before one.
fn before_login(frame: &Frame) -> &'static str {
    match frame {
        Frame::Send { .. } => "send before login",
        Frame::Ack { .. } => "ack before login",
        Frame::Read { .. } => "read before login",
        Frame::PrekeyUpload { .. } => "prekey upload before login",
        Frame::SendMulti { .. } => "send before login",
        Frame::LinkApprove { .. } => "link approval before login",
        Frame::DeviceListFetch { .. } => "device list fetch before login",
        Frame::Unlink { .. } => "unlink before login",
        Frame::MediaSlotRequest { .. } | Frame::MediaDownloadRequest { .. } => {
            "media request before login"
        }
        Frame::StatusPublish { .. } | Frame::StatusDelete { .. } => "status before login",
        Frame::GroupCreate { .. }
        | Frame::GroupChange { .. }
        | Frame::GroupSetBlob { .. }
        | Frame::GroupInfoFetch { .. }
        | Frame::GroupReceiptFetch { .. }
        | Frame::GroupSend { .. } => "group request before login",
        _ => "prekey fetch before login",
    }
}
