//! The `Link` step (multi-device account setup, run by the controller after registration):
//! every primary logs in and publishes its identity keys, then its companions are linked one
//! at a time (the server assigns the lowest free device id, so one at a time keeps the ids in
//! slot order): the companion connects without logging in and sends `LinkRequest`; on
//! `LinkCode` its primary sends `LinkApprove` signed with `sign_device`; the server answers the
//! primary `DeviceLinked` and the companion `Registered`; the companion logs in with the
//! address it was given and publishes its own keys (`PrekeyUpload`, the identity the primary
//! signed). Every connection is closed at the end of the step.

use protocol::{frame, DeviceAddr, Frame};
use switchboard_e2ee::{sign_device, Address, E2ee};

use crate::sys::now_ns;

use super::{Conn, Engine, Failure, Purpose, St, Ticker, MS};

/// Link-step state, per local slot.
pub(super) struct LinkState {
    /// Finished: a primary whose keys are published, a companion linked with its keys
    /// published, or either given up.
    done: Vec<bool>,
    /// Slots not finished.
    left: usize,
    /// One-time prekeys per upload.
    prekeys: u32,
}

impl Engine {
    /// Runs the link step over every local account (see the module docs).
    pub(super) fn step_link(&mut self, concurrency: usize, deadline_ns: u64, t: &mut Ticker) {
        let n = self.conns.len();
        let d = self.devices;
        let mut done = vec![false; n];
        for (i, a) in self.spec.accounts.iter().enumerate() {
            for (j, c) in a.companions.iter().take(d - 1).enumerate() {
                if let Some(x) = done.get_mut(i * d + 1 + j) {
                    *x = c.device.is_some();
                }
            }
        }
        let left = done.iter().filter(|&&x| !x).count();
        let total = left as u64;
        self.link = Some(LinkState {
            done,
            left,
            prekeys: self.spec.setup_prekeys,
        });
        self.purpose = Purpose::Link;
        self.set_pacing(0.0, concurrency);
        for p in (0..n as u32).step_by(d) {
            self.want(p..p + 1, true);
        }
        while now_ns() < deadline_ns && !self.stopped() {
            let left = self.link.as_ref().map_or(0, |l| l.left);
            if left == 0 && self.pending == 0 {
                break;
            }
            self.turn(10 * MS);
            t.tick(total - left as u64, total);
        }
        let all = 0..n as u32;
        self.want(all.clone(), false);
        for s in all {
            self.close(s, None);
        }
        self.link = None;
        self.purpose = Purpose::Login;
    }

    /// Marks `slot` finished (once).
    fn link_done(&mut self, slot: u32) {
        if let Some(l) = self.link.as_mut() {
            if let Some(x) = l.done.get_mut(slot as usize) {
                if !*x {
                    *x = true;
                    l.left = l.left.saturating_sub(1);
                }
            }
        }
    }

    /// Starts the next unfinished companion of the account whose primary is `p` (once the
    /// primary's keys are published), unless one is in progress.
    fn link_next(&mut self, p: u32) {
        let Some(l) = &self.link else { return };
        if !l.done.get(p as usize).copied().unwrap_or(false) {
            return;
        }
        for s in p + 1..p + self.devices as u32 {
            if l.done.get(s as usize).copied().unwrap_or(true) {
                continue;
            }
            if self.conns.get(s as usize).is_some_and(|c| !c.wanted) {
                self.want(s..s + 1, true);
            }
            return;
        }
    }

    /// A slot of the link step was given up: a primary takes its unfinished companions with
    /// it; after a companion the next one is tried.
    pub(super) fn link_gave_up(&mut self, slot: u32) {
        if self.link.is_none() {
            return;
        }
        let p = self.primary_slot(slot);
        if slot == p {
            for s in p..p + self.devices as u32 {
                self.link_done(s);
            }
        } else {
            self.link_done(slot);
            self.link_next(p);
        }
    }

    /// A primary's `LinkApprove` (request id `ref_id`) was refused: the companion's attempt
    /// fails (and is retried with a new code).
    pub(super) fn link_refused(&mut self, ref_id: u64, why: &str) {
        let Some(global) = (ref_id as usize).checked_sub(1) else {
            return;
        };
        let Some(local) = global.checked_sub(self.spec.base) else {
            return;
        };
        if local < self.conns.len() && self.dev_index(local as u32) != 0 {
            self.close(local as u32, Some(&format!("link refused: {why}")));
        }
    }

