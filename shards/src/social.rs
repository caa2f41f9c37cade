//! Presence, privacy, typing and calls, part of the dispatcher: where the presence, privacy
//! and call sub-states meet the registry, the device lists, the mailboxes and the mesh.
//!
//! Rules (the sub-states' own rules are in `presence`, `privacy` and `calls`):
//!
//! * **Each side decides what it owns.** The watched user's home shard applies the watched
//!   user's settings and blocks; the subscriber's home shard works out the subscriber's side
//!   (reciprocity, its own blocks) and sends it with the subscription ([`Reciprocity`]).
//!   Changes of the watched user's settings take effect at once for every subscriber; a
//!   change of the subscriber's own settings re-sends its live subscriptions with its new
//!   side, so it applies at once too.
//! * **A frame per subscriber whose view changed.** A login, a last disconnect or a settings
//!   change computes every live subscriber's view before and after and sends only those that
//!   differ.
//! * **Blocking.** A user who blocked another gets no message, receipt, typing notice, call
//!   or presence from it; the blocked sender still gets ✓ (the home shard answers as if
//!   stored) and the blocked caller hears ringing then `MISSED`.
//! * **Capabilities.** A presence frame needs `PRESENCE`, a call frame `CALLS`, announced at
//!   `Login` (else `CapabilityNotAnnounced`, fatal); `Presence` / `TypingNotice` go only to
//!   connections that announced `PRESENCE`, `CallEvent` only to `CALLS` ones.
//! * Every mesh message here is a follow-up (best effort): presence and typing are lossy by
//!   nature, and a lost call message is repaired by the ring timeout or the client's hangup.

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{
    self, CallEvent, CallSignal, ContactsEdit, PresenceSubscribe, PrivacySet, TurnCredentials,
    TurnRequest, TypingNotice,
};
use protocol::presence::{CallKind, PresenceState, TypingState};
use protocol::{capability, DeviceAddr, DeviceId, ErrorCode, Frame, Message, MsgType, UserId};
use storage::Journal;

use crate::calls::{Call, CallKey, CallState};
use crate::ledger::Log;
pub use crate::presence::Reciprocity;
use crate::presence::Sub;
use crate::privacy::Seen;
use crate::{home_shard, Action, ConnId, ConnRef, MeshMsg, Shard};

/// Presence messages between shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceMsg {
    /// Subscribe `reply` to `user`'s presence until `expires_ms` (at `user`'s home shard).
    Subscribe {
        /// The subscribing connection.
        reply: ConnRef,
        /// Its user.
        watcher: UserId,
        /// Echoed in the answer.
        request_id: u64,
        /// Whose presence.
        user: UserId,
        /// When the subscription ends.
        expires_ms: u64,
        /// The subscriber's side of the visibility rules.
        recip: Reciprocity,
    },
    /// End the subscription of `reply` to `user` (at `user`'s home shard).
    Unsubscribe {
        /// The subscribing connection.
        reply: ConnRef,
        /// Whose presence.
        user: UserId,
    },
    /// The answer to `Subscribe` (at the subscriber's shard): the first `Presence`, or why
    /// the subscription was refused (the subscriber's shard then forgets it).
    Subscribed {
        /// The subscribing connection (on the receiving shard).
        conn: ConnId,
        /// From the request.
        request_id: u64,
        /// Whose presence.
        user: UserId,
        /// The first frame, or the refusal.
        result: Result<frame::Presence, ErrorCode>,
    },
    /// A typing notice for `to_user`'s online devices (at `to_user`'s home shard).
    Typing {
        /// The typing device.
        from: DeviceAddr,
        /// The chat partner.
        to_user: UserId,
        /// What it does.
        state: TypingState,
    },
}

