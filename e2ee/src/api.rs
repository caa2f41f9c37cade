//! The high-level API the client SDK calls: [`E2ee`].

use std::collections::BTreeMap;

use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::envelope::Envelope;
use crate::error::{DecodeError, Error};
use crate::fingerprint::{SafetyNumber, Trust, TrustStore};
use crate::keys::{
    IdentityKeyPair, IdentityPublic, OneTimePreKeyPublic, PreKeyBundle, PreKeyStore,
    SignedPreKeyPublic,
};
use crate::sender_key::{
    GroupKeys, SenderKey, SenderKeyDistribution, SenderKeyMessage, SenderKeyState, MAX_GROUPS,
    MAX_KEYS_PER_SENDER, MAX_SENDER_RECORDS,
};
use crate::session::{Established, InitiatorPending, Session};
use crate::store::StateStore;
use crate::Address;

/// Sessions kept per peer: the current one and up to four older ones, which are still tried
/// on decryption (simultaneous initiation, or a peer that restarted a session while older
/// messages were in flight). The most recently successful one is current.
pub const MAX_SESSIONS_PER_PEER: usize = 5;
/// Most peers with sessions in one state.
pub const MAX_PEERS: usize = 100_000;
/// Version byte of the serialized state (inside the encrypted state file). Version 2 added
/// the Sender Key section at the end; a version 1 state is still read (it has no group keys)
/// and is written back as version 2 by the next save.
pub const STATE_VERSION: u8 = 2;
/// The previous state version, read for migration.
const STATE_VERSION_1: u8 = 1;

/// What [`E2ee::process_sender_key_distribution`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DistributionReceived {
    /// The group the distribution is for.
    pub group_id: u64,
    /// The sender key id.
    pub key_id: u32,
    /// False when this exact key (same key id and signing key) was already held: nothing
    /// changed (a repeated distribution never rewinds a chain).
    pub new: bool,
}

/// A decrypted message. The bytes are zeroized on drop.
#[derive(Debug)]
pub struct Plaintext {
    /// The message.
    pub bytes: Zeroizing<Vec<u8>>,
    /// True when this message started a new session (a PreKeyMessage that ran X3DH).
    pub session_started: bool,
}

