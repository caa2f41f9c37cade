//! Accounts (which static key each device logs in with, home side) and the reverse key index
//! (which device a static key is bound to, on the key's shard).
//!
//! An account record is live while it is the device's current one, a key binding always. A
//! record superseded by an append dies only once that append is durable, so a segment is never
//! deleted while its replacement could still be lost.

use crate::types::HashMap;

use protocol::frame::Registered;
use protocol::DeviceAddr;
use storage::SegmentId;

use crate::record::Record;

use crate::ledger::{Ledger, Log};
use crate::out::Out;
use crate::types::StaticKey;
use crate::waiter::{AccountWaiter, Waiter};
use crate::{ClaimKey, ConnRef, MeshMsg, ShardId};

/// A device's current key, and where its record lives.
#[derive(Clone, Copy, Debug)]
struct Account {
    static_key: StaticKey,
    ts_ms: u64,
    segment: SegmentId,
}

/// A durable reverse-index entry.
#[derive(Clone, Copy, Debug)]
struct Binding {
    addr: DeviceAddr,
    ts_ms: u64,
    segment: SegmentId,
}

/// A key binding appended but not durable yet, and who waits for it.
#[derive(Debug)]
struct PendingBinding {
    addr: DeviceAddr,
    ts_ms: u64,
    answers: Vec<(ShardId, u64)>,
}

/// Accounts homed here and key bindings owned here.
#[derive(Debug, Default)]
pub(crate) struct Accounts {
    /// Devices and their current keys (durable records only).
    accounts: HashMap<DeviceAddr, Account>,
    /// Account appends not durable yet, per device (compaction must not re-append the current
    /// record behind a newer pending one: the last record in the log wins at recovery).
    pending_accounts: HashMap<DeviceAddr, u32>,
    /// Reverse key index (durable records only).
    bindings: HashMap<StaticKey, Binding>,
    /// Key bindings appended, not durable yet.
    pending_bindings: HashMap<StaticKey, PendingBinding>,
    /// Registrations completed.
    pub registrations: u64,
}

impl Accounts {
    pub fn exists(&self, key: DeviceAddr) -> bool {
        self.accounts.contains_key(&key)
    }

    /// When the device's current account record was written (registration, for the primary).
    pub fn registered_at(&self, key: DeviceAddr) -> Option<u64> {
        self.accounts.get(&key).map(|a| a.ts_ms)
    }

    /// Whether `static_key` is the current key of `key`.
    pub fn key_matches(&self, key: DeviceAddr, static_key: &StaticKey) -> bool {
        self.accounts
            .get(&key)
            .is_some_and(|a| a.static_key == *static_key)
    }

    /// `ClaimKey`: bind the key (durably) unless it is bound, or being bound, to someone else.
    /// `KeyClaimed` has no error form; when the claim cannot be written the requester's
    /// pending verification times out (or fails on `PeerRestarted`) with `StorageUnavailable`.
    pub fn claim(
        &mut self,
        now_ms: u64,
        c: ClaimKey,
        table_max_entries: usize,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        if let Some(b) = self.bindings.get(&c.static_key) {
            let result = if b.addr == c.addr {
                Ok(())
            } else {
                Err(b.addr.user)
            };
            let answer = MeshMsg::KeyClaimed(crate::KeyClaimed {
                token: c.token,
                result,
            });
            return out.mesh(c.reply_shard, answer);
        }
        if let Some(p) = self.pending_bindings.get_mut(&c.static_key) {
            if p.addr == c.addr {
                // Same claim while the first is in flight: answer both when it is durable.
                p.answers.push((c.reply_shard, c.token));
                return;
            }
            let answer = MeshMsg::KeyClaimed(crate::KeyClaimed {
                token: c.token,
                result: Err(p.addr.user),
            });
            return out.mesh(c.reply_shard, answer);
        }
        if log.ledger.is_poisoned() || self.pending_bindings.len() >= table_max_entries {
            return;
        }
        let rec = Record::KeyBinding {
            static_key: c.static_key,
            user: c.addr.user,
            device: c.addr.device,
            ts_ms: now_ms,
        };
        let lsn = log.append(&rec, true);
        let pending = PendingBinding {
            addr: c.addr,
            ts_ms: now_ms,
            answers: vec![(c.reply_shard, c.token)],
        };
        self.pending_bindings.insert(c.static_key, pending);
        let waiter = Waiter::Binding {
            static_key: c.static_key,
            segment: lsn.segment,
        };
        log.ledger.wait(lsn.append_id, waiter);
    }

    /// A key binding is durable: record it and answer every claimant.
    pub fn binding_durable(&mut self, static_key: StaticKey, segment: SegmentId, out: &mut Out) {
        let Some(p) = self.pending_bindings.remove(&static_key) else {
            return;
        };
        let binding = Binding {
            addr: p.addr,
            ts_ms: p.ts_ms,
            segment,
        };
        self.bindings.insert(static_key, binding);
        for (shard, token) in p.answers {
            let answer = MeshMsg::KeyClaimed(crate::KeyClaimed {
                token,
                result: Ok(()),
            });
            out.mesh(shard, answer);
        }
    }