/// Call messages between shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallMsg {
    /// A signal from the caller's device (at the callee's home shard, where the call lives).
    FromCaller {
        /// The calling device.
        from: DeviceAddr,
        /// Its connection.
        reply: ConnRef,
        /// The call.
        call_id: u64,
        /// The callee.
        callee: UserId,
        /// Which step.
        kind: CallKind,
        /// Opaque to the server.
        payload: Bytes,
    },
    /// An event for the caller's device (at its home shard): a signal relayed from a callee
    /// device, a server event, or why the call cannot go on.
    ToCaller {
        /// The caller's connection (on the receiving shard).
        conn: ConnId,
        /// The calling device.
        caller: DeviceAddr,
        /// The call.
        call_id: u64,
        /// (signalling device, kind, payload), or the error for the caller.
        event: Result<(DeviceAddr, CallKind, Bytes), ErrorCode>,
    },
}

/// The kinds after which a call is over for the caller.
fn ends_call(kind: CallKind) -> bool {
    matches!(
        kind,
        CallKind::REJECT | CallKind::BUSY | CallKind::HANGUP | CallKind::MISSED
    )
}

/// The reply address missed-call messages are stored with: no connection has this id (ids are
/// handed out from 1 upwards and never reused), so their ✓ goes nowhere.
const NO_CONN: ConnId = ConnId::MAX;

impl Shard {
    // ----- frames --------------------------------------------------------------------------

    /// A presence or call frame from the logged-in device `key` on `conn`; false when the
    /// frame is not one of them.
    pub(crate) fn on_social_frame(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        frame: Frame,
        journal: &mut dyn Journal,
    ) -> Result<(), Frame> {
        let caps = self.registry.session(conn).map_or(0, |s| s.capabilities);
        let needed = match &frame {
            Frame::PresenceSubscribe(_)
            | Frame::PrivacySet(_)
            | Frame::ContactsEdit(_)
            | Frame::Typing(_) => capability::PRESENCE,
            Frame::CallSignal(_) | Frame::TurnRequest(_) => capability::CALLS,
            _ => return Err(frame),
        };
        if caps & needed == 0 {
            let text = "presence or call frame without its capability announced at login";
            self.close(conn, ErrorCode::CapabilityNotAnnounced, text);
            return Ok(());
        }
        match frame {
            Frame::PresenceSubscribe(s) => self.on_subscribe_frame(now_ms, (conn, key), &s),
            Frame::PrivacySet(p) => self.on_privacy_set(now_ms, (conn, key), &p, journal),
            Frame::ContactsEdit(e) => self.on_contacts_edit(now_ms, (conn, key), &e, journal),
            Frame::Typing(t) => self.on_typing_frame(now_ms, (conn, key), t.to_user, t.state),
            Frame::CallSignal(s) => self.on_call_signal(now_ms, (conn, key), s),
            Frame::TurnRequest(r) => self.on_turn_request(now_ms, (conn, key), &r),
            other => return Err(other),
        }
        Ok(())
    }

    fn on_subscribe_frame(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        s: &PresenceSubscribe,
    ) {
        let home = home_shard(s.user, self.config.shards);
        let reply = self.out.here(conn);
        let ttl_ms = self.presence.ttl_ms(s.ttl_s);
        if ttl_ms == 0 {
            self.presence.unwatch(conn, s.user);
            let msg = PresenceMsg::Unsubscribe {
                reply,
                user: s.user,
            };
            return self.out.mesh(home, MeshMsg::Presence(Box::new(msg)));
        }
        if !is_valid_user_id(s.user) {
            let error = Frame::error(ErrorCode::NoSuchRecipient, s.request_id, "no such user");
            return self.out.send(conn, error);
        }
        let expires_ms = now_ms.saturating_add(ttl_ms);
        if let Err(code) = self.presence.watch(now_ms, conn, s.user, expires_ms) {
            let text = "presence_subscriptions_per_conn_max reached";
            return self.out.send(conn, Frame::error(code, s.request_id, text));
        }
        self.send_subscribe(reply, key.user, s.request_id, (s.user, expires_ms));
    }

    /// Sends (or renews) the subscription of `reply`, a connection of `watcher`, to `user`,
    /// with `watcher`'s side of the visibility rules as they are now.
    fn send_subscribe(
        &mut self,
        reply: ConnRef,
        watcher: UserId,
        request_id: u64,
        (user, expires_ms): (UserId, u64),
    ) {
        let recip = Reciprocity {
            shares_last_seen: self.privacy.allows(watcher, user, Seen::LastSeen),
            shares_online: self.privacy.allows(watcher, user, Seen::Online),
            blocked: self.privacy.blocks(watcher, user),
        };
        let msg = PresenceMsg::Subscribe {
            reply,
            watcher,
            request_id,
            user,
            expires_ms,
            recip,
        };
        let home = home_shard(user, self.config.shards);
        self.out.mesh(home, MeshMsg::Presence(Box::new(msg)));
    }

