//! Linked devices: the device list of each account homed here (companions, their keys and the
//! primary's signatures, the list version, who watches it), the approvals in progress, and the
//! link codes of the new devices connected to this shard.
//!
//! * **Linking.** A new device's `LinkRequest` draws a code on the shard that holds its
//!   connection (the code's low 16 bits name that shard). The primary's `LinkApprove` is checked
//!   on the account's home shard (primary only, the signature under the primary's published
//!   identity, the device limit counting links in progress), which then claims the code from its
//!   shard (`LinkClaim` → `LinkClaimed`: unknown, expired, used, or the connection and its static
//!   key). A claimed code appends a `Device` record with the lowest free id; once it is durable
//!   the device is in the list, the primary gets `DeviceLinked` and the new device `Registered`.
//!   Codes are volatile: a restart forgets them (the device asks again).
//! * **Removal** applies in memory at once (the device no longer logs in, receives or counts in
//!   the list) and its records die when the `DeviceRemoved` record is durable
//!   (`Waiter::Kill`); the requester's answer and the device's close wait for that too.
//! * **Liveness.** A companion's `Device` record is live while it is linked. The list version
//!   is carried by the last `Device` or `DeviceRemoved` record of the account; a removal record
//!   is live while it carries the current version (so the version never goes back), and dies
//!   when a later change is durable.
//! * **Watchers**: connections that fetched a list get `DeviceList { CHANGED }` when it changes
//!   (at most `device_list_watchers_max` per user, oldest forgotten first). A watcher that
//!   closed is dropped by its shard's `ToConn` (connection ids are never reused).

use crate::types::HashMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protocol::frame::{
    DeviceEntry, DeviceLinked, DeviceList, DeviceListReason, LinkApprove, LinkCode, Registered,
};
use protocol::{capability, DeviceAddr, DeviceId, ErrorCode, Frame, UserId};
use storage::SegmentId;
use switchboard_e2ee::verify_device_signature;

use crate::ledger::Log;
use crate::out::Out;
use crate::record::Record;
use crate::registry::Registry;
use crate::types::StaticKey;
use crate::waiter::{LinkWaiter, Waiter};
use crate::{ConnId, ConnRef, LinkClaim, LinkClaimed, MeshMsg, ShardId};

/// Codes stay known this long past their expiry, so a late approval hears "expired" or
/// "used" rather than "unknown".
const CODE_GRACE_MS: u64 = 10 * 60 * 1000;

/// The limits this state enforces (copied from [`crate::Config`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    shard: ShardId,
    shards: u16,
    devices_per_account_max: usize,
    link_code_ttl_ms: u64,
    link_codes_max: usize,
    watchers_max: usize,
}

/// A linked companion (durable).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Companion {
    pub static_key: StaticKey,
    pub identity_dh: [u8; 32],
    pub identity_sign: [u8; 32],
    pub signature: [u8; 64],
    pub linked_at_ms: u64,
    /// The list version its record carries.
    pub version: u32,
    /// The segment of its `Device` record.
    pub segment: SegmentId,
}

/// One account's companions and list version.
#[derive(Debug, Default)]
struct Account {
    companions: BTreeMap<DeviceId, Companion>,
    /// The current version (of the latest change applied in memory).
    version: u32,
    /// The latest version handed to an append (links become visible only when durable).
    version_next: u32,
    /// The segment of the current removal record when the current version is carried by one
    /// (it is live while it is current).
    removal_segment: Option<SegmentId>,
    /// The device that current removal record removed (not linked while it is current).
    removal_device: DeviceId,
    /// When that removal happened.
    removal_ts_ms: u64,
    /// Device ids of links appended but not durable yet.
    reserved: BTreeSet<DeviceId>,
    /// Approvals claiming a code (count towards the limit).
    claiming: usize,
    /// Connections that fetched this list, oldest first.
    watchers: VecDeque<ConnRef>,
}

/// A link code on the shard of the new device's connection.
#[derive(Clone, Copy, Debug)]
struct Code {
    conn: ConnId,
    static_key: StaticKey,
    expires_ms: u64,
    used: bool,
}

/// An approval on the home shard, waiting for its code to be claimed.
#[derive(Debug)]
struct Approval {
    reply: ConnRef,
    request_id: u64,
    user: UserId,
    static_key: StaticKey,
    identity_dh: [u8; 32],
    identity_sign: [u8; 32],
    signature: [u8; 64],
}