    /// Publishes `slot`'s identity keys and a signed prekey (and `prekeys` one-time prekeys).
    pub(super) fn upload_keys(&mut self, slot: u32, c: &mut Conn) -> Result<(), Failure> {
        let global = self.global(slot);
        let phone = self.phone(global)?;
        let identity = self
            .idents
            .get(slot as usize)
            .cloned()
            .flatten()
            .ok_or("no identity keys for this device")?;
        let count = self.link.as_ref().map_or(0, |l| l.prekeys) as usize;
        let mut e = E2ee::with_identity(Address::new(phone, 0), identity);
        let pub_id = e.identity();
        let (spk, otpks) = e
            .generate_prekeys(count)
            .map_err(|e| format!("prekeys: {e}"))?;
        let f = Frame::PrekeyUpload(frame::PrekeyUpload {
            keys: Box::new(frame::DeviceKeys {
                identity_dh: pub_id.dh,
                identity_sign: pub_id.sign,
                signed_prekey_id: spk.id,
                signed_prekey: spk.public,
                signed_prekey_sig: spk.signature,
            }),
            one_time: otpks
                .iter()
                .map(|k| frame::OneTimePrekey {
                    id: k.id,
                    key: k.public,
                })
                .collect(),
        });
        Self::seal(c, &f)
    }

    /// `PrekeyStatus { UPLOADED }`: a primary may start linking; a companion is done.
    pub(super) fn on_keys_uploaded(&mut self, slot: u32, c: &mut Conn, now: u64) {
        if self.link.is_none() {
            return;
        }
        let p = self.primary_slot(slot);
        if slot == p {
            if c.st != St::Ready {
                return;
            }
            self.out.keys_uploaded += 1;
            self.link_done(slot);
            self.link_next(p);
        } else if c.st == St::AwaitKeys {
            self.out.keys_uploaded += 1;
            self.out.linked += 1;
            self.ok_time(now);
            self.lat_hs.record_ns(now.saturating_sub(c.t0_ns));
            self.finish_conn(slot, c);
            self.link_done(slot);
            self.link_next(p);
        }
    }

    /// `LinkCode` at a companion: its primary approves it with its signature.
    pub(super) fn on_link_code(
        &mut self,
        slot: u32,
        c: &mut Conn,
        code: u64,
    ) -> Result<(), Failure> {
        let p = self.primary_slot(slot);
        let user = self.phone(self.global(slot))?;
        let static_key = self
            .keys
            .get(slot as usize)
            .map(|k| k.public)
            .ok_or("no key")?;
        let mine = self
            .idents
            .get(slot as usize)
            .cloned()
            .flatten()
            .ok_or("no identity keys for this companion")?
            .public();
        let primary = self
            .idents
            .get(p as usize)
            .cloned()
            .flatten()
            .ok_or("no identity keys for the primary")?;
        let approve = Frame::LinkApprove(frame::LinkApprove {
            request_id: self.global(slot) as u64 + 1,
            code,
            keys: Box::new(frame::LinkKeys {
                static_key,
                identity_dh: mine.dh,
                identity_sign: mine.sign,
                signature: sign_device(&primary, user, &mine.dh, &mine.sign),
            }),
        });
        let pc = self
            .conns
            .get_mut(p as usize)
            .filter(|pc| pc.st == St::Ready)
            .ok_or("primary not logged in")?;
        Self::seal(pc, &approve)?;
        self.mark_dirty(p);
        c.st = St::AwaitLinked;
        Ok(())
    }

    /// `Registered` at a companion: linked as `addr`; log in.
    pub(super) fn on_companion_registered(
        &mut self,
        slot: u32,
        c: &mut Conn,
        addr: DeviceAddr,
    ) -> Result<(), Failure> {
        self.out
            .linked_devices
            .push((self.global(slot), addr.device));
        let login = Frame::Login(frame::Login {
            addr,
            revision: protocol::PROTOCOL_REVISION,
            capabilities: self.capabilities(),
        });
        Self::seal(c, &login)?;
        c.st = St::AwaitLinkWelcome;
        Ok(())
    }

    /// `Welcome` at a linked companion: publish its keys.
    pub(super) fn on_companion_welcome(&mut self, slot: u32, c: &mut Conn) -> Result<(), Failure> {
        self.upload_keys(slot, c)?;
        c.st = St::AwaitKeys;
        Ok(())
    }
}