    /// `user` changed its settings or lists: its devices' subscriptions are sent again with
    /// its new side of the rules, so reciprocity and its own blocks apply at once (each
    /// answers with a `Presence { request_id: 0 }`). Bounded by the devices' subscriptions.
    fn refresh_subscriptions(&mut self, now_ms: u64, user: UserId) {
        for conn in self.online_conns(user, capability::PRESENCE) {
            let reply = self.out.here(conn);
            for watched in self.presence.watched_by(conn, now_ms) {
                self.send_subscribe(reply, user, 0, watched);
            }
        }
    }

    fn on_privacy_set(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        p: &PrivacySet,
        journal: &mut dyn Journal,
    ) {
        if self.ledger.is_poisoned() {
            let error = Frame::error(ErrorCode::StorageUnavailable, p.request_id, "storage");
            return self.out.send(conn, error);
        }
        let before = self.presence_views(now_ms, key.user);
        let reply = (self.out.here(conn), p.request_id);
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        let settings = (p.last_seen, p.online);
        self.privacy
            .set(now_ms, key.user, settings, reply, &mut log);
        self.notify_presence(key.user, before);
        self.refresh_subscriptions(now_ms, key.user);
    }

    fn on_contacts_edit(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        e: &ContactsEdit,
        journal: &mut dyn Journal,
    ) {
        if self.ledger.is_poisoned() {
            let error = Frame::error(ErrorCode::StorageUnavailable, e.request_id, "storage");
            return self.out.send(conn, error);
        }
        let before = self.presence_views(now_ms, key.user);
        let reply = (self.out.here(conn), e.request_id);
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        let result = self.privacy.edit(key.user, e.op, &e.users, reply, &mut log);
        if let Err(code) = result {
            let text = "contacts_per_user_max or blocked_per_user_max reached";
            return self.out.send(conn, Frame::error(code, e.request_id, text));
        }
        self.notify_presence(key.user, before);
        self.refresh_subscriptions(now_ms, key.user);
    }

    fn on_typing_frame(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        to_user: UserId,
        state: TypingState,
    ) {
        if !self.presence.typing_allowed(key, now_ms) {
            let text = "typing_per_device_per_s exceeded";
            let error = Frame::error(ErrorCode::TypingRateLimited, 0, text);
            return self.out.send(conn, error);
        }
        if !is_valid_user_id(to_user) || self.privacy.blocks(key.user, to_user) {
            return;
        }
        let msg = PresenceMsg::Typing {
            from: key,
            to_user,
            state,
        };
        let home = home_shard(to_user, self.config.shards);
        self.out.mesh(home, MeshMsg::Presence(Box::new(msg)));
    }

    fn on_turn_request(&mut self, now_ms: u64, (conn, key): (ConnId, DeviceAddr), r: &TurnRequest) {
        let frame = match self.calls.turn(now_ms, key.user) {
            Ok((ttl_s, auth)) => TurnCredentials {
                request_id: r.request_id,
                ttl_s,
                auth,
            }
            .into(),
            Err(code) => Frame::error(code, r.request_id, code.name()),
        };
        self.out.send(conn, frame);
    }

    // ----- presence views ------------------------------------------------------------------

    /// How `watcher` sees `user` (homed here) now.
    fn view(&self, user: UserId, watcher: UserId, recip: Reciprocity) -> (PresenceState, u64) {
        if recip.blocked || self.privacy.blocks(user, watcher) {
            return (PresenceState::UNAVAILABLE, 0);
        }
        let online_ok = recip.shares_online && self.privacy.allows(user, watcher, Seen::Online);
        let last_ok = recip.shares_last_seen && self.privacy.allows(user, watcher, Seen::LastSeen);
        let online = self.presence.is_online(user);
        if online && online_ok {
            (PresenceState::ONLINE, 0)
        } else if last_ok {
            (PresenceState::OFFLINE, self.privacy.last_seen_ms(user))
        } else if !online && online_ok {
            (PresenceState::OFFLINE, 0)
        } else {
            (PresenceState::UNAVAILABLE, 0)
        }
    }