/// Device lists of the accounts homed here, approvals, and the link codes of this shard.
#[derive(Debug)]
pub(crate) struct Devices {
    limits: Limits,
    accounts: HashMap<UserId, Account>,
    codes: HashMap<u64, Code>,
    code_of_conn: HashMap<ConnId, u64>,
    approvals: BTreeMap<u64, Approval>,
    next_token: u64,
    /// Companions linked now (kept in step with every insert and removal: the gauge is read
    /// after every event, so it must not walk the accounts).
    linked_now: usize,
    /// Counters (see [`crate::ShardStats`]).
    pub linked: u64,
    pub unlinked: u64,
    pub link_refused: u64,
    pub codes_issued: u64,
    pub list_fetches: u64,
    pub stale_sends: u64,
    /// Watchers forgotten because a list had `device_list_watchers_max` already.
    pub watchers_evicted: u64,
}

/// Why a `LinkApprove` is refused on the home shard before its code is claimed.
fn refusal(code: ErrorCode, request_id: u64, text: &str) -> Frame {
    Frame::error(code, request_id, text)
}

impl Devices {
    pub fn new(cfg: &crate::Config) -> Self {
        Self {
            limits: Limits {
                shard: cfg.shard,
                shards: cfg.shards,
                devices_per_account_max: cfg.devices_per_account_max.clamp(1, 32),
                link_code_ttl_ms: cfg.link_code_ttl_ms,
                link_codes_max: cfg.link_codes_max,
                watchers_max: cfg.device_list_watchers_max,
            },
            accounts: HashMap::default(),
            codes: HashMap::default(),
            code_of_conn: HashMap::default(),
            approvals: BTreeMap::new(),
            next_token: 1,
            linked_now: 0,
            linked: 0,
            unlinked: 0,
            link_refused: 0,
            codes_issued: 0,
            list_fetches: 0,
            stale_sends: 0,
            watchers_evicted: 0,
        }
    }

    /// Companions linked (gauge).
    pub fn companions(&self) -> usize {
        self.linked_now
    }

    /// Link codes known (gauge).
    pub fn codes(&self) -> usize {
        self.codes.len()
    }

    pub fn companion(&self, addr: DeviceAddr) -> Option<&Companion> {
        self.accounts
            .get(&addr.user)
            .and_then(|a| a.companions.get(&addr.device))
    }

    /// Whether `static_key` is the current key of companion `addr`.
    pub fn key_matches(&self, addr: DeviceAddr, static_key: &StaticKey) -> bool {
        self.companion(addr)
            .is_some_and(|c| c.static_key == *static_key)
    }

