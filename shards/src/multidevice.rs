//! Multi-device, part of the dispatcher: linking, device lists, removal, and the fan-out of a
//! `SendMulti`, where the device state meets the registry, the mailboxes and the prekeys.
//!
//! Rules (see `devices` for linking and liveness):
//!
//! * **A device is never silently skipped.** A `SendMulti` is stored only when its copies name
//!   exactly the recipient's current devices and the sender's other devices; otherwise the
//!   whole send is refused (`DeviceList { STALE }`, then `DeviceListStale`) and nothing is
//!   stored. The sender's shard checks its own devices; the recipient's home shard checks the
//!   recipient's, after dedup (a retry of a stored send is answered ✓ whatever the list is now).
//! * **All or nothing per shard.** The copies for one shard are appended together and answered
//!   once, when the last is durable. When the recipient's home is another shard the own copies
//!   are stored after the recipient's (a refusal there stores nothing anywhere); a crash in
//!   between leaves the send unanswered and the client's retry completes it (dedup on both).
//! * **No receipt for sync copies**; a `Read` tells the reader's other devices
//!   (`READ_ELSEWHERE`).
//! * **Removal** takes effect in memory at once; the answer, the device's close and the death
//!   of its records wait for the removal record.

use protocol::frame::{
    DeviceLinked, DeviceListFetch as FetchFrame, DeviceListReason, DeviceUnlinked, LinkApprove,
    LinkRequest, Registered, SendMulti, Unlink,
};
use protocol::{DeviceAddr, DeviceId, ErrorCode, Frame, UserId};
use storage::Journal;

use crate::ledger::Log;
use crate::registry::Conn;
use crate::sender::MultiRefusal;
use crate::waiter::{LinkWaiter, UnlinkWaiter, Waiter};
use crate::{
    home_shard, ConnId, DeviceListFetch, LinkClaim, LinkClaimed, MeshMsg, Shard, StoreMulti,
};

impl Shard {
    /// The devices of `user` (homed here), increasing; empty when it has no account.
    pub(crate) fn devices_of(&self, user: UserId) -> Vec<DeviceId> {
        if !self.accounts.exists(DeviceAddr::new(user, 0)) {
            return Vec::new();
        }
        let mut ids = vec![0];
        ids.extend(self.devices.companion_ids(user));
        ids
    }

    /// The devices of `addr`'s account other than `addr`, increasing.
    pub(crate) fn other_devices(&self, addr: DeviceAddr) -> Vec<DeviceId> {
        let companions = self.devices.companion_ids(addr.user);
        if companions.is_empty() {
            // A lone primary (every `Read` and most sends): nothing to allocate.
            return companions;
        }
        let mut ids = self.devices_of(addr.user);
        ids.retain(|&d| d != addr.device);
        ids
    }

    /// Whether `addr` is a device of an account homed here.
    pub(crate) fn device_exists(&self, addr: DeviceAddr) -> bool {
        if addr.device == 0 {
            self.accounts.exists(addr)
        } else {
            self.devices.companion(addr).is_some()
        }
    }

    /// Whether `static_key` logs in as `addr`.
    pub(crate) fn device_key_matches(&self, addr: DeviceAddr, static_key: &[u8; 32]) -> bool {
        if addr.device == 0 {
            self.accounts.key_matches(addr, static_key)
        } else {
            self.devices.key_matches(addr, static_key)
        }
    }

    /// `user`'s device list as a frame (device 0 with its published identity, if any).
    pub(crate) fn list_frame(
        &self,
        user: UserId,
        reason: DeviceListReason,
        request_id: u64,
    ) -> Frame {
        let primary = DeviceAddr::new(user, 0);
        let linked_at = self.accounts.registered_at(primary).unwrap_or(0);
        let (dh, sign) = self
            .prekeys
            .identity(primary)
            .map_or(([0; 32], [0; 32]), |k| (k.identity_dh, k.identity_sign));
        self.devices
            .list_frame(user, (linked_at, dh, sign), reason, request_id)
    }