    /// Every live subscriber of `user` with its current view (before a change).
    pub(crate) fn presence_views(
        &self,
        now_ms: u64,
        user: UserId,
    ) -> Vec<(Sub, (PresenceState, u64))> {
        self.presence
            .subscribers(user, now_ms)
            .into_iter()
            .map(|s| (s, self.view(user, s.watcher, s.recip)))
            .collect()
    }

    /// After a change of `user`: a `Presence` to every subscriber whose view differs from
    /// `before`.
    pub(crate) fn notify_presence(
        &mut self,
        user: UserId,
        before: Vec<(Sub, (PresenceState, u64))>,
    ) {
        if before.is_empty() {
            return;
        }
        self.presence.changes = self.presence.changes.saturating_add(1);
        for (sub, old) in before {
            let new = self.view(user, sub.watcher, sub.recip);
            if new == old {
                continue;
            }
            let frame = frame::Presence {
                request_id: 0,
                user,
                state: new.0,
                last_seen_ms: new.1,
            };
            self.presence.change_frames = self.presence.change_frames.saturating_add(1);
            self.out.reply(sub.conn, frame.into());
        }
    }

    // ----- login and close -----------------------------------------------------------------

    /// A device logged in on `conn` (after the registry knows it): its user may have come
    /// online.
    pub(crate) fn social_logged_in(&mut self, now_ms: u64, conn: ConnId, key: DeviceAddr) {
        let before = if self.presence.is_online(key.user) {
            Vec::new()
        } else {
            self.presence_views(now_ms, key.user)
        };
        if self.presence.logged_in(conn, key) {
            self.notify_presence(key.user, before);
        }
    }

    /// `Event::Closed`: the user may have gone offline (last seen), its subscriptions end, and
    /// calls it was in hang up.
    pub(crate) fn social_closed(&mut self, now_ms: u64, conn: ConnId) {
        let before = match self.presence.device_of(conn) {
            Some(addr) if self.presence.last_conn(addr.user) => {
                self.presence_views(now_ms, addr.user)
            }
            _ => Vec::new(),
        };
        let (device, watched) = self.presence.closed(conn);
        let reply = self.out.here(conn);
        for user in watched {
            let home = home_shard(user, self.config.shards);
            let msg = PresenceMsg::Unsubscribe { reply, user };
            self.out.mesh(home, MeshMsg::Presence(Box::new(msg)));
        }
        let Some((addr, gone)) = device else {
            return;
        };
        if gone {
            self.privacy.went_offline(addr.user, now_ms);
            self.notify_presence(addr.user, before);
        }
        self.calls_device_gone(conn, addr);
    }

    // ----- presence mesh -------------------------------------------------------------------

    pub(crate) fn on_presence_mesh(&mut self, msg: PresenceMsg) {
        match msg {
            PresenceMsg::Subscribe {
                reply,
                watcher,
                request_id,
                user,
                expires_ms,
                recip,
            } => {
                let result = self.subscribe_here(user, watcher, expires_ms, recip, reply);
                let result = result.map(|()| {
                    let (state, last_seen_ms) = self.view(user, watcher, recip);
                    frame::Presence {
                        request_id,
                        user,
                        state,
                        last_seen_ms,
                    }
                });
                let answer = PresenceMsg::Subscribed {
                    conn: reply.conn,
                    request_id,
                    user,
                    result,
                };
                self.out
                    .mesh(reply.shard, MeshMsg::Presence(Box::new(answer)));
            }
            PresenceMsg::Unsubscribe { reply, user } => self.presence.unsubscribe(user, reply),
            PresenceMsg::Subscribed {
                conn,
                request_id,
                user,
                result,
            } => {
                if self.registry.session(conn).is_none() {
                    return;
                }
                let frame = match result {
                    Ok(p) => p.into(),
                    Err(code) => {
                        self.presence.unwatch(conn, user);
                        Frame::error(code, request_id, code.name())
                    }
                };
                self.out.send(conn, frame);
            }
            PresenceMsg::Typing {
                from,
                to_user,
                state,
            } => self.relay_typing(from, to_user, state),
        }
    }