    /// The companion ids of `user`, increasing.
    pub fn companion_ids(&self, user: UserId) -> Vec<DeviceId> {
        self.accounts
            .get(&user)
            .map(|a| a.companions.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn version(&self, user: UserId) -> u32 {
        self.accounts.get(&user).map_or(0, |a| a.version)
    }

    /// The `DeviceList` frame of `user`; `primary` is device 0's (linked_at, identity keys).
    pub fn list_frame(
        &self,
        user: UserId,
        primary: (u64, [u8; 32], [u8; 32]),
        reason: DeviceListReason,
        request_id: u64,
    ) -> Frame {
        let (linked_at_ms, identity_dh, identity_sign) = primary;
        let mut devices = vec![DeviceEntry {
            device: 0,
            linked_at_ms,
            identity_dh,
            identity_sign,
            signature: [0; 64],
        }];
        if let Some(a) = self.accounts.get(&user) {
            devices.extend(a.companions.iter().map(|(&device, c)| DeviceEntry {
                device,
                linked_at_ms: c.linked_at_ms,
                identity_dh: c.identity_dh,
                identity_sign: c.identity_sign,
                signature: c.signature,
            }));
        }
        DeviceList {
            request_id,
            user,
            version: self.version(user),
            reason,
            devices,
        }
        .into()
    }

    // ----- link codes (the new device's shard) -------------------------------------------

    /// `LinkRequest` from a connection that has not logged in: a fresh code (replacing its
    /// previous one), or `None` when the table is full.
    pub fn issue_code(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        static_key: StaticKey,
        draw: &mut dyn FnMut() -> u64,
    ) -> Option<LinkCode> {
        if let Some(old) = self.code_of_conn.remove(&conn) {
            self.codes.remove(&old);
        }
        if self.codes.len() >= self.limits.link_codes_max {
            return None;
        }
        let code = loop {
            let c = (draw() & !0xFFFF) | u64::from(self.limits.shard);
            if c > 0xFFFF && !self.codes.contains_key(&c) {
                break c;
            }
        };
        let expires_ms = now_ms.saturating_add(self.limits.link_code_ttl_ms);
        let entry = Code {
            conn,
            static_key,
            expires_ms,
            used: false,
        };
        self.codes.insert(code, entry);
        self.code_of_conn.insert(conn, code);
        self.codes_issued = self.codes_issued.saturating_add(1);
        Some(LinkCode {
            request_id: 0,
            code,
            expires_in_s: u32::try_from(self.limits.link_code_ttl_ms / 1000).unwrap_or(u32::MAX),
        })
    }

    /// `LinkClaim` from an account's home shard: the code's connection, or why not. A claimed
    /// code is used up.
    pub fn claim_code(
        &mut self,
        now_ms: u64,
        c: &LinkClaim,
        registry: &Registry,
    ) -> Result<ConnRef, ErrorCode> {
        let Some(code) = self.codes.get_mut(&c.code) else {
            return Err(ErrorCode::LinkCodeUnknown);
        };
        if code.used {
            return Err(ErrorCode::LinkCodeUsed);
        }
        if now_ms >= code.expires_ms {
            return Err(ErrorCode::LinkCodeExpired);
        }
        let waiting = registry
            .peer(code.conn)
            .is_some_and(|(_, key)| key == code.static_key)
            && registry.session(code.conn).is_none();
        if code.static_key != c.static_key || !waiting {
            return Err(ErrorCode::LinkCodeUnknown);
        }
        code.used = true;
        Ok(ConnRef {
            shard: self.limits.shard,
            conn: code.conn,
        })
    }

    /// Timer: forget codes past their expiry and grace.
    pub fn sweep(&mut self, now_ms: u64) {
        debug_assert_eq!(
            self.linked_now,
            self.accounts
                .values()
                .map(|a| a.companions.len())
                .sum::<usize>(),
            "companion gauge out of step"
        );
        let codes = &mut self.codes;
        codes.retain(|_, c| now_ms < c.expires_ms.saturating_add(CODE_GRACE_MS));
        self.code_of_conn.retain(|_, code| codes.contains_key(code));
    }

    // ----- approvals (the account's home shard) ------------------------------------------

    /// `LinkApprove` from `primary` (logged in here). `primary_sign` is its published identity
    /// signing key. On success a `LinkClaim` goes to the code's shard.
    pub fn approve(
        &mut self,
        primary: DeviceAddr,
        reply: ConnRef,
        a: &LinkApprove,
        primary_sign: Option<[u8; 32]>,
        out: &mut Out,
    ) {
        let id = a.request_id;
        if let Err((code, text)) = self.check_approval(primary, a, primary_sign) {
            self.link_refused = self.link_refused.saturating_add(1);
            return out.send(reply.conn, refusal(code, id, text));
        }
        let code_shard = a.code & 0xFFFF;
        if code_shard >= u64::from(self.limits.shards) || a.code <= 0xFFFF {
            self.link_refused = self.link_refused.saturating_add(1);
            let text = "no such link code";
            return out.send(reply.conn, refusal(ErrorCode::LinkCodeUnknown, id, text));
        }
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        let account = self.accounts.entry(primary.user).or_default();
        account.claiming = account.claiming.saturating_add(1);
        let approval = Approval {
            reply,
            request_id: id,
            user: primary.user,
            static_key: a.keys.static_key,
            identity_dh: a.keys.identity_dh,
            identity_sign: a.keys.identity_sign,
            signature: a.keys.signature,
        };
        self.approvals.insert(token, approval);
        let claim = LinkClaim {
            reply_shard: self.limits.shard,
            token,
            code: a.code,
            static_key: a.keys.static_key,
        };
        out.mesh(code_shard as ShardId, MeshMsg::LinkClaim(claim));
    }

    fn check_approval(
        &self,
        primary: DeviceAddr,
        a: &LinkApprove,
        primary_sign: Option<[u8; 32]>,
    ) -> Result<(), (ErrorCode, &'static str)> {
        if primary.device != 0 {
            return Err((
                ErrorCode::NotPrimary,
                "only the primary device links devices",
            ));
        }
        let Some(sign) = primary_sign else {
            let text = "the primary has not published its identity keys";
            return Err((ErrorCode::LinkSignatureInvalid, text));
        };
        let keys = (&a.keys.identity_dh, &a.keys.identity_sign);
        if verify_device_signature(&sign, primary.user, keys, &a.keys.signature).is_err() {
            let text = "device signature does not verify under the primary's identity";
            return Err((ErrorCode::LinkSignatureInvalid, text));
        }
        if self.devices_counted(primary.user) >= self.limits.devices_per_account_max {
            return Err((ErrorCode::DeviceLimit, "the account has its most devices"));
        }
        Ok(())
    }

    /// Devices of `user` for the limit: the primary, companions, links being made.
    fn devices_counted(&self, user: UserId) -> usize {
        self.accounts.get(&user).map_or(1, |a| {
            1 + a.companions.len() + a.reserved.len() + a.claiming
        })
    }

    /// `LinkClaimed`: append the device (lowest free id) or tell the primary why not.
    pub fn claimed(&mut self, now_ms: u64, c: LinkClaimed, log: &mut Log<'_>, out: &mut Out) {
        let Some(ap) = self.approvals.remove(&c.token) else {
            return;
        };
        let account = self.accounts.entry(ap.user).or_default();
        account.claiming = account.claiming.saturating_sub(1);
        let new_conn = match c.result {
            Ok(conn) => conn,
            Err(code) => {
                self.link_refused = self.link_refused.saturating_add(1);
                let frame = refusal(code, ap.request_id, code.name());
                return out.reply(ap.reply, frame);
            }
        };
        // The same device asking again (its answers were lost): it keeps its id.
        let again = account
            .companions
            .iter()
            .find(|(_, c)| c.static_key == ap.static_key)
            .map(|(&d, c)| {
                (
                    d,
                    c.identity_dh == ap.identity_dh && c.identity_sign == ap.identity_sign,
                )
            });
        match again {
            Some((device, true)) => {
                let addr = DeviceAddr::new(ap.user, device);
                let linked = DeviceLinked {
                    request_id: ap.request_id,
                    addr,
                };
                out.reply(ap.reply, linked.into());
                return out.reply(new_conn, Registered { addr }.into());
            }
            Some((_, false)) => {
                self.link_refused = self.link_refused.saturating_add(1);
                let text = "this key is linked already, with other identity keys: unlink it first";
                let frame = refusal(ErrorCode::LinkCodeUnknown, ap.request_id, text);
                return out.reply(ap.reply, frame);
            }
            None => {}
        }
        let max = self.limits.devices_per_account_max;
        let free = (1..max)
            .filter_map(|d| DeviceId::try_from(d).ok())
            .find(|d| !account.companions.contains_key(d) && !account.reserved.contains(d));
        let (Some(device), false) = (free, log.ledger.is_poisoned()) else {
            self.link_refused = self.link_refused.saturating_add(1);
            let code = if log.ledger.is_poisoned() {
                ErrorCode::StorageUnavailable
            } else {
                ErrorCode::DeviceLimit
            };
            return out.reply(ap.reply, refusal(code, ap.request_id, code.name()));
        };
        account.version_next = account.version_next.max(account.version).saturating_add(1);
        account.reserved.insert(device);
        let version = account.version_next;
        let rec = Record::Device {
            user: ap.user,
            device,
            version,
            static_key: ap.static_key,
            identity_dh: ap.identity_dh,
            identity_sign: ap.identity_sign,
            signature: ap.signature,
            linked_at_ms: now_ms,
        };
        let lsn = log.append(&rec, true);
        let companion = Companion {
            static_key: ap.static_key,
            identity_dh: ap.identity_dh,
            identity_sign: ap.identity_sign,
            signature: ap.signature,
            linked_at_ms: now_ms,
            version,
            segment: lsn.segment,
        };
        let waiter = LinkWaiter {
            addr: DeviceAddr::new(ap.user, device),
            companion,
            primary: ap.reply,
            request_id: ap.request_id,
            new_device: new_conn,
        };
        log.ledger
            .wait(lsn.append_id, Waiter::Linked(Box::new(waiter)));
    }

    /// A link is durable: the device is in the list. Returns the segment of a removal record
    /// it supersedes (now dead).
    pub fn link_durable(&mut self, w: &LinkWaiter) -> Option<SegmentId> {
        let account = self.accounts.entry(w.addr.user).or_default();
        account.reserved.remove(&w.addr.device);
        if account
            .companions
            .insert(w.addr.device, w.companion)
            .is_none()
        {
            self.linked_now = self.linked_now.saturating_add(1);
        }
        self.linked = self.linked.saturating_add(1);
        if w.companion.version >= account.version {
            account.version = w.companion.version;
            return account.removal_segment.take();
        }
        None
    }

    /// A link that will never be durable (the log failed).
    pub fn link_failed(&mut self, w: &LinkWaiter) {
        if let Some(a) = self.accounts.get_mut(&w.addr.user) {
            a.reserved.remove(&w.addr.device);
        }
    }

    // ----- removal -----------------------------------------------------------------------

    /// Why `requester` may not remove `device`, if it may not.
    pub fn check_unlink(
        &self,
        requester: DeviceAddr,
        device: DeviceId,
    ) -> Result<(), (ErrorCode, &'static str)> {
        if device == 0 {
            return Err((ErrorCode::NotPrimary, "the primary cannot be removed"));
        }
        if requester.device != 0 && requester.device != device {
            let text = "a companion may only remove itself";
            return Err((ErrorCode::NotPrimary, text));
        }
        if self
            .companion(DeviceAddr::new(requester.user, device))
            .is_none()
        {
            return Err((ErrorCode::NoSuchDevice, "no such device"));
        }
        Ok(())
    }

    /// Appends the removal of `addr` (checked) and forgets it. Returns the segments whose
    /// records die once the removal is durable (its `Device` record, a removal record it
    /// supersedes).
    pub fn remove(&mut self, now_ms: u64, addr: DeviceAddr, log: &mut Log<'_>) -> Vec<SegmentId> {
        let Some(account) = self.accounts.get_mut(&addr.user) else {
            return Vec::new();
        };
        let Some(c) = account.companions.remove(&addr.device) else {
            return Vec::new();
        };
        self.linked_now = self.linked_now.saturating_sub(1);
        account.version_next = account.version_next.max(account.version).saturating_add(1);
        account.version = account.version_next;
        let rec = Record::DeviceRemoved {
            user: addr.user,
            device: addr.device,
            version: account.version,
            ts_ms: now_ms,
        };
        let lsn = log.append(&rec, true);
        let mut dead = vec![c.segment];
        dead.extend(account.removal_segment.replace(lsn.segment));
        account.removal_device = addr.device;
        account.removal_ts_ms = now_ms;
        self.unlinked = self.unlinked.saturating_add(1);
        dead
    }

    // ----- watchers ----------------------------------------------------------------------

    /// `conn` fetched the list of `user`: it hears about changes.
    pub fn watch(&mut self, user: UserId, conn: ConnRef) {
        let max = self.limits.watchers_max;
        let w = &mut self.accounts.entry(user).or_default().watchers;
        if max == 0 || w.contains(&conn) {
            return;
        }
        if w.len() >= max {
            w.pop_front();
            self.watchers_evicted = self.watchers_evicted.saturating_add(1);
        }
        w.push_back(conn);
    }

    /// Sends `frame` (the new list) to the online devices of `user` that announced
    /// `MULTI_DEVICE` and to its watchers.
    pub fn announce(&self, user: UserId, frame: &Frame, registry: &Registry, out: &mut Out) {
        let mut devices = vec![0];
        devices.extend(self.companion_ids(user));
        for d in devices {
            let Some(conn) = registry.online(DeviceAddr::new(user, d)) else {
                continue;
            };
            let multi = registry
                .session(conn)
                .is_some_and(|s| s.capabilities & capability::MULTI_DEVICE != 0);
            if multi {
                out.send(conn, frame.clone());
            }
        }
        if let Some(a) = self.accounts.get(&user) {
            for &w in &a.watchers {
                out.reply(w, frame.clone());
            }
        }
    }

    // ----- compaction and recovery -------------------------------------------------------

    /// Records live in `segment`: companions, and removal records carrying a current version.
    pub fn live_in(&self, segment: SegmentId) -> (Vec<DeviceAddr>, Vec<UserId>) {
        let mut companions = Vec::new();
        let mut removals = Vec::new();
        for (&user, a) in &self.accounts {
            for (&d, c) in &a.companions {
                if c.segment == segment {
                    companions.push(DeviceAddr::new(user, d));
                }
            }
            if a.removal_segment == Some(segment) {
                removals.push(user);
            }
        }
        (companions, removals)
    }

    /// Compaction: re-appends a companion's record unchanged.
    pub fn copy_companion(&mut self, addr: DeviceAddr, from: SegmentId, log: &mut Log<'_>) {
        let Some(c) = self
            .accounts
            .get_mut(&addr.user)
            .and_then(|a| a.companions.get_mut(&addr.device))
        else {
            return;
        };
        let rec = Record::Device {
            user: addr.user,
            device: addr.device,
            version: c.version,
            static_key: c.static_key,
            identity_dh: c.identity_dh,
            identity_sign: c.identity_sign,
            signature: c.signature,
            linked_at_ms: c.linked_at_ms,
        };
        let lsn = log.append(&rec, true);
        c.segment = lsn.segment;
        log.ledger.kill(from);
    }

    /// Compaction: re-appends the current removal record of `user` (the device it removed is
    /// not linked while the record is current, so replaying the copy later removes nothing).
    pub fn copy_removal(&mut self, user: UserId, from: SegmentId, log: &mut Log<'_>) {
        let Some(a) = self.accounts.get_mut(&user) else {
            return;
        };
        if a.removal_segment != Some(from) {
            return;
        }
        let rec = Record::DeviceRemoved {
            user,
            device: a.removal_device,
            version: a.version,
            ts_ms: a.removal_ts_ms,
        };
        let lsn = log.append(&rec, true);
        a.removal_segment = Some(lsn.segment);
        log.ledger.kill(from);
    }

    /// Whether a `DeviceRemoved` record met in log order removes what it names: not when the
    /// device there now was linked by a later change (a higher version) — the record is then a
    /// compaction copy of an older removal, written while the relink was not durable yet.
    pub fn removal_applies(&self, user: UserId, device: DeviceId, version: u32) -> bool {
        self.companion(DeviceAddr::new(user, device))
            .is_none_or(|c| c.version < version)
    }

    /// A `Device` or `DeviceRemoved` record, in log order; false for any other kind.
    pub fn recover(&mut self, seg: SegmentId, rec: &Record) -> bool {
        match *rec {
            Record::Device {
                user,
                device,
                version,
                static_key,
                identity_dh,
                identity_sign,
                signature,
                linked_at_ms,
            } => {
                let a = self.accounts.entry(user).or_default();
                let c = Companion {
                    static_key,
                    identity_dh,
                    identity_sign,
                    signature,
                    linked_at_ms,
                    version,
                    segment: seg,
                };
                if a.companions.insert(device, c).is_none() {
                    self.linked_now = self.linked_now.saturating_add(1);
                }
                if version >= a.version {
                    a.version = version;
                    a.removal_segment = None;
                }
                a.version_next = a.version_next.max(version);
            }
            Record::DeviceRemoved {
                user,
                device,
                version,
                ts_ms,
            } => {
                let applies = self.removal_applies(user, device, version);
                let a = self.accounts.entry(user).or_default();
                if applies && a.companions.remove(&device).is_some() {
                    self.linked_now = self.linked_now.saturating_sub(1);
                }
                if version >= a.version {
                    a.version = version;
                    a.removal_segment = Some(seg);
                    a.removal_device = device;
                    a.removal_ts_ms = ts_ms;
                }
                a.version_next = a.version_next.max(version);
            }
            _ => return false,
        }
        true
    }

    /// The segment of every live record.
    pub fn live_segments(&self) -> Vec<SegmentId> {
        let mut out = Vec::new();
        for a in self.accounts.values() {
            out.extend(a.companions.values().map(|c| c.segment));
            out.extend(a.removal_segment);
        }
        out
    }
}