    // ----- linking -----------------------------------------------------------------------

    /// `LinkRequest` from a connection that has not logged in (on the shard holding it).
    pub(crate) fn on_link_request(&mut self, now_ms: u64, conn: ConnId, r: &LinkRequest) {
        let static_key = match self.registry.get(conn) {
            Some(Conn::PreAuth { static_key, .. }) => *static_key,
            Some(Conn::LoggedIn(_)) => {
                let text = "link request after login";
                return self.close(conn, ErrorCode::MalformedFrame, text);
            }
            None => return,
        };
        let registration = &mut self.registration;
        let mut draw = || registration.draw();
        match self.devices.issue_code(now_ms, conn, static_key, &mut draw) {
            Some(mut code) => {
                code.request_id = r.request_id;
                self.out.send(conn, code.into());
            }
            None => {
                let text = "too many link codes outstanding; retry later";
                self.close(conn, ErrorCode::Overloaded, text);
            }
        }
    }

    /// `LinkApprove` from the logged-in device `key`.
    pub(crate) fn on_link_approve(&mut self, conn: ConnId, key: DeviceAddr, a: &LinkApprove) {
        let sign = self.prekeys.identity(key).map(|k| k.identity_sign);
        let reply = self.out.here(conn);
        self.devices.approve(key, reply, a, sign, &mut self.out);
    }

    /// `LinkClaim` at the shard that issued the code.
    pub(crate) fn on_link_claim(&mut self, now_ms: u64, c: &LinkClaim) {
        let result = self.devices.claim_code(now_ms, c, &self.registry);
        let answer = LinkClaimed {
            token: c.token,
            result,
        };
        self.out.mesh(c.reply_shard, MeshMsg::LinkClaimed(answer));
    }

    /// `LinkClaimed` at the account's home shard.
    pub(crate) fn on_link_claimed(
        &mut self,
        now_ms: u64,
        c: LinkClaimed,
        journal: &mut dyn Journal,
    ) {
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        self.devices.claimed(now_ms, c, &mut log, &mut self.out);
    }

    /// A link is durable: the device joins the list; the primary, the new device, the
    /// account's devices and the list's watchers hear it.
    pub(crate) fn link_durable(&mut self, w: &LinkWaiter) {
        if let Some(dead) = self.devices.link_durable(w) {
            self.ledger.kill(dead);
        }
        let linked = DeviceLinked {
            request_id: w.request_id,
            addr: w.addr,
        };
        self.out.reply(w.primary, linked.into());
        self.out
            .reply(w.new_device, Registered { addr: w.addr }.into());
        self.announce(w.addr.user);
    }

    fn announce(&mut self, user: UserId) {
        let frame = self.list_frame(user, DeviceListReason::CHANGED, 0);
        self.devices
            .announce(user, &frame, &self.registry, &mut self.out);
    }

    // ----- device lists ------------------------------------------------------------------

    /// `DeviceListFetch` from a logged-in connection: to the user's home shard.
    pub(crate) fn on_list_fetch_frame(&mut self, conn: ConnId, f: &FetchFrame) {
        let fetch = DeviceListFetch {
            reply: self.out.here(conn),
            request_id: f.request_id,
            user: f.user,
        };
        let home = home_shard(f.user, self.config.shards);
        self.out.mesh(home, MeshMsg::DeviceListFetch(fetch));
    }

    /// `DeviceListFetch` at the user's home shard.
    pub(crate) fn on_list_fetch(&mut self, f: DeviceListFetch) {
        let here = home_shard(f.user, self.config.shards) == self.config.shard;
        if !here || !self.accounts.exists(DeviceAddr::new(f.user, 0)) {
            let code = ErrorCode::NoSuchRecipient;
            return self
                .out
                .reply(f.reply, Frame::error(code, f.request_id, "no such user"));
        }
        self.devices.watch(f.user, f.reply);
        self.devices.list_fetches = self.devices.list_fetches.saturating_add(1);
        let frame = self.list_frame(f.user, DeviceListReason::FETCHED, f.request_id);
        self.out.reply(f.reply, frame);
    }