    fn subscribe_here(
        &mut self,
        user: UserId,
        watcher: UserId,
        expires_ms: u64,
        recip: Reciprocity,
        reply: ConnRef,
    ) -> Result<(), ErrorCode> {
        let ours = home_shard(user, self.config.shards) == self.config.shard;
        if !ours || !self.accounts.exists(DeviceAddr::new(user, 0)) {
            return Err(ErrorCode::NoSuchRecipient);
        }
        let sub = Sub {
            conn: reply,
            watcher,
            expires_ms,
            recip,
        };
        self.presence.subscribe(user, sub)
    }

    fn relay_typing(&mut self, from: DeviceAddr, to_user: UserId, state: TypingState) {
        if self.privacy.blocks(to_user, from.user) {
            self.privacy.blocked_drops = self.privacy.blocked_drops.saturating_add(1);
            return;
        }
        let notice: Frame = TypingNotice {
            from_user: from.user,
            state,
        }
        .into();
        let mut sent = false;
        for conn in self.online_conns(to_user, capability::PRESENCE) {
            if self.registry.session(conn).map(|s| s.addr) == Some(from) {
                continue;
            }
            self.out.send(conn, notice.clone());
            sent = true;
        }
        if sent {
            self.presence.typing_relayed = self.presence.typing_relayed.saturating_add(1);
        }
    }

    /// The connections of `user`'s devices online here that announced `cap`, by device.
    fn online_conns(&self, user: UserId, cap: u64) -> Vec<ConnId> {
        self.devices_of(user)
            .into_iter()
            .filter_map(|d| self.registry.online(DeviceAddr::new(user, d)))
            .filter(|&c| {
                self.registry
                    .session(c)
                    .is_some_and(|s| s.capabilities & cap != 0)
            })
            .collect()
    }

    // ----- calls: frames ---------------------------------------------------------------------

    fn on_call_signal(&mut self, now_ms: u64, (conn, key): (ConnId, DeviceAddr), s: CallSignal) {
        let id = s.call_id;
        if !s.kind.client_may_send() || s.peer == key.user || !is_valid_user_id(s.peer) {
            let text = "server-only kind, a call to oneself, or an invalid peer";
            return self
                .out
                .send(conn, Frame::error(ErrorCode::CallInvalid, id, text));
        }
        let incoming = self
            .calls
            .get((key.user, id))
            .is_some_and(|c| c.caller.user == s.peer);
        if incoming {
            return self.callee_signal(now_ms, (conn, key), id, s.kind, s.payload);
        }
        let home = home_shard(s.peer, self.config.shards);
        if s.kind == CallKind::OFFER {
            self.calls.outgoing_started(now_ms, key, id, s.peer);
        } else if self.calls.outgoing_of(key) != Some((id, s.peer)) {
            let text = "no such call";
            return self
                .out
                .send(conn, Frame::error(ErrorCode::CallUnknown, id, text));
        } else if s.kind == CallKind::HANGUP {
            self.calls.outgoing_ended(key, id);
        }
        let msg = CallMsg::FromCaller {
            from: key,
            reply: self.out.here(conn),
            call_id: id,
            callee: s.peer,
            kind: s.kind,
            payload: s.payload,
        };
        self.out.mesh(home, MeshMsg::Call(Box::new(msg)));
    }