    /// A binding that will never become durable (the log failed).
    pub fn binding_failed(&mut self, static_key: StaticKey) {
        self.pending_bindings.remove(&static_key);
    }

    /// Appends the device-0 account record of a verified number; `Registered` goes out once it
    /// is durable. Re-registering a number replaces its device-0 key. The old key stays bound
    /// to the number in the reverse index (bindings are never removed), so it cannot be
    /// registered to another number, and it no longer logs in (the account check wants the
    /// new key).
    pub fn register(
        &mut self,
        now_ms: u64,
        phone: protocol::UserId,
        static_key: StaticKey,
        reply: ConnRef,
        log: &mut Log<'_>,
    ) {
        let key = DeviceAddr::new(phone, 0);
        let rec = Record::Account {
            user: phone,
            device: 0,
            static_key,
            ts_ms: now_ms,
        };
        let lsn = log.append(&rec, true);
        let n = self.pending_accounts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        let waiter = AccountWaiter {
            key,
            static_key,
            ts_ms: now_ms,
            segment: lsn.segment,
            reply,
        };
        log.ledger.wait(lsn.append_id, Waiter::Account(waiter));
    }

    /// A device's new account record is durable: switch to it and answer `Registered`.
    pub fn account_durable(&mut self, w: AccountWaiter, ledger: &mut Ledger, out: &mut Out) {
        self.pending_account_done(w.key);
        let account = Account {
            static_key: w.static_key,
            ts_ms: w.ts_ms,
            segment: w.segment,
        };
        if let Some(old) = self.accounts.insert(w.key, account) {
            // The replaced record dies only now that its successor is durable.
            ledger.kill(old.segment);
        }
        self.registrations = self.registrations.saturating_add(1);
        out.reply(w.reply, Registered { addr: w.key }.into());
    }

    pub fn pending_account_done(&mut self, key: DeviceAddr) {
        if let Some(n) = self.pending_accounts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_accounts.remove(&key);
            }
        }
    }

    // ----- compaction --------------------------------------------------------------------

    /// Accounts and bindings whose live record is in `segment`. An account behind a newer
    /// pending record must not be re-appended (the last record wins at recovery); it dies when
    /// that one is durable.
    pub fn live_in(&self, segment: SegmentId) -> (Vec<DeviceAddr>, Vec<StaticKey>) {
        let accounts = self
            .accounts
            .iter()
            .filter(|(k, a)| a.segment == segment && !self.pending_accounts.contains_key(k))
            .map(|(&k, _)| k)
            .collect();
        let bindings = self
            .bindings
            .iter()
            .filter(|(_, b)| b.segment == segment)
            .map(|(&k, _)| k)
            .collect();
        (accounts, bindings)
    }

    /// Re-appends the account record of `key` unchanged.
    pub fn copy_account(&mut self, key: DeviceAddr, from: SegmentId, log: &mut Log<'_>) {
        let Some(a) = self.accounts.get(&key).copied() else {
            return;
        };
        let rec = Record::Account {
            user: key.user,
            device: key.device,
            static_key: a.static_key,
            ts_ms: a.ts_ms,
        };
        let lsn = log.append(&rec, true);
        log.ledger.kill(from);
        let moved = Account {
            segment: lsn.segment,
            ..a
        };
        self.accounts.insert(key, moved);
    }

    /// Re-appends the binding of `static_key` unchanged.
    pub fn copy_binding(&mut self, static_key: StaticKey, from: SegmentId, log: &mut Log<'_>) {
        let Some(b) = self.bindings.get(&static_key).copied() else {
            return;
        };
        let rec = Record::KeyBinding {
            static_key,
            user: b.addr.user,
            device: b.addr.device,
            ts_ms: b.ts_ms,
        };
        let lsn = log.append(&rec, true);
        log.ledger.kill(from);
        let moved = Binding {
            segment: lsn.segment,
            ..b
        };
        self.bindings.insert(static_key, moved);
    }

    // ----- recovery ----------------------------------------------------------------------

    /// An `Account` or `KeyBinding` record (the last one per device or key wins); false for
    /// any other kind.
    pub fn recover(&mut self, seg: SegmentId, rec: &Record) -> bool {
        match *rec {
            Record::Account {
                user,
                device,
                static_key,
                ts_ms,
            } => {
                let account = Account {
                    static_key,
                    ts_ms,
                    segment: seg,
                };
                self.accounts.insert(DeviceAddr::new(user, device), account);
            }
            Record::KeyBinding {
                static_key,
                user,
                device,
                ts_ms,
            } => {
                let binding = Binding {
                    addr: DeviceAddr::new(user, device),
                    ts_ms,
                    segment: seg,
                };
                self.bindings.insert(static_key, binding);
            }
            _ => return false,
        }
        true
    }

    /// The segment of every live record (each counts once towards its segment's liveness).
    pub fn live_segments(&self) -> Vec<SegmentId> {
        let accounts = self.accounts.values().map(|a| a.segment);
        accounts
            .chain(self.bindings.values().map(|b| b.segment))
            .collect()
    }
}