    // ----- removal -----------------------------------------------------------------------

    /// `Unlink` from the logged-in device `key` (this is its home shard).
    pub(crate) fn on_unlink(
        &mut self,
        now_ms: u64,
        (conn, key): (ConnId, DeviceAddr),
        u: &Unlink,
        journal: &mut dyn Journal,
    ) {
        let id = u.request_id;
        if let Err((code, text)) = self.devices.check_unlink(key, u.device) {
            return self.out.send(conn, Frame::error(code, id, text));
        }
        if self.ledger.is_poisoned() {
            let code = ErrorCode::StorageUnavailable;
            return self
                .out
                .send(conn, Frame::error(code, id, "storage unavailable"));
        }
        let addr = DeviceAddr::new(key.user, u.device);
        let requester = Some((self.out.here(conn), id));
        self.remove_device(now_ms, addr, requester, journal);
    }

    /// Removes a companion: appends its removal, forgets it now, and waits for the removal
    /// to be durable before its records die, `requester` (connection, request id) is answered
    /// and its connection is closed.
    fn remove_device(
        &mut self,
        now_ms: u64,
        addr: DeviceAddr,
        requester: Option<(crate::ConnRef, u64)>,
        journal: &mut dyn Journal,
    ) {
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        let mut dead = self.devices.remove(now_ms, addr, &mut log);
        dead.extend(self.mailboxes.remove_device(addr, &mut self.registry));
        dead.extend(self.prekeys.remove_device(addr));
        let append_id = self.ledger.last_append_id();
        for segment in dead {
            self.ledger.wait(append_id, Waiter::Kill { segment });
        }
        let waiter = UnlinkWaiter { requester, addr };
        self.ledger.wait(append_id, Waiter::Unlinked(waiter));
    }

    /// The primary of `user` is re-registered with another key (a new phone, or the number
    /// now belongs to someone else): every companion the old primary linked is removed first,
    /// so none keeps receiving the account's messages.
    pub(crate) fn remove_companions(
        &mut self,
        now_ms: u64,
        user: UserId,
        journal: &mut dyn Journal,
    ) {
        for device in self.devices.companion_ids(user) {
            self.remove_device(now_ms, DeviceAddr::new(user, device), None, &mut *journal);
        }
    }

    /// A removal is durable: answer the requester, close the removed device, announce.
    pub(crate) fn unlink_durable(&mut self, w: &UnlinkWaiter) {
        if let Some((requester, request_id)) = w.requester {
            if self.registry.session(requester.conn).is_some() {
                let answer = DeviceUnlinked {
                    request_id,
                    device: w.addr.device,
                };
                self.out.send(requester.conn, answer.into());
            }
        }
        if let Some(c) = self.registry.online(w.addr) {
            self.close(
                c,
                ErrorCode::DeviceRemoved,
                "this device was removed from its account",
            );
        }
        self.announce(w.addr.user);
    }

    // ----- fan-out -----------------------------------------------------------------------

    /// `SendMulti` from the logged-in device `key`.
    pub(crate) fn on_send_multi(&mut self, conn: ConnId, key: DeviceAddr, s: SendMulti) {
        let id = s.client_msg_id;
        // Dedup before the set check: a send stored here before is answered whatever the
        // sender's devices are now.
        let own = (!self.mailboxes.seen(key, id)).then(|| self.other_devices(key));
        let (cfg, registry, out) = (&self.config, &mut self.registry, &mut self.out);
        match self
            .sender
            .send_multi((conn, key), s, own.as_deref(), cfg, registry, out)
        {
            Ok(()) => {}
            Err(MultiRefusal::Error(code, text)) => {
                self.out.send(conn, Frame::error(code, id, text));
            }
            Err(MultiRefusal::StaleOwn) => {
                self.devices.stale_sends = self.devices.stale_sends.saturating_add(1);
                let list = self.list_frame(key.user, DeviceListReason::STALE, id);
                self.out.send(conn, list);
                let text = "the sync copies do not match this account's devices";
                let error = Frame::error(ErrorCode::DeviceListStale, id, text);
                self.out.send(conn, error);
            }
        }
    }