    /// A signal from device `key` of the callee for its call `id` (homed here).
    fn callee_signal(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        id: u64,
        kind: CallKind,
        payload: Bytes,
    ) {
        let k = (key.user, id);
        let Some(call) = self.calls.get(k).copied() else {
            return;
        };
        if call.silent {
            let text = "no such call";
            return self
                .out
                .send(conn, Frame::error(ErrorCode::CallUnknown, id, text));
        }
        match (call.state, kind) {
            (CallState::Ringing, CallKind::ANSWER) => {
                self.calls.answer(now_ms, k, key.device);
                self.tell_caller(&call, id, Ok((key, kind, payload)));
                let elsewhere = (key, CallKind::ANSWERED_ELSEWHERE, Bytes::new());
                self.tell_callee_devices(k, Some(key.device), elsewhere);
            }
            (CallState::Ringing, CallKind::ICE) => {
                self.tell_caller(&call, id, Ok((key, kind, payload)))
            }
            (CallState::Ringing, CallKind::REJECT | CallKind::BUSY | CallKind::HANGUP) => {
                self.calls.remove(k);
                self.tell_caller(&call, id, Ok((key, kind, payload)));
                self.tell_callee_devices(k, Some(key.device), (key, kind, Bytes::new()));
            }
            (CallState::Active(d), CallKind::ICE) if d == key.device => {
                self.tell_caller(&call, id, Ok((key, kind, payload)))
            }
            (CallState::Active(d), CallKind::HANGUP) if d == key.device => {
                self.calls.remove(k);
                self.tell_caller(&call, id, Ok((key, kind, payload)));
            }
            (CallState::Active(d), _) if d != key.device => {
                let from = DeviceAddr::new(key.user, d);
                let event = CallEvent {
                    call_id: id,
                    from,
                    kind: CallKind::ANSWERED_ELSEWHERE,
                    payload: Bytes::new(),
                };
                self.out.send(conn, event.into());
            }
            _ => {
                let text = "this step does not fit the call's state";
                self.out
                    .send(conn, Frame::error(ErrorCode::CallInvalid, id, text));
            }
        }
    }

    // ----- calls: mesh -----------------------------------------------------------------------

    pub(crate) fn on_call_mesh(&mut self, now_ms: u64, msg: CallMsg, journal: &mut dyn Journal) {
        match msg {
            CallMsg::FromCaller {
                from,
                reply,
                call_id,
                callee,
                kind,
                payload,
            } => {
                let k = (callee, call_id);
                if kind == CallKind::OFFER {
                    return self.on_offer(now_ms, (from, reply), k, payload);
                }
                let call = self.calls.get(k).copied().filter(|c| c.caller == from);
                let Some(call) = call else {
                    let caller = Call {
                        caller: from,
                        caller_conn: reply,
                        state: CallState::Ringing,
                        silent: true,
                        deadline_ms: 0,
                    };
                    // A hangup of a call that is already over needs no answer.
                    if kind != CallKind::HANGUP {
                        self.tell_caller(&caller, call_id, Err(ErrorCode::CallUnknown));
                    }
                    return;
                };
                self.caller_signal(now_ms, k, call, kind, payload, journal);
            }
            CallMsg::ToCaller {
                conn,
                caller,
                call_id,
                event,
            } => {
                let over = event.as_ref().map_or(true, |(_, kind, _)| ends_call(*kind));
                if over {
                    self.calls.outgoing_ended(caller, call_id);
                }
                if self.registry.session(conn).is_none() {
                    return;
                }
                let frame = match event {
                    Ok((from, kind, payload)) => CallEvent {
                        call_id,
                        from,
                        kind,
                        payload,
                    }
                    .into(),
                    Err(code) => Frame::error(code, call_id, code.name()),
                };
                self.out.send(conn, frame);
            }
        }
    }

    /// An `OFFER` at the callee's home shard.
    fn on_offer(
        &mut self,
        now_ms: u64,
        (from, reply): (DeviceAddr, ConnRef),
        k: CallKey,
        payload: Bytes,
    ) {
        let (callee, id) = k;
        let mut call = Call {
            caller: from,
            caller_conn: reply,
            state: CallState::Ringing,
            silent: false,
            deadline_ms: 0,
        };
        let devices = self.devices_of(callee);
        let ours = home_shard(callee, self.config.shards) == self.config.shard;
        if !ours || devices.is_empty() {
            return self.tell_caller(&call, id, Err(ErrorCode::NoSuchRecipient));
        }
        if self.calls.get(k).is_some() {
            return self.tell_caller(&call, id, Err(ErrorCode::CallInvalid));
        }
        if self.calls.is_full() {
            self.calls.refused_limit = self.calls.refused_limit.saturating_add(1);
            return self.tell_caller(&call, id, Err(ErrorCode::CallLimit));
        }
        call.silent = self.privacy.blocks(callee, from.user);
        let primary = DeviceAddr::new(callee, 0);
        if !call.silent && self.calls.engaged(callee, &devices) {
            self.calls.busy = self.calls.busy.saturating_add(1);
            return self.tell_caller(&call, id, Ok((primary, CallKind::BUSY, Bytes::new())));
        }
        self.calls.insert(now_ms, k, call);
        if !call.silent {
            self.ring(k, from, &devices, payload);
        }
        self.tell_caller(&call, id, Ok((primary, CallKind::RINGING, Bytes::new())));
    }