impl std::ops::Deref for Plaintext {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// One device's end-to-end state: identity, prekeys, sessions, known identities, and where
/// it is persisted.
///
/// With a [`StateStore`], every call that changes state (`generate_prekeys`, `encrypt`,
/// `decrypt`, `accept_identity`; not `decrypt_deferred`) writes the whole state file
/// atomically **before** it returns. In particular an envelope is returned only once the advanced sending chain is on
/// disk, so a crash can never make the device reuse a message key, and a decrypted message
/// is returned only once its key deletion is on disk (ack the server's `Deliver` after
/// `decrypt` returns). If a write fails, the in-memory change is rolled back and the
/// instance is poisoned ([`Error::Poisoned`]): reopen it with [`E2ee::new`].
pub struct E2ee {
    me: Address,
    identity: IdentityKeyPair,
    prekeys: PreKeyStore,
    trust: TrustStore,
    sessions: BTreeMap<Address, Vec<Session>>,
    groups: GroupKeys,
    store: Option<StateStore>,
    poisoned: bool,
}

impl std::fmt::Debug for E2ee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2ee")
            .field("me", &self.me)
            .field("identity", &self.identity.public())
            .field("peers", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl E2ee {
    /// Opens the state in `store`, or creates a new identity for `me` and saves it.
    /// Refuses a state file that belongs to another address.
    pub fn new(store: StateStore, me: Address) -> Result<Self, Error> {
        match store.load()? {
            Some(bytes) => {
                let mut e = Self::import_state(&bytes)?;
                if e.me != me {
                    return Err(Error::StoreAddressMismatch {
                        expected: me,
                        found: e.me,
                    });
                }
                e.store = Some(store);
                Ok(e)
            }
            None => {
                let mut e = Self::in_memory(me);
                e.store = Some(store);
                e.persist()?;
                Ok(e)
            }
        }
    }

    /// A new identity kept only in memory (tests, or a caller that persists
    /// [`E2ee::export_state`] itself).
    pub fn in_memory(me: Address) -> Self {
        Self::with_identity(me, IdentityKeyPair::generate(&mut OsRng))
    }

    /// An in-memory instance with a given identity.
    pub fn with_identity(me: Address, identity: IdentityKeyPair) -> Self {
        Self {
            me,
            identity,
            prekeys: PreKeyStore::new(),
            trust: TrustStore::new(),
            sessions: BTreeMap::new(),
            groups: GroupKeys::default(),
            store: None,
            poisoned: false,
        }
    }

    /// This device's address.
    pub fn local_address(&self) -> Address {
        self.me
    }

    /// This device's public identity.
    pub fn identity(&self) -> IdentityPublic {
        self.identity.public()
    }

    /// Rotates the signed prekey and generates `count` one-time prekeys: the public parts
    /// to upload to the server. Older signed prekeys are kept (up to
    /// [`crate::keys::MAX_SIGNED_PREKEYS_KEPT`]) for first messages still in flight.
    pub fn generate_prekeys(
        &mut self,
        count: usize,
    ) -> Result<(SignedPreKeyPublic, Vec<OneTimePreKeyPublic>), Error> {
        self.check_poisoned()?;
        let mut prekeys = self.prekeys.clone();
        let spk = prekeys.rotate_signed_prekey(&self.identity, &mut OsRng);
        let otpks = prekeys.generate_one_time_prekeys(count, &mut OsRng)?;
        let old = std::mem::replace(&mut self.prekeys, prekeys);
        if let Err(e) = self.persist() {
            self.prekeys = old;
            self.poisoned = true;
            return Err(e);
        }
        Ok((spk, otpks))
    }

    /// Generates `count` one-time prekeys with fresh (increasing) ids without rotating the
    /// signed prekey: the public parts to upload when the server asks for a top-up. Persisted
    /// before it returns, like [`E2ee::generate_prekeys`].
    pub fn generate_one_time_prekeys(
        &mut self,
        count: usize,
    ) -> Result<Vec<OneTimePreKeyPublic>, Error> {
        self.check_poisoned()?;
        let mut prekeys = self.prekeys.clone();
        let otpks = prekeys.generate_one_time_prekeys(count, &mut OsRng)?;
        let old = std::mem::replace(&mut self.prekeys, prekeys);
        if let Err(e) = self.persist() {
            self.prekeys = old;
            self.poisoned = true;
            return Err(e);
        }
        Ok(otpks)
    }

    /// The public part of the current signed prekey (what every upload carries), if one was
    /// generated.
    pub fn signed_prekey(&self) -> Option<SignedPreKeyPublic> {
        self.prekeys.current_signed_prekey().map(|k| k.public())
    }

    /// Our own bundle with the current signed prekey and the given one-time prekey (what the
    /// server would assemble; for tests and tools).
    pub fn own_bundle(&self, one_time: Option<&OneTimePreKeyPublic>) -> Option<PreKeyBundle> {
        let spk = self.prekeys.current_signed_prekey()?;
        Some(PreKeyBundle::new(
            &self.identity.public(),
            &spk.public(),
            one_time,
        ))
    }

    /// One-time prekeys still held locally (the server's count is what matters for top-up;
    /// this is the local mirror).
    pub fn one_time_prekey_count(&self) -> usize {
        self.prekeys.one_time_prekey_count()
    }

    /// Encrypts `plaintext` for `to`: with the existing session, or with a new one started
    /// from `bundle` (X3DH; the bundle's signature is verified first). Returns the envelope
    /// bytes for the `Send` payload. A bundle whose identity differs from the one recorded
    /// for `to` is refused with [`Error::IdentityChanged`].
    pub fn encrypt(
        &mut self,
        to: Address,
        bundle: Option<&PreKeyBundle>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.check_poisoned()?;
        let mut first_seen = None;
        if let Some(b) = bundle {
            b.verify_signature()?;
            if self.trust.check(to, &b.identity())? == Trust::FirstSeen {
                first_seen = Some(b.identity());
            }
        }
        let mut record = self.sessions.get(&to).cloned().unwrap_or_default();
        if record.is_empty() {
            let b = bundle.ok_or(Error::NoSession(to))?;
            record.push(Session::Pending(InitiatorPending::start(
                &self.identity,
                b,
                &mut OsRng,
            )?));
        }
        let envelope = match record.first_mut() {
            Some(s) => s.encrypt(plaintext)?,
            None => return Err(Error::NoSession(to)),
        };
        self.commit(to, record, None, first_seen, true)?;
        Ok(envelope.encode())
    }

    /// Decrypts an envelope from `from`. A PreKeyMessage from a new X3DH creates a session
    /// (deleting the one-time prekey it used); a PreKeyMessage or Message in an existing
    /// session is decrypted there. On any error nothing changed.
    pub fn decrypt(&mut self, from: Address, envelope: &[u8]) -> Result<Plaintext, Error> {
        self.decrypt_inner(from, envelope, true)
    }

    /// [`E2ee::decrypt`] without writing the state file: the change is in memory only until
    /// the next [`E2ee::save`] (or the next `encrypt`, which always writes). This is the
    /// at-least-once-friendly order for the SDK: `decrypt_deferred` → store the plaintext
    /// durably → `save` → ack the `Deliver`. A crash anywhere before `save` leaves the old
    /// state on disk, so the redelivered envelope decrypts again (dedup by
    /// `(sender, client_msg_id)`), and no message is lost.
    pub fn decrypt_deferred(&mut self, from: Address, envelope: &[u8]) -> Result<Plaintext, Error> {
        self.decrypt_inner(from, envelope, false)
    }

    fn decrypt_inner(
        &mut self,
        from: Address,
        envelope: &[u8],
        save: bool,
    ) -> Result<Plaintext, Error> {
        self.check_poisoned()?;
        match Envelope::decode(envelope)? {
            Envelope::Message(m) => {
                let mut record = self
                    .sessions
                    .get(&from)
                    .cloned()
                    .ok_or(Error::NoSessionForMessage(from))?;
                let mut first_error = None;
                for i in 0..record.len() {
                    let s = record.remove(i);
                    let (s, r) = s.decrypt(&m, &mut OsRng);
                    match r {
                        Ok(bytes) => {
                            // The session that worked becomes current.
                            record.insert(0, s);
                            self.commit(from, record, None, None, save)?;
                            return Ok(Plaintext {
                                bytes,
                                session_started: false,
                            });
                        }
                        Err(e) => {
                            record.insert(i, s);
                            first_error.get_or_insert(e);
                        }
                    }
                }
                Err(first_error.unwrap_or(Error::NoSessionForMessage(from)))
            }
            Envelope::PreKey(p) => {
                let trust = self.trust.check(from, &p.init.identity)?;
                let mut record = self.sessions.get(&from).cloned().unwrap_or_default();
                if let Some(i) = record.iter().position(|s| s.base_key() == &p.init.base_key) {
                    // A repeated PreKeyMessage of a session we already have.
                    let s = record.remove(i);
                    let (s, r) = s.decrypt(&p.message, &mut OsRng);
                    let bytes = r?;
                    record.insert(0, s);
                    self.commit(from, record, None, None, save)?;
                    return Ok(Plaintext {
                        bytes,
                        session_started: false,
                    });
                }
                let mut prekeys = self.prekeys.clone();
                let (session, bytes) =
                    Established::respond(&self.identity, &mut prekeys, &p, &mut OsRng)?;
                record.insert(0, Session::Established(session));
                record.truncate(MAX_SESSIONS_PER_PEER);
                let first_seen = (trust == Trust::FirstSeen).then_some(p.init.identity);
                self.commit(from, record, Some(prekeys), first_seen, save)?;
                Ok(Plaintext {
                    bytes,
                    session_started: true,
                })
            }
        }
    }

    /// Whether there is a session with `peer`.
    pub fn has_session(&self, peer: Address) -> bool {
        self.sessions.get(&peer).is_some_and(|r| !r.is_empty())
    }

    /// The identity recorded for `peer` (first seen, or last accepted).
    pub fn known_identity(&self, peer: Address) -> Option<IdentityPublic> {
        self.trust.get(peer).copied()
    }

    /// The safety number with `contact`, from the identity recorded for it.
    pub fn safety_number(&self, contact: Address) -> Result<SafetyNumber, Error> {
        let remote = self.trust.get(contact).ok_or(Error::NoSession(contact))?;
        Ok(SafetyNumber::new(
            self.me.user,
            &self.identity.public(),
            contact.user,
            remote,
        ))
    }

    /// Accepts a changed identity for `peer` after the user agreed (compared safety numbers):
    /// records it and drops sessions made with any other identity.
    pub fn accept_identity(
        &mut self,
        peer: Address,
        identity: &IdentityPublic,
    ) -> Result<(), Error> {
        self.check_poisoned()?;
        let old_trust = self.trust.get(peer).copied();
        let old_record = self.sessions.get(&peer).cloned();
        self.trust.replace(peer, identity);
        if let Some(r) = self.sessions.get_mut(&peer) {
            r.retain(|s| s.remote_identity() == identity);
        }
        if let Err(e) = self.persist() {
            match old_trust {
                Some(t) => self.trust.replace(peer, &t),
                None => self.trust.forget(peer),
            }
            if let Some(r) = old_record {
                self.sessions.insert(peer, r);
            }
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }

    /// The signature this device (as the primary of `user`) gives a companion's identity
    /// keys: [`crate::sign_device`] with this device's identity key pair, for `LinkApprove`.
    pub fn sign_device(&self, user: u64, companion: &IdentityPublic) -> [u8; 64] {
        crate::keys::sign_device(&self.identity, user, &companion.dh, &companion.sign)
    }

    /// Forgets `peer` entirely: its sessions, its recorded identity and the sender keys it
    /// distributed in every group (a device removed
    /// from its account, whose id may later be reused by another device). Persisted before it
    /// returns, like [`E2ee::accept_identity`]. Returns whether anything was known.
    pub fn forget_peer(&mut self, peer: Address) -> Result<bool, Error> {
        self.check_poisoned()?;
        let old_trust = self.trust.get(peer).copied();
        let old_record = self.sessions.remove(&peer);
        let sender_keys: Vec<(u64, Address)> = self
            .groups
            .received
            .keys()
            .filter(|(_, a)| *a == peer)
            .copied()
            .collect();
        let old_sender_keys: Vec<_> = sender_keys
            .into_iter()
            .filter_map(|k| self.groups.received.remove(&k).map(|r| (k, r)))
            .collect();
        if old_trust.is_none() && old_record.is_none() && old_sender_keys.is_empty() {
            return Ok(false);
        }
        self.trust.forget(peer);
        if let Err(e) = self.persist() {
            if let Some(t) = old_trust {
                self.trust.replace(peer, &t);
            }
            if let Some(r) = old_record {
                self.sessions.insert(peer, r);
            }
            self.groups.received.extend(old_sender_keys);
            self.poisoned = true;
            return Err(e);
        }
        Ok(true)
    }

    // -----------------------------------------------------------------------------------
    // Sender Keys (groups): docs/e2ee.md "Sender Keys (groups)".
    // -----------------------------------------------------------------------------------

    /// This device's sender key distribution for `group` (the encoded
    /// [`SenderKeyDistribution`], secret): creates the sender key (random key id, chain key and
    /// signing key) and persists it first if there is none. Send the bytes to every other
    /// member device with [`E2ee::encrypt`] before the first [`E2ee::group_encrypt`], and to
    /// member devices added later (they get the current iteration, so they cannot read
    /// earlier messages).
    pub fn sender_key_distribution(&mut self, group: u64) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.check_poisoned()?;
        if let Some(k) = self.groups.own.get(&group) {
            return Ok(k.distribution().encode());
        }
        self.new_sender_key(group)
    }

    /// Replaces this device's sender key for `group` with a new one (new key id, chain key
    /// and signing key) and returns its distribution. Call it when a member is removed from
    /// the group or one of its devices is unlinked, after forgetting that device's keys, and
    /// send the distribution to the remaining member devices only: the removed one holds
    /// only the old chain, so it cannot decrypt anything sent under the new key.
    pub fn rotate_sender_key(&mut self, group: u64) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.check_poisoned()?;
        self.new_sender_key(group)
    }

    /// The key id of this device's current sender key for `group`, if any.
    pub fn sender_key_id(&self, group: u64) -> Option<u32> {
        self.groups.own.get(&group).map(SenderKey::key_id)
    }

    /// The key ids of the sender keys held from `sender` in `group`, newest first.
    pub fn received_sender_key_ids(&self, group: u64, sender: Address) -> Vec<u32> {
        self.groups
            .received
            .get(&(group, sender))
            .map(|r| r.iter().map(SenderKeyState::key_id).collect())
            .unwrap_or_default()
    }

    fn new_sender_key(&mut self, group: u64) -> Result<Zeroizing<Vec<u8>>, Error> {
        let old_id = self.groups.own.get(&group).map(SenderKey::key_id);
        if old_id.is_none() && self.groups.own.len() >= MAX_GROUPS {
            return Err(Error::OutOfRange {
                what: "groups with a sender key",
                value: self.groups.own.len() + 1,
                max: MAX_GROUPS,
            });
        }
        let mut key_id = rand::RngCore::next_u32(&mut OsRng);
        while Some(key_id) == old_id {
            key_id = rand::RngCore::next_u32(&mut OsRng);
        }
        let key = SenderKey::generate(group, key_id, &mut OsRng);
        let distribution = key.distribution().encode();
        self.commit_own(group, key, true)?;
        Ok(distribution)
    }

    /// Installs a sender key distribution received from `from` (the plaintext of a pairwise
    /// message that [`E2ee::decrypt`] returned for `from`: only the pairwise session
    /// authenticates it). A new key id is added (the newest [`MAX_KEYS_PER_SENDER`] are kept
    /// per (group, sender)); the key already held under that id with the same signing key is
    /// left as it is (`new: false`: a repeated distribution never rewinds the chain); the
    /// same id with another signing key replaces it (the sender lost its state and started
    /// again). Persisted before it returns.
    pub fn process_sender_key_distribution(
        &mut self,
        from: Address,
        distribution: &[u8],
    ) -> Result<DistributionReceived, Error> {
        self.check_poisoned()?;
        let d = SenderKeyDistribution::decode(distribution)?;
        let slot = (d.group_id, from);
        let mut record = self.groups.received.get(&slot).cloned().unwrap_or_default();
        let mut out = DistributionReceived {
            group_id: d.group_id,
            key_id: d.key_id,
            new: true,
        };
        match record.iter().position(|s| s.key_id() == d.key_id) {
            Some(i) if record.get(i).map(|s| *s.signing_key()) == Some(d.signing_key) => {
                out.new = false;
                return Ok(out);
            }
            Some(i) => {
                if let Some(s) = record.get_mut(i) {
                    *s = SenderKeyState::from_distribution(&d);
                }
            }
            None => {
                if record.is_empty() && self.groups.received.len() >= MAX_SENDER_RECORDS {
                    return Err(Error::OutOfRange {
                        what: "sender key records",
                        value: self.groups.received.len() + 1,
                        max: MAX_SENDER_RECORDS,
                    });
                }
                record.insert(0, SenderKeyState::from_distribution(&d));
                record.truncate(MAX_KEYS_PER_SENDER);
            }
        }
        self.commit_received(slot, Some(record), true)?;
        Ok(out)
    }

    /// Encrypts `plaintext` once for every member of `group` with this device's sender key:
    /// the encoded, signed [`SenderKeyMessage`]. The advanced chain is persisted before the
    /// bytes are returned (no message key is ever used twice). [`Error::NoSenderKey`] if
    /// [`E2ee::sender_key_distribution`] was never called for the group.
    pub fn group_encrypt(&mut self, group: u64, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        self.check_poisoned()?;
        let mut key = self
            .groups
            .own
            .get(&group)
            .cloned()
            .ok_or(Error::NoSenderKey(group))?;
        let m = key.encrypt(plaintext)?;
        self.commit_own(group, key, true)?;
        Ok(m.encode())
    }

    /// Decrypts a group message that the server delivered as `group` from `from`: checks the
    /// group, finds the sender key (group, from, key id), verifies the signature, then
    /// decrypts (out of order within [`crate::sender_key::MAX_SKIP`]; a replay is
    /// [`Error::DuplicateMessage`]). On any error nothing changed. Persisted before it
    /// returns, like [`E2ee::decrypt`].
    pub fn group_decrypt(
        &mut self,
        group: u64,
        from: Address,
        message: &[u8],
    ) -> Result<Plaintext, Error> {
        self.group_decrypt_inner(group, from, message, true)
    }

    /// [`E2ee::group_decrypt`] without writing the state file (the order of
    /// [`E2ee::decrypt_deferred`]: decrypt → store the plaintext → [`E2ee::save`] → ack).
    pub fn group_decrypt_deferred(
        &mut self,
        group: u64,
        from: Address,
        message: &[u8],
    ) -> Result<Plaintext, Error> {
        self.group_decrypt_inner(group, from, message, false)
    }

    fn group_decrypt_inner(
        &mut self,
        group: u64,
        from: Address,
        message: &[u8],
        save: bool,
    ) -> Result<Plaintext, Error> {
        self.check_poisoned()?;
        let m = SenderKeyMessage::decode(message)?;
        if m.group_id != group {
            return Err(Error::GroupMismatch {
                expected: group,
                found: m.group_id,
            });
        }
        let unknown = Error::UnknownSenderKey {
            group,
            sender: from,
            key_id: m.key_id,
        };
        let slot = (group, from);
        let Some(mut record) = self.groups.received.get(&slot).cloned() else {
            return Err(unknown);
        };
        let Some(state) = record.iter_mut().find(|s| s.key_id() == m.key_id) else {
            return Err(unknown);
        };
        let bytes = state.decrypt(&m)?;
        self.commit_received(slot, Some(record), save)?;
        Ok(Plaintext {
            bytes,
            session_started: false,
        })
    }

    /// Forgets everything about `group`: this device's sender key and every key received
    /// for it (the group was left or deleted). Persisted. Returns whether anything was held.
    pub fn forget_group(&mut self, group: u64) -> Result<bool, Error> {
        self.check_poisoned()?;
        let old_own = self.groups.own.remove(&group);
        let slots: Vec<(u64, Address)> = self
            .groups
            .received
            .range(GroupKeys::group_range(group))
            .map(|(k, _)| *k)
            .collect();
        let old_received: Vec<_> = slots
            .into_iter()
            .filter_map(|k| self.groups.received.remove(&k).map(|r| (k, r)))
            .collect();
        if old_own.is_none() && old_received.is_empty() {
            return Ok(false);
        }
        if let Err(e) = self.persist() {
            if let Some(k) = old_own {
                self.groups.own.insert(group, k);
            }
            self.groups.received.extend(old_received);
            self.poisoned = true;
            return Err(e);
        }
        Ok(true)
    }

    /// Forgets the sender keys `member` (a device) distributed in `group` (it was removed
    /// from the group, or unlinked). Later messages from it are [`Error::UnknownSenderKey`].
    /// Persisted. Returns whether anything was held. Call [`E2ee::rotate_sender_key`] next.
    pub fn forget_group_member(&mut self, group: u64, member: Address) -> Result<bool, Error> {
        self.check_poisoned()?;
        if !self.groups.received.contains_key(&(group, member)) {
            return Ok(false);
        }
        self.commit_received((group, member), None, true)?;
        Ok(true)
    }

    /// Installs this device's sender key for `group`, persists, and rolls back and poisons
    /// the instance if the write fails.
    fn commit_own(&mut self, group: u64, key: SenderKey, save: bool) -> Result<(), Error> {
        let old = self.groups.own.insert(group, key);
        if !save {
            return Ok(());
        }
        if let Err(e) = self.persist() {
            match old {
                Some(k) => self.groups.own.insert(group, k),
                None => self.groups.own.remove(&group),
            };
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }

    /// Installs (or with `None` removes) a received sender key record, like
    /// [`E2ee::commit_own`].
    fn commit_received(
        &mut self,
        slot: (u64, Address),
        record: Option<Vec<SenderKeyState>>,
        save: bool,
    ) -> Result<(), Error> {
        let old = match record {
            Some(r) => self.groups.received.insert(slot, r),
            None => self.groups.received.remove(&slot),
        };
        if !save {
            return Ok(());
        }
        if let Err(e) = self.persist() {
            match old {
                Some(r) => self.groups.received.insert(slot, r),
                None => self.groups.received.remove(&slot),
            };
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }

    /// Writes the state file now (every state change except `decrypt_deferred` already
    /// does). A failed write poisons the instance.
    pub fn save(&mut self) -> Result<(), Error> {
        self.check_poisoned()?;
        let r = self.persist();
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// The serialized state (secret: contains private keys). This is what the state file
    /// encrypts.
    pub fn export_state(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        out.put_u8(STATE_VERSION);
        self.me.put(&mut out);
        self.identity.put_private(&mut out);
        self.prekeys.put(&mut out);
        self.trust.put(&mut out);
        out.put_u32(self.sessions.len() as u32);
        for (peer, record) in &self.sessions {
            peer.put(&mut out);
            out.put_u32(record.len() as u32);
            for s in record {
                s.put(&mut out);
            }
        }
        self.groups.put(&mut out);
        out
    }

    /// Rebuilds an in-memory instance from [`E2ee::export_state`] bytes; never panics.
    pub fn import_state(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let version = r.u8("state_version")?;
        if version != STATE_VERSION && version != STATE_VERSION_1 {
            return Err(DecodeError::UnknownVersion(version).into());
        }
        let me = Address::read(&mut r)?;
        let identity = IdentityKeyPair::read_private(&mut r)?;
        let prekeys = PreKeyStore::read(&mut r)?;
        let trust = TrustStore::read(&mut r)?;
        let n = r.count("peer_count", MAX_PEERS)?;
        let mut sessions = BTreeMap::new();
        for _ in 0..n {
            let peer = Address::read(&mut r)?;
            let k = r.count("sessions_per_peer", MAX_SESSIONS_PER_PEER)?;
            let mut record = Vec::with_capacity(k);
            for _ in 0..k {
                record.push(Session::read(&mut r)?);
            }
            if sessions.insert(peer, record).is_some() {
                return Err(DecodeError::InvalidValue {
                    field: "peer_address",
                }
                .into());
            }
        }
        let groups = if version == STATE_VERSION_1 {
            GroupKeys::default()
        } else {
            GroupKeys::read(&mut r)?
        };
        r.finish()?;
        Ok(Self {
            me,
            identity,
            prekeys,
            trust,
            sessions,
            groups,
            store: None,
            poisoned: false,
        })
    }

    fn check_poisoned(&self) -> Result<(), Error> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    fn persist(&self) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.save(&self.export_state()),
            None => Ok(()),
        }
    }

    /// Installs a new session record (and prekeys, and a first-seen identity), persists, and
    /// rolls everything back and poisons the instance if the write fails.
    fn commit(
        &mut self,
        peer: Address,
        record: Vec<Session>,
        prekeys: Option<PreKeyStore>,
        first_seen: Option<IdentityPublic>,
        save: bool,
    ) -> Result<(), Error> {
        if !self.sessions.contains_key(&peer) && self.sessions.len() >= MAX_PEERS {
            return Err(Error::OutOfRange {
                what: "peers with sessions",
                value: self.sessions.len() + 1,
                max: MAX_PEERS,
            });
        }
        if let Some(id) = &first_seen {
            self.trust.remember(peer, id)?;
        }
        let old_record = self.sessions.insert(peer, record);
        let old_prekeys = prekeys.map(|p| std::mem::replace(&mut self.prekeys, p));
        if !save {
            return Ok(());
        }
        if let Err(e) = self.persist() {
            match old_record {
                Some(r) => self.sessions.insert(peer, r),
                None => self.sessions.remove(&peer),
            };
            if let Some(p) = old_prekeys {
                self.prekeys = p;
            }
            if first_seen.is_some() {
                self.trust.forget(peer);
            }
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }
}