    /// Home side of a `SendMulti`'s copies: every user named must be homed here with an
    /// account, the log writable, and (unless it is a retry) each user's copies must name
    /// exactly its expected devices.
    pub(crate) fn on_store_multi(&mut self, now_ms: u64, s: StoreMulti, journal: &mut dyn Journal) {
        let id = s.message.client_msg_id;
        let shards = self.config.shards;
        let ours = |u: UserId| home_shard(u, shards) == self.config.shard;
        let known = s
            .expect
            .iter()
            .all(|&(u, _)| ours(u) && !self.devices_of(u).is_empty());
        let covered = s
            .copies
            .iter()
            .all(|(a, _)| s.expect.iter().any(|&(u, _)| u == a.user));
        if !known || !covered {
            return self
                .out
                .send_result(s.reply, id, Err(ErrorCode::NoSuchRecipient));
        }
        if self.ledger.is_poisoned() {
            return self
                .out
                .send_result(s.reply, id, Err(ErrorCode::StorageUnavailable));
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal: &mut *journal,
        };
        if self
            .mailboxes
            .answer_duplicate(s.reply, &s.message, &mut log)
        {
            return;
        }
        // A recipient who blocked the sender gets nothing; the sender still gets ✓.
        let sender = s.message.from.user;
        let mut s = s;
        let blocked: Vec<UserId> = s
            .expect
            .iter()
            .map(|&(u, _)| u)
            .filter(|&u| self.blocked_send(u, sender))
            .collect();
        if !blocked.is_empty() {
            s.copies.retain(|(a, _)| !blocked.contains(&a.user));
            s.expect.retain(|(u, _)| !blocked.contains(u));
            if s.copies.is_empty() {
                return self.out.send_result(s.reply, id, Ok(now_ms));
            }
        }
        // Sync copies carry their message's time (the recipient's copies were stored with it):
        // a device linked after that gets none, and is not expected.
        let cutoff = s.message.server_ts_ms;
        let late = |a: DeviceAddr| {
            cutoff != 0
                && self
                    .devices
                    .companion(a)
                    .is_some_and(|c| c.linked_at_ms > cutoff)
        };
        let mut copies = s.copies;
        copies.retain(|(a, _)| !late(*a));
        for &(user, exclude) in &s.expect {
            let mut want = self.devices_of(user);
            want.retain(|&d| Some(d) != exclude && !late(DeviceAddr::new(user, d)));
            let mut got: Vec<DeviceId> = copies
                .iter()
                .filter(|(a, _)| a.user == user)
                .map(|(a, _)| a.device)
                .collect();
            got.sort_unstable();
            if want != got {
                self.devices.stale_sends = self.devices.stale_sends.saturating_add(1);
                let list = self.list_frame(user, DeviceListReason::STALE, id);
                self.out.reply(s.reply, list);
                return self
                    .out
                    .send_result(s.reply, id, Err(ErrorCode::DeviceListStale));
            }
        }
        if copies.is_empty() {
            // Every copy was for a device linked after the message: nothing to store.
            return self.out.send_result(s.reply, id, Ok(cutoff));
        }
        let mut log = Log {
            ledger: &mut self.ledger,
            journal,
        };
        let registry = &mut self.registry;
        self.mailboxes
            .store_copies(now_ms, s.reply, s.message, copies, &mut log, registry);
    }
}