    /// Rings every device of the callee: the offer to the online ones that announced `CALLS`,
    /// a content-free push to the offline ones.
    fn ring(
        &mut self,
        (callee, id): CallKey,
        from: DeviceAddr,
        devices: &[DeviceId],
        payload: Bytes,
    ) {
        for &d in devices {
            let addr = DeviceAddr::new(callee, d);
            match self.registry.online(addr) {
                Some(conn) => {
                    let calls = self
                        .registry
                        .session(conn)
                        .is_some_and(|s| s.capabilities & capability::CALLS != 0);
                    if calls {
                        let offer = CallEvent {
                            call_id: id,
                            from,
                            kind: CallKind::OFFER,
                            payload: payload.clone(),
                        };
                        self.out.send(conn, offer.into());
                    }
                }
                None => self.out.push(Action::Push {
                    to: addr,
                    from_user: from.user,
                    msg_type: MsgType::CALL,
                }),
            }
        }
    }

    /// A signal from the caller for its call `k` (at the callee's home shard).
    fn caller_signal(
        &mut self,
        now_ms: u64,
        k: CallKey,
        call: Call,
        kind: CallKind,
        payload: Bytes,
        journal: &mut dyn Journal,
    ) {
        let from = call.caller;
        match (call.state, kind) {
            (_, CallKind::ICE) if call.silent => {}
            (CallState::Ringing, CallKind::ICE) => {
                self.tell_callee_devices(k, None, (from, kind, payload))
            }
            (CallState::Active(d), CallKind::ICE) => {
                self.tell_callee_device(k, d, (from, kind, payload))
            }
            (CallState::Ringing, CallKind::HANGUP) => {
                self.calls.remove(k);
                if !call.silent {
                    self.tell_callee_devices(k, None, (from, kind, Bytes::new()));
                    // The caller gave up before anyone answered: a missed call, as WhatsApp.
                    self.store_missed_call(now_ms, k, &call, journal);
                }
            }
            (CallState::Active(d), CallKind::HANGUP) => {
                self.calls.remove(k);
                self.tell_callee_device(k, d, (from, kind, payload));
            }
            _ => self.tell_caller(&call, k.1, Err(ErrorCode::CallInvalid)),
        }
    }

    // ----- calls: endings --------------------------------------------------------------------

    /// Tick: rings that timed out become missed calls; calls past `call_max_ms` hang up.
    pub(crate) fn calls_tick(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        for (k, call) in self.calls.take_expired(now_ms) {
            let callee = DeviceAddr::new(k.0, 0);
            match call.state {
                CallState::Ringing => {
                    self.calls.missed = self.calls.missed.saturating_add(1);
                    if !call.silent {
                        let missed = (call.caller, CallKind::MISSED, Bytes::new());
                        self.tell_callee_devices(k, None, missed);
                        self.store_missed_call(now_ms, k, &call, &mut *journal);
                    }
                    let event = Ok((callee, CallKind::MISSED, Bytes::new()));
                    self.tell_caller(&call, k.1, event);
                }
                CallState::Active(d) => {
                    let hangup = (call.caller, CallKind::HANGUP, Bytes::new());
                    self.tell_callee_device(k, d, hangup);
                    let from = DeviceAddr::new(k.0, d);
                    self.tell_caller(&call, k.1, Ok((from, CallKind::HANGUP, Bytes::new())));
                }
            }
        }
        self.calls.sweep(now_ms);
    }

    /// The connection of device `addr` closed: its outgoing call and the calls it answered
    /// hang up.
    fn calls_device_gone(&mut self, conn: ConnId, addr: DeviceAddr) {
        if let Some((id, callee)) = self.calls.outgoing_of(addr) {
            self.calls.outgoing_ended(addr, id);
            let msg = CallMsg::FromCaller {
                from: addr,
                reply: self.out.here(conn),
                call_id: id,
                callee,
                kind: CallKind::HANGUP,
                payload: Bytes::new(),
            };
            let home = home_shard(callee, self.config.shards);
            self.out.mesh(home, MeshMsg::Call(Box::new(msg)));
        }
        for k in self.calls.answered_by(addr) {
            if let Some(call) = self.calls.remove(k) {
                self.tell_caller(&call, k.1, Ok((addr, CallKind::HANGUP, Bytes::new())));
            }
        }
    }

    /// Queues a missed-call message (`MISSED_CALL`, `client_msg_id` = the call id, empty
    /// payload) for every device of the callee: delivered at once to the online ones, kept for
    /// the others (with a push, like any message). Skipped when the log refuses writes.
    fn store_missed_call(
        &mut self,
        now_ms: u64,
        (callee, id): CallKey,
        call: &Call,
        journal: &mut dyn Journal,
    ) {
        if self.ledger.is_poisoned() || self.mailboxes.seen(call.caller, id) {
            return;
        }
        let copies: Vec<(DeviceAddr, Bytes)> = self
            .devices_of(callee)
            .into_iter()
            .map(|d| (DeviceAddr::new(callee, d), Bytes::new()))
            .collect();
        if copies.is_empty() {
            return;
        }
        let message = Message {
            from: call.caller,
            client_msg_id: id,
            server_ts_ms: 0,
            msg_type: MsgType::MISSED_CALL,
            payload: Bytes::new(),
        };
        let reply = ConnRef {
            shard: self.config.shard,
            conn: NO_CONN,
        };
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.mailboxes
            .store_copies(now_ms, reply, message, copies, &mut log, &mut self.registry);
    }

    // ----- calls: sending --------------------------------------------------------------------

    fn tell_caller(
        &mut self,
        call: &Call,
        call_id: u64,
        event: Result<(DeviceAddr, CallKind, Bytes), ErrorCode>,
    ) {
        let msg = CallMsg::ToCaller {
            conn: call.caller_conn.conn,
            caller: call.caller,
            call_id,
            event,
        };
        self.out
            .mesh(call.caller_conn.shard, MeshMsg::Call(Box::new(msg)));
    }

    /// A `CallEvent` to every online `CALLS` device of the callee but `except`.
    fn tell_callee_devices(
        &mut self,
        (callee, id): CallKey,
        except: Option<DeviceId>,
        (from, kind, payload): (DeviceAddr, CallKind, Bytes),
    ) {
        for conn in self.online_conns(callee, capability::CALLS) {
            let device = self.registry.session(conn).map(|s| s.addr.device);
            if device.is_none() || device == except {
                continue;
            }
            let event = CallEvent {
                call_id: id,
                from,
                kind,
                payload: payload.clone(),
            };
            self.out.send(conn, event.into());
        }
    }

    fn tell_callee_device(
        &mut self,
        (callee, id): CallKey,
        device: DeviceId,
        (from, kind, payload): (DeviceAddr, CallKind, Bytes),
    ) {
        if let Some(conn) = self.registry.online(DeviceAddr::new(callee, device)) {
            let event = CallEvent {
                call_id: id,
                from,
                kind,
                payload,
            };
            self.out.send(conn, event.into());
        }
    }

    // ----- blocking in the send path ---------------------------------------------------------

    /// Whether `to` (homed here) blocked `from`: the message is answered ✓ and not stored.
    pub(crate) fn blocked_send(&mut self, to: UserId, from: UserId) -> bool {
        let blocked = to != from && self.privacy.blocks(to, from);
        if blocked {
            self.privacy.blocked_drops = self.privacy.blocked_drops.saturating_add(1);
        }
        blocked
    }
}
